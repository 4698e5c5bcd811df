"""OpenRLHF adapters (fastalign.integrations.openrlhf) against OpenRLHF 0.11.2's own classes.

OpenRLHF's package ``__init__`` imports DeepSpeed, vLLM, Ray and its trainers, none of which a
CPU test environment has. Its loss module needs only torch and ``openrlhf/models/utils.py``
(which imports ``deepspeed`` at the top but uses it in one ZeRO-3 helper only). So the test loads
the two installed files themselves, ``openrlhf/models/utils.py`` and ``openrlhf/models/loss.py``,
under empty stand-ins for their parent packages and for ``deepspeed`` (tests/openrlhf_source.py); the
classes compared against are OpenRLHF's own code, unmodified.

Compared: loss, d(loss)/d(log_probs) (d(loss)/d(policy log-probs) for DPO) and every returned
value, OpenRLHF in float64, fastalign in float32.
"""
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import openrlhf_source
from helpers import assert_close, policy_batch

import fastalign
from fastalign.integrations import openrlhf as fo


@pytest.fixture(scope="module")
def orl_models():
    return openrlhf_source.models()


@pytest.fixture(scope="module")
def orl(orl_models):
    return orl_models["loss"]


@pytest.fixture(scope="module")
def orl_loss_utils():
    """OpenRLHF's ``openrlhf/utils/loss_utils.py`` (the trainer's loss normalisers; it imports only torch)."""
    return openrlhf_source.module("utils", "loss_utils.py")


def _batch(seed, B=6, T=9, with_rollout=False):
    g = torch.Generator().manual_seed(seed)
    lp, old, A, m = policy_batch(g, B, T)
    roll = (old + torch.randn(B, T, generator=g) * 0.6).clamp(max=-1e-3)
    return lp, old, A, m, roll


POLICY_CASES = {
    "ppo": dict(),
    "ppo_asymmetric": dict(clip_eps_low=0.1, clip_eps_high=0.28),
    "ppo_dual_clip": dict(dual_clip=1.5),
    "ppo_sample_level": dict(token_level_loss=False, clip_eps_high=0.3),
    "ppo_dual_clip_sample_level": dict(token_level_loss=False, dual_clip=2.0),
    "gspo": dict(policy_loss_type="gspo", clip_eps_low=0.02, clip_eps_high=0.03),
    "gspo_token_flag_ignored": dict(policy_loss_type="gspo", token_level_loss=True, clip_eps_low=0.05,
                                    clip_eps_high=0.05),
    "gspo_vs_rollout": dict(policy_loss_type="gspo", is_correction_level="token", clip_eps_low=0.05,
                            clip_eps_high=0.05),
    "tis_mask": dict(is_correction_level="token", is_correction_threshold=(0.8, 1.25)),
    "tis_clip": dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.8, 1.25)),
    "tis_mask_dual_clip_sample_level": dict(is_correction_level="token", dual_clip=3.0, token_level_loss=False,
                                            is_correction_threshold=(0.5, 1.5)),
}


def _run_policy(cls, kw, lp, old, A, m, roll, dtype, glob):
    x = lp.to(dtype).clone().requires_grad_(True)
    out = cls(**kw)(x, old.to(dtype), A.to(dtype), m.to(dtype) if dtype == torch.float64 else m,
                    rollout_log_probs=roll.to(dtype), **glob)
    out[0].backward()
    return out, x.grad


def _compare_policy(orl, kw, lp, old, A, m, roll, dp, what):
    """OpenRLHF's PolicyLoss (float64) against the adapter (float32): loss, d log_probs and the returned
    metrics; ``dp``: with the global token and sequence counts of two ranks."""
    glob = {}
    if dp:
        n_tok, n_seq = float(m.sum()), float((m.sum(-1) > 0).sum())
        glob = dict(dp_size=2, batch_num_tokens=torch.tensor(2 * n_tok + 3),
                    global_batch_size=torch.tensor(2 * n_seq + 1))
    (vl, *vm), vg = _run_policy(orl.PolicyLoss, kw, lp, old, A, m, roll, torch.float64, glob)
    (fl, *fm), fg = _run_policy(fo.PolicyLoss, kw, lp, old, A, m, roll, torch.float32, glob)
    assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{what} loss")
    assert_close(fg, vg, atol=1e-6, rtol=1e-5, what=f"{what} d log_probs")
    for name, f, v in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), fm, vm):
        assert (f is None) == (v is None), (name, f, v)
        if v is not None:
            assert_close(f, v, atol=1e-6, rtol=1e-5, what=f"{what} {name}")


@pytest.mark.parametrize("dp", [False, True], ids=["local", "dp2"])
@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_policy_loss_matches_openrlhf(orl, case, dp):
    lp, old, A, m, roll = _batch(sorted(POLICY_CASES).index(case))
    _compare_policy(orl, POLICY_CASES[case], lp, old, A, m, roll, dp, case)


def test_policy_loss_clipping_and_filters_are_exercised(orl):
    lp, old, A, m, roll = _batch(3)
    old = lp - 0.5  # ratio 1.65: clipped where A > 0, past the dual clip (1.5) where A < 0
    for kw in (POLICY_CASES["ppo_dual_clip"], POLICY_CASES["tis_mask"], POLICY_CASES["tis_clip"]):
        (vl, clip, _, _, filt), _ = _run_policy(orl.PolicyLoss, kw, lp, old, A, m, roll, torch.float64, {})
        (fl, fclip, _, _, ffilt), _ = _run_policy(fo.PolicyLoss, kw, lp, old, A, m, roll, torch.float32, {})
        assert clip > 0 and (filt is None or 0 < filt < 1), (kw, clip, filt)
        assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{kw} loss")
        assert_close(fclip, clip, atol=1e-6, what=f"{kw} clip_ratio")
        if filt is not None:
            assert_close(ffilt, filt, atol=1e-6, what=f"{kw} is_filter_ratio")


def test_policy_loss_without_mask_is_the_plain_mean(orl):
    lp, old, A, _, _ = _batch(5)
    v = orl.PolicyLoss()(lp.double(), old.double(), A.double())
    f = fo.PolicyLoss()(lp, old, A)
    for a, b in zip(f[:3], v[:3]):
        assert_close(a, b, atol=1e-6, rtol=1e-5, what="no action_mask")
    assert f[3] is None and f[4] is None


@pytest.mark.parametrize("kw, match", [
    (dict(is_correction_level="seq", is_correction_mode="clip"), "is_correction_mode"),
    (dict(is_correction_level="token", is_correction_gating="tv", is_correction_mode="clip",
          is_correction_threshold=(0.0, 0.1)), "is_correction_mode"),
    (dict(is_correction_level="token", is_correction_gating="binary_kl"), "is_correction_gating"),
    (dict(is_correction_level="tokens"), "is_correction_level"),
    (dict(policy_loss_type="reinforce"), "policy_loss_type"),
    (dict(dual_clip=0.5), "dual_clip"),
])
def test_policy_loss_options_openrlhf_refuses_raise(orl, kw, match):
    """What OpenRLHF refuses (its asserts and ValueErrors, in the constructor or the first call) raises a
    ValueError here when the loss is built."""
    lp, old, A, m, roll = _batch(2)
    with pytest.raises((ValueError, AssertionError)):
        _run_policy(orl.PolicyLoss, kw, lp, old, A, m, roll, torch.float64, {})
    with pytest.raises(ValueError, match=match):
        fo.PolicyLoss(**kw)


GATES = [("token", "ratio", "mask", (0.8, 1.25)), ("token", "ratio", "clip", (0.8, 1.25)),
         ("seq", "ratio", "mask", (0.8, 1.25)), ("token", "binary_kl", "mask", (0.0, 0.02)),
         ("token", "tv", "mask", (0.0, 0.05)), ("seq", "binary_kl", "mask", (0.0, 0.02)),
         ("seq", "tv", "mask", (0.0, 0.05))]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(loss_type=st.sampled_from(["ppo", "gspo"]), eps=st.sampled_from([(0.2, 0.2), (0.1, 0.28), (0.02, 0.03)]),
       dual_clip=st.sampled_from([None, 1.5, 3.0]), token_level=st.booleans(),
       gate=st.sampled_from([None] + GATES), far=st.sampled_from([None, 0.5, -0.5]), dp=st.booleans(),
       seed=st.integers(0, 99))
def test_policy_loss_option_combinations_match_openrlhf(orl, loss_type, eps, dual_clip, token_level, gate, far, dp,
                                                        seed):
    """Random combinations of every constructor option (the train/rollout gates at token and sequence level,
    on the ratio, the binary KL and the total variation; dual clip with ppo and gspo), with ratios near 1
    or far from it, locally and with global counts."""
    kw = dict(clip_eps_low=eps[0], clip_eps_high=eps[1], dual_clip=dual_clip, token_level_loss=token_level,
              policy_loss_type=loss_type)
    if gate is not None:
        kw.update(is_correction_level=gate[0], is_correction_gating=gate[1], is_correction_mode=gate[2],
                  is_correction_threshold=gate[3])
    lp, old, A, m, roll = _batch(seed)
    if far is not None:
        old = lp - far  # every ratio at exp(far): clipped, past the dual clip where A < 0
    _compare_policy(orl, kw, lp, old, A, m, roll, dp, kw)


