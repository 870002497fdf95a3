//! GPU parity of the reductions, softmax, norms (forward and backward), GEGLU, PReLU and the
//! Philox RNG (kernels/cuda/{reduce,softmax,norm,rng}.cu) against the CPU backend, whose math is
//! the reference (kernels/src/{softmax,norm,norm_backward,rng}.rs, engine/src/ops/reduce.rs), on
//! odd sizes, non-contiguous and channels-last views and every float dtype. Without a CUDA device
//! every test prints "skipped: no CUDA device (...)" and passes. The *_bandwidth_report tests
//! print GB/s next to the device-to-device copy bandwidth of the same run (run with --nocapture).

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

use cuda_harness::{cuda, cuda_timed, gb_per_s, gpu, input, Tolerances, View, FLOATS};
use engine::{DType, Device, Result, Tensor};
use kernels::elementwise::CmpOp;

/// The GPU accumulates statistics in f32 where the CPU uses f64, so f32 results differ by more
/// than a few ulps; bf16/f16 results may flip one rounding step.
const TOLERANCE: Tolerances = Tolerances { f32: (1e-4, 1e-4), f16: (2e-3, 2e-3), bf16: (1.6e-2, 1.6e-2) };

/// (atol, rtol) for results of `dtype`, scaled by `loose`.
fn tolerance(dtype: DType, loose: f32) -> (f32, f32) {
    let (a, r) = TOLERANCE.of(dtype);
    (a * loose, r * loose)
}

fn check_tol(dev: Device, label: &str, dtype: DType, loose: f32, run: impl Fn(Device) -> Result<Tensor>) {
    cuda_harness::check_tol(dev, label, tolerance(dtype, loose), run)
}

/// `run` computed once per device however often the result is asked for (a backward's three
/// outputs are checked one by one; on the CUDA emulator a run is not cheap).
fn once_per_device<T: Clone>(run: impl Fn(Device) -> Result<T>) -> impl Fn(Device) -> Result<T> {
    let done: std::cell::RefCell<Vec<(Device, T)>> = Default::default();
    move |dv| {
        if let Some((_, r)) = done.borrow().iter().find(|(d, _)| *d == dv) {
            return Ok(r.clone());
        }
        let r = run(dv)?;
        done.borrow_mut().push((dv, r.clone()));
        Ok(r)
    }
}

fn check(dev: Device, label: &str, dtype: DType, run: impl Fn(Device) -> Result<Tensor>) {
    check_tol(dev, label, dtype, 1.0, run)
}

/// Row-shaped inputs: (label, stored shape, view). Rows of 1, 3, 1000, 4097 and long rows.
const ROWS: &[(&str, &[usize], View)] = &[
    ("1x1", &[1, 1], |t| Ok(t.clone())),
    ("1x3", &[1, 3], |t| Ok(t.clone())),
    ("3x1000", &[3, 1000], |t| Ok(t.clone())),
    // 16-bit softmax: 64 threads a row, 4 rows a block, the last block part empty.
    ("7x1280", &[7, 1280], |t| Ok(t.clone())),
    ("2x4097", &[2, 4097], |t| Ok(t.clone())),
    ("5x33x7", &[5, 33, 7], |t| Ok(t.clone())),
    ("transposed", &[37, 19], |t| t.t()),
    ("misaligned", &[4, 1001], |t| t.narrow(1, 1, 1000)),
    ("long_rows", &[2, 20_000], |t| Ok(t.clone())),
];

