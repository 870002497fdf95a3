// Single-pass group norm (+SiLU) forward for sm_90 and newer: one thread-block CLUSTER per
// (sample, group) of an NCHW-contiguous input. Each CTA of the cluster loads its share of the
// group (16-byte packs) into registers once; the group's mean and then the mean of squared
// deviations from it (two-pass over registers, as the CPU reference's multi-pass statistics) are
// summed per CTA (the first pass shifted by the group's first element) and combined across the cluster through distributed shared memory; then each
// thread normalizes its registers and stores. One launch and one read of x, against the
// statistics -> finalize -> apply path of norm.cu (three launches, two reads of x), which stays
// the fallback (other archs, channels-last, groups too large for the cluster's registers).
//
// Variants (LOOKAHEAD_VARIANT_GROUP_NORM, engine/src/cuda/norm.rs GnVariant): auto (default,
// per-shape rule there), two-phase (norm.cu only), cluster-regs (the register kernels below,
// forward and backward), cluster-smem (gn_cluster_smem_DT: the forward with the group in shared
// memory, loads staged through registers four at a time), cluster-smem-async
// (gn_cluster_smem_async_DT: the same with cp.async, every pack requested at once), grid
// (channels-last inputs: norm.cu's gn_grid_nhwc_DT / gn_grid_bwd_nhwc_DT, one cooperative launch
// holding x (and dy) in the shared memory of blocks resident on every SM; not yet run on a GPU).
// The cluster shared-memory variants have no backward: the backward runs as under auto.
// Measured (H200, bf16, ms; (2,320,128,128) / (2,640,64,64) / (2,1280,32,32), G = 32): forward
// two-phase 0.032 / 0.021 / 0.018, cluster-regs 0.037 / 0.020 / 0.015, cluster-smem 0.029 /
// 0.018 / 0.014, cluster-smem-async 0.030 / 0.019 / 0.014. The register kernel loses on the
// 320 KB groups because P = 12 packs cost 105 registers (2 CTAs an SM): its 512 CTAs run in two
// waves, each loading, waiting at two cluster barriers and storing with nothing overlapping.
// The shared-memory kernel (32 registers, 40 KB a CTA) holds the whole tensor in one wave.
//
// Saved statistics: every forward here takes `stats` (f32 [N, G, 2], (mean, rstd) per (sample,
// group), or null). Training asks for them (Tensor::group_norm_stats, the autograd op), as
// PyTorch's native_group_norm saves mean and rstd, so that the backward needs no statistics of
// its own: they cost the backward a cluster round each (two barriers) here, and the two-phase
// backward a whole extra read of x; writing them costs the forward two floats a group, from one
// thread a cluster. Inference passes null and writes nothing.
//
// Launch (engine/src/cuda/norm.rs, gn_cluster_plan): grid.x = N*G*cs CTAs of GNC_BLOCK threads,
// cluster dims (cs, 1, 1), cs <= 16 (16 needs the non-portable cluster size attribute). CTA
// `rank` of cluster q = (n G + g) owns packs rank * GNC_BLOCK + tid + k * cs * GNC_BLOCK, k < P.
// Host guarantees: HW % V == 0 (a pack stays in one channel), x and y 16-byte aligned,
// cpg * HW / V <= cs * GNC_BLOCK * P, N * C * HW < 2^32. Weight / bias: f32 per channel or null;
// stats 2 N G floats or null.
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

// The group's mean and variance from this thread's packs r[k] (pack index first + k stride, valid
// below `packs`) over the group's M elements: pass 1 sums x - K with K the group's first element,
// so that a large common offset does not eat the f32 sum's precision; pass 2 sums the squared
// deviations from the mean; each pass is combined over the cluster in slots[0] / slots[1]. The
// forward and the backward both call this, so they see the same statistics, term for term.
template <typename T, int V, int P>
__device__ __forceinline__ void gnc_group_stats(const Pack<T, V> (&r)[P], float K, u32 first, u32 stride, u32 packs, u32 M, float* red, float* slots, u32 cs,
                                                float& mean, float& var) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        if (first + k * stride < packs) {
#pragma unroll
            for (int j = 0; j < V; ++j) s += to_f32(r[k].v[j]) - K;
        }
    }
    mean = K + gnc_cluster_sum(s, red, &slots[0], cs) / (float)M;
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
    var = gnc_cluster_sum(ss, red, &slots[1], cs) / (float)M;
}

