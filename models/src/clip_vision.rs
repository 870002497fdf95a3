//! The CLIP vision tower as transformers' `CLIPVisionModelWithProjection` (IP-Adapter's image
//! encoder is OpenCLIP ViT-H/14 in that form: 32 layers, width 1280, 16 heads, patch 14, image
//! 224, gelu, projection 1024), and CLIP's image preprocessing.
//!
//! Forward: a patch-embedding convolution (no bias), the class embedding prepended, position
//! embeddings added, `pre_layrnorm` (transformers' spelling), the encoder layers (the same layer
//! as the text tower, without a mask), then `post_layernorm` of the class token and the visual
//! projection. Every layer's input and the last layer's output are returned as `hidden_states`
//! (the first entry is after pre_layrnorm, as transformers records it): IP-Adapter Plus takes
//! `hidden_states[-2]`.
//!
//! Preprocessing reproduces transformers' `CLIPImageProcessor` (5.x, torchvision backend) on 8-bit
//! RGB input: resize the shortest side to 224 with antialiased bicubic as torch does it for uint8
//! on the CPU (Keys cubic a = -0.5 with PIL's support scaling, weights normalised in f64 and
//! rounded to int16 at the largest precision that fits, width pass then height pass, each rounded
//! and clamped to 8 bits; a dimension that keeps its size is not resampled), center crop 224,
//! rescale by 1/255, normalise with CLIP's mean and std. This matches the processor exactly (to
//! f32 rounding); it differs from `PIL.Image.resize(BICUBIC)` (22-bit weights) by one 8-bit level
//! on a few pixels in a thousand, which is not what the processor does any more.

use std::path::Path;

use autograd::Var;
use engine::{Conv2dParams, DType, Device, Error, Result, Tensor};
use serde::Deserialize;

use crate::clip_text::{ClipActivation, ClipLayer};
use crate::nn::{frozen, Embedding, LayerNorm, Linear};
use crate::weights::{Weights, WeightsOptions};

/// CLIP's normalisation (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), written as transformers writes them.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The fields of a transformers `CLIPVisionConfig` this model uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub hidden_act: ClipActivation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}

impl ClipVisionConfig {
    /// IP-Adapter's image encoder (h94/IP-Adapter models/image_encoder): OpenCLIP ViT-H/14.
    pub fn vit_h() -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: 1024,
        }
    }

    /// From a transformers config.json (a CLIPVisionConfig, or a full CLIPConfig's vision_config).
    pub fn from_file(path: &Path) -> Result<ClipVisionConfig> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: shown.clone(), source: e })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::File { path: shown.clone(), msg: format!("not JSON: {e}") })?;
        let v = v.get("vision_config").cloned().unwrap_or(v);
        let cfg: ClipVisionConfig = serde_json::from_value(v).map_err(|e| Error::File { path: shown.clone(), msg: format!("not a CLIP vision config: {e}") })?;
        cfg.validate().map_err(|e| Error::File { path: shown, msg: e.to_string() })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::msg(format!("CLIP vision: hidden_size {} does not split into {} heads", self.hidden_size, self.num_attention_heads)));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::msg(format!("CLIP vision: image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size)));
        }
        Ok(())
    }

    /// Patches plus the class token.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// The outputs of a forward pass.
pub struct ClipVisionOutput {
    /// The last layer's output [B, 1 + patches, D] (not normed, as transformers returns it).
    pub last_hidden_state: Var,
    /// post_layernorm of the class token [B, D].
    pub pooled: Var,
    /// `pooled` through visual_projection [B, projection_dim] (WithProjection only).
    pub image_embeds: Option<Var>,
    /// After pre_layrnorm, then each layer's output: num_hidden_layers + 1 entries.
    pub hidden_states: Vec<Var>,
}

/// CLIPVisionModel, or CLIPVisionModelWithProjection when it has a visual projection.
pub struct ClipVisionModel {
    pub config: ClipVisionConfig,
    class_embedding: Var,
    patch_embedding: Var,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
}

impl ClipVisionModel {
    /// From `w` with transformers' keys (`vision_model.embeddings...`, `visual_projection.weight`).
    /// `with_projection` asks for the visual projection (CLIPVisionModelWithProjection).
    pub fn load(w: &Weights, config: ClipVisionConfig, with_projection: bool) -> Result<ClipVisionModel> {
        config.validate()?;
        let vw = w.pp("vision_model");
        let e = vw.pp("embeddings");
        // A buffer older transformers versions saved; not a parameter.
        if e.contains("position_ids") {
            e.get_unchecked("position_ids")?;
        }
        let (d, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let eps = config.layer_norm_eps as f32;
        let class_embedding = frozen(e.get("class_embedding", &[d])?);
        let patch_embedding = frozen(e.pp("patch_embedding").get("weight", &[d, c, p, p])?);
        let position_embedding = Embedding::load(&e.pp("position_embedding"), config.num_positions(), d)?;
        let pre_layrnorm = LayerNorm::load(&vw.pp("pre_layrnorm"), d, eps)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipLayer::load_dims(&vw.pp("encoder.layers").pp(i), d, config.intermediate_size, config.num_attention_heads, config.hidden_act, eps))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::load(&vw.pp("post_layernorm"), d, eps)?;
        let visual_projection = if with_projection { Some(Linear::load(&w.pp("visual_projection"), d, config.projection_dim, false)?) } else { None };
        Ok(ClipVisionModel { config, class_embedding, patch_embedding, position_embedding, pre_layrnorm, layers, post_layernorm, visual_projection })
    }

