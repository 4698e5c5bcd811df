"""Edges of the policy-loss kernels, the C++ CPU kernel and the Triton one (in the interpreter), against the
float64 reference, which follows the trainers' rules:

* rows longer than one block: 1100 tokens are two 1024-token Triton blocks and three 512-token C++ chunks, so
  the row sums (token count, mean log-ratio, the gmpo and vespo sums, KL-Cov's means) and the sequence-level
  gradient added to every valid token cover every block;
* every loss type with every added term at once (kernel branches that no single-term test reaches);
* bounds that are inclusive or exclusive as in the trainers: the rollout masks keep a ratio on either bound,
  the off-policy threshold is exclusive, vespo's lambda is floored at 1e-4, Clip-Cov's bounds are strict.
"""
import math
import re
from pathlib import Path

import pytest
import torch

from fastalign import policy_config, reference
from helpers import assert_close, policy_and_reference


def _batch(g, B, T, spread=0.3):
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * spread
    A = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.2
    return lp, old, A, m


def _check(out, ref, tol=1e-5, grad_atol=1e-7):
    """Loss, every metric of the reference and d(logprobs) as the float64 reference's."""
    loss, met, g = out
    rloss, rmet, rg = ref
    assert_close(loss, rloss, atol=tol, rtol=tol, what="loss")
    for k, v in rmet.items():
        assert_close(met[k], v, atol=tol, rtol=tol, what=f"metric {k}")
    assert_close(g, rg, atol=grad_atol, rtol=1e-4, what="d logprobs")


# ---------------------------------------------------------------- rows longer than one block
@pytest.mark.parametrize("kw", [dict(agg="seq-mean-token-mean"),
                                dict(importance_sampling_level="sequence", agg="seq-mean-token-mean"),
                                dict(importance_sampling_level="sequence", kl_coef=0.1, kl_rho="grad"),
                                dict(loss_type="gspo"), dict(loss_type="vespo"),
                                dict(loss_type="gmpo", offpolicy_threshold=0.01)],
                         ids=["ppo-token", "ppo-sequence", "ppo-sequence-kl", "gspo", "vespo", "gmpo-offpolicy"])
def test_policy_rows_longer_than_one_block(cpu_backend, kw):
    """T = 1100, one row's valid tokens all past the first 1024: the row sums, the clip metrics and the
    sequence-level gradient cover every block, as in float64."""
    g = torch.Generator().manual_seed(14)
    lp, old, A, m = _batch(g, 3, 1100, spread=0.05)
    m[1, :1050] = False  # 50 valid tokens, all in the second Triton block and the third C++ chunk
    ref = lp + torch.randn(3, 1100, generator=g) * 0.3
    if "kl_coef" in kw:
        kw = dict(kw, ref_logprobs=ref)
    _check(*policy_and_reference((lp, old, A, m), cpu_backend, **kw), grad_atol=1e-8)


def test_kl_cov_selection_means_over_rows_longer_than_a_block(cpu_backend):
    """KL-Cov centres the covariance on the means over every valid token: rows of 1100 tokens span several
    blocks of those sums, and the picks, the loss and its gradient match the float64 reference's selection."""
    g = torch.Generator().manual_seed(2)
    lp, old, _, m = _batch(g, 2, 1100, spread=0.05)
    A = torch.randn(lp.shape, generator=g) + torch.linspace(-3.0, 3.0, lp.shape[1])  # the mean moves along the row
    sel = reference.policy.cov_selection(lp.double(), old.double(), A.double(), m, ratio=0.01, lb=-1e9, ub=1e9,
                                         eps_low=0.2, eps_high=0.2, loss_type="kl_cov")
    assert sel.any()
    _check(*policy_and_reference((lp, old, A, m), cpu_backend, ref_kw=dict(cov_selected=sel), loss_type="kl_cov",
                                 cov_ratio=0.01), grad_atol=1e-8)


# ---------------------------------------------------------------- every added term at once
LOSS_TYPES = ("ppo", "gspo", "cispo", "sapo", "reinforce", "gmpo", "clip_cov", "kl_cov", "vespo", "dppo_tv", "dppo_kl",
              "dro")


