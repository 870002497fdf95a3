// Test kernels of the emulator's block-level behaviour: __syncthreads with threads that returned
// early, __syncthreads_count, dynamic shared memory (LA_DYNAMIC_SHARED, poisoned with 0xff bytes
// before each block), blockIdx / threadIdx in 3-D launches, and the f16 conversions common.cuh
// takes from the emulator.
#include "common.cuh"

// Threads t >= live return at once; the others write t to shared memory, sync, and read the
// reversed index among the live threads: out[t] = live - 1 - t. out[live + t] (t == 0) = the
// __syncthreads_count of (t % 3 == 0) over the live threads.
extern "C" __global__ void early_exit_barrier(int* out, u32 live) {
    __shared__ int s[1024];
    const u32 t = threadIdx.x;
    if (t >= live) return;
    s[t] = (int)t;
    __syncthreads();
    out[t] = s[live - 1 - t];
    const int c = __syncthreads_count(t % 3 == 0);
    if (t == 0) out[live] = c;
}

// Dynamic shared memory of n floats: out[0 .. n) = what each thread read before writing (the
// poison), then out[n + t] = the value written by thread n - 1 - t.
extern "C" __global__ void dynamic_shared(float* out, u32 n) {
    LA_DYNAMIC_SHARED(float, s);
    const u32 t = threadIdx.x;
    out[t] = s[t];
    __syncthreads();
    s[t] = 100.0f + (float)t;
    __syncthreads();
    out[n + t] = s[n - 1 - t];
}

// out[((bz * gy + by) * gx + bx) * threads + tid] = packed (block, thread) coordinates.
extern "C" __global__ void coordinates(u32* out) {
    const u32 threads = blockDim.x * blockDim.y * blockDim.z;
    const u32 tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const u32 block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    out[block * threads + tid] = (blockIdx.x << 24) | (blockIdx.y << 20) | (blockIdx.z << 16) | (threadIdx.x << 8) | (threadIdx.y << 4) | threadIdx.z;
}

// bits[i] = from_f32<f16>(x[i]); back[i] = to_f32 of f16 pattern i (i < 65536). One thread.
extern "C" __global__ void f16_conversions(const float* x, u16* bits, u32 n, float* back) {
    for (u32 i = 0; i < n; ++i) bits[i] = from_f32<f16>(x[i]).bits;
    for (u32 i = 0; i < 65536; ++i) back[i] = to_f32(f16{(u16)i});
}
