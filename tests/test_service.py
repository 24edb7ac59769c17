"""The correction service in-process (TestClient): protocol, auth, validation, repository."""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import FakeCompute, make_batcher, make_l96_model, metric_value, service_settings

from correction.artifacts import publish
from correction.inference import Corrector
from service.app import create_app
from service.auth import Principal, require_admin
from service.batching import Traffic
from service.errors import ServiceError
from service.protocol import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    parse_infer_request,
)
from service.settings import SettingsError, load_settings

RNG = np.random.default_rng(0)
INFER = "/v2/models/l96/infer"


@pytest.fixture
def client(l96_repository):
    with TestClient(create_app(service_settings(l96_repository))) as c:
        yield c


def states(n=3, dtype=np.float64):
    return RNG.normal(2.5, 3.6, (n, 36)).astype(dtype)


def infer(client, x, binary=True, path=INFER, **kw):
    body, headers = encode_infer_request({"state": x}, binary=binary, **kw)
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 200, r.text
    header, arrays = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
    return header, arrays["correction"]


def test_server_metadata_health_and_docs(client):
    assert client.get("/v2").json()["extensions"] == [
        "binary_tensor_data",
        "model_repository",
        "mecs_guardrails",
    ]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    assert "application/octet-stream" in body["content"]
    assert "InferRequest" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_model_metadata(client):
    meta = client.get("/v2/models/l96").json()
    assert meta["name"] == "l96" and meta["version"] == "1" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "state", "datatype": "FP32", "shape": [-1, 36]}]
    assert meta["outputs"][0]["name"] == "correction"
    assert meta["parameters"]["variables"] == [{"name": "X", "dims": ["k"], "units": "1"}]
    assert meta["parameters"]["dims"] == ["batch", "k"]
    assert client.get("/v2/models/l96/versions/1").json()["version"] == "1"
    assert client.get("/v2/models/l96/ready").json()["ready"] is True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_in_process_corrector(client, l96_repository, dtype, binary):
    corr = Corrector.load(l96_repository, "l96")
    x = states(4, dtype)
    header, y = infer(client, x, binary=binary, request_id="r-1", parameters={"dt": 0.01})
    assert (header["model_name"], header["model_version"], header["id"]) == ("l96", "1", "r-1")
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, corr(x), rtol=1e-5, atol=1e-6)
    p = header["parameters"]
    assert p["out_of_distribution"] is False and p["capped_values"] == 0 and p["dt"] == 0.01


def test_binary_output_variants(client):
    x = states(2, np.float32)
    body, headers = encode_infer_request({"state": x}, binary=False, outputs=())
    payload = json.loads(body)
    payload.pop("outputs")
    payload["parameters"] = {"binary_data_output": True}  # what tritonclient sends by default
    r = client.post(INFER, json=payload)
    assert r.headers["content-type"] == "application/octet-stream"
    header, arrays = decode_infer_response(r.content, r.headers[HEADER_LENGTH])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    # JSON in, nested data (row-major lists) accepted
    payload = {
        "inputs": [{"name": "state", "datatype": "FP32", "shape": [2, 36], "data": x.tolist()}]
    }
    out = client.post(INFER, json=payload).json()["outputs"][0]
    np.testing.assert_allclose(np.reshape(out["data"], (2, 36)), arrays["correction"], rtol=1e-6)


def _keys_app(l96_repository, tmp_path, **extra):
    keys = tmp_path / "keys.json"
    digest = hashlib.sha256(b"hashed-admin").hexdigest()
    keys.write_text(json.dumps({"admin": [f"sha256:{digest}"]}))
    keys.chmod(0o600)
    settings = service_settings(
        l96_repository, inference_keys=["inf-key"], admin_keys=["adm"], api_keys_file=keys, **extra
    )
    return create_app(settings)


