//! A CUDA device on the CPU, for tests. This shared library exports the subset of the CUDA driver
//! API (libcuda), NVRTC, cuBLASLt and cuDNN that the engine calls, and runs it on the host:
//! device memory is host memory, every stream operation completes before the call returns, kernels
//! run in the CPU emulator of CUDA (kernels/emu: `kernels::emulate`) from their CUDA C source,
//! GEMMs and convolutions are plain f32-accumulating loops. The engine's whole CUDA backend (its
//! allocator, launch plans, tensor maps, library calls) then runs unchanged, so the GPU parity
//! suites check it against the CPU backend on a machine without a GPU.
//!
//! It is not a GPU model: nothing is timed, occupancy and resources are nominal, and a "CUBIN" is
//! the kernel source. How the engine is pointed at it: kernels/emu/README.md ("The emulated
//! device").

pub mod driver;
pub mod nvrtc;
pub mod cublaslt;
pub mod cudnn;

use std::path::{Path, PathBuf};

/// The name the emulated device reports (followed by " (sm_XY)").
pub const DEVICE_NAME: &str = "lookahead CUDA emulator";

/// The library names the engine looks for, each a link to this one library: the driver (whose
/// soname is libcuda.so, see build.rs), NVRTC, cuBLASLt, and cuDNN with the sub-libraries the
/// engine loads from cuDNN's folder.
const LINKS: &[&str] = &["libcuda.so", "libnvrtc.so", "libcublasLt.so.13", "libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"];

/// This crate's shared library as cargo builds it for a test or binary that depends on the crate:
/// in the folder of the running executable (target/PROFILE/deps for tests) or its parent.
pub fn built_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.to_path_buf(), dir.join("deps"), dir.parent()?.to_path_buf()]
        .into_iter()
        .map(|d| d.join("liblookahead_cuda_emulator.so"))
        .find(|p| p.is_file())
}

/// Points the engine of this process at the emulated device: makes a folder of links named as
/// NVIDIA's libraries next to `library` (this crate's shared library) and sets
/// `LOOKAHEAD_CUDA_LIB`, `LOOKAHEAD_NVRTC_LIB`, `LOOKAHEAD_CUBLASLT_LIB` and
/// `LOOKAHEAD_CUDNN_LIB` to them. Must run before the engine first probes for CUDA (the probe
/// is cached), and before other threads read the environment.
pub fn use_emulator(library: &Path) -> Result<PathBuf, String> {
    let built = library.canonicalize().map_err(|e| format!("{}: {e}", library.display()))?;
    let dir = built.parent().ok_or("the emulator library has no folder")?.join("cuda-emulator");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // The links point at a copy in the folder itself: the engine finds cuDNN's sub-libraries in
    // the folder of the file it loaded, links resolved (engine/src/cuda/libs.rs).
    let library = dir.join("liblookahead_cuda_emulator.so");
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()));
    if stamp(&library) != stamp(&built) {
        let tmp = dir.join(format!(".liblookahead_cuda_emulator.so.{}", std::process::id()));
        std::fs::copy(&built, &tmp).map_err(|e| format!("copying {} to {}: {e}", built.display(), tmp.display()))?;
        let modified = std::fs::metadata(&built).and_then(|m| m.modified()).map_err(|e| format!("{}: {e}", built.display()))?;
        std::fs::File::options().write(true).open(&tmp).and_then(|f| f.set_modified(modified)).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &library).map_err(|e| format!("renaming {}: {e}", library.display()))?;
    }
    for name in LINKS {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("liblookahead_cuda_emulator.so")) {
            continue;
        }
        // A link made under a private name, then renamed over the old one: processes that do
        // this at the same time never see a missing or half-made link.
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink("liblookahead_cuda_emulator.so", &tmp).map_err(|e| format!("linking {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &link).map_err(|e| format!("renaming {}: {e}", link.display()))?;
    }
    std::env::set_var("LOOKAHEAD_CUDA_LIB", dir.join("libcuda.so"));
    std::env::set_var("LOOKAHEAD_NVRTC_LIB", dir.join("libnvrtc.so"));
    std::env::set_var("LOOKAHEAD_CUBLASLT_LIB", dir.join("libcublasLt.so.13"));
    std::env::set_var("LOOKAHEAD_CUDNN_LIB", dir.join("libcudnn.so.9"));
    Ok(dir)
}
