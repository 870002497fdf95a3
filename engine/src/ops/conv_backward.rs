//! Gradients of `conv2d` with respect to its input and its weight, for the autograd. CPU: per image
//! and group, a GEMM against the weight (input gradient, then col2im) or against the im2col of the
//! input (weight gradient). Images run in parallel; the weight gradient sums the per-image parts in
//! image order, so results do not depend on the thread count. CUDA: cuDNN (cuda/conv.rs).

use rayon::prelude::*;

use crate::cpu::gemm::{gemm_f32, parallelism};
use crate::storage::Storage;
use crate::{Conv2dParams, Error, Result, Tensor};

/// Sizes of one convolution (input [n, c, h, w], weight [o, c / groups, kh, kw], output
/// [n, o, oh, ow]) after validation.
#[derive(Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    p: Conv2dParams,
}

impl Geom {
    fn new(op: &'static str, input: [usize; 4], weight: [usize; 4], grad_out: &Tensor, p: Conv2dParams) -> Result<Geom> {
        let [n, c, h, w] = input;
        let [o, cg, kh, kw] = weight;
        let bad = |msg: String| Error::BadShape { op, msg, shape: grad_out.shape().to_vec() };
        if p.groups == 0 || c % p.groups != 0 || o % p.groups != 0 || cg != c / p.groups {
            return Err(bad(format!("input {input:?} and weight {weight:?} do not fit {} groups", p.groups)));
        }
        if p.stride.contains(&0) || p.dilation.contains(&0) || kh == 0 || kw == 0 {
            return Err(bad(format!("zero kernel size, stride or dilation ({p:?})")));
        }
        let out_len = |i: usize, pad: usize, k: usize, d: usize, s: usize| (i + 2 * pad).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1);
        let (Some(oh), Some(ow)) = (out_len(h, p.padding[0], kh, p.dilation[0], p.stride[0]), out_len(w, p.padding[1], kw, p.dilation[1], p.stride[1])) else {
            return Err(bad(format!("kernel {weight:?} larger than the padded input {input:?}")));
        };
        if grad_out.shape() != [n, o, oh, ow] {
            return Err(Error::ShapeMismatch { op, lhs: grad_out.shape().to_vec(), rhs: vec![n, o, oh, ow] });
        }
        Ok(Geom { n, c, h, w, o, kh, kw, oh, ow, p })
    }
    fn cg(&self) -> usize {
        self.c / self.p.groups
    }
    fn og(&self) -> usize {
        self.o / self.p.groups
    }
    fn kdim(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn pixels(&self) -> usize {
        self.oh * self.ow
    }
    /// The input pixel (iy, ix) that kernel tap (ki, kj) of output pixel (oy, ox) reads, if inside.
    #[inline]
    fn tap(&self, oy: usize, ox: usize, ki: usize, kj: usize) -> Option<usize> {
        let iy = (oy * self.p.stride[0] + ki * self.p.dilation[0]) as isize - self.p.padding[0] as isize;
        let ix = (ox * self.p.stride[1] + kj * self.p.dilation[1]) as isize - self.p.padding[1] as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < self.h && (ix as usize) < self.w).then(|| iy as usize * self.w + ix as usize)
    }
}

/// cols[(ci, ki, kj), p] = image[ci, tap(p, ki, kj)] (0 in the padding) for one group's channels.
fn im2col(image: &[f32], g: &Geom, cols: &mut [f32]) {
    let (hw, pixels) = (g.h * g.w, g.pixels());
    for (r, dst) in cols.chunks_mut(pixels).enumerate() {
        let (ci, ki, kj) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let plane = &image[ci * hw..(ci + 1) * hw];
        for (p, v) in dst.iter_mut().enumerate() {
            *v = g.tap(p / g.ow, p % g.ow, ki, kj).map_or(0.0, |i| plane[i]);
        }
    }
}

