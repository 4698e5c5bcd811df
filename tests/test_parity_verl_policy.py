"""VerlPolicyLoss (fastalign.integrations.verl) against verl 0.9.1's own loss code.

verl's actor loss is ``get_policy_loss_fn(loss_mode)(...)`` (called here with a real
``ActorConfig``) minus ``entropy_coeff * agg_loss(entropy)`` plus ``kl_loss_coef *
agg_loss(kl_penalty(...))``, with the global-batch counts in ``config.global_batch_info`` —
the composition (and the metric names) of ``verl.workers.utils.losses.ppo_loss``. Loss,
d(loss)/d(log_prob), d(loss)/d(entropy) and every metric are compared (verl in float64,
fastalign in fp32).
"""
import pytest
import torch

from helpers import assert_close

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable")
actor_config = pytest.importorskip("verl.workers.config.actor", reason="verl is not importable")

from fastalign.integrations.verl import VerlPolicyLoss, verl_policy_config  # noqa: E402


def make_actor(loss_mode="vanilla", policy_loss=None, **kw):
    pl = actor_config.PolicyLossConfig(loss_mode=loss_mode, **(policy_loss or {}))
    return actor_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=pl,
                                    **kw)


def verl_loss(actor, lp, old, A, m, *, H=None, ref=None, is_w=None, dp_size=1, batch_num_tokens=None,
              global_batch_size=None):
    lp = lp.double().clone().requires_grad_(True)
    H = None if H is None else H.double().clone().requires_grad_(True)
    actor.global_batch_info.update(dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                                   global_batch_size=global_batch_size, loss_scale_factor=actor.loss_scale_factor)
    mask = m.bool()
    fn = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)
    loss, metrics = fn(old_log_prob=old.double(), log_prob=lp, advantages=A.double(), response_mask=mask,
                       loss_agg_mode=actor.loss_agg_mode, config=actor,
                       rollout_is_weights=None if is_w is None else is_w.double())
    metrics["actor/pg_loss"] = loss.detach()
    if H is not None:
        ent = core_algos.agg_loss(loss_mat=H, loss_mask=mask, loss_agg_mode=actor.loss_agg_mode,
                                  **actor.global_batch_info)
        loss = loss - actor.entropy_coeff * ent
        metrics["actor/entropy_loss"] = ent.detach()
    if actor.use_kl_loss:
        kld = core_algos.kl_penalty(logprob=lp, ref_logprob=ref.double(), kl_penalty=actor.kl_loss_type)
        kl = core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=actor.loss_agg_mode,
                                 **actor.global_batch_info)
        loss = loss + kl * actor.kl_loss_coef
        metrics["kl_loss"], metrics["kl_coef"] = kl.detach(), actor.kl_loss_coef
    loss.backward()
    return loss.detach(), lp.grad, None if H is None else H.grad, metrics


def batch(B=6, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * 0.25
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    lengths = torch.randint(2, T + 1, (B, 1), generator=g)
    m = torch.arange(T)[None, :] < lengths
    m[2] = False  # an empty response
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    H = torch.rand(B, T, generator=g) * 3.0
    w = torch.rand(B, T, generator=g) + 0.5
    return dict(lp=lp, old=old, A=A, m=m, ref=ref, H=H, w=w)


KL = dict(use_kl_loss=True, kl_loss_coef=0.05)
CASES = {
    "vanilla": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coeff=0.01, **KL),
    "vanilla_seq_mean_token_mean": dict(loss_agg_mode="seq-mean-token-mean", clip_ratio_c=2.0, **KL),
    "vanilla_seq_mean_token_sum": dict(loss_agg_mode="seq-mean-token-sum", entropy_coeff=0.02),
    "vanilla_token_sum_norm": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=16, **KL),
    "vanilla_token_sum": dict(loss_agg_mode="token-sum", kl_loss_type="k1", **KL),
    "vanilla_is_weights": dict(is_weights=True, kl_loss_type="k3+", **KL),
    "gspo": dict(loss_mode="gspo", clip_ratio_low=0.01, clip_ratio_high=0.01, kl_loss_type="abs", **KL),
    "gspo_seq_mean": dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean", is_weights=True),
    "sapo_token_mean_terms": dict(loss_mode="sapo", tau_neg=1.3, entropy_coeff=0.01, kl_loss_type="mse", **KL),
    "sapo_seq_mean": dict(loss_mode="sapo", loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01, **KL),
    "gpg": dict(loss_mode="gpg", loss_agg_mode="seq-mean-token-mean", **KL),
    "clip_cov_all_picked": dict(loss_mode="clip_cov", policy_loss=dict(clip_cov_ratio=1.0, clip_cov_lb=-1.0,
                                                                         clip_cov_ub=5.0)),
    # verl takes min(int(ratio n), #candidates) tokens: above 1, every candidate, as 1.0
    "clip_cov_ratio_above_1": dict(loss_mode="clip_cov", policy_loss=dict(clip_cov_ratio=2.0, clip_cov_lb=-1.0,
                                                                            clip_cov_ub=5.0)),
    "kl_cov": dict(loss_mode="kl_cov", policy_loss=dict(kl_cov_ratio=0.1, ppo_kl_coef=0.1), **KL),
    "geo_mean": dict(loss_mode="geo_mean", clip_ratio_low=0.1, clip_ratio_high=0.15, is_weights=True, **KL),
    "geo_mean_seq_terms": dict(loss_mode="geo_mean", loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01),
    # the terms apart from a policy term that aggregates itself, over the non-empty sequences (an empty one here)
    "geo_mean_token_sum_norm_terms": dict(loss_mode="geo_mean", loss_agg_mode="seq-mean-token-sum-norm",
                                          loss_scale_factor=16, entropy_coeff=0.01, **KL),
    "sapo_token_sum_norm_terms": dict(loss_mode="sapo", loss_agg_mode="seq-mean-token-sum-norm", entropy_coeff=0.01,
                                      **KL),
    "cispo": dict(loss_mode="cispo", clip_ratio_low=0.1, clip_ratio_high=0.1, entropy_coeff=0.01),
    "dppo_tv": dict(loss_mode="dppo_tv", clip_ratio_low=0.05, clip_ratio_high=0.03, clip_ratio_c=1.1,
                    entropy_coeff=0.01, **KL),
    "dppo_tv_is_weights": dict(loss_mode="dppo_tv", loss_agg_mode="seq-mean-token-mean", is_weights=True),
    "dppo_kl": dict(loss_mode="dppo_kl", clip_ratio_low=0.01, clip_ratio_high=0.02, clip_ratio_c=1.2, **KL),
    "dppo_kl_token_sum_norm": dict(loss_mode="dppo_kl", loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=16,
                                   is_weights=True, entropy_coeff=0.01),
    "dro": dict(loss_mode="dro", policy_loss=dict(dro_beta=0.5), entropy_coeff=0.01, is_weights=True, **KL),
    "dro_seq_mean_token_sum": dict(loss_mode="dro", policy_loss=dict(dro_beta=2.0),
                                   loss_agg_mode="seq-mean-token-sum"),
}


