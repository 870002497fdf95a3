//! Run-time compilation of the CUDA C kernel families (kernels/cuda/NAME.cu, embedded in the binary)
//! with NVRTC, straight to a CUBIN for one GPU architecture. CUBIN rather than PTX: a newer NVRTC
//! emits PTX that an older driver cannot JIT, while its CUBIN loads fine. Results are cached on disk,
//! keyed by a hash of the source, the shared headers, the options, the architecture and the NVRTC
//! version.
//!
//! NVRTC is loaded dynamically (libloading), so nothing here needs CUDA at build time and its
//! absence is an error value, never a panic. Where it is looked for: see [`Nvrtc::find`].
//! Cache: `LOOKAHEAD_KERNEL_CACHE=DIR` relocates it, `=off` disables it; the default is
//! `$XDG_CACHE_HOME/lookahead/kernels` or `~/.cache/lookahead/kernels`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One kernel family: the CUDA C source of kernels/cuda/NAME.cu and the extra NVRTC options it
/// is compiled with (e.g. `--use_fast_math` where that is numerically safe for the family).
#[derive(Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub code: &'static str,
    pub options: &'static [&'static str],
}

impl KernelSource {
    /// The path of the source in the repository, as compile errors show it.
    pub fn path(&self) -> String {
        format!("kernels/cuda/{}.cu", self.name)
    }
}

/// Headers every kernel family may `#include "NAME"` (kernels/cuda/*.cuh), given to NVRTC from
/// memory so that no include path is needed at run time.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../cuda/common.cuh")), ("mma.cuh", include_str!("../cuda/mma.cuh")), ("warp_reduce.cuh", include_str!("../cuda/warp_reduce.cuh")), ("cluster.cuh", include_str!("../cuda/cluster.cuh")), ("lora_linear.cuh", include_str!("../cuda/lora_linear.cuh")), ("flash_attention.cuh", include_str!("../cuda/flash_attention.cuh")), ("flash_attention_backward.cuh", include_str!("../cuda/flash_attention_backward.cuh")), ("pipeline.cuh", include_str!("../cuda/pipeline.cuh"))];

/// Bump when the cache format or the fixed options change.
const CACHE_FORMAT: u32 = 1;

/// Options every family gets. `-lineinfo` only maps SASS to source lines for profilers; it does
/// not change the code. `--ptxas-options=-v` makes the log report registers and spills.
const BASE_OPTIONS: &[&str] = &["--std=c++17", "-default-device", "-lineinfo", "--ptxas-options=-v"];

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("NVRTC (libnvrtc) not found: {0}")]
    NotFound(String),
    #[error("{file}: NVRTC compile for sm_{arch} failed:\n{log}")]
    Compile { file: String, arch: u32, log: String },
    #[error("NVRTC {call} failed for {file}: {msg}")]
    Nvrtc { call: &'static str, file: String, msg: String },
}

// ---- the library ------------------------------------------------------------------------------

type NvrtcResult = c_int;
type Program = *mut c_void;

/// A loaded NVRTC library.
pub struct Nvrtc {
    _lib: libloading::Library,
    path: PathBuf,
    version: (i32, i32),
    create: unsafe extern "C" fn(*mut Program, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nvrtc({} {}.{})", self.path.display(), self.version.0, self.version.1)
    }
}

impl Nvrtc {
    /// Loads NVRTC from a library file (`libnvrtc.so.13`, ...) or a folder holding one.
    pub fn open(path: &Path) -> Result<Nvrtc, CompileError> {
        let file = if path.is_dir() {
            nvrtc_in_dir(path).ok_or_else(|| CompileError::NotFound(format!("no libnvrtc.so* in {}", path.display())))?
        } else {
            path.to_path_buf()
        };
        Self::load(&file, file.clone())
    }

