//! MTCNN face detection (P-Net, R-Net, O-Net) exactly as facenet-pytorch 2.6.0 builds and runs it
//! (models/mtcnn.py, models/utils/detect_face.py), with the weights that package ships
//! (data/pnet.pt, rnet.pt, onet.pt, or their safetensors conversion with `pnet.`/`rnet.`/`onet.`
//! prefixes): boxes, probabilities and the 5 landmarks (eyes, nose, mouth corners) of every face.
//!
//! The pipeline, step by step as the reference (f32 arithmetic in the same order, so boxes that
//! are floored or truncated land on the same pixel):
//! 1. Pyramid: scales m·factor^k, m = 12 / min_face_size, while min(H, W)·scale >= 12; each level is
//!    the image area-resized (adaptive average pooling, = F.interpolate(mode="area")) to
//!    (int(H·s + 1), int(W·s + 1)) and normalised (x - 127.5) / 128.
//! 2. P-Net per level; every output cell with face probability >= thresholds[0] becomes a box
//!    floor((2·(x, y) + 1) / s), floor((2·(x, y) + 12) / s) with its 4 regression offsets; NMS (IoU
//!    0.5) per level, then NMS (IoU 0.7) over all levels (torchvision nms: areas without +1,
//!    suppression when IoU > threshold, scores sorted descending, stable).
//! 3. Regression with the box size (x2 - x1), squaring (`rerec`), integer crop bounds (`pad`:
//!    truncation, clamped to [1, W] x [1, H]); crops [y-1, ey) x [x-1, ex) area-resized to 24x24;
//!    R-Net; probability > thresholds[1]; NMS 0.7; regression with the size (x2 - x1 + 1); rerec.
//! 4. The same crops at 48x48 through O-Net; probability > thresholds[2]; landmarks
//!    (w·lx + x1 - 1, h·ly + y1 - 1) of the box before its regression; regression; NMS with the
//!    "Min" overlap (intersection over the smaller area, +1 areas, kept when <= 0.7).
//! 5. Faces ordered largest box first (MTCNN.detect with select_largest=True).
//!
//! An image with no face gives an empty list (`detect`) or None (`largest_face`), never a guess.
//! Where the reference would misbehave — a crop that falls entirely outside the image, which
//! facenet-pytorch skips without dropping its box — the box is rejected.

use std::path::Path;

use autograd::{no_grad, Var};
use engine::{Error, Result, Tensor};

use crate::nn::{Conv2d, Linear};
use crate::nn_face::PRelu;
use crate::rgb_image::RgbImage;
use crate::weights::{Weights, WeightsOptions};

/// MTCNN's detection settings (facenet-pytorch defaults).
#[derive(Clone, Copy, Debug)]
pub struct MtcnnConfig {
    pub min_face_size: f64,
    pub thresholds: [f32; 3],
    pub factor: f64,
}

impl Default for MtcnnConfig {
    fn default() -> Self {
        MtcnnConfig { min_face_size: 20.0, thresholds: [0.6, 0.7, 0.7], factor: 0.709 }
    }
}

/// One detected face, in pixel coordinates of the input image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Face {
    /// [x1, y1, x2, y2].
    pub bbox: [f32; 4],
    pub prob: f32,
    /// (x, y) of the left eye, right eye, nose, left and right mouth corners.
    pub landmarks: [[f32; 2]; 5],
}

fn conv(w: &Weights, name: &str, cin: usize, cout: usize, k: usize) -> Result<Conv2d> {
    Conv2d::load(&w.pp(name), cin, cout, k, 1, 0, true)
}

fn prelu(w: &Weights, name: &str, c: usize) -> Result<PRelu> {
    PRelu::load(&w.pp(name), c)
}

fn max_pool(x: &Var, k: usize) -> Result<Var> {
    x.max_pool2d([k, k], [2, 2], [0, 0], true)
}

