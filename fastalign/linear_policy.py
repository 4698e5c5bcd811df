"""The whole policy-gradient step from hidden states: ``linear_logprobs`` then ``policy_loss``.

Two ways through the vocabulary, same loss and gradients:

* **two passes**: token log-probs (and entropies) from :func:`fastalign.linear_logprobs`
  (forward: statistics only; backward: logits recomputed chunk by chunk), then
  :func:`fastalign.policy_loss`: four matrix products of ``[tokens, H] x [H, V]`` size.
* **single pass** (when gradients are needed and the loss is separable over sequences; by
  default on a GPU, and on the CPU for an fp32 head): blocks
  of whole sequences go through the head once; with the step's normalisers fixed by the mask,
  the gradient of each token's log-prob (and entropy) is known from its own sequence, so the
  block's d(logits) and the gradients of hidden, weight and bias follow while its logits are in
  memory (:mod:`fastalign.ops.single_pass`): three products. The block's logits are the memory
  cost (``FASTALIGN_BLOCK_MIB``: 1024 MiB of bf16/fp16 logits on a GPU, 64 MiB of fp32 on the
  CPU by default). A loss separable over tokens too (:attr:`fastalign.PolicyConfig.token_separable`)
  takes blocks of any tokens, so any sequence length fits; otherwise ``"auto"`` takes it only when
  one sequence's logits fit that budget.

Every loss is separable over sequences except Clip-Cov / KL-Cov (tokens chosen across the
batch) and ``entropy_quantile`` without ``entropy_threshold`` (the batch's quantile).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from fastalign import _dtensor, _validate
from fastalign._options import AUTO_OR_BOOL, FixedOptions, check_choice, check_names, own_copy
from fastalign.linear import check_head_inputs, check_logit_options, linear_logprobs, logit_pipeline, two_pass_only
from fastalign.ops.linear_cpu import labelled_rows
from fastalign.ops.single_pass import Side, differentiated, pays_off, refuse_traced, single_pass_loss, token_items
from fastalign.policy import SharedSeed, policy_loss
from fastalign.policy_config import FIELDS, PolicyConfig, split_pairs

# keywords that belong to the logit pipeline (linear_logprobs), not to policy_loss
_LOGIT_OPTIONS = ("temperature", "softcap", "logit_scale", "ignore_index", "chunk", "vocab_group",
                  "grad_skip_threshold")
_COUPLED = ("clip_cov", "kl_cov")  # loss types whose tokens are chosen across the batch


def _single_pass_blocker(config: PolicyConfig, logit: dict, *, entropy_threshold=None,
                         per_call: bool = True) -> Optional[str]:
    """Why a :class:`LinearPolicyLoss` configuration (``logit``: its :func:`fastalign.linear_logprobs`
    options) cannot take the single pass (None when it can). ``per_call``: include what depends on the
    call's own arguments."""
    if config.row in _COUPLED:
        return f"loss_type {config.loss_type!r} chooses its tokens across the batch"
    why = two_pass_only(logit)
    if why:
        return why
    if config.entropy_quantile is not None:
        if per_call and entropy_threshold is None:
            return "entropy_quantile takes the batch's quantile unless entropy_threshold is given"
        if config.entropy_agg == "token-mean":
            return "entropy_agg='token-mean' with entropy_quantile divides the bonus by the batch's kept tokens"
    return None


def _policy_config(options: dict) -> PolicyConfig:
    """The :class:`PolicyConfig` of :class:`LinearPolicyLoss` keywords, as :func:`fastalign.policy_loss` resolves
    them: ``config`` (None: the defaults) with the fields given as keywords replaced."""
    config = options.get("config")
    if config is not None and not isinstance(config, PolicyConfig):
        raise TypeError(f"config must be a fastalign.PolicyConfig, got {type(config).__name__}")
    return PolicyConfig.make(config, "LinearPolicyLoss", **{k: v for k, v in options.items() if k in FIELDS})