    /// Finds NVRTC, in this order: `LOOKAHEAD_NVRTC_LIB` (a file or a folder; if set, it must
    /// work); the dynamic loader's own search (`LD_LIBRARY_PATH`, system folders) for
    /// libnvrtc.so.13 / .12 / .so; `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda` lib64; the
    /// nvidia-cuda-nvrtc wheel inside the Python environments `$VIRTUAL_ENV`, `$LOOKAHEAD_CI_VENV`,
    /// `~/.cache/lookahead/ci-venv`, `~/.cache/lookahead/ref-venv` and `/opt/torch/.venv`.
    pub fn find() -> Result<Nvrtc, CompileError> {
        if let Some(p) = std::env::var_os("LOOKAHEAD_NVRTC_LIB").filter(|p| !p.is_empty()) {
            return Self::open(Path::new(&p)).map_err(|e| match e {
                CompileError::NotFound(m) => CompileError::NotFound(format!("LOOKAHEAD_NVRTC_LIB={}: {m}", Path::new(&p).display())),
                other => other,
            });
        }
        for soname in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
            if let Ok(n) = Self::load(Path::new(soname), PathBuf::from(soname)) {
                return Ok(n);
            }
        }
        let dirs = search_dirs();
        for dir in &dirs {
            if let Some(file) = nvrtc_in_dir(dir) {
                if let Ok(n) = Self::load(&file, file.clone()) {
                    return Ok(n);
                }
            }
        }
        Err(CompileError::NotFound(format!(
            "set LOOKAHEAD_NVRTC_LIB to libnvrtc.so (e.g. from `pip install nvidia-cuda-nvrtc`); searched the loader path and {}",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )))
    }

    /// The process-wide NVRTC, found once with [`Nvrtc::find`].
    pub fn global() -> Result<&'static Nvrtc, CompileError> {
        static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
        match NVRTC.get_or_init(|| Nvrtc::find().map_err(|e| e.to_string())) {
            Ok(n) => Ok(n),
            Err(e) => Err(CompileError::NotFound(e.trim_start_matches("NVRTC (libnvrtc) not found: ").to_string())),
        }
    }

    fn load(file: &Path, shown: PathBuf) -> Result<Nvrtc, CompileError> {
        let err = |e: libloading::Error| CompileError::NotFound(format!("{}: {e}", shown.display()));
        // SAFETY: loading NVRTC runs no initialisers with preconditions; every symbol is looked up
        // with the signature of nvrtc.h.
        unsafe {
            let lib = libloading::Library::new(file).map_err(err)?;
            let version_fn: libloading::Symbol<unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult> = lib.get(b"nvrtcVersion\0").map_err(err)?;
            let (mut major, mut minor) = (0, 0);
            if version_fn(&mut major, &mut minor) != 0 {
                return Err(CompileError::NotFound(format!("{}: nvrtcVersion failed", shown.display())));
            }
            Ok(Nvrtc {
                create: *lib.get(b"nvrtcCreateProgram\0").map_err(err)?,
                destroy: *lib.get(b"nvrtcDestroyProgram\0").map_err(err)?,
                compile: *lib.get(b"nvrtcCompileProgram\0").map_err(err)?,
                log_size: *lib.get(b"nvrtcGetProgramLogSize\0").map_err(err)?,
                log: *lib.get(b"nvrtcGetProgramLog\0").map_err(err)?,
                cubin_size: *lib.get(b"nvrtcGetCUBINSize\0").map_err(err)?,
                cubin: *lib.get(b"nvrtcGetCUBIN\0").map_err(err)?,
                error_string: *lib.get(b"nvrtcGetErrorString\0").map_err(err)?,
                version: (major, minor),
                path: shown,
                _lib: lib,
            })
        }
    }

    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The file it was loaded from (or the soname the loader resolved).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compiles `src` for `sm_{arch}` (e.g. 90 for H100), through the on-disk cache.
    pub fn compile(&self, src: &KernelSource, arch: u32, cache: &KernelCache) -> Result<Compiled, CompileError> {
        let key = self.cache_key(src, arch);
        let stem = format!("{}-sm{arch}-{key:032x}", src.name);
        if let KernelCache::Dir(dir) = cache {
            if let (Ok(cubin), Ok(log)) = (std::fs::read(dir.join(format!("{stem}.cubin"))), std::fs::read_to_string(dir.join(format!("{stem}.log")))) {
                if !cubin.is_empty() {
                    return Ok(Compiled { cubin, log, cached: true });
                }
            }
        }
        let compiled = self.compile_uncached(src, arch)?;
        if let KernelCache::Dir(dir) = cache {
            // A cache that cannot be written only costs a recompile next time.
            let _ = write_atomically(dir, &format!("{stem}.log"), compiled.log.as_bytes())
                .and_then(|_| write_atomically(dir, &format!("{stem}.cubin"), &compiled.cubin));
        }
        Ok(compiled)
    }

    /// Compiles `src` for `sm_{arch}` without looking at or filling the cache.
    pub fn compile_uncached(&self, src: &KernelSource, arch: u32) -> Result<Compiled, CompileError> {
        let file = src.path();
        let nvrtc_err = |call: &'static str, r: NvrtcResult| CompileError::Nvrtc { call, file: file.clone(), msg: self.error_message(r) };
        let c_src = CString::new(src.code).map_err(|_| nvrtc_err("nvrtcCreateProgram (NUL byte in source)", 3))?;
        let c_name = CString::new(file.clone()).expect("kernel names have no NUL");
        let header_code: Vec<CString> = HEADERS.iter().map(|(_, c)| CString::new(*c).expect("headers have no NUL")).collect();
        let header_names: Vec<CString> = HEADERS.iter().map(|(n, _)| CString::new(*n).expect("header names have no NUL")).collect();
        let header_code_ptrs: Vec<*const c_char> = header_code.iter().map(|c| c.as_ptr()).collect();
        let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
        let options: Vec<CString> = self.options(src, arch).into_iter().map(|o| CString::new(o).expect("options have no NUL")).collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|c| c.as_ptr()).collect();

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: every pointer passed lives until the program is destroyed below; buffers for the
        // log and the CUBIN are sized by NVRTC's own size queries.
        unsafe {
            let r = (self.create)(&mut prog, c_src.as_ptr(), c_name.as_ptr(), HEADERS.len() as c_int, header_code_ptrs.as_ptr(), header_name_ptrs.as_ptr());
            if r != 0 {
                return Err(nvrtc_err("nvrtcCreateProgram", r));
            }
            let result = (|| {
                let compile_result = (self.compile)(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr());
                let mut log_len = 0usize;
                let r = (self.log_size)(prog, &mut log_len);
                if r != 0 {
                    return Err(nvrtc_err("nvrtcGetProgramLogSize", r));
                }
                let mut log_buf = vec![0u8; log_len.max(1)];
                let r = (self.log)(prog, log_buf.as_mut_ptr() as *mut c_char);
                if r != 0 {
                    return Err(nvrtc_err("nvrtcGetProgramLog", r));
                }
                let log = String::from_utf8_lossy(CStr::from_bytes_until_nul(&log_buf).map(|c| c.to_bytes()).unwrap_or(&log_buf)).into_owned();
                if compile_result != 0 {
                    return Err(CompileError::Compile { file: file.clone(), arch, log: annotate_log(&log, src) });
                }
                let mut size = 0usize;
                let r = (self.cubin_size)(prog, &mut size);
                if r != 0 {
                    return Err(nvrtc_err("nvrtcGetCUBINSize", r));
                }
                let mut cubin = vec![0u8; size];
                let r = (self.cubin)(prog, cubin.as_mut_ptr() as *mut c_char);
                if r != 0 {
                    return Err(nvrtc_err("nvrtcGetCUBIN", r));
                }
                Ok(Compiled { cubin, log, cached: false })
            })();
            (self.destroy)(&mut prog);
            result
        }
    }

    /// The full NVRTC option list for `src` on `sm_{arch}` (`sm_90a` for 90, see [`arch_name`]).
    pub fn options(&self, src: &KernelSource, arch: u32) -> Vec<String> {
        let mut o = vec![format!("--gpu-architecture={}", arch_name(arch))];
        o.extend(BASE_OPTIONS.iter().map(|s| s.to_string()));
        o.extend(src.options.iter().map(|s| s.to_string()));
        o
    }

    fn cache_key(&self, src: &KernelSource, arch: u32) -> u128 {
        let mut h = Hash128::new();
        h.add(&CACHE_FORMAT.to_le_bytes());
        h.add(&self.version.0.to_le_bytes());
        h.add(&self.version.1.to_le_bytes());
        for o in self.options(src, arch) {
            h.add(o.as_bytes());
        }
        h.add(src.code.as_bytes());
        for (name, code) in HEADERS {
            h.add(name.as_bytes());
            h.add(code.as_bytes());
        }
        h.finish()
    }

    fn error_message(&self, r: NvrtcResult) -> String {
        // SAFETY: nvrtcGetErrorString returns a static C string for any code.
        let s = unsafe { (self.error_string)(r) };
        if s.is_null() {
            format!("error {r}")
        } else {
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        }
    }
}

