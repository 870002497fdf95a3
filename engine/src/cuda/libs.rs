//! Finding NVIDIA's math libraries that cudarc calls through dynamic loading: cuBLASLt (GEMMs) and
//! cuDNN (convolutions). cudarc opens them by name on first use and panics when it cannot, so we
//! find and open each one ourselves first, check that it has every function we call, and keep it
//! loaded for the life of the process: cudarc's own later `dlopen` by soname then returns this
//! same library. A missing or unusable library is an `Error::Cuda` saying where we looked and which
//! variable to set, never a panic.
//!
//! Where each library is looked for, in order:
//! 1. `LOOKAHEAD_CUBLASLT_LIB` / `LOOKAHEAD_CUDNN_LIB`: a file or a folder (if set, it must work);
//! 2. the dynamic loader's own search (`LD_LIBRARY_PATH`, system folders) by soname;
//! 3. `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda` lib folders;
//! 4. the NVIDIA PyPI wheels (nvidia-cublas, nvidia-cudnn-cu13/cu12) inside the Python
//!    environments `$VIRTUAL_ENV`, `$LOOKAHEAD_CI_VENV`, `~/.cache/lookahead/{ci,ref}-venv` and
//!    `/opt/torch/.venv`.
//!
//! cuDNN 9 opens its own sub-libraries (libcudnn_cnn.so.9, ...) from its folder (its RPATH is
//! $ORIGIN); they in turn need cuBLASLt, found the same way as above when it is loaded first.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Error, Result};

/// One library: how to find it, what we call in it and how to read its version.
pub struct LibSpec {
    /// Human name for messages.
    pub name: &'static str,
    /// Environment variable naming the file or its folder.
    pub env: &'static str,
    /// File names to try, preferred first (the sonames cudarc also tries).
    pub sonames: &'static [&'static str],
    /// Every function we (through cudarc) call: checked at load time so that a too-old library
    /// is an error here rather than a panic inside cudarc later.
    pub symbols: &'static [&'static str],
    /// `size_t f(void)` returning the library's version number.
    pub version_symbol: &'static str,
    /// Oldest version we accept (the number `version_symbol` returns).
    pub min_version: usize,
}

pub const CUBLASLT: LibSpec = LibSpec {
    name: "cuBLASLt",
    env: "LOOKAHEAD_CUBLASLT_LIB",
    sonames: &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
    symbols: &[
        "cublasLtCreate",
        "cublasLtDestroy",
        "cublasLtGetVersion",
        "cublasLtMatmulDescCreate",
        "cublasLtMatmulDescDestroy",
        "cublasLtMatmulDescSetAttribute",
        "cublasLtMatrixLayoutCreate",
        "cublasLtMatrixLayoutDestroy",
        "cublasLtMatrixLayoutSetAttribute",
        "cublasLtMatmulPreferenceCreate",
        "cublasLtMatmulPreferenceDestroy",
        "cublasLtMatmulPreferenceSetAttribute",
        "cublasLtMatmulAlgoGetHeuristic",
        "cublasLtMatmul",
    ],
    version_symbol: "cublasLtGetVersion",
    // CUDA 12.0's cuBLASLt: the attributes we set exist with these values since then.
    min_version: 120000,
};

