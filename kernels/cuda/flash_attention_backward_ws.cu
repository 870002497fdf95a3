// Flash extended attention, backward, for Hopper (sm_90a), head dim 64, warp-specialized: the math,
// parameters and outputs of flash_bwd_hopper_*_d64 (flash_attention_backward_hopper.cu: keys/values
// [own (Lk) ; reference (Lr)] from their two sources, reference tokens with keep == 0 left out, dK /
// dV of both sources, dQ accumulated in f32 into dq_accum with atomics; built with flush-to-zero)
// with FlashAttention-3's structure instead of one block barrier per query tile. Selected by
// LOOKAHEAD_VARIANT_FLASH_BWD=ws or ws_stagger (engine/src/cuda/flash_attention_backward.rs,
// kernels::flash_attention_backward::hopper_launch); D 128 keeps its default kernel.
//
// Why: the default kernel issues every cp.async from the compute threads, keeps both warpgroups in
// lockstep with a block barrier a query tile (both queue their wgmmas at once, then both wait on
// MUFU / the dS stores at once), and adds dQ to dq_accum from the compute threads (the exchange of
// partials, the shuffles and atomics sit between two barriers). Measured (H200, bf16 b2 h10
// 4096 x (4096 + 4096) d64): 1.52 ms against cuDNN's 1.08-1.14 ms.
//
// Launch: grid (own key tiles + reference key tiles, H, B) of FBW_BC = 128 keys (as the default
// kernel), FBW_THREADS = 384: warpgroups 0 and 1 are the consumers (64 keys each, K / V rows as
// wgmma A fragments in registers, dK / dV accumulators: 204 registers), warpgroup 2 the producer:
// its warps 0-1 copy (cp.async), its warps 2-3 write dQ. setmaxnreg moves registers from the
// producer (40 a thread) to the consumers (232; 168 each at launch; 40 + 2 x 232 = 504 <= 512, a
// warp scheduler's quarter of the register file for 3 warps). Dynamic shared memory
// fbw_shared_bytes() = 178.6 KiB: K, V [128][64]; FBW_STAGES = 3 stages of Q, dO [64][64] and
// lse2, delta [64]; dS [64 queries][64 keys] per consumer warpgroup, two buffers; the partial dQ
// [64][64] f32 per consumer warpgroup, two buffers; the mbarriers; 1 KiB to align the start.
// 16-bit tiles have the layout of the default kernel (128-byte rows, 128B-swizzled, 1024-byte
// aligned: K-major wgmma operands, and MN-major read with the rows as k).
//
// Copy warps: K and V once (kv_full), then for query tile i: wait until stage i % 3 is released
// (its "empty" mbarrier, 8 arrivals: lane 0 of each consumer warp), copy Q_i, dO_i (zero-filled
// past Lq; lse2 is +inf on the prep kernel's padding rows and zero-filled past them, so those
// queries get P = 0 or 1 against dO = 0 and dS = 0: nothing reaches dK, dV, dQ), lse2_i, delta_i
// into it, cp_async_mbarrier_arrive on its "full" mbarrier (64 arrivals).
// cp.async, not TMA: Q / dO are [B, L, H, D] memory, whose 2D map would read the next batch
// entry's rows past Lq instead of zeros (engine/src/cuda/tensor_map.rs encodes 2D maps only).
//
// Consumer warpgroup w (keys 64 w ..), query tile i, as the default kernel's KREG path:
//   S^T = K_w Q^T, dP^T = V_w dO^T (wgmma_rs, two commit groups); P^T = exp2(S^T scale log2 e -
//   lse2) on live keys (0 past the source's end and for dropped tokens) while dP^T runs; dV += P^T
//   dO (wgmma_rs); dS^T = P^T (dP^T - delta) while dV runs; dK += dS^T Q (wgmma_rs); dS^T stored
//   transposed into this warpgroup's dS buffer i & 1, a named barrier of the warpgroup's 128
//   threads (the other warpgroup does not wait), dQ_w = dS_w K_w (wgmma_ss, 64 x 64 over the
//   warpgroup's 64 keys); once dK has retired the stage is released; once dQ_w has retired it goes
//   to the partial-dQ buffer i & 1 (after that buffer's "dq_empty" wait) and every consumer thread
//   arrives on "dq_full" (256 arrivals).
// dQ warps: for tile i, wait for dq_full[i & 1], add the two warpgroups' partials and
//   red.global.add.v4.f32 them into dq_accum (rows past Lq left out), then release the buffer
//   (dq_empty, 2 arrivals). The atomics and the sum of partials leave the consumers' path; the
//   consumers store 16 float2 a thread a tile instead of the default kernel's exchange, shuffles
//   and 16 vector atomics.
// No block barrier in the loop: a warpgroup runs up to 2 tiles ahead of the other (as far as the
// stage ring and the dQ buffers allow), so the tensor cores get one warpgroup's products while
// the other computes P / dS or stores. dS is double-buffered so that a warp's stores of tile i + 2 are
// ordered after every warp's retirement of dQ(i) by the named barrier of tile i + 1, not by how
// the hardware completes a warpgroup's wgmma across its warps.
// Every wgmma of a tile retires within the tile (wgmma_wait<0> before the back edge: C7514 /
// C7517, flash_attention_backward_hopper.cu).
// Variants: ws as above. ws_stagger: block x of a (batch, head)'s X key blocks starts at query
// tile x nq / X and wraps around. In order, the X blocks of a head (64 at 8192 keys) add to the
// same 64 rows of dq_accum at the same time, every 16-byte address taking X atomics in a row at
// its L2 slice; staggered, they spread over the head's tiles (Q, dO of a head: 1 MiB, L2-resident
// either way). Same sums in another order.
// Emulated (tests/flash_attention_backward_hopper_emulated.rs, every schedule): releasing a stage
// before dK retires, the copy warps skipping the empty wait, the dQ warps skipping the dq_full
// wait fail the suite; removing the named barrier or the dq_empty wait does not (the emulator's
// wgmma is a warpgroup collective, a barrier in itself; its schedules run the waiting dQ warps
// before a consumer can get two tiles ahead). Not yet measured on a GPU (written without one).
// Host guarantees as flash_attention_backward.cu: 16-bit inputs with unit stride along D, row
// strides multiples of 8 elements, 16-byte aligned bases; lq_pad = Lq rounded up to 4.
#include "mma.cuh"
#include "pipeline.cuh"
#include "flash_attention_backward.cuh"