@pytest.mark.parametrize("gate", [("token", "ratio", "mask", (1.0, 2.0)), ("token", "ratio", "mask", (0.5, 1.0)),
                                  ("token", "ratio", "clip", (1.0, 2.0)), ("seq", "ratio", "mask", (1.0, 2.0)),
                                  ("token", "tv", "mask", (0.0, 0.05)), ("token", "binary_kl", "mask", (0.0, 0.02))],
                         ids=["ratio-low", "ratio-high", "ratio-clip-low", "seq-low", "tv-zero", "binary-kl-zero"])
def test_correction_statistic_on_a_bound_is_kept_as_openrlhf(orl, gate):
    """A statistic exactly on a bound of is_correction_threshold is inside the band (OpenRLHF keeps
    ``low <= stat <= high`` and filters only past it): rollout log-probs equal to the old policy's on half
    the rows give a ratio of exactly 1 and a divergence of exactly 0."""
    lp, old, A, m, roll = _batch(41)
    roll = torch.where(torch.arange(roll.shape[0])[:, None] % 2 == 0, old, roll)
    kw = dict(is_correction_level=gate[0], is_correction_gating=gate[1], is_correction_mode=gate[2],
              is_correction_threshold=gate[3])
    (_, *_, filt), _ = _run_policy(orl.PolicyLoss, kw, lp, old, A, m, roll, torch.float64, {})
    assert 0 < filt < 1  # rows on the bound kept, others filtered
    _compare_policy(orl, kw, lp, old, A, m, roll, False, kw)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("count", [0.75, 0.5, 0.25, 2.5])
@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
def test_fractional_counts_match_openrlhf(orl, token_level, count, as_tensor):
    """OpenRLHF's trainer passes ``batch_num_tokens`` / ``global_batch_size`` divided by the accumulation steps, so
    below 1 in ordinary runs; OpenRLHF divides by them as given, where the adapter clamped them to 1."""
    lp, old, A, m, roll = _batch(31)
    c = torch.tensor(count) if as_tensor else count
    for dp in (1, 2):
        glob = dict(dp_size=dp, **{"batch_num_tokens" if token_level else "global_batch_size": c})
        for kw in (dict(token_level_loss=token_level),
                   dict(token_level_loss=token_level, is_correction_level="token", is_correction_threshold=(0.5, 2.0))):
            (vl, *_), vg = _run_policy(orl.PolicyLoss, kw, lp, old, A, m, roll, torch.float64, glob)
            (fl, *_), fg = _run_policy(fo.PolicyLoss, kw, lp, old, A, m, roll, torch.float32, glob)
            assert_close(fl, vl, atol=1e-5, rtol=1e-5, what=f"{kw} {glob} loss")
            assert_close(fg, vg, atol=1e-6, rtol=1e-5, what=f"{kw} {glob} d log_probs")


@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
def test_trainer_counts_below_one_match_openrlhf(orl, orl_loss_utils, token_level):
    """A window of 3 micro-batches of one sequence (one empty) with 4 accumulation steps: OpenRLHF's own normaliser
    gives ``global_batch_size`` 0.5, and the loss of each micro-batch is OpenRLHF's."""
    g = torch.Generator().manual_seed(32)
    masks = [torch.ones(1, 6, dtype=torch.bool) for _ in range(3)]
    masks[1][0, 4:] = False
    masks[2][:] = False
    info = orl_loss_utils._optimizer_step_loss_norm(masks, None, 1, 4)
    assert float(info["global_batch_size"]) == 0.5 and float(info["batch_num_tokens"]) == 2.5
    kw = dict(token_level_loss=token_level)
    for mask in masks:
        lp = -torch.rand(1, 6, generator=g) - 0.1
        old, A = lp + 0.3 * torch.randn(1, 6, generator=g), torch.full((1, 6), 0.7)
        (vl, *_), vg = _run_policy(orl.PolicyLoss, kw, lp, old, A, mask, old, torch.float64, info)
        (fl, *_), fg = _run_policy(fo.PolicyLoss, kw, lp, old, A, mask, old, torch.float32, info)
        assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{kw} loss")
        assert_close(fg, vg, atol=1e-6, rtol=1e-5, what=f"{kw} d log_probs")


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("value", ["no", 1, [0], 0, None])
def test_token_level_loss_must_be_a_bool(loss_type, value):
    """A truthy non-bool was replaced by True (so ``"no"`` gave token-level aggregation), a falsy one refused."""
    with pytest.raises(TypeError, match="token_level_loss"):
        fo.PolicyLoss(token_level_loss=value, policy_loss_type=loss_type)
    loss_fn = fo.PolicyLoss(policy_loss_type=loss_type)
    with pytest.raises(TypeError, match="token_level_loss"):
        loss_fn.token_level_loss = value


def test_policy_loss_needs_rollout_log_probs_for_correction():
    lp, old, A, m, _ = _batch(1)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        fo.PolicyLoss(is_correction_level="token")(lp, old, A, m)


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("shape", [(2, 3), (3,)])
def test_policy_loss_missing_old_log_probs_is_named_as_openrlhf_names_it(loss_type, shape):
    """``old_log_probs=None`` was refused by fastalign's loss under its own name, ``old_logprobs``."""
    lp = torch.full(shape, -1.0)
    with pytest.raises(TypeError, match="^old_log_probs must be a torch.Tensor"):
        fo.PolicyLoss(policy_loss_type=loss_type)(lp, None, torch.ones(shape), torch.ones(shape))


DPO_CASES = {
    "dpo": dict(beta=0.1),
    "dpo_beta_0.5": dict(beta=0.5),
    "cdpo_label_smoothing": dict(beta=0.2, label_smoothing=0.15),
    "cdpo_label_smoothing_half": dict(beta=0.2, label_smoothing=0.5),  # OpenRLHF computes it
    "ipo": dict(beta=0.1, ipo=True),
    "ipo_beta_1": dict(beta=1.0, ipo=True),
}


def _dpo_inputs(seed, B=8):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(B, generator=g) * 40, -torch.rand(B, generator=g) * 40
    rc, rr = pc + torch.randn(B, generator=g) * 3, pr + torch.randn(B, generator=g) * 3
    return pc, pr, rc, rr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo_loss_matches_openrlhf(orl, case, dtype):
    kw = DPO_CASES[case]
    pc, pr, rc, rr = (t.to(dtype) for t in _dpo_inputs(sorted(DPO_CASES).index(case)))
    out = []
    for cls, dt in ((orl.DPOLoss, torch.float64), (fo.DPOLoss, dtype)):
        c, r = pc.to(dt).requires_grad_(True), pr.to(dt).requires_grad_(True)
        loss, cr, rjr = cls(**kw)(c, r, rc.to(dt), rr.to(dt))
        loss.backward()
        out.append((loss, cr, rjr, c.grad, r.grad))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, f, v in zip(("loss", "chosen_rewards", "rejected_rewards", "d chosen", "d rejected"), *out[::-1]):
        assert_close(f, v, **tol, what=f"{case} {name}")


@pytest.mark.parametrize("missing", [(2,), (3,), (2, 3), (0,)],
                         ids=["ref_chosen", "ref_rejected", "both_refs", "policy"])
def test_dpo_none_log_probs_raise_as_openrlhf(orl, missing):
    """OpenRLHF's DPOLoss needs all four tensors (a None is a TypeError there); the adapter ran reference-free and
    then failed with an AttributeError, or named fastalign.preference_loss's arguments."""
    names = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    x = [None if i in missing else t for i, t in enumerate(_dpo_inputs(4))]
    with pytest.raises(TypeError):
        orl.DPOLoss(beta=0.1)(*x)
    with pytest.raises(TypeError, match=f"{names[missing[0]]} must be a torch.Tensor"):
        fo.DPOLoss(beta=0.1)(*x)


def test_dpo_empty_batch_gives_zero(orl):
    """The documented difference: an empty batch gives 0 where OpenRLHF's mean of nothing is NaN."""
    e = torch.zeros(0)
    assert torch.isnan(orl.DPOLoss(beta=0.1)(e, e, e, e)[0])
    loss, chosen, rejected = fo.DPOLoss(beta=0.1)(e, e, e, e)
    assert float(loss) == 0.0 and chosen.shape == rejected.shape == (0,)


