//! Flash extended attention, backward: the gradients of `Tensor::flash_attention`
//! (engine/src/ops/flash_attention.rs) with respect to q, k, v and the reference k, v, given the
//! forward's inputs, its (out, lse) and dout. P is recomputed from lse, so nothing of size
//! Lq x (Lk + Lr) is kept between the passes. Math per head: kernels::flash_attention_backward.
//!
//! CPU: one rayon task per (batch, head), each running GEMMs over blocks of query rows in f32
//! (`head_by_gemm`) on the inputs' own row strides (no copies of f32 views whose last dim is
//! contiguous); gradients are written per head, so the result does not depend on the thread count.
//! CUDA: the fused kernels (kernels/cuda/flash_attention_backward.cu, launched by
//! engine/src/cuda/flash_attention_backward.rs) for bf16/f16 with D in {64, 128} on sm_80+ (behind
//! the experimental-kernels switch until they have run on a GPU), else `composition`: existing
//! CUDA ops over the explicit concatenation.

use rayon::prelude::*;

use kernels::flash_attention::FlashDims;
use kernels::flash_attention_backward::{HeadGrads, HeadInputs, Rows};

use super::flash_attention::{flash_attention_shape, AttentionReference, FlashShape};
use crate::cpu::gemm::gemm_f32;
use crate::cpu::CpuStorage;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// Gradients of flash attention, each of its input's shape and dtype; the reference ones are Some
/// exactly when a reference was given.
#[derive(Debug)]
pub struct FlashAttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub dk_ref: Option<Tensor>,
    pub dv_ref: Option<Tensor>,
}

const OP: &str = "flash_attention_backward";

/// Checks out / dout ([B, H, Lq, D], float, q's device) and lse (f32 [B, H, Lq]).
fn check_saved(q: &Tensor, out: &Tensor, lse: &Tensor, dout: &Tensor, shape: &FlashShape) -> Result<()> {
    for (name, t) in [("out", out), ("dout", dout)] {
        q.same_device(t, OP)?;
        t.float_only(OP)?;
        if t.shape() != q.shape() {
            return Err(Error::BadShape { op: OP, msg: format!("{name} must be [B, H, Lq, D] like q {:?}", q.shape()), shape: t.shape().to_vec() });
        }
    }
    q.same_device(lse, OP)?;
    if lse.dtype() != DType::F32 {
        return Err(Error::DTypeMismatch { op: "flash_attention_backward (lse must be f32)", lhs: lse.dtype(), rhs: DType::F32 });
    }
    if lse.shape() != [shape.b, shape.h, shape.lq] {
        return Err(Error::BadShape { op: OP, msg: format!("lse must be [B, H, Lq] = [{}, {}, {}]", shape.b, shape.h, shape.lq), shape: lse.shape().to_vec() });
    }
    Ok(())
}

impl Tensor {
    /// Gradients of `flash_attention` given its inputs, its (out, lse) and dout [B, H, Lq, D].
    /// Each gradient has its input's shape and dtype. out / dout may be any float dtype (they are
    /// read in f32 on the CPU and in q's dtype by the CUDA kernels); lse is f32 [B, H, Lq].
    /// Dropped reference tokens and rows with no key (lse = -inf) get zero gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, out: &Tensor, lse: &Tensor, dout: &Tensor) -> Result<FlashAttentionGrads> {
        let shape = flash_attention_shape(OP, q, k, v, reference)?;
        check_saved(q, out, lse, dout, &shape)?;
        if q.device().is_cuda() {
            if crate::cuda::flash_attention_backward::kernel_applies(q.dtype(), shape.d) {
                return crate::cuda::flash_attention_backward::backward(q, k, v, reference, scale, out, lse, dout, &shape);
            }
            return composition(q, k, v, reference, scale, out, lse, dout, &shape);
        }
        cpu_backward(q, k, v, reference, scale, out, lse, dout, &shape)
    }
}

/// A [B, H, L, D] (or lse's [B, H, L]) view in f32 whose last dim is contiguous (converted /
/// copied only when it is not already), with each head's offset and the row stride.
struct HeadRowsView {
    data: Tensor,
    offsets: Vec<usize>,
    row_stride: usize,
}

