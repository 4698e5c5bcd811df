"""The functional drop-ins (fastalign.integrations.liger_chunked_functional, fastalign.integrations.liger_functional)
against Liger-Kernel 0.8's own functions (``liger_kernel.chunked_loss.functional``,
``liger_kernel.transformers.functional``) on the same inputs.

Every call passes its options positionally, at values other than the defaults (the point of a functional drop-in is
the positional order), and compares the loss, every returned tensor (Liger's return structure: nested tuples, or a
``CrossEntropyOutput`` field by field) and the gradients of the hidden states / logits, the weight and the bias. The
signatures (names, order, defaults) are compared with Liger's: each chunked function with its ``Function.forward``.
fp32, small shapes. Liger's chunked losses run eagerly (``compiled=False``, passed positionally); its Triton kernels
run in the interpreter without a GPU, with the stand-ins and the data of the modules' tests, reused from there
(tests/test_integration_liger_cross_entropy.py, test_integration_liger.py, test_parity_liger_distillation.py,
test_integration_liger_scaled_ce_tp.py).
"""
import dataclasses
import inspect

import pytest
import torch

from helpers import assert_close

from fastalign.integrations import liger as fl
from fastalign.integrations import liger_chunked_functional as fa_chunked
from fastalign.integrations import liger_functional as fa_transformers
from fastalign.integrations import liger_elementwise, liger_vocab_parallel

lg_chunked = pytest.importorskip("liger_kernel.chunked_loss.functional", reason="liger_kernel is not installed: "
                                 "`pip install liger-kernel==0.8.*` (the test extra)")
from liger_kernel.transformers import functional as lg_transformers  # noqa: E402

import test_integration_liger as chunked_tests  # noqa: E402
import test_integration_liger_cross_entropy as ce_tests  # noqa: E402
import test_integration_liger_scaled_ce_tp as tp_tests  # noqa: E402
import test_parity_liger_distillation as distillation_tests  # noqa: E402

# the fixtures of the cross-entropy tests: Liger's kernel in the interpreter, IEEE fp32 products on a GPU (autouse)
liger_interpreter = ce_tests.liger_interpreter
ieee_fp32_matmul = ce_tests.ieee_fp32_matmul
one_rank_group = tp_tests.one_rank_group

# Liger's kernels under the interpreter compute -inf * 0 and -inf - -inf in their masked lanes (unused values)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICE = ce_tests.DEVICE
IGNORE = 5  # a non-default ignore_index: a vocabulary id


def _with_ignore_index(target, vocab, index=IGNORE):
    """``target`` with its -100 entries set to ``index`` and its tokens equal to ``index`` moved to the next id."""
    moved = torch.where(target == index, (index + 1) % vocab, target)
    return torch.where(target == -100, index, moved)


def _flat(out) -> dict:
    """Every tensor (or None) of a function's output by its place: a tensor, nested tuples, or a
    ``CrossEntropyOutput`` (Liger's dataclass, fastalign's named tuple) by field."""
    if out is None or isinstance(out, (torch.Tensor, float, int)):
        return {"": out}
    if dataclasses.is_dataclass(out):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif hasattr(out, "_fields"):
        items = list(zip(out._fields, out))
    else:
        items = [(str(i), o) for i, o in enumerate(out)]
    return {f"{k}.{kk}".rstrip("."): vv for k, v in items for kk, vv in _flat(v).items()}


