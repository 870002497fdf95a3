//! A finite-difference gradcheck (f32, CPU, central differences) of every backward rule, plus the
//! graph semantics: no_grad, frozen weights, accumulation, freeing, ops without a rule.

// Inputs are listed as `&[x.clone()]` for uniformity with the multi-input checks.
#![allow(clippy::cloned_ref_to_slice_refs)]

use autograd::gradcheck::{gradcheck, GradcheckOptions};
use autograd::{checkpoint, no_grad, Var};
use engine::{Conv2dParams, DType, Device, PadMode, Tensor};
use kernels::elementwise::UnaryOp;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F32, Device::Cpu, seed).unwrap()
}

/// Values at least 0.15 away from zero (for ops with a kink there).
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    let v: Vec<f32> = randn(shape, seed).to_vec::<f32>().unwrap().into_iter().map(|x| if x >= 0.0 { x + 0.15 } else { x - 0.15 }).collect();
    Tensor::from_vec(v, shape, Device::Cpu).unwrap()
}

/// Distinct values spaced 0.1 apart in a scrambled order (for max / max-pool).
fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as u64 * 7919 + seed * 104729) % n as u64) as f32 * 0.1 - n as f32 * 0.05).collect();
    Tensor::from_vec(v, shape, Device::Cpu).unwrap()
}

fn positive(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed).abs().unwrap().add_scalar(0.5).unwrap()
}

fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Var]) -> engine::Result<Var>) {
    gradcheck(name, inputs, f, GradcheckOptions::default()).unwrap_or_else(|e| panic!("{e}"));
}

