"""An LETKF for the QG benchmarks: sparse observations, 2-D localization, the host cycled.

The option ``analysis = "letkf"`` of :class:`~data_pipeline.qg.QGBenchmarkConfig`:
the coarse-grained truth is observed on every ``obs_stride``-th point of the host
grid in both directions, in both layers, with Gaussian errors of ``obs_noise``
times each layer's standard deviation; an ensemble of ``letkf_members`` host runs
is cycled every ``obs_interval`` and updated by a local ensemble transform Kalman
filter (Hunt, Kostelich and Szunyogh 2007), as the l96 benchmark's
(:mod:`data_pipeline.letkf`). So the analyses carry the host's own error, as an
operational analysis carries its model's.

Localization is horizontal (observation-space, R-localization): a grid column
sees the observations of both layers within ``3.5 * letkf_localization`` host
grid points (periodic distance), weighted by a Gaussian of that distance. Both
layers of a column share their observations and weights, so one local analysis
serves a column: ``nx^2`` small ``N x N`` eigen-problems per cycle, batched.

Cost on one core of the 2-core machine, the published grid (64^2, stride 4, 512
observations, 20 members, radius 4 points, so about 90 observations per column):
about 0.3 s per cycle, most of it the batched eigen-decompositions, so 15-20 min
for the 2,920 cycles of two stored years, on top of the truth (docs/qg.md).
"""

from __future__ import annotations

import numpy as np
import torch

CUTOFF = 3.5  # localization radii beyond which an observation is not seen


def observation_indices(n: int, stride: int) -> np.ndarray:
    """Flat indices into ``[2, n, n]`` of the observed points, layer by layer."""
    y, x = np.meshgrid(np.arange(0, n, stride), np.arange(0, n, stride), indexing="ij")
    flat = (y * n + x).ravel()
    return np.concatenate([flat, n * n + flat])


def column_neighbours(n: int, stride: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """For each column ``[n*n]``: the observations it sees and their weights.

    Returns ``idx [n*n, P]`` (indices into the observation vector) and ``rho [n*n, P]``
    (Gaussian weights; zero where a column sees fewer than ``P`` observations).
    """
    oy, ox = np.meshgrid(np.arange(0, n, stride), np.arange(0, n, stride), indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    dy = np.abs(gy.ravel()[:, None] - oy[None, :])
    dx = np.abs(gx.ravel()[:, None] - ox[None, :])
    dy, dx = np.minimum(dy, n - dy), np.minimum(dx, n - dx)
    d = np.sqrt(dy**2 + dx**2)  # [columns, observed points of one layer]
    seen = d <= CUTOFF * radius
    p = int(seen.sum(axis=1).max())
    order = np.argsort(np.where(seen, d, np.inf), axis=1, kind="stable")[:, :p]
    dist = np.take_along_axis(d, order, axis=1)
    rho = np.where(dist <= CUTOFF * radius, np.exp(-0.5 * (dist / radius) ** 2), 0.0)
    m = len(oy)  # the same points in the lower layer follow those of the upper one
    return np.concatenate([order, order + m], axis=1), np.concatenate([rho, rho], axis=1)


def letkf_columns(
    ensemble: np.ndarray,
    obs: np.ndarray,
    obs_index: np.ndarray,
    obs_sigma: np.ndarray,
    idx: np.ndarray,
    rho: np.ndarray,
    inflation: float,
) -> np.ndarray:
    """Analysis members ``[N, 2, n, n]`` from background members of the same shape."""
    n_mem = ensemble.shape[0]
    flat = ensemble.reshape(n_mem, 2, -1)  # [N, lev, columns]
    mean = flat.mean(axis=0)
    pert = flat - mean
    hx = ensemble.reshape(n_mem, -1)[:, obs_index]  # [N, M]
    hmean = hx.mean(axis=0)
    yb = (hx - hmean)[:, idx]  # [N, C, P]
    w = rho / (obs_sigma[idx] ** 2)  # [C, P]
    d = (obs - hmean)[idx]  # [C, P]
    yw = yb * w[None]  # [N, C, P]
    a = np.einsum("ncp,mcp->cnm", yw, yb, optimize=True)
    a += ((n_mem - 1) / inflation**2) * np.eye(n_mem)
    evals, evecs = np.linalg.eigh(a)
    pa = np.einsum("cna,ca,cma->cnm", evecs, 1.0 / evals, evecs, optimize=True)
    wa = np.einsum("cna,ca,cma->cnm", evecs, np.sqrt((n_mem - 1) / evals), evecs, optimize=True)
    wmean = np.einsum("cnm,mcp,cp->cn", pa, yb, w * d, optimize=True)
    weights = wa + wmean[:, :, None]  # [C, N(pert), N(member)]
    out = mean[None] + np.einsum("nlc,cni->ilc", pert, weights, optimize=True)
    return out.reshape(ensemble.shape)


def run_qg_letkf(
    cfg, truth: np.ndarray, layer_std: np.ndarray, rng: np.random.Generator, progress: bool
) -> tuple[np.ndarray, dict]:
    """Analysis means ``[n_cycles + 1, 2, n, n]`` from observations of ``truth``.

    ``cfg`` is the benchmark's config, ``truth`` its coarse-grained truth at every
    analysis time and ``layer_std`` its per-layer standard deviation (the
    observation errors are ``obs_noise`` of it). The ensemble starts from
    ``letkf_members`` truth states drawn from the stored period (a climatology,
    not the truth of the first time). Returns the means and a summary (observation
    count, observations per column, seconds per cycle).
    """
    import time

    from tqdm.auto import tqdm

    from .qg import QGBenchmark

    n = cfg.host_nx
    host = QGBenchmark(cfg).host()
    obs_index = observation_indices(n, cfg.obs_stride)
    idx, rho = column_neighbours(n, cfg.obs_stride, cfg.letkf_localization)
    sigma_layer = cfg.obs_noise * layer_std.reshape(2)
    obs_sigma = np.repeat(sigma_layer, len(obs_index) // 2)
    per = cfg.steps(cfg.obs_interval, "obs_interval")
    pick = rng.choice(len(truth), size=cfg.letkf_members, replace=False)
    ens = truth[pick].copy()
    means = np.empty_like(truth)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(len(truth)), desc="letkf", disable=not progress, mininterval=1.0):
            if i > 0:
                x = torch.from_numpy(ens)
                for _ in range(per):
                    x = host.step(x)
                ens = x.numpy()
            obs = truth[i].reshape(-1)[obs_index] + obs_sigma * rng.standard_normal(len(obs_index))
            ens = letkf_columns(ens, obs, obs_index, obs_sigma, idx, rho, cfg.letkf_inflation)
            if not np.isfinite(ens).all():
                raise FloatingPointError(
                    f"the QG LETKF diverged at cycle {i} (time {i * cfg.obs_interval:g} h): "
                    "non-finite analysis; raise letkf_inflation or obs_noise"
                )
            means[i] = ens.mean(axis=0)
    info = {
        "observations": int(len(obs_index)),
        "observations_per_column": int((rho > 0).sum(axis=1).mean()),
        "seconds_per_cycle": (time.perf_counter() - t0) / len(truth),
    }
    return means, info
