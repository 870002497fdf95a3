//! The optimizer: AdamW (torch.optim.AdamW semantics), gradient-norm clipping
//! (torch.nn.utils.clip_grad_norm_ semantics) and learning-rate schedules. Parameters that are not
//! f32 (e.g. bf16) get an f32 master copy: AdamW updates the master and writes the rounded value
//! back into the parameter's storage.

use std::f64::consts::PI;

use engine::{DType, Error, Result, Tensor};

use crate::Var;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

struct ParamState {
    param: Var,
    /// f32 master copy when the parameter is not f32.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    config: AdamWConfig,
    states: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `params` (leaves that require a gradient; frozen ones are an error, so a
    /// misconfigured trainer fails loudly instead of silently not training).
    pub fn new(params: &[Var], config: AdamWConfig) -> Result<AdamW> {
        let mut states = Vec::with_capacity(params.len());
        for p in params {
            if !p.is_leaf() || !p.requires_grad() {
                return Err(Error::msg(format!("AdamW: {p:?} is not a leaf that requires a gradient")));
            }
            if !p.dtype().is_float() {
                return Err(Error::UnsupportedDType { op: "AdamW", dtype: p.dtype() });
            }
            let master = if p.dtype() == DType::F32 { None } else { Some(p.value().to_dtype(DType::F32)?.copy()?) };
            let zeros = || Tensor::zeros(p.shape(), DType::F32, p.device());
            states.push(ParamState { param: p.clone(), master, m: zeros()?, v: zeros()? });
        }
        Ok(AdamW { config, states, step: 0 })
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One update of every parameter that has a gradient (parameters without one are skipped, as
    /// torch does). The step count advances once per call.
    pub fn step(&mut self) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for s in &self.states {
            let Some(g) = s.param.grad() else { continue };
            match &s.master {
                None => s.param.value().adamw_step_(&g, &s.m, &s.v, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, self.step)?,
                Some(master) => {
                    master.adamw_step_(&g, &s.m, &s.v, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, self.step)?;
                    s.param.value().assign_(master)?;
                }
            }
        }
        Ok(())
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&self) {
        for s in &self.states {
            s.param.zero_grad();
        }
    }

    /// The f32 master copy of parameter `i` (the parameter itself when it is f32).
    pub fn master(&self, i: usize) -> Option<Tensor> {
        self.states.get(i).map(|s| s.master.clone().unwrap_or_else(|| s.param.value().clone()))
    }

    /// First and second moments of parameter `i` (for checkpoints).
    pub fn moments(&self, i: usize) -> Option<(Tensor, Tensor)> {
        self.states.get(i).map(|s| (s.m.clone(), s.v.clone()))
    }
}

/// torch.nn.utils.clip_grad_norm_ (L2): the total norm of all gradients (as if concatenated) is
/// returned, and when it exceeds `max_norm` every gradient is scaled by max_norm / (norm + 1e-6).
pub fn clip_grad_norm(params: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    let grads: Vec<(Var, Tensor)> = params.iter().filter_map(|p| p.grad().map(|g| (p.clone(), g))).collect();
    for (_, g) in &grads {
        sq += g.to_vec_f32()?.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    }
    let total = sq.sqrt();
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for (p, g) in grads {
            p.set_grad(Some(g.mul_scalar(coef as f32)?))?;
        }
    }
    Ok(total)
}

/// Learning-rate schedules as multipliers of the base rate (diffusers' get_*_schedule formulas).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// Linear ramp from 0 over `warmup` steps, then constant.
    Warmup { warmup: u64 },
    /// Linear warmup, then a half cosine from 1 down to 0 at `total` steps.
    Cosine { warmup: u64, total: u64 },
}

impl LrSchedule {
    /// The multiplier for an update after `step` updates were already taken (0 for the first).
    pub fn factor(self, step: u64) -> f64 {
        let ramp = |warmup: u64| if step < warmup { step as f64 / warmup.max(1) as f64 } else { 1.0 };
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Warmup { warmup } => ramp(warmup),
            LrSchedule::Cosine { warmup, total } => {
                if step < warmup {
                    return ramp(warmup);
                }
                let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (PI * progress.min(1.0)).cos())).max(0.0)
            }
        }
    }

    pub fn lr(self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Constant.factor(7), 1.0);
        assert_eq!(LrSchedule::Warmup { warmup: 4 }.factor(1), 0.25);
        assert_eq!(LrSchedule::Warmup { warmup: 4 }.factor(9), 1.0);
        let c = LrSchedule::Cosine { warmup: 2, total: 12 };
        assert_eq!(c.factor(0), 0.0);
        assert_eq!(c.factor(2), 1.0);
        assert!((c.factor(7) - 0.5).abs() < 1e-12);
        assert!(c.factor(12).abs() < 1e-12);
        assert!(c.factor(20).abs() < 1e-12);
    }
}
