"""fastalign's logits processor for verl's Megatron engine against verl's own method, on two tensor-parallel ranks.

Two spawned gloo ranks initialise Megatron's parallel state with a tensor-parallel size of 2 (then of 1); each holds
its slice of the logits, Megatron's layout. verl 0.9.1's ``MegatronEngineWithLMHead._lm_head_logits_processor``
(its own installed code, calling Megatron's ``vocab_parallel_cross_entropy`` and verl's ``vocab_parallel_entropy``
/ ``vocab_parallel_sum_pi_squared``) and :func:`fastalign.integrations.verl.megatron.lm_head_logits_processor` run
on the same logits, per-token temperatures and labels: the same keys and dtypes, the same values, and the same
d(logits) of each rank's slice for a loss over every output. The drop-in functions against verl's functions of the
same names; the switch (``enable``, and ``FASTALIGN_VERL_MEGATRON=1`` through verl's plugin entry point).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers import rank_body, spawn_in

pytest.importorskip("megatron.core", reason="megatron-core is not installed (make install: megatron-core --no-deps)")
pytest.importorskip("verl", reason="verl is not installed (make install: verl --no-deps)")

WORLD = 2
HANG_LIMIT_S = 600
B, S, V = 2, 5, 42  # V / 2 = 21 ids per rank
# (logits dtype, sum p^2, entropy, top-k distillation, distillation only)
CASES = {
    "fp32_all": (torch.float32, True, True, False, False),
    "fp32_log_probs": (torch.float32, False, False, False, False),
    "bf16_all": (torch.bfloat16, True, True, False, False),
    "fp32_distillation": (torch.float32, False, True, True, False),
    "fp32_distillation_only": (torch.float32, True, False, True, True),
}


def _data(dtype):
    g = torch.Generator().manual_seed(7)
    logits = (3.0 * torch.randn(B, S, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = torch.tensor([0, V // 2, V - 1])  # both ends of both slices
    temperature = 0.6 + torch.rand(B, S, generator=g)  # per token, as verl expands it
    up = {k: torch.randn(B, S, generator=g) for k in ("log_probs", "entropy", "sum_pi_squared", "distill")}
    return logits, labels, temperature, up


def _engine(chunked=False):
    """What verl's method reads of its engine (``chunked``: its entropy in chunks of 2 rows)."""
    return SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=chunked,
                                                         entropy_from_logits_chunk_size=2))


def _distill(student_logits, data, data_format):
    """A stand-in for verl's top-k distillation function: a differentiable reading of the logits it is given (one
    that saves nothing for its backward: verl's method then lets Megatron's cross-entropy overwrite fp32 logits)."""
    return {"distill": student_logits.float().sum(-1)}


def _run(method, case, logits_slice, chunked=False):
    """The method on this rank's slice (a non-leaf, as a model's output): its outputs and d(logits); ``chunked``:
    verl's entropy in chunks, its outputs only (verl's chunked entropy cannot differentiate a model's logits)."""
    dtype, sum_p2, entropy, topk, only = CASES[case]
    _, labels, temperature, up = _data(dtype)
    leaf = logits_slice.clone().requires_grad_(not chunked)
    out = method(_engine(chunked), leaf * 1, labels, temperature.clone(), calculate_sum_pi_squared=sum_p2,
                 calculate_entropy=entropy, distillation_use_topk=topk, distillation_only=only,
                 logits_processor_func=_distill, batch=None, data_format="thd")
    if not chunked:
        # sum p^2 by value only: verl reads it without gradient, and its all-reduces are outside autograd (at two
        # ranks its autograd gradient is not the whole vocabulary's)
        sum(((v.float() * up[k]).sum() for k, v in out.items() if k != "sum_pi_squared"), torch.zeros(())).backward()
    return {"keys": list(out), **{k: v.detach() for k, v in out.items()}, "d_logits": leaf.grad}


