"""policy_loss, kl_penalty and aggregate_loss against the float64 reference (docs/math.md#kl-estimators to #aggregation),
on the C++ kernels and on the Triton kernel in the interpreter."""
import math
import os
import sys

import pytest
import torch

import fastalign
from fastalign import reference
from fastalign.aggregate import counts_read
from fastalign.ops import policy_loss as ops
from helpers import assert_close, rank_body

LOSS_TYPES = ["ppo", "gspo", "cispo", "sapo", "reinforce", "gmpo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl"]


def make_batch(B=5, T=23, seed=0, dtype=torch.float32, spread=0.3, mask_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * spread + torch.randn(B, 1, generator=g) * spread
    A = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > mask_frac
    m[:, 0] = True
    ref = lp + torch.randn(B, T, generator=g) * 0.5
    H = torch.rand(B, T, generator=g) * 3.0
    roll = old + torch.randn(B, T, generator=g) * 0.4
    return {k: (v.to(dtype) if v.is_floating_point() else v)
            for k, v in dict(lp=lp, old=old, A=A, m=m, ref=ref, H=H, roll=roll).items()}


def run(batch, backend, *, with_ref=True, with_ent=True, with_roll=None, cov_ratio=None, **kw):
    """(loss, metrics, d lp, d H) from fastalign and from the reference in float64."""
    d = batch
    x = d["lp"].clone().requires_grad_(True)
    h = d["H"].clone().requires_grad_(True)
    extra = {}
    if with_ref:
        extra["ref_logprobs"] = d["ref"]
    if with_ent:
        extra["entropy"] = h
    with_roll = bool(kw.get("rollout_correction")) if with_roll is None else with_roll
    if with_roll:
        extra["rollout_logprobs"] = d["roll"]
    lt = kw.get("loss_type", "ppo")
    fa_kw = dict(kw)
    if cov_ratio is not None:
        fa_kw["cov_ratio"] = cov_ratio
    loss, met = fastalign.policy_loss(x, d["old"], d["A"], d["m"], backend=backend, **fa_kw, **extra)
    loss.backward()

    xr = d["lp"].double().requires_grad_(True)
    hr = d["H"].double().requires_grad_(True)
    rextra = {}
    if with_ref:
        rextra["ref_logprobs"] = d["ref"].double()
    if with_ent:
        rextra["entropy"] = hr
    if with_roll:
        rextra["rollout_logprobs"] = d["roll"].double()
    sel = None
    if lt in ("clip_cov", "kl_cov"):
        sel = reference.policy.cov_selection(
            d["lp"].double(), d["old"].double(), d["A"].double(), d["m"], loss_type=lt,
            eps_low=kw.get("eps_low", 0.2), eps_high=kw.get("eps_high", 0.2), ratio=cov_ratio,
            lb=kw.get("cov_lb", 1.0), ub=kw.get("cov_ub", 5.0))
    rkw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
           if k not in ("cov_lb", "cov_ub")}
    presets = {"vanilla": ("ppo", None, None), "grpo": ("ppo", "seq-mean-token-mean", None),
               "bnpo": ("ppo", "token-mean", None), "dr_grpo": ("ppo", "seq-mean-token-sum-norm", None),
               "dapo": ("ppo", "token-mean", None), "geo_mean": ("gmpo", None, None), "gpg": ("reinforce", None, None),
               "luspo": ("ppo", "seq-mean-token-sum", "all")}
    if lt in presets:
        rkw["loss_type"], preset_agg, preset_count = presets[lt]
        if rkw.get("agg") is None:
            rkw["agg"] = preset_agg
        if preset_count is not None:
            rkw.setdefault("seq_count", preset_count)
    rloss, rmet = reference.policy_loss(xr, d["old"].double(), d["A"].double(), d["m"], cov_selected=sel,
                                        **rkw, **rextra)
    rloss.backward()
    return (loss, met, x.grad, h.grad), (rloss, rmet, xr.grad, hr.grad if with_ent else None)


def check(out, ref, *, tol=1e-5, gtol=1e-6):
    loss, met, g, gh = out
    rloss, rmet, rg, rgh = ref
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, rloss, atol=tol, rtol=tol, what="loss")
    for k, v in rmet.items():
        assert k in met, k
        assert met[k].dim() == 0 and met[k].device == loss.device
        assert_close(met[k], v, atol=tol, rtol=tol, what=f"metric {k}")
    assert_close(g, rg, atol=gtol, rtol=1e-4, what="d logprobs")
    if rgh is not None:
        if gh is None:
            gh = torch.zeros_like(rgh)
        assert_close(gh, rgh, atol=gtol, rtol=1e-4, what="d entropy")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_match_reference(cpu_backend, loss_type):
    batch = make_batch(seed=1)
    kw = dict(loss_type=loss_type, kl_coef=0.05, entropy_coef=0.01)
    if loss_type == "ppo":
        kw.update(dual_clip=3.0, eps_high=0.28)
    if loss_type.startswith("dppo"):
        kw.update(eps_low=0.05, eps_high=0.05, delta=1.2)
    cov = 1.0 if loss_type in ("clip_cov", "kl_cov") else None
    if loss_type == "kl_cov":
        cov = 0.1
    out, ref = run(batch, cpu_backend, cov_ratio=cov, **kw)
    check(out, ref)
    if loss_type in ("ppo", "gspo", "clip_cov"):
        assert 0 < float(out[1]["clipfrac"]) < 1  # the data exercise the clip
    if loss_type in ("clip_cov", "kl_cov"):
        assert float(out[1]["cov_selected_frac"]) > 0


@pytest.mark.parametrize("preset", ["grpo", "bnpo", "dr_grpo", "dapo", "gpg", "geo_mean", "vanilla"])
def test_trl_presets(preset):
    out, ref = run(make_batch(seed=2), "cpp", loss_type=preset, kl_coef=0.02)
    check(out, ref)


def test_ppo_options_delta_dual_clip_clip_higher(cpu_backend):
    batch = make_batch(seed=3, spread=1.0)
    out, ref = run(batch, cpu_backend, loss_type="ppo", eps_low=0.2, eps_high=0.28, delta=1.5)
    check(out, ref)
    assert float(out[1]["clipfrac"]) > 0
    out, ref = run(batch, cpu_backend, loss_type="ppo", eps_low=0.2, eps_high=0.28, dual_clip=2.0)
    check(out, ref)
    assert float(out[1]["clipfrac_lower"]) > 0


