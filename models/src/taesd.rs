//! diffusers' `AutoencoderTiny` (TAESD; TAESD-XL has the same architecture with SDXL-trained
//! weights): plain 3x3 convolutions and ReLU residual blocks, 8x down/up sampling, no
//! distribution.
//!
//! Encoder: image [-1, 1] -> [0, 1], conv, then per stage (a stride-2 convolution without bias
//! for all but the first) and its blocks, conv to the latent channels. Decoder: soft clamp
//! tanh(z / 3) * 3, conv + ReLU, per stage its blocks, nearest ×2 upsampling and a convolution
//! (without bias but the last), image [0, 1] -> [-1, 1].
//!
//! Its latents are SDXL's *unscaled* latents (diffusers' scaling_factor for it is 1.0), so the
//! LCM preview decodes the UNet's latents / 0.13025 — as the pipeline does for any VAE.
//! `scale_latents` / `unscale_latents` are diffusers' [0, 1] byte-storage mapping
//! (z / (2 * latent_magnitude) + latent_shift, clamped), not the diffusion scaling.

use std::path::Path;

use autograd::Var;
use engine::{DType, Device, Error, Result};
use serde::Deserialize;

use crate::nn::Conv2d;
use crate::vae::{check_image, model_file};
use crate::weights::{Weights, WeightsOptions};

/// The fields of a diffusers AutoencoderTiny config.json.
#[derive(Clone, Debug, Deserialize)]
pub struct TaesdConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "sixty_four")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "sixty_four")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "relu")]
    pub act_fn: String,
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "enc_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "dec_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "magnitude")]
    pub latent_magnitude: f64,
    #[serde(default = "shift")]
    pub latent_shift: f64,
    #[serde(default = "one")]
    pub scaling_factor: f64,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn sixty_four() -> Vec<usize> {
    vec![64; 4]
}
fn relu() -> String {
    "relu".into()
}
fn nearest() -> String {
    "nearest".into()
}
fn enc_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn dec_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn magnitude() -> f64 {
    3.0
}
fn shift() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}

impl TaesdConfig {
    /// madebyollin/taesdxl's config.
    pub fn taesdxl() -> TaesdConfig {
        TaesdConfig {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: sixty_four(),
            decoder_block_out_channels: sixty_four(),
            act_fn: relu(),
            upsample_fn: nearest(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: enc_blocks(),
            num_decoder_blocks: dec_blocks(),
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            scaling_factor: 1.0,
        }
    }

    /// The tiny preset (tests/fixtures/sdxl_tiny/taesd): TAESD-XL's blocks at width 8.
    pub fn tiny() -> TaesdConfig {
        TaesdConfig { encoder_block_out_channels: vec![8; 4], decoder_block_out_channels: vec![8; 4], ..TaesdConfig::taesdxl() }
    }

    pub fn from_file(path: &Path) -> Result<TaesdConfig> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: shown.clone(), source: e })?;
        let cfg: TaesdConfig = serde_json::from_str(&text).map_err(|e| Error::File { path: shown.clone(), msg: format!("not an AutoencoderTiny config: {e}") })?;
        let bad = |msg: String| Err(Error::File { path: shown.clone(), msg });
        if cfg.act_fn != "relu" || cfg.upsample_fn != "nearest" {
            return bad(format!("act_fn {:?} / upsample_fn {:?}: only relu / nearest are supported", cfg.act_fn, cfg.upsample_fn));
        }
        if cfg.encoder_block_out_channels.len() != cfg.num_encoder_blocks.len() || cfg.decoder_block_out_channels.len() != cfg.num_decoder_blocks.len() || cfg.num_encoder_blocks.is_empty() || cfg.num_decoder_blocks.is_empty() {
            return bad("block channel lists and block counts differ in length (or are empty)".into());
        }
        if cfg.upsampling_scaling_factor == 0 {
            return bad("upsampling_scaling_factor is 0".into());
        }
        Ok(cfg)
    }
}

/// AutoencoderTinyBlock: relu(conv(relu(conv(relu(conv(x))))) + skip(x)).
struct TinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl TinyBlock {
    fn load(w: &Weights, cin: usize, cout: usize) -> Result<TinyBlock> {
        let c = w.pp("conv");
        Ok(TinyBlock {
            convs: [Conv2d::load(&c.pp(0), cin, cout, 3, 1, 1, true)?, Conv2d::load(&c.pp(2), cout, cout, 3, 1, 1, true)?, Conv2d::load(&c.pp(4), cout, cout, 3, 1, 1, true)?],
            skip: if cin != cout { Some(Conv2d::load(&w.pp("skip"), cin, cout, 1, 1, 0, false)?) } else { None },
        })
    }

    fn forward(&self, x: &Var) -> Result<Var> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        let s = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        h.add(&s)?.relu()
    }
}

/// One entry of the nn.Sequential `layers` of EncoderTiny / DecoderTiny (its index is the key).
enum Layer {
    Conv(Conv2d),
    Block(Box<TinyBlock>),
    Relu,
    Upsample(usize),
}