@pytest.mark.parametrize("rollout, kl_rho", [("token_mask", "grad"), ("sequence_truncate", True)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_with_every_added_term(cpu_backend, loss_type, rollout, kl_rho):
    """Each loss type with all the added terms at once: the KL term times rho (with or without its gradient),
    the entropy bonus, the entropy-quantile keep mask, a token or sequence rollout correction, precomputed importance
    weights and the off-policy mask; loss, metrics and d(logprobs) as the float64 reference's."""
    g = torch.Generator().manual_seed(31)
    lp, old, A, m = _batch(g, 4, 9)
    kw = dict(loss_type=loss_type, kl_coef=0.05, kl_rho=kl_rho, entropy_coef=0.01, entropy_quantile=0.6,
              rollout_correction=rollout, rollout_min=0.5, rollout_max=1.5, offpolicy_threshold=0.02,
              ref_logprobs=lp + 0.2 * torch.randn(4, 9, generator=g), entropy=torch.rand(4, 9, generator=g) * 3,
              rollout_logprobs=old + 0.3 * torch.randn(4, 9, generator=g),
              importance_weights=0.5 + torch.rand(4, 9, generator=g))
    ref_kw = {}
    if loss_type == "dro":
        kw["dro_beta"] = 0.1
    elif loss_type in ("clip_cov", "kl_cov"):  # every clip_cov candidate (no random choice), a quarter for kl_cov
        ratio, lb, ub = (1.0, -100.0, 100.0) if loss_type == "clip_cov" else (0.25, 1.0, 5.0)
        kw.update(cov_ratio=ratio, **(dict(cov_lb=lb, cov_ub=ub) if loss_type == "clip_cov" else {}))
        ref_kw["cov_selected"] = reference.policy.cov_selection(lp, old, A, m, loss_type=loss_type, eps_low=0.2,
                                                                eps_high=0.2, ratio=ratio, lb=lb, ub=ub)
        assert ref_kw["cov_selected"].any()
    out, ref = policy_and_reference((lp, old, A, m), cpu_backend, ref_kw=ref_kw, **kw)
    _check(out, ref)
    assert float(ref[1]["kl"]) != 0 and float(ref[1]["entropy"]) != 0


# ---------------------------------------------------------------- bounds
@pytest.mark.parametrize("bounds", [(1.0, 2.0), (0.5, 1.0)], ids=["at-min", "at-max"])
@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask"])
def test_rollout_mask_keeps_ratios_on_its_bounds(cpu_backend, mode, bounds):
    """The mask modes keep a train/rollout ratio r with rollout_min <= r <= rollout_max (TRL masks only r > hi,
    verl's rejection r > upper): tokens, or whole sequences, scored alike by the trainer and the rollout engine
    (r = 1 exactly) are kept with 1 as either bound, as in the float64 reference."""
    g = torch.Generator().manual_seed(16)
    lp, old, A, m = _batch(g, 4, 11)
    roll = old + torch.randn(4, 11, generator=g) * 0.3
    roll[:, ::2] = old[:, ::2]  # r = 1 on these tokens
    roll[1] = old[1]  # and on all of row 1: its sequence ratio is 1
    out, ref = policy_and_reference((lp, old, A, m), cpu_backend, rollout_correction=mode, rollout_logprobs=roll,
                                    rollout_min=bounds[0], rollout_max=bounds[1])
    _check(out, ref)
    # the ratio-1 entries pass a gradient (where the PPO clip lets one through): row 1, and the even tokens
    assert bool((out[2][1][m[1]] != 0).any())
    if mode == "token_mask":
        assert bool((out[2][[0, 2, 3], ::2][m[[0, 2, 3], ::2]] != 0).any())


def test_offpolicy_threshold_is_exclusive(cpu_backend):
    """A row is far from the policy when its mean KL is above ``offpolicy_threshold``: on-policy rows (lp = old,
    mean KL 0) keep their negative-advantage tokens with a threshold of 0, as in the reference."""
    g = torch.Generator().manual_seed(17)
    lp, old, A, m = _batch(g, 4, 10)
    old[:2] = lp[:2]  # mean KL exactly 0
    _check(*policy_and_reference((lp, old, A, m), cpu_backend, offpolicy_threshold=0.0))


@pytest.mark.parametrize("nan_in", ["logprobs", "old_logprobs", "rollout_logprobs"])
def test_offpolicy_mask_takes_a_nan_as_no_evidence(cpu_backend, nan_in):
    """A token whose ``old - lp`` is NaN (from the policy's, the old or the rollout log-prob) adds 0 to its row's
    mean KL, as TRL's ``get_off_policy_mask`` (``nan_to_num``): row 0 stays far (its other token's KL is 0.15 over
    2 tokens, above 0.05) and drops its negative-advantage token. A NaN log-prob of the policy made the kernels'
    row mean NaN, which kept the row."""
    lp = torch.tensor([[-1.0, -1.0], [-0.5, -0.7]])
    old = torch.tensor([[-1.0, -0.85], [-0.5, -0.7]])
    A = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    m = torch.ones(2, 2, dtype=torch.bool)
    kw = dict(offpolicy_threshold=0.05)
    if nan_in == "rollout_logprobs":
        kw["rollout_logprobs"] = old.clone()
    {"logprobs": lp, "old_logprobs": old, "rollout_logprobs": kw.get("rollout_logprobs")}[nan_in][0, 0] = math.nan
    (_, _, g), (_, _, rg) = policy_and_reference((lp, old, A, m), cpu_backend, **kw)
    assert_close(g, rg, atol=1e-7, rtol=1e-5, what="d logprobs")
    assert g[0, 1] == 0 and g[1, 1] != 0  # row 0 is far: its token of negative advantage is dropped


@pytest.mark.parametrize("lam", [(0.0, 1e-5), (5e-5, 5e-5)])
def test_vespo_small_lambda_is_floored_at_1e_4(cpu_backend, lam):
    """vespo's ``lambda`` is floored at 1e-4 (TRL's ``get_gamma_weights``: ``.clamp(min=1e-4)``), so a lambda of 0,
    1e-5 or 5e-5 gives ``phi = exp(1e-4 + k log W - 1e-4 W)``; with ``W = e^5`` a floor of 1e-3 instead would lower
    phi by 12 %."""
    g = torch.Generator().manual_seed(2)
    lp, old, A, m = _batch(g, 4, 8, spread=0.2)
    old[0] = lp[0] - 5.0 / m[0].sum()  # rows 0 (A > 0) and 2 (A < 0): log W, the sum of the log-ratios, is 5
    old[2] = lp[2] - 5.0 / m[2].sum()
    A[0], A[2] = 0.7, -0.6
    _check(*policy_and_reference((lp, old, A, m), cpu_backend, loss_type="vespo", vespo_k_pos=1.0,
                                 vespo_k_neg=1.5, vespo_lambda_pos=lam[0], vespo_lambda_neg=lam[1]))


def test_clip_cov_bounds_are_strict(cpu_backend):
    """Clip-Cov's candidates have ``cov_lb < cov < cov_ub`` (verl's ``(cov < ub) & (cov > lb)``): tokens whose
    covariance is exactly a bound are never picked. Here every token's covariance is +-0.5 (A = +-1 with mean 0,
    lp - mean lp = +-0.5) and the bounds are -0.5 and 0.5, so nothing is picked: the loss and gradient are
    plain PPO's, as the float64 reference with the reference's (empty) selection."""
    T = 8
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0]])
    lp = torch.tensor([[-1.0, -2.0, -2.0, -1.0, -1.0, -2.0, -1.0, -2.0]])
    old = lp.clone()  # ratio 1: no token is clipped, all are candidates by the clip test
    m = torch.ones(1, T, dtype=torch.bool)
    sel = reference.policy.cov_selection(lp.double(), old.double(), A.double(), m, ratio=0.5, lb=-0.5, ub=0.5,
                                         eps_low=0.2, eps_high=0.2, loss_type="clip_cov")
    assert not sel.any()
    ours, ref = policy_and_reference((lp, old, A, m), cpu_backend, ref_kw=dict(cov_selected=sel),
                                     cov_ratio=0.5, cov_lb=-0.5, cov_ub=0.5, loss_type="clip_cov")
    assert float(ours[1]["cov_selected_frac"]) == 0.0
    _check(ours, ref, tol=1e-7)


