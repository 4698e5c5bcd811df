"""Edge cases of the C++ CPU kernels (fastalign._C), against float64 formulas, the float64 reference and the
trainers' own code: vocabulary rows of every vector-tail length, ties of the row maximum, group sizes past the
small-count reciprocal table, tied best scores and zero-length groups in the group statistics, fractional
masks in GAE and the reward-to-go through masked tokens. The policy-loss kernels' edges (rows longer than one
token chunk among them) are in test_policy_kernel_edges.py."""
import pytest
import torch

import fastalign
from fastalign import reference
from fastalign.reference import advantages as RA
from helpers import assert_close

CPP = "cpp"


# ---------------------------------------------------------------- token statistics
@pytest.mark.parametrize("V", [1, 7, 17, 33, 65])
def test_token_stats_every_tail_length_matches_reference(V):
    """Rows whose length is not a multiple of any SIMD width (1, 7, 17, 33, 65): log-prob, entropy, sum p^2,
    argmax and d logits at T = 0.7 against the float64 reference, with an ignored row and a masked (-inf)
    vocabulary entry in the last position, where the vector loop's tail handles it."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(2, 3, V, generator=g) * 2.0
    if V > 1:
        logits[0, 1, V - 1] = -float("inf")
    labels = torch.randint(0, max(V - 1, 1), (2, 3), generator=g)
    labels[1, 2] = -100
    w = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    st = fastalign.token_logprobs(x, labels, entropy=True, sum_p2=True, argmax=True, temperature=0.7, backend=CPP)
    (st.logprobs * w[0] + st.entropy * w[1] + st.sum_p2 * w[2]).sum().backward()
    xr = logits.double().requires_grad_(True)
    ref = reference.token_logprobs(xr, labels, temperature=0.7, dtype=torch.float64)
    (ref[0] * w[0] + ref[1] * w[1] + ref[2] * w[2]).sum().backward()
    assert_close(st.logprobs, ref[0], atol=2e-5, rtol=2e-5, what="logprobs")
    assert_close(st.entropy, ref[1], atol=2e-5, rtol=2e-5, what="entropy")
    assert_close(st.sum_p2, ref[2], atol=2e-5, rtol=2e-5, what="sum_p2")
    assert torch.equal(st.argmax, ref[3])
    assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5, what="d logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_argmax_ties_pick_the_first_index(dtype):
    """A row whose maximum occurs more than once reports the first index, as ``torch.argmax`` (the greedy
    token of eager code); in bf16 such ties are common. Ignored rows still report their argmax."""
    V = 37
    logits = torch.zeros(1, 4, V)
    for r, (i, j) in enumerate([(3, 30), (0, V - 1), (5, 6), (20, 21)]):
        logits[0, r, i] = logits[0, r, j] = 4.0
    logits[0, 2, 7] = 4.0  # three-way tie
    logits = logits.to(dtype)
    labels = torch.tensor([[1, 2, -100, 4]])
    st = fastalign.token_logprobs(logits, labels, argmax=True, backend=CPP)
    assert st.argmax.tolist() == [[3, 0, 5, 20]]
    assert torch.equal(st.argmax, logits.double().argmax(-1))


# ---------------------------------------------------------------- group advantages
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_of_groups_larger_than_256(keyed, estimator):
    """Groups of 300 and 257 responses (past the table of 1 / n kept for small counts): mean, unbiased std and
    rloo's n / (n - 1) come from the group's own count, as the float64 reference, for fixed-size blocks and for
    keyed groups."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(600, generator=g, dtype=torch.float64)
    if keyed:
        index = torch.cat([torch.zeros(300, dtype=torch.int64), torch.ones(257, dtype=torch.int64),
                           torch.full((43,), 2, dtype=torch.int64)])
        index = index[torch.randperm(600, generator=g)]
        got = fastalign.group_advantages(scores, index, estimator=estimator)
        want = RA.group_advantages(scores, index, estimator=estimator)
    else:
        got = fastalign.group_advantages(scores, group_size=300, estimator=estimator)
        want = RA.group_advantages(scores, group_size=300, estimator=estimator)
    assert_close(got, want, atol=1e-10, rtol=1e-10, what=estimator)


