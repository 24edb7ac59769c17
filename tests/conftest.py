"""Shared fixtures: a tiny benchmark built once per session."""

from __future__ import annotations

import pytest

from data_pipeline.config import load_config
from data_pipeline.synth import generate

TINY = {
    "duration": 12.0,
    "da_spinup": 3.0,
    "truth_spinup": 2.0,
    "test_fraction": 0.5,
    "forecast_init_every": 1.0,
    "forecast_lead_max": 2.0,
}


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("l96-2s", **TINY)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory, tiny_config):
    """A tiny l96-2s benchmark directory (LETKF analyses)."""
    out = tmp_path_factory.mktemp("synth") / "bench"
    generate(tiny_config, out, progress=False, log=lambda _: None)
    return out
