// Test kernels of the emulator's thread-block cluster pipelines (pipeline.cuh
// tma_load_2d_multicast, mbarrier_arrive_cluster, fence_mbarrier_init before a cluster barrier):
// a box multicast by one CTA into several CTAs' shared memory, each completing the bytes on its
// own mbarrier, and mbarriers that every CTA of a cluster arrives on remotely; each with modes that
// misuse them (the errors tests/cuda_emulation_multicast.rs expects). Launched in clusters of
// `cs` CTAs along x (grid a multiple of cs).
#include "cluster.cuh"
#include "common.cuh"
#include "mma.cuh"
#include "pipeline.cuh"

#if LA_WGMMA
// CTA `src` of each cluster loads the box at (x, y) and multicasts it to the CTAs of `mask`, at
// dynamic shared memory + 0 in each, completing on each one's (static shared) mbarrier; every CTA
// of the mask announces box_bytes and waits, then copies its box (u32 words) to
// out[block * box_bytes / 4 ..] (block: the global CTA index). mode: 0 as it should be; 1 no
// fence_mbarrier_init after the inits; 2 __syncthreads instead of the cluster barrier after the
// inits; 3 the CTAs other than `src` exit at once after the init barrier (no final cluster
// barrier: the multicast lands in an exited CTA).
extern "C" __global__ void tma_multicast_tile(const __grid_constant__ TensorMap map, u32* out, int x, int y, u32 mask, u32 src, u32 box_bytes, int mode) {
    LA_DYNAMIC_SHARED(unsigned char, smem);
    __shared__ u64 bar;
    const u32 rank = cluster_rank(), block = blockIdx.x;
    const bool dest = (mask >> rank) & 1u;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 1);
        if (mode != 1) fence_mbarrier_init();
    }
    if (mode == 2) {
        __syncthreads();
    } else {
        cluster_arrive();
        cluster_wait();
    }
    if (mode == 3 && rank != src) return;
    if (threadIdx.x == 0) {
        if (dest) mbarrier_arrive_expect_tx(&bar, box_bytes);
        if (rank == src) tma_load_2d_multicast(smem, &map, x, y, &bar, (u16)mask);
    }
    if (dest) {
        mbarrier_wait(&bar, 0);
        for (u32 i = threadIdx.x; i < box_bytes / 4; i += blockDim.x) out[block * (box_bytes / 4) + i] = reinterpret_cast<const u32*>(smem)[i];
    }
    __syncwarp();
    cluster_arrive();
    cluster_wait();
}

// Every CTA's thread 0 writes seen[block] = block + 1 and then arrives on the mbarrier `bar` of
// every CTA of the cluster (count cs: one arrival from each CTA, remote ones through mapa), for
// `rounds` phases; after each phase's wait, thread 0 of each CTA adds the cluster's seen entries
// to sums[block] (so a phase that completed before a CTA's write shows as a wrong sum). mode:
// 0 as it should be; 1 one arrival on rank cs (outside the cluster); 2 on a global address;
// 3 on a shared word that is not an mbarrier; 4 CTA 0 arrives on CTA 1's barrier before the
// cluster barrier that follows the inits; 5 the barrier counts cs - 1 arrivals (a phase may
// complete before the last CTA's write).
extern "C" __global__ void cluster_remote_arrive(u32* seen, u32* sums, u32* global_word, u32 cs, u32 rounds, int mode) {
    __shared__ u64 bar;
    __shared__ u64 not_a_barrier;
    const u32 rank = cluster_rank(), block = blockIdx.x, base = block - rank;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, mode == 5 ? cs - 1 : cs);
        fence_mbarrier_init();
        not_a_barrier = 0;
        if (mode == 4 && rank == 0) mbarrier_arrive_cluster(&bar, 1);
    }
    cluster_arrive();
    cluster_wait();
    for (u32 round = 0; round < rounds; ++round) {
        if (threadIdx.x == 0) {
            seen[block] = block + 1 + round;
            for (u32 r = 0; r < cs; ++r) mbarrier_arrive_cluster(&bar, (rank + r) % cs);
            if (round == 0 && mode == 1) mbarrier_arrive_cluster(&bar, cs);
            if (round == 0 && mode == 2) mbarrier_arrive_cluster(reinterpret_cast<u64*>(global_word), (rank + 1) % cs);
            if (round == 0 && mode == 3) mbarrier_arrive_cluster(&not_a_barrier, (rank + 1) % cs);
            mbarrier_wait(&bar, round & 1u);
            u32 s = 0;
            for (u32 r = 0; r < cs; ++r) s += seen[base + r];
            sums[block * rounds + round] = s;
        }
        // Everyone has read this round's seen entries before anyone overwrites them.
        __syncwarp();
        cluster_arrive();
        cluster_wait();
    }
    __syncwarp();
    cluster_arrive();
    cluster_wait();
}
#endif
