// Fused diffusion-classifier (DC) score reduction, hand-written CUDA (SPEC section 2.2).
//
// Same math and the same three stages as the Triton kernels in kernels/dc_scores.py. Only CUDA
// headers are used (no torch headers): load with CuPy RawModule (NVRTC) or compile with plain nvcc.
// Every kernel is `extern "C"` with a dtype suffix:
//   _f32 (float, accumulate in float), _f64 (double, double), _f16 (__half, float), _bf16 (__nv_bfloat16, float).
// Below, T is the storage type and ACC the accumulation type of the suffix. All tensors are
// contiguous; pred is [B, K, N], eps is [B, N] (N = product of the spatial dims).
//
// 1. dc_partial_<sfx>(const T* pred, const T* eps, ACC* partial,
//                     int B, int K, long long N, int T_chunks, long long chunk)
//      grid  = (B * K, T_chunks)          (T_chunks = ceil(N / chunk) <= 65535)
//      block = (threads, 1, 1), threads a multiple of 32, <= 1024 (256 recommended)
//      shared memory: static (32 ACC)
//      partial[(b * K + k) * T_chunks + t] = sum_{s in chunk t} (pred[b, k, s] - eps[b, s])^2
//
// 2. dc_reduce_<sfx>(const ACC* partial, const ACC* q, T* err, T* logp, T* loss, ACC* coef,
//                    int B, int K, int T_chunks, ACC inv_n, ACC inv_tau, int mode)
//      grid  = (B, 1, 1); block = (threads, 1, 1), threads a multiple of 32, <= 1024
//      dynamic shared memory = (32 + K) * sizeof(ACC) bytes
//      err_k  = inv_n * sum_t partial[b, k, t]
//      mode 0: err[b, k] = err_k                                 (q, logp, loss, coef unused: may be null)
//      mode 1: logp[b, k] = log_softmax_k(-err_k * inv_tau)       (q, err, loss, coef unused)
//      mode 2: logp as mode 1, loss[b] = -sum_k q[b, k] logp[b, k],
//              coef[b, k] = (q[b, k] - p_k * sum_k q[b, k]) * 2 * inv_tau * inv_n   (err unused)
//              (coef[b, k] * (pred - eps) is d loss[b] / d pred[b, k]; see kernel 3)
//
// 3. dc_grad_<sfx>(const T* pred, const T* eps, const ACC* coef, T* gpred, T* geps,
//                  int B, int K, long long N)
//      grid  = (ceil(N / threads), B); block = (threads, 1, 1), any threads <= 1024
//      gpred[b, k, s] = coef[b, k] * (pred[b, k, s] - eps[b, s]);  geps[b, s] = -sum_k gpred[b, k, s]
//      (the fused cross-entropy gradient with coef from mode 2, or the backward of dc_errors /
//      dc_scores with coef computed from grad_output)
//
// B <= 65535 (grid y of kernel 3). Accumulation never uses the storage type for fp16 / bf16.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) { return __longlong_as_double(0xfff0000000000000ULL); }

constexpr unsigned kFullMask = 0xffffffffu;

// Block-wide sum / max. Requires blockDim.x to be a multiple of 32; `scratch` holds 32 values.
// Every thread gets the result.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? scratch[lane] : A(0);
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

