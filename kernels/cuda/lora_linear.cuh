// What the fused LoRA GEMM kernels share: lora_gemm_{nk,kn}_* (lora_linear.cu, mma.sync) and
// lora_gemm_hopper_{nk,kn}_* (lora_linear_hopper.cu, wgmma) take the same argument struct, so the
// engine fills one `LoraGemmArgs` for either, and load their row-major operand tiles by the same
// 16-byte chunks (each kernel with its own tile shape and swizzle).
#pragma once
#include "common.cuh"
#include "mma.cuh"

// Must match `LoraGemmArgs` in kernels/src/lora_linear.rs field for field. Pointers are device
// addresses of 16-bit elements; leading dimensions are in elements.
struct LoraGemmArgs {
    u64 a1, b1, a2, b2, bias, c;  // bias 0: none
    u32 m, n, k1, k2;
    u32 lda1, ldb1, lda2, ldb2, ldc;
    u32 a2_vec, b2_vec;  // LORA_ROWS_*: how the LoRA operand's rows are loaded
    u32 pad;
};

// How a LoRA operand's rows are loaded (a2_vec / b2_vec; the base operands always use
// LORA_ROWS_16): must match kernels::lora_linear::lora_rows.
#define LORA_ROWS_ELEMENTS 0  // any rank, any alignment: synchronous element loads
#define LORA_ROWS_16 1        // rows 16-byte aligned, rank a multiple of 8: cp.async of 16 bytes
#define LORA_ROWS_8 2         // rows 8-byte aligned, rank a multiple of 4 (rank 4): two cp.async of 8

// One 16-byte chunk of a row-major operand into shared memory at `dst`: the 8 elements of row gr,
// columns gc..gc+7, of `src` (rows ld elements apart); rows >= rows_valid and columns >=
// cols_valid read as zero. mode LORA_ROWS_16: a chunk is whole or empty (cp.async, src-size 0 for
// an empty one); LORA_ROWS_8: each 8-byte half is whole or empty; LORA_ROWS_ELEMENTS: synchronous
// element loads (they stall the warp until the data arrives, which is why ranks 4, 12, ... take
// the cp.async halves).
__device__ __forceinline__ void lora_load_chunk(void* dst, const u16* src, u32 ld, u32 gr, u32 gc, u32 rows_valid, u32 cols_valid, u32 mode) {
    const u16* s = src + (u64)gr * ld + gc;
    if (mode == LORA_ROWS_16) {
        const bool full = gr < rows_valid && gc < cols_valid;
        cp_async_16(dst, full ? s : src, full);
    } else if (mode == LORA_ROWS_8) {
        const bool lo = gr < rows_valid && gc < cols_valid, hi = gr < rows_valid && gc + 4 < cols_valid;
        cp_async_8(dst, lo ? s : src, lo);
        cp_async_8(static_cast<unsigned char*>(dst) + 8, hi ? s + 4 : src, hi);
    } else {
        Pack<u16, 8> p;
#pragma unroll
        for (int e = 0; e < 8; ++e) p.v[e] = (gr < rows_valid && gc + e < cols_valid) ? s[e] : (u16)0;
        *reinterpret_cast<Pack<u16, 8>*>(dst) = p;
    }
}