#[test]
fn sum_mean_var() {
    let Some((dev, _gpu)) = gpu("sum_mean_var") else { return };
    let dims: &[&[isize]] = &[&[-1], &[0], &[]];
    for dt in FLOATS {
        for (i, (label, shape, view)) in ROWS.iter().enumerate() {
            for d in dims {
                let x = |dv| view(&input(shape, dt, -1.0, 1.0, i as u64 + 1, dv)?);
                // Long sums: loosen relative to the number of summed elements (f32 vs f64 sums).
                check_tol(dev, &format!("sum {dt} {label} {d:?}"), dt, 4.0, |dv| x(dv)?.sum(d, false));
                check(dev, &format!("mean {dt} {label} {d:?}"), dt, |dv| x(dv)?.mean(d, true));
                check(dev, &format!("var {dt} {label} {d:?}"), dt, |dv| x(dv)?.var(d, false, true));
                check(dev, &format!("var biased {dt} {label} {d:?}"), dt, |dv| x(dv)?.var(d, false, false));
            }
        }
        // Few long rows: split over several blocks per row (sum_finalize).
        check_tol(dev, &format!("sum_all {dt} 2x1e6"), dt, 20.0, |dv| input(&[2, 1_000_000], dt, -1.0, 1.0, 77, dv)?.sum(&[-1], false));
        check_tol(dev, &format!("var {dt} 1x1e6 offset"), dt, 4.0, |dv| input(&[1, 1_000_000], dt, 99.0, 101.0, 78, dv)?.var(&[-1], false, true));
        check(dev, &format!("mean_all {dt} 3x5x7 keep"), dt, |dv| input(&[3, 5, 7], dt, -1.0, 1.0, 79, dv)?.mean(&[0, 2], true));
        check(dev, &format!("sum_all {dt}"), dt, |dv| input(&[3, 5, 7], dt, -1.0, 1.0, 80, dv)?.sum_all());
    }
}

#[test]
fn max_min_argmax() {
    let Some((dev, _gpu)) = gpu("max_min_argmax") else { return };
    for dt in [DType::F32, DType::BF16, DType::F16, DType::I64, DType::U8] {
        for (i, (label, shape, view)) in ROWS.iter().enumerate() {
            // A small integer range gives ties (the first index must win).
            let (lo, hi) = if i % 2 == 0 { (0.0, 8.0) } else { (-100.0, 100.0) };
            for d in [-1isize, 0] {
                let x = |dv| view(&input(shape, dt, lo, hi, i as u64 + 11, dv)?);
                check(dev, &format!("max {dt} {label} {d}"), dt, |dv| x(dv)?.max(d, false));
                check(dev, &format!("min {dt} {label} {d}"), dt, |dv| x(dv)?.min(d, true));
                check(dev, &format!("argmax {dt} {label} {d}"), DType::I64, |dv| x(dv)?.argmax(d, false));
            }
        }
    }
    // NaN wins, the first NaN's index.
    let v = [1.0f32, f32::NAN, 3.0, f32::NAN, 0.5, 9.0];
    for dt in FLOATS {
        let got = Tensor::from_slice(&v, &[2, 3], dev).unwrap().to_dtype(dt).unwrap();
        assert_eq!(got.argmax(-1, false).unwrap().to_vec::<i64>().unwrap(), vec![1, 0], "argmax with NaN {dt}");
        assert!(got.max(-1, false).unwrap().to_vec_f32().unwrap()[0].is_nan());
    }
}

/// Values below -0.8 masked to -inf (partly masked rows), and one fully masked row.
fn masked(x: &Tensor) -> Result<Tensor> {
    let ninf = Tensor::full(f64::NEG_INFINITY, x.shape(), x.dtype(), x.device())?;
    let thr = Tensor::full(-0.8, x.shape(), x.dtype(), x.device())?;
    let mask = x.cmp(&thr, CmpOp::Lt)?;
    Tensor::where_cond(&mask, &ninf, x)
}

#[test]
fn softmax_and_log_softmax() {
    let Some((dev, _gpu)) = gpu("softmax_and_log_softmax") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view)) in ROWS.iter().enumerate() {
            let x = |dv| view(&input(shape, dt, -4.0, 4.0, i as u64 + 21, dv)?);
            check(dev, &format!("softmax {dt} {label}"), dt, |dv| x(dv)?.softmax(-1));
            check(dev, &format!("log_softmax {dt} {label}"), dt, |dv| x(dv)?.log_softmax(-1));
            check(dev, &format!("softmax dim0 {dt} {label}"), dt, |dv| x(dv)?.softmax(0));
            let m = |dv| masked(&view(&input(shape, dt, -1.0, 1.0, i as u64 + 31, dv)?)?);
            check(dev, &format!("softmax masked {dt} {label}"), dt, |dv| m(dv)?.softmax(-1));
            check(dev, &format!("log_softmax masked {dt} {label}"), dt, |dv| m(dv)?.log_softmax(-1));
        }
        // A fully masked row gives NaN on both.
        check(dev, &format!("softmax all -inf {dt}"), dt, |dv| Tensor::full(f64::NEG_INFINITY, &[2, 5], dt, dv)?.softmax(-1));
    }
}

