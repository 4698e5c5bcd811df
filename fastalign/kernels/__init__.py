"""Triton kernels of fastalign (``fastalign.kernels``).

Each module holds the ``@triton.jit`` kernels for one op and a thin launcher
that takes preallocated tensors: kernels never allocate. ``softmax_math`` and
``kl_estimators`` hold formulas several kernels share. Import is lazy so the
package works where Triton is not installed (CPU-only environments).
"""
