"""Two precision rules of the policy losses, on every CPU backend against float64 references:

* gspo's token ratio is exp(lp - sg(lp) + sg(log s_i)) (docs/math.md#policy-losses, verl's
  ``compute_policy_loss_gspo``): a non-finite log-prob on a valid token makes lp - lp, hence the loss, NaN
  (as the reference and verl), not a finite loss from a clamped sequence mean; a masked token does not matter.
  The sequence-level ratio of the other rows (TRL's exp(mean l)) stays finite there, as TRL's.
* the k3 estimator exp(x) - x - 1 and its gradient 1 - exp(x) (x = ref - lp) are fp32-accurate at any
  small |x| (no cancellation: naive fp32 gives 0 below |x| ~ 3e-4) in kl_penalty and in policy_loss's KL term.
"""
import math

import pytest
import torch

import fastalign as fa
from fastalign.reference import policy as R
from conftest import CPU_BACKENDS
from helpers import assert_close

# the Triton interpreter's numpy warns at lp - lp = inf - inf (the NaN the tests ask for)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

OLD = torch.tensor([[-1.1, -2.0, -0.5, -0.7], [-1.0, -2.1, -0.3, -0.9]])
ADV = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
LP = torch.tensor([[-1.0, -1.5, -0.5, -0.6], [-1.0, -2.0, -0.3, -1.0]])
METRICS = ("clipfrac", "clip_low", "clip_high", "approx_kl")


def _ours(lp0, m, backend, **kw):
    lp = lp0.clone().requires_grad_(True)
    loss, met = fa.policy_loss(lp, OLD, ADV, m, backend=backend, **kw)
    loss.backward()
    return loss.detach(), lp.grad, met


def _reference(lp0, m, **kw):
    lp = lp0.double().requires_grad_(True)
    loss, met = R.policy_loss(lp, OLD.double(), ADV.double(), m.double(), **kw)
    loss.backward()
    return loss.detach(), lp.grad, met


def _compare(ours, ref):
    """Equal within fp32 rounding; NaN where the reference is NaN, inf where it is inf (the same sign)."""
    for what, a, b in [("loss", ours[0], ref[0]), ("d lp", ours[1], ref[1])] + [(k, ours[2][k], ref[2][k])
                                                                               for k in METRICS]:
        torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-5, equal_nan=True, msg=what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
@pytest.mark.parametrize("row", [0, 1])  # A > 0, A < 0
def test_gspo_non_finite_logprob_on_a_valid_token_is_nan(backend, bad, row):
    lp0 = LP.clone()
    lp0[row, 1] = bad
    m = torch.ones_like(lp0, dtype=torch.bool)
    ours, ref = _ours(lp0, m, backend, loss_type="gspo"), _reference(lp0, m, loss_type="gspo")
    assert torch.isnan(ref[0]) and torch.isnan(ours[0])
    _compare(ours, ref)  # gradients: the reference's (finite: the sequence ratio's clamp passes none at NaN)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
def test_gspo_non_finite_logprob_on_a_masked_token_does_not_matter(backend, bad):
    m = torch.ones_like(LP, dtype=torch.bool)
    m[0, 1] = False
    lp0 = LP.clone()
    lp0[0, 1] = bad
    ours = _ours(lp0, m, backend, loss_type="gspo")
    clean = _ours(LP, m, backend, loss_type="gspo")
    assert torch.isfinite(ours[0]) and torch.equal(ours[0], clean[0]) and torch.equal(ours[1], clean[1])
    assert ours[1][0, 1] == 0.0
    _compare(ours, _reference(LP, m, loss_type="gspo"))  # on the clean input: the reference multiplies by the mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-math.inf, math.inf])
def test_sequence_level_ratio_stays_finite_at_an_infinite_logprob(backend, bad):
    """importance_sampling_level="sequence" (TRL's exp(mean l), clamped to [-20, 20]) has no lp - sg(lp): finite."""
    lp0 = LP.clone()
    lp0[0, 1] = bad
    m = torch.ones_like(lp0, dtype=torch.bool)
    kw = dict(loss_type="ppo", importance_sampling_level="sequence")
    ours, ref = _ours(lp0, m, backend, **kw), _reference(lp0, m, **kw)
    assert torch.isfinite(ours[0])
    _compare(ours, ref)


def test_sequence_level_ratio_at_minus_inf_equals_trl():
    from test_parity_trl_grpo import GRPOLoss, trl_loss  # skips without TRL

    lp0 = LP.clone()
    lp0[0, 1] = -math.inf
    m = torch.ones_like(lp0, dtype=torch.bool)
    A, H = ADV[:, 0].contiguous(), torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    config = dict(loss_type="grpo", importance_sampling_level="sequence")
    tl, tg, _, _ = trl_loss(config, lp0, OLD, A, m, H)
    x = lp0.clone().requires_grad_(True)
    loss, _ = GRPOLoss(config)(x, OLD, A, m, entropy=H)
    loss.backward()
    assert torch.isfinite(tl) and torch.isfinite(loss)
    assert_close(loss, tl, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, tg, atol=1e-6, rtol=1e-5, what="d logprobs")


