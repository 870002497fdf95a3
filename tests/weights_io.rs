//! Weights readers and writer against files written by the reference tools
//! (tests/fixtures/gen/weights_io.py: torch.save and the `safetensors` package).

use std::collections::BTreeMap;
use std::path::PathBuf;

use engine::io::{self, safetensors, torch, Format};
use engine::{DType, Device, Tensor};
use lookahead::fixture_path;

/// A fresh empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("lookahead-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Values of any dtype as f64 (exact for every dtype we have, i64 up to 2^53).
fn values(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::I64 => t.to_vec::<i64>().unwrap().into_iter().map(|v| v as f64).collect(),
        DType::U8 => t.to_vec::<u8>().unwrap().into_iter().map(|v| v as f64).collect(),
        _ => t.to_vec_f32().unwrap().into_iter().map(|v| v as f64).collect(),
    }
}

fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    assert_eq!(values(got), values(want), "{name}: values");
}

fn sample_tensors() -> Vec<(String, Tensor)> {
    let f: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let a = Tensor::from_vec(f.clone(), &[3, 4], Device::Cpu).unwrap();
    vec![
        ("a.f32".into(), a.clone()),
        ("b.bf16_transposed".into(), a.to_dtype(DType::BF16).unwrap().t().unwrap()),
        ("c.f16".into(), Tensor::from_vec(f.iter().map(|&v| half::f16::from_f32(v)).collect(), &[2, 3, 2], Device::Cpu).unwrap()),
        ("d.i64".into(), Tensor::from_vec(vec![1i64, -2, 1 << 40], &[3], Device::Cpu).unwrap()),
        ("e.u8_odd".into(), Tensor::from_vec(vec![1u8, 2, 3, 4, 5], &[5], Device::Cpu).unwrap()),
        ("f.scalar".into(), Tensor::from_vec(vec![7.5f32], &[], Device::Cpu).unwrap()),
        ("g.empty".into(), Tensor::from_vec(Vec::<f32>::new(), &[0, 3], Device::Cpu).unwrap()),
        ("h.narrowed".into(), a.narrow(1, 1, 2).unwrap()),
    ]
}

#[test]
fn safetensors_round_trip_is_exact_atomic_and_zero_copy() {
    let dir = TempDir::new("st");
    let path = dir.0.join("round.safetensors");
    let tensors = sample_tensors();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // Written twice: the second write replaces the first through the rename.
    safetensors::save(&path, &refs[..2], None).unwrap();
    safetensors::save(&path, &refs, Some(&meta)).unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");

    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(header_len % 8, 0, "header padded to 8 bytes");

    let loaded = safetensors::load(&path).unwrap();
    assert_eq!(loaded.len(), tensors.len());
    for (name, t) in &tensors {
        let got = &loaded[name];
        assert_same(name, got, t);
        assert!(got.elem_count() == 0 || got.is_mapped(), "{name}: expected a zero-copy mapped tensor");
    }
    let file = safetensors::SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.metadata(), &meta);
    let names: Vec<&str> = file.entries().iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries sorted by name");
    assert!(file.tensor("c.f16").unwrap().is_mapped());
    assert!(file.tensor("nope").unwrap_err().to_string().contains("nope"));
}

#[test]
fn safetensors_save_rejects_duplicate_names_and_leaves_no_file() {
    let dir = TempDir::new("st-dup");
    let path = dir.0.join("dup.safetensors");
    let t = Tensor::from_vec(vec![1f32], &[1], Device::Cpu).unwrap();
    let err = safetensors::save(&path, &[("x", &t), ("x", &t)], None).unwrap_err().to_string();
    assert!(err.contains("dup.safetensors") && err.contains("`x`"), "{err}");
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn reference_safetensors_file_loads_zero_copy() {
    let path = fixture_path("weights_io_expected.safetensors");
    let file = safetensors::SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.metadata().get("source").map(String::as_str), Some("weights_io.py"));
    let all = file.tensors().unwrap();
    assert_eq!(all.len(), 10);
    for (name, t) in &all {
        assert!(t.is_mapped(), "{name}: the reference writer aligns data, so this should be zero copy");
    }
    assert_eq!(all["ip_adapter.mask"].dtype(), DType::U8, "BOOL reads as U8");
    assert_eq!(all["ip_adapter.mask"].to_vec::<u8>().unwrap(), vec![1, 0, 1]);
    assert_eq!(all["ip_adapter.steps"].to_vec::<i64>().unwrap(), vec![3, -1, 1 << 40]);
}

