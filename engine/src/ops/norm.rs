//! Softmax, normalisations (layer, group, batch) and gated activations (GEGLU, PReLU).
//!
//! The CPU path reads the input as contiguous f32 (converting bf16/f16 or gathering strided views)
//! and runs the slice kernels of `kernels::softmax` / `kernels::norm`, which are also the
//! references of the CUDA kernels; the result has the input's dtype. Affine parameters may be of any
//! float dtype (e.g. f32 master weights with bf16 activations).

use kernels::{norm as knorm, softmax as ksoftmax};

use crate::layout::resolve_dim;
use crate::cpu::CpuStorage;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// The CUDA arm of every op in this file until its kernel is wired in.
fn cpu_only(x: &Tensor, op: &'static str) -> Result<()> {
    match x.device() {
        Device::Cpu => Ok(()),
        Device::Cuda(_) => Err(crate::cuda::not_yet(op)),
    }
}

/// Runs a CPU slice kernel on `x` as contiguous f32, with its output (`shape`) written straight into
/// new f32 storage: no intermediate Vec to copy, which for these memory-bound ops would cost as much
/// as the kernel. The result is converted to `dtype` (a no-op for f32).
fn f32_kernel(x: &Tensor, shape: &[usize], dtype: DType, f: impl FnOnce(&[f32], &mut [f32])) -> Result<Tensor> {
    let mut storage = CpuStorage::zeros(DType::F32, shape.iter().product());
    let out = storage.as_mut_slice::<f32>()?;
    x.with_cpu_f32(|xs| {
        f(xs, out);
        Ok(())
    })?;
    Tensor::from_storage(Storage::Cpu(storage), shape)?.to_dtype(dtype)
}

/// Checks an optional per-channel parameter without reading it (the CUDA arms pass it on as is).
fn check_param(op: &'static str, what: &str, p: Option<&Tensor>, len: usize, x: &Tensor) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    x.same_device(p, op)?;
    p.float_only(op)?;
    if p.shape() != [len] {
        return Err(Error::BadShape { op, msg: format!("{what} has shape {:?}, expected [{len}] for an input of shape {:?}", p.shape(), x.shape()), shape: p.shape().to_vec() });
    }
    Ok(())
}

/// An optional per-channel parameter as f32, checked to be a float vector of length `len` on the
/// input's device; the error names the parameter's shape and the expected one.
fn param_f32(op: &'static str, what: &str, p: Option<&Tensor>, len: usize, x: &Tensor) -> Result<Option<Vec<f32>>> {
    let Some(p) = p else { return Ok(None) };
    x.same_device(p, op)?;
    p.float_only(op)?;
    if p.shape() != [len] {
        return Err(Error::BadShape { op, msg: format!("{what} has shape {:?}, expected [{len}] for an input of shape {:?}", p.shape(), x.shape()), shape: p.shape().to_vec() });
    }
    Ok(Some(p.to_vec_f32()?))
}

impl Tensor {
    /// Moves `dim` last, runs `f` on the contiguous rows, and moves it back.
    fn along_last(&self, op: &'static str, dim: isize, f: fn(&[f32], usize, &mut [f32])) -> Result<Tensor> {
        self.float_only(op)?;
        cpu_only(self, op)?;
        let rank = self.rank().max(1);
        let d = resolve_dim(op, dim, rank)?;
        if self.rank() == 0 {
            // A scalar is a single row of one element.
            return self.reshape(&[1])?.along_last(op, 0, f)?.reshape(&[]);
        }
        let last = rank - 1;
        let mut perm: Vec<usize> = (0..rank).filter(|&i| i != d).collect();
        perm.push(d);
        let moved = self.permute(&perm)?;
        let cols = self.shape()[d];
        let y = f32_kernel(&moved, moved.shape(), self.dtype(), |x, out| f(x, cols, out))?;
        if d == last {
            return Ok(y);
        }
        // Inverse permutation: position d takes the last axis, the others shift back.
        let mut inv: Vec<usize> = (0..last).collect();
        inv.insert(d, last);
        y.permute(&inv)?.contiguous()
    }

    /// The CUDA arm of softmax / log-softmax: `dim` moved last (a copy unless it already is), the
    /// row kernel, and the result permuted back into a contiguous tensor.
    fn softmax_cuda(&self, op: &'static str, dim: isize, log: bool) -> Result<Tensor> {
        self.float_only(op)?;
        if self.rank() == 0 {
            return self.reshape(&[1])?.softmax_cuda(op, 0, log)?.reshape(&[]);
        }
        let d = resolve_dim(op, dim, self.rank())?;
        let last = self.rank() - 1;
        if d == last {
            return crate::cuda::norm::softmax_last(&self.contiguous()?, log);
        }
        let mut perm: Vec<usize> = (0..self.rank()).filter(|&i| i != d).collect();
        perm.push(d);
        let y = crate::cuda::norm::softmax_last(&self.permute(&perm)?.contiguous()?, log)?;
        let mut inv: Vec<usize> = (0..last).collect();
        inv.insert(d, last);
        y.permute(&inv)?.contiguous()
    }

