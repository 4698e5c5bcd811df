"""Former argument names of the public API, still accepted with a :class:`RenamedWarning`.

``@renamed(mask="response_mask")`` on a function lets callers pass ``mask=...``: the value goes to
``response_mask``, with one warning per call naming every former name used; giving both names is
a ``TypeError``. Every rename is listed in
``RENAMED`` (docs/api.md's "Renamed arguments" table is generated from it).
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings
from typing import Callable, List, ParamSpec, Tuple, TypeVar

import torch


class RenamedWarning(DeprecationWarning):
    """A public name (argument or constant) used under its former name."""


#: (function, former argument name, current name), in declaration order
RENAMED: List[Tuple[str, str, str]] = []


def warn(message: str, stacklevel: int = 3, category: type = RenamedWarning) -> None:
    """Emit ``message`` as a ``category`` warning (a :class:`RenamedWarning` by default) at the user's line:
    ``stacklevel`` from the caller of this helper's caller, past the frames of torch and fastalign between them
    (``nn.Module.__call__`` before a module's ``forward``), so that Python's default filters show it. Under
    ``torch.compile`` nothing is emitted: the call is traced (once), where the frame walk cannot be; the eager call
    warns."""
    if torch.compiler.is_compiling():
        return
    frame = sys._getframe(stacklevel - 1)
    while frame is not None and frame.f_back is not None and \
            str(frame.f_globals.get("__name__", "")).startswith(("torch.", "fastalign.")):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)


P = ParamSpec("P")
R = TypeVar("R")


def renamed(**old_to_new: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: accept each old keyword name of the wrapped function as its new name, with a warning. The
    wrapped function keeps its signature for type checkers (which then flag a former name: it is deprecated)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        owner = fn.__qualname__
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        pairs = tuple(old_to_new.items())
        for old, new in pairs:
            if new not in (p.name for p in params):
                raise AssertionError(f"{fn.__qualname__} has no argument {new!r} to rename {old!r} to")
            RENAMED.append((owner, old, new))

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            used = [(old, new) for old, new in pairs if old in kwargs]  # plain ops: torch.compile traces them
            if used:
                given = positional[:len(args)]
                for old, new in used:
                    if new in kwargs or new in given:
                        raise TypeError(f"{owner}: pass {new} only ({old} is its deprecated name)")
                    kwargs[new] = kwargs.pop(old)
                warn(f"{owner}({', '.join(f'{o}=' for o, _ in used)}...) is deprecated: use "
                     f"{', '.join(f'{n}=' for _, n in used)}...")
            return fn(*args, **kwargs)

        return call

    return wrap

