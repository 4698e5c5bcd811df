"""Baselines that may be missing: torch.compile'd references and third-party packages.

A missing package is reported as "skipped" in the results, never an error."""
from __future__ import annotations

import importlib

import torch

COMPILE = {"enabled": True}


def compiled(fn):
    """``torch.compile(fn)``, or None when compiled baselines are switched off (``--no-compile``)."""
    if not COMPILE["enabled"]:
        return None
    return torch.compile(fn, dynamic=False)


def optional_impl(module: str, *names: str):
    """The named attributes of an installed module, or None when it is not importable."""
    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)
    except Exception:
        return None
