//! Kernel-level GPU time: between `CudaDevice::profile_begin` and `profile_end` every launch on
//! the device's stream is preceded by a timing event tagged with what it launches (the kernel's
//! name, or "cuBLASLt matmul", "cuDNN convolution", "memset", "memcpy"). The stream runs its work
//! in order, so the time from one mark to the next is the GPU time of the work the first one
//! tags, including any idle time while the host had not queued the next launch yet: profile a
//! batch queued behind `hold_stream` (as `lookahead bench --profile` does) to leave that out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use cudarc::driver::{CudaEvent, CudaFunction};

use super::device::lock;

/// GPU time of one kernel (or library call) over a profiled window.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KernelTime {
    pub name: String,
    /// Milliseconds, summed over its launches.
    pub ms: f64,
    pub launches: usize,
}

/// The marks of a device's profiling window and the names of its loaded kernels.
#[derive(Default)]
pub(super) struct Profiler {
    /// Checked on every launch: no lock and no lookup while not profiling.
    active: AtomicBool,
    marks: Mutex<Vec<(String, CudaEvent)>>,
    /// Kernel handle (CUfunction address) -> name, filled as `CudaDevice::function` loads them.
    names: Mutex<HashMap<usize, String>>,
}

impl Profiler {
    pub(super) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub(super) fn begin(&self) {
        lock(&self.marks).clear();
        self.active.store(true, Ordering::Relaxed);
    }

    /// Ends the window: its marks, in launch order.
    pub(super) fn end(&self) -> Vec<(String, CudaEvent)> {
        self.active.store(false, Ordering::Relaxed);
        std::mem::take(&mut *lock(&self.marks))
    }

    pub(super) fn push(&self, what: String, event: CudaEvent) {
        lock(&self.marks).push((what, event));
    }

    pub(super) fn register(&self, f: &CudaFunction, name: &str) {
        lock(&self.names).insert(f.cu_function() as usize, name.to_string());
    }

    pub(super) fn name_of(&self, f: &CudaFunction) -> String {
        lock(&self.names).get(&(f.cu_function() as usize)).cloned().unwrap_or_else(|| "(unnamed kernel)".to_string())
    }
}

/// Sums the time between consecutive marks per tag, in the order the tags first appear. `spans`
/// holds each mark's tag and the milliseconds until the next mark (or the window's end).
pub fn aggregate<'a>(spans: impl IntoIterator<Item = (&'a str, f64)>) -> Vec<KernelTime> {
    let mut out: Vec<KernelTime> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (name, ms) in spans {
        match index.get(name) {
            Some(&i) => {
                out[i].ms += ms;
                out[i].launches += 1;
            }
            None => {
                index.insert(name, out.len());
                out.push(KernelTime { name: name.to_string(), ms, launches: 1 });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_spans_per_tag_in_first_launch_order() {
        let got = aggregate([("gn_stats", 2.0), ("gn_finalize", 0.5), ("gn_apply", 3.0), ("gn_stats", 1.0), ("memset", 0.25)]);
        let want = [("gn_stats", 3.0, 2), ("gn_finalize", 0.5, 1), ("gn_apply", 3.0, 1), ("memset", 0.25, 1)];
        assert_eq!(got.len(), want.len());
        for (g, (name, ms, launches)) in got.iter().zip(want) {
            assert_eq!((g.name.as_str(), g.ms, g.launches), (name, ms, launches));
        }
        assert!(aggregate(std::iter::empty()).is_empty());
    }
}
