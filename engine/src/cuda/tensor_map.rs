//! TMA tensor maps for the GPU: the CUtensorMap that a `const __grid_constant__ TensorMap` kernel
//! parameter (kernels/cuda/pipeline.cuh) takes, encoded by the driver's cuTensorMapEncodeTiled
//! from the same `TensorMap2d` description that builds the CPU emulator's map
//! (`TensorMap2d::emulated`, kernels/src/emulate.rs), so that emulated tests and the GPU run the
//! kernels on identical descriptions.
//!
//! ```text
//! let map = TensorMap2d { base: a_ptr, dtype: TmaDtype::Bf16, rows: m, cols: k, row_stride_bytes: 2 * k,
//!                         box_rows: 128, box_cols: 64, swizzle: TmaSwizzle::B128 };
//! let arg = tensor_map::encode(&map)?;        // TensorMapParam: 128 bytes, 64-byte aligned
//! builder.arg(&arg);                           // the driver copies it to the kernel's parameter offset
//! ```
//! cudarc pushes a pointer to each argument and cuLaunchKernel copies the parameter from it into
//! the offset the kernel's declaration gives (`.param .align 64 .b8 [128]` for TensorMap), so the
//! host struct only needs the right size; it is also 64-byte aligned, as a CUtensorMap must be in
//! host memory. Errors, never panics: a description TMA cannot take (checked before the driver is
//! asked), no CUDA driver, or a driver that refuses the encoding.

use cudarc::driver::sys;
use cudarc::driver::DeviceRepr;

use crate::{DType, Error, Result};

pub use kernels::emulate::{TensorMap, TensorMap2d, TensorMapArg, TmaDtype, TmaSwizzle};

/// A GPU tensor map as a kernel argument (`const __grid_constant__ TensorMap`).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapParam(pub [u64; 16]);

// SAFETY: 128 bytes of plain integers with the size and alignment of the kernels' TensorMap
// parameter (CUtensorMap); the driver copies it by the kernel's parameter layout.
unsafe impl DeviceRepr for TensorMapParam {}

/// The TMA element type of an engine dtype (the 16-bit floats and f32; an error otherwise).
pub fn tma_dtype(dtype: DType) -> Result<TmaDtype> {
    match dtype {
        DType::BF16 => Ok(TmaDtype::Bf16),
        DType::F16 => Ok(TmaDtype::F16),
        DType::F32 => Ok(TmaDtype::F32),
        other => Err(Error::Cuda(format!("TMA tensor map: no TMA element type for {other:?}"))),
    }
}

fn data_type(d: TmaDtype) -> sys::CUtensorMapDataType {
    match d {
        TmaDtype::U8 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        TmaDtype::U16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        TmaDtype::U32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
        TmaDtype::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        TmaDtype::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        TmaDtype::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    }
}

fn swizzle(s: TmaSwizzle) -> sys::CUtensorMapSwizzle {
    match s {
        TmaSwizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        TmaSwizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        TmaSwizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        TmaSwizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    }
}

