"""LinearPolicyLoss: linear_logprobs + policy_loss (two passes) and the single pass over blocks of whole
sequences each equal PolicyLoss on explicitly built logits."""
from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign.reference.linear import linear_logits
from helpers import assert_close

B, T, H, V = 3, 7, 16, 97


def make(seed=0, ignore=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        labels[0, 2] = -100
        labels[2, -1] = -100
    with torch.no_grad():
        lp0 = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = lp0 + torch.randn(B, T, generator=g) * 0.3
    ref = lp0 + torch.randn(B, T, generator=g) * 0.3
    A = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.2
    m[:, 0] = True
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, old=old, ref=ref, A=A, m=m)


def explicit(d, config, *, temperature=1.0, softcap=None, logit_scale=1.0, use_bias=True, ent=True):
    """PolicyLoss on materialised logits (torch autograd through log_softmax): the oracle."""
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    z = linear_logits(h, w, bias=d["bias"] if use_bias else None, softcap=softcap, logit_scale=logit_scale) / temperature
    logp = torch.log_softmax(z, -1)
    valid = d["labels"] != -100
    lp = logp.gather(-1, d["labels"].clamp(min=0)[..., None])[..., 0]
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    H_ = -(logp.exp() * logp).sum(-1)
    extra = {"entropy": H_} if ent else {}
    loss, met = fastalign.PolicyLoss(**config)(lp, d["old"], d["A"], d["m"] & valid, ref_logprobs=d["ref"], **extra)
    loss.backward()
    return loss, met, h.grad, w.grad


def fused(d, config, backend, *, use_bias=True, single_pass="auto", **call):
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    mod = fastalign.LinearPolicyLoss(backend=backend, single_pass=single_pass, **config)
    loss, met = mod(h, w, d["labels"], d["old"], d["A"], d["m"], bias=d["bias"] if use_bias else None,
                    ref_logprobs=d["ref"], **call)
    loss.backward()
    return loss, met, h.grad, w.grad


def compare(out, ref, metrics_keys=None):
    loss, met, gh, gw = out
    rloss, rmet, rgh, rgw = ref
    assert loss.dim() == 0
    assert_close(loss, rloss, atol=2e-5, rtol=2e-5, what="loss")
    keys = metrics_keys if metrics_keys is not None else rmet.keys()
    assert set(keys) == set(met.keys())
    for k in keys:
        assert_close(met[k], rmet[k], atol=2e-5, rtol=2e-5, what=k)
    assert_close(gh, rgh, atol=2e-5, rtol=1e-4, what="d hidden")
    assert_close(gw, rgw, atol=2e-5, rtol=1e-4, what="d weight")


PATHS = pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])


@PATHS
@pytest.mark.parametrize("loss_type", ["ppo", "grpo", "kl_cov"])
def test_matches_policy_loss_on_logits(cpu_backend, loss_type, single_pass):
    d = make(seed=1)
    cfg = dict(loss_type=loss_type, kl_coef=0.05, entropy_coef=0.01)
    if loss_type == "kl_cov":
        cfg["cov_ratio"] = 0.1  # KL-Cov has no clip range
        if single_pass:
            with pytest.raises(ValueError, match="single_pass=True does not apply: loss_type 'kl_cov'"):
                fused(d, cfg, cpu_backend, single_pass=True)
            return
    else:
        cfg["eps_high"] = 0.28
    compare(fused(d, cfg, cpu_backend, single_pass=single_pass), explicit(d, cfg))


@PATHS
def test_logit_options_and_ignore_index(cpu_backend, single_pass):
    d = make(seed=2, ignore=True)
    cfg = dict(loss_type="ppo", kl_coef=0.1, entropy_coef=0.02, agg="seq-mean-token-mean")
    opts = dict(temperature=0.7, softcap=3.0, logit_scale=1.3)
    compare(fused(d, {**cfg, **opts}, cpu_backend, single_pass=single_pass), explicit(d, cfg, **opts))


@PATHS
def test_custom_ignore_index_drops_its_tokens_from_the_mask(cpu_backend, single_pass):
    """``ignore_index=-1``: tokens labelled -1 leave the mask (counts, loss, metrics, gradients) exactly as
    tokens labelled -100 do under the default."""
    d = make(seed=5, ignore=True)
    cfg = dict(loss_type="ppo", kl_coef=0.1, entropy_coef=0.02, agg="token-mean")
    relabelled = dict(d, labels=d["labels"].masked_fill(d["labels"] == -100, -1))
    compare(fused(relabelled, {**cfg, "ignore_index": -1}, cpu_backend, single_pass=single_pass), explicit(d, cfg))


