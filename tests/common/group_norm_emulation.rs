//! Shared by the group-norm emulator suites (tests/group_norm_emulated.rs,
//! tests/group_norm_backward_emulated.rs): the kernels' block and pack constants, the element
//! types, 16-byte aligned buffers of them, and the test shape. Included with
//! `#[path = "common/group_norm_emulation.rs"] mod group_norm_emulation;` next to `mod emulation`.
#![allow(dead_code)]

use crate::emulation::{Aligned, Half};

/// Threads of a CTA (GNC_BLOCK) and the cluster kernels' packs-per-thread instances (GNC_KERNELS,
/// GNC_BWD_KERNELS).
pub const BLOCK: usize = 256;
pub const PACKS: [usize; 5] = [2, 4, 8, 12, 16];

#[derive(Clone, Copy, Debug)]
pub enum Dt {
    F32,
    Half(Half),
}

impl Dt {
    pub fn name(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::Half(h) => h.name(),
        }
    }
    /// Elements of a 16-byte pack.
    pub fn pack(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Half(_) => 8,
        }
    }
    pub fn round(self, v: &[f32]) -> Vec<f32> {
        match self {
            Dt::F32 => v.to_vec(),
            Dt::Half(h) => h.round(v),
        }
    }
    /// (atol, rtol) of a result (y, dx) against the f32 reference on the same (rounded) inputs: one
    /// rounding to the dtype plus f32 accumulation-order noise (and __expf in the 16-bit SiLU).
    pub fn tolerance(self) -> (f32, f32) {
        match self {
            Dt::F32 => (2e-5, 2e-5),
            Dt::Half(h) => (2e-4, h.unit_roundoff() + 2e-5),
        }
    }
}

/// A tensor of the kernel's dtype in a 16-byte aligned buffer.
pub enum Buf {
    F32(Aligned<f32>),
    U16(Aligned<u16>, Half),
}

impl Buf {
    pub fn new(dt: Dt, v: &[f32]) -> Buf {
        match dt {
            Dt::F32 => Buf::F32(Aligned::from(v)),
            Dt::Half(h) => Buf::U16(Aligned::from(&v.iter().map(|&x| h.bits(x)).collect::<Vec<_>>()), h),
        }
    }
    pub fn addr(&self) -> u64 {
        match self {
            Buf::F32(a) => a.addr(),
            Buf::U16(a, _) => a.addr(),
        }
    }
    pub fn values(&self) -> Vec<f32> {
        match self {
            Buf::F32(a) => a.to_vec(),
            Buf::U16(a, h) => a.as_ref().iter().map(|&b| h.value(b)).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
}
