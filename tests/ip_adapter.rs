//! IP-Adapter Plus-Face parity (fixtures from tests/fixtures/gen/ip_adapter.py): CLIP image
//! preprocessing on crops of a real photo against transformers' CLIPImageProcessor, the CLIP vision
//! tower (tiny config, ViT-H topology), the Resampler (real depth) and the UNet's IP
//! cross-attention, loading the nested-dict .bin and its safetensors form, key/shape errors, and
//! the model family of every fixture file.

use std::collections::BTreeMap;

use autograd::{no_grad, Var};
use engine::{DType, Tensor};
use lookahead::{assert_close, fixture_path, load_fixture};
use models::clip_vision::{clip_preprocess, ClipVisionModel, CLIP_MEAN, CLIP_STD};
use models::family::{identify, Family};
use models::ip_adapter::{append_ip_tokens, IpAdapterPlus};
use models::resampler::ResamplerConfig;
use models::rgb_image::RgbImage;
use models::unet::{UNet2DConditionModel, UNetCond};
use models::weights::{Weights, WeightsOptions};

fn f32_opts() -> WeightsOptions {
    WeightsOptions { dtype: Some(DType::F32), ..Default::default() }
}

/// The generator's tiny Resampler (dims shrunk, depth and structure real).
fn tiny_resampler() -> ResamplerConfig {
    ResamplerConfig { dim: 48, depth: 4, dim_head: 16, heads: 3, num_queries: 4, embedding_dim: 32, output_dim: 32, ff_mult: 4 }
}

fn fx() -> BTreeMap<String, Tensor> {
    load_fixture("ip_adapter.safetensors")
}

fn t(fx: &BTreeMap<String, Tensor>, k: &str) -> Tensor {
    fx.get(k).unwrap_or_else(|| panic!("fixture key {k}")).clone()
}

fn vision() -> ClipVisionModel {
    ClipVisionModel::from_folder(fixture_path("ip_adapter_clip_vision"), f32_opts()).unwrap()
}

fn tiny_unet() -> UNet2DConditionModel {
    UNet2DConditionModel::from_pretrained(&fixture_path("sdxl_tiny_unet").display().to_string(), f32_opts()).unwrap()
}

fn crop(img: &RgbImage, y: usize, x: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(h * w * 3);
    for r in y..y + h {
        out.extend_from_slice(&img.data[(r * img.width + x) * 3..(r * img.width + x + w) * 3]);
    }
    out
}

#[test]
fn preprocessing_matches_clip_image_processor_on_a_photo() {
    let fx = fx();
    let img = RgbImage::open(fixture_path("face_astronaut.png")).unwrap();
    assert_eq!((img.width, img.height), (384, 384));
    // (y, x, h, w) as the generator's CROPS: portrait, square downscale, upscale.
    let odd = crop(&img, 37, 11, 301, 217);
    let got = clip_preprocess(&odd, 217, 301, 224).unwrap();
    assert_close("pre_odd", &got, &t(&fx, "pre_odd"), 1e-5, 0.0);
    for (name, (y, x, h, w)) in [("full", (0, 0, 384, 384)), ("up", (3, 5, 90, 100))] {
        let got = clip_preprocess(&crop(&img, y, x, h, w), w, h, 224).unwrap();
        // The processor's values are the normalised 8-bit levels stored here.
        let levels: Vec<u8> = t(&fx, &format!("pre_{name}_levels")).to_vec().unwrap();
        let plane = 224 * 224;
        let want: Vec<f32> = levels.iter().enumerate().map(|(i, &l)| (l as f32 - CLIP_MEAN[i / plane] * 255.0) / (CLIP_STD[i / plane] * 255.0)).collect();
        let want = Tensor::from_f32_vec(want, &[1, 3, 224, 224], DType::F32).unwrap();
        assert_close(&format!("pre_{name}"), &got, &want, 1e-5, 0.0);
    }
}

