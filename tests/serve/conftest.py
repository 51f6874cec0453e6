"""Fixtures of the ``p4q serve`` tests: a tiny random artifact, the in-process engine that gives the expected answers,
and real server processes (``python -m p4q_engine.cli serve``) on free loopback ports.

Every server configuration the suite needs is started at once, in parallel, the first time any test asks for one
(startup is mostly importing torch and open_clip, so they overlap). Each process is terminated - and killed if it
does not go - at session teardown, whatever the tests did. Servers run with ``OMP_NUM_THREADS=1`` so four of them
and the test process do not oversubscribe a small machine.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import open_clip
import pytest
import torch
from PIL import Image

from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import save
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.qmodel import quantize_clip
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.runtime.engine import Engine

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "P4Q-Serve-Test-Tiny"
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}
NUM_CLASSES = 10
CLASSNAMES = [f"class {i}" for i in range(NUM_CLASSES)]
#: Limits of the "main" server, small enough to trip with tiny inputs.
MAX_PIXELS = 4096
MAX_BODY = 40_000


def build_tiny_artifact(path: Path, workdir: Path) -> Path:
    """Random tiny open_clip ViT -> 4-4-8 PTQ -> folded ``.p4q`` (a second or two)."""
    torch.manual_seed(0)
    (workdir / f"{MODEL_NAME}.json").write_text(json.dumps(MODEL_CFG))
    open_clip.add_model_config(workdir)
    m = open_clip.create_model(MODEL_NAME).eval()
    q = quantize_clip(m, QuantRecipe("4-4-8", observer="minmax"))  # minmax: calibration in a blink
    tok = torch.randint(1, 98, (NUM_CLASSES, 16))
    tok[:, 8] = 99
    tok[:, 9:] = 0
    calibrate(q, [torch.randn(16, 3, 32, 32)], tok, progress=False)
    with torch.no_grad():
        tf = torch.nn.functional.normalize(q.encode_text(tok), dim=-1)
    save(fold(q, tf, CLASSNAMES, {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}), path)
    return path


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve_artifact")
    return build_tiny_artifact(d / "tiny.p4q", d)


@pytest.fixture(scope="session")
def engine(artifact) -> Engine:
    return Engine.load(artifact, "cpu")


def png(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A random image's encoded bytes."""
    g = torch.Generator().manual_seed(seed)
    ch = len(mode) if mode in ("RGB", "RGBA", "L") else 3
    arr = torch.randint(0, 256, (height, width, ch), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def good_images() -> list[bytes]:
    """Small valid images of assorted sizes/formats (all under the main server's pixel and body caps)."""
    return [
        png(32, 32, 1),
        png(40, 24, 2),
        png(64, 64, 3, fmt="JPEG"),
        png(24, 48, 4, mode="L"),
        png(33, 35, 5),
        png(48, 48, 6, fmt="JPEG"),
    ]


# ---------------------------------------------------------------- server processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m p4q_engine.cli serve ARTIFACT`` on 127.0.0.1:<free port>, output to a log file."""

    def __init__(
        self, name: str, artifact: Path, logdir: Path, args: tuple[str, ...] = (), env: Optional[dict[str, str]] = None
    ) -> None:
        self.name, self.artifact, self.args = name, artifact, args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.log_path = logdir / f"server-{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self) -> "ServerProcess":
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "p4q_engine.cli",
            "serve",
            str(self.artifact),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "info",
            *self.args,
        ]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server {self.name} not ready after {timeout} s:\n{self.log()}")

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


#: name -> (extra CLI args, environment). DELAY/FAIL/CRASH are the batcher's test hooks.
SERVER_CONFIGS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # small caps, no delay: API, parity and bad-input tests
    "main": (("--max-pixels", str(MAX_PIXELS), "--max-body-bytes", str(MAX_BODY), "--max-wait-ms", "2"), {}),
    # a slow worker: requests pile up into one batch (coalescing), and stay in flight long enough to SIGTERM
    "slow": (("--max-wait-ms", "20"), {"P4Q_SERVE_TEST_DELAY_MS": "600"}),
    # one image in the worker, one in the queue, the rest refused; every admitted request outlives its deadline
    "overload": (
        ("--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0", "--timeout-s", "0.3"),
        {"P4Q_SERVE_TEST_DELAY_MS": "500"},
    ),
    # batch 1 raises inside the engine call, the worker thread ends after batch 3
    "faulty": ((), {"P4Q_SERVE_TEST_FAIL_BATCH": "1", "P4Q_SERVE_TEST_CRASH_AFTER": "3"}),
}


class ServerPool:
    def __init__(self, artifact: Path, logdir: Path) -> None:
        self.servers = {
            name: ServerProcess(name, artifact, logdir, args, env) for name, (args, env) in SERVER_CONFIGS.items()
        }
        self._ready = False

    def __getitem__(self, name: str) -> ServerProcess:
        """A running server; all start together on first use, and one that a test stopped starts again."""
        if not self._ready:
            for s in self.servers.values():
                s.start()
            for s in self.servers.values():
                s.wait_ready()
            self._ready = True
        server = self.servers[name]
        if server.proc.poll() is not None:
            server.stop()
            server.start().wait_ready()
        return server

    def stop(self) -> None:
        for s in self.servers.values():  # signal all first, so they shut down in parallel
            s.terminate()
        for s in self.servers.values():
            try:
                s.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                if s.proc is not None:
                    s.proc.kill()


@pytest.fixture(scope="session")
def servers(artifact, tmp_path_factory):
    pool = ServerPool(artifact, tmp_path_factory.mktemp("serve_logs"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="session")
def main_server(servers) -> ServerProcess:
    return servers["main"]
