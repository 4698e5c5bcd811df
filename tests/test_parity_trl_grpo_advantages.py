"""TRL 1.16 parity: ``GRPOTrainer``'s advantages against :func:`fastalign.integrations.trl.grpo_advantages`.

TRL computes them inside ``GRPOTrainer._generate_and_score_completions``; the test calls that method
unbound on a stand-in trainer carrying the attributes it reads (set from a real ``GRPOConfig`` as
the trainer's ``__init__`` sets them), whose ``_generate`` returns fixed token ids and whose
``_calculate_rewards`` returns the test's reward columns. No model, no generation; float64 at 1e-6.
"""
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import LocalAccelerator, random_rewards

pytest.importorskip("trl", reason="TRL is not installed: `pip install trl==1.16.*` to run the parity tests")
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

from trl import GRPOConfig  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from fastalign.integrations.trl import GRPO_ADVANTAGE_DEFAULTS, grpo_advantages  # noqa: E402

D = torch.float64


def _trl_grpo(args, rewards_per_func, training=True, T=3):
    """``GRPOTrainer._generate_and_score_completions(...)["advantages"]`` on a stand-in trainer."""
    B, n_funcs = rewards_per_func.shape
    model = SimpleNamespace(training=training, is_gradient_checkpointing=False)

    def logps(trainer, m, ids, attention, keep, batch_size=None, **kw):
        return torch.zeros(B, keep, dtype=D), None, None

    trainer = SimpleNamespace(
        accelerator=LocalAccelerator(), model=model, ref_model=None, args=args, environment_factories=None,
        tools=None, environments=None, _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None,
        mask_truncated_completions=False, beta=0.0, num_generations=args.num_generations,
        num_generations_eval=args.num_generations_eval or args.num_generations,
        reward_weights=torch.tensor(args.reward_weights or [1.0] * n_funcs, dtype=torch.float32),
        reward_funcs=[None] * n_funcs, reward_func_names=[f"f{i}" for i in range(n_funcs)],
        multi_objective_aggregation=args.multi_objective_aggregation, scale_rewards=args.scale_rewards,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list), "images": []},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False, use_vllm=False,
        vllm_importance_sampling_correction=False, num_iterations=1, _step=0, _is_vlm=False)
    trainer._generate = lambda prompts: ([[1, 2]] * B, [[3] * T] * B, None, ["c"] * B, None, {}, None, None)
    trainer._get_per_token_logps_and_entropies = types.MethodType(logps, trainer)
    trainer._calculate_rewards = lambda *a: rewards_per_func.clone()
    return GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * B)["advantages"]


def _config(**kw):
    return GRPOConfig(output_dir="/tmp/fastalign-trl-parity", report_to=[], use_cpu=True, **kw)


def _compare(args, rewards, training=True):
    want = _trl_grpo(args, rewards, training)
    got = grpo_advantages(args, rewards, training=training)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    return got


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("case", ["plain", "unscorable", "alone-in-group", "weights", "equal-group"])
def test_sum_then_normalize(case, scale):
    G, B = 4, 12
    kw = dict(num_generations=G, per_device_train_batch_size=B, scale_rewards=scale)
    unscorable, partial = (), ()
    if case == "unscorable":
        unscorable, partial = (1, 6), (3, 9)
    if case == "alone-in-group":  # every sibling of row 0 unscorable: its std is NaN in TRL
        unscorable = tuple(range(1, G))
    if case == "weights":
        kw["reward_weights"] = [0.3, 1.7]
    r = random_rewards(B, 2, seed=len(case), unscorable=unscorable, partial=partial)
    if case == "equal-group":
        r[4:8] = r[4]
    got = _compare(_config(**kw), r)
    if case in ("unscorable", "alone-in-group"):
        assert torch.all(got[list(unscorable)] == 0)


@pytest.mark.parametrize("case", ["plain", "unscorable", "partial", "weights"])
def test_normalize_then_sum(case):
    kw = dict(num_generations=4, per_device_train_batch_size=8, multi_objective_aggregation="normalize_then_sum")
    if case == "weights":
        kw["reward_weights"] = [2.0, 0.5, 1.0]
    r = random_rewards(8, 3, seed=7, unscorable=(2,) if case == "unscorable" else (),
                 partial=(1, 5) if case == "partial" else ())
    _compare(_config(**kw), r)


