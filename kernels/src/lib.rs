//! Kernel families of the lookahead engine. Each module holds one family: the CUDA C source
//! (kernels/cuda/NAME.cu), its launch parameters, and the CPU reference of the same math, which the
//! engine's CPU backend also runs. This crate knows nothing of tensors or autograd: it works on
//! slices, sizes and raw device buffers, and the engine decides layouts and dtypes.

pub mod compile;
pub mod emulate;
pub mod elementwise;
pub mod norm;
pub mod softmax;
pub mod attention;
pub mod grid_sample;
pub mod pool;
pub mod rng;
pub mod elementwise_backward;
pub mod norm_backward;
pub mod pool_backward;
pub mod grid_sample_backward;
pub mod adamw;
pub mod reduce;
pub mod index;
pub mod lora_linear;
pub mod flash_attention;
pub mod flash_attention_backward;
pub mod timing;

/// Every CUDA kernel family (one per kernels/cuda/*.cu). The CI compile test checks this list
/// against the folder, so a new .cu file must be added here.
pub const ALL_SOURCES: &[&compile::KernelSource] = &[&elementwise::SOURCE, &index::SOURCE, &pool::SOURCE, &grid_sample::SOURCE, &elementwise_backward::SOURCE, &adamw::SOURCE, &reduce::SOURCE, &softmax::SOURCE, &norm::SOURCE, &norm::GROUP_NORM_SOURCE, &rng::SOURCE, &flash_attention::SOURCE, &flash_attention::HOPPER_SOURCE, &flash_attention::WS_SOURCE, &lora_linear::SOURCE, &lora_linear::HOPPER_SOURCE, &lora_linear::TMA_SOURCE, &flash_attention_backward::SOURCE, &flash_attention_backward::HOPPER_SOURCE, &flash_attention_backward::WS_SOURCE, &timing::SOURCE];

/// Kernel-variant choices measured on GPUs and committed (kernels/tuned.json: the `tuned.json` of
/// `scripts/gpu-check.sh` runs merged in), read by engine::cuda::tune: per device, kernel sources
/// and problem shape, the variant that was fastest there.
pub const TUNED: &str = include_str!("../tuned.json");
