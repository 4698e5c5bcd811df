"""TRL 1.16 parity: ``RLOOTrainer``'s advantages and loss against :func:`fastalign.integrations.trl.rloo_advantages`
and :class:`fastalign.integrations.trl.RLOOLoss`.

TRL computes the advantages inside ``RLOOTrainer._generate_and_score_completions``; the test calls that method
unbound on a stand-in trainer carrying the attributes it reads (set from a real ``RLOOConfig`` as
the trainer's ``__init__`` sets them), whose ``_generate`` returns fixed token ids, whose
``_calculate_rewards`` returns the test's reward columns and whose
``_get_per_token_logps_and_entropies`` returns log-probs that give the test's sequence KL.
The loss is ``RLOOTrainer._compute_loss`` called the same way (TRL in float64, fastalign in float32).
No model, no generation; 1e-6.
"""
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from helpers import LocalAccelerator, random_rewards

pytest.importorskip("trl", reason="TRL is not installed: `pip install trl==1.16.*` to run the parity tests")
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

from trl import RLOOConfig  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

from fastalign.integrations.trl import RLOO_DEFAULTS, rloo_advantages  # noqa: E402

D = torch.float64


def _trl_rloo(args, rewards_per_func, kl=None, T=3, training=True):
    B, n_funcs = rewards_per_func.shape
    model = SimpleNamespace(training=training, is_gradient_checkpointing=False)

    def logps(trainer, m, ids, attention, keep, batch_size=None, **kw):
        out = torch.zeros(B, keep, dtype=D)
        if m is not model:  # the reference: sum_t (old - ref) = kl
            out[:, 0] = -kl
        return out, None, None

    trainer = SimpleNamespace(
        accelerator=LocalAccelerator(), model=model, ref_model=object() if args.beta else None, args=args,
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        beta=args.beta, num_generations=args.num_generations,
        num_generations_eval=args.num_generations_eval or args.num_generations,  # as RLOOTrainer.__init__ sets it
        reward_weights=torch.tensor(args.reward_weights or [1.0] * n_funcs, dtype=torch.float32),
        reward_clip_range=args.reward_clip_range, normalize_advantages=args.normalize_advantages,
        reward_func_names=[f"f{i}" for i in range(n_funcs)],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False)
    trainer._generate = lambda prompts: ([[1, 2]] * B, [[3] * T] * B, ["c"] * B)
    trainer._get_per_token_logps_and_entropies = types.MethodType(logps, trainer)
    trainer._calculate_rewards = lambda *a: rewards_per_func.clone()
    return RLOOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * B)["advantages"]


def _config(**kw):
    return RLOOConfig(output_dir="/tmp/fastalign-trl-parity", report_to=[], use_cpu=True, **kw)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("case", ["plain", "unscorable", "alone-in-group", "weights-clip", "kl"])
def test_rloo_advantages(case, G, normalize):
    kw = dict(num_generations=G, normalize_advantages=normalize, beta=0.0)
    unscorable, partial, kl = (), (), None
    if case == "unscorable":
        unscorable, partial = (1, 6), (3,)
    if case == "alone-in-group":  # every sibling of row 0 unscorable: its baseline is 0/0
        unscorable = tuple(range(1, G))
    if case == "weights-clip":
        kw.update(reward_weights=[0.3, 1.7], reward_clip_range=(-1.5, 2.0))
    rpf = random_rewards(8, 2, seed=G + 10 * normalize, unscorable=unscorable, partial=partial)
    if case == "kl":
        kw["beta"] = 0.2
        kl = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=D)
    args = _config(**kw)
    want = _trl_rloo(args, rpf, kl)
    got = rloo_advantages(args, rpf, kl)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("inf", [float("inf"), -float("inf")])
def test_rloo_infinite_reward_ends_with_trls_nan_to_num(inf, normalize):
    """An infinite reward: TRL's last step ``torch.nan_to_num(advantages, nan=0.0)`` maps the NaN it
    leaves to 0 and ±inf to the largest finite float, never NaN."""
    rpf = random_rewards(8, 2, seed=5, unscorable=(6,))
    rpf[1, 0] = inf
    args = _config(num_generations=4, normalize_advantages=normalize, beta=0.0)
    want = _trl_rloo(args, rpf)
    got = rloo_advantages(args, rpf)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("G_eval", [None, 1, 2])
