//! Devices: probing for a driver and GPUs, device info, and the per-device state (context, stream,
//! allocator pool, loaded kernel modules, pinned staging buffers), created on first use and kept
//! for the life of the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use kernels::compile::{KernelCache, KernelResources, KernelSource, Nvrtc};

use super::alloc::Pool;
use super::driver_error;
use super::profile::{aggregate, KernelTime, Profiler};
use crate::{Error, Result};

// ---- probe ------------------------------------------------------------------------------------

/// The number of visible CUDA devices, or why CUDA cannot be used (no driver library, cuInit
/// failing, no GPU). Probed once per process; never panics.
pub fn probe() -> Result<usize> {
    static PROBE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone().map_err(Error::Cuda)
}

fn probe_uncached() -> std::result::Result<usize, String> {
    preload_driver()?;
    // cudarc panics on first use when libcuda is missing, so look for it ourselves first, under
    // the same names cudarc will try.
    let candidates = cudarc::get_lib_name_candidates("cuda");
    // SAFETY: loading the driver library runs only its own initialisers; the handle is dropped.
    let loaded = candidates.iter().any(|name| unsafe { libloading::Library::new(name) }.is_ok());
    if !loaded {
        return Err("no CUDA driver: libcuda.so.1 could not be loaded (is an NVIDIA driver installed and on the loader path?)".into());
    }
    // cudarc also panics when the driver lacks a symbol it needs; turn that into an error too.
    let counted = std::panic::catch_unwind(|| -> std::result::Result<usize, String> {
        result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
        Ok(n.max(0) as usize)
    });
    match counted {
        Ok(Ok(0)) => Err("the CUDA driver is loaded but sees no GPU".into()),
        Ok(r) => r,
        Err(_) => Err("the CUDA driver lacks a function this build needs (a driver older than CUDA 13.0?)".into()),
    }
}

/// `LOOKAHEAD_CUDA_LIB`: a driver library to use instead of the loader's libcuda (e.g. the CPU
/// emulator of kernels/emu/driver). cudarc opens the driver by name (`libcuda.so` first); the
/// dynamic loader answers a name with an already-loaded library of that soname, so opening the
/// file here first, kept for the life of the process, makes cudarc use it. Its soname must be
/// one cudarc tries (the emulator's is `libcuda.so`; a real driver's, `libcuda.so.1`, is tried
/// after `libcuda.so`).
fn preload_driver() -> std::result::Result<(), String> {
    let Some(path) = std::env::var_os("LOOKAHEAD_CUDA_LIB").filter(|p| !p.is_empty()) else { return Ok(()) };
    // SAFETY: loading the named driver library runs only its own initialisers.
    let lib = unsafe { libloading::os::unix::Library::open(Some(&path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL) }
        .map_err(|e| format!("LOOKAHEAD_CUDA_LIB={}: {e}", std::path::Path::new(&path).display()))?;
    std::mem::forget(lib);
    Ok(())
}

/// True when a CUDA driver is loaded and sees at least one GPU.
pub fn is_available() -> bool {
    probe().is_ok()
}

/// The number of visible CUDA devices (an error says why there are none).
pub fn device_count() -> Result<usize> {
    probe()
}

/// The device `cuda:{ordinal}`: its context and stream are created on the first call and shared
/// by every later one.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let count = probe()?;
    if ordinal >= count {
        return Err(Error::Cuda(format!("cuda:{ordinal} does not exist ({count} device(s) visible)")));
    }
    let mut map = lock(DEVICES.get_or_init(Default::default));
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(CudaDevice::new(ordinal)?);
    map.insert(ordinal, d.clone());
    Ok(d)
}

/// Name, compute capability and memory of `cuda:{ordinal}`.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    device(ordinal)?.info()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for H100/H200.
    pub compute_capability: (u32, u32),
    pub total_memory: usize,
    pub free_memory: usize,
    pub multiprocessors: u32,
    pub l2_cache_bytes: u32,
    /// The most shared memory one block can opt in to (cuFuncSetAttribute), in bytes.
    pub max_shared_memory_per_block_optin: u32,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {} SMs, {:.1} GiB, {:.1} GiB free)",
            self.ordinal, self.name, self.compute_capability.0, self.compute_capability.1, self.multiprocessors, gib(self.total_memory), gib(self.free_memory)
        )
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- the device ----------------------------------------------------------------------------