pub const CUDNN: LibSpec = LibSpec {
    name: "cuDNN",
    env: "LOOKAHEAD_CUDNN_LIB",
    sonames: &["libcudnn.so.9", "libcudnn.so"],
    symbols: &[
        "cudnnGetVersion",
        "cudnnGetErrorString",
        "cudnnCreate",
        "cudnnDestroy",
        "cudnnSetStream",
        "cudnnCreateTensorDescriptor",
        "cudnnSetTensor4dDescriptorEx",
        "cudnnDestroyTensorDescriptor",
        "cudnnCreateFilterDescriptor",
        "cudnnSetFilter4dDescriptor",
        "cudnnDestroyFilterDescriptor",
        "cudnnCreateConvolutionDescriptor",
        "cudnnSetConvolution2dDescriptor",
        "cudnnSetConvolutionGroupCount",
        "cudnnSetConvolutionMathType",
        "cudnnDestroyConvolutionDescriptor",
        "cudnnGetConvolution2dForwardOutputDim",
        "cudnnGetConvolutionForwardAlgorithm_v7",
        "cudnnGetConvolutionForwardWorkspaceSize",
        "cudnnConvolutionForward",
        "cudnnGetConvolutionBackwardDataAlgorithm_v7",
        "cudnnGetConvolutionBackwardDataWorkspaceSize",
        "cudnnConvolutionBackwardData",
        "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
        "cudnnGetConvolutionBackwardFilterWorkspaceSize",
        "cudnnConvolutionBackwardFilter",
    ],
    version_symbol: "cudnnGetVersion",
    // cudarc's bindings are those of cuDNN 9 (feature cudnn-09021).
    min_version: 90000,
};

/// A library we opened and keep open.
#[derive(Debug)]
pub struct LoadedLib {
    pub path: PathBuf,
    pub version: usize,
    _lib: libloading::Library,
}

/// cuBLASLt, found and checked once per process.
pub fn cublaslt() -> Result<&'static LoadedLib> {
    static LIB: OnceLock<std::result::Result<LoadedLib, String>> = OnceLock::new();
    cached(&LIB, &CUBLASLT, || {
        // SAFETY: cudarc's probe only dlopens candidate names; the library is already loaded.
        let named = std::panic::catch_unwind(|| unsafe { cudarc::cublaslt::sys::is_culib_present() }).unwrap_or(false);
        named.then_some(()).ok_or_else(|| "cudarc cannot open it by soname".to_string())
    })
}

/// cuDNN, found and checked once per process. cuBLASLt is loaded first when it can be (cuDNN's
/// engines need it and then find the copy already in the process).
pub fn cudnn() -> Result<&'static LoadedLib> {
    static LIB: OnceLock<std::result::Result<LoadedLib, String>> = OnceLock::new();
    let _ = cublaslt();
    cached(&LIB, &CUDNN, || {
        // SAFETY: as above.
        let named = std::panic::catch_unwind(|| unsafe { cudarc::cudnn::sys::is_culib_present() }).unwrap_or(false);
        named.then_some(()).ok_or_else(|| "cudarc cannot open it by soname".to_string())
    })
}

