//! PyTorch checkpoints (`.bin`, `.pth`, `.pt`), read without Python, in both formats `torch.save`
//! writes:
//!
//! - The zip format (the default since torch 1.6). The zip holds `<folder>/data.pkl`, a pickle of
//!   the saved object whose tensors refer to storages by persistent id ('storage', storage_type,
//!   key, location, numel), and one entry `<folder>/data/<key>` per storage with its raw
//!   little-endian bytes. The folder name is whatever the file was called when saved, so it is
//!   found rather than assumed. torch writes entries uncompressed and 64-byte aligned, so a storage
//!   is a zero-copy window into the memory-mapped file.
//! - The legacy format (`_use_new_zipfile_serialization=False`, and every file from before 1.6,
//!   such as facenet-pytorch's MTCNN weights): a stream of pickles (the magic number, the protocol
//!   version 1001, a sys_info dict, the object, the list of storage keys) followed by each storage
//!   in that list's order as an 8-byte little-endian element count and the raw bytes. Its
//!   persistent ids carry a sixth field, view_metadata (view_key, offset, numel), for storages
//!   saved as views of a larger one. Storages start wherever the previous one ended, so they are
//!   read in place when that happens to suit the dtype's alignment and copied otherwise. The format
//!   has no checksum: a flipped data byte reads as a wrong value, as it does in torch.
//!
//! Both carry the same pickled object, rebuilt the same way. Tensors are views (offset, size,
//! stride) into storages; several may share one storage, and they share it here too (one engine
//! storage per checkpoint storage). Nested dicts flatten to dotted keys: IP-Adapter's
//! {"image_proj": {"proj.weight": ..}} gives "image_proj.proj.weight". Leaves that are not tensors
//! (epoch numbers, config strings) are skipped.
//!
//! TorchScript archives and the tar format of the earliest torch releases are refused with an error
//! saying so.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::pickle::{self, Obj, Pickle, Value};
use super::Format;
use crate::cpu::CpuStorage;
use crate::layout::Layout;
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// Nesting limit when walking the saved object (real checkpoints nest a few levels).
const MAX_DEPTH: usize = 64;

/// One tensor as the pickle describes it, before any data is read.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// Flattened, dotted name.
    pub name: String,
    /// The storage's dtype as safetensors names it ("F32", "BF16", "F64", ...).
    pub dtype_name: &'static str,
    /// The engine dtype, or `None` when the engine has no such dtype.
    pub dtype: Option<DType>,
    /// The storage's key (zip format: its entry is `<folder>/data/<key>`).
    pub storage_key: String,
    /// Elements in the storage.
    pub storage_numel: usize,
    /// Offset of the first element in the whole storage (a legacy storage view's offset included).
    pub offset: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// A torch checkpoint whose pickle has been read; tensor data is touched only on request.
pub struct TorchFile {
    path: String,
    bytes: Bytes,
    format: Format,
    /// Storage key -> where its bytes are.
    entries: HashMap<String, Entry>,
    tensors: Vec<TensorRef>,
}

/// Where one storage's bytes lie in the file.
#[derive(Clone, Copy, Debug)]
struct Entry {
    start: usize,
    len: usize,
    /// The zip entry's CRC-32; the legacy format has none.
    crc: Option<u32>,
}