#[test]
fn clip_vision_tower_matches_transformers() {
    let fx = fx();
    let v = vision();
    assert_eq!(v.config.num_positions(), 10);
    no_grad(|| {
        let out = v.forward(&Var::constant(t(&fx, "pixels"))).unwrap();
        assert_eq!(out.hidden_states.len(), 4);
        assert_close("penultimate", out.hidden_states[2].value(), &t(&fx, "vision_penultimate"), 2e-5, 1e-4);
        assert_close("last_hidden_state", out.last_hidden_state.value(), &t(&fx, "vision_last"), 2e-5, 1e-4);
        assert_close("image_embeds", out.image_embeds.unwrap().value(), &t(&fx, "vision_image_embeds"), 2e-5, 1e-4);
    });
    let bad = v.forward(&Var::constant(Tensor::zeros(&[1, 3, 40, 40], DType::F32, engine::Device::Cpu).unwrap()));
    assert!(bad.is_err());
}

fn check_adapter(ip: &IpAdapterPlus, unet: &UNet2DConditionModel, fx: &BTreeMap<String, Tensor>, what: &str) {
    no_grad(|| {
        let tokens = ip.image_tokens(&Var::constant(t(fx, "pixels"))).unwrap();
        assert_close(&format!("{what}: ip tokens"), tokens.value(), &t(fx, "ip_tokens"), 2e-5, 1e-4);
        let uncond = ip.uncond_tokens(2).unwrap();
        let want = t(fx, "uncond_tokens").broadcast_to(&[2, 4, 32]).unwrap();
        assert_close(&format!("{what}: uncond tokens"), uncond.value(), &want, 2e-5, 1e-4);
        let ehs = append_ip_tokens(&Var::constant(t(fx, "encoder_hidden_states")), &tokens).unwrap();
        let text = Var::constant(t(fx, "text_embeds"));
        let ids = t(fx, "time_ids");
        let cond = UNetCond { encoder_hidden_states: &ehs, text_embeds: Some(&text), time_ids: Some(&ids) };
        let out = unet.forward(&Var::constant(t(fx, "sample")), &t(fx, "timestep"), &cond, &Default::default()).unwrap();
        assert_close(&format!("{what}: UNet with IP cross-attention"), out.value(), &t(fx, "unet_ip_out"), 2e-4, 1e-3);
    });
}

