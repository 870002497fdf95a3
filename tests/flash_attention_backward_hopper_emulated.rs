//! The Hopper flash-attention backward (kernels/cuda/flash_attention_backward_hopper.cu, wgmma,
//! between the prep and dq kernels of kernels/cuda/flash_attention_backward.cu) run under the CPU
//! emulator of CUDA (kernels::emulate, which models wgmma) against the CPU reference
//! (kernels::flash_attention_backward): the cases of the mma.sync kernel's test
//! (tests/common/flash_backward_emulation.rs): Lk / Lr 45 / 150, 45 / 70, 130 / 45, 150 / 0, Lk 0
//! with every reference token of a batch entry dropped, Lq 77 / 52 / 21 (partial query tiles) and
//! 285 (five tiles: the three-stage ring and the two dS / exchange buffers wrap), bf16 / f16, head
//! dims 64 (partial dQ sums exchanged between the warpgroups) and 128 (dQ split by columns). Needs
//! a C++ compiler; without one each test says it skipped (a failure when `CI` is set).

#[path = "common/emulation.rs"]
mod emulation;
#[path = "common/flash_backward_emulation.rs"]
#[macro_use]
mod flash_backward_emulation;

emulated_backward_tests!(flash_backward_emulation::MainKernel::Hopper);

// The variants (LOOKAHEAD_VARIANT_FLASH_BWD; engine::cuda::flash_attention_backward::HOPPER_VARIANTS),
// every case each (their head dim 128 cases run the default kernel).
mod ss {
    use super::*;
    emulated_backward_tests!(flash_backward_emulation::MainKernel::HopperVariant("ss"));
}
mod late {
    use super::*;
    emulated_backward_tests!(flash_backward_emulation::MainKernel::HopperVariant("late"));
}
mod ws {
    use super::*;
    emulated_backward_tests!(flash_backward_emulation::MainKernel::HopperVariant("ws"));
}
mod ws_stagger {
    use super::*;
    emulated_backward_tests!(flash_backward_emulation::MainKernel::HopperVariant("ws_stagger"));
}