class LinearPolicyLoss(FixedOptions, nn.Module):
    r"""Policy loss straight from the last hidden states and the lm_head weight.

    ``LinearPolicyLoss(loss_type="grpo", eps_high=0.28, temperature=0.7, entropy_coef=0.01)``
    takes the configuration of :class:`fastalign.PolicyLoss` (the fields as keywords and/or
    ``config=PolicyConfig(...)``, whose fields the keywords replace) plus the logit options of
    :func:`fastalign.linear_logprobs` (``temperature``, ``softcap``, ``logit_scale``,
    ``ignore_index``, ``chunk``, ``vocab_group``, ``grad_skip_threshold``) and ``backend``.

    ``forward(hidden [B, T, H], weight [V, H], labels [B, T], old_logprobs, advantages,
    response_mask, *, bias=None, low_rank=None, ref_logprobs=None, rollout_logprobs=None, **per_call)``
    computes

    .. code-block:: text

        mask = response_mask & (labels != ignore_index)
        lp, H = linear_logprobs(hidden, weight, labels.masked_fill(~mask, ignore_index), bias=bias,
                                low_rank=low_rank)   # no [B*T, V] tensor
        loss, metrics = policy_loss(lp, old_logprobs, advantages, mask, entropy=H, ...)

    The entropy is computed only when it is used: ``entropy_coef != 0``, ``entropy_quantile``
    set, or ``entropy_metric=True`` (adds ``metrics["entropy"]``). Gradients flow to ``hidden``,
    ``weight``, ``bias`` and the low-rank term ``(a [B, T, r], L [V, r])`` of a LoRA lm_head
    (see :func:`fastalign.linear_logprobs`). Tokens labelled ``ignore_index`` are dropped from the mask.
    Per-call keywords override the configuration (a per-call ``config`` takes the place of the module's; the
    field keywords, the module's and the call's, replace its fields). Returns ``(loss, metrics)`` like
    :func:`fastalign.policy_loss`. With ``vocab_group`` every rank holds the same tokens, so Clip-Cov's
    random choice takes the seed of the group's first rank on every rank (drawn from its ``generator``;
    one all-reduce on the device).

    ``single_pass`` (``"auto"``, True, False): the single pass over blocks of whole sequences, or of
    any tokens for a loss separable over tokens (module docstring), when gradients are needed;
    ``"auto"`` takes it in eager mode for a loss separable over sequences, on a GPU for a bf16 or
    fp32 head or with an fp32 head on the CPU (fp16 on a GPU takes the two passes, which receive a
    ``GradScaler``'s loss scale before forming d(logits)), within the block budget (not under
    ``torch.compile``, which gets the two-pass custom ops), True raises where it does not apply.
    Its gradients are computed in the forward, so the loss can be differentiated once per forward
    (``single_pass=False`` for a second backward through a retained graph).

    ``entropy_metric`` and ``single_pass`` are attributes read at each call; assigning any other option to the
    module (``loss.eps_high = 0.28``) raises ``AttributeError``: build a new module, or pass it per call.
    """

    _PER_CALL = True

    def __init__(self, *, config: Optional[PolicyConfig] = None, entropy_metric: bool = False,
                 single_pass="auto", **options):
        super().__init__()
        self.entropy_metric = _validate.boolean("entropy_metric", entropy_metric)
        check_choice("single_pass", single_pass, AUTO_OR_BOOL)
        self.single_pass = single_pass
        if "entropy" in options:
            raise ValueError("LinearPolicyLoss computes the entropy itself; pass entropy_coef / entropy_metric")
        # validated now (unknown names, bad values, options that do not apply), not at the first call
        options = split_pairs("LinearPolicyLoss", options)  # the former pair options, with a warning
        check_names("LinearPolicyLoss", options, FIELDS + _LOGIT_OPTIONS)
        self.config = own_copy(options if config is None else dict(config=config, **options))
        policy = _policy_config(self.config)
        logit = {k: v for k, v in options.items() if k in _LOGIT_OPTIONS}
        check_logit_options(**{k: v for k, v in logit.items() if k != "vocab_group"}, backend=policy.backend)
        _validate.process_group("vocab_group", options.get("vocab_group"))
        why = _single_pass_blocker(policy, logit, per_call=False) if single_pass is True else None
        if why:
            raise ValueError(f"single_pass=True does not apply: {why}")
        self._fix_options(FIELDS + _LOGIT_OPTIONS)  # held in self.config (entropy_metric, single_pass: attributes)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, old_logprobs: Tensor, advantages: Tensor,
                response_mask: Tensor, *, bias: Optional[Tensor] = None,
                low_rank: Optional[tuple[Tensor, Tensor]] = None, ref_logprobs: Optional[Tensor] = None,
                rollout_logprobs: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        if "entropy" in kwargs:
            raise ValueError("LinearPolicyLoss computes the entropy itself; pass entropy_coef / entropy_metric")
        cfg = {**self.config, **split_pairs("LinearPolicyLoss.forward", kwargs)}
        entropy_metric = _validate.boolean("entropy_metric", cfg.pop("entropy_metric", self.entropy_metric))
        single_pass = cfg.pop("single_pass", self.single_pass)
        check_choice("single_pass", single_pass, AUTO_OR_BOOL)
        # the configuration the loss takes decides the path too (a per-call config included)
        config = _policy_config(cfg)
        logit = {k: cfg.pop(k) for k in _LOGIT_OPTIONS if k in cfg}
        why = _single_pass_blocker(config, logit, entropy_threshold=cfg.get("entropy_threshold"))
        if single_pass is True and why:
            raise ValueError(f"single_pass=True does not apply: {why}")
        backend = config.backend
        _validate.integer("labels", labels, dim=2)
        _validate.floating("hidden", hidden, dim=3)
        _validate.like(tuple(labels.shape), "labels.shape", device=labels.device, device_of="labels", kind="float",
                       old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs)
        _validate.like([tuple(labels.shape), tuple(labels.shape[:1])], "labels.shape or [B]", device=labels.device,
                       device_of="labels", kind="float", advantages=advantages)
        _validate.real("response_mask", response_mask, dim=2)
        _validate.shape("response_mask", response_mask, tuple(labels.shape), "labels.shape")
        fractional = _validate.binary_mask("response_mask", response_mask)
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"hidden must have shape (B, T, H) with (B, T) = labels.shape {tuple(labels.shape)}, "
                             f"got {tuple(hidden.shape)}")
        want_ent = config.entropy_coef != 0.0 or config.entropy_quantile is not None or entropy_metric
        ignore_index = int(logit.get("ignore_index", -100))
        mask = response_mask.bool() & (labels != ignore_index)
        # unscored tokens (prompt, tool output) are ignored rows: they skip the vocabulary on every backend
        scored = labels.masked_fill(~mask, ignore_index)
        inputs = dict(ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, config=config,
                      **{k: v for k, v in cfg.items() if k not in FIELDS and k != "config"})
        if logit.get("vocab_group") is not None and config.row == "clip_cov":  # its ranks hold the same tokens
            inputs["generator"] = SharedSeed(inputs.get("generator"), logit["vocab_group"])

        def loss(lp, old, ent):
            return policy_loss(lp, old, advantages, mask, entropy=ent, **inputs)

        per_token = config.token_separable
        value, metrics, _lp, _ent = policy_step(hidden, weight, scored, old_logprobs, loss, bias=bias,
                                                low_rank=low_rank, entropy=want_ent,
                                                single_pass=single_pass if why is None else False,
                                                token_separable=per_token, logit=logit, backend=backend)
        # a fractional mask whose values were not read: NaN loss and gradients, not a binarised mask's
        return _validate.nan_if(fractional, value), metrics

    def extra_repr(self) -> str:
        items = dict(self.config)
        if self.entropy_metric:
            items["entropy_metric"] = True
        if self.single_pass != "auto":
            items["single_pass"] = self.single_pass
        return ", ".join(f"{k}={v!r}" for k, v in items.items() if not isinstance(v, torch.Tensor))


