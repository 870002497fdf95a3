//! Spatial ops on NCHW images: average/max/adaptive pooling, nearest upsampling, affine grids and
//! bilinear grid sampling. The per-plane math is in kernels::pool and kernels::grid_sample.

use kernels::grid_sample as gs;
use kernels::pool::{self, Pool2d};
use rayon::prelude::*;

use crate::cuda::{CudaStorage, PoolKind};
use crate::storage::Storage;
use crate::{Device, Error, Result, Tensor};

impl Tensor {
    /// [N, C, H, W] as (planes, H, W); errors name `op` otherwise.
    fn image_dims(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        self.float_only(op)?;
        if self.rank() != 4 {
            return Err(Error::BadShape { op, msg: "expected an [N, C, H, W] tensor".into(), shape: self.shape().to_vec() });
        }
        let s = self.shape();
        Ok((s[0] * s[1], s[2], s[3]))
    }

    /// Runs `f` on this tensor's CUDA storage (None for a CPU tensor).
    pub(crate) fn on_cuda<R>(&self, f: impl FnOnce(&CudaStorage) -> Result<R>) -> Option<Result<R>> {
        match &*self.read_storage() {
            Storage::Cuda(s) => Some(f(s)),
            Storage::Cpu(_) => None,
        }
    }

    /// The CUDA pooling / upsampling of this NCHW tensor, or None on the CPU.
    fn pool_cuda(&self, kind: PoolKind, oh: usize, ow: usize) -> Option<Result<Tensor>> {
        let shape = [self.shape()[0], self.shape()[1], oh, ow];
        self.on_cuda(|s| Tensor::from_storage(Storage::Cuda(s.pool2d(self.layout(), kind, oh, ow)?), &shape))
    }

    /// Runs `f(in_plane, out_plane)` on every (n, c) plane in parallel; result [N, C, oh, ow].
    fn map_planes(&self, oh: usize, ow: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Result<Tensor> {
        let (h, w) = (self.shape()[2], self.shape()[3]);
        let shape = [self.shape()[0], self.shape()[1], oh, ow];
        let mut out = vec![0f32; shape.iter().product()];
        if oh * ow > 0 && h * w > 0 {
            self.with_cpu_f32(|x| {
                out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(o, i)| f(i, o));
                Ok(())
            })?;
        }
        Tensor::from_f32_vec(out, &shape, self.dtype())
    }

    fn pool_params(&self, op: &'static str, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], ceil_mode: bool) -> Result<(Pool2d, usize, usize)> {
        let (_, h, w) = self.image_dims(op)?;
        if kernel.contains(&0) || stride.contains(&0) || padding[0] * 2 > kernel[0] || padding[1] * 2 > kernel[1] {
            return Err(Error::BadShape {
                op,
                msg: format!("kernel {kernel:?}, stride {stride:?}, padding {padding:?}: sizes must be positive and padding at most half the kernel"),
                shape: self.shape().to_vec(),
            });
        }
        let out = |i: usize, a: usize| pool::pool_out_len(i, kernel[a], stride[a], padding[a], ceil_mode);
        match (out(h, 0), out(w, 1)) {
            (Some(oh), Some(ow)) => Ok((Pool2d { kernel, stride, padding }, oh, ow)),
            _ => Err(Error::BadShape { op, msg: format!("kernel {kernel:?} larger than the padded input"), shape: self.shape().to_vec() }),
        }
    }

