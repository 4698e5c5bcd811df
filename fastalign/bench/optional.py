"""Baselines that may be missing: torch.compile'd references and third-party packages.

A missing package is reported as "skipped" in the results, never an error."""
from __future__ import annotations

import importlib

import torch

COMPILE = {"enabled": True}

#: the package each third-party row needs
PACKAGES = {"liger": "liger_kernel", "liger (CE)": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
            "flash-attn (CE)": "flash_attn", "verl": "verl", "trl": "trl"}


def available(impl: str) -> bool:
    """Whether the row ``impl`` could run here at all: a ``torch.compile`` row unless compiled baselines are
    switched off, a third-party row when its package is installed (a row a case offers on some devices only is
    decided when the case is built)."""
    if impl == "torch.compile":
        return COMPILE["enabled"]
    package = PACKAGES.get(impl)
    return package is None or importlib.util.find_spec(package) is not None


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
