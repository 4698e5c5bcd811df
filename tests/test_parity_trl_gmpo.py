"""GMPOLoss / GRPOLoss(GMPOConfig) (fastalign.integrations.trl) against TRL 1.16's ``GMPOTrainer._compute_loss``.

TRL's method is called unbound on a stand-in trainer holding the attributes it reads (set as
``GRPOTrainer.__init__`` sets them from the config) and returning synthetic per-token log-probs and
entropies instead of running a model. Loss, d(loss)/d(logprobs) and every metric TRL logs are compared
(TRL in float64, fastalign in fp32).
"""
import dataclasses
import types
from collections import defaultdict

import pytest
import torch

from helpers import LocalAccelerator, assert_close

trl_gmpo = pytest.importorskip("trl.experimental.gmpo", reason="TRL's experimental GMPO is not importable")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from fastalign.integrations.trl import GMPOLoss, GRPOLoss, entropy_threshold, grpo_policy_config  # noqa: E402

GMPOConfig, TRLGMPOTrainer = trl_gmpo.GMPOConfig, trl_gmpo.GMPOTrainer
DEFAULTS = {f.name: f.default for f in dataclasses.fields(GMPOConfig) if f.default is not dataclasses.MISSING}


def trl_loss(config, lp, old, A, m, H, *, ref=None, ga=1, nproc=1, training=True):
    args = types.SimpleNamespace(**{**DEFAULTS, **config})
    lp = lp.double().clone().requires_grad_(True)
    B, T = lp.shape
    trainer = types.SimpleNamespace(
        args=args, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        top_entropy_quantile=args.top_entropy_quantile, model=types.SimpleNamespace(training=training),
        current_gradient_accumulation_steps=ga, accelerator=LocalAccelerator(nproc),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, H.double(), None))
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": m if m.is_floating_point() else m.long(),
              "advantages": A.double(), "old_per_token_logps": None if old is None else old.double()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref.double()
    loss = TRLGMPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = trainer._metrics["train" if training else "eval"]
    return loss.detach(), lp.grad, {k: v[-1] for k, v in metrics.items()}


def batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = lp + torch.randn(B, T, generator=g) * 0.4 + torch.randn(B, 1, generator=g) * 0.2  # many clipped tokens
    A = torch.randn(B, generator=g)
    m = torch.arange(T)[None, :] < torch.randint(min(2, T), T + 1, (B, 1), generator=g)
    m[1] = False  # an empty completion
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    H = torch.rand(B, T, generator=g) * 3.0
    return dict(lp=lp, old=old, A=A, m=m, ref=ref, H=H)


CASES = {
    "default": dict(),
    "narrow_asymmetric": dict(epsilon=0.1, epsilon_high=0.25),
    "kl": dict(beta=0.04),
    "entropy_mask": dict(top_entropy_quantile=0.5),
    "top_token_only_kl": dict(top_entropy_quantile=0.0, beta=0.1, epsilon=0.2),
    "ignored_grpo_fields": dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.1,
                                use_bias_correction_kl=False, beta=0.02, off_policy_mask_threshold=0.0),
}
SETUPS = {"train": (1, 1, True), "accum_dp": (2, 2, True), "eval": (3, 2, False)}  # (grad accum, processes, train)


def _call_both(config, d, ga, nproc, training, *, old=True, loss=None):
    config = {**config, "gradient_accumulation_steps": ga}
    ref = d["ref"] if config.get("beta", 0.0) else None
    tl, tg, tm = trl_loss(config, d["lp"], d["old"] if old else None, d["A"], d["m"], d["H"], ref=ref, ga=ga,
                          nproc=nproc, training=training)
    x = d["lp"].clone().requires_grad_(True)
    loss = GMPOLoss(config) if loss is None else loss
    ours, met = loss(x, d["old"] if old else None, d["A"], d["m"], entropy=d["H"], ref_logprobs=ref,
                     num_items_in_batch=int(d["m"].sum()), num_processes=nproc, training=training)
    ours.backward()
    return (tl, tg, tm), (ours, x.grad, met)


