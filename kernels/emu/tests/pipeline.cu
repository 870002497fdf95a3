// Test kernels of the emulator's pipeline support (pipeline.cuh): mbarrier rings between a
// producer warp and consumer warps (plain stores, cp.async with cp_async_mbarrier_arrive),
// named-barrier ping-pong between two warpgroups, setmaxnreg, and the errors: deadlocks naming the
// barrier, use before init (or before the __syncthreads after it), re-init while in use, an
// arrival beyond the count, named-barrier count mismatches, a warp split over two named barriers,
// inconsistent setmaxnreg. Checked by
// tests/cuda_emulation.rs; compiled for sm_80 (empty) and sm_90a by tests/cuda_compile.rs.
#include "common.cuh"
#include "mma.cuh"
#include "pipeline.cuh"

#if LA_WGMMA

constexpr int RING_STAGES = 2;
constexpr int RING_WIDTH = 128;  // ints per stage: one per consumer thread

// Warp 0 produces `iters` rows of RING_WIDTH ints (row i from src + i * RING_WIDTH) into a ring of
// RING_STAGES stages; warps 1..4 (128 threads) consume them: out[t] = sum over rows of row[t].
// full[s]: 32 arrivals (the producer's lanes) per fill; empty[s]: 128 (the consumers) per drain.
// mode 0: plain stores then mbarrier_arrive; 1: cp_async_16 then cp_async_mbarrier_arrive;
// 2: as 0 without the producer's wait on `empty` (a race: a stage is refilled while read).
extern "C" __global__ void mbar_ring(const int* src, int* out, int iters, int mode) {
    __shared__ __align__(16) int ring[RING_STAGES][RING_WIDTH];
    __shared__ u64 full[RING_STAGES], empty[RING_STAGES];
    const int t = threadIdx.x;
    if (t == 0) {
        for (int s = 0; s < RING_STAGES; ++s) {
            mbarrier_init(&full[s], 32);
            mbarrier_init(&empty[s], 128);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    if (t < 32) {
        for (int i = 0; i < iters; ++i) {
            const int s = i % RING_STAGES;
            const u32 parity = (u32)(i / RING_STAGES) & 1u;
            // The first pass over the ring waits for parity 1: the phase "before" phase 0, complete.
            if (mode != 2) mbarrier_wait(&empty[s], parity ^ 1u);
            if (mode == 1) {
                cp_async_16(&ring[s][4 * t], src + (size_t)i * RING_WIDTH + 4 * t, true);
                cp_async_mbarrier_arrive(&full[s]);
            } else {
                for (int k = 0; k < 4; ++k) ring[s][4 * t + k] = src[(size_t)i * RING_WIDTH + 4 * t + k];
                mbarrier_arrive(&full[s]);
            }
        }
    } else if (t < 32 + RING_WIDTH) {
        const int c = t - 32;
        int acc = 0;
        for (int i = 0; i < iters; ++i) {
            const int s = i % RING_STAGES;
            mbarrier_wait(&full[s], (u32)(i / RING_STAGES) & 1u);
            acc += ring[s][c];
            mbarrier_arrive(&empty[s]);
        }
        out[c] = acc;
    }
}

// Two warpgroups take turns (named barrier 1: warpgroup 0's turn is over; 2: warpgroup 1's):
// thread 0 of the warpgroup whose turn it is appends its number to a log; out = the log.
extern "C" __global__ void __launch_bounds__(256, 1) named_ping_pong(int* out, int iters) {
    __shared__ int log[64];
    __shared__ int pos;
    const int t = threadIdx.x, wg = t / 128;
    setmaxnreg_dec<40>();  // no-op in the emulator; a warpgroup collective
    if (t == 0) pos = 0;
    __syncthreads();
    for (int k = 0; k < iters; ++k) {
        if (wg == 1) named_barrier_sync(1, 256);
        else if (k > 0) named_barrier_sync(2, 256);
        if (t % 128 == 0) log[pos++] = wg;
        if (wg == 0) named_barrier_arrive(1, 256);
        else named_barrier_arrive(2, 256);
    }
    __syncthreads();
    if (t < 2 * iters) out[t] = log[t];
}

// ---- errors ------------------------------------------------------------------------------------

// count 2, one arrival: every thread waits for phase 0 forever.
extern "C" __global__ void mbar_deadlock(int* out) {
    __shared__ u64 bar;
    if (threadIdx.x == 0) mbarrier_init(&bar, 2);
    __syncthreads();
    if (threadIdx.x == 0) mbarrier_arrive(&bar);
    mbarrier_wait(&bar, 0);
    out[threadIdx.x] = 1;
}

// Warp 0 waits at named barrier 1 for 64 threads; warp 1 never comes.
extern "C" __global__ void named_deadlock(int* out) {
    if (threadIdx.x < 32) named_barrier_sync(1, 64);
    out[threadIdx.x] = 1;
}

extern "C" __global__ void mbar_before_init(int* out) {
    __shared__ u64 bar;
    mbarrier_arrive(&bar);
    out[threadIdx.x] = 1;
}

extern "C" __global__ void mbar_reinit_in_use(int* out) {
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 2);
        mbarrier_arrive(&bar);
        mbarrier_init(&bar, 2);
    }
    out[threadIdx.x] = 1;
}

// arrive.expect_tx keeps the phase open (64 bytes pending) after its one arrival; a second
// arrival is beyond the count.
extern "C" __global__ void mbar_arrive_beyond_count(int* out) {
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 1);
        mbarrier_arrive_expect_tx(&bar, 64);
        mbarrier_arrive(&bar);
    }
    out[threadIdx.x] = 1;
}

// Warp 0 arrives for 64 threads, warp 1 syncs for 96.
extern "C" __global__ void named_count_mismatch(int* out) {
    if (threadIdx.x < 32) named_barrier_arrive(1, 64);
    else named_barrier_sync(1, 96);
    out[threadIdx.x] = 1;
}

// Half a warp at one named barrier, the other half at another call site.
extern "C" __global__ void named_split_warp(int* out) {
    if (threadIdx.x % 32 < 16) named_barrier_sync(1, 32);
    else named_barrier_sync(1, 32);
    out[threadIdx.x] = 1;
}

// Warps 0-1 of the warpgroup lower their registers to 40, warps 2-3 to 32.
extern "C" __global__ void __launch_bounds__(128, 1) setmaxnreg_mismatch(int* out) {
    if (threadIdx.x < 64) setmaxnreg_dec<40>();
    else setmaxnreg_dec<32>();
    out[threadIdx.x] = 1;
}

// Thread 0 initialises the mbarrier, then every thread arrives without a __syncthreads between.
extern "C" __global__ void mbar_no_sync_after_init(int* out) {
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 64);
        fence_mbarrier_init();
    }
    mbarrier_arrive(&bar);
    out[threadIdx.x] = 1;
}
#endif
