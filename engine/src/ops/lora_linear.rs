//! The LoRA linear, y = x W^T + bias + s (x A^T) B^T (x [..., K], W [N, K], bias [N], A [r, K],
//! B [N, r]), forward and backward, with the LoRA term added inside the product that writes y
//! instead of in a second pass over it (math: kernels::lora_linear).
//!
//! CPU: f32 GEMMs (crate::cpu::gemm) accumulating into the same output: y = bias; y += x W^T;
//! t = s x A^T; y += t B^T (and dx = dy W; dx += (s u) A).
//! CUDA: t = s x A^T (skinny, cuBLASLt), then the fused kernel y = [x | t] · [W | B]^T + bias
//! (engine/src/cuda/lora_linear.rs); dx likewise as [dy | s u] · [W ; A]; dA, dB, dW are cuBLASLt
//! GEMMs and dbias a column sum. Where the kernel does not apply (f32, K or N not a multiple of 8)
//! the unfused composition of cuBLASLt GEMMs runs instead; the kernel itself has not yet run on a
//! GPU, so `LoraPath::Auto` takes it only with `cuda::experimental_kernels()` on. On compute
//! capability 9.0 with `cuda::hopper_kernels()` on as well, the fused GEMM is the wgmma kernel
//! (kernels/cuda/lora_linear_hopper.cu) instead of the mma.sync one (same contract), or with
//! LOOKAHEAD_VARIANT_LORA=tma / tma256 the warp-specialized TMA kernel
//! (kernels/cuda/lora_linear_tma.cu) where the LoRA rank is a multiple of 8.

use kernels::lora_linear::BLayout;

use crate::cpu::gemm::{gemm_f32, parallelism};
use crate::{DType, Device, Error, Result, Tensor};

/// Which CUDA implementation to use (the CPU has one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPath {
    /// The fused kernel where it applies and the experimental kernels are on, else the composition.
    Auto,
    /// The fused kernel; an error where it does not apply (parity tests and benchmarks).
    Fused,
    /// The unfused composition of cuBLASLt GEMMs (and an add).
    Composed,
}

/// Which gradients `lora_linear_backward` computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraGradsWanted {
    pub dx: bool,
    pub dw: bool,
    pub da: bool,
    pub db: bool,
    pub dbias: bool,
}

/// The gradients asked for (None for the others), in the inputs' dtype and shapes.
#[derive(Clone, Debug, Default)]
pub struct LoraLinearGrads {
    pub dx: Option<Tensor>,
    pub dw: Option<Tensor>,
    pub da: Option<Tensor>,
    pub db: Option<Tensor>,
    pub dbias: Option<Tensor>,
}

/// Checked sizes: rows m (x's leading dims flattened), n out, k in, rank r.
#[derive(Clone, Copy, Debug)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    r: usize,
}

fn shapes(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor) -> String {
    format!("x {:?}, w {:?}, a {:?}, b {:?}", x.shape(), w.shape(), a.shape(), b.shape())
}

/// Validates x [..., K], w [N, K], a [r, K], b [N, r], bias [N], dy [..., N]: one float dtype, one
/// device.
fn check(op: &'static str, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, dy: Option<&Tensor>) -> Result<Dims> {
    let mut all = vec![w, a, b];
    all.extend(bias);
    all.extend(dy);
    for t in &all {
        x.same_device(t, op)?;
        x.same_dtype(t, op)?;
    }
    x.float_only(op)?;
    if x.rank() == 0 || w.rank() != 2 || a.rank() != 2 || b.rank() != 2 {
        return Err(Error::BadShape { op, msg: format!("expected x [..., K], w [N, K], a [r, K], b [N, r]; got {}", shapes(x, w, a, b)), shape: x.shape().to_vec() });
    }
    let (n, k, r) = (w.shape()[0], w.shape()[1], a.shape()[0]);
    if x.shape()[x.rank() - 1] != k || a.shape()[1] != k || b.shape() != [n, r] {
        return Err(Error::BadShape { op, msg: format!("expected x [..., K], w [N, K], a [r, K], b [N, r] with one N, K, r; got {}", shapes(x, w, a, b)), shape: x.shape().to_vec() });
    }
    if let Some(bias) = bias {
        if bias.shape() != [n] {
            return Err(Error::ShapeMismatch { op: "lora_linear (bias vs [N] of w [N, K])", lhs: bias.shape().to_vec(), rhs: vec![n] });
        }
    }
    let m = x.shape()[..x.rank() - 1].iter().product();
    if let Some(dy) = dy {
        let mut want = x.shape().to_vec();
        *want.last_mut().expect("rank >= 1") = n;
        if dy.shape() != want {
            return Err(Error::ShapeMismatch { op: "lora_linear_backward (dy vs x's leading dims + [N])", lhs: dy.shape().to_vec(), rhs: want });
        }
    }
    Ok(Dims { m, n, k, r })
}

