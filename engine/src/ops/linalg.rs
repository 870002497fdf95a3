//! Matrix products: matmul (batched, broadcasting the leading dims, any strides) and linear.

use crate::cpu::gemm::{batched_matmul, MatRef};
use crate::layout::{broadcast_shape, Layout};
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

impl Tensor {
    /// PyTorch's `matmul`: 1-D operands are treated as a row (lhs) or a column (rhs) vector and that
    /// dimension is dropped from the result; leading (batch) dims broadcast. Transposed and
    /// broadcast views are read in place.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        if self.rank() == 0 || rhs.rank() == 0 {
            return Err(Error::ShapeMismatch { op: "matmul (0-d operand)", lhs: self.shape().to_vec(), rhs: rhs.shape().to_vec() });
        }
        let (lhs_vec, rhs_vec) = (self.rank() == 1, rhs.rank() == 1);
        let a = if lhs_vec { self.unsqueeze(0)? } else { self.clone() };
        let b = if rhs_vec { rhs.unsqueeze(1)? } else { rhs.clone() };
        let mut out = matmul_bias(&a, &b, None, "matmul")?;
        if rhs_vec {
            out = out.squeeze(-1)?;
        }
        if lhs_vec {
            out = out.squeeze(if rhs_vec { -1 } else { -2 })?;
        }
        Ok(out)
    }

    /// x W^T + b for x [..., in], weight [out, in], bias [out] (PyTorch `nn.Linear`).
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if weight.rank() != 2 || self.rank() == 0 || self.shape()[self.rank() - 1] != weight.shape()[1] {
            return Err(Error::ShapeMismatch { op: "linear (input vs weight [out, in])", lhs: self.shape().to_vec(), rhs: weight.shape().to_vec() });
        }
        let out_features = weight.shape()[0];
        if let Some(b) = bias {
            if b.shape() != [out_features] {
                return Err(Error::ShapeMismatch { op: "linear (bias vs [out])", lhs: b.shape().to_vec(), rhs: vec![out_features] });
            }
        }
        let wt = weight.t()?;
        // A contiguous input becomes one [rows, in] matrix: one large product instead of a batch.
        if self.rank() == 1 || (self.rank() > 2 && self.is_contiguous()) {
            let inner = self.shape()[self.rank() - 1];
            let x = self.reshape(&[self.elem_count() / inner.max(1), inner])?;
            let mut shape = self.shape().to_vec();
            *shape.last_mut().expect("rank >= 1") = out_features;
            return matmul_bias(&x, &wt, bias, "linear")?.reshape(&shape);
        }
        matmul_bias(self, &wt, bias, "linear")
    }
}

