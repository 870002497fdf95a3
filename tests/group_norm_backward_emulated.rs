//! The single-pass cluster group-norm (+SiLU) backward (gn_cluster_bwd_DT_pP,
//! kernels/cuda/group_norm.cu) on the CPU emulator of CUDA with thread-block clusters, against
//! the CPU reference (kernels::norm_backward::group_norm_backward): dx, and dweight / dbias summed
//! by the kernel's f32 atomic adds into zeroed buffers; f32, bf16 and f16; SiLU on and off; with
//! and without weight / bias; clusters of 2 and 4 CTAs; statistics recomputed (null) or the
//! forward's saved ones (moved off the true ones, so that a kernel recomputing them anyway fails,
//! and, bit for bit, the cluster forward's own). Shapes: channels of 130 / 260 packs (channel
//! boundaries inside warps, packs past one stride of the cluster so each thread holds several, a
//! partly used last stride), and channels of 1-2 packs (many channel runs per warp, most threads
//! idle). dx starts as NaN, so an unwritten element shows. Also norm.cu's two-phase and
//! grid-resident backwards, with and without saved statistics.

use kernels::emulate::EmulatedModule;
use kernels::norm as knorm;
use kernels::norm::group_norm_with_stats;
use kernels::norm_backward::group_norm_backward;

#[path = "common/emulation.rs"]
mod emulation;
use emulation::{have_compiler, values, Aligned, Half};

#[path = "common/group_norm_emulation.rs"]
mod group_norm_emulation;
use group_norm_emulation::{Buf, Case, Dt, BLOCK, PACKS};

/// What one emulated launch returns: dx, and (dweight, dbias) when asked.
type Grads = (Vec<f32>, Option<(Vec<f32>, Vec<f32>)>);

