//! The caching allocator. Device memory comes from cuMemAlloc in size classes; a freed block goes
//! back to its class's free list and the next request of that class takes it without a driver
//! call. Reuse is immediate: safe because all work is ordered on the device's one stream (a kernel
//! queued after the free runs after every earlier user of the block). Memory returns to the driver
//! only through `empty_cache` (or when an allocation fails and the cache is emptied to retry), so a
//! steady-state loop makes no cuMemAlloc/cuMemFree calls at all, which `MemoryStats::alloc_calls`
//! lets tests check.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{result, sys, DriverError};

use super::device::{lock, CudaDevice};
use super::driver_error;
use crate::{Error, Result};

/// The bytes actually reserved for a request of `bytes`: at least 512; then 4 classes per power
/// of two below 1 MiB (<= 25% rounding) and 16 from 1 MiB up (<= 6.25%), so that similar sizes
/// share blocks while large weights waste little.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= 512 {
        return 512;
    }
    let log2 = (usize::BITS - 1 - (bytes - 1).leading_zeros()) as usize; // floor(log2(bytes - 1)) >= 9
    let step_log2 = if bytes <= 1 << 20 { log2 - 2 } else { log2 - 4 };
    let step = 1usize << step_log2;
    bytes.div_ceil(step) * step
}

/// Counters of one device's allocator, in bytes of size classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by live blocks (tensors and scratch).
    pub in_use: usize,
    pub peak_in_use: usize,
    /// Obtained from the driver and not yet returned: in use + cached.
    pub reserved: usize,
    pub peak_reserved: usize,
    /// cuMemAlloc calls so far (a steady-state loop adds none).
    pub alloc_calls: u64,
    /// cuMemFree calls so far.
    pub free_calls: u64,
    /// Blocks waiting in the free lists.
    pub cached_blocks: usize,
}

#[derive(Default)]
pub(super) struct Pool {
    free: HashMap<usize, Vec<u64>>,
    stats: MemoryStats,
}

impl Pool {
    fn take(&mut self, class: usize) -> Option<u64> {
        let ptr = self.free.get_mut(&class)?.pop()?;
        self.stats.cached_blocks -= 1;
        self.note_in_use(class);
        Some(ptr)
    }
    fn note_in_use(&mut self, class: usize) {
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
    }
}

/// A block of device memory from the pool; it goes back to the pool when dropped.
pub struct CudaBlock {
    dev: Arc<CudaDevice>,
    ptr: u64,
    class: usize,
}

impl CudaBlock {
    /// Device address (0 for an empty block).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Usable bytes (the size class, at least what was asked for).
    pub fn capacity(&self) -> usize {
        self.class
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

impl Drop for CudaBlock {
    fn drop(&mut self) {
        if self.class == 0 {
            return;
        }
        let mut pool = lock(&self.dev.pool);
        pool.free.entry(self.class).or_default().push(self.ptr);
        pool.stats.cached_blocks += 1;
        pool.stats.in_use -= self.class;
    }
}

impl CudaDevice {
    /// At least `bytes` bytes of uninitialised device memory, from the pool when it has a block of
    /// the size class. Out of memory: the cache is emptied and the allocation retried once; then
    /// the error names the request and the free memory.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<CudaBlock> {
        if bytes == 0 {
            return Ok(CudaBlock { dev: self.clone(), ptr: 0, class: 0 });
        }
        let class = size_class(bytes);
        if let Some(ptr) = lock(&self.pool).take(class) {
            return Ok(CudaBlock { dev: self.clone(), ptr, class });
        }
        let ptr = match self.driver_alloc(class) {
            Ok(p) => p,
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                self.empty_cache()?;
                match self.driver_alloc(class) {
                    Ok(p) => p,
                    Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => return Err(self.oom(bytes, class)),
                    Err(e) => return Err(driver_error(format!("allocating {class} bytes on cuda:{}", self.ordinal()), e)),
                }
            }
            Err(e) => return Err(driver_error(format!("allocating {class} bytes on cuda:{}", self.ordinal()), e)),
        };
        let mut pool = lock(&self.pool);
        pool.stats.alloc_calls += 1;
        pool.stats.reserved += class;
        pool.stats.peak_reserved = pool.stats.peak_reserved.max(pool.stats.reserved);
        pool.note_in_use(class);
        Ok(CudaBlock { dev: self.clone(), ptr, class })
    }

    fn driver_alloc(&self, class: usize) -> std::result::Result<u64, DriverError> {
        self.ctx_bind_raw()?;
        // SAFETY: a plain allocation in this device's context (bound above).
        unsafe { result::malloc_sync(class) }
    }

    fn ctx_bind_raw(&self) -> std::result::Result<(), DriverError> {
        self.context().bind_to_thread()
    }

    fn oom(&self, bytes: usize, class: usize) -> Error {
        let stats = self.memory_stats();
        let (free, total) = self.mem_get_info().unwrap_or((0, 0));
        Error::Cuda(format!(
            "out of memory on cuda:{}: requested {bytes} bytes ({class} with size-class rounding); the driver reports {free} bytes free of {total}; live tensors hold {} bytes and the cache was emptied before retrying",
            self.ordinal(),
            stats.in_use
        ))
    }

    pub fn memory_stats(&self) -> MemoryStats {
        lock(&self.pool).stats
    }

    /// Restarts the peak counters from the current values.
    pub fn reset_peak_memory_stats(&self) {
        let mut pool = lock(&self.pool);
        pool.stats.peak_in_use = pool.stats.in_use;
        pool.stats.peak_reserved = pool.stats.reserved;
    }

    /// Returns every cached (free) block to the driver, after the queued work has finished.
    pub fn empty_cache(&self) -> Result<()> {
        let blocks: Vec<(usize, Vec<u64>)> = lock(&self.pool).free.drain().collect();
        if blocks.is_empty() {
            return Ok(());
        }
        self.synchronize()?;
        self.bind()?;
        let mut freed = 0usize;
        let mut calls = 0u64;
        let mut first_err = None;
        for (class, ptrs) in blocks {
            for ptr in ptrs {
                // SAFETY: the block came from cuMemAlloc in this context, no tensor holds it (it
                // was in the free list) and the stream has drained.
                match unsafe { result::free_sync(ptr) } {
                    Ok(()) => {
                        freed += class;
                        calls += 1;
                    }
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
        }
        let mut pool = lock(&self.pool);
        pool.stats.reserved -= freed;
        pool.stats.free_calls += calls;
        pool.stats.cached_blocks = pool.free.values().map(Vec::len).sum();
        match first_err {
            Some(e) => Err(driver_error(format!("freeing cached memory on cuda:{}", self.ordinal()), e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_within_bounds() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 640);
        assert_eq!(size_class(1024), 1024);
        assert_eq!(size_class(1025), 1280);
        for bytes in [3usize, 700, 4097, 65_537, 1 << 20, (1 << 20) + 1, 5_000_000, 123_456_789, 3 << 30] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            let bound = if bytes <= 1 << 20 { bytes / 4 } else { bytes / 16 };
            assert!(c - bytes <= bound.max(512), "{bytes} -> {c}");
            assert_eq!(size_class(c), c, "classes are fixed points");
        }
    }
}
