//! Fused LoRA linear: y = x W^T + bias + s (x A^T) B^T for x [M, K], W [N, K] (the frozen base
//! weight), bias [N], A [r, K] (LoRA down), B [N, r] (LoRA up), and its backward
//! (t = x A^T, u = dy B):
//!   dx = dy W + s u A,   dA = s u^T x,   dB = s dy^T t,   dbias = Σ_rows dy,   dW = dy^T x.
//!
//! CUDA (kernels/cuda/lora_linear.cu): the skinny products t = s x A^T and u = dy B go through
//! cuBLASLt; then ONE kernel of ours computes a GEMM over concatenated operands,
//! C = [A1 | A2] · [B1 ; B2] (+ bias), whose K loop runs over the base operands and continues over
//! the LoRA operands into the same accumulators, so the LoRA term costs no second pass over y:
//!   forward  y  = [x | t]   · [W | B]^T + bias   (B side "n-major": [n][k] rows)
//!   backward dx = [dy | s u] · [W ; A]           (B side "k-major": [k][n] rows)
//! `concat_gemm` below is the reference of exactly that contract (both B layouts), `forward` and
//! `backward` the reference of the op; all f32 math.

use crate::compile::KernelSource;

/// kernels/cuda/lora_linear.cu: the concatenated-K tensor-core GEMM (lora_gemm_{nk,kn}_{bf16,f16}).
pub const SOURCE: KernelSource = KernelSource { name: "lora_linear", code: include_str!("../cuda/lora_linear.cu"), options: &[] };

/// Output tile of one block (rows, columns), threads of a block, and its dynamic shared memory
/// (4 pipeline stages of two 128 x 32 16-bit tiles; above the 48 KiB default, so the launcher must
/// opt in with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
pub const TILE_M: usize = 128;
pub const TILE_N: usize = 128;
pub const THREADS: u32 = 256;
pub const SHARED_BYTES: u32 = 4 * 2 * 128 * 32 * 2;

/// kernels/cuda/lora_linear_hopper.cu: the same GEMM (same `LoraGemmArgs`, both B layouts) with
/// warpgroup MMA for sm_90a (lora_gemm_hopper_{nk,kn}_{bf16,f16}; empty kernels on sm_80).
pub const HOPPER_SOURCE: KernelSource = KernelSource { name: "lora_linear_hopper", code: include_str!("../cuda/lora_linear_hopper.cu"), options: &[] };

/// The Hopper kernel's output tile, threads and dynamic shared memory: 6 stages of a 128 x 64 and a
/// 160 x 64 16-bit tile, plus 1 KiB so that the kernel can align its tiles to 1024 bytes (the
/// swizzle atoms); the launcher must opt in. The kernel is persistent: see `hopper_blocks`.
pub const HOPPER_TILE_M: usize = 128;
pub const HOPPER_TILE_N: usize = 160;
pub const HOPPER_THREADS: u32 = 256;
pub const HOPPER_SHARED_BYTES: u32 = 6 * (128 + 160) * 64 * 2 + 1024;

/// kernels/cuda/lora_linear_tma.cu: the Hopper GEMM warp-specialized with TMA loads
/// (lora_gemm_tma_{nk,kn}_{bf16,f16} with 128 x 160 output tiles, lora_gemm_tma256_* with
/// 256 x 160, lora_gemm_tma_pp_* with 128 x 160 tiles computed by one consumer warpgroup each, the
/// two taking turns, lora_gemm_tma_mc_* with 128 x 160 tiles in clusters of 2 CTAs that multicast
/// the B tile; empty kernels on sm_80): same `LoraGemmArgs` followed by four tensor maps (A1, B1,
/// A2, B2; boxes `tma_box_a` / `TMA_BOX_B_*`, tma_mc: `TMA_MC_BOX_B_*`), 384 threads (a producer
/// warpgroup and two consumer warpgroups), a persistent grid (`tma_blocks`, tma_mc: `tma_mc_blocks`
/// in clusters of `TMA_MC_CLUSTER`).
pub const TMA_SOURCE: KernelSource = KernelSource { name: "lora_linear_tma", code: include_str!("../cuda/lora_linear_tma.cu"), options: &[] };

/// Threads of a TMA-kernel block.
pub const TMA_THREADS: u32 = 384;

/// Pipeline stages of the TMA kernel with output tiles of `tile_m` (128 or 256) rows.
pub fn tma_stages(tile_m: usize) -> usize {
    if tile_m == 128 { 6 } else { 4 }
}

