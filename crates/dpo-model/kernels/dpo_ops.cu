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
        const A v = to_acc(x[k]) * scale + (A)b[k];
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
        const A v = to_acc(x[k]) * scale + (A)b[k];
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
    for (int k = threadIdx.x; k < K; k += blockDim.x) dot += to_acc(p[off + k]) * to_acc(dp[off + k]);
    dot = block_sum(dot, shm);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A pk = to_acc(p[off + k]);
        ds[off + k] = from_acc<T>(scale * pk * (to_acc(dp[off + k]) - dot));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = O(T(x * r) * w), r = 1 / sqrt(sum(x^2) * (1/D) + eps), rows of length D; the
// output type O is T, or bf16/f16 for f32 inputs (the norm and the cast to the matmul dtype).
template <typename T, typename O = T>
__device__ void rmsnorm_fwd(const T *__restrict__ x, const T *__restrict__ w, O *__restrict__ y, int D,
                            double eps) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long off = (long long)blockIdx.x * D;
    A ss = 0;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const A v = to_acc(x[off + j]);
        ss += v * v;
    }
    ss = block_sum(ss, shm);
    const A r = (A)1 / acc_sqrt(ss * ((A)1 / (A)D) + (A)eps);
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        y[off + j] = from_acc<O>(round_t<T>(to_acc(x[off + j]) * r) * to_acc(w[j]));
}

// The residual add with the branch cast to f32: out = h + float(y).
template <typename T>
__device__ void add_cast(const float *__restrict__ h, const T *__restrict__ y, float *__restrict__ out,
                         long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = h[i] + to_acc(y[i]);
}

// dx = r * (g - n * sum(g * n) / D), with n = x * r and g = dy * w; stores r per row in `rs`.
// Writes dx (plus res, the gradient arriving through the residual connection, where given) into
// out[0 .. N*D]. dy is of type U: T, or bf16/f16 for f32 x (a matmul's output gradient).
template <typename T, typename U = T>
__device__ void rmsnorm_bwd_dx(const T *__restrict__ x, const T *__restrict__ w, const U *__restrict__ dy,
                               const T *__restrict__ res, T *__restrict__ out, ACC(T) *__restrict__ rs, int D,
                               double eps) {
    typedef ACC(T) A;
    __shared__ A shm[32];
    const long long off = (long long)blockIdx.x * D;
    A ss = 0, gx = 0;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const A v = to_acc(x[off + j]);
        ss += v * v;
        gx += to_acc(dy[off + j]) * to_acc(w[j]) * v;
    }
    ss = block_sum(ss, shm);
    gx = block_sum(gx, shm);
    const A r = (A)1 / acc_sqrt(ss * ((A)1 / (A)D) + (A)eps);
    // sum(g * n) / D = r * sum(g * x) / D
    const A c = r * gx / (A)D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const A n = to_acc(x[off + j]) * r;
        const A g = to_acc(dy[off + j]) * to_acc(w[j]);
        const A v = r * (g - n * c);
        out[off + j] = from_acc<T>(res ? v + to_acc(res[off + j]) : v);
    }
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
// Rotate-half RoPE on x [R, H, S, Dh] with cos/sin [S, Dh] (per_row = 0) or [R, S, Dh]; x is read
// through its element strides sr, sh, sp over R, H, S (head rows contiguous), y is contiguous.
// forward:  y_j = x_j c_j + (j < h ? -x_{j+h} : x_{j-h}) s_j
// backward: dx_j = dy_j c_j + (j < h ? dy_{j+h} s_{j+h} : -dy_{j-h} s_{j-h})
template <typename T>
__device__ void rope_kernel(const T *__restrict__ x, const T *__restrict__ cs, const T *__restrict__ sn,
                            T *__restrict__ y, long long n, int H, int S, int Dh, long long sr, long long sh,
                            long long sp, int per_row, int bwd) {
    typedef ACC(T) A;
    const int h = Dh / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(i % Dh);
        const long long t = i / Dh;  // (r * H + head) * S + s
        const int s = (int)(t % S);
        const int head = (int)((t / S) % H);
        const long long r = t / ((long long)H * S);
        const long long c = (per_row ? r * S + s : (long long)s) * Dh;
        const T *xr = x + r * sr + head * sh + s * sp;  // this head row of x (strided view)
        const int pj = j < h ? j + h : j - h;
        A v;
        if (!bwd) {
            const A rot = j < h ? -to_acc(xr[pj]) : to_acc(xr[pj]);
            v = to_acc(xr[j]) * to_acc(cs[c + j]) + rot * to_acc(sn[c + j]);
        } else {
            const A ps = to_acc(xr[pj]) * to_acc(sn[c + pj]);
            v = to_acc(xr[j]) * to_acc(cs[c + j]) + (j < h ? ps : -ps);
        }
        y[i] = from_acc<T>(v);
    }
}