enum Bytes {
    Mapped(Arc<memmap2::Mmap>),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl TorchFile {
    /// Maps the file and reads its pickle.
    pub fn open(path: impl AsRef<Path>) -> Result<TorchFile> {
        let path = path.as_ref();
        let map = super::safetensors::map_file(path)?;
        TorchFile::parse(Bytes::Mapped(Arc::new(map)), path.display().to_string())
    }

    /// Reads a checkpoint held in memory (copies are made of the tensor data); `name` is used in
    /// error messages.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<TorchFile> {
        TorchFile::parse(Bytes::Owned(bytes.to_vec()), name.to_string())
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Zip or legacy.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Every tensor, sorted by name.
    pub fn tensor_refs(&self) -> &[TensorRef] {
        &self.tensors
    }

    /// Every tensor, by name. Tensors sharing a storage in the checkpoint share one here.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut storages: HashMap<&str, Tensor> = HashMap::new();
        let mut out = BTreeMap::new();
        for r in &self.tensors {
            let kerr = |msg: String| Error::FileKey { path: self.path.clone(), key: r.name.clone(), msg };
            let dtype = r.dtype.ok_or_else(|| kerr(format!("dtype {} is not supported by the engine", r.dtype_name)))?;
            let base = match storages.get(r.storage_key.as_str()) {
                Some(b) => b.clone(),
                None => {
                    let b = self.storage(&r.storage_key, dtype, r.storage_numel).map_err(kerr)?;
                    storages.insert(&r.storage_key, b.clone());
                    b
                }
            };
            if base.dtype() != dtype || base.elem_count() != r.storage_numel {
                return Err(kerr(format!("storage {} is used as {} elements of {dtype} and as {} of {}", r.storage_key, r.storage_numel, base.elem_count(), base.dtype())));
            }
            out.insert(r.name.clone(), base.with_layout(Layout::new(r.shape.clone(), r.strides.clone(), r.offset)));
        }
        Ok(out)
    }

    /// The whole storage `key` as a 1-D tensor of `numel` elements.
    fn storage(&self, key: &str, dtype: DType, numel: usize) -> std::result::Result<Tensor, String> {
        let Some(&Entry { start, len, crc }) = self.entries.get(key) else {
            return Err(match self.format {
                Format::TorchLegacy => format!("storage {key} is not in the file's list of stored storages"),
                _ => format!("storage entry data/{key} is missing from the archive"),
            });
        };
        // The zip's checksum is the only integrity check the format has; it costs one pass over
        // the bytes, which a corrupt checkpoint loaded silently would cost far more than.
        if crc.is_some_and(|crc| crc32fast::hash(&self.bytes.as_slice()[start..start + len]) != crc) {
            return Err(format!("storage data/{key} fails its CRC-32 check (corrupt file)"));
        }
        let need = numel.checked_mul(dtype.size_in_bytes()).ok_or("storage size overflows")?;
        if len < need {
            return Err(format!("storage data/{key} holds {len} bytes, {numel} elements of {dtype} need {need} (truncated file?)"));
        }
        let storage = match &self.bytes {
            Bytes::Mapped(m) => CpuStorage::mapped(m.clone(), start, need, dtype),
            Bytes::Owned(_) => None,
        };
        let storage = match storage {
            Some(s) => s,
            None => CpuStorage::from_bytes(dtype, &self.bytes.as_slice()[start..start + need]).map_err(|e| e.to_string())?,
        };
        Tensor::from_storage(Storage::Cpu(storage), &[numel]).map_err(|e| e.to_string())
    }

    fn parse(bytes: Bytes, path: String) -> Result<TorchFile> {
        let ferr = |msg: String| Error::File { path: path.clone(), msg };
        let data = bytes.as_slice();
        let (format, pk, entries) = if data.starts_with(b"PK") {
            let (pk, entries) = zip_parts(data, &path)?;
            (Format::TorchZip, pk, entries)
        } else if is_legacy(data) {
            let (pk, entries) = legacy_parts(data, &path)?;
            (Format::TorchLegacy, pk, entries)
        } else if data.get(257..262) == Some(b"ustar") {
            return Err(ferr("this is the tar format of the earliest torch releases, which is not supported; re-save it with a current torch.save".into()));
        } else {
            return Err(ferr("not a PyTorch checkpoint (neither a zip archive nor the legacy pickle stream)".into()));
        };
        let mut tensors = Vec::new();
        // Shared references make the object a graph; walking it as a tree could take exponential
        // time on a hostile file. A real checkpoint reaches each object about once.
        let budget = 4 * pk.objs.len() + 1024;
        Walk { pk: &pk, path: &path, out: &mut tensors, budget }.value(&pk.root, "", 0)?;
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::FileKey { path: path.clone(), key: w[0].name.clone(), msg: "two tensors flatten to this name".into() });
        }
        Ok(TorchFile { path, bytes, format, entries, tensors })
    }
}

