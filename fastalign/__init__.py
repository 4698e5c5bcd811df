"""fastalign: fused kernels for RL and preference training of language models.

Public API (see docs/math.md for every formula):

* :func:`token_logprobs` — log-probs, entropy, sum p^2, argmax from logits.
* :func:`linear_logprobs` — the same statistics from hidden states and the lm_head weight.
* :func:`policy_loss`, :class:`PolicyLoss` — PPO/GRPO-family losses, fused.
* :class:`LinearPolicyLoss` — the policy loss straight from hidden states and the lm_head weight.
* :func:`kl_penalty`, :func:`aggregate_loss` — KL estimators and loss aggregation.
* :func:`preference_loss`, :class:`PreferenceLoss`, :class:`LinearPreferenceLoss` — the DPO
  family (docs/math.md#preference-losses), :func:`unpaired_preference_loss` for unpaired (KTO-style)
  data; :func:`sequence_logprobs` for padded and packed batches.
* :func:`group_advantages`, :func:`token_advantages` — GRPO-family advantages (docs/math.md#advantages);
  token-level :func:`reinforce_pp_advantages`, :func:`remax_advantages`,
  :func:`gae_advantages`, :func:`implicit_process_advantages`, :func:`optimal_token_baseline_advantages`,
  :func:`iw_opd_advantages`.
* :func:`token_divergence` — the per-token distillation divergence (generalized JSD, total variation or cosine
  distance) with the student's entropy and NLL, from both models' logits; :func:`elementwise_divergence` — the
  JSD, KL or total variation between given (log-)probabilities, differentiated element by element
  (docs/math.md#elementwise-divergence).
* :func:`linear_divergence_loss` — the distillation loss (generalized JSD, total variation or cosine distance
  between a student and a teacher) from both models' hidden states and heads (docs/math.md#distillation-divergence).
* :func:`linear_topk_logprobs` — the head's log-probs over each token's top-k support (or a support given), from
  hidden states (docs/math.md#top-k-support).
* :func:`linear_mean_logits` — the head's mean logit at each position (a logged metric), from hidden states
  (docs/math.md#mean-logit).
* :func:`linear_soft_cross_entropy` — the cross-entropy of the head's distribution against soft targets (a
  teacher's cached probabilities), from hidden states (docs/math.md#soft-targets).
* :func:`use_backend` — force the Triton, C++ or CUDA kernels.
"""
from fastalign._backend import use_backend
from fastalign._deprecate import RenamedWarning
from fastalign.advantages import (AdvantagesAndReturns, gae_advantages, group_advantages, implicit_process_advantages,
                                  iw_opd_advantages, masked_whiten, optimal_token_baseline_advantages,
                                  reinforce_pp_advantages, remax_advantages, token_advantages)
from fastalign.aggregate import aggregate_loss
from fastalign.divergence import TokenDivergence, elementwise_divergence, token_divergence
from fastalign.kl import kl_penalty
from fastalign.linear import linear_logprobs
from fastalign.linear_divergence import linear_divergence_loss
from fastalign.linear_mean import linear_mean_logits
from fastalign.linear_soft import linear_soft_cross_entropy
from fastalign.linear_policy import LinearPolicyLoss
from fastalign.linear_topk import TopKSupport, linear_topk_logprobs
from fastalign.logprobs import TokenStats, token_logprobs
from fastalign.policy import PolicyLoss, SharedSeed, policy_loss
from fastalign.policy_config import POLICY_LOSS_TYPES, OptionError, PolicyConfig
from fastalign.linear_preference import LinearPreferenceLoss
from fastalign.preference import (PREFERENCE_LOSS_TYPES, PreferenceLoss, preference_loss, unpaired_preference_loss,
                                  wpo_weights)
from fastalign.sequence import SequenceLogprobs, sequence_logprobs
from fastalign.info import info

__all__ = [
    "TokenStats", "info", "linear_logprobs", "token_logprobs", "use_backend", "TokenDivergence", "token_divergence",
    "elementwise_divergence", "gae_advantages", "group_advantages", "implicit_process_advantages", "iw_opd_advantages", "masked_whiten",
    "optimal_token_baseline_advantages", "reinforce_pp_advantages", "remax_advantages", "token_advantages",
    "POLICY_LOSS_TYPES", "PolicyConfig", "PolicyLoss", "aggregate_loss", "kl_penalty", "policy_loss",
    "LinearPolicyLoss", "linear_divergence_loss", "linear_mean_logits",
    "linear_soft_cross_entropy", "TopKSupport", "linear_topk_logprobs",
    "PREFERENCE_LOSS_TYPES", "LinearPreferenceLoss", "PreferenceLoss", "SequenceLogprobs", "preference_loss",
    "sequence_logprobs", "unpaired_preference_loss", "wpo_weights", "AdvantagesAndReturns", "OptionError",
    "RenamedWarning", "SharedSeed",
]
__version__ = "0.1.0"

#: former public names -> (current name, value)
_DEPRECATED = {"LOSS_TYPES": ("PREFERENCE_LOSS_TYPES", PREFERENCE_LOSS_TYPES)}


def __getattr__(name):
    if name in _DEPRECATED:
        from fastalign._deprecate import warn

        new, value = _DEPRECATED[name]
        warn(f"fastalign.{name} is deprecated: use fastalign.{new} (fastalign.POLICY_LOSS_TYPES lists the policy "
             f"losses)")
        return value
    raise AttributeError(f"module 'fastalign' has no attribute {name!r}")
