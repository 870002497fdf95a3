//! The UNet's attention: `Attention` (diffusers' Attention with the default SDPA processor),
//! `BasicTransformerBlock` (self-attention, cross-attention, GEGLU feed-forward) and
//! `Transformer2DModel` (group norm, linear projections in and out, residual).
//!
//! Two LCM-Lookahead mechanisms live here, per call and per layer (a layer is a transformer
//! block, named by its diffusers module path, e.g. "up_blocks.0.attentions.1.transformer_blocks.0"):
//! - extended self-attention (paper §4.3): attn1 can export the K/V it computes ([B, L, inner],
//!   before the head split, from its own to_k/to_v or from a separate K/V copy) into a `KvStore`,
//!   and can attend over [own K, V ; reference K, V] taken from another `KvStore` (the official
//!   decoder concatenates them along the token axis; flash attention reads both sources in place
//!   instead, with the same result);
//! - decoupled IP cross-attention (IP-Adapter): attn2 may carry to_k_ip/to_v_ip; the encoder
//!   hidden states are then [text tokens ; IP tokens] with the last `num_tokens` being the IP
//!   tokens, and the output is attn(q, text) + scale · attn(q, IP tokens), computed as one
//!   decoupled flash attention (two independent softmaxes in one pass over q).
//!
//! Every attention runs as `Var::flash_attention` (engine: flash attention with the log-sum-exp
//! kept for the backward), or `Var::flash_attention_decoupled` for IP cross-attention, over
//! [B, H, L, D] views of the projections, without copies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use autograd::Var;
use engine::{Error, Result, Tensor};

use crate::nn::{join, GroupNorm, LayerNorm, Linear, LoraScale, Module, Visitor};
use crate::weights::Weights;

/// One layer's K/V in a `KvStore`, with the reference tokens' keep mask when some are dropped.
#[derive(Clone)]
struct KvEntry {
    k: Var,
    v: Var,
    keep: Option<Tensor>,
}

/// Per-layer K/V, keyed by transformer-block name. Cloning shares it.
#[derive(Clone, Default)]
pub struct KvStore(Arc<Mutex<BTreeMap<String, KvEntry>>>);

