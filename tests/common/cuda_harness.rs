//! The harness shared by the GPU parity suites (tests/cuda_parity*.rs): the device under test, the
//! CPU-vs-device comparison, per-dtype tolerance tables and deterministic random inputs. Included
//! by each suite with `#[path = "common/cuda_harness.rs"] mod cuda_harness;` (a subfolder, so Cargo
//! does not build it as a test target of its own); not every suite uses every item.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use engine::{DType, Device, Result, Tensor};
use kernels::elementwise::UnaryOp;

/// The device to test on and a lock that serializes the GPU tests (the allocator-statistics
/// checks need the device to themselves), or None after printing why the test is skipped
/// (scripts/gpu-check.sh greps for "skipped: no CUDA device"). `LOOKAHEAD_PARITY_ON_CPU=1` runs
/// every case CPU against CPU instead: a check of the test cases themselves (views, shapes) on
/// machines without a GPU.
pub fn gpu(test: &str) -> Option<(Device, MutexGuard<'static, ()>)> {
    if std::env::var_os("LOOKAHEAD_PARITY_ON_CPU").is_some_and(|v| v == "1") {
        return Some((Device::Cpu, lock()));
    }
    cuda(test)
}

/// As `gpu`, for tests that need the CUDA device itself (allocator statistics, timers): never
/// the CPU stand-in. Where no CUDA driver is installed, the device is the CUDA emulator
/// (kernels/emu/driver: our kernels from their source on the CPU, cuBLASLt / cuDNN as plain
/// loops), so that the engine's whole CUDA backend runs against the CPU backend without a GPU;
/// `LOOKAHEAD_TEST_EMULATOR=0` skips instead.
pub fn cuda(test: &str) -> Option<(Device, MutexGuard<'static, ()>)> {
    select_device();
    match engine::cuda::probe() {
        Ok(_) => Some((Device::Cuda(0), lock())),
        Err(e) => {
            lookahead::show(&format!("{test}: skipped: no CUDA device ({e})"));
            None
        }
    }
}

/// As `cuda`, for timing reports: skipped on the emulator, which times nothing.
pub fn cuda_timed(test: &str) -> Option<(Device, MutexGuard<'static, ()>)> {
    let (dev, guard) = cuda(test)?;
    if emulated() {
        lookahead::show(&format!("{test}: skipped: a timing report needs a GPU (the device is the CUDA emulator)"));
        return None;
    }
    Some((dev, guard))
}

/// True when cuda:0 is the CUDA emulator.
pub fn emulated() -> bool {
    engine::cuda::device_info(0).is_ok_and(|i| i.name.starts_with(lookahead_cuda_emulator::DEVICE_NAME))
}

/// Chooses, once per process and before the engine probes for CUDA, between the installed
/// driver and the emulator (see `cuda`). A test that probes the engine itself must call this
/// first: the engine caches its first probe.
pub fn select_device() {
    static SELECTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    SELECTED.get_or_init(|| {
        if std::env::var_os("LOOKAHEAD_CUDA_LIB").is_some() || std::env::var_os("LOOKAHEAD_TEST_EMULATOR").is_some_and(|v| v == "0") {
            return;
        }
        // SAFETY: loading the driver library runs only its own initialisers; dropped at once.
        let driver = cudarc::get_lib_name_candidates("cuda").iter().any(|name| unsafe { libloading::Library::new(name) }.is_ok());
        if driver {
            return;
        }
        let chosen = lookahead_cuda_emulator::built_library()
            .ok_or_else(|| "liblookahead_cuda_emulator.so is not next to the test binary".to_string())
            .and_then(|lib| kernels::emulate::find_compiler().map_err(|e| e.to_string()).map(|_| lib))
            .and_then(|lib| lookahead_cuda_emulator::use_emulator(&lib));
        match chosen {
            Ok(_) => lookahead::show("no CUDA driver: the CUDA tests run on the CUDA emulator (kernels/emu/driver)"),
            Err(e) => lookahead::show(&format!("no CUDA driver, and the CUDA emulator is unavailable: {e}")),
        }
    });
}

fn lock() -> MutexGuard<'static, ()> {
    static GPU: Mutex<()> = Mutex::new(());
    GPU.lock().unwrap_or_else(|e| e.into_inner())
}

/// (atol, rtol) per float result dtype; integer results are compared exactly. Each suite keeps
/// its own table (its ops accumulate differently).
pub struct Tolerances {
    pub f32: (f32, f32),
    pub f16: (f32, f32),
    pub bf16: (f32, f32),
}

impl Tolerances {
    pub fn of(&self, dtype: DType) -> (f32, f32) {
        match dtype {
            DType::F32 => self.f32,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
            DType::I64 | DType::U8 => (0.0, 0.0),
        }
    }
}

