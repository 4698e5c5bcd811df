"""``LigerVocabParallelCrossEntropy`` (fastalign.integrations.liger_vocab_parallel) against Liger-Kernel 0.8's own
module and a float64 reference, at one rank and over a 2-process ``gloo`` group.

Liger's module is a pair of Triton kernels; without a GPU they run here on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), unpatched; with one, both modules run on CUDA tensors (the two ranks
on one GPU over ``gloo``). The float64 reference (:func:`_reference`) writes each
row's smoothed target distribution ``q`` out over the vocabulary and differentiates ``-sum_j q_j log p_j`` with
autograd: ``(1 - a) onehot + a / K`` on the smoothing's ids (PyTorch's formula), ``1 - a`` on the target and
``a / (K - 1)`` on the other ids (Megatron's); the smoothing's ids are the whole vocabulary (``"global"``) or the
rank's slice (``"partition"``). Each case compares the loss and d(logits) under a random upstream gradient.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from helpers import assert_close, rank_body, spawn_in

from fastalign.integrations.liger_vocab_parallel import LigerVocabParallelCrossEntropy

liger_vp = pytest.importorskip("liger_kernel.transformers.vocab_parallel_cross_entropy",
                               reason="liger_kernel is not installed: `pip install liger-kernel==0.8.*`")
LigerModule = liger_vp.LigerVocabParallelCrossEntropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S, B, V = 5, 3, 16
IGNORED = ((1, 1), (3, 0))
# (label_smoothing, formula, mode): without smoothing the formula and the mode change nothing
CASES = [(0.0, "pytorch", "global"), (0.1, "pytorch", "global"), (0.1, "megatron", "global"),
         (0.1, "pytorch", "partition"), (0.1, "megatron", "partition")]
WORLD, V_LOCAL = 2, 8


def _ids(case):
    return "-".join(map(str, case))


def _options(case, **kw):
    a, formula, mode = case
    return dict(label_smoothing=a, label_smoothing_formula=formula, label_smoothing_mode=mode, **kw)


def _data(seed, vocab=V, dtype=torch.float32, ignore_index=-100):
    """(logits [S, B, vocab], targets with the IGNORED rows ignored, an upstream gradient nonzero everywhere)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(S, B, vocab, generator=g) * 2).to(dtype)
    t = torch.randint(0, vocab, (S, B), generator=g)
    for s, b in IGNORED:
        t[s, b] = ignore_index
    up = torch.rand(S, B, generator=g) + 0.5
    return x, t, up


def _reference(x, target, up, smoothing=0.0, formula="pytorch", shard=None, ignore_index=-100):
    """float64 (loss [S, B], d(x) on ``shard``) of ``-sum_j q_j log softmax(x)_j`` (the module doc), ``shard`` the
    slice of the vocabulary the smoothing spreads over (None: all of it)."""
    x = x.detach().double().requires_grad_(True)
    vocab = x.shape[-1]
    shard = slice(0, vocab) if shard is None else shard
    live = target != ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(live, target, 0), vocab).double()
    in_u = torch.zeros(vocab, dtype=torch.float64)
    in_u[shard] = 1.0
    K = float(in_u.sum())
    a = smoothing
    if a == 0:
        q = onehot
    elif formula == "pytorch":
        q = (1 - a) * onehot + a / K * in_u
    else:
        # 1 - a on the target, a / (K - 1) on each other id of the set; a rank without the target (partition
        # mode) keeps Megatron's weights a / (K - 1) on its K ids, the rest (1 - a K / (K - 1)) on the target
        owns = (onehot * in_u).sum(-1, keepdim=True) > 0
        q = torch.where(owns, (1 - a) * onehot + a / (K - 1) * in_u * (1 - onehot),
                        (1 - a * K / (K - 1)) * onehot + a / (K - 1) * in_u)
    assert torch.allclose(q.sum(-1), torch.ones(()).double())
    loss = torch.where(live, -(q * torch.log_softmax(x, -1)).sum(-1), 0.0)
    loss.backward(up.double())
    return loss.detach(), x.grad[..., shard]


def _run(module, x0, target, up):
    """(loss, d(logits), logits after the backward) of ``module`` on a leaf copy of ``x0`` on DEVICE, on the CPU."""
    leaf = x0.to(DEVICE).clone().requires_grad_(True)
    loss = module(leaf, target.to(DEVICE))
    loss.backward(up.to(DEVICE))
    return loss.detach().cpu(), leaf.grad.cpu(), leaf.detach().cpu()


