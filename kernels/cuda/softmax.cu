// Softmax / log-softmax over contiguous rows (the engine moves the softmax dim last). The math is
// the CPU reference's (kernels/src/softmax.rs): shift by the row max (NaN ignored by the max, then
// propagated by exp), sum of exponentials (f32 here, f64 on the CPU), softmax = e * (1 / sum),
// log-softmax = (x - max) - log(sum); an all -inf row gives NaN, partly -inf rows exact zeros.
// Launch contract (engine/src/cuda/softmax.rs):
// - softmax_DT: the row is held in registers (SM_CACHE f32 values per thread), so it is read once
//   and written once. `tpr` threads share a row: 32 (a warp per row, blocks of 256 threads = 8 rows,
//   grid.x = ceil(rows / 8)) or a multiple of 32 up to 1024 (a block of tpr threads per row,
//   grid.x = rows); needs cols <= tpr * SM_CACHE. 16-byte packs when cols is a multiple of the pack
//   and both pointers are 16-byte aligned, else single elements (chosen inside, per launch).
// - softmax_long_DT: rows longer than 1024 * SM_CACHE; a block of 1024 threads per row, online
//   (max, sum) in one read, a second read to write.
#include "warp_reduce.cuh"

#define SM_CACHE 16
#define NEG_INF __int_as_float(0xff800000)
#define SM_MAX_BLOCK 1024

// Thread t of the row holds packs t, t + tpr, t + 2 tpr, ... (coalesced), P packs of V values.
template <typename T, int V>
__device__ __forceinline__ void softmax_cached(const T* __restrict__ xr, T* __restrict__ yr, u32 cols, u32 t, u32 tpr, int log_mode, float* sm) {
    constexpr int P = SM_CACHE / V;
    float v[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const u32 c = (p * tpr + t) * V;
        if (c < cols) {
            const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(xr + c);
#pragma unroll
            for (int k = 0; k < V; ++k) v[p][k] = to_f32(pk.v[k]);
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) v[p][k] = NEG_INF;
        }
    }
    float m = NEG_INF;
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
        for (int k = 0; k < V; ++k) m = fmaxf(m, v[p][k]);
    m = row_max(m, tpr, sm);
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        if ((p * tpr + t) * V < cols) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float e = expf(v[p][k] - m);
                s += e;
                if (!log_mode) v[p][k] = e;
            }
        }
    }
    s = row_sum(s, tpr, sm);
    const float a = log_mode ? logf(s) : 1.0f / s;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const u32 c = (p * tpr + t) * V;
        if (c < cols) {
            Pack<T, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) out.v[k] = from_f32_arith<T>(log_mode ? (v[p][k] - m) - a : v[p][k] * a);
            *reinterpret_cast<Pack<T, V>*>(yr + c) = out;
        }
    }
}

template <typename T>
__device__ __forceinline__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, u32 rows, u32 cols, u32 tpr, int log_mode) {
    __shared__ float sm[32];
    constexpr int V = 16 / sizeof(T);
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    // In warp mode a whole warp shares `row` and syncs nothing, so a warp past the end can leave;
    // in block mode grid.x = rows.
    if (row >= rows) return;
    const T* xr = x + (u64)row * cols;
    T* yr = y + (u64)row * cols;
    if (cols % V == 0 && (u64)x % 16 == 0 && (u64)y % 16 == 0) softmax_cached<T, V>(xr, yr, cols, t, tpr, log_mode, sm);
    else softmax_cached<T, 1>(xr, yr, cols, t, tpr, log_mode, sm);
}

// Online (max, sum of exp(x - max)) per thread, merged over the block; then a second read writes.
template <typename T>
__device__ __forceinline__ void softmax_long(const T* __restrict__ x, T* __restrict__ y, u32 cols, int log_mode) {
    __shared__ float sm[32];
    const T* xr = x + (u64)blockIdx.x * cols;
    T* yr = y + (u64)blockIdx.x * cols;
    const u32 tpr = blockDim.x;
    float m = NEG_INF, s = 0.0f;
    for (u32 i = threadIdx.x; i < cols; i += tpr) {
        const float v = to_f32(xr[i]);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else if (v != NEG_INF) {
            s += expf(v - m);  // NaN propagates into s
        }
    }
    const float mr = row_max(m, tpr, sm);
    s = row_sum(s == 0.0f ? 0.0f : s * expf(m - mr), tpr, sm);
    const float a = log_mode ? logf(s) : 1.0f / s;
    for (u32 i = threadIdx.x; i < cols; i += tpr) {
        const float v = to_f32(xr[i]);
        yr[i] = from_f32_arith<T>(log_mode ? (v - mr) - a : expf(v - mr) * a);
    }
}