/// Runs `run` on the CPU and on `dev`, and compares the results within `tol` (atol, rtol).
pub fn check_tol(dev: Device, label: &str, tol: (f32, f32), run: impl Fn(Device) -> Result<Tensor>) {
    let want = run(Device::Cpu).unwrap_or_else(|e| panic!("{label} on cpu: {e}"));
    let got = run(dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
    assert_eq!(got.device(), dev, "{label}: result left the device");
    assert_eq!(got.dtype(), want.dtype(), "{label}: dtype");
    lookahead::assert_close(label, &got.to_device(Device::Cpu).unwrap(), &want, tol.0, tol.1);
}

/// Deterministic pseudo-random values in [lo, hi) (SplitMix64), the same on every run.
pub fn values(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// A `dtype` tensor of `shape` on `device` with values in [lo, hi) (integers: truncated).
pub fn input(shape: &[usize], dtype: DType, lo: f32, hi: f32, seed: u64, device: Device) -> Result<Tensor> {
    let v = values(shape.iter().product(), lo, hi, seed);
    let t = match dtype {
        DType::I64 => Tensor::from_vec(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), shape, Device::Cpu)?,
        DType::U8 => Tensor::from_vec(v.iter().map(|&x| x.clamp(0.0, 255.0) as u8).collect::<Vec<_>>(), shape, Device::Cpu)?,
        _ => Tensor::from_vec(v, shape, Device::Cpu)?.to_dtype(dtype)?,
    };
    t.to_device(device)
}

/// A view of a stored test tensor (transposed, narrowed, permuted, broadcast, ...).
pub type View = fn(&Tensor) -> Result<Tensor>;

pub const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
pub const ALL: [DType; 5] = [DType::F32, DType::BF16, DType::F16, DType::I64, DType::U8];

/// Every UnaryOp with an input range inside its domain (forward; the backward suite moves the
/// ranges that start at 0 off it, where sqrt' and powf' blow up).
pub const UNARY: &[(UnaryOp, f32, f32)] = &[
    (UnaryOp::Neg, -4.0, 4.0),
    (UnaryOp::Abs, -4.0, 4.0),
    (UnaryOp::Sqr, -4.0, 4.0),
    (UnaryOp::Sqrt, 0.0, 9.0),
    (UnaryOp::Rsqrt, 0.1, 9.0),
    (UnaryOp::Recip, 0.25, 4.0),
    (UnaryOp::Exp, -8.0, 8.0),
    (UnaryOp::Log, 0.01, 100.0),
    (UnaryOp::Sin, -10.0, 10.0),
    (UnaryOp::Cos, -10.0, 10.0),
    (UnaryOp::Tanh, -5.0, 5.0),
    (UnaryOp::Sigmoid, -10.0, 10.0),
    (UnaryOp::Silu, -10.0, 10.0),
    (UnaryOp::Relu, -4.0, 4.0),
    (UnaryOp::Gelu, -6.0, 6.0),
    (UnaryOp::GeluTanh, -6.0, 6.0),
    (UnaryOp::Affine { mul: 1.5, add: -0.25 }, -4.0, 4.0),
    (UnaryOp::Powf(1.7), 0.0, 4.0),
    (UnaryOp::Clamp { min: -0.5, max: 1.25 }, -4.0, 4.0),
    (UnaryOp::LeakyRelu(0.2), -4.0, 4.0),
];

/// GB/s of `f`, which moves `bytes`, timed with CUDA events over 10 runs after a warm-up (the
/// bandwidth reports' measure).
pub fn gb_per_s(cuda: &std::sync::Arc<engine::cuda::CudaDevice>, bytes: usize, f: &dyn Fn()) -> f64 {
    f();
    cuda.synchronize().unwrap();
    let iters = 10;
    let timer = cuda.start_timer().unwrap();
    for _ in 0..iters {
        f();
    }
    let ms = timer.stop().unwrap() as f64 / iters as f64;
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// Sets the experimental and Hopper kernel switches (engine::cuda) for its lifetime and puts back
/// what they were, also when a check panics.
pub struct KernelSwitches {
    experimental: bool,
    hopper: bool,
}

impl KernelSwitches {
    pub fn set(experimental: bool, hopper: bool) -> KernelSwitches {
        let old = KernelSwitches { experimental: engine::cuda::experimental_kernels(), hopper: engine::cuda::hopper_kernels() };
        engine::cuda::set_experimental_kernels(experimental);
        engine::cuda::set_hopper_kernels(hopper);
        old
    }
}

impl Drop for KernelSwitches {
    fn drop(&mut self) {
        engine::cuda::set_experimental_kernels(self.experimental);
        engine::cuda::set_hopper_kernels(self.hopper);
    }
}

/// Whether `dev` is a compute capability 9.0 GPU, where the Hopper (wgmma) kernels run (the CPU
/// stand-in of LOOKAHEAD_PARITY_ON_CPU counts as one: it checks the cases); otherwise prints why
/// `test` skips.
pub fn hopper_device(dev: Device, test: &str) -> bool {
    let Device::Cuda(ordinal) = dev else { return true };
    let arch = engine::cuda::device(ordinal).unwrap().arch();
    if arch != 90 {
        lookahead::show(&format!("{test}: skipped: compute capability {}.{}, the Hopper kernel needs 9.0", arch / 10, arch % 10));
    }
    arch == 90
}
