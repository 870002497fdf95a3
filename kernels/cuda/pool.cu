// 2-D pooling (average with count_include_pad, max with NaN propagation, adaptive average) and
// nearest upsampling on NCHW images, forward and backward, with the index arithmetic of the CPU
// reference (kernels/src/pool.rs, pool_backward.rs). Compiled with --fmad=false so that the f32
// math rounds as the CPU's does.
// Launch contract (engine/src/cuda/spatial.rs): blocks of SP_BLOCK threads on a 2-D grid:
// blockIdx.y walks the N*C planes (grid-stride, gridDim.y <= 65535) and x-blocks walk the
// plane's pixels (grid-stride), one output element (forward) or one input-gradient element
// (backward) per thread and step, in row-major order so that neighbouring threads touch
// neighbouring pixels. A plane has fewer than 2^31 pixels and (out + 1) * in < 2^32 along each
// axis (checked by the host), so all index math inside a plane is 32-bit: 64-bit divisions are
// calls, and calls inside the backward loops made ptxas spill. Forward inputs may have any strides
// (Img); gradients dy are contiguous; outputs are contiguous, in the tensor's dtype.
// Backward passes gather (each input pixel sums the output gradients of the windows covering it,
// in ascending (oy, ox) order, as the CPU's scatter adds them): no atomics, deterministic, and
// bit-identical to the CPU in f32.
#include "common.cuh"

#define SP_BLOCK 256

// An NCHW view: sizes and strides in elements.
struct Img {
    u64 n, c, h, w;
    u64 sn, sc, sh, sw;
};

struct PoolArgs {
    i64 kh, kw, sh, sw, ph, pw;
};

// The grid-stride loops of every kernel: `plane` over [0, planes) by y-blocks, `pix` over the
// plane's h * w pixels by x-blocks.
#define PLANE_LOOP(PLANES) for (u64 plane = blockIdx.y; plane < (PLANES); plane += gridDim.y)
#define PIXEL_LOOP(HW) for (u32 pix = blockIdx.x * SP_BLOCK + threadIdx.x; pix < (u32)(HW); pix += gridDim.x * SP_BLOCK)

