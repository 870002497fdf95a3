//! The flash-attention backward kernels (kernels/cuda/flash_attention_backward.cu: prep, main,
//! dq conversion) run under the CPU emulator of CUDA (kernels::emulate) against the CPU reference
//! (kernels::flash_attention_backward), on odd sizes with several key tiles per source, dropped
//! reference tokens, a shared and a per-batch keep mask, rows with no key, [B, L, H, D] memory read
//! as [B, H, L, D] views, bf16 and f16, head dims 64 and 128 (the cases and checks are
//! tests/common/flash_backward_emulation.rs, shared with the Hopper kernel's test). Needs a C++
//! compiler (LOOKAHEAD_CXX, c++ or g++); without one each test says it skipped (a failure when
//! `CI` is set).

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/flash_backward_emulation.rs"]
#[macro_use]
mod flash_backward_emulation;

emulated_backward_tests!(flash_backward_emulation::MainKernel::MmaSync);
