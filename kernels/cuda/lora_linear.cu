// Fused LoRA linear: one tensor-core GEMM over concatenated operands,
//     C[M, N] = [A1 | A2] · [B1 ; B2] + bias,
// i.e. C = A1 · B1 + A2 · B2 (+ bias[n] on every row), with one K loop that first runs over the
// K1 columns of the base operands and then continues over the K2 columns of the LoRA operands
// into the same f32 accumulators. The LoRA term is therefore added inside the one pass over each
// output tile; y is written once.
//
// The engine uses it for both directions of y = x W^T + bias + s (x A^T) B^T (x [M, K], W [N, K],
// A [r, K], B [N, r]); the skinny t = s x A^T and u = dy B come from cuBLASLt:
//   forward  y  = [x | t]  · [W | B]^T + bias   B operands "n-major": W and B are [n][k] rows
//   backward dx = [dy | s u] · [W ; A]          B operands "k-major": W [N, K] read as [k=N][n=K],
//                                               A [r, K] as [k=r][n=K]
// so the B side comes in both layouts (kernel name suffix nk / kn). A1, A2 and C are row-major.
//
// Tiling: a 128 x 128 output tile per block of 256 threads (8 warps as 2 (m) x 4 (n), a warp owns
// 64 x 32 = 4 x 4 mma.m16n8k16 tiles, 64 f32 accumulators a thread), k-tiles of 32, a 4-stage
// cp.async pipeline (16 KiB a stage: 64 KiB of dynamic shared memory, the host opts in),
// ldmatrix (.trans for k-major B) and mma_16816 from mma.cuh only. Shared tiles are XOR-swizzled
// in 16-byte chunks so that ldmatrix and cp.async are free of bank conflicts. The epilogue adds
// the bias in f32, rounds to T, stages the tile in shared memory and writes 16-byte row chunks.
//
// Edges: rows beyond M, columns beyond N and k beyond K1 / K2 are zero-filled loads (cp.async
// with src-size 0) or skipped stores, so any M works; the host requires N, K1 and the leading
// dimensions of A1, B1, C to be multiples of 8 elements and the pointers 16-byte aligned (16-byte
// row chunks). The LoRA operands may have any rank r: when A2's (or n-major B2's) rows are not
// 16-byte aligned (r not a multiple of 8) their tile is loaded by 8-byte cp.async halves when the
// rows are 8-byte aligned (r a multiple of 4), else element by element (flags a2_vec / b2_vec,
// LORA_ROWS_* in lora_linear.cuh); that is one or two k-tiles at the end of the loop. The zero-filled part of the last
// k-tile of each operand costs at most one 16-wide k-step: k-steps beyond the data are skipped.
#include "common.cuh"
#include "lora_linear.cuh"
#include "mma.cuh"

#define LG_BM 128
#define LG_BN 128
#define LG_BK 32
#define LG_STAGES 4
#define LG_THREADS 256
#define LG_TILE_ELEMS (LG_BM * LG_BK)  // = LG_BN * LG_BK: one operand tile of a stage
#define LG_C_LD (LG_BN + 8)            // epilogue staging row (elements): 16-byte padded

// Element offset of 16-byte chunk `ch` (0..3) of row `row` in a [rows][32] tile (64-byte rows).
// The chunk is XORed with bits 1..2 of the row: the 8 rows one ldmatrix phase reads then cover all
// 8 chunk positions of a 128-byte bank line.
__device__ __forceinline__ int swz_k32(int row, int ch) { return row * LG_BK + ((ch ^ ((row >> 1) & 3)) << 3); }
// The same for a [32][128] tile (256-byte rows, 16 chunks): the low 3 chunk bits XOR the row.
__device__ __forceinline__ int swz_n128(int row, int ch) { return row * LG_BN + ((ch ^ (row & 7)) << 3); }

