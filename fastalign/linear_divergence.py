r"""Distillation loss from hidden states: the generalized Jensen-Shannon divergence or the total variation
distance between a student's and a teacher's next-token distributions, or the cosine distance of their logits
(docs/math.md#distillation-divergence), neither ``[tokens x V]`` logits ever built.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend, _dtensor, _validate
from fastalign._deprecate import renamed
from fastalign._options import AUTO_OR_BOOL, check_choice
from fastalign.aggregate import global_divisor
from fastalign.linear import check_head, check_logit_options, check_second_head
from fastalign.ops.divergence import DIVERGENCES
from fastalign.ops.linear_divergence import DivergenceOptions, Head, divergence_loss
from fastalign.ops.single_pass import refuse_traced, rows_take_single_pass

__all__ = ["linear_divergence_loss", "DIVERGENCE_AGGS"]

#: the aggregations of :func:`linear_divergence_loss` (``agg``): a mean over the scored tokens, or over the
#: sequences of the per-sequence token means (rows of ``[B, T, H]`` hidden states)
DIVERGENCE_AGGS = ("token-mean", "seq-mean-token-mean")
_MASK_RULE = "hold 0 and 1 only (a token is scored or not; weigh the scored tokens with token_weights)"


# each tensor argument's name in the messages of check_tensors (an adapter passes its own)
ARGUMENT_NAMES = {name: name for name in ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight",
                                          "teacher_bias", "response_mask", "labels", "global_tokens",
                                          "token_weights")}


def check_tensors(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
                  teacher_weight: Tensor, teacher_bias: Optional[Tensor], response_mask: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, global_tokens=None, names: dict = ARGUMENT_NAMES,
                  token_weights: Optional[Tensor] = None) -> None:
    """The tensor arguments of :func:`linear_divergence_loss` against each other (a ``ValueError`` /
    ``TypeError`` naming the bad one by ``names[argument]``): both heads, the shared leading shape and
    vocabulary, the mask and labels, one device."""
    n = names
    check_head(hidden, weight, bias, names=(n["hidden"], n["weight"], n["bias"]))
    check_second_head(hidden, weight, teacher_hidden, teacher_weight, teacher_bias, (n["hidden"], n["weight"]),
                      (n["teacher_hidden"], n["teacher_weight"], n["teacher_bias"]))
    lead = tuple(hidden.shape[:-1])
    if response_mask is not None:
        _validate.real(n["response_mask"], response_mask)
        _validate.shape(n["response_mask"], response_mask, lead, f"{n['hidden']}.shape[:-1]")
    if labels is not None:
        _validate.integer(n["labels"], labels)
        _validate.shape(n["labels"], labels, lead, f"{n['hidden']}.shape[:-1]")
    if token_weights is not None:
        _validate.any_float(n["token_weights"], token_weights)
        _validate.shape(n["token_weights"], token_weights, lead, f"{n['hidden']}.shape[:-1]")
    _validate.same_device(**{n["hidden"]: hidden, n["weight"]: weight, n["bias"]: bias,
                             n["teacher_hidden"]: teacher_hidden, n["teacher_weight"]: teacher_weight,
                             n["teacher_bias"]: teacher_bias, n["response_mask"]: response_mask,
                             n["labels"]: labels, n["token_weights"]: token_weights,
                             n["global_tokens"]: global_tokens if isinstance(global_tokens, Tensor) else None})


@renamed(normalizer="global_tokens")
def linear_divergence_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str = "jsd",
    beta: Optional[float] = None,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    response_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    token_weights: Optional[Tensor] = None,
    agg: str = "token-mean",
    global_tokens=None,
    single_pass="auto",
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""``(loss, metrics)``: the distillation loss of a student's head against a teacher's, from hidden states.

    Each side's logits ``z = softcap(scale * (h W^T + b))`` (``softcap(u) = c tanh(u / c)``, off when None),
    ``p = softmax(z / temperature)``; per token the generalized JSD (``divergence="jsd"``)

    .. math::

        D = \begin{cases} KL(p_t \| p_s) & \beta = 0 \\ KL(p_s \| p_t) & \beta = 1 \\
            \beta\,KL(p_t \| m) + (1-\beta)\,KL(p_s \| m),\ m = (1-\beta) p_s + \beta p_t & \text{else}\end{cases}

    the total variation distance (``divergence="tvd"``, Liger's TVD loss) ``D = 1/2 sum_j |p_s,j - p_t,j|``,
    or the cosine distance of the logits (``divergence="cosine"``, Liger's cosine-similarity loss)
    ``D = 1 - z_s . z_t / (max(|z_s|, 1e-12) max(|z_t|, 1e-12))`` (the norms floored as ``F.normalize``;
    a temperature scales both sides alike and leaves it unchanged)

    and the loss over the scored tokens ``S``, each weighted by ``ω_t`` (``token_weights``, default 1)

    .. math::

        \text{loss} = \frac{1}{n} \sum_{t \in S} ω_t \left(w_{soft} D_t + w_{hard}\,\text{NLL}_t\right),
        \quad \text{NLL}_t = -\log \mathrm{softmax}(z_{s,t})_{y_t}\ \text{(temperature 1)}

    with ``n`` = ``global_tokens`` (default: ``max(|S|, 1)``), or, with ``agg="seq-mean-token-mean"``, the mean over
    the ``B`` rows of ``[B, T, H]`` hidden states of each row's sum over ``max(|S_b|, 1)`` (an empty row adds 0
    and counts). Only the scored tokens go through the vocabulary.
    When gradients are needed, each block of tokens takes four matrix products (both heads' logits, then
    d(hidden) and d(weight) of the student; the backward only scales them), without: two.

    Args:
        hidden: the student's hidden states ``[..., H_s]`` (float32, bfloat16 or float16).
        weight: the student's lm_head ``[V, H_s]``, in ``hidden``'s dtype. ``bias``: optional ``[V]``.
        teacher_hidden: ``[..., H_t]``, the same leading shape as ``hidden`` (``H_t`` may differ from ``H_s``).
        teacher_weight: ``[V, H_t]``: the same vocabulary as ``weight``. ``teacher_bias``: optional ``[V]``.
            The teacher's tensors get no gradient (they are read as constants).
        divergence: ``"jsd"`` (default), ``"tvd"`` or ``"cosine"``.
        beta: the JSD's, in ``[0, 1]`` (default 0.5); 0 the forward KL, 1 the reverse KL (TRL's and Liger's
            convention). The other divergences have none: a ``beta`` with them raises ``ValueError``.
        temperature: > 0, divides both sides' logits (after scale and softcap) for D and the entropy.
        logit_scale, softcap, teacher_logit_scale, teacher_softcap: each side's logit pipeline.
        response_mask: ``hidden.shape[:-1]``, 0 and 1 (or bool): the scored tokens. Another value raises
            ``ValueError`` (an eager CPU tensor) or makes the loss NaN (not read on the host): weigh tokens with
            ``token_weights``. Without it, the tokens whose ``labels`` are not ``ignore_index``, or every token.
        labels: integer ``hidden.shape[:-1]``: the targets of the hard loss (and the mask, see above).
        soft_weight, hard_weight: ``w_soft`` and ``w_hard`` (Liger's ``weight_soft_loss`` /
            ``weight_hard_loss``); ``hard_weight != 0`` needs ``labels``.
        token_weights: ``hidden.shape[:-1]``, constants (no gradient) weighing each scored token's loss, e.g.
            clipped importance ratios (TRL's self-distillation trainers); an unscored token's is not read.
        agg: ``"token-mean"`` (default) or ``"seq-mean-token-mean"`` (``hidden`` ``[B, T, H]``; no
            ``global_tokens``).
        global_tokens: the token count the loss divides by (formerly ``normalizer``, still accepted with a
            warning): a number > 0 or a one-element tensor (TRL's ``num_items_in_batch``), >= 0 and finite, as
            the global counts of :func:`fastalign.policy_loss`: a tensor 0 divides as 1 (a loss of 0 when no token
            is scored), a number 0 raises ``ValueError``; an eager CPU tensor is checked (``ValueError``),
            another is not read on the host and a negative, NaN or infinite value makes the loss NaN.
        single_pass: ``"auto"`` (the gradients in the forward when they are needed and the call is eager, but
            not for fp16 inputs on a GPU, whose fp16 d(logits) would come before a ``GradScaler``'s loss scale),
            True (the same for every dtype; it raises under torch.compile), or False (the backward runs the
            blocks again).
            Gradients are needed when grad mode is on and ``hidden``, ``weight`` or ``bias`` requires grad: under
            ``torch.no_grad()`` every mode runs the forward's two products only. The single pass's loss can be
            differentiated once per forward (its gradients are scaled in place, holding no second copy of
            d(weight)); a second backward through a retained graph needs ``single_pass=False``. Neither mode has a
            second derivative: differentiating the gradient again (``create_graph=True``) raises a RuntimeError.
            Under torch.compile the blocks run inside custom ops: one graph for every token count.
        backend: ``"cpp"``, ``"triton"`` or ``"cuda"`` (CUDA tensors run the Triton kernel); default from
            :func:`fastalign.use_backend`.

    Returns:
        ``loss`` (0-dim fp32) and ``metrics``, detached: ``divergence`` and ``entropy`` (the student's at the
        temperature) as means over the scored tokens, ``divergence_sum``, ``entropy_sum``, ``num_tokens``,
        with ``labels`` ``nll`` / ``nll_sum`` (0 at tokens whose label is ``ignore_index``), and with
        ``token_weights`` ``weighted_divergence``, the scored tokens' mean of ``ω_t D_t``.
    """
    hidden, weight, bias, _ = _dtensor.head(hidden, weight, bias)
    teacher_hidden, teacher_weight, teacher_bias, _ = _dtensor.head(teacher_hidden, teacher_weight, teacher_bias)
    check_tensors(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, response_mask, labels,
                  global_tokens, token_weights=token_weights)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("agg", agg, DIVERGENCE_AGGS)
    # a weight in the mask would be read as 1: refused (on the host), or a NaN loss (a device flag)
    fractional = None if response_mask is None else _validate.zero_one("response_mask", response_mask, _MASK_RULE)
    if agg == "seq-mean-token-mean":
        if global_tokens is not None:
            raise ValueError("global_tokens applies to agg='token-mean' only (seq-mean-token-mean divides by the "
                             "rows)")
        if hidden.dim() != 3:
            raise ValueError(f"agg='seq-mean-token-mean' needs hidden [B, T, H] (one row per sequence), got shape "
                             f"{tuple(hidden.shape)}")
    if divergence != "jsd" and beta is not None:
        raise ValueError(f"beta applies to the jsd only, not to divergence={divergence!r} (got beta={beta!r})")
    b = 0.5 if beta is None else _validate.unit_interval("beta", beta)
    inv_t, cap, scale = check_logit_options(temperature, softcap, logit_scale, ignore_index)
    t_cap = 0.0 if teacher_softcap is None else _validate.fp32_number(
        "teacher_softcap", _validate.positive("teacher_softcap", teacher_softcap))
    t_scale = _validate.fp32_number("teacher_logit_scale",
                                    _validate.finite_number("teacher_logit_scale", teacher_logit_scale))
    w_soft = _validate.finite_number("soft_weight", soft_weight)
    w_hard = _validate.finite_number("hard_weight", hard_weight)
    check_choice("single_pass", single_pass, AUTO_OR_BOOL)
    if labels is None and w_hard != 0:
        raise ValueError("hard_weight needs labels (the targets of the hard loss)")
    _validate.count("global_tokens", global_tokens)
    name = _backend.backend_for("divergence_rows", hidden.device, backend)
    refuse_traced(single_pass, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)

    H, Ht = hidden.shape[-1], teacher_hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    ht2 = teacher_hidden.detach().reshape(-1, Ht)
    dev = hidden.device
    if response_mask is not None:
        mask = (response_mask.reshape(-1) != 0).float()
    elif labels is not None:
        mask = (labels.reshape(-1) != ignore_index).float()
    else:
        mask = torch.ones(h2.shape[0], dtype=torch.float32, device=dev)
    y = None if labels is None else labels.reshape(-1).to(torch.int64)
    count = mask.sum()
    # each scored token's coefficient c_t: its weight (selected: an unscored token's is not read) over the divisor
    coef = mask if token_weights is None else torch.where(mask != 0, token_weights.detach().reshape(-1).float(), 0.0)
    if agg == "seq-mean-token-mean":  # each token over its row's scored count times the row count
        rows = mask.view(hidden.shape[:2])
        norm = (rows.sum(1, keepdim=True).clamp(min=1) * rows.shape[0]).expand_as(rows).reshape(-1)
    elif global_tokens is None:
        norm = count.clamp(min=1)
    else:  # a count of 0 divides as 1; a tensor not read on the host (a GPU one) negative, NaN or infinite: NaN
        norm = global_divisor(global_tokens, h2)
    g_soft = coef * (w_soft / norm)
    # no hard term at weight 0: the labels are then the mask and the nll metric only (an invalid label gives a NaN
    # nll, not a NaN loss)
    g_hard = None if y is None or w_hard == 0.0 else coef * (w_hard / norm)
    teacher = Head(ht2, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), t_scale, t_cap)
    opts = DivergenceOptions(inv_t, divergence, b, int(ignore_index), y is not None, name)
    # the gradients in the forward only when autograd may ask for them (grad mode on, a student tensor requires it)
    single = rows_take_single_pass(single_pass, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    state = (scale, cap, teacher, mask, y, g_soft, g_hard, opts, single)
    with torch.autocast(dev.type, enabled=False):
        loss, div, ent, nll = divergence_loss(h2, weight, bias, state)
    n = count.clamp(min=1)
    metrics = {"divergence": div.sum() / n, "divergence_sum": div.sum(), "entropy": ent.sum() / n,
               "entropy_sum": ent.sum(), "num_tokens": count}
    if y is not None:
        metrics["nll"], metrics["nll_sum"] = nll.sum() / n, nll.sum()
    if token_weights is not None:
        metrics["weighted_divergence"] = (coef * div).sum() / n  # an unscored row has D = 0 and c = 0
    return _validate.nan_if(fractional, loss), {k: v.detach() for k, v in metrics.items()}
