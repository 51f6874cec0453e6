"""Prometheus metrics of one server process (text exposition format at ``GET /metrics``).

Built on ``prometheus_client`` - the Prometheus project's own Python client - rather than hand-written text: it gets
the exposition format's escaping, cumulative ``le`` buckets with ``+Inf``, ``_sum``/``_count`` series and thread-safe
updates (the batch worker is a separate thread) right, and it is what scrapers are tested against.
Each server owns a private registry, so several apps in one process (tests) never share counters. Under
``p4q serve --workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers: prometheus_client's
multiprocess mode then keeps every worker's samples in files there, and ``/metrics`` - whichever worker answers it -
renders the sum over all of them (gauges: the live workers' sum; ``p4q_serve_worker_alive`` counts live batch
workers).
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: The environment variable of prometheus_client's multiprocess mode (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the server exports; see the README's "Serving" section for the list."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "p4q_serve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter("p4q_serve_errors", "Error answers, by error kind", ["kind"], registry=r)
        self.latency = Histogram(
            "p4q_serve_request_latency_seconds",
            "Time from request start to response end",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "p4q_serve_images", "Images accepted into the queue, by endpoint", ["endpoint"], registry=r
        )
        live = {"multiprocess_mode": "livesum"}  # --workers: summed over the live worker processes
        self.queue_depth = Gauge("p4q_serve_queue_depth", "Images waiting for the batch worker", registry=r, **live)
        self.inflight = Gauge("p4q_serve_inflight_requests", "Requests being handled", registry=r, **live)
        self.batch_size = Histogram(
            "p4q_serve_batch_size", "Images per engine batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "p4q_serve_batch_latency_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_failures = Counter("p4q_serve_batch_failures", "Batches whose engine call raised", registry=r)
        self.worker_alive = Gauge(
            "p4q_serve_worker_alive", "1 while the batch worker thread runs (per process)", registry=r, **live
        )

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):  # every worker process's samples, aggregated
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