@pytest.mark.parametrize("kl_type", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3+", "k1+", "abs+"])
def test_kl_terms(cpu_backend, kl_type):
    out, ref = run(make_batch(seed=4), cpu_backend, kl_type=kl_type, kl_coef=0.3, with_ent=False)
    check(out, ref)


def test_kl_rho_and_unclamped_k3(cpu_backend):
    batch = make_batch(seed=5)
    batch["ref"][0, :3] = batch["lp"][0, :3] + 25.0  # the clamps matter here
    check(*run(batch, cpu_backend, kl_type="k3", kl_coef=0.3, kl_rho=True, with_ent=False))
    check(*run(batch, cpu_backend, kl_type="k3", kl_coef=0.3, kl_clamp=False, with_ent=False), tol=1e-4)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"])
@pytest.mark.parametrize("loss_type", ["ppo", "gmpo"])
def test_rollout_correction(cpu_backend, mode, loss_type):
    batch = make_batch(seed=6, T=9)
    batch["roll"] = batch["old"] + torch.randn(batch["old"].shape, generator=torch.Generator().manual_seed(0)) * 0.1
    out, ref = run(batch, cpu_backend, loss_type=loss_type, rollout_correction=mode, rollout_min=0.8,
                   rollout_max=1.1, with_ref=False)
    check(out, ref)


@pytest.mark.parametrize("loss_type", ["ppo", "gmpo", "cispo"])
def test_entropy_quantile_and_offpolicy_mask(cpu_backend, loss_type):
    batch = make_batch(seed=7, spread=0.5)
    out, ref = run(batch, cpu_backend, loss_type=loss_type, entropy_quantile=0.3, offpolicy_threshold=0.05,
                   entropy_coef=0.02)
    check(out, ref)


def test_kl_estimators_are_unbiased_and_have_their_gradients():
    """Independent of any transcription of docs/math.md#kl-estimators: under y ~ pi, E[k1] = E[k3] = KL(pi || ref)
    exactly (summing over the whole vocabulary); E[k2] = E[(log pi/ref)^2] / 2; and the
    per-token gradients are d k1 = 1, d k2 = lp - ref, d k3 = 1 - exp(ref - lp)."""
    g = torch.Generator().manual_seed(40)
    lp = torch.log_softmax(torch.randn(6, 50, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(6, 50, generator=g, dtype=torch.float64), -1)
    p = lp.exp()
    kl = (p * (lp - ref)).sum(-1)
    for kind, want in (("k1", kl), ("k3", kl), ("k2", 0.5 * (p * (lp - ref) ** 2).sum(-1))):
        v = fastalign.kl_penalty(lp.float(), ref.float(), kind, kl_clamp=False).double()
        assert_close((p * v).sum(-1), want, atol=1e-5, rtol=1e-5, what=f"E[{kind}]")
    x = lp.float().requires_grad_(True)
    for kind, grad in (("k1", torch.ones_like(lp)), ("k2", lp - ref), ("k3", 1.0 - torch.exp(ref - lp)),
                       ("k3+", lp - ref), ("abs", torch.sign(lp - ref))):
        (gx,) = torch.autograd.grad(fastalign.kl_penalty(x, ref.float(), kind, kl_clamp=False).sum(), x)
        assert_close(gx.double(), grad, atol=1e-5, rtol=1e-5, what=f"d {kind}")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("globals_", [False, True])
def test_aggregations(cpu_backend, agg, globals_):
    batch = make_batch(seed=8)
    batch["m"][2] = False  # an empty row
    kw = dict(counts_read(agg, global_tokens=300, global_seqs=11), dp_size=4) if globals_ else {}
    check(*run(batch, cpu_backend, agg=agg, kl_coef=0.1, entropy_coef=0.01, **kw))


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_a_count_the_aggregation_does_not_read_raises(agg):
    """token-mean divides by global_tokens, the seq-mean modes by global_seqs, token-sum by neither: the
    other count would be silently ignored, so it raises, in policy_loss and aggregate_loss alike."""
    batch = make_batch(seed=3)
    unread = [k for k in ("global_tokens", "global_seqs") if k not in counts_read(agg, 300, 11)]
    assert unread
    for name in unread:
        with pytest.raises(ValueError, match=f"{name} does not apply to agg"):
            fastalign.policy_loss(batch["lp"], batch["old"], batch["A"], batch["m"], agg=agg, **{name: 5})
        with pytest.raises(ValueError, match=f"{name} does not apply to agg"):
            fastalign.aggregate_loss(batch["lp"], batch["m"], agg, **{name: 5})


def test_clip_boundaries_exact(cpu_backend):
    # rho = 1 exactly with eps = 0: the clip bounds equal rho, the gradient passes (inclusive clamp)
    B, T = 2, 8
    lp = -torch.rand(B, T)
    A = torch.randn(B, T)
    m = torch.ones(B, T, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, lp, A, m, eps_low=0.0, eps_high=0.0, backend=cpu_backend)
    loss.backward()
    assert_close(x.grad, -A / (B * T), atol=1e-7, what="grad at rho = 1 - eps = 1 + eps")
    assert float(met["clipfrac"]) == 0.0
    # just inside / just outside 1 +/- eps
    eps = 0.2
    l = torch.tensor([[math.log(1 + eps) - 1e-3, math.log(1 + eps) + 1e-3, math.log(1 - eps) + 1e-3,
                       math.log(1 - eps) - 1e-3]])
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros_like(l)
    x = l.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, old, A, torch.ones_like(l, dtype=torch.bool), backend=cpu_backend)
    loss.backward()
    rho = l.exp()
    assert_close(x.grad, torch.tensor([[-rho[0, 0] / 4, 0.0, rho[0, 2] / 4, 0.0]]), atol=1e-7, what="grad")
    assert float(met["clipfrac"]) == 0.5


def test_all_masked_rows_and_empty_batches(cpu_backend):
    batch = make_batch(seed=9)
    batch["m"][1] = False
    batch["m"][3] = False
    for agg in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]:
        out, ref = run(batch, cpu_backend, agg=agg, kl_coef=0.1)
        check(out, ref)
        assert torch.all(out[2][1] == 0) and torch.all(out[2][3] == 0)
    for shape in [(0, 7), (3, 0)]:
        x = torch.zeros(shape, requires_grad=True)
        loss, met = fastalign.policy_loss(x, torch.zeros(shape), torch.zeros(shape), torch.ones(shape, dtype=torch.bool),
                                          backend=cpu_backend, agg="seq-mean-token-mean")
        loss.backward()
        # min / max over sequences are NaN when there is no non-empty sequence; nothing else is
        assert float(loss.detach()) == 0.0
        assert not any(torch.isnan(v) for k, v in met.items() if k not in ("clip_low_min", "clip_high_max"))
        assert x.grad.shape == shape
    x = torch.randn(2, 5, requires_grad=True)  # everything masked
    loss, met = fastalign.policy_loss(x, x.detach(), torch.ones(2, 5), torch.zeros(2, 5), backend=cpu_backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(x.grad == 0)


def test_masked_garbage_is_ignored():
    batch = make_batch(seed=10)
    out1, _ = run(batch, "cpp")
    batch2 = {k: v.clone() for k, v in batch.items()}
    for k in ("lp", "old", "A", "ref", "H"):
        batch2[k][~batch["m"]] = float("nan") if k != "lp" else -1e30
    out2, _ = run(batch2, "cpp")
    assert torch.equal(out1[0], out2[0])
    assert torch.equal(out1[2], out2[2])


# ---------------------------------------------------------------- Clip-Cov / KL-Cov selection

def _cov_batch(seed=11, B=6, T=40):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 4.0
    old = lp + torch.randn(B, T, generator=g) * 0.05
    A = torch.randn(B, T, generator=g) * 2.0
    m = torch.rand(B, T, generator=g) > 0.1
    return lp, old, A, m


def _select(lp, old, A, m, loss_type, ratio, generator=None, **kw):
    x = lp.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, old, A, m, loss_type=loss_type, cov_ratio=ratio, generator=generator,
                                      backend="cpp", **kw)
    return met["cov_selected_frac"], loss, x


