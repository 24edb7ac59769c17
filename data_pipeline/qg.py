"""The 2-D benchmarks ``qg-eddy`` and ``qg-jet``: two-layer QG turbulence, subgrid model error.

The truth is the two-layer model (:class:`correction.hosts.qg.TwoLayerQG`) at high
resolution; the host is the same model at low resolution, so what the host lacks
is the forcing of the scales it does not resolve (the subgrid forcing of Ross et
al. 2023). Every truth state is coarse-grained to the host grid by spectral
truncation (the wavenumbers the host grid resolves, its Nyquist row and column
dropped) followed by a sharp isotropic cut below the host filter's band
(``coarse_cutoff``; ``None``: the host's own small-scale filter instead), so that it
is a state the host can represent. Analyses are the coarse-grained truth plus Gaussian noise of
``obs_noise`` times each layer's standard deviation, or (``analysis = "letkf"``)
the means of an LETKF cycled with the host on sparse observations
(:mod:`data_pipeline.qg_letkf`).

Parameters and sources. The physics of both presets is pyqg's two-layer model
(its documentation and defaults: ``L = 1000 km``, ``rd = 15 km``, ``H1 = 500 m``,
``U1 = 2.5 cm/s``, ``U2 = 0``, ``filterfac = 23.6``, ``dt = 1 h``); the two
configurations are those of Ross et al. (2023): ``eddy`` with pyqg's defaults
``beta = 1.5e-11 1/(m s)``, ``delta = 0.25``, ``rek = 5.787e-7 1/s``, and ``jet``
with ``beta = 1e-11``, ``delta = 0.1``, ``rek = 7e-8``; truth at 256^2 against a
64^2 host, as in that paper. Spin-up: ``spinup_host_years`` on the host grid from
small noise (cheap), then the state is interpolated spectrally to the truth grid
and run ``spinup_truth_years`` more (the eddy configuration at 64^2 equilibrates in
about four years, docs/synth.md).

Times are hours (the host steps in hours). The stores are written by
:mod:`data_pipeline.qg_stores`, where one ``SeedSequence`` feeds every draw, so a seed
reproduces them byte for byte (a store whose truth was derived with
:meth:`QGBenchmark.recut` differs by the float32 rounding, and says so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from correction.hosts.qg import TwoLayerQG
from correction.layout import ModelLayout

from .config import ConfigError, layered_config

HOURS_PER_YEAR = 24 * 365
STORE_DTYPE = np.float32
Q_ATTRS = {"long_name": "eddy potential vorticity", "units": "s-1"}
TIME_ATTRS = {"long_name": "model time", "units": "hours"}


@dataclass(frozen=True)
class QGBenchmarkConfig:
    """Settings of a two-layer QG benchmark: the defaults are ``qg-eddy``'s but for
    ``coarse_cutoff`` (None here, so that a store's config written before the presets
    cut still reads as filtered)."""

    preset: str = "qg-eddy"
    # physics (pyqg's two-layer model; Ross et al. 2023 for the eddy/jet values)
    L: float = 1.0e6
    beta: float = 1.5e-11
    rd: float = 15000.0
    delta: float = 0.25
    H1: float = 500.0
    U1: float = 0.025
    U2: float = 0.0
    rek: float = 5.787e-7
    filterfac: float = 23.6
    dt: float = 1.0  # hours, truth and host
    # resolutions (Ross et al. 2023: 256^2 truth, 64^2 low resolution)
    truth_nx: int = 256
    host_nx: int = 64
    # coarse-graining: None keeps every wavenumber the host grid resolves and applies the
    # host's filter (``"filter"`` in a file or override; stores made before the presets
    # had a cut); a number K keeps |k| <= K cycles per domain only, a sharp cut below
    # the band the filter damps (K <= 0.65 host_nx / 2, its onset; the presets cut at
    # 20, the quick versions at 10)
    coarse_cutoff: float | str | None = None
    # spin-up: on the host grid, then on the truth grid
    spinup_host_years: float = 5.0
    spinup_truth_years: float = 1.0
    # the stored period, analyses every obs_interval hours
    duration: float = 2.0 * HOURS_PER_YEAR
    obs_interval: float = 6.0
    analysis: str = "noisy-truth"  # or "letkf" (data_pipeline/qg_letkf.py)
    obs_noise: float = 0.02  # times each layer's standard deviation
    # the LETKF option: every obs_stride-th host point observed in x and y, both layers
    obs_stride: int = 4
    letkf_members: int = 20
    letkf_localization: float = 4.0  # Gaussian radius, host grid points
    letkf_inflation: float = 1.1
    # forecasts
    test_fraction: float = 0.25
    forecast_init_every: float = 240.0
    forecast_lead_max: float = 720.0
    archive_lead_max: float = 24.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("L", "rd", "H1", "delta", "dt", "duration", "obs_interval"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("rek", "beta", "obs_noise", "spinup_host_years", "spinup_truth_years"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("truth_nx", "host_nx"):
            n = getattr(self, name)
            if not isinstance(n, int) or n < 8 or n % 2:
                raise ConfigError(f"{name} must be an even integer >= 8, got {n!r}")
        if self.truth_nx % self.host_nx:
            raise ConfigError(
                f"truth_nx={self.truth_nx} must be a multiple of host_nx={self.host_nx}"
            )
        if self.coarse_cutoff == "filter":  # how a file or an override asks for None
            object.__setattr__(self, "coarse_cutoff", None)
        if self.coarse_cutoff is not None:
            k = self.coarse_cutoff
            onset = filter_onset(self.host_nx)
            if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= onset:
                raise ConfigError(
                    f"coarse_cutoff={k!r} must be a positive wavenumber up to the host "
                    f"filter's onset, {onset:g} cycles per domain at host_nx={self.host_nx}"
                )
        if self.analysis not in ("noisy-truth", "letkf"):
            raise ConfigError(
                f"analysis {self.analysis!r}: the QG benchmarks know 'noisy-truth' and 'letkf'"
            )
        if self.analysis == "letkf":
            s = self.obs_stride
            if isinstance(s, bool) or not isinstance(s, int) or s < 1 or self.host_nx % s:
                raise ConfigError(f"obs_stride={s!r} must be a positive divisor of host_nx")
            m = self.letkf_members
            if isinstance(m, bool) or not isinstance(m, int) or m < 2:
                raise ConfigError(f"letkf_members must be an integer >= 2, got {m!r}")
            radius = self.letkf_localization
            if not (isinstance(radius, int | float) and radius > 0):
                raise ConfigError(f"letkf_localization must be positive, got {radius!r}")
            if not (isinstance(self.letkf_inflation, int | float) and self.letkf_inflation >= 1):
                raise ConfigError(f"letkf_inflation must be >= 1, got {self.letkf_inflation!r}")
            if self.obs_noise <= 0:
                raise ConfigError("obs_noise must be positive for the letkf analysis")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        for name in ("obs_interval", "duration", "forecast_init_every", "forecast_lead_max"):
            self.steps(getattr(self, name), name)
        for name in ("duration", "forecast_init_every", "forecast_lead_max", "archive_lead_max"):
            self.cycles(getattr(self, name), name)

    def steps(self, hours: float, name: str) -> int:
        """Host steps in ``hours``; it must be a whole number."""
        n = round(hours / self.dt)
        if n < 1 or abs(n * self.dt - hours) > 1e-9 * max(1.0, hours):
            raise ConfigError(f"{name}={hours} is not a whole multiple of dt={self.dt}")
        return n

    def cycles(self, hours: float, name: str) -> int:
        """Analysis intervals in ``hours``; it must be a whole number."""
        n = round(hours / self.obs_interval)
        if n < 1 or abs(n * self.obs_interval - hours) > 1e-9 * max(1.0, hours):
            raise ConfigError(
                f"{name}={hours} is not a whole multiple of obs_interval={self.obs_interval}"
            )
        return n

    @property
    def n_cycles(self) -> int:
        return self.cycles(self.duration, "duration")

    @property
    def test_start(self) -> float:
        return int(round(self.n_cycles * (1 - self.test_fraction))) * self.obs_interval

    def increment_split(self) -> str:
        test = self.test_start
        return (
            f"train=0:{0.85 * test:g},val={0.87 * test:g}:{test - self.obs_interval:g},"
            f"test={test:g}:{self.duration:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Both presets coarse-grain by a sharp cut at |k| <= 20, just below the 64^2 host
# filter's onset (20.8): with the filter alone most of the model error is the filter's
# damping of its band, and offline corrections learn to undo it and blow up (docs/qg.md).
QG_PRESETS: dict[str, dict[str, Any]] = {
    "qg-eddy": {"coarse_cutoff": 20.0},
    "qg-jet": {
        "beta": 1.0e-11,
        "delta": 0.1,
        "rek": 7.0e-8,
        "spinup_host_years": 8.0,
        "coarse_cutoff": 20.0,
    },
}

# Small versions for tests and the quick demo: 64^2 -> 32^2, and four times the shear
# (U1 = 10 cm/s), so that the flow is turbulent after a few months of spin-up instead
# of the years the published configurations need.
QG_QUICK: dict[str, Any] = {
    "truth_nx": 64,
    "host_nx": 32,
    "U1": 0.1,
    "spinup_host_years": 0.3,
    "spinup_truth_years": 0.02,
    "duration": 480.0,
    "forecast_init_every": 48.0,
    "forecast_lead_max": 96.0,
    "coarse_cutoff": 10.0,  # the 32^2 filter's onset is 10.4
}


def load_qg_config(
    preset: str = "qg-eddy", path: str | Path | None = None, quick: bool = False, **overrides: Any
) -> QGBenchmarkConfig:
    """Preset defaults, then ``--quick``, then a JSON/TOML file, then explicit overrides."""
    return layered_config(QGBenchmarkConfig, QG_PRESETS, QG_QUICK, preset, path, quick, overrides)


@dataclass(frozen=True)
class QGBenchmark:
    """The high-resolution truth, the low-resolution host, the coarse-graining, the layout."""

    config: QGBenchmarkConfig

    @classmethod
    def of(cls, cfg: QGBenchmarkConfig | Mapping[str, Any]) -> QGBenchmark:
        if isinstance(cfg, QGBenchmarkConfig):
            return cls(cfg)
        known = {f.name for f in dataclasses.fields(QGBenchmarkConfig)}
        return cls(QGBenchmarkConfig(**{k: v for k, v in cfg.items() if k in known}))

    def _model(self, nx: int) -> TwoLayerQG:
        c = self.config
        return TwoLayerQG(
            nx=nx,
            L=c.L,
            beta=c.beta,
            rd=c.rd,
            delta=c.delta,
            H1=c.H1,
            U1=c.U1,
            U2=c.U2,
            rek=c.rek,
            dt=c.dt,
            filterfac=c.filterfac,
            name="qg",
        )

    def truth_model(self) -> TwoLayerQG:
        return self._model(self.config.truth_nx)

    @property
    def host_name(self) -> str:
        return "qg"

    def host_params(self) -> dict[str, Any]:
        """Keyword arguments of the registered host (``make_host("qg", **params)``)."""
        host = self.host()
        names = ("nx", "L", "beta", "rd", "delta", "H1", "U1", "U2", "rek", "dt", "filterfac")
        return {n: getattr(host, n) for n in names}

    def host(self) -> TwoLayerQG:
        return self._model(self.config.host_nx)

    def layout(self) -> ModelLayout:
        """One field ``q`` on levels ``lev`` (2) over the grid ``(y, x)``."""
        n = self.config.host_nx
        return ModelLayout(
            ("q",),
            {"q": ("lev", "y", "x")},
            {"q": ("lev",)},
            ("y", "x"),
            {"lev": 2, "y": n, "x": n},
            {"q": "s-1"},
        )

    def coarse_grain(self, q: torch.Tensor) -> torch.Tensor:
        """Truth-grid PV ``[..., 2, N, N]`` -> host-grid PV ``[..., 2, n, n]``."""
        return resample(q, self.config.host_nx, self.coarse_filter(q.device))

    def coarse_filter(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The spectral weights ``[n, n//2 + 1]`` after truncation: the host's filter, or
        a sharp isotropic cut at ``coarse_cutoff``.

        Why the cut: the host filter damps its band (|k| of 21-28 at 64^2) on every step
        while the truth keeps energy there, so with the filter alone most of a 6-hour
        increment is the filter's damping of that band (docs/qg.md), and a correction
        learns to undo the filter, a large gain at the grid scale. Cut below the band,
        the increments carry the resolved scales' error.
        """
        k = self.config.coarse_cutoff
        if k is None:
            return self.host().ops(device)["filter"]
        n = self.config.host_nx
        ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)[:, None]
        kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)[None, :]
        return (kx**2 + ky**2 <= k**2).to(torch.float64)

    def recut(self, coarse: np.ndarray) -> np.ndarray:
        """A host-filtered coarse truth ``[..., n, n]`` cut at ``coarse_cutoff``.

        The filter is exactly 1 up to its onset, so this equals coarse-graining the
        truth-grid states again (up to the stored precision): a store can be derived
        from another's truth without running the 256^2 model again.
        """
        if self.config.coarse_cutoff is None:
            raise ConfigError("recut needs a coarse_cutoff")
        x = torch.from_numpy(np.asarray(coarse, dtype=np.float64))
        return resample(x, self.config.host_nx, self.coarse_filter()).numpy()


