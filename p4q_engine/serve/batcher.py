"""Dynamic batching: one worker thread turns images from many concurrent requests into few engine calls.

Request handlers (on the event loop) decode and preprocess their images, then :meth:`Batcher.submit` puts one queue
item per image (all of a request's images at once, or none) and awaits the :class:`Job`'s future. The worker:

1. blocks until an image is queued, then keeps collecting until it holds ``max_batch`` images or ``max_wait_s``
   passed since the first one - but it waits only while some other request is still being decoded
   (:meth:`Batcher.preparing`), so a lone request is not held back for nothing. Items of requests that already
   timed out are dropped here;
2. runs the engine once on the stacked pixels - ``engine.embed`` plus the logits matmul that ``Engine.logits``
   does, so classify and embed requests share batches;
3. hands every image's embedding/logits row back to its job; a job resolves (thread-safely, on its event loop)
   when all its images are done.

Failure containment: an exception from the engine fails only the jobs of that batch (500 ``internal``) and the
worker goes on with the next batch. If the thread itself ends (a bug, or the crash test hook), it fails everything
still queued with 503 ``not_ready``, :attr:`alive` turns False (so ``/readyz`` answers 503) and :meth:`submit`
refuses new work.

The queue is bounded in images (``max_queue``): a request that does not fit is refused at once (503 +
Retry-After) instead of waiting without bound.

Test hooks (environment, read once when the batcher is built; never set in production):
``P4Q_SERVE_TEST_DELAY_MS`` sleeps that long before each batch (to make requests pile up),
``P4Q_SERVE_TEST_FAIL_BATCH=N`` makes the engine call of the N-th batch raise (1-based),
``P4Q_SERVE_TEST_CRASH_AFTER=N`` ends the worker thread after N batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from p4q_engine.serve.errors import ServeError
from p4q_engine.serve.metrics import Metrics

log = logging.getLogger("p4q.serve")

#: Seconds a refused client is told to wait (Retry-After).
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class FaultHooks:
    """Fault injection for the serve tests (see the module docstring)."""

    delay_s: float = 0.0
    fail_batch: Optional[int] = None
    crash_after: Optional[int] = None

    @classmethod
    def from_env(cls) -> "FaultHooks":
        def num(name: str) -> Optional[int]:
            v = os.environ.get(name, "").strip()
            return int(v) if v else None

        return cls(
            (num("P4Q_SERVE_TEST_DELAY_MS") or 0) / 1000.0,
            num("P4Q_SERVE_TEST_FAIL_BATCH"),
            num("P4Q_SERVE_TEST_CRASH_AFTER"),
        )


class _WorkerCrash(BaseException):
    """Raised by the crash hook; a BaseException so the per-batch ``except Exception`` does not contain it."""


class _InjectedFailure(RuntimeError):
    """Raised by the fail-batch hook inside one batch."""


@dataclass
class BatchResult:
    """Rows of one request: unit-norm embeddings ``[n, D]`` and logits ``[n, C]`` (CPU, float32)."""

    embeddings: torch.Tensor
    logits: torch.Tensor


class Job:
    """One request's images in flight; :attr:`future` resolves to a :class:`BatchResult` or a ServeError."""

    def __init__(self, pixels: torch.Tensor, loop: asyncio.AbstractEventLoop) -> None:
        self.pixels = pixels
        self.n = int(pixels.shape[0])
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False  # set by the handler on timeout; the worker then skips queued items
        self._emb: list[Optional[torch.Tensor]] = [None] * self.n
        self._logits: list[Optional[torch.Tensor]] = [None] * self.n
        self._remaining = self.n
        self._finished = False  # only touched by the worker thread (and fail() under the batcher lock)

    def _settle(self, value: Any, error: Optional[BaseException]) -> None:
        def apply() -> None:
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def deliver(self, index: int, emb: torch.Tensor, logits: torch.Tensor) -> None:
        if self._finished:
            return
        self._emb[index], self._logits[index] = emb, logits
        self._remaining -= 1
        if self._remaining == 0:
            self._finished = True
            self._settle(BatchResult(torch.stack(self._emb), torch.stack(self._logits)), None)  # type: ignore

    def fail(self, error: ServeError) -> None:
        if not self._finished:
            self._finished = True
            self._settle(None, error)


