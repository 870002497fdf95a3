//! What the emulated tests of the fused LoRA GEMM kernels share (tests/lora_linear_emulated.rs for
//! lora_gemm_{nk,kn}_* of kernels/cuda/lora_linear.cu, tests/lora_linear_hopper_emulated.rs for
//! lora_gemm_hopper_{nk,kn}_* of kernels/cuda/lora_linear_hopper.cu; both take the same
//! LoraGemmArgs): 16-byte aligned operands with a chosen misalignment, the launch on the CPU
//! emulator of CUDA (kernels::emulate) with an output that starts as NaN (an unwritten element
//! fails), the comparisons against kernels::lora_linear (the kernel contract `concat_gemm` and the
//! op's forward / backward), and the cases both kernels run, each at the sizes its test file
//! picks. The test file includes it after tests/common/emulation.rs (`mod emulation;`).
#![allow(dead_code)]

use kernels::emulate::{EmulatedModule, Schedule, TensorMap2d, TensorMapArg, TmaDtype, TmaSwizzle};
use kernels::lora_linear::{self as lora, BLayout, LoraDims, LoraGemmArgs};

use crate::emulation::{have_compiler, values, Half};

/// The kernel a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraKernel {
    /// lora_gemm_{nk,kn}_DT of kernels/cuda/lora_linear.cu (mma.sync): a block per output tile.
    MmaSync,
    /// lora_gemm_hopper_{nk,kn}_DT of kernels/cuda/lora_linear_hopper.cu (wgmma): persistent
    /// blocks, as many as the engine launches on a device of `sms` SMs (lora::hopper_blocks).
    Hopper { sms: u32 },
    /// The Hopper kernels on exactly this many blocks (more than the output tiles: idle blocks).
    HopperBlocks(u32),
    /// lora_gemm_tma_{nk,kn}_DT (tile_m 128), lora_gemm_tma256_{nk,kn}_DT (256) or, with
    /// `pingpong`, lora_gemm_tma_pp_{nk,kn}_DT (128) of kernels/cuda/lora_linear_tma.cu (TMA
    /// loads, a producer warp and two consumer warpgroups): persistent blocks, as many as the
    /// engine launches on a device of `sms` SMs (lora::tma_blocks), or exactly `blocks` when
    /// given (idle blocks beyond the tiles).
    Tma { tile_m: usize, pingpong: bool, sms: u32, blocks: Option<u32> },
    /// lora_gemm_tma_mc_{nk,kn}_DT of kernels/cuda/lora_linear_tma.cu (128 x 160 tiles, clusters
    /// of 2 CTAs multicasting B): launched in clusters (lora::TMA_MC_CLUSTER) on as many blocks as
    /// the engine launches on a device of `sms` SMs (lora::tma_mc_blocks with sms / 2 clusters),
    /// or exactly `blocks` (a multiple of 2; idle clusters beyond the tile pairs).
    TmaMc { sms: u32, blocks: Option<u32> },
}

impl LoraKernel {
    fn source(self) -> &'static kernels::compile::KernelSource {
        match self {
            LoraKernel::MmaSync => &lora::SOURCE,
            LoraKernel::Hopper { .. } | LoraKernel::HopperBlocks(_) => &lora::HOPPER_SOURCE,
            LoraKernel::Tma { .. } | LoraKernel::TmaMc { .. } => &lora::TMA_SOURCE,
        }
    }

    /// What the case labels start with.
    fn label(self) -> &'static str {
        match self {
            LoraKernel::MmaSync => "",
            LoraKernel::Hopper { .. } | LoraKernel::HopperBlocks(_) => "hopper ",
            LoraKernel::Tma { pingpong: true, .. } => "tma-pp ",
            LoraKernel::Tma { tile_m: 128, .. } => "tma ",
            LoraKernel::Tma { .. } => "tma256 ",
            LoraKernel::TmaMc { .. } => "tma-mc ",
        }
    }

    /// (instance name, grid, threads a block, dynamic shared bytes) for a C of m x n.
    fn geometry(self, layout: BLayout, h: Half, m: usize, n: usize) -> (String, (u32, u32, u32), u32, u32) {
        match self {
            LoraKernel::MmaSync => (lora::kernel_name(layout, h.name()), (n.div_ceil(lora::TILE_N) as u32, m.div_ceil(lora::TILE_M) as u32, 1), lora::THREADS, lora::SHARED_BYTES),
            LoraKernel::Hopper { sms } => (lora::hopper_kernel_name(layout, h.name()), (lora::hopper_blocks(m, n, sms), 1, 1), lora::HOPPER_THREADS, lora::HOPPER_SHARED_BYTES),
            LoraKernel::HopperBlocks(blocks) => (lora::hopper_kernel_name(layout, h.name()), (blocks, 1, 1), lora::HOPPER_THREADS, lora::HOPPER_SHARED_BYTES),
            LoraKernel::Tma { tile_m, pingpong, sms, blocks } => {
                let grid = blocks.unwrap_or_else(|| lora::tma_blocks(m, n, tile_m, sms));
                (lora::tma_kernel_name(layout, h.name(), tile_m, pingpong), (grid, 1, 1), lora::TMA_THREADS, lora::tma_shared_bytes(tile_m))
            }
            LoraKernel::TmaMc { sms, blocks } => {
                let grid = blocks.unwrap_or_else(|| lora::tma_mc_blocks(m, n, sms / lora::TMA_MC_CLUSTER));
                (lora::tma_mc_kernel_name(layout, h.name()), (grid, 1, 1), lora::TMA_THREADS, lora::tma_shared_bytes(128))
            }
        }
    }
}

