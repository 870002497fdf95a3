//! IP-Adapter Plus(-Face) SDXL: the CLIP vision encoder's penultimate hidden states go through
//! the Resampler to `num_queries` IP tokens, which the UNet's decoupled cross-attention
//! (to_k_ip/to_v_ip on every attn2, see attention.rs) attends to besides the text.
//!
//! Files: `ip-adapter-plus-face_sdxl_vit-h.bin` is `torch.save({"image_proj": resampler state
//! dict, "ip_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", ...}})` (the
//! reader flattens it to `image_proj.*` / `ip_adapter.*` keys); its .safetensors form holds the
//! same keys flat. `ip_adapter` numbers the UNet's attention processors (attn1 even, attn2 odd),
//! which `UNet2DConditionModel::set_ip_adapter` maps onto the transformer blocks. The image
//! encoder ships separately (h94/IP-Adapter `models/image_encoder`, a transformers folder).
//! The unconditional IP tokens are those of an all-zeros (preprocessed) image.

use std::path::Path;

use autograd::Var;
use engine::{Error, Result, Tensor};

use crate::clip_vision::ClipVisionModel;
use crate::nn::LoraScale;
use crate::resampler::{Resampler, ResamplerConfig};
use crate::unet::UNet2DConditionModel;
use crate::weights::{Weights, WeightsOptions};

/// The image side of IP-Adapter Plus: image encoder + Resampler. The IP K/V projections live in
/// the UNet; `scale` is their shared run-time multiplier.
pub struct IpAdapterPlus {
    pub image_encoder: ClipVisionModel,
    pub resampler: Resampler,
    pub scale: LoraScale,
}

impl IpAdapterPlus {
    /// Loads an IP-Adapter Plus file (.bin or .safetensors, chosen by content) with `config` (the
    /// real one: `ResamplerConfig::plus_face_sdxl()`) and installs its IP projections on `unet`
    /// at `scale`. Missing keys, unexpected keys and wrong shapes are errors naming them; on error
    /// `unet` is left without IP projections.
    pub fn load(path: impl AsRef<Path>, image_encoder: ClipVisionModel, config: ResamplerConfig, unet: &mut UNet2DConditionModel, scale: f32, opts: WeightsOptions) -> Result<IpAdapterPlus> {
        let w = Weights::from_files(&[path.as_ref()], opts)?;
        IpAdapterPlus::from_weights(&w, image_encoder, config, unet, scale)
    }

    /// As `load`, from a store holding `image_proj.*` and `ip_adapter.*`.
    pub fn from_weights(w: &Weights, image_encoder: ClipVisionModel, config: ResamplerConfig, unet: &mut UNet2DConditionModel, scale: f32) -> Result<IpAdapterPlus> {
        for part in ["image_proj", "ip_adapter"] {
            if !w.contains_prefix(part) {
                return Err(Error::msg(format!("{w:?}: not an IP-Adapter file: no `{part}` entries (keys must start with image_proj. and ip_adapter.)")));
            }
        }
        if config.embedding_dim != image_encoder.config.hidden_size {
            return Err(Error::msg(format!("IP-Adapter: the Resampler takes {}-wide features but the image encoder is {} wide", config.embedding_dim, image_encoder.config.hidden_size)));
        }
        if config.output_dim != unet.config.cross_attention_dim {
            return Err(Error::msg(format!("IP-Adapter: the Resampler makes {}-wide tokens but the UNet's cross-attention is {} wide", config.output_dim, unet.config.cross_attention_dim)));
        }
        let result = (|| {
            let resampler = Resampler::load(&w.pp("image_proj"), config)?;
            let scale = unet.set_ip_adapter(&w.pp("ip_adapter"), config.num_queries, scale)?;
            w.finish()?;
            Ok((resampler, scale))
        })();
        match result {
            Ok((resampler, scale)) => Ok(IpAdapterPlus { image_encoder, resampler, scale }),
            Err(e) => {
                unet.clear_ip_adapter();
                Err(e)
            }
        }
    }

    /// IP tokens [B, num_queries, cross_attention_dim] of preprocessed images [B, 3, S, S].
    pub fn image_tokens(&self, pixel_values: &Var) -> Result<Var> {
        self.resampler.forward(&self.image_encoder.penultimate(pixel_values)?)
    }

    /// The unconditional IP tokens: those of an all-zeros preprocessed image, for `batch` rows.
    pub fn uncond_tokens(&self, batch: usize) -> Result<Var> {
        let c = &self.image_encoder.config;
        let zeros = Tensor::zeros(&[1, c.num_channels, c.image_size, c.image_size], self.resampler.latents.dtype(), self.resampler.latents.device())?;
        let t = self.image_tokens(&Var::constant(zeros))?;
        let s = t.shape().to_vec();
        t.broadcast_to(&[batch, s[1], s[2]])?.contiguous()
    }
}

/// The UNet's encoder hidden states with IP tokens: [text [B, L, C] ; ip [B, Q, C]] along tokens.
pub fn append_ip_tokens(text: &Var, ip_tokens: &Var) -> Result<Var> {
    Var::cat(&[text, &ip_tokens.to_dtype(text.dtype())?], 1)
}