/// Runs gn_cluster_bwd_DT_pP in clusters of `cs` CTAs with the smallest P that holds the group,
/// as the engine's plan picks it.
#[allow(clippy::too_many_arguments)]
fn run_kernel(module: &EmulatedModule, dt: Dt, k: Case, cs: usize, x: &[f32], dy: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, silu: bool, stats: Option<&[f32]>, params: bool) -> Grads {
    let packs = (k.c / k.groups) * k.hw / dt.pack();
    let p = PACKS.into_iter().find(|&p| p * cs * BLOCK >= packs).expect("the group fits 16 packs a thread");
    let name = format!("gn_cluster_bwd_{}_p{p}", dt.name());
    let (bx, bdy) = (Buf::new(dt, x), Buf::new(dt, dy));
    let bdx = Buf::new(dt, &vec![f32::NAN; x.len()]);
    let (bw, bb) = (w.map(Aligned::from), b.map(Aligned::from));
    let (dw, db) = (Aligned::<f32>::zeroed(k.c), Aligned::<f32>::zeroed(k.c));
    let (dwp, dbp) = if params { (dw.addr(), db.addr()) } else { (0, 0) };
    let (wp, bp) = (bw.as_ref().map_or(0, |a| a.addr()), bb.as_ref().map_or(0, |a| a.addr()));
    let (xp, dyp, dxp) = (bx.addr(), bdy.addr(), bdx.addr());
    let saved = stats.map(Aligned::from);
    let sp = saved.as_ref().map_or(0, |a| a.addr());
    let grid = (k.n * k.groups * cs) as u32;
    // SAFETY: the signature is gn_cluster_bwd_DT_pP's (x, dy, dx, w, b, stats, dw, db, C, HW, G,
    // cs, eps, act); every buffer outlives the launch and holds what the kernel reads or writes
    // (host guarantees: 16-byte aligned tensors, HW % V == 0, the group fits cs * BLOCK * P packs,
    // C / G <= GNC_MAX_CPG, dw / db zeroed, stats 2 N G floats or null).
    unsafe {
        module
            .launch_cluster(&name, (grid, 1, 1), (BLOCK as u32, 1, 1), (cs as u32, 1, 1), 0, &|f| {
                let kernel: extern "C" fn(u64, u64, u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
                kernel(xp, dyp, dxp, wp, bp, sp, dwp, dbp, k.c as u32, k.hw as u32, k.groups as u32, cs as u32, 1e-5, silu as i32);
            })
            .unwrap_or_else(|e| panic!("{name} {k:?} cs {cs}: {e}"));
    }
    (bdx.values(), params.then(|| (dw.to_vec(), db.to_vec())))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The statistics the register cluster forward (gn_cluster_DT_pP, same `cs` and P as the
/// backward's plan) saves for x.
fn run_forward_stats(module: &EmulatedModule, dt: Dt, k: Case, cs: usize, x: &[f32]) -> Vec<f32> {
    let packs = (k.c / k.groups) * k.hw / dt.pack();
    let p = PACKS.into_iter().find(|&p| p * cs * BLOCK >= packs).expect("the group fits 16 packs a thread");
    let name = format!("gn_cluster_{}_p{p}", dt.name());
    let (bx, by) = (Buf::new(dt, x), Buf::new(dt, &vec![0f32; x.len()]));
    let stats = Aligned::from(&vec![f32::NAN; 2 * k.n * k.groups][..]);
    let (xp, yp, sp) = (bx.addr(), by.addr(), stats.addr());
    let grid = (k.n * k.groups * cs) as u32;
    // SAFETY: gn_cluster_DT_pP's signature (x, y, w, b, stats, C, HW, G, cs, eps, act); x and y
    // hold N C HW elements (16-byte aligned, HW % V == 0, the group fits), stats 2 N G floats.
    unsafe {
        module
            .launch_cluster(&name, (grid, 1, 1), (BLOCK as u32, 1, 1), (cs as u32, 1, 1), 0, &|f| {
                let kernel: extern "C" fn(u64, u64, u64, u64, u64, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
                kernel(xp, yp, 0, 0, sp, k.c as u32, k.hw as u32, k.groups as u32, cs as u32, 1e-5, 1);
            })
            .unwrap_or_else(|e| panic!("{name} {k:?} cs {cs}: {e}"));
    }
    stats.to_vec()
}

/// Asserts |got - want| <= atol + rtol |want| elementwise (NaN fails), naming the worst element.
fn assert_close(label: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
        let excess = (g - r).abs() - (atol + rtol * r.abs());
        assert!(!g.is_nan(), "{label}: element {i} is NaN (unwritten?), want {r}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{label}: element {i}: got {} want {} (atol {atol}, rtol {rtol})", got[i], want[i]);
}

/// A case's inputs in the kernel's dtype: x with a common offset (the shifted first sum) and a
/// spread, dy in [-1, 1), weight and bias (f32).
fn inputs(dt: Dt, k: Case, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = k.n * k.c * k.hw;
    let x = dt.round(&values(len, seed + 1).iter().map(|v| 1.5 + 2.0 * v).collect::<Vec<_>>());
    let dy = dt.round(&values(len, seed + 2));
    let w: Vec<f32> = values(k.c, seed + 3).iter().map(|v| 1.5 * v).collect();
    let b: Vec<f32> = values(k.c, seed + 4).iter().map(|v| 0.5 * v).collect();
    (x, dy, w, b)
}

/// Statistics to hand a backward as the forward's ([N, G, 2] (mean, rstd)): the CPU forward's,
/// then moved (mean + 0.3, rstd * 1.25) so that a kernel that recomputed them instead would not
/// match a reference given the same ones.
fn saved_stats(k: Case, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let mut st = vec![0f32; 2 * k.n * k.groups];
    group_norm_with_stats(x, k.n, k.c, k.hw, k.groups, None, None, 1e-5, false, &mut y, Some(&mut st));
    st.chunks(2).flat_map(|q| [q[0] + 0.3, q[1] * 1.25]).collect()
}

/// Asserts a kernel's (dx, dweight, dbias) against the CPU reference on the same inputs (and the
/// same saved statistics, when the kernel had them): dx within
/// the dtype's tolerance; dweight / dbias, sums of n * hw f32 terms in another order (per-warp runs,
/// per-CTA or per-block shared sums, atomics) than the reference's f64, within a bound that scales
/// with sqrt(terms).
#[allow(clippy::too_many_arguments)]
fn assert_matches_reference(label: &str, dt: Dt, k: Case, x: &[f32], dy: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, silu: bool, stats: Option<&[f32]>, dx: &[f32], dw: &[f32], db: &[f32]) {
    let (mut dx_ref, mut dw_ref, mut db_ref) = (vec![0f32; x.len()], vec![0f32; k.c], vec![0f32; k.c]);
    group_norm_backward(x, dy, k.n, k.c, k.hw, k.groups, w, b, 1e-5, silu, stats, &mut dx_ref, Some(&mut dw_ref), Some(&mut db_ref));
    let (atol, rtol) = dt.tolerance();
    assert_close(&format!("{label} dx"), dx, &dx_ref, atol, rtol);
    let atol_p = 2e-5 * ((k.n * k.hw) as f32).sqrt() * if matches!(dt, Dt::F32) { 1.0 } else { 4.0 };
    assert_close(&format!("{label} dweight"), dw, &dw_ref, atol_p, 1e-5);
    assert_close(&format!("{label} dbias"), db, &db_ref, atol_p, 1e-5);
}

#[test]
fn cluster_backward_matches_cpu_reference() {
    if !have_compiler("cluster_backward_matches_cpu_reference") {
        return;
    }
    let module = EmulatedModule::load(&knorm::GROUP_NORM_SOURCE).expect("group_norm.cu builds for the emulator");
    let fwd = &module;
    let cases = [
        // 5 channels a group of 1040 = 130 packs (16-bit) / 260 packs (f32): runs end mid-warp;
        // 650 / 1300 packs a group: P 2 / 4 with 2 CTAs, P 2 / 2 with 4.
        Case { n: 2, c: 10, hw: 1040, groups: 2 },
        // 1 / 2 packs a channel, 3 samples, 4 channels a group: many runs in a warp, idle threads.
        Case { n: 3, c: 12, hw: 8, groups: 3 },
    ];
    for dt in [Dt::F32, Dt::Half(Half::Bf16), Dt::Half(Half::F16)] {
        for (ci, &k) in cases.iter().enumerate() {
            let (x, dy, w, b) = inputs(dt, k, 10 * ci as u64);
            let saved = saved_stats(k, &x);
            for cs in [2, 4] {
                for silu in [false, true] {
                    for affine in [false, true] {
                        let (wo, bo) = if affine { (Some(&w[..]), Some(&b[..])) } else { (None, None) };
                        let label = format!("{} {k:?} cs {cs} silu {silu} affine {affine}", dt.name());
                        let (dx, grads) = run_kernel(&module, dt, k, cs, &x, &dy, wo, bo, silu, None, true);
                        let (dw, db) = grads.expect("asked");
                        assert_matches_reference(&label, dt, k, &x, &dy, wo, bo, silu, None, &dx, &dw, &db);
                        // With saved statistics: the reference given the same ones.
                        let (dxs, grads) = run_kernel(&module, dt, k, cs, &x, &dy, wo, bo, silu, Some(&saved), true);
                        let (dws, dbs) = grads.expect("asked");
                        assert_matches_reference(&format!("{label} saved stats"), dt, k, &x, &dy, wo, bo, silu, Some(&saved), &dxs, &dws, &dbs);
                        // Without parameter gradients: the same dx (dw / db untouched), with and
                        // without saved statistics (the saved path's own block barrier).
                        if cs == 2 && affine {
                            for (st, want) in [(None, &dx), (Some(&saved[..]), &dxs)] {
                                let (dx2, none) = run_kernel(&module, dt, k, cs, &x, &dy, wo, bo, silu, st, false);
                                assert!(none.is_none());
                                assert_eq!(bits(&dx2), bits(want), "{label}: dx without dw / db, saved stats {}", st.is_some());
                            }
                        }
                        // The cluster forward's own statistics (same cs: the same sums, term for
                        // term): dx, dw, db bit for bit those of the recomputing backward.
                        if silu {
                            let own = run_forward_stats(&fwd, dt, k, cs, &x);
                            let (dxo, grads) = run_kernel(&module, dt, k, cs, &x, &dy, wo, bo, silu, Some(&own), true);
                            assert_eq!(bits(&dxo), bits(&dx), "{label}: dx from the forward's statistics");
                            let (dwo, dbo) = grads.expect("asked");
                            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()));
                            assert!(close(&dwo, &dw) && close(&dbo, &db), "{label}: dw / db from the forward's statistics");
                        }
                    }
                }
            }
        }
    }
}

/// Runs one of norm.cu's group-norm dx kernels on `x`, `dy` and (mean, rstd, mg, mgx) `coef`
/// per (n, c): "scalar" (gn_bwd_dx_DT, either layout), "pack" (gn_bwd_dx_pack_DT, NCHW) or
/// "nhwc" (gn_bwd_dx_nhwc_DT, 2 lanes).
#[allow(clippy::too_many_arguments)]
fn run_dx(module: &EmulatedModule, kind: &str, dt: Dt, k: Case, channels_last: bool, x: &[f32], dy: &[f32], coef: &[f32], w: &[f32], b: &[f32], silu: bool) -> Vec<f32> {
    let (bx, bdy) = (Buf::new(dt, x), Buf::new(dt, dy));
    let bdx = Buf::new(dt, &vec![f32::NAN; x.len()]);
    let (bc, bw, bb) = (Aligned::from(coef), Aligned::from(w), Aligned::from(b));
    let (xp, dyp, dxp, cp, wp, bp) = (bx.addr(), bdy.addr(), bdx.addr(), bc.addr(), bw.addr(), bb.addr());
    let total = (k.n * k.c * k.hw) as u32;
    let (c32, hw32, act, cl) = (k.c as u32, k.hw as u32, silu as i32, channels_last as i32);
    let name = format!("gn_bwd_dx_{}{}", if kind == "scalar" { String::new() } else { format!("{kind}_") }, dt.name());
    let grid = match kind {
        "scalar" => (total.div_ceil(BLOCK as u32), 1, 1),
        "pack" => ((total / dt.pack() as u32).div_ceil(BLOCK as u32), 1, 1),
        _ => (2, k.n as u32, 1),
    };
    // SAFETY: the signatures are the kernels' (norm.cu); every buffer outlives the launch and is
    // 16-byte aligned; HW % V == 0 (pack) / C % V == 0 with C / V <= BLOCK (nhwc).
    unsafe {
        module
            .launch(&name, grid, (BLOCK as u32, 1, 1), 0, &|f| match kind {
                "scalar" => {
                    let kernel: extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, i32, i32) = std::mem::transmute(f);
                    kernel(xp, dyp, cp, wp, bp, dxp, total, c32, hw32, cl, act);
                }
                "pack" => {
                    let kernel: extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, i32) = std::mem::transmute(f);
                    kernel(xp, dyp, cp, wp, bp, dxp, total, c32, hw32, act);
                }
                _ => {
                    let kernel: extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, i32) = std::mem::transmute(f);
                    kernel(xp, dyp, cp, wp, bp, dxp, c32, hw32, act);
                }
            })
            .unwrap_or_else(|e| panic!("{name} {k:?}: {e}"));
    }
    bdx.values()
}

