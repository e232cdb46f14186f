#!/usr/bin/env python3
"""PTX of one kernels/*.cu file exactly as kiln's loader makes it at start-up (NVRTC, common.cuh
inlined, the options of `compile` in src/backend/cuda/kernels.rs), for scripts/kernel-resources.sh
to hand to ptxas: the registers and spills of the code a GPU actually runs, which differ from
nvcc's for the same source.

    nvrtc_ptx.py CUDA_DIR ARCH KERNEL.cu OUT.ptx     # CUDA_DIR: pip's nvidia/cu13 (lib/, include/)
"""
import ctypes
import pathlib
import sys


def main(cuda: str, arch: str, source: str, out: str) -> int:
    nvrtc = ctypes.CDLL(f"{cuda}/lib/libnvrtc.so.13")
    src = pathlib.Path(source)
    text = src.read_text().replace('#include "common.cuh"', (src.parent / "common.cuh").read_text())
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), src.name.encode(), 0, None, None):
        print(f"{source}: nvrtcCreateProgram failed", file=sys.stderr)
        return 1
    # Keep in step with `compile` in src/backend/cuda/kernels.rs.
    opts = [f"--gpu-architecture={arch}", f"--include-path={cuda}/include", "--std=c++17"]
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
    size = ctypes.c_size_t()
    if status:
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        print(f"{source} does not compile for {arch}:\n{log.value.decode()}", file=sys.stderr)
        return 1
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    pathlib.Path(out).write_bytes(ptx.value)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
