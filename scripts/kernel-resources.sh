#!/usr/bin/env bash
# Registers, spills and shared memory of every kernel, as ptxas reports them, without a GPU:
# nvcc 13.0 from PyPI compiles kernels/*.cu for the given architecture (default sm_90).
#   scripts/kernel-resources.sh [sm_80|sm_90]
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-sm_90}
eval "$(scripts/fetch-nvrtc.sh)"
venv=target/nvrtc/venv
"$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
cu=$(ls -d "$PWD"/$venv/lib/python3*/site-packages/nvidia/cu13)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for k in kernels/*.cu; do
  if ! log=$("$cu/bin/nvcc" -arch="$arch" -cubin -Xptxas -v -I kernels -I "$cu/include" "$k" -o "$out/k.cubin" 2>&1); then
    echo "$k does not compile for $arch:" >&2
    echo "$log" | grep -E "error" >&2
    exit 1
  fi
  echo "$log" | grep -E "Compiling entry|Used|spill" | paste - - - |
    sed -E "s/ptxas info *: //g; s/Compiling entry function '([a-z0-9_]+)' for '$arch'/\1/; s/Function properties for [a-z0-9_]+//" |
    awk -F'\t' '{printf "%-24s %s |%s\n", $1, $3, $2}'
done
