"""linear_soft_cross_entropy against float64 plain PyTorch: values, gradients, row weights, temperatures, blocks,
dtypes, the single pass and the two passes, torch.compile, and its errors."""
import pytest
import torch

from helpers import assert_close

import fastalign as fa

TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _inputs(seed, shape=(12,), H=16, V=40, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    q = torch.softmax(torch.randn(*shape, V, generator=g) * 2, -1)
    q.view(-1, V)[1] *= 0.6  # a row that does not sum to 1
    q.view(-1, V)[2, :7] = 0.0
    return x, w, b, q


def _reference(x, w, b, q, c, T, scale=1.0):
    """scale * sum_r c_r (-sum_j q_rj log softmax(z_r / T)_j) in float64, over the rows of weight != 0, and its
    gradients."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    keep = c.reshape(-1) != 0
    z = xd.reshape(-1, x.shape[-1])[keep] @ wd.T + (0 if bd is None else bd)
    ce = -(q.reshape(-1, w.shape[0])[keep].double() * torch.log_softmax(z / T, -1)).sum(-1)
    loss = scale * (c.reshape(-1)[keep].double() * ce).sum()
    inputs = (xd, wd) if bd is None else (xd, wd, bd)
    return loss, torch.autograd.grad(loss, inputs)


def _ours(x, w, b, q, c, T, scale=1.0, **kw):
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    loss = fa.linear_soft_cross_entropy(xs, ws, q, bias=bs, temperature=T, row_weights=c, **kw)
    inputs = (xs, ws) if bs is None else (xs, ws, bs)
    return loss, torch.autograd.grad(loss * scale, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("single_pass", ["auto", False, True])
@pytest.mark.parametrize("case", ["plain", "bias+T", "weights", "3d"])
def test_equals_float64(dtype, single_pass, case):
    shape = (3, 5) if case == "3d" else (12,)
    x, w, b, q = _inputs(0, shape, dtype=dtype, bias=case == "bias+T")
    T = 0.7 if case == "bias+T" else 1.0
    c = torch.ones(shape)
    if case in ("weights", "3d"):
        c = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        c.view(-1)[[0, 4]] = 0.0
        x.view(-1, x.shape[-1])[4] = float("nan")  # a row of weight 0 is not read
        q.view(-1, q.shape[-1])[0] = float("inf")
    scale = 1 / 3  # the backward's incoming gradient scales every gradient
    want, grads = _reference(x, w, b, q, c, T, scale)
    got, ours = _ours(x, w, b, q, c, T, scale, single_pass=single_pass)
    atol, rtol = TOL[dtype]
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close(got, want / scale, atol=atol, rtol=rtol, what="loss")
    for name, o, r in zip(("d hidden", "d weight", "d bias"), ours, grads):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert_close(o, r, atol=atol, rtol=rtol, what=name)


@pytest.mark.parametrize("single_pass", [True, False])
def test_blocks_of_a_few_rows_give_the_same_result(monkeypatch, single_pass):
    x, w, b, q = _inputs(2, (37,), V=300, bias=True)
    c = (torch.rand(37, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    whole = _ours(x, w, b, q, c, 1.3, single_pass=single_pass)
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "0.005")  # 1 row a block
    blocks = _ours(x, w, b, q, c, 1.3, single_pass=single_pass)
    assert_close(blocks[0], whole[0], atol=1e-5, rtol=1e-6, what="loss")
    for o, r in zip(blocks[1], whole[1]):
        assert_close(o, r, atol=1e-6, rtol=1e-5, what="gradient")


def test_bf16_gradient_is_rounded_once_near_the_targets():
    """A student close to near-uniform targets: d(logits) = m p - q is small beside p and q, and is formed whole
    before it is rounded, so the bf16 gradients are within about one bf16 rounding of float64's (a difference of
    separately rounded gradients of p and q was off by 30x that)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 16, 64, 1024
    x, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.05
    q = torch.softmax((x @ w.T) * 0.5 + torch.randn(N, V, generator=g), -1)
    xb, wb = x.bfloat16(), w.bfloat16()
    c = torch.ones(N)
    _, grads = _reference(xb, wb, None, q, c, 1.0)
    _, ours = _ours(xb, wb, None, q, c, 1.0)
    for o, r in zip(ours, grads):
        one_rounding = (r.bfloat16().double() - r).norm() / r.norm()
        assert (o.double() - r).norm() / r.norm() <= 1.2 * one_rounding