def assert_tie_free_cov(lp, A, m):
    """KL-Cov's top-k breaks ties differently from verl's ``torch.topk`` (docs/parity-policy.md "Not covered"):
    the parity data must hold distinct covariances ``(A - mean A)(lp - mean lp)`` over the valid tokens."""
    v = m.bool()
    a, x = A[v].double(), lp[v].double()
    cov = (a - a.mean()) * (x - x.mean())
    assert torch.unique(cov).numel() == cov.numel(), "tied covariances: KL-Cov's choice among them is not verl's"


def _run(case, d, dp):
    kw = dict(CASES[case])
    is_w = d["w"] if kw.pop("is_weights", False) else None
    if kw.get("loss_mode") == "kl_cov":
        assert_tie_free_cov(d["lp"], d["A"], d["m"])
    actor = make_actor(**kw)
    n_tok, n_seq = int(d["m"].sum()), int((d["m"].sum(-1) > 0).sum())
    glob = dict(dp_size=2, batch_num_tokens=2 * n_tok + 3, global_batch_size=2 * n_seq + 1) if dp else {}
    vl, vg, vh, vm = verl_loss(actor, d["lp"], d["old"], d["A"], d["m"], H=d["H"], ref=d["ref"], is_w=is_w, **glob)
    x = d["lp"].clone().requires_grad_(True)
    h = d["H"].clone().requires_grad_(True)
    loss, met = VerlPolicyLoss(make_actor(**kw))(x, d["old"], d["A"], d["m"], entropy=h, ref_log_prob=d["ref"],
                                                 rollout_is_weights=is_w, **glob)
    loss.backward()
    assert_close(loss, vl, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, vg, atol=1e-6, rtol=1e-5, what="d log_prob")
    zeros = torch.zeros(d["H"].shape)
    assert_close(zeros if h.grad is None else h.grad, zeros if vh is None else vh, atol=1e-6, rtol=1e-5,
                 what="d entropy")
    assert set(met) == set(vm), (sorted(met), sorted(vm))
    for k, v in vm.items():
        assert_close(met[k], torch.tensor(float(v), dtype=torch.float64), atol=1e-6, rtol=1e-6, what=f"metric {k}")
    return vm


@pytest.mark.parametrize("dp", [False, True], ids=["local", "dp2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_actor_loss_matches_verl(case, dp):
    _run(case, batch(seed=sorted(CASES).index(case)), dp)


@pytest.mark.parametrize("case", ["vanilla_is_weights", "gspo_seq_mean", "geo_mean", "dppo_tv_is_weights", "dro"])
def test_per_sequence_is_weights_as_verl(case):
    """``rollout_is_weights`` of shape ``[B, 1]`` (one weight per sequence) broadcast over the tokens in verl's
    ``pg_losses * rollout_is_weights``; the profile takes them and gives verl's loss, gradient and metrics."""
    d = batch(seed=50 + sorted(CASES).index(case))
    d["w"] = d["w"][:, :1].contiguous()
    _run(case, d, False)


def test_clip_metrics_are_exercised():
    d = batch(seed=40)
    vm = _run("vanilla", d, False)
    assert vm["actor/pg_clipfrac"] > 0 and vm["actor/pg_clipfrac_lower"] >= 0
    d["old"] = d["lp"] + 2.0 * (d["A"] > 0) - 2.0 * (d["A"] <= 0)  # ratios far outside: the dual clip binds
    vm = _run("vanilla", d, False)
    assert vm["actor/pg_clipfrac_lower"] > 0
    vm = _run("geo_mean", batch(seed=41), False)
    assert vm["actor/pg_clipfrac"] > 0 or vm["actor/pg_clipfrac_lower"] > 0
    d = batch(seed=44)
    d["old"] = d["old"].clamp(max=-1e-3)  # log-probs: the binary KL is finite everywhere
    for case in ("dppo_tv", "dppo_kl"):  # the divergence bound and the ratio truncation both bind
        vm = _run(case, d, False)
        assert 0 < vm["actor/pg_clipfrac"] < 1 and 0 < vm["actor/pg_clipfrac_lower"] < 1, (case, vm)


def test_triton_kernel_matches_verl():
    import fastalign

    d = batch(B=4, T=7, seed=42)
    with fastalign.use_backend("triton"):
        for case in ("vanilla_is_weights", "geo_mean", "gspo_seq_mean", "sapo_token_mean_terms", "dppo_tv", "dppo_kl",
                     "dro"):
            _run(case, d, True)


def test_unsupported_loss_mode_raises():
    with pytest.raises(ValueError, match="bypass_mode"):
        VerlPolicyLoss(make_actor("bypass_mode"))
    with pytest.raises(ValueError, match="dro_beta"):
        VerlPolicyLoss(make_actor("dro"))


def test_dict_config_equals_actor_config():
    d = batch(seed=43)
    kw = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05,
              loss_agg_mode="seq-mean-token-mean")
    as_dict = {**kw, "policy_loss": {"loss_mode": "vanilla"}}
    l1, m1 = VerlPolicyLoss(make_actor(**kw))(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"],
                                              ref_log_prob=d["ref"])
    l2, m2 = VerlPolicyLoss(as_dict)(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], ref_log_prob=d["ref"])
    assert torch.equal(l1, l2) and m1.keys() == m2.keys()


