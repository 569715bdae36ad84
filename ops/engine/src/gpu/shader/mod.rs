//! WGSL modules: every kernel's source is composed from the files under `shaders/` by one
//! preprocessor ([`preprocess`]: `#include`, `#feature`, `#if`), and identified by the hash of
//! the text it composes to.
//!
//! ```ignore
//! let shader = Shader::compose("matmul", &["NF4", "TEXTURES"])?;  // memoized per (path, features)
//! let kernel = gpu.kernel(&shader, "matmul_workgroup", &[("BM", 64.0)])?;
//! // a kernel generated in Rust: the composed module plus generated WGSL, memoized by its key
//! let shader = Shader::generated("attention/sg_forward", &features, &key, || subgroup_forward(&shape))?;
//! ```
//! Shared modules live in `shaders/lib/` (`staging`: the linear-texture address, `dispatch`:
//! the flat index of a 2-D dispatch, `nf4`: bitsandbytes' code values) and `gen/` names modules
//! written by Rust from the tables the CPU references use (`gen/nf4_codes`), so each concept
//! has one definition. [`all_variants`] lists every module the kernels can ask for; a CPU-only
//! test validates each with naga, so a broken variant fails in `cargo test`, not on first use
//! on someone's GPU.

mod preprocess;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// A composed WGSL module (cheap to clone: the text is shared).
#[derive(Clone, Debug)]
pub struct Shader(Arc<Composed>);

#[derive(Debug)]
struct Composed {
    label: String,
    source: String,
    hash: u128,
}

impl Shader {
    fn new(label: String, source: String) -> Shader {
        let digest = Sha256::digest(source.as_bytes());
        let hash = u128::from_le_bytes(digest[..16].try_into().unwrap());
        Shader(Arc::new(Composed {
            label,
            source,
            hash,
        }))
    }

    /// `path[FEATURE,...]` (plus `+key` for generated code): for labels, errors and timings.
    pub fn label(&self) -> &str {
        &self.0.label
    }

    /// The composed WGSL.
    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// SHA-256 of the source, truncated: what the engine caches modules and pipelines by.
    pub fn hash(&self) -> u128 {
        self.0.hash
    }

    /// `shaders/<path>.wgsl` with `features` on (memoized).
    pub fn compose(path: &str, features: &[&str]) -> Result<Shader> {
        let label = label(path, features);
        memoized(&label, || {
            let source = preprocess::preprocess(path, features, &lookup)?;
            Ok(Shader::new(label.clone(), source))
        })
    }

    /// `shaders/<path>.wgsl` with `features` on, followed by the WGSL that `generate` writes
    /// (a kernel generated in Rust, e.g. fully unrolled for one shape). `key` must name
    /// everything the generated text depends on: the result is memoized by it.
    pub fn generated(
        path: &str,
        features: &[&str],
        key: &impl Debug,
        generate: impl FnOnce() -> String,
    ) -> Result<Shader> {
        let label = format!("{}+{key:?}", label(path, features));
        memoized(&label, || {
            let mut source = preprocess::preprocess(path, features, &lookup)?;
            source.push_str(&generate());
            Ok(Shader::new(label.clone(), source))
        })
    }

    /// A module written inline (benchmarks, probes): preprocessed like the files, so it may
    /// `#include` the shared modules. Not memoized.
    pub fn inline(label: &str, text: &str) -> Result<Shader> {
        let owned = text.to_string();
        let lookup_inline = |name: &str| {
            if name == label {
                Some(Cow::Owned(owned.clone()))
            } else {
                lookup(name)
            }
        };
        let source = preprocess::preprocess(label, &[], &lookup_inline)?;
        Ok(Shader::new(label.to_string(), source))
    }
}

fn label(path: &str, features: &[&str]) -> String {
    let mut sorted = features.to_vec();
    sorted.sort_unstable();
    format!("{path}[{}]", sorted.join(","))
}

/// The one cache of composed modules (composition is string work; kernels are recorded per
/// layer and step, so it is done once per variant).
fn memoized(label: &str, make: impl FnOnce() -> Result<Shader>) -> Result<Shader> {
    static CACHE: OnceLock<Mutex<HashMap<String, Shader>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(shader) = cache.lock().unwrap().get(label) {
        return Ok(shader.clone());
    }
    let shader = make().with_context(|| format!("composing shader {label}"))?;
    cache
        .lock()
        .unwrap()
        .insert(label.to_string(), shader.clone());
    Ok(shader)
}

