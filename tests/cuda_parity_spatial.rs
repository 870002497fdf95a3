//! GPU parity of the shape / indexing ops (cat, index_select, gather, embedding, pad, masked_fill,
//! index_add_zeros), the spatial ops and their gradients (pooling, nearest upsampling, affine_grid,
//! grid_sample forward and backward wrt image and grid), the unary-op backward and the fused AdamW
//! step: every op on CUDA against the CPU backend on the same deterministic inputs, over odd sizes,
//! non-contiguous views and every dtype the op takes. Without a CUDA device each test prints
//! "skipped: no CUDA device (...)" and passes.

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

use cuda_harness::{check_tol, gpu, input, values, Tolerances, View, ALL, FLOATS, UNARY};
use engine::{DType, Device, PadMode, Result, Tensor};
use kernels::elementwise::UnaryOp;

/// Data-movement ops are exact whatever the dtype; arithmetic is f32 on both sides (differences
/// of a few ulps can flip a final bf16/f16 rounding).
const TOLERANCE: Tolerances = Tolerances { f32: (1e-5, 1e-5), f16: (2e-3, 2e-3), bf16: (1.5e-2, 1.5e-2) };

fn tolerance(dtype: DType) -> (f32, f32) {
    TOLERANCE.of(dtype)
}

fn check(dev: Device, label: &str, dtype: DType, run: impl Fn(Device) -> Result<Tensor>) {
    check_tol(dev, label, tolerance(dtype), run)
}

/// Bit-exact comparison (data movement, and kernels built to round as the CPU does).
fn check_exact(dev: Device, label: &str, run: impl Fn(Device) -> Result<Tensor>) {
    check_tol(dev, label, (0.0, 0.0), run)
}

fn ids(v: &[i64], shape: &[usize], device: Device) -> Result<Tensor> {
    Tensor::from_slice(v, shape, device)
}

/// 3-D operands: (label, stored shape, view giving a [.., .., ..] tensor).
const VIEWS3: &[(&str, &[usize], View)] = &[
    ("contiguous", &[3, 5, 7], |t| Ok(t.clone())),
    ("transposed", &[3, 7, 5], |t| t.transpose(1, 2)),
    ("narrowed", &[3, 9, 7], |t| t.narrow(1, 2, 5)),
    ("permuted", &[7, 3, 5], |t| t.permute(&[1, 2, 0])),
];

#[test]
fn cat_any_dtype_and_views() {
    let Some((dev, _gpu)) = gpu("cat_any_dtype_and_views") else { return };
    for dt in ALL {
        for dim in [0isize, 1, 2, -1] {
            for (i, (label, shape, view)) in VIEWS3.iter().enumerate() {
                check_exact(dev, &format!("cat {dt} dim {dim} {label}"), |d| {
                    let a = view(&input(shape, dt, -50.0, 50.0, i as u64, d)?)?;
                    // The other inputs: contiguous, and a broadcast view, sized 1 and 4 along dim.
                    let mut s1 = a.shape().to_vec();
                    let k = if dim < 0 { 2 } else { dim as usize };
                    s1[k] = 1;
                    let b = input(&s1, dt, -50.0, 50.0, 90 + i as u64, d)?;
                    let mut s4 = a.shape().to_vec();
                    s4[k] = 4;
                    let mut base = s4.clone();
                    base[(k + 1) % 3] = 1;
                    let c = input(&base, dt, -50.0, 50.0, 95 + i as u64, d)?.broadcast_to(&s4)?;
                    Tensor::cat(&[&a, &b, &c, &a], dim)
                });
            }
        }
        check_exact(dev, &format!("stack {dt}"), |d| {
            let a = input(&[4, 3], dt, -9.0, 9.0, 3, d)?;
            Tensor::stack(&[&a, &a.t()?.t()?, &a], 1)
        });
    }
}

