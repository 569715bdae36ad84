//! Matmul autotuning: which tiling of the matmul kernel runs a product of a given shape class
//! fastest on this adapter, measured rather than guessed, so that a new GPU gets tuned kernels
//! without code changes.
//!
//! Each kernel path has a few candidate tilings ([`candidates`]): the workgroup-tiled kernel
//! (GPUs) its block, depth and per-invocation tiles; the subgroup and unrolled register kernels
//! (CPU adapters) their register tiles. The first product of a shape class — log2 buckets of
//! M, N and K, the transposes and the operand kinds ([`ShapeClass`]) — times every candidate on
//! scratch operands of that product's size and keeps the fastest in a small JSON file per
//! adapter and driver ([`TuneTable`]), under `$RUNNER_TUNE_DIR`, else
//! `$XDG_CACHE_HOME/runner/gpu-tune`, else `~/.cache/runner/gpu-tune`. Later runs read it.
//!
//! Tuning at first use is on by default on GPUs and off on CPU adapters, where timing a large
//! product takes seconds (`RUNNER_AUTOTUNE=1` / `0` overrides); `runner gpu --tune` tunes the
//! products of a model config ahead of time on any adapter. The scratch operands live outside
//! the buffer pool and are freed at once, so they never count in the memory plan's buffers.
//! The rows kernel (decoding, M <= 8) and attention have one shape each and are not tuned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One tiling of the matmul kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kernel", rename_all = "snake_case")]
pub enum MatmulTiling {
    /// `matmul_workgroup`: a BM×BN block per workgroup, BK-deep slices in workgroup memory,
    /// WTM×WTN outputs per invocation.
    Workgroup {
        bm: u32,
        bn: u32,
        bk: u32,
        wtm: u32,
        wtn: u32,
    },
    /// `matmul_subgroup` (8-lane CPU adapters): a TM×TN register tile per lane.
    Subgroup { tm: u32, tn: u32 },
    /// `matmul_register_unrolled` (other CPU adapters): a TM×TN register tile per invocation.
    Register { tm: u32, tn: u32 },
}

impl MatmulTiling {
    /// The kernel path this tiling belongs to.
    pub fn path(self) -> KernelPath {
        match self {
            MatmulTiling::Workgroup { .. } => KernelPath::Workgroup,
            MatmulTiling::Subgroup { .. } => KernelPath::Subgroup,
            MatmulTiling::Register { .. } => KernelPath::Register,
        }
    }
}

impl std::fmt::Display for MatmulTiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatmulTiling::Workgroup {
                bm,
                bn,
                bk,
                wtm,
                wtn,
            } => write!(f, "workgroup {bm}x{bn}x{bk} / {wtm}x{wtn}"),
            MatmulTiling::Subgroup { tm, tn } => write!(f, "subgroup {tm}x{tn}"),
            MatmulTiling::Register { tm, tn } => write!(f, "register {tm}x{tn}"),
        }
    }
}

/// The three matmul kernels a product can run on (besides the rows kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    Workgroup,
    Subgroup,
    Register,
}

/// The candidate tilings of a path, the default first. Workgroup: at most 256 invocations,
/// 16 KiB of workgroup memory (WebGPU's minimum limits) and 64 accumulators per invocation
/// (the kernel's array). Subgroup: TM a multiple of 8, TN of 4. Register: multiples of 4 up to 16.
pub fn candidates(path: KernelPath) -> Vec<MatmulTiling> {
    match path {
        KernelPath::Workgroup => [
            (64, 64, 16, 4, 4),
            (128, 64, 16, 8, 4),
            (64, 128, 16, 4, 8),
            (128, 128, 8, 8, 8),
            (32, 64, 16, 2, 4),
        ]
        .into_iter()
        .map(|(bm, bn, bk, wtm, wtn)| MatmulTiling::Workgroup {
            bm,
            bn,
            bk,
            wtm,
            wtn,
        })
        .collect(),
        KernelPath::Subgroup => [(32, 8), (16, 8), (64, 4), (32, 4)]
            .into_iter()
            .map(|(tm, tn)| MatmulTiling::Subgroup { tm, tn })
            .collect(),
        KernelPath::Register => [(8, 16), (8, 8), (16, 8), (4, 16)]
            .into_iter()
            .map(|(tm, tn)| MatmulTiling::Register { tm, tn })
            .collect(),
    }
}

/// What tiling choices are keyed by: log2 buckets of M, N, K (a product of 1000 and one of
/// 1024 rows tune alike), the transposes, and the operand features (vec4, NF4, bf16, f16).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShapeClass {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub trans_a: bool,
    pub trans_b: bool,
    pub operands: String,
}

