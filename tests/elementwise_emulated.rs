//! The 16-bit activation formulas of kernels/cuda/elementwise.cu (sigmoid and SiLU through
//! common.cuh's sigmoid_approx, exact GELU through gelu_erf_low) run on the CPU emulator of CUDA
//! over every bf16 and every f16 bit pattern (NaN, ±inf, subnormals and the overflow range of
//! e^-x included) against the exact values (f64), rounded the same way: each result must be that value
//! or one rounding step away, NaN exactly where it is NaN. How many results differ from the f32 CPU
//! reference (kernels::elementwise::UnaryOp::apply) is printed: that reference loses the tails
//! (see `exact`), where PyTorch's f32 formulas lose them too.
//!
//! The emulator computes __expf and __fdividef in IEEE f32 (kernels/emu), not with the GPU's MUFU
//! approximations, so this checks the formulas (range, special values, cancellation) rather than
//! the hardware's last f32 ulps; those are a few ulps, far below a 16-bit step.

use kernels::elementwise::UnaryOp;
use kernels::emulate::EmulatedModule;

#[path = "common/emulation.rs"]
mod emulation;
use emulation::{have_compiler, Aligned, Half};

/// Steps between two values of a 16-bit float type on its ordered number line (0 for equal).
fn steps_apart(a: u16, b: u16) -> u32 {
    // Sign-magnitude bits to a monotone integer line (±0 both map to 0).
    let line = |x: u16| -> i32 {
        let mag = (x & 0x7fff) as i32;
        if x & 0x8000 != 0 {
            -mag
        } else {
            mag
        }
    };
    (line(a) - line(b)).unsigned_abs()
}

fn check_activation(m: &EmulatedModule, h: Half, op: UnaryOp) {
    let n = 65536usize;
    let x = Aligned::from(&(0..=u16::MAX).collect::<Vec<u16>>());
    let y = Aligned::<u16>::zeroed(n);
    let (code, p0, p1) = op.cuda_code();
    let kernel = format!("unary_{}", h.name());
    // The contiguous path's launch (engine/src/cuda/elementwise.rs): one 16-byte pack of 8
    // elements per thread, 256 threads a block.
    let grid = (n / 8).div_ceil(256) as u32;
    let (xa, ya) = (x.addr(), y.addr());
    // SAFETY: thread i reads and writes pack i of the n-element buffers (n is a multiple of 8).
    unsafe {
        m.launch(&kernel, (grid, 1, 1), (256, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64, u64, i32, f32, f32) = std::mem::transmute(f);
            k(xa, ya, n as u64, code, p0, p1);
        })
    }
    .unwrap_or_else(|e| panic!("{kernel} {op:?}: {e}"));
    let (mut one_step, mut differs_from_cpu) = (0usize, 0usize);
    for (b, &got) in y.as_ref().iter().enumerate() {
        let v = h.value(b as u16);
        let exact = exact(op, v as f64) as f32;
        if exact.is_nan() {
            assert!(h.value(got).is_nan(), "{kernel} {op:?}({v:e}): got {} where the exact result is NaN", h.value(got));
            continue;
        }
        assert!(!h.value(got).is_nan(), "{kernel} {op:?}({v:e}): got NaN, want {exact:e}");
        match steps_apart(got, h.bits(exact)) {
            0 => {}
            1 => one_step += 1,
            s => panic!("{kernel} {op:?}({v:e}) = {} is {s} steps from the exact {exact:e}", h.value(got)),
        }
        differs_from_cpu += (got != h.bits(op.apply(v))) as usize;
    }
    // Rounding-boundary cases only: a few per thousand at most.
    assert!(one_step * 200 < n, "{kernel} {op:?}: {one_step} of {n} results one step off");
    lookahead::show(&format!("{kernel} {op:?}: every input within one step of exact ({one_step} one step off); {differs_from_cpu} differ from the f32 CPU reference"));
}

