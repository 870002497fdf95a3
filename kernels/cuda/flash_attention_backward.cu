// Flash extended attention, backward (FlashAttention-2 style, sm_80+, tensor cores through mma.cuh
// only). Keys/values are [own (Lk) ; reference (Lr)], reference tokens with keep == 0 left out; the
// forward saved lse_i = ln sum_j exp(scale q_i . key_j) (f32). With delta_i = dout_i . out_i:
//   P = exp(scale Q K^T - lse)   dV = P^T dO   dP = dO V^T   dS = P * (dP - delta)
//   dK = scale dS^T Q            dQ = scale dS K
// Three kernels, launched by engine/src/cuda/flash_attention_backward.rs:
//   flash_bwd_prep_DT: one warp per row of [B, H, Lq_pad] (8 rows per 256-thread block, 1-D grid):
//     delta = rowsum(dout * out), lse2 = lse * log2(e) (+inf for a row with no key, and for the
//     padding rows Lq <= i < Lq_pad, so that their P is exactly 0), and zeroes the row of dq_accum.
//   flash_bwd_DT_dD: grid (own key tiles + reference key tiles, H, B), FAB_WARPS(D) * 32 threads.
//     A block owns one key tile of BC = 16 * WARPS keys (own tiles first, then reference tiles;
//     never one straddling both, each source with its own edge tile), holds K_j, V_j in shared
//     memory and accumulates dK_j, dV_j in registers (warp w: keys 16w..16w+15, the C fragments of
//     16 x D) while it loops over the query tiles of BR rows: Q_i, dO_i, lse2_i, delta_i stream
//     through two cp.async stages (tile i + 1 loads while tile i computes). Per query tile, warp w
//     computes the transposed products for its 16 keys: S^T = K_w Q^T, P^T = exp2(S^T scale
//     log2(e) - lse2), dP^T = V_w dO^T, dS^T = P^T (dP^T - delta); then dV += P^T dO and
//     dK += dS^T Q with P^T / dS^T re-packed in registers as A fragments (no shared-memory trip).
//     dS^T goes to shared memory (16-bit) and, after a barrier, the warps split dQ_i = dS K
//     (BR x D) into 16-row x (D / split) tiles and add them to dq_accum (f32) with atomicAdd.
//     Dropped reference keys and keys past the tile's length have P = 0 (so zero gradients).
//   flash_bwd_dq_DT: dq = scale * dq_accum in q's dtype, one thread per pair of elements (256-thread
//     blocks, 1-D grid-stride loop).
//
// Tiles and shared memory (T = 16-bit, bytes = 2 (2 BC D + 4 BR D + BC BR) + 16 BR):
//   D = 64:  8 warps, BC = 128, BR = 64: K + V 32 KiB, 2 stages of Q + dO 32 KiB, dS^T 16 KiB,
//            lse2 / delta 1 KiB: 81 KiB.
//   D = 128: 4 warps, BC = 64,  BR = 32: K + V 32 KiB, 2 stages of Q + dO 32 KiB, dS^T 4 KiB,
//            lse2 / delta 0.5 KiB: 68.5 KiB.
// Both fit the 99 KiB a block may use on every sm_80+ part (227 KiB on sm_90). D = 128 takes half
// the keys per block so that the dK, dV accumulators (2 x 16 x 128 / 32 = 128 f32 a thread) plus
// S^T and dP^T (16 x BR / 32 each) stay within the register file without spills; BR = 32 there
// keeps S^T / dP^T at 16 values each. Both are tuning points (FAB_WARPS / FAB_BR below).
// Every tile row is a run of 16-byte chunks XOR-swizzled by row (fab_swizzle), so the 8 rows an
// ldmatrix phase reads, the chunks cp.async writes and the dS^T fragment stores each fall in 8
// distinct bank groups.
// Host guarantees: 16-bit inputs with unit stride along D, row strides multiples of 8 elements and
// 16-byte aligned bases; Lq, Lk, Lr < 2^31; H, B <= 65535; lq_pad = Lq rounded up to 4.
#include "mma.cuh"
#include "flash_attention_backward.cuh"

#define FAB_PREP_THREADS 256
#define FAB_DQ_THREADS 256
#define FAB_LOG2E 1.4426950408889634f
#define FAB_INF __int_as_float(0x7f800000)
#define FAB_NEG_INF __int_as_float(0xff800000)

