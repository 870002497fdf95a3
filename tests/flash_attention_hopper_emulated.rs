//! The Hopper (wgmma) flash-attention forward kernel (kernels/cuda/flash_attention_hopper.cu) run on
//! the CPU emulator (kernels::emulate) against the CPU reference (kernels::flash_attention), on
//! sizes that are not multiples of its tiles (blocks of 192 query rows at head dim 64, 128 at 128;
//! key tiles of 128): Lq 141 (at D 64 one block whose second warpgroup holds 13 rows and whose
//! third has none; at D 128 two blocks, the second with 13 rows), Lq 205 at D 64 (two blocks), Lk 45
//! own keys and Lr 150 reference keys (two reference tiles, the second with 22 keys) with a keep
//! mask, a q view with heads interleaved ([B, Lq, H, D] memory), padded reference rows, bf16 and
//! f16, head dims 64 and 128; six key tiles (stages refilled while products are in flight); a
//! source with no token, rows with no key left, no key at all. Needs
//! a C++ compiler; without one each test prints "skipped: no C++ compiler" and passes, unless `CI`
//! is set. Operands, launch, checks and the case itself are shared with the mma.sync kernel's test
//! (tests/common/flash_forward_emulation.rs).

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/flash_forward_emulation.rs"]
mod flash_forward_emulation;
use emulation::{have_compiler, Aligned, Half};
use flash_forward_emulation::{keep_mask, Case, ForwardKernel};

/// The case on the default instance and, at head dim 64, on every variant
/// (kernels::flash_attention::HOPPER_D64_VARIANTS; the warp-specialized ws* in their own file,
/// kernels/cuda/flash_attention_ws.cu, with their own block geometry).
fn run_case(ty: Half, c: &Case) {
    flash_forward_emulation::run_case(ForwardKernel::Hopper, ty, c);
    if c.d == 64 {
        for v in kernels::flash_attention::HOPPER_D64_VARIANTS {
            flash_forward_emulation::run_case(ForwardKernel::HopperVariant(v), ty, c);
        }
    }
}

