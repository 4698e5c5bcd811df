"""``distillation_loss.loss_mode=fastalign_forward_kl_topk``: verl 0.9.1's top-k forward KL of on-policy
distillation computed by :func:`fastalign.integrations.verl.distillation.forward_kl_topk`, against verl's own FSDP
``compute_forward_kl_topk`` (both of its paths) and a float64 reference, and dispatched by verl's own
``distillation_ppo_loss``."""
import subprocess
import sys
import types

import pytest
import torch

from helpers import assert_close

losses = pytest.importorskip("verl.trainer.distillation.losses", reason="verl is not importable")
fsdp_losses = pytest.importorskip("verl.trainer.distillation.fsdp.losses", reason="verl is not importable")

from verl.workers.config import DistillationConfig, DistillationLossConfig  # noqa: E402

from fastalign.integrations.verl import distillation  # noqa: E402

OUTPUTS = ("distillation_losses", "student_mass", "teacher_mass", "overlap_count", "overlap_token_advantage")
K = 5


def _batch(dtype, seed=0, lengths=(5, 7), vocab=50):
    """Student logits [1, N, V] (N = sum of ``lengths``) and the teacher's top-k log-probs and ids as verl hands
    them (nested [B, j, K]): a teacher near the student at some tokens (overlapping top k), far at others, with
    log-probs below -10 (the default clamp) in its top k."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    student = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    teacher = student + torch.randn(n, vocab, generator=g, dtype=torch.float64) * torch.linspace(0.1, 6, n)[:, None]
    teacher[-2:] = -8 * student[-2:]  # peaked rows, top k = the student's bottom k: log-probs below -10, no overlap
    teacher_lp, teacher_ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    nested = [torch.nested.nested_tensor_from_jagged(t, offsets) for t in (teacher_lp.float(), teacher_ids)]
    return student.to(dtype)[None], nested[0], nested[1]


def _config(mode, clamp=-10.0, chunked=False):
    return DistillationConfig(distillation_loss=DistillationLossConfig(
        loss_mode=mode, topk=K, log_prob_min_clamp=clamp, use_chunked_topk=chunked, use_policy_gradient=False))


def _run(fn, logits, weights):
    """``fn(logits)``'s outputs, and d(sum_t w_t loss_t)/d(logits)."""
    logits = logits.clone().requires_grad_()
    out = fn(logits)
    (out["distillation_losses"] * weights).sum().backward()
    return out, logits.grad


def _float64(logits, teacher_lp, teacher_ids, clamp):
    """verl's formulas in float64 on the same logits: q = log_softmax(z)[ids]; loss = sum_k e^t (t - q), both
    clamped below at ``clamp``; the masses before the clamp."""
    def fn(z):
        t, ids = teacher_lp.values()[None].double(), teacher_ids.values()[None]
        q = torch.log_softmax(z.double(), -1).gather(-1, ids)
        out = {"student_mass": q.exp().sum(-1), "teacher_mass": t.exp().sum(-1)}
        if clamp is not None:
            q, t = q.clamp_min(clamp), t.clamp_min(clamp)
        out["distillation_losses"] = (t.exp() * (t - q)).sum(-1)
        return out
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp", [-10.0, None], ids=["clamp", "no_clamp"])
@pytest.mark.parametrize("chunked", [False, True], ids=["verl_plain", "verl_chunked"])
def test_forward_kl_topk_matches_verl(dtype, clamp, chunked):
    """Every output of verl's FSDP ``compute_forward_kl_topk`` (plain and chunked) and the gradient of the weighted
    losses into the student's logits; the losses, masses and gradient against float64 as well. verl rounds the
    student's log-probs to the logits' dtype (bf16), fastalign keeps them fp32: closer to float64."""
    logits, teacher_lp, teacher_ids = _batch(dtype, seed=int(chunked) + 2 * (clamp is None))
    weights = torch.rand(logits.shape[:2], generator=torch.Generator().manual_seed(5))
    ours, ours_grad = _run(lambda z: distillation.forward_kl_topk(z, teacher_lp, teacher_ids, clamp), logits, weights)
    theirs, theirs_grad = _run(lambda z: fsdp_losses.compute_forward_kl_topk(
        z, teacher_lp, teacher_ids, _config("forward_kl_topk", clamp, chunked), "thd"), logits, weights)
    want, want_grad = _run(_float64(logits, teacher_lp, teacher_ids, clamp), logits, weights)
    assert ours.keys() == theirs.keys() == set(OUTPUTS)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for name in OUTPUTS:
        assert ours[name].shape == theirs[name].shape == logits.shape[:2], name
        assert_close(ours[name].double(), theirs[name].double(), what=name, **tol)
    assert torch.equal(ours["overlap_count"], theirs["overlap_count"])
    assert 0 < int((ours["overlap_count"] > 0).sum()) < logits.shape[1]  # both kinds of token present
    if clamp is not None:  # the clamp binds somewhere
        assert (teacher_lp.values() < clamp).any()
    for name in ("distillation_losses", "student_mass", "teacher_mass"):
        assert_close(ours[name].double(), want[name], atol=1e-5, rtol=1e-5, what=f"{name} vs float64")
    assert ours_grad.dtype == dtype
    assert_close(ours_grad.double(), theirs_grad.double(), what="d(logits)", **tol)
    grad_tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-2)
    assert_close(ours_grad.double(), want_grad, what="d(logits) vs float64", **grad_tol)


