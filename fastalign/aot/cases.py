"""The launches the gate compiles: per kernel family, a generator of ``(variant, launch)`` on ``meta``
tensors at realistic shapes (:data:`FAMILIES`)."""
from __future__ import annotations

import contextlib
import os

N_TOKENS, VOCAB, HIDDEN = 8192, 151936, 4096
LORA_RANK = 16  # a LoRA adapter on the lm_head
SEQ_B, SEQ_T = 1024, 4096


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


def _variant(**flags) -> str:
    on = [k for k, v in flags.items() if v]
    return "+".join(on) if on else "plain"


def token_stats_cases(dtype):
    """Every set of statistics a caller may request: a forward per subset of (entropy, sum_p2, argmax), a
    backward per non-empty subset of the gradients (g_lp, g_ent, g_sp2) of the outputs in the loss."""
    import itertools

    import torch

    from fastalign.kernels import token_stats as K

    z = _meta(1, N_TOKENS, VOCAB, dtype=dtype)
    y = _meta(N_TOKENS, dtype=torch.int64)
    f = lambda on=True: _meta(N_TOKENS, dtype=torch.float32) if on else None  # noqa: E731
    for ent, sp2, amax in itertools.product((False, True), repeat=3):
        yield _variant(entropy=ent, sum_p2=sp2, argmax=amax), lambda ent=ent, sp2=sp2, amax=amax: \
            K.token_stats_forward(z, y, 1.0, -100, f(), f(ent), f(sp2),
                                  _meta(N_TOKENS, dtype=torch.int64) if amax else None, f(), f())
    for g_lp, g_ent, g_sp2 in itertools.product((True, False), repeat=3):
        if not (g_lp or g_ent or g_sp2):
            continue
        yield _variant(g_lp=g_lp, g_ent=g_ent, g_sp2=g_sp2), lambda g_lp=g_lp, g_ent=g_ent, g_sp2=g_sp2: \
            K.token_stats_backward(z, y, 1.0, -100, f(), f(g_ent), f(g_sp2), f(g_lp), f(g_ent), f(g_sp2),
                                   torch.empty_like(z), f())


@contextlib.contextmanager
def _fp32_matmul(choice: str):
    """The launchers' fp32 product precision option, ``FASTALIGN_FP32_MATMUL``, set to ``choice`` during a launch."""
    previous = os.environ.get("FASTALIGN_FP32_MATMUL")
    os.environ["FASTALIGN_FP32_MATMUL"] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FASTALIGN_FP32_MATMUL"]
        else:
            os.environ["FASTALIGN_FP32_MATMUL"] = previous


