//! NVRTC on the CPU: "compiling" a kernel family builds it for the emulator (g++, through
//! `kernels::emulate`'s cache, so that errors show as NVRTC compile logs) and hands out a "CUBIN"
//! that carries the family's name and source, which the emulated driver's cuModuleLoadData
//! loads (driver.rs). The headers are the ones `kernels::emulate` builds with (the same
//! kernels/cuda/*.cuh the real NVRTC is given).
//!
//! The version reported is 0.1, so that the kernel cache (keyed by the NVRTC version) never hands
//! these CUBINs to a real driver or a real CUBIN to this one.

use std::ffi::{c_char, c_int, CStr};

use kernels::emulate::EmulatedModule;

/// What an emulated CUBIN starts with; a real one starts with an ELF header.
const MAGIC: &[u8; 16] = b"LOOKAHEAD-EMU-1\0";
/// Longest name or source a CUBIN carries (the largest kernel file is ~100 KB).
const MAX_PART: usize = 16 << 20;

type NvrtcResult = c_int;
const NVRTC_SUCCESS: NvrtcResult = 0;
const NVRTC_ERROR_INVALID_INPUT: NvrtcResult = 3;
const NVRTC_ERROR_INVALID_PROGRAM: NvrtcResult = 4;
const NVRTC_ERROR_COMPILATION: NvrtcResult = 6;

pub struct Program {
    name: String,
    code: String,
    log: String,
    cubin: Option<Vec<u8>>,
}

/// The CUBIN of kernel family `name` with source `code`.
pub fn cubin(name: &str, code: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 16 + name.len() + code.len());
    out.extend_from_slice(MAGIC);
    for part in [name.as_bytes(), code.as_bytes()] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The family name and source of an emulated CUBIN; None when `image` is not one.
///
/// # Safety
/// `image` must point at a CUBIN: at least 16 readable bytes, and if they are our magic, the rest
/// of a CUBIN `cubin` made.
pub unsafe fn parse_cubin(image: *const u8) -> Option<(String, String)> {
    if image.is_null() {
        return None;
    }
    // SAFETY: 16 readable bytes (the caller's guarantee: any CUBIN is longer).
    let head = unsafe { std::slice::from_raw_parts(image, MAGIC.len()) };
    if head != MAGIC {
        return None;
    }
    let mut at = MAGIC.len();
    let mut part = || -> Option<String> {
        // SAFETY: the caller's guarantee: a CUBIN `cubin` made, length-prefixed parts.
        let len = u64::from_le_bytes(unsafe { std::slice::from_raw_parts(image.add(at), 8) }.try_into().ok()?) as usize;
        // A corrupt length (the CUBIN came from a damaged cache file) must not read far away.
        if len > MAX_PART {
            return None;
        }
        let bytes = unsafe { std::slice::from_raw_parts(image.add(at + 8), len) };
        at += 8 + len;
        String::from_utf8(bytes.to_vec()).ok()
    };
    let name = part()?;
    let code = part()?;
    Some((name, code))
}

/// # Safety
/// `prog` must be writable; `src` and `name` C strings (name may be null).
#[no_mangle]
pub unsafe extern "C" fn nvrtcCreateProgram(
    prog: *mut *mut Program,
    src: *const c_char,
    name: *const c_char,
    _num_headers: c_int,
    _headers: *const *const c_char,
    _include_names: *const *const c_char,
) -> NvrtcResult {
    if prog.is_null() || src.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: C strings, the caller's guarantee.
    let code = unsafe { CStr::from_ptr(src) }.to_string_lossy().into_owned();
    let file = if name.is_null() { "kernel.cu".to_string() } else { unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned() };
    // kernels::compile names programs kernels/cuda/NAME.cu (or NAME.cu): the family is NAME.
    let stem = file.rsplit('/').next().unwrap_or(&file).trim_end_matches(".cu").to_string();
    let p = Box::new(Program { name: stem, code, log: String::new(), cubin: None });
    // SAFETY: checked non-null.
    unsafe { *prog = Box::into_raw(p) };
    NVRTC_SUCCESS
}

/// # Safety
/// `prog` must point at a program from nvrtcCreateProgram (or null).
#[no_mangle]
pub unsafe extern "C" fn nvrtcDestroyProgram(prog: *mut *mut Program) -> NvrtcResult {
    if prog.is_null() {
        return NVRTC_ERROR_INVALID_PROGRAM;
    }
    // SAFETY: the caller's guarantee.
    let p = unsafe { *prog };
    if !p.is_null() {
        // SAFETY: created by nvrtcCreateProgram, destroyed once (the pointer is cleared).
        drop(unsafe { Box::from_raw(p) });
        unsafe { *prog = std::ptr::null_mut() };
    }
    NVRTC_SUCCESS
}

