"""The largest tensors the Triton kernels index: their offsets are int32 (row * stride + column), so every tensor a
kernel reads or writes must hold fewer than 2^31 elements. Callers with more (a huge batch) split it - the kernel
engine runs batches in chunks (``KernelEngine.max_chunk``); a direct call past the limit is a clear error, never a
wrapped offset."""

from __future__ import annotations

#: Elements a kernel operand may hold.
MAX_ELEMENTS = 2**31 - 1


def check_extent(kernel: str, **numels: int) -> None:
    """Raise ``ValueError`` naming the operand when one holds more than ``MAX_ELEMENTS`` elements."""
    for name, n in numels.items():
        if n > MAX_ELEMENTS:
            raise ValueError(
                f"{kernel}: {name} holds {n} elements, more than the {MAX_ELEMENTS} the kernels index with int32 "
                "offsets; split the batch"
            )
