// What the flash-attention backward kernels share: the parameter struct of the mma.sync kernels
// (flash_attention_backward.cu) and of the wgmma main kernels (flash_attention_backward_hopper.cu,
// flash_attention_backward_ws.cu), the key tile a main block owns, its keys' liveness and the dK / dV
// stores; and the per-tile steps the two wgmma kernels share (P^T, dS^T, their A fragments, the
// transposed dS stores, the K / V fragments).
#pragma once
#include "mma.cuh"

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

// Whether key `key` of the tile takes part: inside the tile and not a reference token with keep == 0.
template <typename T> __device__ __forceinline__ bool flash_bwd_live(const FlashBwdParams& p, const FlashBwdTile<T>& tile, u32 key) {
    const u8* keep = tile.reference && p.keep ? (const u8*)p.keep + blockIdx.z * p.keep_batch_stride + tile.start : nullptr;
    return key < tile.len && (keep == nullptr || keep[key] != 0);
}

// Register e (0..3) of 8-column block n of an f32 accumulator: the mma.sync kernel holds them as
// C fragments [D / 8][4], the wgmma kernels as one [D / 2] array, in the same order.
template <int N> __device__ __forceinline__ float flash_bwd_acc(const float (&a)[N][4], int n, int e) { return a[n][e]; }
template <int N> __device__ __forceinline__ float flash_bwd_acc(const float (&a)[N], int n, int e) { return a[4 * n + e]; }

// The main kernels' epilogue: dK (times scale) and dV of the thread's two keys key0, key1 (its
// accumulator rows g and g + 8: registers 0, 1 and 2, 3 of each 8-column block, columns 8 n + 2t,
// + 1), in q's dtype, into the tile's source (own or reference gradients), for keys inside the tile.
template <typename T, int D, typename Acc>
__device__ __forceinline__ void flash_bwd_store_dk_dv(const FlashBwdParams& p, const FlashBwdTile<T>& tile, u32 key0, u32 key1, u32 t, const Acc& dk, const Acc& dv) {
    const u32 bi = blockIdx.z, hi = blockIdx.y;
    const bool reference = tile.reference;
    const u32 len = tile.len;
    const i64 dk_rs = reference ? p.dk_ref_stride[2] : p.dk_stride[2];
    const i64 dv_rs = reference ? p.dv_ref_stride[2] : p.dv_stride[2];
    T* dkp = reference ? (T*)p.dk_ref + bi * p.dk_ref_stride[0] + hi * p.dk_ref_stride[1] : (T*)p.dk + bi * p.dk_stride[0] + hi * p.dk_stride[1];
    T* dvp = reference ? (T*)p.dv_ref + bi * p.dv_ref_stride[0] + hi * p.dv_ref_stride[1] : (T*)p.dv + bi * p.dv_stride[0] + hi * p.dv_stride[1];
    dkp += (i64)tile.start * dk_rs;
    dvp += (i64)tile.start * dv_rs;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const u32 col = n * 8 + 2 * t;
        if (key0 < len) {
            *(u32*)(dkp + (i64)key0 * dk_rs + col) = pack2<T>(flash_bwd_acc(dk, n, 0) * p.scale, flash_bwd_acc(dk, n, 1) * p.scale);
            *(u32*)(dvp + (i64)key0 * dv_rs + col) = pack2<T>(flash_bwd_acc(dv, n, 0), flash_bwd_acc(dv, n, 1));
        }
        if (key1 < len) {
            *(u32*)(dkp + (i64)key1 * dk_rs + col) = pack2<T>(flash_bwd_acc(dk, n, 2) * p.scale, flash_bwd_acc(dk, n, 3) * p.scale);
            *(u32*)(dvp + (i64)key1 * dv_rs + col) = pack2<T>(flash_bwd_acc(dv, n, 2), flash_bwd_acc(dv, n, 3));
        }
    }
}

#if LA_WGMMA

// ---- per-tile steps of the wgmma kernels (flash_attention_backward_hopper.cu, _ws.cu) -------------
// A warpgroup's S^T / dP^T accumulator over 64 keys x NS / 2 queries: register 4 n + e is key row g
// (e < 2) or g + 8 of the warp's 16, query 8 n + 2 t + (e & 1).

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a [rows][64] 16-bit tile of 128-byte
// rows, 128B-swizzled (chunk c of row r at c ^ (r % 8)): the layout of every 64-column block of the
// wgmma kernels' shared tiles.
__device__ __forceinline__ u32 flash_bwd_swizzle128(u32 row, u32 chunk) { return row * 128u + (((chunk % 8) ^ (row % 8)) << 4); }

// P^T = exp2(S^T scale log2(e) - lse2) on live keys, 0 elsewhere, in place; ls: the tile's lse2.
template <int NS> __device__ __forceinline__ void flash_bwd_probs(float (&s)[NS], const float* ls, float scale_log2, bool live0, bool live1, u32 t) {
#pragma unroll
    for (int n = 0; n < NS / 4; ++n) {
        const float2 l = *(const float2*)(ls + 8 * n + 2 * t);  // the thread's two queries
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const bool live = e < 2 ? live0 : live1;
            s[4 * n + e] = live ? exp2f(s[4 * n + e] * scale_log2 - (e & 1 ? l.y : l.x)) : 0.0f;
        }
    }
}

