//! Which variant of a kernel family runs, per problem shape.
//!
//! A family with variants (kernels computing the same thing with other tiles, pipelines or warp
//! roles: kernels/cuda/*.cu list theirs) asks `choose` before it launches:
//! 1. `LOOKAHEAD_VARIANT_<FAMILY>` names one for every shape (benchmarks side by side); a name the
//!    family does not have is an error listing those it has;
//! 2. with `LOOKAHEAD_AUTOTUNE=1`, the variant recorded for this device, these kernel sources and
//!    this shape in the tuning table, else (past the committed choices of 3.) the fastest in trial
//!    runs on the call's own operands (each variant run once to compile and load it, then three
//!    runs queued behind a stream hold and timed by CUDA events: GPU time), which is then recorded. The table is `tuned.json` in the kernel cache folder (`LOOKAHEAD_TUNE_FILE`
//!    names another file); a variant that fails to launch in a trial is left out, with its error
//!    (one that faults while running ends the CUDA context, as any kernel fault does: every
//!    variant passes the parity suites first);
//! 3. else the variant kernels/tuned.json (committed measurements: the tuned.json of GPU runs,
//!    merged) records for this device, these kernel sources and this shape;
//! 4. else the family's default (the first name).
//!
//! Whether a family's kernels apply at all (device, dtype, shared memory) is decided on its
//! default; a variant asked for by name that then does not fit is a launch error, not a silent
//! fallback (every variant fits the 227 KiB of an H100/H200).
//!
//! Trials write the call's outputs, which the caller's launch of the chosen variant then
//! overwrites, so a family offers trials only where one launch sequence computes its outputs from
//! its inputs alone. Tuning costs the first call of each shape a few runs of every variant; the
//! choice differs between devices and may differ between runs on one, as with cuDNN's
//! benchmark mode, which is why it is not the default: the default runs what was measured and
//! committed (kernels/tuned.json, else each family's default, benches/RESULTS.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use kernels::compile::{KernelCache, KernelSource};
use serde::{Deserialize, Serialize};

use super::CudaDevice;
use crate::{Error, Result};

/// A kernel family's variants: `names[0]` is the default; `sources` are the files they are built
/// from (a changed source is a new table entry).
pub struct Variants {
    pub family: &'static str,
    pub names: &'static [&'static str],
    pub sources: &'static [&'static KernelSource],
}

/// Trial runs timed per variant.
const TIMED_RUNS: u32 = 3;

/// The variant to launch for this call (see the module comment). `shape` names the problem (it is
/// only formatted when tuning); `trial(v)` queues one run of variant `v` on the call's operands.
pub fn choose(dev: &Arc<CudaDevice>, v: &Variants, shape: &dyn Fn() -> String, trial: &mut dyn FnMut(&'static str) -> Result<()>) -> Result<&'static str> {
    if let Some(asked) = requested(v)? {
        return Ok(asked);
    }
    if v.names.len() < 2 || (!autotune() && shipped().is_empty()) {
        return Ok(v.names[0]);
    }
    let key = format!("{} sm_{} x{} | {} {} | {}", dev.name(), dev.arch(), dev.multiprocessors(), v.family, sources_hash(v), shape());
    {
        let mut guard = table().lock().unwrap_or_else(|p| p.into_inner());
        if autotune() && guard.is_none() {
            *guard = Some(Table::load(table_path())?);
        }
        if let Some(name) = recorded(guard.as_ref().map(|t| &t.entries), shipped(), &key, v) {
            return Ok(name);
        }
    }
    if !autotune() {
        return Ok(v.names[0]);
    }
    // Trials run without the table's lock (their first runs may compile kernels for seconds).
    let (name, ms) = fastest(v.names, |name| {
        // One run to compile and load, timed on the host; the timed runs then queue behind a
        // kernel holding the stream for twice that, so that their span is GPU time, not the
        // host's launch gaps (as `lookahead bench` times).
        let t = std::time::Instant::now();
        trial(name)?;
        dev.synchronize()?;
        let hold = (2.0 * t.elapsed().as_secs_f64()).clamp(2e-4, 5e-2);
        dev.hold_stream((hold * 1e9) as u64)?;
        let timer = dev.start_timer()?;
        for _ in 0..TIMED_RUNS {
            trial(name)?;
        }
        Ok(f64::from(timer.stop()?) / f64::from(TIMED_RUNS))
    })?;
    let mut guard = table().lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        // Forgotten meanwhile (forget_table): read the file again rather than overwrite it with
        // this one choice; unreadable now, the choice stands for this call only.
        *guard = Table::load(table_path()).ok();
    }
    if let Some(table) = guard.as_mut() {
        table.entries.insert(key, Entry { variant: name.to_string(), ms });
        table.save();
    }
    Ok(name)
}

/// The variant recorded for `key`: in the tuning table (when tuning), else in the committed one.
fn recorded(tuned: Option<&BTreeMap<String, Entry>>, shipped: &BTreeMap<String, Entry>, key: &str, v: &Variants) -> Option<&'static str> {
    tuned.and_then(|t| lookup(t, key, v)).or_else(|| lookup(shipped, key, v))
}

