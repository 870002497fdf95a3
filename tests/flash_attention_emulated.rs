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
//! unless `CI` is set. Operands, launch, checks and the extended-attention case are shared with the
//! Hopper kernel's test (tests/common/flash_forward_emulation.rs).

use kernels::flash_attention::{decoupled_attention_head, decoupled_kernel_name, rows_per_block, DecoupledDims, FlashParams};

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/flash_forward_emulation.rs"]
mod flash_forward_emulation;
use emulation::{have_compiler, Aligned, Half};
use flash_forward_emulation::{check_lse, check_out_row, keep_mask, launch, operand, out_tolerance, params, Case, ForwardKernel, Operand};

const KERNEL: ForwardKernel = ForwardKernel::MmaSync;

fn run_case(ty: Half, c: &Case) {
    flash_forward_emulation::run_case(KERNEL, ty, c);
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
    let took = unsafe { launch(KERNEL, &name, p, b, h, lq, d) };

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