#[test]
fn layer_norm_forward() {
    let Some((dev, _gpu)) = gpu("layer_norm_forward") else { return };
    let shapes: &[(&str, &[usize], View)] = &[
        ("1x3", &[1, 3], |t| Ok(t.clone())),
        ("3x1000", &[3, 1000], |t| Ok(t.clone())),
        // 16-bit packed kernel: 64 threads a row, 4 rows a block, the last block part empty.
        ("7x1280", &[7, 1280], |t| Ok(t.clone())),
        ("2x4097", &[2, 4097], |t| Ok(t.clone())),
        ("transposed", &[64, 33], |t| t.t()),
        ("misaligned", &[4, 1001], |t| t.narrow(1, 1, 1000)),
        ("long_rows", &[3, 9000], |t| Ok(t.clone())),
    ];
    for dt in FLOATS {
        for (i, (label, shape, view)) in shapes.iter().enumerate() {
            let cols = view(&Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()).unwrap().shape()[1];
            let x = |dv| view(&input(shape, dt, 3.0, 5.0, i as u64 + 41, dv)?);
            check(dev, &format!("layer_norm {dt} {label} plain"), dt, |dv| x(dv)?.layer_norm(None, None, 1e-5));
            check(dev, &format!("layer_norm {dt} {label} affine f32 params"), dt, |dv| {
                let w = input(&[cols], DType::F32, 0.5, 1.5, 5, dv)?;
                let b = input(&[cols], DType::F32, -0.5, 0.5, 6, dv)?;
                x(dv)?.layer_norm(Some(&w), Some(&b), 1e-5)
            });
            check(dev, &format!("layer_norm {dt} {label} weight only, own dtype"), dt, |dv| {
                let w = input(&[cols], dt, 0.5, 1.5, 7, dv)?;
                x(dv)?.layer_norm(Some(&w), None, 1e-6)
            });
        }
    }
}

#[test]
fn layer_norm_backward() {
    let Some((dev, _gpu)) = gpu("layer_norm_backward") else { return };
    for dt in FLOATS {
        for (i, shape) in [&[1usize, 3][..], &[3, 1000], &[2, 4097], &[70, 33]].iter().enumerate() {
            let cols = shape[1];
            let run = |dv: Device| {
                let x = input(shape, dt, -2.0, 2.0, i as u64 + 51, dv)?;
                let dy = input(shape, dt, -1.0, 1.0, i as u64 + 61, dv)?;
                let w = input(&[cols], DType::F32, 0.5, 1.5, 8, dv)?;
                let b = input(&[cols], DType::F32, -0.5, 0.5, 9, dv)?;
                x.layer_norm_backward(&dy, Some(&w), Some(&b), 1e-5, true)
            };
            let label = format!("layer_norm_backward {dt} {shape:?}");
            check_tol(dev, &format!("{label} dx"), dt, 2.0, |dv| Ok(run(dv)?.0));
            check_tol(dev, &format!("{label} dweight"), DType::F32, 10.0, |dv| Ok(run(dv)?.1.expect("asked")));
            check_tol(dev, &format!("{label} dbias"), DType::F32, 10.0, |dv| Ok(run(dv)?.2.expect("asked")));
        }
    }
}

/// Group-norm inputs: (label, stored shape, view to [N, C, *], groups).
const GROUPS: &[(&str, &[usize], View, usize)] = &[
    ("3 groups of 6 ch 5x7", &[2, 6, 5, 7], |t| Ok(t.clone()), 3),
    ("1 group", &[1, 4, 3, 3], |t| Ok(t.clone()), 1),
    ("channels_last 2x320x17x19", &[2, 17, 19, 320], |t| t.permute(&[0, 3, 1, 2]), 32),
    ("channels_last odd C", &[2, 5, 6, 3], |t| t.permute(&[0, 3, 1, 2]), 3),
    ("nchw 2x64x32x32", &[2, 64, 32, 32], |t| Ok(t.clone()), 32),
    ("rank 3", &[2, 8, 10], |t| Ok(t.clone()), 4),
    ("transposed spatial", &[2, 6, 7, 5], |t| t.transpose(2, 3), 2),
];

