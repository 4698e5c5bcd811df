"""Per-token log-probs, entropy and sum p^2 straight from hidden states (docs/math.md#token-statistics).

The ``[tokens x vocabulary]`` logits are never materialised: for 32k tokens and a
152k vocabulary they alone would take 20 GB in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend, _dtensor, _validate
from fastalign._options import check_choice
from fastalign.logprobs import TokenStats, shaped_stats
from fastalign.ops.linear_stats import linear_stats
from fastalign.ops.linear_triton import gpu_chunk_tokens
from fastalign.ops.single_pass import LogitPipeline, env_mib
from fastalign.ops.vocab_parallel import VocabParallelStats

#: Default bound on one chunk of fp32 logits, in MiB (``FASTALIGN_LINEAR_CHUNK_MIB`` overrides).
DEFAULT_CHUNK_MIB = 32.0
_MAX_VOCAB_CHUNK = 16384


def chunk_shape(n: int, v: int, backend: str, chunk_mib: Optional[float] = None) -> tuple[int, int]:
    """(tokens, vocabulary) of one chunk of logits holding at most ``chunk_mib`` MiB of fp32 (by default
    ``FASTALIGN_LINEAR_CHUNK_MIB``, a finite number > 0, else 32).

    The C++ path splits the vocabulary in near-equal pieces of at most 16384 ids;
    the Triton path tiles the vocabulary inside its kernels and chunks tokens only
    (its backward buffer of d(logits) is ``tokens x V``).
    """
    if chunk_mib is None:
        chunk_mib = env_mib("FASTALIGN_LINEAR_CHUNK_MIB", DEFAULT_CHUNK_MIB)
    elems = max(1, int(chunk_mib * (1 << 20) / 4))
    v = max(v, 1)
    if backend == "cpp":
        pieces = -(-v // min(v, _MAX_VOCAB_CHUNK, max(16, elems // 16)))
        vc = -(-v // pieces)
    else:
        vc = v
    nc = max(1, min(max(n, 1), elems // vc))
    return nc, vc


def check_logit_options(temperature: float = 1.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                        ignore_index: int = -100, grad_skip_threshold: float = 0.0, chunk=None,
                        backend: Optional[str] = None) -> tuple[float, float, float]:
    """Check the logit pipeline's options (a ``ValueError`` / ``TypeError`` naming the bad one);
    returns ``(1 / temperature, softcap or 0, logit_scale)`` as floats. The linear loss modules
    run it at construction, :func:`linear_logprobs` at each call."""
    _validate.index_value("ignore_index", ignore_index)
    inv_t = _validate.inverse_temperature(temperature)
    cap = 0.0 if softcap is None else _validate.fp32_number("softcap", _validate.positive("softcap", softcap))
    scale = _validate.fp32_number("logit_scale", _validate.finite_number("logit_scale", logit_scale))
    if not _validate.number("grad_skip_threshold", grad_skip_threshold) >= 0:
        raise ValueError(f"grad_skip_threshold must be >= 0, got {grad_skip_threshold}")
    if chunk is not None:
        if not isinstance(chunk, (tuple, list)) or len(chunk) != 2:
            raise ValueError(f"chunk must be a pair (tokens, vocab), got {chunk!r}")
        for size in chunk:
            _validate.at_least("chunk", size, 1)
    if backend is not None:
        check_choice("backend", backend, _backend.BACKENDS)
    return inv_t, cap, scale


#: linear_logprobs options that only the two passes have: name -> (its unset value, why it rules out the single pass)
_TWO_PASS_OPTIONS = {"chunk": (None, "chunk sets the two-pass path's chunks"),
                     "vocab_group": (None, "the vocabulary is split over a process group"),
                     "grad_skip_threshold": (0.0, "grad_skip_threshold applies to the two-pass backward")}


def two_pass_only(options: dict) -> Optional[str]:
    """Why :func:`linear_logprobs` keywords ``options`` rule out the single pass through the head: one of the
    options only the two passes have (``chunk``, ``vocab_group``, ``grad_skip_threshold``) is set. None when
    none is."""
    return next((why for name, (unset, why) in _TWO_PASS_OPTIONS.items() if options.get(name, unset) != unset),
                None)


def logit_pipeline(device: torch.device, options: dict) -> LogitPipeline:
    """The single pass's :class:`~fastalign.ops.single_pass.LogitPipeline` from :func:`linear_logprobs`
    keywords (``temperature``, ``softcap``, ``logit_scale``, ``ignore_index``, ``backend``; checked). The
    options only the two passes have (:func:`two_pass_only`) must be unset."""
    why = two_pass_only(options)
    if why:
        raise ValueError(f"the single pass through the head does not apply: {why}")
    ignore_index = options.get("ignore_index", -100)
    inv_t, cap, scale = check_logit_options(options.get("temperature", 1.0), options.get("softcap"),
                                            options.get("logit_scale", 1.0), ignore_index)
    return LogitPipeline(scale=scale, softcap=cap, inv_t=inv_t, ignore_index=int(ignore_index),
                         backend=_backend.resolve(device, options.get("backend")))


def check_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               names: tuple[str, str, str] = ("hidden", "weight", "bias"), vocab_shard: bool = False) -> None:
    """Check hidden states ``[..., H]``, an lm_head weight ``[V, H]`` and its bias ``[V]`` against each other (a
    ``ValueError`` / ``TypeError`` naming the bad one): float dtypes, the weight's dtype that of the hidden states,
    the shapes, a non-empty vocabulary and hidden size. ``names``: the caller's names of the three arguments
    (``("teacher_hidden", "teacher_weight", "teacher_bias")``, an adapter's own), used in the messages.
    ``vocab_shard``: the weight is one rank's shard of a vocabulary split over ranks, which may be empty (a
    vocabulary smaller than the group, split by ``torch.tensor_split`` or FSDP2's ``Shard(0)``)."""
    h_name, w_name, b_name = names
    _validate.floating(h_name, hidden, min_dim=1)
    _validate.floating(w_name, weight, dim=2)
    if bias is not None:
        _validate.floating(b_name, bias, dim=1)
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{w_name} must have shape (V, {H}) ({h_name}.shape[-1] = {H}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} must have the dtype of {h_name} ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{b_name} must have shape ({V},) ({w_name}.shape[0]), got {tuple(bias.shape)}")
    if V == 0 and not vocab_shard:
        raise ValueError(f"{w_name} must have a non-empty vocabulary (first) dimension")
    _validate.nonempty(h_name, hidden, -1, "hidden-size (last)")


def check_second_head(hidden: Tensor, weight: Tensor, other_hidden: Tensor, other_weight: Tensor,
                      other_bias: Optional[Tensor], names: tuple[str, str], other_names: tuple[str, str, str]) -> None:
    """A second head (a teacher's, a reference model's) against the first: :func:`check_head` of its own, the
    leading shape of ``hidden`` (its hidden size may differ) and the vocabulary of ``weight``. ``names``: the
    caller's names of ``hidden`` and ``weight``; ``other_names`` of the second head's three arguments."""
    check_head(other_hidden, other_weight, other_bias, names=other_names)
    (h_name, w_name), (oh_name, ow_name, _) = names, other_names
    lead = tuple(hidden.shape[:-1])
    if tuple(other_hidden.shape[:-1]) != lead:
        raise ValueError(f"{oh_name} must have shape {(*lead, other_hidden.shape[-1])} ({h_name}.shape[:-1] + its "
                         f"own hidden size), got {tuple(other_hidden.shape)}")
    if other_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"{ow_name} must have {w_name}'s vocabulary ({weight.shape[0]} rows), got "
                         f"{tuple(other_weight.shape)}")


