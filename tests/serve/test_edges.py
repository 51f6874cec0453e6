"""Server edges of ``p4q serve`` against a real process: every answer JSON-shaped (odd class names, trailing slashes,
big-integer JSON, protocol errors), slow and silent clients dropped, the connection limit, and the shutdown grace
period answering 503 JSON instead of uvicorn's plain-text 500."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from p4q_engine.artifact.format import ArtifactError, load, save
from p4q_engine.cli import main
from p4q_engine.runtime.engine import Engine
from tests.serve.conftest import ServerProcess
from tests.serve.test_api import assert_error, b64, files
from tests.serve.test_batching import metric

#: Class names JSON must carry exactly: non-ASCII, quotes/backslashes, a line separator, an astral character, a
#: control character - and a lone surrogate (legal in JSON text, not encodable as UTF-8: Starlette's JSONResponse
#: raised UnicodeEncodeError on it, a plain-text 500).
ODD_NAMES = [
    "caf\u00e9",
    'quote " back \\ slash',
    "line\u2028sep",
    "emoji \U0001f600",
    "nul \x00 ctrl",
    "lone \udc80 surrogate",
]
HEADER_TIMEOUT = 1.5
LIMIT = 4
#: An answer the fix gives in ~HEADER_TIMEOUT s; without it the connection stays open forever.
DROP_BOUND = 10.0


@pytest.fixture(scope="module")
def odd_artifact(artifact, tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny test artifact with odd class names; without the lone surrogate if the format refuses it (writing
    or loading: the manifest validation does, with an ArtifactError naming the field)."""
    art = load(artifact)
    n = len(art.manifest["classes"]["names"])
    path = tmp_path_factory.mktemp("odd") / "odd.p4q"
    for names in (ODD_NAMES, ODD_NAMES[:-1]):
        art.manifest["classes"]["names"] = (names + [f"class {i}" for i in range(len(names), n)])[:n]
        try:
            save(art, path)
            Engine.load(path, "cpu")
        except ArtifactError:
            continue
        return path, art.manifest["classes"]["names"]
    raise AssertionError("the loader refuses even printable non-ASCII class names")


@pytest.fixture(scope="module")
def edge_servers(odd_artifact, artifact, tmp_path_factory):
    """Both servers of this module, started together (startup is mostly imports, so they overlap):
    ``edges`` with tight connection limits, ``grace`` for the shutdown test (its worker sleeps 4 s per batch)."""
    logs = tmp_path_factory.mktemp("edge_logs")
    pool = {
        "edges": ServerProcess(
            "edges",
            odd_artifact[0],
            logs,
            (
                "--header-timeout-s",
                str(HEADER_TIMEOUT),
                "--timeout-keep-alive",
                "1",
                "--limit-concurrency",
                str(LIMIT),
                "--max-header-bytes",
                "4096",
                "--max-wait-ms",
                "2",
            ),
        ),
        "grace": ServerProcess(
            "grace",
            artifact,
            logs,
            ("--shutdown-grace-s", "1", "--timeout-s", "60"),
            {"P4Q_SERVE_TEST_DELAY_MS": "4000"},
        ),
    }
    try:
        for srv in pool.values():
            srv.start()
        for srv in pool.values():
            srv.wait_ready()
        yield pool
    finally:
        for srv in pool.values():
            srv.terminate()
        for srv in pool.values():
            srv.stop()


@pytest.fixture(scope="module")
def edge_server(edge_servers) -> ServerProcess:
    return edge_servers["edges"]


def _addr(srv: ServerProcess) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").split(":")
    return host, int(port)


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float, bool]:
    """Everything the server sends until it closes (or ``limit_s`` passes): (bytes, seconds, closed)."""
    t0, out = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out, time.monotonic() - t0, True
            out += chunk
    except socket.timeout:
        return out, time.monotonic() - t0, False
    except ConnectionResetError:
        return out, time.monotonic() - t0, True


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _json_error(raw: bytes, status: int, kind: str) -> dict[str, str]:
    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["kind"] == kind and err["message"] and set(err) == {"kind", "message"}
    return headers


