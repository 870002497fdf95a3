//! Matrix products on CUDA through cuBLASLt (loaded dynamically, see libs.rs).
//!
//! Our tensors are row-major views; cuBLASLt is column-major. A row-major C [m, n] is the
//! column-major C^T [n, m], and C^T = B^T A^T, so each call computes D = op(X) op(Y) with
//! X from our B (cuBLASLt's "A", M = n) and Y from our A (cuBLASLt's "B", N = m), K = k. A view
//! whose last two dims are row-major (unit column stride) is already the column-major transpose
//! (op N); one that is column-major (unit row stride, a `.t()` view) is read with op T. Only views
//! that are neither (e.g. both strides > 1) are copied first. Broadcast batch dims become stride-0
//! strided batches; batch dims that do not merge into one stride per operand become a loop of
//! calls over the outer ones.
//!
//! Precision: bf16/f16 inputs and outputs with f32 accumulation (CUBLAS_COMPUTE_32F); f32 inputs
//! also use CUBLAS_COMPUTE_32F, i.e. plain f32 FMA, not TF32 (exact f32, as the CPU backend; TF32
//! would be CUBLAS_COMPUTE_32F_FAST_TF32 and ~2x faster but loses 13 mantissa bits).
//!
//! `linear`'s bias uses the CUBLASLT_EPILOGUE_BIAS epilogue (bias per row of D = per output
//! feature), added in f32 before the final rounding; where no algorithm supports the epilogue the
//! bias is added by a separate element-wise kernel. The algorithm comes from cuBLASLt's heuristic
//! and is cached per shape, strides, dtype and pointer alignment; the workspace is taken from our
//! allocator for each call (a pooled block, so no cuMemAlloc after the first).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::sys as lt;

use super::device::{lock, CudaDevice};
use super::libs;
use crate::layout::Layout;
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// How a [rows, cols] view with strides (rs, cs) maps onto a column-major matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    /// Unit column stride: rows of `ld` elements (the column-major transpose, op N).
    Row,
    /// Unit row stride: columns of `ld` elements (the column-major matrix itself, op T).
    Col,
}

