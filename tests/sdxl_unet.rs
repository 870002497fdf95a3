//! SDXL UNet parity against diffusers 0.42.1 (fixtures from tests/fixtures/gen/sdxl_unet.py): the
//! tiny preset's forward from the diffusers folder and from the single-file checkpoint, LoRA in
//! three key styles at two run-time scales (and fused), extended self-attention, IP
//! cross-attention, and a transformer block / ResNet block at SDXL's real widths.

use std::collections::BTreeMap;

use autograd::{no_grad, Var};
use engine::{DType, Device, Tensor};
use lookahead::{assert_close, fixture_path, load_fixture};
use models::attention::{AttnExtras, BasicTransformerBlock, KvStore};
use models::presets;
use models::unet::{diffusers_to_ldm, ldm_to_diffusers, UNet2DConditionModel, UNetCond, UNetConfig};
use models::unet_blocks::ResnetBlock2D;
use models::weights::{Weights, WeightsOptions};

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

fn f32_opts() -> WeightsOptions {
    WeightsOptions { dtype: Some(DType::F32), ..Default::default() }
}

fn folder() -> String {
    fixture_path("sdxl_tiny_unet").display().to_string()
}

fn tiny() -> UNet2DConditionModel {
    UNet2DConditionModel::from_pretrained(&folder(), f32_opts()).unwrap()
}

fn weights(name: &str) -> Weights {
    Weights::from_files(&[fixture_path(name)], f32_opts()).unwrap()
}

struct Inputs {
    fx: BTreeMap<String, Tensor>,
}

impl Inputs {
    fn new() -> Inputs {
        Inputs { fx: load_fixture("sdxl_unet.safetensors") }
    }
    fn t(&self, k: &str) -> Tensor {
        self.fx.get(k).unwrap_or_else(|| panic!("fixture key {k}")).clone()
    }
    fn run_with(&self, unet: &UNet2DConditionModel, sample: &str, timestep: &str, ehs: &Tensor, extras: &AttnExtras) -> Tensor {
        no_grad(|| {
            let (e, text) = (Var::constant(ehs.clone()), Var::constant(self.t("text_embeds")));
            let ids = self.t("time_ids");
            let cond = UNetCond { encoder_hidden_states: &e, text_embeds: Some(&text), time_ids: Some(&ids) };
            unet.forward(&Var::constant(self.t(sample)), &self.t(timestep), &cond, extras).unwrap().value().clone()
        })
    }
    fn run(&self, unet: &UNet2DConditionModel) -> Tensor {
        self.run_with(unet, "sample", "timestep", &self.t("encoder_hidden_states"), &AttnExtras::default())
    }
}

const ATOL: f32 = 2e-4;
const RTOL: f32 = 1e-3;

#[test]
fn config_json_is_the_tiny_preset() {
    let text = std::fs::read_to_string(fixture_path("sdxl_tiny_unet/config.json")).unwrap();
    assert_eq!(UNetConfig::from_json(&text).unwrap(), presets::tiny_unet());
    let bad = text.replace("\"use_linear_projection\": true", "\"use_linear_projection\": false");
    assert!(UNetConfig::from_json(&bad).unwrap_err().to_string().contains("use_linear_projection"));
}

#[test]
fn tiny_unet_matches_diffusers() {
    let inp = Inputs::new();
    let unet = tiny();
    let t0 = std::time::Instant::now();
    let out = inp.run(&unet);
    eprintln!("tiny UNet forward (batch 2, 16x16): {:?}", t0.elapsed());
    assert_close("unet out", &out, &inp.t("out"), ATOL, RTOL);
}

#[test]
fn single_file_layout_gives_identical_outputs() {
    let inp = Inputs::new();
    let single = UNet2DConditionModel::from_single_file(fixture_path("sdxl_tiny_unet_single.safetensors"), &presets::tiny_unet(), f32_opts()).unwrap();
    assert_close("single-file vs folder", &inp.run(&single), &inp.run(&tiny()), 0.0, 0.0);
}