/// [N, C, H, W] -> [N, W·H·C] in the reference's order (x.permute(0, 3, 2, 1) then flatten).
fn flatten_whc(x: &Var) -> Result<Var> {
    let n = x.shape()[0];
    x.permute(&[0, 3, 2, 1])?.contiguous()?.reshape(&[n, x.elem_count() / n.max(1)])
}

pub struct PNet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4_1: Conv2d,
    conv4_2: Conv2d,
}

impl PNet {
    pub fn load(w: &Weights) -> Result<PNet> {
        Ok(PNet {
            conv1: conv(w, "conv1", 3, 10, 3)?,
            prelu1: prelu(w, "prelu1", 10)?,
            conv2: conv(w, "conv2", 10, 16, 3)?,
            prelu2: prelu(w, "prelu2", 16)?,
            conv3: conv(w, "conv3", 16, 32, 3)?,
            prelu3: prelu(w, "prelu3", 32)?,
            conv4_1: conv(w, "conv4_1", 32, 2, 1)?,
            conv4_2: conv(w, "conv4_2", 32, 4, 1)?,
        })
    }

    /// x [N, 3, H, W] (normalised) -> (box regression [N, 4, h, w], softmax probabilities [N, 2, h, w]).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        no_grad(|| {
            let x = Var::constant(x.clone());
            let x = max_pool(&self.prelu1.forward(&self.conv1.forward(&x)?)?, 2)?;
            let x = self.prelu2.forward(&self.conv2.forward(&x)?)?;
            let x = self.prelu3.forward(&self.conv3.forward(&x)?)?;
            let a = self.conv4_1.forward(&x)?.softmax(1)?;
            let b = self.conv4_2.forward(&x)?;
            Ok((b.value().clone(), a.value().clone()))
        })
    }
}

pub struct RNet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    dense4: Linear,
    prelu4: PRelu,
    dense5_1: Linear,
    dense5_2: Linear,
}

impl RNet {
    pub fn load(w: &Weights) -> Result<RNet> {
        Ok(RNet {
            conv1: conv(w, "conv1", 3, 28, 3)?,
            prelu1: prelu(w, "prelu1", 28)?,
            conv2: conv(w, "conv2", 28, 48, 3)?,
            prelu2: prelu(w, "prelu2", 48)?,
            conv3: conv(w, "conv3", 48, 64, 2)?,
            prelu3: prelu(w, "prelu3", 64)?,
            dense4: Linear::load(&w.pp("dense4"), 576, 128, true)?,
            prelu4: prelu(w, "prelu4", 128)?,
            dense5_1: Linear::load(&w.pp("dense5_1"), 128, 2, true)?,
            dense5_2: Linear::load(&w.pp("dense5_2"), 128, 4, true)?,
        })
    }

    /// x [N, 3, 24, 24] -> (regression [N, 4], probabilities [N, 2]).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        no_grad(|| {
            let x = Var::constant(x.clone());
            let x = max_pool(&self.prelu1.forward(&self.conv1.forward(&x)?)?, 3)?;
            let x = max_pool(&self.prelu2.forward(&self.conv2.forward(&x)?)?, 3)?;
            let x = self.prelu3.forward(&self.conv3.forward(&x)?)?;
            let x = self.prelu4.forward(&self.dense4.forward(&flatten_whc(&x)?)?)?;
            let a = self.dense5_1.forward(&x)?.softmax(1)?;
            let b = self.dense5_2.forward(&x)?;
            Ok((b.value().clone(), a.value().clone()))
        })
    }
}

pub struct ONet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4: Conv2d,
    prelu4: PRelu,
    dense5: Linear,
    prelu5: PRelu,
    dense6_1: Linear,
    dense6_2: Linear,
    dense6_3: Linear,
}

