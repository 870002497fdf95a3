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
//!
//! With LOOKAHEAD_VARIANT_LORA=tma, tma256, tma-pp or tma-mc, or when tuning chooses one
//! (`VARIANTS`, cuda::tune; unset or `default`: the kernel above), the warp-specialized TMA kernel (kernels/cuda/lora_linear_tma.cu) runs instead
//! where it can: 128 x 160 (tma; tma-pp: consumer warpgroups taking turns on whole tiles; tma-mc:
//! clusters of 2 CTAs multicasting the B tile, launched through cuLaunchKernelEx with the cluster
//! dimension, grid 2 x min(tile pairs, clusters the device runs at once)) or 256 x 160 (tma256)
//! tiles, a persistent grid, 384 threads, the operands described by four tensor maps (A1, B1, A2, B2; built
//! per call: a few host-only cuTensorMapEncodeTiled calls, no device work, no allocation) passed
//! as `__grid_constant__` kernel parameters. It needs k1 > 0 and LoRA rows TMA can address
//! (`klora::tma_lora_ok`: rank a multiple of 8, 16-byte aligned); elsewhere (rank 4, 12, ...,
//! misaligned views) the cp.async Hopper kernel runs.
//!
//! Host cost per call: the kernels are short (~10-30 us), so the launch path is kept free of
//! allocations apart from the output: the loaded function, with its shared memory opt-in done, is
//! cached per (device, kernel) under a static name, and operands already contiguous and aligned
//! are read in place without a clone.

use std::sync::{Arc, Mutex, OnceLock};

use kernels::compile::KernelSource;
use kernels::lora_linear::{self as klora, BLayout, LoraGemmArgs};

use super::device::CudaDevice;
use super::launch::{launch_cluster, launch_failed, max_active_clusters};
use super::storage::CudaStorage;
use super::tensor_map::{self, TensorMap2d, TensorMapParam, TmaSwizzle};
use super::tune;
use super::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
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

/// The variants of the Hopper kernel (LOOKAHEAD_VARIANT_LORA, or tuned: cuda::tune): the
/// default cp.async kernel (kernels/cuda/lora_linear_hopper.cu), or kernels/cuda/lora_linear_tma.cu
/// with 128 x 160 ("tma") or 256 x 160 ("tma256") output tiles shared by the two consumer
/// warpgroups, 128 x 160 tiles that they take in turns ("tma-pp", ping-pong), or 128 x 160 tiles in
/// clusters of 2 CTAs that multicast the shared B tile ("tma-mc").
pub const VARIANTS: tune::Variants = tune::Variants {
    family: "lora",
    names: &["default", "tma", "tma256", "tma-pp", "tma-mc"],
    sources: &[&klora::HOPPER_SOURCE, &klora::TMA_SOURCE],
};

/// The kernel a variant name stands for (None: the default kernel).
fn tma_family(variant: &str) -> Option<Family> {
    match variant {
        "tma" => Some(Family::Tma),
        "tma256" => Some(Family::Tma256),
        "tma-pp" => Some(Family::TmaPp),
        "tma-mc" => Some(Family::TmaMc),
        _ => None,
    }
}

/// Which kernel family computes the GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// kernels/cuda/lora_linear.cu (mma.sync)
    MmaSync,
    /// kernels/cuda/lora_linear_hopper.cu (wgmma, cp.async)
    Hopper,
    /// kernels/cuda/lora_linear_tma.cu (wgmma, TMA, warp-specialized), 128 x 160 tiles
    Tma,
    /// the same with 256 x 160 tiles
    Tma256,
    /// the same with 128 x 160 tiles, the consumer warpgroups taking turns (ping-pong)
    TmaPp,
    /// the same as Tma in clusters of 2 CTAs (row tiles 2 i, 2 i + 1) multicasting the B tile
    TmaMc,
}

impl Family {
    /// The TMA kernels' tile rows.
    fn tile_m(self) -> usize {
        if self == Family::Tma256 { 256 } else { 128 }
    }
}

/// The kernel that computes the GEMM on a device: its source, threads and dynamic shared memory.
struct Kernel {
    source: &'static KernelSource,
    family: Family,
    threads: u32,
    shared_bytes: u32,
}

