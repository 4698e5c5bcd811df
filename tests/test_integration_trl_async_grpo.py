"""The AsyncGRPO drop-in against TRL 1.16's own ``AsyncGRPOTrainer``, on the CPU without a vLLM server.

TRL's trainer takes its rollouts from a worker and publishes its weights through a transfer client, both of which
it lets a caller replace (its ``rollout_worker`` and ``weight_transfer`` arguments): here a queue of rollout
samples made up front, and a sync that sends nothing. Its tree attention runs flash-attn 3's variable-length kernel
(a GPU kernel fetched at run time); these tests give it :func:`_varlen_attention`, the same contract in plain torch,
itself checked by scoring a prefix tree of samples against each sample run alone in a row of its own.
"""
import math
import queue
import types

import pytest
import torch

trl = pytest.importorskip("trl")
async_grpo = pytest.importorskip("trl.experimental.async_grpo")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from trl.experimental.async_grpo import packing  # noqa: E402
from trl.experimental.async_grpo.async_rollout_worker import RolloutSample  # noqa: E402
from trl_runs import WORDS, assert_same_run, tiny_checkpoint, tiny_moe_checkpoint  # noqa: E402

from fastalign.integrations.hf import causal_lm_logprobs  # noqa: E402
from fastalign.integrations.trl import AsyncGRPOTrainer  # noqa: E402


def _varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale=None, causal=True, window_size=(-1, -1),
                      softcap=None):
    """flash-attn's ``flash_attn_varlen_func`` for the tree's segments: query segment ``s`` (rows ``cu_q[s]:
    cu_q[s+1]`` of ``q [Nq, Hq, D]``) attends to key segment ``s`` of ``k, v [Nk, Hk, D]`` (its root-to-segment
    path), causally aligned at the bottom right (query ``j`` of ``Lq`` sees keys up to ``j + Lk - Lq``), the key
    heads repeated over the query heads."""
    assert causal and tuple(window_size) == (-1, -1) and softcap is None
    heads = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for s in range(cu_q.numel() - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)
        ks, vs = (x[cu_k[s]:cu_k[s + 1]].repeat_interleave(heads, dim=1).transpose(0, 1) for x in (k, v))
        lq, lk = qs.shape[1], ks.shape[1]
        visible = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = (qs @ ks.transpose(1, 2)) * (softmax_scale or qs.shape[-1] ** -0.5)
        out[cu_q[s]:cu_q[s + 1]] = (scores.masked_fill(~visible, -math.inf).softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.fixture(autouse=True)
def async_grpo_on_cpu(monkeypatch):
    """TRL's tree attention, its flash-attn kernel replaced by :func:`_varlen_attention`; and no peak-FLOPs lookup
    (TRL reads the CUDA device's name for its MFU metric, which it leaves out for an unknown device)."""
    monkeypatch.setattr(packing, "_flash_attn", lambda: types.SimpleNamespace(flash_attn_varlen_func=_varlen_attention))
    monkeypatch.setattr(async_grpo.async_grpo_trainer, "get_peak_flops_per_device", lambda accelerator, dtype: None)
    packing.register_tree_attention()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-async"), seed=3)


@pytest.fixture(scope="module")
def moe_checkpoint(checkpoint, tmp_path_factory):
    return tiny_moe_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-moe-async"), checkpoint)


@pytest.fixture(scope="module")
def opt_checkpoint(checkpoint, tmp_path_factory):
    """A tiny OPT policy (the tokenizer of ``checkpoint``): its body builds the causal mask without the position
    ids, so only TRL's tree attention splits the samples of a packed row."""
    path = tmp_path_factory.mktemp("tiny-opt-async")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=len(WORDS), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    model = transformers.OPTForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint).save_pretrained(path)
    return str(path)