#[test]
fn index_select_gather_embedding() {
    let Some((dev, _gpu)) = gpu("index_select_gather_embedding") else { return };
    for dt in ALL {
        for dim in [0isize, 1, 2] {
            for (i, (label, shape, view)) in VIEWS3.iter().enumerate() {
                check_exact(dev, &format!("index_select {dt} dim {dim} {label}"), |d| {
                    let x = view(&input(shape, dt, -50.0, 50.0, i as u64 + 10, d)?)?;
                    let n = x.shape()[dim as usize] as i64;
                    let idx = ids(&[n - 1, 0, 2, 2, n - 1, 1], &[6], d)?;
                    x.index_select(dim, &idx)
                });
                check_exact(dev, &format!("index_select {dt} dim {dim} {label} strided index"), |d| {
                    let x = view(&input(shape, dt, -50.0, 50.0, i as u64 + 20, d)?)?;
                    // [1, 0, 2, 0] as a stride-2 view.
                    let strided = ids(&[1, 9, 0, 9, 2, 9, 0, 9], &[4, 2], d)?.narrow(1, 0, 1)?.squeeze(1)?;
                    x.index_select(dim, &strided)
                });
                check_exact(dev, &format!("gather {dt} dim {dim} {label}"), |d| {
                    let x = view(&input(shape, dt, -50.0, 50.0, i as u64 + 30, d)?)?;
                    let n = x.shape()[dim as usize];
                    // Smaller than x in every other dimension, odd sizes.
                    let mut s = [2usize, 3, 5];
                    s[dim as usize] = 4;
                    let v: Vec<i64> = values(s.iter().product(), 0.0, n as f32, 7 + i as u64).iter().map(|&f| (f as i64).min(n as i64 - 1)).collect();
                    x.gather(dim, &ids(&v, &s, d)?)
                });
            }
        }
    }
    for dt in FLOATS {
        check_exact(dev, &format!("embedding {dt}"), |d| {
            let table = input(&[11, 6], dt, -1.0, 1.0, 41, d)?;
            table.embedding(&ids(&[3, 10, 0, 3, 7, 1], &[2, 3], d)?)
        });
    }
}

