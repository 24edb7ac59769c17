"""How physical fields map to the packed tensors the networks see.

A model's input is one or more fields, each with dims ``(*levels, *horizontal)``.
Inside the model they are packed as ``[B, C, *H]``: channels C are the fields'
levels stacked in field order (a field without levels is one channel). The
*state array* that callers (the service, numpy users) pass is ``[B, *state_shape]``
where ``state_shape`` is the field's own dims for a single field and ``(C, *H)``
for several fields. Tensors inside, xarray at the boundary (after fv3fit).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch-free at run time: the Python client packs xarray states with it
    import torch
    import xarray as xr


@dataclass(frozen=True)
class ModelLayout:
    fields: tuple[str, ...]
    field_dims: dict[str, tuple[str, ...]]
    level_dims: dict[str, tuple[str, ...]]
    horizontal_dims: tuple[str, ...]
    sizes: dict[str, int]
    units: dict[str, str]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelLayout:
        return cls(
            fields=tuple(d["fields"]),
            field_dims={k: tuple(v) for k, v in d["field_dims"].items()},
            level_dims={k: tuple(v) for k, v in d["level_dims"].items()},
            horizontal_dims=tuple(d["horizontal_dims"]),
            sizes={k: int(v) for k, v in d["sizes"].items()},
            units=dict(d.get("units", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_shape"] = list(self.state_shape)
        return d

    @classmethod
    def from_dataset(
        cls,
        ds: xr.Dataset,
        fields: list[str],
        level_dims: dict[str, list[str]],
        sample_dim: str = "sample",
    ) -> ModelLayout:
        """Infer the layout from the per-field variables of an increment store."""
        field_dims, horizontal = {}, None
        for f in fields:
            var = ds[f"state_{f}"] if f"state_{f}" in ds else ds[f]
            dims = tuple(d for d in var.dims if d != sample_dim)
            levels = tuple(level_dims.get(f, ()))
            h = tuple(d for d in dims if d not in levels)
            if horizontal is not None and h != horizontal:
                raise ValueError(
                    f"field '{f}' has horizontal dims {h}, others have {horizontal}; "
                    "all fields of one model must share the horizontal grid"
                )
            horizontal = h
            field_dims[f] = levels + h
        sizes = {d: int(ds.sizes[d]) for dims in field_dims.values() for d in dims}
        units = {
            f: str(ds[f"state_{f}"].attrs.get("units", "1")) for f in fields if f"state_{f}" in ds
        }
        return cls(
            tuple(fields),
            field_dims,
            {f: tuple(level_dims.get(f, ())) for f in fields},
            horizontal or (),
            sizes,
            units,
        )

    @property
    def horizontal_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes[d] for d in self.horizontal_dims)

    def n_levels(self, field: str) -> int:
        return math.prod(self.sizes[d] for d in self.level_dims[field])

    @property
    def channels(self) -> int:
        return sum(self.n_levels(f) for f in self.fields)

    @property
    def state_shape(self) -> tuple[int, ...]:
        if len(self.fields) == 1:
            return tuple(self.sizes[d] for d in self.field_dims[self.fields[0]])
        return (self.channels, *self.horizontal_shape)

    @property
    def state_dims(self) -> tuple[str, ...]:
        if len(self.fields) == 1:
            return self.field_dims[self.fields[0]]
        return ("channel", *self.horizontal_dims)

    def channel_names(self) -> list[str]:
        """What each packed channel is, in order: ``T[lev=0]``, ``T[lev=1]``, ``ps``."""
        import itertools

        names = []
        for f in self.fields:
            dims = self.level_dims[f]
            if not dims:
                names.append(f)
                continue
            for idx in itertools.product(*(range(self.sizes[d]) for d in dims)):
                inner = ",".join(f"{d}={i}" for d, i in zip(dims, idx, strict=True))
                names.append(f"{f}[{inner}]")
        return names

    def check_state(self, x: torch.Tensor | np.ndarray) -> None:
        """Reject arrays whose trailing dims are not ``state_shape``."""
        shape = tuple(x.shape)
        n = len(self.state_shape)
        if len(shape) != n + 1 or shape[1:] != self.state_shape:
            raise ValueError(
                f"state has shape {list(shape)}, expected [batch, "
                f"{', '.join(map(str, self.state_shape))}] (dims: batch, "
                f"{', '.join(self.state_dims)})"
            )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """State array ``[B, *state_shape]`` -> network tensor ``[B, C, *H]``."""
        if len(self.fields) == 1:
            return x.reshape(x.shape[0], self.channels, *self.horizontal_shape)
        return x

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """Network tensor ``[B, C, *H]`` -> state array ``[B, *state_shape]``."""
        return y.reshape(y.shape[0], *self.state_shape)

    def dataset_to_state(self, ds: xr.Dataset, batch_dim: str) -> np.ndarray:
        """Stack the fields of ``ds`` (with a leading ``batch_dim``) into a state array."""
        parts = []
        for f in self.fields:
            if f not in ds:
                raise ValueError(f"dataset has no variable '{f}' (model fields: {self.fields})")
            var = ds[f]
            expected = {batch_dim, *self.field_dims[f]}
            if set(var.dims) != expected:
                want = (batch_dim, *self.field_dims[f])
                raise ValueError(f"variable '{f}' has dims {var.dims}, expected {want}")
            for d in self.field_dims[f]:
                if var.sizes[d] != self.sizes[d]:
                    raise ValueError(
                        f"variable '{f}': dim '{d}' has size {var.sizes[d]}, "
                        f"expected {self.sizes[d]}"
                    )
            arr = var.transpose(batch_dim, *self.field_dims[f]).values
            parts.append(arr.reshape(arr.shape[0], self.n_levels(f), *self.horizontal_shape))
        packed = np.concatenate(parts, axis=1)
        return packed.reshape(packed.shape[0], *self.state_shape)

    def state_to_dataset(
        self, state: np.ndarray, like: xr.Dataset, batch_dim: str, suffix_units: str = ""
    ) -> xr.Dataset:
        """Inverse of :meth:`dataset_to_state`, with coords taken from ``like``."""
        packed = state.reshape(state.shape[0], self.channels, *self.horizontal_shape)
        out, c = {}, 0
        for f in self.fields:
            n = self.n_levels(f)
            arr = packed[:, c : c + n].reshape(
                state.shape[0], *(self.sizes[d] for d in self.field_dims[f])
            )
            c += n
            units = self.units.get(f, "1") + suffix_units
            out[f] = ((batch_dim, *self.field_dims[f]), arr, {"units": units})
        coords = {k: v for k, v in like.coords.items() if set(v.dims) <= {batch_dim, *self.sizes}}
        import xarray as xr

        return xr.Dataset(out, coords=coords)


def field_slices(layout: ModelLayout) -> list[tuple[str, slice | None]]:
    """Each field's channels in a state ``[batch, *state_shape]`` (None: a one-field
    model's whole state), for scores and metrics kept per field."""
    if len(layout.fields) == 1:
        return [(layout.fields[0], None)]
    out, start = [], 0
    for f in layout.fields:
        n = layout.n_levels(f)
        out.append((f, slice(start, start + n)))
        start += n
    return out
