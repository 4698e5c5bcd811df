"""``liger_fused_linear_scaled_cross_entropy_tp`` (fastalign.integrations.liger_vocab_parallel) against Liger-Kernel
0.8's own function and a float64 reference, at one rank (a ``gloo`` group of this process alone) and over a
2-process ``gloo`` group where each rank holds half of the head's vocabulary.

Liger's entry point takes CUDA tensors only; on CPU tensors the tests call the plain-torch function it runs off
Hopper / Blackwell (``_apply_tp_fallback``), with the group the entry point would pass it (with a GPU, the entry
point itself on CUDA tensors). The float64 reference (:func:`_reference`) forms the whole ``[M, V]`` logits from
the same (rounded) inputs and differentiates ``nll = -log softmax(z)_y`` and ``entropy = -sum_j p_j log p_j``
with autograd, under random upstream gradients of both (the entropy's of either sign).
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from helpers import assert_close, rank_body, spawn_in

from fastalign.integrations.liger_vocab_parallel import liger_fused_linear_scaled_cross_entropy_tp as ours

liger_scaled_ce = pytest.importorskip("liger_kernel.ops.fused_linear_scaled_cross_entropy",
                                      reason="liger_kernel is not installed: `pip install liger-kernel==0.8.*`")
from liger_kernel.transformers import functional as liger_functional  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, H, WORLD, V_LOCAL = 9, 8, 2, 8
V = WORLD * V_LOCAL
IGNORED = (2, 6)
DTYPES = [torch.float32, torch.bfloat16]
TEMPERATURES = [1.0, 0.7]


def liger(input, weight, target, tp_group, temperature=1.0, ignore_index=-100, tiles_per_reduce=1,
          return_entropy=False):
    """Liger's function: its entry point on CUDA tensors; on CPU tensors, which the entry point refuses, the torch
    fallback the entry point runs there, with the group it resolves (None: the default group)."""
    if input.is_cuda:
        return liger_functional.liger_fused_linear_scaled_cross_entropy_tp(
            input, weight, target, tp_group, temperature, ignore_index, tiles_per_reduce, return_entropy)
    group = dist.group.WORLD if tp_group is None else tp_group
    return liger_scaled_ce._apply_tp_fallback(input, weight, target, temperature, ignore_index, return_entropy, group)


def _data(seed, dtype=torch.float32, ignore_index=-100):
    """(input [M, H], the whole head [V, H], targets on both halves of the vocabulary with the IGNORED rows
    ignored, upstream gradients of nll (positive) and entropy (either sign))."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.6
    t = torch.randint(0, V, (M,), generator=g)
    t[0], t[1] = 1, V_LOCAL + 3
    t[list(IGNORED)] = ignore_index
    return h.to(dtype), w.to(dtype), t, torch.rand(M, generator=g) + 0.5, torch.randn(M, generator=g)


def _run(fn, h, w, t, group, g_nll, g_ent, temperature=1.0, ignore_index=-100, return_entropy=True, use_nll=True,
         **kw):
    """``fn``'s (nll, entropy or None, d(input), d(weight)) on leaf copies of ``h``, ``w`` on DEVICE, on the CPU,
    after a backward of ``sum(g_nll nll) + sum(g_ent entropy)`` (the nll term left out with ``use_nll=False``)."""
    hl = h.to(DEVICE).clone().requires_grad_(True)
    wl = w.to(DEVICE).clone().requires_grad_(True)
    out = fn(hl, wl, t.to(DEVICE), group, temperature, ignore_index, return_entropy=return_entropy, **kw)
    nll, ent = out if return_entropy else (out, None)
    terms = ([(nll * g_nll.to(DEVICE)).sum()] if use_nll else []) + (
        [(ent * g_ent.to(DEVICE)).sum()] if return_entropy else [])
    sum(terms).backward()
    return (nll.detach().cpu(), None if ent is None else ent.detach().cpu(), hl.grad.cpu(), wl.grad.cpu())


