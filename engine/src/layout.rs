//! Shapes, strides and offsets: the view a tensor takes of its storage. All in elements.

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc *= shape[i];
    }
    strides
}

/// Resolves a possibly negative dimension index against a rank.
pub fn resolve_dim(op: &'static str, dim: isize, rank: usize) -> Result<usize> {
    let d = if dim < 0 { dim + rank as isize } else { dim };
    if d < 0 || d as usize >= rank {
        return Err(Error::DimOutOfRange { op, dim, rank });
    }
    Ok(d as usize)
}

/// The shape two shapes broadcast to (numpy rules), or an error naming both.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::ShapeMismatch { op, lhs: a.to_vec(), rhs: b.to_vec() });
        };
    }
    Ok(out)
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }

    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        assert_eq!(shape.len(), strides.len(), "layout rank mismatch");
        Layout { shape, strides, offset }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major contiguous (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for i in (0..self.shape.len()).rev() {
            if self.shape[i] != 1 && self.strides[i] != acc {
                return false;
            }
            acc *= self.shape[i];
        }
        true
    }

    /// The range of storage elements a contiguous layout covers.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous().then(|| self.offset..self.offset + self.elem_count())
    }

    /// One past the largest storage element index this view touches (0 when empty).
    pub fn storage_extent(&self) -> usize {
        if self.elem_count() == 0 {
            return 0;
        }
        self.offset + self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1
    }

    pub fn reshape(&self, shape: &[usize]) -> Option<Layout> {
        // Views only for contiguous layouts; otherwise the caller copies first.
        self.is_contiguous().then(|| Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: self.offset })
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Layout> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if dims.len() != rank || dims.iter().any(|&d| d >= rank || std::mem::replace(&mut seen[d], true)) {
            return Err(Error::BadShape { op: "permute", msg: format!("{dims:?} is not a permutation of {rank} dims"), shape: self.shape.clone() });
        }
        Ok(Layout {
            shape: dims.iter().map(|&d| self.shape[d]).collect(),
            strides: dims.iter().map(|&d| self.strides[d]).collect(),
            offset: self.offset,
        })
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::BadShape { op: "narrow", msg: format!("dim {dim} range {start}..{} out of bounds", start + len), shape: self.shape.clone() });
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        Ok(Layout { shape, strides: self.strides.clone(), offset: self.offset + start * self.strides[dim] })
    }

    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Layout> {
        let err = || Error::BadShape { op: "broadcast_to", msg: format!("cannot broadcast to {shape:?}"), shape: self.shape.clone() };
        if shape.len() < self.rank() {
            return Err(err());
        }
        let lead = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for i in 0..shape.len() {
            if i < lead {
                continue;
            }
            let (d, s) = (self.shape[i - lead], self.strides[i - lead]);
            if d == shape[i] {
                strides[i] = s;
            } else if d == 1 {
                strides[i] = 0;
            } else {
                return Err(err());
            }
        }
        Ok(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// Storage index of every element in row-major order.
    pub fn strided_indices(&self) -> StridedIndex<'_> {
        StridedIndex::new(self)
    }

    /// Collapses the layout into (outer blocks, contiguous inner run) so that element-wise loops can
    /// run over contiguous runs: returns the inner run length and the starting index of every run.
    pub fn runs(&self) -> (usize, Vec<usize>) {
        let mut inner = 1;
        let mut k = self.rank();
        while k > 0 && (self.shape[k - 1] == 1 || self.strides[k - 1] == inner) {
            inner *= self.shape[k - 1];
            k -= 1;
        }
        let outer = Layout { shape: self.shape[..k].to_vec(), strides: self.strides[..k].to_vec(), offset: self.offset };
        (inner, outer.strided_indices().collect())
    }
}

/// Iterator over the storage indices of a layout, in row-major order of its shape.
pub struct StridedIndex<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    next: Option<usize>,
    remaining: usize,
}

impl<'a> StridedIndex<'a> {
    fn new(layout: &'a Layout) -> Self {
        let n = layout.elem_count();
        StridedIndex { layout, index: vec![0; layout.rank()], next: (n > 0).then_some(layout.offset), remaining: n }
    }
}

impl Iterator for StridedIndex<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let cur = self.next?;
        self.remaining -= 1;
        if self.remaining == 0 {
            self.next = None;
            return Some(cur);
        }
        let mut pos = cur;
        for d in (0..self.index.len()).rev() {
            self.index[d] += 1;
            pos += self.layout.strides[d];
            if self.index[d] < self.layout.shape[d] {
                break;
            }
            pos -= self.layout.strides[d] * self.layout.shape[d];
            self.index[d] = 0;
        }
        self.next = Some(pos);
        Some(cur)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}
impl ExactSizeIterator for StridedIndex<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_indices_of_transpose() {
        let l = Layout::contiguous(&[2, 3]).permute(&[1, 0]).unwrap();
        assert_eq!(l.strided_indices().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        let (inner, starts) = l.runs();
        assert_eq!(inner, 1);
        assert_eq!(starts.len(), 6);
    }

    #[test]
    fn runs_of_narrowed_rows() {
        let l = Layout::contiguous(&[4, 5]).narrow(0, 1, 2).unwrap();
        assert_eq!(l.runs(), (10, vec![5]));
        let l = Layout::contiguous(&[4, 5]).narrow(1, 1, 3).unwrap();
        assert_eq!(l.runs(), (3, vec![1, 6, 11, 16]));
    }

    #[test]
    fn broadcast_rules() {
        assert_eq!(broadcast_shape("t", &[3, 1, 5], &[4, 1]).unwrap(), vec![3, 4, 5]);
        assert!(broadcast_shape("t", &[3, 2], &[4, 2]).is_err());
        let l = Layout::contiguous(&[3, 1]).broadcast_to(&[2, 3, 4]).unwrap();
        assert_eq!(l.strides(), &[0, 1, 0]);
    }
}
