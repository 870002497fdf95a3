//! CUDA launch of the fused flash-attention forward kernel (kernels/cuda/flash_attention.cu):
//! bf16/f16, head dim 64 or 128, sm_80+; extended attention (`forward`) and the decoupled mode of
//! IP cross-attention (`decoupled_forward`: own K/V = source 1, the reference slot = source 2).
//! Inputs are [B, H, L, D] views read in place when the kernel can (unit stride along D, row /
//! head / batch strides multiples of 8 elements, 16-byte aligned start), else copied contiguous
//! first. The output is allocated as [B, Lq, H, D] memory
//! (heads merge afterwards with a free reshape) and returned as a [B, H, Lq, D] view; lse (and
//! the decoupled mode's lse2) is f32 [B, H, Lq] contiguous.
//!
//! On compute capability 9.0 with the Hopper kernels switched on (crate::cuda::hopper_kernels),
//! extended attention runs the wgmma variant (kernels/cuda/flash_attention_hopper.cu: same
//! parameters and outputs, its own launch geometry); the decoupled mode keeps the mma.sync kernel.

use crate::cuda::{launch_failed, DeviceRepr, LaunchConfig, PushKernelArg};
use kernels::compile::KernelSource;
use kernels::flash_attention::{decoupled_kernel_name, hopper_kernel_name, hopper_launch, hopper_variant_kernel_name, kernel_name, rows_per_block, shared_bytes, ws_tma_map, FlashParams, THREADS, WS_TMA_VARIANT};
use super::tune;

use crate::ops::flash_attention::{AttentionReference, FlashShape};
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};
use cudarc::driver::sys;
use std::sync::Arc;

use super::device::CudaDevice;
use super::tensor_map::{self, TensorMapParam};
use super::storage::CudaStorage;

const OP: &str = "flash_attention (CUDA)";
const DECOUPLED_OP: &str = "flash_attention_decoupled (CUDA)";

/// The kernel's parameter struct (kernels::flash_attention::FlashParams, the CUDA struct's mirror)
/// as a kernel argument.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct KernelParams(FlashParams);
// SAFETY: a #[repr(C)] struct of plain integers and floats, laid out as the CUDA struct.
unsafe impl DeviceRepr for KernelParams {}

/// Whether the fused kernel takes these inputs: bf16/f16 with head dim 64 or 128 (the device's
/// arch is checked by `forward`). Until the kernel has run on a GPU it is an experimental kernel
/// (crate::cuda::experimental_kernels), off by default; the parity suite runs both paths.
pub(crate) fn kernel_applies(dtype: DType, d: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(d, 64 | 128) && super::experimental_kernels()
}

/// Device address and (batch, head, row) strides of a [B, H, L, D] CUDA view the kernel can read
/// in place; the view is copied contiguous first when it cannot.
fn kernel_view(op: &'static str, t: &Tensor) -> Result<(Tensor, u64, [i64; 3])> {
    let readable = |t: &Tensor, addr: u64| {
        let s = t.strides();
        let d = t.shape()[3];
        // Size-1 dims and empty tensors have no stride to honour.
        (s[3] == 1 || d <= 1) && addr.is_multiple_of(16) && s[..3].iter().zip(t.shape()).all(|(&st, &n)| n <= 1 || st.is_multiple_of(8))
    };
    let addr = |t: &Tensor| -> Result<u64> {
        match &*t.read_storage() {
            Storage::Cuda(s) => Ok(s.ptr_at(t.layout().offset())),
            Storage::Cpu(_) => Err(Error::DeviceMismatch { op, lhs: Device::Cpu, rhs: t.device() }),
        }
    };
    let mut view = t.clone();
    if !readable(&view, addr(&view)?) {
        view = view.contiguous()?;
        if !readable(&view, addr(&view)?) {
            // A contiguous view at an unaligned offset: a fresh storage starts aligned.
            view = view.copy()?;
        }
    }
    let a = addr(&view)?;
    let s = view.strides();
    Ok((view.clone(), a, [s[0] as i64, s[1] as i64, s[2] as i64]))
}

fn u32_of(op: &'static str, what: &str, v: usize, shape: &[usize]) -> Result<u32> {
    u32::try_from(v).ok().filter(|&x| x < i32::MAX as u32).ok_or_else(|| Error::BadShape { op, msg: format!("{what} = {v} is too large for the CUDA kernel (below 2^31)"), shape: shape.to_vec() })
}

/// Which instance of the kernel a launch runs.
#[derive(Clone, Copy)]
enum Mode {
    /// One softmax over [own ; reference] (keep mask on the reference), mma.sync kernel.
    Extended,
    /// The same on the Hopper (wgmma) kernel.
    ExtendedHopper,
    /// Two softmaxes, own (source 1) and reference slot (source 2, no keep mask); source 2's
    /// output weighted by s2.
    Decoupled { s2: f32 },
}

