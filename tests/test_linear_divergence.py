"""linear_divergence_loss and the divergence_rows op against the float64 reference: values, gradients of the
student's hidden states, weight and bias, every divergence (the JSD at beta 0, 1, 0.5, 0.1, the TVD, the cosine
distance), temperature, softcap and scale, masks, the hard loss, bf16, different hidden sizes, many blocks, both
kernel families, NaN rows, bad inputs. The TVD's and the cosine distance's own edges:
test_linear_divergence_distances.py."""
import math

import pytest
import torch

import fastalign
from fastalign.ops.divergence import divergence_rows
from fastalign.reference import divergence as R
from conftest import CPU_BACKENDS
from helpers import assert_close

V = 43


def _batch(seed, B=3, T=5, H=16, Ht=12, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    ht = torch.randn(B, T, Ht, generator=g).to(dtype)
    wt = (torch.randn(V, Ht, generator=g) * 0.5).to(dtype)
    bt = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    return h, w, b, ht, wt, bt, y


def _check(h, w, b, ht, wt, bt, atol=2e-5, grad_atol=2e-5, **kw):
    loss, m = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, **kw)
    inputs = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    kw.pop("backend", None)
    kw.pop("single_pass", None)
    rl, rm = R.linear_divergence_loss(ref_in[0], ref_in[1], ht, wt, bias=ref_in[2] if b is not None else None,
                                      teacher_bias=bt, **kw)
    rg = torch.autograd.grad(rl, ref_in)
    assert_close(loss, rl, atol=atol, rtol=atol, what="loss")
    for name in ("divergence_sum", "entropy_sum", "num_tokens"):
        assert_close(m[name], rm[name], atol=atol * 10, rtol=atol, what=name)
    if "labels" in kw:
        assert_close(m["nll_sum"], rm["nll_sum"], atol=atol * 10, rtol=atol, what="nll_sum")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, rg):
        assert g.dtype == h.dtype
        assert_close(g, r, atol=grad_atol, rtol=grad_atol * 10, what=f"d{name}")
    return loss, m


#: every divergence: the JSD at beta 0 (forward KL), 1 (reverse KL) and between, the TVD, the cosine distance
DIVERGENCES = {"fkl": dict(beta=0.0), "rkl": dict(beta=1.0), "jsd": dict(beta=0.5), "jsd-0.1": dict(beta=0.1),
               "tvd": dict(divergence="tvd"), "cosine": dict(divergence="cosine")}


def divergences(*names):
    """The options of the :data:`DIVERGENCES` named (all by default), as parameters with their names as ids."""
    return [pytest.param(DIVERGENCES[n], id=n) for n in names or DIVERGENCES]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", divergences())
