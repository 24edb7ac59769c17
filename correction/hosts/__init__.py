"""Host models and the registry that names them.

Implementations are chosen by name so that artifacts and configs can record which
host a model was trained against, and a new host is a registry entry, not a code
change elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import (
    BlackBoxHost,
    HostGradientError,
    HostModel,
    check_state,
    integrate,
    rk4_step,
    to_tensor,
)
from .lorenz96 import Lorenz96, Lorenz96TwoScale, l96_tendency
from .qg import TwoLayerQG

HOSTS: dict[str, Callable[..., HostModel]] = {
    "l96": Lorenz96,
    "l96-2s": Lorenz96TwoScale,
    "qg": TwoLayerQG,
}


def make_host(name: str, black_box: bool = False, **params: Any) -> HostModel:
    """Build a registered host by name; ``black_box=True`` hides its gradients."""
    try:
        factory = HOSTS[name]
    except KeyError:
        raise ValueError(f"unknown host '{name}'; known hosts: {sorted(HOSTS)}") from None
    host = factory(**params)
    return BlackBoxHost.wrap(host) if black_box else host


__all__ = [
    "HOSTS",
    "BlackBoxHost",
    "HostGradientError",
    "HostModel",
    "Lorenz96",
    "Lorenz96TwoScale",
    "TwoLayerQG",
    "check_state",
    "integrate",
    "l96_tendency",
    "make_host",
    "rk4_step",
    "to_tensor",
]
