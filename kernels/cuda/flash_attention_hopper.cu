// Flash extended attention, forward, for Hopper (sm_90a): the math, parameters and outputs of
// flash_attention_fwd_* (kernels/cuda/flash_attention.cu: keys/values [own (Lk) ; reference (Lr)]
// read from their two sources, reference tokens with keep == 0 left out, out [B, Lq, H, D] memory,
// lse f32 [B, H, Lq] in natural log, a row with no key left gives out 0 and lse -inf), with the
// products on warpgroup MMA (wgmma, mma.cuh) instead of mma.sync. The decoupled mode stays on the
// mma.sync kernel.
//
// Launch (engine/src/cuda/flash_attention.rs): grid (ceil(Lq / fh_rows<D>()), H, B),
// fh_threads<D>() threads = fh_warpgroups<D>() warpgroups of 128, each owning 64 query rows:
// D 64: 3 warpgroups, 192 rows, 384 threads (<= 168 registers a thread for one block an SM);
// D 128: 2 warpgroups, 128 rows, 256 threads (its O accumulator is twice as large). Dynamic shared
// memory fh_shared_bytes<D>(): Q (rows x D) + 2 stages x (K + V tiles of FH_BN = 128 keys x D) +
// 1 KiB to align the start to a swizzle atom = 89 KiB (D 64) / 161 KiB (D 128), one block an SM.
//
// Shared-memory layout: every tile (Q, K, V) is stored as D / 64 column blocks of [rows][64]
// elements (128-byte rows), 128B-swizzled (16-byte chunk c of row r at chunk c ^ (r % 8)), block b
// at b * rows * 128 bytes; bases are 1024-byte aligned. That is the canonical K-major 128B-swizzle
// layout of wgmma for Q (A) and K (B of S = Q K^T, keys as the N dimension) and the MN-major one for
// V (B of O = P V: keys are the k dimension, D the N dimension contiguous; the 64-column blocks are
// the N atoms at LBO = rows * 128 bytes, groups of 8 keys at SBO = 1024).
//
// Per key tile j (own tiles first, then reference tiles, never one straddling both), each
// warpgroup computes S_j = Q K_j^T (64 x 128, wgmma_ss, D / 16 k-steps) into 64 f32 registers a
// thread and, in the same step, O += P_{j-1} V_{j-1} (wgmma_rs, 8 k-steps, P from registers: the
// accumulator columns 16k..16k+15 are the A fragment of k-step k); it waits for S_j only, masks
// keys past the source's end and dropped tokens to -inf, and runs the online softmax in base 2 on
// the accumulator registers (row max / sum over the 4 lanes of a quad) while the tensor cores
// still work on P_{j-1} V_{j-1} (FlashAttention-3's intra-warpgroup overlap); then O is rescaled
// and P_j packed. Copies: every thread issues K_{j+1} and V_j with cp.async at the start of step
// j (separate K and V double buffers, so step j never writes what it reads), waited for, fenced
// for the async proxy and published by one block barrier at the start of step j + 1.
// Registers a thread: S 64, O D / 2, P 32 (ptxas: D 64 159 of the 168 that 384 threads allow,
// D 128 209), no spills. The scale must be > 0 (applied inside the exponent, after the row max); the file is
// built with flush-to-zero (kernels::flash_attention::HOPPER_SOURCE) so exp2f is one MUFU.EX2.
//
// Variants at D 64 (LOOKAHEAD_VARIANT_FLASH_FWD=<name>, engine/src/cuda/flash_attention.rs; the
// instances at the end of this file): poly3 / poly4 / poly8 compute 1/3, 1/4, 1/8 of the
// softmax's exponentials with fh_exp2_poly on the FMA pipe (H200, b2 h10 4096x(4096+4096):
// default 0.573 ms, poly8 0.585, poly4 0.564, poly3 0.560: the kernel is not MUFU-bound);
// late issues each step's cp.async copies after its wgmmas; late_poly4 both. The variants ws,
// ws_nopp, ws3 and ws_poly3 are another kernel (warp-specialized: a producer warpgroup, two
// consumer warpgroups, mbarriers, ping-pong): kernels/cuda/flash_attention_ws.cu.
#include "flash_attention.cuh"  // FlashParams, FA_NEG_INF, fh_exp2_poly, the per-tile steps fa_*
#include "mma.cuh"