/// The kernel's file built for the emulator, or None (after saying so) without a C++ compiler.
pub fn module(kernel: LoraKernel, test: &str) -> Option<EmulatedModule> {
    if !have_compiler(test) {
        return None;
    }
    let source = kernel.source();
    Some(EmulatedModule::load(source).unwrap_or_else(|e| panic!("emulating {}: {e}", source.path())))
}

/// (atol, rtol) of the kernel against the f32 reference on the same 16-bit inputs: one rounding
/// of the output plus f32 accumulation-order noise.
pub fn tolerance(h: Half) -> (f32, f32) {
    match h {
        Half::Bf16 => (1e-2, 8e-3),
        Half::F16 => (2e-3, 1.5e-3),
    }
}

/// 16-bit elements in a 16-byte aligned buffer (the kernels' cp.async operands must be), at an
/// element offset `skew` from the aligned start (skew 1 gives a deliberately misaligned operand).
struct Buffer {
    words: Vec<u128>,
    skew: usize,
    len: usize,
}

impl Buffer {
    fn new(bits: &[u16], skew: usize) -> Buffer {
        let mut b = Buffer { words: vec![0u128; (bits.len() + skew).div_ceil(8).max(1)], skew, len: bits.len() };
        b.slice_mut().copy_from_slice(bits);
        b
    }
    fn slice_mut(&mut self) -> &mut [u16] {
        // SAFETY: the u128 words hold at least skew + len u16s; u16 has no invalid bit patterns.
        unsafe { std::slice::from_raw_parts_mut((self.words.as_mut_ptr() as *mut u16).add(self.skew), self.len) }
    }
    fn addr(&self) -> u64 {
        (self.words.as_ptr() as *const u16).wrapping_add(self.skew) as u64
    }
}

/// Runs the kernel (layout and dtype instance) on the emulator: C [m, n] = A1 [m, k1] · B1 +
/// A2 [m, k2] · B2 (+ bias), B1/B2 given as [n][k] (NMajor) or [k][n] (KMajor) rows; returns C as
/// f32. `skew_lora`: the element offset of A2 (and of an n-major B2) from 16-byte alignment.
#[allow(clippy::too_many_arguments)]
pub fn run_kernel(module: &EmulatedModule, kernel: LoraKernel, h: Half, layout: BLayout, a1: &[f32], b1: &[f32], a2: &[f32], b2: &[f32], bias: Option<&[f32]>, dims: (usize, usize, usize, usize), skew_lora: usize) -> Vec<f32> {
    let schedule = Schedule::from_env().unwrap_or_else(|e| panic!("{e}"));
    run_kernel_with(module, kernel, schedule, h, layout, a1, b1, a2, b2, bias, dims, skew_lora)
}

