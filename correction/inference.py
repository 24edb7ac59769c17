"""The inference side of a correction model: what the service and forecasts import.

:class:`Corrector` loads a model version in one call and answers the tendency
correction (physical units per unit time) for numpy arrays, tensors or xarray
Datasets, batched over ensemble members. :class:`CorrectedHost` composes it with a
host model's step: ``x_{n+1} = host.step(x_n) + dt * c(x_n)``. Nothing here
imports the training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import artifacts
from .corrections import Correction, NetworkCorrection
from .hosts import HostModel, to_tensor
from .layout import ModelLayout
from .networks import CorrectionModel
from .rollout import rollout
from .timeunits import MODEL_UNIT, TimeUnitError, canonical_unit


class Corrector(Correction):
    """A loaded correction model with its layout, statistics and provenance.

    A :class:`~correction.corrections.Correction`: ``tendency`` is :meth:`forward`.
    """

    def __init__(
        self,
        model: CorrectionModel,
        config: dict[str, Any],
        name: str | None = None,
        version: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config
        self.layout = ModelLayout.from_dict(config["layout"])
        self.name = name or config.get("name", "model")
        self.version = version if version is not None else config.get("version")
        norm = config["normalisation"]
        self.in_mean = np.asarray(norm["in_mean"], dtype=np.float64)
        self.in_std = np.asarray(norm["in_std"], dtype=np.float64)
        self.out_std = np.asarray(norm["out_std"], dtype=np.float64)
        self.network = NetworkCorrection(self.model, self.layout)
        # what "per unit time" means (correction.timeunits); versions from before the
        # time section are Lorenz-96 benchmark models, in model time units
        time_section = config.get("time") or {}
        unit = str(time_section.get("unit", MODEL_UNIT))
        try:
            self.time_unit = canonical_unit(unit)
        except TimeUnitError:  # a numeric axis's own unit: served as is, never converted
            self.time_unit = unit
        host_dt = time_section.get("host_dt")
        self.host_dt = float(host_dt) if host_dt is not None else None

    @classmethod
    def load(cls, repository: str | Path, name: str, version: int | None = None) -> Corrector:
        """Load ``name`` (newest version unless ``version``) from a model repository."""
        mv = artifacts.resolve(repository, name, version)
        return cls.from_path(mv.path, name=mv.name, version=mv.version)

    @classmethod
    def from_path(
        cls, path: str | Path, name: str | None = None, version: int | None = None
    ) -> Corrector:
        model, config = artifacts.load(path)
        return cls(model, config, name=name, version=version)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.layout.state_shape

    def forward(self, state: torch.Tensor, forcings: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``[B, *state_shape]`` -> correction of the same shape (no grad)."""
        self.layout.check_state(state)
        with torch.no_grad():
            return self.network.tendency(state, forcings)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def __call__(self, state, forcings=None):
        """Correction for a numpy array, tensor or Dataset, returned as the same kind.

        Arrays may omit the batch dim (a single state). Datasets need one variable
        per model field and one extra (batch) dim, e.g. ``member`` or ``time``.
        """
        if isinstance(state, xr.Dataset):
            return self._call_dataset(state, forcings)
        is_numpy = not isinstance(state, torch.Tensor)
        if is_numpy:
            state = np.asarray(state)
            if state.dtype.kind != "f":
                raise TypeError(f"state must be floating point, got {state.dtype}")
        x = to_tensor(state)
        single = x.ndim == len(self.state_shape)
        if single:
            x = x.unsqueeze(0)
        if not torch.is_floating_point(x):
            raise TypeError(f"state must be floating point, got {x.dtype}")
        f = None if forcings is None else to_tensor(forcings).reshape(x.shape[0], -1)
        y = self.forward(x, f)
        if single:
            y = y[0]
        return y.numpy() if is_numpy else y

    def _call_dataset(self, ds: xr.Dataset, forcings) -> xr.Dataset:
        missing = [f for f in self.layout.fields if f not in ds]
        if missing:
            raise ValueError(
                f"dataset has no variable '{missing[0]}' (model fields: {list(self.layout.fields)})"
            )
        grid = {d for f in self.layout.fields for d in self.layout.field_dims[f]}
        extra = [d for d in ds[self.layout.fields[0]].dims if d not in grid]
        if len(extra) > 1:
            raise ValueError(f"dataset has several non-grid dims {extra}; expected at most one")
        if not extra:
            ds = ds.expand_dims("sample")
        batch_dim = extra[0] if extra else "sample"
        state = self.layout.dataset_to_state(ds, batch_dim)
        corr = self(state.astype(np.float64), forcings)
        out = self.layout.state_to_dataset(corr, ds, batch_dim, suffix_units=" per unit time")
        out.attrs.update(
            model=self.name, model_version=self.version, long_name="tendency correction"
        )
        return out if extra else out.isel(sample=0, drop=True)

    def out_of_distribution(self, state: np.ndarray, threshold: float = 6.0) -> np.ndarray:
        """Per-sample flag: some channel lies ``threshold`` training stds from its mean."""
        packed = state.reshape(state.shape[0], self.layout.channels, -1)
        z = np.abs(packed - self.in_mean[None, :, None]) / self.in_std[None, :, None]
        return z.max(axis=(1, 2)) > threshold

    def compose(self, host: HostModel) -> CorrectedHost:
        return CorrectedHost(host, self)


class CorrectedHost:
    """The host model with the correction added at every step (itself a host)."""

    differentiable = False

    def __init__(self, host: HostModel, corrector: Corrector) -> None:
        if tuple(host.state_shape) != tuple(corrector.state_shape):
            raise ValueError(
                f"host '{host.name}' state shape {host.state_shape} differs from model "
                f"'{corrector.name}' state shape {corrector.state_shape}"
            )
        self.host, self.corrector = host, corrector
        self.name = f"{host.name}+{corrector.name}@{corrector.version}"
        self.state_shape = tuple(host.state_shape)
        self.dt = host.dt

    def step(self, x):
        is_numpy = not isinstance(x, torch.Tensor)
        xt = to_tensor(x)
        batch = xt.reshape(-1, *self.state_shape)
        nxt = rollout(self.host, self.corrector, batch, 1)
        out = to_tensor(nxt).to(xt.dtype).reshape(xt.shape)
        return out.numpy() if is_numpy else out
