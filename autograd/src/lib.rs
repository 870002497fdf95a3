//! Reverse-mode automatic differentiation over engine tensors: `Var`, the graph it records, the
//! backward rules of every op training uses, `no_grad`, gradient checkpointing, a finite-difference
//! gradcheck, and the optimizer (AdamW, gradient clipping, learning-rate schedules). It holds no
//! model code and no kernels: the engine computes, this crate records and differentiates.
//!
//! Design: a `Var` is an `Arc` of a node holding its value, whether it requires a gradient, and
//! (for op results) its parents and a backward closure over the tensors it saved. `backward()`
//! sorts the graph topologically from the output, runs the closures in reverse order, accumulates
//! gradients into the leaves that require them, and frees every node it passed (unless asked to
//! retain the graph). Under `no_grad` (a thread-local flag) ops record nothing and save nothing.
//! An op without a backward rule records a node that errors if a gradient reaches it.

mod checkpoint;
pub mod gradcheck;
mod ops;
pub mod optim;
mod var;

pub use checkpoint::checkpoint;
pub use ops::sum_to;
pub use var::{backward_many, enable_grad, is_grad_enabled, no_grad, BackwardFn, Var};
