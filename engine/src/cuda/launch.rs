//! Launch helpers shared by the CUDA arms of every op: grid sizes, launch-error mapping, and the
//! strided-operand description (`StridedArgs`, mirrored from kernels/cuda/common.cuh) with the
//! dimension coalescing that lets most views run as fewer, larger dimensions.

use cudarc::driver::{sys, DeviceRepr, DriverError, LaunchConfig};

use super::device::CudaDevice;
use crate::{Error, Result};

/// Dimensions a strided kernel takes (LA_MAX_DIMS in common.cuh). Layouts are coalesced first,
/// so only views that stay above this many dimensions after merging are refused.
pub const MAX_DIMS: usize = 8;

/// One block per `block` threads, enough blocks to give every one of `threads` its own thread
/// (at least one block, so that kernels with a tail path always run).
pub fn launch_1d(threads: usize, block: u32) -> LaunchConfig {
    let blocks = threads.div_ceil(block as usize).clamp(1, u32::MAX as usize >> 1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// `map_err` adapter for a failed launch of `kernel`.
pub fn launch_failed(kernel: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("launching {kernel}: {e}"))
}

/// The CUlaunchConfig of a (grid, block) launch on the device's stream in thread-block clusters
/// of `cs` CTAs along x (CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION; grid a multiple of `cs`), with
/// `shared` bytes of dynamic shared memory, for cuLaunchKernelEx and
/// cuOccupancyMaxActiveClusters; `attr` must outlive the config's use.
pub fn cluster_config(dev: &CudaDevice, grid: u32, block: u32, cs: u32, shared: u32, attr: &mut sys::CUlaunchAttribute) -> sys::CUlaunchConfig {
    // SAFETY: an all-zero attribute value is a valid bit pattern (plain integers).
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x: cs, y: 1, z: 1 };
    *attr = sys::CUlaunchAttribute { id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, pad: [0; 4], value };
    sys::CUlaunchConfig {
        gridDimX: grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared,
        hStream: dev.stream().cu_stream(),
        attrs: attr as *mut sys::CUlaunchAttribute,
        numAttrs: 1,
    }
}

/// Launches `f` (`name` in errors) on the device's stream as `cluster_config` describes it: grid
/// (grid, 1, 1) of `block` threads in clusters of `cs` CTAs, `shared` bytes of dynamic shared
/// memory (opted into by the caller where above 48 KiB), through cuLaunchKernelEx.
///
/// # Safety
/// `args` must point at values matching the kernel's parameters, alive until the call returns
/// (the driver copies them), and the buffers they name must satisfy the kernel's host guarantees.
pub unsafe fn launch_cluster(dev: &CudaDevice, f: &super::CudaFunction, name: &str, (grid, block, cs, shared): (u32, u32, u32, u32), args: &mut [*mut std::ffi::c_void]) -> Result<()> {
    dev.bind()?;
    // SAFETY: zeroed, then every field written by cluster_config.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    let cfg = cluster_config(dev, grid, block, cs, shared, &mut attr);
    dev.profile_launch(f);
    // SAFETY: cfg and its attribute live for the call; the arguments are the caller's promise.
    unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(launch_failed(name))?;
    Ok(())
}

/// How many clusters of `cs` CTAs of `f` (`block` threads, `shared` bytes of dynamic shared
/// memory, already opted into) the device can run at once for a launch of `grid` CTAs
/// (cuOccupancyMaxActiveClusters; the GPCs' SM counts can leave SMs that no cluster uses); 0 where
/// none fits or the query fails.
pub fn max_active_clusters(dev: &CudaDevice, f: &super::CudaFunction, (grid, block, cs, shared): (u32, u32, u32, u32)) -> Result<u32> {
    dev.bind()?;
    // SAFETY: zeroed, then every field written by cluster_config.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    let cfg = cluster_config(dev, grid, block, cs, shared, &mut attr);
    let mut active: std::ffi::c_int = 0;
    // SAFETY: cfg (and the attribute it points to) and f are valid for the call.
    let ok = unsafe { sys::cuOccupancyMaxActiveClusters(&mut active, f.cu_function(), &cfg) }.result().is_ok();
    Ok(if ok { active.max(0) as u32 } else { 0 })
}

/// Shape and per-input strides (in elements) of an element-wise kernel; the output is contiguous
/// over `shape`. Must match `StridedArgs<NIN>` in kernels/cuda/common.cuh field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StridedArgs<const NIN: usize> {
    pub rank: u64,
    pub shape: [u64; MAX_DIMS],
    pub strides: [[u64; MAX_DIMS]; NIN],
}

// SAFETY: plain #[repr(C)] integers, laid out as the CUDA struct of the same name.
unsafe impl<const NIN: usize> DeviceRepr for StridedArgs<NIN> {}

/// How to run an element-wise kernel over `NIN` operands viewed with the same (broadcast) shape.
#[derive(Clone, Copy, Debug)]
pub struct ElementwisePlan<const NIN: usize> {
    pub elems: usize,
    pub args: StridedArgs<NIN>,
    /// Every operand is one dense run (after coalescing): the vectorized kernels apply, given
    /// aligned pointers.
    pub contiguous: bool,
    /// Some index or offset does not fit the kernels' 32-bit index math.
    pub wide: bool,
}