    /// From a transformers folder (config.json + model.safetensors / model.fp16.safetensors /
    /// pytorch_model.bin), as h94/IP-Adapter's `models/image_encoder`; with the projection when
    /// the file has `visual_projection.weight`. Missing or unexpected keys are an error naming them.
    pub fn from_folder(dir: impl AsRef<Path>, opts: WeightsOptions) -> Result<ClipVisionModel> {
        let dir = dir.as_ref();
        let config = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let file = ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| Error::File { path: dir.display().to_string(), msg: "no model.safetensors, model.fp16.safetensors or pytorch_model.bin".into() })?;
        let w = Weights::from_files(&[file], opts)?;
        let with_projection = w.contains_prefix("visual_projection");
        let model = ClipVisionModel::load(&w, config, with_projection)?;
        w.finish()?;
        Ok(model)
    }

    /// pixel_values [B, C, image_size, image_size] (preprocessed, any float dtype).
    pub fn forward(&self, pixel_values: &Var) -> Result<ClipVisionOutput> {
        let cfg = &self.config;
        let s = pixel_values.shape();
        if s.len() != 4 || s[1] != cfg.num_channels || s[2] != cfg.image_size || s[3] != cfg.image_size {
            return Err(Error::BadShape { op: "ClipVisionModel::forward", msg: format!("expected [B, {}, {}, {}]", cfg.num_channels, cfg.image_size, cfg.image_size), shape: s.to_vec() });
        }
        let (b, d) = (s[0], cfg.hidden_size);
        let dtype = self.patch_embedding.dtype();
        let params = Conv2dParams { stride: [cfg.patch_size; 2], ..Default::default() };
        let patches = pixel_values.to_dtype(dtype)?.conv2d(&self.patch_embedding, None, params)?;
        let n = patches.shape()[2] * patches.shape()[3];
        let patches = patches.reshape(&[b, d, n])?.transpose(1, 2)?;
        let class = self.class_embedding.reshape(&[1, 1, d])?.broadcast_to(&[b, 1, d])?;
        let x = Var::cat(&[&class, &patches], 1)?.add(&self.position_embedding.weight)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
            hidden_states.push(x.clone());
        }
        let pooled = self.post_layernorm.forward(&x.narrow(1, 0, 1)?.reshape(&[b, d])?)?;
        let image_embeds = match &self.visual_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipVisionOutput { last_hidden_state: x, pooled, image_embeds, hidden_states })
    }

    /// IP-Adapter Plus's image features: the penultimate layer's output (hidden_states[-2]).
    pub fn penultimate(&self, pixel_values: &Var) -> Result<Var> {
        let mut out = self.forward(pixel_values)?;
        let n = out.hidden_states.len();
        if n < 2 {
            return Err(Error::msg("CLIP vision: a model without layers has no penultimate hidden state"));
        }
        Ok(out.hidden_states.swap_remove(n - 2))
    }
}

// ---- preprocessing ----

/// torch's antialiasing cubic filter (HelperInterpCubic::aa_filter, a = -0.5), in its operation order.
fn aa_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// One axis of an 8-bit antialiased bicubic resample: per output index its first source index
/// and int16 weights, and the fixed-point precision (torch's _compute_indices_min_size_weights_aa
/// and _compute_index_ranges_int16_weights, align_corners false).
struct ResampleAxis {
    taps: Vec<(usize, Vec<i32>)>,
    precision: u32,
}

fn resample_axis(input: usize, output: usize) -> ResampleAxis {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let max_taps = support.ceil() as i64 * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut real = Vec::with_capacity(output);
    let mut wt_max = 0.0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // `as i64` truncates toward zero, as the C++ casts do.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = (((center + support + 0.5) as i64).min(input as i64) - xmin).clamp(0, max_taps);
        let mut w: Vec<f64> = (0..xsize).map(|j| aa_cubic((j as f64 + xmin as f64 - center + 0.5) * invscale)).collect();
        let total: f64 = w.iter().fold(0.0, |a, v| a + v);
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
                wt_max = wt_max.max(*v);
            }
        }
        real.push((xmin as usize, w));
    }
    let mut precision = 0u32;
    while precision < 22 {
        if (0.5 + wt_max * (1i64 << (precision + 1)) as f64) as i64 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let taps = real
        .into_iter()
        .map(|(xmin, w)| {
            let q = w
                .iter()
                .map(|&v| {
                    let v = v * (1i64 << precision) as f64;
                    if v < 0.0 {
                        (-0.5 + v) as i32
                    } else {
                        (0.5 + v) as i32
                    }
                })
                .collect();
            (xmin, q)
        })
        .collect();
    ResampleAxis { taps, precision }
}

