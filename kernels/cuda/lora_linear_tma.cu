// Fused LoRA linear for Hopper (sm_90a), warp-specialized with TMA loads: the GEMM of
// lora_linear.cu / lora_linear_hopper.cu over concatenated operands,
//     C[M, N] = [A1 | A2] · [B1 ; B2] + bias,
// same arguments (LoraGemmArgs), semantics, B layouts (nk: B rows [n][k], the forward
// y = [x | t] · [W | B]^T; kn: B rows [k][n], dx = [dy | s u] · [W ; A]), k-tiles (64), wgmma
// instructions and shared-memory tile layouts as lora_linear_hopper.cu; what differs is who loads
// and how the stages are handed over. The default stays the cp.async kernel of
// lora_linear_hopper.cu until a GPU run has measured these. Variants (LOOKAHEAD_VARIANT_LORA,
// engine/src/cuda/lora_linear.rs; kernel names lora_gemm_<variant>_{nk,kn}_{bf16,f16}):
//   tma     128 x 160 tiles, 6 stages of 36 KiB; the two consumer warpgroups share each tile
//           (64 rows each, 80 accumulators a thread). 8192x640: 256 tiles (1.94 waves of 132 SMs).
//   tma256  256 x 160 tiles, 4 stages of 52 KiB (128 rows a consumer, 160 accumulators): 27% less
//           L2->SM traffic a FLOP; 8192x640: 128 tiles (0.97 wave), but 2048x1280: 64 tiles (half
//           the SMs idle).
//   tma_pp  (LOOKAHEAD_VARIANT_LORA=tma-pp) 128 x 160 tiles, 6 stages, ping-pong: each consumer
//           warpgroup computes whole tiles (the block's tiles c, c + 2, ...; 160 accumulators),
//           the two mainloops take turns through named barriers, so one warpgroup's epilogue
//           overlaps the other's wgmmas (CUTLASS's KernelTmaWarpSpecializedPingpong). Helps when
//           a block has several tiles; with one (2048x1280: 128 tiles) the second warpgroup idles.
//   tma_mc  (LOOKAHEAD_VARIANT_LORA=tma-mc) tma's tiles and warpgroups in clusters of 2 CTAs that
//           compute row tiles 2i and 2i + 1 of one column tile and so share the B tile: each CTA
//           TMA-loads half of it and multicasts it into both CTAs' stages (CUTLASS's 2x1 cluster
//           multicast), so B (20 of the 36 KiB a stage) crosses L2->SM once per pair: 28% less
//           L2->SM traffic a FLOP than tma at tma's occupancy and wave count (8192x640: 128 tile
//           pairs on 66 clusters). Halves, not alternate k-tiles: both TMA units fetch every stage
//           (half the bytes each), so a stage lands as fast as with one CTA loading its own B,
//           and the issue work is even (nk: one 80-row box each; kn: each of the five 32-column
//           blocks' 32 k-rows, 5 copies as tma's 5 whole blocks).
// Not done: TMA stores of C (the stages use the shared memory).
//
// Why: on the H200 the cp.async kernel's loads alone took 26.7 us at 8192x640x640, 2x cuBLAS's whole
// GEMM (12.2 us): 256 threads computing addresses and issuing 16-byte copies, a cp.async wait and a
// block barrier (__syncthreads) every k-tile. Here one thread issues a stage's loads as 2 (nk) or
// 6 (kn) bulk tensor copies, the copies complete on an mbarrier, and no block barrier is left in
// the main loop.
//
// Launch: persistent, grid min(output tiles, SMs) (kernels::lora_linear::tma_blocks) of 384
// threads = 3 warpgroups, one block an SM, dynamic shared memory: the stages + 1 KiB of alignment
// slack + the mbarriers (kernels::lora_linear::tma_shared_bytes). tma_mc: cluster dims (2, 1, 1)
// (CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION), grid 2 min(tile pairs, clusters the device runs at
// once) (kernels::lora_linear::tma_mc_blocks; a multiple of 2), the same shared memory; cluster c
// takes tile pairs c, c + grid / 2, ... (pair index over (row-tile pairs x column tiles)), both
// CTAs in lockstep; B boxes are the halves (TMA_MC_BOX_B_*: nk [80 rows][64], kn [32 k][32 n]).
// Kernel parameters:
// the LoraGemmArgs, then four `const __grid_constant__ TensorMap`s (engine/src/cuda/tensor_map.rs,
// built per call on the host: a few host-only driver calls, no device work): A1, B1, A2, B2, boxes
//   A1 / A2: [k = 64 columns][m = 128 or 256 rows], 128-byte swizzle (the K-major A tile);
//   B1 / B2 nk: [64 columns][160 rows], 128-byte swizzle (the K-major B tile);
//   B1 / B2 kn: [n = 32 columns][k = 64 rows], 64-byte swizzle (one of the five 4 KiB blocks of
//     the MN-major [64 k][160 n] tile).
// TMA needs 16-byte aligned base addresses and 16-byte multiples as row strides, so the LoRA
// operands (rows of r elements for A2 and the nk B2) need r a multiple of 8 and 16-byte aligned
// addresses; the engine runs lora_linear_hopper.cu otherwise (r 4, 12, ..., misaligned views), and
// for k1 = 0 (a tensor map has no empty dimension). Out-of-range box elements (rows beyond M or N,
// k beyond K1 or r) are zero-filled by the TMA unit and still count as transaction bytes, so every
// stage completes after exactly STAGE_BYTES.
//
// Roles:
//   warpgroup 0 (producer; setmaxnreg.dec to 40 registers): one thread walks the block's k-tiles
//     (all its output tiles, q = 0, 1, ...): waits on empty[q % S] (S stages; parity flipping
//     every wrap of the ring), arrive.expect_tx(full[q % S], stage bytes), issues the A and B
//     copies onto full. The other 127 threads exit.
//   warpgroups 1 and 2 (consumers c = 0, 1; setmaxnreg.inc to 232): warpgroup c computes its rows
//     of the tile with wgmma_ss<T, 160> over the stage (the descriptors of lora_linear_hopper.cu's
//     lh_mma_step): wait full[q % S], issue the k-tile's k16 steps that hold data (a LoRA tile of
//     rank 16: one), commit, wgmma_wait<1> (so the group of k-tile q - 1 has retired), then each
//     warp's lane 0 arrives on empty[(q - 1) % S] (count 8, tma_pp 4: every consumer warp reading
//     the stage, after its own wait). At the end of a tile: wgmma_wait<0>, the
//     last stage released, then the epilogue from registers (accumulators + bias, rounded to T,
//     the words of a quad transposed by shuffles so that each lane stores 16 contiguous bytes)
//     while the producer already fills the stages with the next tile's k-tiles (up to S ahead),
//     so the next tile starts on loaded data.
// tma_mc, besides: a stage of a CTA is written by both CTAs' producers, so each consumer warp
//   frees it in both (lanes 0 and 1 arrive on the empty barriers of cluster CTAs 0 and 1, the
//   peer's through mapa: empty counts 16), and a producer refills a stage only once both CTAs'
//   consumers released it; each CTA's full barrier still expects the whole stage (its A + both
//   halves of B; the peer's half may land before this CTA's expect_tx: the transaction count goes
//   negative meanwhile). The inits are published by fence_mbarrier_init (cluster scope) and a
//   cluster barrier before the peer can arrive or multicast, and a cluster barrier at the end
//   (every thread: the producer warpgroup's idle ones wait there instead of exiting) keeps each
//   CTA's shared memory alive until the peer's last arrival. An odd last row tile leaves its
//   pair's second CTA without rows: its A loads are zero fill, it loads and multicasts its half of
//   B, frees stages, stores nothing.
// Register budget: 128 x 40 + 256 x 232 = 64512 = 384 x 168, the registers __launch_bounds__(384, 1)
// gives the block.
#include "cluster.cuh"
#include "common.cuh"
#include "lora_linear.cuh"  // LoraGemmArgs, shared with lora_linear.cu / lora_linear_hopper.cu
#include "mma.cuh"
#include "pipeline.cuh"

