"""Root test configuration.

Without a CUDA GPU the Triton kernels run in Triton's numpy interpreter. ``triton.jit`` decides between compiled
and interpreted functions when a kernel is *decorated* (``triton.runtime.jit.jit`` reads ``TRITON_INTERPRET`` at
import time of ``p4q_engine.kernels.*``), so the variable has to be set before any test module imports a kernel -
i.e. here, in the root conftest, which pytest imports before collecting ``tests/kernels`` or ``tests/runtime``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
