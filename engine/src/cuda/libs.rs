//! Finding and calling NVIDIA's math libraries: cuBLASLt (GEMMs) and cuDNN (convolutions).
//!
//! We find and open each library ourselves, check that it has every function we call, keep it
//! loaded for the life of the process, and call it only through a table of function pointers
//! resolved from that very `libloading::Library` ([`CublasLtApi`], [`CudnnApi`]). cudarc's own
//! `sys` call functions are never used: they `dlopen` by name (`libcudnn.so` first), which can
//! pull a second, different copy of the library into the process (e.g. a system -dev package's
//! `libcudnn.so` next to a wheel's `libcudnn.so.9`); cuDNN then fails every call with
//! CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH. Only cudarc's types and enums are reused.
//! A missing or unusable library is an `Error::Cuda` saying where we looked and which variable to
//! set, never a panic.
//!
//! Where each library is looked for, in order:
//! 1. `LOOKAHEAD_CUBLASLT_LIB` / `LOOKAHEAD_CUDNN_LIB`: a file or a folder (if set, it must work);
//! 2. the dynamic loader's own search (`LD_LIBRARY_PATH`, system folders) by versioned soname
//!    (`libcudnn.so.9`, `libcublasLt.so.<CUDA major of NVRTC>`), then the unversioned name;
//! 3. `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda` lib folders;
//! 4. the NVIDIA PyPI wheels (nvidia-cublas, nvidia-cudnn-cu13/cu12) inside the Python
//!    environments `$VIRTUAL_ENV`, `$LOOKAHEAD_CI_VENV`, `~/.cache/lookahead/{ci,ref}-venv` and
//!    `/opt/torch/.venv`; where several exist, the environment NVRTC was loaded from comes first,
//!    then the wheel folders of NVRTC's CUDA major (`nvidia/cu13/lib` for NVRTC 13).
//!
//! cuDNN 9 is a small front library that opens sub-libraries (libcudnn_graph.so.9, ...) by
//! soname. Before the first cuDNN call we load them by absolute path from the folder of the
//! libcudnn.so.9 we chose (a later open by soname returns these same copies), so that their
//! version is the front library's, and we check with a descriptor round trip that they agree.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::cublaslt::sys as lt;
use cudarc::cudnn::sys as dnn;

use crate::{Error, Result};

