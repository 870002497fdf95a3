//! Flash extended attention, forward: one (batch, head) attends over the keys/values
//! [own ; reference] without their concatenation ever being built. Reference tokens can be dropped
//! by a keep mask (training's kv-drop): a dropped token's score is -inf. Besides the output the
//! forward returns each row's log-sum-exp (natural log) of the scaled scores, which the backward
//! pass uses to recompute the probabilities.
//!
//! The same kernel has a decoupled mode (IP-Adapter's decoupled cross-attention): the own keys
//! (source 1, text) and the reference slot (source 2, IP tokens, no keep mask) get two independent
//! softmaxes, out = softmax(q K1^T) V1 + s2 softmax(q K2^T) V2, with one lse per source
//! (`decoupled_attention_head` is its CPU reference).
//!
//! The CPU reference here works on one head of contiguous row-major slices; the engine's CPU
//! backend uses `extended_softmax_row` for the middle step of its GEMM form. The CUDA kernel
//! (kernels/cuda/flash_attention.cu) does the same math tile by tile with an online softmax.

use crate::softmax::{exp_shifted_in_place, row_max, with_wide_simd};

pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "flash_attention", code: include_str!("../cuda/flash_attention.cu"), options: &[] };
/// The Hopper (sm_90a, wgmma) variant of the extended-attention forward (same parameters and
/// outputs; no decoupled mode; scale > 0): kernels/cuda/flash_attention_hopper.cu. Built with
/// flush-to-zero (`--ftz=true`): exp2f is then one MUFU.EX2 instead of three instructions more for
/// subnormal results (probabilities below 2^-126 become 0), and the softmax is bound by its
/// per-element instructions.
pub const HOPPER_SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "flash_attention_hopper", code: include_str!("../cuda/flash_attention_hopper.cu"), options: &["--ftz=true"] };

/// Warpgroups (of 128 threads, 64 query rows each) a block of the Hopper kernel has for head dim
/// `d` (fh_warpgroups in its .cu file): 3 at d 64, 2 at d 128.
fn hopper_warpgroups(d: usize) -> usize {
    if d <= 64 {
        3
    } else {
        2
    }
}

/// Threads a block of the Hopper kernel has for head dim `d` (fh_threads).
pub fn hopper_threads(d: usize) -> u32 {
    (128 * hopper_warpgroups(d)) as u32
}

/// Query rows a block of the Hopper kernel owns for head dim `d` (fh_rows).
pub fn hopper_rows_per_block(d: usize) -> usize {
    64 * hopper_warpgroups(d)
}

/// Dynamic shared memory of the Hopper kernel (fh_shared_bytes): Q, two stages of one K and one V
/// tile of 128 keys, 16-bit values, and 1 KiB to align the start to a 128B swizzle atom.
pub fn hopper_shared_bytes(d: usize) -> u32 {
    ((hopper_rows_per_block(d) * d + 4 * 128 * d) * 2 + 1024) as u32
}

/// The Hopper kernel instance for a 16-bit dtype ("bf16" or "f16") and head dim 64 or 128.
pub fn hopper_kernel_name(dtype: &str, d: usize) -> String {
    format!("flash_attention_hopper_fwd_{dtype}_d{d}")
}

/// Variants of the Hopper forward kernel at head dim 64 (LOOKAHEAD_VARIANT_FLASH_FWD, see
/// engine::cuda::kernel_variant): "poly<n>" computes the exponentials of every n-th 8-column
/// block of the score tile with a polynomial on the FMA pipe instead of MUFU.EX2 (fh_exp2_poly in
/// kernels/cuda/flash_attention.cuh); "late" issues each step's cp.async copies after its
/// wgmmas (their address arithmetic overlaps the wait for S instead of delaying the products);
/// "late_poly4" both: same parameters, outputs and geometry as the default. "ws", "ws_nopp", "ws3"
/// and "ws_poly3" are the warp-specialized kernel (kernels/cuda/flash_attention_ws.cu, WS_SOURCE;
/// same parameters and outputs, its own geometry: `hopper_launch`): a producer warpgroup loading
/// K/V into a ring of stages with mbarriers, two consumer warpgroups with no block barrier in the
/// loop, ping-pong between them (not in ws_nopp), 3 stages in ws3, poly3's exponentials in ws_poly3,
/// K/V by TMA in ws_tma (whose instance takes four tensor maps after the parameters: `ws_tma_map`).
pub const HOPPER_D64_VARIANTS: &[&str] = &["poly3", "poly4", "poly8", "late", "late_poly4", "ws", "ws_nopp", "ws3", "ws_poly3", "ws_tma"];