def test_gspo_cap_passes_no_gradient():
    """verl's gspo clamps the sequence log-ratio at 10 with torch.clamp: no gradient beyond the cap."""
    d = batch(seed=45)
    d["old"] = d["old"].clone()
    d["old"][0] = d["lp"][0] - 11.0  # row 0: mean log-ratio 11 > 10
    d["A"] = d["A"].clone()
    d["A"][0] = -1.0  # the unclipped branch -A s is active
    kw = dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean")
    for backend in ("cpp", "triton"):
        import fastalign

        with fastalign.use_backend(backend):
            vl, vg, _, _ = verl_loss(make_actor(**kw), d["lp"], d["old"], d["A"], d["m"])
            x = d["lp"].clone().requires_grad_(True)
            loss, _ = VerlPolicyLoss(make_actor(**kw))(x, d["old"], d["A"], d["m"])
            loss.backward()
        assert_close(loss, vl, atol=1e-6, rtol=1e-5, what=f"{backend} loss")
        assert_close(x.grad, vg, atol=1e-6, rtol=1e-5, what=f"{backend} d log_prob")
        assert (x.grad[0] == 0).all()
    # the float64 reference the kernel tests compare with caps there too
    from fastalign import reference

    x = d["lp"].double().requires_grad_(True)
    rloss, _ = reference.policy_loss(x, d["old"].double(), d["A"].double(), d["m"], loss_type="gspo",
                                     agg="seq-mean-token-mean")
    rloss.backward()
    assert_close(rloss, vl, atol=1e-12, rtol=1e-12, what="reference loss")
    assert_close(x.grad, vg, atol=1e-12, rtol=1e-12, what="reference d log_prob")


@pytest.mark.parametrize("case", ["vanilla", "cispo", "sapo_token_mean_terms", "dppo_tv", "dppo_kl", "gspo"])
def test_ppo_kl_metric_is_clamped_as_verl(case):
    """actor/ppo_kl: verl clamps the log-ratio to [-20, 20] in vanilla, cispo, sapo, dppo_tv, dppo_kl (gspo: not)."""
    d = batch(seed=46)
    d["old"] = d["old"].clone()
    d["old"][1, :3] = d["lp"][1, :3] - 30.0  # |l| > 20 on valid tokens
    d["old"][3, :2] = (d["lp"][3, :2] + 25.0).clamp(max=-1e-3)
    vm = _run(case, d, False)
    m = d["m"].double()
    raw = ((d["old"].double() - d["lp"].double()) * m).sum() / m.sum()
    assert (abs(vm["actor/ppo_kl"] - float(raw)) > 0.1) == (case != "gspo")  # the data exercise the clamp


@pytest.mark.parametrize("mode", ["vanilla", "cispo", "dppo_tv", "dppo_kl", "kl_cov"])
def test_ppo_kl_metric_leaves_nan_in_masked_slots_out_as_verl(mode):
    """A NaN old log-prob on masked positions (padding) never reaches verl's ``masked_mean`` (its ``masked_sum``
    selects the valid tokens with ``torch.where``): ``actor/ppo_kl`` and the loss stay verl's finite values."""
    d = batch(seed=48)
    old = d["old"].clone()
    old[~d["m"]] = float("nan")
    actor = make_actor(mode, dict(kl_cov_ratio=0.1) if mode == "kl_cov" else None)
    if mode == "kl_cov":
        assert_tie_free_cov(d["lp"], d["A"], d["m"])
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
    theirs, vm = core_algos.get_policy_loss_fn(mode)(
        old_log_prob=old.double(), log_prob=d["lp"].double(), advantages=d["A"].double(), response_mask=d["m"],
        loss_agg_mode=actor.loss_agg_mode, config=actor)
    ours, met = VerlPolicyLoss(actor, policy_term_only=True)(d["lp"], old, d["A"], d["m"])
    assert torch.isfinite(theirs) and torch.isfinite(torch.tensor(vm["actor/ppo_kl"]))
    assert_close(ours, theirs, atol=1e-6, rtol=1e-6, what=f"{mode} loss")
    assert set(met) - {"actor/pg_loss"} == set(vm), (sorted(met), sorted(vm))
    for k, v in vm.items():
        assert_close(met[k], torch.tensor(float(v), dtype=torch.float64), atol=1e-6, rtol=1e-6, what=f"{mode} {k}")


