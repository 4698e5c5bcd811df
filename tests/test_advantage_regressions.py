"""Regressions of the advantage estimators: index entries given as tensors, infinite scores and
rewards on every kernel, ``eps=0`` on equal scores, OpenRLHF's whitening, and argument checks.

Expected values come from float64 plain PyTorch / Python written here (or the trainers' own code
in the integration tests), never from fastalign."""
import math

import numpy as np
import pytest
import torch

import fastalign as fa
from conftest import CPU_BACKENDS

INF, NAN = float("inf"), float("nan")


def _same(actual, expected, tol=1e-6, what=""):
    """Equal NaN and ±inf positions, finite values within ``tol``."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, what
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN at {a.tolist()}, expected {e.tolist()}"
    fin = torch.isfinite(e)
    assert torch.equal(a[~fin & ~torch.isnan(e)], e[~fin & ~torch.isnan(e)]), f"{what}: {a.tolist()} != {e.tolist()}"
    assert torch.allclose(a[fin], e[fin], atol=tol, rtol=tol), f"{what}: {a.tolist()} != {e.tolist()}"


def _plain_group(scores, groups, estimator, eps=1e-6):
    """float64 plain torch, group by group: torch.mean / torch.std (unbiased) of the group's scores."""
    x = scores.double()
    out = torch.empty_like(x)
    alpha = len(x) / max(int((x != 0).sum()), 1)
    for g in sorted(set(groups)):
        idx = torch.tensor([i for i, k in enumerate(groups) if k == g])
        v = x[idx]
        n = len(v)
        mean = v.mean()
        if estimator == "grpo":
            out[idx] = (v - mean) / (v.std() + eps)
        elif estimator == "rloo":
            out[idx] = (v - mean) * n / (n - 1)
        else:  # gpg
            out[idx] = alpha * (v - mean)
    return out


# ---------------------------------------------------------------- 1. index entries by value
def test_index_list_of_tensors_groups_by_value():
    s = torch.tensor([1.0, 2.0, 3.0, 5.0])
    ids = torch.tensor([0, 0, 1, 1])
    expected = _plain_group(s, [0, 0, 1, 1], "grpo")
    for index in (list(ids), tuple(ids), [np.int64(7), np.int64(7), np.int64(3), np.int64(3)],
                  np.array(list(ids), dtype=object)):
        _same(fa.group_advantages(s, index), expected, what=f"index={type(index[0]).__name__}")
    # GiGPO step groups read the same keys: every response in one step group with its twin
    step = fa.group_advantages(s, group_size=4, step_index=list(torch.tensor([5, 5, 6, 6])), omega=1.0)
    whole = _plain_group(s, [0, 0, 0, 0], "grpo")
    _same(step, whole + expected, what="step_index list of tensors")


def test_optimal_token_baseline_index_list_of_tensors():
    """B_t = sum_g G W m / (sum_g W m + eps) over the group, in float64 plain torch."""
    r = torch.zeros(4, 3)
    r[:, -1] = torch.tensor([1.0, 2.0, 3.0, 5.0])
    m = torch.ones(4, 3)
    old, p2 = torch.full((4, 3), -1.0), torch.full((4, 3), 0.2)
    adv, _ = fa.optimal_token_baseline_advantages(r, m, list(torch.tensor([0, 0, 1, 1])), old, p2)
    G = r.double().flip(-1).cumsum(-1).flip(-1)
    W = (1 - 2 * torch.exp(old.double()) + p2.double()).cumsum(-1)
    expected = torch.empty_like(G)
    for rows in ([0, 1], [2, 3]):
        base = (G[rows] * W[rows]).sum(0) / (W[rows].sum(0) + 1e-8)
        expected[rows] = G[rows] - base
    _same(adv, expected, tol=1e-5, what="optimal token baseline")


# ---------------------------------------------------------------- 3. infinite scores, every kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["index", "group_size"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "gpg"])
def test_infinite_scores_give_the_formula_on_every_kernel(estimator, dtype, layout, backend):
    """Groups holding +inf or -inf next to finite groups: the two-pass mean and std in float64
    (NaN where IEEE arithmetic gives NaN, inf where it gives inf), the same on the C++ kernel and
    the plain-torch one (``backend="triton"`` on CPU tensors)."""
    s = torch.tensor([1.0, INF, -INF, 6.0, INF, INF, 0.5, 2.5], dtype=dtype)
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    if layout == "index":
        kw = dict(index=torch.tensor([10, 10, -4, -4, 7, 7, 2, 2]))
    else:
        kw = dict(group_size=2)
    got = fa.group_advantages(s, estimator=estimator, backend=backend, **kw)
    _same(got, _plain_group(s, groups, estimator), tol=1e-5, what=f"{estimator} {layout} {backend}")


