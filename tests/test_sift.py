"""Loss-prioritised sampling (SIFT) in pretraining: selection, floor, resume, artifact."""

from __future__ import annotations

import pytest
import torch

from correction import artifacts
from correction.networks import CorrectionModel
from correction.training.pretrain import PretrainConfig, pretrain
from correction.training.sampling import EarlyExitHead, select

SIFT = {
    "params": {"hidden": 16, "depth": 3},
    "max_epochs": 3,
    "batch_size": 32,
    "early_stopping": 10,
    "sampling": "sift",
    "sift_pool": 3,
    "sift_floor": 0.25,
}


def test_selection_takes_the_highest_scores_beyond_the_floor():
    scores = torch.rand(400, generator=torch.Generator().manual_seed(3))
    picked = select(scores, 64, 0.0, torch.Generator().manual_seed(0))
    assert len(picked) == len(set(picked.tolist())) == 64
    assert set(picked.tolist()) == set(torch.topk(scores, 64).indices.tolist())
    # with a floor: 16 uniform draws, then the 48 highest scores of the rest
    picked = select(scores, 64, 0.25, torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 64
    floor, greedy = picked[:16], picked[16:]
    rest = torch.ones(400, dtype=torch.bool)
    rest[floor] = False
    threshold = scores[greedy].min()
    assert bool((scores[rest & ~torch.isin(torch.arange(400), greedy)] <= threshold).all())


def test_the_uniform_floor_is_respected():
    # scores that a greedy pick would never touch below index 300: the floor still does
    scores = torch.cat([torch.zeros(300), torch.ones(100)])
    low = []
    for seed in range(20):
        picked = select(scores, 40, 0.25, torch.Generator().manual_seed(seed))
        floor = picked[:10]
        assert len(floor) == 10  # ceil(0.25 * 40)
        low.append(int((picked < 300).sum()))
        assert int((picked >= 300).sum()) >= 30  # the greedy part: all high scores
    # the floor is drawn uniformly from the pool: about 3/4 of it lands below 300
    assert 5 <= sum(low) / len(low) <= 9
    assert len(select(scores, 40, 1.0, torch.Generator().manual_seed(0))) == 40
    # a floor of zero is pure greedy; any positive floor takes at least one sample
    assert int((select(scores, 40, 0.0, torch.Generator()) < 300).sum()) == 0
    assert len(select(scores, 8, 0.01, torch.Generator().manual_seed(1))) == 8


@pytest.mark.parametrize("network", ["column-mlp", "stencil-cnn"])
def test_early_exit_head_scores_each_sample(network):
    model = CorrectionModel(network, {"hidden": 8, "depth": 3}, 1, 1, 1)
    head = EarlyExitHead(model.core)
    x = torch.randn(5, 1, 36)
    h = head.features(model.normalise_input(x))
    loss = head.per_sample_loss(h, torch.zeros(5, 1, 36))
    assert loss.shape == (5,) and not h.requires_grad
    # the head is not part of the model: no shared parameters, none in its state
    assert not set(map(id, head.parameters())) & set(map(id, model.parameters()))
    assert all(k.startswith("head.") for k in head.state_dict())


def test_sift_refuses_a_network_it_cannot_split():
    model = CorrectionModel("bilinear-cnn", {"hidden": 4}, 1, 1, 1)
    with pytest.raises(ValueError, match="sift needs a network"):
        EarlyExitHead(model.core)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"sampling": "greedy"}, "sampling must be"),
        ({"sift_pool": 0}, "sift_pool"),
        ({"sift_floor": 1.5}, "sift_floor"),
    ],
)
def test_bad_sift_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig.from_dict(bad)


def test_sift_run_records_its_choice_and_steps(tiny_increments, tmp_path):
    cfg = PretrainConfig.from_dict(SIFT)
    uni = pretrain(
        tiny_increments,
        tmp_path / "u",
        "m",
        PretrainConfig.from_dict({**SIFT, "sampling": "uniform"}),
        progress=False,
    )
    res = pretrain(tiny_increments, tmp_path / "s", "m", cfg, progress=False)
    settings = artifacts.read_config(res.version.path)["training"]["settings"]
    assert settings["sampling"] == "sift" and settings["sift_pool"] == 3
    # a SIFT epoch backpropagates on one batch per pool of three
    u_steps = uni.history[1]["steps"]
    s_steps = res.history[1]["steps"]
    assert s_steps == -(-u_steps // 3)
    assert res.best_val_loss < res.history[0]["val_loss"]  # it learns


def test_sift_resume_after_a_kill_equals_an_uninterrupted_run(tiny_increments, tmp_path):
    cfg = PretrainConfig.from_dict(SIFT)
    full = pretrain(tiny_increments, tmp_path / "full", "m", cfg, progress=False)
    work = tmp_path / "work"
    assert (
        pretrain(tiny_increments, tmp_path / "cut", "m", cfg, work, False, stop_after_epochs=2)
        is None
    )
    resumed = pretrain(tiny_increments, tmp_path / "cut", "m", cfg, work, progress=False)
    assert resumed.resumed_from == 2
    a, _ = artifacts.load(full.version.path)
    b, _ = artifacts.load(resumed.version.path)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    assert resumed.history[-1]["steps"] == full.history[-1]["steps"]
