//! `lookahead convert IN OUT.safetensors [--force]`: rewrites any weights file the project reads
//! (safetensors, or a PyTorch .bin/.pth/.pt checkpoint, zip or legacy, such as IP-Adapter's nested
//! {"image_proj": ..., "ip_adapter": ...} dict, IR-SE50 or MTCNN) as safetensors. Nested dicts
//! become dotted names (`image_proj.latents`), non-tensor leaves are dropped, dtypes and shapes are
//! kept. The file is written atomically (temporary file, fsync, rename) and an existing OUT is only
//! replaced with --force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// A .safetensors file or a PyTorch .bin/.pth/.pt checkpoint.
    input: PathBuf,
    /// The safetensors file to write.
    output: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let report = convert(&args.input, &args.output, args.force)?;
    println!("{report}");
    Ok(())
}

/// Converts `input` to safetensors at `output`; returns a one-line report.
pub fn convert(input: &Path, output: &Path, force: bool) -> Result<String> {
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("{}: the output must be a .safetensors file", output.display());
    }
    if output.exists() && !force {
        bail!("{} exists; pass --force to replace it", output.display());
    }
    let (format, tensors) = engine::io::load_any(input)?;
    let family = models::family::identify(tensors.iter().map(|(k, t)| (k.as_str(), t.shape())));
    let list: Vec<(&str, &engine::Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut meta = BTreeMap::new();
    // The convention of PyTorch-origin safetensors files (diffusers and transformers read it).
    meta.insert("format".to_string(), "pt".to_string());
    if let Some(name) = input.file_name().and_then(|n| n.to_str()) {
        meta.insert("converted_from".to_string(), name.to_string());
    }
    engine::io::safetensors::save(output, &list, Some(&meta)).with_context(|| format!("writing {}", output.display()))?;
    let family = family.map_or("unknown family".to_string(), |f| f.to_string());
    Ok(format!("{} ({format}, {family}): {} tensors -> {}", input.display(), tensors.len(), output.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    fn same(a: &BTreeMap<String, engine::Tensor>, b: &BTreeMap<String, engine::Tensor>) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in a {
            let u = &b[k];
            assert_eq!((t.dtype(), t.shape()), (u.dtype(), u.shape()), "{k}");
            let (x, y) = (t.to_dtype(engine::DType::F32).unwrap().to_vec_f32().unwrap(), u.to_dtype(engine::DType::F32).unwrap().to_vec_f32().unwrap());
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan())), "{k}: values differ");
        }
    }

    #[test]
    fn bin_round_trips_through_safetensors() {
        let dir = std::env::temp_dir().join(format!("lookahead-convert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["ip_adapter_tiny.bin", "weights_io.bin", "face_irse.pth"] {
            let out = dir.join(format!("{name}.safetensors"));
            let report = convert(&fixture(name), &out, false).unwrap();
            assert!(report.contains("pytorch-zip"), "{report}");
            let (_, want) = engine::io::load_any(fixture(name)).unwrap();
            let got = engine::io::safetensors::load(&out).unwrap();
            same(&want, &got);
            if name == "ip_adapter_tiny.bin" {
                assert!(report.contains("IP-Adapter Plus") && got.contains_key("image_proj.latents") && got.contains_key("ip_adapter.1.to_k_ip.weight"), "{report}");
            }
            let e = convert(&fixture(name), &out, false).unwrap_err().to_string();
            assert!(e.contains("exists") && e.contains("--force"), "{e}");
            convert(&fixture(name), &out, true).unwrap();
        }
        let e = convert(&fixture("weights_io.bin"), &dir.join("x.bin"), true).unwrap_err().to_string();
        assert!(e.contains(".safetensors"), "{e}");
        let e = convert(&fixture("ip_adapter_tiny.safetensors.missing"), &dir.join("y.safetensors"), true).unwrap_err().to_string();
        assert!(e.contains("ip_adapter_tiny.safetensors.missing"), "{e}");
        assert!(!dir.join("y.safetensors").exists());
        // The legacy format converts to the same tensors as the zip one.
        let report = convert(&fixture("weights_io_legacy.pt"), &dir.join("legacy.safetensors"), true).unwrap();
        assert!(report.contains("pytorch-legacy"), "{report}");
        same(&engine::io::load_any(fixture("weights_io.bin")).unwrap().1, &engine::io::safetensors::load(dir.join("legacy.safetensors")).unwrap());
        std::fs::remove_dir_all(&dir).ok();
    }
}