def test_values_and_gradients(backend, divergence):
    h, w, b, ht, wt, bt, y = _batch(1)
    mask = torch.ones(3, 5)
    mask[0, :2] = 0
    mask[2, 4] = 0
    _check(h, w, b, ht, wt, bt, **divergence, response_mask=mask, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", divergences("fkl", "rkl", "jsd", "tvd", "cosine"))
def test_temperature_softcap_scale_and_hard_loss(backend, divergence):
    h, w, b, ht, wt, bt, y = _batch(2)
    y[1, 1] = -100
    _check(h, w, b, ht, wt, bt, **divergence, temperature=0.7, softcap=3.0, logit_scale=1.3, teacher_logit_scale=0.8,
           teacher_softcap=4.0, labels=y, soft_weight=0.6, hard_weight=0.4, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_blocks_and_global_tokens(backend, monkeypatch):
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(3 * V * 4 / (1 << 20)))  # 3 rows of logits: 1 row per block pair
    h, w, b, ht, wt, bt, y = _batch(3)
    _check(h, w, b, ht, wt, bt, beta=0.3, global_tokens=7.0, backend=backend)
    _check(h, w, b, ht, wt, bt, beta=0.3, global_tokens=torch.tensor(11.0), labels=y, hard_weight=0.5, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-pass"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("divergence", divergences("jsd-0.1", "tvd"))
def test_token_weights_and_sequence_mean(backend, single_pass, agg, divergence, monkeypatch):
    """Each scored token's loss times its weight (a NaN weight on an unscored token is not read), and the mean over
    the rows of each row's token mean (an empty row adds 0 and counts), with the hard loss, in blocks of 2 rows."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(2 * V * 4 / (1 << 20)))
    h, w, b, ht, wt, bt, y = _batch(7)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mask[2] = 0  # an empty row
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(8)) * 2
    weights[0, 4] = math.nan
    loss, m = _check(h, w, b, ht, wt, bt, **divergence, response_mask=mask, labels=y, hard_weight=0.4,
                     token_weights=weights, agg=agg, single_pass=single_pass, backend=backend)
    assert torch.isfinite(loss)
    _, rm = R.linear_divergence_loss(h.detach().double(), w.detach().double(), ht, wt, bias=b.detach().double(),
                                     teacher_bias=bt, **divergence, response_mask=mask, token_weights=weights)
    assert_close(m["weighted_divergence"], rm["weighted_divergence"], atol=2e-5, rtol=2e-5, what="weighted_divergence")
    if agg == "seq-mean-token-mean":  # not the token mean: the rows weigh alike whatever their lengths
        token_mean, _ = R.linear_divergence_loss(h.detach().double(), w.detach().double(), ht, wt,
                                                 bias=b.detach().double(), teacher_bias=bt, **divergence,
                                                 response_mask=mask, labels=y, hard_weight=0.4, token_weights=weights)
        assert abs(float(loss) - float(token_mean)) > 1e-3


def test_sequence_mean_needs_rows_of_tokens():
    h, w, b, ht, wt, bt, y = _batch(9)
    with pytest.raises(ValueError, match=r"agg='seq-mean-token-mean' needs hidden \[B, T, H\]"):
        fastalign.linear_divergence_loss(h.reshape(15, -1), w, ht.reshape(15, -1), wt, agg="seq-mean-token-mean")
    loss, _ = fastalign.linear_divergence_loss(h[:0], w, ht[:0], wt, agg="seq-mean-token-mean")  # no rows: 0
    assert float(loss) == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_metric_means_are_per_scored_token(backend):
    """The metrics' means divide the sums by the scored-token count, not by ``global_tokens``."""
    h, w, b, ht, wt, bt, y = _batch(5)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    kw = dict(beta=0.4, response_mask=mask, labels=y, hard_weight=0.3, global_tokens=7.0)
    _, m = _check(h, w, b, ht, wt, bt, backend=backend, **kw)
    _, rm = R.linear_divergence_loss(h.detach().double(), w.detach().double(), ht, wt, bias=b.detach().double(),
                                     teacher_bias=bt, **kw)
    assert rm["num_tokens"] == 8
    for name in ("divergence", "entropy", "nll"):
        assert_close(m[name], rm[f"{name}_sum"] / rm["num_tokens"], atol=1e-5, rtol=1e-5, what=name)


def test_a_fractional_mask_is_refused(monkeypatch):
    """A mask weight other than 0 and 1 (which a trainer's masked mean would weigh, where the mask only picks the
    scored tokens) raises naming ``response_mask`` where it is read on the host, and makes the loss and its
    gradients NaN where it is not; ``token_weights`` weighs tokens."""
    from fastalign import _validate

    h, w, b, ht, wt, bt, y = _batch(5)
    mask = torch.tensor([[0.5, 2.0, 0.0, 1.0, 0.25], [0.0, 0.0, 3.0, 0.5, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"response_mask must hold 0 and 1 only.*token_weights.*\[0\.5, 2\.0"):
        fastalign.linear_divergence_loss(h, w, ht, wt, response_mask=mask)
    for ok in (mask != 0, (mask != 0).float(), (mask != 0).long()):
        assert torch.isfinite(fastalign.linear_divergence_loss(h, w, ht, wt, response_mask=ok)[0])
    monkeypatch.setattr(_validate, "eager", lambda x: False)
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, response_mask=mask, single_pass=False)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(h.grad[mask != 0]).all()


@pytest.mark.parametrize("single_pass", [True, False])
def test_two_pass_mode_matches(single_pass):
    h, w, b, ht, wt, bt, y = _batch(4)
    _check(h, w, b, ht, wt, bt, beta=0.5, single_pass=single_pass, labels=y, hard_weight=0.2)


def test_backward_scales_by_the_incoming_gradient():
    h, w, b, ht, wt, bt, y = _batch(5)
    for single_pass in (True, False):
        loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, single_pass=single_pass)
        g1 = torch.autograd.grad(loss, (h, w, b))
        loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, single_pass=single_pass)
        g3 = torch.autograd.grad(3 * loss, (h, w, b))
        for a, c in zip(g1, g3):
            assert_close(c, 3 * a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1 / 3), (torch.float16, 2.0 ** 16)])
