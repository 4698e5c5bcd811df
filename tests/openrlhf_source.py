"""OpenRLHF 0.11.2's own code for the tests, from its installed files.

Its package ``__init__`` imports DeepSpeed, vLLM, Ray and its trainers, none of which a CPU test environment has,
so the files the tests compare against are loaded by path: a module that needs only torch (:func:`module`),
``openrlhf/models/utils.py`` and ``loss.py`` under empty stand-ins for their parent packages and ``deepspeed``
(:func:`models`; removed from ``sys.modules`` afterwards), and methods of the trainer's experience maker executed
from their source (:func:`experience_maker_methods`). A test is skipped where OpenRLHF is not installed."""
import ast
import importlib.util
import os
import sys
import textwrap
import types

import pytest


def path(*parts: str) -> str:
    """The path of a file of the installed OpenRLHF package (its ``__init__`` not run)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed: `pip install --no-deps openrlhf==0.11.2` (see the Makefile)")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def module(*parts: str):
    """An OpenRLHF file that imports only torch, loaded as a module of its own."""
    s = importlib.util.spec_from_file_location("openrlhf_under_test_" + "_".join(parts)[:-3], path(*parts))
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def models() -> dict:
    """OpenRLHF's own ``openrlhf/models/utils.py`` and ``openrlhf/models/loss.py``, by their short names."""
    root = os.path.dirname(path("__init__.py"))
    names = ("openrlhf", "openrlhf.models", "openrlhf.models.utils", "openrlhf.models.loss", "deepspeed")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for name, folder in (("openrlhf", root), ("openrlhf.models", os.path.join(root, "models"))):
            pkg = types.ModuleType(name)
            pkg.__path__ = [folder]
            sys.modules[name] = pkg
        if saved["deepspeed"] is None:  # used by a ZeRO-3 helper of utils.py only
            sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        mods = {}
        for sub in ("utils", "loss"):
            name = f"openrlhf.models.{sub}"
            s = importlib.util.spec_from_file_location(name, os.path.join(root, "models", f"{sub}.py"))
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
            mods[sub] = mod
        return mods
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def experience_maker_methods(namespace: dict, *names: str) -> dict:
    """``namespace`` with the methods ``names`` of OpenRLHF's ``RemoteExperienceMaker``, executed in it from the
    installed source file as written (their decorators aside). ``experience_maker.py`` imports Ray actors,
    DeepSpeed and vLLM at the top; the methods use only what ``namespace`` gives them."""
    src = open(path("trainer", "ppo_utils", "experience_maker.py")).read()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "RemoteExperienceMaker")
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in names:
            exec(textwrap.dedent(ast.get_source_segment(src, fn)), namespace)
    return namespace
