"""Run the app under uvicorn with a graceful stop.

SIGTERM or SIGINT: ``/readyz`` turns 503, uvicorn stops accepting connections and closes idle keep-alive ones,
requests in flight run to completion (each is bounded by ``--timeout-s``), then the app's lifespan drains and joins
the batch worker and the process exits with status 0. A second SIGINT forces the exit.

uvicorn itself re-raises the captured signal once it has shut down (so the process would die *by* SIGTERM,
status -15); :class:`_Server` handles the signal without recording it, so a graceful stop is a clean exit.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Optional

from p4q_engine.serve.config import ServeConfig

log = logging.getLogger("p4q.serve")


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


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
    for b in sizes:
        engine.embed(torch.zeros(b, 3, *engine.image_size), batch_size=b)
    return sizes


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


def serve(artifact: str | Path, config: ServeConfig) -> int:
    """Load ``artifact`` and serve it until SIGTERM/SIGINT; return the exit status (0 after a graceful stop)."""
    import uvicorn
    from PIL import Image
    from prometheus_client import disable_created_metrics

    from p4q_engine.runtime.engine import Engine
    from p4q_engine.serve.app import create_app

    import torch

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    engine = Engine.load(artifact, device)  # a bad artifact fails here, before any process-wide setting changes
    warmed = warm_up(engine, config.max_batch) if config.warmup else []

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()
    # PIL refuses images above 2x its own limit before ours applies; let --max-pixels be the one cap.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, config.max_pixels)
    app = create_app(engine, config)
    log.info("loaded %s on %s: %d classes; warmed batch buckets %s", artifact, device, len(engine.classnames),
             warmed or "-")

    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                        access_log=config.access_log, lifespan="on", timeout_graceful_shutdown=config.timeout_s + 5,
                        log_config=None)
    server = _server_class()(uv)

    def draining() -> None:
        app.state.serve.draining = True

    server.on_exit_signal = draining
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind or the lifespan startup fails (logged above)
        sys.stderr.write(f"p4q: error: could not start the server on {config.host}:{config.port}\n")
        return 2
    return 0
