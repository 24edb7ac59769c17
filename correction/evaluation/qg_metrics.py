"""Metrics of the two-layer QG benchmarks: skill by lead, spectra, energy, distributions.

What Ross et al. (2023) compare low-resolution runs with the high-resolution truth
by, on the host grid (the truth coarse-grained to it):

- RMSE and anomaly correlation (ACC, against the truth's time-mean) of forecasts by
  lead time and layer;
- isotropic kinetic-energy and enstrophy spectra, and their error as the RMS of
  ``log10(model / truth)`` over wavenumbers below two thirds of the grid's Nyquist
  wavenumber (a ratio, so that the energetic large scales do not drown the rest);
- energy-budget terms: kinetic energy per layer, available potential energy, the
  bottom drag's dissipation rate;
- distributional distances of long free runs: the 1-D Wasserstein distance between
  the model's and the truth's values of ``q``, ``u``, ``v``, kinetic energy and
  enstrophy density per layer, each divided by the truth's standard deviation so
  that the quantities can be averaged;
- stability: a free run that leaves the finite numbers, or whose energy drifts
  beyond ``drift_factor`` times the truth's, is reported as such, not dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..corrections import Correction
from ..hosts.qg import TwoLayerQG


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def rmse_acc_by_lead(
    forecasts: np.ndarray, truth: np.ndarray, climatology: np.ndarray
) -> dict[str, np.ndarray]:
    """``forecasts`` and ``truth`` ``[init, lead, 2, n, n]``; ``climatology`` ``[2, n, n]``.

    Returns ``rmse`` and ``acc`` ``[lead, 2]`` (averaged over initial times)."""
    err = forecasts - truth
    rmse = np.sqrt((err**2).mean(axis=(0, 3, 4)))
    fa, ta = forecasts - climatology, truth - climatology
    num = (fa * ta).sum(axis=(-2, -1))
    den = np.sqrt((fa**2).sum(axis=(-2, -1)) * (ta**2).sum(axis=(-2, -1)))
    acc = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan).mean(axis=0)
    return {"rmse": rmse, "acc": acc}


def isotropic_spectra(host: TwoLayerQG, q: np.ndarray) -> dict[str, np.ndarray]:
    """Time-mean isotropic KE and enstrophy spectra of ``q`` ``[N, 2, n, n]`` per layer."""
    x = _t(q)
    ops = host.ops()
    qh = torch.fft.rfft2(x)
    ph = host.invert(qh, ops)
    k2 = ops["k2"]
    n = host.nx
    weight = torch.full_like(k2, 2.0)  # rfft: columns 1..n/2-1 stand for two modes
    weight[:, 0] = 1.0
    weight[:, -1] = 1.0
    norm = 1.0 / n**4
    ke = (0.5 * k2 * ph.abs() ** 2 * weight * norm).mean(0)
    ens = (0.5 * qh.abs() ** 2 * weight * norm).mean(0)
    dk = 2 * math.pi / host.L
    kbin = torch.round(torch.sqrt(k2) / dk).long()
    nbins = n // 2
    out_ke = np.zeros((2, nbins))
    out_ens = np.zeros((2, nbins))
    for b in range(1, nbins):
        m = kbin == b
        out_ke[:, b] = ke[:, m].sum(-1).numpy()
        out_ens[:, b] = ens[:, m].sum(-1).numpy()
    return {"k": np.arange(nbins) * dk, "ke": out_ke, "enstrophy": out_ens}


def spectral_error(model: np.ndarray, truth: np.ndarray) -> float:
    """RMS of ``log10(model / truth)`` over wavenumber bins 1 .. 2/3 of Nyquist, both layers."""
    nbins = truth.shape[-1]
    sl = slice(1, max(2, int(round(2 * nbins / 3))))
    a, b = model[..., sl], truth[..., sl]
    ok = (a > 0) & (b > 0)
    if not ok.all():
        return float("inf")
    return float(np.sqrt(np.mean(np.log10(a / b) ** 2)))


def energy_budget(host: TwoLayerQG, q: np.ndarray) -> dict[str, float]:
    """Time-mean energy terms of ``q`` ``[N, 2, n, n]`` (m^2/s^2, and m^2/s^3 for rates)."""
    x = _t(q)
    ke = host.kinetic_energy(x).mean(0)
    w1, w2 = host.layer_weights
    psi = host.streamfunction(x)
    ape = 0.5 * host.F1 * w1 * ((psi[:, 0] - psi[:, 1]) ** 2).mean()
    return {
        "ke_upper": float(ke[0]),
        "ke_lower": float(ke[1]),
        "ape": float(ape),
        "total": float(w1 * ke[0] + w2 * ke[1] + ape),
        "drag_dissipation": float(2 * host.rek * w2 * ke[1]),
    }


def energy_transfer_spectrum(
    host: TwoLayerQG, q: np.ndarray, tendency: np.ndarray, chunk: int = 64
) -> np.ndarray:
    """Time-mean rate at which ``tendency`` changes the total energy, per wavenumber bin.

    The flow's energy is ``E = -1/2 sum_i w_i <psi_i q_i>`` (kinetic plus available
    potential), so a PV tendency ``T`` changes it at ``-sum_i w_i Re(conj(psi_i) T_i)``
    per Fourier mode. For the nonlinear advection this is the spectral energy flux
    (it moves energy between scales and sums to zero); for a correction it says at
    which scales the correction injects or removes energy, which is where a learned
    closure that blows up goes wrong (backscatter at the grid scale). ``[nbins]``,
    in energy units per unit time of ``tendency``.
    """
    ops = host.ops()
    w1, w2 = host.layer_weights
    lw = torch.tensor([w1, w2], dtype=torch.float64).reshape(1, 2, 1, 1)
    n = host.nx
    k2 = ops["k2"]
    weight = torch.full_like(k2, 2.0)
    weight[:, 0] = 1.0
    weight[:, -1] = 1.0
    total = torch.zeros_like(k2)
    for lo in range(0, len(q), chunk):
        ph = host.invert(torch.fft.rfft2(_t(q[lo : lo + chunk])), ops)
        th = torch.fft.rfft2(_t(tendency[lo : lo + chunk]))
        total += (-(lw * (ph.conj() * th).real).sum(1) * weight / n**4).sum(0)
    total /= max(len(q), 1)
    dk = 2 * math.pi / host.L
    kbin = torch.round(torch.sqrt(k2) / dk).long()
    nbins = n // 2
    out = np.zeros(nbins)
    for b in range(1, nbins):
        out[b] = float(total[kbin == b].sum())
    return out


def advection_tendency(host: TwoLayerQG, q: np.ndarray, chunk: int = 64) -> np.ndarray:
    """``-J(psi, q)`` of every state (the nonlinear term alone), in 1/s per second."""
    with torch.inference_mode():
        parts = [host.jacobian_tendency(_t(q[lo : lo + chunk])) for lo in range(0, len(q), chunk)]
    return torch.cat(parts).numpy()


def subgrid_forcing(
    host: TwoLayerQG, truth: np.ndarray, per: int, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The coarse-grained truth's forcing the host misses: ``(states, forcing)``.

    ``(truth[t+1] - host^per(truth[t])) / (per dt)`` at the given starts, per host
    time unit: what a perfect correction would add (the target of training).
    """
    x0 = _t(truth[starts])
    with torch.inference_mode():
        x = x0
        for _ in range(per):
            x = host.step(x)
    forcing = (_t(truth[starts + 1]) - x) / (per * host.dt)
    return x0.numpy(), forcing.numpy()