def test_targets_of_any_float_dtype_and_bool_row_weights():
    x, w, _, q = _inputs(4)
    c = torch.arange(12) % 3 != 0
    want = _ours(x, w, None, q, c.float(), 1.0)
    for target in (q.double(), q.bfloat16().float()):
        got = _ours(x, w, None, target, c, 1.0)
        assert_close(got[0], _reference(x, w, None, target, c.float(), 1.0)[0], atol=2e-6, rtol=1e-5, what="loss")
    got = _ours(x, w, None, q, c, 1.0)
    assert_close(got[0], want[0], atol=0, what="bool weights")


def test_empty_rows_and_all_weights_zero_give_zero():
    x, w, _, q = _inputs(5)
    loss, (dx, dw) = _ours(x, w, None, q, torch.zeros(12), 1.0)
    assert loss.item() == 0.0 and not dx.any() and not dw.any()
    loss, (dx, dw) = _ours(x[:0], w, None, q[:0], None, 1.0)
    assert loss.item() == 0.0 and dx.shape == (0, 16) and not dw.any()


def test_nan_in_a_scored_row_propagates():
    x, w, _, q = _inputs(6)
    x[3, 0] = float("nan")
    loss, (dx, dw) = _ours(x, w, None, q, None, 1.0)
    assert torch.isnan(loss) and torch.isnan(dx[3]).all() and torch.isnan(dw).any()


def test_single_pass_differentiates_once_and_two_passes_again():
    x, w, _, q = _inputs(7)
    xs = x.clone().requires_grad_()
    loss = fa.linear_soft_cross_entropy(xs, w, q)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single_pass=False"):
        loss.backward()
    xs = x.clone().requires_grad_()
    loss = fa.linear_soft_cross_entropy(xs, w, q, single_pass=False)
    first = torch.autograd.grad(loss, xs, retain_graph=True)[0]
    assert_close(torch.autograd.grad(loss, xs)[0], first, atol=0, what="second backward")
    with pytest.raises(RuntimeError, match="second derivative"):
        xs = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fa.linear_soft_cross_entropy(xs, w, q), xs, create_graph=True)
        g.sum().backward()


def test_compiled_step_equals_eager():
    x, w, b, q = _inputs(8, bias=True)
    c = (torch.arange(12) % 4 != 1).float()

    def step(x, w, b):
        return fa.linear_soft_cross_entropy(x, w, q, bias=b, row_weights=c, temperature=0.9)

    eager = _ours(x, w, b, q, c, 0.9)
    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*ins)
    assert_close(loss, eager[0], atol=1e-6, rtol=1e-6, what="loss")
    for o, r in zip(torch.autograd.grad(loss, ins), eager[1]):
        assert_close(o, r, atol=1e-6, rtol=1e-5, what="gradient")
    with pytest.raises(Exception) as err:  # fullgraph=True wraps the ValueError as its cause
        torch.compile(lambda x: fa.linear_soft_cross_entropy(x, w, q, single_pass=True), fullgraph=True,
                      backend="aot_eager")(x.clone().requires_grad_())
    assert "single_pass=True does not apply: under torch.compile" in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("call, error, name", [
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, q[:, :-1]), ValueError, "target"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, (q > 0.1).long()), TypeError, "target"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, q, row_weights=torch.ones(11)), ValueError, "row_weights"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, q, temperature=0.0), ValueError, "temperature"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, q, temperature=float("nan")), ValueError, "temperature"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, q, single_pass="yes"), ValueError, "single_pass"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w.double(), q), TypeError, "weight"),
    (lambda x, w, q: fa.linear_soft_cross_entropy(x, w, q, bias=torch.zeros(3)), ValueError, "bias"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, name):
    x, w, _, q = _inputs(9)
    with pytest.raises(error, match=name):
        call(x, w, q)


