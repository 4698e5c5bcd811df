r"""Advantage estimators (docs/math.md#advantages), in two families:

* sequence level (:mod:`fastalign.advantages.sequence_level`): :func:`group_advantages` turns one
  score per response into one advantage per response from the statistics of its group;
* token level (:mod:`fastalign.advantages.token_level`): :func:`token_advantages` spreads those over
  the response tokens; :func:`reinforce_pp_advantages`, :func:`remax_advantages`,
  :func:`gae_advantages`, :func:`implicit_process_advantages` and
  :func:`optimal_token_baseline_advantages` work on ``[B, T]`` token rewards, :func:`iw_opd_advantages` on a
  teacher's and the rollout policy's log-probs of the sampled tokens;
  :func:`masked_whiten` whitens over the response tokens.
"""
from fastalign.advantages._inputs import WHITEN_EPS
from fastalign.advantages.sequence_level import (BATCH_NORMALIZATIONS, ESTIMATORS, SINGLETON, STD_MODES,
                                                 TOKEN_LEVEL, group_advantages)
from fastalign.advantages.token_level import (AdvantagesAndReturns, gae_advantages, implicit_process_advantages,
                                              iw_opd_advantages, masked_whiten, optimal_token_baseline_advantages,
                                              reinforce_pp_advantages, remax_advantages, token_advantages)

__all__ = [
    "AdvantagesAndReturns", "BATCH_NORMALIZATIONS", "ESTIMATORS", "SINGLETON", "STD_MODES", "TOKEN_LEVEL",
    "WHITEN_EPS",
    "gae_advantages", "group_advantages", "implicit_process_advantages", "iw_opd_advantages", "masked_whiten",
    "optimal_token_baseline_advantages", "reinforce_pp_advantages", "remax_advantages", "token_advantages",
]
