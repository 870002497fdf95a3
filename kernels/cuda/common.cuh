// Shared device code for every kernel family (included as "common.cuh"; NVRTC gets it as an
// in-memory header, so no CUDA headers are needed): fixed-width types, our own bf16/f16 types and
// conversions (bit-exact with the Rust `half` crate: round to nearest even, NaN stays NaN), 16-byte
// packs for vectorized access, and the strided-index arithmetic of element-wise kernels.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// Distinct types (not bare u16) so that templates can tell bf16 from f16.
struct __align__(2) bf16 { u16 bits; };
struct __align__(2) f16 { u16 bits; };
template <typename T> struct IsBf16 { static const bool value = false; };
template <> struct IsBf16<bf16> { static const bool value = true; };

// ---- conversions to and from f32 (all float math is done in f32) ----------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
#ifdef LOOKAHEAD_EMULATE
    return lookahead_emu::f16_bits_to_f32(v.bits);  // the CPU emulator's cvt.f32.f16 (kernels/emu)
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}
__device__ __forceinline__ float to_f32(u8 v) { return (float)v; }
__device__ __forceinline__ float to_f32(i64 v) { return (float)v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
#if __CUDA_ARCH__ >= 800
    // One hardware instruction instead of ~8 integer ones (this conversion dominated the bf16
    // element-wise / softmax kernels): cvt.rn is round-to-nearest-even with overflow to inf and
    // subnormals kept, as half's; only NaN differs (hardware gives the canonical 0x7fff, half
    // keeps sign and payload, quieted), so NaN takes half's bits.
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    if (v != v) h = (u16)((__float_as_uint(v) >> 16) | 0x0040u);
    return bf16{h};
#else
    // Same steps as half::bf16::from_f32.
    u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return bf16{(u16)((x >> 16) | 0x0040u)};
    const u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) return bf16{(u16)((x >> 16) + 1u)};
    return bf16{(u16)(x >> 16)};
#endif
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
#ifdef LOOKAHEAD_EMULATE
    return f16{lookahead_emu::f32_to_f16_bits(v)};  // the CPU emulator's cvt.rn.f16.f32 (kernels/emu)
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return f16{h};
#endif
}
// A value computed by f32 arithmetic, rounded to T. Only NaN differs from from_f32: it becomes
// the canonical bf16 NaN 0x7fff (PyTorch's conversion), not half's payload-keeping bits, which
// only matter for values passed through unchanged (casts, copies, neg, abs). Skipping that fix-up
// saves 3-4 instructions an element in the 16-bit kernels that are issue-bound (activations).
template <typename T> __device__ __forceinline__ T from_f32_arith(float v) { return from_f32<T>(v); }
#if __CUDA_ARCH__ >= 800
template <> __device__ __forceinline__ bf16 from_f32_arith<bf16>(float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return bf16{h};
}
#endif
// Rust's `f32 as u8`: truncates toward zero, saturates, NaN -> 0.
template <> __device__ __forceinline__ u8 from_f32<u8>(float v) {
    if (!(v > 0.0f)) return 0;
    if (v >= 255.0f) return 255;
    return (u8)v;
}
// Rust's `f32 as i64`: truncates toward zero, saturates, NaN -> 0.
template <> __device__ __forceinline__ i64 from_f32<i64>(float v) {
    if (v != v) return 0;
    if (v >= 9223372036854775808.0f) return 0x7fffffffffffffffll;
    if (v <= -9223372036854775808.0f) return (i64)(-0x7fffffffffffffffll - 1);
    return (i64)v;
}

// ---- logistic sigmoid ---------------------------------------------------------------------------
// For results rounded to bf16 / f16: MUFU ex2 and rcp (a few f32 ulps, far below a 16-bit step) on
// t = e^-|x| <= 1, so the denominator stays in [1, 2]: no overflow of e^-x for very negative x
// (where rcp.approx of a huge denominator flushes to 0) and no IEEE-division slow path. The plain
// 1 / (1 + expf(-x)) made bf16 SiLU issue-bound on an H100/H200 (39 SASS instructions an element
// against ~31 that HBM bandwidth leaves; 21 with this). f32 results keep the CPU reference's formula.
__device__ __forceinline__ float sigmoid_approx(float x) {
    const float t = __expf(-fabsf(x));
    const float r = __fdividef(1.0f, 1.0f + t);
    return x >= 0.0f ? r : t * r;
}
template <typename T> __device__ __forceinline__ float sigmoid_for(float x) {
    return sizeof(T) == 2 ? sigmoid_approx(x) : 1.0f / (1.0f + expf(-x));
}

