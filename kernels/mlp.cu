// The MLP's gate: out = silu(gate) * up, elementwise (the projections around it are GEMMs).

template <class D>
__device__ void swiglu(typename D::T* out, const typename D::T* gate, const typename D::T* up, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = D::load(gate, i);
        D::store(out, i, g / (1.0f + expf(-g)) * D::load(up, i));
    }
}

#define MLP(s, D)                                                                                     \
    extern "C" __global__ void swiglu_##s(D::T* out, const D::T* gate, const D::T* up, u64 n) { \
        swiglu<D>(out, gate, up, n);                                                              \
    }
FOR_EACH_DTYPE(MLP)
