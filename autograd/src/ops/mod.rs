//! Backward rules, as methods on `Var` that mirror the engine's `Tensor` ops. Each method computes
//! the forward with the engine and records what its backward needs (usually the inputs, or the
//! output where that is cheaper), nothing more.

mod attention;
mod elementwise;
mod linalg;
mod lora;
mod norm;
mod reduce;
mod shape;
mod spatial;

use engine::{Result, Tensor};

/// Sums a broadcast gradient back to `shape` (the inverse of numpy broadcasting): leading extra
/// dimensions and dimensions that were 1 are summed.
pub fn sum_to(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let lead = g.rank() - shape.len().min(g.rank());
    let mut dims: Vec<isize> = (0..lead as isize).collect();
    for (i, &s) in shape.iter().enumerate() {
        if s == 1 && g.shape()[lead + i] != 1 {
            dims.push((lead + i) as isize);
        }
    }
    let s = if dims.is_empty() { g.clone() } else { g.sum(&dims, true)? };
    s.reshape(shape)
}

/// The gradient of one input: computed by `f` only when that input needs one.
fn want(needs: &[bool], i: usize, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if needs[i] {
        f().map(Some)
    } else {
        Ok(None)
    }
}