fn cached(cell: &'static OnceLock<std::result::Result<LoadedLib, String>>, spec: &LibSpec, cudarc_sees: impl Fn() -> std::result::Result<(), String>) -> Result<&'static LoadedLib> {
    let r = cell.get_or_init(|| {
        let env = std::env::var_os(spec.env).filter(|p| !p.is_empty()).map(PathBuf::from);
        let lib = find(spec, env.as_deref())?;
        cudarc_sees().map_err(|e| format!("{} loaded from {} but {e}", spec.name, lib.path.display()))?;
        Ok(lib)
    });
    r.as_ref().map_err(|e| Error::Cuda(e.clone()))
}

/// Finds, opens and checks `spec`'s library; `explicit` plays the role of its environment
/// variable (a file or a folder that must work). Never panics.
pub fn find(spec: &LibSpec, explicit: Option<&Path>) -> std::result::Result<LoadedLib, String> {
    if let Some(p) = explicit {
        let file = if p.is_dir() { spec.sonames.iter().map(|s| p.join(s)).find(|f| f.exists()).unwrap_or_else(|| p.join(spec.sonames[0])) } else { p.to_path_buf() };
        return open(spec, &file).map_err(|e| format!("{} not usable: {}={}: {e}", spec.name, spec.env, p.display()));
    }
    let mut errors = Vec::new();
    for soname in spec.sonames {
        match open(spec, Path::new(soname)) {
            Ok(lib) => return Ok(lib),
            // "cannot open shared object file" for every name is the usual case: not reported.
            Err(e) if !e.contains("cannot open shared object") => errors.push(format!("{soname}: {e}")),
            Err(_) => {}
        }
    }
    let dirs = search_dirs();
    for dir in &dirs {
        for soname in spec.sonames {
            let file = dir.join(soname);
            if file.exists() {
                match open(spec, &file) {
                    Ok(lib) => return Ok(lib),
                    Err(e) => errors.push(format!("{}: {e}", file.display())),
                }
            }
        }
    }
    let tried = if errors.is_empty() { String::new() } else { format!("; found but unusable: {}", errors.join("; ")) };
    Err(format!(
        "{} not found: set {} to {} or its folder, or add that folder to LD_LIBRARY_PATH (searched the loader path and {}){tried}",
        spec.name,
        spec.env,
        spec.sonames[0],
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

fn open(spec: &LibSpec, file: &Path) -> std::result::Result<LoadedLib, String> {
    // SAFETY: opening runs the library's initialisers, which have no preconditions; the only
    // function called is the version query, with its C signature `size_t f(void)`.
    unsafe {
        let lib = libloading::Library::new(file).map_err(|e| e.to_string())?;
        let missing: Vec<&str> = spec.symbols.iter().copied().filter(|s| lib.get::<*const std::ffi::c_void>(s.as_bytes()).is_err()).collect();
        if !missing.is_empty() {
            return Err(format!("lacks {} (too old a {}?)", missing.join(", "), spec.name));
        }
        let version_fn: libloading::Symbol<unsafe extern "C" fn() -> usize> = lib.get(spec.version_symbol.as_bytes()).map_err(|e| e.to_string())?;
        let version = version_fn();
        if version < spec.min_version {
            return Err(format!("version {version} is older than the {} this build needs", spec.min_version));
        }
        Ok(LoadedLib { path: file.to_path_buf(), version, _lib: lib })
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            dirs.push(PathBuf::from(&p).join("lib64"));
            dirs.push(PathBuf::from(&p).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    let mut venvs: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "LOOKAHEAD_CI_VENV"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            venvs.push(PathBuf::from(p));
        }
    }
    if let Some(h) = home() {
        venvs.push(h.join(".cache/lookahead/ci-venv"));
        venvs.push(h.join(".cache/lookahead/ref-venv"));
    }
    venvs.push(PathBuf::from("/opt/torch/.venv"));
    for venv in venvs {
        let Ok(entries) = std::fs::read_dir(venv.join("lib")) else { continue };
        let mut pythons: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3"))).collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            for sub in ["nvidia/cu13/lib", "nvidia/cublas/lib", "nvidia/cudnn/lib", "nvidia/cu12/lib"] {
                dirs.push(py.join("site-packages").join(sub));
            }
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An explicit path that does not exist is an error naming the variable and the path.
    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        for spec in [&CUBLASLT, &CUDNN] {
            let e = find(spec, Some(Path::new("/nonexistent/lookahead-test"))).unwrap_err();
            assert!(e.contains(spec.env) && e.contains("/nonexistent/lookahead-test"), "{e}");
            // A file that is not a shared library.
            let e = find(spec, Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml").as_path())).unwrap_err();
            assert!(e.contains(spec.name), "{e}");
        }
    }

    /// Whatever this machine has, the cached probes return (Ok or a clear error) without
    /// panicking; where a library is found, it has every function we call.
    #[test]
    fn probes_never_panic() {
        for (name, r) in [("cuBLASLt", cublaslt()), ("cuDNN", cudnn())] {
            match r {
                Ok(lib) => eprintln!("{name}: {} (version {})", lib.path.display(), lib.version),
                Err(e) => {
                    let msg = e.to_string();
                    eprintln!("{name}: {msg}");
                    assert!(msg.contains(name), "{msg}");
                }
            }
        }
    }
}
