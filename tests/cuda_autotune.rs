//! Tuned kernel variants (engine::cuda::tune, LOOKAHEAD_AUTOTUNE=1) end to end on a CUDA device
//! (a GPU, else the emulated device): the fused LoRA GEMM, the Hopper attention forward and its
//! backward, and the group norm forward and backward each time their variants on the call's operands, record the choice with every
//! variant's time in the tuning table, and give the CPU's results; a choice written in the table
//! is the kernel that then runs (the profiler names it); a broken table is an error naming it.
//! One test: the tuning switches are read once per process, before the first choice.
//! (Harness: tests/common/cuda_harness.rs.)

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

use cuda_harness::{cuda, hopper_device, input, KernelSwitches};
use engine::ops::flash_attention::AttentionReference;
use engine::{DType, Device, Result, Tensor};

/// The tuned families' calls on `dev` (bf16, shapes the TMA / warp-specialized variants take:
/// LoRA rank 8, attention head dim 64 with reference tokens; group norm + SiLU forward with
/// statistics and backward): (lora y, attention out, dq, group-norm y, group-norm dx).
fn calls(dev: Device) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let f = |shape: &[usize], lo: f32, hi: f32, seed: u64| input(shape, DType::BF16, lo, hi, seed, dev);
    let (x, w, a, b) = (f(&[200, 64], -1.0, 1.0, 1)?, f(&[160, 64], -1.0, 1.0, 2)?, f(&[8, 64], -0.25, 0.25, 3)?, f(&[160, 8], -0.25, 0.25, 4)?);
    let y = x.lora_linear(&w, None, &a, &b, 0.5)?;
    let (q, k, v) = (f(&[1, 2, 130, 64], -1.0, 1.0, 5)?, f(&[1, 2, 70, 64], -1.0, 1.0, 6)?, f(&[1, 2, 70, 64], -1.0, 1.0, 7)?);
    let (kr, vr, dout) = (f(&[1, 2, 64, 64], -1.0, 1.0, 8)?, f(&[1, 2, 64, 64], -1.0, 1.0, 9)?, f(&[1, 2, 130, 64], -1.0, 1.0, 10)?);
    let reference = || Some(AttentionReference { k: &kr, v: &vr, keep: None });
    let (out, lse) = Tensor::flash_attention(&q, &k, &v, reference(), 0.125)?;
    let grads = Tensor::flash_attention_backward(&q, &k, &v, reference(), 0.125, &out, &lse, &dout)?;
    let (xg, dyg) = (f(&[2, 64, 8, 8], -1.0, 1.0, 11)?, f(&[2, 64, 8, 8], -1.0, 1.0, 12)?);
    let (wg, bg) = (input(&[64], DType::F32, 0.5, 1.5, 13, dev)?, input(&[64], DType::F32, -0.5, 0.5, 14, dev)?);
    let (yg, stats) = xg.group_norm_stats(8, Some(&wg), Some(&bg), 1e-5, true)?;
    let dxg = xg.group_norm_backward(&dyg, 8, Some(&wg), Some(&bg), 1e-5, true, Some(&stats), true)?.0;
    Ok((y, out, grads.dq, yg, dxg))
}

type Results = (Tensor, Tensor, Tensor, Tensor, Tensor);

fn compare(label: &str, got: &Results, want: &Results) {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
    lookahead::assert_close(&format!("{label}: lora_linear"), &cpu(&got.0), &want.0, 2.5e-2, 2e-2);
    lookahead::assert_close(&format!("{label}: flash_attention"), &cpu(&got.1), &want.1, 2e-2, 2e-2);
    lookahead::assert_close(&format!("{label}: dq"), &cpu(&got.2), &want.2, 3e-2, 3e-2);
    lookahead::assert_close(&format!("{label}: group_norm"), &cpu(&got.3), &want.3, 2e-2, 2e-2);
    lookahead::assert_close(&format!("{label}: group_norm_backward"), &cpu(&got.4), &want.4, 3e-2, 3e-2);
}

/// The table's entries of `family` (their keys hold "| family "): (key, chosen variant, trial
/// results) each; `count` of them.
fn entries(table: &serde_json::Value, family: &str, count: usize) -> Vec<(String, String, serde_json::Map<String, serde_json::Value>)> {
    let found: Vec<_> = table
        .as_object()
        .expect("the table is an object")
        .iter()
        .filter(|(k, _)| k.contains(&format!("| {family} ")))
        .map(|(key, e)| (key.clone(), e["variant"].as_str().expect("a variant name").to_string(), e["ms"].as_object().expect("trial results").clone()))
        .collect();
    assert_eq!(found.len(), count, "{count} {family} entries in {table:#}");
    found
}

