//! The layers every model is built from — Linear, Conv2d, GroupNorm, LayerNorm, Embedding — over
//! `autograd::Var`, so the same modules run inference (under `autograd::no_grad`) and train.
//!
//! LoRA is part of Linear and Conv2d, not a wrapper: a layer holds a list of adapters, each a down
//! projection A ([r, in], or a [r, C, kh, kw] convolution) and an up projection B ([out, r], or a
//! 1x1 convolution), a fixed α/r factor and a shared run-time multiplier (`LoraScale`) that can be
//! changed between calls without reloading. y = base(x) + Σ multiplier·(α/r)·B(A(x)). An adapter
//! can be fused into the weight (W += s·B·A) and unfused again (with the scale it was fused at).
//!
//! Modules expose their parameters and LoRA hosts by name through `Module::visit`, which loaders
//! (LoRA files) and the trainer (choosing what trains) use.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use autograd::Var;
use engine::{Conv2dParams, DType, Error, Result, Tensor};

use crate::weights::Weights;

/// A frozen parameter (no gradient is ever allocated for it).
pub fn frozen(t: Tensor) -> Var {
    Var::leaf(t, false)
}

/// The run-time multiplier of a LoRA adapter, shared by every layer the adapter touches so that
/// one `set` changes the whole model. Cloning shares it.
#[derive(Clone, Debug)]
pub struct LoraScale(Arc<AtomicU32>);

impl LoraScale {
    pub fn new(v: f32) -> LoraScale {
        LoraScale(Arc::new(AtomicU32::new(v.to_bits())))
    }
    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
    pub fn set(&self, v: f32) {
        self.0.store(v.to_bits(), Ordering::Relaxed)
    }
}

/// One LoRA adapter on one layer.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// A: [r, in] for a Linear, [r, C/groups, kh, kw] for a Conv2d.
    pub down: Var,
    /// B: [out, r] for a Linear, [out, r, 1, 1] for a Conv2d.
    pub up: Var,
    /// α / r (1 when the file gives no α).
    pub alpha_over_rank: f32,
    pub scale: LoraScale,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.down.shape()[0]
    }
    /// The factor the adapter's output is multiplied by now.
    pub fn effective_scale(&self) -> f32 {
        self.alpha_over_rank * self.scale.get()
    }
    /// B·A as a weight delta of `shape` (the layer's weight shape), computed in f32, times `s`.
    fn delta(&self, shape: &[usize], s: f32) -> Result<Tensor> {
        let r = self.rank();
        let a = self.down.value().to_dtype(DType::F32)?.reshape(&[r, self.down.elem_count() / r.max(1)])?;
        let b = self.up.value().to_dtype(DType::F32)?.reshape(&[shape[0], r])?;
        b.matmul(&a)?.mul_scalar(s)?.reshape(shape)
    }
}

/// A layer that can carry LoRA adapters.
pub trait LoraHost {
    /// The layer's weight shape ([out, in] or [out, C/groups, kh, kw]).
    fn weight_shape(&self) -> Vec<usize>;
    /// Adds an adapter; its A/B shapes must fit the layer.
    fn add_lora(&mut self, adapter: LoraAdapter) -> Result<()>;
    /// Removes the adapter `name` (unfusing it first if fused); false if absent.
    fn remove_lora(&mut self, name: &str) -> Result<bool>;
    fn loras(&self) -> &[LoraAdapter];
    /// W += s·B·A with the adapter's current effective scale; the forward then skips it.
    fn fuse_lora(&mut self, name: &str) -> Result<()>;
    /// Undoes `fuse_lora` (subtracting the delta it added).
    fn unfuse_lora(&mut self, name: &str) -> Result<()>;
}

/// Sees a module's parameters and LoRA hosts by their full names.
pub trait Visitor {
    fn param(&mut self, _name: &str, _p: &mut Var) {}
    fn lora_host(&mut self, _name: &str, _h: &mut dyn LoraHost) {}
}

