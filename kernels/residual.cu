// The residual stream: embedding gather, RMSNorm, and the fused residual-add + RMSNorm that reads
// and writes the stream once per layer half; LayerNorm, with or without the add. One block per token row.

// out[t] = table[ids[t]] * scale  (out [T, H]; table [V, H] of dtype table_dt; a scale of 1 gathers
// the rows exactly)
template <class D>
__device__ void embedding(typename D::T* out, const void* table, u32 table_dt, const u32* ids, u32 h, float scale) {
    const u64 t = blockIdx.x;
    const u64 row = (u64)ids[t] * h;
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) D::store(out, t * h + i, load_any(table, row + i, table_dt) * scale);
}

// The norms keep a row in registers between its sum of squares and its scaling, NORM_REGS elements
// a thread (8192 at the 512 threads the host launches; 32 a thread spilled on sm_90a): every load of the row is issued before the
// first is used, one round trip to memory where a loop whose stores might alias its next loads made
// one per element (an H200 timed add_rms_norm at ~10 us on a 4096-row, latency alone). Longer rows
// take the loop. Either way the same arithmetic, bit for bit.
#define NORM_REGS 16

// The register path's weights, w's elements of this thread's part of a row, loaded before the
// kernel waits for the one before it (PDL_ENTRY: weights are never written by kernels), where they
// were loaded after the row's sum: a second round trip to memory on every norm's critical path.
__device__ __forceinline__ void norm_weights(float* wv, const void* w, u32 w_dt, u32 h) {
#pragma unroll
    for (u32 r = 0; r < NORM_REGS; r++) {
        const u32 i = threadIdx.x + r * blockDim.x;
        wv[r] = i < h ? load_any(w, i, w_dt) : 0.0f;
    }
}

// The register path's end: the row's scale from its sum of squares, and out = v * scale * w.
template <class D>
__device__ __forceinline__ void norm_out(typename D::T* out, u64 base, const float* v, float ss, const float* wv, u32 h, float eps) {
    const float inv = rsqrtf(block_sum(ss) / (float)h + eps);
#pragma unroll
    for (u32 r = 0; r < NORM_REGS; r++) {
        const u32 i = threadIdx.x + r * blockDim.x;
        if (i < h) D::store(out, base + i, v[r] * inv * wv[r]);
    }
}

// out[t] = x[t] / rms(x[t]) * w  (x, out [T, H]; w [H] of dtype w_dt). Launched as a programmatic
// dependent: waits (PDL_ENTRY) once its weights are on their way.
template <class D>
__device__ void rms_norm(typename D::T* out, const typename D::T* x, const void* w, u32 w_dt, u32 h, float eps) {
    const u64 base = (u64)blockIdx.x * h;
    float ss = 0.0f;
    if (h <= NORM_REGS * blockDim.x) {
        float wv[NORM_REGS], v[NORM_REGS];
        norm_weights(wv, w, w_dt, h);
        PDL_ENTRY();
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            v[r] = i < h ? D::load(x, base + i) : 0.0f;
            ss += v[r] * v[r];
        }
        norm_out<D>(out, base, v, ss, wv, h, eps);
        return;
    }
    PDL_ENTRY();
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = D::load(x, base + i);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)h + eps);
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) D::store(out, base + i, D::load(x, base + i) * inv * load_any(w, i, w_dt));
}

// residual[t] += delta[t] (rounded to the stream's dtype, as stored); out[t] = rms_norm(residual[t]) * w.
// Waits (PDL_ENTRY) as rms_norm does.
template <class D>
__device__ void add_rms_norm(typename D::T* out, typename D::T* residual, const typename D::T* delta, const void* w,
                             u32 w_dt, u32 h, float eps) {
    const u64 base = (u64)blockIdx.x * h;
    float ss = 0.0f;
    if (h <= NORM_REGS * blockDim.x) {
        float wv[NORM_REGS], v[NORM_REGS];
        norm_weights(wv, w, w_dt, h);
        PDL_ENTRY();
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            v[r] = i < h ? D::rounded(D::load(residual, base + i) + D::load(delta, base + i)) : 0.0f;
        }
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            if (i < h) D::store(residual, base + i, v[r]);
            ss += v[r] * v[r];
        }
        norm_out<D>(out, base, v, ss, wv, h, eps);
        return;
    }
    PDL_ENTRY();
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) {
        D::store(residual, base + i, D::load(residual, base + i) + D::load(delta, base + i));
        const float v = D::load(residual, base + i);  // the rounded value, as a later read sees it
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)h + eps);
    // Each thread reads back only the elements it wrote itself: no barrier needed for them.
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) D::store(out, base + i, D::load(residual, base + i) * inv * load_any(w, i, w_dt));
}

// out[i] += delta[i], rounded to the stream's dtype: the residual add of a projection that adds
// into the stream (Linear::accumulate) where cuBLAS computed it into a buffer (gemv_add* adds its
// own). add_rms_norm's add, without the norm.
template <class D>
__device__ void add(typename D::T* out, const typename D::T* delta, u64 total) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x)
        D::store(out, i, D::load(out, i) + D::load(delta, i));
}

// out[t, n] += bias[n]  (out [T, N]): the linear layers' bias, after the GEMM.
template <class D>
__device__ void add_bias(typename D::T* out, const void* bias, u32 bias_dt, u32 n, u64 total) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x)
        D::store(out, i, D::load(out, i) + load_any(bias, i % n, bias_dt));
}

