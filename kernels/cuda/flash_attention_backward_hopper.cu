// Flash extended attention, backward, for Hopper (sm_90a): the main kernel of
// flash_attention_backward.cu (same FlashBwdParams, same math and outputs: keys/values [own (Lk) ;
// reference (Lr)] read from their two sources, reference tokens with keep == 0 left out, dK / dV
// of both sources, dQ accumulated in f32 into dq_accum with atomicAdd) with its products on
// warpgroup MMA (wgmma, mma.cuh) instead of mma.sync. The prep kernel (delta, lse2, dq_accum = 0)
// and the dq conversion (dq = scale dq_accum) of flash_attention_backward.cu run before / after
// it unchanged.
//
// Launch (engine/src/cuda/flash_attention_backward.rs): grid (own key tiles + reference key tiles,
// H, B) of FBH_BC = 128 keys (own tiles first, never one straddling both sources), 256 threads = 2
// warpgroups of 64 keys each; dynamic shared memory fbh_shared_bytes<D>(): 146.5 KiB (D 64) /
// 194.5 KiB (D 128), one block an SM (the registers: dK, dV accumulators of D / 2 f32 each a thread).
//
// FlashAttention-3's backward, simplified (no TMA, no warp specialization): a block holds its
// keys' K and V in shared memory and loops over the query tiles of FBH_BR = 64 rows, whose Q, dO,
// lse2 and delta stream through FBH_STAGES = 3 stages (cp.async by every thread; tile i + 2 loads
// while tile i computes). One block barrier a tile. Per query tile, warpgroup w (keys 64 w ..):
//   S^T  = K_w Q^T          wgmma_ss (A = K rows, B = Q K-major), 64 x 64, D / 16 k-steps
//   dP^T = V_w dO^T         wgmma_ss, the same shapes
//   P^T  = exp2(S^T scale log2(e) - lse2), 0 for keys past the source's end and dropped tokens
//   dS^T = P^T (dP^T - delta)
//   dV  += P^T dO, dK += dS^T Q: wgmma_rs, A = P^T / dS^T repacked from the accumulator registers
//          (accumulator columns 16 k .. 16 k + 15 are the A fragment of k-step k), B = dO / Q
//          tiles MN-major (queries are the k dimension), 4 k-steps of 16 queries.
//   dS^T is also stored transposed (16-bit) into a shared dS tile [64 queries][128 keys] (two
//   buffers, alternating by tile), and after the block barrier dQ_i += dS K (A = dS K-major, B = K
//   tile MN-major):
//     D 128: warpgroup w computes dQ columns 64 w .. 64 w + 63 over all 128 keys (8 k-steps, N 64);
//     D 64: (no N = 32 wgmma) warpgroup w computes the partial dQ (64 x 64) over its own 64 keys,
//       the two partials are added through shared memory (each warpgroup hands the other the 32
//       columns the other owns, two buffers alternating by tile) and each adds its 32 columns to
//       dq_accum after the next tile's barrier, while that tile's dV, dK products run.
//   The dQ tile goes to dq_accum with f32 atomics (16-byte vector atomics: lane pairs swap halves of
//   their accumulator pairs; rows past Lq left out).
// Every shared tile (K, V, Q, dO, dS) is D / 64 (dS: 2) column blocks of [rows][64] 16-bit
// elements (128-byte rows, 128B-swizzled: 16-byte chunk c of row r at c ^ (r % 8)), block b at
// b rows 128 bytes, 1024-byte aligned: the canonical K-major layout of wgmma (K rows for S^T, Q /
// dO rows for S^T / dP^T's B, dS rows for dQ) and, read with keys / queries as the k dimension, the
// MN-major one (B of dV, dK, dQ: groups of 8 k-rows at SBO 1024, 64-column blocks at LBO = rows 128).
//
// Every wgmma of a tile retires within the tile: ptxas serializes all wgmmas of a kernel that keeps
// an accumulator in flight across the loop's back edge (C7514) and injects waits before reads of
// wgmma-written registers that cross it (C7517); the sm_90 compile log shows neither.
// Shared memory (bytes): K, V 2 BC D 2; three stages of Q and dO 6 BR D 2; two dS tiles 2 BR BC 2;
// lse2, delta three stages 6 BR 4; (D 64) the partial-dQ exchange 2 x 2 x 16 x 128 f32; + 1024 to
// align the start.
// D 64 (the default, KREG): the warpgroup's K and V rows are held as wgmma A fragments in
// registers (16 + 16 a thread, loaded once), so S^T and dP^T are wgmma_rs and read only Q / dO from
// shared memory: an m64n64k16 wgmma_ss moves 4 KiB of shared memory a k-step, the SM's whole
// shared-memory bandwidth for the 32 cycles its tensor cores take for it. Measured on an H200
// (bf16, batch 2, ext attention bwd): 4096 x (4096 + 4096) h10 1.52 ms against 1.60 ms with K, V
// from shared memory; 1024 x (1024 + 1024) h20 0.237 against 0.245 ms. 238 registers, no spills.
// Variants, LOOKAHEAD_VARIANT_FLASH_BWD=<name> (engine/src/cuda/flash_attention_backward.rs; D 64
// only, D 128 runs its default kernel under any of them):
//   default  as above.
//   ss       S^T and dP^T as wgmma_ss with K and V from shared memory (the kernel before KREG).
//   late     KREG, and the next stage's cp.async issue and the previous tile's dQ atomics after
//            the dQ(it) wgmma issue instead of before it, so that they overlap the dQ product.
// Tried and dropped: dS stored as 32-bit words after a lane swap (half the store instructions):
// 1.64 ms alone, 1.56 ms with KREG on the H200 (the shuffles sit on the path to the barrier).
// Host guarantees as flash_attention_backward.cu: 16-bit inputs with unit stride along D, row
// strides multiples of 8 elements, 16-byte aligned bases; lq_pad = Lq rounded up to 4.
#include "mma.cuh"
#include "flash_attention_backward.cuh"

