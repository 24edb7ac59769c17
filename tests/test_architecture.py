"""The layers of docs/architecture.md hold, and the check that enforces them can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("correction", "data_pipeline", "service", "mecs", "bench")
MAX_LINES = 500


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run(
        [exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("correction/storage.py", "from data_pipeline import synth"),  # core -> pipeline
        ("data_pipeline/synth.py", "from correction.training import pretrain"),
        ("service/app.py", "from correction.training import finetune"),  # no training code
        ("service/client/transport.py", "import torch"),  # the client stays torch-free
    ],
)
def test_a_planted_violation_breaks_the_contracts(tmp_path, module, line):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {line}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "BROKEN" in result.stdout


def test_every_core_module_is_in_the_core_layer():
    """A new module under correction/ must be placed in a layer, or it escapes the check."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    core = {m.strip() for m in layers[-1].split(":")}
    upper = {"correction.training", "correction.evaluation"}
    found = {
        f"correction.{p.stem}"
        for p in (ROOT / "correction").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert found - upper == core, (sorted(found - upper - core), sorted(core - found))


def test_modules_stay_small_or_say_why():
    long = []
    for name in PACKAGES:
        for path in (ROOT / name).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > MAX_LINES and "longer than 500 lines because" not in text[:3000]:
                long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, long