impl ShapeClass {
    pub fn new(m: u32, n: u32, k: u32, trans_a: bool, trans_b: bool, operands: &[&str]) -> Self {
        ShapeClass {
            m: bucket(m),
            n: bucket(n),
            k: bucket(k),
            trans_a,
            trans_b,
            operands: operands.join("+"),
        }
    }

    /// The table key: e.g. `m2^11 n2^13 k2^12 b' [VEC4+NF4]`.
    pub fn key(&self) -> String {
        format!(
            "m2^{} n2^{} k2^{} {}{}[{}]",
            self.m,
            self.n,
            self.k,
            if self.trans_a { "a' " } else { "" },
            if self.trans_b { "b' " } else { "" },
            self.operands
        )
    }
}

/// ceil(log2(x)), at least 0.
fn bucket(x: u32) -> u32 {
    x.max(1).next_power_of_two().trailing_zeros()
}

/// One tuned class: the tiling kept and what every candidate measured (seconds).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TunedEntry {
    pub tiling: MatmulTiling,
    pub times: Vec<(MatmulTiling, f64)>,
}

/// The tuned classes of one adapter and driver (one file).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TuneTable {
    pub adapter: String,
    pub driver: String,
    pub classes: BTreeMap<String, TunedEntry>,
    /// Cooperative-matrix configurations (`8x8 f32/f32`, ...) a run on this adapter and driver
    /// checked against the reference: only these are ever selected.
    #[serde(default)]
    pub coop_verified: std::collections::BTreeSet<String>,
}

impl TuneTable {
    /// The table in `path`; an empty one if the file does not exist. A file that does not parse
    /// (another version's, or damaged) is ignored with a warning rather than failing the run:
    /// tuning only ever changes speed.
    pub fn load(path: &Path) -> TuneTable {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "warning: ignoring the kernel tuning file {} ({e}); it will be rewritten",
                    path.display()
                );
                TuneTable::default()
            }),
            Err(_) => TuneTable::default(),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the tuning folder {}", dir.display()))?;
        }
        let json = serde_json::to_vec_pretty(self)?;
        op_api::atomic_file::write(path, &json)
            .with_context(|| format!("writing the kernel tuning file {}", path.display()))
    }

    /// The tiling tuned for `class` on `path`'s kernel (a table written under another forced
    /// path, e.g. a test's, does not apply).
    pub fn get(&self, class: &ShapeClass, path: KernelPath) -> Option<MatmulTiling> {
        self.classes
            .get(&class.key())
            .map(|e| e.tiling)
            .filter(|t| t.path() == path)
    }

    /// Records the measured `times` of `class` and keeps the fastest.
    pub fn insert(&mut self, class: &ShapeClass, times: Vec<(MatmulTiling, f64)>) -> MatmulTiling {
        let tiling = fastest(&times).expect("at least one candidate");
        self.classes
            .insert(class.key(), TunedEntry { tiling, times });
        tiling
    }
}

/// The candidate with the least time (the first of equals: candidates list the default first).
pub fn fastest(times: &[(MatmulTiling, f64)]) -> Option<MatmulTiling> {
    times
        .iter()
        .fold(
            None,
            |best: Option<(MatmulTiling, f64)>, &(t, s)| match best {
                Some((_, b)) if b <= s => best,
                _ => Some((t, s)),
            },
        )
        .map(|(t, _)| t)
}

/// The folder of the tuning files (see the module docs).
pub fn tune_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    env("RUNNER_TUNE_DIR")
        .map(PathBuf::from)
        .or_else(|| env("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("runner/gpu-tune")))
        .or_else(|| env("HOME").map(|d| PathBuf::from(d).join(".cache/runner/gpu-tune")))
}

/// The tuning file of an adapter and driver in `dir`: their names with anything but letters,
/// digits, '.', '-' and '_' turned into '_'.
pub fn tune_file(dir: &Path, info: &wgpu::AdapterInfo) -> PathBuf {
    let raw = format!(
        "{}-{:?}-{}-{}",
        info.name, info.backend, info.driver, info.driver_info
    );
    let slug: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            _ => '_',
        })
        .collect();
    dir.join(format!("{slug}.json"))
}

/// Whether products tune themselves at first use: `RUNNER_AUTOTUNE` = 1 / 0, else on GPUs only.
pub fn autotune_default(device_type: wgpu::DeviceType) -> bool {
    match std::env::var("RUNNER_AUTOTUNE").ok().as_deref() {
        Some("1") | Some("true") => true,
        Some("0") | Some("false") => false,
        _ => device_type != wgpu::DeviceType::Cpu,
    }
}