/// The variant whose instance takes the tensor maps of k, v, k_ref, v_ref (`ws_tma_map`) after
/// FlashParams.
pub const WS_TMA_VARIANT: &str = "ws_tma";

/// The "ws_tma" instance's tensor map of a [B, H, L, 64] operand of 16-bit `dtype` at `base` with
/// element strides `strides` (batch, head, row; the 64 columns contiguous): the rank-4 map (64, L,
/// H, B) with those strides, boxes of 64 x 128 x 1 x 1 (a key tile of one head), 128B swizzle (the
/// shared-memory layout of the kernel's tiles). Any arrangement of heads maps: contiguous, rows
/// padded (a narrowed view), or heads interleaved ([B, L, H, D] memory, the UNet's layout); a
/// tile's rows past L are zero-filled, not the next head's. A dimension of one entry takes a
/// nominal stride (TMA checks it even unused). None when L is 0 or a stride is negative, not a
/// multiple of 16 bytes or shorter than a row (cuTensorMapEncodeTiled's rules): the engine then
/// runs "ws" (cp.async).
pub fn ws_tma_map(dtype: crate::emulate::TmaDtype, base: u64, [s0, s1, s2]: [i64; 3], (b, h, l): (usize, usize, usize)) -> Option<crate::emulate::TensorMap> {
    let row = 64 * dtype.bytes();
    let stride = |s: i64, n: usize| if n == 1 { Some(row) } else { u64::try_from(s).ok().map(|s| s * dtype.bytes()) };
    let strides = [stride(s2, l)?, stride(s1, h)?, stride(s0, b)?];
    if l == 0 || l > i32::MAX as usize {
        return None;
    }
    let map = crate::emulate::TensorMap { base, dtype, rank: 4, dims: [64, l as u64, h as u64, b as u64], strides_bytes: strides, box_dims: [64, 128, 1, 1], swizzle: crate::emulate::TmaSwizzle::B128 };
    map.validate().ok().map(|_| map)
}

/// The warp-specialized Hopper forward at head dim 64 (variants "ws*" of HOPPER_D64_VARIANTS):
/// same parameters and outputs as HOPPER_SOURCE, built with flush-to-zero too.
pub const WS_SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "flash_attention_ws", code: include_str!("../cuda/flash_attention_ws.cu"), options: &["--ftz=true"] };

/// Block of the warp-specialized kernel (WS_THREADS, WS_ROWS in its .cu file): two consumer
/// warpgroups of 64 query rows and one producer warpgroup.
pub const WS_THREADS: u32 = 384;
pub const WS_ROWS_PER_BLOCK: usize = 128;

/// Dynamic shared memory of warp-specialized variant `variant` (ws_shared_bytes<STAGES>): Q (128 x
/// 64), `stages` K and V tiles of 128 x 64 16-bit values, 128 bytes of mbarriers, 1 KiB to align.
pub fn ws_shared_bytes(variant: &str) -> u32 {
    let stages = if variant == "ws3" { 3 } else { 2 };
    ((128 * 64 + 2 * stages * 128 * 64) * 2 + 128 + 1024) as u32
}

/// How a Hopper forward instance is launched: its source, threads a block, query rows a block and
/// dynamic shared memory, for head dim `d` and the D 64 variant `variant` (None, or any variant at
/// d 128, which has none: the default kernel).
pub fn hopper_launch(d: usize, variant: Option<&str>) -> (&'static crate::compile::KernelSource, u32, usize, u32) {
    match variant {
        Some(v) if d == 64 && v.starts_with("ws") => (&WS_SOURCE, WS_THREADS, WS_ROWS_PER_BLOCK, ws_shared_bytes(v)),
        _ => (&HOPPER_SOURCE, hopper_threads(d), hopper_rows_per_block(d), hopper_shared_bytes(d)),
    }
}

/// The instance of `hopper_kernel_name(dtype, 64)`'s variant `variant` (one of
/// HOPPER_D64_VARIANTS).
pub fn hopper_variant_kernel_name(dtype: &str, variant: &str) -> String {
    format!("flash_attention_hopper_fwd_{dtype}_d64_{variant}")
}