// Warps (BC = 16 WARPS keys a block) and query rows a tile (BR), per head dim.
template <int D> struct FabConfig;
template <> struct FabConfig<64> { static constexpr int WARPS = 8, BR = 64; };
template <> struct FabConfig<128> { static constexpr int WARPS = 4, BR = 32; };


// ---- delta, lse2, dq_accum = 0 ------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void flash_bwd_prep(const FlashBwdParams& p) {
    const u32 lane = threadIdx.x % 32;
    const u64 row = ((u64)blockIdx.x * FAB_PREP_THREADS + threadIdx.x) / 32;  // (b H + h) lq_pad + i
    if (row >= (u64)p.batch * p.heads * p.lq_pad) return;
    const u64 bh = row / p.lq_pad;
    const u32 i = (u32)(row % p.lq_pad), hi = (u32)(bh % p.heads), bi = (u32)(bh / p.heads);
    float* delta = (float*)p.delta + bh * p.lq_pad;
    float* lse2 = (float*)p.lse2 + bh * p.lq_pad;
    if (i >= p.lq) {
        if (lane == 0) {
            delta[i] = 0.0f;
            lse2[i] = FAB_INF;
        }
        return;
    }
    const T* o = (const T*)p.out + bi * p.out_stride[0] + hi * p.out_stride[1] + (i64)i * p.out_stride[2];
    const T* dO = (const T*)p.dout + bi * p.dout_stride[0] + hi * p.dout_stride[1] + (i64)i * p.dout_stride[2];
    float* dqa = (float*)p.dq_accum + (bh * p.lq + i) * p.d;
    float acc = 0.0f;
    for (u32 c = lane; c < p.d; c += 32) {
        acc += to_f32(o[c]) * to_f32(dO[c]);
        dqa[c] = 0.0f;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        const float l = ((const float*)p.lse)[bi * p.lse_stride[0] + hi * p.lse_stride[1] + (i64)i * p.lse_stride[2]];
        delta[i] = acc;
        lse2[i] = l == FAB_NEG_INF ? FAB_INF : l * FAB_LOG2E;
    }
}

// ---- the main kernel ----------------------------------------------------------------------

// Element offset of 16-byte chunk `chunk` of row `row` in a tile of W-element rows (W / 8 chunks):
// the chunk index is XORed with bits of the row so that 8 consecutive rows' chunk c land in 8
// distinct 16-byte bank groups (of the 128 bytes the banks cover): row % 8 for rows of >= 8
// chunks, (row / (8 / CH)) % CH for rows of CH < 8 chunks (8 / CH rows share a 128-byte line).
template <int W> __device__ __forceinline__ u32 fab_swizzle(u32 row, u32 chunk) {
    constexpr u32 CH = W / 8;
    const u32 x = CH >= 8 ? (row & 7u) : ((row / (8 / CH)) & (CH - 1));
    return row * W + ((chunk ^ x) << 3);
}

// cp.async of `rows` rows x W (zero-filled from row `len` on) from src (row stride `rs`) into the
// swizzled tile at dst; the block's THREADS threads take the 16-byte chunks in turn.
template <typename T, int W, int THREADS>
__device__ __forceinline__ void fab_load_rows(T* dst, const T* src, i64 rs, u32 rows, u32 len) {
    constexpr u32 CH = W / 8;
    for (u32 c = threadIdx.x; c < rows * CH; c += THREADS) {
        const u32 row = c / CH, chunk = c % CH;
        const bool full = row < len;
        // A row past the end is not read (zero fill), but the address must still be a valid one.
        const T* from = full ? src + (i64)row * rs + chunk * 8 : src;
        cp_async_16(dst + fab_swizzle<W>(row, chunk), from, full);
    }
}

// cp.async of n f32 values (whole 16-byte chunks) from src, zero-filled from `avail` on (a multiple
// of 4, so a chunk is all in or all out).
template <int THREADS>
__device__ __forceinline__ void fab_load_f32(float* dst, const float* src, u32 n, u32 avail) {
    for (u32 c = threadIdx.x; c < n / 4; c += THREADS) {
        const bool full = 4 * c < avail;
        cp_async_16(dst + 4 * c, full ? src + 4 * c : src, full);
    }
}

