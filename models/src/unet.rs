//! The SDXL UNet (diffusers' UNet2DConditionModel with the "text_time" added embedding), its
//! configuration (a diffusers unet/config.json), and its loaders: the diffusers folder layout
//! (single or sharded safetensors, fp16 variant), the single-file SDXL checkpoint with the
//! original "model.diffusion_model.*" keys, a repo id in the local Hugging Face cache, LoRA files
//! (kohya `lora_unet_*` over either key naming, diffusers/peft `lora_A/lora_B`), and IP-Adapter
//! to_k_ip/to_v_ip weights. Extended self-attention and IP cross-attention: see attention.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use autograd::Var;
use engine::{DType, Error, Result, Tensor};
use serde_json::Value;

use crate::attention::{AttnExtras, IpProjection};
use crate::nn::{frozen, join, Conv2d, GroupNorm, Linear, LoraAdapter, LoraHost, LoraScale, Module, Visitor};
use crate::unet_blocks::{AttnSpec, BlockSpec, DownBlock, MidBlock, UpBlock};
use crate::weights::{Weights, WeightsOptions};

/// What the UNet is built from (the fields of diffusers' config.json it uses).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Per down block: whether it has attention (CrossAttnDownBlock2D) or not (DownBlock2D).
    pub down_attention: Vec<bool>,
    /// Per up block: CrossAttnUpBlock2D (true) or UpBlock2D.
    pub up_attention: Vec<bool>,
    pub layers_per_block: usize,
    /// Transformer depth per down block (the mid block uses the last).
    pub transformer_layers_per_block: Vec<usize>,
    /// Transformer depth per up block (default: the down depths reversed).
    pub reverse_transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block (diffusers' legacy `attention_head_dim` means heads).
    pub num_attention_heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    /// Some for "text_time": (addition_time_embed_dim, projection_class_embeddings_input_dim).
    pub text_time: Option<(usize, usize)>,
}

fn usize_list(v: Option<&Value>, n: usize, field: &str) -> Result<Option<Vec<usize>>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(x)) => Ok(Some(vec![x.as_u64().ok_or_else(|| Error::msg(format!("UNet config: {field} must be a non-negative integer")))? as usize; n])),
        Some(Value::Array(a)) => {
            let l = a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect::<Option<Vec<_>>>().ok_or_else(|| Error::msg(format!("UNet config: {field} must hold integers")))?;
            if l.len() != n {
                return Err(Error::msg(format!("UNet config: {field} has {} entries for {n} blocks", l.len())));
            }
            Ok(Some(l))
        }
        Some(_) => Err(Error::msg(format!("UNet config: {field} must be an integer or a list"))),
    }
}