def linear_stats_cases(dtype):
    """The flag combinations the ops launch: a forward per requested statistic and head extra (bias, softcap,
    a LoRA adapter) and backward chunks per set of output gradients; fp32 heads with TF32 and with full fp32
    (``ieee``) products."""
    import torch

    from fastalign.kernels import linear_stats as K
    from fastalign.ops._launch import linear_outputs
    from fastalign.ops.linear_triton import gpu_chunk_tokens
    from fastalign.ops.vocab_pieces import RENORMALISE_ABOVE

    h = _meta(N_TOKENS, HIDDEN, dtype=dtype)
    w = _meta(VOCAB, HIDDEN, dtype=dtype)
    y = _meta(N_TOKENS, dtype=torch.int64)
    b = _meta(VOCAB, dtype=dtype)
    lora = (_meta(N_TOKENS, LORA_RANK, dtype=dtype), _meta(VOCAB, LORA_RANK, dtype=dtype))
    chunk = gpu_chunk_tokens(N_TOKENS, VOCAB, h.element_size())
    f = lambda on=True, n=N_TOKENS: _meta(n, dtype=torch.float32) if on else None  # noqa: E731
    head = dict(bias=True, softcap=True, low_rank=True)

    def forward(entropy=False, sum_p2=False, argmax=False, mean_logit=False, bias=False, softcap=False, low_rank=False,
                ieee=False):
        out = linear_outputs(N_TOKENS, "meta", entropy, sum_p2, argmax, mean_logit)
        with _fp32_matmul("ieee" if ieee else "tf32"):
            K.linear_stats_forward(h, w, b if bias else None, lora if low_rank else None, y, 1.0,
                                   30.0 if softcap else 0.0, 1.0, -100, out, RENORMALISE_ABOVE)

    def backward(g_lp=False, g_ent=False, g_sp2=False, g_mean=False, bias=False, softcap=False, low_rank=False,
                 skip=False, bias_grad=False, ieee=False):
        c = lambda on=True: f(on, chunk)  # noqa: E731
        with _fp32_matmul("ieee" if ieee else "tf32"):
            K.linear_stats_backward(
                h[:chunk], w, b if bias else None, (lora[0][:chunk], lora[1]) if low_rank else None, y[:chunk], c(),
                c(g_ent), c(g_sp2), c(g_lp), c(g_ent), c(g_sp2), 1.0, 30.0 if softcap else 0.0, 1.0, -100,
                1e-6 if skip else 0.0, _meta(chunk, VOCAB, dtype=dtype), c(),
                _meta(VOCAB, dtype=torch.float32) if bias_grad else None, c(g_mean))

    forwards = [{}, dict(entropy=True), dict(sum_p2=True), dict(argmax=True), dict(mean_logit=True, softcap=True),
                dict(bias=True), dict(bias=True, softcap=True), dict(low_rank=True),
                dict(entropy=True, sum_p2=True, argmax=True, mean_logit=True, **head)]
    backwards = [dict(g_lp=True), dict(g_lp=True, g_ent=True), dict(g_ent=True),
                 dict(g_lp=True, g_mean=True, softcap=True),
                 dict(g_lp=True, g_ent=True, g_sp2=True, g_mean=True, skip=True, bias_grad=True, **head)]
    if dtype == torch.float32:
        forwards.append(dict(ieee=True))
        backwards.append(dict(g_lp=True, ieee=True))
    for flags in forwards:
        yield _variant(**flags), lambda flags=flags: forward(**flags)
    for flags in backwards:
        yield _variant(**flags), lambda flags=flags: backward(**flags)


def policy_loss_cases(dtype):
    """Every loss row, then one case with every optional input: launch keywords come from
    :class:`fastalign.PolicyConfig`, as the op builds them."""
    import torch

    from fastalign.kernels import policy_loss as K
    from fastalign.ops.policy_loss import ROW_COLS
    from fastalign.policy_config import PolicyConfig

    B, T = SEQ_B, SEQ_T
    t = lambda: _meta(B, T, dtype=torch.float32)  # noqa: E731
    u8 = lambda: _meta(B, T, dtype=torch.uint8)  # noqa: E731
    row = lambda: _meta(B, len(ROW_COLS), dtype=torch.float32)  # noqa: E731

    def launch(cfg, full):
        kw = cfg.kernel_params(entropy_in_kernel=full)._asdict()
        opt = (t(), t(), t(), t(), t(), u8()) if full else (None,) * 6  # ref, ent, roll, keep, iw, sel
        return lambda: K.policy_loss_forward(t(), t(), t(), u8(), *opt, row(), t(), **kw)

    row_options = {"dppo_tv": dict(delta=20.0), "dppo_kl": dict(delta=20.0), "dro": dict(dro_beta=0.1)}
    for loss_type in ("ppo", "gspo", "cispo", "sapo", "reinforce", "gmpo", "clip_cov", "kl_cov", "vespo", "dppo_tv",
                      "dppo_kl", "dro"):
        yield loss_type, launch(PolicyConfig(loss_type=loss_type, **row_options.get(loss_type, {})), False)
    full = PolicyConfig(loss_type="ppo", eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_type="k3", kl_rho="grad",
                        entropy_coef=0.01, rollout_correction="sequence_truncate", offpolicy_threshold=0.5,
                        importance_sampling_level="sequence")
    yield "ppo+kl3+ent+roll+seq", launch(full, True)


def scan_cases(dtype):
    """The reverse scan of returns and GAE (the ops with a CUDA C++ kernel too)."""
    from fastalign.kernels import reverse_scan as K

    yield from K.aot_cases(dtype)