#[test]
fn group_norm_forward() {
    let Some((dev, _gpu)) = gpu("group_norm_forward") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view, groups)) in GROUPS.iter().enumerate() {
            for silu in [false, true] {
                let x = |dv| view(&input(shape, dt, 1.0, 3.0, i as u64 + 71, dv)?);
                let c = view(&Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()).unwrap().shape()[1];
                check(dev, &format!("group_norm {dt} {label} silu={silu} plain"), dt, |dv| x(dv)?.group_norm(*groups, None, None, 1e-5, silu));
                check(dev, &format!("group_norm {dt} {label} silu={silu} affine"), dt, |dv| {
                    let w = input(&[c], DType::F32, 0.5, 1.5, 10, dv)?;
                    let b = input(&[c], DType::F32, -0.5, 0.5, 11, dv)?;
                    x(dv)?.group_norm(*groups, Some(&w), Some(&b), 1e-5, silu)
                });
                if silu {
                    check_stats(dev, &format!("group_norm {dt} {label}"), *groups, &x);
                }
            }
        }
    }
}

/// group_norm_stats on `dev` against the CPU: the statistics (f32 [N, G, 2] (mean, rstd); the
/// GPU sums in f32, the CPU in f64) and, on `dev`, the same y as group_norm, bit for bit.
fn check_stats(dev: Device, label: &str, groups: usize, x: &dyn Fn(Device) -> Result<Tensor>) {
    check_tol(dev, &format!("{label} saved statistics"), DType::F32, 2.0, |dv| {
        let (y, stats) = x(dv)?.group_norm_stats(groups, None, None, 1e-5, true)?;
        assert_eq!(stats.dtype(), DType::F32, "{label}: statistics dtype");
        assert_eq!(stats.device(), dv, "{label}: statistics device");
        let plain = x(dv)?.group_norm(groups, None, None, 1e-5, true)?;
        let bits = |t: &Tensor| t.to_dtype(DType::F32).and_then(|t| t.to_vec::<f32>()).map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
        assert_eq!(bits(&y)?, bits(&plain)?, "{label} on {dv:?}: group_norm_stats' y differs from group_norm's");
        Ok(stats)
    });
}

/// Forward-only group-norm inputs sized for the single-launch cluster kernel on sm_90+
/// (kernels/cuda/group_norm.cu): NCHW with HW a multiple of the 16-byte pack, clusters of 8 and
/// 16 CTAs, 2 to 16 packs a thread, partly filled last packs; and shapes that fall back to the
/// two-phase kernels (HW not a multiple of the pack, a group too large for 16 CTAs in f32,
/// channels-last, a misaligned view). Each case prints the path it took.
const GROUPS_CLUSTER: &[(&str, &[usize], View, usize)] = &[
    ("cluster 2x24x40x40 g3", &[2, 24, 40, 40], |t| Ok(t.clone()), 3),
    ("cluster 2x40x48x48 g4", &[2, 40, 48, 48], |t| Ok(t.clone()), 4),
    ("cluster 1x16x128x120 g1 (16 packs)", &[1, 16, 128, 120], |t| Ok(t.clone()), 1),
    ("cluster 1x32x128x136 g2 (16 CTAs; f32 falls back)", &[1, 32, 128, 136], |t| Ok(t.clone()), 2),
    ("cluster 3x64x8x8 g32 rank 4", &[3, 64, 8, 8], |t| Ok(t.clone()), 32),
    ("cluster rank 3 2x12x1000", &[2, 12, 1000], |t| Ok(t.clone()), 6),
    ("fallback HW 9x9", &[2, 32, 9, 9], |t| Ok(t.clone()), 8),
    ("fallback misaligned view", &[2, 16, 8, 9], |t| t.narrow(3, 1, 8), 4),
    ("fallback channels_last 2x40x16x16", &[2, 16, 16, 40], |t| t.permute(&[0, 3, 1, 2]), 4),
];

