#!/usr/bin/env bash
# Issue 14's one-GPU measurements (called by benchmarks/gpu_session.sh call3 with the results folder): a ViT-B/32
# 8-8-8 random-weight 224 px artifact served by the single-process server (decode threads, processes, nvJPEG) and by
# Ray Serve (decoding in HTTP replicas), against the engine's own images/s (on 2026-12-01 also the dataset job as a
# Ray Data pipeline). Ray comes from the carried bundle (.raybundle, see benchmarks/ray_bundle/README.md).
set -u -o pipefail
R=${1:?usage: ray_gpu_session.sh RESULTS_DIR}
if [ -f ../.raybundle/ray312.tar.xz ]; then
  mkdir -p /tmp/site && python3 -c "import tarfile; tarfile.open('../.raybundle/ray312.tar.xz').extractall('/tmp/site', filter='tar')"
fi
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
# a fresh tuning cache: the first server start-up uses the shipped H200 table alone (issue 11: ready in < 20 s)
export P4Q_TUNE_CACHE=/tmp/fresh_tune.json
rm -f /tmp/fresh_tune.json
timeout 150 python3 - <<'PY' >"$R/log_artifact.txt" 2>&1
import time
from pathlib import Path

import torch

from benchmarks.vit_bench import build_artifact
from p4q_engine.clip.loading import load_clip

t0 = time.perf_counter()
torch.manual_seed(0)
build_artifact(load_clip("ViT-B-32"), "8-8-8", Path("/tmp/b32_888.p4q"))
print(f"artifact in {time.perf_counter() - t0:.1f} s")
PY
# 2026-12-02: the engine ceiling, then Ray Serve (decoding in 6 HTTP replicas), then the best single-process server of
# 2026-12-01 (--decode-processes 6) with the numpy preprocessing tail; Ray Data and the smoke test ran on 2026-12-01
RB="python3 benchmarks/ray_bench.py --artifact /tmp/b32_888.p4q --device cuda --threads 4 --out-dir $R"
timeout "${RAY_SERVE_SECONDS:-220}" $RB --only serve --configs 3,1 --levels 1,8,64,256 --requests 500 --time-limit 10 \
  >"$R/log_ray_serve.txt" 2>&1
echo "ray_bench serve rc=$?" >>"$R/log_ray_serve.txt"
cp /tmp/fresh_tune.json "$R/tuning_serve.json" 2>/dev/null
