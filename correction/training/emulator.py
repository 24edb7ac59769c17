"""Training the host-model emulator from forward calls of a black-box host.

Training states are drawn around the analyses: the analyses themselves, Gaussian
perturbations of several sizes (so that the emulator stays accurate where a
corrected or imperfect trajectory wanders), and states along short host runs from
them. The host is only ever called forward, under ``torch.no_grad``. The emulator
and the correction are trained separately, each with its own loss, which Frezat et
al. (2023) found necessary to keep the emulator's bias out of the correction.

Under ``torchrun`` each rank draws its share of the training states (its own host
instance, its own seeded generator), the normalisation is computed over all
ranks' states, DDP averages the gradients, and rank 0 measures and saves.
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

from . import distributed
from .settings import EmulatorConfig


def channel_stats(states: np.ndarray, layout: ModelLayout) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each packed channel (field and level), ``[C]`` each."""
    packed = layout.pack(torch.from_numpy(np.ascontiguousarray(states))).numpy()
    flat = np.moveaxis(packed, 1, 0).reshape(packed.shape[1], -1)
    return flat.mean(axis=1), flat.std(axis=1)


def _as_state(values: np.ndarray, layout: ModelLayout) -> np.ndarray:
    """Per-channel ``values`` laid out as one state ``[1, *state_shape]``."""
    h = layout.horizontal_shape
    packed = np.broadcast_to(values.reshape(1, -1, *([1] * len(h))), (1, len(values), *h))
    return layout.unpack(torch.from_numpy(np.ascontiguousarray(packed))).numpy()


def training_states(
    host: HostModel,
    analyses: np.ndarray,
    cfg: EmulatorConfig,
    rng: np.random.Generator,
    layout: ModelLayout | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """States around the analyses and the host's next states (forward calls only).

    Perturbations are ``cfg.perturbations`` in state units for a one-channel state
    (Lorenz-96), and in each channel's standard deviation when there are several
    (fields in K and Pa cannot share one perturbation size).
    """
    n_each = cfg.n_states // (len(cfg.perturbations) * 2)
    if layout is not None and layout.channels > 1:
        mean_c, std_c = channel_stats(analyses, layout)
        unit = _as_state(np.where(std_c > 0, std_c, 1.0), layout)
        center, spread = _as_state(mean_c, layout), unit
    else:
        unit, center, spread = 1.0, analyses.mean(), analyses.std()
    starts = []
    for p in cfg.perturbations:
        pick = analyses[rng.integers(0, len(analyses), n_each)]
        starts.append(pick + p * unit * rng.standard_normal(pick.shape))
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
        # drop states that ran far off (per sample, in each channel's spread)
        if np.ndim(spread) == 0:
            far = np.abs(inputs).reshape(len(inputs), -1).max(axis=1) >= 10 * spread + 20
        else:
            z = np.abs(inputs - center) / spread
            far = z.reshape(len(inputs), -1).max(axis=1) >= 20
        inputs = inputs[~far]
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
    scale: np.ndarray | None = None,
) -> float:
    """Relative error of the emulator's tangent-linear model after ``steps`` steps.

    ``hybrid``, ``emulator`` and ``sip`` fine-tuning use the emulator for its
    Jacobian, not its values, so this is the figure that says whether their
    gradients can be trusted. The reference is a central finite difference of the
    host, which needs forward calls only (black boxes included):
    ``|J_emu v - J_host v| / |J_host v - v|`` over random unit directions ``v``,
    i.e. measured against what the steps change, not against the identity.
    ``scale`` (a state of per-channel spreads) makes directions and norms per
    channel, so a field in Pa does not stand for the whole state.
    """
    rng = np.random.default_rng(seed)
    w = np.ones((1, *x0.shape[1:])) if scale is None else np.asarray(scale)
    v = rng.standard_normal(x0.shape) * w
    v /= np.linalg.norm((v / w).reshape(len(v), -1), axis=1).reshape(-1, *([1] * (v.ndim - 1)))

    def run(step, x):
        for _ in range(steps):
            x = step(x)
        return x

    with torch.no_grad():
        x, d = torch.from_numpy(x0), torch.from_numpy(v)
        jh = (run(host.step, x + eps * d) - run(host.step, x - eps * d)) / (2 * eps)
    _, je = torch.func.jvp(lambda z: run(emulator.step, z), (x,), (d,))
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).to(jh.dtype)
    num = torch.linalg.vector_norm(((je - jh) / wt).reshape(len(x), -1), dim=1)  # per sample
    den = torch.linalg.vector_norm(((jh - d) / wt).reshape(len(x), -1), dim=1)
    return float(torch.mean(num / den))