// The forward's (mean, rstd) of this cluster's (sample, group) q = blockIdx.x / cs into
// stats[2 q + {0, 1}] ([N, G, 2] f32) when the caller asked (training: the backward then skips
// its statistics): thread 0 of the cluster's first CTA writes (every CTA holds the same values).
// A null pointer (inference) costs a predicate. q is worked out again here rather than kept from
// the kernel's start: kept live next to the register kernel's packs, it cost p8 a spill.
__device__ __forceinline__ void gnc_save_stats(float* stats, u32 cs, float mean, float rstd) {
    if (stats != nullptr && threadIdx.x == 0 && blockIdx.x % cs == 0) {
        const u64 q = blockIdx.x / cs;
        stats[2 * q] = mean;
        stats[2 * q + 1] = rstd;
    }
}
#endif

template <typename T, int P>
__device__ __forceinline__ void gn_cluster(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b, float* __restrict__ stats,
                                           u32 C, u32 HW, u32 G, u32 cs, float eps, int act) {
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
    float mean, var;
    gnc_group_stats<T, V, P>(r, to_f32(x[base]), first, stride, packs, M, red, slots, cs, mean, var);
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
                if (act) v *= sigmoid_for<T>(v);
                o.v[j] = from_f32_arith<T>(v);
            }
            yp[i] = o;
        }
    }
    // After the y stores (here the p16 kernels spill no more than without it).
    gnc_save_stats(stats, cs, mean, rstd);
    cluster_wait();
#endif
}

#define GNC_KERNEL(T, NAME, P)                                                                                                \
    extern "C" __global__ void __launch_bounds__(GNC_BLOCK)                                                                   \
        gn_cluster_##NAME##_p##P(const T* x, T* y, const float* w, const float* b, float* stats, u32 C, u32 HW, u32 G, u32 cs, float eps, int act) { \
        gn_cluster<T, P>(x, y, w, b, stats, C, HW, G, cs, eps, act);                                                          \
    }
#define GNC_KERNELS(T, NAME) GNC_KERNEL(T, NAME, 2) GNC_KERNEL(T, NAME, 4) GNC_KERNEL(T, NAME, 8) GNC_KERNEL(T, NAME, 12) GNC_KERNEL(T, NAME, 16)
GNC_KERNELS(float, f32)
GNC_KERNELS(bf16, bf16)
GNC_KERNELS(f16, f16)

// ---- backward ---------------------------------------------------------------------------------
// Single-pass group norm (+SiLU) backward, same clusters as the forward: each CTA loads its packs
// of x and dy into registers once and takes the group's mean and rstd from `stats` (the forward's
// saved ones: the training path) or, when null, recomputes them with the forward's two cluster
// sums (bit-identical statistics, two more cluster rounds); then, with z = xhat w + b and
// dz = dy silu'(z) (SiLU fused) or dy, one cluster round sums dxhat = dz w and dxhat xhat over
// the group, and
// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) is written once: one read of x and dy,
// one write of dx, against five passes over the tensors in norm.cu's gn_bwd_* path.
// Parameter gradients (dw, db non-null, zeroed by the host): dw[c] = sum over (n, hw) of dz xhat,
// db[c] = sum of dz. A pack stays in one channel (HW % V == 0), so each thread's pack partials are
// summed per channel across the warp (a segmented shuffle sum: the warp's packs are consecutive),
// then per CTA in shared memory, then added to dw / db with f32 atomics: C * N * cs additions in
// all (each CTA adds once per channel of its group), negligible next to the tensor traffic; the
// order of those additions varies from run to run, so dw / db are not bit-reproducible (dx is).
// A runtime flag (null or not) rather than a second instance per P: the saved-statistics path
// only drops code, and the registers moved by a few either way (cuda_compile).
// Launch: as the forward (grid.x = N*G*cs CTAs of GNC_BLOCK threads, cluster dims (cs, 1, 1),
// the same pack ownership). Host guarantees: the forward's, dy and dx 16-byte aligned,
// C / G <= GNC_MAX_CPG (the per-CTA channel partials), stats 2 N G floats or null.
#define GNC_MAX_CPG 512

