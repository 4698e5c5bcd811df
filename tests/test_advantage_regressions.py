"""Regressions of the advantage estimators: index entries given as tensors, infinite scores and
rewards on every kernel, ``eps=0`` on equal scores, OpenRLHF's whitening, and argument checks.

Expected values come from float64 plain PyTorch / Python written here (or the trainers' own code
in the integration tests), never from fastalign."""
import math

import numpy as np
import pytest
import torch

import fastalign as fa
import openrlhf_source
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


def test_index_list_of_zero_dim_numpy_arrays_groups_by_value():
    """0-d numpy arrays (``list(np.array(ids))`` of an object array, ``np.array(3)``) are unhashable: as list
    entries they count by their value, as the 0-d tensors and numpy scalars do."""
    s = torch.tensor([1.0, 2.0, 3.0, 5.0])
    expected = _plain_group(s, [0, 0, 1, 1], "grpo")
    index = [np.array(7), np.array(7), np.array(3), np.array(3)]
    _same(fa.group_advantages(s, index), expected, what="index of 0-d numpy arrays")
    _same(fa.group_advantages(s, [np.array("a"), np.array("a"), np.array("b"), np.array("b")]), expected,
          what="index of 0-d numpy string arrays")


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
def test_infinite_reward_stays_infinite_where_gamma_powers_underflow(backend):
    """gamma^k underflows to 0 within 1,424 tokens at gamma = 0.01 (past one 1,024-token block of the Triton scan),
    where the token-by-token scan keeps multiplying inf by 0.01: the returns, GAE and PRIME before an infinite
    reward stay inf (the Triton kernel gave NaN from 0 * inf); gamma = 0 gives the scan's own 0 * inf = NaN."""
    T = 1424
    r = torch.zeros(2, T, dtype=torch.float64)
    r[0, -1], r[1, -1], r[1, 3] = INF, -INF, 2.0
    m = torch.ones(2, T)
    m[1, 500:520] = 0.0  # a gap: REINFORCE++ returns reset there
    for gamma in (0.01, 0.0):
        a, _ = fa.gae_advantages(r, torch.zeros_like(r), m, gamma=gamma, lam=1.0, whiten=False, backend=backend)
        _same(a, _plain_gae(r, torch.zeros_like(r), m, gamma, 1.0), what=f"gae gamma={gamma} {backend}")
        want = torch.zeros_like(r)
        for b in range(2):
            run = 0.0
            for t in reversed(range(T)):
                run = float(r[b, t]) + gamma * run if m[b, t] else 0.0
                want[b, t] = run
        got = fa.reinforce_pp_advantages(r, m, gamma=gamma, whiten=False, backend=backend)
        _same(got, want, what=f"reinforce_pp gamma={gamma} {backend}")
    assert a[0, :T - 1].isnan().all() and got[0, :T - 1].isnan().all()  # gamma = 0: 0 * inf, as verl's loop


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


