//! CPU emulation of the CUDA kernel families, for checking kernels without a GPU (kernels/emu).
//!
//! A .cu file is compiled by the host C++ compiler with `-DLOOKAHEAD_EMULATE` and the emulation
//! header kernels/emu/cuda_emulator.h force-included, into a shared library that is loaded with
//! libloading. A launch runs the blocks one after another and the threads of a block as fibers
//! on the calling thread; each thread calls back into Rust, which calls the kernel (an
//! `extern "C"` function of the library) with its arguments:
//!
//! ```text
//! let m = kernels::emulate::EmulatedModule::load(&kernels::softmax::SOURCE)?;
//! unsafe { m.launch("softmax_f32", (gx, 1, 1), (256, 1, 1), 0, &|f| {
//!     let k: extern "C" fn(u64, u64, u32, u32, u32, i32) = std::mem::transmute(f);
//!     k(x.as_ptr() as u64, y.as_mut_ptr() as u64, rows, cols, 32, 0);
//! })? };
//! ```
//!
//! Pointers passed to kernels are host pointers. The order in which the threads of a block run
//! between synchronisation points is a `Schedule`: `launch` takes it from `LOOKAHEAD_EMU_SCHEDULE`
//! (round-robin | far-apart | random:SEED; far-apart when unset), `launch_with` from its caller.
//! The compiler is `LOOKAHEAD_CXX`, else `c++` or
//! `g++` on PATH. Compiled modules are cached under `$LOOKAHEAD_KERNEL_CACHE/emu` (or the default
//! kernel cache's `emu` folder; a temporary folder when the cache is off), keyed by a hash of the
//! source, the headers, the emulation header, the flags and the compiler's version.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::compile::{Hash128, KernelCache, KernelSource, HEADERS};

/// The emulation header, force-included in every emulated build.
pub const EMULATOR_HEADER: &str = include_str!("../emu/cuda_emulator.h");

/// Bump when the cache layout or the build changes in a way the hash does not see.
const CACHE_FORMAT: u32 = 2;

/// Compiler flags of every emulated build (before `-include`, `-I` and the file). No strict
/// aliasing: kernels reinterpret buffers as packs (as CUDA allows). No psABI notes: GCC notes
/// every kernel that takes a 64-byte aligned TensorMap by value (an ABI change of GCC 4.6 that
/// Rust's `TensorMapArg` follows), which buried real errors in the compile log.
const FLAGS: &[&str] = &["-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wno-psabi", "-DLOOKAHEAD_EMULATE"];

#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    #[error("no C++ compiler for the CUDA emulator: {0}")]
    NoCompiler(String),
    #[error("{file}: emulated build with {compiler} failed:\n{log}")]
    Compile { file: String, compiler: String, log: String },
    #[error("{file}: {what}: {msg}")]
    Io { file: String, what: &'static str, msg: String },
    #[error("{file}: loading the emulated module failed: {msg}")]
    Load { file: String, msg: String },
    #[error("{file}: no kernel `{kernel}` (an extern \"C\" __global__ function) in the emulated module")]
    MissingKernel { file: String, kernel: String },
    #[error("kernel {kernel} ({file}, schedule {schedule}): {msg}")]
    Launch { kernel: String, file: String, schedule: Schedule, msg: String },
    #[error("{SCHEDULE_ENV}={value:?}: {msg}; expected round-robin, far-apart or random:SEED (SEED a decimal or 0x-hex u64)")]
    BadSchedule { value: String, msg: String },
}

/// The environment variable that picks the schedule of `EmulatedModule::launch`.
pub const SCHEDULE_ENV: &str = "LOOKAHEAD_EMU_SCHEDULE";

/// The order in which the emulated threads of a block run between synchronisation points (barriers,
/// warp collectives). Threads run one at a time, so a missing barrier shows only when the order
/// puts a read before the write it needs (or a write, or a cp.async issue, before a read of the
/// old contents); each schedule exposes a different set of such races (kernels/emu/README.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Every runnable thread in index order to its next sync point, then the collectives are
    /// resolved: all warps advance in step, one sync point at a time.
    RoundRobin,
    /// One warp runs until each of its lanes waits at a block barrier or has exited before the
    /// next warp starts; warp (and lane) order alternates forward / reverse at every block
    /// barrier, and odd blocks start reversed. Exposes missing `__syncthreads` between warps,
    /// e.g. a cp.async prefetch into a stage that a slower warp still reads.
    FarApart,
    /// A seeded generator picks the next warp among the runnable ones, the lane order, and how
    /// many sync points (1 to 256, log-uniform) it runs before the next pick.
    Random(u64),
}

