// Single-pass group norm (+SiLU) forward for sm_90 and newer: one thread-block CLUSTER per
// (sample, group) of an NCHW-contiguous input. Each CTA of the cluster loads its share of the
// group (16-byte packs) into registers once; the group's mean and then the mean of squared
// deviations from it (two-pass over registers, as the CPU reference's multi-pass statistics) are
// summed per CTA (the first pass shifted by the group's first element) and combined across the cluster through distributed shared memory; then each
// thread normalizes its registers and stores. One launch and one read of x, against the
// statistics -> finalize -> apply path of norm.cu (three launches, two reads of x), which stays
// the fallback (other archs, channels-last, groups too large for the cluster's registers).
//
// Launch (engine/src/cuda/norm.rs, gn_cluster_plan): grid.x = N*G*cs CTAs of GNC_BLOCK threads,
// cluster dims (cs, 1, 1), cs <= 16 (16 needs the non-portable cluster size attribute). CTA
// `rank` of cluster q = (n G + g) owns packs rank * GNC_BLOCK + tid + k * cs * GNC_BLOCK, k < P.
// Host guarantees: HW % V == 0 (a pack stays in one channel), x and y 16-byte aligned,
// cpg * HW / V <= cs * GNC_BLOCK * P, N * C * HW < 2^32. Weight / bias: f32 per channel or null.
#include "warp_reduce.cuh"
#include "cluster.cuh"

#define GNC_BLOCK 256

#if __CUDA_ARCH__ >= 900 || defined(LOOKAHEAD_EMULATE)
// Sum of `v` over every thread of the cluster's `cs` CTAs (all threads call; all get the same
// total: CTA partials are added in rank order everywhere). `slot` is this sum's own shared
// float (not reused by a later sum of the same launch), `red` a float per warp.
__device__ __forceinline__ float gnc_cluster_sum(float v, float* red, float* slot, u32 cs) {
    v = warp_sum(v);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
#pragma unroll
        for (int i = 0; i < GNC_BLOCK / 32; ++i) t += red[i];
        *slot = t;
    }
    cluster_arrive();
    cluster_wait();
    float tot = 0.0f;
    for (u32 r = 0; r < cs; ++r) tot += cluster_load_remote(slot, r);
    return tot;
}
#endif

template <typename T, int P>
__device__ __forceinline__ void gn_cluster(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b, u32 C, u32 HW, u32 G,
                                           u32 cs, float eps, int act) {
#if __CUDA_ARCH__ >= 900 || defined(LOOKAHEAD_EMULATE)
    constexpr int V = 16 / sizeof(T);
    __shared__ float red[GNC_BLOCK / 32];
    __shared__ float slots[2];
    const u32 rank = cluster_rank();
    const u32 q = blockIdx.x / cs, g = q % G, cpg = C / G;
    const u32 M = cpg * HW, packs = M / V;
    const u64 base = (u64)q * M;  // (n C + g cpg) HW: groups are consecutive blocks of M elements
    const Pack<T, V>* xp = reinterpret_cast<const Pack<T, V>*>(x + base);
    Pack<T, V>* yp = reinterpret_cast<Pack<T, V>*>(y + base);
    const u32 first = rank * GNC_BLOCK + threadIdx.x, stride = cs * GNC_BLOCK;
    Pack<T, V> r[P];
    // All P loads issued before the first use.
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const u32 i = first + k * stride;
        if (i < packs) r[k] = xp[i];
    }
    // Pass 1 sums x - K with K the group's first element, so that a large common offset does not
    // eat the f32 sum's precision.
    const float K = to_f32(x[base]);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        if (first + k * stride < packs) {
#pragma unroll
            for (int j = 0; j < V; ++j) s += to_f32(r[k].v[j]) - K;
        }
    }
    const float mean = K + gnc_cluster_sum(s, red, &slots[0], cs) / (float)M;
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        if (first + k * stride < packs) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float d = to_f32(r[k].v[j]) - mean;
                ss += d * d;
            }
        }
    }
    const float var = gnc_cluster_sum(ss, red, &slots[1], cs) / (float)M;
    // This CTA's reads of the other CTAs' slots are done: arrive now, wait before exiting (a CTA's
    // shared memory must outlive the other CTAs' reads of it).
    cluster_arrive();
    const float rstd = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const u32 i = first + k * stride;
        if (i < packs) {
            const u32 c = g * cpg + (i * V) / HW;
            const float sc = rstd * (w ? __ldg(w + c) : 1.0f), sh = b ? __ldg(b + c) : 0.0f;
            Pack<T, V> o;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float v = (to_f32(r[k].v[j]) - mean) * sc + sh;
                if (act) v = sizeof(T) == 2 ? v * (1.0f / (1.0f + __expf(-v))) : v * (1.0f / (1.0f + expf(-v)));
                o.v[j] = from_f32<T>(v);
            }
            yp[i] = o;
        }
    }
    cluster_wait();
#endif
}

#define GNC_KERNEL(T, NAME, P)                                                                                                \
    extern "C" __global__ void __launch_bounds__(GNC_BLOCK)                                                                   \
        gn_cluster_##NAME##_p##P(const T* x, T* y, const float* w, const float* b, u32 C, u32 HW, u32 G, u32 cs, float eps, int act) { \
        gn_cluster<T, P>(x, y, w, b, C, HW, G, cs, eps, act);                                                                 \
    }
#define GNC_KERNELS(T, NAME) GNC_KERNEL(T, NAME, 2) GNC_KERNEL(T, NAME, 4) GNC_KERNEL(T, NAME, 8) GNC_KERNEL(T, NAME, 12) GNC_KERNEL(T, NAME, 16)
GNC_KERNELS(float, f32)
GNC_KERNELS(bf16, bf16)
GNC_KERNELS(f16, f16)