/// The kernel's name (`klora::kernel_name` / `klora::hopper_kernel_name`) as a static string, so
/// that a launch formats nothing.
fn kernel_name(family: Family, layout: BLayout, dtype: DType) -> &'static str {
    match (family, layout, dtype) {
        (Family::MmaSync, BLayout::NMajor, DType::BF16) => "lora_gemm_nk_bf16",
        (Family::MmaSync, BLayout::NMajor, _) => "lora_gemm_nk_f16",
        (Family::MmaSync, BLayout::KMajor, DType::BF16) => "lora_gemm_kn_bf16",
        (Family::MmaSync, BLayout::KMajor, _) => "lora_gemm_kn_f16",
        (Family::Hopper, BLayout::NMajor, DType::BF16) => "lora_gemm_hopper_nk_bf16",
        (Family::Hopper, BLayout::NMajor, _) => "lora_gemm_hopper_nk_f16",
        (Family::Hopper, BLayout::KMajor, DType::BF16) => "lora_gemm_hopper_kn_bf16",
        (Family::Hopper, BLayout::KMajor, _) => "lora_gemm_hopper_kn_f16",
        (Family::Tma, BLayout::NMajor, DType::BF16) => "lora_gemm_tma_nk_bf16",
        (Family::Tma, BLayout::NMajor, _) => "lora_gemm_tma_nk_f16",
        (Family::Tma, BLayout::KMajor, DType::BF16) => "lora_gemm_tma_kn_bf16",
        (Family::Tma, BLayout::KMajor, _) => "lora_gemm_tma_kn_f16",
        (Family::Tma256, BLayout::NMajor, DType::BF16) => "lora_gemm_tma256_nk_bf16",
        (Family::Tma256, BLayout::NMajor, _) => "lora_gemm_tma256_nk_f16",
        (Family::Tma256, BLayout::KMajor, DType::BF16) => "lora_gemm_tma256_kn_bf16",
        (Family::Tma256, BLayout::KMajor, _) => "lora_gemm_tma256_kn_f16",
        (Family::TmaPp, BLayout::NMajor, DType::BF16) => "lora_gemm_tma_pp_nk_bf16",
        (Family::TmaPp, BLayout::NMajor, _) => "lora_gemm_tma_pp_nk_f16",
        (Family::TmaPp, BLayout::KMajor, DType::BF16) => "lora_gemm_tma_pp_kn_bf16",
        (Family::TmaPp, BLayout::KMajor, _) => "lora_gemm_tma_pp_kn_f16",
        (Family::TmaMc, BLayout::NMajor, DType::BF16) => "lora_gemm_tma_mc_nk_bf16",
        (Family::TmaMc, BLayout::NMajor, _) => "lora_gemm_tma_mc_nk_f16",
        (Family::TmaMc, BLayout::KMajor, DType::BF16) => "lora_gemm_tma_mc_kn_bf16",
        (Family::TmaMc, BLayout::KMajor, _) => "lora_gemm_tma_mc_kn_f16",
    }
}

/// The Hopper (wgmma) kernel for C [m, n] on compute capability 9.0 when `cuda::hopper_kernels()`
/// is on (and the device grants its shared memory, and the tiles fit its u32 count), else the
/// mma.sync kernel. `tma`: the TMA variant, when it was asked for and the operands allow it
/// (k1 > 0, LoRA rows `klora::tma_lora_ok`); it replaces the cp.async Hopper kernel.
fn kernel_for(dev: &CudaDevice, m: usize, n: usize, tma: Option<Family>) -> Kernel {
    let hopper_fits = dev.max_shared_memory_per_block_optin() >= klora::HOPPER_SHARED_BYTES && klora::hopper_tiles(m, n) < (1 << 31);
    if !(super::hopper_kernels() && dev.arch() == 90 && hopper_fits) {
        Kernel { source: &klora::SOURCE, family: Family::MmaSync, threads: klora::THREADS, shared_bytes: klora::SHARED_BYTES }
    } else if let Some(family) = tma.filter(|f| dev.max_shared_memory_per_block_optin() >= klora::tma_shared_bytes(f.tile_m())) {
        Kernel { source: &klora::TMA_SOURCE, family, threads: klora::TMA_THREADS, shared_bytes: klora::tma_shared_bytes(family.tile_m()) }
    } else {
        Kernel { source: &klora::HOPPER_SOURCE, family: Family::Hopper, threads: klora::HOPPER_THREADS, shared_bytes: klora::HOPPER_SHARED_BYTES }
    }
}

/// Device address of a CUDA tensor's first element.
fn addr(t: &Tensor) -> Result<u64> {
    match &*t.read_storage() {
        Storage::Cuda(s) => Ok(s.ptr_at(t.layout().offset())),
        Storage::Cpu(_) => Err(Error::Cuda(format!("{OP}: operand is not on a CUDA device"))),
    }
}