# ---------------------------------------------------------------- 4. GAE with an infinite reward
def _plain_gae(r, v, m, gamma, lam):
    """A_t = r_t + gamma V_next - V_t + gamma lam A_next over the valid tokens (masked ones skipped)."""
    out = torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        a_next = v_next = 0.0
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                a_next = float(r[b, t]) + gamma * v_next - float(v[b, t]) + gamma * lam * a_next
                v_next = float(v[b, t])
                out[b, t] = a_next
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_infinite_reward_on_a_valid_token(backend):
    r = torch.tensor([[0.0, INF], [1.0, 0.0], [0.5, -INF]])
    r2 = torch.tensor([[0.0, 2.0, 0.0, -INF], [1.0, 0.0, 3.0, 1.0]])
    v = torch.zeros(3, 2)
    m = torch.ones(3, 2)
    m2 = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    for rr, vv, mm, gamma, lam in ((r, v, m, 1.0, 1.0), (r2, torch.rand(2, 4), m2, 0.9, 0.8)):
        a, ret = fa.gae_advantages(rr, vv, mm, gamma=gamma, lam=lam, whiten=False, backend=backend)
        want = _plain_gae(rr, vv, mm, gamma, lam)
        _same(a, want, what=f"gae advantages {backend}")
        _same(ret, torch.where(mm != 0, want + vv.double(), 0.0), what=f"gae returns {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_returns_with_an_infinite_reward_after_a_masked_token(backend):
    """REINFORCE++ returns reset to 0 at a masked token, so an infinite reward after it stays there
    (the Triton kernel multiplied it by the masked token's 0); masked outputs are exactly 0."""
    r = torch.tensor([[1.0, 0.0, 2.0, INF], [1.0, 2.0, 0.0, -INF]])
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    want = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(2):
        run = 0.0
        for t in reversed(range(4)):
            run = float(r[b, t]) + 0.9 * run if m[b, t] else 0.0
            want[b, t] = run
    _same(fa.reinforce_pp_advantages(r, m, gamma=0.9, whiten=False, backend=backend), want, what=backend)


# ---------------------------------------------------------------- 6. eps = 0 on equal scores
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["index", "group_size"])
def test_eps_zero_gives_exactly_zero_for_equal_scores(backend, layout):
    kw = dict(index=torch.tensor([3, 3, 8, 8])) if layout == "index" else dict(group_size=2)
    s = torch.tensor([1.0, 1.0, 0.0, 2.0])
    s2 = math.sqrt(2.0)
    for estimator, expected in (("grpo", [0.0, 0.0, -1 / s2, 1 / s2]), ("grpo_passk", [0.0, 0.0, 0.0, 2 / s2])):
        got = fa.group_advantages(s, eps=0.0, estimator=estimator, backend=backend, **kw)
        _same(got, torch.tensor(expected), what=estimator)
        assert got[0] == 0 and got[1] == 0
    for std in ("batch", "group"):  # a batch of equal scores
        got = fa.group_advantages(torch.full((4,), 0.3), eps=0.0, std=std, backend=backend, **kw)
        assert torch.equal(got, torch.zeros(4)), (std, got)
    gd = fa.group_advantages(torch.ones(4, 2), eps=0.0, estimator="gdpo", backend=backend, **kw)
    assert torch.equal(gd, torch.zeros(4))


def test_reference_eps_zero_equal_group():
    from fastalign.reference import advantages as R
    out = R.group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), group_size=2, eps=0.0)
    assert out[:2].tolist() == [0.0, 0.0] and out[3] == pytest.approx(1 / math.sqrt(2.0))