template <typename A>
__device__ A block_max(A v, A* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = acc_max(v, __shfl_down_sync(kFullMask, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? scratch[lane] : neg_inf(A(0));
        for (int o = 16; o > 0; o >>= 1) v = acc_max(v, __shfl_down_sync(kFullMask, v, o));
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

template <typename T, typename A>
__device__ void dc_partial_impl(const T* __restrict__ pred, const T* __restrict__ eps, A* __restrict__ partial,
                                int B, int K, long long N, int n_chunks, long long chunk) {
    __shared__ A scratch[32];
    const long long row = blockIdx.x;           // b * K + k
    const long long b = row / K;
    const int t = blockIdx.y;
    if (b >= B) return;
    const T* p = pred + row * N;
    const T* e = eps + b * N;
    const long long start = (long long)t * chunk;
    const long long end = min(N, start + chunk);
    A acc = A(0);
    for (long long s = start + threadIdx.x; s < end; s += blockDim.x) {
        const A d = to_acc(p[s]) - to_acc(e[s]);
        acc += d * d;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[row * n_chunks + t] = acc;
}

template <typename T, typename A>
__device__ void dc_reduce_impl(const A* __restrict__ partial, const A* __restrict__ q, T* __restrict__ err,
                               T* __restrict__ logp, T* __restrict__ loss, A* __restrict__ coef,
                               int B, int K, int n_chunks, A inv_n, A inv_tau, int mode) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* scratch = reinterpret_cast<A*>(smem_raw);
    A* z = scratch + 32;  // z[k] = -err_k / tau (or err_k in mode 0)
    const int b = blockIdx.x;
    if (b >= B) return;
    const long long base = (long long)b * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A* row = partial + (base + k) * n_chunks;
        A s = A(0);
        for (int t = 0; t < n_chunks; ++t) s += row[t];
        const A e = s * inv_n;
        if (mode == 0) {
            err[base + k] = from_acc<T>(e);
        } else {
            z[k] = -e * inv_tau;
        }
    }
    if (mode == 0) return;
    __syncthreads();
    A m = neg_inf(A(0));
    for (int k = threadIdx.x; k < K; k += blockDim.x) m = acc_max(m, z[k]);
    m = block_max(m, scratch);
    A se = A(0);
    for (int k = threadIdx.x; k < K; k += blockDim.x) se += acc_exp(z[k] - m);
    se = block_sum(se, scratch);
    const A lse = m + acc_log(se);
    A qsum = A(0), qlogp = A(0);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A lp = z[k] - lse;
        logp[base + k] = from_acc<T>(lp);
        if (mode == 2) {
            const A qk = q[base + k];
            qsum += qk;
            qlogp += qk * lp;
        }
    }
    if (mode != 2) return;
    qsum = block_sum(qsum, scratch);
    qlogp = block_sum(qlogp, scratch);
    if (threadIdx.x == 0) loss[b] = from_acc<T>(-qlogp);
    const A scale = A(2) * inv_tau * inv_n;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A p = acc_exp(z[k] - lse);
        coef[base + k] = (q[base + k] - p * qsum) * scale;
    }
}

template <typename T, typename A>
__device__ void dc_grad_impl(const T* __restrict__ pred, const T* __restrict__ eps, const A* __restrict__ coef,
                             T* __restrict__ gpred, T* __restrict__ geps, int B, int K, long long N) {
    const long long b = blockIdx.y;
    const long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || s >= N) return;
    const A e = to_acc(eps[b * N + s]);
    A ge = A(0);
    for (int k = 0; k < K; ++k) {
        const long long idx = (b * K + k) * N + s;
        const A g = coef[b * K + k] * (to_acc(pred[idx]) - e);
        gpred[idx] = from_acc<T>(g);
        ge -= g;
    }
    geps[b * N + s] = from_acc<T>(ge);
}

}  // namespace

#define CDG_DC_INSTANTIATE(SFX, T, A)                                                                    \
    extern "C" __global__ void dc_partial_##SFX(const T* pred, const T* eps, A* partial, int B, int K,   \
                                                long long N, int n_chunks, long long chunk) {            \
        dc_partial_impl<T, A>(pred, eps, partial, B, K, N, n_chunks, chunk);                             \
    }                                                                                                    \
    extern "C" __global__ void dc_reduce_##SFX(const A* partial, const A* q, T* err, T* logp, T* loss,   \
                                               A* coef, int B, int K, int n_chunks, A inv_n, A inv_tau,  \
                                               int mode) {                                               \
        dc_reduce_impl<T, A>(partial, q, err, logp, loss, coef, B, K, n_chunks, inv_n, inv_tau, mode);   \
    }                                                                                                    \
    extern "C" __global__ void dc_grad_##SFX(const T* pred, const T* eps, const A* coef, T* gpred,       \
                                             T* geps, int B, int K, long long N) {                       \
        dc_grad_impl<T, A>(pred, eps, coef, gpred, geps, B, K, N);                                       \
    }

CDG_DC_INSTANTIATE(f32, float, float)
CDG_DC_INSTANTIATE(f64, double, double)
CDG_DC_INSTANTIATE(f16, __half, float)
CDG_DC_INSTANTIATE(bf16, __nv_bfloat16, float)

#undef CDG_DC_INSTANTIATE
