// Choosing tokens from the logits on the device, so a decoding step reads back one id and one
// log-probability per sequence instead of a row of the vocabulary.
//
// argmax_*: block b takes row b of x [B, V]: index[b] = the first column holding the row's maximum
// (NaN never is), logprob[b] = x[b, index] - logsumexp(x[b, :]) = -log(sum_v exp(x[b, v] - max)).
//
// sample_*: block b draws from row b by params[b], as the CPU's `sample_row` defines it: tokens
// ordered by c = x / temperature descending (ties: lower index first); the first top_k kept; then
// the shortest run of those whose mass e = exp(c - max) reaches top_p of theirs; then those with
// e >= min_p (at least one); then the token at which the run's running mass first exceeds
// uniform * its total. Every such cut of the order is found by radix selection over the keys of c
// (four passes of 256 bins, counting tokens or summing e in f64), then among equal keys in index
// order, so the vocabulary is never sorted. Temperature 0 is the argmax. Blocks of 512 threads.

#define ARGMAX_NONE 0xffffffffu

// (value, column) of the better of two candidates: the larger value, the lower column on a tie.
__device__ __forceinline__ void better(float& best, u32& at, float v, u32 j) {
    if (v > best || (v == best && j < at)) {
        best = v;
        at = j;
    }
}

// Element e of a 16-byte chunk (its four words, in order) of T: a word (f32), or half of one, the
// low half first (f16, bf16).
template <class T>
struct Chunk;
template <>
struct Chunk<float> {
    static __device__ __forceinline__ float at(const u32 (&w)[4], u32 e) { return __uint_as_float(w[e]); }
};
template <>
struct Chunk<u16> {
    static __device__ __forceinline__ u16 at(const u32 (&w)[4], u32 e) { return (u16)(e & 1 ? w[e / 2] >> 16 : w[e / 2] & 0xffffu); }
};

// f(x[base + j], j, ok) for this thread's columns j of the row, eight loads issued before the first
// is used (each a round trip to memory where the loop waits on its load): its columns threadIdx.x,
// + blockDim.x, ... one by one; or, WIDE and where the row lies on 16 bytes (a vocabulary a
// multiple of 8 wide, as Llama-3's 128256), by 16-byte loads: the thread's chunks threadIdx.x,
// + blockDim.x, ... of 16 / sizeof(T) columns each, in order (Llama-3's row is then two rounds of
// loads for a block of 1024, where element by element it was sixteen). WIDE for a light `f` (the
// argmax's, a maximum's): `f` is inlined for each of a round's 64 columns, which for the sampling
// passes' histograms made the module four times larger for passes bound by their arithmetic. Every
// thread of the block makes the same calls, `ok` false (x 0) past the row's end, so `f` may use
// warp-wide instructions.
template <class D, bool WIDE = false, class F>
__device__ __forceinline__ void row_pass(const typename D::T* x, u64 base, u32 v, F f) {
    typedef typename D::T T;
    constexpr u32 PER = 16 / sizeof(T);  // columns in a 16-byte chunk
    const u32 step = blockDim.x;
    if (WIDE && v % PER == 0 && (((u64)(x + base)) & 15) == 0) {
        const uint4* row = (const uint4*)(x + base);
        const u32 chunks = v / PER;
        for (u32 c0 = threadIdx.x; c0 - threadIdx.x < chunks; c0 += 8 * step) {
            uint4 xs[8];
#pragma unroll
            for (u32 u = 0; u < 8; u++) xs[u] = c0 + u * step < chunks ? row[c0 + u * step] : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (u32 u = 0; u < 8; u++) {
                const u32 w[4] = {xs[u].x, xs[u].y, xs[u].z, xs[u].w};
                const u32 c = c0 + u * step;
#pragma unroll
                for (u32 e = 0; e < PER; e++) f(D::value(Chunk<T>::at(w, e)), c * PER + e, c < chunks);
            }
        }
        return;
    }
    for (u32 j0 = threadIdx.x; j0 - threadIdx.x < v; j0 += 8 * step) {
        float xs[8];
#pragma unroll
        for (u32 u = 0; u < 8; u++) xs[u] = j0 + u * step < v ? D::load(x, base + j0 + u * step) : 0.0f;
#pragma unroll
        for (u32 u = 0; u < 8; u++) f(xs[u], j0 + u * step, j0 + u * step < v);
    }
}

