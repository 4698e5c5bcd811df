"""Regressions of policy_loss / PolicyConfig found by user testing: infinite and NaN log-probs through the
KL term, gspo's cap of 10, option values (the Clip-Cov bounds with kl_cov), seq-mean-token-sum-norm with dp_size,
PolicyConfig.make while compiling, gmpo's count of sequences (verl's geo_mean), the metrics documented in
docs/math.md. Oracles: the float64 reference (fastalign.reference), verl's installed code, or a float64 formula
written here."""
import math

import numpy as np
import pytest
import torch

import fastalign
from conftest import CPU_BACKENDS
from fastalign.reference.policy import cov_selection, policy_loss as reference_policy_loss


def _small():
    lp = torch.tensor([[-0.5, -1.5, -1.0, -0.7], [-0.2, -0.9, -1.3, -2.0]])
    old = lp + torch.tensor([[0.1, -0.2, 0.05, 0.0], [-0.1, 0.15, 0.0, 0.2]])
    A = torch.tensor([[1.0, 1.0, -1.0, 0.5], [-0.3, 0.8, 1.2, -1.0]])
    m = torch.ones(2, 4)
    ref = lp + torch.tensor([[0.1, -0.3, 0.2, 0.0], [0.05, -0.1, 0.3, -0.2]])
    return lp, old, A, m, ref


def _fa(backend, lp, old, A, m, **kw):
    x = lp.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, old, A, m, backend=backend, **kw)
    loss.backward()
    return loss.detach().double(), met, x.grad.double()


def _ref(lp, old, A, m, **kw):
    x = lp.double().requires_grad_(True)
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss, met = reference_policy_loss(x, old.double(), A.double(), m.double(), **kw)
    loss.backward()
    return loss.detach(), met, x.grad


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True, msg=lambda s: f"{what}: {s}")


# ------------------------------------------------------------------ infinite / NaN log-probs in the KL term

@pytest.mark.parametrize("where", ["lp", "ref"])
@pytest.mark.parametrize("kl_type", ["k1", "abs", "k2", "k3", "k3+", "k1+"])
@pytest.mark.parametrize("loss_type", ["ppo", "reinforce", "cispo"])
def test_infinite_logprob_in_the_kl_term(where, kl_type, loss_type):
    """|lp - ref| = inf on a valid token: each estimator's own value (k3: clamped to 10, no gradient), never
    the NaN of 0 * inf from the estimators not chosen (the C++ kernel blended them with 0/1 weights). The
    C++ and Triton kernels agree everywhere; the float64 reference is the oracle where its own value is
    defined (ppo, whose ratio is clamped, with a plain estimator; it makes NaN of the straight-through
    ``+`` forms at infinity and of ``-A lp`` at ``lp = -inf``)."""
    lp, old, A, m, ref = _small()
    if where == "lp":
        lp[0, 1] = -math.inf
    else:
        ref[0, 1] = -math.inf
    kw = dict(loss_type=loss_type, ref_logprobs=ref, kl_coef=0.1, kl_type=kl_type)
    cpp, tri = (_fa(b, lp, old, A, m, **kw) for b in ("cpp", "triton"))
    _close(cpp[0], tri[0], "loss, cpp against triton")
    _close(cpp[1]["kl"], tri[1]["kl"], "kl metric, cpp against triton")
    _close(cpp[2], tri[2], "d lp, cpp against triton")
    if loss_type == "ppo" or where == "ref":  # (reinforce / cispo at lp = -inf: -A lp is itself infinite)
        assert not torch.isnan(cpp[0]) and not torch.isnan(cpp[2]).any()
    if loss_type == "ppo" and not kl_type.endswith("+"):
        rloss, rmet, rg = _ref(lp, old, A, m, **kw)
        _close(cpp[0], rloss, "loss")
        _close(cpp[1]["kl"].double(), rmet["kl"], "kl metric")
        _close(cpp[2], rg, "d lp")
    if kl_type == "k3" and loss_type == "ppo":  # clamped: a finite loss
        assert torch.isfinite(cpp[0])


@pytest.mark.parametrize("loss_type", ["ppo", "sapo", "reinforce", "vespo", "cispo", "dro"])
def test_nan_logprob_propagates_the_same_on_both_backends(loss_type):
    """A NaN log-prob on a valid token with a KL term: a NaN loss, and the same gradient (NaN where the
    reference has NaN) on the C++ and Triton kernels as in the float64 reference."""
    lp, old, A, m, ref = _small()
    lp[1, 2] = math.nan
    kw = dict(loss_type=loss_type, ref_logprobs=ref, kl_coef=0.1)
    if loss_type == "dro":
        kw["dro_beta"] = 0.5
    out = {b: _fa(b, lp, old, A, m, **kw) for b in ("cpp", "triton")}
    rloss, _, rg = _ref(lp, old, A, m, **kw)
    assert torch.isnan(rloss)
    for b, (loss, _, g) in out.items():
        assert torch.isnan(loss), b
        assert torch.equal(torch.isnan(g), torch.isnan(out["cpp"][2])), b
        _close(g, out["cpp"][2], f"{b} d lp against cpp")
    _close(out["cpp"][2], rg, "d lp against the reference")


