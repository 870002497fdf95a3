//! The CUDA driver API (libcuda) on the CPU: one emulated device, host memory as device memory,
//! synchronous streams, and kernels run by the emulator from the "CUBIN" our NVRTC hands out
//! (nvrtc.rs: the kernel family's name and source).
//!
//! The device: `lookahead CUDA emulator (sm_XY)`, compute capability from `LOOKAHEAD_EMU_SM`
//! (`90`, the default, takes the engine's Hopper paths; `80` its sm_80 ones), 4 multiprocessors,
//! 8 GiB of memory (allocations past it fail as the driver's do, with CUDA_ERROR_OUT_OF_MEMORY).
//! What the real driver refuses is refused here too where the engine could get it wrong: copies
//! and memsets outside a live allocation, dynamic shared memory over the kernel's opted-in limit,
//! a kernel not in the module, bad launch shapes (the emulator's checks). Every refusal and every
//! failed launch also prints why on stderr, since a CUresult cannot carry it.
//!
//! Occupancy is nominal: at most 4 blocks a multiprocessor, so that a cooperative launch sized
//! by it (4 x 4 blocks) fits the emulator, which runs a cooperative grid as one cluster of at
//! most 16 CTAs.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use cudarc::driver::sys::{self, CUresult};
use kernels::emulate::{EmulatedModule, Schedule, TensorMap, TmaDtype, TmaSwizzle};

use crate::nvrtc::parse_cubin;

// ---- the device ---------------------------------------------------------------------------------

const MULTIPROCESSORS: i32 = 4;
const BLOCKS_PER_MULTIPROCESSOR: i32 = 4;
const TOTAL_MEMORY: usize = 8 << 30;
/// With kernels skipped nothing reads or writes most of the memory, so the device reports an
/// H100's 80 GiB (the bench's composed paths need more than 8) and leaves new pages untouched.
const SKIPPING_TOTAL_MEMORY: usize = 80 << 30;

fn total_memory() -> usize {
    if skipping_from_start() { SKIPPING_TOTAL_MEMORY } else { TOTAL_MEMORY }
}
/// Dynamic shared memory a kernel may use without opting in (cuFuncSetAttribute).
const DEFAULT_DYNAMIC_SHARED: i32 = 48 * 1024;

/// (major, minor) compute capability of the emulated device.
pub fn compute_capability() -> (i32, i32) {
    static CC: OnceLock<(i32, i32)> = OnceLock::new();
    *CC.get_or_init(|| match std::env::var("LOOKAHEAD_EMU_SM").ok().and_then(|v| v.trim().parse::<i32>().ok()) {
        Some(sm) if (70..=120).contains(&sm) => (sm / 10, sm % 10),
        _ => (9, 0),
    })
}

/// `LOOKAHEAD_EMU_KERNELS=skip`: launches are checked as always and then not run, outputs left as
/// they were. What remains is the host's own work a call (shape checks, allocation, launch
/// planning, parameter marshalling): the bench's `host ms` column then measures the engine's
/// launch overhead on a machine without a GPU.
pub(crate) fn skip_kernels() -> bool {
    skip_switch().load(std::sync::atomic::Ordering::Relaxed)
}

/// The process's setting (the memory rules follow it); `skip_switch` starts from it and the
/// driver's own test flips it for one launch.
fn skipping_from_start() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var("LOOKAHEAD_EMU_KERNELS").is_ok_and(|v| v == "skip"))
}

fn skip_switch() -> &'static std::sync::atomic::AtomicBool {
    static SKIP: OnceLock<std::sync::atomic::AtomicBool> = OnceLock::new();
    SKIP.get_or_init(|| std::sync::atomic::AtomicBool::new(skipping_from_start()))
}

fn device_name() -> String {
    crate::DEVICE_NAME.to_string()
}

/// Shared memory one block may opt in to, and a multiprocessor's (what the real parts have).
fn shared_limits() -> (i32, i32) {
    match compute_capability() {
        (9, _) => (227 * 1024, 228 * 1024),
        (8, 0) => (163 * 1024, 164 * 1024),
        _ => (99 * 1024, 100 * 1024),
    }
}

fn attribute(attr: u32) -> Option<i32> {
    use sys::CUdevice_attribute as A;
    let (major, minor) = compute_capability();
    let (optin, per_sm) = shared_limits();
    let table: &[(A, i32)] = &[
        (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z, 64),
        (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X, i32::MAX),
        (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y, 65535),
        (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z, 65535),
        (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK, DEFAULT_DYNAMIC_SHARED),
        (A::CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY, 65536),
        (A::CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
        (A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK, 65536),
        (A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR, 65536),
        (A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE, 1_000_000),
        (A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, 1_000_000),
        (A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, MULTIPROCESSORS),
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, major),
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, minor),
        (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, 2048),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR, BLOCKS_PER_MULTIPROCESSOR),
        (A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, 50 << 20),
        (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, optin),
        (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, per_sm),
        (A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, 1),
        (A::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH, i32::from(major >= 9)),
        (A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, 1),
        (A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY, 1),
        (A::CU_DEVICE_ATTRIBUTE_INTEGRATED, 0),
        (A::CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS, 1),
        (A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT, 1),
        (A::CU_DEVICE_ATTRIBUTE_ECC_ENABLED, 0),
        (A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, 0),
        (A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, 0),
        (A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, 0),
        // No stream-ordered allocator: cudarc then allocates with cuMemAlloc, which is tracked.
        (A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 0),
    ];
    table.iter().find(|(a, _)| *a as u32 == attr).map(|(_, v)| *v)
}

// ---- errors -------------------------------------------------------------------------------------

/// Prints why a call failed (a CUresult cannot say) and returns its code.
fn refuse(code: CUresult, why: impl std::fmt::Display) -> CUresult {
    eprintln!("[lookahead CUDA emulator] {why}");
    code
}

