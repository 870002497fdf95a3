//! KV-encoder -> decoder parity (fixture from tests/fixtures/gen/ip_adapter.py): a LoRA'd copy of
//! the tiny UNet run through up_blocks[1] exports extractor K/V from every transformer block, the
//! decoder (with IP cross-attention) attends over [own ; exported] K/V in every self-attention; the
//! conditioning latents noised with the target's noise and t. Also: a fresh encoder exports exactly
//! the frozen projections, SDXL's depths give 70 layers, trainable-state loading names its errors,
//! and the per-token K/V drop.

use std::collections::BTreeMap;

use autograd::{no_grad, Var};
use engine::{DType, Device, Tensor};
use lookahead::{assert_close, fixture_path, load_fixture};
use models::attention::{AttnExtras, KvStore};
use models::clip_vision::ClipVisionModel;
use models::ip_adapter::IpAdapterPlus;
use models::kv_encoder::{add_noise, drop_kv_tokens, mask_kv_tokens, scaled_linear_alphas_cumprod, KvEncoder};
use models::presets;
use models::resampler::ResamplerConfig;
use models::unet::{UNet2DConditionModel, UNetCond};
use models::weights::{Weights, WeightsOptions};

fn f32_opts() -> WeightsOptions {
    WeightsOptions { dtype: Some(DType::F32), ..Default::default() }
}

fn tiny_unet() -> UNet2DConditionModel {
    UNet2DConditionModel::from_pretrained(&fixture_path("sdxl_tiny_unet").display().to_string(), f32_opts()).unwrap()
}

struct Fx(BTreeMap<String, Tensor>);

impl Fx {
    fn t(&self, k: &str) -> Tensor {
        self.0.get(k).unwrap_or_else(|| panic!("fixture key {k}")).clone()
    }
    fn v(&self, k: &str) -> Var {
        Var::constant(self.t(k))
    }
    fn timesteps(&self) -> Vec<usize> {
        self.t("t").to_vec::<i64>().unwrap().into_iter().map(|x| x as usize).collect()
    }
    fn lora_state(&self) -> BTreeMap<String, Tensor> {
        self.0.iter().filter_map(|(k, v)| k.strip_prefix("lora.").map(|n| (n.to_string(), v.clone()))).collect()
    }
}

fn run(unet: &UNet2DConditionModel, fx: &Fx, sample: &Var, ehs: &str, extras: &AttnExtras) -> Tensor {
    let (e, text) = (fx.v(ehs), fx.v("text_embeds"));
    let ids = fx.t("time_ids");
    let t = fx.t("t").to_dtype(DType::F32).unwrap();
    let cond = UNetCond { encoder_hidden_states: &e, text_embeds: Some(&text), time_ids: Some(&ids) };
    unet.forward(sample, &t, &cond, extras).unwrap().value().clone()
}

