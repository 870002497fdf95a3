//! cuBLASLt on the CPU: the descriptor calls and `cublasLtMatmul` the engine makes (see
//! engine/src/cuda/gemm.rs), with cuBLASLt's documented semantics:
//! D = epilogue(alpha · op(A) · op(B) + beta · C), column-major (or row-major) matrices with
//! leading dimensions, strided batches, f32 accumulation and one rounding to D's type.
//!
//! Handles and descriptors are boxed Rust structs behind the opaque C pointers. Each starts with a
//! tag so that a descriptor passed in the wrong argument slot (or a handle of another library) is
//! an error status rather than a misread. Anything we do not implement (an attribute, an attribute
//! value, a type combination) is CUBLAS_STATUS_NOT_SUPPORTED or CUBLAS_STATUS_INVALID_VALUE, never
//! a result computed some other way. The one "algorithm" the heuristic returns records the
//! alignments the caller promised in its preference, and `cublasLtMatmul` checks the pointers
//! against them: a broken promise would be a misaligned access on a GPU, so it must fail here too.
//!
//! Enum-typed parameters (compute type, attribute names) keep cudarc's Rust enums so that the
//! signatures are exactly those of the engine's `CublasLtApi` table; the engine only passes
//! values of those enums.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::cublaslt::sys as lt;
use half::{bf16, f16};

use lt::cublasStatus_t as Status;
use Status::{CUBLAS_STATUS_ALLOC_FAILED as ALLOC_FAILED, CUBLAS_STATUS_INTERNAL_ERROR as INTERNAL_ERROR, CUBLAS_STATUS_INVALID_VALUE as INVALID_VALUE, CUBLAS_STATUS_NOT_INITIALIZED as NOT_INITIALIZED, CUBLAS_STATUS_NOT_SUPPORTED as NOT_SUPPORTED, CUBLAS_STATUS_SUCCESS as SUCCESS};

/// What `cublasLtGetVersion` reports: cuBLASLt 13.0.0 (major · 10000 + minor · 100 + patch), the
/// release whose attribute numbering cudarc's `cuda-13000` types describe.
pub const VERSION: usize = 130000;

const HANDLE_TAG: u64 = u64::from_le_bytes(*b"emuLtHnd");
const DESC_TAG: u64 = u64::from_le_bytes(*b"emuLtMmD");
const LAYOUT_TAG: u64 = u64::from_le_bytes(*b"emuLtLay");
const PREF_TAG: u64 = u64::from_le_bytes(*b"emuLtPrf");
const ALGO_TAG: u64 = u64::from_le_bytes(*b"emuLtAlg");
/// Tags are overwritten with this on destroy, so a second destroy of the same object is caught
/// while its memory has not been reused.
const DEAD_TAG: u64 = u64::from_le_bytes(*b"emuLtDed");

/// cuBLASLt's default for every MIN_ALIGNMENT preference: the pointers are promised 256-byte
/// aligned unless the caller says less.
const DEFAULT_ALIGNMENT: u32 = 256;
/// The widest access a cuBLASLt kernel makes (128-bit loads, TMA): a promise beyond this buys no
/// kernel anything, so only this much of it is checked.
const MAX_CHECKED_ALIGNMENT: u64 = 16;

type Result<T> = std::result::Result<T, Status>;

fn status(r: Result<()>) -> Status {
    match r {
        Ok(()) => SUCCESS,
        Err(s) => s,
    }
}

// ---- element types ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    BF16,
}

impl Elem {
    fn from_cuda(t: lt::cudaDataType_t) -> Result<Elem> {
        match t {
            lt::cudaDataType_t::CUDA_R_32F => Ok(Elem::F32),
            lt::cudaDataType_t::CUDA_R_16F => Ok(Elem::F16),
            lt::cudaDataType_t::CUDA_R_16BF => Ok(Elem::BF16),
            _ => Err(NOT_SUPPORTED),
        }
    }

    /// From an attribute's raw `cudaDataType` value (not trusted to be a valid enum value).
    fn from_raw(v: i64) -> Result<Elem> {
        const F32: i64 = lt::cudaDataType_t::CUDA_R_32F as i64;
        const F16: i64 = lt::cudaDataType_t::CUDA_R_16F as i64;
        const BF16: i64 = lt::cudaDataType_t::CUDA_R_16BF as i64;
        match v {
            F32 => Ok(Elem::F32),
            F16 => Ok(Elem::F16),
            BF16 => Ok(Elem::BF16),
            _ => Err(NOT_SUPPORTED),
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::BF16 => 2,
        }
    }
}

trait Scalar: Copy {
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even, as cuBLASLt's conversion of the f32 result.
    fn from_f32(v: f32) -> Self;
}

impl Scalar for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Scalar for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Scalar for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

// ---- objects behind the opaque pointers -------------------------------------------------------

/// The tag must stay the first field of every object (`#[repr(C)]`): `object` reads it through a
/// `*const u64` before trusting the pointer's type.
#[repr(C)]
struct Handle {
    tag: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Epilogue {
    Default,
    Relu,
    Bias,
    ReluBias,
}

impl Epilogue {
    fn has_bias(self) -> bool {
        matches!(self, Epilogue::Bias | Epilogue::ReluBias)
    }
    fn has_relu(self) -> bool {
        matches!(self, Epilogue::Relu | Epilogue::ReluBias)
    }
}

#[repr(C)]
struct MatmulDesc {
    tag: u64,
    trans_a: bool,
    trans_b: bool,
    epilogue: Epilogue,
    bias: usize,
    /// None: D's type (cuBLASLt's default, -1).
    bias_type: Option<Elem>,
    /// Elements between the bias vectors of consecutive batches; 0 shares one vector.
    bias_batch_stride: usize,
}

#[repr(C)]
struct MatrixLayout {
    tag: u64,
    elem: Elem,
    rows: u64,
    cols: u64,
    ld: i64,
    row_major: bool,
    batch_count: i32,
    batch_stride: i64,
}

#[repr(C)]
struct Preference {
    tag: u64,
    /// Promised minimum byte alignment of A, B, C and D.
    align: [u32; 4],
}

/// The object of type `T` (tagged `tag`) behind an opaque pointer, to read; INVALID_VALUE for a
/// null pointer or another kind of object. Shared references: one call may pass the same layout
/// twice (C and D).
///
/// # Safety
/// A non-null `p` must point to at least 8 readable bytes (any live cuBLASLt object does), and if
/// they hold `tag`, to a live `T` not mutated during `'a`.
unsafe fn object<'a, T>(p: *mut c_void, tag: u64) -> Result<&'a T> {
    if p.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: the caller's contract; the tag check guards the cast below.
    unsafe {
        if (p as *const u64).read_unaligned() != tag {
            return Err(INVALID_VALUE);
        }
        Ok(&*(p as *const T))
    }
}

/// As `object`, to modify (the SetAttribute calls, which take one object).
///
/// # Safety
/// As `object`, and `p` is not otherwise borrowed during `'a`.
unsafe fn object_mut<'a, T>(p: *mut c_void, tag: u64) -> Result<&'a mut T> {
    unsafe {
        object::<T>(p, tag)?;
        Ok(&mut *(p as *mut T))
    }
}

/// Frees an object made by `create`.
///
/// # Safety
/// As `object`; `p` must not be used afterwards.
unsafe fn destroy<T>(p: *mut c_void, tag: u64) -> Status {
    // cuBLASLt accepts destroying a null descriptor.
    if p.is_null() {
        return SUCCESS;
    }
    // SAFETY: checked by tag; the box was made by `create` with the same `T`.
    unsafe {
        if object::<T>(p, tag).is_err() {
            return INVALID_VALUE;
        }
        (p as *mut u64).write(DEAD_TAG);
        drop(Box::from_raw(p as *mut T));
    }
    SUCCESS
}

/// Boxes `v` and stores its address in `*out`.
///
/// # Safety
/// `out`, when non-null, must be writable.
unsafe fn create<T, P>(out: *mut *mut P, v: T) -> Status {
    if out.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, writable by the caller's contract.
    unsafe { out.write(Box::into_raw(Box::new(v)) as *mut P) };
    SUCCESS
}

/// An attribute's value, read from the caller's buffer of `size` bytes (which must be exactly
/// the attribute's C type).
///
/// # Safety
/// A non-null `buf` must be readable for `size` bytes.
unsafe fn value<T: Copy>(buf: *const c_void, size: usize) -> Result<T> {
    if buf.is_null() || size != std::mem::size_of::<T>() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: readable for size_of::<T>() bytes (checked above); T is a plain integer or float.
    Ok(unsafe { (buf as *const T).read_unaligned() })
}

// ---- the exported API -------------------------------------------------------------------------

/// Makes a handle (nothing to set up: there is no device).
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(handle: *mut lt::cublasLtHandle_t) -> lt::cublasStatus_t {
    unsafe { create(handle, Handle { tag: HANDLE_TAG }) }
}

/// Frees a handle from `cublasLtCreate`.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtDestroy(handle: lt::cublasLtHandle_t) -> lt::cublasStatus_t {
    if handle.is_null() {
        return NOT_INITIALIZED;
    }
    unsafe { destroy::<Handle>(handle as *mut c_void, HANDLE_TAG) }
}

