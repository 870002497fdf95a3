//! PyTorch zip checkpoints (`.bin`, `.pth`, `.pt` as written by `torch.save` since 1.6), read
//! without Python. The zip holds `<folder>/data.pkl`, a pickle of the saved object whose tensors
//! refer to storages by persistent id ('storage', storage_type, key, location, numel), and one
//! entry `<folder>/data/<key>` per storage with its raw little-endian bytes. The folder name is
//! whatever the file was called when saved, so it is found rather than assumed.
//!
//! Tensors are views (offset, size, stride) into storages; several may share one storage, and they
//! share it here too (one engine storage per checkpoint storage). torch writes entries
//! uncompressed and 64-byte aligned, so a storage is a zero-copy window into the memory-mapped file.
//! Nested dicts flatten to dotted keys: IP-Adapter's {"image_proj": {"proj.weight": ..}} gives
//! "image_proj.proj.weight". Leaves that are not tensors (epoch numbers, config strings) are
//! skipped.
//!
//! The legacy pre-1.6 format (a bare pickle stream) and TorchScript archives are refused with an
//! error saying so.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::pickle::{self, Obj, Pickle, Value};
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
    /// The storage's key: its entry is `<folder>/data/<key>`.
    pub storage_key: String,
    /// Elements in the storage.
    pub storage_numel: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// A torch zip checkpoint whose pickle has been read; tensor data is touched only on request.
pub struct TorchFile {
    path: String,
    bytes: Bytes,
    /// Storage key -> (byte offset of the stored entry's data, its length, its CRC-32).
    entries: HashMap<String, (usize, usize, u32)>,
    tensors: Vec<TensorRef>,
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
        let &(start, len, crc) = self.entries.get(key).ok_or_else(|| format!("storage entry data/{key} is missing from the archive"))?;
        // The zip's checksum is the only integrity check the format has; it costs one pass over
        // the bytes, which a corrupt checkpoint loaded silently would cost far more than.
        if crc32fast::hash(&self.bytes.as_slice()[start..start + len]) != crc {
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
        if !data.starts_with(b"PK") {
            if data.first() == Some(&0x80) {
                return Err(ferr("legacy (pre-1.6, non-zip) PyTorch format is not supported; re-save it with a current torch.save".into()));
            }
            return Err(ferr("not a PyTorch zip checkpoint (no zip signature)".into()));
        }
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
        for (k, s, l, crc) in folder_entries {
            if let Some(key) = k.strip_prefix(&format!("{folder}/")) {
                entries.insert(key.to_string(), (s, l, crc));
            }
        }
        let pk = pickle::parse(&data[pstart..pstart + plen]).map_err(|e| ferr(format!("{folder}/data.pkl: {e}")))?;
        let mut tensors = Vec::new();
        // Shared references make the object a graph; walking it as a tree could take exponential
        // time on a hostile file. A real checkpoint reaches each object about once.
        let budget = 4 * pk.objs.len() + 1024;
        Walk { pk: &pk, path: &path, out: &mut tensors, budget }.value(&pk.root, "", 0)?;
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::FileKey { path: path.clone(), key: w[0].name.clone(), msg: "two tensors flatten to this name".into() });
        }
        Ok(TorchFile { path, bytes, entries, tensors })
    }
}

/// Reads every tensor of a torch zip checkpoint onto the CPU (zero copy where aligned).
pub fn load(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    TorchFile::open(path)?.tensors()
}

/// Reads a torch zip checkpoint from memory (copying the data); `name` is used in error messages.
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
        let [tag, stype, skey, _location, snumel, ..] = pid else { return Err(bad("the storage id has fewer than 5 fields")) };
        if !matches!(tag, Value::Str(s) if &**s == "storage") {
            return Err(bad("the persistent id is not a storage"));
        }
        let (_, sname) = pk.global(stype).ok_or_else(|| bad("the storage type is not a class"))?;
        let (dtype_name, dtype) = storage_dtype(sname).ok_or_else(|| self.kerr(key, format!("unknown storage type {sname}")))?;
        let storage_key = match skey {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err(bad("the storage key is not a string")),
        };
        let uint = |v: &Value| match v {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        };
        let storage_numel = uint(snumel).ok_or_else(|| bad("the storage size is not a non-negative integer"))?;
        let offset = uint(offset).ok_or_else(|| bad("the storage offset is not a non-negative integer"))?;
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
        if last.is_none_or(|l| l >= storage_numel) {
            return Err(self.kerr(key, format!("view (offset {offset}, size {shape:?}, stride {strides:?}) reaches outside its storage of {storage_numel} elements")));
        }
        Ok(TensorRef { name: key.to_string(), dtype_name, dtype, storage_key, storage_numel, offset, shape, strides })
    }
}

/// Storage class name -> (safetensors dtype name, engine dtype). Bool storages hold one byte of 0
/// or 1, so they read as U8.
fn storage_dtype(class: &str) -> Option<(&'static str, Option<DType>)> {
    Some(match class {
        "FloatStorage" => ("F32", Some(DType::F32)),
        "HalfStorage" => ("F16", Some(DType::F16)),
        "BFloat16Storage" => ("BF16", Some(DType::BF16)),
        "LongStorage" => ("I64", Some(DType::I64)),
        "ByteStorage" | "UntypedStorage" => ("U8", Some(DType::U8)),
        "BoolStorage" => ("BOOL", Some(DType::U8)),
        "DoubleStorage" => ("F64", None),
        "IntStorage" => ("I32", None),
        "ShortStorage" => ("I16", None),
        "CharStorage" => ("I8", None),
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
        p.extend_from_slice(b"K\x04tQJ");
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
