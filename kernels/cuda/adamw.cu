// Fused AdamW step: one pass reads the f32 parameter, the gradient (f32, bf16 or f16), the f32
// moments m and v, writes back the parameter and both moments, and optionally (copy != 0) a bf16
// copy of the updated parameter (the model's low-precision weights). The math and its operation
// order are the CPU reference's (kernels/src/adamw.rs, torch.optim.AdamW single-tensor), with the
// scalars formed on the host in f64 as there; compiled with --fmad=false and IEEE sqrt/div so
// that the result is bit-identical to the CPU's.
// Launch contract (engine/src/ops/adamw.rs): all tensors contiguous and distinct; blocks of
// AW_BLOCK threads, one element per thread per step of a grid-stride loop, any grid
// (launch::strided_config).
#include "common.cuh"

#define AW_BLOCK 256

template <typename G>
__device__ __forceinline__ void adamw(float* __restrict__ p, const G* __restrict__ grad, float* __restrict__ m, float* __restrict__ v, bf16* __restrict__ copy, u64 n,
                                      float decay, float one_minus_beta1, float beta2, float one_minus_beta2, float bc2_sqrt, float step_size, float eps) {
    const u64 step = (u64)gridDim.x * AW_BLOCK;
    for (u64 i = (u64)blockIdx.x * AW_BLOCK + threadIdx.x; i < n; i += step) {
        const float g = to_f32(grad[i]);
        float pi = p[i] * decay;
        float mi = m[i];
        mi += one_minus_beta1 * (g - mi);
        const float vi = v[i] * beta2 + one_minus_beta2 * g * g;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi -= step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (copy) copy[i] = from_f32<bf16>(pi);
    }
}

#define ADAMW_KERNEL(NAME, G)                                                                         \
    extern "C" __global__ void __launch_bounds__(AW_BLOCK) adamw_##NAME(float* p, const G* grad, float* m, float* v, bf16* copy, u64 n, \
        float decay, float one_minus_beta1, float beta2, float one_minus_beta2, float bc2_sqrt, float step_size, float eps) { \
        adamw(p, grad, m, v, copy, n, decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, step_size, eps); \
    }
ADAMW_KERNEL(f32, float)
ADAMW_KERNEL(bf16, bf16)
ADAMW_KERNEL(f16, f16)
