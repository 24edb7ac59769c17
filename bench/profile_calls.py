"""Python function calls per infer request, server and client, old tree against new.

Timings on a shared 2-core machine drift by tens of percent between runs (see
docs/service.md); the number of Python calls a request costs does not. This
script starts ``mecs serve`` from each tree under ``cProfile`` (switched on by a
signal after a warm-up, so start-up is not counted), sends the same single-state
binary calls with that tree's client, also profiled, and reports calls per
request for both and their ratio, with the functions whose counts changed.

Usage: ``python bench/profile_calls.py --baseline REF [--calls 2000]`` (``REF``: a
git revision or a checkout directory); writes ``bench/results/profile_calls.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from compare import baseline_tree  # noqa: E402  (the same old-tree checkout as compare.py)

# runs in a fresh interpreter with the tree first on sys.path
_MEASURE = r"""
import cProfile, json, os, pstats, re, signal, subprocess, sys, tempfile, time
from pathlib import Path
tree, calls = Path(sys.argv[1]), int(sys.argv[2])
sys.path[:0] = [str(tree), str(tree / "tests")]
import numpy as np
try:
    from support import make_l96_model
except ImportError:  # a tree from before tests/support/
    from conftest import make_l96_model
from correction.artifacts import publish
from service.client import CorrectionClient
x = np.random.default_rng(0).normal(2.5, 3.6, (1, 36)).astype(np.float32)
with tempfile.TemporaryDirectory() as tmp:
    repo = Path(tmp) / "models"
    publish(repo, "l96", *make_l96_model())
    prof = Path(tmp) / "server.prof"
    code = (
        "import cProfile, signal, sys\n"
        f"sys.argv = ['mecs', 'serve', '--repository', {str(repo)!r}, '--port', '0']\n"
        "from mecs.cli import main\n"
        "p = cProfile.Profile()\n"
        "signal.signal(signal.SIGUSR1, lambda *a: p.enable())\n"
        f"signal.signal(signal.SIGUSR2, lambda *a: (p.disable(), p.dump_stats({str(prof)!r})))\n"
        "main(sys.argv[1:])\n"
    )
    env = dict(os.environ, MECS_LOG_LEVEL="warning", PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tree,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = re.search(r"on (http://\S+) ", proc.stdout.readline()).group(1)
    client = CorrectionClient(url, "l96", timeout=60)
    for _ in range(300):
        client.infer(x)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    cp = cProfile.Profile()
    cp.enable()
    for _ in range(calls):
        client.infer(x)
    cp.disable()
    proc.send_signal(signal.SIGUSR2)
    for _ in range(100):
        if prof.exists():
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.terminate()
    proc.wait(30)
    def per_function(stats):
        out = {}
        for (f, _, fn), (_, nc, _, _, _) in stats.stats.items():
            key = f"{Path(f).name}:{fn}"
            out[key] = out.get(key, 0) + nc / calls
        return out
    server, client_stats = pstats.Stats(str(prof)), pstats.Stats(cp)
    print(json.dumps({
        "server_calls_per_request": round(server.total_calls / calls, 1),
        "client_calls_per_request": round(client_stats.total_calls / calls, 1),
        "server_functions": per_function(server),
    }))
"""


def measure(tree: Path, calls: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tree), str(calls)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision or checkout directory")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_calls.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, baseline_tree(args.baseline, Path(tmp)) as old:
        before, after = measure(old, args.calls), measure(ROOT, args.calls)
    a, b = before.pop("server_functions"), after.pop("server_functions")
    changed = {
        k: [round(a.get(k, 0), 1), round(b.get(k, 0), 1)]
        for k in sorted(set(a) | set(b))
        if abs(b.get(k, 0) - a.get(k, 0)) >= 0.5
    }
    report = {
        "bench": "profile_calls",
        "baseline": args.baseline,
        "calls": args.calls,
        "old": before,
        "new": after,
        "server_new_over_old": round(
            after["server_calls_per_request"] / before["server_calls_per_request"], 3
        ),
        "client_new_over_old": round(
            after["client_calls_per_request"] / before["client_calls_per_request"], 3
        ),
        "server_functions_changed_old_new": changed,
    }
    for k in ("server", "client"):
        o, n = before[f"{k}_calls_per_request"], after[f"{k}_calls_per_request"]
        print(f"{k} Python calls per request: old {o}  new {n}  new/old {n / o:.3f}")
    for k, (o, n) in changed.items():
        print(f"  {n - o:+6.1f}  {k}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
