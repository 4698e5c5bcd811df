"""docs/coverage.md names every trainer, registry entry and loss module of the installed TRL, verl, OpenRLHF and
Liger-Kernel (in backticks), so a version that adds one fails here until the page says where it is."""
import importlib
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
    for registry in (core.POLICY_LOSS_REGISTRY, core.ADV_ESTIMATOR_REGISTRY):
        assert _missing([n for n in registry if not n.startswith("fastalign_")], named) == []


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


def test_openrlhf_adapters(named):
    from fastalign.integrations import openrlhf

    assert _missing(openrlhf.__all__, named) == []