def _tolerances(dtype):
    """(loss, d(logits)) tolerances against Liger and the float64 reference."""
    if dtype == torch.float32:
        return dict(atol=2e-6, rtol=2e-6), dict(atol=1e-6, rtol=1e-5)
    # the loss in fp32 from the same bf16 values; d(logits) rounded to bf16 (one ulp: 2^-8 relative)
    return dict(atol=2e-6, rtol=2e-6), dict(atol=1e-6, rtol=2 ** -7)


# ----------------------------------------------------------------------------- one rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_liger_and_float64_reference(case, dtype):
    x0, t, up = _data(1, dtype=dtype)
    loss_tol, grad_tol = _tolerances(dtype)
    liger_loss, liger_grad, _ = _run(LigerModule(**_options(case)), x0, t, up)
    ref_loss, ref_grad = _reference(x0, t, up, case[0], case[1])
    loss, grad, after = _run(LigerVocabParallelCrossEntropy(**_options(case)), x0, t, up)
    what = f"{case} {dtype}"
    assert loss.dtype == torch.float32 and loss.shape == (S, B) and grad.dtype == dtype
    assert_close(loss, liger_loss, **loss_tol, what=f"loss vs Liger, {what}")
    assert_close(grad, liger_grad, **grad_tol, what=f"d(logits) vs Liger, {what}")
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, what=f"loss vs reference, {what}")
    assert_close(grad, ref_grad, **grad_tol, what=f"d(logits) vs reference, {what}")
    assert torch.equal(after, x0), "a leaf keeps its values"
    for s, b in IGNORED:
        assert loss[s, b] == 0 and not grad[s, b].any()
    assert (ref_loss[t != -100] > 0).all() and liger_grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_non_leaf_s_gradient_is_written_over_its_logits(layout):
    """Model logits (an intermediate of the graph; ``[B, S, V]`` transposed to ``[S, B, V]`` too): d(logits) is
    their own buffer, with the reference's values, and reaches the leaf; a second backward raises."""
    case = (0.1, "megatron", "global")
    x0, t, up = _data(2)
    ref_loss, ref_grad = _reference(x0, t, up, case[0], case[1])
    leaf = (x0 if layout == "contiguous" else x0.transpose(0, 1).contiguous()).to(DEVICE).requires_grad_(True)
    x = leaf * 1.0 if layout == "contiguous" else (leaf * 1.0).transpose(0, 1)
    seen = []
    x.register_hook(seen.append)
    loss = LigerVocabParallelCrossEntropy(**_options(case))(x, t.to(DEVICE))
    loss.backward(up.to(DEVICE), retain_graph=True)
    (grad,) = seen
    assert grad.data_ptr() == x.data_ptr() and grad.stride() == x.stride(), "d(logits) is the logits' buffer"
    assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-5, what="loss")
    assert_close(grad.cpu(), ref_grad, atol=1e-6, rtol=1e-5, what="d(logits)")
    assert_close(x.cpu(), ref_grad, atol=1e-6, rtol=1e-5, what="the logits after the backward")
    leaf_grad = leaf.grad if layout == "contiguous" else leaf.grad.transpose(0, 1)
    assert_close(leaf_grad.cpu(), ref_grad, atol=1e-6, rtol=1e-5, what="d(leaf)")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(up.to(DEVICE))


def test_float64_logits_match_liger():
    """float64 logits: computed in fp32 as Liger's, the loss fp32 and d(logits) float64."""
    x0, t, up = _data(3, dtype=torch.float64)
    case = (0.1, "pytorch", "global")
    liger_loss, liger_grad, _ = _run(LigerModule(**_options(case)), x0, t, up)
    loss, grad, _ = _run(LigerVocabParallelCrossEntropy(**_options(case)), x0, t, up)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float64
    assert_close(loss, liger_loss, atol=2e-6, rtol=2e-6, what="loss")
    assert_close(grad, liger_grad, atol=1e-6, rtol=1e-5, what="d(logits)")


def test_another_ignore_index_matches_liger():
    """``ignore_index`` a vocabulary id: its rows are ignored, the others scored."""
    x0, t, up = _data(4, ignore_index=5)
    module_args = dict(ignore_index=5, label_smoothing=0.2)
    liger_loss, liger_grad, _ = _run(LigerModule(**module_args), x0, t, up)
    loss, grad, _ = _run(LigerVocabParallelCrossEntropy(**module_args), x0, t, up)
    ref_loss, ref_grad = _reference(x0, t, up, 0.2, ignore_index=5)
    assert_close(loss, liger_loss, atol=2e-6, rtol=2e-6, what="loss vs Liger")
    assert_close(grad, liger_grad, atol=1e-6, rtol=1e-5, what="d(logits) vs Liger")
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, what="loss vs reference")
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5, what="d(logits) vs reference")
    assert (t == 5).sum() == len(IGNORED) and (loss[t == 5] == 0).all()


