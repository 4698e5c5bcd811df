"""linear_mean_logits: the head's mean logit at each position against a float64 reference (linear and softcapped
heads, bias, LoRA term, response mask on every backend, one block or many, bf16), its gradients (of every operand,
a softcapped head's through a second vocabulary pass, the masked rows and NaN rows of other positions giving
none); bad inputs raise naming the argument."""
import pytest
import torch

import fastalign as fa
from conftest import CPU_BACKENDS


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=g).to(dtype)
    weight = torch.randn(40, 16, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    low_rank = (torch.randn(3, 7, 2, generator=g).to(dtype), torch.randn(40, 2, generator=g).to(dtype))
    mask = torch.rand(3, 7, generator=g) < 0.5
    return hidden, weight, bias, low_rank, mask


def _reference(hidden, weight, bias, low_rank, scale, softcap, classes=None):
    u = hidden.double() @ weight.double().T
    if bias is not None:
        u = u + bias.double()
    if low_rank is not None:
        u = u + low_rank[0].double() @ low_rank[1].double().T
    z = scale * u if softcap is None else softcap * torch.tanh(scale * u / softcap)
    return z.mean(-1) if classes is None else z @ classes.double() / z.shape[-1]


def _classes(seed=7):
    return torch.rand(40, generator=torch.Generator().manual_seed(seed)) + 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["linear", "softcap"])
