"""GRPOLoss (fastalign.integrations.trl) against TRL 1.16's own ``GRPOTrainer._compute_loss``.

TRL's method is called unbound on a stand-in trainer that holds only the attributes it reads
(set the way ``GRPOTrainer.__init__`` sets them from the config) and returns the synthetic
per-token log-probs and entropies instead of running a model. Loss, d(loss)/d(logprobs),
d(loss)/d(entropy) and every metric TRL logs are compared (TRL in float64, fastalign in fp32).
"""
import dataclasses
import inspect
import math
import re
import types
from collections import defaultdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import LocalAccelerator, assert_close

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is not importable")
GRPOTrainer = trl_grpo.GRPOTrainer
from trl import GRPOConfig  # noqa: E402

from fastalign.integrations.trl import GRPOLoss  # noqa: E402

DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.default is not dataclasses.MISSING}


def trl_loss(config, lp, old, A, m, H, *, ref=None, sampling=None, is_ratio=None, num_items=None, ga=1, nproc=1,
             training=True):
    args = types.SimpleNamespace(**{**DEFAULTS, **config})
    lp = lp.double().clone().requires_grad_(True)
    H = H.double().clone().requires_grad_(True)
    B, T = lp.shape
    trainer = types.SimpleNamespace(
        args=args, loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, use_vllm=args.use_vllm,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        max_completion_length=args.max_completion_length, entropy_coef=args.entropy_coef,
        use_adaptive_entropy=args.use_adaptive_entropy,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        _last_world_entropy=float("inf"), aux_loss_enabled=False, model=types.SimpleNamespace(training=training),
        current_gradient_accumulation_steps=ga, accelerator=LocalAccelerator(nproc),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, H, None),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m.long(),
              "advantages": A.double(), "old_per_token_logps": None if old is None else old.double()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref.double()
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling.double()
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio.double()
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items), dtype=torch.float64)
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = trainer._metrics["train" if training else "eval"]
    return loss.detach(), lp.grad, H.grad, {k: v[-1] for k, v in metrics.items()}


def batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * 0.15 + torch.randn(B, 1, generator=g) * 0.1
    A = torch.randn(B, generator=g)
    lengths = torch.randint(2, T + 1, (B, 1), generator=g)
    m = torch.arange(T)[None, :] < lengths
    m[1] = False  # an empty completion
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    H = torch.rand(B, T, generator=g) * 3.0
    sampling = old + torch.randn(B, T, generator=g) * 0.2
    sampling[0, 1] = math.nan  # a token the inference engine could not score
    ratio = torch.where(m, torch.rand(B, T, generator=g) + 0.5, torch.ones(B, T))
    return dict(lp=lp, old=old, A=A, m=m, ref=ref, H=H, sampling=sampling, ratio=ratio)


CASES = {
    "grpo": dict(loss_type="grpo"),
    "grpo_kl_bias_corrected_delta": dict(loss_type="grpo", beta=0.04, delta=1.1, epsilon_high=0.28),
    "gspo_delta_offpolicy": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.05, beta=0.04,
                                 off_policy_mask_threshold=0.0),
    "bnpo_kl_plain": dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False, epsilon=0.1),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=9, beta=0.02),
    "dapo_entropy_mask_bonus": dict(loss_type="dapo", entropy_coef=0.03, top_entropy_quantile=0.5, beta=0.02),
    "dapo_top_token_only": dict(loss_type="dapo", top_entropy_quantile=0.0, entropy_coef=0.01),
    "dapo_vllm_token_ratio": dict(loss_type="dapo", use_vllm=True, off_policy_mask_threshold=0.01),
    "luspo_sequence": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.05),
    "luspo_token": dict(loss_type="luspo", delta=1.2),
    "cispo": dict(loss_type="cispo", epsilon_high=1.05, beta=0.02),
    "cispo_sequence": dict(loss_type="cispo", epsilon_high=1.02, importance_sampling_level="sequence"),
    "sapo": dict(loss_type="sapo", beta=0.05, sapo_temperature_neg=1.3),
    "sapo_sequence": dict(loss_type="sapo", importance_sampling_level="sequence", top_entropy_quantile=0.6),
    "vespo": dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_truncate", beta=0.02),
    "vespo_plain": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
}
SETUPS = {  # (gradient accumulation, processes, training, steps_per_generation)
    "train": (1, 1, True, 1),
    "accum_dp": (2, 2, True, 4),
    "eval": (3, 2, False, 2),
}


def _call_both(config, d, ga, nproc, training, spg, *, old=True, seq_ratio=False, grpo_loss=None):
    config = {**config, "steps_per_generation": spg, "gradient_accumulation_steps": ga}
    ratio = d["ratio"][:, :1] if seq_ratio else d["ratio"]
    use_vllm = config.get("use_vllm", False)
    corrected = use_vllm and config.get("vllm_importance_sampling_correction", True)  # when TRL computes the ratio
    num_items = int(d["m"].sum()) * 3  # the generation batch spans several micro-batches
    kw = dict(ref=d["ref"] if config.get("beta", 0.0) else None,
              sampling=d["sampling"] if (config.get("off_policy_mask_threshold") is not None or use_vllm) else None,
              is_ratio=ratio if corrected else None, num_items=num_items)
    tl, tg, th, tm = trl_loss(config, d["lp"], d["old"] if old else None, d["A"], d["m"], d["H"], ga=ga, nproc=nproc,
                              training=training, **kw)
    x = d["lp"].clone().requires_grad_(True)
    h = d["H"].clone().requires_grad_(True)
    grpo_loss = GRPOLoss(config) if grpo_loss is None else grpo_loss
    loss, met = grpo_loss(x, d["old"] if old else None, d["A"], d["m"], entropy=h, ref_logprobs=kw["ref"],
                                 sampling_logprobs=kw["sampling"], importance_sampling_ratio=kw["is_ratio"],
                                 num_items_in_batch=num_items, num_processes=nproc, training=training)
    loss.backward()
    return (tl, tg, th, tm), (loss, x.grad, h.grad, met)


def _compare(trl, ours, rtol=1e-6):
    tl, tg, th, tm = trl
    loss, g, gh, met = ours
    assert_close(loss, tl, atol=1e-6, rtol=rtol, what="loss")
    assert_close(g, tg, atol=1e-6, rtol=1e-5, what="d logprobs")
    zeros = torch.zeros_like(loss.new_empty(g.shape))
    assert_close(zeros if gh is None else gh, zeros if th is None else th, atol=1e-6, rtol=1e-5, what="d entropy")
    assert set(met) == set(tm), (sorted(met), sorted(tm))
    for k, v in tm.items():
        assert_close(met[k], torch.tensor(v, dtype=torch.float64), atol=1e-6, rtol=rtol, what=f"metric {k}")


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_grpo_loss_matches_trl(case, setup):
    d = batch(seed=sorted(CASES).index(case))
    trl, ours = _call_both(CASES[case], d, *SETUPS[setup])
    _compare(trl, ours)


