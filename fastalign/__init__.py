"""fastalign: fused kernels for RL and preference training of language models.

Public API (see SPEC.md for every formula):

* :func:`token_logprobs` — log-probs, entropy, sum p^2, argmax from logits.
* :func:`linear_logprobs` — the same statistics from hidden states and the lm_head weight.
* :func:`preference_loss`, :class:`PreferenceLoss` — the DPO family (SPEC §6).
* :func:`sequence_logprobs` — per-sequence sums / means of token log-probs.
* :func:`use_backend` — force the Triton, C++ or CUDA kernels.
"""
from fastalign._backend import use_backend
from fastalign.linear import linear_logprobs
from fastalign.logprobs import TokenStats, token_logprobs
from fastalign.preference import LOSS_TYPES, LinearPreferenceLoss, PreferenceLoss, preference_loss, wpo_weights
from fastalign.sequence import SequenceLogprobs, sequence_logprobs

__all__ = ["TokenStats", "linear_logprobs", "token_logprobs", "use_backend"]
__all__ += ["LOSS_TYPES", "LinearPreferenceLoss", "PreferenceLoss", "SequenceLogprobs", "preference_loss",
            "sequence_logprobs", "wpo_weights"]
__version__ = "0.1.0"
