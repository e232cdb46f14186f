// A CPU stand-in for the parts of the CUDA driver, NVRTC, cuBLASLt and NCCL that kiln calls, built as
// one shared library and put on LD_LIBRARY_PATH under the names cudarc loads (libcuda.so, libnvrtc.so,
// libcublasLt.so, libcublas.so, libnccl.so) by tests/common/emulated_gpu.rs. With it the CUDA backend's host code
// (src/backend/cuda/: launchers, argument lists, grid sizes, cuBLASLt layouts, the engine's buffers and
// streams, FSDP's collectives) runs end to end on machines without a GPU, and tests/gpu.rs,
// tests/gpu_model.rs and tests/gpu_fsdp.rs check it against the CPU backend exactly as on a GPU.
//
// Kernels run on the emulator of include/cuda_bf16.h: the same kernels/*.cu sources, every CUDA
// thread a fiber. The stand-in is stricter than a GPU where that is cheap, so mistakes that a GPU
// would turn into silent garbage or a later sticky error fail here at once, with a message:
//   - device memory is fresh mmap'd pages with a PROT_NONE guard page right after each buffer (its
//     end at most 255 bytes before it), filled with 0xFF (NaN in f32 and bf16) when allocated, and
//     made inaccessible when freed, so overruns and use after free fault;
//   - every copy, memset and GEMM operand must lie inside one live allocation;
//   - every pointer argument of a kernel must point into a live allocation (or be null);
//   - a launch's dynamic shared memory must fit the 48 KB default or what cuFuncSetAttribute raised
//     it to, its block at most 1024 threads;
//   - a cuBLASLt matmul's layouts must agree with its transposes and with each other, and its
//     operands be 256-byte aligned, as the heuristic's default preferences assume;
//   - work on one stream that touches memory another stream's work also touches must be ordered
//     after it by an event or a host synchronization, as on a GPU, where streams run at once (see
//     "stream order" below).
// It reports two compute capability 9.0 devices with an H100's shared memory, so the engine
// takes the Hopper paths (the two-m-tile FlashAttention backward, two 91 KB blocks per SM, runs).
// Everything runs synchronously on the calling thread; streams and events only keep time and the
// order the stream-order check follows.

#include "cuda_bf16.h"

// The kernels, as NVRTC would see them (each includes common.cuh, which has #pragma once).
#include "adamw.cu"
#include "cast.cu"
#include "cross_entropy.cu"
#include "elementwise.cu"
#include "flash_attn.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "swiglu.cu"

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

typedef int CUresult;
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};
typedef unsigned long long CUdeviceptr;

// The stand-in's own arithmetic (the GEMM, the reductions): host code whose accesses the compiler
// aligns, left out of -fsanitize=alignment, which is there for the kernels and would keep these
// loops from vectorising (tests/gpu_model.rs on the emulated GPU took over 7 minutes instead of 94 s).
#define FAKE_HOST_ARITHMETIC __attribute__((no_sanitize("alignment")))

static std::recursive_mutex fake_lock;  // the emulator runs one block at a time, whoever launches

static void fake_say(const char* what, const std::string& detail) {
    std::fprintf(stderr, "fake CUDA: %s: %s\n", what, detail.c_str());
}

// ---------------------------------------------------------------- device memory

struct Allocation {
    char* map;
    size_t map_len;
    size_t size;
};
static std::map<uintptr_t, Allocation> live;  // by start address
static std::deque<std::pair<char*, size_t>> quarantine;  // freed, inaccessible, unmapped later
static size_t live_bytes;
static const size_t page = (size_t)sysconf(_SC_PAGESIZE);
static const size_t fake_total_memory = 16ull << 30;

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