def _reference(h, w, t, g_nll, g_ent, temperature=1.0, ignore_index=-100, return_entropy=True, use_nll=True):
    """float64 (nll, entropy, d(input), d(head), d(logits)) of the whole head, from ``h``, ``w`` as they are."""
    h = h.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    z = h @ w.T / temperature
    z.retain_grad()
    logp = torch.log_softmax(z, -1)
    live = t != ignore_index
    nll = torch.where(live, -logp.gather(1, torch.where(live, t, 0)[:, None])[:, 0], 0.0)
    ent = torch.where(live, -(logp.exp() * logp).sum(-1), 0.0)
    loss = (nll * g_nll.double()).sum() if use_nll else 0.0
    if return_entropy:
        loss = loss + (ent * g_ent.double()).sum()
    loss.backward()
    return nll.detach(), ent.detach(), h.grad, w.grad, z.grad


def _tolerances(dtype):
    """(against the float64 reference, against Liger): ``nll``/``entropy`` and gradient tolerances each.

    bf16: fastalign accumulates the logits in fp32 from the bf16 values (nll and entropy as exact as fp32's), Liger
    rounds its bf16 product to bf16 (|z| < 6 here: up to 2^-9 |z| < 0.012 per logit); both round the gradients to
    bf16 (one ulp: 2^-8 to 2^-7 of the value). Liger's d(logits), from its rounded logits, are rounded to bf16
    before the products, so a small entry of its gradients (a sum that cancels) is off by up to 2^-7 of the largest
    (|d| < 5 here): 3e-2."""
    fp32 = (dict(atol=1e-5, rtol=1e-5), dict(atol=1e-5, rtol=1e-4))
    if dtype == torch.float32:
        return fp32, fp32
    return (fp32[0], dict(atol=2e-3, rtol=2 ** -7)), (dict(atol=1.5e-2, rtol=2e-3), dict(atol=3e-2, rtol=2 ** -6))


def _compare(got, want, tol, what, shard=slice(None)):
    """(nll, entropy, d(input), d(weight)) ``got`` against ``want`` (its d(weight) taken on ``shard``)."""
    (v_tol, g_tol) = tol
    for name, a, b in (("nll", got[0], want[0]), ("entropy", got[1], want[1])):
        if a is not None:
            assert_close(a, b, **v_tol, what=f"{name} {what}")
    assert_close(got[2], want[2], **g_tol, what=f"d(input) {what}")
    assert_close(got[3], want[3][shard], **g_tol, what=f"d(weight) {what}")


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone, as the default group."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group initialised")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- one rank