# ---------------------------------------------------------------- JSON everywhere
def test_labels_with_odd_names_are_exact_ascii_json(edge_server, odd_artifact):
    names = odd_artifact[1]
    r = httpx.get(edge_server.url + "/v1/labels")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.content.isascii()  # \uXXXX escapes, so any string renders
    assert json.loads(r.content) == {"labels": names}


def test_odd_label_round_trips_through_classify(edge_server, odd_artifact, good_images):
    """A label subset naming the odd classes (sent as escaped JSON) ranks exactly those classes."""
    names = odd_artifact[1]
    subset = [n for n in names if n in ODD_NAMES]
    body = json.dumps({"images": [b64(good_images[0])], "top_k": len(subset), "labels": subset})  # ensure_ascii
    r = httpx.post(
        edge_server.url + "/v1/classify", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 200, r.text
    got = json.loads(r.content)["results"][0]
    assert sorted(got["labels"]) == sorted(subset)
    assert [names[i] for i in got["indices"]] == got["labels"]
    # an unknown label's message quotes the client's string; it still renders as JSON
    body = json.dumps({"images": [b64(good_images[0])], "labels": ["nope \udc81"]})
    r = httpx.post(edge_server.url + "/v1/classify", content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, "unknown_label")


def test_lone_surrogate_and_bugs_render_as_json_in_process():
    """The loader now refuses a lone surrogate in the manifest (ArtifactError), so no real server gets one; the
    renderer still escapes it (Starlette's JSONResponse raised UnicodeEncodeError: a plain-text 500), and an
    unhandled bug is a JSON 500 ``internal``, not Starlette's plain-text page."""
    from starlette.testclient import TestClient

    from p4q_engine.serve.app import create_app

    names = ["ok", "lone \udc80 surrogate", "caf\u00e9"]
    client = TestClient(
        create_app(SimpleNamespace(classnames=names, device="cpu", manifest={})), raise_server_exceptions=False
    )
    r = client.get("/v1/labels")
    assert r.status_code == 200 and r.content.isascii() and json.loads(r.content) == {"labels": names}
    broken = TestClient(create_app(SimpleNamespace()), raise_server_exceptions=False)  # no classnames: a bug
    assert_error(broken.get("/v1/labels"), 500, "internal")


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/labels/"),
        ("GET", "/healthz/"),
        ("GET", "/readyz/"),
        ("GET", "/metrics/"),
        ("POST", "/v1/classify/"),
        ("POST", "/v1/embed/"),
    ],
)
def test_trailing_slash_is_a_json_404_not_a_redirect(edge_server, method, path):
    """Starlette answered 307 with a Location built from the request's Host header."""
    r = httpx.request(
        method,
        edge_server.url + path,
        headers={"host": "evil.example"},
        follow_redirects=False,
        **({"json": {"images": []}} if method == "POST" else {}),
    )
    assert_error(r, 404, "not_found")
    assert "location" not in r.headers


