"""Memory budgets and model footprints, in bytes."""

from __future__ import annotations

import os
import re

import redis

from inferpool._exceptions import ConfigurationError
from inferpool.constants import MODEL_FOOTPRINTS_KEY, MODEL_LOAD_SECONDS_KEY, MODEL_WAKE_SECONDS_KEY
from inferpool.model_registry.spec import ModelSpec

GIB = 1024**3
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": GIB, "tib": 1024**4}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def device_memory_bytes() -> int:
    """The memory models load into: the first GPU's, where torch sees one (and is already imported), else RAM."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_budget(text: str) -> int:
    """``--memory-budget``: bytes with an optional unit (``8GiB``, ``500MB``, ``2e9``), or a fraction of the
    device's memory (``0.5``: half the GPU's, or of RAM on CPU)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigurationError(f"memory budget {text!r}: give bytes with a unit (8GiB, 500MB) or a fraction of "
                                 "the device's memory (0.5)")  # fmt: skip
    value = float(match.group(1))
    if unit == "" and 0 < value <= 1:
        return int(value * device_memory_bytes())
    budget = int(value * _UNITS[unit])
    if budget <= 0:
        raise ConfigurationError(f"memory budget {text!r} must be more than zero")
    return budget


def known_footprint(spec: ModelSpec, client: redis.Redis) -> int | None:
    """The model's footprint: the registry's ``memory_gb``, else the one a worker measured and recorded."""
    if spec.memory_gb is not None:
        return int(spec.memory_gb * GIB)
    measured = client.hget(MODEL_FOOTPRINTS_KEY, spec.name)
    return int(measured) if measured else None


def record_footprint(client: redis.Redis, model: str, footprint: int) -> None:
    client.hset(MODEL_FOOTPRINTS_KEY, model, footprint)


def record_swap_seconds(client: redis.Redis, model: str, seconds: float, *, woke: bool) -> None:
    """Record how long the model's load (or, ``woke``, its wake from sleep) took on a budgeted worker."""
    client.hset(MODEL_WAKE_SECONDS_KEY if woke else MODEL_LOAD_SECONDS_KEY, model, f"{seconds:.3f}")


def known_swap_seconds(client: redis.Redis, model: str, *, woke: bool) -> float | None:
    """How long the model's last load (or, ``woke``, its last wake) took on a budgeted worker, if one did."""
    value = client.hget(MODEL_WAKE_SECONDS_KEY if woke else MODEL_LOAD_SECONDS_KEY, model)
    return float(value) if value else None


def resident_bytes() -> int:
    """What this process holds now (GPU memory allocated by torch where a GPU is in use, else resident RAM)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.memory_allocated())
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def host_available_bytes() -> int:
    """RAM the host can still give (Linux's MemAvailable): where a sleeping model's weights go."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


#: The share of the host's available RAM that sleeping models may fill (the rest stays the host's).
PARK_SHARE = 0.5


def can_park(nbytes: int) -> bool:
    """Whether a model of ``nbytes`` may sleep in host RAM rather than be unloaded."""
    return nbytes <= PARK_SHARE * host_available_bytes()


def describe_bytes(count: float) -> str:
    return f"{count / GIB:.2f} GiB"