/// The order and leading dimension a [rows, cols] view with strides (rs, cs) can be read with in
/// place, or None when it must be copied. Strides of size-1 dims do not matter.
pub fn matrix_form(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(Order, usize)> {
    if (cs == 1 || cols <= 1) && (rows <= 1 || rs >= cols.max(1)) {
        return Some((Order::Row, if rows <= 1 { cols.max(1) } else { rs }));
    }
    if (rs == 1 || rows <= 1) && (cols <= 1 || cs >= rows.max(1)) {
        return Some((Order::Col, if cols <= 1 { rows.max(1) } else { cs }));
    }
    None
}

/// Batch dims (size, stride of a, stride of b, stride of the contiguous output), size-1 dims
/// dropped and neighbours merged where every operand steps uniformly across both; at least one.
pub fn merge_batch(batch: &[usize], sa: &[usize], sb: &[usize], mn: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut sc = vec![0usize; batch.len()];
    let mut acc = mn;
    for d in (0..batch.len()).rev() {
        sc[d] = acc;
        acc *= batch[d];
    }
    let mut dims: Vec<(usize, usize, usize, usize)> = Vec::new();
    for d in 0..batch.len() {
        let size = batch[d];
        if size == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut() {
            if last.1 == sa[d] * size && last.2 == sb[d] * size && last.3 == sc[d] * size {
                *last = (last.0 * size, sa[d], sb[d], sc[d]);
                continue;
            }
        }
        dims.push((size, sa[d], sb[d], sc[d]));
    }
    if dims.is_empty() {
        dims.push((1, 0, 0, mn));
    }
    dims
}

fn data_type(op: &'static str, dtype: DType) -> Result<lt::cudaDataType_t> {
    match dtype {
        DType::F32 => Ok(lt::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(lt::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(lt::cudaDataType_t::CUDA_R_16F),
        _ => Err(Error::UnsupportedDType { op, dtype }),
    }
}

/// The largest power of two (up to 256) dividing every value: the byte alignment cuBLASLt may
/// assume for every matrix of a batch.
fn alignment(values: &[u64]) -> u32 {
    let mut a = 256u64;
    for &v in values {
        if v != 0 {
            a = a.min(1 << v.trailing_zeros());
        }
    }
    a as u32
}

fn cublas_error(what: &str, e: lt::cublasStatus_t) -> Error {
    Error::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

fn check(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(cublas_error(what, s))
    }
}

/// The cuBLASLt functions, from the library libs.rs found (never through cudarc's loader).
fn api() -> Result<&'static libs::CublasLtApi> {
    Ok(&libs::cublaslt()?.api)
}

// ---- descriptors (destroyed on drop) --------------------------------------------------------

struct Desc(lt::cublasLtMatmulDesc_t, &'static libs::CublasLtApi);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate, destroyed once.
        unsafe { (self.1.cublasLtMatmulDescDestroy)(self.0) };
    }
}
impl Desc {
    fn new() -> Result<Desc> {
        let api = api()?;
        let mut d = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("creating a matmul descriptor", unsafe { (api.cublasLtMatmulDescCreate)(&mut d, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType_t::CUDA_R_32F) })?;
        Ok(Desc(d, api))
    }
    fn set<T>(&self, attr: lt::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
        // SAFETY: `v` is the attribute's C type (checked at each call site), read during the call.
        check("setting a matmul attribute", unsafe { (self.1.cublasLtMatmulDescSetAttribute)(self.0, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) })
    }
}

struct MatLayout(lt::cublasLtMatrixLayout_t, &'static libs::CublasLtApi);
impl Drop for MatLayout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate, destroyed once.
        unsafe { (self.1.cublasLtMatrixLayoutDestroy)(self.0) };
    }
}
impl MatLayout {
    /// Column-major rows x cols with leading dimension ld; `batch` matrices `stride` elements apart.
    fn new(dt: lt::cudaDataType_t, rows: usize, cols: usize, ld: usize, batch: usize, stride: usize) -> Result<MatLayout> {
        let api = api()?;
        let mut l = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("creating a matrix layout", unsafe { (api.cublasLtMatrixLayoutCreate)(&mut l, dt, rows as u64, cols as u64, ld as i64) })?;
        let l = MatLayout(l, api);
        if batch > 1 {
            let count = i32::try_from(batch).map_err(|_| Error::Cuda(format!("cuBLASLt: batch of {batch} matrices exceeds i32")))?;
            let stride = stride as i64;
            // SAFETY: BATCH_COUNT is int32_t, STRIDED_BATCH_OFFSET is int64_t.
            unsafe {
                check("setting the batch count", (api.cublasLtMatrixLayoutSetAttribute)(l.0, lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count as *const i32 as *const c_void, 4))?;
                check("setting the batch stride", (api.cublasLtMatrixLayoutSetAttribute)(l.0, lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride as *const i64 as *const c_void, 8))?;
            }
        }
        Ok(l)
    }
}

struct Pref(lt::cublasLtMatmulPreference_t, &'static libs::CublasLtApi);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate, destroyed once.
        unsafe { (self.1.cublasLtMatmulPreferenceDestroy)(self.0) };
    }
}
impl Pref {
    fn new(workspace: u64, align: [u32; 3]) -> Result<Pref> {
        let api = api()?;
        let mut p = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("creating a matmul preference", unsafe { (api.cublasLtMatmulPreferenceCreate)(&mut p) })?;
        let p = Pref(p, api);
        use lt::cublasLtMatmulPreferenceAttributes_t as A;
        // SAFETY: MAX_WORKSPACE_BYTES is uint64_t; the MIN_ALIGNMENT_* are uint32_t.
        unsafe {
            check("setting the workspace size", (api.cublasLtMatmulPreferenceSetAttribute)(p.0, A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace as *const u64 as *const c_void, 8))?;
            for (attr, v) in [(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0]), (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1]), (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2]), (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2])] {
                check("setting an alignment", (api.cublasLtMatmulPreferenceSetAttribute)(p.0, attr, v as *const u32 as *const c_void, 4))?;
            }
        }
        Ok(p)
    }
}

// ---- per-device handle and algorithm cache --------------------------------------------------

/// Everything that decides the algorithm (cuBLASLt terms: M = n, N = m).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    dtype: DType,
    out_dtype: DType,
    x: (Order, usize),
    y: (Order, usize),
    mnk: (usize, usize, usize),
    batch: usize,
    strides: (usize, usize),
    align: [u32; 3],
    bias: bool,
}

