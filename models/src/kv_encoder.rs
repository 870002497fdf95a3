//! The KV-encoder UNet of LCM-Lookahead (paper §4.3; OrLichter/lcm-lookahead
//! model/encoder_unet.py): a copy of the SDXL UNet that runs the noised conditioning image only as
//! far as its last attention (up_blocks[1] in SDXL) and exports, from every transformer block, K/V
//! computed by a separate "KV copy" extractor from that block's post-norm1 hidden states. The
//! decoder (the plain UNet) appends those K/V to its own in each of its self-attention layers
//! (70 in SDXL) through `AttnExtras::kv_reference`.
//!
//! As in the official code:
//! - the extractor's to_k/to_v start as copies of the block's attn1 to_k/to_v and stay frozen;
//!   LoRA (rank 4) on them is what trains ("kv_copy" adapter);
//! - LoRA (rank 4) on the encoder's attn1 and attn2 to_q, to_k, to_v, to_out.0 ("encoder"
//!   adapter), except on the last block run: nothing after its extraction point reaches an
//!   exported K/V, so LoRA there would get no gradient;
//! - LoRA layers start as diffusers' LoRALinearLayer: down ~ N(0, (1/rank)²), up = 0 (so a fresh
//!   encoder exports exactly the frozen projections), multiplier 1;
//! - the encoder's cross-attention sees the text only (the IP tokens reach the decoder's
//!   decoupled cross-attention), so the copy drops any IP projections;
//! - the conditioning latents are noised with the same noise and timestep as the target
//!   (`add_noise` twice with the same arguments);
//! - during training each layer's reference tokens are dropped with probability p, the same
//!   tokens for the whole batch (`drop_kv_tokens`).

use std::collections::BTreeMap;

use autograd::Var;
use engine::{DType, Device, Error, Result, Tensor};

use crate::attention::{AttnExtras, KvStore};
use crate::nn::{frozen, LoraAdapter, LoraHost, LoraScale, Linear, Module, Visitor};
use crate::unet::{UNet2DConditionModel, UNetCond};

/// The adapter names of the two LoRA sets.
pub const ENCODER_LORA: &str = "encoder";
pub const KV_COPY_LORA: &str = "kv_copy";

/// The KV-encoder: a UNet copy with K/V extractors and LoRA.
pub struct KvEncoder {
    pub unet: UNet2DConditionModel,
    /// The last up block run (the last one with attentions).
    pub last_up: usize,
    /// Run-time multiplier of the encoder LoRA (attn1/attn2).
    pub encoder_scale: LoraScale,
    /// Run-time multiplier of the extractor LoRA.
    pub kv_copy_scale: LoraScale,
}

/// A fresh LoRA pair for a linear layer [out, in]: down ~ N(0, 1/rank²) drawn with `seed`, up zeros,
/// both trainable f32 master copies.
fn new_lora(name: &str, in_f: usize, out_f: usize, rank: usize, seed: u64, device: Device, scale: &LoraScale) -> Result<LoraAdapter> {
    let down = Tensor::randn(&[rank, in_f], DType::F32, device, seed)?.mul_scalar(1.0 / rank as f32)?;
    let up = Tensor::zeros(&[out_f, rank], DType::F32, device)?;
    Ok(LoraAdapter { name: name.to_string(), down: Var::leaf(down, true), up: Var::leaf(up, true), alpha_over_rank: 1.0, scale: scale.clone() })
}

impl KvEncoder {
    /// Copies `base` (sharing its frozen weights) into a KV-encoder with rank-`rank` LoRA whose
    /// down projections are drawn from `seed`.
    pub fn new(base: &UNet2DConditionModel, rank: usize, seed: u64) -> Result<KvEncoder> {
        if rank == 0 {
            return Err(Error::msg("KvEncoder: LoRA rank must be positive"));
        }
        let mut unet = base.clone();
        unet.clear_ip_adapter();
        let last_up = unet.up_blocks.iter().rposition(|u| !u.attentions.is_empty()).ok_or_else(|| Error::msg("KvEncoder: the UNet has no up block with attention"))?;
        let names = unet.transformer_block_names();
        let run_last = unet.up_blocks[last_up].attentions.last().and_then(|t| t.blocks.last()).map(|b| b.name.clone());
        let encoder_scale = LoraScale::new(1.0);
        let kv_copy_scale = LoraScale::new(1.0);
        let device = unet.conv_in.weight.device();
        let mut n = 0u64;
        let mut next_seed = || {
            n += 1;
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(n)
        };
        for blk in unet.transformer_blocks_mut() {
            let a1 = &mut blk.attn1;
            let (ck, cv) = (Linear::new(frozen(a1.to_k.weight.value().clone()), None), Linear::new(frozen(a1.to_v.weight.value().clone()), None));
            let mut copy = (ck, cv);
            for l in [&mut copy.0, &mut copy.1] {
                let a = new_lora(KV_COPY_LORA, l.in_features(), l.out_features(), rank, next_seed(), device, &kv_copy_scale)?;
                l.add_lora(a)?;
            }
            a1.kv_copy = Some(copy);
            if Some(&blk.name) == run_last.as_ref() {
                continue;
            }
            for attn in [&mut blk.attn1, &mut blk.attn2] {
                for l in [&mut attn.to_q, &mut attn.to_k, &mut attn.to_v, &mut attn.to_out] {
                    let a = new_lora(ENCODER_LORA, l.in_features(), l.out_features(), rank, next_seed(), device, &encoder_scale)?;
                    l.add_lora(a)?;
                }
            }
        }
        debug_assert_eq!(names.len(), unet.transformer_block_names().len());
        Ok(KvEncoder { unet, last_up, encoder_scale, kv_copy_scale })
    }