def _cpp_enum(name: str, header: str = "policy_loss.h") -> dict:
    """The members of ``enum name`` in csrc/cpu/<header>, by value (the enums count up from 0)."""
    header = (Path(__file__).resolve().parents[1] / "csrc" / "cpu" / header).read_text()
    body = re.search(rf"enum {name} : int {{([^}}]*)}}", header).group(1)
    members = [m.split("=")[0].strip() for m in body.split(",")]
    return {m: i for i, m in enumerate(members)}


def test_loss_and_kl_codes_agree_across_python_cpp_and_triton():
    """The row codes are written three times (policy_config and the kl_penalty op, the C++ enums, the Triton
    constants): they agree."""
    triton_kernel = pytest.importorskip("fastalign.kernels.policy_loss")
    triton_kl = pytest.importorskip("fastalign.kernels.kl_estimators")
    loss_rows, kl_types = _cpp_enum("LossType"), _cpp_enum("KLType", "kl_estimators.h")
    assert len(loss_rows) == len(policy_config.LOSS_CODES) and len(kl_types) == len(policy_config.KL_CODES)
    for name, code in policy_config.LOSS_CODES.items():
        spelled = name.upper().replace("_", "")  # clip_cov: CLIPCOV (Triton), kCLIPCOV (C++)
        assert getattr(triton_kernel, spelled).value == code and loss_rows["k" + spelled] == code, name
    for name, triton_name, cpp_name in (("k1", "K1", "kK1"), ("abs", "KABS", "kAbs"), ("k2", "K2", "kK2"),
                                        ("k3", "K3", "kK3")):
        code = policy_config.KL_CODES[name]
        assert getattr(triton_kl, triton_name).value == code and kl_types[cpp_name] == code, name
