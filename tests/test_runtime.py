"""Inference runtimes: same answers as eager torch, and a safe fall-back order."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support import make_l96_model

from correction import runtime as rt
from correction.networks import CorrectionModel

RNG = np.random.default_rng(3)


def _states(n: int, dtype=np.float32) -> np.ndarray:
    return RNG.normal(2.5, 3.6, (n, 1, 36)).astype(dtype)


@pytest.mark.parametrize("network", ["stencil-cnn", "column-mlp"])
@pytest.mark.parametrize("name", rt.RUNTIMES)
def test_each_runtime_matches_eager_at_any_batch_size(network, name):
    model, _ = make_l96_model(network=network)
    runtime = rt.build_runtime(model, (1, 36), name)
    assert runtime.name == name
    for n in (1, 3, 64):  # the export fixes no batch size
        x = _states(n)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = runtime(x)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_forcings_are_a_second_input():
    torch.manual_seed(0)
    model = CorrectionModel("column-mlp", {"hidden": 16, "depth": 2}, 1, 1, 1, n_forcings=2)
    runtime = rt.build_runtime(model.eval(), (1, 36), "onnxruntime")
    assert runtime.name == "onnxruntime"
    x, f = _states(4), RNG.normal(size=(4, 2)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(f)).numpy()
    np.testing.assert_allclose(runtime(x, f), want, rtol=1e-5, atol=1e-6)


def test_a_runtime_that_disagrees_is_dropped_for_the_next(monkeypatch, caplog):
    """A wrong fast answer never reaches a caller: the next runtime serves instead."""
    model, _ = make_l96_model()
    original = rt.OnnxRuntime.__call__

    def off_by_a_little(self, x, f=None):
        return original(self, x, f) + 1e-3

    monkeypatch.setattr(rt.OnnxRuntime, "__call__", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger="mecs.runtime"):
        runtime = rt.build_runtime(model, (1, 36), "onnxruntime", label="model 'l96' v1")
    assert runtime.name == "torchscript"
    assert "model 'l96' v1: runtime onnxruntime not used (RuntimeCheckError" in caplog.text

    def broken(*args, **kwargs):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(rt, "OnnxRuntime", broken)
    monkeypatch.setattr(rt, "TorchScriptRuntime", broken)
    assert rt.build_runtime(model, (1, 36)).name == "eager"


def test_unknown_runtime_is_refused():
    model, _ = make_l96_model()
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        rt.build_runtime(model, (1, 36), "tensorrt")


def test_the_check_sees_small_physical_values(monkeypatch):
    """Tendencies of 1e-6 units: an all-zero answer must not pass as 'close'."""
    model, _ = make_l96_model()
    model.set_normalisation([2.5], [3.6], [0.0], [2e-6])
    monkeypatch.setattr(rt.OnnxRuntime, "__call__", lambda self, x, f=None: np.zeros_like(x))
    assert rt.build_runtime(model, (1, 36), "onnxruntime").name == "torchscript"


def test_concurrent_builds_all_get_the_fast_runtime():
    """Versions load in worker threads; the exporter's global state must not be shared."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    models = [make_l96_model(seed=i)[0] for i in range(4)]
    filters = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda m: rt.build_runtime(m, (1, 36)).name, models))
    assert names == ["onnxruntime"] * 4
    assert warnings.filters == filters  # no filter left behind by a build


def test_guarded_run_into_a_buffer_equals_the_plain_call_and_reports_finiteness():
    """``GuardedCorrector.run(out=)`` fills the caller's buffer (the service's shared-memory
    path) with exactly the plain call's answer; the cap's min/max pass reports whether
    every value is finite, so a NaN is still caught."""
    from correction.artifacts import publish
    from correction.guardrails import GuardedCorrector
    from correction.inference import Corrector

    with tempfile.TemporaryDirectory() as tmp:
        publish(Path(tmp), "l96", *make_l96_model())
        corr = Corrector.load(Path(tmp), "l96")
    x = np.random.default_rng(1).normal(2.5, 3.6, (7, 36)).astype(np.float32)
    for cap in (10.0, 0.05, None):
        g = GuardedCorrector(corr, cap, 6.0)
        plain, ood, capped = g(x)
        buf = np.full_like(x, np.nan)
        res = g.run(x, out=buf, state_bounds=(float(x.min()), float(x.max())))
        assert res.into and res.correction is buf
        np.testing.assert_array_equal(buf, plain)
        np.testing.assert_array_equal(res.capped, capped)
        assert res.finite is (None if cap is None else True)
        assert (capped.sum() > 0) == (cap == 0.05)
    # a NaN in the network's output: not reported finite, so the service checks it
    g = GuardedCorrector(corr, 10.0, 6.0)
    g.runtime = lambda packed, f=None: np.full(packed.shape, np.nan, np.float32)
    assert g.run(x).finite is False