/// A struct of typed C function pointers, one per field (named as the C function), resolved from
/// one library; `SYMBOLS` lists their names.
macro_rules! api_table {
    ($(#[$doc:meta])* pub struct $name:ident { $($f:ident: fn($($a:ty),* $(,)?) -> $r:ty;)* }) => {
        $(#[$doc])*
        #[allow(non_snake_case)]
        pub struct $name {
            $(pub $f: unsafe extern "C" fn($($a),*) -> $r,)*
        }
        impl $name {
            pub const SYMBOLS: &'static [&'static str] = &[$(stringify!($f)),*];
            /// # Safety
            /// `lib` must be the library these C declarations describe, and must stay loaded for
            /// as long as the table is used.
            unsafe fn resolve(lib: &libloading::Library) -> std::result::Result<$name, String> {
                Ok($name {
                    $($f: unsafe { *lib.get::<unsafe extern "C" fn($($a),*) -> $r>(concat!(stringify!($f), "\0").as_bytes()).map_err(|e| format!("lacks {}: {e}", stringify!($f)))? },)*
                })
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(stringify!($name))
            }
        }
    };
}

api_table! {
    /// The cuBLASLt functions we call (declarations of cublasLt.h, types from cudarc).
    pub struct CublasLtApi {
        cublasLtCreate: fn(*mut lt::cublasLtHandle_t) -> lt::cublasStatus_t;
        cublasLtDestroy: fn(lt::cublasLtHandle_t) -> lt::cublasStatus_t;
        cublasLtGetVersion: fn() -> usize;
        cublasLtMatmulDescCreate: fn(*mut lt::cublasLtMatmulDesc_t, lt::cublasComputeType_t, lt::cudaDataType_t) -> lt::cublasStatus_t;
        cublasLtMatmulDescDestroy: fn(lt::cublasLtMatmulDesc_t) -> lt::cublasStatus_t;
        cublasLtMatmulDescSetAttribute: fn(lt::cublasLtMatmulDesc_t, lt::cublasLtMatmulDescAttributes_t, *const c_void, usize) -> lt::cublasStatus_t;
        cublasLtMatrixLayoutCreate: fn(*mut lt::cublasLtMatrixLayout_t, lt::cudaDataType, u64, u64, i64) -> lt::cublasStatus_t;
        cublasLtMatrixLayoutDestroy: fn(lt::cublasLtMatrixLayout_t) -> lt::cublasStatus_t;
        cublasLtMatrixLayoutSetAttribute: fn(lt::cublasLtMatrixLayout_t, lt::cublasLtMatrixLayoutAttribute_t, *const c_void, usize) -> lt::cublasStatus_t;
        cublasLtMatmulPreferenceCreate: fn(*mut lt::cublasLtMatmulPreference_t) -> lt::cublasStatus_t;
        cublasLtMatmulPreferenceDestroy: fn(lt::cublasLtMatmulPreference_t) -> lt::cublasStatus_t;
        cublasLtMatmulPreferenceSetAttribute: fn(lt::cublasLtMatmulPreference_t, lt::cublasLtMatmulPreferenceAttributes_t, *const c_void, usize) -> lt::cublasStatus_t;
        cublasLtMatmulAlgoGetHeuristic: fn(lt::cublasLtHandle_t, lt::cublasLtMatmulDesc_t, lt::cublasLtMatrixLayout_t, lt::cublasLtMatrixLayout_t, lt::cublasLtMatrixLayout_t, lt::cublasLtMatrixLayout_t, lt::cublasLtMatmulPreference_t, i32, *mut lt::cublasLtMatmulHeuristicResult_t, *mut i32) -> lt::cublasStatus_t;
        cublasLtMatmul: fn(lt::cublasLtHandle_t, lt::cublasLtMatmulDesc_t, *const c_void, *const c_void, lt::cublasLtMatrixLayout_t, *const c_void, lt::cublasLtMatrixLayout_t, *const c_void, *const c_void, lt::cublasLtMatrixLayout_t, *mut c_void, lt::cublasLtMatrixLayout_t, *const lt::cublasLtMatmulAlgo_t, *mut c_void, usize, lt::cudaStream_t) -> lt::cublasStatus_t;
    }
}

api_table! {
    /// The cuDNN functions we call (declarations of cudnn.h, types from cudarc).
    pub struct CudnnApi {
        cudnnGetVersion: fn() -> usize;
        cudnnGetCudartVersion: fn() -> usize;
        cudnnGetErrorString: fn(dnn::cudnnStatus_t) -> *const std::ffi::c_char;
        cudnnCreate: fn(*mut dnn::cudnnHandle_t) -> dnn::cudnnStatus_t;
        cudnnDestroy: fn(dnn::cudnnHandle_t) -> dnn::cudnnStatus_t;
        cudnnSetStream: fn(dnn::cudnnHandle_t, dnn::cudaStream_t) -> dnn::cudnnStatus_t;
        cudnnCreateTensorDescriptor: fn(*mut dnn::cudnnTensorDescriptor_t) -> dnn::cudnnStatus_t;
        cudnnSetTensor4dDescriptorEx: fn(dnn::cudnnTensorDescriptor_t, dnn::cudnnDataType_t, i32, i32, i32, i32, i32, i32, i32, i32) -> dnn::cudnnStatus_t;
        cudnnDestroyTensorDescriptor: fn(dnn::cudnnTensorDescriptor_t) -> dnn::cudnnStatus_t;
        cudnnCreateFilterDescriptor: fn(*mut dnn::cudnnFilterDescriptor_t) -> dnn::cudnnStatus_t;
        cudnnSetFilter4dDescriptor: fn(dnn::cudnnFilterDescriptor_t, dnn::cudnnDataType_t, dnn::cudnnTensorFormat_t, i32, i32, i32, i32) -> dnn::cudnnStatus_t;
        cudnnDestroyFilterDescriptor: fn(dnn::cudnnFilterDescriptor_t) -> dnn::cudnnStatus_t;
        cudnnCreateConvolutionDescriptor: fn(*mut dnn::cudnnConvolutionDescriptor_t) -> dnn::cudnnStatus_t;
        cudnnSetConvolution2dDescriptor: fn(dnn::cudnnConvolutionDescriptor_t, i32, i32, i32, i32, i32, i32, dnn::cudnnConvolutionMode_t, dnn::cudnnDataType_t) -> dnn::cudnnStatus_t;
        cudnnSetConvolutionGroupCount: fn(dnn::cudnnConvolutionDescriptor_t, i32) -> dnn::cudnnStatus_t;
        cudnnSetConvolutionMathType: fn(dnn::cudnnConvolutionDescriptor_t, dnn::cudnnMathType_t) -> dnn::cudnnStatus_t;
        cudnnDestroyConvolutionDescriptor: fn(dnn::cudnnConvolutionDescriptor_t) -> dnn::cudnnStatus_t;
        cudnnGetConvolution2dForwardOutputDim: fn(dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnFilterDescriptor_t, *mut i32, *mut i32, *mut i32, *mut i32) -> dnn::cudnnStatus_t;
        cudnnGetConvolutionForwardAlgorithm_v7: fn(dnn::cudnnHandle_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnFilterDescriptor_t, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, i32, *mut i32, *mut dnn::cudnnConvolutionFwdAlgoPerf_t) -> dnn::cudnnStatus_t;
        cudnnGetConvolutionForwardWorkspaceSize: fn(dnn::cudnnHandle_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnFilterDescriptor_t, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnConvolutionFwdAlgo_t, *mut usize) -> dnn::cudnnStatus_t;
        cudnnConvolutionForward: fn(dnn::cudnnHandle_t, *const c_void, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnFilterDescriptor_t, *const c_void, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnConvolutionFwdAlgo_t, *mut c_void, usize, *const c_void, dnn::cudnnTensorDescriptor_t, *mut c_void) -> dnn::cudnnStatus_t;
        cudnnGetConvolutionBackwardDataAlgorithm_v7: fn(dnn::cudnnHandle_t, dnn::cudnnFilterDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, i32, *mut i32, *mut dnn::cudnnConvolutionBwdDataAlgoPerf_t) -> dnn::cudnnStatus_t;
        cudnnGetConvolutionBackwardDataWorkspaceSize: fn(dnn::cudnnHandle_t, dnn::cudnnFilterDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnConvolutionBwdDataAlgo_t, *mut usize) -> dnn::cudnnStatus_t;
        cudnnConvolutionBackwardData: fn(dnn::cudnnHandle_t, *const c_void, dnn::cudnnFilterDescriptor_t, *const c_void, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnConvolutionBwdDataAlgo_t, *mut c_void, usize, *const c_void, dnn::cudnnTensorDescriptor_t, *mut c_void) -> dnn::cudnnStatus_t;
        cudnnGetConvolutionBackwardFilterAlgorithm_v7: fn(dnn::cudnnHandle_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnFilterDescriptor_t, i32, *mut i32, *mut dnn::cudnnConvolutionBwdFilterAlgoPerf_t) -> dnn::cudnnStatus_t;
        cudnnGetConvolutionBackwardFilterWorkspaceSize: fn(dnn::cudnnHandle_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnTensorDescriptor_t, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnFilterDescriptor_t, dnn::cudnnConvolutionBwdFilterAlgo_t, *mut usize) -> dnn::cudnnStatus_t;
        cudnnConvolutionBackwardFilter: fn(dnn::cudnnHandle_t, *const c_void, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnConvolutionBwdFilterAlgo_t, *mut c_void, usize, *const c_void, dnn::cudnnFilterDescriptor_t, *mut c_void) -> dnn::cudnnStatus_t;
        cudnnFindConvolutionForwardAlgorithmEx: fn(dnn::cudnnHandle_t, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnFilterDescriptor_t, *const c_void, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, *mut c_void, i32, *mut i32, *mut dnn::cudnnConvolutionFwdAlgoPerf_t, *mut c_void, usize) -> dnn::cudnnStatus_t;
        cudnnFindConvolutionBackwardDataAlgorithmEx: fn(dnn::cudnnHandle_t, dnn::cudnnFilterDescriptor_t, *const c_void, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnTensorDescriptor_t, *mut c_void, i32, *mut i32, *mut dnn::cudnnConvolutionBwdDataAlgoPerf_t, *mut c_void, usize) -> dnn::cudnnStatus_t;
        cudnnFindConvolutionBackwardFilterAlgorithmEx: fn(dnn::cudnnHandle_t, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnTensorDescriptor_t, *const c_void, dnn::cudnnConvolutionDescriptor_t, dnn::cudnnFilterDescriptor_t, *mut c_void, i32, *mut i32, *mut dnn::cudnnConvolutionBwdFilterAlgoPerf_t, *mut c_void, usize) -> dnn::cudnnStatus_t;
    }
}

/// One library: how to find it, what we call in it and how to read its version.
pub struct LibSpec {
    /// Human name for messages.
    pub name: &'static str,
    /// Environment variable naming the file or its folder.
    pub env: &'static str,
    /// File names to try, preferred first (versioned sonames before the unversioned name).
    pub sonames: &'static [&'static str],
    /// Every function we call: checked at load time so that a too-old library is an error here.
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
    symbols: CublasLtApi::SYMBOLS,
    version_symbol: "cublasLtGetVersion",
    // CUDA 12.0's cuBLASLt: the attributes we set exist with these values since then.
    min_version: 120000,
};