/// The packed dx kernels of the two-phase backward (gn_bwd_dx_pack_DT for NCHW, gn_bwd_dx_nhwc_DT
/// for channels-last: engine/src/cuda/norm.rs runs them where the data allows) compute what the
/// scalar gn_bwd_dx_DT computes, element for element; every element written.
#[test]
fn packed_dx_kernels_match_scalar() {
    if !have_compiler("packed_dx_kernels_match_scalar") {
        return;
    }
    let module = EmulatedModule::load(&knorm::SOURCE).expect("norm.cu builds for the emulator");
    for dt in [Dt::F32, Dt::Half(Half::Bf16), Dt::Half(Half::F16)] {
        // NCHW: planes of 24 (3 / 6 packs); channels-last: rows of 24 channels (3 / 6 packs), 5
        // positions over 2 lanes (a lane with fewer positions).
        for (kind, channels_last, k) in [("pack", false, Case { n: 2, c: 6, hw: 24, groups: 3 }), ("nhwc", true, Case { n: 2, c: 24, hw: 5, groups: 4 })] {
            let len = k.n * k.c * k.hw;
            let x = dt.round(&values(len, 71).iter().map(|v| 0.5 + 2.0 * v).collect::<Vec<_>>());
            let dy = dt.round(&values(len, 72));
            // (mean, rstd > 0, mg, mgx) per (n, c).
            let coef: Vec<f32> = values(4 * k.n * k.c, 73).chunks(4).flat_map(|q| [q[0], 1.0 + q[1].abs(), 0.1 * q[2], 0.1 * q[3]]).collect();
            let (w, b) = (values(k.c, 74), values(k.c, 75));
            for silu in [false, true] {
                let want = run_dx(&module, "scalar", dt, k, channels_last, &x, &dy, &coef, &w, &b, silu);
                let got = run_dx(&module, kind, dt, k, channels_last, &x, &dy, &coef, &w, &b, silu);
                assert_close(&format!("{kind} {} {k:?} silu {silu}", dt.name()), &got, &want, 0.0, 0.0);
            }
        }
    }
}

