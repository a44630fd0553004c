// Shared by every kernel file (the backend prepends it to each before compiling with NVRTC, so the
// kernels need no CUDA headers and compile wherever libnvrtc is found).
//
// Activations and the KV cache are f32, f16 or bf16 in memory and f32 in arithmetic. Each kernel is
// a template over the storage type, instantiated as extern "C" symbols named <op>_<dtype>. Weights
// that may come in another float dtype than the activations (norm weights, biases, embedding tables)
// are read through load_any with the dtype code of highrise_core::DType (0 f32, 1 f16, 2 bf16).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define INFINITY __int_as_float(0x7f800000)

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Storage types: T is what sits in memory; load/store convert to and from f32.
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(const T* p, u64 i) { return p[i]; }
    static __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = v; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const T* p, u64 i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = f32_to_f16(v); }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const T* p, u64 i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = f32_to_bf16(v); }
};

// Element i of a float tensor whose dtype is known only at run time.
__device__ __forceinline__ float load_any(const void* p, u64 i, u32 dtype) {
    switch (dtype) {
        case DT_F16: return f16_to_f32(((const u16*)p)[i]);
        case DT_BF16: return bf16_to_f32(((const u16*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // partial may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

// extern "C" entry points for each activation dtype: INSTANTIATE(X) expands X(suffix, Type).
#define FOR_EACH_DTYPE(X) X(f32, F32) X(f16, F16) X(bf16, BF16)