def test_auth_scopes(l96_repository, tmp_path):
    x = states(1)
    body, headers = encode_infer_request({"state": x})
    with TestClient(_keys_app(l96_repository, tmp_path)) as c:
        assert c.get("/v2/health/ready").status_code == 200  # probes need no key
        r = c.post(INFER, content=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "missing bearer" in r.json()["error"]
        bad = c.post(INFER, content=body, headers=headers | {"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"] == "invalid API key"
        basic = c.get("/v2/models/l96", headers={"Authorization": "Basic inf-key"})
        assert basic.status_code == 401
        inf = {"Authorization": "Bearer inf-key"}
        assert c.post(INFER, content=body, headers=headers | inf).status_code == 200
        assert c.get("/v2/models/l96", headers=inf).status_code == 200
        r = c.get("/v2/repository/index", headers=inf)
        assert r.status_code == 403 and "needs admin" in r.json()["error"]
        assert c.post("/v2/repository/models/l96/unload", headers=inf).status_code == 403
        for key in ("adm", "hashed-admin"):  # plain and sha256-stored admin keys
            adm = {"Authorization": f"bearer {key}"}
            assert c.get("/v2/repository/index", headers=adm).status_code == 200
            assert c.post(INFER, content=body, headers=headers | adm).status_code == 200
        assert c.get("/metrics").status_code == 200  # open by default
        assert (
            metric_value(c.get("/metrics").text, "mecs_auth_failures_total", reason="invalid") == 1
        )


def test_metrics_can_require_admin(l96_repository, tmp_path):
    with TestClient(_keys_app(l96_repository, tmp_path, metrics_require_auth=True)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer adm"}).status_code == 200


def test_dependency_overrides_stand_in_for_keys(l96_repository, tmp_path):
    app = _keys_app(l96_repository, tmp_path)
    app.dependency_overrides[require_admin] = lambda: Principal("admin")
    with TestClient(app) as c:
        assert c.get("/v2/repository/index").status_code == 200


def _binary(header: dict, payload: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + payload, {HEADER_LENGTH: str(len(text))}


def _state_json(shape=(1, 36), datatype="FP32", data=None, **kw):
    n = int(np.prod(shape))
    return {
        "inputs": [
            {
                "name": "state",
                "shape": list(shape),
                "datatype": datatype,
                "data": data if data is not None else [1.0] * n,
                **kw,
            }
        ]
    }


GOOD = np.ones((1, 36), "<f4").tobytes()
BAD_INPUTS = [
    ("shape", _state_json((1, 35)), 400, r"expects \[batch, 36\]"),
    ("rank", _state_json((1, 2, 18)), 400, r"expects \[batch, 36\]"),
    ("empty batch", _state_json((0, 36)), 400, "batch >= 1"),
    ("dtype", _state_json(datatype="INT32"), 400, "datatype 'INT32' is not supported"),
    ("nan", _state_json(data=[float("nan")] + [1.0] * 35), 400, "NaN or Inf"),
    ("strings", _state_json(data=["a"] * 36), 400, "numbers only"),
    ("ragged", _state_json(data=[[1.0], [1.0, 2.0]]), 400, "ragged"),
    ("count", _state_json(data=[1.0] * 35), 400, "needs 36 values"),
    ("no inputs", {"inputs": []}, 400, "non-empty list"),
    ("not a map", [1, 2], 400, "JSON object"),
    ("negative dim", _state_json((-1, 36)), 400, "non-negative integer"),
    (
        "input name",
        {"inputs": [{"name": "x", "shape": [1, 36], "datatype": "FP32", "data": [1.0] * 36}]},
        400,
        "unknown input 'x'",
    ),
    ("output name", _state_json() | {"outputs": [{"name": "y"}]}, 400, "unknown output 'y'"),
    ("dt", _state_json() | {"parameters": {"dt": -1}}, 400, "'dt' must be a positive"),
    ("id", _state_json() | {"id": 7}, 400, "'id' must be a string"),
    (
        "binary size",
        _binary(
            {
                "inputs": [
                    {
                        "name": "state",
                        "shape": [1, 36],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 100},
                    }
                ]
            },
            GOOD,
        ),
        400,
        "binary_data_size is 100",
    ),
    (
        "extra bytes",
        _binary(
            {
                "inputs": [
                    {
                        "name": "state",
                        "shape": [1, 36],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 144},
                    }
                ]
            },
            GOOD + b"x",
        ),
        400,
        "belong to no input",
    ),
    (
        "binary inf",
        _binary(
            {
                "inputs": [
                    {
                        "name": "state",
                        "shape": [1, 36],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 144},
                    }
                ]
            },
            np.full((1, 36), np.inf, "<f4").tobytes(),
        ),
        400,
        "NaN or Inf",
    ),
]


@pytest.mark.parametrize("case, body, status, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_named(client, case, body, status, message):
    if isinstance(body, tuple):
        r = client.post(INFER, content=body[0], headers=body[1])
    else:
        r = client.post(INFER, content=json.dumps(body))  # NaN allowed, as Python sends it
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]), r.json()