#define FBH_BC 128
#define FBH_BR 64
#define FBH_THREADS 256
#define FBH_STAGES 3


// Mirrored by kernels::flash_attention_backward::hopper_shared_bytes.
template <int D> __host__ __device__ constexpr u32 fbh_shared_bytes() {
    return 2u * (2u * FBH_BC * D + 2u * FBH_STAGES * FBH_BR * D + 2u * FBH_BR * FBH_BC) + 8u * FBH_STAGES * FBH_BR + (D == 64 ? 2u * 2u * 16u * 128u * 4u : 0u) + 1024u;
}

#if LA_WGMMA

// Byte offset of 16-byte chunk `chunk` (0 .. W / 8 - 1) of row `row` in a tile of ROWS rows of W
// 16-bit elements laid out as above (64-column blocks of 128-byte rows, 128B-swizzled).
template <u32 ROWS> __device__ __forceinline__ u32 fbh_offset(u32 row, u32 chunk) {
    return (chunk / 8) * ROWS * 128u + flash_bwd_swizzle128(row, chunk);
}

// cp.async of ROWS rows x D (zero-filled from row `len` on) from src (row stride `rs`) into the tile
// at dst; the block's threads take the 16-byte chunks in turn (8 consecutive threads read 128
// contiguous bytes of a row).
// A fixed number of chunks a thread (no loop bounds to test): thread x takes chunk column x % CHUNKS
// of rows x / CHUNKS + i FBH_THREADS / CHUNKS.
template <typename T, int D, u32 ROWS>
__device__ __forceinline__ void fbh_load_tile(unsigned char* dst, const T* src, i64 rs, u32 len) {
    constexpr u32 CHUNKS = D / 8, ROW_STEP = FBH_THREADS / CHUNKS;
    static_assert(FBH_THREADS % CHUNKS == 0 && ROWS % ROW_STEP == 0, "whole rounds of chunks");
    const u32 chunk = threadIdx.x % CHUNKS;
#pragma unroll
    for (u32 i = 0; i < ROWS / ROW_STEP; ++i) {
        const u32 row = threadIdx.x / CHUNKS + i * ROW_STEP;
        const bool full = row < len;
        // A row past the end is not read (zero fill), but the address must still be a valid one.
        const T* from = full ? src + (i64)row * rs + chunk * 8 : src;
        cp_async_16(dst + fbh_offset<ROWS>(row, chunk), from, full);
    }
}

