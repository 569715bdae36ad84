// Row normalisations over the last dimension, f32.
// Gemma RMSNorm: y = x · rsqrt(mean(x²) + eps) · (1 + w)   (Gemma3RMSNorm, computed in f32)
// LayerNorm:     y = (x − mean) · rsqrt(var + eps) · w + b  (biased variance, as torch)
// Forward kernels: one workgroup (64 invocations) per row, tree reductions in workgroup memory;
// they save rstd (and mean) per row for backward. Weight-gradient kernels: one invocation per
// column, summing over rows (deterministic, no atomics).

#include "lib/dispatch"

#feature SUBGROUP_ROWS only the forward kernels for CPU adapters, `rmsnorm_forward_rows` and `layernorm_forward_rows`

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    accumulate: u32, // weight-gradient kernels: 1 adds into dw/db instead of overwriting
}

@group(0) @binding(0) var<uniform> p: Params;

#if !SUBGROUP_ROWS
const WG: u32 = 64u;
var<workgroup> red_a: array<f32, 64>;
var<workgroup> red_b: array<f32, 64>;

// Sums red_a and red_b over the workgroup; result in element 0 of each.
fn reduce2(lid: u32) {
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
            red_b[lid] += red_b[lid + s];
        }
        workgroupBarrier();
    }
}

// ---- forward: x [rows, cols], w [cols], (b [cols]) -> y [rows, cols], stats [rows] (or [rows, 2])
@group(0) @binding(1) var<storage, read> fx: array<f32>;
@group(0) @binding(2) var<storage, read> fw: array<f32>;
@group(0) @binding(3) var<storage, read_write> fy: array<f32>;
@group(0) @binding(4) var<storage, read_write> fstats: array<f32>;
@group(0) @binding(5) var<storage, read> fb: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup(wid, nwg);
    if (row >= p.rows) { return; } // uniform per workgroup
    let base = row * p.cols;
    var ss = 0.0;
    for (var j = lid; j < p.cols; j += WG) { let v = fx[base + j]; ss += v * v; }
    red_a[lid] = ss;
    red_b[lid] = 0.0;
    reduce2(lid);
    let rstd = inverseSqrt(red_a[0] / f32(p.cols) + p.eps);
    for (var j = lid; j < p.cols; j += WG) {
        fy[base + j] = fx[base + j] * rstd * (1.0 + fw[j]);
    }
    if (lid == 0u) { fstats[row] = rstd; }
}

// ---- a Gemma sublayer's end and the next one's start, for decoding (one dispatch for three):
// h = residual + rmsnorm(x; w_post), y = rmsnorm(h; w_pre); x, residual, h, y [rows, cols].
// Each step computes what rmsnorm_forward and the residual add compute, in the same order, so
// the results are the same bits as the three dispatches' (with rmsnorm_forward, not the CPU
// adapters' rmsnorm_forward_rows below).
@group(0) @binding(1) var<storage, read> rx: array<f32>;
@group(0) @binding(2) var<storage, read> rres: array<f32>;
@group(0) @binding(3) var<storage, read> rw_post: array<f32>;
@group(0) @binding(4) var<storage, read> rw_pre: array<f32>;
@group(0) @binding(5) var<storage, read_write> rh: array<f32>;
@group(0) @binding(6) var<storage, read_write> ry: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm_residual_rmsnorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup(wid, nwg);
    if (row >= p.rows) { return; } // uniform per workgroup
    let base = row * p.cols;
    var ss = 0.0;
    for (var j = lid; j < p.cols; j += WG) { let v = rx[base + j]; ss += v * v; }
    red_a[lid] = ss;
    red_b[lid] = 0.0;
    reduce2(lid);
    let rstd = inverseSqrt(red_a[0] / f32(p.cols) + p.eps);
    // every lane has read red_a[0] before the second reduction overwrites it
    workgroupBarrier();
    // lane lid owns the same columns in both passes: its h values are its own writes
    var ss_h = 0.0;
    for (var j = lid; j < p.cols; j += WG) {
        let h = rx[base + j] * rstd * (1.0 + rw_post[j]) + rres[base + j];
        rh[base + j] = h;
        ss_h += h * h;
    }
    red_a[lid] = ss_h;
    red_b[lid] = 0.0;
    reduce2(lid);
    let rstd_h = inverseSqrt(red_a[0] / f32(p.cols) + p.eps);
    for (var j = lid; j < p.cols; j += WG) {
        ry[base + j] = rh[base + j] * rstd_h * (1.0 + rw_pre[j]);
    }
}

