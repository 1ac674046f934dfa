"""Simulators, by name: `get("libero")` is LIBERO's `base.Simulator`.

Adding a simulator is one new module here that defines ``SIMULATOR = base.Simulator(...)`` (its tasks, its
`base.Env` and the protocol defaults) plus its line in `SIMULATORS`; the rollout loop (`base.run_episode`) and the
collection work with it unchanged. Modules outside `openpi.envs` reach a simulator through `get`, never by importing
its module (`tests/test_layout.py`).
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openpi.envs.base import Simulator

# Registry name -> the module (under openpi.envs) that defines SIMULATOR; imported on first use.
SIMULATORS = types.MappingProxyType({"libero": "openpi.envs.libero"})


def names() -> tuple[str, ...]:
    return tuple(SIMULATORS)


def get(name: str) -> Simulator:
    """The simulator registered as `name`; a ValueError lists the registered ones otherwise."""
    if name not in SIMULATORS:
        raise ValueError(f"Unknown simulator {name!r}; registered simulators: {', '.join(SIMULATORS)} (openpi.envs).")
    return importlib.import_module(SIMULATORS[name]).SIMULATOR
