//! GPU parity of the library-backed ops: matmul / linear (cuBLASLt), conv2d forward and both
//! backward passes (cuDNN), and scaled-dot-product attention in its reference form, each against
//! the CPU backend on the same deterministic inputs: odd sizes, transposed / narrowed / misaligned
//! / broadcast views, channels-last inputs, bf16/f16/f32. Without a CUDA device every test prints
//! "skipped: no CUDA device (...)" and passes. (Harness: tests/common/cuda_harness.rs.)

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

use cuda_harness::{check_tol as check, gpu, Tolerances, View, FLOATS};
use engine::{Conv2dParams, DType, Device, Result, Tensor};

/// GEMM-like results with inputs in [-1, 1]: both sides accumulate in f32 but in different
/// orders, and bf16/f16 results may round one step apart.
const TOLERANCE: Tolerances = Tolerances { f32: (1e-4, 1e-4), f16: (2e-3, 4e-3), bf16: (1e-2, 1e-2) };

fn tolerance(dtype: DType) -> (f32, f32) {
    TOLERANCE.of(dtype)
}

/// A float tensor with values in [-1, 1).
fn input(shape: &[usize], dtype: DType, seed: u64, device: Device) -> Result<Tensor> {
    cuda_harness::input(shape, dtype, -1.0, 1.0, seed, device)
}

#[test]
fn matmul_odd_sizes() {
    let Some((dev, _gpu)) = gpu("matmul_odd_sizes") else { return };
    let sizes = [(1, 1, 1), (1, 3, 17), (3, 17, 1), (17, 127, 3), (127, 255, 17), (255, 1, 127), (3, 1, 255), (255, 255, 255), (17, 17, 127)];
    for dt in FLOATS {
        for (i, &(m, n, k)) in sizes.iter().enumerate() {
            check(dev, &format!("matmul {dt} {m}x{k}·{k}x{n}"), tolerance(dt), |d| input(&[m, k], dt, i as u64, d)?.matmul(&input(&[k, n], dt, 100 + i as u64, d)?));
        }
    }
}

