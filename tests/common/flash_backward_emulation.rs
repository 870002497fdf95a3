//! What the emulated tests of the flash-attention backward share (tests/flash_attention_backward_emulated.rs
//! for the mma.sync main kernel, tests/flash_attention_backward_hopper_emulated.rs for the Hopper
//! wgmma one): the inputs of a case ([B, L, H, D] memory read as [B, H, L, D] views, keep masks),
//! the f64 forward that gives out / lse, the CPU reference gradients
//! (kernels::flash_attention_backward), the launches of prep, main and dq kernels on the CPU
//! emulator of CUDA (kernels::emulate), the comparisons, and the list of cases as a macro that
//! writes one #[test] per case for a main kernel. The test file includes it with #[macro_use] after
//! tests/common/emulation.rs (`mod emulation;`).
#![allow(dead_code)]

use kernels::emulate::EmulatedModule;
use kernels::flash_attention::FlashDims;
use kernels::flash_attention_backward::{self as fab, flash_attention_backward_head, BackwardTiles, FlashBackwardParams, HeadGrads, HeadInputs, Rows};

use crate::emulation::{values, Aligned, Half};

/// The main kernel a test runs between the prep and dq kernels of
/// kernels/cuda/flash_attention_backward.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MainKernel {
    /// flash_bwd_{dtype}_d{d} of the same file (mma.sync, sm_80+).
    MmaSync,
    /// flash_bwd_hopper_{dtype}_d{d} of kernels/cuda/flash_attention_backward_hopper.cu (wgmma, sm_90a).
    Hopper,
    /// A variant of the Hopper kernel (LOOKAHEAD_VARIANT_FLASH_BWD, the top of that file):
    /// flash_bwd_hopper_{variant}_{dtype}_d64; head dim 128 runs the default kernel.
    HopperVariant(&'static str),
}