#define FBW_D 64
#define FBW_BC 128
#define FBW_BR 64
#define FBW_THREADS 384
#define FBW_STAGES 3
#define FBW_COPY_THREADS 64  // producer threads 0..63 copy, 64..127 write dQ
#define FBW_PRODUCER_REGS 40
#define FBW_CONSUMER_REGS 232

// Mirrored by kernels::flash_attention_backward::ws_shared_bytes: K, V; the stages of Q, dO; two
// dS buffers a consumer warpgroup; two partial-dQ buffers a consumer warpgroup (f32); lse2, delta
// stages; 128 bytes of mbarriers; 1 KiB to align the start.
__host__ __device__ constexpr u32 fbw_shared_bytes() {
    return 2u * FBW_BC * FBW_D * 2u + FBW_STAGES * 2u * FBW_BR * FBW_D * 2u + 2u * 2u * FBW_BR * 64u * 2u + 2u * 2u * FBW_BR * FBW_D * 4u + 2u * FBW_STAGES * FBW_BR * 4u + 128u + 1024u;
}

#if LA_WGMMA


// Copy thread i (0..63) of ROWS rows x 64 from src (row stride rs, zero fill from row `len` on)
// into the tile at dst: chunk i % 8 of rows i / 8 + 8 k. Rows 8 apart keep the swizzled chunk
// position, so destination and source advance by constants; 8 consecutive threads read 128
// contiguous bytes of a row.
template <typename T, u32 ROWS> __device__ __forceinline__ void fbw_load_tile(unsigned char* dst, const T* src, i64 rs, u32 len, u32 i) {
    const u32 chunk = i % 8, row = i / 8;
    unsigned char* to = dst + flash_bwd_swizzle128(row, chunk);
    const T* from = src + (i64)row * rs + chunk * 8;
#pragma unroll
    for (u32 k = 0; k < ROWS / 8; ++k) {
        // A row past the end is not read (zero fill), but the address must still be valid.
        const bool full = row + 8 * k < len;
        cp_async_16(to + k * 1024, full ? from : src, full);
        from += 8 * rs;
    }
}

