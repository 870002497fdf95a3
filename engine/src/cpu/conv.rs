//! 2-D convolution on the CPU: im2col over tiles of output pixels, then a GEMM per (image, group,
//! tile). A 1x1 convolution with stride 1 and no padding multiplies the input in place.

use rayon::prelude::*;

use super::gemm::{gemm_f32, parallelism};

/// The sizes of one convolution: input [n, c, h, w], weight [o, c / groups, kh, kw],
/// output [n, o, oh, ow].
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

/// im2col buffers are kept near this many floats (16 MiB) by splitting the output pixels in tiles.
const TILE_FLOATS: usize = 1 << 22;

/// Output of the convolution, row-major [n, o, oh, ow]. `x` and `wt` are contiguous row-major.
pub fn conv2d(x: &[f32], wt: &[f32], bias: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    let (cg, og) = (g.c / g.groups, g.o / g.groups);
    let kdim = cg * g.kh * g.kw;
    let pixels = g.oh * g.ow;
    let mut out = vec![0f32; g.n * g.o * pixels];
    if out.is_empty() {
        return out;
    }
    if let Some(b) = bias {
        out.par_chunks_mut(pixels).enumerate().for_each(|(i, row)| row.fill(b[i % g.o]));
    }
    let direct = g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.padding == [0, 0];
    let tile = if direct { pixels } else { (TILE_FLOATS / kdim.max(1)).clamp(256, pixels.max(256)).min(pixels) };
    let tiles = pixels.div_ceil(tile);
    let units = g.n * g.groups * tiles;
    let accumulate = bias.is_some();
    let out_ptr = SendPtr(out.as_mut_ptr());

    // One unit: the [og, tile] block of output for image `ni`, group `gi`, pixels p0..p1.
    let unit = |u: usize, cols: &mut Vec<f32>, par: gemm::Parallelism| {
        let (ni, gi, ti) = (u / (g.groups * tiles), (u / tiles) % g.groups, u % tiles);
        let (p0, p1) = (ti * tile, ((ti + 1) * tile).min(pixels));
        let image = &x[(ni * g.c + gi * cg) * g.h * g.w..][..cg * g.h * g.w];
        let (rhs, rhs_rs): (&[f32], usize) = if direct {
            (&image[p0..], g.h * g.w)
        } else {
            cols.resize(kdim * (p1 - p0), 0.0);
            im2col(image, g, p0, p1, cols, !matches!(par, gemm::Parallelism::None));
            (&cols[..], p1 - p0)
        };
        let lhs = &wt[gi * og * kdim..][..og * kdim];
        let dst_off = (ni * g.o + gi * og) * pixels + p0;
        // SAFETY: lhs is og x kdim row-major inside `wt`; rhs is kdim rows of (p1 - p0) values at
        // stride rhs_rs inside `image` or `cols`; the destination block (og rows of p1 - p0 at stride
        // `pixels` from dst_off) lies inside `out` and no two units write the same block.
        unsafe {
            gemm_f32(og, p1 - p0, kdim, out_ptr.get().add(dst_off), pixels, 1, accumulate, lhs.as_ptr(), kdim, 1, rhs.as_ptr(), rhs_rs, 1, par);
        }
    };
    let threads = rayon::current_num_threads();
    if threads > 1 && units >= 4 * threads {
        (0..units).into_par_iter().for_each_init(Vec::new, |cols, u| unit(u, cols, gemm::Parallelism::None));
    } else {
        let mut cols = Vec::new();
        for u in 0..units {
            unit(u, &mut cols, parallelism(og * tile * kdim));
        }
    }
    out
}

/// Raw output pointer shared by units that write disjoint blocks.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// cols[(ci, ki, kj), p - p0] = image[ci, oy * sh - ph + ki * dh, ox * sw - pw + kj * dw] for
/// output pixels p = oy * ow + ox in p0..p1, zero where the tap falls in the padding.
fn im2col(image: &[f32], g: &ConvGeom, p0: usize, p1: usize, cols: &mut [f32], parallel: bool) {
    let (h, w, ow) = (g.h as isize, g.w as isize, g.ow);
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    let [dh, dw] = g.dilation;
    let len = p1 - p0;
    let row = |(r, dst): (usize, &mut [f32])| {
        let (ci, ki, kj) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let plane = &image[ci * g.h * g.w..][..g.h * g.w];
        let x_shift = (kj * dw) as isize - pw as isize;
        // Output columns whose tap is inside the image: 0 <= ox * sw + x_shift < w.
        let ox_lo = if x_shift >= 0 { 0 } else { ((-x_shift) as usize).div_ceil(sw) };
        let ox_hi = if w - x_shift <= 0 { 0 } else { ((w - x_shift) as usize).div_ceil(sw).min(ow) };
        let mut p = p0;
        while p < p1 {
            let (oy, ox_start) = (p / ow, p % ow);
            let ox_end = ow.min(ox_start + (p1 - p));
            let seg = &mut dst[p - p0..p - p0 + (ox_end - ox_start)];
            let iy = (oy * sh + ki * dh) as isize - ph as isize;
            if iy < 0 || iy >= h {
                seg.fill(0.0);
            } else {
                let src = &plane[iy as usize * g.w..][..g.w];
                let lo = ox_lo.clamp(ox_start, ox_end);
                let hi = ox_hi.clamp(lo, ox_end);
                seg[..lo - ox_start].fill(0.0);
                seg[hi - ox_start..].fill(0.0);
                let mid = &mut seg[lo - ox_start..hi - ox_start];
                if sw == 1 {
                    let s0 = (lo as isize + x_shift) as usize;
                    mid.copy_from_slice(&src[s0..s0 + (hi - lo)]);
                } else {
                    for (i, v) in mid.iter_mut().enumerate() {
                        *v = src[(((lo + i) * sw) as isize + x_shift) as usize];
                    }
                }
            }
            p += ox_end - ox_start;
        }
    };
    if parallel {
        cols.par_chunks_mut(len).enumerate().for_each(row);
    } else {
        cols.chunks_mut(len).enumerate().for_each(row);
    }
}
