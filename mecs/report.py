"""The demo's report: what ran, with which settings, and what came out.

Every figure in ``report.md`` is read from the files the stages wrote
(``evaluation/metrics.json``, ``forecasts/service.json``, the models'
``config.json``), so the report and the metrics cannot disagree.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def training_curves(models: Path, out: Path) -> Path:
    """Pretraining (per epoch) and fine-tuning (per iteration) validation losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = json.loads((models / "1" / "config.json").read_text())["training"]["history"]
    fin = json.loads((models / "2" / "config.json").read_text())["training"]["history"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    epochs = [h["epoch"] for h in pre if "train_loss" in h]
    axes[0].plot(epochs, [h["train_loss"] for h in pre if "train_loss" in h], label="train")
    axes[0].plot([h["epoch"] for h in pre], [h["val_loss"] for h in pre], label="validation")
    axes[0].set(title="offline pretraining", xlabel="epoch", ylabel="MSE (normalised target)")
    axes[0].legend()
    axes[1].plot([h["iteration"] for h in fin], [h["val_loss"] for h in fin], marker="o")
    axes[1].set(
        title="online fine-tuning", xlabel="iteration", ylabel="a posteriori MSE / clim. var."
    )
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, plan: Any, cfg: Any, timings: dict[str, float]) -> Path:
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    service = json.loads((out / "forecasts" / "service.json").read_text())
    models = out / "models" / "l96"
    online_cfg = json.loads((models / "2" / "config.json").read_text())
    emu_cfg = json.loads((out / "emulator" / "config.json").read_text())
    curves = training_curves(models, out / "evaluation")
    f = metrics["forecasts"]
    leads = ["0.2", "1.0", "2.0"]
    lines = [
        "# mecs demo report",
        "",
        f"Benchmark `{cfg.preset}` ({'quick' if plan.quick else 'default'} size): two-scale "
        f"Lorenz-96 truth (K={cfg.K}, J={cfg.J}, F={cfg.F}, c={cfg.c}), one-scale host "
        f"(dt={cfg.dt_host}), {cfg.analysis} analyses every {cfg.obs_interval} MTU with "
        f"observation noise {cfg.obs_sigma}, {cfg.duration:g} MTU stored, test period from "
        f"{cfg.test_start:g} MTU, seed {cfg.seed}.",
        "",
        "## Forecast skill",
        "",
        f"{metrics['n_inits']} forecasts from test-period analyses, RMSE of X against the "
        f"truth; valid time = first lead where RMSE / climatological std "
        f"({metrics['clim_std']:.2f}) exceeds {metrics['valid_threshold']}, averaged over "
        "forecasts. Gap closed = (valid time - none) / (limit - none).",
        "",
        "| forecast | valid time (MTU) | gap closed | "
        + " | ".join(f"RMSE @ {t}" for t in leads)
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in leads) + " |",
    ]
    for label, row in f.items():
        cells = [_fmt(row["rmse_at"].get(t)) for t in leads]
        lines.append(
            f"| {label} | {row['valid_time']:.2f} | {_fmt(row['gap_closed'], 2)} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "`none`: the uncorrected host; `poly3`: cubic polynomial of local X fitted to the "
        "increments; `offline`: the pretrained network (version 1); `online`: fine-tuned "
        f"({online_cfg['training']['mode']} mode, version 2); `limit`: the two-scale truth "
        "model started from the analysis X and the true Y.",
        "",
        "![RMSE vs lead](evaluation/rmse_vs_lead.png)",
        "",
        "![Hovmoller](evaluation/hovmoller.png)",
        "",
    ]
    free = metrics.get("free_run")
    if free:
        t = free["truth"]
        lines += [
            "## Free-run climate",
            "",
            f"{free['length']:g}-MTU runs from one analysis; truth statistics from the stored "
            "truth trajectory.",
            "",
            "| run | bounded | mean | std | mean error | std error | PDF Hellinger | ACF(0.25) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| truth | yes | {t['mean']:.3f} | {t['std']:.3f} | | | | "
            f"{_fmt(t['acf'].get('0.25'))} |",
        ]
        for label, s in free.items():
            if label in ("truth", "bins", "length") or not isinstance(s, dict):
                continue
            lines.append(
                f"| {label} | {'yes' if s['bounded'] else 'no (' + _fmt(s['length'], 1) + ')'} | "
                f"{s['mean']:.3f} | {s['std']:.3f} | {100 * s['mean_rel_err']:.1f} % | "
                f"{100 * s['std_rel_err']:.1f} % | {_fmt(s['pdf_hellinger'])} | "
                f"{_fmt(s['acf'].get('0.25'))} |"
            )
        lines += ["", "![Climate PDFs](evaluation/climate_pdf.png)", ""]
    lines += _gate_section(out, service)
    lines += _monitoring_section(out)
    lines += [
        "## Coupled forecasts through the service",
        "",
        f"`mecs serve` ran as a separate process at {service['url']}; `mecs forecast` stepped "
        f"the host {plan.forecast_steps} times, asking the service for the correction at "
        "every step (binary Open Inference Protocol, one batched request per step for the "
        "whole ensemble).",
        "",
        "| run | members | figures |",
        "| --- | --- | --- |",
    ]
    for label in ("single", "ensemble"):
        figs = service.get(label, {})
        shown = ", ".join(f"{k} {_fmt(v, 1)}" for k, v in figs.items() if k != "members")
        lines.append(f"| {label} | {figs.get('members', '')} | {shown} |")
    lines += [
        "",
        f"Requests counted by the service: {service.get('requests_total', 0):.0f} "
        f"(infer: {service.get('infer_requests', 0):.0f}).",
        "",
        "## Training",
        "",
        f"Emulator: one-step RMSE {emu_cfg['metrics']['one_step_rmse']:.4f}, 10-step "
        f"{emu_cfg['metrics']['ten_step_rmse']:.4f} against the host (host one-step change "
        f"{emu_cfg['metrics']['host_one_step_change_rms']:.3f}).",
        "",
        f"![Training curves](evaluation/{curves.name})",
        "",
        "## Stage timings",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        f"| total | {sum(timings.values()):.1f} |",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.html").write_text(markdown_to_html("\n".join(lines)))
    return path


def markdown_to_html(text: str) -> str:
    """Just enough Markdown (headings, tables, images, paragraphs) for the report."""
    body, table = [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-", " "}]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            rest = "".join(
                "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:]
            )
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px}img{max-width:100%}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>mecs demo report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _gate_section(out: Path, service: dict[str, Any]) -> list[str]:
    """The promotion gate's decision: the fine-tuned version against the offline one."""
    path = out / "promotion.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    sc, rule = doc["scores"], doc["rule"]
    lines = [
        "## Promotion gate",
        "",
        f"`mecs promote` scored the fine-tuned version {doc['candidate']} (a candidate) "
        f"against production, version {doc['production']}, on {sc['n_inits']} hindcasts from "
        f"the held-out analyses (from {sc['held_out_start']}), against the analyses: mean RMSE "
        f"ratio {sc['ratio']:.3f}; rule: at most {1 - rule['margin']:.2f}, no field above "
        f"{1 + rule['tolerance']:.2f}, a free run of {rule['free_run_intervals']} analysis "
        f"intervals within {rule['bound_std']:g} std. Decision: **{doc['decision']}**.",
        "",
        "| lead (analysis intervals) | candidate RMSE | production RMSE | none RMSE | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for _, e in sc["fields"].items():
        none = e.get("none_rmse") or [None] * len(rule["leads"])
        for i, lead in enumerate(rule["leads"]):
            if len(rule["leads"]) > 6 and lead % 5 and lead != rule["leads"][-1]:
                continue
            lines.append(
                f"| {lead} | {_fmt(e['candidate_rmse'][i])} | {_fmt(e['production_rmse'][i])} | "
                f"{_fmt(none[i])} | {_fmt(e['ratio_by_lead'][i])} |"
            )
    served = sorted(
        {v for k in ("single", "ensemble") for v in service.get(k, {}).get("served_versions", [])}
    )
    lines += [
        "",
        *[f"- {r}" for r in doc.get("reasons", [])],
        "",
        f"The service then answered with version(s) {served} (production).",
        "",
    ]
    return lines


def _monitoring_section(out: Path) -> list[str]:
    """What mecs monitor found in the service's records, against the prediction."""
    path = out / "monitoring.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    pred = doc["predicted"]
    matched = doc["samples"] - doc["unmatched"]
    lines = [
        "## Live skill monitoring",
        "",
        f"The service recorded every answer (`MECS_RECORD_DIR`); a cycling client sent each "
        f"held-out analysis with its valid time. `mecs monitor` matched {matched}"
        f" of {doc['samples']} recorded samples with the next analysis and scored the served "
        "corrections: increment reduction = 1 - RMS(analysis - corrected forecast) / "
        "RMS(analysis - uncorrected forecast) over one analysis window. The prediction is "
        f"the same figure for version {pred['version']} on the increment store's "
        f"validation split (the held-out period before the monitored one), +- the spread "
        "over 10 time blocks; `offline, same period` is the store's test split, the "
        "monitored period computed offline, which the served path must reproduce. "
        f"Out-of-distribution rate of the recorded samples: {doc['ood_rate']:.4f}.",
        "",
        "| version | stage | field | samples | monitored reduction | predicted | within spread "
        "| offline, same period |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for version, v in doc["versions"].items():
        for f, e in v["fields"].items():
            p = pred["fields"].get(f, {})
            red, want, spread = (
                e["increment_reduction"],
                p.get("increment_reduction"),
                p.get("spread"),
            )
            within = "n/a" if want is None else ("yes" if abs(red - want) <= spread else "no")
            same = (pred.get("same_period_offline") or {}).get(f, {}).get("increment_reduction")
            lines.append(
                f"| {version} | {v['stage']} | {f} | {v['scored']} | {red:.4f} | "
                f"{_fmt(want, 4)} +- {_fmt(spread, 4)} | {within} | {_fmt(same, 4)} |"
            )
    return [*lines, ""]
