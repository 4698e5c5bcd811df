"""Liger-Kernel 0.8's fused linear distillation losses (``liger_kernel.chunked_loss``),
``LigerFusedLinearJSDLoss`` and ``LigerFusedLinearCosineSimilarityLoss``, and its soft-label-only
``LigerFusedLinearJSD`` (``liger_kernel.transformers``, below), computed by
:func:`fastalign.linear_divergence_loss` from both models' hidden states and heads (never the ``[N, V]``
logits). Same constructors, ``forward`` signature and outputs; re-exported by
:mod:`fastalign.integrations.liger`::

    from fastalign.integrations.liger import LigerFusedLinearJSDLoss   # was: from liger_kernel.chunked_loss import ...

With ``n`` the count of targets other than ``ignore_index`` (at least 1), as Liger:

    soft = sum_{y_t != ignore} D_t / n
        JSD:    D_t the generalized JSD at ``temperature`` (beta 0 forward KL, 1 reverse KL)
        cosine: D_t = beta * (1 - cos(z_s,t, z_t,t)), the cosine of the two logit rows (``beta`` a weight)
    hard = sum_{y_t != ignore} -log softmax(z_s,t)_{y_t} / n     (temperature 1)
    loss = weight_hard_loss * hard + weight_soft_loss * soft

``forward`` returns ``loss``, or ``(loss, soft, hard)`` with ``return_soft_hard_loss`` (``soft`` and ``hard``
detached; ``hard`` is 0 when ``weight_hard_loss`` is 0 and it is not asked for, as Liger). Gradients flow to the
student's input, weight and bias; the teacher's get none. ``true_labels`` are needed with every option, as in
Liger (they are the mask of the soft loss too): None is a ``TypeError`` naming them. ``compiled`` and
``chunk_size`` choose how Liger runs, not what it computes: they are checked and do not change the result. Where
fastalign is stricter than Liger: a temperature must be > 0, the JSD's ``beta`` in [0, 1] (the cosine's finite),
and both heads must have the same vocabulary (Liger pads a smaller student vocabulary with zero logits) — each a
``ValueError`` naming the argument. The loss can be differentiated once per forward (its gradients are computed
in the forward and scaled in place, without a second copy of d(weight)); a second backward through a retained
graph, which Liger allows, raises a ``RuntimeError``: set ``loss_fn.single_pass = False`` (an attribute beside
Liger's options, default ``"auto"``) for that.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.divergence import token_divergence
from fastalign.integrations._dtypes import check_accum_dtype
from fastalign.integrations._liger_checks import reduced
from fastalign.integrations._live_options import LiveOptions, SinglePassAttribute
from fastalign.linear import check_head
from fastalign.linear_divergence import ARGUMENT_NAMES, check_tensors, linear_divergence_loss
from fastalign.linear_soft import linear_soft_cross_entropy
from fastalign.logprobs import overwritable

__all__ = ["LigerFusedLinearJSDLoss", "LigerFusedLinearCosineSimilarityLoss", "LigerFusedLinearJSD",
           "LigerFusedLinearKLDivLoss", "LigerFusedCETVDLoss"]


# linear_divergence_loss's argument names -> Liger's, for the error messages
_ARGUMENTS = {**ARGUMENT_NAMES, "hidden": "student_input", "weight": "student_weight", "bias": "student_bias",
              "teacher_hidden": "teacher_input", "labels": "true_labels"}


class _FusedLinearDistillation(SinglePassAttribute, LiveOptions, nn.Module):
    """Liger's fused linear distillation loss of :meth:`_divergence` (see the module doc). Its options are
    attributes, read at each call as Liger reads them (an assignment takes effect at the next call);
    ``single_pass``: :class:`~fastalign.integrations._live_options.SinglePassAttribute`."""

    OPTIONS = ("weight_hard_loss", "weight_soft_loss", "beta", "ignore_index", "temperature", "compiled",
               "chunk_size", "return_soft_hard_loss")

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options: finite loss weights, ``beta`` (:meth:`_check_beta`), ``temperature > 0``."""
        _validate.finite_number("weight_hard_loss", self.weight_hard_loss)
        _validate.finite_number("weight_soft_loss", self.weight_soft_loss)
        self._check_beta()
        _validate.index_value("ignore_index", self.ignore_index)
        _validate.positive("temperature", self.temperature)
        _validate.boolean("compiled", self.compiled)
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        _validate.boolean("return_soft_hard_loss", self.return_soft_hard_loss)

    def _check_beta(self) -> None:
        """The JSD's ``beta``: in [0, 1]."""
        _validate.unit_interval("beta", self.beta)

    def _divergence(self) -> tuple[dict, float]:
        """(linear_divergence_loss's divergence options, the factor of D in the soft loss)."""
        return dict(divergence="jsd", beta=self.beta), 1.0

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                true_labels: Tensor, student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None):
        hard = self.weight_hard_loss != 0 or self.return_soft_hard_loss
        check_tensors(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias,
                      labels=true_labels, names=_ARGUMENTS)
        # Liger reads the labels in every mode (the mask of the soft loss too): None is a TypeError there as here
        _validate.integer(_ARGUMENTS["labels"], true_labels)
        divergence, factor = self._divergence()
        loss, metrics = linear_divergence_loss(
            student_input, student_weight, teacher_input, teacher_weight, **divergence,
            temperature=self.temperature, bias=student_bias, teacher_bias=teacher_bias, labels=true_labels,
            ignore_index=self.ignore_index, soft_weight=self.weight_soft_loss * factor,
            hard_weight=self.weight_hard_loss if hard else 0.0, single_pass=self.single_pass)
        if not self.return_soft_hard_loss:
            return loss
        n = metrics["num_tokens"].clamp(min=1)
        return loss, factor * metrics["divergence_sum"] / n, metrics["nll_sum"] / n