/// A module: walks its parameters and LoRA hosts under `prefix` (diffusers' module names).
pub trait Module {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor);
}

/// `prefix.name` (or `name` at the top).
pub fn join(prefix: &str, name: impl std::fmt::Display) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The adapters of a layer plus which of them are fused (and at which scale).
#[derive(Clone, Debug, Default)]
struct Loras {
    adapters: Vec<LoraAdapter>,
    fused: Vec<(String, f32)>,
}

impl Loras {
    fn is_fused(&self, name: &str) -> bool {
        self.fused.iter().any(|(n, _)| n == name)
    }
    fn find(&self, name: &str, op: &str) -> Result<&LoraAdapter> {
        self.adapters.iter().find(|a| a.name == name).ok_or_else(|| Error::msg(format!("{op}: no LoRA adapter named {name:?}")))
    }
    /// Adapters applied in the forward (not fused, non-zero scale).
    fn active(&self) -> impl Iterator<Item = (&LoraAdapter, f32)> {
        self.adapters.iter().filter(|a| !self.is_fused(&a.name)).map(|a| (a, a.effective_scale())).filter(|(_, s)| *s != 0.0)
    }
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        for a in &mut self.adapters {
            v.param(&join(prefix, format!("lora.{}.down", a.name)), &mut a.down);
            v.param(&join(prefix, format!("lora.{}.up", a.name)), &mut a.up);
        }
    }
}

fn fuse_into(weight: &mut Var, loras: &mut Loras, name: &str) -> Result<()> {
    if loras.is_fused(name) {
        return Err(Error::msg(format!("fuse_lora: adapter {name:?} is already fused")));
    }
    let a = loras.find(name, "fuse_lora")?;
    let s = a.effective_scale();
    let w = weight.value();
    let fused = w.to_dtype(DType::F32)?.add(&a.delta(w.shape(), s)?)?.to_dtype(w.dtype())?;
    *weight = Var::leaf(fused, weight.requires_grad());
    loras.fused.push((name.to_string(), s));
    Ok(())
}

fn unfuse_from(weight: &mut Var, loras: &mut Loras, name: &str) -> Result<()> {
    let Some(pos) = loras.fused.iter().position(|(n, _)| n == name) else {
        return Err(Error::msg(format!("unfuse_lora: adapter {name:?} is not fused")));
    };
    let s = loras.fused[pos].1;
    let a = loras.find(name, "unfuse_lora")?;
    let w = weight.value();
    let unfused = w.to_dtype(DType::F32)?.sub(&a.delta(w.shape(), s)?)?.to_dtype(w.dtype())?;
    *weight = Var::leaf(unfused, weight.requires_grad());
    loras.fused.remove(pos);
    Ok(())
}

fn remove(weight: &mut Var, loras: &mut Loras, name: &str) -> Result<bool> {
    if loras.is_fused(name) {
        unfuse_from(weight, loras, name)?;
    }
    let before = loras.adapters.len();
    loras.adapters.retain(|a| a.name != name);
    Ok(loras.adapters.len() != before)
}

fn check_new(loras: &Loras, adapter: &LoraAdapter, down: &[usize], up: &[usize], layer: &str) -> Result<()> {
    if loras.adapters.iter().any(|a| a.name == adapter.name) {
        return Err(Error::msg(format!("add_lora: the {layer} already has an adapter named {:?}", adapter.name)));
    }
    if adapter.down.shape() != down {
        return Err(Error::msg(format!("add_lora {:?} on a {layer}: expected down (A) {down:?} found {:?}", adapter.name, adapter.down.shape())));
    }
    if adapter.up.shape() != up {
        return Err(Error::msg(format!("add_lora {:?} on a {layer}: expected up (B) {up:?} found {:?}", adapter.name, adapter.up.shape())));
    }
    Ok(())
}

