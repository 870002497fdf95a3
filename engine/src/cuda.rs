//! CUDA backend — interface only until the CUDA backend issue lands it (owned by that work).
//! Every constructor errors, so no CUDA storage can exist yet.

use kernels::elementwise::{BinaryOp, CmpOp, UnaryOp};

use crate::{DType, Device, Error, Layout, Result};

pub struct CudaStorage {
    never: std::convert::Infallible,
}

fn unavailable() -> Error {
    Error::Cuda("the CUDA backend is not built into this version".into())
}

impl CudaStorage {
    pub fn zeros(_device: Device, _dtype: DType, _len: usize) -> Result<Self> {
        Err(unavailable())
    }
    pub fn upload(_device: Device, _dtype: DType, _bytes: &[u8]) -> Result<Self> {
        Err(unavailable())
    }
    pub fn dtype(&self) -> DType {
        match self.never {}
    }
    pub fn ordinal(&self) -> usize {
        match self.never {}
    }
    pub fn len(&self) -> usize {
        match self.never {}
    }
    pub fn download(&self, _range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        match self.never {}
    }
    pub fn copy_strided(&self, _l: &Layout) -> Result<Self> {
        match self.never {}
    }
    pub fn cast(&self, _l: &Layout, _dtype: DType) -> Result<Self> {
        match self.never {}
    }
    pub fn unary(&self, _l: &Layout, _op: UnaryOp) -> Result<Self> {
        match self.never {}
    }
    pub fn binary(&self, _la: &Layout, _b: &Self, _lb: &Layout, _op: BinaryOp) -> Result<Self> {
        match self.never {}
    }
    pub fn cmp(&self, _la: &Layout, _b: &Self, _lb: &Layout, _op: CmpOp) -> Result<Self> {
        match self.never {}
    }
    pub fn where_cond(&self, _lm: &Layout, _t: &Self, _lt: &Layout, _f: &Self, _lf: &Layout) -> Result<Self> {
        match self.never {}
    }
}

/// The error an op returns on CUDA tensors until its kernel is wired in by the CUDA backend work.
pub fn not_yet(op: &str) -> Error {
    Error::Cuda(format!("{op} has no CUDA implementation in this build"))
}