def test_forward_kl_topk_gradient_is_rounded_once():
    """In bf16 every entry of d(logits), at the teacher's ids and elsewhere, is the float64 gradient rounded once
    (within one bf16 step of it); an empty micro-batch gives empty outputs and gradient."""
    logits, teacher_lp, teacher_ids = _batch(torch.bfloat16, seed=11)
    weights = torch.rand(logits.shape[:2], generator=torch.Generator().manual_seed(2)) + 0.5
    _, ours = _run(lambda z: distillation.forward_kl_topk(z, teacher_lp, teacher_ids), logits, weights)
    _, want = _run(_float64(logits, teacher_lp, teacher_ids, -10.0), logits, weights)
    step = want.abs().clamp_min(1e-30) * 2.0 ** -8  # a bf16 step at each entry's magnitude
    assert ((ours.double() - want).abs() <= step + 1e-12).all()
    empty = torch.zeros(1, 0, 50, requires_grad=True)
    nested = [torch.nested.nested_tensor_from_jagged(torch.zeros(0, K, dtype=dt), torch.tensor([0, 0]))
              for dt in (torch.float32, torch.int64)]
    out = distillation.forward_kl_topk(empty, *nested)
    out["distillation_losses"].sum().backward()
    assert all(v.shape == (1, 0) for v in out.values()) and empty.grad.shape == empty.shape


def _verl_fn(clamp=-10.0):
    return lambda z, lp, ids: fsdp_losses.compute_forward_kl_topk(z, lp, ids, _config("forward_kl_topk", clamp), "thd")


def _ours_fn(clamp=-10.0):
    return lambda z, lp, ids: distillation.forward_kl_topk(z, lp, ids, clamp)


def _both(logits, teacher_lp, teacher_ids, weights):
    """(ours, theirs): each (outputs, d(weighted losses)/d(logits))."""
    return [_run(lambda z: fn(z, teacher_lp, teacher_ids), logits, weights) for fn in (_ours_fn(), _verl_fn())]


def test_forward_kl_topk_edges_match_verl():
    """A -inf student logit at the teacher's top id, or at every id of a row; an id given twice in a row (verl's
    gather sums its gradients); float64 logits: verl's outputs and gradient."""
    logits, teacher_lp, teacher_ids = _batch(torch.float32, seed=3)
    weights = torch.rand(logits.shape[:2], generator=torch.Generator().manual_seed(3))
    ids = teacher_ids.values()
    logits[0, 0, ids[0, 0]] = float("-inf")
    logits[0, 1, ids[1]] = float("-inf")
    (ours, ours_grad), (theirs, theirs_grad) = _both(logits, teacher_lp, teacher_ids, weights)
    assert torch.isfinite(ours["distillation_losses"]).all() and torch.isfinite(ours_grad).all()
    assert_close(ours["distillation_losses"], theirs["distillation_losses"], atol=1e-5, rtol=1e-5, what="-inf")
    assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=1e-5, what="-inf d(logits)")
    logits, teacher_lp, teacher_ids = _batch(torch.float32, seed=6)
    ids = teacher_ids.values().clone()
    ids[2, 3], ids[4, 1:3] = ids[2, 0], ids[4, 4]  # repeated ids in two rows
    repeated = torch.nested.nested_tensor_from_jagged(ids, teacher_ids.offsets())
    (ours, ours_grad), (theirs, theirs_grad) = _both(logits, teacher_lp, repeated, weights)
    assert_close(ours["distillation_losses"], theirs["distillation_losses"], atol=1e-5, rtol=1e-5, what="repeats")
    assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=1e-5, what="repeats d(logits)")
    (ours, ours_grad), (theirs, theirs_grad) = _both(logits.double(), teacher_lp, teacher_ids, weights)
    assert ours_grad.dtype == torch.float64
    assert_close(ours["distillation_losses"].double(), theirs["distillation_losses"], atol=1e-5, rtol=1e-5)
    assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=1e-5, what="float64 d(logits)")