def test_clip_cov_every_candidate_picked():
    lp, old, A, m = _cov_batch()
    sel = reference.policy.cov_selection(lp, old, A, m, loss_type="clip_cov", eps_low=0.2, eps_high=0.2, ratio=1.0,
                                         lb=1.0, ub=5.0)
    assert sel.sum() > 5
    frac, _, _ = _select(lp, old, A, m, "clip_cov", 1.0)
    assert_close(frac, sel.sum() / m.sum(), atol=0, what="selected fraction")
    sums = ops.cov_sums(lp, A, m.view(torch.uint8), "cpp")
    ours = ops.cov_select(lp, old, A, m.view(torch.uint8), sums, sums[2:3].clone(), torch.tensor([7]), 0, 1.0, 1.0,
                          5.0, 0.2, 0.2, "cpp")
    assert torch.equal(ours.bool(), sel)


def test_clip_cov_random_choice_is_seeded():
    lp, old, A, m = _cov_batch(seed=12, B=20, T=50)
    ratio = 0.01  # n = floor(0.01 * n_valid) < number of candidates
    cand = reference.policy.cov_selection(lp, old, A, m, loss_type="clip_cov", eps_low=0.2, eps_high=0.2, ratio=1.0,
                                          lb=1.0, ub=5.0)
    n_valid = int(m.sum())
    k = max(int(math.floor(ratio * n_valid)), 1)
    assert cand.sum() > k
    mu = m.view(torch.uint8)
    sums = ops.cov_sums(lp, A, mu, "cpp")

    def pick(seed):
        return ops.cov_select(lp, old, A, mu, sums, sums[2:3].clone(), torch.tensor([seed]), 0, ratio, 1.0, 5.0, 0.2,
                              0.2, "cpp").bool()

    s1, s2, s3 = pick(1), pick(1), pick(2)
    assert int(s1.sum()) == k and torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert torch.all(cand[s1]) and torch.all(cand[s3])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    f1, l1, _ = _select(lp, old, A, m, "clip_cov", ratio, generator=g1)
    f2, l2, _ = _select(lp, old, A, m, "clip_cov", ratio, generator=g2)
    assert torch.equal(l1, l2) and float(f1) == pytest.approx(k / n_valid)


def test_kl_cov_top_k_ties_by_lower_index():
    B, T = 3, 8
    lp = torch.full((B, T), -1.0)
    lp[:, ::2] = -3.0  # identical (A, lp) pairs give identical cov: ties
    A = torch.ones(B, T)
    A[:, ::2] = -1.0
    old = lp.clone()
    m = torch.ones(B, T, dtype=torch.bool)
    for ratio in [0.1, 0.25, 0.5]:
        sel = reference.policy.cov_selection(lp, old, A, m, loss_type="kl_cov", eps_low=0.2, eps_high=0.2, ratio=ratio,
                                             lb=1.0, ub=5.0)
        mu = m.view(torch.uint8)
        sums = ops.cov_sums(lp, A, mu, "cpp")
        ours = ops.cov_select(lp, old, A, mu, sums, sums[2:3].clone(), torch.tensor([0]), 1, ratio, 1.0, 5.0, 0.2, 0.2,
                              "cpp")
        assert torch.equal(ours.bool(), sel), ratio
        k = max(int(ratio * B * T), 1)
        assert int(sel.sum()) == k
        flat = sel.flatten().nonzero().flatten().tolist()
        assert flat == sorted(flat)[:k] and flat[0] == 0  # the lowest indices among the tied top values


def test_kl_cov_matches_reference_values(cpu_backend):
    lp, old, A, m = _cov_batch(seed=13)
    batch = dict(lp=lp, old=old, A=A, m=m, ref=lp, H=torch.rand_like(lp), roll=old)
    out, ref = run(batch, cpu_backend, loss_type="kl_cov", cov_kl_coef=0.7, with_ref=False, cov_ratio=0.05)
    check(out, ref)


# ---------------------------------------------------------------- dtypes, determinism, public helpers