/// The two-phase backward (norm.cu) as engine/src/cuda/norm.rs launches it where the cluster
/// kernel does not apply: gn_stats_DT -> gn_finalize_DT (mean, rstd; skipped when the forward's
/// statistics are given), gn_bwd_reduce_DT (per
/// channel and lane sums), gn_bwd_finalize (per channel coefficients), the dx kernel and
/// gn_bwd_params (dweight, dbias), against the CPU reference. NCHW planes of 8 packs' multiples
/// (gn_bwd_reduce_nchw's packed loads, 3 lanes, a short last one) and of an odd length (its scalar
/// loop); channels-last with C a multiple of the pack (gn_bwd_dx_nhwc) over 2 lanes.
#[test]
fn two_phase_backward_matches_cpu_reference() {
    if !have_compiler("two_phase_backward_matches_cpu_reference") {
        return;
    }
    let module = EmulatedModule::load(&knorm::SOURCE).expect("norm.cu builds for the emulator");
    // (layout, case, lanes): chunk = HW / lanes rounded up to a multiple of 8, as gn_lanes.
    let cases = [(false, Case { n: 2, c: 6, hw: 200, groups: 3 }, 3usize), (false, Case { n: 2, c: 4, hw: 45, groups: 2 }, 2), (true, Case { n: 2, c: 16, hw: 9, groups: 4 }, 2)];
    for dt in [Dt::F32, Dt::Half(Half::Bf16), Dt::Half(Half::F16)] {
        for (ci, &(channels_last, k, lanes)) in cases.iter().enumerate() {
            let (x, dy, w, b) = inputs(dt, k, 100 + 10 * ci as u64);
            let saved = saved_stats(k, &x);
            for silu in [false, true] {
                for stats in [None, Some(&saved[..])] {
                    let label = format!("{} {k:?} channels_last {channels_last} lanes {lanes} silu {silu} saved stats {}", dt.name(), stats.is_some());
                    let (dx, dw, db) = run_two_phase(&module, dt, k, channels_last, lanes, &x, &dy, &w, &b, silu, stats);
                    assert_matches_reference(&label, dt, k, &x, &dy, Some(&w), Some(&b), silu, stats, &dx, &dw, &db);
                }
            }
        }
    }
}

