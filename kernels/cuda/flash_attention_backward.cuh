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

// The key tile a backward main block owns and where its operands start. blockIdx.x runs over the
// own keys' tiles of bc keys, then the reference keys' (no tile straddles the two sources);
// blockIdx.y is the head, blockIdx.z the batch entry. Values are selected one by one (no pointer
// into the parameter struct, which would force a local copy of it).
template <typename T> struct FlashBwdTile {
    bool reference;   // a tile of reference keys
    u32 start, len;   // first key of the tile in its source, keys from there to the source's end
    i64 k_rs, v_rs;   // row strides of the tile's K and V
    const T *k, *v;   // the tile's first key / value row
    const T *q, *dout;                // this (batch, head)'s rows
    const float *lse2, *delta;        // this (batch, head)'s prep-kernel rows
    float* dq_accum;                  // this (batch, head)'s f32 dQ accumulator, [Lq][d]
};
template <typename T> __device__ __forceinline__ FlashBwdTile<T> flash_bwd_tile(const FlashBwdParams& p, u32 bc, u32 d) {
    const u32 bi = blockIdx.z, hi = blockIdx.y, j = blockIdx.x;
    const u32 own_tiles = (p.lk + bc - 1) / bc;
    FlashBwdTile<T> t;
    t.reference = j >= own_tiles;
    t.start = (t.reference ? j - own_tiles : j) * bc;
    t.len = (t.reference ? p.lr : p.lk) - t.start;
    t.k_rs = t.reference ? p.k_ref_stride[2] : p.k_stride[2];
    t.v_rs = t.reference ? p.v_ref_stride[2] : p.v_stride[2];
    t.k = (t.reference ? (const T*)p.k_ref + bi * p.k_ref_stride[0] + hi * p.k_ref_stride[1] : (const T*)p.k + bi * p.k_stride[0] + hi * p.k_stride[1]) + (i64)t.start * t.k_rs;
    t.v = (t.reference ? (const T*)p.v_ref + bi * p.v_ref_stride[0] + hi * p.v_ref_stride[1] : (const T*)p.v + bi * p.v_stride[0] + hi * p.v_stride[1]) + (i64)t.start * t.v_rs;
    t.q = (const T*)p.q + bi * p.q_stride[0] + hi * p.q_stride[1];
    t.dout = (const T*)p.dout + bi * p.dout_stride[0] + hi * p.dout_stride[1];
    const u64 bh = (u64)bi * p.heads + hi;
    t.lse2 = (const float*)p.lse2 + bh * p.lq_pad;
    t.delta = (const float*)p.delta + bh * p.lq_pad;
    t.dq_accum = (float*)p.dq_accum + bh * p.lq * d;
    return t;
}