impl HeadRowsView {
    fn new(t: &Tensor) -> Result<HeadRowsView> {
        let mut data = t.to_dtype(DType::F32)?;
        let rank = data.rank();
        if rank == 4 && data.shape()[3] > 1 && data.strides()[3] != 1 {
            data = data.contiguous()?;
        }
        let (s, o) = (data.strides().to_vec(), data.layout().offset());
        let (b, h) = (data.shape()[0], data.shape()[1]);
        let offsets = (0..b * h).map(|bh| o + (bh / h) * s[0] + (bh % h) * s[1]).collect();
        Ok(HeadRowsView { data, offsets, row_stride: s[2] })
    }
}

/// Per-head chunks of a [B, H, L, D] gradient buffer (`per` elements a head; empty ones when
/// per == 0, which chunks_mut does not allow).
fn head_chunks(v: &mut [f32], heads: usize, per: usize) -> Vec<&mut [f32]> {
    if per == 0 {
        (0..heads).map(|_| <&mut [f32]>::default()).collect()
    } else {
        v.chunks_mut(per).collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn cpu_backward(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, out: &Tensor, lse: &Tensor, dout: &Tensor, shape: &FlashShape) -> Result<FlashAttentionGrads> {
    let FlashShape { b, h, lq, lk, lr, d, keep_per_batch } = *shape;
    let heads = b * h;
    // Views in the order: q, k, v, out, dout, lse, then k_ref, v_ref when present.
    let mut views = vec![HeadRowsView::new(q)?, HeadRowsView::new(k)?, HeadRowsView::new(v)?, HeadRowsView::new(out)?, HeadRowsView::new(dout)?, HeadRowsView::new(lse)?];
    let with_reference = reference.is_some() && lr > 0;
    if let Some(r) = reference.filter(|_| with_reference) {
        views.push(HeadRowsView::new(r.k)?);
        views.push(HeadRowsView::new(r.v)?);
    }
    let keep: Option<Vec<u8>> = match reference.and_then(|r| r.keep) {
        Some(m) if with_reference => Some(m.to_vec::<u8>()?),
        _ => None,
    };
    let mut grads: Vec<Vec<f32>> = [lq, lk, lk, lr, lr].iter().map(|&l| vec![0f32; heads * l * d]).collect();
    {
        let guards: Vec<_> = views.iter().map(|t| t.data.read_storage()).collect();
        let slices = guards
            .iter()
            .map(|g| match &**g {
                Storage::Cpu(s) => s.as_slice::<f32>(),
                Storage::Cuda(_) => Err(Error::DeviceMismatch { op: OP, lhs: Device::Cuda(0), rhs: Device::Cpu }),
            })
            .collect::<Result<Vec<&[f32]>>>()?;
        let rows_of = |i: usize, bh: usize| -> Rows<'_> { Rows { data: &slices[i][views[i].offsets[bh].min(slices[i].len())..], row_stride: views[i].row_stride } };
        // Views are in bounds by construction; check anyway so that a bad layout is an error,
        // not a panic inside a rayon task.
        for bh in 0..heads {
            let lens = [lq, lk, lk, lq, lq];
            let fits = (0..5).all(|i| rows_of(i, bh).holds(lens[i], d)) && (!with_reference || (5..7).all(|i| rows_of(i + 1, bh).holds(lr, d)));
            let lse_fits = lq == 0 || views[5].offsets[bh] + (lq - 1) * views[5].row_stride < slices[5].len();
            if !fits || !lse_fits {
                return Err(Error::BadShape { op: OP, msg: "an input view reaches outside its storage".into(), shape: q.shape().to_vec() });
            }
        }
        let [dq, dk, dv, dkr, dvr] = &mut grads[..] else { unreachable!("five gradients") };
        let chunks = head_chunks(dq, heads, lq * d).into_iter().zip(head_chunks(dk, heads, lk * d)).zip(head_chunks(dv, heads, lk * d)).zip(head_chunks(dkr, heads, lr * d)).zip(head_chunks(dvr, heads, lr * d));
        let tasks: Vec<_> = chunks.enumerate().collect();
        tasks.into_par_iter().for_each(|(bh, ((((dq, dk), dv), dk_ref), dv_ref))| {
            let bi = bh / h;
            let keep_row = keep.as_deref().map(|m| if keep_per_batch { &m[bi * lr..(bi + 1) * lr] } else { m });
            let x = HeadInputs {
                q: rows_of(0, bh),
                k: rows_of(1, bh),
                v: rows_of(2, bh),
                reference: with_reference.then(|| (rows_of(6, bh), rows_of(7, bh))),
                keep: keep_row,
                out: rows_of(3, bh),
                dout: rows_of(4, bh),
                lse: rows_of(5, bh).data,
                lse_stride: views[5].row_stride,
            };
            let dims = FlashDims { lq, lk, lr: if with_reference { lr } else { 0 }, d };
            // SAFETY: every view's extent was checked above (rows of d unit-stride elements).
            unsafe { head_by_gemm(&x, dims, scale, HeadGrads { dq, dk, dv, dk_ref, dv_ref }) };
        });
    }
    let mut grads = grads.into_iter();
    let mut next = |l: usize, like: &Tensor| -> Result<Tensor> {
        let g = grads.next().expect("five gradients");
        Tensor::from_storage(Storage::Cpu(CpuStorage::from_vec(g)), &[b, h, l, d])?.to_dtype(like.dtype())
    };
    let (dq, dk, dv) = (next(lq, q)?, next(lk, k)?, next(lk, v)?);
    let (dk_ref, dv_ref) = match reference {
        Some(r) => (Some(next(lr, r.k)?), Some(next(lr, r.v)?)),
        None => (None, None),
    };
    Ok(FlashAttentionGrads { dq, dk, dv, dk_ref, dv_ref })
}

/// Query rows per block of the CPU path: the block's P and dS (QUERY_BLOCK x (Lk + Lr) f32 each)
/// stay in the cache between the products.
const QUERY_BLOCK: usize = 64;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The gradients of one head (the math of kernels::flash_attention_backward, which the tests
/// compare against) as GEMMs over blocks of QUERY_BLOCK query rows, each product single-threaded
/// (the caller runs heads in parallel; the result does not depend on the thread count):
///   P  = exp(scale Q_blk [K ; K_ref]^T - lse)  (dropped keys and rows with lse = -inf: 0)
///   dS = scale P (dO_blk [V ; V_ref]^T - delta)
///   dV += P^T dO_blk, dK += dS^T Q_blk (own and reference parts), dQ_blk = dS [K ; K_ref]
/// The gradients are zero-filled buffers on entry (every product accumulates).
///
/// # Safety
/// Every `Rows` of `x` must hold its rows (dims) of d elements (checked with `Rows::holds`).
unsafe fn head_by_gemm(x: &HeadInputs, dims: FlashDims, scale: f32, g: HeadGrads) {
    let FlashDims { lq, lk, lr, d } = dims;
    let lkv = lk + lr;
    if d == 0 || lkv == 0 || lq == 0 {
        return;
    }
    let (kr, vr) = x.reference.unwrap_or((x.k, x.v));
    let none = gemm::Parallelism::None;
    let mut p = vec![0f32; QUERY_BLOCK.min(lq) * lkv];
    let mut ds = vec![0f32; QUERY_BLOCK.min(lq) * lkv];
    for i0 in (0..lq).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(lq - i0);
        let (q_at, do_at) = (x.q.data.as_ptr().add(i0 * x.q.row_stride), x.dout.data.as_ptr().add(i0 * x.dout.row_stride));
        let (p_at, ds_at) = (p.as_mut_ptr(), ds.as_mut_ptr());
        // Scores in p, dO V^T in ds: own keys in columns 0..lk, reference keys after them.
        // rhs (d x L) element (c, j) is k[j, c].
        if lk > 0 {
            gemm_f32(rows, lk, d, p_at, lkv, 1, false, q_at, x.q.row_stride, 1, x.k.data.as_ptr(), 1, x.k.row_stride, none);
            gemm_f32(rows, lk, d, ds_at, lkv, 1, false, do_at, x.dout.row_stride, 1, x.v.data.as_ptr(), 1, x.v.row_stride, none);
        }
        if lr > 0 {
            gemm_f32(rows, lr, d, p_at.add(lk), lkv, 1, false, q_at, x.q.row_stride, 1, kr.data.as_ptr(), 1, kr.row_stride, none);
            gemm_f32(rows, lr, d, ds_at.add(lk), lkv, 1, false, do_at, x.dout.row_stride, 1, vr.data.as_ptr(), 1, vr.row_stride, none);
        }
        for (r, (pr, dsr)) in p.chunks_mut(lkv).zip(ds.chunks_mut(lkv)).take(rows).enumerate() {
            let i = i0 + r;
            let l = x.lse[i * x.lse_stride];
            if l == f32::NEG_INFINITY {
                // No key at all: nothing flows back.
                pr.fill(0.0);
                dsr.fill(0.0);
                continue;
            }
            let delta = dot(&x.dout.data[i * x.dout.row_stride..][..d], &x.out.data[i * x.out.row_stride..][..d]);
            for (j, (pv, dv)) in pr.iter_mut().zip(dsr.iter_mut()).enumerate() {
                let live = j < lk || x.keep.is_none_or(|m| m[j - lk] != 0);
                let e = if live { (scale * *pv - l).exp() } else { 0.0 };
                *pv = e;
                *dv = scale * e * (*dv - delta);
            }
        }
        // dV += P^T dO, dK += dS^T Q: lhs (L x rows) element (j, r) is p[r, j].
        let (p_at, ds_at) = (p.as_ptr(), ds.as_ptr());
        if lk > 0 {
            gemm_f32(lk, d, rows, g.dv.as_mut_ptr(), d, 1, true, p_at, 1, lkv, do_at, x.dout.row_stride, 1, none);
            gemm_f32(lk, d, rows, g.dk.as_mut_ptr(), d, 1, true, ds_at, 1, lkv, q_at, x.q.row_stride, 1, none);
            gemm_f32(rows, d, lk, g.dq.as_mut_ptr().add(i0 * d), d, 1, true, ds_at, lkv, 1, x.k.data.as_ptr(), x.k.row_stride, 1, none);
        }
        if lr > 0 {
            gemm_f32(lr, d, rows, g.dv_ref.as_mut_ptr(), d, 1, true, p_at.add(lk), 1, lkv, do_at, x.dout.row_stride, 1, none);
            gemm_f32(lr, d, rows, g.dk_ref.as_mut_ptr(), d, 1, true, ds_at.add(lk), 1, lkv, q_at, x.q.row_stride, 1, none);
            gemm_f32(rows, d, lr, g.dq.as_mut_ptr().add(i0 * d), d, 1, true, ds_at.add(lk), lkv, 1, kr.data.as_ptr(), kr.row_stride, 1, none);
        }
    }
}

/// alpha (a b) written as `out_dtype`: cuBLASLt on CUDA (f32 output from 16-bit inputs rounds
/// once), f32 GEMM on the CPU (where `composition` runs in tests).
fn scaled_product(a: &Tensor, b: &Tensor, alpha: f32, out_dtype: DType) -> Result<Tensor> {
    if a.device().is_cuda() {
        return crate::cuda::gemm::matmul_scaled(a, b, alpha, out_dtype);
    }
    a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?.mul_scalar(alpha)?.to_dtype(out_dtype)
}

/// The backward pass composed of existing ops over the explicit concatenation [k ; k_ref],
/// [v ; v_ref] (the CUDA path for dtypes and head dims the fused kernels do not take; it also runs
/// on the CPU, where the tests compare it with the per-head reference):
///   s = scale q kc^T (f32), dropped tokens -inf;  p = exp(s - lse) (rows with lse = -inf: 0)
///   dv = p^T dout;  dp = dout vc^T (f32);  ds = p (dp - rowsum(dout * out))
///   dq = scale ds kc;  dk = scale ds^T q     (p and ds rounded to q's dtype for the products)
#[allow(clippy::too_many_arguments)]
pub(crate) fn composition(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, out: &Tensor, lse: &Tensor, dout: &Tensor, shape: &FlashShape) -> Result<FlashAttentionGrads> {
    let FlashShape { b, h, lq, lk, lr, d, keep_per_batch } = *shape;
    let (dt, dev) = (q.dtype(), q.device());
    let with_reference = reference.is_some() && lr > 0;
    let (kc, vc) = match reference.filter(|_| with_reference) {
        Some(r) => (Tensor::cat(&[k, r.k], 2)?, Tensor::cat(&[v, r.v], 2)?),
        None => (k.clone(), v.clone()),
    };
    let (dq, dkc, dvc) = if lq == 0 || lk + lr == 0 || d == 0 {
        (Tensor::zeros(&[b, h, lq, d], dt, dev)?, Tensor::zeros(&[b, h, lk + lr, d], dt, dev)?, Tensor::zeros(&[b, h, lk + lr, d], dt, dev)?)
    } else {
        let (dout, out) = (dout.to_dtype(dt)?, out.to_dtype(dt)?);
        let mut s = scaled_product(q, &kc.t()?, scale, DType::F32)?;
        if let Some(keep) = reference.and_then(|r| r.keep).filter(|_| with_reference) {
            let zero = Tensor::zeros(&[], DType::F32, dev)?;
            let neg = Tensor::full(f64::NEG_INFINITY, &[], DType::F32, dev)?;
            let nb = if keep_per_batch { b } else { 1 };
            let dropped = Tensor::where_cond(&keep.reshape(&[nb, 1, 1, lr])?, &zero, &neg)?;
            s = s.add(&Tensor::cat(&[&Tensor::zeros(&[nb, 1, 1, lk], DType::F32, dev)?, &dropped], 3)?)?;
        }
        // exp(s - lse) with lse = -inf replaced by +inf: such rows (no key) give exact zeros
        // instead of exp(-inf + inf) = NaN.
        let neg_inf = Tensor::full(f64::NEG_INFINITY, &[], DType::F32, dev)?;
        let pos_inf = Tensor::full(f64::INFINITY, &[], DType::F32, dev)?;
        let lse_safe = Tensor::where_cond(&lse.cmp(&neg_inf, kernels::elementwise::CmpOp::Eq)?, &pos_inf, lse)?.unsqueeze(-1)?;
        let p = s.sub(&lse_safe)?.exp()?;
        let p16 = p.to_dtype(dt)?;
        let dvc = scaled_product(&p16.t()?, &dout, 1.0, dt)?;
        let dp = scaled_product(&dout, &vc.t()?, 1.0, DType::F32)?;
        let delta = dout.to_dtype(DType::F32)?.mul(&out.to_dtype(DType::F32)?)?.sum(&[-1], true)?;
        let ds = p.mul(&dp.sub(&delta)?)?.to_dtype(dt)?;
        let dq = scaled_product(&ds, &kc, scale, dt)?;
        let dkc = scaled_product(&ds.t()?, q, scale, dt)?;
        (dq, dkc, dvc)
    };
    let own = |t: &Tensor| t.narrow(2, 0, lk);
    let (dk_ref, dv_ref) = match reference {
        Some(_) if with_reference => (Some(dkc.narrow(2, lk, lr)?), Some(dvc.narrow(2, lk, lr)?)),
        Some(_) => (Some(Tensor::zeros(&[b, h, 0, d], dt, dev)?), Some(Tensor::zeros(&[b, h, 0, d], dt, dev)?)),
        None => (None, None),
    };
    Ok(FlashAttentionGrads { dq, dk: own(&dkc)?, dv: own(&dvc)?, dk_ref, dv_ref })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::flash_attention::test_inputs::heads;

    fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        for (i, (a, e)) in g.iter().zip(&w).enumerate() {
            assert!((a - e).abs() <= tol * (1.0 + e.abs()), "{what}[{i}]: {a} vs {e}");
        }
    }

    fn compare(got: &FlashAttentionGrads, want: &FlashAttentionGrads, tol: f32) {
        close("dq", &got.dq, &want.dq, tol);
        close("dk", &got.dk, &want.dk, tol);
        close("dv", &got.dv, &want.dv, tol);
        assert_eq!(got.dk_ref.is_some(), want.dk_ref.is_some());
        if let (Some(a), Some(b)) = (&got.dk_ref, &want.dk_ref) {
            close("dk_ref", a, b, tol);
        }
        if let (Some(a), Some(b)) = (&got.dv_ref, &want.dv_ref) {
            close("dv_ref", a, b, tol);
        }
    }

    /// The CPU path vs the composition of ops (GEMMs over the explicit concatenation) on the CPU.
    #[allow(clippy::too_many_arguments)]
    fn check_against_composition(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, tol: f32) -> FlashAttentionGrads {
        let (out, lse) = Tensor::flash_attention(q, k, v, reference, scale).unwrap();
        let dout = heads(q.shape()[0], q.shape()[2], q.shape()[1], q.shape()[3], 99).to_dtype(q.dtype()).unwrap();
        let got = Tensor::flash_attention_backward(q, k, v, reference, scale, &out, &lse, &dout).unwrap();
        let shape = flash_attention_shape(OP, q, k, v, reference).unwrap();
        let want = composition(q, k, v, reference, scale, &out, &lse, &dout, &shape).unwrap();
        compare(&got, &want, tol);
        for (g, x) in [(&got.dq, q), (&got.dk, k), (&got.dv, v)] {
            assert_eq!((g.shape(), g.dtype()), (x.shape(), x.dtype()));
        }
        got
    }

    /// The CPU path vs kernels::flash_attention_backward_head (the per-row reference) on
    /// contiguous per-head copies.
    fn check_against_reference(q: &Tensor, k: &Tensor, v: &Tensor, kr: &Tensor, vr: &Tensor, keep: Option<(&[u8], bool)>, scale: f32) {
        use kernels::flash_attention_backward::flash_attention_backward_head;
        let keep_shape = |per_batch: bool| if per_batch { vec![q.shape()[0], kr.shape()[2]] } else { vec![kr.shape()[2]] };
        let keep_t = keep.map(|(m, per_batch)| Tensor::from_vec(m.to_vec(), &keep_shape(per_batch), Device::Cpu).unwrap());
        let r = AttentionReference { k: kr, v: vr, keep: keep_t.as_ref() };
        let (out, lse) = Tensor::flash_attention(q, k, v, Some(r), scale).unwrap();
        let dout = heads(q.shape()[0], q.shape()[2], q.shape()[1], q.shape()[3], 98);
        let got = Tensor::flash_attention_backward(q, k, v, Some(r), scale, &out, &lse, &dout).unwrap();
        let (b, h, lq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        let (lk, lr) = (k.shape()[2], kr.shape()[2]);
        let c = |t: &Tensor| t.to_vec_f32().unwrap();
        let (qc, kc, vc, krc, vrc, oc, doc, lc) = (c(q), c(k), c(v), c(kr), c(vr), c(&out), c(&dout), c(&lse));
        let got: Vec<Vec<f32>> = [&got.dq, &got.dk, &got.dv, got.dk_ref.as_ref().unwrap(), got.dv_ref.as_ref().unwrap()].iter().map(|t| c(t)).collect();
        for bh in 0..b * h {
            let keep_row = keep.map(|(m, per_batch)| if per_batch { &m[(bh / h) * lr..(bh / h + 1) * lr] } else { m });
            let rows = |x: &[f32], l: usize, bh: usize| -> Vec<f32> { x[bh * l * d..(bh + 1) * l * d].to_vec() };
            let (qh, kh, vh, krh, vrh, oh, doh) = (rows(&qc, lq, bh), rows(&kc, lk, bh), rows(&vc, lk, bh), rows(&krc, lr, bh), rows(&vrc, lr, bh), rows(&oc, lq, bh), rows(&doc, lq, bh));
            let x = HeadInputs {
                q: Rows { data: &qh, row_stride: d },
                k: Rows { data: &kh, row_stride: d },
                v: Rows { data: &vh, row_stride: d },
                reference: Some((Rows { data: &krh, row_stride: d }, Rows { data: &vrh, row_stride: d })),
                keep: keep_row,
                out: Rows { data: &oh, row_stride: d },
                dout: Rows { data: &doh, row_stride: d },
                lse: &lc[bh * lq..(bh + 1) * lq],
                lse_stride: 1,
            };
            let mut want: Vec<Vec<f32>> = [lq, lk, lk, lr, lr].iter().map(|&l| vec![0f32; l * d]).collect();
            {
                let [dq, dk, dv, dkr, dvr] = &mut want[..] else { unreachable!() };
                flash_attention_backward_head(&x, FlashDims { lq, lk, lr, d }, scale, HeadGrads { dq, dk, dv, dk_ref: dkr, dv_ref: dvr });
            }
            for (which, (g, w)) in got.iter().zip(&want).enumerate() {
                let n = w.len();
                for (i, (a, e)) in g[bh * n..(bh + 1) * n].iter().zip(w).enumerate() {
                    assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "gradient {which} head {bh} element {i}: {a} vs reference {e}");
                }
            }
        }
    }

    #[test]
    fn matches_the_per_row_reference() {
        // Lq spans two query blocks and ends in a partial one; [B, L, H, D] views.
        let (b, h, lq, lk, lr, d) = (2, 3, 77, 13, 21, 8);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, lk, h, d, 2), heads(b, lk, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        let keep: Vec<u8> = (0..b * lr).map(|i| (i % 3 != 1) as u8).collect();
        check_against_reference(&q, &k, &v, &kr, &vr, Some((&keep, true)), 0.3);
        check_against_reference(&q, &k, &v, &kr, &vr, Some((&keep[..lr], false)), 0.3);
        check_against_reference(&q, &k, &v, &kr, &vr, None, 0.3);
        // No own keys.
        check_against_reference(&q, &k.narrow(2, 0, 0).unwrap(), &v.narrow(2, 0, 0).unwrap(), &kr, &vr, Some((&keep, true)), 0.3);
    }

    #[test]
    fn matches_the_composition_on_strided_views_with_a_keep_mask() {
        let (b, h, lq, lk, lr, d) = (2, 3, 77, 13, 21, 8);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, lk, h, d, 2), heads(b, lk, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        let keep: Vec<u8> = (0..b * lr).map(|i| (i % 3 != 1) as u8).collect();
        let keep_t = Tensor::from_vec(keep.clone(), &[b, lr], Device::Cpu).unwrap();
        let r = AttentionReference { k: &kr, v: &vr, keep: Some(&keep_t) };
        let g = check_against_composition(&q, &k, &v, Some(r), 0.3, 1e-5);
        let (dkr, dvr) = (g.dk_ref.unwrap().to_vec_f32().unwrap(), g.dv_ref.unwrap().to_vec_f32().unwrap());
        assert_eq!(dkr.len(), b * h * lr * d);
        // Dropped tokens get exactly zero; kept ones do not.
        for bi in 0..b {
            for hi in 0..h {
                for j in 0..lr {
                    let row = &dvr[((bi * h + hi) * lr + j) * d..][..d];
                    assert_eq!(row.iter().all(|&x| x == 0.0), keep[bi * lr + j] == 0, "dv_ref b{bi} h{hi} token {j}");
                }
            }
        }
        // A shared [Lr] mask; no reference; a reference with Lr = 0; no own keys.
        let keep1 = Tensor::from_vec((0..lr).map(|i| (i % 4 != 0) as u8).collect::<Vec<u8>>(), &[lr], Device::Cpu).unwrap();
        check_against_composition(&q, &k, &v, Some(AttentionReference { keep: Some(&keep1), ..r }), 0.3, 1e-5);
        let g = check_against_composition(&q, &k, &v, None, 0.3, 1e-5);
        assert!(g.dk_ref.is_none() && g.dv_ref.is_none());
        let (kr0, vr0) = (kr.narrow(2, 0, 0).unwrap(), vr.narrow(2, 0, 0).unwrap());
        let g = check_against_composition(&q, &k, &v, Some(AttentionReference { k: &kr0, v: &vr0, keep: None }), 0.3, 1e-5);
        assert_eq!(g.dk_ref.unwrap().shape(), &[b, h, 0, d]);
        let (k0, v0) = (k.narrow(2, 0, 0).unwrap(), v.narrow(2, 0, 0).unwrap());
        check_against_composition(&q, &k0, &v0, Some(r), 0.3, 1e-5);
    }

    #[test]
    fn bf16_inputs_give_bf16_gradients() {
        let (b, h, lq, lk, lr, d) = (1, 2, 9, 5, 6, 16);
        let t = |l, seed| heads(b, l, h, d, seed).to_dtype(DType::BF16).unwrap();
        let (q, k, v, kr, vr) = (t(lq, 1), t(lk, 2), t(lk, 3), t(lr, 4), t(lr, 5));
        let g = check_against_composition(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: None }), 0.25, 3e-2);
        assert_eq!(g.dk_ref.unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn rows_with_no_key_give_zero_gradients() {
        let (b, h, lq, lr, d) = (2, 1, 3, 4, 4);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, 0, h, d, 2), heads(b, 0, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        // Batch 0 drops everything, batch 1 keeps one token.
        let keep = Tensor::from_vec(vec![0u8, 0, 0, 0, 0, 0, 1, 0], &[b, lr], Device::Cpu).unwrap();
        let r = AttentionReference { k: &kr, v: &vr, keep: Some(&keep) };
        let g = check_against_composition(&q, &k, &v, Some(r), 0.5, 1e-5);
        let dq = g.dq.to_vec_f32().unwrap();
        assert!(dq[..lq * d].iter().all(|&x| x == 0.0));
        // One key only: softmax is constant 1, so dq = 0 there too, but dv of that token = sum dout.
        let dv = g.dv_ref.unwrap().to_vec_f32().unwrap();
        assert!(dv[..lr * d].iter().all(|&x| x == 0.0) && dv[(lr + 2) * d..(lr + 3) * d].iter().any(|&x| x != 0.0));
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let (b, h, lq, lk, lr, d) = (1, 3, 150, 17, 11, 8);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, lk, h, d, 2), heads(b, lk, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        let r = Some(AttentionReference { k: &kr, v: &vr, keep: None });
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, r, 0.2).unwrap();
        let dout = heads(b, lq, h, d, 6);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let g = Tensor::flash_attention_backward(&q, &k, &v, r, 0.2, &out, &lse, &dout).unwrap();
                [g.dq, g.dk, g.dv, g.dk_ref.unwrap(), g.dv_ref.unwrap()].map(|t| t.to_vec::<f32>().unwrap())
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let (q, k, v) = (heads(1, 4, 2, 8, 1), heads(1, 3, 2, 8, 2), heads(1, 3, 2, 8, 3));
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, None, 1.0).unwrap();
        let err = |r: Result<FlashAttentionGrads>| {
            let e = r.expect_err("an error").to_string();
            assert!(e.contains("flash_attention_backward"), "{e}");
        };
        err(Tensor::flash_attention_backward(&q, &k.narrow(3, 0, 4).unwrap(), &v, None, 1.0, &out, &lse, &out));
        err(Tensor::flash_attention_backward(&q, &k, &v, None, 1.0, &out.narrow(2, 0, 3).unwrap(), &lse, &out));
        err(Tensor::flash_attention_backward(&q, &k, &v, None, 1.0, &out, &lse, &out.narrow(2, 0, 3).unwrap()));
        err(Tensor::flash_attention_backward(&q, &k, &v, None, 1.0, &out, &lse.narrow(2, 0, 3).unwrap(), &out));
        err(Tensor::flash_attention_backward(&q, &k, &v, None, 1.0, &out, &lse.to_dtype(DType::BF16).unwrap(), &out));
        err(Tensor::flash_attention_backward(&q, &k, &v, None, 1.0, &out, &lse, &out.to_dtype(DType::I64).unwrap()));
    }
}
