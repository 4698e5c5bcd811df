"""``fastalign::divergence_rows``: the distillation divergence of rows of student and teacher logits.

One custom op (``kernel_op``: outputs declared once, the fake from them) over a block of ``[n, V]``
student and teacher logits (after scale and softcap, before the temperature): per row the divergence (the
generalized JSD at ``beta``, the total variation distance, or the cosine distance), the student entropy at the
temperature and, with labels, the student NLL at temperature 1; with ``grad_soft`` it overwrites the student
logits with ``grad_soft * dD/dz_s + grad_hard * dNLL/dz_s`` (docs/math.md#distillation-divergence).
Kernels: ``csrc/cpu/divergence.cpp`` (fp32 rows) and ``fastalign/kernels/divergence.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign._backend import backend_for
from fastalign.ops._launch import (check_row_pair, check_rows, eager_autograd, kernel_op, ptr, runs_directly,
                                   save_for_backward, triton_kernels)
from fastalign.ops.token_stats import check_inplace_backward


#: the divergences between the two rows: the generalized JSD (its mode by beta), the total variation distance of
#: the distributions and the cosine distance of the logits
DIVERGENCES = ("jsd", "tvd", "cosine")


def divergence_mode(divergence: str, beta: float) -> int:
    """The kernels' mode: 0 forward KL (jsd at beta 0), 1 reverse KL (jsd at beta 1), 2 the generalized JSD,
    3 the cosine distance, 4 the total variation distance (``csrc/common/divergence_math.h``)."""
    if divergence == "cosine":
        return 3
    if divergence == "tvd":
        return 4
    if divergence != "jsd":
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return 0 if beta == 0 else (1 if beta == 1 else 2)


def _outputs(student: Tensor, teacher: Tensor, mask: Optional[Tensor], labels: Optional[Tensor],
             grad_soft: Optional[Tensor], grad_hard: Optional[Tensor], nll: bool):
    """Per-row (divergence, entropy, nll); the logits (:func:`~fastalign.ops._launch.check_row_pair`) and the per-row
    inputs checked first (the kernels read them by pointer)."""
    check_row_pair(student, teacher, ("student", "teacher"))
    f32 = dict(device=student.device, dtype=torch.float32)
    n = student.shape[0]
    for name, t, dtype in (("mask", mask, torch.float32), ("labels", labels, torch.int64),
                           ("grad_soft", grad_soft, torch.float32), ("grad_hard", grad_hard, torch.float32)):
        if t is not None:
            check_rows(name, t, n, dtype)
    return torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n if nll else 0, **f32)


#: the floats of a row's state (the softmax states, K, the cosine's terms), one layout per kernel family
#: (``kStateCols`` of csrc/cpu/divergence.cpp, ``STATE_COLS`` of fastalign/kernels/divergence.py)
STATE_COLS = 10


def _write_rows(student: Tensor, teacher: Tensor, mask: Optional[Tensor], labels: Optional[Tensor],
                grad_soft: Optional[Tensor], grad_hard: Optional[Tensor], inv_temperature: float, divergence: str,
                beta: float, ignore_index: int, nll: bool, backend: str, out: tuple[Tensor, Tensor, Tensor],
                state: Optional[Tensor] = None, state_in: bool = False) -> None:
    """The kernels of :func:`divergence_rows`; ``state`` (``[n, STATE_COLS]`` fp32, the layout of ``backend``'s
    kernel): written by a call without ``grad_soft``, read by a gradient call with ``state_in``, which then runs
    the gradient sweep alone and writes nothing to ``out``."""
    div, ent, nll_out = out
    n, V = student.shape
    if n == 0:  # no row: nothing to write (an empty state's pointer is null, which the C++ binding refuses)
        return
    mode = divergence_mode(divergence, beta)
    labels = labels if nll or grad_hard is not None else None
    backend = backend_for("divergence_rows", student.device, backend)
    if backend == "triton":
        triton_kernels("divergence").divergence_rows(
            student, teacher, inv_temperature, mode, beta, mask, labels, ignore_index, grad_soft, grad_hard, div,
            ent, nll_out if nll_out.numel() else None, state, state_in)
        return
    if student.dtype != torch.float32 or teacher.dtype != torch.float32:
        raise TypeError("the C++ divergence kernel takes fp32 logits")
    _backend.compiled().divergence_rows_cpu(
        student.data_ptr(), teacher.data_ptr(), n, V, student.stride(0), teacher.stride(0), inv_temperature, mode,
        beta, ptr(mask), ptr(labels), ignore_index, ptr(grad_soft), ptr(grad_hard), ptr(div), ptr(ent), ptr(nll_out),
        ptr(state), state_in)


@kernel_op("divergence_rows", _outputs, mutates_args=("student",))
def divergence_rows(
    student: Tensor, teacher: Tensor, mask: Optional[Tensor], labels: Optional[Tensor], grad_soft: Optional[Tensor],
    grad_hard: Optional[Tensor], inv_temperature: float, divergence: str, beta: float, ignore_index: int, nll: bool,
    backend: str, out: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Returns (divergence, entropy, nll) per row (nll empty unless asked, with ``labels``); ``divergence`` one
    of :data:`DIVERGENCES` (``beta`` read by the jsd only); ``mask`` (fp32, 0: the row gives zeros), ``labels``
    (int64), ``grad_soft`` / ``grad_hard`` (fp32 per-row weights of the gradient written over ``student``) may
    be None."""
    _write_rows(student, teacher, mask, labels, grad_soft, grad_hard, inv_temperature, divergence, beta,
                ignore_index, nll, backend, out)