def test_dpo_label_smoothing_with_ipo_raises():
    with pytest.raises(ValueError, match="label_smoothing"):
        fo.DPOLoss(beta=0.1, label_smoothing=0.1, ipo=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_dpo_loss_output_dtypes_match_openrlhf(orl, dtype):
    """OpenRLHF's DPOLoss returns loss and rewards in the inputs' dtype (bf16 in, bf16 out)."""
    x = [t.to(dtype) for t in _dpo_inputs(11)]
    for kw in (dict(beta=0.1), dict(beta=0.1, label_smoothing=0.5), dict(beta=0.1, ipo=True)):
        want = [t.dtype for t in orl.DPOLoss(**kw)(*x)]
        got = [t.dtype for t in fo.DPOLoss(**kw)(*x)]
        assert got == want, (kw, got, want)


@pytest.mark.parametrize("case", ["ppo", "ppo_dual_clip", "gspo", "gspo_vs_rollout"])
def test_diverged_policy_matches_openrlhf(orl, case):
    """Log-ratios of +-25: OpenRLHF's ppo clamps the log-ratio to [-20, 20] (no gradient there), its gspo
    sequence ratio has no clamp; the adapter follows both (``log_ratio_cap`` 20, and inf for gspo)."""
    lp, old, A, m, roll = _batch(11)
    A = A.clone()
    A[0], A[3] = -A[0].abs(), -A[3].abs()  # the unclipped branch, -A rho, on the diverged rows
    old = old.clone()
    old[0] -= 25.0
    old[3, :5] += 25.0
    roll = roll.clone()
    roll[0] -= 25.0
    _compare_policy(orl, POLICY_CASES[case], lp, old, A, m, roll, False, case)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gspo_overflowing_token_ratio_matches_openrlhf(orl, cpu_backend, sign):
    """gspo has no cap on its sequence ratio: a token log-ratio of 94 (exp overflows fp32) beside -94 gave the C++
    kernel a NaN gradient (0 * inf) where OpenRLHF and the Triton kernel give a finite one; a whole row at mean
    log-ratio 100 (A < 0: the unclipped branch) gave NaN where they give inf."""
    lp = -torch.rand(2, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    old = lp.clone()
    old[0] -= torch.tensor([94.0, -94.0, -0.1])
    old[1] -= 100.0
    A = torch.tensor([[0.5], [sign]]).expand(2, 3).contiguous()
    m = torch.ones(2, 3, dtype=torch.bool)
    kw = dict(policy_loss_type="gspo")
    (want, *_), want_grad = _run_policy(orl.PolicyLoss, kw, lp, old, A, m, old, torch.float32, {})
    with fastalign.use_backend(cpu_backend):
        (got, *_), grad = _run_policy(fo.PolicyLoss, kw, lp, old, A, m, old, torch.float32, {})
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # inf equals inf
    assert torch.equal(torch.isnan(grad), torch.isnan(want_grad)) and torch.equal(torch.isinf(grad),
                                                                                  torch.isinf(want_grad))
    finite = torch.isfinite(want_grad)
    assert_close(grad[finite], want_grad[finite], atol=1e-6, rtol=1e-5, what="finite d log_probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_policy_loss_broadcasts_advantages_and_keeps_dtypes_as_openrlhf(orl, dtype):
    """OpenRLHF broadcasts the advantages against log_probs ([B, 1] per sequence; [T] per position) and returns
    the loss and KLs in the inputs' dtype; the adapter refused [B, 1] and float64, read [T] per sequence when
    B == T, and returned fp32."""
    lp, old, _, m, roll = _batch(13, B=5, T=5)
    g = torch.Generator().manual_seed(1)
    kw = dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0))
    for A in (torch.randn(5, 1, generator=g), torch.randn(5, generator=g)):
        x = [t.to(dtype) for t in (lp, old, A, roll)]
        want = orl.PolicyLoss(**kw)(x[0], x[1], x[2], m, rollout_log_probs=x[3])
        got = fo.PolicyLoss(**kw)(x[0], x[1], x[2], m, rollout_log_probs=x[3])
        assert [t.dtype for t in got] == [t.dtype for t in want], (A.shape, dtype)
        if dtype != torch.bfloat16:  # OpenRLHF computes in bf16 there, the adapter in fp32
            for name, f, v in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), got, want):
                assert_close(f, v, atol=1e-6, rtol=1e-5, what=f"{name} {tuple(A.shape)}")
    with pytest.raises(ValueError, match="advantages of shape"):
        fo.PolicyLoss()(lp, old, torch.randn(3), m)


def test_dpo_rewards_are_detached(orl):
    """The rewards kept a graph to reference log-probs that required grad (OpenRLHF detaches them)."""
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in _dpo_inputs(3))
    _, chosen, rejected = fo.DPOLoss(beta=0.1)(pc, pr, rc, rr)
    assert not chosen.requires_grad and not rejected.requires_grad


MUTATIONS = [("clip_eps_low", 0.05), ("clip_eps_high", 0.4), ("dual_clip", 1.5), ("token_level_loss", False),
             ("is_correction_threshold", (0.9, 1.1)), ("is_correction_mode", "clip")]


@pytest.mark.parametrize("name,value", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_option_assignment_takes_effect_as_openrlhf(orl, name, value):
    """OpenRLHF reads its options at each call, so assigning one between steps changes the loss; the adapter
    built its configuration once and kept the old value (or mixed old and new)."""
    lp, old, A, m, roll = _batch(21)
    kw = dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0))
    theirs, ours = orl.PolicyLoss(**kw), fo.PolicyLoss(**kw)
    setattr(theirs, name, value)
    setattr(ours, name, value)
    fresh = fo.PolicyLoss(**{**kw, name: value})
    args = (lp.double(), old.double(), A.double(), m)
    want = theirs(*args, rollout_log_probs=roll.double())
    for module in (ours, fresh):
        got = module(lp, old, A, m, rollout_log_probs=roll)
        for what, f, v in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), got, want):
            assert_close(f, v, atol=1e-6, rtol=1e-5, what=f"{name} {what}")


def test_invalid_option_assignment_raises_and_keeps_the_module():
    lp, old, A, m, _ = _batch(22)
    loss_fn = fo.PolicyLoss(clip_eps_high=0.28)
    before = loss_fn(lp, old, A, m)[0]
    for name, value, err in (("dual_clip", 0.5, ValueError), ("is_correction_threshold", (0.5, 1.0, 2.0), ValueError),
                             ("clip_eps_low", float("nan"), ValueError), ("policy_loss_type", "grpo", ValueError),
                             ("token_level_loss", "yes", TypeError)):
        with pytest.raises(err, match=name):
            setattr(loss_fn, name, value)
    assert loss_fn.dual_clip is None and loss_fn.is_correction_threshold == (0.5, 5.0)
    assert torch.equal(loss_fn(lp, old, A, m)[0], before)


DPO_MUTATIONS = [dict(beta=0.5), dict(label_smoothing=0.3), dict(ipo=True), dict(beta=0.2, ipo=True)]


@pytest.mark.parametrize("assigned", DPO_MUTATIONS, ids=["-".join(a) for a in DPO_MUTATIONS])
def test_dpo_option_assignment_takes_effect_as_openrlhf(orl, assigned):
    """OpenRLHF's DPOLoss reads beta, label_smoothing and ipo at each call; so does the adapter."""
    pc, pr, rc, rr = _dpo_inputs(26)
    theirs, ours = orl.DPOLoss(beta=0.1), fo.DPOLoss(beta=0.1)
    for module in (theirs, ours):
        for name, value in assigned.items():
            setattr(module, name, value)
    want = theirs(pc.double(), pr.double(), rc.double(), rr.double())
    for what, f, v in zip(("loss", "chosen_rewards", "rejected_rewards"), ours(pc, pr, rc, rr), want):
        assert_close(f, v, atol=1e-5, rtol=1e-5, what=f"{assigned} {what}")


def test_dpo_invalid_option_assignment_raises_and_keeps_the_module(orl):
    """An option's own value is checked at its assignment: a negative beta or a NaN label_smoothing raised only at
    the next call. How the options combine is checked at the next call: ipo=True set after label_smoothing=0.2
    gave IPO with the smoothing silently dropped; it raises there, naming both, until the combination is valid."""
    x = _dpo_inputs(27)
    loss_fn = fo.DPOLoss(beta=0.1, label_smoothing=0.2)
    before = loss_fn(*x)[0]
    for name, value, err in (("beta", -1.0, ValueError), ("label_smoothing", float("nan"), ValueError),
                             ("label_smoothing", 1.5, ValueError), ("ipo", "yes", TypeError),
                             ("beta", None, TypeError)):
        with pytest.raises(err, match=name):
            setattr(loss_fn, name, value)
    assert (loss_fn.beta, loss_fn.label_smoothing, loss_fn.ipo) == (0.1, 0.2, False)
    assert torch.equal(loss_fn(*x)[0], before)
    loss_fn.ipo = True
    with pytest.raises(ValueError, match="label_smoothing does not apply with ipo=True"):
        loss_fn(*x)
    loss_fn.label_smoothing = 0.0  # the combination is valid again: IPO, as OpenRLHF's after the same assignments
    theirs = orl.DPOLoss(beta=0.1, label_smoothing=0.2)
    theirs.ipo, theirs.label_smoothing = True, 0.0
    assert_close(loss_fn(*x)[0], theirs(*(t.double() for t in x))[0], atol=1e-5, rtol=1e-5, what="ipo")