def filter_onset(n: int) -> float:
    """The wavenumber (cycles per domain) above which the host filter acts at ``n^2``."""
    return TwoLayerQG.cphi * n / (2 * math.pi)


def resample(q: torch.Tensor, n: int, filtr: torch.Tensor | None = None) -> torch.Tensor:
    """Spectral truncation (``n`` < N) or zero-padding (``n`` > N) of ``[..., N, N]`` fields
    to ``n x n``, keeping grid-point amplitudes; the Nyquist row and column are dropped.
    ``filtr`` (``[n, n//2 + 1]``) multiplies the result's spectrum (the host's filter)."""
    big = q.shape[-1]
    qh = torch.fft.rfft2(q.to(torch.float64))
    m = min(big, n) // 2  # wavenumbers kept: |ky| < m, kx < m
    out = torch.zeros((*q.shape[:-2], n, n // 2 + 1), dtype=qh.dtype, device=q.device)
    out[..., :m, :m] = qh[..., :m, :m]
    out[..., n - m + 1 :, :m] = qh[..., big - m + 1 :, :m]
    out = out * (n / big) ** 2
    if filtr is not None:
        out = out * filtr
    return torch.fft.irfft2(out, s=(n, n))


__all__ = [
    "QGBenchmark",
    "QGBenchmarkConfig",
    "QG_PRESETS",
    "QG_QUICK",
    "filter_onset",
    "load_qg_config",
    "resample",
]
