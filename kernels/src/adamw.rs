//! AdamW (decoupled weight decay, bias-corrected moments) on f32 slices, with the exact operation
//! order of `torch.optim.AdamW` (single-tensor, non-amsgrad, non-foreach) so that results match it
//! to rounding. The CUDA kernel of the same math gets the same signature.

/// kernels/cuda/adamw.cu: the fused step. --fmad=false (with NVRTC's default IEEE sqrt and
/// division) makes it bit-identical to `adamw_step`.
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "adamw", code: include_str!("../cuda/adamw.cu"), options: &["--fmad=false"] };
/// Threads per block of the kernels in adamw.cu (AW_BLOCK).
pub const BLOCK: u32 = 256;

/// One AdamW step for one parameter tensor. `step` is the 1-based step count after this update.
/// The hyperparameters are host scalars in f64 (as torch's Python floats): the constants derived
/// from them are formed in f64 and rounded to f32 once, as torch does.
///
/// param <- param * (1 - lr * weight_decay)
/// m <- m + (1 - beta1) * (grad - m);  v <- beta2 * v + (1 - beta2) * grad^2
/// param <- param - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) {
    assert!(param.len() == grad.len() && param.len() == m.len() && param.len() == v.len(), "adamw_step: slice lengths differ");
    assert!(step >= 1, "adamw_step: steps count from 1");
    let k = AdamWScalars::new(lr, beta1, beta2, eps, weight_decay, step);
    for i in 0..param.len() {
        let g = grad[i];
        param[i] *= k.decay;
        // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        m[i] += k.one_minus_beta1 * (g - m[i]);
        v[i] = v[i] * k.beta2 + k.one_minus_beta2 * g * g;
        let denom = v[i].sqrt() / k.bc2_sqrt + k.eps;
        param[i] -= k.step_size * (m[i] / denom);
    }
}

/// The f32 scalars one AdamW step uses (what a CUDA launch passes to its kernel).
#[derive(Clone, Copy, Debug)]
pub struct AdamWScalars {
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bc2_sqrt: f32,
    pub step_size: f32,
    pub eps: f32,
}

impl AdamWScalars {
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> Self {
        let bc1 = 1.0 - beta1.powi(step as i32);
        let bc2 = 1.0 - beta2.powi(step as i32);
        AdamWScalars {
            decay: (1.0 - lr * weight_decay) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            step_size: (lr / bc1) as f32,
            eps: eps as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_about_lr_against_the_gradient_sign() {
        let mut p = [1.0f32, -2.0, 0.5];
        let g = [0.3f32, -0.1, 0.0];
        let (mut m, mut v) = ([0f32; 3], [0f32; 3]);
        adamw_step(&mut p, &g, &mut m, &mut v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1);
        assert!((p[0] - 0.9).abs() < 1e-5 && (p[1] + 1.9).abs() < 1e-5 && p[2] == 0.5, "{p:?}");
        // Weight decay alone shrinks the parameter by lr * wd.
        let mut q = [2.0f32];
        adamw_step(&mut q, &[0.0], &mut [0.0], &mut [0.0], 0.1, 0.9, 0.999, 1e-8, 0.5, 1);
        assert!((q[0] - 1.9).abs() < 1e-6);
    }
}
