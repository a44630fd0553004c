// The key/value stream: RoPE, writing new keys and values into the paged cache, and attention that
// reads them back without ever writing the T x T score matrix.
//
// Attention is split along the context (flash-decoding): block (t, h, s) takes query row t, head h
// and the s-th slice of the keys that query sees, runs an online softmax over it and writes its
// partial state (running max m, sum l, unnormalized output acc[D]) to a workspace; a second kernel
// merges the slices. A single long sequence thus still fills the GPU, and prefill and paged decode
// share one kernel: keys are addressed either contiguously (prefill: key j of a sequence starting at
// token `base` is row base + j of k [T, hkv, D]) or through a block table (paged: key j is in block
// table[base + j / block_size], slot j % block_size, of the cache [blocks, hkv, block_size, D]).
//
// Within a block, ATTN_WARPS warps take keys in turn; lane l holds dims l, l + 32, ... of the query
// and of its accumulator, so a key row is read coalesced and its score is one warp reduction.

#define ATTN_WARPS 4
#define MAX_D 256

// Rotates x [T, heads, D] in place (rotate_half pairing over the first rot dims: dim i with
// i + rot/2; rot = D but for partial RoPE, whose other dims pass through) by positions[t] *
// inv_freq[i], cos and sin times mscale (1, or LongRoPE's attention factor); angles in double, as
// the CPU backend takes them. Block (t, head), at least rot/2 threads.
template <class D>
__device__ void rope(typename D::T* x, const u32* positions, const double* inv_freq, u32 heads, u32 d, u32 rot,
                     float mscale) {
    const u32 half = rot / 2, i = threadIdx.x;
    if (i >= half) return;
    const u64 base = ((u64)blockIdx.x * heads + blockIdx.y) * d;
    double s, c;
    sincos((double)positions[blockIdx.x] * inv_freq[i], &s, &c);
    const float cf = (float)c * mscale, sf = (float)s * mscale;
    const float a = D::load(x, base + i), b = D::load(x, base + i + half);
    D::store(x, base + i, a * cf - b * sf);
    D::store(x, base + i + half, b * cf + a * sf);
}

// k_cache, v_cache [blocks, hkv, block_size, d]; k, v [T, hkv, d]. Token t goes to slot slots[t]:
// head g's row to [slots[t] / block_size, g, slots[t] % block_size]. Block t, threads over the row.
template <class D>
__device__ void kv_write(typename D::T* k_cache, typename D::T* v_cache, const typename D::T* k,
                         const typename D::T* v, const u32* slots, u32 hkv, u32 d, u32 block_size) {
    const u32 row = hkv * d, slot = slots[blockIdx.x];
    const u64 src = (u64)blockIdx.x * row;
    const u64 first = ((u64)(slot / block_size) * hkv * block_size + slot % block_size) * d;
    for (u32 i = threadIdx.x; i < row; i += blockDim.x) {
        const u64 dst = first + (u64)(i / d) * block_size * d + i % d;
        k_cache[dst] = k[src + i];
        v_cache[dst] = v[src + i];
    }
}

// RoPE on q [T, hq, d] and k [T, hkv, d] in place, and k (rotated) and v [T, hkv, d] written to
// the paged cache at slots[t], in one launch (the RopeKvWrite op): block (t, head), heads 0..hq of
// q then hkv of k; d/2 threads, thread i taking the rotating pair (i, i + rot/2) below rot/2 and
// two of partial RoPE's passing dims above (k's copied to the cache as they are), and v's dims i
// and i + d/2. The same arithmetic as rope twice and kv_write, bit for bit.
template <class D>
__device__ void rope_kv_write(typename D::T* k_cache, typename D::T* v_cache, typename D::T* k, const typename D::T* v,
                              const u32* slots, u32 hkv, u32 d, u32 block_size, typename D::T* q, const u32* positions,
                              const double* inv_freq, u32 hq, u32 rot, float mscale) {
    const u32 half = rot / 2, i = threadIdx.x, t = blockIdx.x;
    if (i >= d / 2) return;
    const bool is_q = blockIdx.y < hq, rotates = i < half;
    if (is_q && !rotates) return;
    const u32 head = is_q ? blockIdx.y : blockIdx.y - hq;
    typename D::T* x = is_q ? q : k;
    const u64 base = ((u64)t * (is_q ? hq : hkv) + head) * d;
    const u32 j0 = rotates ? i : rot + 2 * (i - half), j1 = rotates ? i + half : j0 + 1;
    // Every load before the first store (which might alias them as far as the compiler knows): one
    // round trip to memory, not one after each store (a decode step runs this once a layer).
    const u32 pos = positions[t], slot = is_q ? 0 : slots[t];
    const float a = D::load(x, base + j0), b = D::load(x, base + j1);
    typename D::T v0 = {}, v1 = {};
    if (!is_q) v0 = v[base + i], v1 = v[base + i + d / 2];
    float ra = a, rb = b;
    if (rotates) {
        double s, c;
        sincos((double)pos * inv_freq[i], &s, &c);
        const float cf = (float)c * mscale, sf = (float)s * mscale;
        ra = a * cf - b * sf, rb = b * cf + a * sf;
        D::store(x, base + j0, ra);
        D::store(x, base + j1, rb);
    }
    if (is_q) return;
    // The rotated k as stored above (the same value, the same rounding), and v as it is.
    const u64 dst = (((u64)(slot / block_size) * hkv + head) * block_size + slot % block_size) * d;
    D::store(k_cache, dst + j0, ra);
    D::store(k_cache, dst + j1, rb);
    v_cache[dst + i] = v0;
    v_cache[dst + i + d / 2] = v1;
}

// One query row's view of the keys: it sees keys 0..nkeys[t] of its sequence, addressed from
// base[t] (a token row, or an offset into the block table).
struct KeyAddr {
    const u32* table;  // null: contiguous
    u32 block_size;
    // Key j's block of the table and place in it. Blocks of a power of two tokens (the engine's
    // 16): a shift and a mask, where a division by a number known only at run time is some twenty
    // instructions a row.
    __device__ __forceinline__ void place(u32 j, u32& blk, u32& in) const {
        if ((block_size & (block_size - 1)) == 0) {
            blk = j >> (__ffs(block_size) - 1);
            in = j & (block_size - 1);
        } else {
            blk = j / block_size;
            in = j % block_size;
        }
    }
    // Where head g's row at place `in` of the sequence's block `blk` starts, in elements.
    __device__ __forceinline__ u64 row(u32 base, u32 blk, u32 in, u32 g, u32 hkv, u32 d) const {
        return (((u64)table[base + blk] * hkv + g) * block_size + in) * d;
    }
    // Where head g's row of key j starts, in elements.
    __device__ __forceinline__ u64 at(u32 base, u32 j, u32 g, u32 hkv, u32 d) const {
        if (table == 0) return (((u64)base + j) * hkv + g) * d;
        u32 blk, in;
        place(j, blk, in);
        return row(base, blk, in, g, hkv, d);
    }
};

// What the split kernels do to a score beyond the scale (folded into q) and the causal end: a
// sliding window (`window` > 0: a row that sees n keys sees only its last `window`), soft-capping
// (`softcap` > 0: score -> softcap tanh(score / softcap), Gemma 2's) and ALiBi (`alibi` > 0, the
// largest bias: key j of a row that sees n gains slope (j - (n - 1)), Bloom's and MPT's). The
// Scores op parameter.
struct ScoreMods {
    u32 window;
    float softcap;
    float alibi;
    // The first of a row's n keys it sees.
    __device__ __forceinline__ u32 first(u32 n) const { return window != 0 && n > window ? n - window : 0; }
    __device__ __forceinline__ float cap(float score) const {
        return softcap > 0.0f ? softcap * tanhf(score / softcap) : score;
    }
    // ALiBi's slope of query head h of hq (0 without), as Scores::alibi_slope: with n the largest
    // power of two at most hq, 2^(-alibi (h + 1) / n) for the first n heads, then the odd steps
    // between them, 2^(-alibi (2 (h - n) + 1) / 2n).
    __device__ __forceinline__ float slope(u32 h, u32 hq) const {
        if (alibi == 0.0f) return 0.0f;
        u32 n = 1;
        while (2 * n <= hq) n *= 2;
        const float step = alibi / (float)n;
        return exp2f(h < n ? -step * (float)(h + 1) : -0.5f * step * (float)(2 * (h - n) + 1));
    }
    // The tensor-core kernels' form, in their log2 units: a raw q.k becomes log2(e) softcap
    // tanh(scale q.k / softcap), with scale_log2 = scale log2(e) (used where softcap > 0).
    struct Log2Cap {
        float inner, outer;
        __device__ __forceinline__ float operator()(float qk) const { return outer * tanhf(qk * inner); }
    };
    __device__ __forceinline__ Log2Cap log2_cap(float scale_log2) const {
        const float outer = 1.4426950408889634f * softcap;
        return {scale_log2 / outer, outer};
    }
    // ALiBi in the tensor-core kernels' units: what each key of distance adds to head h's score as
    // their tiles hold it before the softmax's factor (a raw q.k, which the scale then turns into
    // log2 units; capped scores are in log2 units already). 0 without ALiBi.
    __device__ __forceinline__ float alibi_coef(u32 h, u32 hq, float scale_log2) const {
        const float s = slope(h, hq) * 1.4426950408889634f;
        return softcap > 0.0f ? s : s / scale_log2;
    }
};

// The keys [begin, end) of slice s of `splits` of a row that sees n keys: the keys it sees (from
// mods.first) cut into equal runs. From the row alone, so that the launch's parameters never depend
// on the contexts (a decode step replayed as a CUDA graph).
__device__ __forceinline__ void slice_of(u32 n, u32 s, u32 splits, ScoreMods mods, u32* begin, u32* end) {
    const u32 lo = mods.first(n), per = (n - lo + splits - 1) / splits;
    *begin = min(n, lo + s * per);
    *end = min(n, *begin + per);
}