/// `t` as a contiguous [rows, cols] matrix.
fn matrix(t: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    t.contiguous()?.reshape(&[rows, cols])
}

/// x's shape with the last dim replaced by `last`.
fn with_last(x: &Tensor, last: usize) -> Vec<usize> {
    let mut s = x.shape().to_vec();
    *s.last_mut().expect("rank >= 1") = last;
    s
}

impl Tensor {
    /// x W^T + bias + scale · (x A^T) B^T for x [..., K] (self), w [N, K], bias [N], a [r, K],
    /// b [N, r], all of one dtype; [..., N]. See the module docs for how it runs.
    pub fn lora_linear(&self, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f32) -> Result<Tensor> {
        self.lora_linear_with(w, bias, a, b, scale, LoraPath::Auto)
    }

    /// `lora_linear` with the CUDA implementation chosen by `path`.
    pub fn lora_linear_with(&self, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f32, path: LoraPath) -> Result<Tensor> {
        const OP: &str = "lora_linear";
        let d = check(OP, self, w, bias, a, b, None)?;
        let out_shape = with_last(self, d.n);
        if self.device() == Device::Cpu {
            return forward_cpu(self, w, bias, a, b, scale, d)?.reshape(&out_shape);
        }
        let x2 = matrix(self, d.m, d.k)?;
        let y = match cuda_fused(OP, self.device(), self.dtype(), d, path)? {
            true => {
                // t = s x A^T (A^T a transposed view, read in place), then one pass over y.
                let t = crate::cuda::gemm::matmul_scaled(&x2, &a.t()?, scale, self.dtype())?;
                crate::cuda::lora_linear::concat_gemm(&x2, w, &t, b, bias, (d.m, d.n, d.k, d.r), BLayout::NMajor)?
            }
            false => {
                let t = crate::cuda::gemm::matmul_scaled(&x2, &a.t()?, scale, self.dtype())?;
                x2.linear(w, bias)?.add(&t.matmul(&b.t()?)?)?
            }
        };
        y.reshape(&out_shape)
    }

    /// The gradients of `lora_linear` (self = x) for the upstream gradient dy [..., N], those
    /// `need` asks for. W is frozen unless `need.dw`.
    pub fn lora_linear_backward(&self, w: &Tensor, a: &Tensor, b: &Tensor, scale: f32, dy: &Tensor, need: LoraGradsWanted) -> Result<LoraLinearGrads> {
        self.lora_linear_backward_with(w, a, b, scale, dy, need, LoraPath::Auto)
    }