def test_single_pass_scales_the_fp32_gradients_and_rounds_once(dtype, scale):
    """A GradScaler's 2^16 (inf in fp16) or 1 / accumulation steps (0.2% high in bf16) multiplies the single
    pass's fp32 gradients, which are then rounded once: the fp32 step's gradients rounded to the dtype, without
    the bias of a rounded scale in the mean."""
    h, w, b, ht, wt, bt, y = _batch(7, B=4, T=8, dtype=dtype)
    f32 = [t.detach().float().requires_grad_() for t in (h, w, b)]
    for xs in ((h, w, b), f32):
        loss, _ = fastalign.linear_divergence_loss(xs[0], xs[1], ht.float(), wt.float(), bias=xs[2],
                                                   teacher_bias=bt.float(), beta=0.5, single_pass=True)
        (loss * scale).backward()
    for x, ref, name in zip((h, w, b), f32, ("d hidden", "d weight", "d bias")):
        want = ref.grad.to(dtype)
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all(), name
        assert_close(x.grad, want, atol=0, rtol=2.0 ** -7, what=name)
        big = want.float().abs() > 1e-3 * want.float().abs().max()
        ratio = (x.grad.float()[big] / want.float()[big]).mean().item()
        assert abs(ratio - 1) < 3e-4, f"{name}: mean ratio to the once-rounded gradient {ratio}"


def test_auto_takes_the_two_passes_for_fp16_on_a_gpu(monkeypatch):
    """fp16 on a GPU (simulated: the rule's own test of the device): "auto" takes the two passes (its backward runs
    again, so a retained graph can be differentiated twice), where the single pass would form fp16 d(logits)
    before a loss scale; on the CPU, whose blocks are fp32, it takes the single pass (once per forward)."""
    import fastalign.ops.single_pass as SP

    h, w, b, ht, wt, bt, y = _batch(8, dtype=torch.float16)
    for on_gpu in (True, False):
        monkeypatch.setattr(SP, "fp16_on_gpu", lambda *tensors, on_gpu=on_gpu: on_gpu)
        loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt)
        first = torch.autograd.grad(loss, (h,), retain_graph=True)[0]
        if on_gpu:
            torch.testing.assert_close(torch.autograd.grad(loss, (h,))[0], first, rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="once per forward"):
                torch.autograd.grad(loss, (h,))


def test_fp16_on_gpu_is_the_device_and_the_dtype():
    from types import SimpleNamespace

    from fastalign.ops.single_pass import fp16_on_gpu

    def t(cuda, dtype):
        return SimpleNamespace(is_cuda=cuda, dtype=dtype)

    assert fp16_on_gpu(t(True, torch.float32), t(True, torch.float16), None)
    assert not fp16_on_gpu(t(True, torch.bfloat16), t(False, torch.float16), None)
    assert not fp16_on_gpu(torch.zeros(2, dtype=torch.float16))


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1 / 3), (torch.float16, 2.0 ** 16)])
def test_single_pass_gpu_blocks_scale_without_rounding_the_scale(dtype, scale, monkeypatch):
    """On a GPU the blocks and d(hidden) keep the input dtype (simulated): the backward multiplies d(hidden) by
    the incoming gradient in fp32, so it is exactly the unscaled d(hidden) times the scale, rounded once."""
    import fastalign.ops.linear_divergence as OLD

    pytest.importorskip("triton")
    monkeypatch.setattr(OLD, "block_dtype", lambda like: like.dtype)
    monkeypatch.setattr(OLD, "block_buffer", lambda rows, vocab, like: torch.empty(rows * vocab, dtype=like.dtype))
    h, w, b, ht, wt, bt, y = _batch(9, B=4, T=8, dtype=dtype)
    grads = []
    for s in (1.0, scale):
        x = h.detach().clone().requires_grad_()
        loss, _ = fastalign.linear_divergence_loss(x, w.detach(), ht, wt, bias=b.detach(), teacher_bias=bt,
                                                   beta=0.5, single_pass=True, backend="triton")  # bf16 blocks
        (loss * s).backward()
        grads.append(x.grad)
    assert grads[1].dtype == dtype and torch.isfinite(grads[1]).all()
    assert torch.equal(grads[1], (grads[0].float() * scale).to(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_masked_and_single_token(backend):
    h, w, b, ht, wt, bt, y = _batch(6)
    loss, m = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, response_mask=torch.zeros(3, 5), backend=backend)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert loss.item() == 0.0 and m["num_tokens"].item() == 0 and m["divergence"].item() == 0
    assert all(bool((g == 0).all()) for g in grads)
    one = torch.zeros(3, 5)
    one[1, 3] = 1
    _check(h, w, b, ht, wt, bt, beta=0.5, response_mask=one, backend=backend)


def test_bf16_inputs():
    h, w, b, ht, wt, bt, y = _batch(7, dtype=torch.bfloat16)
    loss, m = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, beta=0.5)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    rl, _ = R.linear_divergence_loss(*ref_in[:2], ht, wt, bias=ref_in[2], teacher_bias=bt, beta=0.5)
    rg = torch.autograd.grad(rl, ref_in)
    assert_close(loss, rl, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, rg):
        assert_close(g, r, atol=2e-3, rtol=2e-2)


