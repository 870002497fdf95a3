//! The CPU backend: storage (owned or memory-mapped bytes) and the ops on it. Ops compute in f32
//! for every float dtype and convert at the boundaries; heavy loops run on rayon.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{DType, Error, Result, WithDType};

/// Bytes of owned CPU storage alive now, and the most alive at once since the last `reset_peak`
/// (memory-mapped storage is not counted). Process-wide; used by tests and memory reports.
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// (live bytes, peak bytes) of owned CPU storage.
pub fn memory_stats() -> (usize, usize) {
    (LIVE_BYTES.load(Ordering::Relaxed), PEAK_BYTES.load(Ordering::Relaxed))
}

/// Sets the peak to the current live bytes.
pub fn reset_peak() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// An owned typed vector, counted in LIVE_BYTES while it exists.
fn owned(v: OwnedVec) -> CpuBytes {
    let bytes = v.capacity_bytes();
    let live = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
    CpuBytes::Owned(v)
}

impl Drop for CpuBytes {
    fn drop(&mut self) {
        if let CpuBytes::Owned(v) = self {
            LIVE_BYTES.fetch_sub(v.capacity_bytes(), Ordering::Relaxed);
        }
    }
}

/// Bytes of one dtype: an owned vector of that element type, or a zero-copy window into a
/// memory-mapped file.
pub struct CpuStorage {
    bytes: CpuBytes,
    dtype: DType,
}

enum CpuBytes {
    Owned(OwnedVec),
    Mapped { map: Arc<memmap2::Mmap>, start: usize, len_bytes: usize },
}

/// Kept as the vector an op produced (no copy into another buffer), typed so that its allocation
/// is aligned for its elements.
enum OwnedVec {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

macro_rules! owned_vec_apply {
    ($v:expr, |$x:ident| $body:expr) => {
        match $v {
            OwnedVec::F32($x) => $body,
            OwnedVec::BF16($x) => $body,
            OwnedVec::F16($x) => $body,
            OwnedVec::I64($x) => $body,
            OwnedVec::U8($x) => $body,
        }
    };
}

impl OwnedVec {
    fn zeros(dtype: DType, len: usize) -> Self {
        // vec![0; n] asks the allocator for zeroed pages: no separate fill pass.
        match dtype {
            DType::F32 => OwnedVec::F32(vec![0.0; len]),
            DType::BF16 => OwnedVec::BF16(vec![half::bf16::ZERO; len]),
            DType::F16 => OwnedVec::F16(vec![half::f16::ZERO; len]),
            DType::I64 => OwnedVec::I64(vec![0; len]),
            DType::U8 => OwnedVec::U8(vec![0; len]),
        }
    }
    fn from_vec<T: WithDType>(v: Vec<T>) -> Self {
        let any: Box<dyn std::any::Any> = Box::new(v);
        let any = match any.downcast::<Vec<f32>>() {
            Ok(v) => return OwnedVec::F32(*v),
            Err(a) => a,
        };
        let any = match any.downcast::<Vec<half::bf16>>() {
            Ok(v) => return OwnedVec::BF16(*v),
            Err(a) => a,
        };
        let any = match any.downcast::<Vec<half::f16>>() {
            Ok(v) => return OwnedVec::F16(*v),
            Err(a) => a,
        };
        let any = match any.downcast::<Vec<i64>>() {
            Ok(v) => return OwnedVec::I64(*v),
            Err(a) => a,
        };
        match any.downcast::<Vec<u8>>() {
            Ok(v) => OwnedVec::U8(*v),
            Err(_) => unreachable!("WithDType is implemented for exactly these five types"),
        }
    }
    fn capacity_bytes(&self) -> usize {
        fn of<T>(v: &Vec<T>) -> usize {
            v.capacity() * std::mem::size_of::<T>()
        }
        owned_vec_apply!(self, |v| of(v))
    }
    fn bytes(&self) -> &[u8] {
        owned_vec_apply!(self, |v| bytemuck::cast_slice(v.as_slice()))
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        owned_vec_apply!(self, |v| bytemuck::cast_slice_mut(v.as_mut_slice()))
    }
}

impl CpuStorage {
    /// Takes ownership of `v` without copying it.
    pub fn from_vec<T: WithDType>(v: Vec<T>) -> Self {
        CpuStorage { bytes: owned(OwnedVec::from_vec(v)), dtype: T::DTYPE }
    }

