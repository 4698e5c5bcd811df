"""The GPU kernels' numerics, checked in the Triton interpreter against float64 references:
precision at large logits, NaN propagation, the linear backward's fp32 accumulation over many
token chunks, and the Triton paths of the ops that also have CUDA C++ kernels.
Tests marked ``gpu`` run the compiled kernels at realistic shapes (``pytest -m gpu``)."""
import math

import pytest
import torch

import fastalign
from fastalign import reference
from helpers import assert_close

pytest.importorskip("triton")
TRITON = "triton"


def _ref_stats(logits, labels):
    lp, ent, sp2, amax = reference.token_logprobs(logits.double(), labels, dtype=torch.float64)
    return lp, ent, sp2, amax


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("offset", [1e4, -1e4, 3e5])
def test_token_logprobs_precision_at_large_logits(offset):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 37, generator=g) * 3 + offset
    y = torch.randint(0, 37, (6,), generator=g)
    st = fastalign.token_logprobs(z, y, entropy=True, sum_p2=True, backend=TRITON)
    lp, ent, sp2, _ = _ref_stats(z, y)
    # the error is the fp32 rounding of the log-prob, not of |max| (which would be ~1e-3 here)
    assert_close(st.logprobs, lp, atol=1e-5, rtol=1e-6, what="logprobs")
    assert_close(st.entropy, ent, atol=1e-5, rtol=1e-5, what="entropy")
    assert_close(st.sum_p2, sp2, atol=1e-6, rtol=1e-5, what="sum_p2")


@pytest.mark.parametrize("backend", ["cpp", TRITON])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shift, temperature", [(1e4, 1.0), (-1e4, 1.0), (1e4, 0.05), (-1e4, 0.05), (1e6, 1.0),
                                                (1e6, 0.05)])
def test_token_logprobs_gradients_at_large_lse(backend, inplace, shift, temperature):
    """d(logits) of log-prob, entropy and sum p^2 at |lse| from 1e4 to 2e7 against float64: the saved
    fp32 lse is off by up to ulp(lse) / 2 (5e-4 at 1e4, 1 at 2e7), which must not reach p. The logits
    lie on a grid where x = z / T is exact in fp32 (else that product alone rounds by up to 1 at 2e7,
    before any kernel arithmetic), so what is left is the kernels' own fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    N, V = 5, 19
    inv_t = 1.0 / temperature
    ulp_x = 2.0 ** (math.floor(math.log2(abs(shift) * inv_t * 1.01)) - 23)
    step = ulp_x / 4 if temperature != 1.0 else ulp_x  # z on a grid whose products z * 20 are exact
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * (2.0 / inv_t) / step).round() * step + shift
    z[1] -= 2 * shift  # rows on both sides
    z = z.float()
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = -100
    masked = int(y[3] + 1) % V
    z[3, masked] = -math.inf  # a masked id: gradient 0, no NaN
    assert torch.equal((z * inv_t).double(), z.double() * inv_t), "the test's premise: z / T exact in fp32"
    g_lp, g_ent, g_sp2 = (torch.randn(N, generator=g) for _ in range(3))

    z64 = z.double().requires_grad_()
    lp, ent, sp2, _ = reference.token_logprobs(z64, y, temperature=temperature, dtype=torch.float64)
    (g_lp.double() @ lp + g_ent.double() @ ent + g_sp2.double() @ sp2).backward()

    leaf = z.clone().requires_grad_()
    zz = leaf * 1.0 if inplace else leaf  # in-place backward overwrites its input: a non-leaf copy
    st = fastalign.token_logprobs(zz, y, temperature=temperature, entropy=True, sum_p2=True,
                                  inplace_backward=inplace, backend=backend)
    (g_lp @ st.logprobs + g_ent @ st.entropy + g_sp2 @ st.sum_p2).backward()
    scale = z64.grad.abs().amax(1, keepdim=True).clamp_min(1.0)  # fp32 rounding of each row's gradient
    assert_close(leaf.grad / scale, z64.grad / scale, atol=2e-6, what="d(logits) / row max")
    assert leaf.grad[2].eq(0).all() and leaf.grad[3, masked] == 0


def test_token_logprobs_constant_row_of_1e30():
    V = 11
    z = torch.full((2, V), 1e30)
    y = torch.tensor([0, 10])
    st = fastalign.token_logprobs(z, y, entropy=True, sum_p2=True, backend=TRITON)
    assert_close(st.logprobs, torch.full((2,), -math.log(V)), atol=1e-6, what="logprobs")
    assert_close(st.entropy, torch.full((2,), math.log(V)), atol=1e-6, what="entropy")
    assert_close(st.sum_p2, torch.full((2,), 1.0 / V), atol=1e-7, what="sum_p2")


def test_linear_logprobs_precision_at_large_logits():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 16, generator=g)
    w = torch.randn(70, 16, generator=g)
    y = torch.randint(0, 70, (20,), generator=g)
    scale = 2e3  # logits of order 1e4
    st = fastalign.linear_logprobs(h, w, y, logit_scale=scale, entropy=True, backend=TRITON)
    z = (h.double() @ w.double().T) * scale
    ref = torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0]
    # fp32 logits carry |z| * 2^-24 of rounding each; the log-prob adds no |max|-sized error on top
    assert_close(st.logprobs, ref, atol=5e-3, what="logprobs")
    lp32 = torch.log_softmax((h @ w.T) * scale, -1).gather(1, y[:, None])[:, 0]  # eager fp32 on the same logits
    assert_close(st.logprobs, lp32.double(), atol=2e-3, what="logprobs vs eager fp32")


# ----------------------------------------------------------------------------- NaN


def test_token_logprobs_nan_row_gives_nan_row():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 50, generator=g)
    z[1, 17] = float("nan")
    y = torch.tensor([3, 4, 5, -100])
    z[3, 2] = float("nan")  # an ignored row stays 0
    x = z.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, y, entropy=True, sum_p2=True, backend=TRITON)
    for name in ("logprobs", "entropy", "sum_p2"):
        v = getattr(st, name)
        assert torch.isnan(v[1]), name
        assert torch.isfinite(v[[0, 2, 3]]).all(), name
    assert (st.logprobs[3] == 0) and (st.entropy[3] == 0)
    lp, ent, sp2, _ = _ref_stats(z, y)
    keep = torch.tensor([0, 2])
    assert_close(st.logprobs[keep], lp[keep], atol=2e-6, what="logprobs of the other rows")
    (st.logprobs.nan_to_num() + st.entropy.nan_to_num()).sum().backward()
    assert torch.isnan(x.grad[1]).all()
    assert torch.isfinite(x.grad[[0, 2, 3]]).all()
    assert (x.grad[3] == 0).all()


def test_token_logprobs_nan_gradient_input_propagates():
    z = torch.randn(3, 20)
    y = torch.tensor([1, 2, 3])
    x = z.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, y, backend=TRITON)
    g = torch.tensor([1.0, float("nan"), 1.0])
    st.logprobs.backward(g)
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


def test_linear_logprobs_nan_hidden_row_and_nan_weight_row():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 8, generator=g)
    w = torch.randn(40, 8, generator=g)
    y = torch.randint(0, 40, (6,), generator=g)
    h_nan = h.clone()
    h_nan[2, 5] = float("nan")
    st = fastalign.linear_logprobs(h_nan, w, y, entropy=True, sum_p2=True, backend=TRITON)
    for name in ("logprobs", "entropy", "sum_p2"):
        v = getattr(st, name)
        assert torch.isnan(v[2]), name
        assert torch.isfinite(v[[0, 1, 3, 4, 5]]).all(), name
    w_nan = w.clone()
    w_nan[7, 0] = float("nan")  # every token's logit row holds a NaN
    st = fastalign.linear_logprobs(h, w_nan, y, entropy=True, backend=TRITON)
    assert torch.isnan(st.logprobs).all() and torch.isnan(st.entropy).all()


def test_nan_pattern_matches_cpp_backend():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 30, generator=g)
    z[0, 0] = float("nan")
    z[2] = float("-inf")
    z[2, 4] = 1.0
    z[3, :] = float("-inf")  # an all -inf row: NaN (like log_softmax)
    y = torch.tensor([1, 2, 4, 5, -100])
    a = fastalign.token_logprobs(z, y, entropy=True, sum_p2=True, backend=TRITON)
    b = fastalign.token_logprobs(z, y, entropy=True, sum_p2=True, backend="cpp")
    for name in ("logprobs", "entropy", "sum_p2"):
        assert torch.equal(torch.isnan(getattr(a, name)), torch.isnan(getattr(b, name))), name
    assert_close(a.logprobs[2], torch.tensor(0.0), atol=1e-7, what="a row whose only finite logit is the label")


# ----------------------------------------------------------------------------- linear backward


def _cuda_bf16(g, scale, *shape):
    """bf16 ``scale * N(0, 1)`` of ``shape`` on the GPU, drawn from ``g`` (fp32, then rounded)."""
    return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()


def _bf16_head(g, lead: tuple, H: int, V: int):
    """Rows ``[*lead, H]`` (0.5 N(0, 1)) and a head ``[V, H]`` (0.05 N(0, 1)) in bf16 on the GPU, drawn from ``g`` in
    that order: hidden states and an lm_head, or a low-rank term's ``(a, L)``."""
    return _cuda_bf16(g, 0.5, *lead, H), _cuda_bf16(g, 0.05, V, H)


