"""TRL 1.16 ``GRPOTrainer`` profile: its policy loss, gradient and metrics from a ``GRPOConfig``.

:class:`GRPOLoss` reads a ``GRPOConfig`` (or a dict with its field names) once and maps it onto
a :class:`fastalign.PolicyConfig`; calling it on the per-token tensors of one micro-batch
returns ``(loss, metrics)`` equal to ``GRPOTrainer._compute_loss`` and the metrics it logs. A dict
gives the loss of the ``GRPOConfig`` with the same fields: TRL's defaults fill the fields it does not
give, and the values ``GRPOConfig.__post_init__`` derives (``steps_per_generation`` from
``generation_batch_size``, ``vllm_importance_sampling_clip_max`` from the deprecated
``vllm_importance_sampling_cap``) are derived the same way, without TRL installed too. A TRL
``GMPOConfig`` (``trl.experimental.gmpo``) gives ``GMPOTrainer``'s loss instead: ``GRPOLoss``
returns a :class:`~fastalign.integrations.trl.GMPOLoss` for it (:mod:`.gmpo`).

Where TRL's behaviour differs from fastalign's defaults, the profile follows TRL:

* ``loss_type``: grpo / sapo / luspo average over every sequence (empty ones included);
  dr_grpo divides by ``B * max_completion_length``; dapo / cispo / vespo divide the token sum
  by ``num_items_in_batch / steps_per_generation`` per process (``dp_size = num_processes``);
  training losses are divided by the gradient-accumulation steps.
* KL (``beta``): k3 without clamps; with ``use_bias_correction_kl`` (TRL's default) it is
  multiplied by the importance ratio with its gradient (``kl_rho="grad"``; the sequence ratio
  under ``importance_sampling_level="sequence"``).
* cispo clips the ratio above at ``epsilon_high`` (an absolute cap, no lower bound).
* ``delta`` applies to the ppo-clip losses only (TRL ignores it for cispo, sapo, vespo).
* the entropy bonus is ``entropy_coef * mean(H)`` over the kept tokens, independent of the
  aggregation (``entropy_agg="token-mean"``).
* ``top_entropy_quantile`` keeps tokens with ``H >=`` the ``1 - q`` quantile (0 keeps the top) of the
  valid entropies; TRL takes it over every process's tokens: :func:`entropy_threshold` computes
  it so, and ``GRPOLoss(..., entropy_threshold=...)`` uses it.
* the off-policy mask measures ``mean(sampling_logprobs - lp)`` when sampling log-probs are given.
* inference-engine importance sampling: pass TRL's ``importance_sampling_ratio`` (it multiplies
  the policy term; vespo folds it into its sequence weight), or ``sampling_logprobs`` and the
  ratio is computed in the kernel from ``vllm_importance_sampling_mode`` and its clip bounds
  (truncate modes clamp to ``[clip_min, clip_max]``; a NaN sampling log-prob is a log-ratio of 0).
  A ratio given without ``use_vllm`` and ``vllm_importance_sampling_correction`` raises (TRL
  computes it only then).
* ``cispo_clip_ratio`` under ``importance_sampling_level="sequence"`` averages over every row, and
  counts an empty completion (ratio ``exp(0) = 1``) with a positive advantage as clipped when
  ``epsilon_high < 1``, as TRL does.
* completions one token long (``T == 1``): TRL reads its ``[B, 1]`` tensors as one value per
  sequence, so ``kl``, ``entropy`` and the clip ratios average over every row, masked ones
  included; the profile logs the same.
* vespo: like TRL's trainer the profile refuses vLLM importance sampling in a ``sequence_*``
  mode. Under ``importance_sampling_level="sequence"`` TRL's vespo weighs only its bias-corrected
  KL (``beta != 0``, ``use_bias_correction_kl``) by the sequence ratio: the profile refuses that
  combination, and otherwise ignores the level, as TRL does (with a warning).

Metrics come back under TRL's names: ``kl``, ``entropy``, ``policy_loss`` and ``entropy_coef``
(with an entropy bonus), ``clip_ratio/low_mean``,
``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
``clip_ratio/region_mean`` (ppo-clip losses), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, as
0-dim device tensors (TRL gathers and logs them as floats). ``use_adaptive_entropy`` is a
controller that lives in the trainer: each call takes its current coefficient as ``entropy_coef``
(the drop-in ``GRPOTrainer`` runs TRL's controller).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations.trl._config import check_keys
from fastalign.policy import entropy_quantile, policy_loss
from fastalign.policy_config import SEQUENCE_LEVEL_ROWS
from fastalign.policy_config import OptionError, PolicyConfig, log_ratio_cap_option

__all__ = ["GRPOLoss", "entropy_threshold", "grpo_policy_config"]

#: GRPO-family ``loss_type`` (TRL's names, which Liger-Kernel's GRPO loss shares) -> (fastalign loss row,
#: aggregation, sequence count, normalised by the batch's token count ``num_items_in_batch``)
GRPO_LOSSES = {
    "grpo": ("ppo", "seq-mean-token-mean", "all", False),
    "bnpo": ("ppo", "token-mean", None, False),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm", "all", False),
    "dapo": ("ppo", "token-mean", None, True),
    "luspo": ("ppo", "seq-mean-token-sum", "all", False),
    "cispo": ("cispo", "token-mean", None, True),
    "sapo": ("sapo", "seq-mean-token-mean", "all", False),
    "vespo": ("vespo", "token-mean", None, True),
}
_DEFAULTS = {
    "loss_type": "dapo", "epsilon": 0.2, "epsilon_high": None, "delta": None, "beta": 0.0,
    "use_bias_correction_kl": True, "importance_sampling_level": "token", "top_entropy_quantile": 1.0,
    "off_policy_mask_threshold": None, "entropy_coef": 0.0, "use_adaptive_entropy": False,
    "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0, "max_completion_length": 512, "steps_per_generation": None,
    "generation_batch_size": None, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "use_vllm": False, "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask", "vllm_importance_sampling_clip_min": None,
    "vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_cap": None,
}
#: the ``GRPOConfig`` fields behind each :class:`fastalign.PolicyConfig` option (an option's error names them)
_OPTION_FIELDS = {
    "eps_low": "epsilon / epsilon_high", "eps_high": "epsilon / epsilon_high", "cispo_high": "epsilon_high",
    "max_len": "max_completion_length", "delta": "delta",
    "sapo_tau_pos": "sapo_temperature_pos", "sapo_tau_neg": "sapo_temperature_neg",
    "vespo_k_pos": "vespo_k_pos", "vespo_k_neg": "vespo_k_neg", "vespo_lambda_pos": "vespo_lambda_pos",
    "vespo_lambda_neg": "vespo_lambda_neg", "kl_coef": "beta",
    "entropy_quantile": "top_entropy_quantile", "offpolicy_threshold": "off_policy_mask_threshold",
    "entropy_coef": "entropy_coef", "rollout_min": "vllm_importance_sampling_clip_min",
    "rollout_max": "vllm_importance_sampling_clip_max",
}


#: the number and switch fields among ``_DEFAULTS``; the optional numbers may be None (unset in TRL)
_NUMBER_FIELDS = ("epsilon", "beta", "top_entropy_quantile", "entropy_coef", "sapo_temperature_pos",
                  "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
_OPTIONAL_NUMBER_FIELDS = ("epsilon_high", "delta", "off_policy_mask_threshold", "vllm_importance_sampling_clip_min",
                           "vllm_importance_sampling_clip_max", "vllm_importance_sampling_cap")
_SWITCH_FIELDS = ("use_bias_correction_kl", "use_adaptive_entropy", "use_vllm", "vllm_importance_sampling_correction")


def _checked(c: Dict[str, Any]) -> Dict[str, Any]:
    """``c`` with its number fields checked as real numbers (or None) and its switches as bools, naming the field
    (``GRPOConfig.beta``): a string such as ``"0.1"`` raises, not converted."""
    for field in _NUMBER_FIELDS + _OPTIONAL_NUMBER_FIELDS:
        if c[field] is not None or field in _NUMBER_FIELDS:
            _validate.number(f"GRPOConfig.{field}", c[field])
    for field in _SWITCH_FIELDS:
        c[field] = _validate.boolean(f"GRPOConfig.{field}", c[field])
    return c


def _check_not_experimental(args: Any) -> None:
    """A ``ValueError`` for a config of one of TRL's experimental ``GRPOConfig`` subclasses (``trl.experimental``),
    whose trainer replaces ``GRPOTrainer``'s loss with its own: ``GMPOConfig`` has its own profile
    (:class:`~fastalign.integrations.trl.GMPOLoss`, which ``GRPOLoss`` returns for it); the profile maps
    ``GRPOTrainer``'s loss only, and would give another one under the same fields. A user's own subclass is read as
    a ``GRPOConfig``."""
    from fastalign.integrations.trl.gmpo import is_gmpo_config

    cls = type(args)
    if is_gmpo_config(args):
        raise ValueError(f"{cls.__name__} configures GMPOTrainer, whose loss (a geometric mean of log-clipped "
                         "ratios, its KL over every completion token) is not one PolicyConfig; use "
                         "fastalign.integrations.trl.GMPOLoss (GRPOLoss(config) returns it) or the drop-in GMPOTrainer")
    if cls.__module__.startswith("trl.experimental") and any(
            base.__name__ == "GRPOConfig" and base.__module__.startswith("trl.") for base in cls.__mro__[1:]):
        raise ValueError(f"{cls.__name__} ({cls.__module__}) configures another trainer's loss than GRPOTrainer's "
                         f"(its trainer overrides _compute_loss); fastalign has no profile for it. Pass a "
                         f"GRPOConfig for GRPOTrainer's loss, or use fastalign.policy_loss with the loss_type it needs")


def _fields(args: Any) -> Dict[str, Any]:
    """The ``GRPOConfig`` fields the profile reads (those of ``_DEFAULTS``), as ``GRPOTrainer`` sees them.

    A config object is read as it is (a ``GRPOConfig`` has run its ``__post_init__``); a field it lacks
    takes TRL's default. A dict's keys are checked (:func:`~fastalign.integrations.trl._config.check_keys`),
    the fields it does not give take TRL 1.16's defaults (``max_completion_length=512`` among them), and
    ``GRPOConfig.__post_init__``'s rules for the fields read follow, with its errors (``ValueError``):

    * the deprecated ``vllm_importance_sampling_cap``, when set, replaces ``vllm_importance_sampling_clip_max``;
    * ``generation_batch_size`` and ``steps_per_generation`` cannot both be set. With neither,
      ``steps_per_generation = gradient_accumulation_steps``; with ``generation_batch_size`` alone it is
      ``generation_batch_size // (per_device_train_batch_size * world_size)``. :class:`GRPOLoss` derives
      it (the latter per call, with ``world_size = num_processes``); here it stays None;
    * ``vllm_importance_sampling_clip_min < vllm_importance_sampling_clip_max``, and a ``*_truncate`` mode
      with ``vllm_importance_sampling_correction`` needs one of the two.
    """
    check_keys(args, _DEFAULTS, "GRPOConfig")
    _check_not_experimental(args)
    if not isinstance(args, Mapping):
        return _checked({k: getattr(args, k, v) for k, v in _DEFAULTS.items()})
    c = _checked({k: args.get(k, v) for k, v in _DEFAULTS.items()})
    if c["vllm_importance_sampling_cap"] is not None:  # deprecated in TRL, which copies it so
        c["vllm_importance_sampling_clip_max"] = c["vllm_importance_sampling_cap"]
    if c["generation_batch_size"] is not None and c["steps_per_generation"] is not None:
        raise ValueError("GRPOConfig.generation_batch_size and GRPOConfig.steps_per_generation cannot both be set "
                         "(TRL derives each from the other)")
    lo, hi = c["vllm_importance_sampling_clip_min"], c["vllm_importance_sampling_clip_max"]
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"GRPOConfig.vllm_importance_sampling_clip_min ({lo}) must be less than "
                         f"GRPOConfig.vllm_importance_sampling_clip_max ({hi})")
    if (c["vllm_importance_sampling_correction"] and lo is None and hi is None
            and c["vllm_importance_sampling_mode"] in ("token_truncate", "sequence_truncate")):
        raise ValueError("GRPOConfig.vllm_importance_sampling_mode "
                         f"{c['vllm_importance_sampling_mode']!r} needs vllm_importance_sampling_clip_min or "
                         "vllm_importance_sampling_clip_max")
    return c


def grpo_policy_config(args: Any, *, sampling_correction: bool = False) -> PolicyConfig:
    """The :class:`fastalign.PolicyConfig` of a TRL ``GRPOConfig`` (object or dict).

    ``sampling_correction``: the importance ratio to the inference engine is computed from
    sampling log-probs in the kernel (``rollout_correction``) rather than passed precomputed.
    """
    c = _fields(args)
    loss_type = c["loss_type"]
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"GRPOConfig.loss_type must be one of {tuple(GRPO_LOSSES)}, got {loss_type!r}")
    row, agg, seq_count, _ = GRPO_LOSSES[loss_type]
    mode = c["vllm_importance_sampling_mode"]
    if (row == "vespo" and c["use_vllm"] and c["vllm_importance_sampling_correction"]
            and mode not in ("token_truncate", "token_mask")):  # as GRPOTrainer refuses it
        raise ValueError("loss_type 'vespo' with vLLM importance sampling needs vllm_importance_sampling_mode "
                         f"'token_truncate' or 'token_mask', got {mode!r}")
    level = c["importance_sampling_level"]
    if level == "sequence" and row not in SEQUENCE_LEVEL_ROWS:
        # vespo: TRL's loss reads the level only where the bias-corrected KL multiplies by the ratio
        if float(c["beta"]) != 0.0 and c["use_bias_correction_kl"]:
            takes = tuple(t for t, spec in GRPO_LOSSES.items() if spec[0] in SEQUENCE_LEVEL_ROWS)
            raise ValueError(f"GRPOConfig.importance_sampling_level='sequence' applies to loss_type {takes}, not "
                             f"to {loss_type!r}: TRL then weighs only its bias-corrected KL (beta != 0, "
                             f"use_bias_correction_kl) by the sequence ratio, which the profile does not map; set "
                             f"it to 'token', beta=0 or use_bias_correction_kl=False")
        level = "token"  # TRL ignores it there (with a warning): the same numbers
    eps_low = float(c["epsilon"])
    eps_high = c["epsilon_high"]
    eps_high = eps_low if eps_high is None else float(eps_high)
    opts: dict = dict(loss_type=row, agg=agg, seq_count=seq_count,
                      importance_sampling_level=level)
    if row == "ppo":
        opts.update(eps_low=eps_low, eps_high=eps_high)
    if row in ("gspo", "gmpo"):
        opts.pop("agg")
    if loss_type == "dr_grpo":  # TRL divides by B * max_completion_length
        opts["max_len"] = _validate.at_least("GRPOConfig.max_completion_length", c["max_completion_length"])
    if row == "ppo" and c["delta"] is not None:
        opts["delta"] = float(c["delta"])
    if row == "cispo":
        opts.update(cispo_low=0.0, cispo_high=eps_high)
    if row == "sapo":
        opts.update(sapo_tau_pos=float(c["sapo_temperature_pos"]), sapo_tau_neg=float(c["sapo_temperature_neg"]))
    if row == "vespo":
        opts.update({name: float(c[name]) for name in ("vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos",
                                                       "vespo_lambda_neg")})
    beta = float(c["beta"])
    if beta != 0.0:
        opts.update(kl_coef=beta, kl_type="k3", kl_clamp=False,
                    kl_rho="grad" if c["use_bias_correction_kl"] else False)
    q = float(c["top_entropy_quantile"])
    if q < 1.0:
        opts["entropy_quantile"] = q
    # TRL's ratio is exp(l) (or exp(mean l)) with no clamp
    opts.update(log_ratio_cap_option(row, opts.get("kl_rho", False), math.inf))
    if c["off_policy_mask_threshold"] is not None:
        opts["offpolicy_threshold"] = float(c["off_policy_mask_threshold"])
    coef = float(c["entropy_coef"])
    if coef != 0.0:
        opts.update(entropy_coef=coef, entropy_agg="token-mean")
    if sampling_correction:
        lo = c["vllm_importance_sampling_clip_min"]
        hi = c["vllm_importance_sampling_clip_max"]
        opts.update(rollout_correction=mode, rollout_min=0.0 if lo is None else float(lo),
                    rollout_max=float("inf") if hi is None else float(hi))
    try:
        return PolicyConfig(**opts)
    except OptionError as e:  # name the GRPOConfig fields behind the option
        if e.option not in _OPTION_FIELDS:
            raise
        raise ValueError(f"GRPOConfig.{_OPTION_FIELDS[e.option]}: {e}") from e


def entropy_threshold(entropy: Tensor, mask: Tensor, top_quantile: float, accelerator=None) -> Tensor:
    r"""The ``1 - top_quantile`` quantile of the valid entropies (``mask != 0``) of every process, on the device.

    With ``s`` the ``n`` valid entropies sorted and ``r = (1 - top_quantile)(n - 1)`` it is
    ``s[floor r] + (r - floor r)(s[ceil r] - s[floor r])`` (``torch.quantile``'s linear
    interpolation); ``H >= it`` keeps the ``top_quantile`` share of highest-entropy tokens. NaN when
    no process holds a valid token, or when a valid entropy is NaN (both keep no token).
    ``accelerator`` (an ``accelerate.Accelerator``) gathers every process's entropies, padded to
    one length, as TRL's ``get_high_entropy_mask`` does; without it the quantile is this batch's.
    ``entropy`` is a floating tensor, ``mask`` a real tensor of its shape, ``top_quantile`` a number in [0, 1].
    """
    _validate.any_float("entropy", entropy)
    _validate.like(tuple(entropy.shape), "the shape of entropy", kind="real", device=entropy.device,
                   device_of="entropy", mask=_validate.tensor("mask", mask))
    q = _validate.finite_number("top_quantile", top_quantile)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"top_quantile must lie in [0, 1], got {top_quantile}")
    h = torch.where(mask.bool(), entropy.detach().float(), math.inf).flatten()
    if accelerator is not None and accelerator.num_processes > 1:
        h = accelerator.gather(accelerator.pad_across_processes(h, dim=0, pad_index=math.inf))
    counted = h != math.inf  # no valid token anywhere, or a NaN among them: NaN, as torch.quantile gives
    return torch.where(counted.any() & ~torch.isnan(h).any(), entropy_quantile(h, q), math.nan)


class GRPOLoss:
    """TRL's ``GRPOTrainer`` loss from its ``GRPOConfig``: ``GRPOLoss(grpo_config)(logprobs, ...)``.

    ``__call__(logprobs, old_logprobs, advantages, completion_mask, *, entropy, ref_logprobs=None,
    sampling_logprobs=None, importance_sampling_ratio=None, num_items_in_batch=None,
    num_processes=1, training=True)`` takes the tensors of ``_compute_loss`` (``completion_mask``
    times the tool mask when there is one; ``old_logprobs=None`` means on-policy,
    ``logprobs.detach()``) and returns ``(loss, metrics)`` under TRL's names. ``entropy`` (``[B, T]``)
    is required as in TRL (it is logged); ``num_items_in_batch`` (the generation batch's token
    count) is required for dapo / cispo / vespo, clamped to >= 1 as TRL does; a NaN count raises
    where it is on the host (a number, a CPU tensor) and gives TRL's NaN loss on the device.
    ``gradient_accumulation_steps`` (this window's, default the config's) and the config's
    ``steps_per_generation`` are ints >= 1; a dict that gives ``generation_batch_size`` instead
    takes ``steps_per_generation = generation_batch_size // (per_device_train_batch_size *
    num_processes)``, as ``GRPOConfig`` derives it with its world size. With
    ``top_entropy_quantile < 1``, ``entropy_threshold`` (:func:`entropy_threshold` over every
    process) replaces this micro-batch's own entropy quantile. With ``use_adaptive_entropy`` each
    call takes the controller's coefficient for this step as ``entropy_coef`` (0 while the entropy
    is above ``entropy_target``); the bonus is then on even at 0, as in TRL (``policy_loss`` and
    ``entropy_coef`` logged).

    ``GRPOLoss(gmpo_config)`` for TRL's experimental ``GMPOConfig`` returns a
    :class:`~fastalign.integrations.trl.GMPOLoss`, ``GMPOTrainer``'s loss (a dict is read as a ``GRPOConfig``:
    pass it to ``GMPOLoss`` for GMPO's).
    """

    def __new__(cls, args: Any):
        from fastalign.integrations.trl.gmpo import GMPOLoss, is_gmpo_config

        if cls is GRPOLoss and is_gmpo_config(args):
            return GMPOLoss(args)
        return super().__new__(cls)

    def __init__(self, args: Any):
        self.args = args
        c = _fields(args)
        self.loss_type = c["loss_type"]
        self.config = grpo_policy_config(args)
        self._normalised = GRPO_LOSSES[self.loss_type][3]
        ga = c["gradient_accumulation_steps"]
        self.grad_accum = 1 if ga is None else _validate.at_least("GRPOConfig.gradient_accumulation_steps", ga)
        spg = c["steps_per_generation"]
        if spg is None and c["generation_batch_size"] is None:
            spg = self.grad_accum
        #: None: ``generation_batch_size // (per_device_train_batch_size * num_processes)`` at each call
        self.steps_per_generation = None if spg is None else _validate.at_least("GRPOConfig.steps_per_generation", spg)
        if spg is None:
            self._generation_batch = (
                _validate.at_least("GRPOConfig.generation_batch_size", c["generation_batch_size"]),
                _validate.at_least("GRPOConfig.per_device_train_batch_size", c["per_device_train_batch_size"]))
        self.is_correction = bool(c["use_vllm"]) and bool(c["vllm_importance_sampling_correction"])
        self.correction_config = grpo_policy_config(args, sampling_correction=True) if self.is_correction else None
        self.adaptive_entropy = bool(c["use_adaptive_entropy"])

    def _steps_per_generation(self, num_processes: int) -> int:
        """``steps_per_generation``, or ``GRPOConfig.__post_init__``'s ``generation_batch_size //
        (per_device_train_batch_size * world_size)`` with ``world_size = num_processes``."""
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        generation, per_device = self._generation_batch
        global_batch = per_device * _validate.at_least("num_processes", num_processes)
        if generation % global_batch:
            raise ValueError(f"GRPOConfig.generation_batch_size ({generation}) must be divisible by the global batch "
                             f"size per_device_train_batch_size * num_processes ({global_batch})")
        return generation // global_batch

    def __call__(self, logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                 completion_mask: Tensor, *, entropy: Tensor, ref_logprobs: Optional[Tensor] = None,
                 sampling_logprobs: Optional[Tensor] = None, importance_sampling_ratio: Optional[Tensor] = None,
                 num_items_in_batch=None, num_processes: int = 1, training: bool = True,
                 gradient_accumulation_steps: Optional[int] = None,
                 entropy_threshold: Optional[Tensor] = None,
                 entropy_coef: Optional[float] = None) -> tuple[Tensor, dict]:
        cfg = self.config
        _check_inputs(logprobs, old_logprobs, advantages, completion_mask, entropy, ref_logprobs, sampling_logprobs,
                      importance_sampling_ratio, num_items_in_batch)
        _validate.at_least("num_processes", num_processes)
        _validate.boolean("training", training)
        if self.adaptive_entropy != (entropy_coef is not None):
            raise ValueError("entropy_coef is the adaptive controller's coefficient of this step: pass it exactly when "
                             "use_adaptive_entropy=True")
        if entropy_coef is not None:
            coef = _validate.finite_number("entropy_coef", entropy_coef)
            cfg = PolicyConfig.make(cfg, entropy_coef=coef, entropy_agg="token-mean" if coef else "loss")
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
        ga = self.grad_accum
        if gradient_accumulation_steps is not None:
            ga = _validate.at_least("gradient_accumulation_steps", gradient_accumulation_steps)
        kw: dict = dict(entropy=entropy, ref_logprobs=ref_logprobs if cfg.kl_coef != 0.0 else None)
        if entropy_threshold is not None:
            kw["entropy_threshold"] = entropy_threshold
        if importance_sampling_ratio is not None and not self.is_correction:
            raise ValueError("importance_sampling_ratio applies with use_vllm=True and "
                             "vllm_importance_sampling_correction=True only (GRPOTrainer computes it only then)")
        if self.is_correction:
            if importance_sampling_ratio is not None:
                kw["importance_weights"] = importance_sampling_ratio
            elif sampling_logprobs is not None and cfg.row != "vespo":
                cfg = PolicyConfig.make(self.correction_config, entropy_coef=cfg.entropy_coef,
                                        entropy_agg=cfg.entropy_agg)
            else:
                raise ValueError("vLLM importance sampling needs importance_sampling_ratio (or sampling_logprobs)")
        if cfg.offpolicy_threshold is not None or cfg.rollout_correction is not None:
            kw["rollout_logprobs"] = sampling_logprobs
        if self._normalised:
            if num_items_in_batch is None:
                raise ValueError(f"loss_type {self.loss_type!r} needs num_items_in_batch")
            # a NaN count raises on the host; on the device it stays NaN through the clamp and the division by
            # the global count: a NaN loss, as TRL's sum / NaN
            n = torch.as_tensor(num_items_in_batch, dtype=torch.float32)  # a host number: a CPU tensor
            _validate.flag_or_raise(torch.isnan(n).any(), n, lambda: "num_items_in_batch must not be NaN (TRL's loss "
                                    "would be NaN)")
            n = n.to(logprobs.device).clamp(min=1.0)
            kw["global_tokens"] = n / self._steps_per_generation(num_processes) if training else n
            cfg = PolicyConfig.make(cfg, dp_size=int(num_processes))
        loss, met = policy_loss(logprobs, old_logprobs, advantages, completion_mask, config=cfg, **kw)
        metric_mask = completion_mask
        if logprobs.shape[1] == 1:  # TRL reads [B, 1] tensors as one value per row: means over every row
            metric_mask = torch.ones_like(completion_mask)
            met.update(_every_row_metrics(self.config, logprobs, old_logprobs, advantages, completion_mask, entropy,
                                          ref_logprobs, kw.get("importance_weights")))
        if self.adaptive_entropy:  # the bonus stays on at a coefficient of 0: TRL logs policy_loss then too
            met.setdefault("policy_term", loss.detach())
        scale = ga if training else 1
        if scale != 1:
            loss = loss / scale
        out = {}
        if "policy_term" in met:  # TRL logs the loss before the entropy bonus (token-sum losses: per window)
            out["policy_loss"] = met["policy_term"] / scale if self._normalised else met["policy_term"]
            if training:
                out["entropy_coef"] = torch.tensor(cfg.entropy_coef, device=loss.device)
        if cfg.kl_coef != 0.0:
            out["kl"] = met["kl"]
        out["entropy"] = met["entropy"]
        if cfg.row == "ppo":
            out.update({"clip_ratio/low_mean": met["clip_low"], "clip_ratio/high_mean": met["clip_high"],
                        "clip_ratio/region_mean": met["clip_region"], "clip_ratio/low_min": met["clip_low_min"],
                        "clip_ratio/high_max": met["clip_high_max"]})
        elif cfg.row == "cispo":
            out["cispo_clip_ratio"] = met["clip_high"] + _empty_rows_clipped(cfg, advantages, metric_mask)
        elif cfg.row == "vespo":
            out["vespo/phi_seq_mean"] = met["phi_mean"]
        return loss, out


def _check_inputs(logprobs, old_logprobs, advantages, completion_mask, entropy, ref_logprobs, sampling_logprobs,
                  importance_sampling_ratio, num_items_in_batch) -> None:
    """:class:`GRPOLoss`'s tensors checked under its own (TRL's) names, before any is read: a ``TypeError`` /
    ``ValueError`` naming ``completion_mask`` or ``sampling_logprobs``, not the core loss's ``response_mask`` or
    ``rollout_logprobs``. ``entropy`` is required (TRL logs its token mean)."""
    _validate.floating("logprobs", logprobs, dim=2)
    shape, device = tuple(logprobs.shape), logprobs.device
    if entropy is None:
        raise ValueError("entropy must be a [B, T] tensor like logprobs (TRL logs its token mean), got None")
    per_token = dict(device=device, device_of="logprobs")
    _validate.like(shape, "logprobs.shape", kind="float", **per_token, old_logprobs=old_logprobs,
                   entropy=entropy, ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs)
    _validate.like(shape, "logprobs.shape", kind="real", **per_token,
                   completion_mask=_validate.tensor("completion_mask", completion_mask))
    _validate.host_binary_mask("completion_mask", completion_mask)  # TRL would weigh a fractional one
    _validate.like([shape[:1], shape], "[B] or logprobs.shape", kind="float", **per_token,
                   advantages=_validate.tensor("advantages", advantages))
    _validate.like([shape[:1], (shape[0], 1), shape], "[B], [B, 1] or logprobs.shape", kind="float", **per_token,
                   importance_sampling_ratio=importance_sampling_ratio)
    if isinstance(num_items_in_batch, Tensor):
        _validate.real("num_items_in_batch", num_items_in_batch)
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
    elif num_items_in_batch is not None:
        _validate.number("num_items_in_batch", num_items_in_batch)


def _every_row_metrics(cfg: PolicyConfig, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                       entropy: Tensor, ref_logprobs: Optional[Tensor], importance_weights: Optional[Tensor]) -> dict:
    """The metrics TRL logs when the completions are one token long (``T == 1``): its ``[B, 1]`` tensors then
    read as one value per sequence, so ``kl``, ``entropy``, the clip ratios and (with ``[B, 1]`` advantages)
    vespo's ``phi_mean`` are means over every row, masked ones included, and ``clip_ratio/low_min`` /
    ``high_max`` take every row's value. They are the metrics of an all-ones mask, with a masked row's
    log-ratio 0 where TRL sums it under the mask (``importance_sampling_level="sequence"``: ``sum_m l /
    max(sum_m 1, 1)``; vespo's ``log w = sum_m l + sum log(is_ratio)``, the vLLM ratio over every
    position). With ``[B]`` advantages ``phi_mean`` is one value per row already and is left as it is."""
    lp, old, ones = logprobs.detach(), old_logprobs.detach(), torch.ones_like(mask)
    masked_old = lp - (lp - old) * mask  # l * m, as TRL's masked sum (a NaN log-ratio stays NaN)
    metrics_cfg = PolicyConfig.make(cfg, entropy_coef=0.0, entropy_agg="loss", entropy_quantile=None,
                                    offpolicy_threshold=None)
    # the KL term's ratio (use_bias_correction_kl) is the unmasked exp(l) at token level
    _, met = policy_loss(lp, masked_old if cfg.importance_sampling_level == "sequence" else old, advantages, ones,
                         config=metrics_cfg, entropy=entropy.detach(),
                         ref_logprobs=ref_logprobs if cfg.kl_coef != 0.0 else None)
    out = {k: v for k, v in met.items() if k in ("kl", "entropy") or k.startswith("clip_")}
    if cfg.row == "vespo" and advantages.dim() == 2:
        vespo_cfg = PolicyConfig.make(loss_type="vespo", vespo_k_pos=cfg.vespo_k_pos, vespo_k_neg=cfg.vespo_k_neg,
                                      vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_lambda_neg=cfg.vespo_lambda_neg,
                                      backend=cfg.backend)  # phi reads these alone
        kw = {} if importance_weights is None else dict(importance_weights=importance_weights)
        out["phi_mean"] = policy_loss(lp, masked_old, advantages, ones, config=vespo_cfg, **kw)[1]["phi_mean"]
    return out


def _empty_rows_clipped(cfg: PolicyConfig, advantages: Tensor, mask: Tensor) -> Tensor:
    """TRL's share of rows counted as cispo-clipped that have no completion token, under
    ``importance_sampling_level="sequence"`` with one advantage per row: there the row's ratio is
    ``exp(0 / 1) = 1`` and the metric averages over every row, so such a row counts as clipped when
    ``1 > epsilon_high`` and its advantage is positive. 0 otherwise."""
    B = mask.shape[0]
    per_row = advantages.dim() == 1 or advantages.shape[-1] == 1
    if cfg.importance_sampling_level != "sequence" or not per_row or B == 0 or not 1.0 > cfg._cispo_bounds()[1]:
        return torch.zeros((), device=advantages.device)
    empty = (mask.reshape(B, -1).sum(-1) == 0) & (advantages.reshape(B) > 0)
    return empty.sum(dtype=torch.float32) / B
