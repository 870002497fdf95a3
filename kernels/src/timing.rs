//! Stream timing (kernels/cuda/timing.cu): `hold_stream(ns)`, one thread that keeps the stream busy
//! for `ns` nanoseconds so that a batch queued behind it runs at the GPU's pace. No CPU reference:
//! it computes nothing.

pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "timing", code: include_str!("../cuda/timing.cu"), options: &[] };
