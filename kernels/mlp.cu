// The MLP's gate, elementwise (the projections around it are GEMMs): out = silu(gate) * up (SwiGLU)
// or out = gelu_tanh(gate) * up (GeGLU, Gemma), GluAct::apply's formulas.

template <class D>
__device__ void swiglu(typename D::T* out, const typename D::T* gate, const typename D::T* up, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = D::load(gate, i);
        D::store(out, i, g / (1.0f + expf(-g)) * D::load(up, i));
    }
}

template <class D>
__device__ void geglu(typename D::T* out, const typename D::T* gate, const typename D::T* up, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = D::load(gate, i);
        const float gelu = 0.5f * g * (1.0f + tanhf(0.7978846f * (g + 0.044715f * g * g * g)));
        D::store(out, i, gelu * D::load(up, i));
    }
}

// out = act(gate) * up, or act(gate) where up is null (an MLP without a gate: GPT-2, GPT-NeoX), for
// any GluAct (act: 0 silu, 1 gelu tanh, 2 gelu erf, 3 relu, 4 squared relu): the cases swiglu and
// geglu do not take.
__device__ __forceinline__ float activation(float g, u32 act) {
    if (act == 0) return g / (1.0f + expf(-g));
    if (act == 1) return 0.5f * g * (1.0f + tanhf(0.7978846f * (g + 0.044715f * g * g * g)));
    if (act == 2) return 0.5f * g * (1.0f + erff(g * 0.70710678f));
    const float r = g < 0.0f ? 0.0f : g;
    return act == 4 ? r * r : r;
}

template <class D>
__device__ void glu_act(typename D::T* out, const typename D::T* gate, const typename D::T* up, u32 act, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float a = activation(D::load(gate, i), act);
        D::store(out, i, up ? a * D::load(up, i) : a);
    }
}

// ---- A mixture of experts on the device (the `Moe` op at decode's few tokens) ----
// The router's choice, each chosen expert's gated MLP for its token, and the weighted sum, with no
// read to the host, so that a decode step stays one graph. The experts are stacked: gate and up
// [E, I, H], down [E, H, I]. Pair p = t k + j is token t's j-th expert in ascending order, ids[p].

#define MOE_MAX_EXPERTS 512
#define MOE_MAX_TOP_K 16

// Token t's k likeliest experts (a warp a token): the softmax of its scores in f32, as HF computes
// it; k rounds of a warp-wide argmax over the experts not yet chosen (ties to the lower expert, a
// NaN the least likely: an id is always a real expert); the weights renormalized over the chosen
// (summed in the order chosen, as `route`) where asked; ids and weights written in ascending
// expert order (the order HF adds their outputs in), each weight rounded to the activations' dtype.
template <class D>
__device__ void moe_route(u32* ids, float* weights, const typename D::T* logits, u32 e, u32 k, u32 renormalize) {
    __shared__ float ex[MOE_MAX_EXPERTS];
    __shared__ u32 pick[MOE_MAX_TOP_K];
    __shared__ float prob[MOE_MAX_TOP_K];
    const u32 t = blockIdx.x, lane = threadIdx.x;
    const typename D::T* row = logits + (u64)t * e;
    float m = -INFINITY;
    for (u32 j = lane; j < e; j += 32) m = fmaxf(m, D::load(row, j));
    m = warp_max(m);
    float sum = 0.0f;
    for (u32 j = lane; j < e; j += 32) {
        ex[j] = expf(D::load(row, j) - m);
        sum += ex[j];
    }
    sum = warp_sum(sum);
    __syncwarp();
    for (u32 r = 0; r < k; r++) {
        float best = -2.0f;
        u32 at = 0xffffffffu;
        for (u32 j = lane; j < e; j += 32) {
            bool taken = false;
            for (u32 q = 0; q < r; q++) taken |= pick[q] == j;
            const float v = ex[j] == ex[j] ? ex[j] : -1.0f;
            if (!taken && v > best) {
                best = v;
                at = j;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const u32 oa = __shfl_xor_sync(0xffffffffu, at, o);
            if (ob > best || (ob == best && oa < at)) {
                best = ob;
                at = oa;
            }
        }
        if (lane == 0) pick[r] = at;
        __syncwarp();
    }
    if (lane == 0) {
        float total = 0.0f;
        for (u32 r = 0; r < k; r++) {
            prob[r] = ex[pick[r]] / sum;
            total += prob[r];
        }
        // Ascending expert order, each weight with its expert (an insertion sort of at most 16).
        for (u32 r = 1; r < k; r++) {
            const u32 id = pick[r];
            const float w = prob[r];
            u32 q = r;
            for (; q > 0 && pick[q - 1] > id; q--) {
                pick[q] = pick[q - 1];
                prob[q] = prob[q - 1];
            }
            pick[q] = id;
            prob[q] = w;
        }
        for (u32 r = 0; r < k; r++) {
            ids[(u64)t * k + r] = pick[r];
            weights[(u64)t * k + r] = D::rounded(renormalize ? prob[r] / total : prob[r]);
        }
    }
}

// out[p, r] = act(x_t . gate_e[r]) * (x_t . up_e[r]), each product rounded to the dtype first, as
// `Linear` twice and then the gate round them (t = p / k, e = ids[p], clamped to the experts): a
// warp a row, MOE_ROWS rows a block, grid (I / MOE_ROWS, pairs).
template <class D>
__device__ void moe_glu(typename D::T* out, const typename D::T* x, const typename D::T* gate, const typename D::T* up, const u32* ids,
                        u32 k, u32 h, u32 i, u32 e, u32 act) {
    const u32 p = blockIdx.y, lane = threadIdx.x & 31, r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= i) return;
    const u64 w = ((u64)min(ids[p], e - 1) * i + r) * h;
    const typename D::T* xr = x + (u64)(p / k) * h;
    float g = 0.0f, u = 0.0f;
    for (u32 c = lane; c < h; c += 32) {
        const float xv = D::load(xr, c);
        g += xv * D::load(gate, w + c);
        u += xv * D::load(up, w + c);
    }
    g = D::rounded(warp_sum(g));
    u = D::rounded(warp_sum(u));
    if (lane == 0) D::store(out, (u64)p * i + r, activation(g, act) * u);
}

