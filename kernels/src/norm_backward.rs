//! Backward passes of layer norm and group norm (+SiLU) on contiguous f32 slices: the CPU
//! reference of the CUDA kernels of the same math, and the engine's CPU backend. Group norm's
//! statistics are the forward's when the caller saved them (`norm::group_norm_with_stats`), else
//! recomputed from the input (two-pass, f64); layer norm always recomputes them.
//!
//! With xhat = (x - mean) * rstd and g = dy * weight, the input gradient of one normalised set of
//! m values is dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); the weight gradient is the sum
//! of dy * xhat and the bias gradient the sum of dy over everything but the channel. Partial sums
//! are formed per row (or per sample) and added in a fixed order, so results do not depend on the
//! thread count.

use rayon::prelude::*;

use crate::elementwise::sigmoid;

const PAR_MIN: usize = 1 << 14;

fn mean_rstd(x: &[f32], eps: f32) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// Layer norm over rows of length `cols` (see `norm::layer_norm_rows`). Writes dx (same length as
/// x) and, when given, overwrites `dweight` / `dbias` (length `cols`).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_rows(x: &[f32], dy: &[f32], cols: usize, weight: Option<&[f32]>, eps: f32, dx: &mut [f32], dweight: Option<&mut [f32]>, dbias: Option<&mut [f32]>) {
    assert_eq!(x.len(), dy.len(), "layer_norm_backward: x and dy lengths differ");
    assert_eq!(x.len(), dx.len(), "layer_norm_backward: dx length");
    if cols == 0 || x.is_empty() {
        for d in [dweight, dbias].into_iter().flatten() {
            d.fill(0.0);
        }
        return;
    }
    let rows = x.len() / cols;
    let want_params = dweight.is_some() || dbias.is_some();
    // Per-row partials of dweight (dy * xhat) and dbias (dy), reduced below in row order.
    let mut partial_w = if want_params { vec![0f32; x.len()] } else { Vec::new() };
    type RowArgs<'a> = (((&'a mut [f32], &'a [f32]), &'a [f32]), &'a mut [f32]);
    let row = |(((dxr, xr), dyr), pw): RowArgs| {
        let (mean, rstd) = mean_rstd(xr, eps);
        let m = cols as f64;
        let (mut sum_g, mut sum_gx) = (0f64, 0f64);
        for j in 0..cols {
            let xh = (xr[j] as f64 - mean) * rstd;
            let g = dyr[j] as f64 * weight.map_or(1.0, |w| w[j] as f64);
            sum_g += g;
            sum_gx += g * xh;
        }
        let (mg, mgx) = (sum_g / m, sum_gx / m);
        for j in 0..cols {
            let xh = (xr[j] as f64 - mean) * rstd;
            let g = dyr[j] as f64 * weight.map_or(1.0, |w| w[j] as f64);
            dxr[j] = (rstd * (g - mg - xh * mgx)) as f32;
            if !pw.is_empty() {
                pw[j] = (dyr[j] as f64 * xh) as f32;
            }
        }
    };
    let pw_chunks: Vec<&mut [f32]> = if want_params { partial_w.chunks_mut(cols).collect() } else { (0..rows).map(|_| <&mut [f32]>::default()).collect() };
    if x.len() >= PAR_MIN {
        dx.par_chunks_mut(cols).zip(x.par_chunks(cols)).zip(dy.par_chunks(cols)).zip(pw_chunks.into_par_iter()).for_each(row);
    } else {
        dx.chunks_mut(cols).zip(x.chunks(cols)).zip(dy.chunks(cols)).zip(pw_chunks).for_each(row);
    }
    if let Some(dw) = dweight {
        for j in 0..cols {
            dw[j] = (0..rows).map(|r| partial_w[r * cols + j] as f64).sum::<f64>() as f32;
        }
    }
    if let Some(db) = dbias {
        for j in 0..cols {
            db[j] = (0..rows).map(|r| dy[r * cols + j] as f64).sum::<f64>() as f32;
        }
    }
}

