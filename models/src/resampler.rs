//! IP-Adapter Plus's image projection: the perceiver Resampler (tencent-ailab/IP-Adapter
//! ip_adapter/resampler.py). `num_queries` learned latents attend over [image features ; latents]
//! in `depth` PerceiverAttention + FeedForward layers (pre-norm, residual), then proj_out and
//! norm_out. For IP-Adapter Plus-Face SDXL: dim 1280, depth 4, dim_head 64, heads 20, 16 queries,
//! embedding_dim 1280 (ViT-H's width), output_dim 2048 (the UNet's cross-attention width), ff_mult 4.
//!
//! Key names are the module's state dict (the `image_proj` part of an IP-Adapter file): `latents`
//! [1, Q, dim], `proj_in`, `proj_out`, `norm_out`, `layers.N.0.{norm1,norm2,to_q,to_kv,to_out}`,
//! `layers.N.1.{0 (LayerNorm), 1, 3 (Linear, no bias)}`. The reference scales q and k by
//! dim_head^-1/4 each before q·kᵀ, which is attention with scale 1/sqrt(dim_head).

use autograd::Var;
use engine::{Error, Result};

use crate::nn::{frozen, join, LayerNorm, Linear, Module, Visitor};
use crate::weights::Weights;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResamplerConfig {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_queries: usize,
    pub embedding_dim: usize,
    pub output_dim: usize,
    pub ff_mult: usize,
}

impl ResamplerConfig {
    /// IP-Adapter Plus(-Face) SDXL with the ViT-H image encoder.
    pub fn plus_face_sdxl() -> ResamplerConfig {
        ResamplerConfig { dim: 1280, depth: 4, dim_head: 64, heads: 20, num_queries: 16, embedding_dim: 1280, output_dim: 2048, ff_mult: 4 }
    }
}

#[derive(Clone, Debug)]
struct PerceiverAttention {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
}

impl PerceiverAttention {
    fn load(w: &Weights, c: &ResamplerConfig) -> Result<PerceiverAttention> {
        let inner = c.dim_head * c.heads;
        Ok(PerceiverAttention {
            norm1: LayerNorm::load(&w.pp("norm1"), c.dim, 1e-5)?,
            norm2: LayerNorm::load(&w.pp("norm2"), c.dim, 1e-5)?,
            to_q: Linear::load(&w.pp("to_q"), c.dim, inner, false)?,
            to_kv: Linear::load(&w.pp("to_kv"), c.dim, 2 * inner, false)?,
            to_out: Linear::load(&w.pp("to_out"), inner, c.dim, false)?,
            heads: c.heads,
        })
    }

    /// x: image features [B, N, dim]; latents [B, Q, dim].
    fn forward(&self, x: &Var, latents: &Var) -> Result<Var> {
        let x = self.norm1.forward(x)?;
        let latents = self.norm2.forward(latents)?;
        let (b, q_len) = (latents.shape()[0], latents.shape()[1]);
        let q = self.to_q.forward(&latents)?;
        let kv = self.to_kv.forward(&Var::cat(&[&x, &latents], 1)?)?;
        let inner = q.shape()[2];
        let (k, v) = (kv.narrow(2, 0, inner)?, kv.narrow(2, inner, inner)?);
        let heads = |t: &Var| -> Result<Var> {
            let l = t.shape()[1];
            t.reshape(&[b, l, self.heads, inner / self.heads])?.transpose(1, 2)
        };
        let o = Var::scaled_dot_product_attention(&heads(&q)?, &heads(&k.contiguous()?)?, &heads(&v.contiguous()?)?, None, None)?;
        let o = o.transpose(1, 2)?.contiguous()?.reshape(&[b, q_len, inner])?;
        self.to_out.forward(&o)
    }
}