#[test]
fn encoder_to_decoder_matches_reference_composition() {
    let fx = Fx(load_fixture("kv_encoder.safetensors"));
    let mut unet = tiny_unet();
    let vision = ClipVisionModel::from_folder(fixture_path("ip_adapter_clip_vision"), f32_opts()).unwrap();
    let rcfg = ResamplerConfig { dim: 48, depth: 4, dim_head: 16, heads: 3, num_queries: 4, embedding_dim: 32, output_dim: 32, ff_mult: 4 };
    IpAdapterPlus::load(fixture_path("ip_adapter_tiny.bin"), vision, rcfg, &mut unet, 0.6, f32_opts()).unwrap();

    let mut enc = KvEncoder::new(&unet, 4, 1234).unwrap();
    assert_eq!(enc.last_up, 1);
    enc.load_state_dict(&fx.lora_state()).unwrap();
    // The encoder's cross-attention sees the text only.
    assert!(enc.unet.down_blocks[1].attentions[0].blocks[0].attn2.ip.is_none());

    let ac = scaled_linear_alphas_cumprod(1000, 0.00085, 0.012);
    assert_close("alphas_cumprod", &Tensor::from_f32_vec(ac.clone(), &[1000], DType::F32).unwrap(), &fx.t("alphas_cumprod"), 1e-6, 1e-5);
    let ts = fx.timesteps();
    let noisy_x = add_noise(&fx.v("x0"), &fx.v("noise"), &ac, &ts).unwrap();
    let noisy_c = add_noise(&fx.v("c0"), &fx.v("noise"), &ac, &ts).unwrap();
    assert_close("noisy target", noisy_x.value(), &fx.t("noisy_x"), 1e-5, 1e-5);
    assert_close("noisy conditioning", noisy_c.value(), &fx.t("noisy_c"), 1e-5, 1e-5);

    no_grad(|| {
        let (e, text) = (fx.v("enc_ehs"), fx.v("text_embeds"));
        let ids = fx.t("time_ids");
        let t = fx.t("t").to_dtype(DType::F32).unwrap();
        let store = enc.forward(&noisy_c, &t, &UNetCond { encoder_hidden_states: &e, text_embeds: Some(&text), time_ids: Some(&ids) }).unwrap();
        assert_eq!(store.layers().len(), unet.transformer_block_names().len());
        assert_eq!(store.len(), 17);
        for blk in ["down_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.2.transformer_blocks.0"] {
            let (k, v) = store.get(blk).unwrap();
            assert_close(&format!("K {blk}"), k.value(), &fx.t(&format!("k.{blk}")), 1e-4, 1e-3);
            assert_close(&format!("V {blk}"), v.value(), &fx.t(&format!("v.{blk}")), 1e-4, 1e-3);
        }
        let out = run(&unet, &fx, &noisy_x, "dec_ehs", &AttnExtras { kv_capture: None, kv_reference: Some(store) });
        assert_close("decoder output", &out, &fx.t("decoder_out"), 3e-4, 1e-3);
        // Without the reference K/V the output differs: the test can fail.
        let plain = run(&unet, &fx, &noisy_x, "dec_ehs", &AttnExtras::default());
        let diff = plain.sub(&fx.t("decoder_out")).unwrap().abs().unwrap().max_all_f32();
        assert!(diff > 1e-2, "the reference K/V changed nothing ({diff})");
    });
}

trait MaxAll {
    fn max_all_f32(&self) -> f32;
}
impl MaxAll for Tensor {
    fn max_all_f32(&self) -> f32 {
        self.to_vec_f32().unwrap().into_iter().fold(0.0, f32::max)
    }
}

#[test]
fn fresh_encoder_exports_the_frozen_projections() {
    let fx = Fx(load_fixture("kv_encoder.safetensors"));
    let unet = tiny_unet();
    let enc = KvEncoder::new(&unet, 4, 7).unwrap();
    no_grad(|| {
        let x = fx.v("noisy_c");
        let (e, text) = (fx.v("enc_ehs"), fx.v("text_embeds"));
        let ids = fx.t("time_ids");
        let t = fx.t("t").to_dtype(DType::F32).unwrap();
        let cond = UNetCond { encoder_hidden_states: &e, text_embeds: Some(&text), time_ids: Some(&ids) };
        let got = enc.forward(&x, &t, &cond).unwrap();
        // The plain UNet's own attn1 K/V: LoRA up projections start at zero, extractors are copies.
        let want = KvStore::new();
        unet.forward(&x, &t, &cond, &AttnExtras { kv_capture: Some(want.clone()), kv_reference: None }).unwrap();
        assert_eq!(got.layers(), want.layers());
        for l in want.layers() {
            let ((gk, gv), (wk, wv)) = (got.get(&l).unwrap(), want.get(&l).unwrap());
            assert_close(&format!("K {l}"), gk.value(), wk.value(), 1e-5, 1e-5);
            assert_close(&format!("V {l}"), gv.value(), wv.value(), 1e-5, 1e-5);
        }
    });
}

