"""The TRL profiles' default tables against TRL's own config classes.

A profile reads a dict config with the defaults of its table for the fields the dict does not give, so
each default must be the one the TRL config class declares (its dataclass field default or default
factory): a table that drifted gave a dict another loss than the config object with the same fields."""
import dataclasses
import importlib

import pytest

pytest.importorskip("trl", reason="TRL is not installed: `pip install trl==1.16.*` to run the parity tests")

from fastalign.integrations.trl import (a2po, grpo, grpo_rewards, iw_opd, preference, rloo,  # noqa: E402
                                        self_distillation)
from fastalign.integrations.trl._config import CONFIG_CLASSES  # noqa: E402

#: every default table of the TRL profiles -> the TRL config class it reads
TABLES = {
    "DPO_DEFAULTS": (preference.DPO_DEFAULTS, "DPOConfig"),
    "CPO_DEFAULTS": (preference.CPO_DEFAULTS, "CPOConfig"),
    "ORPO_DEFAULTS": (preference.ORPO_DEFAULTS, "ORPOConfig"),
    "KTO_DEFAULTS": (preference.KTO_DEFAULTS, "KTOConfig"),
    "TPO_DEFAULTS": (preference.TPO_DEFAULTS, "TPOConfig"),
    "IW_OPD_DEFAULTS": (iw_opd.IW_OPD_DEFAULTS, "IWOPDConfig"),
    "A2PO_DEFAULTS": (a2po.A2PO_DEFAULTS, "A2POConfig"),
    "SDPO_DEFAULTS": (self_distillation.SDPO_DEFAULTS, "SDPOConfig"),
    "SDFT_DEFAULTS": (self_distillation.SDFT_DEFAULTS, "SDFTConfig"),
    "RLOO_DEFAULTS": (rloo.RLOO_DEFAULTS, "RLOOConfig"),
    "RLOO_LOSS_DEFAULTS": (rloo.RLOO_LOSS_DEFAULTS, "RLOOConfig"),
    "GRPO_ADVANTAGE_DEFAULTS": (grpo_rewards.GRPO_ADVANTAGE_DEFAULTS, "GRPOConfig"),
    "grpo._DEFAULTS": (grpo._DEFAULTS, "GRPOConfig"),
}


def _declared_defaults(name):
    module, cls = CONFIG_CLASSES[name]
    out = {}
    for f in dataclasses.fields(getattr(importlib.import_module(module), cls)):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_default_is_the_trl_config_default(table):
    defaults, name = TABLES[table]
    declared = _declared_defaults(name)
    assert set(defaults) <= set(declared), f"{table}: not {name} fields: {sorted(set(defaults) - set(declared))}"
    wrong = {k: (v, declared[k]) for k, v in defaults.items() if v != declared[k] or type(v) is not type(declared[k])}
    assert not wrong, f"{table}: field -> (table's default, {name}'s default): {wrong}"


def test_every_profile_table_is_checked():
    """A new default table in a TRL profile module is added to TABLES."""
    listed = {id(defaults) for defaults, _ in TABLES.values()}
    missing = [f"{m.__name__}.{k}" for m in (a2po, grpo, grpo_rewards, iw_opd, preference, rloo, self_distillation) for k, v in vars(m).items()
               if k.endswith("_DEFAULTS") and isinstance(v, dict) and id(v) not in listed]
    assert not missing, missing
