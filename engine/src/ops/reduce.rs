//! Reductions: sum, mean, variance over any set of dimensions; max, min, argmax along one.
//!
//! The CPU path moves the reduced dimensions to the end (a permuted view), reads the result as
//! contiguous rows and reduces each row on its own: sums and variances accumulate in f64, so the
//! result does not depend on the thread count and matches PyTorch's f32 results to rounding.
//! Float dtypes compute in f32/f64 and return their own dtype. max/min/argmax work on every dtype
//! and compare the stored values directly.

use rayon::prelude::*;

use crate::layout::resolve_dim;
use crate::{DType, Device, Error, Result, Tensor, WithDType};

/// Below this many input elements the row loop stays on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// The permutation that moves the reduced dims (in order) after the kept ones, and the shape of
/// the result with or without the reduced dims kept as size 1.
struct Plan {
    perm: Vec<usize>,
    /// Product of the reduced dims' sizes: the row length after permuting.
    row: usize,
    out_shape: Vec<usize>,
}

fn plan(op: &'static str, shape: &[usize], dims: &[isize], keepdim: bool) -> Result<Plan> {
    let rank = shape.len();
    let mut reduced = vec![false; rank];
    if dims.is_empty() {
        // As in PyTorch, an empty dim list reduces over every dimension.
        reduced.iter_mut().for_each(|r| *r = true);
    }
    for &d in dims {
        let r = resolve_dim(op, d, rank)?;
        if std::mem::replace(&mut reduced[r], true) {
            return Err(Error::BadShape { op, msg: format!("dimension {d} appears twice in {dims:?}"), shape: shape.to_vec() });
        }
    }
    let kept: Vec<usize> = (0..rank).filter(|&d| !reduced[d]).collect();
    let gone: Vec<usize> = (0..rank).filter(|&d| reduced[d]).collect();
    let out_shape = if keepdim {
        (0..rank).map(|d| if reduced[d] { 1 } else { shape[d] }).collect()
    } else {
        kept.iter().map(|&d| shape[d]).collect()
    };
    Ok(Plan { row: gone.iter().map(|&d| shape[d]).product(), perm: kept.into_iter().chain(gone).collect(), out_shape })
}

fn sum_f64(r: &[f32]) -> f64 {
    r.iter().map(|&v| v as f64).sum()
}

impl Tensor {
    /// Reduces the rows of the permuted view with `f` (given each row as f32), in f32 output.
    fn reduce_float_rows(&self, op: &'static str, dims: &[isize], keepdim: bool, f: impl Fn(&[f32]) -> f32 + Sync) -> Result<Tensor> {
        self.float_only(op)?;
        let p = plan(op, self.shape(), dims, keepdim)?;
        if let Device::Cuda(_) = self.device() {
            return self.reduce_rows_cuda(op, &p, 0.0);
        }
        let rows: usize = p.out_shape.iter().product();
        let out = if p.row == 0 {
            vec![f(&[]); rows]
        } else {
            self.permute(&p.perm)?.with_cpu_f32(|x| {
                Ok(if x.len() >= PAR_MIN && rows > 1 {
                    x.par_chunks(p.row).map(&f).collect()
                } else {
                    x.chunks(p.row).map(&f).collect()
                })
            })?
        };
        Tensor::from_f32_vec(out, &p.out_shape, self.dtype())
    }

    /// The CUDA arm of sum / mean / var: the permuted view as contiguous rows (copied when the
    /// reduced dims are not already last and dense), then one row reduction kernel.
    /// `correction` is var's divisor offset (N - correction).
    fn reduce_rows_cuda(&self, op: &'static str, p: &Plan, correction: f32) -> Result<Tensor> {
        let rows: usize = p.out_shape.iter().product();
        if p.row == 0 {
            let v = if op == "sum" { 0.0 } else { f64::NAN };
            return Tensor::full(v, &p.out_shape, self.dtype(), self.device());
        }
        let code = match op {
            "sum" => kernels::reduce::OP_SUM,
            "mean" => kernels::reduce::OP_MEAN,
            "var" => kernels::reduce::OP_VAR,
            _ => return Err(crate::cuda::not_yet(op)),
        };
        let x = self.permute(&p.perm)?.contiguous()?;
        crate::cuda::norm::sum_rows(&x, rows, p.row, code, correction)?.reshape(&p.out_shape)
    }

    /// Sum over `dims` (an empty list sums everything, as in PyTorch).
    pub fn sum(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.reduce_float_rows("sum", dims, keepdim, |r| sum_f64(r) as f32)
    }

    /// Mean over `dims` (an empty list averages everything); the mean of nothing is NaN.
    pub fn mean(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.reduce_float_rows("mean", dims, keepdim, |r| (sum_f64(r) / r.len() as f64) as f32)
    }

    /// Variance over `dims`, dividing by N - 1 when `unbiased` (N = 1 then gives NaN, as PyTorch).
    pub fn var(&self, dims: &[isize], keepdim: bool, unbiased: bool) -> Result<Tensor> {
        if let Device::Cuda(_) = self.device() {
            self.float_only("var")?;
            let p = plan("var", self.shape(), dims, keepdim)?;
            return self.reduce_rows_cuda("var", &p, if unbiased { 1.0 } else { 0.0 });
        }
        self.reduce_float_rows("var", dims, keepdim, |r| {
            let n = r.len() as f64;
            let mean = sum_f64(r) / n;
            let ss: f64 = r.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum();
            (ss / (n - if unbiased { 1.0 } else { 0.0 })) as f32
        })
    }

