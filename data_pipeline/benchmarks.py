"""The built-in l96 benchmarks: a config mapped to truth model, host, layout, observations.

The one place that turns benchmark settings (:class:`~data_pipeline.config.BenchmarkConfig`,
or the ``config`` dict a ``mecs synth`` directory records) into model objects, so
that no stage builds a Lorenz-96 by hand: the generator, evaluation, the training
commands, the demo and the benchmarks all ask this module. A model module holds only
its dynamics (:mod:`correction.hosts.lorenz96`); the experiment is this mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from correction.hosts import Lorenz96, Lorenz96TwoScale
from correction.layout import ModelLayout

from .config import BenchmarkConfig


@dataclass(frozen=True)
class L96Benchmark:
    """The two-scale truth, the one-scale host and how X is observed and laid out."""

    config: BenchmarkConfig

    @classmethod
    def of(cls, cfg: BenchmarkConfig | Mapping[str, Any]) -> L96Benchmark:
        """From a config object or the ``config`` dict a synth directory records."""
        if isinstance(cfg, BenchmarkConfig):
            return cls(cfg)
        known = {f.name for f in dataclasses.fields(BenchmarkConfig)}
        return cls(BenchmarkConfig(**{k: v for k, v in cfg.items() if k in known}))

    def truth_model(self) -> Lorenz96TwoScale:
        c = self.config
        return Lorenz96TwoScale(K=c.K, J=c.J, F=c.F, h=c.h, b=c.b, c=c.c, dt=c.dt_truth)

    @property
    def host_name(self) -> str:
        return "l96"

    def host_params(self) -> dict[str, Any]:
        """Keyword arguments of the registered host (``make_host("l96", **params)``)."""
        c = self.config
        return {"K": c.K, "F": c.host_F, "dt": c.dt_host}

    def host(self) -> Lorenz96:
        return Lorenz96(**self.host_params())

    def layout(self) -> ModelLayout:
        """One field ``X`` on the grid dim ``k`` of ``K`` points."""
        K = self.config.K
        return ModelLayout(("X",), {"X": ("k",)}, {"X": ()}, ("k",), {"k": K}, {"X": "1"})

    def observe(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Every X with Gaussian noise of ``obs_sigma``."""
        return x + self.config.obs_sigma * rng.standard_normal(x.shape)


def benchmark_of(cfg: Any) -> Any:
    """The benchmark of a config object or a synth directory's ``config`` dict: the 2-D
    QG benchmarks (:class:`data_pipeline.qg.QGBenchmark`) by their preset, else l96."""
    from .qg import QG_PRESETS, QGBenchmark, QGBenchmarkConfig

    preset = cfg.get("preset") if isinstance(cfg, Mapping) else getattr(cfg, "preset", None)
    if isinstance(cfg, QGBenchmarkConfig) or preset in QG_PRESETS:
        return QGBenchmark.of(cfg)
    return L96Benchmark.of(cfg)


__all__ = ["L96Benchmark", "benchmark_of"]