// One [128][32] tile of a row-major operand (A1/A2 rows m, or n-major B rows n): rows
// row0.. of `src` (ld elements apart), columns col0..col0+31; rows >= rows_valid and columns
// >= cols_valid read as zero. vec: LORA_ROWS_* (lora_linear.cuh): cp.async of 16 bytes or of two
// 8-byte halves, or synchronous element loads (visible to the consumer after the main loop's
// __syncthreads, like the cp.async data).
__device__ __forceinline__ void load_rows_k32(u16* dst, const u16* src, u32 ld, u32 rows_valid, u32 cols_valid, u32 row0, u32 col0, u32 vec, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int id = tid + i * LG_THREADS;
        const int row = id >> 2, ch = id & 3;
        lora_load_chunk(dst + swz_k32(row, ch), src, ld, row0 + row, col0 + ch * 8, rows_valid, cols_valid, vec);
    }
}

// One [32][128] tile of a k-major B operand ([k][n] rows, 16-byte aligned, n_valid a multiple
// of 8): rows k0..k0+31, columns n0..n0+127; k >= k_valid or n >= n_valid read as zero.
__device__ __forceinline__ void load_rows_n128(u16* dst, const u16* src, u32 ld, u32 k_valid, u32 n_valid, u32 k0, u32 n0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int id = tid + i * LG_THREADS;
        const int row = id >> 4, ch = id & 15;
        const u32 gk = k0 + row, gn = n0 + ch * 8;
        const bool full = gk < k_valid && gn < n_valid;
        cp_async_16(dst + swz_n128(row, ch), full ? src + (u64)gk * ld + gn : src, full);
    }
}

// Issues the loads of k-tile `kt` (base tiles 0..kt1-1, then the LoRA tiles) into one stage.
template <bool KMAJOR>
__device__ __forceinline__ void load_stage(u16* as, u16* bs, const LoraGemmArgs& p, int kt, int kt1, u32 m0, u32 n0, int tid) {
    const bool lora = kt >= kt1;
    const u16* a = reinterpret_cast<const u16*>(lora ? p.a2 : p.a1);
    const u16* b = reinterpret_cast<const u16*>(lora ? p.b2 : p.b1);
    const u32 kx = lora ? p.k2 : p.k1;
    const u32 k0 = (u32)(lora ? kt - kt1 : kt) * LG_BK;
    load_rows_k32(as, a, lora ? p.lda2 : p.lda1, p.m, kx, m0, k0, lora ? p.a2_vec : LORA_ROWS_16, tid);
    if (KMAJOR) {
        load_rows_n128(bs, b, lora ? p.ldb2 : p.ldb1, kx, p.n, k0, n0, tid);
    } else {
        load_rows_k32(bs, b, lora ? p.ldb2 : p.ldb1, p.n, kx, n0, k0, lora ? p.b2_vec : LORA_ROWS_16, tid);
    }
}

