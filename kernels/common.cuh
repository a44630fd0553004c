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

#ifndef HIGHRISE_EMU
#define INFINITY __int_as_float(0x7f800000)
#endif

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

#ifdef HIGHRISE_EMU  // kernels/emu/simt.hpp: the kernels as host C++, for checking them without a GPU
__device__ __forceinline__ float f16_to_f32(u16 h) { return emu::f16_to_f32(h); }
__device__ __forceinline__ u16 f32_to_f16(float f) { return emu::f32_to_f16(f); }
#else
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
#endif

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

// ---- Tensor cores and asynchronous copies (sm_80+) ----
// Each is one PTX instruction on the GPU and a model of it in kernels/emu/simt.hpp.

// 2^x by the SFU's approximation (relative error about 2^-22, flushing subnormals), one instruction
// where exp2f is a longer sequence: the softmax of the attention kernels spends its time there.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef HIGHRISE_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// Two floats rounded to one register of two f16 or bf16 (lo in the low half).
__device__ __forceinline__ u32 pack2(float lo, float hi, bool bf16) {
#ifdef HIGHRISE_EMU
    return bf16 ? (u32)emu::f32_to_bf16(lo) | ((u32)emu::f32_to_bf16(hi) << 16)
                : (u32)emu::f32_to_f16(lo) | ((u32)emu::f32_to_f16(hi) << 16);
#else
    u32 r;
    if (bf16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// c (16x8, f32) += a (16x16) b (16x8), f16 or bf16 operands, in the fragment layouts of the PTX ISA.
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1, bool bf16) {
#ifdef HIGHRISE_EMU
    emu::mma16816(c, a, b0, b1, bf16);
#else
    if (bf16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory: lanes 8i..8i+7 give the addresses of
// matrix i's rows (16 bytes each, 16-byte aligned); r[i] gets matrix i's (row lane/4, cols 2 (lane%4)
// and +1), or with `trans` its (rows 2 (lane%4) and +1, col lane/4).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* row) {
#ifdef HIGHRISE_EMU
    emu::ldmatrix_x4(r, row, TRANS);
#else
    const u32 a = (u32)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// 16 bytes from global to shared memory without passing through registers; `src_bytes` of them read
// (0 or 16), the rest zero. Lands once the thread waits for its group (cp_async_wait).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, u32 src_bytes) {
#ifdef HIGHRISE_EMU
    emu::cp_async16(dst, src, src_bytes);
#else
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef HIGHRISE_EMU
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef HIGHRISE_EMU
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// The block's dynamic shared memory (its size given at launch) as an array of T.
#ifdef HIGHRISE_EMU
#define DYNAMIC_SHARED(T, name) T* name = (T*)emu::blk->dynamic_shared.data()
#else
#define DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

// extern "C" entry points for each activation dtype: INSTANTIATE(X) expands X(suffix, Type).
#define FOR_EACH_DTYPE(X) X(f32, F32) X(f16, F16) X(bf16, BF16)
