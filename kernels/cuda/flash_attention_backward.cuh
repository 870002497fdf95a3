// What the flash-attention backward kernels share: the parameter struct of the mma.sync kernels
// (flash_attention_backward.cu) and of the wgmma main kernel (flash_attention_backward_hopper.cu).
#pragma once
#include "common.cuh"

// One call's parameters, shared by the prep, main and dq kernels of flash_attention_backward.cu and
// the Hopper main kernel of flash_attention_backward_hopper.cu (the engine fills one struct for
// either); mirrored field by field by `FlashBackwardParams` in kernels/src/flash_attention_backward.rs.
struct FlashBwdParams {
    u64 q, k, v;            // [B, H, L, D] views (element strides below), T
    u64 k_ref, v_ref;       // reference keys / values [B, H, Lr, D], T; unused when lr == 0
    u64 keep;               // u8 [B or 1, Lr], 1 = attend; 0 (null) = keep every reference token
    u64 out, dout;          // [B, H, Lq, D] views, T
    u64 lse;                // f32 [B, H, Lq] view, natural log
    u64 dq, dk, dv;         // gradients [B, H, L, D] views, T (dk, dv: own keys)
    u64 dk_ref, dv_ref;     // reference gradients [B, H, Lr, D] views, T; unused when lr == 0
    u64 dq_accum;           // f32 [B, H, Lq, D] contiguous scratch (zeroed by the prep kernel)
    u64 lse2, delta;        // f32 [B, H, lq_pad] contiguous scratch (written by the prep kernel)
    i64 q_stride[3];        // batch, head, row strides in elements (the dim stride is 1)
    i64 k_stride[3];
    i64 v_stride[3];
    i64 k_ref_stride[3];
    i64 v_ref_stride[3];
    i64 out_stride[3];
    i64 dout_stride[3];
    i64 lse_stride[3];      // batch, head, row strides of lse
    i64 dq_stride[3];
    i64 dk_stride[3];
    i64 dv_stride[3];
    i64 dk_ref_stride[3];
    i64 dv_ref_stride[3];
    i64 keep_batch_stride;  // Lr for a [B, Lr] mask, 0 for one [Lr] row shared by the batch
    u32 batch, heads, lq, lk, lr;
    u32 lq_pad;             // Lq rounded up to a multiple of 4 (16-byte rows of lse2 / delta)
    u32 d;                  // head dim (64 or 128)
    float scale;            // softmax scale
    float scale_log2;       // scale * log2(e)
    u32 pad;                // keeps the size a multiple of 8 on both sides
};
static_assert(sizeof(FlashBwdParams) == 496, "FlashBwdParams must match FlashBackwardParams in Rust");