#: Values of every GRPOConfig field the loss reads; random combinations of them are compared with TRL.
OPTION_SPACE = dict(
    loss_type=["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"],
    beta=[0.0, 0.04], epsilon=[0.2, 0.1], epsilon_high=[None, 0.28, 1.05], delta=[None, 1.1],
    importance_sampling_level=["token", "sequence"], top_entropy_quantile=[1.0, 0.5, 0.0],
    entropy_coef=[0.0, 0.02], use_bias_correction_kl=[True, False], off_policy_mask_threshold=[None, 0.0, 0.01],
    use_vllm=[False, True], vllm_importance_sampling_correction=[True, False],
    vllm_importance_sampling_mode=["sequence_mask", "token_mask", "token_truncate", "sequence_truncate"],
    vllm_importance_sampling_clip_min=[None, 0.5], sapo_temperature_neg=[1.05, 1.3], max_completion_length=[9, 12],
    vespo_k_pos=[2.0, 1.5], vespo_lambda_neg=[2.0, 2.5],
)


def _refused(config) -> bool:
    """The vespo settings the profile refuses: TRL's trainer refuses vLLM importance sampling in a sequence
    mode, and weighs only its bias-corrected KL by the sequence ratio under ``importance_sampling_level=
    "sequence"`` (without that KL term TRL ignores the level, and so does the profile)."""
    corrected = config["use_vllm"] and config["vllm_importance_sampling_correction"]
    sequence_kl = config["importance_sampling_level"] == "sequence" and config["beta"] != 0.0 and \
        config["use_bias_correction_kl"]
    return config["loss_type"] == "vespo" and (sequence_kl or (
        corrected and not config["vllm_importance_sampling_mode"].startswith("token")))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.fixed_dictionaries({k: st.sampled_from(v) for k, v in OPTION_SPACE.items()}),
       setup=st.sampled_from(sorted(SETUPS)), on_policy=st.booleans(), seed=st.integers(0, 99))
def test_option_combinations_match_trl(config, setup, on_policy, seed):
    """Random combinations of the loss options: loss, gradients and every metric equal TRL's
    ``_compute_loss``, or the profile refuses the combination with a ValueError."""
    if _refused(config):
        with pytest.raises(ValueError, match="vespo"):
            GRPOLoss(config)
        return
    d = batch(seed=seed)
    _compare(*_call_both(config, d, *SETUPS[setup], old=not on_policy,
                         seq_ratio=config["vllm_importance_sampling_mode"].startswith("sequence")))


@pytest.mark.parametrize("kl", [dict(beta=0.0), dict(beta=0.04, use_bias_correction_kl=False)])
def test_vespo_ignores_a_sequence_level_that_trl_ignores(kl):
    """Without TRL's bias-corrected KL, vespo's loss does not read importance_sampling_level: equal to TRL."""
    config = dict(loss_type="vespo", importance_sampling_level="sequence", **kl)
    _compare(*_call_both(config, batch(seed=5), 1, 1, True, 1))


def test_vespo_refuses_a_sequence_weighted_kl():
    """TRL multiplies its bias-corrected KL by the sequence ratio there; the profile names the field."""
    with pytest.raises(ValueError, match="importance_sampling_level.*bias-corrected KL"):
        GRPOLoss(dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.04))


@pytest.mark.parametrize("empty_advantage", [1.0, 0.0, -1.0])
@pytest.mark.parametrize("epsilon_high", [0.2, 1.0])
def test_cispo_clip_ratio_counts_empty_rows_at_sequence_level(epsilon_high, empty_advantage):
    """TRL's cispo_clip_ratio under importance_sampling_level="sequence" averages over every row, and an
    empty completion (ratio exp(0) = 1) counts as clipped when ``1 > epsilon_high`` and its advantage is
    positive (``A > 0``: a zero advantage, common in GRPO groups of equal rewards, does not count)."""
    d = batch(seed=3)
    d["A"][1] = empty_advantage  # row 1 is the empty completion
    config = dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=epsilon_high)
    trl, ours = _call_both(config, d, 1, 1, True, 1)
    _compare(trl, ours)
    d["A"][1] = -1.0  # the empty row not clipped
    unclipped = _call_both(config, d, 1, 1, True, 1)[0][3]["cispo_clip_ratio"]
    counted = epsilon_high < 1.0 and empty_advantage > 0
    assert trl[3]["cispo_clip_ratio"] == pytest.approx(unclipped + (1 / 6 if counted else 0.0))


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "cispo", "vespo"])
def test_micro_batch_of_masked_completions_gives_trls_zero_loss(loss_type):
    """Every completion of the step masked (``mask_truncated_completions`` on a batch of truncated ones):
    ``num_items_in_batch`` is 0 and TRL clamps the normaliser at 1, a loss of 0, not 0 / 0."""
    d = batch(seed=16)
    d["m"][:] = False
    trl, ours = _call_both(dict(loss_type=loss_type), d, 2, 1, True, 2)
    _compare(trl, ours)
    assert trl[0] == 0.0


@pytest.mark.parametrize("quantile", [0.995, 0.5])
def test_top_entropy_quantile_close_to_one_drops_the_lowest_entropy_token(quantile):
    """``top_entropy_quantile`` just below 1 already leaves out the lowest-entropy token (TRL's threshold is
    the interpolated ``1 - q`` quantile of the entropies)."""
    d = batch(seed=17)
    config = dict(loss_type="grpo", top_entropy_quantile=quantile)
    trl, ours = _call_both(config, d, 1, 1, True, 1)
    _compare(trl, ours)
    every_token = _call_both(dict(loss_type="grpo"), d, 1, 1, True, 1)[0]
    assert abs(float(trl[0]) - float(every_token[0])) > 1e-6


def test_adaptive_entropy_logs_the_coefficient_of_the_step():
    """With ``use_adaptive_entropy`` the caller passes the controller's coefficient of the step: the bonus and
    the logged ``entropy_coef`` are that one, not the config's starting ``entropy_coef``."""
    d = batch(seed=18)
    loss = GRPOLoss(dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.01))
    for coef in (0.05, 0.0):
        _, met = loss(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], num_items_in_batch=30, entropy_coef=coef)
        assert float(met["entropy_coef"]) == pytest.approx(coef)


def test_importance_sampling_ratio_without_correction_raises():
    d = batch(seed=4)
    loss = GRPOLoss(dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_correction=False))
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        loss(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], importance_sampling_ratio=d["ratio"])


def test_on_policy_old_logprobs_none():
    d = batch(seed=5)
    _compare(*_call_both(dict(loss_type="grpo", beta=0.04), d, 1, 1, True, 1, old=False))


