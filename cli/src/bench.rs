//! `lookahead bench`: kernel throughput at SDXL-like shapes, optionally next to a PyTorch baseline
//! timed on the same device in the same run (benches/baseline_torch.py, embedded in the binary).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use engine::ops::flash_attention::AttentionReference;
use engine::ops::lora_linear::LoraGradsWanted;
use engine::{Conv2dParams, DType, Device, Tensor};
use serde::Serialize;

const BASELINE_SCRIPT: &str = include_str!("../../benches/baseline_torch.py");

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Element type of the inputs (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Only cases whose name contains this text (or one of several, separated by commas).
    #[arg(long)]
    filter: Option<String>,
    /// Python interpreter with torch: time the same cases with PyTorch in this run and show ratios.
    #[arg(long)]
    baseline: Option<String>,
    /// Seconds to keep repeating each case (the median is reported).
    #[arg(long, default_value_t = 0.5)]
    min_time: f64,
    /// Machine-readable JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// CUDA: also give each case's GPU time per kernel it launches (and per library call, memset
    /// and copy), from timing events around every launch of one batch queued behind a held stream.
    #[arg(long)]
    profile: bool,
}

/// One benchmark case; serialised as the baseline script's input.
#[derive(Serialize, Clone, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Op {
    Matmul { b: usize, m: usize, n: usize, k: usize },
    Conv2d { n: usize, c: usize, h: usize, w: usize, k: usize, r: usize, stride: usize, pad: usize },
    /// `channels_last`: NHWC strides, as the UNet keeps activations on CUDA (and the baseline
    /// runs them in torch.channels_last); else NCHW-contiguous.
    GroupNorm { n: usize, c: usize, h: usize, w: usize, groups: usize, silu: bool, channels_last: bool },
    /// dx, dweight, dbias of group_norm (+SiLU).
    GroupNormBackward { n: usize, c: usize, h: usize, w: usize, groups: usize, silu: bool, channels_last: bool },
    /// x [m, k] times a weight [n, k] transposed (the base GEMM of a LoRA linear).
    Linear { m: usize, n: usize, k: usize },
    Softmax { rows: usize, cols: usize },
    LayerNorm { rows: usize, cols: usize },
    Attention { b: usize, h: usize, lq: usize, lk: usize, d: usize },
    /// Extended attention: lq queries over [lk own ; lr reference] keys (flash_attention); the
    /// baseline runs SDPA on the concatenated keys, its best backend.
    FlashAttention { b: usize, h: usize, lq: usize, lk: usize, lr: usize, d: usize },
    /// dq, dk, dv, dk_ref, dv_ref of the above.
    FlashAttentionBackward { b: usize, h: usize, lq: usize, lk: usize, lr: usize, d: usize },
    /// IP-Adapter's decoupled cross-attention: lq queries over l1 text keys and, with their own
    /// softmax, l2 IP keys, out = attn(text) + 0.5 attn(IP) (flash_attention_decoupled); the
    /// baseline runs SDPA twice and the weighted sum, its best backend.
    DecoupledAttention { b: usize, h: usize, lq: usize, l1: usize, l2: usize, d: usize },
    /// y = x W^T + s (x A^T) B^T, x [m, k], W [n, k], rank r.
    LoraLinear { m: usize, n: usize, k: usize, r: usize },
    /// dx, dA, dB of the above (W frozen).
    LoraLinearBackward { m: usize, n: usize, k: usize, r: usize },
    Add { len: usize },
    Copy { len: usize },
}

#[derive(Serialize, Clone, Debug)]
struct Case {
    name: String,
    #[serde(flatten)]
    op: Op,
}

