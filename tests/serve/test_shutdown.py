"""Graceful stop of a real ``p4q serve`` process, and the command's one-line errors."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from p4q_engine.cli import main
from tests.serve.test_api import files
from tests.serve.test_batching import metric


def test_sigterm_finishes_in_flight_requests_then_exits_0(servers, engine, good_images):
    """8 requests in flight on a worker that takes 600 ms per batch; SIGTERM once all are queued: every one still
    gets its 200 answer, /readyz turns 503 meanwhile, and the process exits with status 0."""
    srv = servers["slow"]
    url = srv.url
    base = metric(httpx.get(url + "/metrics").text, "p4q_serve_images_total", '{endpoint="/v1/classify"}')
    want = engine.classify([good_images[2]], top_k=2)[0].labels

    async def run() -> tuple[list[httpx.Response], bool, int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            tasks = [
                asyncio.create_task(c.post("/v1/classify", **files([good_images[2]], top_k="2"))) for _ in range(8)
            ]
            end = time.monotonic() + 20
            async with httpx.AsyncClient(base_url=url, timeout=5) as probe:
                while time.monotonic() < end:  # wait until the server has queued all 8
                    text = (await probe.get("/metrics")).text
                    if metric(text, "p4q_serve_images_total", '{endpoint="/v1/classify"}') - base >= 8:
                        break
                    await asyncio.sleep(0.02)
                pending = sum(not t.done() for t in tasks)
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
                ready_status = 0
                try:
                    ready_status = (await probe.get("/readyz")).status_code
                except httpx.TransportError:
                    ready_status = -1  # listener already closed: also "not ready"
            return list(await asyncio.gather(*tasks)), pending > 0, ready_status

    responses, were_pending, ready_status = asyncio.run(run())
    assert were_pending, "every request finished before SIGTERM; the test did not exercise the drain"
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["results"][0]["labels"] == want for r in responses)
    assert ready_status in (503, -1)
    assert srv.proc.wait(timeout=20) == 0
    assert "batch worker stopped" in srv.log()


def test_serve_bad_arguments_exit_2_with_one_line(artifact, tmp_path, capsys):
    """In-process (these fail before any server starts): one ``p4q: error:`` line and status 2."""
    corrupt = tmp_path / "corrupt.p4q"
    corrupt.write_bytes(b"not an artifact")
    cases = [
        (str(tmp_path / "missing.p4q"),),
        (str(artifact), "--max-batch", "0"),
        (str(artifact), "--max-queue", "0"),
        (str(artifact), "--timeout-s", "0"),
        (str(corrupt), "--port", "0"),
    ]
    for args in cases:
        assert main(["serve", *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("p4q: error:"), (args, lines)
    with pytest.raises(SystemExit) as exc:  # argparse type errors
        main(["serve", str(artifact), "--max-wait-ms", "soon"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p4q: error:")
