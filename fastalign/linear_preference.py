"""Preference losses straight from hidden states and the LM head: never the ``[N, V]`` logits.

This module holds the batch layouts (concatenated, separate, packed), the choice of path
(:class:`PathPolicy`) and the loss of a set of pairs from their token log-probs. Two ways
through the vocabulary, same loss and gradients:

* **two passes** (for every loss; the default without gradients, and for a bf16/fp16 head on
  the CPU): token log-probs from :func:`fastalign.linear_logprobs` (forward: statistics only;
  backward: logits recomputed chunk by chunk), then :func:`sequence_logprobs` and
  :func:`preference_loss`.
* **single pass** (default for the pair-separable losses when gradients are needed, on a GPU
  for a bf16 or fp32 head, with an fp32 head on the CPU): blocks of whole pairs
  go through the head once, their share of the loss giving d loss / d lp at once
  (:mod:`fastalign.ops.single_pass`, which calls back into this module's loss). The
  block's logits are the memory cost (``FASTALIGN_BLOCK_MIB``, 1024 MiB on a GPU and 64 MiB
  on the CPU by default); ``"auto"`` takes it only when one pair's logits fit that budget.

A loss is pair-separable when ``loss = (1/B) Σ_i ℓ_i + c·NLL`` with ``ℓ_i`` a function of
pair ``i`` only: every loss type except ``aot``/``aot_unpaired`` (sorted across the batch),
``kto`` without ``kto_kl`` (the batch's mean KL), and, with WPO weights, the losses that
carry the chosen NLL in each pair's term (sft, cpo, orpo: ``mean_i(ω_i) · NLL``). The
chosen NLL is linear in the token log-probs, so each block adds its share.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from fastalign import _backend, _dtensor, _validate
from fastalign._deprecate import renamed
from fastalign._options import AUTO_OR_BOOL, FixedOptions, check_choice, own_copy
from fastalign.linear import check_head, check_logit_options, linear_logprobs, logit_pipeline
from fastalign.ops._launch import eager
from fastalign.ops.linear_cpu import labelled_rows, scatter_labelled
from fastalign.ops.single_pass import (DEFAULT_BLOCK_MIB, LogitPipeline, Side, block_logprobs_of, by_default,
                                       differentiated, refuse_traced, single_pass_loss)
from fastalign.preference import LOSSES, OPTION_NAMES, check_config, check_pair_weights, preference_loss, wpo_weights
from fastalign.sequence import SequenceLogprobs, check_ld_alpha, sequence_logprobs

#: The block budget of the single pass, in MiB (its former name).
DEFAULT_PAIR_BLOCK_MIB = DEFAULT_BLOCK_MIB

__all__ = ["DEFAULT_PAIR_BLOCK_MIB", "LinearPreferenceLoss", "PathPolicy", "coupling"]

_COUPLED = ("aot", "aot_unpaired")  # sorted across the batch
#: the keywords of LinearPreferenceLoss besides the preference_loss options
_OWN_OPTIONS = ("ignore_index", "temperature", "softcap", "logit_scale", "ld_alpha", "use_weighting", "wpo_cap",
                "vocab_group", "backend", "compact", "single_pass")


def _pair(name: str, x):
    """(chosen, rejected) from a tuple/list, or None for a single concatenated tensor."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} given separately must be a (chosen, rejected) pair, got {len(x)} items")
        return tuple(x)
    return None


def _halves(x, B):
    return (None, None) if x is None else (x[:B], x[B:])


def coupling(loss_types, use_weighting: bool = False) -> Optional[str]:
    """Why a preference loss of ``loss_types`` is not separable over its pairs (None when it is):
    aot / aot_unpaired sort the batch; WPO weights multiply a batch-wide chosen NLL (sft, cpo, orpo)."""
    coupled = [t for t in loss_types if t in _COUPLED]
    if coupled:
        return f"loss {coupled[0]!r} couples the pairs of a batch"
    if use_weighting:
        with_nll = [t for t in loss_types if LOSSES[t].nll]
        if with_nll:
            return f"WPO pair weights multiply the chosen NLL in {with_nll[0]!r}, a batch-wide term"
    return None