/// A product to tune ahead of time: `C[M,N] = op(A)·op(B)`, B f32 or an NF4 weight.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneShape {
    /// What the product is (e.g. `text mlp down, forward`).
    pub label: String,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub trans_a: bool,
    pub trans_b: bool,
    /// B is an NF4 weight.
    pub nf4: bool,
    /// B is a bf16 weight (a dense bf16 checkpoint kept as stored).
    pub bf16_b: bool,
}

/// The tuning state of one device: its table, where it is saved, and whether first uses tune.
#[derive(Default)]
pub struct Tuner {
    pub table: TuneTable,
    pub file: Option<PathBuf>,
    pub auto: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_bucket_by_powers_of_two() {
        let a = ShapeClass::new(1000, 2560, 10240, false, true, &["VEC4"]);
        let b = ShapeClass::new(1024, 2049, 8193, false, true, &["VEC4"]);
        assert_eq!(a.key(), "m2^10 n2^12 k2^14 b' [VEC4]");
        assert_eq!(b.key(), "m2^10 n2^12 k2^14 b' [VEC4]");
        let c = ShapeClass::new(1025, 2560, 10240, false, true, &["VEC4"]);
        assert_ne!(a.key(), c.key());
        assert_ne!(
            a.key(),
            ShapeClass::new(1000, 2560, 10240, false, true, &["VEC4", "NF4"]).key()
        );
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(3), 2);
    }

    #[test]
    fn the_fastest_candidate_is_kept_and_the_table_round_trips() {
        let c = candidates(KernelPath::Workgroup);
        let times = vec![(c[0], 3.0), (c[1], 1.5), (c[2], 1.5), (c[3], 2.0)];
        assert_eq!(fastest(&times), Some(c[1]));
        let mut table = TuneTable {
            adapter: "test adapter".into(),
            driver: "test driver".into(),
            ..Default::default()
        };
        let class = ShapeClass::new(512, 512, 512, false, false, &[]);
        assert_eq!(table.insert(&class, times), c[1]);
        assert_eq!(table.get(&class, KernelPath::Workgroup), Some(c[1]));
        // a tiling of another path is not applied
        assert_eq!(table.get(&class, KernelPath::Subgroup), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.json");
        table.save(&path).unwrap();
        assert_eq!(TuneTable::load(&path), table);
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(TuneTable::load(&path), TuneTable::default());
    }

    #[test]
    fn candidates_respect_the_kernels_limits() {
        for t in candidates(KernelPath::Workgroup) {
            let MatmulTiling::Workgroup {
                bm,
                bn,
                bk,
                wtm,
                wtn,
            } = t
            else {
                unreachable!()
            };
            assert!((bm / wtm) * (bn / wtn) <= 256, "{t}: invocations");
            assert!((bm * bk + bk * bn) * 4 <= 16384, "{t}: workgroup memory");
            assert!(wtm * wtn <= 64, "{t}: accumulators");
            assert!(bm % wtm == 0 && bn % wtn == 0, "{t}");
        }
        for t in candidates(KernelPath::Subgroup) {
            let MatmulTiling::Subgroup { tm, tn } = t else {
                unreachable!()
            };
            assert!(tm % 8 == 0 && tn % 4 == 0 && (8..=128).contains(&tm) && tn <= 16);
        }
        for t in candidates(KernelPath::Register) {
            let MatmulTiling::Register { tm, tn } = t else {
                unreachable!()
            };
            assert!(tm % 4 == 0 && tn % 4 == 0 && tm <= 16 && tn <= 16);
        }
    }

    #[test]
    fn tuning_files_are_named_by_adapter_and_driver() {
        let info = wgpu::AdapterInfo {
            name: "NVIDIA H100 80GB HBM3".into(),
            vendor: 0x10de,
            device: 0x2330,
            device_type: wgpu::DeviceType::DiscreteGpu,
            driver: "NVIDIA".into(),
            driver_info: "580.159.04".into(),
            backend: wgpu::Backend::Vulkan,
            ..test_info()
        };
        let f = tune_file(Path::new("/t"), &info);
        assert_eq!(
            f,
            Path::new("/t/NVIDIA_H100_80GB_HBM3-Vulkan-NVIDIA-580.159.04.json")
        );
    }

    fn test_info() -> wgpu::AdapterInfo {
        crate::gpu::testing::test_gpu().adapter_info().clone()
    }
}