/// The buffers of a two-phase or grid backward launch for one case: x and dy stored NCHW or
/// channels-last, dx starting as NaN (an unwritten element shows), weight, bias, the f32 work
/// buffers (partials for `lanes` lanes, statistics (the forward's when `saved`), coefficients)
/// and zeroed dweight / dbias.
struct BackwardBuffers {
    k: Case,
    channels_last: bool,
    x: Buf,
    dy: Buf,
    dx: Buf,
    w: Aligned<f32>,
    b: Aligned<f32>,
    part: Aligned<f32>,
    stats: Aligned<f32>,
    coef: Aligned<f32>,
    dw: Aligned<f32>,
    db: Aligned<f32>,
}

impl BackwardBuffers {
    #[allow(clippy::too_many_arguments)]
    fn new(dt: Dt, k: Case, channels_last: bool, lanes: usize, x: &[f32], dy: &[f32], w: &[f32], b: &[f32], saved: Option<&[f32]>) -> BackwardBuffers {
        let (n, c) = (k.n, k.c);
        let mut t = BackwardBuffers {
            k,
            channels_last,
            x: Buf::new(dt, &[]),
            dy: Buf::new(dt, &[]),
            dx: Buf::new(dt, &vec![f32::NAN; x.len()]),
            w: Aligned::from(w),
            b: Aligned::from(b),
            part: Aligned::zeroed(3 * n * c * lanes),
            stats: saved.map_or_else(|| Aligned::zeroed(2 * n * k.groups), Aligned::from),
            coef: Aligned::zeroed(4 * n * c),
            dw: Aligned::zeroed(c),
            db: Aligned::zeroed(c),
        };
        let stored = |v: &[f32]| (0..v.len()).map(|i| v[t.nchw_of(i)]).collect::<Vec<f32>>();
        let (sx, sdy) = (stored(x), stored(dy));
        (t.x, t.dy) = (Buf::new(dt, &sx), Buf::new(dt, &sdy));
        t
    }

