"""The QG benchmark's evaluation of a set of corrections, and its plots.

One function for the demo's report and ``bench/qg.py``'s table: every correction
(the uncorrected host, the Smagorinsky baseline, learned versions) is run as
forecasts from the test period's analyses and as free runs, and scored with
:mod:`correction.evaluation.qg_metrics` against the coarse-grained truth.
Corrections are evaluated raw (no magnitude cap), so that an unstable model shows
as unstable instead of being held in check by the service's guardrails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..corrections import Correction, ZeroCorrection
from . import qg_metrics as m

LEADS_H = (24, 120, 240, 720)


def evaluate_corrections(
    synth_dir: Path,
    cfg: Any,
    corrections: dict[str, Correction],
    free_days: float = 180.0,
    free_members: int = 2,
    forecast_inits: int = 8,
    keep: bool = False,
    log=print,
) -> dict[str, Any]:
    """Scores of each correction; ``keep`` adds the free runs' last states for plots."""
    from data_pipeline.qg import QGBenchmark

    from ..storage import open_zarr

    host = QGBenchmark(cfg).host()
    truth_ds = open_zarr(Path(synth_dir) / "truth.zarr")
    truth = truth_ds["q"].values.astype(np.float64)
    times = truth_ds["time"].values
    ana = open_zarr(Path(synth_dir) / "analyses.zarr")["q"].values.astype(np.float64)
    first = int(np.searchsorted(times, cfg.test_start))
    per = cfg.steps(cfg.obs_interval, "obs_interval")
    n_lead = cfg.cycles(cfg.forecast_lead_max, "forecast_lead_max")
    stride = cfg.cycles(cfg.forecast_init_every, "forecast_init_every")
    inits = np.arange(first, len(times) - n_lead, stride)[:forecast_inits]
    if not len(inits):
        raise ValueError("the test period is shorter than forecast_lead_max: no forecasts")
    clim = truth.mean(axis=0)
    daily = truth[:: max(1, round(24 / cfg.obs_interval))]
    truth_spec = m.isotropic_spectra(host, daily)
    truth_energy = m.energy_budget(host, daily)
    # the energy budget by scale: the nonlinear flux of the truth, and the energy its
    # subgrid forcing (what a perfect correction adds) brings to each scale
    truth_flux = m.energy_transfer_spectrum(host, daily, m.advection_tendency(host, daily))
    pick = np.unique(np.linspace(0, max(first, 2) - 2, 128).astype(int))
    f_states, forcing = m.subgrid_forcing(host, truth, per, pick)
    truth_forcing = m.energy_transfer_spectrum(host, f_states, forcing)
    free_steps = max(24, int(free_days * 24 / cfg.dt))
    results: dict[str, Any] = {}
    for label, corr in corrections.items():
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        kept, blew = m.free_run(host, corr, ana[inits], n_lead * per, per)
        if blew is None:
            fc = np.concatenate([ana[inits][:, None], kept.transpose(1, 0, 2, 3, 4)], axis=1)
            tv = np.stack([truth[i : i + n_lead + 1] for i in inits])
            skill = m.rmse_acc_by_lead(fc, tv, clim)
            row["rmse_by_lead"] = skill["rmse"].tolist()
            row["acc_by_lead"] = skill["acc"].tolist()
            for lead in LEADS_H:
                j = int(round(lead / cfg.obs_interval))
                if j <= n_lead:
                    row[f"rmse_{lead}h"] = skill["rmse"][j].tolist()
                    row[f"acc_{lead}h"] = skill["acc"][j].tolist()
        else:
            row["forecasts"] = f"blew up at step {blew}"
        run, blew = m.free_run(host, corr, ana[inits[:free_members]], free_steps, 24)
        row["free_run"] = m.stability(host, run, blew, truth_energy["total"])
        if blew is None and len(run):
            tail = run[len(run) // 2 :].reshape(-1, *run.shape[-3:])
            spec = m.isotropic_spectra(host, tail)
            row["ke_spectral_error"] = m.spectral_error(spec["ke"], truth_spec["ke"])
            row["enstrophy_spectral_error"] = m.spectral_error(
                spec["enstrophy"], truth_spec["enstrophy"]
            )
            row["energy"] = m.energy_budget(host, tail)
            flux = m.energy_transfer_spectrum(host, tail, m.advection_tendency(host, tail))
            row["energy_flux_error"] = m.transfer_error(flux, truth_flux)
            if corr is not None and not isinstance(corr, ZeroCorrection):
                with torch.inference_mode():
                    c = np.concatenate(
                        [
                            corr.tendency(torch.from_numpy(tail[lo : lo + 64])).double().numpy()
                            for lo in range(0, len(tail), 64)
                        ]
                    )
                injected = m.energy_transfer_spectrum(host, tail, c)
                row["correction_energy_error"] = m.transfer_error(injected, truth_forcing)
                row["correction_energy_rate"] = float(injected.sum())
            row["distribution"] = m.distribution_distances(host, tail, daily)
            if keep:
                row["_spectrum"] = spec["ke"].tolist()
                row["_last"] = run[-1, 0].tolist()
                row["_tail"] = tail
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        results[label] = row
        log(f"  {label}: {brief(row)}")
    none = results.get("none", {}).get("distribution", {}).get("mean")
    for row in results.values():
        d = row.get("distribution", {}).get("mean")
        if none and d is not None:
            row["similarity_to_truth"] = 1 - d / none
    results["_truth"] = {
        "energy": truth_energy,
        "energy_flux_spectrum": truth_flux.tolist(),
        "forcing_energy_spectrum": truth_forcing.tolist(),
        "forcing_energy_rate": float(truth_forcing.sum()),
        "spectrum": truth_spec["ke"].tolist(),
        "k": truth_spec["k"].tolist(),
        "last": truth[-1].tolist(),
        "daily": daily if keep else None,
        "leads_h": (np.arange(n_lead + 1) * cfg.obs_interval).tolist(),
    }
    return results


def brief(row: dict[str, Any]) -> str:
    parts = []
    if "rmse_120h" in row:
        parts.append(f"RMSE(5 d) {row['rmse_120h'][0]:.3g}")
    parts.append(f"free run {row['free_run']['status']}")
    if "distribution" in row:
        parts.append(f"distribution distance {row['distribution']['mean']:.3f}")
    if "ke_spectral_error" in row:
        parts.append(f"KE spectrum error {row['ke_spectral_error']:.3f}")
    return ", ".join(parts)


def write_qg_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """PV snapshots per layer, KE spectra, PDFs of upper-layer PV, RMSE by lead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    truth = results["_truth"]
    labels = [k for k in results if not k.startswith("_")]
    paths = []
    shown = ["truth", *[k for k in labels if "_last" in results[k]]]
    fig, axes = plt.subplots(2, len(shown), figsize=(2.4 * len(shown), 4.6), squeeze=False)
    for j, label in enumerate(shown):
        field = np.asarray(truth["last"] if label == "truth" else results[label]["_last"])
        for layer in (0, 1):
            ax = axes[layer, j]
            lim = float(np.abs(np.asarray(truth["last"])[layer]).max()) or 1.0
            ax.imshow(field[layer], cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(label, fontsize=8)
        axes[0, 0].set_ylabel("q, upper layer", fontsize=8)
        axes[1, 0].set_ylabel("q, lower layer", fontsize=8)
    fig.tight_layout()
    paths.append(out / "qg_snapshots.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    k = np.asarray(truth["k"])[1:]
    axes[0].loglog(k, np.asarray(truth["spectrum"])[0, 1:], "k", lw=2, label="truth")
    for label in labels:
        if "_spectrum" in results[label]:
            axes[0].loglog(k, np.asarray(results[label]["_spectrum"])[0, 1:], label=label)
    axes[0].set_xlabel("wavenumber (rad/m)")
    axes[0].set_title("KE spectrum, upper layer (free runs)")
    axes[0].legend(fontsize=7)
    if truth.get("daily") is not None:
        bins = np.linspace(*np.quantile(truth["daily"][:, 0], [0.001, 0.999]), 60)
        axes[1].hist(
            truth["daily"][:, 0].ravel(),
            bins,
            density=True,
            histtype="step",
            color="k",
            lw=2,
            label="truth",
        )
        for label in labels:
            if "_tail" in results[label]:
                axes[1].hist(
                    results[label]["_tail"][:, 0].ravel(),
                    bins,
                    density=True,
                    histtype="step",
                    label=label,
                )
        axes[1].set_yscale("log")
        axes[1].set_title("PDF of upper-layer q (free runs)")
    leads = np.asarray(truth["leads_h"]) / 24
    for label in labels:
        if "rmse_by_lead" in results[label]:
            axes[2].plot(leads, np.asarray(results[label]["rmse_by_lead"])[:, 0], label=label)
    axes[2].set_xlabel("lead (days)")
    axes[2].set_title("forecast RMSE, upper-layer q")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "qg_spectra_pdfs_rmse.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def results_table(results: dict[str, Any]) -> str:
    """A markdown table of one evaluation."""
    lines = [
        "| correction | RMSE q1, 1 d | RMSE q1, 5 d | ACC q1, 5 d | free run | "
        "KE spectrum error | distribution distance | similarity to truth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}"

    for label, r in results.items():
        if label.startswith("_"):
            continue
        lines.append(
            f"| {label} | {fmt((r.get('rmse_24h') or [None])[0])} | "
            f"{fmt((r.get('rmse_120h') or [None])[0])} | {fmt((r.get('acc_120h') or [None])[0])} "
            f"| {r['free_run']['status']} | {fmt(r.get('ke_spectral_error'))} | "
            f"{fmt(r.get('distribution', {}).get('mean'))} | {fmt(r.get('similarity_to_truth'))} |"
        )
    return "\n".join(lines)


__all__ = ["brief", "evaluate_corrections", "results_table", "write_qg_plots"]
