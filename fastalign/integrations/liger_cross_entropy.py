"""Liger-Kernel 0.8's cross-entropy modules (``liger_kernel.transformers``): ``LigerFusedLinearCrossEntropyLoss``,
computed by :func:`fastalign.linear_logprobs` from the hidden states and the lm_head weight (never the ``[N, V]``
logits), and ``LigerCrossEntropyLoss`` on materialised logits, computed by :func:`fastalign.token_logprobs`. Same
constructors, ``forward(lin_weight, _input, target, bias=None)`` / ``forward(_input, target)`` and outputs; a user
swaps the import::

    from fastalign.integrations.liger import LigerFusedLinearCrossEntropyLoss, LigerCrossEntropyLoss
    # was: from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerCrossEntropyLoss

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

(``sum_j c_j z_j`` is ``V`` times :func:`fastalign.linear_mean_logits` with ``class_weights``: linear in ``h``
without ``softcap``; with it, a vocabulary pass of its own over the scored rows, forward and backward, except
without ``ce_weight``, where ``sum_j z_j = V mean_j z_j`` of the softcapped logits is a statistic of the log-probs'
own pass, ``mean_logit`` of :func:`fastalign.linear_logprobs`, its gradient in the same backward).

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
``ce_weight`` takes no gradient, as in Liger. The option table: docs/integrations.md#liger-kernel.

``LigerCrossEntropyLoss(weight=None, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
return_z_loss, return_token_accuracy, return_predicted_tokens)`` computes the same loss from logits ``x [BT, V]``
(``weight``: the class weights; no ``use_token_scaling``, ``accum_dtype``, as Liger's module): ``lp_y`` and the
argmax from one pass of :func:`fastalign.token_logprobs` over each row (in fp32 whatever the logits' dtype),
``z_y`` a gather, ``sum_j c_j z_j`` one more read of the logits. With ``softcap``, ``z = cap tanh(x / cap)`` is
formed a block of rows at a time in fp32 (as ``cap (2 sigmoid(2 x / cap) - 1)``), with ``lp_y``, ``z_y``, the
sums and the argmax, and recomputed in the backward (:class:`_LogitRows`), so no ``[BT, V]`` tensor is built
beside the logits; every option combines, the class-weighted smoothing of softcapped logits included. As
Liger's, the loss and the z-loss come in the logits' dtype (each summed in fp32, then cast once), the accuracy in
fp32; float64 logits are computed in fp32. With ``label_smoothing`` or a z-loss, ``z_y`` and ``sum_j c_j z_j`` are
formed and differentiated in the same blocks of rows (:class:`_LogitRows`). As Liger's kernel, its backward writes
``d(logits)`` over ``_input`` when ``_input`` is an intermediate of the graph, such as a model's logits, so that no
``[BT, V]`` gradient is allocated: read ``_input`` before the backward; a second backward through a retained graph
raises (torch's check of tensors modified in place). A leaf ``_input`` that requires grad (or a view of one) is
left as it is: its gradient is a new tensor. Nothing here imports Liger-Kernel.
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
from fastalign.linear_mean import linear_mean_logits
from fastalign.logprobs import overwritable, token_logprobs

__all__ = ["LigerFusedLinearCrossEntropyLoss", "LigerCrossEntropyLoss", "CrossEntropyOutput"]

_REDUCTIONS = ("mean", "sum", "none")
_BLOCK_ELEMENTS = 1 << 21  # logits of a block of rows on the CPU (8 MiB of fp32), 32 times more elsewhere


class CrossEntropyOutput(NamedTuple):
    """Liger's ``CrossEntropyOutput``: the loss and the metrics asked for (None otherwise). A tuple in Liger's field
    order, which Liger's ``unpack_cross_entropy_result`` reads by position (it knows no other class)."""

    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    predicted_tokens: Optional[Tensor] = None


