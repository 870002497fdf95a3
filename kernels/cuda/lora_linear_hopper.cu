// Fused LoRA linear for Hopper (sm_90a): the GEMM of lora_linear.cu over concatenated operands,
//     C[M, N] = [A1 | A2] · [B1 ; B2] + bias,
// with the same arguments (LoraGemmArgs), semantics and B layouts (nk: B rows [n][k], the
// forward y = [x | t] · [W | B]^T; kn: B rows [k][n], dx = [dy | s u] · [W ; A]), computed with
// warpgroup MMA (wgmma, mma.cuh) instead of mma.sync, which cannot reach cuBLAS on sm_90.
//
// Launch: persistent, grid (min(output tiles, SMs)) of 256 threads (2 warpgroups), one block an SM
// (216 KiB + 1 KiB of dynamic shared memory: 6 stages of 36 KiB and the slack to align them to 1024
// bytes; the host opts in). Block b computes the 128 x 160 output tiles b, b + grid, b + 2 grid, ...
// (row-major over the tiles, columns fastest, so the blocks at work share their A rows in L2) and
// runs their k-tiles as one sequence through the pipeline: the loads of the next tile start while
// the current one finishes, so only the first tile waits for memory.
//
// Tiling: a 128 x 160 output tile; warpgroup g computes rows 64g..64g+63 with
// wgmma_ss<T, 160, KMAJOR> (80 f32 accumulators a thread), k-tiles of 64. Why 160 columns: the
// issue's shapes have N = 640 and 1280 (5 and 10 x 128 but 4 and 8 x 160), and 128 x 160 tiles
// give 256 blocks for M 8192 N 640 and 128 for M 2048 N 1280, 0.97 of two and of one wave on a
// 132-SM H100 (128 x 128: 2.4 and 1.2 waves; 128 x 256: half-empty column tiles at N 640), while
// 80 accumulators stay far from the 255-register limit (128 x 256 would need 128).
// Shared tiles (every one 1024-byte aligned): A [128][64] K-major with the 128-byte swizzle (one
// 128-byte row per m, 8-row groups 1024 bytes apart); B nk [160][64] the same; B kn [64 k][160 n]
// MN-major with the 64-byte swizzle in five [64][32] blocks of 4 KiB (160 is not a multiple of the
// 128-byte swizzle's 64 columns).
// Pipeline (q: the block's k-tiles numbered across its output tiles): every thread issues cp.async
// loads; 6 stages with the load of k-tile q + 4 issued in iteration q (after its wgmmas), and one
// wgmma group (the 4 k16 steps of a k-tile) left in flight across the iteration boundary
// (wgmma_wait<1>): the stage a load refills was last read by the group of k-tile q - 2, which
// every warpgroup has waited for before the barrier of iteration q. Before the wgmmas of a stage: cp_async_wait,
// fence_proxy_async (the generic-proxy writes become visible to wgmma's async proxy),
// __syncthreads.
// Epilogue of a tile: the warpgroup's groups waited, the accumulators plus bias (f32) rounded to T
// and stored from registers (a quad of lanes writes 16 contiguous bytes of a row); no shared memory,
// so the next tile's loads already in the stages are untouched.
//
// Edges as in lora_linear.cu: rows beyond M, columns beyond N and k beyond K1 / K2 are zero-filled
// loads or skipped stores; N, K1 and the leading dimensions of A1, B1, C multiples of 8 with
// 16-byte aligned pointers; the LoRA rank r is any size (a2_vec / b2_vec: cp.async of 16 bytes for
// 16-byte aligned rows, of two 8-byte halves for 8-byte aligned rows (rank 4), else element loads). The last k-tile of each operand runs only the k16
// steps that hold data (rank 4: one wgmma step for the LoRA term).
//
// Measured (H200, 2026-11-28, GPU time only: 20 launches captured in a CUDA graph, bf16, nk, no
// bias; torch.mm = cuBLAS): 8192x640x640 r0 32.4 us vs torch.mm 12.2; 2048x1280x1280 27.9 vs 11.2;
// 8192x1280x1280 102 vs 37.6 (37%). So the gap to cuBLAS is this kernel's GPU time, not host
// overhead. Diagnostics (same shapes): no main-loop loads 23.6 / 19.1 / 60.5 us; loads without
// wgmma 26.7 / 22.3 / 81.5 us (cp.async at ~4.7 TB/s aggregate L2->SM: the load path alone is 2x
// cuBLAS's whole GEMM); no epilogue stores 27.4 / 25.5 / 92.3 us. Tile/stage variants were no
// better: 128x160 with 5 or 4 stages = 6 stages; 128x128 6-7 stages +25..60%; 128x192 5 stages
// +6%; 128x256 4 stages +30% at the small shapes, equal at the big one. What would close it: TMA
// loads (one producer warp, mbarriers) with 2-CTA cluster multicast of the shared operand, and a
// mainloop without a block barrier per k-tile (the emulator models neither TMA nor mbarrier).
// That kernel is kernels/cuda/lora_linear_tma.cu (LOOKAHEAD_VARIANT_LORA=tma / tma256: TMA loads
// by a producer warp, mbarrier full/empty rings, two consumer warpgroups; not yet multicast);
// this one stays the default until a GPU run has measured it, and runs where the TMA kernel cannot
// (LoRA ranks not a multiple of 8, misaligned LoRA operands).
#include "common.cuh"
#include "lora_linear.cuh"  // LoraGemmArgs, shared with lora_linear.cu
#include "mma.cuh"

