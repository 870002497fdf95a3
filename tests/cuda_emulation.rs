//! The CPU emulator of the CUDA kernels (kernels::emulate, kernels/emu): (a) its own semantics,
//! with purpose-written kernels (kernels/emu/tests/*.cu) checked against plain Rust math: mma
//! and every ldmatrix variant through matmuls and register dumps, cp.async group ordering, warp
//! shuffles and votes, barriers with early exits, dynamic shared memory, deadlock and launch
//! errors, missing barriers that the far-apart schedule must expose (and their fixed versions
//! passing under every schedule); (b) existing kernel families run under emulation against the CPU reference the engine
//! uses (kernels/src/{softmax,norm}.rs), on odd sizes. Needs a C++ compiler (LOOKAHEAD_CXX, c++ or
//! g++); without one every test prints "skipped: no C++ compiler" and passes, unless `CI` is set.

use std::path::PathBuf;

use half::{bf16, f16};
use kernels::emulate::{EmulateError, EmulatedModule, Schedule};

#[path = "common/emulation.rs"]
mod emulation;
use emulation::{have_compiler, values, Aligned};

// ---- harness ---------------------------------------------------------------------------------------

/// A test kernel file of the emulator (kernels/emu/tests/NAME.cu), built and loaded.
fn test_module(name: &str) -> EmulatedModule {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels/emu/tests").join(format!("{name}.cu"));
    EmulatedModule::load_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn family(src: &kernels::compile::KernelSource) -> EmulatedModule {
    EmulatedModule::load(src).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts |got - want| <= atol + rtol |want| everywhere (NaN only where NaN is expected); the
/// message names the worst element.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = if g.is_nan() || w.is_nan() { if g.is_nan() && w.is_nan() { 0.0 } else { f32::INFINITY } } else { (g - w).abs() - (atol + rtol * w.abs()) };
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!("{what}: element {i} is {} but expected {} (atol {atol}, rtol {rtol})", got[i], want[i]);
    }
}

// ---- (a) tensor cores: mma_16816 and ldmatrix --------------------------------------------------

const MT: usize = 16;
const NT: usize = 16;
const KT: usize = 32;

/// A (16 x 32), B (32 x 16), C (16 x 16) with distinct entries that are exact in bf16 and f16 and
/// whose products and sums are exact in f32 (multiples of 1/128 below 2^16), so any layout mistake
/// changes the result and the right one matches exactly.
fn matmul_operands() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let a = (0..MT * KT).map(|i| ((i * 7 % 61) as f32 - 30.0) / 16.0).collect();
    let b = (0..KT * NT).map(|i| ((i * 11 % 53) as f32 - 26.0) / 8.0).collect();
    let c = (0..MT * NT).map(|i| i as f32 * 0.25 - 10.0).collect();
    (a, b, c)
}

fn naive_matmul(a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
    let mut d = c.to_vec();
    for i in 0..MT {
        for j in 0..NT {
            for k in 0..KT {
                d[i * NT + j] += a[i * KT + k] * b[k * NT + j];
            }
        }
    }
    d
}

