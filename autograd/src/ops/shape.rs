//! Views and data movement: reshape, permute, transpose, narrow, broadcast, (un)squeeze, cat,
//! stack, split, chunk, index_select, embedding, pad, gather.

use engine::{Error, PadMode, Result, Tensor};

use super::{sum_to, want};
use crate::Var;

/// The gradient of `narrow(d, start, len)`: `g` placed at start..start+len of a zero tensor of
/// the input's shape (a constant pad of the trailing dims from d).
fn unnarrow(g: &Tensor, shape: &[usize], d: usize, start: usize) -> Result<Tensor> {
    let len = g.shape()[d];
    let mut pads = vec![0usize; 2 * (shape.len() - 1 - d)];
    pads.extend([start, shape[d] - start - len]);
    g.pad(&pads, PadMode::Constant, 0.0)
}

fn resolve(op: &'static str, dim: isize, rank: usize) -> Result<usize> {
    let r = if dim < 0 { dim + rank as isize } else { dim };
    if r < 0 || r as usize >= rank {
        return Err(Error::DimOutOfRange { op, dim, rank });
    }
    Ok(r as usize)
}

impl Var {
    pub fn reshape(&self, shape: &[usize]) -> Result<Var> {
        let y = self.value().reshape(shape)?;
        let from = self.shape().to_vec();
        Ok(Var::from_op("reshape", y, &[self], move |g, _| Ok(vec![Some(g.reshape(&from)?)])))
    }

    pub fn flatten(&self, start: isize, end: isize) -> Result<Var> {
        let shape = self.value().flatten(start, end)?.shape().to_vec();
        self.reshape(&shape)
    }

    pub fn unsqueeze(&self, dim: isize) -> Result<Var> {
        let shape = self.value().unsqueeze(dim)?.shape().to_vec();
        self.reshape(&shape)
    }

    pub fn squeeze(&self, dim: isize) -> Result<Var> {
        let shape = self.value().squeeze(dim)?.shape().to_vec();
        self.reshape(&shape)
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Var> {
        let y = self.value().permute(dims)?;
        let mut inverse = vec![0usize; dims.len()];
        for (i, &d) in dims.iter().enumerate() {
            inverse[d] = i;
        }
        Ok(Var::from_op("permute", y, &[self], move |g, _| Ok(vec![Some(g.permute(&inverse)?)])))
    }

    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Var> {
        let (a, b) = (resolve("transpose", d0, self.rank())?, resolve("transpose", d1, self.rank())?);
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        dims.swap(a, b);
        self.permute(&dims)
    }

    /// Transpose of the last two dimensions.
    pub fn t(&self) -> Result<Var> {
        self.transpose(-2, -1)
    }

    /// A contiguous copy (identity for gradients).
    pub fn contiguous(&self) -> Result<Var> {
        let y = self.value().contiguous()?;
        Ok(Var::from_op("contiguous", y, &[self], |g, _| Ok(vec![Some(g.clone())])))
    }

    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Var> {
        let y = self.value().narrow(dim, start, len)?;
        let d = resolve("narrow", dim, self.rank())?;
        let shape = self.shape().to_vec();
        Ok(Var::from_op("narrow", y, &[self], move |g, _| Ok(vec![Some(unnarrow(g, &shape, d, start)?)])))
    }

    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Var> {
        let y = self.value().broadcast_to(shape)?;
        let from = self.shape().to_vec();
        Ok(Var::from_op("broadcast_to", y, &[self], move |g, _| Ok(vec![Some(sum_to(g, &from)?)])))
    }

    pub fn cat(vars: &[&Var], dim: isize) -> Result<Var> {
        let values: Vec<&Tensor> = vars.iter().map(|v| v.value()).collect();
        let y = Tensor::cat(&values, dim)?;
        let d = resolve("cat", dim, y.rank())?;
        let sizes: Vec<usize> = vars.iter().map(|v| v.shape()[d]).collect();
        Ok(Var::from_op("cat", y, vars, move |g, n| {
            let mut start = 0;
            let mut out = Vec::with_capacity(sizes.len());
            for (i, &len) in sizes.iter().enumerate() {
                out.push(want(n, i, || g.narrow(d as isize, start, len))?);
                start += len;
            }
            Ok(out)
        }))
    }

    pub fn stack(vars: &[&Var], dim: isize) -> Result<Var> {
        let Some(first) = vars.first() else { return Err(Error::msg("stack: no tensors given")) };
        let d = resolve("stack", dim, first.rank() + 1)? as isize;
        let parts = vars.iter().map(|v| v.unsqueeze(d)).collect::<Result<Vec<_>>>()?;
        Var::cat(&parts.iter().collect::<Vec<_>>(), d)
    }

    /// Consecutive pieces of `sizes` along `dim` (views; each piece's gradient is padded back).
    pub fn split(&self, sizes: &[usize], dim: isize) -> Result<Vec<Var>> {
        let d = resolve("split", dim, self.rank())?;
        if sizes.iter().sum::<usize>() != self.shape()[d] {
            return Err(Error::BadShape { op: "split", msg: format!("sizes {sizes:?} do not add up to the size of dimension {d}"), shape: self.shape().to_vec() });
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let v = self.narrow(d as isize, start, len);
                start += len;
                v
            })
            .collect()
    }