fn run(layers: &[Layer], x: &Var) -> Result<Var> {
    let mut h = x.clone();
    for l in layers {
        h = match l {
            Layer::Conv(c) => c.forward(&h)?,
            Layer::Block(b) => b.forward(&h)?,
            Layer::Relu => h.relu()?,
            Layer::Upsample(f) => {
                let (hh, ww) = (h.shape()[2], h.shape()[3]);
                h.upsample_nearest2d(hh * f, ww * f)?
            }
        };
    }
    Ok(h)
}

pub struct AutoencoderTiny {
    pub config: TaesdConfig,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
}

impl AutoencoderTiny {
    /// Builds the model from `w` with diffusers' key names (encoder.layers.N.*, decoder.layers.N.*).
    pub fn load(w: &Weights, config: TaesdConfig) -> Result<AutoencoderTiny> {
        let ew = w.pp("encoder").pp("layers");
        let mut encoder = Vec::new();
        for (i, (&n, &ch)) in config.num_encoder_blocks.iter().zip(&config.encoder_block_out_channels).enumerate() {
            let idx = encoder.len();
            encoder.push(Layer::Conv(if i == 0 {
                Conv2d::load(&ew.pp(idx), config.in_channels, ch, 3, 1, 1, true)?
            } else {
                // diffusers declares this convolution with num_channels inputs: the previous
                // stage's width must equal this one's, as in every released TAESD.
                Conv2d::load(&ew.pp(idx), ch, ch, 3, 2, 1, false)?
            }));
            for _ in 0..n {
                let idx = encoder.len();
                encoder.push(Layer::Block(Box::new(TinyBlock::load(&ew.pp(idx), ch, ch)?)));
            }
        }
        let last = *config.encoder_block_out_channels.last().unwrap_or(&0);
        let idx = encoder.len();
        encoder.push(Layer::Conv(Conv2d::load(&ew.pp(idx), last, config.latent_channels, 3, 1, 1, true)?));

        let dw = w.pp("decoder").pp("layers");
        let ch0 = config.decoder_block_out_channels[0];
        let mut decoder = vec![Layer::Conv(Conv2d::load(&dw.pp(0), config.latent_channels, ch0, 3, 1, 1, true)?), Layer::Relu];
        let stages = config.num_decoder_blocks.len();
        for (i, (&n, &ch)) in config.num_decoder_blocks.iter().zip(&config.decoder_block_out_channels).enumerate() {
            let is_final = i + 1 == stages;
            for _ in 0..n {
                let idx = decoder.len();
                decoder.push(Layer::Block(Box::new(TinyBlock::load(&dw.pp(idx), ch, ch)?)));
            }
            if !is_final {
                decoder.push(Layer::Upsample(config.upsampling_scaling_factor));
            }
            let out = if is_final { config.out_channels } else { ch };
            let idx = decoder.len();
            decoder.push(Layer::Conv(Conv2d::load(&dw.pp(idx), ch, out, 3, 1, 1, is_final)?));
        }
        Ok(AutoencoderTiny { config, encoder, decoder })
    }

    /// From a diffusers folder (config.json + diffusion_pytorch_model.safetensors, e.g.
    /// madebyollin/taesdxl); missing or unexpected keys are an error naming them.
    pub fn from_folder(dir: impl AsRef<Path>, dtype: Option<DType>, device: Device) -> Result<AutoencoderTiny> {
        let dir = dir.as_ref();
        let config = TaesdConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::from_files(&[model_file(dir)?], WeightsOptions { dtype, device, collect_missing: true })?;
        let model = AutoencoderTiny::load(&w, config)?;
        w.finish()?;
        Ok(model)
    }

    fn down_factor(&self) -> usize {
        1 << (self.config.num_encoder_blocks.len() - 1)
    }

    /// Images [B, 3, H, W] in [-1, 1] -> raw latents (diffusers' `encode(x).latents`).
    pub fn encode(&self, x: &Var) -> Result<Var> {
        check_image("AutoencoderTiny::encode", x, self.config.in_channels, self.down_factor())?;
        run(&self.encoder, &x.affine(0.5, 0.5)?)
    }

    /// Raw latents -> images in [-1, 1] (diffusers' `decode(z).sample`).
    pub fn decode(&self, z: &Var) -> Result<Var> {
        check_image("AutoencoderTiny::decode", z, self.config.latent_channels, 1)?;
        let z = z.mul_scalar(1.0 / 3.0)?.tanh()?.mul_scalar(3.0)?;
        run(&self.decoder, &z)?.affine(2.0, -1.0)
    }

    /// Raw latents -> [0, 1] (for 8-bit storage): clamp(z / (2 * magnitude) + shift, 0, 1).
    pub fn scale_latents(&self, z: &Var) -> Result<Var> {
        z.affine((1.0 / (2.0 * self.config.latent_magnitude)) as f32, self.config.latent_shift as f32)?.clamp(0.0, 1.0)
    }

    /// [0, 1] -> raw latents: (x - shift) * 2 * magnitude.
    pub fn unscale_latents(&self, x: &Var) -> Result<Var> {
        let m = (2.0 * self.config.latent_magnitude) as f32;
        x.affine(m, -(self.config.latent_shift as f32) * m)
    }
}