#[test]
fn group_norm_forward_cluster() {
    let Some((dev, _gpu)) = cuda("group_norm_forward_cluster") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view, groups)) in GROUPS_CLUSTER.iter().enumerate() {
            let x = |dv| view(&input(shape, dt, -2.0, 3.0, i as u64 + 171, dv)?);
            let path = engine::cuda::group_norm_forward_path(&x(dev).unwrap(), *groups).unwrap();
            eprintln!("group_norm {dt} {label}: {path}");
            let c = view(&Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()).unwrap().shape()[1];
            for silu in [false, true] {
                check(dev, &format!("group_norm {dt} {label} silu={silu} plain"), dt, |dv| x(dv)?.group_norm(*groups, None, None, 1e-5, silu));
                check(dev, &format!("group_norm {dt} {label} silu={silu} weight only"), dt, |dv| {
                    let w = input(&[c], DType::F32, -1.5, 1.5, 12, dv)?;
                    x(dv)?.group_norm(*groups, Some(&w), None, 1e-5, silu)
                });
                check(dev, &format!("group_norm {dt} {label} silu={silu} affine"), dt, |dv| {
                    let w = input(&[c], DType::F32, 0.5, 1.5, 10, dv)?;
                    let b = input(&[c], DType::F32, -0.5, 0.5, 11, dv)?;
                    x(dv)?.group_norm(*groups, Some(&w), Some(&b), 1e-5, silu)
                });
            }
            check_stats(dev, &format!("group_norm {dt} {label}"), *groups, &x);
        }
        // Large offset: the shifted first pass and the second pass keep the variance of values near 100.
        let x = |dv| input(&[2, 16, 32, 32], dt, 99.0, 101.0, 991, dv);
        check(dev, &format!("group_norm {dt} offset 100 2x16x32x32 g4"), dt, |dv| x(dv)?.group_norm(4, None, None, 1e-5, false));
    }
}

/// The backward of GROUPS_CLUSTER's inputs: with the experimental switch on (from
/// experimental_kernels_match_cpu), the NCHW cases run the single-launch cluster backward on
/// sm_90+ (gn_cluster_bwd_DT_pP: dx, and dw / db by atomic adds), the others the five-pass path.
#[test]
fn group_norm_backward_cluster() {
    let Some((dev, _gpu)) = gpu("group_norm_backward_cluster") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view, groups)) in GROUPS_CLUSTER.iter().enumerate() {
            let x = |dv| view(&input(shape, dt, -2.0, 3.0, i as u64 + 271, dv)?);
            if dev != Device::Cpu {
                eprintln!("group_norm_backward {dt} {label}: forward path {}", engine::cuda::group_norm_forward_path(&x(dev).unwrap(), *groups).unwrap());
            }
            for silu in [false, true] {
                for (affine, saved) in [(false, false), (true, false), (false, true), (true, true)] {
                    let run = |dv: Device| {
                        let x = x(dv)?;
                        let c = x.shape()[1];
                        let dy = input(x.shape(), dt, -1.0, 1.0, i as u64 + 291, dv)?;
                        let w = input(&[c], DType::F32, -1.5, 1.5, 14, dv)?;
                        let b = input(&[c], DType::F32, -0.5, 0.5, 15, dv)?;
                        let (w, b) = if affine { (Some(&w), Some(&b)) } else { (None, None) };
                        // The forward's statistics on the same device (the cluster, grid or
                        // two-phase forward's), as the autograd op passes them.
                        let stats = if saved { Some(x.group_norm_stats(*groups, w, b, 1e-5, silu)?.1) } else { None };
                        x.group_norm_backward(&dy, *groups, w, b, 1e-5, silu, stats.as_ref(), true)
                    };
                    let label = format!("group_norm_backward {dt} {label} silu={silu} affine={affine} saved stats={saved}");
                    let run = once_per_device(run);
                    check_tol(dev, &format!("{label} dx"), dt, 2.0, |dv| Ok(run(dv)?.0));
                    check_tol(dev, &format!("{label} dweight"), DType::F32, 20.0, |dv| Ok(run(dv)?.1.expect("asked")));
                    check_tol(dev, &format!("{label} dbias"), DType::F32, 20.0, |dv| Ok(run(dv)?.2.expect("asked")));
                }
            }
        }
    }
}

#[test]
fn group_norm_backward() {
    let Some((dev, _gpu)) = gpu("group_norm_backward") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view, groups)) in GROUPS.iter().enumerate() {
            for (silu, saved) in [(false, false), (true, false), (false, true), (true, true)] {
                let run = |dv: Device| {
                    let x = view(&input(shape, dt, -2.0, 2.0, i as u64 + 81, dv)?)?;
                    let c = x.shape()[1];
                    let dy = input(x.shape(), dt, -1.0, 1.0, i as u64 + 91, dv)?;
                    let w = input(&[c], DType::F32, 0.5, 1.5, 12, dv)?;
                    let b = input(&[c], DType::F32, -0.5, 0.5, 13, dv)?;
                    let stats = if saved { Some(x.group_norm_stats(*groups, Some(&w), Some(&b), 1e-5, silu)?.1) } else { None };
                    x.group_norm_backward(&dy, *groups, Some(&w), Some(&b), 1e-5, silu, stats.as_ref(), true)
                };
                let label = format!("group_norm_backward {dt} {label} silu={silu} saved stats={saved}");
                let run = once_per_device(run);
                check_tol(dev, &format!("{label} dx"), dt, 2.0, |dv| Ok(run(dv)?.0));
                check_tol(dev, &format!("{label} dweight"), DType::F32, 20.0, |dv| Ok(run(dv)?.1.expect("asked")));
                check_tol(dev, &format!("{label} dbias"), DType::F32, 20.0, |dv| Ok(run(dv)?.2.expect("asked")));
            }
        }
    }
}

