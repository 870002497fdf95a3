//! Any bytes given to the PyTorch checkpoint reader give tensors or an error, never a panic; this
//! target's corpus starts from a legacy-format (pre-1.6, non-zip) file, so mutations explore the
//! pickle stream, the storage key list and the element counts rather than the zip container.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = engine::io::torch::load_from_bytes(data, "fuzz.pt") {
        for t in tensors.values() {
            let _ = t.to_vec_f32();
        }
    }
});
