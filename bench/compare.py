"""Old commit against new, interleaved: ``bench/service.py`` run alternately on both trees.

Usage: ``python bench/compare.py --baseline REF [--pairs 2] [-- service.py args]``.
``REF`` is a git revision (checked out into a temporary worktree) or a directory
holding another checkout. This checkout's ``bench/service.py`` measures both
(``--tree``), so only the code under test differs. The two trees take turns
(old, new, old, new, ...) so that both see the same machine; the report gives each
figure's median over the runs and the ratio new / old, and is written to
``bench/results/compare.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (path in service.json's results, lower is better)
FIGURES = {
    "single_call.http_binary.p50_us": True,
    "single_call.http_binary.p99_us": True,
    "single_call.http_floor_health_live.p50_us": True,
    "single_call.client_cpu_us_per_call": True,
    "one_request_40_members.requests_per_s": False,
    "callers_40_batched.requests_per_s": False,
    "callers_40_unbatched.requests_per_s": False,
    "callers_40_batched_torchscript.requests_per_s": False,
    "callers_40_unbatched_torchscript.requests_per_s": False,
    "state_4mb.binary.round_trip_ms": True,
}


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


@contextlib.contextmanager
def baseline_tree(ref: str, tmp: Path) -> Iterator[Path]:
    """``ref`` as a checkout: the directory itself, or a temporary git worktree of the revision."""
    if Path(ref).is_dir():
        yield Path(ref)
        return
    worktree = tmp / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(worktree), ref],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield worktree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)


def _run(tree: Path, out: Path, extra: list[str]) -> dict:
    # this tree's bench script measures both trees: the same measuring code for each
    script = ROOT / "bench" / "service.py"
    cmd = [sys.executable, str(script), "--tree", str(tree), "--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=tree, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision or checkout directory")
    parser.add_argument("--pairs", type=int, default=2, help="old/new runs each")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare.json"))
    parser.add_argument("extra", nargs="*", help="arguments for bench/service.py (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, baseline_tree(args.baseline, Path(tmp)) as old:
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for i in range(args.pairs):
            for label, tree in (("old", old), ("new", ROOT)):
                out = Path(tmp) / f"{label}-{i}.json"
                runs[label].append(_run(tree, out, args.extra))
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    table = {}
    for figure, lower_better in FIGURES.items():
        vals = {k: [_get(r, figure) for r in v] for k, v in runs.items()}
        if any(x is None for xs in vals.values() for x in xs):
            continue
        o, n = statistics.median(vals["old"]), statistics.median(vals["new"])
        table[figure] = {
            "old": vals["old"],
            "new": vals["new"],
            "median_old": o,
            "median_new": n,
            "new_over_old": round(n / o, 3) if o else None,
            "new_not_worse_5pct": (n <= 1.05 * o) if lower_better else (n >= 0.95 * o),
        }
        print(f"{figure:50s} old {o:10.1f}  new {n:10.1f}  new/old {n / o:6.3f}")
    report = {"bench": "compare", "baseline": args.baseline, "new": rev, "figures": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
