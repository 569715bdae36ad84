// 2-D average pooling of the Gemma 3 projector, forward and backward.
// Reference: ops/engine/src/reference/pool.rs. X is [batch, side*side, channels] (patch grid row-major),
// Y is [batch, out_side*out_side, channels], kernel = stride = k; grid rows/columns past
// out_side*k (a remainder torch's AvgPool2d drops) get zero gradient.

#include "lib/dispatch"

struct Params {
    batch: u32, side: u32, channels: u32, kernel: u32,
    out_side: u32, inv_area: f32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> SRC: array<f32>;
@group(0) @binding(2) var<storage, read_write> DST: array<f32>;

// One invocation per output element (b, pooled token, channel); SRC = X, DST = Y.
@compute @workgroup_size(64, 1, 1)
fn avg_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_global(gid, nwg, 64u);
    let tokens = p.out_side * p.out_side;
    if (i >= p.batch * tokens * p.channels) { return; }
    let ch = i % p.channels;
    let bt = i / p.channels;
    let t = bt % tokens;
    let b = bt / tokens;
    let r0 = (t / p.out_side) * p.kernel;
    let c0 = (t % p.out_side) * p.kernel;
    var sum = 0.0;
    for (var dr = 0u; dr < p.kernel; dr++) {
        let row_base = (b * p.side * p.side + (r0 + dr) * p.side + c0) * p.channels + ch;
        for (var dc = 0u; dc < p.kernel; dc++) {
            sum += SRC[row_base + dc * p.channels];
        }
    }
    DST[i] = sum * p.inv_area;
}

// One invocation per input element (b, patch, channel); SRC = dY, DST = dX (overwritten).
@compute @workgroup_size(64, 1, 1)
fn avg_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_global(gid, nwg, 64u);
    let patches = p.side * p.side;
    if (i >= p.batch * patches * p.channels) { return; }
    let ch = i % p.channels;
    let bp = i / p.channels;
    let cell = bp % patches;
    let b = bp / patches;
    let r = (cell / p.side) / p.kernel;
    let c = (cell % p.side) / p.kernel;
    var g = 0.0;
    if (r < p.out_side && c < p.out_side) {
        g = SRC[((b * p.out_side + r) * p.out_side + c) * p.channels + ch] * p.inv_area;
    }
    DST[i] = g;
}
