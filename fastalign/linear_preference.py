"""Preference losses straight from hidden states and the LM head: never the ``[N, V]`` logits.

Two ways through the vocabulary, same loss and gradients:

* **two passes** (default on the CPU, and for every loss): token log-probs from
  :func:`fastalign.linear_logprobs` (forward: statistics only; backward: logits
  recomputed chunk by chunk), then :func:`sequence_logprobs` and :func:`preference_loss`.
* **single pass** (default on a GPU for the pair-separable losses): a block of a few whole
  pairs is sent through the head once (:mod:`fastalign.ops.linear_block`); the block's
  loss gives d loss / d lp at once, so its kept logits turn into d(logits) in place and
  the gradients of hidden, weight and bias are finished before the next block — three
  matrix products per block instead of four. The block's logits are the memory cost
  (``FASTALIGN_PAIR_BLOCK_MIB``, 1024 MiB by default, at least one pair).

A loss is pair-separable when ``loss = (1/B) Σ_i ℓ_i + c·NLL`` with ``ℓ_i`` a function of
pair ``i`` only: every loss type except ``aot``/``aot_unpaired`` (sorted across the batch),
``kto`` without ``kto_kl`` (the batch's mean KL), and, with WPO weights, the losses that
carry the chosen NLL in each pair's term (sft, cpo, orpo: ``mean_i(ω_i) · NLL``). The
chosen NLL is linear in the token log-probs, so each block adds its share.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from fastalign import _backend, _validate
from fastalign.linear import linear_logprobs
from fastalign.ops.linear_block import block_backward, block_buffer, block_forward, block_logprobs, block_rows
from fastalign.preference import LOSSES, check_config, preference_loss, wpo_weights
from fastalign.sequence import SequenceLogprobs, sequence_logprobs

#: Memory for the kept logits of one single-pass block, in MiB (``FASTALIGN_PAIR_BLOCK_MIB``).
DEFAULT_PAIR_BLOCK_MIB = 1024.0
_COUPLED = ("aot", "aot_unpaired")  # sorted across the batch


def _pair(name: str, x):
    """(chosen, rejected) from a tuple/list, or None for a single concatenated tensor."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} given separately must be a (chosen, rejected) pair, got {len(x)} items")
        return tuple(x)
    return None


def _halves(x, B):
    return (None, None) if x is None else (x[:B], x[B:])


