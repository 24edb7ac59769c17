"""Emulator and online fine-tuning: every mode learns, black-box hosts stay black boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import make_l96_model

from correction import artifacts, stages
from correction.corrections import NetworkCorrection
from correction.emulator import Emulator
from correction.hosts import BlackBoxHost, HostGradientError, Lorenz96
from correction.inference import Corrector
from correction.layout import ModelLayout
from correction.rollout import Gradient
from correction.storage import open_zarr
from correction.training.emulator import EmulatorConfig, tangent_error, train_emulator
from correction.training.finetune import (
    MODES,
    STRATEGIES,
    FinetuneConfig,
    finetune,
    make_strategy,
    split_windows,
)

LAYOUT = ModelLayout(("X",), {"X": ("k",)}, {"X": ()}, ("k",), {"k": 36}, {"X": "1"})


class StrictHost(BlackBoxHost):
    """A black box that records every call and whether autograd could reach it."""

    def __init__(self) -> None:
        super().__init__(BlackBoxHost.wrap(Lorenz96()).fn, (36,), 0.01, name="strict-l96")
        self.grad_requests = 0

    def step(self, x):
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            self.grad_requests += 1
        return super().step(x)


@pytest.fixture(scope="module")
def analyses(tiny_synth):
    return open_zarr(tiny_synth / "analyses.zarr")["X"].values.astype(np.float64)


@pytest.fixture(scope="module")
def emulator_path(tmp_path_factory, analyses):
    out = tmp_path_factory.mktemp("emu") / "emulator"
    cfg = EmulatorConfig(n_states=4000, epochs=12, rollout_steps=5, lr=3e-3)
    path, metrics = train_emulator(Lorenz96(), "l96", analyses, LAYOUT, out, cfg, progress=False)
    assert metrics["one_step_rmse"] < metrics["host_one_step_change_rms"]
    return path


@pytest.fixture
def repository(tmp_path, analyses):
    model, config = make_l96_model(network="column-mlp")
    x = analyses
    model.set_normalisation([x.mean()], [x.std()], [0.0], [2.0])
    config = artifacts.build_config(
        model, LAYOUT, {"hidden": 16, "depth": 3}, training={"stage": "pretrain"}
    )
    artifacts.publish(tmp_path / "models", "l96", model, config)
    return tmp_path / "models"


def test_emulator_round_trip_and_accuracy(emulator_path, analyses):
    emu = Emulator.load(emulator_path)
    cfg = artifacts.read_config(emulator_path)
    assert cfg["kind"] == "emulator" and cfg["emulator"]["host"] == "l96"
    assert {
        "one_step_rmse",
        "ten_step_rmse",
        "one_step_tangent_rel_err",
        "ten_step_tangent_rel_err",
    } <= set(cfg["metrics"])
    x = torch.from_numpy(analyses[:8])
    again = Emulator.load(emulator_path)
    torch.testing.assert_close(emu.step(x), again.step(x))
    # a step of the emulator is close to the host's and differentiable in x
    err = (emu.step(x) - Lorenz96().step(x)).abs().mean()
    assert err < 0.5 * (Lorenz96().step(x) - x).abs().mean()
    xg = x.clone().requires_grad_()
    emu.step(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    with pytest.raises(artifacts.ArtifactError, match="not an emulator"):
        publish_dir = artifacts.save(emulator_path.parent / "not-emu", *make_l96_model())
        Emulator.load(publish_dir)


def test_tangent_error_is_measured_with_forward_calls_only(analyses):
    """The emulator's Jacobian check: zero for an exact stand-in, large for a wrong one."""
    host = StrictHost()
    x = analyses[:16]
    assert tangent_error(Lorenz96(), host, x, 3) < 1e-5
    assert tangent_error(Lorenz96(dt=0.02), host, x, 3) > 0.5  # twice the step
    assert host.grad_requests == 0 and host.calls > 0


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_lowers_its_own_loss(mode, repository, analyses, emulator_path):
    torch.manual_seed(0)
    host = StrictHost()
    model, _ = artifacts.load(artifacts.resolve(repository, "l96").path)
    corrector = Corrector.load(repository, "l96")
    emu = Emulator.load(emulator_path)
    strategy = make_strategy(
        mode,
        NetworkCorrection(model, corrector.layout, trainable=True),
        host,
        5,
        emu,
        Lorenz96() if mode == "differentiable" else None,
        0.1,
    )
    a = torch.from_numpy(analyses)
    starts = np.arange(0, 120, 4 if mode != "sip" else 30)  # sip's Jacobians cost more
    clim_var = float(a.var())
    loss = lambda: strategy.loss(a, starts, 2, model.out_std, clim_var)  # noqa: E731
    before = loss().item()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(6 if mode == "sip" else 15):
        value = loss()
        optim.zero_grad()
        value.backward()
        optim.step()
    after = loss().item()
    assert after < before, (mode, before, after)
    assert host.grad_requests == 0
    # the emulator and differentiable modes never call the black box
    assert (host.calls == 0) == (mode in ("emulator", "differentiable"))


