"""Programmatic dependent launch (Hopper and later): the next kernel of the forward is launched while this one runs.

At batch 1 a ViT-B/32 forward is ~88 kernels in a CUDA graph whose kernel time sums to 0.36 ms against a 0.47 ms
replay (benchmarks/results/gpu_2026-12-02e): about 1.3 us per kernel boundary goes to draining one grid and
launching the next. With PDL every engine kernel is launched with the ``launch_pdl`` attribute and starts with
``griddepcontrol.wait`` (it blocks until the previous grid has finished and its writes are visible, so no read or
write of this kernel can race the previous one) followed by ``griddepcontrol.launch_dependents`` (the next kernel
may be scheduled as soon as every program of this one has started). The launch latency then overlaps the previous
kernel's tail. Ordering stays transitive: a kernel cannot finish before its own wait returned, i.e. before its
predecessor finished. A torch kernel in between is launched without the attribute and serializes as usual.

``P4Q_PDL``: ``0`` (default) or ``1`` (on where the GPU and Triton support it). Measured on an H200: ViT-B/32 8-8-8
2-6% faster at batch 1-64 with the same codes (benchmarks/results/gpu_2026-12-02e); batches 128-1024 and the
kernel-engine GPU tests with it on are not yet run, hence off by default.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def wanted() -> bool:
    """``P4Q_PDL`` as a bool; anything but ``0`` / ``1`` is a clear error."""
    value = os.environ.get("P4Q_PDL", "0")
    if value not in ("0", "1"):
        from p4q_engine.errors import ConfigError

        raise ConfigError(f"P4Q_PDL must be 0 or 1, got {value!r}")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    """Compute capability >= 9.0 and a Triton with the grid-dependency intrinsics."""
    try:
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl_cuda, "gdc_wait")


def options(device: torch.device) -> dict:
    """The launch keywords every engine kernel takes: ``GDC`` (the kernel's constexpr) and, with it on,
    ``launch_pdl``. Off on the CPU and under the interpreter (no inline PTX there)."""
    on = (
        device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
        and wanted()
        and _supported(device.index if device.index is not None else torch.cuda.current_device())
    )
    return {"GDC": True, "launch_pdl": True} if on else {"GDC": False}


@triton.jit
def grid_dependency(GDC: tl.constexpr):
    """First statement of every engine kernel: wait for the previous grid, then let the next one launch."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


__all__ = ["grid_dependency", "options", "wanted"]
