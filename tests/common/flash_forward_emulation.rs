//! What the emulated tests of the flash-attention forward kernels share
//! (tests/flash_attention_emulated.rs for flash_attention_fwd_* of kernels/cuda/flash_attention.cu,
//! tests/flash_attention_hopper_emulated.rs for flash_attention_hopper_fwd_* of
//! kernels/cuda/flash_attention_hopper.cu; both take the same FlashParams): [B, H, L, D] operands
//! in strided 16-bit storage whose unused elements are NaN, the kernel parameters, the launch on
//! the CPU emulator of CUDA (kernels::emulate), the output and lse checks, and an extended-attention
//! case run against kernels::flash_attention::flash_attention_head. The test file includes it after
//! tests/common/emulation.rs (`mod emulation;`).
#![allow(dead_code)]

use kernels::compile::KernelSource;
use kernels::emulate::{EmulatedModule, TensorMap2d, TensorMapArg, TmaDtype, TmaSwizzle};
use kernels::flash_attention::{self as fa, flash_attention_head, FlashDims, FlashParams};

use crate::emulation::{values, Aligned, Half};

/// The forward kernel a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKernel {
    /// flash_attention_fwd_* (and flash_attention_decoupled_fwd_*) of
    /// kernels/cuda/flash_attention.cu (mma.sync, sm_80+).
    MmaSync,
    /// flash_attention_hopper_fwd_* of kernels/cuda/flash_attention_hopper.cu (wgmma, sm_90a).
    Hopper,
    /// Its variant of that name (kernels::flash_attention::HOPPER_D64_VARIANTS) at head dim 64;
    /// the default instance at 128 (which has no variants).
    HopperVariant(&'static str),
}

impl ForwardKernel {
    /// The kernel file of the instance at head dim d.
    fn source(self, d: usize) -> &'static KernelSource {
        match self {
            ForwardKernel::MmaSync => &fa::SOURCE,
            ForwardKernel::Hopper => &fa::HOPPER_SOURCE,
            // The warp-specialized variants live in their own file (D 64 only).
            ForwardKernel::HopperVariant(v) => fa::hopper_launch(d, Some(v)).0,
        }
    }

    /// The extended-attention instance at this dtype and head dim.
    fn kernel_name(self, ty: Half, d: usize) -> String {
        match self {
            ForwardKernel::MmaSync => fa::kernel_name(ty.name(), d),
            ForwardKernel::Hopper => fa::hopper_kernel_name(ty.name(), d),
            ForwardKernel::HopperVariant(v) if d == 64 => fa::hopper_variant_kernel_name(ty.name(), v),
            ForwardKernel::HopperVariant(_) => fa::hopper_kernel_name(ty.name(), d),
        }
    }

    /// (query rows a block, threads a block, dynamic shared bytes) at head dim d.
    fn geometry(self, d: usize) -> (usize, u32, u32) {
        match self {
            ForwardKernel::MmaSync => (fa::rows_per_block(d), fa::THREADS, fa::shared_bytes(d)),
            ForwardKernel::Hopper => (fa::hopper_rows_per_block(d), fa::hopper_threads(d), fa::hopper_shared_bytes(d)),
            ForwardKernel::HopperVariant(v) => {
                let (_, threads, rows, smem) = fa::hopper_launch(d, Some(v));
                (rows, threads, smem)
            }
        }
    }
}

/// (atol, rtol) of the output: P is rounded to the 16-bit type before P V, and the output too.
pub fn out_tolerance(ty: Half) -> (f32, f32) {
    match ty {
        Half::Bf16 => (1e-2, 1e-2),
        Half::F16 => (2e-3, 2e-3),
    }
}

/// One [B, H, L, D] operand: rounded values (f32, [B, H, L, D] order) and its 16-bit storage with
/// the given element strides (batch, head, row; unit along D).
pub struct Operand {
    pub vals: Vec<f32>,
    pub buf: Aligned<u16>,
    pub strides: [i64; 3],
}

pub fn operand(ty: Half, (b, h, l, d): (usize, usize, usize, usize), strides: [usize; 3], storage_len: usize, seed: u64) -> Operand {
    let vals = ty.round(&values(b * h * l * d, seed));
    // Unused storage (padding, gaps) holds NaN so that a read outside the view shows.
    let mut bits = vec![ty.bits(f32::NAN); storage_len.max(1)];
    for (i, &x) in vals.iter().enumerate() {
        let (bi, hi, li, c) = (i / (h * l * d), (i / (l * d)) % h, (i / d) % l, i % d);
        bits[bi * strides[0] + hi * strides[1] + li * strides[2] + c] = ty.bits(x);
    }
    Operand { vals, buf: Aligned::from(&bits), strides: strides.map(|s| s as i64) }
}