def test_black_box_host_cannot_silently_give_gradients(repository, analyses):
    """Differentiating through a black-box host fails loudly instead of training on zeros."""
    model, _ = artifacts.load(artifacts.resolve(repository, "l96").path)
    net = NetworkCorrection(model, LAYOUT, trainable=True)
    strategy = make_strategy("differentiable", net, StrictHost(), 5, None, torch_host=Lorenz96())
    strategy.torch_host = BlackBoxHost.wrap(Lorenz96())
    x = torch.from_numpy(analyses[:4]).requires_grad_()
    with pytest.raises(HostGradientError):
        strategy.interval(x)
    with pytest.raises(ValueError, match="needs an emulator"):
        make_strategy("hybrid", net, StrictHost(), 5)
    with pytest.raises(ValueError, match="needs a host written in torch"):
        make_strategy("differentiable", net, StrictHost(), 5, torch_host=StrictHost())


def test_finetune_publishes_version_with_lineage(repository, analyses, emulator_path):
    cfg = FinetuneConfig(
        mode="hybrid", iterations=6, unroll=2, batch_size=8, val_every=3, val_windows=16
    )
    host = StrictHost()
    result = finetune(
        repository,
        "l96",
        analyses,
        host,
        cfg,
        5,
        train_end=200,
        emulator_path=emulator_path,
        data_ref="tiny",
        progress=False,
    )
    assert result.version.version == 2 and host.grad_requests == 0
    config = artifacts.read_config(result.version.path)
    assert config["parent"] == {"name": "l96", "version": 1}
    assert config["training"]["mode"] == "hybrid"
    assert config["training"]["emulator"] == str(emulator_path.absolute())
    # the recorded figure is the published weights' own: recomputed from the new
    # version on the validation windows, with the real host's values
    _, val_starts = split_windows(200, cfg)
    published, _ = artifacts.load(result.version.path)
    a = torch.from_numpy(analyses)
    check = make_strategy("unrolled", NetworkCorrection(published, LAYOUT), Lorenz96(), 5)
    recomputed = check.validation_loss(a, val_starts, cfg.max_unroll, float(a[:200].var()))
    assert recomputed == pytest.approx(config["metrics"]["val_loss_a_posteriori"], rel=1e-6)
    best = min(h["val_loss"] for h in config["training"]["history"])
    assert config["metrics"]["val_loss_a_posteriori"] == pytest.approx(best, rel=1e-12)
    # published as a candidate: production (what is served) stays version 1 until
    # mecs promote passes it
    assert stages.read(repository, "l96").stages == {1: "production", 2: "candidate"}
    assert Corrector.load(repository, "l96").version == 1


def test_curriculum_and_config_validation():
    cfg = FinetuneConfig(curriculum=[1, 4, 10], iterations=30)
    assert [cfg.unroll_at(i) for i in (0, 9, 10, 29)] == [1, 1, 4, 10]
    assert cfg.max_unroll == 10
    with pytest.raises(ValueError, match="unknown mode"):
        FinetuneConfig(mode="magic")
    with pytest.raises(ValueError, match="unknown finetune setting"):
        FinetuneConfig.from_dict({"unrol": 3})


def test_modes_are_registered_strategies_with_their_gradient_policy():
    """The mode name picks a registered strategy; its rollout policy is what it says."""
    assert MODES == ("one-step", "unrolled", "emulator", "hybrid", "differentiable", "sip")
    policies = {name: cls.gradient for name, cls in STRATEGIES.items()}
    assert policies["unrolled"] is Gradient.TRUNCATED
    assert policies["emulator"] is Gradient.SURROGATE
    assert policies["hybrid"] is Gradient.STRAIGHT_THROUGH
    assert policies["differentiable"] is Gradient.FULL
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        make_strategy("nope", None, Lorenz96(), 5)
