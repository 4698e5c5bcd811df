"""Edge values of the policy-loss kernels (the C++ CPU kernel and the Triton one) against the float64 reference,
which follows the trainers' rules: a rollout ratio exactly at the mask's upper bound is kept, vespo's lambda is
floored at 1e-4, and tokens whose covariance is exactly one of Clip-Cov's bounds are not candidates."""
import pytest
import torch

from fastalign import reference
from helpers import assert_close, policy_and_reference

def _batch(B=4, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * 0.2
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 5:] = False
    m[3, :2] = False
    return lp, old, A, m


# ---------------------------------------------------------------- rollout correction
@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask"])
def test_rollout_mask_keeps_a_ratio_equal_to_its_upper_bound(cpu_backend, mode):
    """The mask modes keep a rollout ratio ``r <= rollout_max`` (TRL masks only ``r > hi``, verl's rejection
    ``r > upper``): with ``rollout_max = 1`` the tokens (or sequences) sampled by the policy itself, ``r = 1``
    exactly, keep their weight of 1, as the float64 reference."""
    lp, old, A, m = _batch(seed=1)
    roll = old.clone()
    roll[0] += 0.3  # r < 1 (in [rollout_min, 1]): kept
    roll[2, ::2] -= 0.4  # r > 1 on some tokens (and on the sequence): dropped
    ours, ref = policy_and_reference((lp, old, A, m), cpu_backend, rollout_logprobs=roll, rollout_correction=mode,
                                     rollout_min=0.01, rollout_max=1.0)
    assert ref[0].abs() > 1e-3
    assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-5, what="loss")
    assert_close(ours[2], ref[2], atol=1e-7, rtol=1e-5, what="d lp")


# ---------------------------------------------------------------- vespo
def test_vespo_small_lambda_is_floored_at_1e_4(cpu_backend):
    """vespo's ``lambda`` is floored at 1e-4 (TRL's ``get_gamma_weights``: ``.clamp(min=1e-4)``), so a lambda of 0
    or 1e-5 gives ``phi = exp(1e-4 + k log W - 1e-4 W)``; with ``W = e^5`` a floor of 1e-3 instead would lower
    phi by 12 %."""
    lp, old, A, m = _batch(seed=2)
    old = old.clone()
    old[0] = lp[0] - 5.0 / 8  # rows 0 (A > 0) and 2 (A < 0): log W, the sum of the log-ratios, is 5
    old[2] = lp[2] - 5.0 / 8
    A = A.clone()
    A[0], A[2] = 0.7, -0.6
    ours, ref = policy_and_reference((lp, old, A, m), cpu_backend, loss_type="vespo", vespo_k=(1.0, 1.5),
                                     vespo_lambda=(0.0, 1e-5))
    assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-5, what="loss")
    assert_close(ours[2], ref[2], atol=1e-7, rtol=1e-5, what="d lp")


# ---------------------------------------------------------------- Clip-Cov
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
    assert_close(ours[0], ref[0], atol=1e-7, what="loss")
    assert_close(ours[2], ref[2], atol=1e-7, what="d lp")
