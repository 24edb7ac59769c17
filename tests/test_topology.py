"""The compose topology as processes on 127.0.0.1, with the commands read from
``docker-compose.yml``.

No container engine runs here, so each service's command line is taken from the
compose file (``entrypoint`` + ``command``, or the image's ``ENTRYPOINT`` from
``deploy/Dockerfile``), its ``${...}`` references are interpolated the way compose
does, from ``.env.example`` with this test's own values on top (loopback addresses,
free ports, temporary directories in place of the volumes, tiny training sizes), and
the result runs as a process with the service's environment. The chain:

    api (empty repository: not ready) + dask scheduler + worker
    -> synth -> pipeline on that scheduler -> pretrain (v1: the api becomes ready)
    -> emulator -> trainer (v2, a candidate; the gate promotes it; the api swaps to it)
    -> forecast through the api
    -> Prometheus's scrape of /metrics -> SIGTERM to every long-running role

Each role runs in its own process group; after SIGTERM to the main process (what
``docker stop`` does through the container's init) the group must be empty within
the timeout, so no role leaves a stray process behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from support import metric_value

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

STOP_TIMEOUT_S = 20.0
# A role stopped by SIGTERM exits 0 or, after its graceful shutdown, re-raises the
# signal (uvicorn does): docker reports that as 143, the normal result of `docker stop`.
CLEAN_EXIT = {0, -signal.SIGTERM, 128 + signal.SIGTERM}

# ---------------------------------------------------------------------------
# compose interpolation

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class InterpolationError(ValueError):
    pass


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``
    (unset or empty), ``${VAR-default}`` (unset), ``${VAR:?err}``, ``${VAR?err}``,
    ``${VAR:+alt}``, ``${VAR+alt}``; defaults may themselves hold references."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end, depth = i + 2, 1
            while end < len(text) and depth:
                if text.startswith("${", end):
                    depth, end = depth + 1, end + 2
                    continue
                if text[end] == "}":
                    depth -= 1
                end += 1
            if depth:
                raise InterpolationError(f"unterminated '${{' in {text!r}")
            out.append(_expand(text[i + 2 : end - 1], variables, text))
            i = end
        else:
            m = _NAME.match(text, i + 1)
            if not m:
                raise InterpolationError(f"invalid '$' in {text!r} (write '$$' for a literal)")
            out.append(variables.get(m.group(), ""))
            i = m.end()
    return "".join(out)


def _expand(body: str, variables: dict[str, str], text: str) -> str:
    m = _NAME.match(body)
    if not m:
        raise InterpolationError(f"invalid variable name in {text!r}")
    name, rest = m.group(), body[m.end() :]
    value = variables.get(name)
    if rest == "":
        return value or ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            break
    else:
        raise InterpolationError(f"unsupported substitution '${{{body}}}' in {text!r}")
    unset, empty = value is None, not value
    if op in (":-", "-"):
        use_default = empty if op == ":-" else unset
        return interpolate(arg, variables) if use_default else value
    if op in (":?", "?"):
        if empty if op == ":?" else unset:
            raise InterpolationError(f"required variable {name}: {arg or 'missing'}")
        return value
    present = not empty if op == ":+" else not unset
    return interpolate(arg, variables) if present else ""


def test_interpolation_rules():
    v = {"A": "a", "E": ""}
    assert interpolate("x$${A}y", v) == "x${A}y"
    assert interpolate("$A/${A}", v) == "a/a"
    assert interpolate("${E:-d} ${E-d} ${U-d} ${U:-d}", v) == "d  d d"
    assert interpolate("${A:-${U:-deep}} ${U:-${A}/x}", v) == "a a/x"
    assert interpolate("${A:+set} ${E+set} ${U+set}", v) == "set set "
    with pytest.raises(InterpolationError, match="U"):
        interpolate("${U:?needed}", v)
    for bad in ("${", "${A", "$-", "${1A}", "${A:=x}"):
        with pytest.raises(InterpolationError):
            interpolate(bad, v)


# ---------------------------------------------------------------------------
# the compose file and the image, read as compose and docker would


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one stage of the Dockerfile, continuations joined."""
    logical, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for entry in logical:
        word, _, args = entry.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), args.strip()))
    return stages[1:][stage]


