// Test kernels of the warpgroup MMA wrappers (mma.cuh "Hopper warpgroup MMA") and their emulation:
// a block of 2 warpgroups computes D (128 x N, f32) = A (128 x 48) * B (48 x N); warpgroup g does
// rows 64 g .. 64 g + 63 with three k16 wgmmas (the first with scale_d = false over an accumulator
// holding 1e30, so that a wrongly kept D shows). A and B are staged from global memory into
// dynamic shared memory in the canonical layout of the swizzle mode (kernels/cuda/mma.cuh top of
// the section), B K-major (TRANS_B = false: from Bt[N][48]) or MN-major (TRANS_B = true: from
// B[48][N]); wgmma_rs takes A from registers (the mma.m16n8k16 A fragment, read from global).
// Inputs are 16-bit bit patterns (u16), the output is row-major f32 [128][N].
// Checked by tests/cuda_emulation.rs against a naive CPU GEMM; compiled for sm_90a by
// tests/cuda_compile.rs (the only check of the wrappers' PTX syntax without a GPU).
#include "common.cuh"
#include "mma.cuh"

#define WG_K 48
#define WG_ROWS 128
// Dynamic shared memory: A of both warpgroups (8 KiB each at most), then B (32 KiB at most).
#define WG_A_BYTES 8192
#define WG_B_OFFSET (2 * WG_A_BYTES)
#define WG_SHARED_BYTES (WG_B_OFFSET + 32768)

#if LA_WGMMA
// Row width in bytes of a swizzle mode (16 without swizzle: one core-matrix row).
__device__ __forceinline__ u32 wg_width(u32 swz) { return swz == WGMMA_SWIZZLE_128B ? 128 : swz == WGMMA_SWIZZLE_64B ? 64 : swz == WGMMA_SWIZZLE_32B ? 32 : 16; }

// The swizzle on a byte offset from a 1024-byte aligned tile base (= on the absolute address).
__device__ __forceinline__ u32 wg_swizzle(u32 off, u32 swz) {
    const u32 mask = swz == WGMMA_SWIZZLE_128B ? 0x70 : swz == WGMMA_SWIZZLE_64B ? 0x30 : swz == WGMMA_SWIZZLE_32B ? 0x10 : 0;
    return off ^ ((off >> 3) & mask);
}

// K-major operand with `rows` MN rows and WG_K k: byte offset of (r, k) before the swizzle.
// Swizzled: column chunks of E = W / 2 k-values, each chunk `rows` rows of W bytes (8-row atoms at
// SBO = 8 W). No swizzle: core matrices (8 rows x 16 bytes) with SBO = 128 between row groups and
// LBO = rows / 8 * 128 between k groups.
__device__ __forceinline__ u32 kmajor_offset(u32 r, u32 k, u32 rows, u32 swz) {
    const u32 w = wg_width(swz);
    if (swz == WGMMA_SWIZZLE_NONE) return (r / 8) * 128 + (k / 8) * (rows / 8 * 128) + (r % 8) * 16 + (k % 8) * 2;
    const u32 e = w / 2;
    return (k / e) * rows * w + (r / 8) * 8 * w + (r % 8) * w + (k % e) * 2;
}
// Descriptor of k16 step s of a K-major operand at `base`.
__device__ __forceinline__ u64 kmajor_desc(const unsigned char* base, u32 s, u32 rows, u32 swz) {
    const u32 w = wg_width(swz);
    if (swz == WGMMA_SWIZZLE_NONE) return wgmma_desc(base + 2 * s * (rows / 8 * 128), rows / 8 * 128, 128, WGMMA_SWIZZLE_NONE);
    // Start at (row 0, k = 16 s): inside a 128B / 64B atom the k16 steps are 32 bytes apart.
    return wgmma_desc(base + kmajor_offset(0, 16 * s, rows, swz), 16, 8 * w, (WgmmaSwizzle)swz);
}
// MN-major B ([WG_K][n] with n contiguous): byte offset of (n, k) before the swizzle. Swizzled:
// k-groups of 8 rows of W bytes (E = W / 2 n-values) at SBO = 8 W, E-wide n chunks at LBO =
// WG_K / 8 * 8 W. No swizzle: core matrices of 8 k-rows x 8 n, LBO = 128 between k groups, SBO =
// WG_K / 8 * 128 between n groups.
__device__ __forceinline__ u32 mnmajor_offset(u32 n, u32 k, u32 swz) {
    const u32 w = wg_width(swz);
    if (swz == WGMMA_SWIZZLE_NONE) return (n / 8) * (WG_K / 8 * 128) + (k / 8) * 128 + (k % 8) * 16 + (n % 8) * 2;
    const u32 e = w / 2;
    return (n / e) * (WG_K / 8 * 8 * w) + (k / 8) * 8 * w + (k % 8) * w + (n % e) * 2;
}
__device__ __forceinline__ u64 mnmajor_desc(const unsigned char* base, u32 s, u32 swz) {
    const u32 w = wg_width(swz);
    if (swz == WGMMA_SWIZZLE_NONE) return wgmma_desc(base + 2 * s * 128, 128, WG_K / 8 * 128, WGMMA_SWIZZLE_NONE);
    return wgmma_desc(base + 2 * s * 8 * w, WG_K / 8 * 8 * w, 8 * w, (WgmmaSwizzle)swz);
}