/// Dynamic shared memory of the TMA kernel with `tile_m`-row tiles: the stages (a tile_m x 64 and
/// a 160 x 64 16-bit tile each), 1 KiB so that the kernel can align them to 1024 bytes, and the
/// mbarriers (full and empty per stage, 8 bytes each). The launcher must opt in.
pub fn tma_shared_bytes(tile_m: usize) -> u32 {
    let stages = tma_stages(tile_m);
    (stages * (tile_m + 160) * 64 * 2 + 1024 + 2 * stages * 8) as u32
}

/// Output tiles of the TMA kernel with `tile_m`-row tiles for C [m, n] (counted in a u32).
pub fn tma_tiles(m: usize, n: usize, tile_m: usize) -> usize {
    m.div_ceil(tile_m) * n.div_ceil(HOPPER_TILE_N)
}

/// Blocks of a TMA-kernel launch: one per output tile, at most `multiprocessors`.
pub fn tma_blocks(m: usize, n: usize, tile_m: usize, multiprocessors: u32) -> u32 {
    tma_tiles(m, n, tile_m).clamp(1, multiprocessors.max(1) as usize) as u32
}

/// The boxes the TMA kernel's tensor maps must have, as (rows, columns) of the row-major operand,
/// and their shared-memory swizzle in bytes: A1 / A2 (row-major [m][k]) `tile_m` rows of 64
/// columns; B1 / B2 n-major ([n][k] rows) 160 rows of 64 columns; both with the 128-byte swizzle
/// (the K-major wgmma tiles). B1 / B2 k-major ([k][n] rows) 64 rows of 32 columns with the 64-byte
/// swizzle (one 4 KiB block of the MN-major [64 k][160 n] tile; the kernel loads five).
pub fn tma_box_a(tile_m: usize) -> (u32, u32, u32) {
    (tile_m as u32, 64, 128)
}
pub const TMA_BOX_B_NK: (u32, u32, u32) = (160, 64, 128);
pub const TMA_BOX_B_KN: (u32, u32, u32) = (64, 32, 64);

/// The tma_mc kernels (lora_gemm_tma_mc_*): 128 x 160 tiles, two CTAs a thread-block cluster
/// (cluster dims (2, 1, 1), the grid a multiple of 2), computing row tiles 2 i and 2 i + 1 of one
/// column tile, each CTA loading half of the shared B tile and multicasting it to both: B1 / B2
/// boxes of 80 rows (nk: the n-half of the [160 n][64 k] tile) or of 32 k-rows by 32 columns (kn:
/// the k-half of each of the five [64 k][32 n] blocks); A boxes and shared memory as `tma` (128).
pub const TMA_MC_CLUSTER: u32 = 2;
pub const TMA_MC_BOX_B_NK: (u32, u32, u32) = (80, 64, 128);
pub const TMA_MC_BOX_B_KN: (u32, u32, u32) = (32, 32, 64);

/// The work units of the tma_mc kernels for C [m, n]: pairs of 128-row tiles (the last one
/// alone when the row tiles are odd) times the 160-column tiles.
pub fn tma_mc_pairs(m: usize, n: usize) -> usize {
    m.div_ceil(128).div_ceil(2) * n.div_ceil(HOPPER_TILE_N)
}

/// Blocks of a tma_mc launch: two per tile pair, at most `clusters` pairs at once (the clusters
/// that fit the device together: its SMs / 2, or fewer where the GPCs leave SMs unpaired), so
/// always a multiple of 2.
pub fn tma_mc_blocks(m: usize, n: usize, clusters: u32) -> u32 {
    TMA_MC_CLUSTER * tma_mc_pairs(m, n).clamp(1, clusters.max(1) as usize) as u32
}

/// The tma_mc kernel for a B layout and a 16-bit dtype name: lora_gemm_tma_mc_{nk,kn}_{dtype}.
pub fn tma_mc_kernel_name(layout: BLayout, dtype: &str) -> String {
    kernel_name(layout, dtype).replacen("lora_gemm_", "lora_gemm_tma_mc_", 1)
}

/// Whether the TMA kernel can read a LoRA operand of rank `rank` at `addr` (its rows `rank`
/// elements long): a tensor map needs a 16-byte aligned base and row strides that are multiples
/// of 16 bytes, so rank a multiple of 8 (0: the operand is never read).
pub fn tma_lora_ok(rank: usize, addr: u64) -> bool {
    rank == 0 || (rank.is_multiple_of(8) && addr.is_multiple_of(16))
}