    /// Sum of every element, as a 0-dimensional tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.sum(&[], false)
    }

    /// Mean of every element, as a 0-dimensional tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        self.mean(&[], false)
    }

    /// Largest value along `dim` (NaN wins, as in PyTorch).
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        Ok(self.extreme("max", dim, keepdim, true)?.0)
    }

    /// Smallest value along `dim` (NaN wins, as in PyTorch).
    pub fn min(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        Ok(self.extreme("min", dim, keepdim, false)?.0)
    }

    /// Index (i64) of the largest value along `dim`; the first one on ties, the first NaN if any.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        Ok(self.extreme("argmax", dim, keepdim, true)?.1)
    }

    /// Values and i64 indices of the max (or min) along `dim`.
    fn extreme(&self, op: &'static str, dim: isize, keepdim: bool, want_max: bool) -> Result<(Tensor, Tensor)> {
        let d = resolve_dim(op, dim, self.rank())?;
        let p = plan(op, self.shape(), &[d as isize], keepdim)?;
        if p.row == 0 {
            return Err(Error::BadShape { op, msg: format!("cannot reduce over dimension {d} of size 0"), shape: self.shape().to_vec() });
        }
        let x = self.permute(&p.perm)?;
        if let Device::Cuda(_) = self.device() {
            let rows: usize = p.out_shape.iter().product();
            let (v, i) = crate::cuda::norm::extreme_rows(&x.contiguous()?, rows, p.row, want_max)?;
            return Ok((v.reshape(&p.out_shape)?, i.reshape(&p.out_shape)?));
        }
        match self.dtype() {
            DType::F32 => extreme_rows::<f32>(&x, p.row, want_max, &p.out_shape),
            DType::BF16 => extreme_rows::<half::bf16>(&x, p.row, want_max, &p.out_shape),
            DType::F16 => extreme_rows::<half::f16>(&x, p.row, want_max, &p.out_shape),
            DType::I64 => extreme_rows::<i64>(&x, p.row, want_max, &p.out_shape),
            DType::U8 => extreme_rows::<u8>(&x, p.row, want_max, &p.out_shape),
        }
    }
}

/// Max/min of each row of `x` (read in row-major order) with the index of the first winner.
fn extreme_rows<T: WithDType>(x: &Tensor, row: usize, want_max: bool, out_shape: &[usize]) -> Result<(Tensor, Tensor)> {
    let data = x.to_vec::<T>()?;
    let best = |r: &[T]| -> (T, i64) {
        let mut bi = 0;
        for (i, v) in r.iter().enumerate() {
            #[allow(clippy::eq_op)]
            let is_nan = v != v;
            if is_nan {
                return (*v, i as i64);
            }
            if (want_max && *v > r[bi]) || (!want_max && *v < r[bi]) {
                bi = i;
            }
        }
        (r[bi], bi as i64)
    };
    let pairs: Vec<(T, i64)> = if data.len() >= PAR_MIN { data.par_chunks(row).map(best).collect() } else { data.chunks(row).map(best).collect() };
    let (vals, idx): (Vec<T>, Vec<i64>) = pairs.into_iter().unzip();
    Ok((Tensor::from_vec(vals, out_shape, Device::Cpu)?, Tensor::from_vec(idx, out_shape, Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn sum_mean_var_over_dims() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        assert_eq!(x.sum(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![6.0, 15.0]);
        assert_eq!(x.sum(&[0], true).unwrap().shape(), &[1, 3]);
        assert_eq!(x.sum(&[-2], true).unwrap().to_vec::<f32>().unwrap(), vec![5.0, 7.0, 9.0]);
        assert_eq!(x.sum_all().unwrap().shape(), &[] as &[usize]);
        assert_eq!(x.mean_all().unwrap().to_scalar_f32().unwrap(), 3.5);
        assert_eq!(x.var(&[1], false, true).unwrap().to_vec::<f32>().unwrap(), vec![1.0, 1.0]);
        assert!((x.var(&[1], false, false).unwrap().to_vec::<f32>().unwrap()[0] - 2.0 / 3.0).abs() < 1e-7);
        // Transposed view: sums of the columns of the original.
        assert_eq!(x.t().unwrap().sum(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![5.0, 7.0, 9.0]);
        assert!(x.sum(&[0, -2], false).is_err());
        assert!(x.sum(&[2], false).is_err());
    }

    #[test]
    fn max_min_argmax_any_dtype() {
        let x = t(&[1.0, 5.0, 5.0, -4.0, 2.0, 0.0], &[2, 3]);
        assert_eq!(x.max(1, false).unwrap().to_vec::<f32>().unwrap(), vec![5.0, 2.0]);
        assert_eq!(x.min(0, false).unwrap().to_vec::<f32>().unwrap(), vec![-4.0, 2.0, 0.0]);
        assert_eq!(x.argmax(1, true).unwrap().to_vec::<i64>().unwrap(), vec![1, 1]);
        let i = x.to_dtype(DType::I64).unwrap();
        assert_eq!(i.argmax(-1, false).unwrap().to_vec::<i64>().unwrap(), vec![1, 1]);
        assert_eq!(i.max(0, false).unwrap().to_vec::<i64>().unwrap(), vec![1, 5, 5]);
        let n = t(&[1.0, f32::NAN, 3.0], &[3]);
        assert!(n.max(0, false).unwrap().to_scalar_f32().unwrap().is_nan());
        assert_eq!(n.argmax(0, false).unwrap().to_vec::<i64>().unwrap(), vec![1]);
        assert!(Tensor::zeros(&[0, 2], DType::F32, Device::Cpu).unwrap().max(0, false).is_err());
    }

    #[test]
    fn empty_reductions() {
        let x = Tensor::zeros(&[0, 2], DType::F32, Device::Cpu).unwrap();
        assert_eq!(x.sum(&[0], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
        assert!(x.mean(&[0], false).unwrap().to_vec::<f32>().unwrap()[0].is_nan());
    }
}