// Stages A (WG_ROWS x WG_K, row-major) and B into shared memory, all threads of the block.
template <int N, bool TRANS_B>
__device__ __forceinline__ void stage_operands(unsigned char* smem, const u16* a, const u16* b, u32 swz) {
    for (u32 i = threadIdx.x; i < WG_ROWS * WG_K; i += blockDim.x) {
        const u32 r = i / WG_K, k = i % WG_K, g = r / 64;
        *reinterpret_cast<u16*>(smem + g * WG_A_BYTES + wg_swizzle(kmajor_offset(r % 64, k, 64, swz), swz)) = a[i];
    }
    for (u32 i = threadIdx.x; i < N * WG_K; i += blockDim.x) {
        u32 off;
        if (TRANS_B) off = mnmajor_offset(i % N, i / N, swz);  // b is [WG_K][N]
        else off = kmajor_offset(i / WG_K, i % WG_K, N, swz);  // b is Bt [N][WG_K]
        *reinterpret_cast<u16*>(smem + WG_B_OFFSET + wg_swizzle(off, swz)) = b[i];
    }
    // The generic-proxy stores must be visible to the async proxy (wgmma) of every warp.
    fence_proxy_async();
    __syncthreads();
}

// The A fragment of k16 step s for this thread (rows of its warp), read from global A.
__device__ __forceinline__ void a_fragment(u32 (&f)[4], const u16* a, u32 s) {
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, row = 16 * (threadIdx.x % 128 / 32) + g, k = 16 * s + 2 * t;
    f[0] = a[row * WG_K + k] | ((u32)a[row * WG_K + k + 1] << 16);
    f[1] = a[(row + 8) * WG_K + k] | ((u32)a[(row + 8) * WG_K + k + 1] << 16);
    f[2] = a[row * WG_K + k + 8] | ((u32)a[row * WG_K + k + 9] << 16);
    f[3] = a[(row + 8) * WG_K + k + 8] | ((u32)a[(row + 8) * WG_K + k + 9] << 16);
}

// Writes this thread's accumulator (layout at the top of the mma.cuh section) into out[128][N].
template <int N> __device__ __forceinline__ void store_accumulator(float* out, const float (&d)[N / 2]) {
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, row = 16 * (threadIdx.x % 128 / 32) + g;
    for (u32 j = 0; j < N / 8; ++j) {
        const u32 col = 8 * j + 2 * t;
        out[row * N + col] = d[4 * j];
        out[row * N + col + 1] = d[4 * j + 1];
        out[(row + 8) * N + col] = d[4 * j + 2];
        out[(row + 8) * N + col + 1] = d[4 * j + 3];
    }
}

