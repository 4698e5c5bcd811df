r"""Liger-Kernel 0.8's ``LigerVocabParallelCrossEntropy`` (``liger_kernel.transformers``): cross-entropy over a
vocabulary sharded across a tensor-parallel group, Megatron's layout. Same constructor (same checks and messages),
``forward(vocab_parallel_logits, target, tp_group=None)`` and outputs; a user swaps the import::

    from fastalign.integrations.liger_vocab_parallel import LigerVocabParallelCrossEntropy
    # was: from liger_kernel.transformers import LigerVocabParallelCrossEntropy

Each of the ``W`` ranks of ``tp_group`` holds the logits ``x [S, B, V_local]`` of a contiguous slice of the
vocabulary, rank ``r`` the global ids ``[r V_local, (r + 1) V_local)`` (every rank the same ``V_local``;
``V_global = W V_local``); ``target [S, B]`` holds global ids, the same on every rank. With ``lse`` the
log-sum-exp of a row over the whole vocabulary, ``p = softmax`` over it, ``y`` the target and ``a`` the
``label_smoothing``::

    ce     = lse - x_y
    smooth = lse - (1 / K) sum_{j in U} x_j            (= -mean_{j in U} log p_j)
    loss   = (1 - a') ce + a' smooth                  (a' = 0 without smoothing: loss = ce)
    d x_j  = g (p_j - (1 - a') [j = y] - (a' / K) [j in U])       for j on this rank

per row (``g`` its upstream gradient), where the options choose ``U`` and ``K`` (its size) and ``a'``:

==============================  ===========================  =============================================
option                          value                        effect
==============================  ===========================  =============================================
``label_smoothing_mode``        ``"global"`` (default)       ``U`` the whole vocabulary, ``K = V_global``:
                                                             the loss of one process on the full logits
                                ``"partition"``              ``U`` this rank's slice, ``K = V_local``: the
                                                             loss differs per rank (Megatron's convention)
``label_smoothing_formula``     ``"pytorch"`` (default)      ``a' = a``: target ``(1 - a) onehot + a / K``
                                                             (``F.cross_entropy(label_smoothing=a)``)
                                ``"megatron"``               ``a' = a K / (K - 1)``: ``1 - a`` on the target,
                                                             ``a / (K - 1)`` on every other id of ``U``
``label_smoothing``             ``a`` in ``[0, 1)``          0 (default): plain cross-entropy, both
                                                             formulas and modes alike
``ignore_index``                an int (default -100)        rows with this target: loss 0, d(logits) 0
``reduction``                   ``"none"`` only              the per-token loss ``[S, B]``
==============================  ===========================  =============================================

At one rank (``tp_group`` None or of size 1) both modes are the same. Each rank forms fp32 statistics of its
slice (its log-sum-exp from one fused pass of :func:`fastalign.token_logprobs`, the target's logit where it owns
the target, the sum of its logits for smoothing), and two ``all_reduce`` calls over ``tp_group`` combine them (a
MAX of the ranks' log-sum-exps, then one SUM of ``exp(lse_r - max)``, the target logit and, in ``"global"`` mode
with smoothing, the logit sums); none without a group or with a group of one. The backward needs no collective:
the fused backward of that pass, at an upstream gradient scaled by the slice's share of the row's mass, writes
the whole vocabulary's ``g p`` in one pass (one more subtracts the smoothing's constant). At one rank without
smoothing the loss is ``-log p_y`` of that one pass at the targets, its backward ``g (p - onehot_y)``. As Liger's:
the loss is fp32 whatever the logits' dtype, d(logits) has the logits'
dtype (float64 logits are computed in fp32), NaN in the logits of a row makes its loss NaN, an ignored row gives
0 and a zero gradient whatever its logits.

Unlike Liger's kernel, which keeps an fp32 copy of the exponentials, the backward writes d(logits) over
``vocab_parallel_logits`` when they are an intermediate of the graph (a model's logits, any strides whose
elements do not overlap), so no ``[S, B, V_local]`` gradient is allocated: read the logits before the backward;
a second backward through a retained graph raises a ``RuntimeError`` (as torch's check of tensors modified in
place). A leaf that requires grad (or a view of one) keeps its values: its gradient is a new tensor. With
smoothing, bf16 / fp16 logits are computed on an fp32 copy (as Liger's exponentials), so that ``g (p - a'/K)``
is rounded once; that copy receives the gradient.

Errors: ``reduction`` other than ``"none"``, ``label_smoothing`` outside ``[0, 1)``, an unknown formula or mode
raise Liger's ``ValueError`` (a ``label_smoothing`` that is not a number, an ``ignore_index`` that is not an int:
``TypeError``), at construction and at an assignment to the attribute (the module then keeps its previous
value). ``forward`` raises a ``ValueError`` / ``TypeError`` naming the argument for logits that are not a 3-D
floating tensor with a non-empty vocabulary, a ``target`` that is not an int64 / int32 tensor of shape
``vocab_parallel_logits.shape[:2]`` on the logits' device, a ``tp_group`` that is not a process group of which
this process is a member, and ``"megatron"`` smoothing over a ``K`` of 1 (``a K / (K - 1)`` undefined). A target
outside ``[0, V_global)`` that is not ``ignore_index`` is not read on the host (that would synchronise with the
GPU): its row's loss is NaN, and so is its row of d(logits), rather than a wrong number. That ranks agree on
``V_local`` and ``target`` is not checked.

:func:`liger_fused_linear_scaled_cross_entropy_tp` is Liger-Kernel 0.8's function of that name
(``liger_kernel.transformers.functional``): the per-token NLL, and optionally the entropy, of a linear head whose
vocabulary is sharded over a tensor-parallel group, from the hidden states (no ``[M, V]`` logits are built). Same
signature, defaults, outputs and gradient contract (d(input) summed over the group, d(weight) the rank's shard's);
a user swaps the import::

    from fastalign.integrations.liger_vocab_parallel import liger_fused_linear_scaled_cross_entropy_tp
    # was: from liger_kernel.transformers.functional import liger_fused_linear_scaled_cross_entropy_tp

It is computed by :func:`fastalign.linear_logprobs` with ``vocab_group=tp_group``; the function's docstring gives
the formula, what differs from Liger's and what raises. Nothing in this module imports Liger-Kernel.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations._live_options import LiveOptions
from fastalign.linear import linear_logprobs
from fastalign.logprobs import overwritable, token_logprobs

__all__ = ["LigerVocabParallelCrossEntropy", "liger_fused_linear_scaled_cross_entropy_tp"]

_SKIP = -1  # the label of the ignored rows in the fused pass (never an argmax, whatever ignore_index is)

_FORMULAS = ("pytorch", "megatron")
_MODES = ("global", "partition")


class LigerVocabParallelCrossEntropy(LiveOptions, nn.Module):
    """Liger's vocabulary-parallel cross-entropy (see the module doc for the formula and the options).

    Args:
        ignore_index: target value to ignore (loss 0, no gradient).
        label_smoothing: smoothing strength in ``[0, 1)``.
        reduction: must be ``"none"``: the per-token loss ``[S, B]``.
        label_smoothing_formula: ``"pytorch"`` (default) or ``"megatron"``.
        label_smoothing_mode: ``"global"`` (default, averaged over ``V_global``) or ``"partition"`` (over
            ``V_local`` on each rank).

    ``forward(vocab_parallel_logits [S, B, V_local], target [S, B] (global ids), tp_group=None)`` returns the
    fp32 loss ``[S, B]``; ``tp_group`` is the tensor-parallel ``torch.distributed`` process group (None: one
    rank holding the whole vocabulary).
    """

    OPTIONS = ("ignore_index", "label_smoothing", "reduction", "label_smoothing_formula", "label_smoothing_mode")

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "none",
                 label_smoothing_formula: str = "pytorch", label_smoothing_mode: str = "global"):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Liger's checks, in its order and with its messages; then ``ignore_index`` (an int)."""
        if self.reduction != "none":
            raise ValueError(
                f"Vocab-parallel CE returns per-token loss; reduction must be 'none', got {self.reduction!r}.")
        if not 0.0 <= _validate.number("label_smoothing", self.label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.label_smoothing_formula not in _FORMULAS:
            raise ValueError(
                f"label_smoothing_formula must be one of {_FORMULAS}, got {self.label_smoothing_formula!r}.")
        if self.label_smoothing_mode not in _MODES:
            raise ValueError(f"label_smoothing_mode must be one of {_MODES}, got {self.label_smoothing_mode!r}.")
        _validate.index_value("ignore_index", self.ignore_index)

    def forward(self, vocab_parallel_logits: Tensor, target: Tensor, tp_group=None) -> Tensor:
        x = _validate.any_float("vocab_parallel_logits", vocab_parallel_logits)
        if x.dim() != 3:
            raise ValueError(
                f"vocab_parallel_logits must be 3-D ([seq, batch, vocab]); got shape {tuple(x.shape)}. "
                f"(HuggingFace's [batch, seq, vocab] callers must transpose before calling.)")
        _validate.nonempty("vocab_parallel_logits", x, 2, "vocabulary (last)")
        _validate.integer("target", target)
        _validate.shape("target", target, x.shape[:2], "vocab_parallel_logits.shape[:2]")
        _validate.same_device(vocab_parallel_logits=x, target=target)
        rank, world = _rank_and_size(tp_group)
        v_local = x.shape[2]
        smoothing = float(self.label_smoothing)
        whole = self.label_smoothing_mode == "global"
        K = v_local * world if whole else v_local  # the ids the smoothing spreads over
        alpha = smoothing
        if smoothing > 0 and self.label_smoothing_formula == "megatron":
            if K < 2:
                raise ValueError(
                    f"label_smoothing_formula='megatron' spreads label_smoothing over the ids other than the target: "
                    f"it needs a vocabulary of at least 2 ids ({self.label_smoothing_mode!r} mode), got "
                    f"vocab_parallel_logits.shape[-1]={v_local} on {world} rank(s)")
            alpha = smoothing * K / (K - 1)
        # float64 logits are computed in fp32, as Liger's; with smoothing, bf16 / fp16 ones too (an fp32 copy, as
        # Liger's fp32 exponentials): d(logits) = g (p - a'/K) is then one rounding. The cast's backward gives
        # d(logits) in their dtype.
        if x.dtype == torch.float64 or (smoothing > 0 and x.dtype != torch.float32):
            x = x.float()
        if world == 1 and smoothing == 0:  # the whole vocabulary here, no smoothing: -log p_y, one fused pass
            ignore = int(self.ignore_index)
            lp = token_logprobs(x, target, ignore_index=ignore, inplace_backward=overwritable(x)).logprobs
            # a target outside the vocabulary: a NaN loss and a NaN gradient on its row, as on several ranks
            outside = (target != ignore) & ((target < 0) | (target >= v_local))
            return (0.0 - lp) * torch.where(outside, math.nan, 1.0)
        return _VocabParallelCE.apply(x, target, tp_group if world > 1 else None, rank * v_local, v_local * world,
                                      int(self.ignore_index), alpha, K, smoothing > 0 and whole and world > 1,
                                      overwritable(x))

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, label_smoothing_formula={self.label_smoothing_formula!r}, "
                f"label_smoothing_mode={self.label_smoothing_mode!r}")


