"""Reading TRL config fields: a ``*Config`` object or a dict with its field names, TRL's defaults for the
fields not given. A dict's keys are checked against the config class (when TRL is importable) and the
fields read, so a misspelt key raises instead of leaving its field at the default."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, Optional

from fastalign._options import did_you_mean

# the name in error messages -> (module, class) of TRL's config
CONFIG_CLASSES = {"DPOConfig": ("trl", "DPOConfig"), "CPOConfig": ("trl.experimental.cpo", "CPOConfig"),
                  "ORPOConfig": ("trl.experimental.orpo", "ORPOConfig"), "KTOConfig": ("trl", "KTOConfig"),
                  "GRPOConfig": ("trl", "GRPOConfig"), "RLOOConfig": ("trl", "RLOOConfig"),
                  "TPOConfig": ("trl.experimental.tpo", "TPOConfig"),
                  "IWOPDConfig": ("trl.experimental.iw_opd", "IWOPDConfig"),
                  "A2POConfig": ("trl.experimental.a2po", "A2POConfig"),
                  "SDPOConfig": ("trl.experimental.sdpo", "SDPOConfig"),
                  "SDFTConfig": ("trl.experimental.sdft", "SDFTConfig")}


def config_fields(name: str) -> Optional[set]:
    """Field names of TRL's config class ``name``, or None when TRL is not importable."""
    module, cls = CONFIG_CLASSES[name]
    try:
        return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    except Exception:  # TRL absent or laid out differently: the fields read are still known
        return None


def check_keys(config: Any, defaults: Dict[str, Any], name: str) -> None:
    """A dict ``config``'s keys must be fields of ``name`` (or of ``defaults``): a ``ValueError`` with a
    "did you mean" otherwise. Objects are not checked (TRL's own class rejects unknown fields)."""
    if isinstance(config, dict):
        known = set(defaults) | (config_fields(name) or set())
        for k in config:
            if k not in known:
                raise ValueError(f"{name} has no field {k!r}{did_you_mean(k, sorted(known))}")


def read_fields(config: Any, defaults: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The fields of ``defaults`` from a TRL config object or dict (None: every default), TRL's defaults
    for the missing ones; a dict's keys are checked (:func:`check_keys`)."""
    if config is None:
        return dict(defaults)
    check_keys(config, defaults, name)
    if isinstance(config, dict):
        return {k: config.get(k, v) for k, v in defaults.items()}
    return {k: getattr(config, k, v) for k, v in defaults.items()}