def _worker(rank, store_path, out_dir):
    warnings.filterwarnings("ignore")  # Megatron warns at import that Transformer Engine and Apex are absent
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=300))
    with rank_body():
        from megatron.core import parallel_state as mpu
        from verl.utils.megatron import tensor_parallel as verl_tp
        from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

        from fastalign.integrations.verl import megatron

        verl_method = MegatronEngineWithLMHead.__dict__["_lm_head_logits_processor"]
        out = {}
        for tp in (2, 1):
            mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
            for case, (dtype, *_) in CASES.items():
                logits = _data(dtype)[0]
                shard = logits.chunk(tp, -1)[mpu.get_tensor_model_parallel_rank()]
                out["verl", tp, case] = _run(verl_method, case, shard)
                out["ours", tp, case] = _run(megatron.lm_head_logits_processor, case, shard)
            bf16 = _data(torch.bfloat16)[0].chunk(tp, -1)[mpu.get_tensor_model_parallel_rank()]
            out["verl chunked", tp] = _run(verl_method, "bf16_all", bf16, chunked=True)
            out["ours chunked", tp] = _run(megatron.lm_head_logits_processor, "bf16_all", bf16, chunked=True)
            logits, labels, _, _ = _data(torch.float32)
            shard = logits.chunk(tp, -1)[mpu.get_tensor_model_parallel_rank()]
            # verl's functions on copies: Megatron's cross-entropy and verl's entropy overwrite fp32 logits
            for name in ("vocab_parallel_entropy", "vocab_parallel_sum_pi_squared"):
                out["fn", tp, name] = (getattr(verl_tp, name)(shard.clone()), getattr(megatron, name)(shard))
            out["fn", tp, "log_probs"] = (verl_tp.vocab_parallel_log_probs_from_logits(shard.clone(), labels),
                                          megatron.vocab_parallel_log_probs_from_logits(shard, labels))
            mpu.destroy_model_parallel()
        megatron.enable()
        out["enabled"] = MegatronEngineWithLMHead._lm_head_logits_processor is megatron.lm_head_logits_processor
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results, from one 2-rank gloo run."""
    return spawn_in(tmp_path_factory, "verl-megatron", _worker, WORLD, HANG_LIMIT_S)


@pytest.mark.parametrize("tp", [2, 1])
@pytest.mark.parametrize("case", CASES)
def test_logits_processor_equals_verls(ranks, case, tp):
    """Same keys (in verl's order), dtypes and values as verl's method, and the same d(logits) of each rank's
    slice; bf16 within bf16 rounding (verl's entropy and sum p^2 compute in bf16, fastalign's in fp32)."""
    tol = dict(atol=3e-2, rtol=3e-2) if CASES[case][0] == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for r, got in enumerate(ranks):
        verl, ours = got["verl", tp, case], got["ours", tp, case]
        assert ours["keys"] == verl["keys"], (ours["keys"], verl["keys"])
        for k in (*verl["keys"], "d_logits"):
            assert ours[k].dtype == verl[k].dtype, (k, ours[k].dtype, verl[k].dtype)
            torch.testing.assert_close(ours[k].float(), verl[k].float(), msg=f"{k}, rank {r}, tp {tp}", **tol)
        assert verl["d_logits"].abs().max() > 0


@pytest.mark.parametrize("tp", [2, 1])
def test_chunked_entropy_keeps_verls_dtype(ranks, tp):
    """With ``entropy_from_logits_with_chunking`` verl's entropy is fp32 (it fills an fp32 tensor), bf16 logits
    included; fastalign's was in the logits' dtype."""
    for r, got in enumerate(ranks):
        verl, ours = got["verl chunked", tp], got["ours chunked", tp]
        assert ours["keys"] == verl["keys"]
        for k in verl["keys"]:
            assert ours[k].dtype == verl[k].dtype, (k, ours[k].dtype, verl[k].dtype)
            torch.testing.assert_close(ours[k].float(), verl[k].float(), atol=3e-2, rtol=3e-2, msg=f"{k}, rank {r}")


@pytest.mark.parametrize("tp", [2, 1])
@pytest.mark.parametrize("name", ["vocab_parallel_entropy", "vocab_parallel_sum_pi_squared", "log_probs"])
def test_functions_equal_verls(ranks, name, tp):
    for r, got in enumerate(ranks):
        verl, ours = got["fn", tp, name]
        assert ours.dtype == verl.dtype
        torch.testing.assert_close(ours, verl.detach(), atol=1e-5, rtol=1e-5, msg=f"{name}, rank {r}, tp {tp}")


def test_enable_installs_the_processor(ranks):
    assert all(got["enabled"] for got in ranks)


@pytest.mark.parametrize("value, installed", [("1", True), ("0", False), ("", False), ("yes", False)])
def test_the_environment_variable_switches_it_through_verls_plugin(value, installed):
    """``import verl`` loads fastalign's plugin, which installs the processor where FASTALIGN_VERL_MEGATRON=1,
    when verl imports its Megatron engine; not otherwise. Another value warns, naming the variable, and leaves the
    losses and estimators registered (it raised inside the plugin, which verl logs at debug level only: every
    fastalign_<name> was silently missing)."""
    code = ("import warnings; warnings.simplefilter('ignore'); warnings.filterwarnings('always', 'FASTALIGN')\n"
            "import verl\n"
            "from verl.trainer.ppo import core_algos\n"
            "from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead as E\n"
            "print(E._lm_head_logits_processor.__module__, 'fastalign_vanilla' in core_algos.POLICY_LOSS_REGISTRY)")
    env = {**os.environ, "FASTALIGN_VERL_MEGATRON": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    module, registered = done.stdout.strip().splitlines()[-1].split()
    assert (module == "fastalign.integrations.verl.megatron") == installed, module
    assert registered == "True"
    assert ("FASTALIGN_VERL_MEGATRON must be 1" in done.stderr) == (value == "yes"), done.stderr[-2000:]