/// fh_exp2_poly (the "poly<n>" variants' exponential) against exp2 in f64 over what the softmax
/// feeds it, x <= 0: relative error below 1e-4 (P is then rounded to bf16, 2^-9, or f16, 2^-11)
/// down to 2^-125; below that (a masked key's -inf, f32::MIN, -1e30 included) a non-negative
/// value at most 2^-125 (absolute error under 2^-118), never NaN or a negative number.
#[test]
fn exp2_polynomial_matches_exp2() {
    if !have_compiler("exp2_polynomial_matches_exp2") {
        return;
    }
    let mut x: Vec<f32> = (0..=200_000).map(|i| -(i as f32) * (130.0 / 200_000.0)).collect();
    x.extend([0.0, -0.0, -1e-30, -0.5, -0.4999999, -126.0, -126.5, -127.0, -149.0, -1e30, f32::MIN, f32::NEG_INFINITY]);
    let n = x.len();
    let y = Aligned::from(&vec![f32::NAN; n]);
    let xs = Aligned::from(&x);
    let m = kernels::emulate::EmulatedModule::load(&kernels::flash_attention::HOPPER_SOURCE).unwrap_or_else(|e| panic!("{e}"));
    let threads = 256u32;
    // SAFETY: x and y hold n floats; the kernel reads x[i] and writes y[i] for i < n only.
    unsafe {
        m.launch(kernels::flash_attention::HOPPER_EXP2_POLY_KERNEL, ((n as u32).div_ceil(threads), 1, 1), (threads, 1, 1), 0, &|f| {
            let kernel: extern "C" fn(*const f32, *mut f32, u32) = std::mem::transmute(f);
            kernel(xs.addr() as *const f32, y.addr() as *mut f32, n as u32);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let mut worst = 0f64;
    for (&xi, &yi) in x.iter().zip(y.as_ref()) {
        assert!(yi >= 0.0 && yi.is_finite(), "exp2 poly of {xi} gave {yi}");
        let want = (xi as f64).exp2();
        if xi >= -125.0 {
            let rel = ((yi as f64) - want).abs() / want;
            worst = worst.max(rel);
            assert!(rel < 1e-4, "exp2 poly of {xi}: {yi} vs {want} (relative error {rel})");
        } else {
            assert!(((yi as f64) - want).abs() < 2f64.powi(-118), "exp2 poly of {xi}: {yi} vs {want}");
            assert!(yi <= 2f32.powi(-125), "exp2 poly of {xi}: {yi}");
        }
    }
    println!("exp2 poly: {n} inputs in [-130, 0] and the extremes, worst relative error {worst:.2e} above 2^-125");
    assert!(worst > 1e-6, "the polynomial is not exact: a relative error of {worst} means the test did not run it");
}

/// Lk 45 own keys (one partial tile), Lr 150 reference keys (a full and a 22-key tile) with a
/// keep mask per batch entry, scale 1 / sqrt(D).
fn odd_sizes(ty: Half, d: usize, lq: usize) {
    let (b, lr) = (2, 150);
    run_case(ty, &Case { b, h: 2, lq, lk: 45, lr, d, keep: Some(keep_mask(b, lr)), scale: 1.0 / (d as f32).sqrt() });
}

#[test]
fn bf16_d64_matches_the_cpu_reference() {
    if have_compiler("bf16_d64_matches_the_cpu_reference") {
        odd_sizes(Half::Bf16, 64, 141);
    }
}

#[test]
fn bf16_d128_matches_the_cpu_reference() {
    if have_compiler("bf16_d128_matches_the_cpu_reference") {
        odd_sizes(Half::Bf16, 128, 141);
    }
}

/// Two query blocks at D 64 (192 + 13 rows).
#[test]
fn f16_d64_matches_the_cpu_reference() {
    if have_compiler("f16_d64_matches_the_cpu_reference") {
        odd_sizes(Half::F16, 64, 205);
    }
}

#[test]
fn f16_d128_matches_the_cpu_reference() {
    if have_compiler("f16_d128_matches_the_cpu_reference") {
        odd_sizes(Half::F16, 128, 77);
    }
}

/// No reference source: own keys only over two tiles (128 + 5), larger scores (scale 0.5 on D 64);
/// then no own keys: the reference only, no keep mask.
#[test]
fn one_source_empty() {
    if have_compiler("one_source_empty") {
        run_case(Half::Bf16, &Case { b: 1, h: 3, lq: 19, lk: 133, lr: 0, d: 64, keep: None, scale: 0.5 });
        run_case(Half::F16, &Case { b: 1, h: 2, lq: 70, lk: 0, lr: 150, d: 128, keep: None, scale: 0.09 });
    }
}

/// Many key tiles (own 300 = 3 tiles, reference 260 = 3 tiles, both ending partial), so that
/// both K and V stages are refilled several times while the previous tile's products are in
/// flight; keep mask per batch entry.
#[test]
fn many_key_tiles() {
    if have_compiler("many_key_tiles") {
        let (b, lr) = (2, 260);
        run_case(Half::Bf16, &Case { b, h: 1, lq: 70, lk: 300, lr, d: 128, keep: Some(keep_mask(b, lr)), scale: 0.088 });
        run_case(Half::F16, &Case { b, h: 1, lq: 77, lk: 300, lr, d: 64, keep: Some(keep_mask(b, lr)), scale: 0.125 });
    }
}

/// No own keys and, in batch entry 0, every reference token dropped: its rows give out 0 and lse
/// -inf; batch entry 1 keeps three tokens, one of them in the second (partial) tile.
#[test]
fn rows_with_no_key_left() {
    if have_compiler("rows_with_no_key_left") {
        let (b, lr) = (2, 131);
        let mut keep = vec![0u8; b * lr];
        for j in [3, 40, 130] {
            keep[lr + j] = 1;
        }
        run_case(Half::F16, &Case { b, h: 1, lq: 5, lk: 0, lr, d: 64, keep: Some(keep.clone()), scale: 0.125 });
        run_case(Half::Bf16, &Case { b, h: 1, lq: 5, lk: 0, lr, d: 128, keep: Some(keep), scale: 0.125 });
    }
}

/// No keys at all (Lk = 0, no reference): the key loop never runs; out 0, lse -inf everywhere.
#[test]
fn no_keys_at_all() {
    if have_compiler("no_keys_at_all") {
        run_case(Half::Bf16, &Case { b: 1, h: 2, lq: 3, lk: 0, lr: 0, d: 128, keep: None, scale: 0.1 });
        run_case(Half::F16, &Case { b: 1, h: 1, lq: 70, lk: 0, lr: 0, d: 64, keep: None, scale: 0.1 });
    }
}