def test_masked_whiten_eps_zero_is_taken():
    """``eps=0`` (>= 0) is a valid epsilon: the plain ``(x - mean) / std`` with the unbiased std, in float64."""
    x = torch.tensor([[0.3, -1.2, 2.0, 0.7]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    v = x[0, :3]
    want = torch.cat([(v - v.mean()) / v.std(), torch.zeros(1, dtype=torch.float64)])[None]
    _same(fa.masked_whiten(x, m, eps=0.0), want, tol=1e-12)
    _same(fa.masked_whiten(x, m, eps=0.0, unbiased=False), torch.cat(
        [(v - v.mean()) / v.std(unbiased=False), torch.zeros(1, dtype=torch.float64)])[None], tol=1e-12)


@pytest.mark.parametrize("m", [[0.5, 0.25, 1.0, 0.75], [0.5, 0.25, 0.0, 0.0]], ids=["total-above-1", "total-below-1"])
@pytest.mark.parametrize("x", [[0.3, -1.2, 2.0, 0.7], [0.7, 0.7, 0.7, 0.7]], ids=["spread", "constant"])
def test_masked_whiten_biased_with_a_fractional_mask(m, x):
    """``unbiased=False`` as documented and as OpenRLHF's whitening (``compute_advantages_and_returns``):
    ``N = sum m``, ``mean = sum m x / N``, ``var = sum m (x - mean)^2 / N``, ``(x - mean) * rsqrt(max(var,
    1e-8))`` on the valid tokens, in float64, for a fractional mask of total weight above and below 1 (a
    constant row whitens to 0)."""
    x = torch.tensor([x], dtype=torch.float64)
    mask = torch.tensor([m], dtype=torch.float64)
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n
    want = torch.where(mask != 0, (x - mean) * var.clamp(min=1e-8).rsqrt() * mask, 0.0)
    _same(fa.masked_whiten(x, mask, unbiased=False), want, tol=1e-9)


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


# ---------------------------------------------------------------- 9. no autograd graph on the outputs
def _grad_inputs(B=4, T=6):
    g = torch.Generator().manual_seed(11)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]],
                        dtype=torch.float32)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(True)  # noqa: E731
    return mask, leaf


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_never_require_grad(backend):
    """Inputs that require grad (critic values, the policy's own log-probs, a baseline with a graph):
    every estimator's output carries no graph on every kernel, has the values of the detached call,
    and a hand-written loss ``-(adv * ratio)`` backpropagates into the ratio alone."""
    mask, leaf = _grad_inputs()
    r, v, lp, ref_lp, base, out_adv = leaf(4, 6), leaf(4, 6), leaf(4, 6), leaf(4, 6), leaf(4), leaf(4)
    old, p2 = -torch.rand(4, 6), torch.rand(4, 6) * 0.3
    s, s2 = leaf(6), leaf(6, 2)
    idx, step = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([5, 5, 6, 6, 7, 7])
    calls = {
        "gae": lambda t: fa.gae_advantages(t["r"], t["v"], mask, gamma=0.9, lam=0.95, backend=backend),
        "reinforce_pp": lambda t: fa.reinforce_pp_advantages(t["r"], mask, gamma=0.9, backend=backend),
        "reinforce_pp carry": lambda t: fa.reinforce_pp_advantages(t["r"], mask, gamma=0.9, reset_at_masked=False,
                                                                 backend=backend),
        "remax": lambda t: fa.remax_advantages(t["r"], mask, t["base"], backend=backend),
        "prime": lambda t: fa.implicit_process_advantages(t["lp"], t["ref"], mask, t["out"], gamma=0.9,
                                                          backend=backend),
        "otb": lambda t: fa.optimal_token_baseline_advantages(t["r"], mask, [0, 0, 1, 1], old, p2),
        **{f"group {e}": (lambda e: lambda t: fa.group_advantages(
            t["s"], idx, estimator=e, backend=backend,
            **(dict(lengths=torch.full((6,), 3.0)) if e in ("opo", "reinforce_pp_baseline") else {})))(e)
           for e in ("grpo", "rloo", "opo", "gpg", "grpo_passk", "reinforce_pp_baseline")},
        "group grpo unit_std": lambda t: fa.group_advantages(t["s"], idx, singleton="unit_std", backend=backend),
        "group gpg unit_std": lambda t: fa.group_advantages(t["s"], idx, estimator="gpg", singleton="unit_std",
                                                            backend=backend),
        "group grpo batch std": lambda t: fa.group_advantages(t["s"], idx, std="batch", backend=backend),
        "group gigpo": lambda t: fa.group_advantages(t["s"], idx, step_index=step, backend=backend),
        "group gdpo": lambda t: fa.group_advantages(t["s2"], idx, estimator="gdpo", singleton="unit_std",
                                                    batch_normalization="token", lengths=torch.full((6,), 2.0),
                                                    backend=backend),
    }
    graph = dict(r=r, v=v, lp=lp, ref=ref_lp, base=base, out=out_adv, s=s, s2=s2)
    detached = {k: t.detach() for k, t in graph.items()}
    for name, call in calls.items():
        got, want = call(graph), call(detached)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        for a, b in zip(got, want):
            assert not a.requires_grad and a.grad_fn is None, name
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num()), name
        adv = got[0]
        ratio = torch.ones_like(adv, requires_grad=True)
        (-(adv * ratio)).sum().backward()
        assert torch.equal(ratio.grad, -adv), name


