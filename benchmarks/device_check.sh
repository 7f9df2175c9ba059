#!/usr/bin/env bash
# The GPU check: CUDA tests and GPU benchmarks in one run on one H200, within a wall-clock budget.
#   bash benchmarks/device_check.sh OUT_DIR [BUDGET_S]      (BUDGET_S default 450: the check must end in 8 min)
# Runs from the repository root with the machine's own python3 and packages (PYTHONPATH=., no install; no Ray,
# no LMCache needed). Each section writes OUT_DIR/<section>.txt and its JSON beside it. Every section has a
# cap and never runs past the budget: it gets min(cap, time left); a section with under 20 s left is skipped
# and reported. A failing section is reported and the next one still runs; the exit code is the number of
# failed or skipped sections. Sections, most needed first:
#   cuda_tests  (issue 12 (a), issue 13 items 1/3/6): five pytest processes at once (triton compiles on the
#               CPU cores, the compiled attention grid is split by dtype): engine + offload, attention x3,
#               quantized linears. Measured earlier: engine 26 s, attention grid ~150 s in one process.
#   residency   (13 item 3): static / LRU / prefetch cold-hit rates on the routing trace (pure Python, ~3 s).
#   decode      (12 (b) + (d)): Llama-3.2-1B and Qwen3-30B-A3B (2 layers) bf16 tok/s at batch 1/8/32/128 vs
#               transformers generate, HBM roofline, CUDA graphs vs eager at batch 1.
#   kernels     (12 (c)): each weight format at M = 1/16/128 on the 1B shapes vs bf16 F.linear (46 s before).
#   offload     (13 (a)): GPU worker + 2 expert-host processes, trace routing, residency 100/50/25/10 %,
#               batch 1 and 8, % of all-resident and the hardware bound; at 25 % a 16-slot spare ring with
#               prefetch none vs previous_step (13 item 3: tok/s, rows in slots, prefetch issued/used/wasted).
#   kv_tiers    (13 (b)): TTFT of a 4k-token shared prefix: recompute, GPU-page hit, DRAM (copy path here);
#               host time of storing the prefix: synchronous gather vs asynchronous (13 item 6).
#   attention   (extra, last): paged decode attention torch vs triton vs kv4 (20 s before).
set -u
out="${1:?usage: benchmarks/device_check.sh OUT_DIR [BUDGET_S]}"
budget="${2:-450}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
start=$(date +%s)
failed=0
left() { echo $(( budget - ($(date +%s) - start) )); }
limit_for() {  # limit_for CAP -> seconds this section may run (0: skip)
  local cap=$1 l; l=$(left)
  [ "$l" -lt 20 ] && { echo 0; return; }
  [ "$cap" -lt "$l" ] && echo "$cap" || echo "$l"
}
section() {  # section NAME CAP COMMAND...
  local name=$1 limit; limit=$(limit_for "$2"); shift 2
  if [ "$limit" -eq 0 ]; then
    echo "=== $name SKIPPED: budget spent" | tee "$out/$name.txt"; failed=$((failed + 1)); return
  fi
  echo "=== $name ($(date +%T), up to ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
}
parallel_tests() {  # the cuda-marked tests in five processes; exit code: how many failed
  local limit=$1 bad=0 pids=() names=()
  local py="python3 -m pytest -q -rs -p no:cacheprovider -m cuda"
  run_bg() { local name=$1; shift; timeout "$limit" "$@" > "$out/cuda_tests_$name.txt" 2>&1 & pids+=($!); names+=("$name"); }
  run_bg engine $py tests/test_engine_cuda.py tests/test_offload_cuda.py tests/test_kv_tiers_cuda.py \
    tests/test_kv_tiers_async_cuda.py tests/test_prefetch_cuda.py
  run_bg attn_bf16 $py tests/test_paged_attention_triton.py -k bfloat16
  run_bg attn_fp16 $py tests/test_paged_attention_triton.py -k "float16 and not bfloat16"
  run_bg attn_fp32 $py tests/test_paged_attention_triton.py -k float32
  run_bg linear $py tests/test_gpu_linear.py
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then echo "--- ${names[$i]}: passed"; else echo "--- ${names[$i]}: FAILED"; bad=$((bad + 1)); fi
    tail -n 4 "$out/cuda_tests_${names[$i]}.txt"
  done
  return "$bad"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
echo "cpus $(python3 -c 'import os; print(os.cpu_count())'); budget ${budget} s" | tee -a "$out/gpu.txt"
limit=$(limit_for 170)
echo "=== cuda_tests ($(date +%T), up to ${limit} s)"
parallel_tests "$limit" 2>&1 | tee "$out/cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "=== cuda_tests FAILED"; failed=$((failed + 1)); }
section residency 20 python3 benchmarks/residency_policy.py --out "$out"
section decode 120 python3 benchmarks/decode_gpu.py --out "$out" --batches 1,8,32,128 --prompt-len 64 \
  --new-tokens 32 --moe-layers 2
section kernels 50 python3 benchmarks/kernels_gpu.py --out "$out"
section offload 100 python3 benchmarks/offload_gpu.py --out "$out" --layers 2 --residency 100,50,25,10 \
  --batches 1,8 --prompt-len 16 --new-tokens 8 --host-threads 6 --prefetch-residency 25 --spare-slots 16
section kv_tiers 35 python3 benchmarks/kv_tiers_gpu.py --out "$out" --prefix 4096 --repeats 3
section piecewise 100 bash -c 'python3 -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_piecewise_graphs_cuda.py && python3 benchmarks/piecewise_graphs_gpu.py --out "$0"' "$out"  # 13 item 2
section attention 30 python3 benchmarks/attention.py --out "$out" --reps 10
echo "=== device check done in $(( $(date +%s) - start )) s: $failed failed or skipped section(s)"
exit "$failed"