/// Whether the device runs the kernel: sm_80+ with enough opt-in shared memory for head dim d.
fn device_takes_kernel(dev: &CudaDevice, d: usize) -> bool {
    dev.arch() >= 80 && (shared_bytes(d) <= 48 * 1024 || dev.max_shared_memory_per_block_optin() >= shared_bytes(d))
}

/// Whether extended attention runs the Hopper kernel: switched on, a compute capability 9.0
/// device with the opt-in shared memory it needs, bf16/f16 with head dim 64 or 128, and a
/// positive finite scale (the kernel applies the scale inside the exponent, after the row max).
fn hopper_kernel_applies(dev: &CudaDevice, dtype: DType, d: usize, scale: f32) -> bool {
    super::hopper_kernels()
        && dev.arch() == 90
        && matches!(dtype, DType::BF16 | DType::F16)
        && matches!(d, 64 | 128)
        && scale > 0.0
        && scale.is_finite()
        && dev.max_shared_memory_per_block_optin() >= hopper_launch(d, None).3
}

/// The fused forward (composition of ops on devices older than sm_80); see the module doc.
pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, shape: &FlashShape) -> Result<(Tensor, Tensor)> {
    let dev = device_of(OP, q)?;
    if hopper_kernel_applies(&dev, q.dtype(), shape.d, scale) {
        let (out, lse, _) = launch(OP, &dev, q, k, v, reference, Mode::ExtendedHopper, scale, shape)?;
        return Ok((out, lse));
    }
    if !device_takes_kernel(&dev, shape.d) {
        return crate::ops::flash_attention::cuda_composition(q, k, v, reference, scale, shape);
    }
    let (out, lse, _) = launch(OP, &dev, q, k, v, reference, Mode::Extended, scale, shape)?;
    Ok((out, lse))
}

/// The fused decoupled forward: q over source 1 (k1, v1) and source 2 (k2, v2) with independent
/// softmaxes, out = o1 + s2 o2; returns (out, lse1, lse2). `shape` is that of extended attention
/// with (k2, v2) as the reference (lk = L1, lr = L2, no keep mask). Composition of ops on devices
/// older than sm_80.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decoupled_forward(q: &Tensor, k1: &Tensor, v1: &Tensor, k2: &Tensor, v2: &Tensor, s2: f32, scale: f32, shape: &FlashShape) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = device_of(DECOUPLED_OP, q)?;
    if !device_takes_kernel(&dev, shape.d) {
        return crate::ops::flash_attention_decoupled::composition(q, k1, v1, k2, v2, s2, scale);
    }
    let reference = AttentionReference { k: k2, v: v2, keep: None };
    let (out, lse1, lse2) = launch(DECOUPLED_OP, &dev, q, k1, v1, Some(reference), Mode::Decoupled { s2 }, scale, shape)?;
    Ok((out, lse1, lse2.expect("the decoupled mode writes lse2")))
}

fn device_of(op: &'static str, q: &Tensor) -> Result<Arc<CudaDevice>> {
    let Device::Cuda(ordinal) = q.device() else {
        return Err(Error::DeviceMismatch { op, lhs: q.device(), rhs: Device::Cuda(0) });
    };
    crate::cuda::device(ordinal)
}

/// The Hopper forward's variants at head dim 64 (LOOKAHEAD_VARIANT_FLASH_FWD, or tuned:
/// cuda::tune): the default kernel, or kernels::flash_attention::HOPPER_D64_VARIANTS: "poly<n>",
/// 1 / n of the softmax's exponentials by a polynomial on the FMA pipe; "late", the copies issued
/// after the products; "late_poly4"; "ws", "ws_nopp", "ws3", "ws_poly3", "ws_tma", the
/// warp-specialized kernel of kernels/cuda/flash_attention_ws.cu. Head dim 128 has one kernel.
pub const HOPPER_VARIANTS: tune::Variants = tune::Variants {
    family: "flash_fwd",
    names: &["default", "poly3", "poly4", "poly8", "late", "late_poly4", "ws", "ws_nopp", "ws3", "ws_poly3", "ws_tma"],
    sources: &[&kernels::flash_attention::HOPPER_SOURCE, &kernels::flash_attention::WS_SOURCE],
};

/// The Hopper kernel instance of `variant` (None or "default": the default; head dim 128 has no
/// other): (source, instance, threads, query rows a block, dynamic shared memory).
fn hopper_instance(tn: &str, d: usize, variant: Option<&str>) -> (&'static KernelSource, String, u32, usize, u32) {
    let variant = variant.filter(|v| *v != "default" && d == 64);
    let name = match variant {
        None => hopper_kernel_name(tn, d),
        Some(v) => hopper_variant_kernel_name(tn, v),
    };
    let (source, threads, rows, smem) = hopper_launch(d, variant);
    (source, name, threads, rows, smem)
}