def _rel_err(a, ref):
    return float((a.detach().double() - ref.detach()).norm() / ref.detach().norm())


def _linear_case(N=96, H=32, V=80, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.5).bfloat16()
    w = (torch.randn(V, H, generator=g) * 0.5).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def _ref_dw(h, w, y):
    hd, wd = h.double().requires_grad_(False), w.double().requires_grad_(True)
    lp = torch.log_softmax(hd @ wd.T, -1).gather(1, y[:, None])[:, 0]
    lp.sum().backward()
    du = torch.softmax(hd @ wd.T, -1).neg()
    du[torch.arange(len(y)), y] += 1
    return wd.grad, du


def _bf16_accumulated_dw(du, h, chunk):
    """What a bf16 accumulator across chunks gives (rounded after every chunk)."""
    dw = torch.zeros(du.shape[1], h.shape[1], dtype=torch.bfloat16)
    for n0 in range(0, du.shape[0], chunk):
        dw.addmm_(du[n0:n0 + chunk].T.bfloat16(), h[n0:n0 + chunk])
    return dw


DW_TOL = 4e-3  # relative Frobenius error of dW for bf16 inputs: one bf16 rounding (2^-9) plus bf16 d(logits)


def test_linear_backward_bf16_dw_fp32_accumulation_over_many_chunks():
    h, w, y = _linear_case()
    chunk = 1  # 96 chunks
    ref_dw, du = _ref_dw(h, w, y)
    # the tolerance is one that a bf16 accumulator across chunks fails
    assert _rel_err(_bf16_accumulated_dw(du, h, chunk), ref_dw) > DW_TOL
    wg = w.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, wg, y, backend=TRITON, chunk=(chunk, w.shape[0]))
    st.logprobs.sum().backward()
    assert wg.grad.dtype == torch.bfloat16
    assert _rel_err(wg.grad, ref_dw) < DW_TOL


def test_linear_backward_bf16_weight_gradient_buffer():
    """The GPU layout (bf16 dW output) with several chunks sums in an fp32 buffer, cast once."""
    from fastalign.ops.linear_triton import backward as _triton_backward

    h, w, y = _linear_case(seed=6)
    ref_dw, _ = _ref_dw(h, w, y)
    st = fastalign.linear_logprobs(h, w, y, backend=TRITON)
    lse = torch.logsumexp((h.float() @ w.float().T), -1)
    dw = torch.zeros(w.shape, dtype=torch.bfloat16)
    empty = torch.empty(0)
    _triton_backward(torch.ones(len(y)), None, None, h, w, None, None, y, lse, empty, empty, 1.0, 0.0, 1.0, -100,
                     2, 0.0, None, dw, None, (None, None), torch.zeros_like(lse))  # |lse| < 32: log c 0
    assert _rel_err(dw, ref_dw) < DW_TOL
    assert torch.isfinite(st.logprobs).all()


def test_gpu_chunk_tokens_sizes_in_gpu_bytes():
    from fastalign.ops.linear_triton import gpu_chunk_tokens

    n = gpu_chunk_tokens(8192, 151936, 2)
    assert 2048 <= n <= 8192  # thousands of tokens: the weight streams a few times, not 149
    assert n * 151936 * 2 <= 1 << 30
    assert gpu_chunk_tokens(10, 151936, 2) == 10 and gpu_chunk_tokens(10**6, 10**9, 4) == 1


# ----------------------------------------------------------------------------- GPU


def _gpu():
    return torch.device("cuda")


@pytest.mark.gpu
def test_gpu_linear_backward_bf16_at_full_vocabulary():
    N, H, V = 1024, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    h, w = _bf16_head(g, (N,), H, V)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    for chunk in (None, (128, V)):  # one chunk, and eight
        hg.grad = wg.grad = None
        st = fastalign.linear_logprobs(hg, wg, y, entropy=True, chunk=chunk)
        (st.logprobs.sum() + 0.1 * st.entropy.sum()).backward()
        hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
        logp = torch.log_softmax(hd @ wd.T, -1)
        ref_lp = logp.gather(1, y[:, None])[:, 0]
        ref_ent = -(logp.exp() * logp).sum(-1)
        (ref_lp.sum() + 0.1 * ref_ent.sum()).backward()
        assert_close(st.logprobs, ref_lp, atol=2e-2, what="logprobs")
        # bf16 d(logits) and one bf16 rounding of the result: ~2-3e-3 (bf16 accumulation over
        # 149 chunks gave 1.3e-2)
        assert _rel_err(wg.grad, wd.grad) < 5e-3
        assert _rel_err(hg.grad, hd.grad) < 5e-3
        del logp