    /// NCHW index of the i-th stored element.
    fn nchw_of(&self, i: usize) -> usize {
        let (c, hw) = (self.k.c, self.k.hw);
        if self.channels_last {
            (i / (hw * c) * c + i % c) * hw + i / c % hw
        } else {
            i
        }
    }

    /// (dx in NCHW, dweight, dbias).
    fn results(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let got = self.dx.values();
        let mut dx = vec![0f32; got.len()];
        for (i, &v) in got.iter().enumerate() {
            dx[self.nchw_of(i)] = v;
        }
        (dx, self.dw.to_vec(), self.db.to_vec())
    }
}

/// One two-phase backward on NCHW `x` / `dy` (stored channels-last when asked): (dx in NCHW,
/// dweight, dbias).
#[allow(clippy::too_many_arguments)]
fn run_two_phase(module: &EmulatedModule, dt: Dt, k: Case, channels_last: bool, lanes: usize, x: &[f32], dy: &[f32], w: &[f32], b: &[f32], silu: bool, saved: Option<&[f32]>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, c, hw) = (k.n, k.c, k.hw);
    let t = BackwardBuffers::new(dt, k, channels_last, lanes, x, dy, w, b, saved);
    let (xp, dyp, dxp, wp, bp, pp, sp, cp) = (t.x.addr(), t.dy.addr(), t.dx.addr(), t.w.addr(), t.b.addr(), t.part.addr(), t.stats.addr(), t.coef.addr());
    let (dwp, dbp) = (t.dw.addr(), t.db.addr());
    let (n32, c32, hw32, g32, l32, cl, act) = (n as u32, c as u32, hw as u32, k.groups as u32, lanes as u32, channels_last as i32, silu as i32);
    let chunk = (hw.div_ceil(lanes).div_ceil(8) * 8) as u32;
    assert_eq!(hw.div_ceil(chunk as usize), lanes, "lanes must cover hw in chunks of a multiple of 8");
    let dtn = dt.name();
    let block = (BLOCK as u32, 1, 1);
    let run = |name: &str, grid: (u32, u32, u32), call: &dyn Fn(*const std::ffi::c_void)| {
        // SAFETY: each call below transmutes to its kernel's signature (norm.cu); the buffers
        // outlive the launch and hold what the kernel reads or writes: part 3 N C L floats (the
        // backward uses 2 N C L), stats 2 N G, coef 4 N C, dw / db C, the tensors N C HW elements,
        // 16-byte aligned; C % V == 0 with C / V <= BLOCK for the channels-last dx kernel.
        unsafe { module.launch(name, grid, block, 0, call) }.unwrap_or_else(|e| panic!("{name} {k:?}: {e}"));
    };
    // SAFETY (transmutes): the signatures of norm.cu's kernels, argument for argument.
    unsafe {
        if saved.is_none() {
            if channels_last {
                run(&format!("gn_stats_nhwc_{dtn}"), (l32, n32, 1), &|f| std::mem::transmute::<_, extern "C" fn(u64, u64, u32, u32)>(f)(xp, pp, c32, hw32));
            } else {
                run(&format!("gn_stats_nchw_{dtn}"), ((n * c) as u32, l32, 1), &|f| std::mem::transmute::<_, extern "C" fn(u64, u64, u32, u32)>(f)(xp, pp, hw32, chunk));
            }
            run(&format!("gn_finalize_{dtn}"), ((n * k.groups) as u32, 1, 1), &|f| {
                std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, i32, f32)>(f)(xp, pp, sp, 0, wp, bp, n32, c32, hw32, g32, l32, cl, 1e-5)
            });
        }
        if channels_last {
            run(&format!("gn_bwd_reduce_nhwc_{dtn}"), (l32, n32, 1), &|f| {
                std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, i32)>(f)(xp, dyp, sp, wp, bp, pp, c32, hw32, g32, act)
            });
        } else {
            run(&format!("gn_bwd_reduce_nchw_{dtn}"), ((n * c) as u32, l32, 1), &|f| {
                std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, i32)>(f)(xp, dyp, sp, wp, bp, pp, c32, hw32, g32, chunk, act)
            });
        }
        run("gn_bwd_finalize", ((n * k.groups) as u32, 1, 1), &|f| std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u64, u32, u32, u32, u32, u32)>(f)(pp, sp, wp, cp, n32, c32, hw32, g32, l32));
        if channels_last {
            run(&format!("gn_bwd_dx_nhwc_{dtn}"), (l32, n32, 1), &|f| std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, i32)>(f)(xp, dyp, cp, wp, bp, dxp, c32, hw32, act));
        } else {
            let total = (n * c * hw) as u32;
            run(&format!("gn_bwd_dx_{dtn}"), (total.div_ceil(BLOCK as u32), 1, 1), &|f| {
                std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, i32, i32)>(f)(xp, dyp, cp, wp, bp, dxp, total, c32, hw32, cl, act)
            });
        }
        run("gn_bwd_params", (c32, 1, 1), &|f| std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u32, u32, u32)>(f)(pp, dwp, dbp, n32, c32, l32));
    }
    t.results()
}

