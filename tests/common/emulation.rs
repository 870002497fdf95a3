//! What the tests that run CUDA kernels on the CPU emulator (kernels::emulate) share: the
//! compiler check with its visible skip, 16-byte aligned host buffers (cp.async and vector loads
//! need them), deterministic input values, and the kernels' 16-bit float types.
#![allow(dead_code)]

use half::{bf16, f16};
use kernels::emulate::find_compiler;

/// False (after saying so) when there is no C++ compiler for the emulator; a failure under CI.
pub fn have_compiler(test: &str) -> bool {
    match find_compiler() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but the CUDA emulator has no compiler: {e}"),
        Err(e) => {
            lookahead::show(&format!("{test}: skipped: no C++ compiler ({e})"));
            false
        }
    }
}

/// `len` values of T in storage whose start is 16-byte aligned.
pub struct Aligned<T: Copy> {
    store: Vec<u128>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy> Aligned<T> {
    pub fn zeroed(len: usize) -> Self {
        let words = (len * std::mem::size_of::<T>()).div_ceil(16).max(1);
        Aligned { store: vec![0u128; words], len, _t: std::marker::PhantomData }
    }
    pub fn from(v: &[T]) -> Self {
        let mut a = Self::zeroed(v.len());
        a.as_mut().copy_from_slice(v);
        a
    }
    pub fn as_ref(&self) -> &[T] {
        // SAFETY: the store holds at least len T values and is 16-byte aligned; T is plain data.
        unsafe { std::slice::from_raw_parts(self.store.as_ptr() as *const T, self.len) }
    }
    pub fn as_mut(&mut self) -> &mut [T] {
        // SAFETY: as in as_ref, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.store.as_mut_ptr() as *mut T, self.len) }
    }
    pub fn to_vec(&self) -> Vec<T> {
        self.as_ref().to_vec()
    }
    /// The address the kernels get (host memory is the emulated device memory).
    pub fn addr(&self) -> u64 {
        self.store.as_ptr() as u64
    }
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), different per seed.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A 16-bit float type of the kernels (its elements travel as u16 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    /// The dtype's name in kernel names ("bf16", "f16").
    pub fn name(self) -> &'static str {
        match self {
            Half::Bf16 => "bf16",
            Half::F16 => "f16",
        }
    }
    /// The bits of `x` rounded to this type (to nearest even).
    pub fn bits(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => bf16::from_f32(x).to_bits(),
            Half::F16 => f16::from_f32(x).to_bits(),
        }
    }
    /// The value of bits of this type.
    pub fn value(self, b: u16) -> f32 {
        match self {
            Half::Bf16 => bf16::from_bits(b).to_f32(),
            Half::F16 => f16::from_bits(b).to_f32(),
        }
    }
    /// Values as this type holds them (rounded).
    pub fn round(self, x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| self.value(self.bits(v))).collect()
    }
    /// An upper bound of |round(v) - v| / |v| (half an ulp; normal numbers).
    pub fn unit_roundoff(self) -> f32 {
        match self {
            Half::Bf16 => 1.0 / 256.0,
            Half::F16 => 1.0 / 2048.0,
        }
    }
}
