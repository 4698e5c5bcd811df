"""Run every public op once from an installed fastalign (not the source tree).

Used by tools/wheel_check.sh inside a fresh venv, from an empty directory: each op
runs forward (and backward where it has one) on tiny CPU tensors, and the ones
with a float64 reference in ``fastalign.reference`` are compared with it.
"""
import os
import sys

import torch

import fastalign as fa
from fastalign import reference as ref

here = os.path.dirname(os.path.abspath(fa.__file__))
assert "site-packages" in here or os.environ.get("FASTALIGN_SMOKE_SOURCE") == "1", f"fastalign imported from {here}, not from the installed wheel"
torch.manual_seed(0)
ran = []


def close(a, b, what, tol=1e-4):
    err = (a.double() - b.double()).abs().max().item()
    assert err < tol, f"{what}: max error {err:.3g}"


def op(name):
    def wrap(fn):
        fn()
        ran.append(name)
        return fn
    return wrap


B, T, H, V = 4, 6, 16, 40
mask = torch.ones(B, T)
mask[:, -2:] = 0


@op("token_logprobs")
def _():
    x = torch.randn(B * T, V, requires_grad=True)
    y = torch.randint(0, V, (B * T,))
    st = fa.token_logprobs(x, y, entropy=True, sum_p2=True, argmax=True)
    (st.logprobs.sum() + st.entropy.sum()).backward()
    want_lp, want_ent, _, _ = ref.logprobs.token_logprobs(x.detach(), y, dtype=torch.float64)
    close(st.logprobs, want_lp, "token_logprobs")
    close(st.entropy, want_ent, "entropy")
    assert torch.isfinite(x.grad).all()


@op("linear_logprobs")
def _():
    h = torch.randn(B * T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (B * T,))
    st = fa.linear_logprobs(h, w, y, entropy=True)
    st.logprobs.sum().backward()
    close(st.logprobs, torch.log_softmax(h.detach().double() @ w.detach().double().T, -1).gather(-1, y[:, None])[:, 0],
          "linear_logprobs")
    assert torch.isfinite(w.grad).all()


@op("token_divergence")
def _():
    zs = torch.randn(B * T, V, requires_grad=True)
    zt = torch.randn(B * T, V)
    y = torch.randint(0, V, (B * T,))
    out = fa.token_divergence(zs, zt, y, divergence="tvd")
    (out.divergence.sum() + out.nll.sum()).backward()
    close(out.divergence, ref.divergence.total_variation(zs.detach(), zt), "token_divergence")
    assert torch.isfinite(zs.grad).all()


@op("elementwise_divergence")
def _():
    x = torch.randn(B * T, V).log_softmax(-1).requires_grad_(True)
    y = torch.randn(B * T, V).log_softmax(-1)
    out = fa.elementwise_divergence(x, y, divergence="jsd", beta=0.3)
    out.sum().backward()
    close(out, ref.divergence.elementwise_terms(x.detach(), y, divergence="jsd", beta=0.3).sum(-1),
          "elementwise_divergence")
    assert torch.isfinite(x.grad).all()


@op("linear_divergence_loss")
def _():
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    ht, wt = torch.randn(B, T, H + 4), torch.randn(V, H + 4)
    loss, metrics = fa.linear_divergence_loss(h, w, ht, wt, beta=0.5, response_mask=mask)
    loss.backward()
    want, _ = ref.divergence.linear_divergence_loss(h.detach(), w.detach(), ht, wt, beta=0.5, response_mask=mask)
    close(loss, want, "linear_divergence_loss")
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


@op("linear_topk_logprobs")
def _():
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    top = fa.linear_topk_logprobs(h, w, 3, response_mask=mask)
    top.logprobs.sum().backward()
    want, ids = ref.linear.linear_topk_logprobs(h.detach(), w.detach(), 3, dtype=torch.float64)
    keep = mask != 0
    assert torch.equal(top.ids[keep], ids[keep])
    close(top.logprobs[keep], want[keep], "linear_topk_logprobs")
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


@op("linear_mean_logits")
def _():
    h, w, b = torch.randn(B, T, H), torch.randn(V, H), torch.randn(V)
    z = h.double() @ w.double().T + b.double()
    for softcap, want in ((None, 0.5 * z), (2.0, 2.0 * torch.tanh(0.5 * z / 2.0))):
        got = fa.linear_mean_logits(h, w, bias=b, logit_scale=0.5, softcap=softcap, response_mask=mask)
        close(got, torch.where(mask != 0, want.mean(-1), 0.0), f"linear_mean_logits softcap={softcap}")


