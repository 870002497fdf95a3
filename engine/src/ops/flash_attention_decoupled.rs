//! Decoupled attention (IP-Adapter's cross-attention): q attends over two sources with independent
//! softmaxes, out = softmax(scale q k1^T) v1 + s2 softmax(scale q k2^T) v2 (source 1 = the text
//! tokens, source 2 = the IP tokens), returning each source's log-sum-exp for the backward pass
//! (Tensor::flash_attention_backward once per source). Math per head:
//! kernels::flash_attention::decoupled_attention_head.
//!
//! Why fused: SDXL cross-attention has Lq = 1024..4096 queries for 77 text + 16 IP keys, so it is
//! bound by reading q and writing out; two flash calls and a scaled add read q twice and write
//! three [B, H, Lq, D] tensors and read two, where the fused pass reads q once and writes once.
//! CPU: two CPU flash-attention calls in f32 and the weighted sum (the CPU is the reference).
//! CUDA: the decoupled mode of the fused forward kernel (kernels/cuda/flash_attention.cu) for
//! bf16/f16 with D in {64, 128} when the experimental kernels are on, else `composition` (two
//! flash_attention calls and the weighted sum in q's dtype).

use super::flash_attention::{flash_attention_shape, FlashShape};
use crate::{DType, Result, Tensor};

impl Tensor {
    /// q [B, H, Lq, D] over source 1 (k1/v1 [B, H, L1, D]) and source 2 (k2/v2 [B, H, L2, D]),
    /// each with its own softmax: out = attn(q, k1, v1) + s2 attn(q, k2, v2), scores scaled by
    /// `scale`. Views with any strides (the CUDA kernel needs the last dim contiguous and copies
    /// otherwise). Returns (out [B, H, Lq, D] in q's dtype ([B, Lq, H, D] memory, so that heads
    /// merge for free), lse1, lse2 [B, H, Lq] f32, natural log). A source with no key adds 0 and
    /// has lse -inf.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_decoupled(q: &Tensor, k1: &Tensor, v1: &Tensor, k2: &Tensor, v2: &Tensor, s2: f32, scale: f32) -> Result<(Tensor, Tensor, Tensor)> {
        // Each source checked on its own (errors say which), then the kernel's view of the call:
        // source 2 in the reference slot, lk = L1, lr = L2.
        let text = flash_attention_shape("flash_attention_decoupled (source 1: k1, v1)", q, k1, v1, None)?;
        let ip = flash_attention_shape("flash_attention_decoupled (source 2: k2, v2)", q, k2, v2, None)?;
        let shape = FlashShape { lr: ip.lk, ..text };
        if q.device().is_cuda() {
            if crate::cuda::flash_attention::kernel_applies(q.dtype(), shape.d) {
                return crate::cuda::flash_attention::decoupled_forward(q, k1, v1, k2, v2, s2, scale, &shape);
            }
            return composition(q, k1, v1, k2, v2, s2, scale);
        }
        cpu_forward(q, k1, v1, k2, v2, s2, scale)
    }
}

/// o1 + s2 o2 for two [B, H, Lq, D] views of [B, Lq, H, D] memory, as such a view again (the sum
/// is formed in [B, Lq, H, D] order).
fn weighted_sum(o1: &Tensor, o2: &Tensor, s2: f32, dtype: DType) -> Result<Tensor> {
    let (a, b) = (o1.transpose(1, 2)?, o2.transpose(1, 2)?);
    a.add(&b.mul_scalar(s2)?)?.to_dtype(dtype)?.transpose(1, 2)
}

/// Both sources in f32 by the CPU flash attention, summed in f32, rounded once to q's dtype.
fn cpu_forward(q: &Tensor, k1: &Tensor, v1: &Tensor, k2: &Tensor, v2: &Tensor, s2: f32, scale: f32) -> Result<(Tensor, Tensor, Tensor)> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let q32 = f(q)?;
    let (o1, lse1) = Tensor::flash_attention(&q32, &f(k1)?, &f(v1)?, None, scale)?;
    let (o2, lse2) = Tensor::flash_attention(&q32, &f(k2)?, &f(v2)?, None, scale)?;
    Ok((weighted_sum(&o1, &o2, s2, q.dtype())?, lse1, lse2))
}

