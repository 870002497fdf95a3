// Thread-block cluster primitives (sm_90+): the CTA's rank in its cluster, the whole-cluster
// barrier split into arrive and wait, and loads from another CTA's shared memory (distributed
// shared memory). Kernels reach these instructions only through the functions below, so that the
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
