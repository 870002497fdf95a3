//! Reductions, softmax, norms, GEGLU, PReLU and shape/index ops against PyTorch
//! (fixture: tests/fixtures/gen/ops_reduce_norm.py). Inputs named `*_t` are stored transposed and
//! viewed with .t() here, as the generator does, so the ops see non-contiguous inputs.

use std::collections::BTreeMap;

use engine::{DType, PadMode, Tensor};
use lookahead::{assert_close, load_fixture};

/// f32 results: statistics differ from PyTorch's only by f32 rounding.
const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-5;
/// bf16/f16 results: one rounding of the output (about 2^-8 relative) on either side.
const ATOL_H: f32 = 1e-2;
const RTOL_H: f32 = 1e-2;

struct Fx(BTreeMap<String, Tensor>);

impl Fx {
    fn load() -> Fx {
        Fx(load_fixture("ops_reduce_norm.safetensors"))
    }
    fn get(&self, name: &str) -> Tensor {
        self.0.get(name).unwrap_or_else(|| panic!("fixture has no tensor `{name}`")).clone()
    }
    fn check(&self, name: &str, got: &Tensor) {
        let want = self.get(name);
        assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
        let (atol, rtol) = if want.dtype() == DType::F32 { (ATOL, RTOL) } else { (ATOL_H, RTOL_H) };
        assert_close(name, got, &want, atol, rtol);
    }
    /// Exact comparison for index results and data-movement ops.
    fn check_exact(&self, name: &str, got: &Tensor) {
        let want = self.get(name);
        assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
        assert_eq!(got.shape(), want.shape(), "{name}: shape");
        match want.dtype() {
            DType::I64 => assert_eq!(got.to_vec::<i64>().unwrap(), want.to_vec::<i64>().unwrap(), "{name}"),
            _ => {
                let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
                assert!(g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: {g:?} vs {w:?}");
            }
        }
    }
}

#[test]
fn reductions() {
    let f = Fx::load();
    let x = f.get("r.x");
    f.check("r.sum_1", &x.sum(&[1], false).unwrap());
    f.check("r.sum_02_keep", &x.sum(&[0, 2], true).unwrap());
    f.check("r.sum_m1", &x.sum(&[-1], false).unwrap());
    f.check("r.mean_12", &x.mean(&[1, 2], false).unwrap());
    f.check("r.var_0_unbiased", &x.var(&[0], false, true).unwrap());
    f.check("r.var_2_biased_keep", &x.var(&[2], true, false).unwrap());
    f.check_exact("r.max_1", &x.max(1, false).unwrap());
    f.check_exact("r.min_m1_keep", &x.min(-1, true).unwrap());
    f.check_exact("r.argmax_2", &x.argmax(2, false).unwrap());
    f.check("r.sum_all", &x.sum_all().unwrap());
    f.check("r.mean_all", &x.mean_all().unwrap());

    let xt = f.get("rt.x_t").t().unwrap();
    assert!(!xt.is_contiguous());
    f.check("rt.sum_0", &xt.sum(&[0], false).unwrap());
    f.check("rt.mean_1", &xt.mean(&[1], false).unwrap());
    f.check("rt.var_0", &xt.var(&[0], false, true).unwrap());
    f.check_exact("rt.max_0", &xt.max(0, false).unwrap());
    f.check_exact("rt.argmax_1", &xt.argmax(1, false).unwrap());

    let xb = f.get("rb.x");
    f.check("rb.sum_1", &xb.sum(&[1], false).unwrap());
    f.check("rb.mean_0", &xb.mean(&[0], false).unwrap());
    f.check_exact("rb.max_1", &xb.max(1, false).unwrap());
    f.check_exact("rb.argmax_0", &xb.argmax(0, false).unwrap());

    let xi = f.get("ri.x");
    f.check_exact("ri.max_1", &xi.max(1, false).unwrap());
    f.check_exact("ri.min_0", &xi.min(0, false).unwrap());
    f.check_exact("ri.argmax_1", &xi.argmax(1, false).unwrap());
}

#[test]
fn softmax_and_log_softmax() {
    let f = Fx::load();
    let big = f.get("s.big");
    f.check("s.big_softmax", &big.softmax(-1).unwrap());
    f.check("s.big_log_softmax", &big.log_softmax(-1).unwrap());
    let one = f.get("s.one");
    f.check("s.one_softmax", &one.softmax(1).unwrap());
    f.check("s.one_log_softmax", &one.log_softmax(1).unwrap());
    let mid = f.get("s.mid");
    f.check("s.mid_softmax_1", &mid.softmax(1).unwrap());
    f.check("s.mid_log_softmax_0", &mid.log_softmax(0).unwrap());
    f.check("s.t_softmax", &f.get("s.x_t").t().unwrap().softmax(-1).unwrap());
    let masked = f.get("s.masked");
    let sm = masked.softmax(-1).unwrap();
    assert!(sm.to_vec::<f32>().unwrap().iter().all(|v| !v.is_nan()), "partly masked rows must not give NaN");
    f.check("s.masked_softmax", &sm);
    f.check("s.masked_log_softmax", &masked.log_softmax(-1).unwrap());
    let xb = f.get("s.bf16");
    f.check("s.bf16_softmax", &xb.softmax(-1).unwrap());
    f.check("s.bf16_log_softmax", &xb.log_softmax(-1).unwrap());
    f.check("s.f16_softmax", &f.get("s.f16").softmax(0).unwrap());
    assert!(big.softmax(2).is_err());
}

#[test]
fn layer_norm() {
    let f = Fx::load();
    let (x, w, b) = (f.get("ln.x"), f.get("ln.w"), f.get("ln.b"));
    f.check("ln.out", &x.layer_norm(Some(&w), Some(&b), 1e-5).unwrap());
    f.check("ln.out_plain", &x.layer_norm(None, None, 1e-6).unwrap());
    f.check("ln.out_t", &f.get("ln.x_t").t().unwrap().layer_norm(Some(&w), Some(&b), 1e-5).unwrap());
    f.check("ln.offset_out", &f.get("ln.offset").layer_norm(None, None, 1e-5).unwrap());
    let got = f.get("ln.bf16").layer_norm(Some(&f.get("ln.bf16_w")), Some(&f.get("ln.bf16_b")), 1e-5).unwrap();
    f.check("ln.bf16_out", &got);
    let e = x.layer_norm(Some(&f.get("gn.w")), None, 1e-5).unwrap_err().to_string();
    assert!(e.contains("[6]") && e.contains("[17]"), "{e}");
}

#[test]
fn group_norm() {
    let f = Fx::load();
    let (x, w, b) = (f.get("gn.x"), f.get("gn.w"), f.get("gn.b"));
    f.check("gn.out_3", &x.group_norm(3, Some(&w), Some(&b), 1e-5, false).unwrap());
    f.check("gn.out_3_silu", &x.group_norm(3, Some(&w), Some(&b), 1e-5, true).unwrap());
    f.check("gn.out_2_plain", &x.group_norm(2, None, None, 1e-6, false).unwrap());
    let nhwc = f.get("gn.x_nhwc").permute(&[0, 3, 1, 2]).unwrap();
    assert!(!nhwc.is_contiguous());
    f.check("gn.out_nhwc", &nhwc.group_norm(3, Some(&w), Some(&b), 1e-5, false).unwrap());
    f.check("gn.r3_out", &f.get("gn.r3").group_norm(4, None, None, 1e-5, false).unwrap());
    let (xb, wb, bb) = (f.get("gn.bf16"), f.get("gn.bf16_w"), f.get("gn.bf16_b"));
    f.check("gn.bf16_out", &xb.group_norm(4, Some(&wb), Some(&bb), 1e-5, false).unwrap());
    f.check("gn.bf16_out_silu", &xb.group_norm(4, Some(&wb), Some(&bb), 1e-5, true).unwrap());

    // Errors: a weight of the wrong shape names it; groups must divide the channels.
    let e = x.group_norm(3, Some(&f.get("ln.w")), None, 1e-5, false).unwrap_err().to_string();
    assert!(e.contains("[17]") && e.contains("[6]"), "{e}");
    let e = x.group_norm(3, None, Some(&f.get("bn.mean")), 1e-5, false).unwrap_err().to_string();
    assert!(e.contains("bias") && e.contains("[4]"), "{e}");
    let e = x.group_norm(4, None, None, 1e-5, false).unwrap_err().to_string();
    assert!(e.contains("4 groups do not divide 6 channels"), "{e}");
    assert!(x.group_norm(0, None, None, 1e-5, false).is_err());
    assert!(f.get("ln.w").group_norm(1, None, None, 1e-5, false).is_err());
}

/// The forward's saved statistics (group_norm_stats): the same y as group_norm, (mean, rstd) per
/// (sample, group) as f32 [N, G, 2]; the backward given them equals the backward recomputing
/// them (dx, dweight, dbias: the saved values are the recomputed ones rounded to f32); statistics
/// of the wrong shape or dtype are refused with an error naming them.
#[test]
fn group_norm_saved_statistics() {
    let f = Fx::load();
    let (x, w, b) = (f.get("gn.x"), f.get("gn.w"), f.get("gn.b"));
    let nhwc = f.get("gn.x_nhwc").permute(&[0, 3, 1, 2]).unwrap();
    let (xb, wb, bb) = (f.get("gn.bf16"), f.get("gn.bf16_w"), f.get("gn.bf16_b"));
    // Sample 1 at an offset of 300: the saved mean must carry it.
    let offset = x.add(&Tensor::from_slice(&[0.0f32, 300.0], &[2, 1, 1, 1], x.device()).unwrap()).unwrap();
    for (label, x, w, b, groups) in [("f32", &x, &w, &b, 3usize), ("offset", &offset, &w, &b, 2), ("channels-last", &nhwc, &w, &b, 3), ("bf16", &xb, &wb, &bb, 4)] {
        let n = x.shape()[0];
        for silu in [false, true] {
            let (y, stats) = x.group_norm_stats(groups, Some(w), Some(b), 1e-5, silu).unwrap();
            assert_eq!(y.to_vec_f32().unwrap(), x.group_norm(groups, Some(w), Some(b), 1e-5, silu).unwrap().to_vec_f32().unwrap(), "{label}: y");
            assert_eq!((stats.dtype(), stats.shape()), (DType::F32, &[n, groups, 2][..]), "{label}: statistics");
            // Against the mean and biased variance of each group (f64 here).
            let xs = x.contiguous().unwrap().to_vec_f32().unwrap();
            let st = stats.to_vec::<f32>().unwrap();
            for (q, grp) in xs.chunks(xs.len() / (n * groups)).enumerate() {
                let m = grp.iter().map(|&v| v as f64).sum::<f64>() / grp.len() as f64;
                let var = grp.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / grp.len() as f64;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                assert!((st[2 * q] as f64 - m).abs() <= 1e-6 * m.abs().max(1.0), "{label}: group {q} mean {} vs {m}", st[2 * q]);
                assert!((st[2 * q + 1] as f64 - rstd).abs() <= 1e-6 * rstd, "{label}: group {q} rstd {} vs {rstd}", st[2 * q + 1]);
            }
            let dy = Tensor::randn(x.shape(), DType::F32, x.device(), 7).unwrap().to_dtype(x.dtype()).unwrap();
            let (dx0, dw0, db0) = x.group_norm_backward(&dy, groups, Some(w), Some(b), 1e-5, silu, None, true).unwrap();
            let (dx1, dw1, db1) = x.group_norm_backward(&dy, groups, Some(w), Some(b), 1e-5, silu, Some(&stats), true).unwrap();
            // The saved mean is the f64 one rounded to f32: near 300 that moves xhat by up to
            // 2^-16 rstd (as PyTorch's f32 saved statistics do), so the offset case gets 1e-4.
            let tight = match (x.dtype(), label) {
                (DType::F32, "offset") => 1e-4,
                (DType::F32, _) => 1e-5,
                _ => 1e-2,
            };
            assert_close(&format!("{label} silu={silu} dx saved vs recomputed"), &dx1, &dx0, tight, tight);
            let tight = if label == "offset" { 1e-4 } else { 1e-5 };
            assert_close(&format!("{label} silu={silu} dweight saved vs recomputed"), &dw1.unwrap(), &dw0.unwrap(), tight, tight);
            assert_close(&format!("{label} silu={silu} dbias saved vs recomputed"), &db1.unwrap(), &db0.unwrap(), tight, tight);
            // The statistics are used, not recomputed: other ones give another dx.
            let shifted = stats.add_scalar(0.25).unwrap();
            let (dx2, _, _) = x.group_norm_backward(&dy, groups, Some(w), Some(b), 1e-5, silu, Some(&shifted), false).unwrap();
            assert_ne!(dx2.to_vec_f32().unwrap(), dx0.to_vec_f32().unwrap(), "{label}: dx ignores the saved statistics");
        }
    }

    // Bad statistics: an error naming the argument and what was expected, never a panic.
    let (_, stats) = x.group_norm_stats(3, Some(&w), Some(&b), 1e-5, false).unwrap();
    let dy = Tensor::ones(x.shape(), DType::F32, x.device()).unwrap();
    let bad_shapes = [stats.reshape(&[2, 6]).unwrap(), Tensor::zeros(&[2, 2, 2], DType::F32, x.device()).unwrap(), Tensor::zeros(&[2, 3, 3], DType::F32, x.device()).unwrap()];
    for bad in &bad_shapes {
        let e = x.group_norm_backward(&dy, 3, Some(&w), Some(&b), 1e-5, false, Some(bad), true).unwrap_err().to_string();
        assert!(e.contains("stats") && e.contains("[N, G, 2]") && e.contains("[2, 3, 2]") && e.contains(&format!("{:?}", bad.shape())), "{e}");
    }
    let e = x.group_norm_backward(&dy, 3, Some(&w), Some(&b), 1e-5, false, Some(&stats.to_dtype(DType::BF16).unwrap()), true).unwrap_err().to_string();
    assert!(e.contains("stats") && e.contains("bf16") && e.contains("f32"), "{e}");
}

#[test]
fn batch_norm_geglu_prelu() {
    let f = Fx::load();
    let (mean, var, w, b) = (f.get("bn.mean"), f.get("bn.var"), f.get("bn.w"), f.get("bn.b"));
    f.check("bn.out", &f.get("bn.x").batch_norm(&mean, &var, Some(&w), Some(&b), 1e-5).unwrap());
    f.check("bn.out2_plain", &f.get("bn.x2").batch_norm(&mean, &var, None, None, 1e-3).unwrap());
    assert!(f.get("gn.x").batch_norm(&mean, &var, None, None, 1e-5).is_err());

    f.check("geglu.out", &f.get("geglu.x").geglu().unwrap());
    f.check("geglu.bf16_out", &f.get("geglu.bf16").geglu().unwrap());

    let x = f.get("prelu.x");
    f.check("prelu.out3", &x.prelu(&f.get("prelu.w3")).unwrap());
    f.check("prelu.out1", &x.prelu(&f.get("prelu.w1")).unwrap());
    assert!(x.prelu(&f.get("bn.mean")).is_err());
}

#[test]
fn cat_stack_split_chunk() {
    let f = Fx::load();
    let (a, b) = (f.get("cat.a"), f.get("cat.b"));
    f.check_exact("cat.ab_1", &Tensor::cat(&[&a, &b], 1).unwrap());
    let ct = f.get("cat.c_t").t().unwrap();
    f.check_exact("cat.cd_m1", &Tensor::cat(&[&ct, &f.get("cat.d")], -1).unwrap());
    let a16 = f.get("cat.a16");
    f.check_exact("cat.aa16_0", &Tensor::cat(&[&a16, &a16], 0).unwrap());
    assert!(Tensor::cat(&[&a, &b], 0).is_err());
    assert!(Tensor::cat(&[&a, &a16], 0).is_err());

    let (p, qt) = (f.get("stack.p"), f.get("stack.q_t").t().unwrap());
    f.check_exact("stack.pq_0", &Tensor::stack(&[&p, &qt], 0).unwrap());
    f.check_exact("stack.pq_m1", &Tensor::stack(&[&p, &qt], -1).unwrap());
    assert!(Tensor::stack(&[&p, &a], 0).is_err());

    let x = f.get("split.x");
    let parts = x.split(&[1, 2, 4], 1).unwrap();
    assert_eq!(parts.len(), 3);
    for (i, part) in parts.iter().enumerate() {
        f.check_exact(&format!("split.s{i}"), part);
    }
    let chunks = x.chunk(3, 1).unwrap();
    assert_eq!(chunks.len(), 3);
    for (i, part) in chunks.iter().enumerate() {
        f.check_exact(&format!("split.c{i}"), part);
    }
    assert!(x.split(&[1, 2], 1).is_err());
}

#[test]
fn index_select_gather_embedding() {
    let f = Fx::load();
    let x = f.get("is.x");
    f.check_exact("is.out0", &x.index_select(0, &f.get("is.i0")).unwrap());
    f.check_exact("is.out1", &x.index_select(1, &f.get("is.i1")).unwrap());
    f.check_exact("is.out_t", &f.get("is.x_t").t().unwrap().index_select(-1, &f.get("is.i1")).unwrap());
    f.check_exact("is.outi", &f.get("is.xi").index_select(0, &f.get("is.i0")).unwrap());
    // i1 = [5, 1] selects columns of x [5, 6]; as rows, index 5 is out of range.
    let e = x.index_select(0, &f.get("is.i1")).unwrap_err().to_string();
    assert!(e.contains("index 5") && e.contains("size 5"), "{e}");
    assert!(x.index_select(0, &f.get("is.x")).is_err(), "float indices are an error");

    let g = f.get("ga.x");
    f.check_exact("ga.out1", &g.gather(1, &f.get("ga.i1")).unwrap());
    f.check_exact("ga.out2", &g.gather(2, &f.get("ga.i2")).unwrap());
    // ga.i1 holds values in 0..4 (it is valid along dim 1); along dim 0 (size 3) the 3s are not.
    let e = g.gather(0, &f.get("ga.i1")).unwrap_err().to_string();
    assert!(e.contains("out of range") && e.contains("size 3"), "{e}");

    let table = f.get("emb.table");
    f.check_exact("emb.out", &table.embedding(&f.get("emb.ids")).unwrap());
    let e = table.embedding(&Tensor::from_vec(vec![10i64], &[1], engine::Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("index 10") && e.contains("size 10"), "{e}");
}

#[test]
fn pad_modes() {
    let f = Fx::load();
    let x = f.get("pad.x");
    f.check_exact("pad.const_1_2", &x.pad(&[1, 2], PadMode::Constant, 0.5).unwrap());
    f.check_exact("pad.const_1_0_2_1", &x.pad(&[1, 0, 2, 1], PadMode::Constant, -2.0).unwrap());
    f.check_exact("pad.const_6", &x.pad(&[0, 1, 1, 0, 2, 1], PadMode::Constant, 0.0).unwrap());
    f.check_exact("pad.reflect_2_1_1_2", &x.pad(&[2, 1, 1, 2], PadMode::Reflect, 0.0).unwrap());
    f.check_exact("pad.replicate_1_1_2_0", &x.pad(&[1, 1, 2, 0], PadMode::Replicate, 0.0).unwrap());
    f.check_exact("pad.reflect3_2_3", &f.get("pad.x3").pad(&[2, 3], PadMode::Reflect, 0.0).unwrap());
    let xt = f.get("pad.x_t").transpose(-1, -2).unwrap();
    f.check_exact("pad.t_replicate_2_1", &xt.pad(&[2, 1], PadMode::Replicate, 0.0).unwrap());
    assert!(x.pad(&[5, 0], PadMode::Reflect, 0.0).is_err(), "reflect pad must be smaller than the dim");
    assert!(x.pad(&[1, 1, 1], PadMode::Constant, 0.0).is_err());
}

#[test]
fn masked_fill() {
    let f = Fx::load();
    let x = f.get("mf.x");
    f.check_exact("mf.out_b", &x.masked_fill(&f.get("mf.m_b"), f32::NEG_INFINITY).unwrap());
    f.check_exact("mf.out_f", &x.masked_fill(&f.get("mf.m_f"), 3.5).unwrap());
    f.check_exact("mf.bf16_out_f", &f.get("mf.bf16").masked_fill(&f.get("mf.m_f"), -1.25).unwrap());
    assert!(x.masked_fill(&f.get("mf.x"), 0.0).is_err(), "a float mask is an error");
    assert!(x.masked_fill(&f.get("is.i0").to_dtype(DType::U8).unwrap(), 0.0).is_err(), "mask must broadcast");
}