#if __CUDA_ARCH__ >= 900 || defined(LOOKAHEAD_EMULATE)
// Replaces `a` and `b` by their sums over every thread of the cluster, in one barrier round (as
// gnc_cluster_sum; `red` holds 2 floats per warp, `slot` 2 floats of this sum's own).
__device__ __forceinline__ void gnc_cluster_sum2(float& a, float& b, float* red, float* slot, u32 cs) {
    a = warp_sum(a);
    b = warp_sum(b);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        red[2 * warp] = a;
        red[2 * warp + 1] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float ta = 0.0f, tb = 0.0f;
#pragma unroll
        for (int i = 0; i < GNC_BLOCK / 32; ++i) {
            ta += red[2 * i];
            tb += red[2 * i + 1];
        }
        slot[0] = ta;
        slot[1] = tb;
    }
    cluster_arrive();
    cluster_wait();
    a = b = 0.0f;
    for (u32 r = 0; r < cs; ++r) {
        a += cluster_load_remote(slot, r);
        b += cluster_load_remote(slot + 1, r);
    }
}

// Adds this lane's (db, dw) partials of channel `cl` (local to the group; pack `i` of the group,
// channel packs [cl * ppc, (cl + 1) * ppc)) to the CTA's shared per-channel sums. The warp's 32
// packs are consecutive, so equal channels form runs: a segmented shuffle sum leaves each run's
// total in its first lane, which adds it. Lanes past the group's end carry zeros.
__device__ __forceinline__ void gnc_channel_add(float pb, float pw, u32 i, u32 cl, u32 ppc, float* pb_s, float* pw_s) {
    const u32 lane = threadIdx.x & 31, end = (cl + 1) * ppc;
#pragma unroll
    for (u32 off = 1; off < 32; off <<= 1) {
        const float tb = __shfl_down_sync(0xffffffffu, pb, off), tw = __shfl_down_sync(0xffffffffu, pw, off);
        if (lane + off < 32 && i + off < end) {
            pb += tb;
            pw += tw;
        }
    }
    if ((lane == 0 || i == cl * ppc) && cl < GNC_MAX_CPG) {
        atomicAdd(pb_s + cl, pb);
        atomicAdd(pw_s + cl, pw);
    }
}

// silu'(z) = s (1 + z (1 - s)), s = sigmoid(z), with the forward's exp (fast for 16-bit data).
template <typename T>
__device__ __forceinline__ float gnc_dsilu(float z) {
    const float s = sigmoid_for<T>(z);
    return s * (1.0f + z * (1.0f - s));
}
#endif

