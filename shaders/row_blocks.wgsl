// A frozen [N, K] weight staged in the rows kernels' row-block layout (ops/engine/src/gpu/
// kernels/row_blocks.rs; read by matmul_rows_split with ROW_BLOCKS, lib/rows_split): the rows
// in blocks of 8 (SPLIT_ROWS; the last block padded with zero rows), and within a block, for
// each step of the kernel's K loop, the LANES texels each of the 8 rows reads in that step, row
// after row. A subgroup's fetches then walk the weight front to back, 8 · LANES neighbouring
// texels per step, where the linear layout has it read 8 rows 1 row apart: on llvmpipe a 32768
// x 640 bf16 product that misses the caches took 4.8-5.1 ms linear, 3.9-4.2 ms in row blocks
// (rows_probe).
//
// Texel t of the destination is texel (chunk · LANES + lane) of row (block · 8 + r) of the
// source, where t = ((block · chunks + chunk) · 8 + r) · LANES + lane and chunks = row_texels /
// LANES. The source is bound as vec4<u32> words (f32 bits, or two bf16 per word); the texture
// has the staging format of what the kernel reads (rgba32float with F32, else rgba32uint).

#feature F32 the destination is an rgba32float texture (an f32 weight), else rgba32uint (bf16 words)

#include "lib/dispatch"
#include "lib/staging"

struct Params {
    rows: u32,       // N
    row_texels: u32, // texels of one source row (K / 4 for f32, K / 8 for bf16), a multiple of lanes
    lanes: u32,      // SPLIT_LANES of the kernel that reads it
    texels: u32,     // destination texels: N rounded up to a multiple of 8, times row_texels
    dst_first: u32,  // the destination texel of the layout's texel 0 (a group's member starts on a texture row)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
#if F32
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
#else
@group(0) @binding(2) var dst: texture_storage_2d<rgba32uint, write>;
#endif

@compute @workgroup_size(64)
fn row_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let t = flat_invocation(wid, nwg, lid, 64u);
    if (t >= p.texels) { return; }
    let block_texels = 8u * p.row_texels;
    let block = t / block_texels;
    let within = t % block_texels;
    let chunk = within / (8u * p.lanes);
    let r = (within / p.lanes) % 8u;
    let lane = within % p.lanes;
    let row = block * 8u + r;
    var v = vec4<u32>(0u);
    if (row < p.rows) { v = src[row * p.row_texels + chunk * p.lanes + lane]; }
#if F32
    textureStore(dst, stage_texel(p.dst_first + t), bitcast<vec4<f32>>(v));
#else
    textureStore(dst, stage_texel(p.dst_first + t), v);
#endif
}
