"""``p4q serve --backend ray`` on a local Ray cluster (``ray.init(num_cpus=2)``), over real HTTP (httpx against
Serve's proxy port): answers equal the in-process engine's, bad input fails per request with the single-process
server's kinds, overload is answered, /metrics and /readyz reflect the replicas, and a replica killed mid-load
costs no request. One cluster and two applications for the whole module (deploying is the slow part)."""

from __future__ import annotations

import asyncio
import base64
import re
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from p4q_engine.serve.batcher import FaultHooks  # noqa: E402
from p4q_engine.serve.config import ServeConfig  # noqa: E402
from p4q_engine.serve.ray_backend import ENGINE, PUSH_EVERY_S, RayOptions, replica_states, start  # noqa: E402
from tests.serve.conftest import MAX_BODY, MAX_PIXELS, free_port, png  # noqa: E402
from tests.serve.test_api import assert_error, files  # noqa: E402

APP, OVERLOAD = "p4q-test", "p4q-overload"


@pytest.fixture(scope="module")
def cluster(artifact):
    """One local Ray cluster and Serve instance: the main app (2 engine replicas) at /, an overload app at /ovl."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    try:
        main_cfg = ServeConfig(
            port=port,
            device="cpu",
            threads=1,
            max_wait_ms=2,
            max_pixels=MAX_PIXELS,
            max_body_bytes=MAX_BODY,
            log_level="warning",
        )
        opts = RayOptions(
            replicas=2, cpus_per_replica=0.5, cpus_per_http_replica=0.5, app_name=APP, health_check_period_s=1
        )
        start(str(artifact), main_cfg, opts)
        # one image in the worker, one queued, the rest refused; every admitted request outlives its deadline
        ovl_cfg = ServeConfig(
            port=port, device="cpu", threads=1, max_queue=1, max_batch=1, max_wait_ms=0, timeout_s=0.3
        )
        ovl = RayOptions(replicas=1, cpus_per_replica=0.25, cpus_per_http_replica=0.25, app_name=OVERLOAD)
        start(str(artifact), ovl_cfg, ovl, FaultHooks(delay_s=0.5), route_prefix="/ovl")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- parity and API shape
def test_classify_matches_engine(cluster, engine, good_images):
    r = httpx.post(cluster + "/v1/classify", **files(good_images, top_k="3"), timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for got, want in zip(results, engine.classify(good_images, top_k=3), strict=True):
        assert got["labels"] == want.labels and got["indices"] == want.indices
        assert got["probs"] == pytest.approx(want.probs, abs=1e-5)


def test_json_label_subset_and_embed_match_engine(cluster, engine, good_images):
    subset = ["class 7", "class 2", "class 5"]
    body = {"images": [b64(im) for im in good_images], "top_k": 2, "labels": subset}
    r = httpx.post(cluster + "/v1/classify", json=body, timeout=30)
    assert r.status_code == 200, r.text
    for got, want in zip(r.json()["results"], engine.classify(good_images, top_k=2, labels=subset), strict=True):
        assert got["labels"] == want.labels
        assert got["probs"] == pytest.approx(want.probs, abs=1e-5)
    r = httpx.post(cluster + "/v1/embed", **files(good_images[:2]), timeout=30)
    assert r.status_code == 200, r.text
    want = engine.embed(good_images[:2])
    assert r.json()["embeddings"] == [pytest.approx(row, abs=1e-5) for row in want.tolist()]


def test_labels_health_and_unknown_paths(cluster, engine):
    assert httpx.get(cluster + "/v1/labels").json() == {"labels": engine.classnames}
    assert httpx.get(cluster + "/healthz").json() == {"status": "ok"}
    assert_error(httpx.get(cluster + "/v1/labels/"), 404, "not_found")
    assert_error(httpx.get(cluster + "/v1/classify"), 405, "method_not_allowed")


def test_bad_inputs_fail_alone_while_good_ones_succeed(cluster, engine, good_images):
    """Concurrent requests: each bad one gets its own kind (and index), the good ones their exact answers."""
    cases = [
        (files([good_images[0], b"not an image"]), 400, "bad_image", 1),
        (files([png(100, 100)]), 400, "bad_image", 0),  # 10000 px > the 4096-px cap
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "bad_json", None),
        ({"json": {"images": ["@@@"]}}, 400, "bad_base64", 0),
        (files(good_images[:1], top_k="0"), 400, "bad_top_k", None),
        (files(good_images[:1], labels="no such class"), 400, "unknown_label", None),
        ({"content": b"x" * (MAX_BODY + 10), "headers": {"content-type": "application/json"}}, 413, None, None),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", None),
    ]

    async def run():
        async with httpx.AsyncClient(base_url=cluster, timeout=30) as c:
            good = [c.post("/v1/classify", **files([im], top_k="1")) for im in good_images]
            bad = [c.post("/v1/classify", **kw) for kw, *_ in cases]
            return await asyncio.gather(*good, *bad)

    answers = asyncio.run(run())
    for r, im in zip(answers[: len(good_images)], good_images):
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["labels"] == engine.classify([im], top_k=1)[0].labels
    for r, (_, status, kind, index) in zip(answers[len(good_images) :], cases):
        if kind is None:
            assert r.status_code == status and r.json()["error"]["kind"] == "payload_too_large"
        else:
            assert_error(r, status, kind, index)


def test_readyz_and_metrics_reflect_the_replicas(cluster):
    r = httpx.get(cluster + "/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["backend"] == "ray" and body["device"] == "cpu"
    assert body["replicas"]["running"] == body["replicas"]["target"] == 2
    # engine replicas push their samples every PUSH_EVERY_S (the answering HTTP replica pushes its own at once), so
    # the earlier tests' batches reach the page within about a second: poll for them, bounded
    engine_batches = r'p4q_serve_batch_size_count\{deployment="EngineReplica",replica="\w+"\} [1-9]'
    deadline = time.monotonic() + 10 * PUSH_EVERY_S
    while True:
        text = httpx.get(cluster + "/metrics").text
        if re.search(engine_batches, text) or time.monotonic() > deadline:
            break
        time.sleep(PUSH_EVERY_S / 5)
    assert re.search(r'p4q_serve_requests_total\{deployment="HttpReplica",endpoint="/v1/classify",', text)
    assert re.search(r'p4q_serve_errors_total\{deployment="HttpReplica",kind="bad_image",replica="\w+"\} [1-9]', text)
    assert re.search(engine_batches, text)
    assert 'p4q_serve_replicas{deployment="EngineReplica",state="RUNNING"} 2.0' in text


# ---------------------------------------------------------------- overload
def test_overload_is_answered_with_json_503_or_504(cluster, good_images):
    """Queue of one image behind a 0.5 s batch: of 8 concurrent requests most are refused at once (503 overloaded,
    Retry-After) and the admitted ones run past their 0.3 s deadline (504) - every one answered, in JSON."""

    async def run():
        async with httpx.AsyncClient(base_url=cluster + "/ovl", timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/classify", **files(good_images[:1])) for _ in range(8)))

    answers = asyncio.run(run())
    kinds = [r.json()["error"]["kind"] for r in answers]
    assert set(kinds) <= {"overloaded", "timeout"}, kinds
    assert "overloaded" in kinds
    for r in answers:
        if r.json()["error"]["kind"] == "overloaded":
            assert r.status_code == 503 and r.headers.get("retry-after") == "1"
        else:
            assert r.status_code == 504


# ---------------------------------------------------------------- a replica killed under load
def _engine_replica_actor():
    """One engine replica's actor (Serve names them ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#{ENGINE}#" in a.get("name", "")]
    assert len(found) == 2, found
    return ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])