#define FH_BN 128

// Geometry, mirrored by kernels::flash_attention::hopper_{threads, rows_per_block, shared_bytes}.
template <int D> __host__ __device__ constexpr u32 fh_warpgroups() { return D <= 64 ? 3u : 2u; }
template <int D> __host__ __device__ constexpr u32 fh_threads() { return 128u * fh_warpgroups<D>(); }
template <int D> __host__ __device__ constexpr u32 fh_rows() { return 64u * fh_warpgroups<D>(); }
template <int D> __host__ __device__ constexpr u32 fh_shared_bytes() { return (fh_rows<D>() * D + 4u * FH_BN * D) * 2u + 1024u; }

#if LA_WGMMA

// Byte offset of 16-byte chunk `chunk` (0 .. D / 8 - 1) of row `row` in a tile of ROWS rows of D
// 16-bit elements laid out as above (64-column blocks of 128-byte rows, 128B-swizzled).
template <u32 ROWS> __device__ __forceinline__ u32 fh_offset(u32 row, u32 chunk) {
    return (chunk / 8) * ROWS * 128u + row * 128u + (((chunk % 8) ^ (row % 8)) << 4);
}

// cp.async of ROWS rows x D (zero-filled past `len`, which is >= 1) from src (row stride `rs`)
// into the tile at dst. Thread i copies chunk i % (D / 8) of rows i / (D / 8) + k ROW_STEP, where
// ROW_STEP (48 at D 64, 16 at D 128) is a multiple of 8: each pass keeps the thread's swizzled
// chunk position (it depends on row % 8), so source and destination advance by constants (8
// consecutive threads read 128 contiguous bytes of a row).
template <typename T, int D, u32 ROWS>
__device__ __forceinline__ void fh_load_tile(unsigned char* dst, const T* src, i64 rs, u32 len) {
    constexpr u32 CHUNKS = D / 8;
    constexpr u32 ROW_STEP = fh_threads<D>() / CHUNKS;
    static_assert(fh_threads<D>() % CHUNKS == 0 && ROW_STEP % 8 == 0, "a pass covers whole 8-row swizzle groups");
    const u32 chunk = threadIdx.x % CHUNKS;
    u32 row = threadIdx.x / CHUNKS;
    unsigned char* to = dst + fh_offset<ROWS>(row, chunk);
    const T* from = src + (i64)row * rs + chunk * 8;
#pragma unroll
    for (u32 pass = 0; pass < (ROWS + ROW_STEP - 1) / ROW_STEP; ++pass) {
        if (ROWS % ROW_STEP == 0 || row < ROWS) {
            const bool full = row < len;
            // A row past the end is not read (zero fill), but the address must still be valid.
            cp_async_16(to, full ? from : src, full);
        }
        row += ROW_STEP;
        to += ROW_STEP * 128;
        from += ROW_STEP * rs;
    }
}

