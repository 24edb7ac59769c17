"""Offline (a priori) pretraining on an increment store.

The network learns ``target = increment / window`` from the state at the start of
the window (Farchi et al. 2024). Streams the store, validates on its ``val`` split
with early stopping, reduces the learning rate on plateaus, is deterministic for
a seed, checkpoints every epoch and resumes after a kill, then publishes the best
weights as a new model version.

Under ``torchrun`` the same function trains with DistributedDataParallel
(:mod:`.distributed`): each rank streams its own chunks of the training split in
its share of the global batch, validation losses are summed over ranks (so the
schedule and early stopping agree), and rank 0 alone checkpoints and publishes.
The checkpoint does not depend on the world size: a killed job resumes under the
same or another number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from correction import artifacts
from correction.networks import CorrectionModel
from correction.timeunits import MODEL_UNIT, TimeUnitError, canonical_unit

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .data import BatchStream, IncrementSource
from .sampling import EarlyExitHead, select
from .settings import PretrainConfig

log = logging.getLogger("mecs.pretrain")


@dataclass
class PretrainResult:
    version: artifacts.ModelVersion
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    resumed_from: int | None
    history: list[dict[str, float]]
    wall_time: float


def _run_key(source: IncrementSource, cfg: PretrainConfig) -> str:
    # the device is not part of the run: a checkpoint resumes on CPU or GPU alike
    settings = {k: v for k, v in cfg.to_dict().items() if k != "device"}
    body = json.dumps([source.attrs.get("content_hash"), settings], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def time_section(attrs: dict) -> dict:
    """The artifact's ``time`` entry from an increments store: the correction's unit.

    Targets are increments divided by the window, in the store's ``window_units``;
    the host step is not known from data (fine-tuning records it).
    """
    unit = attrs.get("window_units") or MODEL_UNIT
    try:
        unit = canonical_unit(unit)
    except TimeUnitError:
        unit = str(unit)
    window = attrs.get("window")
    return {"unit": unit, "window": float(window) if window is not None else None, "host_dt": None}


def evaluate_loss(
    model: CorrectionModel, stream: BatchStream, dist: distributed.Distributed | None = None
) -> float:
    """Mean squared error in normalised target units over a whole split (all ranks')."""
    total, count = 0.0, 0
    model.eval()
    device = dist.device if dist is not None else torch.device("cpu")
    with torch.no_grad():
        for x, y in stream.epoch(0):
            x, y = x.to(device), y.to(device)
            yn = (y - model._expand(model.out_mean)) / model._expand(model.out_std)
            total += float(((model.forward_normalised(x) - yn) ** 2).sum())
            count += yn.numel()
    if dist is not None:
        total, count = dist.sum(total, count)
        count = int(count)
    return total / max(count, 1)


def pretrain(
    data: str | Path,
    repository: str | Path,
    name: str,
    cfg: PretrainConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    stage: str | None = None,
) -> PretrainResult:
    """Train on ``data`` and publish ``repository/name/<next version>``.

    ``stage`` is the new version's (:func:`correction.artifacts.publish`): None makes
    it a candidate on a gated model and leaves an ungated one ungated.

    ``work_dir`` holds the resumable checkpoint (default: a hidden directory under
    ``repository/name`` keyed by data hash and settings), removed after publishing.
    ``stop_after_epochs`` ends the run early without publishing (tests use it to
    simulate a kill at an epoch boundary); it returns None then.
    """
    cfg = cfg or PretrainConfig()
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed.context(cfg.device)
    progress = progress and dist.main
    source = IncrementSource.open(data, cfg.fields)
    layout = source.layout
    torch.manual_seed(cfg.seed)
    model = CorrectionModel(
        cfg.network, cfg.params, layout.channels, layout.channels, len(layout.horizontal_dims)
    )
    normalisation = source.normalisation()
    model.set_normalisation(*normalisation)
    model.to(dist.device)

    def step_loss(x: torch.Tensor, yn: torch.Tensor, share: float) -> torch.Tensor:
        # DDP averages the ranks' gradients: weigh each by its share of the samples
        return torch.mean((model.forward_normalised(x) - yn) ** 2) * share

    objective = dist.wrap(distributed.Objective(model, step_loss))
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optim, factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    sift = cfg.sampling == "sift"
    exit_head = head_optim = head_loss = None
    if sift:  # the approximate loss: trained alongside, checkpointed, not published
        torch.manual_seed(cfg.seed + 7919)
        exit_head = EarlyExitHead(model.core).to(dist.device)
        head_optim = torch.optim.Adam(exit_head.parameters(), lr=cfg.lr)
        # under torchrun the head's gradients are averaged over the ranks like the
        # network's, so every rank scores with the same head and rank 0's checkpoint
        # of it is every rank's
        head_loss = dist.wrap(
            distributed.Objective(
                exit_head,
                lambda x, yn: exit_head.per_sample_loss(
                    exit_head.features(model.normalise_input(x)), yn
                ),
            )
        )
    shard = {"rank": dist.rank, "world": dist.world}
    train = BatchStream(
        source,
        "train",
        cfg.batch_size,
        cfg.seed,
        True,
        cfg.buffer_chunks,
        **shard,
        equal_steps=True,
    )
    val = BatchStream(source, "val", 4096, cfg.seed, False, cfg.buffer_chunks, **shard)

    artifacts.check_name(name)
    run_key = _run_key(source, cfg)
    work = Path(work_dir) if work_dir else Path(repository) / name / f".train-{run_key}"
    ckpt = work / "checkpoint"
    history: list[dict[str, float]] = []
    best_val, best_epoch, bad_epochs, start_epoch = math.inf, -1, 0, 0
    steps, train_wall = 0, 0.0  # backpropagation steps and training seconds so far
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = load_checkpoint(ckpt, ["model", "best"] + (["sift_head"] if sift else []))
    if resumed is not None:
        tensors, states, prog = resumed
        model.load_state_dict(tensors["model"])
        best_state = tensors["best"]
        optim.load_state_dict(states["optimizer"])
        sched.load_state_dict(states["scheduler"])
        if sift:
            exit_head.load_state_dict(tensors["sift_head"])
            head_optim.load_state_dict(states["sift_optimizer"])
        history, best_val = prog["history"], prog["best_val"]
        best_epoch, bad_epochs, start_epoch = prog["best_epoch"], prog["bad_epochs"], prog["epoch"]
        steps, train_wall = prog.get("steps", 0), prog.get("train_wall", 0.0)
    if dist.min(start_epoch) != -dist.min(-start_epoch):
        raise ValueError(
            f"the ranks found different checkpoints in {work}: under torchrun the "
            "repository (its .train-* directory) must be on a file system every rank sees"
        )
    resumed_from = start_epoch if resumed is not None else None
    if not history:
        history.append({"epoch": 0, "val_loss": evaluate_loss(model, val, dist)})

    epoch = start_epoch
    for epoch in range(start_epoch, cfg.max_epochs):
        if bad_epochs >= cfg.early_stopping:
            break
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            return None  # type: ignore[return-value]
        model.train()
        torch.manual_seed(cfg.seed * 100003 + epoch)
        total, count, t_epoch = 0.0, 0, time.perf_counter()
        bar = tqdm(
            train.epoch(epoch),
            total=len(train),
            desc=f"epoch {epoch + 1}",
            disable=not progress,
            leave=False,
            mininterval=0.5,
        )
        select_rng = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        batches = _pools(bar, cfg.sift_pool) if sift else ((x, y, len(x)) for x, y in bar)
        for x, y, batch in batches:
            x, y = x.to(dist.device), y.to(dist.device)
            yn = (y - model._expand(model.out_mean)) / model._expand(model.out_std)
            if sift:
                x, yn = _sift_batch(head_loss, head_optim, x, yn, batch, cfg, select_rng)
            share = dist.share(len(x))
            loss = objective(x, yn, share)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            steps += 1
            total += loss.item() / share * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        total, count = dist.sum(total, count)
        count = int(count)
        train_seconds = time.perf_counter() - t_epoch
        train_wall += train_seconds
        val_loss = evaluate_loss(model, val, dist)
        sched.step(val_loss)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / max(count, 1),
                "val_loss": val_loss,
                "lr": optim.param_groups[0]["lr"],
                "samples": count,
                "train_seconds": train_seconds,
                "steps": steps,
                "train_wall": train_wall,
            }
        )
        if progress:
            tqdm.write(f"epoch {epoch + 1}: train {total / max(count, 1):.4f} val {val_loss:.4f}")
        if val_loss < best_val - cfg.min_delta:
            best_val, best_epoch, bad_epochs = val_loss, epoch + 1, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        if dist.main:
            tensors = {"model": model.state_dict(), "best": best_state}
            states = {"optimizer": optim.state_dict(), "scheduler": sched.state_dict()}
            if sift:
                tensors["sift_head"] = exit_head.state_dict()
                states["sift_optimizer"] = head_optim.state_dict()
            save_checkpoint(
                ckpt,
                tensors,
                states,
                {
                    "epoch": epoch + 1,
                    "steps": steps,
                    "train_wall": train_wall,
                    "history": history,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                },
            )
        dist.barrier()  # no rank runs ahead of the checkpoint it may resume from

    model.load_state_dict(best_state)
    model.eval()
    model.cpu()
    if not dist.main:  # rank 0 publishes; the others learn its version
        info = dist.broadcast_json()
        mv = artifacts.resolve(repository, name, int(info["version"]))
        return PretrainResult(
            mv,
            best_epoch,
            best_val,
            len(history) - 1,
            resumed_from,
            history,
            time.perf_counter() - t0,
        )
    target_std = float(np.sqrt(np.mean(normalisation[3] ** 2)))
    config = artifacts.build_config(
        model,
        layout,
        cfg.params,
        training={
            "stage": "pretrain",
            "mode": "one-step",
            "run_key": run_key,
            "data": str(Path(data).absolute()),
            "data_hash": source.attrs.get("content_hash"),
            "window": source.attrs.get("window"),
            "settings": cfg.to_dict(),
            "best_epoch": best_epoch,
            "epochs_run": len(history) - 1,
            "world_size": dist.world,
            "history": history,
        },
        metrics={"val_loss": best_val, "val_rmse": math.sqrt(best_val) * target_std},
        parent=None,
        time=time_section(source.attrs),
    )
    # a run killed after publishing and before removing its checkpoint is resumed
    # here, finished: it finds its version instead of publishing the same weights twice
    mv = artifacts.find_published(repository, name, artifacts.weights_digest(model), run_key)
    if mv is None:
        mv = artifacts.publish(repository, name, model, config, stage=stage)
    else:
        log.warning(
            "this run was already published as %s version %d (stopped before its checkpoint "
            "was removed); not publishing it again",
            name,
            mv.version,
        )
    shutil.rmtree(work, ignore_errors=True)
    dist.broadcast_json({"version": mv.version})
    return PretrainResult(
        mv, best_epoch, best_val, len(history) - 1, resumed_from, history, time.perf_counter() - t0
    )


def _pools(batches, k: int):
    """Every ``k`` consecutive batches of the stream as one pool, with the batch size.

    The batch size is the stream's (this rank's share under torchrun), so a SIFT
    step backpropagates on as many samples as a uniform one.
    """
    xs, ys = [], []
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        if len(xs) == k:
            yield torch.cat(xs), torch.cat(ys), len(xs[0])
            xs, ys = [], []
    if xs:
        yield torch.cat(xs), torch.cat(ys), len(xs[0])


def _sift_batch(head_loss, head_optim, x, yn, batch, cfg, rng):
    """Score the pool with the early-exit head, train the head on it, pick the batch."""
    per_sample = head_loss(x, yn)
    idx = select(per_sample.detach().cpu(), batch, cfg.sift_floor, rng)
    head_optim.zero_grad(set_to_none=True)
    per_sample.mean().backward()  # the head learns on the whole pool (features detached)
    head_optim.step()
    idx = idx.to(x.device)
    return x[idx], yn[idx]
