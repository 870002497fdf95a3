// What the flash-attention forward kernels share: flash_attention_fwd_* and
// flash_attention_decoupled_fwd_* (flash_attention.cu, mma.sync) and flash_attention_hopper_fwd_*
// (flash_attention_hopper.cu, wgmma) and the warp-specialized flash_attention_ws.cu take the same
// parameter struct, so the engine fills one `FlashParams` for any, and reduce a row of an
// accumulator over the same 4 lanes; the Hopper kernels' "poly" variants share fh_exp2_poly, and
// the two wgmma kernels (flash_attention_hopper.cu, flash_attention_ws.cu) their per-tile softmax,
// P V product, end-of-step rescale and epilogue.
#pragma once
#include "common.cuh"
#include "mma.cuh"

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

// 2^x for x <= 0 on the FMA and integer pipes instead of MUFU.EX2 (FlashAttention-4's trick: the
// softmax of a D 64 tile needs as many MUFU cycles as its two products need tensor-core cycles, so
// moving a part of the exponentials to the 8x wider FMA pipe shortens the softmax phase). x is
// clamped at -126 (a masked -inf too), so that 2^x is at least 2^-126 * 0.7 with a non-negative
// exponent field; adding 1.5 * 2^23 rounds x to the nearest integer j, kept in the low mantissa
// bits of t; f = x - j is in [-0.5, 0.5] and 2^f a degree-3 minimax polynomial (relative error
// 7.5e-5, well inside the 2^-9 of bf16 and 2^-11 of f16 that P is rounded to); then j is added to
// the exponent field: (bits(t) << 23) is j << 23 modulo 2^32, the magic's own bits shifting out.
// Results below 2^-126 are tiny but not 0 (MUFU with flush-to-zero gives 0): < 1.2e-38, nothing
// next to the row max's 1; a row with no key at all has no such 1, and fa_store_out_lse tests its
// max, not its sum. tests/flash_attention_hopper_emulated.rs checks it against exp2
// (through flash_attention_hopper_exp2_poly).
__host__ __device__ __forceinline__ float fh_exp2_poly(float x) {
    x = fmaxf(x, -126.0f);
    const float t = __fadd_rn(x, 12582912.0f);
    const float f = __fsub_rn(x, __fsub_rn(t, 12582912.0f));
    float p = fmaf(0.05517143756151199f, f, 0.24261081218719482f);
    p = fmaf(p, f, 0.6932609677314758f);
    p = fmaf(p, f, 0.9999281167984009f);
    return __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
}

// ---- the Hopper kernels' per-tile softmax (flash_attention_hopper.cu, flash_attention_ws.cu) ------
// One warpgroup's 64 x 128 tile of scores s in the wgmma accumulator layout: register 4 n + e of
// the thread (lane 4 g + t of its warp) holds row g + 8 (e >> 1), column 8 n + 2 t + (e & 1).

// The online softmax step of the tile: dropped keys -inf (when `check`); per row (h = 0: row g,
// h = 1: row g + 8; registers 4 n + 2 h, + 1) the new max m (base-2 units: the scale, > 0 by the
// host's guarantee, is applied inside the exponent, exp2(s scale_log2 - max), one FFMA), corr the
// factor O and l take, s <- exp2(s scale_log2 - max) (every POLY-th 8-column block by
// fh_exp2_poly on the FMA pipe when POLY > 0), l += the row's sum.
template <int POLY>
__device__ __forceinline__ void fa_softmax_tile(float (&s)[64], bool check, const u32 (&drop)[2], float scale_log2, float (&m)[2], float (&l)[2], float (&corr)[2]) {
    if (check) {
#pragma unroll
        for (int n = 0; n < 16; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[4 * n + e] = (drop[e & 1] >> (2 * n)) & 1u ? FA_NEG_INF : s[4 * n + e];
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float mx = FA_NEG_INF;
#pragma unroll
        for (int n = 0; n < 16; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]));
        const float m_new = fmaxf(m[h], fa_quad_max(mx) * scale_log2);
        // A row with no key so far keeps max -inf; subtract 0 instead so that exp2 gives 0, not NaN.
        const float base = m_new == FA_NEG_INF ? 0.0f : m_new;
        corr[h] = exp2f(m[h] - base);
        m[h] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            const float x0 = fmaf(s[4 * n + 2 * h], scale_log2, -base);
            const float x1 = fmaf(s[4 * n + 2 * h + 1], scale_log2, -base);
            if (POLY > 0 && n % POLY == POLY - 1) {
                s[4 * n + 2 * h] = fh_exp2_poly(x0);
                s[4 * n + 2 * h + 1] = fh_exp2_poly(x1);
            } else {
                s[4 * n + 2 * h] = exp2f(x0);
                s[4 * n + 2 * h + 1] = exp2f(x1);
            }
            sum += s[4 * n + 2 * h] + s[4 * n + 2 * h + 1];
        }
        l[h] = l[h] * corr[h] + sum;
    }
}

