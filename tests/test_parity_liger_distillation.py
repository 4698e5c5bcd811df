"""The fused linear distillation losses (LigerFusedLinearJSDLoss, LigerFusedLinearCosineSimilarityLoss) against
Liger-Kernel 0.8's own modules: loss, soft and hard losses, and the gradients of the student's input, weight and
bias."""
import pytest
import torch

from helpers import assert_close

from fastalign.integrations.liger import (LigerFusedLinearCosineSimilarityLoss, LigerFusedLinearJSD,
                                          LigerFusedLinearJSDLoss, LigerFusedLinearKLDivLoss)

chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger_kernel is not installed")
#: (Liger's module, fastalign's)
JSD = (chunked.LigerFusedLinearJSDLoss, LigerFusedLinearJSDLoss)
COSINE = (chunked.LigerFusedLinearCosineSimilarityLoss, LigerFusedLinearCosineSimilarityLoss)


def _inputs(seed, N=14, H=16, Ht=20, V=40, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    xt = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.3
    bt = torch.randn(V, generator=g) * 0.1 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 9]] = -100
    return x, w, b, xt, wt, bt, y


CASES = [dict(), dict(beta=0.0), dict(beta=1.0), dict(beta=0.1, temperature=0.7),
         dict(weight_hard_loss=0.0, weight_soft_loss=1.0), dict(weight_hard_loss=0.3, weight_soft_loss=0.9,
                                                                 temperature=2.0, return_soft_hard_loss=True),
         dict(return_soft_hard_loss=True, weight_hard_loss=0.0)]


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_liger(options, bias):
    _compare(options, *_inputs(0, bias=bias))


COSINE_CASES = [dict(), dict(beta=1.0), dict(beta=0.3, temperature=0.7),
                dict(weight_hard_loss=0.0, weight_soft_loss=1.0),
                dict(weight_hard_loss=0.3, weight_soft_loss=0.9, temperature=2.0, return_soft_hard_loss=True),
                dict(beta=2.5, return_soft_hard_loss=True, weight_hard_loss=0.0)]