def test_big_integer_json_is_bad_json(edge_server, good_images):
    """int literals over Python's 4300-digit limit raise a ValueError that is not a JSONDecodeError (was a 500)."""
    url = edge_server.url + "/v1/classify"
    big = b"9" * 5000
    bodies = [
        b'{"images": ["' + b64(good_images[0]).encode() + b'"], "top_k": ' + big + b"}",
        b'{"images": [' + big + b"]}",
        b"[" + big + b"]",
        b'{"x": -' + big + b"}",
    ]
    for body in bodies:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert_error(r, 400, "bad_json")
    r = httpx.post(edge_server.url + "/v1/embed", content=bodies[0], headers={"content-type": "application/json"})
    assert_error(r, 400, "bad_json")
    # 4300 digits is still a number (here: a valid, huge top_k, clamped like Engine.classify)
    ok = b'{"images": ["' + b64(good_images[0]).encode() + b'"], "top_k": ' + b"9" * 4300 + b"}"
    r = httpx.post(url, content=ok, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


def test_protocol_errors_are_json_and_counted(edge_server):
    """uvicorn answered malformed requests with a plain-text 400 that /metrics never counted."""
    before = httpx.get(edge_server.url + "/metrics").text
    cases = [
        b"GARBAGE\r\n\r\n",  # not HTTP
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",  # bad header value
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n",  # head over 4096, one chunk
    ]
    for raw in cases:
        with socket.create_connection(_addr(edge_server)) as s:
            s.sendall(raw)
            out, _, closed = _read_until_closed(s, DROP_BOUND)
        _json_error(out, 400, "bad_request")
        assert closed
    with socket.create_connection(_addr(edge_server)) as s:  # a head over the cap that arrives in parts
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(8):
                s.sendall(b"X-Pad: " + b"b" * 1000 + b"\r\n")
                time.sleep(0.01)
        except OSError:  # the server answered and closed mid-send
            pass
        out, _, _ = _read_until_closed(s, DROP_BOUND)
    _json_error(out, 400, "bad_request")
    after = httpx.get(edge_server.url + "/metrics").text
    assert (
        metric(after, "p4q_serve_errors_total", '{kind="bad_request"}')
        - metric(before, "p4q_serve_errors_total", '{kind="bad_request"}')
        == 4
    )
    assert (
        metric(after, "p4q_serve_requests_total", '{endpoint="other",status="400"}')
        - metric(before, "p4q_serve_requests_total", '{endpoint="other",status="400"}')
        >= 3
    )


# ---------------------------------------------------------------- slow and silent clients
def test_partial_head_gets_408_json_and_is_dropped(edge_server):
    with socket.create_connection(_addr(edge_server)) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: app")  # ...and nothing more
        out, took, closed = _read_until_closed(s, DROP_BOUND + 5)
    assert closed and took < DROP_BOUND, (took, out)
    _json_error(out, 408, "request_timeout")


def test_trickled_head_is_dropped_within_the_bound(edge_server):
    """One byte every 0.2 s: each byte arrives before any per-read timeout would fire; the header timeout does not
    restart on data, so the connection still goes after ~HEADER_TIMEOUT s."""
    head = b"GET /v1/labels HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200
    closed_after = None
    with socket.create_connection(_addr(edge_server)) as s:
        t0 = time.monotonic()
        for ch in head:
            try:
                s.sendall(bytes([ch]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > DROP_BOUND + 5:
                break
        out, _, closed = _read_until_closed(s, 5)
        closed_after = time.monotonic() - t0
    assert closed and closed_after < DROP_BOUND, closed_after
    _json_error(out, 408, "request_timeout")


def test_silent_connection_is_closed(edge_server):
    with socket.create_connection(_addr(edge_server)) as s:
        out, took, closed = _read_until_closed(s, DROP_BOUND + 5)
    assert closed and took < DROP_BOUND and out == b"", (took, out)


def test_idle_keep_alive_connection_is_closed(edge_server):
    with socket.create_connection(_addr(edge_server)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        out, took, closed = _read_until_closed(s, DROP_BOUND + 5)
    assert _parse(out)[0] == 200
    assert closed and took < DROP_BOUND, took


def test_connection_limit_answers_json_503(edge_server):
    """With LIMIT connections open, a request on one more gets 503 overloaded (JSON, Retry-After, closed); once
    they close, requests are served again."""
    before = httpx.get(edge_server.url + "/metrics").text
    idle = [socket.create_connection(_addr(edge_server)) for _ in range(LIMIT)]
    try:
        with socket.create_connection(_addr(edge_server)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            out, _, closed = _read_until_closed(s, DROP_BOUND)
        headers = _json_error(out, 503, "overloaded")
        assert headers["retry-after"] == "1" and closed
    finally:
        for s in idle:
            s.close()
    end = time.monotonic() + DROP_BOUND
    while True:  # the server notices the closed connections within a few loop turns
        r = httpx.get(edge_server.url + "/healthz")
        if r.status_code == 200 or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    after = httpx.get(edge_server.url + "/metrics").text
    assert metric(after, "p4q_serve_errors_total", '{kind="overloaded"}') > metric(
        before, "p4q_serve_errors_total", '{kind="overloaded"}'
    )


def test_good_requests_still_served(edge_server, good_images):
    r = httpx.post(edge_server.url + "/v1/classify", **files(good_images[:2], top_k="2"), timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 2


# ---------------------------------------------------------------- shutdown
def _flat_png(side: int) -> bytes:
    """A single-colour PNG: a few KB that decode to ``side``^2 pixels (slow to decode, cheap to send)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_sigterm_past_the_grace_period_answers_json_503(edge_servers, good_images):
    """Three requests still unanswered when the 1-s grace period ends - one queued (the worker sleeps 4 s before
    its batch), one whose body never finishes arriving, one decoding 32 4096x4096 PNGs (seconds of CPU) - each get
    a JSON 503 not_ready (uvicorn's own cancel wrote a plain-text 500), and the process still exits 0."""
    srv = edge_servers["grace"]
    big = _flat_png(4096)
    try:
        out: dict[str, object] = {}

        def slow_body() -> None:
            with socket.create_connection(_addr(srv)) as s:
                s.sendall(
                    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 1000\r\n\r\n{"images": ['
                )
                out["slow"] = _read_until_closed(s, 30)

        def post(name: str, images: list[bytes]) -> None:
            try:
                out[name] = httpx.post(srv.url + "/v1/classify", **files(images), timeout=40)
            except httpx.TransportError as e:
                out[name] = e

        threads = [
            threading.Thread(target=slow_body),
            threading.Thread(target=post, args=("queued", good_images[:1])),
            threading.Thread(target=post, args=("decoding", [big] * 32)),
        ]
        for t in threads:
            t.start()
        end = time.monotonic() + 20
        while time.monotonic() < end:  # until the worker holds the queued image and all three are being handled
            text = httpx.get(srv.url + "/metrics").text
            if (
                metric(text, "p4q_serve_images_total", '{endpoint="/v1/classify"}') >= 1
                and metric(text, "p4q_serve_inflight_requests", "") - 1 >= 3
            ):  # -1: this /metrics request
                break
            time.sleep(0.05)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(40)
        took = time.monotonic() - t0
        for name in ("queued", "decoding"):
            r = out[name]
            assert isinstance(r, httpx.Response), (name, r)
            assert_error(r, 503, "not_ready")
        raw, _, closed = out["slow"]
        _json_error(raw, 503, "not_ready")
        assert took < 15, took  # grace 1 s (+ scheduling); the worker alone would answer after 4 s
        assert srv.proc.wait(timeout=30) == 0
        assert "shutdown grace period over" in srv.log()
    finally:
        srv.stop()


def test_shutdown_guard_answers_while_a_thread_holds_the_handler():
    """In-process: a handler blocked in a worker thread (a decode no cancel can interrupt) still gets its 503 as
    soon as the grace period ends; the thread's late answer is dropped."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from p4q_engine.serve.app import ShutdownGuard
    from p4q_engine.serve.metrics import Metrics

    sent: list[dict] = []
    release = threading.Event()

    async def blocked(scope, receive, send) -> None:
        await run_in_threadpool(release.wait, 5.0)
        await JSONResponse({"late": True})(scope, receive, send)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        state = SimpleNamespace(grace_over=loop.create_future(), metrics=Metrics())
        guard = ShutdownGuard(blocked, state)  # type: ignore[arg-type]

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        loop.call_later(0.1, state.grace_over.set_result, None)
        t0 = time.monotonic()
        await guard({"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}, receive, send)
        took = time.monotonic() - t0
        release.set()
        await asyncio.sleep(0.3)  # the thread is done; the abandoned handler's answer must not be sent
        return took

    took = asyncio.run(run())
    assert took < 3.0, took  # 0.1 s with the guard; 5 s when the answer waits for the thread
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["kind"] == "not_ready"


def test_bad_connection_options_exit_2_with_one_line(artifact, capsys):
    for args in (
        ("--header-timeout-s", "0"),
        ("--timeout-keep-alive", "-1"),
        ("--limit-concurrency", "-2"),
        ("--max-header-bytes", "10"),
        ("--shutdown-grace-s", "-1"),
    ):
        assert main(["serve", str(artifact), *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("p4q: error:") and args[0] in lines[0], (args, lines)