@compute @workgroup_size(64)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    var s = 0.0;
    for (var j = lid; j < p.cols; j += WG) { s += fx[base + j]; }
    red_a[lid] = s;
    red_b[lid] = 0.0;
    reduce2(lid);
    let mean = red_a[0] / f32(p.cols);
    workgroupBarrier();
    var sq = 0.0;
    for (var j = lid; j < p.cols; j += WG) { let d = fx[base + j] - mean; sq += d * d; }
    red_a[lid] = sq;
    red_b[lid] = 0.0;
    reduce2(lid);
    let rstd = inverseSqrt(red_a[0] / f32(p.cols) + p.eps);
    for (var j = lid; j < p.cols; j += WG) {
        fy[base + j] = (fx[base + j] - mean) * rstd * fw[j] + fb[j];
    }
    if (lid == 0u) { fstats[2u * row] = mean; fstats[2u * row + 1u] = rstd; }
}

// ---- backward dx: x, w, dy, stats -> dx [rows, cols]
@group(0) @binding(1) var<storage, read> bx: array<f32>;
@group(0) @binding(2) var<storage, read> bw: array<f32>;
@group(0) @binding(3) var<storage, read> bdy: array<f32>;
@group(0) @binding(4) var<storage, read> bstats: array<f32>;
@group(0) @binding(5) var<storage, read_write> bdx: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    let rstd = bstats[row];
    // dx = rstd · (g − xhat · mean(g · xhat)), g = dy · (1 + w), xhat = x · rstd
    var s = 0.0;
    for (var j = lid; j < p.cols; j += WG) {
        s += bdy[base + j] * (1.0 + bw[j]) * bx[base + j] * rstd;
    }
    red_a[lid] = s;
    red_b[lid] = 0.0;
    reduce2(lid);
    let mean_gx = red_a[0] / f32(p.cols);
    for (var j = lid; j < p.cols; j += WG) {
        let xhat = bx[base + j] * rstd;
        bdx[base + j] = rstd * (bdy[base + j] * (1.0 + bw[j]) - xhat * mean_gx);
    }
}

@compute @workgroup_size(64)
fn layernorm_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    let mean = bstats[2u * row];
    let rstd = bstats[2u * row + 1u];
    // dx = rstd · (g − mean(g) − xhat · mean(g · xhat)), g = dy · w
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = lid; j < p.cols; j += WG) {
        let g = bdy[base + j] * bw[j];
        sg += g;
        sgx += g * (bx[base + j] - mean) * rstd;
    }
    red_a[lid] = sg;
    red_b[lid] = sgx;
    reduce2(lid);
    let mg = red_a[0] / f32(p.cols);
    let mgx = red_b[0] / f32(p.cols);
    for (var j = lid; j < p.cols; j += WG) {
        let xhat = (bx[base + j] - mean) * rstd;
        bdx[base + j] = rstd * (bdy[base + j] * bw[j] - mg - xhat * mgx);
    }
}

