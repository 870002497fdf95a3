//! 2-D convolutions on CUDA through cuDNN (loaded dynamically, see libs.rs): the forward pass and
//! the gradients with respect to the input (backward data) and the weight (backward filter).
//!
//! Memory format: a channels-last view (NHWC-packed strides, as PyTorch's channels_last) runs as
//! CUDNN_TENSOR_NHWC with an NHWC filter and gives a channels-last result; everything else runs as
//! NCHW. The main operand (the input, or the output gradient for backward data) decides; the
//! others are brought to the same format (packed, 16-byte aligned), copying only when they are
//! not. If cuDNN has no NHWC algorithm for a case, it runs again as NCHW. The weight gradient is
//! always returned as a contiguous [O, C / groups, kH, kW] tensor.
//!
//! Precision: f32, bf16 and f16 data with f32 compute (CUDNN_DATA_FLOAT). f32 runs with
//! CUDNN_FMA_MATH (no TF32, matching the CPU backend and our f32 GEMMs); bf16/f16 with the math
//! type cuDNN pairs with the algorithm (tensor cores). Algorithms come from the
//! cudnnGet*Algorithm_v7 heuristics or, with `LOOKAHEAD_CUDNN_AUTOTUNE=1`, from trial runs
//! (cudnnFind*AlgorithmEx on the first call's own buffers, as PyTorch's cudnn.benchmark);
//! deterministic ones are preferred, and the choice is cached per shape; workspaces come from our
//! allocator.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cudnn::sys as dnn;

use super::device::{lock, CudaDevice};
use super::libs;
use crate::storage::Storage;
use crate::{Conv2dParams, DType, Error, Result, Tensor};

/// Physical order of a 4-D [N, C, H, W] tensor (or [O, C / groups, kH, kW] filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Nchw,
    Nhwc,
}

impl Format {
    /// Logical dims from the outermost physical one in.
    fn order(self) -> [usize; 4] {
        match self {
            Format::Nchw => [0, 1, 2, 3],
            Format::Nhwc => [0, 2, 3, 1],
        }
    }
    fn cudnn(self) -> dnn::cudnnTensorFormat_t {
        match self {
            Format::Nchw => dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            Format::Nhwc => dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
        }
    }
    /// The packed strides of `shape` in this format.
    pub fn strides(self, shape: [usize; 4]) -> [usize; 4] {
        let mut s = [0usize; 4];
        let mut acc = 1;
        for &d in self.order().iter().rev() {
            s[d] = acc;
            acc *= shape[d];
        }
        s
    }
    /// Whether a view with `shape` and `strides` is packed in this format (strides of size-1
    /// dims do not matter).
    pub fn packs(self, shape: &[usize], strides: &[usize]) -> bool {
        let Ok(shape4) = <[usize; 4]>::try_from(shape) else { return false };
        let want = self.strides(shape4);
        (0..4).all(|d| shape[d] == 1 || strides[d] == want[d])
    }
}

/// The format a view runs in: NHWC for channels-last views that are not also NCHW-packed.
pub fn format_of(t: &Tensor) -> Format {
    if Format::Nhwc.packs(t.shape(), t.strides()) && !Format::Nchw.packs(t.shape(), t.strides()) {
        Format::Nhwc
    } else {
        Format::Nchw
    }
}

fn ptr_of(t: &Tensor) -> Result<u64> {
    let guard = t.read_storage();
    match &*guard {
        Storage::Cuda(s) => Ok(s.ptr_at(t.layout().offset())),
        Storage::Cpu(_) => Err(Error::Cuda("cuDNN convolution: operand is not on a CUDA device".into())),
    }
}

/// `t` as a packed, 16-byte aligned tensor in format `f` of dtype `dtype` (itself when it is one).
fn in_format(t: &Tensor, f: Format, dtype: DType) -> Result<Tensor> {
    let t = if t.dtype() != dtype { t.to_dtype(dtype)? } else { t.clone() };
    if f.packs(t.shape(), t.strides()) && ptr_of(&t)? % 16 == 0 {
        return Ok(t);
    }
    match f {
        Format::Nchw => t.copy(),
        Format::Nhwc => t.permute(&[0, 2, 3, 1])?.copy()?.permute(&[0, 3, 1, 2]),
    }
}