def _against_liger(call_fa, call_lg, tensors, what, *, atol=2e-6, rtol=1e-5):
    """``call_fa(*leaves)`` against ``call_lg(*leaves)``, each on fresh leaf copies of ``tensors`` (None stays None;
    the leaves require grad): the output's structure and every tensor, then the gradients of the leaves after a
    backward of the loss (the first output) under an upstream gradient of 1, or a random one for a per-token loss."""
    leaves = [[None if t is None else t.detach().clone().requires_grad_(True) for t in tensors] for _ in range(2)]
    out_fa, out_lg = call_fa(*leaves[0]), call_lg(*leaves[1])
    if dataclasses.is_dataclass(out_lg):  # Liger's CrossEntropyOutput: fastalign's has the same fields
        assert ce_tests.FIELDS == tuple(f.name for f in dataclasses.fields(out_lg)) == out_fa._fields, what
    else:
        assert type(out_fa) is type(out_lg), f"{what}: {type(out_fa)} != {type(out_lg)}"
    flat_fa, flat_lg = _flat(out_fa), _flat(out_lg)
    assert list(flat_fa) == list(flat_lg), f"{what}: outputs {list(flat_fa)} != {list(flat_lg)}"
    for key, b in flat_lg.items():
        a = flat_fa[key]
        assert (a is None) == (b is None), f"{what} {key}: {a} != {b}"
        if b is not None:
            b = torch.as_tensor(b)
            a = torch.as_tensor(a)
            assert a.numel() == b.numel() and a.dtype == b.dtype, f"{what} {key}: {a.shape} {a.dtype} != {b.shape} " \
                                                                  f"{b.dtype}"
            assert_close(a.reshape(b.shape), b, atol=atol, rtol=rtol, what=f"{what} {key}")
    loss_fa, loss_lg = next(iter(flat_fa.values())), next(iter(flat_lg.values()))
    up = torch.ones_like(loss_lg) if loss_lg.dim() == 0 else torch.randn(
        loss_lg.shape, generator=torch.Generator().manual_seed(0)).to(loss_lg)
    loss_fa.backward(up)
    loss_lg.backward(up)
    for i, (a, b) in enumerate(zip(*leaves)):
        if a is None:
            continue
        assert (a.grad is None) == (b.grad is None), f"{what}: d(argument {i}) on one side only"
        if b.grad is not None:
            assert a.grad.dtype == b.grad.dtype, f"{what}: d(argument {i}) {a.grad.dtype} != {b.grad.dtype}"
            assert_close(a.grad, b.grad, atol=atol, rtol=rtol, what=f"{what} d(argument {i})")


def _functions(name):
    """(fastalign's function, Liger's) of ``liger_kernel.chunked_loss.functional`` ``name``."""
    return getattr(fa_chunked, name), getattr(lg_chunked, name)


# ------------------------------------------------------------------------------------------------------ signatures
def _liger_parameters(fn) -> list:
    """``(name, default)`` of each argument of a Liger function; of a ``Function.apply``, its ``forward``'s after
    ``ctx``."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        params = list(inspect.signature(owner.forward).parameters.values())[1:]
    else:
        params = list(inspect.signature(fn).parameters.values())
    return [(p.name, p.default) for p in params]


@pytest.mark.parametrize("ours, theirs", [(fa_chunked, lg_chunked), (fa_transformers, lg_transformers)],
                         ids=["chunked_loss", "transformers"])
def test_signatures_are_liger_s(ours, theirs):
    """The same names, in the same order, with the same defaults, as Liger's functions; every argument positional."""
    for name in ours.__all__:
        got = inspect.signature(getattr(ours, name)).parameters.values()
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in got), name
        assert [(p.name, p.default) for p in got] == _liger_parameters(getattr(theirs, name)), name
        if getattr(ours, name).__module__ == ours.__name__:  # not a re-export: its docstring names Liger's function
            assert getattr(ours, name).__doc__.startswith("Liger's ``" + name), name


