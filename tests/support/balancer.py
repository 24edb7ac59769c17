"""The shipped nginx configuration (``deploy/nginx/mecs.conf``) run on 127.0.0.1.

The file is used as it is, except for two lines that name compose's network: the
``server api-replica:8000 ...`` line becomes one line per local replica (same
parameters), and ``listen 8080`` a loopback port. A small main configuration around
it keeps every path (pid, logs, temporary bodies) in the test's directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "mecs.conf"
_SERVER = re.compile(r"^(\s*)server\s+api-replica:8000(\s[^;]*)?;", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*)listen\s+8080\s*;", re.MULTILINE)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(upstreams: list[str], port: int, text: str | None = None) -> str:
    """The shipped server block with local ``host:port`` upstreams and a loopback port."""
    text = NGINX_CONF.read_text() if text is None else text
    match = _SERVER.search(text)
    if match is None or not _LISTEN.search(text):
        raise ValueError(f"{NGINX_CONF} has no 'server api-replica:8000' or 'listen 8080' line")
    indent, params = match.group(1), match.group(2) or ""
    servers = "\n".join(f"{indent}server {u}{params};" for u in upstreams)
    text = _SERVER.sub(lambda _: servers, text, count=1)
    return _LISTEN.sub(lambda m: f"{m.group(1)}listen 127.0.0.1:{port};", text, count=1)


class NginxProcess:
    """nginx in the foreground with the rendered configuration; ``url`` is its address."""

    def __init__(self, upstreams: list[str], directory: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        temp = self.dir / "temp"
        temp.mkdir(exist_ok=True)
        temp.chmod(0o777)  # nginx's workers drop root; they write request bodies here
        self.port = free_port()
        (self.dir / "mecs.conf").write_text(render(upstreams, self.port))
        (self.dir / "nginx.conf").write_text(
            "daemon off;\n"
            "worker_processes 2;\n"
            f"pid {self.dir}/nginx.pid;\n"
            f"error_log {self.dir}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            "    access_log off;\n"
            + "".join(
                f"    {kind}_temp_path {temp}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"    include {self.dir}/mecs.conf;\n"
            "}\n"
        )
        self.check()
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode()}")
            time.sleep(0.05)
        self.close()
        raise RuntimeError("nginx did not start listening")

    def check(self) -> None:
        """``nginx -t`` on the configuration (raises with nginx's message)."""
        out = subprocess.run(
            [nginx_binary(), "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{out.stderr}")

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGQUIT)  # graceful: finish open requests
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def __enter__(self) -> NginxProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