/// The CUtensorMap of `map` (a `TensorMap` or `TensorMap2d`; tiled, of the map's rank, no
/// interleave, L2 promotion of 128 bytes, out-of-range elements zero-filled): `validate()` first,
/// then the driver (probed: an error when there is none, or when it lacks cuTensorMapEncodeTiled).
pub fn encode<M: Into<TensorMap>>(map: M) -> Result<TensorMapParam> {
    let map: TensorMap = map.into();
    map.validate().map_err(|e| Error::Cuda(e.to_string()))?;
    crate::cuda::device_count()?;
    // Innermost first; the strides of every dimension but the innermost, in bytes (the driver
    // reads `rank` entries of each, `rank - 1` strides).
    let (dims, strides, boxes) = (map.dims, map.strides_bytes, map.box_dims);
    let element_strides: [u32; 4] = [1; 4];
    let mut out = sys::CUtensorMap { opaque: [0; 16] };
    // cudarc panics when the driver lacks the function; the probe above found a CUDA 13 driver,
    // but turn a panic into an error all the same.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: every pointer addresses a live local array at least as long as the rank (2..4,
        // validated) needs; `out` is a CUtensorMap the driver writes.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut out,
                data_type(map.dtype),
                map.rank as u32,
                map.base as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle(map.swizzle),
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
    }));
    match r {
        Ok(sys::CUresult::CUDA_SUCCESS) => Ok(TensorMapParam(out.opaque)),
        Ok(code) => Err(Error::Cuda(format!("cuTensorMapEncodeTiled failed with {code:?} for {map:?}"))),
        Err(_) => Err(Error::Cuda("the CUDA driver lacks cuTensorMapEncodeTiled (a driver older than CUDA 12?)".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_map() -> TensorMap2d {
        TensorMap2d { base: 0x1000, dtype: TmaDtype::Bf16, rows: 300, cols: 200, row_stride_bytes: 400, box_rows: 64, box_cols: 64, swizzle: TmaSwizzle::B128 }
    }

    #[test]
    fn the_kernel_argument_is_128_bytes_and_64_byte_aligned() {
        assert_eq!(std::mem::size_of::<TensorMapParam>(), 128);
        assert_eq!(std::mem::align_of::<TensorMapParam>(), 64);
        assert_eq!(std::mem::size_of::<TensorMapArg>(), 128);
        assert_eq!(std::mem::align_of::<TensorMapArg>(), 64);
    }

    #[test]
    fn descriptions_tma_cannot_take_are_errors_before_the_driver() {
        assert!(bf16_map().validate().is_ok());
        let bad = [
            TensorMap2d { base: 0x1008, ..bf16_map() },
            TensorMap2d { row_stride_bytes: 408, ..bf16_map() },
            TensorMap2d { row_stride_bytes: 384, ..bf16_map() },
            TensorMap2d { box_rows: 257, ..bf16_map() },
            TensorMap2d { box_cols: 32, ..bf16_map() },
            TensorMap2d { box_cols: 4, swizzle: TmaSwizzle::None, ..bf16_map() },
        ];
        for m in bad {
            let e = encode(&m).expect_err("an invalid description must be refused");
            assert!(e.to_string().contains("TMA tensor map"), "{e}");
        }
        // Rank-4 maps: rank out of range, a stride not a 16-byte multiple, a box past the rank.
        let four = TensorMap { base: 0x1000, dtype: TmaDtype::Bf16, rank: 4, dims: [64, 45, 3, 2], strides_bytes: [384, 128, 17280], box_dims: [64, 128, 1, 1], swizzle: TmaSwizzle::B128 };
        assert!(four.validate().is_ok());
        for m in [TensorMap { rank: 5, ..four }, TensorMap { strides_bytes: [384, 136, 17280], ..four }, TensorMap { rank: 2, ..four }] {
            let e = encode(m).expect_err("an invalid description must be refused");
            assert!(e.to_string().contains("TMA tensor map"), "{e}");
        }
    }

    #[test]
    fn encoding_without_a_gpu_is_an_error_and_with_one_succeeds() {
        if !crate::cuda::is_available() {
            let e = encode(&bf16_map()).expect_err("no GPU: the driver cannot encode");
            assert!(!e.to_string().is_empty());
            return;
        }
        // A device buffer of the 300 x 200 bf16 matrix (rows 400 bytes apart).
        let dev = crate::cuda::device(0).expect("device 0");
        let buf = crate::cuda::CudaStorage::alloc(&dev, DType::BF16, 300 * 200).expect("allocation");
        for swizzle in [TmaSwizzle::B128, TmaSwizzle::None] {
            let box_cols = if swizzle == TmaSwizzle::None { 24 } else { 64 };
            let p = encode(&TensorMap2d { base: buf.device_ptr(), box_cols, swizzle, ..bf16_map() }).unwrap_or_else(|e| panic!("{swizzle:?}: {e}"));
            assert!(p.0.iter().any(|&w| w != 0));
        }
    }
}
