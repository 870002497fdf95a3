// Normalisations and gated activations: layer norm (forward, backward), group norm (+SiLU)
// forward and backward over NCHW or channels-last (NHWC-strided) data, inference batch norm,
// GEGLU and PReLU. The math is the CPU reference's (kernels/src/norm.rs, norm_backward.rs); the
// CPU accumulates statistics in f64, these kernels in f32 (two-pass over registers for layer
// norm; shifted sums merged with Chan's formula for group norm). Launch parameters: see each
// section and engine/src/cuda/norm.rs. Per-channel parameters (weight, bias, running stats) are
// f32 vectors; a null pointer means "absent" (weight 1, bias 0).
#include "warp_reduce.cuh"
#include "cluster.cuh"

#define LN_CACHE 16      // f32 values of its row each layer-norm thread holds
// The cached kernel: ~75 registers a thread (3 blocks of 256 threads per SM for a 4096-wide row);
// capping it at 64 (launch bounds (512, 2)) spills, so it is left uncapped.
#define LN_MAX_BLOCK 512
#define LN_LONG_BLOCK 1024
#define GN_BLOCK 256
#define EW_BLOCK 256

__device__ __forceinline__ float param(const float* p, u32 i, float absent) { return p ? __ldg(p + i) : absent; }
// SiLU of a value about to be rounded to T (sigmoid_for: MUFU approximation for 16-bit outputs).
template <typename T> __device__ __forceinline__ float silu_out(float y) { return y * sigmoid_for<T>(y); }
// Group norm's y of one element: (x - mean) * sc + sh with sc = rstd w, sh = b (gn_finalize's
// coef), then SiLU when act.
template <typename T> __device__ __forceinline__ float gn_apply_value(float x, float mu, float sc, float sh, int act) {
    const float v = (x - mu) * sc + sh;
    return act ? silu_out<T>(v) : v;
}

// V consecutive per-channel parameters from index c (a multiple of V): `absent` when p is null,
// 16-byte loads when V is a multiple of 4 and p is aligned (one load instead of four), else
// scalar loads.
template <int V>
__device__ __forceinline__ void params_at(const float* __restrict__ p, u32 c, float absent, float (&out)[V]) {
    if (!p) {
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = absent;
    } else if (V % 4 == 0 && (u64)p % 16 == 0) {
#pragma unroll
        for (int j = 0; j < V / 4; ++j) {
            const float4 q = __ldg(reinterpret_cast<const float4*>(p + c) + j);
            out[4 * j] = q.x;
            out[4 * j + 1] = q.y;
            out[4 * j + 2] = q.z;
            out[4 * j + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = __ldg(p + c + k);
    }
}

// ---- layer norm ------------------------------------------------------------------------------
// layer_norm_DT: like softmax_DT (kernels/cuda/softmax.cu): tpr = 32 (warp per row, blocks of 256
// = 8 rows, grid.x = ceil(rows / 8)) or a block of tpr <= 512 threads per row (grid.x = rows);
// cols <= tpr * LN_CACHE; the row stays in registers: mean, then the mean of squared deviations
// (two-pass, as the CPU), then y = (x - mean) * rstd * w + b.
template <typename T, int V>
__device__ __forceinline__ void layer_norm_cached(const T* __restrict__ xr, T* __restrict__ yr, const float* __restrict__ w, const float* __restrict__ b,
                                                  u32 cols, u32 t, u32 tpr, float eps, float* sm) {
    constexpr int P = LN_CACHE / V;
    float v[P][V];
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const u32 c = (p * tpr + t) * V;
        if (c < cols) {
            const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(xr + c);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                v[p][k] = to_f32(pk.v[k]);
                s += v[p][k];
            }
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) v[p][k] = 0.0f;
        }
    }
    const float mean = row_sum(s, tpr, sm) / (float)cols;
    float q = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        if ((p * tpr + t) * V < cols) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float d = v[p][k] - mean;
                q += d * d;
            }
        }
    }
    const float rstd = 1.0f / sqrtf(row_sum(q, tpr, sm) / (float)cols + eps);
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const u32 c = (p * tpr + t) * V;
        if (c < cols) {
            float wk[V], bk[V];
            params_at<V>(w, c, 1.0f, wk);
            params_at<V>(b, c, 0.0f, bk);
            Pack<T, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) out.v[k] = from_f32_arith<T>((v[p][k] - mean) * rstd * wk[k] + bk[k]);
            *reinterpret_cast<Pack<T, V>*>(yr + c) = out;
        }
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_rows(const T* x, T* y, const float* w, const float* b, u32 rows, u32 cols, u32 tpr, float eps) {
    __shared__ float sm[32];
    constexpr int V = 16 / sizeof(T);
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    if (row >= rows) return;  // warp mode only: a whole warp shares the row and syncs nothing
    const T* xr = x + (u64)row * cols;
    T* yr = y + (u64)row * cols;
    if (cols % V == 0 && (u64)x % 16 == 0 && (u64)y % 16 == 0) layer_norm_cached<T, V>(xr, yr, w, b, cols, t, tpr, eps, sm);
    else layer_norm_cached<T, 1>(xr, yr, w, b, cols, t, tpr, eps, sm);
}

// layer_norm_long_DT: rows longer than 512 * LN_CACHE; a block of 1024 threads per row (grid.x =
// rows): sums shifted by the row's first element (one read), then a second read writes.
template <typename T>
__device__ __forceinline__ void layer_norm_long(const T* x, T* y, const float* w, const float* b, u32 cols, float eps) {
    __shared__ float sm[32];
    const T* xr = x + (u64)blockIdx.x * cols;
    T* yr = y + (u64)blockIdx.x * cols;
    const float shift = to_f32(xr[0]);
    float s1 = 0.0f, s2 = 0.0f;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) {
        const float d = to_f32(xr[i]) - shift;
        s1 += d;
        s2 += d * d;
    }
    s1 = row_sum(s1, blockDim.x, sm);
    s2 = row_sum(s2, blockDim.x, sm);
    const float n = (float)cols;
    const float mean = shift + s1 / n;
    float var = (s2 - s1 * (s1 / n)) / n;
    if (var < 0.0f) var = 0.0f;
    const float rstd = 1.0f / sqrtf(var + eps);
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) {
        yr[i] = from_f32_arith<T>((to_f32(xr[i]) - mean) * rstd * param(w, i, 1.0f) + param(b, i, 0.0f));
    }
}

// layer_norm_packed_DT (16-bit dtypes; cols a multiple of 8, x and y 16-byte aligned): each thread
// keeps up to LNP_PACKS packs of 8 raw 16-bit values of its row in registers (20 registers, where
// 40 floats would need twice that), converting to f32 on the fly in each pass, so a block holds
// several rows and the SM many more rows in flight than layer_norm_DT's one 4096-wide row per
// 256 threads (16-bit rows carry half the bytes of f32 ones for the same latency). All loads of a
// row are issued before its first reduction. tpr = a power of two from 32 to 1024 threads a row
// (cols <= tpr * 8 * LNP_PACKS); blocks of max(256, tpr) threads hold blockDim / tpr rows; grid.x =
// ceil(rows / rows per block). Rows past the end load and store nothing but join the barriers.
// Five packs rather than softmax's four so that SDXL's 1280-wide rows (160 packs) take a warp of
// 5 packs a lane, reduced by shuffles alone, where four packs needed 64 threads a row, half of them
// idle in the third pack, and two block barriers a row (54% of copy bandwidth on an H200).
#define LNP_PACKS 5
#define LNP_MAX_BLOCK 1024

template <typename T>
__device__ __forceinline__ void layer_norm_packed(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
                                                  u32 rows, u32 cols, u32 tpr, float eps) {
    __shared__ float sm[2][LNP_MAX_BLOCK / 32];
    constexpr int V = 8;
    typedef Pack<T, V> PT;
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    const u32 npk = row < rows ? cols / V : 0;
    const PT* xr = reinterpret_cast<const PT*>(x) + (u64)(row < rows ? row : 0) * (cols / V);
    PT* yr = reinterpret_cast<PT*>(y) + (u64)(row < rows ? row : 0) * (cols / V);
    PT v[LNP_PACKS];
#pragma unroll
    for (int p = 0; p < LNP_PACKS; ++p) {
        if (p * tpr + t < npk) v[p] = xr[p * tpr + t];
    }
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < LNP_PACKS; ++p) {
        if (p * tpr + t < npk) {
#pragma unroll
            for (int k = 0; k < V; ++k) s += to_f32(v[p].v[k]);
        }
    }
    const float mean = rows_group_sum(s, tpr, sm[0]) / (float)cols;
    float q = 0.0f;