impl Schedule {
    /// The schedule of `launch` when `LOOKAHEAD_EMU_SCHEDULE` is unset or empty.
    pub const DEFAULT: Schedule = Schedule::FarApart;

    /// `round-robin`, `far-apart` or `random:SEED` (decimal or `0x` hexadecimal).
    pub fn parse(text: &str) -> Result<Schedule, EmulateError> {
        let bad = |msg: &str| EmulateError::BadSchedule { value: text.to_string(), msg: msg.to_string() };
        match text.trim() {
            "round-robin" => Ok(Schedule::RoundRobin),
            "far-apart" => Ok(Schedule::FarApart),
            t => {
                let seed = t.strip_prefix("random:").ok_or_else(|| bad("unknown schedule"))?.trim();
                let parsed = match seed.strip_prefix("0x").or_else(|| seed.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => seed.parse::<u64>(),
                };
                parsed.map(Schedule::Random).map_err(|_| bad("the seed is not a u64"))
            }
        }
    }

    /// The schedule `LOOKAHEAD_EMU_SCHEDULE` names, or `DEFAULT` when it is unset or empty.
    pub fn from_env() -> Result<Schedule, EmulateError> {
        match std::env::var(SCHEDULE_ENV) {
            Ok(v) if !v.trim().is_empty() => Schedule::parse(&v),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Schedule::DEFAULT),
            Err(std::env::VarError::NotUnicode(v)) => Err(EmulateError::BadSchedule { value: v.to_string_lossy().into_owned(), msg: "not unicode".into() }),
        }
    }

    /// The schedule code and seed of lookahead_emu_run (`Schedule` in cuda_emulator.h).
    fn code(self) -> (c_int, u64) {
        match self {
            Schedule::RoundRobin => (0, 0),
            Schedule::FarApart => (1, 0),
            Schedule::Random(seed) => (2, seed),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::RoundRobin => write!(f, "round-robin"),
            Schedule::FarApart => write!(f, "far-apart"),
            Schedule::Random(seed) => write!(f, "random:{seed}"),
        }
    }
}

/// The C++ compiler the emulator builds with: `LOOKAHEAD_CXX` (a path, or a name looked up on
/// PATH), else `c++` or `g++` on PATH.
pub fn find_compiler() -> Result<PathBuf, EmulateError> {
    if let Some(v) = std::env::var_os("LOOKAHEAD_CXX").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&v);
        let found = if p.components().count() > 1 { p.is_file().then_some(p.clone()) } else { on_path(&v.to_string_lossy()) };
        return found.ok_or_else(|| EmulateError::NoCompiler(format!("LOOKAHEAD_CXX={} is not a file or a program on PATH", p.display())));
    }
    on_path("c++").or_else(|| on_path("g++")).ok_or_else(|| EmulateError::NoCompiler("neither c++ nor g++ is on PATH (set LOOKAHEAD_CXX)".into()))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `cxx --version`, once per compiler and process (part of the cache key).
fn compiler_version(cxx: &Path) -> Result<String, EmulateError> {
    static VERSIONS: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let versions = VERSIONS.get_or_init(Default::default);
    if let Some(v) = versions.lock().unwrap_or_else(|e| e.into_inner()).get(cxx) {
        return Ok(v.clone());
    }
    let out = std::process::Command::new(cxx)
        .arg("--version")
        .output()
        .map_err(|e| EmulateError::NoCompiler(format!("{} --version: {e}", cxx.display())))?;
    if !out.status.success() {
        return Err(EmulateError::NoCompiler(format!("{} --version failed: {}", cxx.display(), String::from_utf8_lossy(&out.stderr))));
    }
    let v = String::from_utf8_lossy(&out.stdout).into_owned();
    versions.lock().unwrap_or_else(|e| e.into_inner()).insert(cxx.to_path_buf(), v.clone());
    Ok(v)
}

/// Where emulated modules are kept: the kernel cache's `emu` folder, or a per-process temporary
/// folder when the cache is off.
fn cache_dir() -> PathBuf {
    match KernelCache::from_env() {
        KernelCache::Dir(d) => d.join("emu"),
        KernelCache::Off => std::env::temp_dir().join(format!("lookahead-emu-{}", std::process::id())),
    }
}