#[test]
fn trainable_state_is_named_and_checked() {
    let fx = Fx(load_fixture("kv_encoder.safetensors"));
    let mut enc = KvEncoder::new(&tiny_unet(), 4, 7).unwrap();
    let params = enc.trainable_parameters();
    // 17 blocks x 2 extractor projections + 16 blocks x 2 attentions x 4 projections, A and B each.
    assert_eq!(params.len(), 2 * (17 * 2 + 16 * 2 * 4));
    assert!(params.iter().all(|(_, p)| p.requires_grad()));
    let state = fx.lora_state();
    assert_eq!(state.len(), params.len());

    let mut bad = state.clone();
    let first = bad.keys().next().unwrap().clone();
    bad.remove(&first);
    bad.insert("up_blocks.9.attn1.to_q.lora.encoder.down".into(), Tensor::zeros(&[4, 32], DType::F32, Device::Cpu).unwrap());
    let e = enc.load_state_dict(&bad).unwrap_err().to_string();
    assert!(e.contains(&first) && e.contains("up_blocks.9.attn1.to_q.lora.encoder.down"), "{e}");
    let mut bad = state.clone();
    let k = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.kv_copy.to_k.lora.kv_copy.up".to_string();
    bad.insert(k.clone(), Tensor::zeros(&[32, 3], DType::F32, Device::Cpu).unwrap());
    let e = enc.load_state_dict(&bad).unwrap_err().to_string();
    assert!(e.contains(&k) && e.contains("[32, 3]"), "{e}");
    enc.load_state_dict(&state).unwrap();
    let back = enc.state_dict();
    assert_close("state round trip", &back[&k], &state[&k], 0.0, 0.0);
}

#[test]
fn sdxl_depths_give_seventy_self_attention_layers() {
    // SDXL's topology and depths at tiny widths (weights all zeros: only the wiring is checked).
    let mut cfg = presets::sdxl_unet();
    cfg.block_out_channels = vec![8, 16, 16];
    cfg.num_attention_heads = vec![1, 1, 1];
    cfg.cross_attention_dim = 8;
    cfg.norm_num_groups = 4;
    cfg.text_time = Some((4, 6 * 4 + 8));
    let w = Weights::from_map(BTreeMap::new(), "zeros", f32_opts());
    let unet = UNet2DConditionModel::load(&w, &cfg).unwrap();
    assert_eq!(unet.transformer_block_names().len(), 70);
    let enc = KvEncoder::new(&unet, 4, 1).unwrap();
    assert_eq!(enc.last_up, 1);
    no_grad(|| {
        let z = |s: &[usize]| Var::constant(Tensor::zeros(s, DType::F32, Device::Cpu).unwrap());
        let (e, text) = (z(&[1, 3, 8]), z(&[1, 8]));
        let ids = Tensor::zeros(&[1, 6], DType::F32, Device::Cpu).unwrap();
        let cond = UNetCond { encoder_hidden_states: &e, text_embeds: Some(&text), time_ids: Some(&ids) };
        let t = Tensor::from_f32_vec(vec![10.0], &[1], DType::F32).unwrap();
        let store = enc.forward(&z(&[1, 4, 8, 8]), &t, &cond).unwrap();
        assert_eq!(store.len(), 70);
        let out = unet.forward(&z(&[1, 4, 8, 8]), &t, &cond, &AttnExtras { kv_capture: None, kv_reference: Some(store) }).unwrap();
        assert_eq!(out.shape(), &[1, 4, 8, 8]);
    });
}

