"""TMA plumbing of the persistent GEMM kernel: which problems it can take, their tensor descriptors, the grid."""

from __future__ import annotations

import os

import torch

from .tuning import TileConfig
from .weight_layout import PLANES as _PLANES
from .weight_layout import SUB_K, PackedWeight


def descriptors(a: torch.Tensor, w: PackedWeight, cfg: TileConfig):
    """TMA descriptors of A and the weight for ``cfg`` (A's box is one sub-tile wide for the interleaved layouts)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    w0, w1 = _PLANES[w.bits]
    if w.interleaved is not None:
        desc = TensorDescriptor.from_tensor(w.interleaved, [cfg.block_n, SUB_K])
        return TensorDescriptor.from_tensor(a, [cfg.block_m, SUB_K]), desc, desc
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    if w.direct is not None:
        desc = TensorDescriptor.from_tensor(w.direct, [cfg.block_n, cfg.block_k])
        return a_desc, desc, desc
    d0 = TensorDescriptor.from_tensor(w.planes[0], [cfg.block_n, cfg.block_k * w0 // 32])
    d1 = TensorDescriptor.from_tensor(w.planes[1], [cfg.block_n, cfg.block_k * w1 // 32]) if w1 else d0
    return a_desc, d0, d1


def _aligned(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, a contiguous last dimension and 16-byte aligned row strides."""
    return t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def tma_eligible(a: torch.Tensor, w: PackedWeight, cfg: TileConfig) -> bool:
    """Whether the TMA kernel can run this problem with ``cfg`` (else the pointer kernel runs the same tiles)."""
    if a.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if not _aligned(a):
        return False
    if w.direct is not None:
        return _aligned(w.direct)
    if w.interleaved is not None:
        return _aligned(w.interleaved)
    widths = [x for x in _PLANES[w.bits] if x]
    # each plane's box must be >= 16 bytes wide: block_k / (32 / width) words of 4 bytes
    return all(_aligned(p) and cfg.block_k * wd // 32 >= 4 for p, wd in zip(w.planes, widths))


_SM_COUNT: dict[int, int] = {}


def num_programs(device: torch.device) -> int:
    """Persistent grid size: one program per SM (a few under the interpreter, to exercise the tile loop)."""
    if device.type != "cuda":
        return 3
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
