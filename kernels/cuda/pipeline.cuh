// Hopper producer/consumer pipelines (sm_90a): named barriers, mbarriers and TMA (the Tensor
// Memory Accelerator's bulk tensor copies), and register reallocation between warpgroups. The
// pieces FlashAttention-3 / CUTLASS's warp-specialized kernels are built from: a producer warp
// issues TMA loads that complete on a stage's "full" mbarrier (arrive.expect_tx + complete_tx
// bytes); consumer warpgroups wait on it, compute, and arrive on the stage's "empty" mbarrier,
// which the producer waits on before refilling the stage; named barriers order the consumer
// warpgroups among themselves (ping-pong) without stopping the producer. As with mma.cuh, kernels
// reach these instructions only through the functions below, so that the CPU emulator
// (kernels/emu/cuda_emulator.h defines the same functions under LOOKAHEAD_EMULATE) can run them.
//
// mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier"): a u64 in
// shared memory, 8-byte aligned. Each phase completes when `count` arrivals (set at init) have
// happened AND the transaction count (bytes announced by arrive_expect_tx, decremented by the TMA
// copies' complete_tx) is back to zero; then the phase parity flips. mbarrier_wait(bar, parity)
// returns once the phase with that parity has completed (phases alternate 0, 1, 0, ...; a waiter
// tracks the parity it expects, flipping it each time it wraps its ring of stages).
// Initialise with one thread, then fence_mbarrier_init() and __syncthreads() before any use.
//
// TMA: a TensorMap (CUtensorMap, 128 bytes, 64-byte aligned) describes a global tensor (dims,
// strides, element type), the box one copy moves and the shared-memory swizzle; the host builds it
// (engine/src/cuda/tensor_map.rs: cuTensorMapEncodeTiled) and passes it as a `const
// __grid_constant__ TensorMap` kernel parameter. tma_load_2d copies the box whose first element is
// at (x = inner coordinate, y = outer coordinate; tma_load_4d: x, y, z, w of a rank-4 map) into shared memory at `dst` (aligned to 128
// bytes, 1024 with the 128-byte swizzle; out-of-range elements are zero-filled) and completes
// box bytes of transactions on `bar`. The swizzle modes are those of the wgmma descriptors
// (mma.cuh), so a TMA-loaded 128B-swizzled tile feeds wgmma directly.
#pragma once
#include "mma.cuh"

struct alignas(64) TensorMap {
    u64 opaque[16];
};

#if !defined(LOOKAHEAD_EMULATE) && LA_WGMMA