#if LA_WGMMA
// The dropped keys of a 128-key tile (`check` tiles only: past the source's length `len`, reference
// tokens with keep 0) as fa_softmax_tile's bits, read while S is computed: lane l looks at columns
// 4 l .. 4 l + 3 (one coalesced 128-byte read a warp) and four ballots give every lane all 128
// bits. Column 8 n + 2 t + c is bit 2 (t % 2) + c of lane 2 n + t / 2, so after the shift by t / 2
// the thread finds it at bit 2 n of drop[c].
__device__ __forceinline__ void fa_drop_bits(u32 (&drop)[2], bool reference, u32 start, u32 len, const u8* keep, u32 lane, u32 t) {
    u32 ballot[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const u32 col = 4 * lane + c;
        ballot[c] = __ballot_sync(0xffffffffu, col >= len || (reference && keep != nullptr && keep[start + col] == 0));
    }
    drop[0] = ((t & 1) ? ballot[2] : ballot[0]) >> (t / 2);
    drop[1] = ((t & 1) ? ballot[3] : ballot[1]) >> (t / 2);
}

// O += P V over a tile of 128 keys (8 k-steps; P from registers as wgmma_rs A fragments), V the
// MN-major stage at v_stage: k-step kk is keys 16 kk .. + 15, 2048 bytes further; a D 128 tile's
// 64-column blocks are LBO apart (in the descriptor). One commit group.
template <typename T, int D> __device__ __forceinline__ void fa_issue_pv(float (&o)[D / 2], const u32 (&pa)[8][4], u64 v_stage) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs<T, D, true>(o, pa[kk], v_stage + kk * 16 * 128 / 16, true);
    wgmma_commit();
}

// The end of a step once its P V product has retired (the caller fences o and pa): O, in the
// frame of the old row max, takes the factor corr (rows g, g + 8), and the tile's probabilities s
// become the next P V's A fragments: k-step kk (keys 16 kk ..) is accumulator blocks 2 kk and
// 2 kk + 1 (registers 8 kk .. 8 kk + 7): pa[kk][0] row g keys 2t.., [1] row g + 8, [2] row g keys
// 8 + 2t.., [3] row g + 8.
template <typename T, int D> __device__ __forceinline__ void fa_rescale_o_pack_p(float (&o)[D / 2], u32 (&pa)[8][4], const float (&s)[64], const float (&corr)[2]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        o[4 * n] *= corr[0];
        o[4 * n + 1] *= corr[0];
        o[4 * n + 2] *= corr[1];
        o[4 * n + 3] *= corr[1];
    }
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) pa[kk][r] = pack2_rn<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
    }
}

// The epilogue of a warp's 16 query rows (row16: the first, in the sequence): full row sums over
// the quad, then out = O / l (0 for a row with no key) and lse = ln 2 (m + log2 l), -inf for such
// a row; rows past Lq are not written. bi, hi: batch entry and head.
template <typename T, int D>
__device__ __forceinline__ void fa_store_out_lse(const FlashParams& p, const float (&o)[D / 2], const float (&m)[2], const float (&l)[2], u32 bi, u32 hi, u32 row16, u32 g, u32 t) {
    T* out = (T*)p.out + bi * p.out_stride[0] + hi * p.out_stride[1];
    float* lse = (float*)p.lse + ((u64)bi * p.heads + hi) * p.lq;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = fa_quad_sum(l[h]);
        const u32 row = row16 + g + 8 * h;
        // A row with no key left has max -inf. Its sum is 0 only by flush-to-zero when part of
        // its exponentials came from fh_exp2_poly (2^-126, not 0, for -inf): test the max.
        const bool any = m[h] != FA_NEG_INF && sum > 0.0f;
        const float inv = any ? 1.0f / sum : 0.0f;
        if (row < p.lq) {
            T* orow = out + (i64)row * p.out_stride[2];
#pragma unroll
            for (int n = 0; n < D / 8; ++n) *(u32*)(orow + n * 8 + 2 * t) = pack2<T>(o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv);
            if (t == 0) lse[row] = any ? (m[h] + log2f(sum)) * 0.69314718055994531f : FA_NEG_INF;
        }
    }
}
#endif  // LA_WGMMA
