"""Recording a Triton launch instead of running it: a fake CUDA driver for the target architecture lets
Triton's binder specialise the call, and the specialisation is captured (:func:`capturing`)."""
from __future__ import annotations

import contextlib


class _FakeCudaDriver:
    """Enough of Triton's active driver for the binder to specialise a call for ``arch``."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_device(self):
        return self.arch  # one binder cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        raise RuntimeError(f"the AOT gate does not launch kernels (driver.{name} was requested)")


@contextlib.contextmanager
def capturing(arch: int):
    """Inside: a kernel launch records ``(jit_fn, signature, constexprs, attrs, options)`` and returns."""
    import triton.runtime.jit as jit
    from triton.runtime.driver import driver

    calls = []
    original = jit.JITFunction._do_compile

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        calls.append((self, dict(signature), dict(constexprs), attrs, options))
        return None

    previous = driver._active  # None without a GPU: the real driver is only created on demand
    driver.set_active(_FakeCudaDriver(arch))
    jit.JITFunction._do_compile = record
    try:
        yield calls
    finally:
        jit.JITFunction._do_compile = original
        driver.set_active(previous)