template <class D>
__device__ void argmax_row(u32* index, float* logprob, const typename D::T* x, u32 v) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const u32 b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const u64 base = (u64)b * v;
    float best = -INFINITY;
    u32 at = ARGMAX_NONE;
    row_pass<D, true>(x, base, v, [&](float xj, u32 j, bool ok) {
        if (ok) better(best, at, xj, j);
    });
#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) better(best, at, __shfl_xor_sync(0xffffffffu, best, sh), __shfl_xor_sync(0xffffffffu, at, sh));
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = at;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? sv[lane] : -INFINITY;
        at = lane < warps ? si[lane] : ARGMAX_NONE;
#pragma unroll
        for (int sh = 16; sh > 0; sh >>= 1) better(best, at, __shfl_xor_sync(0xffffffffu, best, sh), __shfl_xor_sync(0xffffffffu, at, sh));
        if (lane == 0) {
            sv[0] = best;
            si[0] = at;
        }
    }
    __syncthreads();
    best = sv[0];
    at = si[0];
    __syncthreads();  // sv is reused below
    float sum = 0.0f;
    row_pass<D, true>(x, base, v, [&](float xj, u32, bool ok) { sum += ok ? expf(xj - best) : 0.0f; });
#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, sh);
    if (lane == 0) sv[warp] = sum;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (u32 w = 0; w < warps; w++) total += sv[w];
        index[b] = at == ARGMAX_NONE ? 0 : at;
        logprob[b] = -logf(total);
    }
}

// As the host's `SampleParams` (24 bytes).
struct SampleParams {
    float temperature;
    u32 top_k;
    float top_p;
    float min_p;
    double uniform;
};

#define SAMPLE_THREADS 512
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)

// A float's bits as an unsigned key in the same order (finite values).
__device__ __forceinline__ u32 order_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A cut of the order (key descending, index ascending): the tokens up to and including (key, idx).
struct Cut {
    u32 key, idx;
};
__device__ __forceinline__ bool within(u32 k, u32 j, Cut c) { return k > c.key || (k == c.key && j <= c.idx); }

// The sum of v over the block, the same in every thread (each adds the warps' sums in one order).
__device__ __forceinline__ double block_sum(double v, double* sh) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // sh is free of any earlier use
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (u32 w = 0; w < SAMPLE_WARPS; w++) t += sh[w];
    return t;
}

// Inclusive prefix sum of v over the threads in order; *total: the block's sum.
__device__ __forceinline__ double block_scan(double v, double* sh, double* total) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= (u32)o) v += y;
    }
    __syncthreads();
    if (lane == 31) sh[warp] = v;
    __syncthreads();
    double before = 0.0, t = 0.0;
    for (u32 w = 0; w < SAMPLE_WARPS; w++) {
        if (w < warp) before += sh[w];
        t += sh[w];
    }
    *total = t;
    return before + v;
}

// One row as the draw sees it.
template <class D>
struct SampleRow {
    const typename D::T* x;
    u64 base;
    u32 v;
    float temperature, max;
    __device__ __forceinline__ float c(u32 j) const { return D::load(x, base + j) / temperature; }
    // As the host computes it: the difference in f32, its exponential in f64.
    __device__ __forceinline__ double e(float c) const { return exp((double)(c - max)); }
};

struct SampleShared {
    double hist[SAMPLE_WARPS][256];  // each warp's own, summed in warp order after a pass
    double sh[SAMPLE_WARPS];
    double above;
    u32 bin, found;
};

// Adds w to bin `bin` of this warp's histogram for each lane where `in`: one add per distinct bin
// among the lanes (their weights summed across the warp first), where every lane's atomic add to a
// few hot bins (a row's logits fall in a handful of the first pass's 256) spun on compare-and-swap
// (f64 atomics in shared memory are a CAS loop) and serialized the whole block. The histogram is the
// warp's own and each bin gets one add at a time, so no atomics, and the sums' order is fixed.
__device__ __forceinline__ void warp_bin_add(double* hist, bool in, u32 bin, double w) {
    const u32 lane = threadIdx.x & 31;
    u32 todo = __ballot_sync(0xffffffffu, in);
    while (todo) {
        const u32 lead = __ffs(todo) - 1;
        const u32 b = __shfl_sync(0xffffffffu, bin, lead);
        const bool mine = in && bin == b;
        double sum = mine ? w : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == lead) hist[b] += sum;
        todo &= ~__ballot_sync(0xffffffffu, mine);
    }
    __syncwarp();  // the adds seen by the lanes that add to the same bins next
}

