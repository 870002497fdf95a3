// Thread-block cluster primitives (sm_90+): the CTA's rank in its cluster, the whole-cluster
// barrier split into arrive and wait, and loads from another CTA's shared memory (distributed
// shared memory); and the grid-wide barrier of cooperative launches (any arch). Kernels reach these instructions only through the functions below, so that the
// CPU emulator (kernels/emu) can replace each (cluster launches run all CTAs of a cluster as
// fibers there, with per-CTA shared memory).
#pragma once
#include "common.cuh"

#ifndef LOOKAHEAD_EMULATE
#if __CUDA_ARCH__ >= 900

__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// Whole-cluster barrier: release orders this thread's earlier (shared) writes before the other
// CTAs' reads after their wait (acquire). Every thread of the cluster arrives, then waits; it may
// work in between.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// The f32 at shared address `p` (this CTA's) in CTA `rank` of the cluster.
__device__ __forceinline__ float cluster_load_remote(const float* p, u32 rank) {
    u32 local, remote;
    float v;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(local) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

#endif  // __CUDA_ARCH__ >= 900
#endif  // LOOKAHEAD_EMULATE

// ---- grid-wide barrier (cooperative launches) -------------------------------------------------
// Every block of a cooperative launch (the host launches with CU_LAUNCH_ATTRIBUTE_COOPERATIVE, so
// all blocks are resident at once) waits here until all `blocks` have arrived; global-memory
// writes before it are visible to every block after it. `bar`: two u32 in global memory (arrivals,
// generation), zero before their first use; each use leaves the arrivals at zero again, so the same
// pair serves every later launch on the stream. The last block to arrive resets the arrivals and
// then bumps the generation, which the others poll. The emulator runs a cooperative launch's blocks
// as one cluster and this barrier as the cluster's.
#ifdef LOOKAHEAD_EMULATE
__device__ __forceinline__ void grid_sync(u32*, u32) {
    cluster_arrive();
    cluster_wait();
}
#else
__device__ __forceinline__ void grid_sync(u32* bar, u32 blocks) {
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        volatile u32* generation = bar + 1;
        // Read before arriving: the generation cannot move on until this block has arrived.
        const u32 gen = *generation;
        __threadfence();
        if (atomicAdd(bar, 1u) == blocks - 1) {
            atomicExch(bar, 0u);
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            while (*generation == gen) __nanosleep(32);
        }
        __threadfence();
    }
    __syncthreads();
}
#endif