/// One GPU: its primary context, the one stream all of our work goes on, the caching allocator's
/// pool, the kernel modules loaded so far, and pinned buffers for uploads.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (u32, u32),
    total_memory: usize,
    multiprocessors: u32,
    l2_cache_bytes: u32,
    shared_optin: u32,
    pub(super) pool: Mutex<Pool>,
    modules: Mutex<HashMap<&'static str, LoadedModule>>,
    staging: Mutex<Option<Staging>>,
    profiler: Profiler,
}

struct LoadedModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
    resources: Vec<KernelResources>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice(cuda:{} {})", self.ordinal, self.name)
    }
}

impl std::fmt::Display for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({})", self.ordinal, self.name)
    }
}

impl CudaDevice {
    fn new(ordinal: usize) -> Result<CudaDevice> {
        let at = |what: &str| format!("{what} on cuda:{ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(at("creating the context"), e))?;
        let stream = ctx.new_stream().map_err(|e| driver_error(at("creating a stream"), e))?;
        let attr = |a: sys::CUdevice_attribute| ctx.attribute(a).map(|v| v.max(0) as u32).map_err(|e| driver_error(at("reading a device attribute"), e));
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_error(at("reading the compute capability"), e))?;
        Ok(CudaDevice {
            ordinal,
            name: ctx.name().map_err(|e| driver_error(at("reading the device name"), e))?,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            total_memory: ctx.total_mem().map_err(|e| driver_error(at("reading the memory size"), e))?,
            multiprocessors: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            l2_cache_bytes: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            shared_optin: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            pool: Mutex::new(Pool::default()),
            modules: Mutex::new(HashMap::new()),
            staging: Mutex::new(None),
            profiler: Profiler::default(),
            ctx,
            stream,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }
    /// The `sm_XX` number kernels are compiled for, e.g. 90.
    pub fn arch(&self) -> u32 {
        self.compute_capability.0 * 10 + self.compute_capability.1
    }
    pub fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }
    pub fn l2_cache_bytes(&self) -> u32 {
        self.l2_cache_bytes
    }
    pub fn max_shared_memory_per_block_optin(&self) -> u32 {
        self.shared_optin
    }
    pub fn total_memory(&self) -> usize {
        self.total_memory
    }

    /// Name, capability and memory, with the free memory read now.
    pub fn info(&self) -> Result<DeviceInfo> {
        let (free, total) = self.mem_get_info()?;
        Ok(DeviceInfo {
            ordinal: self.ordinal,
            name: self.name.clone(),
            compute_capability: self.compute_capability,
            total_memory: total,
            free_memory: free,
            multiprocessors: self.multiprocessors,
            l2_cache_bytes: self.l2_cache_bytes,
            max_shared_memory_per_block_optin: self.shared_optin,
        })
    }

    /// (free, total) bytes of device memory as the driver sees them now.
    pub fn mem_get_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().map_err(|e| driver_error(format!("reading free memory on cuda:{}", self.ordinal), e))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all of this device's work goes on (see the module docs before using another).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Makes this device's context current on the calling thread (every raw driver call needs it;
    /// cudarc's own calls do it themselves).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(format!("binding the context of cuda:{}", self.ordinal), e))
    }

    /// Waits for all work queued on the stream; also surfaces errors of earlier kernels.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_error(format!("synchronizing cuda:{}", self.ordinal), e))
    }

    // ---- kernels ------------------------------------------------------------------------------

    /// The kernel `name` of family `src`, compiled by NVRTC for this device's arch (through the
    /// on-disk cache) and loaded into its context on first use; later calls are a map lookup.
    pub fn function(&self, src: &KernelSource, name: &str) -> Result<CudaFunction> {
        let mut modules = lock(&self.modules);
        if !modules.contains_key(src.name) {
            let loaded = self.load_family(src)?;
            modules.insert(src.name, loaded);
        }
        let m = modules.get_mut(src.name).expect("inserted above");
        if let Some(f) = m.functions.get(name) {
            return Ok(f.clone());
        }
        let f = m.module.load_function(name).map_err(|e| Error::Cuda(format!("{}: no kernel `{name}` in the compiled module ({e})", src.path())))?;
        m.functions.insert(name.to_string(), f.clone());
        self.profiler.register(&f, name);
        Ok(f)
    }

