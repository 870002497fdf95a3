//! The Hopper fused LoRA GEMM kernels (kernels/cuda/lora_linear_hopper.cu: wgmma, 128 x 160 x 64
//! tiles, a 6-stage cp.async pipeline, persistent blocks) run on the CPU emulator of CUDA
//! (kernels/emu: wgmma and its shared-memory descriptors and swizzles, cp.async) against the CPU
//! reference
//! (kernels::lora_linear::concat_gemm, and the op's forward / backward formulas), on sizes that are
//! not multiples of the tiles: M = 141 (a partial row tile of 13), output width 168 (a partial
//! column tile of 8), reduction 456 (7 full k-tiles and one of 8 columns: with the LoRA tiles 8 to
//! 10 k-tiles, so the 6-stage ring wraps), ranks 0, 4, 20 (LoRA rows 8-byte but not 16-byte aligned: two
//! 8-byte cp.async halves a chunk; element loads run in misaligned_lora_and_single_partial_tile,
//! whose LoRA operands are off alignment by one element) and 72 (cp.async, a full LoRA k-tile and one of 8), both B layouts (forward
//! y = [x | t] [W | B]^T with K-major B tiles; dx = [dy | s u] [W ; A] with MN-major B tiles), bf16
//! and f16, with and without bias. The grid is that of a 3-SM device: 3 blocks for the 4 output
//! tiles, so block 0 runs two tiles through one pipeline (the second tile's loads start during
//! the first); `every_block_count` runs 1 to 5 blocks. The output starts as NaN, so an unwritten
//! element fails. The cases, launch and comparisons are shared with the mma.sync kernels' test
//! (tests/common/lora_emulation.rs).

use kernels::lora_linear::{self as lora, BLayout};

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/lora_emulation.rs"]
mod lora_emulation;
use emulation::{values, Half};
use lora_emulation::{assert_close, module, run_kernel, tolerance, LoraKernel};

/// The SM count the grid is sized for: fewer blocks than the 4 output tiles of M x WIDTH.
const EMULATED_SMS: u32 = 3;
const KERNEL: LoraKernel = LoraKernel::Hopper { sms: EMULATED_SMS };

/// Rows, output width and reduction length (see the module docs).
const M: usize = 141;
const WIDTH: usize = 168;
const REDUCTION: usize = 456;
const RANKS: [usize; 4] = [0, 4, 20, 72];

#[test]
fn forward_n_major_matches_the_reference() {
    let Some(module) = module(KERNEL, "forward_n_major_matches_the_reference") else { return };
    lora_emulation::forward_n_major_matches_the_reference(&module, KERNEL, (M, WIDTH, REDUCTION), &RANKS);
}

#[test]
fn dx_k_major_matches_the_reference() {
    let Some(module) = module(KERNEL, "dx_k_major_matches_the_reference") else { return };
    // The layer's (m, n, k): dx [M, WIDTH] = [dy | s u] · [W ; A] reduces over REDUCTION, then r.
    lora_emulation::dx_k_major_matches_the_reference(&module, KERNEL, (M, REDUCTION, WIDTH), &RANKS);
}

#[test]
fn misaligned_lora_and_single_partial_tile() {
    let Some(module) = module(KERNEL, "misaligned_lora_and_single_partial_tile") else { return };
    // k 40: a k-tile of 40, three k16 steps, the last half zero fill; f16.
    lora_emulation::misaligned_lora_single_partial_tile(&module, KERNEL, Half::F16);
}

#[test]
fn every_block_count() {
    let Some(module) = module(KERNEL, "every_block_count") else { return };
    // 1 block (all 4 tiles in one pipeline), 2, 4 (one tile each) and 5 (one block without a
    // tile); forward bf16 rank 20 and dx f16 rank 72.
    let (m, n, k) = (M, WIDTH, REDUCTION);
    for blocks in [1u32, 2, 4, 5] {
        let kernel = LoraKernel::HopperBlocks(blocks);
        let (h, r) = (Half::Bf16, 20);
        let (x, w, t, b, bias) = (h.round(&values(m * k, 31)), h.round(&values(n * k, 32)), h.round(&values(m * r, 33)), h.round(&values(n * r, 34)), h.round(&values(n, 35)));
        let got = run_kernel(&module, kernel, h, BLayout::NMajor, &x, &w, &t, &b, Some(&bias), (m, n, k, r), 0);
        assert_close(&format!("hopper forward {blocks} blocks"), &got, &lora::concat_gemm(&x, &w, &t, &b, Some(&bias), (m, n, k, r), BLayout::NMajor), tolerance(h));
        let (h, r) = (Half::F16, 72);
        let (dy, w, su, a) = (h.round(&values(m * k, 36)), h.round(&values(k * n, 37)), h.round(&values(m * r, 38)), h.round(&values(r * n, 39)));
        let got = run_kernel(&module, kernel, h, BLayout::KMajor, &dy, &w, &su, &a, None, (m, n, k, r), 0);
        assert_close(&format!("hopper dx {blocks} blocks"), &got, &lora::concat_gemm(&dy, &w, &su, &a, None, (m, n, k, r), BLayout::KMajor), tolerance(h));
    }
}
