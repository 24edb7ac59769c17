"""Verification without truth: RMSE, bias and ACC against analyses, by field, level and lead."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from support import make_archive

from correction.evaluation.verification import VerificationError, latitude_of, verify


@pytest.fixture(scope="module")
def archive():
    # the forecasts drift by -0.1 K/h in T and +2 Pa/h in ps (make_archive's model error)
    return make_archive(n_times=40, init_every=2, leads_h=(0, 6, 12), nlat=6, nlon=8)


def _corrected(fc):
    """The same forecasts with the drift removed: what a perfect correction gives."""
    hours = (fc["lead_time"] / np.timedelta64(1, "h")).astype(float)
    out = fc.copy()
    out["T"] = fc["T"] + 0.1 * hours
    out["ps"] = fc["ps"] - 2.0 * hours
    return out


def test_scores_by_field_level_and_lead(archive):
    ana, fc = archive
    # the earlier ones form the climatology
    fc = fc.sel(init_time=fc.init_time >= ana.time.values[10])
    res = verify(fc, ana, reference=None)
    assert res["weighting"] == "cos(latitude)" and res["climatology"]["analyses"] == 10
    t = res["fields"]["T"]
    assert t["levels"] == ["850", "500", "250"] and t["units"] == "K"
    bias = np.array(t["bias"])  # [lead][level]
    np.testing.assert_allclose(bias[:, 0], [0.0, -0.6, -1.2], atol=1e-3)
    np.testing.assert_allclose(np.array(t["rmse"])[2], 1.2, atol=1e-3)  # a pure drift
    assert np.all(np.array(t["acc"]) > 0.99)  # the anomalies are all there
    assert res["fields"]["ps"]["levels"] is None
    np.testing.assert_allclose(res["fields"]["ps"]["bias"], [0.0, 12.0, 24.0], atol=0.05)


def test_a_correction_beats_its_reference_at_every_lead(archive):
    ana, fc = archive
    fc = fc.sel(init_time=fc.init_time >= ana.time.values[10])
    res = verify(_corrected(fc), ana, reference=fc)
    for f in ("T", "ps"):
        ratio = np.array(res["fields"][f]["rmse_vs_reference"])
        assert np.all(ratio[1:] < 0.01), (f, ratio)  # the drift was all the error
    # q had no drift: both are perfect, and the ratio is undefined (null in metrics.json)
    np.testing.assert_allclose(res["fields"]["q"]["rmse"], 0.0, atol=1e-9)
    assert np.isnan(res["fields"]["q"]["rmse_vs_reference"]).all()


def test_cos_latitude_weights_are_applied(archive):
    ana, fc = archive
    fc = fc.sel(init_time=fc.init_time >= ana.time.values[10]).isel(lead_time=[0])
    bumped = fc.copy()
    err = xr.zeros_like(fc["ps"]) + 10.0 * (fc["lat"] == fc["lat"].max())  # error at one row
    bumped["ps"] = fc["ps"] + err
    res = verify(bumped, ana, fields=["ps"])
    w = np.cos(np.deg2rad(ana["lat"].values))
    want = 10.0 * w[-1] / w.sum()  # the bias is the weighted share of the bumped row
    np.testing.assert_allclose(res["fields"]["ps"]["bias"][0], want, rtol=1e-6)
    assert latitude_of(ana.drop_vars("lat")) is None


def test_bad_inputs_are_named(archive):
    ana, fc = archive
    with pytest.raises(VerificationError, match="no analyses before the first initial time"):
        verify(fc, ana)
    with pytest.raises(VerificationError, match="have no 'init_time'"):
        verify(fc.rename(init_time="time0"), ana)
    with pytest.raises(VerificationError, match="share no field"):
        verify(fc[["T"]].rename(T="X"), ana)


def test_mecs_verify_on_monthly_files(archive, tmp_path, capsys):
    import json

    from mecs.cli import main

    ana, fc = archive
    ana = ana.assign_coords(time=ana.time + np.timedelta64(26, "D"))  # across a month end
    fc = fc.assign_coords(init_time=fc.init_time + np.timedelta64(26, "D"))
    for month, part in ana.groupby("time.month"):
        part.to_netcdf(tmp_path / f"an_2021{month:02d}.nc")
    late = fc.sel(init_time=fc.init_time >= ana.time.values[10])
    late.rename(init_time="time", lead_time="step").to_netcdf(tmp_path / "fc.nc")
    _corrected(late).rename(init_time="time", lead_time="step").to_netcdf(tmp_path / "corr.nc")
    code = main(
        [
            "verify",
            "--analyses",
            str(tmp_path / "an_*.nc"),
            "--forecasts",
            str(tmp_path / "corr.nc"),
            "--reference",
            str(tmp_path / "fc.nc"),
            "--dims",
            "time=init_time,step=lead_time",
            "--reference-dims",
            "time=init_time,step=lead_time",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "of the reference" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # the schema mecs evaluate writes, kind "analyses"
    assert metrics["schema"] == "mecs-evaluation/1" and metrics["kind"] == "analyses"
    assert metrics["lead_times"] == ["0h", "6h", "12h"]
    assert set(metrics["forecasts"]) == {"forecast", "reference"}
    assert metrics["rmse_vs_reference"]["T"][-1][0] < 0.01
    assert metrics["rmse_vs_reference"]["q"][-1][0] is None  # 0 / 0, strict JSON
    assert (tmp_path / "out" / "rmse_T.png").stat().st_size > 1000
    code = main(
        [
            "verify",
            "--analyses",
            str(tmp_path / "an_*.nc"),
            "--forecasts",
            str(tmp_path / "fc.nc"),
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no 'init_time'" in err and "\n" not in err, err
