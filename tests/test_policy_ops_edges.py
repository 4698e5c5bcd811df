"""Edge cases of the policy-loss and group-statistics ops and of the host-side argument checks.

Pinned here: the per-sequence clip extremes of a batch without a valid token (NaN on every backend), the
entropy gradient when only the entropy takes a gradient, Clip-Cov's candidate set with asymmetric clip bounds
on the plain-torch selection path, the group statistics of a partial last block and the length-weighted mean,
group advantages on every CPU backend with a non-default ``eps`` and ``singleton="zero"``, and bad inputs that
must raise a ValueError / TypeError naming the argument (label counts of the token-statistics op, int64 bounds
of ``ignore_index``, an empty global count, packed ``position_ids`` whose starts disagree with
``num_sequences``, 0-dim logits / hidden states, weight lists given as bytes). Expected values come from the
float64 references in ``fastalign.reference``.
"""
import math

import pytest
import torch

import fastalign as fa
from fastalign import reference
from fastalign.ops.group_stats import STATS, group_stats
from fastalign.reference import advantages as ref_adv
from helpers import assert_close, policy_batch


# ---------------------------------------------------------------- policy loss: clip extremes, entropy gradient
def test_clip_extremes_of_a_batch_without_valid_tokens_are_nan(cpu_backend):
    """``clip_low_min`` / ``clip_high_max`` are a min / max over the sequences with a valid token: with none
    (every token masked, B > 0) they are NaN, as in the float64 reference, not the +-inf of an empty min / max."""
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(3, 6, generator=g)
    old, A = lp + 0.3 * torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    m = torch.zeros(3, 6, dtype=torch.bool)
    _, met = fa.policy_loss(lp, old, A, m, loss_type="ppo", backend=cpu_backend)
    _, want = reference.policy_loss(lp.double(), old.double(), A.double(), m, loss_type="ppo")
    for k in ("clip_low_min", "clip_high_max"):
        assert math.isnan(float(want[k])), k
        assert_close(met[k], want[k], atol=0, what=k)


def test_entropy_gradient_when_only_the_entropy_takes_one(cpu_backend):
    """With ``logprobs`` detached and ``entropy`` requiring a gradient, the entropy bonus still has its
    gradient ``-entropy_coef * m / N`` (float64 reference), on the eager C++ path too."""
    g = torch.Generator().manual_seed(6)
    lp, old, A, m = policy_batch(g, 5, 7)
    H = torch.rand(5, 7, generator=g) * 2
    h = H.clone().requires_grad_(True)
    loss, _ = fa.policy_loss(lp, old, A, m, entropy=h, entropy_coef=0.01, backend=cpu_backend)
    assert loss.requires_grad
    loss.backward()
    hr = H.double().requires_grad_(True)
    rloss, _ = reference.policy_loss(lp.double(), old.double(), A.double(), m, entropy=hr, entropy_coef=0.01)
    rloss.backward()
    assert_close(loss, rloss, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(h.grad, hr.grad, atol=1e-7, rtol=1e-5, what="d entropy")


def test_clip_cov_candidates_read_eps_low_and_eps_high_on_every_backend(cpu_backend):
    """Clip-Cov's candidates are the tokens whose clipped term is active with the ``(eps_low, eps_high)`` bounds;
    with ``cov_ratio=1`` every candidate is picked, so the selected fraction, loss and gradient equal the float64
    reference's with asymmetric bounds (the plain-torch selection path of ``backend="triton"`` included)."""
    g = torch.Generator().manual_seed(7)
    B, T = 6, 30
    lp = -torch.rand(B, T, generator=g) * 2
    old = lp + torch.randn(B, T, generator=g) * 0.25
    A = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.1
    kw = dict(eps_low=0.05, eps_high=0.3)
    sel = reference.policy.cov_selection(lp, old, A, m, loss_type="clip_cov", ratio=1.0, lb=-100.0, ub=100.0, **kw)
    swapped = reference.policy.cov_selection(lp, old, A, m, loss_type="clip_cov", ratio=1.0, lb=-100.0, ub=100.0,
                                             eps_low=kw["eps_high"], eps_high=kw["eps_low"])
    assert not torch.equal(sel, swapped), "the batch tells the two bounds apart"
    x = lp.clone().requires_grad_(True)
    loss, met = fa.policy_loss(x, old, A, m, loss_type="clip_cov", cov_ratio=1.0, cov_lb=-100.0, cov_ub=100.0,
                               backend=cpu_backend, **kw)
    loss.backward()
    xr = lp.double().requires_grad_(True)
    rloss, rmet = reference.policy_loss(xr, old.double(), A.double(), m, loss_type="clip_cov", cov_selected=sel, **kw)
    rloss.backward()
    assert_close(met["cov_selected_frac"], rmet["cov_selected_frac"], atol=1e-7, what="selected fraction")
    assert_close(loss, rloss, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, xr.grad, atol=1e-7, rtol=1e-4, what="d logprobs")


# ---------------------------------------------------------------- group statistics and advantages
def test_group_stats_op_partial_last_block_and_weighted_mean(cpu_backend):
    """``fastalign::group_stats`` with blocks of ``group_size`` has ``ceil(B / group_size)`` rows, the last block
    partial; the length-weighted mean reads ``lengths`` on every backend (float64 reference)."""
    scores = torch.tensor([1.0, 2.0, 2.0, 5.0, -1.0, 3.0, 4.0])
    lengths = torch.tensor([3, 1, 4, 2, 5, 1, 6])
    gs = 3
    gid, stats, ngroups = group_stats(scores, torch.empty(0, dtype=torch.int64), lengths.double(), gs, cpu_backend)
    assert stats.shape == (3, len(STATS)) and int(ngroups) == 3
    expected = ref_adv.group_stats(scores.double(), None, group_size=gs, lengths=lengths)
    keys = [i // gs for i in range(scores.shape[0])]
    for c, name in enumerate(STATS):
        got = stats[gid, c]
        want = torch.tensor([float(expected[k][name]) for k in keys], dtype=torch.float64)
        if name in ("count", "max", "second"):
            assert torch.equal(got, want), name
        else:
            assert_close(got, want, atol=1e-12, rtol=1e-12, what=name)


@pytest.mark.parametrize("estimator", ["grpo", "grpo_passk"])
def test_group_advantages_eps_and_zero_singletons_on_every_backend(cpu_backend, estimator):
    """``eps`` and ``singleton="zero"`` reach every kernel family (the C++ kernels and the plain-torch path of
    ``backend="triton"`` on CPU tensors): float64 reference, groups of one and a NaN score included."""
    scores = torch.tensor([0.5, 1.5, -1.0, 2.0, 0.0, 3.0, float("nan"), 1.0, 4.0], dtype=torch.float64)
    index = torch.tensor([7, 7, 7, 3, 3, 9, 5, 5, 11])
    for singleton in ("zero", "raw"):
        got = fa.group_advantages(scores, index, estimator=estimator, eps=0.5, singleton=singleton,
                                  backend=cpu_backend)
        want = ref_adv.group_advantages(scores, index, estimator=estimator, eps=0.5, singleton=singleton)
        assert_close(got, want, atol=1e-12, rtol=1e-12, what=f"{estimator} singleton={singleton}")


# ---------------------------------------------------------------- argument checks
def test_token_stats_op_refuses_labels_with_more_elements_than_rows():
    """The token-statistics op reads one int64 label per row by pointer: labels with extra elements are a
    ValueError naming ``labels``, not a silent read of the first ones."""
    logits = torch.randn(1, 4, 7)
    args = (logits, torch.tensor([1, 2, 3, 4, 5]), 1.0, -100, False, False, False, "cpp", False)
    with pytest.raises(ValueError, match="labels must have 4 elements"):
        torch.ops.fastalign.token_stats(*args)


def test_ignore_index_must_fit_int64_at_both_ends():
    """``ignore_index`` is an int64 label value: 2**63 and -2**63 - 1 are a ValueError naming it; the int64
    extremes themselves are accepted (no label equals them, so every token counts)."""
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    for bad in (2 ** 63, -2 ** 63 - 1):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            fa.token_logprobs(logits, labels, ignore_index=bad)
    want = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None])[:, 0]
    for ok in (2 ** 63 - 1, -2 ** 63):
        out = fa.token_logprobs(logits, labels, ignore_index=ok)
        lp = out.logprobs if hasattr(out, "logprobs") else out
        assert_close(lp, want, atol=1e-6, what=f"ignore_index={ok}")