// cp.async of FBH_BR f32 values from src, zero-filled from `avail` on (a multiple of 4): the
// first FBH_BR / 4 threads one 16-byte chunk each.
__device__ __forceinline__ void fbh_load_f32(float* dst, const float* src, u32 avail) {
    const u32 c = threadIdx.x;
    if (c < FBH_BR / 4) {
        const bool full = 4 * c < avail;
        cp_async_16(dst + 4 * c, full ? src + 4 * c : src, full);
    }
}


// Adds one 8-column block of this thread's dQ accumulator registers to dq_accum (row stride D):
// a0, a1 = row `row0` (its row g), columns col + 2t, + 1; a2, a3 = row `row1` (g + 8), the same
// columns. Lanes t and t ^ 1 swap pairs, so that the even lane holds 4 consecutive columns of row g
// and the odd lane those of row g + 8: one 16-byte vector atomic each (red.global.add.v4.f32,
// sm_90) instead of four scalar ones. Every lane of the warp calls it (the shuffles); rows past
// `lq` are left out.
template <int D>
__device__ __forceinline__ void fbh_atomic_add_block(float* dq_accum, u32 row0, u32 row1, u32 col, float a0, float a1, float a2, float a3, u32 lq) {
    const bool odd = threadIdx.x & 1u;
    const float r0 = __shfl_xor_sync(0xffffffffu, odd ? a0 : a2, 1);
    const float r1 = __shfl_xor_sync(0xffffffffu, odd ? a1 : a3, 1);
    const u32 row = odd ? row1 : row0;
    if (row >= lq) return;
    float* at = dq_accum + (u64)row * D + col + 2 * (threadIdx.x & 2u);
    const float x = odd ? r0 : a0, y = odd ? r1 : a1, z = odd ? a2 : r0, w = odd ? a3 : r1;
#ifdef LOOKAHEAD_EMULATE
    // The emulator has no vector atomics: the same additions one by one.
    atomicAdd(at, x);
    atomicAdd(at + 1, y);
    atomicAdd(at + 2, z);
    atomicAdd(at + 3, w);
#else
    atomicAdd((float4*)at, make_float4(x, y, z, w));
#endif
}

