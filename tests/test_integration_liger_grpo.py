"""``triton_grpo_loss`` (fastalign.integrations.liger_grpo_logits) against Liger-Kernel 0.8's own
``triton_grpo_loss`` and a float64 reference.

Liger's function is a Triton kernel. Without a GPU it runs here on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before Triton is imported); its float options are ``tl.constexpr``
arguments, so unlike the cross-entropy kernel it needs no stand-in there. The float64 reference
(:func:`_reference`) computes the log-probs from the materialised logits and follows the formulas of Liger's
kernels (ops/grpo_loss.py, transformers/grpo_loss.py), with d(logits) by autograd (cispo's cap and vespo's weight
detached, as Liger's). Each case calls all three on copies of the same logits, made an intermediate of the graph
as a model's logits are, and compares every output (the loss and the metrics, or the three per-token tensors) and
d(logits) (with a random upstream gradient for the per-token loss). Two gradients of Liger's kernel are not the
derivative of its own loss (:func:`test_luspo_token_gradient_is_the_derivative_of_liger_s_loss`,
:func:`test_delta_inside_the_clip_range_passes_the_gradient_of_the_loss`): there d(logits) is compared with the
reference only.
"""
import inspect
import math

import pytest
import torch

from helpers import assert_close

from fastalign.integrations.liger import triton_grpo_loss

liger_grpo = pytest.importorskip("liger_kernel.transformers.grpo_loss",
                                 reason="liger_kernel is not installed: `pip install liger-kernel==0.8.*`")

# Liger's kernel under the interpreter computes exp(-inf) and the like in its masked lanes (unused values)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, L, V = 4, 6, 16
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
PPO_ROWS = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
TOL = dict(rtol=2e-5, atol=2e-6)