@pytest.mark.parametrize("mode,agg", [("vanilla", "seq-mean-token-mean"), ("vanilla", "seq-mean-token-sum"),
                                      ("vanilla", "seq-mean-token-sum-norm"), ("sapo", "token-sum"),
                                      ("vanilla", "token-mean"), ("geo_mean", "token-mean"), ("vanilla", "token-sum")])


def test_dp_without_global_counts_as_verl(mode, agg):
    """dp_size > 1 without the count of the aggregation: verl's agg_loss raises naming it; where verl
    computes (geo_mean's plain mean, token-sum), the profile computes the same."""
    d = batch(seed=47)
    kw = dict(loss_mode=mode, loss_agg_mode=agg)
    try:
        vl, vg, _, _ = verl_loss(make_actor(**kw), d["lp"], d["old"], d["A"], d["m"], dp_size=2)
    except ValueError as e:
        name = "global_batch_size" if "global_batch_size" in str(e) else "batch_num_tokens"
        with pytest.raises(ValueError, match=name):
            VerlPolicyLoss(make_actor(**kw))(d["lp"], d["old"], d["A"], d["m"], dp_size=2)
        return
    x = d["lp"].clone().requires_grad_(True)
    loss, _ = VerlPolicyLoss(make_actor(**kw))(x, d["old"], d["A"], d["m"], dp_size=2)
    loss.backward()
    assert_close(loss, vl, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, vg, atol=1e-6, rtol=1e-5, what="d log_prob")


@pytest.mark.parametrize("given", [False, True], ids=["no_entropy", "entropy"])
@pytest.mark.parametrize("coeff", [0.0, 0.01])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_dp_without_global_counts_entropy_as_verl(agg, coeff, given):
    """geo_mean's policy term reads no count, so with ``dp_size > 1`` only the entropy aggregation can need one.
    verl's actor aggregates the entropy whenever it is given (for ``actor/entropy_loss``, whatever
    ``entropy_coeff``) and skips it without one: it raises naming the count in the first case and computes in
    the second; the profile does the same."""
    d = batch(seed=49)
    kw = dict(loss_mode="geo_mean", loss_agg_mode=agg, entropy_coeff=coeff)
    H = d["H"] if given else None
    try:
        vl, vg, _, vm = verl_loss(make_actor(**kw), d["lp"], d["old"], d["A"], d["m"], H=H, dp_size=2)
    except ValueError as e:
        name = "global_batch_size" if "global_batch_size" in str(e) else "batch_num_tokens"
        with pytest.raises(ValueError, match=name):
            VerlPolicyLoss(make_actor(**kw))(d["lp"], d["old"], d["A"], d["m"], entropy=H, dp_size=2)
        return
    x = d["lp"].clone().requires_grad_(True)
    loss, met = VerlPolicyLoss(make_actor(**kw))(x, d["old"], d["A"], d["m"], entropy=H, dp_size=2)
    loss.backward()
    assert_close(loss, vl, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, vg, atol=1e-6, rtol=1e-5, what="d log_prob")
    assert set(met) == set(vm), (sorted(met), sorted(vm))


@pytest.mark.parametrize("mode,agg", [("vanilla", "token-mean"), ("gspo", "token-mean"), ("geo_mean", "token-mean"),
                                      ("sapo", "token-mean"), ("sapo", "seq-mean-token-mean")])


def test_entropy_coeff_without_entropy_leaves_the_term_out_as_verl(mode, agg):
    """verl's loss skips the entropy term when no entropy is given; the fused modes raised instead and the others
    skipped it, by mode. Every mode now equals verl's own loss without the term."""
    d = batch(seed=3)
    actor = make_actor(mode, entropy_coeff=0.01, loss_agg_mode=agg)
    want, want_grad, _, _ = verl_loss(actor, d["lp"], d["old"], d["A"], d["m"])
    lp = d["lp"].clone().requires_grad_(True)
    loss, _ = VerlPolicyLoss(actor)(lp, d["old"], d["A"], d["m"])
    loss.backward()
    assert_close(loss.double(), want, rtol=1e-5, atol=1e-6, what=f"{mode} loss")
    assert_close(lp.grad.double(), want_grad, rtol=1e-5, atol=1e-6, what=f"{mode} grad")


#: case -> (CASES key, global counts): the counts (and loss_scale_factor) in the config's global_batch_info
INFO_CASES = {
    "vanilla_dp2": ("vanilla", True),
    "vanilla_local_counts": ("vanilla", False),
    "seq_mean_token_mean_dp2": ("vanilla_seq_mean_token_mean", True),
    "token_sum_norm_dp2": ("vanilla_token_sum_norm", True),
    "token_sum_norm_local": ("vanilla_token_sum_norm", False),
    "sapo_dp2": ("sapo_token_mean_terms", True),
    "geo_mean_dp2": ("geo_mean_seq_terms", True),
    "dppo_kl_token_sum_norm_dp2": ("dppo_kl_token_sum_norm", True),
}


def _info_counts(d, dp):
    n_tok, n_seq = int(d["m"].sum()), int((d["m"].sum(-1) > 0).sum())
    if dp:
        return dict(dp_size=2, batch_num_tokens=2 * n_tok + 3, global_batch_size=2 * n_seq + 1)
    return dict(dp_size=1, batch_num_tokens=n_tok + 2, global_batch_size=n_seq + 1)


