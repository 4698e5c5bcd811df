"""The configuration record of the policy loss (docs/math.md#policy-losses).

:class:`PolicyConfig` holds every option of :func:`fastalign.policy_loss`, validates it once,
resolves the trainer presets and the option defaults that depend on the loss type, and emits
:class:`~fastalign.ops.policy_params.KernelParams`: the numeric record both kernels read (its field
order is the order of the C++ ``PolicyParams`` struct, ``csrc/cpu/policy_loss.h``, checked by name at
the first call, and the keyword order of the Triton launcher, ``fastalign/kernels/policy_loss.py``).
Adding an option is one field here, one in that record, and its use in the kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import torch

from fastalign import _deprecate, _validate
from fastalign._backend import BACKENDS
from fastalign._options import check_choice, check_names, check_read
from fastalign.aggregate import SEQ_COUNTS, check_agg, default_seq_count
from fastalign.kl import canonical_kl
from fastalign.ops.kl_penalty import KL_CODES  # the kernels' estimator codes (one table for both)
from fastalign.ops.policy_params import KernelParams

# Loss-type rows of the kernels (one code per row of the table in docs/math.md#policy-losses).
LOSS_CODES = {"ppo": 0, "gspo": 1, "cispo": 2, "sapo": 3, "reinforce": 4, "gmpo": 5, "clip_cov": 6, "kl_cov": 7,
              "vespo": 8, "dppo_tv": 9, "dppo_kl": 10, "dro": 11}
LOSS_TYPES = ("ppo", "gspo", "cispo", "sapo", "reinforce", "gpg", "gmpo", "clip_cov", "kl_cov", "vespo", "luspo",
              "dppo_tv", "dppo_kl", "dro")
# Trainer names -> (loss type, aggregation, sequence count); None keeps the caller's choice.
PRESETS = {
    "vanilla": ("ppo", None, None),
    "grpo": ("ppo", "seq-mean-token-mean", None),
    "bnpo": ("ppo", "token-mean", None),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm", None),
    "dapo": ("ppo", "token-mean", None),
    "geo_mean": ("gmpo", None, None),
    "gpg": ("reinforce", None, None),
    "luspo": ("ppo", "seq-mean-token-sum", "all"),
}
ROLLOUT_CODES = {None: 0, "token_truncate": 1, "token_mask": 2, "sequence_truncate": 3, "sequence_mask": 4,
                 "icepop": 2}
ROLLOUT_MODES = tuple(k for k in ROLLOUT_CODES if k is not None)
KL_RHO_CODES = {False: 0, True: 1, "detached": 1, "grad": 2}
IS_LEVELS = {"token": 0, "sequence": 1}
ENTROPY_AGGS = ("loss", "token-mean")
#: every accepted ``loss_type`` of :func:`fastalign.policy_loss` (loss rows, then presets)
POLICY_LOSS_TYPES = tuple(dict.fromkeys(LOSS_TYPES + tuple(PRESETS)))

_PPO_ROWS = ("ppo", "gspo", "clip_cov")  # rows with the ppo clip
SEQUENCE_LEVEL_ROWS = ("ppo", "cispo", "sapo")  # rows that take importance_sampling_level="sequence"
_CLIP_ROWS = ("ppo", "gspo", "clip_cov", "gmpo", "cispo", "dppo_tv", "dppo_kl")  # rows that read eps_low / eps_high
_DELTA_ROWS = ("ppo", "gspo", "dppo_tv", "dppo_kl")  # rows that read delta (the ratio's upper bound)
# rows whose importance ratio is rho = exp(clamp(l, -log_ratio_cap, log_ratio_cap)) (the KL term's ratio too,
# with kl_rho); gspo caps its sequence ratio at e^10 itself, the other rows read no ratio
_RATIO_ROWS = ("ppo", "cispo", "sapo", "dppo_tv", "dppo_kl")
#: default bound on the importance log-ratio (verl's and OpenRLHF's ppo clamp); ``math.inf``: no clamp (TRL, Liger)
LOG_RATIO_CAP = 20.0
# rows whose per-token loss reads that token's log-prob alone (gspo, gmpo and vespo read sequence statistics of
# the log-probs; clip_cov and kl_cov choose their tokens across the batch)
_TOKEN_ROWS = ("ppo", "cispo", "sapo", "reinforce", "dppo_tv", "dppo_kl", "dro")
# scalar options that must be finite real numbers when given (None: the option is off or at its default)
_FINITE = ("eps_low", "eps_high", "dual_clip", "delta", "cispo_low", "cispo_high", "sapo_tau_pos", "sapo_tau_neg",
           "vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg", "dro_beta", "rollout_min",
           "entropy_quantile", "offpolicy_threshold", "cov_ratio", "cov_lb", "cov_ub", "cov_kl_coef")
_COEFS = ("kl_coef", "entropy_coef")  # finite real numbers, never None (0: the term is off)
# the options each row alone reads (a row's own numbers; None: the default below)
_ROW_OPTIONS = {"cispo": ("cispo_low", "cispo_high"), "sapo": ("sapo_tau_pos", "sapo_tau_neg"),
                "vespo": ("vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg")}
# defaults of the options read by one row (cispo's bounds default to 1 - eps_low and 1 + eps_high)
_ROW_DEFAULTS = {"sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05, "vespo_k_pos": 2.0, "vespo_k_neg": 3.0,
                 "vespo_lambda_pos": 3.0, "vespo_lambda_neg": 2.0}
#: former pair options -> the two options they set, (value for A > 0 or the lower bound, the other); accepted for
#: one release with a :class:`~fastalign._deprecate.RenamedWarning` (docs/api.md's "Renamed arguments")
PAIR_RENAMES = {"cispo_bounds": ("cispo_low", "cispo_high"), "sapo_tau": ("sapo_tau_pos", "sapo_tau_neg"),
                "vespo_k": ("vespo_k_pos", "vespo_k_neg"), "vespo_lambda": ("vespo_lambda_pos", "vespo_lambda_neg")}


class CovParams(NamedTuple):
    """Clip-Cov / KL-Cov's numbers with their defaults: the share of tokens picked (``ratio``), Clip-Cov's
    covariance bounds (``lb`` < cov < ``ub``) and KL-Cov's coefficient (``kl_coef``)."""
    ratio: float
    lb: float
    ub: float
    kl_coef: float