/// The C entry point of an emulated module (lookahead_emu_run in cuda_emulator.h).
type RunFn = unsafe extern "C" fn(
    kernel: *const c_char,
    kernel_fn: *const c_void,
    grid: *const u32,
    block: *const u32,
    cluster: *const u32,
    shared_bytes: u32,
    schedule: c_int,
    seed: u64,
    thread_fn: unsafe extern "C" fn(*mut c_void, *const c_void) -> c_int,
    ctx: *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> c_int;

/// A .cu file compiled for the CPU emulator and loaded.
pub struct EmulatedModule {
    lib: libloading::Library,
    run: RunFn,
    /// The source as errors name it (kernels/cuda/NAME.cu, or the path given to `load_file`).
    file: String,
}

impl std::fmt::Debug for EmulatedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmulatedModule({})", self.file)
    }
}

impl EmulatedModule {
    /// Builds (or takes from the cache) and loads a kernel family.
    pub fn load(src: &KernelSource) -> Result<EmulatedModule, EmulateError> {
        Self::build(src.name, src.code, &src.path())
    }

    /// Builds and loads any .cu file (e.g. the emulator's own test kernels, kernels/emu/tests/);
    /// it may include the kernel headers ("common.cuh", "mma.cuh").
    pub fn load_file(path: &Path) -> Result<EmulatedModule, EmulateError> {
        let shown = path.display().to_string();
        let code = std::fs::read_to_string(path).map_err(|e| EmulateError::Io { file: shown.clone(), what: "reading the source", msg: e.to_string() })?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kernel".into());
        let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        Self::build(&name, &code, &shown)
    }

    fn build(name: &str, code: &str, shown: &str) -> Result<EmulatedModule, EmulateError> {
        let cxx = find_compiler()?;
        let version = compiler_version(&cxx)?;
        let mut h = Hash128::new();
        h.add(&CACHE_FORMAT.to_le_bytes());
        h.add(version.as_bytes());
        for f in FLAGS {
            h.add(f.as_bytes());
        }
        h.add(name.as_bytes());
        h.add(code.as_bytes());
        for (n, c) in HEADERS {
            h.add(n.as_bytes());
            h.add(c.as_bytes());
        }
        h.add(EMULATOR_HEADER.as_bytes());
        let key = h.finish();
        let dir = cache_dir();
        let lib_path = dir.join(format!("{name}-{key:032x}.so"));
        if !lib_path.is_file() {
            // One build per module at a time in this process (parallel tests load the same ones).
            static BUILDING: OnceLock<Mutex<HashMap<u128, Arc<Mutex<()>>>>> = OnceLock::new();
            let lock = BUILDING.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone();
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            if !lib_path.is_file() {
                compile(&cxx, name, code, shown, &dir, &lib_path)?;
            }
        }
        // SAFETY: the library is our own build of the emulation header and a kernel file; its
        // initialisers only set up plain data.
        let lib = unsafe { libloading::Library::new(&lib_path) }.map_err(|e| EmulateError::Load { file: shown.to_string(), msg: format!("{}: {e}", lib_path.display()) })?;
        // SAFETY: lookahead_emu_run has the RunFn signature (cuda_emulator.h).
        let run: RunFn = unsafe { lib.get::<RunFn>("lookahead_emu_run") }
            .map(|s| *s)
            .map_err(|e| EmulateError::Load { file: shown.to_string(), msg: format!("lookahead_emu_run: {e}") })?;
        Ok(EmulatedModule { lib, run, file: shown.to_string() })
    }

    /// Builds (or takes from the cache) and loads kernel source `code` of family `name`
    /// (errors name it kernels/cuda/NAME.cu): what the emulated driver's "CUBIN" carries.
    pub fn load_source(name: &str, code: &str) -> Result<EmulatedModule, EmulateError> {
        Self::build(name, code, &format!("kernels/cuda/{name}.cu"))
    }

    /// The address of `symbol` in the module (an error naming `kernel` when it is not there).
    fn symbol(&self, kernel: &str, symbol: &str) -> Result<*const c_void, EmulateError> {
        let missing = || EmulateError::MissingKernel { file: self.file.clone(), kernel: kernel.to_string() };
        let name = CString::new(symbol).map_err(|_| missing())?;
        // SAFETY: only the symbol's address is taken; callers know its type.
        match unsafe { self.lib.get::<*const c_void>(name.as_c_str()) } {
            Ok(s) if !s.is_null() => Ok(*s),
            _ => Err(missing()),
        }
    }

