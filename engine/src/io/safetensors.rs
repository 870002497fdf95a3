//! safetensors: an 8-byte little-endian header length, a JSON header mapping names to
//! {dtype, shape, data_offsets}, then the raw little-endian data.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::cpu::CpuStorage;
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// Header limit: real files have headers of a few MB; anything larger is corrupt.
const MAX_HEADER: u64 = 100 << 20;

/// Reads every tensor of a safetensors file onto the CPU. Tensors whose data is aligned for their
/// dtype share the file's memory map (zero copy); the rest are copied.
pub fn load(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
    // SAFETY: the map is read-only; a file changed underneath while mapped is outside our contract,
    // as for every memory-mapped reader.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: shown.clone(), source })?);
    parse(&map, &shown, Some(&map))
}

/// Parses safetensors bytes (copying all data).
pub fn load_from_bytes(bytes: &[u8], name: &str) -> Result<BTreeMap<String, Tensor>> {
    parse(bytes, name, None)
}

fn parse(bytes: &[u8], path: &str, map: Option<&Arc<memmap2::Mmap>>) -> Result<BTreeMap<String, Tensor>> {
    let ferr = |msg: String| Error::File { path: path.to_string(), msg };
    if bytes.len() < 8 {
        return Err(ferr(format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || 8 + n > bytes.len() as u64 {
        return Err(ferr(format!("header length {n} exceeds the file size {} (truncated or not safetensors)", bytes.len())));
    }
    let data_start = 8 + n as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..data_start]).map_err(|e| ferr(format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| ferr("header is not a JSON object".into()))?;
    let data_len = bytes.len() - data_start;
    let mut out = BTreeMap::new();
    for (key, info) in obj {
        if key == "__metadata__" {
            continue;
        }
        let kerr = |msg: String| Error::FileKey { path: path.to_string(), key: key.clone(), msg };
        let dtype_name = info.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| kerr("missing `dtype`".into()))?;
        let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| kerr(format!("unsupported dtype {dtype_name}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| kerr("missing `shape`".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| kerr("`shape` must hold non-negative integers".into()))?;
        let offs = info.get("data_offsets").and_then(|v| v.as_array()).ok_or_else(|| kerr("missing `data_offsets`".into()))?;
        let (begin, end) = match offs.as_slice() {
            [a, b] => (a.as_u64().ok_or_else(|| kerr("bad data_offsets".into()))? as usize, b.as_u64().ok_or_else(|| kerr("bad data_offsets".into()))? as usize),
            _ => return Err(kerr("`data_offsets` must be [begin, end]".into())),
        };
        if begin > end || end > data_len {
            return Err(kerr(format!("data_offsets [{begin}, {end}] outside the {data_len} data bytes (truncated file?)")));
        }
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| kerr(format!("shape {shape:?} overflows")))?;
        if count.checked_mul(dtype.size_in_bytes()) != Some(end - begin) {
            return Err(kerr(format!("shape {shape:?} of {dtype} needs {} bytes, data_offsets give {}", count.saturating_mul(dtype.size_in_bytes()), end - begin)));
        }
        let (start, len) = (data_start + begin, end - begin);
        let storage = match map.and_then(|m| CpuStorage::mapped(m.clone(), start, len, dtype)) {
            Some(s) => s,
            None => CpuStorage::from_bytes(dtype, &bytes[start..start + len]).map_err(|e| kerr(e.to_string()))?,
        };
        out.insert(key.clone(), Tensor::from_storage(Storage::Cpu(storage), &shape)?);
    }
    Ok(out)
}