impl MainKernel {
    /// (source, instance name, keys a block, threads a block, dynamic shared bytes) at this dtype /
    /// head dim.
    fn geometry(self, dtype: Half, d: usize) -> (&'static kernels::compile::KernelSource, String, usize, u32, u32) {
        match self {
            MainKernel::MmaSync => {
                let tiles = BackwardTiles::for_head_dim(d).expect("a kernel head dim");
                (&fab::SOURCE, fab::kernel_names(dtype.name(), d).1, tiles.bc, tiles.threads(), tiles.shared_bytes(d))
            }
            MainKernel::Hopper => (&fab::HOPPER_SOURCE, fab::hopper_kernel_name(dtype.name(), d), fab::HOPPER_KEYS_PER_BLOCK, fab::HOPPER_THREADS, fab::hopper_shared_bytes(d).expect("a Hopper head dim")),
            MainKernel::HopperVariant(v) => {
                let name = if d == 64 { format!("flash_bwd_hopper_{v}_{}_d{d}", dtype.name()) } else { fab::hopper_kernel_name(dtype.name(), d) };
                let (source, threads, shared) = fab::hopper_launch(d, Some(v)).expect("a Hopper head dim");
                (source, name, fab::HOPPER_KEYS_PER_BLOCK, threads, shared)
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub dtype: Half,
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub lr: usize,
    pub d: usize,
    /// keep mask: None, Some(false) one [Lr] row for the batch, Some(true) [B, Lr].
    pub keep_per_batch: Option<bool>,
    /// Batch 0 drops every reference token (with lk = 0: rows with no key at all).
    pub drop_all_in_batch0: bool,
}

/// [B, L, H, D] memory of a [B, H, L, D] tensor: element (b, h, l, c) at this index.
fn at(case: &Case, l: usize, b: usize, h: usize, r: usize, c: usize) -> usize {
    ((b * l + r) * case.h + h) * case.d + c
}

/// One head's [L, D] rows copied out of [B, L, H, D] memory.
fn head(case: &Case, x: &[f32], l: usize, b: usize, h: usize) -> Vec<f32> {
    (0..l).flat_map(|r| (0..case.d).map(move |c| (r, c))).map(|(r, c)| x[at(case, l, b, h, r, c)]).collect()
}

/// One head's rows read in place from [B, L, H, D] memory.
fn head_rows<'a>(case: &Case, x: &'a [f32], l: usize, b: usize, h: usize) -> Rows<'a> {
    Rows { data: &x[at(case, l, b, h, 0, 0).min(x.len())..], row_stride: case.h * case.d }
}

/// Naive forward of one head in f64: (out [lq, d], lse [lq]) over [k ; kept k_ref].
#[allow(clippy::too_many_arguments)]
fn forward_head(q: &[f32], k: &[f32], v: &[f32], kr: &[f32], vr: &[f32], keep: &[u8], lq: usize, d: usize, scale: f64) -> (Vec<f32>, Vec<f32>) {
    let mut keys: Vec<(&[f32], &[f32])> = k.chunks(d).zip(v.chunks(d)).collect();
    keys.extend(kr.chunks(d).zip(vr.chunks(d)).zip(keep).filter(|(_, &m)| m != 0).map(|(kv, _)| kv));
    let (mut out, mut lse) = (vec![0f32; lq * d], vec![f32::NEG_INFINITY; lq]);
    for i in 0..lq {
        let qi = &q[i * d..(i + 1) * d];
        let s: Vec<f64> = keys.iter().map(|(kj, _)| scale * qi.iter().zip(*kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).collect();
        if s.is_empty() {
            continue;
        }
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lse[i] = l as f32;
        for c in 0..d {
            out[i * d + c] = s.iter().zip(&keys).map(|(sj, (_, vj))| (sj - l).exp() * vj[c] as f64).sum::<f64>() as f32;
        }
    }
    (out, lse)
}

/// [B, H, L, D] view strides (batch, head, row) of [B, L, H, D] memory.
fn strides(case: &Case, l: usize) -> [i64; 3] {
    [(l * case.h * case.d) as i64, case.d as i64, (case.h * case.d) as i64]
}

/// Runs the case through prep, `kernel` and dq on the emulator and checks every gradient against
/// the CPU reference (and dropped tokens / rows with no key against exact zeros).
pub fn run(case: Case, kernel: MainKernel) {
    let Case { dtype, b, h, lq, lk, lr, d, keep_per_batch, drop_all_in_batch0 } = case;
    let scale = 1.0 / (d as f32).sqrt();
    let (main_source, main, bc, threads, shared) = kernel.geometry(dtype, d);
    // Inputs as the 16-bit type holds them; q scaled up so that the softmax is not flat.
    let q = dtype.round(&values(b * lq * h * d, 1).iter().map(|x| 3.0 * x).collect::<Vec<_>>());
    let (k, v) = (dtype.round(&values(b * lk * h * d, 2)), dtype.round(&values(b * lk * h * d, 3)));
    let (kr, vr) = (dtype.round(&values(b * lr * h * d, 4)), dtype.round(&values(b * lr * h * d, 5)));
    let dout = dtype.round(&values(b * lq * h * d, 6));
    let keep: Vec<u8> = match keep_per_batch {
        None => vec![1; b * lr],
        Some(per_batch) => (0..b * lr).map(|i| if per_batch { (i * 7 % 5 != 0) as u8 } else { ((i % lr) % 3 != 1) as u8 }).collect(),
    };
    let keep: Vec<u8> = keep.iter().enumerate().map(|(i, &m)| if drop_all_in_batch0 && i < lr { 0 } else { m }).collect();
    let keep_of = |bi: usize| -> &[u8] {
        match keep_per_batch {
            Some(false) => &keep[..lr],
            _ => &keep[bi * lr..(bi + 1) * lr],
        }
    };
    // Forward (f64), out rounded to the 16-bit type as the forward kernel would write it.
    let mut out = vec![0f32; b * lq * h * d];
    let mut lse = vec![0f32; b * h * lq];
    for bi in 0..b {
        for hi in 0..h {
            let (o, l) = forward_head(&head(&case, &q, lq, bi, hi), &head(&case, &k, lk, bi, hi), &head(&case, &v, lk, bi, hi), &head(&case, &kr, lr, bi, hi), &head(&case, &vr, lr, bi, hi), keep_of(bi), lq, d, scale as f64);
            for r in 0..lq {
                for c in 0..d {
                    out[at(&case, lq, bi, hi, r, c)] = o[r * d + c];
                }
                lse[(bi * h + hi) * lq + r] = l[r];
            }
        }
    }
    let out = dtype.round(&out);

    // CPU reference gradients per head, read in place from [B, L, H, D] memory.
    let mut want: Vec<Vec<f32>> = [lq, lk, lk, lr, lr].iter().map(|&l| vec![0f32; b * l * h * d]).collect();
    for bi in 0..b {
        for hi in 0..h {
            let rows = |x, l| head_rows(&case, x, l, bi, hi);
            let x = HeadInputs { q: rows(&q, lq), k: rows(&k, lk), v: rows(&v, lk), reference: Some((rows(&kr, lr), rows(&vr, lr))), keep: keep_per_batch.map(|_| keep_of(bi)), out: rows(&out, lq), dout: rows(&dout, lq), lse: &lse[(bi * h + hi) * lq..], lse_stride: 1 };
            let mut g: Vec<Vec<f32>> = [lq, lk, lk, lr, lr].iter().map(|&l| vec![0f32; l * d]).collect();
            {
                let [dq, dk, dv, dkr, dvr] = &mut g[..] else { unreachable!() };
                flash_attention_backward_head(&x, FlashDims { lq, lk, lr, d }, scale, HeadGrads { dq, dk, dv, dk_ref: dkr, dv_ref: dvr });
            }
            for (which, l) in [lq, lk, lk, lr, lr].into_iter().enumerate() {
                for r in 0..l {
                    for c in 0..d {
                        want[which][at(&case, l, bi, hi, r, c)] = g[which][r * d + c];
                    }
                }
            }
        }
    }

    // The kernels, emulated.
    let bits = |x: &[f32]| Aligned::from(&x.iter().map(|&v| dtype.bits(v)).collect::<Vec<u16>>());
    let (qb, kb, vb, krb, vrb, outb, doutb) = (bits(&q), bits(&k), bits(&v), bits(&kr), bits(&vr), bits(&out), bits(&dout));
    let (lseb, keepb) = (Aligned::from(&lse), Aligned::from(&keep));
    let grads: Vec<Aligned<u16>> = [lq, lk, lk, lr, lr].iter().map(|&l| Aligned::from(&vec![0x7fffu16; b * l * h * d])).collect();
    let pad = fab::lq_pad(lq);
    // Scratch filled with garbage: the prep kernel must write all of it.
    let dq_accum = Aligned::from(&vec![f32::NAN; b * h * lq * d]);
    let (lse2, delta) = (Aligned::from(&vec![f32::NAN; b * h * pad]), Aligned::from(&vec![f32::NAN; b * h * pad]));
    let p = FlashBackwardParams {
        q: qb.addr(),
        k: kb.addr(),
        v: vb.addr(),
        k_ref: krb.addr(),
        v_ref: vrb.addr(),
        keep: if keep_per_batch.is_some() { keepb.addr() } else { 0 },
        out: outb.addr(),
        dout: doutb.addr(),
        lse: lseb.addr(),
        dq: grads[0].addr(),
        dk: grads[1].addr(),
        dv: grads[2].addr(),
        dk_ref: grads[3].addr(),
        dv_ref: grads[4].addr(),
        dq_accum: dq_accum.addr(),
        lse2: lse2.addr(),
        delta: delta.addr(),
        q_stride: strides(&case, lq),
        k_stride: strides(&case, lk),
        v_stride: strides(&case, lk),
        k_ref_stride: strides(&case, lr),
        v_ref_stride: strides(&case, lr),
        out_stride: strides(&case, lq),
        dout_stride: strides(&case, lq),
        lse_stride: [(h * lq) as i64, lq as i64, 1],
        dq_stride: strides(&case, lq),
        dk_stride: strides(&case, lk),
        dv_stride: strides(&case, lk),
        dk_ref_stride: strides(&case, lr),
        dv_ref_stride: strides(&case, lr),
        keep_batch_stride: if keep_per_batch == Some(true) { lr as i64 } else { 0 },
        batch: b as u32,
        heads: h as u32,
        lq: lq as u32,
        lk: lk as u32,
        lr: lr as u32,
        lq_pad: pad as u32,
        d: d as u32,
        scale,
        scale_log2: scale * std::f32::consts::LOG2_E,
        pad: 0,
    };
    let m = EmulatedModule::load(&fab::SOURCE).unwrap_or_else(|e| panic!("{e}"));
    let main_module = (main_source.name != fab::SOURCE.name).then(|| EmulatedModule::load(main_source).unwrap_or_else(|e| panic!("{e}")));
    let (prep, _, dq) = fab::kernel_names(dtype.name(), d);
    let launch = |m: &EmulatedModule, name: &str, grid: (u32, u32, u32), threads: u32, shared: u32| {
        // SAFETY: the kernel takes FlashBwdParams by value (mirrored by FlashBackwardParams); every
        // pointer addresses a buffer of the size the params describe, alive for the launch.
        unsafe {
            m.launch(name, grid, (threads, 1, 1), shared, &|f| {
                let k: extern "C" fn(FlashBackwardParams) = std::mem::transmute(f);
                k(p);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
    };
    let rows = (b * h * pad) as u32;
    launch(&m, &prep, (rows.div_ceil(fab::PREP_THREADS / 32), 1, 1), fab::PREP_THREADS, 0);
    let key_tiles = lk.div_ceil(bc) + lr.div_ceil(bc);
    if key_tiles > 0 {
        launch(main_module.as_ref().unwrap_or(&m), &main, (key_tiles as u32, h as u32, b as u32), threads, shared);
    }
    // Fewer dq blocks than pairs: the grid-stride loop is exercised too.
    let pairs = (b * h * lq * d / 2) as u32;
    launch(&m, &dq, (pairs.div_ceil(fab::DQ_THREADS).div_ceil(2).max(1), 1, 1), fab::DQ_THREADS, 0);

    // 16-bit outputs of f32 accumulations whose P and dS went through 16-bit mma operands:
    // tolerances relative to each gradient's largest magnitude, plus the output rounding.
    let (atol, rtol) = match dtype {
        Half::Bf16 => (1e-2, 8e-3),
        Half::F16 => (2e-3, 2e-3),
    };
    let names = ["dq", "dk", "dv", "dk_ref", "dv_ref"];
    let mut report = Vec::new();
    for (which, g) in grads.iter().enumerate() {
        let got: Vec<f32> = g.to_vec().iter().map(|&x| dtype.value(x)).collect();
        let w = &want[which];
        let max = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let mut worst = (0usize, 0f32);
        for (i, (&a, &e)) in got.iter().zip(w).enumerate() {
            let err = (a - e).abs();
            assert!(err <= atol * max + rtol * e.abs(), "{case:?} {}[{i}]: {a} vs reference {e} (largest |{}| {max})", names[which], names[which]);
            if err > worst.1 {
                worst = (i, err);
            }
        }
        report.push(format!("{} max err {:.2e} (largest {max:.2e})", names[which], worst.1));
    }
    // Dropped reference tokens get exactly zero gradients, and so do rows with no key at all.
    let (dq, dkr, dvr) = (grads[0].to_vec(), grads[3].to_vec(), grads[4].to_vec());
    for bi in 0..b {
        for (j, &m) in keep_of(bi).iter().enumerate() {
            if keep_per_batch.is_some() && m == 0 {
                for hi in 0..h {
                    let zero = |g: &[u16]| (0..d).all(|c| dtype.value(g[at(&case, lr, bi, hi, j, c)]) == 0.0);
                    assert!(zero(&dkr) && zero(&dvr), "{case:?}: dk_ref / dv_ref of dropped token {j} (batch {bi}) not zero");
                }
            }
        }
    }
    if drop_all_in_batch0 && lk == 0 {
        let zero = (0..h).all(|hi| (0..lq).all(|r| (0..d).all(|c| dtype.value(dq[at(&case, lq, 0, hi, r, c)]) == 0.0)));
        assert!(zero, "{case:?}: dq of rows with no key is not zero");
    }
    lookahead::show(&format!("{kernel:?} {} d{d} B{b} H{h} Lq{lq} Lk{lk} Lr{lr}: {}", dtype.name(), report.join(", ")));
}

/// One #[test] per case for a main kernel (`emulated_backward_tests!(MainKernel::Hopper);`). Key
/// tiles: the mma.sync kernel has 128 keys a block at D 64 and 64 at D 128, the Hopper kernel 128 at
/// both; query tiles of 64 rows (mma.sync D 128: 32), so Lq 77 ends in a partial tile.
macro_rules! emulated_backward_tests {
    ($kernel:expr) => {
        #[test]
        fn bf16_d64_several_reference_tiles_per_batch_keep_mask() {
            if emulation::have_compiler("bf16_d64_several_reference_tiles_per_batch_keep_mask") {
                // One own tile (45 keys), two reference tiles (150 = 128 + 22).
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::Bf16, b: 2, h: 2, lq: 77, lk: 45, lr: 150, d: 64, keep_per_batch: Some(true), drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn f16_d64_shared_keep_mask() {
            if emulation::have_compiler("f16_d64_shared_keep_mask") {
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::F16, b: 2, h: 2, lq: 77, lk: 45, lr: 70, d: 64, keep_per_batch: Some(false), drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn bf16_d128_per_batch_keep_mask() {
            if emulation::have_compiler("bf16_d128_per_batch_keep_mask") {
                // mma.sync: one own tile, two reference tiles (70 = 64 + 6); Hopper: one of each.
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::Bf16, b: 2, h: 2, lq: 77, lk: 45, lr: 70, d: 128, keep_per_batch: Some(true), drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn f16_d128_several_own_tiles_no_keep_mask() {
            if emulation::have_compiler("f16_d128_several_own_tiles_no_keep_mask") {
                // mma.sync: three own tiles (130 = 64 + 64 + 2); Hopper: two (128 + 2). One reference tile.
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::F16, b: 2, h: 2, lq: 77, lk: 130, lr: 45, d: 128, keep_per_batch: None, drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn bf16_d64_no_reference() {
            if emulation::have_compiler("bf16_d64_no_reference") {
                // Two own tiles (150 = 128 + 22), no reference tokens; Lq a multiple of 4 but not of 64.
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::Bf16, b: 1, h: 3, lq: 52, lk: 150, lr: 0, d: 64, keep_per_batch: None, drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn bf16_d64_many_query_tiles() {
            if emulation::have_compiler("bf16_d64_many_query_tiles") {
                // Lq 285: five query tiles of 64 (the last of 29 rows), so every stage of the
                // Hopper kernel's three-stage ring and both of its dS / exchange buffers are reused.
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::Bf16, b: 1, h: 2, lq: 285, lk: 45, lr: 70, d: 64, keep_per_batch: Some(true), drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn f16_d128_many_query_tiles() {
            if emulation::have_compiler("f16_d128_many_query_tiles") {
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::F16, b: 1, h: 1, lq: 285, lk: 130, lr: 0, d: 128, keep_per_batch: None, drop_all_in_batch0: false }, $kernel);
            }
        }

        #[test]
        fn rows_without_keys_get_zero_gradients() {
            if emulation::have_compiler("rows_without_keys_get_zero_gradients") {
                // No own keys; batch 0 drops every reference token (lse = -inf): its gradients are 0.
                flash_backward_emulation::run(flash_backward_emulation::Case { dtype: emulation::Half::F16, b: 2, h: 1, lq: 21, lk: 0, lr: 19, d: 64, keep_per_batch: Some(true), drop_all_in_batch0: true }, $kernel);
            }
        }
    };
}
