//! CUDA arms of the element-wise ops (kernels/cuda/elementwise.cu): strided copy, cast, unary,
//! broadcasting binary, comparison and where. Each op plans its operands (coalesced dims), then
//! launches the vectorized contiguous kernel when every operand is dense and aligned, else the
//! strided kernel. Outputs are always new contiguous storages.

use std::sync::Arc;

use kernels::elementwise::{pack_align, pack_elems, BinaryOp, CmpOp, UnaryOp, BLOCK, SOURCE};

use super::device::CudaDevice;
use super::launch::{launch_1d, launch_failed, strided_config, ElementwisePlan};
use super::storage::CudaStorage;
use super::{LaunchConfig, PushKernelArg};
use crate::{DType, Device, Error, Layout, Result};

/// A trailing scalar kernel argument (op codes and op parameters).
#[derive(Clone, Copy)]
enum Scalar {
    I32(i32),
    F32(f32),
}

/// An operand: device address of its first viewed element, and its element size in bytes.
type Operand = (u64, usize);

/// Launches `contig` (args: inputs.., out, n, extra..) when the plan is dense and every pointer is
/// aligned to its pack, else `strided` (args: inputs.., out, n, StridedArgs, wide, extra..).
fn launch_map<const NIN: usize>(dev: &Arc<CudaDevice>, plan: &ElementwisePlan<NIN>, inputs: [Operand; NIN], out: Operand, contig: &str, strided: &str, extra: &[Scalar]) -> Result<()> {
    if plan.elems == 0 {
        return Ok(());
    }
    let sizes: Vec<usize> = inputs.iter().chain(std::iter::once(&out)).map(|o| o.1).collect();
    let pack = pack_elems(&sizes);
    let aligned = inputs.iter().chain(std::iter::once(&out)).all(|&(ptr, size)| ptr % pack_align(size, pack) as u64 == 0);
    let ptrs: [u64; NIN] = inputs.map(|o| o.0);
    let (out_ptr, n) = (out.0, plan.elems as u64);
    let wide = plan.wide as i32;
    let dense = plan.contiguous && aligned;
    let name = if dense { contig } else { strided };
    let f = dev.function(&SOURCE, name)?;
    let mut b = dev.launch_builder(&f);
    for p in &ptrs {
        b.arg(p);
    }
    b.arg(&out_ptr).arg(&n);
    if !dense {
        b.arg(&plan.args).arg(&wide);
    }
    for s in extra {
        match s {
            Scalar::I32(v) => b.arg(v),
            Scalar::F32(v) => b.arg(v),
        };
    }
    let cfg = if dense { launch_1d(plan.elems / pack, BLOCK) } else { strided_config(plan.elems, BLOCK) };
    // SAFETY: the argument list matches the kernel's signature in elementwise.cu (see the launch
    // contract there); every pointer addresses at least the elements the plan reads or writes.
    unsafe { b.launch(cfg) }.map_err(launch_failed(name))?;
    Ok(())
}

fn float_only(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { op, dtype })
    }
}

fn same_device(op: &'static str, a: &CudaStorage, b: &CudaStorage) -> Result<()> {
    if a.ordinal() != b.ordinal() {
        return Err(Error::DeviceMismatch { op, lhs: Device::Cuda(a.ordinal()), rhs: Device::Cuda(b.ordinal()) });
    }
    Ok(())
}

fn same_dtype(op: &'static str, a: &CudaStorage, b: &CudaStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    Ok(())
}

fn operand(s: &CudaStorage, l: &Layout) -> Operand {
    (s.ptr_at(l.offset()), s.dtype().size_in_bytes())
}

/// copy_transpose_bN's launch for a copy whose unit-stride input dimension `p` is not the last
/// one of the coalesced view (a transpose: the kernel reads along p and writes along the last),
/// both at least 8 long (else the strided copy's reads are nearly contiguous anyway): (p, grid of
/// 32 x 32 tiles over (last, p) and the batch of the other dimensions, capped at 65535 z blocks).
/// None otherwise, or when the tiles along p exceed a grid's y limit.
fn transpose_launch(plan: &ElementwisePlan<1>) -> Option<(u32, (u32, u32, u32))> {
    let a = &plan.args;
    let r = a.rank as usize;
    if r < 2 || a.strides[0][r - 1] == 1 || a.shape[r - 1] < 8 {
        return None;
    }
    let p = (0..r - 1).find(|&d| a.strides[0][d] == 1 && a.shape[d] >= 8)?;
    let batch: u64 = (0..r).filter(|&d| d != p && d != r - 1).map(|d| a.shape[d]).product();
    let (x, y) = (a.shape[r - 1].div_ceil(32), a.shape[p].div_ceil(32));
    (x <= u32::MAX as u64 && y <= 65535).then_some((p as u32, (x as u32, y as u32, batch.min(65535) as u32)))
}

