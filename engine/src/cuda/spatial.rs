//! CUDA arms of the spatial ops and their gradients: pooling and nearest upsampling
//! (kernels/cuda/pool.cu), affine grids and bilinear grid sampling (kernels/cuda/grid_sample.cu).
//! Forward inputs are read through their strides (any NCHW view); gradients and grids are made
//! contiguous by the ops; outputs are new contiguous storages of the input's dtype.

use kernels::pool::Pool2d;

use super::launch::{launch_failed, strided_config};
use super::LaunchConfig;
use super::storage::CudaStorage;
use super::{DeviceRepr, PushKernelArg};
use crate::{DType, Error, Layout, Result};

/// An NCHW view for the kernels; must match `Img` in pool.cu and grid_sample.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Img {
    n: u64,
    c: u64,
    h: u64,
    w: u64,
    sn: u64,
    sc: u64,
    sh: u64,
    sw: u64,
}

// SAFETY: plain #[repr(C)] integers, laid out as the CUDA struct of the same name.
unsafe impl DeviceRepr for Img {}

impl Img {
    /// The view `l` (rank 4, checked by the ops).
    pub fn of(l: &Layout) -> Img {
        let (s, t) = (l.shape(), l.strides());
        Img { n: s[0] as u64, c: s[1] as u64, h: s[2] as u64, w: s[3] as u64, sn: t[0] as u64, sc: t[1] as u64, sh: t[2] as u64, sw: t[3] as u64 }
    }
}

/// Window sizes for the kernels; must match `PoolArgs` in pool.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PoolArgs {
    kh: i64,
    kw: i64,
    sh: i64,
    sw: i64,
    ph: i64,
    pw: i64,
}

// SAFETY: plain #[repr(C)] integers, laid out as the CUDA struct of the same name.
unsafe impl DeviceRepr for PoolArgs {}

impl From<Pool2d> for PoolArgs {
    fn from(p: Pool2d) -> Self {
        PoolArgs { kh: p.kernel[0] as i64, kw: p.kernel[1] as i64, sh: p.stride[0] as i64, sw: p.stride[1] as i64, ph: p.padding[0] as i64, pw: p.padding[1] as i64 }
    }
}

fn float_suffix(op: &'static str, dt: DType) -> Result<DType> {
    if dt.is_float() {
        Ok(dt)
    } else {
        Err(Error::UnsupportedDType { op, dtype: dt })
    }
}