template <int D> __host__ __device__ constexpr u32 fab_shared_bytes() {
    constexpr u32 BC = 16 * FabConfig<D>::WARPS, BR = FabConfig<D>::BR;
    return 2u * (2u * BC * D + 4u * BR * D + BC * BR) + 16u * BR;
}

template <typename T, int D>
__device__ __forceinline__ void flash_bwd_main(const FlashBwdParams& p) {
    constexpr int WARPS = FabConfig<D>::WARPS, BR = FabConfig<D>::BR;
    constexpr int BC = 16 * WARPS, THREADS = 32 * WARPS;
    constexpr int KD = D / 16;  // k-steps over the head dim (S^T, dP^T)
    constexpr int NQ = BR / 8;  // n-tiles over the query tile (S^T, dP^T)
    constexpr int ND = D / 8;   // n-tiles over the head dim (dK, dV, dQ)
    // dQ phase: BR / 16 row tiles x DQ_SPLIT column groups of DQ_NT n-tiles, one per warp.
    constexpr int MQ = BR / 16;
    constexpr int DQ_SPLIT = WARPS / MQ;
    constexpr int DQ_NT = ND / DQ_SPLIT;
    static_assert(WARPS % MQ == 0 && ND % DQ_SPLIT == 0 && DQ_NT % 2 == 0 && NQ % 2 == 0, "tile shapes");

    // Shared memory: K [BC][D], V [BC][D], stage s: Q [BR][D] at stages + 2 s BR D, dO [BR][D]
    // after it; dS^T [BC][BR]; then f32 lse2 [2][BR] and delta [2][BR].
    LA_DYNAMIC_SHARED(T, smem);
    T* ks = smem;
    T* vs = ks + BC * D;
    T* stages = vs + BC * D;
    T* dss = stages + 4 * BR * D;
    float* lse_s = (float*)(dss + BC * BR);
    float* delta_s = lse_s + 2 * BR;

    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 g = lane / 4, t = lane % 4;
    const FlashBwdTile<T> tile = flash_bwd_tile<T>(p, BC, D);
    const u32 len = tile.len;
    const i64 k_rs = tile.k_rs, v_rs = tile.v_rs;
    const T *k = tile.k, *v = tile.v, *q = tile.q, *dout = tile.dout;
    const float *lse2 = tile.lse2, *delta = tile.delta;
    float* dq_accum = tile.dq_accum;

    // The two key rows whose S^T / dP^T / dK / dV values this thread holds (C fragment rows g and
    // g + 8 of the warp's 16 keys), and whether they take part: inside the tile and not dropped.
    const u32 key0 = warp * 16 + g, key1 = key0 + 8;
    const bool live0 = flash_bwd_live(p, tile, key0), live1 = flash_bwd_live(p, tile, key1);

    const u32 nq = (p.lq + BR - 1) / BR;
    auto load_stage = [&](u32 it, u32 st) {
        const u32 i0 = it * BR;
        T* qs = stages + 2 * st * BR * D;
        fab_load_rows<T, D, THREADS>(qs, q + (i64)i0 * p.q_stride[2], p.q_stride[2], BR, p.lq - i0);
        fab_load_rows<T, D, THREADS>(qs + BR * D, dout + (i64)i0 * p.dout_stride[2], p.dout_stride[2], BR, p.lq - i0);
        fab_load_f32<THREADS>(lse_s + st * BR, lse2 + i0, BR, p.lq_pad - i0);
        fab_load_f32<THREADS>(delta_s + st * BR, delta + i0, BR, p.lq_pad - i0);
    };
    fab_load_rows<T, D, THREADS>(ks, k, k_rs, BC, len);
    fab_load_rows<T, D, THREADS>(vs, v, v_rs, BC, len);
    if (nq > 0) load_stage(0, 0);
    cp_async_commit();

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;
    }

    for (u32 it = 0; it < nq; ++it) {
        // Stage (it + 1) & 1 was last read before the previous iteration's second barrier.
        if (it + 1 < nq) load_stage(it + 1, (it + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();  // K, V and stage it & 1 have landed (only stage it + 1 may be in flight)
        __syncthreads();
        const T* qs = stages + 2 * (it & 1) * BR * D;
        const T* dos = qs + BR * D;
        const float* ls = lse_s + (it & 1) * BR;
        const float* dls = delta_s + (it & 1) * BR;

        // S^T = K_w Q^T and dP^T = V_w dO^T (16 keys x BR queries each). A: the warp's 16 key
        // rows (ldmatrix_x4, lane l at row l % 16, chunk 2 kk + l / 16). B: matrices (queries
        // n8.., dims 16kk..), (n8.., 16kk+8..), (n8+8.., 16kk..), (n8+8.., 16kk+8..) are the B
        // fragments of n-tiles n and n + 1.
        float s[NQ][4], dp[NQ][4];
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
        }
        // A runtime loop over kk (nothing indexed by kk lives in registers): unrolled, the compiler
        // would keep every (kk, n) address live and run out of registers at D = 128.
#pragma unroll 1
        for (int kk = 0; kk < KD; ++kk) {
            u32 ka[4], va[4];
            ldmatrix_x4(ka, ks + fab_swizzle<D>(warp * 16 + lane % 16, 2 * kk + lane / 16));
            ldmatrix_x4(va, vs + fab_swizzle<D>(warp * 16 + lane % 16, 2 * kk + lane / 16));
#pragma unroll
            for (int n = 0; n < NQ; n += 2) {
                const u32 r = n * 8 + lane % 8 + (lane / 16) * 8, c = 2 * kk + (lane / 8) % 2;
                u32 qb[4], ob[4];
                ldmatrix_x4(qb, qs + fab_swizzle<D>(r, c));
                ldmatrix_x4(ob, dos + fab_swizzle<D>(r, c));
                const u32 q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
                const u32 o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
                mma_16816<T>(s[n], ka, q0);
                mma_16816<T>(s[n + 1], ka, q1);
                mma_16816<T>(dp[n], va, o0);
                mma_16816<T>(dp[n + 1], va, o1);
            }
        }

        // P^T = exp2(S^T scale log2(e) - lse2) on live keys (0 elsewhere); dS^T = P^T (dP^T - delta).
        // Element e of n-tile n: key g (e < 2) or g + 8, query n8 + 2t + (e & 1).
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 col = n * 8 + 2 * t + (e & 1);
                const bool live = e < 2 ? live0 : live1;
                const float pv = live ? exp2f(s[n][e] * p.scale_log2 - ls[col]) : 0.0f;
                s[n][e] = pv;
                dp[n][e] = pv * (dp[n][e] - dls[col]);
            }
        }

        // dV += P^T dO, dK += dS^T Q over k-steps of 16 queries: the C fragments of n-tiles 2kk,
        // 2kk + 1 are the A fragment of k-step kk; B by ldmatrix .trans, matrices (queries 16kk..,
        // dims n8..), (16kk+8.., n8..), (16kk.., n8+8..), (16kk+8.., n8+8..) for n-tiles n, n + 1.
        // dS^T also goes to shared memory for the dQ phase (rows = keys, 32-bit stores).
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            const u32 pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const u32 da[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                               pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
            *(u32*)(dss + fab_swizzle<BR>(key0, 2 * kk) + 2 * t) = da[0];
            *(u32*)(dss + fab_swizzle<BR>(key1, 2 * kk) + 2 * t) = da[1];
            *(u32*)(dss + fab_swizzle<BR>(key0, 2 * kk + 1) + 2 * t) = da[2];
            *(u32*)(dss + fab_swizzle<BR>(key1, 2 * kk + 1) + 2 * t) = da[3];
#pragma unroll
            for (int n = 0; n < ND; n += 2) {
                const u32 r = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, c = n + lane / 16;
                u32 ob[4], qb[4];
                ldmatrix_x4_trans(ob, dos + fab_swizzle<D>(r, c));
                ldmatrix_x4_trans(qb, qs + fab_swizzle<D>(r, c));
                const u32 o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
                const u32 q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
                mma_16816<T>(dv[n], pa, o0);
                mma_16816<T>(dv[n + 1], pa, o1);
                mma_16816<T>(dk[n], da, q0);
                mma_16816<T>(dk[n + 1], da, q1);
            }
        }
        __syncthreads();  // dS^T complete

        // dQ_i (BR x D) += dS K: warp w takes query rows 16 (w % MQ).. and n-tiles
        // (w / MQ) DQ_NT... A = dS from the dS^T tile by ldmatrix .trans: matrices (keys 16kk..,
        // queries 16m..), (16kk.., 16m+8..), (16kk+8.., 16m..), (16kk+8.., 16m+8..). B = K rows by
        // ldmatrix .trans as for dV above.
        {
            const u32 mt = warp % MQ, nt0 = (warp / MQ) * DQ_NT;
            float dq[DQ_NT][4];
#pragma unroll
            for (int n = 0; n < DQ_NT; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) dq[n][e] = 0.0f;
            }
