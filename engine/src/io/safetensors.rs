//! safetensors: an 8-byte little-endian header length N, N bytes of JSON mapping names to
//! {dtype, shape, data_offsets} (plus an optional string map `__metadata__`), then the raw
//! little-endian data. Offsets are relative to the end of the header.
//!
//! Reading memory-maps the file: a tensor whose data is aligned for its dtype is a zero-copy window
//! into the map, others are copied. The header is checked as strictly as the reference reader
//! does: duplicate names, overlapping or out-of-order offsets, gaps, and data not covered by the
//! header are errors, so a corrupt file never gives silently wrong tensors.
//!
//! Writing goes to a temporary file in the target's folder which is fsynced and then renamed, so a
//! crash never leaves a half-written file under the real name. The header is padded with spaces to
//! a multiple of 8 bytes and tensors are ordered by decreasing element size, as the reference
//! writer does, so every tensor's data is aligned and loads zero-copy.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::cpu::CpuStorage;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// Header limit: real files have headers of a few MB; anything larger is corrupt.
const MAX_HEADER: u64 = 100 << 20;

/// One tensor as the header describes it (nothing is read until `SafetensorsFile::tensor`).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    /// The dtype as the file names it ("F32", "BF16", "F64", ...).
    pub dtype_name: String,
    /// The engine dtype, or `None` when the engine has no such dtype (listing still works).
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    /// [begin, end) in bytes, relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

impl Entry {
    pub fn elem_count(&self) -> usize {
        super::checked_numel(&self.shape).unwrap_or(0) // the header check rejected overflowing shapes
    }
    pub fn size_in_bytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A parsed header: entries sorted by name, the metadata map and where the data section starts.
struct Header {
    entries: Vec<Entry>,
    metadata: BTreeMap<String, String>,
    data_start: usize,
}

/// A safetensors file whose header has been read and checked; tensors are produced on request.
pub struct SafetensorsFile {
    path: String,
    map: Arc<memmap2::Mmap>,
    header: Header,
}

impl SafetensorsFile {
    /// Maps the file and checks its header; no tensor data is touched.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let map = Arc::new(map_file(path)?);
        let header = parse_header(&map, &shown)?;
        Ok(SafetensorsFile { path: shown, map, header })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Every tensor of the file, sorted by name.
    pub fn entries(&self) -> &[Entry] {
        &self.header.entries
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.header.entries.binary_search_by(|e| e.name.as_str().cmp(name)).ok().map(|i| &self.header.entries[i])
    }

    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    /// One tensor on the CPU: a zero-copy window into the map when its data is aligned for its
    /// dtype, a copy otherwise.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let entry = self.entry(name).ok_or_else(|| Error::FileKey { path: self.path.clone(), key: name.to_string(), msg: "no such tensor".into() })?;
        materialize(entry, &self.map, self.header.data_start, &self.path, Some(&self.map))
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for e in &self.header.entries {
            out.insert(e.name.clone(), materialize(e, &self.map, self.header.data_start, &self.path, Some(&self.map))?);
        }
        Ok(out)
    }
}

/// Reads every tensor of a safetensors file onto the CPU. Tensors whose data is aligned for their
/// dtype share the file's memory map (zero copy); the rest are copied.
pub fn load(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    SafetensorsFile::open(path)?.tensors()
}

/// Parses safetensors bytes (copying all data); `name` is used in error messages.
pub fn load_from_bytes(bytes: &[u8], name: &str) -> Result<BTreeMap<String, Tensor>> {
    let header = parse_header(bytes, name)?;
    let mut out = BTreeMap::new();
    for e in &header.entries {
        out.insert(e.name.clone(), materialize(e, bytes, header.data_start, name, None)?);
    }
    Ok(out)
}

/// Maps a whole file read-only (an empty file is an error here rather than an mmap failure).
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let shown = || path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: shown(), source })?;
    let len = file.metadata().map_err(|source| Error::Io { path: shown(), source })?.len();
    if len == 0 {
        return Err(Error::File { path: shown(), msg: "the file is empty".into() });
    }
    // SAFETY: the map is read-only; a file changed underneath while mapped is outside our contract,
    // as for every memory-mapped reader.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: shown(), source })
}