fn check_with(name: &str, inputs: &[Tensor], opts: GradcheckOptions, f: impl Fn(&[Var]) -> engine::Result<Var>) {
    gradcheck(name, inputs, f, opts).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn unary_ops() {
    let general = [
        UnaryOp::Neg, UnaryOp::Sqr, UnaryOp::Exp, UnaryOp::Sin, UnaryOp::Cos, UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Silu,
        UnaryOp::Gelu, UnaryOp::GeluTanh, UnaryOp::Affine { mul: -1.5, add: 0.3 },
    ];
    for op in general {
        check(&format!("{op:?}"), &[randn(&[3, 4], 1)], |v| v[0].unary(op));
    }
    for op in [UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::Recip, UnaryOp::Log, UnaryOp::Powf(2.5), UnaryOp::Powf(-0.5)] {
        check(&format!("{op:?}"), &[positive(&[3, 4], 2)], |v| v[0].unary(op));
    }
    for op in [UnaryOp::Abs, UnaryOp::Relu, UnaryOp::LeakyRelu(0.1), UnaryOp::Clamp { min: -0.05, max: 0.05 }] {
        check(&format!("{op:?}"), &[away_from_zero(&[3, 4], 3)], |v| v[0].unary(op));
    }
    // Named wrappers and a transposed (non-contiguous) input.
    check("silu of transposed", &[randn(&[4, 3], 4)], |v| v[0].t()?.silu());
    check("mul_scalar add_scalar", &[randn(&[5], 5)], |v| v[0].mul_scalar(3.0)?.add_scalar(1.0));
}

#[test]
fn binary_ops_with_broadcasting() {
    let (a, b) = (randn(&[2, 3, 4], 10), randn(&[3, 1], 11));
    check("add", &[a.clone(), b.clone()], |v| v[0].add(&v[1]));
    check("sub", &[a.clone(), b.clone()], |v| v[0].sub(&v[1]));
    check("mul", &[a.clone(), b.clone()], |v| v[0].mul(&v[1]));
    check("div", &[a.clone(), positive(&[3, 1], 12)], |v| v[0].div(&v[1]));
    check("pow", &[positive(&[2, 3, 4], 13), randn(&[4], 14)], |v| v[0].pow(&v[1]));
    // Distinct values so that no pair ties within the difference step.
    let (x, y) = (distinct(&[3, 4], 1), distinct(&[3, 4], 2).add_scalar(0.05).unwrap());
    check("maximum", &[x.clone(), y.clone()], |v| v[0].maximum(&v[1]));
    check("minimum", &[x, y], |v| v[0].minimum(&v[1]));
    check("add transposed", &[randn(&[4, 3], 15), randn(&[3, 4], 16)], |v| v[0].t()?.add(&v[1]));
}

#[test]
fn where_masked_fill_dropout_and_casts() {
    let mask = Tensor::from_vec(vec![1u8, 0, 1, 1, 0, 0], &[2, 3], Device::Cpu).unwrap();
    let m2 = mask.clone();
    check("where_cond", &[randn(&[2, 3], 20), randn(&[3], 21)], move |v| Var::where_cond(&m2, &v[0], &v[1]));
    let m3 = mask.clone();
    check("masked_fill", &[randn(&[2, 3], 22)], move |v| v[0].masked_fill(&m3, -5.0));
    check("dropout", &[randn(&[4, 8], 23)], |v| v[0].dropout(0.3, 99, true));
    // A cast is a step function for finite differences; its gradient is the cast-back gradient.
    let x = Var::leaf(randn(&[5], 24), true);
    let y = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let g = Tensor::from_vec(vec![0.1f32, 0.2, 0.3, 0.4, 0.5], &[5], Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    y.backward_with(&g, false).unwrap();
    let got = x.grad().unwrap();
    assert_eq!(got.dtype(), DType::F32);
    assert_eq!(got.to_vec::<f32>().unwrap(), g.to_vec_f32().unwrap());
}

#[test]
fn matmul_linear() {
    check("matmul 2d", &[randn(&[3, 4], 30), randn(&[4, 5], 31)], |v| v[0].matmul(&v[1]));
    check("matmul batched broadcast", &[randn(&[2, 3, 4], 32), randn(&[4, 5], 33)], |v| v[0].matmul(&v[1]));
    check("matmul broadcast lhs", &[randn(&[3, 4], 34), randn(&[2, 1, 4, 2], 35)], |v| v[0].matmul(&v[1]));
    check("matmul vectors", &[randn(&[4], 36), randn(&[4, 3], 37), randn(&[3], 38)], |v| v[0].matmul(&v[1])?.mul(&v[0].matmul(&v[1])?.matmul(&v[2])?.unsqueeze(0)?));
    check("matmul transposed views", &[randn(&[4, 3], 39), randn(&[5, 4], 40)], |v| v[0].t()?.matmul(&v[1].t()?));
    check("linear bias", &[randn(&[2, 3, 4], 41), randn(&[5, 4], 42), randn(&[5], 43)], |v| v[0].linear(&v[1], Some(&v[2])));
    check("linear no bias 1d", &[randn(&[4], 44), randn(&[5, 4], 45)], |v| v[0].linear(&v[1], None));
    check("linear transposed input", &[randn(&[2, 4, 3], 46), randn(&[5, 4], 47)], |v| v[0].transpose(1, 2)?.linear(&v[1], None));
}

#[test]
fn conv2d() {
    let p = Conv2dParams { stride: [2, 1], padding: [1, 2], dilation: [1, 2], groups: 2 };
    check("conv2d grouped", &[randn(&[2, 4, 5, 6], 50), randn(&[6, 2, 3, 2], 51), randn(&[6], 52)], move |v| v[0].conv2d(&v[1], Some(&v[2]), p));
    check("conv2d 1x1", &[randn(&[1, 3, 4, 4], 53), randn(&[2, 3, 1, 1], 54)], |v| v[0].conv2d(&v[1], None, Conv2dParams::default()));
    check("conv2d 3x3 pad", &[randn(&[1, 2, 5, 5], 55), randn(&[3, 2, 3, 3], 56)], |v| v[0].conv2d(&v[1], None, Conv2dParams::new(1, 1)));
}

#[test]
fn attention() {
    let (q, k, v) = (randn(&[2, 2, 3, 4], 60), randn(&[2, 2, 5, 4], 61), randn(&[2, 2, 5, 3], 62));
    check("sdpa", &[q.clone(), k.clone(), v.clone()], |x| Var::scaled_dot_product_attention(&x[0], &x[1], &x[2], None, None));
    let mask = randn(&[3, 5], 63);
    check("sdpa float mask + scale", &[q.clone(), k.clone(), v.clone()], move |x| Var::scaled_dot_product_attention(&x[0], &x[1], &x[2], Some(&mask), Some(0.3)));
    let bmask = Tensor::from_vec((0..15).map(|i| (i % 4 != 1) as u8).collect::<Vec<u8>>(), &[3, 5], Device::Cpu).unwrap();
    check("sdpa bool mask", &[q.clone(), k.clone(), v.clone()], move |x| Var::scaled_dot_product_attention(&x[0], &x[1], &x[2], Some(&bmask), None));
    // Keys and values shared over the batch (broadcast leading dims), queries as a permuted view.
    check("sdpa broadcast kv", &[randn(&[2, 3, 2, 4], 64), randn(&[1, 2, 5, 4], 65), randn(&[1, 2, 5, 3], 66)], |x| {
        Var::scaled_dot_product_attention(&x[0].transpose(1, 2)?, &x[1], &x[2], None, None)
    });
}

#[test]
fn softmax_norms_gated() {
    check("softmax last", &[randn(&[3, 5], 70)], |v| v[0].softmax(-1));
    check("softmax dim0", &[randn(&[3, 5], 71)], |v| v[0].softmax(0));
    check("log_softmax", &[randn(&[2, 3, 4], 72)], |v| v[0].log_softmax(1));
    check("layer_norm affine", &[randn(&[2, 3, 6], 73), randn(&[6], 74), randn(&[6], 75)], |v| v[0].layer_norm(Some(&v[1]), Some(&v[2]), 1e-5));
    check("layer_norm plain", &[randn(&[4, 5], 76)], |v| v[0].layer_norm(None, None, 1e-5));
    check("layer_norm weight only", &[randn(&[4, 5], 77), randn(&[5], 78)], |v| v[0].layer_norm(Some(&v[1]), None, 1e-5));
    for silu in [false, true] {
        check(&format!("group_norm silu={silu}"), &[randn(&[2, 4, 3, 2], 79), randn(&[4], 80), randn(&[4], 81)], move |v| v[0].group_norm(2, Some(&v[1]), Some(&v[2]), 1e-5, silu));
    }
    check("group_norm plain", &[randn(&[2, 6, 5], 82)], |v| v[0].group_norm(3, None, None, 1e-5, false));
    check("geglu", &[randn(&[2, 3, 8], 83)], |v| v[0].geglu());
    check("prelu per channel", &[away_from_zero(&[2, 3, 4], 84), randn(&[3], 85)], |v| v[0].prelu(&v[1]));
    check("prelu shared", &[away_from_zero(&[2, 3], 86), randn(&[1], 87)], |v| v[0].prelu(&v[1]));
}

#[test]
fn reductions() {
    let x = randn(&[2, 3, 4], 90);
    check("sum dims", &[x.clone()], |v| v[0].sum(&[0, 2], false));
    check("sum keepdim", &[x.clone()], |v| v[0].sum(&[-1], true));
    check("sum_all", &[x.clone()], |v| v[0].sum_all());
    check("mean", &[x.clone()], |v| v[0].mean(&[1], false));
    check("mean_all", &[x.clone()], |v| v[0].mean_all());
    check("var unbiased", &[x.clone()], |v| v[0].var(&[1, 2], false, true));
    check("var biased keepdim", &[x.clone()], |v| v[0].var(&[0], true, false));
    check("max", &[distinct(&[3, 4, 2], 3)], |v| v[0].max(1, false));
    check("min keepdim", &[distinct(&[3, 4], 4)], |v| v[0].min(-1, true));
}

#[test]
fn shape_ops() {
    let x = randn(&[2, 3, 4], 100);
    check("reshape", &[x.clone()], |v| v[0].reshape(&[4, 6]));
    check("permute", &[x.clone()], |v| v[0].permute(&[2, 0, 1])?.contiguous());
    check("transpose+reshape", &[x.clone()], |v| v[0].transpose(0, 2)?.reshape(&[24]));
    check("narrow", &[x.clone()], |v| v[0].narrow(1, 1, 2));
    check("broadcast_to", &[randn(&[3, 1], 101)], |v| v[0].broadcast_to(&[2, 3, 5]));
    check("unsqueeze squeeze flatten", &[x.clone()], |v| v[0].unsqueeze(1)?.flatten(2, 3)?.squeeze(1));
    check("cat", &[randn(&[2, 3], 102), randn(&[2, 1], 103)], |v| Var::cat(&[&v[0], &v[1]], -1));
    check("stack", &[randn(&[2, 3], 104), randn(&[2, 3], 105)], |v| Var::stack(&[&v[0], &v[1]], 1));
    check("split", &[x.clone()], |v| {
        let parts = v[0].split(&[1, 3], 2)?;
        parts[1].sum(&[2], true)?.mul(&parts[0])
    });
    check("chunk", &[randn(&[5, 2], 106)], |v| {
        let parts = v[0].chunk(3, 0)?;
        Var::cat(&[&parts[2], &parts[0].mul_scalar(2.0)?], 0)
    });
    let idx = Tensor::from_vec(vec![2i64, 0, 2, 1], &[4], Device::Cpu).unwrap();
    check("index_select repeats", &[x.clone()], move |v| v[0].index_select(1, &idx));
    let ids = Tensor::from_vec(vec![1i64, 3, 1, 0, 3, 3], &[2, 3], Device::Cpu).unwrap();
    check("embedding", &[randn(&[4, 5], 107)], move |v| v[0].embedding(&ids));
    check("pad constant", &[x.clone()], |v| v[0].pad(&[1, 2, 0, 1], PadMode::Constant, 0.5));
}

#[test]
fn spatial_ops() {
    let x = randn(&[2, 2, 5, 6], 110);
    check("upsample 2x", &[x.clone()], |v| v[0].upsample_nearest2d(10, 12));
    check("upsample odd", &[x.clone()], |v| v[0].upsample_nearest2d(7, 8));
    check("avg_pool2d", &[x.clone()], |v| v[0].avg_pool2d([3, 2], [2, 2], [1, 1]));
    check("adaptive_avg_pool2d", &[x.clone()], |v| v[0].adaptive_avg_pool2d([3, 4]));
    check("max_pool2d ceil", &[distinct(&[1, 2, 5, 6], 5)], |v| v[0].max_pool2d([3, 3], [2, 2], [1, 1], true));
    check("max_pool2d", &[distinct(&[2, 1, 4, 4], 6)], |v| v[0].max_pool2d([2, 2], [2, 2], [0, 0], false));
    check("affine_grid", &[randn(&[2, 2, 3], 111)], |v| Var::affine_grid(&v[0], [2, 1, 3, 4], false));
    check("affine_grid aligned", &[randn(&[1, 2, 3], 112)], |v| Var::affine_grid(&v[0], [1, 1, 4, 3], true));
    for align in [false, true] {
        // Sample points away from pixel-grid lines (bilinear weights have kinks there); some lie
        // partly or fully outside the image.
        let (h, w, oh, ow) = (4usize, 5usize, 3usize, 2usize);
        let mut grid = Vec::new();
        for i in 0..2 * oh * ow {
            let px = (i * 7 % 9) as f32 - 1.5 + 0.23 + (i % 3) as f32 * 0.17;
            let py = (i * 5 % 7) as f32 - 1.5 + 0.31 + (i % 4) as f32 * 0.11;
            let norm = |p: f32, n: usize| if align { p * 2.0 / (n - 1) as f32 - 1.0 } else { (2.0 * p + 1.0) / n as f32 - 1.0 };
            grid.extend([norm(px, w), norm(py, h)]);
        }
        let grid = Tensor::from_vec(grid, &[2, oh, ow, 2], Device::Cpu).unwrap();
        let opts = GradcheckOptions { eps: 1e-3, atol: 5e-3, rtol: 1e-2 };
        check_with(&format!("grid_sample align={align}"), &[randn(&[2, 3, h, w], 113), grid], opts, move |v| v[0].grid_sample(&v[1], align));
    }
}

#[test]
fn no_grad_frozen_accumulation_and_freeing() {
    let w = Var::leaf(randn(&[3, 3], 120), true);
    let frozen = Var::leaf(randn(&[3, 3], 121), false);
    let x = Var::constant(randn(&[2, 3], 122));
    // no_grad records nothing.
    let y = no_grad(|| x.matmul(&w).unwrap());
    assert!(!y.requires_grad());
    assert!(y.sum_all().unwrap().backward().is_err());
    // Frozen weights get no gradient; accumulation over two backwards doubles the gradient.
    let loss = || x.matmul(&w).unwrap().matmul(&frozen).unwrap().sum_all().unwrap();
    loss().backward().unwrap();
    let g1 = w.grad().unwrap().to_vec::<f32>().unwrap();
    loss().backward().unwrap();
    let g2 = w.grad().unwrap().to_vec::<f32>().unwrap();
    assert!(frozen.grad().is_none());
    for (a, b) in g1.iter().zip(&g2) {
        assert!((2.0 * a - b).abs() < 1e-5);
    }
    w.zero_grad();
    assert!(w.grad().is_none());
    // The graph is freed after backward unless retained.
    let l = loss();
    l.backward_with(&Tensor::ones(&[], DType::F32, Device::Cpu).unwrap(), true).unwrap();
    l.backward().unwrap();
    let e = l.backward().unwrap_err().to_string();
    assert!(e.contains("freed"), "{e}");
    // An op without a backward rule errors when a gradient reaches it, and only then.
    let idx = Tensor::from_vec(vec![0i64, 2, 1, 1, 0, 2], &[2, 3], Device::Cpu).unwrap();
    let e = x.matmul(&w).unwrap().gather(1, &idx).unwrap().sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(e.contains("gather"), "{e}");
    let e = Var::leaf(randn(&[1, 1, 4], 123), true).pad(&[2, 1], PadMode::Reflect, 0.0).unwrap().sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(e.contains("reflect"), "{e}");
    let g = x.gather(1, &idx).unwrap();
    assert!(!g.requires_grad());
}

#[test]
fn checkpoint_gives_the_plain_gradients() {
    let w1 = Var::leaf(randn(&[4, 4], 130), true);
    let w2 = Var::leaf(randn(&[4, 4], 131), true);
    let x = Var::leaf(randn(&[3, 4], 132), true);
    let block = {
        let (w1, w2) = (w1.clone(), w2.clone());
        move |v: &[Var]| -> engine::Result<Vec<Var>> {
            let h = v[0].matmul(&w1)?.silu()?.dropout(0.2, 7, true)?;
            Ok(vec![h.matmul(&w2)?.tanh()?, h.sum(&[1], true)?])
        }
    };
    let plain = block(&[x.clone()]).unwrap();
    plain[0].mul(&plain[1]).unwrap().sum_all().unwrap().backward().unwrap();
    let want: Vec<Vec<f32>> = [&w1, &w2, &x].iter().map(|v| v.grad().unwrap().to_vec::<f32>().unwrap()).collect();
    for v in [&w1, &w2, &x] {
        v.zero_grad();
    }
    let outs = checkpoint(&[x.clone()], block).unwrap();
    outs[0].mul(&outs[1]).unwrap().sum_all().unwrap().backward().unwrap();
    for (v, want) in [&w1, &w2, &x].iter().zip(want) {
        assert_eq!(v.grad().unwrap().to_vec::<f32>().unwrap(), want);
    }
}

#[test]
fn shared_subexpressions_and_residuals() {
    // y is used by z and by the output, and z also depends on y: the backward must finish all of
    // y's consumers before passing y's gradient on (a topological order, not a plain DFS order).
    check("diamond", &[randn(&[3], 141)], |v| {
        let y = v[0].tanh()?;
        let z = y.mul(&v[0])?.sin()?;
        z.add(&y)?.mul(&y.exp()?)
    });
    check("residual chain", &[randn(&[2, 3], 142), randn(&[3, 3], 143)], |v| {
        let mut t = v[0].clone();
        for _ in 0..3 {
            t = t.add(&t.matmul(&v[1])?.tanh()?)?;
        }
        Ok(t)
    });
}

#[test]
fn gradcheck_rejects_a_wrong_rule() {
    // exp with the gradient of the identity: the check must fail and name the op's input.
    let wrong = |v: &[Var]| -> engine::Result<Var> { Ok(Var::from_op("wrong_exp", v[0].value().exp()?, &[&v[0]], |g, _| Ok(vec![Some(g.clone())]))) };
    let e = gradcheck("wrong", &[randn(&[4], 140)], wrong, GradcheckOptions::default()).unwrap_err().to_string();
    assert!(e.contains("gradcheck wrong: input 0"), "{e}");
}
