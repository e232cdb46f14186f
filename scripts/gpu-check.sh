#!/usr/bin/env bash
# Every GPU test and benchmark in one call, on a GPU machine that has no Rust: the binaries are
# built elsewhere (scripts/gpu-pack.sh, which leaves stripped copies in target/gpu/) and copied
# over with the checkout. Prints a short table last. Exit status: non-zero when any test failed.
#
#   scripts/gpu-check.sh            # from the repository root
#   KILN_GPU_SUMMARY=$OUT/summary.txt scripts/gpu-check.sh   # also write each table row as it is known
#
# KILN_GPU_CHECK_SMOKE=1 runs the same stages on small shapes and without the test binaries (or
# those KILN_GPU_CHECK_TESTS names): how tests/gpu_check_script.rs checks this script's own plumbing
# on the emulated GPU (its figures mean nothing there).
#
# Finds the CUDA libraries of the machine's PyTorch install (or TORCH_VENV), gives NCCL the
# libnccl.so name cudarc loads, and points NVRTC at cuda_bf16.h.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${TORCH_VENV:-/opt/torch/.venv}
PY=$VENV/bin/python
SITE=$(ls -d "$VENV"/lib/python3*/site-packages 2>/dev/null | head -1)
LIBS=$(mktemp -d)
trap 'rm -rf "$LIBS"' EXIT
for d in "$SITE"/nvidia/*/lib; do LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
nccl=$(ls "$SITE"/nvidia/nccl/lib/libnccl.so.2 2>/dev/null | head -1)
[ -n "$nccl" ] && ln -s "$nccl" "$LIBS/libnccl.so"
export LD_LIBRARY_PATH="$LIBS:$LD_LIBRARY_PATH"
inc=$(ls -d "$SITE"/nvidia/cu13/include "$SITE"/nvidia/cuda_runtime/include 2>/dev/null | head -1)
[ -n "$inc" ] && export KILN_CUDA_INCLUDE="$inc"
export KILN_REQUIRE_GPU=1 KILN_REQUIRE_NVRTC=1 RUST_BACKTRACE=1

if [ "${KILN_GPU_CHECK_SMOKE:-0}" = 1 ]; then
  COMM_MB=4 TESTS=${KILN_GPU_CHECK_TESTS:-} ATTN=(--batch 1 --seq 128 --heads 8 --iters 1)
  TRAIN=(--preset tiny --batch 2 --seq 64) STEPS=(--steps 1 --warmup 1) FSDP_STEPS=(--steps 1 --warmup 1)
else
  COMM_MB=256 TESTS="kernels gpu gpu_model gpu_fsdp" ATTN=()
  TRAIN=(--preset tinyllama-1.1b --batch 8 --seq 2048) STEPS=(--steps 10 --warmup 3) FSDP_STEPS=(--steps 4 --warmup 2)
fi

declare -a rows
status=0
# Set when a FlashAttention-2 build may be broken on this card: the step benchmarks then run the
# default builds untimed (KILN_FA_AUTOTUNE=0) rather than let the autotune launch a faulting
# alternative, which would end the process and lose the step's figures.
fa_suspect=
# Each row also goes to $KILN_GPU_SUMMARY as it is known, so a run cut short keeps what it measured.
row() {
  rows+=("$(printf '%-40s %s' "$1" "$2")")
  [ -n "${KILN_GPU_SUMMARY:-}" ] && printf '%-40s %s\n' "$1" "$2" >> "$KILN_GPU_SUMMARY"
  return 0
}

# The stages share a time budget, KILN_GPU_BUDGET_S (default 540), each capped at its own limit and
# at what is left, so a stage that hangs costs the ones after it their time, not the whole run. A stage that would get under 20 s is skipped with a row saying so.
# KILN_GPU_STAGE_SLACK multiplies every stage's own limit (the smoke test on a slow CPU sets it).
BUDGET=${KILN_GPU_BUDGET_S:-540}
stage_time() {
  local left=$((BUDGET - SECONDS)) want=$(($1 * ${KILN_GPU_STAGE_SLACK:-1}))
  [ "$left" -ge 20 ] || return 1
  echo $((want < left ? want : left))
}

card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "$card"
row "card" "${card:-unknown (no nvidia-smi)}"
# Binaries: target/gpu/ from scripts/gpu-pack.sh (stripped, what gets copied), else target/release.
BIN=${KILN_BIN_DIR:-target/gpu}
[ -x "$BIN/kiln" ] || BIN=target/release
KILN=$BIN/kiln

echo "== comm-check (NCCL on every local GPU)"
if ! t=$(stage_time 60); then
  row "nccl all_reduce" "skipped (time budget spent)"
elif out=$(timeout "$t" "$KILN" comm-check --megabytes $COMM_MB 2>&1); then
  echo "$out"
  bw=$(echo "$out" | grep -o '[0-9.]* GB/s bus' | head -1)
  [ -n "$bw" ] || bw=$(echo "$out" | grep -o '[0-9.]* GB/s algorithm (one rank: a local copy)' | head -1)
  row "nccl all_reduce" "${bw:-$(echo "$out" | grep -m1 '^nccl' || echo 'no figure')}"
else
  echo "$out"; row "nccl all_reduce" "FAILED"; status=1
fi

for t in $TESTS; do
  if [ -x "$BIN/$t" ]; then bin=$BIN/$t; else bin=$(ls -t target/release/deps/$t-* 2>/dev/null | grep -v '\.d$' | head -1); fi
  echo "== test $t ($bin)"
  if [ -z "$bin" ]; then row "test $t" "MISSING (run scripts/gpu-pack.sh)"; status=1; continue; fi
  if ! lim=$(stage_time 120); then row "test $t" "skipped (time budget spent)"; status=1; continue; fi
  if timeout "$lim" "$bin" --test-threads=1 --nocapture 2>&1 | tee "$LIBS/$t.log"; then
    row "test $t" "passed"
  else
    row "test $t" "FAILED"; status=1
    [ "$t" = gpu ] && fa_suspect="the kernel tests failed"
  fi
done

for hd in 64 128; do
  echo "== kiln bench attention --head-dim $hd"
  if ! t=$(stage_time 60); then
    row "kiln flash-attn hd$hd" "skipped (time budget spent)"
  elif out=$(timeout "$t" "$KILN" bench attention --head-dim $hd "${ATTN[@]}" 2>&1); then
    # The headline runs the fastest build of each pass (the first forward and backward rows).
    fwd1=$(echo "$out" | grep -m1 '^ *forward'); bwd1=$(echo "$out" | grep -m1 '^ *backward')
    echo "$out" | grep -q FAILED && fa_suspect="a build failed in kiln bench attention"
    echo "$out"; row "kiln flash-attn hd$hd" "$(echo "$out" | grep '^flash-attn fwd+bwd' | grep -o '[0-9]* TFLOP/s') fwd+bwd ($(echo "$fwd1" | grep -o '[0-9]* TFLOP/s') $(echo "$fwd1" | grep -o 'forward ([^)]*)'), $(echo "$bwd1" | grep -o '[0-9]* TFLOP/s') $(echo "$bwd1" | grep -o 'backward ([^)]*)'))"
    # head_dim 64: each pass's other build (1 or 2 m-tiles per warp, whichever the headline did not run).
    for pass in forward backward; do
      while read -r alt; do
        [ -n "$alt" ] && row "  hd$hd $(echo "$alt" | grep -o "$pass ([^)]*)")" "$(echo "$alt" | grep -o '[0-9]* TFLOP/s' || echo FAILED)"
      done <<< "$(echo "$out" | grep "^ *$pass (" | sed -n '2,$p')"
    done
  else
    echo "$out"; row "kiln flash-attn hd$hd" "FAILED"; status=1; fa_suspect="kiln bench attention failed"
  fi
done
if [ -n "$fa_suspect" ]; then
  export KILN_FA_AUTOTUNE=0
  row "attention autotune" "off for the step benchmarks: $fa_suspect"
fi

echo "== kiln bench train (TinyLlama-1.1B, micro-batch 8 x 2048, the same step as the PyTorch baseline)"
if ! t=$(stage_time 180); then
  row "kiln TinyLlama-1.1B step" "skipped (time budget spent)"
elif out=$(timeout "$t" "$KILN" bench train "${TRAIN[@]}" "${STEPS[@]}" --profile 2>&1); then
  echo "$out"
  row "kiln TinyLlama-1.1B step" "$(echo "$out" | grep '^train step' | sed 's/^train step [0-9x]* *//')"
  row "kiln TinyLlama-1.1B MFU" "$(echo "$out" | grep '^MFU' | sed 's/^MFU *//')"
  row "kiln TinyLlama-1.1B memory" "$(echo "$out" | grep '^memory' | sed 's/^memory *//')"
  row "kiln bf16 GEMM 8192^3" "$(echo "$out" | grep '^bf16 GEMM' | grep -o '[0-9]* TFLOP/s')"
  row "kiln GEMM autotune" "$(echo "$out" | grep '^GEMM autotune' | sed 's/^GEMM autotune *//')"
  row "kiln attention autotune" "$(echo "$out" | grep '^attention autotune' | sed 's/^attention autotune *//')"
  row "kiln step profile (top 3)" "$(echo "$out" | grep -A3 '^profile' | tail -3 | awk '{$1=$1};1' | paste -sd ';')"
