"""The dtype of the verl profile's loss against verl 0.9.1's own code, for every loss mode.

verl's loss modes compute in their inputs' dtypes, so the loss's dtype is what torch's promotion gives the
tensors that reach it: bf16 in, bf16 out in token-mean; float32 where verl mixes in a float32 tensor (the
seq-mean aggregations, dppo's ``valid_mask``, geo_mean's mean over a bool mask); a float mask, a float64 operand
or a floating tensor count promote it. ``fastalign_<mode>`` (verl's registry) and :class:`VerlPolicyLoss` return
that dtype; the value is fastalign's fp32 result rounded once, so it is compared with verl run in float64 on the
same inputs, at the rounding of the returned dtype.
"""
import pytest
import torch

from helpers import assert_close

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable")
actor_config = pytest.importorskip("verl.workers.config.actor", reason="verl is not importable")

from fastalign.integrations.verl import VerlPolicyLoss, plugin  # noqa: E402

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
MODES = [n[len(plugin.PREFIX):] for n in plugin.POLICY_LOSSES]
AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
POLICY_LOSS = {"dro": dict(dro_beta=0.5), "kl_cov": dict(kl_cov_ratio=0.3),
               # every token inside the bounds picked: no random choice (verl's randperm) in the loss
               "clip_cov": dict(clip_cov_ratio=1.0, clip_cov_lb=-100.0, clip_cov_ub=100.0)}

#: the dtypes of (log_prob, old_log_prob, advantages, response_mask, rollout_is_weights)
DTYPES = {
    "bf16": (bf16, bf16, bf16, torch.bool, None),
    "fp16": (f16, f16, f16, torch.bool, None),
    "fp32": (f32, f32, f32, torch.bool, None),
    "f64": (f64, f64, f64, torch.bool, None),
    "bf16_int_mask": (bf16, bf16, bf16, torch.int64, bf16),
    "bf16_fp32_advantages": (bf16, bf16, f32, torch.bool, None),
    "bf16_old_fp32": (bf16, f32, bf16, torch.bool, None),  # gpg reads no old_log_prob: bf16 there
    "bf16_fp16": (bf16, f16, bf16, torch.bool, None),
    "bf16_fp32_mask": (bf16, bf16, bf16, f32, None),
    "bf16_bf16_mask": (bf16, bf16, bf16, bf16, bf16),  # geo_mean's mean over a float mask keeps bf16
    "fp16_f64_weights": (f16, f16, f16, torch.bool, f64),
    "fp32_f64_advantages": (f32, f32, f64, torch.bool, f32),
}
#: (dp_size, batch_num_tokens, global_batch_size) with n valid tokens and s non-empty sequences
COUNTS = {
    "local": lambda n, s: (1, None, None),
    "int": lambda n, s: (2, 2 * n + 3, 2 * s + 1),
    "int64_tensors": lambda n, s: (torch.tensor(2), torch.tensor(2 * n + 3), torch.tensor(2 * s + 1)),
    "fp32_tensors": lambda n, s: (2, torch.tensor(2 * n + 3.0), torch.tensor(2 * s + 1.0)),
    "f64_tensors": lambda n, s: (2, torch.tensor(2 * n + 3.0, dtype=f64), torch.tensor(2 * s + 1.0, dtype=f64)),
    "f64_dp_size": lambda n, s: (torch.tensor(2.0, dtype=f64), 2 * n + 3, 2 * s + 1),
}


def batch(dtypes, seed, B=5, T=6):
    """Inputs of ``dtypes`` (see :data:`DTYPES`); per-token advantages (distinct covariances for kl_cov)."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * 0.25
    A = torch.randn(B, T, generator=g)
    m = torch.arange(T)[None, :] < torch.randint(2, T + 1, (B, 1), generator=g)
    m[2] = False  # an empty response
    w = torch.rand(B, T, generator=g) + 0.5
    dl, do, da, dm, dw = dtypes
    return lp.to(dl), old.to(do), A.to(da), m.to(dm), None if dw is None else w.to(dw)


def make_actor(mode, agg, counts=(1, None, None), **kw):
    pl = actor_config.PolicyLossConfig(loss_mode=mode, **POLICY_LOSS.get(mode, {}))
    actor = actor_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=pl,
                                     loss_agg_mode=agg, **kw)
    dp, bnt, gbs = counts
    actor.global_batch_info.update(dp_size=dp, batch_num_tokens=bnt, global_batch_size=gbs, loss_scale_factor=None)
    return actor


def wide(t):
    return None if t is None else t.double() if t.is_floating_point() else t


def assert_rounded(ours, want64, what):
    """``ours`` is the float64 value ``want64`` up to fastalign's fp32 math, rounded once to ``ours.dtype``."""
    ulp = torch.finfo(ours.dtype).eps if ours.dtype in (bf16, f16) else 0.0
    assert_close(ours, want64, atol=1e-5, rtol=ulp + 1e-5, what=what)


