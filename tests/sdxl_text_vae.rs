//! SDXL text side (CLIP BPE tokenizer, both text encoders, prompt conditioning) and the two
//! autoencoders (AutoencoderKL, AutoencoderTiny) against transformers 5.24.0 / diffusers 0.42.1
//! on tiny configurations of the real topologies with random weights
//! (generator: tests/fixtures/gen/sdxl_text_vae.py).

use std::collections::BTreeMap;

use autograd::{no_grad, Var};
use engine::{DType, Device, Tensor};
use lookahead::{assert_close, fixture_path, load_fixture};
use models::clip_text::{ClipTextConfig, ClipTextModel};
use models::conditioning::{add_time_ids, encode_ids, SdxlTextEncoders};
use models::taesd::{AutoencoderTiny, TaesdConfig};
use models::tokenizer::ClipTokenizer;
use models::vae::{AutoencoderKl, VaeConfig};
use models::weights::{Weights, WeightsOptions};

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

fn tokens_fixture() -> serde_json::Value {
    let path = fixture_path("sdxl_text_vae_tokens.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_matches_transformers_on_real_vocab() {
    let record = tokens_fixture();
    let dir = fixture_path("clip_bpe_trimmed");
    let tok = ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let tok_2 = tok.clone().with_pad_token("!").unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok_2.pad_id()), (49406, 49407, 49407, 0));
    let prompts = record["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 10);
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().unwrap();
        for (name, t) in [("tokenizer", &tok), ("tokenizer_2", &tok_2)] {
            assert_eq!(t.encode_padded(p), ids_of(&record[name][i]), "{name}, padded, prompt {p:?}");
            assert_eq!(t.encode_with_special(p), ids_of(&record[format!("{name}_unpadded")][i]), "{name}, unpadded, prompt {p:?}");
        }
    }
}

#[test]
fn tokenizer_folders_read_special_tokens() {
    let tiny = fixture_path("sdxl_tiny");
    let t1 = ClipTokenizer::from_folder(tiny.join("tokenizer")).unwrap();
    let t2 = ClipTokenizer::from_folder(tiny.join("tokenizer_2")).unwrap();
    let n = t1.vocab_size() as u32;
    assert_eq!((t1.bos_id(), t1.eos_id(), t1.pad_id(), t1.max_length()), (n - 2, n - 1, n - 1, 77));
    assert_eq!((t2.bos_id(), t2.eos_id(), t2.pad_id()), (n - 2, n - 1, 0));
    let f = load_fixture("sdxl_text_vae.safetensors");
    let record = tokens_fixture();
    let prompts: Vec<&str> = [1, 4].iter().map(|&i| record["prompts"][i].as_str().unwrap()).collect();
    assert_eq!(t1.encode_batch(&prompts, Device::Cpu).unwrap().to_vec::<i64>().unwrap(), f["te1_ids"].to_vec::<i64>().unwrap());
    assert_eq!(t2.encode_batch(&prompts, Device::Cpu).unwrap().to_vec::<i64>().unwrap(), f["te2_ids"].to_vec::<i64>().unwrap());
}

fn check(name: &str, got: &Var, expected: &Tensor) {
    // The embeddings are ~0.02 in size, the later states ~1.
    let atol = if name.contains("hidden_states[0]") { 1e-6 } else { 1e-4 };
    assert_close(name, got.value(), expected, atol, 1e-4);
}