/// A new uninitialised tensor of logical `shape`, packed in format `f`.
fn alloc_in_format(dev: &Arc<CudaDevice>, dtype: DType, shape: [usize; 4], f: Format) -> Result<Tensor> {
    let storage = super::CudaStorage::alloc(dev, dtype, shape.iter().product())?;
    let o = f.order();
    let physical = [shape[o[0]], shape[o[1]], shape[o[2]], shape[o[3]]];
    let t = Tensor::from_storage(Storage::Cuda(storage), &physical)?;
    match f {
        Format::Nchw => Ok(t),
        Format::Nhwc => t.permute(&[0, 3, 1, 2]),
    }
}

fn data_type(op: &'static str, dtype: DType) -> Result<dnn::cudnnDataType_t> {
    match dtype {
        DType::F32 => Ok(dnn::cudnnDataType_t::CUDNN_DATA_FLOAT),
        DType::BF16 => Ok(dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        DType::F16 => Ok(dnn::cudnnDataType_t::CUDNN_DATA_HALF),
        _ => Err(Error::UnsupportedDType { op, dtype }),
    }
}

fn check(what: &str, s: dnn::cudnnStatus_t) -> Result<()> {
    if s == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("cuDNN {what}: {s:?}")))
    }
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("cuDNN convolution: {what} = {v} exceeds the 32-bit sizes of cuDNN's descriptors")))
}

/// The cuDNN functions, from the library libs.rs found and checked (never through cudarc's
/// loader, which may open a different copy by name).
fn api() -> Result<&'static libs::CudnnApi> {
    Ok(&libs::cudnn()?.api)
}

// ---- descriptors (destroyed on drop) --------------------------------------------------------

struct TensorDesc(dnn::cudnnTensorDescriptor_t, &'static libs::CudnnApi);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        unsafe { (self.1.cudnnDestroyTensorDescriptor)(self.0) };
    }
}
impl TensorDesc {
    fn new(dt: dnn::cudnnDataType_t, shape: [usize; 4], f: Format) -> Result<TensorDesc> {
        let api = api()?;
        let mut d = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("creating a tensor descriptor", unsafe { (api.cudnnCreateTensorDescriptor)(&mut d) })?;
        let d = TensorDesc(d, api);
        let s = f.strides(shape);
        let (n, c, h, w) = (int("N", shape[0])?, int("C", shape[1])?, int("H", shape[2])?, int("W", shape[3])?);
        let (sn, sc, sh, sw) = (int("stride", s[0])?, int("stride", s[1])?, int("stride", s[2])?, int("stride", s[3])?);
        // SAFETY: a live descriptor and plain integers.
        check(&format!("describing a {shape:?} {f:?} tensor"), unsafe { (api.cudnnSetTensor4dDescriptorEx)(d.0, dt, n, c, h, w, sn, sc, sh, sw) })?;
        Ok(d)
    }
}

struct FilterDesc(dnn::cudnnFilterDescriptor_t, &'static libs::CudnnApi);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateFilterDescriptor, destroyed once.
        unsafe { (self.1.cudnnDestroyFilterDescriptor)(self.0) };
    }
}
impl FilterDesc {
    fn new(dt: dnn::cudnnDataType_t, shape: [usize; 4], f: Format) -> Result<FilterDesc> {
        let api = api()?;
        let mut d = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("creating a filter descriptor", unsafe { (api.cudnnCreateFilterDescriptor)(&mut d) })?;
        let d = FilterDesc(d, api);
        let (k, c, h, w) = (int("O", shape[0])?, int("C/groups", shape[1])?, int("kH", shape[2])?, int("kW", shape[3])?);
        // SAFETY: a live descriptor and plain integers; dims are logical KCRS whatever the format.
        check(&format!("describing a {shape:?} {f:?} filter"), unsafe { (api.cudnnSetFilter4dDescriptor)(d.0, dt, f.cudnn(), k, c, h, w) })?;
        Ok(d)
    }
}

