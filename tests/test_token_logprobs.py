"""token_logprobs against the float64 reference (docs/math.md#token-statistics), on the C++ kernels
and on the Triton kernels in the interpreter."""
import pytest
import torch

import fastalign
from fastalign import reference
from fastalign.ops.token_stats import token_stats, token_stats_backward
from helpers import assert_close

# fp32 math with an fp32 exp; bf16/fp16 only change what is stored. Gradients carry
# fp32 rounding of terms as large as |log p| (~10), hence 1e-5 for fp32 inputs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def make_labels(shape, V, seed=1, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    return y


def run_both(logits, labels, backend, weights, **kw):
    """(fastalign stats, grad) and (reference stats, grad) for loss = sum(w_k * stat_k)."""
    x = logits.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, labels, entropy=True, sum_p2=True, argmax=True, backend=backend, **kw)
    (st.logprobs * weights[0] + st.entropy * weights[1] + st.sum_p2 * weights[2]).sum().backward()
    xr = logits.detach().double().requires_grad_(True)
    ref = reference.token_logprobs(xr, labels, dtype=torch.float64, **kw)
    (ref[0] * weights[0] + ref[1] * weights[1] + ref[2] * weights[2]).sum().backward()
    return st, x.grad, ref, xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_and_grad_match_reference(cpu_backend, dtype, temperature):
    B, T, V = 3, 7, 301  # V not a multiple of any block size
    logits = make_logits((B, T, V), dtype)
    labels = make_labels((B, T), V)
    w = torch.randn(3, B, T, dtype=torch.float64)
    st, grad, ref, ref_grad = run_both(logits, labels, cpu_backend, w, temperature=temperature)
    tol = TOL[dtype]
    assert st.logprobs.dtype == torch.float32 and st.entropy.dtype == torch.float32
    assert_close(st.logprobs, ref[0], atol=tol, rtol=tol, what="logprobs")
    assert_close(st.entropy, ref[1], atol=tol, rtol=tol, what="entropy")
    assert_close(st.sum_p2, ref[2], atol=tol, rtol=tol, what="sum_p2")
    assert torch.equal(st.argmax, ref[3])
    assert grad.dtype == dtype
    gtol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, atol=gtol, rtol=gtol if dtype != torch.float32 else 1e-5, what="d logits")


def test_ignore_index_rows_are_zero_with_zero_grad(cpu_backend):
    logits = make_logits((2, 6, 50), torch.float32)
    labels = make_labels((2, 6), 50)
    labels[0, :] = -7
    x = logits.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, labels, ignore_index=-7, entropy=True, sum_p2=True, backend=cpu_backend)
    (st.logprobs + st.entropy + st.sum_p2).sum().backward()
    assert torch.count_nonzero(st.logprobs[0]) == 0 and torch.count_nonzero(st.entropy[0]) == 0
    assert torch.count_nonzero(x.grad[0]) == 0
    assert torch.count_nonzero(x.grad[1]) > 0


def test_strided_logits_need_no_copy(cpu_backend):
    """The usual `logits[:, :-1]` slice of a [B, T, V] tensor, and a transposed batch."""
    full = make_logits((3, 9, 40), torch.float32)
    labels = make_labels((3, 8), 40)
    sliced = full[:, :-1]
    st = fastalign.token_logprobs(sliced, labels, entropy=True, backend=cpu_backend)
    ref = reference.token_logprobs(sliced.double(), labels)
    assert_close(st.logprobs, ref[0], atol=1e-5, what="logprobs (sliced)")
    tr = full.transpose(0, 1)  # [9, 3, 40], rows not in memory order
    lab = make_labels((9, 3), 40)
    st = fastalign.token_logprobs(tr, lab, entropy=True, backend=cpu_backend)
    ref = reference.token_logprobs(tr.double(), lab)
    assert_close(st.entropy, ref[1], atol=1e-5, what="entropy (transposed)")


def test_grad_flows_through_slice_and_4d(cpu_backend):
    full = make_logits((2, 2, 5, 33), torch.float32).requires_grad_(True)
    labels = make_labels((2, 2, 4), 33)
    st = fastalign.token_logprobs(full[:, :, :-1], labels, backend=cpu_backend)
    st.logprobs.sum().backward()
    ref_x = full.detach().double().requires_grad_(True)
    reference.token_logprobs(ref_x[:, :, :-1], labels)[0].sum().backward()
    assert_close(full.grad, ref_x.grad, atol=1e-6, what="d logits through slice")
    assert torch.count_nonzero(full.grad[:, :, -1]) == 0


