"""``p4q serve --workers N``: N serving processes on one port.

One serving process parses HTTP, multipart and JSON on one event loop; on a GPU that loop, not the engine, bounds
the requests per second (the 2026-12-01c run: ~3.5 ms of host work per request against a tower that needs a few
hundredths of that). N workers are N complete servers - engine, batcher, decode pool, limits - each listening on the
port with ``SO_REUSEPORT``, so the kernel spreads new connections over them by a hash of the connection; with one
shared listening socket the first worker to wake takes a whole burst (8 keep-alive clients, 2 workers: a mean
batch of 8, so all on one). The host work then runs on N cores. The supervisor holds the port (bound, not
listening) from before the workers start until they have stopped, so no other program takes it meanwhile; where
``SO_REUSEPORT`` does not exist the workers share the supervisor's listening socket instead. What it costs: N
engines in memory (ViT-B/32 8-8-8: 85 MB of weights each, plus a CUDA context per process on a GPU) and N batchers,
each forming batches of the requests it was handed.

The supervisor (this process) never loads a model or touches CUDA: workers are spawned, not forked. It reports
ready when every worker has loaded; a worker that fails to load stops all of them (exit 2 with its message, as a
single server would); a worker that dies while serving stops the rest (exit 1: the process manager restarts the
service, rather than it running on fewer workers unnoticed). SIGTERM / SIGINT are passed to the workers, each of
which drains as a single server does; stragglers are killed after the grace period. Each worker answers
``/readyz`` for itself; ``/metrics`` sums every worker's samples (prometheus_client's multiprocess mode, in a
directory the supervisor owns and removes).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from p4q_engine.errors import ConfigError, P4QError
from p4q_engine.serve.config import ServeConfig, usable_cores
from p4q_engine.serve.metrics import MULTIPROC_ENV

log = logging.getLogger("p4q.serve")

#: Seconds a worker may take to load and warm up before the supervisor gives up on it (a first GPU start with an
#: empty tuning cache can take minutes).
LOAD_TIMEOUT_S = 1800.0


def worker_config(config: ServeConfig) -> ServeConfig:
    """One worker's settings: a single-process server, with the per-core defaults (torch threads, decode threads)
    divided between the workers so N of them do not oversubscribe the machine N times."""
    share = max(1, usable_cores() // config.workers)
    return replace(
        config,
        workers=1,
        threads=config.threads if config.threads is not None else share,
        decode_workers=config.decode_workers if config.decode_workers is not None else share,
    )


REUSE_PORT = hasattr(socket, "SO_REUSEPORT")


def _socket(host: str, port: int, listen: bool) -> socket.socket:
    """A TCP socket on ``host:port`` with ``SO_REUSEPORT`` (where the platform has it), listening or only bound."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if REUSE_PORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _worker(artifact: str, config: ServeConfig, limits: Any, shared: Any, ready: Any, index: int) -> None:
    """A worker process: the single-process server on its own ``SO_REUSEPORT`` socket (or the supervisor's shared
    one); tells the supervisor when it is loaded, or why it could not load."""
    from p4q_engine.serve.server import serve

    def loaded(engine) -> None:
        ready.put((index, "ready", f"pid {os.getpid()} on {engine.device}"))

    try:
        sock = shared if shared is not None else _socket(config.host, config.port, listen=True)
        code = serve(artifact, config, limits, sockets=[sock], on_loaded=loaded)
    except P4QError as e:
        ready.put((index, "error", str(e)))
        code = 2
    sys.exit(code)


class _Stop:
    """The supervisor's shutdown request (a signal), recorded for its wait loop."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


def serve_workers(artifact: str | Path, config: ServeConfig, limits: Any, grace_s: float) -> int:
    """Bind, spawn ``config.workers`` servers, supervise them until a signal or a failure; the exit status."""
    try:  # holds the port (an ephemeral one for port 0) until the workers are gone
        sock = _socket(config.host, config.port, listen=not REUSE_PORT)
    except OSError as e:
        raise ConfigError(f"could not listen on {config.host}:{config.port}: {e.strerror or e}") from None
    config = replace(config, port=sock.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")  # no CUDA state, no locks of this process copied into workers
    ready = ctx.Queue()
    wc = worker_config(config)
    shared = None if REUSE_PORT else sock
    procs = [
        ctx.Process(target=_worker, args=(str(artifact), wc, limits, shared, ready, i), name=f"p4q-serve-{i}")
        for i in range(config.workers)
    ]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    metrics_dir = tempfile.TemporaryDirectory(prefix="p4q-serve-metrics-")
    saved_env = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir.name  # the workers' /metrics: all of them (spawned with this env)
    try:
        for p in procs:
            p.start()
        code = _supervise(procs, ready, stop, config, grace_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop_all(procs, grace_s)
        sock.close()
        ready.close()
        if saved_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = saved_env
        metrics_dir.cleanup()
    return code


def _supervise(procs: list, ready: Any, stop: _Stop, config: ServeConfig, grace_s: float) -> int:
    loaded: set[int] = set()
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        try:
            index, what, detail = ready.get(timeout=0.2)
        except queue.Empty:
            pass
        else:
            if what == "error":
                sys.stderr.write(f"p4q: error: {detail}\n")
                return 2
            loaded.add(index)
            log.info("worker %d ready (%s)", index, detail)
            if len(loaded) == len(procs):
                log.info("all %d workers ready on %s:%d", len(procs), config.host, config.port)
            continue
        if stop.signal is not None:
            log.info("signal %d: stopping %d workers", stop.signal, len(procs))
            return 0
        if len(loaded) < len(procs) and time.monotonic() > deadline:
            sys.stderr.write(f"p4q: error: {len(procs) - len(loaded)} workers not loaded in {LOAD_TIMEOUT_S:g} s\n")
            return 2
        dead = [p for p in procs if not p.is_alive()]
        for p in dead:  # its live gauges leave the sum (counters and histograms keep what it counted)
            _mark_dead(p.pid)
        if dead:
            try:  # a worker that failed to load may have said why just before it exited
                index, what, detail = ready.get(timeout=0.5)
            except queue.Empty:
                p = dead[0]
                sys.stderr.write(f"p4q: error: worker {p.name} exited with {p.exitcode}; stopping the others\n")
                return 2 if len(loaded) < len(procs) else 1
            if what == "error":
                sys.stderr.write(f"p4q: error: {detail}\n")
                return 2
            loaded.add(index)


def _mark_dead(pid: Optional[int]) -> None:
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _stop_all(procs: list, grace_s: float) -> None:
    """SIGTERM every live worker (each drains as a single server), then kill what outlives the grace period."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s + 10
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