def _batch(seed, temperature=0.9, spread=0.3):
    """Logits ``[B, L+1, V]``, old / reference log-probs near the policy's (``spread``: of the old ones, ratios on
    both sides of the clip bounds), a mask with a partial row and an empty one."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L + 1, V, generator=g) * 2
    ids = torch.randint(0, V, (B, L), generator=g)
    lp = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + torch.randn(B, L, generator=g) * spread
    ref = lp + torch.randn(B, L, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[1, 4:] = 0
    mask[2, 1] = 0
    mask[3] = 0  # an empty completion
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(logits=to(logits), old=to(old), ref=to(ref), ids=to(ids), adv=to(adv), mask=to(mask))


def _reference(logits, old_logp, ref_logp, completion_ids, advantages, completion_mask=None, temperature=0.9,
               beta=0.04, eps_low=0.2, eps_high=0.4, inplace=True, loss_type="dapo", max_completion_length=None,
               importance_sampling_level="token", reduce=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
               vllm_is_ratio=None, delta=None, use_bias_correction_kl=False, num_items_in_batch=None,
               vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, world=1):
    """Liger's ``triton_grpo_loss`` in float64, from the formulas (module docstring); ``world``: the processes."""
    x = logits.double()
    Bx, Lx = completion_ids.shape
    m = torch.ones(Bx, Lx, dtype=torch.float64, device=x.device) if completion_mask is None \
        else completion_mask.double()
    keep = m != 0
    lp = torch.log_softmax(x[:, :-1] / temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    lp = torch.where(keep, lp, 0.0)
    old = lp.detach() if old_logp is None else old_logp.double()
    log_ratio = torch.where(keep, lp - old, 0.0)
    A = advantages.double()[:, None]
    if importance_sampling_level == "sequence":
        rho = torch.exp((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
    else:
        rho = torch.exp(log_ratio)
    no_clip = torch.zeros_like(rho, dtype=torch.bool)
    if loss_type in PPO_ROWS:
        c2 = rho.clamp(1 - eps_low, 1 + eps_high)
        c1 = rho if delta is None else rho.clamp(max=delta)
        pg = torch.where(-A * c2 > -A * c1, -A * c2, -A * c1)
        clipped = ((rho < 1 - eps_low) & (A < 0)) | ((rho > 1 + eps_high) & (A > 0))
    elif loss_type == "cispo":
        pg = -rho.clamp(max=eps_high).detach() * A * lp
        clipped = (rho > eps_high) & (A > 0)
    elif loss_type == "sapo":
        tau = torch.where(A > 0, sapo_temperature_pos, sapo_temperature_neg).double()
        pg = -torch.sigmoid(tau * (rho - 1)) * 4 / tau * A
        clipped = no_clip
    else:  # vespo
        log_w = (log_ratio.clamp(-20, 20) * m).sum(-1, keepdim=True)
        if vllm_is_ratio is not None:
            log_w = log_w + vllm_is_ratio.double().reshape(Bx, -1).log().clamp(math.log(1e-8), 20).sum(-1, True)
        log_w = log_w.clamp(math.log(1e-8), 20).detach()
        pos = A >= 0
        k = torch.where(pos, vespo_k_pos, vespo_k_neg).double()
        lam = torch.where(pos, vespo_lambda_pos, vespo_lambda_neg).double().clamp(min=1e-4)
        pg = -torch.exp(lam + k * log_w - lam * log_w.exp()) * A * lp
        clipped = no_clip
    if vllm_is_ratio is not None and loss_type != "vespo":
        pg = pg * vllm_is_ratio.double().reshape(Bx, -1)
    per_token = pg
    kl = None
    if beta != 0.0:
        d = ref_logp.double() - lp
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * rho
        per_token = per_token + beta * kl
        kl = torch.where(keep, kl, 0.0).detach()
    per_token = torch.where(keep, per_token, 0.0)
    clipped = (clipped & keep).double()
    if not reduce:
        return per_token, kl, clipped
    n = m.sum().clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / n
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (Bx * (max_completion_length or Lx))
    elif loss_type in ("dapo", "cispo", "vespo"):
        # the other processes score no token here: the all-reduced count is this process's
        tokens = m.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        loss = per_token.sum() / (tokens / world).clamp(min=1.0)
    else:  # luspo
        loss = (per_token * m.sum(-1, keepdim=True)).mean()
    metrics = ([] if kl is None else [kl.sum() / n]) + [clipped.sum() / n]
    return loss, metrics


def _call(fn, d, *, dtype=torch.float32, seed=0, **kw):
    """``(outputs, d(logits))`` of ``fn`` on a copy of ``d``'s logits (cast to ``dtype``) made an intermediate of
    the graph (a model's logits), backward with an upstream gradient of 1 (random for the per-token loss);
    ``outputs``: the loss and the metrics, or the three per-token tensors."""
    leaf = d["logits"].to(dtype).clone().requires_grad_(True)
    out = fn(leaf * 1, d["old"], d["ref"], d["ids"], d["adv"], d["mask"], **kw)
    first = out[0]
    up = torch.ones_like(first) if first.dim() == 0 else torch.randn(
        first.shape, generator=torch.Generator().manual_seed(seed)).to(first)
    first.backward(up)
    return ([first, *out[1]] if kw.get("reduce") else list(out)), leaf.grad


def _liger(*args, **kw):
    return liger_grpo.triton_grpo_loss(*args, **kw)


def _compare(a, b, *, what, rtol, atol):
    outs_a, grad_a = a
    outs_b, grad_b = b
    assert len(outs_a) == len(outs_b), f"{what}: {len(outs_a)} outputs != {len(outs_b)}"
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert (x is None) == (y is None), f"{what}: output {i} None on one side only"
        if x is not None:
            assert x.dtype == torch.float32, f"{what}: output {i} is {x.dtype}"
            assert_close(x, y, rtol=rtol, atol=atol, what=f"{what} output {i}")
    if grad_b is not None:
        assert_close(grad_a, grad_b, rtol=rtol, atol=atol, what=f"{what} d(logits)")


def _check(d, *, liger_grad=True, dtype=torch.float32, tol=None, ref_tol=None, **kw):
    """fastalign's call against Liger's and the reference's (whose logits are the same values in float64)."""
    fa = _call(triton_grpo_loss, d, dtype=dtype, **kw)
    assert fa[1].dtype == dtype
    lg = _call(_liger, d, dtype=dtype, **kw)
    ref = _call(_reference, {**d, "logits": d["logits"].to(dtype)}, dtype=torch.float64, **kw)
    _compare(fa, (lg[0], lg[1] if liger_grad else None), what=f"liger {kw}", **(tol or TOL))
    _compare(fa, ref, what=f"reference {kw}", **(ref_tol or tol or TOL))
    return fa, ref


def _cases():
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence") if loss_type in PPO_ROWS else ("token",):
            for beta in (0.0, 0.04):
                for reduce in (False, True):
                    if not (loss_type == "luspo" and beta != 0.0 and reduce):
                        yield loss_type, level, beta, reduce


@pytest.mark.parametrize("loss_type, level, beta, reduce", list(_cases()))
def test_matches_liger_and_float64_reference(loss_type, level, beta, reduce):
    # a batch where the ratio crosses the clip bounds: the tokens', or one sequence's (the first, of A < 0)
    d = _batch(sum(map(ord, loss_type)) if level == "token" else 31)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, reduce=reduce)
    if level == "sequence":  # a sequence's ratio is nearer 1: bounds it crosses
        kw.update(eps_low=0.02, eps_high=0.03)
    if loss_type == "cispo":
        kw["eps_high"] = 1.1
    # Liger's token-level luspo gradient (reduce=True) reads its [B, 1] token weights as [B, L] (the next test)
    fa, ref = _check(d, liger_grad=not (loss_type == "luspo" and level == "token" and reduce), **kw)
    clipped = ref[0][-1] if reduce else ref[0][2]
    if loss_type in PPO_ROWS + ("cispo",):  # the batch reaches the clip
        assert float(clipped.sum()) > 0, kw


def test_luspo_token_gradient_is_the_derivative_of_liger_s_loss():
    """Liger's backward of token-level luspo with reduce=True indexes its ``[B, 1]`` scale ``|y_i| / (B L)`` with
    the per-token strides, so a token takes another sequence's weight (or a value past the tensor): not the
    derivative of its own loss. fastalign's gradient is that derivative: autograd through Liger's per-token loss,
    aggregated as its luspo is."""
    d = _batch(5)
    fa = _call(triton_grpo_loss, d, loss_type="luspo", beta=0.0, reduce=True)

    def liger_luspo(logits, *args, **kw):
        per_token = _liger(logits, *args, loss_type="luspo", beta=0.0, reduce=False)[0]
        return (per_token * d["mask"].sum(-1, keepdim=True)).mean(), []

    lg = _call(liger_luspo, d, reduce=True)
    _compare(([fa[0][0]], fa[1]), lg, what="luspo", **TOL)


OPTION_CASES = {
    "bias_kl_token": dict(loss_type="dapo", beta=0.3, use_bias_correction_kl=True),
    "bias_kl_sequence": dict(loss_type="grpo", beta=0.3, use_bias_correction_kl=True,
                             importance_sampling_level="sequence"),
    "bias_kl_cispo": dict(loss_type="cispo", beta=0.2, eps_high=1.1, use_bias_correction_kl=True),
    "temperature": dict(loss_type="dapo", temperature=0.6, beta=0.1),
    "temperature_one": dict(loss_type="bnpo", temperature=1.0),
    "asymmetric_eps": dict(loss_type="bnpo", eps_low=0.1, eps_high=0.28),
    "dr_grpo_length": dict(loss_type="dr_grpo", max_completion_length=9, beta=0.1),
    "sapo_temperatures": dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6),
    "vespo_options": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0,
                          vespo_lambda_neg=3.5),
    "num_items_dapo": dict(loss_type="dapo", num_items_in_batch=11),
    "num_items_cispo_tensor": dict(loss_type="cispo", eps_high=1.2, num_items_in_batch=torch.tensor(7.0)),
    "num_items_vespo": dict(loss_type="vespo", num_items_in_batch=40, beta=0.1),
}