static CUresult fake_alloc(CUdeviceptr* out, size_t size) {
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;  // as the driver answers
    if (live_bytes + size > fake_total_memory) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t body = round_up(size, page);
    char* map = (char*)mmap(nullptr, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    mprotect(map + body, page, PROT_NONE);
    char* start = map + body - round_up(size, 256);
    std::memset(start, 0xFF, round_up(size, 256));
    live[(uintptr_t)start] = {map, body + page, size};
    live_bytes += size;
    *out = (CUdeviceptr)start;
    return CUDA_SUCCESS;
}

static CUresult fake_free(CUdeviceptr p) {
    auto it = live.find((uintptr_t)p);
    if (it == live.end()) {
        fake_say("cuMemFree", "not the start of a live allocation: " + std::to_string(p));
        return CUDA_ERROR_INVALID_VALUE;
    }
    Allocation a = it->second;
    live.erase(it);
    live_bytes -= a.size;
    madvise(a.map, a.map_len, MADV_DONTNEED);
    mprotect(a.map, a.map_len, PROT_NONE);
    quarantine.emplace_back(a.map, a.map_len);
    if (quarantine.size() > 10000) {
        munmap(quarantine.front().first, quarantine.front().second);
        quarantine.pop_front();
    }
    return CUDA_SUCCESS;
}

// The live allocation holding [p, p + bytes), or null.
static const Allocation* owner(uintptr_t p, size_t bytes) {
    auto it = live.upper_bound(p);
    if (it == live.begin()) return nullptr;
    --it;
    if (p + bytes > it->first + it->second.size) return nullptr;
    return &it->second;
}

static bool in_device_memory(uintptr_t p, size_t bytes, const char* what) {
    if (owner(p, bytes)) return true;
    fake_say(what, std::to_string(bytes) + " bytes at " + std::to_string(p) + " are not inside one live allocation");
    return false;
}

// ---------------------------------------------------------------- stream order
//
// Work runs here at once, in the order it is enqueued, so two streams' work never overlaps, and a
// missing dependency between streams would pass unseen: a kernel reading what another stream writes
// without waiting for that stream's event, or a buffer overwritten or freed on one stream while
// another may still read it. A GPU runs streams at once, and there such a race gives wrong numbers
// only sometimes. So every access is checked against CUDA's ordering rules instead, with vector
// clocks: each operation ticks its stream's clock; cuEventRecord copies the stream's clock into the
// event and cuStreamWaitEvent merges it into the waiting stream's; the synchronizing calls (stream,
// event, context; the blocking copies) merge it into what the host knows has finished, which every
// later operation is ordered after. Each allocation keeps its last write and, per stream, its latest
// read since; an access not ordered after a conflicting one (any access after another stream's
// write, a write after another stream's read) is reported and fails its call. Kernels read through
// their `const T*` arguments and write through their `T*` ones, and adamw_multi through the pointers
// of its chunk table as well (see note_adamw_chunks).
using VClock = std::map<const void*, unsigned long>;  // stream -> how many of its operations are ordered before
struct StreamOp {
    const void* stream;
    unsigned long tick;
    std::string what;
};
struct AccessLog {
    std::optional<StreamOp> write;
    std::map<const void*, StreamOp> reads;  // since that write: the latest per stream
};
struct Access {
    uintptr_t p;
    bool write;
};
static VClock host_knows;                             // operations the host has seen finish
static std::map<const void*, VClock> stream_clocks;   // guarded, like everything here, by fake_lock
static std::map<uintptr_t, AccessLog> access_logs;   // by allocation start

static void merge(VClock& into, const VClock& from) {
    for (const auto& [s, t] : from)
        if (into[s] < t) into[s] = t;
}
static bool ordered_after(const VClock& c, const StreamOp& op) {
    const auto it = c.find(op.stream);
    return it != c.end() && it->second >= op.tick;
}
static std::string stream_name(const void* s) {
    return s ? "stream " + std::to_string((uintptr_t)s) : "the NULL stream";
}

// Checks and records the accesses of one new operation on `stream`; returns "" or the race.
static std::string stream_op(const void* stream, const std::string& what, const std::vector<Access>& accesses) {
    VClock& c = stream_clocks[stream];
    merge(c, host_knows);
    const StreamOp me{stream, ++c[stream], what};
    for (const Access& a : accesses) {
        auto it = live.upper_bound(a.p);
        if (it == live.begin() || a.p >= std::prev(it)->first + std::prev(it)->second.size)
            continue;  // not device memory: the callers' own checks report that
        --it;
        AccessLog& log = access_logs[it->first];
        auto race = [&](const StreamOp& other, const char* did) {
            char at[32];
            std::snprintf(at, sizeof at, "%#lx", (unsigned long)it->first);
            const char* does = what == "cuMemFreeAsync" ? "frees" : a.write ? "writes" : "reads";
            return std::string(does) + " the allocation at " + at + " on " + stream_name(stream) +
                   ", which " + other.what + " " + did + " on " + stream_name(other.stream) +
                   " with nothing ordering the two (an event recorded there and waited for here)";
        };
        if (log.write && log.write->stream != stream && !ordered_after(c, *log.write)) return race(*log.write, "wrote");
        if (a.write)
            for (const auto& [s, r] : log.reads)
                if (s != stream && !ordered_after(c, r)) return race(r, "read");
        if (a.write) {
            log.write = me;
            log.reads.clear();
        } else {
            log.reads[stream] = me;
        }
    }
    return "";
}
// The host has seen `c` finish (a synchronizing call returned).
static void host_saw(const VClock& c) { merge(host_knows, c); }
// Whether a new operation's accesses race; if so, says so under `what`.
static bool races(const void* stream, const char* what, const std::vector<Access>& accesses) {
    const std::string race = stream_op(stream, what, accesses);
    if (race.empty()) return false;
    fake_say(what, race);
    return true;
}

// ---------------------------------------------------------------- kernels

// The kernel with the launch's arguments bound: what one CUDA thread runs.
typedef std::function<void()> (*Bind)(void** params, const char* name, std::vector<Access>& accesses);
struct FakeFunction {
    const char* name;
    Bind bind;
    int max_dynamic_shared = 48 * 1024;
};

template <class A>
static A arg(void* p, const char* name, int i) {
    A v;
    std::memcpy(&v, p, sizeof v);
    if constexpr (std::is_pointer_v<A>) {
        if (v != nullptr && !owner((uintptr_t)v, 1)) {
            std::fprintf(stderr, "fake CUDA: %s: argument %d (%p) does not point into device memory\n", name, i,
                         (const void*)v);
            std::abort();  // on a GPU: an illegal address fault
        }
    }
    return v;
}
// A pointer argument as an access for the stream-order check: a write unless it points to const.
template <class A>
static void note_access(const A& v, std::vector<Access>& accesses) {
    if constexpr (std::is_pointer_v<A>)
        if (v != nullptr) accesses.push_back({(uintptr_t)v, !std::is_const_v<std::remove_pointer_t<A>>});
}
template <class... A, size_t... I>
static std::function<void()> bind_args(void (*f)(A...), void** params, const char* name, std::vector<Access>& accesses,
                                       std::index_sequence<I...>) {
    // Read (and checked) at the launch, in order, as the driver copies them.
    std::tuple<A...> args{arg<A>(params[I], name, (int)I)...};
    (note_access(std::get<I>(args), accesses), ...);
    return [f, args]() { std::apply(f, args); };
}
template <auto F>
static std::function<void()> bind_entry(void** params, const char* name, std::vector<Access>& accesses) {
    return [&]<class... A>(void (*f)(A...)) {
        return bind_args(f, params, name, accesses, std::index_sequence_for<A...>{});
    }(F);
}

// adamw_multi updates through pointers held in device memory, its chunk table (one chunk per block),
// which its arguments do not show: each chunk's master weights, moments and bf16 copy are written,
// its gradient read. FSDP's gradient shards are written by a reduce-scatter on the communication
// stream, and its weight shards read by the next step's all-gather there, so these count.
static void note_adamw_chunks(void** params, unsigned chunks, std::vector<Access>& accesses) {
    const AdamChunk* table;
    std::memcpy(&table, params[0], sizeof table);
    if (!owner((uintptr_t)table, (size_t)chunks * sizeof(AdamChunk))) return;  // the kernel faults on its own
    for (unsigned i = 0; i < chunks; ++i) {
        const AdamChunk& c = table[i];
        for (const void* p : {(const void*)c.param, (const void*)c.m, (const void*)c.v, (const void*)c.param_bf16})
            if (p != nullptr) accesses.push_back({(uintptr_t)p, true});
        accesses.push_back({(uintptr_t)c.grad, false});
    }
}

#define KILN_ENTRY(name) {#name, &bind_entry<&name>},
static FakeFunction functions[] = {
#include "fake_cuda_entries.inc"
};
#undef KILN_ENTRY

// ---------------------------------------------------------------- the driver API

struct FakeEvent {
    std::chrono::steady_clock::time_point at;
    VClock clock;  // its stream's, when last recorded
};
static int fake_stream_handles, fake_pool, fake_module;
static const char* const ptx_mark = "// kiln fake PTX\n";

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
// CUDA 13.0, or what KILN_FAKE_DRIVER_VERSION says (tests of kiln's version checks).
CUresult cuDriverGetVersion(int* v) {
    const char* told = std::getenv("KILN_FAKE_DRIVER_VERSION");
    *v = told ? std::atoi(told) : 13000;
    return CUDA_SUCCESS;
}
// Two devices, so FSDP over NCCL has a world of two. They share the host's memory, as GPUs with
// peer access share an address space.
constexpr int fake_devices = 2;
CUresult cuDeviceGetCount(int* n) {
    *n = fake_devices;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal < 0 || ordinal >= fake_devices) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}
