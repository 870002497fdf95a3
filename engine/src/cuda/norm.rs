//! CUDA arms of the reductions, softmax, normalisations (layer / group / batch norm and their
//! backward passes), GEGLU, PReLU and the Philox RNG: kernels/cuda/{reduce,softmax,norm,rng}.cu.
//! The ops in engine/src/ops validate their inputs and call these with contiguous row layouts
//! (reduced / softmax dims moved last and copied when needed); group norm also takes
//! channels-last (NHWC-strided) inputs as they are. Per-channel parameters are passed to the
//! kernels as contiguous f32 vectors (converted here; they are small). Statistics and partial sums
//! live in pooled f32 scratch storages that return to the pool when dropped: safe, because every
//! use is ordered on the device's one stream.

use std::sync::Arc;

use kernels::{norm as knorm, reduce as kreduce, rng as krng, softmax as ksoftmax};

use super::device::CudaDevice;
use super::launch::{launch_1d, launch_failed};
use super::storage::CudaStorage;
use super::tune;
use super::{LaunchConfig, PushKernelArg};
use cudarc::driver::sys;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// f32 values of its row each thread of the cached softmax / layer-norm kernels holds (SM_CACHE,
/// LN_CACHE in the .cu files), and their largest blocks.
const ROW_CACHE: usize = 16;
const SOFTMAX_MAX_BLOCK: usize = 1024;
const LN_MAX_BLOCK: usize = 512;
/// Threads of a block in warp-per-row mode (8 rows a block), and of the other kernels' blocks.
const WARP_ROWS_BLOCK: u32 = 256;
const BLOCK: u32 = 256;

fn dt_name(op: &'static str, dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        _ => Err(Error::UnsupportedDType { op, dtype: dt }),
    }
}

/// Device address of `t`'s first element and its device; `t` must be a CUDA tensor (its layout
/// is the caller's business: the kernels here read contiguous data).
fn addr(t: &Tensor, op: &'static str) -> Result<(u64, Arc<CudaDevice>)> {
    match &*t.read_storage() {
        Storage::Cuda(s) => Ok((s.ptr_at(t.layout().offset()), s.device().clone())),
        Storage::Cpu(_) => Err(Error::DeviceMismatch { op, lhs: t.device(), rhs: Device::Cuda(0) }),
    }
}

/// A per-channel parameter as a contiguous f32 CUDA tensor, or None; the address is 0 when absent.
fn param(p: Option<&Tensor>) -> Result<(Option<Tensor>, u64)> {
    match p {
        None => Ok((None, 0)),
        Some(p) => {
            let t = p.to_dtype(DType::F32)?.contiguous()?;
            let (a, _) = addr(&t, "parameter")?;
            Ok((Some(t), a))
        }
    }
}

fn u32_of(op: &'static str, what: &str, v: usize, shape: &[usize]) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::BadShape { op, msg: format!("{what} = {v} is too large for the CUDA kernels (at most 2^32 - 1)"), shape: shape.to_vec() })
}

fn wrap(s: CudaStorage, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_storage(Storage::Cuda(s), shape)
}

/// Threads per row for a row kernel holding ROW_CACHE values a thread: a warp when that fits, else
/// a block of a multiple of 32 threads; None when the row is longer than `max_block` threads hold.
fn threads_per_row(cols: usize, max_block: usize) -> Option<u32> {
    let tpr = cols.div_ceil(ROW_CACHE).div_ceil(32).max(1) * 32;
    (tpr <= max_block).then_some(tpr as u32)
}