#pragma unroll
    for (int p = 0; p < LNP_PACKS; ++p) {
        if (p * tpr + t < npk) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float d = to_f32(v[p].v[k]) - mean;
                q += d * d;
            }
        }
    }
    const float rstd = 1.0f / sqrtf(rows_group_sum(q, tpr, sm[1]) / (float)cols + eps);
#pragma unroll
    for (int p = 0; p < LNP_PACKS; ++p) {
        const u32 i = p * tpr + t;
        if (i < npk) {
            float wk[V], bk[V];
            params_at<V>(w, i * V, 1.0f, wk);
            params_at<V>(b, i * V, 0.0f, bk);
            PT out;
#pragma unroll
            for (int k = 0; k < V; ++k) out.v[k] = from_f32_arith<T>((to_f32(v[p].v[k]) - mean) * rstd * wk[k] + bk[k]);
            yr[i] = out;
        }
    }
}

extern "C" __global__ void __launch_bounds__(LNP_MAX_BLOCK)
    layer_norm_packed_bf16(const bf16* x, bf16* y, const float* w, const float* b, u32 rows, u32 cols, u32 tpr, float eps) {
    layer_norm_packed<bf16>(x, y, w, b, rows, cols, tpr, eps);
}
extern "C" __global__ void __launch_bounds__(LNP_MAX_BLOCK)
    layer_norm_packed_f16(const f16* x, f16* y, const float* w, const float* b, u32 rows, u32 cols, u32 tpr, float eps) {
    layer_norm_packed<f16>(x, y, w, b, rows, cols, tpr, eps);
}

// layer_norm_bwd_DT: same row split as layer_norm_DT (any cols). Per row: mean (pass 1), then the
// squared deviations and sum(g), sum(g * (x - mean)) with g = dy * w (pass 2), then
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (pass 3). Writes (mean, rstd) of each row to
// `stats` when given (for the parameter gradients).
template <typename T>
__device__ __forceinline__ void layer_norm_bwd(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ w, T* __restrict__ dx,
                                               float* __restrict__ stats, u32 rows, u32 cols, u32 tpr, float eps) {
    __shared__ float sm[32];
    const u32 row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    const u32 t = threadIdx.x % tpr;
    if (row >= rows) return;  // warp mode only
    const u64 base = (u64)row * cols;
    const float n = (float)cols;
    float s = 0.0f;
    for (u32 i = t; i < cols; i += tpr) s += to_f32(x[base + i]);
    const float mean = row_sum(s, tpr, sm) / n;
    float q = 0.0f, sg = 0.0f, sgd = 0.0f;
    for (u32 i = t; i < cols; i += tpr) {
        const float d = to_f32(x[base + i]) - mean;
        const float g = to_f32(dy[base + i]) * param(w, i, 1.0f);
        q += d * d;
        sg += g;
        sgd += g * d;
    }
    q = row_sum(q, tpr, sm);
    sg = row_sum(sg, tpr, sm);
    sgd = row_sum(sgd, tpr, sm);
    const float rstd = 1.0f / sqrtf(q / n + eps);
    const float mg = sg / n, mgx = sgd * rstd / n;
    for (u32 i = t; i < cols; i += tpr) {
        const float xh = (to_f32(x[base + i]) - mean) * rstd;
        const float g = to_f32(dy[base + i]) * param(w, i, 1.0f);
        dx[base + i] = from_f32_arith<T>(rstd * (g - mg - xh * mgx));
    }
    if (stats && t == 0) {
        stats[2 * (u64)row] = mean;
        stats[2 * (u64)row + 1] = rstd;
    }
}

// layer_norm_bwd_params_DT: grid (ceil(cols / 256), chunks), blocks of 256 threads, a thread per
// column summing dy * xhat and dy over rows [chunk * rows_per_chunk, ...) (coalesced across the
// warp). Partials: part[chunk * cols + col] (weight) and part[(chunks + chunk) * cols + col] (bias).
template <typename T>
__device__ __forceinline__ void layer_norm_bwd_params(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ stats, float* __restrict__ part,
                                                      u32 rows, u32 cols, u32 rows_per_chunk) {
    const u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    const u32 r0 = blockIdx.y * rows_per_chunk;
    const u32 r1 = min(rows, r0 + rows_per_chunk);
    float pw = 0.0f, pb = 0.0f;
    for (u32 r = r0; r < r1; ++r) {
        const u64 i = (u64)r * cols + col;
        const float d = to_f32(dy[i]);
        pw += d * (to_f32(x[i]) - stats[2 * (u64)r]) * stats[2 * (u64)r + 1];
        pb += d;
    }
    part[(u64)blockIdx.y * cols + col] = pw;
    part[((u64)gridDim.y + blockIdx.y) * cols + col] = pb;
}

// col_sum: out[j] = sum over c < chunks of part[c * cols + j] in order; a thread per column,
// blocks of EW_BLOCK threads, grid.x = ceil(cols / EW_BLOCK).
extern "C" __global__ void __launch_bounds__(EW_BLOCK) col_sum(const float* part, float* out, u32 chunks, u32 cols) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.0f;
    for (u32 c = 0; c < chunks; ++c) s += part[(u64)c * cols + j];
    out[j] = s;
}

// ---- group norm statistics ----------------------------------------------------------------------
// Partials of every (sample n, channel c) over "lanes" l < L: cnt, s1, s2 = count and sums of d,
// d^2 with d = x - K(n, c), K(n, c) = the channel's first element in the sample. Layout
// part[q * N*C*L + (n*C + c) * L + l], q = 0 cnt, 1 s1, 2 s2. Lanes split the spatial positions so
// that batch 1-2 fills the GPU (more blocks than (sample, group) pairs); gn_finalize merges them.
__device__ __forceinline__ u64 channel_first(u32 n, u32 c, u32 C, u32 HW, int channels_last) {
    return channels_last ? (u64)n * HW * C + c : ((u64)n * C + c) * HW;
}

// NCHW: grid (N*C planes, L lanes), blocks of GN_BLOCK threads; lane l sums plane positions
// [l * chunk, (l + 1) * chunk) (chunk a multiple of 8).
template <typename T>
__device__ __forceinline__ void gn_stats_nchw(const T* __restrict__ x, float* __restrict__ part, u32 HW, u32 chunk) {
    __shared__ float sm[32];
    constexpr int V = 16 / sizeof(T);
    const u32 plane = blockIdx.x, L = gridDim.y, lane = blockIdx.y;
    const T* xp = x + (u64)plane * HW;
    const float K = to_f32(xp[0]);
    const u32 start = lane * chunk, end = min(HW, start + chunk);
    float s1 = 0.0f, s2 = 0.0f;
    if (HW % V == 0 && (u64)x % 16 == 0) {
        // Unrolled so that a thread's (up to 4) 16-byte loads are in flight together.
#pragma unroll 4
        for (u32 i = start + threadIdx.x * V; i < end; i += blockDim.x * V) {
            const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(xp + i);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float d = to_f32(p.v[k]) - K;
                s1 += d;
                s2 += d * d;
            }
        }
    } else {
        for (u32 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float d = to_f32(xp[i]) - K;
            s1 += d;
            s2 += d * d;
        }
    }
    s1 = row_sum(s1, blockDim.x, sm);
    s2 = row_sum(s2, blockDim.x, sm);
    if (threadIdx.x == 0) {
        const u64 total = (u64)gridDim.x * L, o = (u64)plane * L + lane;
        part[o] = end > start ? (float)(end - start) : 0.0f;
        part[total + o] = s1;
        part[2 * total + o] = s2;
    }
}

// Channels-last: grid (L lanes, N), blocks of GN_BLOCK threads as R = GN_BLOCK / npk rows of
// npk = C / V channel packs (host: npk <= GN_BLOCK); threads past R * npk only help
// with shared memory. Row r of block l takes positions l*R + r, + L*R, ... (whole rows of C
// channels per warp step: coalesced). The block's rows are added in row order in shared memory.
// Column c of the block's [R][C] per-row partials in shared memory, summed in row order.
__device__ __forceinline__ float gn_rows_sum(const float* rows, u32 R, u32 C, u32 c) {
    float t = 0.0f;
    for (u32 rr = 0; rr < R; ++rr) t += rows[rr * C + c];
    return t;
}