/// [`VERSION`]: the engine accepts cuBLASLt 12.0 and later.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtGetVersion() -> usize {
    VERSION
}

/// A matmul descriptor: compute type CUBLAS_COMPUTE_32F(_PEDANTIC), scale type f32 only.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(desc: *mut lt::cublasLtMatmulDesc_t, compute_type: lt::cublasComputeType_t, scale_type: lt::cudaDataType_t) -> lt::cublasStatus_t {
    if let Err(s) = check_compute_type(compute_type as i64) {
        return s;
    }
    if scale_type != lt::cudaDataType_t::CUDA_R_32F {
        return NOT_SUPPORTED;
    }
    let d = MatmulDesc { tag: DESC_TAG, trans_a: false, trans_b: false, epilogue: Epilogue::Default, bias: 0, bias_type: None, bias_batch_stride: 0 };
    unsafe { create(desc, d) }
}

/// f32 accumulation is all we do; PEDANTIC (no reduced-precision shortcuts) is the same here.
/// TF32 or f16 "fast" modes would be different results: not supported.
fn check_compute_type(v: i64) -> Result<()> {
    const F32: i64 = lt::cublasComputeType_t::CUBLAS_COMPUTE_32F as i64;
    const F32_PEDANTIC: i64 = lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC as i64;
    match v {
        F32 | F32_PEDANTIC => Ok(()),
        _ => Err(NOT_SUPPORTED),
    }
}

/// Frees a descriptor from `cublasLtMatmulDescCreate` (null is accepted).
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescDestroy(desc: lt::cublasLtMatmulDesc_t) -> lt::cublasStatus_t {
    unsafe { destroy::<MatmulDesc>(desc as *mut c_void, DESC_TAG) }
}

/// Sets one attribute; `buf` holds exactly `size` bytes of the attribute's C type.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(desc: lt::cublasLtMatmulDesc_t, attr: lt::cublasLtMatmulDescAttributes_t, buf: *const c_void, size: usize) -> lt::cublasStatus_t {
    status(unsafe { set_desc_attribute(desc as *mut c_void, attr, buf, size) })
}

unsafe fn set_desc_attribute(desc: *mut c_void, attr: lt::cublasLtMatmulDescAttributes_t, buf: *const c_void, size: usize) -> Result<()> {
    use lt::cublasLtMatmulDescAttributes_t as A;
    let d: &mut MatmulDesc = unsafe { object_mut(desc, DESC_TAG)? };
    let op = |v: i32| -> Result<bool> {
        // CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C: conjugation is the identity on real types.
        match v {
            0 => Ok(false),
            1 | 2 => Ok(true),
            _ => Err(INVALID_VALUE),
        }
    };
    unsafe {
        match attr {
            A::CUBLASLT_MATMUL_DESC_COMPUTE_TYPE => check_compute_type(value::<i32>(buf, size)? as i64)?,
            A::CUBLASLT_MATMUL_DESC_SCALE_TYPE => {
                if Elem::from_raw(value::<i32>(buf, size)? as i64)? != Elem::F32 {
                    return Err(NOT_SUPPORTED);
                }
            }
            // CUBLASLT_POINTER_MODE_HOST only: alpha and beta are read from host memory.
            A::CUBLASLT_MATMUL_DESC_POINTER_MODE => {
                if value::<i32>(buf, size)? != 0 {
                    return Err(NOT_SUPPORTED);
                }
            }
            A::CUBLASLT_MATMUL_DESC_TRANSA => d.trans_a = op(value::<i32>(buf, size)?)?,
            A::CUBLASLT_MATMUL_DESC_TRANSB => d.trans_b = op(value::<i32>(buf, size)?)?,
            // cuBLASLt itself supports only CUBLAS_OP_N for C.
            A::CUBLASLT_MATMUL_DESC_TRANSC => {
                if value::<i32>(buf, size)? != 0 {
                    return Err(NOT_SUPPORTED);
                }
            }
            A::CUBLASLT_MATMUL_DESC_EPILOGUE => {
                use lt::cublasLtEpilogue_t as E;
                const DEFAULT: u32 = E::CUBLASLT_EPILOGUE_DEFAULT as u32;
                const RELU: u32 = E::CUBLASLT_EPILOGUE_RELU as u32;
                const BIAS: u32 = E::CUBLASLT_EPILOGUE_BIAS as u32;
                const RELU_BIAS: u32 = E::CUBLASLT_EPILOGUE_RELU_BIAS as u32;
                d.epilogue = match value::<u32>(buf, size)? {
                    DEFAULT => Epilogue::Default,
                    RELU => Epilogue::Relu,
                    BIAS => Epilogue::Bias,
                    RELU_BIAS => Epilogue::ReluBias,
                    // GELU (cuBLASLt's own approximation), aux outputs, gradients: not emulated.
                    _ => return Err(NOT_SUPPORTED),
                };
            }
            A::CUBLASLT_MATMUL_DESC_BIAS_POINTER => d.bias = value::<usize>(buf, size)?,
            A::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE => d.bias_batch_stride = usize::try_from(value::<i64>(buf, size)?).map_err(|_| NOT_SUPPORTED)?,
            A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE => {
                d.bias_type = match value::<i32>(buf, size)? {
                    -1 => None,
                    v => Some(Elem::from_raw(v as i64)?),
                }
            }
            // A performance hint (how many SMs to use): no effect on the result.
            A::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET => {
                value::<i32>(buf, size)?;
            }
            // FP8-only switch: its default (0) is the only value that means nothing for our types.
            A::CUBLASLT_MATMUL_DESC_FAST_ACCUM => {
                if value::<i8>(buf, size)? != 0 {
                    return Err(NOT_SUPPORTED);
                }
            }
            // Scaling, amax and auxiliary-output pointers: accepted at their default (null) only.
            A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER
            | A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER
            | A::CUBLASLT_MATMUL_DESC_C_SCALE_POINTER
            | A::CUBLASLT_MATMUL_DESC_D_SCALE_POINTER
            | A::CUBLASLT_MATMUL_DESC_AMAX_D_POINTER
            | A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER
            | A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER
            | A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER
            | A::CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER => {
                if value::<usize>(buf, size)? != 0 {
                    return Err(NOT_SUPPORTED);
                }
            }
            _ => return Err(NOT_SUPPORTED),
        }
    }
    Ok(())
}

/// A column-major `rows` x `cols` layout of f32, f16 or bf16 with leading dimension `ld`.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(layout: *mut lt::cublasLtMatrixLayout_t, ty: lt::cudaDataType, rows: u64, cols: u64, ld: i64) -> lt::cublasStatus_t {
    let elem = match Elem::from_cuda(ty) {
        Ok(e) => e,
        Err(s) => return s,
    };
    // rows, cols and ld are checked against each other when the layout is used, as cuBLASLt
    // does: the caller may still change them through attributes.
    let l = MatrixLayout { tag: LAYOUT_TAG, elem, rows, cols, ld, row_major: false, batch_count: 1, batch_stride: 0 };
    unsafe { create(layout, l) }
}

/// Frees a layout from `cublasLtMatrixLayoutCreate` (null is accepted).
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutDestroy(layout: lt::cublasLtMatrixLayout_t) -> lt::cublasStatus_t {
    unsafe { destroy::<MatrixLayout>(layout as *mut c_void, LAYOUT_TAG) }
}

/// Sets one attribute; `buf` holds exactly `size` bytes of the attribute's C type.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutSetAttribute(layout: lt::cublasLtMatrixLayout_t, attr: lt::cublasLtMatrixLayoutAttribute_t, buf: *const c_void, size: usize) -> lt::cublasStatus_t {
    status(unsafe { set_layout_attribute(layout as *mut c_void, attr, buf, size) })
}