template <typename T, int D, bool KREG, bool LATE>
__device__ __forceinline__ void flash_bwd_hopper(const FlashBwdParams& p) {
    constexpr u32 BC = FBH_BC, BR = FBH_BR, STAGES = FBH_STAGES;
    constexpr u32 KV_BYTES = BC * D * 2;      // one of K, V
    constexpr u32 QO_BYTES = BR * D * 2;      // one of Q, dO (a stage holds both)
    constexpr u32 DS_BYTES = BR * BC * 2;     // one dS buffer
    constexpr int KD = D / 16;                // k-steps of S^T, dP^T (over the head dim)
    constexpr int KQ = BR / 16;               // k-steps of dV, dK (over the query tile)
    constexpr int NS = BR / 2;                // S^T / dP^T accumulator registers a thread
    constexpr int NG = D / 2;                 // dK / dV accumulator registers a thread
    constexpr bool DQ_BY_COLUMNS = D == 128;  // else: partial sums over each warpgroup's keys
    constexpr int NQ = DQ_BY_COLUMNS ? 64 : D;  // N of the dQ wgmma
    constexpr int KDQ = DQ_BY_COLUMNS ? BC / 16 : 4;  // its k-steps (16 keys each)
    static_assert(D == 64 || D == 128, "head dim 64 or 128");

    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    // The swizzle applies to absolute shared-memory addresses: tiles start 1024-byte aligned. The
    // shared-window offset of the start is read from a descriptor's start-address field (the same
    // on the GPU and under the emulator, whose pointers are host addresses).
    const u32 window_offset = (u32)(wgmma_desc(smem_raw, 16, 16, WGMMA_SWIZZLE_NONE) & 0x3fffu) << 4;
    unsigned char* smem = smem_raw + (1024u - window_offset % 1024u) % 1024u;
    unsigned char* ks = smem;                            // K [BC][D]
    unsigned char* vs = ks + KV_BYTES;                   // V [BC][D]
    unsigned char* stages = vs + KV_BYTES;               // stage s: Q at stages + 2 s QO_BYTES, dO after it
    unsigned char* dss = stages + 2 * STAGES * QO_BYTES; // dS buffer b: [BR][BC] (2 column blocks) at dss + b DS_BYTES
    float* lse_s = (float*)(dss + 2 * DS_BYTES);         // lse2 [STAGES][BR]
    float* delta_s = lse_s + STAGES * BR;                // delta [STAGES][BR]
    float4* exchange = (float4*)(delta_s + STAGES * BR); // D 64: [2 buffers][2 warpgroups][4][128] partial dQ

    const u32 wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const u32 g = lane / 4, t = lane % 4;
    const FlashBwdTile<T> tile = flash_bwd_tile<T>(p, BC, D);
    const u32 len = tile.len;
    const i64 k_rs = tile.k_rs, v_rs = tile.v_rs;
    const T *k = tile.k, *v = tile.v, *q = tile.q, *dout = tile.dout;
    const float *lse2 = tile.lse2, *delta = tile.delta;
    float* dq_accum = tile.dq_accum;

    // The two key rows (of the tile) whose S^T / dP^T / dK / dV values this thread holds
    // (accumulator rows g and g + 8 of its warp's 16), and whether they take part: inside the tile
    // and not dropped.
    const u32 key0 = wg * 64 + warp * 16 + g, key1 = key0 + 8;
    const bool live0 = flash_bwd_live(p, tile, key0), live1 = flash_bwd_live(p, tile, key1);

    const u32 nq = (p.lq + BR - 1) / BR;
    auto load_stage = [&](u32 it) {
        const u32 i0 = it * BR, st = it % STAGES;
        unsigned char* qs = stages + 2 * st * QO_BYTES;
        fbh_load_tile<T, D, BR>(qs, q + (i64)i0 * p.q_stride[2], p.q_stride[2], p.lq - i0);
        fbh_load_tile<T, D, BR>(qs + QO_BYTES, dout + (i64)i0 * p.dout_stride[2], p.dout_stride[2], p.lq - i0);
        fbh_load_f32(lse_s + st * BR, lse2 + i0, p.lq_pad - i0);
        fbh_load_f32(delta_s + st * BR, delta + i0, p.lq_pad - i0);
    };

    // Descriptors (128B swizzle, SBO = 1024 between 8-row groups), from one built at the aligned
    // start: its low word (start address >> 4 in bits 0-13, LBO >> 4 above) advanced by the byte
    // offset >> 4 (shared addresses < 256 KiB: no carry out of the start field), its high word
    // (SBO, swizzle) as is: two integer instructions a wgmma instead of some twenty for a
    // descriptor built from a generic pointer. K-major operand, k-step kk of a [rows][D] tile:
    // column block kk / 4, +32 bytes a step inside its 128-byte rows.
    const u64 kmajor_base = wgmma_desc(smem, 16, 1024, WGMMA_SWIZZLE_128B);
    auto advance = [](u64 base, u32 bytes) { return (base & 0xffffffff00000000ull) | (u32)((u32)base + bytes / 16); };
    auto kmajor = [&](const unsigned char* tile, u32 rows, u32 row0, int kk) {
        return advance(kmajor_base, (u32)(tile - smem) + (kk / 4) * rows * 128 + row0 * 128 + (kk % 4) * 32);
    };
    // MN-major operand read from a [rows][D] tile (rows BR or BC) with the rows as k: k-step kk
    // (rows row0 + 16 kk ..) is 2048 bytes further; the 64-column blocks are the N atoms, rows 128
    // bytes apart (LBO).
    const u64 mnmajor_br = wgmma_desc(smem, BR * 128, 1024, WGMMA_SWIZZLE_128B);
    const u64 mnmajor_bc = wgmma_desc(smem, BC * 128, 1024, WGMMA_SWIZZLE_128B);
    auto mnmajor = [&](const unsigned char* tile, u32 rows, u32 row0, int kk) {
        return advance(rows == BC ? mnmajor_bc : mnmajor_br, (u32)(tile - smem) + (row0 + 16 * kk) * 128);
    };

    float dk[NG], dv[NG];
#pragma unroll
    for (int i = 0; i < NG; ++i) dk[i] = dv[i] = 0.0f;
    float s[NS], dp[NS], dq[NQ / 2];

    // S^T(it) = K_w Q_it^T and dP^T(it) = V_w dO_it^T, 64 keys x BR queries each, as two commit
    // groups (S^T is used while dP^T is still computed).
    // KREG (top of the file): the warpgroup's K and V rows as wgmma A fragments in registers
    // (loaded once after the prologue, flash_bwd_kv_fragments), S^T and dP^T by wgmma_rs. D 64
    // only (D 128 has no registers left).
    constexpr int KA = KREG ? KD : 1;
    u32 ka[KA][4], va[KA][4];
    auto issue_sdp = [&](u32 it) {
        const unsigned char* qs = stages + 2 * (it % STAGES) * QO_BYTES;
        const unsigned char* dos = qs + QO_BYTES;
        if constexpr (KREG) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) wgmma_rs<T, BR, false>(s, ka[kk], kmajor(qs, BR, 0, kk), kk > 0);
            wgmma_commit();
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) wgmma_rs<T, BR, false>(dp, va[kk], kmajor(dos, BR, 0, kk), kk > 0);
            wgmma_commit();
        } else {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) wgmma_ss<T, BR, false>(s, kmajor(ks, BC, wg * 64, kk), kmajor(qs, BR, 0, kk), kk > 0);
            wgmma_commit();
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) wgmma_ss<T, BR, false>(dp, kmajor(vs, BC, wg * 64, kk), kmajor(dos, BR, 0, kk), kk > 0);
            wgmma_commit();
        }
    };

    // dq_accum += the retired dQ tile of query tile `it` (rows 16 warp + g: registers 4 n, 4 n + 1;
    // + 8: 4 n + 2, 4 n + 3). D 128: the warpgroup's 64 columns directly. D 64: warpgroup w owns
    // columns 32 w .. 32 w + 31 (registers 16 w .. 16 w + 15, the same in both warpgroups'
    // layouts); dq_send hands the other warpgroup this one's partial of the other half (exchange
    // buffer it & 1, laid out [4][128 threads] of float4), and after a block barrier dq_add adds
    // the other's partial of its own half. Selects on wg, not dq[16 (1 - wg) + r]: a register
    // array takes constant indices only.
    const u32 tid = threadIdx.x % 128;
    float dq_own[16];  // D 64: this warpgroup's half of its partial dQ, from dq_send to dq_add
    auto dq_send = [&](u32 it) {
        float4* mine = exchange + ((it & 1) * 2 + wg) * 4 * 128;
#pragma unroll
        for (int r = 0; r < 16; r += 4)
            mine[(r / 4) * 128 + tid] = make_float4(wg == 0 ? dq[16 + r] : dq[r], wg == 0 ? dq[17 + r] : dq[r + 1], wg == 0 ? dq[18 + r] : dq[r + 2], wg == 0 ? dq[19 + r] : dq[r + 3]);
#pragma unroll
        for (int r = 0; r < 16; ++r) dq_own[r] = wg == 0 ? dq[r] : dq[16 + r];
    };
    auto dq_add = [&](u32 it) {
        const u32 row0 = it * BR + warp * 16 + g, row1 = row0 + 8;
        if constexpr (DQ_BY_COLUMNS) {
#pragma unroll
            for (int n = 0; n < NQ / 8; ++n) fbh_atomic_add_block<D>(dq_accum, row0, row1, wg * 64 + n * 8, dq[4 * n], dq[4 * n + 1], dq[4 * n + 2], dq[4 * n + 3], p.lq);
        } else {
            const float4* theirs = exchange + ((it & 1) * 2 + (1 - wg)) * 4 * 128;
            float sum[16];
#pragma unroll
            for (int r = 0; r < 16; r += 4) {
                const float4 x = theirs[(r / 4) * 128 + tid];
                sum[r] = dq_own[r] + x.x;
                sum[r + 1] = dq_own[r + 1] + x.y;
                sum[r + 2] = dq_own[r + 2] + x.z;
                sum[r + 3] = dq_own[r + 3] + x.w;
            }
#pragma unroll
            for (int n = 0; n < 4; ++n) fbh_atomic_add_block<D>(dq_accum, row0, row1, wg * 32 + n * 8, sum[4 * n], sum[4 * n + 1], sum[4 * n + 2], sum[4 * n + 3], p.lq);
        }
    };

    // Prologue: K, V and stage 0 (one cp.async group), stage 1 (a second one, empty when nq = 1).
    fbh_load_tile<T, D, BC>(ks, k, k_rs, len);
    fbh_load_tile<T, D, BC>(vs, v, v_rs, len);
    if (nq > 0) load_stage(0);
    cp_async_commit();
    if (nq > 1) load_stage(1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    if constexpr (KREG) flash_bwd_kv_fragments(ka, va, ks, vs, key0, t);
    // Query tile `it`. One block barrier a tile (after the dS stores), which also hands over the
    // buffers: stage it % 3 (Q, dO, lse2, delta) is read by this tile's S^T, dP^T, dV, dK, all
    // retired by the end of the tile; the copies of stage it + 2 start after the barrier, when
    // every warpgroup is done with tile it - 1. dS(it) goes to buffer it & 1: the other warpgroup
    // may still run dQ(it - 1) on the other one. Every wgmma retires by the end of the tile (top
    // of the file); at D 64 the partial dQ(it) is handed over at the end of the tile (dq_send: the
    // other half to shared memory, this half to plain registers, not the wgmma-written ones) and
    // added to dq_accum after the next tile's barrier, while that tile's dV, dK products run.
    for (u32 it = 0; it < nq; ++it) {
        const u32 st = it % STAGES;
        const unsigned char* qs = stages + 2 * st * QO_BYTES;
        const unsigned char* dos = qs + QO_BYTES;
        const float* ls = lse_s + st * BR;
        const float* dls = delta_s + st * BR;
        unsigned char* ds_tile = dss + (it & 1) * DS_BYTES;

        wgmma_fence();  // dk, dv, pa, da, dq were last used by other instructions
        issue_sdp(it);

        // P^T on live keys (0 elsewhere), dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q.
        u32 pa[KQ][4], da[KQ][4];
        flash_bwd_dv_dk<T, D>(dv, dk, s, dp, pa, da, qs, dos, [&](const unsigned char* at, int kk) { return mnmajor(at, BR, 0, kk); }, ls, dls, p.scale_log2, live0, live1, t);

        // dS transposed into the dS tile: key `key` in column block key / 64 (= wg).
        flash_bwd_store_ds_t(ds_tile + wg * BR * 128, da, warp, g, t);
        // This thread's copies of stage it + 1 have landed; after the barrier every thread's
        // have, and dS(it) of both warpgroups is written (both fenced for the async proxy), and
        // both warpgroups are past dq_send(it - 1) and have retired tile it - 1's products.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        // The copies of stage it + 2 and (D 64) the atomics of dQ(it - 1): before the dQ(it) issue,
        // or (LATE) after it, so that they run while the tensor cores compute dQ(it) (they touch
        // neither dq nor the dS tile; the wgmma_fence below orders nothing they need).
        auto between = [&]() {
            if (it + 2 < nq) load_stage(it + 2);
            cp_async_commit();
            if constexpr (!DQ_BY_COLUMNS) {
                if (it > 0) dq_add(it - 1);  // the other warpgroup's dq_send(it - 1) is before the barrier
            }
        };
        if constexpr (!LATE) between();

        // dQ(it): A = dS rows (K-major), B = K rows as MN-major (keys are the k dimension).
        wgmma_fence();  // orders the dq reads above and the dS stores' registers before the issue
#pragma unroll
        for (int kk = 0; kk < KDQ; ++kk) {
            if constexpr (DQ_BY_COLUMNS) {
                // Columns 64 wg .. over all BC keys: dS column block kk / 4, K column block wg.
                wgmma_ss<T, NQ, true>(dq, kmajor(ds_tile, BR, 0, kk), mnmajor(ks + wg * BC * 128, BC, 0, kk), kk > 0);
            } else {
                // All D columns over the warpgroup's 64 keys: dS column block wg, K rows 64 wg ...
                wgmma_ss<T, NQ, true>(dq, kmajor(ds_tile + wg * BR * 128, BR, 0, kk), mnmajor(ks, BC, wg * 64, kk), kk > 0);
            }
        }
        wgmma_commit();
        if constexpr (LATE) between();
        wgmma_wait<0>();
        wgmma_fence_operands(dk);
        wgmma_fence_operands(dv);
        wgmma_fence_operands(pa);
        wgmma_fence_operands(da);
        wgmma_fence_operands(dq);
        if constexpr (DQ_BY_COLUMNS) dq_add(it);
        else dq_send(it);
    }
    // D 64: the last tile's dQ.
    if constexpr (!DQ_BY_COLUMNS) {
        if (nq > 0) {
            __syncthreads();
            dq_add(nq - 1);
        }
    }
    cp_async_wait<0>();

    flash_bwd_store_dk_dv<T, D>(p, tile, key0, key1, t, dk, dv);
}