def divergence_cases(dtype):
    """The distillation divergence rows: a GPU block of student and teacher logits in the input dtype, each
    divergence (forward KL, reverse KL, generalized JSD, cosine, TVD; the kernel's mode as the op picks it),
    without gradients, and with them: without labels, with labels, and with the hard loss; token_divergence's
    forward (the row state kept) and its backward (the gradient sweep from the state)."""
    import torch

    from fastalign.kernels import divergence as K
    from fastalign.ops.divergence import divergence_mode

    rows = 2048
    zs, zt = _meta(rows, VOCAB, dtype=dtype), _meta(rows, VOCAB, dtype=dtype)
    f = lambda: _meta(rows, dtype=torch.float32)  # noqa: E731
    y = _meta(rows, dtype=torch.int64)
    for divergence, beta, kind in (("jsd", 0.0, "fkl"), ("jsd", 1.0, "rkl"), ("jsd", 0.5, "jsd"),
                                   ("cosine", 0.5, "cosine"), ("tvd", 0.5, "tvd")):
        mode = divergence_mode(divergence, beta)
        yield kind, lambda mode=mode, beta=beta: K.divergence_rows(zs, zt, 1.0, mode, beta, None, None, -100, None,
                                                                   None, f(), f(), None)
        # token_divergence: its forward keeps each row's state (without labels, or with them and their mask); its
        # backward is the gradient sweep from that state (without labels or a mask, with the mask, with the hard loss)
        state = _meta(rows, K.STATE_COLS.value, dtype=torch.float32)
        for labels in (False, True):
            yield kind + "+state" + ("+labels+mask" if labels else ""), lambda mode=mode, beta=beta, labels=labels: \
                K.divergence_rows(zs, zt, 1.0, mode, beta, f() if labels else None, y if labels else None, -100, None,
                                  None, f(), f(), f() if labels else None, state)
        for mask, hard in ((False, False), (True, False), (True, True)):
            name = kind + "+grad+state" + ("+hard" if hard else "") + ("+mask" if mask else "")
            yield name, lambda mode=mode, beta=beta, mask=mask, hard=hard: K.divergence_rows(
                zs, zt, 1.0, mode, beta, f() if mask else None, y if hard else None, -100, f(), f() if hard else None,
                f(), f(), None, state, True)
        # no labels (plain distillation), labels as the nll metric only, or the weighted hard loss too
        for labels, hard in ((False, False), (True, False), (True, True)):
            name = kind + "+grad" + ("+hard" if hard else "+labels" if labels else "") + "+mask"
            yield name, lambda mode=mode, beta=beta, labels=labels, hard=hard: K.divergence_rows(
                zs, zt, 1.0, mode, beta, f(), y if labels else None, -100, f(), f() if hard else None, f(), f(),
                f() if labels else None)


def elementwise_divergence_cases(dtype):
    """The divergences between given (log-)probabilities: every mode, forward and gradient."""
    from fastalign.kernels import elementwise_divergence as K

    yield from K.aot_cases(dtype)


def kl_penalty_cases(dtype):
    """The per-token KL estimate of ``kl_penalty``'s eager CUDA calls, forward and gradient."""
    from fastalign.kernels import kl_penalty as K

    yield from K.aot_cases(dtype)


def masked_whiten_cases(dtype):
    """The three passes of ``masked_whiten``'s eager CUDA calls (float64 sums), unbiased and biased."""
    from fastalign.kernels import masked_whiten as K

    yield from K.aot_cases(dtype)


def live_matmul_cases(dtype):
    """The LM-head products bounded by the count of labelled rows (device compaction)."""
    from fastalign.kernels import live_matmul as K

    yield from K.aot_cases(dtype)


#: (family, case generator, dtypes it runs for)
FAMILIES = [
    ("token_stats", token_stats_cases, ("bf16", "fp16", "fp32")),
    ("linear_stats", linear_stats_cases, ("bf16", "fp16", "fp32")),
    ("live_matmul", live_matmul_cases, ("bf16", "fp16", "fp32")),
    ("divergence", divergence_cases, ("bf16", "fp16", "fp32")),
    ("elementwise_divergence", elementwise_divergence_cases, ("bf16", "fp16", "fp32")),
    ("policy_loss", policy_loss_cases, ("fp32",)),
    ("kl_penalty", kl_penalty_cases, ("bf16", "fp32")),
    ("masked_whiten", masked_whiten_cases, ("bf16", "fp32", "fp64")),
    ("reverse_scan", scan_cases, ("fp32", "fp64")),
]


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]