#[test]
fn out_of_range_indices_are_errors() {
    let Some((dev, _gpu)) = gpu("out_of_range_indices_are_errors") else { return };
    let x = input(&[3, 4], DType::F32, -1.0, 1.0, 1, dev).unwrap();
    let e = x.index_select(1, &ids(&[0, 4, 1], &[3], dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("index 4") && e.contains("size 4"), "{e}");
    let e = x.gather(0, &ids(&[0, -1, 0, 0], &[1, 4], dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("index -1") && e.contains("size 3"), "{e}");
    let e = x.embedding(&ids(&[3], &[1], dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("index 3"), "{e}");
    let src = input(&[3, 2], DType::F32, -1.0, 1.0, 2, dev).unwrap();
    let e = Tensor::index_add_zeros(&[5, 2], 0, &ids(&[0, 5, 1], &[3], dev).unwrap(), &src).unwrap_err().to_string();
    assert!(e.contains("index 5") && e.contains("size 5"), "{e}");
    // The device is still usable after a reported bad index.
    check_exact(dev, "index_select after an error", |d| input(&[3, 4], DType::F32, -1.0, 1.0, 1, d)?.index_select(0, &ids(&[2, 0], &[2], d)?));
}

#[test]
fn pad_every_mode() {
    let Some((dev, _gpu)) = gpu("pad_every_mode") else { return };
    let cases: &[(&str, &[usize], PadMode)] = &[
        ("last dim", &[2, 3], PadMode::Constant),
        ("two dims", &[1, 2, 3, 0], PadMode::Constant),
        ("three dims", &[0, 1, 2, 0, 1, 1], PadMode::Constant),
        ("last dim", &[2, 3], PadMode::Reflect),
        ("two dims", &[1, 2, 3, 1], PadMode::Reflect),
        ("last dim", &[3, 1], PadMode::Replicate),
        ("two dims", &[2, 2, 1, 3], PadMode::Replicate),
    ];
    for dt in ALL {
        for &(label, pads, mode) in cases {
            for (i, (vl, shape, view)) in VIEWS3.iter().enumerate() {
                check_exact(dev, &format!("pad {mode:?} {label} {dt} {vl}"), |d| view(&input(shape, dt, 0.0, 100.0, i as u64 + 50, d)?)?.pad(pads, mode, 7.0));
            }
        }
    }
    check_exact(dev, "pad -inf f32", |d| input(&[2, 5], DType::F32, -1.0, 1.0, 3, d)?.pad(&[1, 1, 1, 0], PadMode::Constant, f32::NEG_INFINITY));
}

#[test]
fn masked_fill_broadcast_masks() {
    let Some((dev, _gpu)) = gpu("masked_fill_broadcast_masks") else { return };
    let masks: &[(&str, &[usize])] = &[("full", &[3, 5, 7]), ("row", &[7]), ("column", &[5, 1]), ("scalar", &[])];
    for dt in ALL {
        for (m, mshape) in masks {
            for (i, (vl, shape, view)) in VIEWS3.iter().enumerate() {
                check_exact(dev, &format!("masked_fill {dt} mask {m} {vl}"), |d| {
                    let x = view(&input(shape, dt, 0.0, 100.0, i as u64 + 60, d)?)?;
                    let mask = input(mshape, DType::U8, 0.0, 2.0, i as u64 + 70, d)?;
                    x.masked_fill(&mask, -3.0)
                });
            }
        }
    }
}

#[test]
fn index_add_zeros_sums_repeated_rows() {
    let Some((dev, _gpu)) = gpu("index_add_zeros_sums_repeated_rows") else { return };
    for dt in FLOATS {
        for (dim, shape) in [(0isize, vec![6usize, 5]), (1, vec![3, 4, 33]), (2, vec![2, 3, 9])] {
            check(dev, &format!("index_add_zeros {dt} dim {dim}"), dt, |d| {
                let dd = dim as usize;
                let idx: Vec<i64> = (0..7).map(|j| (j * 5 % shape[dd]) as i64).collect();
                let mut s = shape.clone();
                s[dd] = idx.len();
                let src = input(&s, dt, -1.0, 1.0, 80 + dd as u64, d)?;
                Tensor::index_add_zeros(&shape, dim, &ids(&idx, &[idx.len()], d)?, &src)
            });
        }
        // A transposed source (made contiguous inside).
        check(dev, &format!("index_add_zeros {dt} transposed src"), dt, |d| {
            let src = input(&[9, 4], dt, -1.0, 1.0, 88, d)?.t()?;
            Tensor::index_add_zeros(&[4, 3], 1, &ids(&[2, 0, 2, 1, 1, 0, 2, 2, 0], &[9], d)?, &src)
        });
    }
}

/// NCHW images: (label, stored shape, view giving [N, C, H, W]).
const IMAGES: &[(&str, &[usize], View)] = &[
    ("odd", &[2, 3, 11, 13], |t| Ok(t.clone())),
    ("channels_last", &[2, 9, 7, 3], |t| t.permute(&[0, 3, 1, 2])),
    ("narrowed", &[1, 4, 12, 17], |t| t.narrow(3, 2, 13)?.narrow(2, 1, 10)),
    ("one_pixel_wide", &[3, 2, 6, 1], |t| Ok(t.clone())),
];

#[test]
fn pooling_and_upsampling_forward() {
    let Some((dev, _gpu)) = gpu("pooling_and_upsampling_forward") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view)) in IMAGES.iter().enumerate() {
            let x = |d: Device| view(&input(shape, dt, -4.0, 4.0, i as u64 + 100, d)?);
            let wide = shape[3] > 1;
            if wide {
                check(dev, &format!("avg_pool2d 3x3/2 pad 1 {dt} {label}"), dt, |d| x(d)?.avg_pool2d([3, 3], [2, 2], [1, 1]));
                check(dev, &format!("avg_pool2d 2x3/1 {dt} {label}"), dt, |d| x(d)?.avg_pool2d([2, 3], [1, 2], [0, 1]));
                check(dev, &format!("max_pool2d 3x3/2 ceil {dt} {label}"), dt, |d| x(d)?.max_pool2d([3, 3], [2, 2], [0, 0], true));
                check(dev, &format!("max_pool2d 2x2/2 pad 1 {dt} {label}"), dt, |d| x(d)?.max_pool2d([2, 2], [2, 2], [1, 1], false));
            }
            for out in [[1, 1], [3, 5], [7, 9], [13, 4]] {
                check(dev, &format!("adaptive_avg_pool2d {out:?} {dt} {label}"), dt, |d| x(d)?.adaptive_avg_pool2d(out));
            }
            for (oh, ow) in [(22, 26), (5, 3), (17, 31)] {
                check_exact(dev, &format!("upsample_nearest2d {oh}x{ow} {dt} {label}"), |d| x(d)?.upsample_nearest2d(oh, ow));
            }
        }
    }
    // NaN propagates through max pooling as on the CPU.
    check_exact(dev, "max_pool2d NaN", |d| {
        let mut v = values(2 * 7 * 7, -1.0, 1.0, 5);
        v[10] = f32::NAN;
        Tensor::from_vec(v, &[1, 2, 7, 7], d)?.max_pool2d([3, 3], [2, 2], [1, 1], true)
    });
}

