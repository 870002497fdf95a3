//! Reference scaled-dot-product attention over slices: out = softmax(q k^T * scale + mask) v, one
//! query row at a time, with the softmax max in f32 and the sum of exponentials in f32 lanes
//! combined in f64 (the softmax module's vectorized row loops). The flash
//! attention CUDA kernels are tested against this; the engine's CPU backend computes the two
//! products with a GEMM and uses `masked_softmax_row` for the middle step.

use crate::softmax::{exp_shifted_in_place, row_max, with_wide_simd};

/// In place: s[j] <- softmax_j(s[j] * scale + mask[j]). A row whose entries are all -inf (fully
/// masked) becomes all zeros, as PyTorch's scaled_dot_product_attention gives (its "safe softmax").
pub fn masked_softmax_row(s: &mut [f32], mask: Option<&[f32]>, scale: f32) {
    with_wide_simd(#[inline(always)] || {
        // Plain `for` loops: iterator adaptors' `fold` may stay outside the AVX2 instance.
        match mask {
            Some(m) => {
                for (v, &a) in s.iter_mut().zip(m) {
                    *v = *v * scale + a;
                }
            }
            None => {
                for v in s.iter_mut() {
                    *v *= scale;
                }
            }
        }
        let max = row_max(s);
        if max == f32::NEG_INFINITY {
            s.fill(0.0);
            return;
        }
        let sum = exp_shifted_in_place(s, max);
        let inv = (1.0 / sum) as f32;
        for v in s.iter_mut() {
            *v *= inv;
        }
    })
}

/// Sizes of one attention head: lq queries, lk keys/values, head dims d (q, k) and dv (v).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

/// One head, row-major q[lq, d], k[lk, d], v[lk, dv], optional additive mask[lq, lk];
/// writes out[lq, dv].
pub fn attention_head(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, dims: AttnDims, scale: f32, out: &mut [f32]) {
    let AttnDims { lq, lk, d, dv } = dims;
    let mut s = vec![0f32; lk];
    for i in 0..lq {
        let qi = &q[i * d..(i + 1) * d];
        for (j, sj) in s.iter_mut().enumerate() {
            *sj = qi.iter().zip(&k[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
        }
        masked_softmax_row(&mut s, mask.map(|m| &m[i * lk..(i + 1) * lk]), scale);
        let o = &mut out[i * dv..(i + 1) * dv];
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &p) in s.iter().enumerate() {
            for (x, &vv) in o.iter_mut().zip(&v[j * dv..(j + 1) * dv]) {
                *x += p * vv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_scores_average_the_values() {
        let dims = AttnDims { lq: 1, lk: 3, d: 2, dv: 1 };
        let mut out = [0f32];
        attention_head(&[0.0, 0.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1.0, 2.0, 6.0], None, dims, 1.0, &mut out);
        assert!((out[0] - 3.0).abs() < 1e-6);
        // Masking the last key out averages the first two.
        attention_head(&[0.0, 0.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1.0, 2.0, 6.0], Some(&[0.0, 0.0, f32::NEG_INFINITY]), dims, 1.0, &mut out);
        assert!((out[0] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn softmax_is_stable_for_large_scores() {
        let mut s = [1000.0f32, 1000.0, -1000.0];
        masked_softmax_row(&mut s, None, 1.0);
        assert_eq!(s, [0.5, 0.5, 0.0]);
        let mut s = [1.0f32, 2.0];
        masked_softmax_row(&mut s, Some(&[f32::NEG_INFINITY; 2]), 1.0);
        assert_eq!(s, [0.0, 0.0]);
    }
}