    /// Runs the (noised) conditioning latents through the copy up to its last attention and returns
    /// every transformer block's extracted K/V ([B, L, inner] each, keyed by block name).
    /// `cond.encoder_hidden_states` is the text conditioning only (no IP tokens).
    pub fn forward(&self, sample: &Var, timesteps: &Tensor, cond: &UNetCond) -> Result<KvStore> {
        let store = KvStore::new();
        let extras = AttnExtras { kv_capture: Some(store.clone()), kv_reference: None };
        self.unet.forward_through(sample, timesteps, cond, &extras, Some(self.last_up))?;
        Ok(store)
    }

    /// The trainable parameters (both LoRA sets) by name, as `Module::visit` names them
    /// (e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn1.kv_copy.to_k.lora.kv_copy.down`).
    pub fn trainable_parameters(&mut self) -> Vec<(String, Var)> {
        struct Collect(Vec<(String, Var)>);
        impl Visitor for Collect {
            fn param(&mut self, name: &str, p: &mut Var) {
                if p.requires_grad() {
                    self.0.push((name.to_string(), p.clone()));
                }
            }
        }
        let mut c = Collect(Vec::new());
        self.unet.visit("", &mut c);
        c.0
    }

    /// The trainable parameters' values by name (a checkpoint of the encoder).
    pub fn state_dict(&mut self) -> BTreeMap<String, Tensor> {
        self.trainable_parameters().into_iter().map(|(k, v)| (k, v.value().clone())).collect()
    }

    /// Replaces the trainable parameters with `tensors` (names as `state_dict`); every trainable
    /// parameter must be given with its shape, and no other name: errors list the offenders.
    pub fn load_state_dict(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        struct Load<'a> {
            tensors: &'a BTreeMap<String, Tensor>,
            bad: Vec<String>,
        }
        impl Visitor for Load<'_> {
            fn param(&mut self, name: &str, p: &mut Var) {
                if !p.requires_grad() {
                    return;
                }
                let Some(t) = self.tensors.get(name) else { return };
                match t.to_dtype(p.dtype()).and_then(|t| t.to_device(p.device())) {
                    Ok(t) => *p = Var::leaf(t, true),
                    Err(e) => self.bad.push(format!("{name}: {e}")),
                }
            }
        }
        // Check first so that a failed load leaves the encoder unchanged.
        let mut names = self.trainable_parameters();
        let known: std::collections::BTreeSet<String> = names.drain(..).map(|(k, _)| k).collect();
        let unexpected: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
        let missing: Vec<&String> = known.iter().filter(|k| !tensors.contains_key(*k)).collect();
        let shapes: Vec<String> = self
            .trainable_parameters()
            .iter()
            .filter_map(|(k, v)| tensors.get(k).filter(|t| t.shape() != v.shape()).map(|t| format!("{k}: expected {:?} found {:?}", v.shape(), t.shape())))
            .collect();
        if !unexpected.is_empty() || !missing.is_empty() || !shapes.is_empty() {
            let list = |v: Vec<String>| v.join(", ");
            return Err(Error::msg(format!(
                "KV-encoder state: {} missing ({}), {} unexpected ({}), {} wrong shape ({})",
                missing.len(),
                list(missing.into_iter().cloned().collect()),
                unexpected.len(),
                list(unexpected.into_iter().cloned().collect()),
                shapes.len(),
                list(shapes)
            )));
        }
        let mut l = Load { tensors, bad: Vec::new() };
        self.unet.visit("", &mut l);
        if !l.bad.is_empty() {
            return Err(Error::msg(format!("KV-encoder state: {}", l.bad.join("; "))));
        }
        Ok(())
    }
}