def _rank_and_size(tp_group) -> tuple[int, int]:
    """This process's rank in ``tp_group`` and the group's size; ``(0, 1)`` without a group (``torch.distributed``
    is then not consulted)."""
    if tp_group is None:
        return 0, 1
    _validate.process_group("tp_group", tp_group)
    dist = torch.distributed
    rank = dist.get_rank(group=tp_group)
    if rank < 0:
        raise ValueError("tp_group must be a process group this process is a member of")
    return rank, dist.get_world_size(group=tp_group)


class _VocabParallelCE(torch.autograd.Function):
    r"""The loss of the module doc from this rank's logits ``x [S, B, V]`` (``V = V_local``), the global targets,
    the first global id ``start`` of the slice and ``v_global``; ``alpha`` is ``a'`` (0 without smoothing),
    ``K`` the size of the smoothing's set, ``sum_all`` whether the logit sums are summed over the ranks
    (``"global"`` mode at ``W > 1``). Forward, per row in fp32::

        lse_r = m - log p_k                     k = argmax_j x_j, m = x_k, log p_k from fastalign.token_logprobs
        lse   = M + log sum_r exp(lse_r - M)    M = max_r lse_r    (all_reduce MAX, then SUM)
        x_y   = sum_r [y on r] x_y              (in the same SUM)
        sum_U = sum_j x_j                       (summed over the ranks in the same SUM with ``sum_all``)

    Backward: ``d x = g (c p_r - a'/K - (1 - a') onehot_y)`` with ``p_r = softmax`` of the slice and ``c =
    exp(lse_r - lse)`` its share of the row's mass, so ``c p_r`` is the whole vocabulary's softmax. The fused
    backward of ``log p_k`` at the upstream gradient ``-g c`` writes ``g c (p_r - onehot_k)`` in one pass (over
    ``x`` with ``overwrite``, else into a new tensor); one more pass subtracts ``g a'/K`` with smoothing; the
    elements ``k`` and ``y`` are then set to their values, computed in fp32. 0 on ignored rows, NaN on rows of an
    out-of-range target."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, group, start: int, v_global: int, ignore_index: int, alpha: float,
                K: int, sum_all: bool, overwrite: bool):
        dist = torch.distributed
        V = x.shape[2]
        t = target.to(torch.int64)
        live = t != ignore_index
        local = t - start
        owned = live & (local >= 0) & (local < V)
        idx = torch.where(owned, local, 0)
        # 1 on a scored row, 0 on an ignored one, NaN where the target lies outside the vocabulary
        scale = torch.where(live & ((t < 0) | (t >= v_global)), math.nan, live.float())
        # the slice's log-sum-exp from the fused pass at each row's largest logit (exact to its rounding at any
        # scale); its graph is kept for the backward (ignored rows: no work, no gradient)
        # each row's argmax from the fused kernels' pass over rows with no label (one read, faster than torch's)
        top = token_logprobs(x.detach(), torch.full_like(t, _SKIP), ignore_index=_SKIP, argmax=True).argmax
        m = x.gather(2, top.unsqueeze(2)).squeeze(2).float()
        with torch.enable_grad():  # a view of x (or a detached leaf): x's own hooks see its gradient once
            inner = x.view_as(x) if overwrite else x.detach().requires_grad_(True)
            # a row whose slice is all -inf holds none of its mass: not read, and its d(logits) 0 (its own softmax,
            # 0 / 0, would be NaN)
            log_p_top = token_logprobs(inner, torch.where(live & (m != -math.inf), top, _SKIP), ignore_index=_SKIP,
                                       inplace_backward=overwrite).logprobs
        lse_r = torch.where(m == -math.inf, m, m - log_p_top.detach())  # a row of -inf logits: -inf
        z_y = torch.where(owned, x.gather(2, idx.unsqueeze(2)).squeeze(2).float(), 0.0)
        sums = x.sum(2, dtype=torch.float32) if alpha else torch.zeros_like(lse_r)
        lse = lse_r
        if group is not None:
            peak = lse_r.clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            peak = peak.masked_fill(peak == -math.inf, 0.0)
            packed = torch.stack([torch.exp(lse_r - peak), z_y] + ([sums] if sum_all else []))
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            lse = packed[0].log() + peak
            z_y = packed[1]
            if sum_all:
                sums = packed[2]
        loss = lse - z_y
        if alpha:
            loss = (1.0 - alpha) * loss + alpha * (lse - sums / K)
        loss = torch.where(torch.isnan(scale), math.nan, torch.where(live, loss, 0.0))
        ctx.inner = (inner, log_p_top)  # a graph, not saved tensors: the backward differentiates it
        ctx.save_for_backward(lse, lse_r, m, z_y, top, idx, owned, scale)
        ctx.alpha, ctx.K, ctx.overwrite, ctx.written = alpha, K, overwrite, False
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        lse, lse_r, m, z_y, top, idx, owned, scale = ctx.saved_tensors
        if ctx.written:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                               "operation: the first backward wrote d(logits) over vocab_parallel_logits (a model's "
                               "logits); a second backward through this graph cannot read them")
        inner, log_p_top = ctx.inner
        alpha, K = ctx.alpha, ctx.K
        w = torch.where(scale == 0, 0.0, g.float() * scale)  # an ignored row: 0 whatever g is
        c = torch.exp(lse_r - lse)
        # kept for a second backward (a leaf's: the logits were not written over)
        (dx,) = torch.autograd.grad(log_p_top, inner, grad_outputs=-(w * c), retain_graph=True)
        if alpha:
            dx.sub_((w * (alpha / K)).unsqueeze(2).to(dx.dtype))
        # the largest logit's and the target's elements, in fp32 (the kernel left g c (p_k - 1) at k)
        at_top = w * (torch.exp(m - lse) - alpha / K) - torch.where(owned & (idx == top), (1.0 - alpha) * w, 0.0)
        at_top = torch.where(scale == 0, 0.0, at_top)  # an ignored row stays 0 whatever its logits
        dx.scatter_(2, top.unsqueeze(2), at_top.unsqueeze(2).to(dx.dtype))
        at_y = w * (torch.exp(z_y - lse) - alpha / K - (1.0 - alpha))
        y_col = idx.unsqueeze(2)
        dx.scatter_(2, y_col, torch.where(owned.unsqueeze(2), at_y.unsqueeze(2).to(dx.dtype), dx.gather(2, y_col)))
        ctx.written = ctx.overwrite
        return dx.detach(), None, None, None, None, None, None, None, None, None  # its own alias: no copy


# ----------------------------------------------------------------------------- the fused head over a sharded vocabulary

_TILES_PER_REDUCE = (1, 2, 4)


def liger_fused_linear_scaled_cross_entropy_tp(input: Tensor, weight: Tensor, target: Tensor, tp_group,
                                               temperature: float = 1.0, ignore_index: int = -100,
                                               tiles_per_reduce: int = 1, return_entropy: bool = False):
    r"""Liger's tensor-parallel fused linear cross-entropy: the per-token NLL (and entropy) of
    ``softmax(input @ W.T / temperature)``, ``W`` the whole head, from this rank's shard ``weight`` of it.

    Each of the ``R`` ranks of ``tp_group`` holds ``weight [V_local, H]``, the rows ``[r V_local, (r + 1) V_local)``
    of the head (rank ``r``; every rank the same ``V_local``, ``V = R V_local``); ``input [M, H]`` and ``target
    [M]`` (global ids) are the same on every rank. Per token, with ``T = temperature`` and ``y`` its target::

        z_j     = input . W_j / T                      (rank r computes its own j; no [M, V] tensor is built)
        lse     = log sum_{j < V} exp(z_j)             (combined over tp_group)
        nll     = lse - z_y                            (= -log p_y,  p = softmax(z))
        entropy = lse - sum_{j < V} p_j z_j            (= -sum_j p_j log p_j)

    Rows whose target is ``ignore_index`` give 0 for both and no gradient. Every rank gets the same fp32 ``nll
    [M]`` (and ``entropy [M]``). Autograd gives d(input) summed over ``tp_group``: every rank holds the gradient of
    the whole head (``input``'s dtype); d(weight) is this rank's shard's (its rows of the whole head's gradient).

    Args:
        input: ``[M, H]`` hidden states, float32, bfloat16, float16 or float64 (float64 is computed in fp32, as
            Liger's; its gradients are float64).
        weight: ``[V_local, H]``, this rank's contiguous shard of the head, ``input``'s dtype.
        target: ``[M]`` int64 global ids.
        tp_group: the ``torch.distributed`` process group the vocabulary is sharded over; None is the default
            group. ``torch.distributed`` must be initialized, as Liger requires (a single process passes a group of
            one).
        temperature: divides the logits; finite and > 0.
        ignore_index: the target of rows to skip (an int).
        tiles_per_reduce: an execution option of Liger's kernel, checked as Liger does (1, 2 or 4); it changes
            nothing here.
        return_entropy: return ``(nll, entropy)`` instead of ``nll``.

    Computed by :func:`fastalign.linear_logprobs` (``vocab_group=tp_group``, ``nll = -logprobs``); as Liger's,
    with these differences: CPU tensors are accepted (Liger's function takes CUDA tensors only) and the ranks
    combine their statistics with ``all_reduce`` calls on ``tp_group`` whatever its backend (gloo, NCCL); a bf16 /
    fp16 head's logits are accumulated in fp32 (Liger's fallback rounds them to bf16 / fp16 first), so such inputs
    agree with Liger's to that rounding; a target outside ``[0, V)`` that is not ``ignore_index`` gives a NaN
    ``nll`` (Liger's: ``lse``, as if its logit were 0; the gradients agree); shards of different sizes are placed
    by their sizes (Liger's rank ``r`` starts at ``r V_local``: the same for equal shards).

    Raises (Liger's exception types, naming the argument, in Liger's order): ``TypeError`` / ``ValueError`` for a
    ``temperature`` that is not a real number / not finite and > 0, a ``tiles_per_reduce`` that is not an int /
    not 1, 2 or 4, a ``return_entropy`` that is not a bool (``TypeError``); for ``tp_group``, a ``TypeError`` if it
    is not a process group or None, a ``RuntimeError`` if ``torch.distributed`` is not initialized, a
    ``ValueError`` if this process is not a member; ``ValueError`` for an ``input``, ``weight`` or ``target`` that
    is not 2-D, 2-D, 1-D, shapes that disagree (``target.shape[0] != input.shape[0]``, ``weight.shape[1] !=
    input.shape[1]``), an empty token, hidden or local vocabulary dimension, tensors on different devices;
    ``TypeError`` for a non-floating ``input``, a ``weight`` of another dtype, a ``target`` that is not int64, and
    (an addition) an ``ignore_index`` that is not an int. ``linear_logprobs`` adds its own cross-rank check: on CPU
    tensors, ranks that disagree on ``M`` or ``H`` raise a ``ValueError`` on every rank.
    """
    temperature = _validate.positive("temperature", temperature)
    if isinstance(tiles_per_reduce, bool) or not isinstance(tiles_per_reduce, int):
        raise TypeError(f"tiles_per_reduce must be an int, got {type(tiles_per_reduce).__name__}")
    if tiles_per_reduce not in _TILES_PER_REDUCE:
        raise ValueError(f"tiles_per_reduce must be one of 1, 2 or 4, got {tiles_per_reduce}")
    return_entropy = _validate.boolean("return_entropy", return_entropy)
    group = _tp_group(tp_group)
    _check_sharded_head(input, weight, target)
    ignore_index = _validate.index_value("ignore_index", ignore_index)
    if input.dtype == torch.float64:  # differentiable casts: the gradients come back float64
        input, weight = input.float(), weight.float()
    stats = linear_logprobs(input, weight, target, temperature=temperature, ignore_index=ignore_index,
                            entropy=return_entropy, vocab_group=group)
    nll = 0.0 - stats.logprobs  # +0 on ignored rows (a negation would give -0)
    return (nll, stats.entropy) if return_entropy else nll


def _tp_group(tp_group):
    """The process group ``tp_group`` names (None: the default group), checked (see the function's Raises)."""
    dist = torch.distributed
    if dist.is_available() and type(tp_group) is int and tp_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("tp_group must be a process group this process is a member of, got "
                         "GroupMember.NON_GROUP_MEMBER (what dist.new_group returns to the ranks outside it)")
    _validate.process_group("tp_group", tp_group)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tp_group: torch.distributed must be initialized before the call (tp_group=None is its "
                           "default group; one process passes a group of one)")
    group = dist.group.WORLD if tp_group is None else tp_group
    _rank_and_size(group)  # a member of it
    return group


def _check_sharded_head(input: Tensor, weight: Tensor, target: Tensor) -> None:
    """Liger's checks of ``input [M, H]``, ``weight [V_local, H]`` and ``target [M]`` (all but its CUDA one), with
    messages that name the argument."""
    _validate.tensor("input", input, dim=2)
    _validate.tensor("weight", weight, dim=2)
    _validate.tensor("target", target, dim=1)
    M, H = input.shape
    _validate.shape("target", target, (M,), "input.shape[0] tokens")
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V_local, {H}) (input.shape[1] = {H}), got {tuple(weight.shape)}")
    _validate.nonempty("input", input, 0, "token (first)")
    _validate.nonempty("input", input, 1, "hidden-size (last)")
    _validate.nonempty("weight", weight, 0, "local vocabulary (first)")
    _validate.same_device(input=input, weight=weight, target=target)
    _validate.any_float("input", input)
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have the dtype of input ({input.dtype}), got {weight.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of global vocabulary ids, got {target.dtype}")
