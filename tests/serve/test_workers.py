"""``p4q serve --workers N``: N servers on one socket, supervised (p4q_engine/serve/workers.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from p4q_engine.errors import ConfigError
from p4q_engine.serve.config import ServeConfig
from p4q_engine.serve.workers import worker_config

from .conftest import REPO, ServerProcess


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the workers; their own decode helpers are grandchildren)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def wait_until(pred, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def spawned_workers(server: ServerProcess, n: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker is a child too: not counted)."""
    assert wait_until(lambda: len(_workers(server.proc.pid)) == n), (children(server.proc.pid), server.log())
    return _workers(server.proc.pid)


def _workers(pid: int) -> list[int]:
    out = []
    for c in children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            out.append(c)
    return out


@pytest.fixture
def two_workers(artifact, tmp_path):
    server = ServerProcess("workers2", artifact, tmp_path, ("--workers", "2", "--max-wait-ms", "2")).start()
    try:
        server.wait_ready()
        assert wait_until(lambda: "all 2 workers ready" in server.log(), 60), server.log()
        yield server
    finally:
        server.stop()


def test_two_workers_answer_like_the_engine_and_stop_together(two_workers, engine, good_images):
    """Every request answered as ``Engine.classify`` answers it, by two processes; SIGTERM stops both, status 0."""
    pids = spawned_workers(two_workers, 2)
    expected = engine.classify(good_images[:4], top_k=2)
    with httpx.Client(base_url=two_workers.url, timeout=30) as c:
        for _ in range(3):
            files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(good_images[:4])]
            r = c.post("/v1/classify", files=files, data={"top_k": "2"})
            assert r.status_code == 200, r.text
            got = r.json()["results"]
            assert [g["labels"] for g in got] == [e.labels for e in expected]
            assert all(abs(a - b) < 1e-4 for g, e in zip(got, expected) for a, b in zip(g["probs"], e.probs))
    # /metrics sums both workers (multiprocess mode): every classify request counted, whichever worker answered
    counted = 0.0
    for _ in range(4):  # new connections: several scrapes, possibly different workers, all the same totals
        text = httpx.get(two_workers.url + "/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith('p4q_serve_requests_total{endpoint="/v1/classify"')]
        counted = sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)
        assert counted == 3.0, text
        alive = [ln for ln in text.splitlines() if ln.startswith("p4q_serve_worker_alive")]
        assert alive and float(alive[0].rsplit(" ", 1)[1]) == 2.0, alive
    two_workers.terminate()
    assert two_workers.proc.wait(30) == 0, two_workers.log()
    assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids), 10)


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_a_worker_that_dies_stops_the_service(two_workers):
    """A worker killed while serving: the supervisor stops the other one and exits 1 (its manager restarts it)."""
    pids = spawned_workers(two_workers, 2)
    os.kill(pids[0], signal.SIGKILL)
    assert two_workers.proc.wait(60) == 1, two_workers.log()
    assert "exited with -9" in two_workers.log()
    assert wait_until(lambda: not _alive(pids[1]), 15)


def test_workers_of_a_killed_supervisor_stop_and_free_the_port(two_workers, artifact, tmp_path):
    """A supervisor killed with SIGKILL: its workers notice and drain (they never serve on alone), and a new
    service can take the port; while any listener is there, a second service is refused with one line."""
    pids = spawned_workers(two_workers, 2)
    port = two_workers.url.rsplit(":", 1)[1]
    busy = subprocess.run(
        [sys.executable, "-m", "p4q_engine.cli", "serve", str(artifact), "--workers", "2", "--port", port,
         "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert busy.returncode == 2 and "could not listen" in busy.stderr, busy.stderr
    two_workers.proc.kill()
    two_workers.proc.wait(10)
    assert wait_until(lambda: not any(_alive(p) for p in pids), 30), [_alive(p) for p in pids]
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(port)))
        s.listen()


def test_a_bad_artifact_fails_every_worker_with_one_line(tmp_path):
    bad = tmp_path / "bad.p4q"
    bad.write_bytes(b"not an artifact at all" * 10)
    r = subprocess.run(
        [sys.executable, "-m", "p4q_engine.cli", "serve", str(bad), "--workers", "2", "--port", "0", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("p4q: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr


def test_port_in_use_is_a_config_error(artifact):
    from p4q_engine.serve.workers import serve_workers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match="could not listen"):
            serve_workers(artifact, ServeConfig(port=port, workers=2), None, 1.0)


def test_workers_share_the_cores_and_are_validated(monkeypatch):
    from p4q_engine.serve import workers as workers_mod

    monkeypatch.setattr(workers_mod, "usable_cores", lambda: 16)
    wc = worker_config(ServeConfig(workers=4))
    assert (wc.workers, wc.threads, wc.decode_workers) == (1, 4, 4)
    wc = worker_config(ServeConfig(workers=32, threads=2))
    assert (wc.threads, wc.decode_workers) == (2, 1)
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="--workers"):
            ServeConfig(workers=bad)


def test_workers_are_for_the_local_backend(artifact, capsys):
    from p4q_engine.cli import main

    assert main(["serve", str(artifact), "--backend", "ray", "--workers", "2"]) == 2
    assert "--workers is for the local backend" in capsys.readouterr().err


def test_the_held_port_refuses_other_programs():
    """While worker 0 loads, only the supervisor's hold is on the port: another program's socket (SO_REUSEADDR, as
    servers set it) must not get in, while a worker's SO_REUSEPORT socket does."""
    from p4q_engine.serve import workers as workers_mod

    held = workers_mod._hold(ServeConfig(host="127.0.0.1", port=0, workers=2))
    port = held[0].getsockname()[1]
    try:
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", port))
                other.listen()
        mine = workers_mod._sockets("127.0.0.1", port, True, listen=True)
        assert mine[0].getsockname()[1] == port
        for s in mine:
            s.close()
    finally:
        for s in held:
            s.close()


def test_stale_metrics_dirs_of_dead_supervisors_are_swept(tmp_path, monkeypatch):
    import tempfile

    from p4q_engine.serve import workers as workers_mod

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{workers_mod.METRICS_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{workers_mod.METRICS_PREFIX}{os.getpid()}-def"
    other = tmp_path / "p4q-serve-metrics-notapid-x"
    for d in (stale, live, other):
        d.mkdir()
    workers_mod._sweep_metrics_dirs()
    assert not stale.exists() and live.exists() and other.exists()


class _FakeProc:
    def __init__(self):
        self.pid, self.killed, self.alive = 10**7, False, True

    def is_alive(self):
        return self.alive

    def join(self, timeout=None):
        time.sleep(min(timeout or 0, 0.05))

    def kill(self):
        self.killed, self.alive = True, False


def test_a_second_signal_kills_instead_of_waiting(monkeypatch):
    """Shutdown by one signal waits up to the grace period for draining workers; one more signal kills them at
    once - also when both arrived together."""
    from p4q_engine.serve import workers as workers_mod

    monkeypatch.setattr(workers_mod.os, "kill", lambda pid, sig: None)
    for signals in ([signal.SIGTERM, signal.SIGTERM], [signal.SIGINT, signal.SIGTERM, signal.SIGTERM]):
        stop = workers_mod._Stop()
        stop.signals.extend(signals)
        p = _FakeProc()
        t0 = time.monotonic()
        workers_mod._stop_all([p], 60.0, stop)
        assert p.killed and time.monotonic() - t0 < 5