#[test]
fn kv_drop_removes_the_same_tokens_for_the_batch() {
    let store = KvStore::new();
    let n = 400;
    let data: Vec<f32> = (0..2 * n * 4).map(|i| i as f32).collect();
    let k = Var::constant(Tensor::from_f32_vec(data.clone(), &[2, n, 4], DType::F32).unwrap());
    let v = Var::constant(Tensor::from_f32_vec(data.iter().map(|x| -x).collect(), &[2, n, 4], DType::F32).unwrap());
    store.insert("a", k.clone(), v.clone());
    store.insert("b", k.clone(), v.clone());

    let kept = drop_kv_tokens(&store, 0.0, 3).unwrap();
    assert_eq!(kept.get("a").unwrap().0.shape(), &[2, n, 4]);
    assert!(drop_kv_tokens(&store, 1.0, 3).unwrap().is_empty());
    assert!(drop_kv_tokens(&store, 1.5, 3).is_err());

    let d = drop_kv_tokens(&store, 0.3, 3).unwrap();
    let (dk, dv) = d.get("a").unwrap();
    let l = dk.shape()[1];
    assert!(l > 220 && l < 340, "kept {l} of {n} at p = 0.3");
    let dk = dk.value().to_vec_f32().unwrap();
    let dv = dv.value().to_vec_f32().unwrap();
    // Row 0 token j is (t*4 .. t*4+3) for some original t; row 1 must be the same t.
    let mut last = -1i64;
    for j in 0..l {
        let t0 = dk[j * 4] as i64 / 4;
        let t1 = (dk[(l + j) * 4] as i64 - (n as i64 * 4)) / 4;
        assert_eq!(t0, t1, "batch rows keep different tokens");
        assert!(t0 > last, "kept tokens out of order");
        last = t0;
        assert_eq!(dv[j * 4], -dk[j * 4]);
    }
    // Deterministic per seed, different across layers and seeds.
    let again = drop_kv_tokens(&store, 0.3, 3).unwrap();
    assert_eq!(again.get("a").unwrap().0.value().to_vec_f32().unwrap(), dk);
    let other_layer = d.get("b").unwrap().0.value().to_vec_f32().unwrap();
    let other_seed = drop_kv_tokens(&store, 0.3, 4).unwrap().get("a").unwrap().0.value().to_vec_f32().unwrap();
    assert!(other_layer != dk && other_seed != dk);
}

/// Dropping reference tokens with a keep mask (the flash kernel skips them) gives the decoder the
/// same output as copying the kept tokens out, and both differ from keeping every token.
#[test]
fn kv_drop_by_mask_matches_kv_drop_by_copy() {
    let fx = Fx(load_fixture("kv_encoder.safetensors"));
    let unet = tiny_unet();
    no_grad(|| {
        let x = fx.v("x0");
        let store = KvStore::new();
        run(&unet, &fx, &x, "dec_ehs", &AttnExtras { kv_capture: Some(store.clone()), kv_reference: None });
        let masked = mask_kv_tokens(&store, 0.4, 11).unwrap();
        let copied = drop_kv_tokens(&store, 0.4, 11).unwrap();
        assert_eq!(masked.layers(), copied.layers());
        for layer in masked.layers() {
            let (k, _) = masked.get(&layer).unwrap();
            let keep = masked.keep(&layer).expect("a keep mask with p > 0").to_vec::<u8>().unwrap();
            assert_eq!(k.shape(), store.get(&layer).unwrap().0.shape(), "the masked store keeps every token");
            let kept = keep.iter().filter(|&&b| b == 1).count();
            assert_eq!(kept, copied.get(&layer).unwrap().0.shape()[1], "{layer}: mask and copy keep the same number of tokens");
        }
        let by_mask = run(&unet, &fx, &x, "dec_ehs", &AttnExtras { kv_capture: None, kv_reference: Some(masked) });
        let by_copy = run(&unet, &fx, &x, "dec_ehs", &AttnExtras { kv_capture: None, kv_reference: Some(copied) });
        assert_close("masked vs copied kv drop", &by_mask, &by_copy, 1e-5, 1e-5);
        let full = run(&unet, &fx, &x, "dec_ehs", &AttnExtras { kv_capture: None, kv_reference: Some(store) });
        let diff = full.sub(&by_mask).unwrap().abs().unwrap().max_all_f32();
        assert!(diff > 1e-4, "dropping 40% of the reference tokens changed nothing ({diff})");
    });
}