@pytest.mark.gpu
def test_gpu_linear_mean_logit_bf16_at_full_vocabulary():
    """The mean logit of a softcapped bf16 head from the log-probs' own pass (its gradient in the same backward,
    64-row forward tiles on sm_90), a quarter of the rows ignored, against float64 on the materialised logits."""
    N, H, V = 1024, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(1)
    h, w = _bf16_head(g, (N,), H, V)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[::4] = -100
    g_mean = torch.randn(N, device="cuda", generator=g)
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(hg, wg, y, softcap=30.0, mean_logit=True)
    (st.logprobs.sum() + (st.mean_logit * g_mean).sum()).backward()
    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    z = 30.0 * torch.tanh(hd @ wd.T / 30.0)
    keep = y != -100
    ref_lp = torch.where(keep, torch.log_softmax(z, -1).gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    ref_mean = torch.where(keep, z.mean(-1), 0.0)
    (ref_lp.sum() + (ref_mean * g_mean).sum()).backward()
    del z
    assert_close(st.mean_logit, ref_mean, atol=1e-4, rtol=1e-4, what="mean_logit")
    assert_close(st.logprobs, ref_lp, atol=2e-2, what="logprobs")
    assert _rel_err(wg.grad, wd.grad) < 5e-3
    assert _rel_err(hg.grad, hd.grad) < 5e-3


@pytest.mark.gpu
def test_gpu_linear_policy_single_pass_bf16_at_full_vocabulary(monkeypatch):
    """LinearPolicyLoss's single pass over blocks of 220 tokens across sequences (ppo is separable over tokens;
    bf16 logits kept per block, d(weight) summed over the blocks in fp32) and its two passes against the float64
    loss of the materialised logits."""
    from fastalign.reference import policy as ref_policy

    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "64")  # 220 rows of 151936 bf16 logits: under one sequence (256)
    B, T, H, V = 8, 256, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(3)
    h, w = _bf16_head(g, (B, T), H, V)
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    y[:, :64] = -100  # prompts
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    adv = torch.randn(B, device="cuda", generator=g)
    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    logp = torch.log_softmax(hd @ wd.T, -1)
    keep = (y != -100) & mask
    lp64 = torch.where(keep, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
    ent64 = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    del logp
    old = (lp64.detach() + 0.1 * torch.randn(B, T, device="cuda", generator=g, dtype=torch.float64)).float()
    cfg = dict(loss_type="ppo", eps_low=0.2, eps_high=0.28, entropy_coef=0.01, agg="token-mean")
    loss64, _ = ref_policy.policy_loss(lp64.cpu(), old.double().cpu(), adv.double().cpu(), keep.cpu(),
                                       entropy=ent64.cpu(), **cfg)
    loss64.backward()
    for single_pass in (True, False):
        hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = fastalign.LinearPolicyLoss(single_pass=single_pass, **cfg)(hg, wg, y, old, adv, mask)
        loss.backward()
        assert abs(loss.item() - loss64.item()) < 2e-3, (single_pass, loss.item(), loss64.item())
        assert _rel_err(hg.grad, hd.grad) < 5e-3, single_pass
        assert _rel_err(wg.grad, wd.grad) < 5e-3, single_pass


@pytest.mark.gpu
def test_gpu_separable_step_bf16_at_full_vocabulary(monkeypatch):
    """separable_step's single pass over blocks of one pair (bf16 logits kept per block; the entropy and
    argmax for metrics from the same pass) and its two passes against float64 on the materialised logits:
    a sigmoid DPO loss with a chosen-token NLL."""
    import torch.nn.functional as F

    from fastalign.linear_step import separable_step

    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "160")  # 2 x 256 rows of 151936 bf16 logits: one pair per block
    B, T, H, V = 4, 256, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(5)
    h, w = _bf16_head(g, (2 * B, T), H, V)
    y = torch.randint(0, V, (2 * B, T), device="cuda", generator=g)
    y[:, :64] = -100  # prompts
    ref = torch.randn(2 * B, device="cuda", generator=g, dtype=torch.float64) * 5
    keep = y != -100

    def dpo(lp, _sum_p2):
        s = (lp.double() * keep).sum(-1)
        nll = -s[:B].sum() / keep[:B].sum()
        return -F.logsigmoid(0.1 * ((s[:B] - ref[:B]) - (s[B:] - ref[B:]))).mean() + nll, {}

    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    logp = torch.log_softmax(hd @ wd.T, -1)
    lp64 = torch.where(keep, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
    with torch.no_grad():
        ent64 = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    del logp
    loss64, _ = dpo(lp64, None)
    loss64.backward()
    for single_pass in (True, False):
        hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _, stats = separable_step(hg, wg, y, dpo, items="pairs", extras=("entropy", "argmax"),
                                        single_pass=single_pass)
        loss.backward()
        assert abs(loss.item() - loss64.item()) < 2e-3 * max(1.0, abs(loss64.item())), (single_pass, loss.item())
        assert _rel_err(hg.grad, hd.grad) < 5e-3, single_pass
        assert _rel_err(wg.grad, wd.grad) < 5e-3, single_pass
        assert _rel_err(stats["entropy"], ent64) < 5e-3, single_pass
        assert bool((stats["argmax"] >= 0).eq(keep).all()), single_pass


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", [dict(beta=0.0), dict(beta=0.5), dict(beta=1.0), dict(divergence="tvd"),
                                        dict(divergence="cosine")], ids=["fkl", "jsd", "rkl", "tvd", "cosine"])
def test_gpu_linear_divergence_bf16_at_full_vocabulary(divergence, monkeypatch):
    """The distillation divergence (Triton row kernel, scored rows first on the device, blocks of bf16 logits)
    with and without its single pass against float64 on the materialised logits, a wider teacher, a third of the
    tokens unscored, loss and the student's gradients."""
    from fastalign.reference.divergence import divergence_loss

    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "96")  # several blocks
    N, H, Ht, V = 768, 256, 384, 151936
    g = torch.Generator(device="cuda").manual_seed(7)
    h, w = _bf16_head(g, (N,), H, V)
    ht, wt = _bf16_head(g, (N,), Ht, V)
    mask = (torch.rand(N, device="cuda", generator=g) > 1 / 3).float()
    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    zs64, zt64 = hd @ wd.T, ht.double() @ wt.double().T
    if "tvd" in divergence.values():  # the TVD's gradient takes sign(p_s - p_t): from the bf16 logits the blocks
        zs64 = zs64 + (zs64.bfloat16().double() - zs64).detach()  # hold, or a flipped sign at every p_s ~ p_t
        zt64 = zt64.bfloat16().double()
    loss64, _ = divergence_loss(zs64, zt64, **divergence, response_mask=mask)
    loss64.backward()
    for single_pass in (True, False):
        hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = fastalign.linear_divergence_loss(hg, wg, ht, wt, **divergence, response_mask=mask,
                                                   single_pass=single_pass)
        loss.backward()
        assert abs(loss.item() - loss64.item()) < 2e-3 * max(1.0, abs(loss64.item())), (single_pass, loss.item())
        assert _rel_err(hg.grad, hd.grad) < 1e-2, single_pass
        assert _rel_err(wg.grad, wd.grad) < 1e-2, single_pass


def _fp32_teacher_divergence_errors(device: str):
    """Relative errors, against float64, of ``linear_divergence_loss`` with a bf16 student and an fp32 teacher
    whose logits lie in [16, 32) (bf16 spacing 0.125 there), and of the float64 loss with the teacher's logits
    rounded to bf16: the error a logit buffer in the student's dtype would add."""
    from fastalign.reference.divergence import generalized_jsd

    N, H, V = 256, 64, 4096
    g = torch.Generator(device=device).manual_seed(11)
    h = (torch.randn(N, H, device=device, generator=g) * 0.5).bfloat16()
    w = (torch.randn(V, H, device=device, generator=g) * 0.05).bfloat16()
    ht = torch.randn(N, H, device=device, generator=g) * 0.5
    wt = torch.randn(V, H, device=device, generator=g) * 0.05
    bt = 20 + 0.5 * torch.rand(V, device=device, generator=g)
    zt = ht.double() @ wt.double().T + bt.double()
    loss64 = generalized_jsd(h.double() @ w.double().T, zt, beta=0.5).mean()
    rounded64 = generalized_jsd(h.double() @ w.double().T, zt.bfloat16().double(), beta=0.5).mean()
    loss, _ = fastalign.linear_divergence_loss(h, w, ht, wt, teacher_bias=bt, beta=0.5)
    rel = lambda x: abs(float(x) - float(loss64)) / abs(float(loss64))
    return rel(loss), rel(rounded64)


def test_fp32_teacher_beside_a_bf16_student_keeps_its_precision():
    """The teacher's logits are not rounded to the student's dtype (CPU blocks are fp32; the GPU case below)."""
    err, rounded = _fp32_teacher_divergence_errors("cpu")
    assert rounded > 5e-3 and err < rounded / 20, (err, rounded)


@pytest.mark.gpu
def test_gpu_fp32_teacher_beside_a_bf16_student_keeps_its_precision():
    """On a GPU the logit blocks take the wider of the two heads' dtypes: an fp32 teacher's logits are not
    rounded to the bf16 student's (that rounding alone moves this loss by more than 20x the allowed error)."""
    err, rounded = _fp32_teacher_divergence_errors("cuda")
    assert rounded > 5e-3 and err < rounded / 20, (err, rounded)


