// NF4 quantization in bitsandbytes' layout (see ops/engine/src/reference/nf4.rs for the rules):
// blockwise absmax, f32 reciprocal scaling for full blocks and division for a partial last
// block, code = number of midpoints strictly below the scaled value (ties to the lower code),
// two codes per byte with the first element in the high nibble, bytes little-endian in u32.
// Double quantization of absmax: offset = mean, 8-bit signed dynamic map, nested blocks.

#include "lib/dispatch"
#include "gen/nf4_codes"

struct Params {
    n: u32,          // elements (weights, or absmax entries for the double-quant kernels)
    blocksize: u32,  // 64 for weights, 256 for nested absmax
    n_blocks: u32,
    offset: f32,     // dequantize_absmax: mean of absmax (others: unused)
}

@group(0) @binding(0) var<uniform> p: Params;

// bitsandbytes' code table (dynamically indexed here: the quantizer searches it)
var<private> NF4: array<f32, 16> = NF4_CODES;

fn nf4_code(s: f32) -> u32 {
    var q = 0u;
    for (var i = 0u; i < 15u; i++) {
        // f32 midpoint, as torch computes (code[i] + code[i+1]) / 2.
        let mid = (NF4[i] + NF4[i + 1u]) / 2.0;
        q += select(0u, 1u, mid < s);
    }
    return q;
}

// quantize: one invocation per block. blocksize must be a multiple of 8 (whole u32 words).
@group(0) @binding(1) var<storage, read> qx: array<f32>;
@group(0) @binding(2) var<storage, read_write> qpacked: array<u32>;
@group(0) @binding(3) var<storage, read_write> qabsmax: array<f32>;

@compute @workgroup_size(64)
fn quantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let block = flat_invocation(wid, nwg, lidx, 64u);
    if (block >= p.n_blocks) { return; }
    let start = block * p.blocksize;
    let end = min(start + p.blocksize, p.n);
    var am = 0.0;
    for (var i = start; i < end; i++) { am = max(am, abs(qx[i])); }
    let full = end - start == p.blocksize;
    let recip = 1.0 / max(am, 1e-38);
    if (!full) { am = max(am, 1e-38); }
    qabsmax[block] = am;
    for (var w = start; w < end; w += 8u) {
        var word = 0u;
        for (var j = 0u; j < 8u; j++) {
            let e = w + j;
            var q = 7u; // padding: the code of 0.0
            if (e < end) {
                var s: f32;
                if (full) { s = qx[e] * recip; } else { s = qx[e] / am; }
                q = nf4_code(clamp(s, -1.0, 1.0));
            }
            // Byte j/2 of the word; even element in the high nibble.
            let shift = (j / 2u) * 8u + select(0u, 4u, (j & 1u) == 0u);
            word |= q << shift;
        }
        qpacked[w / 8u] = word;
    }
}

// dequantize: one invocation per 8 elements (one packed word).
@group(0) @binding(1) var<storage, read> dpacked: array<u32>;
@group(0) @binding(2) var<storage, read> dabsmax: array<f32>;
@group(0) @binding(3) var<storage, read_write> dout: array<f32>;

@compute @workgroup_size(64)
fn dequantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lidx: u32) {
    let w = flat_invocation(wid, nwg, lidx, 64u);
    if (w * 8u >= p.n) { return; }
    let word = dpacked[w];
    for (var j = 0u; j < 8u; j++) {
        let e = w * 8u + j;
        if (e >= p.n) { break; }
        let shift = (j / 2u) * 8u + select(0u, 4u, (j & 1u) == 0u);
        dout[e] = NF4[(word >> shift) & 15u] * dabsmax[e / p.blocksize];
    }
}

// absmax_mean: one workgroup; sum in f32 by a tree, mean written to mean_out[0].
@group(0) @binding(1) var<storage, read> m_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> mean_out: array<f32>;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn absmax_mean(@builtin(local_invocation_index) lidx: u32) {
    var s = 0.0;
    for (var i = lidx; i < p.n; i += 256u) { s += m_in[i]; }
    partial[lidx] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride /= 2u) {
        if (lidx < stride) { partial[lidx] += partial[lidx + stride]; }
        workgroupBarrier();
    }
    if (lidx == 0u) { mean_out[0] = partial[0] / f32(p.n); }
}

// double_quantize: one invocation per nested block of absmax - mean; codes from the 256-entry
// signed dynamic map, whose 255 f32 midpoints are passed in `dq_mid`. blocksize % 4 == 0.
@group(0) @binding(1) var<storage, read> dq_in: array<f32>;
@group(0) @binding(2) var<storage, read> dq_mean: array<f32>;
@group(0) @binding(3) var<storage, read> dq_mid: array<f32>;
@group(0) @binding(4) var<storage, read_write> dq_codes: array<u32>;
@group(0) @binding(5) var<storage, read_write> dq_nested: array<f32>;

fn dynamic_code(s: f32) -> u32 {
    // Binary search: number of midpoints strictly below s.
    var lo = 0u;
    var hi = 255u;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (dq_mid[mid] < s) { lo = mid + 1u; } else { hi = mid; }
    }
    return lo;
}

@compute @workgroup_size(64)
fn double_quantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lidx: u32) {
    let block = flat_invocation(wid, nwg, lidx, 64u);
    if (block >= p.n_blocks) { return; }
    let offset = dq_mean[0];
    let start = block * p.blocksize;
    let end = min(start + p.blocksize, p.n);
    var am = 0.0;
    for (var i = start; i < end; i++) { am = max(am, abs(dq_in[i] - offset)); }
    // bitsandbytes' CPU kernel: reciprocal scaling for every block; a zero block (0/0) stores
    // absmax 0 and code 0.
    let recip = 1.0 / am;
    dq_nested[block] = am;
    for (var w = start; w < end; w += 4u) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let e = w + j;
            if (e < end && am > 0.0) {
                let s = (dq_in[e] - offset) * recip;
                word |= dynamic_code(clamp(s, -1.0, 1.0)) << (8u * j);
            }
        }
        dq_codes[w / 4u] = word;
    }
}

// dequantize_absmax: absmax[i] = map[q8[i]] * nested[i / blocksize] + offset.
@group(0) @binding(1) var<storage, read> da_codes: array<u32>;
@group(0) @binding(2) var<storage, read> da_nested: array<f32>;
@group(0) @binding(3) var<storage, read> da_map: array<f32>;
@group(0) @binding(4) var<storage, read_write> da_out: array<f32>;

@compute @workgroup_size(64)
fn dequantize_absmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lidx: u32) {
    let i = flat_invocation(wid, nwg, lidx, 64u);
    if (i >= p.n) { return; }
    let q = (da_codes[i / 4u] >> (8u * (i % 4u))) & 255u;
    da_out[i] = da_map[q] * da_nested[i / p.blocksize] + p.offset;
}