@pytest.mark.parametrize("std", ["group", "none"])
def test_grpo_passk_tied_best_scores_get_no_gap(std):
    """grpo_passk gives the best response ``max - second``; when the best score is shared the second is that
    same score, so every tied best response gets 0 (a group with one best gets the gap), as the reference."""
    scores = torch.tensor([1.0, 0.5, 1.0, 0.0, 2.0, 0.5, 1.5, 0.0, 0.3, 0.3, 0.3, 0.1], dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    got = fastalign.group_advantages(scores, index, estimator="grpo_passk", std=std)
    want = RA.group_advantages(scores, index, estimator="grpo_passk", std=std)
    assert_close(got, want, atol=1e-12, what="grpo_passk")
    assert got[[0, 2, 8, 9, 10]].abs().max() == 0
    assert got[4] > 0


def test_opo_group_of_empty_responses_uses_the_plain_mean():
    """opo's baseline is ``sum L r / sum L``; a group whose responses are all empty (sum L = 0) falls back to the
    plain mean, as the reference, instead of 0 / 0 = NaN."""
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    lengths = torch.tensor([0.0, 0.0, 0.0, 4.0, 1.0, 2.0], dtype=torch.float64)
    got = fastalign.group_advantages(scores, index, estimator="opo", lengths=lengths)
    want = RA.group_advantages(scores, index, estimator="opo", lengths=lengths)
    assert not torch.isnan(got).any()
    assert_close(got, want, atol=1e-12, what="opo")


# ---------------------------------------------------------------- token-level scans
def test_gae_with_a_fractional_mask_matches_verl():
    """With a fractional response mask, GAE blends the state carried past a token with the token's own:
    ``V_next = V_t m_t + (1 - m_t) V_next`` and ``A_next = A_t m_t + (1 - m_t) A_next``, as verl's
    ``compute_gae_advantage_return``; the returns are verl's ``A + V`` times the mask."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(5)
    B, T = 3, 9
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g, dtype=torch.float64)
    m[0, 4] = 0.0
    m[1, :2] = 1.0
    _, want_ret = core_algos.compute_gae_advantage_return(token_level_rewards=r.clone(), values=v, response_mask=m,
                                                          gamma=0.9, lam=0.8)
    a, ret = fastalign.gae_advantages(r, v, m, gamma=0.9, lam=0.8, whiten=False, backend=CPP)
    assert_close(ret, want_ret * m, atol=1e-10, rtol=1e-10, what="returns")
    assert_close(a, (want_ret - v) * m, atol=1e-10, rtol=1e-10, what="advantages")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reward_to_go_decays_through_masked_tokens(dtype):
    """``reset_at_masked=False``: ``G_t = sum_{s>=t} gamma^{s-t} r_s m_s``, so a masked token in the middle still
    costs one factor of gamma (OpenRLHF's cumulative returns), checked against that sum in float64."""
    g = torch.Generator().manual_seed(8)
    B, T, gamma = 3, 11, 0.8
    r = torch.randn(B, T, generator=g).to(dtype)
    m = torch.ones(B, T, dtype=dtype)
    m[0, 3:6] = 0
    m[1, 1] = 0
    m[2, 8:] = 0
    got = fastalign.reinforce_pp_advantages(r, m, gamma=gamma, whiten=False, reset_at_masked=False, backend=CPP)
    rd, md = r.double(), m.double()
    want = torch.zeros(B, T, dtype=torch.float64)
    for t in range(T):
        w = gamma ** torch.arange(T - t, dtype=torch.float64)
        want[:, t] = (rd[:, t:] * md[:, t:] * w).sum(-1) * md[:, t]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(got, want, atol=tol, rtol=tol, what="reward-to-go")
