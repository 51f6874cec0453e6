"""Root test configuration.

Without a CUDA GPU the Triton kernels run in Triton's numpy interpreter. ``triton.jit`` decides between compiled
and interpreted functions when a kernel is *decorated* (``triton.runtime.jit.jit`` reads ``TRITON_INTERPRET`` at
import time of ``p4q_engine.kernels.*``), so the variable has to be set before any test module imports a kernel -
i.e. here, in the root conftest, which pytest imports before collecting ``tests/kernels`` or ``tests/runtime``.
"""

import os

import torch

#: ``tests.cuda_poison``: one sticky CUDA fault skips the later GPU tests instead of failing each; ``pytester``: its
#: own test runs pytest inside pytest
pytest_plugins = ["tests.cuda_poison", "pytester"]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config) -> list[str]:
    """Versions and device at the top of every run, so a committed GPU test log says where it ran."""
    import datetime

    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU (Triton interpreter)"
    now = datetime.datetime.now(datetime.timezone.utc)
    return [
        f"p4q-engine: {now:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, triton {triton.__version__}, device {dev}"
    ]