// POLY: 0 takes every exponential of the softmax on MUFU.EX2; n > 0 computes those of every n-th
// 8-column accumulator block (blocks n - 1, 2n - 1, ...) with fh_exp2_poly instead.
// LATE: issue step j's copies (K_{j+1}, V_j) after its products instead of before them: their
// address arithmetic (~150 instructions a thread) then runs while the warpgroup waits for S_j
// instead of delaying every warpgroup's wgmma issue after the barrier. The copies never target the
// stages those products read, so only the order of issue changes.
template <typename T, int D, int POLY, bool LATE>
__device__ __forceinline__ void flash_attention_hopper_fwd(const FlashParams& p) {
    constexpr u32 BR = fh_rows<D>();
    constexpr u32 TILE_BYTES = FH_BN * D * 2;  // one K (or V) tile
    constexpr int KSTEPS = D / 16;             // k-steps of S = Q K^T
    constexpr int PSTEPS = FH_BN / 16;         // k-steps of O += P V
    constexpr int NS = FH_BN / 2;              // S accumulator registers a thread
    constexpr int NO = D / 2;                  // O accumulator registers a thread
    static_assert(D == 64 || D == 128, "head dim 64 or 128");

    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    // The swizzle applies to absolute shared-memory addresses: atoms start 1024-byte aligned. The
    // shared-window offset of the start is read from a descriptor's start-address field (the same
    // on the GPU and under the emulator, whose pointers are host addresses).
    const u32 window_offset = (u32)(wgmma_desc(smem_raw, 16, 16, WGMMA_SWIZZLE_NONE) & 0x3fffu) << 4;
    unsigned char* smem = smem_raw + (1024u - window_offset % 1024u) % 1024u;
    unsigned char* qs = smem;                           // Q: BR x D
    unsigned char* k_stages = smem + BR * D * 2;        // K stage s at k_stages + s TILE_BYTES
    unsigned char* v_stages = k_stages + 2 * TILE_BYTES; // V stage s at v_stages + s TILE_BYTES

    const u32 wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const u32 g = lane / 4, t = lane % 4;
    const u32 bi = blockIdx.z, hi = blockIdx.y, row0 = blockIdx.x * BR;
    const T* q = (const T*)p.q + bi * p.q_stride[0] + hi * p.q_stride[1];
    const T* k = (const T*)p.k + bi * p.k_stride[0] + hi * p.k_stride[1];
    const T* v = (const T*)p.v + bi * p.v_stride[0] + hi * p.v_stride[1];
    const T* kr = (const T*)p.k_ref + bi * p.k_ref_stride[0] + hi * p.k_ref_stride[1];
    const T* vr = (const T*)p.v_ref + bi * p.v_ref_stride[0] + hi * p.v_ref_stride[1];
    const u8* keep = p.keep ? (const u8*)p.keep + bi * p.keep_batch_stride : nullptr;
    const u32 own_tiles = (p.lk + FH_BN - 1) / FH_BN;
    const u32 tiles = own_tiles + (p.lr + FH_BN - 1) / FH_BN;

    // Tile j's K (or V) into stage j & 1: own keys first, then the reference, each with its own
    // edge tile.
    auto load_tile = [&](unsigned char* stage, u32 j, const T* own, i64 own_rs, const T* ref, i64 ref_rs) {
        const bool is_own = j < own_tiles;
        const u32 start = (is_own ? j : j - own_tiles) * FH_BN;
        const i64 rs = is_own ? own_rs : ref_rs;
        fh_load_tile<T, D, FH_BN>(stage + (j & 1) * TILE_BYTES, (is_own ? own : ref) + (i64)start * rs, rs, (is_own ? p.lk : p.lr) - start);
    };
    auto load_k = [&](u32 j) { load_tile(k_stages, j, k, p.k_stride[2], kr, p.k_ref_stride[2]); };
    auto load_v = [&](u32 j) { load_tile(v_stages, j, v, p.v_stride[2], vr, p.v_ref_stride[2]); };

    // Q once (it stays in shared memory: every S product reads it) and K of tile 0, one group.
    fh_load_tile<T, D, BR>(qs, q + (i64)row0 * p.q_stride[2], p.q_stride[2], p.lq - row0);
    if (tiles > 0) load_k(0);
    cp_async_commit();

    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
    // Running max (base-2 units) and this thread's part of the row sums, rows g (h = 0) and g + 8
    // (h = 1) of the warp's 16.
    float m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.0f, 0.0f};
    // P of the previous tile as A fragments: k-step kk (keys 16 kk ..) is accumulator blocks 2 kk
    // and 2 kk + 1 (registers 8 kk .. 8 kk + 7): a[0] row g keys 2t.., a[1] row g + 8, a[2] row g
    // keys 8 + 2t.., a[3] row g + 8.
    u32 pa[PSTEPS][4];

    // Step j (0 .. tiles) issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together, then runs the
    // softmax of S_j while the tensor cores still work on P_{j-1} V_{j-1} (FlashAttention-3's
    // intra-warpgroup overlap); O is rescaled once that product has retired. The copies of step j
    // (K_{j+1}, V_j) land during step j: K and V stages are separate, so the ones read in step j
    // (K_j, V_{j-1}) are never the ones written. Step 0 (no P V yet) and step `tiles` (P V only)
    // are peeled off the loop: no wgmma is issued under a condition (ptxas serializes every wgmma
    // of a kernel that has one on a path it cannot prove warpgroup-uniform).

    // Start of step j: this thread's copies of step j - 1 (K_j, V_{j-1}; Q at j = 0) have landed,
    // are fenced for the wgmma (async proxy) reads and, after the barrier, so are every thread's;
    // every warpgroup is done with the stages step j - 1 read. Then step j's copies are issued.
    auto issue_copies = [&](u32 j) {
        if (j + 1 < tiles) load_k(j + 1);
        if (j < tiles) load_v(j);
        cp_async_commit();
    };
    auto begin_step = [&](u32 j) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (!LATE) issue_copies(j);
    };
    // Descriptors of the warpgroup's Q rows and of K / V stage 0. A byte offset o (a multiple of
    // 16) into the same buffer is + o / 16 in the start-address field (bits 0-13: the shared
    // window is below 256 KiB, so the field never carries), as CUTLASS's descriptor iterators
    // advance: no descriptor is rebuilt in the loop.
    const u64 q_desc = wgmma_desc(qs + wg * 64 * 128, 16, 1024, WGMMA_SWIZZLE_128B);
    const u64 k_desc = wgmma_desc(k_stages, 16, 1024, WGMMA_SWIZZLE_128B);
    const u64 v_desc = wgmma_desc(v_stages, FH_BN * 128, 1024, WGMMA_SWIZZLE_128B);
    // S = Q K_j^T: the warpgroup's 64 rows (A, K-major) against the tile's 128 keys (B, K-major:
    // key rows). k-step kk is 16 columns of D: column block kk / 4, +32 bytes per step inside its
    // 128-byte rows. One commit group.
    auto issue_s = [&](u32 j, float (&s)[NS]) {
        const u64 k_stage = k_desc + (j & 1) * (TILE_BYTES / 16);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const u64 a = q_desc + ((kk / 4) * BR * 128 + (kk % 4) * 32) / 16;
            const u64 b = k_stage + ((kk / 4) * FH_BN * 128 + (kk % 4) * 32) / 16;
            wgmma_ss<T, FH_BN, false>(s, a, b, kk > 0);
        }
        wgmma_commit();
    };
    // O += P_{j-1} V_{j-1} (flash_attention.cuh); V's 64-column blocks (D 128) are LBO = FH_BN * 128
    // bytes apart.
    auto issue_pv = [&](u32 j) { fa_issue_pv<T, D>(o, pa, v_desc + ((j - 1) & 1) * (TILE_BYTES / 16)); };
    // The softmax of step j once S_j is issued (and P_{j-1} V_{j-1} after it when `pv_pending`):
    // mask, online softmax; s <- the probabilities exp2(s - max), corr <- the factor O takes.
    auto softmax_step = [&](u32 j, float (&s)[NS], float (&corr)[2], bool pv_pending) {
        // Tile j's source, first key and length, and the keys it drops (past the length, reference
        // tokens with keep 0), read while S is computed: lane l looks at columns 4 l .. 4 l + 3
        // (one coalesced 128-byte read a warp) and four ballots give every lane all 128 bits.
        // Column 8 n + 2 t + c is bit 2 (t % 2) + c of lane 2 n + t / 2, so after the shift by
        // t / 2 the thread finds it at bit 2 n of drop[c]. (Kept inline, the code of
        // fa_drop_bits in flash_attention.cuh, which flash_attention_ws.cu calls: calling it here,
        // even with the statements unchanged, gives the D 64 kernel 161 registers instead of 159.)
        const bool reference = j >= own_tiles;
        const u32 start = reference ? (j - own_tiles) * FH_BN : j * FH_BN;
        const u32 len = reference ? p.lr - start : p.lk - start;
        const bool check = len < FH_BN || (reference && keep != nullptr);
        u32 drop[2] = {0, 0};
        if (check) {
            u32 ballot[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const u32 col = 4 * lane + c;
                ballot[c] = __ballot_sync(0xffffffffu, col >= len || (reference && keep != nullptr && keep[start + col] == 0));
            }
            drop[0] = ((t & 1) ? ballot[2] : ballot[0]) >> (t / 2);
            drop[1] = ((t & 1) ? ballot[3] : ballot[1]) >> (t / 2);
        }

        if (pv_pending) wgmma_wait<1>();  // S_j retired (groups retire in order); P V may still run
        else wgmma_wait<0>();
        wgmma_fence_operands(s);
        fa_softmax_tile<POLY>(s, check, drop, p.scale_log2, m, l, corr);  // flash_attention.cuh
    };
    // The end of step j, put at the start of step j + 1 (before its barrier): P_{j-1} V_{j-1} has
    // retired, O (in the frame of the old max) is rescaled and P_j goes into pa. Kept apart from
    // the softmax by the loop's back edge: within one basic block ptxas hoists the wait above the
    // softmax (to interleave P's conversion with the exponentials), and the softmax would no
    // longer overlap the product.
    auto finish_step = [&](const float (&s)[NS], const float (&corr)[2]) {
        wgmma_wait<0>();
        wgmma_fence_operands(o);
#pragma unroll
        for (int kk = 0; kk < PSTEPS; ++kk) wgmma_fence_operands(pa[kk]);
        fa_rescale_o_pack_p<T, D>(o, pa, s, corr);
    };

    if (tiles > 0) {
        float s[NS], corr[2];
        begin_step(0);
        wgmma_fence();  // s was written by other code before: the fence orders the first issue
        issue_s(0, s);
        if (LATE) issue_copies(0);
        softmax_step(0, s, corr, false);
        for (u32 j = 1; j < tiles; ++j) {
            finish_step(s, corr);
            begin_step(j);
            wgmma_fence();  // o and pa were written since the last wgmma
            issue_s(j, s);
            issue_pv(j);
            if (LATE) issue_copies(j);
            softmax_step(j, s, corr, true);
        }
        finish_step(s, corr);
        begin_step(tiles);
        wgmma_fence();
        issue_pv(tiles);
        if (LATE) issue_copies(tiles);  // nothing left to copy: an empty group
        wgmma_wait<0>();
        wgmma_fence_operands(o);
    }
    cp_async_wait<0>();

    // Full row sums, then out = O / l and lse (flash_attention.cuh).
    fa_store_out_lse<T, D>(p, o, m, l, bi, hi, row0 + wg * 64 + warp * 16, g, t);
}