macro_rules! shader_files {
    ($($path:literal),* $(,)?) => {
        /// Every file under `shaders/` (path without `.wgsl`, text), embedded in the binary.
        const FILES: &[(&str, &str)] = &[
            $(($path, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shaders/", $path, ".wgsl")))),*
        ];
    };
}

shader_files!(
    "lib/bf16",
    "lib/dispatch",
    "lib/gelu",
    "lib/nf4",
    "lib/rows_split",
    "lib/staging",
    "accumulate",
    "activation",
    "adamw",
    "attention/common",
    "attention/forward",
    "attention/delta",
    "attention/dq",
    "attention/dkdv",
    "attention/masked_rows",
    "attention/sg_inputs",
    "attention/sg_backward",
    "attention/sg_forward",
    "attention/sg_dq",
    "attention/sg_dkdv",
    "bench",
    "cast",
    "cross_entropy/common",
    "cross_entropy/stats",
    "cross_entropy/finish",
    "cross_entropy/dlogits",
    "decode_attention",
    "decode_qk",
    "embedding",
    "greedy",
    "lora",
    "matmul",
    "matmul_rows_group",
    "nf4",
    "norm",
    "patch",
    "pool",
    "reduce",
    "rope",
    "row_blocks",
);

/// The text of module `name`: a file under `shaders/`, or a `gen/` module written from Rust.
fn lookup(name: &str) -> Option<Cow<'static, str>> {
    if name == "gen/nf4_codes" {
        return Some(Cow::Owned(nf4_codes()));
    }
    FILES
        .iter()
        .find(|(path, _)| *path == name)
        .map(|(_, text)| Cow::Borrowed(*text))
}

/// bitsandbytes' 16 NF4 code values as WGSL constants, from the table the CPU reference uses
/// (`crate::reference::nf4::NF4_CODE`): `NF4_0`..`NF4_15` and the array `NF4_CODES`. Printed
/// through f64, whose shortest round-trip form of an f32 value is exact in f32, so the
/// shader's constants are the table's bits.
fn nf4_codes() -> String {
    use std::fmt::Write;
    let codes = crate::reference::nf4::NF4_CODE;
    let mut s = String::from("// generated from ops/engine/src/reference/nf4.rs NF4_CODE\n");
    for (i, c) in codes.iter().enumerate() {
        writeln!(s, "const NF4_{i}: f32 = {:?};", *c as f64).unwrap();
    }
    let names: Vec<String> = (0..codes.len()).map(|i| format!("NF4_{i}")).collect();
    writeln!(s, "const NF4_CODES = array<f32, 16>({});", names.join(", ")).unwrap();
    s
}

/// Every module the kernels compose, with the entry points each is used with: the list the
/// validation test walks. Each kernel family contributes its own (`kernels::*::variants`), so
/// a new variant is listed where it is chosen.
pub fn all_variants() -> Result<Vec<(Shader, Vec<&'static str>)>> {
    crate::gpu::kernels::shader_variants()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates `shader` as wgpu would (every capability on: the adapter decides
    /// which features exist, naga whether the text is valid WGSL) and checks its entry points.
    fn validate(shader: &Shader, entries: &[&str]) -> Result<()> {
        let module = naga::front::wgsl::parse_str(shader.source()).map_err(|e| {
            anyhow::anyhow!("{}: {}", shader.label(), e.emit_to_string(shader.source()))
        })?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .subgroup_stages(naga::valid::ShaderStages::all())
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .map_err(|e| {
            anyhow::anyhow!("{}: {}", shader.label(), e.emit_to_string(shader.source()))
        })?;
        for entry in entries {
            anyhow::ensure!(
                module.entry_points.iter().any(|e| e.name == *entry),
                "{}: no entry point `{entry}`",
                shader.label()
            );
        }
        Ok(())
    }

    #[test]
    fn every_kernel_variant_is_valid_wgsl() {
        let variants = all_variants().unwrap();
        assert!(
            variants.len() > 40,
            "only {} variants listed",
            variants.len()
        );
        let failures: Vec<String> = variants
            .iter()
            .filter_map(|(s, entries)| validate(s, entries).err().map(|e| format!("{e:#}")))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn every_shader_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "wgsl") {
                    let rel = path.strip_prefix(&root).unwrap().with_extension("");
                    on_disk.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        for path in on_disk {
            assert!(
                FILES.iter().any(|(p, _)| *p == path),
                "shaders/{path}.wgsl is not in shader_files!"
            );
        }
    }

    #[test]
    fn nf4_constants_are_the_reference_table() {
        let module = naga::front::wgsl::parse_str(&nf4_codes()).unwrap();
        for (i, want) in crate::reference::nf4::NF4_CODE.iter().enumerate() {
            let name = format!("NF4_{i}");
            let (_, c) = module
                .constants
                .iter()
                .find(|(_, c)| c.name.as_deref() == Some(&name))
                .unwrap();
            let got = match module.global_expressions[c.init] {
                naga::Expression::Literal(naga::Literal::F32(v)) => v,
                naga::Expression::Literal(naga::Literal::AbstractFloat(v)) => v as f32,
                ref e => panic!("{name}: {e:?}"),
            };
            assert_eq!(got.to_bits(), want.to_bits(), "{name}");
        }
    }

    #[test]
    fn composition_is_memoized_and_hashed_by_content() {
        let a = Shader::compose("adamw", &["VEC4"]).unwrap();
        let b = Shader::compose("adamw", &["VEC4"]).unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let plain = Shader::compose("adamw", &[]).unwrap();
        assert_ne!(a.hash(), plain.hash());
        let err = Shader::compose("adamw", &["VEC8"]).unwrap_err();
        assert!(format!("{err:#}").contains("no feature `VEC8`"), "{err:#}");
    }
}