def test_kernels_agree_and_rows_without_weight_are_zero():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("no triton")
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(6, 300, generator=g) * 3, torch.randn(6, 300, generator=g) * 3
    zs[4, 7] = float("nan")
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    y = torch.tensor([3, 5, -100, 299, 1, 0])
    gs, gh = torch.rand(6, generator=g), torch.rand(6, generator=g)
    outs = {}
    for backend in ("cpp", "triton"):
        for beta in (0.0, 1.0, 0.25):
            a = zs.clone()
            d, e, n = divergence_rows(a, zt, mask, y, gs, gh, 1 / 0.9, "jsd", beta, -100, True, backend)
            outs[backend, beta] = (d, e, n, a)
    for beta in (0.0, 1.0, 0.25):
        for c, t in zip(outs["cpp", beta], outs["triton", beta]):
            assert_close(t, c, atol=1e-5, rtol=1e-5, what=f"beta={beta}")
        d, e, n, a = outs["cpp", beta]
        assert d[1] == 0 and e[1] == 0 and n[1] == 0 and bool((a[1] == 0).all())
        assert n[2] == 0  # ignored label
        assert math.isnan(d[4]) and bool(a[4].isnan().all()) and not bool(d[[0, 2, 3, 5]].isnan().any())
        exp_d = R.generalized_jsd(zs[[0, 2, 3, 5]], zt[[0, 2, 3, 5]], beta=beta, temperature=0.9)
        assert_close(d[[0, 2, 3, 5]], exp_d, atol=2e-5, rtol=1e-5)


def test_no_gradient_forward_only_and_teacher_gets_none():
    h, w, b, ht, wt, bt, y = _batch(9)
    wt.requires_grad_()
    with torch.no_grad():
        loss, m = fastalign.linear_divergence_loss(h, w, ht, wt, beta=0.5)
    rl, _ = R.linear_divergence_loss(h.detach(), w.detach(), ht, wt.detach(), beta=0.5)
    assert_close(loss, rl, atol=2e-5, rtol=2e-5)
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, beta=0.5)
    loss.backward()
    assert wt.grad is None and h.grad is not None


@pytest.mark.parametrize("op", [divergence_rows.direct, torch.ops.fastalign.divergence_rows],
                         ids=["direct", "registered"])