def test_extreme_logits(cpu_backend):
    logits = make_logits((4, 64), torch.float32, scale=1.0)
    logits[0, 3] = 1e4
    logits[1, :] = -1e4
    logits[1, 5] = 1e4
    logits[2, ::2] = 1e4
    logits[3, :32] = -1e4
    labels = torch.tensor([3, 6, 2, 40])
    w = torch.randn(3, 4, dtype=torch.float64)
    st, grad, ref, ref_grad = run_both(logits, labels, cpu_backend, w)
    for a, b, name in zip(st[:3], ref[:3], ("logprobs", "entropy", "sum_p2")):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, atol=1e-4, rtol=1e-5, what=name)
    assert_close(grad, ref_grad, atol=1e-5, what="d logits")


@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 1e-6, 1e-10])
def test_small_temperatures_keep_fp32_accuracy(cpu_backend, temperature):
    """At a small temperature the C++ kernel fused z / T - max into one FMA that kept the rounding of the max
    (relative error 4e-6 at T = 1e-2, 2.6e-2 at 1e-6, an impossible +inf log-prob and NaN entropy at 1e-10);
    the offsets from the max are (z - max z) / T now: fp32 rounding at any temperature, on every backend."""
    logits = make_logits((3, 5, 37), torch.float32, scale=1.0)
    labels = make_labels((3, 5), 37)
    st = fastalign.token_logprobs(logits, labels, entropy=True, backend=cpu_backend, temperature=temperature)
    lp, ent, _ = reference.token_logprobs(logits.double(), labels, temperature=temperature, dtype=torch.float64)[:3]
    assert (st.logprobs <= 0).all() and torch.isfinite(st.entropy).all()
    assert_close(st.logprobs, lp, atol=1e-6, rtol=5e-7, what="logprobs")
    assert_close(st.entropy, ent, atol=1e-5, rtol=1e-4, what="entropy")


@pytest.mark.parametrize("scale, temperature", [(1e9, 0.7), (1e10, 1.0), (1e20, 0.7), (1.0, 1e-10)])
def test_gradients_at_huge_scaled_logits(cpu_backend, scale, temperature):
    """Where ``|z / T|`` passes 2^30 the saved fp32 lse's rounding (half its ulp: 64 and more) is past the range
    of exp: the C++ backward's row mass overflowed or underflowed there and every gradient of the row was NaN.
    The gradients of the three statistics equal float64 autograd, on every backend."""
    logits = make_logits((4, 50), torch.float32, scale=scale)
    labels = torch.tensor([3, 6, 2, 40])
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    st, grad, ref, ref_grad = run_both(logits, labels, cpu_backend, w, temperature=temperature)
    assert_close(st.logprobs, ref[0], atol=1e-6, rtol=1e-6, what="logprobs")
    assert torch.isfinite(grad).all()
    assert_close(grad, ref_grad, atol=1e-5, rtol=1e-6, what="d logits")  # d / dz carries 1 / T