#[test]
fn batch_norm_geglu_prelu() {
    let Some((dev, _gpu)) = gpu("batch_norm_geglu_prelu") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view, _)) in GROUPS.iter().enumerate() {
            check(dev, &format!("batch_norm {dt} {label}"), dt, |dv| {
                let x = view(&input(shape, dt, -2.0, 2.0, i as u64 + 101, dv)?)?;
                let c = x.shape()[1];
                let m = input(&[c], DType::F32, -0.5, 0.5, 14, dv)?;
                let v = input(&[c], DType::F32, 0.5, 2.0, 15, dv)?;
                let w = input(&[c], dt, 0.5, 1.5, 16, dv)?;
                let b = input(&[c], DType::F32, -0.5, 0.5, 17, dv)?;
                x.batch_norm(&m, &v, Some(&w), Some(&b), 1e-5)
            });
            check(dev, &format!("prelu per channel {dt} {label}"), dt, |dv| {
                let x = view(&input(shape, dt, -2.0, 2.0, i as u64 + 111, dv)?)?;
                let w = input(&[x.shape()[1]], DType::F32, 0.0, 0.5, 18, dv)?;
                x.prelu(&w)
            });
            check(dev, &format!("prelu shared {dt} {label}"), dt, |dv| {
                let x = view(&input(shape, dt, -2.0, 2.0, i as u64 + 121, dv)?)?;
                x.prelu(&Tensor::from_slice(&[0.25f32], &[1], dv)?)
            });
        }
        for (i, shape) in [&[1usize, 6][..], &[3, 2000], &[2, 5, 4098], &[7, 2]].iter().enumerate() {
            check(dev, &format!("geglu {dt} {shape:?}"), dt, |dv| input(shape, dt, -3.0, 3.0, i as u64 + 131, dv)?.geglu());
        }
        check(dev, &format!("geglu transposed {dt}"), dt, |dv| input(&[6, 9], dt, -3.0, 3.0, 141, dv)?.t()?.geglu());
        check(dev, &format!("prelu rank 2 {dt}"), dt, |dv| {
            let x = input(&[4, 3], dt, -2.0, 2.0, 142, dv)?;
            x.prelu(&Tensor::from_slice(&[0.1f32, 0.2, 0.3], &[3], dv)?)
        });
    }
}

/// Bits of the values as integers of the dtype's width (to count ulps).
fn bits(t: &Tensor) -> Vec<i64> {
    let t = t.to_device(Device::Cpu).unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits() as i32 as i64).collect(),
        DType::BF16 => t.to_vec::<half::bf16>().unwrap().iter().map(|v| v.to_bits() as i16 as i64).collect(),
        DType::F16 => t.to_vec::<half::f16>().unwrap().iter().map(|v| v.to_bits() as i16 as i64).collect(),
        _ => unreachable!(),
    }
}

/// Uniforms are exact (an integer times 2^-24); normals go through f64 log/sin/cos, where CUDA's
/// double-precision functions (within 1-2 ulp of f64) and the CPU's libm may differ in the last
/// f64 bit; rounded to f32 that shows only when a value lies within ~1e-16 relative of an f32
/// rounding tie, so at most 1 ulp and very rarely. The test allows 1 ulp in at most 1e-5 of them.
#[test]
fn philox_rand_randn_match_cpu() {
    let Some((dev, _gpu)) = gpu("philox_rand_randn_match_cpu") else { return };
    for dt in FLOATS {
        for n in [0usize, 1, 3, 4, 5, 1_000_003] {
            for seed in [0u64, 42, 0x1234_5678_9abc_def0] {
                let u_cpu = Tensor::rand(&[n], dt, Device::Cpu, seed).unwrap();
                let u_gpu = Tensor::rand(&[n], dt, dev, seed).unwrap();
                assert_eq!(u_gpu.device(), dev);
                assert_eq!(bits(&u_gpu), bits(&u_cpu), "rand {dt} n={n} seed={seed}: not bit-identical");
                let g_cpu = bits(&Tensor::randn(&[n], dt, Device::Cpu, seed).unwrap());
                let g_gpu = bits(&Tensor::randn(&[n], dt, dev, seed).unwrap());
                let mut off_by_one = 0;
                for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
                    let d = (a - b).abs();
                    assert!(d <= 1, "randn {dt} n={n} seed={seed}: element {i} differs by {d} ulps");
                    off_by_one += (d == 1) as usize;
                }
                if off_by_one > 0 {
                    eprintln!("randn {dt} n={n} seed={seed}: {off_by_one} of {n} values differ by 1 ulp");
                }
                assert!(off_by_one as f64 <= 1e-5 * n as f64 + 1.0, "randn {dt}: {off_by_one} values off by 1 ulp");
            }
        }
    }
}

