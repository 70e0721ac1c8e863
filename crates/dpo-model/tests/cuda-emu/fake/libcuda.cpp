// An emulated CUDA driver (libcuda.so) for running `src/ops/cuda.rs` on a machine without a GPU:
// candle's CUDA device, its allocations and copies, and the launches of the kernels of
// kernels/dpo_ops.cu, which run on the CPU under emu.h (one std::thread per CUDA thread). Built
// by build.sh with stand-ins for the other CUDA libraries the `cuda` build links.
//
// What a GPU would not forgive, it refuses with an error (and a line on stderr): a launch of a
// kernel it does not have (candle's own kernels run only on a GPU; of cuBLAS, the one GEMM
// function candle and ops::matmul_bf16_f32 call runs, in f32 on the CPU), a pointer argument
// outside every live allocation, a block of more than 1024 threads, a copy past an allocation's
// end. New allocations are filled with NaN bytes (0xff), so an output element a kernel fails to
// write shows. Work runs synchronously, in the order submitted; launches one at a time.
//
// With CUDA_EMU_DRY set (scripts/cuda-dry-run.sh), a dry run of a whole program's host side:
// every kernel, candle's and cuBLAS's included, is checked as above and not run; allocations are
// zero pages and every other library call succeeds without doing anything. The numbers are
// meaningless (zeros), but every CUDA code path runs, and candle's host-side refusals (a dtype
// or layout it has no kernel for) and our launchers' checks show without a GPU. At exit it
// reports the peak of live device memory.
//
// With CUDA_EMU_CENSUS=FILE as well, it writes FILE at exit: a line per kernel name with its
// launches and threads (candle's kernels run about a thread per element), the bytes of the
// allocations our kernels' pointer arguments point into, from the lowest such pointer to the
// allocation's end (an upper bound on their traffic), a line per cuBLAS GEMM shape with its
// FLOPs, and "(host) ..." lines: the host's synchronizations and copies across the bus (see
// tally_host). scripts/cuda-census.sh takes the difference of two runs, one step apart: what one
// training step launches and waits for.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string_view>

#include <sys/mman.h>

#include "emu.h"
#include "../../../kernels/dpo_ops.cu"
#include "kernels.h"

using CUresult = int;
using CUdeviceptr = unsigned long long;
enum : CUresult { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_CONFIG = 9, NOT_FOUND = 500 };