/// The tensor maps of the "ws_tma" instance for these parameters (kernels::flash_attention::
/// ws_tma_map): k, v, k_ref, v_ref, a missing source's maps standing in by the other source's (its
/// tiles are never loaded); None when a view cannot be mapped or there is no key at all.
fn ws_tma_maps(dtype: DType, p: &FlashParams, b: usize, h: usize) -> Result<Option<[TensorMapParam; 4]>> {
    let dt = tensor_map::tma_dtype(dtype)?;
    let map = |base: u64, strides: [i64; 3], l: u32| if l == 0 { None } else { ws_tma_map(dt, base, strides, (b, h, l as usize)) };
    let own = (map(p.k, p.k_stride, p.lk), map(p.v, p.v_stride, p.lk));
    let reference = (map(p.k_ref, p.k_ref_stride, p.lr), map(p.v_ref, p.v_ref_stride, p.lr));
    let [k, v, kr, vr] = match (own, reference) {
        ((Some(k), Some(v)), (Some(kr), Some(vr))) => [k, v, kr, vr],
        ((Some(k), Some(v)), (None, None)) if p.lr == 0 => [k, v, k, v],
        ((None, None), (Some(kr), Some(vr))) if p.lk == 0 => [kr, vr, kr, vr],
        _ => return Ok(None),
    };
    Ok(Some([tensor_map::encode(k)?, tensor_map::encode(v)?, tensor_map::encode(kr)?, tensor_map::encode(vr)?]))
}

/// One launch of the kernel instance of `mode`: (out, lse, lse2 in the decoupled mode).
#[allow(clippy::too_many_arguments)]
fn launch(op: &'static str, dev: &Arc<CudaDevice>, q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, mode: Mode, scale: f32, shape: &FlashShape) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let FlashShape { b, h, lq, lk, lr, d, keep_per_batch } = *shape;
    let dtype = q.dtype();
    let out_storage = CudaStorage::alloc(dev, dtype, b * lq * h * d)?;
    let lse_storage = CudaStorage::alloc(dev, DType::F32, b * h * lq)?;
    let (out_ptr, lse_ptr) = (out_storage.device_ptr(), lse_storage.device_ptr());
    let out = Tensor::from_storage(Storage::Cuda(out_storage), &[b, lq, h, d])?.permute(&[0, 2, 1, 3])?;
    let lse = Tensor::from_storage(Storage::Cuda(lse_storage), &[b, h, lq])?;
    let (lse2, lse2_ptr) = match mode {
        Mode::Extended | Mode::ExtendedHopper => (None, 0),
        Mode::Decoupled { .. } => {
            let st = CudaStorage::alloc(dev, DType::F32, b * h * lq)?;
            let ptr = st.device_ptr();
            (Some(Tensor::from_storage(Storage::Cuda(st), &[b, h, lq])?), ptr)
        }
    };
    if b * h * lq == 0 {
        return Ok((out, lse, lse2));
    }
    let (heads, lq32, lk32, lr32) = (u32_of(op, "H", h, q.shape())?, u32_of(op, "Lq", lq, q.shape())?, u32_of(op, "Lk", lk, k.shape())?, u32_of(op, "Lr", lr, q.shape())?);
    if h > 65535 || b > 65535 {
        return Err(Error::BadShape { op, msg: "B and H must be at most 65535 (grid dims)".into(), shape: q.shape().to_vec() });
    }
    // Views kept alive until the launch is queued (the stream orders their later reuse).
    let (qv, q_addr, q_stride) = kernel_view(op, q)?;
    let (kv, k_addr, k_stride) = kernel_view(op, k)?;
    let (vv, v_addr, v_stride) = kernel_view(op, v)?;
    let mut p = FlashParams { q: q_addr, k: k_addr, v: v_addr, out: out_ptr, lse: lse_ptr, lse2: lse2_ptr, q_stride, k_stride, v_stride, heads, lq: lq32, lk: lk32, lr: lr32, scale_log2: scale * std::f32::consts::LOG2_E, ..Default::default() };
    p.out_stride = [(lq * h * d) as i64, d as i64, (h * d) as i64];
    if let Mode::Decoupled { s2 } = mode {
        p.decoupled_scale = s2;
    }
    let mut keep_alive = vec![qv, kv, vv];
    if let Some(r) = reference.filter(|_| lr > 0) {
        let (krv, kr_addr, kr_stride) = kernel_view(op, r.k)?;
        let (vrv, vr_addr, vr_stride) = kernel_view(op, r.v)?;
        (p.k_ref, p.k_ref_stride, p.v_ref, p.v_ref_stride) = (kr_addr, kr_stride, vr_addr, vr_stride);
        keep_alive.extend([krv, vrv]);
        if let Some(keep) = r.keep {
            // The decoupled mode has no keep mask (its callers never pass one).
            debug_assert!(!matches!(mode, Mode::Decoupled { .. }));
            let keep = keep.contiguous()?;
            p.keep = match &*keep.read_storage() {
                Storage::Cuda(s) => s.ptr_at(keep.layout().offset()),
                Storage::Cpu(_) => return Err(Error::DeviceMismatch { op, lhs: Device::Cpu, rhs: q.device() }),
            };
            p.keep_batch_stride = if keep_per_batch { lr as i64 } else { 0 };
            keep_alive.push(keep);
        }
    }
    let variant = if matches!(mode, Mode::ExtendedHopper) && d == 64 {
        let shape = || format!("{dtype:?} b{b} h{h} lq{lq} lk{lk} lr{lr} d{d}{}", if p.keep == 0 { "" } else { " keep" });
        Some(tune::choose(dev, &HOPPER_VARIANTS, &shape, &mut |v| queue(dev, &p, mode, dtype, Some(v), (b, h, lq, d)))?)
    } else {
        // A variable naming no variant is an error wherever it would be read.
        tune::requested(&HOPPER_VARIANTS)?;
        None
    };
    queue(dev, &p, mode, dtype, variant, (b, h, lq, d))?;
    drop(keep_alive);
    Ok((out, lse, lse2))
}