#define SOFTMAX_KERNELS(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(SM_MAX_BLOCK)                                        \
        softmax_##NAME(const T* x, T* y, u32 rows, u32 cols, u32 tpr, int log_mode) {                 \
        softmax_rows<T>(x, y, rows, cols, tpr, log_mode);                                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SM_MAX_BLOCK)                                        \
        softmax_long_##NAME(const T* x, T* y, u32 cols, int log_mode) {                               \
        softmax_long<T>(x, y, cols, log_mode);                                                        \
    }
SOFTMAX_KERNELS(f32, float)
SOFTMAX_KERNELS(bf16, bf16)
SOFTMAX_KERNELS(f16, f16)
// softmax_packed_DT (16-bit dtypes; cols a multiple of 8, x and y 16-byte aligned): each thread
// keeps up to SMP_PACKS packs of 8 raw 16-bit values of its row in registers (16 registers where
// floats would need 32) and converts on the fly in each pass, so an SM holds many more rows in
// flight than softmax_DT (whose 16-bit rows carry half the bytes of f32 rows for the same
// latency); all loads of a row are issued before its first reduction. The exponentials are
// recomputed in the write pass, with exp2f on a log2(e)-scaled argument (MUFU ex2: a couple of f32
// ulps, far below a bf16/f16 rounding step). tpr = a power of two from 32 to 1024 threads a row
// (cols <= tpr * 8 * SMP_PACKS); blocks of max(256, tpr) threads hold blockDim / tpr rows; grid.x =
// ceil(rows / rows per block). Rows past the end load and store nothing but join the barriers.
#define SMP_PACKS 4
#define SMP_MAX_BLOCK 1024
#define LOG2E 1.4426950408889634f

template <typename T>
__device__ __forceinline__ void softmax_packed(const T* __restrict__ x, T* __restrict__ y, u32 rows, u32 cols, u32 tpr, int log_mode) {
    __shared__ float sm[2][SMP_MAX_BLOCK / 32];
    constexpr int V = 8;
    typedef Pack<T, V> PT;
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    const u32 npk = row < rows ? cols / V : 0;
    const PT* xr = reinterpret_cast<const PT*>(x) + (u64)(row < rows ? row : 0) * (cols / V);
    PT* yr = reinterpret_cast<PT*>(y) + (u64)(row < rows ? row : 0) * (cols / V);
    PT v[SMP_PACKS];
#pragma unroll
    for (int p = 0; p < SMP_PACKS; ++p) {
        if (p * tpr + t < npk) v[p] = xr[p * tpr + t];
    }
    float m = NEG_INF;
#pragma unroll
    for (int p = 0; p < SMP_PACKS; ++p) {
        if (p * tpr + t < npk) {
#pragma unroll
            for (int k = 0; k < V; ++k) m = fmaxf(m, to_f32(v[p].v[k]));
        }
    }
    m = rows_group_max(m, tpr, sm[0]);
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < SMP_PACKS; ++p) {
        if (p * tpr + t < npk) {
#pragma unroll
            for (int k = 0; k < V; ++k) s += exp2f((to_f32(v[p].v[k]) - m) * LOG2E);
        }
    }
    s = rows_group_sum(s, tpr, sm[1]);
    const float a = log_mode ? logf(s) : 1.0f / s;
#pragma unroll
    for (int p = 0; p < SMP_PACKS; ++p) {
        const u32 i = p * tpr + t;
        if (i < npk) {
            PT out;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float d = to_f32(v[p].v[k]) - m;
                out.v[k] = from_f32_arith<T>(log_mode ? d - a : exp2f(d * LOG2E) * a);
            }
            yr[i] = out;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SMP_MAX_BLOCK) softmax_packed_bf16(const bf16* x, bf16* y, u32 rows, u32 cols, u32 tpr, int log_mode) {
    softmax_packed<bf16>(x, y, rows, cols, tpr, log_mode);
}
extern "C" __global__ void __launch_bounds__(SMP_MAX_BLOCK) softmax_packed_f16(const f16* x, f16* y, u32 rows, u32 cols, u32 tpr, int log_mode) {
    softmax_packed<f16>(x, y, rows, cols, tpr, log_mode);
}