def test_every_loss_function_of_liger_is_here():
    assert sorted(fa_chunked.__all__) == sorted(n for n in dir(lg_chunked) if n.startswith("liger_"))
    wanted = {"liger_cross_entropy", "liger_fused_linear_cross_entropy", "liger_fused_linear_jsd",
              "liger_fused_linear_kl_div", "liger_fused_linear_scaled_cross_entropy_tp", "liger_jsd", "liger_kl_div",
              "liger_tvd"}
    assert set(fa_transformers.__all__) == wanted and all(hasattr(lg_transformers, n) for n in wanted)
    assert (fa_transformers.liger_fused_linear_scaled_cross_entropy_tp
            is liger_vocab_parallel.liger_fused_linear_scaled_cross_entropy_tp)
    # the losses on given distributions: compared with Liger's in test_integration_liger_elementwise.py
    assert all(getattr(fa_transformers, n) is getattr(liger_elementwise, n)
               for n in ("liger_jsd", "liger_kl_div", "liger_tvd"))


# ------------------------------------------------------------------------------------------------ preference losses
def _preference_batch(seed, ignore_index=IGNORE):
    """Chosen rows then rejected rows (tests/test_integration_liger.py), the targets' ignored entries
    ``ignore_index``; the reference's bias a copy of the bias."""
    d = chunked_tests._pref_batch(seed)
    d["target"] = _with_ignore_index(d["target"], chunked_tests.V, ignore_index)
    d["ref_bias"] = d["bias"] + 0.05
    return d


def test_orpo_matches_liger():
    fa, lg = _functions("liger_fused_linear_orpo")
    d = _preference_batch(1)
    y = d["target"]
    nll_target = torch.where(y == IGNORE, IGNORE, (y + 3) % chunked_tests.V)  # other labels for the chosen NLL
    for options, what in (((IGNORE, 0.3, True, nll_target, False, 2), "nll_target"),
                          ((IGNORE, 0.5, False, None, False), "no nll")):
        _against_liger(lambda h, w, b: fa(h, w, y, b, *options), lambda h, w, b: lg(h, w, y, b, *options),
                       (d["hidden"], d["weight"], d["bias"]), f"orpo {what}")


def test_dpo_matches_liger():
    fa, lg = _functions("liger_fused_linear_dpo")
    d = _preference_batch(2)
    y = d["target"]
    with_ref = ((d["ref_hidden"], d["weight"] + 0.01, d["ref_bias"]),
                (IGNORE, 0.2, True, False, True, True, 2, "robust", 0.1, 0.05, 0.5))
    without = ((None, None, None), (IGNORE, 0.1, False, False, False, False, 1, "discopop", 0.0, 0.1))
    for (refs, options), what in ((with_ref, "robust, reference, averaged, nll, alpha"),
                                  (without, "discopop, no reference")):
        _against_liger(lambda h, w, b: fa(h, w, y, b, *refs, *options), lambda h, w, b: lg(h, w, y, b, *refs, *options),
                       (d["hidden"], d["weight"], d["bias"]), f"dpo {what}")


@pytest.mark.parametrize("name, args", [
    ("liger_fused_linear_cpo", (IGNORE, 0.3, 0.5, 0.1, True, False, True, 2)),
    ("liger_fused_linear_cpo", (IGNORE, 0.2, 1.0, 0.0, False, False)),
    ("liger_fused_linear_simpo", (IGNORE, 2.0, 0.5, 0.1, True, False, 0.8, 2)),
    ("liger_fused_linear_simpo", (IGNORE, 0.1, 1.0, 0.0, False, False)),
], ids=["cpo", "cpo-no-nll", "simpo-nll", "simpo"])
def test_cpo_and_simpo_match_liger(name, args):
    fa, lg = _functions(name)
    d = _preference_batch(3)
    y = d["target"]
    _against_liger(lambda h, w, b: fa(h, w, y, b, *args), lambda h, w, b: lg(h, w, y, b, *args),
                   (d["hidden"], d["weight"], d["bias"]), f"{name} {args}")


