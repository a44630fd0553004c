// Matrix-vector products for decoding: out [t, n] = x [t, k] @ w [n, k]^T (+ bias), t <= 8 rows of
// f16 or bf16, f32 accumulation, one rounding. A decode step's projections read every weight once
// and are bound by memory bandwidth, where a GEMM library tuned for large matrices leaves some of it
// unused (cuBLAS reached 66-81% of the H200's copy bandwidth on Llama-3-8B's shapes). Here each warp
// takes GEMV_ROWS rows of w; its lanes read them in 16-byte chunks (8 elements) along k, GEMV_UNROLL
// chunks per row in flight before any is used, and multiply each chunk by the same 8 elements of
// every row of x (a few KiB, read through the caches by every warp). A warp reduction per (row of x,
// row of w) ends it. TM: the rows of x the kernel is built for (1, 2, 4, 8); t <= TM at run time.
// Needs k % 8 == 0 and 16-byte aligned x and w (the host checks, and uses cuBLAS otherwise).
//
// gemv_glu*: the MLP's gate and up projections and SwiGLU in one kernel (the SwiGluLinear op):
// each warp takes one row of w_gate and the same row of w_up as its two rows, and writes
// silu(gate) * up, each projection rounded to the dtype first, as the unfused gemv, gemv, swiglu
// write it, bit for bit: the sums are the same sums, in the same order.
//
// gemv_qkv*: the attention's q, k and v projections of one x in one launch (the QkvLinear op): the
// blocks over q's rows, then k's, then v's (nq and nk whole blocks of GEMV_BLOCK_ROWS rows), each
// block exactly as gemv* would run it.
//
// The residual stream's two kernels folded into the projections around them (a decode step's layer
// in 6 launches where it took 8): gemv_add* adds its product into `out` (Linear::accumulate: the
// output and down projections write the stream: out = round(out + round(x w^T + b)), as a stored
// delta and add_rms_norm's add give it), and gemv_glu_norm* and gemv_qkv_norm* read x's RMSNorm
// (the layer's two norms, add_rms_norm's other half): each warp sums the squares of x's rows
// itself (k elements, its lanes' 16-byte chunks in order, then the warp's reduction: no barrier, no
// other warp waited on), and scales each 8 elements of x as it reads them, rounded to the dtype as
// rms_norm stores them: (x * inv) * w. The same sums as rms_norm's within its bound (another order
// of the squares), the same projections of them.

// The shape, compile-time (-D; crates/highrise-cuda/src/gemv.rs, swept by scripts/gpu-sweep.sh):
// warps per block, chunks of each row in flight per lane (UNROLL), whether a warp issues the next
// round's loads before it multiplies this round's (PIPE: 2 x UNROLL x 2 chunks per lane in flight,
// twice the registers), how many rounds ahead it prefetches into L2 (PREFETCH), and whether the
// block's warps share the same rows (SPLIT, 1 or WARPS: each warp takes every SPLIT-th round of
// them, and the first adds their sums in order, llama.cpp's block per row; a matrix is cut into
// WARPS times more, shorter pieces of work: fewer rows left for a last, partial wave of blocks,
// and more warps on rows as long as the down projection's). With SPLIT 1 the sums are the same
// in every shape, bit for bit: a lane adds its chunks lane, lane + 32, ... in order, and the warp's
// reduction is the same; a SPLIT adds the same products in another order (each shape's fused
// kernels, gemv_glu and gemv_qkv, still give its gemv's sums).
#ifndef GEMV_WARPS
#define GEMV_WARPS 4
#endif
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif
#ifndef GEMV_PIPE
#define GEMV_PIPE 0
#endif
// Rounds ahead of its loads a warp prefetches into L2 (prefetch.global.L2: no registers, nothing
// waits on it), so a round's loads find their lines in L2 more often than in DRAM; 0: none (the
// first round only, before the kernel waits on the one before it).
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 0
#endif
#ifndef GEMV_SPLIT
#define GEMV_SPLIT 1
#endif
// Rounds of each warp's rows prefetched into L2 before the programmatic wait (EARLY; 0: those the
// loop's own prefetches will not ask for, at least one). A decode step's matrix-vector products
// follow short, latency-bound kernels (a norm, the attention) that leave the memory idle; launched
// as programmatic dependents, this kernel's resident blocks ask for their weights while those run,
// so more rounds ahead keep the memory busy through them (an effect only a whole decode step shows:
// scripts/gpu-sweep.sh's "step" part times the step with each shape).
#ifndef GEMV_EARLY
#define GEMV_EARLY 0
#endif
#define GEMV_ROWS 2
#define GEMV_GROUPS (GEMV_WARPS / GEMV_SPLIT)  // warps (SPLIT of them) on different rows
#define GEMV_BLOCK_ROWS (GEMV_GROUPS * GEMV_ROWS)
static_assert(GEMV_SPLIT == 1 || GEMV_SPLIT == GEMV_WARPS, "no warps or all of a block's share its rows");

