//! Backward of bilinear grid sampling with zero padding (`grid_sample::grid_sample_bilinear`):
//! gradients with respect to the image and to the normalized grid coordinates, with PyTorch's
//! formulas. The grid gradient is what makes the face-alignment warp differentiable.

use crate::grid_sample::unnormalize;

/// d(pixel coordinate) / d(normalized coordinate) along an axis of `size` pixels.
#[inline]
fn unnormalize_scale(size: usize, align_corners: bool) -> f32 {
    if align_corners {
        (size as f32 - 1.0) / 2.0
    } else {
        size as f32 / 2.0
    }
}

/// One image x[c, h, w], grid[oh, ow, 2], output gradient dy[c, oh, ow]. Adds into dx[c, h, w]
/// (the caller zeroes it) and overwrites dgrid[oh, ow, 2].
#[allow(clippy::too_many_arguments)]
pub fn grid_sample_bilinear_backward(x: &[f32], c: usize, h: usize, w: usize, grid: &[f32], oh: usize, ow: usize, align_corners: bool, dy: &[f32], dx: &mut [f32], dgrid: &mut [f32]) {
    let plane = oh * ow;
    let (sx, sy) = (unnormalize_scale(w, align_corners), unnormalize_scale(h, align_corners));
    for p in 0..plane {
        let ix = unnormalize(grid[2 * p], w, align_corners);
        let iy = unnormalize(grid[2 * p + 1], h, align_corners);
        let (x0, y0) = (ix.floor(), iy.floor());
        let (x1, y1) = (x0 + 1.0, y0 + 1.0);
        let inside = |cx: f32, cy: f32| cx >= 0.0 && cy >= 0.0 && cx < w as f32 && cy < h as f32;
        // (corner x, corner y, weight, d weight / d ix, d weight / d iy)
        let corners = [
            (x0, y0, (x1 - ix) * (y1 - iy), -(y1 - iy), -(x1 - ix)),
            (x1, y0, (ix - x0) * (y1 - iy), y1 - iy, -(ix - x0)),
            (x0, y1, (x1 - ix) * (iy - y0), -(iy - y0), x1 - ix),
            (x1, y1, (ix - x0) * (iy - y0), iy - y0, ix - x0),
        ];
        let (mut gix, mut giy) = (0f32, 0f32);
        for (cx, cy, wt, dwx, dwy) in corners {
            if !inside(cx, cy) {
                continue;
            }
            let idx = cy as usize * w + cx as usize;
            for ch in 0..c {
                let g = dy[ch * plane + p];
                dx[ch * h * w + idx] += wt * g;
                let v = x[ch * h * w + idx];
                gix += v * g * dwx;
                giy += v * g * dwy;
            }
        }
        dgrid[2 * p] = gix * sx;
        dgrid[2 * p + 1] = giy * sy;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid_sample::grid_sample_bilinear;

    #[test]
    fn gradients_match_central_differences() {
        let (c, h, w, oh, ow) = (2, 4, 5, 3, 2);
        let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 31) % 17) as f32 * 0.2 - 1.0).collect();
        // Points away from pixel-grid lines (bilinear weights have kinks there), some outside.
        let grid: Vec<f32> = (0..oh * ow * 2).map(|i| ((i * 37) % 23) as f32 * 0.097 - 1.13).collect();
        let dy: Vec<f32> = (0..c * oh * ow).map(|i| (i % 7) as f32 * 0.3 - 0.8).collect();
        for align in [false, true] {
            let loss = |x: &[f32], g: &[f32]| {
                let mut out = vec![0f32; c * oh * ow];
                grid_sample_bilinear(x, c, h, w, g, oh, ow, align, &mut out);
                out.iter().zip(&dy).map(|(&o, &d)| o as f64 * d as f64).sum::<f64>()
            };
            let mut dx = vec![0f32; x.len()];
            let mut dg = vec![0f32; grid.len()];
            grid_sample_bilinear_backward(&x, c, h, w, &grid, oh, ow, align, &dy, &mut dx, &mut dg);
            let e = 1e-3f32;
            for i in 0..grid.len() {
                let (mut a, mut b) = (grid.clone(), grid.clone());
                a[i] += e;
                b[i] -= e;
                let want = (loss(&x, &a) - loss(&x, &b)) / (2.0 * e as f64);
                assert!((dg[i] as f64 - want).abs() < 1e-2 * (1.0 + want.abs()), "align {align} dgrid[{i}] {} vs {want}", dg[i]);
            }
            for i in 0..x.len() {
                let (mut a, mut b) = (x.clone(), x.clone());
                a[i] += e;
                b[i] -= e;
                let want = (loss(&a, &grid) - loss(&b, &grid)) / (2.0 * e as f64);
                assert!((dx[i] as f64 - want).abs() < 1e-2, "dx[{i}]");
            }
        }
    }
}