def test_kto_matches_liger():
    fa, lg = _functions("liger_fused_linear_kto")
    d = _preference_batch(4)
    y, labels = d["target"], torch.tensor([True, False, True, True, False, False])
    with_ref = ((d["ref_hidden"], d["weight"] + 0.01, d["ref_bias"], torch.tensor(0.2)),
                (IGNORE, 0.3, False, True, True, 2))
    without = ((None, None, None, None), (IGNORE, 0.1, False, False))
    for (tensors, options), what in ((with_ref, "reference, kl, averaged"), (without, "no reference")):
        _against_liger(lambda h, w, b: fa(h, w, y, labels, b, *tensors, *options),
                       lambda h, w, b: lg(h, w, y, labels, b, *tensors, *options),
                       (d["hidden"], d["weight"], d["bias"]), f"kto {what}")


# ------------------------------------------------------------------------------------------------------------- GRPO
def _grpo_cases(d):
    """(the reference tensors: ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias; the
    options from beta on), each a positional tail of Liger's function."""
    g = torch.Generator().manual_seed(5)
    token_ratio, seq_ratio = torch.rand(4, 7, generator=g) + 0.5, torch.rand(4, generator=g) + 0.5
    ref_logps = (d["ref"], d["old"], None, None, None)
    ref_head = (None, d["old"], d["ref_hidden"], d["ref_weight"], d["bias"] + 0.05)
    no_ref = (None, d["old"], None, None, None)
    return {
        "dapo": (ref_logps, (0.1, 0.1, 0.28, "dapo", None, "token", 1.0, 1.05, 0.8, False, True, 2, token_ratio, None,
                             True, 2.0, 3.0, 3.0, 2.0, 41)),
        "dr_grpo": (ref_head, (0.2, 0.05, 0.08, "dr_grpo", 9, "sequence", 1.0, 1.05, 1.0, False, True, 1, None, 1.3)),
        "sapo": (ref_logps, (0.04, 0.2, 0.2, "sapo", None, "token", 0.8, 1.3, 1.0, False)),
        "cispo": (no_ref, (0.0, 0.2, 1.2, "cispo", None, "token", 1.0, 1.05, 1.0, False, False, 2, seq_ratio)),
        "vespo": (no_ref, (0.0, 0.2, 0.2, "vespo", None, "token", 1.0, 1.05, 1.0, False, False, 1, seq_ratio, None,
                           False, 1.5, 2.5, 2.5, 1.5, 41)),
    }


@pytest.mark.parametrize("case", ["dapo", "dr_grpo", "sapo", "cispo", "vespo"])
def test_grpo_matches_liger(case):
    fa, lg = _functions("liger_fused_linear_grpo")
    d = chunked_tests._grpo_batch(6)
    refs, options = _grpo_cases(d)[case]
    liger_ids = chunked_tests._liger_ids(d)  # Liger reads every position: the unscored ones get a real token
    _against_liger(lambda h, w, b: fa(h, w, d["ids"], d["mask"], d["adv"], b, *refs, *options),
                   lambda h, w, b: lg(h, w, liger_ids, d["mask"], d["adv"], b, *refs, *options),
                   (d["hidden"], d["weight"], d["bias"]), f"grpo {case}")


# ----------------------------------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("name", ["liger_fused_linear_jsd", "liger_fused_linear_cosine"])
def test_chunked_distillation_matches_liger(name):
    fa, lg = _functions(name)
    x, w, b, xt, wt, bt, y = distillation_tests._inputs(7)
    y_ignore = _with_ignore_index(y, 40)
    beta = 0.2 if name.endswith("jsd") else 2.5
    for labels, teacher_bias, options, what in (
            (y_ignore, bt, (0.3, 0.9, beta, IGNORE, 0.7, False, 4, True), "soft and hard losses"),
            (y, None, (0.0, 1.0, 1.0, -100, 2.0, False), "soft loss")):
        _against_liger(lambda s, sw, sb: fa(s, sw, xt, wt, labels, sb, teacher_bias, *options),
                       lambda s, sw, sb: lg(s, sw, xt, wt, labels, sb, teacher_bias, *options),
                       (x, w, b if teacher_bias is not None else None), f"{name} {what}")


