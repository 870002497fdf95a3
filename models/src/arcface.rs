//! IR-SE50, the ArcFace identity network of the official identity loss: TreB1eN/InsightFace_Pytorch
//! `Backbone(50, drop_ratio, 'ir_se')` (model.py, the same class as lcm-lookahead's
//! pretrained_models/arcface.py at input size 112), loading `model_ir_se50.pth` with its own key
//! names, in eval mode (batch norm with running statistics, dropout off).
//!
//! input_layer: conv3x3(3→64) - BN - PReLU; body: bottleneck_IR_SE units in 4 stages (3, 4, 14, 3
//! units at 64, 128, 256, 512 channels; the first unit of each stage has stride 2); each unit is
//! res = BN - conv3x3 - PReLU - conv3x3(stride) - BN - SE(reduction 16), plus a shortcut
//! (MaxPool2d(1, stride) when the width is unchanged, else conv1x1(stride) - BN);
//! output_layer: BN2d - Dropout - Flatten - Linear(512·7·7 → 512) - BN1d; then x / ||x||.
//! Input: [N, 3, 112, 112] in [-1, 1] (the official loss feeds the [-1, 1] image crop directly).
//!
//! Widths, unit counts and the embedding size are a config so that tests can run the same
//! topology small; `IrSeConfig::ir_se50()` is the real network.

use std::path::Path;

use autograd::Var;
use engine::{Error, Result};

use crate::nn::{Conv2d, Linear};
use crate::nn_face::{BatchNorm, PRelu};
use crate::weights::{Weights, WeightsOptions};

/// The input side the network takes (the output layer's 7x7 follows from it).
pub const INPUT_SIZE: usize = 112;
/// PyTorch's BatchNorm default.
const BN_EPS: f64 = 1e-5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrSeConfig {
    pub widths: [usize; 4],
    pub units: [usize; 4],
    pub embedding: usize,
}

impl IrSeConfig {
    pub fn ir_se50() -> IrSeConfig {
        IrSeConfig { widths: [64, 128, 256, 512], units: [3, 4, 14, 3], embedding: 512 }
    }

    /// (in_channel, depth, stride) of every unit, in order (get_blocks / get_block).
    pub fn unit_specs(&self) -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for s in 0..4 {
            let cin = if s == 0 { self.widths[0] } else { self.widths[s - 1] };
            for u in 0..self.units[s] {
                v.push(if u == 0 { (cin, self.widths[s], 2) } else { (self.widths[s], self.widths[s], 1) });
            }
        }
        v
    }
}

/// Squeeze-and-excitation: x · sigmoid(fc2(relu(fc1(avgpool(x))))).
struct SeModule {
    fc1: Conv2d,
    fc2: Conv2d,
}

impl SeModule {
    fn load(w: &Weights, channels: usize) -> Result<SeModule> {
        let hidden = channels / 16;
        if hidden == 0 {
            return Err(Error::msg(format!("IR-SE: {channels} channels are too few for the SE reduction 16")));
        }
        Ok(SeModule { fc1: Conv2d::load(&w.pp("fc1"), channels, hidden, 1, 1, 0, false)?, fc2: Conv2d::load(&w.pp("fc2"), hidden, channels, 1, 1, 0, false)? })
    }
    fn forward(&self, x: &Var) -> Result<Var> {
        let s = self.fc2.forward(&self.fc1.forward(&x.adaptive_avg_pool2d([1, 1])?)?.relu()?)?.sigmoid()?;
        x.mul(&s)
    }
}

enum Shortcut {
    /// MaxPool2d(1, stride): subsampling.
    Pool(usize),
    Conv(Conv2d, BatchNorm),
}

struct Unit {
    shortcut: Shortcut,
    bn1: BatchNorm,
    conv1: Conv2d,
    prelu: PRelu,
    conv2: Conv2d,
    bn2: BatchNorm,
    se: SeModule,
}

impl Unit {
    fn load(w: &Weights, cin: usize, depth: usize, stride: usize) -> Result<Unit> {
        let shortcut = if cin == depth {
            Shortcut::Pool(stride)
        } else {
            let s = w.pp("shortcut_layer");
            Shortcut::Conv(Conv2d::load(&s.pp(0), cin, depth, 1, stride, 0, false)?, BatchNorm::load(&s.pp(1), depth, BN_EPS)?)
        };
        let r = w.pp("res_layer");
        Ok(Unit {
            shortcut,
            bn1: BatchNorm::load(&r.pp(0), cin, BN_EPS)?,
            conv1: Conv2d::load(&r.pp(1), cin, depth, 3, 1, 1, false)?,
            prelu: PRelu::load(&r.pp(2), depth)?,
            conv2: Conv2d::load(&r.pp(3), depth, depth, 3, stride, 1, false)?,
            bn2: BatchNorm::load(&r.pp(4), depth, BN_EPS)?,
            se: SeModule::load(&r.pp(5), depth)?,
        })
    }

