//! Any bytes given to the PyTorch zip checkpoint reader give tensors or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = engine::io::torch::load_from_bytes(data, "fuzz.bin") {
        for t in tensors.values() {
            let _ = t.to_vec_f32();
        }
    }
});