/// Output tiles of the Hopper kernel for C [m, n] (the kernel counts them in a u32).
pub fn hopper_tiles(m: usize, n: usize) -> usize {
    m.div_ceil(HOPPER_TILE_M) * n.div_ceil(HOPPER_TILE_N)
}

/// Blocks (grid x) of a Hopper launch: one per output tile, at most `multiprocessors` (one block
/// fits an SM); block b computes tiles b, b + blocks, ...
pub fn hopper_blocks(m: usize, n: usize, multiprocessors: u32) -> u32 {
    hopper_tiles(m, n).clamp(1, multiprocessors.max(1) as usize) as u32
}

/// Arguments of the lora_gemm kernels; must match `LoraGemmArgs` in kernels/cuda/lora_linear.cuh
/// field for field. Pointers are device (or, emulated, host) addresses of 16-bit elements; leading
/// dimensions are in elements. C [m, n] = A1 [m, k1] · B1 + A2 [m, k2] · B2 (+ bias [n]); B1/B2
/// are [n][k] rows (ld = ldb) for the `nk` kernels, [k][n] rows for the `kn` kernels.
/// Requirements (checked by the launcher): n, k1, lda1, ldb1, ldc multiples of 8 and a1, b1, c
/// 16-byte aligned; for the `kn` kernels also ldb2 and b2. a2_vec / b2_vec: `lora_rows` (b2_vec 1
/// for the `kn` kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoraGemmArgs {
    pub a1: u64,
    pub b1: u64,
    pub a2: u64,
    pub b2: u64,
    /// 0: no bias.
    pub bias: u64,
    pub c: u64,
    pub m: u32,
    pub n: u32,
    pub k1: u32,
    pub k2: u32,
    pub lda1: u32,
    pub ldb1: u32,
    pub lda2: u32,
    pub ldb2: u32,
    pub ldc: u32,
    pub a2_vec: u32,
    pub b2_vec: u32,
    pub pad: u32,
}

/// How the kernels load a LoRA operand's rows (`a2_vec`, and `b2_vec` of the `nk` kernels), given
/// the rank (the row length) and the operand's address and row stride (= the rank): 1 (16-byte
/// cp.async) for 16-byte aligned rows, 2 (two 8-byte cp.async) for 8-byte aligned rows (ranks 4,
/// 12, ...), else 0 (element loads, which stall the loading warp). Must match LORA_ROWS_* in
/// kernels/cuda/lora_linear.cuh.
pub fn lora_rows(rank: usize, addr: u64) -> u32 {
    if rank.is_multiple_of(8) && addr.is_multiple_of(16) {
        1
    } else if rank.is_multiple_of(4) && addr.is_multiple_of(8) {
        2
    } else {
        0
    }
}

/// Layout of the B operands of the concatenated GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BLayout {
    /// [n][k] rows (the forward: W [N, K], B [N, r]); kernel suffix `nk`.
    NMajor,
    /// [k][n] rows (dx: W [N, K] as [k = N][n = K], A [r, K]); kernel suffix `kn`.
    KMajor,
}

/// The kernel for a B layout and a 16-bit dtype name ("bf16" / "f16").
pub fn kernel_name(layout: BLayout, dtype: &str) -> String {
    let l = match layout {
        BLayout::NMajor => "nk",
        BLayout::KMajor => "kn",
    };
    format!("lora_gemm_{l}_{dtype}")
}

/// The Hopper kernel for a B layout and a 16-bit dtype name: lora_gemm_hopper_{nk,kn}_{dtype}.
pub fn hopper_kernel_name(layout: BLayout, dtype: &str) -> String {
    kernel_name(layout, dtype).replacen("lora_gemm_", "lora_gemm_hopper_", 1)
}

/// The TMA kernel for a B layout, a 16-bit dtype name, the tile rows (128 or 256) and whether its
/// consumer warpgroups take turns on whole tiles (`pingpong`, 128-row tiles):
/// lora_gemm_tma_{nk,kn}_{dtype}, lora_gemm_tma256_{nk,kn}_{dtype} or lora_gemm_tma_pp_{nk,kn}_{dtype}.
pub fn tma_kernel_name(layout: BLayout, dtype: &str, tile_m: usize, pingpong: bool) -> String {
    let family = match (tile_m, pingpong) {
        (128, false) => "lora_gemm_tma_",
        (128, true) => "lora_gemm_tma_pp_",
        _ => "lora_gemm_tma256_",
    };
    kernel_name(layout, dtype).replacen("lora_gemm_", family, 1)
}