/// The group-norm variants (engine/src/cuda/norm.rs, GnVariant).
const GN_VARIANTS: [&str; 6] = ["auto", "two-phase", "cluster-regs", "cluster-smem", "cluster-smem-async", "grid"];

/// The parity cases of the kernels behind `engine::cuda::experimental_kernels` (16-bit packed
/// softmax / layer norm rows, cluster group norm), which the other tests run with the switch off.
#[test]
fn experimental_kernels_match_cpu() {
    cuda_harness::select_device();
    if !engine::cuda::is_available() {
        lookahead::show("experimental_kernels_match_cpu: skipped: no CUDA device");
        return;
    }
    engine::cuda::set_experimental_kernels(true);
    let result = std::panic::catch_unwind(|| {
        softmax_and_log_softmax();
        layer_norm_forward();
        // Every group-norm path (LOOKAHEAD_VARIANT_GROUP_NORM, engine/src/cuda/norm.rs): the
        // default per-shape rule, then each path forced wherever it applies. Other tests of this
        // binary may read the variable meanwhile; every variant is a correct group norm, so a
        // race only changes which kernel they check.
        for variant in GN_VARIANTS {
            std::env::set_var("LOOKAHEAD_VARIANT_GROUP_NORM", variant);
            eprintln!("LOOKAHEAD_VARIANT_GROUP_NORM={variant}");
            group_norm_forward();
            group_norm_forward_cluster();
            group_norm_backward_cluster();
        }
        std::env::remove_var("LOOKAHEAD_VARIANT_GROUP_NORM");
    });
    std::env::remove_var("LOOKAHEAD_VARIANT_GROUP_NORM");
    engine::cuda::set_experimental_kernels(false);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Not a parity check: softmax, layer norm and group norm (+SiLU) GB/s (one read + one write of
/// the tensor) next to the device-to-device copy bandwidth of the same run; the targets are
/// >= 80% of copy (issue #3).
#[test]
fn norm_bandwidth_report() {
    let Some((dev, _gpu)) = cuda_timed("norm_bandwidth_report") else { return };
    let cuda = engine::cuda::device(0).unwrap();
    let time = |bytes: usize, f: &dyn Fn()| gb_per_s(&cuda, bytes, f);
    let n = 1usize << 28; // 512 MiB of bf16: far above L2
    let dst = cuda.alloc(n * 2).unwrap();
    let src = engine::cuda::CudaStorage::alloc(&cuda, DType::BF16, n).unwrap();
    let copy = time(2 * n * 2, &|| cuda.copy_dtod(dst.ptr(), src.device_ptr(), n * 2).unwrap());
    eprintln!("{cuda}: device-to-device copy {copy:.0} GB/s (read + write)");
    drop((dst, src));
    let report = |name: &str, x: &Tensor, f: &dyn Fn()| {
        let bytes = 2 * x.elem_count() * x.dtype().size_in_bytes();
        let gbs = time(bytes, f);
        eprintln!("  {name:<44} {gbs:>7.0} GB/s  {:>5.1}% of copy", 100.0 * gbs / copy);
    };
    // GEGLU of SDXL's 32x32 transformer feed-forward (2 x 1024 tokens, inner 5120): reads the
    // [value | gate] rows, writes half as much.
    let x = Tensor::randn(&[2048, 2 * 5120], DType::BF16, dev, 8).unwrap();
    let gbs = time(3 * x.elem_count(), &|| drop(x.geglu().unwrap()));
    eprintln!("  {:<44} {gbs:>7.0} GB/s  {:>5.1}% of copy", "geglu bf16 2048x(2x5120)", 100.0 * gbs / copy);
    drop(x);
    // The verified kernels first, then the experimental ones (engine::cuda::experimental_kernels).
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        eprintln!("experimental kernels {}:", if experimental { "ON" } else { "off" });
        let x = Tensor::randn(&[81920, 4096], DType::BF16, dev, 1).unwrap();
        report("softmax bf16 81920x4096", &x, &|| drop(x.softmax(-1).unwrap()));
        report("log_softmax bf16 81920x4096", &x, &|| drop(x.log_softmax(-1).unwrap()));
        let w = Tensor::ones(&[4096], DType::F32, dev).unwrap();
        let b = Tensor::zeros(&[4096], DType::F32, dev).unwrap();
        report("layer_norm bf16 81920x4096 (affine)", &x, &|| drop(x.layer_norm(Some(&w), Some(&b), 1e-5).unwrap()));
        drop(x);
        let x = Tensor::randn(&[4 * 4096, 1280], DType::BF16, dev, 2).unwrap();
        let w = Tensor::ones(&[1280], DType::F32, dev).unwrap();
        report("layer_norm bf16 16384x1280 (affine)", &x, &|| drop(x.layer_norm(Some(&w), Some(&w), 1e-5).unwrap()));
        let x = Tensor::randn(&[8192, 4096], DType::F32, dev, 3).unwrap();
        report("softmax f32 8192x4096", &x, &|| drop(x.softmax(-1).unwrap()));
        for (shape, groups) in [([2usize, 320, 128, 128], 32usize), ([2, 640, 64, 64], 32), ([2, 1280, 32, 32], 32), ([1, 320, 128, 128], 32)] {
            let x = Tensor::randn(&shape, DType::BF16, dev, 4).unwrap();
            let w = Tensor::ones(&[shape[1]], DType::F32, dev).unwrap();
            eprintln!("    path: {}", engine::cuda::group_norm_forward_path(&x, groups).unwrap());
            report(&format!("group_norm+silu bf16 {shape:?} NCHW"), &x, &|| drop(x.group_norm(groups, Some(&w), Some(&w), 1e-5, true).unwrap()));
            let cl = Tensor::randn(&[shape[0], shape[2], shape[3], shape[1]], DType::BF16, dev, 5).unwrap().permute(&[0, 3, 1, 2]).unwrap();
            eprintln!("    path: {}", engine::cuda::group_norm_forward_path(&cl, groups).unwrap());
            report(&format!("group_norm+silu bf16 {shape:?} channels-last"), &cl, &|| drop(cl.group_norm(groups, Some(&w), Some(&w), 1e-5, true).unwrap()));
            let dy = Tensor::randn(cl.shape(), DType::BF16, dev, 6).unwrap().permute(&[0, 2, 3, 1]).unwrap().contiguous().unwrap().permute(&[0, 3, 1, 2]).unwrap();
            // Backward (with the forward's saved statistics, as training runs it) reads x and dy
            // twice-ish and writes dx: reported against 2 tensor passes too.
            let (_, cl_stats) = cl.group_norm_stats(groups, Some(&w), Some(&w), 1e-5, true).unwrap();
            report(&format!("group_norm+silu backward bf16 {shape:?} ch-last"), &cl, &|| drop(cl.group_norm_backward(&dy, groups, Some(&w), Some(&w), 1e-5, true, Some(&cl_stats), true).unwrap()));
            // NCHW backward (the cluster kernel with the switch on): x and dy read, dx written.
            let dyn_ = Tensor::randn(&shape, DType::BF16, dev, 7).unwrap();
            let (_, x_stats) = x.group_norm_stats(groups, Some(&w), Some(&w), 1e-5, true).unwrap();
            let gbs = time(3 * x.elem_count() * 2, &|| drop(x.group_norm_backward(&dyn_, groups, Some(&w), Some(&w), 1e-5, true, Some(&x_stats), true).unwrap()));
            eprintln!("  {:<44} {gbs:>7.0} GB/s  {:>5.1}% of copy (3 passes)", format!("group_norm+silu backward bf16 {shape:?} NCHW"), 100.0 * gbs / copy);
        }
    }
    engine::cuda::set_experimental_kernels(false);
    eprintln!("allocator: {:?}", cuda.memory_stats());
}
