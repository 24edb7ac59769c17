"""Streaming increment samples from a zarr store into training batches.

The store is chunked along ``sample``; an epoch visits the chunks in a seeded
random order, holds a few chunks at a time in a shuffle buffer and yields
mini-batches from it, so memory is bounded by ``buffer_chunks`` chunks whatever the
store's size. The order depends only on ``(seed, epoch)``, which makes a resumed
run see exactly the batches an uninterrupted run would have seen.

Under ``torchrun`` each rank streams only its own chunks (every ``world``-th of
the epoch's seeded chunk order), in batches of its share of the global batch, so
no rank reads the whole store; in training every rank takes the same number of
steps per epoch (DDP reduces gradients once per step on all ranks).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from correction.layout import ModelLayout


@dataclass
class IncrementSource:
    """Random access to one increment store (state and target per field)."""

    path: Path
    layout: ModelLayout
    attrs: dict[str, Any]
    stats: dict[str, Any]
    split: np.ndarray
    chunk: int

    @classmethod
    def open(cls, path: str | Path, fields: list[str] | None = None) -> IncrementSource:
        from data_pipeline import open_increments, read_stats

        ds = open_increments(path)  # refuses incomplete stores
        stats = read_stats(path)
        attrs = dict(ds.attrs)
        all_fields = attrs["fields"]
        all_fields = json.loads(all_fields) if isinstance(all_fields, str) else list(all_fields)
        fields = fields or all_fields
        unknown = [f for f in fields if f not in all_fields]
        if unknown:
            raise ValueError(f"store {path} has no field(s) {unknown}; fields: {all_fields}")
        level_dims = {f: list(stats.get("level_dims", {}).get(f, [])) for f in fields}
        layout = ModelLayout.from_dataset(ds, fields, level_dims)
        split = np.asarray(ds["split"].values).astype(str)
        chunk = int(ds[f"state_{fields[0]}"].encoding.get("chunks", (len(split),))[0])
        return cls(Path(path), layout, attrs, stats, split, chunk)

    def indices(self, split: str) -> np.ndarray:
        idx = np.flatnonzero(self.split == split)
        if len(idx) == 0:
            raise ValueError(f"store {self.path} has no '{split}' samples")
        return idx

    def normalisation(self) -> tuple[np.ndarray, ...]:
        """Per-channel (in_mean, in_std, out_mean, out_std) from stats.json."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("im", "is", "om", "os")}
        for f in self.layout.fields:
            s = self.stats["fields"][f]
            n = self.layout.n_levels(f)
            for key, role, stat in [
                ("im", "state", "mean"),
                ("is", "state", "std"),
                ("om", "target", "mean"),
                ("os", "target", "std"),
            ]:
                v = np.broadcast_to(np.asarray(s[role][stat], dtype=np.float64).ravel(), (n,))
                parts[key].append(v)
        out = [np.concatenate(parts[k]) for k in ("im", "is", "om", "os")]
        for arr in (out[1], out[3]):
            arr[arr <= 0] = 1.0  # a constant channel: leave it unscaled
        return tuple(out)

    @functools.cached_property
    def arrays(self) -> dict[str, Any]:
        """The zarr arrays of every state and target field, opened once per source."""
        group = zarr.open_group(str(self.path), mode="r")
        return {
            f"{role}_{f}": group[f"{role}_{f}"]
            for f in self.layout.fields
            for role in ("state", "target")
        }

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Packed (state, target) ``[n, C, *H]`` float32 for samples ``lo:hi``."""
        xs, ys = [], []
        hshape = self.layout.horizontal_shape
        for f in self.layout.fields:
            n = self.layout.n_levels(f)
            xs.append(np.asarray(self.arrays[f"state_{f}"][lo:hi]).reshape(hi - lo, n, *hshape))
            ys.append(np.asarray(self.arrays[f"target_{f}"][lo:hi]).reshape(hi - lo, n, *hshape))
        return (
            np.concatenate(xs, axis=1).astype(np.float32),
            np.concatenate(ys, axis=1).astype(np.float32),
        )

    def read_indices(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at sorted indices, read chunk by chunk."""
        if len(idx) == 0:
            shape = (0, self.layout.channels, *self.layout.horizontal_shape)
            return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        x, y = self.read(int(idx[0]), int(idx[-1]) + 1)
        return x[idx - idx[0]], y[idx - idx[0]]