@pytest.mark.parametrize("return_entropy", [True, False], ids=["entropy", "nll-only"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda T: f"T={T}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_one_rank_matches_liger_and_the_reference(one_rank_group, dtype, temperature, return_entropy):
    h, w, t, g_nll, g_ent = _data(1, dtype)
    kw = dict(temperature=temperature, return_entropy=return_entropy)
    got = _run(ours, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    theirs = _run(liger, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    ref = _reference(h, w, t, g_nll, g_ent, **kw)
    to_ref, to_liger = _tolerances(dtype)
    what = f"{dtype} T={temperature} entropy={return_entropy}"
    _compare(got, ref, to_ref, f"vs reference, {what}")
    _compare(got, theirs, to_liger, f"vs Liger, {what}")
    nll, ent, dh, dw = got
    assert nll.dtype == theirs[0].dtype == torch.float32 and nll.shape == (M,)
    assert dh.dtype == dw.dtype == dtype
    assert (ent is None) == (not return_entropy)
    if return_entropy:
        assert ent.dtype == theirs[1].dtype == torch.float32 and ent.shape == (M,)
        assert (ent[list(IGNORED)] == 0).all() and (ent[t != -100] > 0).all()
    for i in IGNORED:  # +0, as Liger's
        assert nll[i] == 0 and math.copysign(1.0, nll[i].item()) == 1.0 and not dh[i].any()
    assert (ref[0][t != -100] > 0).all()


def test_entropy_alone_takes_the_gradient(one_rank_group):
    """A loss of the entropy only (no gradient reaches the nll): d(input), d(weight) are the entropy's."""
    h, w, t, g_nll, g_ent = _data(2)
    kw = dict(temperature=0.7, use_nll=False)
    got = _run(ours, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    ref = _reference(h, w, t, g_nll, g_ent, **kw)
    _compare(got, ref, _tolerances(torch.float32)[0], "entropy alone vs reference")
    _compare(got, _run(liger, h, w, t, one_rank_group, g_nll, g_ent, **kw), _tolerances(torch.float32)[1],
             "entropy alone vs Liger")


def test_none_is_the_default_group_and_tiles_per_reduce_changes_nothing(one_rank_group):
    h, w, t, g_nll, g_ent = _data(3)
    base = _run(ours, h, w, t, one_rank_group, g_nll, g_ent, temperature=0.7)
    for group, tiles in ((None, 1), (one_rank_group, 2), (one_rank_group, 4), (None, 4)):
        other = _run(ours, h, w, t, group, g_nll, g_ent, temperature=0.7, tiles_per_reduce=tiles)
        for a, b in zip(base, other):
            assert torch.equal(a, b), f"tp_group={group}, tiles_per_reduce={tiles}"


def test_another_ignore_index(one_rank_group):
    """``ignore_index`` a vocabulary id: its rows give 0 and no gradient, the others are scored."""
    h, w, t, g_nll, g_ent = _data(4, ignore_index=5)
    kw = dict(temperature=1.3, ignore_index=5)
    got = _run(ours, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    tol = _tolerances(torch.float32)
    _compare(got, _reference(h, w, t, g_nll, g_ent, **kw), tol[0], "ignore_index=5 vs reference")
    _compare(got, _run(liger, h, w, t, one_rank_group, g_nll, g_ent, **kw), tol[1], "ignore_index=5 vs Liger")
    assert (t == 5).sum() == len(IGNORED)
    assert (got[0][t == 5] == 0).all() and (got[1][t == 5] == 0).all() and not got[2][t == 5].any()


def test_float64_is_computed_in_fp32_with_float64_gradients(one_rank_group):
    h, w, t, g_nll, g_ent = _data(5, torch.float64)
    kw = dict(temperature=0.7)
    got = _run(ours, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    theirs = _run(liger, h, w, t, one_rank_group, g_nll, g_ent, **kw)
    tol = _tolerances(torch.float32)
    _compare(got, _reference(h, w, t, g_nll, g_ent, **kw), tol[0], "float64 vs reference")
    _compare(got, theirs, tol[1], "float64 vs Liger")
    assert got[0].dtype == got[1].dtype == theirs[0].dtype == theirs[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == theirs[2].dtype == torch.float64


def test_a_target_outside_the_vocabulary_gives_a_nan_nll(one_rank_group):
    """fastalign: NaN on that row (Liger's: the row's lse, as if the target's logit were 0); the other rows, the
    entropy and the gradients (the row's softmax, with no target term) are Liger's."""
    h, w, t, g_nll, g_ent = _data(6)
    t[4], t[7] = V, -3
    bad = torch.zeros(M, dtype=torch.bool)
    bad[[4, 7]] = True
    got = _run(ours, h, w, t, one_rank_group, g_nll, g_ent)
    theirs = _run(liger, h, w, t, one_rank_group, g_nll, g_ent)
    assert torch.isnan(got[0][bad]).all() and torch.isfinite(theirs[0][bad]).all()
    assert_close(got[0][~bad], theirs[0][~bad], atol=1e-5, rtol=1e-5, what="nll of the other rows")
    _compare((None, *got[1:]), theirs, _tolerances(torch.float32)[1], "out-of-range target vs Liger")
    assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()


# ----------------------------------------------------------------------------- errors

def _inputs():
    h, w, t, _, _ = _data(7)
    return h, w, t


# (argument named, error type, arguments changed from a good call); "liger": Liger's own entry point raises the same
# type on these CPU tensors (its checks that come before its CUDA-only check)
def _bad_calls():
    h, w, t = _inputs()
    return {
        "temperature str": ("temperature", TypeError, dict(temperature="1"), True),
        "temperature bool": ("temperature", TypeError, dict(temperature=True), True),
        "temperature 0": ("temperature", ValueError, dict(temperature=0.0), True),
        "temperature -1": ("temperature", ValueError, dict(temperature=-1), True),
        "temperature inf": ("temperature", ValueError, dict(temperature=math.inf), True),
        "temperature nan": ("temperature", ValueError, dict(temperature=math.nan), True),
        "tiles_per_reduce 3": ("tiles_per_reduce", ValueError, dict(tiles_per_reduce=3), True),
        "tiles_per_reduce float": ("tiles_per_reduce", TypeError, dict(tiles_per_reduce=2.0), True),
        "tiles_per_reduce bool": ("tiles_per_reduce", TypeError, dict(tiles_per_reduce=True), True),
        "return_entropy int": ("return_entropy", TypeError, dict(return_entropy=1), True),
        "3-D input": ("input", ValueError, dict(input=h[None]), True),
        "1-D weight": ("weight", ValueError, dict(weight=w[0]), True),
        "2-D target": ("target", ValueError, dict(target=t[:, None]), True),
        "target of other tokens": ("target", ValueError, dict(target=t[:-1]), True),
        "weight of another hidden size": ("weight", ValueError, dict(weight=torch.randn(V_LOCAL, H + 1)), True),
        "no tokens": ("input", ValueError, dict(input=h[:0], target=t[:0]), True),
        "no hidden size": ("input", ValueError, dict(input=h[:, :0], weight=w[:, :0]), True),
        "empty shard": ("weight", ValueError, dict(weight=w[:0]), True),
        "target on another device": ("target", ValueError, dict(target=t.to("meta")), True),
        "integer input": ("input", TypeError, dict(input=h.long(), weight=w.long()), False),
        "weight of another dtype": ("weight", TypeError, dict(weight=w.double()), False),
        "int32 target": ("target", TypeError, dict(target=t.int()), False),
        "float target": ("target", TypeError, dict(target=t.float()), False),
        "float ignore_index": ("ignore_index", TypeError, dict(ignore_index=1.5), False),
        "a group by name": ("tp_group", TypeError, dict(tp_group="world"), False),
    }


@pytest.mark.parametrize("call", list(_bad_calls()))
def test_bad_calls_raise_naming_the_argument(one_rank_group, call):
    name, error, changes, liger_too = _bad_calls()[call]
    h, w, t = _inputs()
    args = dict(input=h, weight=w[:V_LOCAL], target=t.clamp(max=V_LOCAL - 1), tp_group=one_rank_group)
    args.update(changes)
    with pytest.raises(error, match=name):
        ours(**args)
    if liger_too:
        with pytest.raises(error):
            liger_functional.liger_fused_linear_scaled_cross_entropy_tp(**args)


def test_without_torch_distributed_both_raise_a_runtime_error():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group initialised")
    h, w, t = _inputs()
    with pytest.raises(RuntimeError, match="tp_group.*initialized"):
        ours(h, w, t, None)
    with pytest.raises(RuntimeError, match="initialized"):
        liger_functional.liger_fused_linear_scaled_cross_entropy_tp(h, w, t, None)


def test_liger_s_entry_point_refuses_cpu_tensors(one_rank_group):
    """Why the tests call Liger's fallback on CPU tensors; fastalign's function runs on them."""
    if DEVICE != "cpu":
        pytest.skip("CUDA tensors: the tests call Liger's entry point")
    h, w, t = _inputs()
    with pytest.raises(RuntimeError, match="CUDA"):
        liger_functional.liger_fused_linear_scaled_cross_entropy_tp(h, w, t, one_rank_group)
    assert torch.isfinite(ours(h, w, t, one_rank_group)).all()


# ----------------------------------------------------------------------------- two ranks over gloo

COLLECTIVE_TIMEOUT = timedelta(seconds=120)
HANG_LIMIT_S = 300
TP_CASES = [(dtype, T, e) for dtype in DTYPES for T in TEMPERATURES for e in (True, False)]


def _case_id(case):
    dtype, T, e = case
    return f"{str(dtype).split('.')[-1]}-T={T}-{'entropy' if e else 'nll-only'}"


def _shard(rank):
    return slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)


def _tp_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    device = "cpu" if DEVICE == "cpu" else "cuda:0"  # with a GPU, both ranks on it (gloo)
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    with rank_body():
        group = dist.group.WORLD
        singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
        out = {}
        for case in TP_CASES:
            dtype, T, e = case
            h, w, t, g_nll, g_ent = _data(11, dtype)
            kw = dict(temperature=T, return_entropy=e)
            out["ours", case] = _run(ours, h, w[_shard(rank)], t, group, g_nll, g_ent, **kw)
            out["liger", case] = _run(liger, h, w[_shard(rank)], t, group, g_nll, g_ent, **kw)
        h, w, t, g_nll, g_ent = _data(12)
        out["none"] = _run(ours, h, w[_shard(rank)], t, None, g_nll, g_ent, temperature=0.7)
        out["single"] = _run(ours, h, w, t, singles[rank], g_nll, g_ent, temperature=0.7)  # the whole head
        bad = t.clone()
        bad[3] = V  # inside neither shard
        out["bad target"] = _run(ours, h, w[_shard(rank)], bad, group, g_nll, g_ent)
        out["liger bad target"] = _run(liger, h, w[_shard(rank)], bad, group, g_nll, g_ent)
        try:  # rank 1 is not a member of rank 0's group
            ours(h, w[_shard(rank)], t, singles[0])
            out["not a member"] = None
        except ValueError as err:
            out["not a member"] = str(err)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def tp_ranks(tmp_path_factory):
    """Each rank's results, from one 2-rank gloo run (spawning costs more than the work)."""
    return spawn_in(tmp_path_factory, "scaled-ce-tp", _tp_worker, WORLD, HANG_LIMIT_S)


@pytest.mark.parametrize("case", TP_CASES, ids=_case_id)
def test_two_ranks_match_liger_and_the_whole_head(tp_ranks, case):
    """Every rank: the whole vocabulary's nll and entropy, d(input) of the whole head (summed over the ranks, not
    this shard's share), d(weight) its shard's rows of the whole head's gradient; as Liger's on every rank."""
    dtype, T, e = case
    h, w, t, g_nll, g_ent = _data(11, dtype)
    kw = dict(temperature=T, return_entropy=e)
    ref = _reference(h, w, t, g_nll, g_ent, **kw)
    to_ref, to_liger = _tolerances(dtype)
    for rank, got in enumerate(tp_ranks):
        mine, theirs = got["ours", case], got["liger", case]
        what = f"rank {rank}, {_case_id(case)}"
        _compare(mine, ref, to_ref, f"vs reference, {what}", shard=_shard(rank))
        _compare(mine, theirs, to_liger, f"vs Liger, {what}")
        assert mine[3].shape == (V_LOCAL, H) and mine[2].dtype == mine[3].dtype == dtype
        assert mine[0].dtype == torch.float32 and (mine[1] is None) == (not e)
        # this rank's share of d(input) alone is far from the whole head's: a rank-local gradient would fail above
        share = ref[4][:, _shard(rank)] @ w[_shard(rank)].double() / T
        assert not torch.allclose(share, ref[2], atol=0.05)
    for a, b in zip(tp_ranks[0]["ours", case], tp_ranks[1]["ours", case]):
        if a is not None and a.shape != (V_LOCAL, H):
            assert torch.equal(a, b), "nll, entropy and d(input) are the same on every rank"


def test_two_ranks_default_group_and_a_group_of_one(tp_ranks):
    h, w, t, g_nll, g_ent = _data(12)
    ref = _reference(h, w, t, g_nll, g_ent, temperature=0.7)
    tol = _tolerances(torch.float32)[0]
    for rank, got in enumerate(tp_ranks):
        _compare(got["none"], ref, tol, f"tp_group=None, rank {rank}", shard=_shard(rank))
        _compare(got["single"], ref, tol, f"a group of one, rank {rank}")


def test_two_ranks_a_target_outside_the_vocabulary(tp_ranks):
    h, w, t, g_nll, g_ent = _data(12)
    ok = torch.ones(M, dtype=torch.bool)
    ok[3] = False
    ref = _reference(h, w, t, g_nll, g_ent)
    for rank, got in enumerate(tp_ranks):
        mine, theirs = got["bad target"], got["liger bad target"]
        assert torch.isnan(mine[0][3]) and torch.isfinite(theirs[0][3])
        assert_close(mine[0][ok], ref[0][ok], atol=1e-5, rtol=1e-5, what=f"nll of the other rows, rank {rank}")
        _compare((None, *mine[1:]), theirs, _tolerances(torch.float32)[1], f"vs Liger, rank {rank}")


def test_a_group_this_process_is_not_in_is_refused(tp_ranks):
    assert tp_ranks[0]["not a member"] is None
    assert "tp_group" in tp_ranks[1]["not a member"] and "member" in tp_ranks[1]["not a member"]
