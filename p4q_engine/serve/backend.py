"""Where a request's preprocessed pixels go: the interface between the HTTP routes and whatever runs the engine.

The routes (:mod:`p4q_engine.serve.app`) parse, validate and decode every request the same way whatever backend
runs the model, so the single-process server and the Ray Serve deployment (:mod:`p4q_engine.serve.ray_backend`)
share one validation, decoding and error path. A backend only has to take pixels, give back embeddings and
logits, and say whether it is ready:

* :class:`LocalBackend` - this process's :class:`~p4q_engine.serve.batcher.Batcher` (``p4q serve``, the default);
* ``ray_backend.RayEngineBackend`` - the engine replicas of a Ray Serve application, reached through a
  ``DeploymentHandle`` (``p4q serve --backend ray``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from typing import Any, Awaitable, Protocol

import torch

from p4q_engine.serve.batcher import Batcher, BatchResult, Job
from p4q_engine.serve.errors import ServeError


class InferBackend(Protocol):
    """What the routes need from the thing that runs the engine."""

    def preparing(self) -> AbstractContextManager[None]:
        """Entered while a request's body is read and decoded (lets a local batch wait for its images)."""

    def submit(self, pixels: torch.Tensor, deadline: float, timeout_s: float) -> Awaitable[BatchResult]:
        """Queue ``pixels`` now (or raise a :class:`ServeError` if refused); the awaitable resolves to their
        embeddings and logits by ``deadline`` (monotonic) or raises a ServeError (``timeout`` past it)."""

    async def readiness(self) -> dict[str, Any]:
        """Fields of the 200 ``/readyz`` answer, or raise ``ServeError("not_ready", ...)``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalBackend:
    """The project's dynamic batcher, in the serving process (one worker thread, see batcher.py)."""

    def __init__(self, batcher: Batcher, engine: Any, max_batch: int) -> None:
        self.batcher, self.engine, self.max_batch = batcher, engine, max_batch

    def preparing(self) -> AbstractContextManager[None]:
        return self.batcher.preparing()

    def submit(self, pixels: torch.Tensor, deadline: float, timeout_s: float) -> Awaitable[BatchResult]:
        job = self.batcher.submit(pixels)
        return self._wait(job, deadline, timeout_s)

    @staticmethod
    async def _wait(job: Job, deadline: float, timeout_s: float) -> BatchResult:
        try:
            return await asyncio.wait_for(job.future, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ServeError("timeout", f"no result within {timeout_s:g} s (--timeout-s)") from None
        except asyncio.CancelledError:  # shutdown grace over (ShutdownGuard): the worker skips its queued images
            job.cancelled = True
            raise

    async def readiness(self) -> dict[str, Any]:
        if self.engine is None or not self.batcher.alive:
            raise ServeError("not_ready", "the batch worker is not running")
        return {
            "device": str(self.engine.device),
            "classes": len(self.engine.classnames),
            "max_batch": self.max_batch,
        }

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(self.batcher.stop, 30.0)
