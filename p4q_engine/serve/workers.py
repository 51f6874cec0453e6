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

import errno
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
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


def _addresses(host: str, port: int) -> list[tuple]:
    """Every address ``host`` names, as uvicorn (asyncio's ``create_server``) binds them: ``""`` is all interfaces,
    ``localhost`` may be both 127.0.0.1 and ::1."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))


def _sockets(host: str, port: int, reuse_port: bool, listen: bool, reuse_addr: bool = True) -> list[socket.socket]:
    """One TCP socket per address of ``host:port`` (``SO_REUSEPORT`` if asked), bound, listening if asked. Port 0:
    the first address's ephemeral port for all of them."""
    out: list[socket.socket] = []
    try:
        for family, addr in _addresses(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            if reuse_addr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # its IPv4 twin is its own socket
            if out[0] is not sock and port == 0:
                addr = (addr[0], out[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            if listen:
                sock.listen(2048)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def _hold(config: ServeConfig) -> list[socket.socket]:
    """The port, held until the workers are gone (an ephemeral one for port 0). First a probe: a listener already
    there (another server, or workers orphaned by a killed supervisor) makes a plain bind fail. Then the hold:
    ``SO_REUSEPORT`` without ``SO_REUSEADDR``, which no other program's socket can share - except where a recent
    server left connections in TIME_WAIT, which refuse that; then with ``SO_REUSEADDR`` too (the probe passed)."""
    for probe in _sockets(config.host, config.port, False, listen=False):
        probe.close()
    if not REUSE_PORT:
        return _sockets(config.host, config.port, False, listen=True)  # the workers share it
    try:
        return _sockets(config.host, config.port, True, listen=False, reuse_addr=False)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        return _sockets(config.host, config.port, True, listen=False)


def _listen_error(config: ServeConfig, e: OSError) -> str:
    return f"could not listen on {config.host}:{config.port}: {e.strerror or e}"


def _watch_parent() -> None:
    """Drain when the supervisor is gone (killed with SIGKILL, say): a worker never serves on alone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="p4q-parent-watch", daemon=True).start()


def _worker(artifact: str, config: ServeConfig, limits: Any, shared: Any, ready: Any, index: int) -> None:
    """A worker process: the single-process server on its own ``SO_REUSEPORT`` sockets (bound now, listening only
    once the engine is loaded, as a single server binds after its load), or on the supervisor's shared ones; tells
    the supervisor when it is loaded, or why it could not load (one line, as the CLI would print it)."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which stops every worker in order
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started with it ignored (see _start)
    _watch_parent()
    from p4q_engine.serve.server import serve

    socks: list = []

    def loaded(engine) -> None:
        try:  # listening before "ready": a failure here is this worker's error, not a silent non-listener
            for sock in socks:
                sock.listen(2048)
        except OSError as e:
            raise ConfigError(_listen_error(config, e)) from None
        ready.put((index, "ready", f"pid {os.getpid()} on {engine.device}"))

    code = 2
    try:
        try:
            socks = shared if shared is not None else _sockets(config.host, config.port, True, listen=False)
        except OSError as e:
            raise ConfigError(_listen_error(config, e)) from None
        code = serve(artifact, config, limits, sockets=socks, on_loaded=loaded)
    except P4QError as e:
        ready.put((index, "error", str(e)))
    except Exception as e:  # noqa: BLE001 - a bug: the supervisor prints its one line, the log has the traceback
        log.exception("worker %d failed", index)
        ready.put((index, "error", f"worker {index}: {e.__class__.__name__}: {e}"))
    sys.exit(code)


class _Stop:
    """The supervisor's shutdown requests (signals), counted for its wait loop: the first drains the workers, a
    second kills them."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)


def serve_workers(artifact: str | Path, config: ServeConfig, limits: Any, grace_s: float) -> int:
    """Check and hold the port, spawn ``config.workers`` servers, supervise them until a signal or a failure;
    the exit status."""
    try:
        held = _hold(config)
    except OSError as e:
        raise ConfigError(_listen_error(config, e)) from None
    config = replace(config, port=held[0].getsockname()[1])
    ctx = multiprocessing.get_context("spawn")  # no CUDA state, no locks of this process copied into workers
    ready = ctx.Queue()
    wc = worker_config(config)
    shared = None if REUSE_PORT else held
    procs = [
        ctx.Process(target=_worker, args=(str(artifact), wc, limits, shared, ready, i), name=f"p4q-serve-{i}")
        for i in range(config.workers)
    ]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    saved_env = os.environ.get(MULTIPROC_ENV)
    metrics_dir = None
    try:
        _sweep_metrics_dirs()
        metrics_dir = tempfile.TemporaryDirectory(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
        os.environ[MULTIPROC_ENV] = metrics_dir.name  # the workers' /metrics: all of them (spawned with this env)
        return _supervise(procs, ready, stop, config)
    finally:
        _stop_all(procs, grace_s, stop)  # signal handlers still ours: a second signal kills instead of waiting
        for s, h in old.items():
            signal.signal(s, h)
        for sock in held:
            sock.close()
        ready.close()
        if saved_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = saved_env
        if metrics_dir is not None:
            metrics_dir.cleanup()


METRICS_PREFIX = "p4q-serve-metrics-"


def _sweep_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that died without cleaning up (SIGKILL): this user's, whose
    pid is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        try:
            pid = int(d.name[len(METRICS_PREFIX) :].split("-", 1)[0])
            if d.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _next_message(ready: Any, timeout: float) -> Optional[tuple]:
    try:
        return ready.get(timeout=timeout)
    except queue.Empty:
        return None


def _supervise(procs: list, ready: Any, stop: _Stop, config: ServeConfig) -> int:
    """Start worker 0 alone (on a GPU it compiles and tunes what the shipped table lacks, timed on an idle GPU, into
    the caches the others then read), the rest once it is ready; then watch them."""
    _start(procs[0])
    loaded: set[int] = set()
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        msg = _next_message(ready, 0.2)
        if msg is not None:
            index, what, detail = msg
            if what == "error":
                sys.stderr.write(f"p4q: error: {detail}\n")
                return 2
            loaded.add(index)
            log.info("worker %d ready (%s)", index, detail)
            if index == 0:
                for p in procs[1:]:
                    _start(p)
            if len(loaded) == len(procs):
                log.info("all %d workers ready on %s:%d", len(procs), config.host, config.port)
            continue
        if stop.signals:
            log.info("signal %d: stopping %d workers", stop.signals[0], len(procs))
            return 0
        if len(loaded) < len(procs) and time.monotonic() > deadline:
            sys.stderr.write(f"p4q: error: {len(procs) - len(loaded)} workers not loaded in {LOAD_TIMEOUT_S:g} s\n")
            return 2
        dead = [p for p in procs if p.pid is not None and not p.is_alive()]
        for p in dead:  # its live gauges leave the sum (counters and histograms keep what it counted)
            _mark_dead(p.pid)
        if dead:
            msg = _next_message(ready, 0.5)  # a worker that failed to load may have said why just before it exited
            if msg is not None and msg[1] == "error":
                sys.stderr.write(f"p4q: error: {msg[2]}\n")
                return 2
            p = dead[0]
            sys.stderr.write(f"p4q: error: worker {p.name} exited with {p.exitcode}; stopping the others\n")
            return 2 if len(loaded) < len(procs) else 1


def _start(p: Any) -> None:
    """Start a worker with SIGINT ignored: a Ctrl-C during its seconds of imports (before it leaves the terminal's
    process group) would otherwise end it with a traceback; the worker restores the handler itself."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        p.start()
    finally:
        signal.signal(signal.SIGINT, old)


def _mark_dead(pid: Optional[int]) -> None:
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _stop_all(procs: list, grace_s: float, stop: _Stop) -> None:
    """SIGTERM every live worker (each drains as a single server), then kill what outlives the grace period - or
    everything at once if another signal arrives meanwhile."""
    started = [p for p in procs if p.pid is not None]
    force = 2 if stop.signals else 1  # signals in all that end the wait: the one that stopped us, and one more
    for p in started:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s + 10
    while any(p.is_alive() for p in started) and time.monotonic() < end and len(stop.signals) < force:
        for p in started:
            p.join(0.1)
    for p in started:
        if p.is_alive():
            p.kill()
            p.join(5)
