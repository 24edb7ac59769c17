"""Shared fixtures: a tiny benchmark built once per session."""

from __future__ import annotations

import pytest
import torch
from support import BACKENDS, STORE_FORMATS, build_native, make_l96_model, service_settings

from data_pipeline.config import load_config
from data_pipeline.synth import generate

# The models under test are tiny: one intra-op thread is fastest, and it keeps the
# suite from oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

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


@pytest.fixture
def l96_repository(tmp_path):
    """A model repository holding model 'l96' version 1 (untrained, small)."""
    from correction.artifacts import publish

    model, config = make_l96_model()
    publish(tmp_path / "models", "l96", model, config)
    return tmp_path / "models"


@pytest.fixture
def start_server(l96_repository):
    """Start real uvicorn servers on 127.0.0.1 (free ports); all stopped at teardown."""
    from service.server import ServerThread

    servers = []

    def start(repository=None, **overrides):
        server = ServerThread(service_settings(repository or l96_repository, **overrides))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_increments(tmp_path_factory, tiny_synth):
    """Increments (window 0.05) from the tiny benchmark, small chunks for streaming tests."""
    from data_pipeline import build_increments

    out = tmp_path_factory.mktemp("inc") / "increments.zarr"
    build_increments(
        tiny_synth / "analyses.zarr",
        tiny_synth / "forecasts_archive.zarr",
        0.05,
        out,
        split="0.7:0.15:0.15",
        chunk_samples=37,
    )
    return out


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Inputs backed by numpy arrays (loaded) or by dask arrays (lazy)."""
    return request.param


@pytest.fixture(params=STORE_FORMATS)
def store_format(request):
    """Inputs stored as zarr v3 or as netCDF4."""
    return request.param


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """The C/Fortran clients, built and installed once per session (clients/build.sh)."""
    return build_native(tmp_path_factory.mktemp("native"))


def pytest_collection_modifyitems(config, items):
    """Give the slow cases (full-length runs, `make test-all`) an hour instead of the
    per-test limit of pyproject.toml, unless one sets its own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(3600))