    /// PyTorch `F.avg_pool2d` with count_include_pad=True and ceil_mode=False.
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        let (p, oh, ow) = self.pool_params("avg_pool2d", kernel, stride, padding, false)?;
        if let Some(r) = self.pool_cuda(PoolKind::Avg(p), oh, ow) {
            return r;
        }
        let (h, w) = (self.shape()[2], self.shape()[3]);
        self.map_planes(oh, ow, |x, o| pool::avg_pool2d_plane(x, h, w, p, o, oh, ow))
    }

    /// PyTorch `F.max_pool2d` (dilation 1); padding is -inf.
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], ceil_mode: bool) -> Result<Tensor> {
        let (p, oh, ow) = self.pool_params("max_pool2d", kernel, stride, padding, ceil_mode)?;
        if let Some(r) = self.pool_cuda(PoolKind::Max(p), oh, ow) {
            return r;
        }
        let (h, w) = (self.shape()[2], self.shape()[3]);
        self.map_planes(oh, ow, |x, o| pool::max_pool2d_plane(x, h, w, p, o, oh, ow))
    }

    /// PyTorch `F.adaptive_avg_pool2d` to [out_h, out_w].
    pub fn adaptive_avg_pool2d(&self, out: [usize; 2]) -> Result<Tensor> {
        let (_, h, w) = self.image_dims("adaptive_avg_pool2d")?;
        if out.contains(&0) || h == 0 || w == 0 {
            return Err(Error::BadShape { op: "adaptive_avg_pool2d", msg: format!("output size {out:?} and input size must be positive"), shape: self.shape().to_vec() });
        }
        if let Some(r) = self.pool_cuda(PoolKind::AdaptiveAvg, out[0], out[1]) {
            return r;
        }
        self.map_planes(out[0], out[1], |x, o| pool::adaptive_avg_pool2d_plane(x, h, w, o, out[0], out[1]))
    }

    /// PyTorch `F.interpolate(mode="nearest", size=(out_h, out_w))`.
    pub fn upsample_nearest2d(&self, out_h: usize, out_w: usize) -> Result<Tensor> {
        let (_, h, w) = self.image_dims("upsample_nearest2d")?;
        if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
            return Err(Error::BadShape { op: "upsample_nearest2d", msg: format!("output size [{out_h}, {out_w}] and input size must be positive"), shape: self.shape().to_vec() });
        }
        if let Some(r) = self.pool_cuda(PoolKind::UpsampleNearest, out_h, out_w) {
            return r;
        }
        self.map_planes(out_h, out_w, |x, o| pool::upsample_nearest2d_plane(x, h, w, o, out_h, out_w))
    }

    /// PyTorch `F.affine_grid` for 2-D: theta [N, 2, 3], size [N, C, H, W] -> grid [N, H, W, 2].
    pub fn affine_grid(theta: &Tensor, size: [usize; 4], align_corners: bool) -> Result<Tensor> {
        const OP: &str = "affine_grid";
        theta.float_only(OP)?;
        let [n, _, h, w] = size;
        if theta.shape() != [n, 2, 3] {
            return Err(Error::ShapeMismatch { op: "affine_grid (theta vs [N, 2, 3])", lhs: theta.shape().to_vec(), rhs: vec![n, 2, 3] });
        }
        if let Device::Cuda(_) = theta.device() {
            let t = theta.contiguous()?;
            let grid = t.on_cuda(|s| s.affine_grid(t.layout().offset(), n, h, w, align_corners)).expect("a CUDA tensor")?;
            return Tensor::from_storage(Storage::Cuda(grid), &[n, h, w, 2]);
        }
        let mut out = vec![0f32; n * h * w * 2];
        if h * w > 0 {
            theta.with_cpu_f32(|th| {
                out.par_chunks_mut(h * w * 2).zip(th.par_chunks(6)).for_each(|(o, t)| gs::affine_grid_2d(t, h, w, align_corners, o));
                Ok(())
            })?;
        }
        Tensor::from_f32_vec(out, &[n, h, w, 2], theta.dtype())
    }

    /// PyTorch `F.grid_sample(mode="bilinear", padding_mode="zeros")`: self [N, C, H, W], grid
    /// [N, oH, oW, 2] of normalized (x, y) -> [N, C, oH, oW].
    pub fn grid_sample(&self, grid: &Tensor, align_corners: bool) -> Result<Tensor> {
        const OP: &str = "grid_sample";
        self.same_device(grid, OP)?;
        self.same_dtype(grid, OP)?;
        let (_, h, w) = self.image_dims(OP)?;
        let (n, c) = (self.shape()[0], self.shape()[1]);
        if grid.rank() != 4 || grid.shape()[0] != n || grid.shape()[3] != 2 {
            return Err(Error::ShapeMismatch { op: "grid_sample (input [N, C, H, W] vs grid [N, oH, oW, 2])", lhs: self.shape().to_vec(), rhs: grid.shape().to_vec() });
        }
        let (oh, ow) = (grid.shape()[1], grid.shape()[2]);
        if let Device::Cuda(_) = self.device() {
            let g = grid.contiguous()?;
            let out = self.on_cuda(|s| g.on_cuda(|gs| s.grid_sample(self.layout(), gs, g.layout().offset(), oh, ow, align_corners)).expect("same device")).expect("a CUDA tensor")?;
            return Tensor::from_storage(Storage::Cuda(out), &[n, c, oh, ow]);
        }
        let mut out = vec![0f32; n * c * oh * ow];
        if !out.is_empty() && h * w > 0 {
            self.with_cpu_f32(|x| {
                grid.with_cpu_f32(|g| {
                    // Parallel over images, then over channel blocks of one image.
                    out.par_chunks_mut(c * oh * ow).enumerate().for_each(|(ni, o)| {
                        let img = &x[ni * c * h * w..][..c * h * w];
                        let gr = &g[ni * oh * ow * 2..][..oh * ow * 2];
                        o.par_chunks_mut(oh * ow).zip(img.par_chunks(h * w)).for_each(|(oc, ic)| gs::grid_sample_bilinear(ic, 1, h, w, gr, oh, ow, align_corners, oc));
                    });
                    Ok(())
                })
            })?;
        }
        Tensor::from_f32_vec(out, &[n, c, oh, ow], self.dtype())
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn pools_shapes_and_errors() {
        let x = Tensor::from_vec((0..2 * 3 * 5 * 7).map(|v| v as f32).collect(), &[2, 3, 5, 7], Device::Cpu).unwrap();
        assert_eq!(x.max_pool2d([3, 3], [2, 2], [0, 0], true).unwrap().shape(), &[2, 3, 2, 3]);
        assert_eq!(x.max_pool2d([3, 3], [2, 2], [0, 0], false).unwrap().shape(), &[2, 3, 2, 3]);
        assert_eq!(x.max_pool2d([2, 2], [2, 2], [0, 0], true).unwrap().shape(), &[2, 3, 3, 4]);
        assert_eq!(x.avg_pool2d([2, 2], [2, 2], [1, 1]).unwrap().shape(), &[2, 3, 3, 4]);
        assert_eq!(x.adaptive_avg_pool2d([1, 1]).unwrap().to_vec::<f32>().unwrap()[0], 17.0);
        assert_eq!(x.upsample_nearest2d(10, 14).unwrap().shape(), &[2, 3, 10, 14]);
        assert!(x.max_pool2d([9, 9], [1, 1], [0, 0], false).is_err());
        assert!(x.avg_pool2d([2, 2], [0, 1], [0, 0]).is_err());
        assert!(x.avg_pool2d([2, 2], [1, 1], [2, 0]).is_err());
        assert!(x.flatten(0, 1).unwrap().avg_pool2d([2, 2], [1, 1], [0, 0]).is_err());
        let theta = Tensor::zeros(&[1, 2, 3], DType::F32, Device::Cpu).unwrap();
        assert!(Tensor::affine_grid(&theta, [2, 1, 4, 4], false).is_err());
        let grid = Tensor::affine_grid(&theta, [1, 1, 4, 4], false).unwrap();
        assert!(x.grid_sample(&grid, false).is_err());
    }
}
