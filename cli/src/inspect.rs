//! `lookahead inspect PATH`: what a weights file holds (format, every tensor's name, dtype and
//! shape, and totals), read from the header or pickle only: no tensor data is loaded, so it is
//! instant on multi-GB checkpoints. Works on safetensors and PyTorch checkpoints, zip or legacy
//! (.bin, .pth, .pt), chosen by content rather than by file name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A .safetensors file or a PyTorch .bin/.pth/.pt checkpoint.
    path: PathBuf,
    /// Machine-readable JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    path: String,
    format: String,
    /// The model family recognised from the tensor names and shapes (models::family), if any.
    family: Option<String>,
    tensor_count: usize,
    parameter_count: u64,
    size_in_bytes: u64,
    /// Tensor count per dtype.
    dtypes: BTreeMap<String, usize>,
    tensors: Vec<TensorRow>,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    size_in_bytes: u64,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let report = build(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

fn build(args: &InspectArgs) -> Result<Report> {
    // The readers' errors already name the file (and the tensor, when one is at fault).
    let (format, mut list) = engine::io::list_any(&args.path)?;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let family = models::family::identify(list.iter().map(|t| (t.name.as_str(), t.shape.as_slice()))).map(|f| f.to_string());
    let mut dtypes = BTreeMap::new();
    for t in &list {
        *dtypes.entry(t.dtype.clone()).or_insert(0) += 1;
    }
    let tensors: Vec<TensorRow> = list
        .into_iter()
        .map(|t| TensorRow { name: t.name, dtype: t.dtype, shape: t.shape, size_in_bytes: t.size_in_bytes as u64 })
        .collect();
    Ok(Report {
        path: args.path.display().to_string(),
        format: format.to_string(),
        family,
        tensor_count: tensors.len(),
        // Saturating: the readers bound each tensor, not the sum over a corrupt file's many views.
        parameter_count: tensors.iter().map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>()).fold(0, u64::saturating_add),
        size_in_bytes: tensors.iter().map(|t| t.size_in_bytes).fold(0, u64::saturating_add),
        dtypes,
        tensors,
    })
}

fn table(r: &Report) -> String {
    let shape = |s: &[usize]| format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
    let name_w = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0).max(4);
    let mut out = String::new();
    out += &format!("{:<name_w$}  {:<5}  SHAPE\n", "NAME", "DTYPE");
    for t in &r.tensors {
        out += &format!("{:<name_w$}  {:<5}  {}\n", t.name, t.dtype, shape(&t.shape));
    }
    let dtypes: Vec<String> = r.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
    out += &format!("\nfile        {}\n", r.path);
    out += &format!("format      {}\n", r.format);
    out += &format!("family      {}\n", r.family.as_deref().unwrap_or("unknown"));
    out += &format!("tensors     {} ({})\n", r.tensor_count, dtypes.join(", "));
    out += &format!("parameters  {}\n", with_human(r.parameter_count, 1000.0, &["", " K", " M", " B"]));
    out += &format!("bytes       {}\n", with_human(r.size_in_bytes, 1024.0, &[" B", " KiB", " MiB", " GiB"]));
    out
}

/// "1234567 (1.23 M)", or just "123" when the number is small.
fn with_human(v: u64, base: f64, units: &[&str]) -> String {
    if (v as f64) < base {
        v.to_string()
    } else {
        format!("{v} ({})", human(v as f64, base, units))
    }
}

/// 1234567 -> "1.23 M" (with the given base and unit names).
fn human(mut v: f64, base: f64, units: &[&str]) -> String {
    let mut i = 0;
    while v >= base && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    if i == 0 {
        format!("{v}{}", units[0])
    } else {
        format!("{v:.2}{}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    #[test]
    fn inspect_reports_both_formats_alike() {
        // The .bin and the safetensors file hold the same tensors (tests/fixtures/gen/weights_io.py).
        let bin = build(&InspectArgs { path: fixture("weights_io.bin"), json: false }).unwrap();
        let st = build(&InspectArgs { path: fixture("weights_io_expected.safetensors"), json: true }).unwrap();
        assert_eq!((bin.format.as_str(), st.format.as_str()), ("pytorch-zip", "safetensors"));
        assert_eq!((bin.tensor_count, bin.parameter_count, bin.size_in_bytes), (10, 58, 213));
        assert_eq!((st.tensor_count, st.parameter_count, st.size_in_bytes), (10, 58, 213));
        assert_eq!(serde_json::to_value(&bin.tensors).unwrap(), serde_json::to_value(&st.tensors).unwrap());
        let names: Vec<&str> = bin.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by name: {names:?}");
        let text = table(&bin);
        assert!(text.contains("ip_adapter.shared_b") && text.contains("[2, 3]") && text.contains("pytorch-zip"), "{text}");
        assert!(text.contains("family      unknown"), "{text}");
    }

    #[test]
    fn inspect_names_the_family() {
        let r = build(&InspectArgs { path: fixture("ip_adapter_tiny.bin"), json: false }).unwrap();
        assert!(r.family.as_deref().is_some_and(|f| f.starts_with("IP-Adapter Plus / Plus-Face")), "{:?}", r.family);
        let r = build(&InspectArgs { path: fixture("mtcnn.safetensors"), json: true }).unwrap();
        assert_eq!(r.family.as_deref(), Some("MTCNN P-Net + R-Net + O-Net"));
        assert!(table(&r).contains("family      MTCNN"));
    }

    #[test]
    fn inspect_reads_the_legacy_format_like_the_zip_one() {
        let legacy = build(&InspectArgs { path: fixture("weights_io_legacy.pt"), json: false }).unwrap();
        let bin = build(&InspectArgs { path: fixture("weights_io.bin"), json: false }).unwrap();
        assert_eq!(legacy.format, "pytorch-legacy");
        assert_eq!(serde_json::to_value(&legacy.tensors).unwrap(), serde_json::to_value(&bin.tensors).unwrap());
        assert!(table(&legacy).contains("pytorch-legacy"));
    }

    #[test]
    fn inspect_errors_name_the_file() {
        let p = std::env::temp_dir().join(format!("lookahead-inspect-{}.pt", std::process::id()));
        let mut cut = std::fs::read(fixture("weights_io_legacy.pt")).unwrap();
        cut.truncate(cut.len() - 1);
        std::fs::write(&p, &cut).unwrap();
        let r = build(&InspectArgs { path: p.clone(), json: false });
        std::fs::remove_file(&p).ok();
        let Err(e) = r else { panic!("a truncated file was accepted") };
        let e = e.to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("legacy"), "{e}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human(999.0, 1000.0, &["", " K", " M"]), "999");
        assert_eq!(human(1_234_567.0, 1000.0, &["", " K", " M"]), "1.23 M");
        assert_eq!(human(2048.0, 1024.0, &[" B", " KiB"]), "2.00 KiB");
    }
}
