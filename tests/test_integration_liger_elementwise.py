"""``LigerJSD``, ``LigerKLDIVLoss`` and ``LigerTVDLoss`` and their functions (fastalign.integrations.liger_elementwise)
against Liger-Kernel 0.8's own modules and functions and float64: the loss, its dtype and the gradient of the input
(element by element, as Liger) under a random upstream gradient, every reduction, shift_labels with ignored rows,
fp32 and bf16, torch's legacy KLDivLoss arguments, live options, and where fastalign differs (a zero probability in
the JSD, no ignored row counted, bad options). Liger's kernels are Triton kernels; without a GPU they run here on CPU
tensors in the Triton interpreter (conftest.py)."""
import pytest
import torch

from helpers import assert_close, interpreter_fp32_scalars

from fastalign.integrations import liger_elementwise as fa_liger
from fastalign.reference import divergence as R

liger_transformers = pytest.importorskip("liger_kernel.transformers",
                                         reason="liger_kernel is not installed: `pip install liger-kernel==0.8.*`")
from liger_kernel.transformers import functional as liger_functional  # noqa: E402

# Liger's kernels under the interpreter compute unused masked lanes
# (torch warns of its legacy KLDivLoss arguments and "mean" reduction, which the tests call on purpose)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:size_average and reduce args:UserWarning"),
              pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BT, V = 6, 29