#[test]
fn ip_adapter_bin_and_safetensors_load_and_match() {
    let fx = fx();
    let mut unet = tiny_unet();
    let ip = IpAdapterPlus::load(fixture_path("ip_adapter_tiny.bin"), vision(), tiny_resampler(), &mut unet, 0.6, f32_opts()).unwrap();
    assert!((ip.scale.get() - 0.6).abs() < 1e-7);
    check_adapter(&ip, &unet, &fx, ".bin");

    // The safetensors form: the same keys, flat.
    let (_, tensors) = engine::io::load_any(fixture_path("ip_adapter_tiny.bin")).unwrap();
    assert!(tensors.contains_key("image_proj.latents") && tensors.contains_key("ip_adapter.1.to_k_ip.weight"));
    let dir = std::env::temp_dir().join(format!("lookahead-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.join("ip_adapter_tiny.safetensors");
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    engine::io::safetensors::save(&st, &list, None).unwrap();
    let mut unet2 = tiny_unet();
    let ip2 = IpAdapterPlus::load(&st, vision(), tiny_resampler(), &mut unet2, 0.6, f32_opts()).unwrap();
    check_adapter(&ip2, &unet2, &fx, ".safetensors");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ip_adapter_errors_name_missing_unexpected_and_misshaped_keys() {
    let (_, tensors) = engine::io::load_any(fixture_path("ip_adapter_tiny.bin")).unwrap();
    let load = |map: BTreeMap<String, Tensor>, unet: &mut UNet2DConditionModel| -> String {
        let w = Weights::from_map(map, "edited ip_adapter_tiny.bin", f32_opts());
        match IpAdapterPlus::from_weights(&w, vision(), tiny_resampler(), unet, 1.0) {
            Ok(_) => panic!("an edited file loaded"),
            Err(e) => e.to_string(),
        }
    };
    let mut unet = tiny_unet();

    let mut m = tensors.clone();
    m.remove("image_proj.layers.2.0.to_q.weight");
    m.remove("ip_adapter.3.to_v_ip.weight");
    m.insert("ip_adapter.99.to_k_ip.weight".into(), Tensor::zeros(&[32, 32], DType::F32, engine::Device::Cpu).unwrap());
    let e = load(m, &mut unet);
    assert!(e.contains("image_proj.layers.2.0.to_q.weight") && e.contains("ip_adapter.3.to_v_ip.weight"), "{e}");
    assert!(e.contains("unexpected") && e.contains("ip_adapter.99.to_k_ip.weight"), "{e}");
    assert!(unet.down_blocks[1].attentions[0].blocks[0].attn2.ip.is_none(), "a failed load left IP projections installed");

    let mut m = tensors.clone();
    m.insert("image_proj.latents".into(), Tensor::zeros(&[1, 5, 48], DType::F16, engine::Device::Cpu).unwrap());
    let e = load(m, &mut unet);
    assert!(e.contains("image_proj.latents") && e.contains("[1, 5, 48]"), "{e}");

    let mut m = tensors.clone();
    m.insert("ip_adapter.1.to_k_ip.weight".into(), Tensor::zeros(&[32, 16], DType::F16, engine::Device::Cpu).unwrap());
    let e = load(m, &mut unet);
    assert!(e.contains("ip_adapter.1.to_k_ip.weight") && e.contains("[32, 16]"), "{e}");

    let m: BTreeMap<String, Tensor> = tensors.iter().filter(|(k, _)| k.starts_with("image_proj.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let e = load(m, &mut unet);
    assert!(e.contains("ip_adapter"), "{e}");
}

fn family_of(path: &std::path::Path) -> Option<Family> {
    let (_, list) = engine::io::list_any(path).unwrap();
    identify(list.iter().map(|t| (t.name.as_str(), t.shape.as_slice())))
}

#[test]
fn every_fixture_file_has_its_family() {
    let f = |p: &str| family_of(&fixture_path(p)).unwrap_or_else(|| panic!("{p}: no family")).to_string();
    assert!(f("ip_adapter_tiny.bin").starts_with("IP-Adapter Plus / Plus-Face ("), "{}", f("ip_adapter_tiny.bin"));
    assert_eq!(family_of(&fixture_path("ip_adapter_tiny.bin")), Some(Family::IpAdapterPlus { queries: 4, token_width: 32, layers: 17 }));
    assert_eq!(family_of(&fixture_path("ip_adapter_clip_vision/model.safetensors")), Some(Family::ClipVision { width: 32, layers: 3, patch: 14, with_projection: true }));
    assert_eq!(family_of(&fixture_path("sdxl_tiny_unet/diffusion_pytorch_model.fp16.safetensors")), Some(Family::SdxlUnetDiffusers));
    assert_eq!(family_of(&fixture_path("sdxl_tiny_unet_single.safetensors")), Some(Family::SdxlCheckpoint));
    assert_eq!(family_of(&fixture_path("sdxl_tiny/vae/diffusion_pytorch_model.safetensors")), Some(Family::SdxlVae));
    assert_eq!(family_of(&fixture_path("sdxl_tiny/taesd/diffusion_pytorch_model.safetensors")), Some(Family::TaesdXl));
    assert!(matches!(family_of(&fixture_path("sdxl_tiny/text_encoder/model.safetensors")), Some(Family::ClipTextVitL { .. })));
    assert!(matches!(family_of(&fixture_path("sdxl_tiny/text_encoder_2/model.safetensors")), Some(Family::ClipTextBigG { .. })));
    assert!(matches!(family_of(&fixture_path("sdxl_tiny_unet_lora_kohya.safetensors")), Some(Family::UnetLoraKohya { .. })));
    assert!(matches!(family_of(&fixture_path("sdxl_tiny_unet_lora_peft.safetensors")), Some(Family::UnetLoraPeft { .. })));
    assert_eq!(family_of(&fixture_path("mtcnn.safetensors")), Some(Family::Mtcnn { nets: vec!["P-Net", "R-Net", "O-Net"] }));
    assert_eq!(family_of(&fixture_path("face_irse.pth")), Some(Family::IrSe50));
    assert_eq!(family_of(&fixture_path("weights_io.bin")), None);
}