/// The variant an entry of `entries` records for `key`, if it is one of the family's.
fn lookup(entries: &BTreeMap<String, Entry>, key: &str, v: &Variants) -> Option<&'static str> {
    entries.get(key).and_then(|e| v.names.iter().copied().find(|n| *n == e.variant))
}

/// The committed choices (kernels::TUNED, kernels/tuned.json). An unreadable file is a bug of the
/// build, which `shipped_choices_name_known_variants` catches; at run time it counts as empty.
fn shipped() -> &'static BTreeMap<String, Entry> {
    static SHIPPED: OnceLock<BTreeMap<String, Entry>> = OnceLock::new();
    SHIPPED.get_or_init(|| serde_json::from_str(kernels::TUNED).unwrap_or_default())
}

/// The variant `LOOKAHEAD_VARIANT_<FAMILY>` names, if set; a name the family does not have is an
/// error listing those it has.
pub fn requested(v: &Variants) -> Result<Option<&'static str>> {
    let Some(asked) = super::kernel_variant(v.family) else { return Ok(None) };
    match v.names.iter().copied().find(|n| *n == asked) {
        Some(name) => Ok(Some(name)),
        None => Err(Error::Cuda(format!("LOOKAHEAD_VARIANT_{}={asked}: not a variant of this kernel family (known: {})", v.family.to_ascii_uppercase(), v.names.join(", ")))),
    }
}

/// The first variant with the least time, and every variant's time (ms) or error; the default's
/// error when every variant fails.
fn fastest(names: &'static [&'static str], mut time: impl FnMut(&'static str) -> Result<f64>) -> Result<(&'static str, BTreeMap<String, TrialResult>)> {
    let mut results = BTreeMap::new();
    let mut best: Option<(&'static str, f64)> = None;
    let mut first_error = None;
    for &name in names {
        match time(name).and_then(|ms| if ms.is_finite() { Ok(ms) } else { Err(Error::Cuda(format!("{name}: trial time {ms} ms"))) }) {
            Ok(ms) => {
                if best.is_none_or(|(_, b)| ms < b) {
                    best = Some((name, ms));
                }
                results.insert(name.to_string(), TrialResult::Ms(ms));
            }
            Err(e) => {
                results.insert(name.to_string(), TrialResult::Error(e.to_string()));
                first_error.get_or_insert(e);
            }
        }
    }
    match best {
        Some((name, _)) => Ok((name, results)),
        None => Err(first_error.unwrap_or_else(|| Error::Cuda("a kernel family with no variants".into()))),
    }
}

fn autotune() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LOOKAHEAD_AUTOTUNE").is_ok_and(|v| v == "1"))
}