#[test]
fn key_mapping_round_trips() {
    let cfg = presets::tiny_unet();
    let folder_keys = engine::io::list_any(fixture_path("sdxl_tiny_unet/diffusion_pytorch_model.fp16.safetensors")).unwrap().1;
    let single_keys: Vec<String> = engine::io::list_any(fixture_path("sdxl_tiny_unet_single.safetensors")).unwrap().1.into_iter().map(|t| t.name).collect();
    for k in &folder_keys {
        let l = diffusers_to_ldm(&k.name, &cfg).unwrap_or_else(|| panic!("no original name for {}", k.name));
        assert!(single_keys.contains(&format!("model.diffusion_model.{l}")), "{} -> {l} not in the single file", k.name);
        assert_eq!(ldm_to_diffusers(&l, &cfg).as_deref(), Some(k.name.as_str()));
    }
    // The real SDXL layout: a few known pairs.
    let sdxl = presets::sdxl_unet();
    for (d, l) in [
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight", "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"),
        ("up_blocks.0.upsamplers.0.conv.bias", "output_blocks.2.2.conv.bias"),
        ("up_blocks.1.resnets.2.conv_shortcut.weight", "output_blocks.5.0.skip_connection.weight"),
        ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
        ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ] {
        assert_eq!(diffusers_to_ldm(d, &sdxl).as_deref(), Some(l));
        assert_eq!(ldm_to_diffusers(l, &sdxl).as_deref(), Some(d));
    }
}

#[test]
fn missing_unexpected_and_mismatched_keys_are_named() {
    let cfg = presets::tiny_unet();
    let mut map = engine::io::load_any(fixture_path("sdxl_tiny_unet/diffusion_pytorch_model.fp16.safetensors")).unwrap().1;
    map.remove("mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight");
    map.insert("mid_block.extra.weight".into(), Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap());
    let e = UNet2DConditionModel::from_weights(&Weights::from_map(map.clone(), "test", f32_opts()), &cfg).unwrap_err().to_string();
    assert!(e.contains("missing key(s): mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"), "{e}");
    assert!(e.contains("unexpected key(s): mid_block.extra.weight"), "{e}");
    map.insert("conv_in.weight".into(), Tensor::zeros(&[16, 4, 3, 1], DType::F32, Device::Cpu).unwrap());
    let e = UNet2DConditionModel::from_weights(&Weights::from_map(map, "test", f32_opts()), &cfg).unwrap_err().to_string();
    assert!(e.contains("expected [16, 4, 3, 3] found [16, 4, 3, 1] for key conv_in.weight"), "{e}");
}

#[test]
fn lora_matches_at_two_scales_in_every_key_style() {
    let inp = Inputs::new();
    let mut unet = tiny();
    let base = inp.run(&unet);
    for (file, style) in [("sdxl_tiny_unet_lora_peft.safetensors", "peft"), ("sdxl_tiny_unet_lora_kohya.safetensors", "kohya"), ("sdxl_tiny_unet_lora_kohya_diffusers.safetensors", "kohya")] {
        let scale = unet.load_lora(&weights(file), "lcm", 0.3).unwrap();
        assert_close(&format!("{file} at 0.3"), &inp.run(&unet), &inp.t(&format!("lora_{style}_0.3")), ATOL, RTOL);
        // Changed at run time, no reload.
        scale.set(1.0);
        let unfused = inp.run(&unet);
        assert_close(&format!("{file} at 1.0"), &unfused, &inp.t(&format!("lora_{style}_1.0")), ATOL, RTOL);
        unet.fuse_lora("lcm").unwrap();
        assert_close(&format!("{file} fused"), &inp.run(&unet), &unfused, 1e-4, 1e-4);
        unet.unfuse_lora("lcm").unwrap();
        scale.set(0.0);
        assert_close(&format!("{file} at 0"), &inp.run(&unet), &base, 1e-5, 1e-5);
        unet.remove_lora("lcm").unwrap();
    }
    // Unfusing subtracts the delta it added: the weights are back up to f32 rounding.
    assert_close("after removing", &inp.run(&unet), &base, 1e-5, 1e-5);
}

#[test]
fn lora_with_unknown_module_is_an_error_naming_it() {
    let mut unet = tiny();
    let mut m = BTreeMap::new();
    m.insert("lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight".to_string(), Tensor::zeros(&[4, 16, 3, 3], DType::F32, Device::Cpu).unwrap());
    let e = unet.load_lora(&Weights::from_map(m, "bad-lora", f32_opts()), "x", 1.0).unwrap_err().to_string();
    assert!(e.contains("lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight"), "{e}");
}