// Adds a pack of V channels' values, each shifted by its channel's K, and their squares to the
// per-channel sums (the channels-last statistics' terms).
template <typename T, int V>
__device__ __forceinline__ void gn_add_shifted(const Pack<T, V>& v, const float (&K)[V], float (&s1)[V], float (&s2)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float d = to_f32(v.v[k]) - K[k];
        s1[k] += d;
        s2[k] += d * d;
    }
}

template <typename T, int V>
__device__ __forceinline__ void gn_stats_nhwc_body(const T* __restrict__ x, float* __restrict__ part, u32 C, u32 HW, float* rows, float* rcnt) {
    const u32 npk = C / V, R = blockDim.x / npk, L = gridDim.x, lane = blockIdx.x, n = blockIdx.y, N = gridDim.y;
    const u32 r = threadIdx.x / npk, cp = threadIdx.x % npk;
    const bool worker = r < R;
    const T* xn = x + (u64)n * HW * C + cp * V;
    float K[V], s1[V], s2[V];
    u32 cnt = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        K[k] = worker ? to_f32(xn[k]) : 0.0f;
        s1[k] = 0.0f;
        s2[k] = 0.0f;
    }
    if (worker) {
        // Unrolled so that a thread's (up to 4) row loads are in flight together: one load at a
        // time left the kernel latency-bound (channels-last group norm at 14% of copy, H200).
#pragma unroll 4
        for (u32 p = lane * R + r; p < HW; p += L * R) {
            gn_add_shifted<T, V>(*reinterpret_cast<const Pack<T, V>*>(xn + (u64)p * C), K, s1, s2);
            ++cnt;
        }
    }
    // Each row's sums into its own row of shared memory, then a thread a channel adds the rows in
    // row order: one barrier (adding row by row took R barriers).
    if (worker) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            rows[r * C + cp * V + k] = s1[k];
            rows[(R + r) * C + cp * V + k] = s2[k];
        }
        if (cp == 0) rcnt[r] = (float)cnt;
    }
    __syncthreads();
    const u64 total = (u64)N * C * L;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        const u64 o = ((u64)n * C + c) * L + lane;
        part[o] = gn_rows_sum(rcnt, R, 1, 0);
        part[total + o] = gn_rows_sum(rows, R, C, c);
        part[2 * total + o] = gn_rows_sum(rows + R * C, R, C, c);
    }
}

template <typename T>
__device__ __forceinline__ void gn_stats_nhwc(const T* x, float* part, u32 C, u32 HW) {
    // Two [R][C] arrays: R C = R npk V <= GN_BLOCK V.
    __shared__ float rows[2 * GN_BLOCK * 16 / sizeof(T)], rcnt[GN_BLOCK];
    constexpr int V = 16 / sizeof(T);
    if (C % V == 0 && (u64)x % 16 == 0) gn_stats_nhwc_body<T, V>(x, part, C, HW, rows, rcnt);
    else gn_stats_nhwc_body<T, 1>(x, part, C, HW, rows, rcnt);
}

// Chan et al.'s merge of (count, mean, M2) summaries.
__device__ __forceinline__ void chan_merge(float& n, float& m, float& m2, float nb, float mb, float m2b) {
    if (nb == 0.0f) return;
    if (n == 0.0f) {
        n = nb;
        m = mb;
        m2 = m2b;
        return;
    }
    const float nn = n + nb, d = mb - m;
    m += d * (nb / nn);
    m2 += m2b + d * d * (n * (nb / nn));
    n = nn;
}

__device__ __forceinline__ void warp_chan(float& n, float& m, float& m2) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float nb = __shfl_xor_sync(0xffffffffu, n, o);
        const float mb = __shfl_xor_sync(0xffffffffu, m, o);
        const float m2b = __shfl_xor_sync(0xffffffffu, m2, o);
        chan_merge(n, m, m2, nb, mb, m2b);
    }
}

// gn_finalize_DT: grid N*G blocks of GN_BLOCK threads, one per (sample, group) ng
// (gn_finalize_group; gn_grid_nhwc_DT calls it too): merges the group's cpg * L partials (each
// thread a strided subset, then the block) into mean and rstd; writes, when given,
// stats[2 (n G + g) + {0, 1}] = (mean, rstd) and for each channel c of the group
// coef[4 (n C + c) + {0, 1, 2}] = (mean, rstd * w[c], b[c]) for gn_apply. Every thread of the block
// calls it (block barriers inside).
template <typename T>
__device__ __forceinline__ void gn_finalize_group(u32 ng, const T* __restrict__ x, const float* __restrict__ part, float* __restrict__ stats, float* __restrict__ coef,
                                                  const float* __restrict__ w, const float* __restrict__ b, u32 N, u32 C, u32 HW, u32 G, u32 L, int channels_last, float eps) {
    __shared__ float sn[32], sm_[32], sm2[32], sres[2];
    const u32 n = ng / G, g = ng % G, cpg = C / G;
    const u64 total = (u64)N * C * L, base = ((u64)n * C + (u64)g * cpg) * L;
    const u32 items = cpg * L;
    float cn = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (u32 i = threadIdx.x; i < items; i += blockDim.x) {
        const float nb = part[base + i];
        if (nb == 0.0f) continue;
        const u32 c = g * cpg + i / L;
        const float K = to_f32(x[channel_first(n, c, C, HW, channels_last)]);
        const float s1 = part[total + base + i], s2 = part[2 * total + base + i];
        float m2b = s2 - s1 * (s1 / nb);
        if (m2b < 0.0f) m2b = 0.0f;
        chan_merge(cn, mean, m2, nb, K + s1 / nb, m2b);
    }
    warp_chan(cn, mean, m2);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sn[warp] = cn;
        sm_[warp] = mean;
        sm2[warp] = m2;
    }
    __syncthreads();
    if (warp == 0) {
        const bool has = lane < (blockDim.x >> 5);
        cn = has ? sn[lane] : 0.0f;
        mean = has ? sm_[lane] : 0.0f;
        m2 = has ? sm2[lane] : 0.0f;
        warp_chan(cn, mean, m2);
        if (lane == 0) {
            float var = m2 / cn;
            const float rstd = 1.0f / sqrtf(var + eps);
            if (stats) {
                stats[2 * (u64)ng] = mean;
                stats[2 * (u64)ng + 1] = rstd;
            }
            sres[0] = mean;
            sres[1] = rstd;
        }
    }
    __syncthreads();
    if (coef) {
        for (u32 k = threadIdx.x; k < cpg; k += blockDim.x) {
            const u32 c = g * cpg + k;
            float* q = coef + 4 * ((u64)n * C + c);
            q[0] = sres[0];
            q[1] = sres[1] * param(w, c, 1.0f);
            q[2] = param(b, c, 0.0f);
            q[3] = 0.0f;
        }
    }
}

// gn_apply_nhwc_DT: the channels-last group-norm apply, y = (x - mean) * (rstd w) + b (then SiLU),
// with each thread's channel pack FIXED: its V channels' coefficients (gn_finalize's coef) are
// loaded once into registers, then it walks positions. affine_apply reloads V float4
// coefficients (128 bytes) for every 16-byte pack, which made the channels-last forward
// L1-bound (H200, bf16 (2,320,128,128) channels-last forward: 580 GB/s with affine_apply, 970
// GB/s with this and gn_stats_nhwc's unrolled loads; NCHW 1517 GB/s). Grid (L lanes, N), GN_BLOCK threads as R = GN_BLOCK / npk rows of
// npk = C / V packs, positions as gn_stats_nhwc (row r of lane l: l R + r, + L R, ...). Host
// guarantees: C % V == 0, npk <= GN_BLOCK, x and y 16-byte aligned.
template <typename T>
__device__ __forceinline__ void gn_apply_nhwc(const T* __restrict__ x, T* __restrict__ y, const float4* __restrict__ coef, u32 C, u32 HW, int act) {
    constexpr int V = 16 / sizeof(T);
    const u32 npk = C / V, R = blockDim.x / npk, L = gridDim.x, lane = blockIdx.x, n = blockIdx.y;
    const u32 r = threadIdx.x / npk, cp = threadIdx.x % npk;
    if (r >= R) return;
    float mu[V], sc[V], sh[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float4 f = coef[(u64)n * C + cp * V + k];
        mu[k] = f.x;
        sc[k] = f.y;
        sh[k] = f.z;
    }
    const T* xn = x + (u64)n * HW * C + cp * V;
    T* yn = y + (u64)n * HW * C + cp * V;
#pragma unroll 4
    for (u32 p = lane * R + r; p < HW; p += L * R) {
        const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(xn + (u64)p * C);
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            out.v[k] = from_f32_arith<T>(gn_apply_value<T>(to_f32(pk.v[k]), mu[k], sc[k], sh[k], act));
        }
        *reinterpret_cast<Pack<T, V>*>(yn + (u64)p * C) = out;
    }
}