class LigerFusedLinearJSDLoss(_FusedLinearDistillation):
    """Liger's fused linear JSD distillation loss: the generalized JSD at ``beta`` (0 forward KL, 1 reverse KL)
    of the two heads' distributions at ``temperature`` (see the module doc)."""


class LigerFusedLinearCosineSimilarityLoss(_FusedLinearDistillation):
    """Liger's fused linear cosine-similarity distillation loss: ``beta * (1 - cos(z_s, z_t))`` per token, the
    cosine of the two heads' logit rows (``temperature`` scales both alike and changes only Liger's rounding;
    see the module doc)."""

    def _check_beta(self) -> None:
        """The cosine's ``beta`` weighs the distance: any finite number."""
        _validate.finite_number("beta", self.beta)

    def _divergence(self) -> tuple[dict, float]:
        return dict(divergence="cosine"), float(self.beta)


#: LigerFusedLinearJSD's argument names (its forward has no bias and calls the labels shift_labels)
_JSD_ARGUMENTS = {**_ARGUMENTS, "labels": "shift_labels"}


class LigerFusedLinearJSD(SinglePassAttribute, LiveOptions, nn.Module):
    """Liger's ``liger_kernel.transformers.LigerFusedLinearJSD``: the generalized JSD alone (no hard loss) of
    two heads from their hidden states, ``forward(student_input [BT, H], student_weight [V, H], teacher_input
    [BT, H'], teacher_weight [V, H'], shift_labels=None)`` -> ``sum_{y != ignore_index} D_t / n``, ``D_t`` the JSD
    at ``jsd_beta`` (0 forward KL, 1 reverse KL) of the distributions at ``temperature``, ``n`` the count of rows
    scored (every row without ``shift_labels``; at least 1). The loss is fp32. Gradients flow to the student's
    input and weight. ``accum_dtype`` (Liger's gradient-accumulator dtype) is checked (None or a floating dtype)
    and does not change the result: fastalign accumulates in fp32. The options are attributes, read at each call;
    ``single_pass`` as the chunked losses' (module doc)."""

    OPTIONS = ("jsd_beta", "ignore_index", "temperature", "accum_dtype")

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        _validate.unit_interval("jsd_beta", self.jsd_beta)
        _validate.index_value("ignore_index", self.ignore_index)
        _validate.positive("temperature", self.temperature)
        check_accum_dtype(self.accum_dtype)

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                shift_labels: Optional[Tensor] = None):
        check_tensors(student_input, student_weight, None, teacher_input, teacher_weight, None, labels=shift_labels,
                      names=_JSD_ARGUMENTS)
        return linear_divergence_loss(student_input, student_weight, teacher_input, teacher_weight, beta=self.jsd_beta,
                                      temperature=self.temperature, labels=shift_labels,
                                      ignore_index=self.ignore_index, single_pass=self.single_pass)[0]


