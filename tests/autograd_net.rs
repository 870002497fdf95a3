//! Autograd against PyTorch (fixture: tests/fixtures/gen/autograd_net.py): the gradients of a small
//! net (conv + group norm/SiLU + layer norm + attention + linear + GEGLU + upsampling + an affine
//! grid-sample warp with a learned theta) with respect to every weight, the input and theta; and
//! ten AdamW steps with gradient clipping, a cosine warmup schedule, and a bf16 parameter updated
//! through f32 master weights.

use std::collections::BTreeMap;

use autograd::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use autograd::{checkpoint, Var};
use engine::{Conv2dParams, DType, Tensor};
use lookahead::{assert_close, load_fixture};

#[path = "common/cuda_harness.rs"]
mod cuda_harness;

fn get<'a>(f: &'a BTreeMap<String, Tensor>, k: &str) -> &'a Tensor {
    f.get(k).unwrap_or_else(|| panic!("fixture has no tensor `{k}`"))
}

const NAMES: [&str; 17] = ["x", "conv.w", "conv.b", "gn.w", "gn.b", "ln.w", "ln.b", "q.w", "k.w", "v.w", "o.w", "o.b", "ff1.w", "ff1.b", "ff2.w", "ff2.b", "theta"];

/// The generator's net, written against `Var`; `p` maps the fixture names to leaves.
fn net(p: &BTreeMap<&str, Var>, checkpointed: bool) -> engine::Result<Var> {
    let (b, d, h, w, heads) = (2usize, 8usize, 8usize, 8usize, 2usize);
    let x = &p["x"];
    let image = x.conv2d(&p["conv.w"], Some(&p["conv.b"]), Conv2dParams::new(1, 1))?;
    let image = image.group_norm(4, Some(&p["gn.w"]), Some(&p["gn.b"]), 1e-5, true)?;
    let tokens = image.flatten(2, 3)?.transpose(1, 2)?; // [B, HW, D]
    let transformer = {
        let p: BTreeMap<String, Var> = p.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        move |v: &[Var]| -> engine::Result<Vec<Var>> {
            let t = &v[0];
            let n = t.layer_norm(Some(&p["ln.w"]), Some(&p["ln.b"]), 1e-5)?;
            let split = |z: Var| z.reshape(&[b, h * w, heads, d / heads])?.transpose(1, 2);
            let q = split(n.linear(&p["q.w"], None)?)?;
            let k = split(n.linear(&p["k.w"], None)?)?;
            let vv = split(n.linear(&p["v.w"], None)?)?;
            let a = Var::scaled_dot_product_attention(&q, &k, &vv, None, None)?.transpose(1, 2)?.reshape(&[b, h * w, d])?;
            let t = t.add(&a.linear(&p["o.w"], Some(&p["o.b"]))?)?;
            let ff = t.linear(&p["ff1.w"], Some(&p["ff1.b"]))?.geglu()?.linear(&p["ff2.w"], Some(&p["ff2.b"]))?;
            Ok(vec![t.add(&ff)?])
        }
    };
    let tokens = if checkpointed { checkpoint(&[tokens], transformer)?.remove(0) } else { transformer(&[tokens])?.remove(0) };
    let image = tokens.transpose(1, 2)?.reshape(&[b, d, h, w])?.upsample_nearest2d(16, 16)?;
    let grid = Var::affine_grid(&p["theta"], [b, d, 12, 12], false)?;
    image.grid_sample(&grid, false)
}

#[test]
fn net_gradients_match_pytorch() {
    let f = load_fixture("autograd_net.safetensors");
    for checkpointed in [false, true] {
        let p: BTreeMap<&str, Var> = NAMES.iter().map(|&n| (n, Var::leaf(get(&f, n).clone(), true))).collect();
        let warped = net(&p, checkpointed).unwrap();
        assert_close("warped", warped.value(), get(&f, "warped"), 1e-5, 1e-4);
        let loss = warped.sub(&Var::constant(get(&f, "target").clone())).unwrap().sqr().unwrap().mean_all().unwrap();
        assert_close("loss", loss.value(), get(&f, "loss"), 1e-6, 1e-5);
        loss.backward().unwrap();
        for n in NAMES {
            let got = p[n].grad().unwrap_or_else(|| panic!("no gradient for {n}"));
            let want = get(&f, &format!("grad.{n}"));
            // Gradients are small (a mean over 2304 outputs); compare relative to their scale.
            let scale = want.to_vec_f32().unwrap().into_iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&format!("grad.{n} (checkpointed: {checkpointed})"), &got, want, 1e-4 * scale.max(1e-6), 1e-3);
        }
    }
}