/// The address of `t`'s elements as a contiguous matrix: `t` itself when it is contiguous (and,
/// with `align`, 16-byte aligned), else a copy that is, returned so that the caller keeps it alive
/// until the launch is queued. The common case clones nothing.
fn operand(t: &Tensor, align: bool) -> Result<(u64, Option<Tensor>)> {
    if t.is_contiguous() {
        let p = addr(t)?;
        if !align || p.is_multiple_of(16) {
            return Ok((p, None));
        }
    }
    let c = t.copy()?;
    Ok((addr(&c)?, Some(c)))
}

/// C [m, n] = a1 [m, k1] · B1 + a2 [m, k2] · B2 (+ bias [n]) with B1 / B2 = b1 / b2 read as
/// [n][k] rows (`NMajor`: b1 [n, k1], b2 [n, k2]) or [k][n] rows (`KMajor`: b1 [k1, n],
/// b2 [k2, n]). All operands CUDA tensors of one 16-bit dtype with exactly these shapes (checked
/// by the op), and `fused_supported` true.
#[allow(clippy::too_many_arguments)]
pub fn concat_gemm(a1: &Tensor, b1: &Tensor, a2: &Tensor, b2: &Tensor, bias: Option<&Tensor>, (m, n, k1, k2): (usize, usize, usize, usize), layout: BLayout) -> Result<Tensor> {
    let dtype = a1.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(Error::UnsupportedDType { op: OP, dtype });
    }
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
    let dev = match &*a1.read_storage() {
        Storage::Cuda(s) => s.device().clone(),
        Storage::Cpu(_) => return Err(Error::Cuda(format!("{OP}: operand is not on a CUDA device"))),
    };
    if !fused_supported(&dev, dtype, m, n, k1, k2) {
        return Err(Error::Cuda(format!("{OP}: unsupported sizes m {m} n {n} k1 {k1} k2 {k2} ({dtype}, sm_{})", dev.arch())));
    }
    let (pa1, a1_copy) = operand(a1, true)?;
    let (pb1, b1_copy) = operand(b1, true)?;
    // The LoRA operands: cp.async of 16-byte or 8-byte row pieces when the rank and address allow
    // (`klora::lora_rows`), else element loads. An empty operand (rank 0) is never read.
    let (pa2, a2_copy) = if k2 > 0 { operand(a2, false)? } else { (0, None) };
    let (pb2, b2_copy) = if k2 > 0 { operand(b2, layout == BLayout::KMajor)? } else { (0, None) };
    let (pbias, bias_copy) = match bias {
        Some(b) => operand(b, false)?,
        None => (0, None),
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
        a2_vec: klora::lora_rows(k2, pa2),
        b2_vec: match layout {
            BLayout::NMajor => klora::lora_rows(k2, pb2),
            BLayout::KMajor => 1,
        },
        pad: 0,
    });
    let tma_ok = k1 > 0 && klora::tma_lora_ok(k2, pa2) && (layout == BLayout::KMajor || klora::tma_lora_ok(k2, pb2));
    let operands = Operands { args, layout, dtype, ptrs: (pa1, pb1, pa2, pb2), dims: (m, n, k1, k2) };
    // The TMA variants replace the Hopper kernel only (sm_90, Hopper kernels on).
    let variant = if tma_ok && super::hopper_kernels() && dev.arch() == 90 {
        let shape = || format!("{dtype:?} {layout:?} m{m} n{n} k{k1} r{k2}{}", if pbias == 0 { "" } else { " bias" });
        tune::choose(&dev, &VARIANTS, &shape, &mut |v| launch(&dev, &operands, tma_family(v)))?
    } else {
        // A variable naming no variant is an error wherever it would be read.
        tune::requested(&VARIANTS)?;
        VARIANTS.names[0]
    };
    launch(&dev, &operands, tma_family(variant))?;
    drop((a1_copy, b1_copy, a2_copy, b2_copy, bias_copy));
    Tensor::from_storage(Storage::Cuda(out), &[m, n])
}

/// One GEMM's operands as the kernels take them: the arguments, B's layout, the dtype, the
/// device addresses (a1, b1, a2, b2) and sizes (m, n, k1, k2).
#[derive(Clone, Copy)]
struct Operands {
    args: Args,
    layout: BLayout,
    dtype: DType,
    ptrs: (u64, u64, u64, u64),
    dims: (usize, usize, usize, usize),
}