// partial [T, hq, splits, D + 2]: acc[0..D], then m, then l; the row's keys cut by slice_of.
template <class D, int DPL>  // DPL: dims per lane, D / 32
__device__ void attn_split(float* partial, const typename D::T* q, const typename D::T* k, const typename D::T* v,
                           const u32* base, const u32* nkeys, KeyAddr addr, u32 hq, u32 hkv, float scale,
                           ScoreMods mods) {
    const u32 t = blockIdx.x, h = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 d = DPL * 32, g = h / (hq / hkv);
    const u32 n = nkeys[t], kb = base[t];
    u32 begin, end;
    slice_of(n, s, splits, mods, &begin, &end);

    float qr[DPL], acc[DPL];
    const u64 qoff = ((u64)t * hq + h) * d;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        qr[i] = D::load(q, qoff + lane + 32 * i) * scale;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const float slope = mods.slope(h, hq), last = (float)(n - 1);
    for (u32 j = begin + warp; j < end; j += ATTN_WARPS) {
        const u64 off = addr.at(kb, j, g, hkv, d);
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) dot += qr[i] * D::load(k, off + lane + 32 * i);
        dot = mods.cap(warp_sum(dot)) + slope * ((float)j - last);
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

// Element x of the merge of one (token, head)'s `splits` partial states (slice s's acc[d], m, l at
// p + s (d + 2), as attn_split writes them; m in natural-log units, -inf for a slice that saw no
// keys), given every slice's m and l in sm and sl: sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M),
// M the largest m. The loads (past L1: decode_attn's merge reads what other blocks wrote during the
// same launch) go out 16 slices at a time before any is used: left to itself the compiler issued
// two or three ahead of the sums, a round trip to L2 for every few slices of every output (~20 an
// output at batch one's 48 slices on an H200; 3 now).
#define MERGE_BATCH 16
__device__ __forceinline__ float merge_slices(const float* p, u32 d, u32 x, u32 splits, const float* sm, const float* sl) {
    float mm = -INFINITY, a = 0.0f, l = 0.0f;
    for (u32 s = 0; s < splits; s++) mm = fmaxf(mm, sm[s]);
    for (u32 s0 = 0; s0 < splits; s0 += MERGE_BATCH) {
        float v[MERGE_BATCH];
#pragma unroll
        for (u32 j = 0; j < MERGE_BATCH; j++) v[j] = s0 + j < splits && sm[s0 + j] != -INFINITY ? __ldcg(p + (s0 + j) * (d + 2) + x) : 0.0f;
#pragma unroll
        for (u32 j = 0; j < MERGE_BATCH; j++) {
            const u32 s = s0 + j;
            if (s >= splits || sm[s] == -INFINITY) continue;
            const float w = __expf(sm[s] - mm);
            a += v[j] * w;
            l += sl[s] * w;
        }
    }
    return a / l;
}

// out [T, hq, D] from the slices' partial states. Block (t, h), D threads. The slices' maxima and
// sums come to shared memory in one round trip (at most COMBINE_MAX slices: the host's limit,
// ops.rs), then each thread merges its dimension (merge_slices).
#define COMBINE_MAX 512

template <class D>
__device__ void attn_combine(typename D::T* out, const float* partial, u32 hq, u32 d, u32 splits) {
    const u32 t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const float* p = partial + ((u64)t * hq + h) * splits * (d + 2);
    __shared__ float sm[COMBINE_MAX], sl[COMBINE_MAX];
    for (u32 s = i; s < splits; s += blockDim.x) {
        sm[s] = p[s * (d + 2) + d];
        sl[s] = p[s * (d + 2) + d + 1];
    }
    __syncthreads();
    if (i >= d) return;
    D::store(out, ((u64)t * hq + h) * d + i, merge_slices(p, d, i, splits, sm, sl));
}

// The same for all the query heads of one KV head at once (grid (t, kv head, slice)): each K and V
// row is read once for the whole group instead of once per query head, which is what bounds decoding
// at long contexts. Groups of up to GROUP_MAX heads, head dims up to 128.
#define GROUP_MAX 8

template <class D, int DPL>
__device__ void attn_group(float* partial, const typename D::T* q, const typename D::T* k, const typename D::T* v,
                           const u32* base, const u32* nkeys, KeyAddr addr, u32 hq, u32 hkv, float scale,
                           ScoreMods mods) {
    const u32 t = blockIdx.x, g = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 d = DPL * 32, group = hq / hkv;
    const u32 n = nkeys[t], kb = base[t];
    u32 begin, end;
    slice_of(n, s, splits, mods, &begin, &end);

    float qr[GROUP_MAX][DPL], acc[GROUP_MAX][DPL], m[GROUP_MAX], l[GROUP_MAX], slope[GROUP_MAX];
    const float last = (float)(n - 1);
#pragma unroll
    for (int i = 0; i < GROUP_MAX; i++) {
        const u64 qoff = ((u64)t * hq + g * group + (i < group ? i : 0)) * d;
        slope[i] = mods.slope(g * group + i, hq);
#pragma unroll
        for (int x = 0; x < DPL; x++) {
            qr[i][x] = i < group ? D::load(q, qoff + lane + 32 * x) * scale : 0.0f;
            acc[i][x] = 0.0f;
        }
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    for (u32 j = begin + warp; j < end; j += ATTN_WARPS) {
        const u64 off = addr.at(kb, j, g, hkv, d);
        float kr[DPL], vr[DPL];
#pragma unroll
        for (int x = 0; x < DPL; x++) {
            kr[x] = D::load(k, off + lane + 32 * x);
            vr[x] = D::load(v, off + lane + 32 * x);
        }
#pragma unroll
        for (int i = 0; i < GROUP_MAX; i++) {
            if (i >= group) break;
            float dot = 0.0f;
#pragma unroll
            for (int x = 0; x < DPL; x++) dot += qr[i][x] * kr[x];
            dot = mods.cap(warp_sum(dot)) + slope[i] * ((float)j - last);
            const float m_new = fmaxf(m[i], dot);
            const float correction = __expf(m[i] - m_new), p = __expf(dot - m_new);
            l[i] = l[i] * correction + p;
#pragma unroll
            for (int x = 0; x < DPL; x++) acc[i][x] = acc[i][x] * correction + p * vr[x];
            m[i] = m_new;
        }
    }

    // Merge the warps' states, head by head.
    __shared__ float sm[ATTN_WARPS][GROUP_MAX], sl[ATTN_WARPS][GROUP_MAX], sacc[ATTN_WARPS][GROUP_MAX][128];
#pragma unroll
    for (int i = 0; i < GROUP_MAX; i++) {
        if (lane == 0) {
            sm[warp][i] = m[i];
            sl[warp][i] = l[i];
        }
#pragma unroll
        for (int x = 0; x < DPL; x++) sacc[warp][i][lane + 32 * x] = acc[i][x];
    }
    __syncthreads();
    for (u32 i = 0; i < group; i++) {
        float* out = partial + (((u64)t * hq + g * group + i) * splits + s) * (d + 2);
        float mm = -INFINITY;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) mm = fmaxf(mm, sm[w][i]);
        for (u32 x = threadIdx.x; x < d; x += blockDim.x) {
            float a = 0.0f;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; w++) a += sm[w][i] == -INFINITY ? 0.0f : sacc[w][i][x] * __expf(sm[w][i] - mm);
            out[x] = a;
        }
        if (threadIdx.x == 0) {
            float ll = 0.0f;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; w++) ll += sm[w][i] == -INFINITY ? 0.0f : sl[w][i] * __expf(sm[w][i] - mm);
            out[d] = mm;
            out[d + 1] = ll;
        }
    }
}

#define ATTN_GROUP(s, D, dim)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)                                                 \
        attn_group_d##dim##_##s(float* partial, const D::T* q, const D::T* k, const D::T* v, const u32* base,    \
                                const u32* nkeys, const u32* table, u32 block_size, u32 hq, u32 hkv, float scale, \
                                u32 window, float softcap, float alibi) {                                         \
        KeyAddr addr = {table, block_size};                                                                      \
        ScoreMods mods = {window, softcap, alibi};                                                               \
        attn_group<D, dim / 32>(partial, q, k, v, base, nkeys, addr, hq, hkv, scale, mods);                     \
    }

#define ATTN_SPLIT(s, D, dim)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)                                                 \
        attn_split_d##dim##_##s(float* partial, const D::T* q, const D::T* k, const D::T* v, const u32* base,    \
                                const u32* nkeys, const u32* table, u32 block_size, u32 hq, u32 hkv, float scale, \
                                u32 window, float softcap, float alibi) {                                         \
        KeyAddr addr = {table, block_size};                                                                      \
        ScoreMods mods = {window, softcap, alibi};                                                               \
        attn_split<D, dim / 32>(partial, q, k, v, base, nkeys, addr, hq, hkv, scale, mods);                     \
    }

#define ATTENTION(s, D)                                                                                           \
    extern "C" __global__ void rope_##s(D::T* x, const u32* positions, const double* inv_freq, u32 heads, u32 d, \
                                        u32 rot, float mscale) {                                                  \
        rope<D>(x, positions, inv_freq, heads, d, rot, mscale);                                                   \
    }                                                                                                             \
    extern "C" __global__ void kv_write_##s(D::T* k_cache, D::T* v_cache, const D::T* k, const D::T* v,          \
                                            const u32* slots, u32 hkv, u32 d, u32 block_size) {                   \
        kv_write<D>(k_cache, v_cache, k, v, slots, hkv, d, block_size);                                           \
    }                                                                                                             \
    extern "C" __global__ void rope_kv_write_##s(D::T* k_cache, D::T* v_cache, D::T* k, const D::T* v,          \
                                                 const u32* slots, u32 hkv, u32 d, u32 block_size, D::T* q,      \
                                                 const u32* positions, const double* inv_freq, u32 hq,           \
                                                 u32 rot, float mscale) {                                         \
        PDL_ENTRY();                                                                                              \
        rope_kv_write<D>(k_cache, v_cache, k, v, slots, hkv, d, block_size, q, positions, inv_freq, hq, rot,      \
                         mscale);                                                                                 \
    }                                                                                                             \
    extern "C" __global__ void attn_combine_##s(D::T* out, const float* partial, u32 hq, u32 d, u32 splits) {    \
        PDL_ENTRY();                                                                                              \
        attn_combine<D>(out, partial, hq, d, splits);                                                             \
    }                                                                                                             \
    ATTN_SPLIT(s, D, 64) ATTN_SPLIT(s, D, 128) ATTN_SPLIT(s, D, 256) ATTN_GROUP(s, D, 64) ATTN_GROUP(s, D, 128)
FOR_EACH_DTYPE(ATTENTION)

// ---- Prefill on tensor cores (sm_80+): FlashAttention-2's forward ----
//
// Block (tile, query head): FA_WARPS warps of FA_MT 16-row slices each, FA_ROWS = 16 FA_MT FA_WARPS
// query rows per tile; keys and values in tiles of FA_KEYS rows. Every operand goes through shared
// memory, brought there by cp.async (16 bytes a thread, never through registers) and read by ldmatrix
// (K and Q as they lie, V transposed), in rows of 16-byte chunks swizzled (chunk c of row r at
// c ^ (r % 8)) so that neither the copies nor ldmatrix meet a bank conflict. S = Q K^T and O += P V
// are mma.sync m16n8k16 (f16/bf16 in, f32 accumulators); the online softmax works on the accumulator
// fragments (a thread holds two rows, lane/4 and lane/4 + 8, of each 16x8 tile; a row's four threads
// are one quad), in log2 units with the scale folded into one multiply-add, and P goes from S's
// accumulator layout straight into the A operand of the next MMA. The pipeline is FlashAttention-2's:
// V of tile j is copied while S of tile j is computed, K of tile j + 1 while P V of tile j is, so
// shared memory holds one Q, one K and one V tile. Masks apply only to tiles that cross a row's last
// key (causal: the diagonal) or the end of the keys; tiles above the diagonal are never visited.
//
// tiles[5 t .. 5 t + 5]: the tile's first query row (in q and out), its rows, the position of that row
// within its sequence (causal: the keys a row sees end at its own position), where the sequence's
// keys start: a token row of k/v (contiguous prompts, table null) or an offset into the block table
// (the paged cache: chunked prefill after a cached prefix), and how many of its keys the tile's rows
// see at most. Grid (tiles, query heads); grouped-query heads read their shared K/V head.
//
// The shape of a tile per head dim is a compile-time constant (FA<d>_WARPS, _MT, _KEYS), set by the
// host from its tuned table (crates/highrise-cuda/src/flash.rs) and varied by scripts/gpu-sweep.sh.

