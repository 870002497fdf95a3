//! Row reductions on the GPU (kernels/cuda/reduce.cu): sum / mean / var and max / min / argmax
//! over contiguous rows. The CPU reference of the same math is the engine's CPU path in
//! engine/src/ops/reduce.rs (plain row loops in f64 there), which the GPU parity tests compare
//! against.

use crate::compile::KernelSource;

/// kernels/cuda/reduce.cu.
pub const SOURCE: KernelSource = KernelSource { name: "reduce", code: include_str!("../cuda/reduce.cu"), options: &[] };

/// Threads per block of the row kernels (RED_BLOCK in the .cu).
pub const BLOCK: u32 = 256;

/// Op codes of `sum_rows_*` / `sum_finalize_*`.
pub const OP_SUM: i32 = 0;
pub const OP_MEAN: i32 = 1;
pub const OP_VAR: i32 = 2;
