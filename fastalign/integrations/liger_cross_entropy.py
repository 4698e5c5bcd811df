"""Liger-Kernel 0.8's ``LigerFusedLinearCrossEntropyLoss`` (``liger_kernel.transformers``), computed by
:func:`fastalign.linear_logprobs` from the hidden states and the lm_head weight (never the ``[N, V]`` logits).
Same constructor, ``forward(lin_weight, _input, target, bias=None)`` and outputs; a user swaps the import::

    from fastalign.integrations.liger import LigerFusedLinearCrossEntropyLoss
    # was: from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

With ``z = h W^T + b`` (``softcap``: ``z = cap tanh(z / cap)``), ``lp_y = log softmax(z)_y``, ``lse =
logsumexp(z)``, ``c`` the class weights ``ce_weight`` (1 without), ``eps = label_smoothing / V``, ``s =
lse_square_scale``, per target other than ``ignore_index`` (an ignored target gives 0 and no gradient)::

    ce   = c_y (-lp_y)                                          label_smoothing = 0
    ce   = (1 - label_smoothing) c_y (-lp_y) - eps sum_j c_j log p_j    otherwise
    z    = s lse^2
    loss = (ce / D + z / n) * sg(p_y)      (sg(p_y): the detached label probability, with use_token_scaling)

``reduction="mean"``: ``n`` the count of targets not ignored, ``D = sum c_y`` over them (``n`` without
``ce_weight``); both 1 when every target is ignored (the loss is then 0), as Liger, whose z-loss is not
weighted by ``c``. ``"sum"``: ``D = n = 1``, summed; ``"none"``: ``D = n = 1``, one loss per target (0 for the
ignored ones). Nothing here builds ``[N, V]``: :func:`fastalign.linear_logprobs` gives ``lp_y`` (and the argmax)
with gradients to the hidden states, the weight and the bias, and

    lse = z_y - lp_y                  z_y = h · W_y + b_y (softcapped): a row gather, with autograd
    sum_j c_j log p_j = sum_j c_j z_j - C lse,   sum_j c_j z_j = h · (sum_j c_j W_j) + sum_j c_j b_j,   C = sum_j c

(the last one linear in ``h`` only without ``softcap``; with it, and no ``ce_weight``, ``sum_j z_j = V mean_j z_j``
of the softcapped logits is a statistic of the log-probs' own pass, ``mean_logit`` of
:func:`fastalign.linear_logprobs`, its gradient in the same backward; ``label_smoothing > 0`` with both ``softcap``
and ``ce_weight`` raises ``ValueError``).

``forward`` returns the loss, or, with ``return_z_loss``, ``return_token_accuracy`` or
``return_predicted_tokens``, a :class:`CrossEntropyOutput` (Liger's fields, in its order: ``loss``; ``z_loss``,
the ``z / n`` terms summed as the loss is, in the dtype of ``_input``; ``token_accuracy``, the share of targets
not ignored whose argmax is the target, per target with ``"none"``, NaN when every target is ignored;
``predicted_tokens``, the argmax of each row, -1 where ignored), the metrics detached. It is a named tuple, so
Liger's model patches read it as they read Liger's own (``unpack_cross_entropy_result``: by position). The loss
is fp32; the gradients have the inputs' dtypes. A float64 ``_input`` and ``lin_weight`` (and ``bias``) are
computed in fp32, the z-loss and the gradients float64, as Liger's. ``accum_dtype`` chooses the dtype of Liger's
gradient accumulators: fastalign accumulates in fp32 (Liger's ``accum_dtype=torch.float32``), so it is checked
(None or a floating dtype) and does not change the result.
``ce_weight`` takes no gradient, as in Liger. The option table: docs/integrations.md#liger-kernel. Nothing here
imports Liger-Kernel.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations._dtypes import check_accum_dtype, float64_as_float32, refuse_out_of_range
from fastalign.integrations._label_logit import label_logits
from fastalign.integrations._live_options import LiveOptions
from fastalign.linear import check_head, linear_logprobs

__all__ = ["LigerFusedLinearCrossEntropyLoss", "CrossEntropyOutput"]

_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMENTS = 1 << 23  # rows of the head widened to fp32 at a time in the class-weighted sum (32 MiB)


class CrossEntropyOutput(NamedTuple):
    """Liger's ``CrossEntropyOutput``: the loss and the metrics asked for (None otherwise). A tuple in Liger's field
    order, which Liger's ``unpack_cross_entropy_result`` reads by position (it knows no other class)."""

    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    predicted_tokens: Optional[Tensor] = None


def _class_sums(weight: Tensor, bias: Optional[Tensor], classes: Optional[Tensor]):
    """``(sum_j c_j W_j [H], sum_j c_j b_j, sum_j c_j)`` in fp32, with autograd to the weight and the bias (``c``
    1 for ``classes=None``). The weighted sum widens the head to fp32 a block of rows at a time."""
    if classes is None:
        w = weight.sum(0, dtype=torch.float32)
        b = None if bias is None else bias.sum(dtype=torch.float32)
        return w, b, float(weight.shape[0])
    c = classes.detach().to(device=weight.device, dtype=torch.float32)
    rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
    w = sum(ck @ wk.float() for ck, wk in zip(c.split(rows), weight.split(rows)))
    b = None if bias is None else bias.float() @ c
    return w, b, c.sum()


