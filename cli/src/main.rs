//! The `lookahead` binary. Each subcommand lives in its own module with a clap `Args` struct and a
//! `run` function; this file only parses the command line and dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod convert;
mod inspect;
mod kernels;

#[derive(Parser, Debug)]
#[command(name = "lookahead", version, about = "LCM-Lookahead: SDXL identity personalisation on a Rust/CUDA engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the tensors of a weights file (.safetensors, or a PyTorch .bin/.pth/.pt checkpoint).
    Inspect(inspect::InspectArgs),
    /// Write any supported weights file (.bin/.pth/.pt or .safetensors) as safetensors.
    Convert(convert::ConvertArgs),
    /// Time the engine's kernels at SDXL-like shapes (table, or --json), optionally next to PyTorch.
    Bench(bench::BenchArgs),
    /// Compile every CUDA kernel family for one GPU architecture into the kernel cache, in
    /// parallel, and print registers / spills per kernel.
    Kernels(kernels::KernelsArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match &cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Bench(a) => bench::run(a.clone()),
        Command::Kernels(a) => kernels::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, leaving out causes the message already states (the
/// engine's I/O errors include their source), and without a backtrace: these are user errors.
fn message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out = format!("{out}: {c}");
        }
    }
    out
}
