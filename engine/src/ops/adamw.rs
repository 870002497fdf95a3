//! In-place optimizer updates: one AdamW step on f32 parameter / moment tensors (math in
//! kernels::adamw) and `assign_`, which writes new values into an existing tensor's storage (used
//! to write f32 master weights back into bf16 parameters). CUDA: not yet.

use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

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
            Storage::Cuda(_) => Err(crate::cuda::not_yet(op)),
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
        let g = grad.to_dtype(DType::F32)?.contiguous()?.to_vec::<f32>()?;
        self.with_f32_mut(OP, |p| m.with_f32_mut(OP, |mm| v.with_f32_mut(OP, |vv| {
            kernels::adamw::adamw_step(p, &g, mm, vv, lr, beta1, beta2, eps, weight_decay, step);
            Ok(())
        })))
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
            _ => Err(crate::cuda::not_yet(OP)),
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