DTYPE_CASES = {
    "sample_level": (dict(token_level_loss=False), {}),
    "gspo": (dict(policy_loss_type="gspo"), {}),
    "fp32_rollout": (dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0)), dict(rollout=True)),
    "float_mask": (dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0)),
                   dict(rollout=True, float_mask=True)),
    "int_mask": (dict(), dict(int_mask=True)),
    "float64_mask": (dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0)),
                     dict(rollout=True, float64_mask=True)),
    "float64_mask_sequence_filter": (dict(is_correction_level="seq", is_correction_threshold=(0.5, 2.0)),
                                     dict(rollout=True, float64_mask=True)),
    "fp32_count": (dict(), dict(count=True)),
    "scalar_fp32_advantages": (dict(), dict(scalar_advantages=True)),
    "scalar_fp32_advantages_sample_level": (dict(token_level_loss=False), dict(scalar_advantages=True)),
}


def test_dpo_rewards_take_their_own_pair_s_dtype_as_openrlhf(orl):
    """Each reward is in the dtype of its own pair (policy, reference), as OpenRLHF's arithmetic gives it; both were
    in the dtype of all four inputs."""
    x = _dpo_inputs(12)
    for dtypes in ((torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
                   (torch.bfloat16, torch.float64, torch.bfloat16, torch.float16)):
        args = [t.to(d) for t, d in zip(x, dtypes)]
        want = [t.dtype for t in orl.DPOLoss(beta=0.1)(*args)]
        assert [t.dtype for t in fo.DPOLoss(beta=0.1)(*args)] == want, dtypes


def test_advantages_and_old_log_probs_are_constants():
    """As documented: ``advantages``, ``old_log_probs`` and ``rollout_log_probs`` that require grad get none, and the
    gradient of ``log_probs`` is the one of detached inputs."""
    lp, old, A, m, roll = _batch(25)
    module = fo.PolicyLoss(is_correction_level="token", is_correction_threshold=(0.5, 2.0))
    grads = []
    for attached in (True, False):
        x = lp.clone().requires_grad_(True)
        rest = [t.clone().requires_grad_(attached) for t in (old, A, roll)]
        module(x, rest[0], rest[1], m, rollout_log_probs=rest[2])[0].backward()
        assert all(t.grad is None for t in rest)
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_threshold_list_changed_in_place_takes_effect_as_openrlhf(orl):
    """OpenRLHF reads ``is_correction_threshold`` (a list from its config) at each call: a change of the list's
    entries between two calls changes the loss; the adapter kept the threshold it was built with."""
    lp, old, A, m, roll = _batch(24)
    threshold = [0.5, 5.0]
    theirs, ours = (cls(is_correction_level="token", is_correction_threshold=threshold)
                    for cls in (orl.PolicyLoss, fo.PolicyLoss))
    for low, high in ((0.9, 1.1), (0.5, 5.0)):
        threshold[:] = [low, high]
        want = theirs(lp.double(), old.double(), A.double(), m, rollout_log_probs=roll.double())
        got = ours(lp, old, A, m, rollout_log_probs=roll)
        for what, f, v in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), got, want):
            assert_close(f, v, atol=1e-6, rtol=1e-5, what=f"{threshold} {what}")
    threshold[0] = float("nan")
    with pytest.raises(ValueError, match=r"is_correction_threshold\[0\]"):
        ours(lp, old, A, m, rollout_log_probs=roll)


@pytest.mark.parametrize("case", sorted(DTYPE_CASES))
def test_result_dtypes_follow_openrlhf(orl, case):
    """With bf16 log-probs OpenRLHF's arithmetic returns float32 where an operand is float32 (the sample-level
    mean, a float mask, vLLM's fp32 rollout log-probs, a float32 token count); the adapter returned bf16. A
    float64 mask makes the token shares (clip_ratio, a token-level is_filter_ratio) float64; they were fp32."""
    kw, how = DTYPE_CASES[case]
    lp, old, A, m, roll = _batch(23)
    bf = [t.to(torch.bfloat16) for t in (lp, old, A)]
    mask = (m.float() if how.get("float_mask") else m.long() if how.get("int_mask") else
            m.double() if how.get("float64_mask") else m)
    extra = dict(rollout_log_probs=roll) if how.get("rollout") else {}
    if how.get("count"):
        extra["batch_num_tokens"] = m.sum().float()
    if how.get("scalar_advantages"):  # a 0-dim operand does not promote: the loss stays bf16 in OpenRLHF
        bf[2] = torch.tensor(0.5)
    want = orl.PolicyLoss(**kw)(*bf, mask, **extra)
    got = fo.PolicyLoss(**kw)(*bf, mask, **extra)
    assert [None if t is None else t.dtype for t in got] == [None if t is None else t.dtype for t in want]


def test_errors_name_openrlhf_arguments():
    lp, old, A, m, roll = _batch(24)
    loss_fn = fo.PolicyLoss(is_correction_level="token", is_correction_threshold=(0.5, 2.0))
    for call, err, match in (
            (lambda: loss_fn(lp, old, A, m, rollout_log_probs=roll[:, :3]), ValueError, "rollout_log_probs"),
            (lambda: loss_fn(lp, old[:, :3], A, m, rollout_log_probs=roll), ValueError, "old_log_probs"),
            (lambda: loss_fn(lp, old, A, m[:, :3], rollout_log_probs=roll), ValueError, "action_mask"),
            (lambda: loss_fn(lp.long(), old, A, m, rollout_log_probs=roll), TypeError, "log_probs"),
            (lambda: loss_fn(lp, old, A, m, rollout_log_probs=roll, batch_num_tokens=-3), ValueError,
             "batch_num_tokens"),
            (lambda: fo.PolicyLoss(is_correction_threshold=(0.5, 1.0, 2.0)), ValueError, "is_correction_threshold"),
            (lambda: fo.PolicyLoss(clip_eps_low=float("nan")), ValueError, "clip_eps_low"),
            (lambda: fo.PolicyLoss(clip_eps_low=-0.1), ValueError, "clip_eps_low must be >= 0"),
            (lambda: fo.PolicyLoss(clip_eps_high=-0.2), ValueError, "clip_eps_high must be >= 0"),
            (lambda: setattr(fo.PolicyLoss(), "clip_eps_high", -0.2), ValueError, "clip_eps_high must be >= 0"),
            (lambda: fo.DPOLoss(beta=0.1)(*_dpo_inputs(3)[:1], torch.zeros(2), *_dpo_inputs(3)[2:]), ValueError,
             "policy_rejected_logps"),
            (lambda: fo.DPOLoss(beta=-0.1), ValueError, "beta must be >= 0"),
            (lambda: fo.DPOLoss(beta=0.0, ipo=True), ValueError, "ipo=True needs beta > 0")):
        with pytest.raises(err, match=match):
            call()


@pytest.mark.parametrize("kw", [dict(policy_loss_type="gspo", is_correction_level="token"),
                                dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0))],
                         ids=["gspo_vs_rollout", "ppo_correction"])
def test_empty_micro_batch_gives_zero_metrics(kw):
    """No valid token: 0 for the loss and every token mean, with every option (gspo against the rollout gave a NaN
    ppo_kl, the correction a NaN vllm_kl and is_filter_ratio)."""
    lp, old, A, m, roll = _batch(25)
    out = fo.PolicyLoss(**kw)(lp, old, A, torch.zeros_like(m), rollout_log_probs=roll)
    for what, t in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), out):
        assert t is None or float(t) == 0.0, (what, t)