/// The same gradients with every tensor on a CUDA device (a GPU, else the CUDA emulator:
/// tests/common/cuda_harness.rs): the backward rules' CUDA kernels and library calls (conv
/// backward through cuDNN, group norm + SiLU backward, attention, grid sample), f32, against
/// PyTorch's gradients.
#[test]
fn net_gradients_on_cuda_match_pytorch() {
    let Some((dev, _gpu)) = cuda_harness::cuda("net_gradients_on_cuda_match_pytorch") else { return };
    let f = load_fixture("autograd_net.safetensors");
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    let cpu = |t: &Tensor| t.to_device(engine::Device::Cpu).unwrap();
    for checkpointed in [false, true] {
        let p: BTreeMap<&str, Var> = NAMES.iter().map(|&n| (n, Var::leaf(on(get(&f, n)), true))).collect();
        let warped = net(&p, checkpointed).unwrap();
        assert_eq!(warped.value().device(), dev, "the result left the device");
        assert_close("warped on cuda", &cpu(warped.value()), get(&f, "warped"), 1e-5, 1e-4);
        let loss = warped.sub(&Var::constant(on(get(&f, "target")))).unwrap().sqr().unwrap().mean_all().unwrap();
        loss.backward().unwrap();
        for n in NAMES {
            let got = p[n].grad().unwrap_or_else(|| panic!("no gradient for {n}"));
            assert_eq!(got.device(), dev, "grad.{n} left the device");
            let want = get(&f, &format!("grad.{n}"));
            let scale = want.to_vec_f32().unwrap().into_iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&format!("grad.{n} on cuda (checkpointed: {checkpointed})"), &cpu(&got), want, 1e-4 * scale.max(1e-6), 1e-3);
        }
    }
}

/// Issue #3's allocator target: a training loop on CUDA (the net above, checkpointed, forward,
/// MSE loss, backward, gradient clipping, AdamW) makes no cuMemAlloc / cuMemFree call once warm,
/// and holds no more memory step after step (allocator statistics).
#[test]
fn cuda_training_loop_allocates_nothing_in_steady_state() {
    let Some((dev, _gpu)) = cuda_harness::cuda("cuda_training_loop_allocates_nothing_in_steady_state") else { return };
    let cuda = engine::cuda::device(0).unwrap();
    let f = load_fixture("autograd_net.safetensors");
    let p: BTreeMap<&str, Var> = NAMES.iter().map(|&n| (n, Var::leaf(get(&f, n).to_device(dev).unwrap(), n != "x"))).collect();
    let params: Vec<Var> = NAMES.iter().filter(|&&n| n != "x").map(|n| p[n].clone()).collect();
    let target = Var::constant(get(&f, "target").to_device(dev).unwrap());
    let mut opt = AdamW::new(&params, AdamWConfig { lr: 1e-3, ..Default::default() }).unwrap();
    let mut losses = Vec::new();
    let mut step = || {
        for q in &params {
            q.zero_grad();
        }
        let loss = net(&p, true).unwrap().sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
        loss.backward().unwrap();
        clip_grad_norm(&params, 1.0).unwrap();
        opt.step().unwrap();
        losses.push(loss.value().to_vec_f32().unwrap()[0]);
    };
    step();
    step();
    let warm = cuda.memory_stats();
    for _ in 0..4 {
        step();
    }
    let after = cuda.memory_stats();
    eprintln!("allocator after 2 + 4 training steps: {after:?}; losses {losses:?}");
    assert_eq!((after.alloc_calls, after.free_calls), (warm.alloc_calls, warm.free_calls), "cuMemAlloc / cuMemFree in a steady-state training loop");
    assert_eq!(after.in_use, warm.in_use, "memory held grows step after step");
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "the loss goes down: {losses:?}");
}

#[test]
fn adamw_with_clipping_and_schedule_matches_pytorch() {
    let f = load_fixture("autograd_net.safetensors");
    let p1 = Var::leaf(get(&f, "adam.p1").copy().unwrap(), true);
    let p2 = Var::leaf(get(&f, "adam.p2").copy().unwrap(), true);
    let params = [p1.clone(), p2.clone()];
    let config = AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let mut opt = AdamW::new(&params, config).unwrap();
    let schedule = LrSchedule::Cosine { warmup: 3, total: 10 };
    let mut norms = Vec::new();
    for step in 0..10u64 {
        p1.set_grad(Some(get(&f, &format!("adam.g1.{step}")).clone())).unwrap();
        p2.set_grad(Some(get(&f, &format!("adam.g2.{step}")).clone())).unwrap();
        norms.push(clip_grad_norm(&params, 1.0).unwrap() as f32);
        opt.set_lr(schedule.lr(config.lr, step));
        opt.step().unwrap();
    }
    let norms = Tensor::from_vec(norms, &[10], engine::Device::Cpu).unwrap();
    assert_close("clip_grad_norm totals", &norms, get(&f, "adam.norms"), 1e-6, 1e-5);
    assert_close("p1 after 10 steps", p1.value(), get(&f, "adam.p1.final"), 1e-6, 1e-5);
    assert_close("p2 after 10 steps", p2.value(), get(&f, "adam.p2.final"), 1e-6, 1e-5);

    // bf16 parameter with an f32 master copy.
    let p3 = Var::leaf(get(&f, "adam.p3").copy().unwrap(), true);
    assert_eq!(p3.dtype(), DType::BF16);
    let mut opt3 = AdamW::new(std::slice::from_ref(&p3), AdamWConfig { lr: 3e-2, weight_decay: 0.01, ..Default::default() }).unwrap();
    for step in 0..10 {
        p3.set_grad(Some(get(&f, &format!("adam.g3.{step}")).clone())).unwrap();
        opt3.step().unwrap();
    }
    assert_eq!(p3.value().dtype(), DType::BF16);
    assert_eq!(p3.value().to_vec_f32().unwrap(), get(&f, "adam.p3.final").to_vec_f32().unwrap(), "bf16 parameter after 10 master-weight steps");
}
