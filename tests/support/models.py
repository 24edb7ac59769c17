"""Small untrained models and service settings for tests."""

from __future__ import annotations

from typing import Any


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


def service_settings(repository: Any, **overrides: Any):
    """Service settings for tests: quiet, no poller, torch threads and GC left alone."""
    from service.settings import ServiceSettings

    values = {
        "repository": repository,
        "port": 0,
        "torch_threads": 0,
        "gc_freeze": False,
        "poll_interval_s": 0,
        "log_level": "warning",
    }
    return ServiceSettings(**(values | overrides))
