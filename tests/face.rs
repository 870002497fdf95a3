//! The face side of the identity loss against facenet-pytorch 2.6.0, the official lcm-lookahead
//! alignment and TreB1eN's IR-SE50 (fixtures from tests/fixtures/gen/face.py): MTCNN with its real
//! weights on a real photo, the 5-point similarity transform and the differentiable 112x112 warp,
//! the IR-SE50 embedding and the identity loss gradient, and weight-file errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use autograd::gradcheck::{gradcheck, GradcheckOptions};
use autograd::Var;
use engine::Tensor;
use lookahead::{assert_close, fixture_path, load_fixture};
use models::align::{self, Affine};
use models::arcface::{identity_loss, IrSe, IrSeConfig};
use models::mtcnn::{Face, Mtcnn};
use models::rgb_image::RgbImage;
use models::weights::{Weights, WeightsOptions};


fn fixture() -> BTreeMap<String, Tensor> {
    load_fixture("face.safetensors")
}

fn mtcnn() -> Mtcnn {
    Mtcnn::from_file(fixture_path("mtcnn.safetensors")).unwrap()
}

fn astronaut() -> RgbImage {
    RgbImage::open(fixture_path("face_astronaut.png")).unwrap()
}

/// The largest coordinate difference (px) between our faces and the reference's boxes/landmarks.
fn face_deviation(name: &str, faces: &[Face], boxes: &Tensor, landmarks: &Tensor) -> f32 {
    let n = boxes.shape()[0];
    assert_eq!(faces.len(), n, "{name}: number of faces {faces:?}");
    let (b, l) = (boxes.to_vec_f32().unwrap(), landmarks.to_vec_f32().unwrap());
    let mut worst = 0f32;
    for (i, f) in faces.iter().enumerate() {
        for k in 0..4 {
            worst = worst.max((f.bbox[k] - b[4 * i + k]).abs());
        }
        for p in 0..5 {
            for c in 0..2 {
                worst = worst.max((f.landmarks[p][c] - l[10 * i + 2 * p + c]).abs());
            }
        }
    }
    println!("{name}: {n} face(s), largest deviation from facenet-pytorch {worst:.4} px");
    worst
}

#[test]
fn mtcnn_nets_match_facenet_pytorch() {
    let f = fixture();
    let m = mtcnn();
    let (reg, prob) = m.pnet.forward(&f["pnet.in"]).unwrap();
    assert_close("pnet.reg", &reg, &f["pnet.reg"], 1e-5, 1e-4);
    assert_close("pnet.prob", &prob, &f["pnet.prob"], 1e-5, 1e-4);
    let (reg, prob) = m.rnet.forward(&f["rnet.in"]).unwrap();
    assert_close("rnet.reg", &reg, &f["rnet.reg"], 1e-5, 1e-4);
    assert_close("rnet.prob", &prob, &f["rnet.prob"], 1e-5, 1e-4);
    let (reg, lm, prob) = m.onet.forward(&f["onet.in"]).unwrap();
    assert_close("onet.reg", &reg, &f["onet.reg"], 1e-5, 1e-4);
    assert_close("onet.landmarks", &lm, &f["onet.landmarks"], 1e-5, 1e-4);
    assert_close("onet.prob", &prob, &f["onet.prob"], 1e-5, 1e-4);
}

#[test]
fn mtcnn_detects_the_astronaut_like_facenet_pytorch() {
    let f = fixture();
    let faces = mtcnn().detect(&astronaut()).unwrap();
    let dev = face_deviation("astronaut", &faces, &f["astronaut.boxes"], &f["astronaut.landmarks"]);
    assert!(dev <= 1.0, "boxes/landmarks differ by {dev} px");
    let probs = f["astronaut.probs"].to_vec_f32().unwrap();
    for (face, p) in faces.iter().zip(probs) {
        assert!((face.prob - p).abs() < 1e-4, "prob {} vs {p}", face.prob);
    }
}

#[test]
fn mtcnn_reports_no_face() {
    // The generator's gradient image, on which facenet-pytorch finds nothing.
    let (w, h) = (128usize, 96usize);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[((x * 2 + y) % 256) as u8, ((y * 2) % 256) as u8, ((x + 40) % 256) as u8]);
        }
    }
    let img = RgbImage::new(w, h, data).unwrap();
    let m = mtcnn();
    assert!(m.detect(&img).unwrap().is_empty());
    assert!(m.largest_face(&img).unwrap().is_none());
}

/// facenet-pytorch's data folder in the reference venv, when this machine has one.
fn facenet_data_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("FACENET_PYTORCH_DATA") {
        return Some(PathBuf::from(d));
    }
    let lib = PathBuf::from(std::env::var("HOME").ok()?).join(".cache/lookahead/ref-venv/lib");
    for entry in std::fs::read_dir(lib).ok()?.flatten() {
        let d = entry.path().join("site-packages/facenet_pytorch/data");
        if d.join("pnet.pt").exists() {
            return Some(d);
        }
    }
    None
}

