//! The CLIP text transformer as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`:
//! SDXL's text_encoder (OpenAI ViT-L/14: 12 layers, width 768, 12 heads, quick_gelu) and
//! text_encoder_2 (OpenCLIP ViT-bigG/14: 32 layers, width 1280, 20 heads, gelu, text_projection).
//!
//! Token + position embeddings, pre-norm layers (causal self-attention, MLP), a final layer norm;
//! the pooled output is the final-normed state at the end-of-text position. Every layer's input
//! and the last layer's output are returned (transformers' `hidden_states`), because SDXL
//! conditions on the penultimate one.

use std::collections::BTreeMap;
use std::path::Path;

use autograd::Var;
use engine::{DType, Device, Error, Result, Tensor};
use serde::Deserialize;

use crate::nn::{Embedding, LayerNorm, Linear};
use crate::weights::{Weights, WeightsOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ClipActivation {
    /// x * sigmoid(1.702 x) (OpenAI CLIP).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP).
    #[serde(rename = "gelu")]
    Gelu,
}

/// The fields of a transformers `CLIPTextConfig` (text_encoder/config.json) this model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// 2 in configs written before transformers PR #24773 (SDXL's): pooling then takes the
    /// position of the largest token id, which is the eos with CLIP's vocabulary.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}
fn default_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// SDXL's text_encoder (CLIP ViT-L/14).
    pub fn vit_l() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 768,
            eos_token_id: 2,
        }
    }

    /// SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14).
    pub fn bigg() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: 1280,
            eos_token_id: 2,
        }
    }

    /// The tiny preset's text_encoder (tests/fixtures/sdxl_tiny/text_encoder): ViT-L's topology
    /// at width 12 (3 heads), 3 layers, over the fixture's 874-token vocabulary.
    pub fn tiny_l() -> ClipTextConfig {
        ClipTextConfig { vocab_size: 874, hidden_size: 12, intermediate_size: 48, num_hidden_layers: 3, num_attention_heads: 3, projection_dim: 12, ..ClipTextConfig::vit_l() }
    }

    /// The tiny preset's text_encoder_2: bigG's topology at width 20 (5 heads), 4 layers,
    /// projection 32. With `tiny_l` the conditioning is [B, 77, 32] + pooled [B, 32], what the tiny
    /// UNet (presets::tiny_unet) takes.
    pub fn tiny_g() -> ClipTextConfig {
        ClipTextConfig { vocab_size: 874, hidden_size: 20, intermediate_size: 80, num_hidden_layers: 4, num_attention_heads: 5, projection_dim: 32, eos_token_id: 873, ..ClipTextConfig::bigg() }
    }

    pub fn from_file(path: &Path) -> Result<ClipTextConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        let cfg: ClipTextConfig = serde_json::from_str(&text).map_err(|e| Error::File { path: path.display().to_string(), msg: format!("not a CLIP text config: {e}") })?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::File { path: path.display().to_string(), msg: format!("hidden_size {} does not split into {} heads", cfg.hidden_size, cfg.num_attention_heads) });
        }
        Ok(cfg)
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn load(w: &Weights, d: usize, heads: usize) -> Result<ClipAttention> {
        Ok(ClipAttention {
            q_proj: Linear::load(&w.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&w.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&w.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&w.pp("out_proj"), d, d, true)?,
            heads,
        })
    }

    /// x [B, L, D] with an optional additive mask [L, L].
    fn forward(&self, x: &Var, mask: Option<&Tensor>) -> Result<Var> {
        let (b, l, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let split = |t: Var| -> Result<Var> { t.reshape(&[b, l, self.heads, d / self.heads])?.transpose(1, 2) };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let o = Var::scaled_dot_product_attention(&q, &k, &v, mask, None)?;
        let o = o.transpose(1, 2)?.contiguous()?.reshape(&[b, l, d])?;
        self.out_proj.forward(&o)
    }
}

/// One pre-norm CLIP encoder layer (transformers' CLIPEncoderLayer), shared by the text and the
/// vision towers (clip_vision.rs): self-attention and an MLP, each with a residual.
pub(crate) struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipLayer {
    fn load(w: &Weights, cfg: &ClipTextConfig) -> Result<ClipLayer> {
        ClipLayer::load_dims(w, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps as f32)
    }

    /// `w` is the layer's view (`...encoder.layers.N`).
    pub(crate) fn load_dims(w: &Weights, hidden: usize, intermediate: usize, heads: usize, act: ClipActivation, eps: f32) -> Result<ClipLayer> {
        Ok(ClipLayer {
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), hidden, eps)?,
            self_attn: ClipAttention::load(&w.pp("self_attn"), hidden, heads)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), hidden, eps)?,
            fc1: Linear::load(&w.pp("mlp").pp("fc1"), hidden, intermediate, true)?,
            fc2: Linear::load(&w.pp("mlp").pp("fc2"), intermediate, hidden, true)?,
            act,
        })
    }

    /// x [B, L, D]; `mask` an additive [L, L] mask (the text tower's causal one) or None.
    pub(crate) fn forward(&self, x: &Var, mask: Option<&Tensor>) -> Result<Var> {
        let h = x.add(&self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        let m = match self.act {
            ClipActivation::QuickGelu => m.mul(&m.mul_scalar(1.702)?.sigmoid()?)?,
            ClipActivation::Gelu => m.gelu()?,
        };
        h.add(&self.fc2.forward(&m)?)
    }
}