@pytest.mark.parametrize("name, reduce", [(name, reduce) for name, kw in OPTION_CASES.items()
                                          for reduce in (True, False) if reduce or "num_items_in_batch" not in kw])
def test_options_match_liger_and_reference(name, reduce):
    kw = dict(OPTION_CASES[name])
    d = _batch(sum(map(ord, name)), temperature=kw.get("temperature", 0.9))
    _check(d, reduce=reduce, **kw)


def _delta_tokens(d, delta, level, upper):
    """The scored tokens of ``A < 0`` whose ratio (the token's or the sequence's) lies in ``(delta, upper]``."""
    m = d["mask"].bool()
    l = torch.where(m, torch.log_softmax(d["logits"][:, :-1] / 0.9, -1).gather(-1, d["ids"][..., None])[..., 0]
                    - d["old"], 0.0)
    if level == "sequence":
        l = l.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    rho = l.exp()
    return m & (d["adv"][:, None] < 0) & (rho > delta) & (rho <= upper)


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("loss_type, level, delta, eps, beta, bias_kl", [
    ("dapo", "token", 1.45, (0.2, 0.4), 0.0, False),
    ("bnpo", "token", 1.45, (0.2, 0.4), 0.1, True),
    ("grpo", "sequence", 1.1, (0.05, 0.08), 0.1, False),
    ("luspo", "sequence", 1.1, (0.05, 0.08), 0.0, False),
])
def test_delta_matches_liger_and_reference(loss_type, level, delta, eps, beta, bias_kl, reduce):
    """``delta`` above the clip range caps the ratio of the tokens of ``A < 0`` (their value ``-A delta``, no
    gradient)."""
    d = _batch(31 if level == "token" else 1297, spread=0.6)
    assert _delta_tokens(d, delta, level, math.inf).any()  # delta is active
    _check(d, loss_type=loss_type, importance_sampling_level=level, delta=delta, eps_low=eps[0], eps_high=eps[1],
           beta=beta, use_bias_correction_kl=bias_kl, reduce=reduce)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_delta_inside_the_clip_range_passes_the_gradient_of_the_loss(level):
    """With ``delta < 1 + eps_high``, a token of ``A < 0`` whose ratio lies in ``(delta, 1 + eps_high]`` has the
    value ``-A rho`` (the clipped term is the larger), whose gradient ``-A rho`` fastalign passes, as autograd does
    (Liger's chunked loss, TRL); Liger's kernel passes 0 there (it counts any token on that term as clipped). The
    other tokens' d(logits) are Liger's."""
    d = _batch(32 if level == "token" else 1297, spread=0.6)
    kw = dict(loss_type="bnpo", importance_sampling_level=level, delta=1.1, beta=0.0)
    if level == "sequence":
        kw.update(eps_low=0.05, eps_high=0.2)
    upper = 1 + kw.get("eps_high", 0.4)
    corner = _delta_tokens(d, 1.1, level, upper)
    assert corner.any()
    fa = _call(triton_grpo_loss, d, **kw)
    lg = _call(_liger, d, **kw)
    _compare(fa, _call(_reference, d, dtype=torch.float64, **kw), what="reference", **TOL)
    _compare(fa, (lg[0], None), what="liger", **TOL)
    at = torch.nn.functional.pad(corner, (0, 1))  # d(logits) rows: the last position is not scored
    assert float(lg[1][at].abs().max()) == 0.0 and float(fa[1][at].abs().min()) > 0.0
    assert_close(fa[1][~at], lg[1][~at], **TOL, what="other rows")