// Eight 16-bit values from one 16-byte chunk, as floats.
template <bool BF16>
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (BF16) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
            f[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
            f[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
        }
    }
}

// A float rounded to the 16-bit dtype and back: what storing it and reading it again gives.
template <bool BF16>
__device__ __forceinline__ float round16(float v) {
    return BF16 ? ::BF16::rounded(v) : ::F16::rounded(v);
}

// `block`: this block's index among the blocks over w's rows (blockIdx.x, or less where one launch
// covers several matrices). NORM: x's rows RMS-normed by `norm` [k] (eps) as they are read; ADD: the
// product added into out.
template <int TM, bool BF16, bool GLU, bool NORM = false, bool ADD = false>
__device__ void gemv(u16* out, const u16* x, const u16* w, const u16* w_up, const void* bias, u32 bias_dt, u32 t, u32 k, u32 n,
                     u32 block, const u16* norm = nullptr, float eps = 0.0f) {
    static_assert(!GLU || GEMV_ROWS == 2, "gemv_glu takes a row of w_gate and one of w_up per warp");
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Warp `part` of its group's GEMV_SPLIT takes rounds part, part + SPLIT, ... of the group's rows.
    const u32 group = warp / GEMV_SPLIT, part = warp % GEMV_SPLIT;
    // Plain: GEMV_ROWS consecutive rows of w per group. GLU: row row0 of w (the gate) and of w_up.
    const u32 row0 = GLU ? block * GEMV_GROUPS + group : (block * GEMV_GROUPS + group) * GEMV_ROWS;
    const u32 chunks = k / 8;
    constexpr u32 STRIDE = 32 * GEMV_UNROLL * GEMV_SPLIT;  // chunks from one of a warp's rounds to its next
    // Rows of w: GLU's row row0 of w (the gate) and of w_up; else rows row0 + r (the last again
    // past the end, read and not stored).
    auto row_of = [&](int r) {
        return GLU ? (const uint4*)((r == 0 ? w : w_up) + (u64)row0 * k) : (const uint4*)(w + (u64)min(row0 + r, n - 1) * k);
    };
    // Round `round`'s chunks of this warp's two rows into L2: GEMV_UNROLL x 2 x 512 bytes, a
    // 128-byte line (eight chunks) per lane and instruction (none past the rows' end).
    auto prefetch_round = [&](const uint4* row_a, const uint4* row_b, u32 round) {
        constexpr u32 LINES = GEMV_UNROLL * GEMV_ROWS * 4;
#pragma unroll
        for (u32 i0 = 0; i0 < LINES; i0 += 32) {
            const u32 i = i0 + lane, u = i / (GEMV_ROWS * 4), part = (i / GEMV_ROWS) % 4;
            const u32 c = 32 * (round * GEMV_UNROLL + u) + 8 * part;
            if (i < LINES && c < chunks) prefetch_l2(((i & 1) ? row_b : row_a) + c);
        }
    };
    // Launched as a programmatic dependent (common.cuh): the weights, which no kernel writes, are
    // on their way to L2 (the loop's first rounds of them: those the loop's own prefetches will not
    // ask for) while the kernel before still runs.
    constexpr u32 AHEAD = GEMV_PREFETCH + GEMV_PIPE;  // this warp's rounds between a round's prefetch and its use
    // This warp's first EARLY rounds (its rounds part, part + SPLIT, ...), before the wait.
    constexpr u32 EARLY = GEMV_EARLY > AHEAD ? GEMV_EARLY : (AHEAD > 0 ? AHEAD : 1);
    static_assert(GEMV_ROWS == 2, "prefetch_round takes two rows");
    if (row0 < n)
#pragma unroll
        for (u32 i = 0; i < EARLY; i++) prefetch_round(row_of(0), row_of(1), part + i * GEMV_SPLIT);
    PDL_ENTRY();
    if (row0 >= n) return;  // the whole warp (split: the whole block, before its one barrier)
    const uint4* w4[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) w4[r] = row_of(r);
    const uint4* x4 = (const uint4*)x;
    // NORM: each row of x's 1 / rms, from this warp's own sum of its squares (eight of a lane's
    // loads in flight together: x, just written, comes from L2, two round trips at k = 4096, while
    // the weights prefetched before the wait stream into L2).
    float inv[TM];
#pragma unroll
    for (int i = 0; i < TM; i++) {
        inv[i] = 1.0f;
        if (!NORM || i >= (int)t) continue;
        float ss = 0.0f;
#pragma unroll 8
        for (u32 c = lane; c < chunks; c += 32) {
            float xf[8];
            unpack8<BF16>(x4[(u64)i * chunks + c], xf);
#pragma unroll
            for (int e = 0; e < 8; e++) ss += xf[e] * xf[e];
        }
        inv[i] = rsqrtf(warp_sum(ss) / (float)k + eps);
    }
    const uint4* norm4 = (const uint4*)norm;

    float acc[GEMV_ROWS][TM];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int i = 0; i < TM; i++) acc[r][i] = 0.0f;

    // One round: GEMV_UNROLL chunks of each row from chunk c0 on (zeros past the row).
    auto load = [&](uint4 (&dst)[GEMV_UNROLL][GEMV_ROWS], u32 c0) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const u32 c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) dst[u][r] = c < chunks ? w4[r][c] : make_uint4(0, 0, 0, 0);
        }
    };
    uint4 next[GEMV_UNROLL][GEMV_ROWS];
    const u32 first = lane + 32 * GEMV_UNROLL * part;
    if (GEMV_PIPE) load(next, first);
    for (u32 c0 = first; c0 < chunks; c0 += STRIDE) {
        // This warp's round AHEAD of its rounds on, unless among those prefetched before the wait.
        const u32 ahead = (c0 - lane) / (32 * GEMV_UNROLL) + AHEAD * GEMV_SPLIT;
        if (GEMV_PREFETCH && ahead >= EARLY * GEMV_SPLIT) prefetch_round(w4[0], w4[1], ahead);
        uint4 wv[GEMV_UNROLL][GEMV_ROWS];
        if (GEMV_PIPE) {
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) wv[u][r] = next[u][r];
            load(next, c0 + STRIDE);
        } else {
            load(wv, c0);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const u32 c = c0 + 32 * u;
            if (c >= chunks) break;
            float wf[GEMV_ROWS][8], nf[8];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) unpack8<BF16>(wv[u][r], wf[r]);
            if (NORM) unpack8<BF16>(norm4[c], nf);