/// Queues the GEMM on the kernel for this device with the TMA variant `tma` (None: the default).
fn launch(dev: &Arc<CudaDevice>, o: &Operands, tma: Option<Family>) -> Result<()> {
    let Operands { args, layout, dtype, ptrs, dims: (m, n, k1, k2) } = *o;
    let mut kernel = kernel_for(dev, m, n, tma);
    // tma-mc: the clusters the device runs at once (asked once per kernel); where none fits, the
    // same tiles without clusters (tma).
    let mut clusters = 0;
    if kernel.family == Family::TmaMc {
        clusters = mc_clusters(dev, &kernel, kernel_name(kernel.family, layout, dtype))?;
        if clusters == 0 {
            kernel.family = Family::Tma;
        }
    }
    let grid_dim = match kernel.family {
        Family::MmaSync => (n.div_ceil(klora::TILE_N) as u32, m.div_ceil(klora::TILE_M) as u32, 1),
        Family::Hopper => (klora::hopper_blocks(m, n, dev.multiprocessors()), 1, 1),
        Family::Tma | Family::Tma256 | Family::TmaPp => (klora::tma_blocks(m, n, kernel.family.tile_m(), dev.multiprocessors()), 1, 1),
        Family::TmaMc => (klora::tma_mc_blocks(m, n, clusters), 1, 1),
    };
    let maps = match kernel.family {
        Family::Tma | Family::Tma256 | Family::TmaPp | Family::TmaMc => Some(tma_maps(dtype, layout, kernel.family, ptrs, (m, n, k1, k2))?),
        _ => None,
    };
    let name = kernel_name(kernel.family, layout, dtype);
    let f = loaded(dev, &kernel, name)?;
    if let (Family::TmaMc, Some(maps)) = (kernel.family, &maps) {
        fn karg<T>(v: &T) -> *mut std::ffi::c_void {
            v as *const T as *mut std::ffi::c_void
        }
        let mut params = [karg(&args), karg(&maps[0]), karg(&maps[1]), karg(&maps[2]), karg(&maps[3])];
        // SAFETY: the parameters are lora_gemm_tma_mc_*'s (LoraGemmArgs, TensorMap x 4), alive
        // until the call returns; every pointer in args addresses a live CUDA buffer of the shape
        // the args describe (checked by concat_gemm, which keeps them alive), the maps describe
        // those buffers, the output holds m * n elements, the grid is a multiple of the cluster,
        // and the shared memory was opted into.
        return unsafe { launch_cluster(dev, &f, name, (grid_dim.0, kernel.threads, klora::TMA_MC_CLUSTER, kernel.shared_bytes), &mut params) };
    }
    let cfg = LaunchConfig { grid_dim, block_dim: (kernel.threads, 1, 1), shared_mem_bytes: kernel.shared_bytes };
    let mut b = dev.launch_builder(&f);
    b.arg(&args);
    if let Some(maps) = &maps {
        for map in maps {
            b.arg(map);
        }
    }
    // SAFETY: every pointer addresses a live CUDA buffer of the shape the args describe (checked
    // by concat_gemm; the tensors live until after the launch is queued, and the stream orders
    // their reuse), and the output holds m * n elements.
    unsafe { b.launch(cfg) }.map_err(launch_failed("lora_gemm"))?;
    Ok(())
}

/// The TMA kernel's four tensor maps (A1, B1, A2, B2) over the operands at these device addresses
/// (row-major, rows contiguous: lda1 = k1, ldb1 = k1 (nk) or n (kn), lda2 = k2, ldb2 = k2 or n), with
/// the boxes and swizzles of `klora::tma_box_a(tile_m)` / `TMA_BOX_B_*` (tma-mc: the half boxes
/// `TMA_MC_BOX_B_*`). Rank 0: A2 / B2 are never read; the A1 / B1 maps stand in for them (a tensor
/// map cannot describe an empty matrix).
fn tma_maps(dtype: DType, layout: BLayout, family: Family, (pa1, pb1, pa2, pb2): (u64, u64, u64, u64), (m, n, k1, k2): (usize, usize, usize, usize)) -> Result<[TensorMapParam; 4]> {
    let tile_m = family.tile_m();
    let box_b = match (layout, family == Family::TmaMc) {
        (BLayout::NMajor, false) => klora::TMA_BOX_B_NK,
        (BLayout::KMajor, false) => klora::TMA_BOX_B_KN,
        (BLayout::NMajor, true) => klora::TMA_MC_BOX_B_NK,
        (BLayout::KMajor, true) => klora::TMA_MC_BOX_B_KN,
    };
    // (rows, columns) of B1 / B2 as stored.
    let (b1_dims, b2_dims) = match layout {
        BLayout::NMajor => ((n, k1), (n, k2)),
        BLayout::KMajor => ((k1, n), (k2, n)),
    };
    let a1 = tensor_map(dtype, pa1, (m, k1), klora::tma_box_a(tile_m))?;
    let b1 = tensor_map(dtype, pb1, b1_dims, box_b)?;
    if k2 == 0 {
        return Ok([a1, b1, a1, b1]);
    }
    Ok([a1, b1, tensor_map(dtype, pa2, (m, k2), klora::tma_box_a(tile_m))?, tensor_map(dtype, pb2, b2_dims, box_b)?])
}

