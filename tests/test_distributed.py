"""Training under torchrun: 2 processes with gloo on CPU against 1 process.

Each test launches the real command line (``python -m torch.distributed.run
--standalone --nproc-per-node 2 -m mecs ...``), as compose's training roles do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from correction import artifacts
from correction.training.data import BatchStream, IncrementSource
from correction.training.pretrain import PretrainConfig, pretrain

FAST = {"params": {"hidden": 16, "depth": 2}, "batch_size": 64, "early_stopping": 10}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "mecs",
        *args,
    ]


def run(cmd: list[str], timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def _weights(path) -> dict[str, torch.Tensor]:
    model, _ = artifacts.load(path)
    return model.state_dict()


def test_ranks_stream_disjoint_shards_with_equal_steps(tiny_increments):
    source = IncrementSource.open(tiny_increments)
    one = BatchStream(source, "train", 64, seed=3, buffer_chunks=2)
    shards = [
        BatchStream(source, "train", 64, 3, True, 2, rank=r, world=2, equal_steps=True)
        for r in range(2)
    ]
    assert [s.local_batch() for s in shards] == [32, 32]
    batches = [[x for x, _ in s.epoch(1)] for s in shards]
    assert len(batches[0]) == len(batches[1]) == shards[0].steps(1)
    seen = [torch.cat(b)[:, 0, 0].numpy() for b in batches]
    # the two ranks read different samples, and together nearly the whole split
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    total = sum(len(s) for s in seen)
    assert one.n_samples - 2 * 64 <= total <= one.n_samples
    # an odd global batch: the shares still add up to it
    odd = [BatchStream(source, "train", 65, 3, rank=r, world=2) for r in range(2)]
    assert sum(s.local_batch() for s in odd) == 65
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        BatchStream(source, "train", 3, 3, rank=0, world=4)
    # more ranks than chunks: each takes its share of every global batch
    many = [
        BatchStream(source, "train", 64, 3, True, 2, rank=r, world=64, equal_steps=True)
        for r in (0, 63)
    ]
    assert not many[0].by_chunks
    first, last = ([x for x, _ in m.epoch(0)] for m in many)
    assert len(first) == len(last) == many[0].steps(0) == one.n_samples // 64
    whole = torch.cat([x for x, _ in one.epoch(0)])
    np.testing.assert_array_equal(first[0].numpy(), whole[0:64:64].numpy())


def test_two_process_pretraining_matches_one_and_publishes_once(tiny_increments, tmp_path):
    settings = tmp_path / "pre.json"
    settings.write_text(json.dumps({**FAST, "max_epochs": 6}))
    args = ["pretrain", "--data", str(tiny_increments), "--name", "m", "--config", str(settings)]
    out = run(torchrun(2, *args, "--repository", str(tmp_path / "two"), "--no-progress"))
    assert out.count("pretrain: published") == 1  # rank 0 reports, rank 1 is quiet
    assert artifacts.list_versions(tmp_path / "two", "m") == [1]
    cfg = PretrainConfig.from_dict({**FAST, "max_epochs": 6})
    one = pretrain(tiny_increments, tmp_path / "one", "m", cfg, progress=False)
    two = artifacts.read_config(tmp_path / "two" / "m" / "1")
    assert two["training"]["world_size"] == 2
    assert two["metrics"]["val_loss"] == pytest.approx(one.best_val_loss, rel=0.05)
    # the same global batch: both processes together saw what one process sees
    seen = two["training"]["history"][1]["samples"]
    assert one.history[1]["samples"] - 2 * 64 <= seen <= one.history[1]["samples"]
    # no checkpoint is left behind
    assert sorted(p.name for p in (tmp_path / "two" / "m").iterdir()) == ["1"]


def test_a_killed_two_process_job_resumes_in_one_process(tiny_increments, tmp_path):
    settings = tmp_path / "pre.json"
    settings.write_text(json.dumps({**FAST, "max_epochs": 12}))
    repo = tmp_path / "models"
    args = ["pretrain", "--data", str(tiny_increments), "--repository", str(repo), "--name", "m"]
    args += ["--config", str(settings), "--no-progress"]
    proc = subprocess.Popen(
        torchrun(2, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline = time.time() + 180
    found: list = []
    while time.time() < deadline and not found and proc.poll() is None:
        found = list((repo / "m").glob(".train-*/checkpoint/progress.json"))
        time.sleep(0.05)
    assert found, proc.communicate()[1].decode()[-3000:]
    # the launcher and both ranks (torchrun starts its workers in sessions of their own)
    for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=0.1)
    epoch = json.loads(found[0].read_text())["epoch"]
    assert epoch < 12 and not (repo / "m" / "1").exists()
    out = run([sys.executable, "-m", "mecs", *args])
    assert "resumed from the checkpoint" in out, out
    config = artifacts.read_config(repo / "m" / "1")
    assert config["training"]["epochs_run"] == 12 and config["training"]["world_size"] == 1
    history = config["training"]["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


@pytest.fixture(scope="module")
def parent(tiny_increments, tmp_path_factory):
    """A pretrained l96 model (version 1) to fine-tune from."""
    repo = tmp_path_factory.mktemp("ft") / "models"
    cfg = PretrainConfig.from_dict({**FAST, "max_epochs": 2})
    pretrain(tiny_increments, repo, "m", cfg, progress=False)
    return repo


@pytest.mark.parametrize(
    "mode", ["unrolled", pytest.param("differentiable", marks=pytest.mark.slow)]
)
def test_two_process_finetuning_gives_the_one_process_weights(parent, tiny_synth, mode):
    """Each rank unrolls its share of the same windows: the same step as one process."""
    args = ["finetune", "--mode", mode, "--host", "torch:l96", "--data", str(tiny_synth)]
    args += ["--repository", str(parent), "--name", "m", "--from", "1", "--iterations", "12"]
    # 7 windows: shares of 4 and 3, which only per-window weighting makes one step
    args += ["--unroll", "3", "--batch-size", "7", "--no-progress"]
    out = run(torchrun(2, *args))
    assert out.count("finetune: published") == 1
    run([sys.executable, "-m", "mecs", *args])
    v_two, v_one = artifacts.list_versions(parent, "m")[-2:]
    c_two = artifacts.read_config(parent / "m" / str(v_two))
    c_one = artifacts.read_config(parent / "m" / str(v_one))
    assert c_two["training"]["world_size"] == 2 and c_one["training"]["world_size"] == 1
    w2, w1 = _weights(parent / "m" / str(v_two)), _weights(parent / "m" / str(v_one))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert c_two["metrics"]["val_loss_a_posteriori"] == pytest.approx(
        c_one["metrics"]["val_loss_a_posteriori"], rel=1e-5
    )


def test_two_process_emulator_pools_its_states(tiny_synth, tmp_path):
    settings = tmp_path / "emu.json"
    settings.write_text(
        json.dumps(
            {
                "network": "bilinear-cnn",
                "params": {"hidden": 8, "kernel": 5},
                "n_states": 600,
                "epochs": 3,
                "rollout_steps": 3,
            }
        )
    )
    out = run(
        torchrun(
            2,
            "emulator",
            "--host",
            "torch:l96",
            "--data",
            str(tiny_synth),
            "--out",
            str(tmp_path / "emu"),
            "--config",
            str(settings),
            "--no-progress",
        )
    )
    assert out.count("emulator: wrote") == 1
    config = artifacts.read_config(tmp_path / "emu")
    assert config["training"]["world_size"] == 2
    assert 0.8 * 600 <= config["training"]["n_states"] <= 600  # both ranks' shares
    assert np.isfinite(config["metrics"]["one_step_rmse"])
    assert config["metrics"]["one_step_rmse"] < config["metrics"]["host_one_step_change_rms"]


def test_two_nodes_meet_at_a_rendezvous_endpoint(tiny_increments, tmp_path):
    """Multi-node as compose's roles run it: two launchers (one per "node"), c10d."""
    from support.balancer import free_port

    settings = tmp_path / "pre.json"
    settings.write_text(json.dumps({**FAST, "max_epochs": 2}))
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2"]
    launcher += ["--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    launcher += ["--rdzv-id=mecs-test", "-m", "mecs", "pretrain", "--data", str(tiny_increments)]
    launcher += ["--repository", str(tmp_path / "models"), "--name", "m"]
    launcher += ["--config", str(settings), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert sum(o[0].count("pretrain: published") for o in outs) == 1
    config = artifacts.read_config(tmp_path / "models" / "m" / "1")
    assert config["training"]["world_size"] == 2
    assert artifacts.list_versions(tmp_path / "models", "m") == [1]


def test_two_process_sift_pretraining_matches_one_and_publishes_once(tiny_increments, tmp_path):
    """SIFT under torchrun: the early-exit head is averaged over the ranks like the
    network, the run publishes once and lands where one process lands."""
    sift = {**FAST, "max_epochs": 6, "sampling": "sift", "sift_pool": 2}
    settings = tmp_path / "sift.json"
    settings.write_text(json.dumps(sift))
    args = ["pretrain", "--data", str(tiny_increments), "--name", "m", "--config", str(settings)]
    out = run(torchrun(2, *args, "--repository", str(tmp_path / "two"), "--no-progress"))
    assert out.count("pretrain: published") == 1
    two = artifacts.read_config(tmp_path / "two" / "m" / "1")
    assert two["training"]["world_size"] == 2
    assert two["training"]["settings"]["sampling"] == "sift"
    one = pretrain(
        tiny_increments, tmp_path / "one", "m", PretrainConfig.from_dict(sift), progress=False
    )
    assert two["metrics"]["val_loss"] == pytest.approx(one.best_val_loss, rel=0.05)
    assert sorted(p.name for p in (tmp_path / "two" / "m").iterdir()) == ["1"]
