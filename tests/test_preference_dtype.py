"""The working dtype of the preference losses: every log-prob input promoted together, as torch's arithmetic on them
(``chosen - rejected``, ``policy - reference``) would, whichever argument holds the wider dtype.

The data are log-probs near -2e4 whose float64 values are not float32 numbers (float32's spacing there is 2e-3),
with margins of order 1, so a float64 input rounded to float32 moves the loss by ~1e-4: the loss must be the
float64 formula's on the inputs as given (a float32 input is its own float32 value, exactly).
"""
import pytest
import torch

import fastalign as fa
from helpers import assert_close

f32, f64 = torch.float32, torch.float64
NAMES = ("chosen", "rejected", "ref_chosen", "ref_rejected")


def logprobs():
    """Float64 ``[3]`` log-probs (chosen, rejected and their references) near -2e4, each off the float32 grid, with
    log-ratios of order 1."""
    g = torch.Generator().manual_seed(0)
    c, r = -2.0e4 - torch.rand(2, 3, generator=g, dtype=f64) * 1.0e4
    c0, r0 = c - torch.rand(3, generator=g, dtype=f64), r + torch.rand(3, generator=g, dtype=f64)
    out = [c, r, c0, r0]
    assert all((t.float().double() != t).all() for t in out)
    return out


def dpo64(c, r, c0, r0, beta):
    """Float64 DPO (sigmoid) on the inputs as given."""
    d = (c.double() - c0.double()) - (r.double() - r0.double())
    return -torch.nn.functional.logsigmoid(beta * d).mean()


@pytest.mark.parametrize("wide", NAMES)
def test_one_float64_input_sets_the_working_dtype(wide):
    """One float64 log-prob among float32 ones, in each position (both orders of chosen and rejected): a float64
    loss equal to the float64 formula, the float64 input unrounded; gradients in each input's dtype."""
    lp = logprobs()
    given = [t if n == wide else t.float() for n, t in zip(NAMES, lp)]
    c, r = (t.clone().requires_grad_() for t in given[:2])
    loss, _ = fa.preference_loss(c, r, given[2], given[3], beta=1.0)
    assert loss.dtype == f64
    assert_close(loss, dpo64(c, r, given[2], given[3], 1.0), atol=1e-12, rtol=1e-12, what=f"{wide} float64")
    loss.backward()
    assert c.grad.dtype == c.dtype and r.grad.dtype == r.dtype


def test_float32_inputs_stay_float32():
    lp = [t.float() for t in logprobs()]
    loss, metrics = fa.preference_loss(*lp, beta=1.0)
    assert loss.dtype == f32 and metrics["rewards/margins"].dtype == f32
    assert_close(loss, dpo64(*lp, 1.0), atol=1e-5, rtol=1e-5, what="float32")


def test_mirrored_calls_agree():
    """chosen float32 with rejected float64 and the mirror: the same dtype, each the float64 formula on its own
    inputs (it was float32 for the first, rounding the float64 rejected log-probs, and float64 for the second)."""
    c, r, c0, r0 = logprobs()
    a, _ = fa.preference_loss(c.float(), r, c0, r0, beta=1.0)
    b, _ = fa.preference_loss(c, r.float(), c0, r0, beta=1.0)
    assert a.dtype == b.dtype == f64
    assert_close(a, dpo64(c.float(), r, c0, r0, 1.0), atol=1e-12, rtol=1e-12, what="chosen float32")
    assert_close(b, dpo64(c, r.float(), c0, r0, 1.0), atol=1e-12, rtol=1e-12, what="rejected float32")


@pytest.mark.parametrize("wide", ["logprobs", "ref_logprobs"])
def test_unpaired_promotes_logprobs_and_reference(wide):
    """unpaired_preference_loss (KTO, apo_zero_unpaired): a float64 log-prob or reference log-prob with a float32
    other gives a float64 loss, the float64 formula's."""
    lp, ref = logprobs()[:2]
    lp, ref = (lp, ref.float()) if wide == "logprobs" else (lp.float(), ref)
    desirable = torch.tensor([True, False, True])
    x = lp.double() - ref.double()
    for loss_type, beta in (("kto", 0.1), ("apo_zero_unpaired", 1.0)):
        loss, _ = fa.unpaired_preference_loss(lp, ref, desirable, loss_type=loss_type, beta=beta)
        if loss_type == "kto":
            z0 = x.mean().clamp(min=0.0)
            good, bad = 1 - torch.sigmoid(beta * (x - z0)), 1 - torch.sigmoid(beta * (z0 - x))
        else:
            good, bad = 1 - torch.sigmoid(beta * x), torch.sigmoid(beta * x)
        want = torch.where(desirable, good, bad).mean()
        assert loss.dtype == f64, (loss_type, wide)
        assert_close(loss, want, atol=1e-12, rtol=1e-12, what=f"{loss_type} {wide} float64")


def test_linear_preference_loss_float64_references():
    """LinearPreferenceLoss computes its policy log-probs in float32; float64 reference log-probs reach the loss
    unrounded (a float64 loss), on the two-pass path and the single pass alike."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 4, 8, 16
    h = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, 0] = -100
    lp = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    seq = (lp * (y != -100)).sum(-1)
    ref_c = logprobs()[2][:B]
    ref_r = ref_c + (seq[B:] - seq[:B]) + torch.tensor([0.7, -0.4], dtype=f64)  # margins of order 1
    assert (ref_r.float().double() != ref_r).all()
    want = dpo64(seq[:B], seq[B:], ref_c, ref_r, 1.0)
    for single in (False, True):
        loss, _ = fa.LinearPreferenceLoss("sigmoid", beta=1.0, single_pass=single)(
            h.clone().requires_grad_(), w.clone().requires_grad_(), y, ref_chosen_logprobs=ref_c,
            ref_rejected_logprobs=ref_r)
        assert loss.dtype == f64, single
        # the policy sums are float32 (about 1e-6 off); the references' 1e-3 off-grid parts are kept
        assert_close(loss, want, atol=1e-6, rtol=1e-6, what=f"single_pass={single}")
