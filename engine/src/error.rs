//! The engine's error type: every message names the shapes, dtypes, devices, files or keys involved.

use crate::{DType, Device};

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("{op}: shape mismatch: {lhs:?} vs {rhs:?}")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },

    #[error("{op}: {msg} (shape {shape:?})")]
    BadShape { op: &'static str, msg: String, shape: Vec<usize> },

    #[error("{op}: dimension {dim} out of range for a tensor of rank {rank}")]
    DimOutOfRange { op: &'static str, dim: isize, rank: usize },

    #[error("{op}: dtype mismatch: {lhs} vs {rhs}")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },

    #[error("{op}: unsupported dtype {dtype}")]
    UnsupportedDType { op: &'static str, dtype: DType },

    #[error("{op}: device mismatch: {lhs} vs {rhs}")]
    DeviceMismatch { op: &'static str, lhs: Device, rhs: Device },

    #[error("{op}: element count mismatch: shape {shape:?} needs {expected} elements, got {got}")]
    ElementCount { op: &'static str, shape: Vec<usize>, expected: usize, got: usize },

    #[error("CUDA: {0}")]
    Cuda(String),

    #[error("{path}: {msg}")]
    File { path: String, msg: String },

    #[error("{path}: tensor `{key}`: {msg}")]
    FileKey { path: String, key: String, msg: String },

    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
}
