// Test kernels of the emulator's schedules: kernels with and without a __syncthreads that only
// some thread orders expose (tests/cuda_emulation.rs runs them under each schedule). Blocks of
// 128 threads (4 warps); the work between barriers goes through warp collectives, as in the
// tensor-core kernels, so that a schedule keeping the warps in step (round-robin) hides the bug.
#include "common.cuh"
#include "mma.cuh"

#define RACE_THREADS 128
#define RACE_STAGE 512  // floats per pipeline stage: one 16-byte chunk per thread

// A double-buffered cp.async pipeline like flash_attention.cu's key loop: tile j + 1 is
// prefetched into stage (j + 1) % 2 while tile j is consumed from stage j % 2. Every warp reads
// the whole stage: lane l of warp w sums the floats at l, l + 32, ... of the stage rotated by
// 128 w, then the warp reduces by shuffles; out[j * 4 + w] = that sum (lane 0 writes it).
// With end_barrier = 0 the __syncthreads at the end of the iteration is left out: a warp that is
// ahead then issues the prefetch of tile j + 2 into stage j % 2 while a slower warp still reads
// tile j there (the bug the far-apart schedule must expose). Launch: (1, 1, 1) x RACE_THREADS,
// src of tiles * RACE_STAGE floats, 16-byte aligned.
extern "C" __global__ void pipeline_stage_reuse(const float* src, float* out, u32 tiles, int end_barrier) {
    __shared__ __align__(16) float stage[2][RACE_STAGE];
    const u32 t = threadIdx.x, warp = t / 32, lane = t % 32;
    cp_async_16(&stage[0][4 * t], src + 4 * t, true);
    cp_async_commit();
    for (u32 j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) cp_async_16(&stage[(j + 1) % 2][4 * t], src + (j + 1) * RACE_STAGE + 4 * t, true);
        cp_async_commit();
        cp_async_wait<1>();  // tile j has landed (this thread's chunk)
        __syncthreads();     // ... and every other thread's
        float sum = 0.0f;
        for (u32 i = lane; i < RACE_STAGE; i += 32) sum += stage[j % 2][(i + 128 * warp) % RACE_STAGE];
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) out[j * 4 + warp] = sum;
        if (end_barrier) __syncthreads();  // every warp is done with stage j % 2 before tile j + 2 overwrites it
    }
    cp_async_wait<0>();
}

// Block sum through shared memory: each warp reduces its values by shuffles, lane 0 stores the
// warp's sum in s[warp], and every thread then adds the 4 warp sums: out[block * 128 + t] =
// sum of in[block * 128 ..][0 .. 128). With sync = 0 the exchange is fenced by __syncwarp only
// (a warp reads the other warps' sums before they are written: the bug far-apart must expose).
// Launch: (blocks, 1, 1) x RACE_THREADS, 4 floats of dynamic shared memory.
extern "C" __global__ void block_sum_exchange(const float* in, float* out, int sync) {
    LA_DYNAMIC_SHARED(float, s);
    const u32 t = threadIdx.x, warp = t / 32, lane = t % 32;
    float v = in[blockIdx.x * RACE_THREADS + t];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) s[warp] = v;
    if (sync) __syncthreads();
    else __syncwarp();
    out[blockIdx.x * RACE_THREADS + t] = s[0] + s[1] + s[2] + s[3];
}

// Warp 0 spins (with __syncwarp in the loop) until warp 1 sets a shared flag; no block barrier
// between them. Every schedule must let warp 1 run: far-apart hands over after its step limit.
// out[t] (t < 32) = the flag value warp 0 sees once it is set. Launch: (1, 1, 1) x 64.
extern "C" __global__ void spin_on_flag(int* out) {
    __shared__ volatile int flag;
    const u32 t = threadIdx.x;
    if (t == 0) flag = 0;
    __syncthreads();
    if (t < 32) {
        while (flag == 0) __syncwarp();
        out[t] = flag;
    } else if (t == 32) {
        flag = 7;
    }
}