def divergence_rows_call(student, teacher, mask, labels, grad_soft, grad_hard, inv_temperature, divergence, beta,
                         ignore_index, nll, backend):
    """:func:`divergence_rows`, without the dispatcher where :func:`~fastalign.ops._launch.runs_directly` allows."""
    args = (student, teacher, mask, labels, grad_soft, grad_hard, float(inv_temperature), str(divergence),
            float(beta), int(ignore_index), bool(nll), backend)
    if runs_directly(backend, student, teacher, mask, labels, grad_soft, grad_hard):
        return divergence_rows.direct(*args)
    return divergence_rows(*args)


# ------------------------------------------------------------------------------ differentiable per-token divergence
# ``fastalign::token_divergence`` (forward, no gradient written; it keeps each row's state) and its backward ops,
# which run the kernel's gradient sweep alone from that state, with the output gradients as the per-row weights
# ``grad_soft`` (of D) and ``grad_hard`` (of the NLL): ``g_D / T dD/dx_s + g_NLL (softmax(z_s) - 1[j = y])``
# written over the student rows it is given (a copy of the logits, or the logits themselves in place). The teacher
# is a constant.

def _token_outputs(student: Tensor, teacher: Tensor, mask: Optional[Tensor], labels: Optional[Tensor], nll: bool,
                   inplace_backward: bool):
    """(divergence, entropy, nll, state) per row; the inputs checked as the kernels read them (:func:`_outputs`)."""
    if inplace_backward:
        check_inplace_backward(student)
    div, ent, nll_out = _outputs(student, teacher, mask, labels, None, None, nll)
    return div, ent, nll_out, torch.empty(student.shape[0], STATE_COLS, device=student.device, dtype=torch.float32)