class PathPolicy:
    """Which way a call goes through the vocabulary: whether the labelled rows are compacted
    first, and whether the single pass runs (``compact`` / ``single_pass`` of
    :class:`LinearPreferenceLoss`: ``"auto"``, True or False)."""

    def __init__(self, compact, single_pass, loss_types, vocab_group, use_weighting: bool):
        check_choice("compact", compact, AUTO_OR_BOOL)
        check_choice("single_pass", single_pass, AUTO_OR_BOOL)
        self.compact, self.single_pass = compact, single_pass
        self.loss_types, self.vocab_group, self.use_weighting = tuple(loss_types), vocab_group, use_weighting
        if single_pass is True:
            why = self.blocker(per_call=False)
            if why:
                raise ValueError(f"single_pass=True does not apply: {why}")

    def blocker(self, kto_kl=None, per_call: bool = True, token_weights=()) -> Optional[str]:
        """Why the single pass cannot run (None when it can); ``per_call``: include what depends on the call.
        ``token_weights``: each side's token weights (or None); the single pass reads them as constants, so
        it does not run when autograd may ask for their gradient."""
        why = coupling(self.loss_types, self.use_weighting)
        if why:
            return why
        if self.vocab_group is not None:
            return "the vocabulary is split over a process group"
        if per_call and "kto" in self.loss_types and kto_kl is None:
            return "kto takes the batch's mean KL unless kto_kl is given"
        if per_call and differentiated(*token_weights):
            return "token_weights require grad (the single pass differentiates the hidden states and the head only)"
        return None

    def single_passes(self, kto_kl, weight: Tensor, chosen: Tensor, rejected: Tensor, *inputs,
                      token_weights=()) -> bool:
        """``"auto"``: where :func:`~fastalign.ops.single_pass.by_default` says so (gradients of ``weight``
        or the inputs needed, eager, a pair's logits within the block budget, paying off), when the loss is
        pair-separable and no ``token_weights`` (each side's, or None) need a gradient. ``chosen``,
        ``rejected``: the hidden states of each side ``[B, T_s, H]``."""
        if self.single_pass is False:
            return False
        why = self.blocker(kto_kl, token_weights=token_weights)
        if self.single_pass is True:
            if why:
                raise ValueError(f"single_pass=True does not apply: {why}")
            refuse_traced(True, weight, chosen, rejected, *(t for t in inputs if isinstance(t, Tensor)))
            return differentiated(weight, chosen, rejected, *inputs)
        return why is None and by_default(weight, chosen, rejected, *inputs,
                                          item_rows=chosen.shape[-2] + rejected.shape[-2])

    def compacts(self, hidden: Tensor, single: bool, backend: str) -> bool:
        """``"auto"``: CPU tensors outside ``torch.compile`` (finding the labelled rows reads their
        count back: free on the CPU, a sync on a GPU). The rows are compacted once: the two-pass
        path on the C++ kernels compacts them itself, so it is left to do so."""
        if self.compact == "auto":
            return (hidden.device.type == "cpu" and eager(hidden)
                    and (single or backend != "cpp"))
        return bool(self.compact)