#ifndef FA64_WARPS
#define FA64_WARPS 4
#endif
#ifndef FA64_MT
#define FA64_MT 2
#endif
#ifndef FA64_KEYS
#define FA64_KEYS 64
#endif
#ifndef FA128_WARPS
#define FA128_WARPS 4
#endif
#ifndef FA128_MT
#define FA128_MT 2
#endif
#ifndef FA128_KEYS
#define FA128_KEYS 64
#endif

// Element offset of chunk c (8 elements) of row r in a swizzled tile of D-element rows.
template <int D>
__device__ __forceinline__ u32 swz(u32 r, u32 c) {
    return r * D + ((c ^ (r & 7)) << 3);
}

// Element offset of chunk c (8 elements) of row r in a tile of `rows` rows of D elements as wgmma
// reads it with the 128-byte swizzle: D / 64 blocks of [rows][64] (rows of 128 bytes, 8-row groups
// 1024 bytes apart), a row's chunk c at c ^ (r % 8) within its block; the tile 1024-byte aligned.
template <int D>
__device__ __forceinline__ u32 swz_wg(u32 r, u32 c, u32 rows) {
    return (c >> 3) * rows * 64 + r * 64 + (((c & 7) ^ (r & 7)) << 3);
}

// One 16-byte copy into a swizzled tile of N rows of D elements (swz, or swz_wg with WG): chunk c
// of row r from element offset `off` (-1: zeros).
template <int D, int N, bool WG>
__device__ __forceinline__ void copy_chunk(u16* tile, const u16* base, u32 r, u32 c, long long off) {
    cp_async16(tile + (WG ? swz_wg<D>(r, c, N) : swz<D>(r, c)), off < 0 ? base : base + off + c * 8, off < 0 ? 0 : 16);
}

// Copies N rows into a swizzled tile, row r from `src(r)`, by THREADS threads of which this is
// number `tid`, each row's source taken just before its copy (few registers: the prefill kernels
// keep theirs for the softmax).
template <int D, int THREADS, int N, bool WG = false, class Src>
__device__ __forceinline__ void stage_rows(u16* tile, const u16* base, u32 tid, Src src) {
    constexpr u32 CH = D / 8;
    for (u32 i = tid; i < N * CH; i += THREADS) copy_chunk<D, N, WG>(tile, base, i / CH, i % CH, src(i / CH));
}

// The same in two steps, for rows whose sources are block-table lookups: `row_sources` takes every
// row's source first, so the loads go out together instead of one round trip before each copy
// (cp.async's asm is a compiler barrier), and the decode kernel's K and V tiles share them;
// `copy_rows` then issues the copies. Each thread keeps one 16-byte column of every
// (THREADS / (D / 8))-th row.
template <int D, int THREADS, int N>
struct RowSources {
    static constexpr u32 CH = D / 8, ITER = (N * CH + THREADS - 1) / THREADS;
    static_assert(THREADS % CH == 0, "a thread keeps its column of 16 bytes");
    long long off[ITER];
};

template <int D, int THREADS, int N, class Src>
__device__ __forceinline__ void row_sources(RowSources<D, THREADS, N>& rs, u32 tid, Src src) {
#pragma unroll
    for (u32 it = 0; it < rs.ITER; it++) {
        const u32 r = tid / rs.CH + it * (THREADS / rs.CH);
        rs.off[it] = r < N ? src(r) : -1LL;
    }
}

template <int D, int THREADS, int N>
__device__ __forceinline__ void copy_rows(u16* tile, const u16* base, u32 tid, const RowSources<D, THREADS, N>& rs) {
#pragma unroll
    for (u32 it = 0; it < rs.ITER; it++) {
        const u32 r = tid / rs.CH + it * (THREADS / rs.CH);
        if (r < N) copy_chunk<D, N, false>(tile, base, r, tid % rs.CH, rs.off[it]);
    }
}

// The same for N rows lying one after another from `src` (a chunk of keys within one block of the
// paged cache: one block-table lookup for all of them), every one present: row r from src + r D,
// so a thread's copies are src + 8 tid + 8 THREADS it, no per-row source or zero-fill test.
template <int D, int THREADS, int N>
__device__ __forceinline__ void copy_run(u16* tile, const u16* src, u32 tid) {
    constexpr u32 CH = D / 8, ITER = (N * CH + THREADS - 1) / THREADS;
    static_assert(THREADS % CH == 0, "a thread keeps its column of 16 bytes");
    const u16* from = src + tid * 8;  // row tid / CH, column tid % CH: then THREADS chunks on each time
#pragma unroll
    for (u32 it = 0; it < ITER; it++) {
        const u32 r = tid / CH + it * (THREADS / CH), c = tid % CH;
        if (r < N) cp_async16(tile + swz<D>(r, c), from + it * THREADS * 8, 16);
    }
}

// Masks one warp's 16 rows of scores (from row r of the tile; s[nt][e] as softmax_tile reads them):
// -inf for keys past a row's position (rows past the tile's end: the last row's) or before its
// window's first key.
template <int NT>
__device__ __forceinline__ void mask_tile(float (&s)[NT][4], u32 r, u32 kb, u32 pos0, u32 rows, u32 keys_end, ScoreMods mods) {
    const u32 quad = threadIdx.x & 3;
    const u32 rr = r + ((threadIdx.x & 31) >> 2);
    const u32 pos[2] = {pos0 + min(rr, rows - 1), pos0 + min(rr + 8, rows - 1)};
    const u32 last[2] = {min(pos[0], keys_end - 1), min(pos[1], keys_end - 1)};
    const u32 first[2] = {mods.first(pos[0] + 1), mods.first(pos[1] + 1)};
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const u32 key = kb + nt * 8 + 2 * quad + (e & 1);
            if (key > last[e >> 1] || key < first[e >> 1]) s[nt][e] = -INFINITY;
        }
}

// ALiBi on a warp's scores (as mask_tile holds them): each gains `coef` times its key's distance
// from the block's first row's position pos0. The op's bias is measured from each row's own last
// key; the two differ by a constant per row (at most the tile's rows), which the softmax ignores,
// and this one needs no row arithmetic (the d128 f16 kernel's registers are full on sm_80). The
// same for every tile of a row, and a small exact integer in f32 near the diagonal, where the
// weights are.
template <int NT>
__device__ __forceinline__ void bias_tile(float (&s)[NT][4], u32 kb, u32 pos0, float coef) {
    const float d0 = (float)((int)(kb + 2 * (threadIdx.x & 3)) - (int)pos0);
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[nt][e] += coef * (d0 + (float)(8 * nt + (e & 1)));
}

// The scores of one warp's 16 query rows against a tile of 8 NT keys starting at key kb, in
// mma.sync's C layout (the same per warp for wgmma's accumulators): s[nt][e] is row r + lane/4 +
// 8 (e / 2) of the tile and key kb + 8 nt + 2 (lane % 4) + e % 2. Masks them (capped before, by
// cap_tile), turns them into P (unnormalized probabilities, in place), and carries the rows' online
// softmax: running maximum m and sum l (this thread's share of each; the quad holds the rest); the
// output rows are to be multiplied by `corr` (rescale), when no product still writes them.
//
// With a sliding window (`mods.window` > 0: row at position p sees keys above p - window) the tiles
// before the first row's first key are never visited (the caller's loop), and tiles that cross a
// row's first key are masked there too; with soft-capping (`mods.softcap` > 0) each score becomes
// softcap tanh(scale s / softcap) before the online softmax, which then works in log2 units of it.
template <int NT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], float (&corr)[2], float (&m)[2], float (&l)[2], u32 r, u32 kb,
                                             bool masked, u32 pos0, u32 rows, u32 keys_end, ScoreMods mods, ScoreMods::Log2Cap cap) {
    // Scores capped (cap_tile) are in log2 units already; else `cap.inner` is the scale (softmax_cap).
    const float mul = mods.softcap > 0.0f ? 1.0f : cap.inner;
    if (masked) mask_tile(s, r, kb, pos0, rows, keys_end, mods);
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float mx = m[hf];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row's first key is in the first tile it is shown, so mx is finite from then on; before
        // (a window starting in a later tile) both are -inf and nothing is added.
        const float ref = mx == -INFINITY ? 0.0f : mx;
        corr[hf] = fast_exp2((m[hf] - ref) * mul);
        const float shift = ref * mul;
        m[hf] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][2 * hf] = fast_exp2(s[nt][2 * hf] * mul - shift);
            s[nt][2 * hf + 1] = fast_exp2(s[nt][2 * hf + 1] * mul - shift);
            sum += s[nt][2 * hf] + s[nt][2 * hf + 1];
        }
        l[hf] = l[hf] * corr[hf] + sum;
    }
}

// The output rows rescaled to softmax_tile's new maximum (`corr` per held row), unless no row of
// the warp's moved: once a row has seen its largest scores (an attention sink's, often the first
// key's) most tiles move none, and their DT x 4 multiplications by exactly 1 change nothing.
template <int DT>
__device__ __forceinline__ void rescale(float (&o)[DT][4], const float (&corr)[2]) {
    if (!__ballot_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) return;
#pragma unroll
    for (int i = 0; i < DT; i++) {
        o[i][0] *= corr[0];
        o[i][1] *= corr[0];
        o[i][2] *= corr[1];
        o[i][3] *= corr[1];
    }
}

// Soft-capping of a tile of scores (before softmax_tile), where the op has it.
template <int NT>
__device__ __forceinline__ void cap_tile(float (&s)[NT][4], ScoreMods mods, ScoreMods::Log2Cap cap) {
    if (mods.softcap > 0.0f) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = cap(s[nt][e]);
    }
}

// softmax_tile's `cap`: soft-capping in log2 units where the op has it, else the scale in `inner`.
__device__ __forceinline__ ScoreMods::Log2Cap softmax_cap(ScoreMods mods, float scale_log2) {
    return mods.softcap > 0.0f ? mods.log2_cap(scale_log2) : ScoreMods::Log2Cap{scale_log2, 0.0f};
}

// P of keys 16 kt .. 16 kt + 15 (score tiles 2 kt and 2 kt + 1) as an A fragment (mma.sync's, and
// wgmma's per warp).
template <int NT>
__device__ __forceinline__ void p_fragment(u32 (&pa)[4], const float (&s)[NT][4], int kt, bool bf16) {
    pa[0] = pack2(s[2 * kt][0], s[2 * kt][1], bf16);
    pa[1] = pack2(s[2 * kt][2], s[2 * kt][3], bf16);
    pa[2] = pack2(s[2 * kt + 1][0], s[2 * kt + 1][1], bf16);
    pa[3] = pack2(s[2 * kt + 1][2], s[2 * kt + 1][3], bf16);
}

