"""docs/coverage.md names every trainer, registry entry and loss module of the installed TRL, verl, OpenRLHF and
Liger-Kernel (in backticks), so a version that adds one fails here until the page says where it is."""
import ast
import importlib
import importlib.util
import os
import pkgutil
import re

import pytest

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "coverage.md")


@pytest.fixture(scope="module")
def named():
    with open(PAGE) as f:
        return set(re.findall(r"`([^`]+)`", f.read()))


def _missing(names, named):
    return sorted(n for n in names if n not in named)


def test_trl_trainers(named):
    trl = pytest.importorskip("trl", reason="TRL is not installed")
    import trl.experimental as experimental

    assert _missing([n for n in dir(trl) if n.endswith("Trainer")], named) == []
    for module in pkgutil.iter_modules(experimental.__path__):
        if not module.ispkg:
            continue
        package = importlib.import_module(f"trl.experimental.{module.name}")
        exported = getattr(package, "__all__", None) or dir(package)
        classes = [n for n in exported if n.endswith(("Trainer", "Callback"))]
        assert _missing(classes or [module.name], named) == [], module.name


def test_verl_registries(named):
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY

    for registry in (core.POLICY_LOSS_REGISTRY, core.ADV_ESTIMATOR_REGISTRY, DISTILLATION_LOSS_REGISTRY):
        assert _missing([n for n in registry if not n.startswith("fastalign_")], named) == []
    assert _missing([n for n in ("compute_value_loss",) if hasattr(core, n)], named) == []


def test_liger_losses(named):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger_kernel is not installed")
    import liger_kernel.transformers as transformers

    losses = [n for n in dir(chunked) if n.startswith("Liger")]
    losses += [n for n in dir(transformers)
               if n.startswith("Liger") and re.search(r"(Loss|JSD|KLDiv|TVD|CrossEntropy)$", n)]
    # the losses Liger offers as functions only (a function with a module is named by the module)
    from liger_kernel.transformers import functional, grpo_loss

    losses += [n for n in ("liger_fused_linear_scaled_cross_entropy_tp",) if hasattr(functional, n)]
    losses += [n for n in ("triton_grpo_loss",) if hasattr(grpo_loss, n)]
    assert _missing(losses, named) == []


def _openrlhf_choices(option: str) -> list:
    """The choices of ``option`` on OpenRLHF's PPO command line (``openrlhf/cli/train_ppo_ray.py``, read, not run:
    it imports Ray)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed: `pip install --no-deps openrlhf==0.11.2` (see the Makefile)")
    with open(os.path.join(list(spec.submodule_search_locations)[0], "cli", "train_ppo_ray.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and getattr(node.args[0], "value", None) == option:
            return next(ast.literal_eval(k.value) for k in node.keywords if k.arg == "choices")
    raise AssertionError(f"{option} is not on OpenRLHF's command line")


def test_openrlhf_adapters(named):
    from fastalign.integrations import openrlhf

    assert _missing(openrlhf.__all__, named) == []
    for option in ("--algo.advantage.estimator", "--algo.kl.estimator"):
        assert _missing(_openrlhf_choices(option), named) == [], option
