"""Arrival counters: the last program of a group to finish runs the group's tail work, inside the same kernel.

Split-K (``kernels/split_k.py``: the programs of one output tile, the last adds the partial sums) and the GEMMs with
a LayerNorm tail (``kernels/epilogue.py``: the tiles of one row block, the last normalises the finished rows) both
need "has everyone else published?" without a second kernel. Each program publishes its results with plain stores,
then :func:`arrive`: a CTA barrier (every thread's stores happen before) and one ``acq_rel`` atomic increment (the
release publishes them at GPU scope; the acquire makes the others' visible to the last arrival, whose loads then
go to L2 with ``.cg``). Nothing spins, so no schedule can deadlock.

Counters are zero between calls: the last arrival resets its own. They are allocated once per (device, purpose,
size class) - by the eager warm-up, before any graph capture - and never freed, so a captured graph's pointers stay
valid. Reuse relies on stream order (the engine replays one graph at a time, under its replay lock).
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple, torch.Tensor] = {}
_lock = threading.Lock()


def size_class(n: int, floor: int = 64) -> int:
    """``n`` rounded up to a power of two (at least ``floor``): few distinct buffers, each reused."""
    return 1 << max(0, (max(n, floor) - 1).bit_length())


def counters(device: torch.device, n: int, purpose: str) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``device`` for ``purpose`` (one kernel's two uses never share)."""
    key = (str(device), purpose, size_class(n))
    with _lock:
        found = _COUNTERS.get(key)
        if found is None:
            found = _COUNTERS[key] = torch.zeros(key[2], dtype=torch.int32, device=device)
    return found


def all_counters() -> list[torch.Tensor]:
    """Every counter buffer allocated so far (tests check they are back at zero)."""
    with _lock:
        return list(_COUNTERS.values())


@triton.jit
def arrive(cnt_ptr, index, expected):
    """Arrives at counter ``index``; true for the ``expected``-th (last) arrival, which also resets it to zero."""
    tl.debug_barrier()  # every thread's stores happen before the release below
    arrived = tl.atomic_add(cnt_ptr + index, 1, sem="acq_rel")
    last = arrived == expected - 1
    if last:
        tl.atomic_xchg(cnt_ptr + index, 0, sem="relaxed")
    return last