#pragma unroll 1
            for (int kk = 0; kk < BC / 16; ++kk) {
                const u32 mi = lane / 8;
                u32 a[4];
                ldmatrix_x4_trans(a, dss + fab_swizzle<BR>(kk * 16 + lane % 8 + (mi / 2) * 8, 2 * mt + mi % 2));
#pragma unroll
                for (int n = 0; n < DQ_NT; n += 2) {
                    const u32 r = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
                    u32 kb[4];
                    ldmatrix_x4_trans(kb, ks + fab_swizzle<D>(r, nt0 + n + lane / 16));
                    const u32 b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
                    mma_16816<T>(dq[n], a, b0);
                    mma_16816<T>(dq[n + 1], a, b1);
                }
            }
            const u32 row0 = it * BR + mt * 16 + g, row1 = row0 + 8;
#pragma unroll
            for (int n = 0; n < DQ_NT; ++n) {
                const u32 col = (nt0 + n) * 8 + 2 * t;
                if (row0 < p.lq) {
                    atomicAdd(dq_accum + (u64)row0 * D + col, dq[n][0]);
                    atomicAdd(dq_accum + (u64)row0 * D + col + 1, dq[n][1]);
                }
                if (row1 < p.lq) {
                    atomicAdd(dq_accum + (u64)row1 * D + col, dq[n][2]);
                    atomicAdd(dq_accum + (u64)row1 * D + col + 1, dq[n][3]);
                }
            }
        }
        // The next iteration's first barrier orders these dS^T / K reads before dS^T is rewritten.
    }
    cp_async_wait<0>();

    flash_bwd_store_dk_dv<T, D>(p, tile, key0, key1, t, dk, dv);
}

