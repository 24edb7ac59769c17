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


def make_l96_model(seed: int = 0, K: int = 36, network: str = "stencil-cnn"):
    """A small untrained l96 correction model with plausible statistics."""
    import torch

    from correction.artifacts import build_config
    from correction.layout import ModelLayout
    from correction.networks import CorrectionModel

    torch.manual_seed(seed)
    layout = ModelLayout(("X",), {"X": ("k",)}, {"X": ()}, ("k",), {"k": K}, {"X": "1"})
    params = {"hidden": 16, "depth": 3} | ({"kernel": 5} if network == "stencil-cnn" else {})
    model = CorrectionModel(network, params, 1, 1, 1)
    model.set_normalisation([2.5], [3.6], [-0.4], [1.8])
    config = build_config(model, layout, params, training={"mode": "test"})
    return model, config


@pytest.fixture
def l96_repository(tmp_path):
    """A model repository holding model 'l96' version 1 (untrained, small)."""
    from correction.artifacts import publish

    model, config = make_l96_model()
    publish(tmp_path / "models", "l96", model, config)
    return tmp_path / "models"