/// Runs an entry point, turning a panic (a bug here) into an error instead of an abort.
fn guard(name: &str, f: impl FnOnce() -> CUresult) -> CUresult {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => refuse(CUresult::CUDA_ERROR_UNKNOWN, format!("{name}: internal error (panic)")),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- memory -------------------------------------------------------------------------------------

struct Allocation {
    bytes: usize,
    layout: std::alloc::Layout,
    host: bool,
}

fn allocations() -> &'static Mutex<BTreeMap<u64, Allocation>> {
    static A: OnceLock<Mutex<BTreeMap<u64, Allocation>>> = OnceLock::new();
    A.get_or_init(Default::default)
}

fn allocate(bytes: usize, host: bool) -> Result<u64, CUresult> {
    if bytes == 0 {
        return Err(refuse(CUresult::CUDA_ERROR_INVALID_VALUE, "allocation of 0 bytes"));
    }
    let mut all = lock(allocations());
    let used: usize = all.values().filter(|a| !a.host).map(|a| a.bytes).sum();
    if !host && used.saturating_add(bytes) > total_memory() {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    let layout = std::alloc::Layout::from_size_align(bytes, 256).map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
    // SAFETY: a non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    // New device memory holds 0xff bytes (NaN in f32, bf16 and f16), as the emulator fills shared
    // memory: a read of what nothing wrote shows, where zeros could pass for a result.
    if !skipping_from_start() {
        // SAFETY: `bytes` bytes were just allocated.
        unsafe { std::ptr::write_bytes(p, 0xff, bytes) };
    }
    all.insert(p as u64, Allocation { bytes, layout, host });
    Ok(p as u64)
}

fn release(p: u64, host: bool) -> CUresult {
    let mut all = lock(allocations());
    match all.get(&p) {
        Some(a) if a.host == host => {
            let layout = a.layout;
            all.remove(&p);
            // SAFETY: allocated by `allocate` with this layout, removed from the map once.
            unsafe { std::alloc::dealloc(p as *mut u8, layout) };
            CUresult::CUDA_SUCCESS
        }
        _ => refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("free of {p:#x}: not the start of a live {} allocation", if host { "host" } else { "device" })),
    }
}

/// Checks that `[p, p + bytes)` lies inside one live device (or pinned host) allocation.
fn check_range(what: &str, p: u64, bytes: usize) -> Result<(), CUresult> {
    if bytes == 0 {
        return Ok(());
    }
    let all = lock(allocations());
    let inside = all.range(..=p).next_back().is_some_and(|(start, a)| ((p - start) as usize).checked_add(bytes).is_some_and(|end| end <= a.bytes));
    if inside {
        Ok(())
    } else {
        Err(refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("{what}: {bytes} bytes at {p:#x} are not inside one live allocation")))
    }
}

fn copy(what: &str, dst: u64, dst_device: bool, src: u64, src_device: bool, bytes: usize) -> CUresult {
    if dst_device {
        if let Err(e) = check_range(what, dst, bytes) {
            return e;
        }
    }
    if src_device {
        if let Err(e) = check_range(what, src, bytes) {
            return e;
        }
    }
    if bytes > 0 {
        if dst == 0 || src == 0 {
            return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("{what}: null pointer"));
        }
        // SAFETY: device ranges checked above; host pointers are the caller's, as with the
        // driver. `copy` allows overlap (cuMemcpyDtoD of overlapping ranges is undefined anyway).
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    }
    CUresult::CUDA_SUCCESS
}

fn memset(dst: u64, value: u8, bytes: usize) -> CUresult {
    if let Err(e) = check_range("cuMemsetD8", dst, bytes) {
        return e;
    }
    if bytes > 0 {
        // SAFETY: the range lies in a live allocation (checked).
        unsafe { std::ptr::write_bytes(dst as *mut u8, value, bytes) };
    }
    CUresult::CUDA_SUCCESS
}

// ---- handles ------------------------------------------------------------------------------------

/// The one context: a fixed non-null address (its contents are never read).
fn primary_context() -> sys::CUcontext {
    static CTX: u64 = 0;
    std::ptr::addr_of!(CTX) as sys::CUcontext
}

thread_local! {
    static CURRENT: std::cell::Cell<sys::CUcontext> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

struct Event {
    at: Mutex<Option<Instant>>,
}

struct Module {
    module: EmulatedModule,
}

struct Function {
    module: *const Module,
    name: String,
    max_dynamic_shared: Mutex<i32>,
    /// CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED: clusters of 9 to 16 CTAs.
    non_portable_clusters: std::sync::atomic::AtomicBool,
}

/// Turns a handle back into its object, refusing null.
///
/// # Safety
/// A non-null `h` must be a handle this library created and has not destroyed.
unsafe fn object<'a, T>(h: *mut c_void, what: &str) -> Result<&'a T, CUresult> {
    if h.is_null() {
        return Err(refuse(CUresult::CUDA_ERROR_INVALID_HANDLE, format!("null {what}")));
    }
    // SAFETY: the caller's guarantee.
    Ok(unsafe { &*(h as *const T) })
}

fn out<T>(p: *mut T, v: T) -> CUresult {
    if p.is_null() {
        return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, "null output pointer");
    }
    // SAFETY: non-null; the caller passes a pointer to writable storage, as for the driver.
    unsafe { p.write(v) };
    CUresult::CUDA_SUCCESS
}

// ---- initialisation, device, context ---------------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    out(version, 13000)
}

#[no_mangle]
pub extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    out(count, 1)
}

#[no_mangle]
pub extern "C" fn cuDeviceGet(device: *mut sys::CUdevice, ordinal: c_int) -> CUresult {
    if ordinal != 0 {
        return CUresult::CUDA_ERROR_INVALID_DEVICE;
    }
    out(device, 0)
}

