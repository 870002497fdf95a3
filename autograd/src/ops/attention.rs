//! Flash extended attention: forward `Tensor::flash_attention` (q over the keys/values [own ;
//! reference], reference tokens optionally dropped by a keep mask), backward
//! `Tensor::flash_attention_backward`, which recomputes the probabilities from the saved
//! log-sum-exp instead of keeping them (memory O(L), not O(L^2)).
//!
//! Decoupled attention (IP-Adapter's cross-attention, `Tensor::flash_attention_decoupled`): out =
//! attn(q, k1, v1) + s2 attn(q, k2, v2) with independent softmaxes. Its backward is the backward of
//! each source (dout and s2 dout), dq summed: exact, and cheap next to the rest of a UNet backward.

use engine::ops::flash_attention::AttentionReference;
use engine::{Error, Result, Tensor};

use crate::Var;

impl Var {
    /// q [B, H, Lq, D] over k/v [B, H, Lk, D] and the optional reference (k_ref, v_ref) [B, H, Lr,
    /// D]; `keep` (u8 [Lr] or [B, Lr], 1 = attend, needs a reference) receives no gradient.
    /// Returns out [B, H, Lq, D] in q's dtype; gradients flow to q, k, v, k_ref and v_ref.
    pub fn flash_attention(q: &Var, k: &Var, v: &Var, reference: Option<(&Var, &Var)>, keep: Option<&Tensor>, scale: f32) -> Result<Var> {
        if keep.is_some() && reference.is_none() {
            return Err(Error::BadShape { op: "flash_attention", msg: "a keep mask needs reference keys/values".into(), shape: q.shape().to_vec() });
        }
        let r = reference.map(|(kr, vr)| AttentionReference { k: kr.value(), v: vr.value(), keep });
        let (out, lse) = Tensor::flash_attention(q.value(), k.value(), v.value(), r, scale)?;
        // Saved: the inputs and out (shared storage, no copies) and lse [B, H, Lq].
        let (qt, kt, vt, saved_out) = (q.value().clone(), k.value().clone(), v.value().clone(), out.clone());
        let saved_ref = reference.map(|(kr, vr)| (kr.value().clone(), vr.value().clone()));
        let keep = keep.cloned();
        let mut parents = vec![q, k, v];
        if let Some((kr, vr)) = reference {
            parents.extend([kr, vr]);
        }
        Ok(Var::from_op("flash_attention", out, &parents, move |g, n| {
            let r = saved_ref.as_ref().map(|(kr, vr)| AttentionReference { k: kr, v: vr, keep: keep.as_ref() });
            let grads = Tensor::flash_attention_backward(&qt, &kt, &vt, r, scale, &saved_out, &lse, g)?;
            let mut out = vec![n[0].then_some(grads.dq), n[1].then_some(grads.dk), n[2].then_some(grads.dv)];
            if n.len() == 5 {
                out.push(grads.dk_ref.filter(|_| n[3]));
                out.push(grads.dv_ref.filter(|_| n[4]));
            }
            Ok(out)
        }))
    }
}

