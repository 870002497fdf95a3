//! The CPU emulator of the CUDA kernels (kernels::emulate, kernels/emu): (a) its own semantics,
//! with purpose-written kernels (kernels/emu/tests/*.cu) checked against plain Rust math: mma
//! and every ldmatrix variant through matmuls and register dumps, cp.async group ordering, warp
//! shuffles and votes, barriers with early exits, dynamic shared memory, deadlock and launch
//! errors; (b) existing kernel families run under emulation against the CPU reference the engine
//! uses (kernels/src/{softmax,norm}.rs), on odd sizes. Needs a C++ compiler (LOOKAHEAD_CXX, c++ or
//! g++); without one every test prints "skipped: no C++ compiler" and passes, unless `CI` is set.

use std::ffi::c_void;
use std::path::PathBuf;

use half::{bf16, f16};
use kernels::emulate::{find_compiler, EmulateError, EmulatedModule};

// ---- harness ---------------------------------------------------------------------------------------

/// False (after saying so) when there is no C++ compiler; a failure under CI.
fn have_compiler(test: &str) -> bool {
    match find_compiler() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but the CUDA emulator has no compiler: {e}"),
        Err(e) => {
            lookahead::show(&format!("{test}: skipped: no C++ compiler ({e})"));
            false
        }
    }
}

/// A test kernel file of the emulator (kernels/emu/tests/NAME.cu), built and loaded.
fn test_module(name: &str) -> EmulatedModule {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels/emu/tests").join(format!("{name}.cu"));
    EmulatedModule::load_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn family(src: &kernels::compile::KernelSource) -> EmulatedModule {
    EmulatedModule::load(src).unwrap_or_else(|e| panic!("{e}"))
}

/// A zeroed buffer of `n` values of T whose start is 16-byte aligned (vectorized kernel paths).
struct Aligned<T: Copy> {
    store: Vec<u128>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy> Aligned<T> {
    fn zeroed(len: usize) -> Self {
        let words = (len * std::mem::size_of::<T>()).div_ceil(16).max(1);
        Aligned { store: vec![0u128; words], len, _t: std::marker::PhantomData }
    }
    fn from(v: &[T]) -> Self {
        let mut a = Self::zeroed(v.len());
        a.as_mut().copy_from_slice(v);
        a
    }
    fn as_ref(&self) -> &[T] {
        // SAFETY: the store holds at least len T values and is 16-byte aligned; T is plain data.
        unsafe { std::slice::from_raw_parts(self.store.as_ptr() as *const T, self.len) }
    }
    fn as_mut(&mut self) -> &mut [T] {
        // SAFETY: as in as_ref, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.store.as_mut_ptr() as *mut T, self.len) }
    }
    fn addr(&self) -> u64 {
        self.store.as_ptr() as u64
    }
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), different per seed.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
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
    let mut d = Aligned::<f32>::zeroed(MT * NT);
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