// The cut at which the running weight (1 per token, or MASS: its e) of the tokens within `lim`, in
// order, first reaches `target` (`strict`: first exceeds it). Where rounding keeps it from doing so,
// `lim` itself (its last token).
template <class D, bool MASS>
__device__ __forceinline__ Cut select_cut(const SampleRow<D> r, Cut lim, double target, bool strict, SampleShared* s) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 prefix = 0, mask = 0;
    double above = 0.0;  // weight within lim of the tokens ordered before the prefix's range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 i = threadIdx.x; i < SAMPLE_WARPS * 256; i += blockDim.x) s->hist[i / 256][i % 256] = 0.0;
        __syncthreads();
        row_pass<D>(r.x, r.base, r.v, [&](float xj, u32 j, bool ok) {
            const float c = xj / r.temperature;
            const u32 k = order_key(c);
            const bool in = ok && (k & mask) == prefix && within(k, j, lim);
            warp_bin_add(s->hist[warp], in, (k >> shift) & 255, MASS ? (in ? r.e(c) : 0.0) : 1.0);
        });
        __syncthreads();
        // Bins in order, highest first: warp 0's lane l holds bins 255 - 8 l down to 248 - 8 l.
        if (warp == 0) {
            double h[8], chunk = 0.0;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const u32 bin = 255 - 8 * lane - i;
                double t = 0.0;
                for (u32 w = 0; w < SAMPLE_WARPS; w++) t += s->hist[w][bin];
                h[i] = t;
                chunk += t;
            }
            // The weight of the bins before this lane's (an exclusive scan in lane order).
            double incl = chunk;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const double y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= (u32)o) incl += y;
            }
            double acc = above + incl - chunk;
            u32 bin = 256;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                if (bin == 256 && h[i] > 0.0 && (strict ? acc + h[i] > target : acc + h[i] >= target)) bin = 255 - 8 * lane - i;
                if (bin == 256) acc += h[i];
            }
            // The first lane (highest bins) whose bins reach the target.
            const u32 hit = __ballot_sync(0xffffffffu, bin != 256);
            const u32 first = hit ? __ffs(hit) - 1 : 31;
            const u32 b = __shfl_sync(0xffffffffu, bin, first);
            const double a = __shfl_sync(0xffffffffu, acc, first);
            if (lane == 0) {
                s->bin = b;
                s->above = a;
            }
        }
        __syncthreads();
        const u32 bin = s->bin;
        if (bin == 256) return lim;
        above = s->above;
        prefix |= bin << shift;
        mask |= 255u << shift;
    }
    // Tokens whose key is exactly `prefix`, in index order: tiles of 8 columns a thread (thread t
    // the tile's columns 8 t to 8 t + 7, loads side by side across the warp), a scan over the block
    // ordering each tile's threads after the tiles before; the thread whose run crosses the target
    // walks its 8.
    if (threadIdx.x == 0) s->found = 0xffffffffu;
    for (u32 t0 = 0; t0 < r.v; t0 += 8 * blockDim.x) {
        const u32 j0 = t0 + 8 * threadIdx.x;
        float cs[8];
#pragma unroll
        for (u32 u = 0; u < 8; u++) cs[u] = j0 + u < r.v ? D::load(r.x, r.base + j0 + u) / r.temperature : 0.0f;
        double w = 0.0;
#pragma unroll
        for (u32 u = 0; u < 8; u++)
            if (j0 + u < r.v && order_key(cs[u]) == prefix && within(prefix, j0 + u, lim)) w += MASS ? r.e(cs[u]) : 1.0;
        double total;
        const double incl = above + block_scan(w, s->sh, &total);
        double acc = incl - w;
        const bool crosses = strict ? incl > target : incl >= target;
        const bool crossed = strict ? acc > target : acc >= target;
        if (w > 0.0 && crosses && !crossed) {
#pragma unroll
            for (u32 u = 0; u < 8; u++) {
                if (j0 + u >= r.v || order_key(cs[u]) != prefix || !within(prefix, j0 + u, lim)) continue;
                acc += MASS ? r.e(cs[u]) : 1.0;
                if (strict ? acc > target : acc >= target) {
                    atomicMin(&s->found, j0 + u);
                    break;
                }
            }
        }
        above += total;
        __syncthreads();
        if (s->found != 0xffffffffu) break;
    }
    const u32 found = s->found;
    __syncthreads();
    return found == 0xffffffffu ? lim : Cut{prefix, found};
}

