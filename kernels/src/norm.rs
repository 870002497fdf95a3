//! Normalisations and gated activations on contiguous f32 slices: layer norm over rows, group norm
//! (optionally fused with SiLU) and inference batch norm over NCHW data, and GEGLU. These are the
//! CPU reference of the CUDA kernels of the same math and the engine's CPU backend.
//!
//! Statistics are multi-pass (an approximate mean, then the sums of deviations from it and of their
//! squares) accumulated in f32 lanes over short blocks and in f64 across blocks, so they stay accurate
//! for large offsets and long rows while the loops vectorize. Variances are biased, as in PyTorch's norms. Work
//! is split over independent rows/groups, so results do not depend on the thread count.

/// kernels/cuda/norm.cu: layer norm (+ backward), group norm (+SiLU, + backward, NCHW or channels-last), batch norm, GEGLU, PReLU. The backward math's CPU reference is `norm_backward`.
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "norm", code: include_str!("../cuda/norm.cu"), options: &[] };
/// kernels/cuda/group_norm.cu: single-launch group norm (+SiLU) forward with thread-block clusters (sm_90+; empty kernels below).
pub const GROUP_NORM_SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "group_norm", code: include_str!("../cuda/group_norm.cu"), options: &[] };

use rayon::prelude::*;

use crate::elementwise::gelu_erf;
#[cfg(test)]
use crate::elementwise::sigmoid;
use crate::softmax::{exp_f32, rows_per_task, with_wide_simd};

/// Below this many elements in total the loops stay on the calling thread.
const PAR_MIN: usize = 1 << 14;

/// Independent f32 accumulators of the statistics loops: the compiler keeps them in vector
/// registers, so the loops vectorize. Fixed (not the machine's vector width), so the summation order
/// and the result are the same on every CPU and thread count.
const LANES: usize = 16;
/// Elements summed in f32 lanes before the lanes are added into an f64 total (each lane adds at
/// most BLOCK / LANES values in f32).
const BLOCK: usize = 256;

/// Σ f(x[j]) and Σ f(x[j])² with f32 lanes per block of BLOCK elements, the blocks added in f64.
#[inline(always)]
fn lane_sums(x: &[f32], f: impl Fn(f32) -> f32) -> (f64, f64) {
    let (mut total, mut total_sq) = (0f64, 0f64);
    for block in x.chunks(BLOCK) {
        let (mut acc, mut acc_sq) = ([0f32; LANES], [0f32; LANES]);
        let (chunks, tail) = block.as_chunks::<LANES>();
        for c in chunks {
            for l in 0..LANES {
                let d = f(c[l]);
                acc[l] += d;
                acc_sq[l] += d * d;
            }
        }
        for &v in tail {
            let d = f(v);
            acc[0] += d;
            acc_sq[0] += d * d;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
        total_sq += acc_sq.iter().map(|&a| a as f64).sum::<f64>();
    }
    (total, total_sq)
}

/// Statistics of one row or group, ready for an f32 normalisation loop: x - mean is computed as
/// (x - shift) - correction, where `shift` is the mean rounded to f32 (so x - shift is exact for x
/// near the mean, however large the common offset) and `correction` = mean - shift is tiny.
struct Stats {
    shift: f32,
    correction: f32,
    /// 1 / sqrt(biased variance + eps).
    rstd: f64,
}

/// Three passes, all vectorized: the sum of x - x[0] gives an approximate mean (relative to the
/// data's spread, not its offset); the sums of d = x - shift and of d² around it give the mean and
/// variance by the shifted-data formula var = Σd²/n - (Σd/n)², which is exact for any shift and,
/// with the shift this close to the mean, loses nothing to cancellation.
#[inline(always)]
fn stats(x: &[f32], eps: f32) -> Stats {
    let n = x.len() as f64;
    let first = x[0];
    let (s, _) = lane_sums(x, |v| v - first);
    let shift = (first as f64 + s / n) as f32;
    let (s1, s2) = lane_sums(x, |v| v - shift);
    let correction = s1 / n;
    let var = (s2 / n - correction * correction).max(0.0);
    Stats { shift, correction: correction as f32, rstd: 1.0 / (var + eps as f64).sqrt() }
}

/// Mean and biased variance of a slice, in f64 (the tests' plain reference).
#[cfg(test)]
fn mean_var(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n;
    (mean, var)
}

fn check_affine(name: &str, len: usize, weight: Option<&[f32]>, bias: Option<&[f32]>) {
    if let Some(w) = weight {
        assert_eq!(w.len(), len, "{name}: weight length");
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), len, "{name}: bias length");
    }
}