impl Op {
    /// (amount of work, unit): FLOPs for compute-bound ops, bytes moved for memory-bound ones.
    fn work(&self, elem: usize) -> (f64, &'static str) {
        let f = |v: usize| v as f64;
        match *self {
            Op::Matmul { b, m, n, k } => (2.0 * f(b * m * n * k), "FLOP/s"),
            Op::Conv2d { n, c, h, w, k, r, stride, pad } => {
                let (oh, ow) = ((h + 2 * pad - r) / stride + 1, (w + 2 * pad - r) / stride + 1);
                (2.0 * f(n * k * oh * ow * c * r * r), "FLOP/s")
            }
            Op::Attention { b, h, lq, lk, d } => (4.0 * f(b * h * lq * lk * d), "FLOP/s"),
            Op::FlashAttention { b, h, lq, lk, lr, d } => (4.0 * f(b * h * lq * (lk + lr) * d), "FLOP/s"),
            // The usual count: the backward's five products are 2.5 times the forward's two.
            Op::FlashAttentionBackward { b, h, lq, lk, lr, d } => (10.0 * f(b * h * lq * (lk + lr) * d), "FLOP/s"),
            // Memory-bound (4 FLOP per byte of q and out for each key: 93 keys give ~93 FLOP/B,
            // below an H100's ~300 at the tensor-core peak): the bytes any implementation must
            // move, q read and out written once, K/V of both sources read once (lse left out).
            Op::DecoupledAttention { b, h, lq, l1, l2, d } => (f(2 * b * h * (lq + l1 + l2) * d * elem), "B/s"),
            Op::LoraLinear { m, n, k, r } => (2.0 * f(m * n * k + m * r * (n + k)), "FLOP/s"),
            // dx = dy W + s (dy B) A, dA = s u^T x, dB = s dy^T t.
            Op::LoraLinearBackward { m, n, k, r } => (2.0 * f(m * n * k + 2 * m * r * (n + k)), "FLOP/s"),
            Op::GroupNorm { n, c, h, w, .. } => (2.0 * f(n * c * h * w * elem), "B/s"),
            // Reads x and dy, writes dx.
            Op::GroupNormBackward { n, c, h, w, .. } => (3.0 * f(n * c * h * w * elem), "B/s"),
            Op::Linear { m, n, k } => (2.0 * f(m * n * k), "FLOP/s"),
            Op::Softmax { rows, cols } | Op::LayerNorm { rows, cols } => (2.0 * f(rows * cols * elem), "B/s"),
            Op::Add { len } => (3.0 * f(len * elem), "B/s"),
            Op::Copy { len } => (2.0 * f(len * elem), "B/s"),
        }
    }
}