pub const CUDNN: LibSpec = LibSpec {
    name: "cuDNN",
    env: "LOOKAHEAD_CUDNN_LIB",
    sonames: &["libcudnn.so.9", "libcudnn.so"],
    symbols: CudnnApi::SYMBOLS,
    version_symbol: "cudnnGetVersion",
    // cudarc's types are those of cuDNN 9 (feature cudnn-09021).
    min_version: 90000,
};

/// cuDNN 9's sub-libraries that the legacy convolution API needs: they must sit next to
/// libcudnn.so.9 and are loaded from there.
pub const CUDNN_SUBLIBS: &[&str] = &["libcudnn_graph.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"];
/// Sub-libraries loaded from the same folder when present (the engines and heuristics the
/// convolutions run on; older 9.x releases lack some).
const CUDNN_OPTIONAL_SUBLIBS: &[&str] = &["libcudnn_engines_precompiled.so.9", "libcudnn_engines_runtime_compiled.so.9", "libcudnn_heuristic.so.9"];

/// A library we opened and keep open.
#[derive(Debug)]
pub struct LoadedLib {
    /// The file actually loaded (resolved from the loader's mappings when it was opened by name).
    pub path: PathBuf,
    pub version: usize,
    lib: libloading::Library,
}

/// cuBLASLt: the library and the functions we call in it.
#[derive(Debug)]
pub struct CublasLt {
    pub lib: LoadedLib,
    pub api: CublasLtApi,
}

