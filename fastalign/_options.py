"""The one validation convention of the loss configurations.

Every loss module (``PolicyLoss``, ``LinearPolicyLoss``, ``PreferenceLoss``, ``LinearPreferenceLoss``)
checks its whole configuration at construction, and the functions check theirs at the call, with these
helpers: a misspelled option name is a ``TypeError`` naming it with the closest valid name; a value
outside its choices is a ``ValueError`` naming the option, with the closest valid value; an option set
for a loss that does not read it is a ``ValueError`` naming the option and the losses that read it.
"""
from __future__ import annotations

import difflib
from typing import Iterable

import torch

AUTO_OR_BOOL = ("auto", True, False)
"""The choices of a pass option (``single_pass``, ``compact``): ``"auto"`` picks where it pays, or ``True`` /
``False`` forces it."""


def own_copy(options: dict) -> dict:
    """A module's own copy of its options: each list (also inside a tuple) as a tuple, so that a list the caller
    changes after building the module changes nothing in it (two modules built from one list share nothing)."""
    def frozen(v):
        return tuple(frozen(x) for x in v) if isinstance(v, (list, tuple)) else v
    return {k: frozen(v) for k, v in options.items()}


def did_you_mean(name, choices: Iterable) -> str:
    """``"; did you mean 'x'?"`` for the closest string in ``choices``, or ``""``."""
    if not isinstance(name, str) or torch.compiler.is_compiling():  # difflib does not trace
        return ""
    close = difflib.get_close_matches(name, [c for c in choices if isinstance(c, str)], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_names(owner: str, options: dict, valid: Iterable[str]) -> None:
    """``TypeError`` for a keyword of ``owner`` that is not one of ``valid``, with the closest valid name."""
    valid = tuple(valid)
    for name in options:
        if name not in valid:
            hint = did_you_mean(name, valid)
            raise TypeError(f"{owner} got an unknown option {name!r}"
                            + (hint if hint else f" (options: {', '.join(valid)})"))


def check_choice(name: str, value, choices: Iterable, what: str = "") -> None:
    """``ValueError`` naming ``name`` when ``value`` is not one of ``choices`` (``what``: text after the list)."""
    choices = tuple(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {choices}{what}, got {value!r}{did_you_mean(value, choices)}")


def check_read(option: str, given: bool, loss_type, rows: Iterable[str], readers: Iterable[str],
               also: str = "") -> None:
    """``ValueError`` when ``option`` is ``given`` (set off its default) and none of ``rows`` (the loss rows of
    ``loss_type``, as the caller named it) is one of ``readers``, the rows that read it. ``also``: what else
    makes a row read it, for the message (``"kl_rho"``)."""
    readers = tuple(readers)
    if given and not any(r in readers for r in rows):
        extra = f", and any loss_type with {also}" if also else ""
        raise ValueError(f"{option} does not apply to loss_type {loss_type!r} (only {', '.join(readers)} read it"
                         f"{extra})")


class FixedOptions:
    """Mixin for a loss module whose options are checked together at construction: once ``_fix_options(names)``
    has run (at the end of ``__init__``), assigning one of ``names`` (``loss.beta = 0.2``) raises an
    ``AttributeError`` with the remedy, where it would otherwise set an attribute that the loss never reads.
    ``_PER_CALL``: the module's ``forward`` takes the options as per-call overrides (said in the message)."""

    _PER_CALL = False

    def _fix_options(self, names: Iterable[str]) -> None:
        object.__setattr__(self, "_fixed_options", frozenset(names))

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_fixed_options", ()):
            owner = type(self).__name__
            call = f", or pass {name}=... to the call (an override for that call)" if self._PER_CALL else ""
            raise AttributeError(f"{owner}.{name} is fixed at construction, where the options are checked "
                                 f"together: build a new {owner}({name}=...){call}")
        super().__setattr__(name, value)
