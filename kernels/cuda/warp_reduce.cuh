// Sums and maxima across the threads of a warp, or of a row of threads that is either one warp or
// a whole block: the reductions of the row kernels (softmax, norms, reductions) in one place.
#pragma once
#include "common.cuh"

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum / max over the threads of a row: a warp when tpr == 32, else the whole block; every thread
// gets the result. Whole-block calls are made by every thread of the block (tpr is uniform per
// launch). `sm` holds a float per warp.
__device__ __forceinline__ float row_sum(float v, u32 tpr, float* sm) {
    v = warp_sum(v);
    if (tpr == 32) return v;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // a previous call may still be reading sm
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sm[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float row_max(float v, u32 tpr, float* sm) {
    v = warp_max(v);
    if (tpr == 32) return v;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sm[lane] : __int_as_float(0xff800000);
    return warp_max(v);
}

// Max / sum over the tpr threads of a row when a block holds several rows (tpr a power of two,
// 32..1024; every thread gets its row's result): a warp's shuffles, then, for rows wider than a
// warp, the row's warp results through shared memory `sm` (a float per warp of the block; one
// `sm` per reduction, so no barrier is needed before writing it).
__device__ __forceinline__ float rows_group_max(float v, u32 tpr, float* sm) {
    v = warp_max(v);
    if (tpr <= 32) return v;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpr = tpr >> 5;
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    const u32 first = warp - warp % wpr;
    v = lane < wpr ? sm[first + lane] : __int_as_float(0xff800000);
    return warp_max(v);
}
__device__ __forceinline__ float rows_group_sum(float v, u32 tpr, float* sm) {
    v = warp_sum(v);
    if (tpr <= 32) return v;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpr = tpr >> 5;
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    const u32 first = warp - warp % wpr;
    v = lane < wpr ? sm[first + lane] : 0.0f;
    return warp_sum(v);
}
