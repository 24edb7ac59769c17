"""Training the host-model emulator from forward calls of a black-box host.

Training states are drawn around the analyses: the analyses themselves, Gaussian
perturbations of several sizes (so that the emulator stays accurate where a
corrected or imperfect trajectory wanders), and states along short host runs from
them. The host is only ever called forward, under ``torch.no_grad``. The emulator
and the correction are trained separately, each with its own loss, which Frezat et
al. (2023) found necessary to keep the emulator's bias out of the correction.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from correction import artifacts
from correction.emulator import Emulator
from correction.hosts import BlackBoxHost, HostModel
from correction.layout import ModelLayout
from correction.networks import CorrectionModel

from .settings import EmulatorConfig


def training_states(
    host: HostModel, analyses: np.ndarray, cfg: EmulatorConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """States around the analyses and the host's next states (forward calls only)."""
    n_each = cfg.n_states // (len(cfg.perturbations) * 2)
    scale = analyses.std()
    starts = []
    for p in cfg.perturbations:
        pick = analyses[rng.integers(0, len(analyses), n_each)]
        starts.append(pick + p * rng.standard_normal(pick.shape))
    x0 = np.concatenate(starts)
    states = [x0]
    with torch.no_grad():
        # states along host runs from the perturbed starts, at random depths
        x = torch.from_numpy(x0)
        depth = rng.integers(1, cfg.rollout_steps + 1, len(x0))
        along = np.empty_like(x0)
        for s in range(1, cfg.rollout_steps + 1):
            x = host.step(x)
            along[depth == s] = x.numpy()[depth == s]
        states.append(along)
        inputs = np.concatenate(states)
        inputs = inputs[np.abs(inputs).max(axis=1) < 10 * scale + 20]
        outputs = host.step(torch.from_numpy(inputs)).numpy()
    return inputs, outputs


def rollout_error(emulator: Emulator, host: HostModel, x0: np.ndarray, steps: int) -> float:
    """RMSE between emulator and host after ``steps`` steps from ``x0``."""
    with torch.no_grad():
        e = torch.from_numpy(x0)
        h = torch.from_numpy(x0)
        for _ in range(steps):
            e = emulator.step(e)
            h = host.step(h)
    return float(torch.sqrt(torch.mean((e - h) ** 2)))


def tangent_error(
    emulator: Emulator,
    host: HostModel,
    x0: np.ndarray,
    steps: int,
    seed: int = 0,
    eps: float = 1e-4,
) -> float:
    """Relative error of the emulator's tangent-linear model after ``steps`` steps.

    ``hybrid``, ``emulator`` and ``sip`` fine-tuning use the emulator for its
    Jacobian, not its values, so this is the figure that says whether their
    gradients can be trusted. The reference is a central finite difference of the
    host, which needs forward calls only (black boxes included):
    ``|J_emu v - J_host v| / |J_host v - v|`` over random unit directions ``v``,
    i.e. measured against what the steps change, not against the identity.
    """
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(x0.shape)
    v /= np.linalg.norm(v.reshape(len(v), -1), axis=1).reshape(-1, *([1] * (v.ndim - 1)))

    def run(step, x):
        for _ in range(steps):
            x = step(x)
        return x

    with torch.no_grad():
        x, d = torch.from_numpy(x0), torch.from_numpy(v)
        jh = (run(host.step, x + eps * d) - run(host.step, x - eps * d)) / (2 * eps)
    _, je = torch.func.jvp(lambda z: run(emulator.step, z), (x,), (d,))
    num = torch.linalg.vector_norm((je - jh).reshape(len(x), -1), dim=1)  # per sample
    den = torch.linalg.vector_norm((jh - d).reshape(len(x), -1), dim=1)
    return float(torch.mean(num / den))


def train_emulator(
    host: HostModel,
    host_name: str,
    analyses: np.ndarray,
    layout: ModelLayout,
    out: str | Path,
    cfg: EmulatorConfig | None = None,
    host_params: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Fit an emulator of ``host`` and save it as an artifact directory at ``out``."""
    cfg = cfg or EmulatorConfig()
    t0 = time.perf_counter()
    black_box = host if isinstance(host, BlackBoxHost) else BlackBoxHost.wrap(host)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    x, y = training_states(black_box, analyses.astype(np.float64), cfg, rng)
    dt = float(host.dt)
    target = (y - x) / dt
    n_val = max(len(x) // 10, 1)
    perm = rng.permutation(len(x))
    val, train = perm[:n_val], perm[n_val:]
    model = CorrectionModel(
        cfg.network, cfg.params, layout.channels, layout.channels, len(layout.horizontal_dims)
    )
    model.set_normalisation(
        [x[train].mean()], [x[train].std()], [target[train].mean()], [target[train].std()]
    )
    pack = lambda a: layout.pack(torch.as_tensor(a, dtype=torch.float32))  # noqa: E731
    xt, yt = pack(x), pack(target)
    yn = (yt - model._expand(model.out_mean)) / model._expand(model.out_std)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, cfg.epochs)
    history = []
    for epoch in tqdm(range(cfg.epochs), desc="emulator", disable=not progress):
        model.train()
        order = torch.from_numpy(rng.permutation(train))
        for b in range(0, len(order), cfg.batch_size):
            i = order[b : b + cfg.batch_size]
            loss = torch.mean((model.forward_normalised(xt[i]) - yn[i]) ** 2)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            vi = torch.from_numpy(val)
            vl = float(torch.mean((model.forward_normalised(xt[vi]) - yn[vi]) ** 2))
        history.append({"epoch": epoch + 1, "val_loss": vl})
    model.eval()
    config = artifacts.build_config(model, layout, cfg.params, kind="emulator")
    config["emulator"] = {"host": host_name, "host_params": host_params or {}, "dt": dt}
    emulator = Emulator(model, config)
    x_eval = analyses[rng.integers(0, len(analyses), 256)].astype(np.float64)
    metrics = {
        "val_loss": history[-1]["val_loss"],
        "one_step_rmse": rollout_error(emulator, black_box, x_eval, 1),
        "ten_step_rmse": rollout_error(emulator, black_box, x_eval, 10),
        # the tangent-linear model, which the emulator-gradient modes rely on
        "one_step_tangent_rel_err": tangent_error(emulator, black_box, x_eval[:64], 1),
        "ten_step_tangent_rel_err": tangent_error(emulator, black_box, x_eval[:64], 10),
        "host_one_step_change_rms": float(np.sqrt(np.mean((y - x) ** 2))),
    }
    config.update(
        metrics=metrics,
        training={
            "settings": dataclasses.asdict(cfg),
            "history": history,
            "n_states": len(x),
            "wall_time_s": time.perf_counter() - t0,
        },
    )
    return artifacts.save(out, model, config), metrics


__all__ = ["EmulatorConfig", "rollout_error", "tangent_error", "train_emulator"]