CUresult cuDeviceCanAccessPeer(int* can, int, int) {
    *can = 1;
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAccess(void*, const void*, size_t) { return CUDA_SUCCESS; }
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "kiln CPU emulator (compute capability 9.0)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = fake_total_memory;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
        case 1: *v = 1024; break;           // max threads per block
        case 2: case 3: case 4: *v = attribute == 4 ? 64 : 1024; break;  // max block dims x, y, z
        case 5: *v = 2147483647; break;     // max grid x
        case 6: case 7: *v = 65535; break;  // max grid y, z
        case 8: *v = 48 * 1024; break;      // shared memory per block
        case 10: *v = 32; break;            // warp size
        case 13: *v = 1980000; break;       // clock rate, kHz
        case 16: *v = 132; break;           // multiprocessors
        case 75: *v = 9; break;             // compute capability
        case 76: *v = 0; break;
        case 81: *v = 228 * 1024; break;    // shared memory per multiprocessor
        case 97: *v = 227 * 1024; break;    // shared memory per block, opt-in
        case 111: *v = 1024; break;         // reserved shared memory per block
        case 115: *v = 1; break;            // memory pools
        default:
            fake_say("cuDeviceGetAttribute", "attribute " + std::to_string(attribute) + " is not emulated");
            return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
static int fake_contexts[fake_devices];
static thread_local void* fake_current_context;
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    *ctx = &fake_contexts[dev];
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) {
    fake_current_context = ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = fake_current_context;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    for (const auto& [s, c] : stream_clocks) host_saw(c);
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    static thread_local std::string name;
    name = "CUDA_ERROR_" + std::to_string(e) + " (fake CUDA)";
    *s = name.c_str();
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

CUresult cuDeviceGetDefaultMemPool(void** pool, int) {
    *pool = &fake_pool;
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(void*, int, void*) { return CUDA_SUCCESS; }
CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    *total = fake_total_memory;
    *free = fake_total_memory - live_bytes;
    return CUDA_SUCCESS;
}

// A stream handle is its number, never reused, so the stream-order records cannot mistake a new
// stream for a destroyed one.
CUresult cuStreamCreate(void** s, unsigned) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    *s = (void*)(uintptr_t)++fake_stream_handles;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
CUresult cuStreamDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    host_saw(stream_clocks[s]);
    return CUDA_SUCCESS;
}
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    merge(stream_clocks[s], ((FakeEvent*)e)->clock);
    return CUDA_SUCCESS;
}
CUresult cuStreamQuery(void* s) { return cuStreamSynchronize(s); }  // "finished", as everything here is