/// The unfused form on any device: one flash_attention call per source, then o1 + s2 o2 in q's
/// dtype (CUDA without the fused kernel; on the CPU for the tests).
pub(crate) fn composition(q: &Tensor, k1: &Tensor, v1: &Tensor, k2: &Tensor, v2: &Tensor, s2: f32, scale: f32) -> Result<(Tensor, Tensor, Tensor)> {
    let (o1, lse1) = Tensor::flash_attention(q, k1, v1, None, scale)?;
    let (o2, lse2) = Tensor::flash_attention(q, k2, v2, None, scale)?;
    Ok((weighted_sum(&o1, &o2, s2, q.dtype())?, lse1, lse2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::flash_attention::test_inputs::heads;
    use kernels::flash_attention::{decoupled_attention_head, DecoupledDims};

    /// (out, lse1, lse2) per head through kernels' decoupled_attention_head on contiguous copies.
    fn reference_result(q: &Tensor, k1: &Tensor, v1: &Tensor, k2: &Tensor, v2: &Tensor, s2: f32, scale: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (b, h, lq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        let (l1, l2) = (k1.shape()[2], k2.shape()[2]);
        let c = |t: &Tensor| t.to_vec_f32().unwrap();
        let (qc, k1c, v1c, k2c, v2c) = (c(q), c(k1), c(v1), c(k2), c(v2));
        let (mut out, mut lse1, mut lse2) = (vec![0f32; b * h * lq * d], vec![0f32; b * h * lq], vec![0f32; b * h * lq]);
        for bh in 0..b * h {
            decoupled_attention_head(
                &qc[bh * lq * d..],
                &k1c[bh * l1 * d..],
                &v1c[bh * l1 * d..],
                &k2c[bh * l2 * d..],
                &v2c[bh * l2 * d..],
                DecoupledDims { lq, l1, l2, d },
                s2,
                scale,
                &mut out[bh * lq * d..(bh + 1) * lq * d],
                &mut lse1[bh * lq..(bh + 1) * lq],
                &mut lse2[bh * lq..(bh + 1) * lq],
            );
        }
        (out, lse1, lse2)
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (a, e)) in got.iter().zip(want).enumerate() {
            assert!(a == e || (a - e).abs() <= tol * e.abs().max(1.0), "{what}[{i}]: {a} vs {e}");
        }
    }

    #[test]
    fn matches_the_per_head_reference() {
        // 77 text keys, 5 IP keys (not a multiple of 8), Lq over two CPU query blocks.
        let (b, h, lq, l1, l2, d) = (2, 3, 77, 77, 5, 8);
        let (q, k1, v1, k2, v2) = (heads(b, lq, h, d, 1), heads(b, l1, h, d, 2), heads(b, l1, h, d, 3), heads(b, l2, h, d, 4), heads(b, l2, h, d, 5));
        let (out, lse1, lse2) = Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, 0.7, 0.3).unwrap();
        assert_eq!((out.shape(), lse1.shape(), lse2.shape()), (&[b, h, lq, d][..], &[b, h, lq][..], &[b, h, lq][..]));
        assert_eq!((out.dtype(), lse1.dtype(), lse2.dtype()), (DType::F32, DType::F32, DType::F32));
        // Heads merge for free: [B, Lq, H, D] memory.
        assert!(out.transpose(1, 2).unwrap().is_contiguous());
        let (want, want1, want2) = reference_result(&q, &k1, &v1, &k2, &v2, 0.7, 0.3);
        assert_close("out", &out.to_vec_f32().unwrap(), &want, 1e-5);
        assert_close("lse1", &lse1.to_vec_f32().unwrap(), &want1, 1e-5);
        assert_close("lse2", &lse2.to_vec_f32().unwrap(), &want2, 1e-5);
        // A text context shared by the batch (stride-0 view), and a negative weight.
        let k1s = heads(1, l1, h, d, 6).broadcast_to(&[b, h, l1, d]).unwrap();
        let (out, ..) = Tensor::flash_attention_decoupled(&q, &k1s, &v1, &k2, &v2, -1.5, 0.3).unwrap();
        let (want, ..) = reference_result(&q, &k1s, &v1, &k2, &v2, -1.5, 0.3);
        assert_close("out (shared text)", &out.to_vec_f32().unwrap(), &want, 1e-5);
    }

    #[test]
    fn a_source_with_no_key_adds_nothing() {
        let (b, h, lq, d) = (1, 2, 9, 8);
        let q = heads(b, lq, h, d, 1);
        let (k1, v1, k2, v2) = (heads(b, 7, h, d, 2), heads(b, 7, h, d, 3), heads(b, 4, h, d, 4), heads(b, 4, h, d, 5));
        let none = heads(b, 0, h, d, 6);
        // No IP keys: the text attention alone, lse2 -inf.
        let (out, lse1, lse2) = Tensor::flash_attention_decoupled(&q, &k1, &v1, &none, &none, 0.8, 0.4).unwrap();
        let (text, text_lse) = Tensor::flash_attention(&q, &k1, &v1, None, 0.4).unwrap();
        assert_eq!(out.to_vec_f32().unwrap(), text.to_vec_f32().unwrap());
        assert_eq!(lse1.to_vec_f32().unwrap(), text_lse.to_vec_f32().unwrap());
        assert!(lse2.to_vec_f32().unwrap().iter().all(|&x| x == f32::NEG_INFINITY));
        // No text keys: s2 times the IP attention, lse1 -inf.
        let (out, lse1, _) = Tensor::flash_attention_decoupled(&q, &none, &none, &k2, &v2, 0.8, 0.4).unwrap();
        let (ip, _) = Tensor::flash_attention(&q, &k2, &v2, None, 0.4).unwrap();
        let want: Vec<f32> = ip.to_vec_f32().unwrap().iter().map(|x| 0.8 * x).collect();
        assert_close("out (no text)", &out.to_vec_f32().unwrap(), &want, 1e-6);
        assert!(lse1.to_vec_f32().unwrap().iter().all(|&x| x == f32::NEG_INFINITY));
    }

    #[test]
    fn bf16_inputs_round_once() {
        let (b, h, lq, l1, l2, d) = (1, 2, 5, 7, 3, 16);
        let t = |l, seed| heads(b, l, h, d, seed).to_dtype(DType::BF16).unwrap();
        let (q, k1, v1, k2, v2) = (t(lq, 1), t(l1, 2), t(l1, 3), t(l2, 4), t(l2, 5));
        let (out, lse1, lse2) = Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, 0.6, 0.25).unwrap();
        assert_eq!((out.dtype(), lse1.dtype(), lse2.dtype()), (DType::BF16, DType::F32, DType::F32));
        let (want, ..) = reference_result(&q, &k1, &v1, &k2, &v2, 0.6, 0.25);
        // The f32 result rounded to bf16 once: exactly the reference rounded.
        for (a, e) in out.to_vec_f32().unwrap().iter().zip(&want) {
            let rounded = half::bf16::from_f32(*e).to_f32();
            assert!((a - rounded).abs() <= 1e-6 + (rounded.abs() / 128.0), "{a} vs {e}");
        }
        // The composition (rounding each source's output, then the sum) is close too.
        let (c, ..) = composition(&q, &k1, &v1, &k2, &v2, 0.6, 0.25).unwrap();
        for (a, e) in c.to_vec_f32().unwrap().iter().zip(&want) {
            assert!((a - e).abs() <= 2e-2, "{a} vs {e}");
        }
    }

    /// The CUDA fallback's composition of ops, run with the CPU's ops, against the CPU path.
    #[test]
    fn the_composition_matches_the_cpu_path() {
        let (b, h, lq, l1, l2, d) = (2, 2, 70, 13, 16, 8);
        let (q, k1, v1, k2, v2) = (heads(b, lq, h, d, 1), heads(b, l1, h, d, 2), heads(b, l1, h, d, 3), heads(b, l2, h, d, 4), heads(b, l2, h, d, 5));
        let (out, lse1, lse2) = composition(&q, &k1, &v1, &k2, &v2, 0.9, 0.35).unwrap();
        let (want, want1, want2) = Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, 0.9, 0.35).unwrap();
        assert!(out.transpose(1, 2).unwrap().is_contiguous());
        assert_close("out", &out.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), 1e-6);
        assert_close("lse1", &lse1.to_vec_f32().unwrap(), &want1.to_vec_f32().unwrap(), 1e-6);
        assert_close("lse2", &lse2.to_vec_f32().unwrap(), &want2.to_vec_f32().unwrap(), 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let (q, k1, v1) = (heads(1, 4, 2, 8, 1), heads(1, 3, 2, 8, 2), heads(1, 3, 2, 8, 3));
        let (k2, v2) = (heads(1, 5, 2, 8, 4), heads(1, 5, 2, 8, 5));
        let err = |r: Result<(Tensor, Tensor, Tensor)>| {
            let e = r.expect_err("an error").to_string();
            assert!(e.contains("flash_attention_decoupled"), "{e}");
        };
        err(Tensor::flash_attention_decoupled(&q.reshape(&[2, 4, 8]).unwrap(), &k1, &v1, &k2, &v2, 1.0, 1.0));
        err(Tensor::flash_attention_decoupled(&q, &k1.narrow(3, 0, 4).unwrap(), &v1, &k2, &v2, 1.0, 1.0));
        err(Tensor::flash_attention_decoupled(&q, &k1, &v1.narrow(2, 0, 2).unwrap(), &k2, &v2, 1.0, 1.0));
        err(Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2.narrow(1, 0, 1).unwrap(), &v2, 1.0, 1.0));
        err(Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2.narrow(2, 0, 4).unwrap(), 1.0, 1.0));
        err(Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2.to_dtype(DType::BF16).unwrap(), &v2, 1.0, 1.0));
        err(Tensor::flash_attention_decoupled(&q.to_dtype(DType::I64).unwrap(), &k1, &v1, &k2, &v2, 1.0, 1.0));
    }
}