def test_protocol_level_errors(client, l96_repository):
    assert client.post(INFER, content=b"{not json").status_code == 400
    r = client.post(INFER, content=b"{}", headers={HEADER_LENGTH: "99"})
    assert r.status_code == 400 and "only 2 bytes" in r.json()["error"]
    r = client.post(INFER, content=b"{}", headers={HEADER_LENGTH: "x"})
    assert r.status_code == 400 and "must be an integer" in r.json()["error"]
    body, headers = encode_infer_request({"state": states(1)})
    r = client.post("/v2/models/nope/infer", content=body, headers=headers)
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = client.post("/v2/models/l96/versions/9/infer", content=body, headers=headers)
    assert r.status_code == 404 and "no version 9" in r.json()["error"]
    r = client.post("/v2/models/l96/versions/abc/infer", content=body, headers=headers)
    assert r.status_code == 400 and "not a positive integer" in r.json()["error"]
    assert client.get(INFER).status_code == 405


def test_body_size_limit(l96_repository):
    with TestClient(create_app(service_settings(l96_repository, max_body_bytes=1000))) as c:
        body, headers = encode_infer_request({"state": states(10)})  # 2880 bytes of tensor
        r = c.post(INFER, content=body, headers=headers)
        assert r.status_code == 413 and "exceeds the limit of 1000 bytes" in r.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            yield body[:800]
            yield body[800:]

        r = c.post(INFER, content=chunks(), headers=headers)
        assert r.status_code == 413
        assert "mecs_rejected_inputs_total" in c.get("/metrics").text


def test_no_pickle_or_path_is_ever_loaded(client):
    for params in ({"config": "{}"}, {"file:1/weights.safetensors": "AAAA"}, {"path": "/etc"}):
        r = client.post("/v2/repository/models/l96/load", json={"parameters": params})
        assert r.status_code == 400 and "not accepted" in r.json()["error"]
    r = client.post("/v2/repository/models/..%2Fevil/load")
    assert r.status_code in (400, 404)


def test_repository_index_load_unload_and_pin(client, l96_repository):
    x = states(2)
    assert client.get("/v2/repository/index").json() == [
        {
            "name": "l96",
            "version": "1",
            "state": "READY",
            "reason": "default",
            "stage": "production",
        }
    ]
    assert client.post("/v2/repository/index", json={"ready": True}).status_code == 200
    assert client.post("/v2/repository/models/l96/unload").json()["unloaded"] is True
    body, headers = encode_infer_request({"state": x})
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 404 and "unloaded" in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 503
    publish(l96_repository, "l96", *make_l96_model(seed=7))
    assert client.post("/v2/repository/models/l96/load").json() == {
        "name": "l96",
        "version": "2",
        "pinned": False,
    }
    v2 = Corrector.load(l96_repository, "l96", 2)
    header, y = infer(client, x)
    assert header["model_version"] == "2"
    np.testing.assert_allclose(y, v2(x), rtol=1e-5, atol=1e-6)
    # an older version on request, loaded on demand, while the default stays 2
    header, y = infer(client, x, path="/v2/models/l96/versions/1/infer")
    assert header["model_version"] == "1"
    np.testing.assert_allclose(y, Corrector.load(l96_repository, "l96", 1)(x), rtol=1e-5, atol=1e-6)
    # rollback: pin version 1 as the default
    r = client.post("/v2/repository/models/l96/load", json={"parameters": {"version": "1"}})
    assert r.json() == {"name": "l96", "version": "1", "pinned": True}
    assert infer(client, x)[0]["model_version"] == "1"
    states_ = {e["version"]: e["state"] for e in client.get("/v2/repository/index").json()}
    assert states_ == {"1": "READY", "2": "READY"}
    assert client.post("/v2/repository/models/zzz/load").status_code == 404


def test_poller_swaps_in_new_versions(l96_repository):
    with TestClient(create_app(service_settings(l96_repository, poll_interval_s=0.05))) as c:
        assert c.get("/v2/models/l96").json()["version"] == "1"
        publish(l96_repository, "l96", *make_l96_model(seed=1))
        deadline = time.monotonic() + 10
        while c.get("/v2/models/l96").json()["version"] != "2":
            assert time.monotonic() < deadline, "new version not picked up"
            time.sleep(0.05)
        assert metric_value(c.get("/metrics").text, "mecs_model_version_served", model="l96") == 2


