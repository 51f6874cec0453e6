"""Dynamic batching, overload, timeouts and worker failures of real ``p4q serve`` processes (test hooks slow, fail or
end the batch worker; see ``p4q_engine/serve/batcher.py``)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from tests.serve.test_api import assert_error, files


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0 if absent)."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _concurrent(url: str, n: int, image: bytes, path: str = "/v1/classify") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return await asyncio.gather(*(c.post(path, **files([image], top_k="2")) for _ in range(n)))


def test_concurrent_requests_coalesce_into_one_batch(servers, engine, good_images):
    slow = servers["slow"]
    before = httpx.get(slow.url + "/metrics").text
    responses = asyncio.run(_concurrent(slow.url, 8, good_images[1]))
    want = engine.classify([good_images[1]], top_k=2)[0].labels
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["results"][0]["labels"] == want for r in responses)
    text = httpx.get(slow.url + "/metrics").text
    count = metric(text, "p4q_serve_batch_size_count") - metric(before, "p4q_serve_batch_size_count")
    ones = metric(text, "p4q_serve_batch_size_bucket", '{le="1.0"}') - metric(
        before, "p4q_serve_batch_size_bucket", '{le="1.0"}'
    )
    total = metric(text, "p4q_serve_batch_size_sum") - metric(before, "p4q_serve_batch_size_sum")
    assert total == 8
    assert count - ones >= 1, "no batch held more than one image"
    assert count < 8


def test_overload_gives_503_with_retry_after_and_deadline_gives_504(servers, good_images):
    """--max-queue 1, --max-batch 1 and a 500 ms worker: of 6 simultaneous requests one is in the worker, at most
    one waits in the queue, the rest are refused at once; every admitted one outlives its 0.3 s deadline."""
    srv = servers["overload"]
    t0 = time.monotonic()
    responses = asyncio.run(_concurrent(srv.url, 6, good_images[0]))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {503, 504}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert len(refused) >= 3, statuses
    for r in refused:
        assert_error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
    for r in responses:
        if r.status_code == 504:
            assert_error(r, 504, "timeout")
    assert statuses.count(504) >= 1
    assert time.monotonic() - t0 < 5
    # the server is fine afterwards: timed-out work does not wedge the worker, and it still answers
    assert httpx.get(srv.url + "/readyz").status_code == 200
    time.sleep(0.6)
    assert_error(httpx.post(srv.url + "/v1/embed", **files([good_images[0]]), timeout=10), 504, "timeout")
    assert httpx.get(srv.url + "/healthz").status_code == 200


def test_failed_batch_fails_alone_and_dead_worker_turns_readyz_503(servers, engine, good_images):
    """Batch 1 raises inside the engine call (500 for its request only, the worker goes on); after batch 3 the worker
    thread ends: /readyz 503, /healthz still 200, new work 503."""
    srv = servers["faulty"]
    url = srv.url
    assert_error(httpx.post(url + "/v1/classify", **files([good_images[0]]), timeout=30), 500, "internal")
    want = engine.classify(good_images[:2], top_k=5)
    for _ in range(2):  # batches 2 and 3
        r = httpx.post(url + "/v1/classify", **files(good_images[:2]), timeout=30)
        assert r.status_code == 200, r.text
        assert [x["labels"] for x in r.json()["results"]] == [p.labels for p in want]
    end = time.monotonic() + 10
    while httpx.get(url + "/readyz").status_code != 503 and time.monotonic() < end:
        time.sleep(0.05)
    assert_error(httpx.get(url + "/readyz"), 503, "not_ready")
    health = httpx.get(url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    err = assert_error(httpx.post(url + "/v1/classify", **files([good_images[0]]), timeout=30), 503, "not_ready")
    assert "worker" in err["message"]
    text = httpx.get(url + "/metrics").text
    assert metric(text, "p4q_serve_worker_alive") == 0
    assert metric(text, "p4q_serve_batch_failures_total") == 1
    assert srv.proc.poll() is None  # the process keeps serving
