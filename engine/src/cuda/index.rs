//! CUDA arms of the shape and indexing ops (kernels/cuda/index.cu): cat, gather / index_select /
//! embedding, pad, masked_fill, and index_add into zeros. All but index_add move raw elements of
//! the dtype's size, so every dtype is served by the same four kernels (b1, b2, b4, b8).
//!
//! Bad indices: the kernels check every index against the dimension's size on the device and
//! report the first bad one through a two-i64 slot ([found, index]) that the host reads after the
//! launch. That read waits for the stream, which costs a synchronisation per indexing op but never
//! a copy of the indices to the host, and an out-of-range index is an error naming it, as on the
//! CPU, never an out-of-bounds read.

use std::sync::Arc;

use kernels::index::{BLOCK, SOURCE};

use super::device::CudaDevice;
use super::launch::{launch_failed, strided_config, ElementwisePlan, MAX_DIMS};
use super::storage::CudaStorage;
use super::{DeviceRepr, PushKernelArg};
use crate::{DType, Error, Layout, Result};

/// The kernel-name suffix of raw elements of `size` bytes.
fn bytes_suffix(size: usize) -> &'static str {
    match size {
        1 => "b1",
        2 => "b2",
        4 => "b4",
        _ => "b8",
    }
}

/// The device slot where a kernel reports the first out-of-range index.
pub(crate) struct IndexCheck {
    slot: CudaStorage,
}

impl IndexCheck {
    pub(crate) fn new(dev: &Arc<CudaDevice>) -> Result<Self> {
        let slot = CudaStorage::alloc(dev, DType::I64, 2)?;
        dev.memset(slot.device_ptr(), 0, 16)?;
        Ok(IndexCheck { slot })
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.slot.device_ptr()
    }

    /// Waits for the launch and turns a reported index into the CPU backend's error.
    pub(crate) fn finish(self, op: &str, dim: usize, size: usize) -> Result<()> {
        let b = self.slot.download(0..2)?;
        let word = |k: usize| i64::from_le_bytes(b[8 * k..8 * k + 8].try_into().expect("8 bytes"));
        if word(0) != 0 {
            return Err(Error::msg(format!("{op}: index {} is out of range for dimension {dim} of size {size}", word(1))));
        }
        Ok(())
    }
}

/// pad_* kernel arguments; must match `PadArgs` in index.cu field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PadArgs {
    rank: u64,
    oshape: [u64; MAX_DIMS],
    ishape: [u64; MAX_DIMS],
    istrides: [u64; MAX_DIMS],
    left: [u64; MAX_DIMS],
}

// SAFETY: plain #[repr(C)] integers, laid out as the CUDA struct of the same name.
unsafe impl DeviceRepr for PadArgs {}