unsafe fn set_layout_attribute(layout: *mut c_void, attr: lt::cublasLtMatrixLayoutAttribute_t, buf: *const c_void, size: usize) -> Result<()> {
    use lt::cublasLtMatrixLayoutAttribute_t as A;
    let l: &mut MatrixLayout = unsafe { object_mut(layout, LAYOUT_TAG)? };
    unsafe {
        match attr {
            A::CUBLASLT_MATRIX_LAYOUT_TYPE => l.elem = Elem::from_raw(value::<u32>(buf, size)? as i64)?,
            A::CUBLASLT_MATRIX_LAYOUT_ORDER => {
                // CUBLASLT_ORDER_COL, CUBLASLT_ORDER_ROW; the tiled orders are for integer GEMMs.
                l.row_major = match value::<i32>(buf, size)? {
                    0 => false,
                    1 => true,
                    _ => return Err(NOT_SUPPORTED),
                }
            }
            A::CUBLASLT_MATRIX_LAYOUT_ROWS => l.rows = value::<u64>(buf, size)?,
            A::CUBLASLT_MATRIX_LAYOUT_COLS => l.cols = value::<u64>(buf, size)?,
            A::CUBLASLT_MATRIX_LAYOUT_LD => l.ld = value::<i64>(buf, size)?,
            A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT => {
                let v = value::<i32>(buf, size)?;
                if v < 1 {
                    return Err(INVALID_VALUE);
                }
                l.batch_count = v;
            }
            A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET => {
                let v = value::<i64>(buf, size)?;
                // Negative strides (batches laid out backwards) are legal in cuBLASLt but unused
                // by the engine; refused rather than half-supported.
                if v < 0 {
                    return Err(NOT_SUPPORTED);
                }
                l.batch_stride = v;
            }
            // Planar complex only.
            A::CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET => {
                if value::<i64>(buf, size)? != 0 {
                    return Err(NOT_SUPPORTED);
                }
            }
            // CUBLASLT_BATCH_MODE_STRIDED only (no arrays of pointers).
            A::CUBLASLT_MATRIX_LAYOUT_BATCH_MODE => {
                if value::<u32>(buf, size)? != 0 {
                    return Err(NOT_SUPPORTED);
                }
            }
        }
    }
    Ok(())
}

/// A heuristic preference (alignments default to 256 bytes, as in cuBLASLt).
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(pref: *mut lt::cublasLtMatmulPreference_t) -> lt::cublasStatus_t {
    unsafe { create(pref, Preference { tag: PREF_TAG, align: [DEFAULT_ALIGNMENT; 4] }) }
}

/// Frees a preference from `cublasLtMatmulPreferenceCreate` (null is accepted).
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceDestroy(pref: lt::cublasLtMatmulPreference_t) -> lt::cublasStatus_t {
    unsafe { destroy::<Preference>(pref as *mut c_void, PREF_TAG) }
}

/// Sets one attribute; `buf` holds exactly `size` bytes of the attribute's C type.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(pref: lt::cublasLtMatmulPreference_t, attr: lt::cublasLtMatmulPreferenceAttributes_t, buf: *const c_void, size: usize) -> lt::cublasStatus_t {
    status(unsafe { set_pref_attribute(pref as *mut c_void, attr, buf, size) })
}

unsafe fn set_pref_attribute(pref: *mut c_void, attr: lt::cublasLtMatmulPreferenceAttributes_t, buf: *const c_void, size: usize) -> Result<()> {
    use lt::cublasLtMatmulPreferenceAttributes_t as A;
    let p: &mut Preference = unsafe { object_mut(pref, PREF_TAG)? };
    // The filters below (workspace, reduction schemes, waves, implementations) only narrow the
    // choice of algorithms; ours needs no workspace and no reduction, so it passes all of them.
    unsafe {
        match attr {
            A::CUBLASLT_MATMUL_PREF_SEARCH_MODE => {
                // CUBLASLT_SEARCH_BEST_FIT, CUBLASLT_SEARCH_LIMITED_BY_ALGO_ID
                if value::<u32>(buf, size)? > 1 {
                    return Err(NOT_SUPPORTED);
                }
            }
            A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES => {
                value::<u64>(buf, size)?;
            }
            A::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK => {
                value::<u32>(buf, size)?;
            }
            A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES => p.align[0] = value::<u32>(buf, size)?,
            A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES => p.align[1] = value::<u32>(buf, size)?,
            A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES => p.align[2] = value::<u32>(buf, size)?,
            A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES => p.align[3] = value::<u32>(buf, size)?,
            A::CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT => {
                value::<f32>(buf, size)?;
            }
            A::CUBLASLT_MATMUL_PREF_IMPL_MASK => {
                value::<u64>(buf, size)?;
            }
        }
    }
    Ok(())
}

/// One algorithm (no workspace) when the problem is one `cublasLtMatmul` runs; NOT_SUPPORTED
/// and no result when it is not.
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    handle: lt::cublasLtHandle_t,
    desc: lt::cublasLtMatmulDesc_t,
    a_desc: lt::cublasLtMatrixLayout_t,
    b_desc: lt::cublasLtMatrixLayout_t,
    c_desc: lt::cublasLtMatrixLayout_t,
    d_desc: lt::cublasLtMatrixLayout_t,
    pref: lt::cublasLtMatmulPreference_t,
    requested: i32,
    results: *mut lt::cublasLtMatmulHeuristicResult_t,
    returned: *mut i32,
) -> lt::cublasStatus_t {
    if returned.is_null() || results.is_null() || requested < 1 {
        return INVALID_VALUE;
    }
    // SAFETY: non-null out-pointer.
    unsafe { returned.write(0) };
    let found = catch_unwind(AssertUnwindSafe(|| -> Result<lt::cublasLtMatmulAlgo_t> {
        // SAFETY: the caller passes live objects (or null, refused by `object`).
        unsafe {
            object::<Handle>(handle as *mut c_void, HANDLE_TAG).map_err(|_| NOT_INITIALIZED)?;
            let d: &MatmulDesc = object(desc as *mut c_void, DESC_TAG)?;
            let p: &Preference = object(pref as *mut c_void, PREF_TAG)?;
            let prob = Problem::new(d, object(a_desc as *mut c_void, LAYOUT_TAG)?, object(b_desc as *mut c_void, LAYOUT_TAG)?, object(c_desc as *mut c_void, LAYOUT_TAG)?, object(d_desc as *mut c_void, LAYOUT_TAG)?)?;
            // No kernel reads elements at less than their natural alignment: with a weaker
            // promise cuBLASLt finds no algorithm.
            let elems = [prob.a.elem, prob.b.elem, prob.c.elem, prob.d.elem];
            if p.align.iter().zip(elems).any(|(&al, e)| (al as usize) < e.size()) {
                return Err(NOT_SUPPORTED);
            }
            let mut algo = lt::cublasLtMatmulAlgo_t { data: [0; 8] };
            algo.data[0] = ALGO_TAG;
            for (slot, al) in algo.data[1..5].iter_mut().zip(p.align) {
                *slot = al as u64;
            }
            Ok(algo)
        }
    }));
    match found {
        Ok(Ok(algo)) => {
            let r = lt::cublasLtMatmulHeuristicResult_t { algo, workspaceSize: 0, state: SUCCESS, wavesCount: 1.0, reserved: [0; 4] };
            // SAFETY: the caller's array holds `requested` >= 1 results.
            unsafe {
                results.write(r);
                returned.write(1);
            }
            SUCCESS
        }
        Ok(Err(s)) => s,
        Err(_) => INTERNAL_ERROR,
    }
}

