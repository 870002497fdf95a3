// Flash extended attention, forward, for Hopper (sm_90a), head dim 64, warp-specialized: the math,
// parameters and outputs of flash_attention_hopper_fwd_* (flash_attention_hopper.cu: keys/values
// [own (Lk) ; reference (Lr)] from their two sources, reference tokens with keep == 0 left out, out
// [B, Lq, H, D] memory, lse f32 [B, H, Lq] natural log, a row with no key left gives out 0 and lse
// -inf; scale > 0; built with flush-to-zero) with FlashAttention-3's structure instead of one block
// barrier per key tile. Selected by LOOKAHEAD_VARIANT_FLASH_FWD=ws / ws_nopp / ws3 / ws_poly3 /
// ws_tma (the instances at the end; engine/src/cuda/flash_attention.rs,
// kernels::flash_attention::{hopper_launch, ws_tma_map}).
//
// Why: the default kernel (3 warpgroups, all threads copying, a __syncthreads per key tile) keeps
// its warpgroups in lockstep: they all queue their wgmmas at once, then all compete for MUFU at
// once, and the wait for S is exposed at every step (~4100 cycles per round of three warpgroup
// tiles on the H200 against ~2000 for the tensor-core and MUFU work).
//
// Launch: grid (ceil(Lq / 128), H, B), WS_THREADS = 384 threads: warpgroups 0 and 1 are the
// consumers (64 query rows each), warpgroup 2 the producer. setmaxnreg moves registers from the
// producer (56 a thread) to the consumers (224; 168 each at launch). (A producer of one warp, 288
// threads, gets no more than 384 threads do: ptxas still limits it to 168 registers, since a warp
// scheduler's quarter of the register file holds 3 of its 9 warps, and the ping-pong instance
// spilled.) Dynamic shared memory ws_shared_bytes<STAGES>(): Q (128 x 64) + STAGES K tiles +
// STAGES V tiles (128 keys x 64) + the mbarriers + 1 KiB to align the start to a swizzle atom (2
// stages: 80 KiB + 1 KiB + 128 B, one block an SM by registers anyway). Tiles have the layout of
// flash_attention_hopper.cu (128-byte rows, 128B-swizzled, 1024-byte aligned): Q and K are K-major
// wgmma operands, V MN-major.
//
// Producer warpgroup: Q once, then for key tile j (own tiles first, then reference tiles) K_j into
// K stage j % STAGES and V_j into V stage j % STAGES, each with cp.async (8 16-byte copies a
// thread, zero-filled past the source's end) followed by cp_async_mbarrier_arrive on the stage's
// "full" mbarrier (128 arrivals: one a thread, each once its own copies have landed). Before
// refilling a stage it waits on the stage's "empty" mbarrier (8 arrivals: lane 0 of each consumer
// warp, once its warpgroup's wgmmas reading the stage have retired).
//
// Consumer warpgroup, step j = 0 .. tiles: wait for K_j (j < tiles) and V_{j-1} (j > 0), issue
// S_j = Q K_j^T (wgmma_ss) and O += P_{j-1} V_{j-1} (wgmma_rs), release K_j once S_j has retired,
// mask and online softmax of S_j (base 2, as the default kernel) while P_{j-1} V_{j-1} still runs
// (intra-warpgroup overlap), then wait for it, release V_{j-1}, rescale O and pack P_j. No block
// barrier in the loop. Ping-pong (PINGPONG): named barriers 1 and 2 (256 threads: one warpgroup
// syncs, the other arrives) make the two warpgroups issue their products in turn (0, 1, 0, 1, ...)
// so that the tensor cores run one warpgroup's products while the other runs its softmax.
//
// Variants (LOOKAHEAD_VARIANT_FLASH_FWD): ws = ping-pong, 2 stages; ws_nopp = no ping-pong, 2
// stages; ws3 = ping-pong, 3 stages; ws_poly3 = ws with every third 8-column block's
// exponentials by fh_exp2_poly (FMA pipe); ws_tma = ws with K/V by TMA: producer thread 0 alone
// issues, per tile, arrive_expect_tx(16 KiB) and one tma_load_4d box of 64 x 128 rows (128B
// swizzle: the layout above) from rank-4 maps (64, L, H, B) of k, v, k_ref, v_ref with the views'
// own strides (four `const __grid_constant__ TensorMap` parameters after FlashParams; the host's
// kernels::flash_attention::ws_tma_map), so any [B, H, L, D] view with 16-byte aligned strides
// maps, heads interleaved ([B, L, H, D] memory, the UNet's layout) included, and a tile's rows
// past its source's end are zero-filled per head; the full mbarriers expect 1 arrival, and the
// consumers skip the per-step proxy fence (a MEMBAR.ALL.CTA in SASS) since TMA writes through the
// async proxy. The engine runs ws instead for views TMA cannot map. Not yet measured on a GPU
// (written without one).
#include "flash_attention.cuh"  // FlashParams, FA_NEG_INF, the per-tile steps fa_*
#include "pipeline.cuh"