/// `run_kernel` under the given schedule (whatever LOOKAHEAD_EMU_SCHEDULE says).
#[allow(clippy::too_many_arguments)]
pub fn run_kernel_with(
    module: &EmulatedModule,
    kernel: LoraKernel,
    schedule: Schedule,
    h: Half,
    layout: BLayout,
    a1: &[f32],
    b1: &[f32],
    a2: &[f32],
    b2: &[f32],
    bias: Option<&[f32]>,
    (m, n, k1, k2): (usize, usize, usize, usize),
    skew_lora: usize,
) -> Vec<f32> {
    let to = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| h.bits(x)).collect() };
    let (ba1, bb1) = (Buffer::new(&to(a1), 0), Buffer::new(&to(b1), 0));
    let (ba2, bb2) = (Buffer::new(&to(a2), skew_lora), Buffer::new(&to(b2), if layout == BLayout::KMajor { 0 } else { skew_lora }));
    let bbias = bias.map(|b| Buffer::new(&to(b), 1));
    let mut c = Buffer::new(&vec![0x7fffu16; m * n], 0); // NaN in both formats: unwritten shows
    let args = LoraGemmArgs {
        a1: ba1.addr(),
        b1: bb1.addr(),
        a2: ba2.addr(),
        b2: bb2.addr(),
        bias: bbias.as_ref().map_or(0, |b| b.addr()),
        c: c.addr(),
        m: m as u32,
        n: n as u32,
        k1: k1 as u32,
        k2: k2 as u32,
        lda1: k1 as u32,
        ldb1: if layout == BLayout::NMajor { k1 } else { n } as u32,
        lda2: k2 as u32,
        ldb2: if layout == BLayout::NMajor { k2 } else { n } as u32,
        ldc: n as u32,
        a2_vec: kernels::lora_linear::lora_rows(k2, ba2.addr()),
        b2_vec: if layout == BLayout::NMajor { kernels::lora_linear::lora_rows(k2, bb2.addr()) } else { 1 },
        pad: 0,
    };
    let (name, grid, threads, shared_bytes) = kernel.geometry(layout, h, m, n);
    let tma = match kernel {
        LoraKernel::Tma { tile_m, .. } => Some((tile_m, false)),
        LoraKernel::TmaMc { .. } => Some((128, true)),
        _ => None,
    };
    if let Some((tile_m, multicast)) = tma {
        let maps = tma_maps(&args, layout, tile_m, multicast, h);
        let cluster = if multicast { (lora::TMA_MC_CLUSTER, 1, 1) } else { (1, 1, 1) };
        // SAFETY: the TMA kernels' extern "C" signature is (LoraGemmArgs, TensorMap x 4) by value;
        // every pointer in args addresses a live buffer of the size the args describe, and the
        // maps describe those buffers.
        unsafe {
            module
                .launch_cluster_with(&name, grid, (threads, 1, 1), cluster, shared_bytes, schedule, &|f| {
                    let k: extern "C" fn(LoraGemmArgs, TensorMapArg, TensorMapArg, TensorMapArg, TensorMapArg) = std::mem::transmute(f);
                    k(args, maps[0], maps[1], maps[2], maps[3]);
                })
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        return c.slice_mut().iter().map(|&b| h.value(b)).collect();
    }
    // SAFETY: the kernel's extern "C" signature is (LoraGemmArgs) by value; every pointer in args
    // addresses a live buffer of the size the args describe.
    unsafe {
        module
            .launch_with(&name, grid, (threads, 1, 1), shared_bytes, schedule, &|f| {
                let k: extern "C" fn(LoraGemmArgs) = std::mem::transmute(f);
                k(args);
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    c.slice_mut().iter().map(|&b| h.value(b)).collect()
}

/// The four tensor maps of the TMA kernels (A1, B1, A2, B2) over the operands `args` describes, as
/// engine/src/cuda/lora_linear.rs builds them on a GPU: the boxes of kernels::lora_linear
/// (`tma_box_a`, `TMA_BOX_B_*`, with `multicast` the tma_mc kernels' half boxes `TMA_MC_BOX_B_*`);
/// rank 0: the A1 / B1 maps stand in for the unread A2 / B2.
fn tma_maps(args: &LoraGemmArgs, layout: BLayout, tile_m: usize, multicast: bool, h: Half) -> [TensorMapArg; 4] {
    let box_b = match (layout, multicast) {
        (BLayout::NMajor, false) => lora::TMA_BOX_B_NK,
        (BLayout::KMajor, false) => lora::TMA_BOX_B_KN,
        (BLayout::NMajor, true) => lora::TMA_MC_BOX_B_NK,
        (BLayout::KMajor, true) => lora::TMA_MC_BOX_B_KN,
    };
    let (m, n, k1, k2) = (args.m as usize, args.n as usize, args.k1 as usize, args.k2 as usize);
    let (b1_dims, b2_dims) = match layout {
        BLayout::NMajor => ((n, k1), (n, k2)),
        BLayout::KMajor => ((k1, n), (k2, n)),
    };
    let a1 = emulated_map(h, args.a1, (m, k1), args.lda1, lora::tma_box_a(tile_m));
    let b1 = emulated_map(h, args.b1, b1_dims, args.ldb1, box_b);
    if k2 == 0 {
        return [a1, b1, a1, b1];
    }
    [a1, b1, emulated_map(h, args.a2, (m, k2), args.lda2, lora::tma_box_a(tile_m)), emulated_map(h, args.b2, b2_dims, args.ldb2, box_b)]
}

/// One emulated tensor map: a row-major [rows, cols] 16-bit matrix at `base`, rows `ld` elements
/// apart, boxes of (box rows, box columns, swizzle bytes).
fn emulated_map(h: Half, base: u64, (rows, cols): (usize, usize), ld: u32, (box_rows, box_cols, swizzle): (u32, u32, u32)) -> TensorMapArg {
    let map = TensorMap2d {
        base,
        dtype: match h {
            Half::Bf16 => TmaDtype::Bf16,
            Half::F16 => TmaDtype::F16,
        },
        rows: rows as u64,
        cols: cols as u64,
        row_stride_bytes: ld as u64 * 2,
        box_rows,
        box_cols,
        swizzle: TmaSwizzle::from_bytes(swizzle).expect("a TMA swizzle"),
    };
    map.emulated().unwrap_or_else(|e| panic!("{e}"))
}

pub fn assert_close(label: &str, got: &[f32], want: &[f32], (atol, rtol): (f32, f32)) {
    let allowed: Vec<f32> = want.iter().map(|w| atol + rtol * w.abs()).collect();
    assert_within(label, got, want, &allowed);
}

/// |got - want| <= allowed, element by element (a NaN never passes).
pub fn assert_within(label: &str, got: &[f32], want: &[f32], allowed: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let mut worst: Option<(usize, f32)> = None;
    for (i, ((&g, &w), &a)) in got.iter().zip(want).zip(allowed).enumerate() {
        let excess = if g.is_nan() { f32::INFINITY } else { (g - w).abs() - a };
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!("{label}: element {i}: got {} want {} (allowed difference {})", got[i], want[i], allowed[i]);
    }
}

/// The end-to-end allowance: the kernel tolerance plus what rounding the LoRA operand lhs [m, r]
/// (t = s x A^T, or s u) to 16 bits can move C [m, n] = lhs · rhs^T (rhs [n, r]): Σ_q |lhs[i][q]| u |rhs[j][q]|.
fn rounding_allowance(h: Half, want: &[f32], lhs: &[f32], rhs: &[f32], (m, n, r): (usize, usize, usize)) -> Vec<f32> {
    let (atol, rtol) = tolerance(h);
    (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            atol + rtol * want[e].abs() + (0..r).map(|q| lhs[i * r + q].abs() * h.unit_roundoff() * rhs[j * r + q].abs()).sum::<f32>()
        })
        .collect()
}

/// (a b^T) · s for a [rows, inner], b [cols, inner], as the engine gets it from cuBLASLt: f32
/// accumulation (rounded to 16 bits by the caller).
fn scaled_product_bt(a: &[f32], b: &[f32], rows: usize, cols: usize, inner: usize, s: f32) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = s * (0..inner).map(|p| a[i * inner + p] * b[j * inner + p]).sum::<f32>();
        }
    }
    out
}

