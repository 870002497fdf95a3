// Flash extended attention, forward (FlashAttention-2 style, sm_80+, tensor cores through mma.cuh):
// out_i = softmax_j(scale q_i . key_j) value_j over the keys/values [own (Lk) ; reference (Lr)],
// reference tokens with keep == 0 left out, plus lse_i = ln sum_j exp(scale q_i . key_j) (f32).
// Decoupled mode (flash_attention_decoupled_fwd_*, IP-Adapter's decoupled cross-attention): the own
// keys (source 1, text) and the reference slot (source 2, IP tokens, no keep mask) get two
// independent softmaxes, out = softmax(q K1^T) V1 + s2 softmax(q K2^T) V2, lse and lse2 one per
// source. Cross-attention has few keys (77 + 16) for Lq = 1024..4096 queries, so it is bound by
// reading Q and writing O: one pass instead of two flash calls and a scaled add. For the same
// reason it skips the products of 16-key groups past a tile's end (77 + 16 keys take 6 groups of
// 16 instead of the 12 that three full tiles would).
//
// Launch (engine/src/cuda/flash_attention.rs): grid (ceil(Lq / fa_rows<D>()), H, B), FA_WARPS * 32
// threads, dynamic shared memory fa_shared_bytes<D>() = 2 stages x (K + V tiles of FA_BC x D) =
// 32 KiB (D 64) / 64 KiB (D 128). Each warp owns fa_mtiles<D>() m-tiles of 16 query rows: 2 at
// D 64, 1 at D 128, so a block owns fa_rows<D>() = 128 (D 64) / 64 (D 128) rows. Every K and V
// fragment a warp reads from shared memory (ldmatrix) feeds the mma of each of its m-tiles: with 2
// m-tiles the shared-memory traffic per mma halves (one m16n8k16 would otherwise read 256 bytes, and
// an SM reads 128 bytes of shared memory a clock against about one mma a clock). D 128 keeps 1
// m-tile: twice its Q, S and O registers would not fit. The Q fragments stay in registers (loaded
// once through the stage-1 buffer, 2 x FA_BC x D elements = 128 rows of D, which the first prefetch
// then reuses). Key tiles of FA_BC = 64 rows stream through two shared-memory stages with cp.async
// (tile j + 1 loads while tile j computes); own tiles first, then reference tiles, never one
// straddling both. Per tile: S = Q K^T (mma m16n8k16, K rows by ldmatrix), online softmax in base
// 2 (row max / sum over the 4 lanes holding a row), P re-packed in registers as A fragments,
// O += P V (V by ldmatrix .trans). Rows of 16-byte chunks are XOR-swizzled (chunk ^ row % 8) so
// that the 8 rows an ldmatrix phase reads, and the chunks cp.async writes, fall in distinct banks.
// Registers per thread, per m-tile: Q D/4, O D/2, S 32 (D 64 with 2 m-tiles: ~170 live values,
// 220..249 registers after ptxas, so 2 blocks = 256 rows an SM; D 128 with 1: ~140 live values),
// no spills on sm_80/sm_90.
// The decoupled mode adds no O registers: when source 2 starts, O holds source 1's normalized
// output O1/l1 (lse written); source 2's row max and sum are known before its P V is added
// (its only tile, or a first pass over its K tiles when it has several), so P is scaled by
// s2 / l2 before the product and lands in the same O registers (2 more floats per thread and
// m-tile: the weights s2 / l2 of the thread's rows).
// Host guarantees: rows 16-byte aligned with unit stride along D (row strides multiples of 8
// elements), Lq/Lk/Lr < 2^31, grid.y = H <= 65535, grid.z = B <= 65535.
#include "flash_attention.cuh"
#include "mma.cuh"

#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FA_BC 64

