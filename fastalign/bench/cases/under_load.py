"""CPU ops beside a busy core: the same step alone and while another process spins on one core.

A training process always shares its cores (data loaders, the trainer, other ranks). A kernel
whose threads wait on a peer that the OS has descheduled stalls for a scheduler time slice, so
the slowdown beside a busy core, not the time alone, is what a user sees. Each case times
``alone`` (the baseline) and ``busy core`` (a spinning subprocess running); the speed-up column
is then 1 / slowdown. The same pairs for eager PyTorch show what the machine itself allows.

The spinning process is started once, when a case builds its steps, and then only paused (SIGSTOP)
and resumed (SIGCONT): a ``busy core`` step resumes it before its call and pauses it after, in the
step's ``before`` / ``after`` hooks, which run outside the timed region (see
:func:`fastalign.bench.core.hooks`). The timed call holds the measured work alone, and the core
spins for the whole of it. A caller that ignores the hooks still gets the load: the step resumes
a paused spinner itself (one signal) and ``alone`` pauses a running one.
"""
from __future__ import annotations

import atexit
import signal
import subprocess
import sys

import torch

import fastalign
from fastalign.bench.core import Case, grad_step
from fastalign.reference import policy as ref

#: spins until its parent ends (and, on Linux, is killed with it even while paused); says "ready" once spinning
_SPIN = ("import os, time\n"
         "try:\n"
         "    import ctypes\n"
         "    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
         "except Exception:\n"
         "    pass\n"
         "parent = os.getppid()\n"
         "print('ready', flush=True)\n"
         "while os.getppid() == parent:\n"
         "    t = time.time() + 0.05\n"
         "    while time.time() < t:\n"
         "        pass\n")


class Spinner:
    """One subprocess keeping a core busy: started once, then paused or resumed by a signal."""

    def __init__(self):
        self.proc = None
        self.running = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process if it is not running yet, and leave it paused."""
        if not self.alive():
            self.proc = subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE, text=True)
            self.proc.stdout.readline()  # its interpreter has started and it spins
            self.running = True
        self.set(False)

    def set(self, on: bool) -> None:
        """Resume (``on``) or pause the spinning; nothing when it already is so."""
        if on and not self.alive():
            self.start()
        if self.alive() and on != self.running:
            self.proc.send_signal(signal.SIGCONT if on else signal.SIGSTOP)
            self.running = on

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
        self.proc, self.running = None, False


_spinner = Spinner()
atexit.register(_spinner.stop)


def _with_load(step, on: bool):
    """``step`` with the spinner resumed (``on``) or paused around it: by its hooks, outside the timed region,
    and checked again in the call (a flag test when the hooks ran)."""
    if step is None:
        return None

    def run():
        _spinner.set(on)
        return step()
    run.before = lambda: _spinner.set(on)
    run.after = lambda: _spinner.set(False)
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
        _spinner.start()  # once per case, outside every timed step; paused until a "busy core" step
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