impl ONet {
    pub fn load(w: &Weights) -> Result<ONet> {
        Ok(ONet {
            conv1: conv(w, "conv1", 3, 32, 3)?,
            prelu1: prelu(w, "prelu1", 32)?,
            conv2: conv(w, "conv2", 32, 64, 3)?,
            prelu2: prelu(w, "prelu2", 64)?,
            conv3: conv(w, "conv3", 64, 64, 3)?,
            prelu3: prelu(w, "prelu3", 64)?,
            conv4: conv(w, "conv4", 64, 128, 2)?,
            prelu4: prelu(w, "prelu4", 128)?,
            dense5: Linear::load(&w.pp("dense5"), 1152, 256, true)?,
            prelu5: prelu(w, "prelu5", 256)?,
            dense6_1: Linear::load(&w.pp("dense6_1"), 256, 2, true)?,
            dense6_2: Linear::load(&w.pp("dense6_2"), 256, 4, true)?,
            dense6_3: Linear::load(&w.pp("dense6_3"), 256, 10, true)?,
        })
    }

    /// x [N, 3, 48, 48] -> (regression [N, 4], landmarks [N, 10] (5 x then 5 y, relative to the
    /// box), probabilities [N, 2]).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        no_grad(|| {
            let x = Var::constant(x.clone());
            let x = max_pool(&self.prelu1.forward(&self.conv1.forward(&x)?)?, 3)?;
            let x = max_pool(&self.prelu2.forward(&self.conv2.forward(&x)?)?, 3)?;
            let x = max_pool(&self.prelu3.forward(&self.conv3.forward(&x)?)?, 2)?;
            let x = self.prelu4.forward(&self.conv4.forward(&x)?)?;
            let x = self.prelu5.forward(&self.dense5.forward(&flatten_whc(&x)?)?)?;
            let a = self.dense6_1.forward(&x)?.softmax(1)?;
            let b = self.dense6_2.forward(&x)?;
            let c = self.dense6_3.forward(&x)?;
            Ok((b.value().clone(), c.value().clone(), a.value().clone()))
        })
    }
}

