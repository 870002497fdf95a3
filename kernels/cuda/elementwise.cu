// Element-wise kernels: strided copy, casts, unary maps, broadcasting binary maps, comparisons
// (-> u8 mask) and where. The math is the CPU reference's (kernels/src/elementwise.rs), computed
// in f32 for every float dtype. Launch contract (engine/src/cuda/elementwise.rs):
// - `NAME_DT` kernels are the contiguous, vectorized path: every pointer is aligned to its
//   pack (see Pack in common.cuh), blocks of EW_BLOCK threads, each thread does one pack of
//   VEC(...) elements (16 bytes of the widest operand); grid = max(1, ceil(n / VEC / EW_BLOCK)).
//   One 16-byte pack per thread at full occupancy keeps ~32 KB per SM in flight, more than the
//   ~18 KB an H100 needs to saturate HBM, so no unrolling (which would cost registers and code).
// - `NAME_strided_DT` kernels take any strides (broadcast = stride 0) in StridedArgs, write a
//   contiguous output, and use 32-bit index math unless `wide` is set; any grid (grid-stride loop),
//   blocks of EW_BLOCK threads, grid * EW_BLOCK < 2^31.
#include "common.cuh"

#define EW_BLOCK 256

// Elements per pack: a 16-byte access for the widest operand type (narrower operands take
// narrower accesses, which still fill whole 32-byte sectors across a warp).
#define VEC1(A) (16 / sizeof(A))
#define VEC2(A, B) (16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B)))

// ---- generic maps -------------------------------------------------------------------------
// Contiguous: thread i maps pack i; the n % N tail goes to the first threads of block 0.
template <int N, typename A, typename R, typename F>
__device__ __forceinline__ void map1_contig(const A* __restrict__ a, R* __restrict__ r, u64 n, F f) {
    typedef Pack<A, N> PA;
    typedef Pack<R, N> PR;
    const u64 nvec = n / N;
    const u64 i = (u64)blockIdx.x * EW_BLOCK + threadIdx.x;
    if (i < nvec) {
        const PA va = reinterpret_cast<const PA*>(a)[i];
        PR vr;
#pragma unroll
        for (int k = 0; k < N; ++k) vr.v[k] = f(va.v[k]);
        reinterpret_cast<PR*>(r)[i] = vr;
    }
    if (blockIdx.x == 0) {
        const u64 t = nvec * N + threadIdx.x;
        if (t < n) r[t] = f(a[t]);
    }
}

template <int N, typename A, typename B, typename R, typename F>
__device__ __forceinline__ void map2_contig(const A* __restrict__ a, const B* __restrict__ b, R* __restrict__ r, u64 n, F f) {
    typedef Pack<A, N> PA;
    typedef Pack<B, N> PB;
    typedef Pack<R, N> PR;
    const u64 nvec = n / N;
    const u64 i = (u64)blockIdx.x * EW_BLOCK + threadIdx.x;
    if (i < nvec) {
        const PA va = reinterpret_cast<const PA*>(a)[i];
        const PB vb = reinterpret_cast<const PB*>(b)[i];
        PR vr;
#pragma unroll
        for (int k = 0; k < N; ++k) vr.v[k] = f(va.v[k], vb.v[k]);
        reinterpret_cast<PR*>(r)[i] = vr;
    }
    if (blockIdx.x == 0) {
        const u64 t = nvec * N + threadIdx.x;
        if (t < n) r[t] = f(a[t], b[t]);
    }
}

template <int N, typename A, typename B, typename C, typename R, typename F>
__device__ __forceinline__ void map3_contig(const A* __restrict__ a, const B* __restrict__ b, const C* __restrict__ c, R* __restrict__ r, u64 n, F f) {
    typedef Pack<A, N> PA;
    typedef Pack<B, N> PB;
    typedef Pack<C, N> PC;
    typedef Pack<R, N> PR;
    const u64 nvec = n / N;
    const u64 i = (u64)blockIdx.x * EW_BLOCK + threadIdx.x;
    if (i < nvec) {
        const PA va = reinterpret_cast<const PA*>(a)[i];
        const PB vb = reinterpret_cast<const PB*>(b)[i];
        const PC vc = reinterpret_cast<const PC*>(c)[i];
        PR vr;
#pragma unroll
        for (int k = 0; k < N; ++k) vr.v[k] = f(va.v[k], vb.v[k], vc.v[k]);
        reinterpret_cast<PR*>(r)[i] = vr;
    }
    if (blockIdx.x == 0) {
        const u64 t = nvec * N + threadIdx.x;
        if (t < n) r[t] = f(a[t], b[t], c[t]);
    }
}

