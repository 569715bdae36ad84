// In-place accumulation acc += addend with the addend repeating: residual connections (addend
// of acc's shape) and the SigLIP position embedding ([patches, hidden] over [images*patches, hidden]).
// Reference: ops/engine/src/reference/accumulate.rs. One dispatch per storage chunk of acc: element i of
// the chunk adds ADDEND[(offset + i) % period], offset = the chunk's first element modulo period.

#include "lib/dispatch"

struct Params {
    n: u32,
    offset: u32,
    period: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ACC: array<f32>;
@group(0) @binding(2) var<storage, read> ADDEND: array<f32>;

@compute @workgroup_size(256)
fn accumulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    ACC[i] = ACC[i] + ADDEND[(p.offset + i) % p.period];
}
