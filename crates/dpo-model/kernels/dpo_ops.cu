// Fused training kernels for dpo-model (see src/ops/): masked softmax, RMSNorm, rotate-half
// RoPE, SiLU gate, target log-probs and row gathers, forward and backward. Compiled to PTX by
// build.rs (feature `cuda`).
//
// Conventions, shared by every kernel:
// * tensors are contiguous, row-major; the Rust side checks layouts and sizes;
// * arithmetic runs in `acc_t<T>`: float for bf16/f16/f32, double for f64; results are
//   rounded to T once, round-to-nearest-even (as half::bf16::from_f32 on the CPU);
// * row kernels run one block per row, blockDim.x a multiple of 32 (<= 1024), any row length;
// * every kernel exists as <name>_<dtype> with dtype in bf16, f16, f32, f64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };
#define ACC(T) typename AccOf<T>::type

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_acc(ACC(T) x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

// Round through T and back (what a cast to T followed by a cast to the accumulator does).
template <typename T> __device__ __forceinline__ ACC(T) round_t(ACC(T) x) { return to_acc(from_acc<T>(x)); }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_nan(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double acc_nan(double) { return __longlong_as_double(0x7fffffffffffffffLL); }
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float neg_inf(float) { return -INFINITY; }
__device__ __forceinline__ double neg_inf(double) { return -(double)INFINITY; }

// A row kernel's walk over its thread's elements k = threadIdx.x, + blockDim.x, ... of [0, n),
// in that order, 4 at a time: the 4 loads (`load(k)`, a value of type V) are issued before the
// first use (`use(k, value)`). One element a turn kept a single load in flight per thread, too
// few bytes for the DRAM's bandwidth with a block per row (1,024 threads read 4 KB at a time).
template <typename V, typename Load, typename Use>
__device__ __forceinline__ void strided4(int n, Load load, Use use) {
    const int B = blockDim.x;
    for (int k = threadIdx.x; k < n; k += 4 * B) {
        V v[4] = {};
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (k + u * B < n) v[u] = load(k + u * B);
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (k + u * B < n) use(k + u * B, v[u]);
    }
}

// One column of an RMSNorm row as its kernels load it (the fields a pass does not read stay 0).
template <typename A> struct NormCol {
    A x, w, dy, res;
};

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        A u = __shfl_xor_sync(0xffffffffu, v, o);
        v = u > v ? u : v;
    }
    return v;
}

// Block-wide sum / max; every thread gets the result. `shm` holds 32 values. The leading
// barrier lets consecutive calls reuse `shm`.
template <typename A> __device__ A block_sum(A v, A *shm) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shm[wid] = v;
    __syncthreads();
    return warp_sum(lane < nw ? shm[lane] : (A)0);
}

template <typename A> __device__ A block_max(A v, A *shm) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shm[wid] = v;
    __syncthreads();
    return warp_max(lane < nw ? shm[lane] : neg_inf(v));
}

// ---------------------------------------------------------------------------------------------
// Masked softmax: p = softmax(s * scale + bias) over the last axis.
// s, p: [rows = R*H*Q, K]; bias: f32 [R or 1, 1, Q, K]. Row `row` uses bias row
// (bias_bcast ? 0 : row / HQ) * Q + row % Q.
// A bias at or below BIAS_MASKS masks its key: the score there is not read, and its scaled value
// is the bias itself, which is what adding any score of a sane size to it rounds to (the ulp of
// 5e29 is 4e22). Most of an attention row is masked (causal order, the other completion of a
// shared prompt, padding), and those scores are then never fetched. Likewise the backward reads
// no dP where P is 0 (dS is 0 there).
#define BIAS_MASKS (-5e29f)
template <typename T, typename A>
__device__ __forceinline__ A masked_score(const T *__restrict__ x, const float *__restrict__ b, int k, A scale) {
    const float bk = b[k];
    return bk <= BIAS_MASKS ? (A)bk : to_acc(x[k]) * scale + (A)bk;
}

template <typename T>
__device__ void softmax_fwd(const T *__restrict__ s, const float *__restrict__ bias, T *__restrict__ p,
                            int K, int Q, int HQ, int bias_bcast, double scale_) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long row = blockIdx.x;
    const long long brow = (bias_bcast ? 0 : row / HQ) * Q + row % Q;
    const T *x = s + row * K;
    const float *b = bias + brow * K;
    T *y = p + row * K;
    const A scale = (A)scale_;
    const A ninf = neg_inf((A)0);
    // Per-thread online max and rescaled sum, then one block max and one block sum.
    A m = ninf, acc = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A v = masked_score(x, b, k, scale);
        if (v > m) {
            acc = (m == ninf ? (A)0 : acc * acc_exp(m - v)) + (A)1;
            m = v;
        } else if (m != ninf) {
            acc += acc_exp(v - m);
        }
    }
    const A mx = block_max(m, shm);
    const A sum = block_sum(m == ninf ? (A)0 : acc * acc_exp(m - mx), shm);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A v = masked_score(x, b, k, scale);
        y[k] = from_acc<T>(acc_exp(v - mx) / sum);
    }
}

// ds = scale * p * (dp - sum_k dp * p), per row of length K.
template <typename T>
__device__ void softmax_bwd(const T *__restrict__ p, const T *__restrict__ dp, T *__restrict__ ds, int K,
                            double scale_) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long off = (long long)blockIdx.x * K;
    const A scale = (A)scale_;
    A dot = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A pk = to_acc(p[off + k]);
        if (pk != (A)0) dot += pk * to_acc(dp[off + k]);
    }
    dot = block_sum(dot, shm);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A pk = to_acc(p[off + k]);
        ds[off + k] = from_acc<T>(pk == (A)0 ? (A)0 : scale * pk * (to_acc(dp[off + k]) - dot));
    }
}

// The same two for rows of at most 32 * SOFTMAX_WARP_C entries, one warp per row (row = warp of
// the grid, blockDim.x / 32 rows a block): the row stays in registers, so global memory is read
// once and written once, and the reductions are warp shuffles without block barriers. Lane l
// holds entries l, l + 32, ... (coalesced). The forward takes the row's exact maximum first,
// then one sum; masked entries (-inf) and those past K count 0.
#define SOFTMAX_WARP_C 32
template <typename T>
__device__ void softmax_fwd_warp(const T *__restrict__ s, const float *__restrict__ bias, T *__restrict__ p,
                                 long long rows, int K, int Q, int HQ, int bias_bcast, double scale_) {
    typedef ACC(T) A;
    const int lane = threadIdx.x & 31;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= rows) return;  // the whole warp
    const long long brow = (bias_bcast ? 0 : row / HQ) * Q + row % Q;
    const T *x = s + row * K;
    const float *b = bias + brow * K;
    const A scale = (A)scale_, ninf = neg_inf((A)0);
    A v[SOFTMAX_WARP_C], m = ninf;
#pragma unroll
    for (int c = 0; c < SOFTMAX_WARP_C; ++c) {
        const int k = c * 32 + lane;
        v[c] = k < K ? masked_score(x, b, k, scale) : ninf;
        m = v[c] > m ? v[c] : m;
    }
    m = warp_max(m);
    A sum = 0;
#pragma unroll
    for (int c = 0; c < SOFTMAX_WARP_C; ++c) {
        v[c] = v[c] == ninf ? (A)0 : acc_exp(v[c] - m);  // NaN stays NaN
        sum += v[c];
    }
    sum = warp_sum(sum);
    T *y = p + row * K;
#pragma unroll
    for (int c = 0; c < SOFTMAX_WARP_C; ++c) {
        const int k = c * 32 + lane;
        if (k < K) y[k] = from_acc<T>(v[c] / sum);
    }
}

template <typename T>
__device__ void softmax_bwd_warp(const T *__restrict__ p, const T *__restrict__ dp, T *__restrict__ ds,
                                 long long rows, int K, double scale_) {
    typedef ACC(T) A;
    const int lane = threadIdx.x & 31;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= rows) return;  // the whole warp
    const long long off = row * K;
    const A scale = (A)scale_;
    A pv[SOFTMAX_WARP_C], dv[SOFTMAX_WARP_C], dot = 0;
#pragma unroll
    for (int c = 0; c < SOFTMAX_WARP_C; ++c) {
        const int k = c * 32 + lane;
        pv[c] = k < K ? to_acc(p[off + k]) : (A)0;
        dv[c] = pv[c] != (A)0 ? to_acc(dp[off + k]) : (A)0;
        dot += pv[c] * dv[c];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int c = 0; c < SOFTMAX_WARP_C; ++c) {
        const int k = c * 32 + lane;
        if (k < K) ds[off + k] = from_acc<T>(pv[c] == (A)0 ? (A)0 : scale * pv[c] * (dv[c] - dot));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = O(T(x * r) * w), r = 1 / sqrt(sum(x^2) * (1/D) + eps), rows of length D; the
// output type O is T, or bf16/f16 for f32 inputs (the norm and the cast to the matmul dtype).
// With `add` (a branch's output in O): the residual add first, sum = x + add (written, and
// normalized in place of x), as dpo_add_cast then this kernel compute it, in one pass over x.
template <typename T, typename O = T>
__device__ void rmsnorm_fwd(const T *__restrict__ x, const T *__restrict__ w, O *__restrict__ y, int D,
                            double eps, const O *__restrict__ add = nullptr, T *__restrict__ sum = nullptr) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long off = (long long)blockIdx.x * D;
    A ss = 0;
    if (add) {
        strided4<A>(D, [&](int j) { return to_acc(x[off + j]) + to_acc(add[off + j]); }, [&](int j, A v) {
            sum[off + j] = from_acc<T>(v);
            ss += v * v;
        });
    } else {
        strided4<A>(D, [&](int j) { return to_acc(x[off + j]); }, [&](int, A v) { ss += v * v; });
    }
    ss = block_sum(ss, shm);
    const A r = (A)1 / acc_sqrt(ss * ((A)1 / (A)D) + (A)eps);
    // The second walk visits a thread's elements as the first did: it reads back its own sums.
    const T *__restrict__ xs = add ? sum : x;
    strided4<NormCol<A>>(
        D, [&](int j) { return NormCol<A>{to_acc(xs[off + j]), to_acc(w[j])}; },
        [&](int j, NormCol<A> e) { y[off + j] = from_acc<O>(round_t<T>(e.x * r) * e.w); });
}

