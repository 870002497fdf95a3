//! diffusers' `AutoencoderKL` as SDXL uses it (and sdxl-vae-fp16-fix, which has the same layout):
//! an encoder of DownEncoderBlock2D stages (ResNet blocks without time embedding, a
//! stride-2 convolution after right/bottom zero padding), a mid-block (ResNet, single-head
//! self-attention over the pixels, ResNet), a quant conv giving the diagonal Gaussian's mean and
//! log-variance; a decoder mirroring it with nearest-neighbour ×2 upsampling.
//!
//! `encode` returns the latent distribution (diffusers' `latent_dist`); `decode` maps raw latents
//! to images in [-1, 1]-ish. The diffusion model works on `(z - shift_factor) * scaling_factor`
//! (0.13025 for SDXL): `scale_latents` / `unscale_latents`.

use std::collections::BTreeMap;
use std::path::Path;

use autograd::Var;
use engine::{DType, Device, Error, PadMode, Result, Tensor};
use serde::Deserialize;

use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::{Weights, WeightsOptions};

/// The fields of a diffusers AutoencoderKL config.json this model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// SDXL's VAE overflows in fp16 (force_upcast: decode in f32); the fp16-fix weights do not.
    #[serde(default = "yes")]
    pub force_upcast: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn sd_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// SDXL's vae/config.json.
    pub fn sdxl() -> VaeConfig {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            scaling_factor: 0.13025,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }

    /// The tiny preset (tests/fixtures/sdxl_tiny/vae): SDXL's four stages at widths 8/16/16/32
    /// with 4 norm groups.
    pub fn tiny() -> VaeConfig {
        VaeConfig { block_out_channels: vec![8, 16, 16, 32], norm_num_groups: 4, ..VaeConfig::sdxl() }
    }

    pub fn from_file(path: &Path) -> Result<VaeConfig> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: shown.clone(), source: e })?;
        let cfg: VaeConfig = serde_json::from_str(&text).map_err(|e| Error::File { path: shown.clone(), msg: format!("not an AutoencoderKL config: {e}") })?;
        let bad = |msg: String| Err(Error::File { path: shown.clone(), msg });
        if cfg.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        if cfg.act_fn != "silu" {
            return bad(format!("act_fn {:?} is not supported (SDXL's VAE uses silu)", cfg.act_fn));
        }
        if let Some(t) = cfg.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return bad(format!("down block type {t:?} is not supported"));
        }
        if let Some(t) = cfg.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!("up block type {t:?} is not supported"));
        }
        if cfg.block_out_channels.iter().any(|&c| cfg.norm_num_groups == 0 || c % cfg.norm_num_groups != 0) {
            return bad(format!("block_out_channels {:?} do not split into {} groups", cfg.block_out_channels, cfg.norm_num_groups));
        }
        Ok(cfg)
    }
}

/// diffusers' resnet/attention eps inside the VAE.
const EPS: f32 = 1e-6;

/// ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a
/// 1x1 shortcut convolution when the channel count changes.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl Resnet {
    fn load(w: &Weights, cin: usize, cout: usize, groups: usize) -> Result<Resnet> {
        Ok(Resnet {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, cin, EPS)?,
            conv1: Conv2d::load(&w.pp("conv1"), cin, cout, 3, 1, 1, true)?,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, cout, EPS)?,
            conv2: Conv2d::load(&w.pp("conv2"), cout, cout, 3, 1, 1, true)?,
            conv_shortcut: if cin != cout { Some(Conv2d::load(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0, true)?) } else { None },
        })
    }

    fn forward(&self, x: &Var) -> Result<Var> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip.add(&h)
    }
}