// RoPE's backward on dq [R, HQ, S, Dh] and dk [R, HK, S, Dh], merged with dv [R, HK, S, Dh] into
// the stacked projection's layout y [R, S, HQ + 2 HK, Dh] (one thread per element of y).
template <typename T>
__device__ void rope_bwd_merged_kernel(const T *__restrict__ dq, const T *__restrict__ dk,
                                       const T *__restrict__ dv, const T *__restrict__ cs,
                                       const T *__restrict__ sn, T *__restrict__ y, long long n, int HQ,
                                       int HK, int S, int Dh, int per_row) {
    typedef ACC(T) A;
    const int h = Dh / 2;
    const int HT = HQ + 2 * HK;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(i % Dh);
        const long long t = i / Dh;  // (r * S + s) * HT + head
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
        if (head >= HQ + HK) {
            y[i] = xr[j];
            continue;
        }
        const long long c = (per_row ? r * S + s : (long long)s) * Dh;
        const int pj = j < h ? j + h : j - h;
        const A ps = to_acc(xr[pj]) * to_acc(sn[c + pj]);
        y[i] = from_acc<T>(to_acc(xr[j]) * to_acc(cs[c + j]) + (j < h ? ps : -ps));
    }
}

// ---------------------------------------------------------------------------------------------
// SiLU gate: y = silu(g) * u; backward writes dg to out[0 .. n] and du to out[n .. 2n].
template <typename T>
__device__ void silu_mul_fwd(const T *__restrict__ g, const T *__restrict__ u, T *__restrict__ y, long long n) {
    typedef ACC(T) A;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const A gv = to_acc(g[i]);
        y[i] = from_acc<T>(gv / ((A)1 + acc_exp(-gv)) * to_acc(u[i]));
    }
}

template <typename T>
__device__ void silu_mul_bwd(const T *__restrict__ g, const T *__restrict__ u, const T *__restrict__ dy,
                             T *__restrict__ out, long long n) {
    typedef ACC(T) A;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const A gv = to_acc(g[i]), uv = to_acc(u[i]), d = to_acc(dy[i]);
        const A sig = (A)1 / ((A)1 + acc_exp(-gv));
        out[i] = from_acc<T>(d * uv * sig * ((A)1 + gv * ((A)1 - sig)));
        out[n + i] = from_acc<T>(d * gv * sig);
    }
}

// ---------------------------------------------------------------------------------------------
// Log-probs of target tokens, one block per row of logits z [N, V]:
// forward:  lse = log sum_v exp(z_v), logp = z_t - lse, into out [2, N] (logp row, lse row);
// backward: dz_v = g [v = t] - g exp(z_v - lse), with lse_g [2, N] (lse row, g row).
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
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const A v = to_acc(x[k]);
        if (v > m) {
            acc = acc * acc_exp(m - v) + (A)1;
            m = v;
        } else if (v != ninf) {
            acc += acc_exp(v - m);  // NaN stays NaN
        }
    }
    const A mx = block_max(m, shm);
    const A sum = block_sum(acc == (A)0 ? (A)0 : acc * acc_exp(m - mx), shm);
    if (threadIdx.x == 0) {
        const A lse = acc_log(sum) + mx;
        const unsigned int t = tgt[row];
        out[row] = t < (unsigned int)V ? to_acc(x[t]) - lse : acc_nan((A)0);
        out[N + row] = lse;
    }
}