def _direct(actor, d, kw, is_w, **counts):
    x = d["lp"].clone().requires_grad_(True)
    loss, met = VerlPolicyLoss(actor)(x, d["old"], d["A"], d["m"], entropy=d["H"], ref_log_prob=d["ref"],
                                      rollout_is_weights=is_w, **counts)
    loss.backward()
    return loss.detach(), x.grad, met


def _assert_equals_verl(got, want, what):
    (loss, grad, met), (vl, vg, _, vm) = got, want
    assert_close(loss, vl, atol=1e-6, rtol=1e-6, what=f"{what} loss")
    assert_close(grad, vg, atol=1e-6, rtol=1e-5, what=f"{what} d log_prob")
    assert set(met) == set(vm), (sorted(met), sorted(vm))
    for k, v in vm.items():
        assert_close(met[k], torch.tensor(float(v), dtype=torch.float64), atol=1e-6, rtol=1e-6, what=f"{what} {k}")


@pytest.mark.parametrize("case", sorted(INFO_CASES))
def test_counts_from_global_batch_info_as_verl(case):
    """A call without counts reads the config's ``global_batch_info`` (dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor), where verl's loss reads them; counts given to the call win, as verl's
    actor loss writes the batch's counts there before its loss mode reads them."""
    key, dp = INFO_CASES[case]
    d = batch(seed=60 + sorted(INFO_CASES).index(case))
    kw = dict(CASES[key])
    is_w = d["w"] if kw.pop("is_weights", False) else None
    counts = _info_counts(d, dp)
    actor = make_actor(**kw)
    want = verl_loss(actor, d["lp"], d["old"], d["A"], d["m"], H=d["H"], ref=d["ref"], is_w=is_w, **counts)
    info = dict(actor.global_batch_info)  # what verl's loss read, loss_scale_factor included
    _assert_equals_verl(_direct(actor, d, kw, is_w), want, "counts from the config")
    # loss_scale_factor only in global_batch_info (the attribute unset): verl's loss reads it there
    if kw.get("loss_scale_factor") is not None:
        bare = make_actor(**{**kw, "loss_scale_factor": None})
        bare.global_batch_info.update(info)
        _assert_equals_verl(_direct(bare, d, kw, is_w), want, "loss_scale_factor from global_batch_info")
    # stale counts in the config, the batch's given to the call: the call's, as verl's actor loss
    stale = make_actor(**kw)
    stale.global_batch_info.update(info, dp_size=4, batch_num_tokens=1000, global_batch_size=99)
    _assert_equals_verl(_direct(stale, d, kw, is_w, **counts), want, "counts given to the call")


def test_loss_scale_factor_disagreeing_with_global_batch_info_raises():
    """The config's ``loss_scale_factor`` and ``global_batch_info["loss_scale_factor"]`` set and different: verl's
    actor loss would overwrite one with the other; the profile names both rather than pick one."""
    d = batch(seed=5)
    actor = make_actor(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=16)
    actor.global_batch_info.update(loss_scale_factor=64)
    with pytest.raises(ValueError, match=r"loss_scale_factor=16 .*global_batch_info\['loss_scale_factor'\]=64"):
        VerlPolicyLoss(actor)(d["lp"], d["old"], d["A"], d["m"])


def test_errors_name_verl_keys():
    """Bad verl values raised errors naming fastalign's fields (dual_clip, max_len, sapo_tau_pos, cov_ratio, kl_coef,
    global_seqs); they name verl's keys now, and a missing ref_log_prob is one ValueError in every mode."""
    d = batch(seed=4)
    args = (d["lp"], d["old"], d["A"], d["m"])
    for actor, match in ((lambda: make_actor(clip_ratio_c=1.0), "^clip_ratio_c must be > 1"),
                         (lambda: make_actor(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=0),
                          "^loss_scale_factor must be"),
                         (lambda: make_actor("sapo", tau_pos=0.0), "^tau_pos must be > 0"),
                         (lambda: make_actor("kl_cov", dict(kl_cov_ratio=0.0)), r"^policy_loss\.kl_cov_ratio must"),
                         (lambda: make_actor("clip_cov", dict(clip_cov_lb=5.0, clip_cov_ub=1.0)),
                          r"^policy_loss\.clip_cov_lb must be < policy_loss\.clip_cov_ub"),
                         (lambda: make_actor(use_kl_loss=True, kl_loss_coef=float("nan")), "^kl_loss_coef must be")):
        with pytest.raises(ValueError, match=match):
            VerlPolicyLoss(actor())(*args, ref_log_prob=d["lp"])
    for actor, match in ((make_actor(use_kl_loss=True, kl_loss_type="k4"), "^kl_loss_type must be one of"),
                         (dict(use_kl_loss=True, kl_loss_type="k4"), "^kl_loss_type must be one of"),
                         (dict(loss_agg_mode="token_mean"), "^loss_agg_mode must be one of"),
                         (dict(policy_loss=dict(loss_mode="gspo"), loss_agg_mode="seq_mean"),
                          "^loss_agg_mode must be one of")):
        with pytest.raises(ValueError, match=match):
            VerlPolicyLoss(actor)(*args, ref_log_prob=d["lp"])
    with pytest.raises(ValueError, match="^loss_agg_mode must be one of"):
        VerlPolicyLoss(make_actor(), loss_agg_mode="token_mean")
    with pytest.raises(ValueError, match="^kl_loss_type must be one of"):
        verl_policy_config(dict(use_kl_loss=True, kl_loss_type="k4"))
    with pytest.raises(ValueError, match="^global_batch_size must be"):
        VerlPolicyLoss(make_actor(loss_agg_mode="seq-mean-token-mean"))(*args, global_batch_size=0)
    for mode in ("vanilla", "geo_mean", "sapo"):
        with pytest.raises(ValueError, match="use_kl_loss=True needs ref_log_prob"):
            VerlPolicyLoss(make_actor(mode, use_kl_loss=True))(*args)