// Strided: one output element per thread per step of a grid-stride loop.
template <typename I, typename A, typename R, typename F>
__device__ __forceinline__ void map1_strided(const A* __restrict__ a, R* __restrict__ r, u64 n, const StridedArgs<1>& s, F f) {
    const I step = (I)gridDim.x * EW_BLOCK;
    for (I i = (I)blockIdx.x * EW_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[1];
        strided_offsets<I, 1>(i, s, off);
        r[i] = f(a[off[0]]);
    }
}

template <typename I, typename A, typename B, typename R, typename F>
__device__ __forceinline__ void map2_strided(const A* __restrict__ a, const B* __restrict__ b, R* __restrict__ r, u64 n, const StridedArgs<2>& s, F f) {
    const I step = (I)gridDim.x * EW_BLOCK;
    for (I i = (I)blockIdx.x * EW_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[2];
        strided_offsets<I, 2>(i, s, off);
        r[i] = f(a[off[0]], b[off[1]]);
    }
}

template <typename I, typename A, typename B, typename C, typename R, typename F>
__device__ __forceinline__ void map3_strided(const A* __restrict__ a, const B* __restrict__ b, const C* __restrict__ c, R* __restrict__ r, u64 n, const StridedArgs<3>& s, F f) {
    const I step = (I)gridDim.x * EW_BLOCK;
    for (I i = (I)blockIdx.x * EW_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[3];
        strided_offsets<I, 3>(i, s, off);
        r[i] = f(a[off[0]], b[off[1]], c[off[2]]);
    }
}

// ---- copy ------------------------------------------------------------------------------------
// Contiguous copies are device memcpys; strided ones move raw bytes by element size.
struct Identity {
    template <typename T> __device__ __forceinline__ T operator()(T x) const { return x; }
};

#define COPY_KERNEL(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        copy_strided_##NAME(const T* x, T* y, u64 n, StridedArgs<1> s, int wide) {                    \
        if (wide) map1_strided<u64>(x, y, n, s, Identity{});                                          \
        else map1_strided<u32>(x, y, n, s, Identity{});                                               \
    }
COPY_KERNEL(b1, u8)
COPY_KERNEL(b2, u16)
COPY_KERNEL(b4, u32)
COPY_KERNEL(b8, u64)

