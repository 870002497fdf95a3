//! Which model a weights file holds, from its tensor names and shapes alone (no data is read), for
//! `lookahead inspect`. Each family is recognised by keys only it has; the widths that tell
//! variants apart (ViT-L vs bigG text towers) are read from the shapes.

use std::collections::BTreeMap;
use std::fmt;

/// A model family this project loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Family {
    /// A full single-file SDXL checkpoint (UNet, VAE and both text encoders, original keys).
    SdxlCheckpoint,
    /// The SDXL UNet with diffusers keys (`down_blocks.*`, `add_embedding.*`).
    SdxlUnetDiffusers,
    /// The SDXL UNet with the original keys (`model.diffusion_model.*`, `label_emb`).
    SdxlUnetOriginal,
    /// SDXL's AutoencoderKL (diffusers or original keys).
    SdxlVae,
    /// TAESD-XL (diffusers AutoencoderTiny keys).
    TaesdXl,
    /// CLIP text encoder without projection (SDXL's text_encoder, ViT-L/14 layout).
    ClipTextVitL { width: usize, layers: usize },
    /// CLIP text encoder with text_projection (SDXL's text_encoder_2, bigG/14 layout).
    ClipTextBigG { width: usize, layers: usize },
    /// CLIP vision tower (IP-Adapter's image encoder, ViT-H/14 for Plus-Face SDXL).
    ClipVision { width: usize, layers: usize, patch: usize, with_projection: bool },
    /// IP-Adapter with the perceiver Resampler (Plus / Plus-Face), SDXL-sized when the IP
    /// projections read 2048-wide tokens.
    IpAdapterPlus { queries: usize, token_width: usize, layers: usize },
    /// A LoRA for the UNet (LCM-LoRA ships this way), kohya `lora_unet_*` keys.
    UnetLoraKohya { modules: usize },
    /// A LoRA for the UNet with diffusers/peft keys (`lora_A`/`lora_B`, `lora.down`/`lora.up`).
    UnetLoraPeft { modules: usize },
    /// The KV-encoder's trained LoRA (this project's checkpoint names).
    KvEncoderLora { modules: usize },
    /// IR-SE50 ArcFace (TreB1eN/InsightFace_Pytorch model_ir_se50.pth).
    IrSe50,
    /// MTCNN stage networks (facenet-pytorch pnet.pt / rnet.pt / onet.pt), one or several.
    Mtcnn { nets: Vec<&'static str> },
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Family::SdxlCheckpoint => write!(f, "SDXL single-file checkpoint (UNet + VAE + text encoders, original keys)"),
            Family::SdxlUnetDiffusers => write!(f, "SDXL UNet (diffusers keys)"),
            Family::SdxlUnetOriginal => write!(f, "SDXL UNet (original keys)"),
            Family::SdxlVae => write!(f, "SDXL VAE (AutoencoderKL)"),
            Family::TaesdXl => write!(f, "TAESD-XL (AutoencoderTiny)"),
            Family::ClipTextVitL { width, layers } => write!(f, "CLIP text encoder, ViT-L/14 layout ({layers} layers, width {width})"),
            Family::ClipTextBigG { width, layers } => write!(f, "CLIP text encoder with projection, bigG/14 layout ({layers} layers, width {width})"),
            Family::ClipVision { width, layers, patch, with_projection } => {
                let name = if *width == 1280 && *layers == 32 && *patch == 14 { "ViT-H/14" } else { "ViT" };
                write!(f, "CLIP vision encoder {name} ({layers} layers, width {width}, patch {patch}{})", if *with_projection { ", with projection" } else { "" })
            }
            Family::IpAdapterPlus { queries, token_width, layers } => {
                let sdxl = if *token_width == 2048 { " SDXL" } else { "" };
                write!(f, "IP-Adapter Plus / Plus-Face{sdxl} (Resampler: {queries} queries, {layers} IP cross-attention layers, tokens {token_width} wide)")
            }
            Family::UnetLoraKohya { modules } => write!(f, "UNet LoRA, kohya keys (e.g. LCM-LoRA; {modules} modules)"),
            Family::UnetLoraPeft { modules } => write!(f, "UNet LoRA, diffusers/peft keys (e.g. LCM-LoRA; {modules} modules)"),
            Family::KvEncoderLora { modules } => write!(f, "KV-encoder LoRA ({modules} modules)"),
            Family::IrSe50 => write!(f, "IR-SE50 ArcFace"),
            Family::Mtcnn { nets } => write!(f, "MTCNN {}", nets.join(" + ")),
        }
    }
}