fn cases(device: Device) -> Vec<Case> {
    let case = |name: &str, op| Case { name: name.to_string(), op };
    if device == Device::Cpu {
        // SDXL-like shapes scaled so the CPU table runs in seconds.
        vec![
            case("matmul 1024x1280x1280", Op::Matmul { b: 1, m: 1024, n: 1280, k: 1280 }),
            case("matmul attn-proj 4096x640x640", Op::Matmul { b: 1, m: 4096, n: 640, k: 640 }),
            case("conv2d 320ch 64x64 3x3", Op::Conv2d { n: 1, c: 320, h: 64, w: 64, k: 320, r: 3, stride: 1, pad: 1 }),
            case("conv2d 640ch 32x32 3x3", Op::Conv2d { n: 1, c: 640, h: 32, w: 32, k: 640, r: 3, stride: 1, pad: 1 }),
            case("group_norm+silu (1,320,64,64) g32", Op::GroupNorm { n: 1, c: 320, h: 64, w: 64, groups: 32, silu: true, channels_last: false }),
            case("softmax 10240x1024", Op::Softmax { rows: 10240, cols: 1024 }),
            case("layer_norm 4096x640", Op::LayerNorm { rows: 4096, cols: 640 }),
            case("attention b1 h10 1024x1024 d64", Op::Attention { b: 1, h: 10, lq: 1024, lk: 1024, d: 64 }),
            case("ext attention b1 h10 1024x(1024+1024)", Op::FlashAttention { b: 1, h: 10, lq: 1024, lk: 1024, lr: 1024, d: 64 }),
            case("ip attention b1 h10 1024x(77|16)", Op::DecoupledAttention { b: 1, h: 10, lq: 1024, l1: 77, l2: 16, d: 64 }),
            case("lora_linear 4096x640x640 r4", Op::LoraLinear { m: 4096, n: 640, k: 640, r: 4 }),
            case("add 4M", Op::Add { len: 1 << 22 }),
        ]
    } else {
        // SDXL at 1024x1024, batch 2 (the shapes of the performance-kernels issue).
        vec![
            case("copy 64M", Op::Copy { len: 1 << 26 }),
            case("add 64M", Op::Add { len: 1 << 26 }),
            case("matmul 8192x640x640", Op::Matmul { b: 1, m: 8192, n: 640, k: 640 }),
            case("matmul 2048x1280x1280", Op::Matmul { b: 1, m: 2048, n: 1280, k: 1280 }),
            case("matmul 8192x5120x1280", Op::Matmul { b: 1, m: 8192, n: 5120, k: 1280 }),
            case("matmul 4096x4096x4096", Op::Matmul { b: 1, m: 4096, n: 4096, k: 4096 }),
            case("conv2d 320ch 128x128 3x3 b2", Op::Conv2d { n: 2, c: 320, h: 128, w: 128, k: 320, r: 3, stride: 1, pad: 1 }),
            case("conv2d 640ch 64x64 3x3 b2", Op::Conv2d { n: 2, c: 640, h: 64, w: 64, k: 640, r: 3, stride: 1, pad: 1 }),
            case("group_norm+silu (2,320,128,128)", Op::GroupNorm { n: 2, c: 320, h: 128, w: 128, groups: 32, silu: true, channels_last: false }),
            case("group_norm+silu (2,640,64,64)", Op::GroupNorm { n: 2, c: 640, h: 64, w: 64, groups: 32, silu: true, channels_last: false }),
            case("group_norm+silu (2,1280,32,32)", Op::GroupNorm { n: 2, c: 1280, h: 32, w: 32, groups: 32, silu: true, channels_last: false }),
            case("group_norm+silu bwd (2,320,128,128)", Op::GroupNormBackward { n: 2, c: 320, h: 128, w: 128, groups: 32, silu: true, channels_last: false }),
            case("group_norm+silu bwd (2,640,64,64)", Op::GroupNormBackward { n: 2, c: 640, h: 64, w: 64, groups: 32, silu: true, channels_last: false }),
            case("group_norm+silu bwd (2,1280,32,32)", Op::GroupNormBackward { n: 2, c: 1280, h: 32, w: 32, groups: 32, silu: true, channels_last: false }),
            // Channels-last: the layout the UNet runs group norm in on CUDA.
            case("group_norm+silu cl (2,320,128,128)", Op::GroupNorm { n: 2, c: 320, h: 128, w: 128, groups: 32, silu: true, channels_last: true }),
            case("group_norm+silu cl (2,640,64,64)", Op::GroupNorm { n: 2, c: 640, h: 64, w: 64, groups: 32, silu: true, channels_last: true }),
            case("group_norm+silu cl (2,1280,32,32)", Op::GroupNorm { n: 2, c: 1280, h: 32, w: 32, groups: 32, silu: true, channels_last: true }),
            case("group_norm+silu bwd cl (2,320,128,128)", Op::GroupNormBackward { n: 2, c: 320, h: 128, w: 128, groups: 32, silu: true, channels_last: true }),
            case("group_norm+silu bwd cl (2,640,64,64)", Op::GroupNormBackward { n: 2, c: 640, h: 64, w: 64, groups: 32, silu: true, channels_last: true }),
            case("group_norm+silu bwd cl (2,1280,32,32)", Op::GroupNormBackward { n: 2, c: 1280, h: 32, w: 32, groups: 32, silu: true, channels_last: true }),
            case("linear 8192x640x640", Op::Linear { m: 8192, n: 640, k: 640 }),
            case("linear 2048x1280x1280", Op::Linear { m: 2048, n: 1280, k: 1280 }),
            case("softmax 81920x4096", Op::Softmax { rows: 81920, cols: 4096 }),
            case("layer_norm 8192x640", Op::LayerNorm { rows: 8192, cols: 640 }),
            case("layer_norm 2048x1280", Op::LayerNorm { rows: 2048, cols: 1280 }),
            case("attention b2 h10 4096x4096 d64", Op::Attention { b: 2, h: 10, lq: 4096, lk: 4096, d: 64 }),
            case("attention b2 h20 1024x1024 d64", Op::Attention { b: 2, h: 20, lq: 1024, lk: 1024, d: 64 }),
            case("ext attention b2 h10 4096x(4096+4096)", Op::FlashAttention { b: 2, h: 10, lq: 4096, lk: 4096, lr: 4096, d: 64 }),
            case("ext attention b2 h20 1024x(1024+1024)", Op::FlashAttention { b: 2, h: 20, lq: 1024, lk: 1024, lr: 1024, d: 64 }),
            case("ext attention bwd b2 h10 4096x(4096+4096)", Op::FlashAttentionBackward { b: 2, h: 10, lq: 4096, lk: 4096, lr: 4096, d: 64 }),
            case("ext attention bwd b2 h20 1024x(1024+1024)", Op::FlashAttentionBackward { b: 2, h: 20, lq: 1024, lk: 1024, lr: 1024, d: 64 }),
            // SDXL's IP cross-attention: 77 text tokens, 16 IP tokens (IP-Adapter Plus).
            case("ip attention b2 h10 4096x(77|16)", Op::DecoupledAttention { b: 2, h: 10, lq: 4096, l1: 77, l2: 16, d: 64 }),
            case("ip attention b2 h20 1024x(77|16)", Op::DecoupledAttention { b: 2, h: 20, lq: 1024, l1: 77, l2: 16, d: 64 }),
            // Rank 0: our fused GEMM with no LoRA term, against the cuBLASLt "linear" rows above.
            case("lora_linear 8192x640x640 r0", Op::LoraLinear { m: 8192, n: 640, k: 640, r: 0 }),
            case("lora_linear 8192x640x640 r4", Op::LoraLinear { m: 8192, n: 640, k: 640, r: 4 }),
            case("lora_linear 8192x640x640 r16", Op::LoraLinear { m: 8192, n: 640, k: 640, r: 16 }),
            case("lora_linear 8192x640x640 r64", Op::LoraLinear { m: 8192, n: 640, k: 640, r: 64 }),
            case("lora_linear 2048x1280x1280 r0", Op::LoraLinear { m: 2048, n: 1280, k: 1280, r: 0 }),
            case("lora_linear 2048x1280x1280 r4", Op::LoraLinear { m: 2048, n: 1280, k: 1280, r: 4 }),
            case("lora_linear 2048x1280x1280 r16", Op::LoraLinear { m: 2048, n: 1280, k: 1280, r: 16 }),
            case("lora_linear 2048x1280x1280 r64", Op::LoraLinear { m: 2048, n: 1280, k: 1280, r: 64 }),
            case("lora_linear bwd 8192x640x640 r16", Op::LoraLinearBackward { m: 8192, n: 640, k: 640, r: 16 }),
            case("lora_linear bwd 2048x1280x1280 r16", Op::LoraLinearBackward { m: 2048, n: 1280, k: 1280, r: 16 }),
        ]
    }
}