impl CudaStorage {
    /// Copies the view `l` of `self` into rows of `out` (a concatenation's output): row-major
    /// element i of the view goes to out[dst_offset + (i / row_len) * dst_row + i % row_len].
    pub fn cat_into(&self, l: &Layout, out: &CudaStorage, dst_offset: usize, row_len: usize, dst_row: usize) -> Result<()> {
        let plan = ElementwisePlan::<1>::new("cat", l.shape(), [l.strides()])?;
        if plan.elems == 0 {
            return Ok(());
        }
        let dev = self.device();
        let size = self.dtype().size_in_bytes();
        let wide = (plan.wide || out.len() >= i32::MAX as usize) as i32;
        let name = format!("cat_copy_{}", bytes_suffix(size));
        let f = dev.function(&SOURCE, &name)?;
        let (src, dst, n, row_len, dst_row) = (self.ptr_at(l.offset()), out.ptr_at(dst_offset), plan.elems as u64, row_len as u64, dst_row as u64);
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&n).arg(&plan.args).arg(&wide).arg(&row_len).arg(&dst_row);
        // SAFETY: matches cat_copy_* in index.cu; the caller sized `out` for every row.
        unsafe { b.launch(strided_config(plan.elems, BLOCK)) }.map_err(launch_failed(&name))?;
        Ok(())
    }

    /// out[i] = self[off0(i) + idx[off1(i)] * dim_stride] over `out_shape` (row-major), where
    /// off0 uses `src_strides` (the gathered dimension's stride zeroed) from `src_offset` and off1
    /// uses `idx_strides` from the index view's offset. Indices outside [0, dim_size) are an error
    /// naming `op`, `dim` and the index.
    #[allow(clippy::too_many_arguments)]
    pub fn gather(&self, op: &'static str, src_offset: usize, src_strides: &[usize], idx: &CudaStorage, idx_offset: usize, idx_strides: &[usize], out_shape: &[usize], dim: usize, dim_stride: usize, dim_size: usize) -> Result<Self> {
        if idx.dtype() != DType::I64 {
            return Err(Error::DTypeMismatch { op, lhs: idx.dtype(), rhs: DType::I64 });
        }
        let dev = self.device().clone();
        let n: usize = out_shape.iter().product();
        let out = CudaStorage::alloc(&dev, self.dtype(), n)?;
        let plan = ElementwisePlan::<2>::new(op, out_shape, [src_strides, idx_strides])?;
        if plan.elems == 0 {
            return Ok(out);
        }
        let check = IndexCheck::new(&dev)?;
        let size = self.dtype().size_in_bytes();
        let name = format!("gather_{}", bytes_suffix(size));
        let f = dev.function(&SOURCE, &name)?;
        // Source offsets reach past the zeroed dimension by up to (dim_size - 1) * dim_stride.
        let wide = (plan.wide || self.len() >= i32::MAX as usize) as i32;
        let (src, ip, dst, n64, ds, dz, err) = (self.ptr_at(src_offset), idx.ptr_at(idx_offset), out.device_ptr(), n as u64, dim_stride as i64, dim_size as i64, check.ptr());
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&ip).arg(&dst).arg(&n64).arg(&plan.args).arg(&wide).arg(&ds).arg(&dz).arg(&err);
        // SAFETY: matches gather_* in index.cu; offsets stay inside both views, and indices are
        // checked against dim_size before they are used.
        unsafe { b.launch(strided_config(n, BLOCK)) }.map_err(launch_failed(&name))?;
        check.finish(op, dim, dim_size)?;
        Ok(out)
    }

    /// The view `l` padded to `oshape`: `left[d]` new elements before dimension d's data; border
    /// elements are `fill_bits` (the dtype's bytes, little-endian; `PAD_CONSTANT`) or mirrored /
    /// replicated source elements (`mode` of kernels::index).
    pub fn pad(&self, l: &Layout, oshape: &[usize], left: &[usize], mode: i32, fill_bits: u64) -> Result<Self> {
        let rank = l.rank();
        if rank > MAX_DIMS {
            return Err(Error::BadShape { op: "pad", msg: format!("CUDA pad takes at most {MAX_DIMS} dimensions"), shape: l.shape().to_vec() });
        }
        let dev = self.device().clone();
        let n: usize = oshape.iter().product();
        let out = CudaStorage::alloc(&dev, self.dtype(), n)?;
        if n == 0 {
            return Ok(out);
        }
        let mut a = PadArgs { rank: rank as u64, oshape: [1; MAX_DIMS], ishape: [1; MAX_DIMS], istrides: [0; MAX_DIMS], left: [0; MAX_DIMS] };
        for d in 0..rank {
            a.oshape[d] = oshape[d] as u64;
            a.ishape[d] = l.shape()[d] as u64;
            a.istrides[d] = l.strides()[d] as u64;
            a.left[d] = left[d] as u64;
        }
        let name = format!("pad_{}", bytes_suffix(self.dtype().size_in_bytes()));
        let f = dev.function(&SOURCE, &name)?;
        let (src, dst, n64) = (self.ptr_at(l.offset()), out.device_ptr(), n as u64);
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&n64).arg(&a).arg(&mode).arg(&fill_bits);
        // SAFETY: matches pad_* in index.cu; every source coordinate is mapped into its dimension
        // (the op checked reflect pads against the sizes).
        unsafe { b.launch(strided_config(n, BLOCK)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// A contiguous copy of the view `l` with `fill_bits` where the u8 `mask` (viewed as `lm`,
    /// already broadcast to `l`'s shape) is non-zero.
    pub fn masked_fill(&self, l: &Layout, mask: &CudaStorage, lm: &Layout, fill_bits: u64) -> Result<Self> {
        let dev = self.device().clone();
        let out = CudaStorage::alloc(&dev, self.dtype(), l.elem_count())?;
        let plan = ElementwisePlan::<2>::new("masked_fill", l.shape(), [l.strides(), lm.strides()])?;
        if plan.elems == 0 {
            return Ok(out);
        }
        let name = format!("masked_fill_{}", bytes_suffix(self.dtype().size_in_bytes()));
        let f = dev.function(&SOURCE, &name)?;
        let (src, m, dst, n, wide) = (self.ptr_at(l.offset()), mask.ptr_at(lm.offset()), out.device_ptr(), plan.elems as u64, plan.wide as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&m).arg(&dst).arg(&n).arg(&plan.args).arg(&wide).arg(&fill_bits);
        // SAFETY: matches masked_fill_* in index.cu; both views lie inside their storages.
        unsafe { b.launch(strided_config(plan.elems, BLOCK)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// An f32 [outer, size, inner] tensor of zeros plus `self` ([outer, len, inner], contiguous
    /// from `offset`) added along the middle dimension at the contiguous i64 indices `idx` (len
    /// of them from `idx_offset`). Additions are f32 atomics (their order is not fixed).
    #[allow(clippy::too_many_arguments)]
    pub fn index_add_zeros(&self, op: &'static str, offset: usize, idx: &CudaStorage, idx_offset: usize, outer: usize, len: usize, inner: usize, dim: usize, size: usize) -> Result<Self> {
        let dev = self.device().clone();
        let total = outer * size * inner;
        let acc = CudaStorage::alloc(&dev, DType::F32, total)?;
        dev.memset(acc.device_ptr(), 0, total * 4)?;
        let n = outer * len * inner;
        if n == 0 {
            return Ok(acc);
        }
        let dt = self.dtype();
        if !dt.is_float() {
            return Err(Error::UnsupportedDType { op, dtype: dt });
        }
        let check = IndexCheck::new(&dev)?;
        let name = format!("index_add_{dt}");
        let f = dev.function(&SOURCE, &name)?;
        let (src, ip, dst, n64, len64, inner64, size64, err) = (self.ptr_at(offset), idx.ptr_at(idx_offset), acc.device_ptr(), n as u64, len as u64, inner as u64, size as i64, check.ptr());
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&ip).arg(&dst).arg(&n64).arg(&len64).arg(&inner64).arg(&size64).arg(&err);
        // SAFETY: matches index_add_* in index.cu; indices are checked before they address `acc`.
        unsafe { b.launch(strided_config(n, BLOCK)) }.map_err(launch_failed(&name))?;
        check.finish(op, dim, size)?;
        Ok(acc)
    }
}