// The residual add with the branch cast to f32: out = h + float(y).
// Element-wise kernels run `step(i, Width<W>())` on elements i .. i + W of [0, n), grid-stride:
// W = VEC_W, read and written as 16-byte vectors, while VEC_W elements remain and every buffer
// is 16-byte aligned (`vec`); W = 1 for the rest. A 2-byte type read an element at a time keeps
// too few bytes in flight per thread to use the DRAM's bandwidth.
#define VEC_W 8
template <int W> struct Width {
    static constexpr int w = W;
};

__device__ __forceinline__ bool aligned16(const void *p) { return ((unsigned long long)p & 15) == 0; }

template <typename Step> __device__ __forceinline__ void elementwise(long long n, bool vec, Step step) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (vec) {
        const long long nv = n / VEC_W;
        for (long long v = first; v < nv; v += stride) step(v * VEC_W, Width<VEC_W>());
        done = nv * VEC_W;
    }
    for (long long i = done + first; i < n; i += stride) step(i, Width<1>());
}

// W elements at p: whole 16-byte vectors where W of T make them and `vec` (p aligned), else one
// at a time.
template <int W, typename T> __device__ __forceinline__ void load_w(T (&e)[W], const T *p, bool vec = true) {
    if constexpr (W * sizeof(T) % 16 == 0) {
        if (vec) {
#pragma unroll
            for (int c = 0; c < (int)(W * sizeof(T) / 16); ++c) {
                const uint4 raw = ((const uint4 *)p)[c];
                memcpy((char *)e + 16 * c, &raw, 16);
            }
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) e[j] = p[j];
}

template <int W, typename T> __device__ __forceinline__ void store_w(T *p, const T (&e)[W], bool vec = true) {
    if constexpr (W * sizeof(T) % 16 == 0) {
        if (vec) {
#pragma unroll
            for (int c = 0; c < (int)(W * sizeof(T) / 16); ++c) {
                uint4 raw;
                memcpy(&raw, (const char *)e + 16 * c, 16);
                ((uint4 *)p)[c] = raw;
            }
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = e[j];
}

// Kernels that take up to PARTS tensors a launch, one per blockIdx.y, have a parameter per part
// for each field (x0 .. x15: PART_PARAMS), and a block picks its own with PART(x), a chain of
// selects on the block-uniform blockIdx.y. An array of the parameters indexed by blockIdx.y would
// be addressable memory, which nvcc builds in each thread's local memory: every thread of the
// launch would first copy the whole parameter list (704 bytes for AdamW's) out to it.
#define PARTS 16
#define PART_PARAMS(T, x)                                                                            \
    T x##0, T x##1, T x##2, T x##3, T x##4, T x##5, T x##6, T x##7, T x##8, T x##9, T x##10, T x##11, \
        T x##12, T x##13, T x##14, T x##15
#define PART(x)                                                                                      \
    (blockIdx.y == 0    ? x##0                                                                       \
     : blockIdx.y == 1  ? x##1                                                                       \
     : blockIdx.y == 2  ? x##2                                                                       \
     : blockIdx.y == 3  ? x##3                                                                       \
     : blockIdx.y == 4  ? x##4                                                                       \
     : blockIdx.y == 5  ? x##5                                                                       \
     : blockIdx.y == 6  ? x##6                                                                       \
     : blockIdx.y == 7  ? x##7                                                                       \
     : blockIdx.y == 8  ? x##8                                                                       \
     : blockIdx.y == 9  ? x##9                                                                       \
     : blockIdx.y == 10 ? x##10                                                                      \
     : blockIdx.y == 11 ? x##11                                                                      \
     : blockIdx.y == 12 ? x##12                                                                      \
     : blockIdx.y == 13 ? x##13                                                                      \
     : blockIdx.y == 14 ? x##14                                                                      \
                        : x##15)

// f32 tensors cast to T into one buffer: this block's part, s[0 .. n) -> out[off ..). The manual
// backward's per-step copy of the weights in the matmul dtype, stacked as its matmuls take them,
// in one pass and one launch for up to PARTS tensors.
template <typename T>
__device__ void cast_parts(T *__restrict__ out, const float *__restrict__ s, long long off, long long n) {
    T *__restrict__ d = out + off;
    elementwise(n, aligned16(s) && aligned16(d), [&](long long i, auto width) {
        constexpr int W = decltype(width)::w;
        float a[W];
        T o[W];
        load_w<W>(a, s + i);
#pragma unroll
        for (int j = 0; j < W; ++j) o[j] = from_acc<T>(a[j]);
        store_w<W>(d + i, o);
    });
}

template <typename T>
__device__ void add_cast(const float *__restrict__ h, const T *__restrict__ y, float *__restrict__ out,
                         long long n) {
    elementwise(n, aligned16(h) && aligned16(y) && aligned16(out), [&](long long i, auto width) {
        constexpr int W = decltype(width)::w;
        float a[W], o[W];
        T b[W];
        load_w<W>(a, h + i);
        load_w<W>(b, y + i);
#pragma unroll
        for (int j = 0; j < W; ++j) o[j] = a[j] + to_acc(b[j]);
        store_w<W>(out + i, o);
    });
}

// dx = r * (g - n * sum(g * n) / D), with n = x * r and g = dy * w; stores r per row in `rs`.
// Writes dx (plus res, the gradient arriving through the residual connection, where given) into
// out[0 .. N*D], and where out_lo is not null the same values rounded to U into out_lo (the
// gradient the matmul before the norm reads, without a cast pass). dy is of type U: T, or
// bf16/f16 for f32 x (a matmul's output gradient).
template <typename T, typename U = T>
__device__ void rmsnorm_bwd_dx(const T *__restrict__ x, const T *__restrict__ w, const U *__restrict__ dy,
                               const T *__restrict__ res, T *__restrict__ out, U *__restrict__ out_lo,
                               ACC(T) *__restrict__ rs, int D, double eps) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long off = (long long)blockIdx.x * D;
    A ss = 0, gx = 0;
    // x, w, dy of column j, and in the second pass the residual's gradient where given.
    const auto col = [&](int j, bool with_res) {
        return NormCol<A>{to_acc(x[off + j]), to_acc(w[j]), to_acc(dy[off + j]),
                          with_res ? to_acc(res[off + j]) : (A)0};
    };
    strided4<NormCol<A>>(D, [&](int j) { return col(j, false); }, [&](int, NormCol<A> e) {
        ss += e.x * e.x;
        gx += e.dy * e.w * e.x;
    });
    ss = block_sum(ss, shm);
    gx = block_sum(gx, shm);
    const A r = (A)1 / acc_sqrt(ss * ((A)1 / (A)D) + (A)eps);
    // sum(g * n) / D = r * sum(g * x) / D
    const A c = r * gx / (A)D;
    strided4<NormCol<A>>(D, [&](int j) { return col(j, res != nullptr); }, [&](int j, NormCol<A> e) {
        const A n = e.x * r;
        const A g = e.dy * e.w;
        const A v = r * (g - n * c);
        const T o = from_acc<T>(res ? v + e.res : v);
        out[off + j] = o;
        if (out_lo) out_lo[off + j] = from_acc<U>(to_acc(o));
    });
    if (threadIdx.x == 0) rs[blockIdx.x] = r;
}

// dw partial sums: block (32, 8), grid (ceil(D / 32), G). Column j, row group gy sums
// dy[i, j] * T(x[i, j] * r[i]) over rows i = gy * 8 + ty + k * G * 8, then over ty.
template <typename T, typename U = T>
__device__ void rmsnorm_bwd_dw_partial(const T *__restrict__ x, const U *__restrict__ dy,
                                       const ACC(T) *__restrict__ rs, ACC(T) *__restrict__ partial, int N,
                                       int D) {
    typedef ACC(T) A;
    __shared__ A tile[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int G = gridDim.y;
    A acc = 0;
    if (j < D) {
        for (long long i = (long long)blockIdx.y * 8 + threadIdx.y; i < N; i += (long long)G * 8) {
            const long long o = i * D + j;
            acc += to_acc(dy[o]) * round_t<T>(to_acc(x[o]) * rs[i]);
        }
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < D) {
        A s = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) s += tile[t][threadIdx.x];
        partial[(long long)blockIdx.y * D + j] = s;
    }
}

// dw[j] = sum_g partial[g, j], written to out[offset + j].
template <typename T>
__device__ void rmsnorm_bwd_dw_final(const ACC(T) *__restrict__ partial, T *__restrict__ out,
                                     long long offset, int G, int D) {
    typedef ACC(T) A;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < D; j += gridDim.x * blockDim.x) {
        A s = 0;
        for (int g = 0; g < G; ++g) s += partial[(long long)g * D + j];
        out[offset + j] = from_acc<T>(s);
    }
}

// ---------------------------------------------------------------------------------------------
// Rotate-half RoPE on x [R, H, S, Dh] (+ bias [H, Dh]) with cos/sin [S, Dh] (per_row = 0) or [R, S, Dh]; x is read
// through its element strides sr, sh, sp over R, H, S (head rows contiguous), y is contiguous.
// forward:  y_j = x_j c_j + (j < h ? -x_{j+h} : x_{j-h}) s_j
// backward: dx_j = dy_j c_j + (j < h ? dy_{j+h} s_{j+h} : -dy_{j-h} s_{j-h})
// A thread takes W entries j0 .. j0 + W of a head row's first half and their partners j0 + h ..
// in the second (rope_pair): W = 8 where h is a multiple of 8, as 16-byte vectors where every
// buffer and row allows (`vec`), else W = 1. A row's indices are divided out once per 2 W entries.
// y (a head row) at j0 .. j0 + W and j0 + h .. from the head row xr and the cos/sin rows cr, sr;
// with a bias row br (not null), from T(x + b) (the projection's bias added, rounded as the add
// of its own rounds it).
template <int W, typename T>
__device__ __forceinline__ void rope_pair(const T *xr, const T *br, const T *cr, const T *sr, T *yr, int j0, int h,
                                          bool vec, int bwd) {
    typedef ACC(T) A;
    T lo[W], hi[W], clo[W], chi[W], slo[W], shi[W], ylo[W], yhi[W];
    load_w<W>(lo, xr + j0, vec);
    load_w<W>(hi, xr + j0 + h, vec);
    if (br) {
        T blo[W], bhi[W];
        load_w<W>(blo, br + j0, vec);
        load_w<W>(bhi, br + j0 + h, vec);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            lo[j] = from_acc<T>(to_acc(lo[j]) + to_acc(blo[j]));
            hi[j] = from_acc<T>(to_acc(hi[j]) + to_acc(bhi[j]));
        }
    }
    load_w<W>(clo, cr + j0, vec);
    load_w<W>(chi, cr + j0 + h, vec);
    load_w<W>(slo, sr + j0, vec);
    load_w<W>(shi, sr + j0 + h, vec);
#pragma unroll
    for (int j = 0; j < W; ++j) {
        const A a = to_acc(lo[j]), b = to_acc(hi[j]);
        if (!bwd) {
            ylo[j] = from_acc<T>(a * to_acc(clo[j]) + -b * to_acc(slo[j]));
            yhi[j] = from_acc<T>(b * to_acc(chi[j]) + a * to_acc(shi[j]));
        } else {
            const A pb = b * to_acc(shi[j]), pa = a * to_acc(slo[j]);
            ylo[j] = from_acc<T>(a * to_acc(clo[j]) + pb);
            yhi[j] = from_acc<T>(b * to_acc(chi[j]) + -pa);
        }
    }
    store_w<W>(yr + j0, ylo, vec);
    store_w<W>(yr + j0 + h, yhi, vec);
}

// Whether rows of `stride` elements of T keep 16-byte alignment.
template <typename T> __device__ __forceinline__ bool rows16(long long stride) {
    return (stride * (long long)sizeof(T)) % 16 == 0;
}

// `bias` (null, or [H, Dh]: head `head`'s row added to each of its rows first; forward only).
template <typename T>
__device__ void rope_kernel(const T *__restrict__ x, const T *__restrict__ bias, const T *__restrict__ cs,
                            const T *__restrict__ sn, T *__restrict__ y, long long n, int H, int S, int Dh,
                            long long sr, long long sh, long long sp, int per_row, int bwd) {
    const int h = Dh / 2;
    const bool by8 = h % VEC_W == 0;
    const bool vec = by8 && aligned16(x) && (!bias || aligned16(bias)) && aligned16(cs) && aligned16(sn) &&
                     aligned16(y) && rows16<T>(sr) && rows16<T>(sh) && rows16<T>(sp) && rows16<T>(Dh);
    const int W = by8 ? VEC_W : 1;
    const long long per = h / W, items = n / Dh * per;  // W-entry pieces a head row, and in all
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (long long)gridDim.x * blockDim.x) {
        const long long t = it / per;  // (r * H + head) * S + s
        const int j0 = (int)(it % per) * W;
        const int s = (int)(t % S);
        const int head = (int)((t / S) % H);
        const long long r = t / ((long long)H * S);
        const long long c = (per_row ? r * S + s : (long long)s) * Dh;
        const T *xr = x + r * sr + head * sh + s * sp;  // this head row of x (strided view)
        const T *br = bias ? bias + (long long)head * Dh : nullptr;
        if (by8)
            rope_pair<VEC_W>(xr, br, cs + c, sn + c, y + t * Dh, j0, h, vec, bwd);
        else
            rope_pair<1>(xr, br, cs + c, sn + c, y + t * Dh, j0, h, false, bwd);
    }
}

