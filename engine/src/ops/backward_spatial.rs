//! Gradients of the spatial ops for the autograd: pooling (average, max, adaptive average),
//! nearest upsampling (a sum over the copied pixels) and bilinear grid sampling (with respect to
//! the image and to the grid). Per-plane math in kernels::pool_backward and
//! kernels::grid_sample_backward; on CUDA, engine::cuda's spatial kernels (dy is made contiguous).

use kernels::grid_sample_backward as gsb;
use kernels::pool::Pool2d;
use kernels::pool_backward as pb;
use rayon::prelude::*;

use crate::cuda::PoolKind;
use crate::storage::Storage;
use crate::{Device, Error, Result, Tensor};

impl Tensor {
    /// Checks that `dy` is [N, C, oh, ow] for an [N, C, h, w] input of this shape.
    fn spatial_grad_check(op: &'static str, input_shape: &[usize], dy: &Tensor) -> Result<(usize, usize, usize, usize)> {
        dy.float_only(op)?;
        if input_shape.len() != 4 || dy.rank() != 4 || dy.shape()[..2] != input_shape[..2] {
            return Err(Error::ShapeMismatch { op, lhs: input_shape.to_vec(), rhs: dy.shape().to_vec() });
        }
        Ok((input_shape[2], input_shape[3], dy.shape()[2], dy.shape()[3]))
    }

    /// The CUDA gradient of a linear pooling, or None when dy is on the CPU.
    fn pool_backward_cuda(dy: &Tensor, input_shape: &[usize], kind: PoolKind) -> Option<Result<Tensor>> {
        if dy.device() == Device::Cpu {
            return None;
        }
        let run = || {
            let g = dy.contiguous()?;
            let dx = g.on_cuda(|s| s.pool2d_backward(g.layout().offset(), input_shape, g.shape()[2], g.shape()[3], kind)).expect("a CUDA tensor")?;
            Tensor::from_storage(Storage::Cuda(dx), input_shape)
        };
        Some(run())
    }

    /// Runs `f(dy_plane, dx_plane, plane_index)` over every (n, c) plane in parallel.
    fn planes_backward(dy: &Tensor, input_shape: &[usize], f: impl Fn(&[f32], &mut [f32], usize) + Sync) -> Result<Tensor> {
        let (h, w, oh, ow) = (input_shape[2], input_shape[3], dy.shape()[2], dy.shape()[3]);
        let mut dx = vec![0f32; input_shape.iter().product()];
        if h * w > 0 && oh * ow > 0 {
            dy.with_cpu_f32(|g| {
                dx.par_chunks_mut(h * w).zip(g.par_chunks(oh * ow)).enumerate().for_each(|(i, (d, gp))| f(gp, d, i));
                Ok(())
            })?;
        }
        Tensor::from_f32_vec(dx, input_shape, dy.dtype())
    }

    /// Gradient of `avg_pool2d(kernel, stride, padding)` for an input of `input_shape`.
    pub fn avg_pool2d_backward(dy: &Tensor, input_shape: &[usize], kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("avg_pool2d_backward", input_shape, dy)?;
        let p = Pool2d { kernel, stride, padding };
        if let Some(r) = Self::pool_backward_cuda(dy, input_shape, PoolKind::Avg(p)) {
            return r;
        }
        Self::planes_backward(dy, input_shape, |g, d, _| pb::avg_pool2d_backward_plane(g, h, w, p, oh, ow, d))
    }

    /// Gradient of `input.max_pool2d(kernel, stride, padding, _)` (the winners are recomputed
    /// from `input`).
    pub fn max_pool2d_backward(input: &Tensor, dy: &Tensor, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("max_pool2d_backward", input.shape(), dy)?;
        input.same_device(dy, "max_pool2d_backward")?;
        let p = Pool2d { kernel, stride, padding };
        if let Device::Cuda(_) = dy.device() {
            let g = dy.contiguous()?;
            let dx = input.on_cuda(|x| g.on_cuda(|gs| x.max_pool2d_backward(input.layout(), gs, g.layout().offset(), oh, ow, p)).expect("same device")).expect("a CUDA tensor")?;
            return Tensor::from_storage(Storage::Cuda(dx), input.shape());
        }
        input.with_cpu_f32(|x| Self::planes_backward(dy, input.shape(), |g, d, i| pb::max_pool2d_backward_plane(&x[i * h * w..(i + 1) * h * w], g, h, w, p, oh, ow, d)))
    }

