//! The CUDA backend: device probe and info, one context + stream per device (created lazily,
//! cached for the process), a caching allocator, CUDA events for timing, the loader of our
//! NVRTC-compiled kernel families, and `CudaStorage` with the element-wise ops.
//!
//! Everything is loaded dynamically (cudarc with dynamic loading, NVRTC via kernels::compile): the
//! engine builds and runs without CUDA, and asking for a GPU where there is none is an
//! `Error::Cuda` that says why, never a panic.
//!
//! How an op gets a CUDA arm (see elementwise.rs for the full pattern):
//! ```text
//! use crate::cuda::{CudaStorage, launch_1d, launch_failed, PushKernelArg};
//! let dev = x.device();                                   // &Arc<CudaDevice>
//! let out = CudaStorage::alloc(dev, DType::F32, n)?;      // pooled, uninitialised
//! let f = dev.function(&kernels::softmax::SOURCE, "softmax_f32")?; // compiled + loaded once
//! let (src, dst, n64) = (x.ptr_at(layout.offset()), out.device_ptr(), n as u64);
//! let mut b = dev.launch_builder(&f);
//! b.arg(&src).arg(&dst).arg(&n64);
//! unsafe { b.launch(launch_1d(n, 256)) }.map_err(launch_failed("softmax_f32"))?;
//! ```
//! All work goes on the device's one stream (`CudaDevice::stream`): the allocator hands a freed
//! block to the next allocation at once, which is safe only because the stream orders every use.
//! Work on another stream must first wait for this one (and this one for it) with events.

mod alloc;
mod device;
mod elementwise;
// cuBLASLt GEMMs, cuDNN convolutions, and the loader of those libraries (helper C1).
pub mod conv;
pub mod gemm;
pub mod lora_linear;
pub mod libs;
mod elementwise_backward;
pub mod flash_attention;
pub mod flash_attention_backward;
mod index;
mod launch;
mod profile;
// Reductions, softmax, norms (+ backward), GEGLU, PReLU, RNG (helper C2).
pub mod norm;
mod spatial;
mod storage;
// TMA tensor maps (cuTensorMapEncodeTiled) from the description the CPU emulator also takes.
pub mod tensor_map;
pub mod tune;

pub use alloc::{size_class, CudaBlock, MemoryStats};
pub use device::{device, device_count, device_info, is_available, probe, CudaDevice, DeviceInfo, GpuTimer};
pub use profile::{aggregate, KernelTime};
pub use launch::{launch_1d, launch_failed, strided_config, ElementwisePlan, StridedArgs, MAX_DIMS};
pub use norm::group_norm_forward_path;
pub use storage::CudaStorage;
pub use elementwise_backward::adamw_step;
pub use spatial::PoolKind;

// The cudarc pieces an op's CUDA arm needs, so that callers need not name cudarc themselves.
pub use cudarc::driver::{CudaEvent, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::Error;

/// A process-wide on/off switch read once from an environment variable (`NAME=0` is off, `NAME=1`
/// on, unset the default) unless set first by the program.
struct KernelSwitch {
    env: &'static str,
    default: bool,
    /// 0: not read yet, 1: off, 2: on.
    state: std::sync::atomic::AtomicU8,
}

impl KernelSwitch {
    const fn new(env: &'static str, default: bool) -> Self {
        KernelSwitch { env, default, state: std::sync::atomic::AtomicU8::new(0) }
    }
    fn get(&self) -> bool {
        use std::sync::atomic::Ordering;
        match self.state.load(Ordering::Relaxed) {
            0 => {
                let on = match std::env::var(self.env).as_deref() {
                    Ok("0") => false,
                    Ok("1") => true,
                    _ => self.default,
                };
                self.set(on);
                on
            }
            v => v == 2,
        }
    }
    fn set(&self, on: bool) {
        self.state.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
    }
}

static EXPERIMENTAL: KernelSwitch = KernelSwitch::new("LOOKAHEAD_EXPERIMENTAL_KERNELS", true);
static HOPPER: KernelSwitch = KernelSwitch::new("LOOKAHEAD_HOPPER_KERNELS", true);

/// Our performance kernels (written for speed, first verified on an H200 on 2026-11-28: parity
/// suites passed, bench rows in benches/RESULTS.md) are on by default; `LOOKAHEAD_EXPERIMENTAL_KERNELS=0`
/// or `set_experimental_kernels(false)` switches them off, so that every op takes the library or
/// composed path instead (for A/B comparisons; the parity suite runs both). Behind the switch:
/// the packed-register 16-bit softmax / layer norm rows, the single-launch thread-block-cluster
/// group norm (sm_90, where it pays), flash attention forward/backward and the fused LoRA GEMM
/// (mma.sync, sm_80+).
pub fn experimental_kernels() -> bool {
    EXPERIMENTAL.get()
}

/// Switches the experimental kernels on or off for the whole process (see `experimental_kernels`).
pub fn set_experimental_kernels(on: bool) {
    EXPERIMENTAL.set(on)
}

/// The Hopper (sm_90a: wgmma warpgroup MMA) variants of the performance kernels: on by default
/// (`LOOKAHEAD_HOPPER_KERNELS=0` or `set_hopper_kernels(false)` is off). They apply only on compute
/// capability 9.0 devices and only where the experimental kernels are on too (they replace those
/// kernels' mma.sync versions).
pub fn hopper_kernels() -> bool {
    HOPPER.get() && experimental_kernels()
}

/// Switches the Hopper kernels on or off for the whole process (see `hopper_kernels`).
pub fn set_hopper_kernels(on: bool) {
    HOPPER.set(on)
}

/// The variant of kernel family `family` asked for by the environment variable
/// `LOOKAHEAD_VARIANT_<FAMILY>` (upper case; e.g. `LOOKAHEAD_VARIANT_FLASH_FWD=poly`), or None for
/// the family's default. For benchmarking alternatives of one kernel on a GPU in the same run; each
/// family documents its variants and rejects unknown names with an error naming the variable.
pub fn kernel_variant(family: &str) -> Option<String> {
    std::env::var(format!("LOOKAHEAD_VARIANT_{}", family.to_ascii_uppercase())).ok().filter(|v| !v.is_empty())
}

/// The error an op returns on CUDA tensors until its kernel is wired in.
pub fn not_yet(op: &str) -> Error {
    Error::Cuda(format!("{op} has no CUDA implementation in this build"))
}

/// Maps a driver error to ours, naming what was being done.
pub(crate) fn driver_error(what: impl std::fmt::Display, e: DriverError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

// Tensors are shared across threads, so their storage must be.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<CudaStorage>();
    send_sync::<std::sync::Arc<CudaDevice>>();
};