    /// `lora_linear_backward` with the CUDA implementation of dx chosen by `path`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear_backward_with(&self, w: &Tensor, a: &Tensor, b: &Tensor, scale: f32, dy: &Tensor, need: LoraGradsWanted, path: LoraPath) -> Result<LoraLinearGrads> {
        const OP: &str = "lora_linear_backward";
        let d = check(OP, self, w, None, a, b, Some(dy))?;
        if self.device() == Device::Cpu {
            return backward_cpu(self, w, a, b, scale, dy, need, d);
        }
        let dtype = self.dtype();
        let (x2, dy2) = (matrix(self, d.m, d.k)?, matrix(dy, d.m, d.n)?);
        let mut g = LoraLinearGrads::default();
        // s u = s dy B: dx's LoRA operand and dA's left factor.
        let su = if need.dx || need.da { Some(crate::cuda::gemm::matmul_scaled(&dy2, b, scale, dtype)?) } else { None };
        if need.dx {
            let su = su.as_ref().expect("computed above");
            let dx = match cuda_fused(OP, self.device(), dtype, Dims { m: d.m, n: d.k, k: d.n, r: d.r }, path)? {
                // dx [M, K] = [dy | s u] · [W ; A]: W [N, K] and A [r, K] are k-major B operands.
                true => crate::cuda::lora_linear::concat_gemm(&dy2, w, su, a, None, (d.m, d.k, d.n, d.r), BLayout::KMajor)?,
                false => dy2.matmul(w)?.add(&su.matmul(a)?)?,
            };
            g.dx = Some(dx.reshape(self.shape())?);
        }
        if need.da {
            g.da = Some(su.as_ref().expect("computed above").t()?.matmul(&x2)?);
        }
        if need.db {
            let t = crate::cuda::gemm::matmul_scaled(&x2, &a.t()?, scale, dtype)?;
            g.db = Some(dy2.t()?.matmul(&t)?);
        }
        if need.dw {
            g.dw = Some(dy2.t()?.matmul(&x2)?);
        }
        if need.dbias {
            g.dbias = Some(dy2.sum(&[0], false)?);
        }
        Ok(g)
    }
}

/// Whether the CUDA op runs the fused kernel for an [m, n] result over k base and r LoRA columns.
fn cuda_fused(op: &'static str, device: Device, dtype: DType, d: Dims, path: LoraPath) -> Result<bool> {
    let Device::Cuda(ordinal) = device else { return Ok(false) };
    if path == LoraPath::Composed {
        return Ok(false);
    }
    let dev = crate::cuda::device(ordinal)?;
    let ok = crate::cuda::lora_linear::fused_supported(&dev, dtype, d.m, d.n, d.k, d.r);
    match path {
        LoraPath::Fused if !ok => Err(Error::BadShape {
            op,
            msg: format!("the fused CUDA kernel needs bf16/f16, sm_80+, and the output and reduction widths multiples of 8; got {dtype}, sm_{}, [{} x {}] over {} + rank {}", dev.arch(), d.m, d.n, d.k, d.r),
            shape: vec![d.m, d.n, d.k, d.r],
        }),
        LoraPath::Fused => Ok(true),
        _ => Ok(ok && crate::cuda::experimental_kernels()),
    }
}

/// y [M, N] on the CPU in f32: y = bias (or 0); y += x W^T; t = s x A^T; y += t B^T.
fn forward_cpu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f32, d: Dims) -> Result<Tensor> {
    let Dims { m, n, k, r } = d;
    let mut y = match bias {
        Some(bias) => {
            let bv = bias.to_vec_f32()?;
            let mut y = Vec::with_capacity(m * n);
            for _ in 0..m {
                y.extend_from_slice(&bv);
            }
            y
        }
        None => vec![0f32; m * n],
    };
    let mut t = vec![0f32; m * r];
    x.with_cpu_f32(|xs| {
        w.with_cpu_f32(|ws| {
            a.with_cpu_f32(|as_| {
                // SAFETY: xs [m, k], ws [n, k], as_ [r, k] are contiguous (with_cpu_f32) with the
                // checked shapes; y [m, n] and t [m, r] are exclusive buffers of those sizes.
                unsafe {
                    if m * n * k > 0 {
                        // rhs = W^T: element (p, j) = W[j][p].
                        gemm_f32(m, n, k, y.as_mut_ptr(), n, 1, bias.is_some(), xs.as_ptr(), k, 1, ws.as_ptr(), 1, k, parallelism(m * n * k));
                    }
                    if m * r * k > 0 {
                        gemm_f32(m, r, k, t.as_mut_ptr(), r, 1, false, xs.as_ptr(), k, 1, as_.as_ptr(), 1, k, parallelism(m * r * k));
                    }
                }
                Ok(())
            })
        })
    })?;
    t.iter_mut().for_each(|v| *v *= scale);
    b.with_cpu_f32(|bs| {
        if m * n * r > 0 {
            // SAFETY: t [m, r], bs [n, r] contiguous; y [m, n] exclusive.
            unsafe { gemm_f32(m, n, r, y.as_mut_ptr(), n, 1, true, t.as_ptr(), r, 1, bs.as_ptr(), 1, r, parallelism(m * n * r)) };
        }
        Ok(())
    })?;
    Tensor::from_f32_vec(y, &[m, n], x.dtype())
}