#define WS_D 64
#define WS_BN 128
#define WS_ROWS 128
#define WS_THREADS 384
// setmaxnreg: 56 + 2 x 224 registers per thread over one warp of each warpgroup = 504 <= the 512 a
// warp scheduler's quarter of the register file holds for 3 warps (16384 / 32); at launch each
// thread has the 168 that 384 threads allow.
#define WS_PRODUCER_REGS 56
#define WS_CONSUMER_REGS 224
#define WS_TILE_BYTES (WS_BN * WS_D * 2)
#define WS_Q_BYTES (WS_ROWS * WS_D * 2)

// Mirrored by kernels::flash_attention::ws_shared_bytes: tiles, 128 bytes of mbarriers, 1 KiB to
// align the start.
template <int STAGES> __host__ __device__ constexpr u32 ws_shared_bytes() { return WS_Q_BYTES + 2u * STAGES * WS_TILE_BYTES + 128u + 1024u; }

#if LA_WGMMA

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` of a [rows][64] 16-bit tile,
// 128B-swizzled (chunk c of row r at chunk c ^ (r % 8)).
__device__ __forceinline__ u32 ws_offset(u32 row, u32 chunk) { return row * 128u + (((chunk % 8) ^ (row % 8)) << 4); }

// The producer warpgroup's cp.async copies of ROWS rows x 64 from src (row stride rs, zero fill
// past `len` rows, len >= 1) into the tile at dst: producer thread i (0..127) copies chunk i % 8 of
// rows i / 8 + 16 k. Rows 16 apart keep the same swizzled chunk position, so destination and
// source advance by constants (2048 bytes, 16 rs elements); 8 consecutive threads read 128
// contiguous bytes of a row.

template <typename T, u32 ROWS> __device__ __forceinline__ void ws_load_tile(unsigned char* dst, const T* src, i64 rs, u32 len, u32 i) {
    const u32 chunk = i % 8, row = i / 8;
    unsigned char* to = dst + ws_offset(row, chunk);
    const T* from = src + (i64)row * rs + chunk * 8;
#pragma unroll
    for (u32 k = 0; k < ROWS / 16; ++k) {
        // A row past the end is not read (zero fill), but the address must still be valid.
        const bool full = row + 16 * k < len;
        cp_async_16(to + k * 2048, full ? from : src, full);
        from += 16 * rs;
    }
}

// PINGPONG: the two consumer warpgroups issue their products in turn (named barriers 1, 2).
// STAGES: K (and V) tiles in the ring. POLY: 0 takes every exponential on MUFU.EX2; n > 0 those of
// every n-th 8-column block by fh_exp2_poly on the FMA pipe (as the default kernel's poly<n>).
// The tensor maps of the TMA instance (kernel parameters): k, v, k_ref, v_ref as rank-4 maps
// (64, L, H, B) with the views' own strides, boxes of 64 x WS_BN x 1 x 1 elements, 128B swizzle.
struct WsMaps {
    const TensorMap* k;
    const TensorMap* v;
    const TensorMap* kr;
    const TensorMap* vr;
};

// TMA: K/V tiles by TMA (maps), issued by one producer thread, instead of cp.async.
template <typename T, bool PINGPONG, int STAGES, int POLY, bool TMA> __device__ __forceinline__ void flash_attention_ws_fwd(const FlashParams& p, const WsMaps maps) {
    constexpr int NS = WS_BN / 2;     // S accumulator registers a thread
    constexpr int NO = WS_D / 2;      // O accumulator registers a thread
    constexpr int KSTEPS = WS_D / 16; // k-steps of S = Q K^T
    constexpr int PSTEPS = WS_BN / 16; // k-steps of O += P V

    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    // The swizzle works on absolute shared-memory addresses: atoms start 1024-byte aligned (the
    // shared-window offset read from a descriptor's start-address field, as in the default kernel).
    const u32 window_offset = (u32)(wgmma_desc(smem_raw, 16, 16, WGMMA_SWIZZLE_NONE) & 0x3fffu) << 4;
    unsigned char* smem = smem_raw + (1024u - window_offset % 1024u) % 1024u;
    unsigned char* qs = smem;
    unsigned char* k_stages = smem + WS_Q_BYTES;                 // K stage s at + s WS_TILE_BYTES
    unsigned char* v_stages = k_stages + STAGES * WS_TILE_BYTES;  // V stage s likewise
    u64* bars = (u64*)(v_stages + STAGES * WS_TILE_BYTES);
    u64* q_full = bars;
    u64* k_full = bars + 1;  // [STAGES] each
    u64* k_empty = k_full + STAGES;
    u64* v_full = k_empty + STAGES;
    u64* v_empty = v_full + STAGES;

    const u32 bi = blockIdx.z, hi = blockIdx.y, row0 = blockIdx.x * WS_ROWS;
    const u32 own_tiles = (p.lk + WS_BN - 1) / WS_BN;
    const u32 tiles = own_tiles + (p.lr + WS_BN - 1) / WS_BN;

    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 128);
        for (int s = 0; s < STAGES; ++s) {
            // cp.async: one arrival a producer thread; TMA: the issuing thread's arrive_expect_tx.
            mbarrier_init(&k_full[s], TMA ? 1 : 128);
            mbarrier_init(&v_full[s], TMA ? 1 : 128);
            mbarrier_init(&k_empty[s], 8);
            mbarrier_init(&v_empty[s], 8);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    if (threadIdx.x >= 256) {
        // ---- producer warpgroup --------------------------------------------------------------
        // Gives registers up for the consumers (every warp of the warpgroup executes it).
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        const u32 pt = threadIdx.x - 256;  // producer thread 0..127
        const T* q = (const T*)p.q + bi * p.q_stride[0] + hi * p.q_stride[1];
        const T* k = (const T*)p.k + bi * p.k_stride[0] + hi * p.k_stride[1];
        const T* v = (const T*)p.v + bi * p.v_stride[0] + hi * p.v_stride[1];
        const T* kr = (const T*)p.k_ref + bi * p.k_ref_stride[0] + hi * p.k_ref_stride[1];
        const T* vr = (const T*)p.v_ref + bi * p.v_ref_stride[0] + hi * p.v_ref_stride[1];
        ws_load_tile<T, WS_ROWS>(qs, q + (i64)row0 * p.q_stride[2], p.q_stride[2], p.lq - row0, pt);
        cp_async_mbarrier_arrive(q_full);
        for (u32 j = 0; j < tiles && TMA && pt == 0; ++j) {
            const u32 s = j % STAGES, n = j / STAGES;
            const bool is_own = j < own_tiles;
            const u32 start = (is_own ? j : j - own_tiles) * WS_BN;
            // Rows start.. of head hi of batch entry bi; rows past the source's end are zero-filled.
            if (n > 0) mbarrier_wait(&k_empty[s], (n - 1) & 1);
            mbarrier_arrive_expect_tx(&k_full[s], WS_TILE_BYTES);
            tma_load_4d(k_stages + s * WS_TILE_BYTES, is_own ? maps.k : maps.kr, 0, (int)start, (int)hi, (int)bi, &k_full[s]);
            if (n > 0) mbarrier_wait(&v_empty[s], (n - 1) & 1);
            mbarrier_arrive_expect_tx(&v_full[s], WS_TILE_BYTES);
            tma_load_4d(v_stages + s * WS_TILE_BYTES, is_own ? maps.v : maps.vr, 0, (int)start, (int)hi, (int)bi, &v_full[s]);
        }
        for (u32 j = 0; j < tiles && !TMA; ++j) {
            const u32 s = j % STAGES, n = j / STAGES;
            const bool is_own = j < own_tiles;
            const u32 start = (is_own ? j : j - own_tiles) * WS_BN;
            const u32 len = (is_own ? p.lk : p.lr) - start;
            const i64 krs = is_own ? p.k_stride[2] : p.k_ref_stride[2];
            const i64 vrs = is_own ? p.v_stride[2] : p.v_ref_stride[2];
            // Stage s was last filled with tile j - STAGES (use n - 1): wait until it is released.
            if (n > 0) mbarrier_wait(&k_empty[s], (n - 1) & 1);
            ws_load_tile<T, WS_BN>(k_stages + s * WS_TILE_BYTES, (is_own ? k : kr) + (i64)start * krs, krs, len, pt);
            cp_async_mbarrier_arrive(&k_full[s]);
            if (n > 0) mbarrier_wait(&v_empty[s], (n - 1) & 1);
            ws_load_tile<T, WS_BN>(v_stages + s * WS_TILE_BYTES, (is_own ? v : vr) + (i64)start * vrs, vrs, len, pt);
            cp_async_mbarrier_arrive(&v_full[s]);
        }
        // Every copy landed before the thread exits (cp.async.wait_group waits for committed
        // groups only: commit them first).
        cp_async_commit();
        cp_async_wait<0>();
        return;
    }

    // ---- consumer warpgroups ----------------------------------------------------------------
    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const u32 wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const u32 g = lane / 4, t = lane % 4;
    const u8* keep = p.keep ? (const u8*)p.keep + bi * p.keep_batch_stride : nullptr;

    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
    // Running max (base-2 units) and this thread's part of the row sums, rows g (h = 0) and g + 8
    // (h = 1) of the warp's 16.
    float m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.0f, 0.0f};
    // P of the previous tile as wgmma_rs A fragments (k-step kk: accumulator registers 8 kk ..).
    u32 pa[PSTEPS][4];

    const u64 q_desc = wgmma_desc(qs + wg * 64 * 128, 16, 1024, WGMMA_SWIZZLE_128B);
    const u64 k_desc = wgmma_desc(k_stages, 16, 1024, WGMMA_SWIZZLE_128B);
    const u64 v_desc = wgmma_desc(v_stages, WS_BN * 128, 1024, WGMMA_SWIZZLE_128B);

    // Ping-pong: warpgroup w issues its products after sync on barrier 1 + w, then lets the other
    // one go by arriving on its barrier. Both run steps 0 .. tiles; warpgroup 1 arrives on barrier
    // 1 once before its first step (warpgroup 0 goes first) and not after its last (so that every
    // arrival is matched by a sync and no barrier is left half-arrived at exit).
    auto turn_begin = [&]() {
        if (PINGPONG) named_barrier_sync(1 + wg, 256);
    };
    auto turn_end = [&](u32 j) {
        if (PINGPONG && !(wg == 1 && j == tiles)) named_barrier_arrive(2 - wg, 256);
    };
    // Waits for the data of step j: K_j (j < tiles), V_{j-1} (j > 0), then the proxy fence that
    // orders the landed cp.async writes (generic proxy) before the wgmma reads (async proxy); TMA
    // writes are async-proxy writes already.
    auto wait_data = [&](u32 j) {
        if (j < tiles) mbarrier_wait(&k_full[j % STAGES], (j / STAGES) & 1);
        if (j > 0) mbarrier_wait(&v_full[(j - 1) % STAGES], ((j - 1) / STAGES) & 1);
        if (!TMA) fence_proxy_async();
    };
    auto issue_s = [&](u32 j, float (&s)[NS]) {
        const u64 k_stage = k_desc + (j % STAGES) * (WS_TILE_BYTES / 16);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) wgmma_ss<T, WS_BN, false>(s, q_desc + kk * 2, k_stage + kk * 2, kk > 0);
        wgmma_commit();
    };
    auto issue_pv = [&](u32 j) { fa_issue_pv<T, WS_D>(o, pa, v_desc + ((j - 1) % STAGES) * (WS_TILE_BYTES / 16)); };
    // One arrival a warp on `bar` once the warp's wgmmas reading its stage have retired.
    auto release = [&](u64* bar) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(bar);
    };
    // The softmax of step j once S_j is issued (P_{j-1} V_{j-1} after it when `pv_pending`): as in
    // flash_attention_hopper.cu (the dropped keys' bits by ballots, fa_drop_bits; online softmax in
    // base 2, fa_softmax_tile).
    auto softmax_step = [&](u32 j, float (&s)[NS], float (&corr)[2], bool pv_pending) {
        const bool reference = j >= own_tiles;
        const u32 start = reference ? (j - own_tiles) * WS_BN : j * WS_BN;
        const u32 len = reference ? p.lr - start : p.lk - start;
        const bool check = len < WS_BN || (reference && keep != nullptr);
        u32 drop[2] = {0, 0};
        if (check) fa_drop_bits(drop, reference, start, len, keep, lane, t);

        if (pv_pending) wgmma_wait<1>();  // S_j retired (groups retire in order); P V may still run
        else wgmma_wait<0>();
        wgmma_fence_operands(s);
        release(&k_empty[j % STAGES]);

        fa_softmax_tile<POLY>(s, check, drop, p.scale_log2, m, l, corr);
    };
    // The end of step j, at the start of step j + 1 (kept apart from the softmax by the loop's back
    // edge, so that ptxas does not hoist the wait above it): P_{j-1} V_{j-1} retired, V_{j-1}'s
    // stage released (j > 0), O rescaled, P_j packed.
    auto finish_step = [&](u32 j, const float (&s)[NS], const float (&corr)[2]) {
        wgmma_wait<0>();
        wgmma_fence_operands(o);
#pragma unroll
        for (int kk = 0; kk < PSTEPS; ++kk) wgmma_fence_operands(pa[kk]);
        if (j > 0) release(&v_empty[(j - 1) % STAGES]);
        fa_rescale_o_pack_p<T, WS_D>(o, pa, s, corr);
    };

    // Step 0 (no P V yet) and step `tiles` (P V only) are peeled off the loop: no wgmma is issued
    // under a condition (ptxas would serialize them).
    if (tiles > 0) {
        float s[NS], corr[2];
        mbarrier_wait(q_full, 0);
        fence_proxy_async();  // Q came by cp.async
        if (PINGPONG && wg == 1) named_barrier_arrive(1, 256);
        turn_begin();
        wait_data(0);
        wgmma_fence();
        issue_s(0, s);
        turn_end(0);
        softmax_step(0, s, corr, false);
        for (u32 j = 1; j < tiles; ++j) {
            finish_step(j - 1, s, corr);
            turn_begin();
            wait_data(j);
            wgmma_fence();
            issue_s(j, s);
            issue_pv(j);
            turn_end(j);
            softmax_step(j, s, corr, true);
        }
        finish_step(tiles - 1, s, corr);
        turn_begin();
        wait_data(tiles);
        wgmma_fence();
        issue_pv(tiles);
        turn_end(tiles);
        wgmma_wait<0>();
        wgmma_fence_operands(o);
    }

    // Full row sums, then out = O / l and lse (flash_attention.cuh).
    fa_store_out_lse<T, WS_D>(p, o, m, l, bi, hi, row0 + wg * 64 + warp * 16, g, t);
}

#endif  // LA_WGMMA

// Without wgmma (sm_80, sm_90 without the a features) the kernels compile empty; the engine
// launches them only on compute capability 9.0, whose CUBIN is built for sm_90a.
#if LA_WGMMA
#define WS_BODY(T, PINGPONG, STAGES, POLY) flash_attention_ws_fwd<T, PINGPONG, STAGES, POLY, false>(p, WsMaps{})
#define WS_TMA_BODY(T) flash_attention_ws_fwd<T, true, 2, 0, true>(p, WsMaps{&k_map, &v_map, &kr_map, &vr_map})
#else
#define WS_BODY(T, PINGPONG, STAGES, POLY) (void)p
#define WS_TMA_BODY(T) (void)p
#endif

// Instances flash_attention_hopper_fwd_<type>_d64_<variant> (kernels::flash_attention::
// hopper_variant_kernel_name): ws (ping-pong, 2 stages), ws_nopp (no ping-pong), ws3 (3 stages),
// ws_poly3 (ws with 1 / 3 of the exponentials by fh_exp2_poly); ws_tma (ws with K/V by TMA: four
// more parameters, the tensor maps of k, v, k_ref, v_ref).
#define WS_INSTANCE(TN, T, PINGPONG, STAGES, POLY, SUFFIX) \
    extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) flash_attention_hopper_fwd_##TN##_d64_##SUFFIX(const FlashParams p) { WS_BODY(T, PINGPONG, STAGES, POLY); }
WS_INSTANCE(bf16, bf16, true, 2, 0, ws)
WS_INSTANCE(f16, f16, true, 2, 0, ws)
WS_INSTANCE(bf16, bf16, false, 2, 0, ws_nopp)
WS_INSTANCE(f16, f16, false, 2, 0, ws_nopp)
WS_INSTANCE(bf16, bf16, true, 3, 0, ws3)
WS_INSTANCE(f16, f16, true, 3, 0, ws3)
WS_INSTANCE(bf16, bf16, true, 2, 3, ws_poly3)
WS_INSTANCE(f16, f16, true, 2, 3, ws_poly3)
#define WS_TMA_INSTANCE(TN, T)                                                                                                                                          \
    extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) flash_attention_hopper_fwd_##TN##_d64_ws_tma(const FlashParams p, const __grid_constant__ TensorMap k_map, \
                                                                                                      const __grid_constant__ TensorMap v_map,                       \
                                                                                                      const __grid_constant__ TensorMap kr_map,                      \
                                                                                                      const __grid_constant__ TensorMap vr_map) {                    \
        WS_TMA_BODY(T);                                                                                                                                                 \
    }
WS_TMA_INSTANCE(bf16, bf16)
WS_TMA_INSTANCE(f16, f16)