def _far_and_near_logits(n=12, V=90, shift=40.0):
    """Integer logits (exact in fp32), every other row shifted by ``shift``: rows with |lse| past 32 beside rows
    with |lse| under 32; one row ignored and one of only -inf logits."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randint(-6, 7, (n, V), generator=g).float() + torch.tensor([shift, 0.0]).repeat(n // 2)[:, None]
    logits[7] = float("-inf")
    labels = torch.randint(0, V, (n,), generator=g)
    labels[2] = -100
    return logits, labels


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_forward_saves_the_rounding_of_its_lse(cpu_backend, temperature):
    """The forward's ``log_c`` output is ``log sum_j exp(z_j / T - lse)`` for its own saved fp32 lse at the labelled
    rows with |lse| >= 32 (float64 on the exact logits, to the rounding of log s), 0 elsewhere (a row of no mass
    included)."""
    logits, labels = _far_and_near_logits()
    out = token_stats(logits.unsqueeze(0), labels, 1.0 / temperature, -100, True, False, False, cpu_backend, False)
    lse, log_c = out[4], out[5]
    want = torch.logsumexp(logits.double() / temperature - lse.double()[:, None], -1)
    far = (lse.abs() >= 32) & torch.isfinite(lse) & (labels != -100)
    assert far.sum() == 5 and torch.equal(log_c[~far], torch.zeros(int((~far).sum())))
    assert want[far].abs().max() > 1.5e-6  # the saved lse is off by that much: the correction is not 0
    assert_close(log_c[far], want[far], atol=5e-7, rtol=0, what="log c")


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_backward_removes_the_rounding_of_the_saved_lse(cpu_backend, temperature):
    """Rows at |lse| about 1000, where the saved fp32 lse is off by up to 3e-5: the backward given the forward's
    ``log_c`` equals float64 autograd of the log-prob and entropy to fp32 rounding (with ``log_c = 0`` it is off by
    7e-6 and more)."""
    logits, labels = _far_and_near_logits(shift=1000.0)
    out = token_stats(logits.unsqueeze(0), labels, 1.0 / temperature, -100, True, False, False, cpu_backend, False)
    lse, log_c = out[4], out[5]
    g = torch.randn(2, logits.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = logits.double().requires_grad_(True)
    logp = torch.log_softmax(x / temperature, -1)
    p = logp.exp()
    keep = (labels != -100) & torch.isfinite(lse)
    lp = logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    want, = torch.autograd.grad(torch.where(keep, g[0] * lp + g[1] * ent, 0.0).sum(), x)
    got = token_stats_backward(g[0].float(), g[1].float(), None, logits.unsqueeze(0), labels, lse, log_c, out[1],
                               out[2], 1.0 / temperature, -100, cpu_backend)[0]
    assert_close(got[keep], want[keep], atol=1e-6, rtol=0, what="d logits")


def test_masked_vocabulary_minus_inf(cpu_backend):
    logits = make_logits((5, 70), torch.float32)
    logits[:, 60:] = float("-inf")
    logits[2, :30] = float("-inf")
    labels = torch.tensor([1, 59, 40, -100, 10])
    w = torch.randn(3, 5, dtype=torch.float64)
    st, grad, ref, ref_grad = run_both(logits, labels, cpu_backend, w)
    for a, b, name in zip(st[:3], ref[:3], ("logprobs", "entropy", "sum_p2")):
        assert_close(a, b, atol=2e-5, rtol=1e-5, what=name)
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[:, 60:]) == 0
    assert_close(grad, ref_grad, atol=1e-6, what="d logits")


@pytest.mark.parametrize("used", ["logprobs", "entropy", "sum_p2"])
def test_partly_used_outputs(cpu_backend, used):
    """All outputs requested, only one in the loss: the gradient is that one's alone."""
    logits = make_logits((6, 90), torch.float32)
    labels = make_labels((6,), 90)
    x = logits.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, labels, entropy=True, sum_p2=True, backend=cpu_backend)
    getattr(st, used).sum().backward()
    xr = logits.double().requires_grad_(True)
    ref = reference.token_logprobs(xr, labels)
    ref[("logprobs", "entropy", "sum_p2").index(used)].sum().backward()
    # fp32: the saved lse (~12 here) carries ulp / 2 ~ 5e-7 into every p, on top of the statistic's own rounding
    assert_close(x.grad, xr.grad, atol=2e-6, what=f"d logits from {used}")


def test_unrequested_outputs_are_none(cpu_backend):
    st = fastalign.token_logprobs(make_logits((4, 20), torch.float32), torch.arange(4), backend=cpu_backend)
    assert st.entropy is None and st.sum_p2 is None and st.argmax is None
    assert st.logprobs.shape == (4,)


def test_out_of_range_labels_give_nan_or_raise(cpu_backend):
    logits = make_logits((4, 20), torch.float32)
    labels = torch.tensor([0, 20, -3, 19])
    st = fastalign.token_logprobs(logits, labels, entropy=True, backend=cpu_backend)
    assert torch.isnan(st.logprobs[1]) and torch.isnan(st.logprobs[2])
    assert torch.isfinite(st.logprobs[[0, 3]]).all() and torch.isfinite(st.entropy).all()
    with pytest.raises(ValueError, match="labels must lie in"):
        fastalign.token_logprobs(logits, labels, check=True, backend=cpu_backend)


def test_check_accepts_every_in_range_label_and_ignore_index(cpu_backend):
    """``check=True`` refuses exactly the labels outside ``[0, V)`` that are not ``ignore_index``: the edges
    0 and V - 1 and the ignored rows pass (with the same statistics as without the check), V is refused."""
    logits = make_logits((5, 20), torch.float32)
    labels = torch.tensor([0, 19, -100, 7, -100])
    want = fastalign.token_logprobs(logits, labels, backend=cpu_backend).logprobs
    got = fastalign.token_logprobs(logits, labels, check=True, backend=cpu_backend).logprobs
    assert torch.equal(got, want) and torch.equal(got[[2, 4]], torch.zeros(2))
    custom = torch.tensor([0, 19, 5, 7, 5])
    st = fastalign.token_logprobs(logits, custom, ignore_index=5, check=True, backend=cpu_backend)
    assert torch.equal(st.logprobs[[2, 4]], torch.zeros(2))
    with pytest.raises(ValueError, match="labels must lie in"):
        fastalign.token_logprobs(logits, torch.tensor([0, 20, -100, 7, 3]), check=True, backend=cpu_backend)


