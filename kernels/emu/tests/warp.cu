// Test kernels of the emulator's warp collectives: shuffles of every mode and width, 64-bit
// shuffles, ballot / any / all, __reduce_add_sync, __syncwarp with partial masks. Blocks of 64
// threads (two warps); results checked against the CUDA programming guide's definitions.
#include "common.cuh"

// out[q * 64 + t], q = 0 shfl (source lane in[t] % 64, which wraps modulo width), 1 shfl_up 3,
// 2 shfl_down 5, 3 shfl_xor 6, 4 ballot(in % 3 == 0), 5 any(in == t), 6 all(in >= 0),
// 7 reduce_add(in), 8 and 9: low and high words of a 64-bit shfl_xor 1 of (in << 32 | t).
extern "C" __global__ void shuffles(const int* in, int* out, int width) {
    const u32 t = threadIdx.x;
    const int v = in[t];
    const u32 full = 0xffffffffu;
    out[0 * 64 + t] = __shfl_sync(full, v, v % 64, width);
    out[1 * 64 + t] = __shfl_up_sync(full, v, 3, width);
    out[2 * 64 + t] = __shfl_down_sync(full, v, 5, width);
    out[3 * 64 + t] = __shfl_xor_sync(full, v, 6, width);
    out[4 * 64 + t] = (int)__ballot_sync(full, v % 3 == 0);
    out[5 * 64 + t] = __any_sync(full, v == (int)t);
    out[6 * 64 + t] = __all_sync(full, v >= 0);
    out[7 * 64 + t] = __reduce_add_sync(full, v);
    const long long w = __shfl_xor_sync(full, ((long long)v << 32) | t, 1);
    out[8 * 64 + t] = (int)(w & 0xffffffff);
    out[9 * 64 + t] = (int)(w >> 32);
}

// Lanes 0..15 and 16..31 of each warp shuffle within their own half-warp mask at different call
// sites (and the halves reach them in a different order): out[t] = the value of lane t ^ 1.
extern "C" __global__ void half_warp_masks(const int* in, int* out) {
    const u32 t = threadIdx.x, lane = t % 32;
    const int v = in[t];
    if (lane < 16) {
        out[t] = __shfl_xor_sync(0x0000ffffu, v, 1);
    } else {
        __syncwarp(0xffff0000u);
        out[t] = __shfl_xor_sync(0xffff0000u, v, 1);
    }
}

// Lanes t % 32 >= 20 return; __syncwarp waits for the lanes that are left (as bar.warp.sync
// does): out[t] = in[t + 1] for the live lanes except the last, read through shared memory.
extern "C" __global__ void syncwarp_after_exit(const int* in, int* out) {
    __shared__ int s[64];
    const u32 t = threadIdx.x, lane = t % 32;
    if (lane >= 20) return;
    s[t] = in[t];
    __syncwarp();
    if (lane < 19) out[t] = s[t + 1];
}
