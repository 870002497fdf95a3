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
//!
//! The TMA kernels (kernels/cuda/lora_linear_tma.cu, LOOKAHEAD_VARIANT_LORA=tma / tma256 /
//! tma-pp: TMA loads into a ring of stages handed between a producer warp and two consumer
//! warpgroups by mbarriers) run the same sizes with the ranks they take (multiples of 8: 0, 8,
//! 72), every variant (128-row tiles: 4 output tiles on 3 blocks, 10 k-tiles through 6 stages;
//! 256: 2 tiles on 2 blocks, 4 stages; ping-pong: the two consumer warpgroups on alternate tiles
//! of a block, so with 1 block each takes 2 of the 4 tiles), under every schedule of the emulator (far-apart runs the producer as far
//! ahead as the empty barriers let it; round-robin and random interleave it with the consumers),
//! and with idle blocks.
//!
//! The tma-mc kernels (LOOKAHEAD_VARIANT_LORA=tma-mc: 128 x 160 tiles in clusters of 2 CTAs that
//! multicast the B tile, each CTA loading half of it; both CTAs' consumers free each stage with
//! local and remote arrivals) run the same cases, launched in clusters of 2 as the engine does,
//! plus M = 300 (3 row tiles: the last pair's second CTA has no tile, loads its half of B and
//! stores nothing) and M = 37 (one row tile: the second CTA never has one), on one cluster
//! (several tile pairs a cluster, the ring wrapping across them), 2 clusters and 5 (idle
//! clusters), under every schedule.

use kernels::lora_linear::{self as lora, BLayout};

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/lora_emulation.rs"]
mod lora_emulation;
use emulation::{values, Half};
use kernels::emulate::Schedule;
use lora_emulation::{assert_close, module, run_kernel, run_kernel_with, tolerance, LoraKernel};

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

/// The TMA kernels' ranks: multiples of 8 (TMA needs 16-byte row strides); 72 is a full LoRA
/// k-tile and one of 8.
const TMA_RANKS: [usize; 3] = [0, 8, 72];
const SCHEDULES: [Schedule; 4] = [Schedule::FarApart, Schedule::RoundRobin, Schedule::Random(7), Schedule::Random(1234)];

/// The TMA variants: (tile rows, ping-pong) = tma, tma256, tma-pp.
const TMA_VARIANTS: [(usize, bool); 3] = [(128, false), (256, false), (128, true)];

fn tma((tile_m, pingpong): (usize, bool)) -> LoraKernel {
    LoraKernel::Tma { tile_m, pingpong, sms: EMULATED_SMS, blocks: None }
}

#[test]
fn tma_forward_n_major_matches_the_reference() {
    let Some(module) = module(tma(TMA_VARIANTS[0]), "tma_forward_n_major_matches_the_reference") else { return };
    for variant in TMA_VARIANTS {
        lora_emulation::forward_n_major_matches_the_reference(&module, tma(variant), (M, WIDTH, REDUCTION), &TMA_RANKS);
    }
}

#[test]
fn tma_dx_k_major_matches_the_reference() {
    let Some(module) = module(tma(TMA_VARIANTS[0]), "tma_dx_k_major_matches_the_reference") else { return };
    for variant in TMA_VARIANTS {
        lora_emulation::dx_k_major_matches_the_reference(&module, tma(variant), (M, REDUCTION, WIDTH), &TMA_RANKS);
    }
}

#[test]
fn tma_every_schedule_and_block_count() {
    let Some(module) = module(tma(TMA_VARIANTS[0]), "tma_every_schedule_and_block_count") else { return };
    let (m, n, k) = (M, WIDTH, REDUCTION);
    for (tile_m, pingpong) in TMA_VARIANTS {
        // The engine's grid, one block (every tile through one ring), and more blocks than tiles.
        for blocks in [None, Some(1), Some(5)] {
            let kernel = LoraKernel::Tma { tile_m, pingpong, sms: EMULATED_SMS, blocks };
            for schedule in SCHEDULES {
                let (h, r) = (Half::Bf16, 8);
                let (x, w, t, b, bias) = (h.round(&values(m * k, 41)), h.round(&values(n * k, 42)), h.round(&values(m * r, 43)), h.round(&values(n * r, 44)), h.round(&values(n, 45)));
                let got = run_kernel_with(&module, kernel, schedule, h, BLayout::NMajor, &x, &w, &t, &b, Some(&bias), (m, n, k, r), 0);
                let label = format!("tma{tile_m} pingpong {pingpong} forward blocks {blocks:?} schedule {schedule}");
                assert_close(&label, &got, &lora::concat_gemm(&x, &w, &t, &b, Some(&bias), (m, n, k, r), BLayout::NMajor), tolerance(h));
                let (h, r) = (Half::F16, 72);
                let (dy, w, su, a) = (h.round(&values(m * k, 46)), h.round(&values(k * n, 47)), h.round(&values(m * r, 48)), h.round(&values(r * n, 49)));
                let got = run_kernel_with(&module, kernel, schedule, h, BLayout::KMajor, &dy, &w, &su, &a, None, (m, n, k, r), 0);
                let label = format!("tma{tile_m} pingpong {pingpong} dx blocks {blocks:?} schedule {schedule}");
                assert_close(&label, &got, &lora::concat_gemm(&dy, &w, &su, &a, None, (m, n, k, r), BLayout::KMajor), tolerance(h));
            }
        }
    }
}