// ---- transposing copy --------------------------------------------------------------------------
// copy_transpose_bN: the row-major copy of a view whose unit-stride dimension `p` is not its last
// one (a transpose: a .t() of a matrix, [B, L, C] <- [B, C, L] memory, a permute of heads). The
// strided copy above reads along the last dimension, `stride` elements apart, one element per
// 32-byte sector (28% of copy bandwidth on an H200, f32 8192^2); here a block stages a 32 x 32
// tile in shared memory, read along p and written along the last dimension, both coalesced. The
// other dimensions form a batch, which the z blocks walk. Launch (engine/src/cuda/elementwise.rs
// copy_strided): block (32, 8), grid (ceil(n_last / 32), ceil(n_p / 32), min(batch, 65535));
// s is the coalesced view (StridedArgs<1>), 0 <= p < rank - 1. Offsets in u64. Eight blocks an SM
// (32 registers, no spills): a block has only 4 loads a thread in flight, so occupancy carries
// the bandwidth (without the bound, 62-66 registers: 4 blocks).
template <typename T> __device__ __forceinline__ void copy_transpose(const T* __restrict__ x, T* __restrict__ y, const StridedArgs<1>& s, u32 p) {
    __shared__ T tile[32][33];  // [along the last dimension][along p]; one column of padding
    const u32 r = (u32)s.rank, last = r - 1;
    const u64 n_last = s.shape[last], n_p = s.shape[p], in_last = s.strides[0][last], in_p = s.strides[0][p];
    u64 batch = 1, out_p = 1;  // out_p: p's stride in the row-major output
    for (u32 d = 0; d < r; ++d) {
        if (d != p && d != last) batch *= s.shape[d];
        if (d > p) out_p *= s.shape[d];
    }
    const u64 l0 = (u64)blockIdx.x * 32, p0 = (u64)blockIdx.y * 32;
    const u32 tx = threadIdx.x, ty = threadIdx.y;
    for (u64 b = blockIdx.z; b < batch; b += gridDim.z) {
        // Batch entry b over the other dimensions (the innermost fastest): its input and output
        // offsets (the output's stride of dimension d is the product of the sizes after it).
        u64 in0 = 0, out0 = 0, rest = b, out_stride = 1;
        for (int d = (int)last; d >= 0; --d) {
            const u64 n = s.shape[d];
            if ((u32)d != p && (u32)d != last) {
                const u64 i = rest % n;
                rest /= n;
                in0 += i * s.strides[0][d];
                out0 += i * out_stride;
            }
            out_stride *= n;
        }
#pragma unroll
        for (u32 k = 0; k < 32; k += 8) {
            const u64 l = l0 + ty + k, q = p0 + tx;
            if (l < n_last && q < n_p) tile[ty + k][tx] = x[in0 + q * in_p + l * in_last];
        }
        __syncthreads();
#pragma unroll
        for (u32 k = 0; k < 32; k += 8) {
            const u64 q = p0 + ty + k, l = l0 + tx;
            if (l < n_last && q < n_p) y[out0 + q * out_p + l] = tile[tx][ty + k];
        }
        __syncthreads();
    }
}

#define COPY_TRANSPOSE_KERNEL(NAME, T)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 8) copy_transpose_##NAME(const T* x, T* y, StridedArgs<1> s, u32 p) { \
        copy_transpose<T>(x, y, s, p);                                                                                       \
    }
COPY_TRANSPOSE_KERNEL(b1, u8)
COPY_TRANSPOSE_KERNEL(b2, u16)
COPY_TRANSPOSE_KERNEL(b4, u32)
COPY_TRANSPOSE_KERNEL(b8, u64)

// ---- casts -----------------------------------------------------------------------------------
// Same rules as the CPU backend's cpu::cast: through f64 when either side is i64 (Rust `as`
// semantics: saturating, NaN -> 0), else through f32.
__device__ __forceinline__ double to_f64(i64 v) { return (double)v; }
template <typename T> __device__ __forceinline__ double to_f64(T v) { return (double)to_f32(v); }

template <typename T> __device__ __forceinline__ T from_f64(double v) { return from_f32<T>((float)v); }
template <> __device__ __forceinline__ i64 from_f64<i64>(double v) {
    if (v != v) return 0;
    if (v >= 9223372036854775808.0) return 0x7fffffffffffffffll;
    if (v <= -9223372036854775808.0) return (i64)(-0x7fffffffffffffffll - 1);
    return (i64)v;
}

template <typename T> struct IsI64 { static const bool value = false; };
template <> struct IsI64<i64> { static const bool value = true; };

template <typename A, typename B> struct CastFn {
    __device__ __forceinline__ B operator()(A x) const {
        if (IsI64<A>::value || IsI64<B>::value) return from_f64<B>(to_f64(x));
        return from_f32<B>(to_f32(x));
    }
};

#define CAST_KERNELS(AN, A, BN, B)                                                                    \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK) cast_##AN##_##BN(const A* x, B* y, u64 n) { \
        map1_contig<VEC2(A, B)>(x, y, n, CastFn<A, B>{});                                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        cast_strided_##AN##_##BN(const A* x, B* y, u64 n, StridedArgs<1> s, int wide) {               \
        if (wide) map1_strided<u64>(x, y, n, s, CastFn<A, B>{});                                      \
        else map1_strided<u32>(x, y, n, s, CastFn<A, B>{});                                           \
    }