/// Grid for `tpr` threads a row: 8 rows a block of 256 in warp mode, else a block per row.
fn rows_config(rows: usize, tpr: u32) -> LaunchConfig {
    if tpr == 32 {
        let per = (WARP_ROWS_BLOCK / 32) as usize;
        LaunchConfig { grid_dim: (rows.div_ceil(per).max(1) as u32, 1, 1), block_dim: (WARP_ROWS_BLOCK, 1, 1), shared_mem_bytes: 0 }
    } else {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (tpr, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Elements of its row each thread of the packed 16-bit softmax / layer-norm kernels holds as raw
/// 16-bit values (packs of 8: SMP_PACKS, LNP_PACKS in the .cu files), and their largest block.
const SOFTMAX_PACKED_CACHE: usize = 32;
const LAYER_NORM_PACKED_CACHE: usize = 40;
const PACKED_MAX_BLOCK: usize = 1024;

/// Threads per row and grid of the packed 16-bit row kernels (softmax_packed_DT,
/// layer_norm_packed_DT), or None when they do not apply: f32 (its cached kernels already stream
/// at copy speed), rows not a whole number of 16-byte packs or unaligned, rows too long. tpr is a
/// power of two (32 ..= 1024) so that blocks of max(256, tpr) threads hold whole rows.
fn packed_rows_config(dt: DType, rows: usize, cols: usize, cache: usize, src: u64, dst: u64) -> Option<(u32, LaunchConfig)> {
    if !super::experimental_kernels() {
        return None;
    }
    if !matches!(dt, DType::BF16 | DType::F16) || !cols.is_multiple_of(8) || !src.is_multiple_of(16) || !dst.is_multiple_of(16) {
        return None;
    }
    let tpr = cols.div_ceil(cache).next_power_of_two().max(32);
    if tpr > PACKED_MAX_BLOCK {
        return None;
    }
    let block = tpr.max(WARP_ROWS_BLOCK as usize);
    let grid = rows.div_ceil(block / tpr).max(1);
    let grid = u32::try_from(grid).ok()?;
    Some((tpr as u32, LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 }))
}

// ---- reductions ------------------------------------------------------------------------------

/// sum / mean / var (kernels::reduce::OP_*) of each of the `rows` contiguous rows of `cols`
/// elements of `x` (contiguous): a [rows] tensor of x's dtype.
pub(crate) fn sum_rows(x: &Tensor, rows: usize, cols: usize, op: i32, correction: f32) -> Result<Tensor> {
    const OP: &str = "sum";
    let dt = dt_name(OP, x.dtype())?;
    let (src, dev) = addr(x, OP)?;
    let out = CudaStorage::alloc(&dev, x.dtype(), rows)?;
    if rows == 0 {
        return wrap(out, &[rows]);
    }
    let rows32 = u32_of(OP, "rows", rows, x.shape())?;
    let (dst, cols64) = (out.device_ptr(), cols as u64);
    // Long rows and few of them: split each row over several blocks so that the GPU fills.
    let sms = dev.multiprocessors() as usize;
    let tpr: u32 = if cols <= 1024 { 32 } else { kreduce::BLOCK };
    let mut chunks = 1usize;
    if tpr != 32 && rows < 2 * sms && cols >= 16 * 2048 {
        chunks = (4 * sms).div_ceil(rows).min(cols / 8192).clamp(1, 65535);
    }
    let chunk_len = cols.div_ceil(chunks).div_ceil(2048) * 2048;
    let chunks = cols.div_ceil(chunk_len).max(1);
    let part = if chunks > 1 { Some(CudaStorage::alloc(&dev, DType::F32, rows * chunks * 2)?) } else { None };
    let part_ptr = part.as_ref().map_or(0, |p| p.device_ptr());
    let (chunk_len64, corr) = (chunk_len as u64, correction);
    let name = format!("sum_rows_{dt}");
    let f = dev.function(&kreduce::SOURCE, &name)?;
    let mut b = dev.launch_builder(&f);
    b.arg(&src).arg(&dst).arg(&part_ptr).arg(&rows32).arg(&cols64).arg(&tpr).arg(&chunk_len64).arg(&op).arg(&corr);
    let mut cfg = rows_config(rows, tpr);
    cfg.grid_dim.1 = chunks as u32;
    // SAFETY: arguments match sum_rows_DT in reduce.cu; x holds rows * cols elements, out rows,
    // part rows * chunks * 2 floats when chunks > 1.
    unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    if chunks > 1 {
        let chunks32 = chunks as u32;
        let name = format!("sum_finalize_{dt}");
        let f = dev.function(&kreduce::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&part_ptr).arg(&dst).arg(&rows32).arg(&cols64).arg(&chunks32).arg(&op).arg(&corr);
        // SAFETY: arguments match sum_finalize_DT.
        unsafe { b.launch(launch_1d(rows, kreduce::BLOCK)) }.map_err(launch_failed(&name))?;
    }
    drop(part);
    wrap(out, &[rows])
}

/// Max (or min) of each contiguous row and the index of the first winner (NaN wins), any dtype.
pub(crate) fn extreme_rows(x: &Tensor, rows: usize, cols: usize, want_max: bool) -> Result<(Tensor, Tensor)> {
    const OP: &str = "max";
    let dt = match x.dtype() {
        DType::I64 => "i64",
        DType::U8 => "u8",
        d => dt_name(OP, d)?,
    };
    let (src, dev) = addr(x, OP)?;
    let vals = CudaStorage::alloc(&dev, x.dtype(), rows)?;
    let idx = CudaStorage::alloc(&dev, DType::I64, rows)?;
    if rows > 0 {
        let rows32 = u32_of(OP, "rows", rows, x.shape())?;
        let cols32 = u32_of(OP, "row length", cols, x.shape())?;
        let tpr: u32 = if cols <= 1024 { 32 } else { kreduce::BLOCK };
        let (vp, ip, wm) = (vals.device_ptr(), idx.device_ptr(), want_max as i32);
        let name = format!("extreme_rows_{dt}");
        let f = dev.function(&kreduce::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&vp).arg(&ip).arg(&rows32).arg(&cols32).arg(&tpr).arg(&wm);
        // SAFETY: arguments match extreme_rows_DT; cols >= 1 (the op refuses empty rows).
        unsafe { b.launch(rows_config(rows, tpr)) }.map_err(launch_failed(&name))?;
    }
    Ok((wrap(vals, &[rows])?, wrap(idx, &[rows])?))
}

// ---- softmax ---------------------------------------------------------------------------------

/// Softmax (or log-softmax) over the last dim of the contiguous CUDA tensor `x`.
pub(crate) fn softmax_last(x: &Tensor, log: bool) -> Result<Tensor> {
    const OP: &str = "softmax";
    let dt = dt_name(OP, x.dtype())?;
    let cols = x.shape().last().copied().unwrap_or(1);
    let n = x.elem_count();
    let (src, dev) = addr(x, OP)?;
    let out = CudaStorage::alloc(&dev, x.dtype(), n)?;
    if n > 0 {
        let rows = n / cols;
        let (rows32, cols32) = (u32_of(OP, "rows", rows, x.shape())?, u32_of(OP, "row length", cols, x.shape())?);
        let (dst, lm) = (out.device_ptr(), log as i32);
        if let Some((tpr, cfg)) = packed_rows_config(x.dtype(), rows, cols, SOFTMAX_PACKED_CACHE, src, dst) {
            let name = format!("softmax_packed_{dt}");
            let f = dev.function(&ksoftmax::SOURCE, &name)?;
            let mut b = dev.launch_builder(&f);
            b.arg(&src).arg(&dst).arg(&rows32).arg(&cols32).arg(&tpr).arg(&lm);
            // SAFETY: arguments match softmax_packed_DT; cols is a multiple of 8 and at most
            // tpr * SOFTMAX_PACKED_CACHE, x and y are 16-byte aligned.
            unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
            return wrap(out, x.shape());
        }
        match threads_per_row(cols, SOFTMAX_MAX_BLOCK) {
            Some(tpr) => {
                let name = format!("softmax_{dt}");
                let f = dev.function(&ksoftmax::SOURCE, &name)?;
                let mut b = dev.launch_builder(&f);
                b.arg(&src).arg(&dst).arg(&rows32).arg(&cols32).arg(&tpr).arg(&lm);
                // SAFETY: arguments match softmax_DT; cols <= tpr * SM_CACHE.
                unsafe { b.launch(rows_config(rows, tpr)) }.map_err(launch_failed(&name))?;
            }
            None => {
                let name = format!("softmax_long_{dt}");
                let f = dev.function(&ksoftmax::SOURCE, &name)?;
                let mut b = dev.launch_builder(&f);
                b.arg(&src).arg(&dst).arg(&cols32).arg(&lm);
                let cfg = LaunchConfig { grid_dim: (rows32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: arguments match softmax_long_DT.
                unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
            }
        }
    }
    wrap(out, x.shape())
}

// ---- layer norm ------------------------------------------------------------------------------

/// Layer norm over the last dim of the contiguous CUDA tensor `x`.
pub(crate) fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let dt = dt_name(OP, x.dtype())?;
    let cols = x.shape().last().copied().unwrap_or(1);
    let n = x.elem_count();
    let (src, dev) = addr(x, OP)?;
    let (_w, wp) = param(weight)?;
    let (_b, bp) = param(bias)?;
    let out = CudaStorage::alloc(&dev, x.dtype(), n)?;
    if n > 0 && cols > 0 {
        let rows = n / cols;
        let (rows32, cols32) = (u32_of(OP, "rows", rows, x.shape())?, u32_of(OP, "row length", cols, x.shape())?);
        let dst = out.device_ptr();
        if let Some((tpr, cfg)) = packed_rows_config(x.dtype(), rows, cols, LAYER_NORM_PACKED_CACHE, src, dst) {
            let name = format!("layer_norm_packed_{dt}");
            let f = dev.function(&knorm::SOURCE, &name)?;
            let mut b = dev.launch_builder(&f);
            b.arg(&src).arg(&dst).arg(&wp).arg(&bp).arg(&rows32).arg(&cols32).arg(&tpr).arg(&eps);
            // SAFETY: arguments match layer_norm_packed_DT; cols is a multiple of 8 and at most
            // tpr * LAYER_NORM_PACKED_CACHE, x and y are 16-byte aligned; w/b hold cols floats or are null.
            unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
            return wrap(out, x.shape());
        }
        match threads_per_row(cols, LN_MAX_BLOCK) {
            Some(tpr) => {
                let name = format!("layer_norm_{dt}");
                let f = dev.function(&knorm::SOURCE, &name)?;
                let mut b = dev.launch_builder(&f);
                b.arg(&src).arg(&dst).arg(&wp).arg(&bp).arg(&rows32).arg(&cols32).arg(&tpr).arg(&eps);
                // SAFETY: arguments match layer_norm_DT; cols <= tpr * LN_CACHE; w/b hold cols floats or are null.
                unsafe { b.launch(rows_config(rows, tpr)) }.map_err(launch_failed(&name))?;
            }
            None => {
                let name = format!("layer_norm_long_{dt}");
                let f = dev.function(&knorm::SOURCE, &name)?;
                let mut b = dev.launch_builder(&f);
                b.arg(&src).arg(&dst).arg(&wp).arg(&bp).arg(&cols32).arg(&eps);
                let cfg = LaunchConfig { grid_dim: (rows32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: arguments match layer_norm_long_DT.
                unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
            }
        }
    }
    wrap(out, x.shape())
}

/// Column sums of `chunks` rows of `cols` f32 partials starting at `src`: a [cols] f32 tensor.
fn col_sum(dev: &Arc<CudaDevice>, src: u64, chunks: usize, cols: usize) -> Result<Tensor> {
    let out = CudaStorage::alloc(dev, DType::F32, cols)?;
    let (dst, c32, n32) = (out.device_ptr(), chunks as u32, cols as u32);
    let f = dev.function(&knorm::SOURCE, "col_sum")?;
    let mut b = dev.launch_builder(&f);
    b.arg(&src).arg(&dst).arg(&c32).arg(&n32);
    // SAFETY: arguments match col_sum; src holds chunks * cols floats.
    unsafe { b.launch(launch_1d(cols, BLOCK)) }.map_err(launch_failed("col_sum"))?;
    wrap(out, &[cols])
}

/// Layer-norm backward over the last dim of contiguous `x` and `dy`: dx (x's dtype) and, when
/// asked, f32 dweight and dbias.
pub(crate) fn layer_norm_backward(x: &Tensor, dy: &Tensor, weight: Option<&Tensor>, eps: f32, param_grads: bool) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    const OP: &str = "layer_norm_backward";
    let dt = dt_name(OP, x.dtype())?;
    let cols = x.shape().last().copied().unwrap_or(1);
    let n = x.elem_count();
    let rows = n.checked_div(cols).unwrap_or(0);
    let (xp, dev) = addr(x, OP)?;
    let (dyp, _) = addr(dy, OP)?;
    let (_w, wp) = param(weight)?;
    let dx = CudaStorage::alloc(&dev, x.dtype(), n)?;
    let stats = if param_grads { Some(CudaStorage::alloc(&dev, DType::F32, 2 * rows.max(1))?) } else { None };
    let sp = stats.as_ref().map_or(0, |s| s.device_ptr());
    if n > 0 {
        let (rows32, cols32) = (u32_of(OP, "rows", rows, x.shape())?, u32_of(OP, "row length", cols, x.shape())?);
        let tpr: u32 = if cols <= 1024 { 32 } else { 1024 };
        let dxp = dx.device_ptr();
        let name = format!("layer_norm_bwd_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&dyp).arg(&wp).arg(&dxp).arg(&sp).arg(&rows32).arg(&cols32).arg(&tpr).arg(&eps);
        // SAFETY: arguments match layer_norm_bwd_DT; stats holds 2 * rows floats or is null.
        unsafe { b.launch(rows_config(rows, tpr)) }.map_err(launch_failed(&name))?;
    }
    let dx = wrap(dx, x.shape())?;
    if !param_grads {
        return Ok((dx, None));
    }
    if n == 0 {
        let z = Tensor::zeros(&[cols], DType::F32, x.device())?;
        return Ok((dx, Some((z.clone(), z))));
    }
    // Row chunks: enough (column block, chunk) blocks to fill the GPU, each summing >= 32 rows.
    let sms = dev.multiprocessors() as usize;
    let col_blocks = cols.div_ceil(BLOCK as usize);
    let chunks = (4 * sms).div_ceil(col_blocks).min(rows.div_ceil(32)).clamp(1, 65535);
    let rows_per_chunk = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(rows_per_chunk);
    let part = CudaStorage::alloc(&dev, DType::F32, 2 * chunks * cols)?;
    let (pp, rows32, cols32, rpc) = (part.device_ptr(), rows as u32, cols as u32, rows_per_chunk as u32);
    let name = format!("layer_norm_bwd_params_{dt}");
    let f = dev.function(&knorm::SOURCE, &name)?;
    let mut b = dev.launch_builder(&f);
    b.arg(&xp).arg(&dyp).arg(&sp).arg(&pp).arg(&rows32).arg(&cols32).arg(&rpc);
    let cfg = LaunchConfig { grid_dim: (col_blocks as u32, chunks as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments match layer_norm_bwd_params_DT; part holds 2 * chunks * cols floats.
    unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    let dw = col_sum(&dev, pp, chunks, cols)?;
    let db = col_sum(&dev, pp + (chunks * cols * 4) as u64, chunks, cols)?;
    Ok((dx, Some((dw, db))))
}

// ---- group norm ------------------------------------------------------------------------------

/// How group-norm kernels see an [N, C, *] input: NCHW-contiguous, or channels-last (a contiguous
/// [N, *, C] permuted back), with HW the product of the spatial sizes.
struct GnLayout {
    x: Tensor,
    channels_last: bool,
    /// Channels-last kernels read 16-byte packs of channels (C a multiple of the pack, aligned).
    vec: bool,
    n: usize,
    c: usize,
    hw: usize,
}

/// The permutation [0, 2, 3, .., 1] that moves channels last.
fn to_channels_last(rank: usize) -> Vec<usize> {
    let mut p: Vec<usize> = vec![0];
    p.extend(2..rank);
    p.push(1);
    p
}

/// The inverse of `to_channels_last`.
fn from_channels_last(rank: usize) -> Vec<usize> {
    let mut p: Vec<usize> = vec![0, rank - 1];
    p.extend(1..rank - 1);
    p
}

fn gn_layout(x: &Tensor) -> Result<GnLayout> {
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let hw: usize = x.shape()[2..].iter().product();
    if x.is_contiguous() {
        return Ok(GnLayout { x: x.clone(), channels_last: false, vec: false, n, c, hw });
    }
    let cl = x.permute(&to_channels_last(x.rank()))?;
    if cl.is_contiguous() {
        return Ok(GnLayout { x: cl, channels_last: true, vec: false, n, c, hw });
    }
    Ok(GnLayout { x: x.contiguous()?, channels_last: false, vec: false, n, c, hw })
}

/// `t` (of x's logical shape) laid out like `l` (contiguous in that memory order).
fn like_layout(t: &Tensor, l: &GnLayout) -> Result<Tensor> {
    if l.channels_last {
        t.permute(&to_channels_last(t.rank()))?.contiguous()
    } else {
        t.contiguous()
    }
}

/// A result storage in `l`'s memory order, as a tensor of the logical [N, C, *] `shape`.
fn wrap_like(s: CudaStorage, shape: &[usize], l: &GnLayout) -> Result<Tensor> {
    if !l.channels_last {
        return wrap(s, shape);
    }
    let perm = to_channels_last(shape.len());
    let stored: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
    wrap(s, &stored)?.permute(&from_channels_last(shape.len()))
}

/// Lanes of the statistics / backward reductions: (lanes L, NCHW chunk length).
fn gn_lanes(dev: &CudaDevice, l: &GnLayout) -> (usize, usize) {
    let sms = dev.multiprocessors() as usize;
    if l.channels_last {
        let v = 16 / l.x.dtype().size_in_bytes();
        let npk = if l.vec { l.c / v } else { l.c };
        let rows_per_block = (BLOCK as usize / npk).max(1);
        // Each block row should sum >= 16 positions; about 4 blocks an SM in all.
        let by_work = l.hw.div_ceil(rows_per_block * 16);
        let by_fill = (4 * sms).div_ceil(l.n.max(1));
        (by_work.min(by_fill).clamp(1, 65535), 0)
    } else {
        // Chunks of >= 2048 elements (8 per thread), enough to give ~8 blocks an SM (a full SM of
        // 256-thread blocks, each thread's few 16-byte loads unrolled and in flight together).
        let planes = l.n * l.c;
        let want = (8 * sms).div_ceil(planes.max(1)).max(1);
        let chunk = l.hw.div_ceil(want).max(2048).div_ceil(8) * 8;
        (l.hw.div_ceil(chunk).clamp(1, 65535), chunk)
    }
}

/// Launches the statistics and finalize kernels: (stats [N*G*2] f32, coef [N*C*4] f32 when asked).
fn gn_stats(dev: &Arc<CudaDevice>, l: &GnLayout, groups: usize, wp: u64, bp: u64, eps: f32, want_coef: bool) -> Result<(CudaStorage, Option<CudaStorage>)> {
    const OP: &str = "group_norm";
    let dt = dt_name(OP, l.x.dtype())?;
    let (xp, _) = addr(&l.x, OP)?;
    let (lanes, chunk) = gn_lanes(dev, l);
    let part = CudaStorage::alloc(dev, DType::F32, 3 * l.n * l.c * lanes)?;
    let pp = part.device_ptr();
    let (c32, hw32, l32) = (l.c as u32, l.hw as u32, lanes as u32);
    if l.channels_last {
        let name = format!("gn_stats_nhwc_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&pp).arg(&c32).arg(&hw32);
        let cfg = LaunchConfig { grid_dim: (l32, l.n as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_stats_nhwc_DT; C / V <= BLOCK, with V = 1 where C % V != 0 or
        // x is unaligned (gn_layout_checked, as the kernel decides).
        unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    } else {
        let (chunk32,) = (chunk as u32,);
        let name = format!("gn_stats_nchw_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&pp).arg(&hw32).arg(&chunk32);
        let cfg = LaunchConfig { grid_dim: ((l.n * l.c) as u32, l32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_stats_nchw_DT; part holds 3 * N*C*L floats.
        unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    }
    let stats = CudaStorage::alloc(dev, DType::F32, 2 * l.n * groups)?;
    let coef = if want_coef { Some(CudaStorage::alloc(dev, DType::F32, 4 * l.n * l.c)?) } else { None };
    let (sp, cp) = (stats.device_ptr(), coef.as_ref().map_or(0, |c| c.device_ptr()));
    let (n32, g32, cl) = (l.n as u32, groups as u32, l.channels_last as i32);
    let name = format!("gn_finalize_{dt}");
    let f = dev.function(&knorm::SOURCE, &name)?;
    let mut b = dev.launch_builder(&f);
    b.arg(&xp).arg(&pp).arg(&sp).arg(&cp).arg(&wp).arg(&bp).arg(&n32).arg(&c32).arg(&hw32).arg(&g32).arg(&l32).arg(&cl).arg(&eps);
    let cfg = LaunchConfig { grid_dim: ((l.n * groups) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments match gn_finalize_DT.
    unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    drop(part);
    Ok((stats, coef))
}

/// Shapes the group-norm kernels refuse (the op then runs on an NCHW copy or errors).
fn gn_check(op: &'static str, x: &Tensor, groups: usize) -> Result<()> {
    let shape = x.shape();
    u32_of(op, "element count", x.elem_count(), shape)?;
    u32_of(op, "sample count * groups", shape[0] * groups, shape)?;
    Ok(())
}

/// Channels-last needs its C / V channel packs (V = 1 unless C is a multiple of the 16-byte pack
/// and the data is 16-byte aligned: the kernels decide the same way) to fit a block; else NCHW.
fn gn_layout_checked(x: &Tensor) -> Result<GnLayout> {
    let mut l = gn_layout(x)?;
    if l.channels_last {
        let v = 16 / x.dtype().size_in_bytes();
        l.vec = l.c.is_multiple_of(v) && addr(&l.x, "group_norm")?.0.is_multiple_of(16);
        let npk = if l.vec { l.c / v } else { l.c };
        if npk > BLOCK as usize {
            return Ok(GnLayout { x: x.contiguous()?, channels_last: false, vec: false, ..l });
        }
    }
    Ok(l)
}

/// Group norm (+SiLU) of an [N, C, *] CUDA tensor, NCHW or channels-last; the result keeps the
/// input's memory format (channels-last stays channels-last). With `want_stats`, also the
/// statistics every path computes anyway: an f32 [N, G, 2] tensor of (mean, rstd) per (sample,
/// group), for the backward (`group_norm_backward`'s `stats`). Without, the kernels get a null
/// pointer and write nothing.
pub(crate) fn group_norm(x: &Tensor, groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, silu: bool, want_stats: bool) -> Result<(Tensor, Option<Tensor>)> {
    let run = |variant| group_norm_with(x, groups, weight, bias, eps, silu, want_stats, variant);
    let Device::Cuda(ordinal) = x.device() else { return run(GnVariant::Auto) };
    let dev = super::device(ordinal)?;
    let shape = || format!("{:?} {:?} strides {:?} g{groups} silu {silu} stats {want_stats} affine {}", x.dtype(), x.shape(), x.strides(), weight.is_some());
    let variant = gn_choose(&dev, &shape, &mut |v| run(v).map(|_| ()))?;
    run(variant)
}

/// `group_norm` by the paths of `variant`.
#[allow(clippy::too_many_arguments)]
fn group_norm_with(x: &Tensor, groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32, silu: bool, want_stats: bool, variant: GnVariant) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "group_norm";
    let dt = dt_name(OP, x.dtype())?;
    gn_check(OP, x, groups)?;
    let l = gn_layout_checked(x)?;
    let (xp, dev) = addr(&l.x, OP)?;
    let out = CudaStorage::alloc(&dev, x.dtype(), x.elem_count())?;
    let stats_shape = [l.n, groups, 2];
    if x.elem_count() == 0 {
        let stats = if want_stats { Some(Tensor::zeros(&stats_shape, DType::F32, x.device())?) } else { None };
        return Ok((wrap_like(out, x.shape(), &l)?, stats));
    }
    let (_w, wp) = param(weight)?;
    let (_b, bp) = param(bias)?;
    let stats = if want_stats { Some(CudaStorage::alloc(&dev, DType::F32, 2 * l.n * groups)?) } else { None };
    let sp = stats.as_ref().map_or(0u64, |s| s.device_ptr());
    let finish = |out: CudaStorage, stats: Option<CudaStorage>| -> Result<(Tensor, Option<Tensor>)> {
        Ok((wrap_like(out, x.shape(), &l)?, stats.map(|s| wrap(s, &stats_shape)).transpose()?))
    };
    if let Some(plan) = gn_forward_path(&dev, &l, groups, xp, variant)? {
        let (yp, c32, hw32, g32, cs, act) = (out.device_ptr(), l.c as u32, l.hw as u32, groups as u32, plan.cs, silu as i32);
        let per = plan.packs as u32;
        if plan.shared > 0 {
            let mut args = [karg(&xp), karg(&yp), karg(&wp), karg(&bp), karg(&sp), karg(&c32), karg(&hw32), karg(&g32), karg(&cs), karg(&per), karg(&eps), karg(&act)];
            // SAFETY: the arguments match gn_cluster_smem_DT (x, y, w, b, stats, C, HW, G, cs, per,
            // eps, act) and live until the call returns; gn_cluster_smem_plan checked the kernel's
            // conditions (NCHW, HW % V == 0, aligned x (y is a fresh allocation), cs * per >=
            // packs, per * 16 bytes of dynamic shared memory opted in); stats holds 2 N G floats
            // or is null.
            unsafe { gn_cluster_launch(&dev, &plan, &mut args) }?;
        } else {
            let mut args = [karg(&xp), karg(&yp), karg(&wp), karg(&bp), karg(&sp), karg(&c32), karg(&hw32), karg(&g32), karg(&cs), karg(&eps), karg(&act)];
            // SAFETY: the arguments match gn_cluster_DT_pP (x, y, w, b, stats, C, HW, G, cs, eps,
            // act) and live until the call returns; gn_cluster_plan checked the kernel's conditions
            // (NCHW, HW % V == 0, aligned x (y is a fresh allocation), the group fits cs *
            // GNC_BLOCK * P packs); stats holds 2 N G floats or is null.
            unsafe { gn_cluster_launch(&dev, &plan, &mut args) }?;
        }
        return finish(out, stats);
    }
    if let Some(plan) = gn_grid_plan(&dev, &l, groups, false, variant)? {
        let part = CudaStorage::alloc(&dev, DType::F32, 3 * l.n * l.c * plan.lanes)?;
        let coef = CudaStorage::alloc(&dev, DType::F32, 4 * l.n * l.c)?;
        let (yp, pp, cp, bar) = (out.device_ptr(), part.device_ptr(), coef.device_ptr(), grid_barrier(&dev)?);
        let (c32, hw32, g32, ppb, held, act) = (l.c as u32, l.hw as u32, groups as u32, plan.positions as u32, plan.held as u32, silu as i32);
        let mut args =
            [karg(&xp), karg(&yp), karg(&wp), karg(&bp), karg(&pp), karg(&cp), karg(&sp), karg(&bar), karg(&c32), karg(&hw32), karg(&g32), karg(&ppb), karg(&held), karg(&eps), karg(&act)];
        // SAFETY: the arguments match gn_grid_nhwc_DT (x, y, w, b, part, coef, stats, bar, C, HW,
        // G, ppb, held, eps, act) and live until the call returns; gn_grid_plan checked the
        // kernel's conditions (channels-last with C % V == 0 and C / V <= BLOCK <= GNG_BLOCK,
        // 16-byte aligned x, y a fresh allocation, held * C elements of dynamic shared memory
        // opted in, every block resident at once); part holds 3 N C L floats, coef 4 N C, stats
        // 2 N G or null, bar is grid_barrier's pair.
        unsafe { gn_grid_launch(&dev, &plan, l.n, &mut args) }?;
        return finish(out, stats);
    }
    // Two-phase: gn_stats computes the statistics in the [N, G, 2] layout anyway.
    drop(stats);
    let (stats, coef) = gn_stats(&dev, &l, groups, wp, bp, eps, true)?;
    let Some(coef) = coef else { return Err(Error::Cuda("group_norm: gn_stats returned no coefficients".into())) };
    let stats = want_stats.then_some(stats);
    if l.channels_last && l.vec {
        // Channels-last with 16-byte channel packs: each thread keeps its pack's coefficients in
        // registers across positions (affine_apply reloads them for every pack: L1-bound).
        let (yp, cp) = (out.device_ptr(), coef.device_ptr());
        let (lanes, _) = gn_lanes(&dev, &l);
        let (c32, hw32, act) = (l.c as u32, l.hw as u32, silu as i32);
        let name = format!("gn_apply_nhwc_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&cp).arg(&c32).arg(&hw32).arg(&act);
        let cfg = LaunchConfig { grid_dim: (lanes as u32, l.n as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_apply_nhwc_DT; l.vec means C % V == 0 and x 16-byte aligned
        // (y is a fresh allocation), and gn_layout_checked keeps C / V <= BLOCK; coef holds 4
        // floats per (n, c).
        unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
        return finish(out, stats);
    }
    apply_affine(&dev, dt, xp, out.device_ptr(), coef.device_ptr(), x.elem_count(), l.c, l.hw, l.c, l.channels_last, silu)?;
    finish(out, stats)
}

// ---- single-launch group norm with thread-block clusters (sm_90+) --------------------------------

/// Threads of a CTA of the cluster kernels (GNC_BLOCK) and the packs a thread may hold (the
/// kernels' P instances, kernels/cuda/group_norm.cu).
const GNC_BLOCK: usize = 256;
const GNC_PACKS: [usize; 5] = [2, 4, 8, 12, 16];

/// A cluster launch of gn_cluster_DT_pP: `cs` CTAs per (sample, group).
struct GnClusterPlan {
    name: String,
    f: super::CudaFunction,
    cs: u32,
    /// Packs a thread holds (register kernels) or a CTA holds (shared-memory kernel).
    packs: usize,
    grid: u32,
    /// Dynamic shared memory bytes of a CTA (the shared-memory kernel; 0 for the others).
    shared: u32,
}

/// Which cluster kernel family a plan is for: the forward (gn_cluster_DT_pP) or the backward
/// (gn_cluster_bwd_DT_pP, same clusters and pack ownership).
#[derive(Clone, Copy)]
enum GnClusterKernel {
    Forward,
    Backward,
}

/// Channels of a group the backward cluster kernel's per-CTA partials hold (GNC_MAX_CPG).
const GNC_MAX_CPG: usize = 512;

/// The cluster kernel's plan for this input, or None where it does not apply (arch < 90,
/// channels-last, spatial size not a multiple of the 16-byte pack, unaligned data, a group too
/// large for 16 CTAs' registers, or a configuration the driver cannot co-schedule): the two-phase
/// kernels run then. Cluster size: the smallest power of two up to 8 that gives >= 2 CTAs an SM
/// and holds the group in <= 16 packs a thread; 16 CTAs (non-portable) only when 8 cannot hold it.
fn gn_cluster_plan(dev: &Arc<CudaDevice>, l: &GnLayout, groups: usize, xp: u64, kernel: GnClusterKernel) -> Result<Option<GnClusterPlan>> {
    if !super::experimental_kernels() {
        return Ok(None);
    }
    let Some(ClusterShape { dt, packs, clusters, sms }) = cluster_shape(dev, l, groups, xp)? else { return Ok(None) };
    for cs in [1usize, 2, 4, 8, 16] {
        let need = packs.div_ceil(cs * GNC_BLOCK);
        let Some(p) = GNC_PACKS.into_iter().find(|&p| p >= need) else { continue };
        if cs < 8 && clusters * cs < 2 * sms {
            continue;
        }
        let Ok(grid) = u32::try_from(clusters * cs) else { return Ok(None) };
        if grid > i32::MAX as u32 {
            return Ok(None);
        }
        let name = match kernel {
            GnClusterKernel::Forward => format!("gn_cluster_{dt}_p{p}"),
            GnClusterKernel::Backward => format!("gn_cluster_bwd_{dt}_p{p}"),
        };
        let f = dev.function(&knorm::GROUP_NORM_SOURCE, &name)?;
        if !gn_cluster_schedulable(dev, &f, &name, grid, cs as u32, 0)? {
            return Ok(None);
        }
        return Ok(Some(GnClusterPlan { name, f, cs: cs as u32, packs: p, grid, shared: 0 }));
    }
    Ok(None)
}

/// Which group-norm path runs (LOOKAHEAD_VARIANT_GROUP_NORM, for side-by-side benchmarks):
/// - `auto` (default): the per-shape rule of `gn_forward_path` / `gn_backward_uses_cluster`;
/// - `two-phase`: statistics -> finalize -> apply (forward), the reduce / finalize / dx kernels
///   (backward), on every arch;
/// - `cluster-regs`: the register cluster kernels (gn_cluster_DT_pP, gn_cluster_bwd_DT_pP)
///   wherever their plan applies;
/// - `cluster-smem`: the forward with the group in shared memory (gn_cluster_smem_DT) wherever
///   its plan applies; the backward as `auto` (there is no shared-memory backward);
/// - `cluster-smem-async`: as `cluster-smem` with cp.async loads (gn_cluster_smem_async_DT).
/// - `grid`: channels-last forwards and backwards by the grid-resident cooperative kernels
///   (gn_grid_nhwc_DT, gn_grid_bwd_nhwc_DT) wherever their plan applies; everything else as `auto`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GnVariant {
    Auto,
    TwoPhase,
    ClusterRegs,
    ClusterSmem,
    ClusterSmemAsync,
    Grid,
}

/// The group-norm variants (LOOKAHEAD_VARIANT_GROUP_NORM, or tuned: `gn_choose`); `auto` is the
/// measured per-shape rule.
pub const VARIANTS: super::tune::Variants = super::tune::Variants {
    family: "group_norm",
    names: &["auto", "two-phase", "cluster-regs", "cluster-smem", "cluster-smem-async", "grid"],
    sources: &[&kernels::norm::SOURCE, &kernels::norm::GROUP_NORM_SOURCE],
};

fn gn_variant(name: &str) -> Result<GnVariant> {
    Ok(match name {
        "auto" => GnVariant::Auto,
        "two-phase" => GnVariant::TwoPhase,
        "cluster-regs" => GnVariant::ClusterRegs,
        "cluster-smem" => GnVariant::ClusterSmem,
        "cluster-smem-async" => GnVariant::ClusterSmemAsync,
        "grid" => GnVariant::Grid,
        v => return Err(Error::Cuda(format!("group norm variant {v} has no path (engine/src/cuda/norm.rs gn_variant)"))),
    })
}

/// The variant a group-norm call runs (tune::choose): tuned only where the variants differ (sm_90
/// with the performance kernels on), by trial runs of the whole op on the call's operands (each
/// run computes its outputs afresh). `shape` names the call.
fn gn_choose(dev: &Arc<CudaDevice>, shape: &dyn Fn() -> String, trial: &mut dyn FnMut(GnVariant) -> Result<()>) -> Result<GnVariant> {
    if dev.arch() < 90 || !super::experimental_kernels() {
        return gn_variant(tune::requested(&VARIANTS)?.unwrap_or("auto"));
    }
    gn_variant(tune::choose(dev, &VARIANTS, shape, &mut |v| trial(gn_variant(v)?))?)
}

/// Bytes of one (sample, group) of x up to which the `auto` rule runs the register cluster
/// kernels (the backward always; the forward where the shared-memory kernel does not apply).
/// H200, bf16, 2026-11-28, ms (two-phase / cluster-regs / cluster-smem / cluster-smem-async):
/// forward (2,320,128,128) groups of 320 KB 0.032 / 0.037 / 0.029 / 0.030, (2,640,64,64) 160 KB
/// 0.021 / 0.020 / 0.018 / 0.019, (2,1280,32,32) 80 KB 0.018 / 0.015 / 0.014 / 0.014; backward
/// (two-phase / cluster-regs) 0.121 / 0.146, 0.069 / 0.052, 0.050 / 0.040. Above 160 KB the
/// register kernel needs >= 12 packs a thread (bf16 p12: 105 registers, 2 CTAs an SM; the
/// backward 174, 1 CTA), so its 8-CTA clusters run in several waves that each load, wait at the
/// cluster barriers and store with nothing overlapping, and the two-phase path wins.
const GNC_REGS_MAX_GROUP_BYTES: usize = 160 * 1024;

/// Largest dynamic shared memory a CTA of gn_cluster_smem_DT asks for: four such CTAs share an
/// SM's 228 KB (one wave for tensors up to ~4 x 132 x 48 KB).
const GNC_SMEM_MAX_BYTES: usize = 48 * 1024;

/// What both cluster plans start from: the dtype's kernel suffix, the group's 16-byte packs, the
/// (sample, group) count and the SMs; None where no cluster kernel applies (arch < 90,
/// channels-last, spatial size not a multiple of the pack, unaligned data, nothing to do).
struct ClusterShape {
    dt: &'static str,
    packs: usize,
    clusters: usize,
    sms: usize,
}

fn cluster_shape(dev: &Arc<CudaDevice>, l: &GnLayout, groups: usize, xp: u64) -> Result<Option<ClusterShape>> {
    let dt = dt_name("group_norm", l.x.dtype())?;
    let v = 16 / l.x.dtype().size_in_bytes();
    if dev.arch() < 90 || l.channels_last || !l.hw.is_multiple_of(v) || !xp.is_multiple_of(16) || groups == 0 || l.n == 0 {
        return Ok(None);
    }
    Ok(Some(ClusterShape { dt, packs: (l.c / groups) * l.hw / v, clusters: l.n * groups, sms: dev.multiprocessors() as usize }))
}

/// The shared-memory cluster kernel's plan, or None where it does not apply (the register
/// kernel's conditions, or a group above 16 CTAs x GNC_SMEM_MAX_BYTES). Cluster size: the
/// smallest power of two that keeps a CTA's share <= GNC_SMEM_MAX_BYTES and gives >= 2 CTAs an
/// SM (16, non-portable, only when 8 cannot hold the group).
fn gn_cluster_smem_plan(dev: &Arc<CudaDevice>, l: &GnLayout, groups: usize, xp: u64, cp_async: bool) -> Result<Option<GnClusterPlan>> {
    let Some(ClusterShape { dt, packs, clusters, sms }) = cluster_shape(dev, l, groups, xp)? else { return Ok(None) };
    for cs in [1usize, 2, 4, 8, 16] {
        let per = packs.div_ceil(cs);
        if per * 16 > GNC_SMEM_MAX_BYTES || (cs < 8 && clusters * cs < 2 * sms) {
            continue;
        }
        let Ok(grid) = u32::try_from(clusters * cs) else { return Ok(None) };
        if grid > i32::MAX as u32 {
            return Ok(None);
        }
        let name = if cp_async { format!("gn_cluster_smem_async_{dt}") } else { format!("gn_cluster_smem_{dt}") };
        let f = dev.function(&knorm::GROUP_NORM_SOURCE, &name)?;
        let shared = (per * 16) as u32;
        if !gn_cluster_schedulable(dev, &f, &name, grid, cs as u32, shared)? {
            return Ok(None);
        }
        return Ok(Some(GnClusterPlan { name, f, cs: cs as u32, packs: per, grid, shared }));
    }
    Ok(None)
}

/// The forward's kernels for this input: Some(plan) for a cluster kernel, None for two-phase.
/// `auto`: the shared-memory cluster kernel where it applies (fastest at every measured shape,
/// see GNC_REGS_MAX_GROUP_BYTES: the whole tensor is resident in one wave, x read once), else the
/// register cluster kernel for groups up to GNC_REGS_MAX_GROUP_BYTES, else two-phase.
fn gn_forward_path(dev: &Arc<CudaDevice>, l: &GnLayout, groups: usize, xp: u64, variant: GnVariant) -> Result<Option<GnClusterPlan>> {
    if !super::experimental_kernels() {
        return Ok(None);
    }
    let group_bytes = if groups == 0 { 0 } else { l.c / groups * l.hw * l.x.dtype().size_in_bytes() };
    match variant {
        GnVariant::TwoPhase => Ok(None),
        GnVariant::ClusterRegs => gn_cluster_plan(dev, l, groups, xp, GnClusterKernel::Forward),
        GnVariant::ClusterSmem => gn_cluster_smem_plan(dev, l, groups, xp, false),
        GnVariant::ClusterSmemAsync => gn_cluster_smem_plan(dev, l, groups, xp, true),
        GnVariant::Auto | GnVariant::Grid => {
            if let Some(p) = gn_cluster_smem_plan(dev, l, groups, xp, false)? {
                return Ok(Some(p));
            }
            if group_bytes > GNC_REGS_MAX_GROUP_BYTES {
                return Ok(None);
            }
            gn_cluster_plan(dev, l, groups, xp, GnClusterKernel::Forward)
        }
    }
}

/// Whether the backward runs the register cluster kernel (where its plan applies): always under
/// `cluster-regs`, never under `two-phase`, else (`auto`, `cluster-smem`) for groups up to
/// GNC_REGS_MAX_GROUP_BYTES.
fn gn_backward_uses_cluster(l: &GnLayout, groups: usize, variant: GnVariant) -> bool {
    let group_bytes = if groups == 0 { 0 } else { l.c / groups * l.hw * l.x.dtype().size_in_bytes() };
    match variant {
        GnVariant::TwoPhase => false,
        GnVariant::ClusterRegs => true,
        GnVariant::Auto | GnVariant::ClusterSmem | GnVariant::ClusterSmemAsync | GnVariant::Grid => group_bytes <= GNC_REGS_MAX_GROUP_BYTES,
    }
}

/// Whether the driver can run at least one cluster of `cs` CTAs of kernel `name` at a time
/// (cuOccupancyMaxActiveClusters > 0; above 8 CTAs after opting the kernel in). Asked once per (device, kernel, cluster size): the query
/// costs microseconds of host time, as much as the kernel itself on small tensors.
fn gn_cluster_schedulable(dev: &CudaDevice, f: &super::CudaFunction, name: &str, grid: u32, cs: u32, shared: u32) -> Result<bool> {
    type Key = (usize, String, u32, u32);
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<Key, bool>>> = std::sync::OnceLock::new();
    let key = (dev.ordinal(), name.to_string(), cs, shared);
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&ok) = seen.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(ok);
    }
    dev.bind()?;
    // Clusters above 8 CTAs need the kernel's opt-in (kept by the loaded function from now on).
    if cs > 8 && f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1).is_err() {
        seen.lock().unwrap_or_else(|e| e.into_inner()).insert(key, false);
        return Ok(false);
    }
    // Dynamic shared memory above 48 KB needs the kernel's opt-in too.
    if shared > 48 * 1024 && f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).is_err() {
        seen.lock().unwrap_or_else(|e| e.into_inner()).insert(key, false);
        return Ok(false);
    }
    let ok = super::launch::max_active_clusters(dev, f, (grid, GNC_BLOCK as u32, cs, shared))? > 0;
    seen.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ok);
    Ok(ok)
}

/// Launches `plan`'s kernel with its (pointer-to-value) arguments, in clusters of `plan.cs` CTAs.
///
/// # Safety
/// `args` must point at values matching the kernel's parameters, alive until the call returns
/// (the driver copies them), and the buffers they name must satisfy the kernel's host guarantees.
unsafe fn gn_cluster_launch(dev: &Arc<CudaDevice>, plan: &GnClusterPlan, args: &mut [*mut std::ffi::c_void]) -> Result<()> {
    // SAFETY: the arguments are the caller's promise.
    unsafe { super::launch::launch_cluster(dev, &plan.f, &plan.name, (plan.grid, GNC_BLOCK as u32, plan.cs, plan.shared), args) }
}

/// A kernel argument as cuLaunchKernelEx takes it (a pointer to the value).
fn karg<T>(v: &T) -> *mut std::ffi::c_void {
    v as *const T as *mut std::ffi::c_void
}

/// Which forward kernels `x.group_norm(groups, ..)` runs on its CUDA device, for reports:
/// "cluster (cs CTAs x P packs)" (one launch, sm_90+) or "two-phase" (statistics, finalize, apply).
pub fn group_norm_forward_path(x: &Tensor, groups: usize) -> Result<String> {
    const OP: &str = "group_norm";
    gn_check(OP, x, groups)?;
    let l = gn_layout_checked(x)?;
    let (xp, dev) = addr(&l.x, OP)?;
    let variant = gn_variant(tune::requested(&VARIANTS)?.unwrap_or("auto"))?;
    if let Some(p) = gn_grid_plan(&dev, &l, groups, false, variant)? {
        return Ok(format!("grid-resident ({} x {} blocks of {} positions, {} of them in shared memory, {})", p.lanes, l.n, p.positions, p.held, p.name));
    }
    Ok(match gn_forward_path(&dev, &l, groups, xp, variant)? {
        Some(p) if p.shared > 0 => format!("cluster ({} CTAs x {} packs/CTA in shared memory, {})", p.cs, p.packs, p.name),
        Some(p) => format!("cluster ({} CTAs x {} packs/thread, {})", p.cs, p.packs, p.name),
        None => "two-phase".to_string(),
    })
}

// ---- single-launch channels-last group norm: a grid-resident cooperative kernel --------------

/// Threads of a block of gn_grid_nhwc_DT (<= GNG_MAX_BLOCK in norm.cu).
const GNG_BLOCK: u32 = 512;

/// A cooperative launch of gn_grid_nhwc_DT: grid (lanes, N), each block owning `positions`
/// positions of its sample (all channels), the first `held` of them kept in `shared` bytes of
/// dynamic shared memory (the rest read again for the apply step).
struct GnGridPlan {
    name: String,
    f: super::CudaFunction,
    lanes: usize,
    positions: usize,
    held: usize,
    shared: u32,
}

/// The grid-resident kernel's plan (variant `grid` only, until measured), or None where it does not
/// apply: not channels-last with 16-byte channel packs, more samples than resident blocks. Blocks:
/// the SMs shared among the samples (512 threads of ~90 registers: one an SM); each keeps as much
/// of its slice as its shared memory holds (all of x up to about 132 x 190 KB on an H100/H200).
/// `backward`: gn_grid_bwd_nhwc_DT, which keeps x's and dy's slices (twice the shared memory a
/// position).
fn gn_grid_plan(dev: &Arc<CudaDevice>, l: &GnLayout, groups: usize, backward: bool, variant: GnVariant) -> Result<Option<GnGridPlan>> {
    if !super::experimental_kernels() || variant != GnVariant::Grid || !l.channels_last || !l.vec || groups == 0 || l.n == 0 || l.hw == 0 {
        return Ok(None);
    }
    let dt = dt_name("group_norm", l.x.dtype())?;
    let sms = dev.multiprocessors() as usize;
    let lanes = (sms / l.n).max(1);
    let positions = l.hw.div_ceil(lanes);
    let row = l.c * l.x.dtype().size_in_bytes() * if backward { 2 } else { 1 };
    let name = if backward { format!("gn_grid_bwd_nhwc_{dt}") } else { format!("gn_grid_nhwc_{dt}") };
    let f = dev.function(&knorm::SOURCE, &name)?;
    let Some(room) = gn_grid_room(dev, &f, &name)? else { return Ok(None) };
    let held = positions.min(room / row);
    let shared = (held * row) as u32;
    if gn_grid_blocks_per_sm(dev, &f, &name, shared)? * sms < lanes * l.n || u32::try_from(positions).is_err() {
        return Ok(None);
    }
    Ok(Some(GnGridPlan { name, f, lanes, positions, held, shared }))
}

// The driver queries below cost microseconds of host time each, as much as the kernel on small
// tensors: asked once per (device, kernel[, shared bytes]).

/// Dynamic shared memory a block of grid kernel `f` may use: the device's opt-in maximum less the
/// kernel's static shared memory, to which the kernel is opted in on first use; None if that fails.
fn gn_grid_room(dev: &CudaDevice, f: &super::CudaFunction, name: &str) -> Result<Option<usize>> {
    static ROOM: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<(usize, String), Option<usize>>>> = std::sync::OnceLock::new();
    let key = (dev.ordinal(), name.to_string());
    let mut seen = ROOM.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&room) = seen.get(&key) {
        return Ok(room);
    }
    dev.bind()?;
    let fixed = f.shared_size_bytes().map_err(|e| Error::Cuda(format!("reading the shared memory size of {name}: {e}")))? as usize;
    let room = (dev.max_shared_memory_per_block_optin() as usize).saturating_sub(fixed);
    let room = f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, room as i32).is_ok().then_some(room);
    seen.insert(key, room);
    Ok(room)
}

/// Blocks of GNG_BLOCK threads and `shared` dynamic bytes of grid kernel `f` resident an SM
/// (0 if the occupancy query fails).
fn gn_grid_blocks_per_sm(dev: &CudaDevice, f: &super::CudaFunction, name: &str, shared: u32) -> Result<usize> {
    static PER_SM: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<(usize, String, u32), usize>>> = std::sync::OnceLock::new();
    let key = (dev.ordinal(), name.to_string(), shared);
    let mut seen = PER_SM.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&n) = seen.get(&key) {
        return Ok(n);
    }
    dev.bind()?;
    let mut per_sm: std::ffi::c_int = 0;
    // SAFETY: f is a loaded kernel of this (bound) context; per_sm is written by the call.
    let ok = unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut per_sm, f.cu_function(), GNG_BLOCK as i32, shared as usize) }.result().is_ok();
    let n = if ok { per_sm.max(0) as usize } else { 0 };
    seen.insert(key, n);
    Ok(n)
}

/// Two u32 per device for grid_sync (kernels/cuda/cluster.cuh), zeroed once: every barrier leaves
/// its arrivals at zero, so launches on the device's stream share them.
fn grid_barrier(dev: &Arc<CudaDevice>) -> Result<u64> {
    static BARRIERS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<usize, CudaStorage>>> = std::sync::OnceLock::new();
    let mut map = BARRIERS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = map.get(&dev.ordinal()) {
        return Ok(s.device_ptr());
    }
    let s = CudaStorage::alloc(dev, DType::F32, 2)?;
    dev.memset(s.device_ptr(), 0, 8)?;
    let p = s.device_ptr();
    map.insert(dev.ordinal(), s);
    Ok(p)
}

/// Launches `plan`'s kernel cooperatively on a (lanes, n) grid of GNG_BLOCK threads.
///
/// # Safety
/// `args` must point at values matching the kernel's parameters, alive until the call returns,
/// and the buffers they name must satisfy the kernel's host guarantees.
unsafe fn gn_grid_launch(dev: &Arc<CudaDevice>, plan: &GnGridPlan, n: usize, args: &mut [*mut std::ffi::c_void]) -> Result<()> {
    // SAFETY: an all-zero attribute value is a valid bit pattern (plain integers).
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.cooperative = 1;
    let mut attr = sys::CUlaunchAttribute { id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE, pad: [0; 4], value };
    let cfg = sys::CUlaunchConfig {
        gridDimX: plan.lanes as u32,
        gridDimY: n as u32,
        gridDimZ: 1,
        blockDimX: GNG_BLOCK,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: plan.shared,
        hStream: dev.stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    dev.bind()?;
    dev.profile_launch(&plan.f);
    // SAFETY: cfg and its attribute live for the call; the arguments are the caller's promise.
    unsafe { sys::cuLaunchKernelEx(&cfg, plan.f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(launch_failed(&plan.name))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn apply_affine(dev: &Arc<CudaDevice>, dt: &str, xp: u64, yp: u64, coef: u64, total: usize, c: usize, hw: usize, cstride: usize, channels_last: bool, silu: bool) -> Result<()> {
    let v = match dt {
        "f32" => 4,
        _ => 8,
    };
    let (t32, c32, hw32, cs32, cl, act) = (total as u32, c as u32, hw as u32, cstride as u32, channels_last as i32, silu as i32);
    let name = format!("affine_apply_{dt}");
    let f = dev.function(&knorm::SOURCE, &name)?;
    let mut b = dev.launch_builder(&f);
    b.arg(&xp).arg(&yp).arg(&coef).arg(&t32).arg(&c32).arg(&hw32).arg(&cs32).arg(&cl).arg(&act);
    // The kernel takes packs of v exactly when this holds (same test inside).
    let vec_ok = (if channels_last { c.is_multiple_of(v) } else { hw.is_multiple_of(v) }) && xp.is_multiple_of(16) && yp.is_multiple_of(16);
    let per = if vec_ok { v } else { 1 };
    // SAFETY: arguments match affine_apply_DT; coef holds 4 floats per (n * cstride + c) index.
    unsafe { b.launch(launch_1d(total.div_ceil(per), BLOCK)) }.map_err(launch_failed(&name))?;
    Ok(())
}

/// Group-norm (+SiLU) backward: dx (x's dtype and memory format) and, when asked, f32 dweight
/// and dbias. `stats`: the forward's f32 [N, G, 2] (mean, rstd) (checked by the op), read instead
/// of recomputed: the two-phase path skips gn_stats (a read of x and two launches), the grid
/// kernel its statistics phase and two grid barriers, the cluster kernel two cluster rounds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    silu: bool,
    stats: Option<&Tensor>,
    param_grads: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let run = |variant| group_norm_backward_with(x, dy, groups, weight, bias, eps, silu, stats, param_grads, variant);
    let Device::Cuda(ordinal) = x.device() else { return run(GnVariant::Auto) };
    let dev = super::device(ordinal)?;
    let shape = || format!("backward {:?} {:?} strides {:?} g{groups} silu {silu} saved {} grads {param_grads} affine {}", x.dtype(), x.shape(), x.strides(), stats.is_some(), weight.is_some());
    let variant = gn_choose(&dev, &shape, &mut |v| run(v).map(|_| ()))?;
    run(variant)
}

/// `group_norm_backward` by the paths of `variant`.
#[allow(clippy::too_many_arguments)]
fn group_norm_backward_with(
    x: &Tensor,
    dy: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    silu: bool,
    stats: Option<&Tensor>,
    param_grads: bool,
    variant: GnVariant,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    const OP: &str = "group_norm_backward";
    let dt = dt_name(OP, x.dtype())?;
    gn_check(OP, x, groups)?;
    let l = gn_layout_checked(x)?;
    let mut dyl = like_layout(&dy.to_dtype(x.dtype())?, &l)?;
    if l.vec && !addr(&dyl, OP)?.0.is_multiple_of(16) {
        // The kernel reads x and dy with the same pack width: give dy a fresh (aligned) copy.
        dyl = dyl.copy()?;
    }
    let (xp, dev) = addr(&l.x, OP)?;
    let (dyp, _) = addr(&dyl, OP)?;
    let (_w, wp) = param(weight)?;
    let (_b, bp) = param(bias)?;
    let saved = stats.map(|s| s.contiguous()).transpose()?;
    let saved_ptr = match &saved {
        Some(s) => addr(s, OP)?.0,
        None => 0u64,
    };
    let total = x.elem_count();
    let dx = CudaStorage::alloc(&dev, x.dtype(), total)?;
    if total == 0 {
        let z = Tensor::zeros(&[l.c], DType::F32, x.device())?;
        return Ok((wrap_like(dx, x.shape(), &l)?, param_grads.then(|| (z.clone(), z))));
    }
    // One launch (sm_90 clusters, experimental): reads x and dy once, writes dx once.
    if groups > 0 && l.c / groups <= GNC_MAX_CPG && dyp.is_multiple_of(16) && gn_backward_uses_cluster(&l, groups, variant) {
        if let Some(plan) = gn_cluster_plan(&dev, &l, groups, xp, GnClusterKernel::Backward)? {
            // dw / db are sums of atomic adds into zeroed f32 buffers.
            let grads = if param_grads { Some((Tensor::zeros(&[l.c], DType::F32, x.device())?, Tensor::zeros(&[l.c], DType::F32, x.device())?)) } else { None };
            let (dwp, dbp) = match &grads {
                Some((dw, db)) => (addr(dw, OP)?.0, addr(db, OP)?.0),
                None => (0u64, 0u64),
            };
            let (dxp, c32, hw32, g32, cs, act) = (dx.device_ptr(), l.c as u32, l.hw as u32, groups as u32, plan.cs, silu as i32);
            let mut args =
                [karg(&xp), karg(&dyp), karg(&dxp), karg(&wp), karg(&bp), karg(&saved_ptr), karg(&dwp), karg(&dbp), karg(&c32), karg(&hw32), karg(&g32), karg(&cs), karg(&eps), karg(&act)];
            // SAFETY: the arguments match gn_cluster_bwd_DT_pP (x, dy, dx, w, b, stats, dw, db, C,
            // HW, G, cs, eps, act) and live until the call returns; gn_cluster_plan checked the
            // forward's conditions, dy is aligned (checked above; dy has x's NCHW layout,
            // like_layout), dx is a fresh allocation, C / G <= GNC_MAX_CPG, dw / db hold C zeroed
            // floats, stats 2 N G floats (contiguous [N, G, 2]) or is null.
            unsafe { gn_cluster_launch(&dev, &plan, &mut args) }?;
            return Ok((wrap_like(dx, x.shape(), &l)?, grads));
        }
    }
    if let Some(plan) = gn_grid_plan(&dev, &l, groups, true, variant)? {
        let part = CudaStorage::alloc(&dev, DType::F32, 3 * l.n * l.c * plan.lanes)?;
        // Without saved statistics the kernel computes them into its own scratch.
        let scratch = if saved.is_none() { Some(CudaStorage::alloc(&dev, DType::F32, 2 * l.n * groups)?) } else { None };
        let sp = scratch.as_ref().map_or(saved_ptr, |s| s.device_ptr());
        let coef = CudaStorage::alloc(&dev, DType::F32, 4 * l.n * l.c)?;
        let grads = if param_grads { Some((CudaStorage::alloc(&dev, DType::F32, l.c)?, CudaStorage::alloc(&dev, DType::F32, l.c)?)) } else { None };
        let (dwp, dbp) = grads.as_ref().map_or((0, 0), |(dw, db)| (dw.device_ptr(), db.device_ptr()));
        let (dxp, pp, cp, bar) = (dx.device_ptr(), part.device_ptr(), coef.device_ptr(), grid_barrier(&dev)?);
        let (c32, hw32, g32, ppb, held, act, have) = (l.c as u32, l.hw as u32, groups as u32, plan.positions as u32, plan.held as u32, silu as i32, saved.is_some() as i32);
        let mut args = [
            karg(&xp), karg(&dyp), karg(&dxp), karg(&wp), karg(&bp), karg(&dwp), karg(&dbp), karg(&pp), karg(&sp), karg(&cp), karg(&bar), karg(&c32), karg(&hw32), karg(&g32), karg(&ppb),
            karg(&held), karg(&eps), karg(&act), karg(&have),
        ];
        // SAFETY: the arguments match gn_grid_bwd_nhwc_DT (x, dy, dx, w, b, dw, db, part, stats,
        // coef, bar, C, HW, G, ppb, held, eps, act, saved) and live until the call returns;
        // gn_grid_plan checked the forward kernel's conditions for twice the shared memory a
        // position; dy has x's channels-last layout and is 16-byte aligned (like_layout and the
        // copy above), dx is a fresh allocation; part 3 N C L floats, stats 2 N G (the forward's
        // when saved is set, else scratch), coef 4 N C, dw / db C floats or both null, bar
        // grid_barrier's pair.
        unsafe { gn_grid_launch(&dev, &plan, l.n, &mut args) }?;
        drop((part, scratch, coef));
        let grads = match grads {
            Some((dw, db)) => Some((wrap(dw, &[l.c])?, wrap(db, &[l.c])?)),
            None => None,
        };
        return Ok((wrap_like(dx, x.shape(), &l)?, grads));
    }
    // The forward's statistics, or gn_stats' (a read of x, two launches).
    let scratch = if saved.is_none() { Some(gn_stats(&dev, &l, groups, wp, bp, eps, false)?.0) } else { None };
    let sp = scratch.as_ref().map_or(saved_ptr, |s| s.device_ptr());
    let (lanes, chunk) = gn_lanes(&dev, &l);
    let part = CudaStorage::alloc(&dev, DType::F32, 2 * l.n * l.c * lanes)?;
    let pp = part.device_ptr();
    let (n32, c32, hw32, g32, l32, act, cl) = (l.n as u32, l.c as u32, l.hw as u32, groups as u32, lanes as u32, silu as i32, l.channels_last as i32);
    if l.channels_last {
        let name = format!("gn_bwd_reduce_nhwc_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&dyp).arg(&sp).arg(&wp).arg(&bp).arg(&pp).arg(&c32).arg(&hw32).arg(&g32).arg(&act);
        let cfg = LaunchConfig { grid_dim: (l32, n32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_bwd_reduce_nhwc_DT; part holds 2 * N*C*L floats.
        unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    } else {
        let chunk32 = chunk as u32;
        let name = format!("gn_bwd_reduce_nchw_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&dyp).arg(&sp).arg(&wp).arg(&bp).arg(&pp).arg(&c32).arg(&hw32).arg(&g32).arg(&chunk32).arg(&act);
        let cfg = LaunchConfig { grid_dim: ((l.n * l.c) as u32, l32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_bwd_reduce_nchw_DT.
        unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
    }
    let coef = CudaStorage::alloc(&dev, DType::F32, 4 * l.n * l.c)?;
    let cp = coef.device_ptr();
    {
        let f = dev.function(&knorm::SOURCE, "gn_bwd_finalize")?;
        let mut b = dev.launch_builder(&f);
        b.arg(&pp).arg(&sp).arg(&wp).arg(&cp).arg(&n32).arg(&c32).arg(&hw32).arg(&g32).arg(&l32);
        let cfg = LaunchConfig { grid_dim: ((l.n * groups) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_bwd_finalize.
        unsafe { b.launch(cfg) }.map_err(launch_failed("gn_bwd_finalize"))?;
    }
    {
        let (dxp, t32) = (dx.device_ptr(), total as u32);
        let v = 16 / x.dtype().size_in_bytes();
        let aligned = xp.is_multiple_of(16) && dyp.is_multiple_of(16) && dxp.is_multiple_of(16);
        if l.channels_last && l.vec && aligned {
            // Each thread keeps its channel pack's coefficients in registers across positions.
            let name = format!("gn_bwd_dx_nhwc_{dt}");
            let f = dev.function(&knorm::SOURCE, &name)?;
            let mut b = dev.launch_builder(&f);
            b.arg(&xp).arg(&dyp).arg(&cp).arg(&wp).arg(&bp).arg(&dxp).arg(&c32).arg(&hw32).arg(&act);
            let cfg = LaunchConfig { grid_dim: (l32, n32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match gn_bwd_dx_nhwc_DT; l.vec means C % V == 0 with C / V <=
            // BLOCK (gn_layout_checked); x, dy, dx are 16-byte aligned (checked); dy has x's
            // memory order (like_layout).
            unsafe { b.launch(cfg) }.map_err(launch_failed(&name))?;
        } else if !l.channels_last && l.hw.is_multiple_of(v) && aligned {
            // A 16-byte pack a thread (one plane: one coefficient load a pack).
            let name = format!("gn_bwd_dx_pack_{dt}");
            let f = dev.function(&knorm::SOURCE, &name)?;
            let mut b = dev.launch_builder(&f);
            b.arg(&xp).arg(&dyp).arg(&cp).arg(&wp).arg(&bp).arg(&dxp).arg(&t32).arg(&c32).arg(&hw32).arg(&act);
            // SAFETY: arguments match gn_bwd_dx_pack_DT; HW % V == 0 and x, dy, dx 16-byte
            // aligned (checked); dy has x's NCHW order (like_layout).
            unsafe { b.launch(launch_1d(total / v, BLOCK)) }.map_err(launch_failed(&name))?;
        } else {
            let name = format!("gn_bwd_dx_{dt}");
            let f = dev.function(&knorm::SOURCE, &name)?;
            let mut b = dev.launch_builder(&f);
            b.arg(&xp).arg(&dyp).arg(&cp).arg(&wp).arg(&bp).arg(&dxp).arg(&t32).arg(&c32).arg(&hw32).arg(&cl).arg(&act);
            // SAFETY: arguments match gn_bwd_dx_DT; dy has x's memory order (like_layout).
            unsafe { b.launch(launch_1d(total, BLOCK)) }.map_err(launch_failed(&name))?;
        }
    }
    let grads = if param_grads {
        let dw = CudaStorage::alloc(&dev, DType::F32, l.c)?;
        let db = CudaStorage::alloc(&dev, DType::F32, l.c)?;
        let (dwp, dbp) = (dw.device_ptr(), db.device_ptr());
        let f = dev.function(&knorm::SOURCE, "gn_bwd_params")?;
        let mut b = dev.launch_builder(&f);
        b.arg(&pp).arg(&dwp).arg(&dbp).arg(&n32).arg(&c32).arg(&l32);
        let cfg = LaunchConfig { grid_dim: (c32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match gn_bwd_params.
        unsafe { b.launch(cfg) }.map_err(launch_failed("gn_bwd_params"))?;
        Some((wrap(dw, &[l.c])?, wrap(db, &[l.c])?))
    } else {
        None
    };
    drop((part, coef, scratch, saved));
    Ok((wrap_like(dx, x.shape(), &l)?, grads))
}

/// Inference batch norm of an [N, C, *] CUDA tensor (NCHW or channels-last).
pub(crate) fn batch_norm(x: &Tensor, mean: &Tensor, var: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    const OP: &str = "batch_norm";
    let dt = dt_name(OP, x.dtype())?;
    u32_of(OP, "element count", x.elem_count(), x.shape())?;
    let l = gn_layout_checked(x)?;
    let (xp, dev) = addr(&l.x, OP)?;
    let out = CudaStorage::alloc(&dev, x.dtype(), x.elem_count())?;
    if x.elem_count() == 0 {
        return wrap_like(out, x.shape(), &l);
    }
    let (_m, mp) = param(Some(mean))?;
    let (_v, vp) = param(Some(var))?;
    let (_w, wp) = param(weight)?;
    let (_b, bp) = param(bias)?;
    let coef = CudaStorage::alloc(&dev, DType::F32, 4 * l.c)?;
    let (cp, c32) = (coef.device_ptr(), l.c as u32);
    let f = dev.function(&knorm::SOURCE, "bn_coef")?;
    let mut b = dev.launch_builder(&f);
    b.arg(&mp).arg(&vp).arg(&wp).arg(&bp).arg(&cp).arg(&c32).arg(&eps);
    // SAFETY: arguments match bn_coef; every vector holds C floats.
    unsafe { b.launch(launch_1d(l.c, BLOCK)) }.map_err(launch_failed("bn_coef"))?;
    apply_affine(&dev, dt, xp, out.device_ptr(), cp, x.elem_count(), l.c, l.hw, 0, l.channels_last, false)?;
    drop(coef);
    wrap_like(out, x.shape(), &l)
}

/// GEGLU over the last dim of the contiguous CUDA tensor `x` (rows of 2 * half).
pub(crate) fn geglu(x: &Tensor, out_shape: &[usize]) -> Result<Tensor> {
    const OP: &str = "geglu";
    let dt = dt_name(OP, x.dtype())?;
    let total: usize = out_shape.iter().product();
    let half = out_shape.last().copied().unwrap_or(0);
    let (xp, dev) = addr(x, OP)?;
    let out = CudaStorage::alloc(&dev, x.dtype(), total)?;
    if total > 0 {
        let (yp, h32, t32) = (out.device_ptr(), half as u32, u32_of(OP, "element count", total, x.shape())?);
        // 16-byte packs when rows split into whole packs and both pointers are aligned (a view
        // may start anywhere), else one element a thread.
        let vec = 16 / x.dtype().size_in_bytes();
        let packed = half % vec == 0 && xp % 16 == 0 && yp % 16 == 0;
        let name = if packed { format!("geglu_vec_{dt}") } else { format!("geglu_{dt}") };
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&h32).arg(&t32);
        // SAFETY: arguments match geglu[_vec]_DT; x holds 2 * total elements, and the packed
        // kernel's 16-byte accesses are aligned (checked above).
        unsafe { b.launch(launch_1d(if packed { total / vec } else { total }, BLOCK)) }.map_err(launch_failed(&name))?;
    }
    wrap(out, out_shape)
}

/// PReLU of the contiguous CUDA tensor `x` with `c` channels of `inner` elements (dim 1).
pub(crate) fn prelu(x: &Tensor, weight: &Tensor, c: usize, inner: usize, per_channel: bool) -> Result<Tensor> {
    const OP: &str = "prelu";
    let dt = dt_name(OP, x.dtype())?;
    let total = x.elem_count();
    let (xp, dev) = addr(x, OP)?;
    let (_w, wp) = param(Some(weight))?;
    let out = CudaStorage::alloc(&dev, x.dtype(), total)?;
    if total > 0 {
        let (yp, t32, c32, i32_, pc) = (out.device_ptr(), u32_of(OP, "element count", total, x.shape())?, c.max(1) as u32, inner.max(1) as u32, per_channel as i32);
        let name = format!("prelu_{dt}");
        let f = dev.function(&knorm::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&wp).arg(&t32).arg(&c32).arg(&i32_).arg(&pc);
        // SAFETY: arguments match prelu_DT; w holds C floats (per channel) or 1.
        unsafe { b.launch(launch_1d(total, BLOCK)) }.map_err(launch_failed(&name))?;
    }
    wrap(out, x.shape())
}

/// Philox uniforms (or normals) of elements 0..n for `seed`, as kernels::rng computes them.
pub(crate) fn random(shape: &[usize], dtype: DType, ordinal: usize, seed: u64, normal: bool) -> Result<Tensor> {
    const OP: &str = "rand";
    let dt = dt_name(OP, dtype)?;
    let dev = super::device(ordinal)?;
    let n: usize = shape.iter().product();
    let out = CudaStorage::alloc(&dev, dtype, n)?;
    if n > 0 {
        let (yp, n64, k0, k1, nm) = (out.device_ptr(), n as u64, seed as u32, (seed >> 32) as u32, normal as i32);
        let name = format!("random_{dt}");
        let f = dev.function(&krng::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        b.arg(&yp).arg(&n64).arg(&k0).arg(&k1).arg(&nm);
        // SAFETY: arguments match random_DT; a thread per block of 4 elements.
        unsafe { b.launch(launch_1d(n.div_ceil(4), 256)) }.map_err(launch_failed(&name))?;
    }
    wrap(out, shape)
}
