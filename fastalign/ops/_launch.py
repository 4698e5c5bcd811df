"""Small helpers shared by the ops: how an op is declared (:func:`kernel_op`), when a call may skip the
dispatcher (:func:`runs_directly`), which kernel an op without a custom op runs in an eager call
(:func:`eager_family`), the device kernels launch on (:func:`on_device`), dtype codes, raw pointers, Triton
kernels."""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import typing
from typing import Callable, Optional

import torch

from fastalign import _backend

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer for the compiled core; 0 for a missing or empty optional output."""
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def opt(t: torch.Tensor | None) -> torch.Tensor | None:
    """Empty placeholder tensors (for outputs not requested) become None."""
    return None if t is None or t.numel() == 0 else t


def stat_outputs(n: int, device, entropy: bool, sum_p2: bool, argmax: bool, argmax_value: bool = False):
    """Per-row outputs of the statistics ops: (logprobs, entropy, sum_p2, argmax[, argmax logit], lse),
    fp32 (argmax int64); the ones not requested are empty."""
    f32 = dict(device=device, dtype=torch.float32)
    out = [torch.empty(n, **f32), torch.empty(n if entropy else 0, **f32), torch.empty(n if sum_p2 else 0, **f32),
           torch.empty(n if argmax else 0, device=device, dtype=torch.int64)]
    if argmax_value:
        out.append(torch.empty(n if argmax else 0, **f32))
    return (*out, torch.empty(n, **f32))


def linear_outputs(n: int, device, entropy: bool, sum_p2: bool, argmax: bool, mean_logit: bool):
    """Per-row outputs of the ops over hidden states: :func:`stat_outputs` with the argmax logit, then the mean
    logit (fp32; empty when not requested) and ``log c``, the rounding error of the fp32 lse that backward removes
    (:func:`~fastalign.ops.vocab_pieces.log_mass`): (logprobs, entropy, sum_p2, argmax, argmax logit, lse,
    mean_logit, log_c)."""
    out = stat_outputs(n, device, entropy, sum_p2, argmax, argmax_value=True)
    f32 = dict(device=device, dtype=torch.float32)
    return (*out, torch.empty(n if mean_logit else 0, **f32), torch.empty(n, **f32))


def triton_kernels(name: str):
    """``fastalign.kernels.<name>``, imported on first use (Triton is optional on CPU)."""
    return importlib.import_module(f"fastalign.kernels.{name}")


#: Device types the kernels run on (CPU: C++ kernels or the Triton interpreter; CUDA: Triton / CUDA).
KERNEL_DEVICES = ("cpu", "cuda")


def unrunnable(t: torch.Tensor) -> Optional[tuple[type, str]]:
    """Why no kernel can read ``t`` — ``(error type, description)`` — or None when one can.

    The kernels take raw pointers to dense, strided memory on a CPU or CUDA device:
    a meta tensor has no memory (its data pointer is null), sparse, mkldnn, nested and
    quantized tensors have another layout, and other accelerators have no kernels.
    Fake tensors (``torch.compile``, ``FakeTensorMode``) report the device they stand
    for and pass: their fake implementations never touch memory.
    """
    if t.is_nested:
        return TypeError, "a nested tensor"
    if t.layout != torch.strided:
        return TypeError, f"a tensor with layout {t.layout}"
    if t.is_quantized:
        return TypeError, f"a quantized tensor ({t.dtype})"
    kind = t.device.type
    if kind == "meta":
        return ValueError, "a meta tensor (it has no data; trace with torch.compile or FakeTensorMode instead)"
    if kind not in KERNEL_DEVICES:
        return ValueError, f"a tensor on {t.device} (the kernels run on CPU and CUDA tensors)"
    return None


def on_device(*tensors):
    """The context in which kernels reading ``tensors`` launch: ``torch.cuda.device`` of the first CUDA tensor
    among them when that device is not the current one, else nothing to do.

    Triton and the CUDA kernels launch on the current CUDA device (and on its stream); tensors on another GPU
    (``cuda:1`` while ``cuda:0`` is current, as in a process that never called ``torch.cuda.set_device``)
    would be read from the wrong device. Non-tensor arguments are skipped."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            if t.device.index is not None and t.device.index != torch.cuda.current_device():
                return torch.cuda.device(t.device)
            break
    return contextlib.nullcontext()


