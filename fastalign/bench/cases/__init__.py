"""Benchmark cases, one module per op. Each module defines ``cases() -> list[Case]``;
dropping a module here is all it takes to add an op to ``fastalign-bench``."""
from __future__ import annotations

import importlib
import pkgutil


def all_cases():
    out = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        out.extend(importlib.import_module(f"{__name__}.{mod}").cases())
    return out


def find_case(key: str):
    for case in all_cases():
        if case.key == key:
            return case
    raise KeyError(f"no benchmark case {key!r}")
