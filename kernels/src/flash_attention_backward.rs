//! Gradients of flash extended attention, one (batch, head) at a time: the CPU reference of
//! kernels/cuda/flash_attention_backward.cu and the engine's CPU backend.
//!
//! The forward (kernels::flash_attention) attends each query row i over the keys
//! [own k (Lk rows) ; reference k_ref (Lr rows)], reference token j masked out when keep[j] == 0:
//!   s_j = scale * (q_i . key_j),  p_j = exp(s_j - lse_i),  out_i = sum_j p_j value_j.
//! Given dout, with delta_i = dout_i . out_i (the softmax's backward term, computed once a row):
//!   dv_j += p_j dout_i
//!   dp_j  = dout_i . value_j,  ds_j = p_j (dp_j - delta_i)
//!   dq_i += scale ds_j key_j,  dk_j += scale ds_j q_i
//! P is recomputed from the saved lse (natural log), so no Lq x L matrix is ever stored. Dropped
//! reference tokens have p = 0 and get zero gradients; a row with no key at all (lse = -inf)
//! contributes nothing. All math in f32; every gradient is written (overwritten), rows in a fixed
//! order, so the result is deterministic.

use crate::flash_attention::FlashDims;

/// kernels/cuda/flash_attention_backward.cu: the delta preprocess, the main kernel over key tiles,
/// and the dq f32 -> 16-bit conversion.
pub const SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "flash_attention_backward", code: include_str!("../cuda/flash_attention_backward.cu"), options: &[] };
/// The Hopper (sm_90a, wgmma) main kernel, kernels/cuda/flash_attention_backward_hopper.cu: the
/// same parameters and outputs as `flash_bwd_{dtype}_d{d}` of SOURCE, between SOURCE's prep and dq
/// kernels. Flush-to-zero (`--ftz=true`): exp2f is one MUFU.EX2 (probabilities below 2^-126
/// become 0).
pub const HOPPER_SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "flash_attention_backward_hopper", code: include_str!("../cuda/flash_attention_backward_hopper.cu"), options: &["--ftz=true"] };

/// Keys a block of the Hopper kernel owns (FBH_BC: 2 warpgroups of 64), for head dims 64 and 128.
pub const HOPPER_KEYS_PER_BLOCK: usize = 128;
/// Threads of a Hopper kernel block (FBH_THREADS).
pub const HOPPER_THREADS: u32 = 256;

/// Dynamic shared memory of the Hopper kernel (fbh_shared_bytes<D>): K and V of 128 keys, three
/// stages of Q and dO (64 query rows), two dS tiles (16-bit), three stages of lse2 and delta (f32),
/// at head dim 64 the two 16 KiB partial-dQ exchange buffers, and 1 KiB to align the start to a
/// swizzle atom: 146.5 KiB at d 64, 194.5 KiB at d 128. None for a head dim the kernel does not
/// take (only 64 and 128).
pub fn hopper_shared_bytes(d: usize) -> Option<u32> {
    let (bc, br, stages) = (HOPPER_KEYS_PER_BLOCK, 64, 3);
    let exchange = if d == 64 { 2 * 2 * 16 * 128 * 4 } else { 0 };
    matches!(d, 64 | 128).then(|| (2 * (2 * bc * d + 2 * stages * br * d + 2 * br * bc) + 8 * stages * br + exchange + 1024) as u32)
}

/// The Hopper main kernel's instance for a dtype name ("bf16" or "f16") and head dim 64 or 128.
pub fn hopper_kernel_name(dtype: &str, d: usize) -> String {
    format!("flash_bwd_hopper_{dtype}_d{d}")
}

/// The warp-specialized Hopper main kernel at head dim 64 (variants "ws" and "ws_stagger",
/// kernels/cuda/flash_attention_backward_ws.cu: instances flash_bwd_hopper_{variant}_{dtype}_d64):
/// the same parameters and outputs as HOPPER_SOURCE, built with flush-to-zero too.
pub const WS_SOURCE: crate::compile::KernelSource = crate::compile::KernelSource { name: "flash_attention_backward_ws", code: include_str!("../cuda/flash_attention_backward_ws.cu"), options: &["--ftz=true"] };