def kernel_op(name: str, outputs: Callable, mutates_args: tuple[str, ...] = ()):
    """Declare the custom op ``fastalign::<name>`` from ``write(<op arguments>, out)``.

    ``outputs`` allocates the op's outputs (shapes, dtypes, device; contents unset) from the op arguments
    it names. The op calls it, lets ``write`` fill those outputs with the kernels and returns them; its
    fake implementation (torch.compile, FakeTensorMode) is ``outputs`` alone, so the outputs are declared
    in one place. The op's schema is ``write``'s signature without ``out``, returning ``out``'s annotation.
    The returned op has ``.direct``: the same implementation as a plain function (see :func:`runs_directly`).
    ``write`` runs on its tensors' device (:func:`on_device`).
    """
    def declare(write: Callable):
        hints = typing.get_type_hints(write)
        *params, out_param = inspect.signature(write).parameters.values()
        returns = hints[out_param.name]
        signature = inspect.Signature([p.replace(annotation=hints[p.name]) for p in params],
                                      return_annotation=None if returns is type(None) else returns)
        names = [p.name for p in params]
        picks = [names.index(n) for n in inspect.signature(outputs).parameters]

        def allocate(args, kwargs):
            if kwargs or len(args) != len(names):  # keywords or defaults: bind them by name
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                args = tuple(bound.arguments.values())
            return outputs(*(args[i] for i in picks))

        def implementation(*args, **kwargs):
            out = allocate(args, kwargs)
            with on_device(*args, *kwargs.values()):
                write(*args, **kwargs, out=out)
            return out

        implementation.__signature__ = signature
        implementation.__name__ = implementation.__qualname__ = name
        implementation.__doc__ = write.__doc__
        op = torch.library.custom_op(f"fastalign::{name}", implementation, mutates_args=mutates_args)
        op.register_fake(lambda *args, **kwargs: allocate(args, kwargs))
        op.direct = implementation
        return op

    return declare


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: Optional[torch.Tensor]) -> bool:
    """True for a plain eager call: every tensor a plain ``torch.Tensor`` or ``nn.Parameter`` (no fake,
    DTensor or other subclass), nothing tracing (torch.compile, jit), no functorch transform (vmap,
    torch.func.grad: their wrapped tensors pass as plain ones) and no dispatch or function mode active.
    Only then may the host read a tensor's values or call a kernel without the custom op."""
    return (all(t is None or type(t) in _PLAIN for t in tensors)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled())


def runs_directly(backend: str, *tensors: Optional[torch.Tensor]) -> bool:
    """The one rule for skipping the custom-op dispatcher: the C++ kernels (``backend == "cpp"``, CPU
    tensors) in a plain :func:`eager` call. The op's implementation (``op.direct``, or an autograd
    Function over it) then runs without the dispatcher's per-call cost; same kernels, same results.
    Everything else (torch.compile, fake tensors and other subclasses, modes, GPU) calls the op. (The ops
    without a custom op choose their eager kernels by :func:`eager_family`.)"""
    return backend == "cpp" and eager(*tensors)


@functools.cache
def _core_loads() -> bool:
    try:
        _backend.compiled()
    except RuntimeError:  # fastalign._C is missing or does not load
        return False
    return True


def eager_family_on(families: tuple[str, ...], device: torch.device) -> Optional[str]:
    """The kernel family (of ``families``, ``"cpp"`` and / or ``"triton"``) that an op with a torch formula for
    every other call (``kl_penalty``, ``masked_whiten``) runs in a plain eager call on tensors on ``device``, None
    for its torch ops: ``cpp`` on CPU tensors under ``auto`` or ``cpp`` with the compiled core loaded; ``triton``
    on CUDA tensors under ``auto``, ``triton`` or ``cuda``, and on CPU tensors under ``triton`` with
    ``TRITON_INTERPRET=1``, with Triton installed. Unlike a custom op these ops do not raise where a requested
    family cannot run: the torch ops compute the same formula there."""
    setting = _backend.current()
    if "cpp" in families and device.type == "cpu" and setting in ("auto", "cpp") and _core_loads():
        return "cpp"
    on_gpu = device.type == "cuda" and setting in ("auto", "triton", "cuda")
    interpreted = device.type == "cpu" and setting == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if "triton" in families and (on_gpu or interpreted) and _backend.triton_installed():
        return "triton"
    return None


def eager_family(families: tuple[str, ...], *tensors: torch.Tensor) -> Optional[str]:
    """:func:`eager_family_on` for ``tensors`` (on one device) in a plain :func:`eager` call, else None (the torch
    ops)."""
    if not eager(*tensors) or any(t.device != tensors[0].device for t in tensors):
        return None
    return eager_family_on(families, tensors[0].device)