    fn forward(&self, x: &Var) -> Result<Var> {
        let shortcut = match &self.shortcut {
            Shortcut::Pool(1) => x.clone(),
            Shortcut::Pool(s) => x.max_pool2d([1, 1], [*s, *s], [0, 0], false)?,
            Shortcut::Conv(c, bn) => bn.forward(&c.forward(x)?)?,
        };
        let r = self.conv1.forward(&self.bn1.forward(x)?)?;
        let r = self.bn2.forward(&self.conv2.forward(&self.prelu.forward(&r)?)?)?;
        self.se.forward(&r)?.add(&shortcut)
    }
}

pub struct IrSe {
    pub config: IrSeConfig,
    input_conv: Conv2d,
    input_bn: BatchNorm,
    input_prelu: PRelu,
    body: Vec<Unit>,
    output_bn: BatchNorm,
    output_linear: Linear,
    output_bn1d: BatchNorm,
}

impl IrSe {
    /// Builds the network from `w` (keys as the Backbone's state dict). Missing keys are collected
    /// (see `Weights`); call `w.finish()` to get them, with the unexpected ones, by name.
    pub fn load(w: &Weights, config: IrSeConfig) -> Result<IrSe> {
        let c0 = config.widths[0];
        let il = w.pp("input_layer");
        let body = config.unit_specs().into_iter().enumerate().map(|(i, (cin, d, s))| Unit::load(&w.pp("body").pp(i), cin, d, s)).collect::<Result<Vec<_>>>()?;
        let ol = w.pp("output_layer");
        let last = config.widths[3];
        Ok(IrSe {
            config,
            input_conv: Conv2d::load(&il.pp(0), 3, c0, 3, 1, 1, false)?,
            input_bn: BatchNorm::load(&il.pp(1), c0, BN_EPS)?,
            input_prelu: PRelu::load(&il.pp(2), c0)?,
            body,
            output_bn: BatchNorm::load(&ol.pp(0), last, BN_EPS)?,
            output_linear: Linear::load(&ol.pp(3), last * 7 * 7, config.embedding, true)?,
            output_bn1d: BatchNorm::load(&ol.pp(4), config.embedding, BN_EPS)?,
        })
    }

    /// Loads a checkpoint file (`model_ir_se50.pth`, or its safetensors form); an error names
    /// every missing and unexpected key, or the first key whose shape is wrong.
    pub fn from_file(path: impl AsRef<Path>, config: IrSeConfig) -> Result<IrSe> {
        let w = Weights::from_files(&[path.as_ref()], WeightsOptions::default())?;
        let net = IrSe::load(&w, config)?;
        w.finish()?;
        Ok(net)
    }

    /// x [N, 3, 112, 112] in [-1, 1] -> [N, embedding], each row of unit length.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let s = x.shape();
        if s.len() != 4 || s[1] != 3 || s[2] != INPUT_SIZE || s[3] != INPUT_SIZE {
            return Err(Error::msg(format!("IR-SE: input {s:?} must be [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]")));
        }
        let mut h = self.input_prelu.forward(&self.input_bn.forward(&self.input_conv.forward(x)?)?)?;
        for u in &self.body {
            h = u.forward(&h)?;
        }
        // Dropout is the identity in eval mode.
        let h = self.output_bn.forward(&h)?;
        let n = h.shape()[0];
        let h = h.reshape(&[n, h.elem_count() / n.max(1)])?;
        let e = self.output_bn1d.forward(&self.output_linear.forward(&h)?)?;
        l2_normalize(&e)
    }
}

/// x / ||x||_2 along dim 1 (TreB1eN's l2_norm: no epsilon).
pub fn l2_normalize(x: &Var) -> Result<Var> {
    x.div(&x.sqr()?.sum(&[1], true)?.sqrt()?)
}

/// The official identity loss per sample: 1 - <pred, target> of unit-length embeddings [N, D]
/// (the cosine distance); the official loss takes the mean over the images with a face.
pub fn identity_loss(pred: &Var, target: &Var) -> Result<Var> {
    if pred.shape() != target.shape() || pred.rank() != 2 {
        return Err(Error::msg(format!("identity_loss: embeddings {:?} and {:?} must both be [N, D]", pred.shape(), target.shape())));
    }
    pred.mul(target)?.sum(&[1], false)?.neg()?.add_scalar(1.0)
}
