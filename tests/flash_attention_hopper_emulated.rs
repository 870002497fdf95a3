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
//! is set.

use kernels::emulate::EmulatedModule;
use kernels::flash_attention::{flash_attention_head, hopper_kernel_name, hopper_rows_per_block, hopper_shared_bytes, hopper_threads, FlashDims, FlashParams};

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
/// the given element strides (batch, head, row; unit along D). Unused storage holds NaN, so that a
/// read outside the view shows.
struct Operand {
    vals: Vec<f32>,
    buf: Aligned<u16>,
    strides: [i64; 3],
}

fn operand(ty: Half, (b, h, l, d): (usize, usize, usize, usize), strides: [usize; 3], storage_len: usize, seed: u64) -> Operand {
    let vals = ty.round(&values(b * h * l * d, seed));
    let mut bits = vec![ty.bits(f32::NAN); storage_len.max(1)];
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

/// Runs the case's kernel instance on the emulator and checks every output row and lse against
/// kernels::flash_attention::flash_attention_head.
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
        q: q.buf.addr(),
        k: k.buf.addr(),
        v: v.buf.addr(),
        k_ref: kr.buf.addr(),
        v_ref: vr.buf.addr(),
        keep: keep.as_ref().map_or(0, |m| m.as_ptr() as u64),
        out: out.addr(),
        lse: lse.as_mut_ptr() as u64,
        lse2: 0,
        q_stride: q.strides,
        k_stride: k.strides,
        v_stride: v.strides,
        k_ref_stride: kr.strides,
        v_ref_stride: vr.strides,
        out_stride: [(lq * h * d) as i64, d as i64, (h * d) as i64],
        keep_batch_stride: lr as i64,
        heads: h as u32,
        lq: lq as u32,
        lk: lk as u32,
        lr: lr as u32,
        scale_log2: scale * std::f32::consts::LOG2_E,
        decoupled_scale: 0.0,
    };
    let name = hopper_kernel_name(ty.name(), d);
    let m = EmulatedModule::load(&kernels::flash_attention::HOPPER_SOURCE).unwrap_or_else(|e| panic!("{e}"));
    let grid = (lq.div_ceil(hopper_rows_per_block(d)) as u32, h as u32, b as u32);
    let started = std::time::Instant::now();
    // SAFETY: FlashParams mirrors the kernel's struct; every address in p points into a live
    // buffer covering the strides and sizes given (out and lse written, the rest read).
    unsafe {
        m.launch(&name, grid, (hopper_threads(d), 1, 1), hopper_shared_bytes(d), &|f| {
            let kernel: extern "C" fn(FlashParams) = std::mem::transmute(f);
            kernel(p);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed().as_secs_f32();

    let head = |o: &Operand, bh: usize, l: usize| o.vals[bh * l * d..(bh + 1) * l * d].to_vec();
    let (atol, rtol) = out_tolerance(ty);
    let mut worst = (0f32, 0f32);
    for bh in 0..b * h {
        let (bi, hi) = (bh / h, bh % h);
        let (mut want, mut want_lse) = (vec![0f32; lq * d], vec![0f32; lq]);
        let keep_b = keep.as_ref().map(|m| &m[bi * lr..(bi + 1) * lr]);
        flash_attention_head(&head(&q, bh, lq), &head(&k, bh, lk), &head(&v, bh, lk), &head(&kr, bh, lr), &head(&vr, bh, lr), keep_b, FlashDims { lq, lk, lr, d }, scale, &mut want, &mut want_lse);
        for i in 0..lq {
            let row = ((bi * lq + i) * h + hi) * d;
            for (col, (&g, &e)) in out.as_ref()[row..row + d].iter().zip(&want[i * d..(i + 1) * d]).enumerate() {
                let got = ty.value(g);
                let err = (got - e).abs();
                worst.0 = worst.0.max(err);
                assert!(err <= atol + rtol * e.abs(), "{name} b{bi} h{hi} row {i} col {col}: {got} vs {e}");
            }
            let (got, e) = (lse[bh * lq + i], want_lse[i]);
            if e == f32::NEG_INFINITY {
                assert_eq!(got, e, "{name} b{bi} h{hi} lse[{i}]");
            } else {
                let err = (got - e).abs();
                worst.1 = worst.1.max(err);
                assert!(err <= 1e-4 * e.abs().max(1.0), "{name} b{bi} h{hi} lse[{i}]: {got} vs {e}");
            }
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
