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

// f(x[base + j], j) for this thread's columns j of the row (threadIdx.x, + blockDim.x, ...), in
// that order, eight loads issued before the first is used: a vocabulary row is ~125 elements a
// thread, each a round trip to memory when the loop waits on its load.
template <class D, class F>
__device__ __forceinline__ void row_pass(const typename D::T* x, u64 base, u32 v, F f) {
    const u32 step = blockDim.x;
    u32 j = threadIdx.x;
    for (; j + 7 * step < v; j += 8 * step) {
        float xs[8];
#pragma unroll
        for (u32 u = 0; u < 8; u++) xs[u] = D::load(x, base + j + u * step);
#pragma unroll
        for (u32 u = 0; u < 8; u++) f(xs[u], j + u * step);
    }
    for (; j < v; j += step) f(D::load(x, base + j), j);
}

template <class D>
__device__ void argmax_row(u32* index, float* logprob, const typename D::T* x, u32 v) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const u32 b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const u64 base = (u64)b * v;
    float best = -INFINITY;
    u32 at = ARGMAX_NONE;
    row_pass<D>(x, base, v, [&](float xj, u32 j) { better(best, at, xj, j); });
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
    row_pass<D>(x, base, v, [&](float xj, u32) { sum += expf(xj - best); });
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
    double hist[256];
    double sh[SAMPLE_WARPS];
    double above;
    u32 bin, found;
};

// The cut at which the running weight (1 per token, or MASS: its e) of the tokens within `lim`, in
// order, first reaches `target` (`strict`: first exceeds it). Where rounding keeps it from doing so,
// `lim` itself (its last token).
template <class D, bool MASS>
__device__ __forceinline__ Cut select_cut(const SampleRow<D> r, Cut lim, double target, bool strict, SampleShared* s) {
    u32 prefix = 0, mask = 0;
    double above = 0.0;  // weight within lim of the tokens ordered before the prefix's range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 i = threadIdx.x; i < 256; i += blockDim.x) s->hist[i] = 0.0;
        __syncthreads();
        for (u32 j = threadIdx.x; j < r.v; j += blockDim.x) {
            const float c = r.c(j);
            const u32 k = order_key(c);
            if ((k & mask) == prefix && within(k, j, lim)) atomicAdd(&s->hist[(k >> shift) & 255], MASS ? r.e(c) : 1.0);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double acc = above;
            u32 bin = 256;
            for (int b = 255; b >= 0; b--) {
                const double h = s->hist[b];
                if (h > 0.0 && (strict ? acc + h > target : acc + h >= target)) {
                    bin = b;
                    break;
                }
                acc += h;
            }
            s->bin = bin;
            s->above = acc;
        }
        __syncthreads();
        const u32 bin = s->bin;
        if (bin == 256) return lim;
        above = s->above;
        prefix |= bin << shift;
        mask |= 255u << shift;
    }
    // Tokens whose key is exactly `prefix`, in index order: each thread sums a run of columns, the
    // thread whose run crosses the target walks it.
    const u32 per = (r.v + blockDim.x - 1) / blockDim.x, j0 = min(threadIdx.x * per, r.v), j1 = min(j0 + per, r.v);
    double w = 0.0;
    for (u32 j = j0; j < j1; j++) {
        const float c = r.c(j);
        if (order_key(c) == prefix && within(prefix, j, lim)) w += MASS ? r.e(c) : 1.0;
    }
    if (threadIdx.x == 0) s->found = 0xffffffffu;
    double total;
    const double incl = above + block_scan(w, s->sh, &total);
    double acc = incl - w;
    const bool crosses = strict ? incl > target : incl >= target;
    const bool crossed = strict ? acc > target : acc >= target;
    if (w > 0.0 && crosses && !crossed) {
        for (u32 j = j0; j < j1; j++) {
            const float c = r.c(j);
            if (order_key(c) != prefix || !within(prefix, j, lim)) continue;
            acc += MASS ? r.e(c) : 1.0;
            if (strict ? acc > target : acc >= target) {
                atomicMin(&s->found, j);
                break;
            }
        }
    }
    __syncthreads();
    const u32 found = s->found;
    __syncthreads();
    return found == 0xffffffffu ? lim : Cut{prefix, found};
}

// The weight (count, or MASS: e) of the tokens within lim whose e is at least min_e.
template <class D, bool MASS>
__device__ __forceinline__ double weight_within(const SampleRow<D> r, Cut lim, float min_e, SampleShared* s) {
    double w = 0.0;
    for (u32 j = threadIdx.x; j < r.v; j += blockDim.x) {
        const float c = r.c(j);
        const double e = r.e(c);
        if (within(order_key(c), j, lim) && e >= (double)min_e) w += MASS ? e : 1.0;
    }
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
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) m = fmax(m, (double)r.c(j));
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