fn randn(shape: &[usize], dtype: DType, device: Device, seed: u64) -> engine::Result<Tensor> {
    Tensor::randn(shape, DType::F32, Device::Cpu, seed)?.to_dtype(dtype)?.to_device(device)
}

/// A random [N, C, H, W] tensor, NCHW-contiguous or (channels_last) an NHWC buffer viewed as NCHW.
fn nchw_view(shape: &[usize; 4], channels_last: bool, dtype: DType, device: Device, seed: u64) -> engine::Result<Tensor> {
    let [n, c, h, w] = *shape;
    if channels_last {
        randn(&[n, h, w, c], dtype, device, seed)?.permute(&[0, 3, 1, 2])
    } else {
        randn(&[n, c, h, w], dtype, device, seed)
    }
}

/// Builds the inputs of a case and returns a closure running it once.
fn prepare(op: &Op, dtype: DType, device: Device) -> engine::Result<Box<dyn Fn() -> engine::Result<Tensor>>> {
    Ok(match *op {
        Op::Matmul { b, m, n, k } => {
            let (x, y) = (randn(&[b, m, k], dtype, device, 1)?, randn(&[b, k, n], dtype, device, 2)?);
            Box::new(move || x.matmul(&y))
        }
        Op::Conv2d { n, c, h, w, k, r, stride, pad } => {
            // On CUDA activations and weights are channels-last (NHWC strides), as the UNet keeps
            // them there and as the PyTorch baseline runs them (tensor-core convolutions).
            let (x, wt) = if device.is_cuda() {
                (randn(&[n, h, w, c], dtype, device, 1)?.permute(&[0, 3, 1, 2])?, randn(&[k, r, r, c], dtype, device, 2)?.permute(&[0, 3, 1, 2])?)
            } else {
                (randn(&[n, c, h, w], dtype, device, 1)?, randn(&[k, c, r, r], dtype, device, 2)?)
            };
            let p = Conv2dParams { stride: [stride; 2], padding: [pad; 2], ..Default::default() };
            Box::new(move || x.conv2d(&wt, None, p))
        }
        Op::GroupNorm { n, c, h, w, groups, silu, channels_last } => {
            let x = nchw_view(&[n, c, h, w], channels_last, dtype, device, 1)?;
            let (wt, bs) = (randn(&[c], dtype, device, 2)?, randn(&[c], dtype, device, 3)?);
            Box::new(move || x.group_norm(groups, Some(&wt), Some(&bs), 1e-5, silu))
        }
        Op::GroupNormBackward { n, c, h, w, groups, silu, channels_last } => {
            let (x, dy) = (nchw_view(&[n, c, h, w], channels_last, dtype, device, 1)?, nchw_view(&[n, c, h, w], channels_last, dtype, device, 4)?);
            let (wt, bs) = (randn(&[c], dtype, device, 2)?, randn(&[c], dtype, device, 3)?);
            // The forward's saved statistics, as training passes them (and as PyTorch's
            // native_group_norm_backward takes mean / rstd): the backward reads no statistics pass.
            let (_, stats) = x.group_norm_stats(groups, Some(&wt), Some(&bs), 1e-5, silu)?;
            Box::new(move || x.group_norm_backward(&dy, groups, Some(&wt), Some(&bs), 1e-5, silu, Some(&stats), true).map(|g| g.0))
        }
        Op::Linear { m, n, k } => {
            let (x, wt) = (randn(&[m, k], dtype, device, 1)?, randn(&[n, k], dtype, device, 2)?);
            Box::new(move || x.linear(&wt, None))
        }
        Op::Softmax { rows, cols } => {
            let x = randn(&[rows, cols], dtype, device, 1)?;
            Box::new(move || x.softmax(-1))
        }
        Op::LayerNorm { rows, cols } => {
            let x = randn(&[rows, cols], dtype, device, 1)?;
            let (wt, bs) = (randn(&[cols], dtype, device, 2)?, randn(&[cols], dtype, device, 3)?);
            Box::new(move || x.layer_norm(Some(&wt), Some(&bs), 1e-5))
        }
        Op::Attention { b, h, lq, lk, d } => {
            let q = randn(&[b, h, lq, d], dtype, device, 1)?;
            let (k, v) = (randn(&[b, h, lk, d], dtype, device, 2)?, randn(&[b, h, lk, d], dtype, device, 3)?);
            Box::new(move || Tensor::scaled_dot_product_attention(&q, &k, &v, None, None))
        }
        Op::FlashAttention { b, h, lq, lk, lr, d } | Op::FlashAttentionBackward { b, h, lq, lk, lr, d } => {
            // [B, H, L, D] views of [B, L, H, D] memory: the layout the UNet passes (split_heads in
            // models/src/attention.rs: a projection's [B, L, H D] output, heads interleaved).
            let heads = |l: usize, seed: u64| randn(&[b, l, h, d], dtype, device, seed)?.permute(&[0, 2, 1, 3]);
            let q = heads(lq, 1)?;
            let (k, v) = (heads(lk, 2)?, heads(lk, 3)?);
            let (kr, vr) = (heads(lr, 4)?, heads(lr, 5)?);
            let scale = 1.0 / (d as f32).sqrt();
            if matches!(op, Op::FlashAttention { .. }) {
                Box::new(move || Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: None }), scale).map(|(o, _)| o))
            } else {
                let (o, lse) = Tensor::flash_attention(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: None }), scale)?;
                let dout = heads(lq, 6)?;
                Box::new(move || Tensor::flash_attention_backward(&q, &k, &v, Some(AttentionReference { k: &kr, v: &vr, keep: None }), scale, &o, &lse, &dout).map(|g| g.dq))
            }
        }
        Op::DecoupledAttention { b, h, lq, l1, l2, d } => {
            let q = randn(&[b, h, lq, d], dtype, device, 1)?;
            let (k1, v1) = (randn(&[b, h, l1, d], dtype, device, 2)?, randn(&[b, h, l1, d], dtype, device, 3)?);
            let (k2, v2) = (randn(&[b, h, l2, d], dtype, device, 4)?, randn(&[b, h, l2, d], dtype, device, 5)?);
            let scale = 1.0 / (d as f32).sqrt();
            Box::new(move || Tensor::flash_attention_decoupled(&q, &k1, &v1, &k2, &v2, 0.5, scale).map(|(o, ..)| o))
        }
        Op::LoraLinear { m, n, k, r } | Op::LoraLinearBackward { m, n, k, r } => {
            let (x, wt) = (randn(&[m, k], dtype, device, 1)?, randn(&[n, k], dtype, device, 2)?);
            let (a, b) = (randn(&[r, k], dtype, device, 3)?, randn(&[n, r], dtype, device, 4)?);
            if matches!(op, Op::LoraLinear { .. }) {
                Box::new(move || x.lora_linear(&wt, None, &a, &b, 0.5))
            } else {
                let dy = randn(&[m, n], dtype, device, 5)?;
                let need = LoraGradsWanted { dx: true, da: true, db: true, ..Default::default() };
                Box::new(move || x.lora_linear_backward(&wt, &a, &b, 0.5, &dy, need).map(|g| g.dx.expect("dx was asked for")))
            }
        }
        Op::Add { len } => {
            let (x, y) = (randn(&[len], dtype, device, 1)?, randn(&[len], dtype, device, 2)?);
            Box::new(move || x.add(&y))
        }
        Op::Copy { len } => {
            let x = randn(&[len], dtype, device, 1)?;
            Box::new(move || x.copy())
        }
    })
}