#pragma unroll
            for (int i = 0; i < TM; i++) {
                if (i >= (int)t) break;
                float xf[8];
                unpack8<BF16>(x4[(u64)i * chunks + c], xf);
                if (NORM)
#pragma unroll
                    for (int e = 0; e < 8; e++) xf[e] = round16<BF16>(xf[e] * inv[i] * nf[e]);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][i] += wf[r][e] * xf[e];
            }
        }
    }
    // Each (row, row of x)'s sum: the warp's lanes', then (SPLIT) its group's warps' in order, in
    // the group's first warp.
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int i = 0; i < TM; i++) acc[r][i] = warp_sum(acc[r][i]);
    if (GEMV_SPLIT > 1) {
        __shared__ float sums[GEMV_WARPS][GEMV_ROWS][TM];
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
                for (int i = 0; i < TM; i++) sums[warp][r][i] = acc[r][i];
        __syncthreads();  // the whole block: its warps share one group (and returned together past n)
        if (part != 0) return;
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
            for (int i = 0; i < TM; i++) {
                float sum = sums[warp][r][i];
#pragma unroll
                for (int p = 1; p < GEMV_SPLIT; p++) sum += sums[warp + p][r][i];
                acc[r][i] = sum;
            }
    }
    if (GLU) {
#pragma unroll
        for (int i = 0; i < TM; i++) {
            const float g = acc[0][i], u = acc[1][i];
            if (lane == 0 && i < (int)t) {
                // Rounded as the unfused projections store them, then swiglu's own arithmetic.
                const float gr = round16<BF16>(g), ur = round16<BF16>(u);
                const float v = gr / (1.0f + expf(-gr)) * ur;
                out[(u64)i * n + row0] = BF16 ? f32_to_bf16(v) : f32_to_f16(v);
            }
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        const u32 row = row0 + r;
        const float b = bias != 0 && row < n ? load_any(bias, row, bias_dt) : 0.0f;
#pragma unroll
        for (int i = 0; i < TM; i++) {
            const float s = acc[r][i];
            if (lane == 0 && i < (int)t && row < n) {
                u16* o = out + (u64)i * n + row;
                // ADD: the product as stored, then the stream's add, rounded again by the store.
                const float v = ADD ? round16<BF16>(s + b) + (BF16 ? ::BF16::value(*o) : ::F16::value(*o)) : s + b;
                *o = BF16 ? f32_to_bf16(v) : f32_to_f16(v);
            }
        }
    }
}