def test_divergence_rows_checks_the_logits(op):
    """The op reads both logits as [n, V] rows by pointer: a teacher of another shape (read past its end), dtype or
    device, a non-2-D student, and rows that are not contiguous (read as other elements) raise, naming the
    argument; a row-strided (sliced) pair is read correctly."""
    def call(student, teacher):
        return op(student, teacher, None, None, None, None, 1.0, "jsd", 0.5, -100, False, "cpp")

    g = torch.Generator().manual_seed(17)
    zs, zt = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    for student, teacher, err, match in (
            (zs, zt[:, :30].contiguous(), ValueError, r"^teacher must have the shape of student \(4, 50\)"),
            (zs, zt[:2].contiguous(), ValueError, r"^teacher must have the shape of student"),
            (zs, zt.reshape(4, 5, 10), ValueError, r"^teacher must have the shape of student"),
            (zs, zt.double(), TypeError, r"^teacher must have the dtype of student"),
            (zs, zt.bfloat16(), TypeError, r"^teacher must have the dtype of student"),
            (zs, zt.to("meta"), ValueError, r"^teacher must be on the device of student"),
            (zs.double(), zt.double(), TypeError, r"^student must be float32, bfloat16 or float16"),
            (zs.reshape(-1), zt.reshape(-1), ValueError, r"^student must be \[n, V\]"),
            (zs, zt.T.contiguous().T, ValueError, r"^teacher must have contiguous rows"),
            (zs.T.contiguous().T, zt, ValueError, r"^student must have contiguous rows")):
        with pytest.raises(err, match=match):
            call(student, teacher)
    wide_s, wide_t = torch.randn(4, 80, generator=g), torch.randn(4, 70, generator=g)
    zs, zt = wide_s[:, 10:60], wide_t[:, 5:55]
    assert_close(call(zs, zt)[0], R.generalized_jsd(zs, zt, beta=0.5, temperature=1.0), atol=2e-6, rtol=1e-5)


def _spy_gradient_work(monkeypatch):
    """Counts the gradient buffers and the gradient products (d hidden, d weight) of the blocks."""
    import fastalign.ops.linear_divergence as LD

    calls = {"buffers": 0, "products": 0}
    zero_grads, grad_to_inputs = LD.zero_grads, LD.chunk_grad_to_inputs

    def buffers(*args):
        out = zero_grads(*args)
        calls["buffers"] += sum(t is not None for t in out)
        return out

    def products(*args, **kw):
        calls["products"] += 1
        return grad_to_inputs(*args, **kw)

    monkeypatch.setattr(LD, "zero_grads", buffers)
    monkeypatch.setattr(LD, "chunk_grad_to_inputs", products)
    return calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("single_pass", ["auto", True, False])
def test_no_grad_runs_no_gradient_work(monkeypatch, backend, single_pass):
    """Under torch.no_grad() (an evaluation loop: the parameters still require grad) the forward takes its two
    products only: no gradient buffer, no gradient product, and the values of the forward with gradients."""
    h, w, b, ht, wt, bt, y = _batch(15)
    kw = dict(bias=b, teacher_bias=bt, beta=0.3, labels=y, hard_weight=0.4, backend=backend, single_pass=single_pass)
    want, want_m = fastalign.linear_divergence_loss(h, w, ht, wt, **kw)
    calls = _spy_gradient_work(monkeypatch)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss, m = fastalign.linear_divergence_loss(h, w, ht, wt, **kw)
        assert calls == {"buffers": 0, "products": 0}, context
        assert not loss.requires_grad
        assert_close(loss, want, atol=0, rtol=0, what="loss")
        for name, value in want_m.items():
            assert_close(m[name], value, atol=0, rtol=0, what=name)


def test_only_a_teacher_requiring_grad_runs_no_gradient_work(monkeypatch):
    """The teacher's tensors are constants: their requires_grad alone asks for no gradient work, and with the
    student's requiring grad the teacher's still get none."""
    h, w, b, ht, wt, bt, y = _batch(16)
    h, w, b = h.detach(), w.detach(), b.detach()
    ht.requires_grad_(), wt.requires_grad_(), bt.requires_grad_()
    calls = _spy_gradient_work(monkeypatch)
    for single_pass in ("auto", True, False):
        loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, single_pass=single_pass)
        assert not loss.requires_grad and calls == {"buffers": 0, "products": 0}
    w.requires_grad_()
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt)
    loss.backward()
    assert calls == {"buffers": 1, "products": 1}  # d(weight) alone, in the forward's single pass
    assert w.grad is not None and all(t.grad is None for t in (h, b, ht, wt, bt))


