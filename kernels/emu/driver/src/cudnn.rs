//! cuDNN's legacy convolution API (the calls of the engine's `CudnnApi` table, plus the
//! sub-libraries' version checks the loader calls) on the CPU.
//!
//! Device pointers are host addresses and streams are ignored: every call has finished when it
//! returns. Descriptors are boxed Rust structs handed out as raw pointers; a registry of live
//! pointers lets every call refuse a null, destroyed or wrong-kind descriptor with
//! CUDNN_STATUS_BAD_PARAM instead of reading freed memory.
//!
//! The math is cuDNN's documented one, for any 4-D strides, groups, padding, stride and dilation,
//! in cross-correlation and convolution mode, for FLOAT, HALF and BFLOAT16 data with FLOAT
//! compute: y = alpha * conv(x, w) + beta * y, dx = alpha * conv_transpose(dy, w) + beta * dx,
//! dw = alpha * corr(x, dy) + beta * dw. Operands are converted to f32 once, every output
//! element accumulates in f32 and is rounded once (to nearest even) to the output dtype; when
//! beta is 0 the output is not read (as cuDNN: NaNs already there do not leak in). Every
//! algorithm computes the same thing, needs no workspace and is deterministic; the queries offer
//! one algorithm.
//!
//! Anything this does not support (other dtypes, NCHW_VECT_C filters, non-FLOAT compute, an
//! output whose strides make elements overlap) is CUDNN_STATUS_NOT_SUPPORTED; inconsistent
//! descriptors are CUDNN_STATUS_BAD_PARAM. No caller input can make a call panic, and a panic from
//! a bug is caught at the C boundary and reported as CUDNN_STATUS_INTERNAL_ERROR.
//!
//! # Safety (every exported function)
//! Pointers are those of cudnn.h's contract: descriptors come from the matching create call (or
//! are null, which is refused), out-pointers point to writable values of their type, and data
//! pointers address buffers that hold every element their descriptor reaches.

#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cudarc::cudnn::sys as dnn;
use dnn::cudnnStatus_t as St;
use half::{bf16, f16};

/// cuDNN 9.21.0, the version whose headers cudarc's types come from (feature cudnn-09021).
const VERSION: usize = 92100;
/// CUDA 13.0, the runtime the workspace builds cudarc for (feature cuda-13000).
const CUDART_VERSION: usize = 13000;

const OK: St = St::CUDNN_STATUS_SUCCESS;
const BAD: St = St::CUDNN_STATUS_BAD_PARAM;
const UNSUPPORTED: St = St::CUDNN_STATUS_NOT_SUPPORTED;

type R<T> = Result<T, St>;

/// Runs an exported call's body; a panic (a bug here, never caller input) must not unwind into C.
fn run(f: impl FnOnce() -> R<()>) -> St {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => OK,
        Ok(Err(s)) => s,
        Err(_) => St::CUDNN_STATUS_INTERNAL_ERROR,
    }
}

// ---- descriptors and the registry of live ones ------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Handle,
    Tensor,
    Filter,
    Convolution,
}

/// A descriptor type: what its raw pointers are registered as.
trait Object: Copy + 'static {
    const KIND: Kind;
}

#[derive(Clone, Copy)]
struct HandleState {
    /// Kept only to be a real object; streams are ignored.
    _stream: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn of(dt: dnn::cudnnDataType_t) -> R<Elem> {
        match dt {
            dnn::cudnnDataType_t::CUDNN_DATA_FLOAT => Ok(Elem::F32),
            dnn::cudnnDataType_t::CUDNN_DATA_HALF => Ok(Elem::F16),
            dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16 => Ok(Elem::Bf16),
            _ => Err(UNSUPPORTED),
        }
    }
    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::Bf16 => 2,
        }
    }
}

/// A validated 4-D operand: logical dims (NCHW, or KCRS for a filter) and element strides. Its
/// element count and byte extent fit in memory (checked when set), so loops over it cannot
/// overflow.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Layout {
    elem: Elem,
    dims: [usize; 4],
    strides: [usize; 4],
}

impl Layout {
    fn new(elem: Elem, dims: [i32; 4], strides: [i32; 4]) -> R<Layout> {
        let positive = |v: i32| usize::try_from(v).ok().filter(|&v| v > 0).ok_or(BAD);
        let dims = [positive(dims[0])?, positive(dims[1])?, positive(dims[2])?, positive(dims[3])?];
        let strides = [positive(strides[0])?, positive(strides[1])?, positive(strides[2])?, positive(strides[3])?];
        dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or(BAD)?;
        let last = dims.iter().zip(&strides).try_fold(0usize, |a, (&d, &s)| (d - 1).checked_mul(s).and_then(|o| a.checked_add(o))).ok_or(BAD)?;
        let bytes = last.checked_add(1).and_then(|e| e.checked_mul(elem.size())).ok_or(BAD)?;
        if bytes > isize::MAX as usize {
            return Err(BAD);
        }
        Ok(Layout { elem, dims, strides })
    }

    /// The packed strides of a filter in `format` (dims are logical KCRS whatever the format).
    fn filter(elem: Elem, format: dnn::cudnnTensorFormat_t, dims: [i32; 4]) -> R<Layout> {
        let [_, c, h, w] = dims;
        if dims.iter().any(|&d| d <= 0) {
            return Err(BAD);
        }
        let mul = |a: i32, b: i32| a.checked_mul(b).ok_or(BAD);
        let strides = match format {
            dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW => [mul(mul(c, h)?, w)?, mul(h, w)?, w, 1],
            dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC => [mul(mul(c, h)?, w)?, 1, mul(w, c)?, c],
            _ => return Err(UNSUPPORTED),
        };
        Layout::new(elem, dims, strides)
    }

    fn count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether no two elements share an address (checked for outputs: a sufficient condition,
    /// which every packed or padded layout meets).
    fn disjoint(&self) -> bool {
        let mut axes: Vec<(usize, usize)> = self.dims.iter().zip(&self.strides).filter(|(&d, _)| d > 1).map(|(&d, &s)| (s, d)).collect();
        axes.sort_unstable();
        let mut reach = 0usize;
        for (s, d) in axes {
            if s <= reach {
                return false;
            }
            reach += (d - 1) * s;
        }
        true
    }
}

#[derive(Clone, Copy, Default)]
struct TensorDesc {
    layout: Option<Layout>,
}

#[derive(Clone, Copy, Default)]
struct FilterDesc {
    layout: Option<Layout>,
}

#[derive(Clone, Copy)]
struct ConvGeom {
    pad: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    /// CUDNN_CROSS_CORRELATION; otherwise CUDNN_CONVOLUTION (the filter is flipped).
    cross: bool,
    compute: dnn::cudnnDataType_t,
}

#[derive(Clone, Copy)]
struct ConvDesc {
    geom: Option<ConvGeom>,
    groups: usize,
    math: dnn::cudnnMathType_t,
}

impl Object for HandleState {
    const KIND: Kind = Kind::Handle;
}
impl Object for TensorDesc {
    const KIND: Kind = Kind::Tensor;
}
impl Object for FilterDesc {
    const KIND: Kind = Kind::Filter;
}
impl Object for ConvDesc {
    const KIND: Kind = Kind::Convolution;
}

fn live() -> MutexGuard<'static, HashMap<usize, Kind>> {
    static LIVE: OnceLock<Mutex<HashMap<usize, Kind>>> = OnceLock::new();
    // A poisoned lock only means a panic elsewhere (caught there); the map itself stays valid.
    LIVE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

unsafe fn create<T: Object, P>(out: *mut *mut P, value: T) -> R<()> {
    if out.is_null() {
        return Err(BAD);
    }
    let p = Box::into_raw(Box::new(value));
    live().insert(p as usize, T::KIND);
    // SAFETY: `out` is non-null and, by the contract, writable.
    unsafe { *out = p.cast() };
    Ok(())
}

unsafe fn destroy<T: Object, P>(p: *mut P) -> R<()> {
    if p.is_null() {
        return Ok(());
    }
    let mut l = live();
    if l.get(&(p as usize)) != Some(&T::KIND) {
        return Err(BAD);
    }
    l.remove(&(p as usize));
    // SAFETY: registered as a live T, so it came from Box::into_raw in `create::<T>`; removed from
    // the registry above, so it is freed once.
    drop(unsafe { Box::from_raw(p.cast::<T>()) });
    Ok(())
}

/// A copy of the live descriptor `p`.
fn get<T: Object, P>(p: *mut P) -> R<T> {
    let l = live();
    if p.is_null() || l.get(&(p as usize)) != Some(&T::KIND) {
        return Err(BAD);
    }
    // SAFETY: a live T (registered), read under the registry lock, which destroy also takes.
    Ok(unsafe { *p.cast::<T>() })
}

/// Replaces the live descriptor `p` by `f` of it (unchanged when `f` fails).
fn update<T: Object, P>(p: *mut P, f: impl FnOnce(T) -> R<T>) -> R<()> {
    let l = live();
    if p.is_null() || l.get(&(p as usize)) != Some(&T::KIND) {
        return Err(BAD);
    }
    // SAFETY: a live T (registered), accessed under the registry lock, which destroy also takes.
    let slot = unsafe { &mut *p.cast::<T>() };
    *slot = f(*slot)?;
    Ok(())
}

// ---- one convolution, checked -------------------------------------------------------------------

/// Sizes of one convolution: input [n, c, h, w], filter [k, cg, r, s], output [n, k, oh, ow].
#[derive(Clone, Copy, Debug)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    cg: usize,
    kg: usize,
    r: usize,
    s: usize,
    oh: usize,
    ow: usize,
    pad: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

/// cuDNN's output size: 1 + (input + 2 pad - ((k - 1) dilation + 1)) / stride.
fn out_len(input: usize, pad: usize, k: usize, dilation: usize, stride: usize) -> R<usize> {
    let span = (k - 1).checked_mul(dilation).and_then(|v| v.checked_add(1)).ok_or(BAD)?;
    let padded = pad.checked_mul(2).and_then(|v| v.checked_add(input)).ok_or(BAD)?;
    if padded < span {
        return Err(BAD);
    }
    Ok((padded - span) / stride + 1)
}

/// The output size of `x` convolved with `w` under `conv` (cudnnGetConvolution2dForwardOutputDim).
fn output_dims(x: &Layout, w: &Layout, conv: &ConvDesc) -> R<[usize; 4]> {
    let geom = conv.geom.ok_or(BAD)?;
    let [n, c, h, wi] = x.dims;
    let [k, cg, r, s] = w.dims;
    if cg.checked_mul(conv.groups) != Some(c) || k % conv.groups != 0 {
        return Err(BAD);
    }
    let oh = out_len(h, geom.pad[0], r, geom.dilation[0], geom.stride[0])?;
    let ow = out_len(wi, geom.pad[1], s, geom.dilation[1], geom.stride[1])?;
    Ok([n, k, oh, ow])
}

/// A convolution whose descriptors agree: `x` the input (dx for backward data), `w` the filter
/// (dw for backward filter), `y` the output (dy for the backward passes).
#[derive(Clone, Copy, Debug)]
struct Problem {
    x: Layout,
    w: Layout,
    y: Layout,
    g: Geo,
    cross: bool,
    /// The math type reported with the algorithm.
    math: dnn::cudnnMathType_t,
}

fn problem(xd: dnn::cudnnTensorDescriptor_t, wd: dnn::cudnnFilterDescriptor_t, cd: dnn::cudnnConvolutionDescriptor_t, yd: dnn::cudnnTensorDescriptor_t) -> R<Problem> {
    let x = get::<TensorDesc, _>(xd)?.layout.ok_or(BAD)?;
    let w = get::<FilterDesc, _>(wd)?.layout.ok_or(BAD)?;
    let y = get::<TensorDesc, _>(yd)?.layout.ok_or(BAD)?;
    let conv = get::<ConvDesc, _>(cd)?;
    let geom = conv.geom.ok_or(BAD)?;
    if x.elem != w.elem || x.elem != y.elem {
        return Err(BAD);
    }
    if output_dims(&x, &w, &conv)? != y.dims {
        return Err(BAD);
    }
    // HALF or BFLOAT16 compute would round partial sums; DOUBLE is for double data.
    if geom.compute != dnn::cudnnDataType_t::CUDNN_DATA_FLOAT {
        return Err(UNSUPPORTED);
    }
    let [n, c, h, wi] = x.dims;
    let [k, cg, r, s] = w.dims;
    let [_, _, oh, ow] = y.dims;
    let g = Geo { n, c, h, w: wi, k, cg, kg: k / conv.groups, r, s, oh, ow, pad: geom.pad, stride: geom.stride, dilation: geom.dilation };
    // FLOAT data is computed in plain f32: reported as FMA math, since callers that want exact f32
    // (the engine) refuse tensor-core algorithms.
    let math = if x.elem == Elem::F32 { dnn::cudnnMathType_t::CUDNN_FMA_MATH } else { conv.math };
    Ok(Problem { x, w, y, g, cross: geom.cross, math })
}

// ---- data in and out ----------------------------------------------------------------------------

fn zeros(n: usize) -> R<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| St::CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED)?;
    v.resize(n, 0.0);
    Ok(v)
}

