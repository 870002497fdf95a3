//! GPU parity suite: every CUDA op against the CPU backend on the same deterministic random inputs,
//! over odd sizes and non-contiguous views (transposed, narrowed / misaligned, channels-last,
//! broadcast), with per-dtype tolerances. Without a CUDA device every test prints
//! "skipped: no CUDA device (...)" and passes.
//!
//! Adding an op: write a `#[test]` that starts with `let Some((dev, _gpu)) = gpu("name") else { return };`
//! and calls `check(label, out_dtype, |device| { ...build inputs with input()/LAYOUTS on `device`,
//! run the op... })` per case: `check` runs the closure on the CPU and on `dev` and compares.

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

use cuda_harness::{cuda, cuda_timed, gb_per_s, gpu, input, values, Tolerances, View, ALL, FLOATS, UNARY};
use engine::{DType, Device, Result, Tensor};
use kernels::elementwise::{BinaryOp, CmpOp};

/// CPU and GPU both compute in f32 and may differ by a few f32 ulps (libm vs CUDA math), which
/// can flip the final bf16/f16 rounding by one step.
const TOLERANCE: Tolerances = Tolerances { f32: (1e-5, 1e-5), f16: (1e-3, 2e-3), bf16: (1e-2, 1e-2) };

/// Runs `run` on the CPU and on `dev`, and compares the results within `dtype`'s tolerance.
fn check(dev: Device, label: &str, dtype: DType, run: impl Fn(Device) -> Result<Tensor>) {
    cuda_harness::check_tol(dev, label, TOLERANCE.of(dtype), run)
}

/// Input layouts every element-wise op is checked on: (label, shape of the stored tensor, view).
const LAYOUTS: &[(&str, &[usize], View)] = &[
    ("scalar", &[], |t| Ok(t.clone())),
    ("one", &[1], |t| Ok(t.clone())),
    ("odd", &[7], |t| Ok(t.clone())),
    ("many_blocks_and_tail", &[65_539], |t| Ok(t.clone())),
    ("rows", &[33, 129], |t| Ok(t.clone())),
    ("transposed", &[37, 19], |t| t.t()),
    ("misaligned", &[1001], |t| t.narrow(0, 1, 999)),
    ("narrowed_cols", &[9, 40], |t| t.narrow(1, 3, 31)),
    ("channels_last", &[2, 5, 6, 3], |t| t.permute(&[0, 3, 1, 2])),
    ("broadcast", &[5, 1], |t| t.broadcast_to(&[3, 5, 4])),
];

/// Operand pairs for binary ops: (label, a's stored shape, a's view, b's stored shape, b's view).
type Pair = (&'static str, &'static [usize], View, &'static [usize], View);
const PAIRS: &[Pair] = &[
    ("same_shape", &[1027], |t| Ok(t.clone()), &[1027], |t| Ok(t.clone())),
    ("rows_x_row", &[33, 64], |t| Ok(t.clone()), &[64], |t| Ok(t.clone())),
    ("bias_nchw", &[2, 3, 4, 5], |t| Ok(t.clone()), &[3, 1, 1], |t| Ok(t.clone())),
    ("outer", &[3, 1, 5], |t| Ok(t.clone()), &[4, 1], |t| Ok(t.clone())),
    ("transposed_vs_contiguous", &[7, 6], |t| t.t(), &[6, 7], |t| Ok(t.clone())),
    ("scalar_rhs", &[4, 9], |t| Ok(t.clone()), &[], |t| Ok(t.clone())),
    ("channels_last_both", &[2, 5, 6, 3], |t| t.permute(&[0, 3, 1, 2]), &[2, 5, 6, 3], |t| t.permute(&[0, 3, 1, 2])),
    ("misaligned", &[515], |t| t.narrow(0, 3, 511), &[511], |t| Ok(t.clone())),
];

#[test]
fn copy_and_contiguous() {
    let Some((dev, _gpu)) = gpu("copy_and_contiguous") else { return };
    for dt in ALL {
        for (i, (label, shape, view)) in LAYOUTS.iter().enumerate() {
            check(dev, &format!("copy {dt} {label}"), dt, |d| view(&input(shape, dt, -100.0, 100.0, i as u64, d)?)?.copy());
        }
    }
}

#[test]
fn upload_download_roundtrip_large() {
    let Some((dev, _gpu)) = gpu("upload_download_roundtrip_large") else { return };
    // Above the pinned-staging threshold and not a multiple of the staging chunk.
    let n = 4_500_007;
    let v = values(n, -1.0, 1.0, 7);
    let t = Tensor::from_vec(v.clone(), &[n], dev).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), v);
}