/// Median seconds per run of a case, three ways.
struct Timing {
    /// Host clock around a batch of runs and a synchronisation: what a caller sees.
    wall: f64,
    /// The host's time to queue one run (its launch overhead), CUDA only (on the CPU the run is
    /// the host's work); when it is close to `wall` the case is host-bound and `wall` says little
    /// about the kernels.
    host: Option<f64>,
    /// Stream time of the batch queued behind `hold_stream` (CUDA only): the kernels alone. None
    /// when the host could not queue the batch within the hold (an op that synchronises).
    gpu: Option<f64>,
}

/// Runs `f` once to warm up (compiles, pools) and once timed: (runs that fill about a
/// millisecond, at most `max`; seconds of one run with its synchronisation).
fn warm_batch(f: &dyn Fn() -> engine::Result<Tensor>, device: Device, max: usize) -> engine::Result<(usize, f64)> {
    f()?;
    device.synchronize()?;
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    let run = t.elapsed().as_secs_f64();
    Ok(((1e-3 / run.max(1e-9)).ceil().clamp(1.0, max as f64) as usize, run))
}

/// Times `f`. Runs are timed in batches (as many runs as fill about a millisecond) between two
/// device synchronisations, so that the host's synchronisation latency is not counted against
/// microsecond kernels; on CUDA each batch is run a second time queued behind a kernel that holds
/// the stream for twice the host's queueing time, with events around it, for the GPU time. The
/// baseline script times the same ways. Each run's output is dropped before the next (its memory
/// returns to the pool).
fn median_time(f: &dyn Fn() -> engine::Result<Tensor>, device: Device, min_time: f64) -> engine::Result<Timing> {
    let cuda = match device {
        Device::Cuda(n) => Some(engine::cuda::device(n)?),
        Device::Cpu => None,
    };
    let (batch, _) = warm_batch(f, device, 1000)?;
    let (mut wall, mut host, mut gpu) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while wall.len() < 3 || (start.elapsed().as_secs_f64() < min_time && wall.len() < 200) {
        let t = Instant::now();
        for _ in 0..batch {
            f()?;
        }
        let queued = t.elapsed().as_secs_f64();
        device.synchronize()?;
        wall.push(t.elapsed().as_secs_f64() / batch as f64);
        host.push(queued / batch as f64);
        if let Some(dev) = &cuda {
            let hold = (2.0 * queued).clamp(2e-4, 0.2);
            let t = Instant::now();
            dev.hold_stream((hold * 1e9) as u64)?;
            let timer = dev.start_timer()?;
            for _ in 0..batch {
                f()?;
            }
            let queued = t.elapsed().as_secs_f64();
            let ms = timer.stop()?;
            if queued < hold {
                gpu.push(ms as f64 * 1e-3 / batch as f64);
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    };
    let host = if cuda.is_some() { median(host) } else { None };
    Ok(Timing { wall: median(wall).expect("at least three batches"), host, gpu: median(gpu) })
}

#[derive(Serialize)]
struct Row {
    name: String,
    /// Wall time per run (Timing::wall).
    seconds: Option<f64>,
    /// GPU time per run (Timing::gpu), CUDA only.
    gpu_seconds: Option<f64>,
    /// Host queueing time per run (Timing::host).
    host_seconds: Option<f64>,
    /// Work per second of GPU time where measured, else of wall time.
    throughput: Option<f64>,
    unit: &'static str,
    baseline_seconds: Option<f64>,
    baseline_gpu_seconds: Option<f64>,
    /// Baseline time / our time, on GPU time where both sides have it, else wall: above 1 means we
    /// are faster.
    speedup: Option<f64>,
    /// Throughput / the copy row's throughput, for memory-bound rows when a copy row ran.
    of_copy: Option<f64>,
    /// For memory-bound rows: the time of a device copy moving the same bytes (read + write),
    /// measured in this run, / our time. A 5-20 MB tensor cannot reach the bandwidth of a 256 MB
    /// copy (launch and ramp-up are a larger share), so this is the like-for-like ratio.
    of_same_size_copy: Option<f64>,
    /// With --profile: GPU milliseconds and launches of each kernel per run.
    kernels: Option<Vec<engine::cuda::KernelTime>>,
    /// With --profile: why this case has no per-kernel times (its timing still stands).
    profile_error: Option<String>,
    error: Option<String>,
}

/// GPU time per run of each kernel a case launches: one batch of runs queued behind
/// `hold_stream` (so that the host's queueing leaves no idle time between the marks), profiled
/// by the device (engine::cuda::profile), divided by the batch size. An error if the host could
/// not queue the batch within the hold (then the spans would include idle time).
fn profile_kernels(f: &dyn Fn() -> engine::Result<Tensor>, device: Device) -> anyhow::Result<Vec<engine::cuda::KernelTime>> {
    let Device::Cuda(n) = device else { bail!("--profile needs a CUDA device") };
    let dev = engine::cuda::device(n)?;
    let (batch, run) = warm_batch(f, device, 100)?;
    // The marks add host work to each launch: hold for several times the unprofiled run.
    let hold = (8.0 * batch as f64 * run).clamp(1e-3, 0.5);
    let t = Instant::now();
    dev.hold_stream((hold * 1e9) as u64)?;
    dev.profile_begin();
    let queued = (0..batch).try_for_each(|_| f().map(drop)).map(|_| t.elapsed().as_secs_f64());
    let kernels = dev.profile_end();
    let (queued, mut kernels) = (queued?, kernels?);
    if queued >= hold {
        bail!("the host took {:.1} ms to queue the profiled batch, longer than the {:.1} ms hold: the spans would include idle time", queued * 1e3, hold * 1e3);
    }
    for k in &mut kernels {
        k.ms /= batch as f64;
        k.launches = k.launches.div_ceil(batch);
    }
    Ok(kernels)
}

fn run_baseline(python: &str, cases: &[Case], device: Device, dtype: DType, min_time: f64) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("lookahead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("baseline_torch.py");
    std::fs::write(&script, BASELINE_SCRIPT)?;
    let torch_device = match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(n) => format!("cuda:{n}"),
    };
    let req = serde_json::json!({ "device": torch_device, "dtype": dtype.to_string(), "min_time": min_time, "cases": cases });
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("--baseline: cannot run `{python}`"))?;
    child.stdin.take().expect("piped").write_all(req.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!("--baseline: `{python} baseline_torch.py` failed ({}); is torch installed for it?", out.status);
    }
    serde_json::from_slice(&out.stdout).context("--baseline: the baseline script did not print JSON")
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    device.open().with_context(|| format!("--device {}", args.device))?;
    if args.profile && !device.is_cuda() {
        bail!("--profile times the kernels of each case on a GPU; it needs --device cuda (this run is on {device})");
    }
    let dtype = match args.dtype.as_deref() {
        None if device == Device::Cpu => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let cases: Vec<Case> = cases(device).into_iter().filter(|c| args.filter.as_deref().is_none_or(|f| f.split(',').any(|part| c.name.contains(part)))).collect();
    if cases.is_empty() {
        bail!("--filter {:?} matches no case", args.filter.unwrap_or_default());
    }
    let baseline = match &args.baseline {
        Some(py) => Some(run_baseline(py, &cases, device, dtype, args.min_time)?),
        None => None,
    };
    let mut rows = Vec::new();
    // Same-size copies already timed (elements -> seconds), shared by the rows that move as many bytes.
    let mut copies: std::collections::HashMap<usize, f64> = std::collections::HashMap::new();
    for c in &cases {
        if !args.json {
            eprint!("\r{}/{} {:<50}", rows.len() + 1, cases.len(), c.name);
        }
        let (work, unit) = c.op.work(dtype.size_in_bytes());
        let base = baseline.as_ref().and_then(|b| b["results"][&c.name].as_f64());
        let base_gpu = baseline.as_ref().and_then(|b| b["gpu_results"][&c.name].as_f64());
        // One failing case (a missing library, an unsupported shape) must not hide the others.
        let prepared = prepare(&c.op, dtype, device);
        let timed = prepared.as_ref().map_err(|e| e.to_string()).and_then(|f| median_time(&**f, device, args.min_time).map_err(|e| format!("{e:#}")));
        let (timing, error) = match timed {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        };
        let (mut kernels, mut profile_error) = (None, None);
        if let (Ok(f), true) = (&prepared, args.profile && timing.is_some()) {
            match profile_kernels(&**f, device) {
                Ok(k) => kernels = Some(k),
                Err(e) => profile_error = Some(format!("{e:#}")),
            }
        }
        drop(prepared);
        let ours = timing.as_ref().map(|t| t.gpu.unwrap_or(t.wall));
        let speedup = match (&timing, base_gpu, base) {
            (Some(Timing { gpu: Some(g), .. }), Some(bg), _) => Some(bg / g),
            (Some(t), _, Some(b)) => Some(b / t.wall),
            _ => None,
        };
        let mut of_same_size_copy = None;
        if let (Some(ours), "B/s", false) = (ours, unit, matches!(c.op, Op::Copy { .. })) {
            let len = (work / 2.0 / dtype.size_in_bytes() as f64).round() as usize;
            let copy = match copies.get(&len) {
                Some(&t) => Some(t),
                None => prepare(&Op::Copy { len }, dtype, device).and_then(|f| median_time(&*f, device, args.min_time)).ok().map(|t| t.gpu.unwrap_or(t.wall)),
            };
            if let Some(t) = copy {
                copies.insert(len, t);
                of_same_size_copy = Some(t / ours);
            }
        }
        rows.push(Row {
            name: c.name.clone(),
            seconds: timing.as_ref().map(|t| t.wall),
            gpu_seconds: timing.as_ref().and_then(|t| t.gpu),
            host_seconds: timing.as_ref().and_then(|t| t.host),
            throughput: ours.map(|s| work / s),
            unit,
            baseline_seconds: base,
            baseline_gpu_seconds: base_gpu,
            speedup,
            of_copy: None,
            of_same_size_copy,
            kernels,
            profile_error,
            error,
        });
    }
    // Memory-bound rows are also given as a fraction of the copy bandwidth measured in this run.
    let copy = rows.iter().find(|r| r.name.starts_with("copy")).and_then(|r| r.throughput);
    for r in rows.iter_mut().filter(|r| r.unit == "B/s") {
        r.of_copy = copy.zip(r.throughput).map(|(c, t)| t / c);
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if args.json {
        let report = serde_json::json!({
            "device": device.to_string(),
            "device_name": device.name(),
            "dtype": dtype.to_string(),
            // Which kernel switches this run had on (engine::cuda; see README "Kernels not yet run on a GPU").
            "experimental_kernels": engine::cuda::experimental_kernels(),
            "hopper_kernels": engine::cuda::hopper_kernels(),
            "baseline": baseline,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        if failed > 0 {
            bail!("{failed} of {} cases failed (see \"error\" in the JSON)", rows.len());
        }
        return Ok(());
    }
    eprintln!("\r{:60}", "");
    println!("lookahead bench — {}, {dtype}", if device.is_cuda() { format!("{device} ({})", device.name()) } else { device.name() });
    if let Some(b) = &baseline {
        println!("baseline: torch {} on {} ({} threads), same run", b["torch"].as_str().unwrap_or("?"), b["device"].as_str().unwrap_or("?"), b["threads"]);
    }
    println!("ms: GPU time where measured (CUDA), else wall; wall and host (queueing) ms per run; speedup on the same clock as torch");
    println!("{:<38} {:>9} {:>9} {:>9} {:>15} {:>7} {:>9} {:>9} {:>8}", "case", "ms", "wall ms", "host ms", "throughput", "of copy", "same-size", "torch ms", "speedup");
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
    for r in &rows {
        if let Some(e) = &r.error {
            println!("{:<38} error: {e}", r.name);
            continue;
        }
        let ms = |s: f64| format!("{:.3}", s * 1e3);
        println!(
            "{:<38} {:>9} {:>9} {:>9} {:>15} {:>7} {:>9} {:>9} {:>8}",
            r.name,
            opt(r.gpu_seconds.or(r.seconds), &ms),
            opt(r.seconds, &ms),
            opt(r.host_seconds, &ms),
            opt(r.throughput, &|t| format!("{:.1} G{}", t / 1e9, r.unit)),
            opt(r.of_copy, &|c| format!("{:.0}%", c * 100.0)),
            opt(r.of_same_size_copy, &|c| format!("{:.0}%", c * 100.0)),
            opt(r.baseline_gpu_seconds.or(r.baseline_seconds), &ms),
            opt(r.speedup, &|s| format!("{s:.2}x")),
        );
        // --profile: each kernel's share of the run's GPU time.
        let total: f64 = r.kernels.iter().flatten().map(|k| k.ms).sum();
        for k in r.kernels.iter().flatten() {
            println!("    {:<58} {:>9.4} ms {:>4.0}%  x{}", k.name, k.ms, 100.0 * k.ms / total.max(1e-12), k.launches);
        }
        if let Some(e) = &r.profile_error {
            println!("    --profile: {e}");
        }
    }
    if failed > 0 {
        bail!("{failed} of {} cases failed (see the table)", rows.len());
    }
    Ok(())
}
