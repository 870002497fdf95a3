//! Flash extended attention, forward: q attends over the keys/values [own ; reference] (the
//! reference source optional, its tokens optionally dropped by a keep mask) without building the
//! concatenation, and returns the output with each row's log-sum-exp (kept for the backward pass,
//! engine/src/ops/flash_attention_backward.rs). Math per head: kernels::flash_attention.
//!
//! CPU: per task of (batch, head, block of query rows) two GEMMs write the block's scores over own
//! and reference keys side by side, a row softmax (f32, lse), then two GEMMs (own, then reference
//! added) write the output rows in place. Inputs are read through their own strides (no copies of
//! f32 views); outputs are [B, Lq, H, D] memory returned as [B, H, Lq, D] views, as on CUDA.
//! CUDA: the fused kernel (kernels/cuda/flash_attention.cu) for bf16/f16 with D in {64, 128}, else
//! a composition of existing CUDA ops over the explicit concatenation, with the same results.

use rayon::prelude::*;

use crate::cpu::gemm::gemm_f32;
use crate::cpu::CpuStorage;
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// Query rows per CPU task: the block's scores (QUERY_BLOCK x (Lk + Lr) f32) stay in the cache
/// between the products and the softmax, and a few heads still keep every thread busy.
const QUERY_BLOCK: usize = 64;

/// Reference keys/values of extended attention and their optional keep mask.
#[derive(Clone, Copy)]
pub struct AttentionReference<'a> {
    /// [B, H, Lr, D]
    pub k: &'a Tensor,
    /// [B, H, Lr, D]
    pub v: &'a Tensor,
    /// u8 [Lr] or [B, Lr]: 1 = attend, 0 = dropped.
    pub keep: Option<&'a Tensor>,
}

/// Sizes of a flash-attention call, checked by `flash_attention_shape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashShape {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub lr: usize,
    pub d: usize,
    /// The keep mask has a row per batch entry ([B, Lr]) rather than one for all ([Lr]).
    pub keep_per_batch: bool,
}

/// Checks the inputs of flash attention (forward and backward) and returns their sizes: q [B, H,
/// Lq, D], k/v [B, H, Lk, D], reference k/v [B, H, Lr, D], all one float dtype on one device; keep
/// u8 [Lr] or [B, Lr] on the same device.
pub fn flash_attention_shape(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>) -> Result<FlashShape> {
    q.float_only(op)?;
    if q.rank() != 4 {
        return Err(Error::BadShape { op, msg: "q must be [B, H, Lq, D]".into(), shape: q.shape().to_vec() });
    }
    let (b, h, lq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let same_heads = |name: &str, t: &Tensor| -> Result<usize> {
        q.same_device(t, op)?;
        q.same_dtype(t, op)?;
        let s = t.shape();
        if s.len() != 4 || s[0] != b || s[1] != h || s[3] != d {
            return Err(Error::BadShape { op, msg: format!("{name} must be [B, H, L, D] = [{b}, {h}, L, {d}] like q {:?}", q.shape()), shape: s.to_vec() });
        }
        Ok(s[2])
    };
    let lk = same_heads("k", k)?;
    if same_heads("v", v)? != lk {
        return Err(Error::ShapeMismatch { op, lhs: k.shape().to_vec(), rhs: v.shape().to_vec() });
    }
    let (mut lr, mut keep_per_batch) = (0, false);
    if let Some(r) = reference {
        lr = same_heads("reference k", r.k)?;
        if same_heads("reference v", r.v)? != lr {
            return Err(Error::ShapeMismatch { op, lhs: r.k.shape().to_vec(), rhs: r.v.shape().to_vec() });
        }
        if let Some(keep) = r.keep {
            q.same_device(keep, op)?;
            if keep.dtype() != DType::U8 {
                return Err(Error::DTypeMismatch { op, lhs: keep.dtype(), rhs: DType::U8 });
            }
            keep_per_batch = match keep.shape() {
                [n] if *n == lr => false,
                [nb, n] if *nb == b && *n == lr => true,
                s => return Err(Error::BadShape { op, msg: format!("the keep mask must be u8 [Lr] or [B, Lr] = [{lr}] or [{b}, {lr}]"), shape: s.to_vec() }),
            };
        }
    }
    Ok(FlashShape { b, h, lq, lk, lr, d, keep_per_batch })
}

impl Tensor {
    /// Extended attention: q [B, H, Lq, D] over keys/values [k ; reference.k] / [v ; reference.v]
    /// (k/v [B, H, Lk, D], reference k/v [B, H, Lr, D]; views with any strides: the CUDA kernel
    /// needs the last dim contiguous and copies otherwise); reference tokens whose keep entry is 0
    /// are left out. Returns (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] f32, natural log).
    /// A row with no key at all gives out = 0 and lse = -inf.
    pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "flash_attention";
        let shape = flash_attention_shape(OP, q, k, v, reference)?;
        if q.device().is_cuda() {
            if crate::cuda::flash_attention::kernel_applies(q.dtype(), shape.d) {
                return crate::cuda::flash_attention::forward(q, k, v, reference, scale, &shape);
            }
            return cuda_composition(q, k, v, reference, scale, &shape);
        }
        cpu_forward(q, k, v, reference, scale, &shape)
    }
}