/// The kernel's parameters for these operands, out ([B, Lq, H, D] memory) and lse ([B, H, Lq]):
/// the extended mode without a keep mask (callers set the keep mask or the decoupled fields).
#[allow(clippy::too_many_arguments)]
pub fn params([q, k, v, kr, vr]: [&Operand; 5], out: &Aligned<u16>, lse: &mut [f32], h: usize, lq: usize, lk: usize, lr: usize, d: usize, scale: f32) -> FlashParams {
    FlashParams {
        q: q.buf.addr(),
        k: k.buf.addr(),
        v: v.buf.addr(),
        k_ref: kr.buf.addr(),
        v_ref: vr.buf.addr(),
        keep: 0,
        out: out.addr(),
        lse: lse.as_mut_ptr() as u64,
        lse2: 0,
        q_stride: q.strides,
        k_stride: k.strides,
        v_stride: v.strides,
        k_ref_stride: kr.strides,
        v_ref_stride: vr.strides,
        out_stride: [(lq * h * d) as i64, d as i64, (h * d) as i64],
        keep_batch_stride: 0,
        heads: h as u32,
        lq: lq as u32,
        lk: lk as u32,
        lr: lr as u32,
        scale_log2: scale * std::f32::consts::LOG2_E,
        decoupled_scale: 0.0,
    }
}