/// The mid-block's attention: group norm, one head over all H*W positions, output projection,
/// residual. Reads diffusers' current names (to_q/to_k/to_v/to_out.0) or the deprecated attention
/// block's (query/key/value/proj_attn) that old VAE files hold.
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(w: &Weights, ch: usize, groups: usize) -> Result<SpatialAttention> {
        let legacy = w.contains("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(SpatialAttention {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, ch, EPS)?,
            to_q: Linear::load(&w.pp(name("to_q", "query")), ch, ch, true)?,
            to_k: Linear::load(&w.pp(name("to_k", "key")), ch, ch, true)?,
            to_v: Linear::load(&w.pp(name("to_v", "value")), ch, ch, true)?,
            to_out: Linear::load(&w.pp(name("to_out.0", "proj_attn")), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Var) -> Result<Var> {
        let (b, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        // [B, C, H, W] -> [B, 1, H*W, C]: one head.
        let t = self.group_norm.forward(x)?.reshape(&[b, c, h * w])?.transpose(1, 2)?.unsqueeze(1)?;
        let (q, k, v) = (self.to_q.forward(&t)?, self.to_k.forward(&t)?, self.to_v.forward(&t)?);
        let o = Var::scaled_dot_product_attention(&q, &k, &v, None, None)?;
        let o = self.to_out.forward(&o)?.squeeze(1)?.transpose(1, 2)?.contiguous()?.reshape(&[b, c, h, w])?;
        o.add(x)
    }
}

/// UNetMidBlock2D of the VAE: resnet, (attention, resnet).
struct MidBlock {
    resnet0: Resnet,
    attention: Option<SpatialAttention>,
    resnet1: Resnet,
}

impl MidBlock {
    fn load(w: &Weights, ch: usize, groups: usize, attention: bool) -> Result<MidBlock> {
        Ok(MidBlock {
            resnet0: Resnet::load(&w.pp("resnets.0"), ch, ch, groups)?,
            attention: if attention { Some(SpatialAttention::load(&w.pp("attentions.0"), ch, groups)?) } else { None },
            resnet1: Resnet::load(&w.pp("resnets.1"), ch, ch, groups)?,
        })
    }

    fn forward(&self, x: &Var) -> Result<Var> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}

struct DownBlock {
    resnets: Vec<Resnet>,
    /// Stride-2 3x3 convolution after padding right and bottom by one (diffusers' padding=0 case).
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(d) = &self.downsample {
            h = d.forward(&h.pad(&[0, 1, 0, 1], PadMode::Constant, 0.0)?)?;
        }
        Ok(h)
    }
}

struct UpBlock {
    resnets: Vec<Resnet>,
    /// Nearest ×2 then a 3x3 convolution.
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(u) = &self.upsample {
            let (hh, ww) = (h.shape()[2], h.shape()[3]);
            h = u.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
        }
        Ok(h)
    }
}

pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeEncoder {
    fn load(w: &Weights, cfg: &VaeConfig) -> Result<VaeEncoder> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::new();
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let bw = w.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block).map(|j| Resnet::load(&bw.pp("resnets").pp(j), if j == 0 { prev } else { out }, out, g)).collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < ch.len() { Some(Conv2d::load(&bw.pp("downsamplers.0.conv"), out, out, 3, 2, 0, true)?) } else { None };
            down_blocks.push(DownBlock { resnets, downsample });
            prev = out;
        }
        let last = *ch.last().unwrap_or(&0);
        Ok(VaeEncoder {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1, true)?,
            down_blocks,
            mid_block: MidBlock::load(&w.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1, true)?,
        })
    }

    /// Image [B, C, H, W] (H, W multiples of 2^(stages-1)) -> [B, 2 * latent_channels, h, w].
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

pub struct VaeDecoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    fn load(w: &Weights, cfg: &VaeConfig) -> Result<VaeDecoder> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::new();
        let mut prev = rev[0];
        for (i, &out) in rev.iter().enumerate() {
            let bw = w.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1).map(|j| Resnet::load(&bw.pp("resnets").pp(j), if j == 0 { prev } else { out }, out, g)).collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() { Some(Conv2d::load(&bw.pp("upsamplers.0.conv"), out, out, 3, 1, 1, true)?) } else { None };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let first = cfg.block_out_channels[0];
        Ok(VaeDecoder {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1, true)?,
            mid_block: MidBlock::load(&w.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), g, first, EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), first, cfg.out_channels, 3, 1, 1, true)?,
        })
    }

    /// Latents [B, latent_channels, h, w] -> image [B, out_channels, h * 2^(stages-1), ...].
    pub fn forward(&self, z: &Var) -> Result<Var> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// diffusers' DiagonalGaussianDistribution: mean and log-variance (clamped to [-30, 20]) over the
/// latent channels.
pub struct LatentDistribution {
    pub mean: Var,
    pub logvar: Var,
}

impl LatentDistribution {
    /// exp(logvar / 2).
    pub fn std(&self) -> Result<Var> {
        self.logvar.mul_scalar(0.5)?.exp()
    }