def _all_outputs_equal(got, want, what, atol=1e-6, rtol=1e-5):
    """Every returned value (None where OpenRLHF's is None) with OpenRLHF's shape and value."""
    names = ("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
    for name, f, v in zip(names, got, want):
        assert (f is None) == (v is None), (what, name, f, v)
        if v is not None:
            assert f.shape == v.shape, (what, name, f.shape, v.shape)
            assert_close(f, v, atol=atol, rtol=rtol, what=f"{what} {name}")


NUMBER_CASES = ["ppo", "ppo_dual_clip", "ppo_sample_level", "gspo", "tis_mask", "gspo_vs_rollout"]


def _openrlhf_number(orl, kw, value):
    """The advantage ``value`` as OpenRLHF's PolicyLoss takes it: the number, or with the dual clip (whose
    ``torch.max(clip1, dual_clip * advantages)`` refuses a number) the same value as a 0-dim tensor."""
    if kw.get("dual_clip") is None:
        return value
    lp = torch.zeros(1, 2)
    with pytest.raises(TypeError):
        orl.PolicyLoss(**kw)(lp, lp, value, torch.ones(1, 2), rollout_log_probs=lp)
    return torch.tensor(float(value))


@pytest.mark.parametrize("value", [0.5, -0.75, 1], ids=["float", "negative", "int"])
@pytest.mark.parametrize("case", NUMBER_CASES)
def test_policy_loss_takes_number_advantages_as_openrlhf(orl, case, value):
    """OpenRLHF multiplies the ratio by the advantages, so a Python number (one advantage for every token) works
    there; the adapter raised a TypeError. Loss, every output, d log_probs and the result dtypes equal OpenRLHF's.
    (OpenRLHF's dual clip, ``torch.max(clip1, dual_clip * advantages)``, needs a tensor: it gets the number as a
    0-dim tensor there.)"""
    lp, old, _, m, roll = _batch(30 + NUMBER_CASES.index(case))
    kw = POLICY_CASES[case]
    theirs = _openrlhf_number(orl, kw, value)
    out = []
    for cls, dt, v in ((orl.PolicyLoss, torch.float64, theirs), (fo.PolicyLoss, torch.float32, value)):
        x = lp.to(dt).clone().requires_grad_(True)
        res = cls(**kw)(x, old.to(dt), v, m, rollout_log_probs=roll.to(dt))
        res[0].backward()
        out.append((res, x.grad))
    (want, want_grad), (got, grad) = out
    _all_outputs_equal(got, want, f"{case} {value!r}")
    assert_close(grad, want_grad, atol=1e-6, rtol=1e-5, what=f"{case} {value!r} d log_probs")
    bf = [t.to(torch.bfloat16) for t in (lp, old, roll)]  # a number promotes no dtype: bf16 stays bf16
    want = orl.PolicyLoss(**kw)(bf[0], bf[1], theirs, m, rollout_log_probs=bf[2])
    got = fo.PolicyLoss(**kw)(bf[0], bf[1], value, m, rollout_log_probs=bf[2])
    assert [None if t is None else t.dtype for t in got] == [None if t is None else t.dtype for t in want]


@pytest.mark.parametrize("adv", ["tokens", "one", "scalar", "number"])
@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_policy_loss_takes_one_sequence_as_openrlhf(orl, case, adv):
    """OpenRLHF's arithmetic computes a single sequence ``[T]`` (log-probs, mask and rollout log-probs 1-D) as a
    batch of one; the adapter refused it. Every output (its shape, 0-dim, included), d log_probs, with global
    counts too, equal OpenRLHF's, for advantages ``[T]``, ``[1]``, 0-dim and a number."""
    lp, old, A, m, roll = _batch(40 + sorted(POLICY_CASES).index(case), B=4, T=7)
    row = int(m.sum(-1).argmax())
    lp, old, A, m, roll = lp[row], old[row], A[row], m[row].clone(), roll[row]
    m[1] = False  # a hole
    a = {"tokens": A + torch.linspace(-0.5, 0.5, 7), "one": A[:1], "scalar": A[0], "number": float(A[0])}[adv]
    kw = POLICY_CASES[case]
    theirs = _openrlhf_number(orl, kw, a) if adv == "number" else a
    for glob in ({}, dict(dp_size=2, batch_num_tokens=2.0 * float(m.sum()) + 1, global_batch_size=3.0)):
        out = []
        for cls, dt, v in ((orl.PolicyLoss, torch.float64, theirs), (fo.PolicyLoss, torch.float32, a)):
            x = lp.to(dt).clone().requires_grad_(True)
            v = v.to(dt) if isinstance(v, torch.Tensor) else v
            res = cls(**kw)(x, old.to(dt), v, m, rollout_log_probs=roll.to(dt), **glob)
            res[0].backward()
            out.append((res, x.grad))
        (want, want_grad), (got, grad) = out
        _all_outputs_equal(got, want, f"{case} {adv} {glob}")
        assert grad.shape == want_grad.shape == lp.shape
        assert_close(grad, want_grad, atol=1e-6, rtol=1e-5, what=f"{case} {adv} {glob} d log_probs")
    with pytest.raises(ValueError, match="log_probs must be"):
        fo.PolicyLoss()(lp[None, None], old[None, None], A[None, None], m[None, None])


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1,)], ids=["B1", "B4", "one"])
@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo_loss_takes_any_shape_as_openrlhf(orl, case, shape):
    """OpenRLHF's DPOLoss computes on any shape (``[B, 1]`` log-probs: the mean over every element, the rewards
    shaped as the inputs); the adapter refused all but ``[B]``."""
    kw = DPO_CASES[case]
    n = math.prod(shape)
    x = [t[:n].reshape(shape) for t in _dpo_inputs(50 + sorted(DPO_CASES).index(case))]
    out = []
    for cls, dt in ((orl.DPOLoss, torch.float64), (fo.DPOLoss, torch.float32)):
        c, r = x[0].to(dt).requires_grad_(True), x[1].to(dt).requires_grad_(True)
        loss, cr, rjr = cls(**kw)(c, r, x[2].to(dt), x[3].to(dt))
        loss.backward()
        out.append((loss, cr, rjr, c.grad, r.grad))
    for name, f, v in zip(("loss", "chosen_rewards", "rejected_rewards", "d chosen", "d rejected"), *out[::-1]):
        assert f.shape == v.shape, (case, name, f.shape, v.shape)
        assert_close(f, v, atol=1e-5, rtol=1e-5, what=f"{case} {shape} {name}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("live", [False, True], ids=["built", "assigned"])
def test_dpo_beta_zero_as_openrlhf(orl, label_smoothing, live):
    """beta = 0: OpenRLHF's loss is log 2 per pair (its terms read beta * d = 0), with a zero gradient and zero
    rewards; the adapter refused beta = 0. Built so or assigned later, loss, rewards and gradients equal
    OpenRLHF's (a gradient of zeros, not None). IPO divides by beta: it raises there (ZeroDivisionError), a
    ValueError naming beta here."""
    x = _dpo_inputs(60)
    out = []
    for cls, dt in ((orl.DPOLoss, torch.float64), (fo.DPOLoss, torch.float32)):
        module = cls(beta=0.1 if live else 0.0, label_smoothing=label_smoothing)
        module.beta = 0.0
        c, r = x[0].to(dt).requires_grad_(True), x[1].to(dt).requires_grad_(True)
        loss, cr, rjr = module(c, r, x[2].to(dt), x[3].to(dt))
        loss.backward()
        out.append((loss, cr, rjr, c.grad, r.grad))
    for name, f, v in zip(("loss", "chosen_rewards", "rejected_rewards", "d chosen", "d rejected"), *out[::-1]):
        assert_close(f, v, atol=1e-6, rtol=1e-6, what=f"beta 0 {name}")
    assert_close(out[1][0], torch.tensor(math.log(2.0)), atol=1e-6, rtol=1e-6, what="log 2")
    with pytest.raises(ZeroDivisionError):
        orl.DPOLoss(beta=0.0, ipo=True)(*x)
    with pytest.raises(ValueError, match="beta"):
        fo.DPOLoss(beta=0.0, ipo=True)


#: (option assignments from PolicyLoss(**start) to a valid configuration, start, k): every order of the
#: assignments must reach it; the first k assignments, in the order listed, give an invalid combination
ORDER_CASES = {
    "tv_gate": ((("is_correction_level", "token"), ("is_correction_gating", "tv"),
                 ("is_correction_threshold", (0.0, 0.05))), {}, 2),
    "clip_to_seq_mask": ((("is_correction_level", "seq"), ("is_correction_mode", "mask")),
                         dict(is_correction_level="token", is_correction_mode="clip",
                              is_correction_threshold=(0.8, 1.25)), 1),
    "ratio_to_binary_kl": ((("is_correction_gating", "binary_kl"), ("is_correction_threshold", (0.0, 0.02))),
                           dict(is_correction_level="seq", is_correction_threshold=(0.8, 1.25)), 1),
}


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_option_assignments_in_any_order_as_openrlhf(orl, case):
    """OpenRLHF accepts option assignments in any order; the adapter checked the whole combination at each one,
    so a valid final configuration raised when an intermediate state was invalid (a tv gate assigned before its
    threshold). Each order now reaches OpenRLHF's numbers; an invalid combination at the call raises ValueError
    naming the options, and assigning the rest makes the next call work."""
    import itertools

    steps, start, k = ORDER_CASES[case]
    lp, old, A, m, roll = _batch(70 + sorted(ORDER_CASES).index(case))
    theirs = orl.PolicyLoss(**start)
    for name, value in steps:
        setattr(theirs, name, value)
    want = theirs(lp.double(), old.double(), A.double(), m, rollout_log_probs=roll.double())
    for order in itertools.permutations(steps):
        ours = fo.PolicyLoss(**start)
        for name, value in order:
            setattr(ours, name, value)
        _all_outputs_equal(ours(lp, old, A, m, rollout_log_probs=roll), want, f"{case} {order}")
    ours = fo.PolicyLoss(**start)  # the first k assignments: an invalid combination, reported at the call
    for name, value in steps[:k]:
        setattr(ours, name, value)
    with pytest.raises(ValueError, match="is_correction_"):
        ours(lp, old, A, m, rollout_log_probs=roll)
    for name, value in steps[k:]:
        setattr(ours, name, value)
    _all_outputs_equal(ours(lp, old, A, m, rollout_log_probs=roll), want, f"{case} fixed")


# ------------------------------------------------- GPTLMLoss, SFTLoss, ValueLoss, PairWiseLoss, LogExpLoss
ALL_CLASSES = ("PolicyLoss", "DPOLoss", "GPTLMLoss", "SFTLoss", "ValueLoss", "PairWiseLoss", "LogExpLoss")
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
BF16_TOL = dict(atol=2e-3, rtol=1e-2)  # the adapter computes in fp32 and returns bf16: one bf16 rounding


def _tol(dtype):
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_loss_of_openrlhf_has_an_adapter(orl):
    """Every ``nn.Module`` of OpenRLHF's loss.py has an adapter of the same name, exported beside
    ``compute_approx_kl``."""
    theirs = {n for n, v in vars(orl).items()
              if isinstance(v, type) and issubclass(v, torch.nn.Module) and v.__module__ == orl.__name__}
    assert theirs == set(ALL_CLASSES) == set(fo.__all__) - {"compute_approx_kl"}


@pytest.mark.parametrize("name", ALL_CLASSES)
def test_signatures_are_openrlhf(orl, name):
    """Constructor and forward take OpenRLHF's arguments: the same names, kinds and defaults, in order."""
    for method in ("__init__", "forward"):
        ours, theirs = getattr(getattr(fo, name), method), getattr(getattr(orl, name), method)
        assert _params(ours) == _params(theirs), (name, method)


def _grads(cls, kw, args, wrt, dtype, **call):
    """``cls(**kw)(*args, **call)`` with the floating tensors of ``args`` in ``dtype``; the result and the
    gradients of the arguments at the indices ``wrt``."""
    x = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    for i in wrt:
        x[i] = x[i].clone().requires_grad_(True)
    out = cls(**kw)(*x, **call)
    out.backward()
    return out, [x[i].grad for i in wrt]


def _compare(orl, name, kw, args, wrt, dtype, what, **call):
    """The adapter on ``args`` in ``dtype`` against OpenRLHF's class in float64 on the same values: the result,
    the gradients; and the result's dtype against OpenRLHF's on ``dtype``."""
    args = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    want, want_grads = _grads(getattr(orl, name), kw, args, wrt, torch.float64, **call)
    got, grads = _grads(getattr(fo, name), kw, args, wrt, dtype, **call)
    assert got.shape == want.shape == (), (what, got.shape)
    assert_close(got, want, **_tol(dtype), what=f"{what} loss")
    for i, g, w in zip(wrt, grads, want_grads):
        assert (g is None) == (w is None), (what, i)  # old_values without clip_eps: read by neither
        if w is not None:
            assert_close(g, w, **_tol(dtype), what=f"{what} d arg {i}")
    same = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    assert got.dtype == getattr(orl, name)(**kw)(*same, **call).dtype, what


def _lm_inputs(seed, shape=(3, 7), V=13):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    return torch.randn(*shape, V, generator=g) * 3, labels


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5)], ids=["BT", "extra_dim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpt_lm_loss_matches_openrlhf(orl, dtype, shape):
    """GPTLMLoss: the shifted cross-entropy over the labels other than -100, and d logits (fastalign reads the
    logits in place: no shifted copy, no [N, V] log-softmax); bf16 logits give a bf16 loss, as OpenRLHF's."""
    logits, labels = _lm_inputs(80 + len(shape), shape)
    _compare(orl, "GPTLMLoss", {}, [logits, labels], [0], dtype, f"GPTLMLoss {shape}")


def test_gpt_lm_loss_no_valid_label_gives_zero(orl):
    """No label to score: 0 with a zero gradient, where OpenRLHF's cross-entropy divides 0 by 0."""
    logits, labels = _lm_inputs(83)
    labels[:, 1:] = -100
    assert torch.isnan(orl.GPTLMLoss()(logits.double(), labels))
    loss, (grad,) = _grads(fo.GPTLMLoss, {}, [logits, labels], [0], torch.float32)
    assert float(loss.detach()) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_gpt_lm_loss_takes_float64_logits_as_openrlhf(orl):
    """float64 logits, which OpenRLHF's cross-entropy takes: computed in fp32 (the fused op's widest input), the
    loss returned in float64 with a float64 d logits, OpenRLHF's numbers."""
    logits, labels = _lm_inputs(87)
    want, (want_grad,) = _grads(orl.GPTLMLoss, {}, [logits, labels], [0], torch.float64)
    got, (grad,) = _grads(fo.GPTLMLoss, {}, [logits, labels], [0], torch.float64)
    assert got.dtype == want.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close(got, want, **FP32_TOL, what="float64 GPTLMLoss")
    assert_close(grad, want_grad, **FP32_TOL, what="float64 GPTLMLoss d logits")


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of this process alone."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:c10d::allreduce_")  # OpenRLHF's backward through its all-reduce
@pytest.mark.parametrize("empty", [False, True], ids=["scored", "no_valid_label"])
def test_gpt_lm_loss_ring_group_of_one_matches_openrlhf(orl, one_rank_group, empty):
    """With a real ring_attn_group (one rank): the all-reduced loss and d logits are OpenRLHF's; a chunk with no
    valid label gives 0 in both."""
    logits, labels = _lm_inputs(84)
    if empty:
        labels[:] = -100
    kw = dict(ring_attn_group=one_rank_group)
    _compare(orl, "GPTLMLoss", kw, [logits, labels], [0], torch.float32, f"ring of one, empty={empty}")
    if empty:
        assert float(fo.GPTLMLoss(**kw)(logits, labels)) == 0.0