@pytest.mark.parametrize("kl_rho", [True, "grad"])
def test_nan_logprob_with_the_ratio_weighted_kl_is_nan_on_both_backends(kl_rho):
    """With the ratio-weighted KL, a NaN log-prob's token gets a NaN gradient on both kernels (the ratio that
    weighs its KL is NaN; docs/bad-inputs.md), the other tokens the float64 reference's gradient."""
    lp, old, A, m, ref = _small()
    lp[1, 2] = math.nan
    kw = dict(loss_type="ppo", ref_logprobs=ref, kl_coef=0.1, kl_rho=kl_rho)
    out = {b: _fa(b, lp, old, A, m, **kw) for b in ("cpp", "triton")}
    _, _, rg = _ref(lp, old, A, m, **kw)
    other = torch.ones_like(m, dtype=torch.bool)
    other[1, 2] = False
    for b, (loss, _, g) in out.items():
        assert torch.isnan(loss), b
        assert torch.isnan(g[1, 2]), b
        _close(g[other], rg[other], f"{b} d lp of the other tokens against the reference")


# ------------------------------------------------------------------ a term whose coefficient is 0 is left out

def _run(backend, lp, old, A, m, **kw):
    """(loss, metrics, d lp) in float64 from a kernel or from the float64 reference."""
    return _ref(lp, old, A, m, **kw) if backend == "reference" else _fa(backend, lp, old, A, m, **kw)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("bad", [-math.inf, math.nan])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "abs", "k3", "k1+"])
@pytest.mark.parametrize("kl_rho, level", [(False, "token"), ("grad", "token"), ("grad", "sequence")])
def test_kl_coef_0_leaves_the_kl_term_out(backend, bad, kl_type, kl_rho, level):
    """ref_logprobs given for the kl metric only (kl_coef=0, the default), with an infinite or NaN reference
    log-prob on a valid token: the loss and d lp are those without ref_logprobs (TRL adds the KL term only when
    beta != 0, verl only under use_kl_loss), not the NaN of 0 * inf; the kl metric still reports the value."""
    lp, old, A, m, ref = _small()
    ref[0, 1] = bad
    plain = _run(backend, lp, old, A, m, importance_sampling_level=level)
    loss, met, g = _run(backend, lp, old, A, m, importance_sampling_level=level, ref_logprobs=ref, kl_type=kl_type,
                        kl_rho=kl_rho)
    _close(loss, plain[0], "loss")
    _close(g, plain[2], "d lp")
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert math.isfinite(met["kl"]) == (kl_type == "k3" and bad == -math.inf)  # k3 is clamped


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "abs"])
def test_a_non_zero_kl_coef_still_propagates_a_nan_reference(backend, kl_type):
    """With kl_coef != 0 a NaN reference log-prob still makes the loss NaN, and d lp is the float64 reference's
    (NaN at that token for k2, whose gradient is lp - ref)."""
    lp, old, A, m, ref = _small()
    ref[0, 1] = math.nan
    kw = dict(ref_logprobs=ref, kl_type=kl_type, kl_coef=0.1)
    loss, _, g = _fa(backend, lp, old, A, m, **kw)
    rloss, _, rg = _ref(lp, old, A, m, **kw)
    assert torch.isnan(loss) and torch.isnan(rloss)
    _close(g, rg, "d lp")


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_entropy_coef_0_leaves_the_entropy_term_out(backend, bad):
    """entropy given for the metric only (entropy_coef=0, the default; TRL's GRPOLoss logs it): a NaN or infinite
    entropy leaves the loss and d lp those without entropy (TRL and verl add the bonus only when its coefficient
    is not 0); the entropy metric still reports it, and a non-zero entropy_coef still makes the loss non-finite."""
    lp, old, A, m, _ = _small()
    H = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    H[1, 2] = bad
    plain = _run(backend, lp, old, A, m)
    loss, met, g = _run(backend, lp, old, A, m, entropy=H)
    _close(loss, plain[0], "loss")
    _close(g, plain[2], "d lp")
    assert torch.isfinite(loss) and not math.isfinite(met["entropy"])
    assert not torch.isfinite(_run(backend, lp, old, A, m, entropy=H, entropy_coef=0.01)[0])


# ------------------------------------------------------------------ gspo: the cap of 10 passes no gradient

def _gspo_f64(lp, old, A, m, eps=0.2):
    """verl's compute_policy_loss_gspo in float64: log s = lp - sg(lp) + sg(mean_m l), torch.clamp(max=10),
    ppo clip, seq-mean-token-mean over the non-empty rows."""
    x = lp.double().requires_grad_(True)
    md = m.double()
    l = x - old.double()
    mean_l = (l * md).sum(-1) / md.sum(-1).clamp(min=1)
    log_s = x - x.detach() + mean_l.detach()[:, None]
    s = torch.exp(torch.clamp(log_s, max=10.0))
    a = A.double()
    pg = torch.maximum(-a * s, -a * torch.clamp(s, 1 - eps, 1 + eps))
    per_row = (pg * md).sum(-1) / md.sum(-1).clamp(min=1)
    loss = per_row.sum() / (md.sum(-1) > 0).sum().clamp(min=1)
    loss.backward()
    return loss.detach(), x.grad


