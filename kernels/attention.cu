// The key/value stream: RoPE, writing new keys and values into the paged cache, and attention that
// reads them back without ever writing the T x T score matrix.
//
// Attention is split along the context (flash-decoding): block (t, h, s) takes query row t, head h
// and the s-th slice of the keys that query sees, runs an online softmax over it and writes its
// partial state (running max m, sum l, unnormalized output acc[D]) to a workspace; a second kernel
// merges the slices. A single long sequence thus still fills the GPU, and prefill and paged decode
// share one kernel: keys are addressed either contiguously (prefill: key j of a sequence starting at
// token `base` is row base + j of k) or through a block table (paged: key j is in block
// table[base + j / block_size], slot j % block_size).
//
// Within a block, ATTN_WARPS warps take keys in turn; lane l holds dims l, l + 32, ... of the query
// and of its accumulator, so a key row is read coalesced and its score is one warp reduction.

#define ATTN_WARPS 4
#define MAX_D 256

// Rotates x [T, heads, D] in place (rotate_half pairing: dim i with i + D/2) by positions[t] *
// inv_freq[i]; angles in double, as the CPU backend takes them. Block (t, head), D/2 threads.
template <class D>
__device__ void rope(typename D::T* x, const u32* positions, const double* inv_freq, u32 heads, u32 d) {
    const u32 half = d / 2, i = threadIdx.x;
    if (i >= half) return;
    const u64 base = ((u64)blockIdx.x * heads + blockIdx.y) * d;
    double s, c;
    sincos((double)positions[blockIdx.x] * inv_freq[i], &s, &c);
    const float cf = (float)c, sf = (float)s;
    const float a = D::load(x, base + i), b = D::load(x, base + i + half);
    D::store(x, base + i, a * cf - b * sf);
    D::store(x, base + i + half, b * cf + a * sf);
}

// k_cache, v_cache [blocks * block_size, row]; k, v [T, row]; token t goes to slot slots[t].
template <class D>
__device__ void kv_write(typename D::T* k_cache, typename D::T* v_cache, const typename D::T* k,
                         const typename D::T* v, const u32* slots, u32 row) {
    const u64 src = (u64)blockIdx.x * row, dst = (u64)slots[blockIdx.x] * row;
    for (u32 i = threadIdx.x; i < row; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

// One query row's view of the keys: it sees keys 0..nkeys[t] of its sequence, addressed from
// base[t] (a token row, or an offset into the block table).
struct KeyAddr {
    const u32* table;  // null: contiguous
    u32 block_size;
    __device__ __forceinline__ u64 row(u32 base, u32 j) const {
        if (table == 0) return (u64)base + j;
        return (u64)table[base + j / block_size] * block_size + j % block_size;
    }
};

// partial [T, hq, splits, D + 2]: acc[0..D], then m, then l.
template <class D, int DPL>  // DPL: dims per lane, D / 32
__device__ void attn_split(float* partial, const typename D::T* q, const typename D::T* k, const typename D::T* v,
                           const u32* base, const u32* nkeys, KeyAddr addr, u32 hq, u32 hkv, float scale,
                           u32 split_len) {
    const u32 t = blockIdx.x, h = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 d = DPL * 32, g = h / (hq / hkv);
    const u32 n = nkeys[t], kb = base[t];
    const u32 begin = s * split_len, end = min(n, begin + split_len);

    float qr[DPL], acc[DPL];
    const u64 qoff = ((u64)t * hq + h) * d;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        qr[i] = D::load(q, qoff + lane + 32 * i) * scale;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (u32 j = begin + warp; j < end; j += ATTN_WARPS) {
        const u64 off = (addr.row(kb, j) * hkv + g) * d;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) dot += qr[i] * D::load(k, off + lane + 32 * i);
        dot = warp_sum(dot);
        const float m_new = fmaxf(m, dot);
        const float correction = __expf(m - m_new), p = __expf(dot - m_new);
        l = l * correction + p;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = acc[i] * correction + p * D::load(v, off + lane + 32 * i);
        m = m_new;
    }

    // Merge the warps' states.
    __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS], sacc[ATTN_WARPS][MAX_D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) sacc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float* out = partial + (((u64)t * hq + h) * splits + s) * (d + 2);
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) mm = fmaxf(mm, sm[w]);
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) a += sm[w] == -INFINITY ? 0.0f : sacc[w][i] * __expf(sm[w] - mm);
        out[i] = a;
    }
    if (threadIdx.x == 0) {
        float ll = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) ll += sm[w] == -INFINITY ? 0.0f : sl[w] * __expf(sm[w] - mm);
        out[d] = mm;
        out[d + 1] = ll;
    }
}

// out [T, hq, D] from the slices' partial states. Block (t, h), D threads.
template <class D>
__device__ void attn_combine(typename D::T* out, const float* partial, u32 hq, u32 d, u32 splits) {
    const u32 t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    if (i >= d) return;
    const float* p = partial + ((u64)t * hq + h) * splits * (d + 2);
    float mm = -INFINITY;
    for (u32 s = 0; s < splits; s++) mm = fmaxf(mm, p[s * (d + 2) + d]);
    float a = 0.0f, l = 0.0f;
    for (u32 s = 0; s < splits; s++) {
        const float ms = p[s * (d + 2) + d];
        if (ms == -INFINITY) continue;  // a slice with no keys
        const float w = __expf(ms - mm);
        a += p[s * (d + 2) + i] * w;
        l += p[s * (d + 2) + d + 1] * w;
    }
    D::store(out, ((u64)t * hq + h) * d + i, a / l);
}

#define ATTN_SPLIT(s, D, dim)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)                                                 \
        attn_split_d##dim##_##s(float* partial, const D::T* q, const D::T* k, const D::T* v, const u32* base,    \
                                const u32* nkeys, const u32* table, u32 block_size, u32 hq, u32 hkv, float scale, \
                                u32 split_len) {                                                                  \
        KeyAddr addr = {table, block_size};                                                                      \
        attn_split<D, dim / 32>(partial, q, k, v, base, nkeys, addr, hq, hkv, scale, split_len);                \
    }

#define ATTENTION(s, D)                                                                                           \
    extern "C" __global__ void rope_##s(D::T* x, const u32* positions, const double* inv_freq, u32 heads, u32 d) { \
        rope<D>(x, positions, inv_freq, heads, d);                                                                \
    }                                                                                                             \
    extern "C" __global__ void kv_write_##s(D::T* k_cache, D::T* v_cache, const D::T* k, const D::T* v,          \
                                            const u32* slots, u32 row) {                                          \
        kv_write<D>(k_cache, v_cache, k, v, slots, row);                                                          \
    }                                                                                                             \
    extern "C" __global__ void attn_combine_##s(D::T* out, const float* partial, u32 hq, u32 d, u32 splits) {    \
        attn_combine<D>(out, partial, hq, d, splits);                                                             \
    }                                                                                                             \
    ATTN_SPLIT(s, D, 64) ATTN_SPLIT(s, D, 128) ATTN_SPLIT(s, D, 256)
FOR_EACH_DTYPE(ATTENTION)
