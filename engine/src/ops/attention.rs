//! Scaled-dot-product attention in its reference form: softmax(q k^T * scale + mask) v, with the
//! softmax in f32 (kernels::attention). On the CPU each (batch, head) runs two GEMMs over the
//! tensors' own strides, so [B, L, H, D] tensors permuted to [B, H, L, D] are not copied.

use kernels::attention::masked_softmax_row;
use rayon::prelude::*;

use crate::cpu::gemm::gemm_f32;
use crate::cpu::CpuStorage;
use crate::layout::{broadcast_shape, Layout};
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// Query rows per CPU task (see the block loop below).
const QUERY_BLOCK: usize = 64;

impl Tensor {
    /// q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv] (leading dims broadcast, usually [B, H]);
    /// `mask` is additive and broadcasts to [..., Lq, Lk] (a u8 mask means "1 = attend", like
    /// PyTorch's boolean masks); `scale` defaults to 1/sqrt(D). Returns [..., Lq, Dv].
    pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: Option<f32>) -> Result<Tensor> {
        const OP: &str = "scaled_dot_product_attention";
        q.same_device(k, OP)?;
        q.same_device(v, OP)?;
        q.same_dtype(k, OP)?;
        q.same_dtype(v, OP)?;
        q.float_only(OP)?;
        if q.rank() < 2 || k.rank() < 2 || v.rank() < 2 {
            return Err(Error::BadShape { op: OP, msg: "q, k, v need at least [L, D]".into(), shape: q.shape().to_vec() });
        }
        let last2 = |t: &Tensor| (t.shape()[t.rank() - 2], t.shape()[t.rank() - 1]);
        let ((lq, d), (lk, dk), (lv, dv)) = (last2(q), last2(k), last2(v));
        if d != dk || lk != lv {
            return Err(Error::ShapeMismatch { op: "scaled_dot_product_attention (q [.., Lq, D] vs k [.., Lk, D] / v [.., Lk, Dv])", lhs: q.shape().to_vec(), rhs: k.shape().to_vec() });
        }
        let lead = |t: &Tensor| t.shape()[..t.rank() - 2].to_vec();
        let batch = broadcast_shape(OP, &broadcast_shape(OP, &lead(q), &lead(k))?, &lead(v))?;
        let full = |r: usize, c: usize| -> Vec<usize> { batch.iter().copied().chain([r, c]).collect() };
        if let Some(m) = mask {
            q.same_device(m, OP)?;
            if m.layout().broadcast_to(&full(lq, lk)).is_err() {
                return Err(Error::ShapeMismatch { op: "scaled_dot_product_attention (mask vs [.., Lq, Lk])", lhs: m.shape().to_vec(), rhs: full(lq, lk) });
            }
        }
        let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
        if matches!(&*q.read_storage(), Storage::Cuda(_)) {
            // Unmasked [B, H, L, D] heads of one shape: the flash kernel (no [Lq, Lk] scores in
            // memory); everything else (masks, broadcast heads, other head dims) the composition.
            let same_heads = q.rank() == 4 && k.rank() == 4 && v.rank() == 4 && k.shape()[..2] == q.shape()[..2] && v.shape()[..2] == q.shape()[..2];
            if mask.is_none() && same_heads && dv == d && crate::cuda::flash_attention::kernel_applies(q.dtype(), d) {
                return Tensor::flash_attention(q, k, v, None, scale).map(|(out, _lse)| out);
            }
            return cuda_reference(q, k, v, mask, scale);
        }
        let dtype = q.dtype();
        let (q32, k32, v32) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        let nb = batch.len();
        let heads: usize = batch.iter().product();
        let geometry = |t: &Tensor, r: usize, c: usize| -> Result<(Vec<usize>, usize, usize)> {
            let l = t.layout().broadcast_to(&full(r, c))?;
            let offsets = Layout::new(batch.clone(), l.strides()[..nb].to_vec(), l.offset()).strided_indices().collect();
            Ok((offsets, l.strides()[nb], l.strides()[nb + 1]))
        };
        let (qo, q_rs, q_cs) = geometry(&q32, lq, d)?;
        let (ko, k_rs, k_cs) = geometry(&k32, lk, d)?;
        let (vo, v_rs, v_cs) = geometry(&v32, lk, dv)?;
        // Written straight into the result's storage (no Vec to copy afterwards).
        let mut storage = CpuStorage::zeros(DType::F32, heads * lq * dv);
        {
            let out = storage.as_mut_slice::<f32>()?;
            let (gq, gk, gv) = (q32.read_storage(), k32.read_storage(), v32.read_storage());
            let (Storage::Cpu(sq), Storage::Cpu(sk), Storage::Cpu(sv)) = (&*gq, &*gk, &*gv) else { unreachable!("CUDA returned above") };
            let (qd, kd, vd) = (sq.as_slice::<f32>()?, sk.as_slice::<f32>()?, sv.as_slice::<f32>()?);
            // The mask stays at its own (often much smaller) shape and is read through broadcast
            // strides. A u8 mask is boolean: 1 attends (adds 0), 0 does not (adds -inf).
            let mask = match mask {
                None => None,
                Some(m) => {
                    let values: Vec<f32> = match m.dtype() {
                        DType::U8 => m.to_vec::<u8>()?.into_iter().map(|b| if b != 0 { 0.0 } else { f32::NEG_INFINITY }).collect(),
                        _ => m.to_vec_f32()?,
                    };
                    let l = Layout::contiguous(m.shape()).broadcast_to(&full(lq, lk))?;
                    let offsets: Vec<usize> = Layout::new(batch.clone(), l.strides()[..nb].to_vec(), 0).strided_indices().collect();
                    Some((values, offsets, l.strides()[nb], l.strides()[nb + 1]))
                }
            };
            // Views with their own strides: check the extents once so the raw GEMM reads stay inside.
            let fits = |data: &[f32], offs: &[usize], rows: usize, rs: usize, cols: usize, cs: usize| offs.iter().all(|&o| rows * cols == 0 || o + (rows - 1) * rs + (cols - 1) * cs < data.len());
            assert!(fits(qd, &qo, lq, q_rs, d, q_cs) && fits(kd, &ko, lk, k_rs, d, k_cs) && fits(vd, &vo, lk, v_rs, dv, v_cs), "attention operand views out of bounds");
            // One task per block of QUERY_BLOCK query rows of one head: the block's scores stay in
            // the cache between the two products and the softmax, and a few heads still keep every
            // thread busy. The blocks are fixed, so the result does not depend on the thread count.
            let block = |hi: usize, i0: usize, o: &mut [f32]| {
                let rows = o.len() / dv;
                let mut s = vec![0f32; rows * lk];
                let mut mask_row = vec![0f32; lk];
                // SAFETY: extents checked above (rows i0..i0 + rows lie inside q's lq rows); `s`
                // and `o` are exclusive buffers.
                unsafe {
                    // s = q k^T: rhs (d x lk) element (i, j) is k[j, i].
                    if d > 0 {
                        gemm_f32(rows, lk, d, s.as_mut_ptr(), lk, 1, false, qd.as_ptr().add(qo[hi] + i0 * q_rs), q_rs, q_cs, kd.as_ptr().add(ko[hi]), k_cs, k_rs, gemm::Parallelism::None);
                    }
                }
                for (i, row) in s.chunks_mut(lk).enumerate() {
                    let m = mask.as_ref().map(|(values, offsets, m_rs, m_cs)| {
                        let base = offsets[hi] + (i0 + i) * m_rs;
                        mask_row.iter_mut().enumerate().for_each(|(j, x)| *x = values[base + j * m_cs]);
                        &mask_row[..]
                    });
                    masked_softmax_row(row, m, scale);
                }
                unsafe {
                    gemm_f32(rows, dv, lk, o.as_mut_ptr(), dv, 1, false, s.as_ptr(), lk, 1, vd.as_ptr().add(vo[hi]), v_rs, v_cs, gemm::Parallelism::None);
                }
            };
            if lq * dv > 0 && lk > 0 {
                out.par_chunks_mut(lq * dv).enumerate().for_each(|(hi, o)| {
                    o.par_chunks_mut(QUERY_BLOCK * dv).enumerate().for_each(|(bi, ob)| block(hi, bi * QUERY_BLOCK, ob));
                });
            }
        }
        Tensor::from_storage(Storage::Cpu(storage), &full(lq, dv))?.to_dtype(dtype)
    }
}

