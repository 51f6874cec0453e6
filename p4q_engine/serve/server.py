"""Run the app under uvicorn with a graceful stop and bounded connections.

SIGTERM or SIGINT: ``/readyz`` turns 503, uvicorn stops accepting connections and closes idle keep-alive ones,
requests in flight run to completion (each is bounded by ``--timeout-s``) - and one still unanswered when
``--shutdown-grace-s`` ends gets a JSON 503 ``not_ready`` (:class:`p4q_engine.serve.app.ShutdownGuard`) - then the
app's lifespan drains and joins the batch worker and the process exits with status 0. A second SIGINT forces the
exit.

uvicorn itself re-raises the captured signal once it has shut down (so the process would die *by* SIGTERM,
status -15); :class:`_Server` handles the signal without recording it, so a graceful stop is a clean exit.

Connections (:class:`ConnectionLimits`, uvicorn's h11 protocol subclassed by :func:`protocol_class`): a connection
must deliver a complete request head within ``--header-timeout-s`` of opening or of its previous answer (uvicorn has
no such timeout: a client sending partial headers, or nothing, was never dropped); idle keep-alive connections close
after ``--timeout-keep-alive``; heads over ``--max-header-bytes`` and malformed requests get a JSON 400; with more
than ``--limit-concurrency`` connections open a request gets a JSON 503 ``overloaded`` and its connection closes.
Every such protocol-level answer is JSON and counted in ``/metrics`` (endpoint ``other``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, Optional

from p4q_engine.errors import ConfigError
from p4q_engine.serve.config import ServeConfig
from p4q_engine.serve.errors import KINDS, ServeError, render_json

log = logging.getLogger("p4q.serve")


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@contextlib.contextmanager
def engine_settings(config: ServeConfig) -> Iterator[None]:
    """Process-wide engine settings of a serving process, set around ``Engine.load`` (the kernels read them when
    they pick their tiles, and the load's self-test is the first forward): kept if the load succeeds, undone if it
    raises (a process that fails to serve leaves its environment as it was)."""
    old = os.environ.get("P4Q_BATCH_INVARIANT")
    if config.batch_invariant:
        os.environ["P4Q_BATCH_INVARIANT"] = "1"
    try:
        yield
    except BaseException:
        if old is None:
            os.environ.pop("P4Q_BATCH_INVARIANT", None)
        else:
            os.environ["P4Q_BATCH_INVARIANT"] = old
        raise


def load_engine(artifact: Any, config: ServeConfig, device: Optional[str] = None) -> tuple[Any, list[int]]:
    """The serving engine of ``artifact`` and the batch buckets warmed. The settings apply before the load: its
    self-test is the first forward (on a GPU it captures the batch-1 graph), so a batch-invariant server must
    already pick its tiles there. A bad artifact fails here, with the settings undone."""
    from p4q_engine.runtime.engine import Engine

    with engine_settings(config):
        engine = Engine.load(artifact, resolve_device(device or config.device))
    return engine, (warm_up(engine, config.max_batch) if config.warmup else [])


def warm_up(engine, max_batch: int) -> list[int]:
    """Run every batch-size bucket the batcher can form once, before the server reports ready.

    The GPU engine autotunes its kernels and captures a CUDA graph the first time it sees a bucket; done under load,
    that stalls the batch worker for a second or more (measured on an H100 with autotuning and no warm-up: p99
    855 ms at 64 clients). It runs before uvicorn binds the port, so nothing answers - not even ``/healthz`` -
    until the engine is ready. Engines without CUDA graphs need nothing. Returns the bucket sizes run."""
    import torch

    if not getattr(engine, "use_graphs", False):
        return []
    sizes = sorted({engine.bucket(b) for b in range(1, max_batch + 1)})
    precompile = getattr(engine, "precompile", None)
    if precompile is not None:  # every bucket's kernels compiled at once, in parallel, before the captures
        done = precompile(sizes)
        if done.get("buckets") or done.get("untuned") or done.get("failed"):
            log.info(
                "compiled ahead on %s threads in %s s: buckets %s (untuned, tuned at first use: %s; failed: %s)",
                done.get("workers"),
                done.get("seconds"),
                done.get("buckets"),
                sorted(done.get("untuned", {})) or "none",
                sorted(map(str, done.get("failed", {}))) or "none",
            )
    for b in sizes:
        engine.embed(torch.zeros(b, 3, *engine.image_size), batch_size=b)
    return sizes


@dataclass(frozen=True)
class ConnectionLimits:
    """Transport-level limits (what uvicorn and the HTTP protocol enforce before and around the app); the per-request
    limits are :class:`~p4q_engine.serve.config.ServeConfig`. The CLI flag of each field is ``--`` + its name."""

    #: Seconds a connection may take to deliver a complete request head (from opening, or from its previous answer)
    #: -> 408 JSON if it sent part of one, closed silently if it sent nothing.
    header_timeout_s: float = 10.0
    #: Seconds an idle keep-alive connection stays open (uvicorn's ``timeout_keep_alive``).
    timeout_keep_alive: float = 5.0
    #: Most open connections served at once; a request on a connection beyond it gets 503 ``overloaded``.
    #: None: no limit (bounded only by the process's file descriptors).
    limit_concurrency: Optional[int] = 512
    #: Largest request head (request line + headers) in bytes -> 400 JSON (h11's ``max_incomplete_event_size``).
    max_header_bytes: int = 16 * 1024
    #: Seconds after SIGTERM/SIGINT that requests in flight may take before they get 503 ``not_ready``;
    #: None: ``--timeout-s`` + 5, so every request that respects its deadline finishes.
    shutdown_grace_s: Optional[float] = None

    def __post_init__(self) -> None:
        checks = [
            (self.header_timeout_s > 0, "--header-timeout-s must be > 0"),
            (self.timeout_keep_alive > 0, "--timeout-keep-alive must be > 0"),
            (self.limit_concurrency is None or self.limit_concurrency >= 1, "--limit-concurrency must be >= 1"),
            (self.max_header_bytes >= 1024, "--max-header-bytes must be >= 1024"),
            (self.shutdown_grace_s is None or self.shutdown_grace_s >= 0, "--shutdown-grace-s must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def grace_s(self, config: ServeConfig) -> float:
        return config.timeout_s + 5.0 if self.shutdown_grace_s is None else self.shutdown_grace_s


def _raw_error(kind: str, message: str, close: bool = True, extra: Optional[dict[str, str]] = None) -> bytes:
    """A complete HTTP/1.1 error answer as bytes, for where no request (h11 cycle) exists to answer through."""
    body = render_json(ServeError(kind, message).body())
    status = KINDS[kind]
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ] + [f"{k}: {v}" for k, v in (extra or {}).items()]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _head_bytes(scope: dict) -> int:
    """Size of a parsed request head (request line + header lines), as sent."""
    target = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + 1
    return len(scope.get("method", "")) + target + 11 + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


def protocol_class(metrics: Any, limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol with a header timeout, a JSON connection limit and JSON protocol errors.

    h11, not httptools: ``--max-header-bytes`` is an h11 setting, and the server behaves the same whether or not
    httptools happens to be installed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from p4q_engine.serve.app import ENDPOINTS

    limit = limits.limit_concurrency

    def count(endpoint: str, kind: str) -> None:
        metrics.requests.labels(endpoint, str(KINDS[kind])).inc()
        metrics.errors.labels(kind).inc()

    class _Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: Optional[asyncio.TimerHandle] = None
            # uvicorn's own limit answers plain text; ours wraps the app instead (same counting rule: this
            # request's task and connection are already in the sets when it runs).
            self.limit_concurrency = None
            inner = self.app

            async def limited(scope: dict, receive: Any, send: Any) -> None:
                err = None
                if scope["type"] != "http":
                    pass
                elif limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
                    err = ServeError(
                        "overloaded",
                        f"more than {limit} connections open (--limit-concurrency); retry later",
                        headers={"retry-after": "1"},
                    )
                elif _head_bytes(scope) > limits.max_header_bytes:  # h11 bounds only a head that arrives in parts
                    err = ServeError(
                        "bad_request", f"request head over {limits.max_header_bytes} bytes (--max-header-bytes)"
                    )
                if err is None:
                    await inner(scope, receive, send)
                    return
                path = scope.get("path", "")
                count(path if path in ENDPOINTS else "other", err.kind)
                body = render_json(err.body())
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ] + [(k.encode(), v.encode()) for k, v in err.headers.items()]
                await send({"type": "http.response.start", "status": err.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})

            self.app = limited

        # ---------------------------------------------------------------- header timeout
        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _track(self) -> None:
            """Armed while h11 waits for a request head; not re-armed by more bytes (a trickle gains nothing)."""
            if self.conn.their_state is h11.IDLE:
                self._arm()
            else:
                self._disarm()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a head arrived: tell the client why
                count("other", "request_timeout")
                self.transport.write(
                    _raw_error(
                        "request_timeout",
                        f"request head not received within {limits.header_timeout_s:g} s (--header-timeout-s)",
                    )
                )
            self.transport.close()

        # ---------------------------------------------------------------- protocol errors
        def send_400_response(self, msg: str) -> None:
            """Malformed request or a head over --max-header-bytes: JSON instead of uvicorn's plain text."""
            count("other", "bad_request")
            self._disarm()
            body = render_json(
                ServeError(
                    "bad_request",
                    f"invalid HTTP request (malformed, or a request head over "
                    f"{limits.max_header_bytes} bytes: --max-header-bytes)",
                ).body()
            )
            try:
                for event in (
                    h11.Response(
                        status_code=400,
                        reason=b"Bad Request",
                        headers=[
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    ),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # mid-answer already: nothing well-formed can be sent any more
                pass
            self.transport.close()

    return _Protocol


def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        on_exit_signal = None

        def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:  # noqa: ARG002
            if self.on_exit_signal is not None:
                self.on_exit_signal()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return _Server


def serve(
    artifact: str | Path,
    config: ServeConfig,
    limits: Optional[ConnectionLimits] = None,
    sockets: Optional[list] = None,
    on_loaded: Optional[Callable[[Any], None]] = None,
) -> int:
    """Load ``artifact`` and serve it until SIGTERM/SIGINT; return the exit status (0 after a graceful stop).
    ``config.workers > 1``: that many of these processes on one socket (:mod:`p4q_engine.serve.workers`);
    ``sockets`` (a worker's inherited listening socket) replaces binding ``host:port``; ``on_loaded`` is called
    with the engine once it is loaded and warmed, before the first request is accepted."""
    if config.workers > 1 and sockets is None:
        from p4q_engine.serve.workers import serve_workers

        limits = limits or ConnectionLimits()
        return serve_workers(artifact, config, limits, limits.grace_s(config))
    import torch
    import uvicorn
    from PIL import Image
    from prometheus_client import disable_created_metrics

    from p4q_engine.runtime.images import JPEG_DECLARED_FACTOR
    from p4q_engine.serve.app import create_app

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    engine, warmed = load_engine(artifact, config)

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()
    # PIL refuses images above 2x its own limit before ours applies; let --max-pixels (and the larger size a baseline
    # JPEG may declare, decoded reduced) be the one cap.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, config.max_pixels * JPEG_DECLARED_FACTOR)
    app = create_app(engine, config)
    log.info(
        "loaded %s on %s: %d classes; warmed batch buckets %s",
        artifact,
        engine.device,
        len(engine.classnames),
        warmed or "-",
    )

    limits = limits or ConnectionLimits()
    grace = limits.grace_s(config)
    # uvicorn's graceful limit is a backstop a little past ours: the app answers 503 first (ShutdownGuard).
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        lifespan="on",
        timeout_graceful_shutdown=grace + 2,
        log_config=None,
        http=protocol_class(app.state.serve.metrics, limits),
        ws="none",
        timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]  # a float works
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    server = _server_class()(uv)

    def draining() -> None:
        app.state.serve.begin_drain(grace)

    server.on_exit_signal = draining
    if on_loaded is not None:
        on_loaded(engine)
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn exits this way when it cannot bind or the lifespan startup fails (logged above)
        message = f"could not start the server on {config.host}:{config.port}"
        if sockets is not None:  # a --workers worker: its supervisor prints the one line
            raise ConfigError(message) from None
        sys.stderr.write(f"p4q: error: {message}\n")
        return 2
    return 0
