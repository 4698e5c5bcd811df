"""``LigerFusedLinearCrossEntropyLoss`` (fastalign.integrations.liger_cross_entropy) against Liger-Kernel 0.8's own
module and a float64 reference.

Liger's module is a Triton kernel. Without a GPU it runs here on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before Triton is imported), with two stand-ins for what the
interpreter lacks (:func:`liger_interpreter`): a float kernel argument becomes an fp32 scalar, as the compiled
kernel receives it (the interpreter passes a Python float, on which Liger calls ``.to``), and ``tanh``, a
libdevice call the interpreter cannot run, is computed from ``exp``. With a GPU both run on CUDA tensors, unpatched.
The float64 reference (:func:`_reference`) materialises the logits and follows Liger's kernel
(ops/cross_entropy.py, ops/fused_linear_cross_entropy.py) formula by formula. Each case compares the loss, every
returned metric and the gradients of the hidden states, the weight and the bias (with a random upstream gradient
for ``reduction="none"``).
"""
import inspect
import math
import os

import pytest
import torch

from helpers import assert_close, interpreter_fp32_scalars

from fastalign.integrations.liger_cross_entropy import (CrossEntropyOutput, LigerCrossEntropyLoss,
                                                       LigerFusedLinearCrossEntropyLoss)

liger_flce = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy",
                                 reason="liger_kernel is not installed: `pip install liger-kernel==0.8.*`")
from liger_kernel.transformers import cross_entropy as liger_ce  # noqa: E402
from liger_kernel.transformers.model import loss_utils  # noqa: E402
from liger_kernel.transformers.model.loss_utils import unpack_cross_entropy_result  # noqa: E402

# Liger's kernel under the interpreter multiplies -inf by 0 in its masked lanes (unused values)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, H, V = 9, 8, 13
IGNORED = (1, 4)
FIELDS = ("loss", "z_loss", "token_accuracy", "predicted_tokens")


@pytest.fixture(autouse=True)
def ieee_fp32_matmul(monkeypatch):
    """fp32 products in IEEE precision on a GPU too (fastalign's default there is TF32; Liger's is IEEE)."""
    monkeypatch.setenv("FASTALIGN_FP32_MATMUL", "ieee")


@pytest.fixture
def liger_interpreter(monkeypatch):
    """Liger's kernel runnable in the Triton interpreter (the module docstring); nothing to do on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from liger_kernel.ops import cross_entropy

    interpreter_fp32_scalars(monkeypatch)
    monkeypatch.setattr(cross_entropy, "tanh", _interpreted_tanh)


if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    @triton.jit
    def _interpreted_tanh(x):
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)


def _class_weights():
    return torch.rand(V, generator=torch.Generator().manual_seed(5), dtype=torch.float32).add(0.5).to(DEVICE)


def _batch(seed, dtype=torch.float32, bias=True, ignored=IGNORED):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[0] = int((hidden[0] @ weight.T).argmax())  # at least one argmax hit
    target[list(ignored)] = -100
    return [None if t is None else t.to(device=DEVICE, dtype=dtype) for t in (hidden, weight, b)], target.to(DEVICE)


def _outputs(out) -> dict:
    if isinstance(out, (torch.Tensor, dict)):
        return out if isinstance(out, dict) else {"loss": out}
    return {k: getattr(out, k) for k in FIELDS if getattr(out, k) is not None}


def _run(call, leaves, target, *, dtype=None, seed=0):
    """(outputs, gradients) of ``call(weight, hidden, target, bias)`` on fresh copies of ``leaves`` (cast to
    ``dtype`` when given), backward with an upstream gradient of 1 (a random one for a per-token loss)."""
    h, w, b = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in leaves]
    out = _outputs(call(w, h, target, b))
    loss = out["loss"]
    up = torch.ones_like(loss) if loss.dim() == 0 else torch.randn(
        loss.shape, generator=torch.Generator().manual_seed(seed)).to(loss)
    loss.backward(up)
    return out, [None if t is None else t.grad for t in (h, w, b)]


def _reference(weight, hidden, target, bias=None, **options):
    """Liger's loss in float64 from the materialised logits, as its kernel computes it."""
    x = hidden.double() @ weight.double().T
    if bias is not None:
        x = x + bias.double()
    return _reference_on_logits(x, target, **options)


def _reference_on_logits(x, target, *, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                         reduction="mean", softcap=None, return_z_loss=False, use_token_scaling=False,
                         return_token_accuracy=False, return_predicted_tokens=False, accum_dtype=None):
    """Liger's loss in float64 from the logits ``x`` (its cross-entropy kernel, shared by both modules)."""
    x = x.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = target != ignore_index
    y = torch.where(keep, target, 0)
    n = keep.sum()
    lse = torch.logsumexp(x, -1)
    loss = lse - x.gather(-1, y[:, None])[:, 0]
    c = torch.ones(V, dtype=torch.float64, device=x.device) if ce_weight is None else ce_weight.double()
    if ce_weight is not None:
        loss = c[y] * loss
    if label_smoothing > 0:
        eps = label_smoothing / V
        loss = loss * (1 - label_smoothing) - eps * (x * c).sum(-1) + eps * lse * c.sum()
    z = lse_square_scale * lse * lse
    if reduction == "mean":
        loss = loss / (n if ce_weight is None else c[y][keep].sum())
        z = z / n
    loss = loss + z
    if use_token_scaling:
        p_y = torch.softmax(x, -1).gather(-1, y[:, None])[:, 0].detach()
        loss, z = loss * p_y, z * p_y
    loss, z = (torch.where(keep, t, torch.zeros_like(t)) for t in (loss, z))
    hit = (keep & (x.argmax(-1) == target)).double()
    out = {"loss": loss if reduction == "none" else loss.sum()}
    if return_z_loss:
        out["z_loss"] = z if reduction == "none" else z.sum()
    if return_token_accuracy:
        out["token_accuracy"] = hit if reduction == "none" else hit.sum() / n
    if return_predicted_tokens:
        out["predicted_tokens"] = torch.where(keep, x.argmax(-1), -1)
    return out