def test_gspo_cap_passes_no_gradient(cpu_backend):
    lp, old, A, m, _ = _small()
    old = old.clone()
    old[0] = lp[0] - 11.0  # row 0: mean log-ratio 11 > 10, the cap binds
    A = A.clone()
    A[0] = -1.0  # the unclipped branch -A s is active there
    loss, _, g = _fa(cpu_backend, lp, old, A, m, loss_type="gspo")
    rloss, rg = _gspo_f64(lp, old, A, m)
    torch.testing.assert_close(loss, rloss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-5)
    assert (g[0] == 0).all() and (g[1] != 0).any()


# ------------------------------------------------------------------ option values

@pytest.mark.parametrize("kw,name,exc", [
    (dict(loss_type="gmpo", agg="token-mean"), "agg", ValueError),
    (dict(loss_type="geo_mean", agg="seq-mean-token-sum"), "agg", ValueError),
    (dict(rollout_correction="token_truncate", rollout_max=-1.0), "rollout_max", ValueError),
    (dict(rollout_correction="token_mask", rollout_max=math.nan), "rollout_max", ValueError),
    (dict(loss_type="sapo", sapo_tau_pos=0.0), "sapo_tau_pos", ValueError),
    (dict(loss_type="sapo", sapo_tau_neg=-1.0), "sapo_tau_neg", ValueError),
    (dict(loss_type="cispo", cispo_low=1.5, cispo_high=0.5), "cispo_high", ValueError),
    (dict(loss_type="cispo", cispo_low=1.5), "cispo_low", ValueError),  # above the default 1 + eps_high
    (dict(loss_type="cispo", cispo_high=math.inf), "cispo_high", ValueError),
    (dict(loss_type="cispo", cispo_low=(0.5, 1.5)), "cispo_low", TypeError),
    (dict(loss_type="vespo", vespo_k_pos=math.nan), "vespo_k_pos", ValueError),
    (dict(loss_type="vespo", vespo_lambda_neg=math.inf), "vespo_lambda_neg", ValueError),
    (dict(eps_low=math.nan), "eps_low", ValueError),
    (dict(kl_coef=math.nan), "kl_coef", ValueError),
    (dict(entropy_coef=math.inf), "entropy_coef", ValueError),
    (dict(offpolicy_threshold=math.nan), "offpolicy_threshold", ValueError),
    (dict(loss_type="dro", dro_beta=math.inf), "dro_beta", ValueError),
    (dict(loss_type="clip_cov", cov_lb=5.0, cov_ub=1.0), "cov_lb", ValueError),
    (dict(kl_coef="0.1"), "kl_coef", TypeError),
    (dict(eps_high="0.28"), "eps_high", TypeError),
    (dict(kl_clamp="no"), "kl_clamp", TypeError),
    (dict(loss_type="kl_cov", cov_global="no"), "cov_global", TypeError),
    (dict(loss_type="kl_cov", cov_global=1), "cov_global", TypeError),
    (dict(loss_type="ppo", cov_group=object()), "cov_group", ValueError),
    (dict(loss_type="kl_cov", cov_group=object()), "cov_group", ValueError),
])
def test_bad_option_values_raise_naming_them(kw, name, exc):
    with pytest.raises(exc, match=name):
        fastalign.PolicyConfig(**kw)
    with pytest.raises(exc, match=name):
        fastalign.PolicyLoss(**kw)


def test_options_left_at_their_defaults_never_raise():
    lp, old, A, m, ref = _small()
    for lt in fastalign.PolicyConfig.__dataclass_fields__["loss_type"].default, "gmpo", "gspo", "sapo", "cispo":
        fastalign.policy_loss(lp, old, A, m, loss_type=lt)
    fastalign.PolicyConfig(rollout_correction="token_truncate", rollout_min=0.0, rollout_max=math.inf)  # TRL
    fastalign.PolicyConfig(kl_type="k3", kl_clamp=True, kl_rho=False)  # the defaults, given
    fastalign.PolicyConfig(loss_type="gmpo", agg="seq-mean-token-mean")  # gmpo's own aggregation, given
    fastalign.policy_loss(lp, old, A, m, kl_type="low_var_kl")  # an alias of the default estimator


@pytest.mark.parametrize("kw,name", [(dict(kl_type="k1"), "kl_type"), (dict(kl_clamp=False), "kl_clamp"),
                                     (dict(kl_rho=True), "kl_rho"), (dict(kl_rho="grad"), "kl_rho")])
def test_kl_options_without_the_kl_term_raise(kw, name):
    lp, old, A, m, ref = _small()
    with pytest.raises(ValueError, match=name):
        fastalign.policy_loss(lp, old, A, m, **kw)
    # with ref_logprobs the options shape the KL (a metric with kl_coef = 0): accepted, and used
    _, met = fastalign.policy_loss(lp, old, A, m, ref_logprobs=ref, **kw)
    _, rmet, _ = _ref(lp, old, A, m, ref_logprobs=ref, **kw)
    _close(met["kl"].double(), rmet["kl"], "kl metric")