/// D = epilogue(alpha · op(A) · op(B) + beta · C), complete when the call returns (the stream and
/// the workspace are not used).
///
/// # Safety
/// cuBLASLt's contract: every pointer is null or valid for what the call reads or writes, every
/// object argument is live; device memory is host memory here.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmul(
    handle: lt::cublasLtHandle_t,
    desc: lt::cublasLtMatmulDesc_t,
    alpha: *const c_void,
    a: *const c_void,
    a_desc: lt::cublasLtMatrixLayout_t,
    b: *const c_void,
    b_desc: lt::cublasLtMatrixLayout_t,
    beta: *const c_void,
    c: *const c_void,
    c_desc: lt::cublasLtMatrixLayout_t,
    d: *mut c_void,
    d_desc: lt::cublasLtMatrixLayout_t,
    algo: *const lt::cublasLtMatmulAlgo_t,
    _workspace: *mut c_void,
    _workspace_size: usize,
    _stream: lt::cudaStream_t,
) -> lt::cublasStatus_t {
    let run = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
        // SAFETY: the caller passes live objects, host-readable alpha/beta, and matrices its
        // layouts describe (the contract of cublasLtMatmul, with host memory as device memory).
        unsafe {
            object::<Handle>(handle as *mut c_void, HANDLE_TAG).map_err(|_| NOT_INITIALIZED)?;
            let md: &MatmulDesc = object(desc as *mut c_void, DESC_TAG)?;
            let prob = Problem::new(md, object(a_desc as *mut c_void, LAYOUT_TAG)?, object(b_desc as *mut c_void, LAYOUT_TAG)?, object(c_desc as *mut c_void, LAYOUT_TAG)?, object(d_desc as *mut c_void, LAYOUT_TAG)?)?;
            let alpha = value::<f32>(alpha, 4)?;
            let beta = value::<f32>(beta, 4)?;
            let promised = if algo.is_null() {
                // No algorithm: cuBLASLt picks one for the pointers it is given.
                [1u64; 4]
            } else {
                let al = algo.read_unaligned();
                if al.data[0] != ALGO_TAG {
                    return Err(INVALID_VALUE);
                }
                [al.data[1], al.data[2], al.data[3], al.data[4]]
            };
            let bias = if md.epilogue.has_bias() { Some((md.bias, prob.bias_elem, md.bias_batch_stride)) } else { None };
            let ptrs = Pointers { a: a as usize, b: b as usize, c: c as usize, d: d as usize };
            prob.check_pointers(&ptrs, promised, beta, bias)?;
            if crate::driver::skip_kernels() {
                return Ok(());
            }
            prob.run(&ptrs, alpha, beta, bias, md.epilogue.has_relu())
        }
    }));
    match run {
        Ok(r) => status(r),
        Err(_) => INTERNAL_ERROR,
    }
}

// ---- the product ------------------------------------------------------------------------------

/// A validated matrix layout: element (r, c) of batch b is at b·stride + r·rs + c·cs elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct View {
    elem: Elem,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    batch: usize,
    stride: usize,
}

impl View {
    fn new(l: &MatrixLayout) -> Result<View> {
        let rows = usize::try_from(l.rows).map_err(|_| INVALID_VALUE)?;
        let cols = usize::try_from(l.cols).map_err(|_| INVALID_VALUE)?;
        let ld = usize::try_from(l.ld).map_err(|_| INVALID_VALUE)?;
        let (rs, cs, min_ld) = if l.row_major { (ld, 1, cols) } else { (1, ld, rows) };
        if ld < min_ld.max(1) {
            return Err(INVALID_VALUE);
        }
        let batch = usize::try_from(l.batch_count).map_err(|_| INVALID_VALUE)?;
        let stride = usize::try_from(l.batch_stride).map_err(|_| NOT_SUPPORTED)?;
        let v = View { elem: l.elem, rows, cols, rs, cs, batch, stride: if batch > 1 { stride } else { 0 } };
        // Every element offset (and its byte offset) must fit: then no offset computed later
        // overflows.
        v.extent_bytes().ok_or(INVALID_VALUE)?;
        Ok(v)
    }

    /// Bytes from the first element to the end of the last one.
    fn extent_bytes(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(0);
        }
        let last = (self.batch - 1).checked_mul(self.stride)?.checked_add((self.rows - 1).checked_mul(self.rs)?)?.checked_add((self.cols - 1).checked_mul(self.cs)?)?;
        let bytes = last.checked_add(1)?.checked_mul(self.elem.size())?;
        (bytes <= isize::MAX as usize).then_some(bytes)
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }
}

/// One matmul's shapes and types, checked against each other (cuBLASLt's M, N, K).
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a: View,
    b: View,
    c: View,
    d: View,
    trans_a: bool,
    trans_b: bool,
    bias_elem: Elem,
}

struct Pointers {
    a: usize,
    b: usize,
    c: usize,
    d: usize,
}

impl Problem {
    fn new(desc: &MatmulDesc, a: &MatrixLayout, b: &MatrixLayout, c: &MatrixLayout, d: &MatrixLayout) -> Result<Problem> {
        let (a, b, c, d) = (View::new(a)?, View::new(b)?, View::new(c)?, View::new(d)?);
        let (m, k) = if desc.trans_a { (a.cols, a.rows) } else { (a.rows, a.cols) };
        let (k2, n) = if desc.trans_b { (b.cols, b.rows) } else { (b.rows, b.cols) };
        if k != k2 || (d.rows, d.cols) != (m, n) || (c.rows, c.cols) != (m, n) {
            return Err(INVALID_VALUE);
        }
        let batch = d.batch;
        if a.batch != batch || b.batch != batch || c.batch != batch {
            return Err(INVALID_VALUE);
        }
        // cuBLASLt's combinations for CUBLAS_COMPUTE_32F with f32 scale: A and B of one type,
        // C and D of one type, that type or f32.
        if a.elem != b.elem || c.elem != d.elem || (d.elem != a.elem && d.elem != Elem::F32) {
            return Err(NOT_SUPPORTED);
        }
        Ok(Problem { m, n, k, batch, a, b, c, d, trans_a: desc.trans_a, trans_b: desc.trans_b, bias_elem: desc.bias_type.unwrap_or(d.elem) })
    }

    /// Null and misaligned pointers, and an in-place C that D would overwrite in another order.
    fn check_pointers(&self, p: &Pointers, promised: [u64; 4], beta: f32, bias: Option<(usize, Elem, usize)>) -> Result<()> {
        let aligned = |ptr: usize, v: &View, promise: u64| -> Result<()> {
            let need = (promise.min(MAX_CHECKED_ALIGNMENT) as usize).max(v.elem.size());
            let step = v.stride.checked_mul(v.elem.size()).ok_or(INVALID_VALUE)?;
            if !ptr.is_multiple_of(need) || (v.batch > 1 && !step.is_multiple_of(need)) {
                return Err(INVALID_VALUE);
            }
            Ok(())
        };
        let reads_c = beta != 0.0;
        for (ptr, v, promise, used) in [(p.a, &self.a, promised[0], self.k > 0), (p.b, &self.b, promised[1], self.k > 0), (p.c, &self.c, promised[2], reads_c), (p.d, &self.d, promised[3], true)] {
            if v.is_empty() || !used {
                continue;
            }
            if ptr == 0 {
                return Err(INVALID_VALUE);
            }
            aligned(ptr, v, promise)?;
        }
        // In place, C and D must be the same matrices, or D's writes would clobber C's reads.
        if reads_c && p.c == p.d && !self.d.is_empty() && (self.c.rs, self.c.cs, self.c.stride) != (self.d.rs, self.d.cs, self.d.stride) {
            return Err(INVALID_VALUE);
        }
        if let Some((ptr, elem, stride)) = bias {
            if self.m > 0 && self.n > 0 {
                let size = elem.size();
                if ptr == 0 || !ptr.is_multiple_of(size) {
                    return Err(INVALID_VALUE);
                }
                // The last bias element's byte offset must be addressable.
                (self.batch - 1).checked_mul(stride).and_then(|o| o.checked_add(self.m)).and_then(|o| o.checked_mul(size)).filter(|&b| b <= isize::MAX as usize).ok_or(INVALID_VALUE)?;
            }
        }
        Ok(())
    }

