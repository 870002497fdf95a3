//! The flash-attention parity cases shared by the forward and backward GPU parity suites
//! (tests/cuda_parity_attention.rs, tests/cuda_parity_attention_backward.rs): sizes, how the
//! operands are viewed, keep masks, and the operands themselves. Included with
//! `#[path = "common/attention_cases.rs"] mod attention_cases;` next to `mod cuda_harness;`.
#![allow(dead_code)]

use crate::cuda_harness::input;
use engine::ops::flash_attention::AttentionReference;
use engine::{DType, Device, Result, Tensor};

/// One parity case: sizes, how the operands are viewed, the keep mask.
#[derive(Clone, Copy)]
pub struct Case {
    pub label: &'static str,
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub lr: usize,
    /// Reference tokens: None (no reference source), Some(false) every token kept, Some(true)
    /// with a keep mask of shape [B, Lr] (or [Lr] when `shared_keep`).
    pub keep: Option<bool>,
    pub shared_keep: bool,
    /// q, the reference k/v (and the backward's dout) stored [B, L, H, D] (heads interleaved, the
    /// models' layout) instead of [B, H, L, D].
    pub interleaved: bool,
    /// k and v narrowed one element into wider rows: unaligned starts the kernels cannot read in
    /// place (copied first).
    pub misaligned: bool,
}

pub const CASES: &[Case] = &[
    Case { label: "odd sizes, keep [B, Lr]", b: 2, h: 2, lq: 77, lk: 45, lr: 70, keep: Some(true), shared_keep: false, interleaved: true, misaligned: false },
    Case { label: "odd sizes, keep [Lr]", b: 2, h: 3, lq: 65, lk: 64, lr: 129, keep: Some(true), shared_keep: true, interleaved: false, misaligned: false },
    Case { label: "reference, no mask, misaligned k/v", b: 1, h: 2, lq: 33, lk: 100, lr: 31, keep: Some(false), shared_keep: false, interleaved: true, misaligned: true },
    Case { label: "no reference", b: 2, h: 1, lq: 130, lk: 77, lr: 0, keep: None, shared_keep: false, interleaved: false, misaligned: false },
    Case { label: "long rows", b: 1, h: 2, lq: 1000, lk: 1000, lr: 1000, keep: Some(true), shared_keep: false, interleaved: true, misaligned: false },
];

/// How an operand is stored and viewed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// [B, H, L, D] contiguous.
    Plain,
    /// [B, L, H, D] memory viewed as [B, H, L, D] (heads interleaved, the models' layout).
    Interleaved,
    /// Narrowed one element into rows of D + 1: unaligned rows the kernels cannot read in place.
    Misaligned,
}

impl Case {
    /// How q, the reference k/v and dout are stored.
    pub fn rows_storage(&self) -> Storage {
        if self.interleaved {
            Storage::Interleaved
        } else {
            Storage::Plain
        }
    }

    /// How the own k and v are stored.
    pub fn keys_storage(&self) -> Storage {
        if self.misaligned {
            Storage::Misaligned
        } else {
            Storage::Plain
        }
    }
}

/// A [B, H, L, D] operand of `dt` on `dev`.
pub fn operand(c: &Case, l: usize, d: usize, dt: DType, seed: u64, dev: Device, storage: Storage) -> Result<Tensor> {
    let (b, h) = (c.b, c.h);
    match storage {
        Storage::Plain => input(&[b, h, l, d], dt, -1.0, 1.0, seed, dev),
        Storage::Interleaved => input(&[b, l, h, d], dt, -1.0, 1.0, seed, dev)?.transpose(1, 2),
        Storage::Misaligned => input(&[b, h, l, d + 1], dt, -1.0, 1.0, seed, dev)?.narrow(3, 1, d),
    }
}

/// Some reference tokens dropped, a different set per batch entry.
pub fn keep_mask(c: &Case, dev: Device) -> Result<Tensor> {
    let lr = c.lr;
    if c.shared_keep {
        return Tensor::from_vec((0..lr).map(|j| (j % 5 != 2) as u8).collect::<Vec<_>>(), &[lr], dev);
    }
    Tensor::from_vec((0..c.b * lr).map(|i| !(i * 7 + i / lr).is_multiple_of(5) as u8).collect::<Vec<_>>(), &[c.b, lr], dev)
}

/// No own keys, and in batch entry 0 every reference token dropped (its rows have no key left);
/// batch entry 1 keeps two tokens. The keep mask is `no_key_left_mask`, not `keep_mask`.
pub const NO_KEY_LEFT: Case = Case { label: "no key left", b: 2, h: 2, lq: 9, lk: 0, lr: 70, keep: Some(true), shared_keep: false, interleaved: false, misaligned: false };

/// The keep mask of `NO_KEY_LEFT`: [B, Lr], all of batch entry 0 dropped, tokens 5 and 66 of
/// batch entry 1 kept.
pub fn no_key_left_mask(dev: Device) -> Result<Tensor> {
    let (b, lr) = (NO_KEY_LEFT.b, NO_KEY_LEFT.lr);
    let mut keep = vec![0u8; b * lr];
    keep[lr + 5] = 1;
    keep[lr + 66] = 1;
    Tensor::from_vec(keep, &[b, lr], dev)
}

/// The forward's inputs of a case on one device: q, k, v (seeds 1, 2, 3), the reference k, v
/// (seeds 4, 5) and the keep mask.
pub struct Operands {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    kr: Tensor,
    vr: Tensor,
    keep: Option<Tensor>,
    has_reference: bool,
}

impl Operands {
    pub fn new(c: &Case, d: usize, dt: DType, dev: Device) -> Result<Self> {
        let keep = match c.keep {
            Some(true) => Some(keep_mask(c, dev)?),
            _ => None,
        };
        Self::with_keep(c, d, dt, dev, keep)
    }

    /// The operands of `NO_KEY_LEFT` with its own keep mask.
    pub fn no_key_left(d: usize, dt: DType, dev: Device) -> Result<Self> {
        Self::with_keep(&NO_KEY_LEFT, d, dt, dev, Some(no_key_left_mask(dev)?))
    }

    fn with_keep(c: &Case, d: usize, dt: DType, dev: Device, keep: Option<Tensor>) -> Result<Self> {
        let (rows, keys) = (c.rows_storage(), c.keys_storage());
        Ok(Operands {
            q: operand(c, c.lq, d, dt, 1, dev, rows)?,
            k: operand(c, c.lk, d, dt, 2, dev, keys)?,
            v: operand(c, c.lk, d, dt, 3, dev, keys)?,
            kr: operand(c, c.lr, d, dt, 4, dev, rows)?,
            vr: operand(c, c.lr, d, dt, 5, dev, rows)?,
            keep,
            has_reference: c.keep.is_some(),
        })
    }

    /// The reference source, when the case has one.
    pub fn reference(&self) -> Option<AttentionReference<'_>> {
        self.has_reference.then_some(AttentionReference { k: &self.kr, v: &self.vr, keep: self.keep.as_ref() })
    }
}