/// The grid-resident channels-last backward (gn_grid_bwd_nhwc_DT, norm.cu) against the CPU
/// reference: dx, dweight, dbias. The emulator runs a cooperative launch as one cluster of all its
/// blocks (grid_sync is the cluster barrier), so at most 16 blocks. Slices short and empty
/// (5 positions over 4 lanes), all of them in shared memory or only the first positions.
#[test]
fn grid_backward_matches_cpu_reference() {
    if !have_compiler("grid_backward_matches_cpu_reference") {
        return;
    }
    let module = EmulatedModule::load(&knorm::SOURCE).expect("norm.cu builds for the emulator");
    // (case, lanes, held positions (None: the whole slice), threads)
    let cases = [(Case { n: 2, c: 16, hw: 37, groups: 4 }, 3usize, None, 128u32), (Case { n: 2, c: 16, hw: 37, groups: 4 }, 3, Some(4), 128), (Case { n: 2, c: 8, hw: 5, groups: 2 }, 4, None, 64)];
    for dt in [Dt::F32, Dt::Half(Half::Bf16), Dt::Half(Half::F16)] {
        for (ci, &(k, lanes, held, threads)) in cases.iter().enumerate() {
            if k.c % dt.pack() != 0 {
                continue;
            }
            let (x, dy, w, b) = inputs(dt, k, 300 + 10 * ci as u64);
            let saved = saved_stats(k, &x);
            for silu in [false, true] {
                for stats in [None, Some(&saved[..])] {
                    let label = format!("{} {k:?} lanes {lanes} held {held:?} threads {threads} silu {silu} saved stats {}", dt.name(), stats.is_some());
                    let (dx, dw, db) = run_grid_backward(&module, dt, k, lanes, held, threads, &x, &dy, &w, &b, silu, stats);
                    assert_matches_reference(&label, dt, k, &x, &dy, Some(&w), Some(&b), silu, stats, &dx, &dw, &db);
                }
            }
        }
    }
}