def image_exec_form(instruction: str) -> list[str]:
    """An exec-form (JSON) ENTRYPOINT/CMD/HEALTHCHECK CMD of the runtime stage."""
    for word, args in dockerfile_instructions():
        if word == instruction:
            if instruction == "HEALTHCHECK":
                args = args[args.index("CMD") + 3 :]
            return json.loads(args)
    raise AssertionError(f"deploy/Dockerfile has no {instruction}")


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    env.pop("PATH", None)  # the venv's place in the image; the test has its own
    return env


def read_env_example() -> dict[str, str]:
    from mecs.settings import read_env_file

    return read_env_file(ENV_EXAMPLE)


def _as_list(value, variables: dict[str, str]) -> list[str]:
    if isinstance(value, str):
        return shlex.split(interpolate(value, variables))
    return [interpolate(str(v), variables) for v in value]


def service_argv(service: dict, variables: dict[str, str]) -> list[str]:
    """entrypoint + command as docker runs them (a compose entrypoint drops the image CMD)."""
    if "entrypoint" in service:
        return _as_list(service["entrypoint"], variables) + _as_list(
            service.get("command", []), variables
        )
    command = service.get("command", image_exec_form("CMD"))
    return image_exec_form("ENTRYPOINT") + _as_list(command, variables)


