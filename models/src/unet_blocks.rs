//! The UNet's blocks as diffusers builds them: ResnetBlock2D, the down blocks (DownBlock2D,
//! CrossAttnDownBlock2D), UNetMidBlock2DCrossAttn and the up blocks (UpBlock2D,
//! CrossAttnUpBlock2D). A block without attention simply has no `attentions`.

use autograd::Var;
use engine::{Error, Result};

use crate::attention::{AttnExtras, Transformer2DModel};
use crate::nn::{join, Conv2d, GroupNorm, Linear, Module, Visitor};
use crate::weights::Weights;

/// norm1+SiLU, conv1, + time projection, norm2+SiLU, conv2, + (1x1 shortcut of) the input.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn load(w: &Weights, in_ch: usize, out_ch: usize, temb_ch: usize, groups: usize, eps: f32) -> Result<ResnetBlock2D> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), in_ch, out_ch, 3, 1, 1, true)?,
            time_emb_proj: Linear::load(&w.pp("time_emb_proj"), temb_ch, out_ch, true)?,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), out_ch, out_ch, 3, 1, 1, true)?,
            conv_shortcut: if in_ch != out_ch { Some(Conv2d::load(&w.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0, true)?) } else { None },
        })
    }

    /// `temb_act` is silu(time embedding) [B, temb_ch] (computed once per UNet call).
    pub fn forward(&self, x: &Var, temb_act: &Var) -> Result<Var> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(temb_act)?;
        let (b, c) = (t.shape()[0], t.shape()[1]);
        let h = h.add(&t.reshape(&[b, c, 1, 1])?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.conv_shortcut {
            Some(sc) => sc.forward(x)?.add(&h),
            None => x.add(&h),
        }
    }
}

impl Module for ResnetBlock2D {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.norm1.visit(&join(prefix, "norm1"), v);
        self.conv1.visit(&join(prefix, "conv1"), v);
        self.time_emb_proj.visit(&join(prefix, "time_emb_proj"), v);
        self.norm2.visit(&join(prefix, "norm2"), v);
        self.conv2.visit(&join(prefix, "conv2"), v);
        if let Some(sc) = &mut self.conv_shortcut {
            sc.visit(&join(prefix, "conv_shortcut"), v);
        }
    }
}

/// How a block's attentions are shaped (absent for DownBlock2D / UpBlock2D).
#[derive(Clone, Copy, Debug)]
pub struct AttnSpec {
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
}

/// Shared sizes of one block.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    pub temb_ch: usize,
    pub groups: usize,
    pub eps: f32,
}

fn load_attn(w: &Weights, name: &str, i: usize, ch: usize, a: AttnSpec, s: BlockSpec) -> Result<Transformer2DModel> {
    let sub = format!("attentions.{i}");
    Transformer2DModel::load(&w.pp(&sub), &join(name, &sub), ch, a.heads, a.depth, a.context_dim, s.groups)
}

/// DownBlock2D / CrossAttnDownBlock2D: `layers` (resnet [+ attention]) then an optional stride-2
/// convolution (downsamplers.0.conv).
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Conv2d>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(w: &Weights, name: &str, in_ch: usize, out_ch: usize, layers: usize, attn: Option<AttnSpec>, downsample: bool, s: BlockSpec) -> Result<DownBlock> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            resnets.push(ResnetBlock2D::load(&w.pp(format!("resnets.{i}")), if i == 0 { in_ch } else { out_ch }, out_ch, s.temb_ch, s.groups, s.eps)?);
            if let Some(a) = attn {
                attentions.push(load_attn(w, name, i, out_ch, a, s)?);
            }
        }
        let downsampler = if downsample { Some(Conv2d::load(&w.pp("downsamplers.0.conv"), out_ch, out_ch, 3, 2, 1, true)?) } else { None };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// Returns the output and pushes every intermediate state onto `skips`.
    pub fn forward(&self, x: &Var, temb_act: &Var, context: &Var, extras: &AttnExtras, skips: &mut Vec<Var>) -> Result<Var> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, temb_act)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context, extras)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