else
  echo "$out"; row "kiln TinyLlama-1.1B step" "FAILED"; status=1
fi

echo "== PyTorch baseline (bench/torch_baseline.py)"
if ! t=$(stage_time 180); then
  row "torch baseline" "skipped (time budget spent)"
elif [ -x "$PY" ]; then
  timeout "$t" "$PY" bench/torch_baseline.py | tee "$LIBS/torch.jsonl"
  # Each result line carries its own table row (label, figure); see summary_row there.
  n=0
  while IFS=$'\t' read -r label figure; do
    row "$label" "$figure"; n=$((n + 1))
  done < <("$PY" -c 'import json,sys
for line in sys.stdin:
    try:
        r = json.loads(line).get("row")
    except ValueError:
        continue
    if r: print(r[0] + "\t" + r[1])' < "$LIBS/torch.jsonl")
  [ "$n" -gt 0 ] || row "torch baseline" "FAILED: no result (see the log above)"
else
  row "torch baseline" "skipped (no $PY)"
fi

# Last, so a run cut short still has the figures the issue asks for: what sharding costs on one GPU
# (the same step through the FSDP engine, NCCL world of one, gathers on the communication stream).
echo "== kiln bench train --fsdp 1 (TinyLlama-1.1B through the sharded engine on one GPU)"
if ! t=$(stage_time 240); then
  row "kiln FSDP, 1 GPU (NCCL)" "skipped (time budget spent)"
elif out=$(timeout "$t" "$KILN" bench train "${TRAIN[@]}" "${FSDP_STEPS[@]}" --fsdp 1 2>&1); then
  echo "$out"
  row "kiln FSDP, 1 GPU (NCCL)" "$(echo "$out" | grep '^fsdp step' | sed 's/^fsdp step, [0-9]* rank(s) *//')"
  row "  same step, one device" "$(echo "$out" | grep '^train step' | sed 's/^train step [0-9x]* *//')"
else
  echo "$out"; row "kiln FSDP, 1 GPU (NCCL)" "FAILED"; status=1
fi

# Last of all, as a check the emulator cannot make on real hardware: compute-sanitizer (which
# works on the Firecracker GPU machines) looks for shared-memory races and bad accesses in the
# FlashAttention-2 test's kernels. Skipped where the tool is missing.
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer "$SITE"/nvidia/*/bin/compute-sanitizer 2>/dev/null | head -1)
gpu_bin=$BIN/gpu
[ -x "$gpu_bin" ] || gpu_bin=$(ls -t target/release/deps/gpu-* 2>/dev/null | grep -v '\.d$' | head -1)
if [ -n "$san" ] && [ -n "$gpu_bin" ]; then
  for tool in racecheck memcheck; do
    echo "== compute-sanitizer --tool $tool ($gpu_bin flash_attention)"
    if ! t=$(stage_time 150); then
      row "sanitizer $tool (attention)" "skipped (time budget spent)"
    elif timeout "$t" "$san" --tool $tool --error-exitcode 3 "$gpu_bin" flash_attention --test-threads=1 2>&1 | tee "$LIBS/san-$tool.log" | tail -25; then
      row "sanitizer $tool (attention)" "clean"
    elif grep -q -e 'Device not supported' -e 'error 999' "$LIBS/san-$tool.log"; then
      # gVisor machines refuse the sanitizer; Firecracker ones run it.
      row "sanitizer $tool (attention)" "unsupported on this machine's runtime"
    else
      row "sanitizer $tool (attention)" "FAILED or cut short (see the log above)"; status=1
    fi
  done
else
  row "compute-sanitizer" "skipped (not found)"
fi

# Last, and only with time to spare: Nsight Compute's view of the FlashAttention-2 kernels (tensor
# and shared-memory throughput, occupancy, what warps stall on), so later tuning without a GPU can
# start from this log. `--clock-control none` leaves the card at its own clocks; the figures are for reading,
# not for the table's TFLOP/s. With --iters 1 the bench launches the forward 4 times alone, then
# forward and backward in turn: skipping 4 profiles one of each, in the builds the engine uses.
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$ncu" ]; then
  for hd in 64 128; do
    echo "== ncu: flash-attn kernels at head_dim $hd"
    if ! t=$(stage_time 90); then
      row "ncu flash-attn hd$hd" "skipped (time budget spent)"
    elif timeout "$t" "$ncu" --clock-control none --kernel-name regex:'flash_attn_(fwd|bwd)_d(64|128)(_2mt)?$' \
        --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        "$KILN" bench attention --head-dim $hd --iters 1 2>&1 | tee "$LIBS/ncu-$hd.log" | grep -v '^==PROF=='; then
      row "ncu flash-attn hd$hd" "profiled (see the log above)"
    else
      row "ncu flash-attn hd$hd" "failed or cut short (see the log above)"
    fi
  done
else
  row "ncu" "skipped (not found)"
fi

echo
echo "== summary"
printf '%s\n' "${rows[@]}"
exit $status
