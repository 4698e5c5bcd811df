"""Advantage estimators (docs/math.md#advantages) against the per-group Python-loop reference, on
the C++ kernels (CUDA kernels in the gpu tests)."""
import numpy as np
import pytest
import torch

import fastalign
from fastalign.ops.group_stats import STATS, group_advantage, group_stats
from fastalign.ops.returns import SCANS, reverse_scan
from fastalign.reference import advantages as ref
from helpers import assert_close

TOL = {torch.float32: 2e-6, torch.float64: 1e-10}
ALL_EQUAL = 0.7


def make_batch(B=60, n_groups=9, dtype=torch.float32, seed=0, nan_frac=0.1, singletons=3, ties=False):
    """Shuffled groups with arbitrary int64 keys, some groups of one, one all-equal group, NaN scores."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-2**62, 2**62, (n_groups + singletons,), generator=g)
    which = torch.cat([torch.randint(0, n_groups, (B - singletons,), generator=g),
                       torch.arange(n_groups, n_groups + singletons)])
    which = which[torch.randperm(B, generator=g)]
    index = keys[which]
    if ties:
        scores = torch.randint(0, 3, (B,), generator=g).to(torch.float64)
    else:
        scores = torch.randn(B, generator=g, dtype=torch.float64) * 2 + 0.5
    scores[which == 0] = ALL_EQUAL
    scores[(torch.rand(B, generator=g) < nan_frac) & (which != 0)] = float("nan")
    lengths = torch.randint(0, 9, (B,), generator=g)
    return scores.to(dtype), index, lengths


def mask_from_lengths(lengths, T=10):
    return (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)


def check(actual, expected, dtype, what):
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype], what=what)


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["index", "group_size"])
def test_group_stats_match_reference(dtype, layout):
    scores, index, lengths = make_batch(dtype=dtype, ties=True)
    if layout == "group_size":
        index, gs = torch.empty(0, dtype=torch.int64), 5
    else:
        gs = 1
    gid, stats, ngroups = group_stats(scores, index, lengths.double(), gs, "cpp")
    expected = ref.group_stats(scores.double(), index if layout == "index" else None,
                               group_size=None if layout == "index" else gs, lengths=lengths)
    assert int(ngroups) == len(expected)
    keys = index.tolist() if layout == "index" else [i // gs for i in range(scores.shape[0])]
    for c, name in enumerate(STATS):
        got = stats[gid, c]
        want = torch.tensor([float(expected[k][name]) for k in keys], dtype=torch.float64)
        if name in ("count", "max", "second"):  # exact (and -inf for groups without a second score)
            assert torch.equal(got, want), name
        else:
            assert_close(got, want, atol=1e-12, rtol=1e-12, what=name)
    # keyed layout: one row per possible group, rows past ngroups are empty groups
    if layout == "index":
        assert stats.shape == (scores.shape[0], len(STATS))
        assert torch.all(stats[int(ngroups):, 0] == 0)


# ------------------------------------------------------------------ group estimators
#: the estimators that read the token counts (response_mask / lengths); the others refuse them
READS_COUNTS = ("opo", "reinforce_pp_baseline")
CASES = [
    ("grpo", dict(std="group")), ("grpo", dict(std="batch")), ("grpo", dict(std="none")),
    ("rloo", {}), ("opo", {}), ("gpg", {}),
    ("grpo_passk", dict(std="group")), ("grpo_passk", dict(std="none")), ("grpo_passk", dict(std="batch")),
    ("reinforce_pp_baseline", {}),
]


@pytest.mark.parametrize("estimator,kw", CASES, ids=[f"{e}-{k.get('std', '')}" for e, k in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("singleton", ["raw", "zero"])
def test_estimators_match_reference(estimator, kw, dtype, singleton):
    for seed, ties in ((0, False), (1, True)):
        scores, index, lengths = make_batch(dtype=dtype, seed=seed, ties=ties)
        mask = mask_from_lengths(lengths)
        counts = dict(response_mask=mask) if estimator in READS_COUNTS else {}  # the others refuse them
        adv = fastalign.group_advantages(scores, index, estimator=estimator, singleton=singleton, **counts, **kw)
        want = ref.group_advantages(scores, index, estimator=estimator, singleton=singleton, lengths=lengths, **kw)
        check(adv, want, dtype, f"{estimator} {kw} seed={seed}")
        assert torch.all(adv[torch.isnan(scores)] == 0)


@pytest.mark.parametrize("std,eps", [("batch", 0.1), ("none", 1e-6)])
def test_unit_std_singletons_only_divide_with_the_group_std(std, eps):
    """``singleton="unit_std"`` gives a group of one ``r / (1 + eps)`` with ``std="group"`` only: with the batch
    std or none its score passes through, as ``"raw"`` (float64 reference; groups of one and NaN scores)."""
    scores, index, _ = make_batch(dtype=torch.float64, seed=3)
    for estimator in ("grpo", "grpo_passk"):
        adv = fastalign.group_advantages(scores, index, estimator=estimator, std=std, eps=eps, singleton="unit_std")
        want = ref.group_advantages(scores, index, estimator=estimator, std=std, eps=eps, singleton="unit_std")
        check(adv, want, torch.float64, f"{estimator} std={std}")
    sc = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    idx = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    adv = fastalign.group_advantages(sc, idx, estimator="gdpo", std=std, eps=eps, singleton="unit_std")
    check(adv, ref.group_advantages(sc, idx, estimator="gdpo", std=std, eps=eps, singleton="unit_std"),
          torch.float64, f"gdpo std={std}")


def test_edge_cases_by_hand():
    nan = float("nan")
    scores = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 2.0, 7.0, nan, 4.0, nan, nan])
    index = torch.tensor([10, 10, 10, 20, 20, 20, 30, 40, 40, 50, 50])
    adv = fastalign.group_advantages(scores, index)
    std = 2.0  # of 1, 3, 5
    expected = torch.tensor([-2 / (std + 1e-6), 0.0, 2 / (std + 1e-6), 0, 0, 0, 7.0, 0, 4.0, 0, 0])
    assert_close(adv, expected, atol=1e-6, what="grpo by hand")
    assert torch.all(adv[3:6] == 0)  # equal scores: exactly 0, not 0/eps noise
    eq = torch.full((6,), 0.1)
    for est in ("grpo", "rloo", "opo", "gpg", "grpo_passk"):
        counts = dict(lengths=torch.tensor([1, 2, 4, 3, 5, 7])) if est in READS_COUNTS else {}
        out = fastalign.group_advantages(eq, group_size=3, estimator=est, **counts)
        assert torch.all(out == 0), est
    zero = fastalign.group_advantages(scores, index, singleton="zero")
    assert zero[6] == 0 and zero[8] == 0  # a group of one, also one valid score next to a NaN
    rloo = fastalign.group_advantages(scores, index, estimator="rloo")
    assert_close(rloo[:3], torch.tensor([1 - 4.0, 3 - 3.0, 5 - 2.0]), atol=1e-6, what="rloo")
    passk = fastalign.group_advantages(scores, index, estimator="grpo_passk", std="none")
    assert_close(passk[:3], torch.tensor([0.0, 0.0, 2.0]), atol=0, what="passk")
    tie = fastalign.group_advantages(torch.tensor([1.0, 1.0, 0.0]), group_size=3, estimator="grpo_passk")
    assert torch.all(tie == 0)  # two best responses: r_max - r_second = 0


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo", "grpo_passk", "reinforce_pp_baseline"])
def test_index_and_group_size_give_identical_results(estimator):
    scores, _, lengths = make_batch(B=48, dtype=torch.float32, seed=3)
    keys = torch.randint(-2**40, 2**40, (12,), generator=torch.Generator().manual_seed(0))
    index = keys.repeat_interleave(4)
    counts = dict(response_mask=mask_from_lengths(lengths)) if estimator in READS_COUNTS else {}
    a = fastalign.group_advantages(scores, index, estimator=estimator, **counts)
    b = fastalign.group_advantages(scores, group_size=4, estimator=estimator, **counts)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_groups_and_extreme_keys(dtype):
    """More groups than the CPU key table first holds (it grows while the batch streams), and the
    int64 extremes as keys (the minimum is the table's empty marker)."""
    g = torch.Generator().manual_seed(11)
    B = 6000
    keys = torch.randint(-2**62, 2**62, (B // 2,), generator=g)
    keys[0], keys[1] = -2**63, 2**63 - 1
    index = keys.repeat_interleave(2)[torch.randperm(B, generator=g)]
    index[-3:] = torch.tensor([-2**63, 5, -2**63 + 1])  # a group of three with the minimum key, two singletons
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    scores[torch.rand(B, generator=g) < 0.05] = float("nan")
    scores = scores.to(dtype)
    for est in ("grpo", "rloo"):
        got = fastalign.group_advantages(scores, index, estimator=est)
        check(got, ref.group_advantages(scores, index, estimator=est), dtype, est)
        perm = torch.randperm(B, generator=g)
        again = fastalign.group_advantages(scores[perm], index[perm], estimator=est)
        assert_close(again, got[perm], atol=TOL[dtype], rtol=TOL[dtype], what=f"{est} permuted")


def test_group_order_does_not_matter():
    scores, index, _ = make_batch(seed=4, dtype=torch.float64)
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(1))
    a = fastalign.group_advantages(scores, index)
    b = fastalign.group_advantages(scores[perm], index[perm])
    assert_close(b, a[perm], atol=1e-12, what="permuted batch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gdpo_matches_reference(dtype):
    g = torch.Generator().manual_seed(5)
    _, index, _ = make_batch(B=40, seed=5)
    scores = torch.randn(40, 3, generator=g, dtype=torch.float64)
    scores[3, 1] = float("nan")
    scores[7, :] = float("nan")
    scores = scores.to(dtype)
    w = [1.0, 0.5, 2.0]
    adv = fastalign.group_advantages(scores, index, estimator="gdpo", reward_weights=w)
    check(adv, ref.group_advantages(scores, index, estimator="gdpo", reward_weights=w), dtype, "gdpo")
    assert adv[7] == 0
    adv_t = fastalign.group_advantages(scores, index, estimator="gdpo", reward_weights=torch.tensor(w))
    assert torch.equal(adv, adv_t)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_step_groups_match_reference(estimator):
    scores, index, _ = make_batch(B=50, seed=6, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    step_index = torch.randint(0, 12, (50,), generator=g) * 1000003
    step_scores = torch.randn(50, generator=g, dtype=torch.float64)
    adv = fastalign.group_advantages(scores, index, estimator=estimator, step_index=step_index,
                                     step_scores=step_scores, omega=0.5)
    want = ref.group_advantages(scores, index, estimator=estimator, step_index=step_index,
                                step_scores=step_scores, omega=0.5)
    check(adv, want, torch.float64, "gigpo")


def test_string_ids_are_mapped_on_the_host():
    scores, index, _ = make_batch(seed=7)
    names = [f"prompt-{k}" for k in index.tolist()]
    expected = fastalign.group_advantages(scores, index)
    for ids in (names, tuple(names), np.array(names, dtype=object), np.array(names), index.numpy(),
                index.tolist()):
        assert torch.equal(fastalign.group_advantages(scores, ids), expected), type(ids)
    step = fastalign.group_advantages(scores, names, step_index=names)
    assert torch.equal(step, 2 * expected)


def test_half_precision_scores_are_computed_in_fp32():
    scores, index, _ = make_batch(seed=8)
    adv = fastalign.group_advantages(scores.to(torch.bfloat16), index)
    assert adv.dtype == torch.float32
    want = ref.group_advantages(scores.to(torch.bfloat16).float(), index)
    assert_close(adv, want, atol=2e-6, rtol=2e-6, what="bf16 scores")


def test_empty_batch():
    e = torch.empty(0)
    assert fastalign.group_advantages(e, torch.empty(0, dtype=torch.int64)).shape == (0,)
    assert fastalign.group_advantages(e, group_size=4).shape == (0,)


def test_deterministic_and_parallel_path():
    # 2^17 scores in 2^16 groups: the statistics run on the OpenMP path
    g = torch.Generator().manual_seed(9)
    B = 1 << 17
    index = (torch.arange(B // 2).repeat_interleave(2) * 2654435761)[torch.randperm(B, generator=g)]
    scores = torch.randn(B, generator=g)
    scores[::7] = float("nan")
    runs = [fastalign.group_advantages(scores, index) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert_close(runs[0], ref.grpo_vectorized(scores, index), atol=2e-6, rtol=2e-6, what="parallel path")


def test_benchmark_baselines_agree():
    scores, index, _ = make_batch(seed=10, nan_frac=0.0)
    want = ref.group_advantages(scores, index)
    assert_close(ref.grpo_vectorized(scores, index), want, atol=2e-6, rtol=2e-6, what="vectorised baseline")
    assert_close(ref.grpo_python_loop(scores, index.tolist()), want, atol=2e-6, rtol=2e-6, what="loop baseline")


# ------------------------------------------------------------------ token level
def token_batch(dtype, seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.arange(T)[None] < torch.tensor([9, 5, 0, 7, 1, 9])[:, None]).to(torch.float32)
    mask[0, 3] = 0  # a hole (e.g. tool output inside a multi-turn response)
    mask[3, 0] = 0
    return r, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_advantages_spread(dtype):
    _, _, mask = token_batch(dtype)
    adv = torch.randn(6, dtype=dtype)
    out = fastalign.token_advantages(adv, mask.bool())
    assert out.dtype == dtype and torch.equal(out, adv[:, None] * mask.to(dtype))
    assert torch.all(out[2] == 0)  # empty response


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_token_level_estimators_match_reference(dtype, gamma):
    r, v, mask = token_batch(dtype)
    tol = TOL[dtype] * 10
    got = fastalign.reinforce_pp_advantages(r, mask, gamma=gamma)
    assert_close(got, ref.reinforce_pp_advantages(r, mask, gamma), atol=tol, rtol=tol, what="reinforce_pp")
    got = fastalign.reinforce_pp_advantages(r, mask, gamma=gamma, whiten=False)
    assert_close(got, ref.reinforce_pp_advantages(r, mask, gamma, whiten=False), atol=tol, rtol=tol,
                 what="reinforce_pp returns")
    b = torch.randn(6, dtype=dtype)
    got = fastalign.remax_advantages(r, mask, b)
    assert_close(got, ref.remax_advantages(r, mask, b), atol=tol, rtol=tol, what="remax")
    for whiten in (True, False):
        a, ret = fastalign.gae_advantages(r, v, mask, gamma=gamma, lam=0.95, whiten=whiten)
        ra, rret = ref.gae_advantages(r, v, mask, gamma, 0.95, whiten=whiten)
        assert_close(a, ra, atol=tol, rtol=tol, what=f"gae whiten={whiten}")
        assert_close(ret, rret, atol=tol, rtol=tol, what="gae returns")
    lp, ref_lp = r, v
    outcome = torch.randn(6, dtype=dtype)
    got = fastalign.implicit_process_advantages(lp, ref_lp, mask, outcome, beta=0.05, gamma=gamma)
    want = ref.implicit_process_advantages(lp, ref_lp, mask, outcome, 0.05, gamma)
    assert_close(got, want, atol=tol, rtol=tol, what="prime")
    for out in (got, a, ret):
        assert out.dtype == dtype and torch.all(out[mask == 0] == 0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_token_level_estimators_on_empty_batches(shape, backend):
    """No responses, or responses of no tokens: every token-level estimator returns empty [B, T] outputs
    (GAE's returns included) instead of launching a scan over nothing."""
    r = torch.zeros(shape, dtype=torch.float64)
    mask = torch.ones(shape)
    a, ret = fastalign.gae_advantages(r, r.clone(), mask, gamma=0.9, lam=0.95, whiten=False, backend=backend)
    got = [a, ret, fastalign.reinforce_pp_advantages(r, mask, whiten=False, backend=backend),
           fastalign.remax_advantages(r, mask, torch.zeros(shape[0], dtype=torch.float64), backend=backend)]
    assert all(t.shape == shape and t.dtype == torch.float64 for t in got), [t.shape for t in got]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_level_estimators_with_a_fractional_mask_match_reference(dtype):
    """A fractional response mask weights the token rewards and the outcome term: remax subtracts ``b m_t`` and
    PRIME adds ``A m_t`` (not ``b`` / ``A``) on every valid token."""
    r, v, mask = token_batch(dtype)
    mask = mask * torch.linspace(0.2, 1.0, mask.shape[1], dtype=dtype)
    tol = TOL[dtype] * 10
    b = torch.randn(6, dtype=dtype)
    assert_close(fastalign.remax_advantages(r, mask, b), ref.remax_advantages(r, mask, b), atol=tol, rtol=tol,
                 what="remax")
    outcome = torch.randn(6, dtype=dtype)
    got = fastalign.implicit_process_advantages(r, v, mask, outcome, beta=0.05, gamma=0.9)
    assert_close(got, ref.implicit_process_advantages(r, v, mask, outcome, 0.05, 0.9), atol=tol, rtol=tol,
                 what="prime")


def test_reinforce_pp_baseline_is_token_whitening():
    scores, index, lengths = make_batch(seed=11, dtype=torch.float64, nan_frac=0.0)
    mask = mask_from_lengths(lengths).double()
    adv = fastalign.group_advantages(scores, index, estimator="reinforce_pp_baseline", response_mask=mask)
    centred = fastalign.group_advantages(scores, index, std="none")
    want = fastalign.masked_whiten(fastalign.token_advantages(centred, mask), mask)
    assert_close(fastalign.token_advantages(adv, mask), want, atol=1e-10, what="whitened tokens")


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_before_any_kernel():
    s = torch.randn(8)
    idx = torch.arange(8) // 2
    ga = fastalign.group_advantages
    with pytest.raises(TypeError, match="scores"):
        ga([1.0, 2.0], idx)
    with pytest.raises(TypeError, match="scores"):
        ga(torch.arange(8), idx)
    with pytest.raises(ValueError, match="scores"):
        ga(s[None], idx)
    with pytest.raises(ValueError, match="index"):
        ga(s, idx[:5])
    with pytest.raises(TypeError, match="index"):
        ga(s, idx.float())
    with pytest.raises(ValueError, match="either index or group_size"):
        ga(s, idx, group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        ga(s)
    with pytest.raises(ValueError, match="group_size"):
        ga(s, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        ga(s, group_size=0)
    with pytest.raises(ValueError, match="estimator"):
        ga(s, idx, estimator="ppo")
    with pytest.raises(ValueError, match="gae_advantages"):
        ga(s, idx, estimator="gae")
    with pytest.raises(ValueError, match="std"):
        ga(s, idx, std="global")
    for estimator in ("rloo", "gpg", "opo", "reinforce_pp_baseline"):  # they divide by no std
        with pytest.raises(ValueError, match="std='none' does not apply"):
            ga(s, idx, estimator=estimator, std="none", response_mask=torch.ones(8, 3))
    with pytest.raises(ValueError, match="singleton"):
        ga(s, idx, singleton="one")
    with pytest.raises(ValueError, match="eps"):
        ga(s, idx, eps=-1.0)
    with pytest.raises(ValueError, match="response_mask"):
        ga(s, idx, estimator="opo")
    with pytest.raises(ValueError, match="response_mask"):
        ga(s, idx, estimator="opo", response_mask=torch.ones(7, 3))
    with pytest.raises(ValueError, match="reward_weights"):
        ga(torch.randn(8, 2), idx, estimator="gdpo", reward_weights=[1.0])
    with pytest.raises(ValueError, match="reward_weights"):
        ga(s, idx, reward_weights=[1.0])
    with pytest.raises(ValueError, match="step_index"):
        ga(s, idx, step_scores=s)
    with pytest.raises(ValueError, match="step_scores"):
        ga(s, idx, step_index=idx, step_scores=s[:4])
    with pytest.raises(TypeError, match="index"):
        ga(s, [[1], [2]] * 4)
    with pytest.raises(ValueError, match="response_mask"):
        fastalign.token_advantages(s, torch.ones(3, 4))
    with pytest.raises(ValueError, match="values"):
        fastalign.gae_advantages(torch.randn(2, 4), torch.randn(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="response_mask"):
        fastalign.reinforce_pp_advantages(torch.randn(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="baseline"):
        fastalign.remax_advantages(torch.randn(2, 4), torch.ones(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="cuda"):
        ga(s, idx, backend="cuda")


# ------------------------------------------------------------------ torch.library / torch.compile
def test_opcheck():
    scores, index, lengths = make_batch(B=20, seed=12)
    e = torch.empty(0, dtype=torch.float64)
    torch.library.opcheck(group_stats, (scores, index, lengths.double(), 1, "cpp"))
    torch.library.opcheck(group_stats, (scores, torch.empty(0, dtype=torch.int64), e, 4, "cpp"))
    torch.library.opcheck(group_advantage, (scores, index, e, e, 1, 0, True, 1e-6, False, "cpp"))
    torch.library.opcheck(group_advantage, (scores.double(), torch.empty(0, dtype=torch.int64), lengths.double(),
                                            torch.tensor([2.0], dtype=torch.float64), 5, 2, False, 1e-6, True, "cpp"))
    r, v, mask = token_batch(torch.float32)
    torch.library.opcheck(reverse_scan, (r, v, mask, 0.9, 0.95, SCANS["gae"], "cpp"))
    torch.library.opcheck(reverse_scan, (r, r.new_empty(0), mask, 0.9, 0.0, SCANS["return"], "cpp"))


def test_torch_compile_fullgraph():
    scores, index, lengths = make_batch(seed=13)
    mask = mask_from_lengths(lengths)

    def step(scores, index, mask, r, v):
        adv = fastalign.group_advantages(scores, index, estimator="grpo")
        passk = fastalign.group_advantages(scores, index, estimator="grpo_passk", std="batch")
        rpp = fastalign.group_advantages(scores, index, estimator="reinforce_pp_baseline", response_mask=mask)
        gpg = fastalign.group_advantages(scores, index, estimator="gpg")
        a, ret = fastalign.gae_advantages(r, v, mask, gamma=0.99, lam=0.95)
        return fastalign.token_advantages(adv + passk + rpp + gpg, mask) + a + ret

    r = torch.randn(mask.shape)
    v = torch.randn(mask.shape)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(scores, index, mask, r, v), step(scores, index, mask, r, v), atol=0, what="compiled")


def test_fake_tensors_take_the_custom_op():
    """Plain eager CPU calls skip the dispatcher; fake tensors (and compile / export tracing) must
    still go through the registered op and its fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    scores, index, _ = make_batch(seed=15)
    with FakeTensorMode() as mode:
        out = fastalign.group_advantages(mode.from_tensor(scores), mode.from_tensor(index))
    assert type(out) is not torch.Tensor and out.shape == scores.shape and out.dtype == scores.dtype


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["index", "group_size"])
def test_cuda_matches_cpu_without_host_sync(layout):
    scores, index, lengths = make_batch(B=4000, n_groups=300, seed=14)
    if layout == "group_size":
        scores, _, lengths = make_batch(B=4000, n_groups=300, seed=14, singletons=0)
    mask = mask_from_lengths(lengths)
    kw = dict(index=index) if layout == "index" else dict(group_size=8)
    r, v, tmask = token_batch(torch.float32)
    cpu = [fastalign.group_advantages(scores, estimator=e, **(dict(response_mask=mask) if e in READS_COUNTS else {}),
                                      **kw)
           for e in ("grpo", "rloo", "opo", "grpo_passk", "gpg", "reinforce_pp_baseline")]
    cpu.append(fastalign.gae_advantages(r, v, tmask, gamma=0.9, lam=0.95)[0])
    dev = "cuda"
    # the inputs are copied to the device before the check: a copy from pageable host memory synchronises
    kw = {k: (x.to(dev) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    scores, mask, r, v, tmask = (x.to(dev) for x in (scores, mask, r, v, tmask))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = [fastalign.group_advantages(scores, estimator=e,
                                          **(dict(response_mask=mask) if e in READS_COUNTS else {}), **kw)
               for e in ("grpo", "rloo", "opo", "grpo_passk", "gpg", "reinforce_pp_baseline")]
        gpu.append(fastalign.gae_advantages(r, v, tmask, gamma=0.9, lam=0.95)[0])
        again = fastalign.group_advantages(scores, estimator="grpo", **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for c, g in zip(cpu, gpu):
        assert_close(g.cpu(), c, atol=2e-5, rtol=2e-5, what="cuda vs cpu")
    assert torch.equal(again, gpu[0])


@pytest.mark.parametrize("batch_normalization", ["sequence", "token"])
def test_step_term_uses_the_same_options_as_the_episode_term(batch_normalization):
    """GiGPO (docs/math.md): the step term is the same estimator with the same options, gdpo's
    ``batch_normalization`` included: the float64 reference's two terms, combined by hand, and the library."""
    g = torch.Generator().manual_seed(12)
    B = 24
    scores = torch.randn(B, 2, generator=g, dtype=torch.float64)
    index = torch.randint(0, 4, (B,), generator=g)
    step_index = torch.randint(0, 6, (B,), generator=g)
    lengths = torch.randint(1, 9, (B,), generator=g)
    kw = dict(estimator="gdpo", batch_normalization=batch_normalization, singleton="unit_std",
              reward_weights=[1.0, 0.5])
    if batch_normalization == "token":  # the token counts: gdpo reads them there only
        kw["lengths"] = lengths
    episode = ref.group_advantages(scores, index, **kw)
    step = ref.group_advantages(scores, step_index, **kw)
    want = episode + 0.7 * step
    assert_close(ref.group_advantages(scores, index, step_index=step_index, omega=0.7, **kw), want, atol=1e-12,
                 what="reference")
    got = fastalign.group_advantages(scores, index, step_index=step_index, omega=0.7, **kw)
    check(got, want, torch.float64, f"gigpo gdpo {batch_normalization}")


def test_gdpo_infinite_reward_gives_nan_as_the_reference():
    """An infinite reward makes its group's column NaN, and the batch normalisation spreads it; a row whose
    rewards are all NaN is still left out (0) when no reward is infinite."""
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, float("inf")], [1.0, 0.5], [0.0, 2.0], [3.0, 1.0]],
                     dtype=torch.float64)
    lengths = torch.tensor([2, 3, 1, 4, 2, 2])
    for bn in ("sequence", "token"):
        kw = dict(estimator="gdpo", group_size=3, batch_normalization=bn)
        if bn == "token":  # the token counts: gdpo reads them there only
            kw["lengths"] = lengths
        want = ref.group_advantages(s, **kw)
        assert torch.isnan(want).all()
        got = fastalign.group_advantages(s, **kw)
        assert torch.isnan(got).all(), (bn, got)
        missing = s.clone()
        missing[2] = float("nan")
        check(fastalign.group_advantages(missing, **kw), ref.group_advantages(missing, **kw), torch.float64,
              f"gdpo missing row {bn}")