/// The forward y = [x | t] [W | B]^T (+ bias) of a layer of sizes (m, n, k) (x [m, k], W [n, k],
/// y [m, n]) with each rank of `ranks`, bf16 and f16, with and without bias: against the kernel
/// contract on the same 16-bit operands and against the op's forward.
pub fn forward_n_major_matches_the_reference(module: &EmulatedModule, kernel: LoraKernel, (m, n, k): (usize, usize, usize), ranks: &[usize]) {
    let s = 0.8f32;
    for h in [Half::Bf16, Half::F16] {
        for &r in ranks {
            let d = LoraDims { m, n, k, r };
            let (x, w, a, b, bias) = (h.round(&values(m * k, 1)), h.round(&values(n * k, 2)), h.round(&values(r * k, 3)), h.round(&values(n * r, 4)), h.round(&values(n, 5)));
            let t_exact = scaled_product_bt(&x, &a, m, r, k, s);
            let t = h.round(&t_exact);
            for with_bias in [false, true] {
                let bias = with_bias.then_some(&bias[..]);
                let label = format!("{}forward {} r {r} bias {with_bias}", kernel.label(), h.name());
                let got = run_kernel(module, kernel, h, BLayout::NMajor, &x, &w, &t, &b, bias, (m, n, k, r), 0);
                // The kernel's contract on the same 16-bit operands...
                assert_close(&label, &got, &lora::concat_gemm(&x, &w, &t, &b, bias, (m, n, k, r), BLayout::NMajor), tolerance(h));
                // ... and the op itself (t exact in f32: looser, t's rounding included).
                let want = lora::forward(&x, &w, bias, &a, &b, s, d);
                assert_within(&format!("{label} vs forward"), &got, &want, &rounding_allowance(h, &want, &t_exact, &b, (m, n, r)));
            }
        }
    }
}

