//! Shape and indexing ops: cat, stack, split, chunk, index_select, gather, embedding, pad,
//! masked_fill.
//!
//! These move elements without arithmetic, so the CPU path works on the raw bytes of any dtype
//! (one element = `dtype.size_in_bytes()` bytes) after making the input contiguous. Index tensors
//! are i64; an index out of range is an error naming the index, the dimension and its size.

use crate::cpu::CpuStorage;
use crate::cuda::CudaStorage;
use crate::layout::resolve_dim;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// How `pad` fills the new border.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    /// A constant value.
    Constant,
    /// Mirror without repeating the edge: [a b c] padded by 2 on the left gives [c b | a b c].
    Reflect,
    /// Repeat the edge element.
    Replicate,
}

/// The CPU paths below work on CPU bytes; CUDA tensors take their own arms first.
fn cpu_only(x: &Tensor, op: &'static str) -> Result<()> {
    match x.device() {
        Device::Cpu => Ok(()),
        Device::Cuda(_) => Err(crate::cuda::not_yet(op)),
    }
}

/// Runs `f` on a CUDA tensor's storage (the tensor's own layout applies).
fn with_cuda<R>(t: &Tensor, op: &'static str, f: impl FnOnce(&CudaStorage) -> Result<R>) -> Result<R> {
    match &*t.read_storage() {
        Storage::Cuda(s) => f(s),
        Storage::Cpu(_) => Err(Error::DeviceMismatch { op, lhs: Device::Cpu, rhs: t.device() }),
    }
}

/// The bytes of one `dtype` element of value `v`, as the pad / masked_fill kernels take them.
fn fill_bits(dtype: DType, v: f32) -> u64 {
    let mut b = [0u8; 8];
    let bytes = value_bytes(dtype, v);
    b[..bytes.len()].copy_from_slice(&bytes);
    u64::from_le_bytes(b)
}

fn is_cuda(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cuda(_))
}

/// Runs `f` on the row-major bytes of a CPU tensor (borrowed when contiguous, copied otherwise).
fn with_bytes<R>(t: &Tensor, op: &'static str, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    cpu_only(t, op)?;
    let c = t.contiguous()?;
    let guard = c.read_storage();
    let Storage::Cpu(s) = &*guard else { return Err(crate::cuda::not_yet(op)) };
    let r = c.layout().contiguous_range().expect("made contiguous above");
    let sz = c.dtype().size_in_bytes();
    Ok(f(&s.bytes()[r.start * sz..r.end * sz]))
}

