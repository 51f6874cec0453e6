"""The engine profile's per-site ranges: each GEMM call is named by its shape and epilogue, and summed per name."""

from __future__ import annotations

import torch

from benchmarks.vit_bench import SITE_LABELS, site_times


class _W:
    n, k, bits = 3072, 768, 4


def test_gemm_labels_name_shape_width_and_epilogue():
    label = SITE_LABELS["qgemm"]
    assert label((None, 0.1, 3, _W()), {"act": "gelu", "requant": object()}) == "qgemm n3072 k768 w4 gelu+requant"
    assert label((None, 0.1, 3, _W()), {"residual": torch.zeros(1)}) == "qgemm n3072 k768 w4 +res"
    assert label((None, 0.1, 3, _W()), {}) == "qgemm n3072 k768 w4 float"


def test_site_times_sums_calls_per_label():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with torch.profiler.record_function("qgemm n8 k8 w8 float"):
                torch.ones(4) @ torch.ones(4)
        with torch.profiler.record_function("not a site"):
            torch.ones(4).sum()
    sites = site_times(prof)
    assert list(sites) == ["qgemm n8 k8 w8 float"] and sites["qgemm n8 k8 w8 float"]["calls"] == 3