/// A [B, H, L, D] view converted to f32 (no copy when it already is), with each head's offset
/// and its row / column strides.
struct HeadViews {
    data: Tensor,
    offsets: Vec<usize>,
    rs: usize,
    cs: usize,
}

impl HeadViews {
    fn new(t: &Tensor) -> Result<HeadViews> {
        let data = t.to_dtype(DType::F32)?;
        let (s, o) = (data.strides().to_vec(), data.layout().offset());
        let (b, h) = (data.shape()[0], data.shape()[1]);
        let offsets = (0..b * h).map(|bh| o + (bh / h) * s[0] + (bh % h) * s[1]).collect();
        Ok(HeadViews { data, offsets, rs: s[2], cs: s[3] })
    }
}

/// The output pointer shared by the CPU tasks, each of which writes its own rows of one head.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint elements (see cpu_forward), and the storage outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// Through a method, so that closures capture the whole Send wrapper, not its raw field.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation (checked extents).
        unsafe { self.0.add(offset) }
    }
}

fn cpu_forward(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, shape: &FlashShape) -> Result<(Tensor, Tensor)> {
    let FlashShape { b, h, lq, lk, lr, d, keep_per_batch } = *shape;
    let lkr = lk + lr;
    let (qv, kv, vv) = (HeadViews::new(q)?, HeadViews::new(k)?, HeadViews::new(v)?);
    let refs = match reference {
        Some(r) if lr > 0 => Some((HeadViews::new(r.k)?, HeadViews::new(r.v)?)),
        _ => None,
    };
    let keep: Option<Vec<u8>> = match reference.and_then(|r| r.keep) {
        Some(m) if lr > 0 => Some(m.to_vec::<u8>()?),
        _ => None,
    };
    // out [B, Lq, H, D] (row i of head (bi, hi) at ((bi * lq + i) * h + hi) * d, rows h * d
    // apart), lse [B, H, Lq].
    let mut out_storage = CpuStorage::zeros(DType::F32, b * lq * h * d);
    let mut lse_storage = CpuStorage::zeros(DType::F32, b * h * lq);
    {
        let out_ptr = OutPtr(out_storage.as_mut_slice::<f32>()?.as_mut_ptr());
        let lse = lse_storage.as_mut_slice::<f32>()?;
        let guards: Vec<_> = [&qv, &kv, &vv].into_iter().chain(refs.iter().flat_map(|(a, b)| [a, b])).map(|t| t.data.read_storage()).collect();
        let slices = guards
            .iter()
            .map(|g| match &**g {
                Storage::Cpu(s) => s.as_slice::<f32>(),
                Storage::Cuda(_) => unreachable!("CPU path"),
            })
            .collect::<Result<Vec<&[f32]>>>()?;
        // The GEMMs read through raw pointers: check every view's extent once.
        let fits = |data: &[f32], t: &HeadViews, rows: usize| t.offsets.iter().all(|&o| rows * d == 0 || o + (rows - 1) * t.rs + (d - 1) * t.cs < data.len());
        assert!(fits(slices[0], &qv, lq) && fits(slices[1], &kv, lk) && fits(slices[2], &vv, lk), "flash_attention operand views out of bounds");
        if let Some((kr, vr)) = &refs {
            assert!(fits(slices[3], kr, lr) && fits(slices[4], vr, lr), "flash_attention reference views out of bounds");
        }
        let blocks = lq.div_ceil(QUERY_BLOCK);
        // One task per (batch, head, block of query rows), fixed whatever the thread count, each
        // product single-threaded: the result does not depend on the number of threads.
        let task = |t: usize, lse_block: &mut [f32]| {
            let (bh, blk) = (t / blocks, t % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let i0 = blk * QUERY_BLOCK;
            let rows = lse_block.len();
            let keep_row = keep.as_deref().map(|m| if keep_per_batch { &m[bi * lr..(bi + 1) * lr] } else { m });
            let mut s = vec![0f32; rows * lkr];
            // SAFETY: view extents checked above; `s` is this task's own buffer; the output rows
            // i0..i0 + rows of head (bi, hi) are written by this task only.
            unsafe {
                let q_at = slices[0].as_ptr().add(qv.offsets[bh] + i0 * qv.rs);
                if d > 0 {
                    // s[:, ..lk] = q k^T: rhs (d x lk) element (c, j) is k[j, c].
                    if lk > 0 {
                        gemm_f32(rows, lk, d, s.as_mut_ptr(), lkr, 1, false, q_at, qv.rs, qv.cs, slices[1].as_ptr().add(kv.offsets[bh]), kv.cs, kv.rs, gemm::Parallelism::None);
                    }
                    if let Some((kr, _)) = &refs {
                        gemm_f32(rows, lr, d, s.as_mut_ptr().add(lk), lkr, 1, false, q_at, qv.rs, qv.cs, slices[3].as_ptr().add(kr.offsets[bh]), kr.cs, kr.rs, gemm::Parallelism::None);
                    }
                }
                if lkr == 0 {
                    lse_block.fill(f32::NEG_INFINITY);
                }
                for (row, l) in s.chunks_mut(lkr.max(1)).zip(lse_block.iter_mut()) {
                    *l = kernels::flash_attention::extended_softmax_row(row, lk, keep_row, scale);
                }
                let o_at = out_ptr.at(((bi * lq + i0) * h + hi) * d);
                if d > 0 && lk > 0 {
                    gemm_f32(rows, d, lk, o_at, h * d, 1, false, s.as_ptr(), lkr, 1, slices[2].as_ptr().add(vv.offsets[bh]), vv.rs, vv.cs, gemm::Parallelism::None);
                }
                if let Some((_, vr)) = &refs {
                    if d > 0 {
                        gemm_f32(rows, d, lr, o_at, h * d, 1, lk > 0, s.as_ptr().add(lk), lkr, 1, slices[4].as_ptr().add(vr.offsets[bh]), vr.rs, vr.cs, gemm::Parallelism::None);
                    }
                }
            }
        };
        // lse [B, H, Lq] splits into the tasks' blocks in task order.
        if lq > 0 {
            lse.par_chunks_mut(lq).enumerate().for_each(|(bh, head)| {
                head.par_chunks_mut(QUERY_BLOCK).enumerate().for_each(|(blk, l)| task(bh * blocks + blk, l));
            });
        }
    }
    let out = Tensor::from_storage(Storage::Cpu(out_storage), &[b, lq, h, d])?.to_dtype(q.dtype())?.permute(&[0, 2, 1, 3])?;
    let lse = Tensor::from_storage(Storage::Cpu(lse_storage), &[b, h, lq])?;
    Ok((out, lse))
}

/// Flash attention on CUDA composed of existing ops over the explicit concatenation (dtypes and
/// head dims the fused kernel does not take; runs on the CPU too, for the tests): scores = scale q [k ; k_ref]^T in f32 (cuBLASLt),
/// dropped tokens -inf, lse = m + ln(sum exp(s - m)) with m the row max (0 for rows with no key),
/// p = exp(s - m) / sum in f32 (0 where the sum is 0), out = p [v ; v_ref] in q's dtype.
pub(crate) fn cuda_composition(q: &Tensor, k: &Tensor, v: &Tensor, reference: Option<AttentionReference>, scale: f32, shape: &FlashShape) -> Result<(Tensor, Tensor)> {
    let FlashShape { b, h, lq, lk, lr, d, keep_per_batch } = *shape;
    let dev = q.device();
    let (kc, vc) = match reference {
        Some(r) if lr > 0 => (Tensor::cat(&[k, r.k], 2)?, Tensor::cat(&[v, r.v], 2)?),
        _ => (k.clone(), v.clone()),
    };
    if lk + lr == 0 || lq == 0 {
        let out = Tensor::zeros(&[b, lq, h, d], q.dtype(), dev)?.permute(&[0, 2, 1, 3])?;
        return Ok((out, Tensor::full(f64::NEG_INFINITY, &[b, h, lq], DType::F32, dev)?));
    }
    let mut scores = if dev.is_cuda() {
        crate::cuda::gemm::matmul_scaled(q, &kc.t()?, scale, DType::F32)?
    } else {
        // The same steps on the CPU, so that unit tests can check the composition here.
        q.to_dtype(DType::F32)?.matmul(&kc.to_dtype(DType::F32)?.t()?)?.mul_scalar(scale)?
    };
    if let Some(keep) = reference.and_then(|r| r.keep).filter(|_| lr > 0) {
        let zero = Tensor::zeros(&[], DType::F32, dev)?;
        let neg = Tensor::full(f64::NEG_INFINITY, &[], DType::F32, dev)?;
        let nb = if keep_per_batch { b } else { 1 };
        let dropped = Tensor::where_cond(&keep.reshape(&[nb, 1, 1, lr])?, &zero, &neg)?;
        let additive = Tensor::cat(&[&Tensor::zeros(&[nb, 1, 1, lk], DType::F32, dev)?, &dropped], 3)?;
        scores = scores.add(&additive)?;
    }
    let neg_inf = Tensor::full(f64::NEG_INFINITY, &[], DType::F32, dev)?;
    let zero = Tensor::zeros(&[], DType::F32, dev)?;
    let one = Tensor::ones(&[], DType::F32, dev)?;
    let max = scores.max(-1, true)?;
    let max = Tensor::where_cond(&max.cmp(&neg_inf, kernels::elementwise::CmpOp::Eq)?, &zero, &max)?;
    let e = scores.sub(&max)?.exp()?;
    let sum = e.sum(&[-1], true)?;
    let lse = max.add(&sum.log()?)?.squeeze(-1)?;
    let empty = sum.cmp(&zero, kernels::elementwise::CmpOp::Eq)?;
    let p = e.div(&Tensor::where_cond(&empty, &one, &sum)?)?;
    let out = p.to_dtype(q.dtype())?.matmul(&vc)?;
    Ok((out, lse))
}

/// Inputs of the flash-attention op tests (forward, backward, decoupled).
#[cfg(test)]
pub(crate) mod test_inputs {
    use crate::{Device, Tensor};

    /// Deterministic values in [-1, 1].
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed * 7919) * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// f32 [B, L, H, D] memory viewed as [B, H, L, D] (the models' layout), on the CPU.
    pub(crate) fn heads(b: usize, l: usize, h: usize, d: usize, seed: usize) -> Tensor {
        Tensor::from_vec(values(b * l * h * d, seed), &[b, l, h, d], Device::Cpu).unwrap().transpose(1, 2).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_inputs::heads;
    use super::*;
    use crate::Device;
    use kernels::flash_attention::{flash_attention_head, FlashDims};

    /// Per head through kernels::flash_attention_head on contiguous copies.
    #[allow(clippy::too_many_arguments)]
    fn reference_result(q: &Tensor, k: &Tensor, v: &Tensor, kr: &Tensor, vr: &Tensor, keep: Option<&[u8]>, keep_per_batch: bool, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let (b, h, lq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        let (lk, lr) = (k.shape()[2], kr.shape()[2]);
        let c = |t: &Tensor| t.to_vec_f32().unwrap();
        let (qc, kc, vc, krc, vrc) = (c(q), c(k), c(v), c(kr), c(vr));
        let (mut out, mut lse) = (vec![0f32; b * h * lq * d], vec![0f32; b * h * lq]);
        for bh in 0..b * h {
            let keep_b = keep.map(|m| if keep_per_batch { &m[(bh / h) * lr..(bh / h + 1) * lr] } else { m });
            flash_attention_head(
                &qc[bh * lq * d..],
                &kc[bh * lk * d..],
                &vc[bh * lk * d..],
                &krc[bh * lr * d..],
                &vrc[bh * lr * d..],
                keep_b,
                FlashDims { lq, lk, lr, d },
                scale,
                &mut out[bh * lq * d..(bh + 1) * lq * d],
                &mut lse[bh * lq..(bh + 1) * lq],
            );
        }
        (out, lse)
    }

    #[test]
    fn matches_the_per_head_reference_on_strided_views_with_a_keep_mask() {
        // Lq spans two query blocks and ends in a partial one.
        let (b, h, lq, lk, lr, d) = (2, 3, 77, 13, 21, 8);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, lk, h, d, 2), heads(b, lk, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        let keep: Vec<u8> = (0..b * lr).map(|i| (i % 3 != 1) as u8).collect();
        let keep_t = Tensor::from_vec(keep.clone(), &[b, lr], Device::Cpu).unwrap();
        let r = AttentionReference { k: &kr, v: &vr, keep: Some(&keep_t) };
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, Some(r), 0.3).unwrap();
        assert_eq!((out.shape(), lse.shape(), out.dtype(), lse.dtype()), (&[b, h, lq, d][..], &[b, h, lq][..], DType::F32, DType::F32));
        // Heads merge for free: [B, Lq, H, D] memory.
        assert!(out.transpose(1, 2).unwrap().is_contiguous());
        let (want, want_lse) = reference_result(&q, &k, &v, &kr, &vr, Some(&keep), true, 0.3);
        for (a, e) in out.to_vec_f32().unwrap().iter().zip(&want) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        for (a, e) in lse.to_vec_f32().unwrap().iter().zip(&want_lse) {
            assert!((a - e).abs() < 1e-5 * e.abs().max(1.0), "{a} vs {e}");
        }
        // A shared [Lr] mask, and no reference at all.
        let keep1: Vec<u8> = (0..lr).map(|i| (i % 4 != 0) as u8).collect();
        let keep1_t = Tensor::from_vec(keep1.clone(), &[lr], Device::Cpu).unwrap();
        let (out, _) = Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { keep: Some(&keep1_t), ..r }), 0.3).unwrap();
        let (want, _) = reference_result(&q, &k, &v, &kr, &vr, Some(&keep1), false, 0.3);
        for (a, e) in out.to_vec_f32().unwrap().iter().zip(&want) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, None, 0.3).unwrap();
        let (want, want_lse) = reference_result(&q, &k, &v, &kr.narrow(2, 0, 0).unwrap(), &vr.narrow(2, 0, 0).unwrap(), None, false, 0.3);
        for (a, e) in out.to_vec_f32().unwrap().iter().zip(&want).chain(lse.to_vec_f32().unwrap().iter().zip(&want_lse)) {
            assert!((a - e).abs() < 1e-5 * e.abs().max(1.0), "{a} vs {e}");
        }
    }

    #[test]
    fn bf16_inputs_give_bf16_output_and_f32_lse() {
        let (b, h, lq, lk, lr, d) = (1, 2, 5, 3, 4, 16);
        let t = |l, seed| heads(b, l, h, d, seed).to_dtype(DType::BF16).unwrap();
        let (q, k, v, kr, vr) = (t(lq, 1), t(lk, 2), t(lk, 3), t(lr, 4), t(lr, 5));
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: None }), 0.25).unwrap();
        assert_eq!((out.dtype(), lse.dtype()), (DType::BF16, DType::F32));
        let (want, _) = reference_result(&q, &k, &v, &kr, &vr, None, false, 0.25);
        for (a, e) in out.to_vec_f32().unwrap().iter().zip(&want) {
            assert!((a - e).abs() < 1e-2, "{a} vs {e}");
        }
    }

    #[test]
    fn rows_with_no_key_give_zeros_and_minus_infinity() {
        let (b, h, lq, lr, d) = (2, 1, 3, 4, 4);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, 0, h, d, 2), heads(b, 0, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        // Batch 0 drops everything, batch 1 keeps one token.
        let keep = Tensor::from_vec(vec![0u8, 0, 0, 0, 0, 0, 1, 0], &[b, lr], Device::Cpu).unwrap();
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: Some(&keep) }), 0.5).unwrap();
        let (out, lse) = (out.to_vec_f32().unwrap(), lse.to_vec_f32().unwrap());
        assert!(out[..lq * d].iter().all(|&x| x == 0.0) && lse[..lq].iter().all(|&x| x == f32::NEG_INFINITY));
        // The one token kept: its value row, for every query.
        let vr2 = vr.to_vec_f32().unwrap();
        for i in 0..lq {
            assert_eq!(&out[(lq + i) * d..(lq + i + 1) * d], &vr2[(lr + 2) * d..(lr + 3) * d]);
        }
        // No keys and no reference at all.
        let (out, lse) = Tensor::flash_attention(&q, &k, &v, None, 0.5).unwrap();
        assert!(out.to_vec_f32().unwrap().iter().all(|&x| x == 0.0) && lse.to_vec_f32().unwrap().iter().all(|&x| x == f32::NEG_INFINITY));
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let (b, h, lq, lk, lr, d) = (1, 2, 150, 37, 29, 24);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, lk, h, d, 2), heads(b, lk, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (o, l) = Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: None }), 0.2).unwrap();
                (o.to_vec::<f32>().unwrap(), l.to_vec::<f32>().unwrap())
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// The composition the CUDA backend falls back to, run with the CPU's ops, against the CPU
    /// path: masks per batch and shared, no reference, rows with no key left.
    #[test]
    fn the_composition_of_ops_matches_the_cpu_path() {
        let (b, h, lq, lk, lr, d) = (2, 2, 9, 6, 11, 8);
        let (q, k, v, kr, vr) = (heads(b, lq, h, d, 1), heads(b, lk, h, d, 2), heads(b, lk, h, d, 3), heads(b, lr, h, d, 4), heads(b, lr, h, d, 5));
        let keep_b = Tensor::from_vec((0..b * lr).map(|i| (i % 3 != 0) as u8).collect::<Vec<_>>(), &[b, lr], Device::Cpu).unwrap();
        let keep_1 = Tensor::from_vec((0..lr).map(|i| (i % 4 != 1) as u8).collect::<Vec<_>>(), &[lr], Device::Cpu).unwrap();
        let (k0, v0) = (k.narrow(2, 0, 0).unwrap(), v.narrow(2, 0, 0).unwrap());
        let none = Tensor::zeros(&[b, lr], DType::U8, Device::Cpu).unwrap();
        type Inputs<'a> = (&'a Tensor, &'a Tensor, Option<AttentionReference<'a>>);
        let cases: [Inputs; 4] = [
            (&k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: Some(&keep_b) })),
            (&k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: Some(&keep_1) })),
            (&k, &v, None),
            (&k0, &v0, Some(AttentionReference { k: &kr, v: &vr, keep: Some(&none) })),
        ];
        for (i, (k, v, r)) in cases.into_iter().enumerate() {
            let shape = flash_attention_shape("test", &q, k, v, r).unwrap();
            let (out, lse) = cuda_composition(&q, k, v, r, 0.4, &shape).unwrap();
            let (want, want_lse) = Tensor::flash_attention(&q, k, v, r, 0.4).unwrap();
            assert_eq!((out.shape(), lse.shape()), (want.shape(), want_lse.shape()), "case {i}");
            for (a, e) in out.to_vec_f32().unwrap().iter().zip(&want.to_vec_f32().unwrap()) {
                assert!((a - e).abs() < 1e-5, "case {i}: {a} vs {e}");
            }
            for (a, e) in lse.to_vec_f32().unwrap().iter().zip(&want_lse.to_vec_f32().unwrap()) {
                assert!(a == e || (a - e).abs() < 1e-5 * e.abs().max(1.0), "case {i}: lse {a} vs {e}");
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_op() {
        let (q, k, v) = (heads(1, 4, 2, 8, 1), heads(1, 3, 2, 8, 2), heads(1, 3, 2, 8, 3));
        let (kr, vr) = (heads(1, 5, 2, 8, 4), heads(1, 5, 2, 8, 5));
        let err = |r: Result<(Tensor, Tensor)>| {
            let e = r.expect_err("an error").to_string();
            assert!(e.contains("flash_attention"), "{e}");
            e
        };
        // Shapes: rank, D, heads, Lk of v, reference, keep.
        err(Tensor::flash_attention(&q.reshape(&[2, 4, 8]).unwrap(), &k, &v, None, 1.0));
        err(Tensor::flash_attention(&q, &k.narrow(3, 0, 4).unwrap(), &v, None, 1.0));
        err(Tensor::flash_attention(&q, &k.narrow(1, 0, 1).unwrap(), &v, None, 1.0));
        err(Tensor::flash_attention(&q, &k, &v.narrow(2, 0, 2).unwrap(), None, 1.0));
        err(Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr.narrow(2, 0, 4).unwrap(), keep: None }), 1.0));
        let keep = Tensor::from_vec(vec![1u8; 4], &[4], Device::Cpu).unwrap();
        let e = err(Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: Some(&keep) }), 1.0));
        assert!(e.contains("keep"), "{e}");
        // Dtypes: keep must be u8, inputs one float dtype.
        let keep_f = Tensor::from_vec(vec![1f32; 5], &[5], Device::Cpu).unwrap();
        err(Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: Some(&keep_f) }), 1.0));
        err(Tensor::flash_attention(&q, &k.to_dtype(DType::BF16).unwrap(), &v, None, 1.0));
        err(Tensor::flash_attention(&q.to_dtype(DType::I64).unwrap(), &k, &v, None, 1.0));
    }
}
