// bf16 as the engine stores it (ops/engine/src/gpu/tensor.rs `DType::Bf16`): two per u32 word, element
// 2i in the low half. Widening is exact (a bf16's bits are the high half of its f32); narrowing
// rounds to nearest even as torch does, a NaN becoming a quiet NaN. Reference:
// ops/engine/src/reference/cast.rs.

// The element in the low / high half of a word, widened.
fn bf16_lo(w: u32) -> f32 { return bitcast<f32>(w << 16u); }
fn bf16_hi(w: u32) -> f32 { return bitcast<f32>(w & 0xffff0000u); }

// The bf16 bits (in the low 16) of `v` rounded to nearest even.
fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) { return ((b >> 16u) | 0x40u) & 0xffffu; }
    return ((b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u) & 0xffffu;
}

// `a` (low) and `b` (high) rounded into one word.
fn bf16_pack(a: f32, b: f32) -> u32 { return bf16_bits(a) | (bf16_bits(b) << 16u); }

// `v` rounded to the nearest bf16, kept as f32.
fn bf16_round(v: f32) -> f32 { return bf16_lo(bf16_bits(v)); }