/// Group norm (+SiLU) over NCHW data (see `norm::group_norm`): writes dx and, when given,
/// overwrites dweight / dbias (length `c`). With `silu` the gradient first passes through the SiLU
/// of the affine output y = xhat * w + b, recomputed here. `stats`: the forward's per (sample,
/// group) (mean, rstd) ([N, G, 2], `norm::group_norm_with_stats`), used instead of recomputing
/// them from x; None recomputes (f64, two-pass).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    silu: bool,
    stats: Option<&[f32]>,
    dx: &mut [f32],
    dweight: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), n * c * hw, "group_norm_backward: input length");
    assert!(dy.len() == x.len() && dx.len() == x.len(), "group_norm_backward: dy / dx lengths");
    assert!(groups > 0 && c.is_multiple_of(groups), "group_norm_backward: {groups} groups do not divide {c} channels");
    if let Some(s) = stats {
        assert_eq!(s.len(), 2 * n * groups, "group_norm_backward: statistics length");
    }
    let cpg = c / groups;
    let group_len = cpg * hw;
    // Per (sample, channel) partial sums of dy' * xhat and dy' (dy' = gradient before the affine).
    let mut pw = vec![0f64; n * c];
    let mut pb = vec![0f64; n * c];
    if group_len > 0 && n > 0 {
        type GroupArgs<'a> = (usize, (((&'a mut [f32], &'a [f32]), &'a [f32]), (&'a mut [f64], &'a mut [f64])));
        let group = |(idx, (((dxg, xg), dyg), (pwg, pbg))): GroupArgs| {
            let (mean, rstd) = match stats {
                Some(s) => (s[2 * idx] as f64, s[2 * idx + 1] as f64),
                None => mean_rstd(xg, eps),
            };
            let first = (idx % groups) * cpg;
            // dy' per element (through SiLU if fused), then g = dy' * w[ch].
            let mut dyp = vec![0f64; group_len];
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for k in 0..cpg {
                let ch = first + k;
                let w = weight.map_or(1.0, |w| w[ch] as f64);
                let b = bias.map_or(0.0, |b| b[ch] as f64);
                let (mut sw, mut sb) = (0f64, 0f64);
                for p in 0..hw {
                    let i = k * hw + p;
                    let xh = (xg[i] as f64 - mean) * rstd;
                    let mut d = dyg[i] as f64;
                    if silu {
                        let y = (xh * w + b) as f32;
                        let s = sigmoid(y) as f64;
                        d *= s * (1.0 + y as f64 * (1.0 - s));
                    }
                    dyp[i] = d;
                    sw += d * xh;
                    sb += d;
                    sum_g += d * w;
                    sum_gx += d * w * xh;
                }
                pwg[k] = sw;
                pbg[k] = sb;
            }
            let m = group_len as f64;
            let (mg, mgx) = (sum_g / m, sum_gx / m);
            for k in 0..cpg {
                let w = weight.map_or(1.0, |w| w[first + k] as f64);
                for p in 0..hw {
                    let i = k * hw + p;
                    let xh = (xg[i] as f64 - mean) * rstd;
                    dxg[i] = (rstd * (dyp[i] * w - mg - xh * mgx)) as f32;
                }
            }
        };
        if x.len() >= PAR_MIN {
            dx.par_chunks_mut(group_len)
                .zip(x.par_chunks(group_len))
                .zip(dy.par_chunks(group_len))
                .zip(pw.par_chunks_mut(cpg).zip(pb.par_chunks_mut(cpg)))
                .enumerate()
                .for_each(group);
        } else {
            dx.chunks_mut(group_len).zip(x.chunks(group_len)).zip(dy.chunks(group_len)).zip(pw.chunks_mut(cpg).zip(pb.chunks_mut(cpg))).enumerate().for_each(group);
        }
    }
    if let Some(dw) = dweight {
        for ch in 0..c {
            dw[ch] = (0..n).map(|s| pw[s * c + ch]).sum::<f64>() as f32;
        }
    }
    if let Some(db) = dbias {
        for ch in 0..c {
            db[ch] = (0..n).map(|s| pb[s * c + ch]).sum::<f64>() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::norm::{group_norm, layer_norm_rows};

    /// sum(dy * f(x)) differentiated by central differences in f64 over f32 forwards.
    fn fd(x: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64) -> f64 {
        let h = 1e-2f32;
        let mut a = x.to_vec();
        a[i] += h;
        let up = f(&a);
        a[i] -= 2.0 * h;
        let down = f(&a);
        (up - down) / (2.0 * h as f64)
    }

    #[test]
    fn layer_norm_backward_matches_differences() {
        let cols = 5;
        let x: Vec<f32> = (0..15).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.2).collect();
        let dy: Vec<f32> = (0..15).map(|i| ((i * 13) % 7) as f32 * 0.2 - 0.5).collect();
        let w = [0.5f32, 1.5, -1.0, 2.0, 0.7];
        let b = [0.1f32, 0.0, -0.3, 0.2, 0.4];
        let mut dx = vec![0f32; 15];
        let (mut dw, mut db) = (vec![0f32; cols], vec![0f32; cols]);
        layer_norm_backward_rows(&x, &dy, cols, Some(&w), 1e-5, &mut dx, Some(&mut dw), Some(&mut db));
        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut out = vec![0f32; x.len()];
            layer_norm_rows(x, cols, Some(w), Some(b), 1e-5, &mut out);
            out.iter().zip(&dy).map(|(&o, &d)| o as f64 * d as f64).sum::<f64>()
        };
        for (i, &got) in dx.iter().enumerate().take(15) {
            let want = fd(&x, i, &|xx| loss(xx, &w, &b));
            assert!((got as f64 - want).abs() < 1e-2, "dx[{i}] {got} vs {want}");
        }
        for j in 0..cols {
            let want = fd(&w, j, &|ww| loss(&x, ww, &b));
            assert!((dw[j] as f64 - want).abs() < 1e-2, "dw[{j}]");
            let want = fd(&b, j, &|bb| loss(&x, &w, bb));
            assert!((db[j] as f64 - want).abs() < 1e-2, "db[{j}]");
        }
    }

    #[test]
    fn group_norm_backward_with_saved_statistics_matches_recomputed() {
        use crate::norm::group_norm_with_stats;
        let (n, c, hw, groups) = (2, 6, 7, 3);
        let len = n * c * hw;
        let x: Vec<f32> = (0..len).map(|i| ((i * 29) % 13) as f32 * 0.25 - 1.4 + if i >= c * hw { 100.0 } else { 0.0 }).collect();
        let dy: Vec<f32> = (0..len).map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.6).collect();
        let w: Vec<f32> = (0..c).map(|i| 0.5 + 0.25 * i as f32).collect();
        let b: Vec<f32> = (0..c).map(|i| 0.1 * i as f32 - 0.2).collect();
        let mut y = vec![0f32; len];
        let mut st = vec![0f32; 2 * n * groups];
        group_norm_with_stats(&x, n, c, hw, groups, Some(&w), Some(&b), 1e-5, true, &mut y, Some(&mut st));
        for silu in [false, true] {
            let run = |stats: Option<&[f32]>| {
                let mut dx = vec![0f32; len];
                let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                group_norm_backward(&x, &dy, n, c, hw, groups, Some(&w), Some(&b), 1e-5, silu, stats, &mut dx, Some(&mut dw), Some(&mut db));
                (dx, dw, db)
            };
            let (a, b_) = (run(None), run(Some(&st)));
            for (name, got, want) in [("dx", &b_.0, &a.0), ("dw", &b_.1, &a.1), ("db", &b_.2, &a.2)] {
                for (i, (&g, &r)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((g - r).abs() <= 1e-5 * (1.0 + r.abs()), "silu {silu} {name}[{i}]: saved {g} vs recomputed {r}");
                }
            }
            // Other statistics do change the result (the saved ones are used).
            let shifted: Vec<f32> = st.iter().enumerate().map(|(i, &v)| if i % 2 == 0 { v + 0.5 } else { v }).collect();
            assert_ne!(run(Some(&shifted)).0, a.0);
        }
    }

    #[test]
    fn group_norm_silu_backward_matches_differences() {
        let (n, c, hw, groups) = (2, 4, 3, 2);
        let len = n * c * hw;
        let x: Vec<f32> = (0..len).map(|i| ((i * 29) % 13) as f32 * 0.25 - 1.4).collect();
        let dy: Vec<f32> = (0..len).map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.6).collect();
        let w = [0.5f32, 1.5, -1.0, 2.0];
        let b = [0.1f32, 0.0, -0.3, 0.2];
        for silu in [false, true] {
            let mut dx = vec![0f32; len];
            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
            group_norm_backward(&x, &dy, n, c, hw, groups, Some(&w), Some(&b), 1e-5, silu, None, &mut dx, Some(&mut dw), Some(&mut db));
            let loss = |x: &[f32], w: &[f32], b: &[f32]| {
                let mut out = vec![0f32; x.len()];
                group_norm(x, n, c, hw, groups, Some(w), Some(b), 1e-5, silu, &mut out);
                out.iter().zip(&dy).map(|(&o, &d)| o as f64 * d as f64).sum::<f64>()
            };
            for (i, &got) in dx.iter().enumerate().take(len) {
                let want = fd(&x, i, &|xx| loss(xx, &w, &b));
                assert!((got as f64 - want).abs() < 1e-2, "silu {silu} dx[{i}] {got} vs {want}");
            }
            for j in 0..c {
                assert!((dw[j] as f64 - fd(&w, j, &|ww| loss(&x, ww, &b))).abs() < 1e-2, "dw[{j}]");
                assert!((db[j] as f64 - fd(&b, j, &|bb| loss(&x, &w, bb))).abs() < 1e-2, "db[{j}]");
            }
        }
    }
}