@pytest.mark.parametrize("how", ["built", "assigned"])
@pytest.mark.parametrize("world, rank, empty", [(2, 0, False), (2, 1, False), (3, 0, False), (3, 2, False),
                                                (4, 3, False), (2, 1, True)])
def test_gpt_lm_loss_ring_chunks_match_openrlhf(orl, one_rank_group, monkeypatch, world, rank, empty, how):
    """Rank ``r`` of ``W`` in ring_attn_group: the labels ``[B, T]`` are cut to its chunk (``T // W`` each, a
    remainder dropped, as OpenRLHF's: rank 3 of 4 on T = 10 starts at 6, not at 10 * 3 // 4 = 7), shifted within it
    against its logits; the loss is the sum over the
    ranks / W, the gradient the local loss's / W. The group's rank, size and all-reduce are stand-ins here (the
    other ranks' sum a constant), applied to OpenRLHF's class and the adapter alike; built with the group or
    assigned it later, the adapter reads the rank and size as OpenRLHF's constructor does."""
    dist, others, calls = torch.distributed, 0.75, []

    def all_reduce(t, op=None, group=None, async_op=False):
        calls.append((op, group))
        t.add_(others)

    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    T, V = 10, 11
    chunk = T // world
    logits, labels = _lm_inputs(85 + rank, (2, T), V)
    logits = logits[:, :chunk].contiguous()
    if empty:
        labels[:, rank * chunk + 1:(rank + 1) * chunk] = -100
    want, (want_grad,) = _grads(orl.GPTLMLoss, dict(ring_attn_group=one_rank_group), [logits, labels], [0],
                                torch.float64)
    if how == "built":
        ours = fo.GPTLMLoss(ring_attn_group=one_rank_group)
    else:
        ours = fo.GPTLMLoss()
        ours.ring_attn_group = one_rank_group
    x = logits.clone().requires_grad_(True)
    got = ours(x, labels)
    got.backward()
    assert_close(got, want, **FP32_TOL, what="ring loss")
    assert_close(x.grad, want_grad, **FP32_TOL, what="ring d logits")
    assert calls == [(dist.ReduceOp.SUM, one_rank_group)] * 2
    assert (float(want.detach()) == others / world) == empty
    with pytest.raises(ValueError, match="labels must have shape"):
        ours(logits[:, :-1], labels)


