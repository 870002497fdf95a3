//! GPU parity of flash extended attention, backward (`Tensor::flash_attention_backward`): the CUDA
//! gradients (fused kernels kernels/cuda/flash_attention_backward.cu for bf16/f16 with D 64/128,
//! else the composition of CUDA ops) against the CPU backend (kernels::flash_attention_backward's
//! math), and the fused kernels against the unfused CUDA composition on the same device. Both
//! sides get the same inputs, out and lse (the forward run once on the CPU). Odd sizes (partial
//! query and key tiles, several tiles per source), keep masks per batch and shared,
//! interleaved-head and misaligned views, rows with no key left. The fused kernels sit behind
//! engine::cuda::experimental_kernels until they have run on a GPU: every case runs with the
//! switch off and on. The Hopper (wgmma) main kernel, behind engine::cuda::hopper_kernels, runs
//! the same cases on a compute capability 9.0 device (`hopper_backward_matches_cpu`). Without a
//! CUDA device every test prints "skipped: no CUDA device (...)" and passes.

#[path = "common/cuda_harness.rs"]
mod cuda_harness;
#[path = "common/attention_cases.rs"]
mod attention_cases;

use attention_cases::{operand, Case, Operands, Storage, CASES, NO_KEY_LEFT};
use cuda_harness::{cuda, gpu, hopper_device, input, KernelSwitches, Tolerances, FLOATS};
use engine::ops::flash_attention::AttentionReference;
use engine::ops::flash_attention_backward::FlashAttentionGrads;
use engine::{DType, Device, Result, Tensor};

/// Gradients: the fused kernels round P and dS to the input type for the tensor-core products and
/// accumulate dQ with atomics in another order (the CPU keeps f32 throughout); each gradient is
/// rounded once more to the input type.
const GRAD_TOLERANCE: Tolerances = Tolerances { f32: (2e-4, 2e-4), f16: (4e-3, 4e-3), bf16: (2e-2, 2e-2) };

/// The forward's (out, lse) of the case, computed once on the CPU (so that both sides of a
/// comparison differentiate at the same point).
fn saved(c: &Case, d: usize, dt: DType) -> Result<(Tensor, Tensor)> {
    let x = Operands::new(c, d, dt, Device::Cpu)?;
    Tensor::flash_attention(&x.q, &x.k, &x.v, x.reference(), 1.0 / (d as f32).sqrt())
}

/// The gradients of the case on `dev`, given the forward's (out, lse).
fn run(c: &Case, d: usize, dt: DType, fwd: &(Tensor, Tensor), dev: Device) -> Result<FlashAttentionGrads> {
    let x = Operands::new(c, d, dt, dev)?;
    let dout = operand(c, c.lq, d, dt, 6, dev, c.rows_storage())?;
    let (out, lse) = (fwd.0.to_device(dev)?, fwd.1.to_device(dev)?);
    Tensor::flash_attention_backward(&x.q, &x.k, &x.v, x.reference(), 1.0 / (d as f32).sqrt(), &out, &lse, &dout)
}

fn compare(label: &str, dt: DType, got: &FlashAttentionGrads, want: &FlashAttentionGrads) {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
    let (a, r) = GRAD_TOLERANCE.of(dt);
    let pairs = [("dq", Some(&got.dq), Some(&want.dq)), ("dk", Some(&got.dk), Some(&want.dk)), ("dv", Some(&got.dv), Some(&want.dv)), ("dk_ref", got.dk_ref.as_ref(), want.dk_ref.as_ref()), ("dv_ref", got.dv_ref.as_ref(), want.dv_ref.as_ref())];
    for (name, g, w) in pairs {
        match (g, w) {
            (Some(g), Some(w)) => {
                assert_eq!((g.dtype(), g.shape()), (w.dtype(), w.shape()), "{label}: {name} dtype / shape");
                lookahead::assert_close(&format!("{label}: {name}"), &cpu(g), &cpu(w), a, r);
            }
            (None, None) => {}
            _ => panic!("{label}: {name} present on one side only"),
        }
    }
}

