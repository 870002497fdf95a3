//! `CudaStorage`: a pooled device block holding `len` elements of one dtype.

use std::sync::Arc;

use super::alloc::CudaBlock;
use super::device::{device, CudaDevice};
use crate::{DType, Device, Error, Result};

pub struct CudaStorage {
    block: CudaBlock,
    dtype: DType,
    len: usize,
}

fn cuda_ordinal(device: Device, op: &'static str) -> Result<usize> {
    match device {
        Device::Cuda(n) => Ok(n),
        Device::Cpu => Err(Error::DeviceMismatch { op, lhs: device, rhs: Device::Cuda(0) }),
    }
}

impl CudaStorage {
    /// `len` uninitialised elements on `dev` (for kernel outputs that write every element).
    pub fn alloc(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(dtype.size_in_bytes()).ok_or_else(|| Error::Cuda(format!("{len} {dtype} elements overflow the address space")))?;
        Ok(CudaStorage { block: dev.alloc(bytes)?, dtype, len })
    }

    /// Wraps a block that holds at least `len` elements of `dtype`.
    pub fn from_block(block: CudaBlock, dtype: DType, len: usize) -> Result<Self> {
        if block.capacity() < len * dtype.size_in_bytes() {
            return Err(Error::Cuda(format!("a block of {} bytes cannot hold {len} {dtype} elements", block.capacity())));
        }
        Ok(CudaStorage { block, dtype, len })
    }

    pub fn zeros(device: Device, dtype: DType, len: usize) -> Result<Self> {
        let dev = self::device(cuda_ordinal(device, "zeros")?)?;
        let s = Self::alloc(&dev, dtype, len)?;
        dev.memset(s.device_ptr(), 0, len * dtype.size_in_bytes())?;
        Ok(s)
    }

    /// Copies little-endian element bytes (e.g. a CPU tensor or a memory-mapped weight) to the device.
    pub fn upload(device: Device, dtype: DType, bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size_in_bytes()) {
            return Err(Error::Cuda(format!("upload: {} bytes is not a whole number of {dtype} elements", bytes.len())));
        }
        let dev = self::device(cuda_ordinal(device, "upload")?)?;
        let s = Self::alloc(&dev, dtype, bytes.len() / dtype.size_in_bytes())?;
        dev.copy_htod(s.device_ptr(), bytes)?;
        Ok(s)
    }

    /// The bytes of elements `range` (waits for queued work).
    pub fn download(&self, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::Cuda(format!("download: elements {range:?} out of a storage of {}", self.len)));
        }
        let size = self.dtype.size_in_bytes();
        let mut out = vec![0u8; range.len() * size];
        if !out.is_empty() {
            self.device().copy_dtoh(&mut out, self.ptr_at(range.start))?;
        }
        Ok(out)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn ordinal(&self) -> usize {
        self.block.device().ordinal()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        self.block.device()
    }
    pub fn block(&self) -> &CudaBlock {
        &self.block
    }
    /// Device address of element 0.
    pub fn device_ptr(&self) -> u64 {
        self.block.ptr()
    }
    /// Device address of element `offset` (a layout's offset is in elements).
    pub fn ptr_at(&self, offset: usize) -> u64 {
        self.block.ptr() + (offset * self.dtype.size_in_bytes()) as u64
    }
}