// BM: the output tile's rows, 128 (variant tma: each consumer warpgroup 64 rows, one m64 wgmma a
// k16 step, 80 accumulators a thread, 6 stages of 36 KiB) or 256 (variant tma256: 128 rows a
// consumer, two m64 wgmmas a k16 step sharing the B descriptor, 160 accumulators, 4 stages of
// 52 KiB). Columns 160 and k-tiles of 64 either way.
#define LT_BN 160
#define LT_BK 64
#define LT_THREADS 384
#define LT_B_BYTES (LT_BN * LT_BK * 2)  // 20 KiB
// PP (variant tma-pp, BM 128 only): ping-pong consumers: warpgroup c computes whole tiles, the
// block's tiles c, c + 2, ... (all 128 rows: two m64 wgmmas a k16 step, 160 accumulators), so
// that one warpgroup's epilogue runs while the other's wgmmas use the tensor cores; a stage is
// read by one warpgroup (4 arrivals free it). Without PP both warpgroups share each tile (8).
// MC (variant tma-mc, BM 128 and shared tiles only): clusters of 2 CTAs that multicast the B
// tile: every stage of a CTA is also written by the peer's producer, so both CTAs' consumer warps
// free it (16 arrivals).
template <int BM, bool PP, bool MC = false> struct LtShape {
    static constexpr int A_BYTES = BM * LT_BK * 2;             // 16 / 32 KiB
    static constexpr int STAGE_BYTES = A_BYTES + LT_B_BYTES;  // 36 / 52 KiB, multiples of 1024
    static constexpr int STAGES = BM == 128 ? 6 : 4;
    static constexpr int WG_ROWS = PP ? BM : BM / 2;  // rows of a tile a consumer warpgroup computes
    static constexpr int HB = WG_ROWS / 64;           // its m64 blocks (accumulator sets)
    static constexpr int CONSUMER_WARPS = (PP ? 4 : 8) * (MC ? 2 : 1);  // arrivals that free a stage
    static constexpr int TILE_STEP = PP ? 2 : 1;       // a warpgroup's tiles are this many apart
    static_assert(!PP || BM == 128, "ping-pong with 128-row tiles only");
    static_assert(!MC || (BM == 128 && !PP), "multicast clusters with the shared 128-row tiles only");
};