/// # Safety
/// `name` holds `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: sys::CUdevice) -> CUresult {
    if dev != 0 {
        return CUresult::CUDA_ERROR_INVALID_DEVICE;
    }
    if name.is_null() || len <= 0 {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let text = device_name();
    let n = text.len().min(len as usize - 1);
    // SAFETY: `name` holds `len` bytes (the caller's contract); n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), name as *mut u8, n);
        *name.add(n) = 0;
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDeviceGetAttribute(value: *mut c_int, attrib: u32, dev: sys::CUdevice) -> CUresult {
    if dev != 0 {
        return CUresult::CUDA_ERROR_INVALID_DEVICE;
    }
    match attribute(attrib) {
        Some(v) => out(value, v),
        None => refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuDeviceGetAttribute: attribute {attrib} is not emulated (kernels/emu/driver/src/driver.rs)")),
    }
}

#[no_mangle]
pub extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: sys::CUdevice) -> CUresult {
    if dev != 0 {
        return CUresult::CUDA_ERROR_INVALID_DEVICE;
    }
    out(bytes, total_memory())
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut sys::CUcontext, dev: sys::CUdevice) -> CUresult {
    if dev != 0 {
        return CUresult::CUDA_ERROR_INVALID_DEVICE;
    }
    out(ctx, primary_context())
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: sys::CUdevice) -> CUresult {
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: sys::CUcontext) -> CUresult {
    if !ctx.is_null() && ctx != primary_context() {
        return CUresult::CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT.with(|c| c.set(ctx));
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxGetCurrent(ctx: *mut sys::CUcontext) -> CUresult {
    out(ctx, CURRENT.with(|c| c.get()))
}

#[no_mangle]
pub extern "C" fn cuCtxGetDevice(dev: *mut sys::CUdevice) -> CUresult {
    out(dev, 0)
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    CUresult::CUDA_SUCCESS
}

// ---- streams and events (everything has completed when its call returns) ----------------------------

fn new_handle<T>(v: T) -> *mut c_void {
    Box::into_raw(Box::new(v)) as *mut c_void
}

/// Frees a handle `new_handle` made (null: nothing).
///
/// # Safety
/// A non-null `h` must come from `new_handle::<T>` and not be freed yet.
unsafe fn free_handle<T>(h: *mut c_void) -> CUresult {
    if !h.is_null() {
        // SAFETY: the caller's guarantee.
        drop(unsafe { Box::from_raw(h as *mut T) });
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamCreate(stream: *mut sys::CUstream, _flags: c_uint) -> CUresult {
    out(stream, new_handle(0u64) as sys::CUstream)
}

#[no_mangle]
pub extern "C" fn cuStreamCreateWithPriority(stream: *mut sys::CUstream, _flags: c_uint, _priority: c_int) -> CUresult {
    out(stream, new_handle(0u64) as sys::CUstream)
}

/// # Safety
/// `stream` must come from cuStreamCreate and not be destroyed yet.
#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: sys::CUstream) -> CUresult {
    // SAFETY: the caller's guarantee.
    unsafe { free_handle::<u64>(stream as *mut c_void) }
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(_stream: sys::CUstream) -> CUresult {
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(_stream: sys::CUstream) -> CUresult {
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(_stream: sys::CUstream, _event: sys::CUevent, _flags: c_uint) -> CUresult {
    CUresult::CUDA_SUCCESS
}

/// # Safety
/// The function pointer must be callable with `data`, as for the driver.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(_stream: sys::CUstream, f: sys::CUhostFn, data: *mut c_void) -> CUresult {
    match f {
        // SAFETY: the caller's guarantee.
        Some(f) => unsafe { f(data) },
        None => return CUresult::CUDA_ERROR_INVALID_VALUE,
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuEventCreate(event: *mut sys::CUevent, _flags: c_uint) -> CUresult {
    out(event, new_handle(Event { at: Mutex::new(None) }) as sys::CUevent)
}

/// # Safety
/// `event` must come from cuEventCreate and not be destroyed yet.
#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(event: sys::CUevent, _stream: sys::CUstream) -> CUresult {
    // SAFETY: the caller's guarantee.
    match unsafe { object::<Event>(event as *mut c_void, "event") } {
        Ok(e) => {
            *lock(&e.at) = Some(Instant::now());
            CUresult::CUDA_SUCCESS
        }
        Err(e) => e,
    }
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(_event: sys::CUevent) -> CUresult {
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuEventQuery(_event: sys::CUevent) -> CUresult {
    CUresult::CUDA_SUCCESS
}

/// # Safety
/// Both events must come from cuEventCreate and not be destroyed yet.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: sys::CUevent, end: sys::CUevent) -> CUresult {
    // SAFETY: the caller's guarantee.
    let (s, e) = match unsafe { (object::<Event>(start as *mut c_void, "event"), object::<Event>(end as *mut c_void, "event")) } {
        (Ok(s), Ok(e)) => (*lock(&s.at), *lock(&e.at)),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    match (s, e) {
        (Some(s), Some(e)) => out(ms, e.saturating_duration_since(s).as_secs_f32() * 1e3),
        _ => CUresult::CUDA_ERROR_INVALID_HANDLE,
    }
}

/// # Safety
/// As for cuEventElapsedTime.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: sys::CUevent, end: sys::CUevent) -> CUresult {
    // SAFETY: the caller's guarantee.
    unsafe { cuEventElapsedTime(ms, start, end) }
}

/// # Safety
/// `event` must come from cuEventCreate and not be destroyed yet.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(event: sys::CUevent) -> CUresult {
    // SAFETY: the caller's guarantee.
    unsafe { free_handle::<Event>(event as *mut c_void) }
}

// ---- memory -------------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuMemAlloc_v2(dptr: *mut sys::CUdeviceptr, bytes: usize) -> CUresult {
    guard("cuMemAlloc", || match allocate(bytes, false) {
        Ok(p) => out(dptr, p),
        Err(e) => e,
    })
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: sys::CUdeviceptr) -> CUresult {
    guard("cuMemFree", || release(dptr, false))
}

#[no_mangle]
pub extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let used: usize = lock(allocations()).values().filter(|a| !a.host).map(|a| a.bytes).sum();
    let r = out(free, total_memory().saturating_sub(used));
    if r != CUresult::CUDA_SUCCESS {
        return r;
    }
    out(total, total_memory())
}

#[no_mangle]
pub extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, bytes: usize, _flags: c_uint) -> CUresult {
    guard("cuMemHostAlloc", || match allocate(bytes, true) {
        Ok(p) => out(pp, p as *mut c_void),
        Err(e) => e,
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard("cuMemFreeHost", || release(p as u64, true))
}

#[no_mangle]
pub extern "C" fn cuMemcpyHtoD_v2(dst: sys::CUdeviceptr, src: *const c_void, bytes: usize) -> CUresult {
    guard("cuMemcpyHtoD", || copy("cuMemcpyHtoD", dst, true, src as u64, false, bytes))
}

#[no_mangle]
pub extern "C" fn cuMemcpyHtoDAsync_v2(dst: sys::CUdeviceptr, src: *const c_void, bytes: usize, _stream: sys::CUstream) -> CUresult {
    guard("cuMemcpyHtoDAsync", || copy("cuMemcpyHtoDAsync", dst, true, src as u64, false, bytes))
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: sys::CUdeviceptr, bytes: usize) -> CUresult {
    guard("cuMemcpyDtoH", || copy("cuMemcpyDtoH", dst as u64, false, src, true, bytes))
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: sys::CUdeviceptr, bytes: usize, _stream: sys::CUstream) -> CUresult {
    guard("cuMemcpyDtoHAsync", || copy("cuMemcpyDtoHAsync", dst as u64, false, src, true, bytes))
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: sys::CUdeviceptr, src: sys::CUdeviceptr, bytes: usize) -> CUresult {
    guard("cuMemcpyDtoD", || copy("cuMemcpyDtoD", dst, true, src, true, bytes))
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(dst: sys::CUdeviceptr, src: sys::CUdeviceptr, bytes: usize, _stream: sys::CUstream) -> CUresult {
    guard("cuMemcpyDtoDAsync", || copy("cuMemcpyDtoDAsync", dst, true, src, true, bytes))
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: sys::CUdeviceptr, value: u8, n: usize) -> CUresult {
    guard("cuMemsetD8", || memset(dst, value, n))
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: sys::CUdeviceptr, value: u8, n: usize, _stream: sys::CUstream) -> CUresult {
    guard("cuMemsetD8Async", || memset(dst, value, n))
}

// ---- modules and functions ------------------------------------------------------------------------

/// # Safety
/// `image` must point at a CUBIN from our NVRTC (nvrtc.rs), as for the driver.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut sys::CUmodule, image: *const c_void) -> CUresult {
    guard("cuModuleLoadData", || {
        // SAFETY: the caller's guarantee.
        let Some((name, code)) = (unsafe { parse_cubin(image as *const u8) }) else {
            return refuse(CUresult::CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: not a CUBIN of the emulator's NVRTC (a real CUBIN, or the kernel cache shared with a real NVRTC?)");
        };
        match EmulatedModule::load_source(&name, &code) {
            Ok(m) => out(module, new_handle(Module { module: m }) as sys::CUmodule),
            Err(e) => refuse(CUresult::CUDA_ERROR_INVALID_IMAGE, format!("cuModuleLoadData: {e}")),
        }
    })
}

/// # Safety
/// `module` must come from cuModuleLoadData, with no function of it used afterwards.
#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: sys::CUmodule) -> CUresult {
    // SAFETY: the caller's guarantee.
    unsafe { free_handle::<Module>(module as *mut c_void) }
}

/// # Safety
/// `module` must come from cuModuleLoadData; `name` a C string.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(f: *mut sys::CUfunction, module: sys::CUmodule, name: *const c_char) -> CUresult {
    guard("cuModuleGetFunction", || {
        // SAFETY: the caller's guarantee.
        let m = match unsafe { object::<Module>(module as *mut c_void, "module") } {
            Ok(m) => m,
            Err(e) => return e,
        };
        if name.is_null() {
            return CUresult::CUDA_ERROR_INVALID_VALUE;
        }
        // SAFETY: a C string (the caller's guarantee).
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        if !m.module.has_kernel(&name) {
            return refuse(CUresult::CUDA_ERROR_NOT_FOUND, format!("cuModuleGetFunction: no kernel `{name}` in {}", m.module.file()));
        }
        let function = Function { module: m as *const Module, name, max_dynamic_shared: Mutex::new(DEFAULT_DYNAMIC_SHARED), non_portable_clusters: Default::default() };
        out(f, new_handle(function) as sys::CUfunction)
    })
}

/// # Safety
/// `f` must come from cuModuleGetFunction.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(value: *mut c_int, attrib: u32, f: sys::CUfunction) -> CUresult {
    use sys::CUfunction_attribute as A;
    // SAFETY: the caller's guarantee.
    let f = match unsafe { object::<Function>(f as *mut c_void, "function") } {
        Ok(f) => f,
        Err(e) => return e,
    };
    let v = match attrib {
        a if a == A::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK as u32 => 1024,
        a if a == A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES as u32 => 0,
        a if a == A::CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES as u32 => 0,
        a if a == A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as u32 => 0,
        a if a == A::CU_FUNC_ATTRIBUTE_NUM_REGS as u32 => 32,
        a if a == A::CU_FUNC_ATTRIBUTE_PTX_VERSION as u32 || a == A::CU_FUNC_ATTRIBUTE_BINARY_VERSION as u32 => {
            let (major, minor) = compute_capability();
            major * 10 + minor
        }
        a if a == A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as u32 => *lock(&f.max_dynamic_shared),
        other => return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuFuncGetAttribute: attribute {other} is not emulated")),
    };
    out(value, v)
}

/// # Safety
/// `f` must come from cuModuleGetFunction.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: sys::CUfunction, attrib: u32, value: c_int) -> CUresult {
    use sys::CUfunction_attribute as A;
    // SAFETY: the caller's guarantee.
    let f = match unsafe { object::<Function>(f as *mut c_void, "function") } {
        Ok(f) => f,
        Err(e) => return e,
    };
    if attrib == A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as u32 {
        let (optin, _) = shared_limits();
        if !(0..=optin).contains(&value) {
            return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuFuncSetAttribute({}): {value} bytes of dynamic shared memory is over the {optin} a block can opt in to", f.name));
        }
        *lock(&f.max_dynamic_shared) = value;
        return CUresult::CUDA_SUCCESS;
    }
    if attrib == A::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED as u32 {
        f.non_portable_clusters.store(value != 0, std::sync::atomic::Ordering::Relaxed);
        return CUresult::CUDA_SUCCESS;
    }
    if attrib == A::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as u32 {
        return CUresult::CUDA_SUCCESS;
    }
    refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuFuncSetAttribute({}): attribute {attrib} is not emulated", f.name))
}

#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(_f: sys::CUfunction, _config: u32) -> CUresult {
    CUresult::CUDA_SUCCESS
}

// ---- launches -----------------------------------------------------------------------------------

/// How a launch groups its blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Grouping {
    None,
    Cluster(u32, u32, u32),
    /// All blocks resident at once (grid_sync): the emulator runs the grid as one cluster.
    Cooperative,
}