/// The outputs of a forward pass.
pub struct ClipTextOutput {
    /// The final-normed last layer output [B, L, D].
    pub last_hidden_state: Var,
    /// The final-normed state at each sequence's end-of-text position [B, D].
    pub pooled: Var,
    /// `pooled` through text_projection [B, projection_dim] (CLIPTextModelWithProjection only).
    pub text_embeds: Option<Var>,
    /// The embeddings, then each layer's output (num_hidden_layers + 1 entries; the last is not
    /// final-normed), as transformers' `hidden_states`.
    pub hidden_states: Vec<Var>,
}

/// CLIPTextModel, or CLIPTextModelWithProjection when it has a text projection.
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Builds the model from `w`, whose keys are transformers' (`text_model.embeddings...`, as
    /// SDXL's files hold them, or without the `text_model.` prefix as transformers 5 saves a bare
    /// CLIPTextModel). `with_projection` asks for `text_projection.weight` (text_encoder_2).
    pub fn load(w: &Weights, config: ClipTextConfig, with_projection: bool) -> Result<ClipTextModel> {
        let tw = if w.contains_prefix("text_model") { w.pp("text_model") } else { w.clone() };
        let e = tw.pp("embeddings");
        // A buffer older transformers versions saved; not a parameter.
        if e.contains("position_ids") {
            e.get_unchecked("position_ids")?;
        }
        let d = config.hidden_size;
        let token_embedding = Embedding::load(&e.pp("token_embedding"), config.vocab_size, d)?;
        let position_embedding = Embedding::load(&e.pp("position_embedding"), config.max_position_embeddings, d)?;
        let layers = (0..config.num_hidden_layers).map(|i| ClipLayer::load(&tw.pp("encoder").pp("layers").pp(i), &config)).collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(&tw.pp("final_layer_norm"), d, config.layer_norm_eps as f32)?;
        let text_projection = if with_projection { Some(Linear::load(&w.pp("text_projection"), d, config.projection_dim, false)?) } else { None };
        Ok(ClipTextModel { config, token_embedding, position_embedding, layers, final_layer_norm, text_projection })
    }

    /// From a transformers model folder (config.json + model.safetensors, or the fp16 variant
    /// model.fp16.safetensors); any missing or unexpected key is an error naming it.
    pub fn from_folder(dir: impl AsRef<Path>, with_projection: bool, dtype: Option<DType>, device: Device) -> Result<ClipTextModel> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let file = ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"].iter().map(|f| dir.join(f)).find(|p| p.exists()).ok_or_else(|| Error::File { path: dir.display().to_string(), msg: "no model.safetensors, model.fp16.safetensors or pytorch_model.bin".into() })?;
        let w = Weights::from_files(&[file], WeightsOptions { dtype, device, collect_missing: true })?;
        let model = ClipTextModel::load(&w, config, with_projection)?;
        w.finish()?;
        Ok(model)
    }

    /// From the tensors of a single-file SDXL checkpoint: `kind` says which of its text encoders
    /// (and so which key layout) to build. Missing or unexpected keys (of that encoder's part of
    /// the file) are an error naming them.
    pub fn from_single_file_tensors(tensors: &BTreeMap<String, Tensor>, kind: SingleFileTextEncoder, config: ClipTextConfig, opts: WeightsOptions, source: &str) -> Result<ClipTextModel> {
        let (map, with_projection) = match kind {
            SingleFileTextEncoder::ClipL => (strip_prefix(tensors, SDXL_CLIP_L_PREFIX), false),
            SingleFileTextEncoder::OpenClipBigG => (open_clip_to_transformers(tensors, SDXL_OPEN_CLIP_PREFIX)?, true),
        };
        if map.is_empty() {
            return Err(Error::File { path: source.to_string(), msg: format!("no tensor of the {kind:?} text encoder (keys under {:?})", kind.prefix()) });
        }
        let w = Weights::from_map(map, source, opts);
        let model = ClipTextModel::load(&w, config, with_projection)?;
        w.finish()?;
        Ok(model)
    }

    /// ids: I64 [B, L] with L <= max_position_embeddings.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        if ids.rank() != 2 || ids.dtype() != DType::I64 {
            return Err(Error::BadShape { op: "ClipTextModel::forward", msg: format!("expected I64 token ids [B, L], got {}", ids.dtype()), shape: ids.shape().to_vec() });
        }
        let (b, l) = (ids.shape()[0], ids.shape()[1]);
        if l > self.config.max_position_embeddings {
            return Err(Error::BadShape { op: "ClipTextModel::forward", msg: format!("sequence longer than max_position_embeddings {}", self.config.max_position_embeddings), shape: ids.shape().to_vec() });
        }
        let id_values: Vec<i64> = ids.to_vec()?;
        if let Some(bad) = id_values.iter().find(|&&i| i < 0 || i as usize >= self.config.vocab_size) {
            return Err(Error::msg(format!("ClipTextModel::forward: token id {bad} outside the vocabulary of {}", self.config.vocab_size)));
        }

        let positions = self.position_embedding.weight.narrow(0, 0, l)?;
        let mut x = self.token_embedding.forward(ids)?.add(&positions)?;
        let mask = causal_mask(l, x.dtype(), x.device())?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
            hidden_states.push(x.clone());
        }
        let last = self.final_layer_norm.forward(&x)?;

        // Which position is pooled: transformers keeps the legacy argmax of the ids (first
        // maximum) for configs with eos_token_id 2, else the first eos.
        let mut rows = Vec::with_capacity(b);
        for (r, seq) in id_values.chunks(l).enumerate() {
            let pos = if self.config.eos_token_id == 2 {
                let max = seq.iter().copied().max().unwrap_or(0);
                seq.iter().position(|&v| v == max).unwrap_or(0)
            } else {
                // As torch's argmax over (ids == eos): 0 when no eos is present.
                seq.iter().position(|&v| v == self.config.eos_token_id).unwrap_or(0)
            };
            rows.push((r * l + pos) as i64);
        }
        let rows = Tensor::from_vec(rows, &[b], Device::Cpu)?.to_device(last.device())?;
        let pooled = last.reshape(&[b * l, self.config.hidden_size])?.index_select(0, &rows)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput { last_hidden_state: last, pooled, text_embeds, hidden_states })
    }
}

