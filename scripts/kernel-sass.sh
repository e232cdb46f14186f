#!/usr/bin/env bash
# Instructions issued per trip of each kernel's main loop, per mma.sync, without a GPU: the PTX the
# loader makes (NVRTC 13.0, scripts/nvrtc_ptx.py), assembled by ptxas 13.0 as the driver does,
# disassembled by cuobjdump (PyPI has 13.2 and newer; it reads 13.0's cubins), counted by
# scripts/sass_loops.py. The measure for changes to kernels/flash_attn.cu between GPU runs.
#   scripts/kernel-sass.sh [sm_80|sm_90] [kernels/flash_attn.cu]
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-sm_90}
src=${2:-kernels/flash_attn.cu}
eval "$(scripts/fetch-nvrtc.sh)"
venv=target/nvrtc/venv
"$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
cu=$(ls -d "$PWD"/$venv/lib/python3*/site-packages/nvidia/cu13)
# cuobjdump in a venv of its own: its 13.2 wheel shares the nvidia/cu13 folder with the 13.0 pins.
dis=target/nvrtc/cuobjdump
[ -x "$dis/bin/python" ] || python3 -m venv "$dis"
"$dis/bin/pip" install -q nvidia-cuda-cuobjdump==13.2.78 nvidia-cuda-nvdisasm==13.2.78
bin=$(ls -d "$PWD"/$dis/lib/python3*/site-packages/nvidia/cu13/bin)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python3 scripts/nvrtc_ptx.py "$cu" "compute_${arch#sm_}" "$src" "$out/k.ptx"
"$cu/bin/ptxas" -arch="$arch" "$out/k.ptx" -o "$out/k.cubin"
PATH="$bin:$PATH" cuobjdump --dump-sass "$out/k.cubin" > "$out/k.sass"
python3 scripts/sass_loops.py "$out/k.sass"