#if LA_WGMMA

// The work units of a block in order: output tiles first, first + step, ... below `units`
// (tile u: row tile u / tiles_n, column tile u % tiles_n), or (MC) the tile pairs of its cluster,
// (blockIdx.x / 2) + k (gridDim.x / 2), both CTAs of a cluster taking the same pairs in lockstep:
// pair u is row tiles 2 (u / tiles_n) + {0, 1} of column tile u % tiles_n, CTA rank r taking
// row tile 2 (u / tiles_n) + r (beyond M for rank 1 of the last pair when the row tiles are odd:
// its A is zero fill and its stores are skipped, but it loads its half of B and frees stages).
template <bool MC> struct LtSched {
    u32 first, step, units, tiles_n, rank;
    __device__ __forceinline__ LtSched(u32 m, u32 n, int bm) {
        tiles_n = (n + LT_BN - 1) / LT_BN;
        const u32 tiles_m = (m + bm - 1) / bm;
        first = MC ? blockIdx.x >> 1 : blockIdx.x;
        step = MC ? gridDim.x >> 1 : gridDim.x;
        units = (MC ? (tiles_m + 1) >> 1 : tiles_m) * tiles_n;
        rank = MC ? cluster_rank() : 0u;
    }
    __device__ __forceinline__ u32 row_tile(u32 u) const { return MC ? 2 * (u / tiles_n) + rank : u / tiles_n; }
    __device__ __forceinline__ u32 col_tile(u32 u) const { return u % tiles_n; }
};

// The wgmmas of k16 step ks of a stage for consumer `c` (0, 1): its rows WG_ROWS c.. of the
// K-major A tile in m64 blocks (the step's 16 columns 32 bytes further into each 128-byte
// swizzled row; a 64-row block 8 KiB further) times the 160 columns of B. nk: B K-major like A;
// kn: MN-major, LBO the next 32-column block (4 KiB), SBO the next 8 k-rows (512 bytes), the
// step's 16 k-rows two groups (1024 bytes) further.
template <typename T, bool KMAJOR, int BM, bool PP>
__device__ __forceinline__ void lt_mma_step(float (&acc)[LtShape<BM, PP>::HB][LT_BN / 2], const unsigned char* stage, int c, int ks) {
    using S = LtShape<BM, PP>;
    const unsigned char* b_tile = stage + S::A_BYTES;
    const u64 b_desc = KMAJOR ? wgmma_desc(b_tile + ks * 1024, 4096, 512, WGMMA_SWIZZLE_64B) : wgmma_desc(b_tile + ks * 32, 16, 1024, WGMMA_SWIZZLE_128B);
#pragma unroll
    for (int h = 0; h < S::HB; ++h) {
        const u64 a_desc = wgmma_desc(stage + ((PP ? 0 : c * S::WG_ROWS) + h * 64) * 128 + ks * 32, 16, 1024, WGMMA_SWIZZLE_128B);
        wgmma_ss<T, LT_BN, KMAJOR>(acc[h], a_desc, b_desc, true);
    }
}

