//! Tensor ops by family. Each method checks shapes, dtypes and devices, then dispatches to the CPU
//! backend (crate::cpu) or the CUDA backend (crate::cuda).

pub mod elementwise;
pub mod norm;
pub mod reduce;
pub mod shape;
pub mod attention;
pub mod conv;
pub mod linalg;
pub mod lora_linear;
pub mod random;
pub mod spatial;
pub mod backward_elementwise;
pub mod backward_index;
pub mod backward_norm;
pub mod backward_spatial;
pub mod conv_backward;
pub mod adamw;
pub mod flash_attention;
pub mod flash_attention_backward;
pub mod flash_attention_decoupled;
