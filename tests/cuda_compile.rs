//! CI compile check of the CUDA kernels: every kernels/cuda/*.cu compiles with NVRTC to CUBIN for
//! sm_80 (A100) and sm_90 (H100/H200), and ptxas' registers / stack / spills per kernel are printed
//! (with `lookahead::show`, so the CI log shows them). Needs no GPU, only libnvrtc: it is found like the
//! engine finds it (LOOKAHEAD_NVRTC_LIB, the loader path, CUDA_HOME, the CI / reference Python
//! venvs; see kernels::compile::Nvrtc::find). Without NVRTC the test fails when `CI` is set and
//! otherwise prints that it skipped.

use std::collections::BTreeSet;
use std::path::PathBuf;

use kernels::compile::{KernelCache, KernelSource, Nvrtc, HEADERS};

const ARCHS: [u32; 2] = [80, 90];

fn cuda_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels").join("cuda")
}

fn files_with_ext(ext: &str) -> BTreeSet<String> {
    std::fs::read_dir(cuda_dir())
        .expect("kernels/cuda exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn nvrtc_or_skip() -> Option<Nvrtc> {
    match Nvrtc::find() {
        Ok(n) => {
            lookahead::show(&format!("NVRTC {}.{} from {}", n.version().0, n.version().1, n.path().display()));
            Some(n)
        }
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but NVRTC cannot be loaded, so the CUDA kernels are not compile-checked: {e}"),
        Err(e) => {
            lookahead::show(&format!("skipped: NVRTC not found ({e})"));
            None
        }
    }
}

/// Every .cu file is registered in kernels::ALL_SOURCES (or the engine could never load it) and
/// every .cuh header is in kernels::compile::HEADERS (or NVRTC could not include it).
#[test]
fn every_kernel_file_is_registered() {
    let files = files_with_ext("cu");
    let registered: BTreeSet<String> = kernels::ALL_SOURCES.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(files, registered, "kernels/cuda/*.cu vs kernels::ALL_SOURCES");
    let headers: BTreeSet<String> = files_with_ext("cuh").into_iter().map(|h| format!("{h}.cuh")).collect();
    let known: BTreeSet<String> = HEADERS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(headers, known, "kernels/cuda/*.cuh vs kernels::compile::HEADERS");
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let mut failures = Vec::new();
    let mut kernels_seen = 0;
    for src in kernels::ALL_SOURCES {
        // Compile what is on disk (the same text as the embedded source; checked above).
        let code: &'static str = Box::leak(std::fs::read_to_string(cuda_dir().join(format!("{}.cu", src.name))).expect("readable").into_boxed_str());
        let src = KernelSource { name: src.name, code, options: src.options };
        let (nvrtc, src) = (&nvrtc, &src);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ARCHS.iter().map(|&arch| (arch, s.spawn(move || {
                let t = std::time::Instant::now();
                // A cache hit is as good a check as a compile: entries are keyed by the source,
                // headers, options, arch and NVRTC version, and written only after a success.
                (nvrtc.compile(src, arch, &KernelCache::from_env()), t.elapsed())
            }))).collect();
            handles.into_iter().map(|(arch, h)| (arch, h.join().expect("compile thread"))).collect()
        });
        for (arch, (result, took)) in results {
            match result {
                Ok(c) => {
                    let res = c.resources();
                    let how = if c.cached { "from the kernel cache" } else { "compiled" };
                    lookahead::show(&format!("{} sm_{arch}: {} kernels, {} KiB cubin, {how} in {:.1} s", src.path(), res.len(), c.cubin.len() / 1024, took.as_secs_f32()));
                    assert!(!res.is_empty(), "{} sm_{arch}: no ptxas report in the NVRTC log:\n{}", src.path(), c.log);
                    for k in &res {
                        lookahead::show(&k.line(arch));
                    }
                    kernels_seen += res.len();
                    // Serialized wgmmas are correct but far slower, and silent unless the log is
                    // read (Compiled::wgmma_serialized), so they fail here.
                    let serialized = c.wgmma_serialized();
                    if !serialized.is_empty() {
                        lookahead::show(&serialized.join("\n"));
                        failures.push(format!("{} sm_{arch}: wgmma serialized", src.path()));
                    }
                    // setmaxnreg without a register count known at entry (__launch_bounds__(threads,
                    // 1)) is dropped by ptxas with only this note: the warpgroups keep equal registers.
                    if c.log.contains("'setmaxnreg' ignored") {
                        failures.push(format!("{} sm_{arch}: setmaxnreg ignored (the kernel needs __launch_bounds__(threads, 1))", src.path()));
                    }
                }
                Err(e) => {
                    lookahead::show(&format!("{e}"));
                    failures.push(format!("{} sm_{arch}", src.path()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "kernel compile errors (log above): {failures:?}");
    lookahead::show(&format!("compiled {kernels_seen} kernels across {:?}", ARCHS));
}

/// A compile error names the kernel file and line, and quotes the line.
#[test]
fn compile_errors_name_file_and_line() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let src = KernelSource { name: "broken", code: "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* y) { y[0] = not_declared; }\n", options: &[] };
    let err = nvrtc.compile_uncached(&src, 90).expect_err("must not compile").to_string();
    assert!(err.contains("kernels/cuda/broken.cu(2)"), "{err}");
    assert!(err.contains("void k(float* y) { y[0] = not_declared; }"), "{err}");
    lookahead::show(&err);
}

/// The warpgroup MMA wrappers of mma.cuh (inline PTX for sm_90a: wgmma.mma_async in every form,
/// type, N and B major the test kernels use, fence / commit / wait, fence.proxy.async) compile
/// with NVRTC for sm_90a without errors or spills: the only check of their PTX syntax without a
/// GPU. kernels/emu/tests/warpgroup_mma.cu instantiates wgmma_ss and wgmma_rs for bf16 and f16,
/// N = 64, 96, 128, 160, 192, 256 and both B majors; its emulated results are checked by
/// tests/cuda_emulation.rs. For sm_80 the same file must compile to empty kernels (LA_WGMMA 0).
#[test]
fn warpgroup_mma_wrappers_compile_for_sm90a() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels/emu/tests/warpgroup_mma.cu");
    let code: &'static str = Box::leak(std::fs::read_to_string(&path).expect("kernels/emu/tests/warpgroup_mma.cu").into_boxed_str());
    let src = KernelSource { name: "emu_tests_warpgroup_mma", code, options: &[] };
    for arch in ARCHS {
        let c = nvrtc.compile_uncached(&src, arch).unwrap_or_else(|e| panic!("warpgroup_mma.cu does not compile for {}: {e}", kernels::compile::arch_name(arch)));
        let res = c.resources();
        assert_eq!(res.len(), 29, "{}: kernels in the ptxas report:\n{}", kernels::compile::arch_name(arch), c.log);
        for k in &res {
            lookahead::show(&k.line(arch));
        }
        if arch == 90 {
            // Real wgmma instructions, not empty kernels (the guard picked the sm_90a path).
            assert!(res.iter().all(|k| k.registers > 16), "sm_90a kernels look empty:\n{}", c.log);
        }
    }
}

/// The pipeline wrappers of pipeline.cuh (inline PTX for sm_90a: bar.sync / bar.arrive, mbarrier
/// init / arrive / arrive.expect_tx / try_wait.parity, cp.async.mbarrier.arrive, TMA loads and
/// stores with their bulk groups, prefetch.tensormap, setmaxnreg) compile with NVRTC for sm_90a
/// without errors, spills or a dropped setmaxnreg: the only check of their PTX syntax without a
/// GPU. kernels/emu/tests/{pipeline,tma}.cu use every one of them; tests/cuda_emulation.rs checks
/// their emulated behaviour. For sm_80 the files compile to empty kernels (LA_WGMMA 0).
#[test]
fn pipeline_wrappers_compile_for_sm90a() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    for (file, kernels) in [("pipeline", 11), ("tma", 4)] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("kernels/emu/tests/{file}.cu"));
        let code: &'static str = Box::leak(std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_boxed_str());
        let name: &'static str = Box::leak(format!("emu_tests_{file}").into_boxed_str());
        let src = KernelSource { name, code, options: &[] };
        for arch in ARCHS {
            let c = nvrtc.compile_uncached(&src, arch).unwrap_or_else(|e| panic!("{file}.cu does not compile for {}: {e}", kernels::compile::arch_name(arch)));
            let res = c.resources();
            for k in &res {
                lookahead::show(&k.line(arch));
            }
            if arch == 90 {
                assert_eq!(res.len(), kernels, "{file}.cu sm_90a: kernels in the ptxas report:\n{}", c.log);
                assert!(res.iter().all(|k| k.spill_store_bytes == 0), "{file}.cu sm_90a spills:\n{}", c.log);
                assert!(!c.log.contains("'setmaxnreg' ignored"), "{file}.cu sm_90a: setmaxnreg ignored:\n{}", c.log);
            }
        }
    }
}
