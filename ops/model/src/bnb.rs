//! bitsandbytes' serialized 4-bit state: the `weight.quant_state.bitsandbytes__nf4` JSON blob
//! (`QuantState.as_dict(packed=True)` → `pack_dict_to_tensor` = `json.dumps(...)` as UTF-8 bytes),
//! the companion key names, the `quant_storage` view of the packed bytes, and transformers'
//! rule for which Linear modules stay unquantized.

use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde::Deserialize;

/// Suffixes `Linear4bit._save_to_state_dict` appends to `P.weight`.
pub const ABSMAX: &str = ".absmax";
pub const QUANT_MAP: &str = ".quant_map";
pub const NESTED_ABSMAX: &str = ".nested_absmax";
pub const NESTED_QUANT_MAP: &str = ".nested_quant_map";
pub const QUANT_STATE_NF4: &str = ".quant_state.bitsandbytes__nf4";
pub const QUANT_STATE_FP4: &str = ".quant_state.bitsandbytes__fp4";

/// bitsandbytes `Linear4bit` default blocksize (transformers does not expose another).
pub const BLOCKSIZE: usize = 64;
/// `quantize_blockwise(absmax - offset, blocksize=256)` in double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The non-tensor part of a bitsandbytes `QuantState`, as packed into the JSON blob.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuantState {
    pub quant_type: String,
    pub blocksize: usize,
    /// The dtype of the weight that was quantized (`bfloat16`), which dequantization returns.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub nested_blocksize: Option<usize>,
    pub nested_dtype: Option<String>,
    pub nested_offset: Option<f64>,
}

impl QuantState {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_nested(&self) -> bool {
        self.nested_offset.is_some()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let s: QuantState =
            serde_json::from_slice(bytes).context("invalid bitsandbytes quant_state JSON")?;
        if s.is_nested() != s.nested_blocksize.is_some() {
            bail!("quant_state has only part of the nested (double-quant) fields");
        }
        Ok(s)
    }

    /// The JSON bytes exactly as `json.dumps` writes `QuantState.as_dict(packed=True)`'s
    /// non-tensor dict: keys in insertion order, `", "` / `": "` separators, Python float repr.
    pub fn to_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type,
            self.blocksize,
            self.dtype,
            shape.join(", ")
        );
        if let (Some(bs), Some(offset)) = (self.nested_blocksize, self.nested_offset) {
            s.push_str(&format!(
                ", \"nested_blocksize\": {bs}, \"nested_dtype\": \"{}\", \"nested_offset\": {}",
                self.nested_dtype.as_deref().unwrap_or("float32"),
                python_float_repr(offset)
            ));
        }
        s.push('}');
        s
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): shortest round-trip digits, fixed notation
/// for decimal exponents in [-4, 16), else `1.5e-07` style; integral values keep `.0`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{x:e}"); // shortest round-trip digits, e.g. "5.255126953125e-2"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// `bnb_4bit_quant_storage`: the dtype the packed uint8 bytes are viewed as
/// (`packed.view(quant_storage)` with shape `[bytes / itemsize, 1]`); the bytes are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantStorage {
    U8,
    I8,
    BF16,
    F16,
    F32,
}

impl QuantStorage {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim_start_matches("torch.") {
            "uint8" => QuantStorage::U8,
            "int8" => QuantStorage::I8,
            "bfloat16" => QuantStorage::BF16,
            "float16" => QuantStorage::F16,
            "float32" => QuantStorage::F32,
            other => bail!(
                "bnb_4bit_quant_storage `{other}` is not supported (use uint8, int8, bfloat16, float16 or float32)"
            ),
        })
    }

    pub fn torch_name(self) -> &'static str {
        match self {
            QuantStorage::U8 => "uint8",
            QuantStorage::I8 => "int8",
            QuantStorage::BF16 => "bfloat16",
            QuantStorage::F16 => "float16",
            QuantStorage::F32 => "float32",
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            QuantStorage::U8 => Dtype::U8,
            QuantStorage::I8 => Dtype::I8,
            QuantStorage::BF16 => Dtype::BF16,
            QuantStorage::F16 => Dtype::F16,
            QuantStorage::F32 => Dtype::F32,
        }
    }

    pub fn itemsize(self) -> usize {
        match self {
            QuantStorage::U8 | QuantStorage::I8 => 1,
            QuantStorage::BF16 | QuantStorage::F16 => 2,
            QuantStorage::F32 => 4,
        }
    }

    /// The stored shape of `packed_len` bytes: `[packed_len / itemsize, 1]`.
    pub fn shape(self, packed_len: usize) -> Result<Vec<usize>> {
        if !packed_len.is_multiple_of(self.itemsize()) {
            bail!(
                "{packed_len} packed bytes cannot be viewed as {} (itemsize {})",
                self.torch_name(),
                self.itemsize()
            );
        }
        Ok(vec![packed_len / self.itemsize(), 1])
    }
}

/// How `llm_int8_skip_modules` names match a module path: the rule of the transformers version
/// a run reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SkipRule {
    /// transformers 5 (`should_convert_module`, quantizers_utils.py): a pattern matching the
    /// path from the start up to a module boundary (as a regex), or a suffix of the path. What
    /// the golden fixtures pin (5.24): `vision_tower` alone matches no in-memory path
    /// (`model.vision_tower.…`).
    #[default]
    Boundary,
    /// transformers 4.x (`_replace_with_bnb_linear`, the guide's era): the module's own name is
    /// a listed name, or `name.` occurs anywhere in the path, or the path equals a name. So
    /// `vision_tower` skips every Linear under any `vision_tower` module. Names, not regexes.
    Contains,
}