/// y = x W^T + b (+ LoRA), weight [out, in].
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
    loras: Loras,
}

impl Linear {
    pub fn new(weight: Var, bias: Option<Var>) -> Linear {
        Linear { weight, bias, loras: Loras::default() }
    }

    /// `weight` [out, in] and (if `bias`) `bias` [out] under `w`.
    pub fn load(w: &Weights, in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        let weight = frozen(w.get("weight", &[out_features, in_features])?);
        let bias = if bias { Some(frozen(w.get("bias", &[out_features])?)) } else { None };
        Ok(Linear::new(weight, bias))
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    pub fn forward(&self, x: &Var) -> Result<Var> {
        let mut active = self.loras.active();
        if let (Some((a, s)), None) = (active.next(), active.next()) {
            // One adapter (the usual case): the fused op adds the LoRA term inside the product that
            // writes y. An adapter kept in another dtype (f32 master weights on a bf16 base) is
            // cast to the base's dtype; the casts pass its gradients back.
            let dt = self.weight.dtype();
            return x.lora_linear(&self.weight, self.bias.as_ref(), &a.down.to_dtype(dt)?, &a.up.to_dtype(dt)?, s);
        }
        let mut y = x.linear(&self.weight, self.bias.as_ref())?;
        for (a, s) in self.loras.active() {
            let d = x.to_dtype(a.down.dtype())?.linear(&a.down, None)?.linear(&a.up, None)?.mul_scalar(s)?;
            y = y.add(&d.to_dtype(y.dtype())?)?;
        }
        Ok(y)
    }
}

/// The LoraHost methods shared by every layer whose LoRA deltas add to one `weight` and whose
/// adapters live in a `loras: Loras` field (only `add_lora`, which checks shapes, differs).
macro_rules! lora_host_over_weight {
    () => {
        fn weight_shape(&self) -> Vec<usize> {
            self.weight.shape().to_vec()
        }
        fn remove_lora(&mut self, name: &str) -> Result<bool> {
            remove(&mut self.weight, &mut self.loras, name)
        }
        fn loras(&self) -> &[LoraAdapter] {
            &self.loras.adapters
        }
        fn fuse_lora(&mut self, name: &str) -> Result<()> {
            fuse_into(&mut self.weight, &mut self.loras, name)
        }
        fn unfuse_lora(&mut self, name: &str) -> Result<()> {
            unfuse_from(&mut self.weight, &mut self.loras, name)
        }
    };
}

impl LoraHost for Linear {
    fn add_lora(&mut self, adapter: LoraAdapter) -> Result<()> {
        let r = adapter.rank();
        check_new(&self.loras, &adapter, &[r, self.in_features()], &[self.out_features(), r], "Linear")?;
        self.loras.adapters.push(adapter);
        Ok(())
    }
    lora_host_over_weight!();
}

impl Module for Linear {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.lora_host(prefix, self);
        v.param(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = &mut self.bias {
            v.param(&join(prefix, "bias"), b);
        }
        self.loras.visit(prefix, v);
    }
}

/// 2-D convolution over NCHW (+ LoRA: a down convolution with this layer's kernel, stride and
/// padding to r channels, then a 1x1 up convolution).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub params: Conv2dParams,
    loras: Loras,
}

impl Conv2d {
    pub fn new(weight: Var, bias: Option<Var>, params: Conv2dParams) -> Conv2d {
        Conv2d { weight, bias, params, loras: Loras::default() }
    }

    /// A square-kernel convolution, `weight` [out, in, k, k] and `bias` [out] under `w`.
    pub fn load(w: &Weights, in_channels: usize, out_channels: usize, kernel: usize, stride: usize, padding: usize, bias: bool) -> Result<Conv2d> {
        let weight = frozen(w.get("weight", &[out_channels, in_channels, kernel, kernel])?);
        let bias = if bias { Some(frozen(w.get("bias", &[out_channels])?)) } else { None };
        let params = Conv2dParams { stride: [stride; 2], padding: [padding; 2], ..Default::default() };
        Ok(Conv2d::new(weight, bias, params))
    }