// q, k and v (NORM: of x's norm) by one launch's blocks.
template <int TM, bool BF16, bool NORM>
__device__ void gemv_qkv(u16* q, u16* kk, u16* v, const u16* x, const u16* wq, const u16* wk, const u16* wv, const void* bq,
                         const void* bk, const void* bv, u32 bias_dt, u32 t, u32 k, u32 nq, u32 nk, u32 nv, const u16* norm, float eps) {
    const u32 bq_blocks = nq / GEMV_BLOCK_ROWS, bk_blocks = nk / GEMV_BLOCK_ROWS, b = blockIdx.x;
    if (b < bq_blocks) gemv<TM, BF16, false, NORM>(q, x, wq, nullptr, bq, bias_dt, t, k, nq, b, norm, eps);
    else if (b < bq_blocks + bk_blocks) gemv<TM, BF16, false, NORM>(kk, x, wk, nullptr, bk, bias_dt, t, k, nk, b - bq_blocks, norm, eps);
    else gemv<TM, BF16, false, NORM>(v, x, wv, nullptr, bv, bias_dt, t, k, nv, b - bq_blocks - bk_blocks, norm, eps);
}

#define GEMV_ONE(tm, s, bf16)                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        gemv##tm##_##s(u16* out, const u16* x, const u16* w, const void* bias, u32 bias_dt, u32 t, u32 k, u32 n) { \
        gemv<tm, bf16, false>(out, x, w, nullptr, bias, bias_dt, t, k, n, blockIdx.x);                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        gemv_add##tm##_##s(u16* out, const u16* x, const u16* w, const void* bias, u32 bias_dt, u32 t, u32 k, u32 n) { \
        gemv<tm, bf16, false, false, true>(out, x, w, nullptr, bias, bias_dt, t, k, n, blockIdx.x);               \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        gemv_glu##tm##_##s(u16* out, const u16* x, const u16* w_gate, const u16* w_up, u32 t, u32 k, u32 n) {     \
        gemv<tm, bf16, true>(out, x, w_gate, w_up, nullptr, 0, t, k, n, blockIdx.x);                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        gemv_qkv##tm##_##s(u16* q, u16* kk, u16* v, const u16* x, const u16* wq, const u16* wk, const u16* wv,    \
                           const void* bq, const void* bk, const void* bv, u32 bias_dt, u32 t, u32 k, u32 nq,     \
                           u32 nk, u32 nv) {                                                                      \
        gemv_qkv<tm, bf16, false>(q, kk, v, x, wq, wk, wv, bq, bk, bv, bias_dt, t, k, nq, nk, nv, nullptr, 0.0f); \
    }