    /// # Safety
    /// The pointers address the matrices (and bias vectors) the views describe, in host memory.
    unsafe fn run(&self, p: &Pointers, alpha: f32, beta: f32, bias: Option<(usize, Elem, usize)>, relu: bool) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let mk = m.checked_mul(k).ok_or(ALLOC_FAILED)?;
        let kn = k.checked_mul(n).ok_or(ALLOC_FAILED)?;
        let mn = m.checked_mul(n).ok_or(ALLOC_FAILED)?;
        let (mut a32, mut b32, mut acc) = (buffer(mk)?, buffer(kn)?, buffer(mn)?);
        let mut c32 = if beta != 0.0 { buffer(mn)? } else { Vec::new() };
        let mut bias32 = if bias.is_some() { buffer(m)? } else { Vec::new() };
        // op(A) as column-major M x K and op(B) as column-major K x N: stored (r, c) of a
        // transposed operand is op's (c, r).
        let (a_rs, a_cs) = if self.trans_a { (self.a.cs, self.a.rs) } else { (self.a.rs, self.a.cs) };
        let (b_rs, b_cs) = if self.trans_b { (self.b.cs, self.b.rs) } else { (self.b.rs, self.b.cs) };
        for batch in 0..self.batch {
            // SAFETY (all reads and writes below): offsets within the extents checked in View::new
            // and check_pointers, from pointers the caller guarantees.
            unsafe {
                if k > 0 {
                    gather(self.a.elem, p.a, batch * self.a.stride, m, k, a_rs, a_cs, &mut a32);
                    gather(self.b.elem, p.b, batch * self.b.stride, k, n, b_rs, b_cs, &mut b32);
                }
                if beta != 0.0 {
                    gather(self.c.elem, p.c, batch * self.c.stride, m, n, self.c.rs, self.c.cs, &mut c32);
                }
                if let Some((ptr, elem, stride)) = bias {
                    if batch == 0 || stride != 0 {
                        gather(elem, ptr, batch * stride, m, 1, 1, 0, &mut bias32);
                    }
                }
            }
            acc.clear();
            acc.resize(mn, 0.0);
            gemm_accumulate(m, n, k, &a32, &b32, &mut acc);
            // The epilogue in f32, in cuBLASLt's order: scale, add beta·C, add the bias, ReLU.
            for (j, col) in acc.chunks_exact_mut(m).enumerate() {
                for (i, v) in col.iter_mut().enumerate() {
                    let mut x = alpha * *v;
                    if beta != 0.0 {
                        x += beta * c32.get(j * m + i).copied().unwrap_or(f32::NAN);
                    }
                    if bias.is_some() {
                        x += bias32.get(i).copied().unwrap_or(f32::NAN);
                    }
                    if relu {
                        x = x.max(0.0);
                    }
                    *v = x;
                }
            }
            unsafe { scatter(self.d.elem, p.d, batch * self.d.stride, m, n, self.d.rs, self.d.cs, &acc) };
        }
        Ok(())
    }
}

/// An empty f32 buffer with room for `len` values; ALLOC_FAILED rather than an abort.
fn buffer(len: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| ALLOC_FAILED)?;
    Ok(v)
}

/// Reads the rows x cols matrix at element `offset` of `base` (element (r, c) at
/// r·rs + c·cs) into `out` as column-major f32.
///
/// # Safety
/// Every element read must be inside one allocation, aligned for `elem`.
#[allow(clippy::too_many_arguments)]
unsafe fn gather(elem: Elem, base: usize, offset: usize, rows: usize, cols: usize, rs: usize, cs: usize, out: &mut Vec<f32>) {
    unsafe fn typed<T: Scalar>(base: *const T, rows: usize, cols: usize, rs: usize, cs: usize, out: &mut Vec<f32>) {
        out.clear();
        for c in 0..cols {
            // SAFETY: the caller's contract.
            unsafe {
                let col = base.add(c * cs);
                out.extend((0..rows).map(|r| col.add(r * rs).read().to_f32()));
            }
        }
    }
    unsafe {
        match elem {
            Elem::F32 => typed((base as *const f32).add(offset), rows, cols, rs, cs, out),
            Elem::F16 => typed((base as *const f16).add(offset), rows, cols, rs, cs, out),
            Elem::BF16 => typed((base as *const bf16).add(offset), rows, cols, rs, cs, out),
        }
    }
}

/// Writes column-major f32 `vals` (rows x cols) rounded to `elem` into the matrix at element
/// `offset` of `base` (element (r, c) at r·rs + c·cs).
///
/// # Safety
/// As `gather`, for writes.
#[allow(clippy::too_many_arguments)]
unsafe fn scatter(elem: Elem, base: usize, offset: usize, rows: usize, cols: usize, rs: usize, cs: usize, vals: &[f32]) {
    unsafe fn typed<T: Scalar>(base: *mut T, rows: usize, cols: usize, rs: usize, cs: usize, vals: &[f32]) {
        for (c, col_vals) in vals.chunks_exact(rows).take(cols).enumerate() {
            // SAFETY: the caller's contract.
            unsafe {
                let col = base.add(c * cs);
                for (r, &v) in col_vals.iter().enumerate() {
                    col.add(r * rs).write(T::from_f32(v));
                }
            }
        }
    }
    unsafe {
        match elem {
            Elem::F32 => typed((base as *mut f32).add(offset), rows, cols, rs, cs, vals),
            Elem::F16 => typed((base as *mut f16).add(offset), rows, cols, rs, cs, vals),
            Elem::BF16 => typed((base as *mut bf16).add(offset), rows, cols, rs, cs, vals),
        }
    }
}