#[test]
fn pooling_and_upsampling_backward() {
    let Some((dev, _gpu)) = gpu("pooling_and_upsampling_backward") else { return };
    for dt in FLOATS {
        for (i, (label, shape, view)) in IMAGES.iter().enumerate() {
            let x = |d: Device| view(&input(shape, dt, -4.0, 4.0, i as u64 + 200, d)?);
            let ishape = { let t = x(Device::Cpu).unwrap(); t.shape().to_vec() };
            let (h, w) = (ishape[2], ishape[3]);
            let dy = |d: Device, oh: usize, ow: usize| input(&[ishape[0], ishape[1], oh, ow], dt, -1.0, 1.0, i as u64 + 300, d);
            if w > 1 {
                let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
                check(dev, &format!("avg_pool2d_backward {dt} {label}"), dt, |d| Tensor::avg_pool2d_backward(&dy(d, oh, ow)?, &ishape, [3, 3], [2, 2], [1, 1]));
                let y = x(Device::Cpu).unwrap().max_pool2d([3, 3], [2, 2], [0, 0], true).unwrap();
                let (mh, mw) = (y.shape()[2], y.shape()[3]);
                check(dev, &format!("max_pool2d_backward ceil {dt} {label}"), dt, |d| Tensor::max_pool2d_backward(&x(d)?, &dy(d, mh, mw)?, [3, 3], [2, 2], [0, 0]));
                let (ph, pw) = (h / 2 + 1, w / 2 + 1);
                check(dev, &format!("max_pool2d_backward pad {dt} {label}"), dt, |d| Tensor::max_pool2d_backward(&x(d)?, &dy(d, ph, pw)?, [2, 2], [2, 2], [1, 1]));
            }
            for out in [[1, 1], [3, 5], [13, 4]] {
                check(dev, &format!("adaptive_avg_pool2d_backward {out:?} {dt} {label}"), dt, |d| Tensor::adaptive_avg_pool2d_backward(&dy(d, out[0], out[1])?, &ishape));
            }
            for (oh, ow) in [(2 * h, 2 * w), (5, 3), (17, 31)] {
                check(dev, &format!("upsample_nearest2d_backward {oh}x{ow} {dt} {label}"), dt, |d| Tensor::upsample_nearest2d_backward(&dy(d, oh, ow)?, &ishape));
            }
            // A non-contiguous dy (made contiguous inside).
            check(dev, &format!("adaptive_avg_pool2d_backward transposed dy {dt} {label}"), dt, |d| {
                let g = input(&[ishape[0], ishape[1], 4, 3], dt, -1.0, 1.0, 9, d)?.transpose(2, 3)?;
                Tensor::adaptive_avg_pool2d_backward(&g, &ishape)
            });
        }
    }
}