def test_a_global_count_tensor_must_hold_one_value():
    """A global count given as a tensor holds one value: an empty tensor is a ValueError naming it."""
    g = torch.Generator().manual_seed(8)
    lp = -torch.rand(2, 3, generator=g)
    old, A, m = lp + 0.1, torch.randn(2, 3, generator=g), torch.ones(2, 3, dtype=torch.bool)
    for name, agg in (("global_tokens", "token-mean"), ("global_seqs", "seq-mean-token-mean")):
        for bad in (torch.empty(0), torch.ones(2)):
            with pytest.raises(ValueError, match=f"{name} must be a number or a one-element tensor"):
                fa.policy_loss(lp, old, A, m, agg=agg, **{name: bad})


def test_position_ids_whose_starts_disagree_with_num_sequences_raise():
    """Packed ``position_ids`` start a sequence at each position 0: two starts with ``num_sequences=3`` is a
    ValueError naming both, read on the host for an eager CPU tensor (not sums over a made-up sequence)."""
    lp = torch.randn(6)
    with pytest.raises(ValueError, match="num_sequences=3 but position_ids describes 2 sequences"):
        fa.sequence_logprobs(lp, position_ids=torch.tensor([0, 1, 2, 0, 1, 2]), num_sequences=3)
    out = fa.sequence_logprobs(lp, position_ids=torch.tensor([0, 1, 2, 0, 1, 2]), num_sequences=2)
    assert_close(out.sum, torch.stack((lp[:3].sum(), lp[3:].sum())), atol=1e-6, what="sums")


def test_zero_dim_logits_and_hidden_states_raise_naming_them():
    """Logits and hidden states need at least one dimension: a 0-dim tensor is a ValueError naming the
    argument, not an IndexError from inside the function."""
    with pytest.raises(ValueError, match="logits must have at least 1 dimension"):
        fa.token_logprobs(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="hidden must have at least 1 dimension"):
        fa.linear_logprobs(torch.tensor(1.0), torch.randn(5, 4), torch.tensor(1))


def test_weight_sequences_given_as_bytes_raise():
    """Per-function weights are a sequence of numbers: bytes (which iterate as small ints) are a TypeError
    naming the argument, not weights 1, 2, ..."""
    scores = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match="reward_weights must be a sequence of numbers"):
        fa.group_advantages(scores, index, estimator="gdpo", reward_weights=b"\x01\x02")
    with pytest.raises(TypeError, match="reward_weights must be a sequence of numbers"):
        fa.group_advantages(scores, index, estimator="gdpo", reward_weights="12")
