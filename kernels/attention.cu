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

// One query row's view of the keys: it sees keys 0..nkeys[t] of its sequence, addressed from
// base[t] (a token row, or an offset into the block table).
struct KeyAddr {
    const u32* table;  // null: contiguous
    u32 block_size;
    // Where head g's row of key j starts, in elements.
    __device__ __forceinline__ u64 at(u32 base, u32 j, u32 g, u32 hkv, u32 d) const {
        if (table == 0) return (((u64)base + j) * hkv + g) * d;
        return (((u64)table[base + j / block_size] * hkv + g) * block_size + j % block_size) * d;
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
        const u64 off = addr.at(kb, j, g, hkv, d);
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

// The same for all the query heads of one KV head at once (grid (t, kv head, slice)): each K and V
// row is read once for the whole group instead of once per query head, which is what bounds decoding
// at long contexts. Groups of up to GROUP_MAX heads, head dims up to 128.
#define GROUP_MAX 8

template <class D, int DPL>
__device__ void attn_group(float* partial, const typename D::T* q, const typename D::T* k, const typename D::T* v,
                           const u32* base, const u32* nkeys, KeyAddr addr, u32 hq, u32 hkv, float scale, u32 split_len) {
    const u32 t = blockIdx.x, g = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 d = DPL * 32, group = hq / hkv;
    const u32 n = nkeys[t], kb = base[t];
    const u32 begin = s * split_len, end = min(n, begin + split_len);

    float qr[GROUP_MAX][DPL], acc[GROUP_MAX][DPL], m[GROUP_MAX], l[GROUP_MAX];
#pragma unroll
    for (int i = 0; i < GROUP_MAX; i++) {
        const u64 qoff = ((u64)t * hq + g * group + (i < group ? i : 0)) * d;
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
            dot = warp_sum(dot);
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
                                u32 split_len) {                                                                  \
        KeyAddr addr = {table, block_size};                                                                      \
        attn_group<D, dim / 32>(partial, q, k, v, base, nkeys, addr, hq, hkv, scale, split_len);                \
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
                                            const u32* slots, u32 hkv, u32 d, u32 block_size) {                   \
        kv_write<D>(k_cache, v_cache, k, v, slots, hkv, d, block_size);                                           \
    }                                                                                                             \
    extern "C" __global__ void attn_combine_##s(D::T* out, const float* partial, u32 hq, u32 d, u32 splits) {    \
        attn_combine<D>(out, partial, hq, d, splits);                                                             \
    }                                                                                                             \
    ATTN_SPLIT(s, D, 64) ATTN_SPLIT(s, D, 128) ATTN_SPLIT(s, D, 256) ATTN_GROUP(s, D, 64) ATTN_GROUP(s, D, 128)
FOR_EACH_DTYPE(ATTENTION)

// ---- Prefill on tensor cores (sm_80+): FlashAttention-2's forward with mma.sync m16n8k16 ----
//
// Block (tile, head): 4 warps, 16 query rows each, 64 rows per tile; keys and values in tiles of
// 64 staged through shared memory. S = Q K^T and O += P V are warp-level MMAs (bf16/f16 in, f32
// accumulators); the online softmax works on the accumulator fragments: a thread holds two rows
// (lane/4 and lane/4 + 8) of each 16x8 tile, and a row's four threads are one quad (shuffles 1, 2).
// P goes from S's accumulator layout straight into the A operand of the next MMA (two adjacent 16x8
// tiles of S are one 16x16 A fragment). Causal or not; sequences of any lengths laid end to end;
// grouped-query heads read their shared K/V head. tiles[5 t .. 5 t + 5] = the tile's first query row
// (in q and out), its rows, the position of that row within its sequence (causal: the keys it sees
// end there), where the sequence's keys start: a token row of k/v (contiguous prompts, table null),
// or an offset into the block table (the paged cache: chunked prefill after a cached prefix), and
// how many of its keys the tile's rows see at most.

#define FA_ROWS 64
#define FA_KEYS 64
#define FA_PAD 8

__device__ __forceinline__ u32 pack2(float lo, float hi, bool bf16) {
    u32 r;
    if (bf16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1, bool bf16) {
    if (bf16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D, bool BF16>
__device__ void flash_attn(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles, KeyAddr addr, u32 hq,
                           u32 hkv, float scale_log2) {
    __shared__ __align__(16) u16 ks[FA_KEYS][D + FA_PAD];
    __shared__ __align__(16) u16 vs[FA_KEYS][D + FA_PAD];
    const u32 tile = blockIdx.x, h = blockIdx.y, g = h / (hq / hkv);
    const u32 q0 = tiles[5 * tile], rows = tiles[5 * tile + 1], pos0 = tiles[5 * tile + 2], kbase = tiles[5 * tile + 3];
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 quad = lane & 3, r_lo = warp * 16 + (lane >> 2), r_hi = r_lo + 8;  // rows within the tile
    // Positions within the sequence; rows past the tile's end act as its last row (never written).
    const u32 pos_lo = pos0 + min(r_lo, rows - 1), pos_hi = pos0 + min(r_hi, rows - 1);
    // Keys 0..keys_end of the sequence are seen by some row (causal: pos0 + rows; without the causal
    // mask, the whole prompt, and pos0 at or past its end so that no key is masked by position).
    const u32 keys_end = tiles[5 * tile + 4];

    // Q as A fragments, one per 16 dims: rows r_lo / r_hi, dims 16 kk + 2 quad (+1, +8, +9).
    u32 qa[D / 16][4];
    {
        const u64 lo = ((u64)(q0 + min(r_lo, rows - 1)) * hq + h) * D, hi = ((u64)(q0 + min(r_hi, rows - 1)) * hq + h) * D;
        const u32* q32 = (const u32*)q;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 c = kk * 16 + 2 * quad;
            qa[kk][0] = q32[(lo + c) / 2];
            qa[kk][1] = q32[(hi + c) / 2];
            qa[kk][2] = q32[(lo + c + 8) / 2];
            qa[kk][3] = q32[(hi + c + 8) / 2];
        }
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;

    for (u32 kb = 0; kb < keys_end; kb += FA_KEYS) {
        __syncthreads();  // the previous tile's readers are done
        // Stage keys kb..kb+64 (zeros past the end) of K and V head g, 2 halves per load.
        for (u32 i = tid; i < FA_KEYS * D / 2; i += blockDim.x) {
            const u32 key = i / (D / 2), c = (i % (D / 2)) * 2;
            u32 kv = 0, vv = 0;
            if (kb + key < keys_end) {
                const u64 at = addr.at(kbase, kb + key, g, hkv, D) + c;
                kv = ((const u32*)k)[at / 2];
                vv = ((const u32*)v)[at / 2];
            }
            *(u32*)&ks[key][c] = kv;
            *(u32*)&vs[key][c] = vv;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the 64 keys: 8 tiles of 16x8.
        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const u32 key = nt * 8 + (lane >> 2);
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const u32 c = kk * 16 + 2 * quad;
                mma16816(s[nt], qa[kk], *(const u32*)&ks[key][c], *(const u32*)&ks[key][c + 8], BF16);
            }
        }
        // Scale (in log2 units), mask what a row may not see, and take the rows' maxima.
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const u32 key = kb + nt * 8 + 2 * quad + e;
                s[nt][e] = key <= pos_lo && key < keys_end ? s[nt][e] * scale_log2 : -INFINITY;
                s[nt][2 + e] = key <= pos_hi && key < keys_end ? s[nt][2 + e] * scale_log2 : -INFINITY;
                mx_lo = fmaxf(mx_lo, s[nt][e]);
                mx_hi = fmaxf(mx_hi, s[nt][2 + e]);
            }
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, sh));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, sh));
        }
        // Every row sees key 0 in the first tile, so the running maxima are finite from then on.
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float corr_lo = exp2f(m_lo - mn_lo), corr_hi = exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= corr_lo;
        l_hi *= corr_hi;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= corr_lo;
            o[i][1] *= corr_lo;
            o[i][2] *= corr_hi;
            o[i][3] *= corr_hi;
        }
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - m_lo);
            s[nt][1] = exp2f(s[nt][1] - m_lo);
            s[nt][2] = exp2f(s[nt][2] - m_hi);
            s[nt][3] = exp2f(s[nt][3] - m_hi);
            l_lo += s[nt][0] + s[nt][1];
            l_hi += s[nt][2] + s[nt][3];
        }
        // O += P V, 16 keys at a time: S tiles 2 kt and 2 kt + 1 form P's A fragment.