def test_empty_batch(cpu_backend):
    x = torch.zeros(0, 10, requires_grad=True)
    st = fastalign.token_logprobs(x, torch.zeros(0, dtype=torch.long), entropy=True, backend=cpu_backend)
    assert st.logprobs.shape == (0,)
    (st.logprobs.sum() + st.entropy.sum()).backward()
    assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("shape", [(3, 0, 10), (0, 4, 10), (0, 0, 10), (2, 3, 0, 10)])
def test_empty_leading_dimensions(cpu_backend, shape):
    """A batch of rows with no tokens (or no rows): empty statistics of the leading shape, empty gradient."""
    x = torch.randn(*shape, requires_grad=True)
    st = fastalign.token_logprobs(x, torch.zeros(shape[:-1], dtype=torch.long), entropy=True, sum_p2=True,
                                  backend=cpu_backend)
    assert st.logprobs.shape == st.entropy.shape == st.sum_p2.shape == shape[:-1]
    (st.logprobs.sum() + st.entropy.sum()).backward()
    assert x.grad.shape == shape


def test_deterministic(cpu_backend):
    logits = make_logits((16, 500), torch.bfloat16)
    labels = make_labels((16,), 500)
    outs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        st = fastalign.token_logprobs(x, labels, entropy=True, sum_p2=True, backend=cpu_backend)
        (st.logprobs + st.entropy).sum().backward()
        outs.append((st.logprobs, st.entropy, st.sum_p2, x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_inplace_backward(cpu_backend):
    logits = make_logits((5, 8, 77), torch.float32)
    labels = make_labels((5, 8), 77)
    expected_x = logits.clone().requires_grad_(True)
    st = fastalign.token_logprobs(expected_x, labels, entropy=True, backend=cpu_backend)
    (st.logprobs - 0.1 * st.entropy).sum().backward()

    leaf = logits.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf buffer the backward may overwrite
    st = fastalign.token_logprobs(work, labels, entropy=True, inplace_backward=True, backend=cpu_backend)
    (st.logprobs - 0.1 * st.entropy).sum().backward()
    assert_close(leaf.grad, expected_x.grad, atol=0, what="in-place d logits")


def test_cpp_larger_rows():
    """C++ kernel on a realistic row length (many SIMD chunks and a ragged tail)."""
    logits = make_logits((32, 32003), torch.bfloat16)
    labels = make_labels((32,), 32003)
    w = torch.randn(3, 32, dtype=torch.float64)
    st, grad, ref, ref_grad = run_both(logits, labels, "cpp", w)
    assert_close(st.logprobs, ref[0], atol=5e-5, rtol=1e-5, what="logprobs")
    assert_close(st.entropy, ref[1], atol=5e-5, rtol=1e-5, what="entropy")
    assert torch.equal(st.argmax, ref[3])
    assert_close(grad, ref_grad, atol=1e-4, rtol=8e-3, what="d logits")


def test_custom_ops_pass_opcheck(cpu_backend):
    logits = make_logits((2, 3, 40), torch.float32)
    labels = make_labels((6,), 40)
    args = (logits, labels, 1.0, -100, True, True, True, cpu_backend, False)
    torch.library.opcheck(token_stats, args, test_utils=("test_schema", "test_faketensor"))
    lp, ent, sp2, _amax, lse, log_c = token_stats(*args)
    g = torch.randn(6)
    bargs = (g, g, g, logits, labels, lse, log_c, ent, sp2, 1.0, -100, cpu_backend)
    torch.library.opcheck(token_stats_backward, bargs, test_utils=("test_schema", "test_faketensor"))


def test_autograd_registration_passes_opcheck():
    logits = make_logits((2, 3, 40), torch.float32).requires_grad_(True)
    labels = make_labels((6,), 40)
    torch.library.opcheck(token_stats, (logits, labels, 1.0, -100, True, False, False, "cpp", False),
                          test_utils=("test_autograd_registration",))


def test_torch_compile_fullgraph_no_graph_break():
    def step(logits, labels):
        st = fastalign.token_logprobs(logits, labels, entropy=True, temperature=0.9)
        return (st.logprobs - 0.01 * st.entropy).sum()

    logits = make_logits((2, 5, 64), torch.float32)
    labels = make_labels((2, 5), 64)
    x = logits.clone().requires_grad_(True)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, labels)
    loss.backward()
    xr = logits.clone().requires_grad_(True)
    loss_ref = step(xr, labels)
    loss_ref.backward()
    assert_close(loss, loss_ref, atol=1e-6, what="compiled loss")
    assert_close(x.grad, xr.grad, atol=1e-7, what="compiled grad")


@pytest.mark.parametrize(
    "logits, labels, err, match",
    [
        (torch.randn(4, 10), torch.zeros(4, 1, dtype=torch.long), ValueError, r"labels must have shape \(4,\)"),
        (torch.randn(4, 10), torch.zeros(4), TypeError, "labels must be an int64"),
        (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long), TypeError, "logits must be float32"),
        (torch.randn(()), torch.zeros((), dtype=torch.long), ValueError, "logits must have at least 1"),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), ValueError, "non-empty vocabulary"),
        ([1.0, 2.0], torch.zeros(1, dtype=torch.long), TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_input(logits, labels, err, match):
    with pytest.raises(err, match=match):
        fastalign.token_logprobs(logits, labels)


def test_bad_temperature_and_backend():
    x, y = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastalign.token_logprobs(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastalign.token_logprobs(x, y, backend="numpy")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        fastalign.token_logprobs(x, y, backend="cuda")


def test_use_backend_context_and_env(monkeypatch):
    from fastalign import _backend

    with fastalign.use_backend("cpp"):
        assert _backend.current() == "cpp"
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    assert _backend.current() == "triton"
    monkeypatch.setenv("FASTALIGN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.current()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(backend, dtype):
    if backend == "cuda" and not fastalign._backend.compiled().cuda_compiled:
        pytest.skip("built without CUDA kernels")
    logits = make_logits((4, 33, 32011), dtype).cuda()
    labels = make_labels((4, 33), 32011).cuda()
    w = torch.randn(3, 4, 33, dtype=torch.float64, device="cuda")
    st, grad, ref, ref_grad = run_both(logits, labels, backend, w, temperature=0.8)
    assert_close(st.logprobs, ref[0], atol=5e-5, rtol=1e-5, what="logprobs")
    assert_close(st.entropy, ref[1], atol=5e-5, rtol=1e-5, what="entropy")
    assert_close(st.sum_p2, ref[2], atol=5e-5, rtol=1e-5, what="sum_p2")
    assert torch.equal(st.argmax, ref[3])
    assert_close(grad, ref_grad, atol=GRAD_TOL[dtype], rtol=GRAD_TOL[dtype], what="d logits")


def test_tensors_on_different_devices():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 10)
    with FakeTensorMode():  # a tensor standing for one on a CUDA device
        y = torch.zeros(3, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="labels is on cuda:0 but logits is on cpu"):
        fastalign.token_logprobs(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_low_precision_label_gradient_is_rounded_once(cpu_backend, dtype, inplace):
    """d(logits) at the label, ``g (1 - p_y) / T``, formed in fp32 and rounded once to the logits' dtype: the C++
    backward stored ``-g p_y`` in bf16 and added ``g`` after, so a confident label's gradient (``1 - p_y`` ~ 3e-4)
    was off by about ulp_bf16(g), its sign wrong on some rows; with one vocabulary entry (log p = 0) it was not 0."""
    g = torch.Generator().manual_seed(0)
    N, V = 64, 96
    labels = torch.randint(0, V, (N,), generator=g)
    z = torch.randn(N, V, generator=g)
    z[torch.arange(N), labels] += 8.0  # p_y close to 1
    z = z.to(dtype)
    g_lp = torch.randn(N, generator=g)
    leaf = z.clone().requires_grad_(True)
    src = leaf * 1 if inplace else leaf  # inplace_backward writes over a non-leaf's buffer
    st = fastalign.token_logprobs(src, labels, temperature=0.9, backend=cpu_backend, inplace_backward=inplace)
    grad = torch.autograd.grad((st.logprobs * g_lp).sum(), src)[0]
    xr = z.double().requires_grad_(True)
    ((xr / 0.9).log_softmax(-1).gather(1, labels[:, None])[:, 0] * g_lp.double()).sum().backward()
    at_y = grad.double()[torch.arange(N), labels]
    want = xr.grad[torch.arange(N), labels]
    assert torch.equal(torch.sign(at_y), torch.sign(want))
    # within 1% (a bf16 ulp is 0.4-0.8%; the fp32 lse's rounding is ~1e-3 of 1 - p_y here); it was ~20%
    assert_close(at_y, want, rtol=1e-2, atol=0, what="label's d(logits)")
    one = torch.tensor([[0.5]], dtype=dtype, requires_grad=True)
    (fastalign.token_logprobs(one, torch.tensor([0]), backend=cpu_backend).logprobs * -0.4).sum().backward()
    assert one.grad.item() == 0.0