namespace {
const bool dry = std::getenv("CUDA_EMU_DRY") && *std::getenv("CUDA_EMU_DRY");
std::recursive_mutex lock;
std::map<CUdeviceptr, size_t> allocations;  // start -> bytes
size_t live = 0, peak = 0;                  // bytes allocated now, and at most
size_t n_allocs = 0, n_ours = 0, n_candle = 0;  // allocations, launches of our kernels and candle's
const char *census_file = std::getenv("CUDA_EMU_CENSUS");
struct Tally {
    size_t launches = 0;
    double threads = 0, bytes = 0, flops = 0;
};
std::map<std::string, Tally> census;  // by kernel name, or GEMM shape
// CUDA_EMU_CENSUS_SHAPES set: a census line per kernel and launch size ("NAME N threads").
const bool census_shapes = std::getenv("CUDA_EMU_CENSUS_SHAPES") != nullptr;
std::string census_key(const std::string &name, double threads) {
    return census_shapes ? name + " " + std::to_string(size_t(threads)) + " threads" : name;
}
// CUDA_EMU_TRAP="<a census line's name>" (CUDA_EMU_TRAP_AT=N, default 1): stop at that line's
// Nth launch; under gdb, `bt` shows who launched it.
const std::pair<const char *, size_t> trap{std::getenv("CUDA_EMU_TRAP"),
                                           std::getenv("CUDA_EMU_TRAP_AT") ? std::atol(std::getenv("CUDA_EMU_TRAP_AT")) : 1};

// At exit, a dry run reports its peak of live device memory (a lower bound on a GPU's: no
// context, no allocator caching, no cuBLAS workspace) and what it launched (GEMMs not counted: see the census).
struct Report {
    ~Report() {
        if (!dry) return;
        std::fprintf(stderr, "cuda-emu: peak device memory %.3f GiB; %zu allocations, %zu launches (%zu of dpo_ops)\n",
                     peak / double(1 << 30), n_allocs, n_ours + n_candle, n_ours);
        if (!census_file || !*census_file) return;
        FILE *f = std::fopen(census_file, "w");
        if (!f) {
            std::fprintf(stderr, "cuda-emu: cannot write %s\n", census_file);
            return;
        }
        std::fprintf(f, "name\tlaunches\tthreads\tbytes\tflops\n");
        for (const auto &[name, t] : census)
            std::fprintf(f, "%s\t%zu\t%.0f\t%.0f\t%.0f\n", name.c_str(), t.launches, t.threads, t.bytes, t.flops);
        std::fclose(f);
    }
} report;

struct Function {
    std::string name;
    const Kernel *kernel;  // null: one of candle's (dry runs only)
};
std::map<std::string, Function> functions;  // by name (node addresses are the handles)
std::atomic<uintptr_t> handles{0};          // contexts, modules, streams, events: distinct tokens
void *token() { return reinterpret_cast<void *>(0x1000 + 16 * ++handles); }
void *const pool = token();  // the device's memory pool

// The host's calls that wait for the device or move data across the bus, in the census as
// "(host) ..." lines. All but cuMemcpyHtoDAsync wait: a DtoH copy into pageable memory returns
// only when the stream has reached it, so each of those, like each synchronization, is a point
// where the device's queue drains.
void tally_host(const char *what, size_t bytes) {
    if (!census_file) return;
    std::lock_guard g(lock);
    Tally &t = census[std::string("(host) ") + what];  // by call, also with CUDA_EMU_CENSUS_SHAPES
    ++t.launches;
    t.bytes += double(bytes);
}

CUresult refuse(CUresult code, const std::string &why) {
    std::fprintf(stderr, "cuda-emu: %s\n", why.c_str());
    return code;
}

// Whether [p, p + n) lies in one live allocation.
bool inside(CUdeviceptr p, size_t n) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

size_t padded(size_t n) { return n ? (n + 4095) / 4096 * 4096 : 4096; }

// A dry run maps its allocations (zero pages, touched only by copies): a model of GPU size fits
// in the host's memory as long as the kernels that would fill it do not run.
CUresult alloc(CUdeviceptr *p, size_t n) {
    void *m;
    if (dry) {
        m = mmap(nullptr, padded(n), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return OUT_OF_MEMORY;
    } else {
        m = std::aligned_alloc(256, padded(n));
        if (!m) return OUT_OF_MEMORY;
        std::memset(m, 0xff, padded(n));
    }
    *p = reinterpret_cast<CUdeviceptr>(m);
    allocations[*p] = n;
    live += n;
    peak = std::max(peak, live);
    ++n_allocs;
    return OK;
}

CUresult release(CUdeviceptr p) {
    if (!p) return OK;
    auto it = allocations.find(p);
    if (it == allocations.end()) return refuse(INVALID_VALUE, "free of a pointer that is no allocation");
    if (dry)
        munmap(reinterpret_cast<void *>(p), padded(it->second));
    else
        std::free(reinterpret_cast<void *>(p));
    live -= it->second;
    allocations.erase(it);
    return OK;
}

// A dry run copies only from and to the host (the device's contents are meaningless, and
// touching them would charge page faults to the host time it measures).
CUresult copy(void *dst, const void *src, size_t n, CUdeviceptr dev_dst, CUdeviceptr dev_src) {
    if (dev_dst && !inside(dev_dst, n)) return refuse(INVALID_VALUE, "copy past the end of its destination");
    if (dev_src && !inside(dev_src, n)) return refuse(INVALID_VALUE, "copy past the end of its source");
    if (dry && dev_dst && dev_src) return OK;
    std::memmove(dst, src, n);
    return OK;
}
}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API CUresult cuInit(unsigned) { return OK; }
API CUresult cuDriverGetVersion(int *v) { return *v = 13000, OK; }
API CUresult cuDeviceGetCount(int *n) { return *n = 1, OK; }
API CUresult cuDeviceGet(int *d, int ordinal) {
    if (ordinal != 0) return refuse(INVALID_VALUE, "one emulated device, ordinal 0");
    return *d = 0, OK;
}
API CUresult cuDeviceGetName(char *name, int len, int) {
    std::snprintf(name, len, "cuda-emu (CPU)");
    return OK;
}
// An H100's memory, of which the live allocations are in use.
constexpr size_t device_memory = size_t(80) << 30;
API CUresult cuDeviceTotalMem_v2(size_t *bytes, int) { return *bytes = device_memory, OK; }
API CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
    std::lock_guard g(lock);
    *total = device_memory;
    *free = live < device_memory ? device_memory - live : 0;
    return OK;
}
API CUresult cuDeviceGetAttribute(int *v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;                  // max threads per block
        case 2: case 3: case 4: *v = 1024; break;  // max block dims (z: 64 on GPUs)
        case 5: *v = 0x7fffffff; break;            // max grid x
        case 6: case 7: *v = 65535; break;
        case 8: *v = 48 * 1024; break;             // shared memory per block
        case 10: *v = 32; break;                   // warp size
        case 16: *v = 132; break;                  // multiprocessors
        case 75: *v = 9; break;                    // compute capability
        case 76: *v = 0; break;
        case 115: *v = 1; break;                   // memory pools (stream-ordered allocation)
        default: *v = 0;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void **ctx, int) { return *ctx = token(), OK; }
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API CUresult cuCtxSetCurrent(void *) { return OK; }
API CUresult cuCtxGetCurrent(void **ctx) { return *ctx = token(), OK; }
API CUresult cuCtxGetDevice(int *d) { return *d = 0, OK; }
API CUresult cuCtxPushCurrent_v2(void *) { return OK; }
API CUresult cuCtxPopCurrent_v2(void **ctx) { return ctx ? (*ctx = nullptr, OK) : OK; }
API CUresult cuCtxSynchronize() { return tally_host("cuCtxSynchronize", 0), OK; }

