//! Tensor ops by family. Each method checks shapes, dtypes and devices, then dispatches to the CPU
//! backend (crate::cpu) or the CUDA backend (crate::cuda).

pub mod elementwise;