struct ConvDesc(dnn::cudnnConvolutionDescriptor_t, &'static libs::CudnnApi);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateConvolutionDescriptor, destroyed once.
        unsafe { (self.1.cudnnDestroyConvolutionDescriptor)(self.0) };
    }
}
impl ConvDesc {
    fn new(p: Conv2dParams, math: dnn::cudnnMathType_t) -> Result<ConvDesc> {
        let api = api()?;
        let mut d = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("creating a convolution descriptor", unsafe { (api.cudnnCreateConvolutionDescriptor)(&mut d) })?;
        let d = ConvDesc(d, api);
        let (ph, pw, sh, sw) = (int("padding", p.padding[0])?, int("padding", p.padding[1])?, int("stride", p.stride[0])?, int("stride", p.stride[1])?);
        let (dh, dw, g) = (int("dilation", p.dilation[0])?, int("dilation", p.dilation[1])?, int("groups", p.groups)?);
        // SAFETY: a live descriptor and plain values. Cross-correlation is what conv2d computes.
        unsafe {
            check(&format!("setting convolution {p:?}"), (api.cudnnSetConvolution2dDescriptor)(d.0, ph, pw, sh, sw, dh, dw, dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION, dnn::cudnnDataType_t::CUDNN_DATA_FLOAT))?;
            check("setting the group count", (api.cudnnSetConvolutionGroupCount)(d.0, g))?;
            check("setting the math type", (api.cudnnSetConvolutionMathType)(d.0, math))?;
        }
        Ok(d)
    }
    fn set_math(&self, math: dnn::cudnnMathType_t) -> Result<()> {
        // SAFETY: a live descriptor.
        check("setting the math type", unsafe { (self.1.cudnnSetConvolutionMathType)(self.0, math) })
    }
}

// ---- per-device handle and algorithm cache --------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

#[derive(Clone, Copy, Debug)]
enum Algo {
    Forward(dnn::cudnnConvolutionFwdAlgo_t),
    BackwardData(dnn::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(dnn::cudnnConvolutionBwdFilterAlgo_t),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    pass: Pass,
    dtype: DType,
    format: Format,
    x: [usize; 4],
    w: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
}

struct Handle {
    raw: dnn::cudnnHandle_t,
    /// None: cuDNN offers no algorithm for this case (in this format).
    algos: HashMap<Key, Option<(Algo, dnn::cudnnMathType_t)>>,
}

// SAFETY: a cuDNN handle may move between threads; ours is only used under the mutex.
unsafe impl Send for Handle {}

fn handles() -> &'static Mutex<HashMap<usize, Handle>> {
    static H: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();
    H.get_or_init(Default::default)
}

/// The largest workspace an algorithm may ask for.
const MAX_WORKSPACE: usize = 512 << 20;

/// Checks that cuDNN can be used (library and sub-libraries found, loadable, version 9, host
/// calls working); says which file.
pub fn probe_cudnn() -> Result<String> {
    libs::cudnn().map(|c| format!("{}; sub-libraries from {}", c.describe(), c.lib.path.parent().unwrap_or(std::path::Path::new("/")).display()))
}

/// The first usable candidate (status success, workspace within the limit, and for f32 no
/// tensor-core math), preferring deterministic algorithms; candidates come in cuDNN's order of
/// expected speed.
fn pick<A: Copy>(cands: &[(A, dnn::cudnnStatus_t, usize, dnn::cudnnDeterminism_t, dnn::cudnnMathType_t)], f32_exact: bool) -> Option<(A, dnn::cudnnMathType_t)> {
    let usable = |c: &&(A, dnn::cudnnStatus_t, usize, dnn::cudnnDeterminism_t, dnn::cudnnMathType_t)| {
        c.1 == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            && c.2 <= MAX_WORKSPACE
            && !(f32_exact && matches!(c.4, dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH | dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION))
    };
    let best = cands.iter().filter(usable).find(|c| c.3 == dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC).or_else(|| cands.iter().find(usable))?;
    Some((best.0, best.4))
}

/// Pointers of one pass: (first input, second input, output), as the pass names them:
/// forward (x, w, y), backward data (w, dy, dx), backward filter (x, dy, dw).
struct Ptrs(u64, u64, u64);

