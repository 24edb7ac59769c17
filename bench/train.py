"""Pretraining throughput: ``mecs pretrain``'s streamed loop against a bare torch loop.

Both train the same network with the same batch size and optimizer on the same
samples in the same process; the bare loop holds every sample in memory as one
tensor and does nothing else. Prints and writes ``bench/results/train.json`` with
samples/s of each and their ratio (target >= 0.8).

    python bench/train.py [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, prepare, summary, write  # noqa: E402

from correction.networks import CorrectionModel  # noqa: E402
from correction.training.data import IncrementSource  # noqa: E402
from correction.training.pretrain import PretrainConfig, pretrain  # noqa: E402


def bare_loop(source: IncrementSource, cfg: PretrainConfig, epochs: int) -> float:
    """Samples/s of the plainest loop over in-memory tensors."""
    x, y = source.read_indices(source.indices("train"))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    layout = source.layout
    torch.manual_seed(0)
    model = CorrectionModel(
        cfg.network, cfg.params, layout.channels, layout.channels, len(layout.horizontal_dims)
    )
    model.set_normalisation(*source.normalisation())
    yn = (y - model._expand(model.out_mean)) / model._expand(model.out_std)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for b in range(0, len(x), cfg.batch_size):
            i = perm[b : b + cfg.batch_size]
            loss = torch.mean((model.forward_normalised(x[i]) - yn[i]) ** 2)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    return epochs * len(x) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, inc, _ = prepare("l96-2s", "noisy-truth")
    source = IncrementSource.open(inc)
    cfg = PretrainConfig(max_epochs=args.epochs, early_stopping=10**6)
    ours, bare = [], []
    for r in range(args.repeats):  # interleaved, so machine noise hits both alike
        bare.append(bare_loop(source, cfg, args.epochs))
        repo = DATA / "models-train-bench"
        shutil.rmtree(repo, ignore_errors=True)
        res = pretrain(inc, repo, "m", cfg, progress=False)
        h = [e for e in res.history if "train_seconds" in e]
        ours.append(sum(e["samples"] for e in h) / sum(e["train_seconds"] for e in h))
        print(
            f"repeat {r}: pretrain {ours[-1]:.0f} samples/s, bare loop {bare[-1]:.0f} "
            f"samples/s, ratio {ours[-1] / bare[-1]:.3f}",
            flush=True,
        )
    ratio = [o / b for o, b in zip(ours, bare, strict=True)]
    write(
        "train",
        {
            "network": cfg.network,
            "params": cfg.params,
            "batch_size": cfg.batch_size,
            "train_samples": int(len(source.indices("train"))),
            "pretrain_samples_per_s": summary(ours),
            "bare_loop_samples_per_s": summary(bare),
            "ratio": summary(ratio),
            "target_ratio": 0.8,
        },
    )


if __name__ == "__main__":
    main()