// RoPE's backward on dq [R, HQ, S, Dh] and dk [R, HK, S, Dh], merged with dv [R, HK, S, Dh] into
// the stacked projection's layout y [R, S, HQ + 2 HK, Dh], the pieces of rope_kernel a thread.
template <typename T>
__device__ void rope_bwd_merged_kernel(const T *__restrict__ dq, const T *__restrict__ dk,
                                       const T *__restrict__ dv, const T *__restrict__ cs,
                                       const T *__restrict__ sn, T *__restrict__ y, long long n, int HQ,
                                       int HK, int S, int Dh, int per_row) {
    const int h = Dh / 2;
    const int HT = HQ + 2 * HK;
    const bool by8 = h % VEC_W == 0;
    const bool vec = by8 && aligned16(dq) && aligned16(dk) && aligned16(dv) && aligned16(cs) && aligned16(sn) &&
                     aligned16(y) && rows16<T>(Dh);
    const int W = by8 ? VEC_W : 1;
    const long long per = h / W, items = n / Dh * per;
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (long long)gridDim.x * blockDim.x) {
        const long long t = it / per;  // (r * S + s) * HT + head
        const int j0 = (int)(it % per) * W;
        const int head = (int)(t % HT);
        const int s = (int)((t / HT) % S);
        const long long r = t / ((long long)HT * S);
        const T *src;
        int nh, at;
        if (head < HQ) {
            src = dq; nh = HQ; at = head;
        } else if (head < HQ + HK) {
            src = dk; nh = HK; at = head - HQ;
        } else {
            src = dv; nh = HK; at = head - HQ - HK;
        }
        const T *xr = src + ((r * nh + at) * S + s) * Dh;  // this head row of the source
        T *yr = y + t * Dh;
        if (head >= HQ + HK) {  // dv: copied
            for (int j = j0; j < j0 + W; ++j) {
                yr[j] = xr[j];
                yr[j + h] = xr[j + h];
            }
            continue;
        }
        const long long c = (per_row ? r * S + s : (long long)s) * Dh;
        if (by8)
            rope_pair<VEC_W>(xr, (const T *)nullptr, cs + c, sn + c, yr, j0, h, vec, 1);
        else
            rope_pair<1>(xr, (const T *)nullptr, cs + c, sn + c, yr, j0, h, false, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// SiLU gate: y = silu(g) * u; backward writes dg to out[0 .. n] and du to out[n .. 2n], and with
// `with_y` y again to out[2n .. 3n] (the hand-written backward needs it for dW of the down
// projection: one pass over g and u for both, not two).
template <typename T>
__device__ void silu_mul_fwd(const T *__restrict__ g, const T *__restrict__ u, T *__restrict__ y, long long n) {
    typedef ACC(T) A;
    elementwise(n, aligned16(g) && aligned16(u) && aligned16(y), [&](long long i, auto width) {
        constexpr int W = decltype(width)::w;
        T a[W], b[W], o[W];
        load_w<W>(a, g + i);
        load_w<W>(b, u + i);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            const A gv = to_acc(a[j]);
            o[j] = from_acc<T>(gv / ((A)1 + acc_exp(-gv)) * to_acc(b[j]));
        }
        store_w<W>(y + i, o);
    });
}

template <typename T>
__device__ void silu_mul_bwd(const T *__restrict__ g, const T *__restrict__ u, const T *__restrict__ dy,
                             T *__restrict__ out, long long n, int with_y) {
    typedef ACC(T) A;
    const bool vec = aligned16(g) && aligned16(u) && aligned16(dy) && aligned16(out) && aligned16(out + n);
    elementwise(n, vec, [&](long long i, auto width) {
        constexpr int W = decltype(width)::w;
        T a[W], b[W], d[W], dg[W], du[W], y[W];
        load_w<W>(a, g + i);
        load_w<W>(b, u + i);
        load_w<W>(d, dy + i);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            const A gv = to_acc(a[j]), uv = to_acc(b[j]), dv = to_acc(d[j]);
            const A sig = (A)1 / ((A)1 + acc_exp(-gv));
            dg[j] = from_acc<T>(dv * uv * sig * ((A)1 + gv * ((A)1 - sig)));
            du[j] = from_acc<T>(dv * gv * sig);
            y[j] = from_acc<T>(gv / ((A)1 + acc_exp(-gv)) * uv);  // silu_mul_fwd's formula, bit for bit
        }
        store_w<W>(out + i, dg);
        store_w<W>(out + n + i, du);
        if (with_y) store_w<W>(out + 2 * n + i, y);
    });
}

// ---------------------------------------------------------------------------------------------
// Log-probs of target tokens, one block per row of logits z [N, V]:
// forward:  lse = log sum_v exp(z_v), logp = z_t - lse, into out [2, N] (logp row, lse row);
// backward: dz_v = g [v = t] - g exp(z_v - lse), with lse_g [2, N] (lse row, g row); z may be
//           the vocabulary's columns first .. first + V (a target outside them: no one-hot).
// A NaN logit makes the row's lse NaN; a target outside [0, V) gives a NaN logp.
template <typename T>
__device__ void target_logprobs_fwd(const T *__restrict__ z, const unsigned int *__restrict__ tgt,
                                    ACC(T) *__restrict__ out, int V, int N) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long row = blockIdx.x;
    const T *x = z + row * V;
    const A ninf = neg_inf((A)0);
    // Per-thread online max and rescaled sum (exp(-inf) = 0 rescales an empty sum), then one
    // block max and one block sum.
    A m = ninf, acc = 0;
    strided4<A>(V, [&](int k) { return to_acc(x[k]); }, [&](int, A v) {
        if (v > m) {
            acc = acc * acc_exp(m - v) + (A)1;
            m = v;
        } else if (v != ninf) {
            acc += acc_exp(v - m);  // NaN stays NaN
        }
    });
    const A mx = block_max(m, shm);
    const A sum = block_sum(acc == (A)0 ? (A)0 : acc * acc_exp(m - mx), shm);
    if (threadIdx.x == 0) {
        const A lse = acc_log(sum) + mx;
        const unsigned int t = tgt[row];
        out[row] = t < (unsigned int)V ? to_acc(x[t]) - lse : acc_nan((A)0);
        out[N + row] = lse;
    }
}