impl Var {
    /// Decoupled attention: q [B, H, Lq, D] over source 1 (k1/v1 [B, H, L1, D], the text tokens)
    /// and source 2 (k2/v2 [B, H, L2, D], the IP tokens) with independent softmaxes, out =
    /// attn(q, k1, v1) + s2 attn(q, k2, v2) (scores scaled by `scale`), in q's dtype. Gradients
    /// flow to q, k1, v1, k2 and v2.
    ///
    /// The backward needs each source's own normalized output O_i (flash attention's backward
    /// forms delta = rowsum(dO_i * O_i) from it), which the fused forward never writes. They are
    /// recomputed in the backward (one flash forward per source, bound by reading q and writing
    /// O_i) rather than written and kept by the forward: keeping them would cost two [B, H, Lq, D]
    /// tensors per IP layer for the whole step and give back the bytes the fusion saves. The
    /// saved lse1 / lse2 (O(Lq)) give the probabilities.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_decoupled(q: &Var, k1: &Var, v1: &Var, k2: &Var, v2: &Var, s2: f32, scale: f32) -> Result<Var> {
        let (out, lse1, lse2) = Tensor::flash_attention_decoupled(q.value(), k1.value(), v1.value(), k2.value(), v2.value(), s2, scale)?;
        // Saved: the inputs (shared storage, no copies) and lse1 / lse2 [B, H, Lq].
        let (qt, k1t, v1t, k2t, v2t) = (q.value().clone(), k1.value().clone(), v1.value().clone(), k2.value().clone(), v2.value().clone());
        Ok(Var::from_op("flash_attention_decoupled", out, &[q, k1, v1, k2, v2], move |g, n| {
            // Gradients of one source: its output recomputed, its saved lse, its part of dout.
            let source = |k: &Tensor, v: &Tensor, lse: &Tensor, dout: &Tensor| -> Result<_> {
                let (o, _) = Tensor::flash_attention(&qt, k, v, None, scale)?;
                Tensor::flash_attention_backward(&qt, k, v, None, scale, &o, lse, dout)
            };
            // A source is differentiated only when q or its own K/V want a gradient.
            let g1 = if n[0] || n[1] || n[2] { Some(source(&k1t, &v1t, &lse1, g)?) } else { None };
            let g2 = if n[0] || n[3] || n[4] { Some(source(&k2t, &v2t, &lse2, &g.mul_scalar(s2)?)?) } else { None };
            let dq = match (&g1, &g2) {
                (Some(a), Some(b)) if n[0] => Some(a.dq.add(&b.dq)?),
                _ => None,
            };
            let (dk1, dv1) = g1.map_or((None, None), |g| (n[1].then_some(g.dk), n[2].then_some(g.dv)));
            let (dk2, dv2) = g2.map_or((None, None), |g| (n[3].then_some(g.dk), n[4].then_some(g.dv)));
            Ok(vec![dq, dk1, dv1, dk2, dv2])
        }))
    }
}

#[cfg(test)]
mod tests {
    use engine::{DType, Device, Tensor};

