//! Gradients of the element-wise unary maps for the autograd: grad_in = grad_out * op'(x) in one
//! pass (kernels::elementwise_backward holds the derivatives; kernels/cuda/elementwise_backward.cu
//! the same on the GPU).

use kernels::elementwise::UnaryOp;
use kernels::elementwise_backward::derivative;

use crate::cpu::{elementwise as cpu, CpuStorage};
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

impl Tensor {
    /// grad * op'(self), where `self` is the op's input and `grad` (the output gradient) has the
    /// same shape and dtype. The result has `grad`'s dtype.
    pub fn unary_backward(&self, grad: &Tensor, op: UnaryOp) -> Result<Tensor> {
        const OP: &str = "unary_backward";
        self.same_device(grad, OP)?;
        self.same_dtype(grad, OP)?;
        self.float_only(OP)?;
        if self.shape() != grad.shape() {
            return Err(Error::ShapeMismatch { op: OP, lhs: self.shape().to_vec(), rhs: grad.shape().to_vec() });
        }
        let storage = match (&*self.read_storage(), &*grad.read_storage()) {
            (Storage::Cpu(x), Storage::Cpu(g)) => Storage::Cpu(match x.dtype() {
                DType::F32 => CpuStorage::from_vec(cpu::binary_map::<f32, f32>(x.as_slice()?, self.layout(), g.as_slice()?, grad.layout(), |a, b| b * derivative(op, a))),
                DType::BF16 => CpuStorage::from_vec(cpu::binary_map::<half::bf16, half::bf16>(x.as_slice()?, self.layout(), g.as_slice()?, grad.layout(), |a, b| half::bf16::from_f32(b * derivative(op, a)))),
                DType::F16 => CpuStorage::from_vec(cpu::binary_map::<half::f16, half::f16>(x.as_slice()?, self.layout(), g.as_slice()?, grad.layout(), |a, b| half::f16::from_f32(b * derivative(op, a)))),
                dt => return Err(Error::UnsupportedDType { op: OP, dtype: dt }),
            }),
            (Storage::Cuda(x), Storage::Cuda(g)) => Storage::Cuda(x.unary_backward(self.layout(), g, grad.layout(), op)?),
            _ => return Err(Error::DeviceMismatch { op: OP, lhs: self.device(), rhs: grad.device() }),
        };
        Tensor::from_storage(storage, self.shape())
    }
}

#[cfg(test)]
mod tests {
    use kernels::elementwise::UnaryOp;

    use crate::{Device, Tensor};

    #[test]
    fn silu_backward_on_a_transposed_view() {
        let x = Tensor::from_vec(vec![-1.0f32, 0.0, 0.5, 2.0, -3.0, 1.0], &[2, 3], Device::Cpu).unwrap().t().unwrap();
        let g = Tensor::ones(&[3, 2], crate::DType::F32, Device::Cpu).unwrap();
        let d = x.unary_backward(&g, UnaryOp::Silu).unwrap().to_vec::<f32>().unwrap();
        let xs = x.to_vec::<f32>().unwrap();
        for (dv, xv) in d.iter().zip(&xs) {
            let s = 1.0 / (1.0 + (-xv).exp());
            assert!((dv - s * (1.0 + xv * (1.0 - s))).abs() < 1e-6);
        }
    }
}
