//! The single-launch cluster group-norm (+SiLU) forward kernels (kernels/cuda/group_norm.cu) on
//! the CPU emulator of CUDA with thread-block clusters, against the CPU reference
//! (kernels::norm::group_norm): the register kernel gn_cluster_DT_pP (the `cluster-regs` variant)
//! and the shared-memory kernels gn_cluster_smem_DT (`cluster-smem`) and
//! gn_cluster_smem_async_DT (`cluster-smem-async`, cp.async loads), as engine/src/cuda/norm.rs
//! launches them; f32, bf16 and f16; SiLU on and off; with and without weight / bias; clusters of
//! 2 and 4 CTAs. Shapes: channels of 130 / 260 packs (channel boundaries inside a CTA's range and
//! inside warps, a partly used last stride / a last CTA with fewer packs), channels of 1-2 packs
//! (most threads idle), and a group smaller than the cluster (CTAs that own no pack). y starts as
//! NaN, so an unwritten element shows.

use kernels::emulate::EmulatedModule;
use kernels::norm as knorm;
use kernels::norm::group_norm;

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
/// holds the group, or the shared-memory kernel with ceil(packs / cs) packs a CTA.
#[allow(clippy::too_many_arguments)]
fn run_kernel(module: &EmulatedModule, kernel: Kernel, dt: Dt, k: Case, cs: usize, x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, silu: bool) -> Vec<f32> {
    let packs = (k.c / k.groups) * k.hw / dt.pack();
    let bx = Buf::new(dt, x);
    let by = Buf::new(dt, &vec![f32::NAN; x.len()]);
    let (bw, bb) = (w.map(Aligned::from), b.map(Aligned::from));
    let (wp, bp) = (bw.as_ref().map_or(0, |a| a.addr()), bb.as_ref().map_or(0, |a| a.addr()));
    let (xp, yp) = (bx.addr(), by.addr());
    let grid = (k.n * k.groups * cs) as u32;
    let (c32, hw32, g32, cs32, act) = (k.c as u32, k.hw as u32, k.groups as u32, cs as u32, silu as i32);
    match kernel {
        Kernel::Regs => {
            let p = PACKS.into_iter().find(|&p| p * cs * BLOCK >= packs).expect("the group fits 16 packs a thread");
            let name = format!("gn_cluster_{}_p{p}", dt.name());
            // SAFETY: the signature is gn_cluster_DT_pP's (x, y, w, b, C, HW, G, cs, eps, act);
            // the buffers outlive the launch (16-byte aligned, HW % V == 0, the group fits).
            unsafe {
                module
                    .launch_cluster(&name, (grid, 1, 1), (BLOCK as u32, 1, 1), (cs32, 1, 1), 0, &|f| {
                        let kernel: extern "C" fn(u64, u64, u64, u64, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
                        kernel(xp, yp, wp, bp, c32, hw32, g32, cs32, 1e-5, act);
                    })
                    .unwrap_or_else(|e| panic!("{name} {k:?} cs {cs}: {e}"));
            }
        }
        Kernel::Smem | Kernel::SmemAsync => {
            let per = packs.div_ceil(cs);
            let name = if kernel == Kernel::Smem { format!("gn_cluster_smem_{}", dt.name()) } else { format!("gn_cluster_smem_async_{}", dt.name()) };
            let per32 = per as u32;
            // SAFETY: the signature is gn_cluster_smem_DT's (x, y, w, b, C, HW, G, cs, per, eps,
            // act); per * 16 bytes of dynamic shared memory; cs * per >= packs.
            unsafe {
                module
                    .launch_cluster(&name, (grid, 1, 1), (BLOCK as u32, 1, 1), (cs32, 1, 1), (per * 16) as u32, &|f| {
                        let kernel: extern "C" fn(u64, u64, u64, u64, u32, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
                        kernel(xp, yp, wp, bp, c32, hw32, g32, cs32, per32, 1e-5, act);
                    })
                    .unwrap_or_else(|e| panic!("{name} {k:?} cs {cs}: {e}"));
            }
        }
    }
    by.values()
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
                            group_norm(&x, k.n, k.c, k.hw, k.groups, wo, bo, 1e-5, silu, &mut want);
                            let got = run_kernel(&module, kernel, dt, k, cs, &x, wo, bo, silu);
                            let (atol, rtol) = dt.tolerance();
                            assert_close(&label, &got, &want, atol, rtol);
                        }
                    }
                }
            }
        }
    }
}