fn table() -> &'static Mutex<Option<Table>> {
    static TABLE: OnceLock<Mutex<Option<Table>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(None))
}

/// Drops the table this process holds, so that the next choice reads the file again (for tools
/// and tests that edit it).
pub fn forget_table() {
    *table().lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// `LOOKAHEAD_TUNE_FILE`, else `tuned.json` in the kernel cache folder; None (choices kept in
/// memory only) when the kernel cache is off.
pub fn table_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LOOKAHEAD_TUNE_FILE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    match KernelCache::from_env() {
        KernelCache::Dir(d) => Some(d.join("tuned.json")),
        KernelCache::Off => None,
    }
}

/// A stable hash (FNV-1a, 64 bits) of what the family's kernels are built from: its sources, their
/// compile options and the shared headers (as the kernel cache keys its CUBINs), as 16 hex digits;
/// worked out once per family.
fn sources_hash(v: &Variants) -> String {
    static HASHES: OnceLock<Mutex<BTreeMap<&'static str, String>>> = OnceLock::new();
    let mut hashes = HASHES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    hashes.entry(v.family).or_insert_with(|| hash_of(v.sources)).clone()
}

fn hash_of(sources: &[&KernelSource]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut add = |text: &str| {
        for b in text.bytes().chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for s in sources {
        add(s.name);
        add(s.code);
        s.options.iter().for_each(|o| add(o));
    }
    for (name, code) in kernels::compile::HEADERS {
        add(name);
        add(code);
    }
    format!("{h:016x}")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum TrialResult {
    Ms(f64),
    Error(String),
}

#[derive(Serialize, Deserialize)]
struct Entry {
    variant: String,
    /// Every variant's trial time in ms, or why it could not run.
    ms: BTreeMap<String, TrialResult>,
}

struct Table {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
}

impl Table {
    fn load(path: Option<PathBuf>) -> Result<Table> {
        let entries = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::Cuda(format!("reading the kernel tuning table {}: {e}", p.display())))?;
                serde_json::from_str(&text).map_err(|e| Error::Cuda(format!("the kernel tuning table {} is not a table of choices ({e}); delete it to tune again", p.display())))?
            }
            _ => BTreeMap::new(),
        };
        Ok(Table { path, entries })
    }

    /// Writes the table through a temporary file and a rename (processes tuning at once never
    /// read half a file; the last writer's table wins). A failure costs only the record: warned
    /// once, and the choice stands for this process.
    fn save(&self) {
        let Some(path) = &self.path else { return };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
            let written = serde_json::to_vec_pretty(&self.entries).map_err(std::io::Error::other).and_then(|bytes| std::fs::write(&tmp, bytes)).and_then(|()| std::fs::rename(&tmp, path));
            if written.is_err() {
                std::fs::remove_file(&tmp).ok();
            }
            written
        };
        if let Err(e) = write() {
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| eprintln!("warning: could not record kernel tuning choices in {}: {e}", path.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["default", "a", "b"];

    #[test]
    fn the_fastest_variant_wins_and_failures_are_recorded() {
        let (name, results) = fastest(NAMES, |n| match n {
            "default" => Ok(2.0),
            "a" => Err(Error::Cuda("a: too much shared memory".into())),
            _ => Ok(1.5),
        })
        .unwrap();
        assert_eq!(name, "b");
        assert!(matches!(results["default"], TrialResult::Ms(t) if t == 2.0));
        assert!(matches!(&results["a"], TrialResult::Error(e) if e.contains("shared memory")));
        // Ties keep the earlier variant (the default first).
        assert_eq!(fastest(NAMES, |_| Ok(1.0)).unwrap().0, "default");
        // A time that is not a number is a failed trial (JSON has no NaN).
        let (name, results) = fastest(NAMES, |n| Ok(if n == "default" { f64::NAN } else { 3.0 })).unwrap();
        assert_eq!(name, "a");
        assert!(matches!(&results["default"], TrialResult::Error(_)));
        // Nothing runs: the default's error.
        let e = fastest(NAMES, |n| Err(Error::Cuda(format!("{n} failed")))).unwrap_err();
        assert!(e.to_string().contains("default failed"), "{e}");
    }

    #[test]
    fn tables_round_trip_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("lookahead-tune-test-{}", std::process::id()));
        let path = dir.join("sub/tuned.json");
        let mut t = Table::load(Some(path.clone())).unwrap();
        assert!(t.entries.is_empty());
        let ms = BTreeMap::from([("default".to_string(), TrialResult::Ms(0.5)), ("a".to_string(), TrialResult::Error("no".into()))]);
        t.entries.insert("dev | fam 0 | m1".into(), Entry { variant: "a".into(), ms });
        t.save();
        let back = Table::load(Some(path.clone())).unwrap();
        assert_eq!(back.entries["dev | fam 0 | m1"].variant, "a");
        assert!(matches!(back.entries["dev | fam 0 | m1"].ms["default"], TrialResult::Ms(t) if t == 0.5));
        std::fs::write(&path, "[1, 2]").unwrap();
        let e = Table::load(Some(path.clone())).err().expect("a list is not a table");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn shipped_choices_name_known_variants() {
        let entries: BTreeMap<String, Entry> = serde_json::from_str(kernels::TUNED).expect("kernels/tuned.json is a table of choices");
        let families = [&crate::cuda::lora_linear::VARIANTS, &crate::cuda::flash_attention::HOPPER_VARIANTS, &crate::cuda::flash_attention_backward::HOPPER_VARIANTS, &crate::cuda::norm::VARIANTS];
        for (key, e) in &entries {
            let family = families.iter().find(|f| key.contains(&format!("| {} ", f.family))).unwrap_or_else(|| panic!("kernels/tuned.json: {key}: no tuned family"));
            assert!(family.names.contains(&e.variant.as_str()), "kernels/tuned.json: {key}: {} is not a variant of {}", e.variant, family.family);
        }
        // And a lookup finds only the family's own names.
        let v = &crate::cuda::lora_linear::VARIANTS;
        let table = BTreeMap::from([("k".to_string(), Entry { variant: "tma".into(), ms: BTreeMap::new() }), ("j".to_string(), Entry { variant: "ws".into(), ms: BTreeMap::new() })]);
        assert_eq!(lookup(&table, "k", v), Some("tma"));
        assert_eq!(lookup(&table, "j", v), None);
        assert_eq!(lookup(&table, "x", v), None);
        // The tuning table first, then the committed one.
        let shipped = BTreeMap::from([("k".to_string(), Entry { variant: "tma-pp".into(), ms: BTreeMap::new() }), ("s".to_string(), Entry { variant: "tma256".into(), ms: BTreeMap::new() })]);
        assert_eq!(recorded(Some(&table), &shipped, "k", v), Some("tma"));
        assert_eq!(recorded(Some(&table), &shipped, "s", v), Some("tma256"));
        assert_eq!(recorded(None, &shipped, "k", v), Some("tma-pp"));
        assert_eq!(recorded(None, &shipped, "x", v), None);
    }

    #[test]
    fn source_hashes_change_with_the_source() {
        static A: KernelSource = KernelSource { name: "f", code: "x", options: &[] };
        static B: KernelSource = KernelSource { name: "f", code: "y", options: &[] };
        static C: KernelSource = KernelSource { name: "f", code: "x", options: &["--ftz=true"] };
        assert_eq!(hash_of(&[&A]), hash_of(&[&A]));
        assert_ne!(hash_of(&[&A]), hash_of(&[&B]));
        assert_ne!(hash_of(&[&A, &B]), hash_of(&[&B, &A]));
        assert_ne!(hash_of(&[&A]), hash_of(&[&C]), "options count");
    }
}