#[test]
fn casts_between_every_dtype_pair() {
    let Some((dev, _gpu)) = gpu("casts_between_every_dtype_pair") else { return };
    for from in ALL {
        for to in ALL {
            for (i, (label, shape, view)) in LAYOUTS.iter().enumerate() {
                // Wide range: exercises saturation into u8 and truncation into i64.
                let (lo, hi) = if from == DType::F16 { (-300.0, 300.0) } else { (-1000.0, 1000.0) };
                check(dev, &format!("cast {from}->{to} {label}"), to, |d| view(&input(shape, from, lo, hi, i as u64 + 11, d)?)?.to_dtype(to));
            }
        }
    }
}

#[test]
fn unary_ops() {
    let Some((dev, _gpu)) = gpu("unary_ops") else { return };
    for &(op, lo, hi) in UNARY {
        for dt in FLOATS {
            for (i, (label, shape, view)) in LAYOUTS.iter().enumerate() {
                check(dev, &format!("{op:?} {dt} {label}"), dt, |d| view(&input(shape, dt, lo, hi, i as u64 + 101, d)?)?.unary(op));
            }
        }
    }
}

const BINARY: &[BinaryOp] = &[BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Pow];

#[test]
fn binary_ops_with_broadcasting() {
    let Some((dev, _gpu)) = gpu("binary_ops_with_broadcasting") else { return };
    for &op in BINARY {
        // Div and Pow stay away from zero / negative bases.
        let (lo, hi) = if matches!(op, BinaryOp::Div | BinaryOp::Pow) { (0.5, 2.5) } else { (-4.0, 4.0) };
        for dt in FLOATS {
            for (i, (label, sa, va, sb, vb)) in PAIRS.iter().enumerate() {
                check(dev, &format!("{op:?} {dt} {label}"), dt, |d| {
                    let a = va(&input(sa, dt, lo, hi, i as u64 + 201, d)?)?;
                    let b = vb(&input(sb, dt, lo, hi, i as u64 + 301, d)?)?;
                    a.binary(&b, op)
                });
            }
        }
    }
}

const CMP: &[CmpOp] = &[CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge];

#[test]
fn comparisons() {
    let Some((dev, _gpu)) = gpu("comparisons") else { return };
    for &op in CMP {
        for dt in ALL {
            for (i, (label, sa, va, sb, vb)) in PAIRS.iter().enumerate() {
                // A small integer range so that Eq/Ne see equal values often.
                check(dev, &format!("{op:?} {dt} {label}"), DType::U8, |d| {
                    let a = va(&input(sa, dt, 0.0, 4.0, i as u64 + 401, d)?)?;
                    let b = vb(&input(sb, dt, 0.0, 4.0, i as u64 + 501, d)?)?;
                    a.cmp(&b, op)
                });
            }
        }
    }
}

#[test]
fn where_cond_selects() {
    let Some((dev, _gpu)) = gpu("where_cond_selects") else { return };
    for dt in ALL {
        for (i, (label, sa, va, sb, vb)) in PAIRS.iter().enumerate() {
            check(dev, &format!("where {dt} {label}"), dt, |d| {
                let t = va(&input(sa, dt, -50.0, 50.0, i as u64 + 601, d)?)?;
                let f = vb(&input(sb, dt, -50.0, 50.0, i as u64 + 701, d)?)?;
                let mask = t.cmp(&f, CmpOp::Gt)?;
                Tensor::where_cond(&mask, &t, &f)
            });
        }
    }
}

#[test]
fn steady_state_loop_allocates_nothing() {
    let Some((dev, _gpu)) = cuda("steady_state_loop_allocates_nothing") else { return };
    let cuda = engine::cuda::device(0).unwrap();
    let x = input(&[64, 257], DType::BF16, -1.0, 1.0, 1, dev).unwrap();
    let step = |x: &Tensor| -> Tensor { x.silu().unwrap().mul(x).unwrap().add(&x.t().unwrap().t().unwrap()).unwrap().to_dtype(DType::F32).unwrap() };
    let _ = step(&x);
    let before = cuda.memory_stats();
    for _ in 0..20 {
        let _ = step(&x);
    }
    let after = cuda.memory_stats();
    eprintln!("allocator: {after:?}");
    assert_eq!(after.alloc_calls, before.alloc_calls, "cuMemAlloc in a steady-state loop");
    assert_eq!(after.in_use, before.in_use, "leaked blocks");
    cuda.empty_cache().unwrap();
    let emptied = cuda.memory_stats();
    assert_eq!(emptied.reserved, emptied.in_use, "empty_cache returns every cached block");
    assert_eq!(emptied.cached_blocks, 0);
}