def test_large_logits_are_shifted_before_the_exponential():
    """Logits near 1e3 (exp overflows fp32 past 88): the loss and d(logits) stay those of the reference."""
    x0, t, up = _data(8)
    x0 += 1000.0 + 100.0 * torch.arange(S).view(S, 1, 1)
    loss, grad, _ = _run(LigerVocabParallelCrossEntropy(label_smoothing=0.1), x0, t, up)
    ref_loss, ref_grad = _reference(x0, t, up, 0.1)
    assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5, what="loss")
    assert_close(grad, ref_grad, atol=1e-4, rtol=1e-3, what="d(logits)")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])  # one rank without smoothing: the plain -log p_y pass
def test_a_target_outside_the_vocabulary_gives_a_nan_row(smoothing):
    """A target outside ``[0, V)`` that is not ignored: NaN loss and d(logits) on its row, the others exact."""
    x0, t, up = _data(5)
    t[0, 2], t[4, 1] = V, -3
    bad = torch.zeros(S, B, dtype=torch.bool)
    bad[0, 2] = bad[4, 1] = True
    loss, grad, _ = _run(LigerVocabParallelCrossEntropy(label_smoothing=smoothing), x0, t, up)
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    ref_loss, ref_grad = _reference(x0, torch.where(bad, 0, t), up, smoothing)
    assert_close(loss[~bad], ref_loss[~bad], atol=1e-5, rtol=1e-5, what="loss of the other rows")
    assert_close(grad[~bad], ref_grad[~bad], atol=1e-6, rtol=1e-5, what="d(logits) of the other rows")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_nan_logits_propagate_except_on_ignored_rows(smoothing):
    x0, t, up = _data(6)
    x0[2, 0, 7] = math.nan  # a scored row
    x0[1, 1, 3] = math.nan  # an ignored row
    loss, grad, _ = _run(LigerVocabParallelCrossEntropy(label_smoothing=smoothing), x0, t, up)
    assert torch.isnan(loss[2, 0]) and torch.isnan(grad[2, 0]).all()
    assert loss[1, 1] == 0 and not grad[1, 1].any()
    others = torch.ones(S, B, dtype=torch.bool)
    others[2, 0] = False
    assert torch.isfinite(loss[others]).all() and torch.isfinite(grad[others]).all()
    liger_loss, _, _ = _run(LigerModule(label_smoothing=smoothing), x0, t, up)
    assert torch.isnan(liger_loss[2, 0]) and liger_loss[1, 1] == 0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_an_empty_batch(smoothing):
    x = torch.randn(0, B, V, requires_grad=True)
    loss = LigerVocabParallelCrossEntropy(label_smoothing=smoothing)(x, torch.zeros(0, B, dtype=torch.int64))
    loss.sum().backward()
    assert loss.shape == (0, B) and x.grad.shape == (0, B, V)


# ----------------------------------------------------------------------------- errors

LIGER_CONSTRUCTOR_ERRORS = [dict(reduction="mean"), dict(label_smoothing=1.0), dict(label_smoothing=-0.1),
                            dict(label_smoothing=math.nan), dict(label_smoothing_formula="nemo"),
                            dict(label_smoothing_mode="local")]


@pytest.mark.parametrize("kw", LIGER_CONSTRUCTOR_ERRORS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_constructor_errors_are_liger_s(kw):
    with pytest.raises(ValueError) as theirs:
        LigerModule(**kw)
    with pytest.raises(ValueError) as ours:
        LigerVocabParallelCrossEntropy(**kw)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kw, name", [(dict(label_smoothing="0.1"), "label_smoothing"),
                                      (dict(ignore_index=1.5), "ignore_index")])
def test_constructor_type_errors_name_the_option(kw, name):
    with pytest.raises(TypeError, match=name):
        LigerVocabParallelCrossEntropy(**kw)


