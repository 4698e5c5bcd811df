"""policy_loss forward+backward on the CPU vs the eager reference, N = 1M tokens (B=1024, T=1024).

Run: .venv/bin/python -m pytest benchmarks/test_bench_policy.py --benchmark-only -q
(set FASTALIGN_BENCH_B / FASTALIGN_BENCH_T for other shapes). No timing assertions: read the table.
"""
import os

import pytest
import torch

import fastalign
from fastalign import reference

B = int(os.environ.get("FASTALIGN_BENCH_B", 1024))
T = int(os.environ.get("FASTALIGN_BENCH_T", 1024))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3.0
    old = lp + torch.randn(B, T, generator=g) * 0.2
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    m = torch.arange(T)[None, :] < lengths
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    H = torch.rand(B, T, generator=g) * 3.0
    return lp, old, A, m, ref, H


def _ppo_fused(lp, old, A, m, ref, H):
    x = lp.requires_grad_(True)
    h = H.requires_grad_(True)
    loss, _ = fastalign.policy_loss(x, old, A, m, ref_logprobs=ref, kl_type="k3", kl_coef=1e-3, entropy=h,
                                    entropy_coef=1e-3, backend="cpp")
    loss.backward()
    x.grad = h.grad = None


def _ppo_eager(lp, old, A, m, ref, H):
    x = lp.requires_grad_(True)
    h = H.requires_grad_(True)
    loss, _ = reference.policy_loss(x, old, A, m, ref_logprobs=ref, kl_type="k3", kl_coef=1e-3, entropy=h,
                                    entropy_coef=1e-3)
    loss.backward()
    x.grad = h.grad = None


@pytest.mark.benchmark(group="policy ppo+k3+entropy 1M")
@pytest.mark.parametrize("impl", ["fastalign", "eager"])
def test_ppo_kl_entropy(benchmark, batch, impl):
    lp, old, A, m, ref, H = (t.clone() for t in batch)
    fn = _ppo_fused if impl == "fastalign" else _ppo_eager
    benchmark.pedantic(fn, args=(lp, old, A, m, ref, H), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("impl", ["fastalign", "eager"])
def test_cov(benchmark, batch, impl, loss_type):
    benchmark.group = f"policy {loss_type} 1M"
    lp, old, A, m, _ref, _H = (t.clone() for t in batch)
    x = lp.requires_grad_(True)
    g = torch.Generator().manual_seed(0)

    def fused():
        loss, _ = fastalign.policy_loss(x, old, A, m, loss_type=loss_type, cov_ratio=2e-4, generator=g, backend="cpp")
        loss.backward()
        x.grad = None

    def eager():
        loss = reference.policy.eager_cov_loss(x, old, A, m, loss_type=loss_type, ratio=2e-4, generator=g)
        loss.backward()
        x.grad = None

    benchmark.pedantic(fused if impl == "fastalign" else eager, rounds=10, warmup_rounds=2)
