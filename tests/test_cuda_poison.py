"""``tests/cuda_poison.py``: a sticky CUDA error skips the later GPU tests; any other failure skips nothing."""

from __future__ import annotations

import pytest

from tests.cuda_poison import sticky_cuda_error

INNER = """
import pytest

@pytest.fixture
def device():
    return "cuda"

@pytest.mark.gpu
def test_a_faults():
    raise RuntimeError({message!r})

@pytest.mark.gpu
def test_b_gpu():
    pass

def test_c_cpu_only():
    pass

def test_d_uses_the_device(device):
    pass
"""


def _run(pytester: pytest.Pytester, message: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    pytester.makepyfile(INNER.format(message=message))
    return pytester.runpytest_inprocess("-p", "tests.cuda_poison", "-q", "-rs")


def test_sticky_error_skips_the_later_gpu_tests(pytester):
    res = _run(pytester, "CUDA error: an illegal memory access was encountered")
    res.assert_outcomes(failed=1, skipped=2, passed=1)
    res.stdout.fnmatch_lines(["*poisoned by a sticky error in test_*.py::test_a_faults*"])


def test_other_failures_skip_nothing(pytester):
    """The control: the same failure without a sticky CUDA error leaves every other test to run."""
    _run(pytester, "CUDA out of memory. Tried to allocate 2.00 GiB").assert_outcomes(failed=1, passed=3)


@pytest.mark.parametrize(
    "text,sticky",
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("RuntimeError: CUDA error: unspecified launch failure", True),
        ("CUDA out of memory. Tried to allocate 20.00 MiB", False),
        ("illegal memory access in my numpy code", False),  # not a CUDA error
    ],
)
def test_classification(text, sticky):
    assert sticky_cuda_error(text) is sticky