    /// True when the module has a kernel of this name.
    pub fn has_kernel(&self, kernel: &str) -> bool {
        self.symbol(kernel, &format!("{PARAMS_ENTRY}{kernel}")).is_ok()
    }

    /// `launch_cluster_with` of a kernel whose arguments are given as cuLaunchKernel takes them:
    /// `params` holds one pointer per kernel parameter, to a value of that parameter's type.
    ///
    /// # Safety
    /// `params` must point at as many valid pointers as the kernel has parameters, each to a
    /// value of the parameter's type, and every pointer argument must be valid for what the
    /// kernel reads and writes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_params(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        cluster: (u32, u32, u32),
        shared_bytes: u32,
        schedule: Schedule,
        params: *const *mut c_void,
    ) -> Result<(), EmulateError> {
        let entry = self.symbol(kernel, &format!("{PARAMS_ENTRY}{kernel}"))?;
        // SAFETY: the build appends this entry point with this signature for every kernel.
        let call: unsafe extern "C" fn(*const *mut c_void) = unsafe { std::mem::transmute(entry) };
        // SAFETY: the caller's guarantees: `params` matches the kernel's parameters.
        unsafe { self.launch_cluster_with(kernel, grid, block, cluster, shared_bytes, schedule, &|_| call(params)) }
    }

    /// The source as errors name it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Runs `kernel` over `grid` blocks of `block` threads with `shared_bytes` of dynamic shared
    /// memory (LA_DYNAMIC_SHARED): every emulated thread calls `call` with the kernel's address,
    /// which it transmutes to the kernel's `extern "C" fn` type and calls with the arguments.
    /// The threads run in the order of the schedule `LOOKAHEAD_EMU_SCHEDULE` names
    /// (`Schedule::from_env`; `Schedule::DEFAULT` when unset). Deadlocks, faults the emulator
    /// detects and bad launch configurations come back as errors naming the kernel; a panic in
    /// `call` is resumed here.
    ///
    /// # Safety
    /// `call` must call the kernel with its exact signature, and every pointer argument must be
    /// valid for what the kernel reads and writes.
    pub unsafe fn launch(&self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32, call: &dyn Fn(*const c_void)) -> Result<(), EmulateError> {
        let schedule = Schedule::from_env()?;
        // SAFETY: the caller's guarantees, passed on.
        unsafe { self.launch_with(kernel, grid, block, shared_bytes, schedule, call) }
    }

    /// `launch` with the given schedule (whatever `LOOKAHEAD_EMU_SCHEDULE` says).
    ///
    /// # Safety
    /// As for `launch`.
    pub unsafe fn launch_with(&self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32, schedule: Schedule, call: &dyn Fn(*const c_void)) -> Result<(), EmulateError> {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { self.launch_cluster_with(kernel, grid, block, (1, 1, 1), shared_bytes, schedule, call) }
    }

    /// `launch` of a kernel that uses thread-block clusters (cluster.cuh): `cluster` CTAs per
    /// cluster (each grid size a multiple of the cluster's, at most 16 CTAs, else an error). The
    /// CTAs of a cluster run together, each with its own shared memory; clusters run one after
    /// another. The schedule is `LOOKAHEAD_EMU_SCHEDULE`'s, as for `launch`.
    ///
    /// # Safety
    /// As for `launch`.
    pub unsafe fn launch_cluster(&self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), cluster: (u32, u32, u32), shared_bytes: u32, call: &dyn Fn(*const c_void)) -> Result<(), EmulateError> {
        let schedule = Schedule::from_env()?;
        // SAFETY: the caller's guarantees, passed on.
        unsafe { self.launch_cluster_with(kernel, grid, block, cluster, shared_bytes, schedule, call) }
    }

    /// `launch_cluster` with the given schedule. The schedules treat the warps of all CTAs of the
    /// cluster as one set (far-apart: one warp after another over the whole cluster).
    ///
    /// # Safety
    /// As for `launch`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_cluster_with(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        cluster: (u32, u32, u32),
        shared_bytes: u32,
        schedule: Schedule,
        call: &dyn Fn(*const c_void),
    ) -> Result<(), EmulateError> {
        let launch_err = |msg: String| EmulateError::Launch { kernel: kernel.to_string(), file: self.file.clone(), schedule, msg };
        // The kernel's address is only handed to `call`, which knows its type.
        let kernel_fn = self.symbol(kernel, kernel)?;
        let c_kernel = CString::new(kernel).map_err(|_| EmulateError::MissingKernel { file: self.file.clone(), kernel: kernel.to_string() })?;
        let grid = [grid.0, grid.1, grid.2];
        let block = [block.0, block.1, block.2];
        let cluster = [cluster.0, cluster.1, cluster.2];
        let (schedule_code, seed) = schedule.code();
        let callback = Callback { call, panic: Cell::new(None) };
        let mut err = vec![0u8; 16384];
        // SAFETY: the pointers live for the call; run_thread receives `callback` as its context.
        let rc = unsafe {
            (self.run)(
                c_kernel.as_ptr(),
                kernel_fn,
                grid.as_ptr(),
                block.as_ptr(),
                cluster.as_ptr(),
                shared_bytes,
                schedule_code,
                seed,
                run_thread,
                &callback as *const Callback as *mut c_void,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if let Some(p) = callback.panic.take() {
            std::panic::resume_unwind(p);
        }
        match rc {
            0 => Ok(()),
            _ => Err(launch_err(CStr::from_bytes_until_nul(&err).map(|c| c.to_string_lossy().into_owned()).unwrap_or_else(|_| "launch failed".into()))),
        }
    }
}

struct Callback<'a> {
    call: &'a dyn Fn(*const c_void),
    /// The first panic of a thread's call; the launch stops and `launch` resumes it.
    panic: Cell<Option<Box<dyn std::any::Any + Send>>>,
}

