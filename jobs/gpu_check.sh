#!/usr/bin/env bash
# The GPU check, in one go (under 8 minutes on one H100/H200 node):
#   1. the gpu-marked tests (the batch-norm fold check on CUDA with TF32 on, decode on the device);
#   2. the demo on CUDA (real models, planted revolvers, phase timings);
#   3. ngt-ray benchmark on $N_IMAGES JPEGs of 500x375 built there in parallel: (a) plain Ray Data
#      recipe, (b) ngt-ray without grouping, (c) with group testing, (d) the cascade design, as
#      ratios to (a) in one run; GPU utilisation sampled throughout, and each run's warm-up,
#      closed set of call shapes and cold calls;
#   4. --runtime compiled on part of the same bucket: compile seconds, cache hits, cold calls.
# The last lines of steps.log sum it up: the ratios, GPU busy, cold calls, warm-up and compile time.
# Writes docs/benchmarks/<device>.json and docs/benchmarks.md, and copies them with the logs to $OUT
# (8 files: steps, dmon, the benchmark's and four other step logs, the JSON; the markdown is rebuilt
# from the JSON here).
#
# On the lent GPU machine (see ../shared/device/README.md): build the kit and the photos here,
#   bash ../shared/device/make-bundle.sh && python jobs/gpu_data.py
# move checkpoints the run does not load out of the tree, then run with carry [".devbundle", ".gpudata"]:
#   source .devbundle/setup.sh && bash jobs/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/ngt-ray-gpu-check}
N_IMAGES=${N_IMAGES:-12000}
mkdir -p "$OUT"
export NGT_RAY_DATA=${NGT_RAY_DATA:-$PWD/.gpudata} RAY_DATA_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi > "$OUT/steps.log" 2>&1
nvidia-smi dmon -s u -d 1 > "$OUT/dmon.log" 2>&1 &
dmon=$!
step() {  # step NAME SECONDS COMMAND...: run under a timeout, log to $OUT/NAME.log, go on either way
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
    tail -n 25 "$OUT/$name.log" | grep -v "^\s*$" | tail -n 12
}
step gpu-tests 100 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_fold.py
step probe 45 $py jobs/gpu_probe.py
step demo 90 $py -m ngt_ray.cli demo --device cuda --max-images 600 --workdir /tmp/ngt-demo
step benchmark 240 $py -m ngt_ray.cli benchmark --device cuda --n-images "$N_IMAGES" --workdir /tmp/ngt-bench \
    --output docs/benchmarks --markdown docs/benchmarks.md --compare-decode
cp docs/benchmarks/nvidia-*.json "$OUT/" 2>/dev/null  # $OUT returns at most 8 files
if [[ -z "${SKIP_COMPILED:-}" ]]; then  # a short lease skips it
    mkdir -p /tmp/ngt-compiled && ls /tmp/ngt-bench/bucket 2>/dev/null | head -n 3000 | \
        while read -r f; do ln -f "/tmp/ngt-bench/bucket/$f" "/tmp/ngt-compiled/$f"; done
    step compiled 100 $py -m ngt_ray.cli moderate --device cuda --runtime compiled --input /tmp/ngt-compiled \
        --output /tmp/ngt-compiled-out --overwrite
fi
kill "$dmon" 2>/dev/null
$py jobs/gpu_check_summary.py docs/benchmarks /tmp/ngt-compiled-out/stats.parquet >> "$OUT/steps.log" 2>&1
cat "$OUT/steps.log"
