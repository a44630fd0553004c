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

// Storage types: T is what sits in memory; value/load/store convert to and from f32.
// `rounded(v)`: v as a store and a load give it back, without the round trip.
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float value(T t) { return t; }
    static __device__ __forceinline__ float load(const T* p, u64 i) { return value(p[i]); }
    static __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = v; }
    static __device__ __forceinline__ float rounded(float v) { return v; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float value(T t) { return f16_to_f32(t); }
    static __device__ __forceinline__ float load(const T* p, u64 i) { return value(p[i]); }
    static __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = f32_to_f16(v); }
    static __device__ __forceinline__ float rounded(float v) { return f16_to_f32(f32_to_f16(v)); }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float value(T t) { return bf16_to_f32(t); }
    static __device__ __forceinline__ float load(const T* p, u64 i) { return value(p[i]); }
    static __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = f32_to_bf16(v); }
    static __device__ __forceinline__ float rounded(float v) { return bf16_to_f32(f32_to_bf16(v)); }
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

// ---- Programmatic dependent launch (sm_90+) ----
// Inside a CUDA graph the host launches the decode path's kernels (crates/highrise-cuda/src/
// kernels.rs, PROGRAMMATIC) as programmatic dependents of the kernel before them: their blocks may
// start while that kernel's last blocks still run, instead of after it has finished and its
// writes have been flushed. Such a kernel must not touch memory the kernels before it write (or
// read) until `pdl_wait` has returned, which waits for the kernel before it to complete, and so,
// since that one waited the same way, for every kernel before (kernels/emu's model faults a
// launch whose threads never wait). `pdl_trigger` lets the next kernel's blocks start: given once
// every block of this kernel has started, so they take only SMs this kernel leaves free, and wait
// there (the matrix-vector kernels prefetch their weights first). Below sm_90 both are nothing,
// as is a wait in a launch without a programmatic predecessor.
#ifdef HIGHRISE_EMU
__device__ __forceinline__ void pdl_wait() { emu::pdl_wait(); }
__device__ __forceinline__ void pdl_trigger() {}
__device__ __forceinline__ void prefetch_l2(const void*) {}
#else
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// A hint: the 128-byte line at p into L2 (memory nothing writes while the kernel runs: weights).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#endif
// The first statement of a kernel the host may launch as a programmatic dependent.
#define PDL_ENTRY()    \
    do {               \
        pdl_wait();    \
        pdl_trigger(); \
    } while (0)

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

// ---- Warpgroup matrix multiply (sm_90a: Hopper) ----
// wgmma and the fences it needs; models in kernels/emu/simt.hpp. Only built where the target has
// them (HIGHRISE_WGMMA), so the same file still compiles for sm_80.
#if defined(HIGHRISE_EMU) || (defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define HIGHRISE_WGMMA 1

// The offset of a shared-memory location within the block's shared window.
__device__ __forceinline__ u32 smem_u32(const void* p) {
#ifdef HIGHRISE_EMU
    return (u32)((const char*)p - emu::blk->dynamic_shared.data());
#else
    return (u32)__cvta_generic_to_shared(p);
#endif
}

// A matrix descriptor with the 128-byte swizzle: `addr` where the matrix starts, `lbo` and `sbo` its
// leading and stride byte offsets (PTX ISA, "Matrix Descriptor Format"), all in bytes.
__device__ __forceinline__ u64 wgmma_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3ffff) >> 4) | ((u64)((lbo & 0x3ffff) >> 4) << 16) | ((u64)((sbo & 0x3ffff) >> 4) << 32) | (1ull << 62);
}

// Before the first wgmma that reads registers (accumulators, A) written by ordinary instructions.
__device__ __forceinline__ void wgmma_fence() {
#ifndef HIGHRISE_EMU
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef HIGHRISE_EMU
    emu::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}

// Waits until at most N of the warpgroup's committed groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef HIGHRISE_EMU
    emu::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}

// Shared memory written by ordinary stores or cp.async, read next by wgmma (the async proxy): each
// writing thread fences before the barrier that orders them.
__device__ __forceinline__ void fence_proxy_async() {
#ifndef HIGHRISE_EMU
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// d (64 x N, f32, the warpgroup's accumulator fragments) = (scale_d ? d : 0) + A (64 x 16) B (16 x N):
// A and B in shared memory, both K-major (descriptors `da`, `db`).
template <int N, bool BF16>
__device__ __forceinline__ void wgmma_ss(float* d, u64 da, u64 db, int scale_d);
// As wgmma_ss with A in registers (mma.sync's A fragment per warp: warp w holds rows 16 w ..) and B
// N-major in shared memory (imm-trans-b = 1): P V with V's rows (keys) as K.
template <int N, bool BF16>
__device__ __forceinline__ void wgmma_rs_t(float* d, const u32* a, u64 db, int scale_d);

template <>
__device__ __forceinline__ void wgmma_ss<64, true>(float* d, u64 da, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, nullptr, da, db, 64, scale_d, false, true);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_rs_t<64, true>(float* d, const u32* a, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, a, 0, db, 64, scale_d, true, true);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_ss<64, false>(float* d, u64 da, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, nullptr, da, db, 64, scale_d, false, false);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_rs_t<64, false>(float* d, const u32* a, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, a, 0, db, 64, scale_d, true, false);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_ss<128, true>(float* d, u64 da, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, nullptr, da, db, 128, scale_d, false, true);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_rs_t<128, true>(float* d, const u32* a, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, a, 0, db, 128, scale_d, true, true);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_ss<128, false>(float* d, u64 da, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, nullptr, da, db, 128, scale_d, false, false);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
#endif
}
template <>
__device__ __forceinline__ void wgmma_rs_t<128, false>(float* d, const u32* a, u64 db, int scale_d) {
#ifdef HIGHRISE_EMU
    emu::wgmma(d, a, 0, db, 128, scale_d, true, false);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
#endif
}