/// Sampling grids [N, oh, ow, 2]: an affine grid plus noise, some points outside the image.
fn sample_grid(n: usize, oh: usize, ow: usize, dt: DType, seed: u64, d: Device) -> Result<Tensor> {
    let theta: Vec<f32> = (0..n).flat_map(|b| [0.9 + 0.1 * b as f32, -0.3, 0.1, 0.25, 1.1, -0.05]).collect();
    let theta = Tensor::from_vec(theta, &[n, 2, 3], Device::Cpu)?;
    let base = Tensor::affine_grid(&theta, [n, 1, oh, ow], false)?;
    let noise = Tensor::from_vec(values(n * oh * ow * 2, -0.2, 0.2, seed), &[n, oh, ow, 2], Device::Cpu)?;
    base.binary(&noise, kernels::elementwise::BinaryOp::Add)?.unary(UnaryOp::Affine { mul: 1.15, add: 0.0 })?.to_dtype(dt)?.to_device(d)
}

#[test]
fn affine_grid_and_grid_sample() {
    let Some((dev, _gpu)) = gpu("affine_grid_and_grid_sample") else { return };
    for dt in FLOATS {
        for align in [false, true] {
            for (n, h, w) in [(2, 5, 7), (1, 1, 4), (3, 16, 9)] {
                check(dev, &format!("affine_grid {dt} align {align} {h}x{w}"), dt, |d| {
                    let theta = input(&[n, 2, 3], dt, -1.5, 1.5, 400 + h as u64, d)?;
                    Tensor::affine_grid(&theta, [n, 3, h, w], align)
                });
            }
            for (i, (label, shape, view)) in IMAGES.iter().enumerate() {
                let img = |d: Device| view(&input(shape, dt, -2.0, 2.0, i as u64 + 500, d)?);
                let n = shape[0];
                check(dev, &format!("grid_sample {dt} align {align} {label}"), dt, |d| img(d)?.grid_sample(&sample_grid(n, 6, 5, dt, 7, d)?, align));
                let ishape = img(Device::Cpu).unwrap().shape().to_vec();
                let dy = |d: Device| input(&[n, ishape[1], 6, 5], dt, -1.0, 1.0, 600, d);
                check(dev, &format!("grid_sample_backward dx {dt} align {align} {label}"), dt, |d| Ok(Tensor::grid_sample_backward(&img(d)?, &sample_grid(n, 6, 5, dt, 7, d)?, &dy(d)?, align)?.0));
                // The grid gradient sums over channels in the CPU's order: bf16/f16 inputs only
                // change what is summed, not how, so the dtype tolerance holds; f32 allows a
                // little more for the (x1 - ix) style differences near pixel lines.
                let tol = if dt == DType::F32 { (1e-4, 1e-4) } else { tolerance(dt) };
                check_tol(dev, &format!("grid_sample_backward dgrid {dt} align {align} {label}"), tol, |d| {
                    let g = sample_grid(n, 6, 5, dt, 7, d)?.permute(&[0, 2, 1, 3])?.contiguous()?.permute(&[0, 2, 1, 3])?;
                    Ok(Tensor::grid_sample_backward(&img(d)?, &g, &dy(d)?, align)?.1)
                });
            }
        }
    }
}