/// A compiled family: the CUBIN and NVRTC's log (which holds the ptxas resource report).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    /// True when it came from the on-disk cache.
    pub cached: bool,
}

impl Compiled {
    /// Registers, stack and spills of every kernel, from the ptxas report in the log.
    pub fn resources(&self) -> Vec<KernelResources> {
        parse_ptxas_log(&self.log)
    }

    /// ptxas' notes that it serialized a kernel's wgmma instructions (C7514..C7520, "Potential
    /// Performance Loss"): it does so when it cannot prove the warpgroup's use of them safe, which
    /// keeps the kernel correct but far slower, and says so only in the log.
    pub fn wgmma_serialized(&self) -> Vec<&str> {
        self.log.lines().filter(|l| l.contains("Potential Performance Loss") && l.contains("wgmma")).collect()
    }
}

/// What ptxas reported for one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
}

impl KernelResources {
    /// One aligned line for a report: arch, name, registers, stack, spills (flagged), static shared.
    pub fn line(&self, arch: u32) -> String {
        let flag = if self.spill_store_bytes + self.spill_load_bytes > 0 { "  <-- SPILLS" } else { "" };
        format!(
            "  {:<6} {:<40} regs {:>3}  stack {:>4} B  spill st {:>4} B  ld {:>4} B  smem {:>6} B{flag}",
            arch_name(arch),
            self.name,
            self.registers,
            self.stack_frame_bytes,
            self.spill_store_bytes,
            self.spill_load_bytes,
            self.shared_bytes
        )
    }
}