@pytest.mark.parametrize("options", COSINE_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_cosine_similarity_matches_liger(options, bias):
    """beta * (1 - cos(z_s, z_t)) per token, beta a weight (2.5 too), the temperature scaling both rows alike."""
    _compare(options, *_inputs(10, bias=bias), pair=COSINE)


def test_cosine_similarity_of_a_teacher_pointing_with_or_against_the_student_matches_liger():
    """Teacher logits a positive multiple of the student's (cosine 1: no soft loss, no soft gradient) and a
    negative one (cosine -1), on some tokens each."""
    x, w, b, xt, wt, bt, y = _inputs(11, Ht=16)
    xt = x.clone()
    xt[1::2] *= -1.0
    _compare(dict(weight_hard_loss=0.0, weight_soft_loss=1.0, return_soft_hard_loss=True), x, w, None, xt, 3 * w,
             None, y, pair=COSINE)


def test_a_label_out_of_the_vocabulary_without_the_hard_loss_matches_liger():
    """weight_hard_loss=0: the labels are only the mask; a label outside [0, V) (not ignore_index) scores the token
    and gives Liger a finite loss (it never reads the label), so it does here (it gave NaN: 0 * NaN)."""
    x, w, b, xt, wt, bt, y = _inputs(3)
    y[4] = -1
    _compare(dict(weight_hard_loss=0.0, weight_soft_loss=1.0), x, w, b, xt, wt, bt, y)


@pytest.mark.parametrize("options", [dict(return_soft_hard_loss=True),
                                     dict(return_soft_hard_loss=True, weight_hard_loss=0.0, weight_soft_loss=1.0)])
def test_every_label_ignored_matches_liger(options):
    """No label to score: Liger divides by a token count clamped to 1, so the loss and the returned soft and hard
    losses are 0 (not 0 / 0), and the gradients are Liger's; so they are here."""
    x, w, b, xt, wt, bt, y = _inputs(8)
    y[:] = -100
    _compare(options, x, w, b, xt, wt, bt, y)


def _compare(options, x, w, b, xt, wt, bt, y, assigned=(), pair=JSD):
    """Both modules of ``pair`` built with ``options``, then the ``assigned`` options set on them as attributes."""
    outs, grads = [], []
    for cls, extra in ((pair[0], dict(compiled=False, chunk_size=4)), (pair[1], {})):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        module = cls(**options, **extra)
        for name, value in dict(assigned).items():
            setattr(module, name, value)
        out = module(leaves[0], leaves[1], xt, wt, y, leaves[2], bt)
        loss = out[0] if isinstance(out, tuple) else out
        grads.append(torch.autograd.grad(loss * 1.7, [t for t in leaves if t is not None]))
        outs.append(out if isinstance(out, tuple) else (out,))
    theirs, ours = outs
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        assert_close(o, torch.as_tensor(t), atol=1e-5, rtol=1e-5)
    for t, o in zip(*grads):
        assert_close(o, t, atol=1e-5, rtol=1e-4)


ASSIGNMENTS = [dict(beta=0.1, temperature=0.7), dict(weight_hard_loss=0.0, weight_soft_loss=1.0),
               dict(return_soft_hard_loss=True, weight_hard_loss=0.3), dict(beta=1.0, weight_soft_loss=0.2)]


@pytest.mark.parametrize("pair", [JSD, COSINE], ids=["jsd", "cosine"])
@pytest.mark.parametrize("assigned", ASSIGNMENTS, ids=["-".join(a) for a in ASSIGNMENTS])
def test_option_assignment_takes_effect_as_liger(assigned, pair):
    """Liger reads its options at each call: an option assigned after construction changes the loss as Liger's."""
    _compare({}, *_inputs(4), assigned=assigned, pair=pair)


def test_invalid_option_assignment_raises_and_keeps_the_module():
    """The constructor's checks run at each assignment (a beta of 2 or a NaN weight raised at the next call, a
    non-bool return_soft_hard_loss was read as truthy)."""
    x, w, b, xt, wt, bt, y = _inputs(5)
    loss = LigerFusedLinearJSDLoss()
    before = loss(x, w, xt, wt, y, b, bt)
    for name, value, err in (("beta", 2.0, ValueError), ("temperature", 0.0, ValueError),
                             ("weight_hard_loss", float("nan"), ValueError), ("weight_soft_loss", None, TypeError),
                             ("ignore_index", "a", TypeError), ("chunk_size", 0, ValueError),
                             ("compiled", "no", TypeError), ("return_soft_hard_loss", "yes", TypeError)):
        kept = getattr(loss, name)
        with pytest.raises(err, match=name):
            setattr(loss, name, value)
        assert getattr(loss, name) == kept
    assert torch.equal(loss(x, w, xt, wt, y, b, bt), before)


def test_bad_options():
    with pytest.raises(ValueError, match="beta"):
        LigerFusedLinearJSDLoss(beta=2.0)
    for beta, err in ((float("nan"), ValueError), (float("inf"), ValueError), (None, TypeError)):
        with pytest.raises(err, match="beta"):
            LigerFusedLinearCosineSimilarityLoss(beta=beta)
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearCosineSimilarityLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearJSDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        LigerFusedLinearJSDLoss(chunk_size=0)
    x, w, b, xt, wt, bt, y = _inputs(1)
    with pytest.raises(ValueError, match="teacher_weight"):
        LigerFusedLinearJSDLoss()(x, w, xt, wt[:-1], y)


def test_errors_name_liger_arguments():
    x, w, b, xt, wt, bt, y = _inputs(2)
    loss = LigerFusedLinearJSDLoss()
    for call, err, match in (
            (lambda: loss(x, w, xt, wt, y[:-1], b, bt), ValueError, r"true_labels must have shape .*student_input"),
            (lambda: loss(x.double(), w, xt, wt, y, b, bt), TypeError, "student_input must be"),
            (lambda: loss(x, w, xt[:-1], wt, y, b, bt), ValueError, "teacher_input must have shape"),
            (lambda: loss(x, w, xt, wt, y, b[:-1], bt), ValueError, r"student_bias must have shape .*student_weight"),
            # names only, not words: "hidden-size" stays a hidden size
            (lambda: loss(x[..., :0], w[:, :0], xt, wt, y, b, bt), ValueError,
             r"^student_input must have a non-empty hidden-size \(last\) dimension")):
        with pytest.raises(err, match=match):
            call()
    for name in ("weight_hard_loss", "weight_soft_loss"):
        with pytest.raises(TypeError, match=name):
            LigerFusedLinearJSDLoss(**{name: None})


LABELS_NONE_OPTIONS = [dict(), dict(weight_hard_loss=0.0), dict(weight_hard_loss=0.0, weight_soft_loss=1.0),
                       dict(weight_hard_loss=0.0, return_soft_hard_loss=True),
                       dict(weight_hard_loss=0.5, return_soft_hard_loss=True)]


@pytest.mark.parametrize("pair", [JSD, COSINE], ids=["jsd", "cosine"])
@pytest.mark.parametrize("options", LABELS_NONE_OPTIONS)
def test_labels_none_raises_as_liger(options, pair):
    """true_labels=None: Liger raises a TypeError with every option (it reads the labels even without the hard
    loss); so does this module, naming true_labels (it named fastalign's hard_weight, raised a KeyError with
    return_soft_hard_loss, or scored every token with weight_hard_loss=0)."""
    x, w, b, xt, wt, bt, y = _inputs(6)
    with pytest.raises(TypeError):
        pair[0](**options, compiled=False, chunk_size=4)(x, w, xt, wt, None, b, bt)
    with pytest.raises(TypeError, match="^true_labels must be a torch.Tensor, got NoneType"):
        pair[1](**options)(x, w, xt, wt, None, b, bt)


def test_second_backward_with_single_pass_false_matches_liger():
    """A second backward through a retained graph: Liger allows it; the module's single pass raises, advising
    single_pass=False, which its single_pass attribute now passes on (its gradients then match Liger's)."""
    x, w, b, xt, wt, bt, y = _inputs(7)
    module = LigerFusedLinearJSDLoss()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = module(leaves[0], leaves[1], xt, wt, y, leaves[2], bt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single_pass=False"):
        loss.backward()
    with pytest.raises(ValueError, match="^single_pass must be"):
        module.single_pass = "never"
    module.single_pass = False
    grads = []
    for m in (chunked.LigerFusedLinearJSDLoss(compiled=False, chunk_size=4), module):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = m(leaves[0], leaves[1], xt, wt, y, leaves[2], bt)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([t.grad for t in leaves])
    for name, a, b_ in zip(("student_input", "student_weight", "student_bias"), *grads):
        assert_close(b_, a, rtol=1e-5, atol=2e-6, what=f"d{name} after two backwards")


# ------------------------------------------------------------------------------------------ LigerFusedLinearJSD

transformers_jsd = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd",
                                       reason="liger_kernel is not installed")
# Liger's kernel under the interpreter subtracts -inf from -inf in its masked lanes (unused values)
jsd_lanes = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _fused_jsd_pair(options, labels):
    """Liger's LigerFusedLinearJSD (its Triton kernel: in the interpreter here) against fastalign's, same inputs:
    the loss and the gradients of the student's input and weight."""
    x, w, _, xt, wt, _, y = _inputs(11, bias=False)
    y = {"labels": y, "none": None, "all-ignored": torch.full_like(y, options.get("ignore_index", -100))}[labels]
    out = []
    for cls in (transformers_jsd.LigerFusedLinearJSD, LigerFusedLinearJSD):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = cls(**options)(xs, ws, xt, wt, y)
        out.append((loss.detach(), *torch.autograd.grad(loss, (xs, ws))))
    for name, ours, theirs in zip(("loss", "d student_input", "d student_weight"), out[1], out[0]):
        assert_close(ours, theirs, atol=2e-6, rtol=1e-5, what=name)
    assert out[1][0].dtype == torch.float32
    return out[1]


@jsd_lanes
@pytest.mark.parametrize("options", [dict(), dict(jsd_beta=0.0), dict(jsd_beta=1.0),
                                     dict(jsd_beta=0.3, temperature=1.7),
                                     dict(ignore_index=7, accum_dtype=torch.float32)])
@pytest.mark.parametrize("labels", ["labels", "none", "all-ignored"])
def test_fused_linear_jsd_matches_liger(options, labels):
    """Every row scored without shift_labels; every row ignored: a loss of 0 and no gradient, as Liger."""
    loss, dx, _ = _fused_jsd_pair(options, labels)
    assert (float(loss) == 0.0 and not dx.any()) == (labels == "all-ignored")


@jsd_lanes
def test_fused_linear_jsd_options_are_live_and_checked():
    loss_fn = LigerFusedLinearJSD()
    x, w, _, xt, wt, _, y = _inputs(3, bias=False)
    loss_fn.jsd_beta, loss_fn.temperature = 0.8, 0.6
    want = transformers_jsd.LigerFusedLinearJSD(jsd_beta=0.8, temperature=0.6)(x, w, xt, wt, y)
    assert_close(loss_fn(x, w, xt, wt, y), want, atol=2e-6, rtol=1e-5, what="loss")
    for name, value, error in (("jsd_beta", 1.5, ValueError), ("temperature", 0.0, ValueError),
                               ("accum_dtype", torch.int32, TypeError), ("ignore_index", 1.5, TypeError)):
        with pytest.raises(error, match=name):
            setattr(loss_fn, name, value)
    assert loss_fn.jsd_beta == 0.8  # a refused assignment keeps the module
    with pytest.raises(ValueError, match="shift_labels"):
        loss_fn(x, w, xt, wt, y[:3])
    with pytest.raises(ValueError, match="teacher_input"):
        loss_fn(x, w, xt[:3], wt, y)


# ------------------------------------------------------------------------------------------ LigerFusedLinearKLDivLoss

transformers_kl = pytest.importorskip("liger_kernel.transformers.fused_linear_kl_div",
                                      reason="liger_kernel is not installed")


def _kl_inputs(seed, N=12, H=16, V=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    q = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
    q[3, :5] = 0.0  # exact zeros: 0 log 0 = 0 through the clamp
    q[5] *= 0.7  # a row that does not sum to 1
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 9]] = -100
    return x, w, q, y


