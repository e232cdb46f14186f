#!/usr/bin/env bash
# Every GPU test and benchmark in one call, on a GPU machine that has no Rust: the binaries are
# built elsewhere (`cargo build --release && cargo test --release --no-run`) and carried over with
# the checkout. Prints a short table last. Exit status: non-zero when any test failed.
#
#   scripts/gpu-check.sh            # from the repository root
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

declare -a rows
status=0
row() { rows+=("$(printf '%-34s %s' "$1" "$2")"); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
KILN=target/release/kiln

echo "== comm-check (NCCL on every local GPU)"
if out=$(timeout 120 "$KILN" comm-check --megabytes 256 2>&1); then
  echo "$out"; row "nccl all_reduce" "$(echo "$out" | grep -o '[0-9.]* GB/s bus' | head -1)"
else
  echo "$out"; row "nccl all_reduce" "FAILED"; status=1
fi

for t in kernels gpu; do
  bin=$(ls -t target/release/deps/$t-* 2>/dev/null | grep -v '\.d$' | head -1)
  echo "== test $t ($bin)"
  if [ -z "$bin" ]; then row "test $t" "MISSING (cargo test --release --no-run)"; status=1; continue; fi
  if timeout 300 "$bin" --test-threads=1 --nocapture 2>&1 | tee "$LIBS/$t.log"; then
    row "test $t" "passed"
  else
    row "test $t" "FAILED"; status=1
  fi
done

for hd in 64 128; do
  echo "== kiln bench attention --head-dim $hd"
  if out=$(timeout 120 "$KILN" bench attention --head-dim $hd 2>&1); then
    echo "$out"; row "kiln flash-attn hd$hd" "$(echo "$out" | grep -o '[0-9]* TFLOP/s')"
  else
    echo "$out"; row "kiln flash-attn hd$hd" "FAILED"; status=1
  fi
done

echo "== PyTorch baseline (bench/torch_baseline.py)"
if [ -x "$PY" ]; then
  timeout 240 "$PY" bench/torch_baseline.py | tee "$LIBS/torch.jsonl"
  while read -r line; do
    b=$(echo "$line" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["bench"])')
    case $b in
      torch_sdpa_flash_fwd_bwd) row "torch sdpa flash hd$(echo "$line" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["head_dim"])')" \
        "$(echo "$line" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(f"{d[\"tflops\"]:.0f} TFLOP/s fwd+bwd")')";;
      torch_tinyllama_step) row "torch TinyLlama-1.1B step" \
        "$(echo "$line" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(f"{d[\"tokens_per_s\"]:.0f} tokens/s, {d[\"tflops\"]:.0f} TFLOP/s, peak {d[\"peak_gib\"]:.1f} GiB")')";;
    esac
  done < "$LIBS/torch.jsonl"
else
  row "torch baseline" "skipped (no $PY)"
fi
row "kiln TinyLlama-1.1B step" "not measured: the CUDA training engine is not built yet"

echo
echo "== summary"
printf '%s\n' "${rows[@]}"
exit $status