def test_bf16_inputs(cpu_backend):
    batch = make_batch(seed=14, dtype=torch.bfloat16)
    out, ref = run(batch, cpu_backend, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    assert out[2].dtype == torch.bfloat16 and out[3].dtype == torch.bfloat16
    check(out, ref, tol=1e-4, gtol=2e-4)


def test_deterministic_bitwise(cpu_backend):
    batch = make_batch(B=9, T=70, seed=15)
    a, _ = run(batch, cpu_backend, loss_type="gspo", kl_coef=0.1, entropy_coef=0.01)
    b, _ = run(batch, cpu_backend, loss_type="gspo", kl_coef=0.1, entropy_coef=0.01)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_sequence_level_advantages_broadcast():
    batch = make_batch(seed=16)
    adv = torch.randn(batch["lp"].shape[0])
    l1, _ = fastalign.policy_loss(batch["lp"], batch["old"], adv, batch["m"])
    l2, _ = fastalign.policy_loss(batch["lp"], batch["old"], adv[:, None].expand_as(batch["lp"]), batch["m"])
    assert torch.equal(l1, l2)


def test_kl_penalty_kind_is_a_deprecated_name_of_kl_type():
    d = make_batch(seed=17)
    with pytest.warns(DeprecationWarning, match="use kl_type"):
        old = fastalign.kl_penalty(d["lp"], d["ref"], kind="k1")
    assert torch.equal(old, fastalign.kl_penalty(d["lp"], d["ref"], kl_type="k1"))
    with pytest.raises(TypeError, match="kl_type only"):
        fastalign.kl_penalty(d["lp"], d["ref"], "k2", kind="k1")


@pytest.mark.parametrize("old, new", [
    (dict(loss_type="cispo", cispo_bounds=(0.9, 1.1)), dict(loss_type="cispo", cispo_low=0.9, cispo_high=1.1)),
    (dict(loss_type="sapo", sapo_tau=(0.5, 2.0)), dict(loss_type="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0)),
    (dict(loss_type="vespo", vespo_k=(1.5, 2.5)), dict(loss_type="vespo", vespo_k_pos=1.5, vespo_k_neg=2.5)),
    (dict(loss_type="vespo", vespo_lambda=(2.5, 1.5)),
     dict(loss_type="vespo", vespo_lambda_pos=2.5, vespo_lambda_neg=1.5)),
], ids=["cispo_bounds", "sapo_tau", "vespo_k", "vespo_lambda"])
def test_former_pair_options_warn_and_give_the_same_loss(old, new):
    """cispo_bounds, sapo_tau, vespo_k and vespo_lambda were (a, b) tuples; each is two named options now. The
    former name still works for one release, with a RenamedWarning, through every entry point (the same loss and
    gradient), and giving it with one of its new names is a TypeError."""
    from fastalign._deprecate import RenamedWarning

    d = make_batch(seed=18, spread=0.6)
    former = next(k for k in old if k != "loss_type")
    args = (d["old"], d["A"], d["m"])

    def loss_and_grad(fn):
        x = d["lp"].clone().requires_grad_(True)
        loss, metrics = fn(x)
        loss.backward()
        return loss, metrics, x.grad

    def same(got, want):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][k], want[1][k]) for k in want[1])

    want = loss_and_grad(lambda x: fastalign.policy_loss(x, *args, **new))
    match = rf"\({former}=\.\.\.\) is deprecated: use {'=, '.join(k for k in new if k != 'loss_type')}="
    for make in (lambda x: fastalign.policy_loss(x, *args, **old),
                 lambda x: fastalign.PolicyLoss(**old)(x, *args),
                 lambda x: fastalign.PolicyLoss(loss_type=old["loss_type"])(x, *args, **{former: old[former]}),
                 lambda x: fastalign.policy_loss(x, *args, config=fastalign.PolicyConfig(**old))):
        with pytest.warns(RenamedWarning, match=match) as record:
            same(loss_and_grad(make), want)
        assert len(record) == 1 and record[0].filename == __file__
    with pytest.warns(RenamedWarning, match=match):
        assert fastalign.PolicyConfig(**old) == fastalign.PolicyConfig(**new)
    with pytest.warns(RenamedWarning, match=match):  # a list or an array: the same (hashable) config
        assert hash(fastalign.PolicyConfig(**{**old, former: list(old[former])})) == hash(fastalign.PolicyConfig(**new))
    first = next(k for k in new if k != "loss_type")
    for make in (fastalign.PolicyConfig, fastalign.PolicyLoss, fastalign.LinearPolicyLoss,
                 lambda **kw: fastalign.policy_loss(d["lp"], *args, **kw)):
        with pytest.raises(TypeError, match=f"pass {first} / .* only \\({former} is their deprecated name\\)"):
            make(**old, **{first: new[first]})

    # LinearPolicyLoss: at construction and per call
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(*d["lp"].shape, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 9, d["lp"].shape, generator=g)
    want = fastalign.LinearPolicyLoss(**new)(h, w, labels, *args)
    with pytest.warns(RenamedWarning, match=r"LinearPolicyLoss\(" + match[2:]):
        got = fastalign.LinearPolicyLoss(**old)(h, w, labels, *args)
    assert torch.equal(got[0], want[0])
    with pytest.warns(RenamedWarning, match=r"LinearPolicyLoss\.forward\(" + match[2:]):
        got = fastalign.LinearPolicyLoss(loss_type=old["loss_type"])(h, w, labels, *args, **{former: old[former]})
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "k3+", "low_var_kl"])
def test_kl_penalty_public(kind):
    d = make_batch(seed=17)
    x = d["lp"].clone().requires_grad_(True)
    v = fastalign.kl_penalty(x, d["ref"], kind)
    xr = d["lp"].double().requires_grad_(True)
    r = reference.kl_penalty(xr, d["ref"].double(), kind)
    assert_close(v, r, atol=1e-5, rtol=1e-5, what="kl")
    w = torch.randn_like(r)
    (v * w.float()).sum().backward()
    (r * w).sum().backward()
    assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5, what="kl grad")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_loss_public(agg):
    d = make_batch(seed=18)
    L = torch.randn(d["lp"].shape)
    for kw in ({}, dict(counts_read(agg, global_tokens=torch.tensor(123), global_seqs=9), dp_size=3)):
        got = fastalign.aggregate_loss(L, d["m"], agg, **kw)
        exp = reference.aggregate_loss(L.double(), d["m"], agg, **{k: (v.item() if torch.is_tensor(v) else v)
                                                                   for k, v in kw.items()})
        assert_close(got, exp, atol=1e-6, rtol=1e-6, what=agg)