def _kl_pair(options, x, w, q, y, tol=2e-6):
    """Liger's LigerFusedLinearKLDivLoss (its Triton kernel: in the interpreter here) against fastalign's: the loss
    and the gradients of the student's input and weight."""
    out = []
    for cls in (transformers_kl.LigerFusedLinearKLDivLoss, LigerFusedLinearKLDivLoss):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = cls(**options)(xs, ws, q, y)
        out.append((loss.detach(), *torch.autograd.grad(loss, (xs, ws))))
    for name, ours, theirs in zip(("loss", "d student_input", "d student_weight"), out[1], out[0]):
        assert_close(ours, theirs, atol=tol, rtol=1e-5, what=name)
    return out[1]


@jsd_lanes
@pytest.mark.parametrize("options", [dict(), dict(reduction="mean"), dict(reduction="sum", temperature=0.6),
                                     dict(temperature=2.5, eps=1e-4), dict(ignore_index=7, accum_dtype=torch.float32)])
@pytest.mark.parametrize("labels", ["labels", "none", "all-ignored"])
def test_fused_linear_kl_div_matches_liger(options, labels):
    x, w, q, y = _kl_inputs(0)
    y = {"labels": y, "none": None, "all-ignored": torch.full_like(y, options.get("ignore_index", -100))}[labels]
    loss, dx, dw = _kl_pair(options, x, w, q, y)
    assert loss.dtype == torch.float32
    assert (float(loss) == 0.0 and not dx.any() and not dw.any()) == (labels == "all-ignored")