API CUresult cuStreamCreate(void **s, unsigned) { return *s = token(), OK; }
API CUresult cuStreamCreateWithPriority(void **s, unsigned, int) { return *s = token(), OK; }
API CUresult cuStreamDestroy_v2(void *) { return OK; }
API CUresult cuStreamSynchronize(void *) { return tally_host("cuStreamSynchronize", 0), OK; }
API CUresult cuStreamQuery(void *) { return OK; }
API CUresult cuStreamWaitEvent(void *, void *, unsigned) { return OK; }
API CUresult cuEventCreate(void **e, unsigned) { return *e = token(), OK; }
// An event holds the host's time when recorded: the emulated stream has run everything before
// by then (launches run as they are made), so two events' difference is the work between them.
std::map<void *, std::chrono::steady_clock::time_point> recorded;
API CUresult cuEventRecord(void *e, void *) {
    std::lock_guard g(lock);
    return recorded[e] = std::chrono::steady_clock::now(), OK;
}
API CUresult cuEventRecordWithFlags(void *e, void *s, unsigned) { return cuEventRecord(e, s); }
API CUresult cuEventDestroy_v2(void *e) {
    std::lock_guard g(lock);
    return recorded.erase(e), OK;
}
API CUresult cuEventSynchronize(void *) { return tally_host("cuEventSynchronize", 0), OK; }
API CUresult cuEventQuery(void *) { return OK; }
API CUresult cuEventElapsedTime(float *ms, void *start, void *end) {
    std::lock_guard g(lock);
    const auto a = recorded.find(start), b = recorded.find(end);
    if (a == recorded.end() || b == recorded.end()) return refuse(INVALID_VALUE, "cuEventElapsedTime: an event never recorded");
    return *ms = std::chrono::duration<float, std::milli>(b->second - a->second).count(), OK;
}
API CUresult cuEventElapsedTime_v2(float *ms, void *start, void *end) { return cuEventElapsedTime(ms, start, end); }

