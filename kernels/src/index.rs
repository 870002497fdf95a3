//! Shape and indexing kernels (kernels/cuda/index.cu): cat, gather / index_select / embedding,
//! pad, masked_fill, and index_add into zeros. They move raw elements of 1, 2, 4 or 8 bytes (any
//! dtype); the CPU reference is the engine's own byte-moving code in engine/src/ops/shape.rs and
//! backward_index.rs, so this module holds only the CUDA source and its launch constants.

use crate::compile::KernelSource;

pub const SOURCE: KernelSource = KernelSource { name: "index", code: include_str!("../cuda/index.cu"), options: &[] };

/// Threads per block of every kernel in index.cu (IX_BLOCK).
pub const BLOCK: u32 = 256;

/// Pad modes as index.cu's `pad_*` kernels number them.
pub const PAD_CONSTANT: i32 = 0;
pub const PAD_REFLECT: i32 = 1;
pub const PAD_REPLICATE: i32 = 2;