template <typename T, typename O = T>
__device__ void target_logprobs_bwd(const T *__restrict__ z, const ACC(T) *__restrict__ lse_g,
                                    const unsigned int *__restrict__ tgt, O *__restrict__ dz, int V, int N,
                                    long long first) {
    typedef ACC(T) A;
    const long long row = blockIdx.x, off = row * V;
    const A lse = lse_g[row], g = lse_g[N + row];
    const long long t = (long long)tgt[row] - first;  // the target's column here, if in [0, V)
    strided4<A>(V, [&](int k) { return to_acc(z[off + k]); }, [&](int k, A v) {
        const A hot = k == t ? g : (A)0;
        dz[off + k] = from_acc<O>(hot - acc_exp(v - lse) * g);
    });
}

// ---------------------------------------------------------------------------------------------
// Rows of a table by index: out[j, c] = table[ids[j], c] (NaN for an id outside [0, V)); one
// thread per element of out [N, H].
template <typename T>
__device__ void gather_rows(const T *__restrict__ table, const unsigned int *__restrict__ ids, T *__restrict__ out,
                            long long n, int H, int V) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        const unsigned int id = ids[k / H];
        out[k] = id < (unsigned int)V ? table[(long long)id * H + k % H] : from_acc<T>(acc_nan((ACC(T))0));
    }
}

// Its backward into out [V, H] (zeroed beforehand; with `accumulate`, added to what out holds,
// out[v] + sum, and rows no id names left untouched): row v = sum of dy[j] over the positions j
// with ids[j] = v, in position order. One block per position j and slice of up to blockDim.x
// columns (blockIdx.y); the block of an id's first position writes its row, the others leave.
// Its first warp lists the id's positions in order (a ballot over 32 positions at a time) into
// shared memory, SCATTER_LIST at a time, and every thread sums its column over the list. (The
// first version had every thread walk all later positions itself: O(N^2) per column, 9 ms for
// the 6,144 tokens of the GPU benchmark's embedding.) Positions whose id is `skip` (>= 0) send
// nothing.
#define SCATTER_LIST 256
template <typename T>
__device__ void scatter_rows(const T *__restrict__ dy, const unsigned int *__restrict__ ids, T *__restrict__ out,
                             int N, int H, int V, long long skip, int accumulate) {
    typedef ACC(T) A;
    __shared__ int list[SCATTER_LIST];
    __shared__ int count, next;
    const int j = blockIdx.x;
    const unsigned int id = ids[j];
    if ((long long)id == skip || id >= (unsigned int)V) return;  // the same for the whole block
    int seen = 0;
    for (int i = threadIdx.x; i < j; i += blockDim.x) seen |= ids[i] == id;
    if (__syncthreads_or(seen)) return;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    const unsigned int lane = threadIdx.x & 31;
    int from = j;  // the next position to look at
    A acc = 0;
    while (from < N) {
        if (threadIdx.x < 32) {
            int found = 0, i0 = from;
            for (; i0 < N && found <= SCATTER_LIST - 32; i0 += 32) {
                const int i = i0 + (int)lane;
                const int hit = i < N && ids[i] == id;
                const unsigned int votes = __ballot_sync(0xffffffffu, hit);
                if (hit) list[found + __popc(votes & ((1u << lane) - 1u))] = i;
                found += __popc(votes);
            }
            if (lane == 0) {
                count = found;
                next = i0;
            }
        }
        __syncthreads();
        if (c < H)
            for (int k = 0; k < count; ++k) acc += to_acc(dy[(long long)list[k] * H + c]);
        from = next;
        __syncthreads();  // the list is refilled
    }
    if (c < H) {
        T *o = out + (long long)id * H + c;
        *o = from_acc<T>(accumulate ? to_acc(*o) + acc : acc);
    }
}

// ---------------------------------------------------------------------------------------------
#define INSTANTIATE(T, SUF)                                                                          \
    extern "C" __global__ void dpo_softmax_fwd_##SUF(const T *s, const float *bias, T *p, int K, int Q, \
                                                     int HQ, int bias_bcast, double scale) {          \
        softmax_fwd<T>(s, bias, p, K, Q, HQ, bias_bcast, scale);                                     \
    }                                                                                                \
    extern "C" __global__ void dpo_softmax_bwd_##SUF(const T *p, const T *dp, T *ds, int K,          \
                                                     double scale) {                                 \
        softmax_bwd<T>(p, dp, ds, K, scale);                                                         \
    }                                                                                                \
    extern "C" __global__ void dpo_softmax_fwd_warp_##SUF(const T *s, const float *bias, T *p, long long rows, \
                                                          int K, int Q, int HQ, int bias_bcast, double scale) { \
        softmax_fwd_warp<T>(s, bias, p, rows, K, Q, HQ, bias_bcast, scale);                          \
    }                                                                                                \
    extern "C" __global__ void dpo_softmax_bwd_warp_##SUF(const T *p, const T *dp, T *ds, long long rows, \
                                                          int K, double scale) {                     \
        softmax_bwd_warp<T>(p, dp, ds, rows, K, scale);                                              \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_fwd_##SUF(const T *x, const T *w, T *y, int D, double eps) { \
        rmsnorm_fwd<T>(x, w, y, D, eps);                                                             \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dx_##SUF(const T *x, const T *w, const T *dy, T *out,  \
                                                        AccOf<T>::type *rs, int D, double eps) {      \
        rmsnorm_bwd_dx<T>(x, w, dy, nullptr, out, (T *)nullptr, rs, D, eps);                         \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dx_add_##SUF(const T *x, const T *w, const T *dy,      \
                                                            const T *res, T *out,                    \
                                                            AccOf<T>::type *rs, int D, double eps) { \
        rmsnorm_bwd_dx<T>(x, w, dy, res, out, (T *)nullptr, rs, D, eps);                             \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dw_partial_##SUF(                                     \
        const T *x, const T *dy, const AccOf<T>::type *rs, AccOf<T>::type *partial, int N, int D) {   \
        rmsnorm_bwd_dw_partial<T>(x, dy, rs, partial, N, D);                                         \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dw_final_##SUF(const AccOf<T>::type *partial, T *out,  \
                                                              long long offset, int G, int D) {      \
        rmsnorm_bwd_dw_final<T>(partial, out, offset, G, D);                                         \
    }                                                                                                \
    extern "C" __global__ void dpo_rope_##SUF(const T *x, const T *bias, const T *cs, const T *sn, T *y, \
                                              long long n, int H, int S, int Dh, long long sr,       \
                                              long long sh, long long sp, int per_row, int bwd) {    \
        rope_kernel<T>(x, bias, cs, sn, y, n, H, S, Dh, sr, sh, sp, per_row, bwd);                   \
    }                                                                                                \
    extern "C" __global__ void dpo_rope_bwd_merged_##SUF(const T *dq, const T *dk, const T *dv, const T *cs,   \
                                                        const T *sn, T *y, long long n, int HQ, int HK,  \
                                                        int S, int Dh, int per_row) {                    \
        rope_bwd_merged_kernel<T>(dq, dk, dv, cs, sn, y, n, HQ, HK, S, Dh, per_row);                  \
    }                                                                                                \
    extern "C" __global__ void dpo_silu_mul_fwd_##SUF(const T *g, const T *u, T *y, long long n) {    \
        silu_mul_fwd<T>(g, u, y, n);                                                                 \
    }                                                                                                \
    extern "C" __global__ void dpo_silu_mul_bwd_##SUF(const T *g, const T *u, const T *dy, T *out,    \
                                                      long long n, int with_y) {                     \
        silu_mul_bwd<T>(g, u, dy, out, n, with_y);                                                   \
    }                                                                                                \
    extern "C" __global__ void dpo_target_logprobs_fwd_##SUF(const T *z, const unsigned int *t,      \
                                                             AccOf<T>::type *out, int V, int N) {    \
        target_logprobs_fwd<T>(z, t, out, V, N);                                                     \
    }                                                                                                \
    extern "C" __global__ void dpo_target_logprobs_bwd_##SUF(const T *z, const AccOf<T>::type *lse_g, \
                                                             const unsigned int *t, T *dz, int V,    \
                                                             int N, long long first) {               \
        target_logprobs_bwd<T>(z, lse_g, t, dz, V, N, first);                                        \
    }                                                                                                \
    extern "C" __global__ void dpo_gather_rows_##SUF(const T *table, const unsigned int *ids, T *out, \
                                                     long long n, int H, int V) {                    \
        gather_rows<T>(table, ids, out, n, H, V);                                                    \
    }                                                                                                \
    extern "C" __global__ void dpo_scatter_rows_##SUF(const T *dy, const unsigned int *ids, T *out,   \
                                                      int N, int H, int V, long long skip,           \
                                                      int accumulate) {                              \
        scatter_rows<T>(dy, ids, out, N, H, V, skip, accumulate);                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

// f32 residual stream, bf16/f16 matmuls: the norm that feeds a matmul, the add that leaves one;
// f32 logits, bf16/f16 matmul operands: the logits' gradient, rounded once as the next matmul takes it.
#define INSTANTIATE_MIXED(T, SUF)                                                                    \
    extern "C" __global__ void dpo_rmsnorm_fwd_f32_to_##SUF(const float *x, const float *w, T *y, int D, \
                                                          double eps) {                             \
        rmsnorm_fwd<float, T>(x, w, y, D, eps);                                                      \
    }                                                                                                \
    extern "C" __global__ void dpo_add_rmsnorm_fwd_f32_to_##SUF(const float *h, const T *add, const float *w, \
                                                              float *sum, T *y, int D, double eps) {   \
        rmsnorm_fwd<float, T>(h, w, y, D, eps, add, sum);                                            \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dx_add_f32_from_##SUF(                                \
        const float *x, const float *w, const T *dy, const float *res, float *out, T *out_lo, float *rs, \
        int D, double eps) {                                                                         \
        rmsnorm_bwd_dx<float, T>(x, w, dy, res, out, out_lo, rs, D, eps);                            \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dw_partial_f32_from_##SUF(                            \
        const float *x, const T *dy, const float *rs, float *partial, int N, int D) {                \
        rmsnorm_bwd_dw_partial<float, T>(x, dy, rs, partial, N, D);                                  \
    }                                                                                                \
    extern "C" __global__ void dpo_add_cast_##SUF(const float *h, const T *y, float *out, long long n) { \
        add_cast<T>(h, y, out, n);                                                                   \
    }                                                                                                \
    extern "C" __global__ void dpo_cast_parts_f32_to_##SUF(T *out, PART_PARAMS(const float *, s),   \
                                                           PART_PARAMS(long long, o),               \
                                                           PART_PARAMS(long long, n)) {             \
        cast_parts<T>(out, PART(s), PART(o), PART(n));                                               \
    }                                                                                                \
    extern "C" __global__ void dpo_target_logprobs_bwd_f32_to_##SUF(const float *z, const float *lse_g, \
                                                                    const unsigned int *t, T *dz, int V, \
                                                                    int N, long long first) {        \
        target_logprobs_bwd<float, T>(z, lse_g, t, dz, V, N, first);                                 \
    }