fn check_ptr(p: *const c_void, l: &Layout) -> R<()> {
    if p.is_null() {
        return Err(BAD);
    }
    if !(p as usize).is_multiple_of(l.elem.size()) {
        return Err(St::CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER);
    }
    Ok(())
}

/// Calls `f(i, offset)` for every element in logical row-major order (i = 0, 1, ...), offset in
/// elements from the base pointer.
fn each_offset(l: &Layout, mut f: impl FnMut(usize, usize)) {
    let [d0, d1, d2, d3] = l.dims;
    let [s0, s1, s2, s3] = l.strides;
    let mut i = 0;
    for a in 0..d0 {
        for b in 0..d1 {
            for c in 0..d2 {
                let base = a * s0 + b * s1 + c * s2;
                for d in 0..d3 {
                    f(i, base + d * s3);
                    i += 1;
                }
            }
        }
    }
}

/// The operand at `p` as f32 in logical row-major order.
unsafe fn gather(p: *const c_void, l: &Layout) -> R<Vec<f32>> {
    let mut v = zeros(l.count())?;
    // SAFETY (all arms): `p` is aligned for the element type (checked) and, by the contract, every
    // offset the layout reaches is inside the caller's buffer; reads go through raw pointers, so
    // an output aliasing an input is only read here, before anything is written.
    match l.elem {
        Elem::F32 => {
            let p = p.cast::<f32>();
            each_offset(l, |i, o| v[i] = unsafe { p.add(o).read() });
        }
        Elem::F16 => {
            let p = p.cast::<u16>();
            each_offset(l, |i, o| v[i] = f16::from_bits(unsafe { p.add(o).read() }).to_f32());
        }
        Elem::Bf16 => {
            let p = p.cast::<u16>();
            each_offset(l, |i, o| v[i] = bf16::from_bits(unsafe { p.add(o).read() }).to_f32());
        }
    }
    Ok(v)
}

/// Writes `vals` (logical row-major order) to the operand at `p`, rounding each once to its dtype.
unsafe fn scatter(p: *mut c_void, l: &Layout, vals: &[f32]) {
    // SAFETY (all arms): as in `gather`; the layout is disjoint (checked), so each element is
    // written once.
    match l.elem {
        Elem::F32 => {
            let p = p.cast::<f32>();
            each_offset(l, |i, o| unsafe { p.add(o).write(vals[i]) });
        }
        Elem::F16 => {
            let p = p.cast::<u16>();
            each_offset(l, |i, o| unsafe { p.add(o).write(f16::from_f32(vals[i]).to_bits()) });
        }
        Elem::Bf16 => {
            let p = p.cast::<u16>();
            each_offset(l, |i, o| unsafe { p.add(o).write(bf16::from_f32(vals[i]).to_bits()) });
        }
    }
}

/// CUDNN_CONVOLUTION mode is cross-correlation with each [r, s] filter plane reversed in both
/// axes (reversing a row-major plane does exactly that).
fn flip_planes(w: &mut [f32], rs: usize) {
    w.chunks_mut(rs).for_each(|p| p.reverse());
}

/// out = alpha * acc + beta * out, written to `p` (the old output is read only when beta != 0).
unsafe fn finish(p: *mut c_void, l: &Layout, mut acc: Vec<f32>, alpha: f32, beta: f32) -> R<()> {
    if beta != 0.0 {
        // SAFETY: the caller checked `p` against `l`.
        let old = unsafe { gather(p, l)? };
        acc.iter_mut().zip(&old).for_each(|(a, &o)| *a = alpha * *a + beta * o);
    } else if alpha != 1.0 {
        acc.iter_mut().for_each(|a| *a *= alpha);
    }
    // SAFETY: as above.
    unsafe { scatter(p, l, &acc) };
    Ok(())
}

unsafe fn scalars(alpha: *const c_void, beta: *const c_void) -> R<(f32, f32)> {
    if alpha.is_null() || beta.is_null() {
        return Err(BAD);
    }
    // SAFETY: non-null; for FLOAT, HALF and BFLOAT16 data cuDNN's scaling factors are host f32s.
    // Unaligned reads: the caller's f32 need not be aligned in C either.
    Ok(unsafe { (alpha.cast::<f32>().read_unaligned(), beta.cast::<f32>().read_unaligned()) })
}

// ---- the three passes, on f32 in logical row-major order ----------------------------------------

/// The outputs o in lo..hi whose tap t (along one axis) reads inside the input: 0 <= o stride +
/// t dilation - pad < len. Returns (lo, hi, index of the input read by output lo).
fn taps(len: usize, pad: usize, stride: usize, dilation: usize, t: usize, out: usize) -> (usize, usize, usize) {
    let off = (t * dilation) as i64 - pad as i64;
    let (len, stride) = (len as i64, stride as i64);
    let lo = if off >= 0 { 0 } else { (-off + stride - 1) / stride };
    let hi = if len - 1 - off < 0 { 0 } else { (len - 1 - off) / stride + 1 };
    let (lo, hi) = ((lo as usize).min(out), (hi as usize).min(out));
    if lo >= hi {
        return (0, 0, 0);
    }
    (lo, hi, (lo as i64 * stride + off) as usize)
}