// ---- dq = scale * dq_accum ----------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void flash_bwd_dq(const FlashBwdParams& p) {
    const u64 pairs = (u64)p.batch * p.heads * p.lq * (p.d / 2);
    const u32 half_d = p.d / 2;
    for (u64 x = (u64)blockIdx.x * FAB_DQ_THREADS + threadIdx.x; x < pairs; x += (u64)gridDim.x * FAB_DQ_THREADS) {
        const u32 c = (u32)(x % half_d) * 2;
        const u64 row = x / half_d;  // (b * H + h) * Lq + i
        const u32 i = (u32)(row % p.lq);
        const u64 bh = row / p.lq;
        const u32 hi = (u32)(bh % p.heads), bi = (u32)(bh / p.heads);
        const float* a = (const float*)p.dq_accum + row * p.d + c;
        T* dst = (T*)p.dq + bi * p.dq_stride[0] + hi * p.dq_stride[1] + (i64)i * p.dq_stride[2] + c;
        *(u32*)dst = pack2<T>(a[0] * p.scale, a[1] * p.scale);
    }
}

#define FAB_INSTANCES(TN, T)                                                                                        \
    extern "C" __global__ void __launch_bounds__(FAB_PREP_THREADS) flash_bwd_prep_##TN(const FlashBwdParams p) {    \
        flash_bwd_prep<T>(p);                                                                                       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(FAB_DQ_THREADS) flash_bwd_dq_##TN(const FlashBwdParams p) {        \
        flash_bwd_dq<T>(p);                                                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * FabConfig<64>::WARPS) flash_bwd_##TN##_d64(const FlashBwdParams p) { \
        flash_bwd_main<T, 64>(p);                                                                                   \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * FabConfig<128>::WARPS) flash_bwd_##TN##_d128(const FlashBwdParams p) { \
        flash_bwd_main<T, 128>(p);                                                                                  \
    }
FAB_INSTANCES(bf16, bf16)
FAB_INSTANCES(f16, f16)