// ---- per-channel affine apply (group norm, batch norm) -----------------------------------------
// y = (x - coef.x) * coef.y + coef.z (then SiLU when `silu`), coef = coef4[n * cstride + c]
// (cstride = C: per sample and channel; 0: per channel). Memory order of x: NCHW (planes of HW)
// or channels-last (rows of C). One pack of V elements per thread, blocks of EW_BLOCK threads,
// grid.x = ceil(total / V / EW_BLOCK); V = 16 bytes when every pack stays in one plane (NCHW:
// HW % V == 0) or one row (NHWC: C % V == 0) and the pointers are aligned, else 1 (decided inside).
// total < 2^32.
template <typename T, int V>
__device__ __forceinline__ void affine_apply_body(const T* __restrict__ x, T* __restrict__ y, const float4* __restrict__ coef, u32 total, u32 C, u32 HW, u32 cstride,
                                                  int channels_last, int act) {
    const u64 i64_ = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (i64_ >= total) return;
    const u32 i = (u32)i64_;
    u32 n, c0;
    if (channels_last) {
        n = i / (HW * C);
        c0 = i % C;
    } else {
        const u32 plane = i / HW;
        n = plane / C;
        c0 = plane % C;
    }
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(x + i);
    // NCHW packs lie in one plane: one coefficient load for the whole pack.
    const float4 f0 = coef[(u64)n * cstride + c0];
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float4 f = (channels_last && k > 0) ? coef[(u64)n * cstride + c0 + k] : f0;
        out.v[k] = from_f32_arith<T>(gn_apply_value<T>(to_f32(pk.v[k]), f.x, f.y, f.z, act));
    }
    *reinterpret_cast<Pack<T, V>*>(y + i) = out;
}

template <typename T>
__device__ __forceinline__ void affine_apply(const T* x, T* y, const float4* coef, u32 total, u32 C, u32 HW, u32 cstride, int channels_last, int act) {
    constexpr int V = 16 / sizeof(T);
    const bool vec = (channels_last ? C % V == 0 : HW % V == 0) && (u64)x % 16 == 0 && (u64)y % 16 == 0;
    if (vec) affine_apply_body<T, V>(x, y, coef, total, C, HW, cstride, channels_last, act);
    else affine_apply_body<T, 1>(x, y, coef, total, C, HW, cstride, channels_last, act);
}

// bn_coef: coef[c] = (0, rstd * w, b - mean * rstd * w) in f64 as the CPU; a thread per channel,
// blocks of EW_BLOCK threads.
extern "C" __global__ void __launch_bounds__(EW_BLOCK) bn_coef(const float* mean, const float* var, const float* w, const float* b, float* coef, u32 C, float eps) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double rstd = 1.0 / sqrt((double)var[c] + (double)eps);
    const double wc = w ? (double)w[c] : 1.0, bc = b ? (double)b[c] : 0.0;
    coef[4 * (u64)c] = 0.0f;
    coef[4 * (u64)c + 1] = (float)(rstd * wc);
    coef[4 * (u64)c + 2] = (float)(bc - (double)mean[c] * rstd * wc);
    coef[4 * (u64)c + 3] = 0.0f;
}

// ---- group norm backward ---------------------------------------------------------------------
// With xhat = (x - mean) * rstd, y = xhat * w + b and d = dy (times SiLU'(y) when fused): per
// (sample, channel) sums A = sum d and B = sum d * xhat over lanes (layout as the statistics:
// part[q * N*C*L + (n C + c) L + l], q = 0 A, 1 B); then per group mg = sum_c w_c A_c / m,
// mgx = sum_c w_c B_c / m and dx = rstd * (d * w - mg - xhat * mgx); dweight = sum_n B,
// dbias = sum_n A. stats are (mean, rstd) per (sample, group): the forward's saved ones when the
// caller has them (then the host skips gn_stats / gn_finalize, a whole read of x and two
// launches), else gn_finalize's.
// The SiLU derivative through sigmoid_for<T>: MUFU ex2/rcp for 16-bit tensors (the gradients are
// rounded to 16 bits), where expf and an IEEE division made the reduction and dx passes
// instruction-bound.
template <typename T> __device__ __forceinline__ float gn_dprime(float dy, float xh, float w, float b, int act) {
    if (!act) return dy;
    const float y = xh * w + b;
    const float s = sigmoid_for<T>(y);
    return dy * (s * (1.0f + y * (1.0f - s)));
}

// dx of one element from gn_bwd_finalize's coef f = (mean, rstd, mg, mgx) and the channel's w, b.
template <typename T> __device__ __forceinline__ float gn_dx_value(float x, float dy, float4 f, float wc, float bc, int act) {
    const float xh = (x - f.x) * f.y;
    const float d = gn_dprime<T>(dy, xh, wc, bc, act);
    return f.y * (d * wc - f.z - xh * f.w);
}

// The channels-last backward reduction's per-channel terms of a thread's channel pack (first
// channel c0): the group's mean and rstd, the channel's w and b; sums A, B start at zero.
template <int V> struct GnPackTerms {
    float mean[V], rstd[V], wc[V], bc[V], sa[V], sb[V];
};
template <int V>
__device__ __forceinline__ GnPackTerms<V> gn_pack_terms(const float* stats, const float* w, const float* b, u32 n, u32 G, u32 cpg, u32 c0) {
    GnPackTerms<V> t;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const u32 c = c0 + k, ng = n * G + c / cpg;
        t.mean[k] = stats[2 * (u64)ng];
        t.rstd[k] = stats[2 * (u64)ng + 1];
        t.wc[k] = param(w, c, 1.0f);
        t.bc[k] = param(b, c, 0.0f);
        t.sa[k] = 0.0f;
        t.sb[k] = 0.0f;
    }
    return t;
}
// Adds a pack's terms of A = sum d and B = sum d xhat (d = dy, times SiLU' when fused).
template <typename T, int V>
__device__ __forceinline__ void gn_add_dsums(const Pack<T, V>& px, const Pack<T, V>& pd, GnPackTerms<V>& t, int act) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float xh = (to_f32(px.v[k]) - t.mean[k]) * t.rstd[k];
        const float d = gn_dprime<T>(to_f32(pd.v[k]), xh, t.wc[k], t.bc[k], act);
        t.sa[k] += d;
        t.sb[k] += d * xh;
    }
}

// NCHW: grid (N*C planes, L lanes), GN_BLOCK threads, lane l covers [l * chunk, (l + 1) * chunk)
// (chunk a multiple of 8, engine/src/cuda/norm.rs gn_lanes). 16-byte packs of x and dy when the
// planes allow them, up to four of each in flight a thread, as gn_stats_nchw.
template <typename T>
__device__ __forceinline__ void gn_bwd_reduce_nchw(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ stats, const float* __restrict__ w,
                                                   const float* __restrict__ b, float* __restrict__ part, u32 C, u32 HW, u32 G, u32 chunk, int act) {
    __shared__ float sm[32];
    constexpr int V = 16 / sizeof(T);
    const u32 plane = blockIdx.x, L = gridDim.y, lane = blockIdx.y;
    const u32 n = plane / C, c = plane % C, ng = n * G + c / (C / G);
    const float mean = stats[2 * (u64)ng], rstd = stats[2 * (u64)ng + 1];
    const float wc = param(w, c, 1.0f), bc = param(b, c, 0.0f);
    const u64 base = (u64)plane * HW;
    const u32 start = lane * chunk, end = min(HW, start + chunk);
    float sa = 0.0f, sb = 0.0f;
    if (HW % V == 0 && (u64)x % 16 == 0 && (u64)dy % 16 == 0) {
#pragma unroll 4
        for (u32 i = start + threadIdx.x * V; i < end; i += blockDim.x * V) {
            const Pack<T, V> px = *reinterpret_cast<const Pack<T, V>*>(x + base + i);
            const Pack<T, V> pd = *reinterpret_cast<const Pack<T, V>*>(dy + base + i);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float xh = (to_f32(px.v[k]) - mean) * rstd;
                const float d = gn_dprime<T>(to_f32(pd.v[k]), xh, wc, bc, act);
                sa += d;
                sb += d * xh;
            }
        }
    } else {
        for (u32 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float xh = (to_f32(x[base + i]) - mean) * rstd;
            const float d = gn_dprime<T>(to_f32(dy[base + i]), xh, wc, bc, act);
            sa += d;
            sb += d * xh;
        }
    }
    sa = row_sum(sa, blockDim.x, sm);
    sb = row_sum(sb, blockDim.x, sm);
    if (threadIdx.x == 0) {
        const u64 total = (u64)gridDim.x * L, o = (u64)plane * L + lane;
        part[o] = sa;
        part[total + o] = sb;
    }
}