CUresult cuEventCreate(void** e, unsigned) {
    *e = new FakeEvent{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void* e) {
    delete (FakeEvent*)e;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* e, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    VClock& c = stream_clocks[s];
    merge(c, host_knows);
    ((FakeEvent*)e)->at = std::chrono::steady_clock::now();
    ((FakeEvent*)e)->clock = c;
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void* e) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    host_saw(((FakeEvent*)e)->clock);
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(void* e) { return cuEventSynchronize(e); }
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    *ms = std::chrono::duration<float, std::milli>(((FakeEvent*)end)->at - ((FakeEvent*)start)->at).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    return fake_alloc(p, n);
}
// Stream-ordered: another stream may use the memory only once ordered after this point of `s`.
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    const CUresult r = fake_alloc(p, n);
    if (r == CUDA_SUCCESS) races(s, "cuMemAllocAsync", {{*p, true}});  // a fresh record: never a race
    return r;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    access_logs.erase(p);
    return fake_free(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    if (races(s, "cuMemFreeAsync", {{p, true}})) return CUDA_ERROR_INVALID_VALUE;
    access_logs.erase(p);
    return fake_free(p);
}

// The copies and the memset run on stream `s`; their blocking forms on the NULL stream (which kiln's
// streams, created non-blocking as cudarc does, are not ordered with), returning once done.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    if (n == 0) return CUDA_SUCCESS;
    if (!in_device_memory(dst, n, "cuMemcpyHtoD destination")) return CUDA_ERROR_INVALID_VALUE;
    if (races(s, "cuMemcpyHtoD", {{dst, true}})) return CUDA_ERROR_INVALID_VALUE;
    std::memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    if (n == 0) return CUDA_SUCCESS;
    if (!in_device_memory(src, n, "cuMemcpyDtoH source")) return CUDA_ERROR_INVALID_VALUE;
    if (races(s, "cuMemcpyDtoH", {{src, false}})) return CUDA_ERROR_INVALID_VALUE;
    std::memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    if (n == 0) return CUDA_SUCCESS;
    if (!in_device_memory(dst, n, "cuMemcpyDtoD destination") || !in_device_memory(src, n, "cuMemcpyDtoD source"))
        return CUDA_ERROR_INVALID_VALUE;
    if (races(s, "cuMemcpyDtoD", {{src, false}, {dst, true}})) return CUDA_ERROR_INVALID_VALUE;
    std::memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    if (n == 0) return CUDA_SUCCESS;
    if (!in_device_memory(dst, n, "cuMemsetD8")) return CUDA_ERROR_INVALID_VALUE;
    if (races(s, "cuMemsetD8", {{dst, true}})) return CUDA_ERROR_INVALID_VALUE;
    std::memset((void*)dst, v, n);
    return CUDA_SUCCESS;
}
static CUresult blocking(const std::function<CUresult()>& run) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    const CUresult r = run();
    host_saw(stream_clocks[nullptr]);
    return r;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return blocking([&] { return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr); });
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return blocking([&] { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); });
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return blocking([&] { return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr); });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    return blocking([&] { return cuMemsetD8Async(dst, v, n, nullptr); });
}

