//! Pooling, nearest upsampling, affine grids and grid sampling.

use engine::{Result, Tensor};

use super::want;
use crate::Var;

impl Var {
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Var> {
        let y = self.value().avg_pool2d(kernel, stride, padding)?;
        let shape = self.shape().to_vec();
        Ok(Var::from_op("avg_pool2d", y, &[self], move |g, _| Ok(vec![Some(Tensor::avg_pool2d_backward(g, &shape, kernel, stride, padding)?)])))
    }

    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], ceil_mode: bool) -> Result<Var> {
        let y = self.value().max_pool2d(kernel, stride, padding, ceil_mode)?;
        let x = self.value().clone();
        Ok(Var::from_op("max_pool2d", y, &[self], move |g, _| Ok(vec![Some(Tensor::max_pool2d_backward(&x, g, kernel, stride, padding)?)])))
    }

    pub fn adaptive_avg_pool2d(&self, out: [usize; 2]) -> Result<Var> {
        let y = self.value().adaptive_avg_pool2d(out)?;
        let shape = self.shape().to_vec();
        Ok(Var::from_op("adaptive_avg_pool2d", y, &[self], move |g, _| Ok(vec![Some(Tensor::adaptive_avg_pool2d_backward(g, &shape)?)])))
    }

    pub fn upsample_nearest2d(&self, out_h: usize, out_w: usize) -> Result<Var> {
        let y = self.value().upsample_nearest2d(out_h, out_w)?;
        let shape = self.shape().to_vec();
        Ok(Var::from_op("upsample_nearest2d", y, &[self], move |g, _| Ok(vec![Some(Tensor::upsample_nearest2d_backward(g, &shape)?)])))
    }

    /// F.affine_grid for theta [N, 2, 3]: grid[n, p] = theta[n] · (x_p, y_p, 1), so
    /// d theta[n] = sum_p dgrid[n, p]^T (x_p, y_p, 1).
    pub fn affine_grid(theta: &Var, size: [usize; 4], align_corners: bool) -> Result<Var> {
        let y = Tensor::affine_grid(theta.value(), size, align_corners)?;
        let (dtype, device) = (theta.dtype(), theta.device());
        Ok(Var::from_op("affine_grid", y, &[theta], move |g, _| {
            let [n, _, h, w] = size;
            // The base coordinates (x, y, 1) of every output pixel: the grid of the identity.
            let identity = Tensor::from_vec(vec![1f32, 0.0, 0.0, 0.0, 1.0, 0.0], &[1, 2, 3], engine::Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
            let xy = Tensor::affine_grid(&identity, [1, 1, h, w], align_corners)?.reshape(&[h * w, 2])?;
            let base = Tensor::cat(&[&xy, &Tensor::ones(&[h * w, 1], dtype, device)?], 1)?;
            let dtheta = g.reshape(&[n, h * w, 2])?.t()?.matmul(&base)?;
            Ok(vec![Some(dtheta)])
        }))
    }

    /// Bilinear grid sampling with zero padding; gradients flow to the image and to the grid.
    pub fn grid_sample(&self, grid: &Var, align_corners: bool) -> Result<Var> {
        let y = self.value().grid_sample(grid.value(), align_corners)?;
        let (x, gr) = (self.value().clone(), grid.value().clone());
        Ok(Var::from_op("grid_sample", y, &[self, grid], move |g, n| {
            let (dx, dg) = Tensor::grid_sample_backward(&x, &gr, g, align_corners)?;
            Ok(vec![want(n, 0, || Ok(dx))?, want(n, 1, || Ok(dg))?])
        }))
    }
}
