//! Flash extended attention: forward `Tensor::flash_attention` (q over the keys/values [own ;
//! reference], reference tokens optionally dropped by a keep mask), backward
//! `Tensor::flash_attention_backward`, which recomputes the probabilities from the saved
//! log-sum-exp instead of keeping them (memory O(L), not O(L^2)).

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