/// The descriptors of one pass: input, filter, output, convolution.
type Descs<'a> = (&'a TensorDesc, &'a FilterDesc, &'a TensorDesc, &'a ConvDesc);

/// cuDNN's heuristic choice for `pass` (no trial runs); None when it offers nothing usable.
fn heuristic_algorithm(api: &libs::CudnnApi, h: dnn::cudnnHandle_t, pass: Pass, (xd, wd, yd, cd): Descs, f32_exact: bool) -> Result<Option<(Algo, dnn::cudnnMathType_t)>> {
    let mut found = 0i32;
    // SAFETY: zeroed perf results are valid values that cuDNN overwrites (only the first `found`
    // are read); all descriptors are live.
    unsafe {
        Ok(match pass {
            Pass::Forward => {
                let mut perf: [dnn::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
                check("choosing a forward algorithm", (api.cudnnGetConvolutionForwardAlgorithm_v7)(h, xd.0, wd.0, cd.0, yd.0, 8, &mut found, perf.as_mut_ptr()))?;
                let c: Vec<_> = perf[..found.clamp(0, 8) as usize].iter().map(|r| (r.algo, r.status, r.memory, r.determinism, r.mathType)).collect();
                pick(&c, f32_exact).map(|(a, m)| (Algo::Forward(a), m))
            }
            Pass::BackwardData => {
                let mut perf: [dnn::cudnnConvolutionBwdDataAlgoPerf_t; 8] = std::mem::zeroed();
                check("choosing a backward-data algorithm", (api.cudnnGetConvolutionBackwardDataAlgorithm_v7)(h, wd.0, yd.0, cd.0, xd.0, 8, &mut found, perf.as_mut_ptr()))?;
                let c: Vec<_> = perf[..found.clamp(0, 8) as usize].iter().map(|r| (r.algo, r.status, r.memory, r.determinism, r.mathType)).collect();
                pick(&c, f32_exact).map(|(a, m)| (Algo::BackwardData(a), m))
            }
            Pass::BackwardFilter => {
                let mut perf: [dnn::cudnnConvolutionBwdFilterAlgoPerf_t; 8] = std::mem::zeroed();
                check("choosing a backward-filter algorithm", (api.cudnnGetConvolutionBackwardFilterAlgorithm_v7)(h, xd.0, yd.0, cd.0, wd.0, 8, &mut found, perf.as_mut_ptr()))?;
                let c: Vec<_> = perf[..found.clamp(0, 8) as usize].iter().map(|r| (r.algo, r.status, r.memory, r.determinism, r.mathType)).collect();
                pick(&c, f32_exact).map(|(a, m)| (Algo::BackwardFilter(a), m))
            }
        })
    }
}

/// The fastest usable algorithm for `pass` by trial runs on the pass's own buffers (`ptrs`) with
/// workspace `ws`; None when the trials fail or find nothing usable (the caller falls back to
/// the heuristics).
fn find_algorithm(api: &libs::CudnnApi, h: dnn::cudnnHandle_t, pass: Pass, (xd, wd, yd, cd): Descs, ptrs: &Ptrs, ws: &super::CudaBlock, f32_exact: bool) -> Option<(Algo, dnn::cudnnMathType_t)> {
    let (p0, p1, p2) = (ptrs.0 as usize as *const c_void, ptrs.1 as usize as *const c_void, ptrs.2 as usize as *mut c_void);
    let (w, wn) = (ws.ptr() as usize as *mut c_void, ws.capacity());
    let ok = dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
    let mut found = 0i32;
    // SAFETY: zeroed perf results are valid values that cuDNN overwrites (only the first `found`
    // are read); all descriptors are live; the buffers hold the shapes the descriptors give and
    // the workspace `wn` bytes.
    unsafe {
        match pass {
            Pass::Forward => {
                let mut perf: [dnn::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
                if (api.cudnnFindConvolutionForwardAlgorithmEx)(h, xd.0, p0, wd.0, p1, cd.0, yd.0, p2, 8, &mut found, perf.as_mut_ptr(), w, wn) != ok {
                    return None;
                }
                let c: Vec<_> = perf[..found.clamp(0, 8) as usize].iter().map(|r| (r.algo, r.status, r.memory, r.determinism, r.mathType)).collect();
                pick(&c, f32_exact).map(|(a, m)| (Algo::Forward(a), m))
            }
            Pass::BackwardData => {
                let mut perf: [dnn::cudnnConvolutionBwdDataAlgoPerf_t; 8] = std::mem::zeroed();
                if (api.cudnnFindConvolutionBackwardDataAlgorithmEx)(h, wd.0, p0, yd.0, p1, cd.0, xd.0, p2, 8, &mut found, perf.as_mut_ptr(), w, wn) != ok {
                    return None;
                }
                let c: Vec<_> = perf[..found.clamp(0, 8) as usize].iter().map(|r| (r.algo, r.status, r.memory, r.determinism, r.mathType)).collect();
                pick(&c, f32_exact).map(|(a, m)| (Algo::BackwardData(a), m))
            }
            Pass::BackwardFilter => {
                let mut perf: [dnn::cudnnConvolutionBwdFilterAlgoPerf_t; 8] = std::mem::zeroed();
                if (api.cudnnFindConvolutionBackwardFilterAlgorithmEx)(h, xd.0, p0, yd.0, p1, cd.0, wd.0, p2, 8, &mut found, perf.as_mut_ptr(), w, wn) != ok {
                    return None;
                }
                let c: Vec<_> = perf[..found.clamp(0, 8) as usize].iter().map(|r| (r.algo, r.status, r.memory, r.determinism, r.mathType)).collect();
                pick(&c, f32_exact).map(|(a, m)| (Algo::BackwardFilter(a), m))
            }
        }
    }
}

/// Runs one pass in format `f`; Ok(false) when cuDNN has no algorithm for it.
#[allow(clippy::too_many_arguments)]
fn run(dev: &Arc<CudaDevice>, pass: Pass, dtype: DType, f: Format, xs: [usize; 4], ws: [usize; 4], ys: [usize; 4], p: Conv2dParams, ptrs: Ptrs) -> Result<bool> {
    let lib = libs::cudnn()?;
    let api = &lib.api;
    let dt = data_type("conv2d (CUDA)", dtype)?;
    let f32_exact = dtype == DType::F32;
    let base_math = if f32_exact { dnn::cudnnMathType_t::CUDNN_FMA_MATH } else { dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH };
    let (xd, wd, yd, cd) = (TensorDesc::new(dt, xs, f)?, FilterDesc::new(dt, ws, f)?, TensorDesc::new(dt, ys, f)?, ConvDesc::new(p, base_math)?);
    let (mut on, mut oc, mut oh, mut ow) = (0i32, 0i32, 0i32, 0i32);
    // SAFETY: live descriptors; out-pointers to locals.
    check("computing the output size", unsafe { (api.cudnnGetConvolution2dForwardOutputDim)(cd.0, xd.0, wd.0, &mut on, &mut oc, &mut oh, &mut ow) })?;
    if [on, oc, oh, ow].map(|v| v as usize) != ys {
        return Err(Error::Cuda(format!("cuDNN computes output [{on}, {oc}, {oh}, {ow}] for input {xs:?}, weight {ws:?}, {p:?}; expected {ys:?}")));
    }
    dev.bind()?;
    let mut handles = lock(handles());
    let handle = match handles.entry(dev.ordinal()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut raw = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; the device's context is current.
            // The first call that needs the GPU: a failure names the library in use.
            check("creating a handle", unsafe { (api.cudnnCreate)(&mut raw) }).map_err(|e| Error::Cuda(format!("{e} ({})", lib.describe())))?;
            let h = Handle { raw, algos: HashMap::new() };
            // SAFETY: a live handle and the device's live stream.
            check("setting the stream", unsafe { (api.cudnnSetStream)(h.raw, dev.stream().cu_stream() as dnn::cudaStream_t) })?;
            e.insert(h)
        }
    };
    let key = Key { pass, dtype, format: f, x: xs, w: ws, stride: p.stride, padding: p.padding, dilation: p.dilation, groups: p.groups };
    let choice = match handle.algos.get(&key) {
        Some(c) => *c,
        None => {
            // With LOOKAHEAD_CUDNN_AUTOTUNE=1: trial runs (cudnnFind*Ex on the call's own buffers,
            // once per shape; the output they write is overwritten below), as PyTorch's
            // cudnn.benchmark; where they fail or find nothing usable, the _v7 heuristics. Opt-in
            // and not yet run on a GPU: the heuristics' picks ran at 0.45-0.62x PyTorch's cuDNN
            // convolutions at SDXL's 3x3 shapes on an H200 (benches/RESULTS.md, 2026-11-28).
            let autotune = std::env::var("LOOKAHEAD_CUDNN_AUTOTUNE").is_ok_and(|v| v == "1");
            let trial_ws = if autotune { dev.alloc(MAX_WORKSPACE).or_else(|_| dev.alloc(MAX_WORKSPACE / 8)).ok() } else { None };
            let trials = match &trial_ws {
                Some(w) => find_algorithm(api, handle.raw, pass, (&xd, &wd, &yd, &cd), &ptrs, w, f32_exact),
                None => None,
            };
            let c = match trials {
                Some(c) => Some(c),
                None => heuristic_algorithm(api, handle.raw, pass, (&xd, &wd, &yd, &cd), f32_exact)?,
            };
            handle.algos.insert(key, c);
            c
        }
    };
    let Some((algo, math)) = choice else { return Ok(false) };
    if !f32_exact {
        cd.set_math(math)?;
    }
    let mut ws_bytes = 0usize;
    // SAFETY: live descriptors; out-pointer to a local.
    unsafe {
        match algo {
            Algo::Forward(a) => check("sizing the forward workspace", (api.cudnnGetConvolutionForwardWorkspaceSize)(handle.raw, xd.0, wd.0, cd.0, yd.0, a, &mut ws_bytes))?,
            Algo::BackwardData(a) => check("sizing the backward-data workspace", (api.cudnnGetConvolutionBackwardDataWorkspaceSize)(handle.raw, wd.0, yd.0, cd.0, xd.0, a, &mut ws_bytes))?,
            Algo::BackwardFilter(a) => check("sizing the backward-filter workspace", (api.cudnnGetConvolutionBackwardFilterWorkspaceSize)(handle.raw, xd.0, yd.0, cd.0, wd.0, a, &mut ws_bytes))?,
        }
    }
    let workspace = dev.alloc(ws_bytes)?;
    let wsp = workspace.ptr() as usize as *mut c_void;
    let (alpha, beta) = (1f32, 0f32);
    let (al, be) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
    let (p0, p1, p2) = (ptrs.0 as usize as *const c_void, ptrs.1 as usize as *const c_void, ptrs.2 as usize as *mut c_void);
    let what = format!("{pass:?} convolution of {xs:?} with {ws:?} ({dtype}, {f:?}, {p:?})");
    // SAFETY: every pointer addresses a packed tensor in format `f` of the shape its descriptor
    // gives (prepared by the callers), the workspace holds `ws_bytes`, and the handle's stream is
    // the device's stream, ordered after the work that produced the inputs.
    dev.profile_mark("cuDNN convolution");
    let status = unsafe {
        match algo {
            Algo::Forward(a) => (api.cudnnConvolutionForward)(handle.raw, al, xd.0, p0, wd.0, p1, cd.0, a, wsp, ws_bytes, be, yd.0, p2),
            Algo::BackwardData(a) => (api.cudnnConvolutionBackwardData)(handle.raw, al, wd.0, p0, yd.0, p1, cd.0, a, wsp, ws_bytes, be, xd.0, p2),
            Algo::BackwardFilter(a) => (api.cudnnConvolutionBackwardFilter)(handle.raw, al, xd.0, p0, yd.0, p1, cd.0, a, wsp, ws_bytes, be, wd.0, p2),
        }
    };
    if status == dnn::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED {
        handle.algos.insert(key, None);
        return Ok(false);
    }
    check(&what, status)?;
    Ok(true)
}

fn shape4(t: &Tensor) -> [usize; 4] {
    t.shape().try_into().expect("4-D, checked by the op")
}

fn device_of(t: &Tensor) -> Result<Arc<CudaDevice>> {
    match &*t.read_storage() {
        Storage::Cuda(s) => Ok(s.device().clone()),
        Storage::Cpu(_) => Err(Error::Cuda("cuDNN convolution: operand is not on a CUDA device".into())),
    }
}

/// Runs `pass` in the main operand's format, then (if cuDNN has no algorithm for NHWC) as NCHW.
/// `operands` are the pass's two inputs; returns the output tensor (logical `out_shape`).
#[allow(clippy::too_many_arguments)]
fn convolve(pass: Pass, main: &Tensor, operands: [&Tensor; 2], xs: [usize; 4], ws: [usize; 4], ys: [usize; 4], out_shape: [usize; 4], p: Conv2dParams) -> Result<Tensor> {
    libs::cudnn()?;
    let dev = device_of(main)?;
    let dtype = main.dtype();
    let first = format_of(main);
    // Once for NCHW; NHWC first and then NCHW for channels-last operands.
    for f in [first, Format::Nchw] {
        let a = in_format(operands[0], f, dtype)?;
        let b = in_format(operands[1], f, dtype)?;
        let out = alloc_in_format(&dev, dtype, out_shape, f)?;
        if run(&dev, pass, dtype, f, xs, ws, ys, p, Ptrs(ptr_of(&a)?, ptr_of(&b)?, ptr_of(&out)?))? {
            return Ok(out);
        }
        if f == Format::Nchw {
            break;
        }
    }
    Err(Error::Cuda(format!("cuDNN has no {pass:?} algorithm for input {xs:?}, weight {ws:?}, {p:?} ({dtype})")))
}

/// y = conv2d(x, w) + bias on CUDA (shapes validated by the op).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams, oh: usize, ow: usize) -> Result<Tensor> {
    let (xs, ws) = (shape4(x), shape4(w));
    let ys = [xs[0], ws[0], oh, ow];
    let y = if ys.contains(&0) || xs.contains(&0) || ws.contains(&0) {
        // Empty input, output or kernel: zeros (cuDNN rejects zero sizes).
        Tensor::zeros(&ys, x.dtype(), x.device())?
    } else {
        convolve(Pass::Forward, x, [x, w], xs, ws, ys, ys, p)?
    };
    let Some(bias) = bias else { return Ok(y) };
    if y.elem_count() == 0 {
        return Ok(y);
    }
    // The bias add keeps the result's memory format: on a channels-last result it runs over the
    // physical [N, OH, OW, O] order.
    if format_of(&y) == Format::Nhwc {
        y.permute(&[0, 2, 3, 1])?.add(bias)?.permute(&[0, 3, 1, 2])
    } else {
        y.add(&bias.reshape(&[ys[1], 1, 1])?)
    }
}