class LinearPreferenceLoss(FixedOptions, nn.Module):
    r"""Preference loss straight from the last hidden states and the LM-head weight.

    ``forward(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, ref_chosen_logprobs=None, ref_rejected_logprobs=None, token_weights=None,
    cu_seqlens=None, kto_kl=None) -> (loss, metrics)``.

    Batch layouts:

    * concatenated — ``hidden`` ``[2B, T, H]``, ``labels`` ``[2B, T]``: rows ``0..B-1`` chosen,
      ``B..2B-1`` rejected;
    * separate — ``hidden=(chosen [B, Tc, H], rejected [B, Tr, H])``, ``labels`` likewise;
    * packed — ``hidden`` ``[N, H]``, ``labels`` ``[N]``, ``cu_seqlens`` ``[2B+1]``: the first
      B sequences chosen (``cu_seqlens = [0]``: no pairs, a loss of 0 as in the other layouts).

    ``labels`` are aligned with the hidden positions (no shift inside): the label at
    position ``t`` is the token whose log-prob ``hidden[t]`` predicts; ``ignore_index``
    marks the prompt and the padding. Token log-probs follow the logit pipeline
    ``logit_scale``, ``softcap``, ``temperature`` of docs/math.md#token-statistics, are summed per
    sequence by :func:`sequence_logprobs` (with ``token_weights`` and LD-DPO ``ld_alpha``), then go
    through :func:`preference_loss`.

    The reference is either hidden states (``ref_hidden`` with the head ``ref_weight``/``ref_bias``,
    defaulting to the policy head; a ``ref_weight`` is a head of its own, so without ``ref_bias``
    it has no bias, the policy's ``bias`` being the policy head's) evaluated under ``torch.no_grad`` — never
    differentiated — or precomputed ``ref_chosen_logprobs``/``ref_rejected_logprobs``; without
    either the loss is reference-free (``ref_weight``/``ref_bias`` without ``ref_hidden`` are an
    error). ``use_weighting=True`` (a bool) asks the kernel for
    :math:`\sum_j p_j^2` and applies WPO pair weights, capped at ``wpo_cap`` (1 by default;
    ``None`` leaves them uncapped, as TRL 1.16). The chosen NLL (sft, cpo, orpo,
    ``rpo_alpha``) is the token mean over the chosen responses.

    ``compact``: run only the labelled positions (not the prompt, not the padding) through
    the vocabulary. Finding them reads their count back to the host, which is free for CPU
    tensors and a device sync on a GPU, so ``"auto"`` (default) compacts CPU tensors outside
    ``torch.compile`` and leaves GPU batches whole; ``True`` / ``False`` force it. The rows are
    compacted once: on the C++ kernels the two-pass path leaves it to :func:`linear_logprobs`,
    which sends only the labelled rows through the vocabulary itself.

    The whole configuration is checked at construction (:mod:`fastalign._options`): an unknown
    option is a ``TypeError`` with the closest valid name, a bad value a ``ValueError`` naming it.

    ``single_pass``: gradients computed while a block of whole pairs' logits is in memory
    (see the module docstring). ``"auto"`` (default) uses it in eager mode when gradients are
    needed, on a GPU for a bf16 or fp32 head or with an fp32 head on the CPU, when the loss is
    pair-separable, the batch is padded (not packed, no ``vocab_group``) and ``token_weights`` need no gradient (the
    single pass differentiates the hidden states and the head only; learned token weights take
    the two passes); ``True`` asks for it (an error where it does not apply); ``False`` never.
    """

    def __init__(self, loss_type="sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, *,
                 ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                 logit_scale: float = 1.0, ld_alpha: Optional[float] = None, use_weighting: bool = False,
                 wpo_cap: Optional[float] = 1.0, vocab_group=None, backend: Optional[str] = None, compact="auto",
                 single_pass="auto",
                 **options):
        super().__init__()
        # the whole configuration is checked here, not at the first call
        self.loss_types = check_config("LinearPreferenceLoss", loss_type, beta, label_smoothing, options,
                                       own=_OWN_OPTIONS)
        check_logit_options(temperature, softcap, logit_scale, ignore_index, backend=backend)
        _validate.process_group("vocab_group", vocab_group)
        _validate.boolean("use_weighting", use_weighting)
        check_ld_alpha(ld_alpha)
        if wpo_cap is not None:
            _validate.positive("wpo_cap", wpo_cap)
        if use_weighting:
            check_pair_weights(self.loss_types)
        if wpo_cap != 1.0 and not use_weighting:
            raise ValueError("wpo_cap applies to the WPO weights: set use_weighting=True or leave wpo_cap at 1")
        self.config = own_copy(dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, **options))
        self.ignore_index = int(ignore_index)
        self.ld_alpha = ld_alpha
        self.use_weighting = use_weighting
        self.wpo_cap = wpo_cap
        self.kernel_options = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                                   ignore_index=self.ignore_index, vocab_group=vocab_group, backend=backend)
        self.paths = PathPolicy(compact, single_pass, self.loss_types, vocab_group, self.use_weighting)
        # the configuration, checked as a whole here: an assignment afterwards raises, of what is held and of every
        # option (held in config, kernel_options or paths)
        arguments = [name for name, p in inspect.signature(LinearPreferenceLoss.__init__).parameters.items()
                     if name != "self" and p.kind is not p.VAR_KEYWORD]  # the named ones; **options: OPTION_NAMES
        self._fix_options((*OPTION_NAMES, *arguments, "loss_types", "config", "kernel_options", "paths"))


    def extra_repr(self) -> str:
        """The loss configuration, then every other constructor option that is not at its default."""
        defaults = {k: p.default for k, p in inspect.signature(LinearPreferenceLoss.__init__).parameters.items()}
        others = dict(self.kernel_options, ld_alpha=self.ld_alpha, use_weighting=self.use_weighting,
                      wpo_cap=self.wpo_cap, compact=self.paths.compact, single_pass=self.paths.single_pass)
        items = dict(self.config, **{k: v for k, v in others.items() if v != defaults[k]})
        return ", ".join(f"{k}={v!r}" for k, v in items.items())

    # ------------------------------------------------------------------------------------ pieces

    def _pipeline(self, device) -> LogitPipeline:
        """The logit pipeline and kernel family of the single pass's blocks."""
        return logit_pipeline(device, self.kernel_options)

    def _rows(self, hidden, labels, single: bool):
        """Flat indices of the labelled positions when this call compacts them, else None (also when
        every position is labelled)."""
        if not self.paths.compacts(hidden, single, _backend.resolve(hidden.device, self.kernel_options["backend"])):
            return None
        return labelled_rows(labels.reshape(-1), self.ignore_index)

    def _token_logprobs(self, hidden, weight, labels, bias, sum_p2: bool, rows: Optional[Tensor] = None,
                        blocks: bool = False):
        """Token log-probs (and sum p^2) shaped like ``labels``. With ``rows`` (flat indices of the
        labelled positions) only those rows go through the vocabulary; the rest are 0.
        ``blocks``: no gradient, through the single pass's blocks (one matrix product each)."""
        H = hidden.shape[-1]
        h, y = hidden.reshape(-1, H), labels.reshape(-1)
        if rows is not None:
            h, y = h.index_select(0, rows), y.index_select(0, rows)
        if blocks:
            lp, sp2 = block_logprobs_of(h, weight, bias, y, self._pipeline(h.device)), None
        else:
            st = linear_logprobs(h, weight, y, bias=bias, sum_p2=sum_p2, **self.kernel_options)
            lp, sp2 = st.logprobs, st.sum_p2
        if rows is None:
            return lp.view(labels.shape), None if sp2 is None else sp2.view(labels.shape)
        sp2 = None if sp2 is None else scatter_labelled(sp2.detach(), rows, labels, 1.0)
        return scatter_labelled(lp, rows, labels, 0.0), sp2

    def _sums(self, lpc, lpr, yc, yr, twc=None, twr=None, spc=None, spr=None):
        """Per-sequence sums of both sides (LD-DPO public length ``min(|yc|, |yr|)`` per pair)."""
        ld_len = None
        if self.ld_alpha is not None:
            ld_len = torch.minimum((yc != self.ignore_index).sum(-1), (yr != self.ignore_index).sum(-1))
        kw = dict(ignore_index=self.ignore_index, ld_alpha=self.ld_alpha, ld_lengths=ld_len)
        return (sequence_logprobs(lpc, labels=yc, token_weights=twc, sum_p2=spc, **kw),
                sequence_logprobs(lpr, labels=yr, token_weights=twr, sum_p2=spr, **kw))

    def _pair_loss(self, lpc, lpr, spc, spr, yc, yr, twc, twr, ref_c, ref_r, kto_kl, nll_count=None, pairs=None):
        """preference_loss of the pairs whose token log-probs are ``lpc [b, Tc]``, ``lpr [b, Tr]``."""
        sc, sr = self._sums(lpc, lpr, yc, yr, twc, twr, spc, spr)
        plain = sc.sum if twc is None and self.ld_alpha is None else \
            sequence_logprobs(lpc, labels=yc, ignore_index=self.ignore_index).sum
        return self._loss(sc, sr, plain, ref_c, ref_r, kto_kl, nll_count, pairs)

    def _loss(self, sc, sr, plain_c, ref_c, ref_r, kto_kl, nll_count=None, pairs: Optional[slice] = None):
        """preference_loss from per-sequence sums of both sides; the chosen NLL is
        ``-Σ plain_c / nll_count`` (default: these chosen responses' token count). ``pairs``: the batch's
        pairs these are (a per-pair ``bco_delta`` is sliced to them), all of them when None."""
        count = sc.count.sum().clamp(min=1.0) if nll_count is None else nll_count
        weights = wpo_weights(sc.wpo, sr.wpo, self.wpo_cap) if self.use_weighting else None
        config = self.config
        delta = config.get("bco_delta")
        if pairs is not None and isinstance(delta, Tensor) and delta.dim() == 1:
            config = dict(config, bco_delta=delta[pairs])
        return preference_loss(sc.sum, sr.sum, ref_c, ref_r, chosen_lengths=sc.count, rejected_lengths=sr.count,
                               chosen_nll=-plain_c.sum() / count, pair_weights=weights, kto_kl=kto_kl, **config)

    @staticmethod
    def _check(name, hidden, labels, weight, bias, vocab_shard: bool) -> None:
        """Hidden states ``name`` and their labels against the head (:func:`~fastalign.linear.check_head`, as
        :func:`~fastalign.linear.linear_logprobs` checks it: on every path, not the two passes only)."""
        _validate.floating(name, hidden, min_dim=2)
        check_head(hidden, weight, bias, names=(name, "weight", "bias"), vocab_shard=vocab_shard)
        _validate.integer(f"{name} labels", labels)
        _validate.shape(f"{name} labels", labels, hidden.shape[:-1], f"{name}.shape[:-1]")

    @staticmethod
    def _check_ref(name, ref, like, like_name, weight, bias, ref_weight, ref_bias, vocab_shard: bool) -> None:
        """Reference hidden states ``name`` against the policy's ``like`` (same shape) and against the reference
        head: ``ref_weight`` / ``ref_bias``, or the policy's ``weight`` / ``bias`` when ``ref_weight`` is None.
        ``vocab_shard``: the heads are this rank's shards of a vocabulary split over ``vocab_group`` (maybe empty)."""
        _validate.floating(name, ref, min_dim=2)
        _validate.shape(name, ref, like.shape, f"like {like_name}")
        _validate.same_device(**{like_name: like, name: ref})
        own = ref_weight is not None
        head_w, head_b = (ref_weight, ref_bias) if own else (weight, bias if ref_bias is None else ref_bias)
        names = (name, "ref_weight" if own else "weight", "ref_bias" if ref_bias is not None else "bias")
        check_head(ref, head_w, head_b, names=names, vocab_shard=vocab_shard)
        _validate.same_device(**dict(zip(names, (ref, head_w, head_b))))

    # ------------------------------------------------------------------------------------ forward

    @renamed(ref_chosen_logps="ref_chosen_logprobs", ref_rejected_logps="ref_rejected_logprobs")
    def forward(self, hidden, weight: Tensor, labels, *, bias: Optional[Tensor] = None, ref_hidden=None,
                ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                ref_chosen_logprobs: Optional[Tensor] = None, ref_rejected_logprobs: Optional[Tensor] = None,
                token_weights=None, cu_seqlens: Optional[Tensor] = None,
                kto_kl: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        group = self.kernel_options["vocab_group"]
        split = _pair("hidden", hidden)
        dtype = getattr((split or (hidden,))[0], "dtype", None)  # a DTensor head takes it (FSDP2's cast)
        _, weight, bias, _ = _dtensor.head(None, weight, bias, vocab_group=group, dtype=dtype)
        _, ref_weight, ref_bias, _ = _dtensor.head(None, ref_weight, ref_bias, vocab_group=group, dtype=dtype)
        _validate.floating("weight", weight, dim=2)
        _validate.like(None, "", device=weight.device, device_of="weight", kind="real",
                       ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
                       kto_kl=kto_kl, cu_seqlens=cu_seqlens,
                       token_weights=None if _pair("token_weights", token_weights) else token_weights)
        if ref_hidden is not None and (ref_chosen_logprobs is not None or ref_rejected_logprobs is not None):
            raise ValueError("give the reference as ref_hidden or as ref_chosen_logprobs/ref_rejected_logprobs, "
                             "not both")
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias apply to ref_hidden: give ref_hidden or leave them None")
        ref_head = (weight, bias, ref_weight, ref_bias, group is not None)  # as given, for the reference checks
        if ref_weight is None:
            ref_weight = weight
            ref_bias = bias if ref_bias is None else ref_bias
        label_pair = _pair("labels", labels)
        if (split is None) != (label_pair is None):
            raise ValueError("hidden and labels must both be (chosen, rejected) pairs or both single tensors")
        if ref_hidden is not None and (_pair("ref_hidden", ref_hidden) is None) != (split is None):
            raise ValueError("ref_hidden must use the same layout as hidden")
        if split is None:
            self._check("hidden", hidden, labels, weight, bias, group is not None)
            if ref_hidden is not None:
                self._check_ref("ref_hidden", ref_hidden, hidden, "hidden", *ref_head)
            if cu_seqlens is not None:
                _validate.integer("cu_seqlens", cu_seqlens, dim=1)
                if hidden.dim() != 2 or (cu_seqlens.shape[0] - 1) % 2:
                    raise ValueError("packed hidden must be [N, H] with cu_seqlens [2B+1] (an even number of "
                                     "sequences)")
                if self.paths.single_pass is True:
                    raise ValueError("single_pass=True does not apply: packed batches (cu_seqlens) take the "
                                     "two-pass path")
                return self._packed(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias,
                                    ref_chosen_logprobs, ref_rejected_logprobs, token_weights, cu_seqlens, kto_kl)
            if hidden.dim() != 3 or hidden.shape[0] % 2:
                raise ValueError("hidden must be [2B, T, H] (chosen rows first, rejected second), "
                                 f"got shape {tuple(hidden.shape)}")
            B = hidden.shape[0] // 2
            if isinstance(token_weights, Tensor):  # checked whole: each half's message would name half shapes
                _validate.shape("token_weights", token_weights, tuple(labels.shape), "like labels")
            (hc, hr), (yc, yr) = _halves(hidden, B), _halves(labels, B)
            twc, twr = _halves(token_weights, B)
            rhc, rhr = _halves(ref_hidden, B)
        else:
            (hc, hr), (yc, yr) = split, label_pair
            self._check("chosen hidden", hc, yc, weight, bias, group is not None)
            self._check("rejected hidden", hr, yr, weight, bias, group is not None)
            if hc.dim() != 3 or hr.dim() != 3 or hc.shape[0] != hr.shape[0]:
                raise ValueError("separate hidden must be ([B, Tc, H], [B, Tr, H]) with the same B")
            twc = twr = None
            if token_weights is not None:
                pair = _pair("token_weights", token_weights)
                if pair is None:
                    raise ValueError("with separate hidden, token_weights must be a (chosen, rejected) pair")
                twc, twr = pair
            rhc, rhr = _pair("ref_hidden", ref_hidden) if ref_hidden is not None else (None, None)
            if rhc is not None:
                self._check_ref("chosen ref_hidden", rhc, hc, "chosen hidden", *ref_head)
                self._check_ref("rejected ref_hidden", rhr, hr, "rejected hidden", *ref_head)
        single = self.paths.single_passes(kto_kl, weight, hc, hr, bias, token_weights=(twc, twr))
        rows_c, rows_r = self._rows(hc, yc, single), self._rows(hr, yr, single)
        both = (hidden, labels) if split is None else None
        if rhc is not None:
            with torch.no_grad():
                ref_both = None if both is None else (ref_hidden, labels)
                (rc, _), (rr, _) = self._both_logprobs(rhc, rhr, yc, yr, ref_weight, ref_bias, False, rows_c,
                                                       rows_r, ref_both, blocks=single)
                sc, sr = self._sums(rc, rr, yc, yr, twc, twr)
            ref_chosen_logprobs, ref_rejected_logprobs = sc.sum, sr.sum
        refs = (ref_chosen_logprobs, ref_rejected_logprobs)
        if single:
            return self._single_pass(hc, hr, yc, yr, weight, bias, twc, twr, rows_c, rows_r, refs, kto_kl)
        (lpc, spc), (lpr, spr) = self._both_logprobs(hc, hr, yc, yr, weight, bias, self.use_weighting, rows_c,
                                                     rows_r, both)
        return self._pair_loss(lpc, lpr, spc, spr, yc, yr, twc, twr, *refs, kto_kl)

    def _both_logprobs(self, hc, hr, yc, yr, weight, bias, sum_p2, rows_c, rows_r, both=None, blocks=False):
        """Token log-probs of both sides from one ``linear_logprobs`` call (one weight gradient).

        ``both``: the concatenated ``(hidden, labels)`` the sides are views of (no copy)."""
        H, n_c = hc.shape[-1], yc.numel()
        if both is not None:
            h, y = both[0].reshape(-1, H), both[1].reshape(-1)
        else:
            h = torch.cat([hc.reshape(-1, H), hr.reshape(-1, H)])
            y = torch.cat([yc.reshape(-1), yr.reshape(-1)])
        rows = None
        if rows_c is not None or rows_r is not None:  # a side with None has every row labelled
            every = (lambda r, n: torch.arange(n, device=h.device) if r is None else r)
            rows = torch.cat([every(rows_c, n_c), every(rows_r, yr.numel()) + n_c])
        lp, sp2 = self._token_logprobs(h, weight, y, bias, sum_p2, rows, blocks)
        split = (lambda t: (t[:n_c].view(yc.shape), t[n_c:].view(yr.shape)))
        return tuple(zip(split(lp), split(sp2) if sp2 is not None else (None, None)))

    def _packed(self, hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_c, ref_r,
                token_weights, cu_seqlens, kto_kl):
        """Packed ``[N, H]`` batch: one pass of every sequence, sums by segment."""
        rows = self._rows(hidden, labels, single=False)
        lp, sp2 = self._token_logprobs(hidden, weight, labels, bias, self.use_weighting, rows)
        seq = self._packed_sums(lp, labels, cu_seqlens, token_weights, sp2)
        B = seq.sum.shape[0] // 2
        plain = seq.sum
        if token_weights is not None or self.ld_alpha is not None:
            plain = self._packed_sums(lp, labels, cu_seqlens, plain=True).sum
        if ref_hidden is not None:
            with torch.no_grad():
                rlp, _ = self._token_logprobs(ref_hidden, ref_weight, labels, ref_bias, False, rows)
                ref = self._packed_sums(rlp, labels, cu_seqlens, token_weights)
            ref_c, ref_r = ref.sum[:B], ref.sum[B:]
        return self._loss(_sequences(seq, slice(0, B)), _sequences(seq, slice(B, None)), plain[:B], ref_c, ref_r,
                          kto_kl)

    def _packed_sums(self, lp, labels, cu_seqlens, token_weights=None, sum_p2=None, plain: bool = False):
        """:func:`sequence_logprobs` of the packed token log-probs ``lp [N]`` (``plain``: without token weights
        and LD-DPO). ``cu_seqlens [1]`` holds no sequence (a batch of no pairs): the empty sums of a padded batch
        ``[0, 1]``, a view of ``lp`` (so its gradient, 0, still reaches the head); ``cu_seqlens`` must then be
        ``[0]`` (a ``ValueError`` otherwise where it is read on the host: an eager CPU tensor)."""
        ld_alpha, token_weights = (None, None) if plain else (self.ld_alpha, token_weights)
        if cu_seqlens.shape[0] > 1:
            return sequence_logprobs(lp, labels=labels, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
                                     ld_alpha=ld_alpha, token_weights=token_weights, sum_p2=sum_p2)
        _validate.flag_or_raise(cu_seqlens[0] != 0, cu_seqlens,
                                lambda: f"cu_seqlens must start at 0, got [{int(cu_seqlens[0])}]")

        def no_rows(t):
            return None if t is None else t[:0].view(0, 1)

        return sequence_logprobs(no_rows(lp), labels=no_rows(labels), ignore_index=self.ignore_index,
                                 ld_alpha=ld_alpha, token_weights=no_rows(token_weights), sum_p2=no_rows(sum_p2))

    def _single_pass(self, hc, hr, yc, yr, weight, bias, twc, twr, rows_c, rows_r, refs, kto_kl):
        """The single pass (:mod:`fastalign.ops.single_pass`) with this module's loss as its callbacks:
        a block of pairs ``p0..p1-1`` contributes ``(p1 - p0)/B`` times its own mean loss, its chosen NLL
        over the whole batch's chosen token count."""
        ref_c, ref_r = refs
        B = hc.shape[0]
        nll_count = (yc != self.ignore_index).sum().to(torch.float32).clamp(min=1.0)

        def pick(t, pairs):
            return None if t is None else t[pairs]

        def share(lps, sps, pairs: slice):
            frac = (pairs.stop - pairs.start) / B
            part, _ = self._pair_loss(*lps, *sps, yc[pairs], yr[pairs], pick(twc, pairs), pick(twr, pairs),
                                      pick(ref_c, pairs), pick(ref_r, pairs), kto_kl, nll_count=nll_count * frac,
                                      pairs=pairs)
            return part * frac

        def total(lps, sps):
            return self._pair_loss(*lps, *sps, yc, yr, twc, twr, ref_c, ref_r, kto_kl)

        loss, metrics, _stats = single_pass_loss([Side(hc, yc, rows_c), Side(hr, yr, rows_r)], weight, bias, share,
                                                 total, pipe=self._pipeline(hc.device),
                                                 aux="sum_p2" if self.use_weighting else None,
                                                 nan_gradients="orpo" in self.loss_types)
        return loss, metrics


def _sequences(seq: SequenceLogprobs, part: slice) -> SequenceLogprobs:
    """The statistics of the sequences ``part``."""
    return SequenceLogprobs(*(None if t is None else t[part] for t in seq))