    use crate::gradcheck::{gradcheck, GradcheckOptions};
    use crate::Var;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, DType::F32, Device::Cpu, seed).unwrap()
    }

    #[test]
    fn gradcheck_with_reference_and_keep_mask() {
        // Odd sizes; q stored [B, Lq, H, D] and viewed as [B, H, Lq, D] (the models' layout).
        let (b, h, lq, lk, lr, d) = (2, 2, 5, 3, 4, 6);
        let inputs = [randn(&[b, lq, h, d], 1), randn(&[b, h, lk, d], 2), randn(&[b, h, lk, d], 3), randn(&[b, h, lr, d], 4), randn(&[b, h, lr, d], 5)];
        let keep = Tensor::from_vec(vec![1u8, 0, 1, 1, 0, 1, 0, 1], &[b, lr], Device::Cpu).unwrap();
        gradcheck(
            "flash_attention reference + keep [B, Lr]",
            &inputs,
            |v| Var::flash_attention(&v[0].transpose(1, 2)?, &v[1], &v[2], Some((&v[3], &v[4])), Some(&keep), 0.45),
            GradcheckOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // A shared [Lr] mask, and no mask.
        let keep1 = Tensor::from_vec(vec![0u8, 1, 1, 0], &[lr], Device::Cpu).unwrap();
        gradcheck("flash_attention keep [Lr]", &inputs, |v| Var::flash_attention(&v[0].transpose(1, 2)?, &v[1], &v[2], Some((&v[3], &v[4])), Some(&keep1), 0.7), GradcheckOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        gradcheck("flash_attention reference", &inputs, |v| Var::flash_attention(&v[0].transpose(1, 2)?, &v[1], &v[2], Some((&v[3], &v[4])), None, 0.3), GradcheckOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn gradcheck_without_reference() {
        let inputs = [randn(&[1, 3, 7, 5], 6), randn(&[1, 3, 4, 5], 7), randn(&[1, 3, 4, 5], 8)];
        gradcheck("flash_attention own keys", &inputs, |v| Var::flash_attention(&v[0], &v[1], &v[2], None, None, 0.5), GradcheckOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn gradcheck_decoupled() {
        // 7 text keys, 5 IP keys, q stored [B, Lq, H, D]; every input gets a gradient.
        let (b, h, lq, l1, l2, d) = (2, 2, 5, 7, 5, 6);
        let inputs = [randn(&[b, lq, h, d], 11), randn(&[b, h, l1, d], 12), randn(&[b, h, l1, d], 13), randn(&[b, h, l2, d], 14), randn(&[b, h, l2, d], 15)];
        gradcheck("flash_attention_decoupled", &inputs, |v| Var::flash_attention_decoupled(&v[0].transpose(1, 2)?, &v[1], &v[2], &v[3], &v[4], 0.6, 0.45), GradcheckOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        // A negative weight, one IP key, a text context shared by the batch (a broadcast view).
        let inputs = [randn(&[1, h, 4, d], 16), randn(&[1, h, 3, d], 17), randn(&[1, h, 3, d], 18), randn(&[1, h, 1, d], 19), randn(&[1, h, 1, d], 20)];
        gradcheck(
            "flash_attention_decoupled one IP key",
            &inputs,
            |v| {
                let shared = |t: &Var| t.broadcast_to(&[2, h, 3, d]);
                Var::flash_attention_decoupled(&v[0].broadcast_to(&[2, h, 4, d])?, &shared(&v[1])?, &shared(&v[2])?, &v[3].broadcast_to(&[2, h, 1, d])?, &v[4].broadcast_to(&[2, h, 1, d])?, -1.2, 0.8)
            },
            GradcheckOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The decoupled forward and gradients equal those of two flash attentions summed with the
    /// weight (the unfused form the models used before), and frozen text K/V get no gradient.
    #[test]
    fn decoupled_equals_the_weighted_sum_of_two_attentions() {
        let (b, h, lq, l1, l2, d) = (1, 2, 6, 4, 3, 5);
        let leaf = |shape: &[usize], seed, grad| Var::leaf(randn(shape, seed), grad);
        let run = |fused: bool| {
            let q = leaf(&[b, h, lq, d], 1, true);
            let (k1, v1) = (leaf(&[b, h, l1, d], 2, false), leaf(&[b, h, l1, d], 3, false));
            let (k2, v2) = (leaf(&[b, h, l2, d], 4, true), leaf(&[b, h, l2, d], 5, true));
            let out = if fused {
                Var::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, 0.7, 0.5).unwrap()
            } else {
                let o1 = Var::flash_attention(&q, &k1, &v1, None, None, 0.5).unwrap();
                o1.add(&Var::flash_attention(&q, &k2, &v2, None, None, 0.5).unwrap().mul_scalar(0.7).unwrap()).unwrap()
            };
            // A loss whose gradient differs per element.
            let w = Var::leaf(randn(&[b, h, lq, d], 6), false);
            out.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(k1.grad().is_none() && v1.grad().is_none());
            let grads: Vec<Vec<f32>> = [&q, &k2, &v2].iter().map(|v| v.grad().unwrap().to_vec::<f32>().unwrap()).collect();
            (out.value().to_vec::<f32>().unwrap(), grads)
        };
        let (fused, unfused) = (run(true), run(false));
        for (a, e) in fused.0.iter().zip(&unfused.0).chain(fused.1.iter().flatten().zip(unfused.1.iter().flatten())) {
            assert!((a - e).abs() <= 1e-5 * e.abs().max(1.0), "{a} vs {e}");
        }
    }

    #[test]
    fn frozen_inputs_get_no_gradient_and_dropped_tokens_get_zero() {
        let (b, h, lq, lk, lr, d) = (1, 1, 3, 2, 3, 4);
        let q = Var::leaf(randn(&[b, h, lq, d], 1), true);
        let k = Var::leaf(randn(&[b, h, lk, d], 2), false);
        let v = Var::leaf(randn(&[b, h, lk, d], 3), true);
        let kr = Var::leaf(randn(&[b, h, lr, d], 4), true);
        let vr = Var::leaf(randn(&[b, h, lr, d], 5), true);
        let keep = Tensor::from_vec(vec![1u8, 0, 1], &[lr], Device::Cpu).unwrap();
        let out = Var::flash_attention(&q, &k, &v, Some((&kr, &vr)), Some(&keep), 0.5).unwrap();
        out.sum_all().unwrap().backward().unwrap();
        assert!(k.grad().is_none());
        for g in [q.grad(), v.grad(), kr.grad(), vr.grad()] {
            assert!(g.is_some());
        }
        // Reference token 1 is dropped: no gradient reaches its key or value.
        let dvr = vr.grad().unwrap().to_vec::<f32>().unwrap();
        assert!(dvr[d..2 * d].iter().all(|&x| x == 0.0) && dvr[..d].iter().any(|&x| x != 0.0));
        let dkr = kr.grad().unwrap().to_vec::<f32>().unwrap();
        assert!(dkr[d..2 * d].iter().all(|&x| x == 0.0));
        // A keep mask without reference keys is an error.
        assert!(Var::flash_attention(&q, &k, &v, None, Some(&keep), 0.5).is_err());
    }
}
