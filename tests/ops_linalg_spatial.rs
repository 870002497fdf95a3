//! matmul/linear, conv2d, pools, upsample, affine_grid + grid_sample and attention against PyTorch
//! (fixture: tests/fixtures/gen/ops_linalg_spatial.py). Views (transposes, broadcasts) are built
//! here the same way the generator built them.

use std::collections::BTreeMap;

use engine::{Conv2dParams, DType, Tensor};
use lookahead::{assert_close, load_fixture};

fn fx() -> BTreeMap<String, Tensor> {
    load_fixture("ops_linalg_spatial.safetensors")
}

fn get<'a>(f: &'a BTreeMap<String, Tensor>, k: &str) -> &'a Tensor {
    f.get(k).unwrap_or_else(|| panic!("fixture has no tensor `{k}`"))
}

#[test]
fn matmul_broadcast_batch_and_transposed_views() {
    let f = fx();
    let bt = get(&f, "mm.b_store").transpose(-1, -2).unwrap();
    assert!(!bt.is_contiguous());
    let got = get(&f, "mm.a").matmul(&bt).unwrap();
    assert_close("matmul [3,1,5,7]x[4,7,6]^T", &got, get(&f, "mm.out"), 1e-5, 1e-5);

    let ct = get(&f, "mm2.c").t().unwrap();
    assert_close("matmul c^T d", &ct.matmul(get(&f, "mm2.d")).unwrap(), get(&f, "mm2.out"), 1e-5, 1e-5);
    assert_close("matmul d v", &get(&f, "mm2.d").matmul(get(&f, "mm2.v")).unwrap(), get(&f, "mm2.dv"), 1e-5, 1e-5);

    let bth = get(&f, "mmh.b_store").transpose(-1, -2).unwrap();
    let got = get(&f, "mmh.a").matmul(&bth).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    assert_close("matmul bf16", &got, get(&f, "mmh.out"), 2e-2, 2e-2);

    assert!(get(&f, "mm.a").matmul(get(&f, "mm.b_store")).is_err(), "inner dims 7 vs 6 must be an error");
}

#[test]
fn linear_with_and_without_bias() {
    let f = fx();
    let (x, w, b) = (get(&f, "lin.x"), get(&f, "lin.w"), get(&f, "lin.b"));
    assert_close("linear", &x.linear(w, Some(b)).unwrap(), get(&f, "lin.out"), 1e-5, 1e-5);
    assert_close("linear no bias", &x.linear(w, None).unwrap(), get(&f, "lin.out_nobias"), 1e-5, 1e-5);
    // A non-contiguous input (a transposed view of the same values).
    let xt = x.transpose(0, 1).unwrap().contiguous().unwrap().transpose(0, 1).unwrap();
    assert_close("linear strided x", &xt.linear(w, Some(b)).unwrap(), get(&f, "lin.out"), 1e-5, 1e-5);
}

#[test]
fn conv2d_against_torch() {
    let f = fx();
    let x = get(&f, "conv.x");
    let p = |s: [usize; 2], pad: [usize; 2], d: [usize; 2], g: usize| Conv2dParams { stride: s, padding: pad, dilation: d, groups: g };
    let cases = [
        ("conv.s2p1g2", "conv.w_g2", Some("conv.b"), p([2, 2], [1, 1], [1, 1], 2)),
        ("conv.s1p0", "conv.w", None, Conv2dParams::default()),
        ("conv.s2p1_nobias", "conv.w", None, Conv2dParams::new(2, 1)),
        ("conv.dil2", "conv.w", None, p([1, 2], [2, 1], [2, 2], 1)),
        ("conv.1x1", "conv.w1x1", Some("conv.b1x1"), Conv2dParams::default()),
        ("conv.dw", "conv.wdw", None, p([1, 1], [1, 1], [1, 1], 4)),
    ];
    for (want, w, b, params) in cases {
        let got = x.conv2d(get(&f, w), b.map(|b| get(&f, b)), params).unwrap();
        assert_close(want, &got, get(&f, want), 1e-4, 1e-4);
    }
    // channels-last strides (NHWC memory, NCHW logical shape)
    let x_nhwc = x.permute(&[0, 2, 3, 1]).unwrap().contiguous().unwrap().permute(&[0, 3, 1, 2]).unwrap();
    let got = x_nhwc.conv2d(get(&f, "conv.w_g2"), Some(get(&f, "conv.b")), cases[0].3).unwrap();
    assert_close("conv channels-last", &got, get(&f, "conv.s2p1g2"), 1e-4, 1e-4);
    // f16
    let got = get(&f, "convh.x").conv2d(get(&f, "convh.w"), Some(get(&f, "convh.b")), cases[0].3).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    assert_close("conv f16", &got, get(&f, "convh.out"), 1e-2, 1e-2);
    // errors
    assert!(x.conv2d(get(&f, "conv.w_g2"), None, Conv2dParams::default()).is_err(), "groups mismatch");
}