INSTANTIATE_MIXED(__nv_bfloat16, bf16)
INSTANTIATE_MIXED(__half, f16)

// ---------------------------------------------------------------------------------------------
// The optimizer step, in few launches and with no wait for the host: the clipping factor is
// computed on the device (dpo_clip_f64) and AdamW reads it there.
//
// Each launch takes up to PARTS tensors, one per blockIdx.y (the launcher groups tensors of
// similar size; blocks past a part's end exit).

// Sum of squares of this block's part x (f32), one partial sum (f64) per block into
// out[blockIdx.y * gridDim.x + blockIdx.x]: dpo_clip_f64 adds them in a fixed order, so the
// norm is the same, bit for bit, on every run (atomic adds land in any order). 8 elements a
// thread at a time (16-byte vectors where x is aligned).
extern "C" __global__ void dpo_sumsq_parts_f32(double *__restrict__ out, PART_PARAMS(const float *, x),
                                               PART_PARAMS(long long, n)) {
    __shared__ double part[32];
    const float *__restrict__ xp = PART(x);
    double acc = 0.0;
    elementwise(PART(n), aligned16(xp), [&](long long i, auto width) {
        constexpr int W = decltype(width)::w;
        float e[W];
        load_w<W>(e, xp + i);
#pragma unroll
        for (int j = 0; j < W; ++j) acc += (double)e[j] * (double)e[j];
    });
    acc = block_sum(acc, part);
    if (threadIdx.x == 0) out[(long long)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

// The global norm and PyTorch's clipping factor from the n partial sums of dpo_sumsq_parts_f32,
// one block: out = [norm, factor], norm = sqrt(sum), factor = min(1, max_norm / (norm + 1e-6))
// (1 when max_norm <= 0), and NaN when the norm is not finite, which makes dpo_adamw_parts_f32
// leave every tensor as it was. Thread t adds partials t, t + blockDim.x, ... in order, then the
// block's fixed reduction tree.
extern "C" __global__ void dpo_clip_f64(const double *__restrict__ partial, long long n, double max_norm,
                                        double *__restrict__ out) {
    __shared__ double part[32];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    const double norm = sqrt(block_sum(acc, part));
    if (threadIdx.x == 0) {
        const double factor = max_norm > 0.0 ? fmin(1.0, max_norm / (norm + 1e-6)) : 1.0;
        out[0] = norm;
        out[1] = isfinite(norm) ? factor : nan("");
    }
}

// AdamW, in place, f32 (PyTorch's formula, decoupled decay), the gradient scaled by the clipping
// factor clip[1] (dpo_clip_f64's, rounded to f32) as it is read; nothing is written when the
// factor is NaN. Per part, `decay` is 1 - lr * weight_decay (1 where the parameter does not
// decay):
//   g *= factor;  p *= decay;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
extern "C" __global__ void dpo_adamw_parts_f32(const double *__restrict__ clip, float b1, float one_minus_b1,
                                               float b2, float one_minus_b2, float eps, float step_size,
                                               float bc2_sqrt, PART_PARAMS(float *, p), PART_PARAMS(float *, m),
                                               PART_PARAMS(float *, v), PART_PARAMS(const float *, g),
                                               PART_PARAMS(long long, n), PART_PARAMS(float, decay)) {
    const double factor = clip[1];
    if (factor != factor) return;
    const float gscale = (float)factor;
    float *__restrict__ pp = PART(p);
    float *__restrict__ mp = PART(m);
    float *__restrict__ vp = PART(v);
    const float *__restrict__ gp = PART(g);
    const float dec = PART(decay);
    const bool vec = aligned16(pp) && aligned16(mp) && aligned16(vp) && aligned16(gp);
    elementwise(PART(n), vec, [&](long long i, auto width) {
        constexpr int W = decltype(width)::w;
        float pw[W], mw[W], vw[W], gw[W];
        load_w<W>(pw, pp + i);
        load_w<W>(mw, mp + i);
        load_w<W>(vw, vp + i);
        load_w<W>(gw, gp + i);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            const float gi = gw[j] * gscale;
            mw[j] = b1 * mw[j] + one_minus_b1 * gi;
            vw[j] = b2 * vw[j] + one_minus_b2 * (gi * gi);
            const float denom = sqrtf(vw[j]) / bc2_sqrt + eps;
            pw[j] = pw[j] * dec - (mw[j] / denom) * step_size;
        }
        store_w<W>(pp + i, pw);
        store_w<W>(mp + i, mw);
        store_w<W>(vp + i, vw);
    });
}

// ---------------------------------------------------------------------------------------------
// Attention forward on tensor cores, FlashAttention-2's way (bf16 in, f32 accumulate):
//   O = softmax(Q K^T * scale + bias) V
// for q [R, H, S, D], k and v [R, KV, S, D] (query head h reads KV head h / (H / KV)), an
// additive f32 bias [R or 1, 1, S, S] (0 where a query sees a key, about -1e30 where not), out
// [R, H, S, D], all contiguous. One block of 4 warps per tile of 64 queries (blockIdx.x) of a
// row's head (blockIdx.y = row * H + head); a warp owns 16 queries and walks the keys in tiles
// of 64, with a running max and sum per query: no [S, S] tensor exists. The bias is classified
// once per mask (the launcher keeps the last mask's classes: once a step, not once per call), a
// 64 x 64 tile at a time (dpo_flash_tiles): a tile it masks whole is skipped
// (about half of a causal mask, 57% of the prefix-sharing layout's), one it masks nowhere is
// not read, only the mixed ones (the diagonal's) are. A query masked from every key (the slow
// path averages the keys of its least negative bias then) makes its tile of queries compute
// every key tile, which gives that average. P is rounded to bf16 before P V, as the matmul of
// the unfused path rounds it.
//
// mma.sync m16n8k16 (D = A B + C, A 16 x 16 row-major, B 16 x 8 column-major, bf16; C, D f32)
// fragments, for lane = 4 g + t: A: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
// a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]; B: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
// C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]. Each register holds two bf16, the
// lower index in the low half.
#define FA_BQ 64
#define FA_BK 64
#define FA_ALLOWED BIAS_MASKS  // a bias above this lets the query see the key
#define FA_SKIP 0            // tile classes: the bias masks every entry of the tile,
#define FA_OPEN 1            // no entry,
#define FA_MIXED 2           // some entries

__device__ __forceinline__ void mma_bf16_16816(float c[4], const unsigned a[4], const unsigned b[2]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the launcher runs this kernel on compute capability 8.0 and newer only
#endif
#else
    emu_mma_bf16_16816(c, a, b);
#endif
}

// scale * s rounded to f32 on its own, never fused into the FMA of a following `- m`: the
// backward must recompute exactly the scores whose maximum m the forward kept. For a query
// masked from every key (scores near -1e30) an FMA keeps the product's rounding error, about
// 1e22 there, and exp() of it is 0 or inf where the forward had exp(0) = 1 (unless the scale is
// a power of two, as at head size 64).
__device__ __forceinline__ float scaled(float s, float scale) { return __fmul_rn(s, scale); }

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

__device__ __forceinline__ unsigned ld_pair(const __nv_bfloat16 *p) { return *(const unsigned *)p; }

// A fragment of rows row0 + g, row0 + g + 8 and columns col0 + 2t (+ 8) of x [rows, ld]
// (row-major); rows at or past `end` are zero.
__device__ __forceinline__ void frag_a(unsigned a[4], const __nv_bfloat16 *x, int ld, int row0, int col0, int end,
                                       int g, int t) {
    const int r0 = row0 + g, r1 = row0 + g + 8, c = col0 + 2 * t;
    a[0] = r0 < end ? ld_pair(x + (long long)r0 * ld + c) : 0u;
    a[1] = r1 < end ? ld_pair(x + (long long)r1 * ld + c) : 0u;
    a[2] = r0 < end ? ld_pair(x + (long long)r0 * ld + c + 8) : 0u;
    a[3] = r1 < end ? ld_pair(x + (long long)r1 * ld + c + 8) : 0u;
}

// ldmatrix.sync.aligned.m8n8.x4 of a warp from shared memory: lane 8 j + i gives `row`, the
// address of row i of the 8 x 8 bf16 matrix M_j (16 bytes, 16-byte aligned), and lane 4 g + t
// receives r[j] = M_j[g][2t, 2t+1], or with TRANS r[j] = M_j[2t][g], M_j[2t+1][g] (the lower
// index in the low half): the B fragments of two mma n-tiles in one instruction, where reading
// them element by element takes 4 (Q K^T's pairs) or 8 (P V's single bf16s) shared loads.
template <bool TRANS> __device__ __forceinline__ void ldsm_x4(unsigned r[4], const __nv_bfloat16 *row) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#else
    __trap();  // as mma_bf16_16816
#endif
#else
    emu_ldsm_x4(r, row, TRANS);
#endif
}

