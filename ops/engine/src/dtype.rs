//! Element types: one enum for every tensor the runner holds, on the GPU (F32 and BF16 values,
//! U32 and U8 for packed integer data such as NF4 codes) and on the host (adapter files hold F32,
//! BF16 or F16 weights, and eval writes I64 token tensors beside them).
//!
//! On the GPU, WGSL has no bf16, f16 in storage or u8: each is stored packed in `array<u32>`
//! (bf16: element 2i in the low half of word i, widened with `bitcast<f32>(h << 16)`; u8: byte
//! 4i+j in bits 8j..8j+8, the little-endian byte order of the host data).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}
