//! The lookahead tensor engine: `Tensor` (shared storage + strided views), dtypes (f32, bf16, f16,
//! i64, u8), devices (CPU; CUDA through dynamically loaded libraries), the CPU and CUDA backends of
//! every op the models need, and weights I/O (safetensors, PyTorch zip checkpoints).
//!
//! It is not an autograd (see the `autograd` crate) and holds no model code. Errors are typed and
//! name the shapes, dtypes, devices, files or keys involved; bad input never panics.

pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod io;
pub mod layout;
pub mod ops;
pub mod storage;
mod tensor;

pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use layout::Layout;
pub use ops::conv::Conv2dParams;
pub use ops::shape::PadMode;
pub use tensor::Tensor;