@pytest.mark.parametrize("shape", ["token", "sequence", "flat"])
@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"),
                                              ("sapo", "token"), ("vespo", "token"), ("luspo", "sequence"),
                                              ("luspo", "token")])
@pytest.mark.parametrize("reduce", [True, False])
def test_vllm_is_ratio_matches_liger_and_reference(shape, loss_type, level, reduce):
    """``vllm_is_ratio`` ``[B, L]``, ``[B, 1]`` and ``[B]``: a weight of the policy term (vespo: of its ``phi``)."""
    d = _batch(3)
    g = torch.Generator().manual_seed(4)
    ratio = torch.rand(*dict(token=(B, L), sequence=(B, 1), flat=(B,))[shape], generator=g).add(0.5).to(DEVICE)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, vllm_is_ratio=ratio, reduce=reduce,
              beta=0.0 if loss_type == "luspo" else 0.04)
    if loss_type == "cispo":
        kw["eps_high"] = 1.1
    _check(d, liger_grad=not (loss_type == "luspo" and level == "token" and reduce), **kw)


@pytest.mark.parametrize("reduce", [True, False])
def test_advantages_of_shape_b_1_as_liger(reduce):
    """``advantages [B, 1]``: Liger's kernel reads one per sequence as from ``[B]``; fastalign raised."""
    d = _batch(5)
    fa = _call(triton_grpo_loss, {**d, "adv": d["adv"][:, None]}, reduce=reduce, loss_type="grpo", beta=0.04)
    lg = _call(_liger, {**d, "adv": d["adv"][:, None]}, reduce=reduce, loss_type="grpo", beta=0.04)
    _compare(fa, lg, what="[B, 1]", **TOL)
    _compare(fa, _call(triton_grpo_loss, d, reduce=reduce, loss_type="grpo", beta=0.04), what="[B]", **TOL)


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"),
                                              ("sapo", "token"), ("vespo", "token")])