#define LH_BM 128
#define LH_BN 160
#define LH_BK 64
#define LH_STAGES 6
#define LH_THREADS 256
#define LH_A_BYTES (LH_BM * LH_BK * 2)             // 16 KiB
#define LH_B_BYTES (LH_BN * LH_BK * 2)             // 20 KiB
#define LH_STAGE_BYTES (LH_A_BYTES + LH_B_BYTES)  // 36 KiB, a multiple of 1024

#if LA_WGMMA

// Byte offset of 16-byte chunk `ch` (0..7) of row `row` in a K-major [rows][64] 16-bit tile with
// the 128-byte swizzle (Swizzle<3,4,3>: address bits 4..6 ^= bits 7..9, row = bits 7..; the tile is
// 1024-byte aligned, so the tile offset decides the bits).
__device__ __forceinline__ u32 lh_sw128(int row, int ch) { return (u32)(row * 128 + ((ch ^ (row & 7)) << 4)); }

// Byte offset of 16-byte chunk `ch` (0..19, n = 8 ch..8 ch+7) of k-row `kr` (0..63) in the MN-major
// [64 k][160 n] tile: five [64][32] blocks of 4 KiB (n chunk of 32 = ch / 4), 64-byte k-rows, the
// 64-byte swizzle (Swizzle<2,4,3>: address bits 4..5 ^= bits 7..8).
__device__ __forceinline__ u32 lh_sw64_mn(int kr, int ch) { return (u32)((ch >> 2) * 4096 + kr * 64 + (((ch & 3) ^ ((kr >> 1) & 3)) << 4)); }

// A [ROWS][64] K-major tile of a row-major operand (A1/A2 rows m, or n-major B rows n): rows
// row0.. of `src` (ld elements apart), columns col0..col0+63; rows >= rows_valid and columns
// >= cols_valid read as zero. mode: LORA_ROWS_* (lora_linear.cuh); element loads are covered by
// the next barrier's fence like the cp.async data.
template <int ROWS>
__device__ __forceinline__ void lh_load_k64(unsigned char* dst, const u16* src, u32 ld, u32 rows_valid, u32 cols_valid, u32 row0, u32 col0, u32 vec, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * 8 / LH_THREADS; ++i) {
        const int id = tid + i * LH_THREADS;
        const int row = id >> 3, ch = id & 7;
        lora_load_chunk(dst + lh_sw128(row, ch), src, ld, row0 + row, col0 + ch * 8, rows_valid, cols_valid, vec);
    }
}

// The [64 k][160 n] MN-major tile of a k-major B operand ([k][n] rows, 16-byte aligned, n_valid a
// multiple of 8): rows k0..k0+63, columns n0..n0+159; k >= k_valid or n >= n_valid read as zero.
// Consecutive threads take consecutive 16-byte chunks of a row (320 contiguous bytes).
__device__ __forceinline__ void lh_load_kn(unsigned char* dst, const u16* src, u32 ld, u32 k_valid, u32 n_valid, u32 k0, u32 n0, int tid) {
#pragma unroll
    for (int i = 0; i < LH_BK * (LH_BN / 8) / LH_THREADS; ++i) {
        const int id = tid + i * LH_THREADS;
        const int kr = id / (LH_BN / 8), ch = id - kr * (LH_BN / 8);
        const u32 gk = k0 + kr, gn = n0 + ch * 8;
        const bool full = gk < k_valid && gn < n_valid;
        cp_async_16(dst + lh_sw64_mn(kr, ch), full ? src + (u64)gk * ld + gn : src, full);
    }
}