// STAGGER: block x of a (batch, head) starts at query tile x nq / (key blocks) and wraps around,
// instead of every block at tile 0 (see the top of the file).
template <typename T, bool STAGGER> __device__ __forceinline__ void flash_bwd_ws(const FlashBwdParams& p) {
    constexpr u32 D = FBW_D, BC = FBW_BC, BR = FBW_BR, STAGES = FBW_STAGES;
    constexpr u32 KV_BYTES = BC * D * 2;  // one of K, V
    constexpr u32 QO_BYTES = BR * D * 2;  // one of Q, dO (a stage holds both)
    constexpr u32 DS_BYTES = BR * 64 * 2; // one warpgroup's dS buffer
    constexpr u32 DQ_FLOATS = BR * D;     // one warpgroup's partial-dQ buffer
    constexpr int KD = D / 16;            // k-steps of S^T, dP^T (over the head dim)
    constexpr int KQ = BR / 16;           // k-steps of dV, dK (over the query tile)
    constexpr int NS = BR / 2;            // S^T / dP^T accumulator registers a thread
    constexpr int NG = D / 2;             // dK / dV / dQ accumulator registers a thread

    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    // Tiles start 1024-byte aligned in the shared window (the swizzle works on absolute addresses).
    const u32 window_offset = (u32)(wgmma_desc(smem_raw, 16, 16, WGMMA_SWIZZLE_NONE) & 0x3fffu) << 4;
    unsigned char* smem = smem_raw + (1024u - window_offset % 1024u) % 1024u;
    unsigned char* ks = smem;                            // K [BC][D]
    unsigned char* vs = ks + KV_BYTES;                   // V [BC][D]
    unsigned char* stages = vs + KV_BYTES;               // stage s: Q at stages + 2 s QO_BYTES, dO after it
    unsigned char* dss = stages + 2 * STAGES * QO_BYTES; // dS of buffer b, warpgroup w at dss + (2 b + w) DS_BYTES
    float* dqs = (float*)(dss + 4 * DS_BYTES);           // partial dQ of buffer b, warpgroup w at dqs + (2 b + w) DQ_FLOATS
    float* lse_s = dqs + 4 * DQ_FLOATS;                  // lse2 [STAGES][BR]
    float* delta_s = lse_s + STAGES * BR;                // delta [STAGES][BR]
    u64* bars = (u64*)(delta_s + STAGES * BR);
    u64* kv_full = bars;
    u64* full = bars + 1;           // [STAGES]
    u64* empty = full + STAGES;     // [STAGES]
    u64* dq_full = empty + STAGES;  // [2]
    u64* dq_empty = dq_full + 2;    // [2]

    const FlashBwdTile<T> tile = flash_bwd_tile<T>(p, BC, D);
    const u32 nq = (p.lq + BR - 1) / BR;
    // Step it works on query tile (it + first) % nq (the ring, buffers and parities follow it).
    const u32 first = STAGGER && nq > 0 ? (u32)((u64)blockIdx.x * nq / gridDim.x) : 0u;
    auto query_tile = [&](u32 it) { return STAGGER ? (it + first) % nq : it; };

    if (threadIdx.x == 0) {
        mbarrier_init(kv_full, FBW_COPY_THREADS);
        for (u32 s = 0; s < STAGES; ++s) {
            mbarrier_init(&full[s], FBW_COPY_THREADS);
            mbarrier_init(&empty[s], 8);
        }
        for (u32 b = 0; b < 2; ++b) {
            mbarrier_init(&dq_full[b], 256);
            mbarrier_init(&dq_empty[b], 2);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    if (threadIdx.x >= 256) {
        // ---- producer warpgroup ------------------------------------------------------------
        setmaxnreg_dec<FBW_PRODUCER_REGS>();
        const u32 pt = threadIdx.x - 256;
        if (pt < FBW_COPY_THREADS) {
            fbw_load_tile<T, BC>(ks, tile.k, tile.k_rs, tile.len, pt);
            fbw_load_tile<T, BC>(vs, tile.v, tile.v_rs, tile.len, pt);
            cp_async_mbarrier_arrive(kv_full);
            const i64 q_rs = p.q_stride[2], do_rs = p.dout_stride[2];
            for (u32 it = 0; it < nq; ++it) {
                const u32 st = it % STAGES, n = it / STAGES, i0 = query_tile(it) * BR;
                // Stage st last held tile it - STAGES (use n - 1): wait until every consumer warp
                // has released it.
                if (n > 0) mbarrier_wait(&empty[st], (n - 1) & 1);
                unsigned char* qs = stages + 2 * st * QO_BYTES;
                fbw_load_tile<T, BR>(qs, tile.q + (i64)i0 * q_rs, q_rs, p.lq - i0, pt);
                fbw_load_tile<T, BR>(qs + QO_BYTES, tile.dout + (i64)i0 * do_rs, do_rs, p.lq - i0, pt);
                // lse2 by threads 0..15, delta by 16..31: one 16-byte chunk each, zero past lq_pad.
                if (pt < 2 * BR / 4) {
                    const u32 c = pt % (BR / 4);
                    const float* src = (pt < BR / 4 ? tile.lse2 : tile.delta) + i0;
                    float* dst = (pt < BR / 4 ? lse_s : delta_s) + st * BR;
                    const bool in = 4 * c < p.lq_pad - i0;
                    cp_async_16(dst + 4 * c, in ? src + 4 * c : src, in);
                }
                cp_async_mbarrier_arrive(&full[st]);
            }
            // Every copy landed before the thread exits (wait_group waits for committed groups).
            cp_async_commit();
            cp_async_wait<0>();
        } else {
            // dQ writer thread wt (0..63): float4 column c of rows wt / 16 + 4 k of the tile (16
            // threads cover one 256-byte row of dq_accum).
            const u32 wt = pt - FBW_COPY_THREADS, c = wt % 16, r0 = wt / 16;
            for (u32 it = 0; it < nq; ++it) {
                const u32 b = it & 1;
                mbarrier_wait(&dq_full[b], (it >> 1) & 1);
                const float* part0 = dqs + 2 * b * DQ_FLOATS;
                const float* part1 = part0 + DQ_FLOATS;
#pragma unroll 4
                for (u32 k = 0; k < BR / 4; ++k) {
                    const u32 row = r0 + 4 * k, off = row * D + ((c ^ (row % 8)) << 2);
                    const float4 x = *(const float4*)(part0 + off), y = *(const float4*)(part1 + off);
                    const u32 q_row = query_tile(it) * BR + row;
                    if (q_row < p.lq) {
                        float* at = tile.dq_accum + (u64)q_row * D + 4 * c;
#ifdef LOOKAHEAD_EMULATE
                        // The emulator has no vector atomics: the same additions one by one.
                        atomicAdd(at, x.x + y.x);
                        atomicAdd(at + 1, x.y + y.y);
                        atomicAdd(at + 2, x.z + y.z);
                        atomicAdd(at + 3, x.w + y.w);
#else
                        atomicAdd((float4*)at, make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w));
#endif
                    }
                }
                __syncwarp();
                if (threadIdx.x % 32 == 0) mbarrier_arrive(&dq_empty[b]);
            }
        }
        return;
    }

    // ---- consumer warpgroups ----------------------------------------------------------------
    setmaxnreg_inc<FBW_CONSUMER_REGS>();
    const u32 wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const u32 g = lane / 4, t = lane % 4;

    // The two key rows whose S^T / dP^T / dK / dV values this thread holds (accumulator rows g and
    // g + 8 of its warp's 16), and whether they take part: inside the tile and not dropped.
    const u32 key0 = wg * 64 + warp * 16 + g, key1 = key0 + 8;
    const bool live0 = flash_bwd_live(p, tile, key0), live1 = flash_bwd_live(p, tile, key1);

    // Descriptors (128B swizzle, SBO 1024) advanced from one built at the aligned start, as in
    // the default kernel: K-major k-step kk of a [rows][64] tile is +32 bytes a step; MN-major with
    // the rows as k (rows row0 + 16 kk ..) is 2048 bytes a step.
    const u64 kmajor_base = wgmma_desc(smem, 16, 1024, WGMMA_SWIZZLE_128B);
    const u64 mnmajor_base = wgmma_desc(smem, BR * 128, 1024, WGMMA_SWIZZLE_128B);
    auto advance = [](u64 base, u32 bytes) { return (base & 0xffffffff00000000ull) | (u32)((u32)base + bytes / 16); };
    auto kmajor = [&](const unsigned char* at, int kk) { return advance(kmajor_base, (u32)(at - smem) + kk * 32); };
    auto mnmajor = [&](const unsigned char* at, u32 row0, int kk) { return advance(mnmajor_base, (u32)(at - smem) + (row0 + 16 * kk) * 128); };

    // K / V rows of the warpgroup as wgmma A fragments.
    mbarrier_wait(kv_full, 0);
    u32 ka[KD][4], va[KD][4];
    flash_bwd_kv_fragments(ka, va, ks, vs, key0, t);

    float dk[NG], dv[NG];
#pragma unroll
    for (int i = 0; i < NG; ++i) dk[i] = dv[i] = 0.0f;
    float s[NS], dp[NS], dq[NG];
    // One arrival a warp on `bar` once the warp is done reading what it guards.
    auto release = [&](u64* bar) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(bar);
    };

    for (u32 it = 0; it < nq; ++it) {
        const u32 st = it % STAGES, b = it & 1;
        const unsigned char* qs = stages + 2 * st * QO_BYTES;
        const unsigned char* dos = qs + QO_BYTES;
        const float* ls = lse_s + st * BR;
        const float* dls = delta_s + st * BR;
        unsigned char* ds_tile = dss + (2 * b + wg) * DS_BYTES;
        float* dq_tile = dqs + (2 * b + wg) * DQ_FLOATS;

        // Stage st holds tile it; the proxy fence orders the landed cp.async writes (generic
        // proxy) before the wgmma reads (async proxy); K came the same way (first tile).
        mbarrier_wait(&full[st], (it / STAGES) & 1);
        fence_proxy_async();

        wgmma_fence();  // dk, dv, pa, da, dq were last used by other instructions
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) wgmma_rs<T, BR, false>(s, ka[kk], kmajor(qs, kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) wgmma_rs<T, BR, false>(dp, va[kk], kmajor(dos, kk), kk > 0);
        wgmma_commit();

        // P^T on live keys (0 elsewhere), dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q.
        u32 pa[KQ][4], da[KQ][4];
        flash_bwd_dv_dk<T, D>(dv, dk, s, dp, pa, da, qs, dos, [&](const unsigned char* at, int kk) { return mnmajor(at, 0, kk); }, ls, dls, p.scale_log2, live0, live1, t);

        // dS transposed into this warpgroup's buffer. Buffer b was last read by dQ(it - 2), which
        // every warp of the warpgroup retired before the named barrier of tile it - 1.
        flash_bwd_store_ds_t(ds_tile, da, warp, g, t);
        // Every warp's dS stores (fenced for the async proxy) before the warpgroup's dQ product;
        // the other warpgroup does not take part.
        fence_proxy_async();
        named_barrier_sync(1 + wg, 128);

        // dQ_w = dS_w K_w: A = the dS buffer (K-major, keys as k), B = K rows 64 wg .. as MN-major.
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) wgmma_ss<T, D, true>(dq, kmajor(ds_tile, kk), mnmajor(ks, wg * 64, kk), kk > 0);
        wgmma_commit();

        // dK has retired (groups retire in order): the stage (Q, dO, lse2, delta) is free.
        wgmma_wait<1>();
        wgmma_fence_operands(dk);
        wgmma_fence_operands(dv);
        wgmma_fence_operands(pa);
        wgmma_fence_operands(da);
        release(&empty[st]);

        wgmma_wait<0>();
        wgmma_fence_operands(dq);
        // The partial dQ to buffer b once the dQ warps are done with its previous tile (it - 2):
        // rows 16 warp + g (+ 8), columns 8 n + 2t, + 1, as float2 in row-major [BR][D] f32 with
        // 16-byte chunk c of row r at c ^ (r % 8) (conflict-free stores and float4 reads).
        if (it >= 2) mbarrier_wait(&dq_empty[b], ((it >> 1) - 1) & 1);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 row = warp * 16 + g + 8 * h, chunk = 2 * n + t / 2;
                *(float2*)(dq_tile + row * D + ((chunk ^ (row % 8)) << 2) + 2 * (t % 2)) = make_float2(dq[4 * n + 2 * h], dq[4 * n + 2 * h + 1]);
            }
        }
        mbarrier_arrive(&dq_full[b]);
    }

    flash_bwd_store_dk_dv<T, D>(p, tile, key0, key1, t, dk, dv);
}

#endif  // LA_WGMMA

// Without wgmma (sm_80, sm_90 without the a features) the kernels compile empty; the engine
// launches them only on compute capability 9.0, whose CUBIN is built for sm_90a.
#if LA_WGMMA
#define FBW_BODY(T, STAGGER) flash_bwd_ws<T, STAGGER>(p)
#else
#define FBW_BODY(T, STAGGER) (void)p
#endif

// Instances flash_bwd_hopper_<variant>_<type>_d64 (the variant naming of
// flash_attention_backward_hopper.cu): ws, ws_stagger.
#define FBW_INSTANCE(TN, T, STAGGER, SUFFIX) \
    extern "C" __global__ void __launch_bounds__(FBW_THREADS, 1) flash_bwd_hopper_##SUFFIX##_##TN##_d64(const FlashBwdParams p) { FBW_BODY(T, STAGGER); }
FBW_INSTANCE(bf16, bf16, false, ws)
FBW_INSTANCE(f16, f16, false, ws)
FBW_INSTANCE(bf16, bf16, true, ws_stagger)
FBW_INSTANCE(f16, f16, true, ws_stagger)