@pytest.mark.parametrize("bias_kl", [False, True])
@pytest.mark.parametrize("reduce", [True, False])
def test_old_logp_none_is_on_policy_as_liger(loss_type, level, bias_kl, reduce):
    """``old_logp=None``: the ratio is 1 with the gradient of ``exp(lp - sg(lp))`` (the bias-corrected KL's too)."""
    d = {**_batch(8), "old": None}
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.1, use_bias_correction_kl=bias_kl,
              reduce=reduce)
    if loss_type == "cispo":
        kw["eps_high"] = 0.9  # a cap below the ratio 1: the clip flags are on
    _check(d, **kw)


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence"), ("vespo", "token")])
def test_completion_mask_none_scores_every_token(loss_type, level, reduce):
    d = {**_batch(6), "mask": None}
    kw = dict(loss_type=loss_type, importance_sampling_level=level, reduce=reduce)
    fa, _ = _check(d, **kw)
    ones = _call(triton_grpo_loss, {**d, "mask": torch.ones(B, L, dtype=torch.bool, device=DEVICE)}, **kw)
    _compare(fa, ones, what="mask None vs ones", rtol=0.0, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32, torch.bfloat16])
def test_completion_mask_dtypes(dtype):
    """A mask of bool, integer or float 0 / 1 values: the same outputs, Liger's."""
    d = _batch(13)
    d = {**d, "mask": d["mask"].to(dtype)}
    for reduce in (True, False):
        _compare(_call(triton_grpo_loss, d, reduce=reduce), _call(_liger, d, reduce=reduce), what=str(dtype), **TOL)


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token")])
def test_masked_positions_are_not_read(loss_type, level, reduce):
    """Where the mask is 0, ids outside the vocabulary, NaN and inf log-probs and ratios change nothing (Liger skips
    those positions, but sums the NaN of ``old_logp`` into its sequence ratio): the outputs are 0 there, with a
    zero gradient."""
    d = _batch(12)
    ratio = torch.rand(B, L, generator=torch.Generator().manual_seed(2)).add(0.5).to(DEVICE)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, reduce=reduce, beta=0.1,
              use_bias_correction_kl=True, vllm_is_ratio=ratio)
    clean = _call(triton_grpo_loss, d, **kw)
    off = d["mask"] == 0
    dirty = dict(d, ids=d["ids"].masked_fill(off, V + 3), old=d["old"].masked_fill(off, math.nan),
                 ref=d["ref"].masked_fill(off, math.inf))
    kw["vllm_is_ratio"] = ratio.masked_fill(off, math.nan) if loss_type != "vespo" else ratio  # vespo reads all
    _compare(_call(triton_grpo_loss, dirty, **kw), clean, what="masked garbage", rtol=0.0, atol=0.0)
    assert float(clean[1][1, 4:].abs().sum()) == 0.0 and float(clean[1][:, -1].abs().sum()) == 0.0
    if not reduce:
        assert all(float(t[off].detach().abs().sum()) == 0.0 for t in clean[0])


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_bf16_logits_match_liger_and_reference(loss_type, reduce):
    """bf16 logits: both compute in fp32 from the bf16 values and write d(logits) in bf16."""
    d = _batch(9)
    kw = dict(loss_type=loss_type, beta=0.1, reduce=reduce, eps_high=1.2 if loss_type == "cispo" else 0.4)
    _check(d, dtype=torch.bfloat16, tol=dict(rtol=2e-2, atol=2e-3), ref_tol=dict(rtol=2e-2, atol=2e-3), **kw)