/// Additive causal mask [L, L]: 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, dtype: DType, device: Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(data, &[l, l], Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}

/// Where SDXL's single-file checkpoint keeps the ViT-L text encoder (transformers' names below it).
pub const SDXL_CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Where it keeps the OpenCLIP bigG text tower (OpenCLIP's names below it).
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// Which text encoder of a single-file SDXL checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleFileTextEncoder {
    /// text_encoder: CLIP ViT-L under `conditioner.embedders.0.transformer.`.
    ClipL,
    /// text_encoder_2: OpenCLIP bigG under `conditioner.embedders.1.model.`.
    OpenClipBigG,
}

impl SingleFileTextEncoder {
    pub fn prefix(self) -> &'static str {
        match self {
            SingleFileTextEncoder::ClipL => SDXL_CLIP_L_PREFIX,
            SingleFileTextEncoder::OpenClipBigG => SDXL_OPEN_CLIP_PREFIX,
        }
    }
}

/// The tensors under `prefix`, with the prefix removed.
fn strip_prefix(tensors: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (rest.to_string(), v.clone()))).collect()
}

/// An OpenCLIP text tower (`token_embedding`, `positional_embedding`, `transformer.resblocks.N`
/// with a fused `attn.in_proj_weight` [3D, D], `ln_final`, `text_projection` [D, P]) under
/// `prefix`, renamed to transformers' CLIPTextModelWithProjection keys: the fused q/k/v projection
/// is split in three, text_projection transposed to a Linear weight [P, D]. `logit_scale` (the
/// contrastive temperature) and `attn_mask` (a buffer) are dropped; any other key keeps its name so
/// that the weight store reports it as unexpected.
pub fn open_clip_to_transformers(tensors: &BTreeMap<String, Tensor>, prefix: &str) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (key, t) in strip_prefix(tensors, prefix) {
        let renamed = match key.as_str() {
            "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".to_string(),
            "positional_embedding" => "text_model.embeddings.position_embedding.weight".to_string(),
            "ln_final.weight" => "text_model.final_layer_norm.weight".to_string(),
            "ln_final.bias" => "text_model.final_layer_norm.bias".to_string(),
            "logit_scale" | "attn_mask" => continue,
            "text_projection" => {
                out.insert("text_projection.weight".to_string(), t.t()?.contiguous()?);
                continue;
            }
            _ => match key.strip_prefix("transformer.resblocks.").and_then(|r| r.split_once('.')) {
                Some((layer, rest)) => {
                    let base = format!("text_model.encoder.layers.{layer}.");
                    if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
                        let n = t.dim(0)?;
                        if n % 3 != 0 {
                            return Err(Error::msg(format!("{prefix}{key}: a fused q/k/v projection needs a first dim divisible by 3, found {:?}", t.shape())));
                        }
                        for (i, q) in ["q", "k", "v"].iter().enumerate() {
                            out.insert(format!("{base}self_attn.{q}_proj.{kind}"), t.narrow(0, i * n / 3, n / 3)?.contiguous()?);
                        }
                        continue;
                    }
                    let mapped = rest
                        .replacen("ln_1.", "layer_norm1.", 1)
                        .replacen("ln_2.", "layer_norm2.", 1)
                        .replacen("mlp.c_fc.", "mlp.fc1.", 1)
                        .replacen("mlp.c_proj.", "mlp.fc2.", 1)
                        .replacen("attn.out_proj.", "self_attn.out_proj.", 1);
                    format!("{base}{mapped}")
                }
                None => format!("{prefix}{key}"),
            },
        };
        out.insert(renamed, t);
    }
    Ok(out)
}
