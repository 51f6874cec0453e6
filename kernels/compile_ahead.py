"""Compile ahead: every Triton kernel a forward will launch, compiled on a thread pool before the forward runs.

Why: on a fresh machine (no Triton cache) a GPU engine's first forward of each batch bucket compiles its kernels one
after another - about 1-2 s each for sm_90, ~24 s for ViT-B/32's batch 1024 on an H200 (benchmarks/results/
gpu_2026-12-02b), and a server warms every bucket before it is ready. Triton's compile releases the GIL in its MLIR
passes and ``ptxas`` (two threads compiled four qgemm variants 1.85x faster than one on a 2-core CPU), and Triton's
``AsyncCompileMode`` hands each compile to an executor. Under :func:`compile_ahead`, :func:`launch` turns every kernel
launch into a ``warmup`` (compile, no launch; the outputs stay uninitialised), so a forward run inside it only
submits compiles; the context waits for them on exit, and the real forward after it finds every kernel in Triton's
cache. The tuner cannot time inside it: a kernel whose tiles are neither shipped nor cached gets *every* candidate
compiled instead (:func:`note_untuned`), and the real forward then times them without compiling.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Iterator

_ACTIVE: ContextVar[bool] = ContextVar("p4q_compile_ahead", default=False)
_UNTUNED: ContextVar[list] = ContextVar("p4q_compile_ahead_untuned")


class NotTuned(RuntimeError):
    """A kernel's tiles are neither shipped nor cached and a pass cannot go on without them (kept for callers that
    stop a pass there; the tuner itself compiles every candidate instead, see :func:`note_untuned`)."""


def note_untuned(key: str) -> None:
    """Record that the pass met ``key`` untuned (its candidates compiled, the first one used for the rest of the
    pass, nothing cached): the real forward tunes it."""
    _UNTUNED.get([]).append(key)


def untuned() -> list[str]:
    """The keys :func:`note_untuned` recorded in this pass so far."""
    return list(_UNTUNED.get([]))


def active() -> bool:
    """Whether launches in this context only compile."""
    return _ACTIVE.get()


def default_workers() -> int:
    """``P4Q_COMPILE_WORKERS`` (0: compile ahead off), else one thread per CPU this process may use, at most 16."""
    raw = os.environ.get("P4Q_COMPILE_WORKERS")
    if raw is not None:
        try:
            return max(0, int(raw))
        except ValueError:
            from p4q_engine.errors import ConfigError

            raise ConfigError(f"P4Q_COMPILE_WORKERS must be an integer, got {raw!r}") from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(16, cpus)


def supported() -> bool:
    """A compiling Triton (not the interpreter, which compiles nothing) with ``AsyncCompileMode`` (Triton >= 3.5)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    import triton

    return hasattr(triton, "AsyncCompileMode")


@contextlib.contextmanager
def compile_ahead(workers: int) -> Iterator[bool]:
    """Launches inside only submit compiles to ``workers`` threads; on exit every compile has finished (one that
    failed is left for the real launch, which fails the same way without this pass). Yields whether it is on:
    not where :func:`supported` is false or ``workers`` is 0 (then launches run as usual)."""
    if workers <= 0 or not supported() or active():
        yield False
        return
    import triton

    token = _ACTIVE.set(True)
    keys = _UNTUNED.set([])
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="p4q-compile") as pool:
            mode = triton.AsyncCompileMode(pool, **_mode_options(triton.AsyncCompileMode))
            mode.__enter__()
            try:
                yield True
            except BaseException:
                _finish(mode, *sys.exc_info())  # the body's error wins over a compile's
                raise
            _finish(mode, None, None, None)
    finally:
        _ACTIVE.reset(token)
        _UNTUNED.reset(keys)


def _finish(mode: Any, *exc: Any) -> None:
    """Wait for every submitted compile. One that failed (a Triton whose ``AsyncCompileMode`` re-raises on exit) is
    left to the real launch, which fails there as it would without this pass (Triton 3.6 compiles it again, 3.8
    re-raises the stored error)."""
    try:
        mode.__exit__(*exc)
    except Exception:  # noqa: BLE001 - Triton's compile errors have no common type across releases
        pass
    try:  # Triton 3.6 leaves the mode active when a compile's finalisation raised: later compiles would hang on it
        from triton.runtime import _async_compile

        if _async_compile.active_mode.get() is mode:
            _async_compile.active_mode.set(None)
    except (ImportError, AttributeError):
        pass


def _mode_options(mode: type) -> dict:
    """``ignore_errors`` where this Triton has it (a failed compile is then left for the real launch)."""
    return {"ignore_errors": True} if "ignore_errors" in inspect.signature(mode).parameters else {}


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or under :func:`compile_ahead` its compile alone (same specialization, so
    the real launch later hits Triton's cache)."""
    if _ACTIVE.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
