//! Finite-difference gradient check on the CPU in f32: the gradient the autograd computes for
//! L = sum(w * f(inputs)), w a fixed pseudo-random projection (so every output element counts
//! with a different weight), against central differences of L. L is summed in f64 on the host from
//! the f32 outputs, which keeps the difference quotient's rounding noise near 1e-7 * |f| / eps.

use engine::{Error, Result, Tensor};

use crate::{no_grad, Var};

#[derive(Clone, Copy, Debug)]
pub struct GradcheckOptions {
    /// Step of the central difference.
    pub eps: f32,
    /// An element passes when |analytic - numeric| <= atol + rtol * |numeric|.
    pub atol: f32,
    pub rtol: f32,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions { eps: 1e-2, atol: 2e-3, rtol: 1e-2 }
    }
}

/// Deterministic weights in [-1, 1) (a small LCG), so failures reproduce.
fn projection(n: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn weighted_sum(out: &Tensor, w: &[f32]) -> Result<f64> {
    Ok(out.to_vec_f32()?.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum())
}

/// Checks the gradients of `f` with respect to every tensor of `inputs` (each becomes a leaf that
/// requires a gradient). Returns an error naming the worst element of the first failing input.
pub fn gradcheck(name: &str, inputs: &[Tensor], f: impl Fn(&[Var]) -> Result<Var>, opts: GradcheckOptions) -> Result<()> {
    let leaves: Vec<Var> = inputs.iter().map(|t| Var::leaf(t.clone(), true)).collect();
    let out = f(&leaves)?;
    let w = projection(out.elem_count());
    let wt = Tensor::from_f32_vec(w.clone(), out.shape(), out.dtype())?.to_device(out.device())?;
    out.mul(&Var::constant(wt))?.sum_all()?.backward()?;
    drop(out);
    for (i, (leaf, input)) in leaves.iter().zip(inputs).enumerate() {
        let analytic = match leaf.grad() {
            Some(g) => g.to_vec_f32()?,
            None => vec![0.0; input.elem_count()],
        };
        let base = input.to_vec_f32()?;
        let mut worst: Option<(usize, f32, f64, f32)> = None;
        for j in 0..base.len() {
            let eval = |delta: f32| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let moved = Tensor::from_f32_vec(v, input.shape(), input.dtype())?.to_device(input.device())?;
                let args: Vec<Var> = inputs.iter().enumerate().map(|(k, t)| Var::constant(if k == i { moved.clone() } else { t.clone() })).collect();
                no_grad(|| weighted_sum(f(&args)?.value(), &w))
            };
            let numeric = (eval(opts.eps)? - eval(-opts.eps)?) / (2.0 * opts.eps as f64);
            let excess = (analytic[j] as f64 - numeric).abs() as f32 - (opts.atol + opts.rtol * numeric.abs() as f32);
            if (excess > 0.0 || analytic[j].is_nan()) && worst.is_none_or(|(_, _, _, e)| excess > e) {
                worst = Some((j, analytic[j], numeric, excess));
            }
        }
        if let Some((j, a, n, _)) = worst {
            return Err(Error::msg(format!("gradcheck {name}: input {i} {:?} element {j}: autograd {a} vs finite difference {n}", input.shape())));
        }
    }
    Ok(())
}
