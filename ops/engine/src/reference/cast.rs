//! f32 ⇄ bf16 casts (bf16 as raw u16 bits).

/// Round-to-nearest-even, as torch's `.to(torch.bfloat16)`; NaN stays a (quiet) NaN.
pub fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        return ((b >> 16) | 0x40) as u16;
    }
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `dst[i] = bf16(f32(dst[i]) + src[i])`: one rounding per element, as a bf16 gradient takes
/// an f32 contribution.
pub fn add_f32_into_bf16(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_f32_into_bf16: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(bf16_to_f32(*d) + s);
    }
}

/// Rounds every value to the nearest bf16 (ties to even), kept as f32.
pub fn round_to_bf16(values: &mut [f32]) {
    for v in values {
        *v = bf16_to_f32(f32_to_bf16(*v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_half_crate_rounding() {
        for &v in &[
            0.0f32,
            -0.0,
            1.0,
            1.003_906_3,
            1.011_718_8,
            3.2,
            -2.5e-38,
            1e30,
            f32::INFINITY,
            f32::MAX,
        ] {
            assert_eq!(f32_to_bf16(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }
}
