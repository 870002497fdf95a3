//! Softmax and log-softmax over the rows of a contiguous row-major f32 matrix: the CPU reference of
//! the CUDA softmax kernels and the engine's CPU backend.
//!
//! Numerically stable: each row is shifted by its maximum before exponentiating, and the sum of
//! exponentials is accumulated in f64. Rows are independent, so the rayon split over rows gives the
//! same bits whatever the thread count. A row whose every entry is -inf gives NaN, as PyTorch does;
//! a row with some -inf entries gives exact zeros there (log-softmax: -inf) and no NaN.

/// kernels/cuda/softmax.cu: softmax_* (row in registers) and softmax_long_* (rows longer than 16384).
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "softmax", code: include_str!("../cuda/softmax.cu"), options: &[] };

use rayon::prelude::*;

/// Rows below this many elements in total stay on the calling thread.
const PAR_MIN: usize = 1 << 14;

fn row_max(row: &[f32]) -> f32 {
    // f32::max ignores NaN; a NaN anywhere must make the row NaN as in PyTorch, which the exp/sum
    // below does by itself (NaN - max = NaN), so ignoring it here is harmless.
    row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

fn softmax_row(x: &[f32], out: &mut [f32]) {
    let max = row_max(x);
    let mut sum = 0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        let e = (v - max).exp();
        *o = e;
        sum += e as f64;
    }
    let inv = (1.0 / sum) as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

fn log_softmax_row(x: &[f32], out: &mut [f32]) {
    let max = row_max(x);
    let sum: f64 = x.iter().map(|&v| (v - max).exp() as f64).sum();
    // (x - max) - log(sum), not x - (max + log(sum)): the shifted value is small, so no precision
    // is lost to a large max.
    let log_sum = sum.ln() as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max) - log_sum;
    }
}

fn for_rows(x: &[f32], cols: usize, out: &mut [f32], f: fn(&[f32], &mut [f32])) {
    assert_eq!(x.len(), out.len(), "softmax: input and output lengths differ");
    if cols == 0 || x.is_empty() {
        return;
    }
    assert_eq!(x.len() % cols, 0, "softmax: length {} is not a multiple of the row length {cols}", x.len());
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, r)| f(r, o));
    } else {
        out.chunks_mut(cols).zip(x.chunks(cols)).for_each(|(o, r)| f(r, o));
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
    fn parallel_split_gives_identical_bits() {
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