def test_forward_kl_topk_under_autograd_modes():
    """A retained graph's second backward adds the same gradient again; a second derivative raises; under
    inference_mode and no_grad the outputs are the same, without a graph; bad arguments are named."""
    logits, teacher_lp, teacher_ids = _batch(torch.float32, seed=8)
    x = logits.clone().requires_grad_()
    loss = distillation.forward_kl_topk(x, teacher_lp, teacher_ids)["distillation_losses"].sum()
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    assert_close(x.grad, 2 * once, atol=1e-6, rtol=1e-6, what="second backward")
    x = logits.clone().requires_grad_()
    loss = distillation.forward_kl_topk(x, teacher_lp, teacher_ids)["distillation_losses"].sum()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)
    want = distillation.forward_kl_topk(logits, teacher_lp, teacher_ids)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            got = distillation.forward_kl_topk(logits.clone().requires_grad_(mode is torch.no_grad), teacher_lp,
                                               teacher_ids)
        assert all(torch.equal(got[k], want[k]) for k in OUTPUTS) and got["distillation_losses"].grad_fn is None
    for kwargs, error, name in ((dict(teacher_topk_ids=teacher_ids.values().float()[None]), TypeError,
                                 "teacher_topk_ids"),
                                (dict(log_prob_min_clamp="-10"), TypeError, "log_prob_min_clamp"),
                                (dict(student_logits=logits.long()), TypeError, "student_logits")):
        call = {**dict(student_logits=logits, teacher_topk_log_probs=teacher_lp, teacher_topk_ids=teacher_ids),
                **kwargs}
        with pytest.raises(error, match=name):
            distillation.forward_kl_topk(**call)


class _InPlaceCrossEntropy(torch.autograd.Function):
    """flash-attn's cross-entropy with ``inplace_backward=True``: its backward writes d(logits) over the logits (a
    kernel's write, which bumps no version counter)."""

    @staticmethod
    def forward(ctx, logits, labels, inplace):
        ctx.save_for_backward(logits, labels)
        ctx.inplace = inplace
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]

    @staticmethod
    def backward(ctx, g):
        logits, labels = ctx.saved_tensors
        d = -torch.softmax(logits.float(), -1)
        d[torch.arange(len(labels)), labels] += 1
        d = (d * g[:, None]).to(logits.dtype)
        if not ctx.inplace:
            return d, None, None
        logits.data.copy_(d)
        return logits, None, None


def test_the_engine_s_log_probs_leave_the_logits_for_this_backward():
    """verl's FSDP engine computes the top-k loss, then the policy's log-probs of the same logits with an in-place
    backward that runs first: through the wrapped ``logprobs_from_logits`` the gradient is the one of an
    out-of-place backward (the in-place write would reach this function's backward, which reads the logits); once
    the backward has run, the engine's call is in place again."""
    engine = pytest.importorskip(distillation._FSDP_ENGINE_MODULE, reason="verl's FSDP engine is not importable")
    distillation.enable()
    assert getattr(engine.logprobs_from_logits, "fastalign", False)
    calls = []

    def verl_logprobs_from_logits(logits, labels, inplace_backward=True):  # verl's, with flash-attn installed
        calls.append(inplace_backward)
        return _InPlaceCrossEntropy.apply(logits, labels, inplace_backward)

    logprobs_from_logits = distillation._keep_logits(verl_logprobs_from_logits)
    logits, teacher_lp, teacher_ids = _batch(torch.float32, seed=10)
    labels = torch.randint(0, logits.shape[-1], logits.shape[1:2], generator=torch.Generator().manual_seed(0))
    grads = []
    for log_probs in (logprobs_from_logits, lambda z, y, inplace_backward: _InPlaceCrossEntropy.apply(z, y, False)):
        leaf = logits[0].clone().requires_grad_()
        rows = leaf * 1.0  # logits_rmpad, an intermediate
        out = distillation.forward_kl_topk(rows[None], teacher_lp, teacher_ids)
        (out["distillation_losses"].sum() + log_probs(rows, labels, inplace_backward=True).sum()).backward()
        grads.append(leaf.grad)
    assert calls == [False]
    assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5, what="d(logits)")
    del out
    import gc

    gc.collect()
    rows = torch.randn(4, 8, requires_grad=True) * 1.0
    logprobs_from_logits(rows, torch.zeros(4, dtype=torch.int64), inplace_backward=True)
    assert calls == [False, True]