    /// mean + std * noise for a given standard-normal `noise` of the mean's shape.
    pub fn sample_with_noise(&self, noise: &Var) -> Result<Var> {
        if noise.shape() != self.mean.shape() {
            return Err(Error::ShapeMismatch { op: "LatentDistribution::sample_with_noise", lhs: noise.shape().to_vec(), rhs: self.mean.shape().to_vec() });
        }
        self.mean.add(&self.std()?.mul(noise)?)
    }

    /// A sample with the engine's counter-based RNG (Philox, seeded: the same numbers on CPU and
    /// CUDA).
    pub fn sample(&self, seed: u64) -> Result<Var> {
        let noise = Tensor::randn(self.mean.shape(), self.mean.dtype(), self.mean.device(), seed)?;
        self.sample_with_noise(&Var::constant(noise))
    }

    /// The distribution's mode (its mean).
    pub fn mode(&self) -> Var {
        self.mean.clone()
    }
}

pub struct AutoencoderKl {
    pub config: VaeConfig,
    pub encoder: VaeEncoder,
    pub decoder: VaeDecoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKl {
    /// Builds the model from `w` with diffusers' key names (encoder.*, decoder.*, quant_conv,
    /// post_quant_conv).
    pub fn load(w: &Weights, config: VaeConfig) -> Result<AutoencoderKl> {
        let l = config.latent_channels;
        Ok(AutoencoderKl {
            encoder: VaeEncoder::load(&w.pp("encoder"), &config)?,
            decoder: VaeDecoder::load(&w.pp("decoder"), &config)?,
            quant_conv: if config.use_quant_conv { Some(Conv2d::load(&w.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0, true)?) } else { None },
            post_quant_conv: if config.use_post_quant_conv { Some(Conv2d::load(&w.pp("post_quant_conv"), l, l, 1, 1, 0, true)?) } else { None },
            config,
        })
    }

    /// From a diffusers folder (vae/: config.json + diffusion_pytorch_model.safetensors, or its
    /// .fp16 variant, or the .bin); missing or unexpected keys are an error naming them.
    pub fn from_folder(dir: impl AsRef<Path>, dtype: Option<DType>, device: Device) -> Result<AutoencoderKl> {
        let dir = dir.as_ref();
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::from_files(&[model_file(dir)?], WeightsOptions { dtype, device, collect_missing: true })?;
        let model = AutoencoderKl::load(&w, config)?;
        w.finish()?;
        Ok(model)
    }

    /// From the tensors of a single-file SDXL checkpoint (the original LDM names under
    /// `first_stage_model.`); missing or unexpected VAE keys are an error naming them.
    pub fn from_single_file_tensors(tensors: &BTreeMap<String, Tensor>, config: VaeConfig, opts: WeightsOptions, source: &str) -> Result<AutoencoderKl> {
        let map = ldm_vae_to_diffusers(tensors, SDXL_VAE_PREFIX, config.block_out_channels.len())?;
        if map.is_empty() {
            return Err(Error::File { path: source.to_string(), msg: format!("no VAE tensor (keys under {SDXL_VAE_PREFIX:?})") });
        }
        let w = Weights::from_map(map, source, opts);
        let model = AutoencoderKl::load(&w, config)?;
        w.finish()?;
        Ok(model)
    }

    /// Images [B, 3, H, W] in [-1, 1] -> the latent distribution.
    pub fn encode(&self, x: &Var) -> Result<LatentDistribution> {
        check_image("AutoencoderKl::encode", x, self.config.in_channels, 1 << (self.config.block_out_channels.len() - 1))?;
        let mut h = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let parts = h.chunk(2, 1)?;
        Ok(LatentDistribution { mean: parts[0].clone(), logvar: parts[1].clamp(-30.0, 20.0)? })
    }

    /// Raw latents [B, latent_channels, h, w] -> images.
    pub fn decode(&self, z: &Var) -> Result<Var> {
        check_image("AutoencoderKl::decode", z, self.config.latent_channels, 1)?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Raw latents -> the diffusion model's latents: (z - shift_factor) * scaling_factor.
    pub fn scale_latents(&self, z: &Var) -> Result<Var> {
        let shift = self.config.shift_factor.unwrap_or(0.0) as f32;
        z.affine(self.config.scaling_factor as f32, -shift * self.config.scaling_factor as f32)
    }

    /// The diffusion model's latents -> raw latents (what the pipeline does before `decode`).
    pub fn unscale_latents(&self, z: &Var) -> Result<Var> {
        let shift = self.config.shift_factor.unwrap_or(0.0) as f32;
        z.affine(1.0 / self.config.scaling_factor as f32, shift)
    }
}

/// Where a single-file SD/SDXL checkpoint keeps the VAE.
pub const SDXL_VAE_PREFIX: &str = "first_stage_model.";

/// The VAE tensors under `prefix` in the original (LDM) layout renamed to diffusers' AutoencoderKL
/// keys: encoder.down.i.block.j -> encoder.down_blocks.i.resnets.j, decoder.up.k ->
/// decoder.up_blocks.(n-1-k) (the LDM decoder numbers its stages from the lowest resolution up),
/// mid.block_1/2 -> mid_block.resnets.0/1, mid.attn_1.{norm,q,k,v,proj_out} ->
/// mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} (1x1 convolution weights become
/// Linear weights), nin_shortcut -> conv_shortcut, norm_out -> conv_norm_out. `num_blocks` is the
/// number of stages (len(block_out_channels)). Keys it does not know keep their name (reported as
/// unexpected by the weight store).
pub fn ldm_vae_to_diffusers(tensors: &BTreeMap<String, Tensor>, prefix: &str, num_blocks: usize) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (full, t) in tensors {
        let Some(key) = full.strip_prefix(prefix) else { continue };
        let parts: Vec<&str> = key.split('.').collect();
        let mut mapped: Vec<String> = Vec::with_capacity(parts.len() + 2);
        let mut t = t.clone();
        let mut i = 0;
        while i < parts.len() {
            let p = parts[i];
            let next = parts.get(i + 1).copied();
            let index = next.and_then(|n| n.parse::<usize>().ok());
            match (p, index) {
                ("down", Some(b)) => {
                    mapped.push(format!("down_blocks.{b}"));
                    i += 2;
                    continue;
                }
                ("up", Some(k)) if k < num_blocks => {
                    mapped.push(format!("up_blocks.{}", num_blocks - 1 - k));
                    i += 2;
                    continue;
                }
                ("block", Some(j)) => {
                    mapped.push(format!("resnets.{j}"));
                    i += 2;
                    continue;
                }
                _ => {}
            }
            let renamed = match p {
                "downsample" => "downsamplers.0".to_string(),
                "upsample" => "upsamplers.0".to_string(),
                "mid" => "mid_block".to_string(),
                "block_1" => "resnets.0".to_string(),
                "block_2" => "resnets.1".to_string(),
                "attn_1" => "attentions.0".to_string(),
                "nin_shortcut" => "conv_shortcut".to_string(),
                "norm_out" => "conv_norm_out".to_string(),
                _ => p.to_string(),
            };
            mapped.push(renamed);
            i += 1;
        }
        // Inside the mid-block attention: LDM's norm/q/k/v/proj_out are 1x1 convolutions.
        if let Some(pos) = mapped.iter().position(|m| m == "attentions.0") {
            if let Some(name) = mapped.get(pos + 1).cloned() {
                let new = match name.as_str() {
                    "norm" => Some("group_norm"),
                    "q" => Some("to_q"),
                    "k" => Some("to_k"),
                    "v" => Some("to_v"),
                    "proj_out" => Some("to_out.0"),
                    _ => None,
                };
                if let Some(new) = new {
                    mapped[pos + 1] = new.to_string();
                    if t.rank() == 4 && t.shape()[2] == 1 && t.shape()[3] == 1 {
                        t = t.reshape(&[t.shape()[0], t.shape()[1]])?;
                    }
                }
            }
        }
        out.insert(mapped.join("."), t);
    }
    Ok(out)
}

/// The weights file of a diffusers model folder.
pub(crate) fn model_file(dir: &Path) -> Result<std::path::PathBuf> {
    ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| Error::File { path: dir.display().to_string(), msg: "no diffusion_pytorch_model.safetensors (.fp16.safetensors, .bin)".into() })
}

/// x must be [B, channels, H, W] with H and W multiples of `multiple`.
pub(crate) fn check_image(op: &'static str, x: &Var, channels: usize, multiple: usize) -> Result<()> {
    let s = x.shape();
    if s.len() != 4 || s[1] != channels || !s[2].is_multiple_of(multiple) || !s[3].is_multiple_of(multiple) || s[2] == 0 || s[3] == 0 {
        return Err(Error::BadShape { op, msg: format!("expected [B, {channels}, H, W] with H and W non-zero multiples of {multiple}"), shape: s.to_vec() });
    }
    Ok(())
}