@pytest.mark.parametrize("compaction", [True, False])
def test_the_gpu_path_forced_on_cpu_tensors(monkeypatch, compaction):
    """The GPU's rules on CPU tensors: blocks in the input dtype, and the rows of weight != 0 put first and counted
    on the device (their products bounded by that count; without compaction every row, the others zeroed)."""
    import fastalign.ops.linear_block as LB
    import fastalign.ops.soft_cross_entropy as SC
    from fastalign.ops.device_compaction import compact

    def gpu_order(mask):
        cmp = compact(torch.where(mask != 0, 0, -1), -1)
        return cmp.order, cmp

    monkeypatch.setattr(SC, "block_buffer", lambda rows, vocab, like: torch.empty(rows * vocab, dtype=like.dtype))
    monkeypatch.setattr(LB, "scored_order", gpu_order if compaction else lambda mask: (None, None))
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "0.02")  # a few rows a block
    x, w, b, q = _inputs(10, (20,), dtype=torch.bfloat16, bias=True)
    c = (torch.arange(20) % 3 != 0).float()
    x[3] = float("nan")  # weight 0: not read
    want, grads = _reference(x, w, b, q, c, 0.8)
    got, ours = _ours(x, w, b, q, c, 0.8, single_pass=True)
    assert_close(got, want, atol=3e-2, rtol=2e-2, what="loss")
    for name, o, r in zip(("d hidden", "d weight", "d bias"), ours, grads):
        assert torch.isfinite(o).all()
        assert_close(o, r, atol=3e-2, rtol=2e-2, what=name)


@pytest.mark.parametrize("single_pass", [True, False])
def test_without_row_weights_every_row_is_scanned_in_place(monkeypatch, single_pass):
    """No ``row_weights``: every row goes through the blocks in place, on the GPU's rules too (no scan for rows of
    weight 0, which on a GPU would sort the rows and count them on the device), with the gradient scale of the two
    passes' backward applied once."""
    import fastalign.ops.linear_block as LB
    import fastalign.ops.soft_cross_entropy as SC

    def no_scan(mask):
        raise AssertionError("rows of weight 0 looked for without row weights")

    monkeypatch.setattr(SC, "block_buffer", lambda rows, vocab, like: torch.empty(rows * vocab, dtype=like.dtype))
    monkeypatch.setattr(LB, "scored_order", no_scan)
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "0.02")  # a few rows a block
    x, w, b, q = _inputs(12, (3, 7), dtype=torch.bfloat16, bias=True)
    want, grads = _reference(x, w, b, q, torch.ones(3, 7), 1.3, scale=0.25)
    got, ours = _ours(x, w, b, q, None, 1.3, scale=0.25, single_pass=single_pass)
    assert_close(got * 0.25, want, atol=3e-2, rtol=2e-2, what="loss")
    for name, o, r in zip(("d hidden", "d weight", "d bias"), ours, grads):
        assert_close(o, r, atol=3e-2, rtol=2e-2, what=name)


def test_auto_takes_the_two_passes_for_fp16_on_a_gpu(monkeypatch):
    """fp16 on a GPU (simulated): "auto" takes the two passes (a retained graph can be differentiated twice), where
    the single pass would form fp16 d(logits) before a loss scale; on the CPU it takes the single pass."""
    import fastalign.ops.single_pass as SP

    x, w, _, q = _inputs(11, dtype=torch.float16)
    for on_gpu in (True, False):
        monkeypatch.setattr(SP, "fp16_on_gpu", lambda *tensors, on_gpu=on_gpu: on_gpu)
        xs = x.clone().requires_grad_()
        loss = fa.linear_soft_cross_entropy(xs, w, q)
        first = torch.autograd.grad(loss, xs, retain_graph=True)[0]
        if on_gpu:
            assert_close(torch.autograd.grad(loss, xs)[0], first, atol=0, what="second backward")
        else:
            with pytest.raises(RuntimeError, match="once per forward"):
                torch.autograd.grad(loss, xs)