template <typename T, bool KMAJOR>
__device__ __forceinline__ void lora_gemm(const LoraGemmArgs& p) {
    LA_DYNAMIC_SHARED(u16, smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp & 1, warp_n = warp >> 1;
    const u32 m0 = blockIdx.y * LG_BM, n0 = blockIdx.x * LG_BN;
    const int kt1 = (int)((p.k1 + LG_BK - 1) / LG_BK);
    const int total = kt1 + (int)((p.k2 + LG_BK - 1) / LG_BK);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Stage s: A tile at smem + 2 s TILE, B tile right after it.
#pragma unroll
    for (int s = 0; s < LG_STAGES - 1; ++s) {
        if (s < total) load_stage<KMAJOR>(smem + 2 * s * LG_TILE_ELEMS, smem + (2 * s + 1) * LG_TILE_ELEMS, p, s, kt1, m0, n0, tid);
        cp_async_commit();
    }

    for (int kt = 0; kt < total; ++kt) {
        cp_async_wait<LG_STAGES - 2>();
        __syncthreads();  // tile kt is in shared memory, and every warp is done with tile kt - 1
        {
            const int next = kt + LG_STAGES - 1;
            const int s = next % LG_STAGES;
            if (next < total) load_stage<KMAJOR>(smem + 2 * s * LG_TILE_ELEMS, smem + (2 * s + 1) * LG_TILE_ELEMS, p, next, kt1, m0, n0, tid);
            cp_async_commit();  // possibly empty: keeps one group per iteration for the wait above
        }
        const int s = kt % LG_STAGES;
        const u16* as = smem + 2 * s * LG_TILE_ELEMS;
        const u16* bs = as + LG_TILE_ELEMS;
        // 16-wide k-steps that hold data (the last tile of an operand may be partly zero fill).
        const bool lora = kt >= kt1;
        const u32 left = (lora ? p.k2 : p.k1) - (u32)(lora ? kt - kt1 : kt) * LG_BK;
        const int steps = left > 16 ? 2 : 1;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            if (ks >= steps) break;
            u32 af[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) ldmatrix_x4(af[mi], as + swz_k32(warp_m * 64 + mi * 16 + (lane & 15), ks * 2 + (lane >> 4)));
            u32 bf[4][2];
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                u32 r[4];
                if (KMAJOR) {
                    ldmatrix_x4_trans(r, bs + swz_n128(ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, (warp_n * 32 + nj * 16) / 8 + (lane >> 4)));
                } else {
                    ldmatrix_x4(r, bs + swz_k32(warp_n * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8, ks * 2 + ((lane >> 3) & 1)));
                }
                bf[2 * nj][0] = r[0];
                bf[2 * nj][1] = r[1];
                bf[2 * nj + 1][0] = r[2];
                bf[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
        }
    }

    // Epilogue: the pipeline's shared memory becomes a [128][136] T staging tile.
    cp_async_wait<0>();
    __syncthreads();
    const int g = lane >> 2, t = lane & 3;
    const T* bias = reinterpret_cast<const T*>(p.bias);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
        const int col = warp_n * 32 + ni * 8 + 2 * t;
        float b0 = 0.0f, b1 = 0.0f;
        if (bias != nullptr && n0 + col < p.n) {  // N is a multiple of 8: col + 1 is in range too
            b0 = to_f32(bias[n0 + col]);
            b1 = to_f32(bias[n0 + col + 1]);
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            const int row = warp_m * 64 + mi * 16 + g;
            *reinterpret_cast<u32*>(smem + row * LG_C_LD + col) = pack2<T>(acc[mi][ni][0] + b0, acc[mi][ni][1] + b1);
            *reinterpret_cast<u32*>(smem + (row + 8) * LG_C_LD + col) = pack2<T>(acc[mi][ni][2] + b0, acc[mi][ni][3] + b1);
        }
    }
    __syncthreads();
    u16* c = reinterpret_cast<u16*>(p.c);
#pragma unroll
    for (int i = 0; i < (LG_BM * LG_BN / 8) / LG_THREADS; ++i) {
        const int id = tid + i * LG_THREADS;
        const int row = id >> 4, ch = id & 15;
        const u32 gm = m0 + row, gn = n0 + ch * 8;
        if (gm < p.m && gn < p.n) {
            *reinterpret_cast<Pack<u16, 8>*>(c + (u64)gm * p.ldc + gn) = *reinterpret_cast<const Pack<u16, 8>*>(smem + row * LG_C_LD + ch * 8);
        }
    }
}

// Two blocks an SM (2 x 64 KiB shared, <= 128 registers a thread).
#define LG_INSTANCE(NAME, T, KMAJOR) \
    extern "C" __global__ void __launch_bounds__(LG_THREADS, 2) NAME(const LoraGemmArgs p) { lora_gemm<T, KMAJOR>(p); }

LG_INSTANCE(lora_gemm_nk_bf16, bf16, false)
LG_INSTANCE(lora_gemm_nk_f16, f16, false)
LG_INSTANCE(lora_gemm_kn_bf16, bf16, true)
LG_INSTANCE(lora_gemm_kn_f16, f16, true)