// The end: one warp's 16 rows (from row r of the tile) of o over their sums, to `out` (rows past
// `rows` are not written).
template <int DT>
__device__ __forceinline__ void store_rows(u16* out, const float (&o)[DT][4], const float (&l)[2], u32 r, u32 rows, u32 q0, u32 hq,
                                           u32 h, bool bf16) {
    constexpr u32 D = DT * 8;
    const u32 lane = threadIdx.x & 31, quad = lane & 3;
    u32* out32 = (u32*)out;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        // The rows' sums are spread over their quads.
        float sum = l[hf];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = 1.0f / sum;
        const u32 rr = r + (lane >> 2) + 8 * hf;
        if (rr >= rows) continue;
        const u64 row = ((u64)(q0 + rr) * hq + h) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) out32[(row + dt * 8 + 2 * quad) / 2] = pack2(o[dt][2 * hf] * inv, o[dt][2 * hf + 1] * inv, bf16);
    }
}

// Whether a tile of KEYS keys from kb needs masks: some key lies past a row's last key or the keys'
// end, or (a window) before the last row's first key.
__device__ __forceinline__ bool tile_masked(u32 kb, u32 keys, u32 keys_end, u32 pos0, u32 rows, ScoreMods mods) {
    return kb + keys > keys_end || kb + keys - 1 > pos0 || (mods.window != 0 && kb + mods.window < pos0 + rows);
}

template <int D, int WARPS, int MT, int KEYS, bool BF16>
__device__ void flash_attn(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles, KeyAddr addr, u32 hq,
                           u32 hkv, float scale_log2, ScoreMods mods, u16* smem) {
    constexpr u32 ROWS = 16 * MT * WARPS, THREADS = 32 * WARPS, NT = KEYS / 8;
    u16* qs = smem;              // [ROWS][D]
    u16* ks = qs + ROWS * D;     // [KEYS][D]
    u16* vs = ks + KEYS * D;     // [KEYS][D]
    const u32 tile = blockIdx.x, h = blockIdx.y, g = h / (hq / hkv);
    const u32 q0 = tiles[5 * tile], rows = tiles[5 * tile + 1], pos0 = tiles[5 * tile + 2], kbase = tiles[5 * tile + 3];
    const u32 keys_end = tiles[5 * tile + 4];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // ldmatrix: lane 8 i + j gives row j of matrix i.
    const u32 mi = lane >> 3, mj = lane & 7;

    // Q, and K of the first tile (rows past the tile's end repeat its last row; never written).
    stage_rows<D, THREADS, ROWS>(qs, q, threadIdx.x, [&](u32 r) { return (long long)(((u64)(q0 + min(r, rows - 1)) * hq + h) * D); });
    auto stage_keys = [&](u16* dst, const u16* src, u32 kb) {
        stage_rows<D, THREADS, KEYS>(dst, src, threadIdx.x, [&](u32 r) {
            return kb + r < keys_end ? (long long)addr.at(kbase, kb + r, g, hkv, D) : -1LL;
        });
    };
    // The first tile holding a key the tile's first row sees (0 without a window).
    const u32 kb0 = mods.first(pos0 + 1) / KEYS * KEYS;
    stage_keys(ks, k, kb0);
    cp_async_commit();
    // Soft-capping: scores in natural units, capped, then log2 units (the scale is inside the tanh).
    const bool capped = mods.softcap > 0.0f;
    const ScoreMods::Log2Cap cap = mods.log2_cap(scale_log2);
    const float mul = capped ? 1.0f : scale_log2;

    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < D / 8; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
    }

    for (u32 kb = kb0; kb < keys_end; kb += KEYS) {
        cp_async_wait<0>();
        __syncthreads();  // K of this tile (and Q) landed; every warp is done with the last V
        stage_keys(vs, v, kb);
        cp_async_commit();

        // S = Q K^T: per 16 dims, Q's fragments, then K's for 16 keys (two 8-key tiles) at a time.
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
                ldmatrix_x4<false>(qa[mt], qs + swz<D>((warp * MT + mt) * 16 + (mi & 1) * 8 + mj, kk * 2 + (mi >> 1)));
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                u32 kf[4];
                ldmatrix_x4<false>(kf, ks + swz<D>(np * 16 + (mi >> 1) * 8 + mj, kk * 2 + (mi & 1)));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma16816(s[mt][2 * np], qa[mt], kf[0], kf[1], BF16);
                    mma16816(s[mt][2 * np + 1], qa[mt], kf[2], kf[3], BF16);
                }
            }
        }

        // softmax_tile's work (its mask shared, mask_tile), the rest written out here: as one call,
        // ptxas spills the d128 f16 kernel on sm_80.
        if (capped) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mt][nt][e] = cap(s[mt][nt][e]);
        }
        // ALiBi's slope found again each tile (from the parameters: no register held through the
        // loop, which the d128 f16 kernel has none left for on sm_80).
        if (mods.alibi != 0.0f) {
            const float alibi = mods.alibi_coef(h, hq, scale_log2);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) bias_tile(s[mt], kb, pos0, alibi);
        }
        // Mask only where some key of the tile lies past a row's last key or past the keys' end, or
        // (a window) before the last row's first key.
        const bool masked = kb + KEYS > keys_end || kb + KEYS - 1 > pos0 || (mods.window != 0 && kb + mods.window < pos0 + rows);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            if (masked) mask_tile(s[mt], (warp * MT + mt) * 16, kb, pos0, rows, keys_end, mods);
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                float mx = m[mt][hf];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // A row's first key is in the first tile it is shown, so mx is finite from then on;
                // before (a window starting in a later tile) both are -inf and nothing is added.
                const float ref = mx == -INFINITY ? 0.0f : mx;
                const float corr = fast_exp2((m[mt][hf] - ref) * mul), shift = ref * mul;
                m[mt][hf] = mx;
                float sum = 0.0f;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    s[mt][nt][2 * hf] = fast_exp2(s[mt][nt][2 * hf] * mul - shift);
                    s[mt][nt][2 * hf + 1] = fast_exp2(s[mt][nt][2 * hf + 1] * mul - shift);
                    sum += s[mt][nt][2 * hf] + s[mt][nt][2 * hf + 1];
                }
                l[mt][hf] = l[mt][hf] * corr + sum;
                // Always (rescale's vote skipping it spills the d128 f16 kernel on sm_80).
#pragma unroll
                for (int i = 0; i < D / 8; i++) {
                    o[mt][i][2 * hf] *= corr;
                    o[mt][i][2 * hf + 1] *= corr;
                }
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // V of this tile landed; every warp is done with this K
        if (kb + KEYS < keys_end) {
            stage_keys(ks, k, kb + KEYS);
            cp_async_commit();
        }

        // O += P V, 16 keys at a time: S tiles 2 kt and 2 kt + 1 are P's A fragment; V's B fragments
        // for 16 dims (two 8-dim tiles) come from one transposing ldmatrix.
#pragma unroll
        for (int kt = 0; kt < KEYS / 16; kt++) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) p_fragment(pa[mt], s[mt], kt, BF16);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                u32 vf[4];
                ldmatrix_x4<true>(vf, vs + swz<D>(kt * 16 + (mi & 1) * 8 + mj, dp * 2 + (mi >> 1)));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma16816(o[mt][2 * dp], pa[mt], vf[0], vf[1], BF16);
                    mma16816(o[mt][2 * dp + 1], pa[mt], vf[2], vf[3], BF16);
                }
            }
        }
    }

#pragma unroll
    for (int mt = 0; mt < MT; mt++) store_rows(out, o[mt], l[mt], (warp * MT + mt) * 16, rows, q0, hq, h, BF16);
}

#define FLASH_ONE(dim, s, bf16)                                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * FA##dim##_WARPS)                                             \
        flash_attn_d##dim##_##s(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles,              \
                                const u32* table, u32 block_size, u32 hq, u32 hkv, float scale_log2, u32 window,   \
                                float softcap, float alibi) {                                                      \
        DYNAMIC_SHARED(u16, smem);                                                                                 \
        KeyAddr addr = {table, block_size};                                                                        \
        ScoreMods mods = {window, softcap, alibi};                                                                 \
        flash_attn<dim, FA##dim##_WARPS, FA##dim##_MT, FA##dim##_KEYS, bf16>(out, q, k, v, tiles, addr, hq, hkv,  \
                                                                            scale_log2, mods, smem);               \
    }
#define FLASH(dim) FLASH_ONE(dim, bf16, true) FLASH_ONE(dim, f16, false)
FLASH(64)
FLASH(128)

// ---- Prefill on Hopper's warpgroup MMA (sm_90a) ----
//
// flash_attn_wg_d{64,128}_{f16,bf16}: the same op as flash_attn (same arguments, tiles and masks),
// with wgmma instead of mma.sync: a block of WGS warpgroups takes 64 WGS query rows, each warpgroup
// 64 of them (each warp 16, in the same fragments as flash_attn's, so the softmax is shared). S = Q K^T
// reads Q and K straight from shared memory (no ldmatrix, no registers for the operands); O += P V
// takes P from registers (the S accumulators rounded, FlashAttention-3's trick) and V from shared
// memory N-major. Tiles are laid out as wgmma's 128-byte swizzle wants them (swz_wg) by cp.async, V
// of a tile copied while S is computed and K of the next while P V is. Not yet FlashAttention-3's
// whole design (a producer warp with TMA, softmax overlapped with the next tile's matrix products);
// opt-in from the host (HIGHRISE_FLASH_KERNEL=wgmma) until a GPU has checked and timed it.
#ifdef HIGHRISE_WGMMA
#ifndef FH64_WGS
#define FH64_WGS 2
#endif
#ifndef FH64_KEYS
#define FH64_KEYS 128
#endif
#ifndef FH128_WGS
#define FH128_WGS 2
#endif
#ifndef FH128_KEYS
#define FH128_KEYS 128
#endif

// The warpgroup's two products, queued and committed (not waited for), as the Hopper kernels and
// wgmma_probe run them. S (64 x KEYS) = Q K^T over D dims, 16 a step: Q's 64 rows at qaddr inside a
// swz_wg tile of qrows rows (block kk / 4 of 64 dims, 32 bytes further into its rows per step), K's
// KEYS rows at kaddr, both K-major.
template <int D, int KEYS, bool BF16>
__device__ __forceinline__ void wg_qk(float (&s)[KEYS / 8][4], u32 qaddr, u32 qrows, u32 kaddr) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const u64 da = wgmma_desc(qaddr + (kk / 4) * qrows * 128 + (kk % 4) * 32, 16, 1024);
        const u64 db = wgmma_desc(kaddr + (kk / 4) * KEYS * 128 + (kk % 4) * 32, 16, 1024);
        wgmma_ss<KEYS, BF16>(&s[0][0], da, db, kk > 0);
    }
    wgmma_commit();
}

