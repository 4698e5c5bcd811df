"""fastalign: fused kernels for RL and preference training of language models.

Public API (see SPEC.md for every formula):

* :func:`token_logprobs` — log-probs, entropy, sum p^2, argmax from logits.
* :func:`linear_logprobs` — the same statistics from hidden states and the lm_head weight.
* :func:`use_backend` — force the Triton, C++ or CUDA kernels.
"""
from fastalign._backend import use_backend
from fastalign.linear import linear_logprobs
from fastalign.logprobs import TokenStats, token_logprobs

__all__ = ["TokenStats", "linear_logprobs", "token_logprobs", "use_backend"]
__version__ = "0.1.0"
