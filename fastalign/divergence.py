r"""Per-token distillation divergence between a student's and a teacher's logits
(docs/math.md#distillation-divergence): the generalized JSD, the total variation distance or the cosine distance,
with the student's entropy and its NLL of the labels, in one pass over each pair of rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _backend, _validate
from fastalign._options import check_choice
from fastalign.logprobs import _a_leaf_s_values
from fastalign.ops.divergence import DIVERGENCES, token_divergence_call

__all__ = ["TokenDivergence", "token_divergence"]


class TokenDivergence(NamedTuple):
    """Per-token outputs of :func:`token_divergence`, fp32, shaped like the logits without their last dim.

    ``divergence`` and ``nll`` (None without labels) are differentiable in the student's logits; ``entropy`` (the
    student's, at the temperature) is a metric, with no gradient.
    """

    divergence: Tensor
    entropy: Tensor
    nll: Optional[Tensor] = None


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    divergence: str = "jsd",
    beta: Optional[float] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: Optional[str] = None,
) -> TokenDivergence:
    r"""The divergence of each token's student distribution from its teacher's, with the student's entropy and
    NLL, from the two models' logits.

    With ``x = z / T`` on each side, ``p = softmax(x)``: the generalized JSD (``divergence="jsd"``)

    .. math::

        D = \begin{cases} KL(p_t \| p_s) & \beta = 0 \\ KL(p_s \| p_t) & \beta = 1 \\
            \beta\,KL(p_t \| m) + (1-\beta)\,KL(p_s \| m),\ m = (1-\beta) p_s + \beta p_t & \text{else}\end{cases}

    the total variation distance (``"tvd"``) ``D = 1/2 sum_j |p_s,j - p_t,j|``, or the cosine distance of the
    logits (``"cosine"``) ``D = 1 - z_s . z_t / (max(|z_s|, 1e-12) max(|z_t|, 1e-12))``; the student's entropy
    at ``T`` and, with ``labels``, ``NLL = -log softmax(z_s)_y`` at temperature 1 (Liger's hard loss). A token
    whose label is ``ignore_index`` gives 0 for every output and a zero gradient. One pass over each pair of
    rows; its backward writes ``g_D dD/dz_s + g_NLL (softmax(z_s) - 1[j = y])`` in one more (from each row's
    softmax states, kept by the forward), never a ``[tokens x V]`` fp32 temporary.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16 or float16, last dim contiguous; receives the gradient.
        teacher_logits: the same shape, dtype and device; a constant (no gradient).
        labels: optional integer ``student_logits.shape[:-1]``: the NLL's targets, and the tokens scored.
        divergence: ``"jsd"`` (default), ``"tvd"`` or ``"cosine"``.
        beta: the JSD's, in ``[0, 1]`` (default 0.5); 0 the forward KL, 1 the reverse KL. The other divergences
            have none: a ``beta`` with them raises ``ValueError``.
        temperature: > 0, divides both sides' logits for D and the entropy (not the NLL).
        ignore_index: the label of the tokens not scored.
        inplace_backward: backward overwrites ``student_logits`` with d(student_logits) instead of allocating a
            new tensor (as :func:`fastalign.token_logprobs`): only for logits nothing reads afterwards, not a leaf
            that requires grad nor a view of one (``ValueError``); :func:`fastalign.logprobs.overwritable` says
            where it applies. The C++ kernel reads fp32: other dtypes on it run on an fp32 copy (then the flag
            writes nothing over the logits).
        backend: ``"cpp"`` or ``"triton"`` (CUDA tensors run the Triton kernel); default from
            :func:`fastalign.use_backend`.

    Returns:
        :class:`TokenDivergence`.
    """
    _validate.floating("student_logits", student_logits, min_dim=1)
    _validate.floating("teacher_logits", teacher_logits, min_dim=1)
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits must have the dtype of student_logits ({student_logits.dtype}), got "
                        f"{teacher_logits.dtype}")
    _validate.shape("teacher_logits", teacher_logits, student_logits.shape, "student_logits.shape")
    lead = student_logits.shape[:-1]
    if labels is not None:
        _validate.integer("labels", labels)
        _validate.shape("labels", labels, lead, "student_logits.shape[:-1]")
    _validate.same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty vocabulary (last) dimension")
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence != "jsd" and beta is not None:
        raise ValueError(f"beta applies to the jsd only, not to divergence={divergence!r} (got beta={beta!r})")
    b = 0.5 if beta is None else _validate.unit_interval("beta", beta)
    inv_t = 1.0 / _validate.positive("temperature", temperature)
    _validate.index_value("ignore_index", ignore_index)
    _validate.boolean("inplace_backward", inplace_backward)
    if inplace_backward and _a_leaf_s_values(student_logits):
        raise ValueError("inplace_backward=True overwrites student_logits in backward; they are a leaf that "
                         "requires grad (or a view of one), whose values would become their own .grad: pass "
                         "logits from the model's forward, or inplace_backward=False")
    name = _backend.backend_for("divergence_rows", student_logits.device, backend)
    V = student_logits.shape[-1]
    student = student_logits.reshape(-1, V)
    teacher = teacher_logits.detach().reshape(-1, V)
    if V > 1 and student.stride(1) != 1:
        student = student.contiguous()
    if V > 1 and teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    if name == "cpp" and student.dtype != torch.float32:  # the C++ kernel reads fp32 rows
        student, teacher, inplace_backward = student.float(), teacher.float(), False
    y = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    mask = None if y is None else (y != ignore_index).float()
    div, ent, nll, _state = token_divergence_call(student, teacher, mask, y, inv_t, divergence, b, int(ignore_index),
                                          y is not None, name, inplace_backward)
    return TokenDivergence(div.view(lead), ent.detach().view(lead), None if y is None else nll.view(lead))
