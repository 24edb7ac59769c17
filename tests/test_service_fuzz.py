"""Property-based fuzz of every endpoint (>= 1,000 cases in all): never a 5xx.

Five generators: arbitrary JSON bodies, near-valid infer requests with every field
mutated, binary-extension bodies with wrong lengths and headers, shared-memory
registrations and region references with every field mutated, and random
method/path/header/body combinations over the whole API. Runs in-process
(TestClient) to stay within the test budget; the real-server tests cover the
transport.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_l96_model, service_settings

from correction.artifacts import publish
from service.app import create_app
from service.protocol import HEADER_LENGTH

CASES = 300  # per generator: 4 x 300 generated cases (> 1,000 requests)
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


SHM_BYTES = 2048


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    repo = root / "models"
    publish(repo, "l96", *make_l96_model())
    shm = root / "shm"  # stands for /dev/shm: objects 'fz' and 'small' live here
    shm.mkdir()
    (shm / "fz").write_bytes(np.ones(SHM_BYTES // 4, "<f4").tobytes())
    (shm / "small").write_bytes(b"\0" * 100)
    app = create_app(
        service_settings(
            repo,
            inference_keys=["inf"],
            admin_keys=["adm"],
            max_body_bytes=200_000,
            shared_memory=True,
            shared_memory_root=shm,
            max_shared_memory_regions=8,
            batch_group_timeout_ms=1,
        )
    )
    with TestClient(app, headers={"Authorization": "Bearer adm"}) as c:
        r = c.post(
            "/v2/systemsharedmemory/region/r/register", json={"key": "fz", "byte_size": 2048}
        )
        assert r.status_code == 200, r.text
        c.shm_root = shm
        yield c


CHECKED = {"requests": 0}


def check(r) -> None:
    CHECKED["requests"] += 1
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200 and r.request.url.path.endswith("/infer"):
        text = r.content
        if HEADER_LENGTH in r.headers:
            text = r.content[: int(r.headers[HEADER_LENGTH])]
        assert json.loads(text)["model_version"] in ("1", "2")
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(r.json().get("error"), str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-(2**70), 2**70),
    # beyond float32's range: finite in FP64, infinite in the float32 model
    st.sampled_from([0.0, 1.0, -1e300, 1e-300, 1e39, -3.5e38, 1.7976931348623157e308]),
)
shapes = st.one_of(
    st.just([1, 36]),
    st.just([2, 36]),
    st.lists(
        st.one_of(st.integers(-3, 80), st.sampled_from([2**40, True, 1.5, "3", None])), max_size=4
    ),
    json_values,
)
datatypes = st.sampled_from(["FP32", "FP64", "FP16", "INT32", "BYTES", "", "fp32"]) | json_values


@st.composite
def tensor(draw):
    t = {}
    if draw(st.booleans()) or True:
        t["name"] = draw(st.sampled_from(["state", "state", "forcings", "x", ""]) | json_values)
    if draw(st.integers(0, 9)):
        t["shape"] = draw(shapes)
    if draw(st.integers(0, 9)):
        t["datatype"] = draw(datatypes)
    n = draw(st.sampled_from([36, 72, 35, 0, 3]))
    data = draw(st.one_of(st.lists(numbers, min_size=n, max_size=n), json_values))
    if draw(st.booleans()) and isinstance(data, list):  # nested rows, not a flat list
        data = [data[i : i + 36] for i in range(0, len(data), 36)]
    if draw(st.integers(0, 5)):
        t["data"] = data
    if draw(st.integers(0, 3)) == 0:
        t["parameters"] = draw(
            st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values, max_size=2)
        )
    return t


@st.composite
def infer_request(draw):
    body = {"inputs": draw(st.lists(tensor(), min_size=0, max_size=3))}
    if draw(st.booleans()):
        body["parameters"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "dt": json_values | numbers,
                    "binary_data_output": json_values,
                    "degraded_steps": json_values | st.integers(),
                    "group": st.sampled_from(["run", ""]) | json_values,
                    "group_size": st.integers(-2, 70_000) | json_values,
                },
            )
        )
    if draw(st.booleans()):
        body["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["correction", "y"]) | json_values},
                    optional={"parameters": json_values},
                ),
                max_size=2,
            )
        )
    if draw(st.booleans()):
        body["id"] = draw(json_values)
    return body


@FUZZ
@given(body=json_values)
def test_fuzz_arbitrary_json(client, body):
    check(client.post("/v2/models/l96/infer", content=json.dumps(body)))


@FUZZ
@given(body=infer_request(), version=st.sampled_from([None, "1", "2", "0", "x", "99"]))
def test_fuzz_infer_requests(client, body, version):
    path = "/v2/models/l96" + (f"/versions/{version}" if version else "") + "/infer"
    check(client.post(path, content=json.dumps(body)))


@FUZZ
@given(
    header=infer_request(),
    payload=st.binary(max_size=600)
    | st.sampled_from(
        [
            np.ones((1, 36), "<f4").tobytes(),
            np.ones((2, 36), "<f8").tobytes(),
            np.full((1, 36), 1e39, "<f8").tobytes(),
            np.full((2, 36), -1e300, "<f8").tobytes(),
        ]
    ),
    hlen=st.one_of(st.none(), st.integers(-5, 2000).map(str), st.text(max_size=5)),
    sizes=st.lists(st.integers(-10, 700) | json_values, max_size=3),
)
def test_fuzz_binary_extension(client, header, payload, hlen, sizes):
    for t, size in zip(header["inputs"], sizes, strict=False):
        t.setdefault("parameters", {})
        if isinstance(t["parameters"], dict):
            t["parameters"]["binary_data_size"] = size
    text = json.dumps(header).encode()
    headers = {HEADER_LENGTH: str(len(text)) if hlen is None else hlen}
    try:
        r = client.post("/v2/models/l96/infer", content=text + payload, headers=headers)
    except UnicodeEncodeError:  # a header value no HTTP client could send
        return
    check(r)


names = st.sampled_from(["l96", "nope", "..", "a.b", "x" * 130]) | st.text(
    st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12
)


def _region_params(draw, with_size: bool) -> dict:
    p = {"shared_memory_region": draw(st.sampled_from(["r", "r", "nope"]) | json_values)}
    if with_size or draw(st.booleans()):
        p["shared_memory_byte_size"] = draw(
            st.sampled_from([144, 288, 576, 0, SHM_BYTES]) | st.integers(-5, 5000) | json_values
        )
    if draw(st.booleans()):
        p["shared_memory_offset"] = draw(
            st.sampled_from([0, 144, 1900, SHM_BYTES]) | st.integers(-5, 5000) | json_values
        )
    return p


@st.composite
def region_request(draw):
    """An infer request whose state and correction point into registered shared memory."""
    body = draw(infer_request())
    for t in body["inputs"]:
        if draw(st.integers(0, 3)):
            t["parameters"] = _region_params(draw, draw(st.booleans()))
            if draw(st.booleans()):
                t.pop("data", None)
    if draw(st.booleans()):
        body["outputs"] = [{"name": "correction", "parameters": _region_params(draw, True)}]
    return body


@st.composite
def registration(draw):
    body = {}
    for key, values in (
        ("key", st.sampled_from(["fz", "/fz", "small", "/nope", "../fz", "", "fz/x"])),
        ("offset", st.sampled_from([0, 100, 2047, 4096]) | st.integers(-3, 10_000)),
        ("byte_size", st.sampled_from([2048, 1, 0, 100, 4096]) | st.integers(-3, 10_000)),
    ):
        if draw(st.integers(0, 6)):
            body[key] = draw(values | json_values)
    if draw(st.integers(0, 8)) == 0:
        body["extra"] = 1
    return body


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    body=region_request(),
    reg=registration(),
    name=st.sampled_from(["s1", "s2", "r"]) | names,
    action=st.sampled_from(["infer", "infer", "register", "unregister", "status"]),
    auth=st.sampled_from(["Bearer adm", "Bearer inf", "Bearer bad", None]),
)
def test_fuzz_shared_memory(client, body, reg, name, action, auth):
    headers = {"Authorization": auth or ""}
    base = "/v2/systemsharedmemory"
    try:
        if action == "infer":
            r = client.post("/v2/models/l96/infer", content=json.dumps(body), headers=headers)
        elif action == "register":
            path = f"{base}/region/{quote(name, safe='')}/register"
            r = client.post(path, content=json.dumps(reg), headers=headers)
        elif action == "unregister":
            if name == "r":  # keep the region the infer cases refer to
                return
            r = client.post(f"{base}/region/{quote(name, safe='')}/unregister", headers=headers)
        else:
            r = client.get(f"{base}/region/{quote(name, safe='')}/status", headers=headers)
    except UnicodeEncodeError:
        return
    check(r)
    if r.status_code == 200 and action == "register":  # keep the registry small
        client.post(f"{base}/region/{quote(name, safe='')}/unregister", headers=headers)


ROUTES = [
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("GET", "/v2/repository/index"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{name}/load"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/systemsharedmemory/region/{name}/status"),
    ("POST", "/v2/systemsharedmemory/region/{name}/register"),
    ("POST", "/v2/systemsharedmemory/region/{name}/unregister"),
    ("POST", "/v2/systemsharedmemory/unregister"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    method=st.sampled_from([None, "PUT", "DELETE", "PATCH"]),
    name=names,
    version=st.sampled_from(["1", "2", "0", "-1", "abc", "99999999999"]),
    body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
    auth=st.sampled_from([None, "Bearer inf", "Bearer adm", "Bearer bad", "Basic x", ""]),
    ctype=st.sampled_from([None, "application/json", "application/octet-stream", "text/plain"]),
)
def test_fuzz_every_endpoint(client, route, method, name, version, body, auth, ctype):
    verb, template = route
    path = template.replace("{name}", quote(name, safe="")).replace("{version}", version)
    headers = {"Authorization": auth} if auth is not None else {"Authorization": ""}
    if ctype:
        headers["Content-Type"] = ctype
    try:
        verb = method or verb
        r = client.request(verb, path, content=body if verb != "GET" else None, headers=headers)
    except UnicodeEncodeError:
        return
    check(r)
    if auth in ("Bearer bad", "Basic x") and path.startswith(("/v2/models/", "/v2/repository")):
        assert r.status_code in (401, 404, 405)


def _nest(value: str, depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + value + "]" * depth
    return '{"a":' * depth + value + "}" * depth


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    depth=st.integers(50, 20_000),
    kind=st.sampled_from(["list", "dict"]),
    where=st.sampled_from(["body", "data", "parameters", "id", "outputs", "load", "index"]),
)
def test_fuzz_deep_nesting(client, depth, kind, where):
    deep = _nest("1", depth, kind)
    path = "/v2/models/l96/infer"
    state = '{"name":"state","datatype":"FP32","shape":[1,36],"data":DATA}'
    body = {
        "body": deep,
        "data": '{"inputs":[STATE]}'.replace("STATE", state.replace("DATA", deep)),
        "parameters": '{"parameters":{"dt":DEEP},"inputs":[STATE]}'.replace("DEEP", deep).replace(
            "STATE", state.replace("DATA", "[1]")
        ),
        "id": '{"id":DEEP,"inputs":[]}'.replace("DEEP", deep),
        "outputs": '{"outputs":DEEP,"inputs":[]}'.replace("DEEP", deep),
        "load": '{"parameters":DEEP}'.replace("DEEP", deep),
        "index": deep,
    }[where]
    if where == "load":
        path = "/v2/repository/models/l96/load"
    elif where == "index":
        path = "/v2/repository/index"
    check(client.post(path, content=body, headers={"Content-Type": "application/json"}))


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from service.server import ServerThread

    repo = tmp_path_factory.mktemp("fuzz-real") / "models"
    publish(repo, "l96", *make_l96_model())
    with ServerThread(service_settings(repo, body_timeout_s=2)) as server:
        yield server


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    declared=st.integers(10, 100_000),
    cut=st.floats(0, 0.99),
    binary=st.booleans(),
    linger=st.sampled_from([0.0, 0.01]),
)
def test_fuzz_disconnects(real_server, declared, cut, binary, linger):
    """A client that sends part of a body and goes away: never a 5xx, never a traceback."""
    import socket
    import time

    host, port = real_server.url.removeprefix("http://").split(":")
    extra = f"{HEADER_LENGTH}: {declared // 2}\r\n" if binary else ""
    head = (
        f"POST /v2/models/l96/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
        f"{extra}\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + b"[" * int(declared * cut))
        if linger:
            time.sleep(linger)


def test_fuzz_disconnects_left_no_5xx(real_server):
    import time

    import httpx

    time.sleep(0.3)  # the last disconnects are noticed
    text = httpx.get(f"{real_server.url}/metrics").text
    assert 'status="5' not in text
    assert 'status="499"' in text


def test_fuzz_left_the_service_healthy(client):
    """After all of the above, the model still answers correctly."""
    x = np.full((1, 36), 2.5, np.float32)
    body = {
        "inputs": [
            {"name": "state", "shape": [1, 36], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    r = client.post("/v2/models/l96/infer", json=body)
    assert r.status_code == 200
    expected = np.asarray(r.json()["outputs"][0]["data"], np.float32)
    # and through shared memory: the state at byte 0 of 'fz', the correction after it
    (client.shm_root / "fz").write_bytes(x.tobytes() + bytes(SHM_BYTES - x.nbytes))
    base = "/v2/systemsharedmemory"
    reg = client.post(f"{base}/region/final/register", json={"key": "fz", "byte_size": SHM_BYTES})
    assert reg.status_code == 200, reg.text
    where = {"shared_memory_region": "final", "shared_memory_byte_size": x.nbytes}
    body = {
        "inputs": [{"name": "state", "shape": [1, 36], "datatype": "FP32", "parameters": where}],
        "outputs": [
            {"name": "correction", "parameters": {**where, "shared_memory_offset": x.nbytes}}
        ],
    }
    r = client.post("/v2/models/l96/infer", json=body)
    assert r.status_code == 200, r.text
    written = np.frombuffer((client.shm_root / "fz").read_bytes(), np.float32, 36, x.nbytes)
    np.testing.assert_array_equal(written, expected)
    text = client.get("/metrics").text
    assert 'status="5' not in text  # no 5xx was ever answered
    print(f"fuzz: {CHECKED['requests']} requests checked")