#: loss(logprobs, old_logprobs, entropy) -> (loss, metrics) of a batch of sequences
SequenceLoss = Callable[[Tensor, Tensor, Optional[Tensor]], Tuple[Tensor, dict]]


def policy_step(hidden: Tensor, weight: Tensor, labels: Tensor, old_logprobs: Optional[Tensor], loss: SequenceLoss, *,
                bias: Optional[Tensor] = None, low_rank=None, entropy: bool = False, single_pass="auto",
                token_separable: bool = False, logit: dict, backend: Optional[str] = None):
    """``(loss, metrics, logprobs, entropy)``: ``loss(lp, old, H)`` of the token statistics of ``hidden``
    against the head ``weight`` (``labels`` already ``ignore_index`` where unscored; ``logit``: the options
    of :func:`fastalign.linear_logprobs`), by the single pass or the two passes (module docstring);
    ``logprobs`` detached, ``entropy`` None unless asked. ``old_logprobs=None`` is the policy's own
    log-probs, detached (a ratio of 1). ``loss`` must be separable over sequences (a
    :func:`fastalign.policy_loss` with normalisers from the mask; the caller rules out the rest).
    ``single_pass``: True takes the single pass (it raises under tracing), ``"auto"`` where
    :func:`~fastalign.ops.single_pass.by_default` says so. ``low_rank = (a, L)``: a low-rank term on the
    head, as in :func:`fastalign.linear_logprobs` (a frozen ``weight`` with a trainable LoRA adapter).
    ``token_separable``: the loss is separable over tokens too (:attr:`fastalign.PolicyConfig.token_separable`),
    so the single pass takes blocks of any tokens, sized by the block budget alone: a sequence longer than
    the budget still takes it."""
    hidden, weight, bias, low_rank, a, lw, single = _route(hidden, weight, labels, bias, low_rank, single_pass,
                                                           token_separable, logit)
    if single and differentiated(weight, hidden, bias, a, lw):
        return _single_pass_step(token_separable, hidden, weight, bias, a, lw, labels, old_logprobs, loss, entropy,
                                 logit, backend)
    stats = linear_logprobs(hidden, weight, labels, bias=bias, low_rank=low_rank, entropy=entropy, backend=backend,
                            **logit)
    lp = stats.logprobs
    value, metrics = loss(lp, lp.detach() if old_logprobs is None else old_logprobs, stats.entropy)
    return value, metrics, lp.detach(), stats.entropy


