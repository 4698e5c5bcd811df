"""Plain PyTorch for every formula in docs/math.md: the test oracle and the benchmark
baseline. Obviously correct first, fast never; float64 where asked. Never used
as a silent fallback by the product path. One module per docs/math.md section."""
from fastalign.reference import advantages, divergence, policy, preference
from fastalign.reference.linear import (eager_linear_logprobs_entropy, linear_logits, linear_logprobs,
                                       linear_topk_logprobs)
from fastalign.reference.logprobs import eager_logprobs_entropy, token_logprobs
from fastalign.reference.policy import aggregate_loss, kl_penalty, policy_loss

__all__ = [
    "advantages", "divergence", "policy", "preference",
    "eager_linear_logprobs_entropy", "eager_logprobs_entropy", "linear_logits", "linear_logprobs",
    "linear_topk_logprobs", "token_logprobs",
    "aggregate_loss", "kl_penalty", "policy_loss",
]