// The A fragment of k-step kk (16 columns) of a 16 x 64 block held as 8 accumulator tiles
// (FlashAttention-2's reuse of P's registers: no shuffle).
__device__ __forceinline__ void frag_a_from_c(unsigned a[4], const float c[][4], int kk) {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// 16 bytes from global to shared memory without a register in between (cp.async, 8.0 and
// newer): the copy is only issued; cp_async_wait_all() waits for the thread's copies, and the
// block barrier after it makes every thread's visible.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem));
#else
    *(uint4 *)smem = *(const uint4 *)gmem;
#endif
#else
    emu_cp_async16(smem, gmem);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
#else
    emu_cp_async_wait_all();
#endif
}

// Rows first .. first + 64 of x [S, D] (rows `ld` elements apart) into the shared tile dst
// [64, D + 8], zero past S; issued only (cp_async16): every load of a tile is in flight at once,
// where a load and its store to shared memory a thread at a time waited for each load in turn.
// The caller waits (cp_async_wait_all, then __syncthreads) before reading the tile.
template <int D>
__device__ __forceinline__ void load_tile(__nv_bfloat16 *dst, const __nv_bfloat16 *x, int first, int S,
                                          long long ld = D) {
    for (int e = threadIdx.x; e < 64 * D / 8; e += blockDim.x) {
        const int row = e / (D / 8), col = (e % (D / 8)) * 8;
        __nv_bfloat16 *to = dst + row * (D + 8) + col;
        if (first + row < S)
            cp_async16(to, x + (first + row) * ld + col);
        else
            *(uint4 *)to = make_uint4(0u, 0u, 0u, 0u);
    }
}

// The classes of the bias [bias_rows, 1, S, S] by 64 x 64 tiles, for the kernels below: cls
// [bias_rows, T, T] (T = ceil(S / 64); query tile, key tile) FA_SKIP, FA_OPEN or FA_MIXED over
// the tile's entries inside [0, S), and full [bias_rows, T]: whether some query of the query
// tile is masked from every key (its tiles are then all computed, FA_SKIP ones too). A block
// of 256 threads per query tile (blockIdx.x) and bias row (blockIdx.y); thread 4 i + j reads
// query i's columns j, j + 4, ... of each key tile.
__device__ void flash_tiles(const float *__restrict__ bias, unsigned char *__restrict__ cls,
                            unsigned char *__restrict__ full, int S) {
    const int T = (S + FA_BK - 1) / FA_BK, qt = blockIdx.x, br = blockIdx.y;
    const int query = qt * FA_BQ + (int)threadIdx.x / 4, j = threadIdx.x % 4;
    const float *row = bias + ((long long)br * S + query) * S;
    int sees = 0;
    for (int kt = 0; kt < T; ++kt) {
        int ok = 0, masked = 0;
        const int end = kt * FA_BK + FA_BK < S ? kt * FA_BK + FA_BK : S;
        if (query < S)
            for (int c = kt * FA_BK + j; c < end; c += 4) {
                const int a = row[c] > FA_ALLOWED;
                ok |= a;
                masked |= !a;
            }
        sees |= ok;
        const int any_ok = __syncthreads_or(ok), any_masked = __syncthreads_or(masked);
        if (threadIdx.x == 0)
            cls[((long long)br * T + qt) * T + kt] = any_ok ? (any_masked ? FA_MIXED : FA_OPEN) : FA_SKIP;
    }
    sees |= __shfl_xor_sync(0xffffffffu, sees, 1);
    sees |= __shfl_xor_sync(0xffffffffu, sees, 2);
    const int blind = __syncthreads_or(query < S && !sees);
    if (threadIdx.x == 0) full[(long long)br * T + qt] = blind;
}

// A warp's 16 x 64 block of scores (accumulator layout: rows rows[0], rows[1], columns
// c0 + 8 nt + 2t (+1)), started as bias / scale so that scale * (A B + bias / scale) is the
// biased score (0 for an FA_OPEN tile: `brow` null, not read); -inf outside [0, S).
// `keys_are_rows`: the block is S^T (rows are keys, columns queries).
template <int NT>
__device__ __forceinline__ void init_tile(float s[][4], const float *__restrict__ brow, const int rows[2], int c0,
                                          int S, float inv_scale, bool keys_are_rows) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = rows[i >> 1], col = c0 + nt * 8 + 2 * t + (i & 1);
            float b = -INFINITY;
            if (row < S && col < S)
                b = !brow ? 0.0f
                          : (keys_are_rows ? brow[(long long)col * S + row] : brow[(long long)row * S + col]) * inv_scale;
            s[nt][i] = b;
        }
}

// Row r's tile classes, at(query tile, key tile), and its query tiles' `full` flags (one table
// for every row where the bias is broadcast).
struct Tiles {
    const unsigned char *cls, *full;
    int T;
    __device__ Tiles(const unsigned char *c, const unsigned char *f, int S, int r, int bias_rows)
        : T((S + FA_BK - 1) / FA_BK) {
        const long long br = bias_rows == 1 ? 0 : r;
        cls = c + br * T * T;
        full = f + br * T;
    }
    __device__ int at(int qt, int kt) const { return cls[qt * T + kt]; }
    // Whether query tile qt computes with key tile kt (every key tile, where a query of qt is
    // masked from every key).
    __device__ bool computes(int qt, int kt) const { return at(qt, kt) != FA_SKIP || full[qt]; }
    // The first key tile at or after k0 that query tile qt computes with (S: none left).
    __device__ int next_key(int qt, int k0, int S) const {
        while (k0 < S && !computes(qt, k0 / FA_BK)) k0 += FA_BK;
        return k0;
    }
};

// s += A B^T for a warp's 16 rows (A fragments `af`, KS k-steps) and the 64 rows of the shared
// tile `x` [64, LD] (S = Q K^T with x = K; dP = dO V^T with x = V): B[k][n] = x[n][k], two
// n-tiles a load (matrices: rows n0 and n0 + 8, columns k0 and k0 + 8).
template <int NT, int KS>
__device__ __forceinline__ void mma_rows(float s[][4], const unsigned af[][4], const __nv_bfloat16 *x, int ld) {
    const int lane = threadIdx.x & 31, j = lane >> 3, i = lane & 7;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            unsigned b[4];
            ldsm_x4<false>(b, x + (nt * 8 + (j >> 1) * 8 + i) * ld + kk * 16 + (j & 1) * 8);
            mma_bf16_16816(s[nt], af[kk], b);
            mma_bf16_16816(s[nt + 1], af[kk], b + 2);
        }
}

// acc += P X for a warp's 16 x 64 block P in accumulator tiles `p` and the shared tile `x`
// [64, LD] (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q): B[k][n] = x[k][n], two n-tiles a
// load (matrices, transposed: rows k0 and k0 + 8, columns n0 and n0 + 8).
template <int DT>
__device__ __forceinline__ void mma_acc(float acc[][4], const float p[][4], const __nv_bfloat16 *x, int ld) {
    const int lane = threadIdx.x & 31, j = lane >> 3, i = lane & 7;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        unsigned a[4];
        frag_a_from_c(a, p, kk);
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
            unsigned b[4];
            ldsm_x4<true>(b, x + (kk * 16 + (j & 1) * 8 + i) * ld + dt * 8 + (j >> 1) * 8);
            mma_bf16_16816(acc[dt], a, b);
            mma_bf16_16816(acc[dt + 1], a, b + 2);
        }
    }
}