impl SkipRule {
    pub fn parse(s: &str) -> Result<SkipRule> {
        match s {
            "boundary" => Ok(SkipRule::Boundary),
            "contains" => Ok(SkipRule::Contains),
            other => bail!(
                "expected \"boundary\" (transformers 5) or \"contains\" (transformers 4.x), got \"{other}\""
            ),
        }
    }

    /// Whether `pattern` skips the module at `module_path` (transformers' in-memory path).
    pub fn matches(self, module_path: &str, pattern: &str) -> Result<bool> {
        match self {
            SkipRule::Boundary => matches_skip_pattern(module_path, pattern),
            SkipRule::Contains => {
                let leaf = module_path.rsplit('.').next().unwrap_or(module_path);
                Ok(leaf == pattern
                    || module_path == pattern
                    || module_path.contains(&format!("{pattern}.")))
            }
        }
    }
}

/// transformers' `should_convert_module` (quantizers_utils.py): a module is skipped when a
/// pattern matches its path from the start up to a module boundary (as a regex), or when the
/// path ends with the pattern.
pub fn matches_skip_pattern(module_path: &str, pattern: &str) -> Result<bool> {
    if module_path.ends_with(pattern) {
        return Ok(true);
    }
    // Python: re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", name). Rust's regex has no lookaround,
    // so try every boundary position p (end, before a '.', after a '.') for a full match of name[..p].
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).with_context(|| {
        format!("llm_int8_skip_modules: `{pattern}` is not a valid regular expression")
    })?;
    let bytes = module_path.as_bytes();
    for p in 0..=bytes.len() {
        let boundary = p == bytes.len() || bytes[p] == b'.' || (p > 0 && bytes[p - 1] == b'.');
        if boundary && module_path.is_char_boundary(p) && re.is_match(&module_path[..p]) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 4.x's `(key + "." in current_key_name_str) or (key == current_key_name_str)`
    /// plus `name not in modules_to_not_convert`, against transformers 5's boundary rule.
    #[test]
    fn skip_rules_of_both_transformers_generations() {
        let path = "model.vision_tower.encoder.layers.0.mlp.fc1";
        let contains = |p: &str, pat: &str| SkipRule::Contains.matches(p, pat).unwrap();
        let boundary = |p: &str, pat: &str| SkipRule::Boundary.matches(p, pat).unwrap();
        assert!(contains(path, "vision_tower"));
        assert!(!boundary(path, "vision_tower"));
        assert!(contains(path, "fc1") && boundary(path, "fc1"));
        assert!(contains("lm_head", "lm_head") && boundary("lm_head", "lm_head"));
        // a name is not a prefix of another name: `mlp.fc` is not `mlp.fc1`
        assert!(!contains(path, "mlp.fc"));
        assert!(contains(path, "mlp") && !boundary(path, "mlp"));
        assert!(!contains(
            "model.language_model.layers.1.mlp.up_proj",
            "layers.11"
        ));
        assert_eq!(SkipRule::parse("contains").unwrap(), SkipRule::Contains);
        assert!(SkipRule::parse("regex").is_err());
    }

    #[test]
    fn python_repr_of_floats() {
        for (x, want) in [
            (0.05255126953125, "0.05255126953125"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-05, "1e-05"),
            (1.5e-07, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (f32::MAX as f64, "3.4028234663852886e+38"),
            (0.012345679104328156, "0.012345679104328156"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    /// The blob bitsandbytes 0.50.2 wrote for a [64, 128] bf16 weight (seen with the venv).
    #[test]
    fn quant_state_json_roundtrip() {
        let bnb = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 128], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05255126953125}"#;
        let s = QuantState::parse(bnb).unwrap();
        assert_eq!(s.numel(), 8192);
        assert_eq!(s.to_json().as_bytes(), &bnb[..]);
        let plain =
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, 5]}"#;
        assert_eq!(
            QuantState::parse(plain).unwrap().to_json().as_bytes(),
            &plain[..]
        );
    }

    #[test]
    fn skip_patterns_follow_transformers() {
        let m = |path, pat| matches_skip_pattern(path, pat).unwrap();
        assert!(m("lm_head", "lm_head"));
        assert!(m("model.vision_tower.encoder.layers.23.mlp.fc1", "fc1"));
        assert!(m("layer.1.attn", "layer.1"));
        assert!(!m("layer.11.attn", "layer.1"));
        assert!(m("layer.11.attn", "layer.*"));
        assert!(!m("model.mlp.gate_proj", "mlp.gate"));
        assert!(m(
            "model.vision_tower.encoder.layers.0.self_attn.q_proj",
            "model.vision_tower"
        ));
        assert!(!m(
            "model.language_model.layers.0.self_attn.q_proj",
            "model.vision_tower"
        ));
        assert!(matches_skip_pattern("x", "(").is_err());
    }

    #[test]
    fn storage_views() {
        assert_eq!(
            QuantStorage::parse("bfloat16")
                .unwrap()
                .shape(4096)
                .unwrap(),
            vec![2048, 1]
        );
        assert_eq!(
            QuantStorage::parse("uint8").unwrap().shape(4095).unwrap(),
            vec![4095, 1]
        );
        assert!(QuantStorage::BF16.shape(3).is_err());
        assert!(QuantStorage::parse("int4").is_err());
    }
}
