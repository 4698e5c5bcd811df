"""A drop-in trainer's profile loss kept in step with the option attributes TRL's own trainer reads at every step
(:class:`LiveLoss`: ``trainer.beta = 0.5`` between steps changes the loss, checked and named at the next step)."""
from __future__ import annotations

import copy
import functools
from typing import Callable, Sequence, Union


#: How a TRL attribute reaches the profile: the config field it stands for; ``(field, read)`` with
#: ``read(trainer)`` its value as TRL uses it.
LiveOption = Union[str, tuple]


class LiveLoss:
    """A drop-in trainer's ``fastalign_loss``: the profile loss of its config, kept in step with the option
    attributes TRL's own trainer reads at every step (``trainer.beta = 0.5`` between steps changes TRL's loss).

    ``LiveLoss(profile, options)`` is a class attribute; ``options`` maps each such TRL attribute to the config
    field it stands for (:data:`LiveOption`). Reading ``trainer.fastalign_loss`` compares the attributes' values
    (and types) with those the loss was built from, and builds ``profile(config)`` again, the trainer's config
    with those fields replaced, only when one changed: no cost at a step where none did. A value the profile
    refuses raises its ``ValueError`` / ``TypeError`` there, at the next step, naming the attribute
    (``DPOTrainer.beta=...``); the loss and its values stay the last good ones. An attribute the trainer does
    not set (CPO's ``simpo_gamma`` without simpo) reads its config field.

    ``args``: the config fields TRL's loss reads from ``self.args`` itself at every step (GRPO's ``delta``, DPO's
    ``discopop_tau``), followed the same way (a callback that changes ``args.delta``), named
    ``GRPOTrainer.args.delta=...`` in an error."""

    def __init__(self, profile: Callable, options: dict, args: Sequence[str] = ()):
        self.profile, self.options = profile, dict(options)
        self.options.update({f"args.{field}": (field, functools.partial(_args_field, field)) for field in args})

    def __set_name__(self, owner, name) -> None:
        self.slot = f"_{name}_live"

    def _values(self, trainer) -> tuple:
        def value(attr, option):
            if isinstance(option, tuple):
                return option[1](trainer)
            return getattr(trainer, attr, getattr(trainer.args, option))

        return tuple(value(attr, option) for attr, option in self.options.items())

    def __get__(self, trainer, owner=None):
        if trainer is None:
            return self
        values = self._values(trainer)
        key = tuple((type(v), v) for v in values)  # with the types: 0 for False, "0.5" for 0.5 are changes too
        state = trainer.__dict__.get(self.slot)
        if state is None or key != state[0]:
            state = (copy.deepcopy(key), self._build(trainer, values, state))  # a copy: in-place edits are changes
            trainer.__dict__[self.slot] = state
        return state[1]

    def __set__(self, trainer, value) -> None:
        raise AttributeError(f"{type(trainer).__name__}.fastalign_loss follows the trainer's option attributes "
                             f"({', '.join(self.options)}); assign those")

    def _build(self, trainer, values, state):
        changed = [(attr, value) for i, (attr, value) in enumerate(zip(self.options, values))
                   if state is None or (type(value), value) != state[0][i]]
        fields = {option[0] if isinstance(option, tuple) else option: value
                  for option, value in zip(self.options.values(), values)}
        try:
            return self.profile(_ConfigView(trainer.args, fields))
        except (ValueError, TypeError) as error:
            if state is None:
                raise
            named = ", ".join(f"{type(trainer).__name__}.{attr}={value!r}" for attr, value in changed)
            raise type(error)(f"{named}: {error}") from error


def _args_field(field: str, trainer):
    """The trainer's config field ``field`` (``trainer.args.<field>``), as TRL's loss reads it at every step."""
    return getattr(trainer.args, field)


def build_loss(trainer) -> None:
    """Build the trainer's ``fastalign_loss`` (:class:`LiveLoss`) from its option attributes as TRL's constructor
    set them: a later assignment is a change, checked and named at the next step."""
    type(trainer).fastalign_loss.__get__(trainer)


class _ConfigView:
    """A trainer's config with some fields replaced, read as a config object (attribute access)."""

    def __init__(self, args, fields: dict):
        self.__dict__.update(_args=args, _fields=fields)

    def __getattr__(self, name):
        fields = self.__dict__["_fields"]
        return fields[name] if name in fields else getattr(self.__dict__["_args"], name)