/// # Safety
/// `f` from cuModuleGetFunction; `params` one valid pointer per kernel parameter.
unsafe fn launch(f: sys::CUfunction, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, grouping: Grouping, params: *mut *mut c_void) -> CUresult {
    // SAFETY: the caller's guarantee.
    let func = match unsafe { object::<Function>(f as *mut c_void, "function") } {
        Ok(f) => f,
        Err(e) => return e,
    };
    let limit = *lock(&func.max_dynamic_shared);
    if shared as i64 > limit as i64 {
        return refuse(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            format!("launching {}: {shared} bytes of dynamic shared memory, over its limit of {limit} (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES raises it)", func.name),
        );
    }
    let cluster = match grouping {
        Grouping::None => (1, 1, 1),
        Grouping::Cluster(x, y, z) => {
            if compute_capability().0 < 9 {
                return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("launching {}: thread-block clusters need sm_90", func.name));
            }
            let size = x as u64 * y as u64 * z as u64;
            if size > 8 && !func.non_portable_clusters.load(std::sync::atomic::Ordering::Relaxed) {
                return refuse(CUresult::CUDA_ERROR_INVALID_CLUSTER_SIZE, format!("launching {}: a cluster of {size} CTAs needs NON_PORTABLE_CLUSTER_SIZE_ALLOWED (at most 8 without)", func.name));
            }
            (x, y, z)
        }
        Grouping::Cooperative => {
            let blocks = grid.0 as u64 * grid.1 as u64 * grid.2 as u64;
            let threads = block.0 as i64 * block.1 as i64 * block.2 as i64;
            let resident = (MULTIPROCESSORS * blocks_per_multiprocessor(threads, shared as i64)) as u64;
            if blocks > resident {
                return refuse(CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, format!("launching {} cooperatively: {blocks} blocks, more than the {resident} that are resident at once", func.name));
            }
            grid
        }
    };
    if skip_kernels() {
        return CUresult::CUDA_SUCCESS;
    }
    // SAFETY: `func.module` outlives its functions (the engine keeps modules loaded).
    let module = unsafe { &(*func.module).module };
    let schedule = match Schedule::from_env() {
        Ok(s) => s,
        Err(e) => return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, e),
    };
    // SAFETY: the caller's guarantee on `params`.
    match unsafe { module.launch_params(&func.name, grid, block, cluster, shared, schedule, params) } {
        Ok(()) => CUresult::CUDA_SUCCESS,
        Err(e) => refuse(CUresult::CUDA_ERROR_LAUNCH_FAILED, e),
    }
}

