"""group_advantages on the CPU: the C++ kernel vs the per-group Python loop and a
vectorised PyTorch implementation, measured in the same run; plus GAE, masked_whiten and
the k3 kl_penalty (forward and backward) against their float64 / fp32 torch ops and verl's
(when installed).

    .venv/bin/python -m pytest benchmarks/test_bench_advantages.py --benchmark-only -q
    .venv/bin/python benchmarks/test_bench_advantages.py      # prints medians and speed-ups

GRPO case: 65,536 responses in shuffled groups of 16 with hashed prompt ids
(FASTALIGN_BENCH_B / FASTALIGN_BENCH_G for other sizes). No timing assertions.
"""
import importlib
import os
import statistics
import time

import pytest
import torch

import fastalign
from fastalign.ops.kl_penalty import kl_penalty_torch
from fastalign.ops.masked_whiten import weighted_whiten
from fastalign.reference import advantages as ref

B = int(os.environ.get("FASTALIGN_BENCH_B", 65536))
G = int(os.environ.get("FASTALIGN_BENCH_G", 16))
GAE_B, GAE_T = 256, 1024


def grpo_batch():
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, 2**62, (B // G,), generator=g)
    index = prompt_ids.repeat_interleave(G)[torch.randperm(B, generator=g)]
    scores = torch.randint(0, 2, (B,), generator=g).float() + 0.1 * torch.rand(B, generator=g)
    return scores, index


def gae_batch():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(GAE_B, GAE_T, generator=g)
    v = torch.randn(GAE_B, GAE_T, generator=g)
    lengths = torch.randint(GAE_T // 4, GAE_T + 1, (GAE_B, 1), generator=g)
    return r, v, (torch.arange(GAE_T)[None] < lengths).float()


def token_batch():
    """[256, 1024] log-probs, reference log-probs near them, a bool response mask."""
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(GAE_B, GAE_T, generator=g) * 0.1 - 2
    return lp, lp + 0.05 * torch.randn(GAE_B, GAE_T, generator=g), torch.rand(GAE_B, GAE_T, generator=g) > 0.3


def _verl(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def whiten_impls(x, m):
    impls = {"fastalign": lambda: fastalign.masked_whiten(x, m),
             "float64_torch_ops": lambda: (weighted_whiten(x, m.double(), 1e-8) * m.double()).float()}
    verl = _verl("verl.utils.torch_functional")
    if verl is not None:
        mf = m.float()
        impls["verl"] = lambda: verl.masked_whiten(x, mf)
    return impls


def kl_impls(lp, ref_lp):
    x = lp.clone().requires_grad_(True)
    impls = {"fastalign": lambda: fastalign.kl_penalty(x, ref_lp, "k3").sum().backward(),
             "torch_ops": lambda: kl_penalty_torch(x, ref_lp, "k3", False, True).sum().backward()}
    verl = _verl("verl.trainer.ppo.core_algos")
    if verl is not None:
        impls["verl"] = lambda: verl.kl_penalty(x, ref_lp, "low_var_kl").sum().backward()
    return impls


def grpo_impls(scores, index):
    ids = index.tolist()
    return {
        "fastalign": lambda: fastalign.group_advantages(scores, index, estimator="grpo"),
        "fastalign_group_size": lambda: fastalign.group_advantages(scores, group_size=G, estimator="grpo"),
        "vectorised_torch": lambda: ref.grpo_vectorized(scores, index),
        "python_loop": lambda: ref.grpo_python_loop(scores, ids),
    }


def gae_impls(r, v, m):
    return {
        "fastalign": lambda: fastalign.gae_advantages(r, v, m, gamma=0.99, lam=0.95),
        "torch_time_loop": lambda: ref.gae_time_loop(r, v, m, 0.99, 0.95),
    }


@pytest.fixture(scope="module")
def grpo():
    return grpo_impls(*grpo_batch())


@pytest.fixture(scope="module")
def gae():
    return gae_impls(*gae_batch())


@pytest.fixture(scope="module")
def whiten():
    lp, _, m = token_batch()
    return whiten_impls(lp, m)


@pytest.fixture(scope="module")
def kl():
    lp, ref_lp, _ = token_batch()
    return kl_impls(lp, ref_lp)


def _bench_token_op(benchmark, impls, impl, group):
    if impl not in impls:
        pytest.skip("verl is not installed")
    benchmark.group = f"{group} B={GAE_B} T={GAE_T}"
    benchmark.pedantic(impls[impl], rounds=30, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fastalign", "float64_torch_ops", "verl"])
def test_masked_whiten(benchmark, whiten, impl):
    _bench_token_op(benchmark, whiten, impl, "masked_whiten")


@pytest.mark.parametrize("impl", ["fastalign", "torch_ops", "verl"])
def test_kl_penalty_k3_forward_backward(benchmark, kl, impl):
    _bench_token_op(benchmark, kl, impl, "kl_penalty k3 forward+backward")


@pytest.mark.parametrize("impl", ["fastalign", "fastalign_group_size", "vectorised_torch", "python_loop"])
def test_grpo_65536_groups_of_16(benchmark, grpo, impl):
    benchmark.group = f"grpo B={B} shuffled groups of {G}"
    rounds = 3 if impl == "python_loop" else 50
    benchmark.pedantic(grpo[impl], rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fastalign", "torch_time_loop"])
def test_gae(benchmark, gae, impl):
    benchmark.group = f"gae B={GAE_B} T={GAE_T}"
    benchmark.pedantic(gae[impl], rounds=5 if impl != "fastalign" else 30, warmup_rounds=1)


def _median_ms(fn, rounds):
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    print(f"CPU threads: torch {torch.get_num_threads()}, fastalign OpenMP "
          f"{fastalign._backend.compiled().num_threads()}")
    for title, impls, base, slow in (
        (f"grpo B={B}, shuffled groups of {G}", grpo_impls(*grpo_batch()), "fastalign", {"python_loop"}),
        (f"gae B={GAE_B} T={GAE_T}", gae_impls(*gae_batch()), "fastalign", {"torch_time_loop"}),
        (f"masked_whiten B={GAE_B} T={GAE_T}", whiten_impls(*token_batch()[::2]), "fastalign", set()),
        (f"kl_penalty k3 forward+backward B={GAE_B} T={GAE_T}", kl_impls(*token_batch()[:2]), "fastalign", set()),
    ):
        ms = {k: _median_ms(f, 3 if k in slow else 50) for k, f in impls.items()}
        print(title)
        for k, t in ms.items():
            print(f"  {k:22s} {t:10.3f} ms   {t / ms[base]:8.1f}x the time of {base}")


if __name__ == "__main__":
    main()
