//! GPU parity of flash extended attention, forward (`Tensor::flash_attention`): the CUDA result
//! (fused kernel kernels/cuda/flash_attention.cu for bf16/f16 with D 64/128, else the composition
//! of CUDA ops) against the CPU backend (kernels::flash_attention's math), and the fused kernel
//! against the unfused CUDA composition on the same device. Odd sizes (Lq 77, Lk 45, Lr 70: partial
//! query blocks and key tiles), keep masks per batch and shared, interleaved-head and misaligned
//! views, rows with no key left. The fused kernel sits behind engine::cuda::experimental_kernels
//! until it has run on a GPU: every case runs with the switch off and on. The decoupled mode
//! (`Tensor::flash_attention_decoupled`, IP cross-attention: text + s2 x IP with independent
//! softmaxes) the same way, and its gradients (`Var::flash_attention_decoupled`) against the CPU.
//! The Hopper (wgmma) kernel, behind engine::cuda::hopper_kernels, runs the same cases on a
//! compute capability 9.0 device (`hopper_kernel_matches_cpu`), with each D 64 variant of
//! LOOKAHEAD_VARIANT_FLASH_FWD (the warp-specialized ws* of kernels/cuda/flash_attention_ws.cu
//! included: "long rows" has 16 key tiles, so their rings of stages wrap several times).
//! Without a CUDA device every test prints "skipped: no CUDA device (...)" and passes.

#[path = "common/cuda_harness.rs"]
mod cuda_harness;
#[path = "common/attention_cases.rs"]
mod attention_cases;

use attention_cases::{Case, Operands, CASES, NO_KEY_LEFT};
use cuda_harness::{cuda, gpu, hopper_device, input, KernelSwitches, Tolerances, FLOATS};
use engine::ops::flash_attention::AttentionReference;
use engine::{DType, Device, Result, Tensor};

/// Outputs: the fused kernel rounds P to the input type before P V (the CPU keeps f32), and the
/// output is rounded once more. lse is f32 on both sides (f32 products summed in another order).
const OUT_TOLERANCE: Tolerances = Tolerances { f32: (1e-4, 1e-4), f16: (2e-3, 2e-3), bf16: (1.6e-2, 1.6e-2) };
const LSE_TOLERANCE: (f32, f32) = (2e-4, 2e-4);

/// (out, lse) of the case on `dev`.
fn run(c: &Case, d: usize, dt: DType, dev: Device) -> Result<(Tensor, Tensor)> {
    let x = Operands::new(c, d, dt, dev)?;
    Tensor::flash_attention(&x.q, &x.k, &x.v, x.reference(), 1.0 / (d as f32).sqrt())
}

fn compare(label: &str, dt: DType, got: &(Tensor, Tensor), want: &(Tensor, Tensor)) {
    assert_eq!((got.0.dtype(), got.1.dtype()), (want.0.dtype(), DType::F32), "{label}: dtypes");
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
    let (a, r) = OUT_TOLERANCE.of(dt);
    lookahead::assert_close(&format!("{label}: out"), &cpu(&got.0), &cpu(&want.0), a, r);
    lookahead::assert_close(&format!("{label}: lse"), &cpu(&got.1), &cpu(&want.1), LSE_TOLERANCE.0, LSE_TOLERANCE.1);
}