/// The reference form on CUDA, composed of our CUDA ops: scores = scale * q k^T written in f32 by
/// cuBLASLt (k^T is a transposed view, read in place), plus the mask, softmax in f32, then the
/// probabilities in the inputs' dtype times v (f32 accumulation). Fully masked rows give zeros,
/// as on the CPU. The fused flash-attention kernel replaces this later.
fn cuda_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f32) -> Result<Tensor> {
    let dtype = q.dtype();
    let mut scores = crate::cuda::gemm::matmul_scaled(q, &k.t()?, scale, DType::F32)?;
    let fully_masked_possible = mask.is_some();
    if let Some(m) = mask {
        let additive = match m.dtype() {
            // Boolean mask: 1 attends (adds 0), 0 does not (adds -inf).
            DType::U8 => {
                let zero = Tensor::zeros(&[], DType::F32, q.device())?;
                let neg = Tensor::full(f64::NEG_INFINITY, &[], DType::F32, q.device())?;
                Tensor::where_cond(m, &zero, &neg)?
            }
            _ => m.to_dtype(DType::F32)?,
        };
        scores = scores.add(&additive)?;
    }
    let mut p = scores.softmax(-1)?;
    if fully_masked_possible {
        // A row of -inf scores has no softmax (0/0): zeros instead, as PyTorch's SDPA gives.
        let zero = Tensor::zeros(&[], DType::F32, q.device())?;
        p = Tensor::where_cond(&p.cmp(&p, kernels::elementwise::CmpOp::Eq)?, &p, &zero)?;
    }
    p.to_dtype(dtype)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn matches_the_row_wise_reference_on_permuted_views() {
        let (b, l, h, d) = (2, 5, 3, 4);
        let mk = |seed: usize| Tensor::from_vec((0..b * l * h * d).map(|i| (((i + seed) * 2654435761usize) % 1000) as f32 / 500.0 - 1.0).collect(), &[b, l, h, d], Device::Cpu).unwrap();
        // [B, L, H, D] -> [B, H, L, D] views.
        let (q, k, v) = (mk(1).transpose(1, 2).unwrap(), mk(2).transpose(1, 2).unwrap(), mk(3).transpose(1, 2).unwrap());
        let mask = Tensor::from_vec((0..l * l).map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { (i % 3) as f32 * 0.1 }).collect(), &[l, l], Device::Cpu).unwrap();
        let got = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), None).unwrap();
        assert_eq!(got.shape(), &[b, h, l, d]);
        let (qc, kc, vc) = (q.contiguous().unwrap().to_vec::<f32>().unwrap(), k.contiguous().unwrap().to_vec::<f32>().unwrap(), v.contiguous().unwrap().to_vec::<f32>().unwrap());
        let m = mask.to_vec::<f32>().unwrap();
        let got = got.to_vec::<f32>().unwrap();
        let dims = kernels::attention::AttnDims { lq: l, lk: l, d, dv: d };
        for hi in 0..b * h {
            let r = hi * l * d..(hi + 1) * l * d;
            let mut want = vec![0f32; l * d];
            kernels::attention::attention_head(&qc[r.clone()], &kc[r.clone()], &vc[r.clone()], Some(&m), dims, 0.5, &mut want);
            for (a, e) in got[r].iter().zip(&want) {
                assert!((a - e).abs() < 1e-5, "{a} vs {e}");
            }
        }
        // bf16 in, bf16 out; bad shapes are errors.
        let r = Tensor::scaled_dot_product_attention(&q.to_dtype(DType::BF16).unwrap(), &k.to_dtype(DType::BF16).unwrap(), &v.to_dtype(DType::BF16).unwrap(), None, None).unwrap();
        assert_eq!(r.dtype(), DType::BF16);
        assert!(Tensor::scaled_dot_product_attention(&q, &k.narrow(3, 0, 2).unwrap(), &v, None, None).is_err());
        assert!(Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask.narrow(0, 0, 2).unwrap()), None).is_err());
    }
}
