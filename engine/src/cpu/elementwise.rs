//! CPU element-wise loops over strided layouts: copies, casts, unary and binary maps.

use kernels::elementwise::{BinaryOp, UnaryOp};
use rayon::prelude::*;

use crate::cpu::CpuStorage;
use crate::layout::Layout;
use crate::{DType, WithDType};

/// Below this many elements the loops stay on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// Elements per parallel task of the contiguous maps: large enough to amortise the task, small
/// enough to balance two to a few dozen threads. Each task is a plain loop over slices, which the
/// compiler vectorizes (rayon's element-wise `collect` checks every write and does not).
const CHUNK: usize = 1 << 14;

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
        Some(r) if r.len() >= PAR_MIN => {
            let src = &src[r];
            let mut out = vec![T::from_f32(0.0); src.len()];
            out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, x)| {
                o.iter_mut().zip(x).for_each(|(o, &x)| *o = T::from_f32(f(x.to_f32())));
            });
            out
        }
        Some(r) => src[r].iter().map(|&x| T::from_f32(f(x.to_f32()))).collect(),
        None => layout.strided_indices().map(|i| T::from_f32(f(src[i].to_f32()))).collect(),
    }
}

/// out[i] = f(src[i]) for f32, written into `out` (row-major over `layout`).
fn unary_f32_into(src: &[f32], layout: &Layout, out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    match layout.contiguous_range() {
        Some(r) if r.len() >= PAR_MIN => out.par_chunks_mut(CHUNK).zip(src[r].par_chunks(CHUNK)).for_each(|(o, x)| {
            o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
        }),
        Some(r) => out.iter_mut().zip(&src[r]).for_each(|(o, &x)| *o = f(x)),
        None => out.iter_mut().zip(layout.strided_indices()).for_each(|(o, i)| *o = f(src[i])),
    }
}

/// An f32 unary map straight into new storage (no intermediate Vec to copy), with the cheap ops
/// picked outside the loop: a match per element would keep the loop from vectorizing. The
/// libm-bound ops (exp, tanh, erf, ...) go through `op.apply`.
pub fn unary_f32(src: &[f32], layout: &Layout, op: UnaryOp) -> CpuStorage {
    let mut storage = CpuStorage::zeros(DType::F32, layout.elem_count());
    let out = storage.as_mut_slice::<f32>().expect("f32 storage");
    match op {
        UnaryOp::Neg => unary_f32_into(src, layout, out, |x| -x),
        UnaryOp::Abs => unary_f32_into(src, layout, out, f32::abs),
        UnaryOp::Sqr => unary_f32_into(src, layout, out, |x| x * x),
        UnaryOp::Sqrt => unary_f32_into(src, layout, out, f32::sqrt),
        UnaryOp::Recip => unary_f32_into(src, layout, out, |x| 1.0 / x),
        UnaryOp::Relu => unary_f32_into(src, layout, out, |x| x.max(0.0)),
        UnaryOp::Affine { mul, add } => unary_f32_into(src, layout, out, |x| x * mul + add),
        UnaryOp::Clamp { min, max } => unary_f32_into(src, layout, out, |x| x.max(min).min(max)),
        _ => unary_f32_into(src, layout, out, |x| op.apply(x)),
    }
    storage
}

/// An f32 binary map straight into new storage, with the op picked outside the loop (see
/// `unary_f32`).
pub fn binary_f32(a: &[f32], la: &Layout, b: &[f32], lb: &Layout, op: BinaryOp) -> CpuStorage {
    let mut storage = CpuStorage::zeros(DType::F32, la.elem_count());
    let out = storage.as_mut_slice::<f32>().expect("f32 storage");
    match op {
        BinaryOp::Add => binary_into(a, la, b, lb, out, |x, y| x + y),
        BinaryOp::Sub => binary_into(a, la, b, lb, out, |x, y| x - y),
        BinaryOp::Mul => binary_into(a, la, b, lb, out, |x, y| x * y),
        BinaryOp::Div => binary_into(a, la, b, lb, out, |x, y| x / y),
        BinaryOp::Max => binary_into(a, la, b, lb, out, f32::max),
        BinaryOp::Min => binary_into(a, la, b, lb, out, f32::min),
        BinaryOp::Pow => binary_into(a, la, b, lb, out, f32::powf),
    }
    storage
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
    let mut out = vec![U::default(); la.elem_count()];
    binary_into(a, la, b, lb, &mut out, f);
    out
}

/// `binary_map` into `out` (row-major over the broadcast shape).
fn binary_into<T: WithDType, U: WithDType>(a: &[T], la: &Layout, b: &[T], lb: &Layout, out: &mut [U], f: impl Fn(f32, f32) -> U + Sync) {
    let shape = la.shape();
    let n = la.elem_count();
    assert_eq!(out.len(), n, "binary_map: output length");
    if let (Some(ra), Some(rb)) = (la.contiguous_range(), lb.contiguous_range()) {
        let (a, b) = (&a[ra], &b[rb]);
        let run = |(o, (x, y)): (&mut [U], (&[T], &[T]))| {
            o.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (&x, &y))| *o = f(x.to_f32(), y.to_f32()));
        };
        if n >= PAR_MIN {
            out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(run);
        } else {
            run((out, (a, b)));
        }
        return;
    }
    if n == 0 {
        return;
    }
    let rank = shape.len();
    let (inner, sa, sb) = if rank == 0 { (1, 0, 0) } else { (shape[rank - 1], la.strides()[rank - 1], lb.strides()[rank - 1]) };
    let outer_a: Vec<usize> = if rank == 0 { vec![la.offset()] } else { Layout::new(shape[..rank - 1].to_vec(), la.strides()[..rank - 1].to_vec(), la.offset()).strided_indices().collect() };
    let outer_b: Vec<usize> = if rank == 0 { vec![lb.offset()] } else { Layout::new(shape[..rank - 1].to_vec(), lb.strides()[..rank - 1].to_vec(), lb.offset()).strided_indices().collect() };
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
}