class _CrossEntropyOptions(LiveOptions, nn.Module):
    """The options of Liger's two cross-entropy modules, attributes read at each call as Liger reads them, checked
    at construction and again when one is assigned (an invalid value raises there, naming it, and leaves the module
    as it was). ``CLASS_WEIGHTS`` names the class-weight option."""

    CLASS_WEIGHTS = "ce_weight"
    _SWITCHES = ("return_z_loss", "return_token_accuracy", "return_predicted_tokens")

    def class_weights(self) -> Optional[Tensor]:
        return getattr(self, self.CLASS_WEIGHTS)

    @property
    def wants_argmax(self) -> bool:
        """Whether a metric asked for reads the argmax."""
        return self.return_token_accuracy or self.return_predicted_tokens

    def _configure(self) -> None:
        """Check the options together (a ``ValueError`` / ``TypeError`` naming the bad one)."""
        if self.class_weights() is not None:
            _validate.any_float(self.CLASS_WEIGHTS, self.class_weights(), dim=1)
        _validate.index_value("ignore_index", self.ignore_index)
        _validate.finite_number("lse_square_scale", self.lse_square_scale)
        if not 0.0 <= _validate.number("label_smoothing", self.label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {self.label_smoothing}")
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        if self.softcap is not None:
            _validate.positive("softcap", self.softcap)
        for name in self._SWITCHES:
            _validate.boolean(name, getattr(self, name))

    def _checked_class_weights(self, target: Tensor, rows: int, V: int, vocab_of: str, **tensors) -> Optional[Tensor]:
        """The class weights (``[V]``, ``V`` being ``vocab_of``), once ``target`` is checked (integer ``[rows]``)
        and all of them share the device of ``tensors``."""
        _validate.integer("target", target)
        _validate.shape("target", target, (rows,), "_input.shape[0]")
        c = self.class_weights()
        if c is not None:
            _validate.shape(self.CLASS_WEIGHTS, c, (V,), vocab_of)
        _validate.same_device(**tensors, target=target, **{self.CLASS_WEIGHTS: c})
        return c


class LigerFusedLinearCrossEntropyLoss(_CrossEntropyOptions):
    """Liger's fused linear cross-entropy loss (see the module doc)."""

    OPTIONS = ("ce_weight", "ignore_index", "lse_square_scale", "label_smoothing", "reduction", "softcap",
               "return_z_loss", "accum_dtype", "use_token_scaling", "return_token_accuracy",
               "return_predicted_tokens")
    _SWITCHES = _CrossEntropyOptions._SWITCHES + ("use_token_scaling",)

    def __init__(self, ce_weight: Optional[Tensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False,
                 accum_dtype: Optional[torch.dtype] = None, use_token_scaling: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        super()._configure()
        check_accum_dtype(self.accum_dtype)

    def forward(self, lin_weight, _input, target, bias=None):
        out_dtype = getattr(_input, "dtype", None)  # the z-loss's (Liger keeps it in _input's dtype)
        if out_dtype == torch.float64 == getattr(lin_weight, "dtype", None):  # in fp32 (Liger's loss is fp32)
            _input, lin_weight, bias = map(float64_as_float32, (_input, lin_weight, bias))
        check_head(_input, lin_weight, bias, names=("_input", "lin_weight", "bias"))
        if _input.dim() != 2:
            raise ValueError(f"_input must be (BT, H), got shape {tuple(_input.shape)}")
        V = lin_weight.shape[0]
        c = self._checked_class_weights(target, _input.shape[0], V, "lin_weight.shape[0]", _input=_input,
                                        lin_weight=lin_weight, bias=bias)
        cap = self.softcap
        capped_smoothing = self.label_smoothing > 0 and cap is not None
        stats = linear_logprobs(_input, lin_weight, target, bias=bias, softcap=cap, ignore_index=self.ignore_index,
                                argmax=self.wants_argmax, mean_logit=capped_smoothing and c is None)
        label = _label_in_range(target, self.ignore_index, V)

        def class_sums():  # sum_j c_j z_j per row, and C
            if capped_smoothing and c is None:  # sum_j z_j of the softcapped logits: V times their mean, same pass
                return V * stats.mean_logit, V
            # V times the class-weighted mean logit: the head's weighted rows (linear in h), or, softcapped, a
            # vocabulary pass of its own over the scored rows
            mean = linear_mean_logits(_input, lin_weight, bias=bias, softcap=cap, class_weights=c,
                                      response_mask=target != self.ignore_index)
            return V * mean, V if c is None else c.detach().float().sum()

        def label_logit():
            return label_logits(_input, lin_weight, label, bias=bias, softcap=cap)

        return _composed(self, stats.logprobs, stats.argmax, label_logit, class_sums, target, V, out_dtype)


class LigerCrossEntropyLoss(_CrossEntropyOptions):
    """Liger's cross-entropy on materialised logits ``_input [BT, V]`` (the module doc): the label log-probs and
    the argmax from :func:`fastalign.token_logprobs` (one pass over each row, fp32 whatever the logits' dtype; its
    backward one more pass, writing d(logits) over ``_input`` as Liger's kernel does, unless ``_input`` is a leaf),
    with a softcap, smoothing or a z-loss a block of rows at a time (:class:`_LogitRows`); the same options and
    outputs as Liger's module, every combination of them."""

    CLASS_WEIGHTS = "weight"
    OPTIONS = ("weight", "ignore_index", "lse_square_scale", "label_smoothing", "reduction", "softcap",
               "return_z_loss", "return_token_accuracy", "return_predicted_tokens")
    use_token_scaling = False  # an option of the fused module only

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False):
        super().__init__()
        self._configure_options(locals())

    def forward(self, _input: Tensor, target: Tensor):
        out_dtype = getattr(_input, "dtype", None)  # the loss's and the z-loss's, as Liger's kernel stores them
        _input = float64_as_float32(_validate.any_float("_input", _input, dim=2))  # float64 computed in fp32
        V = _input.shape[1]
        c = self._checked_class_weights(target, _input.shape[0], V, "_input.shape[1]", _input=_input)
        # the backward writes d(logits) over the logits where they are an intermediate of the graph (a model's)
        overwrite = overwritable(_input)
        if self.softcap is not None or self.label_smoothing > 0 or self.lse_square_scale != 0:
            # z_y and sum_j c_j z_j differentiated beside lp, or softcapped logits: a block of rows at a time
            weights = None if c is None else c.detach()
            total = V if weights is None else weights.float().sum()  # C = sum_j c_j
            lp, z_y, sums, amax = _LogitRows.apply(
                _input, target, weights, total, None if self.softcap is None else float(self.softcap),
                self.ignore_index, self.wants_argmax, self.label_smoothing > 0, overwrite)
            return _composed(self, lp, amax, lambda: z_y, lambda: (sums, total), target, V, out_dtype, out_dtype)
        # the label log-probs alone: the kernel's pass, and its backward (z_y only for a reported z-loss; no
        # smoothing here, so no class sums)
        stats = token_logprobs(_input, target, ignore_index=self.ignore_index, argmax=self.wants_argmax,
                               inplace_backward=overwrite)

        def label_logit():
            return _input.gather(1, _label_in_range(target, self.ignore_index, V)[:, None])[:, 0].float()

        return _composed(self, stats.logprobs, stats.argmax, label_logit, None, target, V, out_dtype, out_dtype)


class _LogitRows(torch.autograd.Function):
    r"""Per row of the logits ``z`` of ``x [BT, V]``, a block of rows at a time (``_BLOCK_ELEMENTS`` of fp32 on the CPU,
    32 times more elsewhere; never a ``[BT, V]`` tensor beside ``x``), with ``z = a u + b`` for the block's values
    ``u``::

        z = x                                        u = x,                   a = 1,       b = 0
        z = cap tanh(x / cap) = cap (2 s - 1)        u = s = sigmoid(2 x / cap), a = 2 cap,   b = -cap

    (``sigmoid``: a fraction of ``tanh``'s cost on the CPU). Forward: ``lp = log softmax(z)_y = log softmax(a u)_y``
    and the argmax (:func:`fastalign.token_logprobs` of ``u`` at temperature ``1 / a``), ``z_y = a u_y + b`` and, with
    ``class_sums``, ``sum_j c_j z_j = a sum_j c_j u_j + b C`` (``c = 1`` without class weights; ``total`` is ``C``),
    each fp32. Backward,
    the block's ``u`` recomputed (widened to fp32) and ``p = softmax(a u)``::

        d z_j = g_lp ([j = y] - p_j) + g_zy [j = y] + g_s c_j
        d x_j = d z_j                      (z = x)
        d x_j = d z_j (1 - t_j^2) = 4 d z_j s_j (1 - s_j)        (softcapped)

    0 on rows whose target is ``ignore_index``, written over ``x`` with ``overwrite`` (an intermediate nothing else
    reads: Liger's kernel writes its gradient over its input too), into a new tensor otherwise."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, c: Optional[Tensor], total, cap: Optional[float], ignore_index: int,
                argmax: bool, class_sums: bool, overwrite: bool):
        n, V = x.shape
        a, b = (1.0, 0.0) if cap is None else (2.0 * cap, -cap)
        y = _label_in_range(target, ignore_index, V)
        lp, z_y, sums = (torch.zeros(n, dtype=torch.float32, device=x.device) for _ in range(3))
        amax = torch.zeros(n if argmax else 0, dtype=torch.int64, device=x.device)
        weights = None if c is None else c.float()
        for rows, u in _blocks(x, cap, widen=False):
            stats = token_logprobs(u, target[rows], temperature=1.0 / a, ignore_index=ignore_index, argmax=argmax)
            lp[rows] = stats.logprobs
            z_y[rows] = a * u.gather(1, y[rows, None])[:, 0].float() + b
            if argmax:
                amax[rows] = stats.argmax
            if class_sums:
                weighted = u.sum(-1, dtype=torch.float32) if weights is None else u.float() @ weights
                sums[rows] = a * weighted + b * total
        ctx.save_for_backward(x, target, y, c)
        ctx.cap, ctx.ignore_index, ctx.overwrite = cap, ignore_index, overwrite
        ctx.mark_non_differentiable(amax)
        ctx.set_materialize_grads(False)
        return lp, z_y, sums, amax

    @staticmethod
    def backward(ctx, g_lp, g_zy, g_s, _g_amax):
        x, target, y, c = ctx.saved_tensors
        cap, live = ctx.cap, target != ctx.ignore_index
        a = 1.0 if cap is None else 2.0 * cap
        dx = x if ctx.overwrite else torch.empty_like(x)
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        # softcapped: every term times 4, the factor of 1 - t^2 = 4 s (1 - s)
        g_lp, g_zy, g_s = (None if g is None else (1.0 if cap is None else 4.0) * g.float() for g in (g_lp, g_zy, g_s))
        g_lp, g_zy = (zero.expand(x.shape[0]) if g is None else g for g in (g_lp, g_zy))
        weights = None if c is None else c.float()
        for rows, u in _blocks(x, cap, widen=True):
            dz = torch.softmax(u if cap is None else u * a, -1).mul_(-g_lp[rows, None])  # -g_lp p_j
            if g_s is not None and weights is None:
                dz.add_(g_s[rows, None])
            elif g_s is not None:
                dz.addr_(g_s[rows], weights)
            dz.scatter_add_(1, y[rows, None], (g_lp + g_zy)[rows, None])
            if cap is not None:
                dz.mul_(u.addcmul_(u, u, value=-1.0))  # s (1 - s)
            dx[rows] = dz.masked_fill_(~live[rows, None], 0.0)
        return dx.detach(), None, None, None, None, None, None, None, None  # its own alias: a leaf keeps it uncopied


def _blocks(x: Tensor, cap: Optional[float], widen: bool):
    """``(rows, u)`` for consecutive blocks of rows of ``x``: ``u = sigmoid(2 x[rows] / cap)`` in fp32 with a ``cap``;
    without, ``x[rows]`` itself, or with ``widen`` an fp32 copy. The fp32 blocks share one buffer (read a block's
    ``u`` before taking the next)."""
    n, V = x.shape
    budget = _BLOCK_ELEMENTS if x.device.type == "cpu" else 32 * _BLOCK_ELEMENTS  # 256 MiB: fewer launches on a GPU
    size = max(1, min(n, budget // max(1, V)))
    buf = torch.empty((size, V) if cap is not None or widen else (0,), dtype=torch.float32, device=x.device)
    for start in range(0, n, size):  # blocks fixed by the shapes
        rows = slice(start, min(start + size, n))
        if cap is None and not widen:
            yield rows, x[rows]
        elif cap is None:
            yield rows, buf[: rows.stop - start].copy_(x[rows])
        else:
            yield rows, buf[: rows.stop - start].copy_(x[rows]).mul_(2.0 / cap).sigmoid_()


def _label_in_range(target: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """The targets as int64 indices in the vocabulary (0 where ignored; one out of range clamped: its log-prob
    is NaN and :func:`~fastalign.integrations._dtypes.refuse_out_of_range` refuses it)."""
    return torch.where(target != ignore_index, target, 0).clamp(0, vocab - 1).to(torch.int64)


def _composed(options, lp: Tensor, argmax: Optional[Tensor], label_logit, class_sums, target: Tensor, V: int,
              out_dtype, loss_dtype=torch.float32) -> Tensor | CrossEntropyOutput:
    """Liger's loss and metrics (the module doc) from the label log-probs ``lp`` (fp32, 0 where ignored), the
    argmax (when a metric needs it), ``label_logit()`` (``z_y``, differentiable: ``lse = z_y - lp``) and
    ``class_sums()`` (``(sum_j c_j z_j`` per row, ``C)``), each called only when the options need it; ``options``
    the module (its Liger options). The z-loss in ``out_dtype``, the loss in ``loss_dtype`` (cast once, after
    its fp32 sum)."""
    smoothing, z_scale, c = float(options.label_smoothing), float(options.lse_square_scale), options.class_weights()
    keep = target != options.ignore_index
    n = keep.sum()
    c_y = None if c is None else c.detach().float()[_label_in_range(target, options.ignore_index, V)]
    ce = -lp if c_y is None else -c_y * lp
    lse = None
    if smoothing > 0 or z_scale != 0.0 or options.return_z_loss:
        lse = label_logit() - lp
    if smoothing > 0:
        zc, c_sum = class_sums()
        ce = (1.0 - smoothing) * ce - (smoothing / V) * (zc - c_sum * lse)
    z = z_scale * lse * lse if lse is not None else None
    one = torch.ones((), dtype=torch.float32, device=lp.device)
    if options.reduction == "mean":
        count = torch.where(n > 0, n.float(), one)  # every target ignored: a loss of 0, as Liger
        denom = count if c_y is None else torch.where(n > 0, torch.where(keep, c_y, 0.0).sum(), one)
    else:
        count = denom = one
    loss = ce / denom
    if z is not None:
        z = z / count
        if z_scale != 0.0:
            loss = loss + z
    if options.use_token_scaling:
        p_y = lp.detach().exp()
        loss = loss * p_y
        z = None if z is None else z * p_y
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    loss = refuse_out_of_range(torch.where(keep, loss, zero), target, V, options.ignore_index, "target")
    if options.reduction != "none":
        loss = loss.sum()
    loss = loss.to(loss_dtype)
    if not (options.return_z_loss or options.wants_argmax):
        return loss
    z_loss = accuracy = predicted = None
    if options.return_z_loss:
        z = torch.where(keep, z.detach(), zero).to(out_dtype)
        z_loss = z if options.reduction == "none" else z.sum()
    if options.return_token_accuracy:
        hit = (keep & (argmax == target)).float()
        accuracy = hit if options.reduction == "none" else hit.sum() / n
    if options.return_predicted_tokens:
        predicted = torch.where(keep, argmax, -1)
    return CrossEntropyOutput(loss, z_loss, accuracy, predicted)
