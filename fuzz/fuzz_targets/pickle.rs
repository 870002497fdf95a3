//! Any bytes as the data.pkl of an otherwise valid checkpoint give tensors or an error, never a
//! panic. Random zips rarely get as far as the pickle, so this target wraps the input in one: it
//! exercises the pickle VM, the walk over the unpickled object and the storage/view checks.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = engine::io::pickle::parse(data);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut add = |name: &str, bytes: &[u8]| {
        zip.start_file(name, opts).expect("in-memory zip");
        zip.write_all(bytes).expect("in-memory zip");
    };
    add("archive/data.pkl", data);
    add("archive/byteorder", b"little");
    // Storages 0..9 of 96 bytes each, enough for the seed pickle (from tests/fixtures/weights_io.bin).
    for key in 0..10 {
        add(&format!("archive/data/{key}"), &[0x3f; 96]);
    }
    let bytes = zip.finish().expect("in-memory zip").into_inner();
    if let Ok(tensors) = engine::io::torch::load_from_bytes(&bytes, "fuzz.bin") {
        for t in tensors.values() {
            let _ = t.to_vec_f32();
        }
    }
});
