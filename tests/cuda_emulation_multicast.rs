//! The CPU emulator's thread-block cluster pipelines (kernels/emu/cuda_emulator.h, used by the
//! tma-mc LoRA GEMM of kernels/cuda/lora_linear_tma.cu): a TMA load multicast to several CTAs of
//! a cluster (each destination gets the box at the same shared-memory offset and the bytes on its
//! own mbarrier), arrivals on other CTAs' mbarriers (mapa + mbarrier.arrive.shared::cluster), and
//! the misuses the emulator must report: a CTA mask outside the cluster, an init not fenced or not
//! followed by a cluster barrier, a destination CTA that has exited, a remote address that is not
//! an mbarrier in shared memory, and an mbarrier count that lets a phase complete early. Test
//! kernels: kernels/emu/tests/tma_multicast.cu. Needs a C++ compiler (LOOKAHEAD_CXX, c++ or g++);
//! without one every test prints "skipped: no C++ compiler" and passes, unless `CI` is set.

use std::path::PathBuf;

use kernels::emulate::{EmulateError, EmulatedModule, Schedule, TensorMap2d, TensorMapArg, TmaDtype, TmaSwizzle};

#[path = "common/emulation.rs"]
mod emulation;
use emulation::{have_compiler, Aligned};

const SCHEDULES: [Schedule; 5] = [Schedule::RoundRobin, Schedule::FarApart, Schedule::Random(1), Schedule::Random(0x5eed), Schedule::Random(77)];