# ---------------------------------------------------------------- 10. OpenRLHF's REINFORCE++ and GAE
def _openrlhf_method(name):
    """``RemoteExperienceMaker.<name>`` of the installed OpenRLHF 0.11.2 (a method that uses only torch), called
    without an instance."""
    from typing import Tuple

    method = openrlhf_source.experience_maker_methods({"torch": torch, "Tuple": Tuple}, name)[name]
    return lambda *args: method(None, *args)


def _openrlhf_whiten(adv, mask):
    """OpenRLHF's advantage normalisation (``make_experience_batch``): mean and biased var over the action
    tokens, ``(adv - mean) * rsqrt(max(var, 1e-8))`` (fastalign gives 0 on the masked tokens)."""
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = ((adv - mean).pow(2) * mask).sum() / n
    return (adv - mean) * var.clamp(min=1e-8).rsqrt() * mask


MULTI_TURN = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 0],
                           [0, 0, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_carried_through_masked_tokens_is_openrlhf(backend, gamma):
    """``reset_at_masked=False, unbiased=False`` against OpenRLHF's ``get_cumulative_returns`` plus its
    whitening, on action masks with interior observation spans; the default (reset) differs there and
    agrees on one contiguous span per row."""
    cumulative_returns = _openrlhf_method("get_cumulative_returns")
    g = torch.Generator().manual_seed(int(gamma * 10))
    for mask in (MULTI_TURN, (torch.arange(7)[None, :] < torch.tensor([7, 3, 5, 1, 6])[:, None]).double()):
        r = torch.randn(5, 7, generator=g, dtype=torch.float64)
        r[:, -1] += 2.0  # an outcome reward on the last position
        returns = cumulative_returns(r, mask, gamma)
        want = _openrlhf_whiten(returns, mask)
        got = fa.reinforce_pp_advantages(r, mask, gamma=gamma, unbiased=False, reset_at_masked=False, backend=backend)
        _same(got, want, tol=1e-9, what=f"carried, gamma={gamma}")
        raw = fa.reinforce_pp_advantages(r, mask, gamma=gamma, whiten=False, reset_at_masked=False, backend=backend)
        _same(raw, returns * mask, tol=1e-9, what="returns")
        reset = fa.reinforce_pp_advantages(r, mask, gamma=gamma, unbiased=False, backend=backend)
        if mask is MULTI_TURN and gamma != 0.0:
            assert not torch.allclose(reset, want)
        elif mask is not MULTI_TURN:
            _same(reset, want, tol=1e-9, what="contiguous spans: reset or not")
    with pytest.raises(TypeError, match="reset_at_masked"):
        fa.reinforce_pp_advantages(r, mask, reset_at_masked="no")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_is_openrlhf_on_contiguous_masks(backend):
    """docs/integrations.md: ``gae_advantages(unbiased=False)`` is OpenRLHF's GAE (``get_advantages_and_returns``
    plus its whitening) when each row's valid tokens form one contiguous span, left or right padded."""
    gae = _openrlhf_method("get_advantages_and_returns")
    g = torch.Generator().manual_seed(3)
    start, end = torch.tensor([0, 0, 2, 1, 0]), torch.tensor([7, 3, 7, 5, 1])
    t = torch.arange(7)[None, :]
    mask = ((t >= start[:, None]) & (t < end[:, None])).double()
    r, v = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    adv, ret = gae(v, r, mask, 0.9, 0.8)
    got, got_ret = fa.gae_advantages(r, v, mask, gamma=0.9, lam=0.8, unbiased=False, backend=backend)
    _same(got, _openrlhf_whiten(adv, mask), tol=1e-9, what="gae advantages")
    _same(got_ret, ret * mask, tol=1e-9, what="gae returns")


# ---------------------------------------------------------------- 10b. OpenRLHF's estimator dispatch
def _openrlhf_experience_maker(estimator, n, kl_coef, gamma, lambd):
    """A stand-in ``RemoteExperienceMaker`` whose ``compute_advantages_and_returns``,
    ``get_cumulative_returns`` and ``get_advantages_and_returns`` are OpenRLHF 0.11.2's own, executed
    from the installed source (as ``_openrlhf_method``), with the names the first one reads:
    ``compute_reward`` from OpenRLHF's ``models/utils.py``; ``apply_length_penalties`` a no-op, as length
    penalties are out of scope here (with their default settings, ``overlong_buffer_len`` and
    ``stop_properly_penalty_coef`` None, OpenRLHF applies none); ``Experience`` only an annotation."""
    import itertools
    import logging
    import types
    from typing import List, Tuple

    names = ("compute_advantages_and_returns", "get_cumulative_returns", "get_advantages_and_returns")
    namespace = openrlhf_source.experience_maker_methods(
        {"torch": torch, "itertools": itertools, "List": List, "Tuple": Tuple, "Experience": object,
         "compute_reward": openrlhf_source.models()["utils"].compute_reward,
         "apply_length_penalties": lambda experiences, args: None,
         "logger": logging.getLogger("openrlhf_experience_maker_under_test")}, *names)
    args = types.SimpleNamespace(
        rollout=types.SimpleNamespace(n_samples_per_prompt=n),
        algo=types.SimpleNamespace(advantage=types.SimpleNamespace(
            estimator=estimator, gamma=gamma, lambd=lambd, no_std_norm=False)),
        reward=types.SimpleNamespace(clip_range=(-10.0, 10.0)))  # OpenRLHF's default --reward.clip_range
    self = types.SimpleNamespace(strategy=types.SimpleNamespace(args=args), args=args, advantage_estimator=estimator,
                                 kl_ctl=types.SimpleNamespace(value=kl_coef))  # FixedKLController
    for name in names:
        setattr(self, name, types.MethodType(namespace[name], self))
    return self


def _masks(kind, B, T, g):
    """``[B, T]`` float64 action masks, each row with at least one valid token: interior observation spans
    (multi-turn), right padded, or left padded (the last two one contiguous span per row)."""
    t = torch.arange(T)[None, :]
    if kind == "multi_turn":
        m = (torch.rand(B, T, generator=g) < 0.6).double()
        m[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = 1.0
        m[:4] = MULTI_TURN[:4, :T]  # interior spans and trailing padding for sure
        return m
    length = torch.randint(1, T + 1, (B,), generator=g)
    length[:2] = torch.tensor([T, 1])
    if kind == "right_padded":
        return (t < length[:, None]).double()
    return (t >= T - length[:, None]).double()


OPENRLHF_ESTIMATORS = ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1], ids=["no_kl", "kl_reward"])
@pytest.mark.parametrize("estimator,mask_kind", [
    (e, k) for e in OPENRLHF_ESTIMATORS for k in ("multi_turn", "right_padded", "left_padded")
    if not (e == "gae" and k == "multi_turn")])  # OpenRLHF's GAE runs through masked tokens with V = r = 0