CUresult cuModuleLoadData(void** module, const void* image) {
    if (std::strncmp((const char*)image, ptx_mark, std::strlen(ptx_mark)) != 0) {
        fake_say("cuModuleLoadData", "not PTX from the fake NVRTC");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *module = &fake_module;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    for (FakeFunction& fn : functions)
        if (std::strcmp(fn.name, name) == 0) {
            *f = &fn;
            return CUDA_SUCCESS;
        }
    fake_say("cuModuleGetFunction", std::string("no entry point ") + name);
    return CUDA_ERROR_NOT_FOUND;
}
CUresult cuFuncSetAttribute(void* f, int attribute, int value) {
    if (attribute != 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        fake_say("cuFuncSetAttribute", "attribute " + std::to_string(attribute) + " is not emulated");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (value < 0 || value > 227 * 1024) return CUDA_ERROR_INVALID_VALUE;
    ((FakeFunction*)f)->max_dynamic_shared = value;
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void* stream, void** params, void** extra) {
    FakeFunction& fn = *(FakeFunction*)f;
    const std::string what = std::string("cuLaunchKernel ") + fn.name;
    if (extra != nullptr) {
        fake_say(what.c_str(), "the `extra` parameter form is not emulated");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535 || bx == 0 || by == 0 ||
        bz == 0 || (size_t)bx * by * bz > 1024) {
        fake_say(what.c_str(), "grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," + std::to_string(gz) +
                                   ") of blocks (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                                   std::to_string(bz) + ") is invalid");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)shared > fn.max_dynamic_shared) {
        fake_say(what.c_str(), std::to_string(shared) + " bytes of dynamic shared memory, the kernel allows " +
                                   std::to_string(fn.max_dynamic_shared) + " (cuFuncSetAttribute)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    std::vector<Access> accesses;
    const std::function<void()> body = fn.bind(params, fn.name, accesses);
    if (std::strcmp(fn.name, "adamw_multi") == 0) note_adamw_chunks(params, gx, accesses);
    if (races(stream, what.c_str(), accesses)) return CUDA_ERROR_INVALID_VALUE;
    emulated_launch({gx, gy, gz}, {bx, by, bz}, body, shared);
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------- NVRTC

struct FakeProgram {
    std::string ptx;
};
// 13.0, or KILN_FAKE_NVRTC_VERSION as "major.minor".
int nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    if (const char* told = std::getenv("KILN_FAKE_NVRTC_VERSION")) std::sscanf(told, "%d.%d", major, minor);
    return 0;
}
int nvrtcCreateProgram(void** prog, const char* src, const char* name, int, const char* const*, const char* const*) {
    // The "PTX" names the source; the kernels themselves are compiled into this library.
    *prog = new FakeProgram{std::string(ptx_mark) + "// " + (name ? name : "?") + ", " +
                            std::to_string(std::strlen(src)) + " bytes of source\n"};
    return 0;
}
int nvrtcCompileProgram(void*, int, const char* const*) { return 0; }
int nvrtcGetPTXSize(void* prog, size_t* n) {
    *n = ((FakeProgram*)prog)->ptx.size() + 1;
    return 0;
}
int nvrtcGetPTX(void* prog, char* out) {
    const std::string& p = ((FakeProgram*)prog)->ptx;
    std::memcpy(out, p.c_str(), p.size() + 1);
    return 0;
}
int nvrtcGetProgramLogSize(void*, size_t* n) {
    *n = 1;
    return 0;
}
int nvrtcGetProgramLog(void*, char* out) {
    out[0] = 0;
    return 0;
}
int nvrtcDestroyProgram(void** prog) {
    delete (FakeProgram*)*prog;
    *prog = nullptr;
    return 0;
}

}  // extern "C"

// ---------------------------------------------------------------- cuBLASLt

enum : int { LT_OK = 0, LT_INVALID_VALUE = 7, LT_NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16BF = 14, COMPUTE_32F = 68 };
struct LtDesc {
    int compute, scale;
    int trans_a = 0, trans_b = 0;
};
struct LtLayout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct LtPreference {};  // the one attribute kiln sets (a workspace cap) changes nothing here
struct LtAlgo {
    uint64_t data[8];
};
struct LtHeuristicResult {
    LtAlgo algo;
    size_t workspace_size;
    int state;
    float waves;
    int reserved[4];
};
static int fake_lt_handle;

static size_t elem_size(int type) { return type == R_32F ? 4 : 2; }
FAKE_HOST_ARITHMETIC static double load(const void* base, int type, size_t i) {
    if (type == R_32F) return ((const float*)base)[i];
    return __bfloat162float(((const __nv_bfloat16*)base)[i]);
}
FAKE_HOST_ARITHMETIC static void store(void* base, int type, size_t i, double v) {
    if (type == R_32F)
        ((float*)base)[i] = (float)v;
    else
        ((__nv_bfloat16*)base)[i] = __float2bfloat16_rn((float)v);
}

// What is wrong with this problem's descriptors, or "" (cuBLASLt checks the same at the call).
static std::string lt_check(const LtDesc& d, const LtLayout& a, const LtLayout& b, const LtLayout& c, const LtLayout& o) {
    if (d.compute != COMPUTE_32F || d.scale != R_32F) return "only CUBLAS_COMPUTE_32F with f32 scaling is emulated";
    if (a.type != b.type || (a.type != R_16BF && a.type != R_32F)) return "A and B must both be bf16 or both f32";
    if (c.type != o.type || (o.type != R_16BF && o.type != R_32F)) return "C and D must have one type, bf16 or f32";
    for (const LtLayout* l : {&a, &b, &c, &o})
        if (l->rows == 0 || l->cols == 0 || l->ld < (int64_t)l->rows) return "a layout is empty or its ld < rows";
    const uint64_t m = d.trans_a ? a.cols : a.rows, ka = d.trans_a ? a.rows : a.cols;
    const uint64_t kb = d.trans_b ? b.cols : b.rows, n = d.trans_b ? b.rows : b.cols;
    if (ka != kb || m != o.rows || n != o.cols || c.rows != o.rows || c.cols != o.cols)
        return "op(A) is " + std::to_string(m) + "x" + std::to_string(ka) + ", op(B) " + std::to_string(kb) + "x" +
               std::to_string(n) + ", C " + std::to_string(c.rows) + "x" + std::to_string(c.cols) + ", D " +
               std::to_string(o.rows) + "x" + std::to_string(o.cols);
    return "";
}
static size_t extent(const LtLayout& l) { return ((l.cols - 1) * l.ld + l.rows) * elem_size(l.type); }

extern "C" {

int cublasLtCreate(void** h) {
    *h = &fake_lt_handle;
    return LT_OK;
}
int cublasLtDestroy(void*) { return LT_OK; }
int cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    *d = new LtDesc{compute, scale};
    return LT_OK;
}
int cublasLtMatmulDescDestroy(void* d) {
    delete (LtDesc*)d;
    return LT_OK;
}
int cublasLtMatmulDescSetAttribute(void* d, int attribute, const void* buf, size_t size) {
    if ((attribute == 3 || attribute == 4) && size == 4) {  // TRANSA, TRANSB: cublasOperation_t
        int op;
        std::memcpy(&op, buf, 4);
        if (op != 0 && op != 1) return LT_INVALID_VALUE;
        (attribute == 3 ? ((LtDesc*)d)->trans_a : ((LtDesc*)d)->trans_b) = op;
        return LT_OK;
    }
    fake_say("cublasLtMatmulDescSetAttribute", "attribute " + std::to_string(attribute) + " of " +
                                                   std::to_string(size) + " bytes is not emulated");
    return LT_NOT_SUPPORTED;
}
int cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    *l = new LtLayout{type, rows, cols, ld};
    return LT_OK;
}
int cublasLtMatrixLayoutDestroy(void* l) {
    delete (LtLayout*)l;
    return LT_OK;
}
int cublasLtMatmulPreferenceCreate(void** p) {
    *p = new LtPreference;
    return LT_OK;
}
int cublasLtMatmulPreferenceDestroy(void* p) {
    delete (LtPreference*)p;
    return LT_OK;
}
int cublasLtMatmulPreferenceSetAttribute(void*, int attribute, const void*, size_t size) {
    if (attribute == 1 && size == 8) return LT_OK;  // MAX_WORKSPACE_BYTES
    fake_say("cublasLtMatmulPreferenceSetAttribute", "attribute " + std::to_string(attribute) + " is not emulated");
    return LT_NOT_SUPPORTED;
}
// Three candidates (the engine times them as it would cuBLASLt's), all computing the same way.
int cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void*, int requested,
                                   LtHeuristicResult* results, int* returned) {
    const std::string bad = lt_check(*(LtDesc*)desc, *(LtLayout*)a, *(LtLayout*)b, *(LtLayout*)c, *(LtLayout*)d);
    if (!bad.empty()) {
        fake_say("cublasLtMatmulAlgoGetHeuristic", bad);
        return LT_INVALID_VALUE;
    }
    if (requested <= 0) return LT_INVALID_VALUE;
    *returned = std::min(requested, 3);
    for (int i = 0; i < *returned; ++i) {
        std::memset(&results[i], 0, sizeof results[i]);
        results[i].algo.data[0] = 0x6b696c6e00ull + i;
        results[i].waves = 1;
    }
    return LT_OK;
}
FAKE_HOST_ARITHMETIC int cublasLtMatmul(void*, void* desc, const void* alpha_p, const void* A, void* a_layout, const void* B, void* b_layout,
                   const void* beta_p, const void* C, void* c_layout, void* D, void* d_layout, const LtAlgo* algo,
                   void* workspace, size_t workspace_bytes, void* stream) {
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    const LtDesc& d = *(LtDesc*)desc;
    const LtLayout &a = *(LtLayout*)a_layout, &b = *(LtLayout*)b_layout, &c = *(LtLayout*)c_layout,
                   &o = *(LtLayout*)d_layout;
    std::string bad = lt_check(d, a, b, c, o);
    if (bad.empty() && (algo == nullptr || (algo->data[0] & ~0xffull) != 0x6b696c6e00ull))
        bad = "the algorithm did not come from cublasLtMatmulAlgoGetHeuristic";
    if (bad.empty() && C == D && (c.ld != o.ld || c.type != o.type)) bad = "C aliases D with another layout";
    if (bad.empty() && workspace_bytes > 0 && !in_device_memory((uintptr_t)workspace, workspace_bytes, "workspace"))
        bad = "the workspace is not device memory";
    const struct {
        const void* p;
        const LtLayout* l;
        const char* what;
    } operands[] = {{A, &a, "A"}, {B, &b, "B"}, {C, &c, "C"}, {D, &o, "D"}};
    for (auto& op : operands)
        if (bad.empty() && !in_device_memory((uintptr_t)op.p, extent(*op.l), op.what))
            bad = std::string("operand ") + op.what + " is not inside one device allocation";
    // The heuristic chose its algorithm for operands aligned as CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES
    // says, 256 bytes unless set (kiln sets none); one less aligned may fail or fault on a GPU.
    for (auto& op : operands)
        if (bad.empty() && (uintptr_t)op.p % 256 != 0)
            bad = std::string("operand ") + op.what + " is not 256-byte aligned, as the heuristic assumed";
    if (!bad.empty()) {
        fake_say("cublasLtMatmul", bad);
        return LT_INVALID_VALUE;
    }
    float alpha, beta;
    std::memcpy(&alpha, alpha_p, 4);
    std::memcpy(&beta, beta_p, 4);
    std::vector<Access> accesses{{(uintptr_t)A, false}, {(uintptr_t)B, false}};
    if (beta != 0) accesses.push_back({(uintptr_t)C, false});
    accesses.push_back({(uintptr_t)D, true});
    if (workspace_bytes > 0) accesses.push_back({(uintptr_t)workspace, true});
    if (races(stream, "cublasLtMatmul", accesses)) return LT_INVALID_VALUE;
    const size_t m = o.rows, n = o.cols, k = d.trans_a ? a.rows : a.cols;
    // op(A) as m rows of k, op(B)ᵀ as n rows of k (column-major element (r, c) of X is X[r + c·ld]),
    // then f32 dot products as cuBLASLt's f32 accumulation, vectorised (the autotuned shapes of
    // tests/gpu_model.rs are gigaflops, each run several times).
    std::vector<float> ra(m * k), rb(n * k);
    for (size_t i = 0; i < m; ++i)
        for (size_t p = 0; p < k; ++p) ra[i * k + p] = load(A, a.type, d.trans_a ? p + i * a.ld : i + p * a.ld);
    for (size_t j = 0; j < n; ++j)
        for (size_t p = 0; p < k; ++p) rb[j * k + p] = load(B, b.type, d.trans_b ? j + p * b.ld : p + j * b.ld);
    for (size_t j = 0; j < n; ++j)
        for (size_t i = 0; i < m; ++i) {
            float acc = 0;
            const float *x = &ra[i * k], *y = &rb[j * k];
#pragma omp simd reduction(+ : acc)
            for (size_t p = 0; p < k; ++p) acc += x[p] * y[p];
            // beta = 0 does not read C (an uninitialised D may be NaN), as cuBLASLt.
            float v = alpha * acc;
            if (beta != 0) v += beta * (float)load(C, c.type, i + j * c.ld);
            store(D, o.type, i + j * o.ld, v);
        }
    return LT_OK;
}

}  // extern "C"

