//! Element-wise ops: unary maps, broadcasting binary arithmetic, where / masked_fill, dtype casts,
//! dropout.

use engine::{DType, Error, Result, Tensor};
use kernels::elementwise::{CmpOp, UnaryOp};

use super::{sum_to, want};
use crate::Var;

fn unary_name(op: UnaryOp) -> &'static str {
    match op {
        UnaryOp::Neg => "neg",
        UnaryOp::Abs => "abs",
        UnaryOp::Sqr => "sqr",
        UnaryOp::Sqrt => "sqrt",
        UnaryOp::Rsqrt => "rsqrt",
        UnaryOp::Recip => "recip",
        UnaryOp::Exp => "exp",
        UnaryOp::Log => "log",
        UnaryOp::Sin => "sin",
        UnaryOp::Cos => "cos",
        UnaryOp::Tanh => "tanh",
        UnaryOp::Sigmoid => "sigmoid",
        UnaryOp::Silu => "silu",
        UnaryOp::Relu => "relu",
        UnaryOp::Gelu => "gelu",
        UnaryOp::GeluTanh => "gelu_tanh",
        UnaryOp::Affine { .. } => "affine",
        UnaryOp::Powf(_) => "powf",
        UnaryOp::Clamp { .. } => "clamp",
        UnaryOp::LeakyRelu(_) => "leaky_relu",
    }
}

impl Var {
    /// Any element-wise unary map; its gradient is grad * op'(x).
    pub fn unary(&self, op: UnaryOp) -> Result<Var> {
        let y = self.value().unary(op)?;
        let name = unary_name(op);
        Ok(match op {
            // Linear maps need nothing saved.
            UnaryOp::Affine { mul, .. } => Var::from_op(name, y, &[self], move |g, _| Ok(vec![Some(g.mul_scalar(mul)?)])),
            UnaryOp::Neg => Var::from_op(name, y, &[self], |g, _| Ok(vec![Some(g.neg()?)])),
            _ => {
                let x = self.value().clone();
                Var::from_op(name, y, &[self], move |g, _| Ok(vec![Some(x.unary_backward(g, op)?)]))
            }
        })
    }

    pub fn neg(&self) -> Result<Var> { self.unary(UnaryOp::Neg) }
    pub fn abs(&self) -> Result<Var> { self.unary(UnaryOp::Abs) }
    pub fn sqr(&self) -> Result<Var> { self.unary(UnaryOp::Sqr) }
    pub fn sqrt(&self) -> Result<Var> { self.unary(UnaryOp::Sqrt) }
    pub fn rsqrt(&self) -> Result<Var> { self.unary(UnaryOp::Rsqrt) }
    pub fn recip(&self) -> Result<Var> { self.unary(UnaryOp::Recip) }
    pub fn exp(&self) -> Result<Var> { self.unary(UnaryOp::Exp) }
    pub fn log(&self) -> Result<Var> { self.unary(UnaryOp::Log) }
    pub fn sin(&self) -> Result<Var> { self.unary(UnaryOp::Sin) }
    pub fn cos(&self) -> Result<Var> { self.unary(UnaryOp::Cos) }
    pub fn tanh(&self) -> Result<Var> { self.unary(UnaryOp::Tanh) }
    pub fn sigmoid(&self) -> Result<Var> { self.unary(UnaryOp::Sigmoid) }
    pub fn silu(&self) -> Result<Var> { self.unary(UnaryOp::Silu) }
    pub fn relu(&self) -> Result<Var> { self.unary(UnaryOp::Relu) }
    pub fn gelu(&self) -> Result<Var> { self.unary(UnaryOp::Gelu) }
    pub fn gelu_tanh(&self) -> Result<Var> { self.unary(UnaryOp::GeluTanh) }
    pub fn leaky_relu(&self, slope: f32) -> Result<Var> { self.unary(UnaryOp::LeakyRelu(slope)) }
    pub fn affine(&self, mul: f32, add: f32) -> Result<Var> { self.unary(UnaryOp::Affine { mul, add }) }
    pub fn mul_scalar(&self, v: f32) -> Result<Var> { self.affine(v, 0.0) }
    pub fn add_scalar(&self, v: f32) -> Result<Var> { self.affine(1.0, v) }
    pub fn powf(&self, p: f32) -> Result<Var> { self.unary(UnaryOp::Powf(p)) }
    pub fn clamp(&self, min: f32, max: f32) -> Result<Var> { self.unary(UnaryOp::Clamp { min, max }) }

    /// self + rhs with broadcasting.
    pub fn add(&self, rhs: &Var) -> Result<Var> {
        let y = self.value().add(rhs.value())?;
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        Ok(Var::from_op("add", y, &[self, rhs], move |g, n| Ok(vec![want(n, 0, || sum_to(g, &sa))?, want(n, 1, || sum_to(g, &sb))?])))
    }

    pub fn sub(&self, rhs: &Var) -> Result<Var> {
        let y = self.value().sub(rhs.value())?;
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        Ok(Var::from_op("sub", y, &[self, rhs], move |g, n| Ok(vec![want(n, 0, || sum_to(g, &sa))?, want(n, 1, || sum_to(&g.neg()?, &sb))?])))
    }

    pub fn mul(&self, rhs: &Var) -> Result<Var> {
        let y = self.value().mul(rhs.value())?;
        let (a, b) = (self.value().clone(), rhs.value().clone());
        Ok(Var::from_op("mul", y, &[self, rhs], move |g, n| Ok(vec![want(n, 0, || sum_to(&g.mul(&b)?, a.shape()))?, want(n, 1, || sum_to(&g.mul(&a)?, b.shape()))?])))
    }