fn module() -> EmulatedModule {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels/emu/tests/tma_multicast.cu");
    EmulatedModule::load_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

const ROWS: u64 = 40;
const COLS: u64 = 100;
const STRIDE: u64 = 208; // bytes: 100 u16 rounded up to a multiple of 16

/// A 40 x 100 u16 matrix (rows 208 bytes apart) with distinct nonzero entries.
fn matrix() -> Aligned<u16> {
    let per_row = (STRIDE / 2) as usize;
    let v: Vec<u16> = (0..ROWS as usize * per_row).map(|i| if i % per_row < COLS as usize { 1 + (i * 137 % 65000) as u16 } else { 0xdead }).collect();
    Aligned::from(&v[..])
}

/// A box of 13 rows of 64 columns with the 128-byte swizzle.
fn map(base: u64) -> TensorMap2d {
    TensorMap2d { base, dtype: TmaDtype::U16, rows: ROWS, cols: COLS, row_stride_bytes: STRIDE, box_rows: 13, box_cols: 64, swizzle: TmaSwizzle::B128 }
}

/// The box at (x, y) as TMA leaves it in shared memory: row-major, zero outside, 128B swizzle.
fn box_reference(m: &[u16], x: i64, y: i64) -> Vec<u8> {
    let (bc, br) = (64usize, 13usize);
    let mut out = vec![0u8; bc * br * 2];
    for r in 0..br {
        for c in 0..bc {
            let (gr, gc) = (y + r as i64, x + c as i64);
            let v = if gr >= 0 && gc >= 0 && (gr as u64) < ROWS && (gc as u64) < COLS { m[gr as usize * (STRIDE / 2) as usize + gc as usize] } else { 0 };
            let o = (r * bc + c) * 2;
            let o = o ^ ((o >> 3) & 0x70);
            out[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Runs tma_multicast_tile on `clusters` clusters of `cs` CTAs; returns each CTA's dumped box.
#[allow(clippy::too_many_arguments)]
fn run_multicast(m: &EmulatedModule, arg: TensorMapArg, (x, y): (i32, i32), cs: u32, clusters: u32, mask: u32, src: u32, mode: i32, schedule: Schedule) -> Result<Vec<Vec<u8>>, EmulateError> {
    let box_bytes = 13 * 128u32;
    let grid = cs * clusters;
    let out = Aligned::<u32>::zeroed((grid * box_bytes / 4) as usize);
    let op = out.addr();
    // SAFETY: tma_multicast_tile(map, out, x, y, mask, src, box_bytes, mode) writes box_bytes / 4
    // words per CTA of out and reads the matrix the map describes.
    unsafe {
        m.launch_cluster_with("tma_multicast_tile", (grid, 1, 1), (64, 1, 1), (cs, 1, 1), box_bytes, schedule, &|f| {
            let k: extern "C" fn(TensorMapArg, u64, i32, i32, u32, u32, u32, i32) = std::mem::transmute(f);
            k(arg, op, x, y, mask, src, box_bytes, mode);
        })?
    };
    let bytes: Vec<u8> = out.to_vec().iter().flat_map(|w| w.to_le_bytes()).collect();
    Ok(bytes.chunks(box_bytes as usize).map(|c| c.to_vec()).collect())
}

#[test]
fn a_multicast_load_lands_in_every_cta_of_the_mask() {
    if !have_compiler("a_multicast_load_lands_in_every_cta_of_the_mask") {
        return;
    }
    let m = module();
    let a = matrix();
    let arg = map(a.addr()).emulated().unwrap();
    // (cluster size, mask, source rank): everyone, only the peer, the source not among the
    // destinations, a subset of four.
    for (cs, mask, src) in [(2u32, 0b11u32, 0u32), (2, 0b10, 0), (2, 0b01, 1), (4, 0b1111, 2), (4, 0b0101, 3)] {
        for (x, y) in [(8, 4), (60, 33)] {
            for schedule in SCHEDULES {
                let got = run_multicast(&m, arg, (x, y), cs, 2, mask, src, 0, schedule).unwrap_or_else(|e| panic!("{e}"));
                let want = box_reference(a.as_ref(), x as i64, y as i64);
                for (block, b) in got.iter().enumerate() {
                    let label = format!("cluster {cs} mask {mask:#b} source {src} box ({x}, {y}) schedule {schedule}: CTA {block}");
                    if mask >> (block as u32 % cs) & 1 == 1 {
                        assert_eq!(b, &want, "{label}");
                    } else {
                        assert!(b.iter().all(|&v| v == 0), "{label}: not a destination, but written");
                    }
                }
            }
        }
    }
}

/// The error messages of a run per schedule (None where it passed).
fn multicast_errors(m: &EmulatedModule, arg: TensorMapArg, mask: u32, src: u32, mode: i32) -> Vec<Option<String>> {
    SCHEDULES
        .iter()
        .map(|&schedule| match run_multicast(m, arg, (8, 4), 2, 1, mask, src, mode, schedule) {
            Ok(_) => None,
            Err(e @ EmulateError::Launch { .. }) => Some(e.to_string()),
            Err(e) => panic!("expected a launch error, got {e}"),
        })
        .collect()
}

#[test]
fn multicast_misuse_is_reported() {
    if !have_compiler("multicast_misuse_is_reported") {
        return;
    }
    let m = module();
    let a = matrix();
    let arg = map(a.addr()).emulated().unwrap();
    let always = |errs: Vec<Option<String>>, parts: &[&str]| {
        for e in errs {
            let e = e.expect("an error under every schedule");
            for p in parts {
                assert!(e.contains(p), "missing {p:?} in: {e}");
            }
        }
    };
    // A CTA outside the cluster of 2, and no CTA at all.
    always(multicast_errors(&m, arg, 0b101, 0, 0), &["tma_multicast_tile", "tma_load_2d_multicast at tma_multicast.cu:", "CTA mask 0x0005 names CTA 2, but the cluster has 2 CTAs"]);
    always(multicast_errors(&m, arg, 0, 0, 0), &["CTA mask 0x0 names no CTA"]);
    // The inits without fence_mbarrier_init.
    always(multicast_errors(&m, arg, 0b11, 0, 1), &["is used from CTA 0, but its initialising thread has not run fence_mbarrier_init"]);
    // __syncthreads instead of the cluster barrier after the inits: the peer's barrier is either
    // not initialised yet or its init not yet visible, depending on the order the CTAs run in.
    let errs: Vec<String> = [0u32, 1].iter().flat_map(|&src| multicast_errors(&m, arg, 0b11, src, 2)).map(|e| e.expect("an error under every schedule")).collect();
    for e in &errs {
        assert!(e.contains("is not an initialised mbarrier") || e.contains("without a cluster barrier since its init and fence_mbarrier_init"), "{e}");
    }
    assert!(errs.iter().any(|e| e.contains("without a cluster barrier since its init")), "{errs:?}");
    // The destination exits without the final cluster barrier: the copy lands in (or is issued
    // to) a CTA whose shared memory is gone, under some schedule (others deliver it in time).
    let errs: Vec<String> = multicast_errors(&m, arg, 0b11, 0, 3).into_iter().flatten().collect();
    assert!(!errs.is_empty(), "an exited destination went unnoticed under every schedule");
    for e in &errs {
        assert!(e.contains("which has exited") || e.contains("CTA 1 of the cluster has exited"), "{e}");
    }
    lookahead::show(&errs[0]);
}

/// Runs cluster_remote_arrive on 2 clusters of `cs` CTAs for `rounds` phases; returns the sums.
fn run_remote(m: &EmulatedModule, cs: u32, rounds: u32, mode: i32, schedule: Schedule) -> Result<Vec<u32>, EmulateError> {
    let grid = 2 * cs;
    let seen = Aligned::<u32>::zeroed(grid as usize);
    let sums = Aligned::<u32>::zeroed((grid * rounds) as usize);
    let word = Aligned::<u64>::zeroed(1);
    let (sp, up, wp) = (seen.addr(), sums.addr(), word.addr());
    // SAFETY: cluster_remote_arrive(seen, sums, global_word, cs, rounds, mode) writes grid words
    // of seen and grid * rounds of sums.
    unsafe {
        m.launch_cluster_with("cluster_remote_arrive", (grid, 1, 1), (32, 1, 1), (cs, 1, 1), 0, schedule, &|f| {
            let k: extern "C" fn(u64, u64, u64, u32, u32, i32) = std::mem::transmute(f);
            k(sp, up, wp, cs, rounds, mode);
        })?
    };
    Ok(sums.to_vec())
}

/// What every CTA of cluster c sums in `round`: Σ over its blocks b of b + 1 + round.
fn remote_sums(cs: u32, rounds: u32) -> Vec<u32> {
    (0..2 * cs).flat_map(|block| (0..rounds).map(move |round| (0..cs).map(|r| (block - block % cs) + r + 1 + round).sum())).collect()
}

#[test]
fn remote_arrivals_complete_every_ctas_phase() {
    if !have_compiler("remote_arrivals_complete_every_ctas_phase") {
        return;
    }
    let m = module();
    for cs in [2u32, 4] {
        for schedule in SCHEDULES {
            let got = run_remote(&m, cs, 3, 0, schedule).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, remote_sums(cs, 3), "cluster {cs}, schedule {schedule}");
        }
    }
}

#[test]
fn remote_arrive_misuse_is_reported() {
    if !have_compiler("remote_arrive_misuse_is_reported") {
        return;
    }
    let m = module();
    let err = |mode: i32, schedule: Schedule| match run_remote(&m, 2, 1, mode, schedule) {
        Err(e @ EmulateError::Launch { .. }) => e.to_string(),
        other => panic!("mode {mode}, schedule {schedule}: expected a launch error, got {other:?}"),
    };
    for schedule in SCHEDULES {
        let e = err(1, schedule);
        for part in ["cluster_remote_arrive", "mbarrier_arrive_cluster at tma_multicast.cu:", "CTA rank 2, but the cluster has 2 CTAs"] {
            assert!(e.contains(part), "missing {part:?} in: {e}");
        }
        let e = err(2, schedule);
        assert!(e.contains("is not in this CTA's shared memory"), "{e}");
        let e = err(3, schedule);
        assert!(e.contains("of CTA 1 is not an initialised mbarrier") || e.contains("of CTA 0 is not an initialised mbarrier"), "{e}");
        let e = err(4, schedule);
        assert!(e.contains("is not an initialised mbarrier") || e.contains("without a cluster barrier since its init"), "{e}");
    }
    // A count one short: some schedule lets a CTA pass its wait before the last CTA's write.
    let caught = SCHEDULES.iter().filter(|&&s| run_remote(&m, 2, 1, 5, s).map_or(true, |got| got != remote_sums(2, 1))).count();
    assert!(caught > 0, "a phase completing one arrival early went unnoticed under every schedule");
}