// ---- exact (erf) GELU ---------------------------------------------------------------------------
// For results rounded to bf16 / f16: x Phi(x) with h = Phi(-|x|) = erfc(|x| / sqrt 2) / 2 written as
// h = t 2^(Q(t) - log2(e) x^2 / 2), t = 1 / (1 + a |x|), Q a minimax polynomial in t of
// log2(erfcx(|x| / sqrt 2) / 2t) (tests/fixtures/gen/gelu_erfc_fit.py). Relative in h, so the
// negative tail keeps its digits where 1 + erff(x / sqrt 2) cancels. Relative error of h: bf16
// 6.7e-6 for |x| <= 13.5 (degree 5), f16 6.5e-7 for |x| <= 6 (degree 6); beyond, h underflows the
// type against x or 1. 16 SASS instructions an element where Numerical Recipes' erfcc (relative
// 1.2e-7, degree 9, plus a 2^x scaling and the NaN fix-up of from_f32) took 27 and kept bf16 GELU
// issue-bound at 63% of copy bandwidth on an H200. Over every bf16 / f16 input each result is
// within one step of the exact value, fewer than 0.5% of them one step off
// (tests/elementwise_emulated.rs). NaN -> NaN, +inf -> inf, -inf -> NaN (as the CPU's). f32
// results keep erff, as the CPU reference.
template <typename T> __device__ __forceinline__ float gelu_erf_low(float x) {
    float t, q;
    if (IsBf16<T>::value) {
        t = __fdividef(1.0f, fmaf(0.35f, fabsf(x), 1.0f));
        q = -2.8422038555145264f + t * (1.4736303091049194f + t * (0.3481176197528839f + t * (0.7375803589820862f + t * (-1.0501710176467896f + t * 0.33305609226226807f))));
    } else {
        t = __fdividef(1.0f, fmaf(0.4f, fabsf(x), 1.0f));
        q = -2.651303291320801f + t * (1.4955987930297852f + t * (0.1713075488805771f + t * (1.03677237033844f + t * (-2.019928455352783f + t * (1.2391526699066162f + t * -0.27160000801086426f)))));
    }
    const float h = t * exp2f(q - 0.72134752044448170f * x * x);  // Phi(-|x|)
    return x * (x >= 0.0f ? 1.0f - h : h);
}
__device__ __forceinline__ float gelu_erf_exact(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
template <typename T> __device__ __forceinline__ float gelu_for(float x) { return sizeof(T) == 2 ? gelu_erf_low<T>(x) : gelu_erf_exact(x); }

// ---- 16-byte packs for vectorized loads and stores ----------------------------------------
// A pack of N elements is aligned to its size, capped at 16 bytes (the widest single access);
// the host only takes a vectorized path when every pointer meets `pack_align<T, N>()`.
template <typename T, int N> struct alignas((sizeof(T) * N < 16) ? sizeof(T) * N : 16) Pack {
    T v[N];
};

// ---- strided element-wise indexing ----------------------------------------------------------
// Must match `StridedArgs` in engine/src/cuda/launch.rs: the output is contiguous over `shape`,
// and input j reads element sum_d coord[d] * strides[j][d] (in elements, from its own base
// pointer, which already includes the view's offset). Dimensions [0, rank) are used.
#define LA_MAX_DIMS 8

template <int NIN> struct StridedArgs {
    u64 rank;
    u64 shape[LA_MAX_DIMS];
    u64 strides[NIN][LA_MAX_DIMS];
};

// Storage offsets of every input for the row-major output index `idx`. `I` is u32 when the host
// has checked that every index and offset fits (division is much cheaper), else u64.
template <typename I, int NIN>
__device__ __forceinline__ void strided_offsets(I idx, const StridedArgs<NIN>& a, I (&off)[NIN]) {
#pragma unroll
    for (int j = 0; j < NIN; ++j) off[j] = 0;
#pragma unroll
    for (int d = LA_MAX_DIMS - 1; d >= 0; --d) {
        if (d < (int)a.rank) {
            I c;
            if (d == 0) {
                c = idx;
            } else {
                I size = (I)a.shape[d];
                c = idx % size;
                idx /= size;
            }
#pragma unroll
            for (int j = 0; j < NIN; ++j) off[j] += c * (I)a.strides[j][d];
        }
    }
}

// ---- dynamic shared memory ------------------------------------------------------------------
// `T* name` over the launch's dynamic shared memory (shared_mem_bytes), 16-byte aligned. One byte
// array for every kernel of a file (extern arrays of different types may not share a name), and a
// macro so that the CPU emulator (kernels/emu) can give it its own definition.
#ifndef LOOKAHEAD_EMULATE
#define LA_DYNAMIC_SHARED(T, name)                                \
    extern __shared__ __align__(16) unsigned char la_dynamic_shared[]; \
    T* name = reinterpret_cast<T*>(la_dynamic_shared)
#endif