def test_out_of_range_values_raise_under_verls_names():
    """Values the profile refuses (dppo's ratio truncation ``clip_ratio_c <= 0``, a sapo temperature ``<= 0``,
    ``dro_beta <= 0`` as verl's dro refuses it, ``clip_cov_lb >= clip_cov_ub``, a ``loss_scale_factor`` of 0 in
    ``global_batch_info``): the ``ValueError`` names verl's key, never fastalign's field (delta, sapo_tau_neg,
    loss_type, cov_lb, max_len)."""
    d = batch(seed=4)
    args = (d["lp"], d["old"], d["A"], d["m"])
    with pytest.raises(ValueError, match="dro_beta"):  # verl's own dro refuses it
        verl_loss(make_actor("dro", dict(dro_beta=0.0)), *args)
    lsf0 = make_actor(loss_agg_mode="seq-mean-token-sum-norm")
    lsf0.global_batch_info.update(loss_scale_factor=0)
    for actor, match in ((make_actor("dppo_tv", clip_ratio_c=0.0), "^clip_ratio_c must be > 0"),
                         (make_actor("dppo_kl", clip_ratio_c=-1.0), "^clip_ratio_c must be > 0"),
                         (make_actor("sapo", tau_neg=0.0), "^tau_neg must be > 0"),
                         (make_actor("dro", dict(dro_beta=0.0)), r"^policy_loss\.dro_beta must be > 0"),
                         (make_actor("clip_cov", dict(clip_cov_lb=2.0, clip_cov_ub=2.0)),
                          r"^policy_loss\.clip_cov_lb must be < policy_loss\.clip_cov_ub"),
                         (lsf0, r"^global_batch_info\['loss_scale_factor'\] must be")):
        with pytest.raises(ValueError, match=match):
            VerlPolicyLoss(actor)(*args)


def _dataclass_defaults(cls) -> dict:
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_dict_defaults_are_verls_dataclass_defaults():
    """Every default the profile gives a key a dict config lacks is verl's own, read from its ActorConfig and
    PolicyLossConfig dataclasses (the profile reads every default from these tables)."""
    from fastalign.integrations.verl import policy

    for table, cls in ((policy._ACTOR_DEFAULTS, actor_config.ActorConfig),
                       (policy._POLICY_LOSS_DEFAULTS, actor_config.PolicyLossConfig)):
        verl = _dataclass_defaults(cls)
        for key, value in table.items():
            assert key in verl, (cls.__name__, key)
            assert value == verl[key], (cls.__name__, key, value, verl[key])


#: per mode, the policy_loss keys a run must set (dro_beta), or that make the data exercise a default
#: (clip_cov / kl_cov: a ratio that selects tokens, so that the default bounds and ppo_kl_coef apply)
DICT_MODES = {"vanilla": {}, "gspo": {}, "sapo": {}, "gpg": {}, "clip_cov": dict(clip_cov_ratio=1.0),
              "kl_cov": dict(kl_cov_ratio=0.1), "geo_mean": {}, "cispo": {}, "dppo_tv": {}, "dppo_kl": {},
              "dro": dict(dro_beta=0.5)}


def _dict_defaults_batch(mode):
    d = batch(seed=70 + sorted(DICT_MODES).index(mode))
    lp, old = d["lp"].clone(), d["old"].clone()
    lp[0, :3] = torch.tensor([-5.0, -5.1, -5.2])  # ratio e^1.5 > clip_ratio_c 3 at tiny probabilities (dppo keeps them)
    old[0, :3] = lp[0, :3] - 1.5
    d.update(lp=lp, old=old)
    if mode == "clip_cov":  # covariances inside clip_cov's default bounds (1, 5)
        d["A"] = d["A"] * 3.0
    return d