// Issues the loads of k-tile `kt` (base tiles 0..kt1-1, then the LoRA tiles) into one stage.
template <bool KMAJOR>
__device__ __forceinline__ void lh_load_stage(unsigned char* stage, const LoraGemmArgs& p, int kt, int kt1, u32 m0, u32 n0, int tid) {
    const bool lora = kt >= kt1;
    const u16* a = reinterpret_cast<const u16*>(lora ? p.a2 : p.a1);
    const u16* b = reinterpret_cast<const u16*>(lora ? p.b2 : p.b1);
    const u32 kx = lora ? p.k2 : p.k1;
    const u32 k0 = (u32)(lora ? kt - kt1 : kt) * LH_BK;
    lh_load_k64<LH_BM>(stage, a, lora ? p.lda2 : p.lda1, p.m, kx, m0, k0, lora ? p.a2_vec : LORA_ROWS_16, tid);
    if (KMAJOR) {
        lh_load_kn(stage + LH_A_BYTES, b, lora ? p.ldb2 : p.ldb1, kx, p.n, k0, n0, tid);
    } else {
        lh_load_k64<LH_BN>(stage + LH_A_BYTES, b, lora ? p.ldb2 : p.ldb1, p.n, kx, n0, k0, lora ? p.b2_vec : LORA_ROWS_16, tid);
    }
}

// The wgmma of k16 step ks of a stage for warpgroup `wg`: A rows 64 wg.. of the K-major tile (the
// step's 16 columns start 32 bytes further into each swizzled row) times the 160 columns of B.
// nk: B K-major like A; kn: MN-major, LBO the next 32-column block (4 KiB), SBO the next 8 k-rows
// (512 bytes), the step's 16 k-rows two groups (1024 bytes) further.
template <typename T, bool KMAJOR>
__device__ __forceinline__ void lh_mma_step(float (&acc)[LH_BN / 2], const unsigned char* stage, int wg, int ks) {
    const u64 a_desc = wgmma_desc(stage + wg * 64 * 128 + ks * 32, 16, 1024, WGMMA_SWIZZLE_128B);
    const unsigned char* b_tile = stage + LH_A_BYTES;
    const u64 b_desc = KMAJOR ? wgmma_desc(b_tile + ks * 1024, 4096, 512, WGMMA_SWIZZLE_64B) : wgmma_desc(b_tile + ks * 32, 16, 1024, WGMMA_SWIZZLE_128B);
    wgmma_ss<T, LH_BN, KMAJOR>(acc, a_desc, b_desc, true);
}

// Issues the loads of the block's k-tile q (of its output tile q / per_tile) into its stage.
template <bool KMAJOR>
__device__ __forceinline__ void lh_load_flat(unsigned char* smem, const LoraGemmArgs& p, int q, int per_tile, int kt1, u32 tiles_n, int tid) {
    const u32 tile = blockIdx.x + (u32)(q / per_tile) * gridDim.x;
    lh_load_stage<KMAJOR>(smem + (q % LH_STAGES) * LH_STAGE_BYTES, p, q % per_tile, kt1, (tile / tiles_n) * LH_BM, (tile % tiles_n) * LH_BN, tid);
}