#[test]
fn unary_backward_every_op() {
    let Some((dev, _gpu)) = gpu("unary_backward_every_op") else { return };
    let layouts: &[(&str, &[usize], View)] = &[
        ("odd", &[7], |t| Ok(t.clone())),
        ("many_blocks", &[65_539], |t| Ok(t.clone())),
        ("transposed", &[37, 19], |t| t.t()),
        ("misaligned", &[1001], |t| t.narrow(0, 1, 999)),
        ("channels_last", &[2, 5, 6, 3], |t| t.permute(&[0, 3, 1, 2])),
    ];
    for &(op, lo, hi) in UNARY {
        // sqrt' and powf' blow up at 0: start those ranges at 0.1.
        let lo = if lo == 0.0 { 0.1 } else { lo };
        for dt in FLOATS {
            for (i, (label, shape, view)) in layouts.iter().enumerate() {
                check(dev, &format!("{op:?} backward {dt} {label}"), dt, |d| {
                    let x = view(&input(shape, dt, lo, hi, i as u64 + 700, d)?)?;
                    // dy contiguous over x's (viewed) shape.
                    let g = input(x.shape(), dt, -2.0, 2.0, i as u64 + 800, d)?;
                    x.unary_backward(&g, op)
                });
            }
        }
    }
}

#[test]
fn adamw_ten_steps_match_the_cpu() {
    let Some((dev, _gpu)) = gpu("adamw_ten_steps_match_the_cpu") else { return };
    for gdt in FLOATS {
        let n = 10_007;
        let run = |d: Device| -> Result<(Tensor, Tensor, Tensor, Tensor)> {
            let p = input(&[n], DType::F32, -1.0, 1.0, 900, d)?.copy()?;
            let m = Tensor::zeros(&[n], DType::F32, d)?;
            let v = Tensor::zeros(&[n], DType::F32, d)?;
            let low = Tensor::zeros(&[n], DType::BF16, d)?;
            for step in 1..=10u64 {
                // A transposed gradient view for odd steps (made contiguous inside).
                let g = if step % 2 == 1 { input(&[1, n], gdt, -0.5, 0.5, 900 + step, d)?.t()?.reshape(&[n])? } else { input(&[n], gdt, -0.5, 0.5, 900 + step, d)? };
                p.adamw_step_(&g, &m, &v, 1e-2, 0.9, 0.999, 1e-8, 0.01, step)?;
                low.assign_(&p)?;
            }
            Ok((p, m, v, low))
        };
        let (cpu, gpu) = (run(Device::Cpu).expect("cpu"), run(dev).expect("gpu"));
        for (name, c, g) in [("param", &cpu.0, &gpu.0), ("m", &cpu.1, &gpu.1), ("v", &cpu.2, &gpu.2), ("bf16 copy", &cpu.3, &gpu.3)] {
            assert_eq!(g.device(), dev);
            // Same operation order and IEEE rounding: equal to the last bit.
            lookahead::assert_close(&format!("adamw {name} grad {gdt}"), &g.to_device(Device::Cpu).unwrap(), c, 0.0, 0.0);
        }
    }
    // Errors: a non-f32 moment, a non-contiguous parameter.
    let p = Tensor::zeros(&[4], DType::F32, dev).unwrap();
    let g = Tensor::zeros(&[4], DType::F32, dev).unwrap();
    let bad_m = Tensor::zeros(&[4], DType::BF16, dev).unwrap();
    let v = Tensor::zeros(&[4], DType::F32, dev).unwrap();
    assert!(p.adamw_step_(&g, &bad_m, &v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1).is_err());
    let q = Tensor::zeros(&[2, 2], DType::F32, dev).unwrap().t().unwrap();
    let (g2, m2, v2) = (Tensor::zeros(&[2, 2], DType::F32, dev).unwrap(), Tensor::zeros(&[2, 2], DType::F32, dev).unwrap(), Tensor::zeros(&[2, 2], DType::F32, dev).unwrap());
    assert!(q.adamw_step_(&g2, &m2, &v2, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1).is_err());
}
