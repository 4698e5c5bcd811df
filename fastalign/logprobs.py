"""Per-token log-probs and entropy from logits (docs/math.md#token-statistics)."""
from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _backend, _validate
from fastalign.ops.token_stats import shares_memory, token_stats_call
from fastalign.ops.token_vocab_parallel import VocabParallelTokenStats
from fastalign.ops.vocab_pieces import check_labels


class TokenStats(NamedTuple):
    """Per-token statistics, fp32 (argmax int64), shaped like the labels.

    Fields not requested are ``None``. ``logprobs``, ``entropy``, ``sum_p2`` and
    ``mean_logit`` (the mean over the vocabulary of the logits before the temperature,
    from hidden states: :func:`fastalign.linear_logprobs`) are differentiable; ``argmax``
    is not.
    """

    logprobs: Tensor
    entropy: Optional[Tensor] = None
    sum_p2: Optional[Tensor] = None
    argmax: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None


def shaped_stats(shape, lp, ent, sp2, amax, entropy: bool, sum_p2: bool, argmax: bool, mean=None,
                 mean_logit: bool = False) -> TokenStats:
    """TokenStats from flat per-row outputs, shaped like the labels; unrequested fields None."""
    return TokenStats(
        lp.view(shape),
        ent.view(shape) if entropy else None,
        sp2.view(shape) if sum_p2 else None,
        amax.view(shape) if argmax else None,
        mean.view(shape) if mean_logit else None,
    )