// out[index[j]] += weight[j] * src[j]  (out [T, H], src [N, H]; the indices distinct): a mixture of
// experts' combine. Block j adds row j of src, each product and sum in f32, rounded once.
template <class D>
__device__ void index_add(typename D::T* out, const typename D::T* src, const u32* index, const float* weight, u32 h) {
    const u64 j = blockIdx.x;
    const u64 row = (u64)index[j] * h;
    const float w = weight[j];
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) D::store(out, row + i, D::load(out, row + i) + w * D::load(src, j * h + i));
}

// PyTorch's LayerNorm of row t: out = (x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b (x, out
// [T, H]; w and b [H] of dtype w_dt), after x += delta where ADD (the sum rounded to the stream's
// dtype and stored, then normed as stored, as add_rms_norm). A row of up to NORM_REGS elements a
// thread is kept in registers, every load issued before the first is used (as the RMSNorms do);
// longer rows take three passes, each thread reading back only the elements it wrote (no barrier
// for them). The same sums in the same order either way, in f32.
template <class D, bool ADD>
__device__ void layer_norm(typename D::T* out, typename D::T* x, const typename D::T* delta, const void* w, const void* b,
                           u32 w_dt, u32 h, float eps) {
    const u64 base = (u64)blockIdx.x * h;
    float s = 0.0f;
    if (h <= NORM_REGS * blockDim.x) {
        float v[NORM_REGS];
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            v[r] = i < h ? D::load(x, base + i) : 0.0f;
            if (ADD) v[r] = i < h ? D::rounded(v[r] + D::load(delta, base + i)) : 0.0f;
        }
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            if (ADD && i < h) D::store(x, base + i, v[r]);
            s += v[r];
        }
        const float mean = block_sum(s) / (float)h;
        float ss = 0.0f;
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            const float d = i < h ? v[r] - mean : 0.0f;
            ss += d * d;
        }
        const float inv = rsqrtf(block_sum(ss) / (float)h + eps);
#pragma unroll
        for (u32 r = 0; r < NORM_REGS; r++) {
            const u32 i = threadIdx.x + r * blockDim.x;
            if (i < h) D::store(out, base + i, (v[r] - mean) * inv * load_any(w, i, w_dt) + load_any(b, i, w_dt));
        }
        return;
    }
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) {
        float v = D::load(x, base + i);
        if (ADD) {
            v = D::rounded(v + D::load(delta, base + i));
            D::store(x, base + i, v);
        }
        s += v;
    }
    const float mean = block_sum(s) / (float)h;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < h; i += blockDim.x) {
        const float d = D::load(x, base + i) - mean;
        ss += d * d;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)h + eps);
    for (u32 i = threadIdx.x; i < h; i += blockDim.x)
        D::store(out, base + i, (D::load(x, base + i) - mean) * inv * load_any(w, i, w_dt) + load_any(b, i, w_dt));
}

// Conversions for the linear layers' mixed-dtype path (weights in one float dtype, activations in
// another): to f32 from a dtype known at run time, and from f32 to the activations' dtype.
extern "C" __global__ void to_f32(float* out, const void* x, u32 x_dt, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = load_any(x, i, x_dt);
}

template <class D>
__device__ void from_f32(typename D::T* out, const float* x, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) D::store(out, i, x[i]);
}

#define RESIDUAL(s, D)                                                                                        \
    extern "C" __global__ void embedding_##s(D::T* out, const void* table, u32 table_dt, const u32* ids, u32 h, \
                                             float scale) {                                                   \
        PDL_ENTRY();                                                                                          \
        embedding<D>(out, table, table_dt, ids, h, scale);                                                    \
    }                                                                                                         \
    extern "C" __global__ void rms_norm_##s(D::T* out, const D::T* x, const void* w, u32 w_dt, u32 h, float eps) { \
        rms_norm<D>(out, x, w, w_dt, h, eps);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void add_rms_norm_##s(D::T* out, D::T* residual, const D::T* delta, const void* w, u32 w_dt, \
                                                u32 h, float eps) {                                           \
        add_rms_norm<D>(out, residual, delta, w, w_dt, h, eps);                                               \
    }                                                                                                         \
    extern "C" __global__ void add_##s(D::T* out, const D::T* delta, u64 total) {                           \
        PDL_ENTRY();                                                                                          \
        add<D>(out, delta, total);                                                                            \
    }                                                                                                         \
    extern "C" __global__ void add_bias_##s(D::T* out, const void* bias, u32 bias_dt, u32 n, u64 total) {     \
        add_bias<D>(out, bias, bias_dt, n, total);                                                            \
    }                                                                                                         \
    extern "C" __global__ void from_f32_##s(D::T* out, const float* x, u64 n) { from_f32<D>(out, x, n); }     \
    extern "C" __global__ void index_add_##s(D::T* out, const D::T* src, const u32* index, const float* weight, u32 h) { \
        index_add<D>(out, src, index, weight, h);                                                             \
    }                                                                                                         \
    extern "C" __global__ void layer_norm_##s(D::T* out, D::T* x, const void* w, const void* b, u32 w_dt, u32 h, float eps) { \
        layer_norm<D, false>(out, x, nullptr, w, b, w_dt, h, eps);                                            \
    }                                                                                                         \
    extern "C" __global__ void add_layer_norm_##s(D::T* out, D::T* x, const D::T* delta, const void* w, const void* b, \
                                                  u32 w_dt, u32 h, float eps) {                               \
        layer_norm<D, true>(out, x, delta, w, b, w_dt, h, eps);                                               \
    }
FOR_EACH_DTYPE(RESIDUAL)