def _samples(seed: int, groups: int = 2, per_group: int = 3, version: int = 0) -> list:
    """Rollout samples of ``groups`` prompts, ``per_group`` completions each: a completion shares its prompt and
    (after the first) a first token with the others of its group, so the tree forks inside the completions.
    Random old log-probs around -4 (ratios off 1 both ways) and advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for group in range(groups):
        prompt = torch.randint(3, len(WORDS), (4 + group,), generator=g).tolist()
        first = torch.randint(3, len(WORDS), (1,), generator=g).tolist()
        for i in range(per_group):
            completion = (first if i else []) + torch.randint(3, len(WORDS), (3 + i,), generator=g).tolist() + [1]
            ids = prompt + completion
            mask = [0] * len(prompt) + [1] * len(completion)
            mask[len(prompt) + 1] = 0 if i == 2 else 1  # a tool token inside one completion: forwarded, not trained
            old = (-4.0 + torch.randn(len(ids), generator=g)).tolist()
            samples.append(RolloutSample(
                prompt=[], completion=[], input_ids=torch.tensor(ids), completion_mask=torch.tensor(mask),
                old_log_probs=torch.tensor(old), advantage=float(torch.randn((), generator=g)), model_version=version,
                group_id=seed * 100 + group, metrics={"reward": float(i)}))
    return samples


def test_tree_rows_score_each_sample_as_it_alone(checkpoint):
    """``causal_lm_logprobs`` with a packed tree's ``shift_labels`` and tree attention: every loss term's log-prob
    and entropy equal those of its sample run alone (its own logits, default attention), shared positions once."""
    row = packing.TreeRow()
    samples = _samples(seed=1, groups=1)
    for sample in samples:
        row.add({"input_ids": sample.input_ids, "completion_mask": sample.completion_mask,
                 "old_log_probs": sample.old_log_probs, "advantage": sample.advantage, "group_id": 0})
    packed = row.pack()
    assert packed["input_ids"].numel() < sum(s.input_ids.numel() for s in samples)  # something is shared
    tree = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation=packing.TREE_ATTENTION)
    alone = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    max_q, max_k = packed["tree_max_seqlens"].tolist()
    stats = causal_lm_logprobs(
        tree.eval(), packed["input_ids"][None], position_ids=packed["position_ids"][None],
        shift_labels=packed["shift_labels"][None], entropy=True, tree_kv_index=packed["tree_kv_index"],
        tree_cu_seqlens_q=packed["tree_cu_seqlens_q"], tree_cu_seqlens_k=packed["tree_cu_seqlens_k"],
        tree_max_seqlen_q=max_q, tree_max_seqlen_k=max_k)
    assert stats.logprobs.shape == packed["input_ids"][None].shape
    lp, ent = stats.logprobs[0, packed["token_index"]], stats.entropy[0, packed["token_index"]]
    want_lp, want_ent = [], []
    with torch.no_grad():
        for sample in samples:
            logp = alone.eval()(sample.input_ids[None]).logits[0, :-1].double().log_softmax(-1)
            trained = sample.completion_mask[1:].bool()
            want_lp.append(logp.gather(1, sample.input_ids[1:, None])[:, 0][trained])
            want_ent.append(-(logp.exp() * logp).sum(-1)[trained])
    torch.testing.assert_close(lp.double(), torch.cat(want_lp), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), torch.cat(want_ent), rtol=0, atol=1e-5)
    unlabelled = packed["shift_labels"] == -100
    assert unlabelled.any() and (stats.logprobs[0][unlabelled] == 0).all()


class _Rollouts:
    """TRL's rollout-worker contract over samples made up front (no vLLM server, no generation)."""

    def __init__(self, samples):
        self.rollout_buffer, self.metrics_queue = queue.Queue(), queue.Queue()
        for sample in samples:
            self.rollout_buffer.put(sample)

    def start(self):
        pass

    def stop(self):
        pass

    def update_model_version(self, model_version):
        pass

    def check_health(self, stale_after_s):
        raise RuntimeError("the test's rollout samples ran out")