    /// Softmax along `dim`, numerically stable (statistics in f32/f64 whatever the dtype).
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        if self.device().is_cuda() {
            return self.softmax_cuda("softmax", dim, false);
        }
        self.along_last("softmax", dim, ksoftmax::softmax_rows)
    }

    /// Log-softmax along `dim`, numerically stable.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        if self.device().is_cuda() {
            return self.softmax_cuda("log_softmax", dim, true);
        }
        self.along_last("log_softmax", dim, ksoftmax::log_softmax_rows)
    }

    /// Layer norm over the last dimension, with optional weight and bias of that size.
    pub fn layer_norm(&self, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        const OP: &str = "layer_norm";
        self.float_only(OP)?;
        let Some(&cols) = self.shape().last() else {
            return Err(Error::BadShape { op: OP, msg: "needs at least one dimension".into(), shape: vec![] });
        };
        if self.device().is_cuda() {
            check_param(OP, "weight", weight, cols, self)?;
            check_param(OP, "bias", bias, cols, self)?;
            return crate::cuda::norm::layer_norm(&self.contiguous()?, weight, bias, eps);
        }
        let w = param_f32(OP, "weight", weight, cols, self)?;
        let b = param_f32(OP, "bias", bias, cols, self)?;
        f32_kernel(self, self.shape(), self.dtype(), |x, out| knorm::layer_norm_rows(x, cols, w.as_deref(), b.as_deref(), eps, out))
    }

    /// Group norm of an [N, C, *] tensor: `groups` must divide C; weight and bias are [C]. With
    /// `silu`, SiLU is applied to the result in the same pass.
    pub fn group_norm(&self, groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, silu: bool) -> Result<Tensor> {
        Ok(self.group_norm_impl(groups, weight, bias, eps, silu, false)?.0)
    }

    /// `group_norm`, also returning the statistics it normalised with: an f32 [N, G, 2] tensor of
    /// (mean, rstd = 1 / sqrt(biased variance + eps)) per (sample, group) on the input's device,
    /// what PyTorch's native_group_norm saves. Pass it to `group_norm_backward` so that the
    /// backward does not recompute it from x (training does: see the autograd op).
    pub fn group_norm_stats(&self, groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, silu: bool) -> Result<(Tensor, Tensor)> {
        match self.group_norm_impl(groups, weight, bias, eps, silu, true)? {
            (y, Some(stats)) => Ok((y, stats)),
            (_, None) => Err(Error::Msg("group_norm_stats: the forward returned no statistics".into())),
        }
    }

    /// The group-norm forward; the statistics when `want_stats`.
    fn group_norm_impl(&self, groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, silu: bool, want_stats: bool) -> Result<(Tensor, Option<Tensor>)> {
        const OP: &str = "group_norm";
        self.float_only(OP)?;
        if self.rank() < 2 {
            return Err(Error::BadShape { op: OP, msg: "expected an [N, C, *] input".into(), shape: self.shape().to_vec() });
        }
        let (n, c) = (self.shape()[0], self.shape()[1]);
        if groups == 0 || c % groups != 0 {
            return Err(Error::BadShape { op: OP, msg: format!("{groups} groups do not divide {c} channels"), shape: self.shape().to_vec() });
        }
        if self.device().is_cuda() {
            check_param(OP, "weight", weight, c, self)?;
            check_param(OP, "bias", bias, c, self)?;
            return crate::cuda::norm::group_norm(self, groups, weight, bias, eps, silu, want_stats);
        }
        let hw: usize = self.shape()[2..].iter().product();
        let w = param_f32(OP, "weight", weight, c, self)?;
        let b = param_f32(OP, "bias", bias, c, self)?;
        let mut stats = if want_stats { vec![0f32; 2 * n * groups] } else { Vec::new() };
        let y = f32_kernel(self, self.shape(), self.dtype(), |x, out| {
            knorm::group_norm_with_stats(x, n, c, hw, groups, w.as_deref(), b.as_deref(), eps, silu, out, want_stats.then_some(&mut stats[..]))
        })?;
        let stats = if want_stats { Some(Tensor::from_f32_vec(stats, &[n, groups, 2], DType::F32)?) } else { None };
        Ok((y, stats))
    }

    /// Inference batch norm of an [N, C, *] tensor with running `mean` and `var` ([C]) over dim 1.
    pub fn batch_norm(&self, mean: &Tensor, var: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        const OP: &str = "batch_norm";
        self.float_only(OP)?;
        if self.rank() < 2 {
            return Err(Error::BadShape { op: OP, msg: "expected an [N, C, *] input".into(), shape: self.shape().to_vec() });
        }
        let (n, c) = (self.shape()[0], self.shape()[1]);
        if self.device().is_cuda() {
            check_param(OP, "running mean", Some(mean), c, self)?;
            check_param(OP, "running var", Some(var), c, self)?;
            check_param(OP, "weight", weight, c, self)?;
            check_param(OP, "bias", bias, c, self)?;
            return crate::cuda::norm::batch_norm(self, mean, var, weight, bias, eps);
        }
        let hw: usize = self.shape()[2..].iter().product();
        let m = param_f32(OP, "running mean", Some(mean), c, self)?.unwrap_or_default();
        let v = param_f32(OP, "running var", Some(var), c, self)?.unwrap_or_default();
        let w = param_f32(OP, "weight", weight, c, self)?;
        let b = param_f32(OP, "bias", bias, c, self)?;
        f32_kernel(self, self.shape(), self.dtype(), |x, out| knorm::batch_norm(x, n, c, hw, &m, &v, w.as_deref(), b.as_deref(), eps, out))
    }

    /// GEGLU (diffusers): the last dimension splits into [h, gate]; returns h * gelu(gate).
    pub fn geglu(&self) -> Result<Tensor> {
        const OP: &str = "geglu";
        self.float_only(OP)?;
        let cols = self.shape().last().copied().unwrap_or(0);
        if self.rank() == 0 || cols % 2 != 0 {
            return Err(Error::BadShape { op: OP, msg: "the last dimension must have an even size".into(), shape: self.shape().to_vec() });
        }
        let mut shape = self.shape().to_vec();
        *shape.last_mut().expect("rank checked") = cols / 2;
        if self.device().is_cuda() {
            return crate::cuda::norm::geglu(&self.contiguous()?, &shape);
        }
        f32_kernel(self, &shape, self.dtype(), |x, out| knorm::geglu_rows(x, cols / 2, out))
    }

    /// PReLU: x where x > 0, else weight * x; `weight` has one element or one per channel (dim 1).
    pub fn prelu(&self, weight: &Tensor) -> Result<Tensor> {
        const OP: &str = "prelu";
        self.float_only(OP)?;
        let c = if self.rank() >= 2 { self.shape()[1] } else { 1 };
        let per_channel = weight.elem_count() != 1;
        if weight.rank() > 1 || (per_channel && weight.elem_count() != c) {
            return Err(Error::BadShape { op: OP, msg: format!("weight has shape {:?}, expected [1] or [{c}] for an input of shape {:?}", weight.shape(), self.shape()), shape: weight.shape().to_vec() });
        }
        self.same_device(weight, OP)?;
        weight.float_only(OP)?;
        let inner: usize = self.shape().get(2..).map_or(1, |s| s.iter().product());
        if self.device().is_cuda() {
            return crate::cuda::norm::prelu(&self.contiguous()?, weight, c, inner, per_channel);
        }
        let w = weight.to_vec_f32()?;
        let out = self.with_cpu_f32(|x| {
            Ok(x.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let a = if per_channel { w[(i / inner.max(1)) % c] } else { w[0] };
                    if v > 0.0 {
                        v
                    } else {
                        a * v
                    }
                })
                .collect())
        })?;
        Tensor::from_f32_vec(out, self.shape(), self.dtype())
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_along_first_dim_of_transposed_view() {
        let x = t(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[2, 3]).t().unwrap(); // [3, 2]: rows (0,3), (1,4), (2,5)
        let s = x.softmax(0).unwrap();
        assert_eq!(s.shape(), &[3, 2]);
        let v = s.to_vec::<f32>().unwrap();
        // Each column sums to 1 and the largest entry of a column is in the last row.
        for col in 0..2 {
            assert!((v[col] + v[2 + col] + v[4 + col] - 1.0).abs() < 1e-6);
            assert!(v[4 + col] > v[col]);
        }
        let l = x.log_softmax(-2).unwrap().exp().unwrap().to_vec::<f32>().unwrap();
        for (a, b) in l.iter().zip(&v) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn norm_errors_name_shapes() {
        let x = Tensor::zeros(&[2, 6, 5, 7], DType::F32, Device::Cpu).unwrap();
        let w = Tensor::ones(&[5], DType::F32, Device::Cpu).unwrap();
        let e = x.group_norm(3, Some(&w), None, 1e-5, false).unwrap_err().to_string();
        assert!(e.contains("[5]") && e.contains("[6]"), "{e}");
        let e = x.group_norm(4, None, None, 1e-5, false).unwrap_err().to_string();
        assert!(e.contains("4 groups") && e.contains("6 channels"), "{e}");
        assert!(x.layer_norm(Some(&w), None, 1e-5).is_err());
        assert!(t(&[1.0, 2.0, 3.0], &[3]).geglu().is_err());
        assert!(x.prelu(&w).is_err());
    }

    #[test]
    fn prelu_per_channel_and_shared() {
        let x = t(&[-1.0, 2.0, -3.0, 4.0], &[1, 2, 2]);
        let y = x.prelu(&t(&[0.5, 2.0], &[2])).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![-0.5, 2.0, -6.0, 4.0]);
        let y = x.prelu(&t(&[0.25], &[1])).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![-0.25, 2.0, -0.75, 4.0]);
    }
}