def test_sequence_shaped_importance_ratio():
    d = batch(seed=6)
    _compare(*_call_both(dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask"), d,
                         1, 1, True, 1, seq_ratio=True))


def test_clip_metrics_are_exercised():
    d = batch(seed=7)
    d["old"] = d["lp"] + torch.randn(d["lp"].shape, generator=torch.Generator().manual_seed(0)) * 0.5
    trl, ours = _call_both(dict(loss_type="grpo", epsilon=0.1), d, 1, 1, True, 1)
    _compare(trl, ours)
    assert 0 < trl[3]["clip_ratio/low_mean"] and 0 < trl[3]["clip_ratio/high_mean"]
    assert trl[3]["clip_ratio/high_max"] > 0


def test_grpo_config_object():
    args = GRPOConfig(output_dir="/tmp/fastalign-grpo", loss_type="bnpo", beta=0.04, epsilon_high=0.28,
                      report_to=[], use_cpu=True)
    loss = GRPOLoss(args)
    assert loss.config.kl_rho == "grad" and loss.config.eps_high == 0.28 and not loss.config.kl_clamp
    d = batch(seed=8)
    cfg = {k: getattr(args, k) for k in ("loss_type", "beta", "epsilon", "epsilon_high")}
    trl, _ = _call_both(cfg, d, 1, 1, True, 1)
    x = d["lp"].clone().requires_grad_(True)
    ours, _ = loss(x, d["old"], d["A"], d["m"], entropy=d["H"], ref_logprobs=d["ref"],
                   gradient_accumulation_steps=1)
    assert_close(ours, trl[0], atol=1e-6, what="loss from a GRPOConfig object")