/// Operand views of a [rows, cols] matrix: (label, stored shape from (rows, cols), view).
type MatrixView = (&'static str, fn(usize, usize) -> Vec<usize>, View);
const VIEWS: &[MatrixView] = &[
    ("contiguous", |r, c| vec![r, c], |t| Ok(t.clone())),
    ("transposed", |r, c| vec![c, r], |t| t.t()),
    ("narrowed_cols", |r, c| vec![r, c + 5], |t| t.narrow(1, 2, t.dim(1)? - 5)),
    ("misaligned", |r, c| vec![r * c + 1], |t| t.narrow(0, 1, t.dim(0)? - 1)),
    ("transposed_narrowed", |r, c| vec![c + 3, r], |t| t.narrow(0, 3, t.dim(0)? - 3)?.t()),
    // Both strides > 1: neither row- nor column-major, copied first.
    ("strided_both", |r, c| vec![r, c, 2], |t| t.narrow(2, 1, 1)?.squeeze(2)),
];

#[test]
fn matmul_transposed_and_strided_views() {
    let Some((dev, _gpu)) = gpu("matmul_transposed_and_strided_views") else { return };
    let (m, k, n) = (17, 33, 9);
    for dt in FLOATS {
        for (ia, (la, sa, va)) in VIEWS.iter().enumerate() {
            for (ib, (lb, sb, vb)) in VIEWS.iter().enumerate() {
                check(dev, &format!("matmul {dt} a:{la} b:{lb}"), tolerance(dt), |d| {
                    let mut a = va(&input(&sa(m, k), dt, ia as u64, d)?)?;
                    let mut b = vb(&input(&sb(k, n), dt, 50 + ib as u64, d)?)?;
                    if *la == "misaligned" {
                        a = a.reshape(&[m, k])?;
                    }
                    if *lb == "misaligned" {
                        b = b.reshape(&[k, n])?;
                    }
                    a.matmul(&b)
                });
            }
        }
    }
}

#[test]
fn matmul_batched_and_broadcast() {
    let Some((dev, _gpu)) = gpu("matmul_batched_and_broadcast") else { return };
    type Case = (&'static str, &'static [usize], View, &'static [usize], View);
    let cases: &[Case] = &[
        ("batch_x_matrix_folded", &[4, 7, 19], |t| Ok(t.clone()), &[19, 5], |t| Ok(t.clone())),
        ("batch_x_matrix_transposed_rhs", &[4, 7, 19], |t| Ok(t.clone()), &[5, 19], |t| t.t()),
        ("batch_transposed_x_matrix", &[4, 19, 7], |t| t.transpose(1, 2), &[19, 5], |t| Ok(t.clone())),
        ("both_batched", &[2, 3, 7, 19], |t| Ok(t.clone()), &[2, 3, 19, 5], |t| Ok(t.clone())),
        ("broadcast_inner_batch", &[2, 1, 7, 19], |t| Ok(t.clone()), &[3, 19, 5], |t| Ok(t.clone())),
        ("broadcast_outer_batch", &[1, 3, 7, 19], |t| Ok(t.clone()), &[2, 1, 19, 5], |t| Ok(t.clone())),
        ("heads_permuted", &[2, 7, 3, 19], |t| t.permute(&[0, 2, 1, 3]), &[2, 3, 5, 19], |t| t.transpose(2, 3)),
        ("vector_lhs", &[19], |t| Ok(t.clone()), &[3, 19, 5], |t| Ok(t.clone())),
        ("vector_rhs", &[3, 7, 19], |t| Ok(t.clone()), &[19], |t| Ok(t.clone())),
        ("broadcast_matrix_rows", &[19], |t| t.broadcast_to(&[7, 19]), &[19, 5], |t| Ok(t.clone())),
    ];
    for dt in FLOATS {
        for (i, (label, sa, va, sb, vb)) in cases.iter().enumerate() {
            check(dev, &format!("matmul {dt} {label}"), tolerance(dt), |d| va(&input(sa, dt, i as u64, d)?)?.matmul(&vb(&input(sb, dt, 70 + i as u64, d)?)?));
        }
    }
}

#[test]
fn linear_with_bias() {
    let Some((dev, _gpu)) = gpu("linear_with_bias") else { return };
    for dt in FLOATS {
        check(dev, &format!("linear {dt} contiguous"), tolerance(dt), |d| input(&[2, 5, 33], dt, 1, d)?.linear(&input(&[17, 33], dt, 2, d)?, Some(&input(&[17], dt, 3, d)?)));
        check(dev, &format!("linear {dt} no bias"), tolerance(dt), |d| input(&[2, 5, 33], dt, 1, d)?.linear(&input(&[17, 33], dt, 2, d)?, None));
        check(dev, &format!("linear {dt} transposed input (batched + bias)"), tolerance(dt), |d| input(&[2, 33, 5], dt, 4, d)?.transpose(1, 2)?.linear(&input(&[17, 33], dt, 5, d)?, Some(&input(&[17], dt, 6, d)?)));
        check(dev, &format!("linear {dt} misaligned bias, 1-D input"), tolerance(dt), |d| input(&[33], dt, 7, d)?.linear(&input(&[255, 33], dt, 8, d)?, Some(&input(&[256], dt, 9, d)?.narrow(0, 1, 255)?)));
        check(dev, &format!("linear {dt} one row"), tolerance(dt), |d| input(&[1, 127], dt, 10, d)?.linear(&input(&[3, 127], dt, 11, d)?, Some(&input(&[3], dt, 12, d)?)));
    }
}

/// (label, input shape, weight shape, params, channels-last input).
type ConvCase = (&'static str, [usize; 4], [usize; 4], Conv2dParams, bool);
const CONVS: &[ConvCase] = &[
    ("3x3_pad1", [2, 5, 9, 7], [6, 5, 3, 3], Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 }, false),
    ("stride2_pad", [2, 4, 11, 10], [8, 4, 3, 3], Conv2dParams { stride: [2, 2], padding: [1, 1], dilation: [1, 1], groups: 1 }, false),
    ("groups", [1, 8, 7, 7], [6, 4, 3, 3], Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 2 }, false),
    ("depthwise", [2, 6, 8, 8], [6, 1, 3, 3], Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 6 }, false),
    ("dilation_asym", [1, 3, 12, 9], [5, 3, 3, 2], Conv2dParams { stride: [1, 2], padding: [2, 0], dilation: [2, 1], groups: 1 }, false),
    ("1x1", [3, 16, 5, 6], [8, 16, 1, 1], Conv2dParams { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 }, false),
    ("channels_last_3x3", [2, 16, 9, 9], [32, 16, 3, 3], Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 }, true),
    ("channels_last_stride2_groups", [2, 16, 10, 10], [16, 8, 3, 3], Conv2dParams { stride: [2, 2], padding: [1, 1], dilation: [1, 1], groups: 2 }, true),
    ("channels_last_odd_channels", [1, 3, 7, 7], [5, 3, 3, 3], Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 }, true),
];