struct Handle {
    raw: lt::cublasLtHandle_t,
    /// None: no algorithm (e.g. the bias epilogue unsupported for this shape).
    algos: HashMap<Key, Option<(lt::cublasLtMatmulAlgo_t, usize)>>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; ours is only used under the mutex.
unsafe impl Send for Handle {}

fn handles() -> &'static Mutex<HashMap<usize, Handle>> {
    static H: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();
    H.get_or_init(Default::default)
}

/// The largest workspace we offer an algorithm (NVIDIA's recommendation: 32 MiB on Hopper, 4 MiB
/// before).
fn max_workspace(dev: &CudaDevice) -> usize {
    if dev.arch() >= 90 {
        32 << 20
    } else {
        4 << 20
    }
}

/// Checks that cuBLASLt can be used (library found, loadable, new enough); says which file.
pub fn probe_cublaslt() -> Result<String> {
    libs::cublaslt().map(|l| l.describe())
}

// ---- the op ---------------------------------------------------------------------------------

/// One operand as cuBLASLt reads it: device address of its first element and its layout.
struct Operand {
    ptr: u64,
    layout: Layout,
}

fn operand(t: &Tensor, full: &[usize]) -> Result<(Arc<CudaDevice>, Operand)> {
    let layout = t.layout().broadcast_to(full)?;
    let guard = t.read_storage();
    let Storage::Cuda(s) = &*guard else { return Err(Error::Cuda("cuBLASLt matmul: operand is not on a CUDA device".into())) };
    Ok((s.device().clone(), Operand { ptr: s.ptr_at(layout.offset()), layout }))
}

/// a [..., m, k] · b [..., k, n] (+ bias [n] on every row) on CUDA; `batch` is the broadcast of
/// the leading dims (shapes, dtypes and devices already checked by the caller).
pub fn matmul_bias(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, batch: &[usize], m: usize, k: usize, n: usize) -> Result<Tensor> {
    gemm(a, b, bias, batch, (m, k, n), 1.0, a.dtype())
}

/// alpha · (a [..., m, k] · b [..., k, n]) with leading dims broadcast, written as `out_dtype`
/// (the inputs' dtype, or f32 from bf16/f16 inputs: cuBLASLt then rounds only once, to f32).
/// Used by attention for f32 scores.
pub fn matmul_scaled(a: &Tensor, b: &Tensor, alpha: f32, out_dtype: DType) -> Result<Tensor> {
    const OP: &str = "matmul_scaled (CUDA)";
    a.same_device(b, OP)?;
    a.same_dtype(b, OP)?;
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 || a.shape()[ra - 1] != b.shape()[rb - 2] {
        return Err(Error::ShapeMismatch { op: OP, lhs: a.shape().to_vec(), rhs: b.shape().to_vec() });
    }
    let batch = crate::layout::broadcast_shape(OP, &a.shape()[..ra - 2], &b.shape()[..rb - 2])?;
    gemm(a, b, None, &batch, (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 1]), alpha, out_dtype)
}