def test_float64_inputs_as_liger():
    """float64 logits (computed in fp32, the gradient float64), old / ref log-probs, advantages and ratios."""
    d = _batch(2)
    d64 = {k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}
    kw = dict(loss_type="grpo", beta=0.1, reduce=True, vllm_is_ratio=torch.full((B, 1), 0.9, device=DEVICE))
    fa = _call(triton_grpo_loss, d64, dtype=torch.float64, **kw)
    assert fa[1].dtype == torch.float64
    _compare(fa, _call(_liger, d, **kw), what="float64", **TOL)


@pytest.mark.parametrize("world, num_items", [(2, None), (4, None), (4, 3)])
def test_dapo_normaliser_over_processes_matches_liger(monkeypatch, world, num_items):
    """One process of ``world`` (the others score nothing: their all-reduce adds 0): ``sum / clamp(N / world, 1)``."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)
    d = _batch(17)
    kw = dict(loss_type="dapo", beta=0.0, reduce=True, num_items_in_batch=num_items)
    fa = _call(triton_grpo_loss, d, **kw)
    _compare(fa, _call(_liger, d, **kw), what=f"world={world}", **TOL)
    _compare(fa, _call(_reference, {**d}, dtype=torch.float64, world=world, **kw), what=f"world={world}", **TOL)


# ---------------------------------------------------------------------------------------------- d(logits) in place
def test_inplace_writes_d_logits_over_a_model_s_logits():
    """``inplace=True`` on an intermediate: the gradient the graph receives is the logits' own buffer (the last
    position zeroed), equal to Liger's; ``inplace=False`` leaves the logits as they were, with a new gradient."""
    d = _batch(21)
    kw = dict(loss_type="grpo", beta=0.1)
    for inplace in (True, False):
        leaf = d["logits"].clone().requires_grad_(True)
        logits = leaf + 0  # its backward hands d(logits) on as it is
        seen = []
        logits.register_hook(lambda g: seen.append(g.data_ptr() == logits.data_ptr()))
        out = triton_grpo_loss(logits, d["old"], d["ref"], d["ids"], d["adv"], d["mask"], inplace=inplace, **kw)
        up = torch.randn(B, L, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        out[0].backward(up)
        assert seen == [inplace]
        assert (leaf.grad.data_ptr() == logits.data_ptr()) == inplace
        assert torch.equal(logits.detach(), leaf.grad if inplace else d["logits"])
        assert float(leaf.grad[:, -1].abs().sum()) == 0.0
        expected = _call(_liger, d, inplace=inplace, **kw)[1]
        assert_close(leaf.grad, expected, **TOL, what=f"inplace={inplace}")


def test_inplace_with_reduce_and_a_second_backward():
    """``reduce=True`` writes over the logits too; a second backward through the retained graph raises torch's
    in-place error (the logits were overwritten) rather than give a wrong gradient."""
    d = _batch(22)
    leaf = d["logits"].clone().requires_grad_(True)
    logits = leaf * 1.0
    loss, _ = triton_grpo_loss(logits, d["old"], d["ref"], d["ids"], d["adv"], d["mask"], reduce=True)
    loss.backward(retain_graph=True)
    assert_close(leaf.grad, _call(_reference, d, dtype=torch.float64, reduce=True)[1], **TOL, what="grad")
    with pytest.raises(RuntimeError, match="modified by an inplace operation|has been modified inplace"):
        loss.backward()


def test_inplace_keeps_a_leaf_s_values():
    """A leaf (Liger would overwrite it) keeps its values and gets a new gradient; it can be differentiated twice."""
    d = _batch(23)
    leaf = d["logits"].clone().requires_grad_(True)
    loss, _ = triton_grpo_loss(leaf, d["old"], d["ref"], d["ids"], d["adv"], d["mask"], reduce=True, inplace=True)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    assert torch.equal(leaf.detach(), d["logits"]) and leaf.grad.data_ptr() != leaf.data_ptr()
    assert_close(leaf.grad, 2 * first, rtol=1e-6, atol=1e-7, what="second backward")
    assert_close(first, _call(_reference, d, dtype=torch.float64, reduce=True)[1], **TOL, what="leaf grad")


def test_without_gradients_the_logits_are_untouched():
    d = _batch(24)
    with torch.no_grad():
        out = triton_grpo_loss(d["logits"], d["old"], d["ref"], d["ids"], d["adv"], d["mask"])
    expected = _reference(d["logits"], d["old"], d["ref"], d["ids"], d["adv"], d["mask"])
    for a, b in zip(out, expected):
        assert_close(a, b, **TOL, what="no grad")
    assert torch.equal(d["logits"], _batch(24)["logits"])


# ------------------------------------------------------------------------------------------------------ NaN, errors
def test_nan_propagates():
    d = _batch(25)
    d["logits"][0, 2, 3] = math.nan  # a scored position
    per_token, kl, clipped = triton_grpo_loss(d["logits"], d["old"], d["ref"], d["ids"], d["adv"], d["mask"])
    assert torch.isnan(per_token[0, 2]) and torch.isnan(kl[0, 2])
    assert not torch.isnan(per_token[1:]).any()
    loss, metrics = triton_grpo_loss(d["logits"], d["old"], d["ref"], d["ids"], d["adv"], d["mask"], reduce=True)
    assert torch.isnan(loss) and torch.isnan(metrics[0])
    d = _batch(25)
    d["adv"][1] = math.nan
    loss, _ = triton_grpo_loss(d["logits"], d["old"], d["ref"], d["ids"], d["adv"], d["mask"], reduce=True,
                               loss_type="grpo")
    assert torch.isnan(loss)


def test_signature_matches_liger():
    a = inspect.signature(triton_grpo_loss).parameters
    b = inspect.signature(liger_grpo.triton_grpo_loss).parameters
    assert [(p.name, p.default) for p in a.values()] == [(p.name, p.default) for p in b.values()]


def _error_cases():
    d = _batch(1)
    x, old, ref, ids, adv, mask = (d[k] for k in ("logits", "old", "ref", "ids", "adv", "mask"))
    fractional = mask.float()
    fractional[0, 0] = 0.5
    bad_ids = ids.clone()
    bad_ids[0, 0] = V
    call = lambda *args, **kw: lambda: triton_grpo_loss(*args, **kw)  # noqa: E731
    std = (x, old, ref, ids, adv, mask)
    return [
        ("loss_type", call(*std, loss_type="ppo"), ValueError, "^loss_type must be one of"),
        ("sequence_cispo", call(*std, loss_type="cispo", importance_sampling_level="sequence"), ValueError,
         "importance_sampling_level='sequence' is not supported for loss_type 'cispo'"),
        ("level", call(*std, importance_sampling_level="seq"), ValueError, "^importance_sampling_level must be"),
        ("sapo_temperature", call(*std, sapo_temperature_pos=0.5), ValueError,
         "^sapo_temperature_pos does not apply to GRPO loss_type 'dapo'"),
        ("sapo_temperature_value", call(*std, loss_type="sapo", sapo_temperature_neg=0.0), ValueError,
         "sapo_temperature_neg"),
        ("delta_sapo", call(*std, loss_type="sapo", delta=2.0), ValueError, "^delta does not apply"),
        ("delta_value", call(*std, delta=-1.0), ValueError, "delta"),
        ("vespo_option", call(*std, loss_type="grpo", vespo_k_pos=1.0), ValueError, "^vespo_k_pos does not apply"),
        ("eps_low_sapo", call(*std, loss_type="sapo", eps_low=0.1), ValueError, "^eps_low does not apply"),
        ("eps_high_vespo", call(*std, loss_type="vespo", eps_high=0.2), ValueError, "^eps_high does not apply"),
        ("eps_high_value", call(*std, eps_high=-0.1), ValueError, "^eps_high must be >= 0"),
        ("temperature", call(*std, temperature=0.0), ValueError, "temperature"),
        ("beta", call(*std, beta=math.nan), ValueError, "beta"),
        ("max_completion_length", call(*std, loss_type="dr_grpo", max_completion_length=0), ValueError,
         "max_completion_length"),
        ("luspo_kl", call(*std, loss_type="luspo", reduce=True), ValueError, "luspo"),
        ("num_items_not_reduced", call(*std, num_items_in_batch=10), ValueError,
         "num_items_in_batch applies only with reduce=True"),
        ("num_items_grpo", call(*std, loss_type="grpo", reduce=True, num_items_in_batch=10), ValueError,
         "num_items_in_batch does not apply to loss_type 'grpo'"),
        ("num_items_type", call(*std, reduce=True, num_items_in_batch="10"), TypeError, "^num_items_in_batch"),
        ("num_items_nan", call(*std, reduce=True, num_items_in_batch=math.nan), ValueError, "^num_items_in_batch"),
        ("ref_missing", call(x, old, None, ids, adv, mask), ValueError, "^ref_logp is required with beta != 0"),
        ("inplace", call(*std, inplace="yes"), TypeError, "^inplace"),
        ("reduce", call(*std, reduce=None), TypeError, "^reduce"),
        ("use_bias_correction_kl", call(*std, use_bias_correction_kl=1.0), TypeError, "^use_bias_correction_kl"),
        ("logits_dim", call(x[0], old, ref, ids, adv, mask), ValueError, "^logits must have 3 dimension"),
        ("logits_length", call(x[:, :-1], old, ref, ids, adv, mask), ValueError,
         r"^logits must have shape \(4, 7, V\)"),
        ("logits_dtype", call(x.long(), old, ref, ids, adv, mask), TypeError, "^logits must be"),
        ("logits_type", call(x.tolist(), old, ref, ids, adv, mask), TypeError, "^logits must be a torch.Tensor"),
        ("ids_dtype", call(x, old, ref, ids.float(), adv, mask), TypeError, "^completion_ids must be"),
        ("ids_dim", call(x, old, ref, ids[0], adv, mask), ValueError, "^completion_ids must have 2 dimension"),
        ("ids_range", call(x, old, ref, bad_ids, adv, mask), ValueError, r"^completion_ids must lie in \[0, 16\)"),
        ("old_shape", call(x, old[:, :-1], ref, ids, adv, mask), ValueError, r"^old_logp must have shape \(4, 6\)"),
        ("ref_shape", call(x, old, ref[:-1], ids, adv, mask), ValueError, r"^ref_logp must have shape \(4, 6\)"),
        ("ref_dtype", call(x, old, ref.long(), ids, adv, mask), TypeError, "^ref_logp must be a floating"),
        ("adv_shape", call(x, old, ref, ids, adv[:, None].expand(-1, 2), mask), ValueError, r"^advantages must have shape \(4,\)"),
        ("adv_missing", call(x, old, ref, ids, None, mask), TypeError, "^advantages must be a torch.Tensor"),
        ("mask_shape", call(x, old, ref, ids, adv, mask[:, :-1]), ValueError, "^completion_mask must have shape"),
        ("mask_fractional", call(x, old, ref, ids, adv, fractional), ValueError, "^completion_mask must hold 0 and 1"),
        ("vllm_shape", call(*std, vllm_is_ratio=torch.ones(B, L - 1)), ValueError, "^vllm_is_ratio must have shape"),
    ]


ERRORS = _error_cases()


@pytest.mark.parametrize("name, call, err, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(name, call, err, match):
    with pytest.raises(err, match=match):
        call()
