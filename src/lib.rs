//! The `lookahead` root package: it owns the workspace's integration tests (tests/) and benchmarks
//! (benches/). This library holds only what those share — locating and reading the committed
//! reference fixtures — and is not part of the engine or the models.

use std::path::PathBuf;

/// Path of a committed fixture file under tests/fixtures/.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}