class LinearPreferenceLoss(nn.Module):
    r"""Preference loss straight from the last hidden states and the LM-head weight.

    ``forward(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, ref_chosen_logps=None, ref_rejected_logps=None, token_weights=None,
    cu_seqlens=None, kto_kl=None) -> (loss, metrics)``.

    Batch layouts:

    * concatenated — ``hidden`` ``[2B, T, H]``, ``labels`` ``[2B, T]``: rows ``0..B-1`` chosen,
      ``B..2B-1`` rejected;
    * separate — ``hidden=(chosen [B, Tc, H], rejected [B, Tr, H])``, ``labels`` likewise;
    * packed — ``hidden`` ``[N, H]``, ``labels`` ``[N]``, ``cu_seqlens`` ``[2B+1]``: the first
      B sequences chosen.

    ``labels`` are aligned with the hidden positions (no shift inside): the label at
    position ``t`` is the token whose log-prob ``hidden[t]`` predicts; ``ignore_index``
    marks the prompt and the padding. Token log-probs follow the logit pipeline
    ``logit_scale``, ``softcap``, ``temperature`` of docs/math.md#token-statistics, are summed per sequence by
    :func:`sequence_logprobs` (with ``token_weights`` and LD-DPO ``ld_alpha``), then go
    through :func:`preference_loss`.

    The reference is either hidden states (``ref_hidden`` with ``ref_weight``/``ref_bias``,
    defaulting to the policy head) evaluated under ``torch.no_grad`` — never
    differentiated — or precomputed ``ref_chosen_logps``/``ref_rejected_logps``; without
    either the loss is reference-free. ``use_weighting=True`` asks the kernel for
    :math:`\sum_j p_j^2` and applies WPO pair weights, capped at ``wpo_cap`` (1 by default;
    ``None`` leaves them uncapped, as TRL 1.16). The chosen NLL (sft, cpo, orpo,
    ``rpo_alpha``) is the token mean over the chosen responses.

    ``compact``: run only the labelled positions (not the prompt, not the padding) through
    the vocabulary. Finding them reads their count back to the host, which is free for CPU
    tensors and a device sync on a GPU, so ``"auto"`` (default) compacts CPU tensors outside
    ``torch.compile`` and leaves GPU batches whole; ``True`` / ``False`` force it.

    ``single_pass``: gradients computed while a block of whole pairs' logits is in memory
    (see the module docstring). ``"auto"`` (default) uses it for CUDA tensors in eager mode
    when the loss is pair-separable and the batch is padded (not packed, no
    ``vocab_group``); ``True`` asks for it (an error where it does not apply); ``False`` never.
    """

    def __init__(self, loss_type="sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, *,
                 ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                 logit_scale: float = 1.0, ld_alpha: Optional[float] = None, use_weighting: bool = False,
                 wpo_cap: Optional[float] = 1.0, vocab_group=None, backend: Optional[str] = None, compact="auto",
                 single_pass="auto",
                 **options):
        super().__init__()
        self.loss_types = check_config("LinearPreferenceLoss", loss_type, beta, label_smoothing, options)
        self.config = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, **options)
        self.ignore_index = int(ignore_index)
        self.ld_alpha = ld_alpha
        self.use_weighting = bool(use_weighting)
        if wpo_cap != 1.0 and not use_weighting:
            raise ValueError("wpo_cap applies to the WPO weights: set use_weighting=True or leave wpo_cap at 1")
        self.wpo_cap = wpo_cap
        for name, v in (("compact", compact), ("single_pass", single_pass)):
            if v not in ("auto", True, False):
                raise ValueError(f"{name} must be 'auto', True or False, got {v!r}")
        self.compact = compact
        self.single_pass = single_pass
        self.kernel_options = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                                   ignore_index=self.ignore_index, vocab_group=vocab_group, backend=backend)
        if single_pass is True:
            why = self._single_pass_blocker(per_call=False)
            if why:
                raise ValueError(f"single_pass=True does not apply: {why}")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    # ------------------------------------------------------------------------------------ choices

    def _compacts(self, hidden: Tensor) -> bool:
        if self.compact == "auto":
            # picking the labelled rows reads their count back: free on the CPU, a sync on a GPU
            return hidden.device.type == "cpu" and not torch.compiler.is_compiling()
        return bool(self.compact)

    def _single_pass_blocker(self, kto_kl=None, per_call: bool = True) -> Optional[str]:
        """Why the single pass cannot run (None when it can)."""
        coupled = [t for t in self.loss_types if t in _COUPLED]
        if coupled:
            return f"loss {coupled[0]!r} couples the pairs of a batch"
        if self.kernel_options["vocab_group"] is not None:
            return "the vocabulary is split over a process group"
        if self.use_weighting:
            with_nll = [t for t in self.loss_types if LOSSES[t][2]]
            if with_nll:
                return f"WPO pair weights multiply the chosen NLL in {with_nll[0]!r}, a batch-wide term"
        if per_call and "kto" in self.loss_types and kto_kl is None:
            return "kto takes the batch's mean KL unless kto_kl is given"
        return None

    def _single_passes(self, hidden: Tensor, kto_kl) -> bool:
        if self.single_pass is False:
            return False
        why = self._single_pass_blocker(kto_kl)
        if self.single_pass is True:
            if why:
                raise ValueError(f"single_pass=True does not apply: {why}")
            return True
        return why is None and hidden.is_cuda and not torch.compiler.is_compiling()

    # ------------------------------------------------------------------------------------ pieces

    def _rows(self, hidden, labels):
        if not self._compacts(hidden):
            return None
        return (labels.reshape(-1) != self.ignore_index).nonzero().squeeze(1)

    def _token_logps(self, hidden, weight, labels, bias, sum_p2: bool, rows: Optional[Tensor] = None,
                     blocks: bool = False):
        """Token log-probs (and sum p^2) shaped like ``labels``. With ``rows`` (flat indices of the
        labelled positions) only those rows go through the vocabulary; the rest are 0.
        ``blocks``: no gradient, through the single pass's blocks (one matrix product each)."""
        H = hidden.shape[-1]
        h, y = hidden.reshape(-1, H), labels.reshape(-1)
        if rows is not None:
            h, y = h.index_select(0, rows), y.index_select(0, rows)
        if blocks:
            lp = block_logprobs(h, weight, bias, y.to(torch.int64).contiguous(), rows=_pair_block_rows(weight, h),
                                **_block_options(self, h.device))
            sp2 = None
        else:
            st = linear_logprobs(h, weight, y, bias=bias, sum_p2=sum_p2, **self.kernel_options)
            lp, sp2 = st.logprobs, st.sum_p2
        if rows is None:
            return lp.view(labels.shape), None if sp2 is None else sp2.view(labels.shape)
        return _scatter(lp, rows, labels, 0.0), None if sp2 is None else _scatter(sp2.detach(), rows, labels, 1.0)

    def _sums(self, lpc, lpr, yc, yr, twc=None, twr=None, spc=None, spr=None):
        """Per-sequence sums of both sides (LD-DPO public length ``min(|yc|, |yr|)`` per pair)."""
        ld_len = None
        if self.ld_alpha is not None:
            ld_len = torch.minimum((yc != self.ignore_index).sum(-1), (yr != self.ignore_index).sum(-1))
        kw = dict(ignore_index=self.ignore_index, ld_alpha=self.ld_alpha, ld_lengths=ld_len)
        return (sequence_logprobs(lpc, labels=yc, token_weights=twc, sum_p2=spc, **kw),
                sequence_logprobs(lpr, labels=yr, token_weights=twr, sum_p2=spr, **kw))

    def _pair_loss(self, lpc, lpr, spc, spr, yc, yr, twc, twr, ref_c, ref_r, kto_kl, nll_count=None):
        """preference_loss of the pairs whose token log-probs are ``lpc [b, Tc]``, ``lpr [b, Tr]``."""
        sc, sr = self._sums(lpc, lpr, yc, yr, twc, twr, spc, spr)
        plain = sc.sum if twc is None and self.ld_alpha is None else \
            sequence_logprobs(lpc, labels=yc, ignore_index=self.ignore_index).sum
        return self._loss(sc, sr, plain, ref_c, ref_r, kto_kl, nll_count)

    def _loss(self, sc, sr, plain_c, ref_c, ref_r, kto_kl, nll_count=None):
        """preference_loss from per-sequence sums of both sides; the chosen NLL is
        ``-Σ plain_c / nll_count`` (default: these chosen responses' token count)."""
        count = sc.count.sum().clamp(min=1.0) if nll_count is None else nll_count
        weights = wpo_weights(sc.wpo, sr.wpo, self.wpo_cap) if self.use_weighting else None
        return preference_loss(sc.sum, sr.sum, ref_c, ref_r, chosen_lengths=sc.count, rejected_lengths=sr.count,
                               chosen_nll=-plain_c.sum() / count, weights=weights, kto_kl=kto_kl, **self.config)

    def _check(self, name, hidden, labels, weight):
        _validate.floating(name, hidden, min_dim=2)
        _validate.integer(f"{name} labels", labels)
        _validate.shape(f"{name} labels", labels, hidden.shape[:-1], f"{name}.shape[:-1]")
        if hidden.shape[-1] != weight.shape[-1]:
            raise ValueError(f"{name} has hidden size {hidden.shape[-1]} but weight is {tuple(weight.shape)} "
                             "([V, H])")

    # ------------------------------------------------------------------------------------ forward

    def forward(self, hidden, weight: Tensor, labels, *, bias: Optional[Tensor] = None, ref_hidden=None,
                ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None,
                token_weights=None, cu_seqlens: Optional[Tensor] = None, kto_kl: Optional[Tensor] = None):
        _validate.floating("weight", weight, dim=2)
        _validate.like(None, "", device=weight.device, device_of="weight", kind="real",
                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, kto_kl=kto_kl,
                       cu_seqlens=cu_seqlens, token_weights=None if _pair("token_weights", token_weights)
                       else token_weights)
        if ref_hidden is not None and (ref_chosen_logps is not None or ref_rejected_logps is not None):
            raise ValueError("give the reference as ref_hidden or as ref_chosen_logps/ref_rejected_logps, not both")
        if ref_weight is None:
            ref_weight = weight
            ref_bias = bias if ref_bias is None else ref_bias
        split = _pair("hidden", hidden)
        label_pair = _pair("labels", labels)
        if (split is None) != (label_pair is None):
            raise ValueError("hidden and labels must both be (chosen, rejected) pairs or both single tensors")
        if ref_hidden is not None and (_pair("ref_hidden", ref_hidden) is None) != (split is None):
            raise ValueError("ref_hidden must use the same layout as hidden")
        if split is None:
            self._check("hidden", hidden, labels, weight)
            if ref_hidden is not None:
                self._check("ref_hidden", ref_hidden, labels, ref_weight)
                _validate.shape("ref_hidden", ref_hidden, hidden.shape, "like hidden")
            if cu_seqlens is not None:
                _validate.integer("cu_seqlens", cu_seqlens, dim=1)
                if hidden.dim() != 2 or (cu_seqlens.shape[0] - 1) % 2:
                    raise ValueError("packed hidden must be [N, H] with cu_seqlens [2B+1] (an even number of "
                                     "sequences)")
                if self.single_pass is True:
                    raise ValueError("single_pass=True does not apply: packed batches (cu_seqlens) take the "
                                     "two-pass path")
                return self._packed(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias,
                                    ref_chosen_logps, ref_rejected_logps, token_weights, cu_seqlens, kto_kl)
            if hidden.dim() != 3 or hidden.shape[0] % 2:
                raise ValueError("hidden must be [2B, T, H] (chosen rows first, rejected second), "
                                 f"got shape {tuple(hidden.shape)}")
            B = hidden.shape[0] // 2
            (hc, hr), (yc, yr) = _halves(hidden, B), _halves(labels, B)
            twc, twr = _halves(token_weights, B)
            rhc, rhr = _halves(ref_hidden, B)
        else:
            (hc, hr), (yc, yr) = split, label_pair
            self._check("chosen hidden", hc, yc, weight)
            self._check("rejected hidden", hr, yr, weight)
            if hc.dim() != 3 or hr.dim() != 3 or hc.shape[0] != hr.shape[0]:
                raise ValueError("separate hidden must be ([B, Tc, H], [B, Tr, H]) with the same B")
            twc = twr = None
            if token_weights is not None:
                pair = _pair("token_weights", token_weights)
                if pair is None:
                    raise ValueError("with separate hidden, token_weights must be a (chosen, rejected) pair")
                twc, twr = pair
            rhc, rhr = _pair("ref_hidden", ref_hidden) if ref_hidden is not None else (None, None)
        rows_c, rows_r = self._rows(hc, yc), self._rows(hr, yr)
        both = (hidden, labels) if split is None else None
        single = self._single_passes(hc, kto_kl)
        if rhc is not None:
            with torch.no_grad():
                ref_both = None if both is None else (ref_hidden, labels)
                (rc, _), (rr, _) = self._both_logps(rhc, rhr, yc, yr, ref_weight, ref_bias, False, rows_c, rows_r,
                                                    ref_both, blocks=single)
                sc, sr = self._sums(rc, rr, yc, yr, twc, twr)
            ref_chosen_logps, ref_rejected_logps = sc.sum, sr.sum
        refs = (ref_chosen_logps, ref_rejected_logps)
        if single:
            return self._single_pass_loss(hc, hr, yc, yr, weight, bias, twc, twr, rows_c, rows_r, refs, kto_kl)
        (lpc, spc), (lpr, spr) = self._both_logps(hc, hr, yc, yr, weight, bias, self.use_weighting, rows_c, rows_r,
                                                  both)
        return self._pair_loss(lpc, lpr, spc, spr, yc, yr, twc, twr, *refs, kto_kl)

    def _both_logps(self, hc, hr, yc, yr, weight, bias, sum_p2, rows_c, rows_r, both=None, blocks=False):
        """Token log-probs of both sides from one ``linear_logprobs`` call (one weight gradient).

        ``both``: the concatenated ``(hidden, labels)`` the sides are views of (no copy)."""
        H, n_c = hc.shape[-1], yc.numel()
        if both is not None:
            h, y = both[0].reshape(-1, H), both[1].reshape(-1)
        else:
            h = torch.cat([hc.reshape(-1, H), hr.reshape(-1, H)])
            y = torch.cat([yc.reshape(-1), yr.reshape(-1)])
        rows = None if rows_c is None else torch.cat([rows_c, rows_r + n_c])
        lp, sp2 = self._token_logps(h, weight, y, bias, sum_p2, rows, blocks)
        split = (lambda t: (t[:n_c].view(yc.shape), t[n_c:].view(yr.shape)))
        return tuple(zip(split(lp), split(sp2) if sp2 is not None else (None, None)))

    def _packed(self, hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_c, ref_r,
                token_weights, cu_seqlens, kto_kl):
        """Packed ``[N, H]`` batch: one pass of every sequence, sums by segment."""
        seq_kw = dict(ignore_index=self.ignore_index, ld_alpha=self.ld_alpha, cu_seqlens=cu_seqlens)
        rows = self._rows(hidden, labels)
        lp, sp2 = self._token_logps(hidden, weight, labels, bias, self.use_weighting, rows)
        seq = sequence_logprobs(lp, labels=labels, token_weights=token_weights, sum_p2=sp2, **seq_kw)
        B = seq.sum.shape[0] // 2
        plain = seq.sum
        if token_weights is not None or self.ld_alpha is not None:
            plain = sequence_logprobs(lp, labels=labels, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index).sum
        if ref_hidden is not None:
            with torch.no_grad():
                rlp, _ = self._token_logps(ref_hidden, ref_weight, labels, ref_bias, False, rows)
                ref = sequence_logprobs(rlp, labels=labels, token_weights=token_weights, **seq_kw)
            ref_c, ref_r = ref.sum[:B], ref.sum[B:]
        return self._loss(_sequences(seq, slice(0, B)), _sequences(seq, slice(B, None)), plain[:B], ref_c, ref_r,
                          kto_kl)

    # ------------------------------------------------------------------------------------ single pass

    def _single_pass_loss(self, hc, hr, yc, yr, weight, bias, twc, twr, rows_c, rows_r, refs, kto_kl):
        out = {}
        loss = _SinglePass.apply(hc, hr, weight, bias, (self, yc, yr, twc, twr, rows_c, rows_r, refs, kto_kl, out))
        return loss, out["metrics"]


