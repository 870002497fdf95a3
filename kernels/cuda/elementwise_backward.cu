// Backward of the element-wise unary maps: dx = dy * op'(x), with the derivatives of the CPU
// reference (kernels/src/elementwise_backward.rs) computed in f32; op codes and parameters are
// kernels::elementwise::UnaryOp::cuda_code's (the same as unary_* in elementwise.cu).
// Launch contract (engine/src/cuda/elementwise_backward.rs): x and dy with any strides over the
// same shape (StridedArgs<2>, coalesced on the host: a dense pair becomes one dimension), dx
// contiguous; blocks of EWB_BLOCK threads, grid-stride loop, any grid with grid * EWB_BLOCK < 2^31
// (launch::strided_config); 32-bit index math unless `wide`.
#include "common.cuh"

#define EWB_BLOCK 256

// Large (range reduction, special cases) and rare: called, not inlined into every op.
__device__ __noinline__ float call_sinf(float x) { return sinf(x); }
__device__ __noinline__ float call_cosf(float x) { return cosf(x); }
__device__ __noinline__ float call_powf(float x, float y) { return powf(x, y); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float derivative(int op, float x, float p0, float p1) {
    switch (op) {
    case 0: return -1.0f;                                              // Neg
    case 1: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);        // Abs
    case 2: return 2.0f * x;                                           // Sqr
    case 3: return 0.5f / sqrtf(x);                                    // Sqrt
    case 4: return -0.5f / (x * sqrtf(x));                             // Rsqrt
    case 5: return -1.0f / (x * x);                                    // Recip
    case 6: return expf(x);                                            // Exp
    case 7: return 1.0f / x;                                           // Log
    case 8: return call_cosf(x);                                       // Sin
    case 9: return -call_sinf(x);                                      // Cos
    case 10: {                                                         // Tanh
        const float t = tanhf(x);
        return 1.0f - t * t;
    }
    case 11: {                                                         // Sigmoid
        const float s = sigmoid(x);
        return s * (1.0f - s);
    }
    case 12: {                                                         // Silu
        const float s = sigmoid(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case 13: return x > 0.0f ? 1.0f : 0.0f;                            // Relu
    case 14: {                                                         // Gelu (erf): Phi(x) + x phi(x)
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        return cdf + x * 0.3989423f * expf(-0.5f * x * x);
    }
    case 15: {                                                         // GeluTanh
        const float c = 0.7978846f;
        const float t = tanhf(c * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case 16: return p0;                                                // Affine { mul, add }
    case 17: return p0 == 0.0f ? 0.0f : p0 * call_powf(x, p0 - 1.0f);  // Powf
    case 18: return (x >= p0 && x <= p1) ? 1.0f : 0.0f;                // Clamp { min, max }
    case 19: return x > 0.0f ? 1.0f : p0;                              // LeakyRelu
    default: return 0.0f;
    }
}

template <typename I, typename T>
__device__ __forceinline__ void unary_backward(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, u64 n, const StridedArgs<2>& s, int op, float p0, float p1) {
    const I step = (I)gridDim.x * EWB_BLOCK;
    for (I i = (I)blockIdx.x * EWB_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[2];
        strided_offsets<I, 2>(i, s, off);
        dx[i] = from_f32<T>(to_f32(dy[off[1]]) * derivative(op, to_f32(x[off[0]]), p0, p1));
    }
}

#define UNARY_BACKWARD_KERNEL(NAME, T)                                                                \
    extern "C" __global__ void __launch_bounds__(EWB_BLOCK) unary_backward_##NAME(                   \
        const T* x, const T* dy, T* dx, u64 n, StridedArgs<2> s, int wide, int op, float p0, float p1) { \
        if (wide) unary_backward<u64>(x, dy, dx, n, s, op, p0, p1);                                   \
        else unary_backward<u32>(x, dy, dx, n, s, op, p0, p1);                                        \
    }
UNARY_BACKWARD_KERNEL(f32, float)
UNARY_BACKWARD_KERNEL(bf16, bf16)
UNARY_BACKWARD_KERNEL(f16, f16)
