//! The single-launch cluster group-norm (+SiLU) forward kernels (kernels/cuda/group_norm.cu) on
//! the CPU emulator of CUDA with thread-block clusters, against the CPU reference
//! (kernels::norm::group_norm_with_stats): the register kernel gn_cluster_DT_pP (the
//! `cluster-regs` variant) and the shared-memory kernels gn_cluster_smem_DT (`cluster-smem`) and
//! gn_cluster_smem_async_DT (`cluster-smem-async`, cp.async loads), as engine/src/cuda/norm.rs
//! launches them; f32, bf16 and f16; SiLU on and off; with and without weight / bias; clusters of
//! 2 and 4 CTAs; the statistics they save for the backward ([N, G, 2] (mean, rstd)) and the same
//! y without them (a null pointer). Also the grid-resident channels-last forward gn_grid_nhwc_DT
//! (norm.cu) saving them. Shapes: channels of 130 / 260 packs (channel boundaries inside a CTA's
//! range and inside warps, a partly used last stride / a last CTA with fewer packs), channels of
//! 1-2 packs (most threads idle), and a group smaller than the cluster (CTAs that own no pack). y
//! and the statistics start as NaN, so an unwritten element shows.

use kernels::emulate::EmulatedModule;
use kernels::norm as knorm;
use kernels::norm::group_norm_with_stats;

#[path = "common/emulation.rs"]
mod emulation;
use emulation::{have_compiler, values, Aligned, Half};

#[path = "common/group_norm_emulation.rs"]
mod group_norm_emulation;
use group_norm_emulation::{Buf, Case, Dt, BLOCK, PACKS};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Regs,
    Smem,
    SmemAsync,
}

