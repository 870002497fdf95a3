//! Gradients of the spatial ops for the autograd: pooling (average, max, adaptive average),
//! nearest upsampling (a sum over the copied pixels) and bilinear grid sampling (with respect to
//! the image and to the grid). Per-plane math in kernels::pool_backward and
//! kernels::grid_sample_backward. CUDA: not yet.

use kernels::grid_sample_backward as gsb;
use kernels::pool::Pool2d;
use kernels::pool_backward as pb;
use rayon::prelude::*;

use crate::storage::Storage;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// Checks that `dy` is [N, C, oh, ow] for an [N, C, h, w] input of this shape; CUDA: not yet.
    fn spatial_grad_check(op: &'static str, input_shape: &[usize], dy: &Tensor) -> Result<(usize, usize, usize, usize)> {
        dy.float_only(op)?;
        if input_shape.len() != 4 || dy.rank() != 4 || dy.shape()[..2] != input_shape[..2] {
            return Err(Error::ShapeMismatch { op, lhs: input_shape.to_vec(), rhs: dy.shape().to_vec() });
        }
        if matches!(&*dy.read_storage(), Storage::Cuda(_)) {
            return Err(crate::cuda::not_yet(op));
        }
        Ok((input_shape[2], input_shape[3], dy.shape()[2], dy.shape()[3]))
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
        Self::planes_backward(dy, input_shape, |g, d, _| pb::avg_pool2d_backward_plane(g, h, w, p, oh, ow, d))
    }

    /// Gradient of `input.max_pool2d(kernel, stride, padding, _)` (the winners are recomputed
    /// from `input`).
    pub fn max_pool2d_backward(input: &Tensor, dy: &Tensor, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("max_pool2d_backward", input.shape(), dy)?;
        input.same_device(dy, "max_pool2d_backward")?;
        let p = Pool2d { kernel, stride, padding };
        input.with_cpu_f32(|x| Self::planes_backward(dy, input.shape(), |g, d, i| pb::max_pool2d_backward_plane(&x[i * h * w..(i + 1) * h * w], g, h, w, p, oh, ow, d)))
    }

    /// Gradient of `adaptive_avg_pool2d` for an input of `input_shape`.
    pub fn adaptive_avg_pool2d_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("adaptive_avg_pool2d_backward", input_shape, dy)?;
        Self::planes_backward(dy, input_shape, |g, d, _| pb::adaptive_avg_pool2d_backward_plane(g, h, w, oh, ow, d))
    }

    /// Gradient of `upsample_nearest2d` for an input of `input_shape`.
    pub fn upsample_nearest2d_backward(dy: &Tensor, input_shape: &[usize]) -> Result<Tensor> {
        let (h, w, oh, ow) = Self::spatial_grad_check("upsample_nearest2d_backward", input_shape, dy)?;
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
