//! Memory behaviour, measured with the engine's live / peak CPU storage counters. The counters are
//! process-wide, so this file holds a single test (tests of one binary run in parallel).

use autograd::optim::{clip_grad_norm, AdamW, AdamWConfig};
use autograd::{checkpoint, Var};
use engine::cpu::{memory_stats, reset_peak};
use engine::{Conv2dParams, DType, Device, Tensor};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F32, Device::Cpu, seed).unwrap().mul_scalar(0.2).unwrap()
}

/// One residual block: x + tanh(silu(x W1) W2).
fn block(x: &Var, w1: &Var, w2: &Var) -> engine::Result<Var> {
    x.add(&x.matmul(w1)?.silu()?.matmul(w2)?.tanh()?)
}

/// Peak live bytes of one forward + backward through `depth` blocks, and the weight gradients.
fn run(depth: usize, use_checkpoint: bool) -> (usize, Vec<Vec<f32>>) {
    let weights: Vec<(Var, Var)> = (0..depth).map(|i| (Var::leaf(randn(&[128, 128], 2 * i as u64), true), Var::leaf(randn(&[128, 128], 2 * i as u64 + 1), true))).collect();
    let x0 = Var::leaf(randn(&[256, 128], 999), true);
    reset_peak();
    let base = memory_stats().0;
    let mut x = x0.clone();
    for (w1, w2) in &weights {
        x = if use_checkpoint {
            let (w1, w2) = (w1.clone(), w2.clone());
            checkpoint(&[x], move |v| Ok(vec![block(&v[0], &w1, &w2)?])).unwrap().remove(0)
        } else {
            block(&x, w1, w2).unwrap()
        };
    }
    x.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    drop(x);
    let peak = memory_stats().1 - base;
    let grads = weights.iter().flat_map(|(a, b)| [a.grad().unwrap().to_vec::<f32>().unwrap(), b.grad().unwrap().to_vec::<f32>().unwrap()]).collect();
    (peak, grads)
}

#[test]
fn checkpointing_lowers_peak_memory_and_training_does_not_grow() {
    // Checkpointing: same gradients, lower peak.
    let (plain_peak, plain) = run(12, false);
    let (ckpt_peak, ckpt) = run(12, true);
    assert_eq!(plain, ckpt, "checkpointed gradients differ from the plain run");
    eprintln!("peak live bytes over forward + backward of 12 blocks: plain {plain_peak}, checkpointed {ckpt_peak}");
    assert!(ckpt_peak * 2 < plain_peak, "checkpointing peak {ckpt_peak} bytes is not well below the plain {plain_peak} bytes");

    // 100 training iterations of a small conv / norm / linear net: the live bytes after each
    // iteration stay where they were after the first.
    let conv_w = Var::leaf(randn(&[8, 3, 3, 3], 1), true);
    let conv_b = Var::leaf(randn(&[8], 2), true);
    let gn_w = Var::leaf(Tensor::ones(&[8], DType::F32, Device::Cpu).unwrap(), true);
    let gn_b = Var::leaf(randn(&[8], 3), true);
    let lin_w = Var::leaf(randn(&[4, 8], 4), true);
    let frozen = Var::leaf(randn(&[4, 4], 5), false);
    let params = vec![conv_w.clone(), conv_b.clone(), gn_w.clone(), gn_b.clone(), lin_w.clone()];
    let mut opt = AdamW::new(&params, AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let x = Var::constant(randn(&[2, 3, 8, 8], 6));
    let target = Var::constant(randn(&[2, 64, 4], 7));
    let mut live_after_first = 0;
    let mut losses = Vec::new();
    for it in 0..100 {
        let h = x.conv2d(&conv_w, Some(&conv_b), Conv2dParams::new(1, 1)).unwrap();
        let h = h.group_norm(4, Some(&gn_w), Some(&gn_b), 1e-5, true).unwrap();
        let tokens = h.flatten(2, 3).unwrap().transpose(1, 2).unwrap(); // [2, 64, 8]
        let y = tokens.linear(&lin_w, None).unwrap().matmul(&frozen).unwrap();
        let loss = y.sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
        losses.push(loss.value().to_scalar_f32().unwrap());
        loss.backward().unwrap();
        drop(loss);
        clip_grad_norm(&params, 1.0).unwrap();
        opt.step().unwrap();
        opt.zero_grad();
        let live = memory_stats().0;
        if it == 0 {
            live_after_first = live;
        } else {
            assert!(live <= live_after_first, "iteration {it}: {live} live bytes, {live_after_first} after the first");
        }
    }
    assert!(frozen.grad().is_none());
    assert!(losses[99] < losses[0], "training did not reduce the loss: {} -> {}", losses[0], losses[99]);
}