class OptionError(ValueError):
    """The ``ValueError`` of a :class:`PolicyConfig` option's value; ``option`` names the option (``"eps_low"``),
    so a trainer profile can name its own config fields behind it without reading the message. Made by
    :func:`option_error` as ``OptionError(message, option)``: no ``__init__`` of its own and no attribute set on
    the instance, which torch.compile (2.11) cannot trace."""

    @property
    def option(self) -> str:
        return self.args[1] if len(self.args) > 1 else ""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def option_error(option: str, message: str) -> OptionError:
    """The :class:`OptionError` of ``option`` with ``message``."""
    return OptionError(message, option)


def _refused(option: str, reason: str) -> OptionError:
    """The :class:`OptionError` "<option> <reason>"."""
    return option_error(option, f"{option} {reason}")


@contextlib.contextmanager
def _option(name: str):
    """A ``ValueError`` of the checks inside, raised again as an :class:`OptionError` of ``name`` (same message)."""
    try:
        yield
    except OptionError:
        raise
    except ValueError as e:
        raise option_error(name, str(e))  # no "from None": torch.compile (2.11) cannot trace its setattr


def split_pairs(owner: str, options: dict) -> dict:
    """``options`` with each former pair option of ``PAIR_RENAMES`` given as its two options
    (``sapo_tau=(1.0, 1.05)``: ``sapo_tau_pos=1.0, sapo_tau_neg=1.05``) and one
    :class:`~fastalign._deprecate.RenamedWarning` naming them (``owner``: the function named); ``options`` itself
    when it has none. A former name given with one of its options is a ``TypeError``; a value that is not a pair of
    finite numbers raises naming the former name (``sapo_tau[1]``); None (the defaults) sets neither."""
    used = [old for old in PAIR_RENAMES if old in options]  # plain ops: torch.compile traces them
    if not used:
        return options
    for old in used:
        new = PAIR_RENAMES[old]
        if options.get(new[0]) is not None or options.get(new[1]) is not None:  # None: unset (dataclasses.replace)
            raise TypeError(f"{owner}: pass {new[0]} / {new[1]} only ({old} is their deprecated name)")
    _deprecate.warn(f"{owner}({', '.join(f'{o}=' for o in used)}...) is deprecated: use "
                    f"{', '.join(f'{n}=' for o in used for n in PAIR_RENAMES[o])}...")
    options = dict(options)
    for old in used:
        new = PAIR_RENAMES[old]
        value = options.pop(old)
        if value is None:
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise _refused(old, f"must be a pair of numbers, got {value!r}")
        with _option(old):
            options[new[0]] = _validate.finite_number(f"{old}[0]", value[0])
            options[new[1]] = _validate.finite_number(f"{old}[1]", value[1])
    return options


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    r"""Every option of :func:`fastalign.policy_loss` (docs/math.md#policy-losses), validated at construction.

    Loss: ``loss_type`` (a row of docs/math.md#policy-losses or a trainer preset: grpo, bnpo, dr_grpo, dapo, luspo,
    vanilla, gpg, geo_mean), ``eps_low`` / ``eps_high`` (default 0.2; ppo, gspo, clip_cov, gmpo,
    cispo without ``cispo_low`` / ``cispo_high``; dppo_tv / dppo_kl: the bounds of the divergence), ``dual_clip``
    (c > 1, ppo), ``delta`` (ppo-clip rows), ``cispo_low`` / ``cispo_high`` (cispo's clip of the detached ratio,
    default ``1 - eps_low`` / ``1 + eps_high``), ``sapo_tau_pos`` / ``sapo_tau_neg`` (sapo's temperature for
    ``A > 0`` / otherwise, default 1.0 / 1.05), ``vespo_k_pos`` / ``vespo_k_neg`` and ``vespo_lambda_pos`` /
    ``vespo_lambda_neg`` (vespo's ``k`` and ``lambda`` for ``A >= 0`` / otherwise, default 2 / 3 and 3 / 2);
    the former pairs ``cispo_bounds=(lo, hi)``, ``sapo_tau``, ``vespo_k`` and ``vespo_lambda`` (positive,
    negative) still set them, with a ``RenamedWarning`` (docs/api.md#renamed-arguments). ``importance_sampling_level``
    ("token" or "sequence": ``rho = exp(mean_m l)`` per sequence with its full gradient; ppo,
    cispo, sapo), ``log_ratio_cap`` (``c > 0``, default 20: the ratio is ``exp(clamp(l, -c, c))``, the
    sequence mean clamped at sequence level, no gradient where the clamp binds, as verl and OpenRLHF's
    ppo; ``math.inf``: no clamp, as TRL and Liger; ppo, cispo, sapo, dppo_tv, dppo_kl, and the KL term's
    ratio with ``kl_rho``).

    Added terms (docs/math.md#added-terms): ``kl_type``, ``kl_coef``, ``kl_clamp``, ``kl_rho`` (False; True or
    "detached": times ``sg(rho)``; "grad": times ``rho`` with its gradient), ``entropy_coef``,
    ``entropy_agg`` ("loss": aggregated like the loss; "token-mean": ``coef * mean(H)`` over the
    kept tokens, whatever ``agg``), ``rollout_correction`` with ``rollout_min`` /
    ``rollout_max`` (truncate modes clamp to ``[rollout_min, rollout_max]``, the lower bound
    only when given), ``entropy_quantile`` (in [0, 1]; 0 keeps the top token),
    ``offpolicy_threshold``.

    Clip-Cov / KL-Cov (docs/math.md#clip-cov-and-kl-cov): ``cov_ratio``, ``cov_lb`` / ``cov_ub`` (clip_cov only),
    ``cov_kl_coef`` (kl_cov only), ``cov_global``, ``cov_group``.

    Aggregation (docs/math.md#aggregation): ``agg`` (gmpo: always seq-mean-token-mean; gspo: seq-mean-token-mean
    unless given), ``seq_count`` ("nonempty": sequence means over non-empty rows;
    "all": over every row; default "all" for gmpo, luspo and seq-mean-token-sum-norm, "nonempty"
    otherwise),
    ``dp_size``, ``max_len``; and ``backend``.

    Unknown names raise ``TypeError`` with the closest valid one; an option that the chosen
    loss type does not use raises ``ValueError`` naming it (so does an ``agg`` other than gmpo's own
    seq-mean-token-mean with gmpo). Values: the
    numeric options are real numbers (not strings or bools: ``TypeError``), finite (``rollout_max``
    may be ``+inf``, no upper bound) and in range (``ValueError`` naming the option):
    ``rollout_max >= 0``, ``sapo_tau_pos`` / ``sapo_tau_neg > 0``, ``cispo_low <= cispo_high`` (an unset
    bound at its default), ``0 < cov_ratio <= 1``, ``cov_lb < cov_ub``.
    Every such ``ValueError`` is an :class:`OptionError`, whose ``option`` is the option's name.
    ``kl_type`` / ``kl_clamp`` / ``kl_rho`` other than their defaults need the KL term
    (``ref_logprobs`` at the call).
    """

    loss_type: str = "ppo"
    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    delta: Optional[float] = None
    importance_sampling_level: str = "token"
    log_ratio_cap: float = LOG_RATIO_CAP
    cispo_low: Optional[float] = None
    cispo_high: Optional[float] = None
    sapo_tau_pos: Optional[float] = None
    sapo_tau_neg: Optional[float] = None
    vespo_k_pos: Optional[float] = None
    vespo_k_neg: Optional[float] = None
    vespo_lambda_pos: Optional[float] = None
    vespo_lambda_neg: Optional[float] = None
    dro_beta: Optional[float] = None
    kl_type: str = "k3"
    kl_coef: float = 0.0
    kl_clamp: bool = True
    kl_rho: Any = False
    entropy_coef: float = 0.0
    entropy_agg: str = "loss"
    rollout_correction: Optional[str] = None
    rollout_min: Optional[float] = None
    rollout_max: float = 2.0
    entropy_quantile: Optional[float] = None
    offpolicy_threshold: Optional[float] = None
    cov_ratio: Optional[float] = None
    cov_lb: Optional[float] = None
    cov_ub: Optional[float] = None
    cov_kl_coef: Optional[float] = None
    cov_global: bool = False
    cov_group: Any = dataclasses.field(default=None, compare=False)
    agg: Optional[str] = None
    seq_count: Optional[str] = None
    dp_size: int = 1
    max_len: Optional[int] = None
    backend: Optional[str] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def make(cls, config: Optional["PolicyConfig"] = None, owner: str = "policy_loss", /,
             **options) -> "PolicyConfig":
        """``config`` (or the defaults) with ``options`` replaced; unknown names raise ``TypeError``
        (``owner``: the function or module named in the message)."""
        options = split_pairs(owner, options)
        check_names(owner, options, FIELDS)
        if config is None:
            if torch.compiler.is_compiling():  # traced once per graph; Dynamo would trace the lru_cache
                return cls(**options)
            try:  # the same keywords on every step: validate them once
                return _from_options(tuple((k, type(v), v) for k, v in sorted(options.items())))
            except TypeError:  # an unhashable value
                return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    def __post_init__(self):
        with _option("loss_type"):
            check_choice("loss_type", self.loss_type, POLICY_LOSS_TYPES)
        row, agg = self.row, self.resolved_agg
        with _option("agg"):
            check_agg(agg)
        self._check_numbers()
        if self.agg not in (None, "seq-mean-token-mean") and row == "gmpo":  # it would be ignored
            raise _refused("agg", f"does not apply to loss_type {self.loss_type!r} (gmpo always aggregates "
                              f"seq-mean-token-mean), got {self.agg!r}")
        if self.seq_count is not None:
            with _option("seq_count"):
                check_choice("seq_count", self.seq_count, SEQ_COUNTS)
        if self.importance_sampling_level not in IS_LEVELS:
            raise _refused("importance_sampling_level", f"must be 'token' or 'sequence', "
                              f"got {self.importance_sampling_level!r}")
        if self.importance_sampling_level == "sequence" and row not in SEQUENCE_LEVEL_ROWS:
            raise option_error("importance_sampling_level", f"importance_sampling_level='sequence' applies to "
                               f"{SEQUENCE_LEVEL_ROWS}, not to loss_type {self.loss_type!r}")
        for name in ("eps_low", "eps_high"):
            given = getattr(self, name) is not None
            self._only(name, given, _CLIP_ROWS)
            bound = "cispo_low" if name == "eps_low" else "cispo_high"
            if given and row == "cispo" and getattr(self, bound) is not None:
                raise _refused(name, f"does not apply to cispo with {bound}")
        if self.clip_eps[0] < 0 or self.clip_eps[1] < 0:
            raise option_error("eps_low" if self.clip_eps[0] < 0 else "eps_high",
                               f"eps_low and eps_high must be >= 0, got {self.eps_low}, {self.eps_high}")
        if not self.log_ratio_cap > 0:
            raise _refused("log_ratio_cap", f"must be > 0 (math.inf: no clamp), got "
                              f"{self.log_ratio_cap}")
        with _option("log_ratio_cap"):
            check_read("log_ratio_cap", self.log_ratio_cap != LOG_RATIO_CAP and self.kl_rho is False,
                       self.loss_type, (self.row,), _RATIO_ROWS, also="kl_rho")
        self._only("dual_clip", self.dual_clip is not None, ("ppo",))
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise _refused("dual_clip", f"must be > 1, got {self.dual_clip}")
        self._only("delta", self.delta is not None, _DELTA_ROWS)
        if self.delta is not None and not self.delta > 0:
            raise _refused("delta", f"must be > 0, got {self.delta}")
        for reader, names in _ROW_OPTIONS.items():
            for name in names:
                self._only(name, getattr(self, name) is not None, (reader,))
        if row == "cispo" and (self.cispo_low is not None or self.cispo_high is not None):
            lo, hi = self._cispo_bounds()
            if not lo <= hi:
                raise _refused("cispo_high" if self.cispo_high is not None else "cispo_low",
                               f"must satisfy cispo_low <= cispo_high, got cispo_low={lo}, cispo_high={hi} "
                               f"(an unset bound is 1 - eps_low / 1 + eps_high)")
        self._only("dro_beta", self.dro_beta is not None, ("dro",))
        if row == "dro" and not (self.dro_beta is not None and self.dro_beta > 0):
            raise _refused("dro_beta", f"must be > 0 for loss_type 'dro', got {self.dro_beta!r}")
        self._only("cov_ratio", self.cov_ratio is not None, ("clip_cov", "kl_cov"))
        for name in ("cov_lb", "cov_ub"):  # kl_cov takes the top k by covariance, with no bounds
            self._only(name, getattr(self, name) is not None, ("clip_cov",))
        self._only("cov_kl_coef", self.cov_kl_coef is not None, ("kl_cov",))
        self._only("cov_global", self.cov_global, ("clip_cov", "kl_cov"))
        if self.cov_group is not None and not self.cov_global:
            raise _refused("cov_group", "applies only with cov_global=True (the group the token "
                              "statistics are summed over)")
        _validate.process_group("cov_group", self.cov_group)
        cov = self.cov_params
        if row in ("clip_cov", "kl_cov") and not 0 < cov.ratio <= 1:  # a fraction of the tokens
            raise _refused("cov_ratio", f"must lie in (0, 1], got {self.cov_ratio}")
        if row == "clip_cov" and not cov.lb < cov.ub:
            raise _refused("cov_lb", f"must be < cov_ub, got cov_lb={cov.lb}, cov_ub={cov.ub}")
        if self.seq_count is not None and not agg.startswith("seq-mean"):
            raise _refused("seq_count", f"applies to the seq-mean aggregations, not to agg={agg!r}")
        with _option("kl_type"):
            canonical_kl(self.kl_type)
        if self.kl_rho not in KL_RHO_CODES or isinstance(self.kl_rho, (int, float)) and \
                not isinstance(self.kl_rho, bool):
            raise _refused("kl_rho", f"must be False, True, 'detached' or 'grad', got {self.kl_rho!r}")
        with _option("entropy_agg"):
            check_choice("entropy_agg", self.entropy_agg, ENTROPY_AGGS)
        if self.entropy_agg != "loss" and self.entropy_coef == 0.0:
            raise _refused("entropy_agg", "applies only with entropy_coef != 0")
        with _option("rollout_correction"):
            check_choice("rollout_correction", self.rollout_correction, (None,) + ROLLOUT_MODES)
        if self.rollout_correction is None and (self.rollout_min is not None or self.rollout_max != 2.0):
            name = "rollout_min" if self.rollout_min is not None else "rollout_max"
            raise _refused(name, "applies only with rollout_correction")
        if self.rollout_min is not None and not 0 <= self.rollout_min <= self.rollout_max:
            raise _refused("rollout_min", f"must lie in [0, rollout_max], got {self.rollout_min}")
        if self.entropy_quantile is not None and not 0.0 <= self.entropy_quantile <= 1.0:
            raise _refused("entropy_quantile", f"must lie in [0, 1], got {self.entropy_quantile}")
        with _option("dp_size"):
            object.__setattr__(self, "dp_size", _validate.at_least("dp_size", self.dp_size))
        if self.backend is not None:
            with _option("backend"):
                check_choice("backend", self.backend, BACKENDS)
        if self.max_len is not None and agg != "seq-mean-token-sum-norm":
            raise _refused("max_len", f"applies to agg='seq-mean-token-sum-norm', not to {agg!r}")

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric options (whether they apply is checked by ``_only``)."""
        for name in _FINITE:
            with _option(name):
                _validate.finite(**{name: getattr(self, name)})
        for name in _COEFS:
            with _option(name):
                _validate.finite_number(name, getattr(self, name))
        _validate.number("log_ratio_cap", self.log_ratio_cap)  # +inf: no clamp
        rmax = _validate.number("rollout_max", self.rollout_max)
        if not rmax >= 0:  # +inf: no upper bound (TRL's default); NaN fails here
            raise _refused("rollout_max", f"must be >= 0 (or +inf), got {self.rollout_max}")
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise _refused(name, f"must be a temperature > 0, got {getattr(self, name)}")
        _validate.boolean("kl_clamp", self.kl_clamp)
        _validate.boolean("cov_global", self.cov_global)

    @property
    def kl_options_set(self) -> tuple:
        """The KL options set other than their defaults (they need the KL term, ``ref_logprobs``)."""
        out = []
        if canonical_kl(self.kl_type) != canonical_kl("k3"):
            out.append("kl_type")
        if self.kl_clamp is not True:
            out.append("kl_clamp")
        if self.kl_rho is not False:
            out.append("kl_rho")
        return tuple(out)

    def _only(self, name: str, given: bool, rows: tuple) -> None:
        with _option(name):
            check_read(name, given, self.loss_type, (self.row,), rows)

    # ------------------------------------------------------------------ resolved values
    @property
    def row(self) -> str:
        """The kernel row of the loss type (presets resolved: gpg -> reinforce)."""
        return PRESETS[self.loss_type][0] if self.loss_type in PRESETS else self.loss_type

    @property
    def resolved_agg(self) -> str:
        if self.row == "gmpo" or (self.row == "gspo" and self.agg is None):
            return "seq-mean-token-mean"
        if self.agg is not None:
            return self.agg
        preset = PRESETS.get(self.loss_type)
        return preset[1] if preset is not None and preset[1] is not None else "token-mean"

    @property
    def resolved_seq_count(self) -> str:
        if self.seq_count is not None:
            return self.seq_count
        preset = PRESETS.get(self.loss_type)
        if preset is not None and preset[2] is not None:
            return preset[2]
        return "all" if self.row == "gmpo" else default_seq_count(self.resolved_agg)

    @property
    def cov_params(self) -> CovParams:
        """``cov_ratio``, ``cov_lb``, ``cov_ub`` and ``cov_kl_coef`` with their defaults."""
        pick = lambda v, d: d if v is None else float(v)  # noqa: E731
        return CovParams(ratio=pick(self.cov_ratio, 2e-4), lb=pick(self.cov_lb, 1.0), ub=pick(self.cov_ub, 5.0),
                         kl_coef=pick(self.cov_kl_coef, 1.0))

    @property
    def clip_eps(self) -> tuple:
        """(eps_low, eps_high) with their defaults (0.2)."""
        return (0.2 if self.eps_low is None else float(self.eps_low),
                0.2 if self.eps_high is None else float(self.eps_high))

    def _cispo_bounds(self) -> tuple:
        """cispo's (cispo_low, cispo_high) with their defaults (1 - eps_low, 1 + eps_high)."""
        el, eh = self.clip_eps
        return (1.0 - el if self.cispo_low is None else float(self.cispo_low),
                1.0 + eh if self.cispo_high is None else float(self.cispo_high))

    def _row_option(self, name: str) -> float:
        """A sapo / vespo option with its default."""
        value = getattr(self, name)
        return _ROW_DEFAULTS[name] if value is None else float(value)

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def token_separable(self) -> bool:
        """Whether ``d loss / d lp_t`` (and ``d loss / d H_t``) depends on token ``t``'s own statistics alone,
        every normaliser coming from the mask: a row that reads one token's log-ratio, at the token level,
        without the off-policy mask (it reads each sequence's mean log-ratio), a sequence rollout correction
        (each sequence's summed log-ratio to the rollout, the policy's own log-probs when old_logprobs is
        None) or an entropy quantile (the batch's). The single pass through the head may then take blocks
        of any tokens, not whole sequences."""
        sequence_rollout = self.rollout_correction in ("sequence_truncate", "sequence_mask")
        return (self.row in _TOKEN_ROWS and not self.sequence_level and self.offpolicy_threshold is None
                and not sequence_rollout and self.entropy_quantile is None)

    def kernel_params(self, *, entropy_in_kernel: bool) -> KernelParams:
        """The numeric record for the kernels. ``entropy_in_kernel``: the per-token entropy term
        ``-entropy_coef H_t`` is part of the kernel's loss (``entropy_agg="loss"``)."""
        if torch.compiler.is_compiling():  # traced once per graph; the cache is an eager-mode saving
            return self._kernel_params(entropy_in_kernel)
        cache = self.__dict__.setdefault("_kernel_params_cache", {})  # built once per configuration
        if entropy_in_kernel not in cache:
            cache[entropy_in_kernel] = self._kernel_params(entropy_in_kernel)
        return cache[entropy_in_kernel]

    def _kernel_params(self, entropy_in_kernel: bool) -> KernelParams:
        row = self.row
        kl_base, kl_straight = canonical_kl(self.kl_type)
        el, eh = self.clip_eps
        lo, hi = self._cispo_bounds()
        opt = self._row_option
        truncate = self.rollout_correction in ("token_truncate", "sequence_truncate")
        r_min = self.rollout_min if self.rollout_min is not None else (0.0 if truncate else 0.5)
        cov = self.cov_params
        return KernelParams(
            loss_type=LOSS_CODES[row], is_level=IS_LEVELS[self.importance_sampling_level],
            kl_type=KL_CODES[kl_base], kl_straight=int(kl_straight), kl_clamp=int(bool(self.kl_clamp)),
            kl_rho=KL_RHO_CODES[self.kl_rho], rollout=ROLLOUT_CODES[self.rollout_correction],
            eps_low=el, eps_high=eh, dual_clip=float(self.dual_clip or 0.0),
            delta=float(self.delta or 0.0), cispo_lo=lo, cispo_hi=hi, tau_pos=opt("sapo_tau_pos"),
            tau_neg=opt("sapo_tau_neg"), vespo_k_pos=opt("vespo_k_pos"), vespo_lambda_pos=opt("vespo_lambda_pos"),
            vespo_k_neg=opt("vespo_k_neg"), vespo_lambda_neg=opt("vespo_lambda_neg"), kl_coef=float(self.kl_coef),
            entropy_coef=float(self.entropy_coef) if entropy_in_kernel else 0.0, rollout_min=float(r_min),
            rollout_max=float(self.rollout_max),
            offpolicy_threshold=math.inf if self.offpolicy_threshold is None else float(self.offpolicy_threshold),
            cov_kl_coef=cov.kl_coef, cov_ratio=cov.ratio, cov_lb=cov.lb, cov_ub=cov.ub,
            dro_beta=float(self.dro_beta or 0.0), log_ratio_cap=float(self.log_ratio_cap))


def _accepting_former_names(init):
    """``PolicyConfig.__init__`` taking the former pair options too (:func:`split_pairs`); its signature, and
    ``FIELDS``, stay the fields'."""
    @functools.wraps(init)
    def __init__(self, *args, **options):
        init(self, *args, **split_pairs("PolicyConfig", options))
    return __init__


PolicyConfig.__init__ = _accepting_former_names(PolicyConfig.__init__)
_deprecate.RENAMED.extend(("PolicyConfig", old, ", ".join(new)) for old, new in PAIR_RENAMES.items())
FIELDS = tuple(f.name for f in dataclasses.fields(PolicyConfig))


def log_ratio_cap_option(loss_type: str, kl_rho: Any, cap: float) -> dict:
    """``{"log_ratio_cap": cap}`` where a configuration of ``loss_type`` (a row) and ``kl_rho`` reads the
    importance ratio, else ``{}``: a trainer profile states its cap (``math.inf``: none) without naming the rows."""
    return {"log_ratio_cap": cap} if loss_type in _RATIO_ROWS or kl_rho is not False else {}


@functools.lru_cache(maxsize=256)
def _from_options(items: tuple) -> PolicyConfig:
    return PolicyConfig(**{k: v for k, _t, v in items})