// ---------------------------------------------------------------- NCCL
//
// Communicators of one process (kiln's GPUs of one node: a worker thread per rank). A collective
// is a rendezvous: each rank's call posts its buffers and blocks until every rank of the world has
// posted the same call; the last to arrive checks that they agree (kind, count, type, root) and
// carries it out for all, summing in rank order. Real NCCL enqueues and returns at once; blocking is
// stricter (ranks that post different collectives at the same point are reported; a rank that posts
// fewer waits forever, as it would hang there), and the stream ordering around it is then trivially
// satisfied. Groups (ncclGroupStart/End) are not provided: kiln issues each rank's collectives from
// that rank's thread, and a group of several ranks' calls from one thread could not rendezvous.

enum : int { NCCL_OK = 0, NCCL_SYSTEM_ERROR = 2, NCCL_INVALID_ARGUMENT = 4, NCCL_INVALID_USAGE = 5 };
enum : int { N_INT8 = 0, N_UINT8, N_INT32, N_UINT32, N_INT64, N_UINT64, N_F16, N_F32, N_F64, N_BF16 };
struct NcclUniqueId {
    char internal[128];
};

struct NcclCall {
    int kind = 0;  // 1 all_gather, 2 reduce_scatter, 3 all_reduce, 4 broadcast
    const void* send = nullptr;
    void* recv = nullptr;
    size_t count = 0;  // per the NCCL signature of `kind`
    int type = 0, op = 0, root = 0;
};
struct NcclWorld {
    int size;
    int joined = 0;
    std::mutex m;
    std::condition_variable cv;
    std::vector<NcclCall> posted;
    int arrived = 0;
    unsigned long generation = 0;
    int status = NCCL_OK;  // of the last completed call
    bool aborted = false;
};
struct NcclComm {
    std::shared_ptr<NcclWorld> world;
    int rank;
};
static std::mutex worlds_lock;
static std::map<std::string, std::shared_ptr<NcclWorld>> worlds;  // by unique id, until complete

