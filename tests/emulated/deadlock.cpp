// The emulator's own guarantee, checked: threads that wait on each other forever abort with the
// block's index instead of hanging. Here lanes 0-15 of warp 1 shuffle (a warp-wide wait) while lanes
// 16-31 and warp 0 wait at __syncthreads for them. tests/kernels_emulated.rs expects the abort.
#include "cuda_bf16.h"

int main() {
    emulated_launch({1, 1, 1}, {64, 1, 1}, [] {
        if (threadIdx.x >= 32 && threadIdx.x < 48) (void)__shfl_xor_sync(~0u, 1.0f, 1);
        __syncthreads();
    });
    std::puts("the deadlock was not detected");
    return 0;
}
