//! CUDA launch of the fused flash-attention backward kernels (kernels/cuda/flash_attention_backward.cu):
//! bf16/f16, head dim 64 or 128, sm_80+. Three launches on the device's stream:
//!   prep: one warp per row of [B, H, lq_pad]: delta = rowsum(dout * out), lse2 = lse log2(e),
//!         dq_accum = 0 (256-thread blocks);
//!   main: grid (own + reference key tiles, H, B), block and dynamic shared memory per head dim
//!         (kernels::flash_attention_backward::BackwardTiles; 81 / 68.5 KiB, opted into above the
//!         48 KiB default);
//!   dq:   dq = scale dq_accum in q's dtype (256-thread blocks, grid-stride).
//! Inputs are [B, H, L, D] views read in place when the kernels can (unit stride along D, row /
//! head / batch strides multiples of 8 elements, 16-byte aligned start), else copied contiguous.
//! out / dout are converted to q's dtype first when they differ. The gradients are allocated as
//! [B, L, H, D] memory and returned as [B, H, L, D] views; the f32 scratch (dq_accum, lse2, delta)
//! comes from the pool and goes back when dropped (the stream orders its reuse).
//!
//! On compute capability 9.0 with the Hopper kernels switched on (crate::cuda::hopper_kernels) the
//! main launch runs the wgmma kernel instead (kernels/cuda/flash_attention_backward_hopper.cu:
//! same parameters and outputs; grid (own + reference tiles of 128 keys, H, B), 256 threads,
//! 146.5 / 194.5 KiB of dynamic shared memory; the "ws*" variants at head dim 64: 384 threads,
//! 178.6 KiB); prep and dq stay as they are.

use kernels::flash_attention_backward::{self as kfab, BackwardTiles, FlashBackwardParams};

use kernels::compile::KernelSource;

use crate::cuda::{launch_failed, DeviceRepr, LaunchConfig, PushKernelArg};
use crate::ops::flash_attention::{AttentionReference, FlashShape};
use crate::ops::flash_attention_backward::{composition, FlashAttentionGrads};
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};
use cudarc::driver::sys;

use super::storage::CudaStorage;
use super::tune;

const OP: &str = "flash_attention_backward (CUDA)";

/// The kernels' parameter struct (kernels::flash_attention_backward::FlashBackwardParams, the
/// CUDA struct's mirror) as a kernel argument.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct KernelParams(FlashBackwardParams);
// SAFETY: a #[repr(C)] struct of plain integers and floats, laid out as the CUDA struct (both
// sides check its size).
unsafe impl DeviceRepr for KernelParams {}

/// Whether the fused kernels take these inputs: bf16/f16 with head dim 64 or 128 (the device's
/// arch is checked by `backward`). Until they have run on a GPU they are experimental kernels
/// (crate::cuda::experimental_kernels), off by default; the parity suite runs both paths.
pub(crate) fn kernel_applies(dtype: DType, d: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && BackwardTiles::for_head_dim(d).is_some() && super::experimental_kernels()
}

/// The main kernel of a call: its source, instance name, keys a block, threads a block, dynamic
/// shared memory.
#[derive(Clone)]
struct MainKernel {
    source: &'static KernelSource,
    name: String,
    keys_per_block: usize,
    threads: u32,
    shared_bytes: u32,
}

/// The Hopper (wgmma) main kernel of `variant` when it applies: the Hopper kernels switched on, a
/// compute capability 9.0 device with the opt-in shared memory it needs, bf16/f16 with head dim 64
/// or 128 (which has one kernel: any variant runs the default there).
fn hopper_main_kernel(dev: &super::CudaDevice, dtype: DType, d: usize, variant: &str) -> Option<MainKernel> {
    let variant = Some(variant).filter(|v| *v != "default" && d == 64);
    let (source, threads, shared_bytes) = kfab::hopper_launch(d, variant)?;
    let applies = super::hopper_kernels() && dev.arch() == 90 && matches!(dtype, DType::BF16 | DType::F16) && dev.max_shared_memory_per_block_optin() >= shared_bytes;
    let tn = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let name = match variant {
        None => kfab::hopper_kernel_name(tn, d),
        Some(v) => format!("flash_bwd_hopper_{v}_{tn}_d{d}"),
    };
    applies.then_some(MainKernel { source, name, keys_per_block: kfab::HOPPER_KEYS_PER_BLOCK, threads, shared_bytes })
}

