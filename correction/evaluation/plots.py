"""PNG plots of an evaluation: RMSE against lead, a Hovmoller diagram, climate PDFs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .metrics import VALID_THRESHOLD


def write_plots(metrics: dict[str, Any], out: Path) -> list[Path]:
    """RMSE vs lead, a Hovmoller diagram and climate PDFs as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    leads = np.asarray(metrics["lead_times"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, f in metrics["forecasts"].items():
        ax.plot(
            leads,
            np.asarray(f["rmse"]) / metrics["clim_std"],
            label=f"{label} (valid {f['valid_time']:.2f})",
        )
    ax.axhline(VALID_THRESHOLD, color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="lead time (MTU)",
        ylabel="RMSE / climatological std",
        title=f"Forecast error over {metrics['n_inits']} test initial times",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "rmse_vs_lead.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    traj = metrics.get("_trajectories")
    if traj is not None:
        panels = ["truth", "none"] + [k for k in traj if k not in ("truth", "none", "limit")]
        fig, axes = plt.subplots(
            1, len(panels), figsize=(3.2 * len(panels), 3.6), sharey=True, layout="constrained"
        )
        vmax = float(np.nanmax(np.abs(traj["truth"])))
        for ax, label in zip(np.atleast_1d(axes), panels, strict=True):
            im = ax.pcolormesh(
                np.arange(1, traj[label].shape[1] + 1),
                leads,
                traj[label],
                cmap="RdBu_r",
                vmin=-vmax,
                vmax=vmax,
                shading="auto",
            )
            ax.set(title=label, xlabel="k")
        np.atleast_1d(axes)[0].set_ylabel("lead time (MTU)")
        fig.colorbar(im, ax=axes, shrink=0.8, label="X")
        paths.append(out / "hovmoller.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    free = metrics.get("free_run")
    if free is not None:
        bins = np.asarray(free["bins"])
        centres = 0.5 * (bins[1:] + bins[:-1])
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, s in free.items():
            if isinstance(s, dict) and "hist" in s:
                ax.plot(centres, s["hist"], label=label, lw=2.5 if label == "truth" else 1.2)
        ax.set(
            xlabel="X",
            ylabel="density",
            yscale="log",
            title=f"Climate PDFs, {free['length']:.0f}-MTU free runs",
        )
        ax.set_ylim(bottom=1e-4)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "climate_pdf.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