// Channels-last: grid (L lanes, N), GN_BLOCK threads as rows of npk = C / V channel packs, as
// gn_stats_nhwc.
template <typename T, int V>
__device__ __forceinline__ void gn_bwd_reduce_nhwc_body(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ stats, const float* __restrict__ w,
                                                        const float* __restrict__ b, float* __restrict__ part, u32 C, u32 HW, u32 G, int act, float* rows) {
    const u32 npk = C / V, R = blockDim.x / npk, L = gridDim.x, lane = blockIdx.x, n = blockIdx.y, N = gridDim.y, cpg = C / G;
    const u32 r = threadIdx.x / npk, cp = threadIdx.x % npk;
    const bool worker = r < R;
    const u64 off = (u64)n * HW * C + cp * V;
    GnPackTerms<V> t = gn_pack_terms<V>(stats, w, b, n, G, cpg, worker ? cp * V : 0);
    if (worker) {
        for (u32 p = lane * R + r; p < HW; p += L * R)
            gn_add_dsums<T, V>(*reinterpret_cast<const Pack<T, V>*>(x + off + (u64)p * C), *reinterpret_cast<const Pack<T, V>*>(dy + off + (u64)p * C), t, act);
    }
    // As gn_stats_nhwc: each row's sums into its own row of shared memory, one barrier, then the
    // rows added per channel in row order.
    if (worker) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            rows[r * C + cp * V + k] = t.sa[k];
            rows[(R + r) * C + cp * V + k] = t.sb[k];
        }
    }
    __syncthreads();
    const u64 total = (u64)N * C * L;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        const u64 o = ((u64)n * C + c) * L + lane;
        part[o] = gn_rows_sum(rows, R, C, c);
        part[total + o] = gn_rows_sum(rows + R * C, R, C, c);
    }
}

template <typename T>
__device__ __forceinline__ void gn_bwd_reduce_nhwc(const T* x, const T* dy, const float* stats, const float* w, const float* b, float* part, u32 C, u32 HW, u32 G, int act) {
    __shared__ float rows[2 * GN_BLOCK * 16 / sizeof(T)];
    constexpr int V = 16 / sizeof(T);
    if (C % V == 0 && (u64)x % 16 == 0 && (u64)dy % 16 == 0) gn_bwd_reduce_nhwc_body<T, V>(x, dy, stats, w, b, part, C, HW, G, act, rows);
    else gn_bwd_reduce_nhwc_body<T, 1>(x, dy, stats, w, b, part, C, HW, G, act, rows);
}

// gn_bwd_finalize: grid N*G blocks of GN_BLOCK threads, one per (sample, group) ng
// (gn_bwd_finalize_group; gn_grid_bwd_nhwc_DT calls it too): sums w_c A and w_c B over the group's
// cpg * L partials; writes coef[4 (n C + c) + {0..3}] = (mean, rstd, mg, mgx) for its channels.
__device__ __forceinline__ void gn_bwd_finalize_group(u32 ng, const float* part, const float* stats, const float* w, float* coef, u32 N, u32 C, u32 HW, u32 G, u32 L) {
    __shared__ float sm[32];
    const u32 n = ng / G, g = ng % G, cpg = C / G;
    const u64 total = (u64)N * C * L, base = ((u64)n * C + (u64)g * cpg) * L;
    float sg = 0.0f, sgx = 0.0f;
    for (u32 i = threadIdx.x; i < cpg * L; i += blockDim.x) {
        const float wc = param(w, g * cpg + i / L, 1.0f);
        sg += wc * part[base + i];
        sgx += wc * part[total + base + i];
    }
    sg = row_sum(sg, blockDim.x, sm);
    sgx = row_sum(sgx, blockDim.x, sm);
    const float m = (float)cpg * (float)HW;
    for (u32 k = threadIdx.x; k < cpg; k += blockDim.x) {
        float* q = coef + 4 * ((u64)n * C + g * cpg + k);
        q[0] = stats[2 * (u64)ng];
        q[1] = stats[2 * (u64)ng + 1];
        q[2] = sg / m;
        q[3] = sgx / m;
    }
}
extern "C" __global__ void __launch_bounds__(GN_BLOCK) gn_bwd_finalize(const float* part, const float* stats, const float* w, float* coef, u32 N, u32 C, u32 HW, u32 G, u32 L) {
    gn_bwd_finalize_group(blockIdx.x, part, stats, w, coef, N, C, HW, G, L);
}

// gn_bwd_params: grid C blocks of GN_BLOCK threads, one per channel c (gn_bwd_params_channel; also
// gn_grid_bwd_nhwc_DT's): dw[c] = sum over (n, l) of B, db[c] = of A.
__device__ __forceinline__ void gn_bwd_params_channel(u32 c, const float* part, float* dw, float* db, u32 N, u32 C, u32 L) {
    __shared__ float sm[32];
    const u64 total = (u64)N * C * L;
    float sa = 0.0f, sb = 0.0f;
    for (u32 i = threadIdx.x; i < N * L; i += blockDim.x) {
        const u64 o = ((u64)(i / L) * C + c) * L + i % L;
        sa += part[o];
        sb += part[total + o];
    }
    sa = row_sum(sa, blockDim.x, sm);
    sb = row_sum(sb, blockDim.x, sm);
    if (threadIdx.x == 0) {
        dw[c] = sb;
        db[c] = sa;
    }
}
extern "C" __global__ void __launch_bounds__(GN_BLOCK) gn_bwd_params(const float* part, float* dw, float* db, u32 N, u32 C, u32 L) {
    gn_bwd_params_channel(blockIdx.x, part, dw, db, N, C, L);
}

// ---- group norm (+SiLU), channels-last, one grid-resident pass --------------------------------
// gn_grid_nhwc_DT: gn_stats_nhwc, gn_finalize and gn_apply_nhwc as one cooperative launch whose
// blocks keep their slice of x in shared memory, so that x is read once (the two-phase path reads
// it twice, in three launches; the UNet keeps activations channels-last, where no cluster holds a
// group). Grid (L, N): block (l, n) owns positions [l ppb, min(HW, (l + 1) ppb)) of sample n, a
// contiguous run of ppb C elements whose first `held` positions it keeps in held * C * sizeof(T)
// bytes of dynamic shared memory (all of them when x fits the grid's shared memory; the rest is
// read again in step 3, most recently read and so likely still in L2); its threads are
// R = blockDim / npk rows of npk = C / V channel packs, row r taking positions r, r + R, ... of the
// slice, as gn_stats_nhwc.
//   1. load the slice (GNG_INFLIGHT 16-byte loads a thread in flight), summing each channel's
//      shifted values and squares as they arrive; the block's sums to part in gn_stats_nhwc's
//      layout (the L blocks of a sample are its lanes); grid barrier;
//   2. gn_finalize_group for the (sample, group) pairs, strided over the blocks -> coef, and the
//      (mean, rstd) into `stats` when given (the backward's saved statistics); grid barrier;
//   3. normalize (+SiLU) the slice (shared memory, then global) into y, gn_apply_nhwc's arithmetic.
// Host guarantees (engine/src/cuda/norm.rs gn_grid_plan): a cooperative launch (all N L blocks
// resident at once), C % V == 0, npk <= blockDim <= GNG_MAX_BLOCK, x and y 16-byte aligned, part
// 3 N C L floats, coef 4 N C floats, stats 2 N G floats or null, bar two u32 as grid_sync wants.
#define GNG_MAX_BLOCK 512
// 16-byte loads a thread keeps in flight: 8 x 512 threads = 64 KB an SM, over the
// latency x bandwidth product; the backward's second pass keeps 4 (with 6 per-channel
// coefficients a thread, 8 spill at the 128 registers of a 512-thread block).
#define GNG_INFLIGHT 8