/// a [..., m, k] · b [..., k, n] (+ bias [n] on every row), both of rank >= 2.
fn matmul_bias(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, op: &'static str) -> Result<Tensor> {
    a.same_device(b, op)?;
    a.same_dtype(b, op)?;
    a.float_only(op)?;
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k, k2, n) = (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(Error::ShapeMismatch { op, lhs: a.shape().to_vec(), rhs: b.shape().to_vec() });
    }
    let batch = broadcast_shape(op, &a.shape()[..ra - 2], &b.shape()[..rb - 2])?;
    if let Some(bias) = bias {
        a.same_device(bias, op)?;
        a.same_dtype(bias, op)?;
    }
    if matches!(&*a.read_storage(), Storage::Cuda(_)) {
        if let Some(bias) = bias {
            if bias.shape() != [n] {
                return Err(Error::ShapeMismatch { op, lhs: bias.shape().to_vec(), rhs: vec![n] });
            }
        }
        return crate::cuda::gemm::matmul_bias(a, b, bias, &batch, m, k, n);
    }
    let dtype = a.dtype();
    // f32 operands are read in place whatever their strides; bf16/f16 are converted first.
    let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let nb = batch.len();
    let full = |t: &Tensor, r: usize, c: usize| -> Result<Layout> {
        let mut shape = batch.clone();
        shape.extend([r, c]);
        t.layout().broadcast_to(&shape)
    };
    let (la, lb) = (full(&a32, m, k)?, full(&b32, k, n)?);
    let batch_offsets = |l: &Layout| -> Vec<usize> { Layout::new(batch.clone(), l.strides()[..nb].to_vec(), l.offset()).strided_indices().collect() };
    let (oa, ob) = (batch_offsets(&la), batch_offsets(&lb));
    let batch_count: usize = batch.iter().product();
    let mut dst = match bias {
        Some(bias) => {
            let bv = bias.to_vec_f32()?;
            let mut d = Vec::with_capacity(batch_count * m * n);
            for _ in 0..batch_count * m {
                d.extend_from_slice(&bv);
            }
            d
        }
        None => vec![0f32; batch_count * m * n],
    };
    {
        let (ga, gb) = (a32.read_storage(), b32.read_storage());
        let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*ga, &*gb) else { unreachable!("CUDA returned above") };
        let lhs = MatRef { data: sa.as_slice::<f32>()?, offsets: &oa, rs: la.strides()[nb], cs: la.strides()[nb + 1] };
        let rhs = MatRef { data: sb.as_slice::<f32>()?, offsets: &ob, rs: lb.strides()[nb], cs: lb.strides()[nb + 1] };
        batched_matmul(m, n, k, &lhs, &rhs, &mut dst, bias.is_some());
    }
    let mut shape = batch;
    shape.extend([m, n]);
    Tensor::from_vec(dst, &shape, Device::Cpu)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn matmul_shapes_and_values() {
        let a = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let b = t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]);
        assert_eq!(a.matmul(&b).unwrap().to_vec::<f32>().unwrap(), vec![4.0, 5.0, 10.0, 11.0]);
        // A transposed view: a · a^T without copying a.
        assert_eq!(a.matmul(&a.t().unwrap()).unwrap().to_vec::<f32>().unwrap(), vec![14.0, 32.0, 32.0, 77.0]);
        // Vectors.
        let v = t(&[1.0, 1.0, 1.0], &[3]);
        assert_eq!(a.matmul(&v).unwrap().to_vec::<f32>().unwrap(), vec![6.0, 15.0]);
        assert_eq!(v.matmul(&b).unwrap().shape(), &[2]);
        assert_eq!(v.matmul(&v).unwrap().shape(), &[] as &[usize]);
        // Broadcast batch and bf16.
        let batched = Tensor::stack_for_test(&[&a, &a]);
        let r = batched.to_dtype(DType::BF16).unwrap().matmul(&b.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(r.shape(), &[2, 2, 2]);
        assert_eq!(r.dtype(), DType::BF16);
        assert_eq!(r.to_vec_f32().unwrap(), vec![4.0, 5.0, 10.0, 11.0, 4.0, 5.0, 10.0, 11.0]);
        // Errors, not panics.
        assert!(a.matmul(&a).is_err());
        assert!(a.matmul(&Tensor::zeros(&[3, 2], DType::F16, Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn linear_adds_bias_per_output() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 3]);
        let w = t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], &[2, 3]);
        let b = t(&[10.0, 20.0], &[2]);
        let y = x.linear(&w, Some(&b)).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2]);
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![11.0, 22.0, 14.0, 25.0]);
        // Non-contiguous input goes through the batched path.
        let xt = t(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0], &[1, 3, 2]).transpose(1, 2).unwrap();
        assert_eq!(xt.linear(&w, Some(&b)).unwrap().to_vec::<f32>().unwrap(), vec![11.0, 22.0, 14.0, 25.0]);
        assert!(x.linear(&w.t().unwrap(), None).is_err());
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let a = Tensor::randn(&[3, 200, 300], DType::F32, Device::Cpu, 1).unwrap();
        let b = Tensor::randn(&[500, 300], DType::F32, Device::Cpu, 2).unwrap();
        let x = Tensor::randn(&[2, 6, 20, 20], DType::F32, Device::Cpu, 3).unwrap();
        let w = Tensor::randn(&[8, 3, 3, 3], DType::F32, Device::Cpu, 4).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let m = a.matmul(&b.t().unwrap()).unwrap().to_vec::<f32>().unwrap();
                let c = x.conv2d(&w, None, crate::Conv2dParams { padding: [1, 1], groups: 2, ..Default::default() }).unwrap().to_vec::<f32>().unwrap();
                (m, c)
            })
        };
        assert!(run(1) == run(4));
    }

    impl Tensor {
        /// [2, ...] from two same-shape tensors, without depending on the shape ops' `stack`.
        fn stack_for_test(ts: &[&Tensor]) -> Tensor {
            let mut v = Vec::new();
            for t in ts {
                v.extend(t.to_vec::<f32>().unwrap());
            }
            let mut shape = vec![ts.len()];
            shape.extend_from_slice(ts[0].shape());
            Tensor::from_vec(v, &shape, Device::Cpu).unwrap()
        }
    }
}
