"""The quick demo end to end: the README's main command, as CI runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mecs", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the report is {out / 'report.md'}" in proc.stdout
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    f = metrics["forecasts"]
    # the online correction beats no correction, and the report shows metrics.json's figures
    assert f["online"]["valid_time"] > f["none"]["valid_time"] + 0.5
    for label in ("none", "poly3", "offline", "online", "limit"):
        row = re.search(rf"^\| {label} \| ([0-9.]+) \|", report, re.M)
        assert row and float(row.group(1)) == round(f[label]["valid_time"], 2)
    # the gate scored the fine-tuned candidate against the offline production version
    gate = json.loads((out / "promotion.json").read_text())
    assert (gate["candidate"], gate["production"]) == (2, 1)
    book = json.loads((out / "models" / "l96" / "stages.json").read_text())
    assert book["records"][-1]["decision"] == gate["decision"]
    assert "## Promotion gate" in report and f"**{gate['decision']}**" in report
    served = 2 if gate["decision"] == "promoted" else 1
    # live monitoring: every cycle start matched, the served correction removes the share
    # of the increment the validation split predicts, and the monitored period offline
    mon = json.loads((out / "monitoring.json").read_text())
    got = mon["versions"][str(served)]["fields"]["X"]["increment_reduction"]
    want = mon["predicted"]["fields"]["X"]
    assert mon["samples"] - mon["unmatched"] == mon["versions"][str(served)]["scored"] > 100
    assert got > 0.1 and abs(got - want["increment_reduction"]) <= want["spread"], (got, want)
    same = mon["predicted"]["same_period_offline"]["X"]["increment_reduction"]
    assert got == pytest.approx(same, abs=1e-3)  # the served path reproduces offline
    assert "## Live skill monitoring" in report
    # the coupled forecasts went through the HTTP service, answered by production
    service = json.loads((out / "forecasts" / "service.json").read_text())
    assert service["single"]["served_versions"] == [served]
    assert service["infer_requests"] > 0 and service["ensemble"]["members"] == 20
    assert service["single"]["degraded_steps"] == 0
    for png in ("rmse_vs_lead", "hovmoller", "climate_pdf", "training_curves"):
        assert (out / "evaluation" / f"{png}.png").stat().st_size > 5000
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    # a second run reuses every finished stage
    again = subprocess.run(
        [sys.executable, "-m", "mecs", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and again.stdout.count("reusing") == 9


@pytest.mark.slow  # 50 s on 2 cores; test_qg_chain runs the same stages on QG in CI
def test_quick_qg_demo_end_to_end(tmp_path):
    """``mecs demo --preset qg-eddy --quick``: the chain on the 2-D benchmark, with its
    table and plots in the report."""
    out = tmp_path / "qg"
    proc = subprocess.run(
        [sys.executable, "-m", "mecs", "demo", "--preset", "qg-eddy", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["results"]
    for label in ("none", "smagorinsky", "offline", "online"):
        row = re.search(rf"^\| {label} \| ([0-9.e+-]+) \|", report, re.M)
        assert row, label
        assert float(row.group(1)) == float(f"{metrics[label]['rmse_24h'][0]:.3g}")
        assert metrics[label]["free_run"]["status"] in ("stable", "drifted") or metrics[label][
            "free_run"
        ]["status"].startswith("blew up")
    assert metrics["none"]["similarity_to_truth"] == 0.0
    service = json.loads((out / "forecasts" / "service.json").read_text())
    assert service["ensemble"]["members"] == 8 and service["single"]["degraded_steps"] == 0
    for png in ("qg_snapshots", "qg_spectra_pdfs_rmse"):
        assert (out / "evaluation" / f"{png}.png").stat().st_size > 5000