/// Resamples one axis of an interleaved 8-bit image [outer, len, inner] to `out` along `len`.
fn resample_pass(src: &[u8], outer: usize, len: usize, inner: usize, out: usize) -> Vec<u8> {
    let axis = resample_axis(len, out);
    let round = 1i64 << axis.precision.saturating_sub(1);
    let mut dst = vec![0u8; outer * out * inner];
    for o in 0..outer {
        for (i, (xmin, w)) in axis.taps.iter().enumerate() {
            for c in 0..inner {
                let mut acc = if axis.precision == 0 { 0 } else { round };
                for (j, &wj) in w.iter().enumerate() {
                    acc += wj as i64 * src[(o * len + xmin + j) * inner + c] as i64;
                }
                dst[(o * out + i) * inner + c] = (acc >> axis.precision).clamp(0, 255) as u8;
            }
        }
    }
    dst
}

/// Resizes an 8-bit RGB image (row-major [H, W, 3]) to `out_w` x `out_h` with torch's uint8
/// antialiased bicubic (width pass, then height pass; an axis that keeps its size is skipped).
pub fn resize_bicubic_rgb8(data: &[u8], width: usize, height: usize, out_w: usize, out_h: usize) -> Result<Vec<u8>> {
    if data.len() != width * height * 3 || width == 0 || height == 0 || out_w == 0 || out_h == 0 {
        return Err(Error::msg(format!("resize: a {width}x{height} RGB image needs {} bytes (got {}) and a non-empty output size ({out_w}x{out_h})", width * height * 3, data.len())));
    }
    let mut img = data.to_vec();
    if out_w != width {
        img = resample_pass(&img, height, width, 3, out_w);
    }
    if out_h != height {
        img = resample_pass(&img, 1, height, out_w * 3, out_h);
    }
    Ok(img)
}

/// CLIPImageProcessor's output size for resizing the shortest edge to `size`:
/// (height, width), the long edge truncated as `int(size * long / short)`.
pub fn shortest_edge_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if height <= width { (height, width) } else { (width, height) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if height <= width {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// CLIPImageProcessor on one 8-bit RGB image (row-major [H, W, 3]): shortest side to `size`
/// (bicubic), center crop `size` x `size`, /255, CLIP mean/std. Returns [1, 3, size, size] f32.
pub fn clip_preprocess(data: &[u8], width: usize, height: usize, size: usize) -> Result<Tensor> {
    if size == 0 {
        return Err(Error::msg("clip_preprocess: size 0"));
    }
    let (nh, nw) = shortest_edge_size(height, width, size);
    let img = resize_bicubic_rgb8(data, width, height, nw, nh)?;
    // Center crop as torchvision's (the resized image is never smaller than the crop here).
    let top = ((nh - size) as f64 / 2.0) as usize;
    let left = ((nw - size) as f64 / 2.0) as usize;
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let px = &img[((top + y) * nw + left + x) * 3..][..3];
            for c in 0..3 {
                // The processor's fused form: (x - 255·mean) / (255·std).
                out[c * size * size + y * size + x] = (px[c] as f32 - CLIP_MEAN[c] * 255.0) / (CLIP_STD[c] * 255.0);
            }
        }
    }
    Tensor::from_f32_vec(out, &[1, 3, size, size], DType::F32)?.to_device(Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_constant_images_and_sizes() {
        let data = vec![77u8; 31 * 17 * 3];
        let out = resize_bicubic_rgb8(&data, 31, 17, 224, 122).unwrap();
        assert_eq!(out.len(), 224 * 122 * 3);
        assert!(out.iter().all(|&v| v == 77));
        assert_eq!(shortest_edge_size(217, 301, 224), (224, 310));
        assert_eq!(shortest_edge_size(400, 150, 224), (597, 224));
        assert!(resize_bicubic_rgb8(&data, 30, 17, 10, 10).is_err());
    }

    #[test]
    fn int16_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(512usize, 224usize), (90, 224), (301, 310), (7, 3)] {
            let a = resample_axis(i, o);
            for (xmin, w) in &a.taps {
                assert!(xmin + w.len() <= i);
                let s: i32 = w.iter().sum();
                assert!((s - (1 << a.precision)).abs() <= w.len() as i32, "{i}->{o}: {s} vs {}", 1 << a.precision);
            }
        }
    }
}