    pub fn forward(&self, x: &Var) -> Result<Var> {
        let mut y = x.conv2d(&self.weight, self.bias.as_ref(), self.params)?;
        for (a, s) in self.loras.active() {
            let h = x.to_dtype(a.down.dtype())?.conv2d(&a.down, None, self.params)?;
            let d = h.conv2d(&a.up, None, Conv2dParams::default())?.mul_scalar(s)?;
            y = y.add(&d.to_dtype(y.dtype())?)?;
        }
        Ok(y)
    }
}

impl LoraHost for Conv2d {
    fn add_lora(&mut self, adapter: LoraAdapter) -> Result<()> {
        let r = adapter.rank();
        let ws = self.weight.shape();
        if self.params.groups != 1 {
            return Err(Error::msg("add_lora: LoRA on a grouped convolution is not supported"));
        }
        check_new(&self.loras, &adapter, &[r, ws[1], ws[2], ws[3]], &[ws[0], r, 1, 1], "Conv2d")?;
        self.loras.adapters.push(adapter);
        Ok(())
    }
    lora_host_over_weight!();
}

impl Module for Conv2d {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.lora_host(prefix, self);
        v.param(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = &mut self.bias {
            v.param(&join(prefix, "bias"), b);
        }
        self.loras.visit(prefix, v);
    }
}

/// Group normalization over NCHW with a per-channel affine.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Var,
    pub bias: Var,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f32) -> Result<GroupNorm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::msg(format!("GroupNorm {}: {channels} channels do not split into {groups} groups", w.prefix())));
        }
        Ok(GroupNorm { weight: frozen(w.get("weight", &[channels])?), bias: frozen(w.get("bias", &[channels])?), groups, eps })
    }
    pub fn forward(&self, x: &Var) -> Result<Var> {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, false)
    }
    /// silu(group_norm(x)) in one op.
    pub fn forward_silu(&self, x: &Var) -> Result<Var> {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

impl Module for GroupNorm {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.param(&join(prefix, "weight"), &mut self.weight);
        v.param(&join(prefix, "bias"), &mut self.bias);
    }
}

/// Layer normalization over the last dimension (affine optional, as elementwise_affine=False).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Option<Var>,
    pub bias: Option<Var>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: Some(frozen(w.get("weight", &[dim])?)), bias: Some(frozen(w.get("bias", &[dim])?)), eps })
    }
    /// Without learned parameters.
    pub fn plain(eps: f32) -> LayerNorm {
        LayerNorm { weight: None, bias: None, eps }
    }
    pub fn forward(&self, x: &Var) -> Result<Var> {
        x.layer_norm(self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

impl Module for LayerNorm {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        if let Some(w) = &mut self.weight {
            v.param(&join(prefix, "weight"), w);
        }
        if let Some(b) = &mut self.bias {
            v.param(&join(prefix, "bias"), b);
        }
    }
}

/// A lookup table [num_embeddings, dim].
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Var,
}

impl Embedding {
    pub fn load(w: &Weights, num: usize, dim: usize) -> Result<Embedding> {
        Ok(Embedding { weight: frozen(w.get("weight", &[num, dim])?) })
    }
    /// Rows of the table for I64 `ids` of any shape: [..., dim].
    pub fn forward(&self, ids: &Tensor) -> Result<Var> {
        self.weight.embedding(ids)
    }
}

impl Module for Embedding {
    fn visit(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.param(&join(prefix, "weight"), &mut self.weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::Device;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, Device::Cpu).unwrap()
    }

