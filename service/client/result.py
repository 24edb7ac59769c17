"""``InferResult``: one infer answer as the client hands it to the caller."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class InferResult:
    """One infer answer: the correction and what the server said about it."""

    correction: np.ndarray
    model_name: str
    model_version: int
    out_of_distribution: list[bool]
    capped_values: int
    batch_size: int
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    server_timing: str = ""  # the Server-Timing header as sent

    @property
    def server_timing_ms(self) -> dict[str, float]:
        """The server's time per stage (read, decode, queue, forward, total), in ms."""
        return _server_timing(self.server_timing)


def _server_timing(value: str) -> dict[str, float]:
    """``forward;dur=1.2, total;dur=1.5`` -> ``{"forward": 1.2, "total": 1.5}``."""
    out = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            with contextlib.suppress(ValueError):
                out[name] = float(rest[4:])
    return out