#endif  // LA_WGMMA

// Without wgmma (sm_80, sm_90 without the a features) the kernels compile empty; the engine
// launches them only on compute capability 9.0, whose CUBIN is built for sm_90a.
#if LA_WGMMA
#define FH_BODY(T, D, POLY, LATE) flash_attention_hopper_fwd<T, D, POLY, LATE>(p)
#else
#define FH_BODY(T, D, POLY, LATE) (void)p
#endif

// Instances: flash_attention_hopper_fwd_<type>_d<D> (the default) and, at D 64 (whose S tile has
// as many exponentials as at D 128 for half the products), the variants
// flash_attention_hopper_fwd_<type>_d64_<variant> (LOOKAHEAD_VARIANT_FLASH_FWD=<variant>):
//   poly<n>: every n-th 8-column block's exponentials by fh_exp2_poly, 1 / n of them on the FMA
//            pipe (n = 3, 4, 8);
//   late:    the copies issued after the products (LATE above);
//   late_poly4: both.
#define FH_INSTANCE(TN, T, D, POLY, LATE, SUFFIX)                                                                                               \
    extern "C" __global__ void __launch_bounds__(fh_threads<D>(), 1) flash_attention_hopper_fwd_##TN##_d##D##SUFFIX(const FlashParams p) { FH_BODY(T, D, POLY, LATE); }
