"""Split-K for the small-M GEMMs: more programs than output tiles, one exact int32 reduction, one epilogue.

At batch 1 (ViT-B/32: M = 50) a GEMM has a handful of output tiles (c_proj, N = 768: 12-24 tiles of 32-64 x 64)
for 132 SMs, and each tile's program walks all of K (3072) alone: 8.1 us in the engine's profile for 2.4 MB of
weights that HBM delivers in 0.5 us (benchmarks/results/gpu_2026-12-02e). Here ``SPLIT_K`` programs share a tile, each
summing one contiguous K range. The partial sums are integers, so adding them with ``atomic_add`` into an int32
workspace is exact and order-free: the result is the very accumulator one program would have computed, and the
epilogue (run once, by the tile's last program to arrive) sees the same integer. No second kernel, no float
reduction, so parity with the CPU engine is untouched.

The workspace and the per-tile arrival counters are zero between calls: the last program reads the sum with
``atomic_xchg(.., 0)`` (a read from L2 that also resets it) and resets its counter. They are allocated once per
(device, size class), by the eager warm-up before any graph capture, and never freed, so a graph that captured
their addresses stays valid. Reuse relies on stream order: split-K GEMMs of one device must not run concurrently on
two streams (the engine replays one graph at a time, under its replay lock).

Measured (H200, benchmarks/results/gpu_2026-12-02e/split_k_bench.json): every split candidate was 1.6-7.4x *slower*
than the shipped one-program-per-tile tile on ViT-B/32's GEMMs at M = 50 and 400 (c_proj at M = 50: 5.8 us shipped,
9.4 us at best split), so the candidates are tuned only under ``P4Q_SPLIT_K=1``
(``tuning.SPLIT_K_CANDIDATES``). Not yet profiled why; the per-element ``acq_rel`` exchange and the serialized
last-arrival epilogue are the first suspects.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

#: workspaces per (device, stream, int32 elements, counters): kept for the process's life (graphs hold pointers)
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_lock = threading.Lock()
#: K steps each split needs at least (one: a batch-1 GEMM has parallelism to gain from every step it spreads)
MIN_STEPS_PER_SPLIT = 1


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def workspace(device: torch.device, elements: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed int32 workspace of at least ``elements`` and ``tiles`` zeroed counters on ``device`` (shared by
    every split-K launch there: each leaves both zero)."""
    key = (str(device), _pow2(max(elements, 1 << 12)), _pow2(max(tiles, 64)))
    with _lock:
        found = _WORKSPACES.get(key)
        if found is None:
            found = _WORKSPACES[key] = (
                torch.zeros(key[1], dtype=torch.int32, device=device),
                torch.zeros(key[2], dtype=torch.int32, device=device),
            )
    return found


def k_per_split(k: int, step: int, split: int) -> int:
    """Each split's K range: a whole number of main-loop steps (only the last range can end inside a step)."""
    return triton.cdiv(triton.cdiv(k, step), split) * step


def usable_split(split: int, k: int, step: int) -> int:
    """``split`` reduced so that every split has at least :data:`MIN_STEPS_PER_SPLIT` K steps (1: no split)."""
    return max(1, min(split, triton.cdiv(k, step) // MIN_STEPS_PER_SPLIT))


@triton.jit
def split_k_range(pid, K, K_SPLIT, SPLIT_K: tl.constexpr):
    """``(tile, k_lo, k_hi)`` of program ``pid``: the ``SPLIT_K`` programs of one tile are neighbours."""
    if SPLIT_K > 1:
        tile = pid // SPLIT_K
        k_lo = (pid % SPLIT_K) * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
    else:
        tile = pid
        k_lo = 0
        k_hi = K
    return tile, k_lo, k_hi


@triton.jit
def split_k_reduce(acc, ws_ptr, cnt_ptr, tile, offs_m, offs_n, M, N, SPLIT_K: tl.constexpr):
    """Adds this program's partial accumulator to the tile's workspace and arrives at its counter. Returns
    ``(total, last)``: ``last`` is true for the tile's final arrival, whose ``total`` is the whole integer sum (the
    workspace and counter are zero again afterwards); the other programs' ``total`` is meaningless."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    tl.debug_barrier()  # every thread's adds are issued before the counter's release
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    total = acc
    if last:
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
        total = tl.atomic_xchg(ptrs, tl.zeros_like(acc), mask=mask, sem="acq_rel")
    return total, last
