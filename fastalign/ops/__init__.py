"""Ops: one ``torch.library.custom_op`` per kernel, with fake implementations
and autograd, dispatching to Triton, C++ or CUDA kernels by backend name."""
