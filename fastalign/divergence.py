r"""Per-token divergences. :func:`token_divergence`: between a student's and a teacher's logits
(docs/math.md#distillation-divergence), the generalized JSD, the total variation distance or the cosine distance,
with the student's entropy and its NLL of the labels, in one pass over each pair of rows.
:func:`elementwise_divergence`: between given distributions (log-probabilities or probabilities, no softmax),
differentiated element by element (docs/math.md#elementwise-divergence).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _backend, _validate
from fastalign._options import check_choice
from fastalign.logprobs import _a_leaf_s_values
from fastalign.ops.divergence import DIVERGENCES, token_divergence_call
from fastalign.ops.elementwise_divergence import elementwise_divergence_call, mode_of

__all__ = ["TokenDivergence", "token_divergence", "elementwise_divergence"]

#: the divergences of :func:`elementwise_divergence`
ELEMENTWISE_DIVERGENCES = ("jsd", "kl", "tvd")


def check_pair(first: tuple[str, Tensor], second: tuple[str, Tensor], labels: Optional[Tensor],
               labels_name: str = "labels") -> tuple:
    """Two ``[..., V]`` tensors of one float dtype, shape and device and optional integer labels of their leading
    shape, each error naming its argument (``(name, tensor)`` pairs, ``labels_name``); returns the leading shape."""
    (a, x), (b, y), c = first, second, labels_name
    _validate.floating(a, x, min_dim=1)
    _validate.floating(b, y, min_dim=1)
    if y.dtype != x.dtype:
        raise TypeError(f"{b} must have the dtype of {a} ({x.dtype}), got {y.dtype}")
    _validate.shape(b, y, x.shape, f"{a}.shape")
    _validate.nonempty(a, x, -1, "vocabulary (last)")
    if labels is not None:
        _validate.integer(c, labels)
        _validate.shape(c, labels, x.shape[:-1], f"{a}.shape[:-1]")
    _validate.same_device(**{a: x, b: y, c: labels})
    return x.shape[:-1]


def _rows(t: Tensor) -> Tensor:
    """``[..., V]`` as ``[n, V]`` rows with contiguous elements (the kernels' layout; a copy only where they are
    not)."""
    V = t.shape[-1]
    rows = t.reshape(-1, V)
    return rows.contiguous() if V > 1 and rows.stride(1) != 1 else rows


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
    lead = check_pair(("student_logits", student_logits), ("teacher_logits", teacher_logits), labels)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty vocabulary (last) dimension")
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence != "jsd" and beta is not None:
        raise ValueError(f"beta applies to the jsd only, not to divergence={divergence!r} (got beta={beta!r})")
    b = 0.5 if beta is None else _validate.unit_interval("beta", beta)
    inv_t = _validate.inverse_temperature(temperature)
    _validate.index_value("ignore_index", ignore_index)
    _validate.boolean("inplace_backward", inplace_backward)
    if inplace_backward and _a_leaf_s_values(student_logits):
        raise ValueError("inplace_backward=True overwrites student_logits in backward; they are a leaf that "
                         "requires grad (or a view of one), whose values would become their own .grad: pass "
                         "logits from the model's forward, or inplace_backward=False")
    name = _backend.backend_for("divergence_rows", student_logits.device, backend)
    student, teacher = _rows(student_logits), _rows(teacher_logits.detach())
    if name == "cpp" and student.dtype != torch.float32:  # the C++ kernel reads fp32 rows
        student, teacher, inplace_backward = student.float(), teacher.float(), False
    y = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    mask = None if y is None else (y != ignore_index).float()
    div, ent, nll, _state = token_divergence_call(student, teacher, mask, y, inv_t, divergence, b, int(ignore_index),
                                          y is not None, name, inplace_backward)
    return TokenDivergence(div.view(lead), ent.detach().view(lead), None if y is None else nll.view(lead))


def elementwise_divergence(
    input: Tensor,
    target: Tensor,
    labels: Optional[Tensor] = None,
    *,
    divergence: str = "jsd",
    beta: Optional[float] = None,
    log_target: Optional[bool] = None,
    eps: Optional[float] = None,
    ignore_index: int = -100,
    elementwise: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    r"""The divergence of each token's ``input`` distribution from its ``target``, given as log-probabilities or
    probabilities (no softmax), differentiated element by element.

    Per element, with ``x = input``, ``y = target`` (``p = e^y``, ``q = e^x`` for the log-probabilities):

    - ``"jsd"`` (x, y log-probabilities; Liger's ``LigerJSD``): at ``beta = 0`` the forward KL ``p (y - x)``,
      at 1 the reverse KL ``q (x - y)``, else ``beta p (y - lm) + (1 - beta) q (x - lm)`` with
      ``lm = log(beta p + (1 - beta) q)``; a zero probability adds 0 (also where its log is ``-inf``).
    - ``"kl"`` (x log-probabilities; torch's ``kl_div`` terms, Liger's ``LigerKLDIVLoss``): ``y (log max(y, eps)
      - x)`` for a probability target, ``e^y (y - x)`` with ``log_target``.
    - ``"tvd"`` (x, y probabilities; Liger's ``LigerTVDLoss``): ``|x - y| / 2``.

    Returns each token's sum over the last dim (fp32, ``input.shape[:-1]``), or with ``elementwise`` every term
    (fp32, ``input``'s shape). Differentiable in ``input`` alone, element by element: the gradient of a term is its
    partial derivative in ``x_j`` (``-p``, ``q (x - y) + q``, ``(1 - beta) q (x - lm)``, ``-y``, ``-e^y``,
    ``sign(x - y) / 2``), not through a softmax (after a ``log_softmax``, autograd's backward of it gives the
    logits' gradient). The target is a constant. A token whose label is ``ignore_index`` gives 0 and a zero
    gradient; a NaN element makes its term, its token's sum and its gradient NaN. One pass over the rows forward,
    one backward (the KL's reads the target alone), never an fp32 ``[tokens x V]`` temporary (except the
    ``elementwise`` output itself).

    Args:
        input: ``[..., V]`` float32, bfloat16 or float16 (``x``); receives the gradient.
        target: the same shape, dtype and device (``y``).
        labels: optional integer ``input.shape[:-1]``: the tokens whose label is ``ignore_index`` are not scored.
        divergence: ``"jsd"`` (default), ``"kl"`` or ``"tvd"``.
        beta: the JSD's, in ``[0, 1]`` (default 0.5).
        log_target: the KL's: ``target`` holds log-probabilities (default False).
        eps: the KL's floor of a probability target under its log, > 0 (default 1e-10).
        ignore_index: the label of the tokens not scored.
        elementwise: return every term rather than each token's sum.
        backend: ``"cpp"`` or ``"triton"`` (CUDA tensors run the Triton kernel); default from
            :func:`fastalign.use_backend`.

    An option of another divergence (``beta`` with the KL, ``eps`` with the TVD, ...) raises ``ValueError``.
    """
    lead = check_pair(("input", input), ("target", target), labels)
    check_choice("divergence", divergence, ELEMENTWISE_DIVERGENCES)
    for name, value, owner in (("beta", beta, "jsd"), ("log_target", log_target, "kl"), ("eps", eps, "kl")):
        if value is not None and divergence != owner:
            raise ValueError(f"{name} applies to divergence={owner!r} only, not to divergence={divergence!r} "
                             f"(got {name}={value!r})")
    b = 0.5 if beta is None else _validate.unit_interval("beta", beta)
    floor = 1e-10 if eps is None else _validate.positive("eps", eps)
    log_t = False if log_target is None else _validate.boolean("log_target", log_target)
    _validate.index_value("ignore_index", ignore_index)
    _validate.boolean("elementwise", elementwise)
    name = _backend.backend_for("elementwise_divergence", input.device, backend)
    x, y = _rows(input), _rows(target.detach())
    mask = None if labels is None else (labels.reshape(-1) != ignore_index).float()
    out = elementwise_divergence_call(x, y, mask, mode_of(divergence, b, log_t), b, floor, elementwise, name)
    return out.view(input.shape if elementwise else lead)