template <typename T, int P>
__device__ __forceinline__ void gn_cluster_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, const float* __restrict__ w, const float* __restrict__ b,
                                               const float* __restrict__ stats, float* __restrict__ dw, float* __restrict__ db, u32 C, u32 HW, u32 G, u32 cs, float eps,
                                               int act) {
#if __CUDA_ARCH__ >= 900 || defined(LOOKAHEAD_EMULATE)
    constexpr int V = 16 / sizeof(T);
    __shared__ float red[2 * (GNC_BLOCK / 32)];
    __shared__ float slots[4];
    __shared__ float pb_s[GNC_MAX_CPG], pw_s[GNC_MAX_CPG];
    const u32 rank = cluster_rank();
    const u32 q = blockIdx.x / cs, g = q % G, cpg = C / G;
    const u32 M = cpg * HW, packs = M / V, ppc = HW / V;
    const u64 base = (u64)q * M;
    const Pack<T, V>* xp = reinterpret_cast<const Pack<T, V>*>(x + base);
    const Pack<T, V>* dyp = reinterpret_cast<const Pack<T, V>*>(dy + base);
    Pack<T, V>* dxp = reinterpret_cast<Pack<T, V>*>(dx + base);
    const u32 first = rank * GNC_BLOCK + threadIdx.x, stride = cs * GNC_BLOCK;
    const bool params = dw != nullptr;
    // Zeroed before the cluster sums' block barriers (or the saved-statistics path's own), used after them.
    if (params)
        for (u32 t = threadIdx.x; t < cpg; t += GNC_BLOCK) pb_s[t] = pw_s[t] = 0.0f;
    Pack<T, V> rx[P], rd[P];
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const u32 i = first + k * stride;
        if (i < packs) {
            rx[k] = xp[i];
            rd[k] = dyp[i];
        }
    }
    float mean, rstd;
    if (stats == nullptr) {
        // The forward's statistics, term for term (two cluster rounds).
        float var;
        gnc_group_stats<T, V, P>(rx, to_f32(x[base]), first, stride, packs, M, red, slots, cs, mean, var);
        rstd = 1.0f / sqrtf(var + eps);
    } else {
        mean = __ldg(stats + 2 * (u64)q);
        rstd = __ldg(stats + 2 * (u64)q + 1);
        // No statistic sums, so no block barrier yet between the zeroing and gnc_channel_add.
        if (params) __syncthreads();
    }
    // Sums of dxhat = dz w and dxhat xhat; per-channel sums of dz and dz xhat for dw / db.
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const u32 i = first + k * stride;
        const bool in = i < packs;
        const u32 cl = in ? i / ppc : GNC_MAX_CPG;
        float pb = 0.0f, pw = 0.0f;
        if (in) {
            const float wc = w ? __ldg(w + g * cpg + cl) : 1.0f, bc = b ? __ldg(b + g * cpg + cl) : 0.0f;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float xh = (to_f32(rx[k].v[j]) - mean) * rstd;
                float dz = to_f32(rd[k].v[j]);
                if (act) dz *= gnc_dsilu<T>(xh * wc + bc);
                pb += dz;
                pw += dz * xh;
            }
            sg += pb * wc;
            sgx += pw * wc;
        }
        if (params) gnc_channel_add(pb, pw, i, cl, ppc, pb_s, pw_s);
    }
    gnc_cluster_sum2(sg, sgx, red, &slots[2], cs);
    // This CTA's reads of the other CTAs' slots are done: arrive now, wait before exiting.
    cluster_arrive();
    const float mg = sg / (float)M, mgx = sgx / (float)M;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const u32 i = first + k * stride;
        if (i < packs) {
            const u32 cl = i / ppc;
            const float wc = w ? __ldg(w + g * cpg + cl) : 1.0f, bc = b ? __ldg(b + g * cpg + cl) : 0.0f;
            Pack<T, V> o;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float xh = (to_f32(rx[k].v[j]) - mean) * rstd;
                float dz = to_f32(rd[k].v[j]);
                if (act) dz *= gnc_dsilu<T>(xh * wc + bc);
                o.v[j] = from_f32_arith<T>(rstd * (dz * wc - mg - xh * mgx));
            }
            dxp[i] = o;
        }
    }
    // Every warp's channel adds came before gnc_cluster_sum2's block barrier.
    if (params) {
        for (u32 t = threadIdx.x; t < cpg; t += GNC_BLOCK) {
            atomicAdd(db + g * cpg + t, pb_s[t]);
            atomicAdd(dw + g * cpg + t, pw_s[t]);
        }
    }
    cluster_wait();
#endif
}

