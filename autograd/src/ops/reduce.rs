//! Reductions: sum, mean, variance over dimensions; max / min along one.

use engine::{Error, Result, Tensor};
use kernels::elementwise::CmpOp;

use crate::Var;

/// The input shape with the reduced dims set to 1 (all of them for an empty list), and the number
/// of elements reduced into each output.
fn kept_shape(op: &'static str, shape: &[usize], dims: &[isize]) -> Result<(Vec<usize>, usize)> {
    let rank = shape.len();
    let mut kept = shape.to_vec();
    if dims.is_empty() {
        kept.iter_mut().for_each(|d| *d = 1);
    }
    for &d in dims {
        let r = if d < 0 { d + rank as isize } else { d };
        if r < 0 || r as usize >= rank {
            return Err(Error::DimOutOfRange { op, dim: d, rank });
        }
        kept[r as usize] = 1;
    }
    let n = shape.iter().product::<usize>() / kept.iter().product::<usize>().max(1);
    Ok((kept, n))
}

impl Var {
    /// Sum over `dims` (an empty list sums everything).
    pub fn sum(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        let y = self.value().sum(dims, keepdim)?;
        let (kept, _) = kept_shape("sum", self.shape(), dims)?;
        let shape = self.shape().to_vec();
        Ok(Var::from_op("sum", y, &[self], move |g, _| Ok(vec![Some(g.reshape(&kept)?.broadcast_to(&shape)?)])))
    }

    pub fn mean(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        let y = self.value().mean(dims, keepdim)?;
        let (kept, n) = kept_shape("mean", self.shape(), dims)?;
        let shape = self.shape().to_vec();
        Ok(Var::from_op("mean", y, &[self], move |g, _| Ok(vec![Some(g.reshape(&kept)?.mul_scalar(1.0 / n as f32)?.broadcast_to(&shape)?)])))
    }

    /// Variance over `dims`: d var / dx = 2 (x - mean) / (N - unbiased).
    pub fn var(&self, dims: &[isize], keepdim: bool, unbiased: bool) -> Result<Var> {
        let y = self.value().var(dims, keepdim, unbiased)?;
        let (kept, n) = kept_shape("var", self.shape(), dims)?;
        let x = self.value().clone();
        let dims = dims.to_vec();
        Ok(Var::from_op("var", y, &[self], move |g, _| {
            let centered = x.sub(&x.mean(&dims, true)?)?;
            let denom = n as f32 - if unbiased { 1.0 } else { 0.0 };
            Ok(vec![Some(centered.mul(&g.reshape(&kept)?)?.mul_scalar(2.0 / denom)?)])
        }))
    }

    pub fn sum_all(&self) -> Result<Var> {
        self.sum(&[], false)
    }

    pub fn mean_all(&self) -> Result<Var> {
        self.mean(&[], false)
    }

    /// Max along `dim`; the gradient goes to the (first) arg-max, as PyTorch's max(dim).
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Var> {
        let y = self.value().max(dim, keepdim)?;
        let idx = self.value().argmax(dim, true)?;
        self.record_pick("max", y, idx, dim)
    }

    /// Min along `dim`; the gradient goes to the (first) arg-min.
    pub fn min(&self, dim: isize, keepdim: bool) -> Result<Var> {
        let y = self.value().min(dim, keepdim)?;
        let idx = self.value().neg()?.argmax(dim, true)?;
        self.record_pick("min", y, idx, dim)
    }

    /// Records an op whose output (keepdim or not) is the input at i64 positions `idx` (kept dims)
    /// along `dim`.
    fn record_pick(&self, op: &'static str, y: Tensor, idx: Tensor, dim: isize) -> Result<Var> {
        let shape = self.shape().to_vec();
        let d = if dim < 0 { dim + shape.len() as isize } else { dim } as usize;
        Ok(Var::from_op(op, y, &[self], move |g, _| {
            // One-hot of idx along d: positions (arange along d) equal to idx.
            let mut ar_shape = vec![1usize; shape.len()];
            ar_shape[d] = shape[d];
            let positions = Tensor::arange(shape[d], idx.device())?.reshape(&ar_shape)?;
            let hit = positions.cmp(&idx, CmpOp::Eq)?;
            let gk = g.reshape(idx.shape())?.broadcast_to(&shape)?;
            Ok(vec![Some(Tensor::where_cond(&hit, &gk, &Tensor::zeros(&[], g.dtype(), g.device())?)?)])
        }))
    }
}
