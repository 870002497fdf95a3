//! 2-D pooling and nearest upsampling over one [H, W] plane (row-major), with PyTorch's index
//! arithmetic: output sizes, window clipping, avg-pool divisors (count_include_pad=True), ceil mode,
//! adaptive windows, and nearest-neighbour source indices. The engine runs these per (n, c) plane.

/// kernels/cuda/pool.cu: pooling and nearest upsampling, forward and backward. --fmad=false keeps
/// the f32 rounding of the CPU functions below (sums in the same order, no contracted multiply-adds).
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "pool", code: include_str!("../cuda/pool.cu"), options: &["--fmad=false"] };
/// Threads per block of every kernel in pool.cu (SP_BLOCK).
pub const BLOCK: u32 = 256;

/// Output length of a pooling window along one axis (PyTorch `pooling_output_shape`, dilation 1).
/// With `ceil_mode` the last window may hang over the end, but it must start inside the input or
/// the left padding. Returns None when the window does not fit at all.
pub fn pool_out_len(input: usize, kernel: usize, stride: usize, pad: usize, ceil_mode: bool) -> Option<usize> {
    if kernel == 0 || stride == 0 || input + 2 * pad < kernel {
        return None;
    }
    let span = input + 2 * pad - kernel;
    let mut out = if ceil_mode { span.div_ceil(stride) } else { span / stride } + 1;
    if ceil_mode && (out - 1) * stride >= input + pad {
        out -= 1;
    }
    Some(out)
}

/// The sizes of a 2-D pooling: kernel, stride and padding per axis (height first).
#[derive(Clone, Copy, Debug)]
pub struct Pool2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

/// Average pooling of one plane; the divisor is the window size clipped to the padded input
/// (PyTorch's count_include_pad=True, ceil_mode=False).
pub fn avg_pool2d_plane(x: &[f32], h: usize, w: usize, p: Pool2d, out: &mut [f32], oh: usize, ow: usize) {
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
            let divisor = ((y1 - y0) * (x1 - x0)) as f32;
            let mut s = 0f32;
            for y in ya..yb {
                for v in &x[y * w + xa..y * w + xb] {
                    s += v;
                }
            }
            out[oy * ow + ox] = s / divisor;
        }
    }
}

/// Max pooling of one plane; padding never wins (it is -inf) and NaN propagates, as in PyTorch.
pub fn max_pool2d_plane(x: &[f32], h: usize, w: usize, p: Pool2d, out: &mut [f32], oh: usize, ow: usize) {
    let [kh, kw] = p.kernel;
    let [sh, sw] = p.stride;
    let [ph, pw] = p.padding;
    for oy in 0..oh {
        let y0 = (oy * sh) as isize - ph as isize;
        let (ya, yb) = (y0.max(0) as usize, (y0 + kh as isize).min(h as isize).max(0) as usize);
        for ox in 0..ow {
            let x0 = (ox * sw) as isize - pw as isize;
            let (xa, xb) = (x0.max(0) as usize, (x0 + kw as isize).min(w as isize).max(0) as usize);
            let mut m = f32::NEG_INFINITY;
            for y in ya..yb {
                for &v in &x[y * w + xa..y * w + xb] {
                    if v > m || v.is_nan() {
                        m = v;
                    }
                    if m.is_nan() {
                        break;
                    }
                }
            }
            out[oy * ow + ox] = m;
        }
    }
}

/// The input range [start, end) that adaptive pooling averages for output index `o`
/// (start = floor(o * in / out), end = ceil((o + 1) * in / out)).
pub fn adaptive_range(o: usize, input: usize, output: usize) -> (usize, usize) {
    (o * input / output, ((o + 1) * input).div_ceil(output))
}

pub fn adaptive_avg_pool2d_plane(x: &[f32], h: usize, w: usize, out: &mut [f32], oh: usize, ow: usize) {
    for oy in 0..oh {
        let (ya, yb) = adaptive_range(oy, h, oh);
        for ox in 0..ow {
            let (xa, xb) = adaptive_range(ox, w, ow);
            let mut s = 0f32;
            for y in ya..yb {
                for v in &x[y * w + xa..y * w + xb] {
                    s += v;
                }
            }
            out[oy * ow + ox] = s / ((yb - ya) * (xb - xa)) as f32;
        }
    }
}

/// Source index of output `o` for nearest upsampling ("nearest", not "nearest-exact"):
/// floor(o * (in / out)) with the scale in f32, clamped to in - 1, exactly as PyTorch computes it.
pub fn nearest_source(o: usize, input: usize, output: usize) -> usize {
    if input == output {
        return o;
    }
    if output == 2 * input {
        return o >> 1;
    }
    let scale = input as f32 / output as f32;
    ((o as f32 * scale).floor() as usize).min(input - 1)
}

pub fn upsample_nearest2d_plane(x: &[f32], h: usize, w: usize, out: &mut [f32], oh: usize, ow: usize) {
    let cols: Vec<usize> = (0..ow).map(|ox| nearest_source(ox, w, ow)).collect();
    for oy in 0..oh {
        let row = &x[nearest_source(oy, h, oh) * w..][..w];
        for (o, &c) in out[oy * ow..(oy + 1) * ow].iter_mut().zip(&cols) {
            *o = row[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lengths_follow_pytorch() {
        // MTCNN: 3x3 stride 2 ceil_mode on odd and even inputs.
        assert_eq!(pool_out_len(11, 3, 2, 0, true), Some(5));
        assert_eq!(pool_out_len(12, 3, 2, 0, true), Some(6));
        assert_eq!(pool_out_len(12, 3, 2, 0, false), Some(5));
        // The last window would start in the right padding: dropped.
        assert_eq!(pool_out_len(5, 2, 2, 1, true), Some(3));
        assert_eq!(pool_out_len(2, 3, 1, 0, false), None);
    }

    #[test]
    fn max_and_avg_of_a_small_plane() {
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let p = Pool2d { kernel: [2, 2], stride: [2, 2], padding: [1, 1] };
        let mut out = vec![0f32; 4];
        max_pool2d_plane(&x, 3, 3, p, &mut out, 2, 2);
        assert_eq!(out, vec![0.0, 2.0, 6.0, 8.0]);
        avg_pool2d_plane(&x, 3, 3, p, &mut out, 2, 2);
        assert_eq!(out, vec![0.0 / 4.0, 3.0 / 4.0, 9.0 / 4.0, (4.0 + 5.0 + 7.0 + 8.0) / 4.0]);
    }

    #[test]
    fn adaptive_ranges_overlap_for_non_divisors() {
        assert_eq!((0..3).map(|o| adaptive_range(o, 5, 3)).collect::<Vec<_>>(), vec![(0, 2), (1, 4), (3, 5)]);
        assert_eq!(nearest_source(3, 2, 4), 1);
        assert_eq!(nearest_source(4, 3, 5), 2);
    }
}
