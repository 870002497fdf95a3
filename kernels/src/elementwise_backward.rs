//! Derivatives of the element-wise unary maps of `elementwise::UnaryOp`, for the autograd's
//! backward pass: grad_in = grad_out * derivative(op, x), with x the op's input. The CPU backend
//! and (later) the CUDA kernels compute the same formulas.

/// kernels/cuda/elementwise_backward.cu (the same derivatives on the GPU).
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "elementwise_backward", code: include_str!("../cuda/elementwise_backward.cu"), options: &[] };
/// Threads per block of the kernels in elementwise_backward.cu (EWB_BLOCK).
pub const BLOCK: u32 = 256;

use crate::elementwise::{sigmoid, UnaryOp};

/// d op(x) / dx at `x`. At kinks (relu, abs, clamp at its bounds) it takes PyTorch's choice:
/// relu'(0) = 0, abs'(0) = 0, clamp passes the gradient on the closed interval [min, max],
/// leaky_relu'(0) = slope.
#[inline(always)]
pub fn derivative(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -1.0,
        UnaryOp::Abs => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnaryOp::Sqr => 2.0 * x,
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Rsqrt => -0.5 / (x * x.sqrt()),
        UnaryOp::Recip => -1.0 / (x * x),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Sin => x.cos(),
        UnaryOp::Cos => -x.sin(),
        UnaryOp::Tanh => {
            let t = x.tanh();
            1.0 - t * t
        }
        UnaryOp::Sigmoid => {
            let s = sigmoid(x);
            s * (1.0 - s)
        }
        UnaryOp::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        UnaryOp::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        UnaryOp::Gelu => gelu_erf_derivative(x),
        UnaryOp::GeluTanh => gelu_tanh_derivative(x),
        UnaryOp::Affine { mul, .. } => mul,
        UnaryOp::Powf(p) => {
            if p == 0.0 {
                0.0
            } else {
                p * x.powf(p - 1.0)
            }
        }
        UnaryOp::Clamp { min, max } => {
            if x >= min && x <= max {
                1.0
            } else {
                0.0
            }
        }
        UnaryOp::LeakyRelu(s) => {
            if x > 0.0 {
                1.0
            } else {
                s
            }
        }
    }
}

/// d/dx of x * Phi(x): Phi(x) + x * phi(x).
#[inline(always)]
pub fn gelu_erf_derivative(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

/// d/dx of 0.5 x (1 + tanh(c (x + 0.044715 x^3))).
#[inline(always)]
pub fn gelu_tanh_derivative(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let inner = C * (x + 0.044715 * x * x * x);
    let t = inner.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivatives_match_central_differences() {
        let ops = [
            UnaryOp::Neg, UnaryOp::Abs, UnaryOp::Sqr, UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::Recip, UnaryOp::Exp, UnaryOp::Log,
            UnaryOp::Sin, UnaryOp::Cos, UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Silu, UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::GeluTanh,
            UnaryOp::Affine { mul: -1.5, add: 2.0 }, UnaryOp::Powf(2.5), UnaryOp::Clamp { min: 0.2, max: 1.5 }, UnaryOp::LeakyRelu(0.1),
        ];
        for op in ops {
            for &x in &[0.37f32, 0.9, 1.7, -0.6, -1.3] {
                if matches!(op, UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Log | UnaryOp::Powf(_)) && x < 0.0 {
                    continue;
                }
                let h = 1e-3f64;
                let f = |v: f64| op.apply(v as f32) as f64;
                let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
                let d = derivative(op, x) as f64;
                assert!((fd - d).abs() < 2e-3 * (1.0 + d.abs()), "{op:?} at {x}: {d} vs {fd}");
            }
        }
    }
}