// The output O [R, H, S, D] is written with query s of head h of row r at r o_row + h o_head +
// s o_pos ([R, H, S, D] contiguous, or heads merged: [R, S, H D], what the output projection
// reads, without a copy). Each query's softmax statistics, for the backward: stats [R, H, S, 2]
// = (max of the scaled, biased scores, 1 / sum of their exponentials). With OUT false only
// those (dpo_flash_stats: the backward of an output that was kept): no V, no P V, `out` not
// written; the statistics come out the same, bit for bit.
template <int D, bool OUT>
__device__ void flash_fwd(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                          const __nv_bfloat16 *__restrict__ v, const float *__restrict__ bias,
                          const unsigned char *__restrict__ cls, const unsigned char *__restrict__ full,
                          __nv_bfloat16 *__restrict__ out, float *__restrict__ stats, long long o_row,
                          long long o_head, long long o_pos, int S, int H, int KV, int bias_rows, float scale) {
    constexpr int KS = D / 16;     // k-steps of Q K^T
    constexpr int DT = D / 8;      // n-tiles of P V
    constexpr int NT = FA_BK / 8;  // n-tiles of Q K^T (keys)
    constexpr int LD = D + 8;      // padded rows of the shared tiles: fragment loads without bank conflicts
    __shared__ __align__(16) __nv_bfloat16 ks[FA_BK * LD];
    __shared__ __align__(16) __nv_bfloat16 vs[FA_BK * LD];
    const int r = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * FA_BQ + warp * 16;  // this warp's first query
    const long long qbase = ((long long)r * H + h) * S * D, kvbase = ((long long)r * KV + kvh) * S * D;
    const float *brow = bias + (long long)(bias_rows == 1 ? 0 : r) * S * S;
    const int rows[2] = {q0 + g, q0 + g + 8};
    // Q fragments, kept for the whole walk (zero for queries past the end).
    unsigned qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) frag_a(qf[kk], q + qbase, D, q0, kk * 16, S, g, t);
    const float inv_scale = 1.0f / scale;
    const Tiles tiles(cls, full, S, r, bias_rows);
    float o[DT][4], m[2], l[2];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[dt][i] = 0.0f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.0f;
    // FlashAttention-2's pipeline: V's tile loads during Q K^T and the softmax, the next K tile
    // during P V (without V, during the softmax). Each wait finds one tile's copies in flight.
    int k0 = tiles.next_key(blockIdx.x, 0, S);  // the same for the whole block
    if (k0 < S) load_tile<D>(ks, k + kvbase, k0, S);
    while (k0 < S) {
        const int kind = tiles.at(blockIdx.x, k0 / FA_BK);
        cp_async_wait_all();  // K's tile
        __syncthreads();      // ... every thread's, and V's is free (the last P V is done)
        if (OUT) load_tile<D>(vs, v + kvbase, k0, S);
        float s[NT][4];  // the bias read while V's tile loads
        init_tile<NT>(s, kind == FA_OPEN ? nullptr : brow, rows, k0, S, inv_scale, false);
        mma_rows<NT, KS>(s, qf, ks, LD);  // S += Q K^T: this warp's 16 queries, the tile's 64 keys
        if (!OUT) {
            __syncthreads();  // K's tile is free
            if (const int next = tiles.next_key(blockIdx.x, k0 + FA_BK, S); next < S)
                load_tile<D>(ks, k + kvbase, next, S);
        }
        // Online softmax: the rows' new maxima (over the 4 lanes of a row), rescale.
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][2 * hr] = scaled(s[nt][2 * hr], scale);
                s[nt][2 * hr + 1] = scaled(s[nt][2 * hr + 1], scale);
                mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(m[hr], mx);
            const float corr = m[hr] == -INFINITY ? 0.0f : expf(m[hr] - mnew);
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 2 * hr; i < 2 * hr + 2; ++i) {
                    const float p = s[nt][i] == -INFINITY ? 0.0f : expf(s[nt][i] - mnew);
                    s[nt][i] = p;
                    sum += p;
                }
            l[hr] = l[hr] * corr + sum;
            m[hr] = mnew;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][2 * hr] *= corr;
                o[dt][2 * hr + 1] *= corr;
            }
        }
        if (OUT) {
            cp_async_wait_all();  // V's tile
            __syncthreads();      // ... every thread's, and K's is free (Q K^T is done)
            if (const int next = tiles.next_key(blockIdx.x, k0 + FA_BK, S); next < S)
                load_tile<D>(ks, k + kvbase, next, S);
            mma_acc<DT>(o, s, vs, LD);  // O += P V, P (bf16) straight from the score fragments
        }
        // The next tile, found again: kept live across P V, the kernel spilled at 128 registers.
        k0 = tiles.next_key(blockIdx.x, k0 + FA_BK, S);
    }
    // Normalize and write.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float sum = l[hr];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        if (rows[hr] < S) {
            __nv_bfloat16 *orow = out + r * o_row + h * o_head + rows[hr] * o_pos;
#pragma unroll
            for (int dt = 0; dt < DT && OUT; ++dt)
                *(unsigned *)(orow + dt * 8 + 2 * t) = pack_bf16(o[dt][2 * hr] * inv, o[dt][2 * hr + 1] * inv);
            if (t == 0) {
                float *st = stats + 2 * (((long long)r * H + h) * S + rows[hr]);
                st[0] = m[hr];
                st[1] = inv;
            }
        }
    }
}

// The backward, FlashAttention-2's way, deterministic (no atomics): with the forward's output O
// (kept by the caller, or computed again) and statistics (computed again: dpo_flash_stats),
// dvec = rowsum(dO * O) (dpo_flash_bwd_dot), then
//   P = exp(scale * S + bias - m) / l,  dP = dO V^T,  dS = scale * P * (dP - dvec)
//   dV = P^T dO,  dK = dS^T Q  (dpo_flash_bwd_dkdv: a block per tile of 64 keys and query
//                               head, over the query tiles, into f32 partials per query head;
//                               dpo_flash_bwd_group sums a KV head's group of them in order)
//   dQ = dS K                  (dpo_flash_bwd_dq: a block per tile of 64 queries, over the keys)
// Tiles are skipped and read as in the forward.
__device__ void flash_bwd_dot(const __nv_bfloat16 *__restrict__ o, const __nv_bfloat16 *__restrict__ dout,
                              float *__restrict__ out, long long n, int D, int H, int S, long long o_row,
                              long long o_head, long long o_pos, long long d_row, long long d_head,
                              long long d_pos) {
    // Row i = (r, h, s): o's at r o_row + h o_head + s o_pos (the forward's output as kept: [R,
    // H, S, D], or heads merged, [R, S, H D]), dout's likewise by d_*. D / 8 lanes a row (D = 32
    // or 64), 16 bytes of each operand a lane, summed by shuffles.
    const int per_row = D / 8, lane = threadIdx.x & 31, part = lane % per_row;
    const long long rows_per_warp = 32 / per_row, warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32 * rows_per_warp; i0 < n;
         i0 += warps * rows_per_warp) {
        const long long i = i0 + lane / per_row;
        float acc = 0.0f;
        if (i < n) {
            const long long r = i / ((long long)H * S), h = i / S % H, p = i % S;
            const long long at = r * o_row + h * o_head + p * o_pos, dat = r * d_row + h * d_head + p * d_pos;
            const uint4 a4 = *(const uint4 *)(o + at + part * 8), b4 = *(const uint4 *)(dout + dat + part * 8);
            const unsigned a[4] = {a4.x, a4.y, a4.z, a4.w}, b[4] = {b4.x, b4.y, b4.z, b4.w};
            // Two bf16 a word, the lower index in the low half; a bf16 is the top half of its f32.
#pragma unroll
            for (int c = 0; c < 4; ++c)
                acc += __int_as_float((int)(a[c] << 16)) * __int_as_float((int)(b[c] << 16)) +
                       __int_as_float((int)(a[c] & 0xffff0000u)) * __int_as_float((int)(b[c] & 0xffff0000u));
        }
        for (int off = per_row / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (i < n && part == 0) out[i] = acc;
    }
}

template <int D>
__device__ void flash_bwd_dkdv(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                               const __nv_bfloat16 *__restrict__ v, const float *__restrict__ bias,
                               const unsigned char *__restrict__ cls, const unsigned char *__restrict__ full,
                               const __nv_bfloat16 *__restrict__ dout, const float *__restrict__ stats,
                               const float *__restrict__ dvec, float *__restrict__ dkp, float *__restrict__ dvp,
                               long long d_row, long long d_head, long long d_pos, int S, int H, int KV,
                               int bias_rows, float scale) {
    constexpr int KS = D / 16, DT = D / 8, NT = FA_BQ / 8, LD = D + 8;
    __shared__ __align__(16) __nv_bfloat16 qs[FA_BQ * LD];
    __shared__ __align__(16) __nv_bfloat16 dos[FA_BQ * LD];
    // The query tile's statistics as the forward kept them, (max, 1 / sum) a query, and dvec:
    // a lane reads its two queries' of each in one 16-byte and one 8-byte load.
    __shared__ __align__(16) float st[2 * FA_BQ];
    __shared__ __align__(16) float dd[FA_BQ];
    const int r = blockIdx.y / H, hq = blockIdx.y % H, kvh = hq / (H / KV);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * FA_BK + warp * 16;  // this warp's first key
    const long long kvbase = ((long long)r * KV + kvh) * S * D;
    const float *brow = bias + (long long)(bias_rows == 1 ? 0 : r) * S * S;
    const int keys[2] = {k0 + g, k0 + g + 8};
    unsigned kf[KS][4], vf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        frag_a(kf[kk], k + kvbase, D, k0, kk * 16, S, g, t);
        frag_a(vf[kk], v + kvbase, D, k0, kk * 16, S, g, t);
    }
    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dka[dt][i] = dva[dt][i] = 0.0f;
    const float inv_scale = 1.0f / scale;
    const long long qbase = ((long long)r * H + hq) * S * D, sbase = ((long long)r * H + hq) * S;
    const Tiles tiles(cls, full, S, r, bias_rows);
    for (int i0 = 0; i0 < S; i0 += FA_BQ) {
        const int kind = tiles.at(i0 / FA_BQ, blockIdx.x);
        if (!tiles.computes(i0 / FA_BQ, blockIdx.x)) continue;
        load_tile<D>(qs, q + qbase, i0, S);
        load_tile<D>(dos, dout + r * d_row + hq * d_head, i0, S, d_pos);
        float s[NT][4];  // S^T: keys x queries; the bias read while the tiles load
        init_tile<NT>(s, kind == FA_OPEN ? nullptr : brow, keys, i0, S, inv_scale, true);
        if (threadIdx.x < FA_BQ) {
            const int qi = i0 + threadIdx.x;
            st[2 * threadIdx.x] = qi < S ? stats[2 * (sbase + qi)] : 0.0f;
            st[2 * threadIdx.x + 1] = qi < S ? stats[2 * (sbase + qi) + 1] : 0.0f;
            dd[threadIdx.x] = qi < S ? dvec[sbase + qi] : 0.0f;
        }
        cp_async_wait_all();
        __syncthreads();
        mma_rows<NT, KS>(s, kf, qs, LD);  // S^T += K Q^T, then P^T
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float4 mi = *(const float4 *)&st[2 * (nt * 8 + 2 * t)];  // queries c, c + 1
            const float m[2] = {mi.x, mi.z}, il[2] = {mi.y, mi.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
                s[nt][i] = s[nt][i] == -INFINITY ? 0.0f : expf(scaled(s[nt][i], scale) - m[i & 1]) * il[i & 1];
        }
        mma_acc<DT>(dva, s, dos, LD);  // dV += P^T dO
        // dP^T = V dO^T, then dS^T = scale * P^T * (dP^T - dvec).
        float dp[NT][4] = {};
        mma_rows<NT, KS>(dp, vf, dos, LD);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float2 d = *(const float2 *)&dd[nt * 8 + 2 * t];
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nt][i] = scale * s[nt][i] * (dp[nt][i] - ((i & 1) ? d.y : d.x));
        }
        mma_acc<DT>(dka, s, qs, LD);  // dK += dS^T Q
        __syncthreads();  // the tiles are refilled
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
        if (keys[hr] < S) {
            const long long at = (((long long)r * H + hq) * S + keys[hr]) * D + 2 * t;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                dkp[at + dt * 8] = dka[dt][2 * hr];
                dkp[at + dt * 8 + 1] = dka[dt][2 * hr + 1];
                dvp[at + dt * 8] = dva[dt][2 * hr];
                dvp[at + dt * 8 + 1] = dva[dt][2 * hr + 1];
            }
        }
}