#pragma unroll
        for (int kt = 0; kt < FA_KEYS / 16; kt++) {
            u32 pa[4];
            pa[0] = pack2(s[2 * kt][0], s[2 * kt][1], BF16);
            pa[1] = pack2(s[2 * kt][2], s[2 * kt][3], BF16);
            pa[2] = pack2(s[2 * kt + 1][0], s[2 * kt + 1][1], BF16);
            pa[3] = pack2(s[2 * kt + 1][2], s[2 * kt + 1][3], BF16);
            const u32 key = kt * 16 + 2 * quad;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                const u32 c = dt * 8 + (lane >> 2);
                const u32 b0 = (u32)vs[key][c] | ((u32)vs[key + 1][c] << 16);
                const u32 b1 = (u32)vs[key + 8][c] | ((u32)vs[key + 9][c] << 16);
                mma16816(o[dt], pa, b0, b1, BF16);
            }
        }
    }
    // The rows' sums are spread over their quads.
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, sh);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, sh);
    }
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
    u32* out32 = (u32*)out;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        const u32 c = dt * 8 + 2 * quad;
        if (r_lo < rows) out32[(((u64)(q0 + r_lo) * hq + h) * D + c) / 2] = pack2(o[dt][0] * inv_lo, o[dt][1] * inv_lo, BF16);
        if (r_hi < rows) out32[(((u64)(q0 + r_hi) * hq + h) * D + c) / 2] = pack2(o[dt][2] * inv_hi, o[dt][3] * inv_hi, BF16);
    }
}

#define FLASH_ONE(dim, s, bf16)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        flash_attn_d##dim##_##s(u16* out, const u16* q, const u16* k, const u16* v, const u32* tiles,              \
                                const u32* table, u32 block_size, u32 hq, u32 hkv, float scale_log2) {             \
        KeyAddr addr = {table, block_size};                                                                        \
        flash_attn<dim, bf16>(out, q, k, v, tiles, addr, hq, hkv, scale_log2);                                     \
    }
#define FLASH(dim) FLASH_ONE(dim, bf16, true) FLASH_ONE(dim, f16, false)
FLASH(64)
FLASH(128)