#define CAST_FROM(AN, A)                                                                              \
    CAST_KERNELS(AN, A, f32, float)                                                                   \
    CAST_KERNELS(AN, A, bf16, bf16)                                                                   \
    CAST_KERNELS(AN, A, f16, f16)                                                                     \
    CAST_KERNELS(AN, A, i64, i64)                                                                     \
    CAST_KERNELS(AN, A, u8, u8)
// Identity pairs are instantiated too (harmless; the host copies instead).
CAST_FROM(f32, float)
CAST_FROM(bf16, bf16)
CAST_FROM(f16, f16)
CAST_FROM(i64, i64)
CAST_FROM(u8, u8)

// ---- unary -----------------------------------------------------------------------------------
// Op codes: kernels::elementwise::UnaryOp::cuda_code. p0/p1 are the op's parameters.
// sin, cos and pow are large (exact range reduction, special cases) and off the hot path, so they
// are called rather than inlined into every unrolled pack element of every kernel.
__device__ __noinline__ float call_sinf(float x) { return sinf(x); }
__device__ __noinline__ float call_cosf(float x) { return cosf(x); }
__device__ __noinline__ float call_powf(float x, float y) { return powf(x, y); }

template <int OP, typename T> __device__ __forceinline__ float unary_math(float x, float p0, float p1) {
    switch (OP) {
    case 0: return -x;                                   // Neg
    case 1: return fabsf(x);                             // Abs
    case 2: return x * x;                                // Sqr
    case 3: return sqrtf(x);                             // Sqrt
    case 4: return 1.0f / sqrtf(x);                      // Rsqrt
    case 5: return 1.0f / x;                             // Recip
    case 6: return expf(x);                              // Exp
    case 7: return logf(x);                              // Log
    case 8: return call_sinf(x);                            // Sin
    case 9: return call_cosf(x);                            // Cos
    case 10: return tanhf(x);                            // Tanh
    case 11: return sigmoid_for<T>(x);                  // Sigmoid (common.cuh)
    case 12: return x * sigmoid_for<T>(x);              // Silu
    case 13: return fmaxf(x, 0.0f);                      // Relu (NaN -> 0, as f32::max)
    case 14: return gelu_for<T>(x);                     // Gelu (erf; common.cuh)
    case 15: {                                           // GeluTanh
        const float c = 0.7978846f;
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    case 16: return x * p0 + p1;                         // Affine { mul, add }
    case 17: return call_powf(x, p0);                       // Powf
    case 18: return fminf(fmaxf(x, p0), p1);             // Clamp { min, max }
    case 19: return x >= 0.0f ? x : p0 * x;              // LeakyRelu
    default: return x;
    }
}

template <typename T, int OP> struct UnaryFn {
    float p0, p1;
    // Neg and Abs pass NaN payloads through, as the CPU does; every other result is arithmetic's.
    __device__ __forceinline__ T operator()(T x) const {
        const float r = unary_math<OP, T>(to_f32(x), p0, p1);
        return OP <= 1 ? from_f32<T>(r) : from_f32_arith<T>(r);
    }
};

#define UNARY_OPS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19)

template <typename T> __device__ __forceinline__ void unary_contig(const T* x, T* y, u64 n, int op, float p0, float p1) {
    switch (op) {
#define UNARY_CASE(k)                                                                                 \
    case k: map1_contig<VEC1(T)>(x, y, n, UnaryFn<T, k>{p0, p1}); break;
        UNARY_OPS(UNARY_CASE)
#undef UNARY_CASE
    }
}

// Strided paths switch per element: their index math dominates, and one copy of it (rather than
// one per op) keeps the kernels small.
template <typename T> struct UnaryDynFn {
    int op;
    float p0, p1;
    __device__ __forceinline__ T operator()(T x) const {
        const float v = to_f32(x);
        float r = v;
        switch (op) {
#define UNARY_CASE(k)                                                                                 \
    case k: r = unary_math<k, T>(v, p0, p1); break;
            UNARY_OPS(UNARY_CASE)
#undef UNARY_CASE
        }
        return from_f32<T>(r);
    }
};

template <typename I, typename T>
__device__ __forceinline__ void unary_strided(const T* x, T* y, u64 n, const StridedArgs<1>& s, int op, float p0, float p1) {
    map1_strided<I>(x, y, n, s, UnaryDynFn<T>{op, p0, p1});
}

#define UNARY_KERNELS(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        unary_##NAME(const T* x, T* y, u64 n, int op, float p0, float p1) {                           \
        unary_contig<T>(x, y, n, op, p0, p1);                                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        unary_strided_##NAME(const T* x, T* y, u64 n, StridedArgs<1> s, int wide, int op, float p0, float p1) { \
        if (wide) unary_strided<u64, T>(x, y, n, s, op, p0, p1);                                      \
        else unary_strided<u32, T>(x, y, n, s, op, p0, p1);                                           \
    }