#[test]
fn tma_single_partial_tile() {
    // One partial tile each way (m 37, n 24), k 40 (one k-tile of 40: three k16 steps, the last
    // half zero fill), rank 8 (one LoRA k16 step), both layouts, f16, with bias.
    let Some(module) = module(tma(TMA_VARIANTS[0]), "tma_single_partial_tile") else { return };
    let h = Half::F16;
    let (m, n, k, r) = (37, 24, 40, 8);
    let (x, w, t, b, bias) = (h.round(&values(m * k, 23)), h.round(&values(n * k, 24)), h.round(&values(m * r, 25)), h.round(&values(n * r, 26)), h.round(&values(n, 27)));
    for variant in TMA_VARIANTS {
        for layout in [BLayout::NMajor, BLayout::KMajor] {
            let got = run_kernel(&module, tma(variant), h, layout, &x, &w, &t, &b, Some(&bias), (m, n, k, r), 0);
            assert_close(&format!("tma {variant:?} single partial tile {layout:?}"), &got, &lora::concat_gemm(&x, &w, &t, &b, Some(&bias), (m, n, k, r), layout), tolerance(h));
        }
    }
}

/// tma-mc on the grid the engine launches for a device of EMULATED_SMS SMs (1 cluster of 2 CTAs).
const MC: LoraKernel = LoraKernel::TmaMc { sms: EMULATED_SMS, blocks: None };
/// Rows with an odd number of 128-row tiles (3: the last pair has a lone tile).
const M_ODD: usize = 300;

#[test]
fn tma_mc_forward_n_major_matches_the_reference() {
    let Some(module) = module(MC, "tma_mc_forward_n_major_matches_the_reference") else { return };
    for m in [M, M_ODD] {
        lora_emulation::forward_n_major_matches_the_reference(&module, MC, (m, WIDTH, REDUCTION), &TMA_RANKS);
    }
}

#[test]
fn tma_mc_dx_k_major_matches_the_reference() {
    let Some(module) = module(MC, "tma_mc_dx_k_major_matches_the_reference") else { return };
    for m in [M, M_ODD] {
        lora_emulation::dx_k_major_matches_the_reference(&module, MC, (m, REDUCTION, WIDTH), &TMA_RANKS);
    }
}

#[test]
fn tma_mc_every_schedule_and_cluster_count() {
    let Some(module) = module(MC, "tma_mc_every_schedule_and_cluster_count") else { return };
    let (n, k) = (WIDTH, REDUCTION);
    for m in [M, M_ODD] {
        // The engine's grid (1 cluster), 2 clusters and 5 (M 300: 4 tile pairs, so one idle).
        for blocks in [None, Some(4), Some(10)] {
            let kernel = LoraKernel::TmaMc { sms: EMULATED_SMS, blocks };
            for schedule in SCHEDULES {
                let (h, r) = (Half::Bf16, 8);
                let (x, w, t, b, bias) = (h.round(&values(m * k, 51)), h.round(&values(n * k, 52)), h.round(&values(m * r, 53)), h.round(&values(n * r, 54)), h.round(&values(n, 55)));
                let got = run_kernel_with(&module, kernel, schedule, h, BLayout::NMajor, &x, &w, &t, &b, Some(&bias), (m, n, k, r), 0);
                let label = format!("tma-mc forward m {m} blocks {blocks:?} schedule {schedule}");
                assert_close(&label, &got, &lora::concat_gemm(&x, &w, &t, &b, Some(&bias), (m, n, k, r), BLayout::NMajor), tolerance(h));
                let (h, r) = (Half::F16, 72);
                let (dy, w, su, a) = (h.round(&values(m * k, 56)), h.round(&values(k * n, 57)), h.round(&values(m * r, 58)), h.round(&values(r * n, 59)));
                let got = run_kernel_with(&module, kernel, schedule, h, BLayout::KMajor, &dy, &w, &su, &a, None, (m, n, k, r), 0);
                let label = format!("tma-mc dx m {m} blocks {blocks:?} schedule {schedule}");
                assert_close(&label, &got, &lora::concat_gemm(&dy, &w, &su, &a, None, (m, n, k, r), BLayout::KMajor), tolerance(h));
            }
        }
    }
}

#[test]
fn tma_mc_single_row_tile() {
    // One partial row tile (m 37: the cluster's second CTA never has a tile) and one partial
    // column tile (n 24), k 40 (one k-tile of 40), rank 8, both layouts, f16, with bias.
    let Some(module) = module(MC, "tma_mc_single_row_tile") else { return };
    let h = Half::F16;
    let (m, n, k, r) = (37, 24, 40, 8);
    let (x, w, t, b, bias) = (h.round(&values(m * k, 23)), h.round(&values(n * k, 24)), h.round(&values(m * r, 25)), h.round(&values(n * r, 26)), h.round(&values(n, 27)));
    for layout in [BLayout::NMajor, BLayout::KMajor] {
        for schedule in SCHEDULES {
            let got = run_kernel_with(&module, MC, schedule, h, layout, &x, &w, &t, &b, Some(&bias), (m, n, k, r), 0);
            assert_close(&format!("tma-mc single row tile {layout:?} schedule {schedule}"), &got, &lora::concat_gemm(&x, &w, &t, &b, Some(&bias), (m, n, k, r), layout), tolerance(h));
        }
    }
}
