//! The buffer pool: storage buffers rounded up to size classes and reused across steps, with the
//! counts the memory plan is checked against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Device bytes the pool gives a request of `bytes` (what a buffer of that size really costs;
/// the memory plan rounds with it).
pub fn pooled_capacity(bytes: u64) -> u64 {
    bucket_size(bytes.max(16))
}

/// Rounds an allocation up so that buffers of similar sizes are shared across steps:
/// multiples of 256 bytes up to 64 KiB, then four size classes per power of two (≤ 19% waste).
pub(super) fn bucket_size(bytes: u64) -> u64 {
    if bytes <= 65536 {
        return bytes.div_ceil(256) * 256;
    }
    let top = 63 - bytes.leading_zeros() as u64; // 2^top <= bytes
    let step = 1u64 << (top - 2);
    bytes.div_ceil(step) * step
}

/// Live storage bytes and their high-water mark (see [`Gpu::storage_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageStats {
    pub live: u64,
    pub peak: u64,
    /// Textures that CPU adapters stage kernel operands in (`gpu::staging`), counted apart.
    pub staging_live: u64,
    pub staging_peak: u64,
}

/// Free buffers by (usage, size class), and the storage bytes on loan.
#[derive(Default)]
pub(crate) struct BufferPool {
    pub(super) free: HashMap<(u32, u64), Vec<wgpu::Buffer>>,
    pub(super) free_bytes: u64,
    pub(super) live_storage: u64,
    pub(super) peak_storage: u64,
}

impl BufferPool {
    pub(super) fn take(&mut self, bucket: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        let b = self.free.get_mut(&(usage.bits(), bucket))?.pop()?;
        self.free_bytes -= bucket;
        Some(b)
    }
}

/// A buffer on loan from the pool; returned to it when the last reference drops. Recorders
/// hold a reference to every buffer they bind until their submission, so a buffer is never
/// handed out again while recorded work that uses it is pending.
pub struct PooledBuffer {
    pub(super) buffer: Option<wgpu::Buffer>,
    pub(super) capacity: u64,
    pub(super) usage: wgpu::BufferUsages,
    pub(super) pool: Arc<Mutex<BufferPool>>,
}

impl PooledBuffer {
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("live buffer")
    }
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            let mut pool = self.pool.lock().unwrap();
            pool.free_bytes += self.capacity;
            if self.usage.contains(wgpu::BufferUsages::STORAGE) {
                pool.live_storage -= self.capacity;
            }
            pool.free
                .entry((self.usage.bits(), self.capacity))
                .or_default()
                .push(b);
        }
    }
}
