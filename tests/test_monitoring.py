"""Shadow mode and live skill monitoring: the service records what it served, mecs monitor
scores it against the analyses, and a candidate is run beside production, never answered."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from support import make_l96_model

from correction import artifacts
from correction.evaluation.monitoring import predicted_reduction
from correction.inference import Corrector
from correction.storage import open_zarr
from correction.training.pretrain import PretrainConfig, pretrain
from mecs.cli import main
from service.client import CorrectionClient, ServiceError

TRAIN = {"network": "column-mlp", "params": {"hidden": 32, "depth": 2}, "max_epochs": 12}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_increments):
    repo = tmp_path_factory.mktemp("monitor") / "models"
    pretrain(tiny_increments, repo, "l96", PretrainConfig.from_dict(TRAIN), progress=False)
    return repo


def _metrics(server) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def test_recorded_answers_are_scored_against_later_analyses(
    trained, tiny_synth, tiny_increments, start_server, tmp_path, capsys
):
    records = tmp_path / "records"
    server = start_server(
        repository=trained, record_dir=str(records), record_fraction=1.0, record_file_samples=16
    )
    ana = open_zarr(tiny_synth / "analyses.zarr")
    times, states = ana["time"].values, ana["X"].values.astype(np.float64)
    first = int(
        np.searchsorted(times, json.loads((tiny_synth / "config.json").read_text())["test_start"])
    )
    sent = range(first, len(times) - 1)
    with CorrectionClient(server.url, "l96") as c:
        for i in sent:
            c.infer(states[i][None], valid_time=float(times[i]))
        c.infer(states[first][None])  # no valid_time: recorded, never matched
        with pytest.raises(ServiceError, match="valid_time"):
            c.infer(states[first][None], valid_time="x" * 80)
    assert "mecs_recorded_samples_total" in _metrics(server)
    server.stop()  # flushes the last partial file
    files = sorted((records / "l96").glob("v1-*.nc"))
    assert len(files) == -(-(len(sent) + 1) // 16)

    out, prom = tmp_path / "monitor.json", tmp_path / "monitor.prom"
    args = ["monitor", "--records", str(records), "--name", "l96", "--analyses", str(tiny_synth)]
    args += ["--host", "l96", "--out", str(out), "--textfile", str(prom)]
    assert main(args) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["samples"] == len(sent) + 1 and doc["unmatched"] == 1
    got = doc["versions"]["1"]["fields"]["X"]
    assert doc["versions"]["1"]["scored"] == len(sent)

    # the same figure recomputed here: host over one window, the model in process
    from correction.hosts import make_host

    host = make_host("l96", F=json.loads((tiny_synth / "config.json").read_text())["config"]["F"])
    corr = Corrector.load(trained, "l96")
    idx = np.array(list(sent))
    x = states[idx]
    import torch

    f = torch.from_numpy(x)
    for _ in range(round(0.05 / host.dt)):
        f = host.step(f)
    e_u = states[idx + 1] - f.numpy()
    e_c = e_u - 0.05 * corr(x)
    want = 1 - np.sqrt(np.mean(e_c**2)) / np.sqrt(np.mean(e_u**2))
    assert got["increment_reduction"] == pytest.approx(want, abs=2e-4)
    # and what the increment store's test split predicts for this version
    pred = predicted_reduction(corr, tiny_increments, "test")["X"]
    assert abs(got["increment_reduction"] - pred["increment_reduction"]) <= 3 * pred["spread"]
    text = prom.read_text()
    assert (
        'mecs_monitor_increment_reduction{field="X",model="l96",stage="production",version="1"}'
        in text
    )
    assert 'mecs_monitor_skill_alert{field="X",model="l96",version="1"} 0.0' in text

    # a threshold above the skill flags the field and exits 4, for a cron job to alert on
    assert main([*args, "--threshold", "0.99"]) == 4
    assert "BELOW THRESHOLD" in capsys.readouterr().out
    assert (
        main(
            [
                "monitor",
                "--records",
                str(tmp_path / "none"),
                "--name",
                "l96",
                "--analyses",
                str(tiny_synth),
                "--host",
                "l96",
            ]
        )
        == 2
    )


def test_record_files_rotate(trained, start_server, tmp_path):
    records = tmp_path / "records"
    server = start_server(
        repository=trained,
        record_dir=str(records),
        record_fraction=0.5,
        record_file_samples=4,
        record_max_files=3,
    )
    x = np.random.default_rng(0).normal(2.5, 3.6, (2, 36))
    with CorrectionClient(server.url, "l96") as c:
        for _ in range(40):  # 20 recorded requests, 40 samples, 10 files written
            c.infer(x)
    server.stop()
    assert len(list((records / "l96").glob("*.nc"))) == 3
    assert not list((records / "l96").glob(".*partial*"))


def test_shadow_runs_the_candidate_and_never_answers_with_it(start_server, tmp_path):
    repo = tmp_path / "gated"
    for seed in (0, 11):
        model, config = make_l96_model(seed=seed)
        artifacts.publish(repo, "l96", model, config, stage="candidate")
    server = start_server(repository=repo, shadow=True, poll_interval_s=0.05)
    x = np.random.default_rng(1).normal(2.5, 3.6, (3, 36))
    with CorrectionClient(server.url, "l96") as c:
        answers = [c.infer(x) for _ in range(30)]
    assert {(a.model_version, a.parameters["model_stage"]) for a in answers} == {(1, "production")}
    v1, v2 = Corrector.load(repo, "l96", 1), Corrector.load(repo, "l96", 2)
    np.testing.assert_allclose(answers[-1].correction, v1(x), rtol=1e-4, atol=1e-5)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = _metrics(server)
        if 'mecs_shadow_requests_total{model="l96",outcome="ok"} 30.0' in text:
            break
        time.sleep(0.05)
    assert 'mecs_shadow_requests_total{model="l96",outcome="ok"} 30.0' in text
    count = 'mecs_shadow_difference_count{candidate="2",field="X",model="l96"} 30.0'
    assert count in text
    # the exported distance is the candidate's from production, in target stds
    want = np.sqrt(np.mean(((v2(x) - v1(x)) / v1.out_std) ** 2))
    total = float(
        next(
            line.rsplit(" ", 1)[1]
            for line in text.splitlines()
            if line.startswith('mecs_shadow_difference_sum{candidate="2"')
        )
    )
    assert total / 30 == pytest.approx(want, rel=1e-3)