impl CudaStorage {
    /// A row-major copy of the view `l`.
    pub fn copy_strided(&self, l: &Layout) -> Result<Self> {
        let dev = self.device().clone();
        let out = CudaStorage::alloc(&dev, self.dtype(), l.elem_count())?;
        let plan = ElementwisePlan::<1>::new("copy", l.shape(), [l.strides()])?;
        let size = self.dtype().size_in_bytes();
        if plan.contiguous {
            dev.copy_dtod(out.device_ptr(), self.ptr_at(l.offset()), plan.elems * size)?;
        } else if let Some((p, grid)) = transpose_launch(&plan) {
            // Unit stride on another dimension than the last: tiles through shared memory.
            let name = format!("copy_transpose_b{size}");
            let f = dev.function(&SOURCE, &name)?;
            let (xp, yp) = (self.ptr_at(l.offset()), out.device_ptr());
            let mut b = dev.launch_builder(&f);
            b.arg(&xp).arg(&yp).arg(&plan.args).arg(&p);
            let cfg = LaunchConfig { grid_dim: grid, block_dim: (32, 8, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match copy_transpose_bN (x, y, s, p) in elementwise.cu; s is the
            // coalesced view of `l` (reads stay inside the view), y holds its elements, and p is a
            // dimension other than the last with unit input stride (transpose_launch).
            unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
        } else {
            let name = format!("copy_strided_b{size}");
            launch_map(&dev, &plan, [operand(self, l)], (out.device_ptr(), size), &name, &name, &[])?;
        }
        Ok(out)
    }

    /// The view `l` converted to `dtype` (the CPU backend's rules: through f64 when i64 is
    /// involved, saturating float-to-integer casts, NaN -> 0).
    pub fn cast(&self, l: &Layout, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return self.copy_strided(l);
        }
        let dev = self.device().clone();
        let out = CudaStorage::alloc(&dev, dtype, l.elem_count())?;
        let plan = ElementwisePlan::<1>::new("to_dtype", l.shape(), [l.strides()])?;
        let (a, b) = (self.dtype(), dtype);
        launch_map(&dev, &plan, [operand(self, l)], (out.device_ptr(), b.size_in_bytes()), &format!("cast_{a}_{b}"), &format!("cast_strided_{a}_{b}"), &[])?;
        Ok(out)
    }

    pub fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> {
        float_only("unary", self.dtype())?;
        let dev = self.device().clone();
        let dt = self.dtype();
        let out = CudaStorage::alloc(&dev, dt, l.elem_count())?;
        let plan = ElementwisePlan::<1>::new("unary", l.shape(), [l.strides()])?;
        let (code, p0, p1) = op.cuda_code();
        let extra = [Scalar::I32(code), Scalar::F32(p0), Scalar::F32(p1)];
        launch_map(&dev, &plan, [operand(self, l)], (out.device_ptr(), dt.size_in_bytes()), &format!("unary_{dt}"), &format!("unary_strided_{dt}"), &extra)?;
        Ok(out)
    }

    /// `op(a, b)` with `la` and `lb` already broadcast to the output shape.
    pub fn binary(&self, la: &Layout, b: &Self, lb: &Layout, op: BinaryOp) -> Result<Self> {
        same_device("binary", self, b)?;
        same_dtype("binary", self, b)?;
        float_only("binary", self.dtype())?;
        if la.shape() != lb.shape() {
            return Err(Error::ShapeMismatch { op: "binary", lhs: la.shape().to_vec(), rhs: lb.shape().to_vec() });
        }
        let dev = self.device().clone();
        let dt = self.dtype();
        let out = CudaStorage::alloc(&dev, dt, la.elem_count())?;
        let plan = ElementwisePlan::<2>::new("binary", la.shape(), [la.strides(), lb.strides()])?;
        let extra = [Scalar::I32(op.cuda_code())];
        launch_map(&dev, &plan, [operand(self, la), operand(b, lb)], (out.device_ptr(), dt.size_in_bytes()), &format!("binary_{dt}"), &format!("binary_strided_{dt}"), &extra)?;
        Ok(out)
    }

    /// A u8 mask of `op(a, b)`, with `la` and `lb` already broadcast to the output shape.
    pub fn cmp(&self, la: &Layout, b: &Self, lb: &Layout, op: CmpOp) -> Result<Self> {
        same_device("cmp", self, b)?;
        same_dtype("cmp", self, b)?;
        if la.shape() != lb.shape() {
            return Err(Error::ShapeMismatch { op: "cmp", lhs: la.shape().to_vec(), rhs: lb.shape().to_vec() });
        }
        let dev = self.device().clone();
        let dt = self.dtype();
        let out = CudaStorage::alloc(&dev, DType::U8, la.elem_count())?;
        let plan = ElementwisePlan::<2>::new("cmp", la.shape(), [la.strides(), lb.strides()])?;
        let extra = [Scalar::I32(op.cuda_code())];
        launch_map(&dev, &plan, [operand(self, la), operand(b, lb)], (out.device_ptr(), 1), &format!("cmp_{dt}"), &format!("cmp_strided_{dt}"), &extra)?;
        Ok(out)
    }

    /// `mask != 0 ? t : f` (`self` is the mask, of any dtype; -0.0 counts as zero, NaN as
    /// non-zero), all three layouts already broadcast to the output shape.
    pub fn where_cond(&self, lm: &Layout, t: &Self, lt: &Layout, f: &Self, lf: &Layout) -> Result<Self> {
        same_device("where_cond", self, t)?;
        same_device("where_cond", self, f)?;
        same_dtype("where_cond", t, f)?;
        if lm.shape() != lt.shape() || lm.shape() != lf.shape() {
            return Err(Error::ShapeMismatch { op: "where_cond", lhs: lm.shape().to_vec(), rhs: if lm.shape() != lt.shape() { lt.shape().to_vec() } else { lf.shape().to_vec() } });
        }
        let dev = self.device().clone();
        let dt = t.dtype();
        let out = CudaStorage::alloc(&dev, dt, lm.elem_count())?;
        let plan = ElementwisePlan::<3>::new("where_cond", lm.shape(), [lm.strides(), lt.strides(), lf.strides()])?;
        let mask = match self.dtype() {
            DType::F32 => "f32",
            DType::BF16 | DType::F16 => "b16",
            DType::I64 => "i64",
            DType::U8 => "u8",
        };
        let vb = dt.size_in_bytes();
        launch_map(
            &dev,
            &plan,
            [operand(self, lm), operand(t, lt), operand(f, lf)],
            (out.device_ptr(), vb),
            &format!("where_{mask}_b{vb}"),
            &format!("where_strided_{mask}_b{vb}"),
            &[],
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which copies take the transposing kernel: a unit-stride dimension before the last (after
    /// coalescing), both at least 8 long; views read along their last dimension do not.
    #[test]
    fn transposes_are_recognised_after_coalescing() {
        let dim = |shape: &[usize], strides: &[usize]| transpose_launch(&ElementwisePlan::<1>::new("copy", shape, [strides]).unwrap()).map(|(p, _)| p);
        assert_eq!(dim(&[3, 37, 45], &[45 * 37, 1, 37]), Some(1));
        let plan = ElementwisePlan::<1>::new("copy", &[3, 37, 45], [&[45 * 37, 1, 37]]).unwrap();
        assert_eq!(transpose_launch(&plan), Some((1, (2, 2, 3))));
        assert_eq!(dim(&[70, 33], &[1, 70]), Some(0));
        // Heads interleaved back to [B, H, L, D] order: D stays the unit-stride last dimension.
        assert_eq!(dim(&[2, 10, 64, 64], &[10 * 64 * 64, 64, 640, 1]), None);
        // Narrowed rows: still read along the last dimension.
        assert_eq!(dim(&[37, 45], &[50, 1]), None);
        // A last dimension of 4: its strided reads are nearly contiguous; no unit stride at all.
        assert_eq!(dim(&[100, 4], &[1, 100]), None);
        assert_eq!(dim(&[30, 40], &[80, 2]), None);
    }
}