def test_an_assigned_option_is_checked_and_read_at_the_next_call():
    module = LigerVocabParallelCrossEntropy(label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        module.label_smoothing = 1.0
    assert module.label_smoothing == 0.1
    module.label_smoothing_formula = "megatron"
    x0, t, up = _data(7)
    loss, _, _ = _run(module, x0, t, up)
    assert_close(loss, _reference(x0, t, up, 0.1, "megatron")[0], atol=1e-5, rtol=1e-5, what="loss")
    assert "label_smoothing_formula='megatron'" in repr(module)


def _bad_calls():
    x = torch.randn(S, B, V)
    t = torch.randint(0, V, (S, B))
    return {
        "2-D logits": (ValueError, "vocab_parallel_logits", lambda m: m(x[0], t[0])),
        "integer logits": (TypeError, "vocab_parallel_logits", lambda m: m(x.long(), t)),
        "a list of logits": (TypeError, "vocab_parallel_logits", lambda m: m(x.tolist(), t)),
        "an empty vocabulary": (ValueError, "vocab_parallel_logits", lambda m: m(x[..., :0], t)),
        "float targets": (TypeError, "target", lambda m: m(x, t.float())),
        "transposed targets": (ValueError, "target", lambda m: m(x, t.T)),
        "targets on another device": (ValueError, "target", lambda m: m(x, t.to("meta"))),
        "a group by name": (TypeError, "tp_group", lambda m: m(x, t, "world")),
        "megatron over one id": (ValueError, "megatron", lambda m: m(x[..., :1], t.clamp(max=0))),
    }


@pytest.mark.parametrize("call", list(_bad_calls()))
def test_bad_calls_raise_naming_the_argument(call):
    error, name, bad = _bad_calls()[call]
    with pytest.raises(error, match=name):
        bad(LigerVocabParallelCrossEntropy(label_smoothing=0.1, label_smoothing_formula="megatron"))


# ----------------------------------------------------------------------------- two ranks over gloo

COLLECTIVE_TIMEOUT = timedelta(seconds=120)
HANG_LIMIT_S = 300
V_GLOBAL = WORLD * V_LOCAL


def _tp_data():
    """Full-vocabulary logits (one row far larger on the second rank's slice: the ranks' log-sum-exps are combined
    from their maximum), targets on both ranks' slices (two ignored) and an upstream gradient."""
    x, t, up = _data(11, vocab=V_GLOBAL)
    x[4, 0, V_LOCAL:] += 100.0
    t[0] = torch.tensor([1, V_LOCAL + 2, V_GLOBAL - 1])
    return x, t, up


def _tp_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    device = "cpu" if DEVICE == "cpu" else "cuda:0"  # with a GPU, both ranks on it (gloo)
    if device != "cpu":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    with rank_body():
        group = dist.group.WORLD
        singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
        x, t, up = (v.to(device) for v in _tp_data())
        shard = x[..., _slice(rank)]

        def run(module, logits, target, tp_group):  # on non-leaf logits, written over by fastalign's module
            leaf = logits.clone().requires_grad_(True)
            loss = module(leaf * 1.0, target, tp_group)
            loss.backward(up)
            return loss.detach().cpu(), leaf.grad.cpu()

        out = {}
        for case in CASES:
            out["ours", case] = run(LigerVocabParallelCrossEntropy(**_options(case)), shard, t, group)
            out["liger", case] = run(LigerModule(**_options(case)), shard, t, group)
        # a rank's own group of one: the whole vocabulary, no collective
        out["single group"] = run(LigerVocabParallelCrossEntropy(label_smoothing=0.1), x, t, singles[rank])
        bad = t.clone()
        bad[2, 2] = V_GLOBAL  # outside the global vocabulary (inside neither slice)
        out["bad target"] = run(LigerVocabParallelCrossEntropy(label_smoothing=0.1), shard, bad, group)
        banned, bt = _banned_slice_data()
        for a in (0.0, 0.1):
            out["banned slice", a] = run(LigerVocabParallelCrossEntropy(label_smoothing=a), banned[..., _slice(rank)],
                                         bt.to(device), group)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _banned_slice_data():
    """:func:`_tp_data` with the row ``[2, 0]``'s logits all -inf on the second rank's slice, its target on the
    first's."""
    x, t, _ = _tp_data()
    x[2, 0, V_LOCAL:] = float("-inf")
    t[2, 0] = 1
    return x, t


@pytest.fixture(scope="module")
def tp_ranks(tmp_path_factory):
    """Each rank's results, from one 2-rank gloo run (spawning costs more than the work)."""
    return spawn_in(tmp_path_factory, "vocab-parallel", _tp_worker, WORLD, HANG_LIMIT_S)


def _slice(rank):
    return slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_two_ranks_equal_one_process_and_liger(tp_ranks, case):
    """``"global"``: every rank's loss and the ranks' d(logits) side by side equal one process on the full
    vocabulary (fastalign's module and the reference); ``"partition"``: each rank's, the reference over its slice.
    Liger's module over the same group agrees on every rank."""
    x, t, up = _tp_data()
    a, formula, mode = case
    if mode == "global":
        single_loss, single_grad, _ = _run(LigerVocabParallelCrossEntropy(**_options(case)), x, t, up)
        ref_loss, ref_grad = _reference(x, t, up, a, formula)
        grad = torch.cat([ranks[("ours", case)][1] for ranks in tp_ranks], dim=-1)
        assert_close(grad, single_grad, atol=1e-6, rtol=1e-5, what=f"gathered d(logits) vs one process, {case}")
        assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5, what=f"gathered d(logits) vs reference, {case}")
    for rank, got in enumerate(tp_ranks):
        loss, grad = got["ours", case]
        liger_loss, liger_grad = got["liger", case]
        if mode == "global":
            assert_close(loss, single_loss, atol=2e-6, rtol=2e-6, what=f"loss vs one process, rank {rank}")
        else:
            ref_loss, ref_grad = _reference(x, t, up, a, formula, shard=_slice(rank))
            assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5, what=f"d(logits) vs reference, rank {rank}")
        assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, what=f"loss vs reference, rank {rank}, {case}")
        assert_close(loss, liger_loss, atol=2e-6, rtol=2e-6, what=f"loss vs Liger, rank {rank}, {case}")
        assert_close(grad, liger_grad, atol=1e-6, rtol=1e-5, what=f"d(logits) vs Liger, rank {rank}, {case}")
    if mode == "partition":  # the ranks' losses differ: the smoothing averages over each rank's own slice
        assert not torch.allclose(tp_ranks[0]["ours", case][0], tp_ranks[1]["ours", case][0])