CUresult alloc_locked(CUdeviceptr *p, size_t n) {
    std::lock_guard g(lock);
    return alloc(p, n);
}
CUresult release_locked(CUdeviceptr p) {
    std::lock_guard g(lock);
    return release(p);
}
// cuMemAlloc and cuMemFree (not their stream-ordered twins) synchronize the device.
API CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    return tally_host("cuMemAlloc (synchronizing)", n), alloc_locked(p, n);
}
API CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, void *) { return alloc_locked(p, n); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return tally_host("cuMemFree (synchronizing)", 0), release_locked(p); }
API CUresult cuMemFreeAsync(CUdeviceptr p, void *) { return release_locked(p); }
// The device's memory pool, which the stream-ordered allocations above come from: its usage
// attributes read the live bytes (current) and their peak (high); the emulated pool caches
// nothing, so what it reserves is what is in use, and its release threshold changes nothing.
API CUresult cuDeviceGetMemPool(void **p, int) { return *p = pool, OK; }
API CUresult cuMemPoolGetAttribute(void *p, int attr, void *value) {
    std::lock_guard g(lock);
    if (p != pool) return refuse(INVALID_VALUE, "cuMemPoolGetAttribute: not the device's pool");
    auto *v = static_cast<unsigned long long *>(value);
    switch (attr) {
        case 5: case 7: *v = live; break;  // CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, USED_MEM_CURRENT
        case 6: case 8: *v = peak; break;  // RESERVED_MEM_HIGH, USED_MEM_HIGH
        default:
            return refuse(INVALID_VALUE, "cuMemPoolGetAttribute: attribute " + std::to_string(attr) + " is not emulated");
    }
    return OK;
}
API CUresult cuMemPoolSetAttribute(void *p, int attr, void *) {
    if (p != pool) return refuse(INVALID_VALUE, "cuMemPoolSetAttribute: not the device's pool");
    if (attr != 4)  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD (the trainer keeps freed memory)
        return refuse(INVALID_VALUE, "cuMemPoolSetAttribute: attribute " + std::to_string(attr) + " is not emulated");
    return OK;
}
CUresult htod(CUdeviceptr dst, const void *src, size_t n) {
    std::lock_guard g(lock);
    return copy(reinterpret_cast<void *>(dst), src, n, dst, 0);
}
CUresult dtoh(void *dst, CUdeviceptr src, size_t n) {
    std::lock_guard g(lock);
    return copy(dst, reinterpret_cast<const void *>(src), n, 0, src);
}
// The synchronous copy from pageable memory synchronizes the stream before it starts.
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    return tally_host("cuMemcpyHtoD (waits)", n), htod(dst, src, n);
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *) {
    return tally_host("cuMemcpyHtoDAsync", n), htod(dst, src, n);
}
API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    return tally_host("cuMemcpyDtoH (waits)", n), dtoh(dst, src, n);
}
API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *) {
    return tally_host("cuMemcpyDtoHAsync (waits: pageable memory)", n), dtoh(dst, src, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    std::lock_guard g(lock);
    return copy(reinterpret_cast<void *>(dst), reinterpret_cast<const void *>(src), n, dst, src);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void *) { return cuMemcpyDtoD_v2(dst, src, n); }
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    std::lock_guard g(lock);
    if (!inside(dst, n)) return refuse(INVALID_VALUE, "memset past the end of an allocation");
    if (!dry) std::memset(reinterpret_cast<void *>(dst), v, n);
    return OK;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void *) { return cuMemsetD8_v2(dst, v, n); }
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    std::lock_guard g(lock);
    if (!inside(dst, 4 * n)) return refuse(INVALID_VALUE, "memset past the end of an allocation");
    for (size_t i = 0; i < n && !dry; ++i) std::memcpy(reinterpret_cast<char *>(dst) + 4 * i, &v, 4);
    return OK;
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void *) { return cuMemsetD32_v2(dst, v, n); }