/// The adjoint of `im2col`: image[ci, tap(p, ki, kj)] += cols[(ci, ki, kj), p].
fn col2im(cols: &[f32], g: &Geom, image: &mut [f32]) {
    let (hw, pixels) = (g.h * g.w, g.pixels());
    for (r, src) in cols.chunks(pixels).enumerate() {
        let (ci, ki, kj) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let plane = &mut image[ci * hw..(ci + 1) * hw];
        for (p, &v) in src.iter().enumerate() {
            if let Some(i) = g.tap(p / g.ow, p % g.ow, ki, kj) {
                plane[i] += v;
            }
        }
    }
}

impl Tensor {
    /// d loss / d input of `input.conv2d(weight, _, p)` given d loss / d output (`grad_out`,
    /// [N, O, OH, OW]); `input_shape` is [N, C, H, W]. Returns `grad_out`'s dtype.
    pub fn conv2d_backward_input(grad_out: &Tensor, weight: &Tensor, input_shape: [usize; 4], p: Conv2dParams) -> Result<Tensor> {
        const OP: &str = "conv2d_backward_input";
        grad_out.same_device(weight, OP)?;
        grad_out.float_only(OP)?;
        let ws: [usize; 4] = weight.shape().try_into().map_err(|_| Error::BadShape { op: OP, msg: "weight must be [O, C / groups, kH, kW]".into(), shape: weight.shape().to_vec() })?;
        let g = Geom::new(OP, input_shape, ws, grad_out, p)?;
        if matches!(&*grad_out.read_storage(), Storage::Cuda(_)) {
            return crate::cuda::conv::conv2d_backward_input(grad_out, weight, input_shape, p);
        }
        let (cg, og, kdim, pixels, hw) = (g.cg(), g.og(), g.kdim(), g.pixels(), g.h * g.w);
        let mut dx = vec![0f32; g.n * g.c * hw];
        if !dx.is_empty() && pixels > 0 && kdim > 0 {
            grad_out.with_cpu_f32(|dy| {
                weight.with_cpu_f32(|wt| {
                    let par = if g.n > 1 { gemm::Parallelism::None } else { parallelism(kdim * pixels * og) };
                    dx.par_chunks_mut(g.c * hw).enumerate().for_each(|(ni, dxn)| {
                        let mut cols = vec![0f32; kdim * pixels];
                        for gi in 0..p.groups {
                            let wg = &wt[gi * og * kdim..][..og * kdim];
                            let dyg = &dy[(ni * g.o + gi * og) * pixels..][..og * pixels];
                            // SAFETY: cols is kdim x pixels row-major; the lhs is wg (og x kdim
                            // row-major) read transposed (rs 1, cs kdim); the rhs is dyg (og x pixels).
                            unsafe {
                                gemm_f32(kdim, pixels, og, cols.as_mut_ptr(), pixels, 1, false, wg.as_ptr(), 1, kdim, dyg.as_ptr(), pixels, 1, par);
                            }
                            col2im(&cols, &g, &mut dxn[gi * cg * hw..(gi + 1) * cg * hw]);
                        }
                    });
                    Ok(())
                })
            })?;
        }
        Tensor::from_f32_vec(dx, &input_shape, grad_out.dtype())
    }