def test_a_group_of_one_is_one_process(tp_ranks):
    x, t, up = _tp_data()
    ref_loss, ref_grad = _reference(x, t, up, 0.1)
    for rank, got in enumerate(tp_ranks):
        loss, grad = got["single group"]
        assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, what=f"loss, rank {rank}")
        assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5, what=f"d(logits), rank {rank}")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_rank_whose_slice_of_a_row_is_all_minus_inf(tp_ranks, smoothing):
    """That slice holds none of the row's mass: its d(logits) is 0 there (less the smoothing's share, a / V),
    as torch's cross-entropy over the whole vocabulary gives; it was NaN (its own softmax, 0 / 0). The loss is
    torch's (inf with smoothing, whose sum of log p takes the -inf logits)."""
    x, t = _banned_slice_data()
    _, _, up = _tp_data()
    xr = x.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(xr.view(-1, V_GLOBAL), t.view(-1), reduction="none",
                                            label_smoothing=smoothing).view(t.shape)
    ref.backward(up.double())
    grad = torch.cat([ranks["banned slice", smoothing][1] for ranks in tp_ranks], dim=-1)
    assert torch.isfinite(grad).all()
    assert_close(grad, xr.grad, atol=1e-6, rtol=1e-5, what="gathered d(logits)")
    finite = torch.isfinite(ref.detach())
    assert finite[2, 0] == (smoothing == 0)
    for rank, got in enumerate(tp_ranks):
        loss = got["banned slice", smoothing][0]
        assert torch.equal(torch.isfinite(loss), finite) and (loss[~finite] == float("inf")).all()
        assert_close(loss[finite], ref.detach()[finite], atol=1e-5, rtol=1e-5, what=f"loss, rank {rank}")


def test_two_ranks_give_a_nan_row_for_a_target_outside_the_global_vocabulary(tp_ranks):
    x, t, up = _tp_data()
    ref_loss, ref_grad = _reference(x, t, up, 0.1)
    others = torch.ones(S, B, dtype=torch.bool)
    others[2, 2] = False
    for rank, got in enumerate(tp_ranks):
        loss, grad = got["bad target"]
        assert torch.isnan(loss[2, 2]) and torch.isnan(grad[2, 2]).all()
        assert_close(loss[others], ref_loss[others], atol=1e-5, rtol=1e-5, what=f"loss, rank {rank}")
        assert_close(grad[others], ref_grad[..., _slice(rank)][others], atol=1e-6, rtol=1e-5,
                     what=f"d(logits), rank {rank}")