/// The input gradient dx [m, k] = [dy | s u] · [W ; A] (output width k, reduction n then r) of a
/// layer of sizes (m, n, k) with each rank of `ranks`, bf16 and f16, with and without bias (the
/// kernel's, not the op's): against the kernel contract, and without bias against the op's backward.
pub fn dx_k_major_matches_the_reference(module: &EmulatedModule, kernel: LoraKernel, (m, n, k): (usize, usize, usize), ranks: &[usize]) {
    let s = -1.25f32;
    for h in [Half::Bf16, Half::F16] {
        for &r in ranks {
            let d = LoraDims { m, n, k, r };
            let (x, w, a, b, dy) = (h.round(&values(m * k, 11)), h.round(&values(n * k, 12)), h.round(&values(r * k, 13)), h.round(&values(n * r, 14)), h.round(&values(m * n, 15)));
            // s u = s dy B: B^T rows are B's columns.
            let bt: Vec<f32> = (0..r * n).map(|i| b[(i % n) * r + i / n]).collect();
            let su_exact = scaled_product_bt(&dy, &bt, m, r, n, s);
            let su = h.round(&su_exact);
            let bias = h.round(&values(k, 16));
            for with_bias in [false, true] {
                let bias = with_bias.then_some(&bias[..]);
                let label = format!("{}dx {} r {r} bias {with_bias}", kernel.label(), h.name());
                let got = run_kernel(module, kernel, h, BLayout::KMajor, &dy, &w, &su, &a, bias, (m, k, n, r), 0);
                assert_close(&label, &got, &lora::concat_gemm(&dy, &w, &su, &a, bias, (m, k, n, r), BLayout::KMajor), tolerance(h));
                if bias.is_none() {
                    // rhs of the LoRA term as [K, r] rows: A^T.
                    let at: Vec<f32> = (0..k * r).map(|i| a[(i % r) * k + i / r]).collect();
                    let want = lora::backward(&x, &w, &a, &b, s, &dy, d).dx;
                    assert_within(&format!("{label} vs backward"), &got, &want, &rounding_allowance(h, &want, &su_exact, &at, (m, k, r)));
                }
            }
        }
    }
}

/// Rank 8 with the LoRA operands one element off 16-byte alignment (n-major: element loads
/// instead of cp.async), both layouts, with bias; one partial tile in each direction (m 37, n 24)
/// and k 40 (a partial k-tile for either kernel).
pub fn misaligned_lora_single_partial_tile(module: &EmulatedModule, kernel: LoraKernel, h: Half) {
    let (m, n, k, r) = (37, 24, 40, 8);
    let (x, w, t, b) = (h.round(&values(m * k, 23)), h.round(&values(n * k, 24)), h.round(&values(m * r, 25)), h.round(&values(n * r, 26)));
    let bias = h.round(&values(n, 27));
    for layout in [BLayout::NMajor, BLayout::KMajor] {
        let got = run_kernel(module, kernel, h, layout, &x, &w, &t, &b, Some(&bias), (m, n, k, r), if layout == BLayout::NMajor { 1 } else { 0 });
        assert_close(&format!("{}misaligned lora {layout:?}", kernel.label()), &got, &lora::concat_gemm(&x, &w, &t, &b, Some(&bias), (m, n, k, r), layout), tolerance(h));
    }
}
