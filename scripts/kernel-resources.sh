#!/usr/bin/env bash
# Registers, spills and shared memory of every kernel, as ptxas reports them, without a GPU, for the
# code kiln actually loads: NVRTC 13.0 (scripts/nvrtc_ptx.py, the loader's options) makes the PTX
# for the architecture's compute_XX, and ptxas 13.0 from PyPI assembles it for the given sm_XX
# (default sm_90), as the driver does at load. nvcc's own PTX for the same source differs (the
# head_dim 128 backward spills 16 bytes there and 172 here), so nvcc is not asked.
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
  python3 scripts/nvrtc_ptx.py "$cu" "compute_${arch#sm_}" "$k" "$out/k.ptx" || exit 1
  if ! log=$("$cu/bin/ptxas" -arch="$arch" -v "$out/k.ptx" -o "$out/k.cubin" 2>&1); then
    echo "$k: ptxas refuses its PTX for $arch:" >&2
    echo "$log" | grep -E "error" >&2
    exit 1
  fi
  echo "$log" | grep -E "Compiling entry|Used|spill" | paste - - - |
    sed -E "s/ptxas info *: //g; s/Compiling entry function '([a-z0-9_]+)' for '$arch'/\1/; s/Function properties for [a-z0-9_]+//" |
    awk -F'\t' '{printf "%-24s %s |%s\n", $1, $3, $2}'
done