impl KvStore {
    pub fn new() -> KvStore {
        KvStore::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, KvEntry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn insert(&self, layer: &str, k: Var, v: Var) {
        self.lock().insert(layer.to_string(), KvEntry { k, v, keep: None });
    }
    /// K/V [B, L, inner] whose tokens with `keep` [L] (u8) == 0 are not attended to when this
    /// store is another pass's reference (kv drop without copying the kept tokens out).
    pub fn insert_with_keep(&self, layer: &str, k: Var, v: Var, keep: Tensor) {
        self.lock().insert(layer.to_string(), KvEntry { k, v, keep: Some(keep) });
    }
    pub fn get(&self, layer: &str) -> Option<(Var, Var)> {
        self.lock().get(layer).map(|e| (e.k.clone(), e.v.clone()))
    }
    /// The keep mask stored with `layer`'s K/V, if any.
    pub fn keep(&self, layer: &str) -> Option<Tensor> {
        self.lock().get(layer).and_then(|e| e.keep.clone())
    }
    pub fn layers(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
    pub fn clear(&self) {
        self.lock().clear()
    }
}

/// What one forward call does beyond the plain UNet.
#[derive(Clone, Default)]
pub struct AttnExtras {
    /// Every self-attention writes its K/V here under its layer name.
    pub kv_capture: Option<KvStore>,
    /// Self-attention layers found here attend over [own K/V ; these K/V].
    pub kv_reference: Option<KvStore>,
}

/// IP-Adapter's decoupled cross-attention projections on one attn2.
#[derive(Clone, Debug)]
pub struct IpProjection {
    pub to_k_ip: Linear,
    pub to_v_ip: Linear,
    /// How many trailing encoder tokens are IP tokens.
    pub num_tokens: usize,
    /// Shared by every layer: one `set` changes the whole model.
    pub scale: LoraScale,
}

/// diffusers `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias), SDPA with scale
/// 1/sqrt(head_dim).
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub ip: Option<IpProjection>,
    /// Separate K/V projections whose output is exported instead of to_k/to_v's (the KV-encoder's
    /// "KV copy", which trains its own LoRA).
    pub kv_copy: Option<(Linear, Linear)>,
}

/// [B, L, H·D] -> [B, H, L, D].
fn split_heads(x: &Var, heads: usize) -> Result<Var> {
    let s = x.shape();
    if s.len() != 3 || heads == 0 || !s[2].is_multiple_of(heads) {
        return Err(Error::BadShape { op: "attention", msg: format!("expected [B, L, heads*dim] with {heads} heads"), shape: s.to_vec() });
    }
    x.reshape(&[s[0], s[1], heads, s[2] / heads])?.permute(&[0, 2, 1, 3])
}

/// [B, H, L, D] -> [B, L, H·D] (a view when x is [B, L, H, D] memory, as flash attention's
/// output is).
fn merge_heads(x: &Var) -> Result<Var> {
    let s = x.shape().to_vec();
    x.permute(&[0, 2, 1, 3])?.contiguous()?.reshape(&[s[0], s[2], s[1] * s[3]])
}

impl Attention {
    pub fn load(w: &Weights, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Attention> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&w.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            ip: None,
            kv_copy: None,
        })
    }

    /// Multi-head attention of q [B, Lq, inner] over k/v [B or 1, Lk, inner] and the optional
    /// reference K/V [B, Lr, inner] (extended attention over [own ; reference]), scale
    /// 1/sqrt(head dim); [B, Lq, inner].
    fn attend(&self, q: &Var, k: &Var, v: &Var, reference: Option<(&Var, &Var)>, keep: Option<&Tensor>) -> Result<Var> {
        let q = split_heads(q, self.heads)?;
        let (k, v) = self.kv_heads(k, v, q.shape()[0])?;
        let reference = match reference {
            Some((rk, rv)) => Some((split_heads(rk, self.heads)?, split_heads(rv, self.heads)?)),
            None => None,
        };
        let scale = 1.0 / (q.shape()[3] as f32).sqrt();
        let o = Var::flash_attention(&q, &k, &v, reference.as_ref().map(|(rk, rv)| (rk, rv)), keep, scale)?;
        merge_heads(&o)
    }

    /// K/V projections [B or 1, L, inner] as [B, H, L, D] views for `b` queries' batch: a context
    /// shared by the batch ([1, L, inner]) is read through a stride-0 view.
    fn kv_heads(&self, k: &Var, v: &Var, b: usize) -> Result<(Var, Var)> {
        let (k, v) = (split_heads(k, self.heads)?, split_heads(v, self.heads)?);
        if k.shape()[0] == 1 && b != 1 {
            let to = |t: &Var| t.broadcast_to(&[b, t.shape()[1], t.shape()[2], t.shape()[3]]);
            return Ok((to(&k)?, to(&v)?));
        }
        Ok((k, v))
    }

    /// Self-attention of `x` [B, L, C] for layer `layer`, with K/V export and reference K/V.
    pub fn forward_self(&self, x: &Var, layer: &str, extras: &AttnExtras) -> Result<Var> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(x)?;
        let v = self.to_v.forward(x)?;
        if let Some(sink) = &extras.kv_capture {
            match &self.kv_copy {
                Some((ck, cv)) => sink.insert(layer, ck.forward(x)?, cv.forward(x)?),
                None => sink.insert(layer, k.clone(), v.clone()),
            }
        }
        if let Some((rk, rv)) = extras.kv_reference.as_ref().and_then(|r| r.get(layer)) {
            if rk.rank() != 3 || rk.shape()[0] != k.shape()[0] || rk.shape()[2] != k.shape()[2] || rk.shape() != rv.shape() {
                return Err(Error::msg(format!(
                    "extended attention at {layer}: reference K {:?} / V {:?} do not fit own K {:?} ([B, L_ref, inner] with the same B and inner)",
                    rk.shape(),
                    rv.shape(),
                    k.shape()
                )));
            }
            let (rk, rv) = (rk.to_dtype(k.dtype())?, rv.to_dtype(v.dtype())?);
            let keep = extras.kv_reference.as_ref().and_then(|r| r.keep(layer));
            return self.to_out.forward(&self.attend(&q, &k, &v, Some((&rk, &rv)), keep.as_ref())?);
        }
        self.to_out.forward(&self.attend(&q, &k, &v, None, None)?)
    }

    /// Cross-attention of `x` over `context` [B, L_ctx, C_ctx]; with IP projections the last
    /// `num_tokens` context tokens go through them instead.
    pub fn forward_cross(&self, x: &Var, context: &Var) -> Result<Var> {
        let q = self.to_q.forward(x)?;
        let o = match &self.ip {
            None => self.attend(&q, &self.to_k.forward(context)?, &self.to_v.forward(context)?, None, None)?,
            Some(ip) => {
                let l = context.shape()[1];
                if ip.num_tokens > l {
                    return Err(Error::msg(format!("IP cross-attention: {} IP tokens expected but the context has only {l} tokens", ip.num_tokens)));
                }
                let end = l - ip.num_tokens;
                let text = context.narrow(1, 0, end)?;
                let toks = context.narrow(1, end, ip.num_tokens)?;
                let (k, v) = (self.to_k.forward(&text)?, self.to_v.forward(&text)?);
                let s = ip.scale.get();
                if s == 0.0 {
                    // The IP tokens do not count: no IP projections, no second softmax.
                    self.attend(&q, &k, &v, None, None)?
                } else {
                    // attn(q, text) + s attn(q, IP tokens) in one pass over q.
                    let q = split_heads(&q, self.heads)?;
                    let b = q.shape()[0];
                    let (k1, v1) = self.kv_heads(&k, &v, b)?;
                    let (k2, v2) = self.kv_heads(&ip.to_k_ip.forward(&toks)?, &ip.to_v_ip.forward(&toks)?, b)?;
                    let scale = 1.0 / (q.shape()[3] as f32).sqrt();
                    merge_heads(&Var::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, s, scale)?)?
                }
            }
        };
        self.to_out.forward(&o)
    }
}

