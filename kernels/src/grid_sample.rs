//! Affine sampling grids and bilinear grid sampling with zero padding, with PyTorch's formulas
//! (`F.affine_grid`, `F.grid_sample(mode="bilinear", padding_mode="zeros")`). Used by the face
//! alignment warp. Grid coordinates are normalized: -1 and 1 are the outer edges of the corner
//! pixels (align_corners=false) or the corner pixel centres (align_corners=true).

/// kernels/cuda/grid_sample.cu: affine grids, bilinear sampling and its backward. --fmad=false:
/// the coordinate math must round as the CPU's (a contracted multiply-add can move a sample point
/// across a pixel boundary).
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "grid_sample", code: include_str!("../cuda/grid_sample.cu"), options: &["--fmad=false"] };
/// Threads per block of every kernel in grid_sample.cu (GS_BLOCK).
pub const BLOCK: u32 = 256;

/// PyTorch's `linspace_from_neg_one`: n points from -1 to 1 (a single point is 0), scaled by
/// (n - 1) / n when the corners are not aligned.
pub fn base_coords(n: usize, align_corners: bool) -> Vec<f32> {
    if n <= 1 {
        return vec![0.0; n];
    }
    // torch.linspace fills the first half from the start and the second half from the end.
    let step = 2.0f32 / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            let v = if i < half { -1.0 + step * i as f32 } else { 1.0 - step * (n - 1 - i) as f32 };
            if align_corners { v } else { v * (n - 1) as f32 / n as f32 }
        })
        .collect()
}

/// The grid of one affine matrix `theta` (2x3, row-major) for an output of h x w: out[h, w, 2]
/// holds (x, y) = theta · (x_base, y_base, 1).
pub fn affine_grid_2d(theta: &[f32], h: usize, w: usize, align_corners: bool, out: &mut [f32]) {
    let xs = base_coords(w, align_corners);
    let ys = base_coords(h, align_corners);
    for (i, &y) in ys.iter().enumerate() {
        for (j, &x) in xs.iter().enumerate() {
            let o = &mut out[(i * w + j) * 2..][..2];
            o[0] = x * theta[0] + y * theta[1] + theta[2];
            o[1] = x * theta[3] + y * theta[4] + theta[5];
        }
    }
}

/// A normalized coordinate to a pixel coordinate along an axis of `size` pixels.
#[inline]
pub fn unnormalize(coord: f32, size: usize, align_corners: bool) -> f32 {
    if align_corners {
        (coord + 1.0) / 2.0 * (size - 1) as f32
    } else {
        ((coord + 1.0) * size as f32 - 1.0) / 2.0
    }
}

/// Bilinear sampling of one image x[c, h, w] at grid[oh, ow, 2] (x, y normalized), zeros outside:
/// out[c, oh, ow].
#[allow(clippy::too_many_arguments)]
pub fn grid_sample_bilinear(x: &[f32], c: usize, h: usize, w: usize, grid: &[f32], oh: usize, ow: usize, align_corners: bool, out: &mut [f32]) {
    let plane = oh * ow;
    for p in 0..plane {
        let ix = unnormalize(grid[2 * p], w, align_corners);
        let iy = unnormalize(grid[2 * p + 1], h, align_corners);
        let (x0, y0) = (ix.floor(), iy.floor());
        let (x1, y1) = (x0 + 1.0, y0 + 1.0);
        // Corner weights, as PyTorch: nw = (x1 - ix)(y1 - iy), and so on.
        let corners = [
            (x0, y0, (x1 - ix) * (y1 - iy)),
            (x1, y0, (ix - x0) * (y1 - iy)),
            (x0, y1, (x1 - ix) * (iy - y0)),
            (x1, y1, (ix - x0) * (iy - y0)),
        ];
        let mut taps = [(0usize, 0f32); 4];
        let mut n = 0;
        for (cx, cy, wt) in corners {
            if cx >= 0.0 && cy >= 0.0 && cx < w as f32 && cy < h as f32 {
                taps[n] = (cy as usize * w + cx as usize, wt);
                n += 1;
            }
        }
        for ch in 0..c {
            let src = &x[ch * h * w..(ch + 1) * h * w];
            let mut s = 0f32;
            for &(idx, wt) in &taps[..n] {
                s += src[idx] * wt;
            }
            out[ch * plane + p] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_grid_reproduces_the_image() {
        let (h, w) = (3, 4);
        let x: Vec<f32> = (0..h * w).map(|v| v as f32 * 0.5).collect();
        for align in [false, true] {
            let mut grid = vec![0f32; h * w * 2];
            affine_grid_2d(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], h, w, align, &mut grid);
            let mut out = vec![0f32; h * w];
            grid_sample_bilinear(&x, 1, h, w, &grid, h, w, align, &mut out);
            for (a, b) in out.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5, "align {align}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn outside_is_zero_and_halfway_is_the_mean() {
        let x = [1.0f32, 3.0];
        let mut out = [0f32; 3];
        // x = -1 with align_corners: first pixel centre; 0: halfway; 5: far outside.
        grid_sample_bilinear(&x, 1, 1, 2, &[-1.0, 0.0, 0.0, 0.0, 5.0, 0.0], 1, 3, true, &mut out);
        assert_eq!(out, [1.0, 2.0, 0.0]);
    }
}
