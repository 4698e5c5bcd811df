"""verl's Megatron engine at one tensor-parallel rank: its logits processor's log-probs and entropy of the logits.

Per token of the ``[B, S, V]`` logits ``x`` (the rank's slice of the vocabulary: at one rank, all of it), with the
per-token temperature ``T`` and the label ``y``::

    z = x / T    (in place, in the logits' dtype, as verl divides them)
    log_probs = log softmax(z)_y        entropy = -sum_j p_j log p_j        loss = sum(log_probs + entropy)

The logits are an intermediate of the graph, as the model's output is (built by the step's ``before`` hook outside
the timed region). ``fastalign`` is :func:`fastalign.integrations.verl.megatron.lm_head_logits_processor` (one fused
:func:`fastalign.token_logprobs` pass, its backward written over the logits); ``verl`` is verl 0.9.1's own
``MegatronEngineWithLMHead._lm_head_logits_processor`` where verl and megatron-core are installed (its entropy pass,
a copy of the logits, then Megatron's ``vocab_parallel_cross_entropy``, each with its all-reduces over a group of
one rank). At one rank fastalign's processor has no shards to merge and runs the local pass alone; ``fastalign
(vocab_group)`` is the processor's work with the merge of :func:`fastalign.token_logprobs` ``(vocab_group=)`` forced
over the one-rank group (its all-reduces, the merged statistics, the label's element in backward): the per-rank
cost of tensor parallelism apart from the collectives' transfers. All need ``torch.distributed`` and Megatron's
parallel state: the case starts a one-process group on the first build where none is running.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from fastalign.bench.cases.token_logprobs import rows_case
from fastalign.bench.core import intermediate_step
from fastalign.bench.optional import optional_impl
from fastalign.integrations.verl.megatron import lm_head_logits_processor
from fastalign.logprobs import token_logprobs


def _one_rank_parallel_state(device) -> bool:
    """A one-process ``torch.distributed`` group and Megatron's parallel state at tensor-parallel size 1 (True), or
    False where megatron-core is not installed."""
    mpu = optional_impl("megatron.core.parallel_state", "model_parallel_is_initialized", "initialize_model_parallel")
    if mpu is None:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    if not mpu[0]():
        mpu[1](tensor_model_parallel_size=1)
    return True


def _make_build(B, S, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(B, S, V, device=device, dtype=dtype, generator=g)
        label = torch.randint(0, V, (B, S), device=device, generator=g)
        temperature = torch.full((B, S), 0.9, device=device)
        ready = _one_rank_parallel_state(device)
        engine = SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=False,
                                                               entropy_from_logits_chunk_size=2048))

        def step(method):
            if method is None or not ready:
                return None

            def loss(x, y):
                out = method(engine, x, y, temperature.clone(), calculate_sum_pi_squared=False,
                             calculate_entropy=True, distillation_use_topk=False, distillation_only=False,
                             logits_processor_func=None, batch=None, data_format="thd")
                return out["log_probs"].sum() + out["entropy"].float().sum()

            return intermediate_step(loss, base, label, backward=mode == "fwd+bwd")

        def merged(x, y):  # the processor's steps (verl's temperature division) with the merge forced
            import torch.distributed as dist

            x.div_(temperature.unsqueeze(-1).to(x.dtype))
            stats = token_logprobs(x, y, entropy=True, vocab_group=dist.group.WORLD, inplace_backward=True)
            return stats.logprobs.sum() + stats.entropy.to(x.dtype).float().sum()

        verl = optional_impl("verl.workers.engine.megatron.transformer_impl", "MegatronEngineWithLMHead") \
            if ready else None
        verl_method = None if verl is None else verl[0].__dict__["_lm_head_logits_processor"]
        if verl_method is lm_head_logits_processor:  # installed by FASTALIGN_VERL_MEGATRON=1: verl's own is lost
            verl_method = None
        return {"fastalign": step(lm_head_logits_processor), "verl": step(verl_method),
                "fastalign (vocab_group)": intermediate_step(merged, base, label, backward=mode == "fwd+bwd")
                if ready else None}

    return build


#: (batch, sequence, vocabulary, dtype)
SHAPES = [(4, 1024, 32000, "fp32"), (8, 1024, 151936, "bf16")]


def cases():
    return [dataclasses.replace(rows_case("verl_megatron", _make_build, (B, S, V), dt,
                                          ("fastalign", "fastalign (vocab_group)", "verl"),
                                          lead_names=("batch", "seq"), warmup_lead=(2, 4), traffic=True),
                                baseline="verl")
            for B, S, V, dt in SHAPES]