// dk, dv [R, KV, S, D] (bf16) = the sums over each KV head's group of `rep` query heads of the
// partials [R, KV * rep, S, D] (f32), in head order; sd = S * D, n = R * KV * sd.
__device__ void flash_bwd_group(const float *__restrict__ dkp, const float *__restrict__ dvp,
                                __nv_bfloat16 *__restrict__ dk, __nv_bfloat16 *__restrict__ dv, long long n, long long sd,
                                int rep) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long first = (e / sd) * rep * sd + e % sd;
        float k = 0.0f, v = 0.0f;
        for (int j = 0; j < rep; ++j) {
            k += dkp[first + j * sd];
            v += dvp[first + j * sd];
        }
        dk[e] = __float2bfloat16_rn(k);
        dv[e] = __float2bfloat16_rn(v);
    }
}

template <int D>
__device__ void flash_bwd_dq(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                             const __nv_bfloat16 *__restrict__ v, const float *__restrict__ bias,
                             const unsigned char *__restrict__ cls, const unsigned char *__restrict__ full,
                             const __nv_bfloat16 *__restrict__ dout, const float *__restrict__ stats,
                             const float *__restrict__ dvec, __nv_bfloat16 *__restrict__ dq, long long d_row,
                             long long d_head, long long d_pos, int S, int H, int KV, int bias_rows, float scale) {
    constexpr int KS = D / 16, DT = D / 8, NT = FA_BK / 8, LD = D + 8;
    __shared__ __align__(16) __nv_bfloat16 ks[FA_BK * LD];
    __shared__ __align__(16) __nv_bfloat16 vs[FA_BK * LD];
    const int r = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * FA_BQ + warp * 16;
    const long long qbase = ((long long)r * H + h) * S * D, kvbase = ((long long)r * KV + kvh) * S * D;
    const long long sbase = ((long long)r * H + h) * S;
    const float *brow = bias + (long long)(bias_rows == 1 ? 0 : r) * S * S;
    const int rows[2] = {q0 + g, q0 + g + 8};
    unsigned qf[KS][4], of[KS][4];
    {
        // dO's rows first, their pointer and stride dead after (in this order ptxas fits the
        // kernel in its 168 registers without spilling; interleaved with Q's it spilled 16 bytes).
        const __nv_bfloat16 *dO = dout + r * d_row + h * d_head;
        const int ldo = (int)d_pos;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) frag_a(of[kk], dO, ldo, q0, kk * 16, S, g, t);
    }
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) frag_a(qf[kk], q + qbase, D, q0, kk * 16, S, g, t);
    float m[2], il[2], dd[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const bool in = rows[hr] < S;
        m[hr] = in ? stats[2 * (sbase + rows[hr])] : 0.0f;
        il[hr] = in ? stats[2 * (sbase + rows[hr]) + 1] : 0.0f;
        dd[hr] = in ? dvec[sbase + rows[hr]] : 0.0f;
    }
    const Tiles tiles(cls, full, S, r, bias_rows);
    float dqa[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dqa[dt][i] = 0.0f;
    const float inv_scale = 1.0f / scale;
    for (int k0 = 0; k0 < S; k0 += FA_BK) {
        const int kind = tiles.at(blockIdx.x, k0 / FA_BK);
        if (!tiles.computes(blockIdx.x, k0 / FA_BK)) continue;
        load_tile<D>(ks, k + kvbase, k0, S);
        load_tile<D>(vs, v + kvbase, k0, S);
        float s[NT][4];  // the bias read while the tiles load
        init_tile<NT>(s, kind == FA_OPEN ? nullptr : brow, rows, k0, S, inv_scale, false);
        cp_async_wait_all();
        __syncthreads();
        float dp[NT][4] = {};
        mma_rows<NT, KS>(s, qf, ks, LD);  // S += Q K^T
        mma_rows<NT, KS>(dp, of, vs, LD);  // dP = dO V^T
        // dS = scale * P * (dP - dvec).
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int hr = i >> 1;
                const float p = s[nt][i] == -INFINITY ? 0.0f : expf(scaled(s[nt][i], scale) - m[hr]) * il[hr];
                s[nt][i] = scale * p * (dp[nt][i] - dd[hr]);
            }
        mma_acc<DT>(dqa, s, ks, LD);  // dQ += dS K
        __syncthreads();  // the tiles are refilled
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
        if (rows[hr] < S) {
            __nv_bfloat16 *row = dq + qbase + (long long)rows[hr] * D + 2 * t;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) *(unsigned *)(row + dt * 8) = pack_bf16(dqa[dt][2 * hr], dqa[dt][2 * hr + 1]);
        }
}

// The forward at 4 blocks an SM: ptxas would otherwise give it 130 registers at head size 64,
// which fits 3 (it fits 128 without spilling).
#define FLASH_KERNELS(D)                                                                            \
    extern "C" __global__ void __launch_bounds__(128, 4) dpo_flash_fwd_d##D##_bf16(                  \
        const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const float *bias,   \
        const unsigned char *cls, const unsigned char *full, __nv_bfloat16 *out, float *stats,        \
        long long o_row, long long o_head, long long o_pos, int S, int H, int KV, int bias_rows,      \
        float scale) {                                                                               \
        flash_fwd<D, true>(q, k, v, bias, cls, full, out, stats, o_row, o_head, o_pos, S, H, KV,     \
                           bias_rows, scale);                                                        \
    }                                                                                                \
    extern "C" __global__ void dpo_flash_stats_d##D##_bf16(                                          \
        const __nv_bfloat16 *q, const __nv_bfloat16 *k, const float *bias, const unsigned char *cls,  \
        const unsigned char *full, float *stats, int S, int H, int KV, int bias_rows, float scale) {  \
        flash_fwd<D, false>(q, k, nullptr, bias, cls, full, nullptr, stats, 0, 0, 0, S, H, KV, bias_rows, \
                            scale);                                                                  \
    }
// The two backward kernels ask for 3 blocks of 128 threads per SM at head size 64 and 4 at 32
// (__launch_bounds__: at most 168 and 128 registers). ptxas (CUDA 13.0, sm_90) then fits them
// without spills, where it used 228 (dK/dV) and 171 (dQ) registers at 64 on its own: 2 blocks
// per SM. At 64, 4 blocks spill.
#define FLASH_BWD_BLOCKS(D) ((D) == 32 ? 4 : 3)
#define FLASH_BWD_KERNELS(D)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, FLASH_BWD_BLOCKS(D)) dpo_flash_bwd_dkdv_d##D##_bf16( \
        const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const float *bias,   \
        const unsigned char *cls, const unsigned char *full, const __nv_bfloat16 *dout,               \
        const float *stats, const float *dvec, float *dkp, float *dvp, long long d_row,               \
        long long d_head, long long d_pos, int S, int H, int KV, int bias_rows, float scale) {        \
        flash_bwd_dkdv<D>(q, k, v, bias, cls, full, dout, stats, dvec, dkp, dvp, d_row, d_head, d_pos, \
                          S, H, KV, bias_rows, scale);                                               \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(128, FLASH_BWD_BLOCKS(D)) dpo_flash_bwd_dq_d##D##_bf16( \
        const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const float *bias,   \
        const unsigned char *cls, const unsigned char *full, const __nv_bfloat16 *dout,               \
        const float *stats, const float *dvec, __nv_bfloat16 *dq, long long d_row, long long d_head,  \
        long long d_pos, int S, int H, int KV, int bias_rows, float scale) {                          \
        flash_bwd_dq<D>(q, k, v, bias, cls, full, dout, stats, dvec, dq, d_row, d_head, d_pos, S, H,  \
                        KV, bias_rows, scale);                                                       \
    }
// Head sizes 32 (the bundled default) and 64 (Qwen2.5-0.5B).
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_BWD_KERNELS(32)
FLASH_BWD_KERNELS(64)

extern "C" __global__ void dpo_flash_tiles(const float *bias, unsigned char *cls, unsigned char *full, int S) {
    flash_tiles(bias, cls, full, S);
}

extern "C" __global__ void dpo_flash_bwd_group_bf16(const float *dkp, const float *dvp, __nv_bfloat16 *dk,
                                                    __nv_bfloat16 *dv, long long n, long long sd, int rep) {
    flash_bwd_group(dkp, dvp, dk, dv, n, sd, rep);
}

extern "C" __global__ void dpo_flash_bwd_dot_bf16(const __nv_bfloat16 *o, const __nv_bfloat16 *dout, float *out,
                                                  long long n, int D, int H, int S, long long o_row,
                                                  long long o_head, long long o_pos, long long d_row,
                                                  long long d_head, long long d_pos) {
    flash_bwd_dot(o, dout, out, n, D, H, S, o_row, o_head, o_pos, d_row, d_head, d_pos);
}