def test_broken_version_is_never_served(l96_repository):
    mv = publish(l96_repository, "l96", *make_l96_model(seed=1))
    (mv.path / "weights.safetensors").write_bytes(b"garbage")
    with TestClient(create_app(service_settings(l96_repository))) as c:
        assert c.get("/v2/models/l96").json()["version"] == "1"  # falls back to the good one
        index = {e["version"]: e for e in c.get("/v2/repository/index").json()}
        assert index["2"]["state"] == "UNAVAILABLE" and "checksum" in index["2"]["reason"]
        r = c.post("/v2/repository/models/l96/load")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
        assert c.get("/v2/models/l96").json()["version"] == "1"


def test_guardrails_cap_and_out_of_distribution(l96_repository):
    settings = service_settings(l96_repository, correction_cap_std=0.01, ood_threshold_std=3.0)
    with TestClient(create_app(settings)) as c:
        x = states(3)
        x[1] = 2.5 + 3.6 * 10  # ten training stds away
        header, y = infer(c, x)
        p = header["parameters"]
        assert p["out_of_distribution"] is True and p["out_of_distribution_samples"] == "1"
        assert p["capped_values"] > 0
        # cap: mean -0.4 +/- 0.01 * 1.8
        assert y.min() >= -0.4 - 0.018 - 1e-6 and y.max() <= -0.4 + 0.018 + 1e-6
        text = c.get("/metrics").text
        assert (
            metric_value(text, "mecs_out_of_distribution_samples_total", model="l96", version="1")
            == 1
        )
        assert "mecs_capped_values_total" in text


def test_metrics_exposition(client):
    for n in (1, 3):
        infer(client, states(n))
    client.post(INFER, content=b"{}")
    text = client.get("/metrics").text
    expected = [
        ("mecs_inference_requests_total", {"model": "l96", "version": "1", "status": "200"}, 2),
        ("mecs_inference_requests_total", {"model": "l96", "version": "1", "status": "400"}, 1),
        ("mecs_rejected_inputs_total", {"model": "l96", "reason": "bad_request"}, 1),
        ("mecs_inference_samples_total", {"model": "l96", "version": "1"}, 4),
        ("mecs_model_version_served", {"model": "l96"}, 1),
        ("mecs_batch_size_bucket", {"model": "l96", "version": "1", "le": "4"}, 2),
        (
            "mecs_http_requests_total",
            {"endpoint": "/v2/models/{name}/infer", "method": "POST", "status": "200"},
            2,
        ),
        ("mecs_inference_duration_seconds_count", {"model": "l96", "version": "1"}, 2),
    ]
    for name, labels, value in expected:
        assert metric_value(text, name, **labels) == value, (name, labels)
    assert "# TYPE mecs_inference_duration_seconds histogram" in text


def test_settings_precedence_and_errors(tmp_path, monkeypatch, l96_repository):
    cfg = tmp_path / "serve.toml"
    cfg.write_text("batch_max_size = 8\nport = 9001\nMECS_BATCH_MAX_DELAY_MS = 5.0\n")
    monkeypatch.setenv("MECS_PORT", "9002")
    monkeypatch.setenv("MECS_INFERENCE_KEYS", "a, b")
    s = load_settings(cfg, repository=str(l96_repository), batch_max_size=None)
    assert (s.batch_max_size, s.port, s.batch_max_delay_ms) == (8, 9002, 5.0)
    assert s.inference_keys == ["a", "b"]
    assert load_settings(cfg, port=9003).port == 9003  # flags beat the environment
    env = tmp_path / "serve.env"
    env.write_text("MECS_CORRECTION_CAP_STD=0\nmax_body_bytes=1024\n")
    s = load_settings(env)
    assert s.correction_cap_std is None and s.max_body_bytes == 1024
    (tmp_path / "bad.json").write_text('{"batch_size": 3}')
    with pytest.raises(SettingsError, match="unknown setting 'batch_size'"):
        load_settings(tmp_path / "bad.json")
    with pytest.raises(SettingsError, match="batch_max_size"):
        load_settings(batch_max_size=0)
    monkeypatch.delenv("MECS_INFERENCE_KEYS")
    with pytest.raises(SettingsError, match="not loopback"):
        create_app(service_settings(l96_repository, host="0.0.0.0"))
    create_app(service_settings(l96_repository, host="0.0.0.0", allow_anonymous=True))
    with pytest.raises(SettingsError, match="no model repository"):
        create_app(service_settings(None))