def test_dp_size_takes_any_python_or_numpy_integer():
    """dp_size is read as aggregate_loss reads it: numpy integers count, as every other size option."""
    lp, old, A, m, _ = _small()
    kw = dict(loss_type="reinforce", agg="seq-mean-token-sum-norm", global_seqs=3)
    a, _ = fastalign.policy_loss(lp, old, A, m, dp_size=np.int64(2), **kw)
    b, _ = fastalign.policy_loss(lp, old, A, m, dp_size=2, **kw)
    assert fastalign.PolicyConfig(dp_size=np.int32(2)).dp_size == 2
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ seq-mean-token-sum-norm with dp_size

@pytest.mark.parametrize("seq_count", ["all", "nonempty"])
@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_sum_norm_without_global_seqs_has_no_dp_factor(cpu_backend, seq_count, dp_size):
    """sum(m L) / (B L_max) without global_seqs (B: every row, or the non-empty ones), whatever dp_size."""
    lp, old, A, m, _ = _small()
    m = m.clone()
    m[1, 2:] = 0
    loss, _, g = _fa(cpu_backend, lp, old, A, m, loss_type="reinforce", agg="seq-mean-token-sum-norm",
                     seq_count=seq_count, dp_size=dp_size)
    x = lp.double().requires_grad_(True)
    md = m.double()
    rows = md.shape[0] if seq_count == "all" else int((md.sum(-1) > 0).sum())
    r = (-A.double() * x * md).sum() / (rows * md.shape[1])
    r.backward()
    torch.testing.assert_close(loss, r.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, x.grad, atol=1e-6, rtol=1e-6)
    rloss, _, rg = _ref(lp, old, A, m, loss_type="reinforce", agg="seq-mean-token-sum-norm", seq_count=seq_count,
                        dp_size=dp_size)  # the float64 reference reads the same rule
    _close(rloss, r.detach(), "reference loss")
    _close(rg, x.grad, "reference gradient")


# ------------------------------------------------------------------ PolicyConfig.make while compiling

def test_make_skips_the_cache_while_compiling(monkeypatch):
    """Dynamo would trace (and warn about) the lru_cache of PolicyConfig.make: skipped while compiling."""
    from fastalign import policy_config

    before = policy_config._from_options.cache_info()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cfg = fastalign.PolicyConfig.make(None, loss_type="grpo", eps_high=0.31)
    assert cfg.eps_high == 0.31
    after = policy_config._from_options.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


# ------------------------------------------------------------------ the importance log-ratio clamp

@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("cap", [20.0, 3.0, math.inf])
@pytest.mark.parametrize("opts", [dict(loss_type="ppo"), dict(loss_type="ppo", importance_sampling_level="sequence"),
                                  dict(loss_type="cispo"), dict(loss_type="sapo", importance_sampling_level="sequence"),
                                  dict(loss_type="dppo_tv", delta=1e12),
                                  dict(loss_type="reinforce", kl_coef=0.1, kl_rho="grad")],
                         ids=["ppo", "ppo_sequence", "cispo", "sapo_sequence", "dppo_tv", "kl_rho"])
def test_log_ratio_cap(backend, cap, opts):
    """``log_ratio_cap``: the ratio is exp(clamp(l, -c, c)) (the sequence mean at sequence level), with no
    gradient where the clamp binds; inf clamps nothing. Rows with |l| (and |mean l|) past 3 and past 20,
    both signs, against the float64 reference (the sequence-level gradient past the clamp was the row's
    ratio on both kernels, where torch.clamp passes 0)."""
    lp, old, A, m, ref = _small()
    old = old.clone()
    old[0] -= 25.0  # l ~ +25
    old[1, :2] += 4.0  # l ~ -4 on two tokens: mean ~ -2, inside cap 3 at sequence level
    A = -A.abs()  # the unclipped branch, which carries the ratio's gradient
    kw = dict(opts, log_ratio_cap=cap)
    if "kl_rho" in kw:
        kw["ref_logprobs"] = ref
    got = _fa(backend, lp, old, A, m, **kw)
    want = _ref(lp, old, A, m, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=2e-5, atol=1e-5)


def test_log_ratio_cap_values_and_rows():
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="log_ratio_cap"):
            fastalign.PolicyConfig(log_ratio_cap=bad)
    with pytest.raises(TypeError, match="log_ratio_cap"):
        fastalign.PolicyConfig(log_ratio_cap="20")
    for row in ("gspo", "gmpo", "reinforce", "vespo", "clip_cov", "kl_cov"):
        with pytest.raises(ValueError, match="log_ratio_cap does not apply.*any loss_type with kl_rho"):
            fastalign.PolicyConfig(loss_type=row, log_ratio_cap=math.inf)
    fastalign.PolicyConfig(loss_type="reinforce", kl_coef=0.1, kl_rho=True, log_ratio_cap=5.0)