/// # Safety
/// As for the driver: `f` from cuModuleGetFunction, `params` one pointer per kernel parameter.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: sys::CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    _stream: sys::CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if !extra.is_null() {
        return refuse(CUresult::CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel: `extra` arguments are not emulated");
    }
    // SAFETY: the caller's guarantee.
    guard("cuLaunchKernel", || unsafe { launch(f, (gx, gy, gz), (bx, by, bz), shared, Grouping::None, params) })
}

/// # Safety
/// As for cuLaunchKernel.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: sys::CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    _stream: sys::CUstream,
    params: *mut *mut c_void,
) -> CUresult {
    // SAFETY: the caller's guarantee.
    guard("cuLaunchCooperativeKernel", || unsafe { launch(f, (gx, gy, gz), (bx, by, bz), shared, Grouping::Cooperative, params) })
}

/// The grouping a launch configuration's attributes ask for.
///
/// # Safety
/// `cfg.attrs` must hold `cfg.numAttrs` attributes.
unsafe fn grouping(cfg: &sys::CUlaunchConfig) -> Result<Grouping, CUresult> {
    let mut g = Grouping::None;
    for i in 0..cfg.numAttrs as usize {
        // The id is read as an integer: an id this build's enum lacks must not be a Rust enum.
        // SAFETY: the caller's guarantee; CUlaunchAttribute is { u32 id; pad[4]; value union }.
        let attr = unsafe { cfg.attrs.add(i) } as *const u8;
        let id = unsafe { (attr as *const u32).read() };
        let value = unsafe { attr.add(8) };
        if id == sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION as u32 {
            // SAFETY: the cluster dimension is three u32 at the start of the value.
            let d = unsafe { (value as *const [u32; 3]).read_unaligned() };
            if d != [1, 1, 1] {
                g = Grouping::Cluster(d[0], d[1], d[2]);
            }
        } else if id == sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE as u32 {
            // SAFETY: `cooperative` is an int at the start of the value.
            if unsafe { (value as *const i32).read_unaligned() } != 0 {
                g = Grouping::Cooperative;
            }
        } else {
            return Err(refuse(CUresult::CUDA_ERROR_NOT_SUPPORTED, format!("cuLaunchKernelEx: launch attribute {id} is not emulated")));
        }
    }
    Ok(g)
}

