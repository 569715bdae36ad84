// bitsandbytes' NF4 code values (gen/nf4_codes: written from the CPU reference's table).
#include "gen/nf4_codes"

// The code value of nibble n, as a select tree on its bits: a dynamically indexed table
// becomes a per-lane gather on lavapipe, selects stay vector instructions.
fn nf4_value(n: u32) -> f32 {
    let b0 = (n & 1u) != 0u;
    let b1 = (n & 2u) != 0u;
    let b2 = (n & 4u) != 0u;
    let lo = select(
        select(select(NF4_0, NF4_1, b0), select(NF4_2, NF4_3, b0), b1),
        select(select(NF4_4, NF4_5, b0), select(NF4_6, NF4_7, b0), b1),
        b2);
    let hi = select(
        select(select(NF4_8, NF4_9, b0), select(NF4_10, NF4_11, b0), b1),
        select(select(NF4_12, NF4_13, b0), select(NF4_14, NF4_15, b0), b1),
        b2);
    return select(lo, hi, (n & 8u) != 0u);
}

// Four consecutive weights whose nibbles are the low 16 bits of `w` (bytes little-endian, the
// first element of a byte in its high nibble), scaled by `s`.
fn nf4_decode4(w: u32, s: f32) -> vec4<f32> {
    return vec4<f32>(nf4_value((w >> 4u) & 15u), nf4_value(w & 15u), nf4_value((w >> 12u) & 15u), nf4_value((w >> 8u) & 15u)) * s;
}