@pytest.mark.parametrize("bad", [-math.inf, math.nan])
def test_unclamped_k3_at_a_non_finite_reference(cpu_backend, bad):
    """kl_clamp=False: the C++ kernel still clamped x = ref - lp at +-FLT_MAX, so ref = -inf gave a finite loss
    (5.7e36) and no KL gradient, and ref = NaN a finite gradient. Against float64: k3 = e^x - x - 1 (+inf or NaN)
    and d k3 / d lp = 1 - e^x (1 or NaN), with a ppo term of ratio 1."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[bad, -2.1, -0.4]])
    cfg = fastalign.PolicyConfig(loss_type="ppo", kl_coef=0.1, kl_type="k3", kl_clamp=False, backend=cpu_backend)
    loss, _ = fastalign.policy_loss(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 3), ref_logprobs=ref,
                                    config=cfg)
    loss.backward()
    lp64 = lp.detach().double().requires_grad_(True)
    x = ref.double() - lp64
    want = (-torch.exp(lp64 - lp64.detach()) + 0.1 * (torch.exp(x) - x - 1.0)).mean()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), equal_nan=True)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-6, atol=1e-7, equal_nan=True)


# ------------------------------------------------------------------ user-found: infinities, counts, ties

@pytest.mark.parametrize("kl_type", ["k1+", "abs+", "k3+"])
@pytest.mark.parametrize("lp0,ref0", [(-math.inf, -1.0), (-1.0, -math.inf)])
def test_straight_through_kl_at_an_infinite_log_ratio_passes_no_gradient(cpu_backend, kl_type, lp0, ref0):
    """kl_penalty's NAME+ gives NAME's value and a zero gradient at an infinite lp - ref; policy_loss's KL term
    with the same kl_type gave an infinite gradient there (both kernels). They agree now."""
    lp = torch.tensor([[lp0, -1.0]])
    ref = torch.tensor([[ref0, -1.2]])
    want = fastalign.kl_penalty(lp, ref, kl_type)
    x = lp.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, lp, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), ref_logprobs=ref,
                                      kl_coef=1.0, kl_type=kl_type, backend=cpu_backend)
    loss.backward()
    assert met["kl"].item() == want[0, 0].item()
    assert x.grad[0, 0].item() == 0.0


def test_a_one_element_count_keeps_the_loss_0_dim(cpu_backend):
    """An all-reduced [1] global_tokens / global_seqs made the loss [1] (a [1, 1] count [[x]]); the loss is 0-dim
    and equal to the one of a number."""
    lp, old, A, m, _ = _small()
    for kw in (dict(global_tokens=torch.tensor([7.0])), dict(agg="seq-mean-token-mean",
                                                             global_seqs=torch.tensor([[2.0]]))):
        number = {k: float(v.reshape(())) for k, v in kw.items() if k.startswith("global")}
        loss, _ = fastalign.policy_loss(lp, old, A, m, backend=cpu_backend, **kw)
        want, _ = fastalign.policy_loss(lp, old, A, m, backend=cpu_backend, **{**kw, **number})
        assert loss.shape == () and loss.item() == want.item()
    agg = fastalign.aggregate_loss(lp, m, "token-mean", global_tokens=torch.tensor([5.0]))
    assert agg.shape == ()


@pytest.mark.parametrize("a0", [math.inf, 3e38])
def test_clip_high_counts_a_token_whose_loss_overflows(cpu_backend, a0):
    """A * ratio overflowing to inf on both sides of the clip: the C++ kernel did not count the token in
    clip_high / clip_region (Triton and the reference did); every backend counts it now."""
    lp = torch.tensor([[-1.0, -1.2, -0.8]])
    old = torch.tensor([[-1.5, -1.0, -1.0]])  # ratios e^.5 (above 1.2), e^-.2, e^.2
    A = torch.tensor([[a0, 1.0, 1.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    _, met = fastalign.policy_loss(lp, old, A, m, backend=cpu_backend)
    _, want = reference_policy_loss(lp.double(), old.double(), A.double(), m)
    for name in ("clip_high", "clip_region", "clip_high_max"):
        assert met[name].item() == pytest.approx(want[name].item()), name


def test_kl_cov_ties_between_signed_zeros_go_by_index(cpu_backend):
    """With every advantage 0 (groups of equal rewards) each cov_t is +0 or -0; the selection ordered -0 below
    +0, so a later token was picked over an earlier one. Equal covariances tie, lower index first."""
    from fastalign.reference.policy import cov_selection
    lp = torch.tensor([[-3.0, -2.0, -1.0, -0.5]])  # lp_0 below the mean: cov_0 = -0.0; lp_3: +0.0
    old, A, m = lp - 0.1, torch.zeros(1, 4), torch.ones(1, 4)
    want = cov_selection(lp, old, A, m, loss_type="kl_cov", eps_low=0.2, eps_high=0.2, ratio=0.25, lb=1.0, ub=5.0)
    x = lp.clone().requires_grad_(True)
    loss, _ = fastalign.policy_loss(x, old, A, m, loss_type="kl_cov", cov_ratio=0.25, cov_kl_coef=1.0,
                                    backend=cpu_backend)
    loss.backward()
    assert want.int().tolist() == [[1, 0, 0, 0]]
    assert (x.grad != 0).int().tolist() == want.int().tolist()


def test_off_policy_mask_drops_the_far_rows_tokens_of_negative_advantage(cpu_backend):
    """With [B, T] advantages the off-policy mask dropped a far sequence whole when its mean advantage was
    negative; it drops that sequence's tokens with A_t < 0 (TRL's rule; the same for one advantage per row)."""
    lp = torch.tensor([[-1.0, -1.2, -0.8, -0.5], [-0.4, -1.0, -2.0, -0.9]])
    old = lp + 0.05
    roll = lp + torch.tensor([[0.5], [0.0]])  # row 0 far (mean KL 0.5), row 1 near
    A = torch.tensor([[1.0, -2.0, 0.5, -0.1], [-1.0, 0.3, 0.2, -0.4]])
    m = torch.ones(2, 4)
    kw = dict(loss_type="reinforce", offpolicy_threshold=0.1, rollout_logprobs=roll)
    x = lp.clone().requires_grad_(True)
    loss, _ = fastalign.policy_loss(x, old, A, m, backend=cpu_backend, **kw)
    loss.backward()
    kept = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert_close = torch.testing.assert_close
    assert_close(x.grad, -A * kept / 8)
    assert_close(loss, (-A * lp * kept).sum() / 8)
    want, _ = reference_policy_loss(lp.double(), old.double(), A.double(), m, **kw)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# ------------------------------------------------------------------ Clip-Cov / KL-Cov selection size and picked tokens

@pytest.mark.parametrize("ratio,n", [(0.7, 40), (2e-4, 10000)])
def test_cov_selection_picks_floor_of_the_float64_product(cpu_backend, ratio, n):
    """k = max(floor(cov_ratio * n), 1) in float64, as verl's int(ratio * n): 28 of 40 at 0.7 and 2 of
    10,000 at verl's default 2e-4 (a float32 ratio gives one fewer)."""
    torch.manual_seed(0)
    lp = -torch.rand(1, n)
    A = torch.randn(1, n)
    m = torch.ones(1, n)
    _, met = fastalign.policy_loss(lp, lp.detach() + 0.01, A, m, loss_type="kl_cov", cov_ratio=ratio,
                                   backend=cpu_backend)
    k = max(math.floor(ratio * n), 1)
    assert float(met["cov_selected_frac"]) * n == pytest.approx(k, abs=1e-3)