@pytest.mark.parametrize("terms", ["plain", "bias", "bias_lora"])
def test_matches_reference(backend, softcap, terms):
    hidden, weight, bias, low_rank, mask = _inputs()
    head = dict(bias=None if terms == "plain" else bias, low_rank=low_rank if terms == "bias_lora" else None)
    want = _reference(hidden, weight, **head, scale=0.5, softcap=softcap)
    got = fa.linear_mean_logits(hidden, weight, **head, logit_scale=0.5, softcap=softcap, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got = fa.linear_mean_logits(hidden, weight, **head, logit_scale=0.5, softcap=softcap, response_mask=mask,
                                backend=backend)
    torch.testing.assert_close(got.double(), torch.where(mask, want, 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("compaction", ["1", "0"])
def test_softcapped_rows_a_block_at_a_time(backend, compaction, monkeypatch):
    """A block per row (a budget below one row's logits), with the masked rows put first on the device (triton) or
    every row multiplied (FASTALIGN_DEVICE_COMPACTION=0), or picked on the host (cpp)."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-6")
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", compaction)
    hidden, weight, bias, low_rank, mask = _inputs(seed=1)
    want = _reference(hidden, weight, bias, low_rank, 1.0, 3.0)
    got = fa.linear_mean_logits(hidden, weight, bias=bias, low_rank=low_rank, softcap=3.0, response_mask=mask,
                                backend=backend)
    torch.testing.assert_close(got.double(), torch.where(mask, want, 0.0), rtol=1e-5, atol=1e-5)
    empty = fa.linear_mean_logits(hidden, weight, softcap=3.0, response_mask=torch.zeros_like(mask), backend=backend)
    assert not empty.any()


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["linear", "softcap"])
def test_bf16_inputs(softcap):
    """bf16 operands: the product in bf16 (fp32 accumulation), the rest in fp32, within bf16 rounding of float64."""
    hidden, weight, bias, _, mask = _inputs(torch.bfloat16)
    want = _reference(hidden, weight, bias, None, 1.0, softcap)
    got = fa.linear_mean_logits(hidden, weight, bias=bias, softcap=softcap, response_mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.where(mask, want, 0.0), rtol=2e-2, atol=2e-2)


def _grads(out, weights, tensors):
    return torch.autograd.grad((out.double() * weights).sum(), tensors, allow_unused=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["linear", "softcap"])
@pytest.mark.parametrize("blocks", ["one", "per-row", "per-row-uncompacted"])
def test_gradients_match_reference(backend, softcap, blocks, monkeypatch):
    """d/d(hidden, weight, bias, a, L) of a weighted sum of the masked means, against float64 autograd; one block
    or a block per row (the backward's blocks too; with FASTALIGN_DEVICE_COMPACTION=0 every row multiplied), the
    rows outside the mask with NaN hidden states."""
    if blocks != "one":
        monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-6")
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", "0" if blocks == "per-row-uncompacted" else "1")
    hidden, weight, bias, (a, lora), mask = _inputs(seed=2)
    hidden[~mask] = float("nan")  # rows not asked for: nothing of theirs reaches a gradient
    a[~mask] = float("nan")
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight, bias, a, lora)]
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = fa.linear_mean_logits(tensors[0], tensors[1], bias=tensors[2], low_rank=(tensors[3], tensors[4]),
                                logit_scale=0.5, softcap=softcap, response_mask=mask, backend=backend)
    got_grads = _grads(got, weights, tensors)
    ref = [t.detach().double().nan_to_num(0.0).requires_grad_(True) for t in (hidden, weight, bias, a, lora)]
    want = torch.where(mask, _reference(ref[0], ref[1], ref[2], (ref[3], ref[4]), 0.5, softcap), 0.0)
    for name, g, w in zip(("hidden", "weight", "bias", "a", "lora"), got_grads, _grads(want, weights, ref)):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["linear", "softcap"])
def test_bf16_gradients(softcap):
    """bf16 operands: gradients in bf16, from fp32 accumulation, within bf16 rounding of float64."""
    hidden, weight, bias, _, mask = _inputs(torch.bfloat16, seed=4)
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = fa.linear_mean_logits(*tensors[:2], bias=tensors[2], softcap=softcap, response_mask=mask)
    ref = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    want = torch.where(mask, _reference(ref[0], ref[1], ref[2], None, 1.0, softcap), 0.0)
    for g, w in zip(_grads(got, weights, tensors), _grads(want, weights, ref)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), w, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("classes", [False, True], ids=["plain", "class-weighted"])
def test_softcapped_gradient_scales_its_blocks_in_fp32(classes, monkeypatch):
    """On a GPU the blocks of logits keep the input dtype (simulated here: a bf16 block buffer): the incoming
    gradient (a loss scale of 1/3, over V) and the class weights (1/3) multiply them in fp32, unrounded, not as
    factors rounded to bf16 first (0.16% off at 1/(3 V), V = 1000: a bias that every gradient would carry). With
    positive hidden states and weights nothing cancels, so the mean ratio to the fp32 gradient shows a bias."""
    import fastalign.ops.mean_logits as ML

    monkeypatch.setattr(ML, "block_buffer", lambda rows, vocab, like: torch.empty(rows * vocab, dtype=like.dtype))
    g = torch.Generator().manual_seed(3)
    N, H, V = 8, 16, 1000
    h0, w0 = torch.rand(N, H, generator=g).bfloat16(), (torch.rand(V, H, generator=g) * 0.3).bfloat16()
    weights = torch.full((V,), 1 / 3) if classes else None
    grads = []
    for h, w in ((h0, w0), (h0.float(), w0.float())):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        (fa.linear_mean_logits(h, w, softcap=5.0, class_weights=weights).sum() / 3).backward()
        grads.append((h.grad, w.grad))
    for name, got, want in zip(("d hidden", "d weight"), *grads):
        ratio = (got.double() / want.double()).mean().item()
        assert abs(ratio - 1) < 4e-4, f"{name}: mean ratio to the fp32 gradient {ratio}"


def test_no_second_derivative_of_a_softcapped_mean():
    hidden, weight, _, _, _ = _inputs()
    hidden.requires_grad_(True)
    got = fa.linear_mean_logits(hidden, weight, softcap=2.0)
    with pytest.raises(RuntimeError, match="softcapped mean logits has no second derivative"):
        torch.autograd.grad(got.sum(), hidden, create_graph=True)


def test_nan_propagates():
    hidden, weight, bias, _, _ = _inputs()
    poisoned = hidden.detach().clone()
    poisoned[1, 2, 0] = float("nan")
    for softcap in (None, 2.0):
        got = fa.linear_mean_logits(poisoned, weight.detach(), softcap=softcap)
        assert got[1, 2].isnan() and got.isnan().sum() == 1


def test_bad_inputs_name_the_argument():
    hidden, weight, bias, low_rank, mask = _inputs()
    with pytest.raises(ValueError, match="weight"):
        fa.linear_mean_logits(hidden, weight[:, :8])
    with pytest.raises(TypeError, match="weight"):
        fa.linear_mean_logits(hidden, weight.double())
    with pytest.raises(ValueError, match="bias"):
        fa.linear_mean_logits(hidden, weight, bias=bias[:5])
    with pytest.raises(ValueError, match="response_mask"):
        fa.linear_mean_logits(hidden, weight, response_mask=mask[:, :3])
    with pytest.raises(ValueError, match="softcap"):
        fa.linear_mean_logits(hidden, weight, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fa.linear_mean_logits(hidden, weight, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="low_rank"):
        fa.linear_mean_logits(hidden, weight, low_rank=(low_rank[0][:, :3], low_rank[1]))
    with pytest.raises(ValueError, match="backend"):
        fa.linear_mean_logits(hidden, weight, backend="nope")
    with pytest.raises(ValueError, match="class_weights"):
        fa.linear_mean_logits(hidden, weight, class_weights=torch.ones(39))
    with pytest.raises(TypeError, match="class_weights"):
        fa.linear_mean_logits(hidden, weight, class_weights=torch.ones(40, dtype=torch.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["linear", "softcap"])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_class_weighted_mean_and_its_gradients(backend, softcap, blocks, monkeypatch):
    """``(1/V) sum_j c_j z_j`` with class weights ``c``, and d/d(hidden, weight, bias, a, L), against float64: the
    linear head's weighted rows (in blocks of rows: ``many`` takes 3 head rows at a time) and the softcapped head's
    vocabulary passes (a block per row with ``many``); the weights take no gradient."""
    if blocks == "many":
        from fastalign import linear_mean

        monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-6")
        monkeypatch.setattr(linear_mean, "_CLASS_BLOCK_ELEMENTS", 3 * 16)
    hidden, weight, bias, (a, lora), mask = _inputs(seed=8)
    classes = _classes().requires_grad_(True)
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight, bias, a, lora)]
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = fa.linear_mean_logits(tensors[0], tensors[1], bias=tensors[2], low_rank=(tensors[3], tensors[4]),
                                logit_scale=0.5, softcap=softcap, response_mask=mask, class_weights=classes,
                                backend=backend)
    got_grads = _grads(got, weights, tensors)
    assert classes.grad is None
    ref = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias, a, lora)]
    want = torch.where(mask, _reference(ref[0], ref[1], ref[2], (ref[3], ref[4]), 0.5, softcap, classes.detach()), 0.0)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("hidden", "weight", "bias", "a", "lora"), got_grads, _grads(want, weights, ref)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("grad", [True, False])
def test_softcapped_mean_with_a_mask_compiles_without_graph_breaks(grad):
    """torch.compile(fullgraph=True) of a softcapped mean over masked positions: the rows' compaction launched a
    kernel module imported at trace time (a graph break, refused under fullgraph); traced, every row is computed
    and the others zeroed, equal to eager."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 4, 8, generator=g).requires_grad_(grad)
    w = torch.randn(11, 8, generator=g).requires_grad_(grad)
    mask = torch.ones(2, 4)
    mask[1, 2:] = 0

    def mean(h, w):
        return fa.linear_mean_logits(h, w, softcap=2.0, response_mask=mask)

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        got, want = torch.compile(mean, fullgraph=True, backend="aot_eager")(h, w), mean(h, w)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if grad:
        torch.testing.assert_close(torch.autograd.grad(got.sum(), (h, w)), torch.autograd.grad(want.sum(), (h, w)),
                                   atol=1e-6, rtol=1e-6)