impl UNetConfig {
    /// From the text of a diffusers unet/config.json; options this UNet does not implement are
    /// errors naming them.
    pub fn from_json(text: &str) -> Result<UNetConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::msg(format!("UNet config: {e}")))?;
        let get_u = |k: &str, d: usize| -> Result<usize> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(x) => x.as_u64().map(|u| u as usize).ok_or_else(|| Error::msg(format!("UNet config: {k} must be an integer"))),
            }
        };
        let get_f = |k: &str, d: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(x) => x.as_f64().ok_or_else(|| Error::msg(format!("UNet config: {k} must be a number"))),
            }
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            v.get(k).and_then(|x| x.as_array()).and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect()).ok_or_else(|| Error::msg(format!("UNet config: {k} must be a list of strings")))
        };
        let block_out_channels = usize_list(v.get("block_out_channels"), v.get("block_out_channels").and_then(|a| a.as_array()).map_or(0, |a| a.len()), "block_out_channels")?
            .ok_or_else(|| Error::msg("UNet config: block_out_channels is required"))?;
        let n = block_out_channels.len();
        let down_attention = strings("down_block_types")?
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(Error::msg(format!("UNet config: down block type {other} is not supported"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_attention = strings("up_block_types")?
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(Error::msg(format!("UNet config: up block type {other} is not supported"))),
            })
            .collect::<Result<Vec<_>>>()?;
        if down_attention.len() != n || up_attention.len() != n {
            return Err(Error::msg(format!("UNet config: {n} block_out_channels but {} down and {} up block types", down_attention.len(), up_attention.len())));
        }
        let transformer_layers_per_block = usize_list(v.get("transformer_layers_per_block"), n, "transformer_layers_per_block")?.unwrap_or(vec![1; n]);
        let reverse_transformer_layers_per_block =
            usize_list(v.get("reverse_transformer_layers_per_block"), n, "reverse_transformer_layers_per_block")?.unwrap_or_else(|| transformer_layers_per_block.iter().rev().copied().collect());
        let heads = match usize_list(v.get("num_attention_heads"), n, "num_attention_heads")? {
            Some(h) => h,
            None => usize_list(v.get("attention_head_dim"), n, "attention_head_dim")?.unwrap_or(vec![8; n]),
        };
        let check = |k: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
            match v.get(k) {
                Some(x) if !ok(x) => Err(Error::msg(format!("UNet config: {k} = {x} is not supported"))),
                _ => Ok(()),
            }
        };
        let null_or = |s: &'static str| move |x: &Value| x.is_null() || x.as_str() == Some(s);
        check("use_linear_projection", &|x| x.as_bool() == Some(true))?;
        check("class_embed_type", &|x: &Value| x.is_null())?;
        check("time_cond_proj_dim", &|x: &Value| x.is_null())?;
        check("encoder_hid_dim_type", &|x: &Value| x.is_null())?;
        check("mid_block_type", &null_or("UNetMidBlock2DCrossAttn"))?;
        check("resnet_time_scale_shift", &null_or("default"))?;
        check("attention_type", &null_or("default"))?;
        check("time_embedding_type", &null_or("positional"))?;
        check("act_fn", &null_or("silu"))?;
        check("only_cross_attention", &|x| x.as_bool() != Some(true))?;
        check("dual_cross_attention", &|x| x.as_bool() != Some(true))?;
        check("conv_in_kernel", &|x| x.as_u64() == Some(3))?;
        check("conv_out_kernel", &|x| x.as_u64() == Some(3))?;
        check("addition_embed_type", &null_or("text_time"))?;
        let text_time = if v.get("addition_embed_type").and_then(|x| x.as_str()) == Some("text_time") {
            Some((get_u("addition_time_embed_dim", 256)?, get_u("projection_class_embeddings_input_dim", 0)?))
        } else {
            None
        };
        let cross = match v.get("cross_attention_dim") {
            Some(Value::Number(x)) => x.as_u64().unwrap_or(0) as usize,
            _ => return Err(Error::msg("UNet config: cross_attention_dim must be one integer")),
        };
        Ok(UNetConfig {
            in_channels: get_u("in_channels", 4)?,
            out_channels: get_u("out_channels", 4)?,
            block_out_channels,
            down_attention,
            up_attention,
            layers_per_block: get_u("layers_per_block", 2)?,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            num_attention_heads: heads,
            cross_attention_dim: cross,
            norm_num_groups: get_u("norm_num_groups", 32)?,
            norm_eps: get_f("norm_eps", 1e-5)? as f32,
            flip_sin_to_cos: v.get("flip_sin_to_cos").and_then(|x| x.as_bool()).unwrap_or(true),
            freq_shift: get_f("freq_shift", 0.0)? as f32,
            text_time,
        })
    }

    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }
}

/// Sinusoidal timestep features as diffusers' get_timestep_embedding (max period 10000, scale 1),
/// computed in f32 as torch does: [len(t), dim].
pub fn timestep_embedding(t: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log * i as f32) / (half as f32 - freq_shift)).exp()).collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        let args: Vec<f32> = freqs.iter().map(|f| ti * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// The SDXL UNet.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    /// add_embedding.linear_1 / linear_2 ("text_time").
    pub add_linear: Option<(Linear, Linear)>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// The SDXL conditioning of one call besides the latents and timesteps.
pub struct UNetCond<'a> {
    /// [B, L, cross_attention_dim] (with IP tokens appended when IP cross-attention is on).
    pub encoder_hidden_states: &'a Var,
    /// Pooled text embeddings [B, D] ("text_time").
    pub text_embeds: Option<&'a Var>,
    /// [B, 6] original size, crop top-left, target size ("text_time").
    pub time_ids: Option<&'a Tensor>,
}