class LigerFusedLinearCrossEntropyLoss(LiveOptions, nn.Module):
    """Liger's fused linear cross-entropy loss (see the module doc). Its options are attributes, read at each call
    as Liger reads them, checked at construction and again when one is assigned (an invalid value raises there,
    naming it, and leaves the module as it was)."""

    OPTIONS = ("ce_weight", "ignore_index", "lse_square_scale", "label_smoothing", "reduction", "softcap",
               "return_z_loss", "accum_dtype", "use_token_scaling", "return_token_accuracy",
               "return_predicted_tokens")

    def __init__(self, ce_weight: Optional[torch.FloatTensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False,
                 accum_dtype: Optional[torch.dtype] = None, use_token_scaling: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options together (a ``ValueError`` / ``TypeError`` naming the bad one)."""
        if self.ce_weight is not None:
            _validate.any_float("ce_weight", self.ce_weight, dim=1)
        _validate.index_value("ignore_index", self.ignore_index)
        _validate.finite_number("lse_square_scale", self.lse_square_scale)
        if not 0.0 <= _validate.number("label_smoothing", self.label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {self.label_smoothing}")
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        if self.softcap is not None:
            _validate.positive("softcap", self.softcap)
            if self.label_smoothing > 0 and self.ce_weight is not None:
                raise ValueError("label_smoothing > 0 with softcap and ce_weight is not supported: the smoothing "
                                 "term weighs cap * tanh(z / cap) by ce_weight over the vocabulary, which fastalign "
                                 "forms unweighted only (drop ce_weight or softcap)")
        for name in ("return_z_loss", "use_token_scaling", "return_token_accuracy", "return_predicted_tokens"):
            _validate.boolean(name, getattr(self, name))
        check_accum_dtype(self.accum_dtype)

    def forward(self, lin_weight, _input, target, bias=None):
        out_dtype = getattr(_input, "dtype", None)  # the z-loss's (Liger keeps it in _input's dtype)
        if out_dtype == torch.float64 == getattr(lin_weight, "dtype", None):  # in fp32 (Liger's loss is fp32)
            _input, lin_weight, bias = map(float64_as_float32, (_input, lin_weight, bias))
        check_head(_input, lin_weight, bias, names=("_input", "lin_weight", "bias"))
        if _input.dim() != 2:
            raise ValueError(f"_input must be (BT, H), got shape {tuple(_input.shape)}")
        _validate.integer("target", target)
        _validate.shape("target", target, tuple(_input.shape[:1]), "_input.shape[0]")
        V = lin_weight.shape[0]
        c = self.ce_weight
        if c is not None:
            _validate.shape("ce_weight", c, (V,), "lin_weight.shape[0]")
        _validate.same_device(_input=_input, lin_weight=lin_weight, target=target, bias=bias, ce_weight=c)
        smoothing, z_scale, cap = float(self.label_smoothing), float(self.lse_square_scale), self.softcap
        want_argmax = self.return_token_accuracy or self.return_predicted_tokens

        capped_smoothing = smoothing > 0 and cap is not None  # sum_j z_j from the same pass: V mean_logit
        stats = linear_logprobs(_input, lin_weight, target, bias=bias, softcap=cap, ignore_index=self.ignore_index,
                                argmax=want_argmax, mean_logit=capped_smoothing)
        lp = stats.logprobs
        keep = target != self.ignore_index
        n = keep.sum()
        label = torch.where(keep, target, 0).clamp(0, V - 1).to(torch.int64)  # a label out of range: lp is NaN
        c_y = None if c is None else c.detach().float()[label]
        ce = -lp if c_y is None else -c_y * lp
        lse = None
        if smoothing > 0 or z_scale != 0.0 or self.return_z_loss:
            lse = label_logits(_input, lin_weight, label, bias=bias, softcap=cap) - lp
        if smoothing > 0:
            if capped_smoothing:  # sum_j z_j of the softcapped logits: V times their mean
                zc, c_sum = V * stats.mean_logit, V
            else:  # sum_j c_j z_j per row, linear in h
                w_sum, b_sum, c_sum = _class_sums(lin_weight, bias, c)
                zc = _input.float() @ w_sum
                zc = zc if b_sum is None else zc + b_sum
            ce = (1.0 - smoothing) * ce - (smoothing / V) * (zc - c_sum * lse)
        z = z_scale * lse * lse if lse is not None else None
        one = torch.ones((), dtype=torch.float32, device=lp.device)
        if self.reduction == "mean":
            count = torch.where(n > 0, n.float(), one)  # every target ignored: a loss of 0, as Liger
            denom = count if c_y is None else torch.where(n > 0, torch.where(keep, c_y, 0.0).sum(), one)
        else:
            count = denom = one
        loss = ce / denom
        if z is not None:
            z = z / count
            if z_scale != 0.0:
                loss = loss + z
        if self.use_token_scaling:
            p_y = lp.detach().exp()
            loss = loss * p_y
            z = None if z is None else z * p_y
        zero = torch.zeros((), dtype=torch.float32, device=lp.device)
        loss = refuse_out_of_range(torch.where(keep, loss, zero), target, V, self.ignore_index, "target")
        if self.reduction != "none":
            loss = loss.sum()
        if not (self.return_z_loss or want_argmax):
            return loss
        z_loss = accuracy = predicted = None
        if self.return_z_loss:
            z = torch.where(keep, z.detach(), zero).to(out_dtype)
            z_loss = z if self.reduction == "none" else z.sum()
        if self.return_token_accuracy:
            hit = (keep & (stats.argmax == target)).float()
            accuracy = hit if self.reduction == "none" else hit.sum() / n
        if self.return_predicted_tokens:
            predicted = torch.where(keep, stats.argmax, -1)
        return CrossEntropyOutput(loss, z_loss, accuracy, predicted)
