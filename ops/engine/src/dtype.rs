//! Element types: one enum for every tensor the runner holds, on the GPU (F32 and BF16 values,
//! U32 and U8 for packed integer data such as NF4 codes) and on the host (checkpoints and adapter
//! files hold F32, BF16 or F16 weights, and eval writes I64 token tensors beside them). Where only
//! a float type makes sense (a checkpoint's `torch_dtype`, a compute dtype), `model` names it
//! `FloatDtype` and [`DType::parse_float`] reads it.
//!
//! On the GPU, WGSL has no bf16, f16 in storage or u8: each is stored packed in `array<u32>`
//! (bf16: element 2i in the low half of word i, widened with `bitcast<f32>(h << 16)`; u8: byte
//! 4i+j in bits 8j..8j+8, the little-endian byte order of the host data).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    U32,
    U8,
}

impl DType {
    pub fn bits(self) -> usize {
        match self {
            DType::I64 => 64,
            DType::F32 | DType::U32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::U8 => 8,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.bits() / 8
    }

    /// Bytes for `n` elements in a GPU buffer, padded to whole u32 words.
    pub fn bytes_for(self, n: usize) -> u64 {
        ((n * self.bits()).div_ceil(32) * 4) as u64
    }

    /// Parses torch / transformers spellings of a float type (`bfloat16`, `torch.bfloat16`,
    /// `bf16`, ...).
    pub fn parse_float(s: &str) -> Result<Self> {
        match s.trim_start_matches("torch.") {
            "float32" | "f32" | "fp32" | "float" => Ok(DType::F32),
            "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            other => bail!("unknown float dtype `{other}` (expected bfloat16, float16 or float32)"),
        }
    }

    /// The short name tables print (`bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }

    /// torch's name (`bfloat16`), as bitsandbytes writes it in a quant state.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::U32 => "uint32",
            DType::U8 => "uint8",
        }
    }

    /// Rounds an f32 to this type and back, as torch casts: floats to nearest even, integers to
    /// the nearest value in range (torch truncates, but no caller rounds to an integer type).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            DType::I64 => x.round(),
            DType::U32 => x.round().clamp(0.0, u32::MAX as f32),
            DType::U8 => x.round().clamp(0.0, 255.0),
        }
    }

    /// A float type (a weight's), as opposed to integer data.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::I64 => safetensors::Dtype::I64,
            DType::U32 => safetensors::Dtype::U32,
            DType::U8 => safetensors::Dtype::U8,
        }
    }

    /// `None` for a safetensors type this enum does not name.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        Some(match d {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::U8 => DType::U8,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_safetensors_names_round_trip() {
        for (d, bytes) in [
            (DType::F32, 4),
            (DType::F16, 2),
            (DType::BF16, 2),
            (DType::I64, 8),
            (DType::U32, 4),
            (DType::U8, 1),
        ] {
            assert_eq!(d.size(), bytes);
            assert_eq!(d.bits(), d.to_safetensors().bitsize());
            assert_eq!(DType::from_safetensors(d.to_safetensors()), Some(d));
        }
        // GPU buffers hold whole u32 words: 3 bf16 take 8 bytes, 5 u8 take 8.
        assert_eq!(DType::BF16.bytes_for(3), 8);
        assert_eq!(DType::U8.bytes_for(5), 8);
        assert_eq!(DType::from_safetensors(safetensors::Dtype::F64), None);
    }

    #[test]
    fn torch_spellings_parse_and_round_as_torch_casts() {
        for (s, d) in [
            ("torch.bfloat16", DType::BF16),
            ("bf16", DType::BF16),
            ("float16", DType::F16),
            ("half", DType::F16),
            ("float32", DType::F32),
        ] {
            assert_eq!(DType::parse_float(s).unwrap(), d, "{s}");
            assert_eq!(DType::parse_float(d.torch_name()).unwrap(), d);
        }
        assert!(DType::parse_float("int64").is_err());
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: to even, 1.
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-11 is halfway between f16's 1 + 2^-10 and 1 + 2^-9: to even, 1 + 2^-9.
        assert_eq!(DType::F16.round(1.0 + 3.0 / 2048.0), 1.0 + 1.0 / 512.0);
        assert_eq!(DType::F32.round(0.1), 0.1);
    }
}