/// # Safety
/// A program from nvrtcCreateProgram.
unsafe fn program<'a>(prog: *mut Program) -> Option<&'a mut Program> {
    // SAFETY: the caller's guarantee.
    unsafe { prog.as_mut() }
}

/// # Safety
/// `prog` from nvrtcCreateProgram. The options are ignored: the emulated build has its own.
#[no_mangle]
pub unsafe extern "C" fn nvrtcCompileProgram(prog: *mut Program, _num_options: c_int, _options: *const *const c_char) -> NvrtcResult {
    // SAFETY: the caller's guarantee.
    let Some(p) = (unsafe { program(prog) }) else { return NVRTC_ERROR_INVALID_PROGRAM };
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| EmulatedModule::load_source(&p.name, &p.code).map(drop)));
    match built {
        Ok(Ok(())) => {
            p.log = format!("built kernels/cuda/{}.cu for the CPU emulator\n", p.name);
            p.cubin = Some(cubin(&p.name, &p.code));
            NVRTC_SUCCESS
        }
        Ok(Err(e)) => {
            p.log = e.to_string();
            NVRTC_ERROR_COMPILATION
        }
        Err(_) => {
            p.log = "internal error (panic) in the emulator's NVRTC".into();
            NVRTC_ERROR_COMPILATION
        }
    }
}

/// # Safety
/// `prog` from nvrtcCreateProgram; `size` writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLogSize(prog: *mut Program, size: *mut usize) -> NvrtcResult {
    // SAFETY: the caller's guarantee.
    let Some(p) = (unsafe { program(prog) }) else { return NVRTC_ERROR_INVALID_PROGRAM };
    if size.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: checked non-null.
    unsafe { *size = p.log.len() + 1 };
    NVRTC_SUCCESS
}

/// # Safety
/// `prog` from nvrtcCreateProgram; `log` holds nvrtcGetProgramLogSize bytes.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLog(prog: *mut Program, log: *mut c_char) -> NvrtcResult {
    // SAFETY: the caller's guarantee.
    let Some(p) = (unsafe { program(prog) }) else { return NVRTC_ERROR_INVALID_PROGRAM };
    if log.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: `log` holds log.len() + 1 bytes (the size we reported).
    unsafe {
        std::ptr::copy_nonoverlapping(p.log.as_ptr(), log as *mut u8, p.log.len());
        *log.add(p.log.len()) = 0;
    }
    NVRTC_SUCCESS
}

/// # Safety
/// `prog` from nvrtcCreateProgram; `size` writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBINSize(prog: *mut Program, size: *mut usize) -> NvrtcResult {
    // SAFETY: the caller's guarantee.
    let Some(p) = (unsafe { program(prog) }) else { return NVRTC_ERROR_INVALID_PROGRAM };
    let Some(c) = &p.cubin else { return NVRTC_ERROR_INVALID_PROGRAM };
    if size.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: checked non-null.
    unsafe { *size = c.len() };
    NVRTC_SUCCESS
}

/// # Safety
/// `prog` from nvrtcCreateProgram; `out` holds nvrtcGetCUBINSize bytes.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBIN(prog: *mut Program, out: *mut c_char) -> NvrtcResult {
    // SAFETY: the caller's guarantee.
    let Some(p) = (unsafe { program(prog) }) else { return NVRTC_ERROR_INVALID_PROGRAM };
    let Some(c) = &p.cubin else { return NVRTC_ERROR_INVALID_PROGRAM };
    if out.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: `out` holds c.len() bytes (the size we reported).
    unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), out as *mut u8, c.len()) };
    NVRTC_SUCCESS
}

#[no_mangle]
pub extern "C" fn nvrtcGetErrorString(r: NvrtcResult) -> *const c_char {
    let s: &'static CStr = match r {
        NVRTC_SUCCESS => c"NVRTC_SUCCESS",
        NVRTC_ERROR_INVALID_INPUT => c"NVRTC_ERROR_INVALID_INPUT",
        NVRTC_ERROR_INVALID_PROGRAM => c"NVRTC_ERROR_INVALID_PROGRAM",
        NVRTC_ERROR_COMPILATION => c"NVRTC_ERROR_COMPILATION (the emulated build failed)",
        _ => c"NVRTC error",
    };
    s.as_ptr()
}

/// # Safety
/// Both pointers writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> NvrtcResult {
    if major.is_null() || minor.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: checked non-null.
    unsafe {
        *major = 0;
        *minor = 1;
    }
    NVRTC_SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubins_round_trip_and_real_ones_are_refused() {
        let c = cubin("softmax", "extern \"C\" __global__ void k() {}");
        assert_eq!(unsafe { parse_cubin(c.as_ptr()) }, Some(("softmax".to_string(), "extern \"C\" __global__ void k() {}".to_string())));
        let mut elf = vec![0x7f, b'E', b'L', b'F'];
        elf.resize(64, 0);
        assert_eq!(unsafe { parse_cubin(elf.as_ptr()) }, None);
    }
}
