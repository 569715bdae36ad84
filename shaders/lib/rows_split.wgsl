// The staged rows kernels' layout and inner loop (matmul_rows_split in matmul.wgsl,
// matmul_rows_group.wgsl; staged operands exist only on CPU adapters with one subgroup width,
// ops/engine/src/gpu/staging.rs). A workgroup is SPLIT_SUBGROUPS subgroups of SPLIT_LANES lanes,
// each owning SPLIT_ROWS outputs of one row of x; its lanes split K, lane l reading texels l,
// l + SPLIT_LANES, ... of x and of each W row, so each fetch of the subgroup is neighbouring
// texels (one lane per W row, as matmul_rows does, puts them rows apart: several times slower
// on llvmpipe), and the partial dot products are summed by subgroupAdd. Several subgroups per
// workgroup because llvmpipe runs a workgroup's subgroups in one loop: with one, its
// per-workgroup cost was as large as a decoder product's (gemv_probe, 2048 x 640: 0.53 ms with
// one subgroup, 0.28 ms with eight). Subgroups are consecutive invocations on these adapters
// (one width, 1-D workgroups). The including module defines a4(e) and b4(e): four elements of
// x and W from element e, e % 4 == 0; with its feature BF16B (W bf16, staged as u32 words, eight
// elements per texel) also b8(e): the texel holding W's elements e .. e + 8, e % 8 == 0. With
// its feature ROW_BLOCKS W is staged in row blocks (shaders/row_blocks.wgsl), else linearly.
override SPLIT_LANES: u32 = 8u;
const SPLIT_ROWS: u32 = 8u;
const SPLIT_SUBGROUPS: u32 = 8u;

#if ROW_BLOCKS
#if BF16B
const SPLIT_B_TEXEL: u32 = 8u;
#else
const SPLIT_B_TEXEL: u32 = 4u;
#endif
// The element where each of the SPLIT_ROWS rows from n0 (of n, leading dimension ld, from
// element `first`) starts its K steps: n0 starts a block (the layout pads the last one with
// zero rows, never stored); a subgroup wholly past n reads the last block (every lane must
// reach subgroupAdd). Row r's texels of a K step sit r · SPLIT_LANES texels into the step.
fn split_b_bases(first: u32, ld: u32, n0: u32, n: u32) -> array<u32, 8> {
    let block = min(n0, (n - 1u) / SPLIT_ROWS * SPLIT_ROWS);
    var b: array<u32, 8>;
    for (var r = 0u; r < SPLIT_ROWS; r++) { b[r] = first + block * ld + r * SPLIT_LANES * SPLIT_B_TEXEL; }
    return b;
}
// Where, from its row's base, the texel holding elements k .. k + per_texel sits when lane
// `lane` reads it: K step i = (k - per_texel · lane) / (per_texel · SPLIT_LANES) is SPLIT_ROWS
// rows' runs into the block.
fn split_b_step(k: u32, lane: u32, per_texel: u32) -> u32 {
    return SPLIT_ROWS * (k - per_texel * lane) + per_texel * lane;
}
#else
// The first element of each of the SPLIT_ROWS rows from n0 (of n, leading dimension ld, from
// element `first`); rows past n read row n - 1 (every lane must reach subgroupAdd) and are not
// stored.
fn split_b_bases(first: u32, ld: u32, n0: u32, n: u32) -> array<u32, 8> {
    var b: array<u32, 8>;
    for (var r = 0u; r < SPLIT_ROWS; r++) { b[r] = first + min(n0 + r, n - 1u) * ld; }
    return b;
}
fn split_b_step(k: u32, lane: u32, per_texel: u32) -> u32 { return k; }
#endif

// The first of the SPLIT_ROWS outputs that invocation `lid` of workgroup `group` helps with.
fn split_first_row(group: u32, lid: u32) -> u32 {
    return (group * SPLIT_SUBGROUPS + lid / SPLIT_LANES) * SPLIT_ROWS;
}

// Lane `lane`'s partial sums of x[a_base + k] · W[b_base[r] + k] over k < k4 (a multiple of 4),
// two per row r (even and odd k). Two, not four: llvmpipe keeps a lane's value of each vector
// component in a SIMD register, and eight rows' vec4 accumulators (32 registers) spilled:
// rows_probe, 32768 x 640, f32 7.0-8.0 -> 6.0-6.8 ms and bf16 3.56-3.69 -> 3.43-3.48 ms.
fn split_partials(a_base: u32, b_base: array<u32, 8>, k4: u32, lane: u32) -> array<vec2<f32>, 8> {
    var acc: array<vec2<f32>, 8>;
    for (var r = 0u; r < SPLIT_ROWS; r++) { acc[r] = vec2<f32>(0.0); }
    for (var k = 4u * lane; k < k4; k += 4u * SPLIT_LANES) {
        let a = a4(a_base + k);
        for (var r = 0u; r < SPLIT_ROWS; r++) {
            let b = b4(b_base[r] + split_b_step(k, lane, 4u));
            acc[r] = fma(a.zw, b.zw, fma(a.xy, b.xy, acc[r]));
        }
    }
    return acc;
}

#if BF16B
// split_partials for a bf16 W over k < k8 (a multiple of 8, as is every b_base[r]): lane l
// reads W's texels l, l + SPLIT_LANES, ... (eight weights each), so a row of W costs half the
// loads of an f32 one, which is what bounds these products on llvmpipe. The sums are taken in
// another order than split_partials'.
fn split_partials_bf16(a_base: u32, b_base: array<u32, 8>, k8: u32, lane: u32) -> array<vec2<f32>, 8> {
    var acc: array<vec2<f32>, 8>;
    for (var r = 0u; r < SPLIT_ROWS; r++) { acc[r] = vec2<f32>(0.0); }
    for (var k = 8u * lane; k < k8; k += 8u * SPLIT_LANES) {
        let a_lo = a4(a_base + k);
        let a_hi = a4(a_base + k + 4u);
        for (var r = 0u; r < SPLIT_ROWS; r++) {
            let w = b8(b_base[r] + split_b_step(k, lane, 8u));
            var s = acc[r];
            s = fma(a_lo.xy, vec2<f32>(bf16_lo(w.x), bf16_hi(w.x)), s);
            s = fma(a_lo.zw, vec2<f32>(bf16_lo(w.y), bf16_hi(w.y)), s);
            s = fma(a_hi.xy, vec2<f32>(bf16_lo(w.z), bf16_hi(w.z)), s);
            s = fma(a_hi.zw, vec2<f32>(bf16_lo(w.w), bf16_hi(w.w)), s);
            acc[r] = s;
        }
    }
    return acc;
}
#endif
