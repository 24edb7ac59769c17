"""The fine-tuning loop: windows, optimiser, validation, best weights, publication.

Under ``torchrun`` the windows are split across ranks: every rank draws the same
global batch of window starts (one seeded generator) and unrolls its share of
them with its own host, DDP averages the gradients, validation windows are split
the same way and their losses summed over ranks, and rank 0 publishes. Hosts run
on CPU, so the process group is gloo.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from correction import artifacts
from correction.corrections import NetworkCorrection
from correction.emulator import Emulator
from correction.hosts import BlackBoxHost, HostModel
from correction.inference import Corrector

from .. import distributed
from .config import FinetuneConfig
from .strategies import make_strategy


@dataclass
class FinetuneResult:
    version: artifacts.ModelVersion
    history: list[dict[str, float]]
    best_val: float
    host_calls: int
    wall_time: float


def _windows(n_times: int, lo: int, hi: int, unroll: int) -> np.ndarray:
    """Start indices in ``[lo, hi)`` whose ``unroll`` following analyses stay below hi."""
    return np.arange(lo, max(lo, hi - unroll))


def split_windows(train_end: int, cfg: FinetuneConfig) -> tuple[int, np.ndarray]:
    """``(train_hi, validation starts)``: training windows start below ``train_hi``.

    The last ``val_fraction`` of the analyses before ``train_end`` validate, with a
    gap of ``max_unroll`` so that no training window overlaps them; at most
    ``val_windows`` evenly spaced validation windows are used.
    """
    n_val = max(int(train_end * cfg.val_fraction), cfg.max_unroll + 1)
    val_lo = train_end - n_val
    train_hi = val_lo - cfg.max_unroll  # a gap so windows do not overlap validation
    if train_hi <= cfg.max_unroll + 1:
        raise ValueError(f"too few analyses ({train_end}) for unroll {cfg.max_unroll}")
    val_starts = _windows(train_end, val_lo, train_end, cfg.max_unroll)
    pick = np.linspace(0, len(val_starts) - 1, min(cfg.val_windows, len(val_starts)))
    return train_hi, val_starts[pick.astype(int)]


def _channel_variance(a: torch.Tensor, layout) -> torch.Tensor:
    """Variance of each packed channel over time and grid (``[C]``)."""
    packed = layout.pack(a.reshape(a.shape[0], *layout.state_shape))
    return packed.transpose(0, 1).reshape(packed.shape[1], -1).var(dim=1)


def finetune(
    repository: str | Path,
    name: str,
    analyses: np.ndarray,
    host: HostModel,
    cfg: FinetuneConfig,
    steps_per_interval: int,
    train_end: int,
    from_version: int | None = None,
    emulator_path: str | Path | None = None,
    torch_host: HostModel | None = None,
    data_ref: str | None = None,
    progress: bool = True,
    publish_as: str | None = None,
    host_spec: str | None = None,
    stage: str = "candidate",
) -> FinetuneResult:
    """Fine-tune ``name`` (its production version or ``from_version``) and publish a
    new version, as a ``candidate`` by default: it is served once ``mecs promote``
    has verified it against production (``stage="production"`` skips that).

    ``analyses`` ``[T, *state]`` at consecutive analysis times; only indices before
    ``train_end`` are used (the last ``val_fraction`` of them for validation).
    ``host`` is called forward only unless the mode is ``differentiable``;
    ``host_spec`` (``torch:l96``, ``process:...``) is recorded in the new version.
    """
    t0 = time.perf_counter()
    dist = distributed.context("cpu")
    progress = progress and dist.main
    if cfg.batch_size < dist.world:
        raise ValueError(
            f"batch_size {cfg.batch_size} is smaller than the {dist.world} processes "
            "that share each batch of windows"
        )
    parent = Corrector.load(repository, name, from_version)
    model, _ = artifacts.load(artifacts.resolve(repository, name, parent.version).path)
    model.train()
    emulator = Emulator.load(emulator_path) if emulator_path else None
    black_box = host if isinstance(host, BlackBoxHost) else BlackBoxHost.wrap(host)
    strategy = make_strategy(
        cfg.mode,
        NetworkCorrection(model, parent.layout, trainable=True),
        black_box,
        steps_per_interval,
        emulator,
        torch_host,
        cfg.sip_damping,
    )
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    a = torch.from_numpy(np.asarray(analyses, dtype=np.float64))
    train_hi, val_starts = split_windows(train_end, cfg)
    # one climatological variance per channel (field and level): losses in their units
    clim_var = _channel_variance(a[:train_end], parent.layout)
    out_std = model.out_std.detach().clone()

    def val_loss() -> float:
        model.eval()
        mine = val_starts[dist.shard(len(val_starts))]
        v = strategy.validation_loss(a, mine, cfg.max_unroll, clim_var) if len(mine) else 0.0
        model.train()
        total, count = dist.sum(v * len(mine), len(mine))  # the mean over all windows
        return total / count

    objective = dist.wrap(
        distributed.Objective(
            # each rank's mean over its windows, weighed by its share of the batch
            model,
            lambda starts, n: (
                strategy.loss(a, starts, n, out_std, clim_var)
                * (dist.world * len(starts) / cfg.batch_size)
            ),
        )
    )

    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    calls_before = black_box.calls if hasattr(black_box, "calls") else 0
    history = [{"iteration": 0, "val_loss": val_loss()}]
    best_val = history[0]["val_loss"]
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    bar = tqdm(
        range(1, cfg.iterations + 1),
        desc=f"finetune {cfg.mode}",
        disable=not progress,
        mininterval=0.5,
    )
    for it in bar:
        n = cfg.unroll_at(it - 1)
        starts = rng.choice(_windows(len(a), 0, train_hi, n), cfg.batch_size)
        loss = objective(starts[dist.shard(len(starts))], n)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", unroll=n, refresh=False)
        if it % cfg.val_every == 0 or it == cfg.iterations:
            v = val_loss()
            history.append({"iteration": it, "train_loss": loss.item(), "val_loss": v, "unroll": n})
            if v < best_val:
                best_val = v
                best_state = {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    host_calls = (black_box.calls if hasattr(black_box, "calls") else 0) - calls_before
    host_calls = int(dist.sum(host_calls)[0])
    if not dist.main:  # rank 0 publishes; the others learn its version
        mv = artifacts.resolve(repository, publish_as or name, dist.broadcast_json()["version"])
        return FinetuneResult(mv, history, best_val, host_calls, time.perf_counter() - t0)
    config = dict(parent.config)
    for key in ("name", "version", "weights_sha256", "config_sha256", "published_at"):
        config.pop(key, None)
    time_section = dict(config.get("time") or {"unit": "model time unit", "window": None})
    time_section["host_dt"] = float(host.dt)  # the host step it was trained with
    config["time"] = time_section
    config["training"] = {
        "stage": "finetune",
        "mode": cfg.mode,
        "settings": dataclasses.asdict(cfg),
        "data": data_ref,
        "emulator": str(Path(emulator_path).absolute()) if emulator_path else None,
        "host": host.name,
        "host_spec": host_spec or f"torch:{host.name}",
        "history": history,
        "pretraining": parent.config.get("training", {}).get("stage"),
        "world_size": dist.world,
    }
    config["parent"] = {"name": parent.name, "version": parent.version}
    config["metrics"] = {
        "val_loss_a_posteriori": best_val,
        "val_loss_before": history[0]["val_loss"],
        "val_unroll": cfg.max_unroll,
    }
    mv = artifacts.publish(repository, publish_as or name, model, config, stage=stage)
    dist.broadcast_json({"version": mv.version})
    return FinetuneResult(mv, history, best_val, host_calls, time.perf_counter() - t0)


__all__ = ["FinetuneResult", "finetune", "split_windows"]