/// Sizes of one LoRA linear: m rows of x, n output features, k input features, rank r.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

/// Reference of the kernel's contract, row-major dense operands: c [m, n] = a1 [m, k1] · B1 +
/// a2 [m, k2] · B2 + bias, where B1 / B2 are b1 / b2 read as [n][k] (NMajor) or [k][n] (KMajor).
#[allow(clippy::too_many_arguments)]
pub fn concat_gemm(a1: &[f32], b1: &[f32], a2: &[f32], b2: &[f32], bias: Option<&[f32]>, (m, n, k1, k2): (usize, usize, usize, usize), layout: BLayout) -> Vec<f32> {
    let at = |b: &[f32], kk: usize, j: usize, kx: usize| match layout {
        BLayout::NMajor => b[j * kx + kk],
        BLayout::KMajor => b[kk * n + j],
    };
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f32;
            for kk in 0..k1 {
                s += a1[i * k1 + kk] * at(b1, kk, j, k1);
            }
            for kk in 0..k2 {
                s += a2[i * k2 + kk] * at(b2, kk, j, k2);
            }
            c[i * n + j] = s + bias.map_or(0.0, |b| b[j]);
        }
    }
    c
}

/// a [rows, inner] · b[cols, inner]^T, row-major.
fn mul_bt(a: &[f32], b: &[f32], rows: usize, cols: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        let ai = &a[i * inner..(i + 1) * inner];
        for j in 0..cols {
            out[i * cols + j] = ai.iter().zip(&b[j * inner..(j + 1) * inner]).map(|(p, q)| p * q).sum();
        }
    }
    out
}

/// a [inner, rows]^T · b [inner, cols], row-major.
fn mul_at(a: &[f32], b: &[f32], rows: usize, cols: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for p in 0..inner {
        for i in 0..rows {
            let v = a[p * rows + i];
            for (o, &q) in out[i * cols..(i + 1) * cols].iter_mut().zip(&b[p * cols..(p + 1) * cols]) {
                *o += v * q;
            }
        }
    }
    out
}

/// a [rows, inner] · b [inner, cols], row-major.
fn mul(a: &[f32], b: &[f32], rows: usize, cols: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for p in 0..inner {
            let v = a[i * inner + p];
            for (o, &q) in out[i * cols..(i + 1) * cols].iter_mut().zip(&b[p * cols..(p + 1) * cols]) {
                *o += v * q;
            }
        }
    }
    out
}

/// y [m, n] = x W^T + bias + s (x A^T) B^T, in the kernel's form: t = s x A^T, then
/// [x | t] · [W | B]^T + bias.
#[allow(clippy::too_many_arguments)]
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, a: &[f32], b: &[f32], scale: f32, d: LoraDims) -> Vec<f32> {
    let LoraDims { m, n, k, r } = d;
    let t: Vec<f32> = mul_bt(x, a, m, r, k).into_iter().map(|v| v * scale).collect();
    concat_gemm(x, w, &t, b, bias, (m, n, k, r), BLayout::NMajor)
}

/// Every gradient of the LoRA linear for the upstream gradient dy [m, n].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads {
    /// [m, k]
    pub dx: Vec<f32>,
    /// [n, k]
    pub dw: Vec<f32>,
    /// [r, k]
    pub da: Vec<f32>,
    /// [n, r]
    pub db: Vec<f32>,
    /// [n]
    pub dbias: Vec<f32>,
}