/// A candidate box: [x1, y1, x2, y2], score, regression offsets.
#[derive(Clone, Copy, Debug)]
struct Cand {
    b: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

/// Indices into `c` kept by torchvision's nms (IoU, no +1), in descending score order.
fn nms_iou(c: &[Cand], iou: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| c[b].score.partial_cmp(&c[a].score).unwrap_or(std::cmp::Ordering::Equal));
    let area = |k: usize| (c[k].b[2] - c[k].b[0]) * (c[k].b[3] - c[k].b[1]);
    let mut suppressed = vec![false; c.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let ia = area(i);
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let w = (c[i].b[2].min(c[j].b[2]) - c[i].b[0].max(c[j].b[0])).max(0.0);
            let h = (c[i].b[3].min(c[j].b[3]) - c[i].b[1].max(c[j].b[1])).max(0.0);
            let inter = w * h;
            let ovr = inter / (ia + area(j) - inter);
            if ovr as f64 > iou {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// facenet-pytorch's nms_numpy with the "Min" overlap: +1 areas, intersection over the smaller
/// area, boxes kept when the overlap is <= threshold; highest score first.
fn nms_min(c: &[Cand], threshold: f32) -> Vec<usize> {
    let area: Vec<f32> = c.iter().map(|k| (k.b[2] - k.b[0] + 1.0) * (k.b[3] - k.b[1] + 1.0)).collect();
    // np.argsort(s) ascending, then taken from the end.
    let mut rest: Vec<usize> = (0..c.len()).collect();
    rest.sort_by(|&a, &b| c[a].score.partial_cmp(&c[b].score).unwrap_or(std::cmp::Ordering::Equal));
    let mut pick = Vec::new();
    while let Some(i) = rest.pop() {
        pick.push(i);
        rest.retain(|&j| {
            let w = (c[i].b[2].min(c[j].b[2]) - c[i].b[0].max(c[j].b[0]) + 1.0).max(0.0);
            let h = (c[i].b[3].min(c[j].b[3]) - c[i].b[1].max(c[j].b[1]) + 1.0).max(0.0);
            w * h / area[i].min(area[j]) <= threshold
        });
    }
    pick
}

/// Squares each box around its centre with side max(w, h) (`rerec`).
fn rerec(c: &mut Cand) {
    let h = c.b[3] - c.b[1];
    let w = c.b[2] - c.b[0];
    let l = w.max(h);
    c.b[0] = c.b[0] + w * 0.5 - l * 0.5;
    c.b[1] = c.b[1] + h * 0.5 - l * 0.5;
    c.b[2] = c.b[0] + l;
    c.b[3] = c.b[1] + l;
}

/// Box regression by the candidate's offsets with the size (x2 - x1 + 1) (`bbreg`).
fn bbreg(c: &mut Cand) {
    let reg = c.reg;
    let w = c.b[2] - c.b[0] + 1.0;
    let h = c.b[3] - c.b[1] + 1.0;
    c.b = [c.b[0] + reg[0] * w, c.b[1] + reg[1] * h, c.b[2] + reg[2] * w, c.b[3] + reg[3] * h];
}

/// The crop rectangle [y0, y1) x [x0, x1) of a box (`pad`: truncation toward zero, 1-based
/// clamping), None when it is empty.
fn crop_bounds(c: &Cand, w: usize, h: usize) -> Option<(usize, usize, usize, usize)> {
    let t = |v: f32| v.trunc() as i64;
    let (x, y) = (t(c.b[0]).max(1), t(c.b[1]).max(1));
    let (ex, ey) = (t(c.b[2]).min(w as i64), t(c.b[3]).min(h as i64));
    if ey > y - 1 && ex > x - 1 {
        Some(((y - 1) as usize, ey as usize, (x - 1) as usize, ex as usize))
    } else {
        None
    }
}

/// (x - 127.5) / 128 (exactly: the scale is a power of two).
fn normalise(x: &Tensor) -> Result<Tensor> {
    x.affine(0.0078125, -127.5 * 0.0078125)
}

pub struct Mtcnn {
    pub pnet: PNet,
    pub rnet: RNet,
    pub onet: ONet,
    pub config: MtcnnConfig,
}

impl Mtcnn {
    /// The three nets from their weight stores (key names as facenet-pytorch's state dicts).
    pub fn load(pnet: &Weights, rnet: &Weights, onet: &Weights) -> Result<Mtcnn> {
        let m = Mtcnn { pnet: PNet::load(pnet)?, rnet: RNet::load(rnet)?, onet: ONet::load(onet)?, config: MtcnnConfig::default() };
        for w in [pnet, rnet, onet] {
            w.finish()?;
        }
        Ok(m)
    }

    /// From one file holding all three nets under `pnet.`, `rnet.`, `onet.` (safetensors or torch).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Mtcnn> {
        let w = Weights::from_files(&[path.as_ref()], WeightsOptions::default())?;
        let m = Mtcnn { pnet: PNet::load(&w.pp("pnet"))?, rnet: RNet::load(&w.pp("rnet"))?, onet: ONet::load(&w.pp("onet"))?, config: MtcnnConfig::default() };
        w.finish()?;
        Ok(m)
    }

    /// From facenet-pytorch's data folder (pnet.pt, rnet.pt, onet.pt, in torch's legacy pre-1.6
    /// format, which engine::io reads), exactly as the PyPI package ships it.
    pub fn from_facenet_dir(dir: impl AsRef<Path>) -> Result<Mtcnn> {
        let dir = dir.as_ref();
        let load = |n: &str| -> Result<Weights> {
            let path = dir.join(n);
            let (_, tensors) = engine::io::load_any(&path)?;
            // The conv and dense weights in these files are transposed views (converted from
            // another framework's layout); packing them once here gives the same contiguous
            // weights, and so bit-identical results, as the safetensors conversion.
            let tensors = tensors.into_iter().map(|(k, t)| Ok((k, t.contiguous()?))).collect::<Result<_>>()?;
            Ok(Weights::from_map(tensors, &path.display().to_string(), WeightsOptions::default()))
        };
        Mtcnn::load(&load("pnet.pt")?, &load("rnet.pt")?, &load("onet.pt")?)
    }

    /// Every face of `img`, largest box first; empty when there is none.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<Face>> {
        if img.width == 0 || img.height == 0 {
            return Err(Error::msg(format!("MTCNN: empty image {}x{}", img.width, img.height)));
        }
        let cfg = self.config;
        let (h, w) = (img.height, img.width);
        let image = img.to_tensor()?;

        // Stage 1: P-Net over the pyramid.
        let m = 12.0 / cfg.min_face_size;
        let mut minl = h.min(w) as f64 * m;
        let mut scales = Vec::new();
        let mut scale = m;
        while minl >= 12.0 {
            scales.push(scale);
            scale *= cfg.factor;
            minl *= cfg.factor;
        }
        let mut cands: Vec<Cand> = Vec::new();
        for &s in &scales {
            let (hs, ws) = ((h as f64 * s + 1.0) as usize, (w as f64 * s + 1.0) as usize);
            let level = normalise(&image.adaptive_avg_pool2d([hs, ws])?)?;
            let (reg, prob) = self.pnet.forward(&level)?;
            let (oh, ow) = (prob.shape()[2], prob.shape()[3]);
            let (reg, prob) = (reg.to_vec_f32()?, prob.to_vec_f32()?);
            let plane = oh * ow;
            let sf = s as f32;
            let mut level_cands = Vec::new();
            for y in 0..oh {
                for x in 0..ow {
                    let p = prob[plane + y * ow + x];
                    if p >= cfg.thresholds[0] {
                        let (bx, by) = (x as f32, y as f32);
                        let q1 = [((2.0 * bx + 1.0) / sf).floor(), ((2.0 * by + 1.0) / sf).floor()];
                        let q2 = [((2.0 * bx + 12.0) / sf).floor(), ((2.0 * by + 12.0) / sf).floor()];
                        let r = [0, 1, 2, 3].map(|k| reg[k * plane + y * ow + x]);
                        level_cands.push(Cand { b: [q1[0], q1[1], q2[0], q2[1]], score: p, reg: r });
                    }
                }
            }
            cands.extend(nms_iou(&level_cands, 0.5).into_iter().map(|i| level_cands[i]));
        }
        let mut boxes: Vec<Cand> = nms_iou(&cands, 0.7).into_iter().map(|i| cands[i]).collect();
        for c in &mut boxes {
            let (rw, rh) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
            c.b = [c.b[0] + c.reg[0] * rw, c.b[1] + c.reg[1] * rh, c.b[2] + c.reg[2] * rw, c.b[3] + c.reg[3] * rh];
            rerec(c);
        }
        if boxes.is_empty() {
            return Ok(Vec::new());
        }

        // Stage 2: R-Net on 24x24 crops.
        let (boxes, crops) = self.crops(&image, boxes, w, h, 24)?;
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let (reg, prob) = self.rnet.forward(&crops)?;
        let (reg, prob) = (reg.to_vec_f32()?, prob.to_vec_f32()?);
        let mut passed = Vec::new();
        for (k, c) in boxes.iter().enumerate() {
            let score = prob[2 * k + 1];
            if score > cfg.thresholds[1] {
                passed.push(Cand { b: c.b, score, reg: [0, 1, 2, 3].map(|j| reg[4 * k + j]) });
            }
        }
        let mut boxes: Vec<Cand> = nms_iou(&passed, 0.7).into_iter().map(|i| passed[i]).collect();
        for c in &mut boxes {
            bbreg(c);
            rerec(c);
        }
        if boxes.is_empty() {
            return Ok(Vec::new());
        }

        // Stage 3: O-Net on 48x48 crops; landmarks.
        let (boxes, crops) = self.crops(&image, boxes, w, h, 48)?;
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let (reg, lm, prob) = self.onet.forward(&crops)?;
        let (reg, lm, prob) = (reg.to_vec_f32()?, lm.to_vec_f32()?, prob.to_vec_f32()?);
        let mut passed = Vec::new();
        let mut points = Vec::new();
        for (k, c) in boxes.iter().enumerate() {
            let score = prob[2 * k + 1];
            if score > cfg.thresholds[2] {
                let mut cand = Cand { b: c.b, score, reg: [0, 1, 2, 3].map(|j| reg[4 * k + j]) };
                let (wi, hi) = (cand.b[2] - cand.b[0] + 1.0, cand.b[3] - cand.b[1] + 1.0);
                let pts: [[f32; 2]; 5] = std::array::from_fn(|p| [wi * lm[10 * k + p] + cand.b[0] - 1.0, hi * lm[10 * k + 5 + p] + cand.b[1] - 1.0]);
                bbreg(&mut cand);
                passed.push(cand);
                points.push(pts);
            }
        }
        let mut faces: Vec<Face> = nms_min(&passed, 0.7).into_iter().map(|i| Face { bbox: passed[i].b, prob: passed[i].score, landmarks: points[i] }).collect();
        // Largest first: np.argsort(area)[::-1] (a stable sort reversed: equal areas come last-first).
        let area = |f: &Face| (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]);
        let mut order: Vec<usize> = (0..faces.len()).collect();
        order.sort_by(|&a, &b| area(&faces[a]).partial_cmp(&area(&faces[b])).unwrap_or(std::cmp::Ordering::Equal));
        order.reverse();
        faces = order.into_iter().map(|i| faces[i]).collect();
        Ok(faces)
    }