/// cuDNN: the library, its sub-libraries (kept loaded) and the functions we call in it.
#[derive(Debug)]
pub struct Cudnn {
    pub lib: LoadedLib,
    pub api: CudnnApi,
    /// Sub-libraries loaded by absolute path from `lib.path`'s folder.
    pub sublibs: Vec<PathBuf>,
    _sublibs: Vec<libloading::Library>,
}

impl CublasLt {
    /// "cuBLASLt <version> at <path>", for messages.
    pub fn describe(&self) -> String {
        format!("cuBLASLt {} at {}", self.lib.version, self.lib.path.display())
    }
}

impl Cudnn {
    /// "cuDNN <version> (CUDA runtime <v>) at <path>", for messages.
    pub fn describe(&self) -> String {
        // SAFETY: `size_t f(void)`, no preconditions.
        let cudart = unsafe { (self.api.cudnnGetCudartVersion)() };
        format!("cuDNN {} (built for CUDA runtime {cudart}) at {}", self.lib.version, self.lib.path.display())
    }

    /// cuDNN's name for a status.
    pub fn error_string(&self, s: dnn::cudnnStatus_t) -> String {
        // SAFETY: returns a static NUL-terminated string for any status value.
        let p = unsafe { (self.api.cudnnGetErrorString)(s) };
        if p.is_null() {
            format!("{s:?}")
        } else {
            // SAFETY: non-null, static, NUL-terminated.
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }
}

/// cuBLASLt, found, checked and resolved once per process.
pub fn cublaslt() -> Result<&'static CublasLt> {
    static LIB: OnceLock<std::result::Result<CublasLt, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib = find_from_env(&CUBLASLT)?;
        // SAFETY: `lib` is cuBLASLt (it has every symbol, checked), kept loaded inside the struct.
        let api = unsafe { CublasLtApi::resolve(&lib.lib) }.map_err(|e| format!("cuBLASLt at {}: {e}", lib.path.display()))?;
        Ok(CublasLt { lib, api })
    })
    .as_ref()
    .map_err(|e| Error::Cuda(e.clone()))
}