impl UNet2DConditionModel {
    /// Builds the UNet from `w` (diffusers key names). Call `w.finish()` afterwards to have
    /// missing and unexpected keys reported (the loaders below do).
    pub fn load(w: &Weights, cfg: &UNetConfig) -> Result<UNet2DConditionModel> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        if n == 0 || cfg.num_attention_heads.len() != n {
            return Err(Error::msg("UNet config: block lists are empty or of different lengths"));
        }
        let temb = cfg.time_embed_dim();
        let s = BlockSpec { temb_ch: temb, groups: cfg.norm_num_groups, eps: cfg.norm_eps };
        let spec = |heads: usize, depth: usize| AttnSpec { heads, depth, context_dim: cfg.cross_attention_dim };
        let conv_in = Conv2d::load(&w.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1, true)?;
        let time_linear_1 = Linear::load(&w.pp("time_embedding.linear_1"), ch[0], temb, true)?;
        let time_linear_2 = Linear::load(&w.pp("time_embedding.linear_2"), temb, temb, true)?;
        let add_linear = match cfg.text_time {
            Some((_, proj_in)) => Some((Linear::load(&w.pp("add_embedding.linear_1"), proj_in, temb, true)?, Linear::load(&w.pp("add_embedding.linear_2"), temb, temb, true)?)),
            None => None,
        };
        let mut down_blocks = Vec::new();
        // Channels of every skip, in push order.
        let mut skip_channels = vec![ch[0]];
        let mut prev = ch[0];
        #[allow(clippy::needless_range_loop)] // i indexes four per-block lists
        for i in 0..n {
            let name = format!("down_blocks.{i}");
            let attn = cfg.down_attention[i].then(|| spec(cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i]));
            let last = i + 1 == n;
            down_blocks.push(DownBlock::load(&w.pp(&name), &name, prev, ch[i], cfg.layers_per_block, attn, !last, s)?);
            skip_channels.extend(std::iter::repeat_n(ch[i], cfg.layers_per_block + usize::from(!last)));
            prev = ch[i];
        }
        let mid_block = MidBlock::load(&w.pp("mid_block"), "mid_block", ch[n - 1], spec(cfg.num_attention_heads[n - 1], cfg.transformer_layers_per_block[n - 1]), s)?;
        let mut up_blocks = Vec::new();
        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = cfg.num_attention_heads.iter().rev().copied().collect();
        let mut prev = rev_ch[0];
        for i in 0..n {
            let name = format!("up_blocks.{i}");
            let attn = cfg.up_attention[i].then(|| spec(rev_heads[i], cfg.reverse_transformer_layers_per_block[i]));
            let skips: Vec<usize> = (0..=cfg.layers_per_block).map(|_| skip_channels.pop().unwrap_or(0)).collect();
            up_blocks.push(UpBlock::load(&w.pp(&name), &name, prev, rev_ch[i], &skips, attn, i + 1 != n, s)?);
            prev = rev_ch[i];
        }
        Ok(UNet2DConditionModel {
            config: cfg.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            add_linear,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[0], cfg.norm_eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1, true)?,
        })
    }

    /// The noise prediction for `sample` [B, C, H, W] at `timesteps` ([B], [1] or a scalar).
    pub fn forward(&self, sample: &Var, timesteps: &Tensor, cond: &UNetCond, extras: &AttnExtras) -> Result<Var> {
        let h = self.forward_through(sample, timesteps, cond, extras, None)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }

    /// The forward pass stopped after up block `last_up` (its output, upsampled if that block
    /// upsamples), or, with None, the last up block's output before the output norm and conv.
    /// The KV-encoder runs the UNet only as far as its last attention.
    pub fn forward_through(&self, sample: &Var, timesteps: &Tensor, cond: &UNetCond, extras: &AttnExtras, last_up: Option<usize>) -> Result<Var> {
        if let Some(i) = last_up {
            if i >= self.up_blocks.len() {
                return Err(Error::msg(format!("UNet: no up block {i} (the model has {})", self.up_blocks.len())));
            }
        }
        let b = sample.shape()[0];
        let dtype = sample.dtype();
        let ts = timesteps.to_vec_f32()?;
        let ts: Vec<f32> = match ts.len() {
            1 => vec![ts[0]; b],
            l if l == b => ts,
            l => return Err(Error::msg(format!("UNet: {l} timesteps for a batch of {b}"))),
        };
        let c0 = self.config.block_out_channels[0];
        let t_emb = Tensor::from_f32_vec(timestep_embedding(&ts, c0, self.config.flip_sin_to_cos, self.config.freq_shift), &[b, c0], dtype)?.to_device(sample.device())?;
        let mut emb = self.time_linear_2.forward(&self.time_linear_1.forward(&Var::constant(t_emb))?.silu()?)?;
        if let (Some((l1, l2)), Some((add_dim, _))) = (&self.add_linear, self.config.text_time) {
            let (Some(text), Some(ids)) = (cond.text_embeds, cond.time_ids) else {
                return Err(Error::msg("UNet: this model (addition_embed_type text_time) needs text_embeds and time_ids"));
            };
            let ids = ids.to_vec_f32()?;
            if ids.len() % b != 0 {
                return Err(Error::msg(format!("UNet: time_ids of {} values for a batch of {b}", ids.len())));
            }
            let per = ids.len() / b;
            let te = Tensor::from_f32_vec(timestep_embedding(&ids, add_dim, self.config.flip_sin_to_cos, self.config.freq_shift), &[b, per * add_dim], dtype)?.to_device(sample.device())?;
            let add_in = Var::cat(&[&text.to_dtype(dtype)?, &Var::constant(te)], -1)?;
            emb = emb.add(&l2.forward(&l1.forward(&add_in)?.silu()?)?)?;
        }
        let temb_act = emb.silu()?;
        let context = cond.encoder_hidden_states;
        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for d in &self.down_blocks {
            h = d.forward(&h, &temb_act, context, extras, &mut skips)?;
        }
        h = self.mid_block.forward(&h, &temb_act, context, extras)?;
        for (i, u) in self.up_blocks.iter().enumerate() {
            h = u.forward(&h, &temb_act, context, extras, &mut skips)?;
            if last_up == Some(i) {
                break;
            }
        }
        Ok(h)
    }

    /// Names of every transformer block (the layer keys of extended attention), in diffusers'
    /// attention-processor order: down blocks, up blocks, mid block.
    pub fn transformer_block_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        let all = self.down_blocks.iter().flat_map(|d| &d.attentions).chain(self.up_blocks.iter().flat_map(|u| &u.attentions)).chain(std::iter::once(&self.mid_block.attention));
        for t in all {
            names.extend(t.blocks.iter().map(|b| b.name.clone()));
        }
        names
    }

    pub(crate) fn transformer_blocks_mut(&mut self) -> Vec<&mut crate::attention::BasicTransformerBlock> {
        let mut out = Vec::new();
        for d in &mut self.down_blocks {
            for t in &mut d.attentions {
                out.extend(t.blocks.iter_mut());
            }
        }
        for u in &mut self.up_blocks {
            for t in &mut u.attentions {
                out.extend(t.blocks.iter_mut());
            }
        }
        out.extend(self.mid_block.attention.blocks.iter_mut());
        out
    }

    /// Installs IP-Adapter decoupled cross-attention on every attn2 from `w`, whose keys are
    /// IP-Adapter's `N.to_k_ip.weight` / `N.to_v_ip.weight` (N = the attention processor's index:
    /// 2·i+1 for the i-th transformer block); pass the `ip_adapter` view of an IP-Adapter file.
    /// Returns the shared scale handle.
    pub fn set_ip_adapter(&mut self, w: &Weights, num_tokens: usize, scale: f32) -> Result<LoraScale> {
        let handle = LoraScale::new(scale);
        let ctx = self.config.cross_attention_dim;
        for (i, blk) in self.transformer_blocks_mut().into_iter().enumerate() {
            let inner = blk.attn2.to_q.out_features();
            let n = 2 * i + 1;
            blk.attn2.ip = Some(IpProjection {
                to_k_ip: Linear::load(&w.pp(format!("{n}.to_k_ip")), ctx, inner, false)?,
                to_v_ip: Linear::load(&w.pp(format!("{n}.to_v_ip")), ctx, inner, false)?,
                num_tokens,
                scale: handle.clone(),
            });
        }
        Ok(handle)
    }

    /// Removes the IP projections (attn2 is plain cross-attention again).
    pub fn clear_ip_adapter(&mut self) {
        for blk in self.transformer_blocks_mut() {
            blk.attn2.ip = None;
        }
    }

    /// Names of every LoRA host (linear and convolution layers) in diffusers' module naming.
    pub fn lora_host_names(&mut self) -> Vec<String> {
        struct Names(Vec<String>);
        impl Visitor for Names {
            fn lora_host(&mut self, name: &str, _h: &mut dyn LoraHost) {
                self.0.push(name.to_string());
            }
        }
        let mut v = Names(Vec::new());
        self.visit("", &mut v);
        v.0
    }

    /// Loads a LoRA file onto the UNet as adapter `adapter` with the run-time multiplier `scale`
    /// (shared by all its layers; returned). Key styles: kohya `lora_unet_<module>.lora_down/
    /// lora_up.weight` + `.alpha` (module in diffusers or original naming, dots as underscores);
    /// diffusers/peft `[unet.]<module>.lora_A/lora_B.weight` or `.lora.down/.lora.up.weight`
    /// (+ optional `.alpha`). Text-encoder entries (lora_te*, text_encoder*) are skipped; any other
    /// key, or a module this UNet lacks, is an error naming it.
    pub fn load_lora(&mut self, w: &Weights, adapter: &str, scale: f32) -> Result<LoraScale> {
        let handle = LoraScale::new(scale);
        let hosts = self.lora_host_names();
        let host_set: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
        let mut underscored: BTreeMap<String, String> = BTreeMap::new();
        for h in &hosts {
            underscored.insert(h.replace('.', "_"), h.clone());
            if let Some(l) = diffusers_to_ldm(&format!("{h}.weight"), &self.config) {
                underscored.insert(l.trim_end_matches(".weight").replace('.', "_"), h.clone());
            }
        }
        #[derive(Default)]
        struct Parts {
            down: Option<Tensor>,
            up: Option<Tensor>,
            alpha: Option<f32>,
        }
        let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
        let mut bad = Vec::new();
        for key in w.all_keys() {
            if key.starts_with("lora_te") || key.starts_with("te_") || key.starts_with("text_encoder") {
                continue;
            }
            let (module, part) = if let Some(rest) = key.strip_prefix("lora_unet_") {
                let split = [".lora_down.weight", ".lora_up.weight", ".alpha"].iter().find_map(|suf| rest.strip_suffix(suf).map(|m| (m, *suf)));
                match split.and_then(|(m, suf)| underscored.get(m).map(|h| (h.clone(), suf))) {
                    Some(x) => x,
                    None => {
                        bad.push(key.clone());
                        continue;
                    }
                }
            } else {
                let rest = key.strip_prefix("unet.").unwrap_or(&key);
                let split = [(".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"), (".lora.down.weight", ".lora_down.weight"), (".lora.up.weight", ".lora_up.weight"), (".alpha", ".alpha")]
                    .iter()
                    .find_map(|(suf, part)| rest.strip_suffix(suf).map(|m| (m.to_string(), *part)));
                match split.filter(|(m, _)| host_set.contains(m.as_str())) {
                    Some(x) => x,
                    None => {
                        bad.push(key.clone());
                        continue;
                    }
                }
            };
            let t = w.get_unchecked(&key)?;
            let g = groups.entry(module).or_default();
            match part {
                ".lora_down.weight" => g.down = Some(t),
                ".lora_up.weight" => g.up = Some(t),
                _ => g.alpha = Some(t.to_dtype(DType::F32)?.reshape(&[1])?.to_vec_f32()?[0]),
            }
        }
        if !bad.is_empty() {
            return Err(Error::msg(format!("LoRA {adapter}: {} key(s) name no layer of this UNet: {}", bad.len(), bad.join(", "))));
        }
        let mut adapters: BTreeMap<String, LoraAdapter> = BTreeMap::new();
        for (module, p) in groups {
            let (Some(down), Some(up)) = (p.down, p.up) else {
                return Err(Error::msg(format!("LoRA {adapter}: {module} needs both a down (A) and an up (B) weight")));
            };
            let rank = down.shape()[0];
            let alpha_over_rank = p.alpha.map_or(1.0, |a| a / rank as f32);
            adapters.insert(module, LoraAdapter { name: adapter.to_string(), down: frozen(down), up: frozen(up), alpha_over_rank, scale: handle.clone() });
        }
        struct Install {
            adapters: BTreeMap<String, LoraAdapter>,
            errors: Vec<String>,
        }
        impl Visitor for Install {
            fn lora_host(&mut self, name: &str, h: &mut dyn LoraHost) {
                let Some(mut a) = self.adapters.remove(name) else { return };
                // A linear layer's LoRA saved as 1x1 convolutions: drop the trailing 1s.
                if h.weight_shape().len() == 2 {
                    for t in [&mut a.down, &mut a.up] {
                        let s = t.shape().to_vec();
                        if s.len() == 4 && s[2] == 1 && s[3] == 1 {
                            match t.reshape(&s[..2]) {
                                Ok(r) => *t = frozen(r.value().clone()),
                                Err(e) => self.errors.push(format!("{name}: {e}")),
                            }
                        }
                    }
                }
                if let Err(e) = h.add_lora(a) {
                    self.errors.push(format!("{name}: {e}"));
                }
            }
        }
        let mut inst = Install { adapters, errors: Vec::new() };
        self.visit("", &mut inst);
        if !inst.errors.is_empty() {
            // Leave the model as it was.
            self.remove_lora(adapter)?;
            return Err(Error::msg(format!("LoRA {adapter}: {}", inst.errors.join("; "))));
        }
        Ok(handle)
    }

    /// Removes adapter `name` from every layer (unfusing where fused).
    pub fn remove_lora(&mut self, name: &str) -> Result<()> {
        self.for_each_host(|h| h.remove_lora(name).map(|_| ()))
    }

    /// Fuses adapter `name` into the weights of every layer that has it.
    pub fn fuse_lora(&mut self, name: &str) -> Result<()> {
        self.for_each_host(|h| if h.loras().iter().any(|a| a.name == name) { h.fuse_lora(name) } else { Ok(()) })
    }

    /// Undoes `fuse_lora`.
    pub fn unfuse_lora(&mut self, name: &str) -> Result<()> {
        self.for_each_host(|h| if h.loras().iter().any(|a| a.name == name) { h.unfuse_lora(name) } else { Ok(()) })
    }

    fn for_each_host(&mut self, f: impl FnMut(&mut dyn LoraHost) -> Result<()>) -> Result<()> {
        struct Each<F> {
            f: F,
            err: Option<Error>,
        }
        impl<F: FnMut(&mut dyn LoraHost) -> Result<()>> Visitor for Each<F> {
            fn lora_host(&mut self, name: &str, h: &mut dyn LoraHost) {
                if self.err.is_none() {
                    if let Err(e) = (self.f)(h) {
                        self.err = Some(Error::msg(format!("{name}: {e}")));
                    }
                }
            }
        }
        let mut each = Each { f, err: None };
        self.visit("", &mut each);
        each.err.map_or(Ok(()), Err)
    }

    // ---- loaders ----

    /// From weights (diffusers names) and a config; fails listing every missing and unexpected key.
    pub fn from_weights(w: &Weights, cfg: &UNetConfig) -> Result<UNet2DConditionModel> {
        let m = UNet2DConditionModel::load(w, cfg)?;
        w.finish()?;
        Ok(m)
    }

    /// From a diffusers folder: either a pipeline folder with unet/ or the unet folder itself
    /// (config.json + diffusion_pytorch_model[.fp16].safetensors or a sharded index), or a repo id
    /// in the local Hugging Face cache.
    pub fn from_pretrained(name_or_path: &str, opts: WeightsOptions) -> Result<UNet2DConditionModel> {
        let mut dir = crate::hub::resolve_model_dir(name_or_path)?;
        if dir.join("unet").join("config.json").is_file() {
            dir = dir.join("unet");
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path.display().to_string(), source })?;
        let cfg = UNetConfig::from_json(&text).map_err(|e| Error::File { path: cfg_path.display().to_string(), msg: e.to_string() })?;
        let files = diffusers_weight_files(&dir, "diffusion_pytorch_model")?;
        let w = Weights::from_files(&files, opts)?;
        UNet2DConditionModel::from_weights(&w, &cfg)
    }

    /// From a single-file SDXL checkpoint (original keys under "model.diffusion_model."; the
    /// VAE's and text encoders' keys are skipped) with `cfg` (e.g. `presets::sdxl_unet()`).
    pub fn from_single_file(path: impl AsRef<Path>, cfg: &UNetConfig, opts: WeightsOptions) -> Result<UNet2DConditionModel> {
        let path = path.as_ref();
        let (_, tensors) = engine::io::load_any(path)?;
        let w = Weights::from_map(single_file_to_diffusers(tensors, cfg), &path.display().to_string(), opts);
        UNet2DConditionModel::from_weights(&w, cfg)
    }
}