// dS^T = P^T (dP^T - delta) in place of dP^T; dls: the tile's delta.
template <int NS> __device__ __forceinline__ void flash_bwd_dscores(float (&dp)[NS], const float (&s)[NS], const float* dls, u32 t) {
#pragma unroll
    for (int n = 0; n < NS / 4; ++n) {
        const float2 dl = *(const float2*)(dls + 8 * n + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[4 * n + e] = s[4 * n + e] * (dp[4 * n + e] - (e & 1 ? dl.y : dl.x));
    }
}

// An accumulator as wgmma A fragments (P^T for dV, dS^T for dK): k-step kk (queries 16 kk ..) is
// registers 8 kk .. 8 kk + 7: a[0] row g queries 16 kk + 2t, + 1, a[1] row g + 8, a[2] row g
// queries + 8, a[3] row g + 8.
template <typename T, int KQ> __device__ __forceinline__ void flash_bwd_a_fragments(u32 (&a)[KQ][4], const float (&c)[8 * KQ]) {
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) a[kk][r] = pack2_rn<T>(c[8 * kk + 2 * r], c[8 * kk + 2 * r + 1]);
    }
}

// One query tile's dV += P^T dO and dK += dS^T Q, once its S^T and dP^T products are issued (two
// commit groups, S^T first): P^T as soon as S^T retires (dP^T still runs), dS^T as soon as dP^T
// retires (dV still runs). Leaves the dV and dK groups in flight, reading pa (P^T) and da (dS^T) as
// A fragments: the caller fences them once the groups retire. mn_major(tile, kk): the MN-major
// descriptor of k-step kk (queries 16 kk ..) of the stage's dO or Q tile (qs, dos).
template <typename T, int D, int NS, typename MnMajor>
__device__ __forceinline__ void flash_bwd_dv_dk(float (&dv)[D / 2], float (&dk)[D / 2], float (&s)[NS], float (&dp)[NS], u32 (&pa)[NS / 8][4], u32 (&da)[NS / 8][4], const unsigned char* qs,
                                                const unsigned char* dos, const MnMajor& mn_major, const float* ls, const float* dls, float scale_log2, bool live0, bool live1, u32 t) {
    constexpr int KQ = NS / 8;  // k-steps of dV, dK (over the query tile)
    wgmma_wait<1>();
    wgmma_fence_operands(s);
    flash_bwd_probs(s, ls, scale_log2, live0, live1, t);
    flash_bwd_a_fragments<T>(pa, s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) wgmma_rs<T, D, true>(dv, pa[kk], mn_major(dos, kk), true);
    wgmma_commit();

    wgmma_wait<1>();
    wgmma_fence_operands(dp);
    flash_bwd_dscores(dp, s, dls, t);
    flash_bwd_a_fragments<T>(da, dp);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) wgmma_rs<T, D, true>(dk, da[kk], mn_major(qs, kk), true);
    wgmma_commit();
}

// dS^T (ds: flash_bwd_a_fragments of it) stored transposed into the warpgroup's [queries][64 keys]
// block at `block`, the dQ product's K-major A: element (query, key 16 warp + g + 8 (r % 2)) at row
// query, chunk 2 warp + r % 2, 2 g bytes in; ds[kk][r] holds queries 16 kk + 8 (r / 2) + 2t (low
// half) and + 1 (high half).
template <int KQ> __device__ __forceinline__ void flash_bwd_store_ds_t(unsigned char* block, const u32 (&ds)[KQ][4], u32 warp, u32 g, u32 t) {
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const u32 query = 16 * kk + 8 * (r / 2) + 2 * t, chunk = 2 * warp + (r % 2);
            *(u16*)(block + flash_bwd_swizzle128(query, chunk) + 2 * g) = (u16)(ds[kk][r] & 0xffffu);
            *(u16*)(block + flash_bwd_swizzle128(query + 1, chunk) + 2 * g) = (u16)(ds[kk][r] >> 16);
        }
    }
}

// The thread's K and V rows (row0, its row g of the warp's 16, and row0 + 8) as wgmma A fragments,
// from [rows][64] tiles ks, vs (head dim 64: KD = 4 k-steps). k-step kk: [0] row g, columns 16 kk +
// 2t, + 1; [1] row g + 8; [2], [3] the same rows, columns + 8 (16-byte chunk 2 kk + 1).
template <int KD> __device__ __forceinline__ void flash_bwd_kv_fragments(u32 (&ka)[KD][4], u32 (&va)[KD][4], const unsigned char* ks, const unsigned char* vs, u32 row0, u32 t) {
    static_assert(KD <= 4, "one 64-column block");
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const u32 off = flash_bwd_swizzle128(row0 + 8 * (r % 2), 2 * kk + r / 2) + 4 * t;
            ka[kk][r] = *(const u32*)(ks + off);
            va[kk][r] = *(const u32*)(vs + off);
        }
    }
}

#endif  // LA_WGMMA