def policy_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None, low_rank=None,
                    entropy: bool = False, single_pass="auto", token_separable: bool = False, logit: dict,
                    backend: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``(logprobs, entropy)``, detached, that :func:`policy_step` with the same arguments computes when gradients
    are needed, here without gradients: the same path (single pass or two passes) over the same blocks, so the same
    numbers bit for bit. For the old policy's log-probs of an on-policy step, whose ratio to the step's own is then
    exactly 1 (the two paths agree to rounding only, which a sum over a long completion accumulates). ``entropy``:
    as the step asks it (the blocks compute it beside the log-probs); None unless asked. Without gradients the
    single pass does no derivative work: one matrix product per block, as the two passes' forward."""
    detached = [None if t is None else t.detach() for t in (hidden, weight, bias)]
    low_rank = None if low_rank is None else tuple(t.detach() for t in low_rank)
    with torch.no_grad():
        hidden, weight, bias, low_rank, a, lw, single = _route(*detached[:2], labels, detached[2], low_rank,
                                                               single_pass, token_separable, logit)
        if single:
            return _single_pass_step(token_separable, hidden, weight, bias, a, lw, labels, None, _no_loss, entropy,
                                     logit, backend)[2:]
        stats = linear_logprobs(hidden, weight, labels, bias=bias, low_rank=low_rank, entropy=entropy,
                                backend=backend, **logit)
        return stats.logprobs, stats.entropy