def test_rloo_eval_advantages_group_by_num_generations_eval(G_eval, normalize):
    """An evaluation batch (``training=False``) is grouped by ``num_generations_eval or num_generations``,
    as ``RLOOTrainer`` groups it; a training batch by ``num_generations``."""
    rpf = random_rewards(8, 2, seed=21, unscorable=(5,), partial=(2,))
    fields = dict(num_generations=4, num_generations_eval=G_eval, normalize_advantages=normalize, beta=0.0)
    args = _config(**fields)
    want = _trl_rloo(args, rpf, training=False)
    for config in (args, fields):
        torch.testing.assert_close(rloo_advantages(config, rpf, training=False), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rloo_advantages(config, rpf), _trl_rloo(args, rpf), atol=1e-6, rtol=1e-6)


def test_rloo_defaults_and_bad_inputs():
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(RLOOConfig)}
    for k, v in RLOO_DEFAULTS.items():
        assert fields[k].default == v, k
    with pytest.raises(ValueError, match="kl"):
        rloo_advantages({"beta": 0.1}, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="num_generations"):
        rloo_advantages({"beta": 0.0, "num_generations": 3}, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="reward_weights"):
        rloo_advantages({"beta": 0.0, "reward_weights": [1.0]}, torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------ the loss

def _trl_rloo_loss(args, lp, old_logps, A, m, H, training=True):
    """``RLOOTrainer._compute_loss`` on a stand-in trainer; d loss / d lp, d loss / d H and its metrics."""
    lp = lp.clone().requires_grad_(True)
    H = H.clone().requires_grad_(True)
    B, T = lp.shape
    trainer = SimpleNamespace(
        args=args, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        aux_loss_enabled=False, accelerator=LocalAccelerator(), model=SimpleNamespace(training=training),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, H, None))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m.long(),
              "old_logps": old_logps, "advantages": A}
    loss = RLOOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = trainer._metrics["train" if training else "eval"]
    return loss.detach(), lp.grad, H.grad, {k: v[-1] for k, v in metrics.items()}


def _loss_batch(B=6, T=8, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=D) * 1.5
    lengths = torch.randint(1, T + 1, (B, 1), generator=g)
    m = torch.arange(T)[None, :] < lengths
    m[2] = False  # an empty completion
    old_logps = (lp * m).sum(-1) + torch.randn(B, generator=g, dtype=D) * spread
    A = torch.randn(B, generator=g, dtype=D)
    H = torch.rand(B, T, generator=g, dtype=D) * 3
    return lp, old_logps, A, m, H