def test_fused_linear_jsd_matches_liger():
    x, w, _, xt, wt, _, y = (None if t is None else t.to(DEVICE) for t in distillation_tests._inputs(11, bias=False))
    fa, lg = fa_transformers.liger_fused_linear_jsd, lg_transformers.liger_fused_linear_jsd
    for tail, what in (((_with_ignore_index(y, 40), 0.3, IGNORE, 1.7, torch.float32), "labels"),
                       ((None, 0.0), "no labels, forward KL")):
        _against_liger(lambda s, sw: fa(s, sw, xt, wt, *tail), lambda s, sw: lg(s, sw, xt, wt, *tail), (x, w),
                       f"fused linear jsd {what}")


def test_fused_linear_kl_div_matches_liger():
    x, w, q, y = (t.to(DEVICE) for t in distillation_tests._kl_inputs(0))
    fa, lg = fa_transformers.liger_fused_linear_kl_div, lg_transformers.liger_fused_linear_kl_div
    for tail, what in (((_with_ignore_index(y, 40), "sum", IGNORE, 0.6, 1e-4, torch.float32), "sum, labels"),
                       ((None, "mean"), "mean, no labels")):
        _against_liger(lambda s, sw: fa(s, sw, q, *tail), lambda s, sw: lg(s, sw, q, *tail), (x, w),
                       f"fused linear kl_div {what}")


# ---------------------------------------------------------------------------------------------------- cross entropy
def test_cross_entropy_matches_liger(liger_interpreter):
    """On logits: class weights, ignore_index a class, smoothing, a z-loss, a softcap and every metric, summed; and
    the plain per-token loss."""
    fa, lg = fa_transformers.liger_cross_entropy, lg_transformers.liger_cross_entropy
    logits, target = ce_tests._logits(1)
    target_3 = torch.where(target == -100, 3, target)
    for t, tail, what in (
            (target_3, (ce_tests._class_weights(), None, 3, None, "sum", 0.1, 0.01, 2.5, True, True, True), "all"),
            (target, (None, None, -100, None, "none"), "per token")):
        _against_liger(lambda x: fa(x, t, *tail), lambda x: lg(x, t, *tail), (logits,), f"cross entropy {what}")


@pytest.mark.parametrize("case", ["all", "scaled", "plain"])
def test_fused_linear_cross_entropy_matches_liger(case, liger_interpreter):
    fa, lg = fa_transformers.liger_fused_linear_cross_entropy, lg_transformers.liger_fused_linear_cross_entropy
    (h, w, b), target = ce_tests._batch(2)
    target_3 = torch.where(target == -100, 3, target)
    t, tail = {
        "all": (target_3, (ce_tests._class_weights(), 3, 0.02, 0.2, "sum", 2.5, True, torch.float32, False, True,
                           True, 2)),
        "scaled": (target, (None, -100, 0.05, 0.1, "mean", None, True, None, True, True, False, 1)),
        "plain": (target, (None, -100, 0.0, 0.0, "none")),
    }[case]
    _against_liger(lambda hl, wl, bl: fa(hl, wl, t, bl, *tail), lambda hl, wl, bl: lg(hl, wl, t, bl, *tail),
                   (h, w, b), f"fused linear cross entropy {case}")