/// The backward on the CPU in f32 (t = x A^T, u = dy B): dx = dy W + (s u) A, dA = (s u)^T x,
/// dB = s dy^T t, dW = dy^T x, dbias = column sums of dy.
#[allow(clippy::too_many_arguments)]
fn backward_cpu(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f32, dy: &Tensor, need: LoraGradsWanted, d: Dims) -> Result<LoraLinearGrads> {
    let Dims { m, n, k, r } = d;
    let dtype = x.dtype();
    let mut g = LoraLinearGrads::default();
    let xs = if need.da || need.db || need.dw { x.to_vec_f32()? } else { Vec::new() };
    let dys = dy.to_vec_f32()?;
    let (ws, as_, bs) = (w.to_vec_f32()?, a.to_vec_f32()?, b.to_vec_f32()?);
    // dst [rows, cols] = lhs · rhs over `inner`, operands given by (slice, row stride, col stride).
    let product = |rows: usize, cols: usize, inner: usize, lhs: (&[f32], usize, usize), rhs: (&[f32], usize, usize), dst: &mut [f32], accumulate: bool| {
        if rows * cols * inner == 0 {
            return;
        }
        // SAFETY: every operand below is a contiguous buffer of the shape its strides describe,
        // and dst an exclusive [rows, cols] buffer.
        unsafe { gemm_f32(rows, cols, inner, dst.as_mut_ptr(), cols, 1, accumulate, lhs.0.as_ptr(), lhs.1, lhs.2, rhs.0.as_ptr(), rhs.1, rhs.2, parallelism(rows * cols * inner)) };
    };
    let mut su = vec![0f32; m * r];
    if need.dx || need.da {
        product(m, r, n, (&dys, n, 1), (&bs, r, 1), &mut su, false);
        su.iter_mut().for_each(|v| *v *= scale);
    }
    if need.dx {
        let mut dx = vec![0f32; m * k];
        product(m, k, n, (&dys, n, 1), (&ws, k, 1), &mut dx, false);
        product(m, k, r, (&su, r, 1), (&as_, k, 1), &mut dx, true);
        g.dx = Some(Tensor::from_f32_vec(dx, x.shape(), dtype)?);
    }
    if need.da {
        let mut da = vec![0f32; r * k];
        product(r, k, m, (&su, 1, r), (&xs, k, 1), &mut da, false);
        g.da = Some(Tensor::from_f32_vec(da, &[r, k], dtype)?);
    }
    if need.db {
        let mut t = vec![0f32; m * r];
        product(m, r, k, (&xs, k, 1), (&as_, 1, k), &mut t, false);
        let mut db = vec![0f32; n * r];
        product(n, r, m, (&dys, 1, n), (&t, r, 1), &mut db, false);
        db.iter_mut().for_each(|v| *v *= scale);
        g.db = Some(Tensor::from_f32_vec(db, &[n, r], dtype)?);
    }
    if need.dw {
        let mut dw = vec![0f32; n * k];
        product(n, k, m, (&dys, 1, n), (&xs, k, 1), &mut dw, false);
        g.dw = Some(Tensor::from_f32_vec(dw, &[n, k], dtype)?);
    }
    if need.dbias {
        let mut db = vec![0f64; n];
        for row in dys.chunks(n.max(1)).take(m) {
            for (s, &v) in db.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        g.dbias = Some(Tensor::from_f32_vec(db.into_iter().map(|v| v as f32).collect(), &[n], dtype)?);
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::lora_linear::{self as reference, LoraDims};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97_531) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
    }

    fn close(label: &str, got: &Tensor, want: &[f32], tol: f32) {
        let got = got.to_vec_f32().unwrap();
        assert_eq!(got.len(), want.len(), "{label}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{label}[{i}]: {g} vs {w}");
        }
    }

    const ALL: LoraGradsWanted = LoraGradsWanted { dx: true, dw: true, da: true, db: true, dbias: true };

    #[test]
    fn cpu_forward_and_backward_match_the_reference() {
        // Odd sizes; x with two leading dims (flattened to m = 3 * 7 rows).
        for (lead, n, k, r) in [([3usize, 7usize], 13usize, 9usize, 5usize), ([1, 4], 8, 16, 1), ([2, 3], 5, 3, 0)] {
            let m = lead[0] * lead[1];
            let d = LoraDims { m, n, k, r };
            let (xv, wv, av, bv, biasv, dyv) = (values(m * k, 1), values(n * k, 2), values(r * k, 3), values(n * r, 4), values(n, 5), values(m * n, 6));
            let (x, w, a, b, bias, dy) = (t(&xv, &[lead[0], lead[1], k]), t(&wv, &[n, k]), t(&av, &[r, k]), t(&bv, &[n, r]), t(&biasv, &[n]), t(&dyv, &[lead[0], lead[1], n]));
            let s = 0.75;
            let y = x.lora_linear(&w, Some(&bias), &a, &b, s).unwrap();
            assert_eq!(y.shape(), &[lead[0], lead[1], n]);
            close("y", &y, &reference::forward(&xv, &wv, Some(&biasv), &av, &bv, s, d), 1e-5);
            close("y no bias", &x.lora_linear(&w, None, &a, &b, s).unwrap(), &reference::forward(&xv, &wv, None, &av, &bv, s, d), 1e-5);
            let g = x.lora_linear_backward(&w, &a, &b, s, &dy, ALL).unwrap();
            let want = reference::backward(&xv, &wv, &av, &bv, s, &dyv, d);
            assert_eq!(g.dx.as_ref().unwrap().shape(), x.shape());
            close("dx", g.dx.as_ref().unwrap(), &want.dx, 1e-5);
            close("dw", g.dw.as_ref().unwrap(), &want.dw, 1e-5);
            close("da", g.da.as_ref().unwrap(), &want.da, 1e-5);
            close("db", g.db.as_ref().unwrap(), &want.db, 1e-5);
            close("dbias", g.dbias.as_ref().unwrap(), &want.dbias, 1e-5);
            // Only what is asked for.
            let some = x.lora_linear_backward(&w, &a, &b, s, &dy, LoraGradsWanted { da: true, ..Default::default() }).unwrap();
            assert!(some.dx.is_none() && some.dw.is_none() && some.db.is_none() && some.dbias.is_none());
            close("da alone", some.da.as_ref().unwrap(), &want.da, 1e-5);
        }
    }

    #[test]
    fn bf16_views_and_errors() {
        let (m, n, k, r) = (5, 6, 4, 2);
        let (xv, wv, av, bv) = (values(m * k, 7), values(n * k, 8), values(r * k, 9), values(n * r, 10));
        // A transposed (non-contiguous) x: stored [k, m], viewed as [m, k].
        let xt: Vec<f32> = (0..k * m).map(|i| xv[(i % m) * k + i / m]).collect();
        let x = t(&xt, &[k, m]).t().unwrap();
        let (w, a, b) = (t(&wv, &[n, k]), t(&av, &[r, k]), t(&bv, &[n, r]));
        close("transposed x", &x.lora_linear(&w, None, &a, &b, 2.0).unwrap(), &reference::forward(&xv, &wv, None, &av, &bv, 2.0, LoraDims { m, n, k, r }), 1e-5);
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let y = bf(&x).lora_linear(&bf(&w), None, &bf(&a), &bf(&b), 2.0).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        close("bf16", &y, &x.lora_linear(&w, None, &a, &b, 2.0).unwrap().to_vec_f32().unwrap(), 3e-2);
        // Errors name the shapes; never a panic.
        let e = x.lora_linear(&w, None, &b, &a, 1.0).unwrap_err().to_string();
        assert!(e.contains("lora_linear") && e.contains("[2, 4]") && e.contains("[6, 2]"), "{e}");
        assert!(x.lora_linear(&w, Some(&t(&[0.0; 5], &[5])), &a, &b, 1.0).is_err());
        assert!(x.lora_linear(&bf(&w), None, &a, &b, 1.0).is_err());
        assert!(x.lora_linear_backward(&w, &a, &b, 1.0, &t(&[0.0; 30], &[6, 5]), ALL).is_err());
        assert!(t(&[1.0], &[]).lora_linear(&w, None, &a, &b, 1.0).is_err());
    }
}
