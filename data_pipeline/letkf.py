"""Local ensemble transform Kalman filter (Hunt, Kostelich and Szunyogh 2007).

Cycled with the *host* model, so analyses carry the host's bias the way an
operational analysis carries its model's. With N=20 members and K=36 variables a
global ETKF collapses here; localization in observation space (each grid point
sees the observations weighted by a Gaussian of their distance, R-localization)
keeps the rank problem away. All local analyses run at once as a batch of K small
N x N eigen-decompositions.
"""

from __future__ import annotations

import numpy as np


def periodic_distance(n: int) -> np.ndarray:
    """Grid-point distances on a ring of ``n`` points, ``[n, n]``."""
    i = np.arange(n)
    d = np.abs(i[:, None] - i[None, :])
    return np.minimum(d, n - d).astype(np.float64)


def gaussian_localization(n: int, radius: float) -> np.ndarray:
    """Observation weights ``rho[k, j] = exp(-d(k, j)^2 / (2 radius^2))``."""
    d = periodic_distance(n)
    return np.exp(-0.5 * (d / radius) ** 2)


def letkf_update(
    ensemble: np.ndarray,
    obs: np.ndarray,
    obs_sigma: float,
    localization: np.ndarray,
    inflation: float,
) -> np.ndarray:
    """Analysis ensemble from a background ensemble and a full observation of X.

    Args:
        ensemble: background members ``[N, K]``.
        obs: observations of every grid point ``[K]`` (H = identity).
        obs_sigma: observation error standard deviation.
        localization: ``[K, K]`` weights of observation j at grid point k.
        inflation: multiplicative inflation of the background perturbations
            (covariance times ``inflation**2``, applied in ensemble space), as DAPPER
            and most LETKF codes define it.

    Returns:
        Analysis members ``[N, K]``.
    """
    n = ensemble.shape[0]
    mean = ensemble.mean(axis=0)
    pert = ensemble - mean  # [N, K]; with H = I the observed perturbations are the same
    rinv = localization / obs_sigma**2  # [K grid, K obs]
    innovation = obs - mean
    # A_k = (N-1)/rho^2 I + Y'^T R_k^-1 Y' for every grid point k: [K, N, N]
    a = np.einsum("nj,kj,mj->knm", pert, rinv, pert)
    a += ((n - 1) / inflation**2) * np.eye(n)
    evals, evecs = np.linalg.eigh(a)
    pa = np.einsum("kna,ka,kma->knm", evecs, 1.0 / evals, evecs)
    wa = np.einsum("kna,ka,kma->knm", evecs, np.sqrt((n - 1) / evals), evecs)
    b = np.einsum("nj,kj,j->kn", pert, rinv, innovation)
    wmean = np.einsum("knm,km->kn", pa, b)
    weights = wa + wmean[:, :, None]  # [K, N(pert), N(member)]
    return mean[None, :] + np.einsum("nk,kni->ik", pert, weights)