/// Threads of a "ws*" block (FBW_THREADS): two consumer warpgroups of 64 keys and one producer
/// warpgroup (copies and dQ atomics). Keys a block: HOPPER_KEYS_PER_BLOCK, as the default kernel.
pub const WS_THREADS: u32 = 384;

/// Dynamic shared memory of the "ws*" kernels (fbw_shared_bytes): K and V of 128 keys, three stages
/// of Q, dO (64 x 64) and lse2, delta, two dS buffers (64 x 64, 16-bit) and two partial-dQ buffers
/// (64 x 64 f32) per consumer warpgroup, 128 bytes of mbarriers, 1 KiB to align: 178.6 KiB.
pub fn ws_shared_bytes() -> u32 {
    let (bc, br, d, stages) = (128, 64, 64, 3);
    (2 * bc * d * 2 + stages * 2 * br * d * 2 + 2 * 2 * br * 64 * 2 + 2 * 2 * br * d * 4 + 2 * stages * br * 4 + 128 + 1024) as u32
}

/// How the Hopper main kernel of `variant` (None or "default": the default kernel; a variant name
/// of LOOKAHEAD_VARIANT_FLASH_BWD) launches at head dim `d`: its source, threads a block and
/// dynamic shared memory (keys a block: HOPPER_KEYS_PER_BLOCK for all). None for a head dim the
/// Hopper kernels do not take. Variants apply at head dim 64 only.
pub fn hopper_launch(d: usize, variant: Option<&str>) -> Option<(&'static crate::compile::KernelSource, u32, u32)> {
    let shared = hopper_shared_bytes(d)?;
    Some(match variant {
        Some(v) if d == 64 && v.starts_with("ws") => (&WS_SOURCE, WS_THREADS, ws_shared_bytes()),
        _ => (&HOPPER_SOURCE, HOPPER_THREADS, shared),
    })
}

/// Mirror of `FlashBwdParams` in kernels/cuda/flash_attention_backward.cuh, field by field (the
/// three kernels of the file take it by value; the .cu checks the same size, 496 bytes).
/// Pointers are device (or, under the emulator, host) addresses; strides are in elements
/// (batch, head, row; the dim stride is 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashBackwardParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub k_ref: u64,
    pub v_ref: u64,
    /// u8 [B or 1, Lr], 1 = attend; 0 (null) = every reference token attends.
    pub keep: u64,
    pub out: u64,
    pub dout: u64,
    /// f32 [B, H, Lq], natural log.
    pub lse: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dk_ref: u64,
    pub dv_ref: u64,
    /// f32 [B, H, Lq, D] contiguous scratch, zeroed by the prep kernel.
    pub dq_accum: u64,
    /// f32 [B, H, lq_pad] contiguous scratch each, written by the prep kernel.
    pub lse2: u64,
    pub delta: u64,
    pub q_stride: [i64; 3],
    pub k_stride: [i64; 3],
    pub v_stride: [i64; 3],
    pub k_ref_stride: [i64; 3],
    pub v_ref_stride: [i64; 3],
    pub out_stride: [i64; 3],
    pub dout_stride: [i64; 3],
    pub lse_stride: [i64; 3],
    pub dq_stride: [i64; 3],
    pub dk_stride: [i64; 3],
    pub dv_stride: [i64; 3],
    pub dk_ref_stride: [i64; 3],
    pub dv_ref_stride: [i64; 3],
    /// Lr for a [B, Lr] keep mask, 0 for one [Lr] row shared by the batch.
    pub keep_batch_stride: i64,
    pub batch: u32,
    pub heads: u32,
    pub lq: u32,
    pub lk: u32,
    pub lr: u32,
    /// Lq rounded up to a multiple of 4 (`lq_pad`).
    pub lq_pad: u32,
    pub d: u32,
    pub scale: f32,
    /// scale * log2(e).
    pub scale_log2: f32,
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<FlashBackwardParams>() == 496);