// ---- backward dw (and db): one invocation per column
@group(0) @binding(1) var<storage, read> gx: array<f32>;
@group(0) @binding(2) var<storage, read> gdy: array<f32>;
@group(0) @binding(3) var<storage, read> gstats: array<f32>;
@group(0) @binding(4) var<storage, read_write> gdw: array<f32>;
@group(0) @binding(5) var<storage, read_write> gdb: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm_backward_dw(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.cols) { return; }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        s += gdy[r * p.cols + j] * gx[r * p.cols + j] * gstats[r];
    }
    if (p.accumulate != 0u) { s += gdw[j]; }
    gdw[j] = s;
}

@compute @workgroup_size(64)
fn layernorm_backward_dw(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.cols) { return; }
    var sw = 0.0;
    var sb = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let dy = gdy[r * p.cols + j];
        sw += dy * (gx[r * p.cols + j] - gstats[2u * r]) * gstats[2u * r + 1u];
        sb += dy;
    }
    if (p.accumulate != 0u) { sw += gdw[j]; sb += gdb[j]; }
    gdw[j] = sw;
    gdb[j] = sb;
}
#endif

#if SUBGROUP_ROWS
// ---- the forward kernels for CPU adapters (one subgroup width): one subgroup per row,
// ROW_SUBGROUPS rows per workgroup, lanes across the row's texels (cols % 4 == 0), sums by
// subgroupAdd. The kernels above spend a workgroup of 64 and seven barriers per row: on
// llvmpipe about 4 us a row whatever its length, 1.4 ms for a 320-row prompt, where these
// take a tenth of that. Sums in another order than theirs (both within rounding of the
// reference).
override LANES: u32 = 8u;
const ROW_SUBGROUPS: u32 = 8u;

@group(0) @binding(1) var<storage, read> sx: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> sw: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> sy: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> sstats: array<f32>;
@group(0) @binding(5) var<storage, read> sb: array<vec4<f32>>;

// The row subgroup `lid / LANES` of workgroup `wid` normalizes; rows past the last redo the
// last one (every lane must reach subgroupAdd) and store nothing.
fn lane_row(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_workgroup(wid, nwg) * ROW_SUBGROUPS + lid / LANES;
}

@compute @workgroup_size(LANES * ROW_SUBGROUPS)
fn rmsnorm_forward_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let row = lane_row(wid, nwg, lid);
    let texels = p.cols / 4u;
    let base = min(row, p.rows - 1u) * texels;
    var ss = vec4<f32>(0.0);
    for (var t = lane; t < texels; t += LANES) { let v = sx[base + t]; ss = fma(v, v, ss); }
    let rstd = inverseSqrt(subgroupAdd((ss.x + ss.y) + (ss.z + ss.w)) / f32(p.cols) + p.eps);
    if (row < p.rows) {
        for (var t = lane; t < texels; t += LANES) {
            sy[base + t] = sx[base + t] * rstd * (1.0 + sw[t]);
        }
        if (lane == 0u) { sstats[row] = rstd; }
    }
}

@compute @workgroup_size(LANES * ROW_SUBGROUPS)
fn layernorm_forward_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let row = lane_row(wid, nwg, lid);
    let texels = p.cols / 4u;
    let base = min(row, p.rows - 1u) * texels;
    var s = vec4<f32>(0.0);
    for (var t = lane; t < texels; t += LANES) { s += sx[base + t]; }
    let mean = subgroupAdd((s.x + s.y) + (s.z + s.w)) / f32(p.cols);
    var sq = vec4<f32>(0.0);
    for (var t = lane; t < texels; t += LANES) { let d = sx[base + t] - mean; sq = fma(d, d, sq); }
    let rstd = inverseSqrt(subgroupAdd((sq.x + sq.y) + (sq.z + sq.w)) / f32(p.cols) + p.eps);
    if (row < p.rows) {
        for (var t = lane; t < texels; t += LANES) {
            sy[base + t] = (sx[base + t] - mean) * rstd * sw[t] + sb[t];
        }
        if (lane == 0u) { sstats[2u * row] = mean; sstats[2u * row + 1u] = rstd; }
    }
}
#endif
