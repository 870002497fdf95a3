// Thread-block clusters under the emulator (cluster.cuh): per-CTA static and dynamic shared
// memory, cluster_rank, the split arrive / wait barrier and reads of other CTAs' shared memory.
#include "cluster.cuh"

// Every CTA sums its threads' x into a static shared slot (and the same partial into a dynamic
// shared slot); the cluster barrier publishes the slots; every thread then adds up all `cs` CTAs'
// slots (distributed shared memory): out[g] = the cluster's total from the static slots (rank
// order), out2[g] = from the dynamic slots (reverse rank order), g the thread's global index
// (block-major, block = blockIdx.y * gridDim.x + blockIdx.x). ranks[block] = cluster_rank().
// `barrier` 0 leaves out the cluster barrier before the remote reads (a race that must show).
// Each CTA arrives again after its reads and waits before exiting (its shared memory must
// outlive the other CTAs' reads). Launch: clusters of cs CTAs, block (nt, 1, 1) with nt a
// multiple of 32, 4 bytes of dynamic shared memory.
extern "C" __global__ void cluster_sum(const float* x, float* out, float* out2, unsigned* ranks, unsigned cs, int barrier) {
    __shared__ float part[32];
    __shared__ float total;
    LA_DYNAMIC_SHARED(float, dyn);
    const unsigned nt = blockDim.x, t = threadIdx.x;
    const unsigned block = blockIdx.y * gridDim.x + blockIdx.x, g = block * nt + t;
    float v = x[g];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((t & 31) == 0) part[t >> 5] = v;
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < nt / 32; ++w) s += part[w];
        total = s;
        dyn[0] = s;
        ranks[block] = cluster_rank();
    }
    if (barrier) {
        cluster_arrive();
        cluster_wait();
    } else {
        __syncthreads();
    }
    float a = 0.0f, b = 0.0f;
    for (unsigned r = 0; r < cs; ++r) a += cluster_load_remote(&total, r);
    for (unsigned r = cs; r-- > 0;) b += cluster_load_remote(dyn, r);
    cluster_arrive();
    out[g] = a;  // work between arrive and wait
    out2[g] = b;
    cluster_wait();
}

// Threads 0-31 of CTA 0 wait at the cluster barrier, its threads 32.. at a block barrier: neither
// can complete (a deadlock the emulator must report). Launch: clusters of 2 CTAs of 64 threads.
extern "C" __global__ void cluster_deadlock(int* out) {
    if (cluster_rank() == 0 && threadIdx.x >= 32) {
        __syncthreads();
    } else {
        cluster_arrive();
        cluster_wait();
    }
    out[threadIdx.x] = 1;
}