/// The zip format's pickle (already parsed) and its storage entries.
fn zip_parts(data: &[u8], path: &str) -> Result<(Pickle, HashMap<String, Entry>)> {
    let ferr = |msg: String| Error::File { path: path.to_string(), msg };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(|e| ferr(format!("not a readable zip archive: {e}")))?;
    let mut entries = HashMap::new();
    let mut pkl: Option<(String, usize, usize)> = None;
    let mut folder_entries: Vec<(String, usize, usize, u32)> = Vec::new();
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(|e| ferr(format!("zip entry {i}: {e}")))?;
        let name = f.name().map_err(|e| ferr(format!("zip entry {i}: {e}")))?.to_string();
        let start = f.data_start().ok_or_else(|| ferr(format!("zip entry {name}: unknown data position")))?;
        let size = f.compressed_size();
        let stored = f.compression() == zip::CompressionMethod::Stored;
        let crc = f.crc32();
        let in_file = start.checked_add(size).is_some_and(|end| end <= data.len() as u64);
        if !in_file {
            return Err(ferr(format!("zip entry {name}: data runs past the end of the file (truncated?)")));
        }
        let (start, size) = (start as usize, size as usize);
        if name.ends_with("/constants.pkl") || name.contains("/code/") {
            return Err(ferr("this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint".into()));
        }
        let parts: Vec<&str> = name.splitn(2, '/').collect();
        if parts.len() != 2 {
            continue;
        }
        let (folder, rest) = (parts[0], parts[1]);
        if rest == "data.pkl" {
            if pkl.is_some() {
                return Err(ferr("the archive holds more than one data.pkl".into()));
            }
            if !stored {
                return Err(ferr(format!("zip entry {name} is compressed; torch writes checkpoints uncompressed and compressed entries are not supported")));
            }
            if crc32fast::hash(&data[start..start + size]) != crc {
                return Err(ferr(format!("zip entry {name} fails its CRC-32 check (corrupt file)")));
            }
            pkl = Some((folder.to_string(), start, size));
        } else if let Some(key) = rest.strip_prefix("data/") {
            if !stored {
                return Err(ferr(format!("zip entry {name} is compressed; torch writes checkpoints uncompressed and compressed entries are not supported")));
            }
            folder_entries.push((format!("{folder}/{key}"), start, size, crc));
        } else if rest == "byteorder" && (!stored || &data[start..start + size] != b"little") {
            return Err(ferr("the checkpoint is not little-endian; big-endian checkpoints are not supported".into()));
        }
    }
    let (folder, pstart, plen) = pkl.ok_or_else(|| ferr("no `<folder>/data.pkl` in the archive: not a torch.save checkpoint".into()))?;
    for (k, start, len, crc) in folder_entries {
        if let Some(key) = k.strip_prefix(&format!("{folder}/")) {
            entries.insert(key.to_string(), Entry { start, len, crc: Some(crc) });
        }
    }
    let pk = pickle::parse(&data[pstart..pstart + plen]).map_err(|e| ferr(format!("{folder}/data.pkl: {e}")))?;
    Ok((pk, entries))
}