/// Queues the kernel instance of `mode` (and, in the Hopper mode, `variant`) on parameters `p`
/// for `(b, h, lq, d)`.
fn queue(dev: &Arc<CudaDevice>, p: &FlashParams, mode: Mode, dtype: DType, variant: Option<&str>, (b, h, lq, d): (usize, usize, usize, usize)) -> Result<()> {
    let tn = if dtype == DType::BF16 { "bf16" } else { "f16" };
    // (source, instance, threads, query rows a block, dynamic shared memory)
    let (source, mut name, threads, rows, smem): (&KernelSource, String, u32, usize, u32) = match mode {
        Mode::Extended => (&kernels::flash_attention::SOURCE, kernel_name(tn, d), THREADS, rows_per_block(d), shared_bytes(d)),
        Mode::Decoupled { .. } => (&kernels::flash_attention::SOURCE, decoupled_kernel_name(tn, d), THREADS, rows_per_block(d), shared_bytes(d)),
        Mode::ExtendedHopper => hopper_instance(tn, d, variant),
    };
    // The TMA instance's tensor maps (k, v, k_ref, v_ref); views it cannot map run the cp.async
    // instance "ws" (same geometry) instead.
    let mut maps = None;
    if name == hopper_variant_kernel_name(tn, WS_TMA_VARIANT) {
        maps = ws_tma_maps(dtype, p, b, h)?;
        if maps.is_none() {
            name = hopper_variant_kernel_name(tn, "ws");
        }
    }
    let f = dev.function(source, &name)?;
    if smem > 48 * 1024 {
        dev.bind()?;
        f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).map_err(|e| Error::Cuda(format!("{name}: cuFuncSetAttribute(max dynamic shared memory = {smem}): {e}")))?;
    }
    let cfg = LaunchConfig { grid_dim: (lq.div_ceil(rows) as u32, p.heads, b as u32), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    let mut builder = dev.launch_builder(&f);
    let params = KernelParams(*p);
    builder.arg(&params);
    if let Some(maps) = &maps {
        for map in maps {
            builder.arg(map);
        }
    }
    // SAFETY: FlashParams mirrors the kernel's struct; every address points into a live CUDA
    // storage (the caller's views, out, lse and lse2, alive until this returns) covering the sizes
    // and strides given, and the row strides and starts meet the kernel's alignment (kernel_view).
    unsafe { builder.launch(cfg) }.map_err(launch_failed(&name))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuned_variants_are_the_kernels_crates() {
        assert_eq!(HOPPER_VARIANTS.names[0], "default");
        assert_eq!(&HOPPER_VARIANTS.names[1..], kernels::flash_attention::HOPPER_D64_VARIANTS);
        // The default and head dim 128 take the default instance; a variant its own.
        assert_eq!(hopper_instance("bf16", 64, Some("default")).1, hopper_kernel_name("bf16", 64));
        assert_eq!(hopper_instance("bf16", 128, Some("ws")).1, hopper_kernel_name("bf16", 128));
        assert_eq!(hopper_instance("f16", 64, Some("ws3")).1, hopper_variant_kernel_name("f16", "ws3"));
    }
}