/// d loss / d input on CUDA, in `grad_out`'s dtype and memory format.
pub fn conv2d_backward_input(grad_out: &Tensor, w: &Tensor, input_shape: [usize; 4], p: Conv2dParams) -> Result<Tensor> {
    let (ys, ws) = (shape4(grad_out), shape4(w));
    if ys.contains(&0) || input_shape.contains(&0) || ws.contains(&0) {
        return Tensor::zeros(&input_shape, grad_out.dtype(), grad_out.device());
    }
    convolve(Pass::BackwardData, grad_out, [w, grad_out], input_shape, ws, ys, input_shape, p)
}

/// d loss / d weight on CUDA, in `grad_out`'s dtype, contiguous [O, C / groups, kH, kW].
pub fn conv2d_backward_weight(x: &Tensor, grad_out: &Tensor, weight_shape: [usize; 4], p: Conv2dParams) -> Result<Tensor> {
    let (xs, ys) = (shape4(x), shape4(grad_out));
    if ys.contains(&0) || xs.contains(&0) || weight_shape.contains(&0) {
        return Tensor::zeros(&weight_shape, grad_out.dtype(), grad_out.device());
    }
    let x = if x.dtype() != grad_out.dtype() { x.to_dtype(grad_out.dtype())? } else { x.clone() };
    convolve(Pass::BackwardFilter, &x, [&x, grad_out], xs, weight_shape, ys, weight_shape, p)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_strides() {
        // [2, 3, 4, 5] contiguous: NCHW; its channels-last twin: NHWC.
        assert!(Format::Nchw.packs(&[2, 3, 4, 5], &[60, 20, 5, 1]));
        assert!(!Format::Nhwc.packs(&[2, 3, 4, 5], &[60, 20, 5, 1]));
        assert_eq!(Format::Nhwc.strides([2, 3, 4, 5]), [60, 1, 15, 3]);
        assert!(Format::Nhwc.packs(&[2, 3, 4, 5], &[60, 1, 15, 3]));
        // Size-1 dims: any stride.
        assert!(Format::Nchw.packs(&[1, 3, 1, 5], &[999, 5, 7, 1]));
        // A narrowed view is neither.
        assert!(!Format::Nchw.packs(&[2, 3, 4, 4], &[60, 20, 5, 1]));
        assert!(!Format::Nhwc.packs(&[2, 3, 4, 4], &[60, 1, 15, 3]));
    }

    #[test]
    fn pick_prefers_deterministic_and_honours_exact_f32() {
        use dnn::cudnnDeterminism_t::*;
        use dnn::cudnnMathType_t::*;
        use dnn::cudnnStatus_t::*;
        let c = [
            (0u8, CUDNN_STATUS_NOT_SUPPORTED, 0, CUDNN_DETERMINISTIC, CUDNN_DEFAULT_MATH),
            (1, CUDNN_STATUS_SUCCESS, 0, CUDNN_NON_DETERMINISTIC, CUDNN_TENSOR_OP_MATH),
            (2, CUDNN_STATUS_SUCCESS, MAX_WORKSPACE + 1, CUDNN_DETERMINISTIC, CUDNN_DEFAULT_MATH),
            (3, CUDNN_STATUS_SUCCESS, 0, CUDNN_NON_DETERMINISTIC, CUDNN_FMA_MATH),
            (4, CUDNN_STATUS_SUCCESS, 0, CUDNN_DETERMINISTIC, CUDNN_TENSOR_OP_MATH),
        ];
        assert_eq!(pick(&c, false).map(|x| x.0), Some(4));
        assert_eq!(pick(&c, true).map(|x| x.0), Some(3));
        assert_eq!(pick(&c[..1], false), None);
    }

    /// cuDNN's host-side descriptor calls need no GPU: where the library is found, check that our
    /// descriptors are accepted and that cuDNN computes the output size conv2d validated.
    #[test]
    fn descriptors_are_accepted_where_cudnn_loads() {
        let api = match libs::cudnn() {
            Ok(c) => &c.api,
            Err(e) => {
                { use std::io::Write; let _ = writeln!(std::io::stderr(), "descriptors_are_accepted_where_cudnn_loads: skipped: {e}"); }
                return;
            }
        };
        let p = Conv2dParams { stride: [2, 1], padding: [1, 2], dilation: [1, 2], groups: 2 };
        for f in [Format::Nchw, Format::Nhwc] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let dt = data_type("t", dtype).unwrap();
                let (xs, ws) = ([2, 4, 7, 9], [6, 2, 3, 2]);
                let (xd, wd, cd) = (TensorDesc::new(dt, xs, f).unwrap(), FilterDesc::new(dt, ws, f).unwrap(), ConvDesc::new(p, dnn::cudnnMathType_t::CUDNN_FMA_MATH).unwrap());
                let (mut n, mut c, mut h, mut w) = (0, 0, 0, 0);
                check("out dim", unsafe { (api.cudnnGetConvolution2dForwardOutputDim)(cd.0, xd.0, wd.0, &mut n, &mut c, &mut h, &mut w) }).unwrap();
                // (7 + 2 - 3) / 2 + 1 = 4; (9 + 4 - (2 * 1 + 1)) / 1 + 1 = 11.
                assert_eq!([n, c, h, w], [2, 6, 4, 11], "{f:?} {dtype}");
            }
        }
    }
}