def test_fused_linear_kl_div_matches_float64():
    """Against KL(q || softmax(z / T)) in float64 plain PyTorch, and its gradients."""
    x, w, q, y = _kl_inputs(1)
    xs, ws = x.double().requires_grad_(), w.double().requires_grad_()
    m = y != -100
    qd = q.double()
    kl = (qd * (qd.clamp(min=1e-10).log() - torch.log_softmax(xs @ ws.T / 0.8, -1))).sum(-1)
    want = kl[m].sum() / m.sum()
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = LigerFusedLinearKLDivLoss(temperature=0.8)(xo, wo, q, y)
    assert_close(got, want, atol=2e-6, rtol=1e-5, what="loss")
    for name, o, t in zip(("dx", "dw"), torch.autograd.grad(got, (xo, wo)), torch.autograd.grad(want, (xs, ws))):
        assert_close(o, t, atol=2e-6, rtol=1e-4, what=name)


@jsd_lanes
def test_fused_linear_kl_div_bf16_and_ignored_nan_rows():
    """bf16 inputs against Liger's at bf16 tolerance; a NaN target row under ignore_index is never read (Liger's
    kernel skips it), so the loss and every gradient stay finite."""
    x, w, q, y = _kl_inputs(2, dtype=torch.bfloat16)
    _kl_pair(dict(), x, w, q, y, tol=2e-2)
    q[2] = float("nan")  # row 2 is ignored
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = LigerFusedLinearKLDivLoss()(xs, ws, q, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all()


@jsd_lanes
def test_fused_linear_kl_div_bf16_gradients_near_uniform_targets():
    """A student close to near-uniform targets, bf16: the gradient ((sum q) p - q) / T is small beside p and q. Ours
    are within about one bf16 rounding of float64's and no farther than Liger's (a sum of separately rounded
    gradients through lse and q . z was 30 times farther)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 16, 64, 1024
    x, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.05
    q = torch.softmax((x @ w.T) * 0.5 + torch.randn(N, V, generator=g), -1)
    xd, wd = x.bfloat16().double().requires_grad_(), w.bfloat16().double().requires_grad_()
    kl = (q.double() * (q.double().log() - torch.log_softmax(xd @ wd.T, -1))).sum() / N
    want = torch.autograd.grad(kl, (xd, wd))
    errors = {}
    for name, cls in (("liger", transformers_kl.LigerFusedLinearKLDivLoss), ("ours", LigerFusedLinearKLDivLoss)):
        xs, ws = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
        got = torch.autograd.grad(cls()(xs, ws, q), (xs, ws))
        errors[name] = [float((o.double() - r).norm() / r.norm()) for o, r in zip(got, want)]
    for ours, liger, r in zip(errors["ours"], errors["liger"], want):
        one_rounding = float((r.bfloat16().double() - r).norm() / r.norm())
        assert ours <= min(1.2 * one_rounding, liger), errors


def test_fused_linear_kl_div_options_and_inputs_are_checked():
    loss_fn = LigerFusedLinearKLDivLoss()
    x, w, q, y = _kl_inputs(3)
    loss_fn.reduction, loss_fn.temperature = "sum", 0.5
    want = transformers_kl.LigerFusedLinearKLDivLoss(reduction="sum", temperature=0.5)(x, w, q, y)
    assert_close(loss_fn(x, w, q, y), want, atol=1e-5, rtol=1e-5, what="loss")
    for name, value, error in (("reduction", "none", ValueError), ("temperature", 0.0, ValueError),
                               ("eps", -1.0, ValueError), ("accum_dtype", torch.int32, TypeError),
                               ("ignore_index", 1.5, TypeError)):
        with pytest.raises(error, match=name):
            setattr(loss_fn, name, value)
    assert loss_fn.reduction == "sum"
    with pytest.raises(ValueError, match="target"):
        loss_fn(x, w, q[:, :5], y)
    with pytest.raises(ValueError, match="shift_labels"):
        loss_fn(x, w, q, y[:3])
    with pytest.raises(TypeError, match="target"):
        loss_fn(x, w, y[:, None].expand(-1, 40), y)
