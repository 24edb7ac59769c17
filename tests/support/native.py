"""The C and Fortran clients, built once per test session with ``clients/build.sh``.

Where the compilers or libcurl's headers are missing the tests that need them skip
with the reason (``pytest -rs`` prints it; ``make test`` passes ``-rs``), and the
Python suite runs on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@dataclass(frozen=True)
class NativeBuild:
    """Paths of the installed client package and the example's programs."""

    prefix: Path
    example: Path

    @property
    def probe(self) -> Path:
        return self.prefix / "bin" / "mecs-probe"

    @property
    def forecast(self) -> Path:
        return self.example / "l96_forecast"

    @property
    def forecast_mpi(self) -> Path | None:
        path = self.example / "l96_forecast_mpi"
        return path if path.exists() and shutil.which("mpirun") else None

    @property
    def step_host(self) -> Path:
        return self.example / "l96_step_host"


def missing_tools() -> list[str]:
    return [t for t in ("cmake", "cc", "gfortran", "curl-config") if shutil.which(t) is None]


def build_native(build_dir: Path) -> NativeBuild:
    """Build, ctest and install the clients, then build the example against the install."""
    out = subprocess.run(
        ["bash", str(ROOT / "clients" / "build.sh"), str(build_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"clients/build.sh failed ({out.returncode}):\n{out.stderr[-4000:]}")
    prefix, example = out.stdout.strip().splitlines()[-1].split()
    return NativeBuild(Path(prefix), Path(example))


def mpi_env() -> dict[str, str]:
    """The environment for ``mpirun`` here: CI runs as root, which Open MPI refuses unless told."""
    return dict(os.environ, **MPI_ENV)