def _block_options(mod: LinearPreferenceLoss, device) -> dict:
    """Logit pipeline and kernel family of the single pass's blocks."""
    o = mod.kernel_options
    return dict(scale=float(o["logit_scale"]), softcap=0.0 if o["softcap"] is None else float(o["softcap"]),
                inv_t=1.0 / float(o["temperature"]), ignore_index=mod.ignore_index,
                backend=_backend.resolve(device, o["backend"]))


def _pair_block_rows(weight: Tensor, like: Tensor) -> int:
    """Rows of kept logits per block (``FASTALIGN_PAIR_BLOCK_MIB``)."""
    budget = float(os.environ.get("FASTALIGN_PAIR_BLOCK_MIB", DEFAULT_PAIR_BLOCK_MIB)) * (1 << 20)
    return block_rows(weight.shape[0], like, budget)


def _sequences(seq: SequenceLogprobs, part: slice) -> SequenceLogprobs:
    """The statistics of the sequences ``part``."""
    return SequenceLogprobs(*(None if t is None else t[part] for t in seq))


def _scatter(values: Tensor, rows: Tensor, like: Tensor, fill: float) -> Tensor:
    """``values`` at the flat ``rows`` of a tensor shaped like ``like``, ``fill`` elsewhere."""
    out = torch.full((like.numel(),), fill, dtype=values.dtype, device=values.device)
    return out.index_put((rows,), values).view(like.shape)


