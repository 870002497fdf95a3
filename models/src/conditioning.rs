//! SDXL's prompt conditioning, as `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`
//! build it: each prompt goes through both tokenizers and text encoders; the UNet's
//! encoder_hidden_states are the penultimate hidden states of both (hidden_states[-2]: the input of
//! the last layer, not final-normed) concatenated on the feature dim (768 + 1280 = 2048 for SDXL),
//! its pooled text embedding is text_encoder_2's projected pooled output (1280), and the added time
//! ids are (original height, width, crop top, left, target height, width).

use std::path::Path;

use autograd::Var;
use engine::{DType, Device, Error, Result, Tensor};

use std::collections::BTreeMap;

use crate::clip_text::{ClipTextConfig, ClipTextModel, SingleFileTextEncoder};
use crate::tokenizer::ClipTokenizer;
use crate::weights::WeightsOptions;

/// What the SDXL UNet is conditioned on for a batch of prompts.
pub struct PromptConditioning {
    /// [B, 77, hidden(text_encoder) + hidden(text_encoder_2)].
    pub prompt_embeds: Var,
    /// [B, projection_dim(text_encoder_2)].
    pub pooled_prompt_embeds: Var,
}

/// The two tokenizers and text encoders of an SDXL pipeline.
pub struct SdxlTextEncoders {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
}

impl SdxlTextEncoders {
    /// From a diffusers SDXL folder: tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/.
    pub fn from_folder(root: impl AsRef<Path>, dtype: Option<DType>, device: Device) -> Result<SdxlTextEncoders> {
        let root = root.as_ref();
        Ok(SdxlTextEncoders {
            tokenizer: ClipTokenizer::from_folder(root.join("tokenizer"))?,
            tokenizer_2: ClipTokenizer::from_folder(root.join("tokenizer_2"))?,
            text_encoder: ClipTextModel::from_folder(root.join("text_encoder"), false, dtype, device)?,
            text_encoder_2: ClipTextModel::from_folder(root.join("text_encoder_2"), true, dtype, device)?,
        })
    }

    /// From a single-file SDXL checkpoint's tensors (`conditioner.embedders.0/1`) and the two
    /// tokenizers (a single file holds no vocabulary); `configs` are the two encoders' (the real
    /// ones: `ClipTextConfig::vit_l()`, `ClipTextConfig::bigg()`).
    pub fn from_single_file_tensors(tensors: &BTreeMap<String, Tensor>, tokenizer: ClipTokenizer, tokenizer_2: ClipTokenizer, configs: (ClipTextConfig, ClipTextConfig), opts: WeightsOptions, source: &str) -> Result<SdxlTextEncoders> {
        Ok(SdxlTextEncoders {
            tokenizer,
            tokenizer_2,
            text_encoder: ClipTextModel::from_single_file_tensors(tensors, SingleFileTextEncoder::ClipL, configs.0, opts, source)?,
            text_encoder_2: ClipTextModel::from_single_file_tensors(tensors, SingleFileTextEncoder::OpenClipBigG, configs.1, opts, source)?,
        })
    }

    /// The conditioning of `prompts` (the same prompt for both encoders, as with prompt_2 unset).
    pub fn encode(&self, prompts: &[&str], device: Device) -> Result<PromptConditioning> {
        let ids = self.tokenizer.encode_batch(prompts, device)?;
        let ids_2 = self.tokenizer_2.encode_batch(prompts, device)?;
        encode_ids(&self.text_encoder, &self.text_encoder_2, &ids, &ids_2, None)
    }

    /// The unconditional branch of classifier-free guidance: zeros shaped like `cond` when no
    /// negative prompt is given and `force_zeros_for_empty_prompt` (SDXL base's setting), else the
    /// conditioning of the negative prompts ("" for each when None).
    pub fn encode_negative(&self, cond: &PromptConditioning, negative: Option<&[&str]>, force_zeros_for_empty_prompt: bool, device: Device) -> Result<PromptConditioning> {
        let batch = cond.prompt_embeds.shape()[0];
        match negative {
            None if force_zeros_for_empty_prompt => Ok(PromptConditioning {
                prompt_embeds: Var::constant(cond.prompt_embeds.value().zeros_like()?),
                pooled_prompt_embeds: Var::constant(cond.pooled_prompt_embeds.value().zeros_like()?),
            }),
            None => self.encode(&vec![""; batch], device),
            Some(n) if n.len() != batch => Err(Error::msg(format!("encode_negative: {} negative prompts for a batch of {batch}", n.len()))),
            Some(n) => self.encode(n, device),
        }
    }
}

/// The conditioning from token ids already made: `ids` [B, 77] for text_encoder (ViT-L), `ids_2`
/// for text_encoder_2 (bigG, with projection). `clip_skip` as diffusers: hidden_states[-(clip_skip + 2)].
pub fn encode_ids(text_encoder: &ClipTextModel, text_encoder_2: &ClipTextModel, ids: &Tensor, ids_2: &Tensor, clip_skip: Option<usize>) -> Result<PromptConditioning> {
    let back = clip_skip.unwrap_or(0) + 2;
    let pick = |hs: &[Var]| -> Result<Var> {
        hs.len().checked_sub(back).map(|i| hs[i].clone()).ok_or_else(|| Error::msg(format!("encode_ids: clip_skip {} leaves no hidden state ({} available)", back - 2, hs.len())))
    };
    let o1 = text_encoder.forward(ids)?;
    let o2 = text_encoder_2.forward(ids_2)?;
    let pooled = o2.text_embeds.ok_or_else(|| Error::msg("encode_ids: text_encoder_2 must have a text projection (CLIPTextModelWithProjection)"))?;
    let h1 = pick(&o1.hidden_states)?;
    let h2 = pick(&o2.hidden_states)?;
    let h2 = if h2.dtype() != h1.dtype() { h2.to_dtype(h1.dtype())? } else { h2 };
    Ok(PromptConditioning { prompt_embeds: Var::cat(&[&h1, &h2], -1)?, pooled_prompt_embeds: pooled })
}

/// SDXL's micro-conditioning [batch, 6]: original (height, width), crop (top, left), target
/// (height, width), in that order.
pub fn add_time_ids(original_size: (usize, usize), crop_top_left: (usize, usize), target_size: (usize, usize), batch: usize, dtype: DType, device: Device) -> Result<Tensor> {
    let row = [original_size.0, original_size.1, crop_top_left.0, crop_top_left.1, target_size.0, target_size.1].map(|v| v as f32);
    let data: Vec<f32> = (0..batch).flat_map(|_| row).collect();
    Tensor::from_vec(data, &[batch, 6], Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}