def service_env(service: dict, variables: dict[str, str]) -> dict[str, str]:
    """The image's ENV, then the env file (our variables), then ``environment``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MECS_", "DEPLOY_", "OMP_"))}
    env.update(image_env())
    env["PATH"] = os.pathsep.join(
        [str(ROOT / "deploy" / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    files = service.get("env_file", [])
    for entry in [files] if isinstance(files, str | dict) else files:
        path = entry["path"] if isinstance(entry, dict) else entry
        assert path == ".env", f"unexpected env file {path}"
        env.update({k: v for k, v in variables.items() if k.startswith("MECS_")})
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: interpolate(str(v), variables) for k, v in environment.items()})
    return env


# ---------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Role:
    """One compose service as a process (its own process group), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv = name, argv
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=logs,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pgid = self.proc.pid

    def log(self, tail: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not finish in {timeout:.0f} s:\n{self.log()}"
            ) from None
        self._log.close()
        return rc

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - a reused id owned by someone else
            return False
        return True

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int | None, bool]:
        """SIGTERM to the main process; (exit status, group empty) after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        rc = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = self.proc.wait(timeout)
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        clean = rc in CLEAN_EXIT and not self.group_alive()
        if not clean:
            self.kill()
        self._log.close()
        return rc, clean

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def wait_for(what: str, check, timeout: float, role: Role | None = None, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if role is not None and role.proc.poll() is not None:
            raise AssertionError(
                f"{role.name} exited ({role.proc.returncode}) while waiting "
                f"for {what}:\n{role.log()}"
            )
        if time.monotonic() > deadline:
            tail = f":\n{role.log()}" if role is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(every)


def http_get(url: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def test_stop_finds_a_stray_process(tmp_path):
    """A role whose main process exits on SIGTERM but leaves a child is not clean."""
    env = dict(os.environ)
    tidy = Role("tidy", ["sleep", "30"], env, tmp_path)
    messy = Role("messy", ["sh", "-c", "sleep 30 & wait"], env, tmp_path)
    time.sleep(0.3)
    assert tidy.stop(5) == (-signal.SIGTERM, True)
    rc, clean = messy.stop(1)
    assert rc == -signal.SIGTERM and not clean  # the orphaned sleep was found (and killed)


# ---------------------------------------------------------------------------
# the topology


@pytest.fixture
def topology(tmp_path):
    """Variables for a run on 127.0.0.1: .env.example, then this test's values."""
    data, models, secrets_dir = tmp_path / "data", tmp_path / "models", tmp_path / "secrets"
    for d in (data, models, secrets_dir, tmp_path / "logs"):
        d.mkdir()
    inference_key, admin_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys_file = secrets_dir / "api_keys.json"
    digest = lambda k: "sha256:" + hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    keys_file.write_text(
        json.dumps({"inference": [digest(inference_key)], "admin": [digest(admin_key)]})
    )
    keys_file.chmod(0o600)
    api_port, scheduler_port = free_port(), free_port()
    variables = read_env_example()
    variables.update(
        {
            # the api on loopback, its secret, a quick repository scan
            "MECS_REPOSITORY": str(models),
            "MECS_HOST": "127.0.0.1",
            "MECS_PORT": str(api_port),
            "MECS_API_KEYS_FILE": str(keys_file),
            "MECS_POLL_INTERVAL_S": "0.5",
            "MECS_LOG_LEVEL": "warning",
            # the volumes: temporary directories
            "MECS_SYNTH_DIR": str(data / "synth"),
            "MECS_ANALYSES": str(data / "synth" / "analyses.zarr"),
            "MECS_FORECASTS": str(data / "synth" / "forecasts_archive.zarr"),
            "MECS_INCREMENTS": str(data / "increments.zarr"),
            "MECS_EMULATOR": str(data / "emulator"),
            "MECS_FORECAST_OUT": str(data / "forecast.zarr"),
            # dask on loopback
            "DEPLOY_SCHEDULER_HOST": "127.0.0.1",
            "DEPLOY_SCHEDULER_PORT": str(scheduler_port),
            "MECS_SCHEDULER": f"tcp://127.0.0.1:{scheduler_port}",
            # tiny sizes: the whole chain in well under two minutes on 2 cores
            "MECS_SYNTH_DURATION": "40",
            "MECS_PRETRAIN_EPOCHS": "3",
            "MECS_EMULATOR_EPOCHS": "1",
            "MECS_FINETUNE_ITERATIONS": "10",
            "MECS_TRAIN_INTERVAL_S": "0",
            # ten iterations on a tiny benchmark: the gate runs for real, with a rule
            # lenient enough that the candidate is promoted and the api swaps to it
            "MECS_PROMOTE_MARGIN": "-0.5",
            "MECS_PROMOTE_TOLERANCE": "0.5",
            "MECS_PROMOTE_FREE_RUN": "20",
            # the training roles under torchrun with 2 processes (gloo), as a centre runs them
            "MECS_TRAIN_PROCESSES": "2",
            "MECS_TRAIN_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
            "MECS_FORECAST_STEPS": "40",
            "MECS_FORECAST_MEMBERS": "4",
            # the client
            "MECS_SERVICE_URL": f"http://127.0.0.1:{api_port}",
            "MECS_API_KEY": inference_key,
        }
    )
    return {
        "vars": variables,
        "logs": tmp_path / "logs",
        "admin_key": admin_key,
        "url": f"http://127.0.0.1:{api_port}",
    }