@pytest.mark.parametrize("kw, err, match", [
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(teacher_softcap=0.0), ValueError, "teacher_softcap"),
    (dict(hard_weight=0.5), ValueError, "labels"),
    (dict(single_pass="yes"), ValueError, "single_pass"),
    (dict(response_mask=torch.ones(3, 4)), ValueError, "response_mask"),
    (dict(labels=torch.zeros(3, 5)), TypeError, "labels"),
    (dict(global_tokens=torch.ones(2)), ValueError, "global_tokens"),
    (dict(global_tokens=0.0), ValueError, "global_tokens"),
    (dict(bias=torch.zeros(V + 1)), ValueError, "bias"),
    (dict(soft_weight=None), TypeError, "soft_weight"),
    (dict(hard_weight=None), TypeError, "hard_weight"),
    (dict(soft_weight=math.nan), ValueError, "soft_weight"),
    (dict(logit_scale=None), TypeError, "logit_scale"),
    (dict(logit_scale="2"), TypeError, "logit_scale"),
    (dict(logit_scale=True), TypeError, "logit_scale"),
    (dict(teacher_logit_scale=None), TypeError, "teacher_logit_scale"),
    (dict(teacher_logit_scale=math.inf), ValueError, "teacher_logit_scale"),
    (dict(token_weights=torch.ones(3, 4)), ValueError, "token_weights"),
    (dict(token_weights=torch.ones(3, 5, dtype=torch.long)), TypeError, "token_weights"),
    (dict(agg="seq-mean"), ValueError, "agg"),
    (dict(agg="seq-mean-token-mean", global_tokens=4.0), ValueError, "global_tokens"),
])
def test_bad_inputs(kw, err, match):
    h, w, b, ht, wt, bt, y = _batch(10, bias=False)
    with pytest.raises(err, match=match):
        fastalign.linear_divergence_loss(h, w, ht, wt, **kw)


@pytest.mark.parametrize("bad", [-2.0, math.nan, math.inf])
def test_bad_global_tokens_tensor(bad, monkeypatch):
    """A negative, NaN or infinite global_tokens tensor raises where it is read (an eager CPU tensor) and makes the
    loss NaN where it is not (a GPU tensor: it gave a loss of 0 or a negative loss)."""
    from fastalign import _validate

    h, w, b, ht, wt, bt, y = _batch(10, bias=False)
    with pytest.raises(ValueError, match="global_tokens must be >= 0 and finite"):
        fastalign.linear_divergence_loss(h, w, ht, wt, global_tokens=torch.tensor(bad))
    monkeypatch.setattr(_validate, "eager", lambda x: False)
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, global_tokens=torch.tensor(bad))
    assert torch.isnan(loss)


@pytest.mark.parametrize("read_on_host", [True, False], ids=["cpu", "not-read"])
def test_a_zero_global_tokens_tensor_divides_as_one(read_on_host, monkeypatch):
    """A global_tokens tensor of 0 (TRL's num_items_in_batch of a micro-batch with no scored token) divides as 1,
    as policy_loss's global counts (it gave a NaN loss, or inf without a mask): the loss and gradients of a
    global_tokens of 1, a loss of 0 with zero gradients when no token is scored; a number 0 still raises."""
    from fastalign import _validate

    if not read_on_host:
        monkeypatch.setattr(_validate, "eager", lambda x: False)
    h, w, b, ht, wt, bt, y = _batch(12)
    mask = torch.ones(y.shape)
    mask[0, 1:] = 0
    for m in (mask, None, torch.zeros(y.shape)):
        got = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, response_mask=m,
                                               global_tokens=torch.tensor([0.0]))[0]
        want = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, response_mask=m,
                                                global_tokens=1.0)[0]
        for g, r in zip((got, *torch.autograd.grad(got, (h, w, b))), (want, *torch.autograd.grad(want, (h, w, b)))):
            assert torch.isfinite(g).all()
            assert_close(g, r, atol=0.0, what="global_tokens tensor 0 against 1")
    with pytest.raises(ValueError, match="global_tokens must be > 0 and finite"):
        fastalign.linear_divergence_loss(h, w, ht, wt, global_tokens=0)


def test_bad_tensors():
    h, w, b, ht, wt, bt, y = _batch(11, bias=False)
    with pytest.raises(ValueError, match="teacher_weight"):
        fastalign.linear_divergence_loss(h, w, ht, wt[:-1])
    with pytest.raises(ValueError, match="teacher_hidden"):
        fastalign.linear_divergence_loss(h, w, ht[:, :-1], wt)
    with pytest.raises(TypeError, match="teacher_weight"):
        fastalign.linear_divergence_loss(h, w, ht, wt.double())
    with pytest.raises(ValueError, match="weight"):
        fastalign.linear_divergence_loss(h, w[:, :-1], ht, wt)
    with pytest.raises(TypeError, match="hidden"):
        fastalign.linear_divergence_loss(h.long(), w, ht, wt)