@pytest.mark.parametrize("inf", [float("inf"), -float("inf")])
@pytest.mark.parametrize("aggregation, scale", [("sum_then_normalize", s) for s in ("group", "batch", "none", True)]
                         + [("normalize_then_sum", "group")])
def test_infinite_reward_ends_with_trls_nan_to_num(aggregation, scale, inf):
    """An infinite reward: TRL's last step ``torch.nan_to_num(advantages, nan=0.0)`` turns the NaN it
    leaves into 0 (±inf into the largest float); ``normalize_then_sum`` drops the column's NaN from its
    ``nansum`` and keeps the other columns of those rows."""
    r = random_rewards(12, 2, seed=4, unscorable=(7,), partial=(9,))
    r[1, 1] = inf
    args = _config(num_generations=4, per_device_train_batch_size=12, scale_rewards=scale,
                   multi_objective_aggregation=aggregation)
    got = _compare(args, r)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_evaluation_groups_of_one(aggregation):
    """num_generations_eval=1 in evaluation: no group statistics, every advantage 0."""
    args = _config(num_generations=2, per_device_train_batch_size=4, num_generations_eval=1,
                   multi_objective_aggregation=aggregation)
    got = _compare(args, random_rewards(3, 2, seed=1), training=False)
    assert torch.all(got == 0)


def test_evaluation_num_generations_eval_zero_is_unset():
    """GRPOTrainer takes ``num_generations_eval or num_generations``: 0 groups by num_generations, as None."""
    args = _config(num_generations=2, per_device_train_batch_size=4, num_generations_eval=0)
    rewards = random_rewards(6, 2, seed=2)
    _compare(args, rewards, training=False)
    got = grpo_advantages(dict(num_generations=2, num_generations_eval=0), rewards, training=False)
    torch.testing.assert_close(got, _trl_grpo(args, rewards, training=False), atol=1e-6, rtol=1e-6)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(G=st.sampled_from([2, 4]), groups=st.integers(1, 3), F=st.integers(1, 3),
       aggregation=st.sampled_from(["sum_then_normalize", "normalize_then_sum"]),
       scale=st.sampled_from(["group", "batch", "none", True, False]), weighted=st.booleans(), seed=st.integers(0, 99),
       holes=st.lists(st.tuples(st.integers(0, 11), st.integers(-1, 2)), max_size=4), ties=st.booleans())
def test_random_batches_match_trl(G, groups, F, aggregation, scale, weighted, seed, holes, ties):
    """Random group sizes, reward columns, weights, scalings, NaN rewards (whole rows or one function)
    and tied rewards."""
    B = G * groups
    if aggregation == "normalize_then_sum":
        scale = "group"
    r = random_rewards(B, F, seed)
    if ties:
        r = r.round()
    for row, col in holes:  # col -1: every reward function returned None for the row
        if row < B:
            r[row, slice(None) if col < 0 else col % F] = float("nan")
    args = _config(num_generations=G, per_device_train_batch_size=B, scale_rewards=scale,
                   multi_objective_aggregation=aggregation,
                   reward_weights=[0.5 + k for k in range(F)] if weighted else None)
    _compare(args, r)


def test_defaults_and_bad_inputs():
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for k, v in GRPO_ADVANTAGE_DEFAULTS.items():
        assert fields[k].default == v, k
    with pytest.raises(ValueError, match="num_generations"):
        grpo_advantages({"num_generations": 3}, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="reward_weights"):
        grpo_advantages({"num_generations": 2, "reward_weights": [1.0]}, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="rewards_per_func"):
        grpo_advantages({"num_generations": 2}, torch.zeros(4))
    for bad in ([[0.0], [1.0]], torch.zeros(2, 1, dtype=torch.complex64), torch.zeros(2, 1).to_sparse()):
        with pytest.raises(TypeError, match="^rewards_per_func must"):  # was an error from inside for sparse
            grpo_advantages({"num_generations": 2}, bad)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages({"num_generations": 2, "scale_rewards": "sequence"}, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="scale_rewards"):  # TRL ignores it there
        grpo_advantages({"num_generations": 2, "scale_rewards": "batch",
                         "multi_objective_aggregation": "normalize_then_sum"}, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        grpo_advantages({"num_generations": 2, "multi_objective_aggregation": "mean"}, torch.zeros(4, 1))