def test_unsupported_settings_raise():
    d = batch(seed=9)
    with pytest.raises(ValueError, match="use_adaptive_entropy"):  # the controller's coefficient of the step
        GRPOLoss(dict(loss_type="grpo", use_adaptive_entropy=True))(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"])
    with pytest.raises(ValueError, match="use_adaptive_entropy"):
        GRPOLoss(dict(loss_type="grpo"))(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], entropy_coef=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(dict(loss_type="nope"))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        d = batch(seed=9)
        GRPOLoss(dict(loss_type="dapo"))(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"])


@pytest.mark.parametrize("case", ["gspo_delta_offpolicy", "sapo_sequence", "vespo", "dapo_entropy_mask_bonus",
                                  "cispo_sequence"])
def test_triton_kernel_matches_trl(case):
    import fastalign

    d = batch(B=4, T=7, seed=11)
    with fastalign.use_backend("triton"):
        _compare(*_call_both(CASES[case], d, 2, 2, True, 4))


def _ratio_from_logprobs(old, sampling, m, mode, lo, hi):
    """The rollout ratio of docs/math.md#added-terms with TRL's rules (NaN log-ratio -> 0, truncation to both bounds), float64."""
    d = torch.nan_to_num((old.double() - sampling.double()) * m, nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = d.exp()
    if mode.endswith("truncate"):
        return r.clamp(min=lo, max=hi)
    return r.masked_fill((r < (-math.inf if lo is None else lo)) | (r > (math.inf if hi is None else hi)), 0.0)


@pytest.mark.parametrize("mode,lo,hi", [("token_truncate", 0.9, 1.1), ("token_mask", None, 1.2),
                                        ("sequence_truncate", None, 1.3), ("sequence_mask", 0.5, 1.5),
                                        ("token_truncate", 0.5, None), ("sequence_mask", 0.5, None)])
def test_ratio_computed_from_sampling_logprobs(mode, lo, hi):
    """The vLLM ratio from ``sampling_logprobs``; ``vllm_importance_sampling_clip_max=None`` is TRL's ratio
    with no upper bound (here ratios of ~5, past the default bound 3)."""
    d = batch(seed=12)
    if hi is None:
        d["sampling"][2:] -= 1.6 / (1 if mode.startswith("token") else d["m"][2:].sum(-1, keepdim=True).clamp(min=1))
        assert _ratio_from_logprobs(d["old"], d["sampling"], d["m"], mode, lo, hi).max() > 4.0
    config = dict(loss_type="bnpo", use_vllm=True, vllm_importance_sampling_mode=mode,
                  vllm_importance_sampling_clip_min=lo, vllm_importance_sampling_clip_max=hi)
    ratio = _ratio_from_logprobs(d["old"], d["sampling"], d["m"], mode, lo, hi)
    trl = trl_loss(config, d["lp"], d["old"], d["A"], d["m"], d["H"], sampling=d["sampling"], is_ratio=ratio)
    x = d["lp"].clone().requires_grad_(True)
    loss, met = GRPOLoss(config)(x, d["old"], d["A"], d["m"], entropy=d["H"], sampling_logprobs=d["sampling"])
    loss.backward()
    assert_close(loss, trl[0], atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, trl[1], atol=1e-6, rtol=1e-5, what="d logprobs")


@pytest.mark.parametrize("case", ["grpo", "grpo_kl_bias_corrected_delta", "gspo_delta_offpolicy", "cispo_sequence",
                                  "sapo", "luspo_sequence", "vespo"])
def test_diverged_policy_matches_trl(case):
    """Log-ratios of +-25 (a ratio beyond e^20, on whole sequences): TRL's ratio has no clamp, and the
    profile passes ``log_ratio_cap=inf``, so loss and gradient still equal TRL's (the default clamp at 20
    gives another loss and a zero gradient there). vespo reads no ratio in its own row, but its bias-corrected
    KL (beta != 0) is weighed by TRL's unclamped ratio: the cap is passed for the KL term's ratio too."""
    d = batch(seed=7)
    d["old"] = d["old"].clone()
    d["old"][0] -= 25.0
    d["old"][2, :4] += 25.0
    trl, ours = _call_both(CASES[case], d, 1, 1, True, 1)
    if case in ("grpo", "luspo_sequence"):  # no delta, no bounded weight: the ratio's e^25 reaches loss and gradient
        assert trl[0].abs() > 1e8 and trl[1].abs().max() > 1e8
    _compare(trl, ours, rtol=1e-5)  # fp32 sums of terms of order e^25


PER_TOKEN_CASES = {
    "dapo_offpolicy": dict(loss_type="dapo", off_policy_mask_threshold=0.0),
    "grpo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.05),
    "cispo_sequence": dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.02),
    "luspo_sequence_offpolicy": dict(loss_type="luspo", importance_sampling_level="sequence",
                                     off_policy_mask_threshold=0.0),
    "vespo": CASES["vespo"], "vespo_plain": CASES["vespo_plain"],
}


@pytest.mark.parametrize("case", sorted(PER_TOKEN_CASES))
def test_per_token_advantages_match_trl(case):
    """TRL's loss takes [B, T] advantages too (its subclasses' per-token credit). There the off-policy mask
    drops a far sequence's tokens of negative advantage, one by one, and the clip metrics at sequence level
    are token means over the mask; fastalign dropped whole sequences by their mean advantage and averaged
    the clip flags per sequence. vespo's ``vespo/phi_seq_mean`` is then TRL's masked token mean of phi_t
    ((k, lambda) by the sign of A_t); fastalign logged the mean over rows of the row's phi."""
    d = batch(seed=11)
    d["A"] = torch.randn(d["lp"].shape, generator=torch.Generator().manual_seed(12))
    _compare(*_call_both(PER_TOKEN_CASES[case], d, 1, 1, True, 1))


@pytest.mark.parametrize("advantages", ["per_token", "expanded", "per_sequence"])
@pytest.mark.parametrize("empty", [False, True])
def test_vespo_phi_seq_mean_matches_trl(advantages, empty):
    """``vespo/phi_seq_mean``: TRL's masked token mean with [B, T] advantages (rows weighted by their length
    even when the advantage is one per row, only expanded; 0 for a batch without a valid token), its row mean
    with [B] advantages (an empty row's phi is 1)."""
    d = batch(seed=21)
    d["old"] = d["lp"] + torch.randn(d["lp"].shape, generator=torch.Generator().manual_seed(22)) * 0.4
    if advantages == "per_token":
        d["A"] = torch.randn(d["lp"].shape, generator=torch.Generator().manual_seed(23))
    elif advantages == "expanded":
        d["A"] = d["A"][:, None].expand(d["lp"].shape).contiguous()
    if empty:
        d["m"] = torch.zeros_like(d["m"])
    trl, ours = _call_both(dict(loss_type="vespo"), d, 1, 1, True, 1)
    _compare(trl, ours)
    if empty and advantages != "per_sequence":
        assert trl[3]["vespo/phi_seq_mean"] == 0.0
    if not empty and advantages == "expanded":  # rows weighted by their length: not the row mean of [B]
        row_mean, _ = _call_both(dict(loss_type="vespo"), {**d, "A": d["A"][:, 0].contiguous()}, 1, 1, True, 1)
        assert abs(row_mean[3]["vespo/phi_seq_mean"] - trl[3]["vespo/phi_seq_mean"]) > 1e-3


@pytest.mark.parametrize("rows", ["some_masked", "all_masked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_token_completions_average_metrics_over_every_row(case, rows):
    """Completions one token long (T == 1) with masked rows (``mask_truncated_completions``, a tool mask): TRL
    reads each [B, 1] tensor as one value per sequence, so ``kl``, ``entropy``, the clip ratios and
    ``cispo_clip_ratio`` are means over every row, masked ones included, and ``clip_ratio/low_min`` /
    ``high_max`` take every row's value (not NaN when all are masked). fastalign gave masked means."""
    d = {k: v[:, :1].contiguous() if v.dim() == 2 else v for k, v in batch(seed=31).items()}
    d["old"] = d["lp"] + torch.randn(d["lp"].shape, generator=torch.Generator().manual_seed(32)) * 0.4
    d["m"][3:] = False
    if rows == "all_masked":
        d["m"][:] = False
    d["ratio"] = torch.where(d["m"], d["ratio"], 1.0)  # TRL's ratio of a masked token: exp(0)
    trl, ours = _call_both(CASES[case], d, 1, 1, True, 1)
    _compare(trl, ours)
    if rows == "some_masked" and case in ("grpo_kl_bias_corrected_delta", "cispo"):  # the masked rows count
        assert abs(trl[3]["entropy"] - float(d["H"][d["m"]].mean())) > 1e-3


@pytest.mark.parametrize("rows", ["some_masked", "all_masked"])
@pytest.mark.parametrize("case", ["vespo", "vespo_plain"])
def test_one_token_completions_vespo_phi_mean_over_every_row_with_per_token_advantages(case, rows):
    """T == 1 with per-token advantages ``[B, 1]``: TRL's ``phi_seq`` has the advantages' shape, ``[B, 1]``, so
    ``vespo/phi_seq_mean`` averages over every row, a masked row's ``phi`` being that of its vLLM ratio alone
    (its log-ratio is summed under the mask), while the KL term's ratio stays the unmasked one. fastalign took
    the masked mean (0 with every row masked, TRL 1)."""
    d = {k: v[:, :1].contiguous() if v.dim() == 2 else v for k, v in batch(seed=41).items()}
    g = torch.Generator().manual_seed(42)
    d["old"] = d["lp"] + torch.randn(d["lp"].shape, generator=g) * 0.4
    d["A"] = torch.randn(d["lp"].shape, generator=g)
    d["m"][3:] = False
    if rows == "all_masked":
        d["m"][:] = False
    trl, ours = _call_both(CASES[case], d, 1, 1, True, 1)
    _compare(trl, ours)
    if rows == "all_masked" and case == "vespo_plain":
        assert trl[3]["vespo/phi_seq_mean"] == 1.0  # phi(1): the masked mean would be 0


#: dicts whose loss needs what ``GRPOConfig.__post_init__`` derives or defaults: dr_grpo's default
#: max_completion_length (512), steps_per_generation from generation_batch_size, the deprecated
#: vllm_importance_sampling_cap (-> vllm_importance_sampling_clip_max)
DERIVED = {
    "dr_grpo_default_length": dict(loss_type="dr_grpo"),
    "dapo_generation_batch": dict(loss_type="dapo", per_device_train_batch_size=2, generation_batch_size=8),
    "cispo_generation_batch_accum": dict(loss_type="cispo", epsilon_high=1.05, per_device_train_batch_size=3,
                                         generation_batch_size=24, gradient_accumulation_steps=2),
    "vespo_generation_batch": dict(loss_type="vespo", per_device_train_batch_size=4, generation_batch_size=8),
    "dapo_default_steps": dict(loss_type="dapo", gradient_accumulation_steps=3),
    "bnpo_vllm_cap": dict(loss_type="bnpo", use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                          vllm_importance_sampling_cap=1.2),
}


@pytest.mark.filterwarnings("ignore:The `vllm_importance_sampling_cap` argument is deprecated:FutureWarning")
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("case", sorted(DERIVED))
def test_dict_config_gives_the_grpo_config_loss(case, nproc, monkeypatch):
    """A dict gives the loss of the ``GRPOConfig`` with the same fields: TRL's ``_compute_loss`` on the
    fields that config resolves in ``__post_init__`` (its world size set to ``nproc``)."""
    monkeypatch.setattr(GRPOConfig, "world_size", property(lambda self: nproc))
    fields = DERIVED[case]
    args = GRPOConfig(output_dir="/tmp/fastalign-grpo", report_to=[], use_cpu=True, **fields)
    resolved = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    d = batch(seed=13)
    ratio = None
    if args.use_vllm:  # TRL's token_truncate ratio, computed at generation with the resolved clip bounds
        ratio = _ratio_from_logprobs(d["old"], d["sampling"], d["m"], args.vllm_importance_sampling_mode,
                                     args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)
    num_items = int(d["m"].sum()) * 3
    ga = args.gradient_accumulation_steps
    trl = trl_loss(resolved, d["lp"], d["old"], d["A"], d["m"], d["H"], sampling=d["sampling"] if ratio is not None
                   else None, is_ratio=ratio, num_items=num_items, ga=ga, nproc=nproc)
    for config in (fields, args):
        x = d["lp"].clone().requires_grad_(True)
        h = d["H"].clone().requires_grad_(True)
        loss, met = GRPOLoss(config)(x, d["old"], d["A"], d["m"], entropy=h, num_items_in_batch=num_items,
                                     num_processes=nproc, gradient_accumulation_steps=ga,
                                     sampling_logprobs=d["sampling"] if ratio is not None else None)
        loss.backward()
        _compare(trl, (loss, x.grad, h.grad, met))


def test_dict_defaults_are_grpo_configs():
    """A field a dict config leaves out takes ``GRPOConfig``'s default (the vLLM ratio's upper bound 3.0, the
    sapo / vespo shapes, ...)."""
    from fastalign.integrations.trl.grpo import _DEFAULTS

    for k, v in _DEFAULTS.items():
        assert DEFAULTS[k] == v, k


@pytest.mark.parametrize("fields, match", [
    (dict(generation_batch_size=8, steps_per_generation=2), "generation_batch_size and GRPOConfig.steps_per_generation"),
    (dict(use_vllm=True, vllm_importance_sampling_clip_min=1.5, vllm_importance_sampling_cap=1.2),
     "vllm_importance_sampling_clip_min"),
    (dict(use_vllm=True, vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=2.0),
     "vllm_importance_sampling_clip_min"),
    (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     "vllm_importance_sampling_mode"),
])
@pytest.mark.filterwarnings("ignore:The `vllm_importance_sampling_cap` argument is deprecated:FutureWarning")
def test_dict_config_errors_of_grpo_config(fields, match):
    """The dict path raises where ``GRPOConfig.__post_init__`` does."""
    with pytest.raises(ValueError):
        GRPOConfig(output_dir="/tmp/fastalign-grpo", report_to=[], use_cpu=True, **fields)
    with pytest.raises(ValueError, match=match):
        GRPOLoss(fields)


def test_generation_batch_that_does_not_split_over_the_processes_raises():
    d = batch(seed=14)
    loss = GRPOLoss(dict(loss_type="dapo", per_device_train_batch_size=4, generation_batch_size=12))
    with pytest.raises(ValueError, match="generation_batch_size"):  # 12 = 3 steps of 4 rows on 1 process, not on 2
        loss(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], num_items_in_batch=30, num_processes=2)


def test_entropy_is_required():
    d = batch(seed=15)
    for entropy in (None, d["H"][:, :-1]):
        with pytest.raises(ValueError, match="^entropy must (be a|have shape)"):
            GRPOLoss(dict(loss_type="grpo"))(d["lp"], d["old"], d["A"], d["m"], entropy=entropy)


@pytest.mark.parametrize("config, call, field", [
    (dict(loss_type="dapo", steps_per_generation=0), {}, "GRPOConfig.steps_per_generation"),
    (dict(loss_type="dapo", gradient_accumulation_steps=0), {}, "GRPOConfig.gradient_accumulation_steps"),
    (dict(loss_type="grpo"), dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(loss_type="dapo", generation_batch_size=0), {}, "GRPOConfig.generation_batch_size"),
    (dict(loss_type="dr_grpo", max_completion_length=0), {}, "GRPOConfig.max_completion_length"),
])
def test_counts_must_be_at_least_one(config, call, field):
    """Counts of 0 gave a zero (steps_per_generation) or infinite (gradient_accumulation_steps) loss, or
    were replaced by 1; they raise, naming the field or argument."""
    d = batch(seed=16)
    with pytest.raises(ValueError, match=f"^{field} must be an int >= 1"):
        GRPOLoss(config)(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], num_items_in_batch=30, **call)


_COUNT_FIELDS = [  # (config, call, name): "*" is the value under test
    (dict(loss_type="dapo", steps_per_generation="*"), {}, "GRPOConfig.steps_per_generation"),
    (dict(loss_type="dapo", gradient_accumulation_steps="*"), {}, "GRPOConfig.gradient_accumulation_steps"),
    (dict(loss_type="grpo"), dict(gradient_accumulation_steps="*"), "gradient_accumulation_steps"),
    (dict(loss_type="dapo", generation_batch_size="*"), {}, "GRPOConfig.generation_batch_size"),
    (dict(loss_type="dapo", generation_batch_size=8, per_device_train_batch_size="*"), {},
     "GRPOConfig.per_device_train_batch_size"),
    (dict(loss_type="dr_grpo", max_completion_length="*"), {}, "GRPOConfig.max_completion_length"),
]


@pytest.mark.parametrize("config, call, field, value", [
    case + (value,) for case in _COUNT_FIELDS for value in (2.0, "4", True)] + [_COUNT_FIELDS[-1] + (None,)])
def test_counts_of_the_wrong_type_raise_type_error(config, call, field, value):
    """A count that is not an int (a float, a string, a bool; None where TRL has no default to derive) raised a
    ValueError, or was taken (2.0); it is a TypeError naming the field or argument, as everywhere in the library
    (a ValueError is for an int < 1)."""
    d = batch(seed=16)
    config, call = ({k: value if v == "*" else v for k, v in given.items()} for given in (config, call))
    with pytest.raises(TypeError, match=f"^{field} must be an int, got {type(value).__name__}"):
        GRPOLoss(config)(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], num_items_in_batch=30, **call)


@pytest.mark.parametrize("config, message", [
    (dict(loss_type="grpo", epsilon=-0.1), r"GRPOConfig\.epsilon / epsilon_high: eps_low and eps_high must be >= 0"),
    (dict(loss_type="cispo", epsilon_high=-1.0),
     r"GRPOConfig\.epsilon_high: cispo_high must satisfy cispo_low <= cispo_high"),
    (dict(loss_type="grpo", delta=0.0), r"GRPOConfig\.delta: delta must be > 0"),
    (dict(loss_type="sapo", sapo_temperature_neg=math.nan),
     r"GRPOConfig\.sapo_temperature_neg: sapo_tau_neg must be finite"),
    (dict(loss_type="grpo", beta=math.inf), r"GRPOConfig\.beta: kl_coef must be finite"),
    (dict(loss_type="grpo", top_entropy_quantile=-0.5),
     r"GRPOConfig\.top_entropy_quantile: entropy_quantile must lie in \[0, 1\]"),
    (dict(loss_type="grpo", off_policy_mask_threshold=math.inf),
     r"GRPOConfig\.off_policy_mask_threshold: offpolicy_threshold must be finite"),
    (dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_mode="token_truncate",
          vllm_importance_sampling_clip_min=-1.0),
     r"GRPOConfig\.vllm_importance_sampling_clip_min: rollout_min must lie in \[0, rollout_max\]"),
])
def test_policy_config_errors_name_the_grpo_config_fields(config, message):
    """A value PolicyConfig refuses is named by the GRPOConfig fields behind the option (``OptionError.option``)."""
    with pytest.raises(ValueError, match=f"^{message}"):
        GRPOLoss(config)