/// cuDNN, found, checked and resolved once per process. cuBLASLt is loaded first when it can be
/// (cuDNN's engines need it and then find the copy already in the process).
pub fn cudnn() -> Result<&'static Cudnn> {
    static LIB: OnceLock<std::result::Result<Cudnn, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let _ = cublaslt();
        let lib = find_from_env(&CUDNN)?;
        // SAFETY: `lib` is cuDNN (it has every symbol, checked), kept loaded inside the struct.
        let api = unsafe { CudnnApi::resolve(&lib.lib) }.map_err(|e| format!("cuDNN at {}: {e}", lib.path.display()))?;
        let (sublibs, handles) = load_cudnn_sublibs(&lib.path)?;
        let cudnn = Cudnn { lib, api, sublibs, _sublibs: handles };
        check_cudnn(&cudnn)?;
        Ok(cudnn)
    })
    .as_ref()
    .map_err(|e| Error::Cuda(e.clone()))
}

fn find_from_env(spec: &LibSpec) -> std::result::Result<LoadedLib, String> {
    let env = std::env::var_os(spec.env).filter(|p| !p.is_empty()).map(PathBuf::from);
    find(spec, env.as_deref())
}

/// Loads cuDNN's sub-libraries by absolute path from the folder of `main`, so that the front
/// library's later open by soname returns these copies: their version is the front library's.
fn load_cudnn_sublibs(main: &Path) -> std::result::Result<(Vec<PathBuf>, Vec<libloading::Library>), String> {
    let dir = main.parent().unwrap_or(Path::new("/"));
    let missing: Vec<&str> = CUDNN_SUBLIBS.iter().copied().filter(|s| !dir.join(s).exists()).collect();
    if !missing.is_empty() {
        return Err(format!(
            "cuDNN at {} lacks its sub-libraries {} in the same folder (a partial install?): set {} to a complete cuDNN 9 folder",
            main.display(),
            missing.join(", "),
            CUDNN.env
        ));
    }
    let (mut paths, mut libs) = (Vec::new(), Vec::new());
    for (name, required) in CUDNN_SUBLIBS.iter().map(|s| (s, true)).chain(CUDNN_OPTIONAL_SUBLIBS.iter().map(|s| (s, false))) {
        let file = dir.join(name);
        if !required && !file.exists() {
            continue;
        }
        // SAFETY: opening runs the library's initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(&file) } {
            Ok(l) => {
                paths.push(file);
                libs.push(l);
            }
            Err(e) if required => return Err(format!("cuDNN at {}: cannot load its sub-library {}: {e}", main.display(), file.display())),
            // An optional engine library that cannot load (e.g. no NVRTC for the runtime-compiled
            // engines) only narrows cuDNN's choice of algorithms.
            Err(_) => {}
        }
    }
    Ok((paths, libs))
}

