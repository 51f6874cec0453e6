"""pytest-benchmark microbenchmarks of 4-bit pack/unpack on a ViT-B/32 MLP matrix (768 x 3072), each checking the
benchmarked output. Few rounds, so a plain test run stays fast; ``--benchmark-only`` / ``--benchmark-disable``
work as usual, and ``benchmarks/bench_bitpack.py`` is the full throughput sweep."""

from __future__ import annotations

import pytest
import torch

from p4q_engine.artifact.bitpack import have_extension, pack, pack_reference, unpack

ROWS, K, BITS = 768, 3072, 4

pytestmark = pytest.mark.skipif(not have_extension(), reason="C++ extension not built")


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1 << BITS, (ROWS, K), generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.fixture(scope="module")
def planes(codes) -> list[torch.Tensor]:
    return pack_reference(codes, BITS)


@pytest.mark.parametrize("threads", [1, 0], ids=["1thread", "allthreads"])
def test_bench_pack_4bit(benchmark, codes, planes, threads):
    benchmark.extra_info.update(rows=ROWS, k=K, bits=BITS, threads=threads, unpacked_bytes=ROWS * K)
    out = benchmark.pedantic(
        pack, args=(codes, BITS), kwargs={"threads": threads}, rounds=5, iterations=1, warmup_rounds=1
    )
    assert len(out) == 1 and out[0].shape == (ROWS, K // 8) and out[0].dtype == torch.int32
    assert torch.equal(out[0], planes[0])


@pytest.mark.parametrize("threads", [1, 0], ids=["1thread", "allthreads"])
def test_bench_unpack_4bit(benchmark, codes, planes, threads):
    benchmark.extra_info.update(rows=ROWS, k=K, bits=BITS, threads=threads, unpacked_bytes=ROWS * K)
    out = benchmark.pedantic(
        unpack, args=(planes, BITS, K), kwargs={"threads": threads}, rounds=5, iterations=1, warmup_rounds=1
    )
    assert out.dtype == torch.uint8 and out.shape == (ROWS, K)
    assert torch.equal(out, codes)
