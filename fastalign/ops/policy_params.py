"""The numeric parameters of one policy-loss launch: the record the policy-loss ops and kernels read.

:class:`fastalign.PolicyConfig` (the public configuration) builds it; the ops carry it as a flat float list
(a custom-op schema has no records) and the C++ and Triton kernels read it field by field.
"""
from __future__ import annotations

from typing import NamedTuple


class KernelParams(NamedTuple):
    """Numeric parameters of one policy-loss launch, in the C++ ``PolicyParams`` order.

    Codes are small integers carried as floats (exact); an option that is off is 0
    (``dual_clip``, ``delta``) or ``inf`` (``offpolicy_threshold``).
    """

    loss_type: int
    is_level: int
    kl_type: int
    kl_straight: int
    kl_clamp: int
    kl_rho: int
    rollout: int
    eps_low: float
    eps_high: float
    dual_clip: float
    delta: float
    cispo_lo: float
    cispo_hi: float
    tau_pos: float
    tau_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    kl_coef: float
    entropy_coef: float
    rollout_min: float
    rollout_max: float
    offpolicy_threshold: float
    cov_kl_coef: float
    cov_ratio: float
    cov_lb: float
    cov_ub: float
    dro_beta: float
    log_ratio_cap: float

    @classmethod
    def from_list(cls, values) -> "KernelParams":
        """The record from the flat float list a custom op carries."""
        n_int = 7
        return cls(*[int(v) for v in values[:n_int]], *[float(v) for v in values[n_int:]])