/// Host-side checks that the front library and its sub-libraries work together: the
/// sub-libraries' own version checks and a tensor-descriptor round trip (the first call that
/// fails with CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH when two cuDNN copies are mixed).
fn check_cudnn(c: &Cudnn) -> std::result::Result<(), String> {
    let fail = |what: &str, s: dnn::cudnnStatus_t| {
        format!(
            "{} (sub-libraries from {}) is unusable: {what}: {} ({s:?}); another cuDNN may already be loaded in this process (LD_PRELOAD, LD_LIBRARY_PATH): set {} to the folder of one complete cuDNN 9",
            c.describe(),
            c.lib.path.parent().unwrap_or(Path::new("/")).display(),
            c.error_string(s),
            CUDNN.env
        )
    };
    for (lib, file) in c._sublibs.iter().zip(&c.sublibs) {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let check = match name.as_str() {
            "libcudnn_graph.so.9" => "cudnnGraphVersionCheck",
            "libcudnn_ops.so.9" => "cudnnOpsVersionCheck",
            "libcudnn_cnn.so.9" => "cudnnCnnVersionCheck",
            _ => continue,
        };
        // SAFETY: `cudnnStatus_t f(void)` (cudnn_graph.h, cudnn_ops.h, cudnn_cnn.h).
        unsafe {
            if let Ok(f) = lib.get::<unsafe extern "C" fn() -> dnn::cudnnStatus_t>(check.as_bytes()) {
                let s = f();
                if s != dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                    return Err(fail(&format!("{check} of {}", file.display()), s));
                }
            }
        }
    }
    let mut d = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the descriptor is destroyed at once.
    let s = unsafe { (c.api.cudnnCreateTensorDescriptor)(&mut d) };
    if s != dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Err(fail("creating a tensor descriptor", s));
    }
    // SAFETY: created above, destroyed once.
    unsafe { (c.api.cudnnDestroyTensorDescriptor)(d) };
    Ok(())
}

/// Finds, opens and checks `spec`'s library; `explicit` plays the role of its environment
/// variable (a file or a folder that must work). Never panics.
pub fn find(spec: &LibSpec, explicit: Option<&Path>) -> std::result::Result<LoadedLib, String> {
    if let Some(p) = explicit {
        let file = if p.is_dir() { spec.sonames.iter().map(|s| p.join(s)).find(|f| f.exists()).unwrap_or_else(|| p.join(spec.sonames[0])) } else { p.to_path_buf() };
        return open(spec, &file).map_err(|e| format!("{} not usable: {}={}: {e}", spec.name, spec.env, p.display()));
    }
    let cuda_major = nvrtc().map(|(_, major)| major);
    let sonames = preferred_sonames(spec, cuda_major);
    let mut errors = Vec::new();
    for soname in &sonames {
        match open(spec, Path::new(soname)) {
            Ok(lib) => return Ok(lib),
            // "cannot open shared object file" for every name is the usual case: not reported.
            Err(e) if !e.contains("cannot open shared object") => errors.push(format!("{soname}: {e}")),
            Err(_) => {}
        }
    }
    let dirs = search_dirs();
    for dir in &dirs {
        for soname in &sonames {
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

/// `spec.sonames` with the one ending in `.so.<cuda_major>` first (cuBLASLt of NVRTC's CUDA).
fn preferred_sonames(spec: &LibSpec, cuda_major: Option<i32>) -> Vec<&'static str> {
    let mut v = spec.sonames.to_vec();
    if let Some(m) = cuda_major {
        let suffix = format!(".so.{m}");
        v.sort_by_key(|s| !s.ends_with(&suffix));
    }
    v
}

/// The site-packages folder NVRTC was loaded from (if a wheel) and NVRTC's CUDA major version.
fn nvrtc() -> Option<(Option<PathBuf>, i32)> {
    let n = kernels::compile::Nvrtc::global().ok()?;
    let file = resolved_path(n.path());
    let site = file.ancestors().find(|a| a.file_name().is_some_and(|n| n == "site-packages")).map(Path::to_path_buf);
    Some((site, n.version().0))
}

/// The file the loader mapped for `name` when it is a bare soname (or `name` itself): read from
/// /proc/self/maps, whose paths are absolute.
fn resolved_path(name: &Path) -> PathBuf {
    if name.components().count() > 1 {
        return name.canonicalize().unwrap_or_else(|_| name.to_path_buf());
    }
    let Some(file_name) = name.to_str() else { return name.to_path_buf() };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return name.to_path_buf() };
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        let p = Path::new(path);
        if p.file_name().is_some_and(|f| f == file_name) {
            return p.to_path_buf();
        }
    }
    name.to_path_buf()
}

/// The file holding `addr` according to /proc/self/maps.
fn file_of_address(addr: usize) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let range = parts.next()?;
        let (start, end) = range.split_once('-')?;
        let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
        if (start..end).contains(&addr) {
            return parts.nth(4).map(PathBuf::from);
        }
    }
    None
}

