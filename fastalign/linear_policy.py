"""The whole policy-gradient step from hidden states: ``linear_logprobs`` then ``policy_loss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign._options import check_names
from fastalign.linear import check_logit_options, linear_logprobs
from fastalign.policy import policy_loss
from fastalign.policy_config import FIELDS, PolicyConfig

# keywords that belong to the logit pipeline (linear_logprobs), not to policy_loss
_LOGIT_OPTIONS = ("temperature", "softcap", "logit_scale", "ignore_index", "chunk", "vocab_group",
                  "grad_skip_threshold")


class LinearPolicyLoss(nn.Module):
    r"""Policy loss straight from the last hidden states and the lm_head weight.

    ``LinearPolicyLoss(loss_type="grpo", eps_high=0.28, temperature=0.7, entropy_coef=0.01)``
    takes the configuration of :class:`fastalign.PolicyLoss` plus the logit options of
    :func:`fastalign.linear_logprobs` (``temperature``, ``softcap``, ``logit_scale``,
    ``ignore_index``, ``chunk``, ``vocab_group``, ``grad_skip_threshold``) and ``backend``.

    ``forward(hidden [B, T, H], weight [V, H], labels [B, T], old_logprobs, advantages,
    response_mask, *, bias=None, low_rank=None, ref_logprobs=None, rollout_logprobs=None, **per_call)``
    computes

    .. code-block:: text

        lp, H = linear_logprobs(hidden, weight, labels, bias=bias, low_rank=low_rank)   # no [B*T, V] tensor
        loss, metrics = policy_loss(lp, old_logprobs, advantages, response_mask & (labels != ignore_index),
                                    entropy=H, ...)

    The entropy is computed only when it is used: ``entropy_coef != 0``, ``entropy_quantile``
    set, or ``entropy_metric=True`` (adds ``metrics["entropy"]``). Gradients flow to ``hidden``,
    ``weight``, ``bias`` and the low-rank term ``(a [B, T, r], L [V, r])`` of a LoRA lm_head
    (see :func:`fastalign.linear_logprobs`). Tokens labelled ``ignore_index`` are dropped from the mask.
    Per-call keywords override the configuration. Returns ``(loss, metrics)`` like
    :func:`fastalign.policy_loss`.
    """

    def __init__(self, *, entropy_metric: bool = False, **config):
        super().__init__()
        self.entropy_metric = bool(entropy_metric)
        if "entropy" in config:
            raise ValueError("LinearPolicyLoss computes the entropy itself; pass entropy_coef / entropy_metric")
        # validated now (unknown names, bad values, options that do not apply), not at the first call
        check_names("LinearPolicyLoss", config, FIELDS + _LOGIT_OPTIONS)
        logit = {k: v for k, v in config.items() if k in _LOGIT_OPTIONS and k != "vocab_group"}
        check_logit_options(**logit, backend=config.get("backend"))
        PolicyConfig(**{k: v for k, v in config.items() if k not in _LOGIT_OPTIONS})
        self.config = dict(config)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, old_logprobs: Tensor, advantages: Tensor,
                response_mask: Tensor, *, bias: Optional[Tensor] = None,
                low_rank: Optional[tuple[Tensor, Tensor]] = None, ref_logprobs: Optional[Tensor] = None,
                rollout_logprobs: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, dict]:
        if "entropy" in kwargs:
            raise ValueError("LinearPolicyLoss computes the entropy itself; pass entropy_coef / entropy_metric")
        cfg = {**self.config, **kwargs}
        entropy_metric = bool(cfg.pop("entropy_metric", self.entropy_metric))
        logit = {k: cfg.pop(k) for k in _LOGIT_OPTIONS if k in cfg}
        backend = cfg.get("backend")
        _validate.integer("labels", labels, dim=2)
        _validate.floating("hidden", hidden, dim=3)
        _validate.like(tuple(labels.shape), "labels.shape", device=labels.device, device_of="labels", kind="float",
                       old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs)
        _validate.like([tuple(labels.shape), tuple(labels.shape[:1])], "labels.shape or [B]", device=labels.device,
                       device_of="labels", kind="float", advantages=advantages)
        _validate.real("response_mask", response_mask, dim=2)
        _validate.shape("response_mask", response_mask, tuple(labels.shape), "labels.shape")
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"hidden must have shape (B, T, H) with (B, T) = labels.shape {tuple(labels.shape)}, "
                             f"got {tuple(hidden.shape)}")
        want_ent = (cfg.get("entropy_coef", 0.0) != 0.0 or cfg.get("entropy_quantile") is not None
                    or entropy_metric)
        ignore_index = int(logit.get("ignore_index", -100))
        mask = response_mask.bool() & (labels != ignore_index)
        # unscored tokens (prompt, tool output) are ignored rows: on CPU they skip the vocabulary
        scored = labels.masked_fill(~mask, ignore_index)
        stats = linear_logprobs(hidden, weight, scored, bias=bias, low_rank=low_rank, entropy=want_ent,
                                backend=backend, **logit)
        return policy_loss(stats.logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                           rollout_logprobs=rollout_logprobs, entropy=stats.entropy, **cfg)

    def extra_repr(self) -> str:
        items = dict(self.config)
        if self.entropy_metric:
            items["entropy_metric"] = True
        return ", ".join(f"{k}={v!r}" for k, v in items.items() if not isinstance(v, torch.Tensor))
