//! Gradients of layer norm and group norm (+SiLU) for the autograd: the input gradient and, on
//! request, the weight and bias gradients, from the forward's input and parameters. Layer norm
//! recomputes its statistics; group norm takes the forward's (`Tensor::group_norm_stats`) when
//! given, which spares the backward a statistics pass over x. Math in kernels::norm_backward.
//! CUDA: engine/src/cuda/norm.rs.

use kernels::norm_backward as kb;

use crate::{DType, Device, Error, Result, Tensor};

/// (d input, d weight, d bias): the parameter gradients are present when asked for.
pub type NormGrads = (Tensor, Option<Tensor>, Option<Tensor>);

fn check(op: &'static str, x: &Tensor, dy: &Tensor, param_len: usize, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<()> {
    x.float_only(op)?;
    x.same_device(dy, op)?;
    if x.shape() != dy.shape() {
        return Err(Error::ShapeMismatch { op, lhs: x.shape().to_vec(), rhs: dy.shape().to_vec() });
    }
    for p in [weight, bias].into_iter().flatten() {
        if p.shape() != [param_len] {
            return Err(Error::ShapeMismatch { op, lhs: p.shape().to_vec(), rhs: vec![param_len] });
        }
    }
    Ok(())
}

/// The forward's saved group-norm statistics (`group_norm_stats`), checked: f32 [N, G, 2] on the
/// input's device. The errors name the argument and what was expected.
fn check_gn_stats(op: &'static str, x: &Tensor, stats: &Tensor, n: usize, groups: usize) -> Result<()> {
    if stats.device() != x.device() {
        return Err(Error::Msg(format!("{op}: stats (the forward's saved statistics) are on {}, the input on {}", stats.device(), x.device())));
    }
    if stats.dtype() != DType::F32 {
        return Err(Error::BadShape { op, msg: format!("stats (the forward's saved statistics) have dtype {}, expected f32", stats.dtype()), shape: stats.shape().to_vec() });
    }
    if stats.shape() != [n, groups, 2] {
        return Err(Error::BadShape { op, msg: format!("stats (the forward's saved statistics) have shape {:?}, expected [N, G, 2] = {:?}", stats.shape(), [n, groups, 2]), shape: stats.shape().to_vec() });
    }
    Ok(())
}

impl Tensor {
    /// Backward of `self.layer_norm(weight, bias, eps)` given the output gradient `dy`. The
    /// parameter gradients (in the parameters' dtype, else the input's) are computed when
    /// `param_grads` is set.
    pub fn layer_norm_backward(&self, dy: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, param_grads: bool) -> Result<NormGrads> {
        const OP: &str = "layer_norm_backward";
        let Some(&cols) = self.shape().last() else {
            return Err(Error::BadShape { op: OP, msg: "needs at least one dimension".into(), shape: vec![] });
        };
        check(OP, self, dy, cols, weight, bias)?;
        let pdt = |p: Option<&Tensor>| p.map_or(self.dtype(), |p| p.dtype());
        if let Device::Cuda(_) = self.device() {
            let dy = dy.to_dtype(self.dtype())?.contiguous()?;
            let (dx, grads) = crate::cuda::norm::layer_norm_backward(&self.contiguous()?, &dy, weight, eps, param_grads)?;
            return match grads {
                Some((dw, db)) => Ok((dx, Some(dw.to_dtype(pdt(weight))?), Some(db.to_dtype(pdt(bias))?))),
                None => Ok((dx, None, None)),
            };
        }
        let w = weight.map(|w| w.to_vec_f32()).transpose()?;
        let mut dx = vec![0f32; self.elem_count()];
        let (mut dw, mut db) = (vec![0f32; cols], vec![0f32; cols]);
        self.with_cpu_f32(|x| {
            dy.with_cpu_f32(|d| {
                kb::layer_norm_backward_rows(x, d, cols, w.as_deref(), eps, &mut dx, param_grads.then_some(&mut dw[..]), param_grads.then_some(&mut db[..]));
                Ok(())
            })
        })?;
        Ok((
            Tensor::from_f32_vec(dx, self.shape(), self.dtype())?,
            if param_grads { Some(Tensor::from_f32_vec(dw, &[cols], pdt(weight))?) } else { None },
            if param_grads { Some(Tensor::from_f32_vec(db, &[cols], pdt(bias))?) } else { None },
        ))
    }

    /// Backward of `self.group_norm(groups, weight, bias, eps, silu)` given the output gradient.
    /// `stats`: the forward's statistics (`group_norm_stats`, f32 [N, G, 2]), used instead of
    /// recomputing them from x; None recomputes them.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_backward(&self, dy: &Tensor, groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, silu: bool, stats: Option<&Tensor>, param_grads: bool) -> Result<NormGrads> {
        const OP: &str = "group_norm_backward";
        if self.rank() < 2 {
            return Err(Error::BadShape { op: OP, msg: "expected an [N, C, *] input".into(), shape: self.shape().to_vec() });
        }
        let (n, c) = (self.shape()[0], self.shape()[1]);
        if groups == 0 || c % groups != 0 {
            return Err(Error::BadShape { op: OP, msg: format!("{groups} groups do not divide {c} channels"), shape: self.shape().to_vec() });
        }
        check(OP, self, dy, c, weight, bias)?;
        if let Some(s) = stats {
            check_gn_stats(OP, self, s, n, groups)?;
        }
        let pdt = |p: Option<&Tensor>| p.map_or(self.dtype(), |p| p.dtype());
        if let Device::Cuda(_) = self.device() {
            let (dx, grads) = crate::cuda::norm::group_norm_backward(self, dy, groups, weight, bias, eps, silu, stats, param_grads)?;
            return match grads {
                Some((dw, db)) => Ok((dx, Some(dw.to_dtype(pdt(weight))?), Some(db.to_dtype(pdt(bias))?))),
                None => Ok((dx, None, None)),
            };
        }
        let hw: usize = self.shape()[2..].iter().product();
        let w = weight.map(|w| w.to_vec_f32()).transpose()?;
        let b = bias.map(|b| b.to_vec_f32()).transpose()?;
        let saved = stats.map(|s| s.to_vec_f32()).transpose()?;
        let mut dx = vec![0f32; self.elem_count()];
        let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
        self.with_cpu_f32(|x| {
            dy.with_cpu_f32(|d| {
                kb::group_norm_backward(x, d, n, c, hw, groups, w.as_deref(), b.as_deref(), eps, silu, saved.as_deref(), &mut dx, param_grads.then_some(&mut dw[..]), param_grads.then_some(&mut db[..]));
                Ok(())
            })
        })?;
        Ok((
            Tensor::from_f32_vec(dx, self.shape(), self.dtype())?,
            if param_grads { Some(Tensor::from_f32_vec(dw, &[c], pdt(weight))?) } else { None },
            if param_grads { Some(Tensor::from_f32_vec(db, &[c], pdt(bias))?) } else { None },
        ))
    }
}
