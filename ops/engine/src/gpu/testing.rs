//! Helpers for kernel tests and benchmarks: fresh random data and error measures.

use std::sync::OnceLock;

use super::engine::{Gpu, GpuOptions};

/// A small deterministic generator (SplitMix64): tests print the seed so a failure reproduces.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }
    /// A seed that differs on every run (fresh inputs), from the clock and a counter.
    pub fn fresh_seed() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    /// Approximately standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-7);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
    pub fn vec_normal(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
    pub fn vec_uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// ‖got − want‖_F / ‖want‖_F over f32 or f64 values, summed in f64 (NaN or infinity anywhere
/// in `got` gives infinity, so poisoned outputs fail; a zero `want` needs a zero `got`). The
/// one definition every test compares with.
pub fn rel_frobenius<T: Copy + Into<f64>>(got: &[T], want: &[T]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let (g, w): (f64, f64) = (g.into(), w.into());
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g - w).powi(2);
        den += w.powi(2);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Relative error allowed for an f32 result that sums `terms` products: rounding grows like
/// √terms·ε for unbiased round-to-nearest, so a 262k-term vocabulary sum needs ~50× the slack
/// of a short one (measured on lavapipe: up to 8.7e-5 over 40 seeds at 262208 terms).
pub fn f32_sum_tolerance(terms: usize) -> f64 {
    (4.0 * (terms as f64).sqrt() * f32::EPSILON as f64).max(1e-5)
}

/// The process-wide GPU for tests (panics with the install hint when there is none).
pub fn test_gpu() -> &'static Gpu {
    Gpu::get().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A second engine whose largest binding is 4 KiB, so small tensors get chunked.
pub fn tiny_binding_gpu() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| {
        Gpu::new(GpuOptions {
            max_binding_bytes: Some(4096),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
    })
}

/// An engine forced to the other tiling strategy than the adapter's default, so both kernel
/// shapes are tested on every machine.
pub fn other_tiling_gpu() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| {
        let default = test_gpu().tiling();
        let other = match default {
            super::Tiling::Register => super::Tiling::Workgroup,
            super::Tiling::Workgroup => super::Tiling::Register,
        };
        Gpu::new(GpuOptions {
            tiling: Some(other),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
    })
}
