// The emulator's alignment checks, checked: each access a GPU would answer with a misaligned-address
// fault aborts here too, naming what was misaligned. argv[1] picks the access; "aligned" makes the
// same three accesses correctly and must end normally. tests/kernels_emulated.rs runs every case.
#include "cuda_bf16.h"

#include <string>

// Global and shared buffers as the kernels get them: 256- and 16-byte aligned.
alignas(256) static __nv_bfloat16 global_buf[1024];

int main(int argc, char** argv) {
    const std::string what = argc > 1 ? argv[1] : "";
    // Eight bf16 (16 bytes) past an aligned address, or four (8 bytes) where `what` asks to misalign.
    auto offset = [&](const char* access) { return what == access ? 4 : 8; };
    if (what != "aligned" && what != "uint4" && what != "ldmatrix" && what != "cp.async") {
        std::fprintf(stderr, "usage: misaligned aligned|uint4|ldmatrix|cp.async\n");
        return 2;
    }
    emulated_launch({1, 1, 1}, {32, 1, 1}, [&] {
        const __nv_bfloat16* g = global_buf + offset("uint4");
        volatile unsigned sink = reinterpret_cast<const uint4*>(g)[threadIdx.x].x;
        (void)sink;
        __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(emulated_dynamic_smem());
        unsigned r[4];
        emulated_ldmatrix_x4(r, smem + offset("ldmatrix") + 8 * (threadIdx.x & 7), false);
        emulated_cp_async(smem + 512 + offset("cp.async") + 8 * threadIdx.x, global_buf + 8 * threadIdx.x, 16, true);
        emulated_cp_async_commit();
        emulated_cp_async_wait_all();
    }, 2048);
    std::puts(what == "aligned" ? "aligned accesses ran" : "the misaligned access was not detected");
    return what == "aligned" ? 0 : 1;
}
