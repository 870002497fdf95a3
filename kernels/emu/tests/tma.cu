// Test kernels of the emulator's TMA (pipeline.cuh tma_load_2d / tma_store_2d with a TensorMap
// built by kernels::emulate::TensorMap2d): a box loaded into shared memory and dumped raw (the
// swizzled layout, zero fill), a box loaded and stored back elsewhere (store clipping, the
// store's late read of shared memory), a GEMM fed by a 2-stage TMA producer warp and a consumer
// warpgroup (full / empty mbarriers, 128B-swizzled tiles read by wgmma), and its FA3-style form
// with two consumer warpgroups issuing in turn (named-barrier ping-pong) and setmaxnreg. Checked by
// tests/cuda_emulation.rs; compiled for sm_80 (empty) and sm_90a by tests/cuda_compile.rs (the PTX of pipeline.cuh).
#include "common.cuh"
#include "mma.cuh"
#include "pipeline.cuh"

#if LA_WGMMA
// Loads the box at (x, y) into dynamic shared memory + dst_offset, announcing expect_bytes on the
// mbarrier, and copies the box_bytes of shared memory as they are (u32 words) into out.
extern "C" __global__ void tma_tile(const __grid_constant__ TensorMap map, u32* out, int x, int y, u32 dst_offset, u32 expect_bytes, u32 box_bytes) {
    LA_DYNAMIC_SHARED(unsigned char, smem);
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        tma_prefetch_descriptor(&map);
        mbarrier_init(&bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(&bar, expect_bytes);
        tma_load_2d(smem + dst_offset, &map, x, y, &bar);
    }
    mbarrier_wait(&bar, 0);
    for (u32 i = threadIdx.x; i < box_bytes / 4; i += blockDim.x) out[i] = reinterpret_cast<const u32*>(smem + dst_offset)[i];
}

// Loads the box at (x, y) of `src` and stores it at (x2, y2) of `dst` (same box, no swizzle
// needed but any works). overwrite: thread 0 zeroes the box in shared memory between the store
// and its wait (a race: the store may read shared memory until the wait returns).
extern "C" __global__ void tma_copy_box(const __grid_constant__ TensorMap src, const __grid_constant__ TensorMap dst, int x, int y, int x2, int y2, u32 box_bytes, u32 overwrite) {
    LA_DYNAMIC_SHARED(unsigned char, smem);
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(&bar, box_bytes);
        tma_load_2d(smem, &src, x, y, &bar);
    }
    mbarrier_wait(&bar, 0);
    if (threadIdx.x == 0) {
        fence_proxy_async();
        tma_store_2d(&dst, x2, y2, smem);
        tma_store_commit();
        if (overwrite)
            for (u32 i = 0; i < box_bytes; ++i) smem[i] = 0;
        tma_store_wait<0>();
    }
}

