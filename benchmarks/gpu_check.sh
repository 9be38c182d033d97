#!/usr/bin/env bash
# The GPU checks of issue 17 in one call (about 8 minutes at most), for a session lent a GPU:
#   1. build loratools._C with the CUDA kernels (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise)
#   2. the CUDA tests (kernel, streamed merge, device memory, blend/resize/extract on the device)
#   3. bench_kernels.py --device cuda   merge_ bandwidth vs a device copy (target >= 70%, bf16 rank 16)
#   4. bench_merge.py --device cuda     end-to-end merge of the ~1 GB bf16 model vs copying the folder
#                                       (and --device cpu beside it)
#   5. bench_device.py --device cuda    blend / resize / extract: CUDA speed-up over the CPU
# Logs go to $OUT/<step>.log and a summary to $OUT/gpu_summary.txt. A step that fails or runs out
# of time is recorded and the next one still runs; steps are skipped once the budget is spent.
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (BUDGET=seconds, default 470)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_summary.txt"
BUDGET=${BUDGET:-470}
PY=${PYTHON:-python3}
WORK=${WORKDIR:-/tmp/loratools-gpu-bench}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the built tree, not an installed loratools
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
: > "$SUMMARY"

say() { echo "$@" | tee -a "$SUMMARY"; }

# step NAME LIMIT_SECONDS GREP_PATTERN COMMAND...: run with the smaller of its limit and what is left
step() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    say "== $name: SKIPPED (budget spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  say "== $name: rc=$rc in $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo " (TIMED OUT at ${limit} s)")"
  grep -E "$pattern" "$OUT/$name.log" | tail -n 40 >> "$SUMMARY"
  [ $rc -ne 0 ] && tail -n 15 "$OUT/$name.log" | sed 's/^/    | /' >> "$SUMMARY"
}

say "gpu_check $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET} s"
$PY - <<'PY' 2>&1 | tee -a "$SUMMARY"
import torch, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
PY

step build 240 "error|Error|built with CUDA" bash -c "
  LORATOOLS_FORCE_CUDA=1 $PY setup.py -q build_ext --inplace && $PY - <<'PY'
import torch
from loratools import ops
assert ops.HAVE_EXTENSION, 'loratools._C did not build'
w = torch.randn(256, 384, device='cuda', dtype=torch.bfloat16)
u, d = torch.randn(256, 16, device='cuda'), torch.randn(16, 384, device='cuda')
ref = ops.merge_reference_(w.clone(), [u], [d], [0.5])
torch.ops.loratools.merge_(w, [u], [d], [0.5])
step = ref.float().abs() * 2.0 ** -7 + 1e-30  # one bf16 rounding step
assert bool(((w.float() - ref.float()).abs() <= step).all()), 'CUDA merge_ disagrees with the reference'
print('loratools._C built with CUDA: merge_ on', torch.cuda.get_device_name(), 'agrees with the reference')
PY"

step tests 150 "passed|failed|error|skipped|SKIPPED" \
  $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_ops.py tests/test_cuda_merge.py tests/test_kernels.py

step bench_kernels 90 "torch|shape|bf16| fp16| fp32|TARGET" $PY benchmarks/bench_kernels.py --device cuda --runs 5

step bench_merge_cuda 150 "model:|loratools|plain copy|contender|GB/s" \
  $PY benchmarks/bench_merge.py --device cuda --skip-peft --repeat 2 --workdir "$WORK"

step bench_merge_cpu 60 "loratools|plain copy" \
  $PY benchmarks/bench_merge.py --device cpu --skip-peft --repeat 1 --workdir "$WORK"

step bench_device 150 "model:|operation|blend|resize|extract" \
  $PY benchmarks/bench_device.py --device cuda --layers 2 --repeat 1 --workdir "$WORK"

say "gpu_check done in $(( $(date +%s) - START )) s"