#[test]
fn pools_and_upsample_against_torch() {
    let f = fx();
    let x = get(&f, "pool.x");
    assert_close("max k3 s2 ceil", &x.max_pool2d([3, 3], [2, 2], [0, 0], true).unwrap(), get(&f, "pool.max_k3s2_ceil"), 0.0, 0.0);
    assert_close("max k3 s2", &x.max_pool2d([3, 3], [2, 2], [0, 0], false).unwrap(), get(&f, "pool.max_k3s2"), 0.0, 0.0);
    assert_close("max k2 s2 ceil", &x.max_pool2d([2, 2], [2, 2], [0, 0], true).unwrap(), get(&f, "pool.max_k2s2_ceil"), 0.0, 0.0);
    assert_close("max k3 s2 p1 ceil", &x.max_pool2d([3, 3], [2, 2], [1, 1], true).unwrap(), get(&f, "pool.max_k3s2p1_ceil"), 0.0, 0.0);
    assert_close("avg k3 s2 p1", &x.avg_pool2d([3, 3], [2, 2], [1, 1]).unwrap(), get(&f, "pool.avg_k3s2p1"), 1e-6, 1e-5);
    assert_close("avg k2 s2", &x.avg_pool2d([2, 2], [2, 2], [0, 0]).unwrap(), get(&f, "pool.avg_k2s2"), 1e-6, 1e-5);
    assert_close("adaptive 4x5", &x.adaptive_avg_pool2d([4, 5]).unwrap(), get(&f, "pool.adaptive_4x5"), 1e-6, 1e-5);
    assert_close("adaptive 7x7", &x.adaptive_avg_pool2d([7, 7]).unwrap(), get(&f, "pool.adaptive_7x7"), 1e-6, 1e-5);
    assert_close("adaptive 1x1", &x.adaptive_avg_pool2d([1, 1]).unwrap(), get(&f, "pool.adaptive_1x1"), 1e-6, 1e-5);
    assert_close("nearest 2x", &x.upsample_nearest2d(22, 18).unwrap(), get(&f, "up.nearest_2x"), 0.0, 0.0);
    assert_close("nearest 17x13", &x.upsample_nearest2d(17, 13).unwrap(), get(&f, "up.nearest_17x13"), 0.0, 0.0);
    assert_close("nearest 5x4", &x.upsample_nearest2d(5, 4).unwrap(), get(&f, "up.nearest_5x4"), 0.0, 0.0);
}

#[test]
fn affine_grid_and_grid_sample_against_torch() {
    let f = fx();
    let (x, theta) = (get(&f, "gs.x"), get(&f, "gs.theta"));
    for ac in [false, true] {
        let grid = Tensor::affine_grid(theta, [2, 3, 7, 9], ac).unwrap();
        assert_close(&format!("affine_grid ac={ac}"), &grid, get(&f, &format!("gs.grid_ac{}", ac as u8)), 1e-6, 1e-5);
        // Sample with torch's grid so that the two checks are independent.
        let got = x.grid_sample(get(&f, &format!("gs.grid_ac{}", ac as u8)), ac).unwrap();
        assert_close(&format!("grid_sample ac={ac}"), &got, get(&f, &format!("gs.out_ac{}", ac as u8)), 1e-5, 1e-5);
    }
}

#[test]
fn attention_against_torch() {
    let f = fx();
    let q = get(&f, "sdpa.q_store").transpose(1, 2).unwrap();
    let (k, v) = (get(&f, "sdpa.k"), get(&f, "sdpa.v"));
    let got = Tensor::scaled_dot_product_attention(&q, k, v, Some(get(&f, "sdpa.mask")), None).unwrap();
    assert_close("sdpa additive mask", &got, get(&f, "sdpa.out"), 1e-5, 1e-5);
    let got = Tensor::scaled_dot_product_attention(&q, k, v, None, Some(0.2)).unwrap();
    assert_close("sdpa scale 0.2", &got, get(&f, "sdpa.out_scale"), 1e-5, 1e-5);
    let got = Tensor::scaled_dot_product_attention(&q, k, v, Some(get(&f, "sdpa.bool_mask")), None).unwrap();
    assert_close("sdpa bool mask", &got, get(&f, "sdpa.out_bool"), 1e-5, 1e-5);
}
