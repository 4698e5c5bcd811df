"""How many compiles the gate runs at once: the CPU cores this process may use (:func:`usable_cores`)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the platform says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
