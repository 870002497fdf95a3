//! The fused LoRA linear, y = x W^T + bias + s (x A^T) B^T: one engine op forward
//! (`Tensor::lora_linear`) and one backward (`Tensor::lora_linear_backward`), which computes only
//! the gradients of the inputs that need one (a frozen W gets none, and no dW product runs).

use engine::ops::lora_linear::LoraGradsWanted;
use engine::Result;

use crate::Var;

impl Var {
    /// x W^T + bias + scale · (x A^T) B^T for x [..., K] (self), w [N, K], bias [N], a [r, K],
    /// b [N, r], all of one dtype; [..., N].
    pub fn lora_linear(&self, w: &Var, bias: Option<&Var>, a: &Var, b: &Var, scale: f32) -> Result<Var> {
        let y = self.value().lora_linear(w.value(), bias.map(|v| v.value()), a.value(), b.value(), scale)?;
        let (x, wt, at, bt) = (self.value().clone(), w.value().clone(), a.value().clone(), b.value().clone());
        let mut parents = vec![self, w, a, b];
        parents.extend(bias);
        Ok(Var::from_op("lora_linear", y, &parents, move |g, n| {
            let need = LoraGradsWanted { dx: n[0], dw: n[1], da: n[2], db: n[3], dbias: n.len() == 5 && n[4] };
            let grads = x.lora_linear_backward(&wt, &at, &bt, scale, g, need)?;
            let mut out = vec![grads.dx, grads.dw, grads.da, grads.db];
            if n.len() == 5 {
                out.push(grads.dbias);
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
    fn gradcheck_every_input() {
        // Odd sizes, x with two leading dims; with and without bias.
        let (n, k, r) = (5, 7, 3);
        let inputs = [randn(&[2, 3, k], 1), randn(&[n, k], 2), randn(&[r, k], 3), randn(&[n, r], 4), randn(&[n], 5)];
        gradcheck("lora_linear bias", &inputs, |v| v[0].lora_linear(&v[1], Some(&v[4]), &v[2], &v[3], 0.6), GradcheckOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        gradcheck("lora_linear", &inputs[..4], |v| v[0].lora_linear(&v[1], None, &v[2], &v[3], -1.4), GradcheckOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        // A transposed (non-contiguous) input.
        gradcheck("lora_linear transposed x", &[randn(&[k, 4], 6), inputs[1].clone(), inputs[2].clone(), inputs[3].clone()], |v| v[0].t()?.lora_linear(&v[1], None, &v[2], &v[3], 0.9), GradcheckOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_matches_the_composition() {
        let (n, k, r, s) = (6, 5, 2, 0.8);
        let (xt, wt, at, bt, biast) = (randn(&[4, k], 11), randn(&[n, k], 12), randn(&[r, k], 13), randn(&[n, r], 14), randn(&[n], 15));
        let run = |fused: bool| {
            let (x, w, a, b, bias) = (Var::leaf(xt.clone(), true), Var::leaf(wt.clone(), false), Var::leaf(at.clone(), true), Var::leaf(bt.clone(), true), Var::leaf(biast.clone(), true));
            let y = if fused {
                x.lora_linear(&w, Some(&bias), &a, &b, s).unwrap()
            } else {
                x.linear(&w, Some(&bias)).unwrap().add(&x.linear(&a, None).unwrap().linear(&b, None).unwrap().mul_scalar(s).unwrap()).unwrap()
            };
            y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            assert!(w.grad().is_none(), "frozen W has no gradient");
            [&x, &a, &b, &bias].map(|v| v.grad().unwrap().to_vec::<f32>().unwrap())
        };
        let (fused, composed) = (run(true), run(false));
        for (name, (f, c)) in ["dx", "dA", "dB", "dbias"].iter().zip(fused.iter().zip(&composed)) {
            for (p, q) in f.iter().zip(c) {
                assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{name}: {p} vs {q}");
            }
        }
    }
}