@pytest.mark.parametrize("bad", [-math.inf, math.inf])
def test_verl_gspo_at_an_infinite_logprob_is_nan_as_verl(bad):
    from test_parity_verl_policy import VerlPolicyLoss, make_actor, verl_loss  # skips without verl

    lp0 = LP.clone()
    lp0[0, 1] = bad
    m = torch.ones_like(lp0, dtype=torch.bool)
    actor = make_actor("gspo")
    vl, _, _, _ = verl_loss(actor, lp0, OLD, ADV, m)
    ours, _ = VerlPolicyLoss(actor)(lp0.clone().requires_grad_(True), OLD, ADV, m)
    assert torch.isnan(vl) and torch.isnan(ours)


# ---------------------------------------------------------------------------------------------------- k3
XS = [s * v for v in (1e-6, 1e-4, 1e-3, 1e-2, 0.3, 1.0, 10.0) for s in (1.0, -1.0)]


def _k3_inputs():
    """lp, ref (fp32, one token per row) and the exact x = ref - lp of those fp32 values, in float64."""
    lp = torch.full((len(XS), 1), -1.0)
    ref = lp + torch.tensor(XS)[:, None]
    x = ref.double() - lp.double()
    return lp, ref, x


def _rel(got, want):
    return ((got.double() - want) / want).abs().max().item()


@pytest.mark.parametrize("clamp", [False, True])
def test_kl_penalty_k3_is_fp32_accurate_near_zero(clamp):
    lp, ref, x = _k3_inputs()
    if clamp:  # keep the values inside the clamps (k3(10) = 2.2e4 is clamped to 10)
        keep = x.abs().flatten() <= 1.0
        lp, ref, x = lp[keep], ref[keep], x[keep]
    lpg = lp.clone().requires_grad_(True)
    v = fa.kl_penalty(lpg, ref, "k3", kl_clamp=clamp)
    (g,) = torch.autograd.grad(v.sum(), lpg)
    assert _rel(v, torch.expm1(x) - x) < 1e-5
    assert _rel(g, -torch.expm1(x)) < 1e-5
    # the float64 reference is exact too
    xr = lp.double().requires_grad_(True)
    vr = R.kl_penalty(xr, ref.double(), "k3", clamp)
    (gr,) = torch.autograd.grad(vr.sum(), xr)
    assert _rel(vr, torch.expm1(x) - x) < 1e-12 and _rel(gr, -torch.expm1(x)) < 1e-9


def test_kl_penalty_k3_is_fp32_accurate_up_to_the_series_bound():
    """0.05 <= |x| <= 0.5, where k3(x) is still small next to x: the value within a few fp32 ulps of float64's
    expm1(x) - x (the fp32 difference expm1(x) - x alone loses about four bits there, ~2e-6 relative)."""
    x = torch.linspace(0.05, 0.5, 1001)
    lp = torch.full((2 * x.numel(),), -1.0)
    ref = lp + torch.cat([x, -x])
    xd = ref.double() - lp.double()
    assert _rel(fa.kl_penalty(lp, ref, "k3"), torch.expm1(xd) - xd) < 5e-7


def test_kl_penalty_k3_second_derivative():
    lp, ref, x = _k3_inputs()
    lpg = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fa.kl_penalty(lpg, ref, "k3", kl_clamp=False).sum(), lpg, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), lpg)
    assert_close(h, torch.exp(x), atol=1e-6, rtol=1e-5, what="d2 lp")  # autograd's own expm1'(x) = expm1(x) + 1


def test_kl_penalty_k3_non_finite_x_unchanged():
    """As exp(x) - x - 1: x = -inf gives inf (d lp: 1), x = +inf gives inf - inf = NaN (d lp: -inf), NaN stays NaN."""
    lp = torch.tensor([5.0, -math.inf, math.nan]).requires_grad_(True)
    ref = torch.tensor([-math.inf, 0.0, 0.0])
    v = fa.kl_penalty(lp, ref, "k3", kl_clamp=False)
    (g,) = torch.autograd.grad(v.sum(), lp)
    assert v[0] == math.inf and torch.isnan(v[1]) and torch.isnan(v[2])
    assert g[0] == 1.0 and g[1] == -math.inf and torch.isnan(g[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clamp", [False, True])
def test_policy_loss_k3_term_is_fp32_accurate_near_zero(backend, clamp):
    """One token per call (the loss is that token's k3), A = 0: loss, d lp and the kl metric against float64."""
    lp, ref, x = _k3_inputs()
    for i in range(len(XS)):
        if clamp and abs(XS[i]) > 1.0:
            continue
        lpg = lp[i:i + 1].clone().requires_grad_(True)
        loss, met = fa.policy_loss(lpg, lp[i:i + 1], torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                   loss_type="reinforce", ref_logprobs=ref[i:i + 1], kl_coef=1.0, kl_clamp=clamp,
                                   backend=backend)
        loss.backward()
        want = torch.expm1(x[i]) - x[i]
        assert _rel(loss, want) < 1e-5, (XS[i], loss.item(), want.item())
        assert _rel(met["kl"], want) < 1e-5, XS[i]
        assert _rel(lpg.grad.flatten(), -torch.expm1(x[i])) < 1e-5, (XS[i], lpg.grad.item())