/// The family of a file whose tensors are `(name, shape)`, or None when no pattern matches.
pub fn identify<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Option<Family> {
    let map: BTreeMap<&str, &[usize]> = tensors.into_iter().collect();
    let has = |k: &str| map.contains_key(k);
    let any_prefix = |p: &str| map.range(p..).next().is_some_and(|(k, _)| k.starts_with(p));
    let any = |f: &dyn Fn(&str) -> bool| map.keys().any(|k| f(k));
    let shape = |k: &str| map.get(k).copied();
    let count_layers = |prefix: &str| -> usize {
        map.keys().filter_map(|k| k.strip_prefix(prefix)).filter_map(|r| r.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
    };

    // Single-file SDXL: the UNet under model.diffusion_model with label_emb (SDXL's added embedding).
    if has("model.diffusion_model.label_emb.0.0.weight") {
        return Some(if any_prefix("first_stage_model.") || any_prefix("conditioner.") { Family::SdxlCheckpoint } else { Family::SdxlUnetOriginal });
    }
    if has("add_embedding.linear_1.weight") && any_prefix("down_blocks.") {
        return Some(Family::SdxlUnetDiffusers);
    }
    if has("image_proj.latents") && any(&|k| k.starts_with("ip_adapter.") && k.ends_with(".to_k_ip.weight")) {
        let queries = shape("image_proj.latents").and_then(|s| s.get(1).copied()).unwrap_or(0);
        let token_width = map.iter().find(|(k, _)| k.starts_with("ip_adapter.") && k.ends_with(".to_k_ip.weight")).and_then(|(_, s)| s.get(1).copied()).unwrap_or(0);
        let layers = map.keys().filter(|k| k.starts_with("ip_adapter.") && k.ends_with(".to_k_ip.weight")).count();
        return Some(Family::IpAdapterPlus { queries, token_width, layers });
    }
    if has("vision_model.embeddings.patch_embedding.weight") {
        let s = shape("vision_model.embeddings.patch_embedding.weight").unwrap_or(&[]);
        return Some(Family::ClipVision {
            width: s.first().copied().unwrap_or(0),
            layers: count_layers("vision_model.encoder.layers."),
            patch: s.get(2).copied().unwrap_or(0),
            with_projection: has("visual_projection.weight"),
        });
    }
    let text_prefix = if has("text_model.embeddings.token_embedding.weight") { Some("text_model.") } else if has("embeddings.token_embedding.weight") { Some("") } else { None };
    if let Some(p) = text_prefix {
        let width = shape(&format!("{p}embeddings.token_embedding.weight")).and_then(|s| s.get(1).copied()).unwrap_or(0);
        let layers = count_layers(&format!("{p}encoder.layers."));
        return Some(if has("text_projection.weight") { Family::ClipTextBigG { width, layers } } else { Family::ClipTextVitL { width, layers } });
    }
    if any_prefix("encoder.layers.") && any_prefix("decoder.layers.") {
        return Some(Family::TaesdXl);
    }
    if (has("encoder.conv_in.weight") && has("decoder.conv_in.weight")) || has("first_stage_model.encoder.conv_in.weight") {
        return Some(Family::SdxlVae);
    }
    let lora_modules = |suffix: &str| map.keys().filter(|k| k.ends_with(suffix)).count();
    if any_prefix("lora_unet_") {
        return Some(Family::UnetLoraKohya { modules: lora_modules(".lora_down.weight") });
    }
    if any(&|k| k.ends_with(".lora.kv_copy.down") || k.ends_with(".lora.encoder.down")) {
        return Some(Family::KvEncoderLora { modules: lora_modules(".down") });
    }
    if any(&|k| k.ends_with(".lora_A.weight")) {
        return Some(Family::UnetLoraPeft { modules: lora_modules(".lora_A.weight") });
    }
    if any(&|k| k.ends_with(".lora.down.weight")) {
        return Some(Family::UnetLoraPeft { modules: lora_modules(".lora.down.weight") });
    }
    if has("input_layer.0.weight") && any_prefix("body.") && any_prefix("output_layer.") {
        return Some(Family::IrSe50);
    }
    // MTCNN: bare state dicts (pnet.pt, rnet.pt, onet.pt) or several under pnet./rnet./onet.
    let mut nets = Vec::new();
    for (net, marker) in [("P-Net", "conv4_1.weight"), ("R-Net", "dense5_1.weight"), ("O-Net", "dense6_1.weight")] {
        let prefix = match net {
            "P-Net" => "pnet.",
            "R-Net" => "rnet.",
            _ => "onet.",
        };
        if has(marker) || has(&format!("{prefix}{marker}")) {
            nets.push(net);
        }
    }
    if !nets.is_empty() {
        return Some(Family::Mtcnn { nets });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(keys: &[(&str, &[usize])]) -> Option<Family> {
        identify(keys.iter().map(|(k, s)| (*k, *s)))
    }

    #[test]
    fn families_by_keys() {
        assert_eq!(id(&[("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]), ("first_stage_model.encoder.conv_in.weight", &[128, 3, 3, 3])]), Some(Family::SdxlCheckpoint));
        assert_eq!(id(&[("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", &[4, 640])]), Some(Family::UnetLoraKohya { modules: 1 }));
        assert_eq!(id(&[("unet.a.lora_A.weight", &[4, 8]), ("unet.a.lora_B.weight", &[8, 4])]), Some(Family::UnetLoraPeft { modules: 1 }));
        assert_eq!(id(&[("conv1.weight", &[10, 3, 3, 3]), ("conv4_1.weight", &[2, 32, 1, 1])]), Some(Family::Mtcnn { nets: vec!["P-Net"] }));
        assert_eq!(id(&[("something", &[1])]), None);
        let f = id(&[("vision_model.embeddings.patch_embedding.weight", &[1280, 3, 14, 14]), ("vision_model.encoder.layers.31.mlp.fc1.weight", &[5120, 1280])]).unwrap();
        assert_eq!(f.to_string(), "CLIP vision encoder ViT-H/14 (32 layers, width 1280, patch 14)");
    }
}
