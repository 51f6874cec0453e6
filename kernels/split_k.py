"""Split-K for the small-M GEMMs: more programs than output tiles, one exact int32 reduction, one epilogue.

At batch 1 (ViT-B/32: M = 50) a GEMM has a handful of output tiles (c_proj, N = 768: 12-24 tiles of 32-64 x 64)
for 132 SMs, and each tile's program walks all of K (3072) alone: 8.1 us in the engine's profile for 2.4 MB of
weights that HBM delivers in 0.5 us (benchmarks/results/gpu_2026-12-02e). Here ``SPLIT_K`` programs share a tile, each
summing one contiguous K range. The partial sums are integers, so their sum is exact in any order: the result is the
very accumulator one program would have computed, and the epilogue (run once, by the tile's last program to arrive)
sees the same integer. No second kernel, no float reduction, so parity with the CPU engine is untouched.

The reduction (second design, 2026-12-02f): each program stores its partial tile with plain stores into its own
slot of an int32 workspace ``[SPLIT_K, M, N]``, then arrives at the tile's counter (``kernels/arrival.py``: a CTA
barrier, then one ``acq_rel`` atomic that publishes the slot); the last to arrive loads the other slots (``.cg``:
from L2, past the SM's L1) and adds them. The first design added every element atomically and read the sum back with a
per-element ``acq_rel`` exchange (an ordered L2 round trip per element): measured 1.6-7.4x *slower* than one
program per tile (benchmarks/results/gpu_2026-12-02e/split_k_bench.json; c_proj at M = 50: 5.8 us unsplit, 9.4 us
at best split; in_proj at split 2: 20.9 us against 3.6), the loss growing with the tile's elements.

The slots are fully written before they are read, so only the counters must be zero between calls (the last
arrival resets its own). Slots, like counters, are allocated once per (device, size class) by the eager warm-up and
never freed, so a captured graph's pointers stay valid; reuse relies on stream order (one graph replays at a time).
Candidates are tuned only under ``P4Q_SPLIT_K=1`` (``tuning.SPLIT_K_CANDIDATES``) until measured at every batch.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .arrival import arrive, counters, size_class

#: slot buffers per (device, size class): kept for the process's life (graphs hold pointers)
_SLOTS: dict[tuple, torch.Tensor] = {}
_lock = threading.Lock()
#: K steps each split needs at least (one: a batch-1 GEMM has parallelism to gain from every step it spreads)
MIN_STEPS_PER_SPLIT = 1


def workspace(device: torch.device, elements: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An int32 slot buffer of at least ``elements`` (any contents) and ``tiles`` zeroed arrival counters on
    ``device``, shared by every split-K launch there (each leaves the counters zero)."""
    key = (str(device), size_class(elements, 1 << 12))
    with _lock:
        slots = _SLOTS.get(key)
        if slots is None:
            slots = _SLOTS[key] = torch.empty(key[1], dtype=torch.int32, device=device)
    return slots, counters(device, tiles, "split-k")


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
def split_k_reduce(acc, ws_ptr, cnt_ptr, pid, offs_m, offs_n, M, N, SPLIT_K: tl.constexpr):
    """Publishes this program's partial accumulator in its slot and arrives at its tile's counter. Returns
    ``(total, last)``: ``last`` is true for the tile's final arrival, whose ``total`` is the whole integer sum (its
    counter is zero again afterwards); the other programs' ``total`` is meaningless."""
    tile = pid // SPLIT_K
    split = pid % SPLIT_K
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    plane = M * N
    tl.store(ptrs + split * plane, acc, mask=mask)
    last = arrive(cnt_ptr, tile, SPLIT_K)
    total = acc
    if last:
        for s in tl.static_range(SPLIT_K):
            total += tl.load(ptrs + s * plane, mask=mask & (s != split), other=0, cache_modifier=".cg")
    return total, last