// The _norm kernels at one row of x, decode's (at more, the norm's arithmetic on each of x's chunks
// spilled in the wider shapes: the host norms 2-8 rows apart first, ops::GEMV_NORM_ROWS).
#define GEMV_NORM_ONE(tm, s, bf16)                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        gemv_glu_norm##tm##_##s(u16* out, const u16* x, const u16* w_gate, const u16* w_up, const u16* norm,     \
                                float eps, u32 t, u32 k, u32 n) {                                                 \
        gemv<tm, bf16, true, true>(out, x, w_gate, w_up, nullptr, 0, t, k, n, blockIdx.x, norm, eps);             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        gemv_qkv_norm##tm##_##s(u16* q, u16* kk, u16* v, const u16* x, const u16* wq, const u16* wk,             \
                                const u16* wv, const void* bq, const void* bk, const void* bv, u32 bias_dt,       \
                                const u16* norm, float eps, u32 t, u32 k, u32 nq, u32 nk, u32 nv) {               \
        gemv_qkv<tm, bf16, true>(q, kk, v, x, wq, wk, wv, bq, bk, bv, bias_dt, t, k, nq, nk, nv, norm, eps);      \
    }
// A mixture's experts at decode (the Moe op, its experts stacked; kernels/mlp.cu's moe_route chose
// them): pair p = blockIdx.y runs gemv_glu1 (gate and up, SwiGLU) or gemv1 (down) on its token's row
// (t = p / k) and its expert's matrices (ids[p], clamped below e), into row p of out, as those
// kernels run one matrix. The expert is known only once moe_route has run: these wait first
// (PDL_ENTRY; gemv's own wait inside then finds the kernel before done), and prefetch no weights
// ahead of the wait.
#define GEMV_MOE(s, bf16)                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        moe_gemv_glu_##s(u16* out, const u16* x, const u16* gate, const u16* up, const u32* ids, u32 k, u32 h,   \
                         u32 i, u32 e) {                                                                          \
        PDL_ENTRY();                                                                                              \
        const u32 p = blockIdx.y;                                                                                 \
        const u64 m = (u64)min(ids[p], e - 1) * i * h;                                                            \
        gemv<1, bf16, true>(out + (u64)p * i, x + (u64)(p / k) * h, gate + m, up + m, nullptr, 0, 1, h, i, blockIdx.x); \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                                 \
        moe_gemv_down_##s(u16* y, const u16* a, const u16* down, const u32* ids, u32 i, u32 h, u32 e) {          \
        PDL_ENTRY();                                                                                              \
        const u32 p = blockIdx.y;                                                                                 \
        const u64 m = (u64)min(ids[p], e - 1) * h * i;                                                            \
        gemv<1, bf16, false>(y + (u64)p * h, a + (u64)p * i, down + m, nullptr, nullptr, 0, 1, i, h, blockIdx.x); \
    }
GEMV_MOE(bf16, true)
GEMV_MOE(f16, false)
#define GEMV(tm) GEMV_ONE(tm, bf16, true) GEMV_ONE(tm, f16, false)
GEMV(1)
GEMV(2)
GEMV(4)
GEMV(8)
GEMV_NORM_ONE(1, bf16, true)
GEMV_NORM_ONE(1, f16, false)
