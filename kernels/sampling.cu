// Choosing tokens from the logits on the device, so a decoding step reads back one id and one
// log-probability per sequence instead of a row of the vocabulary.
//
// argmax_*: block b takes row b of x [B, V]: index[b] = the first column holding the row's maximum
// (NaN never is), logprob[b] = x[b, index] - logsumexp(x[b, :]) = -log(sum_v exp(x[b, v] - max)).

#define ARGMAX_NONE 0xffffffffu

// (value, column) of the better of two candidates: the larger value, the lower column on a tie.
__device__ __forceinline__ void better(float& best, u32& at, float v, u32 j) {
    if (v > best || (v == best && j < at)) {
        best = v;
        at = j;
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
    for (u32 j = tid; j < v; j += blockDim.x) better(best, at, D::load(x, base + j), j);
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
    for (u32 j = tid; j < v; j += blockDim.x) sum += expf(D::load(x, base + j) - best);
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

#define SAMPLING(s, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) argmax_##s(u32* index, float* logprob, const D::T* x, u32 v) { \
        argmax_row<D>(index, logprob, x, v);                                                      \
    }
FOR_EACH_DTYPE(SAMPLING)
