//! Launch of the fused LoRA GEMM (kernels/cuda/lora_linear.cu): C = [A1 | A2] · [B1 ; B2] (+ bias)
//! in one pass over C, the K loop running over the base operands and then the LoRA operands. The
//! op (engine/src/ops/lora_linear.rs) computes the skinny t = s x A^T / s u = s dy B with cuBLASLt
//! and calls `concat_gemm` for y (B side n-major) and dx (B side k-major).
//!
//! Launch: one 256-thread block per 128 x 128 tile of C, grid (ceil(N / 128), ceil(M / 128)) with
//! x over N so that neighbouring blocks share their A rows in L2; 64 KiB of dynamic shared memory
//! (4 cp.async stages), opted into once per (device, kernel).
//!
//! On compute capability 9.0 with `cuda::hopper_kernels()` on, the Hopper kernel
//! (kernels/cuda/lora_linear_hopper.cu, wgmma) runs instead: same arguments, 128 x 160 tiles, a
//! persistent grid of min(tiles, SMs) blocks of 256 threads, 217 KiB of dynamic shared memory.

use std::sync::Arc;

use kernels::compile::KernelSource;
use kernels::lora_linear::{self as klora, BLayout, LoraGemmArgs};

use super::device::CudaDevice;
use super::launch::launch_failed;
use super::storage::CudaStorage;
use super::{DeviceRepr, LaunchConfig, PushKernelArg};
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

const OP: &str = "lora_linear (CUDA fused GEMM)";

/// `LoraGemmArgs` as a kernel argument (the struct lives in the kernels crate, which knows nothing
/// of cudarc).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Args(LoraGemmArgs);

// SAFETY: a #[repr(C)] struct of integers, laid out as `LoraGemmArgs` in kernels/cuda/lora_linear.cuh.
unsafe impl DeviceRepr for Args {}

/// Whether the fused kernel can compute an [m, n] result over k1 base columns for this dtype on
/// this device: bf16/f16, n and k1 whole 16-byte chunks, sizes within the kernel's u32 indices and
/// grid, sm_80+ (cp.async, bf16 mma) with 64 KiB of shared memory a block.
pub fn fused_supported(dev: &CudaDevice, dtype: DType, m: usize, n: usize, k1: usize, k2: usize) -> bool {
    let fits = |v: usize| v < (1 << 31);
    matches!(dtype, DType::BF16 | DType::F16)
        && n.is_multiple_of(8)
        && k1.is_multiple_of(8)
        && m > 0
        && n > 0
        && fits(m)
        && fits(n)
        && fits(k1)
        && fits(k2)
        && m.div_ceil(klora::TILE_M) <= 65_535
        && dev.arch() >= 80
        && dev.max_shared_memory_per_block_optin() >= klora::SHARED_BYTES
}

/// The kernel that computes the GEMM on a device: its source, threads and dynamic shared memory.
struct Kernel {
    source: &'static KernelSource,
    hopper: bool,
    threads: u32,
    shared_bytes: u32,
}

/// The Hopper (wgmma) kernel for C [m, n] on compute capability 9.0 when `cuda::hopper_kernels()`
/// is on (and the device grants its shared memory, and the tiles fit its u32 count), else the
/// mma.sync kernel.
fn kernel_for(dev: &CudaDevice, m: usize, n: usize) -> Kernel {
    let hopper_fits = dev.max_shared_memory_per_block_optin() >= klora::HOPPER_SHARED_BYTES && klora::hopper_tiles(m, n) < (1 << 31);
    if super::hopper_kernels() && dev.arch() == 90 && hopper_fits {
        Kernel { source: &klora::HOPPER_SOURCE, hopper: true, threads: klora::HOPPER_THREADS, shared_bytes: klora::HOPPER_SHARED_BYTES }
    } else {
        Kernel { source: &klora::SOURCE, hopper: false, threads: klora::THREADS, shared_bytes: klora::SHARED_BYTES }
    }
}

/// Device address of a CUDA tensor's first element.
fn addr(t: &Tensor) -> Result<(u64, Arc<CudaDevice>)> {
    match &*t.read_storage() {
        Storage::Cuda(s) => Ok((s.ptr_at(t.layout().offset()), s.device().clone())),
        Storage::Cpu(_) => Err(Error::Cuda(format!("{OP}: operand is not on a CUDA device"))),
    }
}

/// `t` contiguous with its first element 16-byte aligned (a copy when it is not).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let c = t.contiguous()?;
    if addr(&c)?.0.is_multiple_of(16) {
        Ok(c)
    } else {
        c.copy()
    }
}