// ---- named barriers: bar.sync / bar.arrive on barrier `id` (1..15; 0 is __syncthreads') for
// `threads` threads (a multiple of 32; every warp of them arrives once per use).
__device__ __forceinline__ void named_barrier_sync(u32 id, u32 threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void named_barrier_arrive(u32 id, u32 threads) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory"); }

// ---- mbarrier ----------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(u64* bar, u32 count) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory"); }
// Makes the inits visible to the other threads and to the async proxy (TMA) before first use; it
// is release at cluster scope, so followed by a cluster barrier (instead of __syncthreads) it also
// covers the other CTAs' remote arrivals and multicast copies on these mbarriers.
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbarrier_arrive(u64* bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory"); }
// One arrival that also announces `bytes` of transactions (the TMA copies of this phase).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// Whether the phase of parity `parity` has completed (does not block for long: a hint).
__device__ __forceinline__ bool mbarrier_try_wait(u64* bar, u32 parity) {
    u32 done;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }" : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
    return done != 0;
}
// Returns once the phase of parity `parity` has completed. Bounded: a phase that never completes
// (a bug, or hardware behaviour the emulator does not model) traps after 2^22 tries, a launch
// error within seconds, instead of hanging the GPU and the benchmark session; the bound costs only
// in the spin. The trap is a call: inlined into a setmaxnreg kernel, ptxas allocates the whole
// kernel within the registers a thread has at launch (setmaxnreg's larger budget unused: spills
// and serialized wgmmas, C7512).
__device__ __noinline__ void mbarrier_stuck() { __trap(); }
__device__ __forceinline__ void mbarrier_wait(u64* bar, u32 parity) {
    for (u32 tries = 0; !mbarrier_try_wait(bar, parity); ++tries) {
        if (tries == (1u << 22)) mbarrier_stuck();
    }
}
// One arrival on the mbarrier at bar's offset in the shared memory of cluster CTA `rank` (this
// CTA's own for its own rank): mapa, then mbarrier.arrive.shared::cluster with the default
// semantics (release, CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id). An explicit
// .release.cluster makes ptxas put a MEMBAR.ALL.GPU before the arrive, which waits for the warp's
// outstanding global stores (the previous tile's epilogue) every k-tile; the consumers only need
// their wgmmas' reads of the stage complete (wgmma_wait) before the peer's TMA refills it, and
// nothing of theirs is written to it. The barrier's init must be visible cluster-wide
// (fence_mbarrier_init, then a cluster barrier), and CTA `rank` must not have exited (a cluster
// barrier at the end of the kernel).
__device__ __forceinline__ void mbarrier_arrive_cluster(u64* bar, u32 rank) {
    asm volatile("{ .reg .b32 remote; mapa.shared::cluster.u32 remote, %0, %1; mbarrier.arrive.shared::cluster.b64 _, [remote]; }" ::"r"(smem_u32(bar)), "r"(rank) : "memory");
}
// An arrival on `bar` once every cp.async this thread issued before has landed (noinc: it is one
// of the `count` arrivals the barrier expects), for cp.async producers without TMA.
__device__ __forceinline__ void cp_async_mbarrier_arrive(u64* bar) { asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar)) : "memory"); }

// ---- TMA ---------------------------------------------------------------------------------------
__device__ __forceinline__ void tma_prefetch_descriptor(const TensorMap* map) { asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<u64>(map)) : "memory"); }
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int x, int y, u64* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_u32(dst)), "l"(reinterpret_cast<u64>(map)), "r"(x),
                 "r"(y), "r"(smem_u32(bar))
                 : "memory");
}
// The rank-4 form (a rank-4 map): the box at (x inner, y, z, w), e.g. a [B, H, L, D] view's tile
// of rows y.. of head z of batch entry w, zero-filled past L whatever the memory holds after it.
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap* map, int x, int y, int z, int w, u64* bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(smem_u32(dst)), "l"(reinterpret_cast<u64>(map)),
                 "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_u32(bar))
                 : "memory");
}
// The same box multicast to every CTA of the cluster named in `mask` (bit r: cluster rank r): it
// lands at dst's offset in each of their shared memories and completes box bytes on the mbarrier at
// bar's offset in each (each destination CTA's expect_tx counts the bytes it receives). The
// destinations' mbarriers must be visible cluster-wide first (fence_mbarrier_init, then a cluster
// barrier), and a destination CTA must not exit before the copy has landed.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TensorMap* map, int x, int y, u64* bar, u16 mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_u32(dst)),
                 "l"(reinterpret_cast<u64>(map)), "r"(smem_u32(bar)), "r"(x), "r"(y), "h"(mask)
                 : "memory");
}
// Shared -> global: the box at (x, y) from `src` (written by this CTA's threads: fence_proxy_async
// first); completes in bulk groups like cp.async's: commit, then wait until at most N groups are
// still reading shared memory (the source may be overwritten after that).
__device__ __forceinline__ void tma_store_2d(const TensorMap* map, int x, int y, const void* src) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(reinterpret_cast<u64>(map)), "r"(x), "r"(y), "r"(smem_u32(src)) : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void tma_store_wait() { asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory"); }

// ---- register reallocation: a warpgroup gives registers up (producer) or takes them (consumers);
// every warp of the warpgroup executes it. N: 24..256, a multiple of 8.
template <u32 N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }
template <u32 N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }

#endif  // !LOOKAHEAD_EMULATE && LA_WGMMA