    fn linear_with_lora() -> (Linear, LoraScale, Var) {
        let w = t(&[1.0, 2.0, -1.0, 0.5, 0.0, 3.0], &[2, 3]);
        let mut lin = Linear::new(frozen(w), Some(frozen(t(&[0.1, -0.2], &[2]))));
        let scale = LoraScale::new(1.0);
        let a = LoraAdapter { name: "x".into(), down: frozen(t(&[0.5, -1.0, 2.0], &[1, 3])), up: frozen(t(&[1.5, -0.5], &[2, 1])), alpha_over_rank: 0.5, scale: scale.clone() };
        lin.add_lora(a).unwrap();
        (lin, scale, Var::constant(t(&[1.0, 2.0, 3.0, -1.0, 0.0, 1.0], &[2, 3])))
    }

    #[test]
    fn lora_forward_scale_and_fuse() {
        let (mut lin, scale, x) = linear_with_lora();
        let base = Linear::new(lin.weight.clone(), lin.bias.clone()).forward(&x).unwrap().value().to_vec_f32().unwrap();
        // x·A^T = [4.5, 1.5]; delta = s·(x·A^T)·B^T
        let want = |s: f32| -> Vec<f32> {
            let xa = [4.5f32, 1.5];
            let b = [1.5f32, -0.5];
            (0..4).map(|i| base[i] + s * xa[i / 2] * b[i % 2]).collect()
        };
        for m in [1.0f32, 0.3, 0.0] {
            scale.set(m);
            let got = lin.forward(&x).unwrap().value().to_vec_f32().unwrap();
            for (g, e) in got.iter().zip(want(0.5 * m)) {
                assert!((g - e).abs() < 1e-5, "scale {m}: {got:?} vs {:?}", want(0.5 * m));
            }
        }
        scale.set(0.3);
        let before = lin.forward(&x).unwrap().value().to_vec_f32().unwrap();
        let w0 = lin.weight.value().to_vec_f32().unwrap();
        lin.fuse_lora("x").unwrap();
        assert!(lin.fuse_lora("x").is_err());
        let fused = lin.forward(&x).unwrap().value().to_vec_f32().unwrap();
        for (a, b) in before.iter().zip(&fused) {
            assert!((a - b).abs() < 1e-5);
        }
        lin.unfuse_lora("x").unwrap();
        for (a, b) in w0.iter().zip(lin.weight.value().to_vec_f32().unwrap()) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(lin.remove_lora("x").unwrap());
        assert!(lin.loras().is_empty());
    }

    #[test]
    fn lora_shape_checked() {
        let (mut lin, _, _) = linear_with_lora();
        let bad = LoraAdapter { name: "y".into(), down: frozen(t(&[0.0; 4], &[1, 4])), up: frozen(t(&[0.0; 2], &[2, 1])), alpha_over_rank: 1.0, scale: LoraScale::new(1.0) };
        let e = lin.add_lora(bad).unwrap_err().to_string();
        assert!(e.contains("expected down (A) [1, 3] found [1, 4]"), "{e}");
    }

    #[test]
    fn weights_report_missing_unexpected_and_shape() {
        use crate::weights::{Weights, WeightsOptions};
        let mut m = std::collections::BTreeMap::new();
        m.insert("a.weight".to_string(), t(&[0.0; 6], &[2, 3]));
        m.insert("a.bias".to_string(), t(&[0.0; 2], &[2]));
        m.insert("extra".to_string(), t(&[0.0], &[1]));
        let w = Weights::from_map(m.clone(), "test", WeightsOptions::default());
        Linear::load(&w.pp("a"), 3, 2, true).unwrap();
        Linear::load(&w.pp("b"), 3, 2, false).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("missing key(s): b.weight") && e.contains("unexpected key(s): extra"), "{e}");
        let w = Weights::from_map(m, "test", WeightsOptions::default());
        let e = Linear::load(&w.pp("a"), 2, 3, true).unwrap_err().to_string();
        assert!(e.contains("expected [3, 2] found [2, 3] for key a.weight"), "{e}");
    }
}
