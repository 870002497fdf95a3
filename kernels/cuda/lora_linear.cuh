// The argument struct of the fused LoRA GEMM kernels: lora_gemm_{nk,kn}_* (lora_linear.cu,
// mma.sync) and lora_gemm_hopper_{nk,kn}_* (lora_linear_hopper.cu, wgmma) take the same one, so
// the engine fills one `LoraGemmArgs` for either.
#pragma once
#include "common.cuh"

// Must match `LoraGemmArgs` in kernels/src/lora_linear.rs field for field. Pointers are device
// addresses of 16-bit elements; leading dimensions are in elements.
struct LoraGemmArgs {
    u64 a1, b1, a2, b2, bias, c;  // bias 0: none
    u32 m, n, k1, k2;
    u32 lda1, ldb1, lda2, ldb2, ldc;
    u32 a2_vec, b2_vec;  // 1: 16-byte aligned rows, loaded by cp.async; 0: element loads
    u32 pad;
};