def transfer_error(model: np.ndarray, truth: np.ndarray) -> float:
    """``|model - truth| / |truth|`` over wavenumber bins 1 .. 2/3 of Nyquist."""
    sl = slice(1, max(2, int(round(2 * len(truth) / 3))))
    den = float(np.linalg.norm(truth[sl]))
    return float(np.linalg.norm(model[sl] - truth[sl]) / den) if den > 0 else float("inf")


def _quantities(host: TwoLayerQG, q: np.ndarray) -> dict[str, np.ndarray]:
    x = _t(q)
    u, v = host.velocities(x)
    ops = host.ops()
    s = x.shape[-2:]
    zeta = torch.fft.irfft2(-ops["k2"] * host.invert(torch.fft.rfft2(x), ops), s=s)
    return {
        "q": x.numpy(),
        "u": u.numpy(),
        "v": v.numpy(),
        "ke": (0.5 * (u**2 + v**2)).numpy(),
        "enstrophy": (0.5 * zeta**2).numpy(),
    }


def wasserstein_1d(a: np.ndarray, b: np.ndarray, quantiles: int = 2000) -> float:
    """The 1-D Wasserstein (earth mover's) distance of two samples, from their quantiles."""
    p = (np.arange(quantiles) + 0.5) / quantiles
    return float(np.mean(np.abs(np.quantile(a.ravel(), p) - np.quantile(b.ravel(), p))))