// Where a grid-resident block is: sample n, lane (block of the sample) of L, its slice of npos
// positions from p0, and this thread's row r of R and channel pack cp of npk.
struct GnGridSlice {
    u32 n, N, lane, L, p0, npos, r, R, cp, npk;
    bool worker;
};

template <int V> __device__ __forceinline__ GnGridSlice gn_grid_slice(u32 C, u32 HW, u32 ppb) {
    GnGridSlice q;
    q.npk = C / V;
    q.R = blockDim.x / q.npk;
    q.L = gridDim.x;
    q.lane = blockIdx.x;
    q.n = blockIdx.y;
    q.N = gridDim.y;
    q.r = threadIdx.x / q.npk;
    q.cp = threadIdx.x % q.npk;
    q.worker = q.r < q.R;
    q.p0 = min(HW, q.lane * ppb);
    q.npos = min(HW, q.p0 + ppb) - q.p0;
    return q;
}

// Index of this thread's channel pack at position 0 of the slice, in packs of V elements from the
// tensor's start (position p of the slice is p npk packs further).
template <int V> __device__ __forceinline__ u64 gn_grid_pack0(const GnGridSlice& q, u32 C, u32 HW) { return ((u64)q.n * HW + q.p0) * (C / V) + q.cp; }

// Reads this thread's packs of a slice (INFLIGHT loads in flight), keeps the first `held`
// positions in `buf` ([position][npk] packs) and hands each pack to `f(position, pack)`.
template <typename T, int V, int INFLIGHT, typename F>
__device__ __forceinline__ void gn_grid_load(const Pack<T, V>* src, Pack<T, V>* buf, const GnGridSlice& q, u32 held, F f) {
    for (u32 q0 = q.r; q0 < q.npos; q0 += INFLIGHT * q.R) {
        Pack<T, V> v[INFLIGHT];
#pragma unroll
        for (int j = 0; j < INFLIGHT; ++j)
            if (q0 + j * q.R < q.npos) v[j] = src[(u64)(q0 + j * q.R) * q.npk];
#pragma unroll
        for (int j = 0; j < INFLIGHT; ++j) {
            const u32 p = q0 + j * q.R;
            if (p < q.npos) {
                if (p < held) buf[p * q.npk + q.cp] = v[j];
                f(p, v[j]);
            }
        }
    }
}

// The block's per-channel sums a, b (and, when cnt >= 0, the count) into part: (count,) a, b at
// part[k total + o], o = (n C + c) L + lane, k = 0, 1(, 2), as gn_stats_nhwc / gn_bwd_reduce_nhwc
// lay them out; each row's sums go to its own row of `rows` ([2][R][C]), one barrier, then a thread
// a channel adds the rows in row order.
template <int V>
__device__ __forceinline__ void gn_grid_rows_to_part(const GnGridSlice& q, u32 C, const float (&a)[V], const float (&b)[V], int cnt, float* rows, float* rcnt, float* part) {
    if (q.worker) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            rows[q.r * C + q.cp * V + k] = a[k];
            rows[(q.R + q.r) * C + q.cp * V + k] = b[k];
        }
        if (q.cp == 0) rcnt[q.r] = (float)cnt;
    }
    __syncthreads();
    const u64 total = (u64)q.N * C * q.L;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        float* o = part + ((u64)q.n * C + c) * q.L + q.lane;
        if (cnt >= 0) {
            *o = gn_rows_sum(rcnt, q.R, 1, 0);
            o += total;
        }
        o[0] = gn_rows_sum(rows, q.R, C, c);
        o[total] = gn_rows_sum(rows + q.R * C, q.R, C, c);
    }
}

// Step 1 of both grid kernels: loads x's slice (into `buf` up to `held`), summing each channel's
// shifted values and squares; part gets gn_stats_nhwc's partials (the L blocks of a sample are
// its lanes).
template <typename T, int V>
__device__ __forceinline__ void gn_grid_stats(const T* x, Pack<T, V>* buf, const GnGridSlice& q, u32 C, u32 HW, u32 held, float* rows, float* rcnt, float* part) {
    float K[V], s1[V], s2[V];
    int cnt = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        K[k] = q.worker ? to_f32(x[(u64)q.n * HW * C + q.cp * V + k]) : 0.0f;
        s1[k] = 0.0f;
        s2[k] = 0.0f;
    }
    if (q.worker) {
        gn_grid_load<T, V, GNG_INFLIGHT>(reinterpret_cast<const Pack<T, V>*>(x) + gn_grid_pack0<V>(q, C, HW), buf, q, held, [&](u32, const Pack<T, V>& v) {
            gn_add_shifted<T, V>(v, K, s1, s2);
            ++cnt;
        });
    }
    gn_grid_rows_to_part<V>(q, C, s1, s2, cnt, rows, rcnt, part);
}

// gn_grid_nhwc_DT (forward): gn_stats_nhwc, gn_finalize and gn_apply_nhwc as one launch:
//   1. gn_grid_stats; grid barrier;
//   2. gn_finalize_group for the (sample, group) pairs, strided over the blocks -> coef (and
//      stats when given: the forward's statistics, saved for the backward); grid barrier;
//   3. normalize (+SiLU) the slice (shared memory, then global) into y, gn_apply_nhwc's arithmetic.
template <typename T>
__device__ __forceinline__ void gn_grid_nhwc(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b, float* __restrict__ part,
                                             float* __restrict__ coef, float* __restrict__ stats, u32* bar, u32 C, u32 HW, u32 G, u32 ppb, u32 held, float eps, int act) {
    constexpr int V = 16 / sizeof(T);
    // The rows' per-channel sums: R C = R npk V <= blockDim V.
    __shared__ float rows[2 * GNG_MAX_BLOCK * V], rcnt[GNG_MAX_BLOCK];
    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    Pack<T, V>* buf = reinterpret_cast<Pack<T, V>*>(smem_raw);
    const GnGridSlice q = gn_grid_slice<V>(C, HW, ppb);
    const u32 blocks = q.N * q.L, block = q.n * q.L + q.lane;
    gn_grid_stats<T, V>(x, buf, q, C, HW, held, rows, rcnt, part);
    grid_sync(bar, blocks);
    for (u32 ng = block; ng < q.N * G; ng += blocks) gn_finalize_group<T>(ng, x, part, stats, coef, w, b, q.N, C, HW, G, q.L, 1, eps);
    grid_sync(bar, blocks);
    if (!q.worker) return;
    float mu[V], sc[V], sh[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float4 f = reinterpret_cast<const float4*>(coef)[(u64)q.n * C + q.cp * V + k];
        mu[k] = f.x;
        sc[k] = f.y;
        sh[k] = f.z;
    }
    const Pack<T, V>* xs = reinterpret_cast<const Pack<T, V>*>(x) + gn_grid_pack0<V>(q, C, HW);
    Pack<T, V>* ys = reinterpret_cast<Pack<T, V>*>(y) + gn_grid_pack0<V>(q, C, HW);
#pragma unroll 4
    for (u32 p = q.r; p < q.npos; p += q.R) {
        const Pack<T, V> pk = p < held ? buf[p * q.npk + q.cp] : xs[(u64)p * q.npk];
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            out.v[k] = from_f32_arith<T>(gn_apply_value<T>(to_f32(pk.v[k]), mu[k], sc[k], sh[k], act));
        }
        ys[(u64)p * q.npk] = out;
    }
}