static size_t nccl_size(int type) {
    switch (type) {
        case N_INT8: case N_UINT8: return 1;
        case N_F16: case N_BF16: return 2;
        case N_INT32: case N_UINT32: case N_F32: return 4;
        default: return 8;
    }
}

// Carries out the call every rank has posted; returns what went wrong, or "".
FAKE_HOST_ARITHMETIC static std::string nccl_execute(std::vector<NcclCall>& calls) {
    const NcclCall& c0 = calls[0];
    const int n = (int)calls.size();
    for (const NcclCall& c : calls)
        if (c.kind != c0.kind || c.count != c0.count || c.type != c0.type || c.op != c0.op || c.root != c0.root)
            return "the ranks posted different collectives (kind, count, type, op or root) at the same point";
    const size_t es = nccl_size(c0.type), cnt = c0.count;
    std::lock_guard<std::recursive_mutex> g(fake_lock);
    auto dev = [](const void* p, size_t bytes, const char* what) { return in_device_memory((uintptr_t)p, bytes, what); };
    if (c0.kind == 1) {  // all_gather: sendcount each, recv holds n of them in rank order
        for (auto& c : calls)
            if (!dev(c.send, cnt * es, "ncclAllGather send") || !dev(c.recv, n * cnt * es, "ncclAllGather recv"))
                return "a buffer is not device memory of the right size";
        std::vector<char> all(n * cnt * es);
        for (int r = 0; r < n; ++r) std::memcpy(&all[r * cnt * es], calls[r].send, cnt * es);
        for (auto& c : calls) std::memcpy(c.recv, all.data(), all.size());
        return "";
    }
    if (c0.kind == 4) {  // broadcast from root
        for (auto& c : calls)
            if (!dev(c.recv, cnt * es, "ncclBroadcast recv")) return "a buffer is not device memory of the right size";
        if (c0.root < 0 || c0.root >= n || !dev(calls[c0.root].send, cnt * es, "ncclBroadcast send"))
            return "bad root or root buffer";
        std::vector<char> v((const char*)calls[c0.root].send, (const char*)calls[c0.root].send + cnt * es);
        for (auto& c : calls) std::memcpy(c.recv, v.data(), v.size());
        return "";
    }
    if (c0.op != 0 || (c0.type != N_F32 && c0.type != N_BF16)) return "only sums of f32 and bf16 are emulated";
    const int lt_type = c0.type == N_F32 ? R_32F : R_16BF;  // load/store of the cuBLASLt section
    const size_t in = c0.kind == 2 ? n * cnt : cnt;  // reduce_scatter: recvcount each
    for (auto& c : calls)
        if (!dev(c.send, in * es, "reduction send") || !dev(c.recv, cnt * es, "reduction recv"))
            return "a buffer is not device memory of the right size";
    std::vector<double> sum(in, 0.0);
    for (int r = 0; r < n; ++r)
        for (size_t i = 0; i < in; ++i) sum[i] += load(calls[r].send, lt_type, i);
    for (int r = 0; r < n; ++r)
        for (size_t i = 0; i < cnt; ++i) store(calls[r].recv, lt_type, i, sum[c0.kind == 2 ? r * cnt + i : i]);
    return "";
}

