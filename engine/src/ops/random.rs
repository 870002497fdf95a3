//! Seeded random tensors. Element i depends only on (seed, i) through Philox4x32-10 (the exact
//! mapping is documented in kernels::rng), so the same seed gives the same numbers whatever the
//! thread count, and the CUDA kernel reproduces them.

use kernels::rng;

use crate::{DType, Device, Error, Result, Tensor};

impl Tensor {
    /// Uniform in [0, 1) (24 random bits per element, then converted to `dtype`).
    pub fn rand(shape: &[usize], dtype: DType, device: Device, seed: u64) -> Result<Tensor> {
        if let Device::Cuda(ordinal) = device {
            return crate::cuda::norm::random(shape, dtype, ordinal, seed, false);
        }
        Tensor::random("rand", shape, dtype, device, |out| rng::fill_uniform(seed, out))
    }

    /// Standard normal (Box–Muller), converted to `dtype`.
    pub fn randn(shape: &[usize], dtype: DType, device: Device, seed: u64) -> Result<Tensor> {
        if let Device::Cuda(ordinal) = device {
            return crate::cuda::norm::random(shape, dtype, ordinal, seed, true);
        }
        Tensor::random("randn", shape, dtype, device, |out| rng::fill_normal(seed, out))
    }

    fn random(op: &'static str, shape: &[usize], dtype: DType, device: Device, fill: impl FnOnce(&mut [f32])) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType { op, dtype });
        }
        if device.is_cuda() {
            return Err(crate::cuda::not_yet(op));
        }
        let mut out = vec![0f32; shape.iter().product()];
        fill(&mut out);
        Tensor::from_f32_vec(out, shape, dtype)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn same_seed_same_numbers_whatever_the_thread_count() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let n = Tensor::randn(&[3, 50_001], DType::F32, Device::Cpu, 1234).unwrap().to_vec::<f32>().unwrap();
                let u = Tensor::rand(&[7, 30_011], DType::F32, Device::Cpu, 1234).unwrap().to_vec::<f32>().unwrap();
                (n, u)
            })
        };
        let one = run(1);
        assert_eq!(one, run(4));
        let other = Tensor::randn(&[3, 50_001], DType::F32, Device::Cpu, 1235).unwrap().to_vec::<f32>().unwrap();
        assert_ne!(one.0, other);
    }

    #[test]
    fn normal_statistics_and_dtypes() {
        let x = Tensor::randn(&[1000, 1000], DType::F32, Device::Cpu, 99).unwrap().to_vec::<f32>().unwrap();
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 5e-3 && (std - 1.0).abs() < 5e-3, "mean {mean} std {std}");
        let h = Tensor::rand(&[10], DType::BF16, Device::Cpu, 5).unwrap();
        assert_eq!(h.dtype(), DType::BF16);
        assert!(Tensor::rand(&[10], DType::I64, Device::Cpu, 5).is_err());
        assert!(Tensor::randn(&[2], DType::I64, Device::Cuda(0), 5).is_err());
    }
}