// O (64 x D) += P V over 16 keys a step: P from registers (p_fragment's), V's rows 16 kt .. as K, its D
// dims as N (N-major; 64-dim blocks KEYS * 128 bytes apart).
template <int D, int KEYS, bool BF16>
__device__ __forceinline__ void wg_pv(float (&o)[D / 8][4], const u32 (&pa)[KEYS / 16][4], u32 vaddr) {
#pragma unroll
    for (int kt = 0; kt < KEYS / 16; kt++) wgmma_rs_t<D, BF16>(&o[0][0], pa[kt], wgmma_desc(vaddr + kt * 16 * 128, KEYS * 128, 1024), 1);
    wgmma_commit();
}

template <int D, int WGS, int KEYS, bool BF16, bool PIPE>
__device__ void flash_attn_wg(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles, KeyAddr addr, u32 hq,
                              u32 hkv, float scale_log2, ScoreMods mods, u16* smem_raw) {
    constexpr u32 ROWS = 64 * WGS, THREADS = 128 * WGS, NT = KEYS / 8, DT = D / 8;
    static_assert(KEYS % 16 == 0 && KEYS <= 256 && (D == 64 || D == 128), "wgmma shapes");
    // The swizzle repeats every 1024 bytes, from a 1024-byte boundary (the host adds 1024 bytes).
    u16* qs = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023) / 2;  // [ROWS][D] as swz_wg
    u16* ks = qs + ROWS * D;                                                    // [KEYS][D]
    u16* vs = ks + KEYS * D;                                                    // [KEYS][D]
    // PIPE: a second K and V tile (tile j's at [j % 2]).
    u16* ks1 = vs + KEYS * D;
    u16* vs1 = ks1 + KEYS * D;
    const u32 tile = blockIdx.x, h = blockIdx.y, g = h / (hq / hkv);
    const u32 q0 = tiles[5 * tile], rows = tiles[5 * tile + 1], pos0 = tiles[5 * tile + 2], kbase = tiles[5 * tile + 3];
    const u32 keys_end = tiles[5 * tile + 4];
    const u32 warp = threadIdx.x >> 5, wg = warp / 4;

    stage_rows<D, THREADS, ROWS, true>(qs, q, threadIdx.x, [&](u32 r) { return (long long)(((u64)(q0 + min(r, rows - 1)) * hq + h) * D); });
    auto stage_keys = [&](u16* dst, const u16* src, u32 kb) {
        stage_rows<D, THREADS, KEYS, true>(dst, src, threadIdx.x, [&](u32 r) {
            return kb + r < keys_end ? (long long)addr.at(kbase, kb + r, g, hkv, D) : -1LL;
        });
    };
    const u32 kb0 = mods.first(pos0 + 1) / KEYS * KEYS;
    stage_keys(ks, k, kb0);
    cp_async_commit();
    const ScoreMods::Log2Cap cap = softmax_cap(mods, scale_log2);
    const float alibi = mods.alibi_coef(h, hq, scale_log2);

    float o[DT][4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    const u32 qa = smem_u32(qs) + wg * 64 * 128, ka = smem_u32(ks), va = smem_u32(vs);
    // S = Q K^T over 16 dims a step: block kk / 4 of 64 dims, 32 bytes further into its rows per step.
    auto issue_s = [&](float (&s)[NT][4], u32 kaddr) { wg_qk<D, KEYS, BF16>(s, qa, ROWS, kaddr); };
    auto issue_pv = [&](const u32 (&pa)[KEYS / 16][4], u32 vaddr) { wg_pv<D, KEYS, BF16>(o, pa, vaddr); };
    auto softmax = [&](float (&s)[NT][4], float (&corr)[2], u32 kb) {
        cap_tile(s, mods, cap);
        if (alibi != 0.0f) bias_tile(s, kb, pos0, alibi);
        softmax_tile(s, corr, m, l, warp * 16, kb, tile_masked(kb, KEYS, keys_end, pos0, rows, mods), pos0, rows, keys_end, mods, cap);
    };

    if constexpr (PIPE) {
        // FlashAttention-3's overlap within a warpgroup: tile j's S = Q K^T and tile j-1's O += P V in
        // flight together, the softmax of tile j while P V runs. Tile j's K and V are staged a step
        // ahead into buffers [j % 2], each overwritten only after a barrier that follows every
        // warpgroup's wait on the product that read it.
        const u32 ka1 = smem_u32(ks1), va1 = smem_u32(vs1);
        stage_keys(vs, v, kb0);
        cp_async_commit();
        if (kb0 + KEYS < keys_end) stage_keys(ks1, k, kb0 + KEYS);
        cp_async_commit();
        cp_async_wait<2>();
        fence_proxy_async();
        __syncthreads();  // Q and K of tile 0 landed
        float s[NT][4], corr[2];
        u32 pa[KEYS / 16][4];
        wgmma_fence();
        issue_s(s, ka);
        wgmma_wait<0>();
        softmax(s, corr, kb0);
#pragma unroll
        for (int kt = 0; kt < KEYS / 16; kt++) p_fragment(pa[kt], s, kt, BF16);
        u32 j = 1;
        for (u32 kb = kb0 + KEYS; kb < keys_end; kb += KEYS, j++) {
            const bool odd = j & 1;
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();  // K of tile j, V of tile j-1 landed; every warpgroup is past tile j-1's S and j-2's P V
            stage_keys(odd ? vs1 : vs, v, kb);
            cp_async_commit();
            if (kb + KEYS < keys_end) stage_keys(odd ? ks : ks1, k, kb + KEYS);
            cp_async_commit();
            wgmma_fence();
            issue_s(s, odd ? ka1 : ka);
            issue_pv(pa, odd ? va : va1);
            wgmma_wait<1>();  // S of tile j (P V of tile j-1 may still run: o and pa are untouched)
            softmax(s, corr, kb);
            wgmma_wait<0>();
            rescale(o, corr);
#pragma unroll
            for (int kt = 0; kt < KEYS / 16; kt++) p_fragment(pa[kt], s, kt, BF16);
        }
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // V of the last tile landed
        wgmma_fence();
        issue_pv(pa, (j - 1) & 1 ? va1 : va);
        wgmma_wait<0>();
        store_rows(out, o, l, warp * 16, rows, q0, hq, h, BF16);
        return;
    }

    for (u32 kb = kb0; kb < keys_end; kb += KEYS) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // K of this tile (and Q) landed, visible to wgmma; every warpgroup is done with the last V
        stage_keys(vs, v, kb);
        cp_async_commit();

        float s[NT][4], corr[2];
        wgmma_fence();
        issue_s(s, ka);
        wgmma_wait<0>();
        softmax(s, corr, kb);
        rescale(o, corr);

        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // V of this tile landed; every warpgroup is done with this K
        if (kb + KEYS < keys_end) {
            stage_keys(ks, k, kb + KEYS);
            cp_async_commit();
        }

        u32 pa[KEYS / 16][4];
#pragma unroll
        for (int kt = 0; kt < KEYS / 16; kt++) p_fragment(pa[kt], s, kt, BF16);
        wgmma_fence();
        issue_pv(pa, va);
        wgmma_wait<0>();
    }
    store_rows(out, o, l, warp * 16, rows, q0, hq, h, BF16);
}

// flash_attn_wg_*: each product waited for before the next step; flash_attn_wgp_*: pipelined (PIPE).
#define FLASH_WG_ONE(name, pipe, dim, s, bf16)                                                                     \
    extern "C" __global__ void __launch_bounds__(128 * FH##dim##_WGS, 1)                                           \
        name##_d##dim##_##s(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles,                   \
                            const u32* table, u32 block_size, u32 hq, u32 hkv, float scale_log2, u32 window,        \
                            float softcap, float alibi) {                                                          \
        DYNAMIC_SHARED(u16, smem);                                                                                 \
        KeyAddr addr = {table, block_size};                                                                        \
        ScoreMods mods = {window, softcap, alibi};                                                                 \
        flash_attn_wg<dim, FH##dim##_WGS, FH##dim##_KEYS, bf16, pipe>(out, q, k, v, tiles, addr, hq, hkv,        \
                                                                     scale_log2, mods, smem);                      \
    }
#define FLASH_WG(dim)                                                                                              \
    FLASH_WG_ONE(flash_attn_wg, false, dim, bf16, true)                                                            \
    FLASH_WG_ONE(flash_attn_wg, false, dim, f16, false)                                                            \
    FLASH_WG_ONE(flash_attn_wgp, true, dim, bf16, true)                                                            \
    FLASH_WG_ONE(flash_attn_wgp, true, dim, f16, false)
FLASH_WG(64)
FLASH_WG(128)

// ---- Prefill, Hopper, warp-specialized (FlashAttention-3's design): flash_attn_ws_* ----
//
// CONS + 1 warpgroups a block of 64 CONS query rows (CONS consumers: 2, or 3 at d64). Warpgroup 0 is the producer: it gives back registers
// (setmaxnreg.dec) and only copies, Q once and then each KEYS-key tile's K and V into a ring of
// STAGES stages, after waiting on the stage's "free" mbarrier for the consumers to be done with what
// it held: from contiguous K and V ([tokens, kv heads, D]) by the tensor memory accelerator, one
// thread issuing a box of KEYS rows x 64 dims per 64 dims by the tensor maps `kmap` and `vmap`
// (their bytes counted on the stage's "full" mbarrier; rows past the tensor land as zeros, rows of
// the next sequence are masked); through the block table (maps null) by cp.async, the table
// resolved row by row, rows past the keys zeros, each thread's copies completing on the full
// mbarrier as one arrival (cp.async.mbarrier.arrive.noinc). Warpgroups 1 and 2 are
// the consumers, 64 rows each, with the registers the producer gave back: no copies, no block-wide
// barrier, each at its own pace. Within one, tile j's S = Q K^T and tile j-1's O += P V are in flight
// together and tile j's softmax runs under P V (as flash_attn_wgp); between the two, named barriers
// take turns issuing the products (ping-pong, round robin with three), so one's softmax (exp2 on the
// multi-function unit, ~1 per 256 tensor-core flops at d128) runs while another's products keep the
// tensor cores busy. The turns balance: the last consumer opens the first's turn once before it
// starts and skips its last hand-over, so every bar.sync meets exactly one bar.arrive. By TMA only
// the producer's first warp stays (its first thread issues); the others leave once Q is copied.
#ifndef FS64_CONS
#define FS64_CONS 2
#endif
#ifndef FS64_KEYS
#define FS64_KEYS 128
#endif
#ifndef FS64_STAGES
#define FS64_STAGES 3
#endif
#ifndef FS128_CONS
#define FS128_CONS 2
#endif
#ifndef FS128_KEYS
#define FS128_KEYS 128
#endif
#ifndef FS128_STAGES
#define FS128_STAGES 2
#endif
// Registers a thread (setmaxnreg): the producer gives back all but what copying needs; the
// consumers share the rest (launched at 65536 / threads: 168 with two consumers, 128 with three).
template <int CONS>
struct WsRegs;
template <>
struct WsRegs<2> {
    static constexpr u32 producer = 40, consumer = 232;  // 128 x 40 + 256 x 232 = 64512
};
template <>
struct WsRegs<3> {
    static constexpr u32 producer = 32, consumer = 160;  // 128 x 32 + 384 x 160 = 65536 (24 spilled the producer)
};