template <typename T>
__device__ void target_logprobs_bwd(const T *__restrict__ z, const ACC(T) *__restrict__ lse_g,
                                    const unsigned int *__restrict__ tgt, T *__restrict__ dz, int V, int N) {
    typedef ACC(T) A;
    const long long row = blockIdx.x, off = row * V;
    const A lse = lse_g[row], g = lse_g[N + row];
    const unsigned int t = tgt[row];
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const A hot = (unsigned int)k == t ? g : (A)0;
        dz[off + k] = from_acc<T>(hot - acc_exp(to_acc(z[off + k]) - lse) * g);
    }
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

// Its backward into out [V, H] (zeroed beforehand): row v = sum of dy[j] over the positions j
// with ids[j] = v, in position order. One block per position j; the block of an id's first
// position writes its row, the others leave. Positions whose id is `skip` (>= 0) send nothing.
template <typename T>
__device__ void scatter_rows(const T *__restrict__ dy, const unsigned int *__restrict__ ids, T *__restrict__ out,
                             int N, int H, int V, long long skip) {
    typedef ACC(T) A;
    const int j = blockIdx.x;
    const unsigned int id = ids[j];
    if ((long long)id == skip || id >= (unsigned int)V) return;  // the same for the whole block
    int seen = 0;
    for (int i = threadIdx.x; i < j; i += blockDim.x) seen |= ids[i] == id;
    if (__syncthreads_or(seen)) return;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        A acc = 0;
        for (int i = j; i < N; ++i)
            if (ids[i] == id) acc += to_acc(dy[(long long)i * H + c]);
        out[(long long)id * H + c] = from_acc<T>(acc);
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
    extern "C" __global__ void dpo_rmsnorm_fwd_##SUF(const T *x, const T *w, T *y, int D, double eps) { \
        rmsnorm_fwd<T>(x, w, y, D, eps);                                                             \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dx_##SUF(const T *x, const T *w, const T *dy, T *out,  \
                                                        AccOf<T>::type *rs, int D, double eps) {      \
        rmsnorm_bwd_dx<T>(x, w, dy, nullptr, out, rs, D, eps);                                       \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dx_add_##SUF(const T *x, const T *w, const T *dy,      \
                                                            const T *res, T *out,                    \
                                                            AccOf<T>::type *rs, int D, double eps) { \
        rmsnorm_bwd_dx<T>(x, w, dy, res, out, rs, D, eps);                                           \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dw_partial_##SUF(                                     \
        const T *x, const T *dy, const AccOf<T>::type *rs, AccOf<T>::type *partial, int N, int D) {   \
        rmsnorm_bwd_dw_partial<T>(x, dy, rs, partial, N, D);                                         \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dw_final_##SUF(const AccOf<T>::type *partial, T *out,  \
                                                              long long offset, int G, int D) {      \
        rmsnorm_bwd_dw_final<T>(partial, out, offset, G, D);                                         \
    }                                                                                                \
    extern "C" __global__ void dpo_rope_##SUF(const T *x, const T *cs, const T *sn, T *y, long long n,  \
                                              int H, int S, int Dh, long long sr, long long sh,      \
                                              long long sp, int per_row, int bwd) {                  \
        rope_kernel<T>(x, cs, sn, y, n, H, S, Dh, sr, sh, sp, per_row, bwd);                         \
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
                                                      long long n) {                                 \
        silu_mul_bwd<T>(g, u, dy, out, n);                                                           \
    }                                                                                                \
    extern "C" __global__ void dpo_target_logprobs_fwd_##SUF(const T *z, const unsigned int *t,      \
                                                             AccOf<T>::type *out, int V, int N) {    \
        target_logprobs_fwd<T>(z, t, out, V, N);                                                     \
    }                                                                                                \
    extern "C" __global__ void dpo_target_logprobs_bwd_##SUF(const T *z, const AccOf<T>::type *lse_g, \
                                                             const unsigned int *t, T *dz, int V,    \
                                                             int N) {                                \
        target_logprobs_bwd<T>(z, lse_g, t, dz, V, N);                                               \
    }                                                                                                \
    extern "C" __global__ void dpo_gather_rows_##SUF(const T *table, const unsigned int *ids, T *out, \
                                                     long long n, int H, int V) {                    \
        gather_rows<T>(table, ids, out, n, H, V);                                                    \
    }                                                                                                \
    extern "C" __global__ void dpo_scatter_rows_##SUF(const T *dy, const unsigned int *ids, T *out,   \
                                                      int N, int H, int V, long long skip) {         \
        scatter_rows<T>(dy, ids, out, N, H, V, skip);                                                \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

// f32 residual stream, bf16/f16 matmuls: the norm that feeds a matmul, the add that leaves one.
#define INSTANTIATE_MIXED(T, SUF)                                                                    \
    extern "C" __global__ void dpo_rmsnorm_fwd_f32_to_##SUF(const float *x, const float *w, T *y, int D, \
                                                          double eps) {                             \
        rmsnorm_fwd<float, T>(x, w, y, D, eps);                                                      \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dx_add_f32_from_##SUF(                                \
        const float *x, const float *w, const T *dy, const float *res, float *out, float *rs, int D,   \
        double eps) {                                                                                \
        rmsnorm_bwd_dx<float, T>(x, w, dy, res, out, rs, D, eps);                                    \
    }                                                                                                \
    extern "C" __global__ void dpo_rmsnorm_bwd_dw_partial_f32_from_##SUF(                            \
        const float *x, const T *dy, const float *rs, float *partial, int N, int D) {                \
        rmsnorm_bwd_dw_partial<float, T>(x, dy, rs, partial, N, D);                                  \
    }                                                                                                \
    extern "C" __global__ void dpo_add_cast_##SUF(const float *h, const T *y, float *out, long long n) { \
        add_cast<T>(h, y, out, n);                                                                   \
    }