/// # Safety
/// As for the driver.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(cfg: *const sys::CUlaunchConfig, f: sys::CUfunction, params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult {
    if cfg.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    if !extra.is_null() {
        return refuse(CUresult::CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernelEx: `extra` arguments are not emulated");
    }
    guard("cuLaunchKernelEx", || {
        // SAFETY: non-null; the caller's guarantee.
        let cfg = unsafe { &*cfg };
        // SAFETY: the caller's guarantee.
        let g = match unsafe { grouping(cfg) } {
            Ok(g) => g,
            Err(e) => return e,
        };
        // SAFETY: the caller's guarantee.
        unsafe { launch(f, (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ), (cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ), cfg.sharedMemBytes, g, params) }
    })
}

/// Blocks of `threads` threads and `shared` bytes of shared memory a multiprocessor holds
/// (nominal: by threads and shared memory, capped at BLOCKS_PER_MULTIPROCESSOR).
fn blocks_per_multiprocessor(threads: i64, shared: i64) -> i32 {
    let (_, per_sm) = shared_limits();
    let by_threads = if threads > 0 { 2048 / threads } else { 0 };
    let by_shared = if shared > 0 { per_sm as i64 / shared } else { i64::MAX };
    by_threads.min(by_shared).clamp(0, BLOCKS_PER_MULTIPROCESSOR as i64) as i32
}

#[no_mangle]
pub extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(blocks: *mut c_int, f: sys::CUfunction, block_size: c_int, shared: usize) -> CUresult {
    if f.is_null() {
        return CUresult::CUDA_ERROR_INVALID_HANDLE;
    }
    out(blocks, blocks_per_multiprocessor(block_size as i64, shared as i64))
}

#[no_mangle]
pub extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks: *mut c_int, f: sys::CUfunction, block_size: c_int, shared: usize, _flags: c_uint) -> CUresult {
    cuOccupancyMaxActiveBlocksPerMultiprocessor(blocks, f, block_size, shared)
}

/// # Safety
/// As for the driver.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveClusters(clusters: *mut c_int, f: sys::CUfunction, cfg: *const sys::CUlaunchConfig) -> CUresult {
    if f.is_null() || cfg.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null; the caller's guarantee.
    let cfg = unsafe { &*cfg };
    // SAFETY: the caller's guarantee.
    let size = match unsafe { grouping(cfg) } {
        Ok(Grouping::Cluster(x, y, z)) => x as i64 * y as i64 * z as i64,
        Ok(_) => 1,
        Err(e) => return e,
    };
    if compute_capability().0 < 9 {
        return out(clusters, 0);
    }
    let threads = cfg.blockDimX as i64 * cfg.blockDimY as i64 * cfg.blockDimZ as i64;
    let blocks = MULTIPROCESSORS * blocks_per_multiprocessor(threads, cfg.sharedMemBytes as i64);
    out(clusters, if size > 16 { 0 } else { blocks / size.max(1) as i32 })
}

// ---- TMA tensor maps ------------------------------------------------------------------------------

/// Encodes the emulator's tensor map (kernels::emulate::TensorMap) where the driver encodes a
/// CUtensorMap: the emulated kernels read that format.
///
/// # Safety
/// As for the driver: the arrays hold `rank` (strides: `rank - 1`) entries.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuTensorMapEncodeTiled(
    map: *mut sys::CUtensorMap,
    dtype: u32,
    rank: u32,
    base: *mut c_void,
    dims: *const u64,
    strides: *const u64,
    boxes: *const u32,
    element_strides: *const u32,
    interleave: u32,
    swizzle: u32,
    _l2_promotion: u32,
    oob_fill: u32,
) -> CUresult {
    use sys::CUtensorMapDataType as D;
    use sys::CUtensorMapSwizzle as S;
    guard("cuTensorMapEncodeTiled", || {
        if map.is_null() || dims.is_null() || boxes.is_null() || element_strides.is_null() || !(2..=4).contains(&rank) || (rank > 1 && strides.is_null()) {
            return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuTensorMapEncodeTiled: rank {rank} (the emulator takes 2 to 4) or a null array"));
        }
        let dtype = match dtype {
            d if d == D::CU_TENSOR_MAP_DATA_TYPE_UINT8 as u32 => TmaDtype::U8,
            d if d == D::CU_TENSOR_MAP_DATA_TYPE_UINT16 as u32 => TmaDtype::U16,
            d if d == D::CU_TENSOR_MAP_DATA_TYPE_UINT32 as u32 => TmaDtype::U32,
            d if d == D::CU_TENSOR_MAP_DATA_TYPE_FLOAT16 as u32 => TmaDtype::F16,
            d if d == D::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 as u32 => TmaDtype::Bf16,
            d if d == D::CU_TENSOR_MAP_DATA_TYPE_FLOAT32 as u32 => TmaDtype::F32,
            other => return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuTensorMapEncodeTiled: data type {other} is not emulated")),
        };
        let swizzle = match swizzle {
            s if s == S::CU_TENSOR_MAP_SWIZZLE_NONE as u32 => TmaSwizzle::None,
            s if s == S::CU_TENSOR_MAP_SWIZZLE_32B as u32 => TmaSwizzle::B32,
            s if s == S::CU_TENSOR_MAP_SWIZZLE_64B as u32 => TmaSwizzle::B64,
            s if s == S::CU_TENSOR_MAP_SWIZZLE_128B as u32 => TmaSwizzle::B128,
            other => return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuTensorMapEncodeTiled: swizzle {other} is not emulated")),
        };
        if interleave != sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE as u32 || oob_fill != sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE as u32 {
            return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: only no interleave and zero out-of-range fill are emulated");
        }
        let r = rank as usize;
        let mut t = TensorMap { base: base as u64, dtype, rank: r, dims: [1; 4], strides_bytes: [0; 3], box_dims: [1; 4], swizzle };
        for i in 0..r {
            // SAFETY: the arrays hold `rank` entries (strides `rank - 1`), the caller's guarantee.
            unsafe {
                if *element_strides.add(i) != 1 {
                    return refuse(CUresult::CUDA_ERROR_INVALID_VALUE, "cuTensorMapEncodeTiled: only element strides of 1 are emulated");
                }
                t.dims[i] = *dims.add(i);
                t.box_dims[i] = *boxes.add(i);
                if i + 1 < r {
                    t.strides_bytes[i] = *strides.add(i);
                }
            }
        }
        match t.emulated() {
            Ok(words) => out(map, sys::CUtensorMap { opaque: words.0 }),
            Err(e) => refuse(CUresult::CUDA_ERROR_INVALID_VALUE, format!("cuTensorMapEncodeTiled: {e}")),
        }
    })
}