class _NoSync:
    """TRL's weight-transfer contract with nothing to send to."""

    def init_weight_transfer(self):
        pass

    def pause(self):
        pass

    def send_weights(self, iterator):
        for _ in iterator:
            pass

    def resume(self):
        pass

    def destroy(self):
        pass


def _run(trainer_class, checkpoint, tmp_path, samples, peft_config=None, **config):
    """``(logs, before, after)`` of ``train()``: the logged values (time and throughput left out) and the trainable
    parameters before and after."""
    args = async_grpo.AsyncGRPOConfig(**{**dict(
        output_dir=str(tmp_path), max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1, optim="sgd",
        learning_rate=0.5, bf16=False, dtype="float32", save_strategy="no", disable_tqdm=True, token_budget=0,
        per_device_train_batch_size=3, max_staleness=100, num_generations=3), **config})
    dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 4})  # the prompts the stubbed worker would sample
    trainer = trainer_class(checkpoint, args=args, train_dataset=dataset,
                            processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint),
                            rollout_worker=_Rollouts(samples), weight_transfer=_NoSync(), peft_config=peft_config)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    logs = [{k: v for k, v in log.items() if not (k.startswith("perf/") or k.endswith("_s") or "time" in k)}
            for log in trainer.state.log_history[:-1]]
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    return logs, before, after


@pytest.mark.parametrize("config", [
    dict(),
    dict(temperature=0.7, epsilon=0.1, epsilon_high=0.3),
    dict(gradient_accumulation_steps=2, max_steps=1),
], ids=["defaults", "temperature-asymmetric-clip", "accumulation"])
def test_async_grpo_drop_in_matches_trl(checkpoint, tmp_path, config):
    """The same logged metrics (ratio, kl, entropy, clip ratios, batch and sample accounting) and the same parameter
    update as TRL's trainer after two optimizer steps on the same rollouts."""
    _compare_runs(checkpoint, tmp_path, config)


def test_async_grpo_lora_matches_trl(checkpoint, tmp_path):
    """A LoRA adapter on the body's attention (TRL refuses one on the head): the same metrics and adapter update."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    _compare_runs(checkpoint, tmp_path, dict(peft_config=lora))


def test_async_grpo_moe_load_balancing_loss_matches_trl(moe_checkpoint, tmp_path):
    """A MoE policy: the load-balancing loss from the same body forward, added and logged (``aux_loss``) as TRL's."""
    _compare_runs(moe_checkpoint, tmp_path, {}, also=("aux_loss",))


def test_async_grpo_tree_rows_of_a_body_that_does_not_split_packed_rows(opt_checkpoint, tmp_path, monkeypatch):
    """OPT builds its causal mask without the position ids: the drop-in refused its packed tree rows (a ValueError
    on the CPU, NaN hidden states on a GPU), which TRL's tree attention splits. The same run as TRL's (its FLOPs
    count, which does not know OPT's config, stubbed for both)."""
    monkeypatch.setattr(async_grpo.async_grpo_trainer, "compute_flops_per_token", lambda *args, **kwargs: 1.0)
    _compare_runs(opt_checkpoint, tmp_path, {})


def _compare_runs(checkpoint, tmp_path, config, also=()):
    samples = _samples(seed=2, groups=4)
    theirs = _run(async_grpo.AsyncGRPOTrainer, checkpoint, tmp_path / "trl", samples, **config)
    ours = _run(AsyncGRPOTrainer, checkpoint, tmp_path / "fa", samples, **config)
    assert all({"loss", "ratio", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_max", *also} <= set(log)
               for log in theirs[0])
    assert_same_run(ours, theirs, min_logs=1)


def test_async_grpo_refuses_liger(checkpoint, tmp_path):
    """``use_liger_kernel`` raises naming the field before any model work."""
    args = async_grpo.AsyncGRPOConfig(output_dir=str(tmp_path), use_liger_kernel=True, report_to="none",
                                      use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="AsyncGRPOConfig.use_liger_kernel"):
        AsyncGRPOTrainer(checkpoint, args=args, rollout_worker=_Rollouts([]), weight_transfer=_NoSync())
