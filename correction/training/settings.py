"""Building the training stages' settings dataclasses from config files."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_dict(cls: type[T], values: dict[str, Any], stage: str) -> T:
    """``cls(**values)``, refusing unknown names with a message that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {stage} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