def _route(hidden, weight, labels, bias, low_rank, single_pass, token_separable: bool, logit: dict):
    """The head's operands as :func:`policy_step` takes them, ``(hidden, weight, bias, low_rank, a, lw)``, and
    whether it takes the single pass when gradients are needed: ``single_pass`` True, or ``"auto"`` where
    :func:`~fastalign.ops.single_pass.by_default` says so (``token_separable``: items of one token)."""
    group = logit.get("vocab_group")
    hidden, weight, bias, low_rank = _dtensor.head(hidden, weight, bias, low_rank, group)
    a, lw = check_head_inputs(hidden, weight, labels, bias, low_rank, vocab_shard=group is not None)
    refuse_traced(single_pass, hidden, weight, bias, a, lw)
    single = single_pass is True
    if single_pass == "auto":
        tokens = token_separable and hidden.dim() == 3
        item_rows = 1 if tokens else hidden.shape[-2] if hidden.dim() > 2 else hidden.shape[0]  # one item's positions
        single = pays_off(weight, hidden, bias, a, lw, item_rows=item_rows)
    return hidden, weight, bias, low_rank, a, lw, single


def _no_loss(lp: Tensor, _old: Tensor, _ent: Optional[Tensor]) -> Tuple[Tensor, dict]:
    """A loss of no consequence, for :func:`policy_logprobs`' pass (its statistics are what it keeps)."""
    return lp.sum() * 0.0, {}


def _single_pass_step(token_separable: bool, hidden, weight, bias, a, lw, labels, old_logprobs, loss: SequenceLoss,
                      entropy: bool, logit: dict, backend):
    """:func:`policy_step` by the single pass: blocks of whole sequences, or of any tokens (every token its own
    item, ``[B * T, 1, ...]``) for a loss separable over tokens."""
    if not (token_separable and hidden.dim() == 3):
        return _single_pass(hidden, weight, bias, a, lw, labels, old_logprobs, loss, entropy, logit, backend)
    shape = labels.shape

    def per_token(lp, old, ent):
        return loss(lp.view(shape), old.view(shape), None if ent is None else ent.view(shape))

    value, metrics, lp, ent = _single_pass(token_items(hidden), weight, bias, token_items(a), lw, token_items(labels),
                                           token_items(old_logprobs), per_token, entropy, logit, backend)
    return value, metrics, lp.view(shape), None if ent is None else ent.view(shape)


def _single_pass(hidden, weight, bias, a, lw, labels, old_logprobs, loss: SequenceLoss, want_ent: bool,
                 logit: dict, backend):
    """:func:`policy_step` by the single pass, a block of whole sequences at a time. A block's share is
    the loss of the whole batch with the other sequences' log-probs held at ``old_logprobs`` (or 0
    with their old log-probs 0 too, when those are the policy's own) and their entropies at 0:
    constants, so its gradient with respect to the block's statistics is the loss's (the normalisers
    come from the mask, as in the batch's loss)."""
    pipe = logit_pipeline(hidden.device, {**logit, "backend": backend})
    # the C++ path finds the labelled rows on the host (reading their count is free on the CPU); the
    # Triton paths put them first on the device (ops/device_compaction.py)
    rows = labelled_rows(labels.reshape(-1), pipe.ignore_index) if pipe.backend == "cpp" else None
    zero = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    held = zero if old_logprobs is None else old_logprobs.detach().float()

    def embed(part: Tensor, rest: Tensor, items: slice) -> Tensor:
        return torch.cat([rest[:items.start], part, rest[items.stop:]])

    def share(lps, ents, items: slice):
        lp = embed(lps[0], held, items)
        return loss(lp, lp.detach() if old_logprobs is None else old_logprobs,
                    embed(ents[0], zero, items) if want_ent else None)[0]

    def total(lps, ents):
        return loss(lps[0], lps[0] if old_logprobs is None else old_logprobs, ents[0])

    value, metrics, stats = single_pass_loss([Side(hidden, labels, rows, a)], weight, bias, share, total, pipe=pipe,
                                             aux="entropy" if want_ent else None, low_rank_weight=lw)
    return value, metrics, stats["logprobs"][0], stats["entropy"][0] if want_ent else None
