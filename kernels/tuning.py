"""Tile configurations for the Triton kernels, autotuned once per (GPU, shape bucket, bits) and cached on disk.

Nothing is tuned at import time; ``P4Q_AUTOTUNE=0`` turns timing off altogether (first fitting candidate). The first
call of a kernel at a new key times a small candidate list with ``triton.testing.do_bench`` and stores the winner in
memory and in a JSON file (``$P4Q_TUNE_CACHE`` or ``~/.cache/p4q_engine/tuning.json``), so later processes start
with the tuned configuration. Under ``TRITON_INTERPRET=1`` (CPU) a single small configuration is used.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch


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


INTERPRET_CONFIG = TileConfig(32, 32, 64, 4, 4, 1)

#: Candidates for Hopper/Ampere-class GPUs: large tiles for the M = 51200 GEMMs, thin ones for batch 1 (M = 50).
GPU_CANDIDATES: tuple[TileConfig, ...] = (
    TileConfig(128, 128, 128, 8, 8, 3),
    TileConfig(128, 256, 128, 8, 8, 3),
    TileConfig(256, 128, 128, 8, 8, 3),
    TileConfig(128, 128, 64, 8, 4, 4),
    TileConfig(64, 128, 128, 8, 4, 4),
    TileConfig(128, 64, 128, 8, 4, 4),
    TileConfig(64, 64, 128, 8, 4, 4),
    TileConfig(32, 64, 128, 8, 4, 4),
    TileConfig(16, 64, 256, 8, 4, 3),
    TileConfig(16, 128, 128, 8, 4, 4),
    TileConfig(32, 128, 256, 8, 4, 3),
    TileConfig(128, 256, 128, 8, 8, 4),
    TileConfig(256, 128, 128, 8, 8, 4),
    TileConfig(16, 32, 256, 8, 2, 3),
    TileConfig(16, 64, 128, 8, 2, 4),
    TileConfig(32, 32, 128, 8, 2, 4),
    # persistent TMA kernels: for the long-M GEMMs, where the short K (768) leaves a one-tile-at-a-time kernel
    # spending much of its time filling the pipeline and in the epilogue
    TileConfig(128, 256, 128, 8, 8, 3, "tma"),
    TileConfig(128, 128, 128, 8, 8, 4, "tma"),
    TileConfig(128, 128, 128, 8, 4, 4, "tma"),
    TileConfig(256, 128, 128, 8, 8, 3, "tma"),
    TileConfig(128, 256, 64, 8, 8, 4, "tma"),
    TileConfig(64, 128, 128, 8, 4, 4, "tma"),
)

_lock = threading.Lock()
_memory: dict[str, TileConfig] = {}
_loaded = False


def cache_path() -> Path:
    return Path(os.environ.get("P4Q_TUNE_CACHE", Path.home() / ".cache" / "p4q_engine" / "tuning.json"))


def _m_bucket(m: int) -> int:
    b = 16
    while b < m:
        b *= 2
    return b


def _key(name: str, m: int, n: int, k: int, bits: int, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{gpu}|{name}|m{_m_bucket(m)}|n{n}|k{k}|b{bits}"


def _load_file() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        data = json.loads(cache_path().read_text())
        _memory.update({k: TileConfig(**v) for k, v in data.items()})
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable, not JSON, not {key: config}
        pass


def _save_file() -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in _memory.items()}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-tuning in the next process


def _fits(cfg: TileConfig, m: int) -> bool:
    return cfg.block_m <= max(16, _m_bucket(m))


def pick_config(
    name: str,
    m: int,
    n: int,
    k: int,
    bits: int,
    device: torch.device,
    bench: Optional[Callable[[TileConfig], None]] = None,
    candidates: tuple[TileConfig, ...] = GPU_CANDIDATES,
) -> TileConfig:
    """The cached best configuration for this key, tuning it with ``bench`` on first use."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or device.type != "cuda":
        return INTERPRET_CONFIG
    key = _key(name, m, n, k, bits, device)
    with _lock:
        _load_file()
        if key in _memory:
            return _memory[key]
    fitting = [c for c in candidates if _fits(c, m)] or [candidates[0]]
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

    best, best_t = candidates[0], float("inf")
    for cfg in (c for c in candidates if _fits(c, m)):
        try:
            t = triton.testing.do_bench(lambda: bench(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not compile or fit in shared memory is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    with _lock:
        _memory[key] = best
        _save_file()
    return best