// ---- error strings ------------------------------------------------------------------------------

fn error_name(e: u32) -> &'static CStr {
    match e {
        x if x == CUresult::CUDA_SUCCESS as u32 => c"CUDA_SUCCESS",
        x if x == CUresult::CUDA_ERROR_INVALID_VALUE as u32 => c"CUDA_ERROR_INVALID_VALUE",
        x if x == CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32 => c"CUDA_ERROR_OUT_OF_MEMORY",
        x if x == CUresult::CUDA_ERROR_INVALID_DEVICE as u32 => c"CUDA_ERROR_INVALID_DEVICE",
        x if x == CUresult::CUDA_ERROR_INVALID_IMAGE as u32 => c"CUDA_ERROR_INVALID_IMAGE",
        x if x == CUresult::CUDA_ERROR_INVALID_CONTEXT as u32 => c"CUDA_ERROR_INVALID_CONTEXT",
        x if x == CUresult::CUDA_ERROR_INVALID_HANDLE as u32 => c"CUDA_ERROR_INVALID_HANDLE",
        x if x == CUresult::CUDA_ERROR_NOT_FOUND as u32 => c"CUDA_ERROR_NOT_FOUND",
        x if x == CUresult::CUDA_ERROR_LAUNCH_FAILED as u32 => c"CUDA_ERROR_LAUNCH_FAILED",
        x if x == CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE as u32 => c"CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
        x if x == CUresult::CUDA_ERROR_NOT_SUPPORTED as u32 => c"CUDA_ERROR_NOT_SUPPORTED",
        x if x == CUresult::CUDA_ERROR_INVALID_CLUSTER_SIZE as u32 => c"CUDA_ERROR_INVALID_CLUSTER_SIZE",
        _ => c"CUDA_ERROR_UNKNOWN",
    }
}

#[no_mangle]
pub extern "C" fn cuGetErrorName(e: u32, s: *mut *const c_char) -> CUresult {
    out(s, error_name(e).as_ptr())
}