fn open(spec: &LibSpec, file: &Path) -> std::result::Result<LoadedLib, String> {
    // SAFETY: opening runs the library's initialisers, which have no preconditions; the only
    // function called is the version query, with its C signature `size_t f(void)`.
    unsafe {
        let lib = libloading::Library::new(file).map_err(|e| e.to_string())?;
        let missing: Vec<&str> = spec.symbols.iter().copied().filter(|s| lib.get::<*const c_void>(s.as_bytes()).is_err()).collect();
        if !missing.is_empty() {
            return Err(format!("lacks {} (too old a {}?)", missing.join(", "), spec.name));
        }
        let version_fn: libloading::Symbol<unsafe extern "C" fn() -> usize> = lib.get(spec.version_symbol.as_bytes()).map_err(|e| e.to_string())?;
        let version = version_fn();
        // The file really loaded: where the version function lives (for a bare soname, the
        // loader chose the folder).
        let path = file_of_address(*version_fn as usize).unwrap_or_else(|| resolved_path(file));
        if version < spec.min_version {
            return Err(format!("{}: version {version} is older than the {} this build needs", path.display(), spec.min_version));
        }
        Ok(LoadedLib { path, version, lib })
    }
}

/// CUDA toolkit folders, then the wheel folders of every known Python environment: those in the
/// environment NVRTC came from first, then those of NVRTC's CUDA major (`cu13` for NVRTC 13).
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = kernels::compile::cuda_toolkit_dirs();
    let wheels = kernels::compile::python_wheel_dirs(&["nvidia/cu13/lib", "nvidia/cublas/lib", "nvidia/cudnn/lib", "nvidia/cu12/lib"]);
    dirs.extend(rank_wheels(wheels, nvrtc()));
    dirs
}

