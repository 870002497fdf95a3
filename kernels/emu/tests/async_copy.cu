// Test kernel of the emulator's cp.async (mma.cuh: cp_async_16 / cp_async_commit /
// cp_async_wait<N>): the destination holds 0xff bytes (NaN) from the issue until a wait retires
// the copy's group, so a kernel that reads before waiting sees poison. One block of 32 threads.
#include "common.cuh"
#include "mma.cuh"

// Thread t copies src[4t .. 4t + 3] into buf[0] (group 0) and src[128 + 4t ..] into buf[1]
// (group 1, zero-filled for odd t), and records buf at three points: before any wait, after
// cp_async_wait<1> (group 0 retired, group 1 still in flight), after cp_async_wait<0>.
// snap[p * 256 + j], p = 0, 1, 2; j < 128 from buf[0], j >= 128 from buf[1].
extern "C" __global__ void cp_async_groups(const float* src, float* snap) {
    __shared__ __align__(16) float buf[2][128];
    const u32 t = threadIdx.x;
    for (int k = 0; k < 4; ++k) {
        buf[0][4 * t + k] = -1.0f;
        buf[1][4 * t + k] = -2.0f;
    }
    cp_async_16(&buf[0][4 * t], src + 4 * t, true);
    cp_async_commit();
    cp_async_16(&buf[1][4 * t], src + 128 + 4 * t, t % 2 == 0);
    cp_async_commit();
    for (int k = 0; k < 4; ++k) {
        snap[0 * 256 + 4 * t + k] = buf[0][4 * t + k];
        snap[0 * 256 + 128 + 4 * t + k] = buf[1][4 * t + k];
    }
    cp_async_wait<1>();
    for (int k = 0; k < 4; ++k) {
        snap[1 * 256 + 4 * t + k] = buf[0][4 * t + k];
        snap[1 * 256 + 128 + 4 * t + k] = buf[1][4 * t + k];
    }
    cp_async_wait<0>();
    for (int k = 0; k < 4; ++k) {
        snap[2 * 256 + 4 * t + k] = buf[0][4 * t + k];
        snap[2 * 256 + 128 + 4 * t + k] = buf[1][4 * t + k];
    }
}

// A double-buffered pipeline as the tensor-core kernels use it: stage s + 1 is issued before
// stage s is consumed; with `wait` = 1 each thread waits for its stage (cp_async_wait<1>) and the
// block syncs before reading another thread's data; with `wait` = 0 the wait is left out (the
// bug the emulator must expose: the reads then see the in-flight poison). Block of 64 threads, each
// copies 16 bytes of a stage of 256 floats; out[s * 256 + j] = the stage's element read by
// thread (j / 4 + 1) % 64 (another thread's copy).
extern "C" __global__ void cp_async_pipeline(const float* src, float* out, u32 stages, int wait) {
    __shared__ __align__(16) float buf[2][256];
    const u32 t = threadIdx.x;
    for (int k = 0; k < 4; ++k) buf[0][4 * t + k] = buf[1][4 * t + k] = -1.0f;
    __syncthreads();
    cp_async_16(&buf[0][4 * t], src + 4 * t, true);
    cp_async_commit();
    for (u32 s = 0; s < stages; ++s) {
        if (s + 1 < stages) cp_async_16(&buf[(s + 1) % 2][4 * t], src + (s + 1) * 256 + 4 * t, true);
        cp_async_commit();  // possibly empty group: keeps the group count uniform
        if (wait) cp_async_wait<1>();
        __syncthreads();
        const u32 o = (t + 1) % 64;
        for (int k = 0; k < 4; ++k) out[s * 256 + 4 * t + k] = buf[s % 2][4 * o + k];
        __syncthreads();  // the buffer is overwritten by the copy issued next iteration
    }
}