/// One row of `layer_norm_rows`.
#[inline(always)]
fn layer_norm_row(r: &[f32], weight: Option<&[f32]>, bias: Option<&[f32]>, eps: f32, o: &mut [f32]) {
    let Stats { shift, correction, rstd } = stats(r, eps);
    let rstd = rstd as f32;
    let norm = |v: f32| ((v - shift) - correction) * rstd;
    // One loop per affine combination, so that no Option is tested per element.
    match (weight, bias) {
        (Some(w), Some(b)) => {
            for (((o, &v), &w), &b) in o.iter_mut().zip(r).zip(w).zip(b) {
                *o = norm(v) * w + b;
            }
        }
        (Some(w), None) => {
            for ((o, &v), &w) in o.iter_mut().zip(r).zip(w) {
                *o = norm(v) * w;
            }
        }
        (None, Some(b)) => {
            for ((o, &v), &b) in o.iter_mut().zip(r).zip(b) {
                *o = norm(v) + b;
            }
        }
        (None, None) => {
            for (o, &v) in o.iter_mut().zip(r) {
                *o = norm(v);
            }
        }
    }
}

/// Layer norm over rows of length `cols`: out = (x - mean) / sqrt(var + eps) * weight + bias, with
/// `weight` and `bias` (length `cols`) optional.
pub fn layer_norm_rows(x: &[f32], cols: usize, weight: Option<&[f32]>, bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "layer_norm: input and output lengths differ");
    check_affine("layer_norm", cols, weight, bias);
    if cols == 0 || x.is_empty() {
        return;
    }
    assert_eq!(x.len() % cols, 0, "layer_norm: length {} is not a multiple of the row length {cols}", x.len());
    // Several rows per task, each task compiled for the widest vectors the CPU has (plain `for`
    // loops and #[inline(always)] helpers, so that nothing is left outside the AVX2 instance).
    let rows = |(o, x): (&mut [f32], &[f32])| {
        with_wide_simd(#[inline(always)] || {
            for (o, r) in o.chunks_mut(cols).zip(x.chunks(cols)) {
                layer_norm_row(r, weight, bias, eps, o);
            }
        })
    };
    if x.len() >= PAR_MIN {
        let chunk = rows_per_task(cols) * cols;
        out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(rows);
    } else {
        rows((out, x));
    }
}

/// Group norm over NCHW data (`hw` = the product of the spatial sizes): channels are split into
/// `groups` consecutive groups, each (sample, group) is normalised by its own mean and variance,
/// then scaled by the per-channel `weight` and shifted by `bias` (length `c`). With `silu`, SiLU is
/// applied to the result (diffusers' GroupNorm followed by SiLU, in one pass).
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    silu: bool,
    out: &mut [f32],
) {
    group_norm_with_stats(x, n, c, hw, groups, weight, bias, eps, silu, out, None);
}

/// `group_norm`, also writing each (sample, group)'s statistics when `stats` is given: length
/// 2 n groups, laid out [N, G, 2] = (mean, 1 / sqrt(biased variance + eps)), the values the
/// normalisation used (rounded to f32). The backward takes them instead of recomputing them, as
/// PyTorch's native_group_norm saves mean and rstd. Empty groups (hw = 0) get (0, 0).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with_stats(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    silu: bool,
    out: &mut [f32],
    saved_stats: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), n * c * hw, "group_norm: input length");
    assert_eq!(out.len(), x.len(), "group_norm: output length");
    assert!(groups > 0 && c.is_multiple_of(groups), "group_norm: {groups} groups do not divide {c} channels");
    check_affine("group_norm", c, weight, bias);
    if let Some(s) = &saved_stats {
        assert_eq!(s.len(), 2 * n * groups, "group_norm: statistics length");
    }
    let cpg = c / groups;
    let group_len = cpg * hw;
    if group_len == 0 || n == 0 {
        if let Some(s) = saved_stats {
            s.fill(0.0);
        }
        return;
    }
    // Two floats a group: where the statistics go when the caller does not want them.
    let mut unused = Vec::new();
    let saved = match saved_stats {
        Some(s) => s,
        None => {
            unused.resize(2 * n * groups, 0f32);
            &mut unused[..]
        }
    };
    // Each group compiled for the widest vectors the CPU has (plain `for` loops inside, so that
    // nothing is left outside the AVX2 instance).
    // (group index, ((y, x), (mean, rstd) slot)) of one (sample, group).
    type GroupArgs<'a> = (usize, ((&'a mut [f32], &'a [f32]), &'a mut [f32]));
    let group = |(idx, ((o, r), st)): GroupArgs| {
        with_wide_simd(#[inline(always)] || {
            let Stats { shift, correction, rstd } = stats(r, eps);
            st[0] = (shift as f64 + correction as f64) as f32;
            st[1] = rstd as f32;
            let first_channel = (idx % groups) * cpg;
            for (k, (oc, rc)) in o.chunks_mut(hw).zip(r.chunks(hw)).enumerate() {
                let ch = first_channel + k;
                // Subtract the mean first (rather than folding it into the offset) so that inputs
                // with a large common offset keep their precision.
                let scale = (rstd * weight.map_or(1.0, |w| w[ch] as f64)) as f32;
                let offset = bias.map_or(0.0, |b| b[ch]);
                let norm = |v: f32| ((v - shift) - correction) * scale + offset;
                if silu {
                    // SiLU with the vectorizable exp (sigmoid(y) = 1 / (1 + e^-y)).
                    for (o, &v) in oc.iter_mut().zip(rc) {
                        let y = norm(v);
                        *o = y / (1.0 + exp_f32(-y));
                    }
                } else {
                    for (o, &v) in oc.iter_mut().zip(rc) {
                        *o = norm(v);
                    }
                }
            }
        })
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).zip(saved.par_chunks_mut(2)).enumerate().for_each(group);
    } else {
        out.chunks_mut(group_len).zip(x.chunks(group_len)).zip(saved.chunks_mut(2)).enumerate().for_each(group);
    }
}