// Element offset of plane (n, c) of an Img (planes < 2^32, checked by the host).
__device__ __forceinline__ u64 plane_base(const Img& x, u64 plane) {
    const u32 ni = (u32)plane / (u32)x.c, ci = (u32)plane - ni * (u32)x.c;
    return ni * x.sn + ci * x.sc;
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void avg_pool(const T* __restrict__ x, T* __restrict__ y, Img a, u32 oh, u32 ow, PoolArgs p) {
    const int h = (int)a.h, w = (int)a.w;
    const int kh = (int)p.kh, kw = (int)p.kw, sh = (int)p.sh, sw = (int)p.sw, ph = (int)p.ph, pw = (int)p.pw;
    PLANE_LOOP(a.n * a.c) {
        const T* src = x + plane_base(a, plane);
        PIXEL_LOOP(oh * ow) {
            const int oy = (int)(pix / ow), ox = (int)(pix - (u32)oy * ow);
            const int y0 = oy * sh - ph, y1 = min(y0 + kh, h + ph);
            const int x0 = ox * sw - pw, x1 = min(x0 + kw, w + pw);
            const int ya = max(y0, 0), yb = min(y1, h), xa = max(x0, 0), xb = min(x1, w);
            const float divisor = (float)((y1 - y0) * (x1 - x0));
            float s = 0.0f;
            for (int yy = ya; yy < yb; ++yy)
                for (int xx = xa; xx < xb; ++xx) s += to_f32(src[yy * a.sh + xx * a.sw]);
            y[plane * oh * ow + pix] = from_f32<T>(s / divisor);
        }
    }
}

template <typename T>
__device__ __forceinline__ void max_pool(const T* __restrict__ x, T* __restrict__ y, Img a, u32 oh, u32 ow, PoolArgs p) {
    const int h = (int)a.h, w = (int)a.w;
    const int kh = (int)p.kh, kw = (int)p.kw, sh = (int)p.sh, sw = (int)p.sw, ph = (int)p.ph, pw = (int)p.pw;
    PLANE_LOOP(a.n * a.c) {
        const T* src = x + plane_base(a, plane);
        PIXEL_LOOP(oh * ow) {
            const int oy = (int)(pix / ow), ox = (int)(pix - (u32)oy * ow);
            const int y0 = oy * sh - ph, x0 = ox * sw - pw;
            const int ya = max(y0, 0), yb = max(min(y0 + kh, h), 0);
            const int xa = max(x0, 0), xb = max(min(x0 + kw, w), 0);
            float m = -__int_as_float(0x7f800000);
            bool nan = false;
            for (int yy = ya; yy < yb && !nan; ++yy)
                for (int xx = xa; xx < xb; ++xx) {
                    const float v = to_f32(src[yy * a.sh + xx * a.sw]);
                    if (v > m || v != v) m = v;
                    if (m != m) {
                        nan = true;
                        break;
                    }
                }
            y[plane * oh * ow + pix] = from_f32<T>(m);
        }
    }
}

// Adaptive window [floor(o * in / out), ceil((o + 1) * in / out)) ((out + 1) * in < 2^32).
__device__ __forceinline__ u32 ad_start(u32 o, u32 in, u32 out) { return o * in / out; }
__device__ __forceinline__ u32 ad_end(u32 o, u32 in, u32 out) { return ((o + 1) * in + out - 1) / out; }

template <typename T>
__device__ __forceinline__ void adaptive_avg_pool(const T* __restrict__ x, T* __restrict__ y, Img a, u32 oh, u32 ow) {
    const u32 h = (u32)a.h, w = (u32)a.w;
    PLANE_LOOP(a.n * a.c) {
        const T* src = x + plane_base(a, plane);
        PIXEL_LOOP(oh * ow) {
            const u32 oy = pix / ow, ox = pix - oy * ow;
            const u32 ya = ad_start(oy, h, oh), yb = ad_end(oy, h, oh);
            const u32 xa = ad_start(ox, w, ow), xb = ad_end(ox, w, ow);
            float s = 0.0f;
            for (u32 yy = ya; yy < yb; ++yy)
                for (u32 xx = xa; xx < xb; ++xx) s += to_f32(src[yy * a.sh + xx * a.sw]);
            y[plane * oh * ow + pix] = from_f32<T>(s / (float)((yb - ya) * (xb - xa)));
        }
    }
}

// PyTorch's "nearest" source index: floor(o * (in / out)) with the scale in f32, clamped.
__device__ __forceinline__ u32 nearest_source(u32 o, u32 in, u32 out) {
    if (in == out) return o;
    if (out == 2 * in) return o >> 1;
    const float scale = (float)in / (float)out;
    const u32 s = (u32)floorf((float)o * scale);
    return s < in - 1 ? s : in - 1;
}

template <typename T>
__device__ __forceinline__ void upsample_nearest(const T* __restrict__ x, T* __restrict__ y, Img a, u32 oh, u32 ow) {
    const u32 h = (u32)a.h, w = (u32)a.w;
    PLANE_LOOP(a.n * a.c) {
        const T* src = x + plane_base(a, plane);
        PIXEL_LOOP(oh * ow) {
            const u32 oy = pix / ow, ox = pix - oy * ow;
            y[plane * oh * ow + pix] = src[nearest_source(oy, h, oh) * a.sh + nearest_source(ox, w, ow) * a.sw];
        }
    }
}

// ---- backward (gather form) ------------------------------------------------------------------
// Output windows of a pooling that can cover input coordinate `v` along one axis: o with
// o * s - p <= v < o * s - p + k, i.e. ceil((v + p - k + 1) / s) <= o <= floor((v + p) / s).
__device__ __forceinline__ void covering(int v, int k, int s, int p, int out, int& lo, int& hi) {
    // Both numerators are non-negative here: unsigned division is cheaper.
    const int a = v + p - k + 1;
    lo = a <= 0 ? 0 : (int)((u32)(a + s - 1) / (u32)s);
    hi = min((int)((u32)(v + p) / (u32)s), out - 1);
}

// dx[planes, h, w] from dy[planes, oh, ow] (both contiguous).
template <typename T>
__device__ __forceinline__ void avg_pool_backward(const T* __restrict__ dy, T* __restrict__ dx, u64 planes, u32 h, u32 w, u32 oh, u32 ow, PoolArgs p) {
    const int kh = (int)p.kh, kw = (int)p.kw, sh = (int)p.sh, sw = (int)p.sw, ph = (int)p.ph, pw = (int)p.pw;
    PLANE_LOOP(planes) {
        const T* g = dy + plane * oh * ow;
        PIXEL_LOOP(h * w) {
            const int yy = (int)(pix / w), xx = (int)(pix - (u32)yy * w);
            int oy0, oy1, ox0, ox1;
            covering(yy, kh, sh, ph, (int)oh, oy0, oy1);
            covering(xx, kw, sw, pw, (int)ow, ox0, ox1);
            float s = 0.0f;
#pragma unroll 1
            for (int oy = oy0; oy <= oy1; ++oy) {
                const int y0 = oy * sh - ph, ycount = min(y0 + kh, (int)h + ph) - y0;
#pragma unroll 1
                for (int ox = ox0; ox <= ox1; ++ox) {
                    const int x0 = ox * sw - pw, xcount = min(x0 + kw, (int)w + pw) - x0;
                    s += __fdiv_rn(to_f32(g[oy * (int)ow + ox]), (float)(ycount * xcount));
                }
            }
            dx[plane * h * w + pix] = from_f32<T>(s);
        }
    }
}

// The winner of window (oy, ox) of one plane, as the forward picks it (first maximum in
// row-major order, NaN wins), as y * w + x; -1 for a window entirely in the padding.
template <typename T>
__device__ __forceinline__ int max_argmax(const T* src, int h, int w, u64 sy, u64 sx, int oy, int ox, int kh, int kw, int sh, int sw, int ph, int pw) {
    const int y0 = oy * sh - ph, x0 = ox * sw - pw;
    const int ya = max(y0, 0), yb = max(min(y0 + kh, h), 0);
    const int xa = max(x0, 0), xb = max(min(x0 + kw, w), 0);
    // A NaN winner ends the search (nothing beats it), as the forward's early exit.
    int best = -1;
    float m = 0.0f;
    bool nan = false;
    for (int yy = ya; yy < yb && !nan; ++yy)
        for (int xx = xa; xx < xb && !nan; ++xx) {
            const float v = to_f32(src[yy * sy + xx * sx]);
            if (best < 0 || v > m || v != v) {
                best = yy * w + xx;
                m = v;
                nan = v != v;
            }
        }
    return best;
}

template <typename T>
__device__ __forceinline__ void max_pool_backward(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, Img a, u32 oh, u32 ow, PoolArgs p) {
    const u32 h = (u32)a.h, w = (u32)a.w;
    const int kh = (int)p.kh, kw = (int)p.kw, sh = (int)p.sh, sw = (int)p.sw, ph = (int)p.ph, pw = (int)p.pw;
    PLANE_LOOP(a.n * a.c) {
        const T* src = x + plane_base(a, plane);
        const T* g = dy + plane * oh * ow;
        PIXEL_LOOP(h * w) {
            const int yy = (int)(pix / w), xx = (int)(pix - (u32)yy * w);
            int oy0, oy1, ox0, ox1;
            covering(yy, kh, sh, ph, (int)oh, oy0, oy1);
            covering(xx, kw, sw, pw, (int)ow, ox0, ox1);
            float s = 0.0f;
#pragma unroll 1
            for (int oy = oy0; oy <= oy1; ++oy)
#pragma unroll 1
                for (int ox = ox0; ox <= ox1; ++ox)
                    if (max_argmax(src, (int)h, (int)w, a.sh, a.sw, oy, ox, kh, kw, sh, sw, ph, pw) == (int)pix) s += to_f32(g[oy * (int)ow + ox]);
            dx[plane * h * w + pix] = from_f32<T>(s);
        }
    }
}

template <typename T>
__device__ __forceinline__ void adaptive_avg_pool_backward(const T* __restrict__ dy, T* __restrict__ dx, u64 planes, u32 h, u32 w, u32 oh, u32 ow) {
    PLANE_LOOP(planes) {
        const T* g = dy + plane * oh * ow;
        PIXEL_LOOP(h * w) {
            const u32 yy = pix / w, xx = pix - yy * w;
            // The windows containing yy form a run of o around floor(yy * oh / h).
            u32 oy0 = yy * oh / h, ox0 = xx * ow / w;
            while (oy0 > 0 && ad_end(oy0 - 1, h, oh) > yy) --oy0;
            while (ox0 > 0 && ad_end(ox0 - 1, w, ow) > xx) --ox0;
            float s = 0.0f;
            for (u32 oy = oy0; oy < oh && ad_start(oy, h, oh) <= yy; ++oy) {
                const u32 ya = ad_start(oy, h, oh), yb = ad_end(oy, h, oh);
                if (yb <= yy) continue;
                for (u32 ox = ox0; ox < ow && ad_start(ox, w, ow) <= xx; ++ox) {
                    const u32 xa = ad_start(ox, w, ow), xb = ad_end(ox, w, ow);
                    if (xb <= xx) continue;
                    s += to_f32(g[oy * ow + ox]) / (float)((yb - ya) * (xb - xa));
                }
            }
            dx[plane * h * w + pix] = from_f32<T>(s);
        }
    }
}

// First output index whose nearest source is `v` (the map is non-decreasing); `out` if none.
__device__ __forceinline__ u32 first_nearest(u32 v, u32 in, u32 out) {
    u32 o = v * out / in;
    if (o >= out) o = out - 1;
    while (o > 0 && nearest_source(o - 1, in, out) >= v) --o;
    while (o < out && nearest_source(o, in, out) < v) ++o;
    return o;
}

template <typename T>
__device__ __forceinline__ void upsample_nearest_backward(const T* __restrict__ dy, T* __restrict__ dx, u64 planes, u32 h, u32 w, u32 oh, u32 ow) {
    PLANE_LOOP(planes) {
        const T* g = dy + plane * oh * ow;
        PIXEL_LOOP(h * w) {
            const u32 yy = pix / w, xx = pix - yy * w;
            const u32 ox0 = first_nearest(xx, w, ow);
            float s = 0.0f;
            for (u32 oy = first_nearest(yy, h, oh); oy < oh && nearest_source(oy, h, oh) == yy; ++oy)
                for (u32 ox = ox0; ox < ow && nearest_source(ox, w, ow) == xx; ++ox) s += to_f32(g[oy * ow + ox]);
            dx[plane * h * w + pix] = from_f32<T>(s);
        }
    }
}

#define POOL_KERNELS(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK) avg_pool2d_##NAME(const T* x, T* y, Img a, u32 oh, u32 ow, PoolArgs p) { \
        avg_pool(x, y, a, oh, ow, p);                                                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK) max_pool2d_##NAME(const T* x, T* y, Img a, u32 oh, u32 ow, PoolArgs p) { \
        max_pool(x, y, a, oh, ow, p);                                                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK) adaptive_avg_pool2d_##NAME(const T* x, T* y, Img a, u32 oh, u32 ow) { \
        adaptive_avg_pool(x, y, a, oh, ow);                                                           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK) upsample_nearest2d_##NAME(const T* x, T* y, Img a, u32 oh, u32 ow) { \
        upsample_nearest(x, y, a, oh, ow);                                                            \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK)                                            \
        avg_pool2d_backward_##NAME(const T* dy, T* dx, u64 planes, u32 h, u32 w, u32 oh, u32 ow, PoolArgs p) { \
        avg_pool_backward(dy, dx, planes, h, w, oh, ow, p);                                           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK)                                            \
        max_pool2d_backward_##NAME(const T* x, const T* dy, T* dx, Img a, u32 oh, u32 ow, PoolArgs p) { \
        max_pool_backward(x, dy, dx, a, oh, ow, p);                                                   \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK)                                            \
        adaptive_avg_pool2d_backward_##NAME(const T* dy, T* dx, u64 planes, u32 h, u32 w, u32 oh, u32 ow) { \
        adaptive_avg_pool_backward(dy, dx, planes, h, w, oh, ow);                                     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(SP_BLOCK)                                            \
        upsample_nearest2d_backward_##NAME(const T* dy, T* dx, u64 planes, u32 h, u32 w, u32 oh, u32 ow) { \
        upsample_nearest_backward(dy, dx, planes, h, w, oh, ow);                                      \
    }
POOL_KERNELS(f32, float)
POOL_KERNELS(bf16, bf16)
POOL_KERNELS(f16, f16)