def test_gpt_lm_loss_checks_its_arguments(one_rank_group, monkeypatch):
    logits, labels = _lm_inputs(86)
    for call, err, match in (
            (lambda: fo.GPTLMLoss()(logits, labels[:, :-1]), ValueError, "labels must have shape"),
            (lambda: fo.GPTLMLoss()(logits, labels.float()), TypeError, "labels"),
            (lambda: fo.GPTLMLoss()(logits.long(), labels), TypeError, "logits"),
            (lambda: fo.GPTLMLoss()(logits[0, 0], labels[0, :1]), ValueError, "logits"),
            (lambda: fo.GPTLMLoss(ring_attn_group="world"), TypeError, "ring_attn_group"),
            (lambda: setattr(fo.GPTLMLoss(), "ring_attn_group", True), TypeError, "ring_attn_group")):
        with pytest.raises(err, match=match):
            call()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: -1)
    with pytest.raises(ValueError, match="ring_attn_group must contain this process"):
        fo.GPTLMLoss(ring_attn_group=one_rank_group)


def _counts(kind, m):
    """OpenRLHF's aggregation arguments: none, dp_size alone (read only with a count), the global counts of two
    ranks (tensors), or counts per accumulation step below 1 (numbers), as its trainer passes them."""
    n_tok, n_seq = float(m.float().sum()), float((m.float().sum(-1) > 0).sum())
    return {"local": {}, "dp_only": dict(dp_size=2),
            "dp2": dict(dp_size=2, batch_num_tokens=torch.tensor(2 * n_tok + 3), global_batch_size=torch.tensor(
                2 * n_seq + 1)),
            "below_one": dict(dp_size=2, batch_num_tokens=0.75, global_batch_size=0.5)}[kind]


def _mask(kind, m, seed):
    if kind == "bool":
        return m
    weights = 0.25 + 0.75 * torch.rand(m.shape, generator=torch.Generator().manual_seed(seed))
    return m.float() * weights  # a fractional float mask (OpenRLHF weighs each token by it)


@pytest.mark.parametrize("counts", ["local", "dp_only", "dp2", "below_one"])
@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
def test_sft_loss_matches_openrlhf(orl, token_level, dtype, mask, counts):
    """SFTLoss: -per_token_logps aggregated per token or per sample (an empty sequence in the batch), locally or
    with OpenRLHF's global counts and dp_size; loss, d per_token_logps and the result dtype."""
    lp, _, _, m, _ = _batch(90)
    m = _mask(mask, m, 91)
    _compare(orl, "SFTLoss", dict(token_level_loss=token_level), [lp, m], [0], dtype,
             f"SFTLoss {token_level} {mask} {counts}", **_counts(counts, m))


VALUE_CLIPS = [None, 0.2, 0.0]


@pytest.mark.parametrize("counts", ["local", "dp_only", "dp2", "below_one"])
@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("clip_eps", VALUE_CLIPS, ids=["no_clip", "clip0.2", "clip0"])
def test_value_loss_matches_openrlhf(orl, clip_eps, token_level, dtype, mask, counts):
    """ValueLoss: the (clipped) squared error, halved, aggregated as OpenRLHF's; values moved past the clip on
    some tokens and inside it on others; loss, d values, d old_values and the result dtype."""
    g = torch.Generator().manual_seed(92)
    _, _, _, m, _ = _batch(92)
    values = torch.randn(m.shape, generator=g)
    old_values = values + 0.4 * torch.randn(m.shape, generator=g)
    returns = values + torch.randn(m.shape, generator=g)
    m = _mask(mask, m, 93)
    _compare(orl, "ValueLoss", dict(clip_eps=clip_eps, token_level_loss=token_level), [values, old_values, returns, m],
             [0, 1], dtype, f"ValueLoss {clip_eps} {token_level} {mask} {counts}", **_counts(counts, m))


def test_value_loss_dtype_ignores_unread_old_values_as_openrlhf(orl):
    """Without clip_eps OpenRLHF's ValueLoss never reads old_values: bf16 values and returns give a bf16 loss, as
    its, even beside fp32 old_values; with clip_eps they take part and the loss is fp32, as its."""
    _, _, _, m, _ = _batch(92)
    g = torch.Generator().manual_seed(93)
    values, returns = (torch.randn(m.shape, generator=g).to(torch.bfloat16) for _ in range(2))
    old_values = values.float() + 0.1 * torch.randn(m.shape, generator=g)
    for clip_eps in (None, 0.2):
        want = orl.ValueLoss(clip_eps=clip_eps)(values, old_values, returns, m)
        want64 = orl.ValueLoss(clip_eps=clip_eps)(values.double(), old_values.double(), returns.double(), m)
        got = fo.ValueLoss(clip_eps=clip_eps)(values, old_values, returns, m)
        assert got.dtype == want.dtype == (torch.bfloat16 if clip_eps is None else torch.float32), clip_eps
        assert_close(got, want64, **BF16_TOL, what=f"ValueLoss clip_eps={clip_eps}")


@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
def test_sft_and_value_loss_take_one_sequence_as_openrlhf(orl, token_level):
    """One sequence ``[T]`` (OpenRLHF's arithmetic: a batch of one); no mask (OpenRLHF: the plain mean, token
    level, local)."""
    lp, old, A, m, _ = _batch(94)
    row = int(m.sum(-1).argmax())
    kw = dict(token_level_loss=token_level)
    _compare(orl, "SFTLoss", kw, [lp[row], m[row]], [0], torch.float32, "SFTLoss [T]")
    _compare(orl, "ValueLoss", dict(kw, clip_eps=0.1), [lp[row], old[row], A[row], m[row]], [0], torch.float32,
             "ValueLoss [T]", global_batch_size=2.0, batch_num_tokens=9.0)
    _compare(orl, "SFTLoss", {}, [lp, None], [0], torch.float32, "SFTLoss no mask")
    _compare(orl, "ValueLoss", {}, [lp, None, A], [0], torch.float32, "ValueLoss no mask, no old_values")


def _pairs(seed, shape):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randn(shape, generator=g) * 2
    return chosen, chosen + torch.randn(shape, generator=g), torch.rand(shape, generator=g)


