//! Matrix products, convolution and attention.

use engine::{Conv2dParams, DType, Result, Tensor};

use super::{sum_to, want};
use crate::Var;

impl Var {
    /// PyTorch `matmul` (1-D operands as row / column vectors, broadcast batch dims).
    pub fn matmul(&self, rhs: &Var) -> Result<Var> {
        if self.rank() == 1 {
            let r = self.unsqueeze(0)?.matmul(rhs)?;
            return r.squeeze(if rhs.rank() == 1 { 0 } else { -2 });
        }
        if rhs.rank() == 1 {
            return self.matmul(&rhs.unsqueeze(1)?)?.squeeze(-1);
        }
        let y = self.value().matmul(rhs.value())?;
        let (a, b) = (self.value().clone(), rhs.value().clone());
        Ok(Var::from_op("matmul", y, &[self, rhs], move |g, n| {
            Ok(vec![want(n, 0, || sum_to(&g.matmul(&b.t()?)?, a.shape()))?, want(n, 1, || sum_to(&a.t()?.matmul(g)?, b.shape()))?])
        }))
    }

    /// x W^T + b for x [..., in], weight [out, in], bias [out].
    pub fn linear(&self, weight: &Var, bias: Option<&Var>) -> Result<Var> {
        let y = self.value().linear(weight.value(), bias.map(|b| b.value()))?;
        let (x, w) = (self.value().clone(), weight.value().clone());
        let mut parents = vec![self, weight];
        parents.extend(bias);
        Ok(Var::from_op("linear", y, &parents, move |g, n| {
            let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
            let rows = g.elem_count() / out_f.max(1);
            let g2 = g.reshape(&[rows, out_f])?;
            let mut grads = vec![
                want(n, 0, || g.matmul(&w)?.reshape(x.shape()))?,
                want(n, 1, || g2.t()?.matmul(&x.reshape(&[rows, in_f])?))?,
            ];
            if n.len() == 3 {
                grads.push(want(n, 2, || g2.sum(&[0], false))?);
            }
            Ok(grads)
        }))
    }

    /// 2-D convolution (NCHW input, [O, C / groups, kH, kW] weight, optional [O] bias).
    pub fn conv2d(&self, weight: &Var, bias: Option<&Var>, p: Conv2dParams) -> Result<Var> {
        let y = self.value().conv2d(weight.value(), bias.map(|b| b.value()), p)?;
        let (x, w) = (self.value().clone(), weight.value().clone());
        let mut parents = vec![self, weight];
        parents.extend(bias);
        Ok(Var::from_op("conv2d", y, &parents, move |g, n| {
            let xs: [usize; 4] = x.shape().try_into().expect("conv2d checked the rank");
            let ws: [usize; 4] = w.shape().try_into().expect("conv2d checked the rank");
            let mut grads = vec![want(n, 0, || Tensor::conv2d_backward_input(g, &w, xs, p))?, want(n, 1, || Tensor::conv2d_backward_weight(&x, g, ws, p))?];
            if n.len() == 3 {
                grads.push(want(n, 2, || g.sum(&[0, 2, 3], false))?);
            }
            Ok(grads)
        }))
    }

    /// softmax(q k^T * scale + mask) v over [..., L, D] operands (leading dims broadcast); `mask`
    /// is additive or u8 (1 = attend) and receives no gradient. The backward recomputes the
    /// attention probabilities from q and k (reference form: two matmuls and a softmax backward).
    pub fn scaled_dot_product_attention(q: &Var, k: &Var, v: &Var, mask: Option<&Tensor>, scale: Option<f32>) -> Result<Var> {
        let y = Tensor::scaled_dot_product_attention(q.value(), k.value(), v.value(), mask, scale)?;
        let (qt, kt, vt) = (q.value().clone(), k.value().clone(), v.value().clone());
        let mask = mask.cloned();
        let scale = scale.unwrap_or(1.0 / (q.shape()[q.rank() - 1] as f32).sqrt());
        Ok(Var::from_op("scaled_dot_product_attention", y, &[q, k, v], move |g, n| {
            let mut s = qt.matmul(&kt.t()?)?.mul_scalar(scale)?;
            if let Some(m) = &mask {
                s = match m.dtype() {
                    DType::U8 => {
                        let blocked = m.cmp(&Tensor::zeros(&[], DType::U8, m.device())?, kernels::elementwise::CmpOp::Eq)?;
                        s.masked_fill(&blocked.broadcast_to(s.shape())?, f32::NEG_INFINITY)?
                    }
                    _ => s.add(&m.to_dtype(s.dtype())?)?,
                };
            }
            let p = s.softmax(-1)?;
            let dp = g.matmul(&vt.t()?)?;
            // Softmax backward: ds = p * (dp - sum(dp * p)).
            let ds = p.mul(&dp.sub(&dp.mul(&p)?.sum(&[-1], true)?)?)?;
            Ok(vec![
                want(n, 0, || sum_to(&ds.matmul(&kt)?.mul_scalar(scale)?, qt.shape()))?,
                want(n, 1, || sum_to(&ds.t()?.matmul(&qt)?.mul_scalar(scale)?, kt.shape()))?,
                want(n, 2, || sum_to(&p.t()?.matmul(g)?, vt.shape()))?,
            ])
        }))
    }
}