/// One gn_grid_bwd_nhwc_DT launch on NCHW `x` / `dy` stored channels-last: (dx in NCHW, dweight,
/// dbias).
#[allow(clippy::too_many_arguments)]
fn run_grid_backward(
    module: &EmulatedModule,
    dt: Dt,
    k: Case,
    lanes: usize,
    held: Option<usize>,
    threads: u32,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    b: &[f32],
    silu: bool,
    saved: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, c, hw) = (k.n, k.c, k.hw);
    let t = BackwardBuffers::new(dt, k, true, lanes, x, dy, w, b, saved);
    let bar = Aligned::<u32>::zeroed(2);
    let ppb = hw.div_ceil(lanes);
    let held = held.unwrap_or(ppb);
    let elem = if matches!(dt, Dt::F32) { 4 } else { 2 };
    let shared = (2 * held * c * elem) as u32;
    let (xp, dyp, dxp, wp, bp, pp, sp, cp) = (t.x.addr(), t.dy.addr(), t.dx.addr(), t.w.addr(), t.b.addr(), t.part.addr(), t.stats.addr(), t.coef.addr());
    let (dwp, dbp, barp) = (t.dw.addr(), t.db.addr(), bar.addr());
    let (c32, hw32, g32, ppb32, held32, act, have) = (c as u32, hw as u32, k.groups as u32, ppb as u32, held as u32, silu as i32, saved.is_some() as i32);
    let name = format!("gn_grid_bwd_nhwc_{}", dt.name());
    // SAFETY: gn_grid_bwd_nhwc_DT's argument list (.., eps, act, saved); the tensors hold N C HW
    // elements (16-byte aligned, C % V == 0, C / V <= threads), part 3 N C L floats, stats 2 N G
    // (the forward's when saved), coef 4 N C, dw / db
    // C, bar two zeroed u32, 2 held C elements of dynamic shared memory; every block of the grid
    // runs at once (one cluster).
    unsafe {
        module.launch_cluster(&name, (lanes as u32, n as u32, 1), (threads, 1, 1), (lanes as u32, n as u32, 1), shared, &|f| {
            let kernel: extern "C" fn(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, f32, i32, i32) = std::mem::transmute(f);
            kernel(xp, dyp, dxp, wp, bp, dwp, dbp, pp, sp, cp, barp, c32, hw32, g32, ppb32, held32, 1e-5, act, have);
        })
    }
    .unwrap_or_else(|e| panic!("{name} {k:?}: {e}"));
    t.results()
}
