// Test kernels that must fail under the emulator with an error naming the kernel and the
// synchronisation point, not hang: a deadlock between a block barrier and a warp shuffle,
// threads at different __syncthreads, and a full-mask shuffle after a lane returned.
#include "common.cuh"

// Lane 0 of each warp waits at __syncthreads while lanes 1..31 wait at a full-warp shuffle that
// needs lane 0.
extern "C" __global__ void barrier_vs_shuffle(float* out) {
    const u32 t = threadIdx.x;
    float v = (float)t;
    if (t % 32 == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[t] = v;
}

// The first warp waits at one barrier, the second at another.
extern "C" __global__ void different_barriers(float* out) {
    const u32 t = threadIdx.x;
    if (t < 32) {
        __syncthreads();
        out[t] = 1.0f;
    } else {
        __syncthreads();
        out[t] = 2.0f;
    }
}

// Lane 5 returns, then the warp shuffles with a full mask.
extern "C" __global__ void shuffle_after_exit(float* out) {
    const u32 t = threadIdx.x;
    if (t == 5) return;
    out[t] = __shfl_xor_sync(0xffffffffu, (float)t, 1);
}