impl Module for DownBlock {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        for (i, r) in self.resnets.iter_mut().enumerate() {
            r.visit(&join(prefix, format!("resnets.{i}")), v);
        }
        for (i, a) in self.attentions.iter_mut().enumerate() {
            a.visit(&join(prefix, format!("attentions.{i}")), v);
        }
        if let Some(d) = &mut self.downsampler {
            d.visit(&join(prefix, "downsamplers.0.conv"), v);
        }
    }
}

/// UNetMidBlock2DCrossAttn: resnet, attention, resnet.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Transformer2DModel,
}

impl MidBlock {
    pub fn load(w: &Weights, name: &str, ch: usize, attn: AttnSpec, s: BlockSpec) -> Result<MidBlock> {
        Ok(MidBlock {
            resnets: [ResnetBlock2D::load(&w.pp("resnets.0"), ch, ch, s.temb_ch, s.groups, s.eps)?, ResnetBlock2D::load(&w.pp("resnets.1"), ch, ch, s.temb_ch, s.groups, s.eps)?],
            attention: load_attn(w, name, 0, ch, attn, s)?,
        })
    }

    pub fn forward(&self, x: &Var, temb_act: &Var, context: &Var, extras: &AttnExtras) -> Result<Var> {
        let h = self.resnets[0].forward(x, temb_act)?;
        let h = self.attention.forward(&h, context, extras)?;
        self.resnets[1].forward(&h, temb_act)
    }
}

impl Module for MidBlock {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.resnets[0].visit(&join(prefix, "resnets.0"), v);
        self.attention.visit(&join(prefix, "attentions.0"), v);
        self.resnets[1].visit(&join(prefix, "resnets.1"), v);
    }
}

/// UpBlock2D / CrossAttnUpBlock2D: each resnet takes [h ; a skip] (channel concat), then the
/// optional attention; then an optional nearest 2x upsample + conv (upsamplers.0.conv).
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `skip_ch[i]`: channels of the skip the i-th resnet consumes; `prev_ch`: channels coming in.
    #[allow(clippy::too_many_arguments)]
    pub fn load(w: &Weights, name: &str, prev_ch: usize, out_ch: usize, skip_ch: &[usize], attn: Option<AttnSpec>, upsample: bool, s: BlockSpec) -> Result<UpBlock> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for (i, &sk) in skip_ch.iter().enumerate() {
            let in_ch = if i == 0 { prev_ch } else { out_ch };
            resnets.push(ResnetBlock2D::load(&w.pp(format!("resnets.{i}")), in_ch + sk, out_ch, s.temb_ch, s.groups, s.eps)?);
            if let Some(a) = attn {
                attentions.push(load_attn(w, name, i, out_ch, a, s)?);
            }
        }
        let upsampler = if upsample { Some(Conv2d::load(&w.pp("upsamplers.0.conv"), out_ch, out_ch, 3, 1, 1, true)?) } else { None };
        Ok(UpBlock { resnets, attentions, upsampler })
    }

    /// Pops one skip per resnet from `skips`; upsamples to the spatial size of the next skip left
    /// (as diffusers' forward_upsample_size), or 2x when none is left.
    pub fn forward(&self, x: &Var, temb_act: &Var, context: &Var, extras: &AttnExtras, skips: &mut Vec<Var>) -> Result<Var> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| Error::msg("UNet up block: no skip connection left (down and up blocks do not match)"))?;
            h = r.forward(&Var::cat(&[&h, &skip], 1)?, temb_act)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context, extras)?;
            }
        }
        if let Some(u) = &self.upsampler {
            let (oh, ow) = match skips.last() {
                Some(s) => (s.shape()[2], s.shape()[3]),
                None => (2 * h.shape()[2], 2 * h.shape()[3]),
            };
            h = u.forward(&h.upsample_nearest2d(oh, ow)?)?;
        }
        Ok(h)
    }
}

impl Module for UpBlock {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        for (i, r) in self.resnets.iter_mut().enumerate() {
            r.visit(&join(prefix, format!("resnets.{i}")), v);
        }
        for (i, a) in self.attentions.iter_mut().enumerate() {
            a.visit(&join(prefix, format!("attentions.{i}")), v);
        }
        if let Some(u) = &mut self.upsampler {
            u.visit(&join(prefix, "upsamplers.0.conv"), v);
        }
    }
}
