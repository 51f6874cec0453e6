"""Pytest plugin: after a *sticky* CUDA error, skip the tests that need the GPU instead of failing them all.

An illegal memory access, a device-side assert or a launch failure poisons the process's CUDA context: every later
CUDA call fails with the same error (2026-12-02b: one faulting kernel, then 44 failures that said nothing new). Once
a test fails that way, every later test that uses the GPU (marked ``gpu``, or taking the ``device`` fixture, which
is ``cuda`` on a GPU machine) is skipped with the name of the test that faulted, so the log shows one failure and its
cause. To test the rest, run each module in its own process (``benchmarks/gpu_session.sh``: ``gpu_tests``).
"""

from __future__ import annotations

import pytest

#: Lower-case fragments of the CUDA errors that leave the context unusable.
STICKY = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
)
_FAULT = pytest.StashKey[str]()


def sticky_cuda_error(text: str) -> bool:
    """Whether an error message is one of the sticky CUDA errors."""
    t = text.lower()
    return "cuda" in t and any(s in t for s in STICKY)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _FAULT not in item.config.stash:
        if sticky_cuda_error(str(call.excinfo.value)):
            item.config.stash[_FAULT] = item.nodeid


def pytest_runtest_setup(item: pytest.Item) -> None:
    fault = item.config.stash.get(_FAULT, None)
    if fault is not None and (item.get_closest_marker("gpu") is not None or "device" in item.fixturenames):
        pytest.skip(f"CUDA context poisoned by a sticky error in {fault}; run this module in its own process")
