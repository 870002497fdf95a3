//! Face alignment for the identity loss, as the official lcm-lookahead code does it
//! (utils/utils.py `extract_faces_and_landmarks`): MTCNN's 5 landmarks, a similarity transform to
//! a fixed 112x112 template, and a differentiable affine warp of the image (kornia `warp_affine`:
//! bilinear, zero padding, align_corners=True), so the identity loss's gradient reaches the image.
//!
//! The transform is matlab_cp2tform's `get_similarity_transform_for_cv2(src, dst, reflective=True)`
//! (not skimage's Umeyama estimate): a least-squares fit of the inverse map dst -> src over
//! (sc, ss, tx, ty), inverted; the mirrored fit is tried too and the one with the smaller residual
//! kept. That code reflects the destination points in place before computing both residuals, so
//! both are measured against the mirrored template; we keep that behaviour, because it decides
//! which transform the official code uses.
//!
//! The template is the official one: insightface's ArcFace points except the right eye's x, which
//! the official code has as 72.5318 (insightface: 73.5318).
//!
//! Normalised coordinates: with align_corners=True, -1 and +1 are the centres of the first and last
//! pixels, so pixel x maps to 2x/(W-1) - 1 (kornia's `normalize_homography`). For a map M of pixel
//! coordinates src -> dst, affine_grid needs the map of normalised coordinates dst -> src:
//! theta = N_src · M^-1 · N_dst^-1 (first two rows), N(h, w) = [[2/(w-1), 0, -1], [0, 2/(h-1), -1], [0, 0, 1]].

use autograd::Var;
use engine::{DType, Error, Result, Tensor};

use crate::mtcnn::Mtcnn;
use crate::rgb_image::RgbImage;

/// The official template in a 112x112 crop (REFERNCE_FACIAL_POINTS_RELATIVE · 112).
pub const TEMPLATE_112: [[f64; 2]; 5] = [[38.29459953, 51.69630051], [72.53179932, 51.50139999], [56.02519989, 71.73660278], [41.54930115, 92.3655014], [70.72990036, 92.20410156]];

/// The crop size of the identity network.
pub const FACE_SIZE: usize = 112;

/// Padding the official code adds around each image before detection (torchvision Pad(200)).
pub const DETECTION_PAD: usize = 200;

/// The template for an `size` x `size` crop, computed as the official code does: the relative
/// points (÷112) in f32, times the size in f32.
pub fn template(size: usize) -> [[f32; 2]; 5] {
    TEMPLATE_112.map(|p| p.map(|v| (v / 112.0) as f32 * size as f32))
}

/// A 2x3 affine map of pixel coordinates: (x, y) -> (m[0]·(x, y, 1), m[1]·(x, y, 1)).
pub type Affine = [[f64; 3]; 2];

/// 3x3 matrices in the row-vector convention of matlab_cp2tform: [x y 1] = [u v 1] · T.
type Mat3 = [[f64; 3]; 3];

fn mat3_mul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

fn mat3_inv(m: &Mat3) -> Result<Mat3> {
    let c = |i: usize, j: usize| {
        let (r0, r1) = ((i + 1) % 3, (i + 2) % 3);
        let (c0, c1) = ((j + 1) % 3, (j + 2) % 3);
        m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]
    };
    let det = m[0][0] * c(0, 0) + m[0][1] * c(0, 1) + m[0][2] * c(0, 2);
    if det.abs() < 1e-300 || !det.is_finite() {
        return Err(Error::msg(format!("face alignment: singular transform {m:?}")));
    }
    // inverse = adjugate / det; the adjugate is the transposed cofactor matrix.
    Ok(std::array::from_fn(|i| std::array::from_fn(|j| c(j, i) / det)))
}