/// The kernel applying fh_exp2_poly to n floats: `(const float* x, float* y, u32 n)`, any
/// geometry covering n threads.
pub const HOPPER_EXP2_POLY_KERNEL: &str = "flash_attention_hopper_exp2_poly";

/// Launch geometry of the CUDA kernel (FA_THREADS, FA_BC in the .cu file): 4 warps a block, key
/// tiles of 64 rows.
pub const THREADS: u32 = 128;
pub const KEYS_PER_TILE: usize = 64;

/// Query rows a block owns for head dim `d` (fa_rows in the .cu file): 4 warps of 2 m-tiles of 16
/// rows at d 64 (each K/V fragment read from shared memory feeds two mmas), 1 m-tile at d 128
/// (two would not fit in registers).
pub fn rows_per_block(d: usize) -> usize {
    let m_tiles_per_warp = if d <= 64 { 2 } else { 1 };
    4 * 16 * m_tiles_per_warp
}

/// Dynamic shared memory of the kernel for head dim `d`: two stages of one K and one V tile of
/// 16-bit values (fa_shared_bytes).
pub fn shared_bytes(d: usize) -> u32 {
    (2 * 2 * KEYS_PER_TILE * d * 2) as u32
}

/// The kernel instance for a 16-bit dtype ("bf16" or "f16") and head dim 64 or 128.
pub fn kernel_name(dtype: &str, d: usize) -> String {
    format!("flash_attention_fwd_{dtype}_d{d}")
}

/// The decoupled-mode instance (same parameters, same launch geometry and shared memory).
pub fn decoupled_kernel_name(dtype: &str, d: usize) -> String {
    format!("flash_attention_decoupled_fwd_{dtype}_d{d}")
}

/// The kernel's parameters, passed by value: `FlashParams` of kernels/cuda/flash_attention.cuh,
/// field by field (documented there). Addresses are device addresses (host addresses under the
/// emulator); strides are in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub k_ref: u64,
    pub v_ref: u64,
    pub keep: u64,
    pub out: u64,
    pub lse: u64,
    /// Decoupled mode only: lse of source 2 (the reference slot).
    pub lse2: u64,
    pub q_stride: [i64; 3],
    pub k_stride: [i64; 3],
    pub v_stride: [i64; 3],
    pub k_ref_stride: [i64; 3],
    pub v_ref_stride: [i64; 3],
    pub out_stride: [i64; 3],
    pub keep_batch_stride: i64,
    pub heads: u32,
    pub lq: u32,
    pub lk: u32,
    pub lr: u32,
    pub scale_log2: f32,
    /// Decoupled mode only: s2, the weight of source 2's output.
    pub decoupled_scale: f32,
}

// 9 addresses, 19 strides, 6 four-byte fields: the CUDA struct's size, with no padding anywhere.
const _: () = assert!(std::mem::size_of::<FlashParams>() == 9 * 8 + 19 * 8 + 6 * 4);

/// Sizes of one head: lq queries, lk own keys/values, lr reference keys/values, head dim d (the
/// same for q, k and v).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashDims {
    pub lq: usize,
    pub lk: usize,
    pub lr: usize,
    pub d: usize,
}