def test_openrlhf_advantage_estimators_are_fastalign_recipes(estimator, mask_kind, kl_coef, backend):
    """docs/integrations.md's recipe for each ``--algo.advantage.estimator`` of OpenRLHF 0.11.2 against its own
    ``compute_advantages_and_returns`` (reward shaping, ``compute_reward``, the returns, the whitening), on
    3 prompts x 4 samples split into 2 experiences in a shuffled order (as dynamic batching splits them),
    with and without a KL reward. OpenRLHF forces gamma to 1 for all but ``reinforce`` and ``gae``, and whitens
    (biased variance, in fp32) for ``gae``, ``reinforce`` and ``reinforce_baseline`` only."""
    import types

    n, B, T, gamma, lambd = 4, 12, 7, 0.9, 0.95
    g = torch.Generator().manual_seed(OPENRLHF_ESTIMATORS.index(estimator) * 10 + int(kl_coef * 10))
    r = torch.randn(B, generator=g, dtype=torch.float64)
    r[4:8] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # a binary group
    r[8:] = 1.0  # a group of equal rewards
    kl = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = _masks(mask_kind, B, T, g)

    # OpenRLHF: two experiences holding a shuffled split of the 12 responses (``index``: original positions)
    maker = _openrlhf_experience_maker(estimator, n, kl_coef, gamma, lambd)
    perm = torch.randperm(B, generator=g)
    experiences = [types.SimpleNamespace(rewards=r[idx].clone(), kl=kl[idx].clone(), values=values[idx].clone(),
                                         action_mask=m[idx].bool(), index=idx.tolist(), info={})
                   for idx in (perm[:5], perm[5:])]
    maker.compute_advantages_and_returns(experiences)
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for idx, exp in zip((perm[:5], perm[5:]), experiences):
        adv[idx], ret[idx] = exp.advantages.double(), exp.returns.double()

    # fastalign: the sequence-level advantage, placed at the last valid token, minus kl_coef * kl everywhere
    seq = {"gae": r, "reinforce": r,
           "rloo": fa.group_advantages(r, group_size=n, estimator="rloo", backend=backend),
           "reinforce_baseline": fa.group_advantages(r, group_size=n, std="none", backend=backend),
           "group_norm": fa.group_advantages(r, group_size=n, eps=1e-9, backend=backend),
           "dr_grpo": fa.group_advantages(r, group_size=n, std="none", backend=backend),
           "flash_reinforce": fa.group_advantages(r, group_size=r.numel(), std="none", backend=backend)}[estimator]
    last = T - 1 - m.flip(1).argmax(1)
    token_rewards = -kl_coef * kl
    token_rewards[torch.arange(B), last] += seq
    whitened = estimator in ("gae", "reinforce", "reinforce_baseline")
    if estimator == "gae":
        got, got_ret = fa.gae_advantages(token_rewards, values, m, gamma=gamma, lam=lambd, unbiased=False,
                                         backend=backend)
    else:
        g_ = gamma if estimator == "reinforce" else 1.0
        got_ret = fa.reinforce_pp_advantages(token_rewards, m, gamma=g_, whiten=False, reset_at_masked=False,
                                             backend=backend)
        got = (fa.reinforce_pp_advantages(token_rewards, m, gamma=g_, unbiased=False, reset_at_masked=False,
                                          backend=backend) if whitened else got_ret)
        if kl_coef == 0.0 and g_ == 1.0:  # no KL reward, no discount: the sequence advantage on every valid token
            flat = fa.token_advantages(seq, m)
            _same(got, fa.masked_whiten(flat, m, unbiased=False) if whitened else flat, tol=1e-6 if whitened else 1e-9,
                  what=f"{estimator}: token_advantages")
    if estimator not in ("gae", "reinforce"):
        assert maker.strategy.args.algo.advantage.gamma == 1.0  # OpenRLHF's override, left in its args
    valid = m.bool()
    # OpenRLHF whitens with fp32 statistics (``.float()``); the rest stays float64
    _same(got[valid], adv[valid], tol=1e-6 if whitened else 1e-9, what=f"{estimator} advantages")
    _same(got[~valid], torch.zeros_like(got[~valid]), tol=0.0, what="masked tokens")
    _same(got_ret[valid], ret[valid], tol=1e-9, what=f"{estimator} returns")