@pytest.mark.parametrize("agg", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seq_count", ["all", "nonempty"])
def test_aggregate_loss_seq_count(agg, seq_count):
    """``seq_count`` picks the rows of the local sequence count (every row, or those with a token), against the
    float64 reference, with an empty row in the batch; with a global count, or in a token-level mode, it raises."""
    d = make_batch(seed=20)
    m = d["m"].clone()
    m[1] = False
    L = torch.randn(d["lp"].shape)
    got = fastalign.aggregate_loss(L, m, agg, seq_count=seq_count)
    exp = reference.aggregate_loss(L.double(), m, agg, seq_count=seq_count)
    assert_close(got, exp, atol=1e-6, rtol=1e-6, what=f"{agg} {seq_count}")
    other = reference.aggregate_loss(L.double(), m, agg, seq_count="all" if seq_count == "nonempty" else "nonempty")
    assert not torch.allclose(exp, other)  # the batch tells the two counts apart
    with pytest.raises(ValueError, match="seq_count .* does not apply with global_seqs"):
        fastalign.aggregate_loss(L, m, agg, global_seqs=5, seq_count=seq_count)
    for token_level in ("token-mean", "token-sum"):
        with pytest.raises(ValueError, match="seq_count"):
            fastalign.aggregate_loss(L, m, token_level, seq_count=seq_count)
    with pytest.raises(ValueError, match="seq_count"):
        fastalign.aggregate_loss(L, m, agg, seq_count="some")


@pytest.mark.parametrize("agg", ["token-sum", "seq-mean-token-sum-norm"])
def test_aggregate_loss_dp_size_without_a_global_count(agg):
    """dp_size with the local counts: token-sum takes the factor; seq-mean-token-sum-norm divides by the local
    ``B * L_max`` and takes no dp factor (only ``global_seqs`` brings it), as the float64 reference."""
    d = make_batch(seed=19)
    L = torch.randn(d["lp"].shape, generator=torch.Generator().manual_seed(19))  # fp32 sums: atol for a sum near 0
    for kw in (dict(dp_size=4), dict(dp_size=4, max_len=30)) if agg != "token-sum" else (dict(dp_size=4),):
        got = fastalign.aggregate_loss(L, d["m"], agg, **kw)
        exp = reference.aggregate_loss(L.double(), d["m"], agg, **kw)
        assert_close(got, exp, atol=1e-5, rtol=1e-6, what=f"{agg} {kw}")


def test_policy_loss_module():
    d = make_batch(seed=19)
    mod = fastalign.PolicyLoss(loss_type="grpo", eps_high=0.28, kl_coef=0.1)
    l1, m1 = mod(d["lp"], d["old"], d["A"], d["m"], ref_logprobs=d["ref"])
    l2, m2 = fastalign.policy_loss(d["lp"], d["old"], d["A"], d["m"], loss_type="ppo", agg="seq-mean-token-mean",
                                   eps_high=0.28, kl_coef=0.1, ref_logprobs=d["ref"])
    assert torch.equal(l1, l2) and "grpo" in repr(mod)


def test_bad_inputs():
    d = make_batch(seed=20)
    lp, old, A, m = d["lp"], d["old"], d["A"], d["m"]
    with pytest.raises(ValueError, match="old_logprobs"):
        fastalign.policy_loss(lp, old[:, :-1], A, m)
    with pytest.raises(TypeError, match="logprobs"):
        fastalign.policy_loss(lp.long(), old, A, m)
    with pytest.raises(ValueError, match="loss_type"):
        fastalign.policy_loss(lp, old, A, m, loss_type="nope")
    with pytest.raises(ValueError, match="agg"):
        fastalign.policy_loss(lp, old, A, m, agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        fastalign.policy_loss(lp, old, A, m, dual_clip=0.5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        fastalign.policy_loss(lp, old, A, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_type"):
        fastalign.policy_loss(lp, old, A, m, ref_logprobs=lp, kl_type="k9")
    with pytest.raises(ValueError, match="rollout_logprobs"):
        fastalign.policy_loss(lp, old, A, m, rollout_correction="token_mask")
    with pytest.raises(ValueError, match="entropy"):
        fastalign.policy_loss(lp, old, A, m, entropy_quantile=0.2)
    with pytest.raises(ValueError, match="advantages"):
        fastalign.policy_loss(lp, old, A[:, :3], m)


# ---------------------------------------------------------------- custom ops, torch.compile

def test_opcheck():
    d = make_batch(B=3, T=11, seed=21)
    mu = d["m"].view(torch.uint8)
    f1 = list(fastalign.PolicyConfig(eps_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
              .kernel_params(entropy_in_kernel=True))
    f2 = list(fastalign.PolicyConfig(loss_type="gmpo", rollout_correction="sequence_truncate")
              .kernel_params(entropy_in_kernel=True))
    f3 = list(fastalign.PolicyConfig(importance_sampling_level="sequence", kl_coef=0.1, kl_rho="grad")
              .kernel_params(entropy_in_kernel=True))
    lp = d["lp"].clone().requires_grad_(True)
    H = d["H"].clone().requires_grad_(True)
    torch.library.opcheck(ops.policy_loss_rows, (lp, d["old"], d["A"], mu, d["ref"], H, None, None, None, None, f1,
                                                 "cpp"))
    torch.library.opcheck(ops.policy_loss_rows, (lp, d["old"], d["A"], mu, None, None, d["roll"], None, None, None,
                                                 f2, "cpp"))
    torch.library.opcheck(ops.policy_loss_rows, (lp, d["old"], d["A"], mu, d["ref"], H, None, None, None, None, f3,
                                                 "cpp"))
    g_row = torch.randn(3, 11)
    for backend in ("cpp", "triton"):
        for want in ((True, True), (True, False), (False, True)):
            gl, ge = ops.policy_loss_grads(d["lp"], g_row, mu, 0.01, *want, backend)
            if want[0]:
                assert torch.equal(gl, d["lp"] * g_row[:, :1])
            if want[1]:
                assert torch.equal(ge, torch.where(d["m"], -0.01 * g_row[:, :1], torch.zeros(())))
            torch.library.opcheck(ops.policy_loss_grads, (d["lp"], g_row, mu, 0.01, *want, backend))
    sums = ops.cov_sums(d["lp"], d["A"], mu, "cpp")
    torch.library.opcheck(ops.cov_sums, (d["lp"], d["A"], mu, "cpp"))
    torch.library.opcheck(ops.cov_select, (d["lp"], d["old"], d["A"], mu, sums, sums[2:3].clone(), torch.tensor([3]),
                                           1, 0.2, 1.0, 5.0, 0.2, 0.2, "cpp"))


@pytest.mark.parametrize("loss_type", ["ppo", "kl_cov"])
def test_torch_compile_fullgraph(loss_type):
    d = make_batch(seed=22)

    cov = dict(cov_ratio=0.05) if loss_type == "kl_cov" else {}

    def step(lp, old, A, m, ref, H):
        loss, met = fastalign.policy_loss(lp, old, A, m, loss_type=loss_type, ref_logprobs=ref, kl_coef=0.1,
                                          entropy=H, entropy_coef=0.01, agg="seq-mean-token-mean", **cov)
        return loss, met["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = d["lp"].clone().requires_grad_(True)
    x2 = d["lp"].clone().requires_grad_(True)
    torch.manual_seed(0)
    l1, c1 = compiled(x1, d["old"], d["A"], d["m"], d["ref"], d["H"])
    torch.manual_seed(0)
    l2, c2 = step(x2, d["old"], d["A"], d["m"], d["ref"], d["H"])
    l1.backward()
    l2.backward()
    assert_close(l1, l2, atol=1e-6, what="compiled loss")
    assert_close(x1.grad, x2.grad, atol=1e-7, what="compiled grad")


# ---------------------------------------------------------------- data parallel (2 gloo processes)

def _dp_worker(rank, world, init_file, q):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with rank_body():
        d = make_batch(B=7, T=15, seed=23)
        d["m"][5, 4:] = False  # uneven lengths
        rows = [slice(0, 2), slice(2, 7)][rank]  # uneven split: 2 rows and 5 rows
        n_glob = torch.tensor(float(d["m"].sum()))
        b_glob = int((d["m"].sum(-1) > 0).sum())
        res = {}
        for agg in ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]:
            x = d["lp"][rows].clone().requires_grad_(True)
            loss, _ = fastalign.policy_loss(x, d["old"][rows], d["A"][rows], d["m"][rows], agg=agg,
                                            ref_logprobs=d["ref"][rows], kl_coef=0.1, dp_size=world,
                                            **counts_read(agg, global_tokens=n_glob, global_seqs=b_glob))
            loss.backward()
            res[agg] = x.grad.tolist()  # plain lists: tensors would be shared through fds
        # KL-Cov with covariance means all-reduced over the group
        lp, old, A, m = (d[k][rows] for k in ("lp", "old", "A", "m"))
        _, met = fastalign.policy_loss(lp, old, A, m, loss_type="kl_cov", cov_ratio=0.2, cov_global=True)
        mm = d["m"].double()
        means = ((d["A"].double() * mm).sum() / mm.sum(), (d["lp"].double() * mm).sum() / mm.sum())
        sel = reference.policy.cov_selection(lp, old, A, m, loss_type="kl_cov", eps_low=0.2, eps_high=0.2, ratio=0.2,
                                             lb=1.0, ub=5.0, means=means)
        mu = m.view(torch.uint8)
        sums = ops.cov_sums(lp, A, mu, "cpp")
        nloc = sums[2:3].clone()
        dist.all_reduce(sums)
        ours = ops.cov_select(lp, old, A, mu, sums, nloc, torch.tensor([0]), 1, 0.2, 1.0, 5.0, 0.2, 0.2, "cpp")
        res["kl_cov_ok"] = bool(torch.equal(ours.bool(), sel)) and float(met["cov_selected_frac"]) > 0
        q.put((rank, res))
        q.close()
        q.join_thread()  # sent before this rank exits


def test_two_process_gloo_global_normalisation(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = tmp_path / "pg"
    procs = [ctx.Process(target=_dp_worker, args=(r, 2, str(init_file), q)) for r in range(2)]
    env_path = os.pathsep.join([os.path.dirname(__file__)] + sys.path)
    os.environ["PYTHONPATH"] = env_path
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    d = make_batch(B=7, T=15, seed=23)
    d["m"][5, 4:] = False
    for agg in ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]:
        x = d["lp"].clone().requires_grad_(True)
        loss, _ = fastalign.policy_loss(x, d["old"], d["A"], d["m"], agg=agg, ref_logprobs=d["ref"], kl_coef=0.1)
        loss.backward()
        # data-parallel training averages gradients over ranks: grad_rank / dp must equal the global gradient
        got = torch.tensor(results[0][agg] + results[1][agg]) / 2
        assert_close(got, x.grad, atol=1e-7, rtol=1e-5, what=agg)
    assert results[0]["kl_cov_ok"] and results[1]["kl_cov_ok"]


# ---------------------------------------------------------------- GPU (run with pytest -m gpu)

@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gpu_matches_cpu(loss_type):
    d = make_batch(B=16, T=300, seed=24)
    cov = 0.05 if loss_type in ("clip_cov", "kl_cov") else None
    if loss_type == "clip_cov":
        cov = 1.0
    out_cpu, _ = run(d, "cpp", loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01, cov_ratio=cov)
    dc = {k: v.cuda() for k, v in d.items()}
    out_gpu, _ = run(dc, None, loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01, cov_ratio=cov)
    assert_close(out_gpu[0].cpu(), out_cpu[0], atol=1e-5, rtol=1e-5, what="loss")
    assert_close(out_gpu[2].cpu(), out_cpu[2], atol=1e-6, rtol=1e-4, what="grad")


@pytest.mark.gpu
def test_gpu_no_sync_and_cuda_graph():
    d = {k: v.cuda() for k, v in make_batch(B=64, T=256, seed=25).items()}
    x = d["lp"].clone().requires_grad_(True)

    def step():
        loss, met = fastalign.policy_loss(x, d["old"], d["A"], d["m"], loss_type="kl_cov", ref_logprobs=d["ref"],
                                          kl_coef=0.1, entropy=d["H"], entropy_coef=0.01, cov_ratio=0.01)
        loss.backward()
        return loss, met

    step()  # warm-up (Triton compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    x.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(g):
        loss, _ = step()
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- configuration record

def test_unknown_option_suggests_the_closest_name():
    d = make_batch(B=2, T=5, seed=30)
    with pytest.raises(TypeError, match="did you mean 'eps_high'"):
        fastalign.policy_loss(d["lp"], d["old"], d["A"], d["m"], eps_hihg=0.3)
    with pytest.raises(TypeError, match="did you mean 'entropy_coef'"):
        fastalign.PolicyLoss(entropy_coeff=0.1)
    with pytest.raises(TypeError, match="did you mean 'kl_coef'"):
        fastalign.LinearPolicyLoss(kl_coeff=0.1)


@pytest.mark.parametrize("kw,name", [
    (dict(loss_type="cispo", delta=2.0), "delta"),
    (dict(loss_type="ppo", sapo_tau_neg=1.0), "sapo_tau_neg"),
    (dict(loss_type="ppo", cov_ratio=0.1), "cov_ratio"),
    (dict(loss_type="clip_cov", cov_kl_coef=0.1), "cov_kl_coef"),
    (dict(loss_type="gspo", dual_clip=3.0), "dual_clip"),
    (dict(loss_type="ppo", vespo_k_pos=1.0), "vespo_k_pos"),
    (dict(loss_type="sapo", vespo_lambda_neg=1.0), "vespo_lambda_neg"),
    (dict(loss_type="sapo", cispo_low=0.0), "cispo_low"),
    (dict(rollout_min=0.5), "rollout_min"),
    (dict(loss_type="gmpo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(agg="token-mean", seq_count="all"), "seq_count"),
    (dict(agg="token-mean", max_len=8), "max_len"),
    (dict(kl_rho="yes"), "kl_rho"),
    (dict(loss_type="reinforce", eps_high=0.3), "eps_high"),
    (dict(loss_type="cispo", cispo_low=0.0, eps_low=0.1), "eps_low"),
    (dict(loss_type="cispo", cispo_high=2.0, eps_high=0.1), "eps_high"),
    (dict(entropy_agg="token-mean"), "entropy_agg"),
    (dict(loss_type="ppo", dro_beta=0.1), "dro_beta"),
    (dict(loss_type="dro"), "dro_beta"),
    (dict(loss_type="dro", dro_beta=0.0), "dro_beta"),
    (dict(loss_type="dro", delta=2.0), "delta"),
])
def test_option_that_does_not_apply_raises(kw, name):
    with pytest.raises(ValueError, match=name):
        fastalign.PolicyConfig(**kw)
    with pytest.raises(ValueError, match=name):
        fastalign.PolicyLoss(**kw)


def test_rollout_logprobs_without_a_use_raise():
    d = make_batch(B=2, T=5, seed=31)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        fastalign.policy_loss(d["lp"], d["old"], d["A"], d["m"], rollout_logprobs=d["roll"])


def test_kernel_parameter_order_matches_the_compiled_struct():
    from fastalign import _backend
    from fastalign.ops.policy_params import KernelParams

    assert tuple(_backend.compiled().policy_loss_param_names()) == KernelParams._fields


def test_config_object_and_keywords_agree():
    d = make_batch(seed=32)
    cfg = fastalign.PolicyConfig(loss_type="grpo", eps_high=0.28, kl_coef=0.1)
    l1, _ = fastalign.policy_loss(d["lp"], d["old"], d["A"], d["m"], ref_logprobs=d["ref"], config=cfg)
    l2, _ = fastalign.PolicyLoss(config=cfg)(d["lp"], d["old"], d["A"], d["m"], ref_logprobs=d["ref"])
    l3, _ = fastalign.policy_loss(d["lp"], d["old"], d["A"], d["m"], ref_logprobs=d["ref"], loss_type="grpo",
                                  eps_high=0.28, kl_coef=0.1)
    assert torch.equal(l1, l2) and torch.equal(l1, l3)


# ---------------------------------------------------------------- options of the trainer profiles

def _with_empty_row(batch):
    batch["m"][2] = False
    return batch


OPTION_CASES = {
    "gspo_delta": dict(loss_type="gspo", delta=1.05, eps_low=0.01, eps_high=0.01),
    "gspo_token_mean": dict(loss_type="gspo", agg="token-mean"),
    "ppo_sequence": dict(importance_sampling_level="sequence", delta=1.1, kl_coef=0.1, kl_type="k3",
                         kl_clamp=False, kl_rho="grad", entropy_quantile=0.5, agg="token-sum"),
    "cispo_sequence": dict(loss_type="cispo", importance_sampling_level="sequence", cispo_low=0.0,
                           cispo_high=1.05, kl_coef=0.1, kl_rho="grad"),
    "sapo_sequence": dict(loss_type="sapo", importance_sampling_level="sequence", agg="seq-mean-token-mean",
                          seq_count="all", rollout_correction="token_truncate", rollout_min=0.9, rollout_max=1.1),
    "kl_rho_grad": dict(kl_coef=0.2, kl_type="k3", kl_clamp=False, kl_rho="grad", with_ent=False),
    "entropy_token_mean": dict(entropy_coef=0.05, entropy_agg="token-mean", entropy_quantile=0.4,
                               agg="seq-mean-token-mean"),
    "top_entropy_only": dict(entropy_quantile=0.0, entropy_coef=0.05, entropy_agg="token-mean"),
    "truncate_both_bounds": dict(rollout_correction="sequence_truncate", rollout_min=0.95, rollout_max=1.05),
    "offpolicy_vs_rollout": dict(offpolicy_threshold=0.0, with_roll=True),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo", vespo_k_pos=2.0, vespo_k_neg=3.0, vespo_lambda_pos=3.0, vespo_lambda_neg=2.0,
                  agg="token-sum"),
    "gmpo_nonempty": dict(loss_type="gmpo", seq_count="nonempty", agg="seq-mean-token-mean"),
    "dr_grpo_nonempty": dict(loss_type="dr_grpo", seq_count="nonempty", max_len=30),
    "dual_clip_metrics": dict(dual_clip=3.0, eps_high=0.28),
    "dppo_tv": dict(loss_type="dppo_tv", eps_low=0.05, eps_high=0.03, delta=1.1, kl_coef=0.1),
    "dppo_tv_untruncated": dict(loss_type="dppo_tv", agg="seq-mean-token-sum"),
    "dppo_kl": dict(loss_type="dppo_kl", eps_low=0.01, eps_high=0.02, delta=1.2, agg="seq-mean-token-mean"),
    "dro": dict(loss_type="dro", dro_beta=0.5, kl_coef=0.1, agg="seq-mean-token-sum-norm"),
    # the closed ends of the documented ranges: entropy_quantile in [0, 1] (1 keeps every valid token, TRL's
    # default top_entropy_quantile) and cispo_low <= cispo_high (equal bounds: a weight of that value everywhere)
    "keep_every_entropy": dict(entropy_quantile=1.0, entropy_coef=0.05),
    "cispo_equal_bounds": dict(loss_type="cispo", cispo_low=1.0, cispo_high=1.0, kl_coef=0.1),
    "cispo_low_only": dict(loss_type="cispo", cispo_low=0.5, eps_high=0.1),  # cispo_high: 1 + eps_high
    "sapo_tau_neg_only": dict(loss_type="sapo", sapo_tau_neg=2.0),  # sapo_tau_pos: 1.0
    "vespo_k_neg_only": dict(loss_type="vespo", vespo_k_neg=1.5, vespo_lambda_pos=2.5),
}


@pytest.mark.parametrize("loss_type", ["dppo_tv", "dppo_kl"])
def test_dppo_data_exercise_the_bound_and_the_truncation(cpu_backend, loss_type):
    batch = _with_empty_row(make_batch(seed=37, spread=0.3))
    batch["old"] = batch["old"].clamp(max=-1e-3)  # log-probs: the binary KL is finite everywhere
    out, ref = run(batch, cpu_backend, loss_type=loss_type, eps_low=0.02, eps_high=0.02, delta=1.1)
    check(out, ref)
    assert 0 < float(out[1]["clipfrac"]) < 1
    assert 0 < float(out[1]["clipfrac_lower"]) < 1


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_match_reference(cpu_backend, case):
    kw = dict(OPTION_CASES[case])
    batch = _with_empty_row(make_batch(seed=33, spread=0.3))
    batch["A"] = batch["A"][:, :1].expand_as(batch["A"]).contiguous()  # sequence-level advantages
    out, ref = run(batch, cpu_backend, **kw)
    check(out, ref)


@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
def test_sequence_level_clip_metrics_with_per_sequence_advantages(cpu_backend, loss_type):
    """importance_sampling_level="sequence" with [B] advantages: one clip flag per sequence, and clip_low /
    clip_high average over every sequence, the empty one included (its ratio is 1: never clipped), as the
    float64 reference; loss, gradient and the other metrics too."""
    batch = _with_empty_row(make_batch(seed=38, spread=0.6))
    batch["A"] = batch["A"][:, 0].contiguous()  # [B]
    kw = dict(cispo_low=0.9, cispo_high=1.1) if loss_type == "cispo" else {}
    out, ref = run(batch, cpu_backend, loss_type=loss_type, importance_sampling_level="sequence", with_ref=False,
                   **kw)
    check(out, ref)
    assert 0 < float(out[1]["clip_region"]) < 1  # the data clip some sequences, not all


@pytest.mark.parametrize("loss_type", ["ppo", "gmpo", "vespo", "cispo", "dppo_kl", "dro"])
def test_importance_weights(cpu_backend, loss_type):
    batch = make_batch(seed=34)
    batch["A"] = batch["A"][:, :1].expand_as(batch["A"]).contiguous()
    w = torch.rand(batch["lp"].shape, generator=torch.Generator().manual_seed(1)) + 0.5
    kw = dict(dro_beta=0.3) if loss_type == "dro" else {}
    out, ref = run(batch, cpu_backend, loss_type=loss_type, importance_weights=w, with_ref=False, **kw)
    check(out, ref)
    out, ref = run(batch, cpu_backend, loss_type=loss_type, importance_weights=w[:, 0], with_ref=False, **kw)
    check(out, ref)
    # [B, 1] (TRL's sequence-level importance_sampling_ratio): one weight per sequence, as [B]
    out, ref = run(batch, cpu_backend, loss_type=loss_type, importance_weights=w[:, :1], with_ref=False, **kw)
    check(out, ref)


def test_nan_rollout_logprob_is_a_zero_log_ratio(cpu_backend):
    batch = make_batch(seed=35)
    batch["roll"][0, 1] = float("nan")
    batch["roll"][3, 4] = float("nan")
    for mode in ("token_mask", "sequence_truncate"):
        out, ref = run(batch, cpu_backend, rollout_correction=mode, offpolicy_threshold=0.0)
        check(out, ref)
        assert torch.isfinite(out[0])


@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo", "sapo", "reinforce", "gmpo", "vespo", "dppo_tv",
                                       "dppo_kl", "dro"])
def test_nan_logprob_gives_nan_loss(cpu_backend, loss_type):
    batch = make_batch(B=3, T=6, seed=36)
    lp = batch["lp"].clone()
    lp[1, 0] = float("nan")  # a valid token
    row_kw = dict(dro_beta=0.3) if loss_type == "dro" else {}
    loss, _ = fastalign.policy_loss(lp, batch["old"], batch["A"], batch["m"], loss_type=loss_type,
                                    backend=cpu_backend, **row_kw)
    assert torch.isnan(loss)
    lp = batch["lp"].clone()
    for k in ("ref", "H"):
        bad = batch[k].clone()
        bad[1, 0] = float("nan")
        kw = dict(ref_logprobs=bad, kl_coef=0.1) if k == "ref" else dict(entropy=bad, entropy_coef=0.1)
        loss, _ = fastalign.policy_loss(lp, batch["old"], batch["A"], batch["m"], loss_type=loss_type,
                                        backend=cpu_backend, **kw, **row_kw)
        assert torch.isnan(loss), k