template <int D, int KEYS, int STAGES, int CONS, bool BF16>
__device__ void flash_attn_ws(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles, KeyAddr addr, u32 hq,
                              u32 hkv, float scale_log2, ScoreMods mods, const void* kmap, const void* vmap, u16* smem_raw) {
    constexpr u32 ROWS = 64 * CONS, NT = KEYS / 8, DT = D / 8, TILE = KEYS * D;
    static_assert(KEYS % 16 == 0 && KEYS <= 256 && (D == 64 || D == 128) && STAGES >= 2 && (CONS == 2 || CONS == 3), "wgmma shapes");
    u16* qs = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023) / 2;  // [ROWS][D] as swz_wg
    u16* ks = qs + ROWS * D;                                                    // STAGES x [KEYS][D]
    u16* vs = ks + STAGES * TILE;                                               // STAGES x [KEYS][D]
    __shared__ u64 bars[1 + 4 * STAGES];
    u64 *q_full = bars, *k_full = bars + 1, *v_full = k_full + STAGES, *k_free = v_full + STAGES, *v_free = k_free + STAGES;
    const u32 tile = blockIdx.x, h = blockIdx.y, g = h / (hq / hkv);
    const u32 q0 = tiles[5 * tile], rows = tiles[5 * tile + 1], pos0 = tiles[5 * tile + 2], kbase = tiles[5 * tile + 3];
    const u32 keys_end = tiles[5 * tile + 4];
    const u32 kb0 = mods.first(pos0 + 1) / KEYS * KEYS, n = (keys_end - kb0 + KEYS - 1) / KEYS;
    const u32 wg = threadIdx.x / 128;
    const bool tma = kmap != nullptr;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 128);
        for (u32 s = 0; s < STAGES; s++) {
            mbar_init(k_full + s, tma ? 1 : 128);  // the issuing thread's bytes, or each producer thread's copies
            mbar_init(v_full + s, tma ? 1 : 128);
            mbar_init(k_free + s, 128 * CONS);  // each consumer thread, done with the stage
            mbar_init(v_free + s, 128 * CONS);
        }
    }
    __syncthreads();  // the barriers are initialized before anyone uses them

    if (wg == 0) {
        setmaxnreg<WsRegs<CONS>::producer, false>();
        const u32 t = threadIdx.x;
        stage_rows<D, 128, ROWS, true>(qs, q, t, [&](u32 r) { return (long long)(((u64)(q0 + min(r, rows - 1)) * hq + h) * D); });
        cp_async_mbar_arrive(q_full);
        if (tma && t >= 32) {
            cp_async_wait<0>();  // its part of Q landed; the first warp goes on
            return;
        }
        if (tma && t == 0) {
            tma_map_acquire(kmap);
            tma_map_acquire(vmap);
        }
        // A tile into stage s: by TMA (thread 0: [64 dims][KEYS rows] boxes, swz_wg's blocks) or cp.async.
        const auto load = [&](u16* dst, const u16* src, const void* map, u64* full, u32 kb) {
            if (tma) {
                if (t == 0) {
                    mbar_arrive_expect(full, TILE * 2);
                    for (u32 c = 0; c < D / 64; c++) tma_load_3d(dst + c * KEYS * 64, map, full, (int)(c * 64), (int)g, (int)(kbase + kb));
                }
                return;
            }
            stage_rows<D, 128, KEYS, true>(dst, src, t, [&](u32 r) { return kb + r < keys_end ? (long long)addr.at(kbase, kb + r, g, hkv, D) : -1LL; });
            cp_async_mbar_arrive(full);
        };
        for (u32 j = 0; j < n; j++) {
            const u32 s = j % STAGES, kb = kb0 + j * KEYS, free_parity = (j / STAGES + 1) & 1;
            if (j >= STAGES) mbar_wait(k_free + s, free_parity);  // every consumer is past tile j - STAGES's S
            load(ks + s * TILE, k, kmap, k_full + s, kb);
            if (j >= STAGES) mbar_wait(v_free + s, free_parity);  // and its P V
            load(vs + s * TILE, v, vmap, v_full + s, kb);
        }
        cp_async_wait<0>();  // not gone while its copies are in flight
        return;
    }

    setmaxnreg<WsRegs<CONS>::consumer, true>();
    const u32 cw = wg - 1, r0 = ((threadIdx.x >> 5) - 4) * 16;  // consumer 0 .. CONS - 1; its warp's first row in the tile
    const ScoreMods::Log2Cap cap = softmax_cap(mods, scale_log2);
    const float alibi = mods.alibi_coef(h, hq, scale_log2);
    float o[DT][4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    const u32 qa = smem_u32(qs) + cw * 64 * 128, ka = smem_u32(ks), va = smem_u32(vs);
    auto softmax = [&](float (&s)[NT][4], float (&corr)[2], u32 kb) {
        cap_tile(s, mods, cap);
        if (alibi != 0.0f) bias_tile(s, kb, pos0, alibi);
        softmax_tile(s, corr, m, l, r0, kb, tile_masked(kb, KEYS, keys_end, pos0, rows, mods), pos0, rows, keys_end, mods, cap);
    };
    // Turns: barrier 1 + c is consumer c's turn to issue products; it hands the turn to the next
    // after (its 128 threads arrive, the next's 128 sync).
    const auto take_turn = [&] { named_bar_sync(1 + cw, 256); };
    const auto hand_over = [&](bool last) {
        if (cw != CONS - 1 || !last) named_bar_arrive(1 + (cw + 1) % CONS, 256);
    };
    // Waits for a full stage, then reads it through the async proxy.
    const auto wait_full = [&](u64* bar, u32 j) {
        mbar_wait(bar + j % STAGES, (j / STAGES) & 1);
        fence_proxy_async();
    };

    mbar_wait(q_full, 0);
    if (cw == CONS - 1) named_bar_arrive(1, 256);  // the first turn is consumer 0's
    float s[NT][4], corr[2];
    u32 pa[KEYS / 16][4];
    wait_full(k_full, 0);
    take_turn();
    wgmma_fence();
    wg_qk<D, KEYS, BF16>(s, qa, ROWS, ka);
    hand_over(false);
    wgmma_wait<0>();
    mbar_arrive_expect(k_free, 0);
    softmax(s, corr, kb0);
#pragma unroll
    for (int kt = 0; kt < KEYS / 16; kt++) p_fragment(pa[kt], s, kt, BF16);
    for (u32 j = 1; j < n; j++) {
        const u32 sj = j % STAGES, sp = (j - 1) % STAGES;
        wait_full(k_full, j);
        wait_full(v_full, j - 1);
        take_turn();
        wgmma_fence();
        wg_qk<D, KEYS, BF16>(s, qa, ROWS, ka + sj * TILE * 2);
        wg_pv<D, KEYS, BF16>(o, pa, va + sp * TILE * 2);
        hand_over(false);
        wgmma_wait<1>();  // S of tile j (P V of tile j-1 may still run: o and pa are untouched)
        mbar_arrive_expect(k_free + sj, 0);
        softmax(s, corr, kb0 + j * KEYS);
        wgmma_wait<0>();
        mbar_arrive_expect(v_free + sp, 0);
        rescale(o, corr);
#pragma unroll
        for (int kt = 0; kt < KEYS / 16; kt++) p_fragment(pa[kt], s, kt, BF16);
    }
    wait_full(v_full, n - 1);
    take_turn();
    wgmma_fence();
    wg_pv<D, KEYS, BF16>(o, pa, va + ((n - 1) % STAGES) * TILE * 2);
    hand_over(true);
    wgmma_wait<0>();
    store_rows(out, o, l, r0, rows, q0, hq, h, BF16);
}

#define FLASH_WS_ONE(dim, s, bf16)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128 * (FS##dim##_CONS + 1), 1)                                    \
        flash_attn_ws_d##dim##_##s(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles,            \
                                   const u32* table, u32 block_size, u32 hq, u32 hkv, float scale_log2, u32 window, \
                                   float softcap, float alibi, const void* kmap, const void* vmap) {               \
        DYNAMIC_SHARED(u16, smem);                                                                                 \
        KeyAddr addr = {table, block_size};                                                                        \
        ScoreMods mods = {window, softcap, alibi};                                                                 \
        flash_attn_ws<dim, FS##dim##_KEYS, FS##dim##_STAGES, FS##dim##_CONS, bf16>(out, q, k, v, tiles, addr, hq,   \
                                                                                  hkv, scale_log2, mods, kmap, vmap, \
                                                                                  smem);                             \
    }
FLASH_WS_ONE(64, bf16, true)
FLASH_WS_ONE(64, f16, false)
FLASH_WS_ONE(128, bf16, true)
FLASH_WS_ONE(128, f16, false)

// wgmma as the Hopper kernels use it, alone: one warpgroup stages Q (64 x D), K and V (128 x D) as they
// do, runs s = Q K^T (wg_qk), then o = P V (wg_pv) with P = s rounded to the dtype, and writes both in
// f32, row-major: s [64][128], o [64][D]. The host holds them to a plain matrix product
// (highrise_cuda::wgmma_check), so that a GPU run tells which of the two products, and which elements,
// a wrong reading of the ISA (layouts, descriptors, swizzle) would break.
template <int D, bool BF16>
__device__ void wgmma_probe(float* s_out, float* o_out, const u16* q, const u16* k, const u16* v, u16* smem_raw) {
    constexpr u32 KEYS = 128, NT = KEYS / 8, DT = D / 8;
    u16* qs = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023) / 2;
    u16* ks = qs + 64 * D;
    u16* vs = ks + KEYS * D;
    const auto rows = [](u32 r) { return (long long)r * D; };
    stage_rows<D, 128, 64, true>(qs, q, threadIdx.x, rows);
    stage_rows<D, 128, KEYS, true>(ks, k, threadIdx.x, rows);
    stage_rows<D, 128, KEYS, true>(vs, v, threadIdx.x, rows);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    const u32 lane = threadIdx.x & 31, r = (threadIdx.x >> 5) * 16 + (lane >> 2), c = 2 * (lane & 3);
    float s[NT][4];
    wgmma_fence();
    wg_qk<D, KEYS, BF16>(s, smem_u32(qs), 64, smem_u32(ks));
    wgmma_wait<0>();
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
        for (int e = 0; e < 4; e++) s_out[(r + 8 * (e / 2)) * KEYS + nt * 8 + c + e % 2] = s[nt][e];
    u32 pa[KEYS / 16][4];
#pragma unroll
    for (int kt = 0; kt < KEYS / 16; kt++) p_fragment(pa[kt], s, kt, BF16);
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    wgmma_fence();
    wg_pv<D, KEYS, BF16>(o, pa, smem_u32(vs));
    wgmma_wait<0>();