def test_fastalign_forward_kl_topk_is_a_verl_distillation_mode():
    """Registered beside verl's modes (with verl's function for the final loss and metrics), selected by the
    config alone, dispatched by verl's own ``distillation_ppo_loss`` as its logits processor: verl's outputs for
    ``forward_kl_topk``; Megatron's strategy raises; verl's other modes keep verl's path."""
    distillation.enable()
    mode = distillation.MODE
    assert losses.get_distillation_loss_fn(mode) is losses.get_distillation_loss_fn("forward_kl_topk")
    assert _config(mode).distillation_loss.loss_settings.use_topk
    logits, teacher_lp, teacher_ids = _batch(torch.float32, seed=4)
    data = {"teacher_logprobs": teacher_lp, "teacher_ids": teacher_ids}
    outputs = {}
    for name in (mode, "forward_kl_topk"):
        outputs[name] = losses.distillation_ppo_loss(types.SimpleNamespace(strategy="fsdp2"), _config(name),
                                                     data=data, student_logits=logits)
    for key in OUTPUTS:
        assert_close(outputs[mode][key].double(), outputs["forward_kl_topk"][key].double(), atol=1e-5, rtol=1e-5,
                     what=key)
    with pytest.raises(NotImplementedError, match=f"{mode}.*'megatron'"):
        losses.distillation_ppo_loss(types.SimpleNamespace(strategy="megatron"), _config(mode), data=data,
                                     student_logits=logits)
    wrapper = losses.compute_topk_loss
    distillation.enable()  # idempotent: one registration, one wrapper
    assert losses.compute_topk_loss is wrapper
    assert [m for m in losses.DISTILLATION_LOSS_REGISTRY if m.startswith("fastalign_")] == [mode]


def test_import_verl_alone_registers_the_distillation_mode():
    """A fresh interpreter that imports verl and its distillation losses finds the mode (the entry point)."""
    code = ("import verl\n"
            "from verl.trainer.distillation import losses\n"
            f"assert {distillation.MODE!r} in losses.DISTILLATION_LOSS_REGISTRY\n"
            "assert getattr(losses.compute_topk_loss, 'fastalign', False)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.gpu
def test_forward_kl_topk_on_a_gpu_at_full_vocabulary():
    """On a GPU, bf16 logits [1, 1024, 151936], k = 128: the losses and d(logits) against float64 and verl's own
    FSDP function."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, vocab, k = 1024, 151936, 128
    logits = (torch.randn(1, n, vocab, device="cuda", generator=g) * 2).bfloat16()
    teacher = logits[0].float() + torch.randn(n, vocab, device="cuda", generator=g)
    lp, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    del teacher
    offsets = torch.tensor([0, 300, n], device="cuda")
    teacher_lp, teacher_ids = (torch.nested.nested_tensor_from_jagged(t, offsets) for t in (lp, ids))
    weights = torch.rand(1, n, device="cuda", generator=g)
    ours, ours_grad = _run(lambda z: distillation.forward_kl_topk(z, teacher_lp, teacher_ids), logits, weights)
    theirs, theirs_grad = _run(lambda z: fsdp_losses.compute_forward_kl_topk(
        z, teacher_lp, teacher_ids, _config("forward_kl_topk"), "thd"), logits, weights)
    want, want_grad = _run(_float64(logits, teacher_lp, teacher_ids, -10.0), logits, weights)
    assert_close(ours["distillation_losses"].double(), want["distillation_losses"], atol=1e-4, rtol=1e-4,
                 what="losses vs float64")
    assert_close(ours["distillation_losses"], theirs["distillation_losses"], atol=0.05, rtol=0.02, what="vs verl")
    # verl takes the student's top k of its bf16 log-softmax, whose rounding can tie ids apart in the logits
    assert (ours["overlap_count"] - theirs["overlap_count"]).abs().float().mean() < 0.05
    err = (ours_grad.double() - want_grad).norm() / want_grad.norm()
    assert err < 5e-3, err