/// The Hopper main kernel's variants at head dim 64 (LOOKAHEAD_VARIANT_FLASH_BWD, or tuned:
/// cuda::tune): the default, "ss", "late" (kernels/cuda/flash_attention_backward_hopper.cu, top of
/// the file), "ws", "ws_stagger" (the warp-specialized kernel of
/// kernels/cuda/flash_attention_backward_ws.cu, 384 threads, its own shared memory:
/// kfab::hopper_launch). All take HOPPER_KEYS_PER_BLOCK keys a block.
pub const HOPPER_VARIANTS: tune::Variants = tune::Variants {
    family: "flash_bwd",
    names: &["default", "ss", "late", "ws", "ws_stagger"],
    sources: &[&kfab::HOPPER_SOURCE, &kfab::WS_SOURCE],
};

fn device_addr(t: &Tensor) -> Result<u64> {
    match &*t.read_storage() {
        Storage::Cuda(s) => Ok(s.ptr_at(t.layout().offset())),
        Storage::Cpu(_) => Err(Error::DeviceMismatch { op: OP, lhs: Device::Cpu, rhs: t.device() }),
    }
}

/// Device address and (batch, head, row) strides of a [B, H, L, D] CUDA view the kernels can read
/// in place; the view is copied contiguous first when it cannot.
fn kernel_view(t: &Tensor) -> Result<(Tensor, u64, [i64; 3])> {
    let readable = |t: &Tensor, addr: u64| {
        let s = t.strides();
        // Size-1 dims and empty tensors have no stride to honour.
        (s[3] == 1 || t.shape()[3] <= 1) && addr.is_multiple_of(16) && s[..3].iter().zip(t.shape()).all(|(&st, &n)| n <= 1 || st.is_multiple_of(8))
    };
    let mut view = t.clone();
    if !readable(&view, device_addr(&view)?) {
        view = view.contiguous()?;
        if !readable(&view, device_addr(&view)?) {
            // A contiguous view at an unaligned offset: a fresh storage starts aligned.
            view = view.copy()?;
        }
    }
    let a = device_addr(&view)?;
    let s = view.strides();
    Ok((view.clone(), a, [s[0] as i64, s[1] as i64, s[2] as i64]))
}

fn u32_of(what: &str, v: usize, shape: &[usize]) -> Result<u32> {
    u32::try_from(v).ok().filter(|&x| x < i32::MAX as u32).ok_or_else(|| Error::BadShape { op: OP, msg: format!("{what} = {v} is too large for the CUDA kernels (below 2^31)"), shape: shape.to_vec() })
}

/// A gradient tensor, its device address and the (batch, head, row) strides of the view.
type Gradient = (Tensor, u64, [i64; 3]);

/// A gradient of `l` rows: [B, L, H, D] memory of `dtype` returned as a [B, H, L, D] view.
fn gradient(dev: &std::sync::Arc<super::CudaDevice>, dtype: DType, (b, h, l, d): (usize, usize, usize, usize)) -> Result<Gradient> {
    let s = CudaStorage::alloc(dev, dtype, b * l * h * d)?;
    let addr = s.device_ptr();
    let t = Tensor::from_storage(Storage::Cuda(s), &[b, l, h, d])?.permute(&[0, 2, 1, 3])?;
    Ok((t, addr, [(l * h * d) as i64, d as i64, (h * d) as i64]))
}

/// Allows `f` `bytes` of dynamic shared memory (above the 48 KiB default).
fn opt_in_shared(dev: &super::CudaDevice, f: &super::CudaFunction, name: &str, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        dev.bind()?;
        f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(|e| Error::Cuda(format!("{name}: cuFuncSetAttribute(max dynamic shared memory = {bytes}): {e}")))?;
    }
    Ok(())
}