def _as_rows(logits: Tensor) -> Tensor:
    """A ``[outer, inner, V]`` view of ``[..., V]`` logits without copying when the
    leading dims collapse into two strided dims (e.g. ``logits[:, :-1]``)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    if len(lead) == 0:
        return logits.view(1, 1, V)
    if len(lead) == 1:
        return logits.unsqueeze(0)
    # Collapse all but the innermost leading dim into `outer` when strides allow (sizes given: one may be 0).
    outer = math.prod(lead[:-1])
    try:
        return logits.view(outer, lead[-1], V)
    except RuntimeError:
        return logits.reshape(outer, lead[-1], V)


def _a_leaf_s_values(logits: Tensor) -> bool:
    """True for a leaf that requires grad, or a view of one: values whose own ``.grad`` d(logits) would be."""
    return logits.requires_grad and (logits.is_leaf or logits._base is not None and logits._base.is_leaf)


def overwritable(logits: Tensor) -> bool:
    """True where ``token_logprobs(..., inplace_backward=True)`` may write d(logits) over ``logits``: an
    intermediate of the graph (it requires grad and is neither a leaf nor a view of one, such as a model's logits)
    whose elements do not share memory. A module that owns the choice (as Liger's cross-entropy overwrites its
    input) asks this first, and allocates d(logits) otherwise."""
    return logits.requires_grad and not _a_leaf_s_values(logits) and not (logits.numel() and shares_memory(logits))


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = False,
    sum_p2: bool = False,
    argmax: bool = False,
    check: bool = False,
    inplace_backward: bool = False,
    backend: Optional[str] = None,
    vocab_group=None,
) -> TokenStats:
    r"""Log-prob of each label and, on request, entropy, :math:`\sum_j p_j^2` and argmax.

    With :math:`z = \text{logits} / T` and :math:`\mathrm{lse} = \log\sum_j e^{z_j}`:

    * ``logprobs = z_y - lse``
    * ``entropy  = lse - sum_j p_j z_j``
    * ``sum_p2   = exp(lse(2z) - 2 lse(z))``
    * ``argmax   = argmax_j z_j``

    computed in one pass over each row, in fp32 whatever the logits dtype,
    without materialising log-softmax. Backward writes d(logits) in one more
    pass and only for the outputs that receive a gradient.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16; the last dim must be
            contiguous (other strides are free, so ``logits[:, :-1]`` costs no copy).
        labels: integer tensor shaped like ``logits.shape[:-1]``.
        temperature: divides the logits before the softmax.
        ignore_index: rows with this label give 0 (log-prob, entropy, sum p^2) and a zero gradient; their
            ``argmax`` is still the row's (a metric such as a token accuracy masks it).
        entropy, sum_p2, argmax: compute these too (each costs nothing when off).
        check: raise ``ValueError`` if a label is outside ``[0, V)`` and not
            ``ignore_index``. This reads the labels on the host (a device sync; under
            ``torch.compile`` a graph break, which ``fullgraph=True`` refuses), so it is
            off by default; without it such a row gets a NaN log-prob and the logits
            are never indexed with the bad label.
        inplace_backward: backward overwrites the logits buffer with d(logits)
            instead of allocating a new one. Only for logits nothing else reads afterwards
            (not a leaf tensor that requires grad, nor a view of one: ``ValueError``). Given a slice
            of a model's logits (``logits[:, :-1]``), autograd's backward of the slice still
            allocates a gradient of the whole logits: have the model compute only the positions
            scored (``logits_to_keep``) to save that memory too.
        backend: ``"triton"``, ``"cpp"`` or ``"cuda"``; default from
            :func:`fastalign.use_backend` / ``FASTALIGN_BACKEND``.
        vocab_group: a ``torch.distributed`` process group over which the vocabulary is
            sharded (tensor parallel, Megatron's layout): ``logits`` are this rank's shard,
            the global ids that follow the shards of the lower ranks (shards may differ in
            size, or be empty); ``labels`` are global ids, the same on every rank. Every
            rank gets the statistics of the whole vocabulary (argmax a global id), and
            d(logits) of its own shard. The shards' statistics are merged with all-reduces
            (docs/math.md#vocabulary-parallel-logits, with their precision); backward needs no
            collective. With ``check``, labels are checked against the whole vocabulary. Under
            ``torch.compile`` every rank's shard must be non-empty.

    Returns:
        :class:`TokenStats` with fp32 tensors shaped like ``labels``.
    """
    _validate.floating("logits", logits, min_dim=1)
    _validate.integer("labels", labels)
    _validate.same_device(logits=logits, labels=labels)
    _validate.shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    _check_vocab_group(vocab_group)
    if logits.shape[-1] == 0 and vocab_group is None:
        raise ValueError("logits must have a non-empty vocabulary (last) dimension")
    inv_t = _validate.inverse_temperature(temperature)
    _validate.index_value("ignore_index", ignore_index)
    for name, switch in (("entropy", entropy), ("sum_p2", sum_p2), ("argmax", argmax), ("check", check),
                         ("inplace_backward", inplace_backward)):
        _validate.boolean(name, switch)
    if inplace_backward and _a_leaf_s_values(logits):
        # backward would write d(logits) over the values of a tensor that is its own gradient's target
        raise ValueError("inplace_backward=True overwrites the logits in backward; logits is a leaf that requires "
                         "grad (or a view of one), whose values would become its own .grad: pass logits from "
                         "the model's forward, or inplace_backward=False")
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    if check and vocab_group is None:  # with vocab_group: against the whole vocabulary, in the op
        check_labels(flat_labels, logits.shape[-1], ignore_index)
    rows = _as_rows(logits)
    name = _backend.resolve(logits.device, backend)
    if vocab_group is not None:
        lp, ent, sp2, amax = VocabParallelTokenStats.apply(
            rows, flat_labels, vocab_group, inv_t, int(ignore_index), bool(entropy), bool(sum_p2), bool(argmax), name,
            bool(inplace_backward), bool(check))
    else:
        lp, ent, sp2, amax, _lse, _log_c = token_stats_call(
            rows, flat_labels, inv_t, int(ignore_index), bool(entropy), bool(sum_p2), bool(argmax), name,
            bool(inplace_backward))
    return shaped_stats(labels.shape, lp, ent, sp2, amax, entropy, sum_p2, argmax)


def _check_vocab_group(vocab_group) -> None:
    """With a ``vocab_group``: a process group of an initialised ``torch.distributed`` that has this process."""
    if vocab_group is None:
        return
    _validate.process_group("vocab_group", vocab_group)
    dist = torch.distributed
    if not dist.is_initialized():
        raise ValueError("vocab_group needs torch.distributed to be initialized")
    if dist.get_rank(vocab_group) < 0:
        raise ValueError("vocab_group must be a process group this process is a member of")