def _side_rows(hidden: Tensor, labels: Tensor, rows: Optional[Tensor], p0: int, p1: int):
    """Flat row indices (into ``hidden.reshape(-1, H)``) of pairs ``p0..p1-1`` on one side."""
    T = labels.shape[1]
    if rows is None:
        return torch.arange(p0 * T, p1 * T, device=hidden.device)
    lo, hi = torch.searchsorted(rows, torch.tensor([p0 * T, p1 * T], device=rows.device)).tolist()
    return rows[lo:hi]


class _SinglePass(torch.autograd.Function):
    """Loss value from the whole batch; d(hidden), d(weight), d(bias) summed block by block in
    the forward and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hc, hr, weight, bias, state):
        mod, yc, yr, twc, twr, rows_c, rows_r, (ref_c, ref_r), kto_kl, out = state
        kw = _block_options(mod, hc.device)
        B, H, V = hc.shape[0], hc.shape[-1], weight.shape[0]
        need_w, need_b = ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]
        dtype_w = weight.dtype if weight.is_cuda else torch.float32
        dw = torch.zeros(weight.shape, dtype=dtype_w, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        dh = [torch.zeros(h.shape, dtype=h.dtype, device=h.device) if ctx.needs_input_grad[i] else None
              for i, h in enumerate((hc, hr))]
        flat = [h.reshape(-1, H) for h in (hc, hr)]
        y_flat = [y.reshape(-1).to(torch.int64) for y in (yc, yr)]
        lp_all = [torch.zeros(y.shape, dtype=torch.float32, device=y.device) for y in (yc, yr)]
        sp_all = [torch.ones(y.shape, dtype=torch.float32, device=y.device) for y in (yc, yr)] \
            if mod.use_weighting else [None, None]
        nll_count = (yc != mod.ignore_index).sum().to(torch.float32).clamp(min=1.0)

        # pairs per block: their rows' logits within the budget (at least one pair)
        per_pair = (yc[0].numel() + yr[0].numel()) if rows_c is None else \
            -(-(rows_c.numel() + rows_r.numel()) // max(B, 1))
        k = max(1, min(B, _pair_block_rows(weight, hc) // max(per_pair, 1)))
        buf = None
        for p0 in range(0, B, k):
            p1 = min(B, p0 + k)
            idx = [_side_rows(h, y, r, p0, p1) for h, y, r in ((hc, yc, rows_c), (hr, yr, rows_r))]
            n_c = idx[0].numel()
            h_blk = torch.cat([flat[0].index_select(0, idx[0]), flat[1].index_select(0, idx[1])])
            y_blk = torch.cat([y_flat[0].index_select(0, idx[0]), y_flat[1].index_select(0, idx[1])])
            if buf is None or buf.numel() < h_blk.shape[0] * V:
                buf = None  # free the smaller buffer before the larger one is allocated
                buf = block_buffer(max(h_blk.shape[0], k * per_pair), V, hc)
            with torch.no_grad():
                z, deriv, lp, sp2, lse = block_forward(buf, h_blk, weight, bias, y_blk,
                                                       sum_p2=mod.use_weighting, **kw)
            # d (block's share of the loss) / d lp, on [b, T] grids of these pairs
            with torch.enable_grad():
                grids = []
                for side, (ids, part) in enumerate(((idx[0], lp[:n_c]), (idx[1], lp[n_c:]))):
                    lp_all[side].view(-1).index_copy_(0, ids, part)
                    grids.append(lp_all[side][p0:p1].detach().requires_grad_())
                sps = [None, None]
                if mod.use_weighting:
                    for side, (ids, part) in enumerate(((idx[0], sp2[:n_c]), (idx[1], sp2[n_c:]))):
                        sp_all[side].view(-1).index_copy_(0, ids, part)
                    sps = [sp_all[0][p0:p1], sp_all[1][p0:p1]]
                sl = slice(p0, p1)
                share, _ = mod._pair_loss(grids[0], grids[1], sps[0], sps[1], yc[sl], yr[sl],
                                          None if twc is None else twc[sl], None if twr is None else twr[sl],
                                          None if ref_c is None else ref_c[sl], None if ref_r is None else ref_r[sl],
                                          kto_kl, nll_count=nll_count * (p1 - p0) / B)
                g = torch.autograd.grad(share * ((p1 - p0) / B), grids, allow_unused=True, materialize_grads=True)
            g_rows = torch.cat([g[side].reshape(-1).index_select(0, idx[side] - p0 * y.shape[1])
                                for side, y in enumerate((yc, yr))])
            dh_blk = block_backward(z, deriv, g_rows.float().contiguous(), h_blk, weight, y_blk, lse, dw=dw, db=db,
                                    **kw)
            for side, (ids, part) in enumerate(((idx[0], dh_blk[:n_c]), (idx[1], dh_blk[n_c:]))):
                if dh[side] is not None:
                    dh[side].view(-1, H).index_copy_(0, ids, part.to(dh[side].dtype))
        del buf
        with torch.no_grad():
            loss, metrics = mod._pair_loss(lp_all[0], lp_all[1], sp_all[0], sp_all[1], yc, yr, twc, twr, ref_c,
                                           ref_r, kto_kl)
        # kept as attributes, not saved tensors: backward scales them in place (no second [V, H])
        ctx.grads = (dh[0], dh[1], dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        out["metrics"] = metrics
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("LinearPreferenceLoss's single pass can be differentiated once per forward "
                               "(its gradients are computed in the forward); run the forward again")
        grads, ctx.grads = ctx.grads, None
        dtypes = (None, None, *ctx.dtypes)
        out = []
        for i, t in enumerate(grads):
            if t is None or not ctx.needs_input_grad[i]:
                out.append(None)
                continue
            t = t.mul_(g.to(t.dtype))
            out.append(t if dtypes[i] is None else t.to(dtypes[i]))
        return (*out, None)
