//! The flash-attention forward CUDA kernel (kernels/cuda/flash_attention.cu) run on the CPU
//! emulator (kernels::emulate) against the CPU reference (kernels::flash_attention), on sizes that
//! are not multiples of the tiles (Lq over two query blocks, the second partial: 141 at head dim 64,
//! whose blocks hold 128 rows, 77 at 128, whose blocks hold 64; Lk 45 and Lr 70 with edge tiles),
//! with a keep mask, a q view with heads interleaved ([B, Lq, H, D] memory), padded reference
//! rows, bf16 and f16, head dims 64 and 128. The decoupled mode (IP-Adapter's text + s2 x IP
//! cross-attention, two independent softmaxes) against kernels::flash_attention's
//! `decoupled_attention_head`: 77 text keys with 16 or 5 IP keys (a partial tile), a text context
//! shared by the batch (batch stride 0), several IP tiles (the statistics pass), no text keys, no IP
//! keys. Needs a C++ compiler; without one each test prints "skipped: no C++ compiler" and passes,
//! unless `CI` is set.

use kernels::emulate::EmulatedModule;
use kernels::flash_attention::{decoupled_attention_head, decoupled_kernel_name, flash_attention_head, kernel_name, rows_per_block, shared_bytes, DecoupledDims, FlashDims, FlashParams, THREADS};

#[path = "common/emulation.rs"]
mod emulation;
use emulation::{have_compiler, values, Aligned, Half};

/// (atol, rtol) of the output: P is rounded to the 16-bit type before P V, and the output too.
fn out_tolerance(ty: Half) -> (f32, f32) {
    match ty {
        Half::Bf16 => (1e-2, 1e-2),
        Half::F16 => (2e-3, 2e-3),
    }
}

/// One [B, H, L, D] operand: rounded values (f32, [B, H, L, D] order) and its 16-bit storage with
/// the given element strides (batch, head, row; unit along D).
struct Operand {
    vals: Vec<f32>,
    buf: Aligned<u16>,
    strides: [i64; 3],
}

fn operand(ty: Half, (b, h, l, d): (usize, usize, usize, usize), strides: [usize; 3], storage_len: usize, seed: u64) -> Operand {
    let vals = ty.round(&values(b * h * l * d, seed));
    // Unused storage (padding, gaps) holds NaN so that a read outside the view shows.
    let mut bits = vec![ty.bits(f32::NAN); storage_len];
    for (i, &x) in vals.iter().enumerate() {
        let (bi, hi, li, c) = (i / (h * l * d), (i / (l * d)) % h, (i / d) % l, i % d);
        bits[bi * strides[0] + hi * strides[1] + li * strides[2] + c] = ty.bits(x);
    }
    Operand { vals, buf: Aligned::from(&bits), strides: strides.map(|s| s as i64) }
}

struct Case {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    lr: usize,
    d: usize,
    /// [B, Lr] keep mask, or None (every reference token kept).
    keep: Option<Vec<u8>>,
    scale: f32,
}