/// Runs on each emulated thread's fiber (all on the launching OS thread, one at a time).
unsafe extern "C" fn run_thread(ctx: *mut c_void, kernel_fn: *const c_void) -> c_int {
    // SAFETY: ctx is the &Callback `launch` passed, alive for the whole launch; fibers only share
    // it through a shared reference and a Cell.
    let cb = unsafe { &*(ctx as *const Callback) };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (cb.call)(kernel_fn))) {
        Ok(()) => 0,
        Err(p) => {
            let first = cb.panic.take().unwrap_or(p);
            cb.panic.set(Some(first));
            1
        }
    }
}

/// Compiles `code` into `lib_path` in a scratch folder of `dir` (renamed into place, so that
/// concurrent processes never load a half-written library).
fn compile(cxx: &Path, name: &str, code: &str, shown: &str, dir: &Path, lib_path: &Path) -> Result<(), EmulateError> {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let io = |what: &'static str, e: std::io::Error| EmulateError::Io { file: shown.to_string(), what, msg: e.to_string() };
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let build = dir.join(format!(".build-{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&build).map_err(|e| io("creating the build folder", e))?;
    let result = (|| {
        let src = build.join(format!("{name}.cu"));
        std::fs::write(&src, code).map_err(|e| io("writing the source", e))?;
        for (h, c) in HEADERS {
            std::fs::write(build.join(h), c).map_err(|e| io("writing a header", e))?;
        }
        let emu_header = build.join("cuda_emulator.h");
        std::fs::write(&emu_header, EMULATOR_HEADER).map_err(|e| io("writing the emulation header", e))?;
        // Every kernel also gets an entry point taking its arguments as cuLaunchKernel's
        // kernelParams (lookahead_emu_params_NAME): the kernels' names are those the
        // preprocessed source declares (macros expand to many of them).
        let preprocessed = std::process::Command::new(cxx)
            .args(FLAGS.iter().filter(|f| **f != "-shared"))
            .arg("-E")
            .arg("-include")
            .arg(&emu_header)
            .arg("-I")
            .arg(&build)
            .arg("-x")
            .arg("c++")
            .arg(&src)
            .output()
            .map_err(|e| EmulateError::NoCompiler(format!("running {}: {e}", cxx.display())))?;
        if preprocessed.status.success() {
            let mut with_entries = code.to_string();
            with_entries.push_str("\n// ---- kernelParams entry points (appended by kernels::emulate) ----\n");
            for kernel in kernel_names(&String::from_utf8_lossy(&preprocessed.stdout)) {
                with_entries.push_str(&format!(
                    "extern \"C\" __attribute__((visibility(\"default\"))) void {PARAMS_ENTRY}{kernel}(void** p) {{ ::lookahead_emu::call_with_params(&{kernel}, p); }}\n"
                ));
            }
            std::fs::write(&src, with_entries).map_err(|e| io("writing the source", e))?;
        }
        // (A source that does not preprocess fails the compile below, with its log.)
        let out_tmp = build.join(format!("{name}.so"));
        let output = std::process::Command::new(cxx)
            .args(FLAGS)
            .arg("-include")
            .arg(&emu_header)
            .arg("-I")
            .arg(&build)
            .arg("-x")
            .arg("c++")
            .arg(&src)
            .arg("-o")
            .arg(&out_tmp)
            .output()
            .map_err(|e| EmulateError::NoCompiler(format!("running {}: {e}", cxx.display())))?;
        if !output.status.success() {
            let mut log = String::from_utf8_lossy(&output.stderr).into_owned();
            log.push_str(&String::from_utf8_lossy(&output.stdout));
            // Name the files as they are in the repository rather than their scratch copies.
            let prefix = format!("{}/", build.display());
            let log = log
                .replace(&format!("{prefix}{name}.cu"), shown)
                .replace(&format!("{prefix}cuda_emulator.h"), "kernels/emu/cuda_emulator.h")
                .replace(&prefix, "kernels/cuda/");
            return Err(EmulateError::Compile { file: shown.to_string(), compiler: cxx.display().to_string(), log });
        }
        std::fs::rename(&out_tmp, lib_path).map_err(|e| io("moving the built library into the cache", e))
    })();
    let _ = std::fs::remove_dir_all(&build);
    result
}

/// Prefix of the entry point that calls a kernel with cuLaunchKernel-style arguments.
const PARAMS_ENTRY: &str = "lookahead_emu_params_";

/// The kernels a preprocessed source defines or declares: the names after `__global__`'s
/// expansion in `extern "C" __global__ void NAME(`, each once, in order.
fn kernel_names(preprocessed: &str) -> Vec<String> {
    const GLOBAL: &str = "__attribute__((visibility(\"default\")))";
    let mut names: Vec<String> = Vec::new();
    for (at, _) in preprocessed.match_indices(GLOBAL) {
        let rest = preprocessed[at + GLOBAL.len()..].trim_start();
        let Some(rest) = rest.strip_prefix("void") else { continue };
        if !rest.starts_with(char::is_whitespace) {
            continue;
        }
        let rest = rest.trim_start();
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let (name, after) = rest.split_at(end);
        if !name.is_empty() && !name.starts_with(PARAMS_ENTRY) && after.trim_start().starts_with('(') && !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

// ---- TMA tensor maps ---------------------------------------------------------------------------

/// The element type of a TMA tensor (a CUtensorMapDataType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaDtype {
    U8,
    U16,
    U32,
    F16,
    Bf16,
    F32,
}

impl TmaDtype {
    pub fn bytes(self) -> u64 {
        match self {
            TmaDtype::U8 => 1,
            TmaDtype::U16 | TmaDtype::F16 | TmaDtype::Bf16 => 2,
            TmaDtype::U32 | TmaDtype::F32 => 4,
        }
    }
}

/// The shared-memory swizzle of a TMA box: the wgmma descriptors' (mma.cuh WgmmaSwizzle): with a
/// span of S bytes, rows of the box are S bytes and the 16-byte chunk index (address bits 4..)
/// is XORed with the row within the pattern (address bits 7..): 128B: bits [4:6] ^= [7:9],
/// 64B: [4:5] ^= [7:8], 32B: [4] ^= [7], on the absolute shared-memory address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaSwizzle {
    None,
    B32,
    B64,
    B128,
}

impl TmaSwizzle {
    /// The span in bytes (0 without swizzle).
    pub fn bytes(self) -> u32 {
        match self {
            TmaSwizzle::None => 0,
            TmaSwizzle::B32 => 32,
            TmaSwizzle::B64 => 64,
            TmaSwizzle::B128 => 128,
        }
    }

    /// 0, 32, 64 or 128 bytes.
    pub fn from_bytes(bytes: u32) -> Result<TmaSwizzle, TensorMapError> {
        match bytes {
            0 => Ok(TmaSwizzle::None),
            32 => Ok(TmaSwizzle::B32),
            64 => Ok(TmaSwizzle::B64),
            128 => Ok(TmaSwizzle::B128),
            b => Err(TensorMapError(format!("swizzle of {b} bytes: TMA swizzles 0, 32, 64 or 128 bytes"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TMA tensor map: {0}")]
pub struct TensorMapError(pub String);

/// A TMA tensor of rank 2 to 4: `dims[0]` elements of `dtype` in the inner (contiguous)
/// dimension, then `dims[i]` entries `strides_bytes[i - 1]` bytes apart for i = 1 .. rank, at device
/// (or, in the emulator, host) address `base`, copied in boxes of `box_dims` elements (inner first;
/// in shared memory the box is dense, inner dimension fastest) with `swizzle`. Dimensions past
/// `rank` are 1. The strides need not grow with the dimension: a [B, L, H, D] buffer viewed as
/// [B, H, L, D] is dims (D, L, H, B) with strides (H D, D, L H D) elements, and a box's rows past
/// L are zero-filled per head instead of running into the next head. The same description encodes
/// the GPU's CUtensorMap (engine::cuda::tensor_map::encode, cuTensorMapEncodeTiled, rank `rank`:
/// a kernel's tma_load_<rank>d) and the emulator's (`emulated`). Elements outside the tensor read
/// as zero (loads) and are not written (stores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap {
    pub base: u64,
    pub dtype: TmaDtype,
    pub rank: usize,
    pub dims: [u64; 4],
    pub strides_bytes: [u64; 3],
    pub box_dims: [u32; 4],
    pub swizzle: TmaSwizzle,
}

/// A 2D TMA tensor (the rank-2 `TensorMap`): a row-major matrix of `rows` x `cols` elements of
/// `dtype` at `base`, rows `row_stride_bytes` apart, copied in boxes of `box_rows` x `box_cols`
/// elements with `swizzle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap2d {
    pub base: u64,
    pub dtype: TmaDtype,
    pub rows: u64,
    pub cols: u64,
    pub row_stride_bytes: u64,
    pub box_rows: u32,
    pub box_cols: u32,
    pub swizzle: TmaSwizzle,
}

/// A tensor map as a kernel argument: `const __grid_constant__ TensorMap` of
/// kernels/cuda/pipeline.cuh, 128 bytes, 64-byte aligned (the driver places each parameter at the
/// offset the kernel declares; this alignment keeps the host copy a valid CUtensorMap too).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapArg(pub [u64; 16]);

/// Word 0 of the emulator's tensor maps (kTensorMapMagic in kernels/emu/cuda_emulator.h).
pub const EMULATED_TENSOR_MAP_MAGIC: u64 = 0x3244_706d_5465_6d75;

impl From<&TensorMap2d> for TensorMap {
    fn from(m: &TensorMap2d) -> TensorMap {
        TensorMap {
            base: m.base,
            dtype: m.dtype,
            rank: 2,
            dims: [m.cols, m.rows, 1, 1],
            strides_bytes: [m.row_stride_bytes, 0, 0],
            box_dims: [m.box_cols, m.box_rows, 1, 1],
            swizzle: m.swizzle,
        }
    }
}

impl From<TensorMap2d> for TensorMap {
    fn from(m: TensorMap2d) -> TensorMap {
        TensorMap::from(&m)
    }
}

impl From<&TensorMap> for TensorMap {
    fn from(m: &TensorMap) -> TensorMap {
        *m
    }
}

impl TensorMap {
    /// Bytes one box moves (what a tma_load completes on its mbarrier).
    pub fn box_bytes(&self) -> u32 {
        self.box_dims.iter().product::<u32>() * self.dtype.bytes() as u32
    }

    /// cuTensorMapEncodeTiled's rules for this use: rank 2..4, base 16-byte aligned, dimensions
    /// 1..2^32, strides multiples of 16 below 2^40 and at least one inner row (dims[0] elements),
    /// box dimensions 1..256 with the inner one a multiple of 16 bytes, and with a swizzle the
    /// inner box dimension exactly the swizzle span (the layout the wgmma descriptors read).
    pub fn validate(&self) -> Result<(), TensorMapError> {
        let e = |msg: String| Err(TensorMapError(format!("{msg} ({self:?})")));
        let es = self.dtype.bytes();
        if !(2..=4).contains(&self.rank) {
            return e(format!("rank {}: this project's maps have rank 2 to 4", self.rank));
        }
        if !self.base.is_multiple_of(16) {
            return e(format!("base 0x{:x} is not 16-byte aligned", self.base));
        }
        let (dims, boxes) = (&self.dims[..self.rank], &self.box_dims[..self.rank]);
        if dims.iter().any(|&d| d == 0 || d > 1 << 32) || self.dims[self.rank..].iter().any(|&d| d != 1) {
            return e(format!("dimensions {dims:?}: each must be 1..2^32 (and those past the rank 1)"));
        }
        for &st in &self.strides_bytes[..self.rank - 1] {
            if !st.is_multiple_of(16) || st < self.dims[0] * es || st >= 1 << 40 {
                return e(format!("stride {st} bytes: a multiple of 16, at least one inner row ({} bytes), below 2^40", self.dims[0] * es));
            }
        }
        if boxes.iter().any(|&b| b == 0 || b > 256) || self.box_dims[self.rank..].iter().any(|&b| b != 1) {
            return e(format!("box {boxes:?}: each dimension must be 1..256 (and those past the rank 1)"));
        }
        let inner = self.box_dims[0] as u64 * es;
        if !inner.is_multiple_of(16) {
            return e(format!("the box's inner dimension is {inner} bytes, not a multiple of 16"));
        }
        let span = self.swizzle.bytes() as u64;
        if span != 0 && inner != span {
            return e(format!("with the {span}B swizzle the box's inner dimension must be {span} bytes, not {inner}"));
        }
        Ok(())
    }

    /// The emulator's TensorMap (the layout kernels/emu/cuda_emulator.h reads): [0] magic, [1]
    /// base, [2] element bytes, [3] dims[0] (inner, elements), [4] dims[1], [5] stride of dim 1 in
    /// bytes, [6] box dims[0], [7] box dims[1], [8] swizzle span in bytes (0, 32, 64, 128), [9]
    /// rank, [10] dims[2], [11] its stride, [12] dims[3], [13] its stride, [14] box dims[2], [15]
    /// box dims[3].
    pub fn emulated(&self) -> Result<TensorMapArg, TensorMapError> {
        self.validate()?;
        let mut w = [0u64; 16];
        w[0] = EMULATED_TENSOR_MAP_MAGIC;
        w[1] = self.base;
        w[2] = self.dtype.bytes();
        w[3] = self.dims[0];
        w[4] = self.dims[1];
        w[5] = self.strides_bytes[0];
        w[6] = self.box_dims[0] as u64;
        w[7] = self.box_dims[1] as u64;
        w[8] = self.swizzle.bytes() as u64;
        w[9] = self.rank as u64;
        w[10] = self.dims[2];
        w[11] = self.strides_bytes[1];
        w[12] = self.dims[3];
        w[13] = self.strides_bytes[2];
        w[14] = self.box_dims[2] as u64;
        w[15] = self.box_dims[3] as u64;
        Ok(TensorMapArg(w))
    }
}

impl TensorMap2d {
    /// Bytes one box moves (what a tma_load_2d completes on its mbarrier).
    pub fn box_bytes(&self) -> u32 {
        TensorMap::from(self).box_bytes()
    }

    /// `TensorMap::validate` of the rank-2 map.
    pub fn validate(&self) -> Result<(), TensorMapError> {
        TensorMap::from(self).validate()
    }

    /// `TensorMap::emulated` of the rank-2 map.
    pub fn emulated(&self) -> Result<TensorMapArg, TensorMapError> {
        TensorMap::from(self).emulated()
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_names;

    #[test]
    fn kernel_names_come_from_the_expanded_global_qualifier() {
        let g = "__attribute__((visibility(\"default\")))";
        let src = format!(
            "extern \"C\" {g} void gn_f32(const float* x, u32 n);\n\
             extern \"C\" {g} int lookahead_emu_run(const char* k);\n\
             extern \"C\" {g}\n  void\n  softmax_bf16 (const bf16* x) {{}}\n\
             extern \"C\" {g} void gn_f32(const float* x, u32 n) {{}}\n\
             extern \"C\" {g} void voidish_name(int);\n\
             extern \"C\" {g} void lookahead_emu_params_gn_f32(void** p) {{}}\n"
        );
        assert_eq!(kernel_names(&src), ["gn_f32", "softmax_bf16", "voidish_name"]);
    }
}
