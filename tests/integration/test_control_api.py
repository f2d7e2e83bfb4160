"""The control API of a real `fleetd demo` process, over its Unix socket."""

from __future__ import annotations

import json
import os
import stat
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_proc import DemoDaemon, call, demo_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoDaemon]:
    with demo_daemon(tmp_path_factory.mktemp("api") / "demo", long_lived=True) as d:
        yield d


def test_socket_mode_is_0660(daemon: DemoDaemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660


def test_status_shape(daemon: DemoDaemon) -> None:
    status = daemon.status()
    assert {g["index"] for g in status["gpus"]} == {0, 1}
    gpu0 = status["gpus"][0]
    assert gpu0["ours_mib"] == 16384
    assert gpu0["foreign_mib"] == 0
    mimo = daemon.workers()["mimo-vl"]
    assert mimo["engine"] == "vllm"
    assert mimo["kind"] == "process"
    assert mimo["vram_mib"] == 16384
    assert mimo["budget_mib"] == 16384
    assert daemon.workers()["deepcoder:14b"]["kind"] == "model"
    assert [p["model"] for p in status["pending"]] == ["deepseek-r1:32b"]
    assert "needs 5.5 GiB" in status["pending"][0]["reason"]


def test_explain_tells_why_pending(daemon: DemoDaemon) -> None:
    code, body = call(daemon.socket, "GET", "/v1/models/deepseek-r1:32b/explain")
    assert code == 200
    text = "\n".join(body["lines"])
    assert "priority 30" in text
    assert "Replica 0 is pending: deepseek-r1:32b needs 5.5 GiB" in text


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/models/nope/explain", None, 404, "unknown_model"),
        ("POST", "/v1/models/nope/scale", b'{"replicas": 1}', 404, "unknown_model"),
        ("POST", "/v1/models/mimo-vl/scale", b'{"replicas": -1}', 422, "invalid_value"),
        ("POST", "/v1/models/mimo-vl/scale", b'{"replicas": "2"}', 400, "bad_request"),
        ("POST", "/v1/models/mimo-vl/scale", b'{"replicas": true}', 400, "bad_request"),
        ("POST", "/v1/models/mimo-vl/scale", b"{not json", 400, "bad_request"),
        ("POST", "/v1/models/mimo-vl/scale", b"[1]", 400, "bad_request"),
        ("POST", "/v1/models/mimo-vl/scale", b"{}", 400, "bad_request"),
        ("POST", "/v1/drain", b'{"target": "rack", "name": "x"}', 400, "bad_request"),
        ("POST", "/v1/drain", b'{"target": "gpu", "name": "7"}', 404, "unknown_gpu"),
        ("POST", "/v1/drain", b'{"target": "worker", "name": "w"}', 404, "unknown_worker"),
        ("POST", "/v1/drain", b'{"target": "worker", "name": "ollama@gpu1"}', 422, "invalid_value"),
        ("POST", "/v1/undrain", b'{"target": "model", "name": "mimo-vl"}', 422, "invalid_value"),
        ("POST", "/v1/workers/nope/restart", b"{}", 404, "unknown_worker"),
        ("GET", "/v1/nowhere", None, 404, "not_found"),
        ("DELETE", "/v1/status", None, 404, "not_found"),
        ("GET", "/v1/events?since=-1", None, 400, "bad_request"),
        ("POST", "/v1/models/mimo-vl/scale", b"x" * 70_000, 413, "too_large"),
    ],
)
def test_refusals_have_stable_codes(
    daemon: DemoDaemon, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    got, answer = call(daemon.socket, method, path, body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert answer["error"]["message"]


ROUTES = [
    ("GET", "/v1/status"),
    ("GET", "/v1/models/{x}/explain"),
    ("POST", "/v1/models/{x}/scale"),
    ("POST", "/v1/drain"),
    ("POST", "/v1/undrain"),
    ("POST", "/v1/gpus/{x}/cordon"),
    ("POST", "/v1/gpus/{x}/uncordon"),
    ("POST", "/v1/workers/{x}/restart"),
    ("GET", "/v1/events?since={x}"),
    ("GET", "/v1/workers/{x}/logs?lines={x}"),
    ("PUT", "/v1/{x}"),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"target": st.sampled_from(["worker", "gpu", "model", "x"]), "name": st.text(max_size=12)},
        optional={"timeout_s": json_values, "replicas": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)
# path segments that are safe to put in a URL but still arbitrary
segments = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_.:#%"),
    max_size=16,
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(route=st.sampled_from(ROUTES), segment=segments, body=bodies)
def test_fuzzed_requests_never_disturb_the_daemon(
    daemon: DemoDaemon, route: tuple[str, str], segment: str, body: bytes | None
) -> None:
    method, template = route
    if "drain" in template or "cordon" in template or "restart" in template or "scale" in template:
        # mutating calls with a *valid* target would really act; keep them to unknown names
        segment = f"fuzz-{segment}"
        if body and b'"name"' in body:
            body = body.replace(b'"name": "', b'"name": "fuzz-')
    path = template.replace("{x}", urllib.parse.quote(segment or "z", safe=""))
    code, answer = call(daemon.socket, method, path, body)
    assert code < 500, (method, path, body, answer)
    if code >= 400:
        assert set(answer["error"]) == {"code", "message"}


def test_daemon_still_healthy_after_fuzzing(daemon: DemoDaemon) -> None:
    assert daemon.status()["workers"]
    events = call(daemon.socket, "GET", "/v1/events?kind=api.error")[1]
    assert events == "", f"the API recorded internal errors: {events}"


def test_concurrent_mutations_are_all_recorded(daemon: DemoDaemon) -> None:
    results: list[int] = []

    def cordon(i: int) -> None:
        verb = "cordon" if i % 2 == 0 else "uncordon"
        results.append(call(daemon.socket, "POST", f"/v1/gpus/1/{verb}", b"{}")[0])

    threads = [threading.Thread(target=cordon, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20
    call(daemon.socket, "POST", "/v1/gpus/1/uncordon", b"{}")
    assert daemon.status()["overrides"]["cordoned"] == []
    saved = json.loads((daemon.root / "state" / "overrides.json").read_text())
    assert saved["cordoned"] == []


def test_mutations_record_the_caller(daemon: DemoDaemon) -> None:
    code, result = call(daemon.socket, "POST", "/v1/gpus/0/cordon", b"{}")
    assert code == 200
    call(daemon.socket, "POST", "/v1/gpus/0/uncordon", b"{}")
    _, events = call(daemon.socket, "GET", f"/v1/events?since={result['event_seq'] - 1}")
    first = json.loads(events.splitlines()[0])
    assert first["kind"] == "operator.cordon"
    assert first["uid"] == os.getuid()
    assert first["pid"] > 0
    assert f"uid {os.getuid()}" in first["message"]


def test_logs_of_a_worker(daemon: DemoDaemon) -> None:
    code, text = call(daemon.socket, "GET", "/v1/workers/mimo-vl/logs?lines=200")
    assert code == 200
    assert "Starting vLLM server on http://127.0.0.1:" in text


def test_openapi_lists_every_route(daemon: DemoDaemon) -> None:
    _, spec = call(daemon.socket, "GET", "/v1/openapi.json")
    assert set(spec["paths"]) >= {
        "/v1/status",
        "/v1/drain",
        "/v1/reload",
        "/v1/events",
        "/v1/workers/{worker}/logs",
    }


def test_second_daemon_refuses_a_live_socket(tmp_path: Path, daemon: DemoDaemon) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetd",
            "demo",
            "--dir",
            str(daemon.root),
            "--duration",
            "5",
            "--gateway-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert "control socket" in run.stdout + run.stderr
    assert "is in use" in run.stdout + run.stderr
    assert daemon.status()["workers"]  # the first one is untouched