/// The magic number `_legacy_save` pickles first, 0x1950a86a20f9469cfc6c, as binary pickle
/// protocols write it (LONG1 of 10 little-endian bytes) and as protocols 0 and 1 do (decimal text).
const LEGACY_MAGIC_LONG1: [u8; 12] = [0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_MAGIC_TEXT: &[u8] = b"L119547037146038801333356L\n";
/// `_legacy_save`'s protocol version.
const LEGACY_PROTOCOL: i64 = 1001;

/// Whether `head` starts like torch's legacy format: the pickled magic number.
pub fn is_legacy(head: &[u8]) -> bool {
    // Binary protocols (2 and up) open with PROTO n.
    let binary = head.len() >= 2 + LEGACY_MAGIC_LONG1.len() && head[0] == 0x80 && head[2..].starts_with(&LEGACY_MAGIC_LONG1);
    binary || head.starts_with(LEGACY_MAGIC_TEXT)
}

/// The next pickle of the legacy stream at `*pos`; moves `*pos` past it.
fn next_pickle(data: &[u8], pos: &mut usize, what: &str, path: &str) -> Result<Pickle> {
    let at = *pos;
    let (pk, n) = pickle::parse_prefix(&data[at..]).map_err(|e| Error::File { path: path.to_string(), msg: format!("legacy format, {what} (the pickle at byte {at}): {e}") })?;
    *pos = at + n;
    Ok(pk)
}

/// The legacy format's object pickle (parsed) and where each storage's bytes are.
fn legacy_parts(data: &[u8], path: &str) -> Result<(Pickle, HashMap<String, Entry>)> {
    let ferr = |msg: String| Error::File { path: path.to_string(), msg: format!("legacy format: {msg}") };
    let mut pos = 0;
    next_pickle(data, &mut pos, "magic number", path)?;
    let version = next_pickle(data, &mut pos, "protocol version", path)?;
    if version.root != Value::Int(LEGACY_PROTOCOL) {
        return Err(ferr(format!("protocol version {:?}, expected {LEGACY_PROTOCOL}", version.root)));
    }
    let sys_info = next_pickle(data, &mut pos, "sys_info", path)?;
    if let Some(Obj::Dict(items)) = sys_info.obj(&sys_info.root) {
        if items.iter().any(|(k, v)| matches!(k, Value::Str(s) if &**s == "little_endian") && *v == Value::Bool(false)) {
            return Err(ferr("the checkpoint is big-endian; big-endian checkpoints are not supported".into()));
        }
    }
    let pk = next_pickle(data, &mut pos, "the saved object", path)?;
    let keys_pk = next_pickle(data, &mut pos, "the storage keys", path)?;
    let keys = keys_pk.seq(&keys_pk.root).ok_or_else(|| ferr("the storage keys are not a list".into()))?;

    // Each storage's element size and byte count come from its persistent id in the object: the
    // stream itself only holds element counts.
    let mut sizes: HashMap<String, (usize, usize)> = HashMap::new();
    for o in &pk.objs {
        let Obj::PersId(pid) = o else { continue };
        let Some([Value::Str(tag), stype, skey, _location, Value::Int(numel), ..]) = pk.seq(pid) else { continue };
        if &**tag != "storage" {
            continue;
        }
        let Some(key) = key_string(skey) else { continue };
        let Some((_, sname)) = pk.global(stype) else { continue };
        let (_, _, elem) = storage_dtype(sname).ok_or_else(|| ferr(format!("storage {key} has the unknown storage type {sname}")))?;
        let nbytes = usize::try_from(*numel).ok().and_then(|n| n.checked_mul(elem)).ok_or_else(|| ferr(format!("storage {key}: bad element count {numel}")))?;
        match sizes.get(&key) {
            Some(&(_, b)) if b != nbytes => return Err(ferr(format!("storage {key} is declared with {b} and with {nbytes} bytes"))),
            Some(_) => {}
            None => {
                sizes.insert(key, (elem, nbytes));
            }
        }
    }

    let mut entries = HashMap::new();
    for k in keys {
        let key = key_string(k).ok_or_else(|| ferr("a storage key is neither a string nor an integer".into()))?;
        let &(elem, nbytes) = sizes.get(&key).ok_or_else(|| ferr(format!("the storage list names {key}, which no persistent id in the object describes")))?;
        let Some(count) = data.get(pos..pos + 8) else {
            return Err(ferr(format!("storage {key}: the file ends at byte {} before its element count (truncated?)", data.len())));
        };
        let count = i64::from_le_bytes(count.try_into().expect("an 8-byte slice"));
        // Checked against the declared size (as torch does) before anything is sized from it.
        let len = usize::try_from(count).ok().and_then(|c| c.checked_mul(elem));
        if len != Some(nbytes) {
            return Err(ferr(format!("storage {key}: the file stores {count} elements of {elem} bytes where the object declares {nbytes} bytes")));
        }
        let start = pos + 8;
        if nbytes > data.len() - start {
            return Err(ferr(format!("storage {key}: {nbytes} bytes from byte {start} run past the end of the file ({} bytes; truncated?)", data.len())));
        }
        if entries.insert(key.clone(), Entry { start, len: nbytes, crc: None }).is_some() {
            return Err(ferr(format!("the storage list names {key} twice")));
        }
        pos = start + nbytes;
    }
    Ok((pk, entries))
}

/// A storage key as the persistent ids and the legacy key list write it (a string; an integer in
/// some old files).
fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Reads every tensor of a torch checkpoint, zip or legacy, onto the CPU (zero copy where aligned).
pub fn load(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    TorchFile::open(path)?.tensors()
}

/// Reads a torch checkpoint, zip or legacy, from memory (copying the data); `name` is used in error
/// messages.
pub fn load_from_bytes(bytes: &[u8], name: &str) -> Result<BTreeMap<String, Tensor>> {
    TorchFile::from_bytes(bytes, name)?.tensors()
}

/// Walks the unpickled object, collecting tensors under flattened names.
struct Walk<'a> {
    pk: &'a Pickle,
    path: &'a str,
    out: &'a mut Vec<TensorRef>,
    /// Objects still allowed to be visited.
    budget: usize,
}