@pytest.mark.gpu
def test_gpu_linear_low_rank_bf16_at_full_vocabulary():
    """A LoRA lm_head (rank 16, frozen W) through the low-rank term: equals the float64 widened head,
    gradients to a and L with one chunk and with eight."""
    N, H, V, R = 1024, 256, 151936, 16
    g = torch.Generator(device="cuda").manual_seed(2)
    h, w = _bf16_head(g, (N,), H, V)
    a, lw = _bf16_head(g, (N,), R, V)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[: N // 4] = -100
    ag, lg = a.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    ad, ld = a.double().requires_grad_(True), lw.double().requires_grad_(True)
    logp = torch.log_softmax(h.double() @ w.double().T + ad @ ld.T, -1)
    keep = y != -100
    ref_lp = torch.where(keep, logp.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    ref_ent = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    (ref_lp.sum() + 0.1 * ref_ent.sum()).backward()
    del logp
    for chunk in (None, (128, V)):
        ag.grad = lg.grad = None
        st = fastalign.linear_logprobs(h, w, y, low_rank=(ag, lg), entropy=True, chunk=chunk)
        (st.logprobs.sum() + 0.1 * st.entropy.sum()).backward()
        assert_close(st.logprobs, ref_lp, atol=2e-2, what="logprobs")
        assert _rel_err(ag.grad, ad.grad) < 5e-3
        assert _rel_err(lg.grad, ld.grad) < 5e-3
    # the same head through LinearPolicyLoss's single pass (4 sequences of 256, two blocks): a token-sum
    # REINFORCE loss with A = -1 and entropy_coef = -0.1 is sum(lp) + 0.1 sum(H) above, the same gradients
    B = 4
    hb, ab, lb = (t.clone().requires_grad_(True) for t in (h.view(B, N // B, H), a.view(B, N // B, R), lw))
    loss_fn = fastalign.LinearPolicyLoss(loss_type="reinforce", agg="token-sum", entropy_coef=-0.1, single_pass=True)
    old_lp = torch.zeros(B, N // B, device="cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTALIGN_BLOCK_MIB", str(2 * 256 * V * 2 / 2 ** 20))
        loss, _ = loss_fn(hb, w, y.view(B, N // B), old_lp, -torch.ones(B, device="cuda"),
                          torch.ones(B, N // B, dtype=torch.bool, device="cuda"), low_rank=(ab, lb))
    loss.backward()
    assert _rel_err(ab.grad.view(N, R), ad.grad) < 5e-3
    assert _rel_err(lb.grad, ld.grad) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("compaction", ["1", "0"])
def test_gpu_softcapped_mean_logits_gradients_bf16_at_full_vocabulary(compaction, monkeypatch):
    """A softcapped head's mean logit (Gemma's cap of 30, logit_scale 2) and its gradients, half the rows outside
    the mask with NaN hidden states, blocks of 128 rows (the bounded products, or every row through cuBLAS):
    within bf16 rounding of float64."""
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", compaction)
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(128 * 151936 * 2 / 2 ** 20))
    N, H, V = 1024, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(6)
    h, w = _bf16_head(g, (N,), H, V)
    keep = torch.rand(N, device="cuda", generator=g) < 0.5
    h = h.masked_fill(~keep[:, None], float("nan"))
    weights = torch.randn(N, device="cuda", generator=g, dtype=torch.float64)
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = fastalign.linear_mean_logits(hg, wg, logit_scale=2.0, softcap=30.0, response_mask=keep)
    (got.double() * weights).sum().backward()
    hd, wd = h.double().nan_to_num(0.0).requires_grad_(True), w.double().requires_grad_(True)
    want = torch.where(keep, (30.0 * torch.tanh(2.0 * (hd @ wd.T) / 30.0)).mean(-1), 0.0)
    (want * weights).sum().backward()
    assert_close(got, want, atol=2e-3, what="mean logits")
    assert torch.isfinite(hg.grad).all() and not hg.grad[~keep].any()
    assert _rel_err(hg.grad, hd.grad) < 1e-2
    assert _rel_err(wg.grad, wd.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("compaction", ["1", "0"])
def test_gpu_soft_cross_entropy_bf16_at_full_vocabulary(compaction, monkeypatch):
    """Soft targets near the student's own distribution at a 151936 vocabulary, half the rows of weight 0 with NaN
    hidden states and targets, blocks of 64 rows (the bounded products, or every row through cuBLAS): the loss and
    the gradients within bf16 rounding of float64, the unweighted rows' gradients 0."""
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", compaction)
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(64 * 151936 * 16 / 2 ** 20))
    N, H, V = 512, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(7)
    h, w = _bf16_head(g, (N,), H, V)
    keep = torch.rand(N, device="cuda", generator=g) < 0.5
    q = torch.softmax((h.float() @ w.float().T) * 0.8 + torch.randn(N, V, device="cuda", generator=g), -1)
    h, q = h.masked_fill(~keep[:, None], float("nan")), q.masked_fill(~keep[:, None], float("nan"))
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = fastalign.linear_soft_cross_entropy(hg, wg, q, temperature=0.9, row_weights=keep)
    got.backward()
    hd, wd = h.double()[keep].requires_grad_(True), w.double().requires_grad_(True)
    want = -(q[keep].double() * torch.log_softmax(hd @ wd.T / 0.9, -1)).sum()
    want.backward()
    assert_close(got, want, atol=0, rtol=1e-4, what="loss")
    assert torch.isfinite(hg.grad).all() and not hg.grad[~keep].any()
    assert _rel_err(hg.grad[keep], hd.grad) < 1e-2
    assert _rel_err(wg.grad, wd.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(), dict(softcap=30.0, label_smoothing=0.1, lse_square_scale=1e-4),
                                     dict(label_smoothing=0.1, lse_square_scale=1e-4, weight="w")], ids=str)
def test_gpu_liger_cross_entropy_on_head_logits_bf16_at_full_vocabulary(options):
    """The Liger cross-entropy drop-in on a bf16 head's logits ``[1024, 151936]`` (an intermediate: the backward
    writes d(logits) over them; with smoothing, a z-loss or a softcap, in blocks of rows): the loss and the head's
    gradients within bf16 rounding of float64, and of Liger's kernel where it is installed."""
    from fastalign.integrations.liger import LigerCrossEntropyLoss

    N, H, V = 1024, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(8)
    h, w = _bf16_head(g, (N,), H, V)
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    target[: N // 4] = -100
    if options.get("weight") == "w":
        options = {**options, "weight": torch.rand(V, device="cuda", generator=g) + 0.5}

    def run(module, h, w):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = h @ w.T
        written = []
        logits.register_hook(lambda grad: written.append(grad.data_ptr() == logits.data_ptr()))
        loss = module(logits, target)
        loss.backward()
        return loss.detach().double(), h.grad, w.grad, written

    loss, dh, dw, written = run(LigerCrossEntropyLoss(**options), h, w)
    assert written == [True]
    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    z = hd @ wd.T
    cap, eps, s = options.get("softcap"), options.get("label_smoothing", 0.0), options.get("lse_square_scale", 0.0)
    z = z if cap is None else cap * torch.tanh(z / cap)
    c = options.get("weight", torch.ones(V, device="cuda")).double()
    keep, y = target != -100, target.clamp(min=0)
    lp = torch.log_softmax(z, -1)
    ce = (1 - eps) * -c[y] * lp.gather(1, y[:, None])[:, 0] - eps / V * (lp * c).sum(-1)
    want = (ce * keep).sum() / (c[y] * keep).sum() + s * (torch.logsumexp(z, -1) ** 2 * keep).sum() / keep.sum()
    want.backward()
    tol = 2e-3 * max(1.0, abs(float(want.detach())))
    assert abs(float(loss) - float(want.detach())) < tol
    assert _rel_err(dh, hd.grad) < 1e-2 and _rel_err(dw, wd.grad) < 1e-2
    liger = pytest.importorskip("liger_kernel.transformers.cross_entropy", reason="Liger-Kernel: the peer")
    peer_loss, peer_dh, peer_dw, _ = run(liger.LigerCrossEntropyLoss(**options), h, w)
    assert abs(float(loss) - float(peer_loss)) < tol
    assert _rel_err(dh, peer_dh.double()) < 2e-2 and _rel_err(dw, peer_dw.double()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["jsd", "kl", "tvd"])
def test_gpu_liger_elementwise_bf16_at_full_vocabulary(loss):
    """LigerJSD / LigerKLDIVLoss / LigerTVDLoss (fastalign.elementwise_divergence's Triton kernel) on bf16 ``[1024,
    151936]`` (log-)probabilities: the loss within bf16 rounding of float64, d(input) within bf16 rounding of its
    float64 value (element by element), and against Liger's own kernels where installed."""
    from fastalign.integrations import liger_elementwise as ours
    from fastalign.reference.divergence import elementwise_terms

    N, V = 1024, 151936
    g = torch.Generator(device="cuda").manual_seed(11)
    zx, zy = torch.randn(N, V, device="cuda", generator=g) * 3, torch.randn(N, V, device="cuda", generator=g) * 3
    x = (zx.softmax(-1) if loss == "tvd" else zx.log_softmax(-1)).bfloat16()
    y = (zy.log_softmax(-1) if loss == "jsd" else zy.softmax(-1)).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[: N // 4] = -100
    modules = {"jsd": ("LigerJSD", dict(beta=0.3)), "kl": ("LigerKLDIVLoss", dict(reduction="batchmean")),
               "tvd": ("LigerTVDLoss", dict(reduction="batchmean"))}
    name, options = modules[loss]
    rest = () if loss == "kl" else (labels,)
    leaf = x.clone().requires_grad_(True)
    out = getattr(ours, name)(**options)(leaf, y, *rest)
    out.backward()
    xd = x.double().requires_grad_(True)
    keep = torch.ones(N, device="cuda", dtype=torch.bool) if loss == "kl" else labels != -100
    terms = elementwise_terms(xd, y, divergence=loss, beta=0.3) * keep[:, None]
    want = terms.sum() / (N if loss == "kl" else keep.sum())
    want.backward()
    assert_close(out, want, atol=1e-5, rtol=8e-3, what=f"{name} loss")
    assert_close(leaf.grad, xd.grad, atol=1e-12, rtol=2 ** -8, what=f"{name} d(input)")
    liger = pytest.importorskip("liger_kernel.transformers", reason="Liger-Kernel: the peer")
    leaf_l = x.clone().requires_grad_(True)
    out_l = getattr(liger, name)(**options)(leaf_l, y, *rest)
    out_l.backward()
    # (Liger's TVD sums in bf16 arithmetic: its loss is the coarser of the two)
    assert_close(out, out_l, atol=1e-5, rtol=2e-2, what=f"{name} loss vs Liger")
    assert_close(leaf.grad, leaf_l.grad, atol=1e-12, rtol=2 ** -7, what=f"{name} d(input) vs Liger")


@pytest.mark.gpu
@pytest.mark.parametrize("divergence,beta", [("tvd", None), ("jsd", 0.5), ("jsd", 0.0)])
def test_gpu_token_divergence_bf16_at_full_vocabulary(divergence, beta):
    """token_divergence on bf16 logits ``[1024, 151936]`` (the Triton kernel: its forward keeps each row's state,
    its backward is one sweep written over the student's logits): D, the NLL and d(student) within bf16 rounding
    of float64, and the Liger drop-in LigerFusedCETVDLoss against Liger's kernel where it is installed."""
    N, V = 1024, 151936
    g = torch.Generator(device="cuda").manual_seed(9)
    zs, zt = _cuda_bf16(g, 3.0, N, V), _cuda_bf16(g, 3.0, N, V)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[: N // 4] = -100
    gd, gn = torch.rand(N, device="cuda", generator=g), torch.rand(N, device="cuda", generator=g)
    leaf = zs.clone().requires_grad_(True)
    x = leaf * 1.0
    out = fastalign.token_divergence(x, zt, y, divergence=divergence, beta=beta, inplace_backward=True)
    (out.divergence * gd + out.nll * gn).sum().backward()
    xd = zs.double().requires_grad_(True)
    keep = y != -100
    ls, lt = torch.log_softmax(xd, -1), torch.log_softmax(zt.double(), -1)
    if divergence == "tvd":
        d = 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
    elif beta == 0.0:
        d = (lt.exp() * (lt - ls)).sum(-1)
    else:
        lm = torch.logaddexp(ls + math.log(0.5), lt + math.log(0.5))
        d = 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)
    nll = -ls.gather(1, y.clamp(min=0)[:, None])[:, 0]
    d, nll = torch.where(keep, d, 0.0), torch.where(keep, nll, 0.0)
    (d * gd + nll * gn).sum().backward()
    assert_close(out.divergence, d, atol=1e-4, rtol=1e-3, what="divergence")
    assert_close(out.nll, nll, atol=1e-4, rtol=1e-4, what="nll")
    assert _rel_err(leaf.grad, xd.grad) < 1e-2
    if divergence != "tvd":
        return
    from fastalign.integrations.liger import LigerFusedCETVDLoss

    liger = pytest.importorskip("liger_kernel.transformers.fused_ce_tvd", reason="Liger-Kernel: the peer")
    grads = []
    for module in (LigerFusedCETVDLoss(), liger.LigerFusedCETVDLoss()):
        leaf = zs.clone().requires_grad_(True)
        ce, tvd = module(leaf * 1.0, zt, y)
        (ce * gn + tvd * gd).sum().backward()
        grads.append((ce.detach(), tvd.detach(), leaf.grad))
    (ce, tvd, dx), (ce_l, tvd_l, dx_l) = grads
    assert_close(ce, ce_l, atol=1e-3, rtol=1e-3, what="ce vs Liger")
    assert_close(tvd, tvd_l, atol=1e-3, rtol=1e-3, what="tvd vs Liger")
    assert _rel_err(dx.double(), dx_l.double()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_gpu_liger_grpo_on_logits_bf16_at_full_vocabulary(loss_type):
    """triton_grpo_loss on bf16 logits ``[8, 257, 151936]`` (written over by its backward) against Liger's kernel
    where it is installed: the loss, the metrics and d(logits) within bf16 rounding."""
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss", reason="Liger-Kernel: the peer")
    from fastalign.integrations.liger import triton_grpo_loss

    B, L, V = 8, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(10)
    base = _cuda_bf16(g, 2.0, B, L + 1, V)
    ids = torch.randint(0, V, (B, L), device="cuda", generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(base[:, :-1].float() / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.1 * torch.randn(B, L, device="cuda", generator=g)
    ref = lp + 0.2 * torch.randn(B, L, device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    mask = torch.ones(B, L, dtype=torch.int32, device="cuda")
    mask[:, -L // 4:] = 0
    results = []
    for fn in (triton_grpo_loss, liger.triton_grpo_loss):
        leaf = base.clone().requires_grad_(True)
        loss, metrics = fn(leaf * 1.0, old, ref, ids, adv, mask, loss_type=loss_type, reduce=True)
        loss.backward()
        results.append((loss.detach().double(), [m.detach().double() for m in metrics], leaf.grad.double()))
    (loss, metrics, dx), (loss_l, metrics_l, dx_l) = results
    assert abs(float(loss - loss_l)) < 2e-3 * max(1.0, abs(float(loss_l)))
    for m, m_l in zip(metrics, metrics_l):
        assert abs(float(m - m_l)) < 2e-3 * max(1.0, abs(float(m_l)))
    assert _rel_err(dx, dx_l) < 2e-2


@pytest.mark.gpu
def test_gpu_device_compaction_bf16_at_full_vocabulary(monkeypatch):
    """Half of every sequence an unscored prompt whose hidden states are NaN: the compiled bounded
    products (two passes with one chunk and with eight; LinearPolicyLoss's single pass) give the
    log-probs and gradients of every row through cuBLAS (FASTALIGN_DEVICE_COMPACTION=0) on the same
    batch with those rows zeroed."""
    B, T, H, V = 4, 256, 256, 151936
    g = torch.Generator(device="cuda").manual_seed(4)
    h, w = _bf16_head(g, (B, T), H, V)
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    y[:, : T // 2] = -100
    prompt = (y == -100)[..., None]
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    adv = torch.randn(B, device="cuda", generator=g)
    old = torch.full((B, T), -12.0, device="cuda")

    def two_pass(hidden, chunk):
        hg, wg = hidden.reshape(-1, H).clone().requires_grad_(True), w.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(hg, wg, y.reshape(-1), entropy=True, chunk=chunk)
        (st.logprobs.sum() + 0.1 * st.entropy.sum()).backward()
        return st.logprobs, hg.grad, wg.grad

    def single_pass(hidden):
        hg, wg = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = fastalign.LinearPolicyLoss(loss_type="grpo", entropy_coef=0.01, single_pass=True)(
            hg, wg, y, old, adv, mask)
        loss.backward()
        return loss.reshape(1), hg.grad, wg.grad

    poisoned, zeroed = h.masked_fill(prompt, float("nan")), h.masked_fill(prompt, 0.0)
    runs = [lambda x: two_pass(x, None), lambda x: two_pass(x, (128, V)), single_pass]
    for run in runs:
        got = run(poisoned)
        monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", "0")
        want = run(zeroed)
        monkeypatch.delenv("FASTALIGN_DEVICE_COMPACTION")
        assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
        assert _rel_err(got[0], want[0]) < 1e-3
        assert _rel_err(got[1], want[1]) < 1e-2
        assert _rel_err(got[2], want[2]) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_token_logprobs_matches_reference(dtype, backend):
    if backend == "cuda" and not fastalign._backend.cuda_kernels_available():
        pytest.skip("the CUDA C++ kernels were not compiled into this install")
    g = torch.Generator(device="cuda").manual_seed(1)
    z = (torch.randn(64, 151936, device="cuda", generator=g) * 4).to(dtype)
    y = torch.randint(0, 151936, (64,), device="cuda", generator=g)
    y[::7] = -100
    z[5, 9] = float("nan")
    x = z.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, y, entropy=True, sum_p2=True, argmax=True, backend=backend)
    (st.logprobs.nan_to_num() + st.entropy.nan_to_num()).sum().backward()
    lp, ent, sp2, amax = _ref_stats(z, y)
    assert_close(st.logprobs, lp, atol=5e-5, what="logprobs")
    assert_close(st.entropy, ent, atol=5e-5, what="entropy")
    assert torch.isnan(x.grad[5]).all() and torch.isfinite(x.grad[6]).all()


@pytest.mark.gpu
def test_gpu_paths_of_scan_group_cov_ops_match_the_cpu_kernels():
    """The Triton/torch (and, where compiled, CUDA) paths of returns/GAE, group advantages and Clip-Cov/KL-Cov
    selection on the GPU against the C++ CPU kernels on the same inputs."""
    from fastalign.ops import returns

    B, T = 64, 1000
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(B, T, device="cuda", generator=g)
    v = torch.randn(B, T, device="cuda", generator=g)
    m = (torch.rand(B, T, device="cuda", generator=g) > 0.2).float()
    backends = ["triton"] + (["cuda"] if fastalign._backend.cuda_kernels_available() else [])
    for backend in backends:
        for mode in (0, 1, 2):
            vv = v if mode == 2 else x.new_empty(0)
            a = returns.reverse_scan(x, vv, m, 0.99, 0.95, mode, backend)
            ref = returns.reverse_scan(x.cpu(), vv.cpu(), m.cpu(), 0.99, 0.95, mode, "cpp")
            for got, exp in zip(a, ref):
                assert_close(got.cpu(), exp, atol=1e-5, rtol=1e-5, what=f"{backend} scan mode {mode}")
    from fastalign.ops import cov_fallback, group_fallback, policy_loss as ops

    scores = torch.randn(256, device="cuda", generator=g)
    index = torch.randint(0, 40, (256,), device="cuda", generator=g)
    empty = torch.empty(0, device="cuda", dtype=torch.float64)
    for mode in range(4):
        got = group_fallback.group_advantage(scores, index, empty, empty, 1, mode, True, 1e-6, False)
        exp = group_fallback.group_advantage(scores.cpu(), index.cpu(), empty.cpu(), empty.cpu(), 1, mode, True,
                                             1e-6, False)
        assert_close(got.cpu(), exp, atol=1e-5, what=f"group advantages mode {mode}")
    lp, old, adv = (torch.randn(B, T, device="cuda", generator=g) for _ in range(3))
    mask8 = m.to(torch.uint8)
    sums = cov_fallback.cov_sums(lp, adv, mask8)
    seed = torch.tensor([42], device="cuda")
    for mode in (0, 1):
        args = (lp, old, adv, mask8, sums, sums[2:3].clone(), seed, mode, 0.01, -1.0, 5.0, 0.2, 0.28)
        got = cov_fallback.cov_select(*args)
        exp = ops.cov_select(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in args), "cpp")
        assert torch.equal(got.cpu(), exp), f"cov selection mode {mode}"


@pytest.mark.gpu
@pytest.mark.parametrize("gamma", [0.99, 1.0, 0.0])
def test_gpu_scans_with_non_finite_rewards_match_the_cpu_kernel(gamma):
    """inf and NaN rewards scattered beside masked tokens, rows longer than a block's threads: every mode of the
    GPU scans equals the C++ kernel, NaN for NaN. The reset return drops what follows a masked token (the CUDA
    blocked scan once multiplied it by the masked token's 0: NaN before the reset)."""
    from fastalign.ops import returns

    B, T = 16, 700
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) > 0.2).float()
    m[:, T // 2] = 0.0
    for b in range(B):
        x[b, torch.randint(0, T, (2,), generator=g)] = [math.inf, -math.inf, math.nan][b % 3]
    backends = ["triton"] + (["cuda"] if fastalign._backend.cuda_kernels_available() else [])
    for mode in (0, 1, 2):
        vv = v if mode == 2 else x.new_empty(0)
        want = returns.reverse_scan(x, vv, m, gamma, 0.95, mode, "cpp")
        for backend in backends:
            got = returns.reverse_scan(x.cuda(), vv.cuda(), m.cuda(), gamma, 0.95, mode, backend)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5, equal_nan=True,
                                           msg=lambda e: f"{backend} scan mode {mode}: {e}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_argmax_passes_over_a_nan_logit(backend):
    """A NaN logit in a row asked for its argmax: the index of the largest other logit, as on the CPU (compiled,
    Triton's argmax could keep the NaN's step and then the index of a masked lane past the row: V)."""
    if backend == "cuda" and not fastalign._backend.cuda_kernels_available():
        pytest.skip("the CUDA C++ kernels were not compiled into this install")
    z = torch.zeros(4, 16384, device="cuda")
    z[0, 0], z[0, 2048] = 10.0, float("nan")
    z[1, 5], z[1, 2053], z[1, 6149] = 10.0, float("nan"), 2.0
    z[2, 4000], z[2, 9] = float("nan"), 3.0
    z[3], z[3, 0] = float("-inf"), float("nan")  # no logit above -inf: 0, as the C++ kernels
    y = torch.tensor([1, 2, 3, 4], device="cuda")
    for V in (4096, 16384):
        st = fastalign.token_logprobs(z[:, :V].contiguous(), y, argmax=True, backend=backend)
        want = torch.where(torch.isnan(z[:, :V]), float("-inf"), z[:, :V]).argmax(-1)
        assert torch.equal(st.argmax, want), (V, st.argmax.tolist(), want.tolist())


@pytest.mark.gpu
def test_gpu_linear_logprobs_past_65535_token_blocks():
    """More token blocks than a grid's second axis holds (65535): 4.2M tokens in one call, every row's log-prob
    as plain PyTorch's (the launch failed with "invalid argument")."""
    N, H, V = 65536 * 128 + 7, 16, 32
    g = torch.Generator(device="cuda").manual_seed(8)
    h = torch.randn(N, H, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(V, H, device="cuda", generator=g, dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    st = fastalign.linear_logprobs(h, w, y, backend="triton")
    want = torch.log_softmax(h.float() @ w.float().T, -1).gather(-1, y[:, None])[:, 0]
    assert torch.isfinite(st.logprobs).all()
    assert_close(st.logprobs, want, atol=1e-4, rtol=1e-4, what="logprobs")


# ----------------------------------------------------------------------------- Triton paths of CUDA ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_reverse_scan_triton_matches_cpp(dtype, mode):
    """Returns / reward-to-go / GAE scanned in parallel across time (several blocks of 1024 tokens)."""
    from fastalign.ops.returns import reverse_scan

    g = torch.Generator().manual_seed(7)
    B, T = 3, 2500
    x = torch.randn(B, T, generator=g, dtype=dtype)
    v = torch.randn(B, T, generator=g, dtype=dtype)
    m = (torch.rand(B, T, generator=g) > 0.3).to(dtype)
    m[1] = 0  # an all-masked row
    vv = v if mode == 2 else x.new_empty(0)
    got = reverse_scan(x, vv, m, 0.99, 0.95, mode, "triton")
    exp = reverse_scan(x, vv, m, 0.99, 0.95, mode, "cpp")
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype
        assert_close(a, b, atol=tol, rtol=tol, what=f"scan mode {mode}")


def test_reverse_scan_triton_matches_reference_gae():
    from fastalign.ops.returns import reverse_scan

    g = torch.Generator().manual_seed(8)
    x, v = torch.randn(2, 40, generator=g, dtype=torch.float64), torch.randn(2, 40, generator=g, dtype=torch.float64)
    m = torch.ones(2, 40, dtype=torch.float64)
    m[0, 30:] = 0
    a, ret = reverse_scan(x, v, m, 0.9, 0.8, 2, "triton")
    from fastalign.reference.advantages import gae_advantages

    ra, rret = gae_advantages(x, v, m, gamma=0.9, lam=0.8, whiten=False)
    assert_close(a, ra, atol=1e-12, what="advantages")
    assert_close(ret, rret, atol=1e-12, what="returns")


@pytest.mark.parametrize("mode", [0, 1])
def test_cov_select_torch_path_matches_cpp_kernel(mode):
    """The on-device torch selection picks exactly the tokens of the C++ kernel (same keys)."""
    from fastalign.ops import cov_fallback, policy_loss as ops

    g = torch.Generator().manual_seed(9)
    B, T = 6, 300
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(torch.uint8)
    adv[0, 5] = float("nan")  # in a masked slot: never enters the sums or the selection
    mask[0, 5] = 0
    sums = ops.cov_sums(lp, adv, mask, "cpp")
    assert_close(cov_fallback.cov_sums(lp, adv, mask), sums, atol=1e-3, rtol=1e-6, what="sums")
    n_local = sums[2:3].clone()
    for seed in (0, 12345, 2 ** 61 + 7):
        s = torch.tensor([seed], dtype=torch.int64)
        args = (lp, old, adv, mask, sums, n_local, s, mode, 0.05, -1.0, 5.0, 0.2, 0.28)
        got = cov_fallback.cov_select(*args)
        exp = ops.cov_select(*args, "cpp")
        assert got.dtype == torch.uint8 and torch.equal(got, exp), (seed, int((got != exp).sum()))
    assert int(got.sum()) == (int(0.05 * float(n_local)) if mode == 1 else int(got.sum()))
    if mode == 1:
        means = (float(sums[0] / sums[2]), float(sums[1] / sums[2]))
        ref = reference.policy.cov_selection(lp, old, adv.nan_to_num(), mask,
                                             loss_type="kl_cov", eps_low=0.2, eps_high=0.28, ratio=0.05, lb=-1.0,
                                             ub=5.0, means=means)
        assert int((ref.to(torch.uint8) != got).sum()) == 0


def _cov_select_both(lp, old, adv, mask, mode, ratio, lb=-1.0, ub=5.0):
    """The torch path's and the C++ kernel's selections with global means 0 (cov_t = A_t lp_t)."""
    from fastalign.ops import cov_fallback, policy_loss as ops

    sums = torch.tensor([0.0, 0.0, float(mask.sum())])
    args = (lp, old, adv, mask, sums, sums[2:3].clone(), torch.tensor([7]), mode, ratio, lb, ub, 0.2, 0.28)
    return cov_fallback.cov_select(*args), ops.cov_select(*args, "cpp")


def test_cov_select_torch_path_edge_keys():
    """Edge keys of the on-device selection, against the float64 reference and the C++ kernel: Clip-Cov's
    bounds are strict (cov = lb or ub is no candidate), k is at least 1 when ratio * n < 1, KL-Cov ranks
    -0 and +0 as equal (the lower index first), and a token whose cov is NaN is never picked."""
    ref = lambda *a, **kw: reference.policy.cov_selection(  # noqa: E731
        *a, eps_low=0.2, eps_high=0.28, lb=-1.0, ub=5.0, means=(0.0, 0.0), **kw).to(torch.uint8)
    mask = torch.ones(1, 4, dtype=torch.uint8)
    # clip_cov, rho = 1 everywhere: covs -1 (= lb), 5 (= ub), -0.5 and 2; every candidate picked (ratio 1)
    lp = torch.tensor([[-1.0, -1.0, -0.5, -1.0]])
    adv = torch.tensor([[1.0, -5.0, 1.0, -2.0]])
    got, cpp = _cov_select_both(lp, lp, adv, mask, 0, 1.0)
    want = ref(lp, lp, adv, mask, loss_type="clip_cov", ratio=1.0)
    assert want.tolist() == [[0, 0, 1, 1]] and torch.equal(got, want) and torch.equal(cpp, want)
    # kl_cov: covs -0, +0, -1, -1; ratio * n = 0.2 still picks one token: the -0 at the lower index
    lp = torch.tensor([[-1.0, 1.0, -1.0, -1.0]])
    adv = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    got, cpp = _cov_select_both(lp, lp, adv, mask, 1, 0.05)
    want = ref(lp, lp, adv, mask, loss_type="kl_cov", ratio=0.05)
    assert want.tolist() == [[1, 0, 0, 0]] and torch.equal(got, want) and torch.equal(cpp, want)
    # kl_cov with a NaN cov (A = 0 at lp = -inf, a token the policy cannot produce): the largest real cov wins
    lp = torch.tensor([[float("-inf"), -1.0, -2.0, -3.0]])
    adv = torch.tensor([[0.0, -1.0, -1.0, -1.0]])
    for ratio, want in ((0.25, [[0, 0, 0, 1]]), (1.0, [[0, 1, 1, 1]])):
        got, cpp = _cov_select_both(lp, lp, adv, mask, 1, ratio)
        assert got.tolist() == want and torch.equal(cpp, got), ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_index", [False, True])
def test_group_ops_torch_path_matches_cpp(dtype, use_index):
    from fastalign.ops.group_stats import MODES, group_advantage, group_stats

    g = torch.Generator().manual_seed(10)
    B = 61
    scores = torch.randint(0, 3, (B,), generator=g).to(dtype) + torch.randn(B, generator=g, dtype=dtype) * (
        torch.rand(B, generator=g) > 0.5)
    scores[7] = float("nan")
    scores[20:24] = 1.0  # a group of equal scores
    index = torch.randint(0, 9, (B,), generator=g) * 1000 - 4000 if use_index else torch.empty(0, dtype=torch.int64)
    if use_index:
        index[40] = 777  # a group of one
    lengths = torch.rand(B, generator=g, dtype=torch.float64) * 100
    gs = 4
    gid_t, st_t, ng_t = group_stats(scores, index, lengths, gs, "triton")
    gid_c, st_c, ng_c = group_stats(scores, index, lengths, gs, "cpp")
    assert int(ng_t) == int(ng_c)
    # dense ids may be numbered differently (CPU: first appearance; device: key order): compare by member
    finite = lambda t: t.nan_to_num(neginf=-1e300)  # noqa: E731  (max / second of a group of one: -inf)
    assert_close(finite(st_t[gid_t]), finite(st_c[gid_c]), atol=1e-12, rtol=1e-12, what="stats of each member's group")
    scale = torch.tensor([0.5], dtype=torch.float64)
    for mode in MODES.values():
        for div_std, singleton_zero in ((True, False), (False, True)):
            args = (scores, index, lengths, scale, gs, mode, div_std, 1e-6, singleton_zero)
            assert_close(group_advantage(*args, "triton"), group_advantage(*args, "cpp"), atol=1e-5 if
                         dtype == torch.float32 else 1e-12, rtol=1e-6, what=f"advantages mode {mode}")


@pytest.mark.parametrize("magnitude", [2e154, 1e300, 1.7e308])
@pytest.mark.parametrize("use_index", [False, True])
def test_group_fallback_near_the_double_range(magnitude, use_index):
    """The on-device path scales each group by a power of two before its sums, as the C++ kernel
    does where they would overflow: same advantages, all finite."""
    from fastalign.ops.group_stats import MODES, group_advantage

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(16, generator=g, dtype=torch.float64) * magnitude * 0.9
    scores[4:8] *= -1
    scores[9] = float("nan")
    index = torch.arange(4).repeat_interleave(4) * 7 - 5 if use_index else torch.empty(0, dtype=torch.int64)
    lengths = torch.rand(16, generator=g, dtype=torch.float64) * 10 + 1
    scale = torch.empty(0, dtype=torch.float64)
    for mode in MODES.values():
        args = (scores, index, lengths, scale, 4, mode, True, 1e-6, False)
        got, want = group_advantage(*args, "triton"), group_advantage(*args, "cpp")
        assert torch.isfinite(got).all(), mode
        assert_close(got, want, atol=1e-12, rtol=1e-12, what=f"mode {mode}")


def test_group_fallback_pairs_and_equal_scores():
    """The on-device path on two edge groups, against float64 formulas written here: a group of two
    distinct scores has the unbiased std |a - b| / sqrt(2) (n - 1 = 1, not 0), and OPO of equal scores
    is exactly 0 whatever the lengths (the length-weighted mean of equal scores is the score itself,
    not a sum rounded to a neighbour of it)."""
    from fastalign.ops.group_stats import MODES, group_advantage

    no_scale = torch.empty(0, dtype=torch.float64)
    scores = torch.tensor([1.0, 4.0, -2.0, 0.5], dtype=torch.float64)
    index = torch.tensor([3, 3, 8, 8])
    ones = torch.ones(4, dtype=torch.float64)
    x = scores.view(2, 2)
    mean, std = x.mean(1, keepdim=True), (x[:, :1] - x[:, 1:]).abs() / math.sqrt(2.0)
    want = ((x - mean) / (std + 1e-6)).reshape(-1)
    got = group_advantage(scores, index, ones, no_scale, 2, MODES["center"], True, 1e-6, False, "triton")
    assert_close(got, want, atol=1e-12, rtol=1e-12, what="groups of two")

    equal = torch.full((4,), 0.1, dtype=torch.float64)
    lengths = torch.tensor([1.0, 2.0, 3.0, 7.0], dtype=torch.float64)
    got = group_advantage(equal, torch.empty(0, dtype=torch.int64), lengths, no_scale, 4, MODES["opo"], True, 1e-6,
                          False, "triton")
    assert torch.equal(got, torch.zeros_like(got)), got.tolist()


def test_cuda_kernels_available_reports_the_build(monkeypatch):
    from fastalign import _backend

    assert isinstance(_backend.cuda_kernels_available(), bool)
    cpu = torch.device("cpu")
    assert _backend.backend_for("reverse_scan", cpu, "cpp") == "cpp"
    assert _backend.backend_for("reverse_scan", cpu, "triton") == "triton"
    for usable, expected in ((True, "cuda"), (False, "triton")):
        monkeypatch.setattr(_backend, "cuda_kernels_usable", lambda device, usable=usable: usable)
        assert _backend.backend_for("reverse_scan", torch.device("cuda", 0), "cuda") == expected


def test_token_logprobs_extreme_finite_logits():
    """Logits near the fp32 limit next to -inf ones: finite, exact statistics (no inf * 0)."""
    z = torch.full((2, 8), float("-inf"))
    z[0, :3] = torch.tensor([3e38, 3e38, 2.9e38])
    z[1, :2] = torch.tensor([-3e38, -2.9e38])
    y = torch.tensor([0, 1])
    st = fastalign.token_logprobs(z, y, entropy=True, sum_p2=True, backend=TRITON)
    assert_close(st.logprobs, torch.tensor([-math.log(2.0), 0.0]), atol=1e-6, what="logprobs")
    assert_close(st.entropy, torch.tensor([math.log(2.0), 0.0]), atol=1e-6, what="entropy")


def test_bench_models_at_the_realistic_shapes():
    from fastalign.bench.cases.linear_logprobs import flop_model
    from fastalign.bench.cases.token_logprobs import traffic_model

    t = traffic_model(8192, 151936, 2)
    assert t["fwd_bytes"] == 8192 * 151936 * 2 and t["fwd+bwd_bytes"] == 3 * t["fwd_bytes"]
    f = flop_model(8192, 4096, 151936)
    assert f["fwd_flops"] == 2 * 8192 * 4096 * 151936 and f["fwd+bwd_flops"] == 3 * f["fwd_flops"]
    assert "% limit" in t["model"] and "% limit" in f["model"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_run_on_their_tensors_device_not_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current (a process that never called torch.cuda.set_device): the kernels
    launch on cuda:1, on its stream, and give the CPU kernels' results (they launched on the current device)."""
    if backend == "cuda" and not fastalign._backend.cuda_kernels_available():
        pytest.skip("the CUDA C++ kernels were not compiled into this install")
    g = torch.Generator().manual_seed(11)
    z, y = torch.randn(64, 1000, generator=g), torch.randint(0, 1000, (64,), generator=g)
    h, w = torch.randn(64, 32, generator=g), torch.randn(1000, 32, generator=g)
    r, v, m = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g), torch.ones(4, 50)
    scores, index = torch.randn(8, generator=g), torch.arange(8) // 4
    old, a = torch.randn(2, 32, generator=g) - 7.0, torch.randn(2, 32, generator=g)

    def run(device, backend):
        on = [t.to(device) for t in (z, y, h, w, r, v, m, scores, index, old, a)]
        zd, yd, hd, wd, rd, vd, md, sd, idd, oldd, ad = on
        st = fastalign.token_logprobs(zd, yd, entropy=True, argmax=True, backend=backend)
        lin = fastalign.linear_logprobs(hd, wd, yd, entropy=True, backend=backend)
        adv = fastalign.gae_advantages(rd, vd, md, gamma=0.99, lam=0.95, backend=backend)
        grp = fastalign.group_advantages(sd, idd, backend=backend)
        # the single pass (its blocks' backward runs outside the custom ops) and the two passes' backward
        hp = hd.view(2, 32, 32).clone().requires_grad_(True)
        grads = []
        for single_pass in (True, False):
            loss, _ = fastalign.LinearPolicyLoss(single_pass=single_pass, backend=backend)(
                hp, wd, yd.view(2, 32), oldd, ad, torch.ones_like(ad))
            grads.append(torch.autograd.grad(loss, hp)[0])
        return [t.cpu() for t in (st.logprobs, st.entropy, st.argmax, lin.logprobs, lin.entropy, *adv, grp, *grads)]

    assert torch.cuda.current_device() == 0
    got = run(torch.device("cuda", 1), backend)
    torch.cuda.synchronize(1)
    for a, b in zip(got, run(torch.device("cpu"), "cpp")):
        assert_close(a.double(), b.double(), atol=1e-4, what="cuda:1 against the CPU")

