#!/usr/bin/env bash
# The GPU check: CUDA tests and GPU benchmarks in one run on one H200 (measured separately this far: engine CUDA
# tests 26 s, attention grid ~150 s of compiling, linear tests 42 s, kernel table 46 s, attention 20 s, decode of the
# 1B shape ~40 s per two batch sizes; each section is capped, the caps add up to about 11 minutes).
#   bash benchmarks/device_check.sh OUT_DIR
# Runs from the repository root with the machine's own python3 and packages (PYTHONPATH=., no install; no Ray,
# no lmcache needed). Writes each section's output to OUT_DIR/*.txt and the benchmarks' JSON beside them;
# a failing section is reported and the next one still runs; the exit code is the number of failed sections.
set -u
out="${1:?usage: benchmarks/device_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
failed=0
section() {  # section NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
# (a) the CUDA tests: engine vs the CPU path, attention kernels, quantized linears
section cuda_tests 300 python3 -m pytest -q -rs -p no:cacheprovider -m cuda \
  tests/test_engine_cuda.py tests/test_paged_attention_triton.py tests/test_gpu_linear.py
# (c) each weight format at M = 1, 16, 128 on the 1B shapes vs bf16 F.linear
section kernels 90 python3 benchmarks/kernels_gpu.py --out "$out"
# attention kernels vs the torch reference at decode
section attention 60 python3 benchmarks/attention.py --out "$out"
# (b) + (d) decode tokens/s vs transformers generate with the HBM roofline; CUDA graphs vs eager at batch 1
section decode 240 python3 benchmarks/decode_gpu.py --out "$out"
echo "=== device check done: $failed failed section(s)"
exit "$failed"