#[no_mangle]
pub extern "C" fn cuGetErrorString(e: u32, s: *mut *const c_char) -> CUresult {
    let text: &'static CStr = match e {
        x if x == CUresult::CUDA_ERROR_LAUNCH_FAILED as u32 => c"the emulated kernel failed (the emulator's message is on stderr)",
        x if x == CUresult::CUDA_ERROR_INVALID_VALUE as u32 => c"invalid argument (the emulator's message is on stderr)",
        _ => error_name(e),
    };
    out(s, text.as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvrtc::cubin;

    const SOURCE: &str = "#include \"common.cuh\"\n\
        extern \"C\" __global__ void fill(float* p, float v, u32 n) {\n\
            const u32 i = blockIdx.x * blockDim.x + threadIdx.x;\n\
            if (i < n) p[i] = v + (float)i;\n\
        }\n";

    fn function() -> sys::CUfunction {
        let image = cubin("driver_test", SOURCE);
        let mut module = std::ptr::null_mut();
        assert_eq!(unsafe { cuModuleLoadData(&mut module, image.as_ptr() as *const c_void) }, CUresult::CUDA_SUCCESS);
        let mut f = std::ptr::null_mut();
        assert_eq!(unsafe { cuModuleGetFunction(&mut f, module, c"fill".as_ptr()) }, CUresult::CUDA_SUCCESS);
        let mut missing = std::ptr::null_mut();
        assert_eq!(unsafe { cuModuleGetFunction(&mut missing, module, c"no_such_kernel".as_ptr()) }, CUresult::CUDA_ERROR_NOT_FOUND);
        f
    }

    fn alloc(bytes: usize) -> u64 {
        let mut p = 0;
        assert_eq!(cuMemAlloc_v2(&mut p, bytes), CUresult::CUDA_SUCCESS);
        p
    }

    /// A launch of `fill` over `n` floats at `p` with the given grouping attribute, if any.
    fn launch_fill(f: sys::CUfunction, p: u64, n: u32, grid: u32, block: u32, shared: u32, attr: Option<(sys::CUlaunchAttributeID, [u32; 3])>) -> CUresult {
        let (mut p, mut v, mut n) = (p, 1.5f32, n);
        let mut params = [&mut p as *mut u64 as *mut c_void, &mut v as *mut f32 as *mut c_void, &mut n as *mut u32 as *mut c_void];
        let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        if let Some((id, value)) = attr {
            a.id = id;
            unsafe { (std::ptr::addr_of_mut!(a.value) as *mut [u32; 3]).write(value) };
        }
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: std::ptr::null_mut(),
            attrs: &mut a,
            numAttrs: u32::from(attr.is_some()),
        };
        unsafe { cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut()) }
    }

    #[test]
    fn memory_is_tracked_poisoned_and_range_checked() {
        let p = alloc(64);
        let mut host = [0u8; 64];
        assert_eq!(cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, p, 64), CUresult::CUDA_SUCCESS);
        assert!(host.iter().all(|&b| b == 0xff), "new memory is 0xff bytes");
        assert_eq!(cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, p + 8, 64), CUresult::CUDA_ERROR_INVALID_VALUE, "past the end");
        assert_eq!(cuMemsetD8_v2(p + 60, 0, 8), CUresult::CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemsetD8_v2(p + 56, 7, 8), CUresult::CUDA_SUCCESS);
        assert_eq!(cuMemFree_v2(p + 8), CUresult::CUDA_ERROR_INVALID_VALUE, "not the start of an allocation");
        assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
        assert_eq!(cuMemsetD8_v2(p, 0, 8), CUresult::CUDA_ERROR_INVALID_VALUE, "freed");
        let mut q = 0;
        assert_eq!(cuMemAlloc_v2(&mut q, total_memory() + 1), CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(cuMemAlloc_v2(&mut q, 0), CUresult::CUDA_ERROR_INVALID_VALUE);
    }

    #[test]
    fn kernels_run_from_their_source_with_the_drivers_launch_rules() {
        if let Err(e) = kernels::emulate::find_compiler() {
            assert!(std::env::var_os("CI").is_none(), "CI needs a C++ compiler for the emulator: {e}");
            eprintln!("kernels_run_from_their_source_with_the_drivers_launch_rules: skipped: no C++ compiler ({e})");
            return;
        }
        let f = function();
        let n = 1000u32;
        let p = alloc(n as usize * 4);
        assert_eq!(launch_fill(f, p, n, 4, 256, 0, None), CUresult::CUDA_SUCCESS);
        let mut out = vec![0f32; n as usize];
        assert_eq!(cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, p, n as usize * 4), CUresult::CUDA_SUCCESS);
        assert!(out.iter().enumerate().all(|(i, &v)| v == 1.5 + i as f32));

        // Dynamic shared memory past 48 KiB needs the opt-in, and at most the device's limit.
        assert_eq!(launch_fill(f, p, n, 4, 256, 64 * 1024, None), CUresult::CUDA_ERROR_INVALID_VALUE);
        let max = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as u32;
        assert_eq!(unsafe { cuFuncSetAttribute(f, max, 64 * 1024) }, CUresult::CUDA_SUCCESS);
        assert_eq!(launch_fill(f, p, n, 4, 256, 64 * 1024, None), CUresult::CUDA_SUCCESS);
        assert_eq!(unsafe { cuFuncSetAttribute(f, max, 1 << 20) }, CUresult::CUDA_ERROR_INVALID_VALUE);

        // Clusters: over 8 CTAs only with the non-portable opt-in (sm_90, the default device).
        let cluster = Some((sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, [16, 1, 1]));
        assert_eq!(launch_fill(f, p, n, 16, 64, 0, cluster), CUresult::CUDA_ERROR_INVALID_CLUSTER_SIZE);
        let non_portable = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED as u32;
        assert_eq!(unsafe { cuFuncSetAttribute(f, non_portable, 1) }, CUresult::CUDA_SUCCESS);
        assert_eq!(launch_fill(f, p, n, 16, 64, 0, cluster), CUresult::CUDA_SUCCESS);

        // A cooperative grid must fit what the occupancy query reports resident.
        let mut per_sm = 0;
        assert_eq!(cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut per_sm, f, 256, 0), CUresult::CUDA_SUCCESS);
        let resident = (per_sm * MULTIPROCESSORS) as u32;
        let cooperative = Some((sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE, [1, 0, 0]));
        assert_eq!(launch_fill(f, p, n, resident, 256, 0, cooperative), CUresult::CUDA_SUCCESS);
        assert_eq!(launch_fill(f, p, n, resident + 1, 256, 0, cooperative), CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE);

        // LOOKAHEAD_EMU_KERNELS=skip: launches are checked as before and not run. (The only test
        // here that launches, so the switch affects no other.)
        assert_eq!(cuMemsetD8_v2(p, 0, n as usize * 4), CUresult::CUDA_SUCCESS);
        skip_switch().store(true, std::sync::atomic::Ordering::Relaxed);
        let skipped = launch_fill(f, p, n, 4, 256, 0, None);
        let refused = launch_fill(f, p, n, resident + 1, 256, 0, cooperative);
        skip_switch().store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(skipped, CUresult::CUDA_SUCCESS);
        assert_eq!(refused, CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, "a skipped launch is still checked");
        assert_eq!(cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, p, n as usize * 4), CUresult::CUDA_SUCCESS);
        assert!(out.iter().all(|&v| v == 0.0), "a skipped launch writes nothing");
        assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
    }

    #[test]
    fn tensor_maps_are_the_emulators() {
        let dims = [200u64, 300];
        let strides = [512u64];
        let boxes = [64u32, 64];
        let ones = [1u32, 1];
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        let bf16 = sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 as u32;
        let b128 = sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B as u32;
        let r = unsafe { cuTensorMapEncodeTiled(&mut map, bf16, 2, 0x1000 as *mut c_void, dims.as_ptr(), strides.as_ptr(), boxes.as_ptr(), ones.as_ptr(), 0, b128, 0, 0) };
        assert_eq!(r, CUresult::CUDA_SUCCESS);
        let want = TensorMap { base: 0x1000, dtype: TmaDtype::Bf16, rank: 2, dims: [200, 300, 1, 1], strides_bytes: [512, 0, 0], box_dims: [64, 64, 1, 1], swizzle: TmaSwizzle::B128 };
        assert_eq!(map.opaque, want.emulated().map(|w| w.0).unwrap_or_default());
        let bad_stride = [520u64];
        let r = unsafe { cuTensorMapEncodeTiled(&mut map, bf16, 2, 0x1000 as *mut c_void, dims.as_ptr(), bad_stride.as_ptr(), boxes.as_ptr(), ones.as_ptr(), 0, b128, 0, 0) };
        assert_eq!(r, CUresult::CUDA_ERROR_INVALID_VALUE, "a stride TMA cannot take");
    }
}