#pragma unroll
    for (int dt = 0; dt < DT; dt++)
        for (int e = 0; e < 4; e++) o_out[(r + 8 * (e / 2)) * D + dt * 8 + c + e % 2] = o[dt][e];
}
#define WGMMA_PROBE(dim, s, bf16)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                           \
        wgmma_probe_d##dim##_##s(float* s_out, float* o_out, const u16* q, const u16* k, const u16* v) {           \
        DYNAMIC_SHARED(u16, smem);                                                                                 \
        wgmma_probe<dim, bf16>(s_out, o_out, q, k, v, smem);                                                       \
    }
WGMMA_PROBE(64, bf16, true)
WGMMA_PROBE(64, f16, false)
WGMMA_PROBE(128, bf16, true)
WGMMA_PROBE(128, f16, false)

// TMA alone (crates/highrise-cuda/src/tma.rs): one thread copies the box of 64 rows from `row0` of
// head `head` by the tensor map at `map` (a [rows, heads, D] tensor of 16-bit elements, boxes of 64
// elements x 1 head x 64 rows, the 128-byte swizzle), D / 64 copies counted on one mbarrier; every
// thread waits for its phase, then the block writes shared memory out as it lies, to be held to the
// layout the wgmma kernels read (swz_wg).
template <int D>
__device__ void tma_probe(u16* out, const void* map, u32 row0, u32 head, u16* smem_raw) {
    constexpr u32 ROWS = 64;
    u16* tile = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023) / 2;
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        tma_map_acquire(map);
        mbar_init(&bar, 1);
    }
    __syncthreads();  // the barrier is initialized before anyone waits on it
    if (threadIdx.x == 0) {
        mbar_arrive_expect(&bar, ROWS * D * 2);
        for (u32 j = 0; j < D / 64; j++) tma_load_3d(tile + j * ROWS * 64, map, &bar, (int)(j * 64), (int)head, (int)row0);
    }
    mbar_wait(&bar, 0);
    for (u32 i = threadIdx.x; i < ROWS * D; i += blockDim.x) out[i] = tile[i];
}

#define TMA_PROBE(dim)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1) tma_probe_d##dim(u16* out, const void* map, u32 row0, u32 head) { \
        DYNAMIC_SHARED(u16, smem);                                                                            \
        tma_probe<dim>(out, map, row0, head, smem);                                                           \
    }
TMA_PROBE(64)
TMA_PROBE(128)
#endif  // HIGHRISE_WGMMA

// ---- Decode on tensor cores (sm_80+): a KV head's whole query group against the paged cache ----
//
// Block (sequence, KV head, slice of the context): the group's query heads of each of the
// sequence's new tokens (q_len x group <= 16 rows: a decode step, or a few tokens of speculative
// decoding) are the 16 rows of one mma.sync A operand, so every K and V row is read once for the
// whole group, by 16-byte cp.async copies into shared memory. The DA_WARPS warps take 16-key chunks
// of the slice in turn, each through its own pipeline of DA_STAGES stages (the next chunks in flight
// while this one is used; warp-private, so no block-wide barrier inside the loop), each with its
// own online softmax; at the end the warps' states are merged and the slice's partial state
// (acc[D], m, l, as attn_split writes it) goes to `partial`, and the last block of the (sequence,
// KV head) to finish merges them into `out` (decode_merge; with null counters the host launches
// attn_combine for that instead). The host picks the number of slices from the batch's size alone
// (enough that one sequence fills the GPU); each sequence cuts its own context into that many, no
// slice shorter than a chunk per warp, so the grid never depends on context lengths. Slices past a
// short context find no keys and leave at once (no state, no count: the merge counts and reads
// only the slices with keys), and where one slice holds the whole context it writes the output
// itself: a decode step at short contexts (a chat's first hundreds of tokens: one to a few slices
// with keys of the 48 a batch of one gets on an H200) skips the merge's round trips.
// seqs[4 i .. 4 i + 4]: the sequence's first query row, its new tokens, its context length (new
// tokens included), its offset into the block table. Warps and stages are compile-time
// (-DDA_WARPS, -DDA_STAGES: crates/highrise-cuda/src/flash.rs's decode shapes).

#define DA_KEYS 16  // keys per warp per step
#ifndef DA_WARPS
#define DA_WARPS 4
#endif
#ifndef DA_STAGES
#define DA_STAGES 2
#endif

// The blocks an SM is to hold (`__launch_bounds__`' second argument): as many as its shared memory
// takes (228 KiB on Hopper, 164 on an A100; 1 KiB reserved per block), and no more than leave each
// thread 168 registers (the d128 kernel's need without spilling, 4 warps at 3 blocks). Left to
// itself ptxas gave the d128 kernel 199 registers, which held an SM to 2 blocks of 4 warps where
// shared memory holds 3 at 2 stages: a third fewer copies in flight in a kernel bound by them.
template <int D>
struct DecodeBlocks {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    static constexpr int SM_SHARED = 228 * 1024;
#else
    static constexpr int SM_SHARED = 164 * 1024;
#endif
    static constexpr int BY_SHARED = SM_SHARED / (D * (16 + DA_WARPS * DA_STAGES * 2 * 16) * 2 + 1024);
    static constexpr int BY_REGISTERS = 65536 / (32 * DA_WARPS * 168);
    static constexpr int MIN = BY_SHARED < BY_REGISTERS ? (BY_SHARED > 1 ? BY_SHARED : 1) : BY_REGISTERS;
};

// The slices' merge, by the block of a (sequence, KV head) that finishes last, where a launch of
// its own (attn_combine) would add a kernel to every layer of a decode step: each block with keys
// writes its slice's partial state, makes it visible (__threadfence) and counts it on
// counters[sequence, KV head]; the block that counts the last of the `active` slices (those with
// keys: the first ones, decode_slice) reads their states back and writes the rows' outputs
// (merge_slices: attn_combine's sums, in its order; the slices past the context, which it would
// skip, are never written or counted), and sets the count back to 0 for the next launch (a graph's
// replays included). The block's rows (its sequence's new tokens x its group's query heads, at
// most 16) are rows of out [T x hq, D] and of partial [T x hq, splits, D + 2]; splits at most
// DECODE_SPLITS_MAX (their maxima and sums go to `smem`). Called by the kernel after decode_attn,
// its arguments read again there, not held through the key loop.
#define DECODE_SPLITS_MAX 64

