#!/usr/bin/env bash
# The device calls of the next GPU session (written 2026-12-02; this session's device time had been spent by the
# previous try at the same work), so what runs is in the repository word for word.
#
# Run on the device machine from a `git archive` of HEAD unpacked in .gpurun (wheels in ../.whl):
#     cd .gpurun && bash benchmarks/gpu_session.sh call1
# Each call writes everything into $OUT/r and packs it as $OUT/<call>.tgz (the device returns at most 8 files).
# CPU-side parity (CPU engine vs fake-quant, GPU vs CPU engine) runs on cores 8-15 beside the timed work on cores
# 0-7: the speed rows share the GPU only with that process's batch-1 forwards and calibration.
# Every step times the engine first, then the compile and fp8 peers, in one process per model; a shape the shipped
# table lacks (ViT-H/14, ViT-L/14-336, the packed low-bit main loop) is tuned inside its step, into $OUT/r/tuning.json,
# which `tune_tables.py --from-cache` merges into kernels/tuned on the CPU machine afterwards.
# Step sizes (from the previous session's logs): a peer row costs its compile (7-37 s) + ~5 s of timing; a new
# model's engine tuning ~70-150 s at batch 256. The three calls add up to ~26 min of commands: start call2 and call3
# right after the previous one returns (the machine is given back after 30 s idle). Afterwards, on the CPU machine:
#     python benchmarks/tune_tables.py --from-cache <r>/tuning.json --gpu "NVIDIA H200" --measured "..."
# for each call's tuning.json (the packed and ws entries have keys of their own and stay opt-in).
set -u -o pipefail
cd "$(dirname "$0")/.."
call=${1:?usage: gpu_session.sh call1|call2|call3}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 P4Q_TUNE_CACHE=$OUT/r/tuning.json
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "build_ext failed"
ln -sfn ../kernels p4q_engine/kernels
R=$OUT/r
mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$R/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)" >>"$R/gpu.txt"
VB="python3 benchmarks/vit_bench.py --out $R"
ALL=ViT-B-16,ViT-L-14,ViT-H-14,ViT-L-14-336

parity() {  # $1: bits, $2: seconds; GPU vs CPU engine (tie rule) with this commit's attention, every model
  P4Q_AUTOTUNE=0 P4Q_TUNE_CACHE=/tmp/parity_tune.json OMP_NUM_THREADS=8 taskset -c 8-15 timeout "$2" \
    $VB --parts models --models "ViT-B-32,$ALL" --bits "$1" --batches 1 --no-peers \
    --parity-images 1 --tag "_parity${1//-/}" >"$R/log_parity${1//-/}.txt" 2>&1
}

pack() {  # after every step: a call cut short by the device-time limit still returns what it finished
  tar -czf "$OUT/$call.tgz" -C "$OUT" r
}

speed() {  # $1: model, $2: bits, $3: seconds, $4: tag, $5: batches; engine vs peers, from the shipped table
  taskset -c 0-7 timeout "$3" $VB --parts models --models "$1" --bits "$2" --batches "$5" --no-parity \
    --no-eager "${@:6}" --tag "$4" >"$R/log$4.txt" 2>&1
  pack
}

case $call in
  call1)
    parity 8-8-8 480 &
    P=$!
    P4Q_AUTOTUNE=0 taskset -c 0-7 timeout 140 python3 -m pytest -m gpu tests/kernels tests/runtime \
      tests/runtime/test_kernel_engine.py -q -p no:cacheprovider >"$R/pytest_gpu.log" 2>&1
    speed ViT-B-32 8-8-8 210 _b32 1024,256,64,8,1
    speed ViT-B-16 8-8-8 150 _b16 256,64,1 --no-drift
    wait $P
    ;;
  call2)
    parity 4-4-8 540 &
    P=$!
    speed ViT-L-14 8-8-8 200 _l14 256,64,1 --no-drift
    speed ViT-H-14 8-8-8 360 _h14 256,64,1 --no-drift
    wait $P
    ;;
  call3)
    speed ViT-L-14-336 8-8-8 340 _l14_336 256,64,1 --no-drift
    speed ViT-B-32 4-4-8 45 _b32_448 1024,256,64,8,1 --no-peers
    P4Q_NIB_PACKED=1 speed ViT-B-32 4-4-8 80 _b32_448_packed 1024,256,64,8,1 --no-peers
    ;;
esac
pack
ls -la "$R"