    /// d loss / d weight of `input.conv2d(weight, _, p)` given `grad_out` ([N, O, OH, OW]);
    /// `weight_shape` is [O, C / groups, kH, kW]. Returns `grad_out`'s dtype.
    pub fn conv2d_backward_weight(input: &Tensor, grad_out: &Tensor, weight_shape: [usize; 4], p: Conv2dParams) -> Result<Tensor> {
        const OP: &str = "conv2d_backward_weight";
        grad_out.same_device(input, OP)?;
        grad_out.float_only(OP)?;
        let is: [usize; 4] = input.shape().try_into().map_err(|_| Error::BadShape { op: OP, msg: "input must be [N, C, H, W]".into(), shape: input.shape().to_vec() })?;
        let g = Geom::new(OP, is, weight_shape, grad_out, p)?;
        if matches!(&*grad_out.read_storage(), Storage::Cuda(_)) {
            return crate::cuda::conv::conv2d_backward_weight(input, grad_out, weight_shape, p);
        }
        let (cg, og, kdim, pixels, hw) = (g.cg(), g.og(), g.kdim(), g.pixels(), g.h * g.w);
        let wlen = g.o * kdim;
        let mut dw = vec![0f32; wlen];
        if g.n > 0 && pixels > 0 && wlen > 0 {
            let parts: Vec<Vec<f32>> = input.with_cpu_f32(|x| {
                grad_out.with_cpu_f32(|dy| {
                    let par = if g.n > 1 { gemm::Parallelism::None } else { parallelism(kdim * pixels * og) };
                    Ok((0..g.n)
                        .into_par_iter()
                        .map(|ni| {
                            let mut part = vec![0f32; wlen];
                            let mut cols = vec![0f32; kdim * pixels];
                            for gi in 0..p.groups {
                                im2col(&x[(ni * g.c + gi * cg) * hw..][..cg * hw], &g, &mut cols);
                                let dyg = &dy[(ni * g.o + gi * og) * pixels..][..og * pixels];
                                // SAFETY: dst is og x kdim row-major inside `part`; lhs dyg is og x
                                // pixels; rhs is cols (kdim x pixels) read transposed (rs 1, cs pixels).
                                unsafe {
                                    gemm_f32(og, kdim, pixels, part.as_mut_ptr().add(gi * og * kdim), kdim, 1, false, dyg.as_ptr(), pixels, 1, cols.as_ptr(), 1, pixels, par);
                                }
                            }
                            part
                        })
                        .collect())
                })
            })?;
            for part in parts {
                dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
        }
        Tensor::from_f32_vec(dw, &weight_shape, grad_out.dtype())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Conv2dParams, Device, Tensor};

    /// <dy, conv(x, w)> is bilinear: its gradients are the backward ops; check them against
    /// central differences of the forward on a grouped, strided, dilated, padded case.
    #[test]
    fn backward_ops_match_differences_of_the_forward() {
        let p = Conv2dParams { stride: [2, 1], padding: [1, 2], dilation: [1, 2], groups: 2 };
        let (xs, ws) = ([2usize, 4, 5, 6], [6usize, 2, 3, 2]);
        let x: Vec<f32> = (0..xs.iter().product::<usize>()).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
        let w: Vec<f32> = (0..ws.iter().product::<usize>()).map(|i| ((i * 104729) % 17) as f32 / 8.0 - 1.0).collect();
        let xt = Tensor::from_slice(&x, &xs, Device::Cpu).unwrap();
        let wt = Tensor::from_slice(&w, &ws, Device::Cpu).unwrap();
        let y = xt.conv2d(&wt, None, p).unwrap();
        let dy: Vec<f32> = (0..y.elem_count()).map(|i| ((i * 31) % 13) as f32 * 0.1 - 0.6).collect();
        let dyt = Tensor::from_slice(&dy, y.shape(), Device::Cpu).unwrap();
        let dx = Tensor::conv2d_backward_input(&dyt, &wt, xs, p).unwrap().to_vec::<f32>().unwrap();
        let dw = Tensor::conv2d_backward_weight(&xt, &dyt, ws, p).unwrap().to_vec::<f32>().unwrap();
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let y = Tensor::from_slice(x, &xs, Device::Cpu).unwrap().conv2d(&Tensor::from_slice(w, &ws, Device::Cpu).unwrap(), None, p).unwrap();
            y.to_vec::<f32>().unwrap().iter().zip(&dy).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        // The loss is linear in each argument, so a unit difference is exact up to rounding.
        for i in (0..x.len()).step_by(7) {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += 0.5;
            b[i] -= 0.5;
            let want = loss(&a, &w) - loss(&b, &w);
            assert!((dx[i] as f64 - want).abs() < 1e-3, "dx[{i}] {} vs {want}", dx[i]);
        }
        for i in 0..w.len() {
            let (mut a, mut b) = (w.clone(), w.clone());
            a[i] += 0.5;
            b[i] -= 0.5;
            let want = loss(&x, &a) - loss(&x, &b);
            assert!((dw[i] as f64 - want).abs() < 1e-3, "dw[{i}] {} vs {want}", dw[i]);
        }
    }
}