fn gemm(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, batch: &[usize], (m, k, n): (usize, usize, usize), alpha: f32, out_dtype: DType) -> Result<Tensor> {
    const OP: &str = "matmul (CUDA)";
    let dtype = a.dtype();
    let dt = data_type(OP, dtype)?;
    let dt_out = data_type(OP, out_dtype)?;
    if out_dtype != dtype && out_dtype != DType::F32 {
        return Err(Error::DTypeMismatch { op: "matmul (CUDA output dtype)", lhs: dtype, rhs: out_dtype });
    }
    if bias.is_some() && out_dtype != dtype {
        return Err(Error::DTypeMismatch { op: "matmul (CUDA bias with another output dtype)", lhs: dtype, rhs: out_dtype });
    }
    let mut out_shape = batch.to_vec();
    out_shape.extend([m, n]);
    let batch_count: usize = batch.iter().product();
    if batch_count == 0 || m == 0 || n == 0 || k == 0 {
        // Empty products: zeros (plus the bias), no library call.
        let z = Tensor::zeros(&out_shape, out_dtype, a.device())?;
        return match bias {
            Some(bias) if z.elem_count() > 0 => z.add(bias),
            _ => Ok(z),
        };
    }
    let lib = libs::cublaslt()?;
    let api = &lib.api;
    let nb = batch.len();
    let full = |r: usize, c: usize| -> Vec<usize> { batch.iter().copied().chain([r, c]).collect() };
    // Views no GEMM can read in place are copied to row-major first.
    let readable = |t: &Tensor, r: usize, c: usize| -> Result<Tensor> {
        let l = t.layout().broadcast_to(&full(r, c))?;
        Ok(if matrix_form(r, c, l.strides()[nb], l.strides()[nb + 1]).is_some() { t.clone() } else { t.contiguous()? })
    };
    let (a, b) = (readable(a, m, k)?, readable(b, k, n)?);
    let (dev, oa) = operand(&a, &full(m, k))?;
    let (_, ob) = operand(&b, &full(k, n))?;
    let (sa, sb) = (oa.layout.strides(), ob.layout.strides());
    let fa = matrix_form(m, k, sa[nb], sa[nb + 1]).expect("made readable above");
    let fb = matrix_form(k, n, sb[nb], sb[nb + 1]).expect("made readable above");
    let mut dims = merge_batch(batch, &sa[..nb], &sb[..nb], m * n);
    let mut m_eff = m;
    // [batch, m, k] row-major with the rows of consecutive batches adjacent, times one shared b:
    // one GEMM with batch * m rows.
    if let [(size, stride_a, 0, _)] = dims[..] {
        if fa.0 == Order::Row && (m == 1 || fa.1 == sa[nb]) && stride_a == m * fa.1 {
            m_eff = size * m;
            dims = vec![(1, 0, 0, m_eff * n)];
        }
    }
    let (inner, outer) = dims.split_last().expect("at least one batch dim");
    let &(count, stride_a, stride_b, stride_c) = inner;

    let out = super::CudaStorage::alloc(&dev, out_dtype, batch_count * m * n)?;
    let size = dtype.size_in_bytes() as u64;
    let size_out = out_dtype.size_in_bytes() as u64;
    // The offsets (elements) of every outer batch index, for a, b and the output.
    let mut offsets = vec![(0usize, 0usize, 0usize)];
    for &(sz, da, db, dc) in outer {
        offsets = offsets.iter().flat_map(|&(x, y, z)| (0..sz).map(move |i| (x + i * da, y + i * db, z + i * dc))).collect();
    }
    let steps = |base: u64, inner_stride: usize, size: u64, pick: fn(&(usize, usize, usize)) -> usize| -> Vec<u64> {
        let mut v = vec![base, inner_stride as u64 * size];
        v.extend(offsets.iter().map(|o| pick(o) as u64 * size));
        v
    };
    let align = [alignment(&steps(ob.ptr, stride_b, size, |o| o.1)), alignment(&steps(oa.ptr, stride_a, size, |o| o.0)), alignment(&steps(out.device_ptr(), stride_c, size_out, |o| o.2))];

    // Bias: a dense, aligned vector of n elements.
    let bias_t = match bias {
        Some(t) => {
            let c = t.contiguous()?;
            let guard = c.read_storage();
            let Storage::Cuda(s) = &*guard else { return Err(Error::Cuda("matmul bias is not on a CUDA device".into())) };
            let aligned = s.ptr_at(c.layout().offset()) % 16 == 0;
            drop(guard);
            Some(if aligned { c } else { t.copy()? })
        }
        None => None,
    };
    let bias_ptr = match &bias_t {
        Some(t) => {
            let guard = t.read_storage();
            let Storage::Cuda(s) = &*guard else { unreachable!("checked above") };
            Some(s.ptr_at(t.layout().offset()))
        }
        None => None,
    };

    let key = |with_bias: bool| Key { dtype, out_dtype, x: fb, y: fa, mnk: (n, m_eff, k), batch: count, strides: (stride_b, stride_a), align, bias: with_bias };
    // cuBLASLt's A is X (from b), its B is Y (from a).
    let x_rows_cols = match fb.0 {
        Order::Row => (n, k),
        Order::Col => (k, n),
    };
    let y_rows_cols = match fa.0 {
        Order::Row => (k, m_eff),
        Order::Col => (m_eff, k),
    };
    let lx = MatLayout::new(dt, x_rows_cols.0, x_rows_cols.1, fb.1, count, stride_b)?;
    let ly = MatLayout::new(dt, y_rows_cols.0, y_rows_cols.1, fa.1, count, stride_a)?;
    let ld = MatLayout::new(dt_out, n, m_eff, n, count, stride_c)?;
    let desc_for = |with_bias: Option<u64>| -> Result<Desc> {
        let desc = Desc::new()?;
        let op = |o: Order| -> i32 {
            match o {
                Order::Row => 0, // CUBLAS_OP_N
                Order::Col => 1, // CUBLAS_OP_T
            }
        };
        desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op(fb.0))?;
        desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op(fa.0))?;
        if let Some(ptr) = with_bias {
            desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &(lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32))?;
            desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
        }
        Ok(desc)
    };

    dev.bind()?;
    let mut handles = lock(handles());
    let handle = match handles.entry(dev.ordinal()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut raw = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; the device's context is current.
            check("creating a handle", unsafe { (api.cublasLtCreate)(&mut raw) }).map_err(|e| Error::Cuda(format!("{e} ({})", lib.describe())))?;
            e.insert(Handle { raw, algos: HashMap::new() })
        }
    };
    let max_ws = max_workspace(&dev);
    let mut choose = |desc: &Desc, key: Key| -> Result<Option<(lt::cublasLtMatmulAlgo_t, usize)>> {
        if let Some(found) = handle.algos.get(&key) {
            return Ok(*found);
        }
        let pref = Pref::new(max_ws as u64, align)?;
        // SAFETY: zeroed heuristic results are valid values (status 0 = success) that cuBLASLt
        // overwrites; all descriptors are live.
        let mut results: [lt::cublasLtMatmulHeuristicResult_t; 8] = unsafe { std::mem::zeroed() };
        let mut found = 0i32;
        let status = unsafe { (api.cublasLtMatmulAlgoGetHeuristic)(handle.raw, desc.0, lx.0, ly.0, ld.0, ld.0, pref.0, results.len() as i32, results.as_mut_ptr(), &mut found) };
        let pick = if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            results[..found.clamp(0, 8) as usize].iter().find(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= max_ws).map(|r| (r.algo, r.workspaceSize))
        } else if status == lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
            None
        } else {
            return Err(cublas_error(&format!("heuristic for {m}x{k} · {k}x{n} {dtype} (batch {count})"), status));
        };
        handle.algos.insert(key, pick);
        Ok(pick)
    };
    let mut desc = desc_for(bias_ptr)?;
    let mut algo = choose(&desc, key(bias_ptr.is_some()))?;
    let mut bias_in_epilogue = bias_ptr.is_some();
    if algo.is_none() && bias_in_epilogue {
        desc = desc_for(None)?;
        algo = choose(&desc, key(false))?;
        bias_in_epilogue = false;
    }
    let Some((algo, ws_bytes)) = algo else {
        return Err(Error::Cuda(format!("cuBLASLt has no algorithm for {m}x{k} · {k}x{n} {dtype} (batch {count}, ops {:?}/{:?})", fa.0, fb.0)));
    };
    let workspace = dev.alloc(ws_bytes)?;
    let beta = 0f32;
    let stream = dev.stream().cu_stream() as lt::cudaStream_t;
    for &(off_a, off_b, off_c) in &offsets {
        dev.profile_mark("cuBLASLt matmul");
        let (pa, pb, pc) = (oa.ptr + off_a as u64 * size, ob.ptr + off_b as u64 * size, out.device_ptr() + off_c as u64 * size_out);
        // SAFETY: every pointer addresses the matrices its layout describes (views checked by
        // the caller's shape validation and `matrix_form`), the workspace holds `ws_bytes`, and
        // everything runs on the device's stream, after the work that produced the inputs.
        let status = unsafe {
            (api.cublasLtMatmul)(
                handle.raw,
                desc.0,
                &alpha as *const f32 as *const c_void,
                pb as usize as *const c_void,
                lx.0,
                pa as usize as *const c_void,
                ly.0,
                &beta as *const f32 as *const c_void,
                pc as usize as *const c_void,
                ld.0,
                pc as usize as *mut c_void,
                ld.0,
                &algo,
                workspace.ptr() as usize as *mut c_void,
                ws_bytes,
                stream,
            )
        };
        // The message is formatted only on failure: this runs once per GEMM.
        if status != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cublas_error(&format!("matmul {m}x{k} · {k}x{n} {dtype} (batch {count})"), status));
        }
    }
    drop(handles);
    // Inputs (and the bias) stay alive until here; the stream orders their reuse after the GEMM.
    drop((a, b));
    let result = Tensor::from_storage(Storage::Cuda(out), &out_shape)?;
    match (&bias_t, bias_in_epilogue) {
        (Some(bias), false) => result.add(bias),
        _ => Ok(result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_map_to_row_or_column_major() {
        // Contiguous [3, 4]: row-major, ld 4. Its transpose: column-major, ld 4.
        assert_eq!(matrix_form(3, 4, 4, 1), Some((Order::Row, 4)));
        assert_eq!(matrix_form(4, 3, 1, 4), Some((Order::Col, 4)));
        // Narrowed columns keep the parent's row stride.
        assert_eq!(matrix_form(3, 2, 10, 1), Some((Order::Row, 10)));
        // Single rows / columns: the other stride is irrelevant.
        assert_eq!(matrix_form(1, 5, 0, 1), Some((Order::Row, 5)));
        assert_eq!(matrix_form(5, 1, 1, 0), Some((Order::Row, 1)));
        assert_eq!(matrix_form(5, 1, 3, 7), Some((Order::Row, 3)));
        assert_eq!(matrix_form(1, 1, 0, 0), Some((Order::Row, 1)));
        // Neither: strides > 1 on both axes, or a broadcast (stride 0) axis.
        assert_eq!(matrix_form(3, 4, 8, 2), None);
        assert_eq!(matrix_form(3, 4, 0, 1), None);
        assert_eq!(matrix_form(3, 4, 1, 0), None);
        // Overlapping rows (ld < cols) are not a matrix cuBLASLt accepts.
        assert_eq!(matrix_form(3, 4, 2, 1), None);
    }

    #[test]
    fn batch_dims_merge_when_strides_allow() {
        // [2, 3] batch, both contiguous [.., 4, 5] and [.., 5, 6]: one batch of 6.
        assert_eq!(merge_batch(&[2, 3], &[60, 20], &[90, 30], 24), vec![(6, 20, 30, 24)]);
        // b broadcast over the whole batch (stride 0): still one.
        assert_eq!(merge_batch(&[2, 3], &[60, 20], &[0, 0], 24), vec![(6, 20, 0, 24)]);
        // b broadcast over the first dim only: two dims (a loop over the outer one).
        assert_eq!(merge_batch(&[2, 3], &[60, 20], &[0, 30], 24), vec![(2, 60, 0, 72), (3, 20, 30, 24)]);
        // Size-1 dims vanish; no batch at all is one matrix.
        assert_eq!(merge_batch(&[1, 4, 1], &[99, 20, 7], &[0, 30, 5], 24), vec![(4, 20, 30, 24)]);
        assert_eq!(merge_batch(&[], &[], &[], 24), vec![(1, 0, 0, 24)]);
    }

    /// cuBLASLt's descriptor calls run on the host: where the library is found, check that every
    /// attribute we set is accepted with the value size we pass.
    #[test]
    fn descriptors_are_accepted_where_cublaslt_loads() {
        if let Err(e) = libs::cublaslt() {
            { use std::io::Write; let _ = writeln!(std::io::stderr(), "descriptors_are_accepted_where_cublaslt_loads: skipped: {e}"); }
            return;
        }
        let desc = Desc::new().unwrap();
        desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &1i32).unwrap();
        desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &0i32).unwrap();
        desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &(lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32)).unwrap();
        desc.set(lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &0x1000u64).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let dt = data_type("t", dtype).unwrap();
            MatLayout::new(dt, 17, 3, 20, 1, 0).unwrap();
            MatLayout::new(dt, 17, 3, 20, 5, 0).unwrap();
            MatLayout::new(dt, 17, 3, 17, 5, 51).unwrap();
        }
        Pref::new(32 << 20, [2, 16, 256]).unwrap();
    }

    #[test]
    fn alignment_is_the_common_power_of_two() {
        assert_eq!(alignment(&[0x1000, 0]), 256);
        assert_eq!(alignment(&[0x1000, 2 * 6]), 4);
        assert_eq!(alignment(&[0x1002, 64]), 2);
    }
}