#endif  // LA_WGMMA

// Without wgmma (sm_80, sm_90 without the a features) the kernels compile empty; the engine
// launches them only on compute capability 9.0, whose CUBIN is built for sm_90a.
#if LA_WGMMA
#define FBH_BODY(T, D, KREG, LATE) flash_bwd_hopper<T, D, KREG, LATE>(p)
#else
#define FBH_BODY(T, D, KREG, LATE) (void)p
#endif

#define FBH_INSTANCE(NAME, T, D, KREG, LATE) \
    extern "C" __global__ void __launch_bounds__(FBH_THREADS, 1) NAME(const FlashBwdParams p) { FBH_BODY(T, D, KREG, LATE); }
// The defaults: D 64 with K / V fragments in registers (KREG), D 128 from shared memory.
FBH_INSTANCE(flash_bwd_hopper_bf16_d64, bf16, 64, true, false)
FBH_INSTANCE(flash_bwd_hopper_bf16_d128, bf16, 128, false, false)
FBH_INSTANCE(flash_bwd_hopper_f16_d64, f16, 64, true, false)
FBH_INSTANCE(flash_bwd_hopper_f16_d128, f16, 128, false, false)
// Variants (D 64 only; LOOKAHEAD_VARIANT_FLASH_BWD, see the top of the file).
FBH_INSTANCE(flash_bwd_hopper_ss_bf16_d64, bf16, 64, false, false)
FBH_INSTANCE(flash_bwd_hopper_ss_f16_d64, f16, 64, false, false)
FBH_INSTANCE(flash_bwd_hopper_late_bf16_d64, bf16, 64, true, true)
FBH_INSTANCE(flash_bwd_hopper_late_f16_d64, f16, 64, true, true)
