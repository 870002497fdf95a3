//! Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
//! 1, 2, 3", SC'11). Every element depends only on (seed, element index), so the CPU (any thread
//! count) and the CUDA kernel produce the same numbers.
//!
//! The exact mapping, which the CUDA kernel reproduces:
//! - key = [seed as u32 (low word), (seed >> 32) as u32 (high word)].
//! - Element `i` of a tensor (row-major) belongs to block `b = i / 4`, lane `i % 4`. The block's
//!   counter is [b as u32, (b >> 32) as u32, 0, 0]; one Philox4x32-10 call on it gives four u32
//!   words x[0..4], one per lane.
//! - Uniform in [0, 1): `u(x) = (x >> 8) as f32 * 2^-24` (exact: a 24-bit integer times a power of
//!   two, so every implementation gets the same bits).
//! - Normal: Box–Muller on the lane pairs (0, 1) and (2, 3) of a block. With `a = u(x[0])`,
//!   `c = u(x[1])` (resp. x[2], x[3]): `r = sqrt(-2 ln(1 - a))`, `t = 2π c`; lane 0 (resp. 2) gets
//!   `r cos t` and lane 1 (resp. 3) gets `r sin t`. `1 - a` lies in (0, 1], so the log is finite.
//!   These are computed in f64 and rounded to f32: f64 log/sin/cos are accurate to within an ulp of
//!   f64 on every platform (CPU libm here, CUDA's double-precision functions on the GPU), so the
//!   rounded f32 agrees except when a value falls within ~1e-16 relative of an f32 rounding tie.
//!   The constant 2π is `std::f64::consts::TAU`.
//! - A tensor of n elements uses blocks 0..ceil(n/4); the tail lanes of the last block are dropped.

/// kernels/cuda/rng.cu: `random_*` reproduces `fill_uniform` / `fill_normal` element for element.
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "rng", code: include_str!("../cuda/rng.cu"), options: &[] };

use rayon::prelude::*;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds (the Random123 default).
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four u32 words of block `block` (elements 4*block .. 4*block+4) for `seed`.
#[inline]
pub fn block_words(seed: u64, block: u64) -> [u32; 4] {
    philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], [seed as u32, (seed >> 32) as u32])
}

/// A u32 to a uniform in [0, 1) with 24 random bits.
#[inline(always)]
pub fn to_uniform(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Box–Muller on two u32 words; see the module doc for the exact formula.
#[inline]
pub fn box_muller(x0: u32, x1: u32) -> (f32, f32) {
    let a = to_uniform(x0) as f64;
    let c = to_uniform(x1) as f64;
    let r = libm::sqrt(-2.0 * libm::log(1.0 - a));
    let t = std::f64::consts::TAU * c;
    ((r * libm::cos(t)) as f32, (r * libm::sin(t)) as f32)
}

/// Below this many blocks the fill stays on the calling thread.
const PAR_MIN_BLOCKS: usize = 4096;

/// Fills `out` with the uniforms of elements 0..out.len() for `seed`.
pub fn fill_uniform(seed: u64, out: &mut [f32]) {
    let block = |(b, chunk): (usize, &mut [f32])| {
        let w = block_words(seed, b as u64);
        for (o, &x) in chunk.iter_mut().zip(&w) {
            *o = to_uniform(x);
        }
    };
    if out.len() / 4 >= PAR_MIN_BLOCKS {
        out.par_chunks_mut(4).enumerate().for_each(block);
    } else {
        out.chunks_mut(4).enumerate().for_each(block);
    }
}

/// Fills `out` with the standard normals of elements 0..out.len() for `seed`.
pub fn fill_normal(seed: u64, out: &mut [f32]) {
    let block = |(b, chunk): (usize, &mut [f32])| {
        let w = block_words(seed, b as u64);
        let (n0, n1) = box_muller(w[0], w[1]);
        let (n2, n3) = box_muller(w[2], w[3]);
        for (o, v) in chunk.iter_mut().zip([n0, n1, n2, n3]) {
            *o = v;
        }
    };
    if out.len() / 4 >= PAR_MIN_BLOCKS {
        out.par_chunks_mut(4).enumerate().for_each(block);
    } else {
        out.chunks_mut(4).enumerate().for_each(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from Random123's kat_vectors (philox4x32_10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        // pi digits vector: ctr 243f6a88 85a308d3 13198a2e 03707344, key a4093822 299f31d0.
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn same_numbers_whatever_the_thread_count() {
        let n = 100_003;
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut u = vec![0f32; n];
                let mut g = vec![0f32; n];
                fill_uniform(42, &mut u);
                fill_normal(42, &mut g);
                (u, g)
            })
        };
        let (u1, g1) = run(1);
        let (u4, g4) = run(4);
        assert_eq!(u1, u4);
        assert_eq!(g1, g4);
        // A prefix of a longer tensor is the shorter tensor: numbers depend only on the index.
        let mut short = vec![0f32; 10];
        fill_normal(42, &mut short);
        assert_eq!(&short[..], &g1[..10]);
        // Another seed gives other numbers.
        let mut other = vec![0f32; 10];
        fill_normal(43, &mut other);
        assert_ne!(short, other);
    }

    #[test]
    fn normal_and_uniform_statistics() {
        let n = 1_000_000;
        let mut g = vec![0f32; n];
        fill_normal(7, &mut g);
        let mean = g.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = g.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard error of the mean is 1e-3; of the std about 7e-4.
        assert!(mean.abs() < 5e-3, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 5e-3, "std {}", var.sqrt());
        let within_1 = g.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        assert!((within_1 - 0.682_689).abs() < 3e-3, "P(|x|<1) = {within_1}");

        let mut u = vec![0f32; n];
        fill_uniform(7, &mut u);
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = u.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 2e-3, "uniform mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 1e-3, "uniform var {var}");
    }
}