template <int D> __host__ __device__ constexpr u32 fa_shared_bytes() { return 2u * 2u * FA_BC * D * 2u; }
// m-tiles (16 query rows each) per warp, and query rows per block; mirrored by `rows_per_block` in
// kernels/src/flash_attention.rs.
template <int D> __host__ __device__ constexpr int fa_mtiles() { return D <= 64 ? 2 : 1; }
template <int D> __host__ __device__ constexpr u32 fa_rows() { return FA_WARPS * 16u * fa_mtiles<D>(); }

// Offset (in elements) of 16-byte chunk `chunk` of row `row` in a swizzled tile of D-element rows.
template <int D> __device__ __forceinline__ u32 fa_swizzle(u32 row, u32 chunk) { return row * D + ((chunk ^ (row & 7u)) << 3); }

// cp.async of `rows` rows x D (zero-filled past `len`) from src (row stride `rs`) into the
// swizzled tile at dst; every thread of the block takes its share of the 16-byte chunks.
template <typename T, int D>
__device__ __forceinline__ void fa_load_tile(T* dst, const T* src, i64 rs, u32 rows, u32 len) {
    constexpr u32 CHUNKS = D / 8;
    for (u32 c = threadIdx.x; c < rows * CHUNKS; c += FA_THREADS) {
        u32 row = c / CHUNKS, chunk = c % CHUNKS;
        bool full = row < len;
        // A row past the end is not read (zero fill), but the address must still be valid.
        const T* from = full ? src + (i64)row * rs + chunk * 8 : src;
        cp_async_16(dst + fa_swizzle<D>(row, chunk), from, full);
    }
}