/// A conv input: NCHW, or the same logical tensor stored channels-last.
fn conv_input(shape: [usize; 4], channels_last: bool, dt: DType, seed: u64, d: Device) -> Result<Tensor> {
    if channels_last {
        input(&[shape[0], shape[2], shape[3], shape[1]], dt, seed, d)?.permute(&[0, 3, 1, 2])
    } else {
        input(&shape, dt, seed, d)
    }
}

/// Convolutions sum up to C/groups * kh * kw products: a little more room than a GEMM (and
/// cuDNN's FFT/Winograd algorithms round differently).
fn conv_tolerance(dt: DType) -> (f32, f32) {
    match dt {
        DType::F32 => (5e-4, 5e-4),
        _ => tolerance(dt),
    }
}

#[test]
fn conv2d_forward() {
    let Some((dev, _gpu)) = gpu("conv2d_forward") else { return };
    for dt in FLOATS {
        for (i, &(label, xs, ws, p, cl)) in CONVS.iter().enumerate() {
            let seed = 10 * i as u64;
            check(dev, &format!("conv2d {dt} {label} bias"), conv_tolerance(dt), |d| conv_input(xs, cl, dt, seed, d)?.conv2d(&input(&ws, dt, seed + 1, d)?, Some(&input(&[ws[0]], dt, seed + 2, d)?), p));
            check(dev, &format!("conv2d {dt} {label}"), conv_tolerance(dt), |d| conv_input(xs, cl, dt, seed, d)?.conv2d(&input(&ws, dt, seed + 1, d)?, None, p));
        }
    }
}

#[test]
fn conv2d_keeps_channels_last() {
    let Some((dev, _gpu)) = gpu("conv2d_keeps_channels_last") else { return };
    let x = conv_input([2, 16, 9, 9], true, DType::BF16, 1, dev).unwrap();
    let w = input(&[32, 16, 3, 3], DType::BF16, 2, dev).unwrap();
    let y = x.conv2d(&w, None, Conv2dParams::new(1, 1)).unwrap();
    assert_eq!(y.shape(), &[2, 32, 9, 9]);
    if dev != Device::Cpu {
        assert_eq!(y.strides(), &[9 * 9 * 32, 1, 9 * 32, 32], "channels-last in, channels-last out");
    }
}

fn out_shape(xs: [usize; 4], ws: [usize; 4], p: Conv2dParams) -> [usize; 4] {
    let o = |i: usize, k: usize, a: usize| (i + 2 * p.padding[a] - p.dilation[a] * (k - 1) - 1) / p.stride[a] + 1;
    [xs[0], ws[0], o(xs[2], ws[2], 0), o(xs[3], ws[3], 1)]
}

