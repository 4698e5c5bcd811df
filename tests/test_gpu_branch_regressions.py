"""Regressions of code paths that run on a GPU, forced on CPU tensors by the predicate that picks them:
``_validate.flag_or_raise`` (inputs not read on the host), ``linear_divergence.block_buffer`` /
``scored_order`` (the GPU's buffer dtype and row order), the torch version gate of ``matmul_into``'s cuBLAS
call, and the plain-torch group statistics of CUDA tensors without the CUDA kernels.

Expected values come from float64 plain PyTorch written here, never from fastalign."""
import pytest
import torch

import fastalign as fa
from fastalign import _validate
from fastalign.ops import linear_block, linear_cpu
from fastalign.ops import linear_divergence as LD
from fastalign.ops.device_compaction import compact


@pytest.fixture
def off_host(monkeypatch):
    """The branch a CUDA tensor takes: the malformed-input flag is returned, not read on the host."""
    monkeypatch.setattr(_validate, "flag_or_raise", lambda bad, x, message: bad)


def _nan_reaches(grad):
    """NaN reaches the input (and through it every parameter upstream): old code gave exactly 0 here."""
    return grad is not None and bool(torch.isnan(grad).any())


# ----------------------------------------------------------------------------- NaN gradients off the host
@pytest.mark.parametrize("packing", [
    dict(cu_seqlens=torch.tensor([0, 4, 2])),                                     # decreasing offsets
    dict(position_ids=torch.tensor([0, 1, 2, 0, 1, 2]), num_sequences=3),          # 2 starts, not 3
    dict(ld_alpha=0.5, ld_lengths=torch.tensor([float("nan"), 1.0]), shape=(2, 3)),  # NaN length
])
def test_malformed_packing_off_the_host_gives_nan_gradients(off_host, packing):
    """A NaN sum from an input not read on the host carries NaN gradients (a finiteness check or a GradScaler
    skips the step), never exactly-zero ones that let the optimizer step on nothing."""
    packing = dict(packing)
    lp = (-torch.rand(packing.pop("shape", (6,)), dtype=torch.float64)).requires_grad_()
    s = fa.sequence_logprobs(lp, **packing).sum
    assert torch.isnan(s).all()
    (g,) = torch.autograd.grad(-torch.nn.functional.logsigmoid(0.1 * (s[0] - s[1])), lp)
    assert _nan_reaches(g)


def test_malformed_cu_seqlens_under_tracing_gives_nan_gradients():
    """The same under torch.compile, where the offsets are not read on the host either."""
    seq = torch.compile(lambda x, cu: fa.sequence_logprobs(x, cu_seqlens=cu).sum, fullgraph=True,
                        backend="aot_eager")
    lp = torch.ones(6, requires_grad=True)
    (good,) = torch.autograd.grad(seq(lp, torch.tensor([0, 2, 6])).sum(), lp)
    assert torch.equal(good, torch.ones(6))
    (bad,) = torch.autograd.grad(seq(lp, torch.tensor([0, 4, 2])).sum(), lp)
    assert _nan_reaches(bad)


def _body_grads(model, **kw):
    from fastalign.integrations.hf import causal_lm_logprobs
    model.zero_grad(set_to_none=True)
    stats = causal_lm_logprobs(model, torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(1)),
                               **kw)
    assert torch.isnan(stats.logprobs).any()
    (-stats.logprobs.sum()).backward()
    return [p.grad for p in model.model.parameters() if p.grad is not None]


def test_hf_malformed_cu_seqlens_off_the_host_gives_nan_gradients(off_host):
    """causal_lm_logprobs with a malformed cu_seqlens not read on the host: NaN reaches every body parameter."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   attn_implementation="eager")
    grads = _body_grads(transformers.LlamaForCausalLM(cfg).float(), cu_seqlens=torch.tensor([0, 7, 4]))
    assert grads and all(torch.isnan(g).any() for g in grads)


def test_hf_unsplit_packed_rows_off_the_host_give_nan_gradients(off_host):
    """Packed rows a body does not split (OPT), not read on the host: NaN gradients reach the body, not zeros."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    grads = _body_grads(transformers.OPTForCausalLM(cfg).float(),
                        position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]))
    assert grads and all(torch.isnan(g).any() for g in grads)


