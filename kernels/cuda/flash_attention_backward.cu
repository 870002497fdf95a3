// Flash extended attention, backward (work in progress: the delta preprocess).
#include "common.cuh"

// delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] in f32, one warp a row.
template <typename T>
__device__ void flash_bwd_delta(const T* out, const T* dout, float* delta, u32 rows, u32 d) {
    u32 warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= rows) return;
    float acc = 0.0f;
    for (u32 c = lane; c < d; c += 32) acc += to_f32(out[(u64)warp * d + c]) * to_f32(dout[(u64)warp * d + c]);
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[warp] = acc;
}
extern "C" __global__ void flash_bwd_delta_bf16(const bf16* out, const bf16* dout, float* delta, u32 rows, u32 d) { flash_bwd_delta(out, dout, delta, rows, d); }