def _reference_module(opts):
    return lambda w, h, t, b: _reference(w, h, t, b, **opts)


def _compare(got, want, *, atol, rtol, what, grad_scale=0.0, dtypes=True):
    """Outputs (their dtypes too, with ``dtypes``) and gradients; a gradient also passes within ``grad_scale``
    times its largest entry (bf16)."""
    out_a, grads_a = got
    out_b, grads_b = want
    assert sorted(out_a) == sorted(out_b), f"{what}: outputs {sorted(out_a)} != {sorted(out_b)}"
    for k in out_b:
        assert out_a[k].shape == out_b[k].shape, f"{what} {k}: shape {out_a[k].shape} != {out_b[k].shape}"
        assert not dtypes or out_a[k].dtype == out_b[k].dtype, f"{what} {k}: {out_a[k].dtype} != {out_b[k].dtype}"
        assert k == "loss" or not out_a[k].requires_grad, f"{what} {k} is not detached"
        assert_close(out_a[k], out_b[k], atol=atol, rtol=rtol, what=f"{what} {k}")
    for name, a, b in zip(("_input", "lin_weight", "bias"), grads_a, grads_b):
        assert (a is None) == (b is None), f"{what}: d{name} given on one side only"
        if a is not None:
            assert not dtypes or a.dtype == b.dtype, f"{what}: d{name} dtype {a.dtype} != {b.dtype}"
            tol = max(atol, grad_scale * float(b.abs().max()))
            assert_close(a, b, atol=tol, rtol=rtol, what=f"{what} d{name}")


CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "label_smoothing": dict(label_smoothing=0.2),
    "label_smoothing_none": dict(label_smoothing=0.3, reduction="none"),
    "label_smoothing_one": dict(label_smoothing=1.0),  # the bound Liger accepts: the loss is the smoothing alone
    "z_loss": dict(lse_square_scale=0.1, return_z_loss=True),
    "z_loss_sum_scaled": dict(lse_square_scale=0.05, return_z_loss=True, reduction="sum", use_token_scaling=True),
    "z_loss_reported_at_zero_scale": dict(return_z_loss=True, reduction="none"),
    "softcap": dict(softcap=2.5, lse_square_scale=0.02, return_z_loss=True),
    "softcap_smoothing": dict(softcap=2.5, label_smoothing=0.2),
    "softcap_smoothing_none_z": dict(softcap=3.0, label_smoothing=0.3, lse_square_scale=0.02, reduction="none"),
    "token_scaling": dict(use_token_scaling=True),
    "ce_weight": dict(ce_weight="w"),
    "ce_weight_smoothing_z": dict(ce_weight="w", label_smoothing=0.3, lse_square_scale=0.05, return_z_loss=True),
    "ce_weight_softcap_none": dict(ce_weight="w", softcap=3.0, reduction="none"),
    "ce_weight_softcap_smoothing": dict(ce_weight="w", softcap=2.5, label_smoothing=0.2, lse_square_scale=0.02,
                                        return_z_loss=True),
    "accuracy_predicted": dict(return_token_accuracy=True, return_predicted_tokens=True),
    "accuracy_none": dict(return_token_accuracy=True, reduction="none", label_smoothing=0.1),
    "everything": dict(label_smoothing=0.1, lse_square_scale=0.01, return_z_loss=True, use_token_scaling=True,
                       return_token_accuracy=True, return_predicted_tokens=True, reduction="sum"),
    "ignore_index_a_class": dict(ignore_index=3),
    "accum_dtype": dict(accum_dtype=torch.float32, label_smoothing=0.1),
}


def _opts(case):
    opts = dict(CASES[case])
    if opts.get("ce_weight") == "w":
        opts["ce_weight"] = _class_weights()
    return opts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_liger_and_float64_reference(case, bias, liger_interpreter):
    opts = _opts(case)
    leaves, target = _batch(1, bias=bias)
    if opts.get("ignore_index") == 3:
        target[target == -100] = 3
    _against_liger_and_float64(_run, LigerFusedLinearCrossEntropyLoss(**opts),
                               liger_flce.LigerFusedLinearCrossEntropyLoss(**opts), _reference_module(opts), leaves,
                               target, case)