#[test]
fn text_encoders_match_transformers() {
    let f = load_fixture("sdxl_text_vae.safetensors");
    let tiny = fixture_path("sdxl_tiny");
    let te1 = ClipTextModel::from_folder(tiny.join("text_encoder"), false, None, Device::Cpu).unwrap();
    let te2 = ClipTextModel::from_folder(tiny.join("text_encoder_2"), true, None, Device::Cpu).unwrap();
    no_grad(|| {
        let o1 = te1.forward(&f["te1_ids"]).unwrap();
        assert_eq!(o1.hidden_states.len(), te1.config.num_hidden_layers + 1);
        assert!(o1.text_embeds.is_none());
        check("te1 hidden_states[0]", &o1.hidden_states[0], &f["te1_hidden_0"]);
        check("te1 hidden_states[-2]", &o1.hidden_states[o1.hidden_states.len() - 2], &f["te1_hidden_penultimate"]);
        check("te1 last_hidden_state", &o1.last_hidden_state, &f["te1_last_hidden"]);
        check("te1 pooled", &o1.pooled, &f["te1_pooled"]);

        let o2 = te2.forward(&f["te2_ids"]).unwrap();
        check("te2 hidden_states[0]", &o2.hidden_states[0], &f["te2_hidden_0"]);
        check("te2 hidden_states[-2]", &o2.hidden_states[o2.hidden_states.len() - 2], &f["te2_hidden_penultimate"]);
        check("te2 last_hidden_state", &o2.last_hidden_state, &f["te2_last_hidden"]);
        check("te2 text_embeds", o2.text_embeds.as_ref().unwrap(), &f["te2_text_embeds"]);

        let c = encode_ids(&te1, &te2, &f["te1_ids"], &f["te2_ids"], None).unwrap();
        check("prompt_embeds", &c.prompt_embeds, &f["cond_prompt_embeds"]);
        check("pooled_prompt_embeds", &c.pooled_prompt_embeds, &f["cond_pooled"]);
    });
    let ids = add_time_ids((1024, 768), (12, 34), (1024, 1024), 2, DType::F32, Device::Cpu).unwrap();
    assert_close("add_time_ids", &ids, &f["cond_add_time_ids"], 0.0, 0.0);
}

#[test]
fn sdxl_text_encoders_from_prompts() {
    let f = load_fixture("sdxl_text_vae.safetensors");
    let record = tokens_fixture();
    let prompts: Vec<&str> = [1, 4].iter().map(|&i| record["prompts"][i].as_str().unwrap()).collect();
    let enc = SdxlTextEncoders::from_folder(fixture_path("sdxl_tiny"), None, Device::Cpu).unwrap();
    no_grad(|| {
        let c = enc.encode(&prompts, Device::Cpu).unwrap();
        check("prompt_embeds from text", &c.prompt_embeds, &f["cond_prompt_embeds"]);
        check("pooled from text", &c.pooled_prompt_embeds, &f["cond_pooled"]);
        let neg = enc.encode_negative(&c, None, true, Device::Cpu).unwrap();
        assert_eq!(neg.prompt_embeds.shape(), c.prompt_embeds.shape());
        assert!(neg.prompt_embeds.value().to_vec_f32().unwrap().iter().all(|&v| v == 0.0));
    });
}

#[test]
fn text_encoder_reports_bad_weights() {
    let tiny = fixture_path("sdxl_tiny");
    // text_encoder_2 has a text_projection that a plain CLIPTextModel does not ask for.
    let err = ClipTextModel::from_folder(tiny.join("text_encoder_2"), false, None, Device::Cpu).err().expect("unexpected key must fail");
    assert!(err.to_string().contains("text_projection.weight"), "{err}");
    // text_encoder has none.
    let err = ClipTextModel::from_folder(tiny.join("text_encoder"), true, None, Device::Cpu).err().expect("missing key must fail");
    assert!(err.to_string().contains("text_projection.weight"), "{err}");
}

fn input(t: &Tensor) -> Var {
    Var::constant(t.clone())
}

#[test]
fn autoencoder_kl_matches_diffusers() {
    let f = load_fixture("sdxl_text_vae.safetensors");
    let vae = AutoencoderKl::from_folder(fixture_path("sdxl_tiny").join("vae"), None, Device::Cpu).unwrap();
    assert_eq!(vae.config.scaling_factor, 0.13025);
    no_grad(|| {
        let dist = vae.encode(&input(&f["vae_in"])).unwrap();
        assert_close("vae mean", dist.mean.value(), &f["vae_mean"], 1e-4, 1e-4);
        assert_close("vae logvar", dist.logvar.value(), &f["vae_logvar"], 1e-4, 1e-4);
        let sample = dist.sample_with_noise(&input(&f["vae_noise"])).unwrap();
        assert_close("vae sample", sample.value(), &f["vae_sample"], 1e-4, 1e-4);
        // Our RNG's sample is mean + std * randn(seed), deterministic in the seed.
        let (a, b) = (dist.sample(7).unwrap(), dist.sample(7).unwrap());
        assert_close("vae sample repeat", a.value(), b.value(), 0.0, 0.0);
        let noise = Tensor::randn(dist.mean.shape(), DType::F32, Device::Cpu, 7).unwrap();
        assert_close("vae sample(seed)", a.value(), dist.sample_with_noise(&input(&noise)).unwrap().value(), 0.0, 0.0);
        let out = vae.decode(&input(&f["vae_dec_in"])).unwrap();
        assert_close("vae decode", out.value(), &f["vae_dec_out"], 1e-4, 1e-4);
        let z = input(&f["vae_dec_in"]);
        assert_close("scale/unscale", vae.unscale_latents(&vae.scale_latents(&z).unwrap()).unwrap().value(), z.value(), 1e-6, 1e-6);
        assert!(vae.encode(&input(&Tensor::zeros(&[1, 3, 30, 40], DType::F32, Device::Cpu).unwrap())).is_err());
    });
}