#[test]
fn conv2d_backward_input_and_weight() {
    let Some((dev, _gpu)) = gpu("conv2d_backward_input_and_weight") else { return };
    for dt in FLOATS {
        for (i, &(label, xs, ws, p, cl)) in CONVS.iter().enumerate() {
            let ys = out_shape(xs, ws, p);
            let seed = 10 * i as u64 + 5;
            check(dev, &format!("conv2d_backward_input {dt} {label}"), conv_tolerance(dt), |d| Tensor::conv2d_backward_input(&conv_input(ys, cl, dt, seed, d)?, &input(&ws, dt, seed + 1, d)?, xs, p));
            // The weight gradient sums over N * OH * OW products: looser for 16-bit results.
            let tol = if dt == DType::F32 { (2e-3, 2e-3) } else { conv_tolerance(dt) };
            check(dev, &format!("conv2d_backward_weight {dt} {label}"), tol, |d| Tensor::conv2d_backward_weight(&conv_input(xs, cl, dt, seed + 2, d)?, &conv_input(ys, cl, dt, seed, d)?, ws, p));
        }
    }
}

#[test]
fn sdpa_with_masks() {
    let Some((dev, _gpu)) = gpu("sdpa_with_masks") else { return };
    let (b, h) = (2, 3);
    for dt in FLOATS {
        // Unmasked bf16 / f16 heads of D 64 and 128 run the flash kernel (several key tiles at Lk 131).
        for &(lq, lk, dh) in &[(5, 5, 8), (7, 13, 64), (1, 9, 7), (67, 131, 128)] {
            // [B, L, H, D] storage viewed as [B, H, L, D], as the models produce it.
            let qkv = |d: Device, seed: u64| -> Result<(Tensor, Tensor, Tensor)> {
                Ok((
                    input(&[b, lq, h, dh], dt, seed, d)?.transpose(1, 2)?,
                    input(&[b, lk, h, dh], dt, seed + 1, d)?.transpose(1, 2)?,
                    input(&[b, lk, h, dh], dt, seed + 2, d)?.transpose(1, 2)?,
                ))
            };
            let label = format!("sdpa {dt} Lq {lq} Lk {lk} D {dh}");
            check(dev, &format!("{label} no mask"), tolerance(dt), |d| {
                let (q, k, v) = qkv(d, 1)?;
                Tensor::scaled_dot_product_attention(&q, &k, &v, None, None)
            });
            check(dev, &format!("{label} additive mask with -inf"), tolerance(dt), |d| {
                let (q, k, v) = qkv(d, 2)?;
                let m: Vec<f32> = (0..lq * lk).map(|i| if i % 5 == 2 { f32::NEG_INFINITY } else { (i % 3) as f32 * 0.25 }).collect();
                let mask = Tensor::from_vec(m, &[lq, lk], Device::Cpu)?.to_dtype(dt)?.to_device(d)?;
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), Some(0.3))
            });
            check(dev, &format!("{label} boolean mask with a fully masked row"), tolerance(dt), |d| {
                let (q, k, v) = qkv(d, 3)?;
                // Row 0 of batch 1 attends to nothing: zeros, as PyTorch.
                let m: Vec<u8> = (0..b * lq * lk).map(|i| u8::from(!(i / (lq * lk) == 1 && (i % (lq * lk)) < lk) && i % 4 != 1)).collect();
                let mask = Tensor::from_vec(m, &[b, 1, lq, lk], d)?;
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), None)
            });
        }
    }
}

/// Runs everywhere: asking for cuBLASLt / cuDNN never panics; without them the error names the
/// library and the variable that points at it.
#[test]
fn library_probes_are_errors_not_panics() {
    // The probes are cached: choose the libraries (the emulator's, without a driver) first.
    cuda_harness::select_device();
    for (name, r) in [("cuBLASLt", engine::cuda::gemm::probe_cublaslt()), ("cuDNN", engine::cuda::conv::probe_cudnn())] {
        match r {
            Ok(found) => eprintln!("{name}: {found}"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("{name}: {msg}");
                assert!(msg.contains(name) && msg.contains("LOOKAHEAD_"), "{msg}");
            }
        }
    }
}