/// Runs one forward kernel in clusters of `cs` CTAs: the register kernel with the smallest P that
/// holds the group, or the shared-memory kernel with ceil(packs / cs) packs a CTA. Returns y and,
/// with `want_stats`, the saved statistics ([N, G, 2], starting as NaN; else a null pointer).
#[allow(clippy::too_many_arguments)]
fn run_kernel(module: &EmulatedModule, kernel: Kernel, dt: Dt, k: Case, cs: usize, x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, silu: bool, want_stats: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let packs = (k.c / k.groups) * k.hw / dt.pack();
    let bx = Buf::new(dt, x);
    let by = Buf::new(dt, &vec![f32::NAN; x.len()]);
    let (bw, bb) = (w.map(Aligned::from), b.map(Aligned::from));
    let (wp, bp) = (bw.as_ref().map_or(0, |a| a.addr()), bb.as_ref().map_or(0, |a| a.addr()));
    let stats = Aligned::from(&vec![f32::NAN; 2 * k.n * k.groups][..]);
    let sp = if want_stats { stats.addr() } else { 0 };
    let (xp, yp) = (bx.addr(), by.addr());
    let grid = (k.n * k.groups * cs) as u32;
    let (c32, hw32, g32, cs32, act) = (k.c as u32, k.hw as u32, k.groups as u32, cs as u32, silu as i32);
    match kernel {
        Kernel::Regs => {
            let p = PACKS.into_iter().find(|&p| p * cs * BLOCK >= packs).expect("the group fits 16 packs a thread");
            let name = format!("gn_cluster_{}_p{p}", dt.name());
            // SAFETY: the signature is gn_cluster_DT_pP's (x, y, w, b, stats, C, HW, G, cs, eps,
            // act); the buffers outlive the launch (16-byte aligned, HW % V == 0, the group fits;
            // stats 2 N G floats or null).
            unsafe {
                module
                    .launch_cluster(&name, (grid, 1, 1), (BLOCK as u32, 1, 1), (cs32, 1, 1), 0, &|f| {
                        let kernel: extern "C" fn(u64, u64, u64, u64, u64, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
                        kernel(xp, yp, wp, bp, sp, c32, hw32, g32, cs32, 1e-5, act);
                    })
                    .unwrap_or_else(|e| panic!("{name} {k:?} cs {cs}: {e}"));
            }
        }
        Kernel::Smem | Kernel::SmemAsync => {
            let per = packs.div_ceil(cs);
            let name = if kernel == Kernel::Smem { format!("gn_cluster_smem_{}", dt.name()) } else { format!("gn_cluster_smem_async_{}", dt.name()) };
            let per32 = per as u32;
            // SAFETY: the signature is gn_cluster_smem_DT's (x, y, w, b, stats, C, HW, G, cs, per,
            // eps, act); per * 16 bytes of dynamic shared memory; cs * per >= packs; stats 2 N G
            // floats or null.
            unsafe {
                module
                    .launch_cluster(&name, (grid, 1, 1), (BLOCK as u32, 1, 1), (cs32, 1, 1), (per * 16) as u32, &|f| {
                        let kernel: extern "C" fn(u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
                        kernel(xp, yp, wp, bp, sp, c32, hw32, g32, cs32, per32, 1e-5, act);
                    })
                    .unwrap_or_else(|e| panic!("{name} {k:?} cs {cs}: {e}"));
            }
        }
    }
    (by.values(), want_stats.then(|| stats.to_vec()))
}

/// Asserts the kernel's saved statistics against the CPU reference's (f32 sums over the cluster
/// against f64 ones: a few f32 ulps of the mean's scale and of rstd).
fn assert_stats(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: statistics length");
    for (q, (g, w)) in got.chunks(2).zip(want.chunks(2)).enumerate() {
        assert!((g[0] - w[0]).abs() <= 2e-6 * (1.0 + w[0].abs()), "{label}: group {q} mean {} want {}", g[0], w[0]);
        assert!((g[1] - w[1]).abs() <= 2e-5 * w[1], "{label}: group {q} rstd {} want {}", g[1], w[1]);
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_close(label: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{label}: element {i} is NaN (unwritten?), want {r}");
        let excess = (g - r).abs() - (atol + rtol * r.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{label}: element {i}: got {} want {} (atol {atol}, rtol {rtol})", got[i], want[i]);
}

#[test]
fn cluster_forward_matches_cpu_reference() {
    if !have_compiler("cluster_forward_matches_cpu_reference") {
        return;
    }
    let module = EmulatedModule::load(&knorm::GROUP_NORM_SOURCE).expect("group_norm.cu builds for the emulator");
    let cases = [
        Case { n: 2, c: 10, hw: 1040, groups: 2 },
        Case { n: 3, c: 12, hw: 8, groups: 3 },
        // 1 pack (16-bit) / 2 packs (f32) a group: CTAs past the first own nothing.
        Case { n: 2, c: 4, hw: 8, groups: 4 },
    ];
    for dt in [Dt::F32, Dt::Half(Half::Bf16), Dt::Half(Half::F16)] {
        for (ci, &k) in cases.iter().enumerate() {
            let len = k.n * k.c * k.hw;
            let seed = 10 * ci as u64 + 500;
            // A common offset (the shifted first sum) and a spread.
            let x = dt.round(&values(len, seed + 1).iter().map(|v| 1.5 + 2.0 * v).collect::<Vec<_>>());
            let w: Vec<f32> = values(k.c, seed + 3).iter().map(|v| 1.5 * v).collect();
            let b: Vec<f32> = values(k.c, seed + 4).iter().map(|v| 0.5 * v).collect();
            for kernel in [Kernel::Regs, Kernel::Smem, Kernel::SmemAsync] {
                for cs in [2, 4] {
                    for silu in [false, true] {
                        for affine in [false, true] {
                            let (wo, bo) = if affine { (Some(&w[..]), Some(&b[..])) } else { (None, None) };
                            let label = format!("{kernel:?} {} {k:?} cs {cs} silu {silu} affine {affine}", dt.name());
                            let mut want = vec![0f32; len];
                            let mut want_stats = vec![0f32; 2 * k.n * k.groups];
                            group_norm_with_stats(&x, k.n, k.c, k.hw, k.groups, wo, bo, 1e-5, silu, &mut want, Some(&mut want_stats));
                            // With the statistics saved (every run), then without (a null pointer:
                            // the same y, bit for bit).
                            let (got, stats) = run_kernel(&module, kernel, dt, k, cs, &x, wo, bo, silu, true);
                            let (atol, rtol) = dt.tolerance();
                            assert_close(&label, &got, &want, atol, rtol);
                            assert_stats(&label, &stats.expect("asked"), &want_stats);
                            if affine && silu {
                                let (plain, none) = run_kernel(&module, kernel, dt, k, cs, &x, wo, bo, silu, false);
                                assert!(none.is_none());
                                assert_eq!(bits(&plain), bits(&got), "{label}: y without saved statistics");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The grid-resident channels-last forward (gn_grid_nhwc_DT, norm.cu) with and without saved
/// statistics: y against the CPU reference, the statistics (its gn_finalize_group's, written by
/// one thread a (sample, group)) against group_norm_with_stats, and the same y with a null
/// pointer. The emulator runs the cooperative launch as one cluster of all its blocks (grid_sync
/// is then the cluster barrier); slices of 13 positions (the last 11), all or 5 of them in shared
/// memory, and 5 positions over 4 lanes (an empty slice).
#[test]
fn grid_forward_saves_statistics() {
    if !have_compiler("grid_forward_saves_statistics") {
        return;
    }
    let module = EmulatedModule::load(&knorm::SOURCE).expect("norm.cu builds for the emulator");
    // (case, lanes, held positions (None: the whole slice), threads)
    let cases = [(Case { n: 2, c: 16, hw: 37, groups: 4 }, 3usize, None, 128u32), (Case { n: 2, c: 16, hw: 37, groups: 2 }, 3, Some(5), 128), (Case { n: 2, c: 8, hw: 5, groups: 2 }, 4, None, 64)];
    for dt in [Dt::F32, Dt::Half(Half::Bf16), Dt::Half(Half::F16)] {
        for (ci, &(k, lanes, held, threads)) in cases.iter().enumerate() {
            if k.c % dt.pack() != 0 {
                continue;
            }
            let len = k.n * k.c * k.hw;
            let seed = 10 * ci as u64 + 700;
            // Sample 1 at an offset: the saved mean carries it.
            let x = dt.round(&values(len, seed + 1).iter().enumerate().map(|(i, v)| 2.0 * v + if i >= k.c * k.hw { 40.0 } else { 0.0 }).collect::<Vec<_>>());
            let w: Vec<f32> = values(k.c, seed + 3).iter().map(|v| 1.5 * v).collect();
            let b: Vec<f32> = values(k.c, seed + 4).iter().map(|v| 0.5 * v).collect();
            let silu = ci % 2 == 0;
            let label = format!("gn_grid_nhwc {} {k:?} lanes {lanes} held {held:?} threads {threads} silu {silu}", dt.name());
            let mut want = vec![0f32; len];
            let mut want_stats = vec![0f32; 2 * k.n * k.groups];
            group_norm_with_stats(&x, k.n, k.c, k.hw, k.groups, Some(&w), Some(&b), 1e-5, silu, &mut want, Some(&mut want_stats));
            let (got, stats) = run_grid(&module, dt, k, lanes, held, threads, &x, &w, &b, silu, true);
            let (atol, rtol) = dt.tolerance();
            assert_close(&label, &got, &want, atol.max(3e-5), rtol.max(3e-5));
            assert_stats(&label, &stats.expect("asked"), &want_stats);
            let (plain, none) = run_grid(&module, dt, k, lanes, held, threads, &x, &w, &b, silu, false);
            assert!(none.is_none());
            assert_eq!(bits(&plain), bits(&got), "{label}: y without saved statistics");
        }
    }
}

/// One gn_grid_nhwc_DT launch on NCHW `x` stored channels-last: (y in NCHW, the statistics when
/// `want_stats`, else a null pointer).
#[allow(clippy::too_many_arguments)]
fn run_grid(module: &EmulatedModule, dt: Dt, k: Case, lanes: usize, held: Option<usize>, threads: u32, x: &[f32], w: &[f32], b: &[f32], silu: bool, want_stats: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let (n, c, hw) = (k.n, k.c, k.hw);
    let nchw_of = |i: usize| (i / (hw * c) * c + i % c) * hw + i / c % hw;
    let stored: Vec<f32> = (0..x.len()).map(|i| x[nchw_of(i)]).collect();
    let (bx, by) = (Buf::new(dt, &stored), Buf::new(dt, &vec![f32::NAN; x.len()]));
    let (bw, bb) = (Aligned::from(w), Aligned::from(b));
    let part = Aligned::<f32>::zeroed(3 * n * c * lanes);
    let coef = Aligned::<f32>::zeroed(4 * n * c);
    let stats = Aligned::from(&vec![f32::NAN; 2 * n * k.groups][..]);
    let bar = Aligned::<u32>::zeroed(2);
    let ppb = hw.div_ceil(lanes);
    let held = held.unwrap_or(ppb);
    let shared = (held * c * 16 / dt.pack()) as u32;
    let (xp, yp, wp, bp, pp, cp, barp) = (bx.addr(), by.addr(), bw.addr(), bb.addr(), part.addr(), coef.addr(), bar.addr());
    let sp = if want_stats { stats.addr() } else { 0 };
    let (c32, hw32, g32, ppb32, held32, act) = (c as u32, hw as u32, k.groups as u32, ppb as u32, held as u32, silu as i32);
    let name = format!("gn_grid_nhwc_{}", dt.name());
    // SAFETY: gn_grid_nhwc_DT's argument list (x, y, w, b, part, coef, stats, bar, C, HW, G, ppb,
    // held, eps, act); x and y hold N C HW elements (16-byte aligned, C % V == 0, C / V <=
    // threads), part 3 N C L floats, coef 4 N C, stats 2 N G or null, bar two zeroed u32, held C
    // elements of dynamic shared memory; every block of the grid runs at once (one cluster).
    unsafe {
        module.launch_cluster(&name, (lanes as u32, n as u32, 1), (threads, 1, 1), (lanes as u32, n as u32, 1), shared, &|f| {
            let kernel: extern "C" fn(u64, u64, u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
            kernel(xp, yp, wp, bp, pp, cp, sp, barp, c32, hw32, g32, ppb32, held32, 1e-5, act);
        })
    }
    .unwrap_or_else(|e| panic!("{name} {k:?}: {e}"));
    let got = by.values();
    let mut y = vec![0f32; got.len()];
    for (i, &v) in got.iter().enumerate() {
        y[nchw_of(i)] = v;
    }
    (y, want_stats.then(|| stats.to_vec()))
}