// D (64 x 64, f32, row-major) = A (64 x K) * B, B given as Bt (64 x K), both bf16 row-major with
// K = 64 kt. Block of 256 threads: warpgroup 0 consumes, thread 128 (warpgroup 1) produces.
// Stage s (2 stages) holds the k-tile's A and Bt boxes (64 x 64 bf16 = 64 rows of 128 bytes,
// 128B-swizzled: the K-major wgmma layout with LBO 16, SBO 1024); full[s]: 1 arrival + 16 KiB
// of transactions; empty[s]: the 128 consumer threads.
constexpr u32 TG_TILE = 8192;
// __launch_bounds__(256, 1): without a known register count at entry ptxas ignores setmaxnreg
// (C7508 "setmaxnreg ignored"), which tests/cuda_compile.rs turns into a failure.
extern "C" __global__ void __launch_bounds__(256, 1) tma_gemm(const __grid_constant__ TensorMap map_a, const __grid_constant__ TensorMap map_b, float* out, int kt) {
    LA_DYNAMIC_SHARED(unsigned char, smem);
    __shared__ u64 full[2], empty[2];
    const u32 t = threadIdx.x;
    if (t == 0) {
        for (int s = 0; s < 2; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], 128);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    if (t >= 128) {
        setmaxnreg_dec<40>();
        if (t == 128) {
            for (int i = 0; i < kt; ++i) {
                const int s = i % 2;
                mbarrier_wait(&empty[s], ((u32)(i / 2) & 1u) ^ 1u);
                mbarrier_arrive_expect_tx(&full[s], 2 * TG_TILE);
                tma_load_2d(smem + s * 2 * TG_TILE, &map_a, 64 * i, 0, &full[s]);
                tma_load_2d(smem + s * 2 * TG_TILE + TG_TILE, &map_b, 64 * i, 0, &full[s]);
            }
        }
        return;
    }
    setmaxnreg_inc<232>();
    float d[32];
    for (int q = 0; q < 32; ++q) d[q] = 0.0f;
    for (int i = 0; i < kt; ++i) {
        const int s = i % 2;
        mbarrier_wait(&full[s], (u32)(i / 2) & 1u);
        const unsigned char* sa = smem + s * 2 * TG_TILE;
        const unsigned char* sb = sa + TG_TILE;
        wgmma_fence();
        for (u32 ks = 0; ks < 4; ++ks)
            wgmma_ss<bf16, 64, false>(d, wgmma_desc(sa + 32 * ks, 16, 1024, WGMMA_SWIZZLE_128B), wgmma_desc(sb + 32 * ks, 16, 1024, WGMMA_SWIZZLE_128B), i > 0 || ks > 0);
        wgmma_commit();
        wgmma_wait<0>();
        mbarrier_arrive(&empty[s]);
    }
    const u32 lane = t % 32, g = lane / 4, q = lane % 4, row = 16 * (t / 32) + g;
    for (u32 j = 0; j < 8; ++j) {
        const u32 col = 8 * j + 2 * q;
        out[row * 64 + col] = d[4 * j];
        out[row * 64 + col + 1] = d[4 * j + 1];
        out[(row + 8) * 64 + col] = d[4 * j + 2];
        out[(row + 8) * 64 + col + 1] = d[4 * j + 3];
    }
}
// FA3-style: D (128 x 64) = A (128 x K) * B (Bt: 64 x K), 384 threads. Warpgroup 0 produces (thread
// 0: one 128 x 64 box of A and one 64 x 64 box of Bt per k-tile, 2 stages, full[s]: 1 arrival +
// 24 KiB); consumer warpgroups 1 and 2 take rows 0-63 and 64-127 and issue their wgmmas in turn
// (ping-pong): named barrier 1 = warpgroup 1's issue is done, 2 = warpgroup 2's; each appends its
// number to a log before issuing (log: 1, 2, 1, 2, ...). empty[s]: the 256 consumer threads.
constexpr u32 PP_STAGE = 3 * TG_TILE;
extern "C" __global__ void __launch_bounds__(384, 1) tma_pingpong_gemm(const __grid_constant__ TensorMap map_a, const __grid_constant__ TensorMap map_b, float* out, int* log, int kt) {
    LA_DYNAMIC_SHARED(unsigned char, smem);
    __shared__ u64 full[2], empty[2];
    __shared__ int issued;
    const u32 t = threadIdx.x, wg = t / 128;
    if (t == 0) {
        for (int s = 0; s < 2; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], 256);
        }
        fence_mbarrier_init();
        issued = 0;
    }
    __syncthreads();
    if (wg == 0) {
        setmaxnreg_dec<40>();
        if (t == 0) {
            for (int i = 0; i < kt; ++i) {
                const int s = i % 2;
                mbarrier_wait(&empty[s], ((u32)(i / 2) & 1u) ^ 1u);
                mbarrier_arrive_expect_tx(&full[s], PP_STAGE);
                tma_load_2d(smem + s * PP_STAGE, &map_a, 64 * i, 0, &full[s]);
                tma_load_2d(smem + s * PP_STAGE + 2 * TG_TILE, &map_b, 64 * i, 0, &full[s]);
            }
        }
        return;
    }
    setmaxnreg_inc<232>();
    float d[32];
    for (int q = 0; q < 32; ++q) d[q] = 0.0f;
    for (int i = 0; i < kt; ++i) {
        const int s = i % 2;
        mbarrier_wait(&full[s], (u32)(i / 2) & 1u);
        // Warpgroup 1 waits for warpgroup 2's previous issue (none before the first); 2 for 1's.
        if (wg == 2) named_barrier_sync(1, 256);
        else if (i > 0) named_barrier_sync(2, 256);
        if (t % 128 == 0) log[issued++] = (int)wg;
        const unsigned char* sa = smem + s * PP_STAGE + (wg - 1) * TG_TILE;
        const unsigned char* sb = smem + s * PP_STAGE + 2 * TG_TILE;
        wgmma_fence();
        for (u32 ks = 0; ks < 4; ++ks)
            wgmma_ss<bf16, 64, false>(d, wgmma_desc(sa + 32 * ks, 16, 1024, WGMMA_SWIZZLE_128B), wgmma_desc(sb + 32 * ks, 16, 1024, WGMMA_SWIZZLE_128B), i > 0 || ks > 0);
        wgmma_commit();
        named_barrier_arrive(wg == 1 ? 1 : 2, 256);
        wgmma_wait<0>();
        mbarrier_arrive(&empty[s]);
    }
    const u32 lane = t % 32, g = lane / 4, q = lane % 4, row = 64 * (wg - 1) + 16 * (t % 128 / 32) + g;
    for (u32 j = 0; j < 8; ++j) {
        const u32 col = 8 * j + 2 * q;
        out[row * 64 + col] = d[4 * j];
        out[row * 64 + col + 1] = d[4 * j + 1];
        out[(row + 8) * 64 + col] = d[4 * j + 2];
        out[(row + 8) * 64 + col + 1] = d[4 * j + 3];
    }
}
#endif