def test_clip_cov_picked_token_with_an_infinite_ratio_passes_no_gradient(cpu_backend):
    """A picked token's pg is 0 with no gradient (docs/math.md), also where exp(lp - old) overflows."""
    lp = torch.tensor([[-0.5, -1.0, -0.2, -0.7], [-0.3, -0.9, -1.2, -0.4]])
    old = lp + 0.05
    old[0, 0] = -math.inf
    A = torch.tensor([[-1.0], [0.5]]).expand(2, 4).contiguous()
    m = torch.ones(2, 4)
    kw = dict(loss_type="clip_cov", cov_ratio=1.0, cov_lb=-100.0, cov_ub=100.0)
    loss, met, g = _fa(cpu_backend, lp, old, A, m, **kw)
    sel = cov_selection(lp, old, A, m, loss_type="clip_cov", eps_low=0.2, eps_high=0.2, ratio=1.0, lb=-100.0,
                        ub=100.0)
    assert bool(sel[0, 0]), "the infinite-ratio token is a candidate, and every candidate is picked"
    rloss, _, rg = _ref(lp, old, A, m, loss_type="clip_cov", cov_selected=sel)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    _close(loss, rloss, "loss")
    _close(g, rg, "d loss / d lp")


@pytest.mark.parametrize("name", ["cov_lb", "cov_ub"])
def test_cov_bounds_apply_to_clip_cov_only(name):
    # kl_cov takes the top k tokens by covariance (verl's kl_cov reads kl_cov_ratio and ppo_kl_coef only)
    with pytest.raises(ValueError, match=rf"^{name} does not apply to loss_type 'kl_cov' \(only clip_cov read it\)"):
        fastalign.PolicyConfig(loss_type="kl_cov", cov_ratio=0.3, **{name: 100.0})
    lp, old, A, m, _ = _small()
    with pytest.raises(ValueError, match=name):
        fastalign.policy_loss(lp, old, A, m, loss_type="kl_cov", **{name: -5.0})
    with pytest.raises(ValueError, match=rf"^{name} does not apply to loss_type 'ppo' \(only clip_cov read it\)"):
        fastalign.PolicyConfig(loss_type="ppo", **{name: 2.0})
    fastalign.PolicyConfig(loss_type="clip_cov", **{name: 0.5 if name == "cov_lb" else 6.0})
    with pytest.raises(ValueError, match=r"^cov_ratio does not apply to loss_type 'ppo' \(only clip_cov, kl_cov read"):
        fastalign.PolicyConfig(loss_type="ppo", cov_ratio=0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kl_cov_tie_picks_the_same_token_on_every_backend(backend):
    """One response with one advantage: every covariance (A_t - mean A)(lp_t - mean lp) is exactly 0 when mean A is
    A, a tie that the lowest index breaks. The C++ kernel summed a row's advantages in fp32 (5.1839113 for
    6 x 0.8639853 = 5.1839118), so mean A missed A and its pick followed the rounding (token 2); every backend sums
    in fp64 now and picks token 0."""
    lp = torch.tensor([[-1.0864216, -0.5820426, -0.4137324, -1.4406482, -1.3513318, -1.3971899]])
    old = torch.tensor([[-0.7010169, -0.6207702, -0.1541792, -1.2357496, -1.3051685, -1.5117457]])
    A = torch.full((1, 6), 0.8639853000640869)
    m = torch.ones(1, 6)
    x = lp.clone().requires_grad_(True)
    loss, _ = fastalign.policy_loss(x, old, A, m, loss_type="kl_cov", cov_ratio=1e-4, cov_kl_coef=1.0, backend=backend)
    loss.backward()
    unpenalised = -A * torch.exp(lp - old) / 6
    assert ((x.grad - unpenalised).abs() > 1e-6).nonzero()[:, 1].tolist() == [0]


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_selection_refuses_2_to_the_32_tokens(loss_type):
    # a token's position is the low 32 bits of its selection key: 2**32 tokens would alias positions 0 and 2**32
    # (views of one element, so nothing of that size is allocated; the refusal comes before any copy)
    big = torch.zeros(1).expand(2 ** 16, 2 ** 16)
    with pytest.raises(ValueError, match=rf"^loss_type '{loss_type}' selects among fewer than 2\*\*32 tokens"):
        fastalign.policy_loss(big, big, big, big, loss_type=loss_type)


def test_verl_kl_cov_profile_leaves_out_the_clip_cov_bounds():
    # verl's policy_loss config always carries clip_cov_lb / clip_cov_ub; its kl_cov never reads them
    from fastalign.integrations.verl.policy import verl_policy_config

    pl = dict(loss_mode="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.1, clip_cov_ratio=0.5, clip_cov_lb=1.0,
              clip_cov_ub=5.0)
    cfg = verl_policy_config(dict(policy_loss=pl))
    assert (cfg.loss_type, cfg.cov_ratio, cfg.cov_kl_coef, cfg.cov_lb, cfg.cov_ub) == ("kl_cov", 0.1, 0.1, None, None)


# ------------------------------------------------------------------ gmpo's count of sequences (docs/math.md)

def _gmpo_with_an_empty_row():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 5, generator=g)
    old = lp + 0.3 * torch.randn(4, 5, generator=g)
    A = torch.randn(4, generator=g)[:, None].expand(4, 5).contiguous()
    m = torch.ones(4, 5)
    m[3] = 0
    m[1, 3:] = 0
    return lp, old, A, m