def _against_liger_and_float64(run, ours, liger, reference, inputs, target, what):
    """fastalign's module against Liger's and the float64 reference, at fp32 tolerances (``run``: how each is
    called on ``inputs``)."""
    fa = run(ours, inputs, target)
    _compare(fa, run(liger, inputs, target), atol=2e-6, rtol=1e-5, what=f"{what} vs Liger")
    _compare(fa, run(reference, inputs, target, dtype=torch.float64), atol=2e-6, rtol=1e-5,
             what=f"{what} vs float64", dtypes=False)


@pytest.mark.parametrize("case", ["mean", "none", "label_smoothing", "z_loss", "softcap", "softcap_smoothing",
                                  "ce_weight_smoothing_z",
                                  "everything"])
def test_bf16_matches_liger(case, liger_interpreter):
    """bf16 hidden states and head: Liger rounds the logits to bf16 before its fp32 softmax (fastalign keeps them
    in fp32) and keeps bf16 gradients; the float64 reference runs on the same bf16 values widened."""
    opts = _opts(case)
    opts.pop("return_predicted_tokens", None)  # an argmax may flip between bf16-rounded and fp32 logits
    opts.pop("return_token_accuracy", None)
    leaves, target = _batch(2, dtype=torch.bfloat16)
    fa = _run(LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    lg = _run(liger_flce.LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    ref = _run(_reference_module(opts), leaves, target, dtype=torch.float64)
    _compare(fa, lg, atol=1e-3, rtol=8e-3, grad_scale=2e-2, what=f"bf16 {case} vs Liger")
    # against float64 on the same bf16 inputs (the z-loss and the gradients rounded to bf16 once)
    _compare(fa, ref, atol=1e-4, rtol=4e-3, grad_scale=1e-2, what=f"bf16 {case} vs float64", dtypes=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored_matches_liger(reduction, liger_interpreter):
    """A loss of 0 and no gradient; the token accuracy 0 / 0 = NaN (per target: 0), as Liger."""
    opts = dict(reduction=reduction, lse_square_scale=0.1, return_z_loss=True, return_token_accuracy=True,
                ce_weight=_class_weights(), label_smoothing=0.1)
    leaves, target = _batch(3, ignored=range(N))
    fa = _run(LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    lg = _run(liger_flce.LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    _compare(fa, lg, atol=0.0, rtol=0.0, what=f"all ignored {reduction}")
    assert (fa[0]["loss"] == 0).all() and all((g == 0).all() for g in fa[1])
    if reduction != "none":
        assert math.isnan(float(fa[0]["token_accuracy"]))


def test_token_accuracy_with_ignore_index_a_class_matches_liger(liger_interpreter):
    """ignore_index set to a class that is the argmax of an ignored row: that row is no hit (Liger's kernel leaves
    ignored rows before counting), the accuracy is over the targets not ignored, and its predicted token is -1."""
    leaves, target = _batch(10)
    h, w, b = leaves
    klass = int((h[IGNORED[0]] @ w.T + b).argmax())
    target = torch.where(target == klass, (klass + 1) % V, target)  # only the ignored rows carry the class
    target[list(IGNORED)] = klass
    opts = dict(ignore_index=klass, return_token_accuracy=True, return_predicted_tokens=True)
    fa = _run(LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    lg = _run(liger_flce.LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    ref = _run(_reference_module(opts), leaves, target, dtype=torch.float64)
    _compare(fa, lg, atol=2e-6, rtol=1e-5, what="ignore_index a class vs Liger")
    _compare(fa, ref, atol=2e-6, rtol=1e-5, what="ignore_index a class vs float64", dtypes=False)
    assert float(fa[0]["token_accuracy"]) < 1.0 and (fa[0]["predicted_tokens"][list(IGNORED)] == -1).all()


def test_ce_weight_takes_no_gradient_as_liger(liger_interpreter):
    """Class weights that require a gradient (a learnable rescaling) get none from the loss, as from Liger's; the
    loss and the other gradients are Liger's."""
    opts = dict(label_smoothing=0.2, lse_square_scale=0.05)
    leaves, target = _batch(11)
    got, grads = [], []
    for cls in (LigerFusedLinearCrossEntropyLoss, liger_flce.LigerFusedLinearCrossEntropyLoss):
        c = _class_weights().requires_grad_(True)
        out = _run(cls(ce_weight=c, **opts), leaves, target)
        got.append(out)
        grads.append(c.grad)
    assert grads == [None, None]
    _compare(got[0], got[1], atol=2e-6, rtol=1e-5, what="ce_weight requiring a gradient vs Liger")


def test_label_smoothing_class_sums_over_several_blocks_match_liger(liger_interpreter, monkeypatch):
    """The class-weighted sum of the head rows for label smoothing is formed a block of rows at a time: with
    blocks of 3 rows (5 blocks of a 13-row head) the loss and the gradients are Liger's."""
    from fastalign import linear_mean

    monkeypatch.setattr(linear_mean, "_CLASS_BLOCK_ELEMENTS", 3 * H)
    opts = dict(ce_weight=_class_weights(), label_smoothing=0.3, reduction="sum")
    leaves, target = _batch(12)
    fa = _run(LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    lg = _run(liger_flce.LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    ref = _run(_reference_module(opts), leaves, target, dtype=torch.float64)
    _compare(fa, lg, atol=2e-6, rtol=1e-5, what="blocked class sums vs Liger")
    _compare(fa, ref, atol=2e-6, rtol=1e-5, what="blocked class sums vs float64", dtypes=False)


def test_signature_matches_liger():
    for meth in ("__init__", "forward"):
        a = inspect.signature(getattr(LigerFusedLinearCrossEntropyLoss, meth)).parameters
        b = inspect.signature(getattr(liger_flce.LigerFusedLinearCrossEntropyLoss, meth)).parameters
        assert [(p.name, p.default) for p in a.values()] == [(p.name, p.default) for p in b.values()], meth


def test_return_type_follows_the_flags():
    leaves, target = _batch(4)
    h, w, b = leaves
    assert isinstance(LigerFusedLinearCrossEntropyLoss()(w, h, target, b), torch.Tensor)
    for flag in ("return_z_loss", "return_token_accuracy", "return_predicted_tokens"):
        out = LigerFusedLinearCrossEntropyLoss(**{flag: True})(w, h, target, b)
        assert isinstance(out, CrossEntropyOutput), flag
        given = [k for k in FIELDS if getattr(out, k) is not None]
        assert given == ["loss", flag.removeprefix("return_")], (flag, given)
        # Liger's model patches read a result by position (Liger's own class aside)
        unpacked = unpack_cross_entropy_result(out)
        assert all(a is getattr(out, k) for a, k in zip(unpacked, FIELDS, strict=True)), flag


def _fastalign_functional(input, weight, target, bias=None, chunk_mem_const=1, **options):
    """Liger's ``liger_fused_linear_cross_entropy`` computed by the drop-in module."""
    return LigerFusedLinearCrossEntropyLoss(**options)(weight, input, target, bias)


@pytest.mark.parametrize("num_items_in_batch", [None, 5])
def test_liger_causal_lm_loss_through_the_drop_in_matches_liger(num_items_in_batch, liger_interpreter, monkeypatch):
    """Liger's ``LigerForCausalLMLoss`` (what its model patches call) with the token accuracy and the predicted
    tokens, its fused cross entropy replaced by the drop-in: the loss, the metrics and the gradients of Liger's own
    (``num_items_in_batch``: its ``reduction="sum"`` path, the loss divided by the count)."""
    leaves, _ = _batch(8, bias=False)
    labels = torch.randint(0, V, (3, 3), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    labels[1, 0] = -100
    flags = dict(return_token_accuracy=True, return_predicted_tokens=True, num_items_in_batch=num_items_in_batch)

    def causal_lm(w, h, t, b):
        return loss_utils.LigerForCausalLMLoss(h.view(3, 3, H), w, t, hidden_size=H, **flags)

    lg = _run(causal_lm, leaves, labels)
    monkeypatch.setattr(loss_utils.F, "liger_fused_linear_cross_entropy", _fastalign_functional)
    fa = _run(causal_lm, leaves, labels)
    assert sorted(fa[0]) == ["loss", "predicted_tokens", "token_accuracy"]
    _compare(fa, lg, atol=2e-6, rtol=1e-5, what=f"LigerForCausalLMLoss, num_items_in_batch={num_items_in_batch}")


@pytest.mark.parametrize("case", ["mean", "none", "z_loss", "ce_weight_smoothing_z", "everything"])
def test_float64_matches_liger(case, liger_interpreter):
    """float64 hidden states and head, which Liger takes: computed in fp32, with Liger's dtypes (an fp32 loss and
    metrics, a float64 z-loss and float64 gradients)."""
    opts = _opts(case)
    leaves, target = _batch(9, dtype=torch.float64)
    fa = _run(LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    lg = _run(liger_flce.LigerFusedLinearCrossEntropyLoss(**opts), leaves, target)
    ref = _run(_reference_module(opts), leaves, target)
    _compare(fa, lg, atol=2e-6, rtol=1e-5, what=f"float64 {case} vs Liger")
    _compare(fa, ref, atol=2e-6, rtol=1e-5, what=f"float64 {case} vs float64", dtypes=False)


def test_option_assignment_takes_effect_as_liger(liger_interpreter):
    leaves, target = _batch(5)
    fa_mod, lg_mod = LigerFusedLinearCrossEntropyLoss(), liger_flce.LigerFusedLinearCrossEntropyLoss()
    for name, value in (("reduction", "sum"), ("label_smoothing", 0.25), ("lse_square_scale", 0.1),
                        ("return_z_loss", True), ("ce_weight", _class_weights())):
        setattr(fa_mod, name, value)
        setattr(lg_mod, name, value)
        _compare(_run(fa_mod, leaves, target), _run(lg_mod, leaves, target), atol=2e-6, rtol=1e-5,
                 what=f"after {name} = {value!r}")


def test_second_backward_through_a_retained_graph():
    leaves, target = _batch(6)
    h, w, b = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1, lse_square_scale=0.1)(w, h, target, b)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    loss.backward()
    for a, t in zip(first, (h, w, b)):
        assert_close(t.grad, 2 * a, atol=1e-6, rtol=1e-6, what="second backward")


@pytest.mark.parametrize("opts, err, word", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(lse_square_scale=float("nan")), ValueError, "lse_square_scale"),
    (dict(return_z_loss=1), TypeError, "return_z_loss"),
    (dict(use_token_scaling="yes"), TypeError, "use_token_scaling"),
    (dict(return_token_accuracy=None), TypeError, "return_token_accuracy"),
    (dict(return_predicted_tokens=0), TypeError, "return_predicted_tokens"),
    (dict(accum_dtype=torch.int32), TypeError, "accum_dtype"),
    (dict(accum_dtype="float32"), TypeError, "accum_dtype"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(ce_weight=torch.ones(V, 2)), ValueError, "ce_weight"),
    (dict(ce_weight=torch.ones(V, dtype=torch.int64)), TypeError, "ce_weight"),
])
def test_refused_options_raise_at_construction_and_assignment(opts, err, word):
    with pytest.raises(err, match=word):
        LigerFusedLinearCrossEntropyLoss(**opts)
    base = {k: v for k, v in opts.items() if len(opts) > 1 and k in ("softcap", "ce_weight")}  # smoothing last
    module = LigerFusedLinearCrossEntropyLoss(**base)
    before = {k: getattr(module, k) for k in module.OPTIONS}
    name, value = next((k, v) for k, v in opts.items() if k not in base)
    with pytest.raises(err, match=word):
        setattr(module, name, value)
    assert {k: getattr(module, k) for k in module.OPTIONS} == before, "a refused assignment changed the module"


def test_class_weighted_smoothing_of_a_softcapped_head_takes_a_mean_pass_of_its_own(liger_interpreter, monkeypatch):
    """Class weights, label smoothing and a softcap together (assigned after construction too): the weighted sum
    of the softcapped logits comes from ``linear_mean_logits`` over the scored rows only (one call), and the loss
    and gradients are Liger's; without class weights the log-probs' own pass gives it (no such call)."""
    from fastalign.integrations import liger_cross_entropy

    calls = []
    real = liger_cross_entropy.linear_mean_logits
    monkeypatch.setattr(liger_cross_entropy, "linear_mean_logits",
                        lambda *args, **kw: calls.append(kw["response_mask"]) or real(*args, **kw))
    module = LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1, ce_weight=_class_weights())
    module.softcap = 2.0
    leaves, target = _batch(13)
    fa = _run(module, leaves, target)
    assert len(calls) == 1 and torch.equal(calls[0], target != -100)
    lg = _run(liger_flce.LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1, ce_weight=_class_weights(),
                                                          softcap=2.0), leaves, target)
    _compare(fa, lg, atol=2e-6, rtol=1e-5, what="class-weighted smoothing, softcap assigned")
    _run(LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1, softcap=2.0), leaves, target)
    assert len(calls) == 1


def test_call_errors_name_liger_arguments():
    leaves, target = _batch(7)
    h, w, b = leaves
    loss = LigerFusedLinearCrossEntropyLoss()
    with pytest.raises(ValueError, match="_input"):
        loss(w, h[None], target[None], b)
    with pytest.raises(ValueError, match="target"):
        loss(w, h, target[:-1], b)
    with pytest.raises(TypeError, match="target"):
        loss(w, h, target.float(), b)
    with pytest.raises(ValueError, match="lin_weight"):
        loss(w[:, :-1], h, target, b)
    with pytest.raises(TypeError, match="lin_weight"):
        loss(w.double(), h, target, b)
    with pytest.raises(TypeError, match="_input"):
        loss(w, h.double(), target, b)
    with pytest.raises(ValueError, match="bias"):
        loss(w, h, target, b[:-1])
    with pytest.raises(ValueError, match="ce_weight"):
        LigerFusedLinearCrossEntropyLoss(ce_weight=torch.ones(V + 1))(w, h, target, b)


@pytest.mark.parametrize("opts", [dict(lse_square_scale=0.1, return_z_loss=True), dict(label_smoothing=0.2),
                                  dict(ce_weight="w")], ids=["z_loss", "label_smoothing", "ce_weight"])
def test_a_target_out_of_range_off_the_host_gives_nan_with_every_option(opts, monkeypatch):
    """Where the targets are not read on the host, a target outside [0, V) gives a NaN loss and NaN gradients with
    the options that read its row of the head or its class weight too (the row gather of the z-loss and the
    smoothing, the class weight): no out-of-bounds index (an IndexError here, a device-side assert on a GPU)."""
    from fastalign import _validate

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(V, 8, generator=g, requires_grad=True)
    target = torch.tensor([1, 2, -100, V, 4, 5])
    opts = dict(opts, ce_weight=_class_weights().cpu()) if opts.get("ce_weight") == "w" else opts
    loss_fn = LigerFusedLinearCrossEntropyLoss(**opts)
    with pytest.raises(ValueError, match=rf"^target must lie in \[0, {V}\) or equal -100"):
        loss_fn(weight, hidden, target)
    monkeypatch.setattr(_validate, "eager", lambda *tensors: False)
    out = loss_fn(weight, hidden, target)
    loss = out.loss if isinstance(out, CrossEntropyOutput) else out
    loss.backward()
    assert loss.isnan() and hidden.grad[target != -100].isnan().all() and weight.grad.isnan().all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_target_out_of_range_is_refused(reduction, monkeypatch):
    """Liger's kernel reads out of bounds for a target outside [0, V) (not ignore_index); the fused op gives it a
    NaN log-prob with a finite gradient, so the adapter refuses it: a ValueError naming ``target`` where the
    targets are an eager CPU tensor, elsewhere (not read on the host) a NaN loss and NaN gradients."""
    from fastalign import _validate

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, requires_grad=True)
    target = torch.tensor([1, 2, -100, 20, 4, 5])  # 20 = V
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
    with pytest.raises(ValueError, match=r"^target must lie in \[0, 20\) or equal -100"):
        loss_fn(weight, hidden, target)
    monkeypatch.setattr(_validate, "eager", lambda *tensors: False)
    loss = loss_fn(weight, hidden, target)
    loss.sum().backward()
    scored = target != -100  # an ignored row's d(hidden) stays 0, as documented for the fused ops
    assert loss.isnan().all() and hidden.grad[scored].isnan().all() and weight.grad.isnan().all()
    assert (hidden.grad[~scored] == 0).all()
    hidden.grad = weight.grad = None
    loss_fn(weight, hidden, target.clamp(max=19)).sum().backward()  # in range: finite, as before
    assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()


# LigerCrossEntropyLoss: the same kernel on materialised logits; its class weights are named ``weight``

#: the cases of CASES the logits module takes (Liger's has no use_token_scaling and no accum_dtype)
LOGITS_CASES = {case: opts for case, opts in CASES.items()
                if "use_token_scaling" not in opts and "accum_dtype" not in opts}


def _logits_opts(case) -> dict:
    """The options of a case for LigerCrossEntropyLoss (``ce_weight`` named ``weight``)."""
    opts = dict(LOGITS_CASES[case])
    if "ce_weight" in opts:
        opts["weight"] = _class_weights()
        del opts["ce_weight"]
    return opts


def _logits(seed, dtype=torch.float32, ignored=IGNORED):
    """``(logits [N, V], target)``: the logits of a head (so that they have its spread), one target their argmax."""
    (h, w, b), target = _batch(seed, ignored=ignored)
    return (h @ w.T + b).detach().to(dtype), target


def _run_logits(call, logits, target, *, dtype=None, seed=0):
    """(outputs, [d logits]) of ``call(logits, target)`` as :func:`_run` gives them."""
    return _run(lambda w, x, t, b: call(x, t), [logits, None, None], target, dtype=dtype, seed=seed)


def _reference_logits(opts):
    """The float64 reference of LigerCrossEntropyLoss(**opts)."""
    options = {("ce_weight" if k == "weight" else k): v for k, v in opts.items()}
    return lambda x, t: _reference_on_logits(x, t, **options)


@pytest.mark.parametrize("case", sorted(LOGITS_CASES))
def test_logits_module_matches_liger_and_float64_reference(case, liger_interpreter):
    opts = _logits_opts(case)
    logits, target = _logits(1)
    if opts.get("ignore_index") == 3:
        target[target == -100] = 3
    _against_liger_and_float64(_run_logits, LigerCrossEntropyLoss(**opts), liger_ce.LigerCrossEntropyLoss(**opts),
                               _reference_logits(opts), logits, target, f"logits {case}")


@pytest.mark.parametrize("case", ["mean", "none", "label_smoothing", "z_loss", "softcap", "softcap_smoothing",
                                  "ce_weight_smoothing_z", "ce_weight_softcap_smoothing"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_logits_module_in_bf16_and_float64_matches_liger(case, dtype, liger_interpreter):
    """bf16 logits (read as they are, statistics in fp32) and float64 ones (computed in fp32, as Liger): Liger's
    outputs, their dtypes and the gradient's."""
    opts = _logits_opts(case)
    logits, target = _logits(2, dtype=dtype)
    fa = _run_logits(LigerCrossEntropyLoss(**opts), logits, target)
    lg = _run_logits(liger_ce.LigerCrossEntropyLoss(**opts), logits, target)
    ref = _run_logits(_reference_logits(opts), logits, target, dtype=torch.float64)
    bf16 = dtype == torch.bfloat16
    _compare(fa, lg, atol=1e-3 if bf16 else 2e-6, rtol=8e-3 if bf16 else 1e-5, grad_scale=2e-2 if bf16 else 0.0,
             what=f"{dtype} logits {case} vs Liger")
    _compare(fa, ref, atol=1e-4 if bf16 else 2e-6, rtol=4e-3 if bf16 else 1e-5, grad_scale=1e-2 if bf16 else 0.0,
             what=f"{dtype} logits {case} vs float64", dtypes=False)


def _through_a_head(module, overwritten: list):
    """``call(weight, hidden, target, bias)`` of ``module`` on the head's logits ``hidden @ weight.T + bias``, an
    intermediate as a model's are; appends to ``overwritten`` whether d(logits) came back in the logits' buffer."""
    def call(w, h, t, b):
        x = h @ w.T + b
        x.register_hook(lambda g: overwritten.append(g.data_ptr() == x.data_ptr()))
        return module(x, t)
    return call


@pytest.mark.parametrize("case", sorted(LOGITS_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_module_on_a_head_s_logits_writes_over_them_and_matches_liger(case, dtype, liger_interpreter):
    """A head's logits (an intermediate, as a model's): the backward writes d(logits) over them, as Liger's kernel
    writes over its input, with every option (the gradients of ``z_y`` and ``sum_j c_j z_j`` for the smoothing and
    the z-loss formed in the same blocks of rows); the head's gradients equal Liger's and the float64 reference's."""
    opts = _logits_opts(case)
    leaves, target = _batch(4)
    if opts.get("ignore_index") == 3:
        target[target == -100] = 3
    overwritten = []
    fa = _run(_through_a_head(LigerCrossEntropyLoss(**opts), overwritten), leaves, target, dtype=dtype)
    lg = _run(_through_a_head(liger_ce.LigerCrossEntropyLoss(**opts), []), leaves, target, dtype=dtype)
    ref = _run(lambda w, h, t, b: _reference_logits(opts)(h @ w.T + b, t), leaves, target, dtype=torch.float64)
    bf16 = dtype == torch.bfloat16
    _compare(fa, lg, atol=2e-3 if bf16 else 2e-6, rtol=8e-3 if bf16 else 1e-5, grad_scale=2e-2 if bf16 else 0.0,
             what=f"{dtype} head logits {case} vs Liger")
    _compare(fa, ref, atol=2e-3 if bf16 else 2e-6, rtol=8e-3 if bf16 else 1e-5, grad_scale=2e-2 if bf16 else 0.0,
             what=f"{dtype} head logits {case} vs float64", dtypes=False)
    assert overwritten == [True], case


@pytest.mark.parametrize("softcap", [None, 2.5], ids=["no softcap", "softcap"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class weights"])
@pytest.mark.parametrize("head", [True, False], ids=["head logits", "leaf logits"])
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float32, 1e3)],
                         ids=["fp32", "bf16", "fp32 logits of 1e3"])
def test_smoothing_and_z_loss_rows_over_several_blocks(head, dtype, weighted, softcap, scale, monkeypatch):
    """With label smoothing and a z-loss (or a softcap) the rows go a block of rows at a time, forward and backward:
    blocks of 2 rows (the last one short) give the float64 reference's loss and gradients, written over a head's
    logits or into a new tensor for a leaf, at logits of 1e3 too (the backward's softmax of each block is exact at
    any scale; a bf16 head's own product rounds logits of 1e3 by units, so that scale runs in fp32)."""
    from fastalign.integrations import liger_cross_entropy

    monkeypatch.setattr(liger_cross_entropy, "_BLOCK_ELEMENTS", 2 * V + 1)
    opts = dict(softcap=softcap, label_smoothing=0.2, lse_square_scale=0.02, return_token_accuracy=True,
                **(dict(weight=_class_weights()) if weighted else {}))
    if head:
        (h, w, b), target = _batch(10)
        leaves = [h * scale, w, b]
        call = _through_a_head(LigerCrossEntropyLoss(**opts), [])
        ref = _run(lambda w, h, t, b: _reference_logits(opts)(h @ w.T + b, t), leaves, target, dtype=torch.float64)
        got = _run(call, leaves, target, dtype=dtype)
    else:
        logits, target = _logits(10)
        logits = logits * scale
        ref = _run_logits(_reference_logits(opts), logits, target, dtype=torch.float64)
        got = _run_logits(LigerCrossEntropyLoss(**opts), logits, target, dtype=dtype)
    bf16 = dtype == torch.bfloat16
    _compare(got, ref, atol=2e-3 if bf16 else 2e-6, rtol=8e-3 if bf16 else 1e-5, grad_scale=2e-2 if bf16 else 0.0,
             what=f"blocked rows, {dtype}", dtypes=False)


@pytest.mark.parametrize("softcap", [None, 2.5, 1000.0])
def test_logits_module_nan_in_a_row_stays_in_it(softcap):
    """A NaN logit in a row whose target is ignored changes nothing (its gradient is 0); in a scored row it makes
    that row's loss and gradient NaN and no other's (``reduction="none"``, smoothing and a z-loss on). A softcap of
    1000 on logits of 1e4 puts ``e^(z - z_0)`` of an ignored row past fp32's range, which must not leak either."""
    logits, target = _logits(11)
    logits = logits * (1e4 if softcap == 1000.0 else 1.0)
    loss_fn = LigerCrossEntropyLoss(softcap=softcap, label_smoothing=0.1, lse_square_scale=0.01, reduction="none")
    up = torch.rand(N, generator=torch.Generator().manual_seed(3))

    def run(x):
        x = x.clone().requires_grad_()
        loss = loss_fn(x * 1.0, target)  # an intermediate: the backward writes over it
        loss.backward(up)
        return loss.detach(), x.grad

    clean_loss, clean_grad = run(logits)
    assert clean_loss.isfinite().all() and clean_grad.isfinite().all()
    ignored, scored = IGNORED[0], 2
    poisoned = logits.clone()
    poisoned[ignored, 3] = float("nan")
    loss, grad = run(poisoned)
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad) and (grad[ignored] == 0).all()
    poisoned[scored, 5] = float("nan")
    loss, grad = run(poisoned)
    others = [r for r in range(N) if r != scored]
    assert loss[scored].isnan() and grad[scored].isnan().all()
    assert torch.equal(loss[others], clean_loss[others]) and torch.equal(grad[others], clean_grad[others])


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_logits_module_leaves_a_leaf_s_values_and_refuses_a_second_backward_over_written_logits(softcap):
    """A leaf ``_input`` keeps its values (its gradient is a new tensor) and can be differentiated twice through a
    retained graph; a head's logits, written over by the first backward, make the second raise torch's in-place
    error rather than give a wrong gradient; a leaf further up keeps that buffer as its ``.grad``, uncopied."""
    logits, target = _logits(8)
    loss_fn = LigerCrossEntropyLoss(softcap=softcap)
    leaf = logits.clone().requires_grad_()
    loss = loss_fn(leaf, target)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    assert torch.equal(leaf.detach(), logits) and leaf.grad.data_ptr() != leaf.data_ptr()
    assert_close(leaf.grad, 2 * first, atol=1e-7, rtol=1e-6, what="second backward of a leaf")
    head_logits = leaf * 1.0
    loss = loss_fn(head_logits, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    fresh = logits.clone().requires_grad_()
    passed_on = fresh + 0  # its backward hands d(logits) on as it is
    loss_fn(passed_on, target).backward()
    assert fresh.grad.data_ptr() == passed_on.data_ptr()  # the leaf keeps the logits' buffer, not a copy


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, lse_square_scale=0.01), dict(softcap=2.5),
                                  dict(softcap=2.5, label_smoothing=0.1, weight="w")], ids=str)
def test_logits_module_on_a_head_s_logits_compiles_as_eager(opts, backend):
    """``torch.compile(fullgraph=True)`` of the head and the module (the backward written over the logits): the
    eager loss and gradients."""
    leaves, target = _batch(9, bias=False)
    module = LigerCrossEntropyLoss(**{k: _class_weights() if v == "w" else v for k, v in opts.items()})
    step = torch.compile(lambda w, h, t, b: module(h @ w.T, t), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    got = _run(step, leaves, target)
    _compare(got, _run(lambda w, h, t, b: module(h @ w.T, t), leaves, target), atol=1e-6, rtol=1e-5,
             what=f"compiled {opts}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_module_with_every_target_ignored_matches_liger(reduction, liger_interpreter):
    opts = dict(reduction=reduction, lse_square_scale=0.1, return_z_loss=True, return_token_accuracy=True,
                weight=_class_weights(), label_smoothing=0.1, softcap=3.0)
    logits, target = _logits(3, ignored=range(N))
    fa = _run_logits(LigerCrossEntropyLoss(**opts), logits, target)
    lg = _run_logits(liger_ce.LigerCrossEntropyLoss(**opts), logits, target)
    _compare(fa, lg, atol=0.0, rtol=0.0, what=f"logits, all ignored, {reduction}")
    assert (fa[0]["loss"] == 0).all() and (fa[1][0] == 0).all()


def test_logits_module_signature_and_options_are_liger_s(liger_interpreter):
    """Liger's constructor and forward; options assigned between calls take effect as in Liger's module; a
    refused value raises at the assignment, naming it, and leaves the module as it was."""
    for meth in ("__init__", "forward"):
        a = inspect.signature(getattr(LigerCrossEntropyLoss, meth)).parameters
        b = inspect.signature(getattr(liger_ce.LigerCrossEntropyLoss, meth)).parameters
        assert [(p.name, p.default) for p in a.values()] == [(p.name, p.default) for p in b.values()], meth
    logits, target = _logits(5)
    fa_mod, lg_mod = LigerCrossEntropyLoss(), liger_ce.LigerCrossEntropyLoss()
    for name, value in (("reduction", "sum"), ("label_smoothing", 0.25), ("softcap", 2.0), ("lse_square_scale", 0.1),
                        ("return_z_loss", True), ("weight", _class_weights())):
        setattr(fa_mod, name, value)
        setattr(lg_mod, name, value)
        _compare(_run_logits(fa_mod, logits, target), _run_logits(lg_mod, logits, target), atol=2e-6, rtol=1e-5,
                 what=f"after {name} = {value!r}")
    for name, value, err in (("reduction", "avg", ValueError), ("weight", torch.ones(V, 2), ValueError),
                             ("label_smoothing", 1.5, ValueError), ("return_z_loss", 1, TypeError)):
        before = {k: getattr(fa_mod, k) for k in fa_mod.OPTIONS}
        with pytest.raises(err, match=name):
            setattr(fa_mod, name, value)
        assert {k: getattr(fa_mod, k) for k in fa_mod.OPTIONS} == before


def test_logits_module_call_errors_name_liger_arguments(monkeypatch):
    """Bad inputs name Liger's arguments; a target out of range raises (eager CPU targets) or gives a NaN loss."""
    from fastalign import _validate

    logits, target = _logits(7)
    loss = LigerCrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match="_input"):
        loss(logits[None], target[None])
    with pytest.raises(TypeError, match="_input"):
        loss(logits.long(), target)
    with pytest.raises(ValueError, match="target"):
        loss(logits, target[:-1])
    with pytest.raises(TypeError, match="target"):
        loss(logits, target.float())
    with pytest.raises(ValueError, match="weight"):
        LigerCrossEntropyLoss(weight=torch.ones(V + 1))(logits, target)
    target[1] = V
    with pytest.raises(ValueError, match=rf"^target must lie in \[0, {V}\) or equal -100"):
        loss(logits, target)
    monkeypatch.setattr(_validate, "eager", lambda *tensors: False)
    x = logits.clone().requires_grad_()
    out = loss(x, target)
    out.backward()
    assert out.isnan() and x.grad[1].isnan().all()