@op("linear_soft_cross_entropy")
def _():
    h, w = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    q = torch.softmax(torch.randn(B, T, V), -1)
    got = fa.linear_soft_cross_entropy(h, w, q, temperature=0.8, row_weights=mask)
    got.backward()
    want = -(q.double() * torch.log_softmax(h.detach().double() @ w.detach().double().T / 0.8, -1)).sum(-1)
    close(got, (mask * want).sum(), "linear_soft_cross_entropy")
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


lp = (torch.randn(B, T) - 2).requires_grad_()
old, refl = lp.detach() + 0.1 * torch.randn(B, T), lp.detach() + 0.1 * torch.randn(B, T)
adv = torch.randn(B, 1).expand(B, T)


@op("policy_loss")
def _():
    for loss_type in ("ppo", "grpo", "gspo", "cispo", "clip_cov", "kl_cov"):
        loss, metrics = fa.policy_loss(lp, old, adv, mask, loss_type=loss_type, ref_logprobs=refl, kl_coef=0.01)
        loss.backward()
        assert torch.isfinite(loss) and all(v.dim() == 0 for v in metrics.values()), loss_type


@op("PolicyLoss")
def _():
    loss, _ = fa.PolicyLoss(loss_type="dapo")(lp, old, adv, mask)
    loss.backward()


@op("PolicyConfig")
def _():
    cfg = fa.PolicyConfig(loss_type="grpo", eps_high=0.28)
    loss, _ = fa.policy_loss(lp, old, adv, mask, config=cfg)
    want, _ = fa.policy_loss(lp, old, adv, mask, loss_type="grpo", eps_high=0.28)
    assert torch.equal(loss, want)


@op("LinearPolicyLoss")
def _():
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    loss, _ = fa.LinearPolicyLoss(loss_type="grpo", kl_coef=1e-3)(h, w, torch.randint(0, V, (B, T)), old, adv, mask,
                                                                  ref_logprobs=refl)
    loss.backward()
    assert torch.isfinite(h.grad).all()


@op("kl_penalty")
def _():
    for kind in ("k1", "k2", "k3", "abs"):
        close(fa.kl_penalty(lp.detach(), refl, kind), ref.policy.kl_penalty(lp.detach().double(), refl.double(), kind),
              f"kl_penalty {kind}")


@op("aggregate_loss")
def _():
    x = torch.randn(B, T)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        close(fa.aggregate_loss(x, mask, agg), ref.policy.aggregate_loss(x.double(), mask.double(), agg), agg)


scores, groups = torch.randn(8), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


@op("group_advantages")
def _():
    for est in ("grpo", "rloo"):
        close(fa.group_advantages(scores, groups, estimator=est),
              ref.advantages.group_advantages(scores.double(), groups, estimator=est), est)


@op("token_advantages")
def _():
    assert fa.token_advantages(scores[:B], mask).shape == (B, T)


@op("masked_whiten")
def _():
    close(fa.masked_whiten(old, mask), ref.advantages.masked_whiten(old.double(), mask.double()), "masked_whiten")


r = torch.randn(B, T)


@op("reinforce_pp_advantages")
def _():
    close(fa.reinforce_pp_advantages(r, mask), ref.advantages.reinforce_pp_advantages(r.double(), mask.double()),
          "reinforce_pp")


@op("remax_advantages")
def _():
    base = torch.randn(B)
    close(fa.remax_advantages(r, mask, base), ref.advantages.remax_advantages(r.double(), mask.double(), base.double()),
          "remax")


@op("gae_advantages")
def _():
    v = torch.randn(B, T)
    a, ret = fa.gae_advantages(r, v, mask, gamma=0.99, lam=0.95)
    wa, wret = ref.advantages.gae_advantages(r.double(), v.double(), mask.double(), 0.99, 0.95)
    close(a, wa, "gae advantages")
    close(ret, wret, "gae returns")


@op("implicit_process_advantages")
def _():
    assert torch.isfinite(fa.implicit_process_advantages(lp.detach(), refl, mask)).all()


