// What the flash-attention forward kernels share: flash_attention_fwd_* and
// flash_attention_decoupled_fwd_* (flash_attention.cu, mma.sync) and flash_attention_hopper_fwd_*
// (flash_attention_hopper.cu, wgmma) take the same parameter struct, so the engine fills one
// `FlashParams` for either, and reduce a row of an accumulator over the same 4 lanes.
#pragma once
#include "common.cuh"

#define FA_NEG_INF __uint_as_float(0xff800000u)

// One call's parameters; mirrored field by field by `FlashParams` in kernels/src/flash_attention.rs.
// In the decoupled mode k/v are source 1 and k_ref/v_ref source 2, and keep must be 0. The Hopper
// kernel has no decoupled mode: lse2 and decoupled_scale are unused there.
struct FlashParams {
    u64 q, k, v;           // [B, H, L, D] views (element strides below), T
    u64 k_ref, v_ref;      // reference keys / values [B, H, Lr, D], T; unused when lr == 0
    u64 keep;              // u8 [B or 1, Lr], 1 = attend; 0 (null) = keep every reference token
    u64 out;               // [B, H, Lq, D] view, T
    u64 lse;               // f32 [B, H, Lq] contiguous, natural log (decoupled mode: of source 1)
    u64 lse2;              // decoupled mode: f32 [B, H, Lq] lse of source 2 (the reference slot); unused otherwise
    i64 q_stride[3];       // batch, head, row strides of q in elements (the dim stride is 1)
    i64 k_stride[3];
    i64 v_stride[3];
    i64 k_ref_stride[3];
    i64 v_ref_stride[3];
    i64 out_stride[3];
    i64 keep_batch_stride; // Lr for a [B, Lr] mask, 0 for one [Lr] row shared by the batch
    u32 heads, lq, lk, lr;
    float scale_log2;      // scale * log2(e): scores go to exp2 directly
    float decoupled_scale; // decoupled mode: s2, the weight of source 2's output; unused otherwise
};

// Sum / max over the 4 lanes (t = 0..3) that hold one row of an mma (or wgmma) C fragment.
__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