INSTANTIATE_MIXED(__nv_bfloat16, bf16)
INSTANTIATE_MIXED(__half, f16)

// ---------------------------------------------------------------------------------------------
// AdamW, in place, f32 (PyTorch's formula, decoupled decay), the gradient scaled by gscale (the
// gradient clipping factor) as it is read:
//   g *= gscale;  p *= decay;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
extern "C" __global__ void dpo_adamw_f32(float *__restrict__ p, float *__restrict__ m, float *__restrict__ v,
                                         const float *__restrict__ g, long long n, float gscale, float decay,
                                         float b1, float one_minus_b1, float b2, float one_minus_b2, float eps,
                                         float step_size, float bc2_sqrt) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * gscale;
        const float mi = b1 * m[i] + one_minus_b1 * gi;
        const float vi = b2 * v[i] + one_minus_b2 * (gi * gi);
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = p[i] * decay - (mi / denom) * step_size;
        m[i] = mi;
        v[i] = vi;
    }
}

// Sum of squares of x (f32), accumulated into out[0] (f64) with one atomic per block.
extern "C" __global__ void dpo_sumsq_f32(const float *__restrict__ x, long long n, double *out) {
    __shared__ double part[32];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double xi = x[i];
        acc += xi * xi;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffff, acc, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        acc = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffff, acc, o);
        if (threadIdx.x == 0) atomicAdd(out, acc);
    }
}