/// Threads of the prep and dq-conversion kernels' blocks (FAB_PREP_THREADS, FAB_DQ_THREADS).
pub const PREP_THREADS: u32 = 256;
pub const DQ_THREADS: u32 = 256;

/// Tiles of the main kernel for one head dim (FabConfig in the .cu): `warps` warps of 16 keys
/// each (bc = 16 warps keys a block), query tiles of `br` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardTiles {
    pub warps: u32,
    pub br: usize,
    pub bc: usize,
}

impl BackwardTiles {
    /// The tiles of head dim `d`, or None when the kernels do not take it (only 64 and 128).
    pub fn for_head_dim(d: usize) -> Option<BackwardTiles> {
        match d {
            64 => Some(BackwardTiles { warps: 8, br: 64, bc: 128 }),
            128 => Some(BackwardTiles { warps: 4, br: 32, bc: 64 }),
            _ => None,
        }
    }
    pub fn threads(&self) -> u32 {
        32 * self.warps
    }
    /// Dynamic shared memory of the main kernel (fab_shared_bytes<D>): K, V, two stages of Q and
    /// dO, dS^T (all 16-bit) and two stages of lse2 and delta (f32).
    pub fn shared_bytes(&self, d: usize) -> u32 {
        (2 * (2 * self.bc * d + 4 * self.br * d + self.bc * self.br) + 16 * self.br) as u32
    }
}

/// Lq rounded up to a multiple of 4: the per-head row length of the lse2 / delta scratch (16-byte
/// chunks for cp.async).
pub fn lq_pad(lq: usize) -> usize {
    lq.div_ceil(4) * 4
}

/// Kernel names for a dtype name ("bf16" or "f16"): (prep, main for head dim d, dq conversion).
pub fn kernel_names(dtype: &str, d: usize) -> (String, String, String) {
    (format!("flash_bwd_prep_{dtype}"), format!("flash_bwd_{dtype}_d{d}"), format!("flash_bwd_dq_{dtype}"))
}

/// Rows of one [L, D] matrix of a head: row r is data[r * row_stride .. r * row_stride + d]
/// (the last dim contiguous; any row stride, so [B, L, H, D] memory viewed as [B, H, L, D] is read
/// in place).
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
}

impl<'a> Rows<'a> {
    #[inline]
    fn row(&self, r: usize, d: usize) -> &'a [f32] {
        &self.data[r * self.row_stride..r * self.row_stride + d]
    }
    /// True when rows 0..rows of width d lie inside `data`.
    pub fn holds(&self, rows: usize, d: usize) -> bool {
        rows == 0 || d == 0 || (rows - 1) * self.row_stride + d <= self.data.len()
    }
}

/// The inputs of one head. `reference` is (k_ref, v_ref) with dims.lr rows (ignored when
/// dims.lr == 0); `keep` has dims.lr entries (1 = attend) or is None (all attend); `lse` has lq
/// entries `lse_stride` apart.
#[derive(Clone, Copy, Debug)]
pub struct HeadInputs<'a> {
    pub q: Rows<'a>,
    pub k: Rows<'a>,
    pub v: Rows<'a>,
    pub reference: Option<(Rows<'a>, Rows<'a>)>,
    pub keep: Option<&'a [u8]>,
    pub out: Rows<'a>,
    pub dout: Rows<'a>,
    pub lse: &'a [f32],
    pub lse_stride: usize,
}

/// Contiguous row-major outputs of one head: dq [lq, d], dk / dv [lk, d], dk_ref / dv_ref [lr, d]
/// (empty when lr == 0). Every element is overwritten.
pub struct HeadGrads<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
    pub dk_ref: &'a mut [f32],
    pub dv_ref: &'a mut [f32],
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