/// C [m, n] = a1 [m, k1] · B1 + a2 [m, k2] · B2 (+ bias [n]) with B1 / B2 = b1 / b2 read as
/// [n][k] rows (`NMajor`: b1 [n, k1], b2 [n, k2]) or [k][n] rows (`KMajor`: b1 [k1, n],
/// b2 [k2, n]). All operands CUDA tensors of one 16-bit dtype with exactly these shapes (checked
/// by the op), and `fused_supported` true.
#[allow(clippy::too_many_arguments)]
pub fn concat_gemm(a1: &Tensor, b1: &Tensor, a2: &Tensor, b2: &Tensor, bias: Option<&Tensor>, (m, n, k1, k2): (usize, usize, usize, usize), layout: BLayout) -> Result<Tensor> {
    let dtype = a1.dtype();
    let dt = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => return Err(Error::UnsupportedDType { op: OP, dtype: other }),
    };
    for (t, want) in [(a1, [m, k1]), (a2, [m, k2])] {
        if t.shape() != want {
            return Err(Error::ShapeMismatch { op: OP, lhs: t.shape().to_vec(), rhs: want.to_vec() });
        }
    }
    let (b1_shape, b2_shape) = match layout {
        BLayout::NMajor => ([n, k1], [n, k2]),
        BLayout::KMajor => ([k1, n], [k2, n]),
    };
    if b1.shape() != b1_shape || b2.shape() != b2_shape {
        return Err(Error::ShapeMismatch { op: OP, lhs: b1.shape().to_vec(), rhs: b1_shape.to_vec() });
    }
    let (a1, b1) = (aligned(a1)?, aligned(b1)?);
    let (pa1, dev) = addr(&a1)?;
    let (pb1, _) = addr(&b1)?;
    if !fused_supported(&dev, dtype, m, n, k1, k2) {
        return Err(Error::Cuda(format!("{OP}: unsupported sizes m {m} n {n} k1 {k1} k2 {k2} ({dtype}, sm_{})", dev.arch())));
    }
    // The LoRA operands: 16-byte rows when the rank allows (cp.async), else element loads. An
    // empty operand (rank 0) is never read.
    let a2 = a2.contiguous()?;
    let (pa2, _) = if k2 > 0 { addr(&a2)? } else { (0, dev.clone()) };
    let b2 = match layout {
        BLayout::KMajor if k2 > 0 => aligned(b2)?,
        _ => b2.contiguous()?,
    };
    let (pb2, _) = if k2 > 0 { addr(&b2)? } else { (0, dev.clone()) };
    let vec = |p: u64| (k2.is_multiple_of(8) && p.is_multiple_of(16)) as u32;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let pbias = match &bias {
        Some(b) => addr(b)?.0,
        None => 0,
    };
    let out = CudaStorage::alloc(&dev, dtype, m * n)?;
    let pc = out.device_ptr();
    if !pc.is_multiple_of(16) {
        return Err(Error::Cuda(format!("{OP}: output allocation not 16-byte aligned")));
    }
    let args = Args(LoraGemmArgs {
        a1: pa1,
        b1: pb1,
        a2: pa2,
        b2: pb2,
        bias: pbias,
        c: pc,
        m: m as u32,
        n: n as u32,
        k1: k1 as u32,
        k2: k2 as u32,
        lda1: k1 as u32,
        ldb1: match layout {
            BLayout::NMajor => k1 as u32,
            BLayout::KMajor => n as u32,
        },
        lda2: k2 as u32,
        ldb2: match layout {
            BLayout::NMajor => k2 as u32,
            BLayout::KMajor => n as u32,
        },
        ldc: n as u32,
        a2_vec: vec(pa2),
        b2_vec: match layout {
            BLayout::NMajor => vec(pb2),
            BLayout::KMajor => 1,
        },
        pad: 0,
    });
    let kernel = kernel_for(&dev, m, n);
    let (name, grid_dim) = if kernel.hopper {
        (klora::hopper_kernel_name(layout, dt), (klora::hopper_blocks(m, n, dev.multiprocessors()), 1, 1))
    } else {
        (klora::kernel_name(layout, dt), (n.div_ceil(klora::TILE_N) as u32, m.div_ceil(klora::TILE_M) as u32, 1))
    };
    let f = dev.function(kernel.source, &name)?;
    opt_in_shared(&dev, &f, &name, kernel.shared_bytes)?;
    let cfg = LaunchConfig { grid_dim, block_dim: (kernel.threads, 1, 1), shared_mem_bytes: kernel.shared_bytes };
    let mut b = dev.launch_builder(&f);
    b.arg(&args);
    // SAFETY: every pointer addresses a live CUDA buffer of the shape the args describe (checked
    // above; the tensors live until after the launch is queued, and the stream orders their reuse),
    // and the output holds m * n elements.
    unsafe { b.launch(cfg) }.map_err(launch_failed("lora_gemm"))?;
    drop((a1, b1, a2, b2, bias));
    Tensor::from_storage(Storage::Cuda(out), &[m, n])
}

/// Allows the kernel its `bytes` of dynamic shared memory (above the 48 KiB default); once per
/// (device, kernel): the loaded function keeps the setting.
fn opt_in_shared(dev: &CudaDevice, f: &super::CudaFunction, name: &str, bytes: u32) -> Result<()> {
    type Key = (usize, String);
    static DONE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<Key>>> = std::sync::OnceLock::new();
    let key = (dev.ordinal(), name.to_string());
    let done = DONE.get_or_init(Default::default);
    if done.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
        return Ok(());
    }
    dev.bind()?;
    f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        .map_err(|e| super::driver_error(format!("{OP}: allowing {bytes} bytes of shared memory for {name}"), e))?;
    done.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
    Ok(())
}
