"""A bounded hostile mix against a real server: 200 requests from 16 clients, good ones (multipart and JSON, with
and without a label subset) interleaved with every documented kind of bad one. Nothing is lost, every good answer
equals ``Engine.classify``, every bad one is its documented JSON error, ``/metrics`` reconciles with what the
clients saw, and the server's peak RSS is read (the full 64-client run is ``benchmarks/serve_load.py --hostile-mix``,
results in ``benchmarks/results/serve_hostile_cpu.md``)."""

from __future__ import annotations

import asyncio

from benchmarks.serve_hostile import hostile_cases, run_hostile
from tests.serve.conftest import MAX_BODY, MAX_PIXELS

REQUESTS, CLIENTS = 200, 16


def test_hostile_mix_loses_nothing_and_answers_right(main_server, engine, good_images):
    host, port = main_server.url.removeprefix("http://").split(":")
    cases = hostile_cases(engine, good_images, host, int(port), MAX_BODY, MAX_PIXELS)
    kinds = {c.get("kind") for c in cases}
    assert {"bad_image", "bad_base64", "bad_json", "payload_too_large", "unknown_label", "not_found"} <= kinds
    assert sum("expect" in c for c in cases) >= 6
    row = asyncio.run(run_hostile(main_server.url, cases, CLIENTS, REQUESTS, 120.0, main_server.proc.pid))
    assert row["requests_issued"] == REQUESTS, row
    assert (row["lost"], row["wrong"]) == (0, 0), row["problems"]
    assert row["ok"] == REQUESTS
    assert row["metrics_reconcile"], (
        row["statuses"],
        row["metrics_statuses"],
        row["error_kinds"],
        row["metrics_error_kinds"],
    )
    assert all(v["ok"] > 0 for v in row["by_case"].values())  # every case ran and was right
    print(
        f"hostile mix: {REQUESTS} requests at {CLIENTS} clients in {row['wall_s']} s, server peak RSS "
        f"{row['server_peak_rss_mib']} MiB"
    )
    assert 0 < row["server_peak_rss_mib"] < 4096  # a tiny model: a sanity bound, not a measurement