# ---------------------------------------------------------------- 5. OpenRLHF's whitening
def _openrlhf_reinforce(rewards, mask, gamma):
    """A float64 transcription of OpenRLHF 0.11.2's REINFORCE++ path
    (``RemoteExperienceMaker.get_cumulative_returns`` then the whitening of
    ``compute_advantages_and_returns``: ``var = sum m (a - mean)^2 / N``, ``var.clamp(min=1e-8).rsqrt()``).
    Running OpenRLHF's own method needs stand-ins for Ray, vLLM, DeepSpeed and more (too heavy for a
    test); /tmp repro scripts checked the option against it directly."""
    r = (rewards * mask).double()
    returns = torch.zeros_like(r)
    run = torch.zeros(r.shape[0], dtype=torch.float64)
    for t in reversed(range(r.shape[1])):
        run = r[:, t] + gamma * run
        returns[:, t] = run
    m = mask.double()
    n = m.sum()
    mean = (returns * m).sum() / n
    var = ((returns - mean) ** 2 * m).sum() / n
    return (returns - mean) * var.clamp(min=1e-8).rsqrt() * m


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_unbiased_false_is_openrlhf(backend, gamma):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    r = torch.zeros(4, 5)
    r[torch.arange(4), torch.tensor([2, 4, 1, 3])] = torch.tensor([1.0, 0.0, 0.5, 2.0])
    want = _openrlhf_reinforce(r, mask, gamma)
    got = fa.reinforce_pp_advantages(r, mask, gamma=gamma, unbiased=False, backend=backend)
    _same(got, want, tol=1e-6, what="reinforce_pp unbiased=False")
    # the default is verl's unbiased variance: off by sqrt((N-1)/N) from OpenRLHF's
    n = float(mask.sum())
    ratio = fa.reinforce_pp_advantages(r, mask, gamma=gamma, backend=backend)[mask.bool()] / want[mask.bool()]
    assert torch.allclose(ratio.double(), torch.full_like(ratio.double(), math.sqrt((n - 1) / n)), atol=1e-5)


def test_masked_whiten_biased_floor():
    """Near-constant values: OpenRLHF floors the variance at eps (no eps added)."""
    x = torch.tensor([[0.0, 1e-5, 2e-5, 3e-5]], dtype=torch.float64)
    m = torch.ones(1, 4)
    var = ((x - x.mean()) ** 2).mean()
    want = (x - x.mean()) * var.clamp(min=1e-8).rsqrt()
    _same(fa.masked_whiten(x, m, unbiased=False), want, tol=1e-12)


# ---------------------------------------------------------------- 7, 8. argument checks
def test_gdpo_reward_weights_and_columns_are_checked():
    sc = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    idx = torch.tensor([0, 0, 1, 1])
    for w in ([1.0, NAN], [1.0, INF], torch.tensor([1.0, INF]), torch.tensor([NAN, 1.0])):
        with pytest.raises(ValueError, match="reward_weights"):
            fa.group_advantages(sc, idx, estimator="gdpo", reward_weights=w)
    with pytest.raises(TypeError, match="reward_weights"):
        fa.group_advantages(sc, idx, estimator="gdpo", reward_weights=["a", "b"])
    with pytest.raises(ValueError, match="scores"):
        fa.group_advantages(torch.zeros(4, 0), idx, estimator="gdpo")
    # numpy weights are still numbers
    a = fa.group_advantages(sc, idx, estimator="gdpo", reward_weights=np.array([1.0, 0.5]))
    b = fa.group_advantages(sc, idx, estimator="gdpo", reward_weights=[1.0, 0.5])
    assert torch.equal(a, b)


def test_small_validation_gaps_name_the_argument():
    s, idx = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0, 0, 1, 1])
    r, m = torch.randn(2, 3), torch.ones(2, 3)
    for lengths in (-torch.ones(4), torch.full((4,), NAN), torch.tensor([1.0, INF, 1.0, 1.0])):
        with pytest.raises(ValueError, match="lengths"):
            fa.group_advantages(s, idx, estimator="opo", lengths=lengths)
    for eps in ("a", None):
        with pytest.raises(TypeError, match="eps"):
            fa.group_advantages(s, idx, eps=eps)
    with pytest.raises(TypeError, match="omega"):
        fa.group_advantages(s, idx, omega=None)
    for eps in (-1.0, -5.0):
        with pytest.raises(ValueError, match="eps"):
            fa.masked_whiten(torch.tensor([[0.0, 1.0, 2.0]]), torch.ones(1, 3), eps=eps)
    with pytest.raises(TypeError, match="unbiased"):
        fa.masked_whiten(r, m, unbiased="no")
    for bad in (None, "0.9"):
        with pytest.raises(TypeError, match="gamma"):
            fa.reinforce_pp_advantages(r, m, gamma=bad)
        with pytest.raises(TypeError, match="lam"):
            fa.gae_advantages(r, r, m, lam=bad)
        with pytest.raises(TypeError, match="beta"):
            fa.implicit_process_advantages(r, r, m, beta=bad)
    for bad in ("no", 1):
        with pytest.raises(TypeError, match="zero_tail"):
            fa.optimal_token_baseline_advantages(r, m, [0, 0], r, r, zero_tail=bad)