/// The activation in f64, without the f32 formulas' overflow (1 + e^-x) and cancellation
/// (1 + erf(x / sqrt 2) for x << 0), which the CPU reference has below x = -88.7 (sigmoid, SiLU
/// give 0 where the exact values are subnormal or ~1e-37) and below about -4 (GELU a few steps
/// off): the kernels' forms keep those, so they are checked against the exact values.
fn exact(op: UnaryOp, x: f64) -> f64 {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    match op {
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Gelu => 0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2),
        other => unreachable!("no exact form for {other:?}"),
    }
}

#[test]
fn activations_16bit_match_the_reference_on_every_input() {
    if !have_compiler("activations_16bit_match_the_reference_on_every_input") {
        return;
    }
    let m = EmulatedModule::load(&kernels::elementwise::SOURCE).unwrap_or_else(|e| panic!("{e}"));
    for h in [Half::Bf16, Half::F16] {
        for op in [UnaryOp::Sigmoid, UnaryOp::Silu, UnaryOp::Gelu] {
            check_activation(&m, h, op);
        }
    }
}

/// GEGLU (kernels/cuda/norm.cu): the packed kernel (rows of whole 16-byte packs) and the
/// one-element kernel (any row length), against kernels::norm::geglu_rows on the same rounded
/// inputs, gates in [-3, 3] where the f32 reference keeps its digits.
#[test]
fn geglu_kernels_match_the_cpu() {
    if !have_compiler("geglu_kernels_match_the_cpu") {
        return;
    }
    let m = EmulatedModule::load(&kernels::norm::SOURCE).unwrap_or_else(|e| panic!("{e}"));
    // (dtype name, bytes an element, 16-bit type)
    for (name, size, h) in [("f32", 4usize, None), ("bf16", 2, Some(Half::Bf16)), ("f16", 2, Some(Half::F16))] {
        for (rows, half) in [(5usize, 24usize), (3, 13), (2, 8)] {
            let x: Vec<f32> = emulation::values(rows * 2 * half, (rows * half) as u64).iter().map(|v| v * 3.0).collect();
            let x = h.map_or(x.clone(), |h| h.round(&x));
            let mut want = vec![0f32; rows * half];
            kernels::norm::geglu_rows(&x, half, &mut want);
            let vec = 16 / size;
            for packed in [false, true] {
                if packed && half % vec != 0 {
                    continue;
                }
                let total = rows * half;
                let got: Vec<f32> = match h {
                    None => {
                        let (xa, ya) = (Aligned::from(&x), Aligned::<f32>::zeroed(total));
                        run_geglu(&m, name, packed, xa.addr(), ya.addr(), half, total, vec);
                        ya.to_vec()
                    }
                    Some(h) => {
                        let bits: Vec<u16> = x.iter().map(|&v| h.bits(v)).collect();
                        let (xa, ya) = (Aligned::from(&bits), Aligned::<u16>::zeroed(total));
                        run_geglu(&m, name, packed, xa.addr(), ya.addr(), half, total, vec);
                        ya.to_vec().iter().map(|&b| h.value(b)).collect()
                    }
                };
                // One output rounding (plus the 16-bit GELU's few f32 ulps); f32 is the same formula.
                let rtol = h.map_or(1e-6, |h| 2.0 * h.unit_roundoff());
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-6 + rtol * w.abs(), "geglu {name} packed={packed} rows {rows} half {half}: [{i}] = {g}, want {w}");
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_geglu(m: &EmulatedModule, dt: &str, packed: bool, x: u64, y: u64, half: usize, total: usize, vec: usize) {
    let kernel = if packed { format!("geglu_vec_{dt}") } else { format!("geglu_{dt}") };
    let threads = if packed { total / vec } else { total };
    // SAFETY: x holds 2 * total elements and y total, 16-byte aligned (Aligned); a thread per
    // element (or pack), past-the-end threads return.
    unsafe {
        m.launch(&kernel, (threads.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0, &|f| {
            let k: extern "C" fn(u64, u64, u32, u32) = std::mem::transmute(f);
            k(x, y, half as u32, total as u32);
        })
    }
    .unwrap_or_else(|e| panic!("{kernel}: {e}"));
}

/// The transposing copy (copy_transpose_bN, engine's copy_strided for views whose unit-stride
/// dimension is not the last) on the emulator, every element size, against the view read element
/// by element: a batched [B, C, L] -> [B, L, C] transpose, a 4D permute whose batch dimensions sit
/// on both sides of the unit-stride one (a narrowed middle dimension keeps them from merging), and
/// a matrix .t(); partial 32 x 32 tiles on both axes, and fewer z blocks than batch entries.
#[test]
fn transposing_copy_matches_the_view() {
    if !have_compiler("transposing_copy_matches_the_view") {
        return;
    }
    let m = EmulatedModule::load(&kernels::elementwise::SOURCE).unwrap_or_else(|e| panic!("{e}"));
    // (view shape, its element strides, storage elements)
    let cases: [(&[usize], &[usize], usize); 3] = [
        (&[3, 37, 45], &[45 * 37, 1, 37], 3 * 45 * 37),
        (&[2, 37, 3, 45], &[3 * 46 * 37, 1, 46 * 37, 37], 2 * 3 * 46 * 37),
        (&[70, 33], &[1, 70], 33 * 70),
    ];
    for (shape, strides, storage) in cases {
        let plan = engine::cuda::ElementwisePlan::<1>::new("copy", shape, [strides]).unwrap();
        let a = plan.args;
        let r = a.rank as usize;
        let p = (0..r - 1).find(|&d| a.strides[0][d] == 1).unwrap_or_else(|| panic!("{shape:?}: no unit-stride dimension before the last after coalescing"));
        let batch: u64 = (0..r).filter(|&d| d != p && d != r - 1).map(|d| a.shape[d]).product();
        // The view read element by element (row-major over `shape`).
        let n: usize = shape.iter().product();
        let want: Vec<u64> = (0..n)
            .map(|i| {
                let (mut rest, mut off) = (i, 0);
                for d in (0..shape.len()).rev() {
                    off += (rest % shape[d]) * strides[d];
                    rest /= shape[d];
                }
                off as u64
            })
            .collect();
        for (size, name) in [(1usize, "b1"), (2, "b2"), (4, "b4"), (8, "b8")] {
            // Element i of the storage holds i (truncated to the element size), so the output
            // names the storage element each position read.
            let mask = if size == 8 { u64::MAX } else { (1u64 << (8 * size)) - 1 };
            let bytes = |v: &[u64]| v.iter().flat_map(|&x| (x & mask).to_le_bytes()[..size].to_vec()).collect::<Vec<u8>>();
            let x = Aligned::from(&bytes(&(0..storage as u64).collect::<Vec<u64>>()));
            let y = Aligned::<u8>::zeroed(n * size);
            let kernel = format!("copy_transpose_{name}");
            let grid = (a.shape[r - 1].div_ceil(32) as u32, a.shape[p].div_ceil(32) as u32, batch.min(2) as u32);
            let (xa, ya, p32) = (x.addr(), y.addr(), p as u32);
            // SAFETY: the kernel reads the view's elements inside the storage (plan.args is its
            // coalesced form) and writes n elements of y.
            unsafe {
                m.launch(&kernel, grid, (32, 8, 1), 0, &|f| {
                    let k: extern "C" fn(u64, u64, engine::cuda::StridedArgs<1>, u32) = std::mem::transmute(f);
                    k(xa, ya, a, p32);
                })
            }
            .unwrap_or_else(|e| panic!("{kernel} {shape:?}: {e}"));
            assert_eq!(y.as_ref(), &bytes(&want)[..], "{kernel} {shape:?} {strides:?}: output differs from the view");
        }
        lookahead::show(&format!("copy_transpose {shape:?} strides {strides:?}: coalesced rank {r}, unit stride on dim {p}, batch {batch}: every element size matches"));
    }
}