UNARY_KERNELS(f32, float)
UNARY_KERNELS(bf16, bf16)
UNARY_KERNELS(f16, f16)

// ---- binary ----------------------------------------------------------------------------------
// Op codes: kernels::elementwise::BinaryOp::cuda_code.
template <int OP> __device__ __forceinline__ float binary_math(float a, float b) {
    switch (OP) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return a / b;
    case 4: return fmaxf(a, b);
    case 5: return fminf(a, b);
    case 6: return call_powf(a, b);
    default: return a;
    }
}

template <typename T, int OP> struct BinaryFn {
    __device__ __forceinline__ T operator()(T a, T b) const { return from_f32<T>(binary_math<OP>(to_f32(a), to_f32(b))); }
};

#define BINARY_OPS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6)

template <typename T> __device__ __forceinline__ void binary_contig(const T* a, const T* b, T* y, u64 n, int op) {
    switch (op) {
#define BINARY_CASE(k)                                                                                \
    case k: map2_contig<VEC1(T)>(a, b, y, n, BinaryFn<T, k>{}); break;
        BINARY_OPS(BINARY_CASE)
#undef BINARY_CASE
    }
}

template <typename T> struct BinaryDynFn {
    int op;
    __device__ __forceinline__ T operator()(T a, T b) const {
        const float x = to_f32(a), y = to_f32(b);
        float r = x;
        switch (op) {
#define BINARY_CASE(k)                                                                                \
    case k: r = binary_math<k>(x, y); break;
            BINARY_OPS(BINARY_CASE)
#undef BINARY_CASE
        }
        return from_f32<T>(r);
    }
};

template <typename I, typename T>
__device__ __forceinline__ void binary_strided(const T* a, const T* b, T* y, u64 n, const StridedArgs<2>& s, int op) {
    map2_strided<I>(a, b, y, n, s, BinaryDynFn<T>{op});
}

#define BINARY_KERNELS(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK) binary_##NAME(const T* a, const T* b, T* y, u64 n, int op) { \
        binary_contig<T>(a, b, y, n, op);                                                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        binary_strided_##NAME(const T* a, const T* b, T* y, u64 n, StridedArgs<2> s, int wide, int op) { \
        if (wide) binary_strided<u64, T>(a, b, y, n, s, op);                                          \
        else binary_strided<u32, T>(a, b, y, n, s, op);                                              \
    }
BINARY_KERNELS(f32, float)
BINARY_KERNELS(bf16, bf16)
BINARY_KERNELS(f16, f16)

// ---- comparisons -> u8 -------------------------------------------------------------------------
// Op codes: kernels::elementwise::CmpOp::cuda_code. Floats compare as f32 (exact for bf16/f16);
// integers compare exactly.
__device__ __forceinline__ float cmp_key(float v) { return v; }
__device__ __forceinline__ float cmp_key(bf16 v) { return to_f32(v); }
__device__ __forceinline__ float cmp_key(f16 v) { return to_f32(v); }
__device__ __forceinline__ i64 cmp_key(i64 v) { return v; }
__device__ __forceinline__ u32 cmp_key(u8 v) { return v; }

template <int OP, typename K> __device__ __forceinline__ bool cmp_math(K a, K b) {
    switch (OP) {
    case 0: return a == b;
    case 1: return a != b;
    case 2: return a < b;
    case 3: return a <= b;
    case 4: return a > b;
    case 5: return a >= b;
    default: return false;
    }
}