@pytest.mark.parametrize("margin", [None, "per_pair", "number", "0-dim"])
@pytest.mark.parametrize("shape", [(8,), (8, 1)], ids=["B", "B1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pairwise_loss_matches_openrlhf(orl, dtype, shape, margin):
    """PairWiseLoss: -log σ(c - r - margin) averaged over the pairs; loss, d chosen, d rejected and the dtype (an
    fp32 margin per pair, as OpenRLHF's trainer builds it, makes bf16 rewards' loss fp32; a number or a 0-dim
    margin does not)."""
    c, r, mg = _pairs(95, shape)
    mg = {None: None, "per_pair": mg, "number": 0.5, "0-dim": torch.tensor(0.5)}[margin]
    _compare(orl, "PairWiseLoss", {}, [c, r], [0, 1], dtype, f"PairWiseLoss {margin}", margin=mg)


@pytest.mark.parametrize("shape", [(8,), (8, 1)], ids=["B", "B1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logexp_loss_matches_openrlhf(orl, dtype, shape):
    c, r, _ = _pairs(96, shape)
    _compare(orl, "LogExpLoss", {}, [c, r], [0, 1], dtype, "LogExpLoss")


def test_logexp_loss_is_finite_where_openrlhf_overflows(orl):
    """log(1 + exp(r - c)) overflows fp32 past r - c = 88 (OpenRLHF: inf, NaN gradient); the adapter's softplus
    gives OpenRLHF's float64 numbers."""
    c, r = torch.zeros(2), torch.tensor([100.0, 0.0])
    assert torch.isinf(orl.LogExpLoss()(c, r))
    _compare(orl, "LogExpLoss", {}, [c, r], [0, 1], torch.float32, "LogExpLoss overflow")


def test_logexp_loss_refuses_a_margin(orl):
    """OpenRLHF's LogExpLoss ignores a margin (its trainer passes one with margin_loss): a silently dropped margin
    raises here, naming it."""
    c, r, mg = _pairs(97, (4,))
    assert_close(orl.LogExpLoss()(c, r, mg), orl.LogExpLoss()(c, r), atol=0, what="OpenRLHF ignores the margin")
    with pytest.raises(ValueError, match="margin does not apply to LogExpLoss"):
        fo.LogExpLoss()(c, r, mg)


def test_empty_batches_give_zero(orl):
    """Nothing to average: 0 where OpenRLHF divides 0 by 0 (NaN)."""
    e, m = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    for name, args in (("SFTLoss", (e, m)), ("ValueLoss", (e, e, e, m)), ("PairWiseLoss", (e[0, :0], e[0, :0])),
                       ("LogExpLoss", (e[0, :0], e[0, :0]))):
        assert torch.isnan(getattr(orl, name)()(*args)), name
        assert float(getattr(fo, name)()(*args)) == 0.0, name


def test_value_and_sft_options_are_live_as_openrlhf(orl):
    """Assigned options take effect at the next call, as OpenRLHF's; an invalid value raises at the assignment,
    naming it, and leaves the old one."""
    lp, old, A, m, _ = _batch(98)
    args = (lp, old, A, m)
    theirs, ours = orl.ValueLoss(clip_eps=0.2), fo.ValueLoss(clip_eps=0.2)
    for name, value in (("clip_eps", 0.05), ("token_level_loss", False), ("clip_eps", None)):
        setattr(theirs, name, value)
        setattr(ours, name, value)
        assert_close(ours(*args), theirs(*(t.double() for t in args[:3]), m), **FP32_TOL, what=f"{name}={value}")
    sft = fo.SFTLoss()
    for module, name, value, err in ((ours, "clip_eps", -0.1, ValueError), (ours, "clip_eps", float("nan"), ValueError),
                                     (ours, "clip_eps", "0.2", TypeError), (ours, "token_level_loss", 1, TypeError),
                                     (sft, "token_level_loss", "no", TypeError)):
        with pytest.raises(err, match=name):
            setattr(module, name, value)
    assert ours.clip_eps is None and ours.token_level_loss is False and sft.token_level_loss is True
    with pytest.raises(ValueError, match="clip_eps must be >= 0"):
        fo.ValueLoss(clip_eps=-0.2)
    with pytest.raises(TypeError, match="token_level_loss"):
        fo.SFTLoss(token_level_loss="yes")


def test_new_losses_name_openrlhf_arguments():
    lp, old, A, m, _ = _batch(99)
    c, r, mg = _pairs(99, (6,))
    value = fo.ValueLoss(clip_eps=0.2)
    for call, err, match in (
            (lambda: fo.SFTLoss()(lp.long(), m), TypeError, "per_token_logps"),
            (lambda: fo.SFTLoss()(lp, m[:, :3]), ValueError, "loss_mask"),
            (lambda: fo.SFTLoss()(lp[None], m[None]), ValueError, "per_token_logps must be"),
            (lambda: fo.SFTLoss()(lp, m, batch_num_tokens=-3), ValueError, "batch_num_tokens"),
            (lambda: fo.SFTLoss()(lp, m, global_batch_size="4"), TypeError, "global_batch_size"),
            (lambda: fo.SFTLoss()(lp, m, dp_size=0), ValueError, "dp_size"),
            (lambda: value(lp, old, A[:, :3], m), ValueError, "returns"),
            (lambda: value(lp, None, A, m), TypeError, "old_values"),
            (lambda: value(lp, old[:, :3], A, m), ValueError, "old_values"),
            (lambda: value(lp, old, A, m[:, :3]), ValueError, "action_mask"),
            (lambda: value(lp, old, None, m), TypeError, "returns"),
            (lambda: fo.PairWiseLoss()(c, r[:3]), ValueError, "reject_reward"),
            (lambda: fo.PairWiseLoss()(c.long(), r), TypeError, "chosen_reward"),
            (lambda: fo.PairWiseLoss()(c, r, mg[:, None]), ValueError, "margin must broadcast"),
            (lambda: fo.PairWiseLoss()(c, r, "0.5"), TypeError, "margin"),
            (lambda: fo.LogExpLoss()(c, None), TypeError, "reject_reward")):
        with pytest.raises(err, match=match):
            call()


def test_gpt_lm_loss_refuses_a_label_out_of_range(orl, monkeypatch):
    """OpenRLHF's GPTLMLoss raises IndexError for a label outside [0, V) other than -100 (a pad id of -1); the
    fused op gives it a NaN log-prob with a finite gradient, so the adapter refuses it: a ValueError naming
    ``labels`` where they are an eager CPU tensor, elsewhere (not read on the host) a NaN loss and NaN gradient."""
    from fastalign import _validate

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[0, 3, -1, 4, -100], [1, 2, 3, 4, 5]])
    with pytest.raises(IndexError):
        orl.GPTLMLoss()(logits, labels)
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 11\) or equal -100"):
        fo.GPTLMLoss()(logits, labels)
    monkeypatch.setattr(_validate, "eager", lambda *tensors: False)
    loss = fo.GPTLMLoss()(logits, labels)
    loss.backward()
    scored = labels[:, 1:] != -100  # position t scores labels[t + 1]; the others' gradient stays 0
    assert loss.isnan() and logits.grad[:, :-1][scored].isnan().all()
    assert (logits.grad[:, :-1][~scored] == 0).all() and (logits.grad[:, -1] == 0).all()


def _approx_kl_float64(lp, base, old, estimator, unbiased):
    """OpenRLHF's compute_approx_kl in float64 (value, d/d(lp)): the estimate clamped to [-10, 10]; the gradient of
    the clamped estimate, or, unbiased, w l with w = min(exp(lp - old), 10)."""
    lp = lp.double().detach().requires_grad_()
    l = lp - base.double()
    value = {"k1": l, "k2": l ** 2 / 2, "k3": (-l.clamp(min=-10)).exp() - 1 + l.clamp(min=-10)}[estimator]
    value = value.clamp(-10, 10)
    if unbiased:
        w = 1.0 if old is None else (lp.detach() - old.double()).exp().clamp(max=10)
        return value.detach(), (w * l).detach()
    (grad,) = torch.autograd.grad(value.sum(), lp)
    return value.detach(), grad


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compute_approx_kl_matches_openrlhf(orl_models, estimator, unbiased, dtype):
    """compute_approx_kl: value and d/d(log_probs) against OpenRLHF's own function (it computes in fp32 whatever
    the inputs) and a float64 transcription, over log-ratios that cross the [-10, 10] clamp, with and without
    log_probs_old; bf16 and float64 inputs give fp32 values and a gradient of the input's dtype, as OpenRLHF's."""
    g = torch.Generator().manual_seed(7)
    base = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 3
    l = torch.randn(4, 9, generator=g, dtype=torch.float64) * 2
    l[0, :6] = torch.tensor([-30.0, -12.0, -4.6, 4.6, 12.0, 30.0])  # the clamps of k1, k2 and k3 bind here
    lp = (base + l).to(dtype)
    base = base.to(dtype)
    drift = torch.randn(4, 9, generator=g, dtype=torch.float64)
    drift[1, :3] = torch.tensor([4.0, 2.4, -6.0])  # w = exp(drift) above its cap 10, and far below 1
    for old in (None, (lp.double() - drift).to(dtype)):
        want_value, want_grad = _approx_kl_float64(lp, base, old, estimator, unbiased)
        theirs_lp = lp.clone().requires_grad_()
        theirs = orl_models["utils"].compute_approx_kl(theirs_lp, base, log_probs_old=old, kl_estimator=estimator,
                                                       unbiased_gradient=unbiased)
        theirs.sum().backward()
        ours_lp = lp.clone().requires_grad_()
        ours = fo.compute_approx_kl(ours_lp, base, log_probs_old=old, kl_estimator=estimator,
                                    unbiased_gradient=unbiased)
        ours.sum().backward()
        assert ours.dtype == theirs.dtype == torch.float32 and ours_lp.grad.dtype == theirs_lp.grad.dtype == dtype
        assert_close(ours, want_value, atol=1e-5, rtol=1e-6)
        assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
        grad_tol = dict(atol=1e-5, rtol=1e-6) if dtype != torch.bfloat16 else dict(atol=0.05, rtol=0.02)
        assert_close(ours_lp.grad, want_grad, **grad_tol)
        assert_close(ours_lp.grad, theirs_lp.grad, **grad_tol)
        if not unbiased or old is None:
            assert not (ours_lp.grad == 0).all()


def test_compute_approx_kl_refuses_what_openrlhf_cannot_compute(orl_models):
    """An unknown estimator raises ValueError (OpenRLHF's too); a non-bool switch and log-probs of another shape
    raise naming the argument (OpenRLHF broadcasts them); NaN propagates to the value and the gradient."""
    lp, base = torch.randn(3, 5), torch.randn(3, 5)
    for fn in (orl_models["utils"].compute_approx_kl, fo.compute_approx_kl):
        with pytest.raises(ValueError, match="kl_estimator"):
            fn(lp, base, kl_estimator="k4")
    with pytest.raises(TypeError, match="unbiased_gradient"):
        fo.compute_approx_kl(lp, base, unbiased_gradient=1)
    with pytest.raises(ValueError, match="log_probs_base"):
        fo.compute_approx_kl(lp, base[:, :1])
    with pytest.raises(ValueError, match="log_probs_old"):
        fo.compute_approx_kl(lp, base, lp[:1], unbiased_gradient=True)
    nan_lp = lp.clone()
    nan_lp[1, 2] = float("nan")
    for unbiased in (False, True):
        x = nan_lp.clone().requires_grad_()
        kl = fo.compute_approx_kl(x, base, lp, kl_estimator="k2", unbiased_gradient=unbiased)
        kl.sum().backward()
        assert kl[1, 2].isnan() and kl.isnan().sum() == 1 and x.grad[1, 2].isnan() and x.grad.isnan().sum() == 1