/// y[n, k] = sum over the group's channels and taps of w[k, c, i, j] * x[n, c, shifted].
fn forward(g: &Geo, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (hw, ohw, rs) = (g.h * g.w, g.oh * g.ow, g.r * g.s);
    let [sh, sw] = g.stride;
    for n in 0..g.n {
        for k in 0..g.k {
            let group = k / g.kg;
            let acc = &mut y[(n * g.k + k) * ohw..][..ohw];
            for c in 0..g.cg {
                let xp = &x[(n * g.c + group * g.cg + c) * hw..][..hw];
                let wp = &w[(k * g.cg + c) * rs..][..rs];
                for i in 0..g.r {
                    let (ylo, yhi, iy0) = taps(g.h, g.pad[0], sh, g.dilation[0], i, g.oh);
                    for j in 0..g.s {
                        let (xlo, xhi, ix0) = taps(g.w, g.pad[1], sw, g.dilation[1], j, g.ow);
                        if xlo == xhi {
                            continue;
                        }
                        let wv = wp[i * g.s + j];
                        for (oy, iy) in (ylo..yhi).zip((iy0..).step_by(sh)) {
                            let xrow = &xp[iy * g.w..][..g.w];
                            let arow = &mut acc[oy * g.ow..][xlo..xhi];
                            if sw == 1 {
                                arow.iter_mut().zip(&xrow[ix0..]).for_each(|(a, &v)| *a += wv * v);
                            } else {
                                arow.iter_mut().zip(xrow[ix0..].iter().step_by(sw)).for_each(|(a, &v)| *a += wv * v);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// dx[n, c] = sum over the group's output channels and taps of w[k, c, i, j] * dy[n, k, shifted]:
/// the adjoint of `forward` in x, accumulated by scattering each dy row.
fn backward_data(g: &Geo, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (hw, ohw, rs) = (g.h * g.w, g.oh * g.ow, g.r * g.s);
    let [sh, sw] = g.stride;
    for n in 0..g.n {
        for k in 0..g.k {
            let group = k / g.kg;
            let dyp = &dy[(n * g.k + k) * ohw..][..ohw];
            for c in 0..g.cg {
                let dxp = &mut dx[(n * g.c + group * g.cg + c) * hw..][..hw];
                let wp = &w[(k * g.cg + c) * rs..][..rs];
                for i in 0..g.r {
                    let (ylo, yhi, iy0) = taps(g.h, g.pad[0], sh, g.dilation[0], i, g.oh);
                    for j in 0..g.s {
                        let (xlo, xhi, ix0) = taps(g.w, g.pad[1], sw, g.dilation[1], j, g.ow);
                        if xlo == xhi {
                            continue;
                        }
                        let wv = wp[i * g.s + j];
                        for (oy, iy) in (ylo..yhi).zip((iy0..).step_by(sh)) {
                            let dyrow = &dyp[oy * g.ow..][xlo..xhi];
                            let dxrow = &mut dxp[iy * g.w..][..g.w];
                            if sw == 1 {
                                dxrow[ix0..].iter_mut().zip(dyrow).for_each(|(d, &v)| *d += wv * v);
                            } else {
                                dxrow[ix0..].iter_mut().step_by(sw).zip(dyrow).for_each(|(d, &v)| *d += wv * v);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// f32 dot product with eight partial sums (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for ((l, &a), &b) in lanes.iter_mut().zip(x).zip(y) {
            *l += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// dw[k, c, i, j] = sum over images and output pixels of x[n, c, shifted] * dy[n, k, pixel].
fn backward_filter(g: &Geo, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (hw, ohw, rs) = (g.h * g.w, g.oh * g.ow, g.r * g.s);
    let [sh, sw] = g.stride;
    for k in 0..g.k {
        let group = k / g.kg;
        for c in 0..g.cg {
            for i in 0..g.r {
                let (ylo, yhi, iy0) = taps(g.h, g.pad[0], sh, g.dilation[0], i, g.oh);
                for j in 0..g.s {
                    let (xlo, xhi, ix0) = taps(g.w, g.pad[1], sw, g.dilation[1], j, g.ow);
                    let mut sum = 0f32;
                    if xlo < xhi {
                        for n in 0..g.n {
                            let xp = &x[(n * g.c + group * g.cg + c) * hw..][..hw];
                            let dyp = &dy[(n * g.k + k) * ohw..][..ohw];
                            for (oy, iy) in (ylo..yhi).zip((iy0..).step_by(sh)) {
                                let xrow = &xp[iy * g.w..][..g.w];
                                let dyrow = &dyp[oy * g.ow..][xlo..xhi];
                                sum += if sw == 1 { dot(&xrow[ix0..], dyrow) } else { xrow[ix0..].iter().step_by(sw).zip(dyrow).map(|(a, b)| a * b).sum::<f32>() };
                            }
                        }
                    }
                    dw[(k * g.cg + c) * rs + i * g.s + j] = sum;
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// Runs `pass` of `p`: `a` and `b` are its inputs in cuDNN's argument order (forward: x, w;
/// backward data: w, dy; backward filter: x, dy), `out` its output.
unsafe fn execute(pass: Pass, handle: dnn::cudnnHandle_t, p: &Problem, alpha: *const c_void, beta: *const c_void, a: *const c_void, b: *const c_void, out: *mut c_void) -> R<()> {
    get::<HandleState, _>(handle)?;
    // SAFETY: host scalars by the contract.
    let (alpha, beta) = unsafe { scalars(alpha, beta)? };
    let (la, lb, lo) = match pass {
        Pass::Forward => (&p.x, &p.w, &p.y),
        Pass::BackwardData => (&p.w, &p.y, &p.x),
        Pass::BackwardFilter => (&p.x, &p.y, &p.w),
    };
    check_ptr(a, la)?;
    check_ptr(b, lb)?;
    check_ptr(out, lo)?;
    if !lo.disjoint() {
        return Err(UNSUPPORTED);
    }
    if crate::driver::skip_kernels() {
        return Ok(());
    }
    let rs = p.g.r * p.g.s;
    // SAFETY: pointers checked against their layouts above; the contract covers the extents.
    unsafe {
        let (va, vb) = (gather(a, la)?, gather(b, lb)?);
        let mut acc = zeros(lo.count())?;
        match pass {
            Pass::Forward => {
                let mut w = vb;
                if !p.cross {
                    flip_planes(&mut w, rs);
                }
                forward(&p.g, &va, &w, &mut acc);
            }
            Pass::BackwardData => {
                let mut w = va;
                if !p.cross {
                    flip_planes(&mut w, rs);
                }
                backward_data(&p.g, &w, &vb, &mut acc);
            }
            Pass::BackwardFilter => {
                backward_filter(&p.g, &va, &vb, &mut acc);
                if !p.cross {
                    flip_planes(&mut acc, rs);
                }
            }
        }
        finish(out, lo, acc, alpha, beta)
    }
}

/// The one algorithm offered for `problem`: written to perf[0] by `make(status, math)`. A
/// problem this emulator cannot run is listed with its NOT_SUPPORTED status (as cuDNN lists
/// algorithms that do not apply); inconsistent descriptors fail the call.
unsafe fn offer<P>(handle: dnn::cudnnHandle_t, problem: R<Problem>, requested: i32, returned: *mut i32, perf: *mut P, make: impl FnOnce(St, dnn::cudnnMathType_t) -> P) -> R<()> {
    get::<HandleState, _>(handle)?;
    if requested < 1 || returned.is_null() || perf.is_null() {
        return Err(BAD);
    }
    let (status, math) = match problem {
        Ok(p) => (OK, p.math),
        Err(UNSUPPORTED) => (UNSUPPORTED, dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH),
        Err(e) => return Err(e),
    };
    // SAFETY: non-null out-pointers with room for `requested` >= 1 results, by the contract.
    unsafe {
        perf.write(make(status, math));
        returned.write(1);
    }
    Ok(())
}

unsafe fn no_workspace(handle: dnn::cudnnHandle_t, problem: R<Problem>, size: *mut usize) -> R<()> {
    get::<HandleState, _>(handle)?;
    problem?;
    if size.is_null() {
        return Err(BAD);
    }
    // SAFETY: non-null out-pointer.
    unsafe { size.write(0) };
    Ok(())
}

fn need(p: *const c_void) -> R<()> {
    if p.is_null() {
        Err(BAD)
    } else {
        Ok(())
    }
}

// ---- the exported API ---------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cudnnGetVersion() -> usize {
    VERSION
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetCudartVersion() -> usize {
    CUDART_VERSION
}

/// The sub-libraries' checks (libcudnn_graph/ops/cnn.so.9 are this same library).
#[no_mangle]
pub unsafe extern "C" fn cudnnGraphVersionCheck() -> dnn::cudnnStatus_t {
    OK
}

#[no_mangle]
pub unsafe extern "C" fn cudnnOpsVersionCheck() -> dnn::cudnnStatus_t {
    OK
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCnnVersionCheck() -> dnn::cudnnStatus_t {
    OK
}

macro_rules! status_names {
    ($s:expr; $($v:ident),* $(,)?) => {
        match $s {
            $(St::$v => concat!(stringify!($v), "\0"),)*
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetErrorString(status: dnn::cudnnStatus_t) -> *const c_char {
    let name: &'static str = status_names!(status;
        CUDNN_STATUS_SUCCESS, CUDNN_STATUS_NOT_INITIALIZED, CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH,
        CUDNN_STATUS_SERIALIZATION_VERSION_MISMATCH, CUDNN_STATUS_DEPRECATED, CUDNN_STATUS_LICENSE_ERROR,
        CUDNN_STATUS_RUNTIME_IN_PROGRESS, CUDNN_STATUS_RUNTIME_FP_OVERFLOW, CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED,
        CUDNN_STATUS_BAD_PARAM, CUDNN_STATUS_BAD_PARAM_NULL_POINTER, CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER,
        CUDNN_STATUS_BAD_PARAM_NOT_FINALIZED, CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND, CUDNN_STATUS_BAD_PARAM_SIZE_INSUFFICIENT,
        CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH, CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH, CUDNN_STATUS_BAD_PARAM_DUPLICATED_ENTRIES,
        CUDNN_STATUS_BAD_PARAM_ATTRIBUTE_TYPE, CUDNN_STATUS_BAD_PARAM_CUDA_GRAPH_MISMATCH, CUDNN_STATUS_BAD_PARAM_DESCRIPTOR_TYPE,
        CUDNN_STATUS_NOT_SUPPORTED, CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN, CUDNN_STATUS_NOT_SUPPORTED_SHAPE,
        CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE, CUDNN_STATUS_NOT_SUPPORTED_LAYOUT, CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER,
        CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART, CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH,
        CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING, CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE,
        CUDNN_STATUS_NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT, CUDNN_STATUS_NOT_SUPPORTED_PADDING,
        CUDNN_STATUS_NOT_SUPPORTED_BAD_LAUNCH_PARAM, CUDNN_STATUS_NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API,
        CUDNN_STATUS_NOT_SUPPORTED_INVALID_DYNAMIC_SHAPE, CUDNN_STATUS_INTERNAL_ERROR, CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED,
        CUDNN_STATUS_INTERNAL_ERROR_UNEXPECTED_VALUE, CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED,
        CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED, CUDNN_STATUS_INTERNAL_ERROR_BAD_LAUNCH_PARAM,
        CUDNN_STATUS_INTERNAL_ERROR_TEXTURE_CREATION_FAILED, CUDNN_STATUS_EXECUTION_FAILED, CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER,
        CUDNN_STATUS_EXECUTION_FAILED_CUBLAS, CUDNN_STATUS_EXECUTION_FAILED_CUDART, CUDNN_STATUS_EXECUTION_FAILED_CURAND,
        CUDNN_STATUS_INVALID_VALUE,
    );
    name.as_ptr().cast()
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreate(handle: *mut dnn::cudnnHandle_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { create(handle, HandleState { _stream: 0 }) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroy(handle: dnn::cudnnHandle_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { destroy::<HandleState, _>(handle) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetStream(handle: dnn::cudnnHandle_t, stream: dnn::cudaStream_t) -> dnn::cudnnStatus_t {
    run(|| update::<HandleState, _>(handle, |_| Ok(HandleState { _stream: stream as usize })))
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreateTensorDescriptor(desc: *mut dnn::cudnnTensorDescriptor_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { create(desc, TensorDesc::default()) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetTensor4dDescriptorEx(desc: dnn::cudnnTensorDescriptor_t, data_type: dnn::cudnnDataType_t, n: i32, c: i32, h: i32, w: i32, n_stride: i32, c_stride: i32, h_stride: i32, w_stride: i32) -> dnn::cudnnStatus_t {
    run(|| {
        let layout = Layout::new(Elem::of(data_type)?, [n, c, h, w], [n_stride, c_stride, h_stride, w_stride])?;
        update::<TensorDesc, _>(desc, |_| Ok(TensorDesc { layout: Some(layout) }))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyTensorDescriptor(desc: dnn::cudnnTensorDescriptor_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { destroy::<TensorDesc, _>(desc) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreateFilterDescriptor(desc: *mut dnn::cudnnFilterDescriptor_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { create(desc, FilterDesc::default()) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetFilter4dDescriptor(desc: dnn::cudnnFilterDescriptor_t, data_type: dnn::cudnnDataType_t, format: dnn::cudnnTensorFormat_t, k: i32, c: i32, h: i32, w: i32) -> dnn::cudnnStatus_t {
    run(|| {
        let layout = Layout::filter(Elem::of(data_type)?, format, [k, c, h, w])?;
        update::<FilterDesc, _>(desc, |_| Ok(FilterDesc { layout: Some(layout) }))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyFilterDescriptor(desc: dnn::cudnnFilterDescriptor_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { destroy::<FilterDesc, _>(desc) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreateConvolutionDescriptor(desc: *mut dnn::cudnnConvolutionDescriptor_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { create(desc, ConvDesc { geom: None, groups: 1, math: dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH }) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolution2dDescriptor(desc: dnn::cudnnConvolutionDescriptor_t, pad_h: i32, pad_w: i32, u: i32, v: i32, dilation_h: i32, dilation_w: i32, mode: dnn::cudnnConvolutionMode_t, compute_type: dnn::cudnnDataType_t) -> dnn::cudnnStatus_t {
    run(|| {
        let non_negative = |x: i32| usize::try_from(x).map_err(|_| BAD);
        let positive = |x: i32| usize::try_from(x).ok().filter(|&x| x > 0).ok_or(BAD);
        use dnn::cudnnDataType_t::*;
        if !matches!(compute_type, CUDNN_DATA_FLOAT | CUDNN_DATA_HALF | CUDNN_DATA_BFLOAT16 | CUDNN_DATA_DOUBLE) {
            return Err(BAD);
        }
        let geom = ConvGeom {
            pad: [non_negative(pad_h)?, non_negative(pad_w)?],
            stride: [positive(u)?, positive(v)?],
            dilation: [positive(dilation_h)?, positive(dilation_w)?],
            cross: mode == dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            compute: compute_type,
        };
        update::<ConvDesc, _>(desc, |d| Ok(ConvDesc { geom: Some(geom), ..d }))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolutionGroupCount(desc: dnn::cudnnConvolutionDescriptor_t, group_count: i32) -> dnn::cudnnStatus_t {
    run(|| {
        let groups = usize::try_from(group_count).ok().filter(|&g| g > 0).ok_or(BAD)?;
        update::<ConvDesc, _>(desc, |d| Ok(ConvDesc { groups, ..d }))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolutionMathType(desc: dnn::cudnnConvolutionDescriptor_t, math_type: dnn::cudnnMathType_t) -> dnn::cudnnStatus_t {
    run(|| update::<ConvDesc, _>(desc, |d| Ok(ConvDesc { math: math_type, ..d })))
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyConvolutionDescriptor(desc: dnn::cudnnConvolutionDescriptor_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { destroy::<ConvDesc, _>(desc) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolution2dForwardOutputDim(conv_desc: dnn::cudnnConvolutionDescriptor_t, input_desc: dnn::cudnnTensorDescriptor_t, filter_desc: dnn::cudnnFilterDescriptor_t, n: *mut i32, c: *mut i32, h: *mut i32, w: *mut i32) -> dnn::cudnnStatus_t {
    run(|| {
        let conv = get::<ConvDesc, _>(conv_desc)?;
        let x = get::<TensorDesc, _>(input_desc)?.layout.ok_or(BAD)?;
        let f = get::<FilterDesc, _>(filter_desc)?.layout.ok_or(BAD)?;
        if n.is_null() || c.is_null() || h.is_null() || w.is_null() {
            return Err(BAD);
        }
        let dims = output_dims(&x, &f, &conv)?;
        let [dn, dc, dh, dw] = dims.map(|d| i32::try_from(d).map_err(|_| BAD));
        // SAFETY: non-null out-pointers, writable by the contract.
        unsafe {
            n.write(dn?);
            c.write(dc?);
            h.write(dh?);
            w.write(dw?);
        }
        Ok(())
    })
}

fn fwd_perf(algo: dnn::cudnnConvolutionFwdAlgo_t) -> impl FnOnce(St, dnn::cudnnMathType_t) -> dnn::cudnnConvolutionFwdAlgoPerf_t {
    move |status, mathType| dnn::cudnnConvolutionFwdAlgoPerf_t { algo, status, time: 0.0, memory: 0, determinism: dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC, mathType, reserved: [0; 3] }
}

fn bwd_data_perf(algo: dnn::cudnnConvolutionBwdDataAlgo_t) -> impl FnOnce(St, dnn::cudnnMathType_t) -> dnn::cudnnConvolutionBwdDataAlgoPerf_t {
    move |status, mathType| dnn::cudnnConvolutionBwdDataAlgoPerf_t { algo, status, time: 0.0, memory: 0, determinism: dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC, mathType, reserved: [0; 3] }
}

fn bwd_filter_perf(algo: dnn::cudnnConvolutionBwdFilterAlgo_t) -> impl FnOnce(St, dnn::cudnnMathType_t) -> dnn::cudnnConvolutionBwdFilterAlgoPerf_t {
    move |status, mathType| dnn::cudnnConvolutionBwdFilterAlgoPerf_t { algo, status, time: 0.0, memory: 0, determinism: dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC, mathType, reserved: [0; 3] }
}

/// The offered algorithms: those cuDNN itself documents as deterministic.
const FWD_ALGO: dnn::cudnnConvolutionFwdAlgo_t = dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
const BWD_DATA_ALGO: dnn::cudnnConvolutionBwdDataAlgo_t = dnn::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1;
const BWD_FILTER_ALGO: dnn::cudnnConvolutionBwdFilterAlgo_t = dnn::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1;

fn fwd_algo_ok(a: dnn::cudnnConvolutionFwdAlgo_t) -> R<()> {
    if a == dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT {
        Err(BAD)
    } else {
        Ok(())
    }
}

fn bwd_data_algo_ok(a: dnn::cudnnConvolutionBwdDataAlgo_t) -> R<()> {
    if a == dnn::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT {
        Err(BAD)
    } else {
        Ok(())
    }
}

fn bwd_filter_algo_ok(a: dnn::cudnnConvolutionBwdFilterAlgo_t) -> R<()> {
    if a == dnn::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT {
        Err(BAD)
    } else {
        Ok(())
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionForwardAlgorithm_v7(handle: dnn::cudnnHandle_t, x_desc: dnn::cudnnTensorDescriptor_t, w_desc: dnn::cudnnFilterDescriptor_t, conv_desc: dnn::cudnnConvolutionDescriptor_t, y_desc: dnn::cudnnTensorDescriptor_t, requested: i32, returned: *mut i32, perf: *mut dnn::cudnnConvolutionFwdAlgoPerf_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { offer(handle, problem(x_desc, w_desc, conv_desc, y_desc), requested, returned, perf, fwd_perf(FWD_ALGO)) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionForwardWorkspaceSize(handle: dnn::cudnnHandle_t, x_desc: dnn::cudnnTensorDescriptor_t, w_desc: dnn::cudnnFilterDescriptor_t, conv_desc: dnn::cudnnConvolutionDescriptor_t, y_desc: dnn::cudnnTensorDescriptor_t, algo: dnn::cudnnConvolutionFwdAlgo_t, size: *mut usize) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        fwd_algo_ok(algo)?;
        no_workspace(handle, problem(x_desc, w_desc, conv_desc, y_desc), size)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnConvolutionForward(handle: dnn::cudnnHandle_t, alpha: *const c_void, x_desc: dnn::cudnnTensorDescriptor_t, x: *const c_void, w_desc: dnn::cudnnFilterDescriptor_t, w: *const c_void, conv_desc: dnn::cudnnConvolutionDescriptor_t, algo: dnn::cudnnConvolutionFwdAlgo_t, _workspace: *mut c_void, _workspace_size: usize, beta: *const c_void, y_desc: dnn::cudnnTensorDescriptor_t, y: *mut c_void) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        fwd_algo_ok(algo)?;
        let p = problem(x_desc, w_desc, conv_desc, y_desc)?;
        execute(Pass::Forward, handle, &p, alpha, beta, x, w, y)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataAlgorithm_v7(handle: dnn::cudnnHandle_t, w_desc: dnn::cudnnFilterDescriptor_t, dy_desc: dnn::cudnnTensorDescriptor_t, conv_desc: dnn::cudnnConvolutionDescriptor_t, dx_desc: dnn::cudnnTensorDescriptor_t, requested: i32, returned: *mut i32, perf: *mut dnn::cudnnConvolutionBwdDataAlgoPerf_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { offer(handle, problem(dx_desc, w_desc, conv_desc, dy_desc), requested, returned, perf, bwd_data_perf(BWD_DATA_ALGO)) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataWorkspaceSize(handle: dnn::cudnnHandle_t, w_desc: dnn::cudnnFilterDescriptor_t, dy_desc: dnn::cudnnTensorDescriptor_t, conv_desc: dnn::cudnnConvolutionDescriptor_t, dx_desc: dnn::cudnnTensorDescriptor_t, algo: dnn::cudnnConvolutionBwdDataAlgo_t, size: *mut usize) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        bwd_data_algo_ok(algo)?;
        no_workspace(handle, problem(dx_desc, w_desc, conv_desc, dy_desc), size)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnConvolutionBackwardData(handle: dnn::cudnnHandle_t, alpha: *const c_void, w_desc: dnn::cudnnFilterDescriptor_t, w: *const c_void, dy_desc: dnn::cudnnTensorDescriptor_t, dy: *const c_void, conv_desc: dnn::cudnnConvolutionDescriptor_t, algo: dnn::cudnnConvolutionBwdDataAlgo_t, _workspace: *mut c_void, _workspace_size: usize, beta: *const c_void, dx_desc: dnn::cudnnTensorDescriptor_t, dx: *mut c_void) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        bwd_data_algo_ok(algo)?;
        let p = problem(dx_desc, w_desc, conv_desc, dy_desc)?;
        execute(Pass::BackwardData, handle, &p, alpha, beta, w, dy, dx)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterAlgorithm_v7(handle: dnn::cudnnHandle_t, x_desc: dnn::cudnnTensorDescriptor_t, dy_desc: dnn::cudnnTensorDescriptor_t, conv_desc: dnn::cudnnConvolutionDescriptor_t, dw_desc: dnn::cudnnFilterDescriptor_t, requested: i32, returned: *mut i32, perf: *mut dnn::cudnnConvolutionBwdFilterAlgoPerf_t) -> dnn::cudnnStatus_t {
    run(|| unsafe { offer(handle, problem(x_desc, dw_desc, conv_desc, dy_desc), requested, returned, perf, bwd_filter_perf(BWD_FILTER_ALGO)) })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterWorkspaceSize(handle: dnn::cudnnHandle_t, x_desc: dnn::cudnnTensorDescriptor_t, dy_desc: dnn::cudnnTensorDescriptor_t, conv_desc: dnn::cudnnConvolutionDescriptor_t, dw_desc: dnn::cudnnFilterDescriptor_t, algo: dnn::cudnnConvolutionBwdFilterAlgo_t, size: *mut usize) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        bwd_filter_algo_ok(algo)?;
        no_workspace(handle, problem(x_desc, dw_desc, conv_desc, dy_desc), size)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnConvolutionBackwardFilter(handle: dnn::cudnnHandle_t, alpha: *const c_void, x_desc: dnn::cudnnTensorDescriptor_t, x: *const c_void, dy_desc: dnn::cudnnTensorDescriptor_t, dy: *const c_void, conv_desc: dnn::cudnnConvolutionDescriptor_t, algo: dnn::cudnnConvolutionBwdFilterAlgo_t, _workspace: *mut c_void, _workspace_size: usize, beta: *const c_void, dw_desc: dnn::cudnnFilterDescriptor_t, dw: *mut c_void) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        bwd_filter_algo_ok(algo)?;
        let p = problem(x_desc, dw_desc, conv_desc, dy_desc)?;
        execute(Pass::BackwardFilter, handle, &p, alpha, beta, x, dy, dw)
    })
}

// The Find*Ex calls would time trial runs on the given buffers; with one algorithm there is
// nothing to time, so the buffers are only checked (the output is left as it was, which cuDNN
// allows: the caller overwrites it).

#[no_mangle]
pub unsafe extern "C" fn cudnnFindConvolutionForwardAlgorithmEx(handle: dnn::cudnnHandle_t, x_desc: dnn::cudnnTensorDescriptor_t, x: *const c_void, w_desc: dnn::cudnnFilterDescriptor_t, w: *const c_void, conv_desc: dnn::cudnnConvolutionDescriptor_t, y_desc: dnn::cudnnTensorDescriptor_t, y: *mut c_void, requested: i32, returned: *mut i32, perf: *mut dnn::cudnnConvolutionFwdAlgoPerf_t, _workspace: *mut c_void, _workspace_size: usize) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        need(x)?;
        need(w)?;
        need(y)?;
        offer(handle, problem(x_desc, w_desc, conv_desc, y_desc), requested, returned, perf, fwd_perf(FWD_ALGO))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnFindConvolutionBackwardDataAlgorithmEx(handle: dnn::cudnnHandle_t, w_desc: dnn::cudnnFilterDescriptor_t, w: *const c_void, dy_desc: dnn::cudnnTensorDescriptor_t, dy: *const c_void, conv_desc: dnn::cudnnConvolutionDescriptor_t, dx_desc: dnn::cudnnTensorDescriptor_t, dx: *mut c_void, requested: i32, returned: *mut i32, perf: *mut dnn::cudnnConvolutionBwdDataAlgoPerf_t, _workspace: *mut c_void, _workspace_size: usize) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        need(w)?;
        need(dy)?;
        need(dx)?;
        offer(handle, problem(dx_desc, w_desc, conv_desc, dy_desc), requested, returned, perf, bwd_data_perf(BWD_DATA_ALGO))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudnnFindConvolutionBackwardFilterAlgorithmEx(handle: dnn::cudnnHandle_t, x_desc: dnn::cudnnTensorDescriptor_t, x: *const c_void, dy_desc: dnn::cudnnTensorDescriptor_t, dy: *const c_void, conv_desc: dnn::cudnnConvolutionDescriptor_t, dw_desc: dnn::cudnnFilterDescriptor_t, dw: *mut c_void, requested: i32, returned: *mut i32, perf: *mut dnn::cudnnConvolutionBwdFilterAlgoPerf_t, _workspace: *mut c_void, _workspace_size: usize) -> dnn::cudnnStatus_t {
    run(|| unsafe {
        need(x)?;
        need(dy)?;
        need(dw)?;
        offer(handle, problem(x_desc, dw_desc, conv_desc, dy_desc), requested, returned, perf, bwd_filter_perf(BWD_FILTER_ALGO))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{Conv2dParams, Device, Tensor};
    use std::ptr::null_mut;

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Ty {
        F32,
        Bf16,
        F16,
    }

    impl Ty {
        fn dt(self) -> dnn::cudnnDataType_t {
            match self {
                Ty::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                Ty::Bf16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
                Ty::F16 => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
            }
        }
        fn round(self, v: f32) -> f32 {
            match self {
                Ty::F32 => v,
                Ty::Bf16 => bf16::from_f32(v).to_f32(),
                Ty::F16 => f16::from_f32(v).to_f32(),
            }
        }
        /// Allowed error relative to the value: one unit in the last place of the output dtype
        /// (a different f32 summation order may round to the neighbour), or f32 noise.
        fn rel_tol(self) -> f32 {
            match self {
                Ty::F32 => 1e-5,
                Ty::Bf16 => 1.0 / 128.0,
                Ty::F16 => 1.0 / 1024.0,
            }
        }
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Mem {
        Nchw,
        Nhwc,
        /// NCHW with gaps after rows, planes and images.
        Padded,
    }

    fn strides(shape: [usize; 4], m: Mem) -> [usize; 4] {
        let [_, c, h, w] = shape;
        match m {
            Mem::Nchw => [c * h * w, h * w, w, 1],
            Mem::Nhwc => [h * w * c, 1, w * c, c],
            Mem::Padded => {
                let (row, plane) = (w + 2, (w + 2) * h + 3);
                [plane * c + 5, plane, row, 1]
            }
        }
    }

    fn offsets(shape: [usize; 4], strides: [usize; 4]) -> Vec<usize> {
        let mut v = Vec::new();
        for a in 0..shape[0] {
            for b in 0..shape[1] {
                for c in 0..shape[2] {
                    for d in 0..shape[3] {
                        v.push(a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3]);
                    }
                }
            }
        }
        v
    }

    /// What the gaps of a padded buffer hold; exact in every dtype, so a change is visible.
    const FILL: f32 = 1024.0;

    /// An operand in memory: physical elements (f32, or 16-bit patterns) at strided offsets.
    struct Buf {
        ty: Ty,
        shape: [usize; 4],
        strides: [usize; 4],
        f: Vec<f32>,
        h: Vec<u16>,
    }

    impl Buf {
        fn new(ty: Ty, shape: [usize; 4], strides: [usize; 4], logical: &[f32]) -> Buf {
            let offs = offsets(shape, strides);
            let mut phys = vec![FILL; offs.iter().max().unwrap() + 1];
            for (&o, &v) in offs.iter().zip(logical) {
                phys[o] = v;
            }
            let h = match ty {
                Ty::F32 => Vec::new(),
                Ty::Bf16 => phys.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(),
                Ty::F16 => phys.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
            };
            let f = if ty == Ty::F32 { phys } else { Vec::new() };
            Buf { ty, shape, strides, f, h }
        }
        fn ptr(&mut self) -> *mut c_void {
            if self.ty == Ty::F32 {
                self.f.as_mut_ptr().cast()
            } else {
                self.h.as_mut_ptr().cast()
            }
        }
        fn phys(&self) -> Vec<f32> {
            match self.ty {
                Ty::F32 => self.f.clone(),
                Ty::Bf16 => self.h.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
                Ty::F16 => self.h.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
            }
        }
        fn logical(&self) -> Vec<f32> {
            let p = self.phys();
            offsets(self.shape, self.strides).iter().map(|&o| p[o]).collect()
        }
        /// Whether every element outside the operand still holds FILL.
        fn gaps_untouched(&self) -> bool {
            let offs: std::collections::HashSet<usize> = offsets(self.shape, self.strides).into_iter().collect();
            self.phys().iter().enumerate().all(|(i, &v)| offs.contains(&i) || v == FILL)
        }
    }

    struct Td(dnn::cudnnTensorDescriptor_t);
    impl Td {
        fn new(ty: Ty, shape: [usize; 4], s: [usize; 4]) -> Td {
            let mut d = null_mut();
            unsafe {
                assert_eq!(cudnnCreateTensorDescriptor(&mut d), OK);
                let [n, c, h, w] = shape.map(|v| v as i32);
                let [sn, sc, sh, sw] = s.map(|v| v as i32);
                assert_eq!(cudnnSetTensor4dDescriptorEx(d, ty.dt(), n, c, h, w, sn, sc, sh, sw), OK);
            }
            Td(d)
        }
    }
    impl Drop for Td {
        fn drop(&mut self) {
            assert_eq!(unsafe { cudnnDestroyTensorDescriptor(self.0) }, OK);
        }
    }

    struct Fd(dnn::cudnnFilterDescriptor_t);
    impl Fd {
        fn new(ty: Ty, shape: [usize; 4], nhwc: bool) -> Fd {
            let mut d = null_mut();
            let format = if nhwc { dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC } else { dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW };
            unsafe {
                assert_eq!(cudnnCreateFilterDescriptor(&mut d), OK);
                let [k, c, h, w] = shape.map(|v| v as i32);
                assert_eq!(cudnnSetFilter4dDescriptor(d, ty.dt(), format, k, c, h, w), OK);
            }
            Fd(d)
        }
    }
    impl Drop for Fd {
        fn drop(&mut self) {
            assert_eq!(unsafe { cudnnDestroyFilterDescriptor(self.0) }, OK);
        }
    }

    struct Cd(dnn::cudnnConvolutionDescriptor_t);
    impl Cd {
        fn new(p: Conv2dParams, cross: bool) -> Cd {
            Cd::with_compute(p, cross, dnn::cudnnDataType_t::CUDNN_DATA_FLOAT)
        }
        fn with_compute(p: Conv2dParams, cross: bool, compute: dnn::cudnnDataType_t) -> Cd {
            let mut d = null_mut();
            let mode = if cross { dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION } else { dnn::cudnnConvolutionMode_t::CUDNN_CONVOLUTION };
            let i = |v: usize| v as i32;
            unsafe {
                assert_eq!(cudnnCreateConvolutionDescriptor(&mut d), OK);
                assert_eq!(cudnnSetConvolution2dDescriptor(d, i(p.padding[0]), i(p.padding[1]), i(p.stride[0]), i(p.stride[1]), i(p.dilation[0]), i(p.dilation[1]), mode, compute), OK);
                assert_eq!(cudnnSetConvolutionGroupCount(d, i(p.groups)), OK);
                assert_eq!(cudnnSetConvolutionMathType(d, dnn::cudnnMathType_t::CUDNN_FMA_MATH), OK);
            }
            Cd(d)
        }
    }
    impl Drop for Cd {
        fn drop(&mut self) {
            assert_eq!(unsafe { cudnnDestroyConvolutionDescriptor(self.0) }, OK);
        }
    }

    struct Hd(dnn::cudnnHandle_t);
    impl Hd {
        fn new() -> Hd {
            let mut h = null_mut();
            unsafe {
                assert_eq!(cudnnCreate(&mut h), OK);
                assert_eq!(cudnnSetStream(h, null_mut()), OK);
            }
            Hd(h)
        }
    }
    impl Drop for Hd {
        fn drop(&mut self) {
            assert_eq!(unsafe { cudnnDestroy(self.0) }, OK);
        }
    }

    /// Deterministic values in [-1, 1), exact in `ty`.
    fn values(n: usize, seed: u64, ty: Ty) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ty.round(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    fn flip(w: &[f32], rs: usize) -> Vec<f32> {
        let mut w = w.to_vec();
        w.chunks_mut(rs).for_each(|p| p.reverse());
        w
    }

    fn tensor(v: &[f32], shape: [usize; 4]) -> Tensor {
        Tensor::from_vec(v.to_vec(), &shape, Device::Cpu).unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], ty: Ty, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = w.abs() * ty.rel_tol() + 2e-5;
            assert!((g - w).abs() <= tol, "{what}: element {i}: got {g}, want {w}");
        }
    }

    fn blend(conv: &[f32], old: &[f32], alpha: f32, beta: f32) -> Vec<f32> {
        conv.iter().zip(old).map(|(&c, &o)| if beta == 0.0 { alpha * c } else { alpha * c + beta * o }).collect()
    }

    fn out_dims(xs: [usize; 4], ws: [usize; 4], p: Conv2dParams) -> [usize; 4] {
        let o = |i: usize, k: usize, a: usize| (i + 2 * p.padding[a] - p.dilation[a] * (k - 1) - 1) / p.stride[a] + 1;
        [xs[0], ws[0], o(xs[2], ws[2], 0), o(xs[3], ws[3], 1)]
    }

    /// The convolutions of the tests: [N, C, H, W] = [2, 6, 7, 5] with K = 4 filters of the given
    /// kernel size.
    fn cases() -> Vec<(Conv2dParams, [usize; 2])> {
        vec![
            (Conv2dParams { stride: [2, 2], padding: [1, 1], dilation: [1, 1], groups: 2 }, [3, 3]),
            (Conv2dParams { stride: [1, 2], padding: [1, 0], dilation: [2, 1], groups: 2 }, [3, 2]),
            (Conv2dParams { stride: [2, 1], padding: [2, 1], dilation: [2, 2], groups: 1 }, [3, 3]),
            (Conv2dParams { stride: [3, 1], padding: [0, 2], dilation: [1, 2], groups: 1 }, [2, 3]),
        ]
    }

    /// Runs the three passes through the exported calls and checks each against the engine's
    /// CPU convolution and its gradients (in f32, on the same dtype-exact inputs).
    fn check_case(ty: Ty, mem: Mem, p: Conv2dParams, kernel: [usize; 2], cross: bool, alpha: f32, beta: f32) {
        let what = format!("{ty:?} {mem:?} {p:?} kernel {kernel:?} cross {cross} alpha {alpha} beta {beta}");
        let xs = [2, 6, 7, 5];
        let ws = [4, 6 / p.groups, kernel[0], kernel[1]];
        let ys = out_dims(xs, ws, p);
        let rs = kernel[0] * kernel[1];
        let count = |s: [usize; 4]| s.iter().product::<usize>();
        let (x, w, dy) = (values(count(xs), 1, ty), values(count(ws), 2, ty), values(count(ys), 3, ty));
        let (y0, dx0, dw0) = (values(count(ys), 4, ty), values(count(xs), 5, ty), values(count(ws), 6, ty));
        let nhwc_filter = mem == Mem::Nhwc;
        let wstrides = if nhwc_filter { strides(ws, Mem::Nhwc) } else { strides(ws, Mem::Nchw) };
        let h = Hd::new();
        let (xd, yd, wd, cd) = (Td::new(ty, xs, strides(xs, mem)), Td::new(ty, ys, strides(ys, mem)), Fd::new(ty, ws, nhwc_filter), Cd::new(p, cross));
        // The engine's conv2d is cross-correlation: convolution mode is it with flipped filters.
        let w_ref = if cross { w.clone() } else { flip(&w, rs) };
        let (a, b) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);

        // Forward.
        let (mut xb, mut wb, mut yb) = (Buf::new(ty, xs, strides(xs, mem), &x), Buf::new(ty, ws, wstrides, &w), Buf::new(ty, ys, strides(ys, mem), &y0));
        let (mut found, mut perf) = (0, unsafe { std::mem::zeroed::<dnn::cudnnConvolutionFwdAlgoPerf_t>() });
        let mut wsize = 1usize;
        unsafe {
            assert_eq!(cudnnGetConvolutionForwardAlgorithm_v7(h.0, xd.0, wd.0, cd.0, yd.0, 1, &mut found, &mut perf), OK);
            assert_eq!((found, perf.status), (1, OK));
            assert_eq!(cudnnGetConvolutionForwardWorkspaceSize(h.0, xd.0, wd.0, cd.0, yd.0, perf.algo, &mut wsize), OK);
            assert_eq!(wsize, 0);
            assert_eq!(cudnnConvolutionForward(h.0, a, xd.0, xb.ptr(), wd.0, wb.ptr(), cd.0, perf.algo, null_mut(), 0, b, yd.0, yb.ptr()), OK, "{what}");
        }
        let conv = tensor(&x, xs).conv2d(&tensor(&w_ref, ws), None, p).unwrap().to_vec::<f32>().unwrap();
        assert_close(&yb.logical(), &blend(&conv, &y0, alpha, beta), ty, &format!("forward {what}"));
        assert!(yb.gaps_untouched(), "forward {what}");

        // Backward data.
        let (mut dyb, mut dxb) = (Buf::new(ty, ys, strides(ys, mem), &dy), Buf::new(ty, xs, strides(xs, mem), &dx0));
        let (mut found, mut perf) = (0, unsafe { std::mem::zeroed::<dnn::cudnnConvolutionBwdDataAlgoPerf_t>() });
        unsafe {
            assert_eq!(cudnnGetConvolutionBackwardDataAlgorithm_v7(h.0, wd.0, yd.0, cd.0, xd.0, 1, &mut found, &mut perf), OK);
            assert_eq!((found, perf.status), (1, OK));
            assert_eq!(cudnnGetConvolutionBackwardDataWorkspaceSize(h.0, wd.0, yd.0, cd.0, xd.0, perf.algo, &mut wsize), OK);
            assert_eq!(cudnnConvolutionBackwardData(h.0, a, wd.0, wb.ptr(), yd.0, dyb.ptr(), cd.0, perf.algo, null_mut(), 0, b, xd.0, dxb.ptr()), OK, "{what}");
        }
        let dx = Tensor::conv2d_backward_input(&tensor(&dy, ys), &tensor(&w_ref, ws), xs, p).unwrap().to_vec::<f32>().unwrap();
        assert_close(&dxb.logical(), &blend(&dx, &dx0, alpha, beta), ty, &format!("backward data {what}"));
        assert!(dxb.gaps_untouched(), "backward data {what}");

        // Backward filter.
        let mut dwb = Buf::new(ty, ws, wstrides, &dw0);
        let (mut found, mut perf) = (0, unsafe { std::mem::zeroed::<dnn::cudnnConvolutionBwdFilterAlgoPerf_t>() });
        unsafe {
            assert_eq!(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h.0, xd.0, yd.0, cd.0, wd.0, 1, &mut found, &mut perf), OK);
            assert_eq!((found, perf.status), (1, OK));
            assert_eq!(cudnnGetConvolutionBackwardFilterWorkspaceSize(h.0, xd.0, yd.0, cd.0, wd.0, perf.algo, &mut wsize), OK);
            assert_eq!(cudnnConvolutionBackwardFilter(h.0, a, xd.0, xb.ptr(), yd.0, dyb.ptr(), cd.0, perf.algo, null_mut(), 0, b, wd.0, dwb.ptr()), OK, "{what}");
        }
        let dw = Tensor::conv2d_backward_weight(&tensor(&x, xs), &tensor(&dy, ys), ws, p).unwrap().to_vec::<f32>().unwrap();
        let dw = if cross { dw } else { flip(&dw, rs) };
        assert_close(&dwb.logical(), &blend(&dw, &dw0, alpha, beta), ty, &format!("backward filter {what}"));
    }

    fn check_all(ty: Ty, mems: &[Mem]) {
        for &mem in mems {
            for (p, kernel) in cases() {
                for (alpha, beta) in [(1.0, 0.0), (0.5, -0.75)] {
                    check_case(ty, mem, p, kernel, true, alpha, beta);
                }
            }
        }
    }

    #[test]
    fn cudnn_matches_engine_f32() {
        check_all(Ty::F32, &[Mem::Nchw, Mem::Nhwc, Mem::Padded]);
    }

    #[test]
    fn cudnn_matches_engine_bf16() {
        check_all(Ty::Bf16, &[Mem::Nchw, Mem::Nhwc, Mem::Padded]);
    }

    #[test]
    fn cudnn_matches_engine_f16() {
        check_all(Ty::F16, &[Mem::Nchw, Mem::Nhwc]);
    }

    #[test]
    fn cudnn_convolution_mode_flips_the_filter() {
        for (p, kernel) in cases() {
            check_case(Ty::F32, Mem::Nchw, p, kernel, false, 1.0, 0.0);
            check_case(Ty::Bf16, Mem::Nhwc, p, kernel, false, 2.0, 0.5);
        }
    }

    /// Independent of the engine: <conv(x, w), dy> = <x, bwd_data(dy, w)> = <w, bwd_filter(x, dy)>,
    /// summed in f64 over our f32 results.
    #[test]
    fn cudnn_passes_are_adjoint() {
        let ty = Ty::F32;
        for (p, kernel) in cases() {
            let xs = [2, 6, 7, 5];
            let ws = [4, 6 / p.groups, kernel[0], kernel[1]];
            let ys = out_dims(xs, ws, p);
            let count = |s: [usize; 4]| s.iter().product::<usize>();
            let (x, w, dy) = (values(count(xs), 11, ty), values(count(ws), 12, ty), values(count(ys), 13, ty));
            let h = Hd::new();
            let (xd, yd, wd, cd) = (Td::new(ty, xs, strides(xs, Mem::Nhwc)), Td::new(ty, ys, strides(ys, Mem::Padded)), Fd::new(ty, ws, false), Cd::new(p, true));
            let (one, zero) = (1f32, 0f32);
            let (a, b) = (&one as *const f32 as *const c_void, &zero as *const f32 as *const c_void);
            let (mut xb, mut wb, mut dyb) = (Buf::new(ty, xs, strides(xs, Mem::Nhwc), &x), Buf::new(ty, ws, strides(ws, Mem::Nchw), &w), Buf::new(ty, ys, strides(ys, Mem::Padded), &dy));
            let mut yb = Buf::new(ty, ys, strides(ys, Mem::Padded), &vec![0.0; count(ys)]);
            let mut dxb = Buf::new(ty, xs, strides(xs, Mem::Nhwc), &vec![0.0; count(xs)]);
            let mut dwb = Buf::new(ty, ws, strides(ws, Mem::Nchw), &vec![0.0; count(ws)]);
            unsafe {
                use dnn::cudnnConvolutionBwdDataAlgo_t::*;
                use dnn::cudnnConvolutionBwdFilterAlgo_t::*;
                use dnn::cudnnConvolutionFwdAlgo_t::*;
                assert_eq!(cudnnConvolutionForward(h.0, a, xd.0, xb.ptr(), wd.0, wb.ptr(), cd.0, CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD, null_mut(), 0, b, yd.0, yb.ptr()), OK);
                assert_eq!(cudnnConvolutionBackwardData(h.0, a, wd.0, wb.ptr(), yd.0, dyb.ptr(), cd.0, CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, null_mut(), 0, b, xd.0, dxb.ptr()), OK);
                assert_eq!(cudnnConvolutionBackwardFilter(h.0, a, xd.0, xb.ptr(), yd.0, dyb.ptr(), cd.0, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, null_mut(), 0, b, wd.0, dwb.ptr()), OK);
            }
            let dot = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
            let (lhs, mid, rhs) = (dot(&yb.logical(), &dy), dot(&x, &dxb.logical()), dot(&w, &dwb.logical()));
            let scale = 1.0 + lhs.abs();
            assert!((lhs - mid).abs() < 1e-4 * scale && (lhs - rhs).abs() < 1e-4 * scale, "{p:?}: {lhs} {mid} {rhs}");
        }
    }

    #[test]
    fn cudnn_output_dim_follows_the_formula() {
        // The case of conv.rs's own descriptor test: (7 + 2 - 3) / 2 + 1 = 4; (9 + 4 - 3) / 1 + 1 = 11.
        let p = Conv2dParams { stride: [2, 1], padding: [1, 2], dilation: [1, 2], groups: 2 };
        for mem in [Mem::Nchw, Mem::Nhwc] {
            for ty in [Ty::F32, Ty::Bf16, Ty::F16] {
                let (xs, ws) = ([2, 4, 7, 9], [6, 2, 3, 2]);
                let (xd, wd, cd) = (Td::new(ty, xs, strides(xs, mem)), Fd::new(ty, ws, mem == Mem::Nhwc), Cd::new(p, true));
                let (mut n, mut c, mut h, mut w) = (0, 0, 0, 0);
                assert_eq!(unsafe { cudnnGetConvolution2dForwardOutputDim(cd.0, xd.0, wd.0, &mut n, &mut c, &mut h, &mut w) }, OK);
                assert_eq!([n, c, h, w], [2, 6, 4, 11]);
            }
        }
        // Kernel span exactly the padded input: one output; one more: refused.
        let cd = Cd::new(Conv2dParams { stride: [5, 5], padding: [1, 0], dilation: [3, 1], groups: 1 }, true);
        let (xd, wd) = (Td::new(Ty::F32, [1, 1, 5, 4], strides([1, 1, 5, 4], Mem::Nchw)), Fd::new(Ty::F32, [1, 1, 3, 4], false));
        let (mut n, mut c, mut h, mut w) = (0, 0, 0, 0);
        assert_eq!(unsafe { cudnnGetConvolution2dForwardOutputDim(cd.0, xd.0, wd.0, &mut n, &mut c, &mut h, &mut w) }, OK);
        assert_eq!([n, c, h, w], [1, 1, 1, 1]);
        let wd = Fd::new(Ty::F32, [1, 1, 3, 5], false);
        assert_eq!(unsafe { cudnnGetConvolution2dForwardOutputDim(cd.0, xd.0, wd.0, &mut n, &mut c, &mut h, &mut w) }, BAD);
    }

    #[test]
    fn cudnn_beta_zero_does_not_read_the_output() {
        let p = Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 };
        let (xs, ws) = ([1, 2, 3, 3], [2, 2, 3, 3]);
        let ys = out_dims(xs, ws, p);
        let h = Hd::new();
        let (xd, yd, wd, cd) = (Td::new(Ty::Bf16, xs, strides(xs, Mem::Nchw)), Td::new(Ty::Bf16, ys, strides(ys, Mem::Nchw)), Fd::new(Ty::Bf16, ws, false), Cd::new(p, true));
        let (mut xb, mut wb) = (Buf::new(Ty::Bf16, xs, strides(xs, Mem::Nchw), &values(18, 1, Ty::Bf16)), Buf::new(Ty::Bf16, ws, strides(ws, Mem::Nchw), &values(36, 2, Ty::Bf16)));
        let mut yb = Buf::new(Ty::Bf16, ys, strides(ys, Mem::Nchw), &[f32::NAN; 18]);
        let (one, zero) = (1f32, 0f32);
        let r = unsafe { cudnnConvolutionForward(h.0, &one as *const f32 as _, xd.0, xb.ptr(), wd.0, wb.ptr(), cd.0, FWD_ALGO, null_mut(), 0, &zero as *const f32 as _, yd.0, yb.ptr()) };
        assert_eq!(r, OK);
        assert!(yb.logical().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn cudnn_algorithm_queries_offer_one_deterministic_algorithm() {
        let p = Conv2dParams { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 };
        let (xs, ws) = ([1, 2, 3, 3], [2, 2, 2, 2]);
        let ys = out_dims(xs, ws, p);
        let h = Hd::new();
        for ty in [Ty::F32, Ty::Bf16] {
            let (xd, yd, wd) = (Td::new(ty, xs, strides(xs, Mem::Nchw)), Td::new(ty, ys, strides(ys, Mem::Nchw)), Fd::new(ty, ws, false));
            let cd = Cd::new(p, true);
            assert_eq!(unsafe { cudnnSetConvolutionMathType(cd.0, dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH) }, OK);
            let (mut xb, mut wb, mut yb) = (Buf::new(ty, xs, strides(xs, Mem::Nchw), &[0.0; 18]), Buf::new(ty, ws, strides(ws, Mem::Nchw), &[0.0; 16]), Buf::new(ty, ys, strides(ys, Mem::Nchw), &[7.0; 8]));
            let mut perf = unsafe { [std::mem::zeroed::<dnn::cudnnConvolutionFwdAlgoPerf_t>(); 8] };
            let mut found = 0;
            let r = unsafe { cudnnFindConvolutionForwardAlgorithmEx(h.0, xd.0, xb.ptr(), wd.0, wb.ptr(), cd.0, yd.0, yb.ptr(), 8, &mut found, perf.as_mut_ptr(), null_mut(), 0) };
            assert_eq!((r, found), (OK, 1));
            let f = perf[0];
            assert_eq!((f.status, f.memory, f.determinism, f.time), (OK, 0, dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC, 0.0));
            // f32 is never reported as tensor-core math (the engine refuses that for exact f32).
            let want = if ty == Ty::F32 { dnn::cudnnMathType_t::CUDNN_FMA_MATH } else { dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH };
            assert_eq!(f.mathType, want);
            let mut pd = unsafe { std::mem::zeroed::<dnn::cudnnConvolutionBwdDataAlgoPerf_t>() };
            let r = unsafe { cudnnFindConvolutionBackwardDataAlgorithmEx(h.0, wd.0, wb.ptr(), yd.0, yb.ptr(), cd.0, xd.0, xb.ptr(), 1, &mut found, &mut pd, null_mut(), 0) };
            assert_eq!((r, found, pd.status, pd.determinism), (OK, 1, OK, dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC));
            let mut pf = unsafe { std::mem::zeroed::<dnn::cudnnConvolutionBwdFilterAlgoPerf_t>() };
            let r = unsafe { cudnnFindConvolutionBackwardFilterAlgorithmEx(h.0, xd.0, xb.ptr(), yd.0, yb.ptr(), cd.0, wd.0, wb.ptr(), 1, &mut found, &mut pf, null_mut(), 0) };
            assert_eq!((r, found, pf.status, pf.determinism), (OK, 1, OK, dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC));
            // No room for a result: refused.
            assert_eq!(unsafe { cudnnGetConvolutionForwardAlgorithm_v7(h.0, xd.0, wd.0, cd.0, yd.0, 0, &mut found, perf.as_mut_ptr()) }, BAD);
        }
    }

    #[test]
    fn cudnn_refuses_what_it_cannot_do() {
        use dnn::cudnnDataType_t::*;
        let p = Conv2dParams { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 };
        let (xs, ws) = ([1, 2, 3, 3], [2, 2, 2, 2]);
        let ys = out_dims(xs, ws, p);
        let h = Hd::new();
        let (xd, yd, wd, cd) = (Td::new(Ty::F32, xs, strides(xs, Mem::Nchw)), Td::new(Ty::F32, ys, strides(ys, Mem::Nchw)), Fd::new(Ty::F32, ws, false), Cd::new(p, true));
        let (mut xb, mut wb, mut yb) = (Buf::new(Ty::F32, xs, strides(xs, Mem::Nchw), &[1.0; 18]), Buf::new(Ty::F32, ws, strides(ws, Mem::Nchw), &[1.0; 16]), Buf::new(Ty::F32, ys, strides(ys, Mem::Nchw), &[7.0; 8]));
        let (one, zero) = (1f32, 0f32);
        let (a, b) = (&one as *const f32 as *const c_void, &zero as *const f32 as *const c_void);
        let wp = wb.ptr() as *const c_void;
        let fwd = |xd: dnn::cudnnTensorDescriptor_t, x: *mut c_void, wd: dnn::cudnnFilterDescriptor_t, cd: dnn::cudnnConvolutionDescriptor_t, yd: dnn::cudnnTensorDescriptor_t, y: *mut c_void| unsafe { cudnnConvolutionForward(h.0, a, xd, x, wd, wp, cd, FWD_ALGO, null_mut(), 0, b, yd, y) };
        unsafe {
            // Descriptor setters.
            let mut d = null_mut();
            assert_eq!(cudnnCreateTensorDescriptor(&mut d), OK);
            assert_eq!(cudnnSetTensor4dDescriptorEx(d, CUDNN_DATA_DOUBLE, 1, 1, 1, 1, 1, 1, 1, 1), UNSUPPORTED);
            assert_eq!(cudnnSetTensor4dDescriptorEx(d, CUDNN_DATA_FLOAT, 0, 1, 1, 1, 1, 1, 1, 1), BAD);
            assert_eq!(cudnnSetTensor4dDescriptorEx(d, CUDNN_DATA_FLOAT, 2, 1, 1, 1, -1, 1, 1, 1), BAD);
            assert_eq!(cudnnSetTensor4dDescriptorEx(d, CUDNN_DATA_FLOAT, i32::MAX, i32::MAX, i32::MAX, 2, 1, 1, 1, 1), BAD);
            // An unset descriptor is refused where it is used.
            assert_eq!(cudnnConvolutionForward(h.0, a, d, xb.ptr(), wd.0, wp, cd.0, FWD_ALGO, null_mut(), 0, b, yd.0, yb.ptr()), BAD);
            assert_eq!(cudnnDestroyTensorDescriptor(d), OK);
            assert_eq!(cudnnDestroyTensorDescriptor(d), BAD, "destroyed twice");
            assert_eq!(cudnnDestroyTensorDescriptor(null_mut()), OK);
            assert_eq!(cudnnCreateTensorDescriptor(null_mut()), BAD);
            let mut f = null_mut();
            assert_eq!(cudnnCreateFilterDescriptor(&mut f), OK);
            assert_eq!(cudnnSetFilter4dDescriptor(f, CUDNN_DATA_FLOAT, dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW_VECT_C, 1, 4, 1, 1), UNSUPPORTED);
            assert_eq!(cudnnSetFilter4dDescriptor(f, CUDNN_DATA_INT8, dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, 1, 4, 1, 1), UNSUPPORTED);
            assert_eq!(cudnnSetFilter4dDescriptor(f, CUDNN_DATA_FLOAT, dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, 1, -4, 1, 1), BAD);
            assert_eq!(cudnnDestroyFilterDescriptor(f), OK);
            let mut c = null_mut();
            assert_eq!(cudnnCreateConvolutionDescriptor(&mut c), OK);
            let cross = dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
            assert_eq!(cudnnSetConvolution2dDescriptor(c, -1, 0, 1, 1, 1, 1, cross, CUDNN_DATA_FLOAT), BAD);
            assert_eq!(cudnnSetConvolution2dDescriptor(c, 0, 0, 0, 1, 1, 1, cross, CUDNN_DATA_FLOAT), BAD);
            assert_eq!(cudnnSetConvolution2dDescriptor(c, 0, 0, 1, 1, 1, 0, cross, CUDNN_DATA_FLOAT), BAD);
            assert_eq!(cudnnSetConvolution2dDescriptor(c, 0, 0, 1, 1, 1, 1, cross, CUDNN_DATA_INT8), BAD);
            assert_eq!(cudnnSetConvolutionGroupCount(c, 0), BAD);
            assert_eq!(cudnnDestroyConvolutionDescriptor(c), OK);
            // A descriptor of another kind.
            assert_eq!(cudnnSetConvolutionGroupCount(xd.0.cast(), 1), BAD);
            assert_eq!(fwd(xd.0, xb.ptr(), yd.0.cast(), cd.0, yd.0, yb.ptr()), BAD);

            // Descriptors that disagree: output dims, channels vs groups, dtypes.
            let bad_y = Td::new(Ty::F32, [1, 2, 2, 3], strides([1, 2, 2, 3], Mem::Nchw));
            assert_eq!(fwd(xd.0, xb.ptr(), wd.0, cd.0, bad_y.0, yb.ptr()), BAD);
            let c2 = Cd::new(Conv2dParams { groups: 2, ..p }, true);
            assert_eq!(fwd(xd.0, xb.ptr(), wd.0, c2.0, yd.0, yb.ptr()), BAD);
            let bf_y = Td::new(Ty::Bf16, ys, strides(ys, Mem::Nchw));
            assert_eq!(fwd(xd.0, xb.ptr(), wd.0, cd.0, bf_y.0, yb.ptr()), BAD);
            let mut found = 0;
            let mut perf = std::mem::zeroed::<dnn::cudnnConvolutionFwdAlgoPerf_t>();
            assert_eq!(cudnnGetConvolutionForwardAlgorithm_v7(h.0, xd.0, wd.0, cd.0, bad_y.0, 1, &mut found, &mut perf), BAD);
            let mut size = 0usize;
            assert_eq!(cudnnGetConvolutionForwardWorkspaceSize(h.0, xd.0, wd.0, cd.0, bad_y.0, FWD_ALGO, &mut size), BAD);
            assert_eq!(cudnnGetConvolutionForwardWorkspaceSize(h.0, xd.0, wd.0, cd.0, yd.0, dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &mut size), BAD);

            // Half compute: listed as not supported, and refused when run.
            let ch = Cd::with_compute(p, true, CUDNN_DATA_HALF);
            assert_eq!(cudnnGetConvolutionForwardAlgorithm_v7(h.0, xd.0, wd.0, ch.0, yd.0, 1, &mut found, &mut perf), OK);
            assert_eq!((found, perf.status), (1, UNSUPPORTED));
            assert_eq!(fwd(xd.0, xb.ptr(), wd.0, ch.0, yd.0, yb.ptr()), UNSUPPORTED);

            // Pointers: null, misaligned; an output whose elements overlap.
            assert_eq!(fwd(xd.0, null_mut(), wd.0, cd.0, yd.0, yb.ptr()), BAD);
            assert_eq!(fwd(xd.0, xb.ptr(), wd.0, cd.0, yd.0, null_mut()), BAD);
            assert_eq!(fwd(xd.0, xb.ptr().cast::<u8>().add(1).cast(), wd.0, cd.0, yd.0, yb.ptr()), St::CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER);
            assert_eq!(cudnnConvolutionForward(h.0, null_mut(), xd.0, xb.ptr(), wd.0, wp, cd.0, FWD_ALGO, null_mut(), 0, b, yd.0, yb.ptr()), BAD);
            assert_eq!(cudnnConvolutionForward(null_mut(), a, xd.0, xb.ptr(), wd.0, wp, cd.0, FWD_ALGO, null_mut(), 0, b, yd.0, yb.ptr()), BAD);
            let overlapping = Td::new(Ty::F32, ys, [1, 1, 1, 1]);
            assert_eq!(fwd(xd.0, xb.ptr(), wd.0, cd.0, overlapping.0, yb.ptr()), UNSUPPORTED);
        }
        // Nothing was written by a refused call.
        assert!(yb.logical().iter().all(|&v| v == 7.0));
    }

    #[test]
    fn cudnn_versions_and_error_strings() {
        unsafe {
            assert!(cudnnGetVersion() >= 90000);
            assert!(cudnnGetCudartVersion() >= 12000);
            assert_eq!((cudnnGraphVersionCheck(), cudnnOpsVersionCheck(), cudnnCnnVersionCheck()), (OK, OK, OK));
            let s = |st| std::ffi::CStr::from_ptr(cudnnGetErrorString(st)).to_str().unwrap().to_owned();
            assert_eq!(s(OK), "CUDNN_STATUS_SUCCESS");
            assert_eq!(s(BAD), "CUDNN_STATUS_BAD_PARAM");
            assert_eq!(s(St::CUDNN_STATUS_INVALID_VALUE), "CUDNN_STATUS_INVALID_VALUE");
        }
    }
}