/// Stable reorder of wheel folders: NVRTC's site-packages first, then folders named for NVRTC's
/// CUDA major (`nvidia/cu13/lib`), then the rest, each group in its original order.
fn rank_wheels(mut wheels: Vec<PathBuf>, nvrtc: Option<(Option<PathBuf>, i32)>) -> Vec<PathBuf> {
    let Some((site, major)) = nvrtc else { return wheels };
    let other_cuda = |d: &Path| {
        let s = d.to_string_lossy();
        (s.contains("/nvidia/cu1") && !s.contains(&format!("/nvidia/cu{major}/"))) as u8
    };
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let site = site.map(|s| canon(&s));
    wheels.sort_by_key(|d| {
        let elsewhere = site.as_ref().is_none_or(|s| !canon(d).starts_with(s)) as u8;
        (elsewhere, other_cuda(d))
    });
    wheels
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
    /// panicking; where a library is found, its path is absolute and (cuDNN) its sub-libraries
    /// come from its own folder.
    #[test]
    fn probes_never_panic() {
        match cublaslt() {
            Ok(l) => {
                eprintln!("{}", l.describe());
                assert!(l.lib.path.is_absolute(), "{}", l.lib.path.display());
            }
            Err(e) => assert!(e.to_string().contains("cuBLASLt"), "{e}"),
        }
        match cudnn() {
            Ok(c) => {
                eprintln!("{}; sub-libraries: {:?}", c.describe(), c.sublibs);
                assert!(c.lib.path.is_absolute(), "{}", c.lib.path.display());
                assert!(c.sublibs.len() >= CUDNN_SUBLIBS.len());
                assert!(c.sublibs.iter().all(|s| s.parent() == c.lib.path.parent()), "{:?}", c.sublibs);
                // SAFETY: `size_t f(void)`.
                assert_eq!(unsafe { (c.api.cudnnGetVersion)() }, c.lib.version);
            }
            Err(e) => assert!(e.to_string().contains("cuDNN"), "{e}"),
        }
    }

    /// A folder with libcudnn.so.9 but none of its sub-libraries is refused with a message
    /// naming the missing files and the variable.
    #[test]
    fn cudnn_without_sublibraries_is_refused() {
        let e = load_cudnn_sublibs(Path::new("/nonexistent/lookahead-test/libcudnn.so.9")).unwrap_err();
        assert!(e.contains("libcudnn_graph.so.9") && e.contains(CUDNN.env), "{e}");
    }

    /// The string table of an ELF64 little-endian file's symbol table (.symtab): the names of
    /// the symbols the linker kept (debug info names everything, linked or not).
    fn symbol_names(elf: &[u8]) -> Option<&[u8]> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?) as usize);
        let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize);
        let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize);
        if elf.get(..6)? != b"\x7fELF\x02\x01" {
            return None;
        }
        let (shoff, shentsize, shnum) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?);
        let section = |i: usize| shoff + i * shentsize;
        let symtab = (0..shnum).find(|&i| u32_at(section(i) + 4) == Some(2))?;
        let strtab = section(u32_at(section(symtab) + 0x28)?);
        let (off, size) = (u64_at(strtab + 0x18)?, u64_at(strtab + 0x20)?);
        elf.get(off..off + size)
    }

    /// cudarc's cuDNN/cuBLASLt `sys` functions (which dlopen by name through their own
    /// `culib()`) are not linked into this binary at all: each one in use keeps a static `_S`
    /// (its cached pointer) and `culib()` its static `LIB`, so no such symbol may be present.
    /// The driver's (used on purpose) show that the symbol table is there to look at.
    #[test]
    fn cudarc_math_library_loaders_are_not_linked() {
        let Ok(exe) = std::env::current_exe().and_then(std::fs::read) else { return };
        let Some(names) = symbol_names(&exe) else {
            { use std::io::Write; let _ = writeln!(std::io::stderr(), "cudarc_math_library_loaders_are_not_linked: skipped (no ELF symbol table)"); }
            return;
        };
        let names: Vec<String> = names.split(|&b| b == 0).map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        if !names.iter().any(|n| n.starts_with("_ZN6cudarc6driver3sys")) {
            { use std::io::Write; let _ = writeln!(std::io::stderr(), "cudarc_math_library_loaders_are_not_linked: skipped (symbols stripped)"); }
            return;
        }
        let linked: Vec<&String> = names.iter().filter(|n| ["_ZN6cudarc5cudnn3sys", "_ZN6cudarc8cublaslt3sys", "_ZN6cudarc6cublas3sys"].iter().any(|p| n.starts_with(p)) && (n.contains("5culib3LIB") || n.contains("2_S17h"))).collect();
        assert!(linked.is_empty(), "cudarc's own loader is linked in: {linked:?}");
    }

    #[test]
    fn wheels_of_nvrtc_environment_and_cuda_major_come_first() {
        let w = |s: &str| PathBuf::from(s);
        let wheels = vec![w("/a/site-packages/nvidia/cu13/lib"), w("/a/site-packages/nvidia/cudnn/lib"), w("/a/site-packages/nvidia/cu12/lib"), w("/b/site-packages/nvidia/cu12/lib"), w("/b/site-packages/nvidia/cudnn/lib"), w("/b/site-packages/nvidia/cu13/lib")];
        assert_eq!(rank_wheels(wheels.clone(), None), wheels);
        let r = rank_wheels(wheels.clone(), Some((Some(w("/b/site-packages")), 13)));
        assert_eq!(r, vec![w("/b/site-packages/nvidia/cudnn/lib"), w("/b/site-packages/nvidia/cu13/lib"), w("/b/site-packages/nvidia/cu12/lib"), w("/a/site-packages/nvidia/cu13/lib"), w("/a/site-packages/nvidia/cudnn/lib"), w("/a/site-packages/nvidia/cu12/lib")]);
        let r = rank_wheels(wheels, Some((None, 12)));
        assert_eq!(r[..4], [w("/a/site-packages/nvidia/cudnn/lib"), w("/a/site-packages/nvidia/cu12/lib"), w("/b/site-packages/nvidia/cu12/lib"), w("/b/site-packages/nvidia/cudnn/lib")]);
        assert_eq!(preferred_sonames(&CUBLASLT, Some(12)), vec!["libcublasLt.so.12", "libcublasLt.so.13", "libcublasLt.so"]);
        assert_eq!(preferred_sonames(&CUDNN, Some(13)), vec!["libcudnn.so.9", "libcudnn.so"]);
    }
}