#: LigerFusedLinearKLDivLoss's reductions (of the summed row losses: :func:`~._liger_checks.reduced`)
_KL_REDUCTIONS = ("batchmean", "mean", "sum")
#: target elements taken at a time for its constant term (32 MiB in fp32)
_TARGET_BLOCK_ELEMENTS = 1 << 23


class LigerFusedLinearKLDivLoss(SinglePassAttribute, LiveOptions, nn.Module):
    r"""Liger's ``liger_kernel.transformers.LigerFusedLinearKLDivLoss``: the KL divergence of the student's head from
    a target distribution given as probabilities (cached soft labels), from the hidden states, never the
    ``[BT, V]`` logits: ``forward(student_input [BT, H], student_weight [V, H], target [BT, V], shift_labels=None)``.

    With ``z = student_input @ student_weight.T`` and ``q`` the target row, each row whose label is not
    ``ignore_index`` (every row without ``shift_labels``) adds

    .. math::

        KL(q \| p) = \sum_j q_j \log\max(q_j, \varepsilon) + CE(q, p),
        \qquad CE(q, p) = -\sum_j q_j \log \mathrm{softmax}(z / T)_j

    (``0 log 0 = 0`` through the clamp, as Liger; ``q`` need not sum to 1), and the sum is divided by the row count
    ``n`` (``reduction="batchmean"``), by ``n V`` (``"mean"``) or not at all (``"sum"``); no row scored gives 0. The
    gradient of a row's logits is ``((sum_j q_j) p - q) / T``, formed whole in fp32 before one rounding, as Liger's
    kernel forms it (:func:`fastalign.linear_soft_cross_entropy` gives ``CE``; the first term is a constant of the
    target, summed a block of rows at a time: no ``[BT, V]`` copy of the target). The loss is fp32 and gradients
    reach ``student_input`` and ``student_weight`` (the target, of any float dtype, gets none, as in Liger). With
    ``shift_labels`` the ignored rows are not read (their target and input may hold a NaN), as Liger's kernel skips
    them. ``accum_dtype`` is checked (None or a floating dtype) and does not change the result.
    Options are attributes, read at each call; ``reduction="none"`` and a ``temperature`` of 0 raise a
    ``ValueError`` (Liger supports neither), as does a negative one (Liger's kernel runs it; fastalign's
    temperatures are positive). The loss can be differentiated once per forward (``single_pass``:
    :class:`~fastalign.integrations._live_options.SinglePassAttribute`)."""

    OPTIONS = ("reduction", "ignore_index", "temperature", "eps", "accum_dtype")

    def __init__(self, reduction: Optional[str] = "batchmean", ignore_index: int = -100, temperature: float = 1.0,
                 eps: float = 1e-10, accum_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        if self.reduction not in _KL_REDUCTIONS:
            raise ValueError(f"reduction must be one of {tuple(_KL_REDUCTIONS)} (Liger supports no 'none'), got "
                             f"{self.reduction!r}")
        _validate.index_value("ignore_index", self.ignore_index)
        _validate.positive("temperature", self.temperature)
        _validate.positive("eps", self.eps)
        check_accum_dtype(self.accum_dtype)

    def forward(self, student_input: Tensor, student_weight: Tensor, target: Tensor,
                shift_labels: Optional[Tensor] = None) -> Tensor:
        check_head(student_input, student_weight, names=("student_input", "student_weight", "bias"))
        _validate.floating("student_input", student_input, dim=2)
        N, V = student_input.shape[0], student_weight.shape[0]
        _validate.any_float("target", target)
        _validate.shape("target", target, (N, V), "[student_input rows, student_weight rows]")
        if shift_labels is not None:
            _validate.integer("shift_labels", shift_labels)
            _validate.shape("shift_labels", shift_labels, (N,), "[student_input rows]")
        _validate.same_device(student_input=student_input, student_weight=student_weight, target=target,
                              shift_labels=shift_labels)
        scored = torch.ones(N, dtype=torch.bool, device=target.device)
        if shift_labels is not None:
            scored = shift_labels != self.ignore_index
        ce = linear_soft_cross_entropy(student_input, student_weight, target, temperature=self.temperature,
                                       row_weights=scored, single_pass=self.single_pass)
        return reduced(ce + _target_term(target, scored, self.eps), self.reduction, scored.sum().float(), V)


def _target_term(target: Tensor, scored: Tensor, eps: float) -> Tensor:
    """``sum_r sum_j q_rj log max(q_rj, eps)`` over the scored rows (0 log 0 = 0; an ignored row's NaN is not
    selected), in fp32 or the target's float64, a block of rows of ``_TARGET_BLOCK_ELEMENTS`` at a time: never a
    ``[BT, V]`` copy of the target."""
    N, V = target.shape
    rows = max(1, _TARGET_BLOCK_ELEMENTS // max(V, 1))
    total = target.new_zeros((), dtype=torch.promote_types(target.dtype, torch.float32))
    with torch.no_grad():
        for start in range(0, N, rows):
            q = target[start:start + rows].to(total.dtype)
            term = torch.xlogy(q, q.clamp(min=eps)).sum(-1)
            total += torch.where(scored[start:start + rows], term, 0.0).sum()
    return total.float()


class LigerFusedCETVDLoss(LiveOptions, nn.Module):
    r"""Liger's ``liger_kernel.transformers.LigerFusedCETVDLoss``: per token the student's cross-entropy of the hard
    labels and the total variation distance of its distribution from a teacher's, from both models' logits,
    unreduced: ``forward(student_logits [BT, V], teacher_logits [BT, V], target [BT]) -> (ce, tvd)``, each fp32
    ``[BT]``, with ``p = softmax(student_logits)``, ``q = softmax(teacher_logits)``

    .. math::

        ce = -\log p_y, \qquad tvd = \frac{1}{2} \sum_j |p_j - q_j|

    and 0 for both where ``target`` is ``ignore_index``; the caller masks, weighs and normalises them. Computed by
    :func:`fastalign.token_divergence` (``divergence="tvd"``) in one pass over each pair of rows. The gradient
    reaches ``student_logits`` (``g_ce (p - 1[j = y]) + g_tvd p (s - sum_k p_k s_k) / 2``, ``s = sign(p - q)``, 0
    at a tie, as Liger) and is written over them where they are an intermediate of the graph, such as a model's
    logits (:func:`fastalign.logprobs.overwritable`; Liger allocates a new ``[BT, V]`` tensor); the teacher's
    logits get none. Where fastalign differs from Liger: a target outside ``[0, V)`` other than ``ignore_index``
    gives a NaN ``ce`` (Liger reads past the row), and the teacher's logits must have the student's dtype and
    device (a ``TypeError`` / ``ValueError`` naming them). ``ignore_index`` is an attribute, read at each call."""

    OPTIONS = ("ignore_index",)

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        _validate.index_value("ignore_index", self.ignore_index)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        _validate.floating("student_logits", student_logits, dim=2)
        _validate.integer("target", target)
        _validate.shape("target", target, student_logits.shape[:1], "[student_logits rows]")
        out = token_divergence(student_logits, teacher_logits, target, divergence="tvd",
                               ignore_index=self.ignore_index, inplace_backward=overwritable(student_logits))
        return out.nll, out.divergence
