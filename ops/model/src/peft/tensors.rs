//! Host tensors as adapter files hold them, and PEFT's key names.

use std::borrow::Cow;

use super::*;

/// Element types: the engine's one enum (adapter files hold F32, BF16 or F16; eval's token
/// tensors are I64).
pub use engine::dtype::DType;

/// A tensor in host memory: little-endian element bytes, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        Self {
            dtype: DType::F32,
            shape,
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }

    /// Rounds to bf16 (round to nearest even, as torch's `.to(torch.bfloat16)`).
    pub fn from_f32_as_bf16(shape: Vec<usize>, data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        let bytes = data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        Self {
            dtype: DType::BF16,
            shape,
            bytes,
        }
    }

    pub fn from_i64(shape: Vec<usize>, data: &[i64]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        Self {
            dtype: DType::I64,
            shape,
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            // Exact for token ids and masks (|v| < 2^24).
            DType::I64 => self
                .bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            DType::U32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            DType::U8 => self.bytes.iter().map(|&b| b as f32).collect(),
        }
    }
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// What one adapter tensor is, from its PEFT key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKey<'a> {
    /// `lora_A` of the module: `[r, in_features]`.
    LoraA(&'a str),
    /// `lora_B` of the module: `[out_features, r]`.
    LoraB(&'a str),
    /// The trained full copy of a `modules_to_save` module's weight.
    Saved(&'a str),
}

impl<'a> AdapterKey<'a> {
    /// Parses `base_model.model.<module>.{lora_A.weight, lora_B.weight, weight}`.
    pub fn parse(key: &'a str) -> Option<Self> {
        let rest = key.strip_prefix(KEY_PREFIX)?;
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            Some(AdapterKey::LoraA(m))
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            Some(AdapterKey::LoraB(m))
        } else {
            rest.strip_suffix(".weight").map(AdapterKey::Saved)
        }
    }

    pub fn module(&self) -> &'a str {
        match self {
            AdapterKey::LoraA(m) | AdapterKey::LoraB(m) | AdapterKey::Saved(m) => m,
        }
    }
}

/// `base_model.model.<module>.lora_A.weight`.
pub fn lora_a_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_A.weight")
}

/// `base_model.model.<module>.lora_B.weight`.
pub fn lora_b_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.weight")
}

/// `base_model.model.<module>.weight`: a modules_to_save copy.
pub fn saved_module_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.weight")
}
