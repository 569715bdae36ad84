// A frozen [N, K] weight staged in the rows kernels' row-block layout (ops/engine/src/gpu/
// kernels/row_blocks.rs; read by matmul_rows_split with ROW_BLOCKS, lib/rows_split): the rows
// in blocks of 8 (SPLIT_ROWS; the last block padded with zero rows), and within a block, for
// each step of the kernel's K loop, the LANES texels each of the 8 rows reads in that step, row
// after row. A subgroup's fetches then walk the weight front to back, 8 · LANES neighbouring
// texels per step, where the linear layout has it read 8 rows 1 row apart: on llvmpipe a 32768
// x 640 bf16 product that misses the caches took 4.8-5.1 ms linear, 3.9-4.2 ms in row blocks
// (rows_probe).
//
// Texel t of the layout is texel (chunk · LANES + lane) of row (block · 8 + r) of the source,
// where t = ((block · chunks + chunk) · 8 + r) · LANES + lane and chunks = row_texels / LANES.
// Both are bound as vec4<u32> words (f32 bits, or two bf16 per word): the layout is written to
// a buffer, which a plain copy then moves into the texture (kernels/row_blocks.rs). Storing
// texels straight into a storage texture took 1.4x as long on llvmpipe (its image stores go
// lane by lane through the format conversion).

struct Params {
    rows: u32,        // N
    row_texels: u32,  // texels of one source row (K / 4 for f32, K / 8 for bf16), a multiple of lanes
    lane_bits: u32,   // log2 of the reading kernel's SPLIT_LANES (a power of two)
    padded_rows: u32, // N rounded up to a multiple of 8
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

// One invocation per texel (j, row) of the source (rows past N write the padding's zeros). No
// division: llvmpipe divides lane by lane, and dividing each texel's flat index by the row
// and chunk sizes made this 4x slower (43 ms for the 32768 x 640 bf16 output embedding).
@compute @workgroup_size(8, 8)
fn row_blocks(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let row = gid.y;
    if (j >= p.row_texels || row >= p.padded_rows) { return; }
    let lanes = 1u << p.lane_bits;
    let chunks = p.row_texels >> p.lane_bits;
    let chunk = j >> p.lane_bits;
    let lane = j & (lanes - 1u);
    let t = ((((row >> 3u) * chunks + chunk) << 3u) + (row & 7u)) * lanes + lane;
    var v = vec4<u32>(0u);
    if (row < p.rows) { v = src[row * p.row_texels + j]; }
    dst[t] = v;
}