# ----------------------------------------------------------------------------- distillation, mixed dtypes
def _gpu_block_buffer(rows, vocab, like):
    """linear_block.block_buffer's CUDA rule: the dtype of ``like``."""
    return torch.empty(rows * vocab, dtype=like.dtype, device=like.device)


def _gpu_scored_order(mask):
    """device_compaction.scored_order's CUDA rule: scored rows first, counted on the device."""
    cmp = compact(torch.where(mask != 0, 0, -1), -1)
    return cmp.order, cmp


def _cpu_order_without_compaction(mask):
    """The CUDA rule with device compaction off (FASTALIGN_DEVICE_COMPACTION=0): no device count."""
    keep = mask != 0
    return (None if bool(keep.all()) else keep.nonzero().squeeze(1)), None


@pytest.mark.parametrize("order", [_gpu_scored_order, _cpu_order_without_compaction], ids=["compaction", "plain"])
def test_distillation_of_a_bf16_student_from_an_fp32_teacher_on_the_gpu_path(monkeypatch, order):
    """The teacher's logits are not rounded to the student's dtype (nor written into a buffer of it, which
    raised without device compaction): the GPU path gives the CPU path's fp32 loss and gradient."""
    monkeypatch.setattr(LD, "block_buffer", _gpu_block_buffer)
    monkeypatch.setattr(linear_block, "scored_order", order)
    g = torch.Generator().manual_seed(0)
    N, H, V = 8, 32, 64
    hs = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(V, H, generator=g) * 0.5).bfloat16()
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 1.5  # teacher logits ~10
    bt = torch.randn(V, generator=g)
    loss, _ = fa.linear_divergence_loss(hs, ws, ht, wt, teacher_bias=bt, beta=0.0, backend="triton")
    (dh,) = torch.autograd.grad(loss, hs)

    h64 = hs.detach().double().requires_grad_()
    lps = (h64 @ ws.double().T).log_softmax(-1)
    lpt = (ht.double() @ wt.double().T + bt.double()).log_softmax(-1)
    ref = (lpt.exp() * (lpt - lps)).sum(-1).mean()
    (dref,) = torch.autograd.grad(ref, h64)
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    torch.testing.assert_close(dh.double(), dref, atol=2e-3, rtol=1e-2)


# ----------------------------------------------------------------------------- matmul_into on older torch
@pytest.mark.parametrize("version,supported", [("2.4.1", False), ("2.8.0+cu128", False), ("2.9.1", False),
                                               ("2.10.0", True), ("2.10.0a0+git1234", True), ("2.13.0+cpu", True),
                                               ("3.0.0", True)])
def test_addmm_out_dtype_needs_torch_2_10(version, supported):
    """cuBLAS addmm with ``out_dtype`` and an fp32 ``self`` is taken from torch 2.10 (pytorch PR #167931)."""
    assert linear_cpu.out_dtype_addmm_supported(version) is supported


@pytest.mark.parametrize("accumulate", [False, True])
def test_upcast_matmul_fallback_gives_the_fp32_product(monkeypatch, accumulate):
    """The fallback of torch without that call: fp32 copies of a slice of the shared dimension at a time
    (forced to several slices here) give the fp32 product of the bf16 operands."""
    monkeypatch.setattr(linear_cpu, "UPCAST_ELEMS", 3 * (5 + 7))  # 3 columns of the shared dimension per slice
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 10, generator=g).bfloat16(), torch.randn(10, 7, generator=g).bfloat16()
    out = torch.randn(5, 7, generator=g)
    ref = a.double() @ b.double() + (out.double() if accumulate else 0.0)
    out[:] = out if accumulate else float("nan")  # a product that does not accumulate overwrites junk
    linear_cpu.upcast_matmul_into(out, a, b, accumulate)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------- group statistics fallback
def test_group_fallback_subnormal_scores_with_eps_0_stay_finite():
    """Subnormal rewards with eps=0: the plain-torch path (CUDA tensors without the CUDA kernels; backend
    "triton" on the CPU) sums them as they are, as the C++ kernel does: a std that underflows to 0 divides by
    1, never a scaled-up std whose inverse is infinite."""
    r = torch.tensor([1e-310, 0.0], dtype=torch.float64)
    x = r.clone()
    ref = x - x.sum() / 2  # float64: (x - mean), the std underflowing to 0 (std + eps = 0 divides by 1)
    for backend in ("cpp", "triton"):
        a = fa.group_advantages(r, index=torch.tensor([0, 0]), estimator="grpo", eps=0.0, backend=backend)
        assert torch.isfinite(a).all(), (backend, a.tolist())
        torch.testing.assert_close(a, ref, atol=1e-323, rtol=1e-12)