def distribution_distances(host: TwoLayerQG, model: np.ndarray, truth: np.ndarray) -> dict:
    """Normalised Wasserstein distances per quantity and layer, and their mean."""
    qm, qt = _quantities(host, model), _quantities(host, truth)
    out: dict[str, float] = {}
    for name in qt:
        for layer in (0, 1):
            a, b = qm[name][:, layer], qt[name][:, layer]
            scale = float(b.std()) or 1.0
            out[f"{name}{layer + 1}"] = wasserstein_1d(a, b) / scale
    out["mean"] = float(np.mean(list(out.values())))
    return out


def free_run(
    host: TwoLayerQG,
    correction: Correction | None,
    x0: np.ndarray,
    steps: int,
    every: int,
) -> tuple[np.ndarray, int | None]:
    """Run ``x_{n+1} = host(x_n) + dt c(x_n)`` from ``x0`` ``[B, 2, n, n]``; keep every
    ``every``-th state. Returns the kept states ``[K, B, 2, n, n]`` and the first step
    that left the finite numbers (``None`` if none); a run that blows up stops there."""
    x = _t(x0)
    kept = []
    with torch.inference_mode():
        for i in range(1, steps + 1):
            nxt = host.step(x)
            if correction is not None:
                nxt = nxt + host.dt * correction.tendency(x).to(torch.float64)
            x = nxt
            if not torch.isfinite(x).all():
                return (np.stack(kept) if kept else np.empty((0, *x0.shape))), i
            if i % every == 0:
                kept.append(x.numpy().copy())
    return np.stack(kept), None


def stability(
    host: TwoLayerQG,
    run: np.ndarray,
    blew_up_at: int | None,
    truth_energy: float,
    drift_factor: float = 3.0,
) -> dict[str, Any]:
    """``stable`` / ``blew up at step N`` / ``drifted`` (energy beyond ``drift_factor``x)."""
    if blew_up_at is not None:
        return {"status": f"blew up at step {blew_up_at}", "stable": False}
    energy = energy_budget(host, run.reshape(-1, *run.shape[-3:]))["total"]
    ratio = energy / truth_energy if truth_energy > 0 else float("inf")
    drifted = not (1 / drift_factor <= ratio <= drift_factor)
    return {
        "status": "drifted" if drifted else "stable",
        "stable": not drifted,
        "energy_ratio": ratio,
    }


__all__ = [
    "distribution_distances",
    "energy_budget",
    "free_run",
    "isotropic_spectra",
    "rmse_acc_by_lead",
    "spectral_error",
    "stability",
    "wasserstein_1d",
]