fn materialize(e: &Entry, bytes: &[u8], data_start: usize, path: &str, map: Option<&Arc<memmap2::Mmap>>) -> Result<Tensor> {
    let kerr = |msg: String| Error::FileKey { path: path.to_string(), key: e.name.clone(), msg };
    let dtype = e.dtype.ok_or_else(|| kerr(format!("dtype {} is not supported by the engine", e.dtype_name)))?;
    let (start, len) = (data_start + e.data_offsets.0, e.size_in_bytes());
    let storage = match map.and_then(|m| CpuStorage::mapped(m.clone(), start, len, dtype)) {
        Some(s) => s,
        None => CpuStorage::from_bytes(dtype, &bytes[start..start + len]).map_err(|err| kerr(err.to_string()))?,
    };
    Tensor::from_storage(Storage::Cpu(storage), &e.shape).map_err(|err| kerr(err.to_string()))
}

/// Engine dtype of a safetensors dtype name. BOOL is stored as one byte holding 0 or 1, so it
/// reads as U8.
fn engine_dtype(name: &str) -> Option<DType> {
    match name {
        "BOOL" => Some(DType::U8),
        n => DType::from_safetensors_name(n),
    }
}

/// Element size of every dtype the format defines (so that files with dtypes the engine lacks can
/// still be listed and checked).
fn dtype_size(name: &str) -> Option<usize> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// The header's top-level object as (key, value) pairs in file order, so that duplicate keys can be
/// detected (a JSON map type would silently keep the last one).
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<RawHeader, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(kv);
                }
                Ok(RawHeader(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_header(bytes: &[u8], path: &str) -> Result<Header> {
    let ferr = |msg: String| Error::File { path: path.to_string(), msg };
    if bytes.len() < 8 {
        return Err(ferr(format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len())));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER || 8 + n > bytes.len() as u64 {
        return Err(ferr(format!("header length {n} exceeds the file size {} (truncated or not safetensors)", bytes.len())));
    }
    let data_start = 8 + n as usize;
    let raw: RawHeader = serde_json::from_slice(&bytes[8..data_start]).map_err(|e| ferr(format!("header is not valid JSON: {e}")))?;
    let data_len = bytes.len() - data_start;

    let mut entries = Vec::with_capacity(raw.0.len());
    let mut metadata = BTreeMap::new();
    let mut seen_metadata = false;
    for (key, info) in raw.0 {
        let kerr = |msg: String| Error::FileKey { path: path.to_string(), key: key.clone(), msg };
        if key == "__metadata__" {
            if seen_metadata {
                return Err(ferr("`__metadata__` appears twice".into()));
            }
            seen_metadata = true;
            let obj = info.as_object().ok_or_else(|| ferr("`__metadata__` must be an object of strings".into()))?;
            for (k, v) in obj {
                let v = v.as_str().ok_or_else(|| ferr(format!("`__metadata__` value of `{k}` is not a string")))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let dtype_name = info.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| kerr("missing `dtype`".into()))?;
        let elem_size = dtype_size(dtype_name).ok_or_else(|| kerr(format!("unknown dtype {dtype_name}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| kerr("missing `shape`".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| kerr("`shape` must hold non-negative integers".into()))?;
        let offs = info.get("data_offsets").and_then(|v| v.as_array()).ok_or_else(|| kerr("missing `data_offsets`".into()))?;
        let off = |v: &serde_json::Value| v.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(|| kerr("`data_offsets` must hold non-negative integers".into()));
        let (begin, end) = match offs.as_slice() {
            [a, b] => (off(a)?, off(b)?),
            _ => return Err(kerr("`data_offsets` must be [begin, end]".into())),
        };
        if begin > end {
            return Err(kerr(format!("data_offsets [{begin}, {end}] are out of order")));
        }
        if end > data_len {
            return Err(kerr(format!("data_offsets [{begin}, {end}] outside the {data_len} data bytes (truncated file?)")));
        }
        let count = super::checked_numel(&shape).ok_or_else(|| kerr(format!("shape {shape:?} overflows")))?;
        if count.checked_mul(elem_size) != Some(end - begin) {
            return Err(kerr(format!("shape {shape:?} of {dtype_name} needs {} bytes, data_offsets give {}", count.saturating_mul(elem_size), end - begin)));
        }
        entries.push(Entry { name: key.clone(), dtype_name: dtype_name.to_string(), dtype: engine_dtype(dtype_name), shape, data_offsets: (begin, end) });
    }

    // The tensors must tile the data section exactly: in offset order each one starts where the
    // previous one ended, and the last one ends at the end of the file.
    let mut by_offset: Vec<&Entry> = entries.iter().collect();
    by_offset.sort_by_key(|e| e.data_offsets);
    let mut pos = 0usize;
    for e in &by_offset {
        if e.data_offsets.0 != pos {
            let what = if e.data_offsets.0 < pos { "overlaps the previous tensor" } else { "leaves a gap after the previous tensor" };
            return Err(Error::FileKey { path: path.to_string(), key: e.name.clone(), msg: format!("data_offsets [{}, {}] {what} (which ends at {pos})", e.data_offsets.0, e.data_offsets.1) });
        }
        pos = e.data_offsets.1;
    }
    if pos != data_len {
        return Err(ferr(format!("the header covers {pos} data bytes but the file holds {data_len} (corrupt or not safetensors)")));
    }

    entries.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::FileKey { path: path.to_string(), key: w[0].name.clone(), msg: "the name appears twice in the header".into() });
    }
    Ok(Header { entries, metadata, data_start })
}

/// Writes `tensors` (any device, any layout) to a safetensors file at `path`, atomically: the
/// bytes go to a temporary file in the same folder, which is fsynced and renamed over `path`.
pub fn save(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)], metadata: Option<&BTreeMap<String, String>>) -> Result<()> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let ferr = |msg: String| Error::File { path: shown.clone(), msg };

    // Largest elements first, then by name: with an 8-byte aligned data section every tensor then
    // starts at a multiple of its element size.
    let mut order: Vec<(&str, &Tensor)> = tensors.to_vec();
    order.sort_by(|a, b| b.1.dtype().size_in_bytes().cmp(&a.1.dtype().size_in_bytes()).then(a.0.cmp(b.0)));
    let mut names: Vec<&str> = order.iter().map(|t| t.0).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::FileKey { path: shown.clone(), key: w[0].to_string(), msg: "the name is given twice".into() });
    }
    if names.contains(&"__metadata__") {
        return Err(Error::FileKey { path: shown.clone(), key: "__metadata__".into(), msg: "reserved name".into() });
    }

    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        let m: serde_json::Map<String, serde_json::Value> = m.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut pos = 0usize;
    for (name, t) in &order {
        let n = t.elem_count() * t.dtype().size_in_bytes();
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": t.dtype().safetensors_name(), "shape": t.shape(), "data_offsets": [pos, pos + n] }),
        );
        pos += n;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| ferr(format!("header: {e}")))?;
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| ferr("the path has no file name".into()))?;
    let tmp = dir.join(format!(".{}.tmp-{}-{}", file_name.to_string_lossy(), std::process::id(), unique()));
    let io = |source: std::io::Error| Error::Io { path: shown.clone(), source };
    let write = || -> Result<()> {
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&json).map_err(io)?;
        for (name, t) in &order {
            let c = t.to_device(Device::Cpu).and_then(|t| t.contiguous()).map_err(|e| Error::FileKey { path: shown.clone(), key: name.to_string(), msg: e.to_string() })?;
            let guard = c.read_storage();
            let Storage::Cpu(s) = &*guard else { unreachable!("moved to the CPU above") };
            let sz = c.dtype().size_in_bytes();
            let r = c.layout().contiguous_range().expect("contiguous");
            w.write_all(&s.bytes()[r.start * sz..r.end * sz]).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        // Make the rename itself durable; not every platform can fsync a folder, so this is best effort.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A number unique within this process, for temporary file names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn io_safetensors_reads_a_small_file() {
        let b = file_bytes(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#, &[0, 0, 128, 63, 0, 0, 0, 64]);
        let t = load_from_bytes(&b, "x.safetensors").unwrap();
        assert_eq!(t["a"].to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn io_safetensors_rejects_bad_headers() {
        let cases = [
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, "twice"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, "overlaps"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, "out of order"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, "covers 4 data bytes"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, "gap"),
            (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, "needs 12 bytes"),
            (r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#, "unknown dtype"),
            (r#"[1,2]"#, "JSON"),
        ];
        for (h, want) in cases {
            let err = load_from_bytes(&file_bytes(h, &[0; 8]), "bad.safetensors").unwrap_err().to_string();
            assert!(err.contains("bad.safetensors") && err.contains(want), "{h}: {err}");
        }
    }

    #[test]
    fn io_safetensors_lists_dtypes_the_engine_lacks() {
        let dir = std::env::temp_dir().join(format!("la-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f64.safetensors");
        std::fs::write(&p, file_bytes(r#"{"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8])).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.entries()[0].dtype_name, "F64");
        assert_eq!(f.entries()[0].dtype, None);
        let err = f.tensor("d").unwrap_err().to_string();
        assert!(err.contains("`d`") && err.contains("F64"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