#[test]
fn autoencoder_tiny_matches_diffusers() {
    let f = load_fixture("sdxl_text_vae.safetensors");
    let taesd = AutoencoderTiny::from_folder(fixture_path("sdxl_tiny").join("taesd"), None, Device::Cpu).unwrap();
    no_grad(|| {
        let lat = taesd.encode(&input(&f["taesd_in"])).unwrap();
        assert_close("taesd encode", lat.value(), &f["taesd_latents"], 1e-4, 1e-4);
        assert_close("taesd scale_latents", taesd.scale_latents(&lat).unwrap().value(), &f["taesd_scaled"], 1e-5, 1e-5);
        assert_close("taesd unscale_latents", taesd.unscale_latents(&input(&f["taesd_scaled"])).unwrap().value(), &f["taesd_unscaled"], 1e-5, 1e-5);
        let out = taesd.decode(&input(&f["taesd_dec_in"])).unwrap();
        assert_close("taesd decode", out.value(), &f["taesd_dec_out"], 1e-4, 1e-4);
    });
}

#[test]
fn autoencoders_report_mismatched_weights() {
    let tiny = fixture_path("sdxl_tiny");
    // The TAESD file is not an AutoencoderKL: loading names the first key the model asked for.
    let dir = std::env::temp_dir().join(format!("sdxl_text_vae_bad_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tiny.join("vae/config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(tiny.join("taesd/diffusion_pytorch_model.safetensors"), dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let err = AutoencoderKl::from_folder(&dir, None, Device::Cpu).err().expect("wrong weights must fail").to_string();
    assert!(err.contains("encoder.conv_in.weight") && err.contains("encoder.layers.0.weight"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The tiny models from the single-file layout (fp16, as the released checkpoint) and from the
/// diffusers folders converted to fp16 have the same weights, so they give identical outputs.
#[test]
fn single_file_layout_matches_diffusers_layout() {
    let tiny = fixture_path("sdxl_tiny");
    let path = fixture_path("sdxl_tiny_single_text_vae.safetensors");
    let (_, tensors) = engine::io::load_any(&path).unwrap();
    assert!(tensors.keys().any(|k| k.ends_with("attn.in_proj_weight")) && tensors.contains_key("first_stage_model.encoder.mid.attn_1.q.weight"));
    let source = path.display().to_string();
    let opts = WeightsOptions { dtype: Some(DType::F32), device: Device::Cpu, collect_missing: true };
    let cfg = |d: &str| ClipTextConfig::from_file(&tiny.join(d).join("config.json")).unwrap();
    let single = SdxlTextEncoders::from_single_file_tensors(&tensors, ClipTokenizer::from_folder(tiny.join("tokenizer")).unwrap(), ClipTokenizer::from_folder(tiny.join("tokenizer_2")).unwrap(), (cfg("text_encoder"), cfg("text_encoder_2")), opts, &source).unwrap();
    let vae_single = AutoencoderKl::from_single_file_tensors(&tensors, VaeConfig::from_file(&tiny.join("vae/config.json")).unwrap(), opts, &source).unwrap();

    // The diffusers folders rounded to fp16 and back: the single file's values.
    let folder = |sub: &str, file: &str| -> BTreeMap<String, Tensor> {
        let (_, t) = engine::io::load_any(tiny.join(sub).join(file)).unwrap();
        t.into_iter().map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap())).collect()
    };
    let w1 = Weights::from_map(folder("text_encoder", "model.safetensors"), "text_encoder", opts);
    let w2 = Weights::from_map(folder("text_encoder_2", "model.safetensors"), "text_encoder_2", opts);
    let wv = Weights::from_map(folder("vae", "diffusion_pytorch_model.safetensors"), "vae", opts);
    let te1 = ClipTextModel::load(&w1, cfg("text_encoder"), false).unwrap();
    let te2 = ClipTextModel::load(&w2, cfg("text_encoder_2"), true).unwrap();
    let vae = AutoencoderKl::load(&wv, VaeConfig::from_file(&tiny.join("vae/config.json")).unwrap()).unwrap();
    for w in [&w1, &w2, &wv] {
        w.finish().unwrap();
    }

    let f = load_fixture("sdxl_text_vae.safetensors");
    no_grad(|| {
        let a = encode_ids(&single.text_encoder, &single.text_encoder_2, &f["te1_ids"], &f["te2_ids"], None).unwrap();
        let b = encode_ids(&te1, &te2, &f["te1_ids"], &f["te2_ids"], None).unwrap();
        assert_close("single-file prompt_embeds", a.prompt_embeds.value(), b.prompt_embeds.value(), 0.0, 0.0);
        assert_close("single-file pooled", a.pooled_prompt_embeds.value(), b.pooled_prompt_embeds.value(), 0.0, 0.0);
        // And both stay close to the f32 reference (the weights are rounded to fp16).
        assert_close("single-file prompt_embeds vs reference", a.prompt_embeds.value(), &f["cond_prompt_embeds"], 2e-2, 2e-2);
        let x = input(&f["vae_in"]);
        let (da, db) = (vae_single.encode(&x).unwrap(), vae.encode(&x).unwrap());
        assert_close("single-file vae mean", da.mean.value(), db.mean.value(), 0.0, 0.0);
        let z = input(&f["vae_dec_in"]);
        assert_close("single-file vae decode", vae_single.decode(&z).unwrap().value(), vae.decode(&z).unwrap().value(), 0.0, 0.0);
    });
}

/// Old VAE files name the mid-block attention query/key/value/proj_attn.
#[test]
fn vae_reads_legacy_attention_names() {
    let tiny = fixture_path("sdxl_tiny");
    let (_, t) = engine::io::load_any(tiny.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let legacy: BTreeMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k.replace("attentions.0.to_q", "attentions.0.query").replace("attentions.0.to_k", "attentions.0.key").replace("attentions.0.to_v", "attentions.0.value").replace("attentions.0.to_out.0", "attentions.0.proj_attn"), v))
        .collect();
    assert!(legacy.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let w = Weights::from_map(legacy, "legacy vae", WeightsOptions::default());
    let vae = AutoencoderKl::load(&w, VaeConfig::from_file(&tiny.join("vae/config.json")).unwrap()).unwrap();
    w.finish().unwrap();
    let f = load_fixture("sdxl_text_vae.safetensors");
    no_grad(|| {
        let out = vae.decode(&input(&f["vae_dec_in"])).unwrap();
        assert_close("legacy-named vae decode", out.value(), &f["vae_dec_out"], 1e-4, 1e-4);
    });
}

/// The lookahead loss backpropagates through the decoder to the latents: the gradient of
/// sum(w * decode(z)) with respect to z matches torch's autograd (frozen weights get none).
#[test]
fn decoders_backpropagate_to_the_latents() {
    let tiny = fixture_path("sdxl_tiny");
    let f = load_fixture("sdxl_text_vae.safetensors");
    let taesd = AutoencoderTiny::from_folder(tiny.join("taesd"), None, Device::Cpu).unwrap();
    let vae = AutoencoderKl::from_folder(tiny.join("vae"), None, Device::Cpu).unwrap();
    let z = Var::leaf(f["taesd_dec_in"].clone(), true);
    taesd.decode(&z).unwrap().mul(&input(&f["taesd_grad_w"])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("taesd d/dz", &z.grad().unwrap(), &f["taesd_grad_z"], 1e-4, 1e-4);
    let z = Var::leaf(f["vae_dec_in"].clone(), true);
    vae.decode(&z).unwrap().mul(&input(&f["vae_grad_w"])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("vae d/dz", &z.grad().unwrap(), &f["vae_grad_z"], 1e-4, 1e-4);
}

/// The tiny presets describe the committed tiny folders, and the tiny text encoders' conditioning
/// has the tiny UNet's sizes.
#[test]
fn tiny_presets_match_the_fixture_folders() {
    let tiny = fixture_path("sdxl_tiny");
    let key = |c: &ClipTextConfig| (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.hidden_act, c.projection_dim, c.eos_token_id, c.max_position_embeddings);
    assert_eq!(key(&ClipTextConfig::tiny_l()), key(&ClipTextConfig::from_file(&tiny.join("text_encoder/config.json")).unwrap()));
    assert_eq!(key(&ClipTextConfig::tiny_g()), key(&ClipTextConfig::from_file(&tiny.join("text_encoder_2/config.json")).unwrap()));
    let v = VaeConfig::from_file(&tiny.join("vae/config.json")).unwrap();
    let p = VaeConfig::tiny();
    assert_eq!((p.block_out_channels, p.norm_num_groups, p.layers_per_block, p.latent_channels, p.scaling_factor), (v.block_out_channels, v.norm_num_groups, v.layers_per_block, v.latent_channels, v.scaling_factor));
    let t = TaesdConfig::from_file(&tiny.join("taesd/config.json")).unwrap();
    let p = TaesdConfig::tiny();
    assert_eq!((p.encoder_block_out_channels, p.decoder_block_out_channels, p.num_encoder_blocks, p.num_decoder_blocks), (t.encoder_block_out_channels, t.decoder_block_out_channels, t.num_encoder_blocks, t.num_decoder_blocks));
    let unet = models::presets::tiny_unet();
    assert_eq!(ClipTextConfig::tiny_l().hidden_size + ClipTextConfig::tiny_g().hidden_size, unet.cross_attention_dim);
    assert_eq!(unet.text_time.map(|(per_id, total)| total - 6 * per_id), Some(ClipTextConfig::tiny_g().projection_dim));
}

/// The same parity on a CUDA device (f32; TF32-free tolerance of 1e-3): a GPU, else the CUDA
/// emulator (tests/common/cuda_harness.rs); where neither is available the test says it skipped,
/// visibly, and passes.
#[test]
fn text_encoders_and_autoencoders_on_cuda() {
    cuda_harness::select_device();
    let dev = match engine::cuda::probe() {
        Ok(_) => Device::Cuda(0),
        Err(e) => {
            lookahead::show(&format!("text_encoders_and_autoencoders_on_cuda: skipped: no CUDA device ({e})"));
            return;
        }
    };
    let tiny = fixture_path("sdxl_tiny");
    let f = load_fixture("sdxl_text_vae.safetensors");
    let on = |t: &Tensor| Var::constant(t.to_device(dev).unwrap());
    let close = |name: &str, got: &Var, want: &Tensor| {
        assert_eq!(got.device(), dev, "{name}: result left the device");
        assert_close(name, &got.value().to_device(Device::Cpu).unwrap(), want, 1e-3, 1e-3);
    };
    let enc = SdxlTextEncoders::from_folder(&tiny, None, dev).unwrap();
    let vae = AutoencoderKl::from_folder(tiny.join("vae"), None, dev).unwrap();
    let taesd = AutoencoderTiny::from_folder(tiny.join("taesd"), None, dev).unwrap();
    no_grad(|| {
        let c = encode_ids(&enc.text_encoder, &enc.text_encoder_2, &f["te1_ids"].to_device(dev).unwrap(), &f["te2_ids"].to_device(dev).unwrap(), None).unwrap();
        close("cuda prompt_embeds", &c.prompt_embeds, &f["cond_prompt_embeds"]);
        close("cuda pooled", &c.pooled_prompt_embeds, &f["cond_pooled"]);
        let d = vae.encode(&on(&f["vae_in"])).unwrap();
        close("cuda vae mean", &d.mean, &f["vae_mean"]);
        close("cuda vae logvar", &d.logvar, &f["vae_logvar"]);
        close("cuda vae decode", &vae.decode(&on(&f["vae_dec_in"])).unwrap(), &f["vae_dec_out"]);
        close("cuda taesd encode", &taesd.encode(&on(&f["taesd_in"])).unwrap(), &f["taesd_latents"]);
        close("cuda taesd decode", &taesd.decode(&on(&f["taesd_dec_in"])).unwrap(), &f["taesd_dec_out"]);
    });
    let z = Var::leaf(f["taesd_dec_in"].to_device(dev).unwrap(), true);
    taesd.decode(&z).unwrap().mul(&on(&f["taesd_grad_w"])).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("cuda taesd d/dz", &z.grad().unwrap().to_device(Device::Cpu).unwrap(), &f["taesd_grad_z"], 1e-3, 1e-3);
}
