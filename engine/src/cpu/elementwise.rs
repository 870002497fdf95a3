//! CPU element-wise loops over strided layouts: copies, casts, unary and binary maps.

use rayon::prelude::*;

use crate::layout::Layout;
use crate::WithDType;

/// Below this many elements the loops stay on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// Gathers a strided view into a new row-major vector.
pub fn copy_strided<T: WithDType>(src: &[T], layout: &Layout) -> Vec<T> {
    if let Some(r) = layout.contiguous_range() {
        return src[r].to_vec();
    }
    let (inner, starts) = layout.runs();
    if inner > 1 {
        let mut out = Vec::with_capacity(layout.elem_count());
        for s in starts {
            out.extend_from_slice(&src[s..s + inner]);
        }
        out
    } else {
        starts.into_iter().map(|i| src[i]).collect()
    }
}

pub fn cast<A: WithDType, B: WithDType>(src: &[A], layout: &Layout) -> Vec<B> {
    let f = |x: A| {
        if A::DTYPE == crate::DType::I64 || B::DTYPE == crate::DType::I64 {
            b_from_f64::<B>(x.to_f64())
        } else {
            B::from_f32(x.to_f32())
        }
    };
    match layout.contiguous_range() {
        Some(r) => src[r].iter().map(|&x| f(x)).collect(),
        None => layout.strided_indices().map(|i| f(src[i])).collect(),
    }
}

fn b_from_f64<B: WithDType>(v: f64) -> B {
    match B::DTYPE {
        crate::DType::I64 => *bytemuck::from_bytes(&(v as i64).to_le_bytes()),
        _ => B::from_f32(v as f32),
    }
}

/// out[i] = f(src[i]) computed in f32.
pub fn unary_map<T: WithDType>(src: &[T], layout: &Layout, f: impl Fn(f32) -> f32 + Sync) -> Vec<T> {
    match layout.contiguous_range() {
        Some(r) if r.len() >= PAR_MIN => src[r].par_iter().map(|&x| T::from_f32(f(x.to_f32()))).collect(),
        Some(r) => src[r].iter().map(|&x| T::from_f32(f(x.to_f32()))).collect(),
        None => layout.strided_indices().map(|i| T::from_f32(f(src[i].to_f32()))).collect(),
    }
}

/// out = f(a, b) over `shape`, with `la`/`lb` already broadcast to it. Rows of the last dimension
/// are the unit of work so that the inner loop is a simple strided walk.
pub fn binary_map<T: WithDType, U: WithDType + Default>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    f: impl Fn(f32, f32) -> U + Sync,
) -> Vec<U> {
    let shape = la.shape();
    let n = la.elem_count();
    if let (Some(ra), Some(rb)) = (la.contiguous_range(), lb.contiguous_range()) {
        let (a, b) = (&a[ra], &b[rb]);
        return if n >= PAR_MIN {
            a.par_iter().zip(b.par_iter()).map(|(&x, &y)| f(x.to_f32(), y.to_f32())).collect()
        } else {
            a.iter().zip(b).map(|(&x, &y)| f(x.to_f32(), y.to_f32())).collect()
        };
    }
    if n == 0 {
        return Vec::new();
    }
    let rank = shape.len();
    let (inner, sa, sb) = if rank == 0 { (1, 0, 0) } else { (shape[rank - 1], la.strides()[rank - 1], lb.strides()[rank - 1]) };
    let outer_a: Vec<usize> = if rank == 0 { vec![la.offset()] } else { Layout::new(shape[..rank - 1].to_vec(), la.strides()[..rank - 1].to_vec(), la.offset()).strided_indices().collect() };
    let outer_b: Vec<usize> = if rank == 0 { vec![lb.offset()] } else { Layout::new(shape[..rank - 1].to_vec(), lb.strides()[..rank - 1].to_vec(), lb.offset()).strided_indices().collect() };
    let mut out = vec![U::default(); n];
    let row = |(o, (&oa, &ob)): (&mut [U], (&usize, &usize))| {
        for (j, v) in o.iter_mut().enumerate() {
            *v = f(a[oa + j * sa].to_f32(), b[ob + j * sb].to_f32());
        }
    };
    if n >= PAR_MIN {
        out.par_chunks_mut(inner).zip(outer_a.par_iter().zip(outer_b.par_iter())).for_each(row);
    } else {
        out.chunks_mut(inner).zip(outer_a.iter().zip(outer_b.iter())).for_each(row);
    }
    out
}
