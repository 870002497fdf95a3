//! Backward passes of the pooling and nearest-upsampling planes of `pool`: each scatters the
//! output gradient back over the input positions the forward read, with the same index arithmetic.
//! `dx` is overwritten. Max pooling recomputes the winner of each window from the input (the
//! first maximum in row-major window order, as the forward finds it; NaN wins).

use crate::pool::{adaptive_range, nearest_source, Pool2d};

/// Gradient of `pool::avg_pool2d_plane` (count_include_pad=True).
pub fn avg_pool2d_backward_plane(dy: &[f32], h: usize, w: usize, p: Pool2d, oh: usize, ow: usize, dx: &mut [f32]) {
    dx.fill(0.0);
    let [kh, kw] = p.kernel;
    let [sh, sw] = p.stride;
    let [ph, pw] = p.padding;
    for oy in 0..oh {
        let y0 = (oy * sh) as isize - ph as isize;
        let y1 = (y0 + kh as isize).min((h + ph) as isize);
        let (ya, yb) = (y0.max(0) as usize, y1.min(h as isize) as usize);
        for ox in 0..ow {
            let x0 = (ox * sw) as isize - pw as isize;
            let x1 = (x0 + kw as isize).min((w + pw) as isize);
            let (xa, xb) = (x0.max(0) as usize, x1.min(w as isize) as usize);
            let g = dy[oy * ow + ox] / ((y1 - y0) * (x1 - x0)) as f32;
            for y in ya..yb {
                for v in &mut dx[y * w + xa..y * w + xb] {
                    *v += g;
                }
            }
        }
    }
}

/// Index (y * w + x) of the element `pool::max_pool2d_plane` picks for output (oy, ox), or None
/// for a window entirely in the padding.
pub fn max_pool2d_argmax(x: &[f32], h: usize, w: usize, p: Pool2d, oy: usize, ox: usize) -> Option<usize> {
    let y0 = (oy * p.stride[0]) as isize - p.padding[0] as isize;
    let (ya, yb) = (y0.max(0) as usize, (y0 + p.kernel[0] as isize).min(h as isize).max(0) as usize);
    let x0 = (ox * p.stride[1]) as isize - p.padding[1] as isize;
    let (xa, xb) = (x0.max(0) as usize, (x0 + p.kernel[1] as isize).min(w as isize).max(0) as usize);
    let mut best: Option<(usize, f32)> = None;
    for y in ya..yb {
        for xx in xa..xb {
            let v = x[y * w + xx];
            match best {
                Some((_, m)) if m.is_nan() => return best.map(|b| b.0),
                Some((_, m)) if !(v > m || v.is_nan()) => {}
                _ => best = Some((y * w + xx, v)),
            }
        }
    }
    best.map(|b| b.0)
}

/// Gradient of `pool::max_pool2d_plane`: each output's gradient goes to its window's winner.
#[allow(clippy::too_many_arguments)]
pub fn max_pool2d_backward_plane(x: &[f32], dy: &[f32], h: usize, w: usize, p: Pool2d, oh: usize, ow: usize, dx: &mut [f32]) {
    dx.fill(0.0);
    for oy in 0..oh {
        for ox in 0..ow {
            if let Some(i) = max_pool2d_argmax(x, h, w, p, oy, ox) {
                dx[i] += dy[oy * ow + ox];
            }
        }
    }
}

/// Gradient of `pool::adaptive_avg_pool2d_plane`.
pub fn adaptive_avg_pool2d_backward_plane(dy: &[f32], h: usize, w: usize, oh: usize, ow: usize, dx: &mut [f32]) {
    dx.fill(0.0);
    for oy in 0..oh {
        let (ya, yb) = adaptive_range(oy, h, oh);
        for ox in 0..ow {
            let (xa, xb) = adaptive_range(ox, w, ow);
            let g = dy[oy * ow + ox] / ((yb - ya) * (xb - xa)) as f32;
            for y in ya..yb {
                for v in &mut dx[y * w + xa..y * w + xb] {
                    *v += g;
                }
            }
        }
    }
}

/// Gradient of `pool::upsample_nearest2d_plane`: every input pixel receives the sum of the output
/// gradients that copied it.
pub fn upsample_nearest2d_backward_plane(dy: &[f32], h: usize, w: usize, oh: usize, ow: usize, dx: &mut [f32]) {
    dx.fill(0.0);
    let cols: Vec<usize> = (0..ow).map(|ox| nearest_source(ox, w, ow)).collect();
    for oy in 0..oh {
        let row = &mut dx[nearest_source(oy, h, oh) * w..][..w];
        for (&g, &c) in dy[oy * ow..(oy + 1) * ow].iter().zip(&cols) {
            row[c] += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{avg_pool2d_plane, max_pool2d_plane, upsample_nearest2d_plane};

    /// <dy, forward(x)> is linear in x for avg pooling and upsampling: the backward must be its
    /// adjoint, so <dy, f(e_i)> = dx[i] for every unit vector e_i.
    #[test]
    fn linear_backwards_are_adjoints() {
        let (h, w) = (5, 4);
        let p = Pool2d { kernel: [3, 2], stride: [2, 1], padding: [1, 1] };
        let (oh, ow) = (3, 5);
        let dy: Vec<f32> = (0..oh * ow).map(|i| i as f32 * 0.1 - 0.4).collect();
        let mut dx = vec![0f32; h * w];
        avg_pool2d_backward_plane(&dy, h, w, p, oh, ow, &mut dx);
        let (uh, uw) = (7, 9);
        let du: Vec<f32> = (0..uh * uw).map(|i| (i % 5) as f32 - 2.0).collect();
        let mut dxu = vec![0f32; h * w];
        upsample_nearest2d_backward_plane(&du, h, w, uh, uw, &mut dxu);
        for i in 0..h * w {
            let mut e = vec![0f32; h * w];
            e[i] = 1.0;
            let mut out = vec![0f32; oh * ow];
            avg_pool2d_plane(&e, h, w, p, &mut out, oh, ow);
            let want: f32 = out.iter().zip(&dy).map(|(a, b)| a * b).sum();
            assert!((dx[i] - want).abs() < 1e-5);
            let mut out = vec![0f32; uh * uw];
            upsample_nearest2d_plane(&e, h, w, &mut out, uh, uw);
            let want: f32 = out.iter().zip(&du).map(|(a, b)| a * b).sum();
            assert!((dxu[i] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn max_pool_gradient_goes_to_the_forward_winner() {
        let x = [1.0f32, 5.0, 5.0, 2.0, 0.0, 3.0];
        let p = Pool2d { kernel: [2, 2], stride: [1, 1], padding: [0, 0] };
        let mut y = [0f32; 2];
        max_pool2d_plane(&x, 2, 3, p, &mut y, 1, 2);
        assert_eq!(y, [5.0, 5.0]);
        let mut dx = [0f32; 6];
        max_pool2d_backward_plane(&x, &[1.0, 10.0], 2, 3, p, 1, 2, &mut dx);
        assert_eq!(dx, [0.0, 11.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
