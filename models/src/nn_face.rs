//! The two layers the face networks (MTCNN, IR-SE50) need beyond `nn`: PReLU and inference batch
//! normalization. Both are frozen; gradients flow through them to their input (the identity loss
//! back-propagates through IR-SE50 into the generated image).

use autograd::Var;
use engine::{DType, Result, Tensor};

use crate::nn::{frozen, join, Module, Visitor};
use crate::weights::Weights;

/// PReLU with one slope per channel (dim 1), as torch.nn.PReLU(channels).
#[derive(Clone, Debug)]
pub struct PRelu {
    pub weight: Var,
}

impl PRelu {
    pub fn load(w: &Weights, channels: usize) -> Result<PRelu> {
        Ok(PRelu { weight: frozen(w.get("weight", &[channels])?) })
    }
    pub fn forward(&self, x: &Var) -> Result<Var> {
        x.prelu(&self.weight)
    }
}

impl Module for PRelu {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.param(&join(prefix, "weight"), &mut self.weight);
    }
}

/// BatchNorm1d/2d in eval mode: y = x·a + b per channel (dim 1) with a = weight / sqrt(var + eps)
/// and b = bias - mean·a, folded at load time exactly as PyTorch's CPU inference kernel folds them.
/// Written as a broadcast multiply-add so the input gets a gradient (the engine's batch_norm op
/// has no backward rule).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub scale: Var,
    pub shift: Var,
    pub channels: usize,
}

impl BatchNorm {
    /// `weight`, `bias`, `running_mean`, `running_var` [channels] under `w`; `num_batches_tracked`
    /// (a training counter that checkpoints from torch >= 0.4.1 carry) is accepted and ignored.
    pub fn load(w: &Weights, channels: usize, eps: f64) -> Result<BatchNorm> {
        let get = |name: &str| -> Result<Vec<f32>> { w.get(name, &[channels])?.to_dtype(DType::F32)?.to_vec_f32() };
        let (weight, bias, mean, var) = (get("weight")?, get("bias")?, get("running_mean")?, get("running_var")?);
        if w.contains("num_batches_tracked") {
            w.get_unchecked("num_batches_tracked")?;
        }
        let mut scale = Vec::with_capacity(channels);
        let mut shift = Vec::with_capacity(channels);
        for c in 0..channels {
            // PyTorch (f32): invstd = 1 / sqrt(var + eps), alpha = invstd * w, beta = b - mean * alpha.
            let invstd = 1.0f32 / (var[c] + eps as f32).sqrt();
            let a = invstd * weight[c];
            scale.push(a);
            shift.push(bias[c] - mean[c] * a);
        }
        let dtype = w.dtype().unwrap_or(DType::F32);
        let t = |v: Vec<f32>| -> Result<Tensor> { Tensor::from_f32_vec(v, &[channels], dtype)?.to_device(w.device()) };
        Ok(BatchNorm { scale: frozen(t(scale)?), shift: frozen(t(shift)?), channels })
    }

    /// x [N, C] or [N, C, H, W].
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let mut shape = vec![1usize; x.rank().max(2)];
        shape[1] = self.channels;
        x.mul(&self.scale.reshape(&shape)?)?.add(&self.shift.reshape(&shape)?)
    }
}

impl Module for BatchNorm {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.param(&join(prefix, "scale"), &mut self.scale);
        v.param(&join(prefix, "shift"), &mut self.shift);
    }
}