    pub fn zeros(dtype: DType, len: usize) -> Self {
        CpuStorage { bytes: owned(OwnedVec::zeros(dtype, len)), dtype }
    }

    /// Copies little-endian bytes of `dtype` elements.
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size_in_bytes()) {
            return Err(Error::msg(format!("{} bytes is not a whole number of {dtype} elements", bytes.len())));
        }
        let mut s = Self::zeros(dtype, bytes.len() / dtype.size_in_bytes());
        s.bytes_mut().copy_from_slice(bytes);
        Ok(s)
    }

    /// A zero-copy view of `len_bytes` bytes at `start` in a mapped file; `None` if the start is not
    /// aligned for the dtype (the caller then copies).
    pub fn mapped(map: Arc<memmap2::Mmap>, start: usize, len_bytes: usize, dtype: DType) -> Option<Self> {
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(dtype.size_in_bytes());
        (aligned && start + len_bytes <= map.len() && len_bytes.is_multiple_of(dtype.size_in_bytes()))
            .then_some(CpuStorage { bytes: CpuBytes::Mapped { map, start, len_bytes }, dtype })
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, CpuBytes::Mapped { .. })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.bytes().len() / self.dtype.size_in_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            CpuBytes::Owned(v) => v.bytes(),
            CpuBytes::Mapped { map, start, len_bytes } => &map[*start..*start + *len_bytes],
        }
    }

    /// Mutable bytes; a mapped storage is copied into owned memory first (copy on write).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        if let CpuBytes::Mapped { .. } = self.bytes {
            let copy = Self::from_bytes(self.dtype, self.bytes()).expect("length already validated");
            self.bytes = copy.bytes;
        }
        match &mut self.bytes {
            CpuBytes::Owned(v) => v.bytes_mut(),
            CpuBytes::Mapped { .. } => unreachable!("converted to owned above"),
        }
    }

    pub fn as_slice<T: WithDType>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch { op: "as_slice", lhs: self.dtype, rhs: T::DTYPE });
        }
        Ok(bytemuck::cast_slice(self.bytes()))
    }

    pub fn as_mut_slice<T: WithDType>(&mut self) -> Result<&mut [T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch { op: "as_mut_slice", lhs: self.dtype, rhs: T::DTYPE });
        }
        Ok(bytemuck::cast_slice_mut(self.bytes_mut()))
    }
}

/// Applies `$body` with `$s` bound to the typed slice of a `CpuStorage` and `$t` to its element type.
#[macro_export]
macro_rules! cpu_dispatch {
    ($storage:expr, |$s:ident : $t:ident| $body:expr) => {{
        let st: &$crate::cpu::CpuStorage = $storage;
        match st.dtype() {
            $crate::DType::F32 => { type $t = f32; let $s = st.as_slice::<f32>()?; $body }
            $crate::DType::BF16 => { type $t = half::bf16; let $s = st.as_slice::<half::bf16>()?; $body }
            $crate::DType::F16 => { type $t = half::f16; let $s = st.as_slice::<half::f16>()?; $body }
            $crate::DType::I64 => { type $t = i64; let $s = st.as_slice::<i64>()?; $body }
            $crate::DType::U8 => { type $t = u8; let $s = st.as_slice::<u8>()?; $body }
        }
    }};
}

/// Like `cpu_dispatch!` for the float dtypes only; other dtypes return `UnsupportedDType` for `$op`.
#[macro_export]
macro_rules! float_dispatch {
    ($storage:expr, $op:expr, |$s:ident : $t:ident| $body:expr) => {{
        let st: &$crate::cpu::CpuStorage = $storage;
        match st.dtype() {
            $crate::DType::F32 => { type $t = f32; let $s = st.as_slice::<f32>()?; $body }
            $crate::DType::BF16 => { type $t = half::bf16; let $s = st.as_slice::<half::bf16>()?; $body }
            $crate::DType::F16 => { type $t = half::f16; let $s = st.as_slice::<half::f16>()?; $body }
            dt => return Err($crate::Error::UnsupportedDType { op: $op, dtype: dt }),
        }
    }};
}

pub mod elementwise;
pub mod conv;
pub mod gemm;
