//! In-place optimizer updates: one AdamW step on f32 parameter / moment tensors (math in
//! kernels::adamw) and `assign_`, which writes new values into an existing tensor's storage (used
//! to write f32 master weights back into bf16 parameters). On CUDA the step is one fused kernel
//! (kernels/cuda/adamw.cu) with the same math, bit for bit.

use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

impl Tensor {
    /// Runs `f` on this contiguous f32 CPU tensor's elements, mutably.
    fn with_f32_mut<R>(&self, op: &'static str, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
        if self.dtype() != DType::F32 {
            return Err(Error::DTypeMismatch { op, lhs: self.dtype(), rhs: DType::F32 });
        }
        let Some(range) = self.layout().contiguous_range() else {
            return Err(Error::BadShape { op, msg: "needs a contiguous tensor".into(), shape: self.shape().to_vec() });
        };
        let mut guard = self.write_storage();
        match &mut *guard {
            Storage::Cpu(s) => f(&mut s.as_mut_slice::<f32>()?[range]),
            // CUDA tensors take adamw_step_cuda before reaching here.
            Storage::Cuda(_) => Err(Error::DeviceMismatch { op, lhs: self.device(), rhs: Device::Cpu }),
        }
    }

    /// One AdamW step in place: `self` (the f32 parameter), `m` and `v` (f32 moments) are updated
    /// from `grad` (any float dtype, converted to f32). `step` counts from 1. All three updated
    /// tensors must be contiguous and distinct storages.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_(&self, grad: &Tensor, m: &Tensor, v: &Tensor, lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> Result<()> {
        const OP: &str = "adamw_step_";
        for t in [grad, m, v] {
            if t.shape() != self.shape() {
                return Err(Error::ShapeMismatch { op: OP, lhs: self.shape().to_vec(), rhs: t.shape().to_vec() });
            }
            self.same_device(t, OP)?;
        }
        if self.same_storage(m) || self.same_storage(v) || m.same_storage(v) || self.same_storage(grad) {
            return Err(Error::msg("adamw_step_: parameter, gradient and moments must be distinct tensors"));
        }
        if step == 0 {
            return Err(Error::msg("adamw_step_: steps count from 1"));
        }
        if let Device::Cuda(_) = self.device() {
            return self.adamw_step_cuda(grad, m, v, kernels::adamw::AdamWScalars::new(lr, beta1, beta2, eps, weight_decay, step));
        }
        let g = grad.to_dtype(DType::F32)?.contiguous()?.to_vec::<f32>()?;
        self.with_f32_mut(OP, |p| m.with_f32_mut(OP, |mm| v.with_f32_mut(OP, |vv| {
            kernels::adamw::adamw_step(p, &g, mm, vv, lr, beta1, beta2, eps, weight_decay, step);
            Ok(())
        })))
    }

    /// The CUDA step: parameter, moments (contiguous f32) and gradient (any float dtype, made
    /// contiguous) in one kernel pass.
    fn adamw_step_cuda(&self, grad: &Tensor, m: &Tensor, v: &Tensor, k: kernels::adamw::AdamWScalars) -> Result<()> {
        const OP: &str = "adamw_step_";
        grad.float_only(OP)?;
        let mut ranges = Vec::with_capacity(3);
        for t in [self, m, v] {
            if t.dtype() != DType::F32 {
                return Err(Error::DTypeMismatch { op: OP, lhs: t.dtype(), rhs: DType::F32 });
            }
            let Some(range) = t.layout().contiguous_range() else {
                return Err(Error::BadShape { op: OP, msg: "needs a contiguous tensor".into(), shape: t.shape().to_vec() });
            };
            ranges.push(range);
        }
        let g = grad.contiguous()?;
        let (gg, mut pg, mut mg, mut vg) = (g.read_storage(), self.write_storage(), m.write_storage(), v.write_storage());
        match (&*gg, &mut *pg, &mut *mg, &mut *vg) {
            (Storage::Cuda(gs), Storage::Cuda(ps), Storage::Cuda(ms), Storage::Cuda(vs)) => crate::cuda::adamw_step(
                ps.device(),
                ps.ptr_at(ranges[0].start),
                gs.ptr_at(g.layout().offset()),
                gs.dtype(),
                ms.ptr_at(ranges[1].start),
                vs.ptr_at(ranges[2].start),
                0,
                self.elem_count(),
                k,
            ),
            _ => Err(Error::msg("adamw_step_: parameter, gradient and moments must be on the same CUDA device")),
        }
    }

    /// Overwrites this contiguous tensor's elements with `src`'s values (same shape; cast to this
    /// dtype). Every view of the storage sees the change.
    pub fn assign_(&self, src: &Tensor) -> Result<()> {
        const OP: &str = "assign_";
        if src.shape() != self.shape() {
            return Err(Error::ShapeMismatch { op: OP, lhs: self.shape().to_vec(), rhs: src.shape().to_vec() });
        }
        self.same_device(src, OP)?;
        let Some(range) = self.layout().contiguous_range() else {
            return Err(Error::BadShape { op: OP, msg: "needs a contiguous tensor".into(), shape: self.shape().to_vec() });
        };
        let cast = src.to_dtype(self.dtype())?.copy()?;
        let sz = self.dtype().size_in_bytes();
        let src_guard = cast.read_storage();
        let mut guard = self.write_storage();
        match (&mut *guard, &*src_guard) {
            (Storage::Cpu(d), Storage::Cpu(s)) => {
                d.bytes_mut()[range.start * sz..range.end * sz].copy_from_slice(s.bytes());
                Ok(())
            }
            (Storage::Cuda(d), Storage::Cuda(s)) => {
                let n = range.len() * sz;
                if n > 0 {
                    d.device().copy_dtod(d.ptr_at(range.start), s.ptr_at(cast.layout().offset()), n)?;
                }
                Ok(())
            }
            _ => Err(Error::DeviceMismatch { op: OP, lhs: self.device(), rhs: src.device() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn assign_writes_through_views_and_casts() {
        let p = Tensor::zeros(&[2, 2], DType::BF16, Device::Cpu).unwrap();
        let view = p.reshape(&[4]).unwrap();
        p.assign_(&Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.5], &[2, 2], Device::Cpu).unwrap()).unwrap();
        assert_eq!(view.to_vec_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.5]);
        assert!(p.assign_(&Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap()).is_err());
    }
}