class BatchStream:
    """Shuffled mini-batches of one split, streamed chunk by chunk."""

    def __init__(
        self,
        source: IncrementSource,
        split: str,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        buffer_chunks: int = 4,
        rank: int = 0,
        world: int = 1,
        equal_steps: bool = False,
    ) -> None:
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.shuffle, self.buffer_chunks = shuffle, buffer_chunks
        self.rank, self.world, self.equal_steps = rank, world, equal_steps
        if batch_size < world:
            raise ValueError(
                f"batch_size {batch_size} is smaller than the {world} processes that share "
                "each batch"
            )
        idx = source.indices(split)
        self.groups = [
            g for g in np.split(idx, np.flatnonzero(np.diff(idx // source.chunk)) + 1) if len(g)
        ]
        self.n_samples = len(idx)
        # Chunks per rank when that keeps nearly every sample: equal steps cut each
        # epoch at the rank with the fewest samples. Otherwise (fewer chunks than
        # ranks, or a few chunks of unequal size) every rank streams the whole split
        # and takes its share of each global batch: the batches one process sees.
        self.by_chunks = world == 1 or (
            len(self.groups) >= world and self._chunk_plan_keeps(0) >= 0.95
        )

    def local_batch(self, rank: int | None = None) -> int:
        """This rank's share of the global batch (the shares add up to it)."""
        r = self.rank if rank is None else rank
        return self.batch_size // self.world + (1 if r < self.batch_size % self.world else 0)

    def __len__(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def _order(self, epoch: int) -> tuple[np.random.Generator, list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.groups)) if self.shuffle else range(len(self.groups))
        return rng, list(order)

    def _chunk_plan_keeps(self, epoch: int) -> float:
        """The fraction of the split that sharding by chunks would train on."""
        _, order = self._order(epoch)
        sizes = [
            sum(len(self.groups[i]) for i in order[r :: self.world]) for r in range(self.world)
        ]
        steps = min(math.ceil(n / self.local_batch(r)) for r, n in enumerate(sizes))
        kept = sum(min(n, steps * self.local_batch(r)) for r, n in enumerate(sizes))
        return kept / max(self.n_samples, 1)

    def steps(self, epoch: int) -> int:
        """Batches every rank can yield this epoch (the fewest over ranks)."""
        if not self.by_chunks:  # global batches, the last one only if every rank has a share
            full, rest = divmod(self.n_samples, self.batch_size)
            return full + (1 if rest >= self.world else 0)
        _, order = self._order(epoch)
        return min(
            math.ceil(
                sum(len(self.groups[i]) for i in order[r :: self.world]) / self.local_batch(r)
            )
            for r in range(self.world)
        )

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.world == 1:
            yield from self._stream(epoch)
            return
        limit = self.steps(epoch) if self.equal_steps else None
        for k, batch in enumerate(self._stream(epoch)):
            if limit is not None and k >= limit:
                return
            yield batch

    def _stream(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng, order = self._order(epoch)
        if not self.by_chunks:
            for x, y in self._batches(order, self.batch_size, rng):
                if len(x) >= self.world or not self.equal_steps:
                    yield x[self.rank :: self.world], y[self.rank :: self.world]
            return
        yield from self._batches(order[self.rank :: self.world], self.local_batch(), rng)

    def _batches(
        self, order: list[int], batch_size: int, rng: np.random.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        carry_x = carry_y = None
        for start in range(0, len(order), self.buffer_chunks):
            parts = [
                self.source.read_indices(self.groups[i])
                for i in order[start : start + self.buffer_chunks]
            ]
            x = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            if carry_x is not None:
                x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
            if self.shuffle:
                perm = rng.permutation(len(x))
                x, y = x[perm], y[perm]
            last = start + self.buffer_chunks >= len(order)
            n_full = len(x) if last else (len(x) // batch_size) * batch_size
            for b in range(0, n_full, batch_size):
                yield (
                    torch.from_numpy(x[b : b + batch_size]),
                    torch.from_numpy(y[b : b + batch_size]),
                )
            carry_x, carry_y = x[n_full:], y[n_full:]
