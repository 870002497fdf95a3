// Affine grids and bilinear grid sampling with zero padding, forward and backward (wrt the image
// and the grid), with PyTorch's formulas as in the CPU reference (kernels/src/grid_sample.rs,
// grid_sample_backward.rs). Compiled with --fmad=false so that the coordinate math rounds as the
// CPU's does (a contracted multiply-add can move a sample across a pixel boundary).
// Launch contract (engine/src/cuda/spatial.rs): blocks of GS_BLOCK threads, grid-stride loops,
// any grid (launch::strided_config).
// - affine_grid: one thread per output (n, i, j); theta contiguous [N, 2, 3]; out [N, H, W, 2].
// - grid_sample: one thread per output element (n, c, p) in row-major order; the image may have any
//   strides (Img), the grid is contiguous [N, oH, oW, 2].
// - grid_sample_backward: one thread per sample point (n, p), looping over channels: it writes the
//   grid gradient (in the grid's dtype) and scatters the image gradient into a zeroed f32 buffer
//   with atomicAdd (the host casts it afterwards); dy is contiguous.
#include "common.cuh"

#define GS_BLOCK 256

struct Img {
    u64 n, c, h, w;
    u64 sn, sc, sh, sw;
};

// torch.linspace(-1, 1, n) (first half from the start, second half from the end), scaled by
// (n - 1) / n without align_corners; a single point is 0.
__device__ __forceinline__ float base_coord(u64 i, u64 n, int align) {
    if (n <= 1) return 0.0f;
    const float step = 2.0f / (float)(n - 1);
    const u64 half = n / 2;
    const float v = i < half ? -1.0f + step * (float)i : 1.0f - step * (float)(n - 1 - i);
    return align ? v : v * (float)(n - 1) / (float)n;
}

template <typename T>
__device__ __forceinline__ void affine_grid(const T* __restrict__ theta, T* __restrict__ out, u64 n, u64 h, u64 w, int align) {
    const u64 total = n * h * w, step = (u64)gridDim.x * GS_BLOCK;
    for (u64 e = (u64)blockIdx.x * GS_BLOCK + threadIdx.x; e < total; e += step) {
        const u64 j = e % w, i = (e / w) % h, b = e / (h * w);
        const T* t = theta + b * 6;
        const float x = base_coord(j, w, align), y = base_coord(i, h, align);
        out[2 * e] = from_f32<T>(x * to_f32(t[0]) + y * to_f32(t[1]) + to_f32(t[2]));
        out[2 * e + 1] = from_f32<T>(x * to_f32(t[3]) + y * to_f32(t[4]) + to_f32(t[5]));
    }
}

__device__ __forceinline__ float unnormalize(float coord, u64 size, int align) {
    return align ? (coord + 1.0f) / 2.0f * (float)(size - 1) : ((coord + 1.0f) * (float)size - 1.0f) / 2.0f;
}

template <typename T>
__device__ __forceinline__ void grid_sample(const T* __restrict__ x, const T* __restrict__ grid, T* __restrict__ out, Img a, u64 oh, u64 ow, int align) {
    const u64 plane = oh * ow, total = a.n * a.c * plane, step = (u64)gridDim.x * GS_BLOCK;
    const float fw = (float)a.w, fh = (float)a.h;
    for (u64 e = (u64)blockIdx.x * GS_BLOCK + threadIdx.x; e < total; e += step) {
        const u64 p = e % plane, nc = e / plane, b = nc / a.c, ch = nc - b * a.c;
        const T* g = grid + (b * plane + p) * 2;
        const T* src = x + b * a.sn + ch * a.sc;
        const float ix = unnormalize(to_f32(g[0]), a.w, align), iy = unnormalize(to_f32(g[1]), a.h, align);
        const float x0 = floorf(ix), y0 = floorf(iy), x1 = x0 + 1.0f, y1 = y0 + 1.0f;
        const float cx[4] = {x0, x1, x0, x1}, cy[4] = {y0, y0, y1, y1};
        const float wt[4] = {(x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy), (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0)};
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (cx[k] >= 0.0f && cy[k] >= 0.0f && cx[k] < fw && cy[k] < fh) s += to_f32(src[(u64)cy[k] * a.sh + (u64)cx[k] * a.sw]) * wt[k];
        out[e] = from_f32<T>(s);
    }
}

template <typename T>
__device__ __forceinline__ void grid_sample_backward(const T* __restrict__ x, const T* __restrict__ grid, const T* __restrict__ dy, float* __restrict__ dx,
                                                     T* __restrict__ dgrid, Img a, u64 oh, u64 ow, int align) {
    const u64 plane = oh * ow, total = a.n * plane, step = (u64)gridDim.x * GS_BLOCK;
    const float fw = (float)a.w, fh = (float)a.h;
    const float sx = align ? (fw - 1.0f) / 2.0f : fw / 2.0f, sy = align ? (fh - 1.0f) / 2.0f : fh / 2.0f;
    for (u64 e = (u64)blockIdx.x * GS_BLOCK + threadIdx.x; e < total; e += step) {
        const u64 p = e % plane, b = e / plane;
        const T* g = grid + e * 2;
        const float ix = unnormalize(to_f32(g[0]), a.w, align), iy = unnormalize(to_f32(g[1]), a.h, align);
        const float x0 = floorf(ix), y0 = floorf(iy), x1 = x0 + 1.0f, y1 = y0 + 1.0f;
        const float cx[4] = {x0, x1, x0, x1}, cy[4] = {y0, y0, y1, y1};
        const float wt[4] = {(x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy), (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0)};
        const float dwx[4] = {-(y1 - iy), y1 - iy, -(iy - y0), iy - y0};
        const float dwy[4] = {-(x1 - ix), -(ix - x0), x1 - ix, ix - x0};
        float gix = 0.0f, giy = 0.0f;
        // Corner-major, channels inner: the CPU's order of the grid-gradient sums.
        for (int k = 0; k < 4; ++k) {
            if (!(cx[k] >= 0.0f && cy[k] >= 0.0f && cx[k] < fw && cy[k] < fh)) continue;
            const u64 yy = (u64)cy[k], xx = (u64)cx[k];
            for (u64 ch = 0; ch < a.c; ++ch) {
                const float gv = to_f32(dy[(b * a.c + ch) * plane + p]);
                atomicAdd(&dx[((b * a.c + ch) * a.h + yy) * a.w + xx], wt[k] * gv);
                const float v = to_f32(x[b * a.sn + ch * a.sc + yy * a.sh + xx * a.sw]);
                gix += v * gv * dwx[k];
                giy += v * gv * dwy[k];
            }
        }
        dgrid[2 * e] = from_f32<T>(gix * sx);
        dgrid[2 * e + 1] = from_f32<T>(giy * sy);
    }
}

#define GS_KERNELS(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(GS_BLOCK) affine_grid_##NAME(const T* theta, T* out, u64 n, u64 h, u64 w, int align) { \
        affine_grid(theta, out, n, h, w, align);                                                      \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GS_BLOCK)                                            \
        grid_sample_##NAME(const T* x, const T* grid, T* out, Img a, u64 oh, u64 ow, int align) {     \
        grid_sample(x, grid, out, a, oh, ow, align);                                                  \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GS_BLOCK) grid_sample_backward_##NAME(              \
        const T* x, const T* grid, const T* dy, float* dx, T* dgrid, Img a, u64 oh, u64 ow, int align) { \
        grid_sample_backward(x, grid, dy, dx, dgrid, a, oh, ow, align);                               \
    }
GS_KERNELS(f32, float)
GS_KERNELS(bf16, bf16)
GS_KERNELS(f16, f16)