#[test]
fn mtcnn_pt_files_equal_the_safetensors_conversion() {
    let Some(dir) = facenet_data_dir() else {
        lookahead::show("SKIPPED: facenet-pytorch's data folder not found (set FACENET_PYTORCH_DATA); the committed safetensors is used elsewhere");
        return;
    };
    let conv = engine::io::safetensors::load(fixture_path("mtcnn.safetensors")).unwrap();
    // facenet-pytorch ships these in the legacy (pre-1.6, non-zip) torch format; the committed
    // safetensors was converted from them by torch.load in tests/fixtures/gen/face.py.
    let mut n = 0;
    for net in ["pnet", "rnet", "onet"] {
        let (format, pt) = engine::io::load_any(dir.join(format!("{net}.pt"))).unwrap();
        assert_eq!(format, engine::io::Format::TorchLegacy, "{net}");
        assert_eq!(pt.len(), conv.keys().filter(|k| k.starts_with(&format!("{net}."))).count(), "{net}: key count");
        for (k, t) in &pt {
            let c = &conv[&format!("{net}.{k}")];
            assert_eq!(t.shape(), c.shape(), "{net}.{k}");
            assert_eq!(t.to_vec_f32().unwrap(), c.to_vec_f32().unwrap(), "{net}.{k}");
            n += 1;
        }
    }
    assert!(n > 40);
    // And the detector built from the .pt files finds the same face.
    let faces = Mtcnn::from_facenet_dir(&dir).unwrap().detect(&astronaut()).unwrap();
    assert_eq!(faces, mtcnn().detect(&astronaut()).unwrap());
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.to_vec_f32().unwrap().iter().zip(b.to_vec_f32().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn landmarks_of(t: &Tensor, face: usize) -> [[f32; 2]; 5] {
    let v = t.to_vec_f32().unwrap();
    std::array::from_fn(|p| [v[10 * face + 2 * p], v[10 * face + 2 * p + 1]])
}

fn points(t: &Tensor) -> Vec<[f32; 2]> {
    t.to_vec_f32().unwrap().chunks(2).map(|c| [c[0], c[1]]).collect()
}

fn affine_tensor(m: &Affine) -> Tensor {
    Tensor::from_vec(m.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(), &[2, 3], engine::Device::Cpu).unwrap()
}

/// The astronaut as the official code's input: [1, 3, H, W] in [-1, 1], (x / 255 - 0.5) / 0.5 in f32.
fn astronaut_unit() -> Var {
    let img = astronaut();
    let v: Vec<f32> = img.to_tensor().unwrap().to_vec_f32().unwrap().into_iter().map(|x| (x / 255.0 - 0.5) / 0.5).collect();
    Var::constant(Tensor::from_vec(v, &[1, 3, img.height, img.width], engine::Device::Cpu).unwrap())
}

#[test]
fn similarity_transform_matches_cp2tform() {
    let f = fixture();
    let tpl = align::template(112);
    for (src, m) in [("cp2tform.src", "cp2tform.m"), ("cp2tform.src_mirrored", "cp2tform.m_mirrored")] {
        let got = align::similarity_transform(&points(&f[src]), &tpl).unwrap();
        assert_close(m, &affine_tensor(&got), &f[m], 1e-4, 1e-5);
    }
    assert!(align::similarity_transform(&[[1.0, 1.0]; 5], &tpl).is_err(), "coincident points must be refused");
}

#[test]
fn aligned_crop_matches_the_reference_warp() {
    let f = fixture();
    let lm = landmarks_of(&f["astronaut.landmarks"], 0);
    let m = align::face_transform(&lm, 112).unwrap();
    assert_close("align.matrix", &affine_tensor(&m), &f["align.matrix"], 1e-4, 1e-5);
    let theta = align::warp_theta(&m, (384, 384), (112, 112)).unwrap();
    let theta = Tensor::from_vec(theta.iter().flatten().copied().collect::<Vec<_>>(), &[2, 3], engine::Device::Cpu).unwrap();
    assert_close("align.theta", &theta, &f["align.theta"], 1e-6, 1e-5);
    let crop = align::align_faces(&astronaut_unit(), &[lm]).unwrap();
    println!("aligned crop: largest deviation {:.2e}", max_abs_diff(crop.value(), &f["align.crop"]));
    assert_close("align.crop", crop.value(), &f["align.crop"], 1e-4, 0.0);
}

#[test]
fn official_extraction_matches_end_to_end() {
    let f = fixture();
    let faces = align::extract_faces(&astronaut_unit(), &mtcnn()).unwrap();
    assert_eq!(faces.indices, vec![0]);
    assert!(faces.missing.is_empty());
    // Landmarks of the padded image, back in the image's coordinates.
    let want: Vec<f32> = f["padded.landmarks"].to_vec_f32().unwrap().iter().map(|v| v - align::DETECTION_PAD as f32).collect();
    let got: Vec<f32> = faces.landmarks[0].iter().flatten().copied().collect();
    let dev = got.iter().zip(&want[..10]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("padded detection: largest landmark deviation {dev:.4} px");
    assert!(dev <= 1.0, "landmarks {got:?} vs {want:?}");
    let crop = faces.crops.unwrap();
    println!("official crop: largest deviation {:.2e}", max_abs_diff(crop.value(), &f["official.crop"]));
    assert_close("official.crop", crop.value(), &f["official.crop"], 1e-3, 0.0);
    // A batch image with no face is listed as missing, not warped.
    let grey = Var::constant(Tensor::zeros(&[1, 3, 64, 64], engine::DType::F32, engine::Device::Cpu).unwrap());
    let none = align::extract_faces(&grey, &mtcnn()).unwrap();
    assert!(none.crops.is_none() && none.indices.is_empty() && none.missing == vec![0]);
}

#[test]
fn warp_gradients_pass_gradcheck() {
    // A small image and landmarks placed in it: the whole alignment (transform, theta, affine grid,
    // bilinear sampling) differentiated with respect to the image.
    let (h, w) = (13usize, 11usize);
    let img: Vec<f32> = (0..2 * 3 * h * w).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let img = Tensor::from_vec(img, &[2, 3, h, w], engine::Device::Cpu).unwrap();
    let lm = [[[3.0, 4.0], [7.5, 4.2], [5.2, 6.5], [3.6, 9.0], [7.1, 9.3]], [[2.0, 3.0], [8.0, 3.5], [5.5, 6.0], [3.0, 10.0], [8.2, 9.5]]];
    let thetas: Vec<[[f32; 3]; 2]> = lm.iter().map(|l| align::warp_theta(&align::face_transform(l, 7).unwrap(), (h, w), (7, 7)).unwrap()).collect();
    gradcheck("face warp", &[img], |v| align::warp(&v[0], &thetas, (7, 7)), GradcheckOptions::default()).unwrap();
}

fn irse_config(f: &BTreeMap<String, Tensor>) -> IrSeConfig {
    let c = f["irse.config"].to_vec::<i64>().unwrap();
    let u = |i: usize| c[i] as usize;
    IrSeConfig { widths: [u(0), u(1), u(2), u(3)], units: [u(4), u(5), u(6), u(7)], embedding: u(8) }
}

#[test]
fn irse_embedding_and_identity_loss_gradient_match() {
    let f = fixture();
    let net = IrSe::from_file(fixture_path("face_irse.pth"), irse_config(&f)).unwrap();
    let x = Var::leaf(f["irse.in"].clone(), true);
    let emb = net.forward(&x).unwrap();
    println!("IR-SE embedding: largest deviation {:.2e}", max_abs_diff(emb.value(), &f["irse.emb"]));
    assert_close("irse.emb", emb.value(), &f["irse.emb"], 2e-5, 1e-4);
    let loss = identity_loss(&emb, &Var::constant(f["irse.target"].clone())).unwrap();
    assert_close("irse.loss", loss.value(), &f["irse.loss"], 2e-5, 1e-4);
    loss.mean_all().unwrap().backward().unwrap();
    let g = x.grad().unwrap();
    let scale = f["irse.in_grad"].to_vec_f32().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("identity-loss input gradient: largest deviation {:.2e} (largest value {scale:.2e})", max_abs_diff(&g, &f["irse.in_grad"]));
    assert_close("irse.in_grad", &g, &f["irse.in_grad"], 1e-3 * scale, 1e-3);
}

#[test]
fn irse50_loader_takes_the_full_size_state_dict() {
    // Every key and shape of TreB1eN's Backbone(50, 0.6, 'ir_se').state_dict(), as zeros.
    let text = std::fs::read_to_string(fixture_path("face_irse50_keys.json")).unwrap();
    let keys: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut map = BTreeMap::new();
    for k in &keys {
        let name = k["name"].as_str().unwrap().to_string();
        let shape: Vec<usize> = k["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let dtype = if name.ends_with("num_batches_tracked") { engine::DType::I64 } else { engine::DType::F32 };
        map.insert(name, Tensor::zeros(&shape, dtype, engine::Device::Cpu).unwrap());
    }
    assert_eq!(map.len(), 397);
    let w = Weights::from_map(map, "model_ir_se50 keys", WeightsOptions::default());
    let net = IrSe::load(&w, IrSeConfig::ir_se50()).unwrap();
    w.finish().unwrap();
    assert_eq!(net.config.unit_specs().len(), 24);
}

#[test]
fn broken_irse_checkpoints_name_the_keys() {
    let cfg = irse_config(&fixture());
    let e = IrSe::from_file(fixture_path("face_irse_partial.pth"), cfg).err().unwrap().to_string();
    for key in ["missing key(s)", "body.0.res_layer.1.weight", "body.2.shortcut_layer.0.weight", "output_layer.3.weight", "output_layer.4.running_var"] {
        assert!(e.contains(key), "{key} not in: {e}");
    }
    let e = IrSe::from_file(fixture_path("face_irse_badshape.pth"), cfg).err().unwrap().to_string();
    assert!(e.contains("expected [16] found [17] for key input_layer.2.weight"), "{e}");
}
