// Shape and indexing kernels: cat, gather / index_select / embedding, pad, masked_fill (pure data
// movement: raw elements of 1, 2, 4 or 8 bytes, so every dtype is served), and index_add into
// zeros (the backward of index_select / embedding; f32 atomics). The CPU reference is
// engine/src/ops/shape.rs and backward_index.rs.
// Launch contract (engine/src/cuda/index.rs): blocks of IX_BLOCK threads, one output element per
// thread per step of a grid-stride loop, any grid with grid * IX_BLOCK < 2^31 (launch::strided_config).
// Strided operands are described by StridedArgs (common.cuh) over the output's shape; `wide` selects
// 64-bit index math.
#include "common.cuh"

#define IX_BLOCK 256

// ---- cat -------------------------------------------------------------------------------------
// One input of a concatenation: the input (any strides, StridedArgs over its own shape) is copied
// into rows of the output. Row-major element i of the input is (row, col) = (i / row_len,
// i % row_len) with row_len = input.shape[dim] * inner; it lands at dst[row * dst_row + col], where
// `dst` already points at this input's first column block.
template <typename I, typename T>
__device__ __forceinline__ void cat_copy(const T* __restrict__ x, T* __restrict__ y, u64 n, const StridedArgs<1>& s, u64 row_len, u64 dst_row) {
    const I step = (I)gridDim.x * IX_BLOCK;
    for (I i = (I)blockIdx.x * IX_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[1];
        strided_offsets<I, 1>(i, s, off);
        const I row = i / (I)row_len, col = i - row * (I)row_len;
        y[row * (I)dst_row + col] = x[off[0]];
    }
}

#define CAT_KERNEL(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(IX_BLOCK)                                            \
        cat_copy_##NAME(const T* x, T* y, u64 n, StridedArgs<1> s, int wide, u64 row_len, u64 dst_row) { \
        if (wide) cat_copy<u64>(x, y, n, s, row_len, dst_row);                                        \
        else cat_copy<u32>(x, y, n, s, row_len, dst_row);                                             \
    }
CAT_KERNEL(b1, u8)
CAT_KERNEL(b2, u16)
CAT_KERNEL(b4, u32)
CAT_KERNEL(b8, u64)

// ---- gather / index_select ---------------------------------------------------------------------
// out[i] = src[off0 + idx[off1] * dim_stride] over the output shape, where StridedArgs<2> holds the
// source strides with the gathered dimension's stride zeroed (operand 0) and the index strides
// (operand 1; index_select passes a 1-D index broadcast along every other dimension).
// An index outside [0, dim_size) is not read: the first one found is stored in err[1] (err[0] set
// to 1) for the host to report, and its output element is left unwritten (the host discards it).
template <typename I, typename T>
__device__ __forceinline__ void gather(const T* __restrict__ src, const i64* __restrict__ idx, T* __restrict__ y, u64 n, const StridedArgs<2>& s,
                                       i64 dim_stride, i64 dim_size, i64* err) {
    const I step = (I)gridDim.x * IX_BLOCK;
    for (I i = (I)blockIdx.x * IX_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[2];
        strided_offsets<I, 2>(i, s, off);
        const i64 k = idx[off[1]];
        if (k < 0 || k >= dim_size) {
            if (atomicCAS((unsigned long long*)err, 0ull, 1ull) == 0ull) err[1] = k;
            continue;
        }
        y[i] = src[(i64)off[0] + k * dim_stride];
    }
}

#define GATHER_KERNEL(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(IX_BLOCK) gather_##NAME(                            \
        const T* src, const i64* idx, T* y, u64 n, StridedArgs<2> s, int wide, i64 dim_stride, i64 dim_size, i64* err) { \
        if (wide) gather<u64>(src, idx, y, n, s, dim_stride, dim_size, err);                          \
        else gather<u32>(src, idx, y, n, s, dim_stride, dim_size, err);                               \
    }
GATHER_KERNEL(b1, u8)
GATHER_KERNEL(b2, u16)
GATHER_KERNEL(b4, u32)
GATHER_KERNEL(b8, u64)

// ---- pad -------------------------------------------------------------------------------------
// Output contiguous over oshape; each output coordinate j maps to the source coordinate j - left
// when inside, else by the mode (0 constant: write `fill`, 1 reflect, 2 replicate), exactly as the
// CPU's per-dimension maps. The source may have any strides.
struct PadArgs {
    u64 rank;
    u64 oshape[LA_MAX_DIMS];
    u64 ishape[LA_MAX_DIMS];
    u64 istrides[LA_MAX_DIMS];
    u64 left[LA_MAX_DIMS];
};

