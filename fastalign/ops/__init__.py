"""Ops: one ``torch.library.custom_op`` per kernel, with fake implementations
and autograd, dispatching to Triton, C++ or CUDA kernels by backend name; and two
token-level ops whose kernels run in eager calls only (``kl_penalty``,
``masked_whiten``), with their torch formula for every other call."""