def save_for_backward(ctx, *tensors: Optional[torch.Tensor]) -> None:
    """``ctx.save_for_backward(*tensors)``, with a copy of each tensor made under ``torch.inference_mode`` (a
    teacher's logits, labels or a mask from an inference pass: inputs that take no gradient, which autograd cannot
    save as they are). Other tensors are saved as they are, with autograd's check that they are not modified.
    Under ``torch.compile`` (which cannot trace ``is_inference``) all are saved as they are."""
    if not torch.compiler.is_compiling():
        tensors = tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)
    ctx.save_for_backward(*tensors)


def refuse_second_derivative(loss: str) -> None:
    """Raise a RuntimeError when autograd is asked for a graph of a fused backward's gradients.

    A fused loss computes its gradients with kernels (in its forward, or in a backward without graph) and
    returns them as constants: a second derivative through them (``create_graph=True``, a Hessian, a
    gradient penalty) would be silently zero. Autograd runs a backward with grad mode on exactly when
    ``create_graph=True``; the custom ops' backward ops raise when differentiated, as this does."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastalign's fused {loss} has no second derivative: its gradients are computed by kernels, with no "
            "graph of them, so differentiating them again (create_graph=True, double backward, Hessians, gradient "
            "penalties) is not supported")


def eager_autograd(op, setup_context: Callable, backward: Callable, loss: str, non_differentiable: tuple = ()):
    """The autograd Function of a :func:`kernel_op` ``op`` on the C++ kernels without the custom-op dispatch (eager
    CPU calls, where :func:`runs_directly`): its forward is ``op.direct`` with the op's own ``setup_context``, its
    backward the op's ``backward(ctx, *grads, direct=True)``. Like the op, differentiable once
    (:func:`refuse_second_derivative`, naming ``loss``); the outputs at ``non_differentiable`` (indices) are
    marked so."""

    def forward(ctx, *inputs):
        out = op.direct(*inputs)
        setup_context(ctx, inputs, out)
        ctx.mark_non_differentiable(*(out[i] for i in non_differentiable))
        return out

    def backward_once(ctx, *grads):
        refuse_second_derivative(loss)
        return backward(ctx, *grads, direct=True)

    # named at creation, so its graph nodes are too: token_stats -> TokenStatsEager (node TokenStatsEagerBackward)
    name = "".join(word.title() for word in op._name.split("_")) + "Eager"
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward_once)})


def check_row_pair(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str]) -> None:
    """Two ``[n, V]`` inputs a kernel reads by pointer as rows of one kernel dtype (:data:`DTYPE_CODE`) with
    contiguous elements (e.g. a student's and a teacher's logits): the second with the first's shape, dtype and
    device; a TypeError / ValueError naming the argument (``names``) otherwise, instead of a kernel reading other
    bytes, or past the end. Metadata only."""
    a, b = names
    if first.dtype not in DTYPE_CODE:
        raise TypeError(f"{a} must be float32, bfloat16 or float16, got {first.dtype}")
    if first.dim() != 2:
        raise ValueError(f"{a} must be [n, V], got shape {tuple(first.shape)}")
    if second.dtype != first.dtype:
        raise TypeError(f"{b} must have the dtype of {a} ({first.dtype}), got {second.dtype}")
    if second.shape != first.shape:
        raise ValueError(f"{b} must have the shape of {a} {tuple(first.shape)}, got {tuple(second.shape)}")
    if second.device != first.device:
        raise ValueError(f"{b} must be on the device of {a} ({first.device}), got {second.device}")
    for name, t in ((a, first), (b, second)):
        if t.numel() and t.shape[1] > 1 and t.stride(1) != 1:  # an empty tensor is read nowhere
            raise ValueError(f"{name} must have contiguous rows (last stride 1), got strides {t.stride()}")


def check_rows(name: str, t: torch.Tensor, rows, dtype: torch.dtype) -> None:
    """A per-row input that a kernel reads by raw pointer as ``rows`` contiguous elements of ``dtype``
    (e.g. ``labels``, int64): a TypeError (dtype) or ValueError (size, layout) naming ``name`` instead of
    a kernel reading other bytes, or past the end. Metadata only: no value is read."""
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (the kernels read it by pointer), got {t.dtype}")
    if t.numel() != rows:
        raise ValueError(f"{name} must have {rows} elements (one per row), got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels read it by pointer), got strides {t.stride()}")
