"""Host specs and the ``process:`` host over ``mecs-step/1``: equal to in-process, faults named."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from correction.hosts import Lorenz96, integrate
from correction.hosts.process import HostProcessError, ProcessHost
from correction.hosts.specs import HostSpecError, make_host_from_spec, parse_host_spec

REFERENCE = f"{sys.executable} -m correction.reference_host"
RNG = np.random.default_rng(5)


def test_specs_parse_and_name_what_is_wrong():
    assert str(parse_host_spec("l96")) == "torch:l96"
    assert parse_host_spec("process:./model --fast").target == "./model --fast"
    assert parse_host_spec("python:pkg.mod:step").kind == "python"
    assert not parse_host_spec("archive:/data/fc.zarr").live
    for bad, msg in [
        ("fortran:x", "unknown kind"),
        ("torch:nope", "no registered torch host"),
        ("python:mod", "python:MODULE:CALLABLE"),
        ("process:", "nothing after"),
    ]:
        with pytest.raises(HostSpecError, match=msg):
            parse_host_spec(bad)
    with pytest.raises(HostSpecError, match="not a live model"):
        make_host_from_spec("archive:/data/fc.zarr")
    with pytest.raises(HostSpecError, match="needs the state shape"):
        make_host_from_spec("python:numpy:negative")


def test_process_host_equals_the_torch_host():
    x0 = RNG.normal(2.5, 3.6, (4, 36))
    with ProcessHost(f"{REFERENCE} --F 8 --dt 0.01", state_shape=(36,)) as host:
        assert host.state_shape == (36,) and host.dt == 0.01 and not host.differentiable
        got = integrate(host, x0, 25)
        assert host.steps == 25
        # tensors too, under no_grad, as the training loops call it
        with torch.no_grad():
            t = host.step(torch.from_numpy(x0))
    want = integrate(Lorenz96(K=36, F=8.0, dt=0.01), x0, 25)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t.numpy(), integrate(Lorenz96(F=8.0), x0, 1), rtol=1e-12)


def test_python_host_spec_steps_a_callable():
    host = make_host_from_spec(
        "python:correction.reference_host:l96_step_default", state_shape=(36,), dt=0.01
    )
    x0 = RNG.normal(2.5, 3.6, (2, 36))
    np.testing.assert_allclose(
        integrate(host, x0, 3), integrate(Lorenz96(F=10.0), x0, 3), rtol=1e-12
    )


@pytest.mark.parametrize(
    "fault, message",
    [
        ("--crash-at 3", "exited before sending its answer at step 3 (exit status 3)"),
        ("--hang-at 2", "did not answer within 2 s (its answer); killed it at step 2"),
        ("--wrong-shape-at 4", "answered shape [2, 35] FP64 for a state of shape [2, 36]"),
        ("--nan-at 2", "answered NaN or Inf (members [0, 1]) at step 2"),
        ("--error-at 1", "refused the step: cannot step: fault switch at step 1"),
    ],
)
def test_process_host_faults_are_named_with_their_step(fault, message):
    host = ProcessHost(f"{REFERENCE} {fault}", timeout_s=2, state_shape=(36,))
    x = RNG.normal(2.5, 3.6, (2, 36))
    t0 = time.monotonic()
    with pytest.raises(HostProcessError) as err:
        for _ in range(10):
            x = host.step(x)
    assert message in str(err.value), str(err.value)
    assert time.monotonic() - t0 < 10
    if "crash" in fault:
        assert "crashing at step 3 as asked" in str(err.value)  # its stderr is quoted
    with pytest.raises(HostProcessError, match="not running"):
        host.step(x)


def test_process_host_start_up_faults():
    with pytest.raises(HostProcessError, match="has state shape \\[36\\], but the model expects"):
        ProcessHost(REFERENCE, state_shape=(40,))
    with pytest.raises(HostProcessError, match="cannot start host process"):
        ProcessHost("/nonexistent/model")
    with pytest.raises(HostProcessError, match="exited before sending its hello message"):
        ProcessHost(f"{sys.executable} -c 'import sys; sys.exit(4)'")
    with pytest.raises(HostProcessError, match="broke the protocol"):
        ProcessHost(f"{sys.executable} -c 'print(\"hello there\")'")


@pytest.mark.parametrize(
    "fault, message",
    [
        (None, None),
        ("--crash-at 4", "exited before sending its answer at step 4"),
        ("--hang-at 4", "did not answer within 2 s"),
        ("--nan-at 4", "answered NaN or Inf"),
        ("--wrong-shape-at 4", ", 35] FP64 for a state of shape"),
    ],
)
def test_finetune_unrolled_through_a_process_host(
    tiny_synth, l96_repository, tmp_path, capsys, fault, message
):
    """The host from the settings file; a failing host publishes nothing, within the timeout."""
    import json

    from correction import artifacts
    from mecs.cli import main

    spec = f"process:{REFERENCE}" + (f" {fault}" if fault else "")
    config = tmp_path / "finetune.json"
    config.write_text(json.dumps({"host": spec, "host_timeout": 2, "iterations": 3}))
    args = [
        "finetune",
        "--mode",
        "unrolled",
        "--repository",
        str(l96_repository),
        "--name",
        "l96",
        "--data",
        str(tiny_synth),
        "--config",
        str(config),
        "--unroll",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    t0 = time.monotonic()
    code = main(args)
    err = capsys.readouterr().err.strip()
    if fault is None:
        assert code == 0, err
        assert artifacts.list_versions(l96_repository, "l96") == [1, 2]
        config = artifacts.read_config(l96_repository / "l96" / "2")
        assert config["training"]["host_spec"] == spec
        assert config["training"]["host"] == "l96-reference"
    else:
        assert code == 1 and message in err and "\n" not in err, err
        assert time.monotonic() - t0 < 30
        assert artifacts.list_versions(l96_repository, "l96") == [1]  # nothing published
        assert [p.name for p in (l96_repository / "l96").iterdir() if p.name.startswith(".")] == []


def test_step_requests_name_the_channels(tmp_path):
    """``fields`` travels with every step; a host can check the order it is given."""
    script = tmp_path / "echo_host.py"
    script.write_text(
        "import sys, json\n"
        "from correction.stepproto import *\n"
        "write_message(sys.stdout.buffer, {'protocol': PROTOCOL, 'state_shape': [2], 'dt': 1})\n"
        "line = sys.stdin.buffer.readline()\n"
        "h = parse_header(line, 'req')\n"
        "x = read_tensor(sys.stdin.buffer, *tensor_spec(h, 'req'))\n"
        "ok = h.get('fields') == ['a', 'b']\n"
        "msg = {'id': h['id'], 'shape': h['shape'], 'datatype': h['datatype']} if ok else "
        "{'id': h['id'], 'error': 'channels ' + str(h.get('fields'))}\n"
        "write_message(sys.stdout.buffer, msg, x if ok else None)\n"
    )
    with ProcessHost([sys.executable, str(script)], fields=["a", "b"]) as host:
        np.testing.assert_array_equal(host.step(np.ones((1, 2))), 1.0)
    with (
        ProcessHost([sys.executable, str(script)], fields=["b", "a"]) as host,
        pytest.raises(HostProcessError, match="refused the step: channels"),
    ):
        host.step(np.ones((1, 2)))