// gn_grid_bwd_nhwc_DT (backward): the two-phase backward's kernels (statistics, finalize,
// gn_bwd_reduce_nhwc, gn_bwd_finalize, gn_bwd_params, gn_bwd_dx_nhwc) as one launch with the
// slices of x and dy in shared memory (the first `held` positions of each; dynamic shared memory
// 2 held C sizeof(T), x's then dy's):
//   1. gn_grid_stats; grid barrier; 2. gn_finalize_group -> stats (mean, rstd); grid barrier;
//   3. dy's slice: per channel A = sum d, B = sum d xhat (gn_bwd_reduce's terms) -> part; barrier;
//   4. gn_bwd_finalize_group -> coef (mean, rstd, mg, mgx), gn_bwd_params_channel -> dw, db (when
//      dw is given); grid barrier; 5. dx of the slice, gn_bwd_dx's arithmetic.
// With `saved` set, `stats` already holds the forward's (mean, rstd) (the training path: the
// forward saved them) and steps 1-2 shrink to copying x's slice into shared memory: no sums, no
// finalize, two of the four grid barriers gone (each a wait for the slowest block of the grid).
// A runtime flag, not a second instance: both paths fit the same registers (cuda_compile).
// Host guarantees: gn_grid_nhwc_DT's, stats 2 N G floats, dw / db C floats or both null.
template <typename T>
__device__ __forceinline__ void gn_grid_bwd_nhwc(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, const float* __restrict__ w, const float* __restrict__ b,
                                                 float* dw, float* db, float* part, float* stats, float* coef, u32* bar, u32 C, u32 HW, u32 G, u32 ppb, u32 held, float eps,
                                                 int act, int saved) {
    constexpr int V = 16 / sizeof(T);
    __shared__ float rows[2 * GNG_MAX_BLOCK * V], rcnt[GNG_MAX_BLOCK];
    LA_DYNAMIC_SHARED(unsigned char, smem_raw);
    Pack<T, V>* bx = reinterpret_cast<Pack<T, V>*>(smem_raw);
    const GnGridSlice q = gn_grid_slice<V>(C, HW, ppb);
    Pack<T, V>* bdy = bx + (u64)held * q.npk;
    const u32 blocks = q.N * q.L, block = q.n * q.L + q.lane, cpg = C / G;
    if (saved) {
        // The forward's statistics: x's slice only copied into shared memory (each thread reads
        // back just its own packs in step 3, so no barrier), no sums, no finalize, two grid
        // barriers fewer.
        if (q.worker) gn_grid_load<T, V, GNG_INFLIGHT>(reinterpret_cast<const Pack<T, V>*>(x) + gn_grid_pack0<V>(q, C, HW), bx, q, held, [](u32, const Pack<T, V>&) {});
    } else {
        gn_grid_stats<T, V>(x, bx, q, C, HW, held, rows, rcnt, part);
        grid_sync(bar, blocks);
        for (u32 ng = block; ng < q.N * G; ng += blocks) gn_finalize_group<T>(ng, x, part, stats, nullptr, w, b, q.N, C, HW, G, q.L, 1, eps);
        grid_sync(bar, blocks);
    }
    const Pack<T, V>* xs = reinterpret_cast<const Pack<T, V>*>(x) + gn_grid_pack0<V>(q, C, HW);
    GnPackTerms<V> t = gn_pack_terms<V>(stats, w, b, q.n, G, cpg, q.worker ? q.cp * V : 0);
    if (q.worker) {
        gn_grid_load<T, V, GNG_INFLIGHT / 2>(reinterpret_cast<const Pack<T, V>*>(dy) + gn_grid_pack0<V>(q, C, HW), bdy, q, held, [&](u32 p, const Pack<T, V>& d) {
            gn_add_dsums<T, V>(p < held ? bx[p * q.npk + q.cp] : xs[(u64)p * q.npk], d, t, act);
        });
    }
    gn_grid_rows_to_part<V>(q, C, t.sa, t.sb, -1, rows, rcnt, part);
    grid_sync(bar, blocks);
    for (u32 ng = block; ng < q.N * G; ng += blocks) gn_bwd_finalize_group(ng, part, stats, w, coef, q.N, C, HW, G, q.L);
    if (dw)
        for (u32 c = block; c < C; c += blocks) gn_bwd_params_channel(c, part, dw, db, q.N, C, q.L);
    grid_sync(bar, blocks);
    if (!q.worker) return;
    float4 f[V];
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = reinterpret_cast<const float4*>(coef)[(u64)q.n * C + q.cp * V + k];
    const Pack<T, V>* dys = reinterpret_cast<const Pack<T, V>*>(dy) + gn_grid_pack0<V>(q, C, HW);
    Pack<T, V>* dxs = reinterpret_cast<Pack<T, V>*>(dx) + gn_grid_pack0<V>(q, C, HW);
#pragma unroll 2
    for (u32 p = q.r; p < q.npos; p += q.R) {
        const Pack<T, V> px = p < held ? bx[p * q.npk + q.cp] : xs[(u64)p * q.npk];
        const Pack<T, V> pd = p < held ? bdy[p * q.npk + q.cp] : dys[(u64)p * q.npk];
        Pack<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            o.v[k] = from_f32_arith<T>(gn_dx_value<T>(to_f32(px.v[k]), to_f32(pd.v[k]), f[k], t.wc[k], t.bc[k], act));
        }
        dxs[(u64)p * q.npk] = o;
    }
}

// gn_bwd_dx_DT: element-wise in x's memory order (NCHW or channels-last; dy has the same layout),
// a thread per element, blocks of EW_BLOCK threads, grid.x = ceil(total / EW_BLOCK), total < 2^32.
template <typename T>
__device__ __forceinline__ void gn_bwd_dx(const T* __restrict__ x, const T* __restrict__ dy, const float4* __restrict__ coef, const float* __restrict__ w,
                                          const float* __restrict__ b, T* __restrict__ dx, u32 total, u32 C, u32 HW, int channels_last, int act) {
    const u64 i64_ = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i64_ >= total) return;
    const u32 i = (u32)i64_;
    u32 n, c;
    if (channels_last) {
        n = i / (HW * C);
        c = i % C;
    } else {
        const u32 plane = i / HW;
        n = plane / C;
        c = plane % C;
    }
    const float4 f = coef[(u64)n * C + c];
    const float wc = param(w, c, 1.0f), bc = param(b, c, 0.0f);
    dx[i] = from_f32_arith<T>(gn_dx_value<T>(to_f32(x[i]), to_f32(dy[i]), f, wc, bc, act));
}

// gn_bwd_dx_pack_DT: gn_bwd_dx for NCHW with a 16-byte pack of V elements a thread (one plane, so
// one coefficient / weight / bias load a pack; the scalar kernel's 2-byte accesses and per-element
// coefficient loads kept the two-phase backward far below the copy bandwidth). The same
// arithmetic as gn_bwd_dx, element for element. Blocks of EW_BLOCK threads, grid.x =
// ceil(total / V / EW_BLOCK). Host guarantees: HW % V == 0, x, dy and dx 16-byte aligned.
template <typename T>
__device__ __forceinline__ void gn_bwd_dx_pack(const T* __restrict__ x, const T* __restrict__ dy, const float4* __restrict__ coef, const float* __restrict__ w,
                                               const float* __restrict__ b, T* __restrict__ dx, u32 total, u32 C, u32 HW, int act) {
    constexpr int V = 16 / sizeof(T);
    const u64 i64_ = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (i64_ >= total) return;
    const u32 i = (u32)i64_;
    const u32 plane = i / HW, n = plane / C, c = plane % C;
    const float4 f = coef[(u64)n * C + c];
    const float wc = param(w, c, 1.0f), bc = param(b, c, 0.0f);
    const Pack<T, V> px = *reinterpret_cast<const Pack<T, V>*>(x + i);
    const Pack<T, V> pd = *reinterpret_cast<const Pack<T, V>*>(dy + i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        o.v[k] = from_f32_arith<T>(gn_dx_value<T>(to_f32(px.v[k]), to_f32(pd.v[k]), f, wc, bc, act));
    }
    *reinterpret_cast<Pack<T, V>*>(dx + i) = o;
}

// gn_bwd_dx_nhwc_DT: gn_bwd_dx for channels-last with each thread's channel pack fixed (its V
// channels' coefficients, weights and biases in registers) while it walks positions, as
// gn_apply_nhwc; the same arithmetic as gn_bwd_dx, element for element. Grid (L lanes, N),
// GN_BLOCK threads as R = GN_BLOCK / npk rows of npk = C / V packs. Host guarantees: C % V == 0,
// npk <= GN_BLOCK, x, dy and dx 16-byte aligned.
template <typename T>
__device__ __forceinline__ void gn_bwd_dx_nhwc(const T* __restrict__ x, const T* __restrict__ dy, const float4* __restrict__ coef, const float* __restrict__ w,
                                               const float* __restrict__ b, T* __restrict__ dx, u32 C, u32 HW, int act) {
    constexpr int V = 16 / sizeof(T);
    const u32 npk = C / V, R = blockDim.x / npk, L = gridDim.x, lane = blockIdx.x, n = blockIdx.y;
    const u32 r = threadIdx.x / npk, cp = threadIdx.x % npk;
    if (r >= R) return;
    float4 f[V];
    float wc[V], bc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const u32 c = cp * V + k;
        f[k] = coef[(u64)n * C + c];
        wc[k] = param(w, c, 1.0f);
        bc[k] = param(b, c, 0.0f);
    }
    const u64 off = (u64)n * HW * C + cp * V;