@op("optimal_token_baseline_advantages")
def _():
    index = torch.tensor([0, 0, 1, 1])
    p = torch.rand(B, T) * 0.9 + 0.05  # the sampled token's old probability; sum_v p_v^2 >= p^2
    old, sp2 = p.log(), p * p + 0.3 * (1 - p) ** 2
    a, g = fa.optimal_token_baseline_advantages(r, mask, index, old, sp2)
    wa, wg = ref.advantages.optimal_token_baseline_advantages(r.double(), mask.double(), index, old.double(),
                                                              sp2.double())
    close(a, wa, "optimal token baseline advantages")
    close(g, wg, "optimal token baseline returns")


@op("iw_opd_advantages")
def _():
    lt = -torch.rand(B, T) * 3
    close(fa.iw_opd_advantages(lt, old, mask, gamma=0.7), ref.advantages.iw_opd_advantages(lt, old, mask, 0.7),
          "iw_opd advantages")


chosen, rejected = torch.randn(B, requires_grad=True), torch.randn(B, requires_grad=True)
ref_c, ref_r = torch.randn(B), torch.randn(B)


@op("preference_loss")
def _():
    for loss_type in ("sigmoid", "hinge", "robust", "apo_zero"):
        loss, _ = fa.preference_loss(chosen, rejected, ref_c, ref_r, loss_type=loss_type)
        loss.backward()
        assert torch.isfinite(loss), loss_type


@op("PreferenceLoss")
def _():
    loss, _ = fa.PreferenceLoss("sigmoid", beta=0.1)(chosen, rejected, ref_c, ref_r)
    loss.backward()


@op("unpaired_preference_loss")
def _():
    lp_u = torch.randn(B, requires_grad=True)
    desirable = torch.tensor([True, False, True, True])
    loss, _ = fa.unpaired_preference_loss(lp_u, ref_c, desirable, loss_type="kto")
    want, _ = ref.preference.unpaired_loss(lp_u.detach().double(), ref_c.double(), desirable)
    close(loss, want, "unpaired preference loss")
    loss.backward()


@op("LinearPreferenceLoss")
def _():
    h = torch.randn(2 * B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, :2] = -100
    loss, metrics = fa.LinearPreferenceLoss("sigmoid", beta=0.1)(h, w, labels, ref_chosen_logprobs=ref_c,
                                                                ref_rejected_logprobs=ref_r)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()


@op("sequence_logprobs")
def _():
    s = fa.sequence_logprobs(lp.detach(), mask)
    close(s.sum, (lp.detach() * mask).sum(-1), "sequence_logprobs")


@op("wpo_weights")
def _():
    assert torch.isfinite(fa.wpo_weights(torch.randn(B), torch.randn(B))).all()


@op("AdvantagesAndReturns")
def _():
    out = fa.gae_advantages(torch.randn(B, T), torch.randn(B, T), mask)
    assert isinstance(out, fa.AdvantagesAndReturns) and out.advantages.shape == out.returns.shape == (B, T)


@op("SharedSeed")
def _():
    seed = fa.SharedSeed(torch.Generator().manual_seed(3), None)  # no group: the generator's own draw
    again = fa.SharedSeed(torch.Generator().manual_seed(3), None)
    a, _ = fa.policy_loss(lp.detach(), old, adv, mask, loss_type="clip_cov", cov_ratio=0.5, generator=seed)
    b, _ = fa.policy_loss(lp.detach(), old, adv, mask, loss_type="clip_cov", cov_ratio=0.5, generator=again)
    assert torch.equal(a, b)


@op("OptionError")
def _():
    try:
        fa.PolicyConfig(loss_type="ppo", eps_low=-0.1)
    except fa.OptionError as e:
        assert e.option == "eps_low" and isinstance(e, ValueError), e
    else:
        raise AssertionError("PolicyConfig(eps_low=-0.1) did not raise OptionError")


@op("RenamedWarning")
def _():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fa.kl_penalty(lp.detach(), refl, clamp=False)
    assert any(issubclass(w.category, fa.RenamedWarning) for w in caught), [w.category for w in caught]
    assert torch.equal(got, fa.kl_penalty(lp.detach(), refl, kl_clamp=False))


@op("info")
def _():
    report = fa.info()
    assert "error" not in report["compiled"], report["compiled"]


public = {n for n in fa.__all__
          if n not in ("TokenStats", "TokenDivergence", "SequenceLogprobs", "TopKSupport", "POLICY_LOSS_TYPES", "PREFERENCE_LOSS_TYPES",
                       "use_backend")}
missing = sorted(public - set(ran))
assert not missing, f"public ops not run: {missing}"
print(f"ran {len(ran)} public ops from {here}: {', '.join(ran)}")
sys.exit(0)