/// In place over one row of scores [own (lk) ; reference (s.len() - lk)]: s[j] <- softmax_j(s[j] *
/// scale), with reference token j dropped (score -inf) where keep[j] == 0. Returns the row's
/// log-sum-exp ln(sum_j exp(s[j] * scale)) over the tokens kept. A row with no token left gives
/// zeros and -inf.
pub fn extended_softmax_row(s: &mut [f32], lk: usize, keep: Option<&[u8]>, scale: f32) -> f32 {
    with_wide_simd(#[inline(always)] || {
        for v in s.iter_mut() {
            *v *= scale;
        }
        // After the scaling, so that a zero scale cannot turn -inf into NaN.
        if let Some(keep) = keep {
            for (v, &k) in s[lk..].iter_mut().zip(keep) {
                if k == 0 {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        let max = row_max(s);
        if max == f32::NEG_INFINITY {
            s.fill(0.0);
            return f32::NEG_INFINITY;
        }
        let sum = exp_shifted_in_place(s, max);
        let inv = (1.0 / sum) as f32;
        for v in s.iter_mut() {
            *v *= inv;
        }
        max + (sum.ln() as f32)
    })
}

/// One head: q [lq, d], k/v [lk, d], k_ref/v_ref [lr, d] (empty when lr = 0), keep [lr] (1 =
/// attend), all row-major. Writes out [lq, d] and lse [lq].
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_head(q: &[f32], k: &[f32], v: &[f32], k_ref: &[f32], v_ref: &[f32], keep: Option<&[u8]>, dims: FlashDims, scale: f32, out: &mut [f32], lse: &mut [f32]) {
    let FlashDims { lq, lk, lr, d } = dims;
    assert!(q.len() >= lq * d && k.len() >= lk * d && v.len() >= lk * d && k_ref.len() >= lr * d && v_ref.len() >= lr * d, "flash_attention_head: input slices shorter than the dims");
    assert!(out.len() >= lq * d && lse.len() >= lq && keep.is_none_or(|m| m.len() >= lr), "flash_attention_head: output or keep slices shorter than the dims");
    // Row j of the extended keys / values.
    let key = |j: usize| if j < lk { &k[j * d..(j + 1) * d] } else { &k_ref[(j - lk) * d..(j - lk + 1) * d] };
    let value = |j: usize| if j < lk { &v[j * d..(j + 1) * d] } else { &v_ref[(j - lk) * d..(j - lk + 1) * d] };
    let mut s = vec![0f32; lk + lr];
    for i in 0..lq {
        let qi = &q[i * d..(i + 1) * d];
        for (j, sj) in s.iter_mut().enumerate() {
            *sj = qi.iter().zip(key(j)).map(|(a, b)| a * b).sum();
        }
        lse[i] = extended_softmax_row(&mut s, lk, keep, scale);
        let o = &mut out[i * d..(i + 1) * d];
        o.fill(0.0);
        for (j, &p) in s.iter().enumerate() {
            if p != 0.0 {
                for (x, &vv) in o.iter_mut().zip(value(j)) {
                    *x += p * vv;
                }
            }
        }
    }
}

/// Sizes of one head in the decoupled mode: lq queries, l1 keys/values of source 1, l2 of source
/// 2, head dim d.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoupledDims {
    pub lq: usize,
    pub l1: usize,
    pub l2: usize,
    pub d: usize,
}

/// One head of decoupled attention: out = softmax(scale q k1^T) v1 + s2 softmax(scale q k2^T) v2
/// (q [lq, d], k1/v1 [l1, d], k2/v2 [l2, d], row-major), lse1 / lse2 [lq] each source's
/// log-sum-exp; a source with no key contributes 0 and has lse -inf. Two calls of
/// `flash_attention_head`, one per source, summed in f32.
#[allow(clippy::too_many_arguments)]
pub fn decoupled_attention_head(q: &[f32], k1: &[f32], v1: &[f32], k2: &[f32], v2: &[f32], dims: DecoupledDims, s2: f32, scale: f32, out: &mut [f32], lse1: &mut [f32], lse2: &mut [f32]) {
    let DecoupledDims { lq, l1, l2, d } = dims;
    let mut out2 = vec![0f32; lq * d];
    flash_attention_head(q, k1, v1, &[], &[], None, FlashDims { lq, lk: l1, lr: 0, d }, scale, out, lse1);
    flash_attention_head(q, k2, v2, &[], &[], None, FlashDims { lq, lk: l2, lr: 0, d }, scale, &mut out2, lse2);
    for (o, &o2) in out[..lq * d].iter_mut().zip(&out2) {
        *o += s2 * o2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{attention_head, AttnDims};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    /// The independent formula: explicit concatenation [own ; reference] and an additive mask of
    /// 0 / -inf, through kernels::attention::attention_head; lse by its definition in f64.
    #[allow(clippy::too_many_arguments)]
    fn concatenated(q: &[f32], k: &[f32], v: &[f32], kr: &[f32], vr: &[f32], keep: Option<&[u8]>, dims: FlashDims, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let FlashDims { lq, lk, lr, d } = dims;
        let kc: Vec<f32> = k[..lk * d].iter().chain(&kr[..lr * d]).copied().collect();
        let vc: Vec<f32> = v[..lk * d].iter().chain(&vr[..lr * d]).copied().collect();
        let row_mask: Vec<f32> = (0..lk + lr).map(|j| if j >= lk && keep.is_some_and(|m| m[j - lk] == 0) { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask: Vec<f32> = (0..lq).flat_map(|_| row_mask.iter().copied()).collect();
        let mut out = vec![0f32; lq * d];
        attention_head(q, &kc, &vc, Some(&mask), AttnDims { lq, lk: lk + lr, d, dv: d }, scale, &mut out);
        let lse = (0..lq)
            .map(|i| {
                let sum: f64 = (0..lk + lr)
                    .filter(|&j| row_mask[j] == 0.0)
                    .map(|j| ((scale as f64) * (0..d).map(|c| q[i * d + c] as f64 * kc[j * d + c] as f64).sum::<f64>()).exp())
                    .sum();
                sum.ln() as f32
            })
            .collect();
        (out, lse)
    }

    fn check(dims: FlashDims, keep: Option<Vec<u8>>, scale: f32) {
        let FlashDims { lq, lk, lr, d } = dims;
        let (q, k, v, kr, vr) = (values(lq * d, 1), values(lk * d, 2), values(lk * d, 3), values(lr * d, 4), values(lr * d, 5));
        let (mut out, mut lse) = (vec![f32::NAN; lq * d], vec![f32::NAN; lq]);
        flash_attention_head(&q, &k, &v, &kr, &vr, keep.as_deref(), dims, scale, &mut out, &mut lse);
        let (want, want_lse) = concatenated(&q, &k, &v, &kr, &vr, keep.as_deref(), dims, scale);
        for (i, (a, e)) in out.iter().zip(&want).enumerate() {
            assert!((a - e).abs() < 1e-5, "{dims:?} out[{i}]: {a} vs {e}");
        }
        for (i, (a, e)) in lse.iter().zip(&want_lse).enumerate() {
            assert!(a == e || (a - e).abs() < 1e-5 * e.abs().max(1.0), "{dims:?} lse[{i}]: {a} vs {e}");
        }
    }

    #[test]
    fn matches_attention_over_the_explicit_concatenation() {
        let dims = FlashDims { lq: 7, lk: 5, lr: 9, d: 6 };
        check(dims, None, 0.4);
        check(dims, Some(vec![1, 0, 1, 1, 0, 0, 1, 0, 1]), 0.4);
        // No reference, and no own keys.
        check(FlashDims { lq: 3, lk: 11, lr: 0, d: 5 }, None, 1.3);
        check(FlashDims { lq: 4, lk: 0, lr: 6, d: 3 }, Some(vec![0, 1, 1, 0, 1, 0]), 0.7);
    }

    #[test]
    fn a_row_with_no_key_left_gives_zeros_and_minus_infinity() {
        let dims = FlashDims { lq: 2, lk: 0, lr: 3, d: 4 };
        let (mut out, mut lse) = (vec![f32::NAN; 8], vec![0f32; 2]);
        flash_attention_head(&values(8, 1), &[], &[], &values(12, 2), &values(12, 3), Some(&[0, 0, 0]), dims, 0.5, &mut out, &mut lse);
        assert_eq!(out, vec![0.0; 8]);
        assert_eq!(lse, vec![f32::NEG_INFINITY; 2]);
        // A zero scale keeps dropped tokens dropped (no 0 * -inf = NaN).
        let mut s = [1.0f32, 2.0, 3.0];
        let lse = extended_softmax_row(&mut s, 1, Some(&[1, 0]), 0.0);
        assert_eq!(s, [0.5, 0.5, 0.0]);
        assert!((lse - 2f32.ln()).abs() < 1e-6);
    }

    /// The decoupled head against its definition written out per row in f64: two softmaxes, the
    /// second weighted by s2; a source with no key adds nothing.
    #[test]
    fn decoupled_head_is_two_independent_softmaxes() {
        let naive = |q: &[f32], k: &[f32], v: &[f32], l: usize, d: usize, i: usize, scale: f64| -> (Vec<f64>, f64) {
            let s: Vec<f64> = (0..l).map(|j| scale * (0..d).map(|c| q[i * d + c] as f64 * k[j * d + c] as f64).sum::<f64>()).collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            let o = (0..d).map(|c| if l == 0 { 0.0 } else { (0..l).map(|j| e[j] * v[j * d + c] as f64).sum::<f64>() / sum }).collect();
            (o, if l == 0 { f64::NEG_INFINITY } else { mx + sum.ln() })
        };
        for (l1, l2) in [(7, 5), (0, 3), (4, 0)] {
            let dims = DecoupledDims { lq: 6, l1, l2, d: 5 };
            let (q, k1, v1, k2, v2) = (values(30, 1), values(l1 * 5, 2), values(l1 * 5, 3), values(l2 * 5, 4), values(l2 * 5, 5));
            let (mut out, mut lse1, mut lse2) = (vec![f32::NAN; 30], vec![f32::NAN; 6], vec![f32::NAN; 6]);
            decoupled_attention_head(&q, &k1, &v1, &k2, &v2, dims, 0.6, 0.45, &mut out, &mut lse1, &mut lse2);
            for i in 0..6 {
                let ((o1, e1), (o2, e2)) = (naive(&q, &k1, &v1, l1, 5, i, 0.45), naive(&q, &k2, &v2, l2, 5, i, 0.45));
                for c in 0..5 {
                    let want = o1[c] + 0.6 * o2[c];
                    assert!((out[i * 5 + c] as f64 - want).abs() < 1e-5, "l1 {l1} l2 {l2} out[{i}, {c}]: {} vs {want}", out[i * 5 + c]);
                }
                for (got, want) in [(lse1[i], e1), (lse2[i], e2)] {
                    assert!(got as f64 == want || (got as f64 - want).abs() < 1e-5, "l1 {l1} l2 {l2} lse row {i}: {got} vs {want}");
                }
            }
        }
    }

    /// The TMA variant maps [B, H, L, 64] views by their own strides: contiguous, padded rows and
    /// interleaved heads ([B, L, H, D] memory); no rows, strides TMA cannot take (not 16-byte
    /// multiples, negative) and a misaligned base are not mapped.
    #[test]
    fn ws_tma_map_takes_any_aligned_strides() {
        use crate::emulate::{TmaDtype, TmaSwizzle};
        let (b, h, l) = (2, 3, 45);
        let m = ws_tma_map(TmaDtype::Bf16, 0x1000, [(h * l * 64) as i64, (l * 64) as i64, 64], (b, h, l)).expect("contiguous rows");
        assert_eq!((m.rank, m.dims, m.strides_bytes, m.box_dims, m.swizzle), (4, [64, l as u64, h as u64, b as u64], [128, (l * 128) as u64, (h * l * 128) as u64], [64, 128, 1, 1], TmaSwizzle::B128));
        assert_eq!(m.box_bytes(), 16384);
        let padded = ws_tma_map(TmaDtype::F16, 0x1000, [(h * l * 72) as i64, (l * 72) as i64, 72], (b, h, l)).expect("padded rows");
        assert_eq!(padded.strides_bytes[0], 144);
        // Interleaved heads: [B, L, H, D] memory.
        let inter = ws_tma_map(TmaDtype::Bf16, 0x1000, [(l * h * 64) as i64, 64, (h * 64) as i64], (b, h, l)).expect("interleaved heads");
        assert_eq!(inter.strides_bytes, [(h * 128) as u64, 128, (l * h * 128) as u64]);
        // One head or one batch entry: that stride is never used and takes a nominal value.
        assert_eq!(ws_tma_map(TmaDtype::Bf16, 0x1000, [7, (l * 64) as i64, 64], (1, h, l)).expect("one batch entry").strides_bytes[2], 128);
        assert!(ws_tma_map(TmaDtype::Bf16, 0x1000, [(l * 64) as i64, 7, 64], (b, 1, l)).is_some());
        // No rows, rows not 16-byte multiples, a negative stride, a misaligned base.
        assert!(ws_tma_map(TmaDtype::Bf16, 0x1000, [0, 0, 64], (b, h, 0)).is_none());
        assert!(ws_tma_map(TmaDtype::Bf16, 0x1000, [(h * l * 68) as i64, (l * 68) as i64, 68], (b, h, l)).is_none());
        assert!(ws_tma_map(TmaDtype::Bf16, 0x1000, [(h * l * 64) as i64, -((l * 64) as i64), 64], (b, h, l)).is_none());
        assert!(ws_tma_map(TmaDtype::Bf16, 0x1008, [(h * l * 64) as i64, (l * 64) as i64, 64], (b, h, l)).is_none());
    }

    #[test]
    fn lse_is_stable_for_large_scores() {
        let mut s = [1000.0f32, 1000.0, -1000.0];
        let lse = extended_softmax_row(&mut s, 3, None, 1.0);
        assert_eq!(s, [0.5, 0.5, 0.0]);
        assert!((lse - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }
}