/// Parses `ptxas info` lines: "Compiling entry function 'X' for 'sm_90'", "N bytes stack frame,
/// N bytes spill stores, N bytes spill loads", "Used N registers, ... N bytes smem, ...".
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources { name, ..Default::default() });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_frame_bytes = number_before(line, " bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, " bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, " bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                k.registers = number_before(line, " registers").unwrap_or(0);
                k.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Adds the offending source line under every `file(line): error|warning` line of an NVRTC log
/// that does not quote it already.
fn annotate_log(log: &str, src: &KernelSource) -> String {
    let mut out = String::new();
    for line in log.lines() {
        out.push_str(line);
        out.push('\n');
        let Some(open) = line.find('(') else { continue };
        let Some(close) = line[open..].find("): ").map(|c| open + c) else { continue };
        let (file, num) = (&line[..open], &line[open + 1..close]);
        let Ok(n) = num.parse::<usize>() else { continue };
        let text = if file == src.path() {
            src.code.lines().nth(n.saturating_sub(1))
        } else {
            HEADERS.iter().find(|(h, _)| file.ends_with(h)).and_then(|(_, c)| c.lines().nth(n.saturating_sub(1)))
        };
        // Newer NVRTC quotes the line itself.
        if let Some(t) = text.filter(|t| !t.trim().is_empty() && !log.contains(t.trim())) {
            out.push_str(&format!("    | {}\n", t.trim_end()));
        }
    }
    out
}

// ---- where NVRTC and the cache live -------------------------------------------------------

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// The architecture NVRTC compiles for: `sm_{arch}`, except `sm_90a` on compute capability 9.0 so
/// that the Hopper-only instructions (wgmma, setmaxnreg) are available to the kernels that guard
/// them with `__CUDA_ARCH_FEAT_SM90_ALL`. A CUBIN for sm_90a loads on every 9.0 device.
pub fn arch_name(arch: u32) -> String {
    if arch == 90 {
        "sm_90a".to_string()
    } else {
        format!("sm_{arch}")
    }
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = cuda_toolkit_dirs();
    dirs.extend(python_wheel_dirs(&["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cu12/lib"]));
    dirs
}

/// The library folders of CUDA toolkit installs: `$CUDA_HOME`, `$CUDA_PATH`, /usr/local/cuda.
/// (The engine finds cuBLASLt and cuDNN with these too.)
pub fn cuda_toolkit_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            dirs.push(PathBuf::from(&p).join("lib64"));
            dirs.push(PathBuf::from(&p).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    dirs
}

/// `subdirs` (e.g. "nvidia/cu13/lib") of the site-packages of every known Python environment
/// ($VIRTUAL_ENV, $LOOKAHEAD_CI_VENV, ~/.cache/lookahead/{ci,ref}-venv, /opt/torch/.venv), newest
/// Python first: where NVIDIA's PyPI wheels put their libraries.
pub fn python_wheel_dirs(subdirs: &[&str]) -> Vec<PathBuf> {
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
    let mut dirs = Vec::new();
    for venv in venvs {
        let Ok(entries) = std::fs::read_dir(venv.join("lib")) else { continue };
        let mut pythons: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3"))).collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            for sub in subdirs {
                dirs.push(py.join("site-packages").join(sub));
            }
        }
    }
    dirs
}