// ---- The tensor memory accelerator (TMA) and its transaction barriers (sm_90a) ----
// A tile is copied from global to shared memory by one thread's cp.async.bulk.tensor, described by a
// tensor map (`CUtensorMap`, 128 bytes, made on the host: crates/highrise-cuda/src/tma.rs) that lives
// in global memory; its bytes are counted against an mbarrier in shared memory, whose phase
// completes once every expected arrival has arrived and every expected byte has landed. Models in
// kernels/emu/simt.hpp (the copy lands when a thread waits for the barrier's phase, as cp.async's
// do at their wait).

// The barrier at `bar` (8 bytes of shared memory) expects `count` arrivals a phase.
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
#ifdef HIGHRISE_EMU
    emu::mbar_init(bar, count);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// This thread's arrival, announcing `bytes` more to land in the phase (TMA copies completing on it;
// 0: a plain arrival, a consumer releasing a stage).
__device__ __forceinline__ void mbar_arrive_expect(u64* bar, u32 bytes) {
#ifdef HIGHRISE_EMU
    emu::mbar_arrive(bar, bytes);
#else
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#endif
}

// Waits until the barrier's phase of parity `parity` has completed (its copies landed). A phase
// that never completes (a wrong count or parity: a bug) traps after ~2^26 tries, seconds at least,
// so that a GPU run gets an error from the launch instead of a hang.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
#ifdef HIGHRISE_EMU
    emu::mbar_wait(bar, parity);
#else
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        ".reg .u32 n;\n"
        "mov.u32 n, 0;\n"
        "wait:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@p bra done;\n"
        "add.u32 n, n, 1;\n"
        "setp.lt.u32 p, n, 67108864;\n"
        "@p bra wait;\n"
        "trap;\n"
        "done:\n"
        "}\n" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
#endif
}

// This thread's cp.async copies so far (committed or not) complete on the barrier as one of its
// expected arrivals (.noinc: the count given at init includes them), so that warps that never
// issued them wait for them there: how a producer warpgroup hands cp.async tiles to consumers.
__device__ __forceinline__ void cp_async_mbar_arrive(u64* bar) {
#ifdef HIGHRISE_EMU
    emu::cp_async_mbar_arrive(bar);
#else
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar)) : "memory");
#endif
}

// Named barrier `id` (1-15; 0 is __syncthreads'), `count` threads in whole warps: bar.sync waits
// for the phase, bar.arrive counts its warp and goes on (a warpgroup telling another its turn).
__device__ __forceinline__ void named_bar_sync(u32 id, u32 count) {
#ifdef HIGHRISE_EMU
    emu::named_bar_sync(id, count);
#else
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void named_bar_arrive(u32 id, u32 count) {
#ifdef HIGHRISE_EMU
    emu::named_bar_arrive(id, count);
#else
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}

// The warpgroup's registers per thread from here on (setmaxnreg, a multiple of 8 in 24-256): a
// producer gives registers back to the block's pool, consumers take them. Only the register
// allocation changes (nothing to model on the CPU).
template <u32 N, bool INC>
__device__ __forceinline__ void setmaxnreg() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in 24-256");
#ifndef HIGHRISE_EMU
    if constexpr (INC) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
    else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
#endif
}

// A tile of a tensor of 16-bit elements, by its tensor map at `map` (global memory), into shared
// memory at `dst` (1024-byte aligned: the maps use the 128-byte swizzle), its bytes counted on `bar`:
// the box at coordinates (c0, c1, c2), c0 the innermost. Elements outside the tensor land as zeros
// and count too.
__device__ __forceinline__ void tma_load_3d(void* dst, const void* map, u64* bar, int c0, int c1, int c2) {
#ifdef HIGHRISE_EMU
    emu::tma_load(dst, map, bar, c0, c1, c2);
#else
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(
            smem_u32(dst)),
        "l"(map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
#endif
}

// Before the first copy by a tensor map the host wrote to global memory: the map as the tensor
// proxy sees it.
__device__ __forceinline__ void tma_map_acquire(const void* map) {
#ifndef HIGHRISE_EMU
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(map) : "memory");
#endif
}
#endif  // HIGHRISE_WGMMA

// The block's dynamic shared memory (its size given at launch) as an array of T.
#ifdef HIGHRISE_EMU
#define DYNAMIC_SHARED(T, name) T* name = (T*)emu::blk->dynamic_shared.data()
#else
#define DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

// extern "C" entry points for each activation dtype: INSTANTIATE(X) expands X(suffix, Type).
#define FOR_EACH_DTYPE(X) X(f32, F32) X(f16, F16) X(bf16, BF16)