@pytest.mark.parametrize("eps", [dict(), dict(epsilon=0.1), dict(epsilon=0.1, epsilon_high=0.28)])
@pytest.mark.parametrize("spread", [0.05, 0.4, 2.0])
def test_rloo_loss(eps, spread):
    """Loss, d loss / d per-token log-probs and TRL's metrics; at spread 2.0 most ratios are clipped."""
    from fastalign.integrations.trl import RLOOLoss

    args = _config(**eps)
    lp, old, A, m, H = _loss_batch(seed=int(spread * 10), spread=spread)
    tl, tg, th, tm = _trl_rloo_loss(args, lp, old, A, m, H)
    x = lp.float().requires_grad_(True)  # TRL in float64, fastalign in float32
    loss, met = RLOOLoss(args)(x, old.float(), A.float(), m, entropy=H.float())
    loss.backward()
    torch.testing.assert_close(loss.double(), tl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double(), tg, atol=1e-6, rtol=1e-5)
    assert th is None or torch.all(th == 0)  # TRL logs the entropy only
    assert set(met) == set(tm), (sorted(met), sorted(tm))
    for k, v in tm.items():
        torch.testing.assert_close(met[k].double(), torch.tensor(v, dtype=D), atol=1e-6, rtol=1e-6, msg=k)
    if spread == 2.0:
        assert tm["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rloo_loss_of_a_diverged_policy_matches_trl(sign):
    """Summed log-ratios of +-25 (0.05 nats a token over 500 tokens): TRL's ratio exp(l) has no clamp, so
    loss and gradient still equal TRL's (the default cap of 20 gave another loss and a zero gradient)."""
    from fastalign.integrations.trl import RLOOLoss

    args = _config()
    lp, old, A, m, H = _loss_batch(seed=5)
    old = old.clone()
    old[0] -= 25.0
    old[1] += 25.0
    A = A.abs() * sign
    tl, tg, _, _ = _trl_rloo_loss(args, lp, old, A, m, H)
    x = lp.float().requires_grad_(True)
    loss, _ = RLOOLoss(args)(x, old.float(), A.float(), m, entropy=H.float())
    loss.backward()
    if sign < 0:  # row 0 on the unclipped side of a ratio of exp(25): a loss of about exp(25) |A|
        assert tl.abs() > 1e8
    else:  # row 1's ratio of exp(-25): a gradient of about 1e-11, compared relative to its size
        assert 0 < tg[1].abs().max() < 1e-9
        torch.testing.assert_close(x.grad[1].double(), tg[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), tl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), tg, rtol=1e-5, atol=1e-6)


def test_rloo_loss_from_a_dict_and_bad_inputs():
    from fastalign.integrations.trl import RLOO_LOSS_DEFAULTS, RLOOLoss

    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(RLOOConfig)}
    for k, v in RLOO_LOSS_DEFAULTS.items():
        assert fields[k].default == v, k
    lp, old, A, m, H = (t.float() if t.is_floating_point() else t for t in _loss_batch(seed=3))
    a, _ = RLOOLoss({"epsilon": 0.1})(lp, old, A, m, entropy=H)
    b, _ = RLOOLoss(_config(epsilon=0.1))(lp, old, A, m, entropy=H)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="old_logps"):
        RLOOLoss()(lp, old[:, None], A, m, entropy=H)
    with pytest.raises(ValueError, match="advantages"):
        RLOOLoss()(lp, old, A[:3], m, entropy=H)
    with pytest.raises(ValueError, match="entropy"):
        RLOOLoss()(lp, old, A, m, entropy=H[:, :3])


def test_rloo_config_values_are_checked_not_coerced():
    """A string number (from YAML or CLI text) was converted with float()."""
    from fastalign.integrations.trl import RLOOLoss, rloo_advantages

    with pytest.raises(TypeError, match="^RLOOConfig.epsilon must be a"):
        RLOOLoss({"epsilon": "0.2"})
    with pytest.raises(TypeError, match="^RLOOConfig.beta must be a"):
        rloo_advantages({"beta": "0.05", "num_generations": 2}, torch.zeros(4, 1))



# ------------------------------------------------------------------------------------------ bad inputs
# Each bad argument raises a TypeError / ValueError whose message starts with the name the caller gave it
# (TRL's, never fastalign's internal token_logprobs / old_logprobs), before any arithmetic.
_BAD = {"None": lambda t: None, "list": lambda t: t.tolist(), "int64": lambda t: t.long(),
        "complex": lambda t: t.to(torch.complex64), "sparse": lambda t: t.to_sparse(), "meta": lambda t: t.to("meta"),
        "0-dim": lambda t: t[0], "[1]": lambda t: t[:1], "[B, 1]": lambda t: t[:, None], "[B, T-1]": lambda t: t[:, 1:]}


