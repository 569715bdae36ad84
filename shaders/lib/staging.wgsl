// Linear textures (ops/engine/src/gpu/staging.rs): the bytes of a buffer range laid out in rows of
// STAGE_WIDTH = 4096 texels of 16 bytes, so texel t sits at (t % 4096, t / 4096); element e of
// an f32 or u32 range is component e % 4 of texel e / 4. The one place the shaders spell out
// that width (staging.rs's STAGE_WIDTH; its readback test ties the two).
fn stage_texel(t: u32) -> vec2<u32> { return vec2<u32>(t & 4095u, t >> 12u); }