#[test]
fn device_info_timer_and_bad_ordinal() {
    let Some((dev, _gpu)) = cuda("device_info_timer_and_bad_ordinal") else { return };
    let info = engine::cuda::device_info(0).unwrap();
    eprintln!("{info}");
    assert!(info.total_memory > 0 && info.free_memory <= info.total_memory && info.compute_capability.0 >= 7);
    let cuda = engine::cuda::device(0).unwrap();
    let timer = cuda.start_timer().unwrap();
    let x = input(&[1 << 20], DType::F32, -1.0, 1.0, 3, dev).unwrap();
    let _ = x.exp().unwrap();
    let ms = timer.stop().unwrap();
    assert!(ms >= 0.0 && ms.is_finite());
    let err = Tensor::zeros(&[2], DType::F32, Device::Cuda(999)).unwrap_err();
    assert!(err.to_string().contains("cuda:999"), "{err}");
}

/// Without a GPU, asking for one is an error that says why, never a panic.
#[test]
fn no_device_is_an_error_not_a_panic() {
    cuda_harness::select_device();
    if engine::cuda::is_available() {
        eprintln!("no_device_is_an_error_not_a_panic: a CUDA device is present; checking only the bad-ordinal error");
        assert!(Tensor::zeros(&[2], DType::F32, Device::Cuda(4096)).is_err());
        return;
    }
    let err = Tensor::zeros(&[2], DType::F32, Device::Cuda(0)).unwrap_err().to_string();
    assert!(err.contains("CUDA"), "{err}");
    let err = Tensor::from_vec(vec![1f32, 2.0], &[2], Device::Cuda(0)).unwrap_err().to_string();
    assert!(err.contains("CUDA"), "{err}");
    assert!(engine::cuda::device_info(0).is_err());
}

/// Not a parity check: prints element-wise bandwidth next to device-to-device copy bandwidth
/// measured in the same run (the target is >= 85% of copy for the contiguous kernels).
#[test]
fn elementwise_bandwidth_report() {
    let Some((dev, _gpu)) = cuda_timed("elementwise_bandwidth_report") else { return };
    let cuda = engine::cuda::device(0).unwrap();
    let n = 1usize << 26; // 64 Mi elements: far above L2
    let x = input(&[n], DType::F32, -1.0, 1.0, 1, dev).unwrap();
    let y = input(&[n], DType::F32, -1.0, 1.0, 2, dev).unwrap();
    let xb = x.to_dtype(DType::BF16).unwrap();
    let yb = y.to_dtype(DType::BF16).unwrap();
    let time = |bytes: usize, f: &dyn Fn()| gb_per_s(&cuda, bytes, f);
    let dst = cuda.alloc(n * 4).unwrap();
    let src = engine::cuda::CudaStorage::alloc(&cuda, DType::F32, n).unwrap();
    let copy = time(2 * n * 4, &|| cuda.copy_dtod(dst.ptr(), src.device_ptr(), n * 4).unwrap());
    eprintln!("{}: device-to-device copy {copy:.0} GB/s (read + write)", cuda);
    let rows: [(&str, usize, &dyn Fn()); 6] = [
        ("silu f32", 2 * n * 4, &|| drop(x.silu().unwrap())),
        ("silu bf16", 2 * n * 2, &|| drop(xb.silu().unwrap())),
        ("add f32", 3 * n * 4, &|| drop(x.add(&y).unwrap())),
        ("mul bf16", 3 * n * 2, &|| drop(xb.mul(&yb).unwrap())),
        ("cast f32->bf16", n * 6, &|| drop(x.to_dtype(DType::BF16).unwrap())),
        ("gelu bf16", 2 * n * 2, &|| drop(xb.gelu().unwrap())),
    ];
    for (name, bytes, f) in rows {
        let gbs = time(bytes, f);
        eprintln!("  {name:<16} {gbs:>7.0} GB/s  {:>5.1}% of copy", 100.0 * gbs / copy);
    }
    let strided = time(2 * n * 4, &|| drop(x.reshape(&[8192, 8192]).unwrap().t().unwrap().copy().unwrap()));
    eprintln!("  {:<16} {strided:>7.0} GB/s  {:>5.1}% of copy", "transpose f32", 100.0 * strided / copy);
    eprintln!("allocator: {:?}", cuda.memory_stats());
}
