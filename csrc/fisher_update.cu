// Multi-tensor streaming Fisher update (cdgfast, SPEC section 4).
//
//   F[off_t + i] = gamma * F[off_t + i] + scale * v,   v = g_t[i]  or  g_t[i] * g_t[i]   (square != 0)
//
// One launch updates the slices of one flat Fisher buffer F from many per-parameter tensors g_t
// (gradients or squared-gradient sums), in the style of a multi-tensor apply: the tensors are
// described by a table in device memory and every block finds its (tensor, chunk) from it.
//
// Table (int64, device memory, 4*T + 1 entries for T tensors):
//   [0,    T)      address of g_t (any alignment, contiguous)
//   [T,   2T)      numel of g_t (> 0)
//   [2T,  3T)      offset of g_t's slice in F
//   [3T, 4T+1)     chunk prefix: index of the first chunk of g_t; entry 4T = total number of chunks
//
// Launch configuration:
//   block = FU_THREADS (256) threads, 1-D
//   grid  = total number of chunks (table[4T]), 1-D; a chunk is FU_CHUNK (4096) consecutive elements of one
//           tensor (the last chunk of a tensor may be shorter), so each thread handles <= 16 elements,
//           strided by blockDim.x for coalesced loads and stores
//   no shared memory; the caller's stream
//
// Kernels (extern "C", no templates in the interface, so NVRTC/CuPy/ctypes can fetch them by name):
//   fisher_update_f32_f32   F float,  g float
//   fisher_update_f32_f16   F float,  g half      (bits read as unsigned short)
//   fisher_update_f32_bf16  F float,  g bfloat16  (bits read as unsigned short)
//   fisher_update_f64_f64   F double, g double
// Arithmetic is in F's type. Only CUDA built-ins are used (no headers), so the file compiles with nvcc
// and with NVRTC alike.

#define FU_THREADS 256
#define FU_CHUNK 4096

typedef long long i64;

struct fu_half_tag {};
struct fu_bf16_tag {};

__device__ __forceinline__ float fu_half_to_float(unsigned short bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

__device__ __forceinline__ float fu_bf16_to_float(unsigned short bits) {
    return __uint_as_float(((unsigned int)bits) << 16);
}

template <typename Src>
struct FuLoader;

template <>
struct FuLoader<float> {
    __device__ static float get(const void* p, i64 i) { return static_cast<const float*>(p)[i]; }
};

template <>
struct FuLoader<double> {
    __device__ static double get(const void* p, i64 i) { return static_cast<const double*>(p)[i]; }
};

template <>
struct FuLoader<fu_half_tag> {
    __device__ static float get(const void* p, i64 i) {
        return fu_half_to_float(static_cast<const unsigned short*>(p)[i]);
    }
};

template <>
struct FuLoader<fu_bf16_tag> {
    __device__ static float get(const void* p, i64 i) {
        return fu_bf16_to_float(static_cast<const unsigned short*>(p)[i]);
    }
};

// Largest t with prefix[t] <= chunk: the tensor that owns this chunk (empty tensors are never listed).
__device__ __forceinline__ int fu_find_tensor(const i64* prefix, int num_tensors, i64 chunk) {
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (prefix[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

template <typename Dst, typename Tag>
__device__ __forceinline__ void fu_body(Dst* __restrict__ fisher, const i64* __restrict__ table, int num_tensors,
                                        double gamma, double scale, int square) {
    const i64 chunk = (i64)blockIdx.x;
    const i64* ptrs = table;
    const i64* sizes = table + num_tensors;
    const i64* offsets = table + 2 * num_tensors;
    const i64* prefix = table + 3 * num_tensors;
    const int t = fu_find_tensor(prefix, num_tensors, chunk);
    const void* src = reinterpret_cast<const void*>(ptrs[t]);
    const i64 n = sizes[t];
    const i64 begin = (chunk - prefix[t]) * FU_CHUNK;
    i64 end = begin + FU_CHUNK;
    if (end > n) end = n;
    Dst* out = fisher + offsets[t];
    const Dst g = (Dst)gamma;
    const Dst s = (Dst)scale;
    for (i64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        Dst v = (Dst)FuLoader<Tag>::get(src, i);
        if (square) v = v * v;
        out[i] = g * out[i] + s * v;
    }
}

// One extern "C" entry point per (F, g) type pair, named as in the list at the top.
#define FU_KERNEL(name, Dst, Tag)                                                                            \
    extern "C" __global__ void __launch_bounds__(FU_THREADS)                                                 \
    name(Dst* fisher, const i64* table, int num_tensors, double gamma, double scale, int square) {          \
        fu_body<Dst, Tag>(fisher, table, num_tensors, gamma, scale, square);                                 \
    }

FU_KERNEL(fisher_update_f32_f32, float, float)
FU_KERNEL(fisher_update_f32_f16, float, fu_half_tag)
FU_KERNEL(fisher_update_f32_bf16, float, fu_bf16_tag)
FU_KERNEL(fisher_update_f64_f64, double, double)