@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_registered_mode_returns_verls_dtype(mode, dtypes):
    """``fastalign_<mode>`` from verl's registry and verl's ``<mode>``, called as verl's actor calls them, for
    every aggregation and int or tensor counts: the same loss dtype, verl's float64 value at its rounding."""
    lp, old, A, m, w = batch(DTYPES[dtypes], seed=MODES.index(mode))
    n, s = int(m.bool().sum()), int((m.bool().sum(-1) > 0).sum())
    for agg in AGGS:
        for name, counts in COUNTS.items():
            what = f"{mode} {dtypes} {agg} {name}"
            actor = make_actor(mode, agg, counts(n, s))
            kw = dict(response_mask=m, loss_agg_mode=agg, config=actor)
            theirs, _ = core_algos.get_policy_loss_fn(mode)(old_log_prob=old, log_prob=lp, advantages=A,
                                                            rollout_is_weights=w, **kw)
            theirs64, _ = core_algos.get_policy_loss_fn(mode)(old_log_prob=wide(old), log_prob=wide(lp),
                                                              advantages=wide(A), rollout_is_weights=wide(w), **kw)
            ours, _ = core_algos.get_policy_loss_fn(plugin.PREFIX + mode)(old_log_prob=old, log_prob=lp,
                                                                          advantages=A, rollout_is_weights=w, **kw)
            assert ours.dtype == theirs.dtype, f"{what}: {ours.dtype} != verl's {theirs.dtype}"
            assert_rounded(ours, theirs64, what)


def verl_actor_loss(actor, lp, old, A, m, H, ref):
    """verl's actor loss as ``verl.workers.utils.losses.ppo_loss`` composes it: the mask cast to bool, the entropy
    and KL terms added to the mode's loss in place."""
    mask = m.to(bool)
    loss, _ = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)(
        old_log_prob=old, log_prob=lp, advantages=A, response_mask=mask, loss_agg_mode=actor.loss_agg_mode,
        config=actor)
    ent = core_algos.agg_loss(loss_mat=H, loss_mask=mask, loss_agg_mode=actor.loss_agg_mode,
                              **actor.global_batch_info)
    loss -= actor.entropy_coeff * ent
    kld = core_algos.kl_penalty(logprob=lp, ref_logprob=ref, kl_penalty=actor.kl_loss_type)
    loss += core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=actor.loss_agg_mode,
                                **actor.global_batch_info) * actor.kl_loss_coef
    return loss


#: (log-probs, old, advantages, mask, entropy and reference log-probs) dtypes of the actor loss
ACTOR_DTYPES = {
    "bf16": (bf16, bf16, bf16, torch.bool, bf16),
    "bf16_fp32_mask": (bf16, bf16, bf16, f32, bf16),  # verl's actor casts the mask to bool
    "bf16_f64_mask": (bf16, bf16, bf16, f64, bf16),
    "fp16_fp32_terms": (f16, f16, f16, torch.bool, f32),
    "fp32_f64_terms": (f32, f32, f32, torch.bool, f64),  # added in place: the policy term's fp32
    "f64": (f64, f64, f64, torch.bool, f64),
    "bf16_f64_advantages": (bf16, bf16, f64, torch.bool, bf16),
}


@pytest.mark.parametrize("dtypes", sorted(ACTOR_DTYPES))
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "sapo", "geo_mean", "dppo_kl", "gpg"])
def test_actor_loss_returns_verls_dtype(mode, dtypes):
    """:class:`VerlPolicyLoss` with its entropy and KL terms: the dtype of verl's actor loss, whose terms the
    policy term's dtype absorbs, and verl's float64 value at that rounding."""
    dl, do, da, dm, dt = ACTOR_DTYPES[dtypes]
    lp, old, A, m, _ = batch((dl, do, da, dm, None), seed=7 + MODES.index(mode))
    g = torch.Generator().manual_seed(1)
    H = (torch.rand(lp.shape, generator=g) * 3.0).to(dt)
    ref = (lp.float() + torch.randn(lp.shape, generator=g) * 0.3).to(dt)
    for agg in ("token-mean", "seq-mean-token-mean"):
        what = f"{mode} {dtypes} {agg}"
        opts = dict(entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05)
        theirs = verl_actor_loss(make_actor(mode, agg, **opts), lp, old, A, m, H, ref)
        theirs64 = verl_actor_loss(make_actor(mode, agg, **opts), *map(wide, (lp, old, A, m, H, ref)))
        ours, _ = VerlPolicyLoss(make_actor(mode, agg, **opts))(lp, old, A, m, entropy=H, ref_log_prob=ref)
        assert ours.dtype == theirs.dtype, f"{what}: {ours.dtype} != verl's {theirs.dtype}"
        assert_rounded(ours, theirs64, what)


def test_bf16_loss_is_differentiable():
    """The bf16 loss (gspo, token-mean) carries the gradient: d(log_prob) in bf16, the fp32 gradient rounded once."""
    lp, old, A, m, _ = batch(DTYPES["bf16"], seed=3)
    actor = make_actor("gspo", "token-mean")
    x, x64 = lp.clone().requires_grad_(), wide(lp).requires_grad_()
    ours, _ = VerlPolicyLoss(actor, policy_term_only=True)(x, old, A, m)
    want, _ = core_algos.get_policy_loss_fn("gspo")(old_log_prob=wide(old), log_prob=x64, advantages=wide(A),
                                                    response_mask=m, loss_agg_mode="token-mean", config=actor)
    assert ours.dtype == bf16
    ours.backward()
    want.backward()
    assert x.grad.dtype == bf16
    assert_rounded(x.grad, x64.grad, "d log_prob")