impl Walk<'_> {
    fn kerr(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::FileKey { path: self.path.to_string(), key: if key.is_empty() { "<root>".into() } else { key.to_string() }, msg: msg.into() }
    }

    fn value(&mut self, v: &Value, key: &str, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.kerr(key, format!("objects nested more than {MAX_DEPTH} deep (corrupt or cyclic pickle)")));
        }
        if self.budget == 0 {
            return Err(self.kerr(key, "the pickled objects refer to each other too often (corrupt pickle)"));
        }
        self.budget -= 1;
        let pk = self.pk;
        match pk.obj(v) {
            Some(Obj::Dict(items)) => {
                for (k, v) in items {
                    let k = match k {
                        Value::Str(s) => s.to_string(),
                        Value::Int(i) => i.to_string(),
                        _ => return Err(self.kerr(key, "a dict key is neither a string nor an integer")),
                    };
                    let name = if key.is_empty() { k } else { format!("{key}.{k}") };
                    self.value(v, &name, depth + 1)?;
                }
                Ok(())
            }
            Some(Obj::Call { func, args }) => match pk.global(func) {
                Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor")) => {
                    let t = self.tensor(args, key)?;
                    self.out.push(t);
                    Ok(())
                }
                // Parameter(data, requires_grad, hooks): the data is the tensor.
                Some(("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")) => match pk.seq(args) {
                    Some([data, ..]) => self.value(data, key, depth + 1),
                    _ => Err(self.kerr(key, "_rebuild_parameter without arguments")),
                },
                // Tensor subclasses or tensors with Python attributes: (func, type, args, state).
                Some(("torch._tensor", "_rebuild_from_type_v2")) => match pk.seq(args) {
                    Some([f, _ty, a, ..]) if matches!(pk.global(f), Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor"))) => {
                        let t = self.tensor(a, key)?;
                        self.out.push(t);
                        Ok(())
                    }
                    Some([_, _, _, ..]) => Err(self.kerr(key, "tensor subclass rebuilt by an unsupported function")),
                    _ => Err(self.kerr(key, "_rebuild_from_type_v2 with too few arguments")),
                },
                _ => Ok(()), // some other object: not a tensor, skipped
            },
            // Lists and tuples of tensors (rare in state dicts) are indexed like dicts.
            Some(Obj::List(items)) | Some(Obj::Tuple(items)) => {
                for (i, v) in items.iter().enumerate() {
                    let name = if key.is_empty() { i.to_string() } else { format!("{key}.{i}") };
                    self.value(v, &name, depth + 1)?;
                }
                Ok(())
            }
            _ => Ok(()), // numbers, strings, None: not tensors
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, ...)`.
    fn tensor(&self, args: &Value, key: &str) -> Result<TensorRef> {
        let pk = self.pk;
        let bad = |msg: &str| self.kerr(key, format!("tensor record: {msg}"));
        let a = pk.seq(args).ok_or_else(|| bad("arguments are not a tuple"))?;
        let [storage, offset, size, stride, ..] = a else { return Err(bad("fewer than 4 arguments")) };
        let Some(Obj::PersId(pid)) = pk.obj(storage) else { return Err(bad("the storage is not a persistent id")) };
        let pid = pk.seq(pid).ok_or_else(|| bad("the storage id is not a tuple"))?;
        let [tag, stype, skey, _location, snumel, rest @ ..] = pid else { return Err(bad("the storage id has fewer than 5 fields")) };
        if !matches!(tag, Value::Str(s) if &**s == "storage") {
            return Err(bad("the persistent id is not a storage"));
        }
        let (_, sname) = pk.global(stype).ok_or_else(|| bad("the storage type is not a class"))?;
        let (dtype_name, dtype, _) = storage_dtype(sname).ok_or_else(|| self.kerr(key, format!("unknown storage type {sname}")))?;
        let storage_key = key_string(skey).ok_or_else(|| bad("the storage key is not a string"))?;
        let uint = |v: &Value| match v {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        };
        let storage_numel = uint(snumel).ok_or_else(|| bad("the storage size is not a non-negative integer"))?;
        let offset = uint(offset).ok_or_else(|| bad("the storage offset is not a non-negative integer"))?;
        // Legacy files may describe the storage as a view (view_key, offset, numel) of the stored
        // one: the tensor's offset counts from the view's start and must stay inside the view.
        let (view_offset, view_numel) = match rest.first() {
            None | Some(Value::None) => (0, storage_numel),
            Some(v) => match pk.seq(v) {
                Some([_, o, n]) => {
                    let (o, n) = (uint(o), uint(n));
                    match (o, n) {
                        (Some(o), Some(n)) if o.checked_add(n).is_some_and(|end| end <= storage_numel) => (o, n),
                        _ => return Err(bad(&format!("the storage view {o:?} + {n:?} elements is not inside its storage of {storage_numel}"))),
                    }
                }
                _ => return Err(bad("the storage view metadata is not a (key, offset, numel) tuple")),
            },
        };
        let ints = |v: &Value, what: &str| -> Result<Vec<usize>> {
            pk.seq(v).ok_or_else(|| bad(&format!("{what} is not a tuple")))?.iter().map(|d| uint(d).ok_or_else(|| bad(&format!("{what} holds a non-integer or negative value")))).collect()
        };
        let shape = ints(size, "the size")?;
        let strides = ints(stride, "the stride")?;
        if shape.len() != strides.len() {
            return Err(self.kerr(key, format!("size {shape:?} and stride {strides:?} differ in rank")));
        }
        // The view must stay inside its storage: offset + sum((d-1)*s) < numel, checked without overflow.
        let count = super::checked_numel(&shape).ok_or_else(|| self.kerr(key, format!("size {shape:?} overflows")))?;
        if count == 0 {
            // No element is ever read, so the strides do not matter; contiguous ones are always valid.
            let strides = crate::layout::contiguous_strides(&shape);
            return Ok(TensorRef { name: key.to_string(), dtype_name, dtype, storage_key, storage_numel, offset: 0, shape, strides });
        }
        let last = shape.iter().zip(&strides).try_fold(offset, |a, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| a.checked_add(x)));
        if last.is_none_or(|l| l >= view_numel) {
            return Err(self.kerr(key, format!("view (offset {offset}, size {shape:?}, stride {strides:?}) reaches outside its storage of {view_numel} elements")));
        }
        let offset = view_offset + offset; // cannot overflow: both lie inside the storage
        Ok(TensorRef { name: key.to_string(), dtype_name, dtype, storage_key, storage_numel, offset, shape, strides })
    }
}

/// Storage class name -> (safetensors dtype name, engine dtype, element size in bytes). Bool
/// storages hold one byte of 0 or 1, so they read as U8.
fn storage_dtype(class: &str) -> Option<(&'static str, Option<DType>, usize)> {
    Some(match class {
        "FloatStorage" => ("F32", Some(DType::F32), 4),
        "HalfStorage" => ("F16", Some(DType::F16), 2),
        "BFloat16Storage" => ("BF16", Some(DType::BF16), 2),
        "LongStorage" => ("I64", Some(DType::I64), 8),
        "ByteStorage" | "UntypedStorage" => ("U8", Some(DType::U8), 1),
        "BoolStorage" => ("BOOL", Some(DType::U8), 1),
        "DoubleStorage" => ("F64", None, 8),
        "IntStorage" => ("I32", None, 4),
        "ShortStorage" => ("I16", None, 2),
        "CharStorage" => ("I8", None, 1),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    /// BINUNICODE of `s`.
    fn s(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s.as_bytes());
        v
    }

    /// A pickled `{"w": _rebuild_tensor_v2(storage '0' of 4 floats, offset, size, stride, ...)}`
    /// (sizes and strides as 8-byte LONG1 so that any value fits).
    fn state_dict(offset: u32, size: &[u64], stride: &[u64]) -> Vec<u8> {
        state_dict_pid(offset, size, stride, b"")
    }

    /// `state_dict` with `pid_tail` pickled as further fields of the storage's persistent id.
    fn state_dict_pid(offset: u32, size: &[u64], stride: &[u64], pid_tail: &[u8]) -> Vec<u8> {
        let ints = |v: &[u64]| -> Vec<u8> {
            let mut o = vec![b'('];
            for &x in v {
                o.extend_from_slice(&[0x8a, 8]);
                o.extend_from_slice(&x.to_le_bytes());
            }
            o.push(b't');
            o
        };
        let mut p = b"\x80\x02}(".to_vec();
        p.extend(s("w"));
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        p.extend(s("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(s("0"));
        p.extend(s("cpu"));
        p.extend_from_slice(b"K\x04");
        p.extend_from_slice(pid_tail);
        p.extend_from_slice(b"tQJ");
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend(ints(size));
        p.extend(ints(stride));
        p.extend_from_slice(b"\x89}tRu.");
        p
    }

    fn checkpoint(pkl: &[u8]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in [("ckpt/data.pkl", pkl), ("ckpt/byteorder", b"little"), ("ckpt/data/0", &bytemuck_f32(&[1.0, 2.0, 3.0, 4.0]))] {
            zip.start_file(name, opts).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A legacy-format file: header pickles, `pkl`, the key list ["0"], then storage "0" stored as
    /// `count` followed by `data`.
    fn legacy(pkl: &[u8], count: i64, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80, 2];
        f.extend_from_slice(&super::LEGACY_MAGIC_LONG1);
        f.extend_from_slice(b".\x80\x02M\xe9\x03.\x80\x02}.");
        f.extend_from_slice(pkl);
        f.extend_from_slice(b"\x80\x02](");
        f.extend(s("0"));
        f.extend_from_slice(b"e.");
        f.extend_from_slice(&count.to_le_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn io_torch_legacy_format_reads_like_the_zip_one() {
        let four = bytemuck_f32(&[1.0, 2.0, 3.0, 4.0]);
        let pkl = state_dict_pid(0, &[2, 2], &[1, 2], b"N");
        let bytes = legacy(&pkl, 4, &four);
        assert!(super::is_legacy(&bytes[..32]) && !super::is_legacy(&checkpoint(&pkl)[..32]));
        let file = super::TorchFile::from_bytes(&bytes, "old.pt").unwrap();
        assert_eq!(file.format(), super::Format::TorchLegacy);
        assert_eq!(file.tensors().unwrap()["w"].to_vec::<f32>().unwrap(), vec![1.0, 3.0, 2.0, 4.0]);
        // Trailing bytes after the last storage are ignored, as torch ignores them.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"junk");
        assert!(super::load_from_bytes(&longer, "old.pt").is_ok());
        // Every shorter prefix is an error naming the file.
        for cut in 0..bytes.len() {
            let err = super::load_from_bytes(&bytes[..cut], "old.pt").unwrap_err().to_string();
            assert!(err.contains("old.pt"), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn io_torch_legacy_storage_views_offset_the_tensor() {
        // The storage is the view ('v', offset 1, 2 elements) of the stored [1, 2, 3, 4].
        let four = bytemuck_f32(&[1.0, 2.0, 3.0, 4.0]);
        let mut view = b"(".to_vec();
        view.extend(s("v"));
        view.extend_from_slice(b"K\x01K\x02t");
        let t = super::load_from_bytes(&legacy(&state_dict_pid(1, &[1], &[1], &view), 4, &four), "v.pt").unwrap();
        assert_eq!(t["w"].to_vec::<f32>().unwrap(), vec![3.0]);
        assert_eq!(t["w"].layout().offset(), 2);
        // Inside the storage but outside the view.
        let err = super::load_from_bytes(&legacy(&state_dict_pid(1, &[2], &[1], &view), 4, &four), "v.pt").unwrap_err().to_string();
        assert!(err.contains("v.pt") && err.contains("outside"), "{err}");
        // A view reaching past its storage.
        let mut far = b"(".to_vec();
        far.extend(s("v"));
        far.extend_from_slice(b"K\x03K\x02t");
        let err = super::load_from_bytes(&legacy(&state_dict_pid(0, &[1], &[1], &far), 4, &four), "v.pt").unwrap_err().to_string();
        assert!(err.contains("v.pt") && err.contains("not inside its storage"), "{err}");
    }

    #[test]
    fn io_torch_legacy_counts_are_checked_before_use() {
        let four = bytemuck_f32(&[1.0, 2.0, 3.0, 4.0]);
        let pkl = state_dict_pid(0, &[4], &[1], b"N");
        for count in [i64::MAX, i64::MIN, -1, 3, 5, 1 << 62] {
            let err = super::load_from_bytes(&legacy(&pkl, count, &four), "n.pt").unwrap_err().to_string();
            assert!(err.contains("n.pt") && err.contains("declares 16 bytes"), "{count}: {err}");
        }
        // A declared storage larger than the file.
        let i = pkl.windows(2).position(|w| w == b"K\x04").unwrap(); // the storage's numel
        let big = [&pkl[..i], b"J\x00\x00\x00\x40", &pkl[i + 2..]].concat();
        let err = super::load_from_bytes(&legacy(&big, 1 << 30, &four), "n.pt").unwrap_err().to_string();
        assert!(err.contains("n.pt") && err.contains("past the end"), "{err}");
        // Big-endian files are refused.
        let mut be = legacy(&pkl, 4, &four);
        let at = be.windows(4).position(|w| w == b"}.\x80\x02").unwrap();
        let mut sys = b"}(".to_vec();
        sys.extend(s("little_endian"));
        sys.extend_from_slice(b"\x89u");
        be.splice(at..at + 1, sys);
        let err = super::load_from_bytes(&be, "be.pt").unwrap_err().to_string();
        assert!(err.contains("be.pt") && err.contains("big-endian"), "{err}");
    }

    #[test]
    fn io_torch_views_are_checked_against_their_storage() {
        // Storage [1, 2, 3, 4] seen as a transposed 2x2: [[1, 3], [2, 4]].
        let ok = super::load_from_bytes(&checkpoint(&state_dict(0, &[2, 2], &[1, 2])), "t.bin").unwrap();
        assert_eq!(ok["w"].to_vec::<f32>().unwrap(), vec![1.0, 3.0, 2.0, 4.0]);
        let err = super::load_from_bytes(&checkpoint(&state_dict(1, &[2, 2], &[1, 2])), "t.bin").unwrap_err().to_string();
        assert!(err.contains("t.bin") && err.contains("`w`") && err.contains("outside its storage"), "{err}");
        // Zero elements: any strides, nothing read; huge dims that multiply past usize are refused.
        let empty = super::load_from_bytes(&checkpoint(&state_dict(0, &[0, 7], &[9, 9])), "t.bin").unwrap();
        assert_eq!(empty["w"].shape(), &[0, 7]);
        let big = 1u64 << 40;
        let err = super::load_from_bytes(&checkpoint(&state_dict(0, &[big, big, big, 0], &[1, 1, 1, 1])), "t.bin").unwrap_err().to_string();
        assert!(err.contains("overflows"), "{err}");
    }

    #[test]
    fn io_torch_shared_references_cannot_blow_up_the_walk() {
        // t = (); 60 times: t = (t, t). 2^60 paths through 61 objects.
        let mut p = b"\x80\x02)".to_vec();
        for _ in 0..60 {
            p.extend_from_slice(b"q\x00h\x00\x86");
        }
        p.push(b'.');
        let err = super::load_from_bytes(&checkpoint(&p), "dag.bin").unwrap_err().to_string();
        assert!(err.contains("dag.bin") && err.contains("refer to each other"), "{err}");
    }
}