@pytest.mark.parametrize("mode", sorted(DICT_MODES))
def test_dict_config_without_keys_takes_verls_defaults(mode):
    """A dict config holding only some keys equals verl's loss with the ActorConfig built from the same keys:
    the keys it lacks take verl's dataclass defaults (clip_ratio_low / clip_ratio_high 0.2 whatever
    clip_ratio, clip_ratio_c 3.0 in dppo, ppo_kl_coef 0.1), where they fell back to clip_ratio, 20.0 and 1.0."""
    from fastalign.integrations.verl.policy import _MODES

    assert set(DICT_MODES) == set(_MODES)
    d = _dict_defaults_batch(mode)
    if mode == "kl_cov":
        assert_tie_free_cov(d["lp"], d["A"], d["m"])
    keys = dict(clip_ratio=0.3, use_kl_loss=True)
    want = verl_loss(make_actor(mode, DICT_MODES[mode], **keys), d["lp"], d["old"], d["A"], d["m"], H=d["H"],
                     ref=d["ref"])
    as_dict = {**keys, "policy_loss": {"loss_mode": mode, **DICT_MODES[mode]}}
    _assert_equals_verl(_direct(as_dict, d, None, None), want, f"{mode} dict")
    if mode in ("dppo_tv", "dppo_kl"):  # the data exercise clip_ratio_c
        assert want[3]["actor/pg_clipfrac_lower"] > 0
    if mode == "clip_cov":  # and the default clip_cov_lb / clip_cov_ub select some tokens, not all
        assert 0 < want[3]["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("as_dict", [False, True], ids=["ActorConfig", "dict"])
def test_keys_set_to_none_take_verls_fallbacks(as_dict):
    """verl's loss modes take clip_ratio for a clip_ratio_low / clip_ratio_high of None, and kl_cov 1.0 for a
    ppo_kl_coef of None; the profile does the same, for an ActorConfig and for a dict."""
    d = batch(seed=80)
    assert_tie_free_cov(d["lp"], d["A"], d["m"])
    for mode, pl, keys in (("vanilla", {}, dict(clip_ratio=0.3, clip_ratio_low=None, clip_ratio_high=None)),
                           ("kl_cov", dict(kl_cov_ratio=0.1, ppo_kl_coef=None), {})):
        want = verl_loss(make_actor(mode, pl, **keys), d["lp"], d["old"], d["A"], d["m"], H=d["H"])
        cfg = {**keys, "policy_loss": {"loss_mode": mode, **pl}} if as_dict else make_actor(mode, pl, **keys)
        _assert_equals_verl(_direct(cfg, d, None, None), want, f"{mode} None")


@pytest.mark.parametrize("case", ["vanilla", "gspo", "sapo_token_mean_terms", "geo_mean", "dppo_kl", "dro",
                                  "vanilla_token_sum_norm"])


def test_float64_inputs_as_verl(case):
    """verl's loss takes float64 log-probs (its modes compute in the inputs' dtype) and returns a float64 loss; the
    profile refused float64 with a TypeError. It computes in float32 and returns the loss in float64; a single
    float64 operand (the advantages) promotes verl's loss to float64 too."""
    d = batch(seed=90 + sorted(CASES).index(case))
    kw = dict(CASES[case])
    is_w = d["w"] if kw.pop("is_weights", False) else None
    vl, vg, _, vm = verl_loss(make_actor(**kw), d["lp"], d["old"], d["A"], d["m"], H=d["H"], ref=d["ref"],
                              is_w=is_w)
    x = d["lp"].double().requires_grad_(True)
    loss, met = VerlPolicyLoss(make_actor(**kw))(
        x, d["old"].double(), d["A"].double(), d["m"], entropy=d["H"].double(), ref_log_prob=d["ref"].double(),
        rollout_is_weights=None if is_w is None else is_w.double())
    loss.backward()
    assert loss.dtype == vl.dtype == torch.float64 and x.grad.dtype == torch.float64
    _assert_equals_verl((loss.detach(), x.grad, met), (vl, vg, None, vm), f"{case} float64")
    # float32 log-probs, float64 advantages: verl's arithmetic promotes the loss to float64
    actor = make_actor(**kw)
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=None,
                                   loss_scale_factor=actor.loss_scale_factor)
    theirs, _ = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)(
        old_log_prob=d["old"], log_prob=d["lp"], advantages=d["A"].double(), response_mask=d["m"],
        loss_agg_mode=actor.loss_agg_mode, config=actor)
    ours, _ = VerlPolicyLoss(actor, policy_term_only=True)(d["lp"], d["old"], d["A"].double(), d["m"])
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close(ours, theirs, atol=1e-6, rtol=1e-6, what=f"{case} float64 advantages")


_BAD = {"None": lambda t: None, "list": lambda t: t.tolist(), "int64": lambda t: t.long(),
        "complex": lambda t: t.to(torch.complex64), "[B, T+1]": lambda t: torch.cat([t, t[:, :1]], 1)}


@pytest.mark.parametrize("arg, bad, error", [
    ("log_prob", "list", TypeError),  # a list reached float64_as_float32: AttributeError
    ("log_prob", "int64", TypeError),
    ("old_log_prob", "[B, T+1]", ValueError),
    ("old_log_prob", "None", TypeError),
    ("advantages", "list", TypeError),
    ("entropy", "list", TypeError),
    ("ref_log_prob", "int64", TypeError),
    ("ref_log_prob", "[B, T+1]", ValueError),
    ("rollout_is_weights", "complex", TypeError),
])


def test_bad_argument_raises_under_verls_name(arg, bad, error):
    """Named as verl names it (log_prob, old_log_prob, ref_log_prob, rollout_is_weights), never as fastalign's
    policy_loss does (logprobs, old_logprobs, ref_logprobs, importance_weights)."""
    x = torch.full((2, 3), -1.0)
    kw = dict(log_prob=x, old_log_prob=x, advantages=torch.ones(2, 3), response_mask=torch.ones(2, 3, dtype=torch.bool),
              entropy=x.abs(), ref_log_prob=x, rollout_is_weights=torch.ones(2, 3))
    kw[arg] = _BAD[bad](kw[arg])
    loss = VerlPolicyLoss({"use_kl_loss": True, "kl_loss_coef": 0.01, "entropy_coeff": 0.01})
    args = [kw.pop(k) for k in ("log_prob", "old_log_prob", "advantages", "response_mask")]
    with pytest.raises(error, match=f"^{arg} "):
        loss(*args, **kw)


@pytest.mark.parametrize("mode", ["vanilla", "geo_mean", "sapo"])
@pytest.mark.parametrize("bad", ["list", "int64", "[B, T+1]"])
def test_bad_entropy_raises_under_verls_name_in_every_mode(mode, bad):
    """geo_mean and sapo over token-mean aggregate the entropy apart from the policy term: a bad ``entropy`` is
    named ``entropy`` there too, as in the fused modes, never after the aggregation's own argument."""
    x = torch.full((2, 3), -1.0)
    loss = VerlPolicyLoss({"policy_loss": {"loss_mode": mode}, "entropy_coeff": 0.01})
    error = ValueError if bad == "[B, T+1]" else TypeError
    with pytest.raises(error, match="^entropy "):
        loss(x, x, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), entropy=_BAD[bad](x.abs()))