@kernel_op("token_divergence", _token_outputs)
def token_divergence(
    student: Tensor, teacher: Tensor, mask: Optional[Tensor], labels: Optional[Tensor], inv_temperature: float,
    divergence: str, beta: float, ignore_index: int, nll: bool, backend: str, inplace_backward: bool,
    out: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """(divergence, entropy, nll, state) per row, differentiable in ``student`` (``inplace_backward``: d(student)
    overwrites it); ``state`` is what the backward reads."""
    _write_rows(student, teacher, mask, labels, None, None, inv_temperature, divergence, beta, ignore_index, nll,
                backend, out[:3], out[3])


def _backward_into(grad: Tensor, g_div: Optional[Tensor], g_nll: Optional[Tensor], teacher: Tensor,
                   mask: Optional[Tensor], labels: Optional[Tensor], state: Tensor, inv_temperature: float,
                   divergence: str, beta: float, ignore_index: int, backend: str) -> None:
    """d(student) over ``grad`` (the student's values on entry): the kernel's gradient sweep from the forward's
    ``state``, with the output gradients as its per-row weights (a missing one weighs 0; the kernel writes only
    with ``grad_soft``)."""
    n = grad.shape[0]
    f32 = dict(device=grad.device, dtype=torch.float32)
    g_soft = torch.zeros(n, **f32) if g_div is None else g_div.reshape(n).float().contiguous()
    g_hard = None if g_nll is None or labels is None else g_nll.reshape(n).float().contiguous()
    unused = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(0, **f32)  # the sweep writes no outputs
    _write_rows(grad, teacher, mask, labels, g_soft, g_hard, inv_temperature, divergence, beta, ignore_index,
                False, backend, unused, state, True)


def _grad_outputs(student: Tensor):
    return torch.empty_like(student)


@kernel_op("token_divergence_backward", _grad_outputs)
def token_divergence_backward(
    grad_divergence: Optional[Tensor], grad_nll: Optional[Tensor], student: Tensor, teacher: Tensor,
    mask: Optional[Tensor], labels: Optional[Tensor], state: Tensor, inv_temperature: float, divergence: str,
    beta: float, ignore_index: int, backend: str, out: Tensor,
) -> None:
    """d(loss)/d(student) in the student's dtype, a new tensor."""
    out.copy_(student)
    _backward_into(out, grad_divergence, grad_nll, teacher, mask, labels, state, inv_temperature, divergence, beta,
                   ignore_index, backend)


def _no_outputs(student: Tensor):
    return None


@kernel_op("token_divergence_backward_", _no_outputs, mutates_args=("student",))
def token_divergence_backward_(
    grad_divergence: Optional[Tensor], grad_nll: Optional[Tensor], student: Tensor, teacher: Tensor,
    mask: Optional[Tensor], labels: Optional[Tensor], state: Tensor, inv_temperature: float, divergence: str,
    beta: float, ignore_index: int, backend: str, out: None,
) -> None:
    """In-place backward: overwrites ``student`` with d(loss)/d(student) (saves one [n, V] buffer)."""
    _backward_into(student, grad_divergence, grad_nll, teacher, mask, labels, state, inv_temperature, divergence,
                   beta, ignore_index, backend)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, labels, inv_t, divergence, beta, ignore_index, _nll, backend, inplace = inputs
    save_for_backward(ctx, student, teacher, mask, labels, output[3])
    ctx.options = (inv_t, divergence, beta, ignore_index, backend)
    ctx.inplace = inplace
    ctx.set_materialize_grads(False)


def _backward(ctx, g_div, _g_ent, g_nll, _g_state, direct: bool = False):
    """d(student); the entropy is a metric (no gradient). ``direct``: the non-in-place backward without the
    custom-op dispatch."""
    student, teacher, mask, labels, state = ctx.saved_tensors
    args = (g_div, g_nll, student, teacher, mask, labels, state, *ctx.options)
    if ctx.inplace:
        token_divergence_backward_(*args)
        grad = student
    else:
        grad = token_divergence_backward.direct(*args) if direct else token_divergence_backward(*args)
    return grad, None, None, None, None, None, None, None, None, None, None


token_divergence.register_autograd(_backward, setup_context=_setup_context)


# (the entropy: a metric; the row state)
_TokenDivergenceEager = eager_autograd(token_divergence, _setup_context, _backward, "token divergence", (1, 3))


def token_divergence_call(student: Tensor, teacher: Tensor, mask: Optional[Tensor], labels: Optional[Tensor],
                          inv_temperature: float, divergence: str, beta: float, ignore_index: int, nll: bool,
                          backend: str, inplace_backward: bool):
    """``token_divergence``: the custom op under tracing or off the C++ path, the autograd function over the same
    kernel where :func:`~fastalign.ops._launch.runs_directly` allows. Same results."""
    args = (student, teacher, mask, labels, float(inv_temperature), str(divergence), float(beta), int(ignore_index),
            bool(nll), backend, bool(inplace_backward))
    if runs_directly(backend, student, teacher, mask, labels):
        if torch.is_grad_enabled() and student.requires_grad:
            return _TokenDivergenceEager.apply(*args)
        return token_divergence.direct(*args)
    return token_divergence(*args)