    /// Registers, stack and spills ptxas reported for the kernels of a loaded family (empty if
    /// the family is not loaded yet).
    pub fn kernel_resources(&self, family: &str) -> Vec<KernelResources> {
        lock(&self.modules).get(family).map(|m| m.resources.clone()).unwrap_or_default()
    }

    fn load_family(&self, src: &KernelSource) -> Result<LoadedModule> {
        let nvrtc = Nvrtc::global().map_err(|e| Error::Cuda(format!("cannot compile {} for {self}: {e}", src.path())))?;
        let compiled = nvrtc.compile(src, self.arch(), &KernelCache::from_env()).map_err(|e| Error::Cuda(e.to_string()))?;
        let resources = compiled.resources();
        self.bind()?;
        let (major, minor) = nvrtc.version();
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin))
            .map_err(|e| Error::Cuda(format!("loading {} (sm_{} CUBIN from NVRTC {major}.{minor}) on {self}: {e}", src.path(), self.arch())))?;
        Ok(LoadedModule { module, functions: HashMap::new(), resources })
    }

    /// A launch on this device's stream: push the kernel's arguments with `.arg(&value)` (device
    /// pointers as `u64`, scalars by value, `#[repr(C)]` structs that implement `DeviceRepr`),
    /// then `unsafe { b.launch(cfg) }`.
    pub fn launch_builder<'a>(&'a self, f: &'a CudaFunction) -> LaunchArgs<'a> {
        self.profile_launch(f);
        self.stream.launch_builder(f)
    }

    // ---- kernel profile (profile.rs) ----------------------------------------------------------

    /// Starts tagging every launch on the stream with a timing event (see `profile_end`).
    pub fn profile_begin(&self) {
        self.profiler.begin();
    }

    /// Ends the window `profile_begin` started and returns the GPU time of each kernel (and
    /// library call, memset, copy) launched in it, in first-launch order; waits for the stream.
    pub fn profile_end(&self) -> Result<Vec<KernelTime>> {
        let marks = self.profiler.end();
        let end = self.record_event(true)?;
        let mut spans = Vec::with_capacity(marks.len());
        for (i, (what, start)) in marks.iter().enumerate() {
            let next = marks.get(i + 1).map_or(&end, |m| &m.1);
            let ms = start.elapsed_ms(next).map_err(|e| driver_error(format!("timing `{what}` on cuda:{}", self.ordinal), e))?;
            spans.push((what.as_str(), ms as f64));
        }
        Ok(aggregate(spans))
    }

    /// Tags the launch of `f` that follows (a no-op unless profiling).
    pub fn profile_launch(&self, f: &CudaFunction) {
        if self.profiler.active() {
            self.profile_mark(&self.profiler.name_of(f));
        }
    }

    /// Tags the stream work that follows, up to the next mark, as `what` (a no-op unless
    /// profiling): library calls and copies, which do not go through `launch_builder`.
    pub fn profile_mark(&self, what: &str) {
        if self.profiler.active() {
            // A failed event only loses this mark: the time then counts toward the previous one.
            if let Ok(event) = self.record_event(true) {
                self.profiler.push(what.to_string(), event);
            }
        }
    }

    // ---- events and timing --------------------------------------------------------------------

    /// An event recorded now on the stream (`timing`: usable with `elapsed_ms`).
    pub fn record_event(&self, timing: bool) -> Result<CudaEvent> {
        let flags = if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        self.stream.record_event(Some(flags)).map_err(|e| driver_error(format!("recording an event on cuda:{}", self.ordinal), e))
    }

    /// Queues a kernel that keeps the stream busy for `ns` nanoseconds (kernels/cuda/timing.cu):
    /// work queued behind it during that time then runs back to back, so that events around it
    /// measure GPU time alone (the host's launch overhead hidden).
    pub fn hold_stream(&self, ns: u64) -> Result<()> {
        let f = self.function(&kernels::timing::SOURCE, "hold_stream")?;
        let mut b = self.launch_builder(&f);
        b.arg(&ns);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: hold_stream(u64) reads no memory.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| driver_error(format!("launching hold_stream on cuda:{}", self.ordinal), e))
    }

    /// Starts timing the work queued on the stream from now on.
    pub fn start_timer(self: &Arc<Self>) -> Result<GpuTimer> {
        Ok(GpuTimer { start: self.record_event(true)?, dev: self.clone() })
    }

    // ---- copies -------------------------------------------------------------------------------

    /// Copies host bytes to device memory at `dst`, in stream order. Large copies go through two
    /// pinned staging buffers (fill one while the DMA drains the other); the source may be freed
    /// as soon as this returns.
    pub fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        self.profile_mark("memcpy host to device");
        let err = |e| driver_error(format!("copying {} bytes to cuda:{}", src.len(), self.ordinal), e);
        if src.len() < STAGING_MIN {
            // Pageable source: the driver stages it before returning.
            return unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(err);
        }
        let mut guard = lock(&self.staging);
        if guard.is_none() {
            *guard = Some(Staging::new(&self.ctx).map_err(err)?);
        }
        let staging = guard.as_mut().expect("created above");
        for (i, chunk) in src.chunks(STAGING_CHUNK).enumerate() {
            let buf = &staging.bufs[i % 2];
            // The copy that last read this buffer must be done before it is refilled.
            buf.event.synchronize().map_err(err)?;
            // SAFETY: the buffer is STAGING_CHUNK bytes of pinned memory no queued copy reads (the
            // event above), and chunk.len() <= STAGING_CHUNK.
            unsafe {
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf.ptr, chunk.len());
                let pinned = std::slice::from_raw_parts(buf.ptr as *const u8, chunk.len());
                result::memcpy_htod_async(dst + (i * STAGING_CHUNK) as u64, pinned, self.stream.cu_stream()).map_err(err)?;
            }
            buf.event.record(&self.stream).map_err(err)?;
        }
        Ok(())
    }

    /// Copies device memory at `src` into `dst`, after all queued work; returns when it is there.
    pub fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        self.profile_mark("memcpy device to host");
        let n = dst.len();
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(|e| driver_error(format!("copying {n} bytes from cuda:{}", self.ordinal), e))?;
        self.synchronize()
    }

    /// Device-to-device copy of `bytes` bytes, in stream order.
    pub fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        self.profile_mark("memcpy device to device");
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(|e| driver_error(format!("copying {bytes} bytes within cuda:{}", self.ordinal), e))
    }

    /// Sets `bytes` bytes at `dst` to `value`, in stream order.
    pub fn memset(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        self.profile_mark("memset");
        unsafe { result::memset_d8_async(dst, value, bytes, self.stream.cu_stream()) }.map_err(|e| driver_error(format!("setting {bytes} bytes on cuda:{}", self.ordinal), e))
    }
}