template <typename T, int OP> struct CmpFn {
    __device__ __forceinline__ u8 operator()(T a, T b) const { return cmp_math<OP>(cmp_key(a), cmp_key(b)) ? 1 : 0; }
};

#define CMP_OPS(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <typename T> __device__ __forceinline__ void cmp_contig(const T* a, const T* b, u8* y, u64 n, int op) {
    switch (op) {
#define CMP_CASE(k)                                                                                   \
    case k: map2_contig<VEC1(T)>(a, b, y, n, CmpFn<T, k>{}); break;
        CMP_OPS(CMP_CASE)
#undef CMP_CASE
    }
}

template <typename T> struct CmpDynFn {
    int op;
    __device__ __forceinline__ u8 operator()(T a, T b) const {
        bool r = false;
        switch (op) {
#define CMP_CASE(k)                                                                                   \
    case k: r = cmp_math<k>(cmp_key(a), cmp_key(b)); break;
            CMP_OPS(CMP_CASE)
#undef CMP_CASE
        }
        return r ? 1 : 0;
    }
};

template <typename I, typename T>
__device__ __forceinline__ void cmp_strided(const T* a, const T* b, u8* y, u64 n, const StridedArgs<2>& s, int op) {
    map2_strided<I>(a, b, y, n, s, CmpDynFn<T>{op});
}

#define CMP_KERNELS(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK) cmp_##NAME(const T* a, const T* b, u8* y, u64 n, int op) { \
        cmp_contig<T>(a, b, y, n, op);                                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        cmp_strided_##NAME(const T* a, const T* b, u8* y, u64 n, StridedArgs<2> s, int wide, int op) { \
        if (wide) cmp_strided<u64, T>(a, b, y, n, s, op);                                             \
        else cmp_strided<u32, T>(a, b, y, n, s, op);                                                  \
    }
CMP_KERNELS(f32, float)
CMP_KERNELS(bf16, bf16)
CMP_KERNELS(f16, f16)
CMP_KERNELS(i64, i64)
CMP_KERNELS(u8, u8)

// ---- where -----------------------------------------------------------------------------------
// out = mask != 0 ? t : f. The mask may be of any dtype (the CPU backend tests `m != 0.0`, so
// -0.0 is false and NaN is true); values move as raw bytes of their size.
struct MaskF32 { u32 bits; };
struct MaskB16 { u16 bits; };  // bf16 and f16 alike: non-zero unless +-0
__device__ __forceinline__ bool nonzero(MaskF32 m) { return (m.bits & 0x7fffffffu) != 0; }
__device__ __forceinline__ bool nonzero(MaskB16 m) { return (m.bits & 0x7fffu) != 0; }
__device__ __forceinline__ bool nonzero(i64 m) { return m != 0; }
__device__ __forceinline__ bool nonzero(u8 m) { return m != 0; }

struct WhereFn {
    template <typename M, typename V> __device__ __forceinline__ V operator()(M m, V t, V f) const { return nonzero(m) ? t : f; }
};

#define WHERE_KERNELS(MN, M, VN, V)                                                                   \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        where_##MN##_##VN(const M* m, const V* t, const V* f, V* y, u64 n) {                          \
        map3_contig<VEC2(M, V)>(m, t, f, y, n, WhereFn{});                                            \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(EW_BLOCK)                                            \
        where_strided_##MN##_##VN(const M* m, const V* t, const V* f, V* y, u64 n, StridedArgs<3> s, int wide) { \
        if (wide) map3_strided<u64>(m, t, f, y, n, s, WhereFn{});                                     \
        else map3_strided<u32>(m, t, f, y, n, s, WhereFn{});                                          \
    }

#define WHERE_MASK(MN, M)                                                                             \
    WHERE_KERNELS(MN, M, b1, u8)                                                                      \
    WHERE_KERNELS(MN, M, b2, u16)                                                                     \
    WHERE_KERNELS(MN, M, b4, u32)                                                                     \
    WHERE_KERNELS(MN, M, b8, u64)
WHERE_MASK(f32, MaskF32)
WHERE_MASK(b16, MaskB16)
WHERE_MASK(i64, i64)
WHERE_MASK(u8, u8)
