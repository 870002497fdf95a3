//! Weights I/O: safetensors (memory-mapped, zero copy where the dtype and alignment allow, written
//! atomically) and PyTorch checkpoints, zip or legacy (read without Python through a small pickle
//! VM).
//! `load_any` and `list_any` pick the reader from the file's content, not its name.

pub mod pickle;
pub mod safetensors;
pub mod torch;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save`'s zip format (.bin, .pth, .pt).
    TorchZip,
    /// `torch.save`'s legacy pre-1.6 format: a stream of pickles followed by the raw storages.
    TorchLegacy,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "pytorch-zip",
            Format::TorchLegacy => "pytorch-legacy",
        })
    }
}

/// One tensor of a weights file as listed without reading its data.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// The dtype as safetensors names it ("F32", "BF16", ...; also dtypes the engine lacks).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Bytes of this tensor's elements (a view counts its own elements, not its whole storage).
    pub size_in_bytes: usize,
}

/// The format of a weights file from its first bytes, or an error naming the file.
pub fn detect(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let shown = || path.display().to_string();
    let mut head = Vec::with_capacity(32);
    std::fs::File::open(path).and_then(|f| f.take(32).read_to_end(&mut head)).map_err(|source| Error::Io { path: shown(), source })?;
    detect_bytes(&head).ok_or_else(|| Error::File { path: shown(), msg: unknown_format_message(&head) })
}

/// The format of weights from their first bytes (32 are enough): a zip signature is a torch
/// checkpoint, torch's pickled magic number a legacy one, an 8-byte length followed by `{` is
/// safetensors.
pub fn detect_bytes(head: &[u8]) -> Option<Format> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(Format::TorchZip)
    } else if torch::is_legacy(head) {
        Some(Format::TorchLegacy)
    } else if head.len() > 8 && head[8] == b'{' {
        Some(Format::Safetensors)
    } else {
        None
    }
}

fn unknown_format_message(head: &[u8]) -> String {
    if head.first() == Some(&0x80) {
        "a pickle, but not a PyTorch checkpoint (no torch magic number)".into()
    } else {
        "unknown weights format (neither safetensors nor a PyTorch checkpoint)".into()
    }
}

/// Reads every tensor of a safetensors file or torch checkpoint, whichever the content is.
pub fn load_any(path: impl AsRef<Path>) -> Result<(Format, BTreeMap<String, Tensor>)> {
    let path = path.as_ref();
    let format = detect(path)?;
    let tensors = match format {
        Format::Safetensors => safetensors::load(path)?,
        Format::TorchZip | Format::TorchLegacy => torch::load(path)?,
    };
    Ok((format, tensors))
}

/// Lists the tensors of a weights file, sorted by name, without reading their data.
pub fn list_any(path: impl AsRef<Path>) -> Result<(Format, Vec<TensorInfo>)> {
    let path = path.as_ref();
    let format = detect(path)?;
    let list = match format {
        Format::Safetensors => safetensors::SafetensorsFile::open(path)?
            .entries()
            .iter()
            .map(|e| TensorInfo { name: e.name.clone(), dtype: e.dtype_name.clone(), shape: e.shape.clone(), size_in_bytes: e.size_in_bytes() })
            .collect(),
        Format::TorchZip | Format::TorchLegacy => torch::TorchFile::open(path)?
            .tensor_refs()
            .iter()
            .map(|r| TensorInfo {
                name: r.name.clone(),
                dtype: r.dtype_name.to_string(),
                shape: r.shape.clone(),
                size_in_bytes: checked_numel(&r.shape).unwrap_or(0) * torch_elem_size(r.dtype_name),
            })
            .collect(),
    };
    Ok((format, list))
}

/// Element count of `shape`, or `None` when the dims (ignoring zeros, since layouts multiply the
/// others together for strides) multiply past what 8-byte elements could address: such a shape can
/// only come from a corrupt file and would overflow later arithmetic.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    let nonzero = shape.iter().filter(|&&d| d != 0).try_fold(1usize, |a, &d| a.checked_mul(d))?;
    if nonzero > isize::MAX as usize / 8 {
        return None;
    }
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

fn torch_elem_size(dtype_name: &str) -> usize {
    match dtype_name {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" | "I16" => 2,
        _ => 1,
    }
}