/// The NVRTC library file in `dir` (not libnvrtc-builtins), highest version first.
fn nvrtc_in_dir(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libnvrtc.so")))
        .collect();
    found.sort();
    found.pop()
}

/// Where compiled kernels are kept between runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelCache {
    Off,
    Dir(PathBuf),
}

impl KernelCache {
    /// `LOOKAHEAD_KERNEL_CACHE` (a folder, or `off`), else `$XDG_CACHE_HOME/lookahead/kernels`,
    /// else `~/.cache/lookahead/kernels`; off when none of these can be named.
    pub fn from_env() -> KernelCache {
        match std::env::var_os("LOOKAHEAD_KERNEL_CACHE").filter(|v| !v.is_empty()) {
            Some(v) if v == "off" || v == "0" => KernelCache::Off,
            Some(v) => KernelCache::Dir(PathBuf::from(v)),
            None => match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
                Some(x) => KernelCache::Dir(PathBuf::from(x).join("lookahead/kernels")),
                None => home().map_or(KernelCache::Off, |h| KernelCache::Dir(h.join(".cache/lookahead/kernels"))),
            },
        }
    }
}

/// Writes through a temporary file and a rename, so that concurrent processes never read a
/// half-written cache entry.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Two independent 64-bit FNV-1a streams: a stable 128-bit content hash for cache keys (std's
/// hashers are not stable across Rust releases). Also keys the emulator's builds.
pub(crate) struct Hash128(u64, u64);

impl Hash128 {
    pub(crate) fn new() -> Self {
        Hash128(0xcbf2_9ce4_8422_2325, 0x6c62_272e_07bb_0142)
    }
    pub(crate) fn add(&mut self, bytes: &[u8]) {
        // Length first, so that ("ab","c") and ("a","bc") differ.
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            self.1 = (self.1 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
    }
    pub(crate) fn finish(&self) -> u128 {
        ((self.0 as u128) << 64) | self.1 as u128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'unary_f32' for 'sm_90'\n\
                   ptxas info    : Function properties for unary_f32\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 32 registers, used 0 barriers, 1024 bytes smem, 380 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'cast_f32_bf16' for 'sm_90'\n\
                   ptxas info    : Used 12 registers, 368 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], KernelResources { name: "unary_f32".into(), registers: 32, stack_frame_bytes: 8, spill_store_bytes: 4, spill_load_bytes: 12, shared_bytes: 1024 });
        assert_eq!((r[1].name.as_str(), r[1].registers, r[1].spill_store_bytes), ("cast_f32_bf16", 12, 0));
    }

    #[test]
    fn cache_hash_separates_fields() {
        let mut a = Hash128::new();
        a.add(b"ab");
        a.add(b"c");
        let mut b = Hash128::new();
        b.add(b"a");
        b.add(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
