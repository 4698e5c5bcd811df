"""``LigerFusedCETVDLoss`` (fastalign.integrations.liger) against Liger-Kernel 0.8's own module and a float64
reference: the per-token cross-entropy and total variation distance and d(student_logits) under random upstream
gradients, with ignored targets, a teacher row equal to the student's (the TVD's subgradient 0 at the tie), fp32
and bf16 logits, a model's logits (d(logits) written over them) and a leaf's (kept), a live ``ignore_index``, and
the bad inputs. Liger's module is a Triton kernel; without a GPU it runs here on CPU tensors in the Triton
interpreter (conftest.py)."""
import pytest
import torch

from helpers import assert_close

from fastalign.integrations.liger import LigerFusedCETVDLoss
from fastalign.reference import divergence as R

liger_ce_tvd = pytest.importorskip("liger_kernel.transformers.fused_ce_tvd",
                                   reason="liger_kernel is not installed: `pip install liger-kernel==0.8.*`")

# Liger's kernel under the interpreter multiplies -inf by 0 in its masked lanes (unused values)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V = 7, 29


def _batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(N, V, generator=g) * 2).to(dtype).to(DEVICE)
    zt = (torch.randn(N, V, generator=g) * 2).to(dtype).to(DEVICE)
    zt[3] = zs[3]  # a tie at every token: p = q, a TVD of 0 and its subgradient 0
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[1] = y[5] = -100
    g_ce = torch.randn(N, generator=g).to(DEVICE)
    g_tvd = torch.randn(N, generator=g).to(DEVICE)
    return zs, zt, y, g_ce, g_tvd


def _reference(zs, zt, y, ignore_index=-100):
    """(ce, tvd) in float64 from the logits (a leaf of ``zs``), 0 where the target is ignore_index."""
    keep = y != ignore_index
    ce = -torch.log_softmax(zs, -1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
    return torch.where(keep, ce, 0.0), torch.where(keep, R.total_variation(zs, zt), 0.0)


def _run(module, zs, zt, y, g_ce, g_tvd):
    """(ce, tvd, d(zs)) with the logits an intermediate of the graph (a model's), as a trainer calls it."""
    leaf = zs.clone().requires_grad_(True)
    ce, tvd = module(leaf * 1.0, zt, y)
    (ce * g_ce + tvd * g_tvd).sum().backward()
    return ce.detach(), tvd.detach(), leaf.grad


@pytest.mark.parametrize("dtype,tol,grad_rtol", [(torch.float32, 2e-6, 2e-6), (torch.bfloat16, 2e-3, 1e-2)])
def test_equals_liger_and_float64(dtype, tol, grad_rtol):
    """The outputs (fp32 from either dtype) within fp32 rounding; a bf16 gradient within one bf16 rounding of
    its value (2^-8 relative)."""
    zs, zt, y, g_ce, g_tvd = _batch(1, dtype)
    ce, tvd, grad = _run(LigerFusedCETVDLoss(), zs, zt, y, g_ce, g_tvd)
    ce_l, tvd_l, grad_l = _run(liger_ce_tvd.LigerFusedCETVDLoss(), zs, zt, y, g_ce, g_tvd)
    assert ce.dtype == tvd.dtype == torch.float32 and grad.dtype == dtype
    assert_close(ce, ce_l, atol=tol, rtol=tol, what="ce vs Liger")
    assert_close(tvd, tvd_l, atol=tol, rtol=tol, what="tvd vs Liger")
    assert_close(grad, grad_l, atol=tol, rtol=grad_rtol, what="d(logits) vs Liger")
    x = zs.double().requires_grad_(True)
    ce_r, tvd_r = _reference(x, zt.double(), y)
    (ce_r * g_ce + tvd_r * g_tvd).sum().backward()
    assert_close(ce, ce_r, atol=tol, rtol=tol, what="ce")
    assert_close(tvd, tvd_r, atol=tol, rtol=tol, what="tvd")
    assert_close(grad, x.grad, atol=tol, rtol=grad_rtol, what="d(logits)")
    assert tvd[3] == 0 and bool((grad[1] == 0).all()) and bool((grad[5] == 0).all())


def test_a_model_s_logits_receive_their_gradient_in_place_and_a_leaf_keeps_its_values():
    zs, zt, y, g_ce, g_tvd = _batch(2, torch.float32)
    leaf = zs.clone().requires_grad_(True)
    logits = leaf * 1.0
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.data_ptr()))
    ce, tvd = LigerFusedCETVDLoss()(logits, zt, y)
    (ce * g_ce + tvd * g_tvd).sum().backward()
    assert seen == [logits.data_ptr()]
    own = zs.clone().requires_grad_(True)
    ce, tvd = LigerFusedCETVDLoss()(own, zt, y)
    (ce * g_ce + tvd * g_tvd).sum().backward()
    assert torch.equal(own.detach(), zs)
    assert_close(own.grad, leaf.grad, atol=1e-7, what="a leaf's gradient")


def test_ignore_index_is_read_at_each_call():
    zs, zt, y, _, _ = _batch(3, torch.float32)
    y[2] = 7
    loss = LigerFusedCETVDLoss(ignore_index=7)
    ce, tvd = loss(zs, zt, y)
    assert ce[2] == 0 and tvd[2] == 0 and ce[1] != 0  # -100 is a target like another (a NaN ce: out of range)
    loss.ignore_index = -100
    ce, tvd = loss(zs, zt, y)
    assert ce[1] == 0 and ce[2] > 0
    with pytest.raises(TypeError, match="ignore_index"):
        loss.ignore_index = 1.5
    assert loss.ignore_index == -100


@pytest.mark.parametrize("call,error,match", [
    (lambda m, s, t, y: m(s[None], t[None], y[None]), ValueError, "student_logits"),
    (lambda m, s, t, y: m(s, t, y[:-1]), ValueError, "target"),
    (lambda m, s, t, y: m(s, t, y.float()), TypeError, "target"),
    (lambda m, s, t, y: m(s, t[:, :-1], y), ValueError, "teacher_logits"),
    (lambda m, s, t, y: m(s, t.double(), y), TypeError, "teacher_logits"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    zs, zt, y, _, _ = _batch(4, torch.float32)
    with pytest.raises(error, match=match):
        call(LigerFusedCETVDLoss(), zs, zt, y)
