"""linear_logprobs vs the naive path (logits by matmul, log_softmax, gather, entropy, autograd).

pytest-benchmark cases (small shapes, both candidates measured in the same run; also a softcapped preference
step whose mean logits come from the loss's own pass or from a separate one)::

    .venv/bin/python -m pytest -q benchmarks/test_bench_linear.py

Time and peak extra memory at the issue's shape, each case in a fresh
subprocess (peak RSS above the RSS once inputs exist)::

    .venv/bin/python benchmarks/test_bench_linear.py --n 4096 --h 1024 --v 152064
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import pytest
import torch

import fastalign
from fastalign import reference


def _inputs(n, h, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * (1.0 / h ** 0.5)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def step_fastalign(hidden, weight, labels):
    st = fastalign.linear_logprobs(hidden, weight, labels, entropy=True)
    (st.logprobs.sum() - 0.01 * st.entropy.sum()).backward()


def step_naive(hidden, weight, labels):
    lp, ent = reference.eager_linear_logprobs_entropy(hidden, weight, labels)
    (lp.sum() - 0.01 * ent.sum()).backward()


STEPS = {"fastalign": step_fastalign, "naive": step_naive}


@pytest.mark.parametrize("impl", list(STEPS))
def test_bench_linear_fwd_bwd_entropy(benchmark, impl):
    hidden, weight, labels = _inputs(512, 256, 32000)

    def run():
        hidden.grad = weight.grad = None
        STEPS[impl](hidden, weight, labels)

    benchmark.group = "linear_logprobs cpu fp32 N=512 H=256 V=32000 fwd+bwd entropy"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def _softcapped_pairs(rows=8, t=256, h=256, v=32000):
    """A preference batch for a softcapped head: ``rows`` rows of ``t`` tokens (chosen first), half of each row an
    unscored prompt (``hidden`` flat, ``[rows * t, h]``)."""
    hidden, weight, labels = _inputs(rows * t, h, v)
    labels = labels.view(rows, t).clone()
    labels[:, :t // 2] = -100
    return hidden, weight, labels


def _mean_logit_step(hidden, weight, labels, in_pass: bool):
    """A loss's step through the head with the mean logit of each scored position (TRL's ``logits/chosen``):
    from the loss's own single pass, or by a separate pass through the vocabulary."""
    from fastalign.linear_step import separable_step

    def loss(lp, _sum_p2):
        return -lp.sum() / (labels != -100).sum(), {}
    logit = dict(softcap=30.0)
    hidden = hidden.view(*labels.shape, -1)
    value, _metrics, _stats = separable_step(hidden, weight, labels, loss, items="pairs", logit=logit,
                                             extras=("mean_logit",) if in_pass else ())
    if not in_pass:
        fastalign.linear_mean_logits(hidden, weight, softcap=30.0, response_mask=labels != -100)
    value.backward()


@pytest.mark.parametrize("in_pass", [True, False], ids=["in-the-loss-pass", "separate-pass"])
def test_bench_softcapped_mean_logit(benchmark, in_pass):
    hidden, weight, labels = _softcapped_pairs()

    def run():
        hidden.grad = weight.grad = None
        _mean_logit_step(hidden, weight, labels, in_pass)

    benchmark.group = "separable_step + mean logit, softcapped head, cpu fp32 8x256 H=256 V=32000 (half prompt)"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _case(impl, n, h, v, repeats):
    hidden, weight, labels = _inputs(n, h, v)
    base = _rss_bytes()
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        STEPS[impl](hidden, weight, labels)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = (n * h + v * h) * 4
    print(json.dumps(dict(impl=impl, n=n, h=h, v=v, time_s=min(times), times=times,
                          peak_extra_mib=(peak - base) / 2 ** 20,
                          peak_extra_beyond_grads_mib=(peak - base - grads) / 2 ** 20)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=152064)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--case", choices=list(STEPS))
    a = ap.parse_args()
    if a.case:
        _case(a.case, a.n, a.h, a.v, a.repeats)
        return
    res = {}
    for impl in STEPS:
        out = subprocess.run([sys.executable, __file__, "--case", impl, "--n", str(a.n), "--h", str(a.h),
                              "--v", str(a.v), "--repeats", str(a.repeats)], capture_output=True, text=True,
                             check=True)
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res[impl]))
    f, nv = res["fastalign"], res["naive"]
    print(f"time ratio fastalign/naive = {f['time_s'] / nv['time_s']:.3f}; "
          f"peak extra memory ratio = {f['peak_extra_mib'] / nv['peak_extra_mib']:.3f} "
          f"(beyond gradients: {f['peak_extra_beyond_grads_mib'] / nv['peak_extra_beyond_grads_mib']:.3f})")


if __name__ == "__main__":
    main()
