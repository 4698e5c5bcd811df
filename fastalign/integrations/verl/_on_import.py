"""Patches applied to verl's modules: now to the ones already imported, else right after their first import (an
import hook), so enabling an integration never imports a module of verl that verl itself did not."""
from __future__ import annotations

import importlib.abc
import sys
from typing import Callable

#: module name -> the patches to apply to it after its first import
_PENDING: dict[str, list[Callable]] = {}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the pending patches of a module right after it is first executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PENDING:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Patching(spec.loader, name)
        return spec


class _Patching(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for patch in _PENDING.pop(self.name, []):
            patch(module)


def patch_modules(patches: dict[str, Callable]) -> None:
    """Apply ``patches`` (module name -> a function of the module; each must be idempotent) to the modules now
    imported, and to the others when they are."""
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
        elif patch not in _PENDING.setdefault(name, []):
            _PENDING[name].append(patch)
    if _PENDING and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
