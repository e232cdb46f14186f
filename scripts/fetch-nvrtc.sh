#!/usr/bin/env bash
# NVRTC and the CUDA headers from PyPI, so the kernel compile check (tests/kernels.rs) runs on a
# machine with no GPU and no CUDA install. Pinned to CUDA 13.0: the GPU machines' driver rejects
# PTX from newer toolkits. Prints the environment to use:
#   eval "$(scripts/fetch-nvrtc.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/nvrtc/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
"$venv/bin/pip" install -q nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 >&2
cu=$(ls -d "$PWD"/$venv/lib/python3*/site-packages/nvidia/cu13)
echo "export LD_LIBRARY_PATH=$cu/lib:\${LD_LIBRARY_PATH:-} KILN_CUDA_INCLUDE=$cu/include"
