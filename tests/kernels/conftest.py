"""Fixtures of the Triton kernel tests: the device, the interpreter guard and output poisoning.

Without a CUDA GPU the kernels run in Triton's numpy interpreter (``TRITON_INTERPRET=1``). The variable must be
set before ``triton.jit`` decorates the kernels, i.e. before the first ``import p4q_engine.kernels.*``; the root
``tests/conftest.py`` sets it, and the line below repeats it for a run rooted in this directory (pytest imports a
conftest before the test modules beside it). The autouse guard then checks that the kernels really were decorated
as interpreted functions - if something imported them earlier, every kernel test would otherwise die with an
obscure "no GPU" driver error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(scope="session", autouse=True)
def _interpreter_guard() -> None:
    if HAS_CUDA:
        return
    if not INTERPRET:
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
    from p4q_engine.kernels import layernorm, qattention, qgemm
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (qgemm._qgemm_kernel, qattention._qattention_kernel, layernorm._ln_quant_kernel):
        assert isinstance(kernel, InterpretedFunction), (
            "a Triton kernel was decorated before TRITON_INTERPRET=1 was set (imported before tests/conftest.py?)"
        )


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


class _TorchProxy:
    """``torch`` with ``empty`` replaced; everything else delegates to the real module."""

    def __init__(self, empty) -> None:
        self.empty = empty

    def __getattr__(self, name: str):
        return getattr(torch, name)


class PoisonedAlloc:
    """The buffers :func:`poisoned_empty` handed out: ``(padded buffer, logical size)``."""

    def __init__(self, sentinel: float) -> None:
        self.sentinel = sentinel
        self.buffers: list[tuple[torch.Tensor, tuple[int, ...]]] = []

    def assert_padding_untouched(self) -> None:
        """No kernel wrote outside the logical output (the padding still holds the sentinel everywhere)."""
        assert self.buffers, "the wrapper allocated nothing through torch.empty"
        for buf, size in self.buffers:
            inside = torch.zeros(buf.shape, dtype=torch.bool, device=buf.device)
            inside[tuple(slice(0, s) for s in size)] = True
            outside = buf[~inside]
            if buf.is_floating_point() and self.sentinel != self.sentinel:
                ok = torch.isnan(outside).all()
            else:
                ok = (outside == self.sentinel).all()
            assert bool(ok), f"kernel wrote outside its [{size}] output"


@contextlib.contextmanager
def poisoned_empty(module, sentinel: float, pad: int = 0) -> Iterator[PoisonedAlloc]:
    """Within the block, ``torch.empty`` *as seen by* ``module`` returns a view of a buffer filled with
    ``sentinel`` and padded by ``pad`` elements along every dimension (a non-contiguous view when ``pad > 0``, so
    the kernels' output strides are exercised too). Only the module's global name ``torch`` is replaced; torch
    itself is untouched."""
    alloc = PoisonedAlloc(sentinel)

    def empty(*size, dtype=None, device=None, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        size = tuple(int(s) for s in size)
        buf = torch.full(tuple(s + pad for s in size), sentinel, dtype=dtype, device=device)
        alloc.buffers.append((buf, size))
        return buf[tuple(slice(0, s) for s in size)]

    saved = module.torch
    module.torch = _TorchProxy(empty)
    try:
        yield alloc
    finally:
        module.torch = saved


@pytest.fixture
def poison():
    """``with poison(module, sentinel, pad) as alloc: ...`` (see :func:`poisoned_empty`)."""
    return poisoned_empty
