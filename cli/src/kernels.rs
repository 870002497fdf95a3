//! `lookahead kernels`: compiles every CUDA kernel family for one GPU architecture with NVRTC, all
//! families at once (one thread each), into the kernel cache the engine loads from, and prints
//! each kernel's registers, stack and spills as ptxas reports them. Run before timing on a fresh
//! machine, the benchmarks and tests then load CUBINs instead of compiling on first use (NVRTC
//! takes up to a minute for the largest families); run anywhere with `--arch` to see what a
//! kernel change does to registers without a GPU.

use anyhow::{bail, Context, Result};
use clap::Args;
use kernels::compile::{arch_name, KernelCache, Nvrtc};

#[derive(Args, Debug, Clone)]
pub struct KernelsArgs {
    /// Compute capability as one number (80 = A100, 90 = H100/H200, compiled as sm_90a). Default:
    /// that of CUDA device 0.
    #[arg(long)]
    arch: Option<u32>,
    /// Only the families whose name contains one of these comma-separated parts.
    #[arg(long)]
    filter: Option<String>,
    /// One line per family only (no per-kernel registers).
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: &KernelsArgs) -> Result<()> {
    let arch = match args.arch {
        Some(a) => a,
        None => engine::cuda::device(0).map(|d| d.arch()).context("no --arch given and no CUDA device to take it from")?,
    };
    let nvrtc = Nvrtc::find().context("kernels")?;
    let cache = KernelCache::from_env();
    let sources: Vec<_> = kernels::ALL_SOURCES.iter().filter(|s| args.filter.as_deref().is_none_or(|f| f.split(',').any(|part| s.name.contains(part)))).collect();
    if sources.is_empty() {
        bail!("--filter {:?} matches no kernel family", args.filter.clone().unwrap_or_default());
    }
    eprintln!("compiling {} kernel families for {} with NVRTC {}.{} ({})", sources.len(), arch_name(arch), nvrtc.version().0, nvrtc.version().1, nvrtc.path().display());
    let started = std::time::Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let (nvrtc, cache) = (&nvrtc, &cache);
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    (nvrtc.compile(src, arch, cache), t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("compile thread")).collect()
    });
    let (mut failed, mut spilling, mut serialized) = (Vec::new(), 0usize, 0usize);
    for (src, (result, took)) in sources.iter().zip(results) {
        match result {
            Ok(c) => {
                let res = c.resources();
                let how = if c.cached { "from the cache" } else { "compiled" };
                println!("{}: {} kernels, {} KiB cubin, {how} in {:.1} s", src.path(), res.len(), c.cubin.len() / 1024, took.as_secs_f32());
                spilling += res.iter().filter(|k| k.spill_store_bytes + k.spill_load_bytes > 0).count();
                if !args.quiet {
                    for k in &res {
                        println!("{}", k.line(arch));
                    }
                }
                for note in c.wgmma_serialized() {
                    println!("  {note}");
                    serialized += 1;
                }
            }
            Err(e) => {
                println!("{e}");
                failed.push(src.name);
            }
        }
    }
    println!("{} families in {:.1} s; {spilling} kernels spill; {serialized} wgmma-serialization notes", sources.len(), started.elapsed().as_secs_f32());
    if !failed.is_empty() {
        bail!("compile errors in {failed:?} (above)");
    }
    Ok(())
}