impl Module for PerceiverAttention {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.norm1.visit(&join(prefix, "norm1"), v);
        self.norm2.visit(&join(prefix, "norm2"), v);
        self.to_q.visit(&join(prefix, "to_q"), v);
        self.to_kv.visit(&join(prefix, "to_kv"), v);
        self.to_out.visit(&join(prefix, "to_out"), v);
    }
}

/// LayerNorm, Linear (no bias), GELU, Linear (no bias).
#[derive(Clone, Debug)]
struct FeedForward {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    fn load(w: &Weights, c: &ResamplerConfig) -> Result<FeedForward> {
        let inner = c.dim * c.ff_mult;
        Ok(FeedForward { norm: LayerNorm::load(&w.pp("0"), c.dim, 1e-5)?, fc1: Linear::load(&w.pp("1"), c.dim, inner, false)?, fc2: Linear::load(&w.pp("3"), inner, c.dim, false)? })
    }
    fn forward(&self, x: &Var) -> Result<Var> {
        self.fc2.forward(&self.fc1.forward(&self.norm.forward(x)?)?.gelu()?)
    }
}

impl Module for FeedForward {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.norm.visit(&join(prefix, "0"), v);
        self.fc1.visit(&join(prefix, "1"), v);
        self.fc2.visit(&join(prefix, "3"), v);
    }
}

/// The perceiver Resampler.
#[derive(Clone, Debug)]
pub struct Resampler {
    pub config: ResamplerConfig,
    pub latents: Var,
    proj_in: Linear,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

impl Resampler {
    /// From `w` (the `image_proj` view of an IP-Adapter file).
    pub fn load(w: &Weights, config: ResamplerConfig) -> Result<Resampler> {
        if config.heads == 0 || config.dim_head == 0 || config.num_queries == 0 {
            return Err(Error::msg(format!("Resampler: heads, dim_head and num_queries must be positive ({config:?})")));
        }
        let layers = (0..config.depth)
            .map(|i| {
                let l = w.pp("layers").pp(i);
                Ok((PerceiverAttention::load(&l.pp("0"), &config)?, FeedForward::load(&l.pp("1"), &config)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Resampler {
            latents: frozen(w.get("latents", &[1, config.num_queries, config.dim])?),
            proj_in: Linear::load(&w.pp("proj_in"), config.embedding_dim, config.dim, true)?,
            layers,
            proj_out: Linear::load(&w.pp("proj_out"), config.dim, config.output_dim, true)?,
            norm_out: LayerNorm::load(&w.pp("norm_out"), config.output_dim, 1e-5)?,
            config,
        })
    }

    /// Image features [B, N, embedding_dim] -> IP tokens [B, num_queries, output_dim].
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let s = x.shape();
        if s.len() != 3 || s[2] != self.config.embedding_dim {
            return Err(Error::BadShape { op: "Resampler::forward", msg: format!("expected [B, N, {}]", self.config.embedding_dim), shape: s.to_vec() });
        }
        let b = s[0];
        let dtype = self.latents.dtype();
        let mut latents = self.latents.broadcast_to(&[b, self.config.num_queries, self.config.dim])?;
        let x = self.proj_in.forward(&x.to_dtype(dtype)?)?;
        for (attn, ff) in &self.layers {
            latents = attn.forward(&x, &latents)?.add(&latents)?;
            latents = ff.forward(&latents)?.add(&latents)?;
        }
        self.norm_out.forward(&self.proj_out.forward(&latents)?)
    }
}

impl Module for Resampler {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.param(&join(prefix, "latents"), &mut self.latents);
        self.proj_in.visit(&join(prefix, "proj_in"), v);
        for (i, (a, f)) in self.layers.iter_mut().enumerate() {
            a.visit(&join(prefix, format!("layers.{i}.0")), v);
            f.visit(&join(prefix, format!("layers.{i}.1")), v);
        }
        self.proj_out.visit(&join(prefix, "proj_out"), v);
        self.norm_out.visit(&join(prefix, "norm_out"), v);
    }
}