    /// torch.chunk: pieces of ceil(size / n) along `dim`.
    pub fn chunk(&self, n: usize, dim: isize) -> Result<Vec<Var>> {
        let d = resolve("chunk", dim, self.rank())?;
        let sizes: Vec<usize> = self.value().chunk(n, dim)?.iter().map(|t| t.shape()[d]).collect();
        self.split(&sizes, d as isize)
    }

    /// Slices of `dim` at the 1-D i64 positions `idx`; repeated positions sum their gradients.
    pub fn index_select(&self, dim: isize, idx: &Tensor) -> Result<Var> {
        let y = self.value().index_select(dim, idx)?;
        let (shape, ids) = (self.shape().to_vec(), idx.reshape(&[idx.elem_count()])?);
        Ok(Var::from_op("index_select", y, &[self], move |g, _| Ok(vec![Some(Tensor::index_add_zeros(&shape, dim, &ids, g)?)])))
    }

    /// Rows of this [V, D] table at the i64 `ids` (any shape).
    pub fn embedding(&self, ids: &Tensor) -> Result<Var> {
        let y = self.value().embedding(ids)?;
        let shape = self.shape().to_vec();
        let flat = ids.reshape(&[ids.elem_count()])?;
        Ok(Var::from_op("embedding", y, &[self], move |g, _| {
            let rows = g.reshape(&[flat.elem_count(), shape[1]])?;
            Ok(vec![Some(Tensor::index_add_zeros(&shape, 0, &flat, &rows)?)])
        }))
    }

    /// Padding in torch F.pad order. Only constant padding has a backward rule; reflect and
    /// replicate padding error if a gradient reaches them.
    pub fn pad(&self, pads: &[usize], mode: PadMode, value: f32) -> Result<Var> {
        let y = self.value().pad(pads, mode, value)?;
        if mode != PadMode::Constant {
            return Ok(Var::without_backward("pad (reflect / replicate)", y, &[self]));
        }
        let shape = self.shape().to_vec();
        let pads = pads.to_vec();
        Ok(Var::from_op("pad", y, &[self], move |g, _| {
            let mut out = g.clone();
            for (k, pair) in pads.chunks(2).enumerate() {
                let d = shape.len() - 1 - k;
                out = out.narrow(d as isize, pair[0], shape[d])?;
            }
            Ok(vec![Some(out)])
        }))
    }

    /// torch.gather along `dim`: no backward rule yet (scatter-add by arbitrary index tensors);
    /// a gradient reaching it is an error.
    pub fn gather(&self, dim: isize, idx: &Tensor) -> Result<Var> {
        let y = self.value().gather(dim, idx)?;
        Ok(Var::without_backward("gather", y, &[self]))
    }
}