def test_gmpo_divides_by_every_row_as_verl_geo_mean(cpu_backend):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable")
    actor_config = pytest.importorskip("verl.workers.config.actor", reason="verl is not importable")
    lp, old, A, m = _gmpo_with_an_empty_row()
    actor = actor_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                                     policy_loss=actor_config.PolicyLossConfig(loss_mode="geo_mean"))
    x = lp.double().requires_grad_(True)
    want, _ = core_algos.compute_policy_loss_geo_mean(old.double(), x, A.double(), m.bool(), config=actor)
    want.backward()
    loss, _, grad = _fa(cpu_backend, lp, old, A, m, loss_type="gmpo")
    _close(loss, want.detach(), "gmpo loss (every row)")
    _close(grad, x.grad, "gmpo grad (every row)")
    # seq_count="nonempty": the same sum over the 3 non-empty rows
    loss_ne, _, grad_ne = _fa(cpu_backend, lp, old, A, m, loss_type="gmpo", seq_count="nonempty")
    _close(loss_ne, want.detach() * 4 / 3, "gmpo loss (non-empty rows)")
    _close(grad_ne, x.grad * 4 / 3, "gmpo grad (non-empty rows)")


# ------------------------------------------------------------------ every metric is documented in docs/math.md

def test_every_policy_metric_is_in_the_math_table():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "math.md").read_text()
    table = text[text.index("### Metrics {#policy-metrics}"):text.index("### Clip-Cov and KL-Cov")]
    documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    lp, old, A, m, ref = _small()
    H = torch.rand(2, 4)
    returned = set()
    for kw in (dict(loss_type="ppo", dual_clip=3.0), dict(loss_type="gspo"), dict(loss_type="cispo"),
               dict(loss_type="gmpo"), dict(loss_type="clip_cov", cov_ratio=0.5), dict(loss_type="kl_cov"),
               dict(loss_type="vespo"), dict(loss_type="dppo_tv"), dict(loss_type="sapo"),
               dict(loss_type="grpo", entropy_coef=0.1, entropy_agg="token-mean")):
        _, met = fastalign.policy_loss(lp, old, A, m, ref_logprobs=ref, entropy=H, **kw)
        returned |= set(met)
    assert {"clip_low", "clip_high", "clip_region", "clip_low_min", "clip_high_max", "kl_term", "entropy_term",
            "policy_term", "cov_selected_frac", "phi_mean"} <= returned
    assert returned <= documented, sorted(returned - documented)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_counts_below_one_divide_as_verl_agg_loss(agg):
    """A fractional mask whose rows (and whole) sum below 1, and a global count below 1 (a count divided by
    the accumulation steps), are divided by as they are, as verl's agg_loss does; a count of 0 gives 0."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable")
    g = torch.Generator().manual_seed(11)
    L = torch.randn(3, 4, generator=g, dtype=torch.float64)
    m = torch.tensor([[0.2, 0.1, 0.0, 0.0], [0.3, 0.0, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # seq-mean-token-sum-norm's local count is every row by default (TRL's, docs/math.md), verl's the non-empty
    kw = dict(seq_count="nonempty") if agg == "seq-mean-token-sum-norm" else {}
    got = fastalign.aggregate_loss(L.float(), m.float(), agg, **kw)
    want = core_algos.agg_loss(L, m, agg)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (agg, got, want)
    if agg == "seq-mean-token-sum-norm":
        every_row = fastalign.aggregate_loss(L.float(), m.float(), agg)
        assert torch.allclose(every_row.double(), want * 2 / 3, rtol=1e-5, atol=1e-7), (every_row, want)
    ours, verls = {"token-mean": (dict(global_tokens=0.5), dict(batch_num_tokens=0.5)),
                   "token-sum": ({}, {})}.get(agg, (dict(global_seqs=0.75), dict(global_batch_size=0.75)))
    got = fastalign.aggregate_loss(L.float(), m.float(), agg, dp_size=2, **ours)
    want = core_algos.agg_loss(L, m, agg, dp_size=2, **verls)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (agg, got, want)
    empty = fastalign.aggregate_loss(L.float(), torch.zeros_like(m, dtype=torch.float32), agg)
    assert empty.item() == 0.0


# ------------------------------------------------------------------ options that the loss type does not read

@pytest.mark.parametrize("loss_type", [t for t in fastalign.POLICY_LOSS_TYPES if t != "clip_cov"])
def test_generator_applies_to_clip_cov_only(loss_type):
    """``generator`` seeds Clip-Cov's random choice of tokens; every other loss type (kl_cov takes the top
    covariances) drew nothing from it and took it silently. It raises naming ``generator`` now."""
    lp, old, A, m, _ = _small()
    kw = dict(loss_type=loss_type, **(dict(dro_beta=0.1) if loss_type == "dro" else {}))
    with pytest.raises(ValueError, match=f"generator does not apply to loss_type '{loss_type}'"):
        fastalign.policy_loss(lp, old, A, m, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match="generator"):
        fastalign.PolicyLoss(**kw)(lp, old, A, m, generator=torch.Generator())
    fastalign.policy_loss(lp, old, A, m, **kw)


def test_clip_cov_takes_a_generator_and_kl_cov_draws_nothing(cpu_backend):
    """clip_cov: a generator with the same seed gives the same choice (loss and gradient). kl_cov's choice is
    deterministic (the float64 reference's top covariances): it leaves torch's global generator as it was."""
    from fastalign.reference.policy import cov_selection
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 16, generator=g) * 2.0
    old = lp + 0.3 * torch.randn(4, 16, generator=g)
    A, m = torch.randn(4, 1, generator=g).expand(4, 16), torch.ones(4, 16)
    runs = []
    for _ in range(2):
        x = lp.clone().requires_grad_(True)
        loss, _ = fastalign.policy_loss(x, old, A, m, loss_type="clip_cov", cov_ratio=0.2, cov_lb=-10.0,
                                        cov_ub=10.0, generator=torch.Generator().manual_seed(7), backend=cpu_backend)
        loss.backward()
        runs.append((loss.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    state = torch.get_rng_state()
    x = lp.clone().requires_grad_(True)
    loss, _ = fastalign.policy_loss(x, old, A, m, loss_type="kl_cov", cov_ratio=0.1, backend=cpu_backend)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), state), "kl_cov drew from the global generator"
    want = cov_selection(lp, old, A, m, loss_type="kl_cov", eps_low=0.2, eps_high=0.2, ratio=0.1, lb=1.0, ub=5.0)
    plain = -(A * torch.exp(lp - old)) / m.sum()
    got = (x.grad - plain).abs() > 1e-4  # a selected token's gradient carries the |l| term's sign(l) / N
    assert torch.equal(got, want.bool())


def test_grad_skip_threshold_has_no_effect_on_the_cpp_backward():
    """As documented (docs/backends.md): ``grad_skip_threshold`` applies to the Triton backward; the cpp backward
    keeps every logit tile, so a threshold there gives the gradient of 0 exactly (not refused, so one
    configuration runs on both devices). The gradient is the float64 softmax's."""
    g = torch.Generator().manual_seed(1)
    h, W, y = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g) * 0.4, torch.randint(0, 40, (6,),
                                                                                                    generator=g)
    grads = []
    for threshold in (0.0, 10.0):
        x = h.clone().requires_grad_(True)
        fastalign.linear_logprobs(x, W, y, backend="cpp", grad_skip_threshold=threshold).logprobs.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    x = h.double().requires_grad_(True)
    torch.log_softmax(x @ W.double().T, -1).gather(1, y[:, None]).sum().backward()
    torch.testing.assert_close(grads[1].double(), x.grad, atol=1e-5, rtol=1e-5)