impl Module for UNet2DConditionModel {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.conv_in.visit(&join(prefix, "conv_in"), v);
        self.time_linear_1.visit(&join(prefix, "time_embedding.linear_1"), v);
        self.time_linear_2.visit(&join(prefix, "time_embedding.linear_2"), v);
        if let Some((l1, l2)) = &mut self.add_linear {
            l1.visit(&join(prefix, "add_embedding.linear_1"), v);
            l2.visit(&join(prefix, "add_embedding.linear_2"), v);
        }
        for (i, d) in self.down_blocks.iter_mut().enumerate() {
            d.visit(&join(prefix, format!("down_blocks.{i}")), v);
        }
        self.mid_block.visit(&join(prefix, "mid_block"), v);
        for (i, u) in self.up_blocks.iter_mut().enumerate() {
            u.visit(&join(prefix, format!("up_blocks.{i}")), v);
        }
        self.conv_norm_out.visit(&join(prefix, "conv_norm_out"), v);
        self.conv_out.visit(&join(prefix, "conv_out"), v);
    }
}

/// The weight files of a diffusers model folder for `stem`: `<stem>.safetensors`, else its fp16
/// variant, else a sharded `<stem>[.fp16].safetensors.index.json`, else `<stem>.bin`.
pub fn diffusers_weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        if dir.join(&name).is_file() {
            return Ok(vec![dir.join(name)]);
        }
    }
    for name in [format!("{stem}.safetensors.index.json"), format!("{stem}.fp16.safetensors.index.json")] {
        let idx = dir.join(&name);
        if idx.is_file() {
            let text = std::fs::read_to_string(&idx).map_err(|source| Error::Io { path: idx.display().to_string(), source })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::File { path: idx.display().to_string(), msg: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::File { path: idx.display().to_string(), msg: "no weight_map".into() })?;
            let files: BTreeSet<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    if dir.join(format!("{stem}.bin")).is_file() {
        return Ok(vec![dir.join(format!("{stem}.bin"))]);
    }
    Err(Error::File { path: dir.display().to_string(), msg: format!("no {stem}(.fp16).safetensors, sharded index or .bin") })
}

// ---- original (LDM / SGM) key names <-> diffusers names, as diffusers' convert_ldm_unet_checkpoint ----

const LDM_PREFIX: &str = "model.diffusion_model.";
const TOP_LEVEL: [(&str, &str); 7] = [
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
];
const RESNET_NAMES: [(&str, &str); 6] = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")];

fn resnet_to_ldm(rest: &str) -> Option<String> {
    RESNET_NAMES.iter().find_map(|(d, l)| rest.strip_prefix(&format!("{d}.")).map(|t| format!("{l}.{t}")))
}
fn resnet_from_ldm(rest: &str) -> Option<String> {
    RESNET_NAMES.iter().find_map(|(d, l)| rest.strip_prefix(&format!("{l}.")).map(|t| format!("{d}.{t}")))
}

/// The original checkpoint key (without "model.diffusion_model.") of a diffusers UNet key.
pub fn diffusers_to_ldm(key: &str, cfg: &UNetConfig) -> Option<String> {
    for (d, l) in TOP_LEVEL {
        if let Some(rest) = key.strip_prefix(&format!("{d}.")) {
            return Some(format!("{l}.{rest}"));
        }
    }
    let lpb = cfg.layers_per_block;
    let p: Vec<&str> = key.splitn(5, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    match p.as_slice() {
        ["down_blocks", b, "downsamplers", "0", rest] => Some(format!("input_blocks.{}.0.op.{}", 1 + num(b)? * (lpb + 1) + lpb, rest.strip_prefix("conv.")?)),
        ["down_blocks", b, kind, l, rest] => {
            let i = 1 + num(b)? * (lpb + 1) + num(l)?;
            match *kind {
                "resnets" => Some(format!("input_blocks.{i}.0.{}", resnet_to_ldm(rest)?)),
                "attentions" => Some(format!("input_blocks.{i}.1.{rest}")),
                _ => None,
            }
        }
        ["up_blocks", b, "upsamplers", "0", rest] => {
            let b = num(b)?;
            let j = if *cfg.up_attention.get(b)? { 2 } else { 1 };
            Some(format!("output_blocks.{}.{j}.conv.{}", b * (lpb + 1) + lpb, rest.strip_prefix("conv.")?))
        }
        ["up_blocks", b, kind, l, rest] => {
            let i = num(b)? * (lpb + 1) + num(l)?;
            match *kind {
                "resnets" => Some(format!("output_blocks.{i}.0.{}", resnet_to_ldm(rest)?)),
                "attentions" => Some(format!("output_blocks.{i}.1.{rest}")),
                _ => None,
            }
        }
        ["mid_block", kind, j, a, b] => {
            let rest = format!("{a}.{b}");
            match (*kind, num(j)?) {
                ("attentions", 0) => Some(format!("middle_block.1.{rest}")),
                ("resnets", j @ 0..=1) => Some(format!("middle_block.{}.{}", 2 * j, resnet_to_ldm(&rest)?)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The diffusers key of an original checkpoint key (without "model.diffusion_model.").
pub fn ldm_to_diffusers(key: &str, cfg: &UNetConfig) -> Option<String> {
    for (d, l) in TOP_LEVEL {
        if let Some(rest) = key.strip_prefix(&format!("{l}.")) {
            // "input_blocks.0.0" is conv_in only; other input_blocks fall through.
            return Some(format!("{d}.{rest}"));
        }
    }
    let lpb = cfg.layers_per_block;
    let p: Vec<&str> = key.splitn(4, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    match p.as_slice() {
        ["input_blocks", i, j, rest] => {
            let i = num(i)?;
            if i == 0 {
                return None;
            }
            let (b, l) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
            match (num(j)?, rest.strip_prefix("op.")) {
                (0, Some(r)) => Some(format!("down_blocks.{b}.downsamplers.0.conv.{r}")),
                (0, None) => Some(format!("down_blocks.{b}.resnets.{l}.{}", resnet_from_ldm(rest)?)),
                (1, None) => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
                _ => None,
            }
        }
        ["middle_block", j, a, b] => {
            let rest = format!("{a}.{b}");
            match num(j)? {
                0 => Some(format!("mid_block.resnets.0.{}", resnet_from_ldm(&rest)?)),
                1 => Some(format!("mid_block.attentions.0.{rest}")),
                2 => Some(format!("mid_block.resnets.1.{}", resnet_from_ldm(&rest)?)),
                _ => None,
            }
        }
        ["output_blocks", i, j, rest] => {
            let i = num(i)?;
            let (b, l) = (i / (lpb + 1), i % (lpb + 1));
            match (num(j)?, rest.strip_prefix("conv.")) {
                (0, _) => Some(format!("up_blocks.{b}.resnets.{l}.{}", resnet_from_ldm(rest)?)),
                (1 | 2, Some(r)) => Some(format!("up_blocks.{b}.upsamplers.0.conv.{r}")),
                (1, None) => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The UNet tensors of a single-file checkpoint under diffusers names. Keys outside
/// "model.diffusion_model." (VAE, text encoders) are dropped; UNet keys that map to nothing keep
/// their original name, so that they are reported as unexpected.
pub fn single_file_to_diffusers(tensors: BTreeMap<String, Tensor>, cfg: &UNetConfig) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (k, t) in tensors {
        let Some(rest) = k.strip_prefix(LDM_PREFIX) else { continue };
        match ldm_to_diffusers(rest, cfg) {
            Some(d) => out.insert(d, t),
            None => out.insert(k, t),
        };
    }
    out
}