template <int D, bool BF16>
__device__ void decode_merge(u16* out, const float* partial, u32* counters, const u32* seqs, u32 hq, u32 hkv, u32 active, float* smem) {
    const u32 q0 = seqs[4 * blockIdx.x], group = hq / hkv, rows = seqs[4 * blockIdx.x + 1] * group, g = blockIdx.y, splits = gridDim.z;
    auto row_of = [=](u32 r) { return (q0 + r / group) * hq + g * group + r % group; };
    __shared__ u32 last;
    __threadfence();  // this thread's part of the state, before the count
    __syncthreads();  // every thread's (and every read of shared memory done)
    if (threadIdx.x == 0) {
        u32* count = counters + blockIdx.x * gridDim.y + blockIdx.y;
        last = atomicAdd(count, 1u) == active - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();  // the other blocks' states, seen after their counts
    float *sm = smem, *sl = smem + 16 * DECODE_SPLITS_MAX;  // [row][active slice]
    for (u32 i = threadIdx.x; i < rows * active; i += blockDim.x) {
        const float* p = partial + ((u64)row_of(i / active) * splits + i % active) * (D + 2);
        sm[i] = __ldcg(p + D);
        sl[i] = __ldcg(p + D + 1);
    }
    __syncthreads();
    for (u32 i = threadIdx.x; i < rows * D; i += blockDim.x) {
        const u32 r = i / D, x = i % D;
        const u64 row = row_of(r);
        const float v = merge_slices(partial + row * splits * (D + 2), D, x, active, sm + r * active, sl + r * active);
        out[row * D + x] = BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

// Slice `sl` of `splits` of a sequence's context (ctx keys, the last q_len of them new): the keys
// [begin, end) it takes, and how many of the slices have keys at all (`active`: the first ones; a
// context shorter than the grid's slices leaves the rest empty). Whole 16-key chunks, at least one
// chunk per warp; from the sequence alone, so the grid never depends on the contexts (what a CUDA
// graph replayed step after step needs).
struct DecodeSlice {
    u32 begin, end, active;
};
__device__ __forceinline__ DecodeSlice decode_slice(u32 ctx, u32 q_len, ScoreMods mods, u32 sl, u32 splits) {
    const u32 lo = mods.first(ctx - q_len + 1), span = ctx - lo;
    const u32 split_len = max((span + splits * DA_KEYS - 1) / (splits * DA_KEYS) * DA_KEYS, (u32)(DA_WARPS * DA_KEYS));
    const u32 begin = min(ctx, lo + sl * split_len);
    return {begin, min(ctx, begin + split_len), (span + split_len - 1) / split_len};
}

// The block's slice of the keys, its warps' states left merged-ready in shared memory
// (decode_finish goes on from there); false, with nothing done, where the slice has no keys.
// With a sliding window the slices cut only the keys some row sees (from the first row's window
// start), and each row masks the keys before its own; soft-capped scores as flash_attn caps them, and
// ALiBi's bias added after as flash_attn adds it (a slope per row: the rows span the group's heads).
template <int D, bool BF16>
__device__ bool decode_attn(const u16* q, const u16* kc, const u16* vc, const u32* seqs, KeyAddr addr, u32 hq, u32 hkv,
                            float scale_log2, ScoreMods mods, u16* smem) {
    const u32 sq = blockIdx.x, g = blockIdx.y, sl = blockIdx.z, splits = gridDim.z;
    const u32 q0 = seqs[4 * sq], q_len = seqs[4 * sq + 1], ctx = seqs[4 * sq + 2], kbase = seqs[4 * sq + 3];
    const u32 group = hq / hkv, rows = q_len * group;  // rows <= 16 (the host's condition)
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, quad = lane & 3;
    const u32 mi = lane >> 3, mj = lane & 7;

    const DecodeSlice slice = decode_slice(ctx, q_len, mods, sl, splits);
    const u32 begin = slice.begin, end = slice.end;
    const u32 chunks = end > begin ? (end - begin + DA_KEYS - 1) / DA_KEYS : 0;
    if (chunks == 0) return false;  // past the context
    u16* qs = smem;                                                  // [16][D]
    u16* ws = smem + 16 * D + warp * DA_STAGES * 2 * DA_KEYS * D;  // this warp's [stages][K, V][DA_KEYS][D]

    // Row r: token q0 + r / group, query head g * group + r % group; zeros past the rows.
    stage_rows<D, 32 * DA_WARPS, 16>(qs, q, threadIdx.x, [&](u32 r) {
        return r < rows ? (long long)(((u64)(q0 + r / group) * hq + g * group + r % group) * D) : -1LL;
    });
    cp_async_commit();
    // A chunk's K and V rows share their sources. A whole chunk within one block of the cache
    // (every chunk but a context's last, where blocks hold a multiple of 16 tokens and no window
    // shifts the slices) has its rows one after another: one block-table lookup for the 16. Else a
    // lookup per row, taken once for K and V (the general path's source arithmetic, a division and
    // a dependent load per row, was most of the loop's instructions where a chunk is 8 KiB).
    auto stage_chunk = [&](u32 c, u32 stage) {
        const u32 k0 = begin + c * DA_KEYS;
        u16* kd = ws + stage * 2 * DA_KEYS * D;
        u32 blk, in;
        addr.place(k0, blk, in);
        if (addr.table != 0 && in + DA_KEYS <= addr.block_size && k0 + DA_KEYS <= end) {
            const u64 first = addr.row(kbase, blk, in, g, hkv, D);
            copy_run<D, 32, DA_KEYS>(kd, kc + first, lane);
            copy_run<D, 32, DA_KEYS>(kd + DA_KEYS * D, vc + first, lane);
            return;
        }
        RowSources<D, 32, DA_KEYS> rs;
        row_sources(rs, lane, [&](u32 r) { return k0 + r < end ? (long long)addr.at(kbase, k0 + r, g, hkv, D) : -1LL; });
        copy_rows(kd, kc, lane, rs);
        copy_rows(kd + DA_KEYS * D, vc, lane, rs);
    };
    // The first DA_STAGES - 1 chunks of this warp in flight, a group each.
#pragma unroll
    for (u32 i = 0; i < DA_STAGES - 1; i++) {
        if (warp + i * DA_WARPS < chunks) stage_chunk(warp + i * DA_WARPS, i);
        cp_async_commit();
    }
    cp_async_wait<DA_STAGES - 1>();
    __syncthreads();  // Q landed, for every warp

    u32 qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) ldmatrix_x4<false>(qa[kk], qs + swz<D>((mi & 1) * 8 + mj, kk * 2 + (mi >> 1)));
    // The last key each held row sees (causal among the new tokens); padding rows see them all.
    const u32 r_lo = lane >> 2, last_lo = ctx - q_len + min(r_lo / group, q_len - 1), last_hi = ctx - q_len + min((r_lo + 8) / group, q_len - 1);
    // The first: its window's.
    const u32 first_lo = mods.first(last_lo + 1), first_hi = mods.first(last_hi + 1);
    const bool capped = mods.softcap > 0.0f;
    const ScoreMods::Log2Cap cap = mods.log2_cap(scale_log2);
    // ALiBi, per held row (its query head), in log2 units: slope times the key's distance from the
    // row's last key.
    const float alibi_lo = mods.slope(g * group + r_lo % group, hq) * 1.4426950408889634f;
    const float alibi_hi = mods.slope(g * group + (r_lo + 8) % group, hq) * 1.4426950408889634f;

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    u32 stage = 0;
    for (u32 c = warp; c < chunks; c += DA_WARPS, stage = stage + 1 == DA_STAGES ? 0 : stage + 1) {
        // The chunk DA_STAGES - 1 ahead goes into the stage used last (every lane is past it).
        const u32 ahead = c + (DA_STAGES - 1) * DA_WARPS;
        if (ahead < chunks) stage_chunk(ahead, stage == 0 ? DA_STAGES - 1 : stage - 1);
        cp_async_commit();
        cp_async_wait<DA_STAGES - 1>();
        __syncwarp();  // this chunk landed, for the whole warp
        const u16* ks = ws + stage * 2 * DA_KEYS * D;
        const u16* vs = ks + DA_KEYS * D;

        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 kf[4];
            ldmatrix_x4<false>(kf, ks + swz<D>((mi >> 1) * 8 + mj, kk * 2 + (mi & 1)));
            mma16816(s[0], qa[kk], kf[0], kf[1], BF16);
            mma16816(s[1], qa[kk], kf[2], kf[3], BF16);
        }
        const u32 k0 = begin + c * DA_KEYS;
        float corr[2];
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const u32 row_last = hf ? last_hi : last_lo, last = min(row_last, end - 1), first = hf ? first_hi : first_lo;
            const float alibi = hf ? alibi_hi : alibi_lo;
            float mx = m[hf];
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& x = s[nt][2 * hf + e];
                    const u32 key = k0 + nt * 8 + 2 * quad + e;
                    const float score = (capped ? cap(x) : x * scale_log2) + alibi * (float)((int)key - (int)row_last);
                    x = key <= last && key >= first ? score : -INFINITY;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row that has seen no key yet (its causal end lies before this chunk) keeps nothing.
            const float ref = mx == -INFINITY ? 0.0f : mx;
            corr[hf] = fast_exp2(m[hf] - ref);
            m[hf] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& x = s[nt][2 * hf + e];
                    x = fast_exp2(x - ref);
                    sum += x;
                }
            l[hf] = l[hf] * corr[hf] + sum;
        }
        rescale(o, corr);  // skipped where no row's maximum moved
        u32 pa[4] = {pack2(s[0][0], s[0][1], BF16), pack2(s[0][2], s[0][3], BF16), pack2(s[1][0], s[1][1], BF16),
                     pack2(s[1][2], s[1][3], BF16)};
#pragma unroll
        for (int dp = 0; dp < D / 16; dp++) {
            u32 vf[4];
            ldmatrix_x4<true>(vf, vs + swz<D>((mi & 1) * 8 + mj, dp * 2 + (mi >> 1)));
            mma16816(o[2 * dp], pa, vf[0], vf[1], BF16);
            mma16816(o[2 * dp + 1], pa, vf[2], vf[3], BF16);
        }
        __syncwarp();  // done with this stage before the next chunk's copies overwrite it
    }
    cp_async_wait<0>();

    // The warps' states: each writes its rows' (m, l, acc) over its stages' memory, for
    // decode_finish to combine per row.
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
        l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
    }
    __syncthreads();  // every warp is done with its stages
    float* wm = (float*)(smem + 16 * D);  // [DA_WARPS][16]
    float* wl = wm + DA_WARPS * 16;       // [DA_WARPS][16]
    float* wo = wl + DA_WARPS * 16;       // [DA_WARPS][16][D]
    if (quad == 0) {
        wm[warp * 16 + r_lo] = m[0];
        wm[warp * 16 + r_lo + 8] = m[1];
        wl[warp * 16 + r_lo] = l[0];
        wl[warp * 16 + r_lo + 8] = l[1];
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) wo[(warp * 16 + r_lo + 8 * (e >> 1)) * D + dt * 8 + 2 * quad + (e & 1)] = o[dt][e];
    __syncthreads();
    return true;
}

// Row r, dimension x of the block's state: its warps' (m, l, acc) in shared memory (decode_attn's
// last step) merged, m in log2 units.
template <int D>
__device__ __forceinline__ void merged_warps(const u16* smem, u32 r, u32 x, float& mm, float& acc, float& sum) {
    const float* wm = (const float*)(smem + 16 * D);  // [DA_WARPS][16]
    const float* wl = wm + DA_WARPS * 16;             // [DA_WARPS][16]
    const float* wo = wl + DA_WARPS * 16;             // [DA_WARPS][16][D]
    mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < DA_WARPS; w++) mm = fmaxf(mm, wm[w * 16 + r]);
    acc = 0.0f, sum = 0.0f;
#pragma unroll
    for (int w = 0; w < DA_WARPS; w++) {
        const float mw = wm[w * 16 + r];
        if (mw == -INFINITY) continue;
        const float scale = fast_exp2(mw - mm);
        acc += wo[(w * 16 + r) * D + x] * scale;
        sum += wl[w * 16 + r] * scale;
    }
}

// After decode_attn (`keys`: whether the slice had any), its arguments read again rather than held
// through the key loop: the slice's partial state (acc, m in natural-log units, l) to `partial`, and
// with `counters` (the kernel's own merge) the count and, by the last, the merge (decode_merge).
// A slice with no keys writes an empty state for attn_combine (which skips it), and with counters
// nothing at all: the merge counts and reads only the `active` slices, those with keys. Where one
// slice has them all (a context shorter than the grid's slices: a chat's first hundreds of tokens
// at batch 1), it writes the rows' outputs itself, as merge_slices would from its state alone
// (each weight e^0 = 1), with no state, count or merge.
template <int D, bool BF16>
__device__ void decode_finish(float* partial, u16* out, u32* counters, const u32* seqs, u32 hq, u32 hkv, ScoreMods mods,
                              bool keys, u16* smem) {
    const u32 sq = blockIdx.x, g = blockIdx.y, sl = blockIdx.z, splits = gridDim.z;
    const u32 q0 = seqs[4 * sq], q_len = seqs[4 * sq + 1], ctx = seqs[4 * sq + 2];
    const u32 group = hq / hkv, rows = q_len * group;
    // Row r: token q0 + r / group, query head g * group + r % group (of out [T x hq, D]).
    auto row_of = [&](u32 r) { return (u64)(q0 + r / group) * hq + g * group + r % group; };
    auto partial_of = [&](u32 r) { return partial + (row_of(r) * splits + sl) * (D + 2); };
    const bool merge = counters != nullptr;
    if (!keys) {
        for (u32 r = threadIdx.x; r < rows && !merge; r += 32 * DA_WARPS) {
            partial_of(r)[D] = -INFINITY;
            partial_of(r)[D + 1] = 0.0f;
        }
        return;
    }
    const u32 active = decode_slice(ctx, q_len, mods, sl, splits).active;
    const bool alone = merge && active == 1;
    const float ln2 = 0.6931471805599453f;
    for (u32 i = threadIdx.x; i < rows * D; i += 32 * DA_WARPS) {
        const u32 r = i / D, x = i % D;
        float mm, acc, sum;
        merged_warps<D>(smem, r, x, mm, acc, sum);
        if (alone) {
            const float v = (0.0f + acc) / (0.0f + sum);
            out[row_of(r) * D + x] = BF16 ? f32_to_bf16(v) : f32_to_f16(v);
            continue;
        }
        float* dst = partial_of(r);
        dst[x] = acc;
        if (x == 0) {
            dst[D] = mm == -INFINITY ? -INFINITY : mm * ln2;  // natural-log units, as attn_split's
            dst[D + 1] = sum;
        }
    }
    if (merge && !alone) decode_merge<D, BF16>(out, partial, counters, seqs, hq, hkv, active, (float*)smem);
}

#define DECODE_ONE(dim, s, bf16)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * DA_WARPS, DecodeBlocks<dim>::MIN)                           \
        decode_attn_d##dim##_##s(float* partial, const u16* q, const u16* k, const u16* v, const u32* seqs,       \
                                 const u32* table, u32 block_size, u32 hq, u32 hkv, float scale_log2, u32 window, \
                                 float softcap, float alibi, u16* out, u32* counters) {                           \
        PDL_ENTRY();                                                                                              \
        DYNAMIC_SHARED(u16, smem);                                                                                \
        KeyAddr addr = {table, block_size};                                                                       \
        ScoreMods mods = {window, softcap, alibi};                                                                \
        const bool keys = decode_attn<dim, bf16>(q, k, v, seqs, addr, hq, hkv, scale_log2, mods, smem);           \
        decode_finish<dim, bf16>(partial, out, counters, seqs, hq, hkv, mods, keys, smem);                        \
    }
#define DECODE(dim) DECODE_ONE(dim, bf16, true) DECODE_ONE(dim, f16, false)
DECODE(64)
DECODE(128)