#[test]
fn variants_are_tuned_recorded_and_reused() {
    let dir = std::env::temp_dir().join(format!("lookahead-autotune-{}", std::process::id()));
    let file = dir.join("tuned.json");
    std::env::set_var("LOOKAHEAD_AUTOTUNE", "1");
    std::env::set_var("LOOKAHEAD_TUNE_FILE", &file);
    let Some((dev, _gpu)) = cuda("variants_are_tuned_recorded_and_reused") else { return };
    if !hopper_device(dev, "variants_are_tuned_recorded_and_reused") {
        return;
    }
    let _switches = KernelSwitches::set(true, true);
    let want = calls(Device::Cpu).unwrap();

    // First calls: every variant tried, the fastest recorded.
    compare("tuned", &calls(dev).unwrap(), &want);
    let table: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("the tuning table was written")).unwrap();
    for (family, names, count) in [
        ("lora", engine::cuda::lora_linear::VARIANTS.names, 1),
        ("flash_fwd", engine::cuda::flash_attention::HOPPER_VARIANTS.names, 1),
        ("flash_bwd", engine::cuda::flash_attention_backward::HOPPER_VARIANTS.names, 1),
        ("group_norm", engine::cuda::norm::VARIANTS.names, 2),
    ] {
        for (key, variant, ms) in entries(&table, family, count) {
            assert!(names.contains(&variant.as_str()), "{key}: {variant} is not one of {names:?}");
            assert_eq!(ms.len(), names.len(), "{key}: one trial result per variant: {ms:?}");
            assert!(ms[&variant].is_f64(), "{key}: the chosen variant ran: {ms:?}");
            assert!(ms.values().all(|v| v.is_f64() || v.is_string()), "{key}: times or errors: {ms:?}");
        }
    }

    // Choices written into the table are what runs.
    let mut table = table;
    for (family, variant, count) in [("lora", "tma-pp", 1), ("flash_fwd", "ws3", 1), ("flash_bwd", "ws_stagger", 1), ("group_norm", "two-phase", 2)] {
        for (key, _, _) in entries(&table, family, count) {
            table[&key]["variant"] = serde_json::Value::from(variant);
        }
    }
    std::fs::write(&file, serde_json::to_string(&table).unwrap()).unwrap();
    engine::cuda::tune::forget_table();
    let cuda = engine::cuda::device(0).unwrap();
    cuda.profile_begin();
    let got = calls(dev).unwrap();
    let kernels: Vec<String> = cuda.profile_end().unwrap().into_iter().map(|k| k.name).collect();
    compare("chosen in the table", &got, &want);
    // Only those: no trials ran (each would launch every variant).
    for (family, prefix, kernel) in [("lora", "lora_gemm", "lora_gemm_tma_pp_"), ("flash_fwd", "flash_attention_hopper_fwd", "flash_attention_hopper_fwd_bf16_d64_ws3"), ("flash_bwd", "flash_bwd_hopper", "flash_bwd_hopper_ws_stagger_bf16_d64")] {
        let launched: Vec<&String> = kernels.iter().filter(|k| k.starts_with(prefix)).collect();
        assert!(!launched.is_empty() && launched.iter().all(|k| k.starts_with(kernel)), "{family}: launched {launched:?}, the table chose {kernel}*");
    }
    // Group norm two-phase: statistics and apply kernels, no cluster kernel (the default here).
    let cluster: Vec<&String> = kernels.iter().filter(|k| k.starts_with("gn_cluster")).collect();
    assert!(cluster.is_empty() && kernels.iter().any(|k| k.starts_with("gn_bwd_reduce")), "group_norm: the table chose two-phase; launched {kernels:?}");

    // A variable naming no variant is an error also where nothing is tuned (head dim 128).
    std::env::set_var("LOOKAHEAD_VARIANT_FLASH_FWD", "ws9");
    let f = |shape: &[usize], seed: u64| input(shape, DType::BF16, -1.0, 1.0, seed, dev).unwrap();
    let (q, k) = (f(&[1, 1, 16, 128], 11), f(&[1, 1, 16, 128], 12));
    let e = Tensor::flash_attention(&q, &k, &k, None, 0.1).err().expect("an unknown variant is an error");
    std::env::remove_var("LOOKAHEAD_VARIANT_FLASH_FWD");
    assert!(e.to_string().contains("LOOKAHEAD_VARIANT_FLASH_FWD=ws9") && e.to_string().contains("ws_tma"), "{e}");

    // A table that is not one is an error naming the file, not a silent default.
    std::fs::write(&file, "[]").unwrap();
    engine::cuda::tune::forget_table();
    let e = calls(dev).err().expect("a broken table is an error");
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