FH_INSTANCE(bf16, bf16, 64, 0, false, )
FH_INSTANCE(bf16, bf16, 128, 0, false, )
FH_INSTANCE(f16, f16, 64, 0, false, )
FH_INSTANCE(f16, f16, 128, 0, false, )
FH_INSTANCE(bf16, bf16, 64, 4, false, _poly4)
FH_INSTANCE(f16, f16, 64, 4, false, _poly4)
FH_INSTANCE(bf16, bf16, 64, 8, false, _poly8)
FH_INSTANCE(f16, f16, 64, 8, false, _poly8)
FH_INSTANCE(bf16, bf16, 64, 3, false, _poly3)
FH_INSTANCE(f16, f16, 64, 3, false, _poly3)
FH_INSTANCE(bf16, bf16, 64, 0, true, _late)
FH_INSTANCE(f16, f16, 64, 0, true, _late)
FH_INSTANCE(bf16, bf16, 64, 4, true, _late_poly4)
FH_INSTANCE(f16, f16, 64, 4, true, _late_poly4)

// fh_exp2_poly over n inputs (y[i] = fh_exp2_poly(x[i])), for its accuracy test
// (tests/flash_attention_hopper_emulated.rs) on the emulator and on a GPU; not used by the engine.
extern "C" __global__ void flash_attention_hopper_exp2_poly(const float* x, float* y, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fh_exp2_poly(x[i]);
}