// The weight (count, or MASS: e) of the tokens within lim whose e is at least min_e.
template <class D, bool MASS>
__device__ __forceinline__ double weight_within(const SampleRow<D> r, Cut lim, float min_e, SampleShared* s) {
    double w = 0.0;
    row_pass<D>(r.x, r.base, r.v, [&](float xj, u32 j, bool ok) {
        const float c = xj / r.temperature;
        if (!ok || !within(order_key(c), j, lim)) return;
        const double e = r.e(c);
        if (e >= (double)min_e) w += MASS ? e : 1.0;
    });
    return block_sum(w, s->sh);
}

template <class D>
__device__ void sample_row(u32* index, float* logprob, const typename D::T* x, const SampleParams* params, u32 v) {
    const SampleParams p = params[blockIdx.x];
    if (p.temperature < 1e-5f) {  // SampleParams::GREEDY_BELOW: greedy, as at 0
        argmax_row<D>(index, logprob, x, v);
        return;
    }
    __shared__ SampleShared s;
    SampleRow<D> r = {x, (u64)blockIdx.x * v, v, p.temperature, 0.0f};
    double m = -INFINITY;
    row_pass<D, true>(x, r.base, v, [&](float xj, u32, bool ok) {
        if (ok) m = fmax(m, (double)(xj / r.temperature));
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.sh[threadIdx.x >> 5] = m;
    __syncthreads();
    for (u32 w = 0; w < SAMPLE_WARPS; w++) m = fmax(m, s.sh[w]);
    r.max = (float)m;
    Cut lim = {0u, 0xffffffffu};  // every token
    if (p.top_k != 0 && p.top_k < v) lim = select_cut<D, false>(r, lim, (double)p.top_k, false, &s);
    if (p.top_p < 1.0f) {
        const double z = weight_within<D, true>(r, lim, 0.0f, &s);
        lim = select_cut<D, true>(r, lim, (double)p.top_p * z, false, &s);
    }
    if (p.min_p > 0.0f) {
        // As likely as min_p times the first (whose e is 1): e >= min_p; at least the first.
        const double n = fmax(weight_within<D, false>(r, lim, p.min_p, &s), 1.0);
        lim = select_cut<D, false>(r, lim, n, false, &s);
    }
    const double kept = weight_within<D, true>(r, lim, 0.0f, &s);
    Cut pick = select_cut<D, true>(r, lim, p.uniform * kept, true, &s);
    // Rounding left the draw past the run, which is still every token: its last one.
    if (pick.idx == 0xffffffffu) pick = select_cut<D, false>(r, lim, (double)v, false, &s);
    if (threadIdx.x == 0) {
        index[blockIdx.x] = pick.idx;
        logprob[blockIdx.x] = (float)log(r.e(r.c(pick.idx)) / kept);
    }
}

// x = cap tanh(x / cap), in place, elementwise: the logits' soft-cap (Gemma 2), grid-stride.
template <class D>
__device__ void softcap(typename D::T* x, float cap, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        D::store(x, i, cap * tanhf(D::load(x, i) / cap));
}

#define SAMPLING(s, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) argmax_##s(u32* index, float* logprob, const D::T* x, u32 v) { \
        PDL_ENTRY();                                                                              \
        argmax_row<D>(index, logprob, x, v);                                                      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)                               \
        sample_##s(u32* index, float* logprob, const D::T* x, const SampleParams* params, u32 v) { \
        PDL_ENTRY();                                                                              \
        sample_row<D>(index, logprob, x, params, v);                                              \
    }                                                                                             \
    extern "C" __global__ void softcap_##s(D::T* x, float cap, u64 n) {                       \
        PDL_ENTRY();                                                                              \
        softcap<D>(x, cap, n);                                                                    \
    }
FOR_EACH_DTYPE(SAMPLING)
