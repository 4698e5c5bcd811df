"""Plain PyTorch for every formula in SPEC.md: the test oracle and the benchmark
baseline. Obviously correct first, fast never; float64 where asked. Never used
as a silent fallback by the product path. One module per SPEC section."""
from fastalign.reference.logprobs import eager_logprobs_entropy, token_logprobs
from fastalign.reference import policy
from fastalign.reference.policy import aggregate_loss, kl_penalty, policy_loss

__all__ = ["eager_logprobs_entropy", "token_logprobs"]
__all__ += ["aggregate_loss", "kl_penalty", "policy", "policy_loss"]