def train_emulator(
    host: HostModel | None,
    host_name: str,
    analyses: np.ndarray,
    layout: ModelLayout,
    out: str | Path,
    cfg: EmulatorConfig | None = None,
    host_params: dict[str, Any] | None = None,
    progress: bool = True,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    dt: float | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fit an emulator of ``host`` and save it as an artifact directory at ``out``.

    With ``pairs`` (states and the states ``dt`` later, e.g. consecutive leads of a
    forecast archive) and ``host`` None, the emulator learns from them instead of
    calling a host; its figures are then measured on held-out pairs (one step; no
    tangent error, which needs a live host).
    """
    cfg = cfg or EmulatorConfig()
    t0 = time.perf_counter()
    dist = distributed.context("cpu")
    progress = progress and dist.main
    rng = np.random.default_rng(cfg.seed if not dist.active else [cfg.seed, dist.rank])
    torch.manual_seed(cfg.seed)
    black_box = None
    if pairs is None:
        black_box = host if isinstance(host, BlackBoxHost) else BlackBoxHost.wrap(host)
        share = dataclasses.replace(cfg, n_states=max(cfg.n_states // dist.world, 1))
        x, y = training_states(black_box, analyses.astype(np.float64), share, rng, layout)
        dt = float(host.dt)
    else:
        x, y = (np.asarray(a[dist.shard(len(a))], dtype=np.float64) for a in pairs)
        dt = float(dt)
    target = (y - x) / dt
    n_val = max(len(x) // 10, 1)
    perm = rng.permutation(len(x))
    val, train = perm[:n_val], perm[n_val:]
    model = CorrectionModel(
        cfg.network, cfg.params, layout.channels, layout.channels, len(layout.horizontal_dims)
    )
    # per channel (one channel: the same numbers as one global mean and std)
    in_mean, in_std = _global_stats(x[train], layout, dist)
    out_mean, out_std = _global_stats(target[train], layout, dist)
    model.set_normalisation(in_mean, np.where(in_std > 0, in_std, 1.0), out_mean, out_std)
    pack = lambda a: layout.pack(torch.as_tensor(a, dtype=torch.float32))  # noqa: E731
    xt, yt = pack(x), pack(target)
    yn = (yt - model._expand(model.out_mean)) / model._expand(model.out_std)
    objective = dist.wrap(
        distributed.Objective(
            model,
            lambda xb, yb: (
                torch.mean((model.forward_normalised(xb) - yb) ** 2) * dist.share(len(xb))
            ),
        )
    )
    batch = max(cfg.batch_size // dist.world, 1)
    steps = dist.min(-(-len(train) // batch))  # every rank takes the same number
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, cfg.epochs)
    history = []
    for epoch in tqdm(range(cfg.epochs), desc="emulator", disable=not progress):
        model.train()
        order = torch.from_numpy(rng.permutation(train))
        for k in range(steps):
            i = order[k * batch : (k + 1) * batch]
            loss = objective(xt[i], yn[i])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            vi = torch.from_numpy(val)
            sq = float(torch.sum((model.forward_normalised(xt[vi]) - yn[vi]) ** 2))
        total, count = dist.sum(sq, yn[vi].numel())
        vl = total / count
        history.append({"epoch": epoch + 1, "val_loss": vl})
    model.eval()
    n_states = int(dist.sum(len(x))[0])
    if not dist.main:  # rank 0 measures and saves; the others learn its figures
        done = dist.broadcast_json()
        return Path(done["path"]), done["metrics"]
    config = artifacts.build_config(model, layout, cfg.params, kind="emulator")
    config["emulator"] = {"host": host_name, "host_params": host_params or {}, "dt": dt}
    emulator = Emulator(model, config)
    x_eval = analyses[rng.integers(0, len(analyses), 256)].astype(np.float64)
    spread = None
    if layout.channels > 1:  # directions and norms per channel
        spread = _as_state(np.where(in_std > 0, in_std, 1.0), layout)
    if black_box is None:  # learned from pairs: scored on the held-out ones
        with torch.no_grad():
            pred = emulator.step(torch.from_numpy(x[val])).numpy()
        metrics = {
            "val_loss": history[-1]["val_loss"],
            "one_step_rmse": float(np.sqrt(np.mean((pred - y[val]) ** 2))),
            "host_one_step_change_rms": float(np.sqrt(np.mean((y - x) ** 2))),
            "source": "archive pairs (no live host: no tangent-linear figures)",
        }
    else:
        metrics = _host_metrics(emulator, black_box, x_eval, spread, x, y, history)
    config.update(
        metrics=metrics,
        training={
            "settings": dataclasses.asdict(cfg),
            "history": history,
            "n_states": n_states,
            "world_size": dist.world,
            "wall_time_s": time.perf_counter() - t0,
        },
    )
    path = artifacts.save(out, model, config)
    dist.broadcast_json({"path": str(path), "metrics": metrics})
    return path, metrics


def _global_stats(
    values: np.ndarray, layout: ModelLayout, dist: distributed.Distributed
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`channel_stats` over every rank's ``values`` (each rank holds a share)."""
    mean, std = channel_stats(values, layout)
    if not dist.active:
        return mean, std
    n = float(len(values))
    sums = dist.sum(n, *(n * mean), *(n * (std**2 + mean**2)))
    c = len(mean)
    total = sums[0]
    g_mean = np.asarray(sums[1 : 1 + c]) / total
    g_sq = np.asarray(sums[1 + c :]) / total
    return g_mean, np.sqrt(np.maximum(g_sq - g_mean**2, 0.0))


def _host_metrics(emulator, black_box, x_eval, spread, x, y, history) -> dict[str, Any]:
    """The emulator's figures against the live host: rollouts and the tangent-linear model."""
    return {
        "val_loss": history[-1]["val_loss"],
        "one_step_rmse": rollout_error(emulator, black_box, x_eval, 1),
        "ten_step_rmse": rollout_error(emulator, black_box, x_eval, 10),
        # the tangent-linear model, which the emulator-gradient modes rely on
        "one_step_tangent_rel_err": tangent_error(
            emulator, black_box, x_eval[:64], 1, scale=spread
        ),
        "ten_step_tangent_rel_err": tangent_error(
            emulator, black_box, x_eval[:64], 10, scale=spread
        ),
        "host_one_step_change_rms": float(np.sqrt(np.mean((y - x) ** 2))),
    }


__all__ = ["EmulatorConfig", "rollout_error", "tangent_error", "train_emulator"]