/// One tensor map: a contiguous row-major [rows, cols] matrix of 16-bit `dtype` at `base`, boxes of
/// (box rows, box columns, swizzle bytes).
fn tensor_map(dtype: DType, base: u64, (rows, cols): (usize, usize), (box_rows, box_cols, swizzle): (u32, u32, u32)) -> Result<TensorMapParam> {
    let map = TensorMap2d {
        base,
        dtype: tensor_map::tma_dtype(dtype)?,
        rows: rows as u64,
        cols: cols as u64,
        row_stride_bytes: cols as u64 * 2,
        box_rows,
        box_cols,
        swizzle: TmaSwizzle::from_bytes(swizzle).map_err(|e| Error::Cuda(e.to_string()))?,
    };
    tensor_map::encode(map)
}

/// The kernel `name` loaded on `dev` and allowed its dynamic shared memory (above the 48 KiB
/// default; the loaded function keeps the setting). The first call per (device, kernel) loads it
/// and opts in; later calls find it in a short list without allocating (at most 16 kernels a
/// device).
fn loaded(dev: &CudaDevice, kernel: &Kernel, name: &'static str) -> Result<CudaFunction> {
    type Loaded = Vec<(usize, &'static str, CudaFunction)>;
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let list = LOADED.get_or_init(Default::default);
    let found = list.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(d, n, _)| *d == dev.ordinal() && *n == name).map(|(_, _, f)| f.clone());
    if let Some(f) = found {
        return Ok(f);
    }
    let f = dev.function(kernel.source, name)?;
    let bytes = kernel.shared_bytes;
    dev.bind()?;
    f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        .map_err(|e| super::driver_error(format!("{OP}: allowing {bytes} bytes of shared memory for {name}"), e))?;
    list.lock().unwrap_or_else(|e| e.into_inner()).push((dev.ordinal(), name, f.clone()));
    Ok(f)
}

/// The clusters of 2 CTAs of the tma-mc kernel `name` (loaded, its shared memory opted into) that
/// the device runs at once, at most SMs / 2; 0 where none fits. Asked once per (device, kernel).
fn mc_clusters(dev: &CudaDevice, kernel: &Kernel, name: &'static str) -> Result<u32> {
    type Seen = Vec<(usize, &'static str, u32)>;
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&(_, _, c)) = seen.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(d, n, _)| *d == dev.ordinal() && *n == name) {
        return Ok(c);
    }
    let f = loaded(dev, kernel, name)?;
    let cs = klora::TMA_MC_CLUSTER;
    let c = max_active_clusters(dev, &f, (cs * (dev.multiprocessors() / cs).max(1), kernel.threads, cs, kernel.shared_bytes))?.min(dev.multiprocessors() / cs);
    seen.lock().unwrap_or_else(|e| e.into_inner()).push((dev.ordinal(), name, c));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_name_has_its_kernel() {
        assert_eq!(tma_family(VARIANTS.names[0]), None, "the default is the cp.async Hopper kernel");
        let families: Vec<_> = VARIANTS.names[1..].iter().map(|v| tma_family(v)).collect();
        assert_eq!(families, [Some(Family::Tma), Some(Family::Tma256), Some(Family::TmaPp), Some(Family::TmaMc)]);
    }

    #[test]
    fn static_kernel_names_match_the_kernels_crate() {
        for layout in [BLayout::NMajor, BLayout::KMajor] {
            for (dtype, dt) in [(DType::BF16, "bf16"), (DType::F16, "f16")] {
                assert_eq!(kernel_name(Family::MmaSync, layout, dtype), klora::kernel_name(layout, dt));
                assert_eq!(kernel_name(Family::Hopper, layout, dtype), klora::hopper_kernel_name(layout, dt));
                assert_eq!(kernel_name(Family::Tma, layout, dtype), klora::tma_kernel_name(layout, dt, 128, false));
                assert_eq!(kernel_name(Family::Tma256, layout, dtype), klora::tma_kernel_name(layout, dt, 256, false));
                assert_eq!(kernel_name(Family::TmaPp, layout, dtype), klora::tma_kernel_name(layout, dt, 128, true));
                assert_eq!(kernel_name(Family::TmaMc, layout, dtype), klora::tma_mc_kernel_name(layout, dt));
            }
        }
    }
}