def check_head_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                      low_rank=None, vocab_shard: bool = False) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Check hidden states, lm_head weight (bias, low-rank term) and labels against each other (a
    ``ValueError`` / ``TypeError`` naming the bad one): dtypes, devices and shapes as
    :func:`linear_logprobs` takes them (:func:`check_head`, then the labels and devices). Returns the
    low-rank term's ``(a, L)``, or ``(None, None)``."""
    check_head(hidden, weight, bias, vocab_shard=vocab_shard)
    _validate.integer("labels", labels)
    _validate.same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    _validate.shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    return _low_rank(low_rank, hidden, weight.shape[0])


def _low_rank(low_rank, hidden: Tensor, V: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(a, L)`` of ``low_rank`` after checking it against ``hidden`` and the vocabulary, or ``(None, None)``."""
    if low_rank is None:
        return None, None
    if not isinstance(low_rank, (tuple, list)) or len(low_rank) != 2:
        raise TypeError(f"low_rank must be a pair (a, L) of tensors, got {type(low_rank).__name__}")
    a, lw = low_rank
    _validate.floating("low_rank[0]", a, min_dim=1)
    _validate.floating("low_rank[1]", lw, dim=2)
    _validate.same_device(hidden=hidden, **{"low_rank[0]": a, "low_rank[1]": lw})
    for name, t in (("low_rank[0]", a), ("low_rank[1]", lw)):
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
    r = lw.shape[1]
    if tuple(a.shape) != (*hidden.shape[:-1], r):
        raise ValueError(f"low_rank[0] must have shape {(*hidden.shape[:-1], r)} (hidden.shape[:-1] + (r,), "
                         f"r = low_rank[1].shape[1]), got {tuple(a.shape)}")
    if lw.shape[0] != V:
        raise ValueError(f"low_rank[1] must have shape ({V}, r) (weight.shape[0] rows), got {tuple(lw.shape)}")
    if r == 0:
        raise ValueError("low_rank[1] must have a rank (second) dimension of at least 1")
    return a, lw


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    low_rank: Optional[tuple[Tensor, Tensor]] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = False,
    sum_p2: bool = False,
    argmax: bool = False,
    mean_logit: bool = False,
    vocab_group=None,
    backend: Optional[str] = None,
    chunk: Optional[tuple[int, int]] = None,
    grad_skip_threshold: float = 0.0,
) -> TokenStats:
    r"""Log-prob of each label (and entropy, :math:`\sum_j p_j^2`, argmax) from hidden states.

    Logit pipeline (docs/math.md#token-statistics), in this order::

        z = logit_scale * (hidden @ weight.T + a @ L.T + bias)   # a @ L.T: low_rank=(a, L), optional
        z = softcap * tanh(z / softcap)        # if softcap
        z = z / temperature

    then ``logprobs = z_y - lse``, ``entropy = lse - sum_j p_j z_j``,
    ``sum_p2 = exp(lse(2z) - 2 lse(z))``, ``argmax = argmax_j z_j``, with
    ``lse = log sum_j exp(z_j)`` kept online in fp32, and ``mean_logit = (1/V) sum_j z_j``
    of the logits before the temperature (a label-smoothing term
    ``-(1/V) sum_j log p_j = lse - mean_logit`` at temperature 1; d mean_logit / d z_j
    = 1/V joins the other statistics' d(logits) in the same backward, so it costs no
    extra pass over the vocabulary). Gradients flow to
    ``hidden``, ``weight`` and ``bias`` through the whole pipeline; backward
    recomputes the logits chunk by chunk, so peak extra memory is one chunk of
    logits (``FASTALIGN_LINEAR_CHUNK_MIB``, default 32 MiB) plus fp32 gradient
    accumulators, never ``tokens x V``. On the CPU a bf16/fp16 head is widened to fp32
    one chunk at a time, and its backward sums d(weight) in an fp32 ``V x H``
    accumulator (beside the chunk, whatever the token count).

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16.
        weight: ``[V, H]`` (the lm_head; may be tied to the input embedding), same dtype
            as ``hidden``. With ``vocab_group`` it is this rank's shard: the rows that follow
            the lower ranks' shards (shards may differ in size, as ``torch.chunk`` makes them).
            A DTensor (FSDP2, tensor parallel) is gathered (differentiably); with
            ``vocab_group``, a ``Shard(0)`` DTensor over that group is used as its local shard.
        labels: integer tensor shaped like ``hidden.shape[:-1]`` (global ids).
        bias: optional ``[V]`` (this rank's shard with ``vocab_group``).
        low_rank: optional ``(a, L)``, ``a [..., r]`` shaped like ``hidden`` but for its last
            dimension and ``L [V, r]`` (this rank's shard with ``vocab_group``), both in
            ``hidden``'s dtype: a low-rank term ``a @ L.T`` added to the logits, computed tile
            by tile like ``hidden @ weight.T`` (never the widened ``[V, H + r]`` weight).
            Gradients reach ``a`` and ``L``. A LoRA adapter on the lm_head is
            ``low_rank=(s * lora_A(dropout(hidden)), lora_B.weight)``; see
            :func:`fastalign.integrations.hf.causal_lm_logprobs`.
        temperature, softcap, logit_scale: the pipeline above (``softcap=None`` is off).
        ignore_index: rows with this label give 0 (log-prob, entropy, sum p^2, mean logit) and no gradient;
            their ``argmax`` is still the row's (a metric such as a token accuracy masks it).
            A label outside the vocabulary gives a NaN log-prob. On CPU tensors (``"cpp"``)
            ignored rows cost no vocabulary work (unless ``argmax``, defined on every row):
            only the labelled rows are gathered and sent through the lm_head.
        entropy, sum_p2, argmax, mean_logit: compute these too.
        vocab_group: a ``torch.distributed`` process group over which the vocabulary
            is sharded (tensor parallel); every rank passes the same ``hidden`` and
            ``labels`` and gets the full-vocabulary statistics. d(hidden) is summed
            over the group in backward. The all-reduce that places the shards also
            compares the ranks' numbers of rows, hidden sizes and low-rank ranks: for
            CPU tensors a mismatch raises a ``ValueError`` on every rank, instead of a
            hang or a crash in a later collective (a GPU's sizes are not read on the
            host, which would synchronise: there the ranks must agree). Under
            ``torch.compile`` every rank's shard must be non-empty.
        backend: ``"triton"``, ``"cpp"`` or ``"cuda"`` (CUDA tensors run the Triton
            kernels for ``"cuda"``); default from :func:`fastalign.use_backend`.
        chunk: ``(tokens, vocab)`` of one chunk of logits, overriding the memory budget.
        grad_skip_threshold: logit tiles whose every d(logit) is below this
            magnitude are left at zero in backward (the softmax gradient is sparse).
            0 (default) keeps every tile exactly. It applies where the backward runs
            the Triton kernels: every CUDA tensor (``"cuda"`` gives way to ``"triton"``
            for this op), and CPU tensors with ``backend="triton"`` under
            ``TRITON_INTERPRET=1``. The ``"cpp"`` backward (CPU tensors by default)
            keeps every tile: there the value is checked (>= 0) and has no effect,
            so one configuration runs on both devices (docs/backends.md). Set, it
            rules out the single pass through the head (:class:`LinearPolicyLoss`,
            :func:`separable_step`), on every backend.

    Returns:
        :class:`TokenStats` with fp32 tensors shaped like ``labels`` (argmax int64).
    """
    hidden, weight, bias, low_rank = _dtensor.head(hidden, weight, bias, low_rank, vocab_group)
    low_rank_hidden, low_rank_weight = check_head_inputs(hidden, weight, labels, bias, low_rank,
                                                         vocab_shard=vocab_group is not None)
    H = hidden.shape[-1]
    V = weight.shape[0]
    inv_t, cap, scale = check_logit_options(temperature, softcap, logit_scale, ignore_index, grad_skip_threshold,
                                            chunk)
    for switch, value in (("entropy", entropy), ("sum_p2", sum_p2), ("argmax", argmax), ("mean_logit", mean_logit)):
        _validate.boolean(switch, value)
    name = _backend.backend_for("linear_stats", hidden.device, backend)

    h2 = hidden.reshape(-1, H)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w2 = weight if weight.stride(-1) == 1 else weight.contiguous()
    b2 = None if bias is None else bias.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    if low_rank_hidden is not None:
        low_rank_hidden = low_rank_hidden.reshape(-1, low_rank_hidden.shape[-1]).contiguous()
        low_rank_weight = low_rank_weight.contiguous()
    N = h2.shape[0]
    if chunk is not None:
        nc, vc = int(chunk[0]), int(chunk[1])
    else:
        nc, vc = chunk_shape(N, V, name)
        if name == "triton" and h2.is_cuda:  # GPU chunks sized in GPU bytes of the input dtype
            nc = gpu_chunk_tokens(N, V, h2.element_size())

    if vocab_group is None:
        lp, ent, sp2, amax, _amax_val, _lse, mean, _log_c = linear_stats(
            h2, w2, b2, low_rank_hidden, low_rank_weight, flat_labels, scale, cap, inv_t, int(ignore_index),
            bool(entropy), bool(sum_p2), bool(argmax), name, nc, vc, float(grad_skip_threshold), bool(mean_logit))
    else:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("vocab_group needs torch.distributed to be initialized")
        lp, ent, sp2, amax, mean = VocabParallelStats.apply(
            h2, w2, b2, low_rank_hidden, low_rank_weight, flat_labels, vocab_group, scale, cap, inv_t,
            int(ignore_index), bool(entropy), bool(sum_p2), bool(argmax), name, nc, vc, float(grad_skip_threshold),
            bool(mean_logit))
    return shaped_stats(labels.shape, lp, ent, sp2, amax, entropy, sum_p2, argmax, mean, mean_logit)
