// Row reductions over contiguous rows (the engine permutes the reduced dims last and copies when
// they are not already): sum / mean / var (f32 accumulation) and max / min / argmax (every dtype).
// The math is the CPU reference's (engine/src/ops/reduce.rs); the CPU accumulates in f64, so sums
// agree to f32 rounding. Launch contract (engine/src/cuda/reduce.rs):
// - `tpr` threads share a row: tpr = 32 (a warp per row, blocks of RED_BLOCK threads = 8 rows,
//   grid.x = ceil(rows / 8)) for short rows, or tpr = RED_BLOCK (a block per row, grid.x = rows).
// - sum_rows: grid.y = chunks splits long rows across blocks (only with tpr = RED_BLOCK); chunk c
//   covers columns [c * chunk_len, (c + 1) * chunk_len), chunk_len a multiple of 8. With one chunk
//   the kernel writes the result; with several it writes (s1, s2) partials that sum_finalize adds
//   in chunk order (deterministic, no atomics).
#include "warp_reduce.cuh"

#define RED_BLOCK 256

// op: 0 sum, 1 mean, 2 var. s1/s2 are sums of d and d^2 with d = x - shift (the row's first
// element for var, so that a large common offset does not eat the variance; 0 otherwise).
__device__ __forceinline__ float finish(float s1, float s2, float n, int op, float correction) {
    if (op == 0) return s1;
    if (op == 1) return s1 / n;
    float m2 = s2 - s1 * (s1 / n);
    if (m2 < 0.0f) m2 = 0.0f;  // rounding; NaN stays NaN
    return m2 / (n - correction);
}

template <typename T>
__device__ __forceinline__ void sum_rows(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ part, u32 rows, u64 cols, u32 tpr,
                                         u64 chunk_len, int op, float correction) {
    __shared__ float sm[32];
    constexpr int V = 16 / sizeof(T);
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    // In warp mode a whole warp shares `row`, so a warp past the end can leave (no block syncs).
    if (row >= rows) return;
    const T* xr = x + (u64)row * cols;
    const float shift = op == 2 ? to_f32(xr[0]) : 0.0f;
    const u64 start = (u64)blockIdx.y * chunk_len;
    const u64 end = min(cols, start + chunk_len);
    float s1 = 0.0f, s2 = 0.0f;
    if (cols % V == 0 && (u64)x % 16 == 0) {
        for (u64 i = start + (u64)t * V; i < end; i += (u64)tpr * V) {
            const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(xr + i);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float d = to_f32(p.v[k]) - shift;
                s1 += d;
                s2 += d * d;
            }
        }
    } else {
        for (u64 i = start + t; i < end; i += tpr) {
            const float d = to_f32(xr[i]) - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    s1 = row_sum(s1, tpr, sm);
    s2 = row_sum(s2, tpr, sm);
    if (t != 0) return;
    if (gridDim.y > 1) {
        const u64 o = ((u64)row * gridDim.y + blockIdx.y) * 2;
        part[o] = s1;
        part[o + 1] = s2;
    } else {
        y[row] = from_f32<T>(finish(s1, s2, (float)cols, op, correction));
    }
}

// One thread per row adds the row's `chunks` partials in order. Blocks of RED_BLOCK threads.
template <typename T>
__device__ __forceinline__ void sum_finalize(const float* __restrict__ part, T* __restrict__ y, u32 rows, u64 cols, u32 chunks, int op, float correction) {
    const u32 row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float s1 = 0.0f, s2 = 0.0f;
    for (u32 c = 0; c < chunks; ++c) {
        s1 += part[((u64)row * chunks + c) * 2];
        s2 += part[((u64)row * chunks + c) * 2 + 1];
    }
    y[row] = from_f32<T>(finish(s1, s2, (float)cols, op, correction));
}

#define SUM_KERNELS(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(RED_BLOCK)                                           \
        sum_rows_##NAME(const T* x, T* y, float* part, u32 rows, u64 cols, u32 tpr, u64 chunk_len, int op, float correction) { \
        sum_rows<T>(x, y, part, rows, cols, tpr, chunk_len, op, correction);                          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(RED_BLOCK)                                           \
        sum_finalize_##NAME(const float* part, T* y, u32 rows, u64 cols, u32 chunks, int op, float correction) { \
        sum_finalize<T>(part, y, rows, cols, chunks, op, correction);                                 \
    }