/// The backward formulas (t = x A^T, u = dy B): dx = [dy | s u] · [W ; A] (the kernel's k-major
/// form), dA = s u^T x, dB = s dy^T t, dbias = Σ_rows dy, dW = dy^T x.
#[allow(clippy::too_many_arguments)]
pub fn backward(x: &[f32], w: &[f32], a: &[f32], b: &[f32], scale: f32, dy: &[f32], d: LoraDims) -> LoraGrads {
    let LoraDims { m, n, k, r } = d;
    let t = mul_bt(x, a, m, r, k);
    let su: Vec<f32> = mul(dy, b, m, r, n).into_iter().map(|v| v * scale).collect();
    let dx = concat_gemm(dy, w, &su, a, None, (m, k, n, r), BLayout::KMajor);
    let da = mul_at(&su, x, r, k, m);
    let db: Vec<f32> = mul_at(dy, &t, n, r, m).into_iter().map(|v| v * scale).collect();
    let dw = mul_at(dy, x, n, k, m);
    let mut dbias = vec![0f32; n];
    for row in dy.chunks(n.max(1)).take(m) {
        for (s, &v) in dbias.iter_mut().zip(row) {
            *s += v;
        }
    }
    LoraGrads { dx, dw, da, db, dbias }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| (((i as u64 * 2654435761 + seed * 40503) % 1000) as f32 / 500.0 - 1.0) * 0.9).collect()
    }

    const D: LoraDims = LoraDims { m: 7, n: 5, k: 6, r: 3 };

    #[test]
    fn forward_matches_the_merged_weight() {
        // Independent form: y = x (W + s B A)^T + bias with the merged weight, naive loops.
        let LoraDims { m, n, k, r } = D;
        let (x, w, a, b, bias) = (values(m * k, 1), values(n * k, 2), values(r * k, 3), values(n * r, 4), values(n, 5));
        let s = 0.7;
        let y = forward(&x, &w, Some(&bias), &a, &b, s, D);
        for i in 0..m {
            for j in 0..n {
                let mut want = bias[j] as f64;
                for p in 0..k {
                    let mut weff = w[j * k + p] as f64;
                    for q in 0..r {
                        weff += s as f64 * b[j * r + q] as f64 * a[q * k + p] as f64;
                    }
                    want += x[i * k + p] as f64 * weff;
                }
                assert!((y[i * n + j] as f64 - want).abs() < 1e-5, "y[{i}][{j}] = {} want {want}", y[i * n + j]);
            }
        }
        // No bias, zero scale: the plain linear.
        let plain = forward(&x, &w, None, &a, &b, 0.0, D);
        assert_eq!(plain, concat_gemm(&x, &w, &[], &[], None, (m, n, k, 0), BLayout::NMajor));
    }

    #[test]
    fn concat_gemm_layouts_agree() {
        // The same product with B given as [n][k] rows and as its transpose [k][n].
        let (m, n, k1, k2) = (3, 4, 5, 2);
        let (a1, a2, b1, b2) = (values(m * k1, 6), values(m * k2, 7), values(n * k1, 8), values(n * k2, 9));
        let transpose = |b: &[f32], kx: usize| -> Vec<f32> { (0..kx * n).map(|i| b[(i % n) * kx + i / n]).collect() };
        let nk = concat_gemm(&a1, &b1, &a2, &b2, None, (m, n, k1, k2), BLayout::NMajor);
        let kn = concat_gemm(&a1, &transpose(&b1, k1), &a2, &transpose(&b2, k2), None, (m, n, k1, k2), BLayout::KMajor);
        assert_eq!(nk, kn);
    }

    #[test]
    fn backward_matches_naive_sums_and_finite_differences() {
        let LoraDims { m, n, k, r } = D;
        let (x, w, a, b, bias, dy) = (values(m * k, 11), values(n * k, 12), values(r * k, 13), values(n * r, 14), values(n, 15), values(m * n, 16));
        let s = 1.3;
        let g = backward(&x, &w, &a, &b, s, &dy, D);
        // Naive sums straight from y[i][j] = Σ_p x[i][p] (W[j][p] + s Σ_q B[j][q] A[q][p]) + bias[j].
        for i in 0..m {
            for p in 0..k {
                let mut want = 0f64;
                for j in 0..n {
                    let mut weff = w[j * k + p] as f64;
                    for q in 0..r {
                        weff += s as f64 * b[j * r + q] as f64 * a[q * k + p] as f64;
                    }
                    want += dy[i * n + j] as f64 * weff;
                }
                assert!((g.dx[i * k + p] as f64 - want).abs() < 1e-5, "dx[{i}][{p}]");
            }
        }
        for q in 0..r {
            for p in 0..k {
                let want: f64 = (0..m).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| s as f64 * dy[i * n + j] as f64 * b[j * r + q] as f64 * x[i * k + p] as f64).sum();
                assert!((g.da[q * k + p] as f64 - want).abs() < 1e-5, "dA[{q}][{p}]");
            }
        }
        for j in 0..n {
            for q in 0..r {
                let want: f64 = (0..m).flat_map(|i| (0..k).map(move |p| (i, p))).map(|(i, p)| s as f64 * dy[i * n + j] as f64 * a[q * k + p] as f64 * x[i * k + p] as f64).sum();
                assert!((g.db[j * r + q] as f64 - want).abs() < 1e-5, "dB[{j}][{q}]");
            }
            let want: f64 = (0..m).map(|i| dy[i * n + j] as f64).sum();
            assert!((g.dbias[j] as f64 - want).abs() < 1e-5, "dbias[{j}]");
        }
        // Finite differences of L = Σ dy ∘ y in f64 for a few entries of each input.
        let loss = |x: &[f32], w: &[f32], a: &[f32], b: &[f32], bias: &[f32]| -> f64 {
            forward(x, w, Some(bias), a, b, s, D).iter().zip(&dy).map(|(&y, &d)| y as f64 * d as f64).sum()
        };
        let h = 1e-2f32;
        let fd = |which: usize, idx: usize| -> f64 {
            let mut ins = [x.clone(), w.clone(), a.clone(), b.clone(), bias.clone()];
            ins[which][idx] += h;
            let up = loss(&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]);
            ins[which][idx] -= 2.0 * h;
            let down = loss(&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]);
            (up - down) / (2.0 * h as f64)
        };
        for (which, grad) in [(0, &g.dx), (1, &g.dw), (2, &g.da), (3, &g.db), (4, &g.dbias)] {
            for idx in [0, grad.len() / 2, grad.len() - 1] {
                let want = fd(which, idx);
                assert!((grad[idx] as f64 - want).abs() < 2e-3 * (1.0 + want.abs()), "input {which} [{idx}]: {} vs fd {want}", grad[idx]);
            }
        }
    }

    #[test]
    fn args_struct_matches_the_cuda_layout() {
        // 6 u64 + 12 u32, no padding (the CUDA struct has the same fields in the same order).
        assert_eq!(std::mem::size_of::<LoraGemmArgs>(), 6 * 8 + 12 * 4);
        assert_eq!(kernel_name(BLayout::KMajor, "bf16"), "lora_gemm_kn_bf16");
        assert_eq!(hopper_kernel_name(BLayout::NMajor, "f16"), "lora_gemm_hopper_nk_f16");
        assert_eq!(tma_kernel_name(BLayout::KMajor, "bf16", 128, false), "lora_gemm_tma_kn_bf16");
        assert_eq!(tma_kernel_name(BLayout::NMajor, "f16", 256, false), "lora_gemm_tma256_nk_f16");
        assert_eq!(tma_kernel_name(BLayout::NMajor, "bf16", 128, true), "lora_gemm_tma_pp_nk_bf16");
        assert_eq!(tma_mc_kernel_name(BLayout::KMajor, "f16"), "lora_gemm_tma_mc_kn_f16");
        // 8192 x 640: 32 pairs of row tiles x 4 column tiles on 66 clusters; 141 x 168 (2 row
        // tiles, 2 column tiles): 2 pairs; 300 rows (3 row tiles: a lone last one) x 160: 2 pairs.
        assert_eq!((tma_mc_pairs(8192, 640), tma_mc_blocks(8192, 640, 66), tma_mc_blocks(141, 168, 66), tma_mc_pairs(300, 160)), (128, 132, 4, 2));
        assert_eq!((tma_mc_blocks(300, 160, 1), tma_mc_blocks(1, 8, 0)), (2, 2));
        // Half the B box each, the boxes' bytes adding up to the tile's (160 x 64 halves).
        assert_eq!(2 * TMA_MC_BOX_B_NK.0 * TMA_MC_BOX_B_NK.1, 160 * 64);
        assert_eq!(2 * 5 * TMA_MC_BOX_B_KN.0 * TMA_MC_BOX_B_KN.1, 160 * 64);
        // Within the 227 KiB a block may opt into on sm_90.
        assert!(tma_shared_bytes(128) <= 232_448 && tma_shared_bytes(256) <= 232_448);
        // 32 x 4 tiles of 256 x 160 for M 8192, N 640.
        assert_eq!((tma_tiles(8192, 640, 256), tma_blocks(8192, 640, 256, 132), tma_blocks(141, 168, 128, 132)), (128, 128, 4));
        // 64 x 4 tiles of 128 x 160 for M 8192, N 640; at most one block an SM.
        assert_eq!((hopper_tiles(8192, 640), hopper_blocks(8192, 640, 132), hopper_blocks(141, 168, 132)), (256, 132, 4));
    }
}
