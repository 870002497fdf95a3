//! Weights I/O: safetensors (memory-mapped, zero copy where the dtype and alignment allow) and
//! PyTorch zip checkpoints.

pub mod safetensors;
