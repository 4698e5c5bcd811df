"""The names fastalign's losses and estimators carry in verl's registries."""
from __future__ import annotations

PREFIX = "fastalign_"


def unprefixed(name: str) -> str:
    """A verl loss mode or estimator name without :data:`PREFIX` (``fastalign_grpo`` and ``grpo`` name one
    profile: the config that selects the registered entry also works with the direct API)."""
    return name[len(PREFIX):] if isinstance(name, str) and name.startswith(PREFIX) else name
