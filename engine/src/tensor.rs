//! `Tensor`: shared storage + a layout (shape, strides, offset) + dtype + device. Views (reshape of
//! contiguous data, permute, narrow, broadcast, squeeze) share the storage; everything else makes a
//! new one. Tensors are immutable to users except through the explicit in-place ops.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::cpu::CpuStorage;
use crate::layout::{resolve_dim, Layout};
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, WithDType};

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor[{:?}, {}, {}]", self.shape(), self.dtype, self.device)
    }
}

impl Tensor {
    // ---- construction -------------------------------------------------------------------------

    /// A tensor over a whole new storage with a contiguous layout.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if storage.len() != n {
            return Err(Error::ElementCount { op: "from_storage", shape: shape.to_vec(), expected: n, got: storage.len() });
        }
        Ok(Tensor { dtype: storage.dtype(), device: storage.device(), storage: Arc::new(RwLock::new(storage)), layout: Layout::contiguous(shape) })
    }

    /// A view of `self`'s storage with another layout (the caller checks it stays in bounds).
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        debug_assert!(layout.storage_extent() <= self.read_storage().len());
        Tensor { storage: self.storage.clone(), layout, dtype: self.dtype, device: self.device }
    }

    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize], device: Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::ElementCount { op: "from_vec", shape: shape.to_vec(), expected: n, got: data.len() });
        }
        Tensor::from_storage(Storage::Cpu(CpuStorage::from_vec(data)), shape)?.to_device(device)
    }

    pub fn from_slice<T: WithDType>(data: &[T], shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    pub fn scalar<T: WithDType>(v: T, device: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![v], &[], device)
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = shape.iter().product();
        match device {
            Device::Cpu => Tensor::from_storage(Storage::Cpu(CpuStorage::zeros(dtype, n)), shape),
            Device::Cuda(_) => Tensor::from_storage(Storage::Cuda(crate::cuda::CudaStorage::zeros(device, dtype, n)?), shape),
        }
    }

    pub fn full(value: f64, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let t = match dtype {
            DType::F32 => Tensor::from_vec(vec![value as f32; n], shape, Device::Cpu)?,
            DType::BF16 => Tensor::from_vec(vec![half::bf16::from_f64(value); n], shape, Device::Cpu)?,
            DType::F16 => Tensor::from_vec(vec![half::f16::from_f64(value); n], shape, Device::Cpu)?,
            DType::I64 => Tensor::from_vec(vec![value as i64; n], shape, Device::Cpu)?,
            DType::U8 => Tensor::from_vec(vec![value as u8; n], shape, Device::Cpu)?,
        };
        t.to_device(device)
    }

    pub fn ones(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape(), self.dtype, self.device)
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape(), self.dtype, self.device)
    }

    /// 0, 1, ..., n-1 as i64.
    pub fn arange(n: usize, device: Device) -> Result<Tensor> {
        Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), &[n], device)
    }

    // ---- accessors ----------------------------------------------------------------------------

    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn dim(&self, d: isize) -> Result<usize> {
        Ok(self.shape()[resolve_dim("dim", d, self.rank())?])
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn strides(&self) -> &[usize] {
        self.layout.strides()
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }
    /// True when both tensors view the same storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    pub fn read_storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.storage.read().unwrap_or_else(|e| e.into_inner())
    }
    pub fn write_storage(&self) -> RwLockWriteGuard<'_, Storage> {
        self.storage.write().unwrap_or_else(|e| e.into_inner())
    }

    /// True when this CPU tensor's storage is a zero-copy window into a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(&*self.read_storage(), Storage::Cpu(s) if s.is_mapped())
    }

    // ---- checks used by ops -------------------------------------------------------------------

    pub(crate) fn same_device(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.device != other.device {
            return Err(Error::DeviceMismatch { op, lhs: self.device, rhs: other.device });
        }
        Ok(())
    }
    pub(crate) fn same_dtype(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.dtype != other.dtype {
            return Err(Error::DTypeMismatch { op, lhs: self.dtype, rhs: other.dtype });
        }
        Ok(())
    }
    pub(crate) fn float_only(&self, op: &'static str) -> Result<()> {
        if !self.dtype.is_float() {
            return Err(Error::UnsupportedDType { op, dtype: self.dtype });
        }
        Ok(())
    }

    // ---- reading values back ------------------------------------------------------------------

    /// The elements in row-major order; `T` must be the tensor's dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch { op: "to_vec", lhs: self.dtype, rhs: T::DTYPE });
        }
        let cpu = self.to_device(Device::Cpu)?;
        let guard = cpu.read_storage();
        let Storage::Cpu(s) = &*guard else { unreachable!("moved to the CPU above") };
        let data = s.as_slice::<T>()?;
        Ok(match cpu.layout.contiguous_range() {
            Some(r) => data[r].to_vec(),
            None => cpu.layout.strided_indices().map(|i| data[i]).collect(),
        })
    }

    /// The elements in row-major order, converted to f32 whatever the dtype.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_dtype(DType::F32)?.to_vec::<f32>()
    }

    /// The single element of a one-element tensor, as f32.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(Error::BadShape { op: "to_scalar", msg: "expected one element".into(), shape: self.shape().to_vec() });
        }
        Ok(self.to_vec_f32()?[0])
    }

    /// Runs `f` on this CPU tensor's elements as a contiguous row-major f32 slice, borrowing the
    /// storage when it already is one and converting otherwise.
    pub fn with_cpu_f32<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        {
            let guard = self.read_storage();
            let Storage::Cpu(s) = &*guard else {
                return Err(Error::DeviceMismatch { op: "with_cpu_f32", lhs: self.device, rhs: Device::Cpu });
            };
            if self.dtype == DType::F32 {
                if let Some(r) = self.layout.contiguous_range() {
                    return f(&s.as_slice::<f32>()?[r]);
                }
            }
        }
        f(&self.to_vec_f32()?)
    }

    /// A CPU tensor of `dtype` from f32 values computed by a CPU op.
    pub fn from_f32_vec(data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(data, shape, Device::Cpu)?.to_dtype(dtype)
    }

    // ---- movement ----------------------------------------------------------------------------

    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device {
            return Ok(self.clone());
        }
        match (self.device, device) {
            (Device::Cpu, Device::Cuda(_)) => {
                let c = self.contiguous()?;
                let guard = c.read_storage();
                let Storage::Cpu(s) = &*guard else { unreachable!() };
                let r = c.layout.contiguous_range().expect("contiguous");
                let sz = c.dtype.size_in_bytes();
                let storage = crate::cuda::CudaStorage::upload(device, c.dtype, &s.bytes()[r.start * sz..r.end * sz])?;
                Tensor::from_storage(Storage::Cuda(storage), c.shape())
            }
            (Device::Cuda(_), Device::Cpu) => {
                let c = self.contiguous()?;
                let guard = c.read_storage();
                let Storage::Cuda(s) = &*guard else { unreachable!() };
                let r = c.layout.contiguous_range().expect("contiguous");
                let bytes = s.download(r)?;
                Tensor::from_storage(Storage::Cpu(CpuStorage::from_bytes(c.dtype, &bytes)?), c.shape())
            }
            (Device::Cuda(_), Device::Cuda(_)) => self.to_device(Device::Cpu)?.to_device(device),
            (Device::Cpu, Device::Cpu) => unreachable!(),
        }
    }

    // ---- views ------------------------------------------------------------------------------

    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(Error::ElementCount { op: "reshape", shape: shape.to_vec(), expected: n, got: self.elem_count() });
        }
        match self.layout.reshape(shape) {
            Some(l) => Ok(self.with_layout(l)),
            None => self.contiguous()?.reshape(shape),
        }
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.permute(dims)?))
    }

    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let rank = self.rank();
        let (a, b) = (resolve_dim("transpose", d0, rank)?, resolve_dim("transpose", d1, rank)?);
        let mut dims: Vec<usize> = (0..rank).collect();
        dims.swap(a, b);
        self.permute(&dims)
    }

    /// Transpose of the last two dimensions.
    pub fn t(&self) -> Result<Tensor> {
        self.transpose(-2, -1)
    }

    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = resolve_dim("narrow", dim, self.rank())?;
        Ok(self.with_layout(self.layout.narrow(d, start, len)?))
    }

    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.broadcast_to(shape)?))
    }

    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_dim("unsqueeze", dim, self.rank() + 1)?;
        let mut shape = self.shape().to_vec();
        let mut strides = self.strides().to_vec();
        let stride = if d < self.rank() { strides[d] * shape[d] } else { 1 };
        shape.insert(d, 1);
        strides.insert(d, stride);
        Ok(self.with_layout(Layout::new(shape, strides, self.layout.offset())))
    }

    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_dim("squeeze", dim, self.rank())?;
        if self.shape()[d] != 1 {
            return Err(Error::BadShape { op: "squeeze", msg: format!("dimension {d} is not of size 1"), shape: self.shape().to_vec() });
        }
        let mut shape = self.shape().to_vec();
        let mut strides = self.strides().to_vec();
        shape.remove(d);
        strides.remove(d);
        Ok(self.with_layout(Layout::new(shape, strides, self.layout.offset())))
    }

    /// Merges dimensions `start..=end` into one.
    pub fn flatten(&self, start: isize, end: isize) -> Result<Tensor> {
        if self.rank() == 0 {
            return self.reshape(&[1]);
        }
        let (s, e) = (resolve_dim("flatten", start, self.rank())?, resolve_dim("flatten", end, self.rank())?);
        let shape = self.shape();
        let mut new: Vec<usize> = shape[..s].to_vec();
        new.push(shape[s..=e].iter().product());
        new.extend_from_slice(&shape[e + 1..]);
        self.reshape(&new)
    }

    /// A row-major contiguous tensor with the same values (`self` when it already is one).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        self.copy()
    }
}
