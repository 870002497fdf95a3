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
    u32 a2_vec, b2_vec;  // 1: 16-byte aligned rows, loaded by cp.async; 0: element loads
    u32 pad;
};

// One 16-byte chunk of a row-major operand into shared memory at `dst`: the 8 elements of row gr,
// columns gc..gc+7, of `src` (rows ld elements apart); rows >= rows_valid and columns >=
// cols_valid read as zero. vec: rows 16-byte aligned and cols_valid a multiple of 8, so a chunk is
// whole or empty (cp.async, src-size 0 for an empty one); otherwise synchronous element loads (the
// LoRA operands of a rank that is not a multiple of 8).
__device__ __forceinline__ void lora_load_chunk(void* dst, const u16* src, u32 ld, u32 gr, u32 gc, u32 rows_valid, u32 cols_valid, bool vec) {
    const u16* s = src + (u64)gr * ld + gc;
    if (vec) {
        const bool full = gr < rows_valid && gc < cols_valid;
        cp_async_16(dst, full ? s : src, full);
    } else {
        Pack<u16, 8> p;
#pragma unroll
        for (int e = 0; e < 8; ++e) p.v[e] = (gr < rows_valid && gc + e < cols_valid) ? s[e] : (u16)0;
        *reinterpret_cast<Pack<u16, 8>*>(dst) = p;
    }
}