#[test]
fn torch_bin_matches_the_reference_values() {
    let bin = fixture_path("weights_io.bin");
    let (format, got) = io::load_any(&bin).unwrap();
    assert_eq!(format, Format::TorchZip);
    let (format, want) = io::load_any(fixture_path("weights_io_expected.safetensors")).unwrap();
    assert_eq!(format, Format::Safetensors);
    // Same flattened names: nested dicts become dotted keys, the non-tensor leaves are skipped.
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, w) in &want {
        assert_same(name, &got[name], w);
    }
    assert_eq!(got["image_proj.proj.bias"].dtype(), DType::BF16);
    assert_eq!(got["ip_adapter.1.to_k_ip.weight"].dtype(), DType::F16);
    assert_eq!(got["ip_adapter.steps"].dtype(), DType::I64);
    assert_eq!(got["image_proj.norm.weight"].shape(), &[2, 2], "a Parameter reads as its data");
    assert_eq!(got["ip_adapter.scalar"].shape(), &[] as &[usize]);

    // Views keep their storage: the two slices of one storage share it, with offsets and strides.
    let (a, b) = (&got["ip_adapter.shared_a"], &got["ip_adapter.shared_b"]);
    assert!(a.same_storage(b), "views of one torch storage share one engine storage");
    assert_eq!((a.layout().offset(), b.layout().offset()), (2, 6));
    assert_eq!(b.strides(), &[6, 2]);
    assert!(!b.is_contiguous());
    let tr = &got["ip_adapter.1.to_v_ip.weight"];
    assert_eq!((tr.shape(), tr.strides()), (&[3usize, 4][..], &[1usize, 3][..]));
    assert!(!a.same_storage(tr));
    // torch aligns stored entries, so data is read in place.
    for (name, t) in &got {
        assert!(t.is_mapped(), "{name}: expected zero copy from the mapped checkpoint");
    }

    // The lazy listing agrees with the loaded tensors.
    let (_, list) = io::list_any(&bin).unwrap();
    assert_eq!(list.len(), got.len());
    for info in &list {
        assert_eq!(info.shape, got[&info.name].shape(), "{}", info.name);
    }
    assert_eq!(list.iter().find(|i| i.name == "ip_adapter.mask").unwrap().dtype, "BOOL");
}

#[test]
fn legacy_torch_file_holds_the_same_tensors_as_the_zip_one() {
    // The generator saved the same object with `_use_new_zipfile_serialization=False`.
    let p = fixture_path("weights_io_legacy.pt");
    let (format, got) = io::load_any(&p).unwrap();
    assert_eq!(format, Format::TorchLegacy);
    assert_eq!(format.to_string(), "pytorch-legacy");
    let (_, want) = io::load_any(fixture_path("weights_io.bin")).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, w) in &want {
        assert_same(name, &got[name], w);
        assert_eq!((got[name].strides(), got[name].layout().offset()), (w.strides(), w.layout().offset()), "{name}: layout");
    }
    // Views of one storage still share it.
    assert!(got["ip_adapter.shared_a"].same_storage(&got["ip_adapter.shared_b"]));
    assert_eq!(torch::TorchFile::open(&p).unwrap().format(), Format::TorchLegacy);
    let (format, list) = io::list_any(&p).unwrap();
    assert_eq!(format, Format::TorchLegacy);
    let (_, zip_list) = io::list_any(fixture_path("weights_io.bin")).unwrap();
    assert_eq!(list, zip_list);
    // From memory too.
    let mem = torch::load_from_bytes(&std::fs::read(&p).unwrap(), "mem.pt").unwrap();
    for (name, w) in &want {
        assert_same(name, &mem[name], w);
    }
}