#define GNC_BWD_KERNEL(T, NAME, P)                                                                                                          \
    extern "C" __global__ void __launch_bounds__(GNC_BLOCK) gn_cluster_bwd_##NAME##_p##P(const T* x, const T* dy, T* dx, const float* w, const float* b,           \
                                                                                          const float* stats, float* dw, float* db, u32 C, u32 HW, u32 G, u32 cs, \
                                                                                          float eps, int act) {                                                  \
        gn_cluster_bwd<T, P>(x, dy, dx, w, b, stats, dw, db, C, HW, G, cs, eps, act);                                                                            \
    }
#define GNC_BWD_KERNELS(T, NAME) GNC_BWD_KERNEL(T, NAME, 2) GNC_BWD_KERNEL(T, NAME, 4) GNC_BWD_KERNEL(T, NAME, 8) GNC_BWD_KERNEL(T, NAME, 12) GNC_BWD_KERNEL(T, NAME, 16)
GNC_BWD_KERNELS(float, f32)
GNC_BWD_KERNELS(bf16, bf16)
GNC_BWD_KERNELS(f16, f16)

// ---- forward, group held in shared memory ----------------------------------------------------
// gn_cluster_smem_DT: the cluster forward with the CTA's share of the group in DYNAMIC SHARED
// MEMORY instead of registers. Why: the register kernel needs ~4 registers per element pack plus
// ~55 of overhead a thread (bf16 p12: 105 registers, 2 CTAs an SM), so a 20 MB tensor
// ((2,320,128,128) bf16: 64 groups of 320 KB) takes two or more waves of 8-CTA clusters, each
// wave loading, waiting at two cluster barriers and storing with nothing overlapping: 0.038 ms
// against 0.032 ms for the two-phase path. Shared memory (227 KB a CTA, 228 KB an SM) plus a
// 256-thread CTA of ~32 registers lets 4-5 CTAs of 40 KB share an SM, so the whole tensor is
// resident in one wave (132 SMs x 228 KB = 30 MB); each thread keeps four 16-byte loads in flight.
// CTA `rank` of cluster q = (n G + g) owns the contiguous packs [rank * per, min(packs, (rank+1) * per)).
// Launch: grid.x = N*G*cs, cluster (cs, 1, 1), GNC_BLOCK threads, per * 16 bytes of dynamic
// shared memory. Host guarantees: the register kernel's (HW % V == 0, 16-byte aligned x and y),
// cs * per >= packs.
// 16 bytes global -> shared without registers (cp.async; the emulator's model under
// LOOKAHEAD_EMULATE), and the wait for all of this thread's copies. Own names: mma.cuh's
// cp_async_16 is not included here.
#ifdef LOOKAHEAD_EMULATE
__device__ __forceinline__ void gnc_cp_async_16(void* dst, const void* src) { cp_async_16(dst, src, true); }
__device__ __forceinline__ void gnc_cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait<0>();
}
#elif __CUDA_ARCH__ >= 800
__device__ __forceinline__ void gnc_cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void gnc_cp_async_wait_all() { asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory"); }
#endif

template <typename T, bool ASYNC>
__device__ __forceinline__ void gn_cluster_smem(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b, float* __restrict__ stats,
                                                u32 C, u32 HW, u32 G, u32 cs, u32 per, float eps, int act) {
#if __CUDA_ARCH__ >= 900 || defined(LOOKAHEAD_EMULATE)
    constexpr int V = 16 / sizeof(T);
    __shared__ float red[GNC_BLOCK / 32];
    __shared__ float slots[2];
    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    Pack<T, V>* buf = reinterpret_cast<Pack<T, V>*>(smem_raw);
    const u32 rank = cluster_rank();
    const u32 q = blockIdx.x / cs, g = q % G, cpg = C / G;
    const u32 M = cpg * HW, packs = M / V;
    const u64 base = (u64)q * M;
    const u32 lo = min(packs, rank * per), hi = min(packs, lo + per), own = hi - lo;
    const Pack<T, V>* xp = reinterpret_cast<const Pack<T, V>*>(x + base) + lo;
    Pack<T, V>* yp = reinterpret_cast<Pack<T, V>*>(y + base) + lo;
    // Pass 1 (shifted sum) as the packs arrive; pass 2 (squared deviations from the cluster's
    // mean) from shared memory, as gnc_group_stats. Each thread reads back only the packs it
    // stored, in the order it stored them, so the sums are term for term those of two passes.
    const float K = to_f32(x[base]);
    float s = 0.0f;
    if (ASYNC) {
        // Every pack of the CTA's share requested at once (cp.async holds no registers).
        for (u32 i = threadIdx.x; i < own; i += GNC_BLOCK) gnc_cp_async_16(&buf[i], &xp[i]);
        gnc_cp_async_wait_all();
        for (u32 i = threadIdx.x; i < own; i += GNC_BLOCK) {
            const Pack<T, V> r = buf[i];
#pragma unroll
            for (int j = 0; j < V; ++j) s += to_f32(r.v[j]) - K;
        }
    } else {
        // Four 16-byte loads a thread in flight before their shared stores (4-5 CTAs of 256
        // threads an SM: 64-80 KB requested an SM at a time, more than the latency x bandwidth
        // product).
        for (u32 i0 = threadIdx.x; i0 < own; i0 += 4 * GNC_BLOCK) {
            Pack<T, V> r[4];
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (i0 + k * GNC_BLOCK < own) r[k] = xp[i0 + k * GNC_BLOCK];
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (i0 + k * GNC_BLOCK < own) {
                    buf[i0 + k * GNC_BLOCK] = r[k];
#pragma unroll
                    for (int j = 0; j < V; ++j) s += to_f32(r[k].v[j]) - K;
                }
        }
    }
    const float mean = K + gnc_cluster_sum(s, red, &slots[0], cs) / (float)M;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < own; i += GNC_BLOCK) {
        const Pack<T, V> r = buf[i];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float d = to_f32(r.v[j]) - mean;
            ss += d * d;
        }
    }
    const float var = gnc_cluster_sum(ss, red, &slots[1], cs) / (float)M;
    cluster_arrive();
    const float rstd = 1.0f / sqrtf(var + eps);
    gnc_save_stats(stats, cs, mean, rstd);
    for (u32 i = threadIdx.x; i < own; i += GNC_BLOCK) {
        const u32 c = g * cpg + ((lo + i) * V) / HW;
        const float sc = rstd * (w ? __ldg(w + c) : 1.0f), sh = b ? __ldg(b + c) : 0.0f;
        const Pack<T, V> r = buf[i];
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float v = (to_f32(r.v[j]) - mean) * sc + sh;
            if (act) v *= sigmoid_for<T>(v);
            o.v[j] = from_f32_arith<T>(v);
        }
        yp[i] = o;
    }
    cluster_wait();
#endif
}

#define GNC_SMEM_KERNEL(T, NAME)                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GNC_BLOCK) gn_cluster_smem_##NAME(const T* x, T* y, const float* w, const float* b, float* stats, u32 C, u32 HW, \
                                                                                    u32 G, u32 cs, u32 per, float eps, int act) {         \
        gn_cluster_smem<T, false>(x, y, w, b, stats, C, HW, G, cs, per, eps, act);                                                        \
    }                                                                                                                                     \
    extern "C" __global__ void __launch_bounds__(GNC_BLOCK) gn_cluster_smem_async_##NAME(const T* x, T* y, const float* w, const float* b, float* stats, u32 C, \
                                                                                          u32 HW, u32 G, u32 cs, u32 per, float eps, int act) { \
        gn_cluster_smem<T, true>(x, y, w, b, stats, C, HW, G, cs, per, eps, act);                                                         \
    }
GNC_SMEM_KERNEL(float, f32)
GNC_SMEM_KERNEL(bf16, bf16)
GNC_SMEM_KERNEL(f16, f16)