#pragma unroll 2
    for (u32 p = lane * R + r; p < HW; p += L * R) {
        const Pack<T, V> px = *reinterpret_cast<const Pack<T, V>*>(x + off + (u64)p * C);
        const Pack<T, V> pd = *reinterpret_cast<const Pack<T, V>*>(dy + off + (u64)p * C);
        Pack<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            o.v[k] = from_f32_arith<T>(gn_dx_value<T>(to_f32(px.v[k]), to_f32(pd.v[k]), f[k], wc[k], bc[k], act));
        }
        *reinterpret_cast<Pack<T, V>*>(dx + off + (u64)p * C) = o;
    }
}

// ---- GEGLU and PReLU -------------------------------------------------------------------------
// geglu_DT: out[r, j] = x[r, j] * gelu(x[r, half + j]) (erf GELU, common.cuh gelu_for); a thread
// per pack of V output elements (V = 16 bytes of T when half % V == 0 and x, y are 16-byte aligned,
// else 1), blocks of EW_BLOCK threads, grid.x = ceil(total / V / EW_BLOCK), total = rows * half < 2^32.
// Scalar 2-byte accesses left bf16 GEGLU far from the copy bandwidth; a pack never straddles rows.
template <typename T, int V>
__device__ __forceinline__ void geglu(const T* __restrict__ x, T* __restrict__ y, u32 half, u32 total) {
    typedef Pack<T, V> P;
    const u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p * V >= total) return;
    const u32 i = (u32)(p * V);
    const u32 r = i / half, j = i - r * half;
    const u64 base = (u64)r * 2 * half + j;
    const P h = *reinterpret_cast<const P*>(x + base), g = *reinterpret_cast<const P*>(x + base + half);
    P o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float gv = to_f32(g.v[k]);
        o.v[k] = from_f32_arith<T>(to_f32(h.v[k]) * gelu_for<T>(gv));
    }
    *reinterpret_cast<P*>(y + i) = o;
}

// prelu_DT: y = x > 0 ? x : a * x with a = w[(i / inner) % C] (per_channel) or w[0]; a thread per
// element, blocks of EW_BLOCK threads, total < 2^32.
template <typename T>
__device__ __forceinline__ void prelu(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, u32 total, u32 C, u32 inner, int per_channel) {
    const u64 i64_ = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i64_ >= total) return;
    const u32 i = (u32)i64_;
    const float v = to_f32(x[i]);
    const float a = per_channel ? w[(i / inner) % C] : w[0];
    y[i] = from_f32_arith<T>(v > 0.0f ? v : a * v);
}

#define NORM_KERNELS(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(LN_MAX_BLOCK)                                        \
        layer_norm_##NAME(const T* x, T* y, const float* w, const float* b, u32 rows, u32 cols, u32 tpr, float eps) { \
        layer_norm_rows<T>(x, y, w, b, rows, cols, tpr, eps);                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(LN_LONG_BLOCK)                                       \
        layer_norm_long_##NAME(const T* x, T* y, const float* w, const float* b, u32 cols, float eps) { \
        layer_norm_long<T>(x, y, w, b, cols, eps);                                                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(LN_LONG_BLOCK)                                       \
        layer_norm_bwd_##NAME(const T* x, const T* dy, const float* w, T* dx, float* stats, u32 rows, u32 cols, u32 tpr, float eps) { \
        layer_norm_bwd<T>(x, dy, w, dx, stats, rows, cols, tpr, eps);                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        layer_norm_bwd_params_##NAME(const T* x, const T* dy, const float* stats, float* part, u32 rows, u32 cols, u32 rows_per_chunk) { \
        layer_norm_bwd_params<T>(x, dy, stats, part, rows, cols, rows_per_chunk);                     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK) gn_stats_nchw_##NAME(const T* x, float* part, u32 HW, u32 chunk) { \
        gn_stats_nchw<T>(x, part, HW, chunk);                                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK) gn_stats_nhwc_##NAME(const T* x, float* part, u32 C, u32 HW) { \
        gn_stats_nhwc<T>(x, part, C, HW);                                                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GNG_MAX_BLOCK)                                       \
        gn_grid_nhwc_##NAME(const T* x, T* y, const float* w, const float* b, float* part, float* coef, float* stats, u32* bar, u32 C, u32 HW, u32 G, u32 ppb, u32 held, \
                            float eps, int act) {                                                     \
        gn_grid_nhwc<T>(x, y, w, b, part, coef, stats, bar, C, HW, G, ppb, held, eps, act);           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GNG_MAX_BLOCK)                                       \
        gn_grid_bwd_nhwc_##NAME(const T* x, const T* dy, T* dx, const float* w, const float* b, float* dw, float* db, float* part, float* stats, float* coef, u32* bar, \
                                u32 C, u32 HW, u32 G, u32 ppb, u32 held, float eps, int act, int saved) { \
        gn_grid_bwd_nhwc<T>(x, dy, dx, w, b, dw, db, part, stats, coef, bar, C, HW, G, ppb, held, eps, act, saved); \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK) gn_apply_nhwc_##NAME(const T* x, T* y, const float4* coef, u32 C, u32 HW, int act) { \
        gn_apply_nhwc<T>(x, y, coef, C, HW, act);                                                     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK)                                            \
        gn_finalize_##NAME(const T* x, const float* part, float* stats, float* coef, const float* w, const float* b, u32 N, u32 C, u32 HW, u32 G, u32 L, int channels_last, float eps) { \
        gn_finalize_group<T>(blockIdx.x, x, part, stats, coef, w, b, N, C, HW, G, L, channels_last, eps); \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        affine_apply_##NAME(const T* x, T* y, const float4* coef, u32 total, u32 C, u32 HW, u32 cstride, int channels_last, int act) { \
        affine_apply<T>(x, y, coef, total, C, HW, cstride, channels_last, act);                       \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK)                                            \
        gn_bwd_reduce_nchw_##NAME(const T* x, const T* dy, const float* stats, const float* w, const float* b, float* part, u32 C, u32 HW, u32 G, u32 chunk, int act) { \
        gn_bwd_reduce_nchw<T>(x, dy, stats, w, b, part, C, HW, G, chunk, act);                        \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK)                                            \
        gn_bwd_reduce_nhwc_##NAME(const T* x, const T* dy, const float* stats, const float* w, const float* b, float* part, u32 C, u32 HW, u32 G, int act) { \
        gn_bwd_reduce_nhwc<T>(x, dy, stats, w, b, part, C, HW, G, act);                               \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        gn_bwd_dx_##NAME(const T* x, const T* dy, const float4* coef, const float* w, const float* b, T* dx, u32 total, u32 C, u32 HW, int channels_last, int act) { \
        gn_bwd_dx<T>(x, dy, coef, w, b, dx, total, C, HW, channels_last, act);                        \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        gn_bwd_dx_pack_##NAME(const T* x, const T* dy, const float4* coef, const float* w, const float* b, T* dx, u32 total, u32 C, u32 HW, int act) { \
        gn_bwd_dx_pack<T>(x, dy, coef, w, b, dx, total, C, HW, act);                                  \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GN_BLOCK)                                            \
        gn_bwd_dx_nhwc_##NAME(const T* x, const T* dy, const float4* coef, const float* w, const float* b, T* dx, u32 C, u32 HW, int act) { \
        gn_bwd_dx_nhwc<T>(x, dy, coef, w, b, dx, C, HW, act);                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK) geglu_##NAME(const T* x, T* y, u32 half, u32 total) { \
        geglu<T, 1>(x, y, half, total);                                                               \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK) geglu_vec_##NAME(const T* x, T* y, u32 half, u32 total) { \
        geglu<T, 16 / sizeof(T)>(x, y, half, total);                                                  \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        prelu_##NAME(const T* x, T* y, const float* w, u32 total, u32 C, u32 inner, int per_channel) { \
        prelu<T>(x, y, w, total, C, inner, per_channel);                                              \
    }
NORM_KERNELS(f32, float)
NORM_KERNELS(bf16, bf16)
NORM_KERNELS(f16, f16)