/// pool.cu's 2-D launch: y-blocks over the planes, x-blocks over a plane's pixels (both loops
/// grid-stride, so the caps only bound the grid).
fn plane_config(planes: usize, pixels: usize) -> LaunchConfig {
    let block = kernels::pool::BLOCK;
    let x = pixels.div_ceil(block as usize).clamp(1, 1 << 16) as u32;
    let y = planes.clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (x, y, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// pool.cu does its in-plane index math in 32 bits: planes < 2^32, a plane's pixels < 2^31, and
/// (out + 1) * in < 2^32 along each axis (adaptive windows, nearest-source search).
fn check_plane_sizes(op: &'static str, planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Result<()> {
    let fits = (planes as u64) < (1 << 32)
        && ((h * w) as u64) < (1 << 31)
        && ((oh * ow) as u64) < (1 << 31)
        && ((oh as u64 + 1) * h as u64) < (1 << 32)
        && ((ow as u64 + 1) * w as u64) < (1 << 32);
    if fits {
        Ok(())
    } else {
        Err(Error::BadShape { op, msg: format!("input {h}x{w} / output {oh}x{ow} over {planes} planes is too large for the CUDA kernels' 32-bit plane indexing"), shape: vec![planes, h, w] })
    }
}

/// Which forward pooling / resampling kernel of pool.cu.
#[derive(Clone, Copy, Debug)]
pub enum PoolKind {
    Avg(Pool2d),
    Max(Pool2d),
    AdaptiveAvg,
    UpsampleNearest,
}

impl CudaStorage {
    /// The [N, C, oh, ow] pooling (or nearest upsampling) of the NCHW view `l`.
    pub fn pool2d(&self, l: &Layout, kind: PoolKind, oh: usize, ow: usize) -> Result<Self> {
        let dt = float_suffix("pool2d", self.dtype())?;
        let dev = self.device().clone();
        let n = l.shape()[0] * l.shape()[1] * oh * ow;
        let out = CudaStorage::alloc(&dev, dt, n)?;
        if n == 0 {
            return Ok(out);
        }
        if l.elem_count() == 0 {
            // Windows entirely in the padding of an empty image: zeros, as the CPU leaves them.
            dev.memset(out.device_ptr(), 0, n * dt.size_in_bytes())?;
            return Ok(out);
        }
        let name = match kind {
            PoolKind::Avg(_) => format!("avg_pool2d_{dt}"),
            PoolKind::Max(_) => format!("max_pool2d_{dt}"),
            PoolKind::AdaptiveAvg => format!("adaptive_avg_pool2d_{dt}"),
            PoolKind::UpsampleNearest => format!("upsample_nearest2d_{dt}"),
        };
        let planes = l.shape()[0] * l.shape()[1];
        check_plane_sizes("pool2d", planes, l.shape()[2], l.shape()[3], oh, ow)?;
        let f = dev.function(&kernels::pool::SOURCE, &name)?;
        let (src, dst, img, oh32, ow32) = (self.ptr_at(l.offset()), out.device_ptr(), Img::of(l), oh as u32, ow as u32);
        let p = match kind {
            PoolKind::Avg(p) | PoolKind::Max(p) => Some(PoolArgs::from(p)),
            _ => None,
        };
        let mut b = dev.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&img).arg(&oh32).arg(&ow32);
        if let Some(p) = &p {
            b.arg(p);
        }
        // SAFETY: matches the kernel's signature in pool.cu; windows are clipped to the image.
        unsafe { b.launch(plane_config(planes, oh * ow)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// Gradient of a linear pooling (average, adaptive average, nearest upsampling) for an input
    /// of `input_shape`, from this contiguous dy ([N, C, oh, ow] from `offset`).
    pub fn pool2d_backward(&self, offset: usize, input_shape: &[usize], oh: usize, ow: usize, kind: PoolKind) -> Result<Self> {
        let dt = float_suffix("pool2d_backward", self.dtype())?;
        let dev = self.device().clone();
        let (planes, h, w) = (input_shape[0] * input_shape[1], input_shape[2], input_shape[3]);
        let n = planes * h * w;
        let out = CudaStorage::alloc(&dev, dt, n)?;
        if n == 0 {
            return Ok(out);
        }
        if oh * ow == 0 {
            dev.memset(out.device_ptr(), 0, n * dt.size_in_bytes())?;
            return Ok(out);
        }
        check_plane_sizes("pool2d_backward", planes, h, w, oh, ow)?;
        let (dy, dx, planes64) = (self.ptr_at(offset), out.device_ptr(), planes as u64);
        let name = match kind {
            PoolKind::Avg(_) => format!("avg_pool2d_backward_{dt}"),
            PoolKind::AdaptiveAvg => format!("adaptive_avg_pool2d_backward_{dt}"),
            PoolKind::UpsampleNearest => format!("upsample_nearest2d_backward_{dt}"),
            PoolKind::Max(_) => return Err(Error::msg("pool2d_backward: max pooling needs its input (max_pool2d_backward)")),
        };
        let f = dev.function(&kernels::pool::SOURCE, &name)?;
        let mut b = dev.launch_builder(&f);
        let (h32, w32, oh32, ow32) = (h as u32, w as u32, oh as u32, ow as u32);
        let p = match kind {
            PoolKind::Avg(p) => Some(PoolArgs::from(p)),
            _ => None,
        };
        b.arg(&dy).arg(&dx).arg(&planes64).arg(&h32).arg(&w32).arg(&oh32).arg(&ow32);
        if let Some(p) = &p {
            b.arg(p);
        }
        // SAFETY: matches the kernel's signature in pool.cu; dy holds planes * oh * ow elements.
        unsafe { b.launch(plane_config(planes, h * w)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// Gradient of max pooling: `self` is the forward input (view `l`), `dy` contiguous from
    /// `dy_offset`.
    pub fn max_pool2d_backward(&self, l: &Layout, dy: &CudaStorage, dy_offset: usize, oh: usize, ow: usize, p: Pool2d) -> Result<Self> {
        let dt = float_suffix("max_pool2d_backward", self.dtype())?;
        if dy.dtype() != dt {
            return Err(Error::DTypeMismatch { op: "max_pool2d_backward", lhs: dt, rhs: dy.dtype() });
        }
        let dev = self.device().clone();
        let n = l.elem_count();
        let out = CudaStorage::alloc(&dev, dt, n)?;
        if n == 0 {
            return Ok(out);
        }
        if oh * ow == 0 {
            dev.memset(out.device_ptr(), 0, n * dt.size_in_bytes())?;
            return Ok(out);
        }
        let s = l.shape();
        let planes = s[0] * s[1];
        check_plane_sizes("max_pool2d_backward", planes, s[2], s[3], oh, ow)?;
        let name = format!("max_pool2d_backward_{dt}");
        let f = dev.function(&kernels::pool::SOURCE, &name)?;
        let (x, g, dx, img, oh32, ow32, pa) = (self.ptr_at(l.offset()), dy.ptr_at(dy_offset), out.device_ptr(), Img::of(l), oh as u32, ow as u32, PoolArgs::from(p));
        let mut b = dev.launch_builder(&f);
        b.arg(&x).arg(&g).arg(&dx).arg(&img).arg(&oh32).arg(&ow32).arg(&pa);
        // SAFETY: matches max_pool2d_backward_* in pool.cu.
        unsafe { b.launch(plane_config(planes, s[2] * s[3])) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// The [N, h, w, 2] affine grid of this contiguous theta ([N, 2, 3] from `offset`).
    pub fn affine_grid(&self, offset: usize, n: usize, h: usize, w: usize, align_corners: bool) -> Result<Self> {
        let dt = float_suffix("affine_grid", self.dtype())?;
        let dev = self.device().clone();
        let total = n * h * w;
        let out = CudaStorage::alloc(&dev, dt, total * 2)?;
        if total == 0 {
            return Ok(out);
        }
        let name = format!("affine_grid_{dt}");
        let f = dev.function(&kernels::grid_sample::SOURCE, &name)?;
        let (t, o, n64, h64, w64, align) = (self.ptr_at(offset), out.device_ptr(), n as u64, h as u64, w as u64, align_corners as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&t).arg(&o).arg(&n64).arg(&h64).arg(&w64).arg(&align);
        // SAFETY: matches affine_grid_* in grid_sample.cu; theta holds n * 6 elements.
        unsafe { b.launch(strided_config(total, kernels::grid_sample::BLOCK)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// Bilinear sampling of the NCHW view `l` at the contiguous grid ([N, oh, ow, 2] from
    /// `grid_offset`): [N, C, oh, ow].
    pub fn grid_sample(&self, l: &Layout, grid: &CudaStorage, grid_offset: usize, oh: usize, ow: usize, align_corners: bool) -> Result<Self> {
        let dt = float_suffix("grid_sample", self.dtype())?;
        let dev = self.device().clone();
        let total = l.shape()[0] * l.shape()[1] * oh * ow;
        let out = CudaStorage::alloc(&dev, dt, total)?;
        if total == 0 {
            return Ok(out);
        }
        if l.elem_count() == 0 {
            dev.memset(out.device_ptr(), 0, total * dt.size_in_bytes())?;
            return Ok(out);
        }
        let name = format!("grid_sample_{dt}");
        let f = dev.function(&kernels::grid_sample::SOURCE, &name)?;
        let (x, g, o, img, oh64, ow64, align) = (self.ptr_at(l.offset()), grid.ptr_at(grid_offset), out.device_ptr(), Img::of(l), oh as u64, ow as u64, align_corners as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&x).arg(&g).arg(&o).arg(&img).arg(&oh64).arg(&ow64).arg(&align);
        // SAFETY: matches grid_sample_* in grid_sample.cu; only taps inside the image are read.
        unsafe { b.launch(strided_config(total, kernels::grid_sample::BLOCK)) }.map_err(launch_failed(&name))?;
        Ok(out)
    }

    /// Gradients of `grid_sample` wrt the image (an f32 [N, C, H, W] storage; the caller casts)
    /// and the grid (grid's dtype, [N, oh, ow, 2]). `self` is the image (view `l`); grid and dy
    /// are contiguous from their offsets.
    #[allow(clippy::too_many_arguments)]
    pub fn grid_sample_backward(&self, l: &Layout, grid: &CudaStorage, grid_offset: usize, dy: &CudaStorage, dy_offset: usize, oh: usize, ow: usize, align_corners: bool) -> Result<(Self, Self)> {
        let dt = float_suffix("grid_sample_backward", self.dtype())?;
        let dev = self.device().clone();
        let s = l.shape();
        let dx = CudaStorage::alloc(&dev, DType::F32, l.elem_count())?;
        dev.memset(dx.device_ptr(), 0, l.elem_count() * 4)?;
        let points = s[0] * oh * ow;
        let dgrid = CudaStorage::alloc(&dev, dt, points * 2)?;
        if points == 0 {
            return Ok((dx, dgrid));
        }
        if l.elem_count() == 0 {
            dev.memset(dgrid.device_ptr(), 0, points * 2 * dt.size_in_bytes())?;
            return Ok((dx, dgrid));
        }
        let name = format!("grid_sample_backward_{dt}");
        let f = dev.function(&kernels::grid_sample::SOURCE, &name)?;
        let (x, g, d, dxp, dgp, img, oh64, ow64, align) =
            (self.ptr_at(l.offset()), grid.ptr_at(grid_offset), dy.ptr_at(dy_offset), dx.device_ptr(), dgrid.device_ptr(), Img::of(l), oh as u64, ow as u64, align_corners as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&x).arg(&g).arg(&d).arg(&dxp).arg(&dgp).arg(&img).arg(&oh64).arg(&ow64).arg(&align);
        // SAFETY: matches grid_sample_backward_* in grid_sample.cu; only taps inside the image are
        // read or accumulated.
        unsafe { b.launch(strided_config(points, kernels::grid_sample::BLOCK)) }.map_err(launch_failed(&name))?;
        Ok((dx, dgrid))
    }
}