@pytest.mark.parametrize("arg, bad, error", [
    ("logprobs", "int64", TypeError), ("logprobs", "list", TypeError),
    ("old_logps", "complex", TypeError), ("old_logps", "int64", TypeError), ("old_logps", "sparse", TypeError),
    ("old_logps", "None", TypeError), ("advantages", "list", TypeError),
    ("completion_mask", "None", TypeError), ("completion_mask", "[B, T-1]", ValueError),
    ("entropy", "complex", TypeError), ("entropy", "sparse", TypeError), ("entropy", "meta", ValueError),
])
def test_rloo_loss_refuses_a_bad_argument_under_its_own_name(arg, bad, error):
    from fastalign.integrations.trl import RLOOLoss

    lp = torch.full((2, 3), -1.0)
    kw = dict(logprobs=lp, old_logps=lp.sum(1), advantages=torch.ones(2),
              completion_mask=torch.ones(2, 3, dtype=torch.bool), entropy=lp.abs())
    kw[arg] = _BAD[bad](kw[arg])
    entropy = kw.pop("entropy")
    with pytest.raises(error, match=rf"^{arg} "):
        RLOOLoss({})(*kw.values(), entropy=entropy)


@pytest.mark.parametrize("bad, error", [
    ("0-dim", ValueError), ("[1]", ValueError), ("[B, 1]", ValueError),  # the same KL for every completion
    ("complex", TypeError), ("int64", TypeError), ("sparse", TypeError), ("list", TypeError),
])
def test_rloo_advantages_refuse_a_kl_that_is_not_one_float_per_completion(bad, error):
    """A KL subtracted alike from every reward cancels within each group: beta would silently do nothing."""
    kl = torch.tensor([0.0, 3.0, 0.0, 3.0])
    with pytest.raises(error, match="^kl "):
        rloo_advantages({"num_generations": 2, "beta": 0.5}, torch.randn(4, 1), _BAD[bad](kl))


# ------------------------------------------------------------------------------------------ drop-in RLOOTrainer

@pytest.mark.parametrize("options", [dict(beta=0.0), dict(beta=0.05, eval_strategy="steps", eval_steps=1,
                                                          per_device_eval_batch_size=4)], ids=["plain", "kl-eval"])
def test_rloo_trainer_on_policy_ratio_is_exactly_one(tmp_path, monkeypatch, options):
    """The old policy's (and the reference's) log-probs, taken without gradients at generation, are those of the
    loss's own pass through the head, bit for bit: the sequence ratio of the on-policy step (and of the evaluation)
    is exactly 1, the step's logged loss exactly TRL's (which computes both with one function) and its KL to the
    unchanged reference 0. The two passes
    split the vocabulary in pieces here (``FASTALIGN_LINEAR_CHUNK_MIB``, as they do past 16384 ids), whose rounding
    is not the single pass's."""
    pytest.importorskip("datasets", reason="TRL's trainers need datasets")
    pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")
    import test_integration_trl_trainers as tiny

    import fastalign.integrations.trl as fa_trl
    from fastalign.integrations.trl.rloo import RLOOLoss

    monkeypatch.setenv("FASTALIGN_LINEAR_CHUNK_MIB", "0.001")
    checkpoint = tiny.tiny_checkpoint(tmp_path / "tiny-qwen2")
    log_ratios, call = [], RLOOLoss.__call__

    def recorded(self, logprobs, old_logps, advantages, completion_mask, *, entropy):
        if not torch.is_grad_enabled():  # the batch's loss (the single pass also calls it per block, for gradients)
            log_ratios.append(((logprobs * completion_mask).sum(1) - old_logps).detach())  # TRL's sums
        return call(self, logprobs, old_logps, advantages, completion_mask, entropy=entropy)

    monkeypatch.setattr(RLOOLoss, "__call__", recorded)
    theirs = tiny._run(tiny._rloo(RLOOTrainer, checkpoint, tmp_path / "trl", options))
    ours = tiny._run(tiny._rloo(fa_trl.RLOOTrainer, checkpoint, tmp_path / "fa", options))
    assert len(log_ratios) > ("eval_strategy" in options)  # the step's batch, and the evaluation's
    for log_ratio in log_ratios:
        assert torch.equal(log_ratio, torch.zeros_like(log_ratio)), log_ratio
    assert ours[0]["loss@0"] == theirs[0]["loss@0"]  # the evaluation's advantages hold the KL, TRL's to rounding
    if options["beta"]:
        assert ours[0]["kl@0"] == theirs[0]["kl@0"] == 0.0  # the reference is the policy before the step
    tiny._compare(theirs, ours)