impl Module for Attention {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.to_q.visit(&join(prefix, "to_q"), v);
        self.to_k.visit(&join(prefix, "to_k"), v);
        self.to_v.visit(&join(prefix, "to_v"), v);
        self.to_out.visit(&join(prefix, "to_out.0"), v);
        if let Some(ip) = &mut self.ip {
            ip.to_k_ip.visit(&join(prefix, "to_k_ip"), v);
            ip.to_v_ip.visit(&join(prefix, "to_v_ip"), v);
        }
        if let Some((k, vv)) = &mut self.kv_copy {
            k.visit(&join(prefix, "kv_copy.to_k"), v);
            vv.visit(&join(prefix, "kv_copy.to_v"), v);
        }
    }
}

/// diffusers BasicTransformerBlock (layer_norm type, GEGLU feed-forward with 4x inner width).
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    /// The block's module path: the key of its K/V in a `KvStore`.
    pub name: String,
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    /// ff.net.0.proj: dim -> 2·4·dim (GEGLU), ff.net.2: 4·dim -> dim.
    pub ff_in: Linear,
    pub ff_out: Linear,
}

impl BasicTransformerBlock {
    /// `w` is the block's view; `name` its full module path.
    pub fn load(w: &Weights, name: &str, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<BasicTransformerBlock> {
        let ff_inner = 4 * dim;
        Ok(BasicTransformerBlock {
            name: name.to_string(),
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::load(&w.pp("ff.net.0.proj"), dim, 2 * ff_inner, true)?,
            ff_out: Linear::load(&w.pp("ff.net.2"), ff_inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Var, context: &Var, extras: &AttnExtras) -> Result<Var> {
        let x = x.add(&self.attn1.forward_self(&self.norm1.forward(x)?, &self.name, extras)?)?;
        let x = x.add(&self.attn2.forward_cross(&self.norm2.forward(&x)?, context)?)?;
        let h = self.ff_out.forward(&self.ff_in.forward(&self.norm3.forward(&x)?)?.geglu()?)?;
        x.add(&h)
    }
}

impl Module for BasicTransformerBlock {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.norm1.visit(&join(prefix, "norm1"), v);
        self.attn1.visit(&join(prefix, "attn1"), v);
        self.norm2.visit(&join(prefix, "norm2"), v);
        self.attn2.visit(&join(prefix, "attn2"), v);
        self.norm3.visit(&join(prefix, "norm3"), v);
        self.ff_in.visit(&join(prefix, "ff.net.0.proj"), v);
        self.ff_out.visit(&join(prefix, "ff.net.2"), v);
    }
}

/// diffusers Transformer2DModel with use_linear_projection (SDXL): GroupNorm(eps 1e-6), tokens,
/// proj_in, blocks, proj_out, back to NCHW, plus the input.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Linear,
}

impl Transformer2DModel {
    /// `name` is the module path of this Transformer2DModel (blocks are `name.transformer_blocks.i`).
    #[allow(clippy::too_many_arguments)]
    pub fn load(w: &Weights, name: &str, channels: usize, heads: usize, depth: usize, context_dim: usize, groups: usize) -> Result<Transformer2DModel> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            return Err(Error::msg(format!("{name}: {channels} channels do not split into {heads} heads")));
        }
        let head_dim = channels / heads;
        let blocks = (0..depth)
            .map(|i| {
                let sub = format!("transformer_blocks.{i}");
                BasicTransformerBlock::load(&w.pp(&sub), &join(name, &sub), channels, heads, head_dim, context_dim)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&w.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Linear::load(&w.pp("proj_in"), channels, channels, true)?,
            blocks,
            proj_out: Linear::load(&w.pp("proj_out"), channels, channels, true)?,
        })
    }

    pub fn forward(&self, x: &Var, context: &Var, extras: &AttnExtras) -> Result<Var> {
        let [b, c, h, w]: [usize; 4] = x.shape().try_into().map_err(|_| Error::BadShape { op: "Transformer2DModel", msg: "expected NCHW".into(), shape: x.shape().to_vec() })?;
        let t = self.norm.forward(x)?.permute(&[0, 2, 3, 1])?.contiguous()?.reshape(&[b, h * w, c])?;
        let mut t = self.proj_in.forward(&t)?;
        for blk in &self.blocks {
            t = blk.forward(&t, context, extras)?;
        }
        let t = self.proj_out.forward(&t)?.reshape(&[b, h, w, c])?.permute(&[0, 3, 1, 2])?;
        t.add(x)
    }
}

impl Module for Transformer2DModel {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.norm.visit(&join(prefix, "norm"), v);
        self.proj_in.visit(&join(prefix, "proj_in"), v);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit(&join(prefix, format!("transformer_blocks.{i}")), v);
        }
        self.proj_out.visit(&join(prefix, "proj_out"), v);
    }
}