API CUresult cuModuleLoadData(void **m, const void *) { return *m = token(), OK; }
API CUresult cuModuleUnload(void *) { return OK; }
API CUresult cuModuleGetFunction(void **f, void *, const char *name) {
    std::lock_guard g(lock);
    const auto it = registry.find(name);
    // In a dry run candle's kernels are taken by any name; ours must exist.
    if (it == registry.end() && (!dry || std::string_view(name).starts_with("dpo_")))
        return refuse(NOT_FOUND, std::string("kernel ") + name + " is not emulated (only those of dpo_ops.cu are)");
    const auto at = functions.try_emplace(name, Function{name, it == registry.end() ? nullptr : &it->second});
    *f = &at.first->second;
    return OK;
}
// The parameter list as a GPU's driver reports it (src/ops/cuda.rs checks launches against it):
// each parameter at an offset aligned to its size; an index past the last one is an error.
API CUresult cuFuncGetParamInfo(void *f, size_t i, size_t *offset, size_t *size) {
    const Kernel *k = static_cast<const Function *>(f)->kernel;
    if (!k) return INVALID_VALUE;
    const auto &ps = k->params;
    if (i >= ps.size()) return INVALID_VALUE;
    size_t at = 0;
    for (size_t j = 0;; ++j) {
        const size_t s = ps[j].second;
        at = (at + s - 1) / s * s;
        if (j == i) return *offset = at, *size = s, OK;
        at += s;
    }
}
API CUresult cuFuncGetAttribute(int *v, int attr, void *) { return *v = attr == 0 ? 1024 : 0, OK; }
API CUresult cuFuncSetAttribute(void *, int, int) { return OK; }

API CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, void *, void **params, void **extra) {
    std::lock_guard g(lock);
    const auto *fn = static_cast<const Function *>(f);
    const std::string &name = fn->name;
    if (extra) return refuse(INVALID_VALUE, name + ": `extra` launch arguments are not emulated");
    const unsigned long threads = (unsigned long)bx * by * bz;
    if (!gx || !gy || !gz || !threads || threads > 1024 || bz > 64 || gy > 65535 || gz > 65535)
        return refuse(INVALID_CONFIG, name + ": launch shape " + std::to_string(gx) + "x" + std::to_string(gy) + "x" +
                                          std::to_string(gz) + " blocks of " + std::to_string(bx) + "x" +
                                          std::to_string(by) + "x" + std::to_string(bz));
    const double all = double(gx) * gy * gz * threads;
    const std::string key = census_key(name, all);
    Tally &tally = census[key];
    ++tally.launches;
    tally.threads += all;
    if (trap.first && key == trap.first && tally.launches == trap.second) __builtin_trap();
    if (!fn->kernel) return ++n_candle, OK;  // candle's, in a dry run
    ++n_ours;
    if (shared) return refuse(INVALID_VALUE, name + ": dynamic shared memory is not emulated");
    const auto &ps = fn->kernel->params;
    // The allocations the pointer arguments point into, each with the lowest such pointer: a
    // kernel of ours reads and writes from its pointers on, so at most from there to the end.
    std::map<CUdeviceptr, CUdeviceptr> touched;
    if (!ps.empty() && !params) return refuse(INVALID_VALUE, name + ": no arguments");
    for (size_t i = 0; i < ps.size(); ++i) {
        if (!ps[i].first) continue;
        CUdeviceptr p;
        std::memcpy(&p, params[i], sizeof p);
        if (p && !inside(p, 1))
            return refuse(INVALID_VALUE, name + ": argument " + std::to_string(i) + " is a pointer parameter and " +
                                             "points at no device allocation");
        if (!p) continue;
        const auto [at, fresh] = touched.try_emplace(std::prev(allocations.upper_bound(p))->first, p);
        if (!fresh) at->second = std::min(at->second, p);
    }
    for (const auto &[base, lowest] : touched) tally.bytes += base + allocations[base] - lowest;
    if (!dry) emu::launch({gx, gy, gz}, {bx, by, bz}, [&] { fn->kernel->call(params); });
    return OK;
}

API CUresult cuGetErrorString(CUresult e, const char **s) {
    *s = e == OK ? "no error" : "cuda-emu: refused (see stderr)";
    return OK;
}
API CUresult cuGetErrorName(CUresult e, const char **s) {
    *s = e == OK ? "CUDA_SUCCESS" : "CUDA_ERROR_CUDA_EMU";
    return OK;
}

