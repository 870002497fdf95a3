// Counter-based random numbers: Philox4x32-10 with the exact mapping of the CPU reference
// (kernels/src/rng.rs): key = (seed low word, seed high word); block b = elements 4b .. 4b+3 has
// counter (b low, b high, 0, 0); uniform u(x) = (x >> 8) * 2^-24 (exact, so bit-identical);
// normals by Box-Muller on lane pairs (0, 1) and (2, 3) in f64, rounded to f32, then every value
// is rounded to the output dtype as `half` does. Element values depend only on (seed, index), not
// on the launch. Launch: a thread per block of 4 elements, blocks of RNG_BLOCK threads,
// grid.x = ceil(ceil(n / 4) / RNG_BLOCK).
#include "common.cuh"

#define RNG_BLOCK 256

__device__ __forceinline__ void philox4x32_10(u32 (&c)[4], u32 k0, u32 k1) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        const u32 hi0 = __umulhi(M0, c[0]), lo0 = M0 * c[0];
        const u32 hi1 = __umulhi(M1, c[2]), lo1 = M1 * c[2];
        const u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

__device__ __forceinline__ float to_uniform(u32 x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

// r = sqrt(-2 ln(1 - a)), t = 2 pi c, in f64 (no contraction can apply: no multiply feeds an add).
__device__ __forceinline__ void box_muller(u32 x0, u32 x1, float& z0, float& z1) {
    const double a = (double)to_uniform(x0);
    const double c = (double)to_uniform(x1);
    const double r = sqrt(-2.0 * log(1.0 - a));
    const double t = 6.283185307179586476925286766559 * c;  // std::f64::consts::TAU
    z0 = (float)(r * cos(t));
    z1 = (float)(r * sin(t));
}

template <typename T>
__device__ __forceinline__ void random_fill(T* __restrict__ y, u64 n, u32 k0, u32 k1, int normal) {
    const u64 blk = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (blk * 4 >= n) return;
    u32 c[4] = {(u32)blk, (u32)(blk >> 32), 0u, 0u};
    philox4x32_10(c, k0, k1);
    float v[4];
    if (normal) {
        box_muller(c[0], c[1], v[0], v[1]);
        box_muller(c[2], c[3], v[2], v[3]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = to_uniform(c[k]);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
        if (blk * 4 + k < n) y[blk * 4 + k] = from_f32<T>(v[k]);
}

#define RNG_KERNEL(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(RNG_BLOCK) random_##NAME(T* y, u64 n, u32 k0, u32 k1, int normal) { \
        random_fill<T>(y, n, k0, k1, normal);                                                         \
    }
RNG_KERNEL(f32, float)
RNG_KERNEL(bf16, bf16)
RNG_KERNEL(f16, f16)