class Batcher:
    """The queue and its worker thread; see the module docstring."""

    def __init__(
        self,
        engine: Any,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        metrics: Optional[Metrics] = None,
        hooks: Optional[FaultHooks] = None,
    ) -> None:
        self.engine = engine
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.metrics = metrics or Metrics()
        self.hooks = hooks or FaultHooks()
        self._queue: deque[tuple[Job, int]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._preparing = 0  # requests between "body read" and submit(): images that may join the next batch
        self._dead = False  # set (under the lock) by the worker as it ends, so submit() never queues after that
        self._thread: Optional[threading.Thread] = None
        self.batches = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        self._thread = threading.Thread(target=self._run, name="p4q-batch-worker", daemon=True)
        self._thread.start()
        self.metrics.worker_alive.set(1)

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._dead and not self._stopping

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop taking work, let the worker finish what is queued, and join it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- producer side (event loop)
    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Wrap a handler's decoding: while any request is inside, a started batch waits (up to ``max_wait_s``)
        for its images instead of running at once."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def submit(self, pixels: torch.Tensor) -> Job:
        """Queue all images of one request (``[n, 3, H, W]``) or raise a ServeError without queueing any."""
        job = Job(pixels, asyncio.get_running_loop())
        with self._cond:
            if self._thread is None or self._dead or self._stopping:
                raise ServeError(
                    "not_ready", "the batch worker is not running", headers={"Retry-After": str(RETRY_AFTER_S)}
                )
            if job.n > self.max_queue:
                raise ServeError(
                    "too_many_images",
                    f"{job.n} images in one request; this server queues at most {self.max_queue} (--max-queue)",
                )
            if len(self._queue) + job.n > self.max_queue:
                raise ServeError(
                    "overloaded",
                    f"queue full ({len(self._queue)} of {self.max_queue} images waiting); retry later",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._queue.extend((job, i) for i in range(job.n))
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    # ---------------------------------------------------------------- worker thread
    def _collect(self) -> Optional[list[tuple[Job, int]]]:
        """The next batch, or None once stopping with an empty queue."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
                batch: list[tuple[Job, int]] = []
                deadline = time.monotonic() + self.max_wait_s
                while True:
                    while self._queue and len(batch) < self.max_batch:
                        item = self._queue.popleft()
                        if not item[0].cancelled:
                            batch.append(item)
                    if len(batch) >= self.max_batch or self._stopping or (not self._queue and not self._preparing):
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self.metrics.queue_depth.set(len(self._queue))
                if batch:
                    return batch

    def _compute(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and logits of one batch: ``Engine.logits`` = ``logit_scale * embed @ text.T``."""
        if self.hooks.fail_batch is not None and self.batches + 1 == self.hooks.fail_batch:
            raise _InjectedFailure("injected batch failure (P4Q_SERVE_TEST_FAIL_BATCH)")
        emb = self.engine.embed(pixels, batch_size=pixels.shape[0])
        logits = self.engine.logit_scale * emb @ self.engine.text.T
        return emb, logits

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        if self.hooks.delay_s:
            time.sleep(self.hooks.delay_s)
        self.metrics.batch_size.observe(len(batch))
        t0 = time.perf_counter()
        try:
            pixels = torch.stack([job.pixels[i] for job, i in batch])
            emb, logits = self._compute(pixels)
        except Exception as e:
            self.metrics.batch_failures.inc()
            log.exception("batch of %d images failed", len(batch))
            err = ServeError("internal", f"the engine failed on this request's batch ({e.__class__.__name__})")
            for job in {id(job): job for job, _ in batch}.values():
                job.fail(err)
            return
        finally:
            self.metrics.batch_latency.observe(time.perf_counter() - t0)
        for k, (job, i) in enumerate(batch):
            job.deliver(i, emb[k], logits[k])

    def _run(self) -> None:
        batch: list[tuple[Job, int]] = []
        try:
            while True:
                batch = self._collect() or []
                if not batch:
                    return
                self._run_batch(batch)
                batch = []
                self.batches += 1
                if self.hooks.crash_after is not None and self.batches >= self.hooks.crash_after:
                    raise _WorkerCrash(f"worker ended by P4Q_SERVE_TEST_CRASH_AFTER={self.hooks.crash_after}")
        except BaseException as e:
            log.error("batch worker died: %s: %s", e.__class__.__name__, e)
        finally:
            self.metrics.worker_alive.set(0)
            with self._cond:
                self._dead = True
                left = list(self._queue) + batch
                self._queue.clear()
                self.metrics.queue_depth.set(0)
            err = ServeError("not_ready", "the batch worker stopped", headers={"Retry-After": str(RETRY_AFTER_S)})
            for job, _ in left:
                job.fail(err)