/// Runs instance `name` of the kernel's file on the emulator over (query blocks, H, B) with the
/// kernel's block geometry; returns the seconds it took.
///
/// # Safety
/// Every address in `p` points into a live buffer covering the strides and sizes given.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch(kernel: ForwardKernel, name: &str, p: FlashParams, b: usize, h: usize, lq: usize, d: usize) -> f32 {
    let m = EmulatedModule::load(kernel.source(d)).unwrap_or_else(|e| panic!("{e}"));
    let (rows, threads, shared_bytes) = kernel.geometry(d);
    let grid = (lq.div_ceil(rows) as u32, h as u32, b as u32);
    let maps = name.ends_with(fa::WS_TMA_VARIANT).then(|| ws_tma_maps(name, &p, b, h));
    let t = std::time::Instant::now();
    // SAFETY: FlashParams mirrors the kernel's struct (the TMA instance takes the four maps after
    // it); the addresses are the caller's promise.
    unsafe {
        m.launch(name, grid, (threads, 1, 1), shared_bytes, &|f| match &maps {
            Some([k, v, kr, vr]) => {
                let kernel: extern "C" fn(FlashParams, TensorMapArg, TensorMapArg, TensorMapArg, TensorMapArg) = std::mem::transmute(f);
                kernel(p, *k, *v, *kr, *vr);
            }
            None => {
                let kernel: extern "C" fn(FlashParams) = std::mem::transmute(f);
                kernel(p);
            }
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    t.elapsed().as_secs_f32()
}

/// The emulated tensor maps of the "ws_tma" instance `name` (k, v, k_ref, v_ref;
/// kernels::flash_attention::ws_tma_map), as the engine builds them: a source with no key uses the
/// other's maps; with no key at all (no tile is loaded) a one-row map over q stands in.
fn ws_tma_maps(name: &str, p: &FlashParams, b: usize, h: usize) -> [TensorMapArg; 4] {
    let dt = if name.contains("_bf16_") { TmaDtype::Bf16 } else { TmaDtype::F16 };
    let map = |base: u64, strides: [i64; 3], l: u32| {
        let m = fa::ws_tma_map(dt, base, strides, (b, h, l as usize)).unwrap_or_else(|| panic!("{name}: the test's views can be mapped ({strides:?}, L {l})"));
        m.emulated().unwrap_or_else(|e| panic!("{e}"))
    };
    match (p.lk, p.lr) {
        (0, 0) => {
            let q = TensorMap2d { base: p.q, dtype: dt, rows: 1, cols: 64, row_stride_bytes: 128, box_rows: 128, box_cols: 64, swizzle: TmaSwizzle::B128 };
            [q.emulated().unwrap_or_else(|e| panic!("{e}")); 4]
        }
        (_, 0) => {
            let (k, v) = (map(p.k, p.k_stride, p.lk), map(p.v, p.v_stride, p.lk));
            [k, v, k, v]
        }
        (0, _) => {
            let (kr, vr) = (map(p.k_ref, p.k_ref_stride, p.lr), map(p.v_ref, p.v_ref_stride, p.lr));
            [kr, vr, kr, vr]
        }
        _ => [map(p.k, p.k_stride, p.lk), map(p.v, p.v_stride, p.lk), map(p.k_ref, p.k_ref_stride, p.lr), map(p.v_ref, p.v_ref_stride, p.lr)],
    }
}

/// One output row of the kernel (16-bit) against the reference: |got - want| <= atol + rtol |want|
/// per element. Returns the largest error.
pub fn check_out_row(what: &str, ty: Half, got: &[u16], want: &[f32], (atol, rtol): (f32, f32)) -> f32 {
    let mut worst = 0f32;
    for (col, (&g, &e)) in got.iter().zip(want).enumerate() {
        let got = ty.value(g);
        let err = (got - e).abs();
        worst = worst.max(err);
        assert!(err <= atol + rtol * e.abs(), "{what} col {col}: {got} vs {e}");
    }
    worst
}

/// One lse of the kernel against the reference: -inf exactly (a row with no key), else within
/// 1e-4 relative (absolute below 1). Returns the error (0 for -inf).
pub fn check_lse(what: &str, got: f32, want: f32) -> f32 {
    if want == f32::NEG_INFINITY {
        assert_eq!(got, want, "{what}");
        return 0.0;
    }
    let err = (got - want).abs();
    assert!(err <= 1e-4 * want.abs().max(1.0), "{what}: {got} vs {want}");
    err
}

/// An extended-attention case: own keys [Lk] then reference keys [Lr].
pub struct Case {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub lr: usize,
    pub d: usize,
    /// [B, Lr] keep mask, or None (every reference token kept).
    pub keep: Option<Vec<u8>>,
    pub scale: f32,
}

/// Runs the case's instance of the kernel on the emulator and checks every output row and lse
/// against kernels::flash_attention::flash_attention_head. q and v are [B, L, H, D] memory (heads
/// interleaved), k contiguous [B, H, Lk, D], the reference rows padded by 8 elements.
pub fn run_case(kernel: ForwardKernel, ty: Half, c: &Case) {
    let Case { b, h, lq, lk, lr, d, scale, .. } = *c;
    // q: [B, Lq, H, D] memory (heads interleaved, as the models' projections give).
    let q = operand(ty, (b, h, lq, d), [lq * h * d, d, h * d], b * lq * h * d, 1);
    let k = operand(ty, (b, h, lk, d), [h * lk * d, lk * d, d], b * h * lk * d, 2);
    // v: heads interleaved too ([B, Lk, H, D] memory: the UNet's layout, which ws_tma maps by its
    // rank-4 tensor maps).
    let v = operand(ty, (b, h, lk, d), [lk * h * d, d, h * d], b * h * lk * d, 3);
    // Reference rows padded by 8 elements (a narrowed view of wider rows).
    let rs = d + 8;
    let kr = operand(ty, (b, h, lr, d), [h * lr * rs, lr * rs, rs], b * h * lr * rs, 4);
    let vr = operand(ty, (b, h, lr, d), [h * lr * rs, lr * rs, rs], b * h * lr * rs, 5);
    let keep = c.keep.clone();
    let out = Aligned::from(&vec![ty.bits(f32::NAN); b * lq * h * d]);
    let mut lse = vec![f32::NAN; b * h * lq];
    let p = FlashParams {
        keep: keep.as_ref().map_or(0, |m| m.as_ptr() as u64),
        keep_batch_stride: lr as i64,
        ..params([&q, &k, &v, &kr, &vr], &out, &mut lse, h, lq, lk, lr, d, scale)
    };
    let name = kernel.kernel_name(ty, d);
    // SAFETY: every address in p points into a live buffer covering the strides and sizes given
    // (out and lse written, the rest read).
    let took = unsafe { launch(kernel, &name, p, b, h, lq, d) };

    fn head(o: &Operand, bh: usize, l: usize, d: usize) -> &[f32] {
        &o.vals[bh * l * d..(bh + 1) * l * d]
    }
    let mut worst = (0f32, 0f32);
    for bh in 0..b * h {
        let (bi, hi) = (bh / h, bh % h);
        let (mut want, mut want_lse) = (vec![0f32; lq * d], vec![0f32; lq]);
        let keep_b = keep.as_ref().map(|m| &m[bi * lr..(bi + 1) * lr]);
        flash_attention_head(head(&q, bh, lq, d), head(&k, bh, lk, d), head(&v, bh, lk, d), head(&kr, bh, lr, d), head(&vr, bh, lr, d), keep_b, FlashDims { lq, lk, lr, d }, scale, &mut want, &mut want_lse);
        for i in 0..lq {
            let row = ((bi * lq + i) * h + hi) * d;
            worst.0 = worst.0.max(check_out_row(&format!("{name} b{bi} h{hi} row {i}"), ty, &out.as_ref()[row..row + d], &want[i * d..(i + 1) * d], out_tolerance(ty)));
            worst.1 = worst.1.max(check_lse(&format!("{name} b{bi} h{hi} lse[{i}]"), lse[bh * lq + i], want_lse[i]));
        }
    }
    lookahead::show(&format!(
        "{name} emulated: B {b} H {h} Lq {lq} Lk {lk} Lr {lr} keep {}: max |out err| {:.2e}, max |lse err| {:.2e} ({took:.1} s)",
        if keep.is_some() { "mask" } else { "none" },
        worst.0,
        worst.1
    ));
}

/// Some reference tokens dropped in each batch entry, a different set in each.
pub fn keep_mask(b: usize, lr: usize) -> Vec<u8> {
    (0..b * lr).map(|i| !(i * 7 + i / lr).is_multiple_of(5) as u8).collect()
}
