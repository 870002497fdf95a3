//! `Weights`: the tensors a model is built from, looked up by name with the expected shape.
//!
//! A store is loaded from one or more weights files (safetensors or torch zip, see
//! `engine::io::load_any`) or built from a map. Prefix views (`w.pp("down_blocks").pp(0)`) share the
//! store. Every lookup is recorded, so that after a model is built `finish()` can report, by name,
//! the keys the model asked for and the file lacked (missing) and the keys the file holds and the
//! model never asked for (unexpected). In lenient mode (`collect_missing`) a missing key yields
//! zeros of the expected shape so that the whole model is walked and every missing key is listed
//! at once; `finish()` then fails with that list. Tensors are converted to the store's dtype and
//! device as they are taken.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use engine::{DType, Device, Error, Result, Tensor};

struct Store {
    tensors: BTreeMap<String, Tensor>,
    /// Where the tensors came from (file names), for messages.
    source: String,
    dtype: Option<DType>,
    device: Device,
    collect_missing: bool,
    used: Mutex<BTreeSet<String>>,
    missing: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A view of a tensor store under a key prefix. Cloning is cheap (the store is shared).
#[derive(Clone)]
pub struct Weights {
    store: Arc<Store>,
    prefix: String,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights[{} tensors from {}, prefix {:?}]", self.store.tensors.len(), self.store.source, self.prefix)
    }
}

/// Options of a store: the dtype floating-point tensors are converted to (None keeps the file's),
/// the device, and whether missing keys are collected (zeros) rather than failing at once.
#[derive(Clone, Copy, Debug)]
pub struct WeightsOptions {
    pub dtype: Option<DType>,
    pub device: Device,
    pub collect_missing: bool,
}

impl Default for WeightsOptions {
    fn default() -> Self {
        WeightsOptions { dtype: None, device: Device::Cpu, collect_missing: true }
    }
}

impl Weights {
    /// A store over `tensors`; `source` names their origin in messages.
    pub fn from_map(tensors: BTreeMap<String, Tensor>, source: &str, opts: WeightsOptions) -> Weights {
        Weights {
            store: Arc::new(Store {
                tensors,
                source: source.to_string(),
                dtype: opts.dtype,
                device: opts.device,
                collect_missing: opts.collect_missing,
                used: Mutex::new(BTreeSet::new()),
                missing: Mutex::new(Vec::new()),
            }),
            prefix: String::new(),
        }
    }

    /// A store over the tensors of one or more weights files (a sharded checkpoint is several);
    /// a key present in two files is an error naming both.
    pub fn from_files(paths: &[impl AsRef<Path>], opts: WeightsOptions) -> Result<Weights> {
        let mut all: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        let mut names = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let shown = p.display().to_string();
            let (_, tensors) = engine::io::load_any(p)?;
            for (k, t) in tensors {
                if let Some(first) = origin.get(&k) {
                    return Err(Error::File { path: shown, msg: format!("tensor `{k}` is also in {first}") });
                }
                origin.insert(k.clone(), shown.clone());
                all.insert(k, t);
            }
            names.push(shown);
        }
        Ok(Weights::from_map(all, &names.join(", "), opts))
    }

    /// A view under `prefix.sub` (sub may be a name or an index).
    pub fn pp(&self, sub: impl std::fmt::Display) -> Weights {
        let sub = sub.to_string();
        let prefix = if self.prefix.is_empty() { sub } else if sub.is_empty() { self.prefix.clone() } else { format!("{}.{sub}", self.prefix) };
        Weights { store: self.store.clone(), prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full key of `name` under this view.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn dtype(&self) -> Option<DType> {
        self.store.dtype
    }

    pub fn device(&self) -> Device {
        self.store.device
    }

    /// Whether the store holds `name` (under this view); does not mark it used.
    pub fn contains(&self, name: &str) -> bool {
        self.store.tensors.contains_key(&self.key(name))
    }

    /// Whether any key starts with `name.` under this view (a sub-module is present).
    pub fn contains_prefix(&self, name: &str) -> bool {
        let p = format!("{}.", self.key(name));
        self.store.tensors.range(p.clone()..).next().is_some_and(|(k, _)| k.starts_with(&p))
    }

    /// Every key of the store (whatever the view), sorted.
    pub fn all_keys(&self) -> Vec<String> {
        self.store.tensors.keys().cloned().collect()
    }

    fn convert(&self, t: &Tensor) -> Result<Tensor> {
        let mut t = t.clone();
        if let Some(dt) = self.store.dtype {
            if t.dtype().is_float() && t.dtype() != dt {
                t = t.to_dtype(dt)?;
            }
        }
        if t.device() != self.store.device {
            t = t.to_device(self.store.device)?;
        }
        Ok(t)
    }

    /// The tensor `name` with exactly `shape`. A missing key is an error naming it (or, when
    /// collecting, is recorded and read as zeros); a shape mismatch is always an error.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(name);
        match self.store.tensors.get(&key) {
            Some(t) => {
                lock(&self.store.used).insert(key.clone());
                if t.shape() != shape {
                    return Err(Error::msg(format!("{}: expected {shape:?} found {:?} for key {key}", self.store.source, t.shape())));
                }
                self.convert(t)
            }
            None if self.store.collect_missing => {
                lock(&self.store.missing).push(key);
                Tensor::zeros(shape, self.store.dtype.unwrap_or(DType::F32), self.store.device)
            }
            None => Err(Error::msg(format!("{}: missing key {key}", self.store.source))),
        }
    }

    /// The tensor `name` if present (checked against `shape`), None otherwise (never recorded as
    /// missing: for optional parameters).
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The tensor `name` whatever its shape (for loaders that read the shape from the file, e.g.
    /// a LoRA's rank). Missing is an error naming the key.
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        let key = self.key(name);
        match self.store.tensors.get(&key) {
            Some(t) => {
                lock(&self.store.used).insert(key);
                self.convert(t)
            }
            None => Err(Error::msg(format!("{}: missing key {key}", self.store.source))),
        }
    }

    /// Keys asked for and absent (collecting mode), in the order asked.
    pub fn missing_keys(&self) -> Vec<String> {
        lock(&self.store.missing).clone()
    }

    /// Keys of the store that nothing asked for.
    pub fn unexpected_keys(&self) -> Vec<String> {
        let used = lock(&self.store.used);
        self.store.tensors.keys().filter(|k| !used.contains(*k)).cloned().collect()
    }

    /// After building: an error listing every missing and every unexpected key by name.
    pub fn finish(&self) -> Result<()> {
        let (missing, unexpected) = (self.missing_keys(), self.unexpected_keys());
        if missing.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let mut msg = format!("{}: the weights do not match the model", self.store.source);
        if !missing.is_empty() {
            msg += &format!("; {} missing key(s): {}", missing.len(), missing.join(", "));
        }
        if !unexpected.is_empty() {
            msg += &format!("; {} unexpected key(s): {}", unexpected.len(), unexpected.join(", "));
        }
        Err(Error::msg(msg))
    }
}