/// Drops each layer's reference tokens with probability `p`: one uniform draw per token (Philox,
/// `seed` and the layer's index), the same tokens for every batch row, as the official drop_kvs.
/// A layer that loses all its tokens is left out of the returned store (attention over its own
/// tokens only). The kept tokens are copied out (index_select); `mask_kv_tokens` drops the same
/// tokens with a keep mask instead.
pub fn drop_kv_tokens(store: &KvStore, p: f32, seed: u64) -> Result<KvStore> {
    check_drop_probability(p)?;
    let out = KvStore::new();
    for (i, layer) in store.layers().iter().enumerate() {
        let Some((k, v)) = store.get(layer) else { continue };
        let Some(keep) = kept_tokens(k.shape()[1], p, seed, i)? else {
            out.insert(layer, k, v);
            continue;
        };
        let kept: Vec<i64> = keep.iter().enumerate().filter(|(_, &x)| x).map(|(j, _)| j as i64).collect();
        if kept.is_empty() {
            continue;
        }
        let n = kept.len();
        let idx = Tensor::from_vec(kept, &[n], Device::Cpu)?.to_device(k.device())?;
        out.insert(layer, k.index_select(1, &idx)?, v.index_select(1, &idx)?);
    }
    Ok(out)
}

/// The tokens `drop_kv_tokens` drops, left in place with a keep mask [L] (u8) that the flash
/// attention kernel applies: no copy of the kept K/V, and dropped tokens get zero gradients.
pub fn mask_kv_tokens(store: &KvStore, p: f32, seed: u64) -> Result<KvStore> {
    check_drop_probability(p)?;
    let out = KvStore::new();
    for (i, layer) in store.layers().iter().enumerate() {
        let Some((k, v)) = store.get(layer) else { continue };
        match kept_tokens(k.shape()[1], p, seed, i)? {
            None => out.insert(layer, k, v),
            Some(keep) if keep.iter().any(|&x| x) => {
                let l = keep.len();
                let mask = Tensor::from_vec(keep.into_iter().map(u8::from).collect::<Vec<u8>>(), &[l], Device::Cpu)?.to_device(k.device())?;
                out.insert_with_keep(layer, k, v, mask);
            }
            Some(_) => {}
        }
    }
    Ok(out)
}

fn check_drop_probability(p: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::msg(format!("kv drop: probability {p} outside [0, 1]")));
    }
    Ok(())
}

/// Which of a layer's `l` tokens survive a drop with probability `p` (None: p = 0, all of them).
fn kept_tokens(l: usize, p: f32, seed: u64, layer_index: usize) -> Result<Option<Vec<bool>>> {
    if p == 0.0 {
        return Ok(None);
    }
    let u = Tensor::rand(&[l], DType::F32, Device::Cpu, seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(layer_index as u64))?.to_vec_f32()?;
    Ok(Some(u.iter().map(|&x| x > p).collect()))
}

/// SDXL's training noise schedule: "scaled_linear" betas from 0.00085 to 0.012 over `steps`
/// (1000), cumulative products of 1 - beta, in f32 as diffusers computes them.
pub fn scaled_linear_alphas_cumprod(steps: usize, beta_start: f32, beta_end: f32) -> Vec<f32> {
    let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
    let mut acc = 1.0f32;
    (0..steps)
        .map(|i| {
            let s = if steps > 1 { a + (b - a) * i as f32 / (steps - 1) as f32 } else { a };
            acc *= 1.0 - s * s;
            acc
        })
        .collect()
}

/// DDPM forward noising (diffusers' add_noise): sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise per batch row.
/// The KV-encoder's conditioning latents take the same `noise` and `timesteps` as the target.
pub fn add_noise(x0: &Var, noise: &Var, alphas_cumprod: &[f32], timesteps: &[usize]) -> Result<Var> {
    let b = x0.shape()[0];
    if timesteps.len() != b || x0.shape() != noise.shape() {
        return Err(Error::msg(format!("add_noise: {} timesteps, latents {:?} and noise {:?} (one timestep per row, equal shapes)", timesteps.len(), x0.shape(), noise.shape())));
    }
    let mut sa = Vec::with_capacity(b);
    let mut sb = Vec::with_capacity(b);
    for &t in timesteps {
        let a = *alphas_cumprod.get(t).ok_or_else(|| Error::msg(format!("add_noise: timestep {t} beyond the schedule's {} steps", alphas_cumprod.len())))?;
        sa.push(a.sqrt());
        sb.push((1.0 - a).sqrt());
    }
    let mut shape = vec![1usize; x0.rank()];
    shape[0] = b;
    let col = |v: Vec<f32>| -> Result<Var> { Ok(Var::constant(Tensor::from_f32_vec(v, &shape, x0.dtype())?.to_device(x0.device())?)) };
    x0.mul(&col(sa)?)?.add(&noise.to_dtype(x0.dtype())?.mul(&col(sb)?)?)
}