def test_compose_topology_on_loopback(topology):
    compose = load_compose()
    services = compose["services"]
    variables, logs, url = topology["vars"], topology["logs"], topology["url"]
    model = variables["MECS_MODEL_NAME"]
    key = variables["MECS_API_KEY"]
    running: list[Role] = []
    timings: dict[str, float] = {}
    t_start = time.monotonic()

    def start(name: str) -> Role:
        svc = services[name]
        role = Role(name, service_argv(svc, variables), service_env(svc, variables), logs)
        running.append(role)
        return role

    def job(name: str, timeout: float = 120.0) -> str:
        t = time.monotonic()
        role = Role(
            name,
            service_argv(services[name], variables),
            service_env(services[name], variables),
            logs,
        )
        rc = role.wait(timeout)
        timings[name] = time.monotonic() - t
        assert rc == 0, f"{name} exited with {rc}:\n{role.log()}"
        return role.log_path.read_text()

    def healthcheck(kind: str) -> int:
        if kind == "compose":
            test = services["api"]["healthcheck"]["test"]
            assert test[0] == "CMD", test
            argv = [interpolate(str(a), variables) for a in test[1:]]
        else:
            argv = image_exec_form("HEALTHCHECK")
        env = service_env(services["api"], variables)
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    def served_version() -> str | None:
        status, body = http_get(f"{url}/v2/models/{model}/ready", key)
        return json.loads(body)["version"] if status == 200 else None

    try:
        # the default profile: the api, on an empty model repository
        api = start("api")
        wait_for("the api to be live", lambda: http_get(f"{url}/v2/health/live")[0] == 200, 60, api)
        assert http_get(f"{url}/v2/health/ready")[0] == 503
        assert healthcheck("compose") != 0, "healthy without a model"

        # the pipeline profile: scheduler and one worker
        scheduler = start("scheduler")
        worker = start("worker")
        job("synth")
        wait_for("the worker to register", lambda: "Registered to" in worker.log(10**6), 60, worker)
        out = job("pipeline")
        assert "increments: wrote" in out, out
        assert "Receive client connection" in scheduler.log(10**6), "the pipeline bypassed dask"
        from data_pipeline.increments import open_increments

        assert open_increments(variables["MECS_INCREMENTS"]).sizes["sample"] > 0
        for role in (worker, scheduler):  # done with dask: stop it as compose stop would
            rc, clean = role.stop()
            running.remove(role)
            assert clean, f"{role.name} did not stop cleanly (rc {rc}):\n{role.log()}"

        # bootstrap: the first version; the api finds it and becomes healthy
        job("pretrain")
        assert wait_for("the api to serve v1", served_version, 30, api) == "1"
        assert healthcheck("compose") == 0 and healthcheck("image") == 0
        job("emulator")

        # the trainer fine-tunes once and publishes v2; the api swaps it in
        out = job("trainer")
        assert out.count("finetune: published") == 1, out  # rank 0 alone publishes
        v2 = Path(variables["MECS_REPOSITORY"]) / model / "2" / "config.json"
        assert json.loads(v2.read_text())["training"]["world_size"] == 2
        # then the gate: scored against v1 on held-out analyses, promoted, recorded
        assert "promote: v2 is production" in out, out
        book = json.loads((v2.parent.parent / "stages.json").read_text())
        assert book["stages"] == {"1": "retired", "2": "production"}
        assert book["records"][-1]["decision"] == "promoted" and book["records"][-1]["scores"]
        wait_for("the api to serve v2", lambda: served_version() == "2", 30, api)

        # a coupled forecast through the api, with the client key
        job("forecast")
        from correction.storage import open_zarr

        fc = open_zarr(variables["MECS_FORECAST_OUT"])
        members, steps = (
            int(variables["MECS_FORECAST_MEMBERS"]),
            int(variables["MECS_FORECAST_STEPS"]),
        )
        assert fc["X"].shape == (members, steps + 1, 36)
        assert set(int(v) for v in fc["model_version"].values[1:]) == {2}
        assert list(fc.attrs["model_versions"]) == [2]
        assert fc.attrs["degraded_steps"] == 0

        # what Prometheus scrapes (its config's path; the api's address here)
        scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"][0]
        status, body = http_get(url + scrape.get("metrics_path", "/metrics"))
        assert status == 200
        text = body.decode()
        assert metric_value(text, "mecs_model_version_served", model="l96") == 2, text[:2000]
        assert re.search(r"mecs_inference_requests_total\{[^}]*\} [1-9]", text)

        rc, clean = api.stop()
        running.remove(api)
        assert clean, f"api did not stop cleanly (rc {rc}):\n{api.log()}"
    finally:
        for role in running:
            role.stop(5)
    total = time.monotonic() - t_start
    print(f"topology: {total:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