    /// The largest face, or None when the image has none.
    pub fn largest_face(&self, img: &RgbImage) -> Result<Option<Face>> {
        Ok(self.detect(img)?.into_iter().next())
    }

    /// The boxes whose crop is not empty, and their crops area-resized to size x size and
    /// normalised, [n, 3, size, size].
    fn crops(&self, image: &Tensor, boxes: Vec<Cand>, w: usize, h: usize, size: usize) -> Result<(Vec<Cand>, Tensor)> {
        let mut kept = Vec::new();
        let mut crops = Vec::new();
        for c in boxes {
            if let Some((y0, y1, x0, x1)) = crop_bounds(&c, w, h) {
                let crop = image.narrow(2, y0, y1 - y0)?.narrow(3, x0, x1 - x0)?.contiguous()?;
                crops.push(crop.adaptive_avg_pool2d([size, size])?);
                kept.push(c);
            }
        }
        if kept.is_empty() {
            return Ok((kept, Tensor::zeros(&[0, 3, size, size], engine::DType::F32, engine::Device::Cpu)?));
        }
        let refs: Vec<&Tensor> = crops.iter().collect();
        Ok((kept, normalise(&Tensor::cat(&refs, 0)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(b: [f32; 4], score: f32) -> Cand {
        Cand { b, score, reg: [0.0; 4] }
    }

    #[test]
    fn nms_iou_keeps_the_best_of_overlapping_boxes() {
        let c = [cand([0.0, 0.0, 10.0, 10.0], 0.8), cand([1.0, 1.0, 11.0, 11.0], 0.9), cand([20.0, 20.0, 30.0, 30.0], 0.7)];
        // IoU of the first two: 81 / 119 = 0.68.
        assert_eq!(nms_iou(&c, 0.5), vec![1, 2]);
        assert_eq!(nms_iou(&c, 0.7), vec![1, 0, 2]);
    }

    #[test]
    fn nms_min_uses_the_smaller_area() {
        // A small box inside a big one: the "Min" overlap is 1.
        let c = [cand([0.0, 0.0, 99.0, 99.0], 0.9), cand([10.0, 10.0, 19.0, 19.0], 0.95)];
        assert_eq!(nms_min(&c, 0.7), vec![1]);
    }

    #[test]
    fn rerec_and_crop_bounds() {
        let mut c = cand([10.0, 20.0, 30.0, 60.0], 1.0);
        rerec(&mut c);
        assert_eq!(c.b, [0.0, 20.0, 40.0, 60.0]);
        assert_eq!(crop_bounds(&c, 35, 100), Some((19, 60, 0, 35)));
        assert_eq!(crop_bounds(&cand([-50.0, -50.0, -10.0, -10.0], 1.0), 35, 100), None);
    }
}
