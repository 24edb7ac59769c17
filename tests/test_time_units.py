"""Correction time units: recorded, stated, converted or refused, applied by the client."""

from __future__ import annotations

import numpy as np
import pytest
from support import make_l96_model

from correction import artifacts
from correction.inference import Corrector
from correction.timeunits import TimeUnitError, canonical_unit, scale
from service.client import CorrectionClient, RequestRejected

RNG = np.random.default_rng(21)


def test_units_convert_only_where_they_can():
    assert canonical_unit("hours") == canonical_unit("h") == "hour"
    assert scale("hour", "s") == pytest.approx(1 / 3600)
    assert scale("s", "day") == 86400
    assert scale("model time units", "mtu") == 1
    with pytest.raises(TimeUnitError, match="model time units have no length"):
        scale("model time unit", "s")
    with pytest.raises(TimeUnitError, match="unknown time unit 'fortnight'"):
        canonical_unit("fortnight")


def _publish(repo, unit, host_dt):
    model, config = make_l96_model()
    config["time"] = {"unit": unit, "window": 6.0, "host_dt": host_dt}
    return artifacts.publish(repo, "l96", model, config)


@pytest.fixture
def hourly(tmp_path):
    """A model whose corrections are per hour, trained with a 0.25 h (900 s) host step."""
    repo = tmp_path / "hourly"
    _publish(repo, "hour", 0.25)
    return repo


def test_the_unit_is_in_the_artifact_and_the_metadata(start_server, hourly, l96_repository):
    corr = Corrector.load(hourly, "l96")
    assert corr.time_unit == "hour" and corr.host_dt == 0.25
    legacy = Corrector.load(l96_repository, "l96")  # no time section: model time units
    assert legacy.time_unit == "model time unit" and legacy.host_dt is None
    server = start_server(hourly)
    with CorrectionClient(server.url, "l96") as c:
        p = c.metadata()["parameters"]
    assert p["time_unit"] == "hour" and p["host_dt"] == 0.25
    assert p["correction"] == "tendency correction, state units per hour"


def test_dt_needs_a_unit_that_converts(start_server, hourly):
    server = start_server(hourly)
    x = RNG.normal(2.5, 3.6, (2, 36))
    with CorrectionClient(server.url, "l96") as c:
        per_hour = c.infer(x).correction
        with pytest.raises(RequestRejected, match="'dt' has no unit.*per hour"):
            c.infer(x, dt=900)
        with pytest.raises(RequestRejected, match="unknown time unit 'fortnight'"):
            c.infer(x, dt=1, dt_unit="fortnight")
        with pytest.raises(RequestRejected, match="200 times the host step"):
            c.infer(x, dt=50, dt_unit="h")  # 50 h against a 0.25 h training step
        res = c.infer(x, dt=900, dt_unit="s")
        assert res.parameters["time_unit"] == "second"
        np.testing.assert_allclose(res.correction, per_hour / 3600, rtol=1e-6)
        res = c.infer(x, dt=15, dt_unit="min")
        np.testing.assert_allclose(res.correction, per_hour / 60, rtol=1e-6)


def test_model_time_units_refuse_physical_dt(start_server, l96_repository):
    server = start_server()
    x = RNG.normal(2.5, 3.6, (1, 36))
    with CorrectionClient(server.url, "l96") as c:
        base = c.infer(x).correction
        np.testing.assert_allclose(c.infer(x, dt=0.01).correction, base)  # no unit: its own
        np.testing.assert_allclose(c.infer(x, dt=0.01, dt_unit="model time unit").correction, base)
        with pytest.raises(RequestRejected, match="cannot convert between model time units"):
            c.infer(x, dt=60, dt_unit="s")


def test_client_applies_the_step_in_the_callers_unit(start_server, hourly):
    server = start_server(hourly)
    x = RNG.normal(2.5, 3.6, (3, 36))
    with CorrectionClient(server.url, "l96", dt_unit="s") as c:
        per_second = c.correct(x, dt=900)
        stepped = c.apply(x, dt=900)
    np.testing.assert_allclose(stepped, x + 900 * per_second, rtol=1e-12)
    with CorrectionClient(server.url, "l96") as c:
        per_hour = c.infer(x).correction
    # the same physical step either way: 900 s of per-second = 0.25 h of per-hour
    np.testing.assert_allclose(900 * per_second, 0.25 * per_hour, rtol=1e-5)