template <typename T, bool KMAJOR>
__device__ __forceinline__ void lora_gemm_hopper(const LoraGemmArgs& p) {
    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    // The swizzle patterns are functions of the absolute shared address: align to 1024 bytes (the
    // launch adds 1 KiB of slack).
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = tid >> 7;
    const u32 tiles_n = (p.n + LH_BN - 1) / LH_BN, tiles = tiles_n * ((p.m + LH_BM - 1) / LH_BM);
    const int kt1 = (int)((p.k1 + LH_BK - 1) / LH_BK);
    const int per_tile = kt1 + (int)((p.k2 + LH_BK - 1) / LH_BK);  // k-tiles of one output tile
    const u32 my_tiles = blockIdx.x < tiles ? (tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const int total = (int)my_tiles * per_tile;  // the block's k-tiles, all its output tiles

    // Prologue: k-tiles 0..STAGES-3, one commit group each (the loop keeps STAGES - 2 loads ahead).
#pragma unroll
    for (int s = 0; s < LH_STAGES - 2; ++s) {
        if (s < total) lh_load_flat<KMAJOR>(smem, p, s, per_tile, kt1, tiles_n, tid);
        cp_async_commit();
    }

    const int g = lane >> 2, t = lane & 3;
    const T* bias = reinterpret_cast<const T*>(p.bias);
    u16* c = reinterpret_cast<u16*>(p.c);
    int q = 0;
    for (u32 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        float acc[LH_BN / 2];
#pragma unroll
        for (int i = 0; i < LH_BN / 2; ++i) acc[i] = 0.0f;

        for (int kt = 0; kt < per_tile; ++kt, ++q) {
            // Groups committed so far: STAGES - 2 + q; k-tile q is group q.
            cp_async_wait<LH_STAGES - 3>();
            fence_proxy_async();
            __syncthreads();  // k-tile q is visible to every warpgroup's wgmma; groups <= q - 2 done
            const unsigned char* stage = smem + (q % LH_STAGES) * LH_STAGE_BYTES;
            // 16-wide k-steps that hold data (the last tile of an operand may be partly zero fill).
            const bool lora = kt >= kt1;
            const u32 left = (lora ? p.k2 : p.k1) - (u32)(lora ? kt - kt1 : kt) * LH_BK;
            wgmma_fence();
            if (left >= LH_BK) {
#pragma unroll
                for (int ks = 0; ks < LH_BK / 16; ++ks) lh_mma_step<T, KMAJOR>(acc, stage, wg, ks);
            } else {
                const int steps = (int)((left + 15) / 16);
#pragma unroll
                for (int ks = 0; ks < LH_BK / 16; ++ks)
                    if (ks < steps) lh_mma_step<T, KMAJOR>(acc, stage, wg, ks);
            }
            wgmma_commit();
            // The loads after the wgmmas are issued, so that the tensor cores have groups q - 1 and q
            // queued while a warp issues them (the element loads of unaligned LoRA rows stall it).
            {
                const int next = q + LH_STAGES - 2;  // its stage held k-tile q - 2
                if (next < total) lh_load_flat<KMAJOR>(smem, p, next, per_tile, kt1, tiles_n, tid);
                cp_async_commit();  // possibly empty: keeps one group per iteration for the wait above
            }
            wgmma_wait<1>();  // the group of k-tile q - 1 is done: its stage is free after the next barrier
        }

        // Epilogue: this warpgroup's last group done, accumulators + bias to C from registers.
        wgmma_wait<0>();
        const u32 row = (tile / tiles_n) * LH_BM + wg * 64 + (warp & 3) * 16 + g;
#pragma unroll
        for (int j = 0; j < LH_BN / 8; ++j) {
            const u32 col = (tile % tiles_n) * LH_BN + j * 8 + 2 * t;
            if (col < p.n) {  // N is a multiple of 8: col + 1 is in range too
                float b0 = 0.0f, b1 = 0.0f;
                if (bias != nullptr) {
                    b0 = to_f32(bias[col]);
                    b1 = to_f32(bias[col + 1]);
                }
                if (row < p.m) *reinterpret_cast<u32*>(c + (u64)row * p.ldc + col) = pack2<T>(acc[4 * j] + b0, acc[4 * j + 1] + b1);
                if (row + 8 < p.m) *reinterpret_cast<u32*>(c + (u64)(row + 8) * p.ldc + col) = pack2<T>(acc[4 * j + 2] + b0, acc[4 * j + 3] + b1);
            }
        }
    }
    cp_async_wait<0>();  // only empty groups can be left; nothing may be in flight at exit
}

#endif  // LA_WGMMA

// One block an SM (217 KiB of shared memory). Without wgmma (sm_80) the kernels are empty.
#if LA_WGMMA
#define LH_BODY(T, KMAJOR) lora_gemm_hopper<T, KMAJOR>(p);
#else
#define LH_BODY(T, KMAJOR)
#endif
#define LH_INSTANCE(NAME, T, KMAJOR) \
    extern "C" __global__ void __launch_bounds__(LH_THREADS, 1) NAME(const LoraGemmArgs p) { LH_BODY(T, KMAJOR) }

LH_INSTANCE(lora_gemm_hopper_nk_bf16, bf16, false)
LH_INSTANCE(lora_gemm_hopper_nk_f16, f16, false)
LH_INSTANCE(lora_gemm_hopper_kn_bf16, bf16, true)
LH_INSTANCE(lora_gemm_hopper_kn_f16, f16, true)
