//! Softmax and log-softmax over the rows of a contiguous row-major f32 matrix: the CPU reference of
//! the CUDA softmax kernels and the engine's CPU backend.
//!
//! Numerically stable: each row is shifted by its maximum before exponentiating, and the sum of
//! exponentials is accumulated in f32 lanes over short blocks, the blocks in f64. Rows are independent, so the rayon split over rows gives the
//! same bits whatever the thread count. A row whose every entry is -inf gives NaN, as PyTorch does;
//! a row with some -inf entries gives exact zeros there (log-softmax: -inf) and no NaN.

/// kernels/cuda/softmax.cu: softmax_* (row in registers) and softmax_long_* (rows longer than 16384).
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "softmax", code: include_str!("../cuda/softmax.cu"), options: &[] };

use rayon::prelude::*;

/// Rows below this many elements in total stay on the calling thread.
const PAR_MIN: usize = 1 << 14;

/// Independent accumulators of the row loops (maxima, partial sums). The compiler keeps them in
/// vector registers, so the loops vectorize; the count is fixed (not the machine's vector width), so
/// the summation order, and the result, is the same on every CPU and thread count.
const LANES: usize = 16;
/// Elements summed in f32 lanes before the lanes are added into the f64 total: each lane adds at
/// most BLOCK / LANES values in f32, which keeps the sum as accurate as an f64 loop for our tolerances.
const BLOCK: usize = 256;

/// e^x in f32 without libm, written so that loops over it vectorize: Cephes' expf (range reduction
/// by ln 2, degree-6 polynomial; within 1 ulp of the exact value, measured below 8e-8 relative), with
/// 2^n applied as two factors so that results down to the subnormals and up to overflow stay right.
/// exp(-inf) = 0 exactly, exp(inf) = inf, exp(NaN) = NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Beyond these e^x is inf / 0 in f32; clamping keeps 2^n representable. Comparisons with NaN
    // are false, so NaN passes through and stays NaN.
    let xc = if x > 89.0 { 89.0 } else { x };
    let xc = if xc < -110.0 { -110.0 } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let h = ni >> 1;
    let s1 = f32::from_bits((h.wrapping_add(127) << 23) as u32);
    let s2 = f32::from_bits((ni.wrapping_sub(h).wrapping_add(127) << 23) as u32);
    p * s1 * s2
}

/// Runs `f` compiled for AVX2 when the CPU has it (twice the vector width of the x86-64 baseline
/// the crate is built for), else as built. The row loops are written with fixed lanes and Rust never
/// fuses a multiply and an add on its own, so both versions give the same bits; `f` and the
/// helpers it calls are #[inline(always)] so that they are compiled inside the AVX2 function.
#[inline(always)]
pub(crate) fn with_wide_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Rows per parallel task: about 16K elements, so that short rows do not become one task each.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (PAR_MIN / cols.max(1)).max(1)
}

/// The largest entry of a row, ignoring NaN (f32::max): a NaN anywhere must make a softmax row NaN
/// as in PyTorch, which the exp/sum after it does by itself (NaN - max = NaN).
#[inline(always)]
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let (chunks, tail) = row.as_chunks::<LANES>();
    let mut m = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    m.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// In place: s[j] <- e^(s[j] - shift); returns the sum of the exponentials (f32 lanes per block of