impl<const NIN: usize> ElementwisePlan<NIN> {
    /// Drops size-1 dimensions and merges neighbours that are contiguous with each other in every
    /// operand, e.g. a [N, C, H, W] + [1, C, 1, 1] add becomes 3 dimensions [N, C, H*W].
    pub fn new(op: &'static str, shape: &[usize], strides: [&[usize]; NIN]) -> Result<Self> {
        let elems: usize = shape.iter().product();
        let mut dims: Vec<(usize, [usize; NIN])> = Vec::with_capacity(shape.len());
        for (d, &size) in shape.iter().enumerate() {
            if size == 1 {
                continue;
            }
            let s: [usize; NIN] = std::array::from_fn(|j| strides[j][d]);
            if let Some(last) = dims.last_mut() {
                if (0..NIN).all(|j| last.1[j] == s[j] * size) {
                    last.0 *= size;
                    last.1 = s;
                    continue;
                }
            }
            dims.push((size, s));
        }
        if dims.is_empty() {
            dims.push((1, [0; NIN]));
        }
        if dims.len() > MAX_DIMS {
            return Err(Error::BadShape { op, msg: format!("CUDA element-wise kernels take at most {MAX_DIMS} dimensions after merging contiguous ones; this view has {}", dims.len()), shape: shape.to_vec() });
        }
        let mut args = StridedArgs { rank: dims.len() as u64, shape: [1; MAX_DIMS], strides: [[0; MAX_DIMS]; NIN] };
        for (d, (size, s)) in dims.iter().enumerate() {
            args.shape[d] = *size as u64;
            for (stride, &v) in args.strides.iter_mut().zip(s) {
                stride[d] = v as u64;
            }
        }
        let contiguous = elems <= 1 || (dims.len() == 1 && (0..NIN).all(|j| dims[0].1[j] == 1));
        let limit = i32::MAX as usize;
        let extent = |j: usize| dims.iter().map(|(size, s)| size.saturating_sub(1) * s[j]).sum::<usize>();
        let wide = elems > limit || (0..NIN).any(|j| extent(j) >= limit);
        Ok(ElementwisePlan { elems, args, contiguous, wide })
    }
}

/// Grid for the strided kernels: a grid-stride loop, capped so that grid * block stays below 2^30
/// (the 32-bit index loop must not overflow).
pub fn strided_config(elems: usize, block: u32) -> LaunchConfig {
    let max_blocks = (1usize << 30) / block as usize;
    let blocks = elems.div_ceil(block as usize).clamp(1, max_blocks) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_contiguous_and_broadcast_dims() {
        // [2,3,4,5] contiguous + [1,3,1,1] broadcast as [2,3,4,5] with strides (0,1,0,0).
        let p = ElementwisePlan::<2>::new("t", &[2, 3, 4, 5], [&[60, 20, 5, 1], &[0, 1, 0, 0]]).unwrap();
        assert_eq!(p.args.rank, 3);
        assert_eq!(&p.args.shape[..3], &[2, 3, 20]);
        assert_eq!(&p.args.strides[0][..3], &[60, 20, 1]);
        assert_eq!(&p.args.strides[1][..3], &[0, 1, 0]);
        assert!(!p.contiguous && !p.wide);

        let p = ElementwisePlan::<1>::new("t", &[4, 1, 6], [&[6, 99, 1]]).unwrap();
        assert!(p.contiguous);
        assert_eq!((p.args.rank, p.args.shape[0], p.args.strides[0][0]), (1, 24, 1));

        // A transpose stays two dimensions.
        let p = ElementwisePlan::<1>::new("t", &[3, 2], [&[1, 3]]).unwrap();
        assert_eq!((p.args.rank, &p.args.shape[..2], &p.args.strides[0][..2]), (2, &[3u64, 2][..], &[1u64, 3][..]));
        assert!(!p.contiguous);

        // Scalars and empty tensors.
        let p = ElementwisePlan::<2>::new("t", &[], [&[], &[]]).unwrap();
        assert!(p.contiguous && p.elems == 1 && p.args.rank == 1);
        let p = ElementwisePlan::<1>::new("t", &[0, 3], [&[3, 1]]).unwrap();
        assert_eq!(p.elems, 0);
    }

    #[test]
    fn wide_when_offsets_pass_31_bits() {
        let p = ElementwisePlan::<1>::new("t", &[2, 3], [&[1 << 31, 1]]).unwrap();
        assert!(p.wide);
        let p = ElementwisePlan::<1>::new("t", &[1 << 16, 1 << 15], [&[1 << 15, 1]]).unwrap();
        assert!(p.wide, "2^31 elements");
    }

    #[test]
    fn strided_args_layout_matches_cuda() {
        // u64 rank + 8 u64 shape + NIN * 8 u64 strides, no padding.
        assert_eq!(std::mem::size_of::<StridedArgs<1>>(), 8 * (1 + 8 + 8));
        assert_eq!(std::mem::size_of::<StridedArgs<3>>(), 8 * (1 + 8 + 24));
    }
}
