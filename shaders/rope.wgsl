// Rotary position embedding, rotate-half convention (Gemma / Llama in transformers):
//   out[i]     = x[i]·cos[i] − x[i+h]·sin[i]
//   out[i+h]   = x[i+h]·cos[i] + x[i]·sin[i]        (h = head_dim / 2)
// cos/sin come from tables [n_pos, h] built on the host (per-layer base and linear scaling
// folded into inv_freq), indexed by each token's position. Backward rotates by −angle.
// x, out: [tokens, heads, head_dim]; positions: [tokens] u32. In place is allowed (x == out
// bound once) — each invocation reads its pair before writing it.

#include "lib/dispatch"

struct Params {
    rows: u32,      // tokens · heads
    heads: u32,
    half: u32,
    n_pos: u32,
    direction: f32, // +1 forward, −1 backward
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
    let id = flat_invocation(wid, nwg, l, 256u);
    if (id >= p.rows * p.half) { return; }
    let row = id / p.half;
    let i = id % p.half;
    let pos = min(positions[row / p.heads], p.n_pos - 1u);
    let c = cos_t[pos * p.half + i];
    let s = sin_t[pos * p.half + i] * p.direction;
    let base = row * 2u * p.half;
    let a = x[base + i];
    let b = x[base + i + p.half];
    x[base + i] = a * c - b * s;
    x[base + i + p.half] = b * c + a * s;
}
