"""Assertion helpers and the body of a spawned rank, shared by the tests."""
import contextlib
import faulthandler
import os
import sys

import torch


def assert_close(actual, expected, *, atol, rtol=0.0, what=""):
    """Compare in float64 with a message that says where the worst error is."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    both_nan = torch.isnan(a) & torch.isnan(e)
    err = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound) & ~both_nan  # a NaN expected value also makes its bound NaN
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off; first at flat index {i}: "
            f"got {a.flatten()[i].item()}, expected {e.flatten()[i].item()} (atol={atol}, rtol={rtol})")


def policy_batch(g: torch.Generator, B: int, T: int):
    """A policy-loss batch drawn from ``g``: (log-probs, old log-probs, per-sequence advantages spread
    over tokens, response mask with one empty response), fp32 ``[B, T]`` each."""
    lp = -torch.rand(B, T, generator=g) * 2.0
    old = (lp + torch.randn(B, T, generator=g) * 0.3).clamp(max=-1e-3)
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    m = torch.arange(T)[None, :] < torch.randint(2, T + 1, (B, 1), generator=g)
    m[2] = False  # an empty response
    return lp, old, A, m


def policy_and_reference(batch, backend, ref_kw=None, **kw):
    """``((loss, metrics, d lp), (the same))`` of ``fastalign.policy_loss`` on ``backend`` (fp32) and of the float64
    reference, with the options ``kw``; the ``cov_*`` options go to fastalign alone, ``ref_kw`` (e.g. the
    reference's ``cov_selected``) to the reference alone."""
    import fastalign
    from fastalign import reference

    lp, old, A, m = batch
    x = lp.clone().requires_grad_(True)
    loss, met = fastalign.policy_loss(x, old, A, m, backend=backend, **kw)
    loss.backward()
    xr = lp.double().requires_grad_(True)
    rkw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()
           if not k.startswith("cov_")}
    rloss, rmet = reference.policy_loss(xr, old.double(), A.double(), m, **rkw, **(ref_kw or {}))
    rloss.backward()
    return (loss, met, x.grad), (rloss, rmet, xr.grad)


@contextlib.contextmanager
def rank_body():
    """The work of one spawned ``torch.distributed`` rank, after ``init_process_group``.

    On leaving, the rank waits for its peers and leaves its process group; when the work finished,
    it then exits at once.
    Interpreter teardown is skipped because gloo's threads can abort a rank there (SIGABRT,
    "terminate called without an active exception") after its results were written and the group
    destroyed, which would fail a run that passed. An exception in the work still propagates (the
    spawner reports it), and faulthandler prints every thread's stack if a rank aborts anyway.
    """
    import torch.distributed as dist

    faulthandler.enable(all_threads=True)
    try:
        yield
        dist.barrier()  # no rank tears gloo down while its peer still has work in flight
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, args: tuple, world: int, out_dir, hang_limit_s: float) -> list:
    """Run ``worker(rank, *args)`` on ``world`` spawned processes; each saves its results to
    ``out_dir/rank{r}.pt`` (inside :func:`rank_body`). Returns them in rank order. A rank's exception fails the
    call with its traceback; a run past ``hang_limit_s`` fails the test as a hang (its ranks killed)."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + hang_limit_s
    try:
        while not ctx.join(timeout=2):  # raises if a rank failed, with its traceback
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {hang_limit_s} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt")) for r in range(world)]


def spawn_in(tmp_path_factory, name: str, worker, world: int, hang_limit_s: float) -> list:
    """:func:`spawn_ranks` of ``worker(rank, store, out_dir)`` in a fresh directory ``name`` (its rendezvous file
    and results); skips where torch was built without ``torch.distributed``."""
    import pytest

    if not torch.distributed.is_available():  # pragma: no cover
        pytest.skip("torch was built without torch.distributed")
    tmp = tmp_path_factory.mktemp(name)
    return spawn_ranks(worker, (str(tmp / "store"), str(tmp)), world, tmp, hang_limit_s)


class LocalAccelerator:
    """One process's view of an ``accelerate.Accelerator``, for calling a TRL trainer's methods unbound on a
    stand-in trainer: gathers, reductions and padding are the identity; ``num_processes`` is what the
    trainer's formulas read (a share of a larger run)."""

    device = torch.device("cpu")
    process_index = 0
    sync_gradients = True

    def __init__(self, num_processes: int = 1):
        self.num_processes = num_processes

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def unwrap_model(self, m):
        return m

    def autocast(self):
        return contextlib.nullcontext()


def random_rewards(B: int, F: int, seed: int, unscorable=(), partial=()) -> torch.Tensor:
    """``[B, F]`` float64 rewards of F reward functions: NaN in every column of the ``unscorable`` rows
    (every function returned None) and in the first column of the ``partial`` rows."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, F, generator=g, dtype=torch.float64) * 2
    for i in unscorable:
        r[i] = float("nan")
    for i in partial:
        r[i, 0] = float("nan")
    return r


def interpreter_fp32_scalars(monkeypatch) -> None:
    """Float arguments reach Triton kernels in the interpreter as fp32 scalars, as the compiler types them (the
    interpreter passes a Python float, which has no ``.to``: Liger's kernels call ``.to(tl.float32)`` on theirs), for
    the rest of the test; nothing to do off the interpreter (on a GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def fp32_scalars(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", fp32_scalars)
