"""xarray/dask/zarr stages: the synthetic benchmark, increments, statistics, stores.

The increment pipeline's API is re-exported here lazily, so ``import data_pipeline``
stays cheap (no dask or xarray until a name is used).
"""

from __future__ import annotations

from typing import Any

_INCREMENTS = (
    "IncompleteStoreError",
    "IncrementReport",
    "InputError",
    "build_increments",
    "open_increments",
    "plan_increments",
    "read_stats",
    "verify_increments",
)

__all__ = list(_INCREMENTS)


def __getattr__(name: str) -> Any:
    if name in _INCREMENTS:
        from . import increments

        return getattr(increments, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_INCREMENTS])