    /// Gradient of `adaptive_avg_pool2d` for an input of `input_shape`.
    pub fn adaptive_avg_pool2d_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("adaptive_avg_pool2d_backward", input_shape, dy)?;
        if let Some(r) = Self::pool_backward_cuda(dy, input_shape, PoolKind::AdaptiveAvg) {
            return r;
        }
        Self::planes_backward(dy, input_shape, |g, d, _| pb::adaptive_avg_pool2d_backward_plane(g, h, w, oh, ow, d))
    }

    /// Gradient of `upsample_nearest2d` for an input of `input_shape`.
    pub fn upsample_nearest2d_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("upsample_nearest2d_backward", input_shape, dy)?;
        if let Some(r) = Self::pool_backward_cuda(dy, input_shape, PoolKind::UpsampleNearest) {
            return r;
        }
        Self::planes_backward(dy, input_shape, |g, d, _| pb::upsample_nearest2d_backward_plane(g, h, w, oh, ow, d))
    }

    /// Gradients of `input.grid_sample(grid, align_corners)` with respect to the input
    /// ([N, C, H, W]) and the grid ([N, oH, oW, 2]) given `dy` ([N, C, oH, oW]).
    pub fn grid_sample_backward(input: &Tensor, grid: &Tensor, dy: &Tensor, align_corners: bool) -> Result<(Tensor, Tensor)> {
        const OP: &str = "grid_sample_backward";
        input.same_device(grid, OP)?;
        input.same_device(dy, OP)?;
        let (h, w, oh, ow) = Self::spatial_grad_check(OP, input.shape(), dy)?;
        let (n, c) = (input.shape()[0], input.shape()[1]);
        if grid.shape() != [n, oh, ow, 2] {
            return Err(Error::ShapeMismatch { op: OP, lhs: grid.shape().to_vec(), rhs: vec![n, oh, ow, 2] });
        }
        if let Device::Cuda(_) = input.device() {
            // One kernel reads all three in one dtype.
            input.same_dtype(grid, OP)?;
            input.same_dtype(dy, OP)?;
            let (g, d) = (grid.contiguous()?, dy.contiguous()?);
            let (dx, dg) = input
                .on_cuda(|x| g.on_cuda(|gs| d.on_cuda(|ds| x.grid_sample_backward(input.layout(), gs, g.layout().offset(), ds, d.layout().offset(), oh, ow, align_corners)).expect("same device")).expect("same device"))
                .expect("a CUDA tensor")?;
            let dx = Tensor::from_storage(Storage::Cuda(dx), input.shape())?.to_dtype(input.dtype())?;
            return Ok((dx, Tensor::from_storage(Storage::Cuda(dg), grid.shape())?));
        }
        let mut dx = vec![0f32; n * c * h * w];
        let mut dg = vec![0f32; n * oh * ow * 2];
        if n * c * h * w > 0 && oh * ow > 0 {
            input.with_cpu_f32(|x| {
                grid.with_cpu_f32(|gr| {
                    dy.with_cpu_f32(|d| {
                        dx.par_chunks_mut(c * h * w).zip(dg.par_chunks_mut(oh * ow * 2)).enumerate().for_each(|(ni, (dxn, dgn))| {
                            gsb::grid_sample_bilinear_backward(
                                &x[ni * c * h * w..][..c * h * w],
                                c,
                                h,
                                w,
                                &gr[ni * oh * ow * 2..][..oh * ow * 2],
                                oh,
                                ow,
                                align_corners,
                                &d[ni * c * oh * ow..][..c * oh * ow],
                                dxn,
                                dgn,
                            )
                        });
                        Ok(())
                    })
                })
            })?;
        }
        Ok((Tensor::from_f32_vec(dx, input.shape(), input.dtype())?, Tensor::from_f32_vec(dg, grid.shape(), grid.dtype())?))
    }
}
