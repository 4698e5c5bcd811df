"""fastalign: fused kernels for RL and preference training of language models.

Public API (see SPEC.md for every formula):

* :func:`token_logprobs` — log-probs, entropy, sum p^2, argmax from logits.
* :func:`policy_loss`, :class:`PolicyLoss` — PPO/GRPO-family losses, fused.
* :func:`kl_penalty`, :func:`aggregate_loss` — KL estimators and loss aggregation.
* :func:`use_backend` — force the Triton, C++ or CUDA kernels.
"""
from fastalign._backend import use_backend
from fastalign.logprobs import TokenStats, token_logprobs
from fastalign.aggregate import aggregate_loss
from fastalign.kl import kl_penalty
from fastalign.policy import PolicyLoss, policy_loss

__all__ = ["TokenStats", "token_logprobs", "use_backend"]
__all__ += ["PolicyLoss", "aggregate_loss", "kl_penalty", "policy_loss"]
__version__ = "0.1.0"