def test_teacher_head_checks_name_the_teacher():
    h, w, b, ht, wt, bt, y = _batch(12)
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(43,\) \(teacher_weight.shape\[0\]\)"):
        fastalign.linear_divergence_loss(h, w, ht, wt, teacher_bias=bt[:-1])
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(V, 12\) \(teacher_hidden.shape\[-1\]"):
        fastalign.linear_divergence_loss(h, w, ht, wt[:, :-1])
    with pytest.raises(TypeError, match="teacher_weight must have the dtype of teacher_hidden"):
        fastalign.linear_divergence_loss(h, w, ht, wt.bfloat16())
    with pytest.raises(ValueError, match="teacher_weight must have a non-empty vocabulary"):
        fastalign.linear_divergence_loss(h, w, ht, wt[:0])
    with pytest.raises(ValueError, match="teacher_hidden must have a non-empty hidden-size"):
        fastalign.linear_divergence_loss(h, w, ht[..., :0], wt[:, :0])


@pytest.mark.parametrize("single_pass", [True, False])
def test_per_row_statistics_are_outputs_without_gradient(single_pass):
    from fastalign.ops.linear_divergence import DivergenceOptions, DivergencePass, Head

    h, w, b, ht, wt, bt, y = _batch(13)
    h2, ht2, y2 = h.reshape(-1, h.shape[-1]), ht.reshape(-1, ht.shape[-1]), y.reshape(-1)
    mask = torch.ones(y2.shape)
    mask[3] = 0
    g_soft, g_hard = mask * 0.25, mask * 0.5
    teacher = Head(ht2, wt, bt, 1.0, 0.0)
    opts = DivergenceOptions(1.0, "jsd", 0.5, -100, True, "cpp")
    state = (1.0, 0.0, teacher, mask, y2, g_soft, g_hard, opts, single_pass)
    loss, div, ent, nll = DivergencePass.apply(h2, w, b, state)
    assert loss.requires_grad and not any(t.requires_grad for t in (div, ent, nll))
    assert div.shape == ent.shape == nll.shape == mask.shape and div[3] == ent[3] == nll[3] == 0
    assert_close(loss, (g_soft * div + g_hard * nll).sum(), atol=1e-6, rtol=1e-6)
    ref, m = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, response_mask=mask.reshape(3, 5),
                                              labels=y, soft_weight=0.25 * 14, hard_weight=0.5 * 14)
    assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert_close(div.sum(), m["divergence_sum"], atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(loss, (h, w, b))
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_label_out_of_the_vocabulary_weighs_only_in_the_hard_loss(backend):
    """labels as the mask with hard_weight=0: a label outside [0, V) (not ignore_index) gives a NaN nll metric but
    the soft loss and finite gradients (it gave a NaN loss, and a NaN gradient row on Triton); with a hard weight
    the loss and that row's gradient are NaN on both backends."""
    h, w, b, ht, wt, bt, y = _batch(14)
    y[1, 2] = -1
    mask = torch.ones(y.shape)
    loss, met = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, labels=y, backend=backend)
    want, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, response_mask=mask,
                                               backend=backend)
    assert_close(loss, want, atol=1e-6, rtol=1e-6, what="soft loss")
    assert math.isnan(float(met["nll"]))
    dh, = torch.autograd.grad(loss, [h])
    assert torch.isfinite(dh).all()
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, labels=y, hard_weight=0.5,
                                               backend=backend)
    dh, = torch.autograd.grad(loss, [h])
    assert math.isnan(float(loss)) and dh[1, 2].isnan().all() and torch.isfinite(dh[0]).all()


@pytest.mark.parametrize("divergence", divergences("jsd", "tvd", "cosine")
                         + [pytest.param(dict(agg="seq-mean-token-mean"), id="jsd-seq-mean")])