#[test]
fn flash_attention_matches_cpu() {
    let Some((dev, _gpu)) = gpu("flash_attention_matches_cpu") else { return };
    // The verified path first, then the experimental fused kernel.
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        for dt in FLOATS {
            // 64 and 128 take the fused kernel (16-bit types), 40 the composition.
            for d in [64, 128, 40] {
                for c in CASES {
                    let label = format!("flash_attention {dt} D {d} {} (experimental {experimental})", c.label);
                    let want = run(c, d, dt, Device::Cpu).unwrap_or_else(|e| panic!("{label} on cpu: {e}"));
                    let got = run(c, d, dt, dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
                    assert_eq!(got.0.device(), dev, "{label}: result left the device");
                    compare(&label, dt, &got, &want);
                }
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

#[test]
fn fused_kernel_matches_the_unfused_composition() {
    let Some((dev, _gpu)) = cuda("fused_kernel_matches_the_unfused_composition") else { return };
    for dt in [DType::BF16, DType::F16] {
        for d in [64, 128] {
            for c in CASES {
                let label = format!("fused vs composition {dt} D {d} {}", c.label);
                engine::cuda::set_experimental_kernels(false);
                let unfused = run(c, d, dt, dev).unwrap_or_else(|e| panic!("{label}, composition: {e}"));
                engine::cuda::set_experimental_kernels(true);
                let fused = run(c, d, dt, dev).unwrap_or_else(|e| panic!("{label}, fused: {e}"));
                compare(&label, dt, &fused, &unfused);
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

/// No own keys, and in batch entry 0 every reference token dropped: out 0 and lse -inf there;
/// batch entry 1 keeps two tokens.
#[test]
fn rows_with_no_key_left() {
    let Some((dev, _gpu)) = gpu("rows_with_no_key_left") else { return };
    let Case { h, lq, .. } = NO_KEY_LEFT;
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for d in [64, 128] {
                let label = format!("no key left {dt} D {d} (experimental {experimental})");
                let go = |dv: Device| -> Result<(Tensor, Tensor)> {
                    let x = Operands::no_key_left(d, dt, dv)?;
                    Tensor::flash_attention(&x.q, &x.k, &x.v, x.reference(), 0.125)
                };
                let (want, got) = (go(Device::Cpu).unwrap(), go(dev).unwrap_or_else(|e| panic!("{label}: {e}")));
                compare(&label, dt, &got, &want);
                let (out, lse) = (got.0.to_vec_f32().unwrap(), got.1.to_vec_f32().unwrap());
                assert!(out[..h * lq * d].iter().all(|&x| x == 0.0), "{label}: out of the rows with no key");
                assert!(lse[..h * lq].iter().all(|&x| x == f32::NEG_INFINITY), "{label}: lse of the rows with no key");
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

/// The Hopper (wgmma) forward kernel (kernels/cuda/flash_attention_hopper.cu), behind
/// engine::cuda::hopper_kernels: on a compute capability 9.0 device, every case and the rows with no
/// key left against the CPU, with the Hopper (and experimental) switches on. Other devices print
/// why they skip.
#[test]
fn hopper_kernel_matches_cpu() {
    let Some((dev, _gpu)) = gpu("hopper_kernel_matches_cpu") else { return };
    if !hopper_device(dev, "hopper_kernel_matches_cpu") {
        return;
    }
    let _switches = KernelSwitches::set(true, true);
    // The default instance, then every D 64 variant (LOOKAHEAD_VARIANT_FLASH_FWD, read at each
    // launch; restored afterwards).
    let variant_env = "LOOKAHEAD_VARIANT_FLASH_FWD";
    let old_variant = std::env::var(variant_env).ok();
    let variants = std::iter::once("").chain(kernels::flash_attention::HOPPER_D64_VARIANTS.iter().copied());
    for (variant, dt, d) in variants.flat_map(|v| [DType::BF16, DType::F16].into_iter().flat_map(move |dt| [64, 128].map(|d| (v, dt, d))).filter(|&(v, _, d)| v.is_empty() || d == 64)) {
        std::env::set_var(variant_env, variant);
        {
            for c in CASES {
                let label = format!("flash_attention {dt} D {d} {} (Hopper kernel {})", c.label, if variant.is_empty() { "default" } else { variant });
                let want = run(c, d, dt, Device::Cpu).unwrap_or_else(|e| panic!("{label} on cpu: {e}"));
                let got = run(c, d, dt, dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
                assert_eq!(got.0.device(), dev, "{label}: result left the device");
                compare(&label, dt, &got, &want);
            }
            let label = format!("no key left {dt} D {d} (Hopper kernel {})", if variant.is_empty() { "default" } else { variant });
            let go = |dv: Device| -> Result<(Tensor, Tensor)> {
                let x = Operands::no_key_left(d, dt, dv)?;
                Tensor::flash_attention(&x.q, &x.k, &x.v, x.reference(), 0.125)
            };
            let (want, got) = (go(Device::Cpu).unwrap(), go(dev).unwrap_or_else(|e| panic!("{label}: {e}")));
            compare(&label, dt, &got, &want);
            let Case { h, lq, .. } = NO_KEY_LEFT;
            let (out, lse) = (got.0.to_vec_f32().unwrap(), got.1.to_vec_f32().unwrap());
            assert!(out[..h * lq * d].iter().all(|&x| x == 0.0), "{label}: out of the rows with no key");
            assert!(lse[..h * lq].iter().all(|&x| x == f32::NEG_INFINITY), "{label}: lse of the rows with no key");
        }
    }
    match old_variant {
        Some(v) => std::env::set_var(variant_env, v),
        None => std::env::remove_var(variant_env),
    }
}

#[test]
fn inputs_on_two_devices_are_an_error() {
    let Some((dev, _gpu)) = cuda("inputs_on_two_devices_are_an_error") else { return };
    let t = |d| input(&[1, 2, 7, 64], DType::BF16, -1.0, 1.0, 1, d).unwrap();
    let (q, k) = (t(dev), t(dev));
    let keep_cpu = Tensor::from_vec(vec![1u8; 7], &[7], Device::Cpu).unwrap();
    let e = Tensor::flash_attention(&q, &k, &k, Some(AttentionReference { k: &k, v: &k, keep: Some(&keep_cpu) }), 0.1).expect_err("an error");
    assert!(e.to_string().contains("flash_attention"), "{e}");
    assert!(Tensor::flash_attention(&q, &t(Device::Cpu), &k, None, 0.1).is_err());
}

/// A decoupled-attention case: l1 text keys (source 1), l2 IP keys (source 2), weight s2.
#[derive(Clone, Copy)]
struct DecoupledCase {
    label: &'static str,
    b: usize,
    h: usize,
    lq: usize,
    l1: usize,
    l2: usize,
    s2: f32,
    /// The text K/V are one [1, L1, H, D] context broadcast over the batch (stride 0), as the
    /// models pass a batch-1 text embedding.
    shared_text: bool,
}

const DECOUPLED_CASES: &[DecoupledCase] = &[
    DecoupledCase { label: "text 77 + IP 16, shared text", b: 2, h: 2, lq: 77, l1: 77, l2: 16, s2: 0.7, shared_text: true },
    DecoupledCase { label: "text 77 + IP 5", b: 2, h: 3, lq: 130, l1: 77, l2: 5, s2: 1.0, shared_text: false },
    DecoupledCase { label: "IP over three tiles, negative weight", b: 1, h: 2, lq: 65, l1: 45, l2: 131, s2: -0.6, shared_text: false },
    DecoupledCase { label: "no text keys", b: 1, h: 2, lq: 33, l1: 0, l2: 16, s2: 0.5, shared_text: false },
    DecoupledCase { label: "no IP keys", b: 2, h: 1, lq: 33, l1: 77, l2: 0, s2: 0.5, shared_text: true },
    DecoupledCase { label: "long rows", b: 1, h: 2, lq: 1000, l1: 77, l2: 16, s2: 0.8, shared_text: false },
];

/// The case's inputs (q, k1, v1, k2, v2) on `dev`: [B, L, H, D] memory viewed as [B, H, L, D]
/// (the projections' layout).
fn decoupled_inputs(c: &DecoupledCase, d: usize, dt: DType, dev: Device) -> Result<[Tensor; 5]> {
    let heads = |b: usize, l: usize, seed: u64| -> Result<Tensor> { input(&[b, l, c.h, d], dt, -1.0, 1.0, seed, dev)?.transpose(1, 2) };
    let text = |seed: u64| -> Result<Tensor> {
        if c.shared_text {
            heads(1, c.l1, seed)?.broadcast_to(&[c.b, c.h, c.l1, d])
        } else {
            heads(c.b, c.l1, seed)
        }
    };
    Ok([heads(c.b, c.lq, 11)?, text(12)?, text(13)?, heads(c.b, c.l2, 14)?, heads(c.b, c.l2, 15)?])
}

/// (out, lse1, lse2) of the case on `dev`.
fn run_decoupled(c: &DecoupledCase, d: usize, dt: DType, dev: Device) -> Result<(Tensor, Tensor, Tensor)> {
    let [q, k1, v1, k2, v2] = decoupled_inputs(c, d, dt, dev)?;
    Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, c.s2, 1.0 / (d as f32).sqrt())
}

fn compare_decoupled(label: &str, dt: DType, s2: f32, got: &(Tensor, Tensor, Tensor), want: &(Tensor, Tensor, Tensor)) {
    assert_eq!((got.0.dtype(), got.1.dtype(), got.2.dtype()), (want.0.dtype(), DType::F32, DType::F32), "{label}: dtypes");
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
    // Two outputs' errors, the second weighted by s2.
    let (a, r) = OUT_TOLERANCE.of(dt);
    lookahead::assert_close(&format!("{label}: out"), &cpu(&got.0), &cpu(&want.0), a * (1.0 + s2.abs()), r);
    lookahead::assert_close(&format!("{label}: lse1"), &cpu(&got.1), &cpu(&want.1), LSE_TOLERANCE.0, LSE_TOLERANCE.1);
    lookahead::assert_close(&format!("{label}: lse2"), &cpu(&got.2), &cpu(&want.2), LSE_TOLERANCE.0, LSE_TOLERANCE.1);
}

#[test]
fn flash_attention_decoupled_matches_cpu() {
    let Some((dev, _gpu)) = gpu("flash_attention_decoupled_matches_cpu") else { return };
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        for dt in FLOATS {
            // 64 and 128 take the fused kernel (16-bit types), 40 the composition.
            for d in [64, 128, 40] {
                for c in DECOUPLED_CASES {
                    let label = format!("flash_attention_decoupled {dt} D {d} {} (experimental {experimental})", c.label);
                    let want = run_decoupled(c, d, dt, Device::Cpu).unwrap_or_else(|e| panic!("{label} on cpu: {e}"));
                    let got = run_decoupled(c, d, dt, dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
                    assert_eq!(got.0.device(), dev, "{label}: result left the device");
                    // Heads merge for free on every path: [B, Lq, H, D] memory.
                    assert!(got.0.transpose(1, 2).unwrap().is_contiguous(), "{label}: output layout");
                    compare_decoupled(&label, dt, c.s2, &got, &want);
                }
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

#[test]
fn fused_decoupled_matches_the_unfused_composition() {
    let Some((dev, _gpu)) = cuda("fused_decoupled_matches_the_unfused_composition") else { return };
    for dt in [DType::BF16, DType::F16] {
        for d in [64, 128] {
            for c in DECOUPLED_CASES {
                let label = format!("decoupled fused vs composition {dt} D {d} {}", c.label);
                engine::cuda::set_experimental_kernels(false);
                let unfused = run_decoupled(c, d, dt, dev).unwrap_or_else(|e| panic!("{label}, composition: {e}"));
                engine::cuda::set_experimental_kernels(true);
                let fused = run_decoupled(c, d, dt, dev).unwrap_or_else(|e| panic!("{label}, fused: {e}"));
                compare_decoupled(&label, dt, c.s2, &fused, &unfused);
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

/// Gradients of `Var::flash_attention_decoupled` (one flash backward per source) on the device
/// against the CPU, fused forward on and off.
#[test]
fn flash_attention_decoupled_gradients_match_cpu() {
    let Some((dev, _gpu)) = gpu("flash_attention_decoupled_gradients_match_cpu") else { return };
    let c = &DECOUPLED_CASES[0];
    // dk / dv sum over Lq rows of products rounded to the input type.
    let grad_tolerance = Tolerances { f32: (2e-4, 2e-4), f16: (1e-2, 1e-2), bf16: (6e-2, 6e-2) };
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for d in [64, 128] {
                let label = format!("flash_attention_decoupled gradients {dt} D {d} (experimental {experimental})");
                let grads = |dv: Device| -> Result<Vec<Tensor>> {
                    let leaves: Vec<autograd::Var> = decoupled_inputs(c, d, dt, dv)?.into_iter().map(|t| autograd::Var::leaf(t, true)).collect();
                    let out = autograd::Var::flash_attention_decoupled(&leaves[0], &leaves[1], &leaves[2], &leaves[3], &leaves[4], c.s2, 1.0 / (d as f32).sqrt())?;
                    let w = autograd::Var::leaf(input(out.shape(), dt, -1.0, 1.0, 16, dv)?, false);
                    out.mul(&w)?.sum_all()?.backward()?;
                    leaves.iter().map(|l| l.grad().expect("a gradient").to_device(Device::Cpu)).collect()
                };
                let (want, got) = (grads(Device::Cpu).unwrap_or_else(|e| panic!("{label} on cpu: {e}")), grads(dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}")));
                let (a, r) = grad_tolerance.of(dt);
                for (name, (g, w)) in ["dq", "dk1", "dv1", "dk2", "dv2"].iter().zip(got.iter().zip(&want)) {
                    lookahead::assert_close(&format!("{label}: {name}"), g, w, a, r);
                }
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}