#[test]
fn flash_attention_backward_matches_cpu() {
    let Some((dev, _gpu)) = gpu("flash_attention_backward_matches_cpu") else { return };
    for dt in FLOATS {
        // 64 and 128 take the fused kernels (16-bit types), 40 the composition.
        for d in [64, 128, 40] {
            for c in CASES {
                let fwd = saved(c, d, dt).unwrap_or_else(|e| panic!("{} forward: {e}", c.label));
                let want = run(c, d, dt, &fwd, Device::Cpu).unwrap_or_else(|e| panic!("{} on cpu: {e}", c.label));
                // The verified path first, then the experimental fused kernels.
                for experimental in [false, true] {
                    engine::cuda::set_experimental_kernels(experimental);
                    let label = format!("flash_attention_backward {dt} D {d} {} (experimental {experimental})", c.label);
                    let got = run(c, d, dt, &fwd, dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
                    assert_eq!(got.dq.device(), dev, "{label}: result left the device");
                    compare(&label, dt, &got, &want);
                }
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

#[test]
fn fused_backward_matches_the_unfused_composition() {
    let Some((dev, _gpu)) = cuda("fused_backward_matches_the_unfused_composition") else { return };
    for dt in [DType::BF16, DType::F16] {
        for d in [64, 128] {
            for c in CASES {
                let label = format!("fused vs composition {dt} D {d} {}", c.label);
                let fwd = saved(c, d, dt).unwrap_or_else(|e| panic!("{label} forward: {e}"));
                engine::cuda::set_experimental_kernels(false);
                let unfused = run(c, d, dt, &fwd, dev).unwrap_or_else(|e| panic!("{label}, composition: {e}"));
                engine::cuda::set_experimental_kernels(true);
                let fused = run(c, d, dt, &fwd, dev).unwrap_or_else(|e| panic!("{label}, fused: {e}"));
                compare(&label, dt, &fused, &unfused);
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

/// No own keys, and in batch entry 0 every reference token dropped: every gradient of batch entry
/// 0 is exactly 0; batch entry 1 keeps two tokens.
#[test]
fn rows_with_no_key_left_get_zero_gradients() {
    let Some((dev, _gpu)) = gpu("rows_with_no_key_left_get_zero_gradients") else { return };
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for d in [64, 128] {
                check_no_key_left(dev, dt, d, &format!("no key left {dt} D {d} (experimental {experimental})"));
            }
        }
    }
    engine::cuda::set_experimental_kernels(false);
}

/// The NO_KEY_LEFT case on `dev` against the CPU, and its exact zeros: dq of batch entry 0, its
/// reference gradients, and the empty dk.
fn check_no_key_left(dev: Device, dt: DType, d: usize, label: &str) {
    let Case { b, h, lq, lr, .. } = NO_KEY_LEFT;
    let go = |dv: Device| -> Result<FlashAttentionGrads> {
        let x = Operands::no_key_left(d, dt, dv)?;
        let dout = input(&[b, h, lq, d], dt, -1.0, 1.0, 6, dv)?;
        let (out, lse) = Tensor::flash_attention(&x.q, &x.k, &x.v, x.reference(), 0.125)?;
        Tensor::flash_attention_backward(&x.q, &x.k, &x.v, x.reference(), 0.125, &out, &lse, &dout)
    };
    let (want, got) = (go(Device::Cpu).unwrap(), go(dev).unwrap_or_else(|e| panic!("{label}: {e}")));
    compare(label, dt, &got, &want);
    let zero = |t: &Tensor, n: usize| t.to_vec_f32().unwrap()[..n].iter().all(|&x| x == 0.0);
    assert!(zero(&got.dq, h * lq * d), "{label}: dq of the rows with no key");
    assert!(zero(got.dk_ref.as_ref().unwrap(), h * lr * d) && zero(got.dv_ref.as_ref().unwrap(), h * lr * d), "{label}: reference gradients of batch entry 0");
    assert_eq!(got.dk.shape(), &[b, h, 0, d]);
}

/// The Hopper (wgmma) main kernel (kernels/cuda/flash_attention_backward_hopper.cu), behind
/// engine::cuda::hopper_kernels: on a compute capability 9.0 device, every case and the rows with
/// no key left against the CPU with the Hopper (and experimental) switches on, bf16/f16, D 64/128.
/// Other devices print why they skip.
#[test]
fn hopper_backward_matches_cpu() {
    let Some((dev, _gpu)) = gpu("hopper_backward_matches_cpu") else { return };
    if !hopper_device(dev, "hopper_backward_matches_cpu") {
        return;
    }
    let _switches = KernelSwitches::set(true, true);
    // The default kernel, then each variant (LOOKAHEAD_VARIANT_FLASH_BWD; head dim 64 only: D 128
    // runs the default kernel under any of them). The variable is put back as it was.
    let variant_env = "LOOKAHEAD_VARIANT_FLASH_BWD";
    let before = std::env::var(variant_env).ok();
    let variants = engine::cuda::flash_attention_backward::HOPPER_VARIANTS.names.iter().copied();
    for variant in variants {
        std::env::set_var(variant_env, variant);
        for dt in [DType::BF16, DType::F16] {
            for d in [64, 128] {
                if d == 128 && variant != "default" {
                    continue;
                }
                for c in CASES {
                    let label = format!("flash_attention_backward {dt} D {d} {} (Hopper kernel, variant {variant})", c.label);
                    let fwd = saved(c, d, dt).unwrap_or_else(|e| panic!("{label} forward: {e}"));
                    let want = run(c, d, dt, &fwd, Device::Cpu).unwrap_or_else(|e| panic!("{label} on cpu: {e}"));
                    let got = run(c, d, dt, &fwd, dev).unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
                    assert_eq!(got.dq.device(), dev, "{label}: result left the device");
                    compare(&label, dt, &got, &want);
                }
                check_no_key_left(dev, dt, d, &format!("no key left {dt} D {d} (Hopper kernel, variant {variant})"));
            }
        }
    }
    match before {
        Some(v) => std::env::set_var(variant_env, v),
        None => std::env::remove_var(variant_env),
    }
}

/// out / dout of another float dtype than q are converted (the autograd may hand f32 dout).
#[test]
fn dout_in_f32_with_16_bit_inputs() {
    let Some((dev, _gpu)) = gpu("dout_in_f32_with_16_bit_inputs") else { return };
    let c = CASES[0];
    for experimental in [false, true] {
        engine::cuda::set_experimental_kernels(experimental);
        let label = format!("f32 dout, bf16 inputs (experimental {experimental})");
        let go = |dv: Device| -> Result<FlashAttentionGrads> {
            let t = |l, seed| operand(&c, l, 64, DType::BF16, seed, dv, c.rows_storage());
            let (q, k, v, kr, vr) = (t(c.lq, 1)?, t(c.lk, 2)?, t(c.lk, 3)?, t(c.lr, 4)?, t(c.lr, 5)?);
            let dout = operand(&c, c.lq, 64, DType::F32, 6, dv, Storage::Interleaved)?;
            let reference = Some(AttentionReference { k: &kr, v: &vr, keep: None });
            let (out, lse) = Tensor::flash_attention(&q.to_device(Device::Cpu)?, &k.to_device(Device::Cpu)?, &v.to_device(Device::Cpu)?, Some(AttentionReference { k: &kr.to_device(Device::Cpu)?, v: &vr.to_device(Device::Cpu)?, keep: None }), 0.125)?;
            Tensor::flash_attention_backward(&q, &k, &v, reference, 0.125, &out.to_device(dv)?, &lse.to_device(dv)?, &dout)
        };
        let (want, got) = (go(Device::Cpu).unwrap(), go(dev).unwrap_or_else(|e| panic!("{label}: {e}")));
        assert_eq!(got.dq.dtype(), DType::BF16, "{label}");
        compare(&label, DType::BF16, &got, &want);
    }
    engine::cuda::set_experimental_kernels(false);
}