@pytest.mark.parametrize("num_items", [math.nan, torch.tensor(math.nan), torch.tensor([math.nan])])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_nan_num_items_in_batch_raises_on_the_host(loss_type, num_items):
    """TRL divides by ``num_items_in_batch.clamp(min=1)``, NaN for a NaN count; the profile divided by 1
    (a plausible finite loss). A NaN count on the host (a number, a CPU tensor) raises; on the device it
    gives TRL's NaN (:func:`test_nan_num_items_in_batch_unread_gives_trls_nan`)."""
    d = batch(seed=17)
    config = dict(loss_type=loss_type, entropy_coef=0.01, steps_per_generation=1)
    tl, _, _, tm = trl_loss(config, d["lp"], d["old"], d["A"], d["m"], d["H"], num_items=math.nan)
    assert torch.isnan(tl) and math.isnan(tm["policy_loss"])
    with pytest.raises(ValueError, match="^num_items_in_batch must not be NaN"):
        GRPOLoss(config)(d["lp"], d["old"], d["A"], d["m"], entropy=d["H"], num_items_in_batch=num_items)


def _nan_count_gives_trls_nan(loss_type, device):
    d = {k: v.to(device) for k, v in batch(seed=17).items()}
    config = dict(loss_type=loss_type, entropy_coef=0.01, steps_per_generation=1)
    tl, tg, _, _ = trl_loss(config, *(d[k].cpu() for k in ("lp", "old", "A", "m", "H")), num_items=math.nan)
    x = d["lp"].clone().requires_grad_(True)
    loss, met = GRPOLoss(config)(x, d["old"], d["A"], d["m"], entropy=d["H"],
                                 num_items_in_batch=torch.tensor(math.nan, device=device))
    loss.backward()
    assert torch.isnan(tl) and torch.isnan(loss) and torch.isnan(met["policy_loss"])
    assert torch.isnan(tg).any() and torch.isnan(x.grad).all()


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_nan_num_items_in_batch_unread_gives_trls_nan(loss_type, monkeypatch):
    """Where the count is not read on the host (a GPU tensor: no synchronisation), a NaN count gives TRL's
    NaN loss and ``policy_loss``, and a NaN gradient (TRL's is NaN except where its clamp passes none).
    On the CPU, with the host check made to leave the flag to the device arithmetic as on a GPU."""
    import fastalign._validate

    monkeypatch.setattr(fastalign._validate, "flag_or_raise", lambda bad, x, message: bad)
    _nan_count_gives_trls_nan(loss_type, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_gpu_nan_num_items_in_batch_gives_trls_nan(loss_type):
    """A NaN count on the GPU (a device tensor, as TRL's trainer passes it) gives TRL's NaN loss."""
    _nan_count_gives_trls_nan(loss_type, "cuda")


@pytest.mark.parametrize("config, field", [
    (dict(beta="0.1"), "beta"), (dict(epsilon=None), "epsilon"), (dict(delta="2"), "delta"),
    (dict(use_vllm="no"), "use_vllm"), (dict(use_bias_correction_kl=1), "use_bias_correction_kl"),
])
def test_config_values_are_checked_not_coerced(config, field):
    """A string number or a non-bool switch (from YAML or CLI text) raised nowhere: float("0.1") / bool("no")."""
    with pytest.raises(TypeError, match=f"^GRPOConfig.{field} must be a"):
        GRPOLoss(config)


@pytest.mark.parametrize("config, field", [
    (dict(loss_type="sapo", sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    (dict(loss_type="vespo", vespo_k_neg=math.inf), "vespo_k_neg"),
    (dict(loss_type="grpo", epsilon_high=-0.1), "epsilon_high"),
    (dict(loss_type="grpo", beta=math.nan), "beta"),
    (dict(loss_type="grpo", top_entropy_quantile=1.5 - 2.0), "top_entropy_quantile"),
])
def test_errors_name_grpo_config_fields(config, field):
    with pytest.raises(ValueError, match=f"^GRPOConfig.*{field}"):
        GRPOLoss(config)


# ------------------------------------------------------------------------------------------ config fields read live

#: each config field GRPOTrainer._compute_loss reads from ``self.args`` at every step: (config, value set later)
LIVE_ARGS = {
    "delta": (dict(loss_type="grpo", delta=1.5), 1.05),
    "use_bias_correction_kl": (dict(loss_type="bnpo", beta=0.1), False),
    "sapo_temperature_pos": (dict(loss_type="sapo"), 0.5),
    "sapo_temperature_neg": (dict(loss_type="sapo"), 2.0),
    "vespo_k_pos": (dict(loss_type="vespo"), 1.0),
    "vespo_lambda_pos": (dict(loss_type="vespo"), 1.5),
    "vespo_k_neg": (dict(loss_type="vespo"), 1.5),
    "vespo_lambda_neg": (dict(loss_type="vespo"), 3.5),
    "steps_per_generation": (dict(loss_type="dapo"), 4),
}
#: read by TRL's adaptive entropy controller, which the drop-in runs on the trainer's own args
_CONTROLLER_ARGS = {"entropy_target", "entropy_coef_delta", "entropy_coef_max", "entropy_coef_min"}


def _drop_in_loss():
    from fastalign.integrations.trl.grpo_trainer import GRPOTrainer as DropIn
    return DropIn.fastalign_loss


def test_drop_in_follows_every_config_field_trl_reads_at_every_step():
    """The drop-in's table of config fields read at every step is the set of ``self.args`` fields in TRL's
    ``_compute_loss`` (less those of the entropy controller, read by the drop-in's own), and each is tested."""
    read = set(re.findall(r"self\.args\.(\w+)", inspect.getsource(GRPOTrainer._compute_loss)))
    followed = {name[len("args."):] for name in _drop_in_loss().options if name.startswith("args.")}
    assert followed == read - _CONTROLLER_ARGS
    assert set(LIVE_ARGS) == followed


@pytest.mark.parametrize("field", list(LIVE_ARGS))
def test_config_field_changed_between_steps_matches_trl(field):
    """A config field that TRL's loss reads from ``self.args`` at every step, changed between steps (a
    TrainerCallback receives ``args``): the drop-in's loss (``trainer.fastalign_loss``) follows it, as TRL's does.
    It kept the constructed value (``args.delta = 1.05`` gave the loss of ``delta=1.5``)."""
    config, value = LIVE_ARGS[field]
    ga, nproc, spg = 2, 1, 2
    args = types.SimpleNamespace(**{**DEFAULTS, **config, "steps_per_generation": spg,
                                    "gradient_accumulation_steps": ga})
    live = _drop_in_loss()
    trainer = types.SimpleNamespace(args=args, _entropy_bonus_enabled=False, epsilon_high=args.epsilon)
    for attr, option in live.options.items():  # the attributes as GRPOTrainer.__init__ sets them from args
        if isinstance(option, str) and option != "epsilon_high":
            setattr(trainer, attr, getattr(args, option))
    constructed = live.__get__(trainer)
    setattr(args, field, value)  # what a callback's on_step_end(args, ...) may do
    changed = live.__get__(trainer)
    assert changed is not constructed and live.__get__(trainer) is changed  # rebuilt once
    d = batch(seed=21)
    after = value if field == "steps_per_generation" else spg
    trl, ours = _call_both({**config, field: value}, d, ga, nproc, True, after, grpo_loss=changed)
    _compare(trl, ours)
    before, _ = _call_both(config, d, ga, nproc, True, spg)
    assert not (torch.allclose(before[0], trl[0]) and torch.allclose(before[1], trl[1])), "the change has no effect"


# ------------------------------------------------------------------------------------------ TRL's other GRPO configs

def test_experimental_grpo_config_subclasses_take_their_trainers_loss():
    """TRL's experimental ``GMPOConfig`` (the one ``GRPOConfig`` subclass in trl.experimental) configures
    GMPOTrainer, whose ``_compute_loss`` is a geometric mean of log-clipped ratios; the profile computed DAPO from
    it. ``GRPOLoss`` gives GMPOTrainer's loss for it (tests/test_parity_trl_gmpo.py); ``grpo_policy_config`` (one
    PolicyConfig, which GMPO's loss is not) refuses it. A user's own subclass is still a GRPOConfig."""
    from trl.experimental.gmpo import GMPOConfig

    from fastalign.integrations.trl import GMPOLoss, grpo_policy_config
    config = GMPOConfig(output_dir="/tmp/fastalign-gmpo", report_to=[], use_cpu=True)
    assert isinstance(GRPOLoss(config), GMPOLoss)
    with pytest.raises(ValueError, match="^GMPOConfig configures GMPOTrainer.*GMPOLoss"):
        grpo_policy_config(config)

    @dataclasses.dataclass
    class MyConfig(GRPOConfig):
        note: str = ""

    mine = MyConfig(output_dir="/tmp/fastalign-gmpo", report_to=[], use_cpu=True, loss_type="bnpo")
    assert GRPOLoss(mine).config == GRPOLoss(dict(loss_type="bnpo")).config


# ------------------------------------------------------------------------------------------ argument checks

def test_entropy_threshold_checks_its_arguments():
    """``entropy_threshold`` took a broadcastable mask of another shape (another threshold), returned +inf for a
    negative quantile, failed inside for one above 1 or NaN, took integer and complex entropies and gave an
    AttributeError for a None mask; each is a TypeError / ValueError naming the argument."""
    from fastalign.integrations.trl import entropy_threshold
    H = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    assert_close(entropy_threshold(H, mask, 0.5), torch.tensor(0.2), atol=1e-7, rtol=0, what="threshold")
    for bad in (torch.tensor([[True], [False]]), torch.tensor([True, False, False]), mask[:, :2]):
        with pytest.raises(ValueError, match=r"^mask must have shape \(2, 3\) \(the shape of entropy\)"):
            entropy_threshold(H, bad, 0.5)
    for q in (-0.05, 1.05):
        with pytest.raises(ValueError, match=r"^top_quantile must lie in \[0, 1\]"):
            entropy_threshold(H, mask, q)
    with pytest.raises(ValueError, match="^top_quantile must be finite"):
        entropy_threshold(H, mask, math.nan)
    with pytest.raises(TypeError, match="^top_quantile must be a real number"):
        entropy_threshold(H, mask, "0.5")
    for bad in (H.mul(10).long(), H.to(torch.complex64)):
        with pytest.raises(TypeError, match="^entropy must be a floating tensor"):
            entropy_threshold(bad, mask, 0.5)
    with pytest.raises(TypeError, match="^entropy must be a torch.Tensor"):
        entropy_threshold(H.tolist(), mask, 0.5)
    with pytest.raises(TypeError, match="^mask must be a torch.Tensor, got NoneType"):
        entropy_threshold(H, None, 0.5)
    with pytest.raises(TypeError, match="^mask must hold real numbers"):
        entropy_threshold(H, mask.to(torch.complex64), 0.5)


_GRPO_BAD_CALLS = {  # argument -> (replacement, error, message): each names the caller's (TRL's) argument
    "logprobs": (lambda d: d["lp"].tolist(), TypeError, "^logprobs must be a torch.Tensor, got list"),
    "completion_mask": (lambda d: torch.ones(6, 10), ValueError,
                        r"^completion_mask must have shape \(6, 9\) \(logprobs.shape\), got \(6, 10\)"),
    "completion_mask ": (lambda d: None, TypeError, "^completion_mask must be a torch.Tensor, got NoneType"),
    "num_items_in_batch": (lambda d: "6", TypeError, "^num_items_in_batch must be a real number, got str"),
    "num_items_in_batch ": (lambda d: torch.ones(2), ValueError, "^num_items_in_batch must be a number or a one-"),
    "sampling_logprobs": (lambda d: d["sampling"][:, :-1], ValueError,
                          r"^sampling_logprobs must have shape \(6, 9\)"),
    "importance_sampling_ratio": (lambda d: d["ratio"][:, :2], ValueError,
                                  r"^importance_sampling_ratio must have shape \(6,\) or \(6, 1\) or \(6, 9\)"),
    "old_logprobs": (lambda d: d["old"].long(), TypeError, "^old_logprobs must be float32"),
    "advantages": (lambda d: d["A"].tolist(), TypeError, "^advantages must be a torch.Tensor"),
    "entropy": (lambda d: d["H"].to(torch.complex64), TypeError, "^entropy must be float32"),
    "num_processes": (lambda d: "2", TypeError, "^num_processes must be an int"),
    "training": (lambda d: "yes", TypeError, "^training must be a bool"),
}


@pytest.mark.parametrize("argument", list(_GRPO_BAD_CALLS))
def test_grpo_loss_errors_name_trls_arguments(argument):
    """``GRPOLoss`` checks its tensors under its own (TRL's) names before reading them: a list gave an
    AttributeError on ``.device``, a string count ``TypeError: new(): invalid data type 'str'``, and a bad
    ``completion_mask`` or ``sampling_logprobs`` was named ``response_mask`` / ``rollout_logprobs``."""
    d = batch(seed=22)
    replace, error, message = _GRPO_BAD_CALLS[argument]
    call = dict(logprobs=d["lp"], old_logprobs=d["old"], advantages=d["A"], completion_mask=d["m"], entropy=d["H"],
                sampling_logprobs=d["sampling"], importance_sampling_ratio=d["ratio"], num_items_in_batch=30)
    call[argument.strip()] = replace(d)
    loss = GRPOLoss(dict(loss_type="dapo", use_vllm=True, off_policy_mask_threshold=0.5))
    with pytest.raises(error, match=message):
        loss(**call)


# ------------------------------------------------------------------------------------------ drop-in GRPOTrainer

@pytest.mark.parametrize("options", [dict(loss_type="grpo", beta=0.04),
                                     dict(loss_type="luspo", importance_sampling_level="sequence"),
                                     dict(loss_type="dapo", top_entropy_quantile=0.5)],
                         ids=["token-blocks", "sequence-blocks", "entropy-quantile"])
def test_grpo_trainer_on_policy_ratio_is_exactly_one(tmp_path, monkeypatch, options):
    """With ``num_iterations=2`` TRL keeps the old policy's log-probs, taken without gradients at generation; they
    are those of the loss's own pass through the head (blocks of tokens or of whole completions; the two passes
    with ``top_entropy_quantile < 1``), bit for bit: every ratio of the on-policy step is exactly 1, its logged
    loss exactly TRL's (which computes both with one function) and the KL to the unchanged reference 0. The two
    passes split the vocabulary in pieces here (``FASTALIGN_LINEAR_CHUNK_MIB``, as they do past 16384 ids),
    whose rounding is not the single pass's."""
    pytest.importorskip("datasets", reason="TRL's trainers need datasets")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    import test_integration_trl_trainers as tiny

    import fastalign.integrations.trl as fa_trl

    monkeypatch.setenv("FASTALIGN_LINEAR_CHUNK_MIB", "0.001")
    checkpoint = tiny.tiny_checkpoint(tmp_path / "tiny-qwen2")
    log_ratios, call = [], GRPOLoss.__call__

    def recorded(self, logprobs, old_logprobs, *args, **kwargs):
        log_ratios.append((logprobs - old_logprobs).detach())  # every block's, the others held at the old ones
        return call(self, logprobs, old_logprobs, *args, **kwargs)

    monkeypatch.setattr(GRPOLoss, "__call__", recorded)
    options = dict(options, num_iterations=2)
    theirs = tiny._run(tiny._grpo(GRPOTrainer, checkpoint, tmp_path / "trl", options))
    ours = tiny._run(tiny._grpo(fa_trl.GRPOTrainer, checkpoint, tmp_path / "fa", options))
    assert log_ratios
    for log_ratio in log_ratios:
        assert torch.equal(log_ratio, torch.zeros_like(log_ratio)), log_ratio
    assert ours[0]["loss@0"] == theirs[0]["loss@0"]
    if options.get("beta"):
        assert ours[0]["kl@0"] == theirs[0]["kl@0"] == 0.0
    tiny._compare(theirs, ours)


@pytest.mark.parametrize("masked", ["every_other", "every"])
@pytest.mark.parametrize("options", [dict(beta=0.05), dict(loss_type="cispo", epsilon_high=0.1)])
def test_grpo_trainer_one_token_completions_log_trls_metrics(tmp_path, monkeypatch, options, masked):
    """The drop-in with one-token completions, some or all masked (as ``mask_truncated_completions`` or a tool
    mask would): it gathers the metrics over every row, as TRL (which reads its [B, 1] tensors as one value per
    row), not over the valid completions (where none is valid it logged 0 for TRL's KL of 2.45)."""
    pytest.importorskip("datasets", reason="TRL's trainers need datasets")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    import test_integration_trl_trainers as tiny
    import trl

    import fastalign.integrations.trl as fa_trl

    checkpoint = tiny.tiny_checkpoint(tmp_path / "tiny-qwen2")
    generate = trl.GRPOTrainer._generate_and_score_completions

    def with_masked_rows(self, inputs):
        out = generate(self, inputs)
        out["completion_mask"][::2 if masked == "every_other" else 1] = 0
        return out

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", with_masked_rows)

    def build(cls, out):
        args = trl.GRPOConfig(**tiny._common(out, per_device_train_batch_size=4, num_generations=4,
                                             max_completion_length=1, temperature=1.0, **options))
        return cls(model=checkpoint, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                   args=args, train_dataset=tiny._grpo_dataset(), processing_class=tiny._tokenizer(checkpoint))

    theirs = tiny._run(build(trl.GRPOTrainer, tmp_path / "trl"))
    ours = tiny._run(build(fa_trl.GRPOTrainer, tmp_path / "fa"))
    assert theirs[0]["completions/max_length@0"] == 1.0
    if masked == "every_other":  # loss, metrics and update
        tiny._compare(theirs, ours)
    else:  # no token to train on: the metrics alone
        assert ours[0].keys() == theirs[0].keys()
        for k, v in theirs[0].items():
            assert ours[0][k] == pytest.approx(v, rel=tiny.RTOL, abs=tiny.ATOL), k
        assert theirs[0]["kl@0" if "kl@0" in theirs[0] else "cispo_clip_ratio@0"] > 0


def test_empty_rows_clipped_takes_cispo_s_default_bound():
    """The metric's rule reads cispo's upper bound with its default (1 + eps_high) where the config leaves
    ``cispo_high`` unset (it compared 1 > None and raised); the trainer's profile sets it, a config built by hand
    may not. A row without completion tokens and with a positive advantage counts where 1 > the bound."""
    from fastalign.integrations.trl.grpo import _empty_rows_clipped
    from fastalign.policy_config import PolicyConfig

    advantages, mask = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([[0, 0], [0, 0], [1, 1]])
    unset = PolicyConfig.make(loss_type="cispo", importance_sampling_level="sequence", eps_high=0.3)
    assert _empty_rows_clipped(unset, advantages, mask).item() == 0.0  # 1 > 1.3 is false
    below_one = PolicyConfig.make(loss_type="cispo", importance_sampling_level="sequence", cispo_low=0.0,
                                  cispo_high=0.8)
    assert _empty_rows_clipped(below_one, advantages, mask).item() == pytest.approx(1 / 3)