fn run_mma(m: &EmulatedModule, kernel: &str, x: &[u16], y: &[u16], c: &[f32]) -> Vec<f32> {
    let (x, y, c) = (Aligned::from(x), Aligned::from(y), Aligned::from(c));
    let d = Aligned::<f32>::zeroed(MT * NT);
    let dp = d.addr();
    // SAFETY: the kernel reads 512 u16 from x and y and 256 f32 from c, writes 256 f32 to d.
    unsafe {
        m.launch(kernel, (1, 1, 1), (32, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64, u64, u64) = std::mem::transmute(f);
            k(x.addr(), y.addr(), c.addr(), dp);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    d.as_ref().to_vec()
}

fn check_mma(dtype: &str, to_bits: fn(f32) -> u16) {
    let m = test_module("tensor_core");
    let (a, b, c) = matmul_operands();
    let want = naive_matmul(&a, &b, &c);
    let bits = |v: &[f32]| v.iter().map(|&x| to_bits(x)).collect::<Vec<u16>>();
    let d = run_mma(&m, &format!("mma_row_major_{dtype}"), &bits(&a), &bits(&b), &c);
    assert_eq!(d, want, "mma_16816<{dtype}> with ldmatrix_x4 (A) and ldmatrix_x2_trans (B)");
    // The same product from the transposed operands.
    let at: Vec<f32> = (0..KT * MT).map(|i| a[(i % MT) * KT + i / MT]).collect();
    let bt: Vec<f32> = (0..NT * KT).map(|i| b[(i % KT) * NT + i / KT]).collect();
    let d = run_mma(&m, &format!("mma_transposed_{dtype}"), &bits(&at), &bits(&bt), &c);
    assert_eq!(d, want, "mma_16816<{dtype}> with ldmatrix_x4_trans (A^T) and ldmatrix_x2 (B^T)");
}

#[test]
fn mma_bf16_matches_naive_matmul() {
    if have_compiler("mma_bf16_matches_naive_matmul") {
        check_mma("bf16", |v| bf16::from_f32(v).to_bits());
    }
}

#[test]
fn mma_f16_matches_naive_matmul() {
    if have_compiler("mma_f16_matches_naive_matmul") {
        check_mma("f16", |v| f16::from_f32(v).to_bits());
    }
}

/// Products are formed from the 16-bit inputs (not from f32 values the kernel had before
/// rounding) and accumulated in f32: a value that bf16 rounds changes the result by exactly the
/// rounding.
#[test]
fn mma_rounds_inputs_to_16_bits_and_accumulates_in_f32() {
    if !have_compiler("mma_rounds_inputs_to_16_bits_and_accumulates_in_f32") {
        return;
    }
    let m = test_module("tensor_core");
    let (mut a, b, mut c) = matmul_operands();
    a[0] = 1.0 + 1.0 / 1024.0; // not a bf16: rounds to 1.0
    c[0] = 1.0e8; // + small products: f32 accumulation loses their low bits, as the f32 C/D would
    let bits = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
    let rounded: Vec<f32> = a.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    let d = run_mma(&m, "mma_row_major_bf16", &bits(&a), &bits(&b), &c);
    assert_eq!(d, naive_matmul(&rounded, &b, &c));
}

#[test]
fn ldmatrix_registers_follow_the_ptx_layout() {
    if !have_compiler("ldmatrix_registers_follow_the_ptx_layout") {
        return;
    }
    let m = test_module("tensor_core");
    let src: Vec<u16> = (0..256u16).map(|i| 0x100 + i).collect();
    let src = Aligned::from(&src);
    let out = Aligned::<u32>::zeroed(4 * 32 * 4);
    let op = out.addr();
    // SAFETY: the kernel reads 256 u16 and writes 512 u32.
    unsafe {
        m.launch("ldmatrix_layouts", (1, 1, 1), (32, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64) = std::mem::transmute(f);
            k(src.addr(), op);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    // Matrix i element (r, c) is src[(8 i + r) * 8 + c]; lane = 4 g + t.
    let el = |i: usize, r: usize, c: usize| src.as_ref()[(8 * i + r) * 8 + c] as u32;
    for (v, (name, count, trans)) in [("x4", 4, false), ("x4_trans", 4, true), ("x2", 2, false), ("x2_trans", 2, true)].into_iter().enumerate() {
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..count {
                let want = if trans { el(i, 2 * t, g) | el(i, 2 * t + 1, g) << 16 } else { el(i, g, 2 * t) | el(i, g, 2 * t + 1) << 16 };
                let got = out.as_ref()[(v * 32 + lane) * 4 + i];
                assert_eq!(got, want, "ldmatrix_{name}: lane {lane} register {i}");
            }
        }
    }
}

// ---- (a) cp.async ------------------------------------------------------------------------------------

#[test]
fn cp_async_destination_is_poisoned_until_a_wait_retires_its_group() {
    if !have_compiler("cp_async_destination_is_poisoned_until_a_wait_retires_its_group") {
        return;
    }
    let m = test_module("async_copy");
    let src = Aligned::from(&(0..256).map(|i| i as f32 + 0.5).collect::<Vec<f32>>());
    let snap = Aligned::<f32>::zeroed(3 * 256);
    let sp = snap.addr();
    // SAFETY: the kernel reads 256 floats and writes 768.
    unsafe {
        m.launch("cp_async_groups", (1, 1, 1), (32, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64) = std::mem::transmute(f);
            k(src.addr(), sp);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let s: Vec<u32> = snap.as_ref().iter().map(|v| v.to_bits()).collect();
    let bits = |v: f32| v.to_bits();
    const POISON: u32 = 0xffff_ffff;
    for j in 0..128 {
        let t = j / 4;
        let group1 = if t % 2 == 0 { src.as_ref()[128 + j] } else { 0.0 };
        assert_eq!((s[j], s[128 + j]), (POISON, POISON), "before any wait, element {j}: both destinations in flight (0xff bytes)");
        assert_eq!((s[256 + j], s[256 + 128 + j]), (bits(src.as_ref()[j]), POISON), "after cp_async_wait<1>, element {j}: group 0 landed, group 1 not yet");
        assert_eq!((s[512 + j], s[512 + 128 + j]), (bits(src.as_ref()[j]), bits(group1)), "after cp_async_wait<0>, element {j} (odd threads zero-fill)");
    }
}

#[test]
fn cp_async_pipeline_without_its_wait_reads_poison() {
    if !have_compiler("cp_async_pipeline_without_its_wait_reads_poison") {
        return;
    }
    let m = test_module("async_copy");
    let stages = 3u32;
    let src = Aligned::from(&(0..256 * stages as usize).map(|i| i as f32).collect::<Vec<f32>>());
    let run = |wait: i32| {
        let out = Aligned::<f32>::zeroed(256 * stages as usize);
        let op = out.addr();
        // SAFETY: the kernel reads and writes 256 * stages floats.
        unsafe {
            m.launch("cp_async_pipeline", (1, 1, 1), (64, 1, 1), 0, &|f| {
                let k: extern "C" fn(u64, u64, u32, i32) = std::mem::transmute(f);
                k(src.addr(), op, stages, wait);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        out.as_ref().to_vec()
    };
    let want: Vec<f32> = (0..256 * stages as usize).map(|i| ((i / 256) * 256 + (((i % 256) / 4 + 1) % 64) * 4 + i % 4) as f32).collect();
    assert_eq!(run(1), want, "with cp_async_wait<1> before the barrier");
    assert!(run(0).iter().all(|v| v.to_bits() == 0xffff_ffff), "without the wait every read must see the in-flight destination's 0xff bytes");
}

// ---- (a) schedules: races that only some thread orders expose ----------------------------------------

/// Every schedule, with two seeds of the random one.
const SCHEDULES: [Schedule; 4] = [Schedule::RoundRobin, Schedule::FarApart, Schedule::Random(1), Schedule::Random(0x5eed)];

/// Small integers as f32, so that every sum of the race kernels is exact whatever its order.
fn small_integers(n: usize, seed: u64) -> Vec<f32> {
    values(n, seed).iter().map(|v| ((v + 1.0) * 32.0).floor()).collect()
}

const RACE_THREADS: u32 = 128;
const RACE_STAGE: usize = 512;

#[test]
fn a_pipeline_stage_overwritten_while_a_slower_warp_reads_it_is_caught_far_apart() {
    if !have_compiler("a_pipeline_stage_overwritten_while_a_slower_warp_reads_it_is_caught_far_apart") {
        return;
    }
    let m = test_module("races");
    let tiles = 5u32;
    let src = Aligned::from(&small_integers(tiles as usize * RACE_STAGE, 7));
    // out[j * 4 + w]: the sum of tile j (each warp reads all of it, in its own order).
    let want: Vec<f32> = (0..tiles as usize * 4).map(|i| src.as_ref()[(i / 4) * RACE_STAGE..(i / 4 + 1) * RACE_STAGE].iter().sum()).collect();
    let run = |schedule: Schedule, end_barrier: i32| {
        let out = Aligned::<f32>::zeroed(tiles as usize * 4);
        let op = out.addr();
        // SAFETY: the kernel reads tiles * RACE_STAGE floats and writes tiles * 4.
        unsafe {
            m.launch_with("pipeline_stage_reuse", (1, 1, 1), (RACE_THREADS, 1, 1), 0, schedule, &|f| {
                let k: extern "C" fn(u64, u64, u32, i32) = std::mem::transmute(f);
                k(src.addr(), op, tiles, end_barrier);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        out.as_ref().to_vec()
    };
    for schedule in SCHEDULES {
        assert_eq!(run(schedule, 1), want, "with the end-of-iteration barrier, schedule {schedule}");
    }
    let buggy = run(Schedule::FarApart, 0);
    assert!(buggy.iter().any(|v| v.is_nan()), "far-apart must show the prefetch into a stage a slower warp still reads (poisoned reads): {buggy:?}");
    let caught: Vec<String> = SCHEDULES.iter().filter(|&&s| run(s, 0) != want).map(|s| s.to_string()).collect();
    lookahead::show(&format!("pipeline without its end-of-iteration barrier: wrong results under {caught:?}"));
}

#[test]
fn a_shared_exchange_fenced_by_syncwarp_only_is_caught_far_apart() {
    if !have_compiler("a_shared_exchange_fenced_by_syncwarp_only_is_caught_far_apart") {
        return;
    }
    let m = test_module("races");
    let blocks = 3usize;
    let input = small_integers(blocks * RACE_THREADS as usize, 11);
    let want: Vec<f32> = (0..blocks * RACE_THREADS as usize).map(|i| input[(i / 128) * 128..(i / 128 + 1) * 128].iter().sum()).collect();
    let run = |schedule: Schedule, sync: i32| {
        let out = vec![0f32; blocks * RACE_THREADS as usize];
        // SAFETY: the kernel reads and writes 128 floats per block, with 4 floats of dynamic
        // shared memory.
        unsafe {
            m.launch_with("block_sum_exchange", (blocks as u32, 1, 1), (RACE_THREADS, 1, 1), 16, schedule, &|f| {
                let k: extern "C" fn(*const f32, *mut f32, i32) = std::mem::transmute(f);
                k(input.as_ptr(), out.as_ptr() as *mut f32, sync);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        out
    };
    for schedule in SCHEDULES {
        assert_eq!(run(schedule, 1), want, "with __syncthreads, schedule {schedule}");
    }
    let buggy = run(Schedule::FarApart, 0);
    // Every block: the first warp to run reads sums not yet written (poisoned dynamic shared memory).
    for b in 0..blocks {
        assert!(buggy[b * 128..(b + 1) * 128].iter().any(|v| v.is_nan()), "far-apart must show the missing __syncthreads in block {b}");
    }
    let caught: Vec<String> = SCHEDULES.iter().filter(|&&s| run(s, 0) != want).map(|s| s.to_string()).collect();
    lookahead::show(&format!("shared exchange fenced by __syncwarp only: wrong results under {caught:?}"));
}

#[test]
fn a_warp_spinning_on_another_warps_flag_finishes_under_every_schedule() {
    if !have_compiler("a_warp_spinning_on_another_warps_flag_finishes_under_every_schedule") {
        return;
    }
    let m = test_module("races");
    for schedule in SCHEDULES {
        let out = vec![0i32; 32];
        // SAFETY: the kernel writes 32 ints.
        unsafe {
            m.launch_with("spin_on_flag", (1, 1, 1), (64, 1, 1), 0, schedule, &|f| {
                let k: extern "C" fn(*mut i32) = std::mem::transmute(f);
                k(out.as_ptr() as *mut i32);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, vec![7; 32], "schedule {schedule}");
    }
}

#[test]
fn schedules_parse_and_print() {
    for (text, want) in [("round-robin", Schedule::RoundRobin), ("far-apart", Schedule::FarApart), ("random:42", Schedule::Random(42)), (" random:0x1F ", Schedule::Random(31))] {
        let got = Schedule::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, want, "{text:?}");
        assert_eq!(Schedule::parse(&got.to_string()).unwrap_or_else(|e| panic!("{e}")), got, "{got} round trip");
    }
    for bad in ["", "roundrobin", "random", "random:", "random:-1", "random:0xg"] {
        match Schedule::parse(bad) {
            Err(e @ EmulateError::BadSchedule { .. }) => assert!(e.to_string().contains("LOOKAHEAD_EMU_SCHEDULE"), "{e}"),
            other => panic!("{bad:?}: expected BadSchedule, got {other:?}"),
        }
    }
}

// ---- (a) warp collectives --------------------------------------------------------------------------

/// The CUDA programming guide's shuffle definitions, lane by lane (independent of the PTX formula
/// the emulator implements).
fn shuffle_reference(input: &[i32], width: usize) -> Vec<i32> {
    let mut out = vec![0i32; 10 * 64];
    for warp in 0..2 {
        let lanes = &input[32 * warp..32 * warp + 32];
        let ballot = (0..32).filter(|&l| lanes[l] % 3 == 0).fold(0u32, |b, l| b | 1 << l);
        for lane in 0..32 {
            let t = 32 * warp + lane;
            let seg = lane / width * width;
            let v = lanes[lane];
            out[t] = lanes[seg + (v as usize % 64) % width];
            out[64 + t] = if lane - seg >= 3 { lanes[lane - 3] } else { v };
            out[2 * 64 + t] = if lane - seg + 5 < width { lanes[lane + 5] } else { v };
            // Xor may reach an earlier segment but not a later one.
            out[3 * 64 + t] = if (lane ^ 6) < seg + width { lanes[lane ^ 6] } else { v };
            out[4 * 64 + t] = ballot as i32;
            out[5 * 64 + t] = (0..32).any(|l| lanes[l] == (32 * warp + l) as i32) as i32;
            out[6 * 64 + t] = lanes.iter().all(|&x| x >= 0) as i32;
            out[7 * 64 + t] = lanes.iter().sum();
            out[8 * 64 + t] = (t ^ 1) as i32;
            out[9 * 64 + t] = lanes[lane ^ 1];
        }
    }
    out
}

#[test]
fn shuffles_and_votes_follow_the_cuda_definitions() {
    if !have_compiler("shuffles_and_votes_follow_the_cuda_definitions") {
        return;
    }
    let m = test_module("warp");
    // Distinct values; lane 33 holds its own index, so __any_sync differs between the warps.
    let input: Vec<i32> = (0..64).map(|t| if t == 33 { 33 } else { (t * 37 + 11) % 101 + 100 }).collect();
    for width in [32, 16, 8, 4, 2, 1] {
        let out = vec![0i32; 10 * 64];
        // SAFETY: the kernel reads 64 ints and writes 640.
        unsafe {
            m.launch("shuffles", (1, 1, 1), (64, 1, 1), 0, &|f| {
                let k: extern "C" fn(*const i32, *mut i32, i32) = std::mem::transmute(f);
                k(input.as_ptr(), out.as_ptr() as *mut i32, width);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let want = shuffle_reference(&input, width as usize);
        let names = ["shfl", "shfl_up", "shfl_down", "shfl_xor", "ballot", "any", "all", "reduce_add", "shfl_xor 64-bit (low)", "shfl_xor 64-bit (high)"];
        for (q, name) in names.iter().enumerate() {
            assert_eq!(&out[q * 64..q * 64 + 64], &want[q * 64..q * 64 + 64], "{name}, width {width}");
        }
    }
}

#[test]
fn half_warp_masks_meet_at_different_call_sites() {
    if !have_compiler("half_warp_masks_meet_at_different_call_sites") {
        return;
    }
    let m = test_module("warp");
    let input: Vec<i32> = (0..64).map(|t| t * 3 + 1).collect();
    let out = vec![0i32; 64];
    // SAFETY: the kernel reads and writes 64 ints.
    unsafe {
        m.launch("half_warp_masks", (1, 1, 1), (64, 1, 1), 0, &|f| {
            let k: extern "C" fn(*const i32, *mut i32) = std::mem::transmute(f);
            k(input.as_ptr(), out.as_ptr() as *mut i32);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, (0..64).map(|t| input[t ^ 1]).collect::<Vec<i32>>());
}

#[test]
fn syncwarp_waits_only_for_lanes_that_have_not_returned() {
    if !have_compiler("syncwarp_waits_only_for_lanes_that_have_not_returned") {
        return;
    }
    let m = test_module("warp");
    let input: Vec<i32> = (0..64).map(|t| t * 5 + 2).collect();
    let out = vec![-1i32; 64];
    // SAFETY: the kernel reads and writes at most 64 ints.
    unsafe {
        m.launch("syncwarp_after_exit", (1, 1, 1), (64, 1, 1), 0, &|f| {
            let k: extern "C" fn(*const i32, *mut i32) = std::mem::transmute(f);
            k(input.as_ptr(), out.as_ptr() as *mut i32);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<i32> = (0..64).map(|t| if t % 32 < 19 { input[t + 1] } else { -1 }).collect();
    assert_eq!(out, want);
}

// ---- (a) block behaviour ---------------------------------------------------------------------------

#[test]
fn barriers_count_only_threads_that_have_not_returned() {
    if !have_compiler("barriers_count_only_threads_that_have_not_returned") {
        return;
    }
    let m = test_module("block");
    for (threads, live) in [(64u32, 40u32), (96, 96), (1024, 999)] {
        let out = vec![-1i32; live as usize + 1];
        // SAFETY: the kernel writes live + 1 ints.
        unsafe {
            m.launch("early_exit_barrier", (1, 1, 1), (threads, 1, 1), 0, &|f| {
                let k: extern "C" fn(*mut i32, u32) = std::mem::transmute(f);
                k(out.as_ptr() as *mut i32, live);
            })
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<i32> = (0..live as i32).rev().chain([(0..live).filter(|t| t % 3 == 0).count() as i32]).collect();
        assert_eq!(out, want, "{threads} threads, {live} live");
    }
}

#[test]
fn dynamic_shared_memory_is_poisoned_then_shared() {
    if !have_compiler("dynamic_shared_memory_is_poisoned_then_shared") {
        return;
    }
    let m = test_module("block");
    let n = 77u32;
    let out = vec![0f32; 2 * n as usize];
    // SAFETY: the kernel uses n floats of dynamic shared memory and writes 2n floats.
    unsafe {
        m.launch("dynamic_shared", (2, 1, 1), (n, 1, 1), 4 * n, &|f| {
            let k: extern "C" fn(*mut f32, u32) = std::mem::transmute(f);
            k(out.as_ptr() as *mut f32, n);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    // The second block ran last: it must see poison again, not the first block's values.
    assert!(out[..n as usize].iter().all(|v| v.to_bits() == 0xffff_ffff), "unwritten dynamic shared memory reads as 0xff bytes");
    assert_eq!(&out[n as usize..], &(0..n).map(|t| 100.0 + (n - 1 - t) as f32).collect::<Vec<f32>>()[..]);
}

#[test]
fn block_and_thread_indices_cover_a_3d_launch() {
    if !have_compiler("block_and_thread_indices_cover_a_3d_launch") {
        return;
    }
    let m = test_module("block");
    let (grid, block) = ((3u32, 2u32, 2u32), (5u32, 3u32, 2u32));
    let threads = (block.0 * block.1 * block.2) as usize;
    let out = vec![0u32; (grid.0 * grid.1 * grid.2) as usize * threads];
    // SAFETY: the kernel writes one u32 per thread of the grid.
    unsafe {
        m.launch("coordinates", grid, block, 0, &|f| {
            let k: extern "C" fn(*mut u32) = std::mem::transmute(f);
            k(out.as_ptr() as *mut u32);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let mut i = 0;
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            assert_eq!(out[i], bx << 24 | by << 20 | bz << 16 | tx << 8 | ty << 4 | tz, "block ({bx},{by},{bz}) thread ({tx},{ty},{tz})");
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// common.cuh's emulated cvt.rn.f16.f32 / cvt.f32.f16 against the half crate: every f16 value,
/// every rounding midpoint and its f32 neighbours, the overflow and underflow edges.
#[test]
fn f16_conversions_match_the_half_crate() {
    if !have_compiler("f16_conversions_match_the_half_crate") {
        return;
    }
    let m = test_module("block");
    let mut x: Vec<f32> = Vec::new();
    for h in 0..0x7c00u16 {
        let (v, next) = (f16::from_bits(h).to_f32(), f16::from_bits(h + 1).to_f32());
        let mid = (v + next) / 2.0;
        for y in [v, mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1)] {
            x.push(y);
            x.push(-y);
        }
    }
    x.extend([65504.0, 65519.996, 65520.0, 1.0e10, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, 1.0e-10, 2f32.powi(-25), 2f32.powi(-25) * 1.0000001, 2f32.powi(-24), 3.0 * 2f32.powi(-26)]);
    let bits = vec![0u16; x.len()];
    let back = vec![0f32; 65536];
    // SAFETY: one thread reads x.len() floats, writes as many u16 and 65536 floats.
    unsafe {
        m.launch("f16_conversions", (1, 1, 1), (1, 1, 1), 0, &|f| {
            let k: extern "C" fn(*const f32, *mut u16, u32, *mut f32) = std::mem::transmute(f);
            k(x.as_ptr(), bits.as_ptr() as *mut u16, x.len() as u32, back.as_ptr() as *mut f32);
        })
    }
    .unwrap_or_else(|e| panic!("{e}"));
    for (i, &v) in x.iter().enumerate() {
        let want = f16::from_f32(v);
        if v.is_nan() {
            assert!(f16::from_bits(bits[i]).is_nan(), "from_f32<f16>(NaN) must be NaN");
        } else {
            assert_eq!(bits[i], want.to_bits(), "from_f32<f16>({v:e})");
        }
    }
    for h in 0..=u16::MAX {
        let want = f16::from_bits(h).to_f32();
        assert!(back[h as usize].to_bits() == want.to_bits() || (want.is_nan() && back[h as usize].is_nan()), "to_f32(f16 0x{h:04x})");
    }
}

// ---- (a) errors: deadlocks, faults, launch configuration ---------------------------------------------

fn launch_error(m: &EmulatedModule, kernel: &str, threads: u32) -> String {
    let out = vec![0f32; threads as usize];
    // SAFETY: the kernel writes at most one float per thread.
    let r = unsafe {
        m.launch(kernel, (1, 1, 1), (threads, 1, 1), 0, &|f| {
            let k: extern "C" fn(*mut f32) = std::mem::transmute(f);
            k(out.as_ptr() as *mut f32);
        })
    };
    match r {
        Err(e @ EmulateError::Launch { .. }) => e.to_string(),
        other => panic!("{kernel}: expected a launch error, got {other:?}"),
    }
}

#[test]
fn deadlocks_are_errors_naming_kernel_and_barriers() {
    if !have_compiler("deadlocks_are_errors_naming_kernel_and_barriers") {
        return;
    }
    let m = test_module("deadlock");
    let e = launch_error(&m, "barrier_vs_shuffle", 64);
    for part in ["barrier_vs_shuffle", "deadlock", "__syncthreads (deadlock.cu:", "__shfl_xor_sync (deadlock.cu:", "thread 0:", "threads 1-31:"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = launch_error(&m, "different_barriers", 64);
    for part in ["different_barriers", "different block barriers", "threads 0-31: waiting at __syncthreads", "threads 32-63: waiting at __syncthreads"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = launch_error(&m, "shuffle_after_exit", 32);
    for part in ["shuffle_after_exit", "__shfl_xor_sync", "lane 5", "exited"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
}

#[test]
fn bad_launches_are_errors() {
    if !have_compiler("bad_launches_are_errors") {
        return;
    }
    let m = test_module("block");
    let out = vec![0u32; 4096];
    let launch = |kernel: &str, grid, block, shared| {
        // SAFETY: never runs a thread with these configurations but (1,1,1) x (64,1,1), which
        // writes 64 u32.
        unsafe {
            m.launch(kernel, grid, block, shared, &|f| {
                let k: extern "C" fn(*mut u32) = std::mem::transmute(f);
                k(out.as_ptr() as *mut u32);
            })
        }
    };
    let e = launch("coordinates", (1, 1, 1), (1025, 1, 1), 0).unwrap_err().to_string();
    assert!(e.contains("coordinates") && e.contains("bad block (1025,1,1)"), "{e}");
    let e = launch("coordinates", (1, 1, 1), (32, 32, 2), 0).unwrap_err().to_string();
    assert!(e.contains("at most 1024 threads"), "{e}");
    let e = launch("coordinates", (0, 1, 1), (32, 1, 1), 0).unwrap_err().to_string();
    assert!(e.contains("bad grid"), "{e}");
    let e = launch("coordinates", (1, 1, 1), (32, 1, 1), 228 * 1024).unwrap_err().to_string();
    assert!(e.contains("227 KiB"), "{e}");
    match launch("no_such_kernel", (1, 1, 1), (32, 1, 1), 0) {
        Err(e @ EmulateError::MissingKernel { .. }) => assert!(e.to_string().contains("no_such_kernel"), "{e}"),
        other => panic!("expected MissingKernel, got {other:?}"),
    }
    launch("coordinates", (1, 1, 1), (64, 1, 1), 0).expect("a valid launch after failed ones");
}

#[test]
fn a_panic_in_the_launch_callback_reaches_the_caller() {
    if !have_compiler("a_panic_in_the_launch_callback_reaches_the_caller") {
        return;
    }
    let m = test_module("block");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the callback panics before calling the kernel.
        unsafe { m.launch("coordinates", (2, 1, 1), (64, 1, 1), 0, &|_| panic!("callback panic on purpose")) }
    }));
    let payload = r.expect_err("the panic must propagate");
    assert_eq!(payload.downcast_ref::<&str>().copied(), Some("callback panic on purpose"));
}

#[test]
fn compile_errors_name_the_file_and_show_the_compiler_output() {
    if !have_compiler("compile_errors_name_the_file_and_show_the_compiler_output") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lookahead-emu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken_kernel.cu");
    std::fs::write(&path, "#include \"common.cuh\"\nextern \"C\" __global__ void broken(float* y) { y[0] = undefined_name; }\n").unwrap();
    let e = EmulatedModule::load_file(&path).unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    let msg = e.to_string();
    assert!(matches!(e, EmulateError::Compile { .. }), "{msg}");
    assert!(msg.contains("broken_kernel.cu:2") && msg.contains("undefined_name"), "{msg}");
}

// ---- (b) existing kernel families under emulation, against the CPU reference --------------------------

/// Every kernel family (kernels::ALL_SOURCES) builds under the emulator, so any of them can be
/// checked here; a .cu with inline PTX outside mma.cuh's wrappers or an intrinsic the emulator
/// lacks fails this test with the compiler's message.
#[test]
fn every_kernel_family_builds_under_the_emulator() {
    if !have_compiler("every_kernel_family_builds_under_the_emulator") {
        return;
    }
    let failures: Vec<String> = kernels::ALL_SOURCES.iter().filter_map(|src| EmulatedModule::load(src).err().map(|e| e.to_string())).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The element types of the kernel families, as stored in the buffers the kernels see.
#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    Bf16,
    F16,
}

impl Dt {
    fn name(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::Bf16 => "bf16",
            Dt::F16 => "f16",
        }
    }
    /// `v` after a round trip through this type (what the kernel reads).
    fn round(self, v: f32) -> f32 {
        match self {
            Dt::F32 => v,
            Dt::Bf16 => bf16::from_f32(v).to_f32(),
            Dt::F16 => f16::from_f32(v).to_f32(),
        }
    }
    /// A 16-byte aligned buffer holding `v` in this type.
    fn encode(self, v: &[f32]) -> Aligned<u8> {
        let bytes: Vec<u8> = match self {
            Dt::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dt::Bf16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
            Dt::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        };
        Aligned::from(&bytes)
    }
    fn zeroed(self, n: usize) -> Aligned<u8> {
        Aligned::zeroed(n * if matches!(self, Dt::F32) { 4 } else { 2 })
    }
    fn decode(self, b: &Aligned<u8>) -> Vec<f32> {
        match self {
            Dt::F32 => b.as_ref().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dt::Bf16 => b.as_ref().chunks(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            Dt::F16 => b.as_ref().chunks(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        }
    }
    /// (atol, rtol): f32 results differ from the f64-accumulating CPU by a few ulps; 16-bit
    /// results may round one step the other way.
    fn tolerance(self) -> (f32, f32) {
        match self {
            Dt::F32 => (2e-6, 2e-5),
            Dt::Bf16 => (1e-5, 1.0 / 128.0),
            Dt::F16 => (1e-6, 1.0 / 1024.0),
        }
    }
}

/// Row inputs with the cases the kernels treat specially: row 0 has a -inf entry (softmax gives
/// an exact 0 there), row 1 sits at a large offset (the max shift matters).
fn row_inputs(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut x: Vec<f32> = values(rows * cols, seed).iter().map(|v| v * 4.0).collect();
    x[3.min(cols - 1)] = f32::NEG_INFINITY;
    if rows > 1 {
        for v in &mut x[cols..2 * cols] {
            *v += 60.0;
        }
    }
    x
}

/// Threads a row, grid and block of a row-kernel launch.
type RowsLaunch = (u32, (u32, u32, u32), (u32, u32, u32));

/// engine/src/cuda/norm.rs: threads a row of the register-cached row kernels (16 values a
/// thread), and their launch: 8 rows a 256-thread block in warp mode, else a block per row.
fn cached_rows_launch(rows: usize, cols: usize, max_block: usize) -> Option<RowsLaunch> {
    let tpr = cols.div_ceil(16).div_ceil(32).max(1) * 32;
    (tpr <= max_block).then(|| if tpr == 32 { (32, (rows.div_ceil(8) as u32, 1, 1), (256, 1, 1)) } else { (tpr as u32, (rows as u32, 1, 1), (tpr as u32, 1, 1)) })
}

/// engine/src/cuda/norm.rs packed_rows_config: a power-of-two tpr holding `cache` values a thread
/// (softmax 32, layer norm 40), blocks of max(256, tpr) threads.
fn packed_rows_launch(rows: usize, cols: usize, cache: usize) -> RowsLaunch {
    let tpr = cols.div_ceil(cache).next_power_of_two().max(32);
    let block = tpr.max(256);
    (tpr as u32, (rows.div_ceil(block / tpr) as u32, 1, 1), (block as u32, 1, 1))
}

fn softmax_reference(x: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if log {
        kernels::softmax::log_softmax_rows(x, cols, &mut out);
    } else {
        kernels::softmax::softmax_rows(x, cols, &mut out);
    }
    out
}

/// Runs one softmax kernel of softmax.cu on `rows` x `cols` inputs and checks it.
fn check_softmax(m: &EmulatedModule, kind: &str, dt: Dt, rows: usize, cols: usize, log: bool) {
    let x = row_inputs(rows, cols, (rows * 1000 + cols) as u64);
    let xb = dt.encode(&x);
    let y = dt.zeroed(rows * cols);
    let (xp, yp, r32, c32, lm) = (xb.addr(), y.addr(), rows as u32, cols as u32, log as i32);
    let name = format!("{kind}_{}", dt.name());
    // SAFETY: the kernels read rows * cols elements of x and write as many of y; the argument
    // lists are those of softmax.cu.
    let result = unsafe {
        match kind {
            "softmax_long" => m.launch(&name, (rows as u32, 1, 1), (1024, 1, 1), 0, &|f| {
                let k: extern "C" fn(u64, u64, u32, i32) = std::mem::transmute(f);
                k(xp, yp, c32, lm);
            }),
            _ => {
                let (tpr, grid, block) = if kind == "softmax_packed" { packed_rows_launch(rows, cols, 32) } else { cached_rows_launch(rows, cols, 1024).expect("row fits the cached kernel") };
                m.launch(&name, grid, block, 0, &|f| {
                    let k: extern "C" fn(u64, u64, u32, u32, u32, i32) = std::mem::transmute(f);
                    k(xp, yp, r32, c32, tpr, lm);
                })
            }
        }
    };
    result.unwrap_or_else(|e| panic!("{e}"));
    let rounded: Vec<f32> = x.iter().map(|&v| dt.round(v)).collect();
    let want: Vec<f32> = softmax_reference(&rounded, cols, log).iter().map(|&v| dt.round(v)).collect();
    let (atol, rtol) = dt.tolerance();
    assert_close(&format!("{name} {rows}x{cols} log={log}"), &dt.decode(&y), &want, atol, rtol);
}

#[test]
fn softmax_cached_and_long_kernels_match_the_cpu() {
    if !have_compiler("softmax_cached_and_long_kernels_match_the_cpu") {
        return;
    }
    let m = family(&kernels::softmax::SOURCE);
    for dt in [Dt::F32, Dt::Bf16, Dt::F16] {
        // Warp per row (scalar and 16-byte packs), a block of 64 threads per row.
        for (rows, cols) in [(13, 45), (11, 296), (5, 1000)] {
            for log in [false, true] {
                check_softmax(&m, "softmax", dt, rows, cols, log);
            }
        }
    }
    check_softmax(&m, "softmax_long", Dt::F32, 2, 17001, false);
    check_softmax(&m, "softmax_long", Dt::Bf16, 2, 16390, true);
}

/// softmax_packed_DT (never run on a GPU yet): tpr 32 with 8 rows a block (a partly filled last
/// block), tpr 128 with 2 rows a block, tpr 512 with one row a block.
#[test]
fn softmax_packed_kernels_match_the_cpu() {
    if !have_compiler("softmax_packed_kernels_match_the_cpu") {
        return;
    }
    let m = family(&kernels::softmax::SOURCE);
    for dt in [Dt::Bf16, Dt::F16] {
        for (rows, cols) in [(13, 200), (7, 1000), (5, 2056), (3, 9000)] {
            for log in [false, true] {
                check_softmax(&m, "softmax_packed", dt, rows, cols, log);
            }
        }
    }
}

/// (weight, bias) of `cols` channels, or absent.
fn affine_params(cols: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let w = values(cols, seed).iter().map(|v| 1.0 + 0.5 * v).collect();
    let b = values(cols, seed + 1).iter().map(|v| 0.25 * v).collect();
    (w, b)
}

fn check_layer_norm(m: &EmulatedModule, kind: &str, dt: Dt, rows: usize, cols: usize, with_affine: bool) {
    let eps = 1e-5f32;
    let mut x: Vec<f32> = values(rows * cols, (rows * 7 + cols) as u64).iter().map(|v| 3.0 * v).collect();
    if rows > 1 {
        for v in &mut x[cols..2 * cols] {
            *v += 100.0; // a large common offset: the statistics must not lose the spread
        }
    }
    let (w, b) = affine_params(cols, cols as u64);
    let (wb, bb) = (Aligned::from(&w), Aligned::from(&b));
    let (wp, bp) = if with_affine { (wb.addr(), bb.addr()) } else { (0, 0) };
    let xb = dt.encode(&x);
    let y = dt.zeroed(rows * cols);
    let (xp, yp, r32, c32) = (xb.addr(), y.addr(), rows as u32, cols as u32);
    let name = format!("{kind}_{}", dt.name());
    // SAFETY: argument lists of norm.cu's layer-norm kernels; x and y hold rows * cols elements,
    // w and b cols floats (or are null).
    let result = unsafe {
        match kind {
            "layer_norm_long" => m.launch(&name, (rows as u32, 1, 1), (1024, 1, 1), 0, &|f| {
                let k: extern "C" fn(u64, u64, u64, u64, u32, f32) = std::mem::transmute(f);
                k(xp, yp, wp, bp, c32, eps);
            }),
            _ => {
                let (tpr, grid, block) = if kind == "layer_norm_packed" { packed_rows_launch(rows, cols, 40) } else { cached_rows_launch(rows, cols, 512).expect("row fits the cached kernel") };
                m.launch(&name, grid, block, 0, &|f| {
                    let k: extern "C" fn(u64, u64, u64, u64, u32, u32, u32, f32) = std::mem::transmute(f);
                    k(xp, yp, wp, bp, r32, c32, tpr, eps);
                })
            }
        }
    };
    result.unwrap_or_else(|e| panic!("{e}"));
    let rounded: Vec<f32> = x.iter().map(|&v| dt.round(v)).collect();
    let mut want = vec![0f32; rows * cols];
    let affine = with_affine.then_some((&w[..], &b[..]));
    kernels::norm::layer_norm_rows(&rounded, cols, affine.map(|a| a.0), affine.map(|a| a.1), eps, &mut want);
    let want: Vec<f32> = want.iter().map(|&v| dt.round(v)).collect();
    let (atol, rtol) = dt.tolerance();
    // Normalised values near zero carry the statistics' absolute error.
    assert_close(&format!("{name} {rows}x{cols} affine={with_affine}"), &dt.decode(&y), &want, atol.max(2e-5), rtol);
}

#[test]
fn layer_norm_cached_and_long_kernels_match_the_cpu() {
    if !have_compiler("layer_norm_cached_and_long_kernels_match_the_cpu") {
        return;
    }
    let m = family(&kernels::norm::SOURCE);
    for dt in [Dt::F32, Dt::Bf16, Dt::F16] {
        for (rows, cols) in [(13, 45), (9, 296), (3, 1000)] {
            check_layer_norm(&m, "layer_norm", dt, rows, cols, true);
        }
    }
    check_layer_norm(&m, "layer_norm", Dt::F32, 5, 77, false);
    check_layer_norm(&m, "layer_norm_long", Dt::F32, 2, 9001, true);
}

/// layer_norm_packed_DT (never run on a GPU yet), with and without weight and bias.
#[test]
fn layer_norm_packed_kernels_match_the_cpu() {
    if !have_compiler("layer_norm_packed_kernels_match_the_cpu") {
        return;
    }
    let m = family(&kernels::norm::SOURCE);
    for dt in [Dt::Bf16, Dt::F16] {
        // 1280: a warp a row, 5 packs a lane; 9000: 225 threads of 256 busy, some with 5 packs.
        for (rows, cols) in [(13, 200), (7, 1000), (11, 1280), (5, 2056), (3, 9000)] {
            check_layer_norm(&m, "layer_norm_packed", dt, rows, cols, true);
        }
        check_layer_norm(&m, "layer_norm_packed", dt, 9, 64, false);
    }
}

/// Group norm through its two-phase kernels (norm.cu): gn_stats_{nchw,nhwc}_DT -> gn_finalize_DT
/// -> affine_apply_DT, as engine/src/cuda/norm.rs launches them, against kernels::norm::group_norm,
/// and the finalized (mean, rstd) against an f64 computation.
#[allow(clippy::too_many_arguments)]
fn check_group_norm(m: &EmulatedModule, dt: Dt, n: usize, c: usize, hw: usize, groups: usize, channels_last: bool, lanes: usize, silu: bool) {
    let eps = 1e-5f32;
    let label = format!("group norm {} n={n} c={c} hw={hw} g={groups} channels_last={channels_last} lanes={lanes} silu={silu}", dt.name());
    // NCHW values; channel k of sample 1 sits at an offset (shifted sums must keep the spread).
    let x: Vec<f32> = values(n * c * hw, (c * hw) as u64).iter().enumerate().map(|(i, v)| 2.0 * v + if i / (c * hw) == 1 { 40.0 } else { 0.0 }).collect();
    let x: Vec<f32> = x.iter().map(|&v| dt.round(v)).collect();
    let stored: Vec<f32> = if channels_last { (0..n * hw * c).map(|i| x[(i / (hw * c) * c + i % c) * hw + i / c % hw]).collect() } else { x.clone() };
    let (w, b) = affine_params(c, 3);
    let (wb, bb) = (Aligned::from(&w), Aligned::from(&b));
    let xb = dt.encode(&stored);
    let part = Aligned::<f32>::zeroed(3 * n * c * lanes);
    let stats = Aligned::<f32>::zeroed(2 * n * groups);
    let coef = Aligned::<f32>::zeroed(4 * n * c);
    let y = dt.zeroed(n * c * hw);
    let (xp, pp, sp, cp, yp, wp, bp) = (xb.addr(), part.addr(), stats.addr(), coef.addr(), y.addr(), wb.addr(), bb.addr());
    let (n32, c32, hw32, g32, l32, cl) = (n as u32, c as u32, hw as u32, groups as u32, lanes as u32, channels_last as i32);
    let chunk = (hw.div_ceil(lanes).div_ceil(8) * 8) as u32;
    let dtn = dt.name();
    // SAFETY: argument lists of norm.cu's group-norm kernels; part holds 3 N C L floats, stats
    // 2 N G, coef 4 N C, x and y N C HW elements, w and b C floats.
    unsafe {
        if channels_last {
            m.launch(&format!("gn_stats_nhwc_{dtn}"), (l32, n32, 1), (256, 1, 1), 0, &|f| {
                let k: extern "C" fn(u64, u64, u32, u32) = std::mem::transmute(f);
                k(xp, pp, c32, hw32);
            })
        } else {
            assert!(hw.div_ceil(chunk as usize) == lanes, "{label}: lanes must cover hw in chunks of a multiple of 8");
            m.launch(&format!("gn_stats_nchw_{dtn}"), ((n * c) as u32, l32, 1), (256, 1, 1), 0, &|f| {
                let k: extern "C" fn(u64, u64, u32, u32) = std::mem::transmute(f);
                k(xp, pp, hw32, chunk);
            })
        }
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        m.launch(&format!("gn_finalize_{dtn}"), ((n * groups) as u32, 1, 1), (256, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, i32, f32) = std::mem::transmute(f);
            k(xp, pp, sp, cp, wp, bp, n32, c32, hw32, g32, l32, cl, eps);
        })
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let v = if matches!(dt, Dt::F32) { 4 } else { 8 };
        let per = if (if channels_last { c } else { hw }) % v == 0 { v } else { 1 };
        let total = n * c * hw;
        m.launch(&format!("affine_apply_{dtn}"), (total.div_ceil(per).div_ceil(256) as u32, 1, 1), (256, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64, u64, u32, u32, u32, u32, i32, i32) = std::mem::transmute(f);
            k(xp, yp, cp, total as u32, c32, hw32, c32, cl, silu as i32);
        })
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    }
    // Statistics against f64.
    let cpg = c / groups;
    for s in 0..n {
        for g in 0..groups {
            let vals = &x[(s * c + g * cpg) * hw..(s * c + (g + 1) * cpg) * hw];
            let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            let (gm, gr) = (stats.as_ref()[2 * (s * groups + g)], stats.as_ref()[2 * (s * groups + g) + 1]);
            assert!((gm as f64 - mean).abs() <= 1e-5 * (1.0 + mean.abs()) && (gr as f64 - rstd).abs() <= 1e-4 * rstd, "{label}: (mean, rstd) of sample {s} group {g} = ({gm}, {gr}), f64 gives ({mean}, {rstd})");
        }
    }
    let mut want = vec![0f32; n * c * hw];
    kernels::norm::group_norm(&x, n, c, hw, groups, Some(&w), Some(&b), eps, silu, &mut want);
    let got = dt.decode(&y);
    let got: Vec<f32> = if channels_last { (0..n * c * hw).map(|i| got[(i / (c * hw) * hw + i % hw) * c + i / hw % c]).collect() } else { got };
    let want: Vec<f32> = want.iter().map(|&v| dt.round(v)).collect();
    let (atol, rtol) = dt.tolerance();
    assert_close(&label, &got, &want, atol.max(3e-5), rtol.max(3e-5));
}

#[test]
fn group_norm_statistics_and_apply_kernels_match_the_cpu() {
    if !have_compiler("group_norm_statistics_and_apply_kernels_match_the_cpu") {
        return;
    }
    let m = family(&kernels::norm::SOURCE);
    // NCHW: HW not a multiple of the pack (scalar path) and a multiple (16-byte packs), several
    // lanes per plane; channels-last: C a multiple of the pack and not.
    check_group_norm(&m, Dt::F32, 2, 6, 4999, 3, false, 3, false);
    check_group_norm(&m, Dt::Bf16, 2, 6, 5000, 2, false, 2, true);
    check_group_norm(&m, Dt::F16, 2, 4, 63, 2, false, 1, true);
    check_group_norm(&m, Dt::F32, 2, 12, 37 * 29, 4, true, 2, false);
    check_group_norm(&m, Dt::Bf16, 2, 16, 33 * 7, 4, true, 3, true);
    check_group_norm(&m, Dt::F32, 2, 10, 31, 5, true, 1, true);
}

/// The grid-resident channels-last group norm (gn_grid_nhwc_DT, norm.cu) against
/// kernels::norm::group_norm: the emulator runs a cooperative launch as one cluster of all its
/// blocks (grid_sync is then the cluster barrier), so grids of at most 16 blocks. `lanes` blocks a
/// sample of `threads` threads; a slice of ceil(hw / lanes) positions each (the last ones short or
/// empty), of which the first `held` stay in shared memory (None: all), `schedule` as the
/// emulator's.
#[allow(clippy::too_many_arguments)]
fn check_group_norm_grid(m: &EmulatedModule, dt: Dt, n: usize, c: usize, hw: usize, groups: usize, lanes: usize, held: Option<usize>, threads: u32, affine: bool, silu: bool, schedule: Schedule) {
    let eps = 1e-5f32;
    let label = format!("gn_grid_nhwc {} n={n} c={c} hw={hw} g={groups} lanes={lanes} held={held:?} threads={threads} affine={affine} silu={silu} {schedule:?}", dt.name());
    // NCHW values with an offset on sample 1 (the shifted sums must keep the spread).
    let x: Vec<f32> = values(n * c * hw, (7 * c + hw) as u64).iter().enumerate().map(|(i, v)| 2.0 * v + if i / (c * hw) == 1 { 40.0 } else { 0.0 }).collect();
    let x: Vec<f32> = x.iter().map(|&v| dt.round(v)).collect();
    let stored: Vec<f32> = (0..n * hw * c).map(|i| x[(i / (hw * c) * c + i % c) * hw + i / c % hw]).collect();
    let (w, b) = affine_params(c, 5);
    let (wb, bb) = (Aligned::from(&w), Aligned::from(&b));
    let xb = dt.encode(&stored);
    let y = dt.zeroed(n * c * hw);
    let part = Aligned::<f32>::zeroed(3 * n * c * lanes);
    let coef = Aligned::<f32>::zeroed(4 * n * c);
    let bar = Aligned::<u32>::zeroed(2);
    let ppb = hw.div_ceil(lanes) as u32;
    let held = held.unwrap_or(ppb as usize) as u32;
    let elem = if matches!(dt, Dt::F32) { 4 } else { 2 };
    let shared = held as usize * c * elem;
    let (wp, bp) = if affine { (wb.addr(), bb.addr()) } else { (0, 0) };
    let (xp, yp, pp, cp, barp) = (xb.addr(), y.addr(), part.addr(), coef.addr(), bar.addr());
    let (c32, hw32, g32, act) = (c as u32, hw as u32, groups as u32, silu as i32);
    let name = format!("gn_grid_nhwc_{}", dt.name());
    // SAFETY: gn_grid_nhwc_DT's argument list; x and y hold N C HW elements (16-byte aligned,
    // C % V == 0, C / V <= threads), part 3 N C L floats, coef 4 N C, bar two zeroed u32; every
    // block of the grid runs at once (one cluster).
    unsafe {
        m.launch_cluster_with(&name, (lanes as u32, n as u32, 1), (threads, 1, 1), (lanes as u32, n as u32, 1), shared as u32, schedule, &|f| {
            // stats null: the plain forward (tests/group_norm_emulated.rs checks the saved ones).
            let k: extern "C" fn(u64, u64, u64, u64, u64, u64, u64, u64, u32, u32, u32, u32, u32, f32, i32) = std::mem::transmute(f);
            k(xp, yp, wp, bp, pp, cp, 0, barp, c32, hw32, g32, ppb, held, eps, act);
        })
    }
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut want = vec![0f32; n * c * hw];
    kernels::norm::group_norm(&x, n, c, hw, groups, affine.then_some(&w[..]), affine.then_some(&b[..]), eps, silu, &mut want);
    let got = dt.decode(&y);
    let got: Vec<f32> = (0..n * c * hw).map(|i| got[(i / (c * hw) * hw + i % hw) * c + i / hw % c]).collect();
    let want: Vec<f32> = want.iter().map(|&v| dt.round(v)).collect();
    let (atol, rtol) = dt.tolerance();
    assert_close(&label, &got, &want, atol.max(3e-5), rtol.max(3e-5));
}

#[test]
fn group_norm_grid_kernel_matches_the_cpu() {
    if !have_compiler("group_norm_grid_kernel_matches_the_cpu") {
        return;
    }
    let m = family(&kernels::norm::SOURCE);
    // Slices of 13 positions (the last 11); 2 channel packs a row, 64 rows a block; f32 packs of
    // 4; C / V = 40 of 512 threads (12 rows, 32 threads idle) as the engine launches SDXL's 320
    // channels; 5 positions over 4 lanes (slices 2, 2, 1 and an empty one).
    // Slices larger than shared memory keep their first `held` positions there and read the rest
    // again (5 of 13; 1 of 10).
    for schedule in [Schedule::FarApart, Schedule::RoundRobin, Schedule::Random(7)] {
        check_group_norm_grid(&m, Dt::Bf16, 2, 16, 37, 4, 3, None, 128, true, true, schedule);
    }
    check_group_norm_grid(&m, Dt::Bf16, 2, 16, 37, 4, 3, Some(5), 128, true, true, Schedule::FarApart);
    check_group_norm_grid(&m, Dt::F16, 2, 16, 37, 2, 3, None, 128, false, false, Schedule::FarApart);
    check_group_norm_grid(&m, Dt::F32, 2, 12, 20, 3, 2, None, 64, true, false, Schedule::FarApart);
    check_group_norm_grid(&m, Dt::F32, 2, 12, 20, 3, 2, Some(1), 64, true, true, Schedule::RoundRobin);
    check_group_norm_grid(&m, Dt::Bf16, 1, 320, 6, 32, 2, None, 512, true, true, Schedule::FarApart);
    check_group_norm_grid(&m, Dt::Bf16, 2, 8, 5, 2, 4, None, 64, true, true, Schedule::FarApart);
}

// ---- thread-block clusters (kernels/emu/tests/cluster.cu, group_norm.cu) ----------------------------

/// cluster_sum's (out, out2, ranks), or the launch error.
type ClusterSumResult = Result<(Vec<f32>, Vec<f32>, Vec<u32>), EmulateError>;

/// Runs cluster_sum over `grid` blocks of `nt` threads in clusters of `cluster`.
fn run_cluster_sum(m: &EmulatedModule, grid: (u32, u32), cluster: (u32, u32), nt: u32, x: &[f32], barrier: bool, schedule: Schedule) -> ClusterSumResult {
    let blocks = (grid.0 * grid.1) as usize;
    let xb = Aligned::from(x);
    let (out, out2, ranks) = (Aligned::<f32>::zeroed(x.len()), Aligned::<f32>::zeroed(x.len()), Aligned::<u32>::zeroed(blocks));
    let (xp, op, o2p, rp) = (xb.addr(), out.addr(), out2.addr(), ranks.addr());
    let cs = cluster.0 * cluster.1;
    // SAFETY: cluster_sum(x, out, out2, ranks, cs, barrier) reads and writes one float per thread
    // of x, out, out2 and one u32 per block of ranks.
    unsafe {
        m.launch_cluster_with("cluster_sum", (grid.0, grid.1, 1), (nt, 1, 1), (cluster.0, cluster.1, 1), 4, schedule, &|f| {
            let k: extern "C" fn(u64, u64, u64, u64, u32, i32) = std::mem::transmute(f);
            k(xp, op, o2p, rp, cs, barrier as i32);
        })?
    };
    Ok((out.to_vec(), out2.to_vec(), ranks.to_vec()))
}

#[test]
fn cluster_sums_through_distributed_shared_memory() {
    if !have_compiler("cluster_sums_through_distributed_shared_memory") {
        return;
    }
    let m = test_module("cluster");
    let nt = 96u32;
    // Clusters of 2 and 4 CTAs along x, and 2 x 2 (rank = x + 2 y inside the cluster).
    for (grid, cluster) in [((6u32, 1u32), (2u32, 1u32)), ((8, 3), (4, 1)), ((4, 4), (2, 2))] {
        // Multiples of 1/16 in [-4, 4): every sum is exact in f32, in any order.
        let x: Vec<f32> = values((grid.0 * grid.1 * nt) as usize, 17).iter().map(|v| (v * 64.0).round() / 16.0).collect();
        let block_of = |bx: u32, by: u32| (by * grid.0 + bx) as usize;
        let block_sum = |b: usize| x[b * nt as usize..(b + 1) * nt as usize].iter().sum::<f32>();
        for schedule in SCHEDULES {
            let label = format!("grid {grid:?} cluster {cluster:?} schedule {schedule:?}");
            let (out, out2, ranks) = run_cluster_sum(&m, grid, cluster, nt, &x, true, schedule).unwrap_or_else(|e| panic!("{label}: {e}"));
            for by in 0..grid.1 {
                for bx in 0..grid.0 {
                    let b = block_of(bx, by);
                    let (x0, y0) = (bx / cluster.0 * cluster.0, by / cluster.1 * cluster.1);
                    let mut want = 0.0f32;
                    for dy in 0..cluster.1 {
                        for dx in 0..cluster.0 {
                            want += block_sum(block_of(x0 + dx, y0 + dy));
                        }
                    }
                    assert_eq!(ranks[b], bx % cluster.0 + (by % cluster.1) * cluster.0, "{label}: rank of block ({bx},{by})");
                    for t in 0..nt as usize {
                        let g = b * nt as usize + t;
                        assert_eq!(out[g], want, "{label}: static-shared cluster sum at block ({bx},{by}) thread {t}");
                        assert_eq!(out2[g], want, "{label}: dynamic-shared cluster sum at block ({bx},{by}) thread {t}");
                    }
                }
            }
        }
    }
}

/// Remote reads without the cluster barrier (only __syncthreads) race with the other CTA's
/// writes: far-apart runs one CTA's warps through the reads before the other CTA has written,
/// and never-written shared memory reads as NaN, so the race must show as wrong sums.
#[test]
fn cluster_read_without_the_cluster_barrier_is_caught() {
    if !have_compiler("cluster_read_without_the_cluster_barrier_is_caught") {
        return;
    }
    let m = test_module("cluster");
    let x: Vec<f32> = values(4 * 64, 5).iter().map(|v| (v * 64.0).round() / 16.0).collect();
    let (out, out2, _) = run_cluster_sum(&m, (4, 1), (2, 1), 64, &x, false, Schedule::FarApart).unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<f32> = (0..4 * 64).map(|g| x[g / 128 * 128..g / 128 * 128 + 128].iter().sum()).collect();
    let wrong = out.iter().zip(&want).filter(|(g, w)| g != w).count();
    let wrong2 = out2.iter().zip(&want).filter(|(g, w)| g != w).count();
    assert!(wrong > 0 && wrong2 > 0, "the racy remote reads gave the right sums under far-apart ({wrong}, {wrong2} wrong)");
    // With the barrier the same launch is right.
    let (out, _, _) = run_cluster_sum(&m, (4, 1), (2, 1), 64, &x, true, Schedule::FarApart).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, want);
}

#[test]
fn cluster_errors_are_reported() {
    if !have_compiler("cluster_errors_are_reported") {
        return;
    }
    let m = test_module("cluster");
    let out = Aligned::<i32>::zeroed(64);
    let op = out.addr();
    // SAFETY: cluster_deadlock writes at most 64 ints of out.
    let err = unsafe {
        m.launch_cluster_with("cluster_deadlock", (2, 1, 1), (64, 1, 1), (2, 1, 1), 0, Schedule::FarApart, &|f| {
            let k: extern "C" fn(u64) = std::mem::transmute(f);
            k(op);
        })
    }
    .expect_err("a cluster barrier against a block barrier must deadlock");
    let msg = err.to_string();
    assert!(msg.contains("deadlock") && msg.contains("cluster_wait") && msg.contains("__syncthreads"), "{msg}");
    let x = vec![0f32; 64 * 3];
    for (grid, cluster, what) in [((3u32, 1u32), (2u32, 1u32), "grid not a multiple"), ((17, 1), (17, 1), "17 CTAs")] {
        let x = if grid.0 as usize * 64 > x.len() { vec![0f32; grid.0 as usize * 64] } else { x.clone() };
        let err = run_cluster_sum(&m, grid, cluster, 64, &x, true, Schedule::RoundRobin).expect_err(what);
        assert!(err.to_string().contains("bad cluster"), "{what}: {err}");
    }
}

/// The sm_90 single-launch cluster group norm (group_norm.cu gn_cluster_DT_pP), launched as
/// engine/src/cuda/norm.rs does (grid N G cs, GNC_BLOCK = 256 threads, clusters (cs, 1, 1), no
/// dynamic shared memory, arguments x, y, w, b, stats, C, HW, G, cs, eps, act), against
/// kernels::norm::group_norm. `p` must hold the group: cpg HW / V <= cs 256 p.
#[allow(clippy::too_many_arguments)]
fn check_gn_cluster(m: &EmulatedModule, dt: Dt, n: usize, c: usize, hw: usize, groups: usize, cs: u32, p: usize, affine: bool, silu: bool, schedule: Option<Schedule>) {
    let eps = 1e-5f32;
    let v = if matches!(dt, Dt::F32) { 4 } else { 8 };
    let label = format!("gn_cluster {} n={n} c={c} hw={hw} g={groups} cs={cs} p={p} affine={affine} silu={silu} schedule={schedule:?}", dt.name());
    assert!(hw.is_multiple_of(v) && (c / groups) * hw / v <= cs as usize * 256 * p, "{label}: outside the kernel's host guarantees");
    // Sample 1 sits at an offset (the kernel's first pass is shifted by the group's first element).
    let x: Vec<f32> = values(n * c * hw, (c * hw + 7) as u64).iter().enumerate().map(|(i, v)| 2.0 * v + if i / (c * hw) == 1 { 40.0 } else { 0.0 }).collect();
    let x: Vec<f32> = x.iter().map(|&v| dt.round(v)).collect();
    let (w, b) = affine_params(c, 11);
    let (wb, bb) = (Aligned::from(&w), Aligned::from(&b));
    let xb = dt.encode(&x);
    let y = dt.zeroed(n * c * hw);
    let (xp, yp) = (xb.addr(), y.addr());
    let (wp, bp) = if affine { (wb.addr(), bb.addr()) } else { (0, 0) };
    let (c32, hw32, g32, act) = (c as u32, hw as u32, groups as u32, silu as i32);
    let grid = (n * groups) as u32 * cs;
    let name = format!("gn_cluster_{}_p{p}", dt.name());
    let call = |f: *const std::ffi::c_void| {
        // SAFETY: gn_cluster_DT_pP(x, y, w, b, stats, C, HW, G, cs, eps, act); stats null (the
        // plain forward; tests/group_norm_emulated.rs checks the saved ones).
        let k: extern "C" fn(u64, u64, u64, u64, u64, u32, u32, u32, u32, f32, i32) = unsafe { std::mem::transmute(f) };
        k(xp, yp, wp, bp, 0, c32, hw32, g32, cs, eps, act);
    };
    // SAFETY: x and y hold N C HW elements (16-byte aligned), w and b C floats or null.
    unsafe {
        match schedule {
            Some(s) => m.launch_cluster_with(&name, (grid, 1, 1), (256, 1, 1), (cs, 1, 1), 0, s, &call),
            None => m.launch_cluster(&name, (grid, 1, 1), (256, 1, 1), (cs, 1, 1), 0, &call),
        }
    }
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut want = vec![0f32; n * c * hw];
    let (wo, bo) = if affine { (Some(&w[..]), Some(&b[..])) } else { (None, None) };
    kernels::norm::group_norm(&x, n, c, hw, groups, wo, bo, eps, silu, &mut want);
    let want: Vec<f32> = want.iter().map(|&v| dt.round(v)).collect();
    let (atol, rtol) = dt.tolerance();
    assert_close(&label, &dt.decode(&y), &want, atol.max(3e-5), rtol.max(3e-5));
}

#[test]
fn group_norm_cluster_kernel_matches_the_cpu() {
    if !have_compiler("group_norm_cluster_kernel_matches_the_cpu") {
        return;
    }
    let m = family(&kernels::norm::GROUP_NORM_SOURCE);
    // Every P instance, cluster sizes 1, 2 and 4, HW a multiple of the pack but not of the CTA's
    // share (partial last packs of a CTA, CTAs with no pack in the last round).
    check_gn_cluster(&m, Dt::F32, 2, 6, 4 * 251, 3, 2, 2, true, false, None); // 502 packs
    check_gn_cluster(&m, Dt::Bf16, 2, 4, 8 * 601, 2, 2, 4, true, true, None); // 1202 packs
    check_gn_cluster(&m, Dt::F16, 1, 6, 8 * 1001, 2, 2, 8, true, true, None); // 3003 packs
    check_gn_cluster(&m, Dt::F32, 1, 2, 18004, 1, 4, 12, false, true, None); // 9002 packs
    check_gn_cluster(&m, Dt::Bf16, 1, 8, 14000, 2, 2, 16, true, false, None); // 7000 packs
    check_gn_cluster(&m, Dt::F16, 2, 3, 8 * 77, 1, 4, 2, true, false, None); // 231 packs: CTAs 1.. idle
    check_gn_cluster(&m, Dt::F16, 2, 4, 8 * 37, 2, 1, 2, false, true, None); // one CTA per group
    // The other schedules.
    for s in [Schedule::RoundRobin, Schedule::Random(3)] {
        check_gn_cluster(&m, Dt::F32, 2, 6, 4 * 251, 3, 4, 2, true, true, Some(s));
        check_gn_cluster(&m, Dt::Bf16, 1, 4, 8 * 601, 2, 2, 4, true, true, Some(s));
    }
}

// ---- (a) warpgroup MMA: wgmma_ss / wgmma_rs (kernels/emu/tests/warpgroup_mma.cu) ----------------------

const WG_K: usize = 48;
const WG_ROWS: usize = 128;
const WG_SHARED_BYTES: u32 = 2 * 8192 + 32768;
/// WgmmaSwizzle values and names.
const WG_SWIZZLES: [(u32, &str); 4] = [(1, "128B"), (2, "64B"), (3, "32B"), (0, "none")];

/// A (128 x 48) and B (48 x n) with entries exact in bf16 and f16 whose products and sums are
/// exact in f32, so that any layout or descriptor mistake changes the result and the right one
/// matches a naive GEMM exactly.
fn wg_operands(n: usize) -> (Vec<f32>, Vec<f32>) {
    let a = (0..WG_ROWS * WG_K).map(|i| ((i * 7 % 61) as f32 - 30.0) / 16.0).collect();
    let b = (0..WG_K * n).map(|i| ((i * 11 % 53) as f32 - 26.0) / 8.0).collect();
    (a, b)
}

fn wg_naive_gemm(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut d = vec![0f32; WG_ROWS * n];
    for i in 0..WG_ROWS {
        for j in 0..n {
            d[i * n + j] = (0..WG_K).map(|k| a[i * WG_K + k] * b[k * n + j]).sum();
        }
    }
    d
}

/// Runs `kernel` (kernel(a, b, out, swz, rs) or, with swz = None, kernel(a, b, out)) on one block
/// of `threads`; out holds WG_ROWS x n floats.
fn run_wg(m: &EmulatedModule, kernel: &str, a: &[u16], b: &[u16], n: usize, threads: u32, swz: Option<(u32, u32)>, schedule: Option<Schedule>) -> Result<Vec<f32>, EmulateError> {
    let (a, b) = (Aligned::from(a), Aligned::from(b));
    let out = Aligned::<f32>::zeroed(WG_ROWS * n);
    let (ap, bp, op) = (a.addr(), b.addr(), out.addr());
    let call = |f: *const std::ffi::c_void| {
        // SAFETY: the kernels read 128 x 48 u16 of a and 48 x n of b and write at most 128 x n
        // floats of out; `f` is the kernel with this signature.
        unsafe {
            match swz {
                Some((s, rs)) => std::mem::transmute::<_, extern "C" fn(u64, u64, u64, u32, u32)>(f)(ap, bp, op, s, rs),
                None => std::mem::transmute::<_, extern "C" fn(u64, u64, u64)>(f)(ap, bp, op),
            }
        }
    };
    // SAFETY: as in `call`.
    unsafe {
        match schedule {
            Some(s) => m.launch_with(kernel, (1, 1, 1), (threads, 1, 1), WG_SHARED_BYTES, s, &|f| call(f as *const std::ffi::c_void))?,
            None => m.launch(kernel, (1, 1, 1), (threads, 1, 1), WG_SHARED_BYTES, &|f| call(f as *const std::ffi::c_void))?,
        }
    };
    Ok(out.to_vec())
}

fn check_wgmma(m: &EmulatedModule, dt: emulation::Half, n: usize, schedule: Option<Schedule>) {
    let (a, b) = wg_operands(n);
    let want = wg_naive_gemm(&a, &b, n);
    let bits = |v: &[f32]| v.iter().map(|&x| dt.bits(x)).collect::<Vec<u16>>();
    // B K-major comes from Bt [n][48], MN-major from B [48][n].
    let bt: Vec<f32> = (0..n * WG_K).map(|i| b[(i % WG_K) * n + i / WG_K]).collect();
    for (major, b_in) in [("k", bits(&bt)), ("mn", bits(&b))] {
        let kernel = format!("wg_gemm_{}_{n}_{major}", dt.name());
        for (swz, swz_name) in WG_SWIZZLES {
            for rs in [0u32, 1] {
                let got = run_wg(m, &kernel, &bits(&a), &b_in, n, 256, Some((swz, rs)), schedule).unwrap_or_else(|e| panic!("{e}"));
                let form = if rs == 1 { "wgmma_rs" } else { "wgmma_ss" };
                assert_eq!(got, want, "{kernel}: {form}, {swz_name} swizzle, B {major}-major, schedule {schedule:?}");
            }
        }
    }
}

#[test]
fn wgmma_matches_naive_gemm_in_every_layout() {
    if !have_compiler("wgmma_matches_naive_gemm_in_every_layout") {
        return;
    }
    let m = test_module("warpgroup_mma");
    for dt in [emulation::Half::Bf16, emulation::Half::F16] {
        for n in [64, 96, 128, 160, 192, 256] {
            check_wgmma(&m, dt, n, None);
        }
    }
}

#[test]
fn wgmma_matches_naive_gemm_under_every_schedule() {
    if !have_compiler("wgmma_matches_naive_gemm_under_every_schedule") {
        return;
    }
    let m = test_module("warpgroup_mma");
    for schedule in SCHEDULES {
        check_wgmma(&m, emulation::Half::Bf16, 128, Some(schedule));
        check_wgmma(&m, emulation::Half::F16, 64, Some(schedule));
    }
}

#[test]
fn wgmma_accumulator_read_before_its_wait_is_nan() {
    if !have_compiler("wgmma_accumulator_read_before_its_wait_is_nan") {
        return;
    }
    let m = test_module("warpgroup_mma");
    let (a, b) = wg_operands(64);
    let bits = |v: &[f32]| v.iter().map(|&x| emulation::Half::Bf16.bits(x)).collect::<Vec<u16>>();
    for schedule in SCHEDULES {
        let got = run_wg(&m, "wg_read_before_wait", &bits(&a), &bits(&b), 64, 128, None, Some(schedule)).unwrap_or_else(|e| panic!("{e}"));
        assert!(got[..64 * 64].iter().all(|v| v.is_nan()), "schedule {schedule}: the accumulator before wgmma_wait must read NaN");
    }
}

#[test]
fn wgmma_reads_shared_memory_when_its_group_retires() {
    if !have_compiler("wgmma_reads_shared_memory_when_its_group_retires") {
        return;
    }
    let m = test_module("warpgroup_mma");
    let (a, b) = wg_operands(64);
    let bits = |v: &[f32]| v.iter().map(|&x| emulation::Half::Bf16.bits(x)).collect::<Vec<u16>>();
    let bt: Vec<f32> = (0..64 * WG_K).map(|i| b[(i % WG_K) * 64 + i / WG_K]).collect();
    // What the wgmma would give from the data at its issue (one k16 step of A's first 64 rows):
    // not zero, so the zeros below come from the refill.
    let at_issue: Vec<f32> = (0..64 * 64).map(|i| (0..16).map(|k| a[(i / 64) * WG_K + k] * b[k * 64 + i % 64]).sum()).collect();
    assert!(at_issue.iter().filter(|&&v| v != 0.0).count() > 64 * 60);
    let got = run_wg(&m, "wg_read_before_wait", &bits(&a), &bits(&bt), 64, 128, None, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(got[..64 * 64].iter().all(|v| v.is_nan()), "the accumulator before the wait");
    // The same wgmma with A's stage zeroed between the commit and the wait reads the zeros.
    for schedule in SCHEDULES {
        let got = run_wg(&m, "wg_refill_before_wait", &bits(&a), &bits(&bt), 64, 128, None, Some(schedule)).unwrap_or_else(|e| panic!("{e}"));
        assert!(got[..64 * 64].iter().all(|&v| v == 0.0), "schedule {schedule}: a stage refilled before the wait must reach the wgmma");
    }
}

#[test]
fn wgmma_errors_name_kernel_and_call_site() {
    if !have_compiler("wgmma_errors_name_kernel_and_call_site") {
        return;
    }
    let m = test_module("warpgroup_mma");
    let (a, b) = wg_operands(64);
    let bits = |v: &[f32]| v.iter().map(|&x| emulation::Half::Bf16.bits(x)).collect::<Vec<u16>>();
    let err = |kernel: &str, threads: u32, swz: Option<(u32, u32)>| match run_wg(&m, kernel, &bits(&a), &bits(&b), 64, threads, swz, None) {
        Err(e @ EmulateError::Launch { .. }) => e.to_string(),
        other => panic!("{kernel}: expected a launch error, got {other:?}"),
    };
    let e = err("wg_split_sites", 128, None);
    for part in ["wg_split_sites", "different call sites", "wgmma_ss<bf16> (warpgroup_mma.cu:"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = err("wg_misaligned", 128, None);
    for part in ["wg_misaligned", "wgmma_ss<bf16> (warpgroup_mma.cu:", "128B-swizzled", "not aligned to 1024 bytes"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = err("wg_outside_shared", 128, None);
    for part in ["wg_outside_shared", "wgmma_ss<bf16> (warpgroup_mma.cu:", "B: descriptor", "outside this CTA's shared memory"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    // 96 threads: the warpgroup lacks its last warp.
    let e = err("wg_gemm_bf16_64_k", 96, Some((1, 0)));
    for part in ["wg_gemm_bf16_64_k", "warpgroup 0", "incomplete"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    lookahead::show(&e);
}

// ---- (a) pipelines: named barriers, mbarriers, cp.async arrivals, setmaxnreg (pipeline.cuh) -------

const RING_WIDTH: usize = 128;

/// Runs mbar_ring (kernels/emu/tests/pipeline.cu) over `iters` rows; returns out (128 ints).
fn run_ring(m: &EmulatedModule, iters: usize, mode: i32, schedule: Schedule) -> Result<Vec<i32>, EmulateError> {
    let src: Vec<i32> = (0..iters * RING_WIDTH).map(|i| (i * 37 % 1001) as i32 - 500).collect();
    let src = Aligned::from(&src[..]);
    let out = Aligned::<i32>::zeroed(RING_WIDTH);
    let (sp, op) = (src.addr(), out.addr());
    // SAFETY: mbar_ring reads iters x 128 ints of src and writes 128 ints of out.
    unsafe {
        m.launch_with("mbar_ring", (1, 1, 1), (160, 1, 1), 0, schedule, &|f| {
            let k: extern "C" fn(u64, u64, i32, i32) = std::mem::transmute(f);
            k(sp, op, iters as i32, mode);
        })?
    };
    Ok(out.to_vec())
}

fn ring_reference(iters: usize) -> Vec<i32> {
    (0..RING_WIDTH).map(|c| (0..iters).map(|i| ((i * RING_WIDTH + c) * 37 % 1001) as i32 - 500).sum()).collect()
}

#[test]
fn mbarrier_rings_deliver_every_row_under_every_schedule() {
    if !have_compiler("mbarrier_rings_deliver_every_row_under_every_schedule") {
        return;
    }
    let m = test_module("pipeline");
    for iters in [1, 2, 7] {
        for schedule in SCHEDULES.into_iter().chain([Schedule::Random(7), Schedule::Random(99)]) {
            for (mode, what) in [(0, "plain stores + mbarrier_arrive"), (1, "cp_async_16 + cp_async_mbarrier_arrive")] {
                let got = run_ring(&m, iters, mode, schedule).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, ring_reference(iters), "{what}, {iters} rows, schedule {schedule}");
            }
        }
    }
}

#[test]
fn a_producer_that_skips_the_empty_barrier_is_caught() {
    if !have_compiler("a_producer_that_skips_the_empty_barrier_is_caught") {
        return;
    }
    let m = test_module("pipeline");
    // Far-apart runs the producer warp through every row before a consumer reads: the stages
    // hold the last rows only, and the full barriers are phases ahead, so that a consumer waits
    // for a parity that has come round again (a deadlock, as on the GPU) or sums the wrong rows.
    for iters in [4, 7] {
        match run_ring(&m, iters, 2, Schedule::FarApart) {
            Ok(got) => assert_ne!(got, ring_reference(iters), "far-apart must expose the refill of a stage that is still read"),
            Err(e) => assert!(e.to_string().contains("deadlock: ") && e.to_string().contains("mbarrier_try_wait"), "{e}"),
        }
    }
}

#[test]
fn named_barriers_order_two_warpgroups_in_turn() {
    if !have_compiler("named_barriers_order_two_warpgroups_in_turn") {
        return;
    }
    let m = test_module("pipeline");
    let iters = 5;
    for schedule in SCHEDULES.into_iter().chain([Schedule::Random(3), Schedule::Random(11)]) {
        let out = Aligned::<i32>::zeroed(2 * iters);
        let op = out.addr();
        // SAFETY: named_ping_pong writes 2 iters ints of out.
        unsafe {
            m.launch_with("named_ping_pong", (1, 1, 1), (256, 1, 1), 0, schedule, &|f| {
                let k: extern "C" fn(u64, i32) = std::mem::transmute(f);
                k(op, iters as i32);
            })
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let want: Vec<i32> = (0..2 * iters).map(|i| (i % 2) as i32).collect();
        assert_eq!(out.to_vec(), want, "schedule {schedule}");
    }
}

/// The error of launching `kernel(int* out)` on one block of `threads` under `schedule`.
fn pipeline_error(m: &EmulatedModule, kernel: &str, threads: u32, schedule: Schedule) -> String {
    let out = Aligned::<i32>::zeroed(threads as usize);
    let op = out.addr();
    // SAFETY: the kernels write at most one int per thread.
    let r = unsafe {
        m.launch_with(kernel, (1, 1, 1), (threads, 1, 1), 0, schedule, &|f| {
            let k: extern "C" fn(u64) = std::mem::transmute(f);
            k(op);
        })
    };
    match r {
        Err(e @ EmulateError::Launch { .. }) => e.to_string(),
        other => panic!("{kernel}, schedule {schedule}: expected a launch error, got {other:?}"),
    }
}

#[test]
fn pipeline_errors_name_the_barrier_and_the_call_site() {
    if !have_compiler("pipeline_errors_name_the_barrier_and_the_call_site") {
        return;
    }
    let m = test_module("pipeline");
    let cases: &[(&str, u32, &[&str])] = &[
        ("mbar_deadlock", 64, &["deadlock", "waiting at mbarrier_try_wait(shared+0x", "parity 0) (pipeline.cu:", "lacks 1 of 2 arrivals and 0 transaction bytes", "64 threads wait for it"]),
        ("named_deadlock", 64, &["deadlock", "threads 0-31: waiting at named_barrier_sync(1, 64) (pipeline.cu:", "threads 32-63: exited", "named barrier 1 (64 threads): 1 of 2 warps arrived"]),
        ("mbar_before_init", 32, &["mbarrier_arrive at pipeline.cu:", "is not an initialised mbarrier"]),
        // Another thread arrives before the init ran, or after it without the __syncthreads.
        ("mbar_no_sync_after_init", 64, &["mbarrier_arrive at pipeline.cu:", "mbarrier_init", "__syncthreads"]),
        ("mbar_reinit_in_use", 32, &["mbarrier_init at pipeline.cu:", "re-initialised while in use", "1 of 2 arrivals"]),
        ("mbar_arrive_beyond_count", 32, &["mbarrier_arrive at pipeline.cu:", "an arrival beyond the count", "waits for 64 transaction bytes"]),
        ("named_count_mismatch", 128, &["named barrier 1: warp", "for 96 threads", "for 64 threads", "same count"]),
        ("named_split_warp", 32, &["warp 0 at different named barriers", "named_barrier_sync(1, 32) (pipeline.cu:"]),
        ("setmaxnreg_mismatch", 128, &["warpgroup 0 at different call sites", "setmaxnreg_dec (pipeline.cu:"]),
    ];
    for schedule in SCHEDULES {
        for (kernel, threads, parts) in cases {
            let e = pipeline_error(&m, kernel, *threads, schedule);
            for part in parts.iter().chain(&[*kernel]) {
                assert!(e.contains(part), "{kernel}, schedule {schedule}: missing {part:?} in: {e}");
            }
        }
    }
    lookahead::show(&pipeline_error(&m, "mbar_deadlock", 64, Schedule::FarApart));
    lookahead::show(&pipeline_error(&m, "named_deadlock", 64, Schedule::FarApart));
}

// ---- (a) TMA: tensor maps, swizzled boxes, zero fill, stores, a TMA-fed wgmma pipeline ----------

use kernels::emulate::{TensorMap2d, TensorMapArg, TmaDtype, TmaSwizzle};

const TMA_ROWS: u64 = 40;
const TMA_COLS: u64 = 100;
const TMA_STRIDE: u64 = 208; // bytes: 100 u16 rounded up to a multiple of 16

/// A 40 x 100 u16 matrix (rows 208 bytes apart) with distinct nonzero entries.
fn tma_matrix() -> Aligned<u16> {
    let per_row = (TMA_STRIDE / 2) as usize;
    let v: Vec<u16> = (0..TMA_ROWS as usize * per_row).map(|i| if i % per_row < TMA_COLS as usize { 1 + (i * 131 % 65000) as u16 } else { 0xdead }).collect();
    Aligned::from(&v[..])
}

fn tma_map(base: u64, box_rows: u32, box_cols: u32, swizzle: TmaSwizzle) -> TensorMap2d {
    TensorMap2d { base, dtype: TmaDtype::U16, rows: TMA_ROWS, cols: TMA_COLS, row_stride_bytes: TMA_STRIDE, box_rows, box_cols, swizzle }
}

/// The bytes of the box at (x, y) as TMA leaves them in shared memory (from a base aligned to the
/// swizzle's repeat): row-major, zero outside the matrix, then the swizzle (chunk bits 4.. XOR
/// row bits 7..).
fn tma_box_reference(m: &[u16], map: &TensorMap2d, x: i64, y: i64) -> Vec<u8> {
    let (bc, br) = (map.box_cols as usize, map.box_rows as usize);
    let mask = match map.swizzle {
        TmaSwizzle::None => 0,
        TmaSwizzle::B32 => 0x10,
        TmaSwizzle::B64 => 0x30,
        TmaSwizzle::B128 => 0x70,
    };
    let mut out = vec![0u8; bc * br * 2];
    for r in 0..br {
        for c in 0..bc {
            let (gr, gc) = (y + r as i64, x + c as i64);
            let v = if gr >= 0 && gc >= 0 && (gr as u64) < map.rows && (gc as u64) < map.cols { m[gr as usize * (TMA_STRIDE / 2) as usize + gc as usize] } else { 0 };
            let o = (r * bc + c) * 2;
            let o = o ^ ((o >> 3) & mask);
            out[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Runs tma_tile; returns the raw shared-memory bytes of the box.
fn run_tma_tile(m: &EmulatedModule, map: TensorMapArg, (x, y): (i32, i32), dst_offset: u32, expect: u32, box_bytes: u32, schedule: Schedule) -> Result<Vec<u8>, EmulateError> {
    let out = Aligned::<u32>::zeroed(box_bytes as usize / 4);
    let op = out.addr();
    // SAFETY: tma_tile writes box_bytes / 4 u32 of out and reads the matrix the map describes.
    unsafe {
        m.launch_with("tma_tile", (1, 1, 1), (64, 1, 1), dst_offset + box_bytes, schedule, &|f| {
            let k: extern "C" fn(TensorMapArg, u64, i32, i32, u32, u32, u32) = std::mem::transmute(f);
            k(map, op, x, y, dst_offset, expect, box_bytes);
        })?
    };
    Ok(out.to_vec().iter().flat_map(|w| w.to_le_bytes()).collect())
}

#[test]
fn tma_loads_land_swizzled_and_zero_filled() {
    if !have_compiler("tma_loads_land_swizzled_and_zero_filled") {
        return;
    }
    let m = test_module("tma");
    let a = tma_matrix();
    for (swizzle, box_cols) in [(TmaSwizzle::None, 24), (TmaSwizzle::B32, 16), (TmaSwizzle::B64, 32), (TmaSwizzle::B128, 64)] {
        for box_rows in [8, 13] {
            let map = tma_map(a.addr(), box_rows, box_cols, swizzle);
            let arg = map.emulated().unwrap();
            // Inside, past the right and bottom edges, and at negative coordinates.
            for (x, y) in [(8, 4), (70, 33), (-8, -3), (36, 0)] {
                for schedule in [Schedule::FarApart, Schedule::RoundRobin, Schedule::Random(5)] {
                    let got = run_tma_tile(&m, arg, (x, y), 0, map.box_bytes(), map.box_bytes(), schedule).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(got, tma_box_reference(a.as_ref(), &map, x as i64, y as i64), "{swizzle:?}, box {box_rows} x {box_cols} at ({x}, {y}), schedule {schedule}");
                }
            }
        }
    }
}

#[test]
fn tma_errors_name_the_call_site() {
    if !have_compiler("tma_errors_name_the_call_site") {
        return;
    }
    let m = test_module("tma");
    let a = tma_matrix();
    let err = |map: TensorMapArg, dst_offset: u32, expect: u32, box_bytes: u32| match run_tma_tile(&m, map, (0, 0), dst_offset, expect, box_bytes, Schedule::FarApart) {
        Err(e @ EmulateError::Launch { .. }) => e.to_string(),
        other => panic!("expected a launch error, got {other:?}"),
    };
    let plain = tma_map(a.addr(), 8, 24, TmaSwizzle::None);
    let swizzled = tma_map(a.addr(), 8, 64, TmaSwizzle::B128);
    let (pb, sb) = (plain.box_bytes(), swizzled.box_bytes());
    let e = err(plain.emulated().unwrap(), 64, pb, pb);
    for part in ["tma_tile", "tma_load_2d at tma.cu:", "shared-memory box at shared+0x", "not 128-byte aligned"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = err(swizzled.emulated().unwrap(), 128, sb, sb);
    assert!(e.contains("not 1024-byte aligned (128B swizzle)"), "{e}");
    // expect_tx announcing more bytes than the copy brings: the phase never completes.
    let e = err(plain.emulated().unwrap(), 0, 2 * pb, pb);
    for part in ["deadlock", "mbarrier_try_wait(shared+0x", &format!("lacks 0 of 1 arrivals and {pb} transaction bytes")] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    // ... or fewer: the copy completes more bytes than the phase expects.
    let e = err(plain.emulated().unwrap(), 0, pb / 2, pb);
    for part in ["tma_load_2d (tma.cu:", &format!("complete_tx of {pb} bytes"), &format!("expects only {} more", pb / 2)] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    // A box whose inner dimension is not the swizzle span: refused by the description, and by
    // the emulator when a map says so anyway.
    let wrong = tma_map(a.addr(), 8, 32, TmaSwizzle::B128);
    assert!(wrong.emulated().unwrap_err().to_string().contains("must be 128 bytes, not 64"));
    let mut words = tma_map(a.addr(), 8, 32, TmaSwizzle::B64).emulated().unwrap();
    words.0[8] = 128;
    let e = err(words, 0, 512, 512);
    assert!(e.contains("with the 128B swizzle the box's inner dimension must be 128 bytes, not 64"), "{e}");
    let e = err(TensorMapArg([0; 16]), 0, 512, 512);
    assert!(e.contains("not an emulator tensor map"), "{e}");
    lookahead::show(&err(plain.emulated().unwrap(), 0, 2 * pb, pb));
}

#[test]
fn tma_stores_clip_to_the_tensor_and_read_shared_memory_until_their_wait() {
    if !have_compiler("tma_stores_clip_to_the_tensor_and_read_shared_memory_until_their_wait") {
        return;
    }
    let m = test_module("tma");
    let a = tma_matrix();
    let (x, y, x2, y2) = (8i32, 4i32, 90i32, 36i32);
    for overwrite in [0u32, 1] {
        for schedule in SCHEDULES {
            let dst = Aligned::from(&vec![0xaaaau16; (TMA_ROWS * TMA_STRIDE / 2) as usize][..]);
            let src_map = tma_map(a.addr(), 8, 24, TmaSwizzle::None);
            let dst_map = tma_map(dst.addr(), 8, 24, TmaSwizzle::None);
            let (sm, dm, bytes) = (src_map.emulated().unwrap(), dst_map.emulated().unwrap(), src_map.box_bytes());
            // SAFETY: tma_copy_box reads and writes the two matrices the maps describe.
            unsafe {
                m.launch_with("tma_copy_box", (1, 1, 1), (32, 1, 1), bytes, schedule, &|f| {
                    let k: extern "C" fn(TensorMapArg, TensorMapArg, i32, i32, i32, i32, u32, u32) = std::mem::transmute(f);
                    k(sm, dm, x, y, x2, y2, bytes, overwrite);
                })
                .unwrap_or_else(|e| panic!("{e}"))
            };
            let per_row = (TMA_STRIDE / 2) as usize;
            let mut want = vec![0xaaaau16; (TMA_ROWS as usize) * per_row];
            for r in 0..8usize {
                for c in 0..24usize {
                    let (gr, gc) = (y2 as usize + r, x2 as usize + c);
                    if gr < TMA_ROWS as usize && gc < TMA_COLS as usize {
                        want[gr * per_row + gc] = if overwrite == 1 { 0 } else { a.as_ref()[(y as usize + r) * per_row + x as usize + c] };
                    }
                }
            }
            assert_eq!(dst.to_vec(), want, "overwrite {overwrite}, schedule {schedule}");
        }
    }
}

#[test]
fn a_two_stage_tma_pipeline_feeds_wgmma() {
    if !have_compiler("a_two_stage_tma_pipeline_feeds_wgmma") {
        return;
    }
    let m = test_module("tma");
    for kt in [1usize, 2, 5] {
        let k = 64 * kt;
        let af: Vec<f32> = (0..64 * k).map(|i| ((i * 7 % 61) as f32 - 30.0) / 16.0).collect();
        let btf: Vec<f32> = (0..64 * k).map(|i| ((i * 11 % 53) as f32 - 26.0) / 8.0).collect();
        let want: Vec<f32> = (0..64 * 64).map(|i| (0..k).map(|q| af[(i / 64) * k + q] * btf[(i % 64) * k + q]).sum()).collect();
        let bits = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
        let (a, bt) = (Aligned::from(&bits(&af)[..]), Aligned::from(&bits(&btf)[..]));
        let desc = |base: u64| TensorMap2d { base, dtype: TmaDtype::Bf16, rows: 64, cols: k as u64, row_stride_bytes: 2 * k as u64, box_rows: 64, box_cols: 64, swizzle: TmaSwizzle::B128 };
        let (ma, mb) = (desc(a.addr()).emulated().unwrap(), desc(bt.addr()).emulated().unwrap());
        for schedule in SCHEDULES.into_iter().chain([Schedule::Random(21), Schedule::Random(77)]) {
            let out = Aligned::<f32>::zeroed(64 * 64);
            let op = out.addr();
            // SAFETY: tma_gemm reads the matrices the maps describe and writes 64 x 64 floats of out.
            unsafe {
                m.launch_with("tma_gemm", (1, 1, 1), (256, 1, 1), 4 * 8192, schedule, &|f| {
                    let k: extern "C" fn(TensorMapArg, TensorMapArg, u64, i32) = std::mem::transmute(f);
                    k(ma, mb, op, kt as i32);
                })
                .unwrap_or_else(|e| panic!("{e}"))
            };
            assert_eq!(out.to_vec(), want, "{kt} k-tiles, schedule {schedule}");
        }
    }
}

#[test]
fn two_consumer_warpgroups_take_turns_on_a_tma_pipeline() {
    if !have_compiler("two_consumer_warpgroups_take_turns_on_a_tma_pipeline") {
        return;
    }
    let m = test_module("tma");
    for kt in [1usize, 4] {
        let k = 64 * kt;
        let af: Vec<f32> = (0..128 * k).map(|i| ((i * 7 % 61) as f32 - 30.0) / 16.0).collect();
        let btf: Vec<f32> = (0..64 * k).map(|i| ((i * 11 % 53) as f32 - 26.0) / 8.0).collect();
        let want: Vec<f32> = (0..128 * 64).map(|i| (0..k).map(|q| af[(i / 64) * k + q] * btf[(i % 64) * k + q]).sum()).collect();
        let bits = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
        let (a, bt) = (Aligned::from(&bits(&af)[..]), Aligned::from(&bits(&btf)[..]));
        let desc = |base: u64, rows: u64, box_rows: u32| TensorMap2d { base, dtype: TmaDtype::Bf16, rows, cols: k as u64, row_stride_bytes: 2 * k as u64, box_rows, box_cols: 64, swizzle: TmaSwizzle::B128 };
        let (ma, mb) = (desc(a.addr(), 128, 128).emulated().unwrap(), desc(bt.addr(), 64, 64).emulated().unwrap());
        for schedule in SCHEDULES.into_iter().chain([Schedule::Random(13), Schedule::Random(31)]) {
            let out = Aligned::<f32>::zeroed(128 * 64);
            let log = Aligned::<i32>::zeroed(2 * kt);
            let (op, lp) = (out.addr(), log.addr());
            // SAFETY: tma_pingpong_gemm reads the matrices the maps describe, writes 128 x 64
            // floats of out and 2 kt ints of log.
            unsafe {
                m.launch_with("tma_pingpong_gemm", (1, 1, 1), (384, 1, 1), 2 * 3 * 8192, schedule, &|f| {
                    let k: extern "C" fn(TensorMapArg, TensorMapArg, u64, u64, i32) = std::mem::transmute(f);
                    k(ma, mb, op, lp, kt as i32);
                })
                .unwrap_or_else(|e| panic!("{e}"))
            };
            assert_eq!(out.to_vec(), want, "{kt} k-tiles, schedule {schedule}");
            let turns: Vec<i32> = (0..2 * kt).map(|i| 1 + (i % 2) as i32).collect();
            assert_eq!(log.to_vec(), turns, "issue order, {kt} k-tiles, schedule {schedule}");
        }
    }
}
