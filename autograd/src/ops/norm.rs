//! Softmax, normalisations and gated activations.

use engine::{Error, Result, Tensor};
use kernels::elementwise::{CmpOp, UnaryOp};

use super::{sum_to, want};
use crate::Var;

/// Gradients for [x, weight?, bias?] from a norm backward's (dx, dweight, dbias).
fn norm_grads(n: &[bool], has_w: bool, dx: Tensor, dw: Option<Tensor>, db: Option<Tensor>) -> Vec<Option<Tensor>> {
    let mut out = vec![n[0].then_some(dx)];
    if has_w {
        out.push(if n[1] { dw } else { None });
    }
    if n.len() > out.len() {
        let i = out.len();
        out.push(if n[i] { db } else { None });
    }
    out
}

impl Var {
    /// Softmax along `dim`; the backward uses the saved output: dx = y * (g - sum(g * y)).
    pub fn softmax(&self, dim: isize) -> Result<Var> {
        let y = self.value().softmax(dim)?;
        let out = y.clone();
        Ok(Var::from_op("softmax", y, &[self], move |g, _| Ok(vec![Some(out.mul(&g.sub(&g.mul(&out)?.sum(&[dim], true)?)?)?)])))
    }

    /// Log-softmax along `dim`: dx = g - exp(y) * sum(g).
    pub fn log_softmax(&self, dim: isize) -> Result<Var> {
        let y = self.value().log_softmax(dim)?;
        let out = y.clone();
        Ok(Var::from_op("log_softmax", y, &[self], move |g, _| Ok(vec![Some(g.sub(&out.exp()?.mul(&g.sum(&[dim], true)?)?)?)])))
    }

    /// Layer norm over the last dimension with optional weight and bias.
    pub fn layer_norm(&self, weight: Option<&Var>, bias: Option<&Var>, eps: f32) -> Result<Var> {
        let (wt, bt) = (weight.map(|w| w.value().clone()), bias.map(|b| b.value().clone()));
        let y = self.value().layer_norm(wt.as_ref(), bt.as_ref(), eps)?;
        let x = self.value().clone();
        let mut parents = vec![self];
        parents.extend(weight);
        parents.extend(bias);
        Ok(Var::from_op("layer_norm", y, &parents, move |g, n| {
            let (dx, dw, db) = x.layer_norm_backward(g, wt.as_ref(), bt.as_ref(), eps, n[1..].iter().any(|&b| b))?;
            Ok(norm_grads(n, wt.is_some(), dx, dw, db))
        }))
    }

    /// Group norm of [N, C, *] (optionally fused with SiLU). The forward's statistics (N G 2
    /// floats) are kept for the backward, which then does not recompute them from x.
    pub fn group_norm(&self, groups: usize, weight: Option<&Var>, bias: Option<&Var>, eps: f32, silu: bool) -> Result<Var> {
        let (wt, bt) = (weight.map(|w| w.value().clone()), bias.map(|b| b.value().clone()));
        let mut parents = vec![self];
        parents.extend(weight);
        parents.extend(bias);
        // Statistics only where a backward will run (not under no_grad, not for constants).
        let (y, stats) = if crate::is_grad_enabled() && parents.iter().any(|p| p.requires_grad()) {
            let (y, s) = self.value().group_norm_stats(groups, wt.as_ref(), bt.as_ref(), eps, silu)?;
            (y, Some(s))
        } else {
            (self.value().group_norm(groups, wt.as_ref(), bt.as_ref(), eps, silu)?, None)
        };
        let x = self.value().clone();
        Ok(Var::from_op(if silu { "group_norm_silu" } else { "group_norm" }, y, &parents, move |g, n| {
            let (dx, dw, db) = x.group_norm_backward(g, groups, wt.as_ref(), bt.as_ref(), eps, silu, stats.as_ref(), n[1..].iter().any(|&b| b))?;
            Ok(norm_grads(n, wt.is_some(), dx, dw, db))
        }))
    }

    /// GEGLU: the last dim splits into [h, gate]; h * gelu(gate).
    pub fn geglu(&self) -> Result<Var> {
        let y = self.value().geglu()?;
        let x = self.value().clone();
        Ok(Var::from_op("geglu", y, &[self], move |g, _| {
            let half = x.shape()[x.rank() - 1] / 2;
            let (h, gate) = (x.narrow(-1, 0, half)?, x.narrow(-1, half, half)?);
            let dh = g.mul(&gate.gelu()?)?;
            let dgate = gate.contiguous()?.unary_backward(&g.mul(&h)?, UnaryOp::Gelu)?;
            Ok(vec![Some(Tensor::cat(&[&dh, &dgate], -1)?)])
        }))
    }

    /// PReLU with one weight or one per channel (dim 1).
    pub fn prelu(&self, weight: &Var) -> Result<Var> {
        let y = self.value().prelu(weight.value())?;
        let (x, w) = (self.value().clone(), weight.value().clone());
        Ok(Var::from_op("prelu", y, &[self, weight], move |g, n| {
            // The weight broadcast against x: [C] -> [1, C, 1, ...] (or a single value).
            let mut wshape = vec![1usize; x.rank()];
            if w.elem_count() != 1 {
                if x.rank() < 2 {
                    return Err(Error::msg("prelu: per-channel weight on an input without channels"));
                }
                wshape[1] = w.elem_count();
            }
            let wb = w.reshape(&wshape)?;
            let pos = x.cmp(&Tensor::zeros(&[], x.dtype(), x.device())?, CmpOp::Gt)?;
            Ok(vec![
                want(n, 0, || Tensor::where_cond(&pos, g, &g.mul(&wb)?))?,
                want(n, 1, || {
                    let contrib = Tensor::where_cond(&pos, &Tensor::zeros(&[], g.dtype(), g.device())?, &g.mul(&x)?)?;
                    sum_to(&contrib, &wshape)?.reshape(w.shape())
                })?,
            ])
        }))
    }

    /// Inference batch norm (running statistics): no backward rule (training uses group norm);
    /// a gradient reaching it is an error.
    pub fn batch_norm(&self, mean: &Tensor, var: &Tensor, weight: Option<&Var>, bias: Option<&Var>, eps: f32) -> Result<Var> {
        let y = self.value().batch_norm(mean, var, weight.map(|w| w.value()), bias.map(|b| b.value()), eps)?;
        let mut parents = vec![self];
        parents.extend(weight);
        parents.extend(bias);
        Ok(Var::without_backward("batch_norm", y, &parents))
    }
}