/// The fused backward (the composition of ops on devices older than sm_80 or with too little
/// shared memory); see the module doc.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, out: &Tensor, lse: &Tensor, dout: &Tensor, shape: &FlashShape) -> Result<FlashAttentionGrads> {
    let FlashShape { b, h, lq, lk, lr, d, keep_per_batch } = *shape;
    let Device::Cuda(ordinal) = q.device() else {
        return Err(Error::DeviceMismatch { op: OP, lhs: q.device(), rhs: Device::Cuda(0) });
    };
    let dev = crate::cuda::device(ordinal)?;
    let Some(tiles) = BackwardTiles::for_head_dim(d) else {
        return composition(q, k, v, reference, scale, out, lse, dout, shape);
    };
    let dtype = q.dtype();
    let tn = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let (prep_name, main_name, dq_name) = kfab::kernel_names(tn, d);
    let hopper = hopper_main_kernel(&dev, dtype, d, HOPPER_VARIANTS.names[0]);
    let main = match hopper.clone() {
        Some(hopper) => hopper,
        None => {
            let smem = tiles.shared_bytes(d);
            if dev.arch() < 80 || (smem > 48 * 1024 && dev.max_shared_memory_per_block_optin() < smem) {
                return composition(q, k, v, reference, scale, out, lse, dout, shape);
            }
            MainKernel { source: &kfab::SOURCE, name: main_name, keys_per_block: tiles.bc, threads: tiles.threads(), shared_bytes: smem }
        }
    };
    let with_reference = reference.is_some() && lr > 0;
    let (dq, dq_addr, dq_stride) = gradient(&dev, dtype, (b, h, lq, d))?;
    let (dk, dk_addr, dk_stride) = gradient(&dev, dtype, (b, h, lk, d))?;
    let (dv, dv_addr, dv_stride) = gradient(&dev, dtype, (b, h, lk, d))?;
    let reference_grads = match reference {
        Some(_) => Some((gradient(&dev, dtype, (b, h, lr, d))?, gradient(&dev, dtype, (b, h, lr, d))?)),
        None => None,
    };
    let finish = |reference_grads: Option<(Gradient, Gradient)>| {
        let (dk_ref, dv_ref) = match reference_grads {
            Some((a, b)) => (Some(a.0), Some(b.0)),
            None => (None, None),
        };
        FlashAttentionGrads { dq: dq.clone(), dk: dk.clone(), dv: dv.clone(), dk_ref, dv_ref }
    };
    if b * h == 0 || (lq == 0 && lk + lr == 0) {
        return Ok(finish(reference_grads));
    }
    let shape_err = q.shape();
    let (batch, heads) = (u32_of("B", b, shape_err)?, u32_of("H", h, shape_err)?);
    let (lq32, lk32, lr32) = (u32_of("Lq", lq, shape_err)?, u32_of("Lk", lk, k.shape())?, u32_of("Lr", lr, shape_err)?);
    if h > 65535 || b > 65535 {
        return Err(Error::BadShape { op: OP, msg: "B and H must be at most 65535 (grid dims)".into(), shape: q.shape().to_vec() });
    }
    let lq_pad = kfab::lq_pad(lq);
    let prep_rows = u32_of("B * H * Lq", b * h * lq_pad, shape_err)?;
    let bc = main.keys_per_block;
    let key_tiles = u32_of("key tiles", lk.div_ceil(bc) + if with_reference { lr.div_ceil(bc) } else { 0 }, shape_err)?;

    // Views and scratch kept alive until the launches are queued (the stream orders later reuse).
    let (out, dout) = (out.to_dtype(dtype)?, dout.to_dtype(dtype)?);
    let (qv, q_addr, q_stride) = kernel_view(q)?;
    let (kv, k_addr, k_stride) = kernel_view(k)?;
    let (vv, v_addr, v_stride) = kernel_view(v)?;
    let (ov, out_addr, out_stride) = kernel_view(&out)?;
    let (dov, dout_addr, dout_stride) = kernel_view(&dout)?;
    let lse_addr = device_addr(lse)?;
    let ls = lse.strides();
    let dq_accum = CudaStorage::alloc(&dev, DType::F32, b * h * lq * d)?;
    let lse2 = CudaStorage::alloc(&dev, DType::F32, b * h * lq_pad)?;
    let delta = CudaStorage::alloc(&dev, DType::F32, b * h * lq_pad)?;
    let mut p = FlashBackwardParams {
        q: q_addr,
        k: k_addr,
        v: v_addr,
        out: out_addr,
        dout: dout_addr,
        lse: lse_addr,
        dq: dq_addr,
        dk: dk_addr,
        dv: dv_addr,
        dq_accum: dq_accum.device_ptr(),
        lse2: lse2.device_ptr(),
        delta: delta.device_ptr(),
        q_stride,
        k_stride,
        v_stride,
        out_stride,
        dout_stride,
        lse_stride: [ls[0] as i64, ls[1] as i64, ls[2] as i64],
        dq_stride,
        dk_stride,
        dv_stride,
        batch,
        heads,
        lq: lq32,
        lk: lk32,
        lr: if with_reference { lr32 } else { 0 },
        lq_pad: lq_pad as u32,
        d: d as u32,
        scale,
        scale_log2: scale * std::f32::consts::LOG2_E,
        ..Default::default()
    };
    let mut keep_alive = vec![qv, kv, vv, ov, dov];
    if let Some(((_, dkr_addr, dkr_stride), (_, dvr_addr, dvr_stride))) = &reference_grads {
        (p.dk_ref, p.dk_ref_stride, p.dv_ref, p.dv_ref_stride) = (*dkr_addr, *dkr_stride, *dvr_addr, *dvr_stride);
    }
    if let Some(r) = reference.filter(|_| with_reference) {
        let (krv, kr_addr, kr_stride) = kernel_view(r.k)?;
        let (vrv, vr_addr, vr_stride) = kernel_view(r.v)?;
        (p.k_ref, p.k_ref_stride, p.v_ref, p.v_ref_stride) = (kr_addr, kr_stride, vr_addr, vr_stride);
        keep_alive.extend([krv, vrv]);
        if let Some(keep) = r.keep {
            let keep = keep.contiguous()?;
            p.keep = device_addr(&keep)?;
            p.keep_batch_stride = if keep_per_batch { lr as i64 } else { 0 };
            keep_alive.push(keep);
        }
    }

    let params = KernelParams(p);
    let launch = |source: &KernelSource, name: &str, cfg: LaunchConfig| -> Result<()> {
        let f = dev.function(source, name)?;
        opt_in_shared(&dev, &f, name, cfg.shared_mem_bytes)?;
        let mut builder = dev.launch_builder(&f);
        builder.arg(&params);
        // SAFETY: FlashBackwardParams mirrors the kernels' struct; every address points into a
        // live CUDA storage (the views in keep_alive, the gradients, the scratch) covering the
        // sizes and strides given, and the rows meet the kernels' alignment (kernel_view; the
        // gradients and the scratch are fresh allocations with rows of D or lq_pad elements).
        unsafe { builder.launch(cfg) }.map_err(launch_failed(name))?;
        Ok(())
    };
    // The three launches: delta, lse2 and dq_accum = 0; the main kernel; dq. Together they
    // compute every output from the inputs alone, so tuning may run them more than once.
    let run = |main: &MainKernel| -> Result<()> {
        if prep_rows > 0 {
            launch(&kfab::SOURCE, &prep_name, LaunchConfig { grid_dim: (prep_rows.div_ceil(kfab::PREP_THREADS / 32), 1, 1), block_dim: (kfab::PREP_THREADS, 1, 1), shared_mem_bytes: 0 })?;
        }
        if key_tiles > 0 {
            launch(main.source, &main.name, LaunchConfig { grid_dim: (key_tiles, heads, batch), block_dim: (main.threads, 1, 1), shared_mem_bytes: main.shared_bytes })?;
        }
        let pairs = b * h * lq * d / 2;
        if pairs > 0 {
            let blocks = pairs.div_ceil(kfab::DQ_THREADS as usize).min(dev.multiprocessors() as usize * 16).max(1) as u32;
            launch(&kfab::SOURCE, &dq_name, LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (kfab::DQ_THREADS, 1, 1), shared_mem_bytes: 0 })?;
        }
        Ok(())
    };
    let main = if hopper.is_some() && d == 64 {
        let variant_kernel = |v: &str| hopper_main_kernel(&dev, dtype, d, v).ok_or_else(|| Error::Cuda(format!("{OP}: the Hopper backward variant {v} does not fit this device's shared memory")));
        let shape = || format!("{dtype:?} b{b} h{h} lq{lq} lk{lk} lr{lr} d{d}{}", if p.keep == 0 { "" } else { " keep" });
        let chosen = tune::choose(&dev, &HOPPER_VARIANTS, &shape, &mut |v| run(&variant_kernel(v)?))?;
        variant_kernel(chosen)?
    } else {
        // A variable naming no variant is an error wherever it would be read.
        tune::requested(&HOPPER_VARIANTS)?;
        main
    };
    run(&main)?;
    drop((keep_alive, dq_accum, lse2, delta));
    Ok(finish(reference_grads))
}