/// findNonreflectiveSimilarity(uv, xy): solves X·r = U in the least-squares sense for
/// r = (sc, ss, tx, ty), X = [[x, y, 1, 0]; [y, -x, 0, 1]], U = [u; v]; returns T = inv(Tinv) with
/// its last column set to (0, 0, 1).
fn nonreflective_similarity(uv: &[[f64; 2]], xy: &[[f64; 2]]) -> Result<Mat3> {
    // Normal equations (X^T X) r = X^T U: X has full column rank for two or more distinct points,
    // and with 4 unknowns the solution equals numpy's SVD-based lstsq to rounding.
    let mut a = [[0f64; 4]; 4];
    let mut b = [0f64; 4];
    let rows = xy.iter().zip(uv).flat_map(|(p, q)| [([p[0], p[1], 1.0, 0.0], q[0]), ([p[1], -p[0], 0.0, 1.0], q[1])]);
    for (x, u) in rows {
        for i in 0..4 {
            b[i] += x[i] * u;
            for j in 0..4 {
                a[i][j] += x[i] * x[j];
            }
        }
    }
    // Gaussian elimination with partial pivoting.
    let scale = a.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    for col in 0..4 {
        let piv = (col..4).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        if a[piv][col].abs() <= 1e-12 * scale.max(1e-300) {
            return Err(Error::msg("face alignment: the landmarks need at least two distinct points (cp2tform:twoUniquePointsReq)"));
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..4 {
            let f = a[r][col] / a[col][col];
            let pivot_row = a[col];
            for (x, p) in a[r].iter_mut().zip(pivot_row).skip(col) {
                *x -= f * p;
            }
            b[r] -= f * b[col];
        }
    }
    let mut r = [0f64; 4];
    for i in (0..4).rev() {
        r[i] = (b[i] - (i + 1..4).map(|j| a[i][j] * r[j]).sum::<f64>()) / a[i][i];
    }
    let [sc, ss, tx, ty] = r;
    let tinv = [[sc, -ss, 0.0], [ss, sc, 0.0], [tx, ty, 1.0]];
    let mut t = mat3_inv(&tinv)?;
    for row in &mut t {
        row[2] = 0.0;
    }
    t[2][2] = 1.0;
    Ok(t)
}

/// tformfwd: [u v 1] · T, first two columns.
fn apply(t: &Mat3, uv: &[[f64; 2]]) -> Vec<[f64; 2]> {
    uv.iter().map(|p| [p[0] * t[0][0] + p[1] * t[1][0] + t[2][0], p[0] * t[0][1] + p[1] * t[1][1] + t[2][1]]).collect()
}

fn residual(pred: &[[f64; 2]], want: &[[f64; 2]]) -> f64 {
    pred.iter().zip(want).map(|(p, w)| (p[0] - w[0]).powi(2) + (p[1] - w[1]).powi(2)).sum::<f64>().sqrt()
}

/// The similarity transform (pixel coordinates src -> dst) of the official code: matlab_cp2tform
/// `get_similarity_transform_for_cv2(src, dst, reflective=True)`, as the 2x3 matrix cv2 (and
/// kornia) take. Computed in f64 from the f32 points, as numpy does.
pub fn similarity_transform(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Affine> {
    if src.len() != dst.len() || src.len() < 2 {
        return Err(Error::msg(format!("face alignment: {} source and {} template points (need equal counts, at least 2)", src.len(), dst.len())));
    }
    let uv: Vec<[f64; 2]> = src.iter().map(|p| [p[0] as f64, p[1] as f64]).collect();
    let xy: Vec<[f64; 2]> = dst.iter().map(|p| [p[0] as f64, p[1] as f64]).collect();
    // Landmarks that (nearly) coincide have no similarity onto the template (the reference fails
    // inverting a singular matrix); NaN landmarks are refused here too.
    let spread = |pts: &[[f64; 2]]| -> f64 {
        let n = pts.len() as f64;
        let c = pts.iter().fold([0.0, 0.0], |a, p| [a[0] + p[0] / n, a[1] + p[1] / n]);
        pts.iter().map(|p| (p[0] - c[0]).hypot(p[1] - c[1])).fold(0.0, f64::max)
    };
    let (su, sx) = (spread(&uv), spread(&xy));
    if !(su > 1e-6 && sx > 1e-6) {
        return Err(Error::msg(format!("face alignment: degenerate points (spread {su} px of the landmarks, {sx} px of the template)")));
    }
    let trans1 = nonreflective_similarity(&uv, &xy)?;
    let xy_r: Vec<[f64; 2]> = xy.iter().map(|p| [-p[0], p[1]]).collect();
    let trans2r = nonreflective_similarity(&uv, &xy_r)?;
    let reflect_y = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let trans2 = mat3_mul(&trans2r, &reflect_y);
    // Both residuals against the mirrored points (the reference's in-place reflection).
    let norm1 = residual(&apply(&trans1, &uv), &xy_r);
    let norm2 = residual(&apply(&trans2, &uv), &xy_r);
    let t = if norm1 <= norm2 { trans1 } else { trans2 };
    // cv2 form: trans[:, 0:2].T
    Ok([[t[0][0], t[1][0], t[2][0]], [t[0][1], t[1][1], t[2][1]]])
}

/// The 5 landmarks' transform onto the template of a `size` x `size` crop.
pub fn face_transform(landmarks: &[[f32; 2]; 5], size: usize) -> Result<Affine> {
    similarity_transform(landmarks, &template(size))
}

fn normaliser(h: usize, w: usize) -> Result<Mat3> {
    if h < 2 || w < 2 {
        return Err(Error::msg(format!("face alignment: image {h}x{w} is too small to warp")));
    }
    Ok([[2.0 / (w - 1) as f64, 0.0, -1.0], [0.0, 2.0 / (h - 1) as f64, -1.0], [0.0, 0.0, 1.0]])
}

/// The affine_grid theta (align_corners=True) that warps an image of `src_hw` by `m` into an
/// output of `out_hw` (see the module notes). `m` is rounded to f32 first, as the official code
/// hands kornia an f32 matrix.
pub fn warp_theta(m: &Affine, src_hw: (usize, usize), out_hw: (usize, usize)) -> Result<[[f32; 3]; 2]> {
    // Column-vector convention here: p' = M p.
    let m3: Mat3 = [m[0].map(|v| v as f32 as f64), m[1].map(|v| v as f32 as f64), [0.0, 0.0, 1.0]];
    let n_src = normaliser(src_hw.0, src_hw.1)?;
    let n_dst = normaliser(out_hw.0, out_hw.1)?;
    let theta = mat3_mul(&mat3_mul(&n_src, &mat3_inv(&m3)?), &mat3_inv(&n_dst)?);
    Ok([theta[0].map(|v| v as f32), theta[1].map(|v| v as f32)])
}

/// Warps `images` [N, C, H, W] with one theta per image into [N, C, out_h, out_w] (bilinear,
/// zeros outside, align_corners=True). Differentiable with respect to the images.
pub fn warp(images: &Var, thetas: &[[[f32; 3]; 2]], out_hw: (usize, usize)) -> Result<Var> {
    let s = images.shape();
    if s.len() != 4 || s[0] != thetas.len() {
        return Err(Error::msg(format!("face warp: images {s:?} need [N, C, H, W] with N = {} (one transform per image)", thetas.len())));
    }
    let flat: Vec<f32> = thetas.iter().flat_map(|t| t.iter().flatten().copied()).collect();
    let theta = Tensor::from_f32_vec(flat, &[s[0], 2, 3], DType::F32)?.to_dtype(images.dtype())?.to_device(images.device())?;
    let grid = Var::affine_grid(&Var::constant(theta), [s[0], s[1], out_hw.0, out_hw.1], true)?;
    images.grid_sample(&grid, true)
}

/// Aligns the face with `landmarks` in each image of `images` [N, C, H, W] to the 112x112 template.
pub fn align_faces(images: &Var, landmarks: &[[[f32; 2]; 5]]) -> Result<Var> {
    let s = images.shape();
    if s.len() != 4 {
        return Err(Error::msg(format!("face alignment: images {s:?} need [N, C, H, W]")));
    }
    let thetas = landmarks.iter().map(|l| warp_theta(&face_transform(l, FACE_SIZE)?, (s[2], s[3]), (FACE_SIZE, FACE_SIZE))).collect::<Result<Vec<_>>>()?;
    warp(images, &thetas, (FACE_SIZE, FACE_SIZE))
}

/// The faces found in a batch: `crops` [V, C, 112, 112] for the images `indices` (in order), the
/// landmarks used (in the input image's pixel coordinates), and the images without a face.
pub struct AlignedFaces {
    pub crops: Option<Var>,
    pub indices: Vec<usize>,
    pub landmarks: Vec<[[f32; 2]; 5]>,
    pub missing: Vec<usize>,
}

/// The official `extract_faces_and_landmarks` for images [N, 3, H, W] in [-1, 1]: each image is
/// padded by 200 (0, i.e. mid-grey), turned into u8 as ((x·0.5 + 0.5)·255) truncated (values
/// outside [-1, 1] are clamped first, where the reference's cast is undefined), MTCNN's largest face
/// gives the landmarks, and the unpadded image is warped by the equivalent transform (the zero
/// padding of grid_sample stands for the padded border). Images without a face are listed in
/// `missing`, never warped with a guessed transform.
pub fn extract_faces(images: &Var, mtcnn: &Mtcnn) -> Result<AlignedFaces> {
    let s = images.shape().to_vec();
    if s.len() != 4 || s[1] != 3 {
        return Err(Error::msg(format!("extract_faces: images {s:?} need [N, 3, H, W]")));
    }
    let (n, h, w) = (s[0], s[2], s[3]);
    let values = images.value().to_dtype(DType::F32)?.to_vec_f32()?;
    let (ph, pw) = (h + 2 * DETECTION_PAD, w + 2 * DETECTION_PAD);
    let mut out = AlignedFaces { crops: None, indices: Vec::new(), landmarks: Vec::new(), missing: Vec::new() };
    let mut crops = Vec::new();
    for i in 0..n {
        // (0·0.5 + 0.5)·255 = 127.5 -> 127 on the padded border.
        let mut data = vec![127u8; ph * pw * 3];
        let img = &values[i * 3 * h * w..(i + 1) * 3 * h * w];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let v = (img[c * h * w + y * w + x] * 0.5 + 0.5) * 255.0;
                    data[((y + DETECTION_PAD) * pw + x + DETECTION_PAD) * 3 + c] = v.clamp(0.0, 255.0) as u8;
                }
            }
        }
        let Some(face) = mtcnn.largest_face(&RgbImage::new(pw, ph, data)?)? else {
            out.missing.push(i);
            continue;
        };
        let padded = face_transform(&face.landmarks, FACE_SIZE)?;
        // Source pixel (x, y) of the unpadded image is (x + 200, y + 200) of the padded one.
        let pad = DETECTION_PAD as f64;
        let m: Affine = padded.map(|r| [r[0], r[1], r[2] + pad * (r[0] + r[1])]);
        let theta = warp_theta(&m, (h, w), (FACE_SIZE, FACE_SIZE))?;
        crops.push(warp(&images.narrow(0, i, 1)?, &[theta], (FACE_SIZE, FACE_SIZE))?);
        out.indices.push(i);
        out.landmarks.push(face.landmarks.map(|p| [p[0] - DETECTION_PAD as f32, p[1] - DETECTION_PAD as f32]));
    }
    if !crops.is_empty() {
        let refs: Vec<&Var> = crops.iter().collect();
        out.crops = Some(Var::cat(&refs, 0)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exact_similarity_is_recovered() {
        // dst = s·R·src + t with s = 1.5, a 20° rotation, t = (4, -3).
        let (s, a) = (1.5f64, 20f64.to_radians());
        let src = [[10.0f32, 12.0], [30.0, 11.0], [21.0, 25.0], [12.0, 35.0], [29.0, 36.0]];
        let dst: Vec<[f32; 2]> = src.iter().map(|p| {
            let (x, y) = (p[0] as f64, p[1] as f64);
            [(s * (a.cos() * x - a.sin() * y) + 4.0) as f32, (s * (a.sin() * x + a.cos() * y) - 3.0) as f32]
        }).collect();
        let m = similarity_transform(&src, &dst).unwrap();
        let want = [[s * a.cos(), -s * a.sin(), 4.0], [s * a.sin(), s * a.cos(), -3.0]];
        for r in 0..2 {
            for c in 0..3 {
                assert!((m[r][c] - want[r][c]).abs() < 1e-4, "{m:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn the_identity_map_gives_the_identity_theta() {
        let id: Affine = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let t = warp_theta(&id, (112, 112), (112, 112)).unwrap();
        assert_eq!(t, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
        // Half-size output of the same frame: the grid still spans the whole source.
        let half: Affine = [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]];
        let t = warp_theta(&half, (9, 9), (5, 5)).unwrap();
        for (g, w) in t.iter().flatten().zip([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]) {
            assert!((g - w).abs() < 1e-6, "{t:?}");
        }
        assert!(warp_theta(&id, (1, 5), (112, 112)).is_err());
    }
}