# ----------------------------------------------------------------------------- scalar arguments as a GPU types them
class _GpuTypedKernel:
    """A Triton kernel whose float arguments arrive as a compiled launch passes them: fp32 unless the parameter is
    annotated ``tl.float64`` (the interpreter passes the Python double through, so no CPU run saw the rounding)."""

    def __init__(self, kernel):
        import inspect

        import triton.language as tl

        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters.values()
        self.fp64 = [p.annotation is tl.float64 for p in params]

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            typed = [a if not isinstance(a, float) or fp64 else float(torch.tensor(a, dtype=torch.float32))
                     for a, fp64 in zip(args, self.fp64)]
            return launch(*typed, **kwargs)
        return call


@pytest.fixture
def gpu_typed(monkeypatch):
    """``gpu_typed(module, "kernel_name")``: the module's kernel launched with a GPU's scalar types."""
    pytest.importorskip("triton")

    def wrap(module, name):
        monkeypatch.setattr(module, name, _GpuTypedKernel(getattr(module, name)))
    return wrap


@pytest.mark.parametrize("mode", ["to_go", "gae"])
def test_reverse_scan_reads_gamma_and_lam_in_fp64_as_a_gpu_passes_them(gpu_typed, mode):
    """A compiled launch typed gamma and lam fp32, so the scan's fp64 math used gamma = 0.999 rounded (a relative
    error of 8e-6 over 4,096 tokens in the returns-to-go, where the C++ scan's is 1e-15): they are fp64 now."""
    from fastalign.kernels import reverse_scan as rs

    gpu_typed(rs, "reverse_scan_kernel")
    gamma, lam, T = 0.999, 0.95, 4096
    r = torch.rand(2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = torch.ones(2, T)
    v = torch.rand(2, T, dtype=torch.float64)
    if mode == "gae":
        got, _ = fa.gae_advantages(r, v, m, gamma=gamma, lam=lam, whiten=False, backend="triton")
        a, want = 0.0, torch.empty_like(r)
        for t in reversed(range(T)):  # A_t = r_t + gamma V_{t+1} - V_t + gamma lam A_{t+1}, both rows at once
            nv = v[:, t + 1] if t + 1 < T else torch.zeros(2, dtype=torch.float64)
            a = r[:, t] + gamma * nv - v[:, t] + gamma * lam * a
            want[:, t] = a
    else:
        got = fa.reinforce_pp_advantages(r, m, gamma=gamma, whiten=False, backend="triton")
        run, want = 0.0, torch.empty_like(r)
        for t in reversed(range(T)):
            run = r[:, t] + gamma * run
            want[:, t] = run
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_jsd_near_beta_1_keeps_1_minus_beta_as_a_gpu_passes_it(gpu_typed):
    """The Triton divergence kernel formed 1 - beta from beta, which a compiled launch rounds to fp32: at
    beta = 1 - 1e-9 that is 0 and the JSD's gradient vanished (the C++ kernel takes 1 - beta from the double);
    the launcher passes 1 - beta from the double now."""
    import math

    from fastalign.kernels import divergence as kd

    gpu_typed(kd, "divergence_rows_kernel")
    beta = 1 - 1e-9
    g = torch.Generator().manual_seed(0)
    zs, zt = 2 * torch.randn(3, 64, generator=g), 2 * torch.randn(3, 64, generator=g)
    x = zs.clone().requires_grad_()
    fa.token_divergence(x, zt, divergence="jsd", beta=beta, backend="triton").divergence.sum().backward()
    ref_x = zs.double().requires_grad_()
    lps, lpt = ref_x.log_softmax(-1), zt.double().log_softmax(-1)
    lm = torch.logsumexp(torch.stack([lps + math.log1p(-beta), lpt + math.log(beta)]), 0)
    (beta * lpt.exp() * (lpt - lm) + (1 - beta) * lps.exp() * (lps - lm)).sum().backward()
    err = (x.grad.double() - ref_x.grad).abs().max() / ref_x.grad.abs().max()
    assert err < 1e-3, err.item()