// The product with 3 k16 steps: steps 0 and 1 in one group, step 2 in a second; wait<1> then wait<0>.
template <typename T, int N, bool TRANS_B>
__device__ __forceinline__ void warpgroup_gemm(const u16* a, const u16* b, float* out, u32 swz, u32 rs) {
    LA_DYNAMIC_SHARED(unsigned char, smem);
    stage_operands<N, TRANS_B>(smem, a, b, swz);
    const u32 g = threadIdx.x / 128;
    const unsigned char* sa = smem + g * WG_A_BYTES;
    const unsigned char* sb = smem + WG_B_OFFSET;
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = 1e30f;  // scale_d = false on step 0 must ignore it
    u32 frag[3][4];
    for (u32 s = 0; s < 3; ++s) a_fragment(frag[s], a + g * 64 * WG_K, s);
    wgmma_fence();
    for (u32 s = 0; s < 3; ++s) {
        const u64 bd = TRANS_B ? mnmajor_desc(sb, s, swz) : kmajor_desc(sb, s, N, swz);
        if (rs) wgmma_rs<T, N, TRANS_B>(d, frag[s], bd, s > 0);
        else wgmma_ss<T, N, TRANS_B>(d, kmajor_desc(sa, s, 64, swz), bd, s > 0);
        if (s >= 1) wgmma_commit();
    }
    wgmma_wait<1>();
    wgmma_wait<0>();
    store_accumulator<N>(out + g * 64 * N, d);
}
#endif

#if LA_WGMMA
#define LA_WG_BODY(T, N, TB) warpgroup_gemm<T, N, TB>(a, b, out, swz, rs);
#else
#define LA_WG_BODY(T, N, TB)
#endif
// wg_gemm_{bf16,f16}_N_{k,mn}: block (256), dynamic shared WG_SHARED_BYTES; swz: WgmmaSwizzle;
// rs: A from registers.
#define LA_WG_KERNEL(NAME, T, N, TB) \
    extern "C" __global__ void __launch_bounds__(256) NAME(const u16* a, const u16* b, float* out, u32 swz, u32 rs) { LA_WG_BODY(T, N, TB) }
LA_WG_KERNEL(wg_gemm_bf16_64_k, bf16, 64, false)
LA_WG_KERNEL(wg_gemm_bf16_64_mn, bf16, 64, true)
LA_WG_KERNEL(wg_gemm_bf16_96_k, bf16, 96, false)
LA_WG_KERNEL(wg_gemm_bf16_96_mn, bf16, 96, true)
LA_WG_KERNEL(wg_gemm_bf16_128_k, bf16, 128, false)
LA_WG_KERNEL(wg_gemm_bf16_128_mn, bf16, 128, true)
LA_WG_KERNEL(wg_gemm_bf16_160_k, bf16, 160, false)
LA_WG_KERNEL(wg_gemm_bf16_160_mn, bf16, 160, true)
LA_WG_KERNEL(wg_gemm_bf16_192_k, bf16, 192, false)
LA_WG_KERNEL(wg_gemm_bf16_192_mn, bf16, 192, true)
LA_WG_KERNEL(wg_gemm_bf16_256_k, bf16, 256, false)
LA_WG_KERNEL(wg_gemm_bf16_256_mn, bf16, 256, true)
LA_WG_KERNEL(wg_gemm_f16_64_k, f16, 64, false)
LA_WG_KERNEL(wg_gemm_f16_64_mn, f16, 64, true)
LA_WG_KERNEL(wg_gemm_f16_96_k, f16, 96, false)
LA_WG_KERNEL(wg_gemm_f16_96_mn, f16, 96, true)
LA_WG_KERNEL(wg_gemm_f16_128_k, f16, 128, false)
LA_WG_KERNEL(wg_gemm_f16_128_mn, f16, 128, true)
LA_WG_KERNEL(wg_gemm_f16_160_k, f16, 160, false)
LA_WG_KERNEL(wg_gemm_f16_160_mn, f16, 160, true)
LA_WG_KERNEL(wg_gemm_f16_192_k, f16, 192, false)
LA_WG_KERNEL(wg_gemm_f16_192_mn, f16, 192, true)
LA_WG_KERNEL(wg_gemm_f16_256_k, f16, 256, false)
LA_WG_KERNEL(wg_gemm_f16_256_mn, f16, 256, true)