/// The kernel's parameters for these operands, out ([B, Lq, H, D] memory) and lse ([B, H, Lq]):
/// the extended mode without a keep mask (callers set the keep mask or the decoupled fields).
#[allow(clippy::too_many_arguments)]
fn params([q, k, v, kr, vr]: [&Operand; 5], out: &Aligned<u16>, lse: &mut [f32], h: usize, lq: usize, lk: usize, lr: usize, d: usize, scale: f32) -> FlashParams {
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

/// Runs kernel `name` on the emulator over (query blocks, H, B); returns the seconds it took.
///
/// # Safety
/// Every address in `p` points into a live buffer covering the strides and sizes given.
unsafe fn launch(name: &str, p: FlashParams, b: usize, h: usize, lq: usize, d: usize) -> f32 {
    let m = EmulatedModule::load(&kernels::flash_attention::SOURCE).unwrap_or_else(|e| panic!("{e}"));
    let grid = (lq.div_ceil(rows_per_block(d)) as u32, h as u32, b as u32);
    let t = std::time::Instant::now();
    // SAFETY: FlashParams mirrors the kernel's struct; the addresses are the caller's promise.
    unsafe {
        m.launch(name, grid, (THREADS, 1, 1), shared_bytes(d), &|f| {
            let kernel: extern "C" fn(FlashParams) = std::mem::transmute(f);
            kernel(p);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    t.elapsed().as_secs_f32()
}

/// One output row of the kernel (16-bit) against the reference: |got - want| <= atol + rtol |want|
/// per element. Returns the largest error.
fn check_out_row(what: &str, ty: Half, got: &[u16], want: &[f32], (atol, rtol): (f32, f32)) -> f32 {
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
fn check_lse(what: &str, got: f32, want: f32) -> f32 {
    if want == f32::NEG_INFINITY {
        assert_eq!(got, want, "{what}");
        return 0.0;
    }
    let err = (got - want).abs();
    assert!(err <= 1e-4 * want.abs().max(1.0), "{what}: {got} vs {want}");
    err
}

fn run_case(ty: Half, c: &Case) {
    let Case { b, h, lq, lk, lr, d, scale, .. } = *c;
    // q: [B, Lq, H, D] memory (heads interleaved, as the models' projections give).
    let q = operand(ty, (b, h, lq, d), [lq * h * d, d, h * d], b * lq * h * d, 1);
    let k = operand(ty, (b, h, lk, d), [h * lk * d, lk * d, d], b * h * lk * d, 2);
    let v = operand(ty, (b, h, lk, d), [h * lk * d, lk * d, d], b * h * lk * d, 3);
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
    let name = kernel_name(ty.name(), d);
    // SAFETY: every address in p points into a live buffer covering the strides and sizes given
    // (out and lse written, the rest read).
    let took = unsafe { launch(&name, p, b, h, lq, d) };

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
fn keep_mask(b: usize, lr: usize) -> Vec<u8> {
    (0..b * lr).map(|i| !(i * 7 + i / lr).is_multiple_of(5) as u8).collect()
}

/// Lq over two query blocks, the second with 13 rows: 141 at d 64 (128-row blocks), 77 at d 128
/// (64-row blocks).
fn odd_sizes(ty: Half, d: usize) {
    let (b, lr) = (2, 70);
    let lq = rows_per_block(d) + 13;
    run_case(ty, &Case { b, h: 2, lq, lk: 45, lr, d, keep: Some(keep_mask(b, lr)), scale: 1.0 / (d as f32).sqrt() });
}

#[test]
fn bf16_d64_matches_the_cpu_reference() {
    if have_compiler("bf16_d64_matches_the_cpu_reference") {
        odd_sizes(Half::Bf16, 64);
    }
}

#[test]
fn bf16_d128_matches_the_cpu_reference() {
    if have_compiler("bf16_d128_matches_the_cpu_reference") {
        odd_sizes(Half::Bf16, 128);
    }
}

#[test]
fn f16_d64_matches_the_cpu_reference() {
    if have_compiler("f16_d64_matches_the_cpu_reference") {
        odd_sizes(Half::F16, 64);
    }
}

#[test]
fn f16_d128_matches_the_cpu_reference() {
    if have_compiler("f16_d128_matches_the_cpu_reference") {
        odd_sizes(Half::F16, 128);
    }
}

/// No reference source; own keys only (one partial tile), larger scores (scale 0.5 on D 64).
#[test]
fn own_keys_only() {
    if have_compiler("own_keys_only") {
        run_case(Half::Bf16, &Case { b: 1, h: 3, lq: 19, lk: 33, lr: 0, d: 64, keep: None, scale: 0.5 });
    }
}

/// No own keys and, in batch entry 0, every reference token dropped: that row gives out 0 and
/// lse -inf; batch entry 1 keeps three tokens of a tile that is mostly dropped.
#[test]
fn rows_with_no_key_left() {
    if have_compiler("rows_with_no_key_left") {
        let (b, lr) = (2, 67);
        let mut keep = vec![0u8; b * lr];
        for j in [3, 40, 66] {
            keep[lr + j] = 1;
        }
        run_case(Half::F16, &Case { b, h: 1, lq: 5, lk: 0, lr, d: 64, keep: Some(keep), scale: 0.125 });
    }
}

/// No keys at all (Lk = 0, no reference): the key loop never runs; out 0, lse -inf everywhere.
#[test]
fn no_keys_at_all() {
    if have_compiler("no_keys_at_all") {
        run_case(Half::Bf16, &Case { b: 1, h: 2, lq: 3, lk: 0, lr: 0, d: 128, keep: None, scale: 0.1 });
    }
}

/// A decoupled-mode case: l1 text keys (source 1), l2 IP keys (source 2), weight s2.
struct DecoupledCase {
    b: usize,
    h: usize,
    lq: usize,
    l1: usize,
    l2: usize,
    d: usize,
    s2: f32,
    /// The text K/V are one [1, L1, H, D] context read by every batch entry (batch stride 0), as
    /// the models pass a batch-1 text embedding.
    shared_text: bool,
}

fn run_decoupled(ty: Half, c: &DecoupledCase) {
    let DecoupledCase { b, h, lq, l1, l2, d, s2, shared_text } = *c;
    let scale = 1.0 / (d as f32).sqrt();
    // q, and the IP K/V: [B, L, H, D] memory (the projections' layout, heads interleaved).
    let q = operand(ty, (b, h, lq, d), [lq * h * d, d, h * d], b * lq * h * d, 11);
    let k2 = operand(ty, (b, h, l2, d), [l2 * h * d, d, h * d], b * l2 * h * d, 14);
    let v2 = operand(ty, (b, h, l2, d), [l2 * h * d, d, h * d], b * l2 * h * d, 15);
    // Text K/V: [B, H, L1, D], or one [1, L1, H, D] context for the whole batch.
    let (k1, v1) = if shared_text {
        let one = |seed| {
            let o = operand(ty, (1, h, l1, d), [l1 * h * d, d, h * d], l1 * h * d, seed);
            // Batch entry bi reads the same values: repeat them for the reference, stride 0 for the kernel.
            let vals = o.vals.iter().copied().cycle().take(b * h * l1 * d).collect();
            Operand { vals, buf: o.buf, strides: [0, o.strides[1], o.strides[2]] }
        };
        (one(12), one(13))
    } else {
        (operand(ty, (b, h, l1, d), [h * l1 * d, l1 * d, d], b * h * l1 * d, 12), operand(ty, (b, h, l1, d), [h * l1 * d, l1 * d, d], b * h * l1 * d, 13))
    };
    let out = Aligned::from(&vec![ty.bits(f32::NAN); b * lq * h * d]);
    let (mut lse1, mut lse2) = (vec![f32::NAN; b * h * lq], vec![f32::NAN; b * h * lq]);
    let p = FlashParams { lse2: lse2.as_mut_ptr() as u64, decoupled_scale: s2, ..params([&q, &k1, &v1, &k2, &v2], &out, &mut lse1, h, lq, l1, l2, d, scale) };
    let name = decoupled_kernel_name(ty.name(), d);
    // SAFETY: every address in p points into a live buffer covering the strides and sizes given
    // (out, lse and lse2 written, the rest read).
    let took = unsafe { launch(&name, p, b, h, lq, d) };

    let head = |o: &Operand, bh: usize, l: usize| o.vals[bh * l * d..(bh + 1) * l * d].to_vec();
    // Two outputs' rounding errors (each as the extended mode's), the second weighted.
    let (atol, rtol) = out_tolerance(ty);
    let (atol, rtol) = ((1.0 + s2.abs()) * atol, rtol);
    let mut worst = (0f32, 0f32);
    for bh in 0..b * h {
        let (bi, hi) = (bh / h, bh % h);
        let (mut want, mut want1, mut want2) = (vec![0f32; lq * d], vec![0f32; lq], vec![0f32; lq]);
        let dims = DecoupledDims { lq, l1, l2, d };
        decoupled_attention_head(&head(&q, bh, lq), &head(&k1, bh, l1), &head(&v1, bh, l1), &head(&k2, bh, l2), &head(&v2, bh, l2), dims, s2, scale, &mut want, &mut want1, &mut want2);
        for i in 0..lq {
            let row = ((bi * lq + i) * h + hi) * d;
            worst.0 = worst.0.max(check_out_row(&format!("{name} b{bi} h{hi} row {i}"), ty, &out.as_ref()[row..row + d], &want[i * d..(i + 1) * d], (atol, rtol)));
            for (which, got, e) in [("lse1", lse1[bh * lq + i], want1[i]), ("lse2", lse2[bh * lq + i], want2[i])] {
                worst.1 = worst.1.max(check_lse(&format!("{name} b{bi} h{hi} {which}[{i}]"), got, e));
            }
        }
    }
    lookahead::show(&format!(
        "{name} emulated: B {b} H {h} Lq {lq} L1 {l1} L2 {l2} s2 {s2}{}: max |out err| {:.2e}, max |lse err| {:.2e} ({took:.1} s)",
        if shared_text { " shared text" } else { "" },
        worst.0,
        worst.1
    ));
}

/// SDXL's cross-attention shape at odd sizes: 77 text keys (a full and a partial tile) and 16
/// IP keys (IP-Adapter Plus), or 5 (not a multiple of 8: a partial n-tile of the one IP tile).
#[test]
fn decoupled_bf16_d64_text_77_ip_16() {
    if have_compiler("decoupled_bf16_d64_text_77_ip_16") {
        run_decoupled(Half::Bf16, &DecoupledCase { b: 2, h: 2, lq: 77, l1: 77, l2: 16, d: 64, s2: 0.7, shared_text: true });
    }
}

#[test]
fn decoupled_f16_d64_text_77_ip_5() {
    if have_compiler("decoupled_f16_d64_text_77_ip_5") {
        run_decoupled(Half::F16, &DecoupledCase { b: 2, h: 2, lq: 77, l1: 77, l2: 5, d: 64, s2: 1.3, shared_text: false });
    }
}

#[test]
fn decoupled_bf16_d128_text_77_ip_5() {
    if have_compiler("decoupled_bf16_d128_text_77_ip_5") {
        run_decoupled(Half::Bf16, &DecoupledCase { b: 1, h: 2, lq: 77, l1: 77, l2: 5, d: 128, s2: 0.5, shared_text: false });
    }
}

#[test]
fn decoupled_f16_d128_text_77_ip_16() {
    if have_compiler("decoupled_f16_d128_text_77_ip_16") {
        run_decoupled(Half::F16, &DecoupledCase { b: 2, h: 1, lq: 77, l1: 77, l2: 16, d: 128, s2: 0.6, shared_text: true });
    }
}

/// Source 2 over three tiles (a statistics pass over its K tiles, then the accumulation pass),
/// a negative weight.
#[test]
fn decoupled_several_ip_tiles() {
    if have_compiler("decoupled_several_ip_tiles") {
        run_decoupled(Half::Bf16, &DecoupledCase { b: 1, h: 2, lq: 70, l1: 45, l2: 131, d: 64, s2: -0.8, shared_text: false });
    }
}

/// No text keys (source 1 gives 0, lse1 -inf), and no IP keys (out = the text attention, lse2
/// -inf; the boundary between the sources is never reached inside the key loop).
#[test]
fn decoupled_empty_sources() {
    if have_compiler("decoupled_empty_sources") {
        run_decoupled(Half::F16, &DecoupledCase { b: 1, h: 2, lq: 19, l1: 0, l2: 16, d: 64, s2: 0.9, shared_text: false });
        run_decoupled(Half::Bf16, &DecoupledCase { b: 1, h: 2, lq: 19, l1: 77, l2: 0, d: 64, s2: 0.9, shared_text: false });
        run_decoupled(Half::Bf16, &DecoupledCase { b: 1, h: 1, lq: 3, l1: 0, l2: 0, d: 128, s2: 0.9, shared_text: false });
    }
}
