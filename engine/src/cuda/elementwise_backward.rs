//! CUDA arms of the autograd's element-wise helpers: the unary-op backward
//! (kernels/cuda/elementwise_backward.cu) and the fused AdamW step (kernels/cuda/adamw.cu).

use kernels::adamw::AdamWScalars;
use kernels::elementwise::UnaryOp;

use super::launch::{launch_failed, strided_config, ElementwisePlan};
use super::storage::CudaStorage;
use super::PushKernelArg;
use crate::{DType, Error, Layout, Result};

impl CudaStorage {
    /// dy * op'(x): `self` is x (view `lx`), `dy` has the same shape and dtype (view `ldy`); the
    /// result is contiguous.
    pub fn unary_backward(&self, lx: &Layout, dy: &CudaStorage, ldy: &Layout, op: UnaryOp) -> Result<Self> {
        const OP: &str = "unary_backward";
        let dt = self.dtype();
        if !dt.is_float() {
            return Err(Error::UnsupportedDType { op: OP, dtype: dt });
        }
        if dy.dtype() != dt {
            return Err(Error::DTypeMismatch { op: OP, lhs: dt, rhs: dy.dtype() });
        }
        if lx.shape() != ldy.shape() {
            return Err(Error::ShapeMismatch { op: OP, lhs: lx.shape().to_vec(), rhs: ldy.shape().to_vec() });
        }
        let dev = self.device().clone();
        let out = CudaStorage::alloc(&dev, dt, lx.elem_count())?;
        let plan = ElementwisePlan::<2>::new(OP, lx.shape(), [lx.strides(), ldy.strides()])?;
        if plan.elems == 0 {
            return Ok(out);
        }
        let name = format!("unary_backward_{dt}");
        let f = dev.function(&kernels::elementwise_backward::SOURCE, &name)?;
        let (code, p0, p1) = op.cuda_code();
        let (x, g, dx, n, wide) = (self.ptr_at(lx.offset()), dy.ptr_at(ldy.offset()), out.device_ptr(), plan.elems as u64, plan.wide as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&x).arg(&g).arg(&dx).arg(&n).arg(&plan.args).arg(&wide).arg(&code).arg(&p0).arg(&p1);
        // SAFETY: matches unary_backward_* in elementwise_backward.cu; both views lie inside
        // their storages.
        unsafe { b.launch(strided_config(plan.elems, kernels::elementwise_backward::BLOCK)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }
}

/// One fused AdamW step over `n` contiguous elements at these device addresses: `param`, `m`,
/// `v` f32 (updated in place), `grad` of `grad_dtype`, and optionally a bf16 copy of the updated
/// parameter (`copy` 0: none).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(dev: &std::sync::Arc<super::CudaDevice>, param: u64, grad: u64, grad_dtype: DType, m: u64, v: u64, copy: u64, n: usize, k: AdamWScalars) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if !grad_dtype.is_float() {
        return Err(Error::UnsupportedDType { op: "adamw_step_", dtype: grad_dtype });
    }
    let name = format!("adamw_{grad_dtype}");
    let f = dev.function(&kernels::adamw::SOURCE, &name)?;
    let n64 = n as u64;
    let mut b = dev.launch_builder(&f);
    b.arg(&param).arg(&grad).arg(&m).arg(&v).arg(&copy).arg(&n64);
    b.arg(&k.decay).arg(&k.one_minus_beta1).arg(&k.beta2).arg(&k.one_minus_beta2).arg(&k.bc2_sqrt).arg(&k.step_size).arg(&k.eps);
    // SAFETY: matches adamw_* in adamw.cu; the caller checked that every buffer holds n elements.
    unsafe { b.launch(strided_config(n, kernels::adamw::BLOCK)) }.map_err(launch_failed(&name))?;
    Ok(())
}