// MT: m-tiles of 16 query rows per warp (1 or 2; the instances use fa_mtiles<D>()). DECOUPLED: the
// decoupled mode (see the top of the file), else extended attention.
template <typename T, int D, int MT, bool DECOUPLED>
__device__ __forceinline__ void flash_attention_fwd(const FlashParams& p) {
    constexpr u32 TILE = FA_BC * D;  // elements of one K (or V) tile
    constexpr int KSTEPS = D / 16;   // k-steps of S = Q K^T
    constexpr int NT_S = FA_BC / 8;  // n-tiles of S (8 keys each)
    constexpr int NT_O = D / 8;      // n-tiles of O (8 dims each)
    constexpr u32 BR = FA_WARPS * 16 * MT;  // query rows per block
    static_assert(MT == 1 || MT == 2, "1 or 2 m-tiles per warp");
    static_assert(BR * D <= 2 * TILE, "Q is staged through the stage-1 buffer (one K and one V tile)");
    LA_DYNAMIC_SHARED(T, smem);      // stage s: K at smem + 2 s TILE, V at smem + (2 s + 1) TILE

    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 g = lane / 4, t = lane % 4;
    const u32 bi = blockIdx.z, hi = blockIdx.y, row0 = blockIdx.x * BR;
    const T* q = (const T*)p.q + bi * p.q_stride[0] + hi * p.q_stride[1];
    const T* k = (const T*)p.k + bi * p.k_stride[0] + hi * p.k_stride[1];
    const T* v = (const T*)p.v + bi * p.v_stride[0] + hi * p.v_stride[1];
    const T* kr = (const T*)p.k_ref + bi * p.k_ref_stride[0] + hi * p.k_ref_stride[1];
    const T* vr = (const T*)p.v_ref + bi * p.v_ref_stride[0] + hi * p.v_ref_stride[1];
    const u8* keep = !DECOUPLED && p.keep ? (const u8*)p.keep + bi * p.keep_batch_stride : nullptr;
    const u32 own_tiles = (p.lk + FA_BC - 1) / FA_BC;
    const u32 ref_tiles = (p.lr + FA_BC - 1) / FA_BC;
    // Decoupled mode, source 2 over several tiles: its K tiles are read twice, a first pass (stat
    // tiles) for its row max and sum, then the pass that adds its normalized P V. With one tile
    // (IP-Adapter's 4 or 16 tokens) the statistics come from that tile itself.
    const u32 stat_tiles = DECOUPLED && ref_tiles > 1 ? ref_tiles : 0;
    const u32 tiles = own_tiles + stat_tiles + ref_tiles;

    // Tile j into stage s: own keys first, then the reference, each with its own edge tile (a
    // stat tile loads K only).
    auto load_kv = [&](u32 j, u32 s) {
        T* ks = smem + 2 * s * TILE;
        if (j < own_tiles) {
            u32 start = j * FA_BC;
            fa_load_tile<T, D>(ks, k + (i64)start * p.k_stride[2], p.k_stride[2], FA_BC, p.lk - start);
            fa_load_tile<T, D>(ks + TILE, v + (i64)start * p.v_stride[2], p.v_stride[2], FA_BC, p.lk - start);
        } else {
            u32 r = j - own_tiles;
            const bool stat = DECOUPLED && r < stat_tiles;
            if (DECOUPLED && !stat) r -= stat_tiles;
            u32 start = r * FA_BC;
            fa_load_tile<T, D>(ks, kr + (i64)start * p.k_ref_stride[2], p.k_ref_stride[2], FA_BC, p.lr - start);
            if (!stat) fa_load_tile<T, D>(ks + TILE, vr + (i64)start * p.v_ref_stride[2], p.v_ref_stride[2], FA_BC, p.lr - start);
        }
    };

    // Q (BR x D) through the stage-1 buffer, then tile 0 into stage 0; Q into registers.
    T* qs = smem + 2 * TILE;
    fa_load_tile<T, D>(qs, q + (i64)row0 * p.q_stride[2], p.q_stride[2], BR, p.lq > row0 ? p.lq - row0 : 0);
    cp_async_commit();
    if (tiles > 0) load_kv(0, 0);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    // The warp's rows: m-tile mt holds block rows (warp MT + mt) 16 .. + 15.
    u32 qf[MT][KSTEPS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            // Lane l: row l % 16 of the m-tile, chunk 2 kk + l / 16 (A fragment of ldmatrix_x4).
            u32 r = (warp * MT + mt) * 16 + lane % 16;
            ldmatrix_x4(qf[mt][kk], qs + fa_swizzle<D>(r, 2 * kk + lane / 16));
        }
    }
    __syncthreads();  // every warp has its Q before stage 1 is overwritten

    float o[MT][NT_O][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT_O; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    // Running max (base-2 units) and this thread's part of the row sums, for rows g and g + 8 of
    // each m-tile.
    float m[MT][2], l[MT][2];
    // Decoupled mode: the weights s2 / l2 of source 2's probabilities, the same rows.
    float w[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = FA_NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
        w[mt][0] = w[mt][1] = 0.0f;
    }

    // Decoupled mode, between the sources: O <- O / l (source 1's output, 0 for a row with no
    // key), its lse written, max and sum reset for source 2.
    auto finish_source_1 = [&]() {
        float* lse1 = (float*)p.lse + ((u64)bi * p.heads + hi) * p.lq;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float sum = l[mt][h];
                sum = fa_quad_sum(sum);
                const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
                for (int n = 0; n < NT_O; ++n) {
                    o[mt][n][2 * h] *= inv;
                    o[mt][n][2 * h + 1] *= inv;
                }
                const u32 row = row0 + (warp * MT + mt) * 16 + g + 8 * h;
                if (row < p.lq && t == 0) lse1[row] = sum > 0.0f ? (m[mt][h] + log2f(sum)) * 0.69314718055994531f : FA_NEG_INF;
                m[mt][h] = FA_NEG_INF;
                l[mt][h] = 0.0f;
            }
        }
    };

    // Online softmax per row (m-tile mt; h = 0: row g, h = 1: row g + 8): new max over the 4
    // lanes of the row, the old sum rescaled, s <- p = exp2(s - max); corr[mt][h] = exp2(old max -
    // new max), the factor the caller applies to its output so far.
    auto online_softmax = [&](float (&s)[MT][NT_S][4], float (&corr)[MT][2]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = m[mt][h];
#pragma unroll
                for (int n = 0; n < NT_S; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]));
                mx = fa_quad_max(mx);
                // A row with no key so far keeps max -inf; subtract 0 instead so that exp2 gives
                // 0, not NaN.
                float base = mx == FA_NEG_INF ? 0.0f : mx;
                corr[mt][h] = exp2f(m[mt][h] - base);
                m[mt][h] = mx;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < NT_S; ++n) {
                    s[mt][n][2 * h] = exp2f(s[mt][n][2 * h] - base);
                    s[mt][n][2 * h + 1] = exp2f(s[mt][n][2 * h + 1] - base);
                    sum += s[mt][n][2 * h] + s[mt][n][2 * h + 1];
                }
                l[mt][h] = l[mt][h] * corr[mt][h] + sum;
            }
        }
    };

    // O += P V over the tile's values vs: the C fragments of S n-tiles 2kk and 2kk + 1 are the A
    // fragment of k-step kk. Each V fragment is read once for all the warp's m-tiles. Decoupled
    // mode: k-steps past the tile's `len` keys (P = 0) skipped.
    auto accumulate_pv = [&](float (&s)[MT][NT_S][4], const T* vs, u32 len) {
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; ++kk) {
            if (DECOUPLED && kk * 16 >= len) continue;
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < NT_O; n += 2) {
                // .trans matrices (keys 16kk.., dims n8..), (16kk+8.., n8..), (16kk.., n8+8..),
                // (16kk+8.., n8+8..): B fragments of output n-tiles n and n + 1.
                u32 r = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
                u32 vb[4];
                ldmatrix_x4_trans(vb, vs + fa_swizzle<D>(r, n + lane / 16));
                const u32 b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(o[mt][n], pa[mt], b0);
                    mma_16816<T>(o[mt][n + 1], pa[mt], b1);
                }
            }
        }
    };

    for (u32 j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) load_kv(j + 1, (j + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();  // tile j has landed (only tile j + 1 may still be in flight)
        __syncthreads();
        const T* ks = smem + 2 * (j & 1) * TILE;
        const T* vs = ks + TILE;
        if (DECOUPLED && j == own_tiles) finish_source_1();

        // The tile's source, first key and length.
        const bool reference = j >= own_tiles;
        u32 start = reference ? (j - own_tiles) * FA_BC : j * FA_BC;
        // Decoupled mode: a stat tile of source 2, or the index of its accumulation tile.
        bool stat = false;
        u32 acc_tile = 0;
        if (DECOUPLED && reference) {
            stat = j - own_tiles < stat_tiles;
            acc_tile = j - own_tiles - stat_tiles;
            if (!stat) start = acc_tile * FA_BC;
        }
        const u32 len = reference ? p.lr - start : p.lk - start;

        // S = Q K^T for this warp's 16 MT rows and the tile's FA_BC keys.
        float s[MT][NT_S][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT_S; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
            for (int n = 0; n < NT_S; n += 2) {
                // Decoupled mode: 16 keys past the tile's end are skipped (their scores stay 0,
                // masked below). Cross-attention's sources are short (the text's edge tile holds
                // 13 keys, IP-Adapter's 16): a quarter of the products there.
                if (DECOUPLED && n * 8 >= len) continue;
                // Matrices (keys n8.., dims 16kk..), (n8.., 16kk+8..), (n8+8.., 16kk..),
                // (n8+8.., 16kk+8..): B fragments of n-tiles n and n + 1, for every m-tile.
                u32 r = n * 8 + lane % 8 + (lane / 16) * 8;
                u32 kb[4];
                ldmatrix_x4(kb, ks + fa_swizzle<D>(r, 2 * kk + (lane / 8) % 2));
                const u32 b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(s[mt][n], qf[mt][kk], b0);
                    mma_16816<T>(s[mt][n + 1], qf[mt][kk], b1);
                }
            }
        }

        // Scale to base 2; keys past the tile's length, and dropped reference tokens, are -inf.
        const bool check = len < FA_BC || (reference && keep != nullptr);
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // The column (key) is the same in every m-tile.
                bool dropped = false;
                if (check) {
                    u32 col = n * 8 + 2 * t + (e & 1);
                    dropped = col >= len || (reference && keep != nullptr && keep[start + col] == 0);
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) s[mt][n][e] = dropped ? FA_NEG_INF : s[mt][n][e] * p.scale_log2;
            }
        }

        if (!DECOUPLED || !reference) {
            float corr[MT][2];
            online_softmax(s, corr);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int n = 0; n < NT_O; ++n) {
                    o[mt][n][0] *= corr[mt][0];
                    o[mt][n][1] *= corr[mt][0];
                    o[mt][n][2] *= corr[mt][1];
                    o[mt][n][3] *= corr[mt][1];
                }
            }
            accumulate_pv(s, vs, len);
        } else {
            // Source 2 of the decoupled mode. O holds source 1's finished output: never rescaled.
            if (stat || stat_tiles == 0) {
                float corr[MT][2];  // applies to the sum only
                online_softmax(s, corr);
            }
            if (!stat) {
                // Source 2's max and sum are final: P = s2 exp2(s - max) / sum goes straight into O.
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (acc_tile == 0) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            float sum = l[mt][h];
                            sum = fa_quad_sum(sum);
                            w[mt][h] = sum > 0.0f ? p.decoupled_scale / sum : 0.0f;
                        }
                    }
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float base = m[mt][h] == FA_NEG_INF ? 0.0f : m[mt][h];
#pragma unroll
                        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
                            for (int e = 2 * h; e < 2 * h + 2; ++e) {
                                // One tile: s already holds exp2(s - max) from the statistics above.
                                float x = stat_tiles == 0 ? s[mt][n][e] : exp2f(s[mt][n][e] - base);
                                s[mt][n][e] = x * w[mt][h];
                            }
                        }
                    }
                }
                accumulate_pv(s, vs, len);
            }
        }
        __syncthreads();  // every warp is done with stage j & 1 before tile j + 2 overwrites it
    }
    cp_async_wait<0>();
    // Decoupled mode with no source-2 key: source 1 is finished here (lse2 is then -inf).
    if (DECOUPLED && ref_tiles == 0) finish_source_1();

    // Full row sums, then out = O / l (0 for a row with no key) and lse = ln 2 (m + log2 l).
    // Decoupled mode: O is already O1 / l1 + s2 O2 / l2, and the lse is source 2's.
    T* out = (T*)p.out + bi * p.out_stride[0] + hi * p.out_stride[1];
    float* lse = (float*)(DECOUPLED ? p.lse2 : p.lse) + ((u64)bi * p.heads + hi) * p.lq;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[mt][h];
            sum = fa_quad_sum(sum);
            const u32 row = row0 + (warp * MT + mt) * 16 + g + 8 * h;
            const float inv = DECOUPLED ? 1.0f : sum > 0.0f ? 1.0f / sum : 0.0f;
            if (row < p.lq) {
                T* orow = out + (i64)row * p.out_stride[2];
#pragma unroll
                for (int n = 0; n < NT_O; ++n) *(u32*)(orow + n * 8 + 2 * t) = pack2<T>(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
                if (t == 0) lse[row] = sum > 0.0f ? (m[mt][h] + log2f(sum)) * 0.69314718055994531f : FA_NEG_INF;
            }
        }
    }
}

#define FA_INSTANCE(TN, T, D)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_fwd_##TN##_d##D(const FlashParams p) {           \
        flash_attention_fwd<T, D, fa_mtiles<D>(), false>(p);                                                                  \
    }                                                                                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_decoupled_fwd_##TN##_d##D(const FlashParams p) { \
        flash_attention_fwd<T, D, fa_mtiles<D>(), true>(p);                                                                   \
    }
FA_INSTANCE(bf16, bf16, 64)
FA_INSTANCE(bf16, bf16, 128)
FA_INSTANCE(f16, f16, 64)
FA_INSTANCE(f16, f16, 128)
