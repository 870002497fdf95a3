//! 2-D convolution (PyTorch `F.conv2d`): NCHW input, [out, in / groups, kh, kw] weight.

use crate::cpu::conv::{conv2d as cpu_conv2d, ConvGeom};
use crate::storage::Storage;
use crate::{Error, Result, Tensor};

/// Stride, zero padding and dilation (height first) and the number of groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 }
    }
}

impl Conv2dParams {
    /// Same stride and padding on both axes, no dilation, one group.
    pub fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams { stride: [stride; 2], padding: [padding; 2], ..Default::default() }
    }
}

impl Tensor {
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
        const OP: &str = "conv2d";
        self.same_device(weight, OP)?;
        self.same_dtype(weight, OP)?;
        self.float_only(OP)?;
        let bad = |msg: String, shape: &[usize]| Error::BadShape { op: OP, msg, shape: shape.to_vec() };
        if self.rank() != 4 {
            return Err(bad("input must be [N, C, H, W]".into(), self.shape()));
        }
        if weight.rank() != 4 {
            return Err(bad("weight must be [O, C / groups, kH, kW]".into(), weight.shape()));
        }
        let (&[n, c, h, w], &[o, cg, kh, kw]) = (self.shape(), weight.shape()) else { unreachable!("ranks checked") };
        if p.groups == 0 || c % p.groups != 0 || o % p.groups != 0 {
            return Err(Error::ShapeMismatch { op: "conv2d (channels and out channels must divide by groups)", lhs: self.shape().to_vec(), rhs: weight.shape().to_vec() });
        }
        if cg != c / p.groups {
            return Err(Error::ShapeMismatch { op: "conv2d (weight in-channels vs input channels / groups)", lhs: self.shape().to_vec(), rhs: weight.shape().to_vec() });
        }
        if p.stride.contains(&0) || p.dilation.contains(&0) || kh == 0 || kw == 0 {
            return Err(bad(format!("zero kernel size, stride or dilation ({p:?})"), weight.shape()));
        }
        let out_len = |input: usize, pad: usize, k: usize, d: usize, s: usize| -> Result<usize> {
            let span = d * (k - 1) + 1;
            if input + 2 * pad < span {
                return Err(Error::ShapeMismatch { op: "conv2d (kernel larger than padded input)", lhs: self.shape().to_vec(), rhs: weight.shape().to_vec() });
            }
            Ok((input + 2 * pad - span) / s + 1)
        };
        let oh = out_len(h, p.padding[0], kh, p.dilation[0], p.stride[0])?;
        let ow = out_len(w, p.padding[1], kw, p.dilation[1], p.stride[1])?;
        if let Some(b) = bias {
            self.same_device(b, OP)?;
            self.same_dtype(b, OP)?;
            if b.shape() != [o] {
                return Err(Error::ShapeMismatch { op: "conv2d (bias vs [out channels])", lhs: b.shape().to_vec(), rhs: vec![o] });
            }
        }
        if matches!(&*self.read_storage(), Storage::Cuda(_)) {
            return crate::cuda::conv::conv2d(self, weight, bias, p, oh, ow);
        }
        let g = ConvGeom { n, c, h, w, o, kh, kw, oh, ow, stride: p.stride, padding: p.padding, dilation: p.dilation, groups: p.groups };
        let bias_v = bias.map(|b| b.to_vec_f32()).transpose()?;
        let out = self.with_cpu_f32(|x| weight.with_cpu_f32(|wt| Ok(cpu_conv2d(x, wt, bias_v.as_deref(), &g))))?;
        Tensor::from_f32_vec(out, &[n, o, oh, ow], self.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::Conv2dParams;
    use crate::{DType, Device, Tensor};

    /// Direct-loop convolution for checking the im2col path on many small configurations.
    #[allow(clippy::too_many_arguments)]
    fn naive(x: &[f32], xs: [usize; 4], wt: &[f32], ws: [usize; 4], p: Conv2dParams) -> (Vec<f32>, [usize; 4]) {
        let [n, c, h, w] = xs;
        let [o, cg, kh, kw] = ws;
        let og = o / p.groups;
        let oh = (h + 2 * p.padding[0] - p.dilation[0] * (kh - 1) - 1) / p.stride[0] + 1;
        let ow = (w + 2 * p.padding[1] - p.dilation[1] * (kw - 1) - 1) / p.stride[1] + 1;
        let mut out = vec![0f32; n * o * oh * ow];
        for ni in 0..n {
            for oc in 0..o {
                let gi = oc / og;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = 0f32;
                        for ci in 0..cg {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let iy = (oy * p.stride[0] + ki * p.dilation[0]) as isize - p.padding[0] as isize;
                                    let ix = (ox * p.stride[1] + kj * p.dilation[1]) as isize - p.padding[1] as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        let xv = x[((ni * c + gi * cg + ci) * h + iy as usize) * w + ix as usize];
                                        s += xv * wt[((oc * cg + ci) * kh + ki) * kw + kj];
                                    }
                                }
                            }
                        }
                        out[((ni * o + oc) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        (out, [n, o, oh, ow])
    }

    #[test]
    fn im2col_matches_direct_loops() {
        let configs = [
            ([2, 4, 7, 6], [6, 2, 3, 3], Conv2dParams { stride: [2, 1], padding: [1, 2], dilation: [1, 1], groups: 2 }),
            ([1, 3, 9, 8], [5, 3, 3, 2], Conv2dParams { stride: [1, 3], padding: [0, 1], dilation: [2, 1], groups: 1 }),
            ([3, 4, 5, 5], [4, 4, 1, 1], Conv2dParams::default()),
            ([1, 2, 4, 4], [2, 1, 5, 5], Conv2dParams { stride: [3, 3], padding: [3, 3], dilation: [1, 1], groups: 2 }),
        ];
        for (xs, ws, p) in configs {
            let x: Vec<f32> = (0..xs.iter().product::<usize>()).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
            let wt: Vec<f32> = (0..ws.iter().product::<usize>()).map(|i| ((i * 104729) % 17) as f32 / 8.0 - 1.0).collect();
            let (want, shape) = naive(&x, xs, &wt, ws, p);
            let xt = Tensor::from_slice(&x, &xs, Device::Cpu).unwrap();
            let wtt = Tensor::from_slice(&wt, &ws, Device::Cpu).unwrap();
            let got = xt.conv2d(&wtt, None, p).unwrap();
            assert_eq!(got.shape(), &shape);
            for (i, (a, b)) in got.to_vec::<f32>().unwrap().iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-4, "{xs:?} {ws:?} {p:?}: element {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = Tensor::zeros(&[1, 4, 5, 5], DType::F32, Device::Cpu).unwrap();
        let w = Tensor::zeros(&[4, 3, 3, 3], DType::F32, Device::Cpu).unwrap();
        assert!(x.conv2d(&w, None, Conv2dParams::default()).is_err());
        let w = Tensor::zeros(&[3, 2, 3, 3], DType::F32, Device::Cpu).unwrap();
        assert!(x.conv2d(&w, None, Conv2dParams { groups: 2, ..Default::default() }).is_err());
        let w = Tensor::zeros(&[4, 4, 7, 7], DType::F32, Device::Cpu).unwrap();
        assert!(x.conv2d(&w, None, Conv2dParams::default()).is_err());
        assert!(x.conv2d(&w, None, Conv2dParams::new(0, 3)).is_err());
        let w = Tensor::zeros(&[4, 4, 3, 3], DType::F32, Device::Cpu).unwrap();
        let b = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        assert!(x.conv2d(&w, Some(&b), Conv2dParams::default()).is_err());
    }
}
