"""CPU ops beside a busy core: the same step alone and while another process spins on one core.

A training process always shares its cores (data loaders, the trainer, other ranks). A kernel
whose threads wait on a peer that the OS has descheduled stalls for a scheduler time slice, so
the slowdown beside a busy core, not the time alone, is what a user sees. Each case times
``alone`` (the baseline) and ``busy core`` (a spinning subprocess running); the speed-up column
is then 1 / slowdown. The same pairs for eager PyTorch show what the machine itself allows.
"""
from __future__ import annotations

import atexit
import subprocess
import sys

import torch

import fastalign
from fastalign.bench.core import Case, grad_step
from fastalign.reference import policy as ref

_SPIN = "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent:\n    t = time.time() + 0.05\n" \
        "    while time.time() < t:\n        pass\n"
_spinner: list = []


def _busy(on: bool) -> None:
    """Start (or stop) one subprocess that keeps a core busy until stopped or this process exits."""
    if on and not _spinner:
        _spinner.append(subprocess.Popen([sys.executable, "-c", _SPIN]))
    elif not on and _spinner:
        p = _spinner.pop()
        p.kill()
        p.wait()


atexit.register(_busy, False)


def _with_load(step, on: bool):
    if step is None:
        return None

    def run():
        _busy(on)
        return step()
    return run


def _policy_steps(B, T):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3.0
    old = lp + torch.randn(B, T, generator=g) * 0.2
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    m = torch.arange(T)[None, :] < torch.randint(T // 4, T + 1, (B, 1), generator=g)
    refl = lp + torch.randn(B, T, generator=g) * 0.3

    def fused(x):
        return fastalign.policy_loss(x, old, A, m, ref_logprobs=refl, kl_type="k3", kl_coef=1e-3)[0]

    def eager(x):
        return ref.policy_loss(x, old, A, m, ref_logprobs=refl, kl_type="k3", kl_coef=1e-3)[0]
    return {"fastalign": (fused, (lp,)), "eager": (eager, (lp,))}


def _token_steps(N, V):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)

    def fused(z):
        return fastalign.token_logprobs(z, y).logprobs.sum()

    def eager(z):
        return torch.log_softmax(z, -1).gather(-1, y[:, None]).sum()
    return {"fastalign": (fused, (x,)), "eager": (eager, (x,))}


def _make(make_steps, shape, impl):
    def build(device, mode):
        fn, leaves = make_steps(*shape)[impl]
        step = grad_step(fn, leaves, mode == "fwd+bwd")
        return {"alone": _with_load(step, False), "busy core": _with_load(step, True)}
    return build


def cases():
    out = []
    for op, make_steps, shape, label in [
        ("policy_loss", _policy_steps, (256, 1024), "ppo+k3 B=256 T=1024"),
        ("token_logprobs", _token_steps, (256, 4096), "256x4096 fp32"),
    ]:
        for impl in ("fastalign", "eager"):
            out.append(Case(
                op=op, label=f"{label} {impl} beside a busy core", params={"shape": list(shape), "library": impl},
                build=_make(make_steps, shape, impl), modes=("fwd+bwd",), quick=False,
                impls=("alone", "busy core"), baseline="alone", devices=("cpu",)))
    return out