// Transposes a 4 x 4 block of words across the lanes of a quad (t = lane & 3): lane t holds
// v[i] = M[t][i] before and M[i][t] after. Two butterfly steps (lanes t ^ 2, then t ^ 1), each
// exchanging two words; every lane of the warp must call it (full-mask shuffles).
__device__ __forceinline__ void lt_quad_transpose(u32 (&v)[4], int t) {
    const bool b1 = (t & 2) != 0, b0 = (t & 1) != 0;
    u32 s0 = b1 ? v[0] : v[2], s1 = b1 ? v[1] : v[3];
    s0 = __shfl_xor_sync(0xffffffffu, s0, 2);
    s1 = __shfl_xor_sync(0xffffffffu, s1, 2);
    if (b1) {
        v[0] = s0;
        v[1] = s1;
    } else {
        v[2] = s0;
        v[3] = s1;
    }
    s0 = b0 ? v[0] : v[1];
    s1 = b0 ? v[2] : v[3];
    s0 = __shfl_xor_sync(0xffffffffu, s0, 1);
    s1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    if (b0) {
        v[0] = s0;
        v[2] = s1;
    } else {
        v[1] = s0;
        v[3] = s1;
    }
}

// The producer thread: every k-tile of the block's output tiles, in the consumers' order. MC: the
// stage's empty barrier counts both CTAs' consumers (the peer's producer writes this stage too,
// and this producer the peer's), and B comes as this CTA's half of the tile, multicast to both
// CTAs at the same offset: nk the 80 rows (n) 80 r.. of the [160 n][64 k] tile (a 10 KiB box at
// byte 10240 r, a multiple of the 1 KiB swizzle atom); kn the k-rows 32 r.. of each of the five
// [64 k][32 n] blocks (2 KiB at byte 2048 r of each, a multiple of the 512-byte 64B-swizzle atom).
// Each CTA's full barrier still expects the whole stage: its A plus both halves of B.
template <bool KMAJOR, int BM, bool PP, bool MC>
__device__ __forceinline__ void lt_produce(unsigned char* smem, u64* full, u64* empty, const TensorMap* a1, const TensorMap* b1, const TensorMap* a2, const TensorMap* b2, const LtSched<MC>& sc,
                                           int kt1, int per_tile) {
    using S = LtShape<BM, PP, MC>;
    int stage = 0;
    u32 phase = 0;
    for (u32 u = sc.first; u < sc.units; u += sc.step) {
        const int m0 = (int)(sc.row_tile(u) * BM), n0 = (int)(sc.col_tile(u) * LT_BN);
        for (int kt = 0; kt < per_tile; ++kt) {
            // Free once the consumers released the k-tile STAGES before (the first pass: parity 1
            // of a fresh barrier counts as completed).
            mbarrier_wait(&empty[stage], phase ^ 1);
            const bool lora = kt >= kt1;
            const int k0 = (lora ? kt - kt1 : kt) * LT_BK;
            unsigned char* st = smem + stage * S::STAGE_BYTES;
            mbarrier_arrive_expect_tx(&full[stage], S::STAGE_BYTES);
            tma_load_2d(st, lora ? a2 : a1, k0, m0, &full[stage]);
            if (MC) {
                const int r = (int)sc.rank;
                if (KMAJOR) {
#pragma unroll
                    for (int j = 0; j < LT_BN / 32; ++j) tma_load_2d_multicast(st + S::A_BYTES + j * 4096 + r * 2048, lora ? b2 : b1, n0 + 32 * j, k0 + 32 * r, &full[stage], 3);
                } else {
                    tma_load_2d_multicast(st + S::A_BYTES + r * (LT_B_BYTES / 2), lora ? b2 : b1, k0, n0 + (LT_BN / 2) * r, &full[stage], 3);
                }
            } else if (KMAJOR) {
#pragma unroll
                for (int j = 0; j < LT_BN / 32; ++j) tma_load_2d(st + S::A_BYTES + j * 4096, lora ? b2 : b1, n0 + 32 * j, k0, &full[stage]);
            } else {
                tma_load_2d(st + S::A_BYTES, lora ? b2 : b1, k0, n0, &full[stage]);
            }
            if (++stage == S::STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
    }
}

// A consumer warp frees a stage: lane 0 arrives on the empty barrier, or (MC) lanes 0 and 1 on
// those of cluster CTAs 0 and 1 (a remote arrival for the peer's).
template <bool MC> __device__ __forceinline__ void lt_release(u64* bar, int lane) {
    if (MC) {
        if (lane < 2) mbarrier_arrive_cluster(bar, (u32)lane);
    } else if (lane == 0) {
        mbarrier_arrive(bar);
    }
}

// Consumer warpgroup c (0, 1): rows WG_ROWS c.. of every output tile of the block, or (PP) every
// row of the block's tiles c, c + 2, ... The block's k-tiles are numbered q = local tile x
// per_tile + kt in the ring (the producer's order): stage q % STAGES, parity (q / STAGES) & 1.
// MC: each consumer warp frees a stage in both CTAs (lane r arrives on CTA r's empty barrier).
template <typename T, bool KMAJOR, int BM, bool PP, bool MC>
__device__ __forceinline__ void lt_consume(unsigned char* smem, u64* full, u64* empty, const LoraGemmArgs& p, const LtSched<MC>& sc, int kt1, int per_tile, int c, int tid) {
    using S = LtShape<BM, PP, MC>;
    const int lane = tid & 31, warp = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    const T* bias = reinterpret_cast<const T*>(p.bias);
    u16* out = reinterpret_cast<u16*>(p.c);
    const u32 first = PP ? (u32)c : 0u;  // the warpgroup's first local tile
    for (u32 local = first, u = sc.first + first * sc.step; u < sc.units; local += S::TILE_STEP, u += S::TILE_STEP * sc.step) {
        float acc[S::HB][LT_BN / 2];
#pragma unroll
        for (int h = 0; h < S::HB; ++h)
#pragma unroll
            for (int i = 0; i < LT_BN / 2; ++i) acc[h][i] = 0.0f;
        int held = -1;  // the stage whose wgmma group may still be reading it
        const int q0 = (int)local * per_tile;
        int stage = q0 % S::STAGES;
        u32 phase = (u32)(q0 / S::STAGES) & 1u;
        // Ping-pong: the mainloops take turns (named barrier 1 + c: warpgroup c's turn). Besides
        // giving the tensor cores to one warpgroup while the other stores, this keeps the parity
        // waits sound: a warpgroup waits for the phases of its k-tiles only after the other has
        // waited for every earlier k-tile, so no full barrier is more than one phase behind the
        // parity asked for (a wait one phase further ahead would pass at once).
        if (PP && local > 0) named_barrier_sync(1 + c, 256);
        for (int kt = 0; kt < per_tile; ++kt) {
            mbarrier_wait(&full[stage], phase);
            const unsigned char* st = smem + stage * S::STAGE_BYTES;
            // 16-wide k-steps that hold data (the last tile of an operand may be partly zero fill).
            const bool lora = kt >= kt1;
            const u32 left = (lora ? p.k2 : p.k1) - (u32)(lora ? kt - kt1 : kt) * LT_BK;
            wgmma_fence();
            if (left >= LT_BK) {
#pragma unroll
                for (int ks = 0; ks < LT_BK / 16; ++ks) lt_mma_step<T, KMAJOR, BM, PP>(acc, st, c, ks);
            } else {
                const int steps = (int)((left + 15) / 16);
#pragma unroll
                for (int ks = 0; ks < LT_BK / 16; ++ks)
                    if (ks < steps) lt_mma_step<T, KMAJOR, BM, PP>(acc, st, c, ks);
            }
            wgmma_commit();
            wgmma_wait<1>();  // the previous k-tile's group has retired: its stage can be refilled
            if (held >= 0) lt_release<MC>(&empty[held], lane);
            held = stage;
            if (++stage == S::STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
        // The other warpgroup's turn, if the block has a next tile (its local tile + 1), while
        // this warpgroup's last wgmma group still runs.
        if (PP && sc.first + (local + 1) * sc.step < sc.units) named_barrier_arrive(2 - c, 256);
        wgmma_wait<0>();
#pragma unroll
        for (int h = 0; h < S::HB; ++h) wgmma_fence_operands(acc[h]);
        if (held >= 0) lt_release<MC>(&empty[held], lane);

        // Epilogue from registers (the stages keep filling with the next tile's k-tiles). The
        // bias first, all its loads before any store (stores to C could alias it, so the compiler
        // would not hoist the loads above them: one L2 round trip a column pair otherwise).
        const u32 col0 = sc.col_tile(u) * LT_BN + 2 * t;
        if (bias != nullptr) {
#pragma unroll
            for (int j = 0; j < LT_BN / 8; ++j) {
                const u32 col = col0 + j * 8;
                if (col < p.n) {
                    const float b0 = to_f32(bias[col]), b1 = to_f32(bias[col + 1]);
#pragma unroll
                    for (int h = 0; h < S::HB; ++h) {
                        acc[h][4 * j] += b0;
                        acc[h][4 * j + 1] += b1;
                        acc[h][4 * j + 2] += b0;
                        acc[h][4 * j + 3] += b1;
                    }
                }
            }
        }
        // 16-byte stores: the quad's 4 x 4 words of four 8-column blocks transposed (lt_quad_transpose),
        // so that lane t writes block 4 q + t of its rows whole (a warp store: 8 rows of 64
        // contiguous bytes, where 4-byte stores wrote 8 rows of 16 bytes: a quarter of the store
        // instructions for 16 shuffles and selects per 4 words).
#pragma unroll
        for (int h = 0; h < S::HB; ++h) {
            const u32 row = sc.row_tile(u) * BM + (PP ? 0 : c * S::WG_ROWS) + h * 64 + warp * 16 + g;
#pragma unroll
            for (int q = 0; q < LT_BN / 32; ++q) {
                Pack<u32, 4> lo, hi;  // rows row, row + 8
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = 4 * q + i;
                    lo.v[i] = pack2<T>(acc[h][4 * j], acc[h][4 * j + 1]);
                    hi.v[i] = pack2<T>(acc[h][4 * j + 2], acc[h][4 * j + 3]);
                }
                lt_quad_transpose(lo.v, t);
                lt_quad_transpose(hi.v, t);
                const u32 col = sc.col_tile(u) * LT_BN + (4 * q + t) * 8;
                if (col < p.n) {  // N is a multiple of 8: the 8 columns are in range together
                    if (row < p.m) *reinterpret_cast<Pack<u32, 4>*>(out + (u64)row * p.ldc + col) = lo;
                    if (row + 8 < p.m) *reinterpret_cast<Pack<u32, 4>*>(out + (u64)(row + 8) * p.ldc + col) = hi;
                }
            }
        }
    }
}

template <typename T, bool KMAJOR, int BM, bool PP, bool MC>
__device__ __forceinline__ void lora_gemm_tma(const LoraGemmArgs& p, const TensorMap* a1, const TensorMap* b1, const TensorMap* a2, const TensorMap* b2) {
    using S = LtShape<BM, PP, MC>;
    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    // The swizzle patterns are functions of the absolute shared address: align to 1024 bytes (the
    // launch adds 1 KiB of slack); the mbarriers follow the stages.
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    u64* full = reinterpret_cast<u64*>(smem + S::STAGES * S::STAGE_BYTES);
    u64* empty = full + S::STAGES;
    // The warpgroup as a shuffled value: ptxas then knows it is warp-uniform (CUTLASS's
    // canonical_warp_group_idx); the ping-pong consumers' tile loops start at it, and a loop
    // bound it takes for thread-dependent makes it serialize the wgmmas (C7519).
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    const LtSched<MC> sc(p.m, p.n, BM);
    const int kt1 = (int)((p.k1 + LT_BK - 1) / LT_BK);
    const int per_tile = kt1 + (int)((p.k2 + LT_BK - 1) / LT_BK);  // k-tiles of one output tile

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < S::STAGES; ++s) {
            mbarrier_init(&full[s], 1);  // the producer's arrive.expect_tx (+ the copies' bytes)
            mbarrier_init(&empty[s], S::CONSUMER_WARPS);
        }
        fence_mbarrier_init();
    }
    // MC: the peer arrives on these barriers and multicasts onto them: the inits must be visible
    // cluster-wide (fence_mbarrier_init is release at cluster scope) before it starts.
    if (MC) {
        cluster_arrive();
        cluster_wait();
    } else {
        __syncthreads();
    }

    if (wg == 0) {
        setmaxnreg_dec<40>();
        if (tid == 0) {
            tma_prefetch_descriptor(a1);
            tma_prefetch_descriptor(b1);
            tma_prefetch_descriptor(a2);
            tma_prefetch_descriptor(b2);
            lt_produce<KMAJOR, BM, PP, MC>(smem, full, empty, a1, b1, a2, b2, sc, kt1, per_tile);
        }
    } else {
        setmaxnreg_inc<232>();
        lt_consume<T, KMAJOR, BM, PP, MC>(smem, full, empty, p, sc, kt1, per_tile, wg - 1, tid & 127);
    }
    // MC: stay until the peer is done: its consumers' last arrivals on this CTA's empty barriers
    // and its multicasts into this CTA's stages (all consumed here, but the peer may still arrive)
    // need this CTA's shared memory. Every thread (the producer warpgroup's idle ones too, which
    // therefore do not exit early) meets the peer's at the cluster barrier.
    if (MC) {
        __syncwarp();
        cluster_arrive();
        cluster_wait();
    }
}

#endif  // LA_WGMMA

// One block an SM. Without wgmma (sm_80) the kernels are empty.
#if LA_WGMMA
#define LT_BODY(T, KMAJOR, BM, PP, MC) lora_gemm_tma<T, KMAJOR, BM, PP, MC>(p, &a1, &b1, &a2, &b2);
#else
#define LT_BODY(T, KMAJOR, BM, PP, MC)
#endif
#define LT_INSTANCE(NAME, T, KMAJOR, BM, PP, MC)                                                                                                                                          \
    extern "C" __global__ void __launch_bounds__(LT_THREADS, 1)                                                                                                                   \
        NAME(const LoraGemmArgs p, const __grid_constant__ TensorMap a1, const __grid_constant__ TensorMap b1, const __grid_constant__ TensorMap a2, const __grid_constant__ TensorMap b2) { \
        LT_BODY(T, KMAJOR, BM, PP, MC)                                                                                                                                                   \
    }

LT_INSTANCE(lora_gemm_tma_nk_bf16, bf16, false, 128, false, false)
LT_INSTANCE(lora_gemm_tma_nk_f16, f16, false, 128, false, false)
LT_INSTANCE(lora_gemm_tma_kn_bf16, bf16, true, 128, false, false)
LT_INSTANCE(lora_gemm_tma_kn_f16, f16, true, 128, false, false)
LT_INSTANCE(lora_gemm_tma256_nk_bf16, bf16, false, 256, false, false)
LT_INSTANCE(lora_gemm_tma256_nk_f16, f16, false, 256, false, false)
LT_INSTANCE(lora_gemm_tma256_kn_bf16, bf16, true, 256, false, false)
LT_INSTANCE(lora_gemm_tma256_kn_f16, f16, true, 256, false, false)
LT_INSTANCE(lora_gemm_tma_pp_nk_bf16, bf16, false, 128, true, false)
LT_INSTANCE(lora_gemm_tma_pp_nk_f16, f16, false, 128, true, false)
LT_INSTANCE(lora_gemm_tma_pp_kn_bf16, bf16, true, 128, true, false)
LT_INSTANCE(lora_gemm_tma_pp_kn_f16, f16, true, 128, true, false)
LT_INSTANCE(lora_gemm_tma_mc_nk_bf16, bf16, false, 128, false, true)
LT_INSTANCE(lora_gemm_tma_mc_nk_f16, f16, false, 128, false, true)
LT_INSTANCE(lora_gemm_tma_mc_kn_bf16, bf16, true, 128, false, true)
LT_INSTANCE(lora_gemm_tma_mc_kn_f16, f16, true, 128, false, true)