/// Times the device work queued between `CudaDevice::start_timer` and `stop`.
pub struct GpuTimer {
    dev: Arc<CudaDevice>,
    start: CudaEvent,
}

impl GpuTimer {
    /// Milliseconds of stream time since the start; waits for the queued work to finish.
    pub fn stop(self) -> Result<f32> {
        let end = self.dev.record_event(true)?;
        self.start.elapsed_ms(&end).map_err(|e| driver_error(format!("timing on cuda:{}", self.dev.ordinal), e))
    }
}

// ---- pinned staging ---------------------------------------------------------------------------

/// Uploads at least this large go through the pinned buffers.
const STAGING_MIN: usize = 1 << 20;
/// Size of each of the two pinned buffers.
const STAGING_CHUNK: usize = 8 << 20;

struct StagingBuf {
    ptr: *mut u8,
    /// Recorded after the last copy out of this buffer.
    event: CudaEvent,
}

struct Staging {
    bufs: [StagingBuf; 2],
}

// SAFETY: the raw pointers are pinned host memory owned by this struct for the life of the
// process; all access goes through the device's `staging` mutex.
unsafe impl Send for Staging {}

impl Staging {
    fn new(ctx: &Arc<CudaContext>) -> std::result::Result<Staging, cudarc::driver::DriverError> {
        let buf = || -> std::result::Result<StagingBuf, cudarc::driver::DriverError> {
            // SAFETY: plain pinned allocation; never freed (the device lives as long as the process).
            let ptr = unsafe { result::malloc_host(STAGING_CHUNK, 0) }? as *mut u8;
            Ok(StagingBuf { ptr, event: ctx.new_event(None)? })
        };
        Ok(Staging { bufs: [buf()?, buf()?] })
    }
}