def test_scaled_cross_entropy_tp_matches_liger(one_rank_group):
    """The re-exported function, at one rank, against Liger's (on CPU tensors, the torch path its entry point runs
    off Hopper / Blackwell): temperature, ignore_index, tiles_per_reduce and return_entropy passed positionally."""
    h, w, t, g_nll, g_ent = tp_tests._data(4, ignore_index=IGNORE)

    def ours(hl, wl, tl, group, temperature, ignore_index, return_entropy):
        return fa_transformers.liger_fused_linear_scaled_cross_entropy_tp(hl, wl, tl, group, temperature,
                                                                          ignore_index, 2, return_entropy)

    kw = dict(temperature=0.7, ignore_index=IGNORE)
    got = tp_tests._run(ours, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    tp_tests._compare(got, tp_tests._run(tp_tests.liger, h, w, t, one_rank_group, g_nll, g_ent, **kw),
                      tp_tests._tolerances(torch.float32)[1], "scaled cross entropy tp vs Liger")


# --------------------------------------------------------------------------------------------------------- refusals
def _refusals():
    """(what, the function's call, the module construction it must raise as or None, the argument named)."""
    d = chunked_tests._pref_batch(0)
    h, w, y = d["hidden"], d["weight"], d["target"]
    g = chunked_tests._grpo_batch(0)
    x, sw, _, xt, wt, _, labels = distillation_tests._inputs(0, bias=False)
    kl_x, kl_w, q, _ = distillation_tests._kl_inputs(0)
    logits, target = ce_tests._logits(0)
    return [
        ("dpo sigmoid label_smoothing", lambda: fa_chunked.liger_fused_linear_dpo(
            h, w, y, None, None, None, None, -100, 0.1, False, False, False, False, 1, "sigmoid", 0.1),
         lambda: fl.LigerFusedLinearDPOLoss(use_ref_model=False, label_smoothing=0.1), "label_smoothing"),
        ("simpo alpha without nll", lambda: fa_chunked.liger_fused_linear_simpo(h, w, y, None, -100, 0.1, 0.5),
         lambda: fl.LigerFusedLinearSimPOLoss(alpha=0.5, compute_nll_loss=False), "alpha"),
        ("grpo dr_grpo", lambda: fa_chunked.liger_fused_linear_grpo(
            g["hidden"], g["weight"], g["ids"], g["mask"], g["adv"], None, g["ref"], None, None, None, None, 0.04,
            0.2, 0.2, "dr_grpo"), lambda: fl.LigerFusedLinearGRPOLoss(loss_type="dr_grpo"), "max_completion_length"),
        ("jsd temperature", lambda: fa_chunked.liger_fused_linear_jsd(x, sw, xt, wt, labels, None, None, 0.5, 0.5,
                                                                      0.5, -100, 0.0),
         lambda: fl.LigerFusedLinearJSDLoss(temperature=0.0), "temperature"),
        ("kl_div reduction none", lambda: fa_transformers.liger_fused_linear_kl_div(kl_x, kl_w, q, None, "none"),
         lambda: fl.LigerFusedLinearKLDivLoss(reduction="none"), "reduction"),
        ("flce label_smoothing", lambda: fa_transformers.liger_fused_linear_cross_entropy(
            kl_x, kl_w, labels[:12], None, None, -100, 0.0, 1.5),
         lambda: fl.LigerFusedLinearCrossEntropyLoss(label_smoothing=1.5), "label_smoothing"),
        ("flce chunk_mem_const", lambda: fa_transformers.liger_fused_linear_cross_entropy(
            kl_x, kl_w, labels[:12], None, None, -100, 0.0, 0.0, "mean", None, False, None, False, False, False, 0),
         None, "chunk_mem_const"),
        ("cross entropy reduce", lambda: fa_transformers.liger_cross_entropy(logits, target, None, None, -100, False),
         None, "reduce"),
    ]


@pytest.mark.parametrize("index", range(8), ids=[r[0] for r in _refusals()])
def test_a_refused_option_raises_the_module_s_value_error_naming_it(index):
    """An option fastalign's module refuses raises the module's own ValueError, naming it; ``chunk_mem_const`` < 1
    raises as in Liger; a legacy ``reduce`` / ``size_average`` other than None (which Liger ignores) raises."""
    what, call, construct, name = _refusals()[index]
    with pytest.raises(ValueError, match=name) as raised:
        call()
    if construct is not None:
        with pytest.raises(ValueError) as by_module:
            construct()
        assert str(raised.value) == str(by_module.value), what