SUM_KERNELS(f32, float)
SUM_KERNELS(bf16, bf16)
SUM_KERNELS(f16, f16)

// ---- max / min / argmax ------------------------------------------------------------------------
// The CPU's rule: the first NaN wins; otherwise the largest (smallest) value, the first on ties.
// As a merge of (key, index) candidates this is associative, so any tree order gives the CPU's
// answer. Keys: f32 for the float dtypes (exact), i64, and int for u8.
#define NO_INDEX 0xffffffffu

__device__ __forceinline__ float ext_key(float v) { return v; }
__device__ __forceinline__ float ext_key(bf16 v) { return to_f32(v); }
__device__ __forceinline__ float ext_key(f16 v) { return to_f32(v); }
__device__ __forceinline__ long long ext_key(i64 v) { return v; }
__device__ __forceinline__ int ext_key(u8 v) { return v; }

template <typename K> __device__ __forceinline__ bool beats(K a, u32 ia, K b, u32 ib, int want_max) {
    if (ib == NO_INDEX) return ia != NO_INDEX;
    if (ia == NO_INDEX) return false;
    const bool na = a != a, nb = b != b;
    if (na || nb) return na && (!nb || ia < ib);
    if (a == b) return ia < ib;
    return want_max ? a > b : a < b;
}

template <typename K> __device__ __forceinline__ void warp_best(K& key, u32& idx, int want_max) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const K k2 = __shfl_xor_sync(0xffffffffu, key, o);
        const u32 i2 = __shfl_xor_sync(0xffffffffu, idx, o);
        if (beats(k2, i2, key, idx, want_max)) {
            key = k2;
            idx = i2;
        }
    }
}

// vals[row] = the winning element (its stored bits), idx[row] = its index.
template <typename T>
__device__ __forceinline__ void extreme_rows(const T* __restrict__ x, T* __restrict__ vals, i64* __restrict__ idx, u32 rows, u32 cols, u32 tpr, int want_max) {
    typedef decltype(ext_key(x[0])) K;
    __shared__ K skey[32];
    __shared__ u32 sidx[32];
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    if (row >= rows) return;  // warp mode only (see sum_rows)
    const T* xr = x + (u64)row * cols;
    K key = ext_key(xr[0]);
    u32 bi = NO_INDEX;
    for (u32 i = t; i < cols; i += tpr) {
        const K k = ext_key(xr[i]);
        if (beats(k, i, key, bi, want_max)) {
            key = k;
            bi = i;
        }
    }
    warp_best(key, bi, want_max);
    if (tpr != 32) {
        const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) {
            skey[warp] = key;
            sidx[warp] = bi;
        }
        __syncthreads();
        if (warp == 0) {
            const bool has = lane < (blockDim.x >> 5);
            key = has ? skey[lane] : key;
            bi = has ? sidx[lane] : NO_INDEX;
            warp_best(key, bi, want_max);
        }
        if (warp != 0) return;
    }
    if (t == 0) {
        vals[row] = xr[bi];
        idx[row] = (i64)bi;
    }
}

#define EXTREME_KERNEL(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(RED_BLOCK)                                           \
        extreme_rows_##NAME(const T* x, T* vals, i64* idx, u32 rows, u32 cols, u32 tpr, int want_max) { \
        extreme_rows<T>(x, vals, idx, rows, cols, tpr, want_max);                                     \
    }
EXTREME_KERNEL(f32, float)
EXTREME_KERNEL(bf16, bf16)
EXTREME_KERNEL(f16, f16)
EXTREME_KERNEL(i64, i64)
EXTREME_KERNEL(u8, u8)