@pytest.mark.parametrize("case", ["vanilla", "gspo_seq_mean", "sapo_token_mean_terms", "geo_mean", "dppo_kl", "dro",
                                  "vanilla_token_sum_norm", "gpg", "cispo"])
def test_per_sequence_advantages_of_shape_b1_as_verl(case):
    """``[B, 1]`` advantages (one per sequence) broadcast along ``T`` in verl's arithmetic; the profile raised
    ``ValueError``. Loss, gradients and metrics equal verl's; ``[B]`` (the profile's own per-sequence reading) and
    ``[B, T]`` give the same."""
    d = batch(seed=60 + sorted(CASES).index(case))
    A = d["A"]
    d["A"] = A[:, :1].contiguous()
    _run(case, d, False)
    kw = {k: v for k, v in CASES[case].items() if k != "is_weights"}
    losses = [VerlPolicyLoss(make_actor(**kw))(d["lp"], d["old"], a, d["m"], entropy=d["H"], ref_log_prob=d["ref"])[0]
              for a in (A[:, 0].contiguous(), d["A"], A)]
    assert torch.equal(losses[1], losses[2]) and torch.equal(losses[0], losses[1]), losses


#: a reference 100 nats from the policy and small advantages: the KL term dwarfs the policy term
FAR_KL = {
    "vanilla_token_sum_mse": dict(loss_agg_mode="token-sum", use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="mse"),
    "vanilla_token_mean_k1_entropy": dict(use_kl_loss=True, kl_loss_coef=1.0, kl_loss_type="k1", entropy_coeff=0.05),
    "gspo_seq_mean_abs": dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean", use_kl_loss=True,
                              kl_loss_coef=0.5, kl_loss_type="abs"),
    "dppo_kl_token_sum_norm_mse": dict(loss_mode="dppo_kl", loss_agg_mode="seq-mean-token-sum-norm",
                                       loss_scale_factor=16, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="mse"),
    "cispo_seq_mean_token_sum_k2": dict(loss_mode="cispo", loss_agg_mode="seq-mean-token-sum", use_kl_loss=True,
                                        kl_loss_coef=0.5, kl_loss_type="k2", entropy_coeff=0.01),
}


@pytest.mark.parametrize("case", sorted(FAR_KL))
def test_pg_loss_metric_is_verls_policy_term_next_to_a_large_kl(case):
    """``actor/pg_loss`` is verl's ``pg_loss`` (the policy term alone) at float32 rounding of that term, also when
    the KL term is 1e5 times larger: it was the loss minus the KL and entropy terms in float32, which kept none of
    its digits (0.109375 for verl's 0.1013278). The loss and its gradient are the fused kernel's single pass."""
    import fastalign

    d = batch(seed=80 + sorted(FAR_KL).index(case))
    d["A"] = d["A"] * 0.01
    d["ref"] = d["lp"] - 100.0
    kw = FAR_KL[case]
    vl, vg, _, vm = verl_loss(make_actor(**kw), d["lp"], d["old"], d["A"], d["m"], H=d["H"], ref=d["ref"])
    x = d["lp"].clone().requires_grad_(True)
    loss, met = VerlPolicyLoss(make_actor(**kw))(x, d["old"], d["A"], d["m"], entropy=d["H"], ref_log_prob=d["ref"])
    loss.backward()
    pg = vm["actor/pg_loss"]
    assert abs(float(pg)) < 1e-4 * abs(float(vm["kl_loss"])), "the KL term does not dwarf the policy term"
    assert_close(met["actor/pg_loss"], pg, atol=1e-8, rtol=2e-6, what="actor/pg_loss")
    assert_close(loss, vl, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, vg, atol=1e-6, rtol=1e-5, what="d log_prob")
    x2 = d["lp"].clone().requires_grad_(True)
    fused, _ = fastalign.policy_loss(x2, d["old"], d["A"], d["m"], config=verl_policy_config(make_actor(**kw)),
                                     ref_logprobs=d["ref"], entropy=d["H"])
    fused.backward()
    assert torch.equal(loss, fused) and torch.equal(x.grad, x2.grad)


def test_pg_loss_metric_of_clip_cov_uses_the_losss_picks():
    """Clip-Cov draws the tokens it picks: ``actor/pg_loss``, computed in a pass of its own next to the KL term,
    uses the picks of the loss, and torch's generator advances once per call, as without the KL term."""
    d = batch(seed=90)
    pl = dict(clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0)
    with_kl = dict(loss_mode="clip_cov", policy_loss=pl, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="mse")
    alone = dict(loss_mode="clip_cov", policy_loss=pl)
    out = {}
    for seed in (3, 4):
        for name, kw in (("kl", with_kl), ("alone", alone)):
            torch.manual_seed(seed)
            loss, met = VerlPolicyLoss(make_actor(**kw))(d["lp"], d["old"], d["A"], d["m"], ref_log_prob=d["ref"])
            out[name, seed] = loss, met, torch.get_rng_state()
    assert not torch.equal(out["alone", 3][0], out["alone", 4][0]), "the picks do not change the loss"
    for seed in (3, 4):
        (loss, met, state), (pg, _, state0) = out["kl", seed], out["alone", seed]
        assert torch.equal(state, state0)  # one draw per call
        assert torch.equal(met["actor/pg_loss"], pg)  # the picks of the call without the KL term
        assert_close(loss, pg + 0.5 * met["kl_loss"], atol=1e-6, rtol=1e-6, what="loss: the same picks")
