//! The fused LoRA GEMM kernels (kernels/cuda/lora_linear.cu) run on the CPU emulator of CUDA
//! (kernels/emu: mma / ldmatrix / cp.async by their PTX definitions, dynamic shared memory filled
//! with NaN before every block) against the CPU reference (kernels::lora_linear), on sizes that
//! are not multiples of the 128 x 128 x 32 tiles: M = 200 (a partial row tile), N = 136 (a partial
//! column tile of 8), K = 72 (a last k-tile of 8 columns, one 16-wide k-step), ranks 0, 4, 16, 20
//! (4 and 20: rows of the LoRA operands 8-byte but not 16-byte aligned, two 8-byte cp.async
//! halves a chunk; 16: 16-byte cp.async; element loads in the misaligned case), both B-operand layouts (forward y = [x | t] [W | B]^T, n-major; dx = [dy | s u]
//! [W ; A], k-major), bf16 and f16, with and without bias. The cases, launch and comparisons are
//! shared with the Hopper kernels' test (tests/common/lora_emulation.rs).

use kernels::lora_linear::{self as lora, BLayout};

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/lora_emulation.rs"]
mod lora_emulation;
use emulation::{values, Half};
use lora_emulation::{assert_close, module, run_kernel, tolerance, LoraKernel};

const KERNEL: LoraKernel = LoraKernel::MmaSync;

/// The layer's sizes (m, n, k): x [M, K], W [N, K].
const M: usize = 200;
const N: usize = 136;
const K: usize = 72;

#[test]
fn forward_n_major_matches_the_reference() {
    let Some(module) = module(KERNEL, "forward_n_major_matches_the_reference") else { return };
    lora_emulation::forward_n_major_matches_the_reference(&module, KERNEL, (M, N, K), &[4, 16, 20]);
}

#[test]
fn dx_k_major_matches_the_reference() {
    let Some(module) = module(KERNEL, "dx_k_major_matches_the_reference") else { return };
    lora_emulation::dx_k_major_matches_the_reference(&module, KERNEL, (M, N, K), &[4, 16, 20]);
}

#[test]
fn rank_zero_misaligned_lora_and_single_tile() {
    let Some(module) = module(KERNEL, "rank_zero_misaligned_lora_and_single_tile") else { return };
    let h = Half::Bf16;
    // Rank 0: the plain GEMM (no LoRA tiles at all).
    let (x, w) = (h.round(&values(M * K, 21)), h.round(&values(N * K, 22)));
    let got = run_kernel(&module, KERNEL, h, BLayout::NMajor, &x, &w, &[], &[], None, (M, N, K, 0), 0);
    assert_close("rank 0", &got, &lora::concat_gemm(&x, &w, &[], &[], None, (M, N, K, 0), BLayout::NMajor), tolerance(h));
    // Rank 8, LoRA operands misaligned, one partial tile each way; k 40: a k-tile of 8.
    lora_emulation::misaligned_lora_single_partial_tile(&module, KERNEL, h);
}
