//! scripts/gpu-check.sh end to end on the emulated CUDA device with its kernels skipped
//! (`LOOKAHEAD_EMU_KERNELS=skip`: every launch checked, none run): the script a GPU session gets
//! 15 minutes to run, checked on every CI run for everything but the numbers. Each step must
//! pass: the NVRTC compile of every family, the default bench pass with its per-kernel profile,
//! the pass with the performance kernels off, the tuned pass (its choices in tuned.json), and
//! every entry of scripts/gpu-variants.txt (a
//! variant renamed in the engine, or a filter that matches no case, fails here); and the report
//! must end with the fastest-run table and the open issues' targets, one row per case.
//! The parity tests are not carried (with kernels skipped they would compare NaN); the PyTorch
//! baseline is left out (CI has no torch), which also checks the pass without it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("cli/ has a parent").to_path_buf()
}

/// Points this process (and so the script it starts) at the emulated device; None, after
/// saying why, where that is not what runs: a machine with a CUDA driver runs the real script.
fn emulated_device() -> Option<()> {
    // SAFETY: loading the driver library runs only its own initialisers; dropped at once.
    let driver = ["libcuda.so", "libcuda.so.1"].iter().any(|name| unsafe { libloading::Library::new(*name) }.is_ok());
    if driver {
        eprintln!("gpu_check_script: skipped: this machine has a CUDA driver (run scripts/gpu-check.sh itself)");
        return None;
    }
    if let Err(e) = kernels::emulate::find_compiler() {
        assert!(std::env::var_os("CI").is_none(), "CI needs a C++ compiler for the emulated device: {e}");
        eprintln!("gpu_check_script: skipped: no C++ compiler for the emulated device ({e})");
        return None;
    }
    let library = lookahead_cuda_emulator::built_library().expect("liblookahead_cuda_emulator.so next to the test binary (cargo builds it for the dev-dependency)");
    lookahead_cuda_emulator::use_emulator(&library).expect("the emulated device's folder of library links");
    Some(())
}

#[test]
fn gpu_check_runs_every_step_on_the_emulated_device() {
    if emulated_device().is_none() {
        return;
    }
    let scratch = std::env::temp_dir().join(format!("lookahead-gpu-check-{}", std::process::id()));
    let (carry, out) = (scratch.join("carry"), scratch.join("out"));
    std::fs::create_dir_all(carry.join("tests")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_lookahead"), carry.join("lookahead")).unwrap();

    let status = Command::new("bash")
        .arg(repo_root().join("scripts/gpu-check.sh"))
        .env("CARRY", &carry)
        .env("OUT", &out)
        .env("BASELINE", "")
        .env("BENCH_MIN_TIME", "0.005")
        .env("BUDGET_S", "1500")
        .env("LOOKAHEAD_EMU_KERNELS", "skip")
        .status()
        .expect("running bash");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{}: {e}", out.join(name).display()));
    let summary = read("summary.txt");
    let bench = read("bench.txt");
    assert!(status.success(), "gpu-check.sh failed ({status}):\n{summary}\n--- bench.txt ---\n{bench}");

    // Every step ran and passed: the compile, the two bench passes, one line per variant entry.
    let variants: Vec<String> = std::fs::read_to_string(repo_root().join("scripts/gpu-variants.txt"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split('|').next().unwrap().to_string())
        .collect();
    assert!(!variants.is_empty());
    let passed: Vec<&str> = summary.lines().filter(|l| l.starts_with("PASS")).collect();
    assert!(passed.iter().any(|l| l.contains("kernels (NVRTC")), "{summary}");
    assert!(passed.iter().any(|l| l.contains("--profile (no baseline)")), "{summary}");
    assert!(passed.iter().any(|l| l.contains("performance kernels off")), "{summary}");
    for v in &variants {
        assert!(passed.iter().any(|l| l.contains(&format!("bench {v} "))), "no passing step for {v}:\n{summary}");
    }
    assert!(passed.iter().any(|l| l.contains("bench LOOKAHEAD_AUTOTUNE=1 ")), "no passing tuned pass:\n{summary}");
    assert!(!summary.contains("FAIL") && !summary.contains("SKIP"), "{summary}");
    // The tuned pass's choices come back: one entry per tuned family and shape at least.
    let tuned = read("tuned.json");
    for family in ["lora", "flash_fwd", "flash_bwd", "group_norm"] {
        assert!(tuned.contains(&format!("| {family} ")), "no {family} choice in tuned.json:\n{tuned}");
    }
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(files <= 8, "{files} files in $OUT; the device tool brings back 8");

    // The report: per-kernel profile lines, the fastest-run table and the targets of #3 and #7,
    // every target with at least one case.
    assert!(bench.contains("bench.json -- lookahead bench: cuda"), "{bench}");
    assert!(bench.contains(" ms ") && bench.contains("%  x"), "no per-kernel profile lines:\n{bench}");
    let fastest = bench.split("fastest run of each case").nth(1).expect("the fastest-run table");
    let targets = fastest.split("targets of the open issues").nth(1).expect("the targets table");
    for target in [
        "#3 elementwise >= 85% of copy",
        "#3 group norm >= 80% of copy",
        "#3 softmax / layer norm >= 80% of copy",
        "#7 attention >= 1.2x PyTorch SDPA best",
        "#7 group norm+SiLU >= 85% of copy",
        "#7 LoRA base GEMM >= 95% of cuBLAS",
        "#7 LoRA r <= 64 within 5% of the base",
    ] {
        assert!(targets.lines().any(|l| l.starts_with(target)), "no row for {target:?}:\n{targets}");
    }
    let tuned_table = targets.split("tuned pass: the variant chosen").nth(1).expect("the tuned choices table");
    for family in ["lora", "flash_fwd", "flash_bwd", "group_norm"] {
        assert!(tuned_table.lines().any(|l| l.starts_with(family) && l.contains(" -> ")), "no {family} row in the tuned choices:\n{tuned_table}");
    }
    for case in ["ext attention bwd b2 h10 4096x(4096+4096)", "lora_linear 8192x640x640 r64", "group_norm+silu cl (2,320,128,128)"] {
        assert!(fastest.lines().any(|l| l.starts_with(case)), "{case} missing from the fastest-run table:\n{fastest}");
    }
    std::fs::remove_dir_all(&scratch).ok();
}
