"""Tile configurations for the Triton kernels, autotuned once per (GPU, shape bucket, bits) and cached on disk.

Nothing is tuned at import time; ``P4Q_AUTOTUNE=0`` turns timing off altogether (first fitting candidate). Lookup
order: the tables shipped in the package (``kernels/tuned/*.json``: one file per GPU, tuned on that GPU by
``benchmarks/tune_tables.py``; a file may name other GPUs it is applied to, e.g. an H100 using the H200's table), then
this machine's cache (``$P4Q_TUNE_CACHE`` or ``~/.cache/p4q_engine/tuning.json``, whose entries override the
shipped ones). A key in neither is tuned on first use: a small candidate list timed with ``triton.testing.do_bench``,
the winner stored in memory and in the cache file, so later processes start tuned. Under ``TRITON_INTERPRET=1``
(CPU) a single small configuration is used.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import compile_ahead


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    #: "ptr": one program per output tile, pointer loads; "tma": persistent programs, TMA tensor-descriptor loads
    #: (Hopper), the next tile's loads overlapping this tile's epilogue. Both compute the same integers.
    kernel: str = "ptr"
    #: weight as the left tensor-core operand (``acc^T += w a^T``): output channels on the 64-row side, for small M,
    #: and a weight tile built in registers (interleaved low-bit layouts) needs no trip through shared memory
    swap: bool = False
    #: persistent programs per SM (TMA kernel): 2 lets one program's epilogue run while the other's MMAs do - the
    #: overlap a single program per SM lacks (its tensor cores idle through every epilogue); needs the tile to fit
    #: twice in shared memory and registers, else the candidate runs one per SM or fails and is skipped
    occupancy: int = 1
    #: a low-bit weight run through its int8 copy (``PackedWeight.wide``) with this 8-bit tile: the choice between
    #: the packed main loop and the 8-bit one is itself tuned per shape (``qgemm._tuned_config``)
    wide: bool = False
    #: programs per output tile, each summing one K range into an exact int32 workspace (``kernels/split_k.py``;
    #: pointer kernel only): small M, where a GEMM has fewer tiles than the GPU has SMs
    split_k: int = 1


INTERPRET_CONFIG = TileConfig(32, 32, 64, 4, 4, 1)


def config_json(cfg: TileConfig) -> dict:
    """A configuration as a table / cache entry. ``wide`` and ``split_k`` only where set: entries without them stay
    readable by releases before them (one that has them makes such a release skip the whole file and tune again)."""
    d = asdict(cfg)
    for name, default in (("wide", False), ("split_k", 1)):
        if d[name] == default:
            del d[name]
    return d


def config_entries(data: dict) -> dict[str, TileConfig]:
    """``{key: config}`` from a table's or cache's JSON object. The warp-specialized tiles of one release (a ``ws``
    field, keys with ``-ws``), withdrawn after they faulted on an H200 (benchmarks/results/gpu_2026-12-02b), are
    dropped and their shapes tuned again, instead of the whole file being skipped; any other unknown field raises
    ``TypeError``."""
    out = {}
    for k, v in data.items():
        if "-ws|" in k or (isinstance(v, dict) and "ws" in v):
            continue
        out[k] = TileConfig(**v)
    return out


#: Candidates for Hopper/Ampere-class GPUs: large tiles for the M = 51200 GEMMs, thin ones for batch 1 (M = 50).
#: Pruned on 2026-12-01 to the tiles that won at least one ViT-B/32 shape x width x M on an H200
#: (benchmarks/results/gpu_2026-12-01b): tuning time is compile time, about one second per candidate and epilogue.
GPU_CANDIDATES: tuple[TileConfig, ...] = (
    # persistent TMA kernels: for the long-M GEMMs, where the short K (768) leaves a one-tile-at-a-time kernel
    # spending much of its time filling the pipeline and in the epilogue; swapped for the interleaved low-bit
    # layouts (their register-built weight tile is the left operand)
    TileConfig(128, 256, 128, 8, 8, 3, "tma"),
    TileConfig(256, 128, 128, 8, 8, 3, "tma"),
    TileConfig(128, 256, 128, 8, 8, 3, "tma", swap=True),
    TileConfig(128, 128, 128, 8, 8, 4, "tma"),
    # two persistent programs per SM (not yet measured: the tuner keeps them only where they win)
    TileConfig(128, 128, 128, 8, 4, 3, "tma", occupancy=2),
    TileConfig(128, 128, 128, 8, 4, 3, "tma", swap=True, occupancy=2),
    TileConfig(128, 128, 64, 8, 4, 4),
    TileConfig(64, 128, 128, 8, 4, 4),
    TileConfig(128, 64, 128, 8, 4, 4),
    TileConfig(64, 64, 128, 8, 4, 4),
    TileConfig(64, 128, 128, 8, 4, 3, swap=True),
    # small M (batch 1-8: M = 50-400)
    TileConfig(32, 64, 128, 8, 4, 4),
    TileConfig(32, 128, 256, 8, 4, 3),
    TileConfig(16, 64, 256, 8, 4, 3),
    TileConfig(16, 128, 128, 8, 4, 4),
    TileConfig(32, 32, 128, 8, 2, 4),
    TileConfig(16, 32, 256, 8, 2, 3),
    TileConfig(16, 64, 128, 8, 4, 4, swap=True),
)

#: Small M with K split over several programs per tile (an exact int32 sum; ``kernels/split_k.py``): a batch-1 GEMM
#: has 6-48 tiles for 132 SMs. Tuned only under ``P4Q_SPLIT_K=1``: on an H200 every one of them was 1.6-7.4x slower
#: than the shipped tile on ViT-B/32's four GEMMs at M = 50 and 400 (benchmarks/results/gpu_2026-12-02e,
#: ``split_k_bench.json``), so by default they cost tuning time and never win. ``split_k`` shrinks where K is short.
SPLIT_K_CANDIDATES: tuple[TileConfig, ...] = (
    TileConfig(32, 64, 128, 8, 4, 4, split_k=4),
    TileConfig(16, 64, 128, 8, 4, 4, swap=True, split_k=4),
    TileConfig(32, 64, 64, 8, 4, 4, split_k=8),
    TileConfig(64, 64, 128, 8, 4, 4, split_k=2),
    TileConfig(32, 128, 128, 8, 4, 4, split_k=3),
)

_lock = threading.Lock()
_log = logging.getLogger(__name__)
_memory: dict[str, TileConfig] = {}  # shipped tables, then this machine's cache and what this process tuned
_user: dict[str, TileConfig] = {}  # what the cache file holds (written back; shipped entries never are)
_loaded = False


#: Tables shipped with the package: ``{"gpu": name, "applies_to": [other names], "measured": "...", "configs":
#: {"<kernel>|m<bucket>|n<N>|k<K>|b<bits>": TileConfig fields}}``.
SHIPPED_DIR = Path(__file__).with_name("tuned")


def cache_path() -> Path:
    return Path(os.environ.get("P4Q_TUNE_CACHE", Path.home() / ".cache" / "p4q_engine" / "tuning.json"))


def _m_bucket(m: int) -> int:
    b = 16
    while b < m:
        b *= 2
    return b


#: The bucket whose tile every batch size uses under :func:`batch_invariant` (LayerNorm rows; attention batch x
#: heads): ViT-B/32's batch 256 (12 800 rows, 3 072 heads).
INVARIANT_ROWS = 16384
INVARIANT_HEADS = 4096


def batch_invariant() -> bool:
    """``P4Q_BATCH_INVARIANT=1``: the kernels with float reductions (LayerNorm rows, attention row sums) take one
    tile per shape whatever the batch, so an image's codes do not depend on what it is batched with (the GEMMs
    accumulate exact integers under any tile, their epilogues are elementwise). The tile is the one shipped or cached
    for the reference bucket, else the first candidate: looked up, never timed (a tile tuned later in the process
    would change the answers)."""
    return os.environ.get("P4Q_BATCH_INVARIANT", "0") == "1"


def _key(name: str, m: int, n: int, k: int, bits: int, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{gpu}|{name}|m{_m_bucket(m)}|n{n}|k{k}|b{bits}"


def load_shipped(directory: Optional[Path] = None) -> dict[str, TileConfig]:
    """Every shipped table as ``{full key: config}``; an unreadable file is skipped (tuning covers its keys)."""
    out: dict[str, TileConfig] = {}
    for path in sorted((directory or SHIPPED_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            gpus = [data["gpu"], *data.get("applies_to", [])]
            configs = config_entries(data["configs"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        for gpu in gpus:
            out.update({f"{gpu}|{k}": c for k, c in configs.items()})
    return out


def table_file(gpu: str, tuned: dict[str, TileConfig], measured: str, previous: Optional[dict] = None) -> dict:
    """A shippable table for ``gpu`` from this machine's tuned entries (``{full key: config}``), merged over
    ``previous`` (the file's current content: its entries and ``applies_to`` are kept unless re-tuned)."""
    configs = dict((previous or {}).get("configs", {}))
    prefix = f"{gpu}|"
    configs.update({k[len(prefix) :]: config_json(v) for k, v in tuned.items() if k.startswith(prefix)})
    return {
        "gpu": gpu,
        "applies_to": list((previous or {}).get("applies_to", [])),
        "measured": measured,
        "configs": dict(sorted(configs.items())),
    }


def table_path(gpu: str, directory: Optional[Path] = None) -> Path:
    return (directory or SHIPPED_DIR) / ("".join(ch if ch.isalnum() else "_" for ch in gpu) + ".json")


def _load_file() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    _memory.update(load_shipped())
    try:
        data = json.loads(cache_path().read_text())
        entries = config_entries(data)
        _user.update(entries)
        _memory.update(entries)
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable, not JSON, not {key: config}
        pass


def forget(drop: Callable[[str, int], bool]) -> int:
    """Drop the loaded entries (shipped or cached) for which ``drop(kernel name, M bucket)`` holds, so that their
    keys are tuned again in this process (``benchmarks/tune_tables.py --retune-m-max``: new candidates); returns
    how many were dropped. The cache file keeps them until this process saves its own."""
    with _lock:
        _load_file()
        keys = [k for k in _memory if drop(k.split("|")[1], int(k.split("|")[2][1:]))]
        for k in keys:
            del _memory[k]
            _user.pop(k, None)
    return len(keys)


def _save_file() -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes (serve --workers) may save at once
        tmp.write_text(json.dumps({k: config_json(v) for k, v in _user.items()}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-tuning in the next process


#: the largest M bucket split-K candidates are tried at (beyond it a GEMM has tiles enough for every SM)
SPLIT_K_MAX_M = 1024


def packed_fields(device: torch.device) -> bool:
    """``P4Q_NIB_PACKED=1`` (GPU only; off until measured on one): interleaved low-bit fields unpacked four bytes
    per register (``weight_layout._field_packed``). The interpreter runs no inline PTX."""
    return device.type == "cuda" and os.environ.get("P4Q_NIB_PACKED", "0") == "1"


def kernel_choice() -> str:
    """``P4Q_QGEMM_KERNEL``: ``auto`` (default: the autotuner picks among both kernels), ``ptr`` or ``tma`` (only
    that kernel's candidates; for before/after benchmarks)."""
    kind = os.environ.get("P4Q_QGEMM_KERNEL", "auto")
    if kind not in ("auto", "ptr", "tma"):
        raise ValueError(f"P4Q_QGEMM_KERNEL must be auto, ptr or tma, got {kind!r}")
    return kind


def split_k_enabled() -> bool:
    """``P4Q_SPLIT_K=1`` adds :data:`SPLIT_K_CANDIDATES` to the GEMM tuning (default ``0``: they lost every
    measured shape). Anything but ``0`` / ``1`` raises."""
    value = os.environ.get("P4Q_SPLIT_K", "0")
    if value not in ("0", "1"):
        from p4q_engine.errors import ConfigError

        raise ConfigError(f"P4Q_SPLIT_K must be 0 or 1, got {value!r}")
    return value == "1"


def _fits(cfg: TileConfig, m: int) -> bool:
    """Tiles no taller than M's bucket; at M >= 4096 none under 64 rows (they re-read the weights M / block_m
    times and never win there; skipping them halves the tuning time of a large batch); split-K only up to
    :data:`SPLIT_K_MAX_M`."""
    bucket = _m_bucket(m)
    split_ok = cfg.split_k == 1 or bucket <= SPLIT_K_MAX_M
    return split_ok and cfg.block_m <= max(16, bucket) and (bucket < 4096 or cfg.block_m >= 64)


def _time(fn: Callable[[], None], triton) -> float:
    """Median GPU ms of ``fn``, launched from a CUDA graph where one can be captured: a small GEMM's GPU time is
    a few microseconds, below the Python launch cost a plain loop would measure (and the engine replays graphs)."""
    if torch.cuda.is_available():
        fn()  # compiles and checks that it runs, outside any capture
        torch.cuda.synchronize()
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
        except Exception:  # not capturable: time plain launches
            torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _fitting(candidates: tuple[TileConfig, ...], fit_m: int) -> list[TileConfig]:
    """The candidates whose tiles fit ``fit_m`` rows; where none does (e.g. only the TMA candidates, all >= 128 rows,
    for M = 4) every candidate, smallest tiles first - the largest one can need more shared memory than the GPU has
    (a 278 KB tile failed on an H200 this way)."""
    return [c for c in candidates if _fits(c, fit_m)] or sorted(
        candidates, key=lambda c: (c.block_m * c.block_n, c.num_stages)
    )


def lookup(name: str, m: int, n: int, k: int, bits: int, device: torch.device) -> Optional[TileConfig]:
    """The shipped or cached configuration of this key, or None (never tunes; None off the GPU)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or device.type != "cuda":
        return None
    key = _key(name, m, n, k, bits, device)
    with _lock:
        _load_file()
        return _memory.get(key)


def _skipped(key: str, cfg: TileConfig, e: Exception) -> None:
    """A candidate the tuner skips: out of shared memory or registers is routine (logged at INFO); anything else
    (a launcher bug, a fault) is a WARNING - a silently skipped candidate once hid a broken split-K launcher."""
    routine = type(e).__name__ == "OutOfResources"
    _log.log(
        logging.INFO if routine else logging.WARNING,
        "tuning %s: skipped %s (%s: %s)",
        key,
        cfg,
        type(e).__name__,
        str(e)[:200],
    )


def pick_config(
    name: str,
    m: int,
    n: int,
    k: int,
    bits: int,
    device: torch.device,
    bench: Optional[Callable[[TileConfig], None]] = None,
    candidates: tuple[TileConfig, ...] = GPU_CANDIDATES,
    fit_m: Optional[int] = None,
) -> TileConfig:
    """The cached best configuration for this key, tuning it with ``bench`` on first use. A candidate's ``block_m``
    must fit ``fit_m`` (default ``m``; attention tiles its sequence length, not its batch x heads)."""
    fit_m = m if fit_m is None else fit_m
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or device.type != "cuda":
        return INTERPRET_CONFIG
    key = _key(name, m, n, k, bits, device)
    with _lock:
        _load_file()
        if key in _memory:
            return _memory[key]
    fitting = _fitting(candidates, fit_m)
    if bench is not None and compile_ahead.active():
        # the caller must not keep what a pass returns (the real forward checks that it runs, or times it)
        if os.environ.get("P4Q_AUTOTUNE", "1") == "0":
            return fitting[0]  # untimed picks are the first candidate that runs (below): the first one, compiled now
        # timing needs real launches: the real forward tunes this key. Its candidates compile now, in the pass's
        # pool, instead of one at a time while it tunes; the first one lets the rest of the forward compile too
        # (the pass used to stop at such a key: a fresh server's buckets with one untuned kernel then compiled
        # everything serially, 104 s to ready for ViT-B/32 in benchmarks/results/gpu_2026-12-02d)
        if key in compile_ahead.untuned():  # met before in this pass (another layer): already submitted
            return fitting[0]
        compile_ahead.note_untuned(key)
        for cfg in fitting:
            try:
                bench(cfg)
            except Exception:  # noqa: BLE001 - a candidate that cannot compile is skipped by the tuner as well
                continue
        return fitting[0]
    if bench is None:
        return fitting[0]
    if os.environ.get("P4Q_AUTOTUNE", "1") == "0":
        # no timing (parity runs, where every tiling computes the same integers): the first candidate that compiles
        # and runs on this GPU (a large tile may need more shared memory than it has), not cached
        for cfg in fitting:
            try:
                bench(cfg)
                return cfg
            except Exception:  # out of shared memory / registers: try the next one
                continue
        return fitting[0]
    import triton

    best, best_t = fitting[0], float("inf")
    for cfg in fitting:
        try:
            t = _time(lambda: bench(cfg), triton)
        except Exception as e:  # a config that does not compile or fit in shared memory is skipped
            _skipped(key, cfg, e)
            continue
        if t < best_t:
            best, best_t = cfg, t
    with _lock:
        _memory[key] = _user[key] = best
        _save_file()
    return best