// Broken kernels (block of 128 threads, dynamic shared WG_SHARED_BYTES; N = 64, bf16, 128B
// swizzle, K-major B from Bt[64][48]):
// wg_read_before_wait: stores the accumulator after the commit but before wgmma_wait (it must
//   read NaN in the emulator: the hardware may still be writing it), then waits.
// wg_split_sites: warps 0-1 and warps 2-3 issue their wgmma at different call sites.
// wg_misaligned: A's 128B-swizzled atoms start 512 bytes past a 1024-byte boundary.
extern "C" __global__ void wg_read_before_wait(const u16* a, const u16* b, float* out) {
#if LA_WGMMA
    LA_DYNAMIC_SHARED(unsigned char, smem);
    stage_operands<64, false>(smem, a, b, WGMMA_SWIZZLE_128B);
    float d[32];
    wgmma_fence();
    wgmma_ss<bf16, 64, false>(d, kmajor_desc(smem, 0, 64, WGMMA_SWIZZLE_128B), kmajor_desc(smem + WG_B_OFFSET, 0, 64, WGMMA_SWIZZLE_128B), false);
    wgmma_commit();
    store_accumulator<64>(out, d);
    wgmma_wait<0>();
#endif
}
extern "C" __global__ void wg_split_sites(const u16* a, const u16* b, float* out) {
#if LA_WGMMA
    LA_DYNAMIC_SHARED(unsigned char, smem);
    stage_operands<64, false>(smem, a, b, WGMMA_SWIZZLE_128B);
    float d[32];
    const u64 ad = kmajor_desc(smem, 0, 64, WGMMA_SWIZZLE_128B), bd = kmajor_desc(smem + WG_B_OFFSET, 0, 64, WGMMA_SWIZZLE_128B);
    wgmma_fence();
    if (threadIdx.x < 64) wgmma_ss<bf16, 64, false>(d, ad, bd, false);
    else wgmma_ss<bf16, 64, false>(d, ad, bd, false);
    wgmma_commit();
    wgmma_wait<0>();
    store_accumulator<64>(out, d);
#endif
}
extern "C" __global__ void wg_misaligned(const u16* a, const u16* b, float* out) {
#if LA_WGMMA
    LA_DYNAMIC_SHARED(unsigned char, smem);
    stage_operands<64, false>(smem, a, b, WGMMA_SWIZZLE_128B);
    float d[32];
    wgmma_fence();
    wgmma_ss<bf16, 64, false>(d, wgmma_desc(smem + 512, 16, 1024, WGMMA_SWIZZLE_128B), kmajor_desc(smem + WG_B_OFFSET, 0, 64, WGMMA_SWIZZLE_128B), false);
    wgmma_commit();
    wgmma_wait<0>();
    store_accumulator<64>(out, d);
#endif
}
// wg_refill_before_wait: A's stage is overwritten with zeros while the wgmma that reads it is
// still pending (a pipeline refilling a stage before its wgmma_wait): the emulator reads shared
// memory at the wait, so the product comes out as 0 * B (on a GPU: either, a race).
extern "C" __global__ void wg_refill_before_wait(const u16* a, const u16* b, float* out) {
#if LA_WGMMA
    LA_DYNAMIC_SHARED(unsigned char, smem);
    stage_operands<64, false>(smem, a, b, WGMMA_SWIZZLE_128B);
    float d[32];
    wgmma_fence();
    wgmma_ss<bf16, 64, false>(d, kmajor_desc(smem, 0, 64, WGMMA_SWIZZLE_128B), kmajor_desc(smem + WG_B_OFFSET, 0, 64, WGMMA_SWIZZLE_128B), false);
    wgmma_commit();
    for (u32 i = threadIdx.x; i < WG_A_BYTES / 2; i += blockDim.x) reinterpret_cast<u16*>(smem)[i] = 0;
    wgmma_wait<0>();
    store_accumulator<64>(out, d);
#endif
}
// wg_outside_shared: B's descriptor start advanced (as a k loop would) past the end of the
// block's dynamic shared memory.
extern "C" __global__ void wg_outside_shared(const u16* a, const u16* b, float* out) {
#if LA_WGMMA
    LA_DYNAMIC_SHARED(unsigned char, smem);
    stage_operands<64, false>(smem, a, b, WGMMA_SWIZZLE_128B);
    float d[32];
    wgmma_fence();
    wgmma_ss<bf16, 64, false>(d, kmajor_desc(smem, 0, 64, WGMMA_SWIZZLE_128B), kmajor_desc(smem + WG_B_OFFSET, 0, 64, WGMMA_SWIZZLE_128B) + (WG_SHARED_BYTES >> 4), false);
    wgmma_commit();
    wgmma_wait<0>();
    store_accumulator<64>(out, d);
#endif
}