/// A new CPU tensor of `dtype` and `shape` whose bytes `fill` writes.
fn build(dtype: DType, shape: &[usize], fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<Tensor> {
    let mut s = CpuStorage::zeros(dtype, shape.iter().product());
    fill(s.bytes_mut())?;
    Tensor::from_storage(Storage::Cpu(s), shape)
}

/// The bytes of `v` as one element of `dtype`.
fn value_bytes(dtype: DType, v: f32) -> Vec<u8> {
    match dtype {
        DType::F32 => v.to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
        DType::I64 => (v as i64).to_le_bytes().to_vec(),
        DType::U8 => vec![v as u8],
    }
}

/// The values of an i64 index tensor.
fn indices(op: &'static str, idx: &Tensor) -> Result<Vec<i64>> {
    if idx.dtype() != DType::I64 {
        return Err(Error::DTypeMismatch { op, lhs: idx.dtype(), rhs: DType::I64 });
    }
    idx.to_vec::<i64>()
}

fn check_index(op: &'static str, i: i64, dim: usize, size: usize) -> Result<usize> {
    if i < 0 || i as u64 >= size as u64 {
        return Err(Error::msg(format!("{op}: index {i} is out of range for dimension {dim} of size {size}")));
    }
    Ok(i as usize)
}

/// `cat` on CUDA: each input (any view) is copied by one kernel into its column block of the
/// output's rows ([outer, total * inner] with total the concatenated dimension's size).
fn cat_cuda(tensors: &[&Tensor], d: usize) -> Result<Tensor> {
    const OP: &str = "cat";
    let first = tensors[0];
    let total: usize = tensors.iter().map(|t| t.shape()[d]).sum();
    let mut shape = first.shape().to_vec();
    shape[d] = total;
    let inner: usize = first.shape()[d + 1..].iter().product();
    let out = with_cuda(first, OP, |s| CudaStorage::alloc(s.device(), first.dtype(), shape.iter().product()))?;
    let mut at = 0;
    for t in tensors {
        let row_len = t.shape()[d] * inner;
        with_cuda(t, OP, |s| s.cat_into(t.layout(), &out, at, row_len, total * inner))?;
        at += row_len;
    }
    Tensor::from_storage(Storage::Cuda(out), &shape)
}

impl Tensor {
    /// Concatenates tensors of equal shape except along `dim`.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        const OP: &str = "cat";
        let Some(first) = tensors.first() else { return Err(Error::msg("cat: no tensors given")) };
        let d = resolve_dim(OP, dim, first.rank())?;
        for t in &tensors[1..] {
            first.same_device(t, OP)?;
            first.same_dtype(t, OP)?;
            let same = t.rank() == first.rank() && (0..t.rank()).all(|i| i == d || t.shape()[i] == first.shape()[i]);
            if !same {
                return Err(Error::ShapeMismatch { op: OP, lhs: first.shape().to_vec(), rhs: t.shape().to_vec() });
            }
        }
        if is_cuda(first) {
            return cat_cuda(tensors, d);
        }
        cpu_only(first, OP)?;
        let sz = first.dtype().size_in_bytes();
        let outer: usize = first.shape()[..d].iter().product();
        let inner: usize = first.shape()[d + 1..].iter().product::<usize>() * sz;
        let total: usize = tensors.iter().map(|t| t.shape()[d]).sum();
        let mut shape = first.shape().to_vec();
        shape[d] = total;
        let out_row = total * inner;
        build(first.dtype(), &shape, |out| {
            let mut at = 0;
            for t in tensors {
                let block = t.shape()[d] * inner;
                with_bytes(t, OP, |src| {
                    for o in 0..outer {
                        out[o * out_row + at..o * out_row + at + block].copy_from_slice(&src[o * block..(o + 1) * block]);
                    }
                })?;
                at += block;
            }
            Ok(())
        })
    }

    /// Stacks tensors of equal shape along a new dimension `dim`.
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let Some(first) = tensors.first() else { return Err(Error::msg("stack: no tensors given")) };
        for t in &tensors[1..] {
            if t.shape() != first.shape() {
                return Err(Error::ShapeMismatch { op: "stack", lhs: first.shape().to_vec(), rhs: t.shape().to_vec() });
            }
        }
        let d = resolve_dim("stack", dim, first.rank() + 1)? as isize;
        let parts = tensors.iter().map(|t| t.unsqueeze(d)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts.iter().collect::<Vec<_>>(), d)
    }

    /// Views of consecutive pieces of `sizes` along `dim`; the sizes must add up to the dim's size.
    pub fn split(&self, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let d = resolve_dim("split", dim, self.rank())?;
        if sizes.iter().sum::<usize>() != self.shape()[d] {
            return Err(Error::BadShape { op: "split", msg: format!("sizes {sizes:?} do not add up to the size of dimension {d}"), shape: self.shape().to_vec() });
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let v = self.narrow(d as isize, start, len);
                start += len;
                v
            })
            .collect()
    }

    /// Splits `dim` into pieces of ceil(size / n) (the last may be smaller), as torch.chunk: this
    /// can give fewer than `n` pieces.
    pub fn chunk(&self, n: usize, dim: isize) -> Result<Vec<Tensor>> {
        let d = resolve_dim("chunk", dim, self.rank())?;
        if n == 0 {
            return Err(Error::BadShape { op: "chunk", msg: "cannot split into 0 chunks".into(), shape: self.shape().to_vec() });
        }
        let size = self.shape()[d];
        if size == 0 {
            return Ok(vec![self.clone(); n]);
        }
        let step = size.div_ceil(n);
        let sizes: Vec<usize> = (0..size).step_by(step).map(|s| step.min(size - s)).collect();
        self.split(&sizes, d as isize)
    }

    /// The slices of `dim` at the positions of the 1-D (or scalar) i64 tensor `idx`, in order.
    pub fn index_select(&self, dim: isize, idx: &Tensor) -> Result<Tensor> {
        self.index_select_op("index_select", dim, idx)
    }

    fn index_select_op(&self, op: &'static str, dim: isize, idx: &Tensor) -> Result<Tensor> {
        let d = resolve_dim(op, dim, self.rank())?;
        if idx.rank() > 1 {
            return Err(Error::BadShape { op, msg: "the index must be 1-D".into(), shape: idx.shape().to_vec() });
        }
        self.same_device(idx, op)?;
        if is_cuda(self) {
            // A gather whose index is the 1-D idx broadcast along every other dimension.
            let mut src_strides = self.strides().to_vec();
            let dim_stride = std::mem::replace(&mut src_strides[d], 0);
            let mut idx_strides = vec![0; self.rank()];
            idx_strides[d] = idx.strides().first().copied().unwrap_or(0);
            let mut shape = self.shape().to_vec();
            shape[d] = idx.elem_count();
            let out = with_cuda(self, op, |s| with_cuda(idx, op, |i| s.gather(op, self.layout().offset(), &src_strides, i, idx.layout().offset(), &idx_strides, &shape, d, dim_stride, self.shape()[d])))?;
            return Tensor::from_storage(Storage::Cuda(out), &shape);
        }
        cpu_only(self, op)?;
        let size = self.shape()[d];
        let ids = indices(op, idx)?.into_iter().map(|i| check_index(op, i, d, size)).collect::<Result<Vec<_>>>()?;
        let sz = self.dtype().size_in_bytes();
        let outer: usize = self.shape()[..d].iter().product();
        let inner: usize = self.shape()[d + 1..].iter().product::<usize>() * sz;
        let mut shape = self.shape().to_vec();
        shape[d] = ids.len();
        build(self.dtype(), &shape, |out| {
            with_bytes(self, op, |src| {
                let mut at = 0;
                for o in 0..outer {
                    for &i in &ids {
                        let s = (o * size + i) * inner;
                        out[at..at + inner].copy_from_slice(&src[s..s + inner]);
                        at += inner;
                    }
                }
            })
        })
    }

    /// out[..., j, ...] = self[..., idx[..., j, ...], ...] along `dim` (torch.gather): `idx` has the
    /// input's rank and no larger size in any other dimension; the result has `idx`'s shape.
    pub fn gather(&self, dim: isize, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let d = resolve_dim(OP, dim, self.rank())?;
        let fits = idx.rank() == self.rank() && (0..self.rank()).all(|i| i == d || idx.shape()[i] <= self.shape()[i]);
        if !fits {
            return Err(Error::ShapeMismatch { op: OP, lhs: self.shape().to_vec(), rhs: idx.shape().to_vec() });
        }
        self.same_device(idx, OP)?;
        if is_cuda(self) {
            let mut src_strides = self.strides().to_vec();
            let dim_stride = std::mem::replace(&mut src_strides[d], 0);
            let shape = idx.shape().to_vec();
            let out = with_cuda(self, OP, |s| with_cuda(idx, OP, |i| s.gather(OP, self.layout().offset(), &src_strides, i, idx.layout().offset(), idx.strides(), &shape, d, dim_stride, self.shape()[d])))?;
            return Tensor::from_storage(Storage::Cuda(out), &shape);
        }
        cpu_only(self, OP)?;
        let ids = indices(OP, idx)?;
        let size = self.shape()[d];
        let sz = self.dtype().size_in_bytes();
        let src_strides = crate::layout::contiguous_strides(self.shape());
        let oshape = idx.shape().to_vec();
        build(self.dtype(), &oshape, |out| {
            with_bytes(self, OP, |src| -> Result<()> {
                let mut pos = vec![0usize; oshape.len()];
                for (o, &i) in ids.iter().enumerate() {
                    let i = check_index(OP, i, d, size)?;
                    let s: usize = pos.iter().zip(&src_strides).enumerate().map(|(k, (&p, &st))| if k == d { i * st } else { p * st }).sum();
                    out[o * sz..(o + 1) * sz].copy_from_slice(&src[s * sz..(s + 1) * sz]);
                    // Advance the row-major position in the output.
                    for k in (0..pos.len()).rev() {
                        pos[k] += 1;
                        if pos[k] < oshape[k] {
                            break;
                        }
                        pos[k] = 0;
                    }
                }
                Ok(())
            })?
        })
    }

    /// Rows of this [V, D] table at the i64 `ids` (any shape); the result is ids.shape + [D].
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::BadShape { op: "embedding", msg: "the table must be [num_embeddings, dim]".into(), shape: self.shape().to_vec() });
        }
        let flat = ids.reshape(&[ids.elem_count()])?;
        let rows = self.index_select_op("embedding", 0, &flat)?;
        let mut shape = ids.shape().to_vec();
        shape.push(self.shape()[1]);
        rows.reshape(&shape)
    }

    /// Pads the trailing dimensions; `pads` is in torch F.pad order: (left, right) of the last
    /// dimension first, then of the one before, and so on. `value` is used by `PadMode::Constant`.
    pub fn pad(&self, pads: &[usize], mode: PadMode, value: f32) -> Result<Tensor> {
        const OP: &str = "pad";
        let rank = self.rank();
        if !pads.len().is_multiple_of(2) || pads.len() > 2 * rank {
            return Err(Error::BadShape { op: OP, msg: format!("pads {pads:?} must be (left, right) pairs for at most {rank} dimensions"), shape: self.shape().to_vec() });
        }
        // For every dimension, the source index of each output index (None: the constant).
        let mut maps: Vec<Vec<Option<usize>>> = Vec::with_capacity(rank);
        let mut shape = Vec::with_capacity(rank);
        let mut lefts = Vec::with_capacity(rank);
        for (d, &n) in self.shape().iter().enumerate() {
            let k = rank - 1 - d; // pair number in F.pad order
            let (l, r) = if 2 * k + 1 < pads.len() { (pads[2 * k], pads[2 * k + 1]) } else { (0, 0) };
            let bad = match mode {
                PadMode::Constant => false,
                PadMode::Reflect => (l > 0 || r > 0) && (l >= n || r >= n),
                PadMode::Replicate => (l > 0 || r > 0) && n == 0,
            };
            if bad {
                return Err(Error::BadShape { op: OP, msg: format!("{mode:?} padding ({l}, {r}) is too large for dimension {d} of size {n}"), shape: self.shape().to_vec() });
            }
            let map = (0..n + l + r)
                .map(|j| {
                    let i = j as isize - l as isize;
                    let last = n as isize - 1;
                    if (0..n as isize).contains(&i) {
                        return Some(i as usize);
                    }
                    match mode {
                        PadMode::Constant => None,
                        PadMode::Reflect => Some((if i < 0 { -i } else { 2 * last - i }) as usize),
                        PadMode::Replicate => Some(i.clamp(0, last) as usize),
                    }
                })
                .collect();
            maps.push(map);
            shape.push(n + l + r);
            lefts.push(l);
        }
        if is_cuda(self) {
            let code = match mode {
                PadMode::Constant => kernels::index::PAD_CONSTANT,
                PadMode::Reflect => kernels::index::PAD_REFLECT,
                PadMode::Replicate => kernels::index::PAD_REPLICATE,
            };
            let out = with_cuda(self, OP, |s| s.pad(self.layout(), &shape, &lefts, code, fill_bits(self.dtype(), value)))?;
            return Tensor::from_storage(Storage::Cuda(out), &shape);
        }
        cpu_only(self, OP)?;
        let sz = self.dtype().size_in_bytes();
        let fill = value_bytes(self.dtype(), value);
        let strides = crate::layout::contiguous_strides(self.shape());
        let out_count: usize = shape.iter().product();
        build(self.dtype(), &shape, |out| {
            with_bytes(self, OP, |src| {
                if out_count == 0 {
                    return;
                }
                if rank == 0 {
                    out.copy_from_slice(src);
                    return;
                }
                // Walk the output row by row (rows of the last dimension); each row has one source
                // row or is all constant.
                let last_map = &maps[rank - 1];
                let row_len = shape[rank - 1];
                let mut pos = vec![0usize; rank - 1];
                for row in out.chunks_mut(row_len * sz) {
                    let base = pos.iter().enumerate().try_fold(0usize, |acc, (k, &p)| maps[k][p].map(|i| acc + i * strides[k]));
                    for (j, o) in row.chunks_mut(sz).enumerate() {
                        match (base, last_map[j]) {
                            (Some(b), Some(i)) => o.copy_from_slice(&src[(b + i) * sz..(b + i + 1) * sz]),
                            _ => o.copy_from_slice(&fill),
                        }
                    }
                    for k in (0..pos.len()).rev() {
                        pos[k] += 1;
                        if pos[k] < shape[k] {
                            break;
                        }
                        pos[k] = 0;
                    }
                }
            })
        })
    }

    /// A copy with `value` where the u8 `mask` (broadcast to this shape) is non-zero.
    pub fn masked_fill(&self, mask: &Tensor, value: f32) -> Result<Tensor> {
        const OP: &str = "masked_fill";
        if mask.dtype() != DType::U8 {
            return Err(Error::DTypeMismatch { op: OP, lhs: mask.dtype(), rhs: DType::U8 });
        }
        self.same_device(mask, OP)?;
        let mask = mask.broadcast_to(self.shape()).map_err(|_| Error::ShapeMismatch { op: OP, lhs: self.shape().to_vec(), rhs: mask.shape().to_vec() })?;
        if is_cuda(self) {
            let out = with_cuda(self, OP, |s| with_cuda(&mask, OP, |m| s.masked_fill(self.layout(), m, mask.layout(), fill_bits(self.dtype(), value))))?;
            return Tensor::from_storage(Storage::Cuda(out), self.shape());
        }
        cpu_only(self, OP)?;
        let m = mask.to_vec::<u8>()?;
        let sz = self.dtype().size_in_bytes();
        let fill = value_bytes(self.dtype(), value);
        build(self.dtype(), self.shape(), |out| {
            with_bytes(self, OP, |src| {
                out.copy_from_slice(src);
                for (o, &c) in out.chunks_mut(sz).zip(&m) {
                    if c != 0 {
                        o.copy_from_slice(&fill);
                    }
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::PadMode;
    use crate::{DType, Device, Tensor};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }
    fn ids(v: &[i64], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn cat_stack_split_chunk() {
        let a = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let b = t(&[5.0, 6.0], &[2, 1]);
        let c = Tensor::cat(&[&a, &b], -1).unwrap();
        assert_eq!(c.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
        assert!(Tensor::cat(&[&a, &b], 0).is_err());
        let s = Tensor::stack(&[&a, &a.t().unwrap()], 1).unwrap();
        assert_eq!(s.shape(), &[2, 2, 2]);
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 1.0, 3.0, 3.0, 4.0, 2.0, 4.0]);
        let parts = c.split(&[1, 2], 1).unwrap();
        assert_eq!(parts[1].to_vec::<f32>().unwrap(), vec![2.0, 5.0, 4.0, 6.0]);
        assert!(c.split(&[1, 1], 1).is_err());
        let ch = t(&[0.0; 5], &[5]).chunk(3, 0).unwrap();
        assert_eq!(ch.iter().map(|x| x.shape()[0]).collect::<Vec<_>>(), vec![2, 2, 1]);
        let ch = t(&[0.0; 6], &[6]).chunk(4, 0).unwrap();
        assert_eq!(ch.len(), 3);
    }

    #[test]
    fn index_ops_on_any_dtype_and_bad_indices() {
        let x = Tensor::from_vec((0..6i64).collect(), &[2, 3], Device::Cpu).unwrap();
        let y = x.index_select(1, &ids(&[2, 0, 2], &[3])).unwrap();
        assert_eq!(y.to_vec::<i64>().unwrap(), vec![2, 0, 2, 5, 3, 5]);
        let e = x.index_select(1, &ids(&[3], &[1])).unwrap_err().to_string();
        assert!(e.contains("index 3") && e.contains("size 3"), "{e}");
        let g = x.gather(1, &ids(&[1, 1, 0, 2], &[2, 2])).unwrap();
        assert_eq!(g.to_vec::<i64>().unwrap(), vec![1, 1, 3, 5]);
        assert!(x.gather(1, &ids(&[-1, 0], &[2, 1])).is_err());
        let table = t(&[0.0, 0.1, 1.0, 1.1, 2.0, 2.1], &[3, 2]).to_dtype(DType::BF16).unwrap();
        let e = table.embedding(&ids(&[2, 0, 1, 2], &[2, 2])).unwrap();
        assert_eq!(e.shape(), &[2, 2, 2]);
        assert_eq!(e.dtype(), DType::BF16);
        assert_eq!(e.to_vec_f32().unwrap()[0], 2.0);
        assert!(table.embedding(&ids(&[3], &[1])).unwrap_err().to_string().contains("index 3"));
        assert!(table.embedding(&t(&[0.0], &[1])).is_err());
    }

    #[test]
    fn pad_modes() {
        let x = t(&[1.0, 2.0, 3.0], &[1, 3]);
        let c = x.pad(&[1, 2], PadMode::Constant, -1.0).unwrap();
        assert_eq!(c.to_vec::<f32>().unwrap(), vec![-1.0, 1.0, 2.0, 3.0, -1.0, -1.0]);
        let r = x.pad(&[2, 2], PadMode::Reflect, 0.0).unwrap();
        assert_eq!(r.to_vec::<f32>().unwrap(), vec![3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0]);
        let p = x.pad(&[1, 1], PadMode::Replicate, 0.0).unwrap();
        assert_eq!(p.to_vec::<f32>().unwrap(), vec![1.0, 1.0, 2.0, 3.0, 3.0]);
        let two = x.pad(&[0, 0, 1, 0], PadMode::Constant, 9.0).unwrap();
        assert_eq!(two.shape(), &[2, 3]);
        assert_eq!(two.to_vec::<f32>().unwrap(), vec![9.0, 9.0, 9.0, 1.0, 2.0, 3.0]);
        assert!(x.pad(&[3, 0], PadMode::Reflect, 0.0).is_err());
        assert!(x.pad(&[1], PadMode::Constant, 0.0).is_err());
    }

    #[test]
    fn masked_fill_broadcasts_mask() {
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let m = Tensor::from_vec(vec![0u8, 1], &[2], Device::Cpu).unwrap();
        let y = x.masked_fill(&m, f32::NEG_INFINITY).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![1.0, f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]);
        assert!(x.masked_fill(&Tensor::zeros(&[3], DType::U8, Device::Cpu).unwrap(), 0.0).is_err());
    }
}
