"""Benchmark settings: every parameter of the l96 benchmarks in one dataclass.

Another benchmark (other K, J, F, noise, filter settings) is a config file, not a
code change. Presets are small dicts of overrides on the defaults, after DAPPER's
habit of keeping experiment settings apart from the model code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from correction.config_files import SettingsFileError
from correction.config_files import read_settings_file as _read

#: the increment store's default train/validation/test split (``mecs increments --split``)
DEFAULT_SPLIT = "0.7:0.15:0.15"
#: workers of the dask cluster a pipeline job starts for itself (``--workers``)
LOCAL_WORKERS = 2


class ConfigError(ValueError):
    """A setting is unknown or out of range; the message names the field."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """The two-scale Lorenz-96 benchmark (docs/synth.md).

    Times are in model time units (MTU). The truth is cycled for ``da_spinup``
    (filter spin-up, not stored) and then ``duration``; the last ``test_fraction``
    of the stored period is the test period from which long forecasts start.
    """

    preset: str = "l96-2s"
    # truth: two-scale Lorenz-96
    K: int = 36
    J: int = 10
    F: float = 10.0
    h: float = 1.0
    b: float = 10.0
    c: float = 10.0
    dt_truth: float = 0.005
    truth_spinup: float = 10.0
    # host: one-scale Lorenz-96 without the coupling term
    host_F: float = 10.0
    dt_host: float = 0.01
    # observations of every X
    obs_interval: float = 0.05
    obs_sigma: float = 0.1
    # analyses
    analysis: str = "letkf"
    members: int = 20
    localization: float = 3.0
    inflation: float = 1.6
    noisy_truth_sigma: float | None = None
    da_spinup: float = 10.0
    duration: float = 1000.0
    # forecasts
    test_fraction: float = 0.2
    forecast_init_every: float = 0.5
    forecast_lead_max: float = 5.0
    archive_lead_max: float = 0.25
    # storage
    y_stride: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive = [
            "K",
            "J",
            "dt_truth",
            "dt_host",
            "obs_interval",
            "members",
            "localization",
            "inflation",
            "duration",
            "forecast_init_every",
            "forecast_lead_max",
            "archive_lead_max",
            "y_stride",
            "b",
            "c",
        ]
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ["obs_sigma", "truth_spinup", "da_spinup", "h"]:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.noisy_truth_sigma is not None and not self.noisy_truth_sigma >= 0:
            raise ConfigError(
                f"noisy_truth_sigma must be non-negative, got {self.noisy_truth_sigma!r}"
            )
        if self.analysis not in ANALYSIS_METHODS:
            raise ConfigError(
                f"analysis must be one of {list(ANALYSIS_METHODS)}, got {self.analysis!r}"
            )
        if self.analysis == "letkf" and self.obs_sigma <= 0:
            raise ConfigError("obs_sigma must be positive for the letkf analysis")
        if self.members < 2:
            raise ConfigError(f"members must be at least 2, got {self.members}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        self.steps_per(self.obs_interval, self.dt_truth, "obs_interval", "dt_truth")
        self.steps_per(self.obs_interval, self.dt_host, "obs_interval", "dt_host")
        for name in [
            "duration",
            "da_spinup",
            "forecast_init_every",
            "forecast_lead_max",
            "archive_lead_max",
            "truth_spinup",
        ]:
            self.steps_per(getattr(self, name), self.obs_interval, name, "obs_interval")

    @staticmethod
    def steps_per(span: float, dt: float, span_name: str, dt_name: str) -> int:
        """Number of ``dt`` in ``span``; it must be a whole number."""
        n = round(span / dt)
        if abs(n * dt - span) > 1e-9 * max(1.0, span):
            raise ConfigError(f"{span_name}={span} is not a whole multiple of {dt_name}={dt}")
        return n

    @property
    def n_cycles(self) -> int:
        """Stored analysis times."""
        return self.steps_per(self.duration, self.obs_interval, "duration", "obs_interval")

    @property
    def test_start(self) -> float:
        """First time of the test period (a whole number of cycles)."""
        n_train = int(round(self.n_cycles * (1 - self.test_fraction)))
        return n_train * self.obs_interval

    def increment_split(self) -> str:
        """Split spec for ``mecs increments``: train, then validation just before the
        test period (gaps between the blocks), test = the evaluation period."""
        test = self.test_start
        return (
            f"train=0:{0.85 * test:g},val={0.87 * test:g}:{test - self.obs_interval:g},"
            f"test={test:g}:{self.duration:g}"
        )

    @property
    def analysis_noise(self) -> float:
        return self.obs_sigma if self.noisy_truth_sigma is None else self.noisy_truth_sigma

    def replace(self, **changes: Any) -> BenchmarkConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ANALYSIS_METHODS = ("letkf", "noisy-truth")

PRESETS: dict[str, dict[str, Any]] = {
    # c=10: strong scale separation, the coupling is nearly a function of local X
    "l96-2s": {},
    # c=4: fast variables not slaved to X; memory and non-locality matter
    "l96-2s-c4": {"c": 4.0},
}

# A small version for tests and the quick demo: same physics, shorter periods.
QUICK: dict[str, Any] = {
    "duration": 40.0,
    "da_spinup": 5.0,
    "truth_spinup": 5.0,
    "forecast_init_every": 1.0,
}


def load_config(
    preset: str = "l96-2s",
    path: str | Path | None = None,
    quick: bool = False,
    **overrides: Any,
) -> BenchmarkConfig:
    """Preset defaults, then ``--quick``, then a JSON/TOML file, then explicit overrides."""
    return layered_config(BenchmarkConfig, PRESETS, QUICK, preset, path, quick, overrides)


def layered_config(
    cls: type,
    presets: dict[str, dict[str, Any]],
    quick_values: dict[str, Any],
    preset: str,
    path: str | Path | None,
    quick: bool,
    overrides: dict[str, Any],
) -> Any:
    """A benchmark config of ``cls``: preset, ``quick``, file, overrides (``None`` skipped);
    unknown names are a :class:`ConfigError` listing the known ones."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {sorted(presets)}")
    values: dict[str, Any] = {"preset": preset, **presets[preset]}
    if quick:
        values.update(quick_values)
    if path is not None:
        values.update(read_settings_file(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known settings: {sorted(known)}")
    return cls(**values)


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of settings from a JSON, TOML or env file."""
    try:
        return _read(path)
    except SettingsFileError as err:
        raise ConfigError(str(err)) from None


__all__ = ["BenchmarkConfig", "ConfigError", "PRESETS", "QUICK", "load_config"]