// y[p, r] = a_p . down_e[r] (e = ids[p], clamped to the experts): a warp a row, MOE_ROWS rows a
// block, grid (H / MOE_ROWS, pairs).
template <class D>
__device__ void moe_down(typename D::T* y, const typename D::T* a, const typename D::T* down, const u32* ids, u32 i, u32 h, u32 e) {
    const u32 p = blockIdx.y, lane = threadIdx.x & 31, r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= h) return;
    const u64 w = ((u64)min(ids[p], e - 1) * h + r) * i;
    const typename D::T* ar = a + (u64)p * i;
    float s = 0.0f;
    for (u32 c = lane; c < i; c += 32) s += D::load(ar, c) * D::load(down, w + c);
    s = warp_sum(s);
    if (lane == 0) D::store(y, (u64)p * h + r, s);
}

// out[t] = the sum over j of weights[t k + j] * y[slot], slot = slots[t k + j] (or t k + j where
// slots is null), one add after the other from zero, each rounded to the dtype: `index_add` of
// each expert in turn (block t; its k pairs in ascending expert order); then, where shared is not
// null, its row t weighted by sigmoid(shared_gate[t]) rounded to the dtype, added the same way (Qwen
// 2 MoE's shared expert, as the model's host path adds it).
template <class D>
__device__ void moe_combine(typename D::T* out, const typename D::T* y, const u32* slots, const float* weights, u32 k, u32 h,
                            const typename D::T* shared, const typename D::T* shared_gate) {
    const u64 t = blockIdx.x;
    const float sw = shared ? D::rounded(1.0f / (1.0f + expf(-D::load(shared_gate, t)))) : 0.0f;
    for (u32 c = threadIdx.x; c < h; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 j = 0; j < k; j++) {
            const u64 pj = t * k + j, slot = slots ? slots[pj] : pj;
            acc = D::rounded(acc + weights[pj] * D::load(y, slot * h + c));
        }
        if (shared) acc = D::rounded(acc + sw * D::load(shared, t * h + c));
        D::store(out, t * h + c, acc);
    }
}

#define MLP(s, D)                                                                                     \
    extern "C" __global__ void swiglu_##s(D::T* out, const D::T* gate, const D::T* up, u64 n) { \
        PDL_ENTRY();                                                                              \
        swiglu<D>(out, gate, up, n);                                                              \
    }                                                                                             \
    extern "C" __global__ void geglu_##s(D::T* out, const D::T* gate, const D::T* up, u64 n) {  \
        PDL_ENTRY();                                                                              \
        geglu<D>(out, gate, up, n);                                                               \
    }                                                                                             \
    extern "C" __global__ void glu_act_##s(D::T* out, const D::T* gate, const D::T* up, u32 act, u64 n) { \
        glu_act<D>(out, gate, up, act, n);                                                        \
    }                                                                                             \
    extern "C" __global__ void moe_route_##s(u32* ids, float* weights, const D::T* logits, u32 e, u32 k, u32 renormalize) { \
        PDL_ENTRY();                                                                              \
        moe_route<D>(ids, weights, logits, e, k, renormalize);                                    \
    }                                                                                             \
    extern "C" __global__ void moe_glu_##s(D::T* out, const D::T* x, const D::T* gate, const D::T* up, const u32* ids, u32 k, \
                                           u32 h, u32 i, u32 e, u32 act) {                        \
        PDL_ENTRY();                                                                              \
        moe_glu<D>(out, x, gate, up, ids, k, h, i, e, act);                                       \
    }                                                                                             \
    extern "C" __global__ void moe_down_##s(D::T* y, const D::T* a, const D::T* down, const u32* ids, u32 i, u32 h, u32 e) { \
        PDL_ENTRY();                                                                              \
        moe_down<D>(y, a, down, ids, i, h, e);                                                    \
    }                                                                                             \
    extern "C" __global__ void moe_combine_##s(D::T* out, const D::T* y, const u32* slots, const float* weights, u32 k, u32 h, \
                                               const D::T* shared, const D::T* shared_gate) {     \
        PDL_ENTRY();                                                                              \
        moe_combine<D>(out, y, slots, weights, k, h, shared, shared_gate);                        \
    }
FOR_EACH_DTYPE(MLP)