def test_low_rank_head_equals_widened_head(cpu_backend):
    """A LoRA lm_head as the low-rank term (a, L): the loss, metrics and gradients of a and L equal the
    oracle on the widened head [h, a] [W, L]^T."""
    d = make(seed=4, ignore=True)
    g = torch.Generator().manual_seed(9)
    a, lw = torch.randn(B, T, 3, generator=g), torch.randn(V, 3, generator=g) * 0.3
    cfg = dict(loss_type="grpo", eps_high=0.28, kl_coef=0.05, entropy_coef=0.01)
    a_, l_ = a.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    loss, met = fastalign.LinearPolicyLoss(backend=cpu_backend, **cfg)(
        d["hidden"], d["weight"], d["labels"], d["old"], d["A"], d["m"], bias=d["bias"], low_rank=(a_, l_),
        ref_logprobs=d["ref"])
    loss.backward()
    wide = dict(d, hidden=torch.cat([d["hidden"], a], -1), weight=torch.cat([d["weight"], lw], 1))
    rloss, rmet, gh, gw = explicit(wide, cfg)
    compare((loss, met, a_.grad, l_.grad), (rloss, rmet, gh[..., H:], gw[:, H:]))  # the a and L columns


def test_entropy_only_when_used(cpu_backend, monkeypatch):
    d = make(seed=3)
    seen = []
    orig = fastalign.linear_policy.linear_logprobs

    def spy(*a, **kw):
        seen.append(kw["entropy"])
        return orig(*a, **kw)

    monkeypatch.setattr(fastalign.linear_policy, "linear_logprobs", spy)
    cfg = dict(loss_type="ppo", kl_coef=0.05)
    out = fused(d, cfg, cpu_backend, use_bias=False, single_pass=False)
    # bonus off: no entropy computed, no entropy metric, loss equals PolicyLoss without entropy
    compare(out, explicit(d, cfg, use_bias=False, ent=False))
    assert seen == [False] and "entropy" not in out[1]
    out_on = fused(d, {**cfg, "entropy_coef": 0.05}, cpu_backend, use_bias=False, single_pass=False)
    compare(out_on, explicit(d, {**cfg, "entropy_coef": 0.05}, use_bias=False))
    assert seen[-1] is True and "entropy" in out_on[1]
    assert not torch.allclose(out[0], out_on[0])  # the bonus changes the loss
    # metric only: entropy computed, loss unchanged
    out_m = fused(d, cfg, cpu_backend, use_bias=False, single_pass=False, entropy_metric=True)
    assert seen[-1] is True and "entropy" in out_m[1]
    assert torch.equal(out_m[0], out[0])
    assert_close(out_m[1]["entropy"], out_on[1]["entropy"], atol=1e-6, what="entropy metric")


def test_no_vocab_sized_tensor_in_forward(monkeypatch):
    """The step goes through linear_logprobs (chunked) and never builds [N, V] logits itself."""
    d = make(seed=4)
    calls = []
    orig = fastalign.linear_policy.linear_logprobs
    monkeypatch.setattr(fastalign.linear_policy, "linear_logprobs",
                        lambda *a, **kw: calls.append(kw.get("chunk")) or orig(*a, **kw))
    mod = fastalign.LinearPolicyLoss(loss_type="ppo", backend="cpp", chunk=(5, 32))
    loss, _ = mod(d["hidden"], d["weight"], d["labels"], d["old"], d["A"], d["m"])
    assert calls == [(5, 32)] and torch.isfinite(loss)


def test_bad_inputs():
    d = make(seed=5)
    mod = fastalign.LinearPolicyLoss(loss_type="ppo", backend="cpp")
    args = [d["hidden"], d["weight"], d["labels"], d["old"], d["A"], d["m"]]
    with pytest.raises(ValueError, match="loss_type"):
        fastalign.LinearPolicyLoss(loss_type="nope")
    with pytest.raises(ValueError, match="entropy"):
        fastalign.LinearPolicyLoss(entropy=d["old"])
    with pytest.raises(ValueError, match="hidden"):
        mod(d["hidden"][:, :-1], *args[1:])
    with pytest.raises(ValueError, match="weight"):
        mod(d["hidden"], d["weight"][:, :-1], *args[2:])
    with pytest.raises(TypeError, match="labels"):
        mod(d["hidden"], d["weight"], d["labels"].float(), *args[3:])
    with pytest.raises(ValueError, match="response_mask"):
        mod(*args[:5], d["m"][:, :-1])
    with pytest.raises(ValueError, match="old_logprobs"):
        mod(*args[:3], d["old"][:, :-1], *args[4:])
    with pytest.raises(ValueError, match="ref_logprobs"):
        fastalign.LinearPolicyLoss(kl_coef=0.1, backend="cpp")(*args)
    with pytest.raises(ValueError, match="temperature"):
        mod(*args, temperature=0.0)
    assert "ppo" in repr(mod)
