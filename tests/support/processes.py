"""``mecs serve`` in its own process, for tests where the process matters (memory, kills)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any


class ServeProcess:
    """``mecs serve --port PORT`` in a subprocess (0: a free port); ``url`` is read from its
    start-up line.

    ``env`` entries become ``MECS_<NAME>`` variables. The process's log (stderr)
    is kept in a file, so a test can read it after the run.
    """

    def __init__(self, repository: Path, log_path: Path, port: int = 0, **env: Any) -> None:
        environ = dict(os.environ, PYTHONUNBUFFERED="1")
        environ.update({f"MECS_{k.upper()}": str(v) for k, v in env.items()})
        self.log_path = Path(log_path)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mecs",
                "serve",
                "--repository",
                str(repository),
                "--port",
                str(port),
            ],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"on (https?://\S+) ", line)
        if not match:
            self.close()
            raise RuntimeError(f"mecs serve did not start: {line!r}\n{self.log()}")
        self.url = match.group(1)
        self.pid = self.proc.pid

    def status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` figure in bytes (``VmHWM``: peak resident memory)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
