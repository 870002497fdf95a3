//! Any bytes given to the safetensors parser give tensors or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = engine::io::safetensors::load_from_bytes(data, "fuzz.safetensors") {
        // Touch every tensor's data so that bad offsets would show up here.
        for t in tensors.values() {
            let _ = t.to_vec_f32();
        }
    }
});
