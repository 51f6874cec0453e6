#!/bin/bash
# Rebuild .raybundle/ray312.tar.xz (run on the dev machine, which has PyPI; ~2 min of xz on 2 cores).
# Needs: a python with pip (PY), the ray cp312 wheel (RAYWHL), strip, xz.
set -euo pipefail
PY=${PY:-/work/venv/bin/python}
RAYWHL=${RAYWHL:-/tmp/raywh/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl}
W=${W:-/tmp/raybundle/wheels}; S=${S:-/tmp/raybundle/site}
OUT=${OUT:-$(cd "$(dirname "$0")/../.." && pwd)/.raybundle/ray312.tar.xz}
mkdir -p "$W"
mkdir -p "$(dirname "$OUT")"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$W" \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 opentelemetry-api==1.45.2 \
  grpcio-reflection==1.85.1 python-multipart==0.0.34
rm -rf "$S" && mkdir -p "$S" && cd "$S"
unzip -q "$RAYWHL"
for w in "$W"/*.whl; do unzip -q -o "$w"; done   # a wheel is a zip: extracting it = pip install --target (dist-info kept)
# ---- trim (what p4q-engine never needs at run time)
rm -rf ray/jars                                   # Java workers (ray_dist.jar, 34 MB)
rm -rf ray/rllib ray/tune ray/train ray/llm       # RLlib, Tune, Train, ray.llm (vLLM)
rm -rf ray/dashboard/client                       # dashboard web UI build (no dashboard: include_dashboard=False)
rm -rf ray/_private/runtime_env/agent/thirdparty_files   # vendored aiohttp & co.: the target python has them
rm -rf ray/serve/_private/benchmarks ray/air/examples
find . -depth -type d \( -name tests -o -name benchmarks -o -name __pycache__ \) -exec rm -rf {} +
find . -type f \( -name "*.pxd" -o -name "*.pyx" -o -name "*.pyc" \) -delete
find ./httptools -type f \( -name "*.c" -o -name "*.h" \) -delete
find . -type f \( -name "*.so" -o -name "*.so.*" -o -path "*/core/src/ray/raylet/raylet" -o -path "*/core/src/ray/gcs/gcs_server" \) -print0 |
  while IFS= read -r -d '' f; do if head -c4 "$f" | grep -q ELF; then strip --strip-unneeded "$f"; fi; done
# ---- pack
tar -C "$S" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | xz -9e -T2 > "$OUT"
ls -l "$OUT"; sha256sum "$OUT"