/// Reads `bytes` as the given format from memory, and (when `on_disk`; writing files is the slow
/// part) again from a file on disk.
fn read_both(format: Format, bytes: &[u8], dir: &TempDir, name: &str, on_disk: bool) -> Vec<Result<usize, String>> {
    let mem = match format {
        Format::Safetensors => safetensors::load_from_bytes(bytes, name).map(|m| m.len()),
        Format::TorchZip | Format::TorchLegacy => torch::load_from_bytes(bytes, name).map(|m| m.len()),
    };
    if !on_disk {
        return vec![mem.map_err(|e| e.to_string())];
    }
    let path = dir.0.join(name);
    std::fs::write(&path, bytes).unwrap();
    let file = match format {
        Format::Safetensors => safetensors::load(&path).map(|m| m.len()),
        Format::TorchZip | Format::TorchLegacy => torch::load(&path).map(|m| m.len()),
    };
    vec![mem.map_err(|e| e.to_string()), file.map_err(|e| e.to_string())]
}

fn check_corruptions(fixture: &str, format: Format) {
    let dir = TempDir::new("corrupt");
    let good = std::fs::read(fixture_path(fixture)).unwrap();
    let name = format!("cut-{fixture}");
    // Every truncation is an error naming the file.
    for cut in 0..good.len() {
        for r in read_both(format, &good[..cut], &dir, &name, cut % 13 == 0) {
            let err = r.expect_err(&format!("{fixture} cut to {cut} bytes loaded without error"));
            assert!(err.contains(&name), "{fixture} cut to {cut}: error does not name the file: {err}");
        }
    }
    // Every single-byte flip either still loads or is an error naming the file; none panics.
    let name = format!("flip-{fixture}");
    let mut errors = 0;
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        for r in read_both(format, &bad, &dir, &name, i % 13 == 0) {
            if let Err(err) = r {
                assert!(err.contains(&name), "{fixture} flipped at {i}: error does not name the file: {err}");
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "no flip was detected at all");
}

#[test]
fn truncated_or_corrupt_safetensors_error_cleanly() {
    check_corruptions("weights_io_expected.safetensors", Format::Safetensors);
}

#[test]
fn truncated_or_corrupt_torch_checkpoints_error_cleanly() {
    check_corruptions("weights_io.bin", Format::TorchZip);
    // A flip anywhere in the tensor data is caught by the zip checksum, never read as wrong values.
    let good = std::fs::read(fixture_path("weights_io.bin")).unwrap();
    let want = torch::load_from_bytes(&good, "x").unwrap();
    let first: Vec<u8> = want["image_proj.proj.weight"].to_vec::<f32>().unwrap()[..2].iter().flat_map(|x| x.to_le_bytes()).collect();
    let pos = good.windows(first.len()).position(|w| w == first.as_slice()).expect("the tensor's bytes are stored as is");
    let mut bad = good.clone();
    bad[pos] ^= 1;
    let err = torch::load_from_bytes(&bad, "flipped.bin").unwrap_err().to_string();
    assert!(err.contains("flipped.bin") && err.contains("CRC"), "{err}");
}

#[test]
fn truncated_or_corrupt_legacy_torch_files_error_cleanly() {
    // The legacy format has no checksum: a flipped data byte loads as a wrong value (as in torch),
    // but no cut or flip may panic, and a flip in the pickles or counts is an error naming the file.
    check_corruptions("weights_io_legacy.pt", Format::TorchLegacy);
}

#[test]
fn unknown_files_are_refused_by_name() {
    let dir = TempDir::new("unknown");
    let p = dir.0.join("notes.txt");
    std::fs::write(&p, b"hello, this is not a weights file").unwrap();
    let err = io::load_any(&p).unwrap_err().to_string();
    assert!(err.contains("notes.txt") && err.contains("unknown weights format"), "{err}");
    let empty = dir.0.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(safetensors::load(&empty).unwrap_err().to_string().contains("empty.safetensors"));
    let missing = dir.0.join("missing.bin");
    assert!(io::load_any(&missing).unwrap_err().to_string().contains("missing.bin"));
}