def test_traces_on_fake_tensors_and_compiles_whole(divergence):
    """Fake tensors give the output shapes (no value read: every row goes through the blocks), and
    torch.compile(fullgraph=True) of the loss and its gradient equals the eager call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, w, b, ht, wt, bt, y = _batch(15)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (h, w, ht, wt, y)]
        loss, met = fastalign.linear_divergence_loss(*fake[:4], labels=fake[4], hard_weight=0.3)
        assert loss.shape == () and met["nll"].shape == ()

    def step(h, w, b, ht, wt, y):
        loss, met = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, labels=y, hard_weight=0.3,
                                                     **divergence)
        return loss, met["entropy"]

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        loss, entropy = fn(*leaves, ht, wt, y)
        return (loss, entropy, *torch.autograd.grad(loss, leaves))

    torch._dynamo.reset()
    try:
        got = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    for g, e in zip(got, run(step)):
        assert_close(g, e, atol=1e-6, rtol=1e-5, what="compiled against eager")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_large_logit_offset_keeps_the_divergence_precise(backend, beta):
    """Logits near 700 (|lse| ~ 700, ulp 6e-5) and a teacher close to the student (D ~ 1e-3): the log-probs are
    formed as (x - max) - log s, so D keeps a relative error ~1e-5 (as x - lse it was 7e-4)."""
    g = torch.Generator().manual_seed(16)
    N, H, Vb = 64, 32, 2000
    h = torch.randn(N, H, generator=g)
    w = torch.randn(Vb, H, generator=g) * 0.3
    wt = w + 0.01 * torch.randn(Vb, H, generator=g)
    b = torch.full((Vb,), 700.0)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = fastalign.linear_divergence_loss(hg, wg, h, wt, bias=b, teacher_bias=b, beta=beta, backend=backend)
    loss.backward()
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref, _ = R.linear_divergence_loss(hd, wd, h.double(), wt.double(), bias=b.double(), teacher_bias=b.double(),
                                      beta=beta)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * ref.item(), (loss.item(), ref.item())
    assert_close(hg.grad.double(), hd.grad, atol=1e-3 * float(hd.grad.abs().max()), rtol=0, what="d hidden")
    assert_close(wg.grad.double(), wd.grad, atol=1e-3 * float(wd.grad.abs().max()), rtol=0, what="d weight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beta", [1 - 1e-9, 1 - 1e-7, 1e-50, 1e-9])
def test_a_beta_within_fp32_rounding_of_0_or_1_stays_the_jsd(backend, beta):
    """The C++ kernel rounded beta to fp32 before choosing the divergence: beta = 1 - 1e-9 gave the whole reverse
    KL (6.07 here, not ~6e-9) and beta = 1e-50 the forward KL. The mode and 1 - beta come from the double now."""
    h, w, b, ht, wt, bt, _ = _batch(2)
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, bias=b, teacher_bias=bt, beta=beta, backend=backend)
    ref, _ = R.linear_divergence_loss(h.detach().double(), w.detach().double(), ht.double(), wt.double(),
                                      bias=b.detach().double(), teacher_bias=bt.double(), beta=beta)
    assert abs(loss.item() - ref.item()) < 1e-6 + 1e-4 * abs(ref.item()), (loss.item(), ref.item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_small_temperature_keeps_the_divergence_precise(backend):
    """At T = 0.01 the C++ offsets z / T - max were fused into an FMA that kept the rounding of the max; they
    are (z - max z) / T now."""
    h, w, b, ht, wt, bt, _ = _batch(3)
    _check(h, w, b, ht, wt, bt, beta=0.5, temperature=0.01, backend=backend, atol=2e-4, grad_atol=2e-4)


def test_a_non_finite_unscored_row_adds_nothing_when_traced():
    """Traced, every row goes through the blocks: an unscored row whose hidden state is NaN must still add
    nothing to d(weight) (0 * NaN), as in the eager call, which skips it."""
    h, w, b, ht, wt, bt, y = _batch(17, bias=False)
    h = h.detach().clone()
    mask = torch.ones(h.shape[:-1])
    mask[1, 2] = 0
    h[1, 2, 0] = math.nan

    def step(h, w):
        return fastalign.linear_divergence_loss(h, w, ht, wt, response_mask=mask)[0]

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (step, compiled):
            hx, wx = h.clone().requires_grad_(), w.detach().clone().requires_grad_()
            loss = fn(hx, wx)
            results.append((loss, *torch.autograd.grad(loss, [hx, wx])))
    finally:
        torch._dynamo.reset()
    assert all(torch.isfinite(t).all() for t in results[1])
    for a, e in zip(results[1], results[0]):
        assert_close(a, e, atol=1e-6, rtol=1e-5, what="compiled against eager")
