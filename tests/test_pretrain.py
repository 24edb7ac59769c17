"""Offline pretraining: streaming, determinism, resume after a kill, publishing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from correction import artifacts
from correction.inference import Corrector
from correction.training.data import BatchStream, IncrementSource
from correction.training.pretrain import PretrainConfig, pretrain
from mecs.cli import main

FAST = {
    "params": {"hidden": 16, "depth": 2},
    "max_epochs": 4,
    "batch_size": 64,
    "early_stopping": 10,
}


def _weights(path):
    model, _ = artifacts.load(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stream_visits_each_training_sample_once(tiny_increments):
    source = IncrementSource.open(tiny_increments)
    assert source.chunk == 37 and source.layout.state_shape == (36,)
    stream = BatchStream(source, "train", 50, seed=1, buffer_chunks=2)
    seen = [x for x, _ in stream.epoch(0)]
    allx = torch.cat(seen)
    ref, _ = source.read_indices(source.indices("train"))
    assert allx.shape[0] == len(ref) == stream.n_samples
    # same multiset of samples, in a shuffled order that depends on the epoch only
    key = lambda a: np.sort(np.asarray(a)[:, 0, 0])  # noqa: E731
    np.testing.assert_array_equal(key(allx), key(ref))
    again = torch.cat([x for x, _ in stream.epoch(0)])
    other = torch.cat([x for x, _ in stream.epoch(1)])
    assert torch.equal(allx, again) and not torch.equal(allx, other)


def test_pretrain_publishes_and_learns(tiny_increments, tmp_path):
    cfg = PretrainConfig.from_dict(FAST)
    result = pretrain(tiny_increments, tmp_path / "models", "l96", cfg, progress=False)
    assert result.version.version == 1
    config = artifacts.read_config(result.version.path)
    store_hash = json.loads((tiny_increments / "zarr.json").read_text())
    assert config["training"]["data_hash"]
    assert config["training"]["data_hash"] in json.dumps(store_hash)
    assert config["training"]["mode"] == "one-step" and config["parent"] is None
    assert config["network"]["name"] == "column-mlp"
    history = config["training"]["history"]
    assert history[0]["epoch"] == 0 and history[-1]["train_loss"] < history[1]["train_loss"]
    assert result.best_val_loss < history[0]["val_loss"]  # better than untrained
    corr = Corrector.load(tmp_path / "models", "l96")
    assert corr(np.full((2, 36), 3.0)).shape == (2, 36)
    # no checkpoint directory is left behind
    assert sorted(p.name for p in (tmp_path / "models" / "l96").iterdir()) == ["1"]


def test_pretrain_is_deterministic(tiny_increments, tmp_path):
    cfg = PretrainConfig.from_dict({**FAST, "max_epochs": 2})
    a = pretrain(tiny_increments, tmp_path / "a", "m", cfg, progress=False)
    b = pretrain(tiny_increments, tmp_path / "b", "m", cfg, progress=False)
    wa, wb = _weights(a.version.path), _weights(b.version.path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_interruption_equals_uninterrupted(tiny_increments, tmp_path):
    cfg = PretrainConfig.from_dict(FAST)
    full = pretrain(tiny_increments, tmp_path / "full", "m", cfg, progress=False)
    stopped = pretrain(
        tiny_increments, tmp_path / "res", "m", cfg, progress=False, stop_after_epochs=2
    )
    assert stopped is None and not (tmp_path / "res" / "m" / "1").exists()
    resumed = pretrain(tiny_increments, tmp_path / "res", "m", cfg, progress=False)
    assert resumed.resumed_from == 2
    wa, wb = _weights(full.version.path), _weights(resumed.version.path)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_killed_process_resumes(tiny_increments, tmp_path):
    """SIGKILL a real `mecs pretrain` after its first checkpoint, rerun, compare."""
    settings = tmp_path / "pre.json"
    settings.write_text(json.dumps({**FAST, "max_epochs": 8}))
    cmd = [
        sys.executable,
        "-m",
        "mecs",
        "pretrain",
        "--data",
        str(tiny_increments),
        "--repository",
        str(tmp_path / "models"),
        "--name",
        "m",
        "--config",
        str(settings),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        found = list((tmp_path / "models" / "m").glob(".train-*/checkpoint/progress.json"))
        if found or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert found, proc.communicate()[1].decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "models" / "m" / "1").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from the checkpoint" in done.stdout
    ref = pretrain(
        tiny_increments,
        tmp_path / "ref",
        "m",
        PretrainConfig.from_dict({**FAST, "max_epochs": 8}),
        progress=False,
    )
    wa, wb = _weights(ref.version.path), _weights(tmp_path / "models" / "m" / "1")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "../x"], "invalid model name"),
        (["--name", "ok", "--config", "nope.json"], "cannot read config file"),
    ],
)
def test_pretrain_cli_errors(tiny_increments, tmp_path, capsys, args, message):
    code = main(
        [
            "pretrain",
            "--data",
            str(tiny_increments),
            "--repository",
            str(tmp_path / "models"),
            *args,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "models").exists()
