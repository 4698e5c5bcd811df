r"""A loss separable over items, from hidden states and the LM head, for a trainer's own loss.

:func:`separable_step` takes a caller's loss of per-token log-probs (and :math:`\sum_j p_j^2`) of a
batch and goes through the head in one of two ways, same loss and gradients:

* **single pass** (when gradients are needed, an item's logits fit the block budget, on a GPU
  for a bf16 or fp32 head, with an fp32 head on the CPU): blocks of whole items go through the head once
  (:mod:`fastalign.ops.single_pass`); a block's share is the loss with the other items' statistics
  held constant, which has the loss's gradient with respect to the block's statistics when the loss
  is separable over items: three matrix products instead of four;
* **two passes**: :func:`fastalign.linear_logprobs` (its backward recomputes the logits), then the loss.

An item (``items``) is a row (a sequence, an unpaired response), a pair of rows ``i`` and ``N/2 + i``
(a chosen and a rejected response), a triple of rows ``i``, ``N/3 + i`` and ``2N/3 + i`` (a chosen, a
rejected and a gold response) or a token (a loss separable over tokens: blocks of any tokens).
Entropies, argmax and mean logits for the caller's metrics come from the same pass. The TRL drop-ins use it for
the preference trainers (pairs, TPO's triples, KTO's responses) and SFT (tokens).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastalign import _dtensor, _validate
from fastalign._options import AUTO_OR_BOOL, check_choice
from fastalign.linear import check_head_inputs, linear_logprobs, logit_pipeline, two_pass_only
from fastalign.ops._launch import eager
from fastalign.ops.linear_cpu import labelled_rows, scatter_labelled
from fastalign.ops.single_pass import UNLABELLED, Side, by_default, refuse_traced, single_pass_loss, token_items

__all__ = ["ITEMS", "StepLoss", "separable_step"]

#: The statistics :func:`separable_step` keeps for the caller's metrics beside the log-probs.
EXTRAS = ("entropy", "argmax", "mean_logit")
#: What an item of :func:`separable_step` is: a row, a pair of rows (chosen first), a triple of rows (chosen,
#: rejected, gold), or a token.
ITEMS = ("rows", "pairs", "triples", "tokens")
#: The rows of one item that lie in the batch's successive parts (its sides), per item kind but tokens.
_SIDES = {"rows": 1, "pairs": 2, "triples": 3}

#: loss(logprobs [N, T], aux [N, T] or None) -> (loss, metrics) of a batch; aux: sum_p2 or mean_logit, when asked
StepLoss = Callable[[Tensor, Optional[Tensor]], Tuple[Tensor, dict]]


def separable_step(hidden: Tensor, weight: Tensor, labels: Tensor, loss: StepLoss, *,
                   bias: Optional[Tensor] = None, low_rank=None, items: str = "rows", sum_p2: bool = False,
                   mean_logit: bool = False, extras: Sequence[str] = (), single_pass="auto",
                   logit: Optional[dict] = None) -> Tuple[Tensor, dict, dict]:
    r"""``(loss, metrics, stats)``: ``loss(lp, aux)`` of the token statistics of ``hidden`` through the head.

    ``hidden [N, T, H]`` holds N rows; ``items`` (one of :data:`ITEMS`) says what an item is: each row,
    each pair of rows ``i`` and ``N/2 + i`` (the chosen rows first), each triple of rows ``i``, ``N/3 + i``
    and ``2N/3 + i``, or each token. ``labels [N, T]`` are
    aligned with the
    positions (``ignore_index`` where unscored), ``weight``, ``bias`` and ``low_rank = (a [N, T, r],
    L [V, r])`` the head, ``logit`` the logit options of :func:`fastalign.linear_logprobs`
    (``temperature``, ``softcap``, ``logit_scale``, ``ignore_index``, ``backend``). ``loss`` gets
    ``lp`` (differentiable) and ``aux``: with ``sum_p2=True`` :math:`\sum_j p_j^2` (not differentiable), with
    ``mean_logit=True`` the mean logit :math:`\frac{1}{V}\sum_j z_j` before the temperature (differentiable,
    from the same pass: its gradient joins the log-probs' in one backward; a softcapped head's label smoothing),
    else None; all ``[N, T]``, 0 at unscored positions (``sum_p2``: 1). One of the two at most. ``loss`` returns
    ``(value, metrics)``: the loss tensor and a dict of metrics (``{}`` for none); anything else is a
    ``TypeError`` naming ``loss``.

    ``loss`` must be separable over the items: a sum of per-item terms plus terms linear in ``lp``
    with weights fixed by the labels (a token-mean NLL over the batch);
    :func:`fastalign.linear_preference.coupling` says which preference losses are not. Then the
    single pass takes blocks of whole items through the head once (module docstring).
    ``single_pass``: ``"auto"`` takes it where :func:`~fastalign.ops.single_pass.by_default` says so
    (an item's logits within the block budget among the conditions) and no option of the two passes only
    (``vocab_group``, ``chunk``, ``grad_skip_threshold``) is set, True asks for it, False never.

    ``stats``: name -> detached ``[N, T]`` tensor of ``"logprobs"``, ``"sum_p2"`` (when asked) and the
    ``extras`` (for metrics, no gradient: ``"entropy"``, ``"argmax"`` and ``"mean_logit"``, the mean over the
    vocabulary of the head's logits before the temperature, :func:`fastalign.linear_mean_logits`), all from the
    same pass; an unscored position holds 0 (``sum_p2``: 1, ``argmax``: -1)."""
    logit = dict(logit or {})
    check_choice("items", items, ITEMS)
    group = logit.get("vocab_group")
    hidden, weight, bias, low_rank = _dtensor.head(hidden, weight, bias, low_rank, group)
    a, lw = check_head_inputs(hidden, weight, labels, bias, low_rank, vocab_shard=group is not None)
    n_sides = _SIDES.get(items, 1)
    if hidden.dim() != 3 or hidden.shape[0] % n_sides:
        whole = {2: " with N even (chosen rows first)", 3: " with N a multiple of 3 (chosen, rejected, gold rows)"}
        raise ValueError(f"hidden must be [N, T, H]{whole.get(n_sides, '')}, got shape {tuple(hidden.shape)}")
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise ValueError(f"extras must be among {EXTRAS}, got {sorted(unknown)}")
    check_choice("single_pass", single_pass, AUTO_OR_BOOL)
    _validate.boolean("sum_p2", sum_p2)
    _validate.boolean("mean_logit", mean_logit)
    if sum_p2 and mean_logit:
        raise ValueError("sum_p2 and mean_logit are both the loss's second argument: ask for one of them")
    aux = "sum_p2" if sum_p2 else "mean_logit" if mean_logit else None
    loss = _returning_a_pair(loss)
    if single_pass == "auto" and two_pass_only(logit):
        single_pass = False  # a vocabulary split over ranks, the two-pass chunks or tile skipping
    refuse_traced(single_pass, hidden, weight, bias, a, lw)
    with torch.autocast(hidden.device.type, enabled=False):  # the head runs in its operands' dtype
        item_rows = 1 if items == "tokens" else n_sides * hidden.shape[1]
        if not (single_pass is True or (single_pass == "auto" and by_default(weight, hidden, bias, a, lw,
                                                                             item_rows=item_rows))):
            return _two_passes(hidden, weight, bias, a, lw, labels, loss, aux, extras, logit)
        if items != "tokens":
            return _single_pass(hidden, weight, bias, a, lw, labels, loss, n_sides, aux, extras, logit)
        shape = labels.shape  # every position its own item: [N * T, 1, ...], the loss on [N, T] grids

        def per_token(lp, aux_stat):
            return loss(lp.view(shape), None if aux_stat is None else aux_stat.view(shape))
        value, metrics, stats = _single_pass(token_items(hidden), weight, bias, token_items(a), lw,
                                             token_items(labels), per_token, 1, aux, extras, logit)
        return value, metrics, {name: t.view(shape) for name, t in stats.items()}


def _returning_a_pair(loss: StepLoss) -> StepLoss:
    """``loss``, checked at each call to return ``(value, metrics)`` (a plain tensor failed deep inside the step with
    an IndexError or a TypeError naming nothing)."""
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(lp, aux) -> (value, metrics), got {type(loss).__name__}")

    def checked(lp, aux):
        out = loss(lp, aux)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and isinstance(out[1], dict)):
            got = type(out).__name__ if not isinstance(out, tuple) else f"a tuple of {len(out)}"
            raise TypeError(f"loss(lp, aux) must return (value, metrics), a tensor and a dict, got {got}")
        return out
    return checked


def _two_passes(hidden, weight, bias, a, lw, labels, loss: StepLoss, aux: Optional[str], extras, logit: dict):
    """:func:`separable_step` by :func:`fastalign.linear_logprobs` (its backward recomputes the logits); on
    the CPU, in eager mode, only the scored rows go through the vocabulary (their argmax included; traced, every
    row: the count of scored rows is not read on the host)."""
    ignore_index = int(logit.get("ignore_index", -100))
    rows = labelled_rows(labels.reshape(-1), ignore_index) if hidden.device.type == "cpu" and eager(labels) else None
    h, y, low = hidden, labels, None if a is None else (a, lw)
    if rows is not None:
        h, y = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), labels.reshape(-1).index_select(0, rows)
        low = None if a is None else (a.reshape(-1, a.shape[-1]).index_select(0, rows), lw)
    st = linear_logprobs(h, weight, y, bias=bias, low_rank=low, sum_p2=aux == "sum_p2", entropy="entropy" in extras,
                         argmax="argmax" in extras, mean_logit=aux == "mean_logit" or "mean_logit" in extras, **logit)
    scored = labels != ignore_index
    stats = {}
    graph = ("logprobs", "mean_logit") if aux == "mean_logit" else ("logprobs",)  # those the loss differentiates
    for name in dict.fromkeys(("logprobs", *([aux] if aux else []), *extras)):
        t, fill = getattr(st, name), UNLABELLED[name]
        t = t.view(labels.shape) if rows is None else scatter_labelled(t, rows, labels, fill)
        stats[name] = torch.where(scored, t if name in graph else t.detach(), fill)
    value, metrics = loss(stats["logprobs"], stats.get(aux))
    return value, metrics, {name: t.detach() for name, t in stats.items()}


def _single_pass(hidden, weight, bias, a, lw, labels, loss: StepLoss, n_sides: int, aux: Optional[str], extras,
                 logit: dict):
    """:func:`separable_step` by the single pass over ``n_sides`` sides: the batch's chosen and rejected halves
    (and gold third) are its sides (one side for rows and tokens); a block's share is ``loss`` of the whole
    batch with the other items' statistics held at their unscored values (log-prob and mean logit 0, ``sum_p2``
    1: constants, so its gradient with respect to the block's statistics is the loss's)."""
    pipe = logit_pipeline(hidden.device, logit)
    parts = [t.chunk(n_sides) if t is not None else [None] * n_sides for t in (hidden, labels, a)]
    # the C++ path finds the labelled rows on the host (free on the CPU); the Triton paths on the device
    sides = [Side(h, y, labelled_rows(y.reshape(-1), pipe.ignore_index) if pipe.backend == "cpp" else None, low)
             for h, y, low in zip(*parts)]
    held = {name: torch.full(labels.shape, UNLABELLED[name], dtype=torch.float32, device=labels.device)
            for name in ("logprobs", *([aux] if aux else []))}

    def whole(blocks, rest, items: slice):
        """Every side's rows, the block's ``items`` from ``blocks`` and the rest from ``rest``."""
        return torch.cat([torch.cat([r[:items.start], blk, r[items.stop:]])
                          for r, blk in zip(rest.chunk(n_sides), blocks)])

    def share(lps, auxs, items: slice):
        return loss(whole(lps, held["logprobs"], items), whole(auxs, held[aux], items) if aux else None)[0]

    def total(lps, auxs):
        return loss(torch.cat(lps), torch.cat(auxs) if aux else None)

    value, metrics, stats = single_pass_loss(sides, weight, bias, share, total, pipe=pipe, aux=aux, extras=extras,
                                             low_rank_weight=lw)
    return value, metrics, {name: torch.cat(per_side) for name, per_side in stats.items()}
