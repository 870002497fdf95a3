//! The `lookahead` root package: it owns the workspace's integration tests (tests/) and benchmarks
//! (benches/). This library holds only what those share — locating and reading the committed
//! reference fixtures — and is not part of the engine or the models.

use std::path::PathBuf;

/// Path of a committed fixture file under tests/fixtures/.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

/// All tensors of a committed safetensors fixture, by name; panics with the file name if absent
/// (a test without its fixture must fail loudly).
pub fn load_fixture(name: &str) -> std::collections::BTreeMap<String, engine::Tensor> {
    let path = fixture_path(name);
    engine::io::safetensors::load(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// Asserts two tensors have the same shape and agree within `atol + rtol * |expected|`; the panic
/// message names the worst element.
pub fn assert_close(name: &str, got: &engine::Tensor, expected: &engine::Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), expected.shape(), "{name}: shape");
    let (g, e) = (got.to_vec_f32().unwrap(), expected.to_vec_f32().unwrap());
    let mut worst = (0usize, 0f32);
    for (i, (&a, &b)) in g.iter().zip(&e).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        if excess > worst.1 || a.is_nan() != b.is_nan() {
            worst = (i, if a.is_nan() != b.is_nan() { f32::INFINITY } else { excess });
        }
    }
    assert!(worst.1 <= 0.0, "{name}: element {} is {} but expected {} (atol {atol}, rtol {rtol})", worst.0, g[worst.0], e[worst.0]);
}

/// Prints a line straight to the process's stderr: the test harness captures `println!`/`eprintln!`
/// of passing tests, and some lines must stay visible in the test output (CI logs): why a test
/// skipped its work, and the per-kernel register/spill report of the CUDA compile check.
pub fn show(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}