def test_serve_cli_usage_errors(tmp_path, capsys):
    from mecs.cli import main

    assert main(["serve", "--repository", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", "--repository", str(tmp_path), "--host", "10.1.2.3"]) == 2
    assert "not loopback" in capsys.readouterr().err


def test_protocol_round_trip_without_server():
    x = states(2, np.float32)
    body, headers = encode_infer_request({"state": x}, request_id="z", parameters={"dt": 0.1})
    req = parse_infer_request(body, headers[HEADER_LENGTH])
    np.testing.assert_array_equal(req.inputs["state"], x)
    assert (req.id, req.parameters, req.datatypes) == ("z", {"dt": 0.1}, {"state": "FP32"})
    assert req.wants_binary("correction")


def test_batcher_gathers_and_bounds():
    async def scenario():
        compute, traffic = FakeCompute(), Traffic()
        b = make_batcher(compute, traffic)
        tickets = [traffic.enter() for _ in range(10)]
        xs = [np.full((1, 3), i, np.float32) for i in range(10)]
        calls = [b.submit(x, None, t) for x, t in zip(xs, tickets, strict=True)]
        out = await asyncio.gather(*calls)
        for x, r in zip(xs, out, strict=True):
            np.testing.assert_array_equal(r.correction, 2 * x)
        assert compute.sizes == [8, 2]  # max size respected, nobody left behind
        # a lone caller does not wait for the delay bound (here an hour; the wait_for
        # is a liveness guard, not a speed figure: those are bench/service.py's)
        patient = make_batcher(compute, traffic, max_delay_s=3600)
        await asyncio.wait_for(patient.submit(xs[0], None, traffic.enter()), 30)
        assert compute.sizes[-1] == 1
        # a request still on its way holds the batch ...
        late = traffic.enter()
        held = asyncio.ensure_future(patient.submit(xs[1], None, traffic.enter()))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not held.done()
        # ... until it ends without arriving, and the batch leaves at once
        late.close()
        assert (await asyncio.wait_for(held, 30)).batch_size == 1
        # or until the delay bound
        late = traffic.enter()
        await asyncio.wait_for(b.submit(xs[0], None, traffic.enter()), 30)
        late.close()
        # big batches run in the worker thread and still answer
        big = make_batcher(compute, traffic, inline_max_values=1)
        r = await big.submit(np.ones((2, 3), np.float32), None, traffic.enter())
        assert r.batch_size == 2
        # a full queue answers 503 instead of growing without bound
        small = make_batcher(compute, traffic, max_queue_samples=2)
        waiting = traffic.enter()
        first = asyncio.ensure_future(small.submit(np.ones((2, 3), np.float32), None, None))
        await asyncio.sleep(0)
        with pytest.raises(ServiceError, match="busy"):
            await small.submit(np.ones((1, 3), np.float32), None, None)
        waiting.close()
        await first

    asyncio.run(scenario())


def test_batcher_unbatched_mode_and_errors():
    async def scenario():
        compute, traffic = FakeCompute(), Traffic()
        b = make_batcher(compute, traffic, max_size=1)
        await asyncio.gather(*(b.submit(np.ones((1, 3), np.float32)) for _ in range(4)))
        assert compute.sizes == [1, 1, 1, 1]

        def boom(x, f):
            raise RuntimeError("forward failed")

        failing = make_batcher(boom, traffic)
        res = await asyncio.wait_for(
            asyncio.gather(
                *(failing.submit(np.ones((1, 3), np.float32)) for _ in range(3)),
                return_exceptions=True,
            ),
            10,
        )
        assert all(isinstance(r, RuntimeError) for r in res)  # every waiter hears of it
        # the same on the worker thread (batches over inline_max_values), where the result
        # comes back to the loop from the worker; and from an executor already shut down
        threaded = make_batcher(compute, traffic, inline_max_values=0)
        got = await asyncio.gather(
            *(threaded.submit(np.full((1, 3), i, np.float32)) for i in range(3))
        )
        assert [float(g.correction[0, 0]) for g in got] == [0.0, 2.0, 4.0]
        for b in (make_batcher(boom, traffic, inline_max_values=0), threaded):
            if b is threaded:
                b.executor.shutdown()
            res = await asyncio.wait_for(
                asyncio.gather(
                    *(b.submit(np.ones((1, 3), np.float32)) for _ in range(3)),
                    return_exceptions=True,
                ),
                10,
            )
            assert all(isinstance(r, RuntimeError) for r in res), res
        # a result the queue cannot hand out (here: none at all) fails the waiters too
        malformed = make_batcher(lambda x, f: None, traffic, inline_max_values=0)
        res = await asyncio.wait_for(
            asyncio.gather(
                *(malformed.submit(np.ones((1, 3), np.float32)) for _ in range(2)),
                return_exceptions=True,
            ),
            10,
        )
        assert all(isinstance(r, TypeError) for r in res), res

    asyncio.run(scenario())


def test_other_networks_and_forcings_inputs(l96_repository):
    """A column MLP, and a model with forcings: metadata, validation, batching, results."""
    from correction.artifacts import build_config
    from correction.layout import ModelLayout
    from correction.networks import CorrectionModel

    publish(l96_repository, "mlp", *make_l96_model(seed=2, network="column-mlp"))
    layout = ModelLayout(("X",), {"X": ("k",)}, {"X": ()}, ("k",), {"k": 36}, {"X": "1"})
    forced = CorrectionModel("column-mlp", {"hidden": 8, "depth": 2}, 1, 1, 1, n_forcings=2)
    publish(
        l96_repository, "forced", forced, build_config(forced, layout, {"hidden": 8, "depth": 2})
    )
    x, f = states(3, np.float32), RNG.normal(size=(3, 2)).astype(np.float32)
    with TestClient(create_app(service_settings(l96_repository))) as c:
        _, y = infer(c, x, path="/v2/models/mlp/infer")
        np.testing.assert_allclose(
            y, Corrector.load(l96_repository, "mlp")(x), rtol=1e-4, atol=1e-5
        )
        meta = c.get("/v2/models/forced").json()
        assert [i["name"] for i in meta["inputs"]] == ["state", "forcings"]
        body, headers = encode_infer_request({"state": x, "forcings": f})
        r = c.post("/v2/models/forced/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        _, out = decode_infer_response(r.content, r.headers[HEADER_LENGTH])
        want = Corrector.load(l96_repository, "forced")(x, f)
        np.testing.assert_allclose(out["correction"], want, rtol=1e-4, atol=1e-5)
        body, headers = encode_infer_request({"state": x})
        r = c.post("/v2/models/forced/infer", content=body, headers=headers)
        assert r.status_code == 400 and "'forcings' [batch, 2] is missing" in r.json()["error"]
        body, headers = encode_infer_request({"state": x, "forcings": f[:2]})
        r = c.post("/v2/models/forced/infer", content=body, headers=headers)
        assert r.status_code == 400 and "expected [3, 2]" in r.json()["error"]
        slots = c.app.state.mecs.repository.slots
        # ONNX Runtime took every one, forcings included
        assert all(s.default.runtime.name == "onnxruntime" for s in slots.values())


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript", "eager"])
def test_every_runtime_gives_the_same_answers(l96_repository, runtime):
    x = states(7)
    with TestClient(create_app(service_settings(l96_repository, runtime=runtime))) as c:
        assert c.app.state.mecs.repository.slots["l96"].default.runtime.name == runtime
        assert c.get("/v2/models/l96").json()["parameters"]["runtime"] == runtime
        _, y = infer(c, x)
    np.testing.assert_allclose(y, Corrector.load(l96_repository, "l96")(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arena", [False, True])
def test_memory_arena_follows_the_setting(l96_repository, arena):
    """Off by default: one large request must not pin its memory for the version's life."""
    with TestClient(create_app(service_settings(l96_repository, runtime_arena=arena))) as c:
        runtime = c.app.state.mecs.repository.slots["l96"].default.runtime
        assert runtime.session.get_session_options().enable_cpu_mem_arena is arena


def test_the_retired_torchscript_variable_is_reported(l96_repository, monkeypatch, caplog):
    monkeypatch.setenv("MECS_TORCHSCRIPT", "false")
    with caplog.at_level("WARNING", logger="mecs.service"):
        create_app(service_settings(l96_repository))
    assert "MECS_TORCHSCRIPT is no longer read" in caplog.text and "now onnxruntime" in caplog.text


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_takes_effect_on_glibc():
    from service.app import tune_malloc

    assert tune_malloc(32 << 20)
    assert tune_malloc(1 << 30)  # clamped to glibc's ceiling, not refused


def test_dependency_rule():
    """``service`` imports only the inference side of ``correction``; the client no torch."""
    import subprocess
    import sys

    code = (
        "import sys, service.client; assert 'torch' not in sys.modules, 'client pulled torch'\n"
        "import service.app, service.remote, service.server\n"
        "bad = [m for m in sys.modules if m.startswith(('correction.training', "
        "'correction.emulator', 'data_pipeline'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
