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
// any GluAct (act: 0 silu, 1 gelu tanh, 2 gelu erf, 3 relu): the cases swiglu and geglu do not take.
template <class D>
__device__ void glu_act(typename D::T* out, const typename D::T* gate, const typename D::T* up, u32 act, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = D::load(gate, i);
        float a;
        if (act == 0) a = g / (1.0f + expf(-g));
        else if (act == 1) a = 0.5f * g * (1.0f + tanhf(0.7978846f * (g + 0.044715f * g * g * g)));
        else if (act == 2) a = 0.5f * g * (1.0f + erff(g * 0.70710678f));
        else a = g < 0.0f ? 0.0f : g;
        D::store(out, i, up ? a * D::load(up, i) : a);
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
    }
FOR_EACH_DTYPE(MLP)