REDUCTIONS = ("none", "sum", "mean", "batchmean")
#: fp32 values within fp32 rounding; bf16 gradients within one bf16 rounding of their values (Liger's and fastalign's
#: own each, 2^-7 with the interpreter's truncating cast) and the JSD's bf16 loss within one bf16 rounding
TOLERANCES = {torch.float32: dict(atol=1e-6, rtol=1e-5, grad_rtol=1e-5),
              torch.bfloat16: dict(atol=1e-5, rtol=8e-3, grad_rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def float_scalars_in_the_interpreter(monkeypatch):
    """Liger's KL and TVD kernels call ``.to(tl.float32)`` on their float arguments, which the interpreter passes
    as Python floats: passed as fp32 scalars, as the compiler types them, Liger's own kernels run here."""
    interpreter_fp32_scalars(monkeypatch)


def _batch(seed, dtype, kind):
    g = torch.Generator().manual_seed(seed)
    zx, zy = torch.randn(BT, V, generator=g) * 2, torch.randn(BT, V, generator=g) * 2
    x = zx.softmax(-1) if kind == "probs" else zx.log_softmax(-1)
    y = zy.softmax(-1) if kind in ("probs", "kl") else zy.log_softmax(-1)
    if kind == "probs":
        y[2] = x[2]  # a tie at every element: the TVD's subgradient 0
    labels = torch.randint(0, V, (BT,), generator=g)
    labels[1] = labels[4] = -100
    return x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE), labels.to(DEVICE), g


def _run(fn, x, y, *rest, g):
    """(loss, d(x)) with the loss weighted by a random upstream gradient (scalar or per element)."""
    leaf = x.clone().requires_grad_(True)
    loss = fn(leaf, y, *rest)
    w = torch.randn(loss.shape, generator=g).to(DEVICE)
    (loss.float() * w).sum().backward()
    return loss.detach(), leaf.grad


def _both(module_fa, module_liger, x, y, *rest, seed=0):
    return (_run(module_fa, x, y, *rest, g=torch.Generator().manual_seed(seed)),
            _run(module_liger, x, y, *rest, g=torch.Generator().manual_seed(seed)))


def _compare(ours, theirs, dtype, what):
    (loss, grad), (loss_l, grad_l) = ours, theirs
    tol = TOLERANCES[dtype]
    assert loss.dtype == loss_l.dtype and loss.shape == loss_l.shape, f"{what}: {loss.dtype} {loss_l.dtype}"
    assert grad.dtype == dtype and grad_l.dtype in (dtype, torch.float32)
    assert_close(loss, loss_l, atol=tol["atol"], rtol=tol["rtol"], what=f"{what} loss vs Liger")
    assert_close(grad, grad_l, atol=1e-7, rtol=tol["grad_rtol"], what=f"{what} d(input) vs Liger")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("labelled", [False, True])
def test_jsd_equals_liger_and_float64(beta, labelled, dtype):
    x, y, labels, _ = _batch(1, dtype, "logprobs")
    rest = (labels,) if labelled else ()
    ours, theirs = _both(fa_liger.LigerJSD(beta=beta), liger_transformers.LigerJSD(beta=beta), x, y, *rest)
    _compare(ours, theirs, dtype, f"jsd beta={beta}")
    keep = (labels != -100) if labelled else torch.ones(BT, dtype=torch.bool, device=DEVICE)
    want = (R.elementwise_terms(x, y, divergence="jsd", beta=beta).sum(-1) * keep).sum() / keep.sum()
    assert_close(ours[0], want, atol=1e-6, rtol=TOLERANCES[dtype]["rtol"], what="jsd vs float64")
    func = _run(fa_liger.liger_jsd, x, y, labels if labelled else None, beta, -100, g=torch.Generator().manual_seed(0))
    func_l = _run(liger_functional.liger_jsd, x, y, labels if labelled else None, beta, -100,
                  g=torch.Generator().manual_seed(0))
    _compare(func, func_l, dtype, "liger_jsd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_equals_liger_and_torch(reduction, log_target, dtype):
    x, y, _, _ = _batch(2, dtype, "logprobs" if log_target else "kl")
    ours, theirs = _both(fa_liger.LigerKLDIVLoss(reduction=reduction, log_target=log_target),
                         liger_transformers.LigerKLDIVLoss(reduction=reduction, log_target=log_target), x, y)
    _compare(ours, theirs, dtype, f"kl {reduction}")
    want = torch.nn.functional.kl_div(x.double(), y.double(), reduction=reduction, log_target=log_target)
    assert_close(ours[0], want, atol=1e-6, rtol=TOLERANCES[dtype]["rtol"], what="kl vs torch")
    func = _run(fa_liger.liger_kl_div, x, y, True, True, reduction, log_target, 1e-10,
                g=torch.Generator().manual_seed(0))
    func_l = _run(liger_functional.liger_kl_div, x, y, True, True, reduction, log_target, 1e-10,
                  g=torch.Generator().manual_seed(0))
    _compare(func, func_l, dtype, "liger_kl_div")


def test_kl_div_takes_torch_s_constructor_and_liger_s_default_reduction():
    """``LigerKLDIVLoss(eps, *args, **kwargs)`` is an ``nn.KLDivLoss``: ``reduction`` "mean" by default, torch's
    legacy ``size_average`` / ``reduce`` map to a reduction, the first positional argument is ``eps``."""
    x, y, _, _ = _batch(3, torch.float32, "kl")
    for args, kwargs in (((), {}), ((1e-6,), {}), ((1e-10, None, False), {}), ((), dict(size_average=False))):
        ours = fa_liger.LigerKLDIVLoss(*args, **kwargs)
        theirs = liger_transformers.LigerKLDIVLoss(*args, **kwargs)
        assert isinstance(ours, torch.nn.KLDivLoss) and ours.reduction == theirs.reduction
        _compare(*_both(ours, theirs, x, y), torch.float32, f"kl {args} {kwargs}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labelled", [False, True])
def test_tvd_equals_liger_and_float64(reduction, labelled, dtype):
    """Liger's TVD kernel computes in the inputs' dtype, which the interpreter cannot do in bf16 (numpy has none): on
    the CPU Liger runs on fp32 copies of the bf16 values there (the exact value fastalign's fp32 sums approach)."""
    x, y, labels, _ = _batch(4, dtype, "probs")
    rest = (labels,) if labelled else ()
    xl, yl = (x.float(), y.float()) if dtype == torch.bfloat16 and DEVICE == "cpu" else (x, y)
    ours = _run(fa_liger.LigerTVDLoss(reduction=reduction), x, y, *rest, g=torch.Generator().manual_seed(0))
    theirs = _run(liger_transformers.LigerTVDLoss(reduction=reduction), xl, yl, *rest,
                  g=torch.Generator().manual_seed(0))
    _compare(ours, theirs, dtype, f"tvd {reduction}")
    assert bool((ours[1][2] == 0).all()), "a tie has the subgradient 0"
    func = _run(fa_liger.liger_tvd, x, y, labels if labelled else None, reduction, -100,
                g=torch.Generator().manual_seed(0))
    func_l = _run(liger_functional.liger_tvd, xl, yl, labels if labelled else None, reduction, -100,
                  g=torch.Generator().manual_seed(0))
    _compare(func, func_l, dtype, "liger_tvd")


def test_options_are_live_and_checked_at_assignment():
    x, y, labels, _ = _batch(5, torch.float32, "logprobs")
    jsd = fa_liger.LigerJSD()
    jsd.beta, jsd.ignore_index = 0.2, 7
    _compare(*_both(jsd, liger_transformers.LigerJSD(beta=0.2, ignore_index=7), x, y, labels), torch.float32,
             "assigned jsd")
    with pytest.raises(ValueError, match="beta"):
        jsd.beta = 1.5
    assert jsd.beta == 0.2
    kl = fa_liger.LigerKLDIVLoss()
    kl.reduction = "sum"
    _compare(*_both(kl, liger_transformers.LigerKLDIVLoss(reduction="sum"), x, y.exp()), torch.float32,
             "assigned kl")
    with pytest.raises(ValueError, match="reduction"):
        kl.reduction = "average"
    with pytest.raises(ValueError, match="eps"):
        kl.eps = 0.0
    tvd = fa_liger.LigerTVDLoss()
    with pytest.raises(ValueError, match="reduction"):
        tvd.reduction = "elementwise"
    with pytest.raises(ValueError, match="reduce"):
        fa_liger.liger_kl_div(x, y.exp(), True, False)  # torch's legacy argument, which Liger ignores


def test_where_fastalign_differs_from_liger():
    """A zero probability (log-prob -inf) adds 0 to the JSD (Liger: NaN); every row ignored gives 0 (Liger's TVD
    divides by a count of 0)."""
    x, y, labels, _ = _batch(6, torch.float32, "logprobs")
    x[0, 3] = y[0, 3] = float("-inf")
    leaf = x.clone().requires_grad_(True)
    loss = fa_liger.LigerJSD()(leaf, y)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(leaf.grad).all())
    assert torch.isnan(liger_transformers.LigerJSD()(x, y))
    p, q, _, _ = _batch(6, torch.float32, "probs")
    none = torch.full((BT,), -100, device=DEVICE)
    assert fa_liger.LigerTVDLoss()(p, q, none) == 0
    with pytest.raises(ZeroDivisionError):
        liger_transformers.LigerTVDLoss()(p, q, none)


def test_bad_inputs_name_the_forward_s_arguments():
    """A shape or dtype error names the argument as each forward spells it (``log_q`` / ``log_p`` / ``shift_labels``,
    ``y_pred`` / ``y_true``, ``p`` / ``q``; the functions' ``input`` / ``target``); inputs of two float dtypes are
    still read alike."""
    x, y, labels, _ = _batch(7, torch.float32, "logprobs")
    cases = [(lambda: fa_liger.LigerJSD()(x, y[:, :-1]), ValueError, r"^log_p must have shape .*\(log_q.shape\)"),
             (lambda: fa_liger.LigerJSD()(x, y, labels[:-1]), ValueError, r"^shift_labels must have shape"),
             (lambda: fa_liger.LigerJSD()(x, y, labels.float()), TypeError, r"^shift_labels must be an int"),
             (lambda: fa_liger.LigerJSD()(x.long(), y), TypeError, r"^log_q "),
             (lambda: fa_liger.LigerKLDIVLoss()(x, y.exp()[:, :-1]), ValueError, r"^y_true must have shape"),
             (lambda: fa_liger.LigerTVDLoss()(x.exp(), y.exp()[:-1]), ValueError, r"^q must have shape .*\(p.shape\)"),
             (lambda: fa_liger.LigerTVDLoss()(x.exp(), y.exp(), labels[:-1]), ValueError, r"^shift_labels must"),
             # the functions name their own arguments
             (lambda: fa_liger.liger_jsd(x, y[:, :-1]), ValueError, r"^target must have shape .*\(input.shape\)"),
             (lambda: fa_liger.liger_kl_div(x, y.exp()[:, :-1]), ValueError, r"^target must have shape"),
             (lambda: fa_liger.liger_tvd(x.exp(), y.exp(), labels[:-1]), ValueError, r"^shift_labels must")]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    _compare(*_both(fa_liger.LigerJSD(), liger_transformers.LigerJSD(), x, y.bfloat16(), labels), torch.float32,
             "jsd of fp32 and bf16 inputs")