// The GEMM candle runs every matmul with (cuda_backend/mod.rs), and ops::matmul_bf16_f32:
// column-major C = alpha op(A) op(B) + beta C per batch, for f32 and bf16 operands and results
// with f32 compute (CUBLAS_COMPUTE_32F and its _FAST_ variants), summed in f32. A dry run counts
// it in the census and computes nothing; otherwise its operands must lie inside allocations.
API int cublasGemmStridedBatchedEx(void *, int ta, int tb, int m, int n, int k, const void *alpha, const void *A,
                                   int at, int lda, long long sa, const void *B, int bt, int ldb, long long sb,
                                   const void *beta, void *C, int ct, int ldc, long long sc, int batch, int compute,
                                   int) {
    enum { R_32F = 0, R_16BF = 14 };
    std::lock_guard g(lock);
    const auto size = [](int type) { return type == R_32F ? 4 : 2; };
    const auto type = [](int t) { return t == R_32F ? "f32" : t == R_16BF ? "bf16" : "?"; };
    const std::string key = std::string("gemm ") + type(at) + (ta ? "T" : "N") + type(bt) + (tb ? "T" : "N") + "->" +
                            type(ct) + " m" + std::to_string(m) + " n" + std::to_string(n) + " k" + std::to_string(k) +
                            " x" + std::to_string(batch);
    Tally &t = census[key];
    ++t.launches;
    t.flops += 2.0 * m * n * k * batch;
    t.bytes += (double(m) * k * size(at) + double(k) * n * size(bt) + double(m) * n * size(ct)) * batch;
    if (dry) return OK;
    for (int x : {at, bt, ct})
        if (x != R_32F && x != R_16BF) return refuse(999, key + ": only f32 and bf16 are emulated");
    if (compute < 68 || compute > 77) return refuse(999, key + ": only f32 compute types are emulated");
    if (m <= 0 || n <= 0 || batch <= 0) return OK;
    // The last element each matrix reaches (rows x cols column-major, leading dimension ld).
    const auto last = [&](int rows, int cols, int ld, long long stride) {
        return (rows - 1) + (long long)(cols - 1) * ld + (batch - 1) * stride;
    };
    const auto ptr = [](const void *p) { return reinterpret_cast<CUdeviceptr>(p); };
    if (k > 0 && (!inside(ptr(A), size(at) * (1 + last(ta ? k : m, ta ? m : k, lda, sa))) ||
                  !inside(ptr(B), size(bt) * (1 + last(tb ? n : k, tb ? k : n, ldb, sb)))))
        return refuse(INVALID_VALUE, key + ": an operand reaches past its allocation");
    if (!inside(ptr(C), size(ct) * (1 + last(m, n, ldc, sc))))
        return refuse(INVALID_VALUE, key + ": the result reaches past its allocation");
    const auto load = [](const void *p, int type, long long i) {
        return type == R_32F ? static_cast<const float *>(p)[i]
                             : __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
    };
    const float al = *static_cast<const float *>(alpha), be = *static_cast<const float *>(beta);
    for (int b = 0; b < batch; ++b)
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                float acc = 0;
                for (int l = 0; l < k; ++l)
                    acc += load(A, at, b * sa + (ta ? l + (long long)i * lda : i + (long long)l * lda)) *
                           load(B, bt, b * sb + (tb ? j + (long long)l * ldb : l + (long long)j * ldb));
                const long long c = b * sc + i + (long long)j * ldc;
                const float v = al * acc + (be != 0 ? be * load(C, ct, c) : 0.f);
                if (ct == R_32F)
                    static_cast<float *>(C)[c] = v;
                else
                    static_cast<__nv_bfloat16 *>(C)[c] = __float2bfloat16_rn(v);
            }
    return OK;
}

// cuBLAS and cuRAND, as far as creating candle's CUDA device needs them.
API int cublasCreate_v2(void **h) { return *h = token(), 0; }
API int cublasDestroy_v2(void *) { return 0; }
API int cublasSetStream_v2(void *, void *) { return 0; }
API int cublasSetWorkspace_v2(void *, void *, size_t) { return 0; }
API int cublasSetMathMode(void *, int) { return 0; }
API int cublasLtCreate(void **h) { return *h = token(), 0; }
API int cublasLtDestroy(void *) { return 0; }
API int curandCreateGenerator(void **g, int) { return *g = token(), 0; }
API int curandDestroyGenerator(void *) { return 0; }
API int curandSetPseudoRandomGeneratorSeed(void *, unsigned long long) { return 0; }
API int curandSetStream(void *, void *) { return 0; }
