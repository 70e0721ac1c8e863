// CUDA on the CPU, for running kernels/dpo_ops.cu in tests (tests/cuda_emulated.rs): every CUDA
// thread of a block is a std::thread, a block's threads run together, blocks one at a time.
// Covers what the kernels use: threadIdx/blockIdx/blockDim/gridDim, __shared__ memory,
// __syncthreads(_or), warp shuffles and votes (__shfl_xor_sync, __shfl_down_sync, __ballot_sync;
// every lane of a warp takes part, as the kernels' full masks promise), the attention kernels'
// mma.sync, ldmatrix and cp.async, __align__, __popc, the float intrinsics, and the bf16/f16
// types of cuda_bf16.h/cuda_fp16.h (round to nearest even, as the GPU does).
#pragma once
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a function's statics are its block's shared memory.
#define __shared__ static
// CUDA's device math has the classification functions unqualified, for double as for float.
using std::isfinite;

namespace emu {
struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // What each thread posts for a warp's collective op: its value in a shuffle or vote, its A
    // and B fragments in an mma, its row address in an ldmatrix. Two of each, used in turn (see
    // `turn`).
    std::vector<double> lanes[2];
    std::vector<std::array<unsigned, 6>> mma[2];
    std::vector<const uint16_t *> rows[2];
    std::atomic<int> any{0};    // __syncthreads_or's vote
};
inline Block *running = nullptr;

// The slot of the calling thread's next warp-collective op: its lanes post into it, meet at the
// warp's barrier once, and read it. Every lane runs the same ops in the same order, so slots
// alternate in step; a lane posts into a slot again only two ops later, past the barrier of the
// op between, which its slowest lane reaches only once done reading. (The count starts at 0 with
// each block, as the block's barriers do.)
inline thread_local unsigned ops = 0;
inline unsigned turn() { return ops++ & 1; }

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <typename T> T shuffle(T v, int (*src)(int lane, int o), int o) {
    const unsigned t = linear_tid(), lane = t & 31;
    auto &warp = *running->warps[t / 32];
    auto &lanes = running->lanes[turn()];
    lanes[t] = (double)v;
    warp.arrive_and_wait();
    const int from = src((int)lane, o);
    return from < 0 ? v : (T)lanes[t - lane + from];
}

// Runs `kernel` on every thread of every block of `grid`. A launch starts a block's worth of
// threads once; each runs its place in every block in turn (x fastest), and they all meet at
// `done` before the next block starts. (A std::thread per thread per block cost 50 us a thread,
// and 0.7 ms under ThreadSanitizer: most of the sanitized tests' time.)
inline void launch(dim3 grid, dim3 block, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
    Block b;
    for (int i = 0; i < 2; ++i) {
        b.lanes[i].assign(n, 0.0);
        b.mma[i].assign(n, {});
        b.rows[i].assign(n, nullptr);
    }
    // A block's barriers, made anew for each: a thread that returns drops out of them, so that it
    // no longer holds up the others.
    auto fresh = [&]() noexcept {
        b.all = std::make_unique<std::barrier<>>(n);
        b.warps.clear();
        for (unsigned w = 0; w < n; w += 32) b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w)));
    };
    fresh();
    std::barrier done(n, fresh);
    running = &b;
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned tz = 0; tz < block.z; ++tz)
        for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
                threads.emplace_back([&, tx, ty, tz] {
                    threadIdx = {tx, ty, tz};
                    for (unsigned i = 0; i < blocks; ++i) {
                        blockIdx = {i % grid.x, i / grid.x % grid.y, i / grid.x / grid.y};
                        ops = 0;
                        kernel();
                        b.warps[linear_tid() / 32]->arrive_and_drop();
                        b.all->arrive_and_drop();
                        done.arrive_and_wait();
                    }
                });
    for (auto &t : threads) t.join();
    running = nullptr;
}
}  // namespace emu

inline void __syncthreads() { emu::running->all->arrive_and_wait(); }

inline int __syncthreads_or(int p) {
    if (p) emu::running->any.store(1);
    __syncthreads();
    const int r = emu::running->any.load();
    __syncthreads();
    if (emu::linear_tid() == 0) emu::running->any.store(0);
    __syncthreads();
    return r;
}

template <typename T> T __shfl_xor_sync(unsigned, T v, int o) {
    return emu::shuffle<T>(v, [](int lane, int o) { return lane ^ o; }, o);
}

template <typename T> T __shfl_down_sync(unsigned, T v, int o) {
    return emu::shuffle<T>(v, [](int lane, int o) { return lane + o < 32 ? lane + o : -1; }, o);
}