/// BLOCK elements, the blocks added in f64).
#[inline(always)]
pub(crate) fn exp_shifted_in_place(s: &mut [f32], shift: f32) -> f64 {
    let mut total = 0f64;
    for block in s.chunks_mut(BLOCK) {
        let mut acc = [0f32; LANES];
        let (chunks, tail) = block.as_chunks_mut::<LANES>();
        for c in chunks {
            for l in 0..LANES {
                let e = exp_f32(c[l] - shift);
                c[l] = e;
                acc[l] += e;
            }
        }
        for v in tail {
            *v = exp_f32(*v - shift);
            acc[0] += *v;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

/// out[j] = e^(x[j] - shift), the same sums as `exp_shifted_in_place` without a copy of the row
/// first.
#[inline(always)]
fn exp_shifted_into(x: &[f32], shift: f32, out: &mut [f32]) -> f64 {
    let mut total = 0f64;
    for (ob, xb) in out.chunks_mut(BLOCK).zip(x.chunks(BLOCK)) {
        let mut acc = [0f32; LANES];
        let (oc, ot) = ob.as_chunks_mut::<LANES>();
        let (xc, xt) = xb.as_chunks::<LANES>();
        for (o, v) in oc.iter_mut().zip(xc) {
            for l in 0..LANES {
                let e = exp_f32(v[l] - shift);
                o[l] = e;
                acc[l] += e;
            }
        }
        for (o, &v) in ot.iter_mut().zip(xt) {
            *o = exp_f32(v - shift);
            acc[0] += *o;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

#[inline(always)]
fn softmax_row(x: &[f32], out: &mut [f32]) {
    let max = row_max(x);
    let sum = exp_shifted_into(x, max, out);
    let inv = (1.0 / sum) as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[inline(always)]
fn log_softmax_row(x: &[f32], out: &mut [f32]) {
    let max = row_max(x);
    // `out` is scratch for the exponentials here; it is overwritten below.
    let sum = exp_shifted_into(x, max, out);
    // (x - max) - log(sum), not x - (max + log(sum)): the shifted value is small, so no precision
    // is lost to a large max.
    let log_sum = sum.ln() as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max) - log_sum;
    }
}

fn for_rows(x: &[f32], cols: usize, out: &mut [f32], f: impl Fn(&[f32], &mut [f32]) + Sync) {
    assert_eq!(x.len(), out.len(), "softmax: input and output lengths differ");
    if cols == 0 || x.is_empty() {
        return;
    }
    assert_eq!(x.len() % cols, 0, "softmax: length {} is not a multiple of the row length {cols}", x.len());
    // Several rows per task, each task compiled for the widest vectors the CPU has (a plain `for`
    // loop and #[inline(always)] row functions, so that nothing is left outside the AVX2 instance).
    let rows = |(o, x): (&mut [f32], &[f32])| {
        with_wide_simd(#[inline(always)] || {
            for (o, r) in o.chunks_mut(cols).zip(x.chunks(cols)) {
                f(r, o);
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

/// out[r, :] = softmax(x[r, :]) for every row of length `cols`.
pub fn softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for_rows(x, cols, out, softmax_row)
}

/// out[r, :] = log_softmax(x[r, :]) for every row of length `cols`.
pub fn log_softmax_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for_rows(x, cols, out, log_softmax_row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32]) -> Vec<f64> {
        let e: Vec<f64> = x.iter().map(|&v| (v as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn matches_naive_formula_on_small_logits() {
        let x = [0.5f32, -1.0, 2.0, 0.0, 3.0, -2.5];
        let mut out = [0f32; 6];
        softmax_rows(&x, 3, &mut out);
        for r in 0..2 {
            let want = naive(&x[r * 3..r * 3 + 3]);
            for j in 0..3 {
                assert!((out[r * 3 + j] as f64 - want[j]).abs() < 1e-7);
            }
        }
        let mut lo = [0f32; 6];
        log_softmax_rows(&x, 3, &mut lo);
        for i in 0..6 {
            assert!((lo[i].exp() - out[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let x = [1000f32, 999.0, -1000.0];
        let mut out = [0f32; 3];
        softmax_rows(&x, 3, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut lo = [0f32; 3];
        log_softmax_rows(&x, 3, &mut lo);
        assert!((lo[0] - (-(1.0f32 + (-1.0f32).exp()).ln())).abs() < 1e-5);
        assert!((lo[2] - (-2000.0 - (1.0f32 + (-1.0f32).exp()).ln())).abs() < 1e-3);
    }

    #[test]
    fn partly_masked_rows_give_zeros_not_nan() {
        let ninf = f32::NEG_INFINITY;
        let x = [ninf, 1.0, ninf, 1.0];
        let mut out = [0f32; 4];
        softmax_rows(&x, 4, &mut out);
        assert_eq!(out, [0.0, 0.5, 0.0, 0.5]);
        let mut lo = [0f32; 4];
        log_softmax_rows(&x, 4, &mut lo);
        assert_eq!(lo[0], ninf);
        assert!((lo[1] - (0.5f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn fully_masked_row_is_nan_like_torch_and_leaves_other_rows_alone() {
        let ninf = f32::NEG_INFINITY;
        let x = [ninf, ninf, 0.0, 0.0];
        let mut out = [0f32; 4];
        softmax_rows(&x, 2, &mut out);
        assert!(out[0].is_nan() && out[1].is_nan());
        assert_eq!(&out[2..], &[0.5, 0.5]);
    }

    #[test]
    fn single_column_is_one_and_nan_propagates() {
        let x = [3.0f32, -7.0, f32::NAN];
        let mut out = [0f32; 3];
        softmax_rows(&x, 1, &mut out);
        assert_eq!(&out[..2], &[1.0, 1.0]);
        assert!(out[2].is_nan());
        let x = [1.0f32, f32::NAN, 0.0];
        softmax_rows(&x, 3, &mut out);
        assert!(out.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn exp_f32_is_within_an_ulp_of_libm_over_the_whole_range() {
        let mut x = -104.0f32;
        while x < 88.7 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            // Relative error below 1.5e-7 (about an ulp) for normal results; subnormals are exact
            // to their spacing.
            assert!((got - want).abs() <= 1.5e-7 * want + 1.5e-45, "exp({x}) = {got:e}, want {want:e}");
            x += 0.00917;
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn parallel_split_gives_identical_bits() {
        // Also: the out-of-place and in-place exponentials give the same bits.
        let x: Vec<f32> = (0..700).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let (mut a, mut b) = (vec![0f32; 700], x.clone());
        assert_eq!(exp_shifted_into(&x, 1.5, &mut a), exp_shifted_in_place(&mut b, 1.5));
        assert_eq!(a, b);
        let cols = 333;
        let x: Vec<f32> = (0..cols * 97).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
        let mut par = vec![0f32; x.len()];
        softmax_rows(&x, cols, &mut par);
        let mut seq = vec![0f32; x.len()];
        for (o, r) in seq.chunks_mut(cols).zip(x.chunks(cols)) {
            softmax_row(r, o);
        }
        assert_eq!(par, seq);
    }
}