/// Inference batch norm over NCHW data with running statistics `mean` and `var` (length `c`):
/// out = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c].
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    mean: &[f32],
    var: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    assert_eq!(x.len(), n * c * hw, "batch_norm: input length");
    assert_eq!(out.len(), x.len(), "batch_norm: output length");
    assert!(mean.len() == c && var.len() == c, "batch_norm: statistics length");
    check_affine("batch_norm", c, weight, bias);
    if hw == 0 || x.is_empty() {
        return;
    }
    let plane = |(idx, (o, r)): (usize, (&mut [f32], &[f32]))| {
        let ch = idx % c;
        let rstd = 1.0 / (var[ch] as f64 + eps as f64).sqrt();
        let w = weight.map_or(1.0, |w| w[ch] as f64);
        let b = bias.map_or(0.0, |b| b[ch] as f64);
        let scale = (rstd * w) as f32;
        let shift = (b - mean[ch] as f64 * rstd * w) as f32;
        for (o, &v) in o.iter_mut().zip(r) {
            *o = v * scale + shift;
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(plane);
    } else {
        out.chunks_mut(hw).zip(x.chunks(hw)).enumerate().for_each(plane);
    }
}

/// GEGLU as in diffusers: each input row of length 2 * `half` is split into [h, gate] and
/// out = h * gelu(gate) (exact erf GELU); `out` has rows of length `half`.
pub fn geglu_rows(x: &[f32], half: usize, out: &mut [f32]) {
    if half == 0 {
        assert!(out.is_empty(), "geglu: output must be empty when rows are empty");
        return;
    }
    assert_eq!(x.len() % (2 * half), 0, "geglu: length {} is not a multiple of the row length {}", x.len(), 2 * half);
    assert_eq!(out.len() * 2, x.len(), "geglu: output length");
    let row = |(o, r): (&mut [f32], &[f32])| {
        let (h, gate) = r.split_at(half);
        for ((o, &a), &g) in o.iter_mut().zip(h).zip(gate) {
            *o = a * gelu_erf(g);
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(half).zip(x.par_chunks(2 * half)).for_each(row);
    } else {
        out.chunks_mut(half).zip(x.chunks(2 * half)).for_each(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_of_constant_row_is_bias() {
        let x = [5.0f32; 4];
        let mut out = [0f32; 4];
        layer_norm_rows(&x, 4, Some(&[2.0; 4]), Some(&[0.5, 1.0, 1.5, 2.0]), 1e-5, &mut out);
        assert_eq!(out, [0.5, 1.0, 1.5, 2.0]);
    }

    #[test]
    fn layer_norm_is_accurate_with_large_offset() {
        // One-pass E[x^2] - E[x]^2 in f32 would lose the variance here.
        let x: Vec<f32> = (0..64).map(|i| 10000.0 + (i % 2) as f32).collect();
        let mut out = vec![0f32; 64];
        layer_norm_rows(&x, 64, None, None, 0.0, &mut out);
        assert!((out[0] + 1.0).abs() < 1e-5 && (out[1] - 1.0).abs() < 1e-5, "{:?}", &out[..2]);
    }

    #[test]
    fn group_norm_matches_layer_norm_per_group() {
        // One group per sample is a layer norm over C*H*W (without the affine).
        let (n, c, hw) = (2, 6, 35);
        let x: Vec<f32> = (0..n * c * hw).map(|i| ((i * 37) % 101) as f32 * 0.1 - 3.0).collect();
        let mut g = vec![0f32; x.len()];
        group_norm(&x, n, c, hw, 1, None, None, 1e-5, false, &mut g);
        let mut l = vec![0f32; x.len()];
        layer_norm_rows(&x, c * hw, None, None, 1e-5, &mut l);
        for (a, b) in g.iter().zip(&l) {
            assert!((a - b).abs() < 1e-5);
        }
        // Three groups: each group of 2 channels has mean 0 and variance 1 after the norm.
        group_norm(&x, n, c, hw, 3, None, None, 0.0, false, &mut g);
        for grp in g.chunks(2 * hw) {
            let (m, v) = mean_var(grp);
            assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5, "{m} {v}");
        }
    }

    #[test]
    fn group_norm_saves_the_statistics_it_used() {
        // Sample 1 at a large offset; parallel (above PAR_MIN) and sequential runs.
        for (n, c, hw, groups) in [(2, 6, 35, 3), (2, 8, 1200, 4)] {
            let x: Vec<f32> = (0..n * c * hw).map(|i| ((i * 37) % 101) as f32 * 0.1 - 3.0 + if i >= c * hw { 500.0 } else { 0.0 }).collect();
            let (mut y, mut y_plain) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            let mut st = vec![f32::NAN; 2 * n * groups];
            group_norm_with_stats(&x, n, c, hw, groups, None, None, 1e-5, true, &mut y, Some(&mut st));
            group_norm(&x, n, c, hw, groups, None, None, 1e-5, true, &mut y_plain);
            assert_eq!(y, y_plain, "the statistics change nothing of y");
            for (q, grp) in x.chunks(c / groups * hw).enumerate() {
                let (m, v) = mean_var(grp);
                let rstd = 1.0 / (v + 1e-5).sqrt();
                assert!((st[2 * q] as f64 - m).abs() <= 1e-6 * m.abs().max(1.0), "group {q}: mean {} vs {m}", st[2 * q]);
                assert!((st[2 * q + 1] as f64 - rstd).abs() <= 1e-6 * rstd, "group {q}: rstd {} vs {rstd}", st[2 * q + 1]);
            }
        }
        // Empty groups: (0, 0).
        let mut st = vec![f32::NAN; 4];
        group_norm_with_stats(&[], 2, 2, 0, 1, None, None, 1e-5, false, &mut [], Some(&mut st));
        assert_eq!(st, [0.0; 4]);
    }

    #[test]
    fn group_norm_silu_is_silu_of_group_norm() {
        let (n, c, hw) = (1, 4, 5);
        let x: Vec<f32> = (0..n * c * hw).map(|i| (i as f32).sin() * 3.0).collect();
        let w = [1.0, -2.0, 0.5, 3.0];
        let b = [0.1, 0.2, -0.3, 0.0];
        let mut plain = vec![0f32; x.len()];
        group_norm(&x, n, c, hw, 2, Some(&w), Some(&b), 1e-6, false, &mut plain);
        let mut fused = vec![0f32; x.len()];
        group_norm(&x, n, c, hw, 2, Some(&w), Some(&b), 1e-6, true, &mut fused);
        for (f, p) in fused.iter().zip(&plain) {
            assert!((f - p * sigmoid(*p)).abs() < 1e-6);
        }
    }

    #[test]
    fn batch_norm_uses_running_stats() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0f32; 4];
        batch_norm(&x, 1, 2, 2, &[1.0, 3.0], &[4.0, 1.0], Some(&[2.0, 1.0]), Some(&[0.0, 10.0]), 0.0, &mut out);
        assert_eq!(out, [0.0, 1.0, 10.0, 11.0]);
    }

    #[test]
    fn geglu_splits_value_then_gate() {
        let x = [1.0f32, 2.0, 0.0, 10.0];
        let mut out = [0f32; 2];
        geglu_rows(&x, 2, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 20.0).abs() < 1e-5);
    }

    #[test]
    fn parallel_split_gives_identical_bits() {
        let (n, c, hw) = (3, 32, 300);
        let x: Vec<f32> = (0..n * c * hw).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
        let mut par = vec![0f32; x.len()];
        group_norm(&x, n, c, hw, 8, None, None, 1e-5, true, &mut par);
        // The same groups one at a time (each below the parallel threshold).
        let glen = 4 * hw;
        let mut seq = vec![0f32; x.len()];
        for (o, r) in seq.chunks_mut(glen).zip(x.chunks(glen)) {
            group_norm(r, 1, 4, hw, 1, None, None, 1e-5, true, o);
        }
        assert_eq!(par, seq);
    }
}