static int nccl_collective(void* comm, NcclCall call, void* stream) {
    NcclComm& c = *(NcclComm*)comm;
    NcclWorld& w = *c.world;
    bool race;
    {
        std::lock_guard<std::recursive_mutex> g(fake_lock);
        std::vector<Access> accesses;
        if (call.send != nullptr && call.send != call.recv) accesses.push_back({(uintptr_t)call.send, false});
        accesses.push_back({(uintptr_t)call.recv, true});
        race = races(stream, "NCCL collective", accesses);
    }
    std::unique_lock<std::mutex> l(w.m);
    if (race) {  // the other ranks would wait for this one forever: they fail too, as after an abort
        w.aborted = true;
        w.cv.notify_all();
        return NCCL_INVALID_USAGE;
    }
    if (w.aborted) return NCCL_SYSTEM_ERROR;
    w.posted[c.rank] = call;
    const unsigned long gen = w.generation;
    if (++w.arrived == w.size) {
        const std::string bad = nccl_execute(w.posted);
        if (!bad.empty()) fake_say("NCCL collective", bad);
        w.status = bad.empty() ? NCCL_OK : NCCL_INVALID_USAGE;
        w.arrived = 0;
        ++w.generation;
        w.cv.notify_all();
        return w.status;
    }
    w.cv.wait(l, [&] { return w.generation != gen || w.aborted; });
    return w.generation != gen ? w.status : NCCL_SYSTEM_ERROR;
}

extern "C" {

int ncclGetVersion(int* v) {
    *v = 22800;
    return NCCL_OK;
}
const char* ncclGetErrorString(int r) { return r == NCCL_OK ? "success (fake NCCL)" : "error (fake NCCL)"; }
const char* ncclGetLastError(void*) { return "see the fake CUDA lines on stderr"; }
int ncclGetUniqueId(NcclUniqueId* id) {
    static std::atomic<unsigned long> next{1};
    std::memset(id->internal, 0, sizeof id->internal);
    std::snprintf(id->internal, sizeof id->internal, "kiln-fake-nccl-%d-%lu", (int)getpid(), next++);
    return NCCL_OK;
}
int ncclCommInitRank(void** comm, int nranks, NcclUniqueId id, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return NCCL_INVALID_ARGUMENT;
    std::shared_ptr<NcclWorld> w;
    {
        std::lock_guard<std::mutex> g(worlds_lock);
        auto& slot = worlds[std::string(id.internal, sizeof id.internal)];
        if (!slot) {
            slot = std::make_shared<NcclWorld>();
            slot->size = nranks;
            slot->posted.resize(nranks);
        }
        w = slot;
    }
    if (w->size != nranks) return NCCL_INVALID_ARGUMENT;
    std::unique_lock<std::mutex> l(w->m);
    if (++w->joined == nranks) {
        std::lock_guard<std::mutex> g(worlds_lock);
        worlds.erase(std::string(id.internal, sizeof id.internal));
        w->cv.notify_all();
    } else {
        w->cv.wait(l, [&] { return w->joined == nranks; });  // as ncclCommInitRank blocks
    }
    *comm = new NcclComm{w, rank};
    return NCCL_OK;
}
int ncclCommInitAll(void** comms, int ndev, const int*) {
    if (ndev < 1) return NCCL_INVALID_ARGUMENT;
    auto w = std::make_shared<NcclWorld>();
    w->size = w->joined = ndev;
    w->posted.resize(ndev);
    for (int r = 0; r < ndev; ++r) comms[r] = new NcclComm{w, r};
    return NCCL_OK;
}
int ncclCommCount(void* comm, int* n) {
    *n = ((NcclComm*)comm)->world->size;
    return NCCL_OK;
}
int ncclCommUserRank(void* comm, int* r) {
    *r = ((NcclComm*)comm)->rank;
    return NCCL_OK;
}
// Abort wakes the world's ranks blocked in a collective: they fail, as NCCL's would after an abort.
int ncclCommAbort(void* comm) {
    if (!comm) return NCCL_OK;
    NcclComm* c = (NcclComm*)comm;
    {
        std::lock_guard<std::mutex> l(c->world->m);
        c->world->aborted = true;
        c->world->cv.notify_all();
    }
    delete c;
    return NCCL_OK;
}
int ncclCommDestroy(void* comm) {
    delete (NcclComm*)comm;
    return NCCL_OK;
}
int ncclCommFinalize(void*) { return NCCL_OK; }
int ncclAllGather(const void* send, void* recv, size_t sendcount, int type, void* comm, void* stream) {
    return nccl_collective(comm, {1, send, recv, sendcount, type, 0, 0}, stream);
}
int ncclReduceScatter(const void* send, void* recv, size_t recvcount, int type, int op, void* comm, void* stream) {
    return nccl_collective(comm, {2, send, recv, recvcount, type, op, 0}, stream);
}
int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, void* comm, void* stream) {
    return nccl_collective(comm, {3, send, recv, count, type, op, 0}, stream);
}
int ncclBroadcast(const void* send, void* recv, size_t count, int type, int root, void* comm, void* stream) {
    return nccl_collective(comm, {4, send, recv, count, type, 0, root}, stream);
}

}  // extern "C"
