//! f32 matrix products on the CPU through the `gemm` crate. Operands are described by strides into
//! a slice, so transposed and broadcast views are multiplied without copying them first.

use rayon::prelude::*;

/// One operand: a matrix per batch entry, starting at `offsets[b]` in `data`, element (i, j) at
/// `offsets[b] + i * rs + j * cs`.
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub offsets: &'a [usize],
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    /// Panics (an engine bug, not a user error) if a `rows` x `cols` matrix at any offset would read
    /// outside `data`: the gemm crate reads through raw pointers.
    fn check(&self, rows: usize, cols: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        let extent = (rows - 1) * self.rs + (cols - 1) * self.cs;
        for &o in self.offsets {
            assert!(o + extent < self.data.len(), "gemm operand out of bounds: offset {o} + {extent} >= {}", self.data.len());
        }
    }
}

/// Products smaller than this (m * n * k) run one per thread when there are several of them.
const SMALL_PRODUCT: usize = 1 << 21;

/// dst[b] (+)= lhs[b] (m x k) · rhs[b] (k x n) for every batch entry b; dst is row-major
/// [batch, m, n]. With `accumulate` the product is added to what dst holds (used to start from a
/// bias), otherwise dst is overwritten. The sum order over k does not depend on the thread count.
pub fn batched_matmul(m: usize, n: usize, k: usize, lhs: &MatRef, rhs: &MatRef, dst: &mut [f32], accumulate: bool) {
    let batch = lhs.offsets.len();
    assert_eq!(batch, rhs.offsets.len(), "batched_matmul: lhs and rhs batch counts differ");
    assert_eq!(dst.len(), batch * m * n, "batched_matmul: dst length");
    lhs.check(m, k);
    rhs.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let one = |b: usize, out: &mut [f32], par: gemm::Parallelism| {
        // SAFETY: both operands were bounds-checked above for every batch offset, and `out` is an
        // exclusive m x n row-major block.
        unsafe {
            gemm_f32(m, n, k, out.as_mut_ptr(), n, 1, accumulate, lhs.data.as_ptr().add(lhs.offsets[b]), lhs.rs, lhs.cs, rhs.data.as_ptr().add(rhs.offsets[b]), rhs.rs, rhs.cs, par);
        }
    };
    if batch > 1 && threads > 1 && m * n * k < SMALL_PRODUCT {
        dst.par_chunks_mut(m * n).enumerate().for_each(|(b, out)| one(b, out, gemm::Parallelism::None));
    } else {
        for (b, out) in dst.chunks_mut(m * n).enumerate() {
            one(b, out, parallelism(m * n * k));
        }
    }
}

/// Rayon inside one product only when it is big enough to pay for the fork-join.
pub fn parallelism(flops: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && flops >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// dst (m x n, strides dst_rs/dst_cs) (+)= lhs (m x k) · rhs (k x n), all strides in elements.
///
/// # Safety
/// Every element the strides address must be inside its allocation, and dst must not alias the
/// operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    par: gemm::Parallelism,
) {
    // gemm computes dst = alpha * dst + beta * lhs · rhs (alpha is ignored unless read_dst).
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: impl Fn(usize, usize) -> f32, b: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        out
    }

    #[test]
    fn strided_operands_match_a_naive_product() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|v| (v as f32 * 0.11).cos()).collect();
        // lhs row-major; rhs stored transposed (n x k row-major), read with rs = 1, cs = k.
        let bt: Vec<f32> = (0..n * k).map(|v| b[(v % k) * n + v / k]).collect();
        let mut dst = vec![1f32; 2 * m * n];
        let lhs = MatRef { data: &a, offsets: &[0, 0], rs: k, cs: 1 };
        let rhs = MatRef { data: &bt, offsets: &[0, 0], rs: 1, cs: k };
        batched_matmul(m, n, k, &lhs, &rhs, &mut dst, true);
        let want = naive(m, n, k, |i, p| a[i * k + p], |p, j| b[p * n + j]);
        for (i, (&g, &w)) in dst.iter().zip(want.iter().chain(&want)).enumerate() {
            assert!((g - (w + 1.0)).abs() < 1e-5, "element {i}: {g} vs {}", w + 1.0);
        }
    }
}