def test_replica_killed_mid_load_loses_no_request(cluster, engine, good_images):
    expected = [p.labels for p in engine.classify(good_images, top_k=1)]
    victim = _engine_replica_actor()
    seen_running: set[int] = set()

    async def load(stop_after: float) -> list[tuple[int, httpx.Response]]:
        out: list[tuple[int, httpx.Response]] = []
        end = time.monotonic() + stop_after
        async with httpx.AsyncClient(base_url=cluster, timeout=30) as c:

            async def client(k: int) -> None:
                i = k
                while time.monotonic() < end:
                    n = i % len(good_images)
                    out.append((n, await c.post("/v1/classify", **files([good_images[n]], top_k="1"))))
                    i += 1

            async def watch() -> None:
                killed = False
                while time.monotonic() < end:
                    if not killed and time.monotonic() > end - stop_after + 1.0:
                        ray.kill(victim, no_restart=True)  # Serve's controller starts a replacement
                        killed = True
                    r = await c.get("/readyz")
                    if r.status_code == 200:
                        seen_running.add(r.json()["replicas"]["running"])
                    await asyncio.sleep(0.2)

            await asyncio.gather(watch(), *(client(k) for k in range(4)))
        return out

    answers = asyncio.run(load(8.0))
    assert len(answers) > 20
    for idx, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["labels"] == expected[idx]
    assert 1 in seen_running, seen_running  # /readyz showed the lost replica (1 of 2 running)
    end = time.monotonic() + 60
    while replica_states(APP, ENGINE).get("RUNNING", 0) < 2 and time.monotonic() < end:
        time.sleep(0.5)
    r = httpx.get(cluster + "/readyz")
    assert r.status_code == 200 and r.json()["replicas"]["running"] == 2, r.text


# ---------------------------------------------------------------- readiness rule (no cluster needed)
def test_readiness_rule(monkeypatch):
    """503 until every engine replica has started once; then 200 while any runs (with the count); 503 at none."""
    from p4q_engine.serve import ray_backend
    from p4q_engine.serve.errors import ServeError

    class _Info:
        def remote(self):
            async def info():
                return {"device": "cpu", "classes": 10}

            return info()

    class _Handle:
        info = _Info()

    backend = ray_backend.RayEngineBackend(_Handle(), None, "app", target=2, max_batch=8, max_queue=16)
    states: dict = {}
    monkeypatch.setattr(ray_backend, "replica_states", lambda app, dep: dict(states))

    def ready():
        backend._states = (0.0, {})  # no caching between the steps
        return asyncio.run(backend.readiness())

    for now in ({}, {"RUNNING": 1, "STARTING": 1}):
        states.clear(), states.update(now)
        with pytest.raises(ServeError) as e:
            ready()
        assert e.value.kind == "not_ready"
    states.clear(), states.update({"RUNNING": 2})
    assert ready()["replicas"] == {"running": 2, "target": 2, "states": {"RUNNING": 2}}
    states.clear(), states.update({"RUNNING": 1, "STARTING": 1})  # a replica lost and being replaced
    assert ready()["replicas"]["running"] == 1
    states.clear(), states.update({"STARTING": 2})
    with pytest.raises(ServeError, match="no engine replica is running"):
        ready()