def _compare(trl, ours):
    (tl, tg, tm), (loss, g, met) = trl, ours
    assert_close(loss, tl, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(g, tg, atol=1e-6, rtol=1e-5, what="d logprobs")
    assert set(met) == set(tm), (sorted(met), sorted(tm))
    for k, v in tm.items():
        assert_close(met[k], torch.tensor(v, dtype=torch.float64), atol=1e-6, rtol=1e-6, what=f"metric {k}")


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_gmpo_loss_matches_trl(case, setup):
    d = batch(seed=sorted(CASES).index(case))
    _compare(*_call_both(CASES[case], d, *SETUPS[setup]))


@pytest.mark.parametrize("case", ["default", "kl"])
def test_gmpo_loss_on_policy_matches_trl(case):
    _compare(*_call_both(CASES[case], batch(seed=7), 1, 1, True, old=False))


def test_grpo_loss_of_a_gmpo_config_is_gmpo():
    """``GRPOLoss(GMPOConfig(...))`` computed GRPOTrainer's DAPO loss (then refused the config); it is GMPOTrainer's
    loss, a GMPOLoss, as is one of a user's subclass of GMPOConfig. A dict is a GRPOConfig's fields."""
    config = GMPOConfig(output_dir="/tmp/fastalign-gmpo", report_to=[], use_cpu=True, beta=0.05, epsilon_high=0.3,
                        top_entropy_quantile=0.6)
    loss = GRPOLoss(config)
    assert isinstance(loss, GMPOLoss) and (loss.eps_low, loss.eps_high, loss.beta) == (0.4, 0.3, 0.05)
    d = batch(seed=11)
    fields = dict(beta=0.05, epsilon_high=0.3, top_entropy_quantile=0.6)
    _compare(*_call_both(fields, d, 1, 1, True, loss=loss))

    @dataclasses.dataclass
    class MyGMPOConfig(GMPOConfig):
        note: str = ""

    assert isinstance(GRPOLoss(MyGMPOConfig(output_dir="/tmp/fastalign-gmpo", report_to=[], use_cpu=True)), GMPOLoss)
    assert type(GRPOLoss(dict(epsilon=0.4))) is GRPOLoss
    with pytest.raises(ValueError, match="GMPOTrainer.*GMPOLoss"):
        grpo_policy_config(config)


def test_empty_and_entropy_dropped_completions_count_as_minus_advantage():
    """An empty completion, and one whose every token the entropy mask drops, have ratio exp(0) = 1: TRL adds
    -A for each to the mean over completions (fastalign's gmpo row gives them 0)."""
    d = batch(seed=5)
    d["A"][1] = 2.0  # row 1 is empty
    d["H"][0] = 0.0  # row 0's tokens have the lowest entropies: dropped at top_entropy_quantile=0.3
    for config in (dict(), dict(top_entropy_quantile=0.3, beta=0.03)):
        trl, ours = _call_both(config, d, 1, 1, True)
        _compare(trl, ours)
    row = GMPOLoss({})(d["lp"][1:2], d["old"][1:2], d["A"][1:2], d["m"][1:2], entropy=d["H"][1:2])[0]
    assert_close(row, torch.tensor(-2.0), atol=0, rtol=0, what="an empty completion's loss")


def test_clip_metrics_count_the_clipped_side_only():
    """TRL counts l < -eps_low with A < 0 and l > eps_high with A > 0 (the tokens actually clipped); fastalign's
    gmpo row counts either side for both signs (verl's)."""
    lp = torch.zeros(2, 2)
    old = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # l = -1 (below -eps_low), +1 (above eps_high)
    A, m, H = torch.tensor([1.0, -1.0]), torch.ones(2, 2), torch.ones(2, 2)
    trl, ours = _call_both(dict(), dict(lp=lp, old=old, A=A, m=m, H=H, ref=lp), 1, 1, True)
    _compare(trl, ours)
    assert ours[2]["clip_ratio/high_mean"] == 0.25 and ours[2]["clip_ratio/low_mean"] == 0.25


def test_one_token_completions_take_trl_row_means():
    """With T = 1 TRL's metric means run over every row, the mask aside; so do the profile's."""
    d = batch(B=5, T=1, seed=4)
    d["m"][2] = False
    _compare(*_call_both(dict(beta=0.02), d, 1, 1, True))


def test_entropy_threshold_of_every_process_replaces_the_batch_quantile():
    """With several processes TRL's quantile runs over every process's tokens; a threshold passed in replaces
    this batch's (here the quantile of a larger batch that holds this one)."""
    d, other = batch(seed=8), batch(seed=9)
    q = 0.5
    H_all, m_all = torch.cat([d["H"], other["H"]]), torch.cat([d["m"], other["m"]])
    threshold = entropy_threshold(H_all, m_all, q)
    x = d["lp"].clone().requires_grad_(True)
    loss, _ = GMPOLoss(dict(top_entropy_quantile=q))(x, d["old"], d["A"], d["m"], entropy=d["H"],
                                                      entropy_threshold=threshold)
    loss.backward()
    keep = (d["H"] >= threshold) & d["m"]
    want, want_g, _ = trl_loss(dict(), d["lp"], d["old"], d["A"], keep, d["H"])  # TRL with the kept tokens as mask
    assert_close(loss, want, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(x.grad, want_g, atol=1e-6, rtol=1e-5, what="d logprobs")


def test_fractional_completion_mask_raises():
    """TRL weighs each token by a fractional completion mask (dividing a row by its sum clamped at 1); fastalign's
    gmpo row counts a token or not, so GMPOLoss refuses such a mask, naming it (it gave the binarised mask's
    number, or for a row summing below 1 TRL's unclamped one). A 0/1 mask of any dtype still matches TRL."""
    d = batch(seed=12)
    frac = d["m"].float()
    frac[0, :3] = torch.tensor([0.5, 0.25, 0.75])
    frac[2] = frac[2] * 0.1  # a row whose sum is below 1
    trl = lambda m: trl_loss(dict(), d["lp"], d["old"], d["A"], m, d["H"])[0]  # noqa: E731
    assert not torch.allclose(trl(frac), trl(d["m"].double()))  # TRL's number is a weighted one
    for mask in (frac, d["m"] * 2):
        with pytest.raises(ValueError, match="^completion_mask must hold 0 and 1 only"):
            GMPOLoss({})(d["lp"], d["old"], d["A"], mask, entropy=d["H"])
    for mask in (d["m"].float(), d["m"].int()):
        _compare(*_call_both(dict(beta=0.02), {**d, "m": mask}, 1, 1, True))


def test_fractional_completion_mask_unread_gives_nan(monkeypatch):
    """Where the mask's values are not read on the host (a GPU tensor), a fractional mask makes the loss NaN."""
    from fastalign import _validate

    monkeypatch.setattr(_validate, "flag_or_raise", lambda bad, x, message: bad)
    d = batch(seed=13)
    frac = d["m"].float()
    frac[0, 0] = 0.5
    assert torch.isnan(GMPOLoss({})(d["lp"], d["old"], d["A"], frac, entropy=d["H"])[0])
    assert torch.isfinite(GMPOLoss({})(d["lp"], d["old"], d["A"], d["m"].float(), entropy=d["H"])[0])


def test_gmpo_loss_checks_its_arguments():
    d = batch(seed=1)
    loss = GMPOLoss({})
    call = dict(entropy=d["H"])
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        loss(d["lp"], d["old"], d["A"], d["m"], importance_sampling_ratio=torch.ones(6), **call)
    with pytest.raises(ValueError, match="sampling_logprobs"):
        loss(d["lp"], d["old"], d["A"], d["m"], sampling_logprobs=d["old"], **call)
    with pytest.raises(ValueError, match="advantages"):
        loss(d["lp"], d["old"], d["A"][:, None].expand(6, 9), d["m"], **call)
    with pytest.raises(ValueError, match="entropy"):
        loss(d["lp"], d["old"], d["A"], d["m"], entropy=None)
    with pytest.raises(ValueError, match="ref_logprobs"):
        GMPOLoss(dict(beta=0.1))(d["lp"], d["old"], d["A"], d["m"], **call)
    with pytest.raises(ValueError, match="entropy_threshold"):
        loss(d["lp"], d["old"], d["A"], d["m"], entropy_threshold=torch.tensor(1.0), **call)
    with pytest.raises(ValueError, match="GMPOConfig.top_entropy_quantile"):
        GMPOLoss(dict(top_entropy_quantile=1.5))
    with pytest.raises(ValueError, match="GMPOConfig.epsilon"):
        GMPOLoss(dict(epsilon=-0.1))
    with pytest.raises(TypeError, match="GMPOConfig.beta"):
        GMPOLoss(dict(beta="0.1"))
    with pytest.raises(ValueError, match="no field 'epsilon_hi'"):
        GMPOLoss(dict(epsilon_hi=0.3))


# ------------------------------------------------------------------------------------------ drop-in GMPOTrainer

def test_gmpo_trainer_step_matches_trl(tmp_path):
    """One step of the drop-in GMPOTrainer on a tiny model (a KL term, the entropy mask, two micro-batches) logs
    TRL's GMPOTrainer's loss and metrics and makes its update."""
    pytest.importorskip("datasets", reason="TRL's trainers need datasets")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    import test_integration_trl_trainers as tiny

    import fastalign.integrations.trl as fa_trl
    checkpoint = tiny.tiny_checkpoint(tmp_path / "tiny-qwen2")
    options = dict(beta=0.05, top_entropy_quantile=0.5, epsilon_high=0.3, gradient_accumulation_steps=2)

    def build(cls, out):
        return tiny._online(cls, GMPOConfig, checkpoint, out, options)

    theirs = tiny._run(build(TRLGMPOTrainer, tmp_path / "trl"))
    ours = tiny._run(build(fa_trl.GMPOTrainer, tmp_path / "fa"))
    assert {"kl@0", "entropy@0", "clip_ratio/low_min@0"} <= set(ours[0])
    tiny._compare(theirs, ours)