# ---------------------------------------------------------------- 11. ranges and types of the options
def test_token_level_ranges_and_types_are_checked():
    r, m = torch.randn(2, 3), torch.ones(2, 3)
    for bad in (-0.5, -1.0):
        with pytest.raises(ValueError, match="gamma"):
            fa.gae_advantages(r, r, m, gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            fa.reinforce_pp_advantages(r, m, gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            fa.implicit_process_advantages(r, r, m, gamma=bad)
    for bad in (-0.1, 1.5, 2.0):
        with pytest.raises(ValueError, match="lam"):
            fa.gae_advantages(r, r, m, lam=bad)
    for gamma, lam in ((0.0, 0.0), (1.0, 1.0), (1.5, 0.5)):  # the ends of the ranges; gamma > 1 is a choice
        fa.gae_advantages(r, r, m, gamma=gamma, lam=lam)
    for eps in (-1.0, -1e-12):
        with pytest.raises(ValueError, match="eps"):
            fa.optimal_token_baseline_advantages(r, m, [0, 0], -torch.rand(2, 3), torch.rand(2, 3), eps=eps)
    with pytest.raises(TypeError, match="eps"):
        fa.optimal_token_baseline_advantages(r, m, [0, 0], -torch.rand(2, 3), torch.rand(2, 3), eps="a")
    for base in (torch.tensor([1, 0]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="baseline"):
            fa.remax_advantages(r, m, base)
    # group_size: a numpy integer is an int; lengths and response_mask: one or the other
    s = torch.tensor([1.0, 2.0, 4.0, 0.0, 3.0, 5.0])
    want = _plain_group(s, [0, 0, 0, 1, 1, 1], "grpo")
    for size in (np.int64(3), np.int32(3), np.uint8(3)):
        _same(fa.group_advantages(s, group_size=size), want, what=f"group_size={size!r}")
    for size in (np.float64(3.0), 3.0, True):
        with pytest.raises(ValueError, match="group_size"):
            fa.group_advantages(s, group_size=size)
    with pytest.raises(ValueError, match="response_mask or lengths"):
        fa.group_advantages(s, group_size=3, estimator="opo", lengths=torch.ones(6), response_mask=torch.ones(6, 4))


# ---------------------------------------------------------------- 12. the optimal token baseline of an empty batch
@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimal_token_baseline_with_no_sequences_or_no_tokens(shape, zero_tail, dtype):
    """B = 0 or T = 0: empty ``(advantages, returns)`` of the input shape and dtype, as verl's own
    estimators give (the group sums and the longest-response search crashed on the empty sizes), also
    through the verl profile; a wrong-length index is still refused."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.trainer.config import AlgoConfig
    from fastalign.integrations.verl import compute_advantage

    B, T = shape
    r, m = torch.zeros(shape, dtype=dtype), torch.ones(shape)
    old, p2 = torch.zeros(shape), torch.zeros(shape)
    uid = np.array([f"p{i // 2}" for i in range(B)], dtype=object)
    for est, align, verl_fn in (
            ("optimal_token_baseline", "position", core_algos.compute_optimal_token_baseline_advantage),
            ("tir_optimal_token_baseline", "response", core_algos.compute_multi_turn_optimal_token_baseline_advantage)):
        want = verl_fn(r, m, uid, old, p2, handle_zero_tail=zero_tail)
        got = fa.optimal_token_baseline_advantages(r, m, list(uid), old, p2, zero_tail=zero_tail, align=align)
        for a, w in zip(got, want):
            assert a.shape == w.shape == shape and a.dtype == w.dtype == dtype, (est, a.shape, w.shape)
        profile = compute_advantage(AlgoConfig(adv_estimator=est), r, m, uid, old_log_probs=old, sum_pi_squared=p2)
        for a, w in zip(profile, want):
            assert a.shape == w.shape and a.dtype == w.dtype, est
        with pytest.raises(ValueError, match="index"):
            fa.optimal_token_baseline_advantages(r, m, list(uid) + ["extra"], old, p2, align=align)


# ---------------------------------------------------------------- 13. token counts where no estimator reads them
def _reads_token_counts(estimator, batch_normalization):
    return estimator in ("opo", "reinforce_pp_baseline") or (estimator == "gdpo" and batch_normalization == "token")


@pytest.mark.parametrize("estimator,batch_normalization",
                         [(e, "sequence") for e in sorted(fa.advantages.ESTIMATORS)] + [("gdpo", "token")])
def test_token_counts_only_where_the_estimator_reads_them(estimator, batch_normalization):
    """``response_mask`` / ``lengths``: opo, reinforce_pp_baseline and gdpo with ``batch_normalization="token"``
    weigh by them (the float64 reference, the same for the mask and its row sums); every other estimator
    (and gdpo with ``"sequence"``) refuses them naming the argument, as ``std`` where it does not apply,
    instead of ignoring them; so do the GiGPO step groups, which run the same estimator."""
    from fastalign.reference import advantages as R

    g = torch.Generator().manual_seed(5)
    B = 8
    scores = torch.randn(B, 2, generator=g, dtype=torch.float64) if estimator == "gdpo" else \
        torch.randn(B, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    lengths = torch.tensor([3, 1, 4, 2, 0, 4, 2, 1])
    mask = (torch.arange(4)[None, :] < lengths[:, None]).to(torch.float32)
    kw = dict(estimator=estimator)
    if estimator == "gdpo":
        kw["batch_normalization"] = batch_normalization
    if _reads_token_counts(estimator, batch_normalization):
        want = R.group_advantages(scores, index.tolist(), lengths=lengths.double(), **kw)
        _same(fa.group_advantages(scores, index, response_mask=mask, **kw), want, tol=1e-12, what="response_mask")
        _same(fa.group_advantages(scores, index, lengths=lengths, **kw), want, tol=1e-12, what="lengths")
        return
    for given in (dict(response_mask=mask), dict(lengths=lengths)):
        name = next(iter(given))
        with pytest.raises(ValueError, match=f"{name} does not apply to estimator '{estimator}'"):
            fa.group_advantages(scores, index, **given, **kw)
        with pytest.raises(ValueError, match=name):
            fa.group_advantages(scores, index, step_index=index.flip(0), **given, **kw)
        with pytest.raises(ValueError, match=name):
            fa.group_advantages(scores, group_size=2, **given, **kw)
    with pytest.raises(ValueError, match="response_mask and lengths do not apply"):
        fa.group_advantages(scores, index, response_mask=mask, lengths=lengths, **kw)
    # without them: the reference
    _same(fa.group_advantages(scores, index, **kw), R.group_advantages(scores, index.tolist(), **kw), tol=1e-12)


# ---------------------------------------------------------------- 14. numpy booleans as switches
def test_switches_take_numpy_bools():
    """A numpy ``bool_`` (read from a config array) is a switch as the Python bool of its value, as numpy
    integers and floats are numbers; anything else is refused with its qualified type, never the
    contradiction "must be a bool, got bool" (numpy 2 names ``numpy.bool_`` ``bool``)."""
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    old, p2 = -torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g) * 0.3
    lp = torch.randn(3, 5, generator=g) * 30
    calls = {
        "unbiased": lambda b: fa.masked_whiten(r, m, unbiased=b),
        "whiten": lambda b: fa.reinforce_pp_advantages(r, m, whiten=b),
        "reset_at_masked": lambda b: fa.reinforce_pp_advantages(r, m, reset_at_masked=b, whiten=False),
        "zero_tail": lambda b: fa.optimal_token_baseline_advantages(r, m, [0, 0, 0], old, p2, zero_tail=b)[0],
        "kl_clamp": lambda b: fa.kl_penalty(lp, torch.zeros(3, 5), kl_clamp=b),
    }
    for name, call in calls.items():
        assert not torch.equal(call(True), call(False)), name  # the switch changes the result here
        for flag in (True, False):
            assert torch.equal(call(np.bool_(flag)), call(flag)), (name, flag)
        for bad, kind in ((np.int64(1), "numpy.int64"), (np.array(True), "numpy.ndarray"), ("no", "str"),
                          (1, "int"), (torch.tensor(True), "torch.Tensor")):
            with pytest.raises(TypeError, match=f"^{name} must be a bool, got {kind}$"):
                call(bad)
    a, _ = fa.gae_advantages(r, v, m, whiten=np.bool_(False), unbiased=np.False_)
    assert torch.equal(a, fa.gae_advantages(r, v, m, whiten=False, unbiased=False)[0])


# ---------------------------------------------------------------- 15. eps and omega only where they are read
_NO_STD = [("rloo", {}), ("gpg", {}), ("opo", dict(lengths=True)), ("reinforce_pp_baseline", dict(lengths=True)),
           ("grpo", dict(std="none")), ("grpo_passk", dict(std="none")),
           ("gdpo", dict(std="none", batch_normalization="token", lengths=True))]
_STD = [("grpo", {}), ("grpo", dict(std="batch")), ("grpo_passk", {}), ("grpo_passk", dict(std="batch")),
        ("gdpo", {}), ("gdpo", dict(std="none")), ("gdpo", dict(batch_normalization="token", lengths=True))]


def _eps_case(estimator, kw):
    g = torch.Generator().manual_seed(3)
    B = 8
    scores = torch.randn(B, 2, generator=g, dtype=torch.float64) if estimator == "gdpo" else \
        torch.randn(B, generator=g, dtype=torch.float64)
    kw = dict(kw, estimator=estimator)
    if kw.pop("lengths", False):
        kw["lengths"] = torch.tensor([3.0, 1.0, 4.0, 2.0, 5.0, 4.0, 2.0, 1.0])
    return scores, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]), kw


@pytest.mark.parametrize("estimator,kw", _NO_STD, ids=[f"{e}-{'-'.join(map(str, k.values()))}" for e, k in _NO_STD])
def test_eps_is_refused_where_no_std_divides(estimator, kw):
    """rloo, gpg, opo, reinforce_pp_baseline, and grpo / grpo_passk with std="none" (gdpo with it and the token
    whitening, which adds 1e-8 to the variance) divide by no std: an ``eps`` other than the default raised
    nothing and changed nothing. It raises naming ``eps`` now, as ``std`` where it does not apply."""
    scores, index, kw = _eps_case(estimator, kw)
    for eps in (0.5, 0.0):
        with pytest.raises(ValueError, match="eps=.* does not apply to estimator"):
            fa.group_advantages(scores, index, eps=eps, **kw)
    fa.group_advantages(scores, index, eps=1e-6, **kw)  # the default, given: accepted
    assert not fa.advantages.sequence_level.reads_eps(estimator, kw.get("std", "group"),
                                                      kw.get("batch_normalization", "sequence"))


@pytest.mark.parametrize("estimator,kw", _STD, ids=[f"{e}-{'-'.join(map(str, k.values()))}" for e, k in _STD])
def test_eps_is_taken_where_a_std_divides(estimator, kw):
    """Where a std divides, ``eps`` is read: it changes the result, as the float64 reference says."""
    from fastalign.reference import advantages as R

    scores, index, kw = _eps_case(estimator, kw)
    got = fa.group_advantages(scores, index, eps=0.5, **kw)
    _same(got, R.group_advantages(scores, index.tolist(), eps=0.5, **kw), tol=1e-12, what="eps=0.5")
    assert not torch.allclose(got, fa.group_advantages(scores, index, **kw))
    assert fa.advantages.sequence_level.reads_eps(estimator, kw.get("std", "group"),
                                                  kw.get("batch_normalization", "sequence"))


def test_omega_needs_step_index():
    """``omega`` weighs the step groups' term: without ``step_index`` it raised nothing and changed nothing (as
    ``step_scores`` there, which raises). With it, ``A_episode + omega * A_step`` (float64 plain torch)."""
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 0.5, -1.0], dtype=torch.float64)
    index, step = [0, 0, 0, 1, 1, 1], [4, 5, 4, 5, 4, 5]
    for omega in (0.5, 0.0, -1.0):
        with pytest.raises(ValueError, match="omega=.* needs step_index"):
            fa.group_advantages(s, torch.tensor(index), omega=omega)
    fa.group_advantages(s, torch.tensor(index), omega=1.0)  # the default, given: accepted
    got = fa.group_advantages(s, torch.tensor(index), step_index=torch.tensor(step), omega=0.5)
    _same(got, _plain_group(s, index, "grpo") + 0.5 * _plain_group(s, step, "grpo"), tol=1e-12)


# norm_adv_by_std_in_grpo=False is refused for grpo_vectorized and gdpo (it does not reach them in verl)
@pytest.mark.parametrize("estimator, norm", [
    (est, norm) for est in ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "grpo_passk",
                            "reinforce_plus_plus_baseline", "gdpo")
    for norm in (True, False) if norm or est not in ("grpo_vectorized", "gdpo")])
def test_verl_profile_passes_epsilon_where_it_is_read(estimator, norm):
    """verl passes ``epsilon`` to every grouped estimator, and those that divide by no std ignore it: the profile
    (the registered ``fastalign_<estimator>`` too) takes it and passes it on only where ``group_advantages``
    reads it, with verl's numbers either way."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable")
    from verl.trainer.config import AlgoConfig

    from fastalign.integrations.verl import compute_advantage
    from fastalign.integrations.verl.plugin import ADVANTAGE_ESTIMATORS

    g = torch.Generator().manual_seed(4)
    B, T = 8, 5
    mask = (torch.arange(T)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5, 2, 4])[:, None]).double()
    r = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    uid = np.array(["a", "b", "a", "b", "a", "c", "c", "b"], dtype=object)
    cfg = AlgoConfig(adv_estimator=estimator, norm_adv_by_std_in_grpo=norm)
    verl_kw = dict(token_level_rewards=r.clone(), response_mask=mask, index=uid, epsilon=0.25, config=cfg)
    if estimator == "grpo":
        verl_kw["norm_adv_by_std_in_grpo"] = norm
    want, _ = core_algos.get_adv_estimator_fn(estimator)(**verl_kw)
    got, _ = compute_advantage(cfg, r, mask, uid, epsilon=0.25)
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-6, rtol=1e-6)
    reg, _ = ADVANTAGE_ESTIMATORS[f"fastalign_{estimator}"](r, mask, uid, 0.25, config=cfg)
    torch.testing.assert_close(reg, want.to(reg.dtype), atol=1e-6, rtol=1e-6)