template <typename T>
__device__ __forceinline__ void pad(const T* __restrict__ x, T* __restrict__ y, u64 n, const PadArgs& a, int mode, T fill) {
    const u64 step = (u64)gridDim.x * IX_BLOCK;
    for (u64 i = (u64)blockIdx.x * IX_BLOCK + threadIdx.x; i < n; i += step) {
        u64 rest = i, off = 0;
        bool constant = false;
        for (int d = (int)a.rank - 1; d >= 0; --d) {
            const i64 j = (i64)(rest % a.oshape[d]);
            rest /= a.oshape[d];
            const i64 last = (i64)a.ishape[d] - 1;
            i64 k = j - (i64)a.left[d];
            if (k < 0 || k > last) {
                if (mode == 0) constant = true;
                else if (mode == 1) k = k < 0 ? -k : 2 * last - k;
                else k = k < 0 ? 0 : last;
            }
            off += (u64)k * a.istrides[d];
        }
        y[i] = constant ? fill : x[off];
    }
}

#define PAD_KERNEL(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(IX_BLOCK)                                            \
        pad_##NAME(const T* x, T* y, u64 n, PadArgs a, int mode, u64 fill_bits) {                     \
        const T fill = *reinterpret_cast<const T*>(&fill_bits); /* the low bytes (little-endian) */  \
        pad(x, y, n, a, mode, fill);                                                                  \
    }
PAD_KERNEL(b1, u8)
PAD_KERNEL(b2, u16)
PAD_KERNEL(b4, u32)
PAD_KERNEL(b8, u64)

// ---- masked_fill -----------------------------------------------------------------------------
// y = mask != 0 ? fill : x, x and the u8 mask with any strides (the mask broadcast to x's shape).
template <typename I, typename T>
__device__ __forceinline__ void masked_fill(const T* __restrict__ x, const u8* __restrict__ m, T* __restrict__ y, u64 n, const StridedArgs<2>& s, T fill) {
    const I step = (I)gridDim.x * IX_BLOCK;
    for (I i = (I)blockIdx.x * IX_BLOCK + threadIdx.x; i < (I)n; i += step) {
        I off[2];
        strided_offsets<I, 2>(i, s, off);
        y[i] = m[off[1]] != 0 ? fill : x[off[0]];
    }
}

#define MASKED_FILL_KERNEL(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(IX_BLOCK)                                            \
        masked_fill_##NAME(const T* x, const u8* m, T* y, u64 n, StridedArgs<2> s, int wide, u64 fill_bits) { \
        const T fill = *reinterpret_cast<const T*>(&fill_bits); /* the low bytes (little-endian) */  \
        if (wide) masked_fill<u64>(x, m, y, n, s, fill);                                              \
        else masked_fill<u32>(x, m, y, n, s, fill);                                                   \
    }
MASKED_FILL_KERNEL(b1, u8)
MASKED_FILL_KERNEL(b2, u16)
MASKED_FILL_KERNEL(b4, u32)
MASKED_FILL_KERNEL(b8, u64)

// ---- index_add into zeros --------------------------------------------------------------------
// acc (f32, zeroed by the host, [outer, size, inner]) += src ([outer, len, inner], contiguous) along
// the middle dimension at idx[j]. f32 atomics: the order of additions to one element is not fixed,
// so results may differ from the CPU's index-order sums in the last bits. Bad indices are reported
// through `err` as in gather.
template <typename T>
__device__ __forceinline__ void index_add(const T* __restrict__ src, const i64* __restrict__ idx, float* __restrict__ acc, u64 n, u64 len, u64 inner,
                                          i64 size, i64* err) {
    const u64 step = (u64)gridDim.x * IX_BLOCK;
    for (u64 e = (u64)blockIdx.x * IX_BLOCK + threadIdx.x; e < n; e += step) {
        const u64 o = e / (len * inner), r = e - o * len * inner;
        const u64 j = r / inner, k = r - j * inner;
        const i64 t = idx[j];
        if (t < 0 || t >= size) {
            if (atomicCAS((unsigned long long*)err, 0ull, 1ull) == 0ull) err[1] = t;
            continue;
        }
        atomicAdd(&acc[(o * (u64)size + (u64)t) * inner + k], to_f32(src[e]));
    }
}

#define INDEX_ADD_KERNEL(NAME, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(IX_BLOCK)                                            \
        index_add_##NAME(const T* src, const i64* idx, float* acc, u64 n, u64 len, u64 inner, i64 size, i64* err) { \
        index_add(src, idx, acc, n, len, inner, size, err);                                          \
    }
INDEX_ADD_KERNEL(f32, float)
INDEX_ADD_KERNEL(bf16, bf16)
INDEX_ADD_KERNEL(f16, f16)