    pub fn div(&self, rhs: &Var) -> Result<Var> {
        let y = self.value().div(rhs.value())?;
        let (a, b) = (self.value().clone(), rhs.value().clone());
        Ok(Var::from_op("div", y, &[self, rhs], move |g, n| {
            Ok(vec![
                want(n, 0, || sum_to(&g.div(&b)?, a.shape()))?,
                // d(a / b)/db = -a / b^2
                want(n, 1, || sum_to(&g.mul(&a)?.div(&b.sqr()?)?.neg()?, b.shape()))?,
            ])
        }))
    }

    /// a^b element-wise (a > 0 where b's gradient is needed).
    pub fn pow(&self, rhs: &Var) -> Result<Var> {
        let y = self.value().pow(rhs.value())?;
        let (a, b, out) = (self.value().clone(), rhs.value().clone(), y.clone());
        Ok(Var::from_op("pow", y, &[self, rhs], move |g, n| {
            Ok(vec![
                want(n, 0, || sum_to(&g.mul(&b)?.mul(&a.pow(&b.add_scalar(-1.0)?)?)?, a.shape()))?,
                want(n, 1, || sum_to(&g.mul(&out)?.mul(&a.log()?)?, b.shape()))?,
            ])
        }))
    }

    /// Element-wise maximum; on ties each side gets half the gradient (as PyTorch).
    pub fn maximum(&self, rhs: &Var) -> Result<Var> {
        self.select_extreme("maximum", rhs, CmpOp::Gt)
    }

    /// Element-wise minimum; on ties each side gets half the gradient (as PyTorch).
    pub fn minimum(&self, rhs: &Var) -> Result<Var> {
        self.select_extreme("minimum", rhs, CmpOp::Lt)
    }

    fn select_extreme(&self, name: &'static str, rhs: &Var, wins: CmpOp) -> Result<Var> {
        let y = if wins == CmpOp::Gt { self.value().maximum(rhs.value())? } else { self.value().minimum(rhs.value())? };
        let (a, b) = (self.value().clone(), rhs.value().clone());
        Ok(Var::from_op(name, y, &[self, rhs], move |g, n| {
            let dt = g.dtype();
            // Share of the gradient that goes to `a`: 1 where it wins, 1/2 on ties.
            let wa = a.cmp(&b, wins)?.to_dtype(dt)?.add(&a.cmp(&b, CmpOp::Eq)?.to_dtype(dt)?.mul_scalar(0.5)?)?;
            Ok(vec![want(n, 0, || sum_to(&g.mul(&wa)?, a.shape()))?, want(n, 1, || sum_to(&g.mul(&wa.affine(-1.0, 1.0)?)?, b.shape()))?])
        }))
    }

    /// mask ? on_true : on_false (u8 mask, all three broadcast).
    pub fn where_cond(mask: &Tensor, on_true: &Var, on_false: &Var) -> Result<Var> {
        let y = Tensor::where_cond(mask, on_true.value(), on_false.value())?;
        let m = mask.clone();
        let (st, sf) = (on_true.shape().to_vec(), on_false.shape().to_vec());
        Ok(Var::from_op("where_cond", y, &[on_true, on_false], move |g, n| {
            let zero = Tensor::zeros(&[], g.dtype(), g.device())?;
            Ok(vec![want(n, 0, || sum_to(&Tensor::where_cond(&m, g, &zero)?, &st))?, want(n, 1, || sum_to(&Tensor::where_cond(&m, &zero, g)?, &sf))?])
        }))
    }

    /// `value` where the u8 mask (broadcast) is set; no gradient flows to the filled positions.
    pub fn masked_fill(&self, mask: &Tensor, value: f32) -> Result<Var> {
        let y = self.value().masked_fill(mask, value)?;
        let m = mask.clone();
        Ok(Var::from_op("masked_fill", y, &[self], move |g, _| Ok(vec![Some(g.masked_fill(&m, 0.0)?)])))
    }

    /// A cast; the gradient is cast back to this dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Var> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if !dtype.is_float() && self.requires_grad() {
            return Err(Error::msg(format!("to_dtype: casting a value that requires a gradient to {dtype} would cut the gradient (detach it first)")));
        }
        let y = self.value().to_dtype(dtype)?;
        let from = self.dtype();
        Ok(Var::from_op("to_dtype", y, &[self], move |g, _| Ok(vec![Some(g.to_dtype(from)?)])))
    }

    /// Inverted dropout: zeroes each element with probability `p` (a Philox stream keyed by
    /// `seed`, so a recomputation drops the same elements) and scales the rest by 1 / (1 - p).
    /// Identity when `train` is false or p is 0.
    pub fn dropout(&self, p: f32, seed: u64, train: bool) -> Result<Var> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::msg(format!("dropout: probability {p} is not in [0, 1)")));
        }
        if !train || p == 0.0 {
            return Ok(self.clone());
        }
        let u = Tensor::rand(self.shape(), self.dtype(), self.device(), seed)?;
        let keep = u.cmp(&Tensor::full(p as f64, &[], self.dtype(), self.device())?, CmpOp::Ge)?;
        let scale = keep.to_dtype(self.dtype())?.mul_scalar(1.0 / (1.0 - p))?;
        self.mul(&Var::constant(scale))
    }
}
