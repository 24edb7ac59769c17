"""Model artifacts and the Corrector: round trips, corruption, shapes, composition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from support import make_l96_model

from correction.artifacts import ArtifactError, list_versions, load, publish, resolve
from correction.hosts import BlackBoxHost, Lorenz96
from correction.inference import Corrector


def test_round_trip_gives_identical_outputs(tmp_path):
    model, config = make_l96_model(seed=3)
    mv = publish(tmp_path, "l96", model, config)
    assert (mv.version, list_versions(tmp_path, "l96")) == (1, [1])
    loaded, cfg = load(mv.path)
    x = 8 + 3 * torch.randn(5, 1, 36)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert cfg["layout"]["state_shape"] == [36] and cfg["package_version"]
    assert sorted(p.name for p in mv.path.iterdir()) == ["config.json", "weights.safetensors"]


def test_versions_increase_and_resolve_newest(tmp_path):
    for seed in range(3):
        publish(tmp_path, "m", *make_l96_model(seed))
    assert list_versions(tmp_path, "m") == [1, 2, 3]
    assert resolve(tmp_path, "m").version == 3
    assert resolve(tmp_path, "m", 2).version == 2
    with pytest.raises(ArtifactError, match="no version 7"):
        resolve(tmp_path, "m", 7)
    with pytest.raises(ArtifactError, match="already exists"):
        publish(tmp_path, "m", *make_l96_model(), version=2)
    # no temporary directories are left behind
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "3"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_weights_give_clear_error(tmp_path, damage):
    mv = publish(tmp_path, "m", *make_l96_model())
    weights = mv.path / "weights.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        weights.unlink()
    with pytest.raises(ArtifactError, match="corrupted or truncated|missing"):
        load(mv.path)


def test_bad_config_and_names(tmp_path):
    mv = publish(tmp_path, "m", *make_l96_model())
    (mv.path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(mv.path)
    with pytest.raises(ArtifactError, match="invalid model name"):
        publish(tmp_path, "../evil", *make_l96_model())


def test_normalisation_round_trip(tmp_path):
    """Inputs are normalised and outputs de-normalised by the saved statistics."""
    model, config = make_l96_model()
    x = 2.5 + 3.6 * torch.randn(4, 1, 36)
    z = model.normalise_input(x)
    torch.testing.assert_close(z * 3.6 + 2.5, x)
    corr = Corrector(*load(publish(tmp_path, "m", model, config).path))
    y_norm = model.forward_normalised(x).detach()
    np.testing.assert_allclose(
        corr(x[:, 0].numpy()), (y_norm * 1.8 - 0.4)[:, 0].numpy(), rtol=1e-5, atol=1e-5
    )
    assert json.loads((corr_path := tmp_path / "m" / "1" / "config.json").read_text())[
        "normalisation"
    ]["out_std"] == [pytest.approx(1.8)]
    assert corr_path.exists()


def test_corrector_accepts_numpy_torch_xarray(l96_repository):
    corr = Corrector.load(l96_repository, "l96")
    assert (corr.name, corr.version, corr.state_shape) == ("l96", 1, (36,))
    x = np.random.default_rng(0).normal(2.5, 3.6, (3, 36))
    out_np = corr(x)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (3, 36) and out_np.dtype == x.dtype
    out_t = corr(torch.from_numpy(x).float())
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(corr(x[0]), out_np[0], rtol=1e-6)
    ds = xr.Dataset({"X": (("member", "k"), x)}, coords={"k": np.arange(1, 37)})
    out_ds = corr(ds)
    assert out_ds["X"].dims == ("member", "k") and out_ds.attrs["model_version"] == 1
    np.testing.assert_allclose(out_ds["X"].values, out_np, rtol=1e-6)
    assert "per unit time" in out_ds["X"].attrs["units"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((3, 35)), r"expected \[batch, 36\]"),
        (np.zeros((3, 2, 36)), r"expected \[batch, 36\]"),
        (np.zeros((3, 36), dtype=np.int64), "floating point"),
    ],
)
def test_corrector_rejects_wrong_shapes(l96_repository, bad, message):
    corr = Corrector.load(l96_repository, "l96")
    with pytest.raises((ValueError, TypeError), match=message):
        corr(bad)


def test_corrector_rejects_wrong_dataset(l96_repository):
    corr = Corrector.load(l96_repository, "l96")
    with pytest.raises(ValueError, match="no variable 'X'"):
        corr(xr.Dataset({"T": (("m", "k"), np.zeros((2, 36)))}))
    with pytest.raises(ValueError, match="dim 'k' has size 30"):
        corr(xr.Dataset({"X": (("m", "k"), np.zeros((2, 30)))}))


def test_corrected_host_adds_dt_times_correction(l96_repository):
    corr = Corrector.load(l96_repository, "l96")
    host = Lorenz96()
    x = 10 + torch.randn(4, 36, dtype=torch.float64)
    stepped = corr.compose(host).step(x)
    torch.testing.assert_close(stepped, host.step(x) + host.dt * corr(x))
    # works the same with the host hidden behind the black-box interface
    black = corr.compose(BlackBoxHost.wrap(host)).step(x.numpy())
    np.testing.assert_allclose(black, stepped.numpy(), rtol=1e-12)