/// acc (column-major M x N) += a (column-major M x K) · b (column-major K x N), in f32.
///
/// Each output sums its K products in order k = 0, 1, ..., so the blocking changes speed, not
/// results. Blocks of rows x k keep a panel of `a` in cache while every column of the output
/// passes over it; four output columns share each load of `a`.
fn gemm_accumulate(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], acc: &mut [f32]) {
    const ROWS: usize = 256;
    const DEPTH: usize = 128;
    if m == 0 || n == 0 || k == 0 || a.len() < m * k || b.len() < k * n || acc.len() < m * n {
        return;
    }
    let acc = &mut acc[..m * n];
    for i0 in (0..m).step_by(ROWS) {
        let i1 = (i0 + ROWS).min(m);
        for k0 in (0..k).step_by(DEPTH) {
            let k1 = (k0 + DEPTH).min(k);
            let mut groups = acc.chunks_exact_mut(4 * m);
            let mut j = 0;
            for g in &mut groups {
                let (c0, rest) = g.split_at_mut(m);
                let (c1, rest) = rest.split_at_mut(m);
                let (c2, c3) = rest.split_at_mut(m);
                let len = i1 - i0;
                let (c0, c1, c2, c3) = (&mut c0[i0..i1], &mut c1[i0..i1], &mut c2[i0..i1], &mut c3[i0..i1]);
                for kk in k0..k1 {
                    let col = &a[kk * m + i0..kk * m + i1];
                    let (b0, b1, b2, b3) = (b[j * k + kk], b[(j + 1) * k + kk], b[(j + 2) * k + kk], b[(j + 3) * k + kk]);
                    for t in 0..len {
                        let x = col[t];
                        c0[t] += x * b0;
                        c1[t] += x * b1;
                        c2[t] += x * b2;
                        c3[t] += x * b3;
                    }
                }
                j += 4;
            }
            for out in groups.into_remainder().chunks_exact_mut(m) {
                let out = &mut out[i0..i1];
                for kk in k0..k1 {
                    let col = &a[kk * m + i0..kk * m + i1];
                    let bv = b[j * k + kk];
                    for (o, &x) in out.iter_mut().zip(col) {
                        *o += x * bv;
                    }
                }
                j += 1;
            }
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use engine::{Device, Tensor};
    use lt::cublasLtMatmulDescAttributes_t as DA;
    use lt::cublasLtMatmulPreferenceAttributes_t as PA;
    use lt::cublasLtMatrixLayoutAttribute_t as LA;
    use std::ptr::null_mut;

    fn cuda_type(e: Elem) -> lt::cudaDataType_t {
        match e {
            Elem::F32 => lt::cudaDataType_t::CUDA_R_32F,
            Elem::F16 => lt::cudaDataType_t::CUDA_R_16F,
            Elem::BF16 => lt::cudaDataType_t::CUDA_R_16BF,
        }
    }

    /// Host memory of one element type, every element NaN until set: a read of anything the
    /// layouts do not cover shows up as NaN in the result.
    enum Buf {
        F32(Vec<f32>),
        Half(Vec<u16>, Elem),
    }

    impl Buf {
        fn nan(elem: Elem, len: usize) -> Buf {
            match elem {
                Elem::F32 => Buf::F32(vec![f32::NAN; len]),
                Elem::F16 => Buf::Half(vec![f16::NAN.to_bits(); len], elem),
                Elem::BF16 => Buf::Half(vec![bf16::NAN.to_bits(); len], elem),
            }
        }
        fn set(&mut self, i: usize, v: f32) {
            match self {
                Buf::F32(d) => d[i] = v,
                Buf::Half(d, Elem::F16) => d[i] = f16::from_f32(v).to_bits(),
                Buf::Half(d, _) => d[i] = bf16::from_f32(v).to_bits(),
            }
        }
        fn get(&self, i: usize) -> f32 {
            match self {
                Buf::F32(d) => d[i],
                Buf::Half(d, Elem::F16) => f16::from_bits(d[i]).to_f32(),
                Buf::Half(d, _) => bf16::from_bits(d[i]).to_f32(),
            }
        }
        fn len(&self) -> usize {
            match self {
                Buf::F32(d) => d.len(),
                Buf::Half(d, _) => d.len(),
            }
        }
        fn ptr(&mut self) -> *mut c_void {
            match self {
                Buf::F32(d) => d.as_mut_ptr() as *mut c_void,
                Buf::Half(d, _) => d.as_mut_ptr() as *mut c_void,
            }
        }
    }

    fn round_to(e: Elem, v: f32) -> f32 {
        match e {
            Elem::F32 => v,
            Elem::F16 => f16::from_f32(v).to_f32(),
            Elem::BF16 => bf16::from_f32(v).to_f32(),
        }
    }

    /// A stored matrix: its layout values and where logical element (r, c) of batch b lives.
    #[derive(Clone, Copy)]
    struct Stored {
        rows: usize,
        cols: usize,
        ld: usize,
        row_major: bool,
        batch: usize,
        stride: usize,
    }

    impl Stored {
        /// Padded on purpose: ld beyond the minimum, a gap between batches.
        fn new(rows: usize, cols: usize, row_major: bool, batch: usize, broadcast: bool) -> Stored {
            let ld = if row_major { cols } else { rows } + 2;
            let stride = if broadcast { 0 } else { ld * if row_major { rows } else { cols } + 3 };
            Stored { rows, cols, ld, row_major, batch, stride }
        }
        fn index(&self, b: usize, r: usize, c: usize) -> usize {
            b * self.stride + if self.row_major { r * self.ld + c } else { r + c * self.ld }
        }
        fn len(&self) -> usize {
            self.index(self.batch - 1, self.rows - 1, self.cols - 1) + 1
        }
        unsafe fn layout(&self, elem: Elem) -> lt::cublasLtMatrixLayout_t {
            let mut l = null_mut();
            unsafe {
                ok(cublasLtMatrixLayoutCreate(&mut l, cuda_type(elem), self.rows as u64, self.cols as u64, self.ld as i64));
                if self.row_major {
                    set_layout(l, LA::CUBLASLT_MATRIX_LAYOUT_ORDER, &1i32);
                }
                if self.batch > 1 {
                    set_layout(l, LA::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &(self.batch as i32));
                    set_layout(l, LA::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &(self.stride as i64));
                }
            }
            l
        }
    }

    fn ok(s: Status) {
        assert_eq!(s, SUCCESS);
    }

    unsafe fn set_layout<T>(l: lt::cublasLtMatrixLayout_t, attr: LA, v: &T) {
        ok(unsafe { cublasLtMatrixLayoutSetAttribute(l, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) });
    }

    unsafe fn set_desc<T>(d: lt::cublasLtMatmulDesc_t, attr: DA, v: &T) -> Status {
        unsafe { cublasLtMatmulDescSetAttribute(d, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }
    }

    #[derive(Clone, Copy)]
    enum CMode {
        /// C is D (same pointer and layout, as the engine calls it), holding C's values when
        /// beta != 0 and NaN otherwise (beta = 0 must not read C).
        InPlace,
        /// C is its own column-major matrix, D is row-major.
        Separate,
    }

    #[derive(Clone, Copy)]
    struct Case {
        input: Elem,
        output: Elem,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
        trans_a: bool,
        trans_b: bool,
        row_major: bool,
        broadcast_b: bool,
        alpha: f32,
        beta: f32,
        c_mode: CMode,
        /// The bias type (set as BIAS_DATA_TYPE when it is not D's) and its batch stride.
        bias: Option<(Elem, usize)>,
        relu: bool,
        /// Small multiples of 1/4: every product and sum is exact in f32, so results must match
        /// bit for bit after the one rounding to D's type.
        exact: bool,
    }

    const BASE: Case = Case {
        input: Elem::F32,
        output: Elem::F32,
        m: 5,
        n: 7,
        k: 3,
        batch: 2,
        trans_a: false,
        trans_b: false,
        row_major: false,
        broadcast_b: false,
        alpha: 1.5,
        beta: 0.0,
        c_mode: CMode::InPlace,
        bias: None,
        relu: false,
        exact: true,
    };

    fn value_at(case: &Case, seed: usize, i: usize) -> f32 {
        if case.exact {
            (((i * 7 + seed * 13) % 17) as f32 - 8.0) * 0.25
        } else {
            ((i as f32) * 0.37 + seed as f32).sin()
        }
    }

    /// Runs `case` through the exported functions and checks D against the engine's CPU matmul
    /// (plus the epilogue, computed here in f32).
    fn check(case: Case) {
        let Case { input, output, m, n, k, batch, .. } = case;
        // Logical op(A) [batch, m, k] and op(B) [batch or 1, k, n], row-major, already rounded to
        // the input type (they are what the stored matrices hold).
        let a_log: Vec<f32> = (0..batch * m * k).map(|i| round_to(input, value_at(&case, 1, i))).collect();
        let b_batches = if case.broadcast_b { 1 } else { batch };
        let b_log: Vec<f32> = (0..b_batches * k * n).map(|i| round_to(input, value_at(&case, 2, i))).collect();
        let c_log: Vec<f32> = (0..batch * m * n).map(|i| round_to(output, value_at(&case, 3, i))).collect();
        let bias_len = case.bias.map(|(_, s)| (batch - 1) * s + m).unwrap_or(0);
        let bias_log: Vec<f32> = (0..bias_len).map(|i| round_to(case.bias.map(|b| b.0).unwrap_or(output), value_at(&case, 4, i))).collect();

        let reference = {
            let ta = Tensor::from_vec(a_log.clone(), &[batch, m, k], Device::Cpu).unwrap();
            let tb = if case.broadcast_b { Tensor::from_vec(b_log.clone(), &[k, n], Device::Cpu) } else { Tensor::from_vec(b_log.clone(), &[batch, k, n], Device::Cpu) }.unwrap();
            ta.matmul(&tb).unwrap().to_vec_f32().unwrap()
        };
        let expected = |bt: usize, i: usize, j: usize| -> f32 {
            let mut x = case.alpha * reference[(bt * m + i) * n + j];
            if case.beta != 0.0 {
                x += case.beta * c_log[(bt * m + i) * n + j];
            }
            if let Some((_, s)) = case.bias {
                x += bias_log[bt * s + i];
            }
            if case.relu {
                x = x.max(0.0);
            }
            x
        };

        // Stored matrices: a transposed operand holds op's transpose.
        let sa = if case.trans_a { Stored::new(k, m, case.row_major, batch, false) } else { Stored::new(m, k, case.row_major, batch, false) };
        let sb = if case.trans_b { Stored::new(n, k, !case.row_major, batch, case.broadcast_b) } else { Stored::new(k, n, !case.row_major, batch, case.broadcast_b) };
        let sd = Stored::new(m, n, matches!(case.c_mode, CMode::Separate), batch, false);
        let sc = match case.c_mode {
            CMode::InPlace => sd,
            CMode::Separate => Stored::new(m, n, false, batch, false),
        };
        let mut buf_a = Buf::nan(input, sa.len());
        let mut buf_b = Buf::nan(input, sb.len());
        let mut buf_d = Buf::nan(output, sd.len());
        let mut buf_c = Buf::nan(output, sc.len());
        for bt in 0..batch {
            for i in 0..m {
                for kk in 0..k {
                    let idx = if case.trans_a { sa.index(bt, kk, i) } else { sa.index(bt, i, kk) };
                    buf_a.set(idx, a_log[(bt * m + i) * k + kk]);
                }
                for j in 0..n {
                    let target = if matches!(case.c_mode, CMode::InPlace) { &mut buf_d } else { &mut buf_c };
                    if case.beta != 0.0 {
                        target.set(sc.index(bt, i, j), c_log[(bt * m + i) * n + j]);
                    }
                }
            }
            for kk in 0..k {
                for j in 0..n {
                    let idx = if case.trans_b { sb.index(bt, j, kk) } else { sb.index(bt, kk, j) };
                    let src = if case.broadcast_b { kk * n + j } else { (bt * k + kk) * n + j };
                    buf_b.set(idx, b_log[src]);
                }
            }
        }
        let mut buf_bias = Buf::nan(case.bias.map(|b| b.0).unwrap_or(output), bias_len.max(1));
        for (i, &v) in bias_log.iter().enumerate() {
            buf_bias.set(i, v);
        }

        unsafe {
            let mut handle = null_mut();
            ok(cublasLtCreate(&mut handle));
            let mut desc = null_mut();
            ok(cublasLtMatmulDescCreate(&mut desc, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType_t::CUDA_R_32F));
            ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_TRANSA, &(case.trans_a as i32)));
            ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_TRANSB, &(case.trans_b as i32)));
            if let Some((elem, stride)) = case.bias {
                use lt::cublasLtEpilogue_t as E;
                let epi = if case.relu { E::CUBLASLT_EPILOGUE_RELU_BIAS } else { E::CUBLASLT_EPILOGUE_BIAS };
                ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epi as u32)));
                ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &(buf_bias.ptr() as u64)));
                if elem != output {
                    ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(cuda_type(elem) as i32)));
                }
                if stride != 0 {
                    ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &(stride as i64)));
                }
            } else if case.relu {
                ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_EPILOGUE, &(lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU as u32)));
            }
            let (la, lb, lc, ld) = (sa.layout(input), sb.layout(input), sc.layout(output), sd.layout(output));
            let mut pref = null_mut();
            ok(cublasLtMatmulPreferenceCreate(&mut pref));
            ok(cublasLtMatmulPreferenceSetAttribute(pref, PA::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(1u64 << 22) as *const u64 as *const c_void, 8));
            // Vec's own alignment is all these buffers promise.
            for (attr, e) in [(PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, input), (PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, input), (PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, output), (PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, output)] {
                ok(cublasLtMatmulPreferenceSetAttribute(pref, attr, &(e.size() as u32) as *const u32 as *const c_void, 4));
            }
            let mut results: [lt::cublasLtMatmulHeuristicResult_t; 4] = std::mem::zeroed();
            let mut found = -1;
            ok(cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, lc, ld, pref, 4, results.as_mut_ptr(), &mut found));
            assert_eq!(found, 1);
            assert_eq!(results[0].state, SUCCESS);
            assert_eq!(results[0].workspaceSize, 0);
            let c_ptr = match case.c_mode {
                CMode::InPlace => buf_d.ptr() as *const c_void,
                CMode::Separate => buf_c.ptr() as *const c_void,
            };
            ok(cublasLtMatmul(handle, desc, &case.alpha as *const f32 as *const c_void, buf_a.ptr(), la, buf_b.ptr(), lb, &case.beta as *const f32 as *const c_void, c_ptr, lc, buf_d.ptr(), ld, &results[0].algo, null_mut(), 0, null_mut()));
            for l in [la, lb, lc, ld] {
                ok(cublasLtMatrixLayoutDestroy(l));
            }
            ok(cublasLtMatmulPreferenceDestroy(pref));
            ok(cublasLtMatmulDescDestroy(desc));
            ok(cublasLtDestroy(handle));
        }

        let mut written = vec![false; buf_d.len()];
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let idx = sd.index(bt, i, j);
                    written[idx] = true;
                    let (got, want) = (buf_d.get(idx), expected(bt, i, j));
                    let fine = if case.exact {
                        got == round_to(output, want)
                    } else {
                        // f32 sums in another order, then one rounding to D's type.
                        let ulp = match output {
                            Elem::F32 => 0.0,
                            Elem::F16 => 1.0 / 1024.0,
                            Elem::BF16 => 1.0 / 128.0,
                        };
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()) + ulp * want.abs()
                    };
                    assert!(fine, "batch {bt}, D[{i}, {j}]: got {got}, want {want} ({})", round_to(output, want));
                }
            }
        }
        // Padding stays untouched (NaN unless it held C's values in place).
        if matches!(case.c_mode, CMode::Separate) || case.beta == 0.0 {
            for (idx, w) in written.iter().enumerate() {
                assert!(*w || buf_d.get(idx).is_nan(), "D padding element {idx} was written");
            }
        }
    }

    #[test]
    fn cublaslt_f32_every_transpose_and_order() {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for row_major in [false, true] {
                    check(Case { trans_a, trans_b, row_major, ..BASE });
                }
            }
        }
    }

    #[test]
    fn cublaslt_beta_c_bias_and_relu() {
        for c_mode in [CMode::InPlace, CMode::Separate] {
            for relu in [false, true] {
                check(Case { beta: 0.5, c_mode, bias: Some((Elem::F32, 0)), relu, trans_b: true, ..BASE });
                check(Case { beta: -1.0, c_mode, bias: Some((Elem::F32, 6)), relu, trans_a: true, ..BASE });
            }
        }
        check(Case { relu: true, ..BASE });
        // The engine's `linear`: bias epilogue, beta 0, C is D.
        check(Case { bias: Some((Elem::F32, 0)), alpha: 1.0, trans_a: true, ..BASE });
    }

    #[test]
    fn cublaslt_half_types() {
        for elem in [Elem::BF16, Elem::F16] {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                // bf16/f16 in and out with a bias of D's type (the engine's linear) ...
                check(Case { input: elem, output: elem, trans_a, trans_b, bias: Some((elem, 0)), ..BASE });
                // ... f32 out (the engine's matmul_scaled for attention scores) ...
                check(Case { input: elem, output: Elem::F32, trans_a, trans_b, alpha: 0.125, ..BASE });
                // ... an f32 bias through BIAS_DATA_TYPE, and C in place.
                check(Case { input: elem, output: elem, trans_a, trans_b, beta: 0.5, bias: Some((Elem::F32, 5)), ..BASE });
            }
        }
    }

    #[test]
    fn cublaslt_larger_inexact_against_the_engine() {
        // Past the kernel's row and depth blocks, N not a multiple of 4, B broadcast over the batch.
        let big = Case { m: 300, n: 19, k: 150, batch: 3, exact: false, alpha: 1.0, broadcast_b: true, ..BASE };
        check(big);
        check(Case { trans_a: true, trans_b: true, row_major: true, broadcast_b: false, bias: Some((Elem::F32, 0)), ..big });
        check(Case { input: Elem::BF16, output: Elem::BF16, trans_b: true, bias: Some((Elem::BF16, 0)), ..big });
        check(Case { input: Elem::F16, output: Elem::F32, trans_a: true, alpha: 0.3, ..big });
    }

    /// The exports have exactly the signatures the engine resolves (a compile-time check).
    #[test]
    fn cublaslt_signatures_match_the_engine_table() {
        let api = engine::cuda::libs::CublasLtApi {
            cublasLtCreate,
            cublasLtDestroy,
            cublasLtGetVersion,
            cublasLtMatmulDescCreate,
            cublasLtMatmulDescDestroy,
            cublasLtMatmulDescSetAttribute,
            cublasLtMatrixLayoutCreate,
            cublasLtMatrixLayoutDestroy,
            cublasLtMatrixLayoutSetAttribute,
            cublasLtMatmulPreferenceCreate,
            cublasLtMatmulPreferenceDestroy,
            cublasLtMatmulPreferenceSetAttribute,
            cublasLtMatmulAlgoGetHeuristic,
            cublasLtMatmul,
        };
        assert_eq!(engine::cuda::libs::CublasLtApi::SYMBOLS.len(), 14);
        assert!(unsafe { (api.cublasLtGetVersion)() } >= engine::cuda::libs::CUBLASLT.min_version);
    }

    #[test]
    fn cublaslt_refuses_what_it_does_not_implement() {
        use lt::cublasLtEpilogue_t as E;
        unsafe {
            // Descriptor attributes: unknown ones, unsupported values, wrong sizes, null buffers.
            let mut desc = null_mut();
            assert_eq!(cublasLtMatmulDescCreate(&mut desc, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32, lt::cudaDataType_t::CUDA_R_32F), NOT_SUPPORTED);
            assert_eq!(cublasLtMatmulDescCreate(&mut desc, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType_t::CUDA_R_16F), NOT_SUPPORTED);
            assert_eq!(cublasLtMatmulDescCreate(null_mut(), lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType_t::CUDA_R_32F), INVALID_VALUE);
            ok(cublasLtMatmulDescCreate(&mut desc, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType_t::CUDA_R_32F));
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_FILL_MODE, &0i32), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_EPILOGUE, &(E::CUBLASLT_EPILOGUE_GELU_BIAS as u32)), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_EPILOGUE, &(E::CUBLASLT_EPILOGUE_BGRADB as u32)), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_POINTER_MODE, &1i32), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_TRANSC, &1i32), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &0x1000u64), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, &(lt::cublasComputeType_t::CUBLAS_COMPUTE_16F as i32)), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(lt::cudaDataType_t::CUDA_R_64F as i32)), NOT_SUPPORTED);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_TRANSA, &7i32), INVALID_VALUE);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_TRANSA, &1i64), INVALID_VALUE);
            assert_eq!(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &1u32), INVALID_VALUE);
            assert_eq!(cublasLtMatmulDescSetAttribute(desc, DA::CUBLASLT_MATMUL_DESC_TRANSA, std::ptr::null(), 4), INVALID_VALUE);
            assert_eq!(cublasLtMatmulDescSetAttribute(null_mut(), DA::CUBLASLT_MATMUL_DESC_TRANSA, &0i32 as *const i32 as *const c_void, 4), INVALID_VALUE);
            ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &0u64));

            // Layouts: unsupported types and orders; a layout is not a descriptor.
            let mut l = null_mut();
            assert_eq!(cublasLtMatrixLayoutCreate(&mut l, lt::cudaDataType_t::CUDA_R_64F, 4, 4, 4), NOT_SUPPORTED);
            assert_eq!(cublasLtMatrixLayoutCreate(&mut l, lt::cudaDataType_t::CUDA_R_8I, 4, 4, 4), NOT_SUPPORTED);
            ok(cublasLtMatrixLayoutCreate(&mut l, lt::cudaDataType_t::CUDA_R_32F, 4, 4, 4));
            assert_eq!(cublasLtMatrixLayoutSetAttribute(l, LA::CUBLASLT_MATRIX_LAYOUT_ORDER, &2i32 as *const i32 as *const c_void, 4), NOT_SUPPORTED);
            assert_eq!(cublasLtMatrixLayoutSetAttribute(l, LA::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &0i32 as *const i32 as *const c_void, 4), INVALID_VALUE);
            assert_eq!(cublasLtMatrixLayoutSetAttribute(l, LA::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &-16i64 as *const i64 as *const c_void, 8), NOT_SUPPORTED);
            assert_eq!(cublasLtMatrixLayoutSetAttribute(l, LA::CUBLASLT_MATRIX_LAYOUT_ROWS, &4u32 as *const u32 as *const c_void, 4), INVALID_VALUE);
            assert_eq!(cublasLtMatmulDescSetAttribute(l as lt::cublasLtMatmulDesc_t, DA::CUBLASLT_MATMUL_DESC_TRANSA, &0i32 as *const i32 as *const c_void, 4), INVALID_VALUE);

            // The heuristic and matmul on problems we cannot run.
            let mut handle = null_mut();
            ok(cublasLtCreate(&mut handle));
            let mut pref = null_mut();
            ok(cublasLtMatmulPreferenceCreate(&mut pref));
            let mut result: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let mut found = -1;
            let (rp, fp) = (&mut result as *mut lt::cublasLtMatmulHeuristicResult_t, &mut found as *mut i32);
            let heuristic = |a, b, c, d| cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, c, d, pref, 1, rp, fp);
            let layout = |t, r: u64, c: u64, ld: i64| {
                let mut l = null_mut();
                ok(cublasLtMatrixLayoutCreate(&mut l, t, r, c, ld));
                l
            };
            let f32t = lt::cudaDataType_t::CUDA_R_32F;
            let bf = lt::cudaDataType_t::CUDA_R_16BF;
            let (a, b, d) = (layout(f32t, 4, 3, 4), layout(f32t, 3, 5, 3), layout(f32t, 4, 5, 4));
            ok(heuristic(a, b, d, d));
            assert_eq!(*fp, 1);
            // K mismatch, ld < rows, mixed input types, f32 in with bf16 out, unequal batches.
            let b_bad = layout(f32t, 2, 5, 2);
            assert_eq!(heuristic(a, b_bad, d, d), INVALID_VALUE);
            assert_eq!(*fp, 0);
            let a_bad_ld = layout(f32t, 4, 3, 3);
            assert_eq!(heuristic(a_bad_ld, b, d, d), INVALID_VALUE);
            let b_bf = layout(bf, 3, 5, 3);
            assert_eq!(heuristic(a, b_bf, d, d), NOT_SUPPORTED);
            let d_bf = layout(bf, 4, 5, 4);
            assert_eq!(heuristic(a, b, d_bf, d_bf), NOT_SUPPORTED);
            let d_batched = layout(f32t, 4, 5, 4);
            set_layout(d_batched, LA::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &2i32);
            assert_eq!(heuristic(a, b, d_batched, d_batched), INVALID_VALUE);
            // Swapped arguments: a descriptor where a layout belongs.
            assert_eq!(heuristic(desc as lt::cublasLtMatrixLayout_t, b, d, d), INVALID_VALUE);
            assert_eq!(cublasLtMatmulAlgoGetHeuristic(null_mut(), desc, a, b, d, d, pref, 1, rp, fp), NOT_INITIALIZED);

            // Matmul: a promised alignment the pointers break, an algorithm not from the
            // heuristic, null pointers, and C in place with another layout than D.
            let av = [1f32; 4 * 3 + 4];
            let bv = [1f32; 3 * 5];
            let mut dv = vec![0f32; 4 * 5 + 4];
            let (alpha, beta) = (1f32, 0f32);
            let al = &alpha as *const f32 as *const c_void;
            let be = &beta as *const f32 as *const c_void;
            let mm = |a_ptr: *const f32, algo: *const lt::cublasLtMatmulAlgo_t, d_ptr: *mut f32, beta: *const c_void, c_desc| {
                cublasLtMatmul(handle, desc, al, a_ptr as *const c_void, a, bv.as_ptr() as *const c_void, b, beta, d_ptr as *const c_void, c_desc, d_ptr as *mut c_void, d, algo, null_mut(), 0, null_mut())
            };
            // The first 16-byte aligned element, and the one after it (4- but not 16-aligned).
            let a16 = av.as_ptr().add((16 - av.as_ptr() as usize % 16) % 16 / 4);
            let misaligned = a16.add(1);
            ok(cublasLtMatmulPreferenceSetAttribute(pref, PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &16u32 as *const u32 as *const c_void, 4));
            for (attr, v) in [(PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, 4u32), (PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, 4), (PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, 4)] {
                ok(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v as *const u32 as *const c_void, 4));
            }
            ok(heuristic(a, b, d, d));
            let algo = (*rp).algo;
            ok(mm(a16, &algo, dv.as_mut_ptr(), be, d));
            assert!(dv[..20].iter().all(|&x| x == 3.0));
            assert_eq!(mm(misaligned, &algo, dv.as_mut_ptr(), be, d), INVALID_VALUE);
            let zero_algo = lt::cublasLtMatmulAlgo_t { data: [0; 8] };
            assert_eq!(mm(a16, &zero_algo, dv.as_mut_ptr(), be, d), INVALID_VALUE);
            assert_eq!(mm(std::ptr::null(), &algo, dv.as_mut_ptr(), be, d), INVALID_VALUE);
            assert_eq!(mm(a16, &algo, dv.as_mut_ptr(), std::ptr::null(), d), INVALID_VALUE);
            let c_other = layout(f32t, 4, 5, 5);
            let one = 1f32;
            assert_eq!(mm(a16, &algo, dv.as_mut_ptr(), &one as *const f32 as *const c_void, c_other), INVALID_VALUE);
            // A promise below the element size finds no algorithm.
            ok(cublasLtMatmulPreferenceSetAttribute(pref, PA::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &2u32 as *const u32 as *const c_void, 4));
            assert_eq!(heuristic(a, b, d, d), NOT_SUPPORTED);
            // The bias epilogue without a bias pointer.
            ok(set_desc(desc, DA::CUBLASLT_MATMUL_DESC_EPILOGUE, &(E::CUBLASLT_EPILOGUE_BIAS as u32)));
            assert_eq!(mm(a16, std::ptr::null(), dv.as_mut_ptr(), be, d), INVALID_VALUE);

            for l in [l, a, b, d, b_bad, a_bad_ld, b_bf, d_bf, d_batched, c_other] {
                ok(cublasLtMatrixLayoutDestroy(l));
            }
            ok(cublasLtMatmulPreferenceDestroy(pref));
            ok(cublasLtMatmulDescDestroy(desc));
            ok(cublasLtDestroy(handle));
            assert_eq!(cublasLtDestroy(null_mut()), NOT_INITIALIZED);
        }
    }
}
