"""Skill-gated promotion and live monitoring, measured on the quick demo.

``python bench/promotion.py`` runs ``mecs demo --quick`` (its gate scores the
fine-tuned candidate against the offline version; its monitoring stage scores the
served corrections against the analyses and the validation split's prediction),
then, on the demo's repository:

- a candidate trained on shuffled targets (the store's targets permuted within each
  split: it learns the mean increment, nothing of the state), through ``mecs
  promote``: the worse candidate, which must be refused;
- 40 concurrent callers on a real server while a new candidate is published, then
  promoted and rolled back: failed calls, what answered, and whether the candidate
  ever answered a caller that did not name it.

Writes ``bench/results/promotion.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from bench.common import write  # noqa: E402
from correction import stages  # noqa: E402
from correction.storage import open_zarr, write_zarr  # noqa: E402
from correction.training.pretrain import PretrainConfig, pretrain  # noqa: E402
from data_pipeline.increments.base import MARKER  # noqa: E402


def shuffled_targets(store: Path, out: Path) -> Path:
    ds = open_zarr(store).load()
    rng, split = np.random.default_rng(0), ds["split"].values
    perm = np.arange(ds.sizes["sample"])
    for name in np.unique(split):
        idx = np.flatnonzero(split == name)
        perm[idx] = rng.permutation(idx)
    for v in [v for v in ds.data_vars if v.startswith(("target_", "increment_"))]:
        ds[v].values[...] = ds[v].values[perm]
    ds.attrs["content_hash"] = "shuffled-" + str(ds.attrs.get("content_hash"))
    write_zarr(ds, out)
    (out / "stats.json").write_bytes((store / "stats.json").read_bytes())
    (out / MARKER).write_text(ds.attrs["content_hash"])
    return out


def mecs(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "mecs", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout


def callers(repo: Path, n: int = 40) -> dict:
    """n callers while v_new is published (candidate), promoted, rolled back."""
    from service.client import CorrectionClient
    from service.server import ServerThread
    from service.settings import ServiceSettings

    settings = ServiceSettings(repository=repo, port=0, poll_interval_s=0.05, allow_anonymous=True)
    server = ServerThread(settings).start()
    x = np.random.default_rng(3).normal(2.5, 3.6, (2, 36))
    stop, errors, seen, phase = threading.Event(), [], [], ["before"]

    def call():
        with CorrectionClient(server.url, "l96", retries=0) as c:
            while not stop.is_set():
                before = phase[0]
                try:
                    r = c.infer(x)
                    seen.append((r.model_version, r.parameters["model_stage"], before))
                except Exception as err:  # counted
                    errors.append(repr(err))

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    prod = stages.read(repo, "l96").production(sorted(stages.read(repo, "l96").stages))
    cand = max(stages.read(repo, "l96").stages)
    time.sleep(1.0)
    with stages.editing(repo, "l96") as book:  # what a winning mecs promote writes
        before = stages.set_production(book, cand)
        book.records.append(stages.record(cand, "promoted", before, reason="bench"))
    phase[0] = "promoted"
    time.sleep(1.5)
    mecs("promote", "--repository", str(repo), "--name", "l96", "--rollback")
    phase[0] = "rolled back"
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    server.stop()
    before_calls = [s for s in seen if s[2] == "before"]
    return {
        "callers": n,
        "calls": len(seen),
        "failed": len(errors),
        "answered_by": sorted({f"v{v} {st}" for v, st, _ in seen}),
        "candidate_answered_unpinned": sum(v == cand for v, _, _ in before_calls),
        "production": prod,
        "candidate": cand,
    }


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="mecs-bench-promotion-")) / "demo"
    t0 = time.perf_counter()
    code, _ = mecs("demo", "--quick", "--out", str(out))
    if code:
        raise SystemExit(f"mecs demo failed ({code})")
    demo_s = time.perf_counter() - t0
    gate = json.loads((out / "promotion.json").read_text())
    mon = json.loads((out / "monitoring.json").read_text())
    repo = out / "models"
    bad = shuffled_targets(out / "increments.zarr", out / "shuffled.zarr")
    cfg = json.loads((repo / "l96" / "1" / "config.json").read_text())["training"]["settings"]
    cfg = {**cfg, "seed": 7}
    worse = pretrain(bad, repo, "l96", PretrainConfig.from_dict(cfg), progress=False).version
    code, text = mecs(
        *("promote", "--repository", str(repo), "--name", "l96", "--version"),
        str(worse.version),
        *("--data", str(out / "synth"), "--host", "l96", "--free-run", "100"),
        *("--intervals", "20", "--init-every", "4", "--out", str(out / "worse.json")),
    )
    worse_doc = json.loads((out / "worse.json").read_text())
    load = callers(repo)
    served = mon["versions"]
    report = {
        "demo_wall_s": round(demo_s, 1),
        "gate_demo": {
            "candidate": gate["candidate"],
            "production": gate["production"],
            "ratio": gate["scores"]["ratio"],
            "decision": gate["decision"],
        },
        "gate_shuffled_targets": {
            "candidate": worse.version,
            "ratio": worse_doc["scores"]["ratio"],
            "decision": "promoted" if code == 0 else "refused" if code == 3 else f"exit {code}",
        },
        "monitoring": {
            "samples": mon["samples"],
            "matched": mon["samples"] - mon["unmatched"],
            "served": {v: e["fields"] for v, e in served.items()},
            "predicted_val_split": mon["predicted"]["fields"],
            "offline_same_period": mon["predicted"]["same_period_offline"],
            "ood_rate": mon["ood_rate"],
        },
        "swaps_under_load": load,
        "records": [
            {k: r.get(k) for k in ("version", "decision", "previous_production")}
            for r in stages.read(repo, "l96").records
        ],
    }
    write("promotion", report)
    print(json.dumps({k: v for k, v in report.items() if k != "records"}, indent=1))


if __name__ == "__main__":
    main()