/// One key source (own or reference) of a head: its rows, keep mask and gradient outputs.
struct KeySource<'s, 'a> {
    k: Rows<'a>,
    v: Rows<'a>,
    keep: Option<&'a [u8]>,
    len: usize,
    dk: &'s mut [f32],
    dv: &'s mut [f32],
}

/// The gradients of one head (see the module comment). Panics only on slices too short for `dims`
/// (the engine checks extents before calling).
pub fn flash_attention_backward_head(x: &HeadInputs, dims: FlashDims, scale: f32, g: HeadGrads) {
    let FlashDims { lq, lk, lr, d } = dims;
    assert!(g.dq.len() == lq * d && g.dk.len() == lk * d && g.dv.len() == lk * d, "flash_attention_backward_head: own output sizes");
    assert!(g.dk_ref.len() == lr * d && g.dv_ref.len() == lr * d, "flash_attention_backward_head: reference output sizes");
    assert!(x.q.holds(lq, d) && x.out.holds(lq, d) && x.dout.holds(lq, d) && x.k.holds(lk, d) && x.v.holds(lk, d), "flash_attention_backward_head: input extents");
    assert!(lq == 0 || (lq - 1) * x.lse_stride < x.lse.len(), "flash_attention_backward_head: lse extent");
    g.dq.fill(0.0);
    g.dk.fill(0.0);
    g.dv.fill(0.0);
    g.dk_ref.fill(0.0);
    g.dv_ref.fill(0.0);
    let mut sources = vec![KeySource { k: x.k, v: x.v, keep: None, len: lk, dk: g.dk, dv: g.dv }];
    if lr > 0 {
        let (k_ref, v_ref) = x.reference.expect("flash_attention_backward_head: lr > 0 needs reference rows");
        assert!(k_ref.holds(lr, d) && v_ref.holds(lr, d), "flash_attention_backward_head: reference extents");
        if let Some(keep) = x.keep {
            assert_eq!(keep.len(), lr, "flash_attention_backward_head: keep length");
        }
        sources.push(KeySource { k: k_ref, v: v_ref, keep: x.keep, len: lr, dk: g.dk_ref, dv: g.dv_ref });
    }
    for i in 0..lq {
        let lse = x.lse[i * x.lse_stride];
        if lse == f32::NEG_INFINITY {
            continue; // no key at all: out = 0, nothing flows back
        }
        let (qi, oi, doi) = (x.q.row(i, d), x.out.row(i, d), x.dout.row(i, d));
        let delta = dot(doi, oi);
        let dqi = &mut g.dq[i * d..(i + 1) * d];
        for src in sources.iter_mut() {
            for j in 0..src.len {
                if src.keep.is_some_and(|m| m[j] == 0) {
                    continue;
                }
                let (kj, vj) = (src.k.row(j, d), src.v.row(j, d));
                let p = (scale * dot(qi, kj) - lse).exp();
                axpy(&mut src.dv[j * d..(j + 1) * d], p, doi);
                let ds = p * (dot(doi, vj) - delta);
                axpy(dqi, scale * ds, kj);
                axpy(&mut src.dk[j * d..(j + 1) * d], scale * ds, qi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// The naive forward in f64: keys [k ; k_ref] with dropped reference tokens left out.
    /// Returns (out [lq, d], lse [lq]).
    #[allow(clippy::too_many_arguments)]
    fn forward(q: &[f64], k: &[f64], v: &[f64], kr: &[f64], vr: &[f64], keep: &[u8], dims: FlashDims, scale: f64) -> (Vec<f64>, Vec<f64>) {
        let FlashDims { lq, lk, lr, d } = dims;
        let mut keys: Vec<(&[f64], &[f64])> = (0..lk).map(|j| (&k[j * d..(j + 1) * d], &v[j * d..(j + 1) * d])).collect();
        keys.extend((0..lr).filter(|&j| keep[j] != 0).map(|j| (&kr[j * d..(j + 1) * d], &vr[j * d..(j + 1) * d])));
        let mut out = vec![0f64; lq * d];
        let mut lse = vec![f64::NEG_INFINITY; lq];
        for i in 0..lq {
            let qi = &q[i * d..(i + 1) * d];
            let s: Vec<f64> = keys.iter().map(|(kj, _)| scale * qi.iter().zip(*kj).map(|(a, b)| a * b).sum::<f64>()).collect();
            if s.is_empty() {
                continue;
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - m).exp()).sum();
            lse[i] = m + sum.ln();
            for (sj, (_, vj)) in s.iter().zip(&keys) {
                let p = (sj - lse[i]).exp();
                for (o, x) in out[i * d..(i + 1) * d].iter_mut().zip(*vj) {
                    *o += p * x;
                }
            }
        }
        (out, lse)
    }

    fn rows(x: &[f32], row_stride: usize) -> Rows<'_> {
        Rows { data: x, row_stride }
    }

    fn f32s(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    /// Gradients from the reference vs central finite differences of L = sum(out * dout) through
    /// the f64 forward, for every input element.
    fn check(dims: FlashDims, keep: &[u8], seed: u64) {
        let FlashDims { lq, lk, lr, d } = dims;
        let scale = 0.7;
        let mut inputs = [values(lq * d, seed), values(lk * d, seed + 1), values(lk * d, seed + 2), values(lr * d, seed + 3), values(lr * d, seed + 4)];
        let dout = values(lq * d, seed + 5);
        let loss = |x: &[Vec<f64>; 5]| -> f64 {
            let (out, _) = forward(&x[0], &x[1], &x[2], &x[3], &x[4], keep, dims, scale);
            out.iter().zip(&dout).map(|(a, b)| a * b).sum()
        };
        let (out, lse) = forward(&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4], keep, dims, scale);
        let x32: Vec<Vec<f32>> = inputs.iter().map(|x| f32s(x)).collect();
        let (out32, lse32, dout32) = (f32s(&out), f32s(&lse), f32s(&dout));
        let x = HeadInputs {
            q: rows(&x32[0], d),
            k: rows(&x32[1], d),
            v: rows(&x32[2], d),
            reference: Some((rows(&x32[3], d), rows(&x32[4], d))),
            keep: Some(keep),
            out: rows(&out32, d),
            dout: rows(&dout32, d),
            lse: &lse32,
            lse_stride: 1,
        };
        let mut grads: Vec<Vec<f32>> = [lq, lk, lk, lr, lr].iter().map(|&n| vec![f32::NAN; n * d]).collect();
        {
            let [dq, dk, dv, dkr, dvr] = &mut grads[..] else { unreachable!() };
            flash_attention_backward_head(&x, dims, scale as f32, HeadGrads { dq, dk, dv, dk_ref: dkr, dv_ref: dvr });
        }
        let h = 1e-5;
        for (which, grad) in grads.iter().enumerate() {
            for e in 0..grad.len() {
                let keep_e = inputs[which][e];
                inputs[which][e] = keep_e + h;
                let up = loss(&inputs);
                inputs[which][e] = keep_e - h;
                let down = loss(&inputs);
                inputs[which][e] = keep_e;
                let want = (up - down) / (2.0 * h);
                let got = grad[e] as f64;
                assert!((got - want).abs() <= 2e-4 + 1e-3 * want.abs(), "dims {dims:?} input {which} element {e}: {got} vs finite difference {want}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check(FlashDims { lq: 3, lk: 2, lr: 4, d: 3 }, &[1, 1, 1, 1], 1);
        // Dropped reference tokens get zero gradients (checked against the finite differences,
        // which are exactly 0 there).
        check(FlashDims { lq: 5, lk: 3, lr: 5, d: 4 }, &[1, 0, 1, 0, 0], 7);
        // No own keys at all.
        check(FlashDims { lq: 2, lk: 0, lr: 3, d: 2 }, &[0, 1, 1], 13);
        // No reference.
        check(FlashDims { lq: 4, lk: 5, lr: 0, d: 3 }, &[], 17);
    }

    #[test]
    fn a_row_without_keys_gives_zero_gradients() {
        // Lk = 0 and every reference token dropped: out = 0, lse = -inf, all gradients 0.
        let dims = FlashDims { lq: 3, lk: 0, lr: 2, d: 2 };
        check(dims, &[0, 0], 21);
        let ones = vec![1f32; 6];
        let lse = [f32::NEG_INFINITY; 3];
        let zero = [0f32; 6];
        let x = HeadInputs { q: rows(&ones, 2), k: rows(&[], 2), v: rows(&[], 2), reference: Some((rows(&ones[..4], 2), rows(&ones[..4], 2))), keep: Some(&[0, 0]), out: rows(&zero, 2), dout: rows(&ones, 2), lse: &lse, lse_stride: 1 };
        let (mut dq, mut dkr, mut dvr) = (vec![f32::NAN; 6], vec![f32::NAN; 4], vec![f32::NAN; 4]);
        flash_attention_backward_head(&x, dims, 1.0, HeadGrads { dq: &mut dq, dk: &mut [], dv: &mut [], dk_ref: &mut dkr, dv_ref: &mut dvr });
        assert!(dq.iter().chain(&dkr).chain(&dvr).all(|&v| v == 0.0), "{dq:?} {dkr:?} {dvr:?}");
    }

    #[test]
    fn strided_rows_read_in_place() {
        // q/k/v/out/dout as heads of [L, H=2, D] memory (row stride 2 d) give the same gradients as
        // contiguous copies of head 1.
        let dims = FlashDims { lq: 3, lk: 4, lr: 2, d: 3 };
        let d = dims.d;
        let interleaved = |l: usize, seed: u64| f32s(&values(l * 2 * d, seed));
        let head1 = |x: &[f32], l: usize| -> Vec<f32> { (0..l).flat_map(|r| x[r * 2 * d + d..r * 2 * d + 2 * d].to_vec()).collect() };
        let (q, k, v, kr, vr, out, dout) = (interleaved(3, 1), interleaved(4, 2), interleaved(4, 3), interleaved(2, 4), interleaved(2, 5), interleaved(3, 6), interleaved(3, 7));
        // Head 1's lse entries are 1, 3, 5 (stride 2).
        let lse = [0.5f32, 0.1, 0.9, 0.3, 7.0, 0.2];
        let run = |x: &HeadInputs| {
            let mut g: Vec<Vec<f32>> = [3, 4, 4, 2, 2].iter().map(|&n| vec![0f32; n * d]).collect();
            let [dq, dk, dv, dkr, dvr] = &mut g[..] else { unreachable!() };
            flash_attention_backward_head(x, dims, 0.5, HeadGrads { dq, dk, dv, dk_ref: dkr, dv_ref: dvr });
            g
        };
        let strided = |x| rows(x, 2 * d);
        let a = run(&HeadInputs { q: strided(&q[d..]), k: strided(&k[d..]), v: strided(&v[d..]), reference: Some((strided(&kr[d..]), strided(&vr[d..]))), keep: Some(&[1, 0]), out: strided(&out[d..]), dout: strided(&dout[d..]), lse: &lse[1..], lse_stride: 2 });
        let (q1, k1, v1, kr1, vr1, o1, do1) = (head1(&q, 3), head1(&k, 4), head1(&v, 4), head1(&kr, 2), head1(&vr, 2), head1(&out, 3), head1(&dout, 3));
        let lse1 = [lse[1], lse[3], lse[5]];
        let plain = |x| rows(x, d);
        let b = run(&HeadInputs { q: plain(&q1), k: plain(&k1), v: plain(&v1), reference: Some((plain(&kr1), plain(&vr1))), keep: Some(&[1, 0]), out: plain(&o1), dout: plain(&do1), lse: &lse1, lse_stride: 1 });
        assert_eq!(a, b);
        assert!(a[0].iter().any(|&x| x != 0.0) && a[4][d..].iter().all(|&x| x == 0.0));
    }
}
