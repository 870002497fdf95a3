//! Scatter-add along a dimension: the gradient of `index_select` and `embedding` (rows picked
//! several times receive the sum of their gradients). On CUDA the sums are f32 atomics into an f32
//! buffer (cast to the source's dtype afterwards), so their order, and the last bits, may differ
//! from the CPU's.

use crate::layout::resolve_dim;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

impl Tensor {
    /// A tensor of `shape` that is zero except out[.., idx[j], ..] += src[.., j, ..] along `dim`
    /// (torch's `index_add` into zeros). `idx` is 1-D i64; `src` has `shape` with `dim` resized to
    /// idx's length. Additions run in index order, so the result is deterministic.
    pub fn index_add_zeros(shape: &[usize], dim: isize, idx: &Tensor, src: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_add_zeros";
        let d = resolve_dim(OP, dim, shape.len())?;
        if idx.dtype() != DType::I64 || idx.rank() > 1 {
            return Err(Error::BadShape { op: OP, msg: format!("the index must be 1-D i64 (got {})", idx.dtype()), shape: idx.shape().to_vec() });
        }
        let mut want = shape.to_vec();
        want[d] = idx.elem_count();
        if src.shape() != want.as_slice() {
            return Err(Error::ShapeMismatch { op: OP, lhs: src.shape().to_vec(), rhs: want });
        }
        src.float_only(OP)?;
        let size = shape[d];
        let outer: usize = shape[..d].iter().product();
        let inner: usize = shape[d + 1..].iter().product();
        if let Device::Cuda(_) = src.device() {
            let (s, i) = (src.contiguous()?, idx.to_device(src.device())?.contiguous()?);
            let acc = {
                let (sg, ig) = (s.read_storage(), i.read_storage());
                let (Storage::Cuda(ss), Storage::Cuda(is)) = (&*sg, &*ig) else { unreachable!("both moved to the same CUDA device above") };
                ss.index_add_zeros(OP, s.layout().offset(), is, i.layout().offset(), outer, idx.elem_count(), inner, d, size)?
            };
            let acc = Tensor::from_storage(Storage::Cuda(acc), shape)?;
            return acc.to_dtype(src.dtype());
        }
        let ids = idx.to_vec::<i64>()?;
        let mut out = vec![0f32; shape.iter().product()];
        src.with_cpu_f32(|s| {
            for o in 0..outer {
                for (j, &i) in ids.iter().enumerate() {
                    if i < 0 || i as usize >= size {
                        return Err(Error::msg(format!("{OP}: index {i} is out of range for dimension {d} of size {size}")));
                    }
                    let dst = &mut out[(o * size + i as usize) * inner..][..inner];
                    let from = &s[(o * ids.len() + j) * inner..][..inner];
                    dst.iter_mut().zip(from).for_each(|(a, b)| *a += b);
                }
            }
            Ok(())
        })?;
        Tensor::from_f32_vec(out, shape, src.dtype())
    }
}