#[test]
fn extended_self_attention_matches_concatenation_reference() {
    let inp = Inputs::new();
    let unet = tiny();
    let store = KvStore::new();
    inp.run_with(&unet, "ref_sample", "ref_timestep", &inp.t("encoder_hidden_states"), &AttnExtras { kv_capture: Some(store.clone()), kv_reference: None });
    assert_eq!(store.len(), unet.transformer_block_names().len());
    let (k, v) = store.get("down_blocks.1.attentions.0.transformer_blocks.0").unwrap();
    assert_close("captured K", k.value(), &inp.t("captured_k"), 1e-4, 1e-3);
    assert_close("captured V", v.value(), &inp.t("captured_v"), 1e-4, 1e-3);
    let out = inp.run_with(&unet, "sample", "timestep", &inp.t("encoder_hidden_states"), &AttnExtras { kv_capture: None, kv_reference: Some(store) });
    assert_close("extended attention", &out, &inp.t("out_extended"), ATOL, RTOL);
}

#[test]
fn ip_cross_attention_matches_ip_adapter_reference() {
    let inp = Inputs::new();
    let mut unet = tiny();
    let w = weights("sdxl_tiny_unet_ip.safetensors");
    let scale = unet.set_ip_adapter(&w.pp("ip_adapter"), 4, 0.7).unwrap();
    w.finish().unwrap();
    let ehs = Tensor::cat(&[&inp.t("encoder_hidden_states"), &inp.t("ip_tokens")], 1).unwrap();
    let out = inp.run_with(&unet, "sample", "timestep", &ehs, &AttnExtras::default());
    assert_close("IP cross-attention", &out, &inp.t("out_ip"), ATOL, RTOL);
    // At scale 0 the IP tokens are ignored: the plain UNet over the text tokens.
    scale.set(0.0);
    let out0 = inp.run_with(&unet, "sample", "timestep", &ehs, &AttnExtras::default());
    assert_close("IP scale 0", &out0, &inp.t("out"), ATOL, RTOL);
}