// A warp's vote: bit `lane` set where that lane's `p` is non-zero (every lane takes part).
inline unsigned __ballot_sync(unsigned, int p) {
    const unsigned t = emu::linear_tid(), lane = t & 31, base = t - lane;
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    auto &warp = *emu::running->warps[t / 32];
    auto &lanes = emu::running->lanes[emu::turn()];
    lanes[t] = p ? 1.0 : 0.0;
    warp.arrive_and_wait();
    unsigned votes = 0;
    for (unsigned l = 0; l < 32 && base + l < n; ++l)
        if (lanes[base + l] != 0.0) votes |= 1u << l;
    return votes;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

// A product rounded on its own (nvcc never contracts __fmul_rn into an FMA; the volatile keeps
// the host compiler from doing so).
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

inline double __longlong_as_double(long long i) {
    double d;
    std::memcpy(&d, &i, 8);
    return d;
}

struct __nv_bfloat16 {
    uint16_t bits;
};

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

// The vector types with CUDA's alignment (vector_types.h): a load of one from an address that
// is not a multiple of it faults on the GPU, and here fails the alignment check the emulator is
// compiled with (-fsanitize=alignment).
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline float __bfloat162float(__nv_bfloat16 h) { return __int_as_float((int)((uint32_t)h.bits << 16)); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}

struct __half {
    _Float16 v;
};

inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return {(_Float16)f}; }

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 of a warp (kernels/dpo_ops.cu, ldsm_x4):
// every lane posts its row's address, then gathers its two bf16 of each of the four matrices.
// A row address that is not 16-byte aligned, as on the GPU, is an error.
template <typename T> inline void emu_ldsm_x4(unsigned r[4], const T *row, bool trans) {
    const unsigned tid = emu::linear_tid(), lane = tid & 31, base = tid - lane;
    auto &warp = *emu::running->warps[tid / 32];
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) __builtin_trap();
    auto &rows = emu::running->rows[emu::turn()];
    rows[tid] = reinterpret_cast<const uint16_t *>(row);
    warp.arrive_and_wait();
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned j = 0; j < 4; ++j) {
        const uint16_t *const *m = &rows[base + 8 * j];  // matrix j's rows
        const uint16_t lo = trans ? m[2 * t][g] : m[g][2 * t], hi = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
        r[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
}

// cp.async of 16 bytes, global to shared: held until the thread's cp.async.wait_all, so that a
// kernel reading a tile it did not wait for reads stale data here too.
inline thread_local std::vector<std::pair<void *, uint4>> cp_async_pending;
inline void emu_cp_async16(void *smem, const void *gmem) {
    if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0) __builtin_trap();
    uint4 v;
    std::memcpy(&v, gmem, 16);
    cp_async_pending.emplace_back(smem, v);
}
inline void emu_cp_async_wait_all() {
    for (auto &[to, v] : cp_async_pending) std::memcpy(to, &v, 16);
    cp_async_pending.clear();
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 of a warp (kernels/dpo_ops.cu gives the
// fragment layout): every lane posts its A and B registers, then computes its four elements of
// C += A B, rows g and g + 8 of A (posted by lanes 4 g ..) times columns 2t and 2t + 1 of B (by
// lanes 8 t ..), the products summed in k order in f32.
inline void emu_mma_bf16_16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    const unsigned tid = emu::linear_tid(), lane = tid & 31, base = tid - lane;
    auto &warp = *emu::running->warps[tid / 32];
    auto &posted = emu::running->mma[emu::turn()];
    posted[tid] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    warp.arrive_and_wait();
    auto half = [](unsigned r, int hi) { return __int_as_float((int)(((r >> (16 * hi)) & 0xffffu) << 16)); };
    const unsigned g = lane / 4, t = lane % 4;
    float A[2][16], B[2][16];  // rows g, g + 8 of A; columns 2t, 2t + 1 of B
    for (unsigned u = 0; u < 4; ++u) {
        const auto &fa = posted[base + 4 * g + u];
        for (int hi = 0; hi < 2; ++hi) {
            A[0][2 * u + hi] = half(fa[0], hi);
            A[1][2 * u + hi] = half(fa[1], hi);
            A[0][2 * u + 8 + hi] = half(fa[2], hi);
            A[1][2 * u + 8 + hi] = half(fa[3], hi);
        }
        for (unsigned col = 0; col < 2; ++col) {
            const auto &fb = posted[base + 4 * (2 * t + col) + u];
            for (int hi = 0; hi < 2; ++hi) {
                B[col][2 * u + hi] = half(fb[4], hi);
                B[col][2 * u + 8 + hi] = half(fb[5], hi);
            }
        }
    }
    for (int i = 0; i < 4; ++i) {
        float sum = 0.0f;
        for (int kk = 0; kk < 16; ++kk) sum += A[i >> 1][kk] * B[i & 1][kk];
        c[i] += sum;
    }
}