/// Weights drawn as the generator drew them: Philox uniform(seed) * mul + add, per parameter.
fn philox_weights(recipe_key: &str) -> Weights {
    let file = engine::io::safetensors::SafetensorsFile::open(fixture_path("sdxl_unet.safetensors")).unwrap();
    let recipe: serde_json::Value = serde_json::from_str(&file.metadata()[recipe_key]).unwrap();
    let mut map = BTreeMap::new();
    for p in recipe.as_array().unwrap() {
        let shape: Vec<usize> = p["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let t = Tensor::rand(&shape, DType::F32, Device::Cpu, p["seed"].as_u64().unwrap()).unwrap();
        map.insert(p["name"].as_str().unwrap().to_string(), t.affine(p["mul"].as_f64().unwrap() as f32, p["add"].as_f64().unwrap() as f32).unwrap());
    }
    Weights::from_map(map, recipe_key, f32_opts())
}

#[test]
fn real_width_transformer_block_matches() {
    let fx = load_fixture("sdxl_unet.safetensors");
    let w = philox_weights("block_recipe");
    let block = BasicTransformerBlock::load(&w, "blk", 1280, 20, 64, 2048).unwrap();
    w.finish().unwrap();
    let out = no_grad(|| block.forward(&Var::constant(fx["block_in"].clone()), &Var::constant(fx["block_ehs"].clone()), &AttnExtras::default()).unwrap());
    assert_close("BasicTransformerBlock 1280/20 heads", out.value(), &fx["block_out"], 1e-3, 1e-3);
}

#[test]
fn real_width_resnet_block_matches() {
    let fx = load_fixture("sdxl_unet.safetensors");
    let w = philox_weights("resnet_recipe");
    let resnet = ResnetBlock2D::load(&w, 960, 640, 1280, 32, 1e-5).unwrap();
    w.finish().unwrap();
    let out = no_grad(|| resnet.forward(&Var::constant(fx["resnet_in"].clone()), &Var::constant(fx["resnet_temb"].clone()).silu().unwrap()).unwrap());
    assert_close("ResnetBlock2D 960->640", out.value(), &fx["resnet_out"], 1e-3, 1e-3);
}

/// The three UNet runs the CUDA tests check, each passed to `close(name, output, fixture key)`:
/// plain, with extended self-attention over captured reference K/V, and with IP cross-attention
/// (weights loaded with `opts`).
fn plain_extended_and_ip(inp: &Inputs, unet: &mut UNet2DConditionModel, opts: WeightsOptions, close: &dyn Fn(&str, Tensor, &str)) {
    close("unet out", inp.run(unet), "out");
    let store = KvStore::new();
    inp.run_with(unet, "ref_sample", "ref_timestep", &inp.t("encoder_hidden_states"), &AttnExtras { kv_capture: Some(store.clone()), kv_reference: None });
    let out = inp.run_with(unet, "sample", "timestep", &inp.t("encoder_hidden_states"), &AttnExtras { kv_capture: None, kv_reference: Some(store) });
    close("extended attention", out, "out_extended");
    let w = Weights::from_files(&[fixture_path("sdxl_tiny_unet_ip.safetensors")], opts).unwrap();
    unet.set_ip_adapter(&w.pp("ip_adapter"), 4, 0.7).unwrap();
    w.finish().unwrap();
    let ehs = Tensor::cat(&[&inp.t("encoder_hidden_states"), &inp.t("ip_tokens")], 1).unwrap();
    close("IP cross-attention", inp.run_with(unet, "sample", "timestep", &ehs, &AttnExtras::default()), "out_ip");
}

/// The tiny UNet on a CUDA device (a GPU, else the CUDA emulator: tests/common/cuda_harness.rs):
/// `plain_extended_and_ip` against the same diffusers outputs as the CPU tests above. f32:
/// cuBLASLt / cuDNN (never TF32) and our kernels (channels-last group norm, attention,
/// element-wise), in the UNet's own layout.
#[test]
fn tiny_unet_on_cuda_matches_diffusers() {
    let Some((dev, _gpu)) = cuda_harness::cuda("tiny_unet_on_cuda_matches_diffusers") else { return };
    let cpu = Inputs::new();
    let inp = Inputs { fx: cpu.fx.iter().map(|(k, v)| (k.clone(), v.to_device(dev).unwrap())).collect() };
    let on_dev = WeightsOptions { device: dev, ..f32_opts() };
    let mut unet = UNet2DConditionModel::from_pretrained(&folder(), on_dev.clone()).unwrap();
    plain_extended_and_ip(&inp, &mut unet, on_dev, &|name, got, want| {
        assert_eq!(got.device(), dev, "{name} on cuda: the result left the device");
        assert_close(&format!("{name} on cuda"), &got.to_device(Device::Cpu).unwrap(), &cpu.t(want), 1e-3, 1e-3);
    });
}

/// The tiny UNet in bf16 on a CUDA device, as inference runs: the fused kernels (flash attention
/// with extended K/V and its decoupled IP mode, packed 16-bit norms, cluster group norm on sm_90)
/// end to end against the f32 diffusers outputs, within 5% of the output scale (measured on the
/// emulated sm_90 device: max error 0.057 for outputs up to 1.37). A check of the bf16 path's
/// layouts, dtypes and dispatch, which a wrong kernel or view throws far off; the per-kernel
/// numerics are the parity suites' (tests/cuda_parity_*.rs), and the f32 test above separates
/// extended from plain attention (their outputs differ by up to 0.044, inside this tolerance).
#[test]
fn tiny_unet_in_bf16_on_cuda_tracks_diffusers() {
    let Some((dev, _gpu)) = cuda_harness::cuda("tiny_unet_in_bf16_on_cuda_tracks_diffusers") else { return };
    let cpu = Inputs::new();
    let bf16 = |t: &Tensor| if t.dtype() == DType::F32 { t.to_dtype(DType::BF16).unwrap() } else { t.clone() };
    let inp = Inputs { fx: cpu.fx.iter().map(|(k, v)| (k.clone(), bf16(&v.to_device(dev).unwrap()))).collect() };
    let on_dev = WeightsOptions { device: dev, dtype: Some(DType::BF16), ..Default::default() };
    let mut unet = UNet2DConditionModel::from_pretrained(&folder(), on_dev.clone()).unwrap();
    plain_extended_and_ip(&inp, &mut unet, on_dev, &|name, got, want| {
        assert_eq!((got.device(), got.dtype()), (dev, DType::BF16), "{name}");
        let got = got.to_dtype(DType::F32).unwrap().to_device(Device::Cpu).unwrap();
        let want = cpu.t(want);
        let err = got.sub(&want).unwrap().abs().unwrap().to_vec_f32().unwrap().into_iter().fold(0f32, f32::max);
        let scale = want.abs().unwrap().to_vec_f32().unwrap().into_iter().fold(0f32, f32::max);
        eprintln!("{name}, bf16 on cuda: max |bf16 - f32 reference| {err:.4} (outputs up to {scale:.3})");
        assert_close(&format!("{name}, bf16 on cuda"), &got, &want, 0.05 * scale, 0.05);
    });
}
