// Matrix multiply C = alpha · op(A) · op(B) + beta · C + bias, batched.
//
// op(A) is M×K (A stored [M,K], or [K,M] with TRANS_A), op(B) is K×N (B stored [K,N], or
// [N,K] with TRANS_B). Offsets, leading dimensions and batch strides are in elements.
//
// The kernels read A and B (bound as A_in and B_in, C as C_out: `A`, `B` and `C` name the
// cooperative-matrix roles) through a1/a4 and b1/b4 (one element, or four consecutive ones from
// an element index that is a multiple of 4), defined by the features below. llvmpipe loads
// storage one lane at a time, so a vec4 load is 4x fewer load instructions there; a texel
// fetch costs a tenth of a storage load there, so the subgroup kernel stages its operands.
//
// Two kernels: `matmul_register` (a TM×TN block of C per invocation held in registers, no
// workgroup memory: fastest on CPU adapters) and `matmul_workgroup` (BM×BN tiles staged in
// workgroup memory, WTM×WTN per invocation: GPUs). Rows/columns past M/N in a block read
// whatever the bounds-checked loads return and are never stored.

#feature VEC4 A and B bound as vec4 views (offsets, leading dimensions and contiguous dimensions multiples of 4)
#feature TEXTURES A and B (the NF4 words and absmax) read from staged linear textures (ops/engine/src/gpu/staging.rs)
#feature NF4 B is a bitsandbytes NF4 weight (packed nibbles at binding 2, f32 absmax at binding 5) decoded in the tile loop: the fused NF4 matmul is this same kernel
#feature BF16B B is a bf16 matrix packed two per u32 (element 2i in the low half; the NF4 words' binding and staging as u32): the trainable modules_to_save copies in bf16 storage
#feature F16 every operand value (the dequantized NF4 weight included) rounded to f16 as it is loaded, products and sums in f32 (needs SHADER_F16)
#feature ROW_BLOCKS matmul_rows_split reads B (VEC4, TEXTURES) staged in row blocks (shaders/row_blocks.wgsl) instead of linearly
#feature COOP the cooperative-matrix kernel `matmul_coop` is appended (generated in kernels/matmul/codegen.rs; wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX)
#if F16
enable f16;
#endif
#if COOP
enable wgpu_cooperative_matrix;
#endif
#if TEXTURES
#include "lib/staging"
#endif

#if TEXTURES
@group(0) @binding(1) var A_in: texture_storage_2d<rgba32float, read>;
fn a_texel(t: u32) -> vec4<f32> { return textureLoad(A_in, stage_texel(t)); }
fn a1_load(e: u32) -> f32 { return a_texel(e >> 2u)[e & 3u]; }
#if VEC4
fn a4_load(e: u32) -> vec4<f32> { return a_texel(e >> 2u); }
#else
fn a4_load(e: u32) -> vec4<f32> { return vec4<f32>(a1_load(e), a1_load(e + 1u), a1_load(e + 2u), a1_load(e + 3u)); }
#endif
#elif VEC4
@group(0) @binding(1) var<storage, read> A_in: array<vec4<f32>>;
fn a4_load(e: u32) -> vec4<f32> { return A_in[e >> 2u]; }
fn a1_load(e: u32) -> f32 { return A_in[e >> 2u][e & 3u]; }
#else
@group(0) @binding(1) var<storage, read> A_in: array<f32>;
fn a4_load(e: u32) -> vec4<f32> { return vec4<f32>(A_in[e], A_in[e + 1u], A_in[e + 2u], A_in[e + 3u]); }
fn a1_load(e: u32) -> f32 { return A_in[e]; }
#endif

#if NF4
#include "lib/nf4"
// Element e of the NF4 weight (bitsandbytes layout) is byte e/2 (bytes little-endian in u32
// words), high nibble for even e; value = code[nibble] * absmax[e / NF4_BLOCK].
override NF4_BLOCK: u32 = 64u;
#if TEXTURES
@group(0) @binding(2) var Wq: texture_storage_2d<rgba32uint, read>;
@group(0) @binding(5) var Wabsmax: texture_storage_2d<rgba32float, read>;
fn wq_word(w: u32) -> u32 { return textureLoad(Wq, stage_texel(w >> 2u))[w & 3u]; }
fn absmax(i: u32) -> f32 { return textureLoad(Wabsmax, stage_texel(i >> 2u))[i & 3u]; }
#else
@group(0) @binding(2) var<storage, read> Wq: array<u32>;
@group(0) @binding(5) var<storage, read> Wabsmax: array<f32>;
fn wq_word(w: u32) -> u32 { return Wq[w]; }
fn absmax(i: u32) -> f32 { return Wabsmax[i]; }
#endif
fn b1_load(e: u32) -> f32 {
    let byte = (wq_word(e >> 3u) >> (((e >> 1u) & 3u) * 8u)) & 255u;
    let nib = select(byte & 15u, byte >> 4u, (e & 1u) == 0u);
    return nf4_value(nib) * absmax(e / NF4_BLOCK);
}
#if VEC4
// Four consecutive weights from element e (e % 4 == 0): bytes e/2 and e/2 + 1 of one word.
fn b4_load(e: u32) -> vec4<f32> { return nf4_decode4(wq_word(e >> 3u) >> ((e & 4u) * 4u), absmax(e / NF4_BLOCK)); }
#else
fn b4_load(e: u32) -> vec4<f32> { return vec4<f32>(b1_load(e), b1_load(e + 1u), b1_load(e + 2u), b1_load(e + 3u)); }
#endif
#elif BF16B
#include "lib/bf16"
#if TEXTURES
@group(0) @binding(2) var Bw: texture_storage_2d<rgba32uint, read>;
fn b_word(w: u32) -> u32 { return textureLoad(Bw, stage_texel(w >> 2u))[w & 3u]; }
// The texel holding elements e .. e + 8 (e % 8 == 0): words e/2 .. e/2 + 4.
fn b8(e: u32) -> vec4<u32> { return textureLoad(Bw, stage_texel(e >> 3u)); }
#else
@group(0) @binding(2) var<storage, read> Bw: array<u32>;
fn b_word(w: u32) -> u32 { return Bw[w]; }
#endif
fn b1_load(e: u32) -> f32 {
    let w = b_word(e >> 1u);
    return select(bf16_hi(w), bf16_lo(w), (e & 1u) == 0u);
}
#if VEC4 && TEXTURES
// Four consecutive elements from e (e % 4 == 0): half of one texel, fetched once.
fn b4_load(e: u32) -> vec4<f32> {
    let t = b8(e & ~7u);
    let w = select(t.xy, t.zw, (e & 4u) != 0u);
    return vec4<f32>(bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y));
}
#elif VEC4
// Four consecutive elements from e (e % 4 == 0): two whole words.
fn b4_load(e: u32) -> vec4<f32> {
    let w0 = b_word(e >> 1u);
    let w1 = b_word((e >> 1u) + 1u);
    return vec4<f32>(bf16_lo(w0), bf16_hi(w0), bf16_lo(w1), bf16_hi(w1));
}
#else
fn b4_load(e: u32) -> vec4<f32> { return vec4<f32>(b1_load(e), b1_load(e + 1u), b1_load(e + 2u), b1_load(e + 3u)); }
#endif
#elif TEXTURES
@group(0) @binding(2) var B_in: texture_storage_2d<rgba32float, read>;
fn b_texel(t: u32) -> vec4<f32> { return textureLoad(B_in, stage_texel(t)); }
fn b1_load(e: u32) -> f32 { return b_texel(e >> 2u)[e & 3u]; }
#if VEC4
fn b4_load(e: u32) -> vec4<f32> { return b_texel(e >> 2u); }
#else
fn b4_load(e: u32) -> vec4<f32> { return vec4<f32>(b1_load(e), b1_load(e + 1u), b1_load(e + 2u), b1_load(e + 3u)); }
#endif
#elif VEC4
@group(0) @binding(2) var<storage, read> B_in: array<vec4<f32>>;
fn b4_load(e: u32) -> vec4<f32> { return B_in[e >> 2u]; }
fn b1_load(e: u32) -> f32 { return B_in[e >> 2u][e & 3u]; }
#else
@group(0) @binding(2) var<storage, read> B_in: array<f32>;
fn b4_load(e: u32) -> vec4<f32> { return vec4<f32>(B_in[e], B_in[e + 1u], B_in[e + 2u], B_in[e + 3u]); }
fn b1_load(e: u32) -> f32 { return B_in[e]; }
#endif

// The kernels' operand reads: the loads above, rounded to f16 with F16.
#if F16
fn a1(e: u32) -> f32 { return f32(f16(a1_load(e))); }
fn a4(e: u32) -> vec4<f32> { return vec4<f32>(vec4<f16>(a4_load(e))); }
fn b1(e: u32) -> f32 { return f32(f16(b1_load(e))); }
fn b4(e: u32) -> vec4<f32> { return vec4<f32>(vec4<f16>(b4_load(e))); }
#else
fn a1(e: u32) -> f32 { return a1_load(e); }
fn a4(e: u32) -> vec4<f32> { return a4_load(e); }
fn b1(e: u32) -> f32 { return b1_load(e); }
fn b4(e: u32) -> vec4<f32> { return b4_load(e); }
#endif

struct Params {
    m: u32, n: u32, k: u32, has_bias: u32,
    a_off: u32, lda: u32, a_batch: u32, b_off: u32,
    ldb: u32, b_batch: u32, c_off: u32, ldc: u32,
    c_batch: u32, bias_off: u32, alpha: f32, beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read_write> C_out: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

override TRANS_A: bool = false;
override TRANS_B: bool = false;

// Register kernel shape: outputs per invocation (multiples of 4, at most 16) and workgroup.
override TM: u32 = 8u;
override TN: u32 = 8u;
override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

fn a_index(m: u32, k: u32) -> u32 {
    if (TRANS_A) { return k * p.lda + m; }
    return m * p.lda + k;
}

fn b_index(k: u32, n: u32) -> u32 {
    if (TRANS_B) { return n * p.ldb + k; }
    return k * p.ldb + n;
}

fn store(m: u32, n: u32, c_base: u32, v: f32) {
    let idx = c_base + m * p.ldc + n;
    var r = p.alpha * v;
    if (p.beta != 0.0) { r = r + p.beta * C_out[idx]; }
    if (p.has_bias != 0u) { r = r + bias[p.bias_off + n]; }
    C_out[idx] = r;
}

// ---- matmul_rows: a few rows of A against B stored [N, K] (TRANS_B; decoding: one row per
// sequence). One output per invocation, a dot product over K in vec4 steps: a tiled kernel's
// TM rows per tile would do TM times the work at M = 1, and staging B into textures would copy
// every weight each step.
@compute @workgroup_size(64)
fn matmul_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32) {
    let n = wid.x * 64u + l;
    let m = wid.y;
    if (n >= p.n || m >= p.m) { return; }
    let a_base = p.a_off + wid.z * p.a_batch + m * p.lda;
    let b_base = p.b_off + wid.z * p.b_batch + n * p.ldb;
    var acc = vec4<f32>(0.0);
    let k4 = p.k & ~3u;
    for (var k = 0u; k < k4; k += 4u) {
        acc = fma(a4(a_base + k), b4(b_base + k), acc);
    }
    var s = (acc.x + acc.y) + (acc.z + acc.w);
    for (var k = k4; k < p.k; k++) {
        s = fma(a1(a_base + k), b1(b_base + k), s);
    }
    store(m, n, p.c_off + wid.z * p.c_batch, s);
}

#if TEXTURES
// ---- matmul_rows_split: the rows kernel for staged operands (layout and inner loop in
// lib/rows_split), with this module's batches, K % 4 tail and store.
#include "lib/rows_split"
@compute @workgroup_size(SPLIT_LANES * SPLIT_SUBGROUPS)
fn matmul_rows_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % SPLIT_LANES;
    let n0 = split_first_row(wid.x, lid);
    let m = wid.y;
    let a_base = p.a_off + wid.z * p.a_batch + m * p.lda;
    let b_base = split_b_bases(p.b_off + wid.z * p.b_batch, p.ldb, n0, p.n);
#if BF16B && VEC4
    // a bf16 B's vec4 variant keeps its offsets and leading dimension multiples of 8
    let k_main = p.k & ~7u;
    let acc = split_partials_bf16(a_base, b_base, k_main, lane);
#else
    let k_main = p.k & ~3u;
    let acc = split_partials(a_base, b_base, k_main, lane);
#endif
    for (var r = 0u; r < SPLIT_ROWS; r++) {
        var s = acc[r].x + acc[r].y;
#if !VEC4
        // K's last elements past k_main: lane j takes elements k_main + j, + SPLIT_LANES, ...
        // The vec4 variants have none (K, A's contiguous extent, is a multiple of 4, of 8 for a
        // bf16 B) and must not carry the loop: on llvmpipe a loop of texel fetches that never
        // runs still cost a third of the lm_head product (gemv_probe's 32768 x 640, f32: 10.5
        // ms with it, 6.5 ms without).
        for (var k = k_main + lane; k < p.k; k += SPLIT_LANES) {
            s = fma(a1(a_base + k), b1(b_base[r] + k), s);
        }
#endif
        let total = subgroupAdd(s);
        if (lane == r % SPLIT_LANES && n0 + r < p.n) {
            store(m, n0 + r, p.c_off + wid.z * p.c_batch, total);
        }
    }
}
#endif

@compute @workgroup_size(WG_X, WG_Y, 1)
fn matmul_register(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * TN;
    let m0 = gid.y * TM;
    if (m0 >= p.m || n0 >= p.n) { return; }
    let a_base = p.a_off + gid.z * p.a_batch;
    let b_base = p.b_off + gid.z * p.b_batch;
    let c_base = p.c_off + gid.z * p.c_batch;
    let tn4 = TN / 4u;

    // acc[i * tn4 + j] holds C[m0 + i, n0 + 4j .. n0 + 4j + 4].
    var acc: array<vec4<f32>, 64>;
    for (var i = 0u; i < TM * tn4; i++) { acc[i] = vec4<f32>(0.0); }

    let k4 = p.k & ~3u;
    for (var k = 0u; k < k4; k += 4u) {
        // av[i] = op(A)[m0 + i, k .. k + 4]
        var av: array<vec4<f32>, 16>;
        if (TRANS_A) {
            for (var q = 0u; q < TM; q += 4u) {
                for (var kk = 0u; kk < 4u; kk++) {
                    let v = a4(a_base + (k + kk) * p.lda + m0 + q);
                    av[q][kk] = v.x;
                    av[q + 1u][kk] = v.y;
                    av[q + 2u][kk] = v.z;
                    av[q + 3u][kk] = v.w;
                }
            }
        } else {
            for (var i = 0u; i < TM; i++) { av[i] = a4(a_base + (m0 + i) * p.lda + k); }
        }
        // bv[kk * tn4 + j] = op(B)[k + kk, n0 + 4j .. n0 + 4j + 4]
        var bv: array<vec4<f32>, 16>;
        if (TRANS_B) {
            for (var jj = 0u; jj < TN; jj++) {
                let v = b4(b_base + (n0 + jj) * p.ldb + k);
                let j = jj / 4u;
                let c = jj % 4u;
                bv[j][c] = v.x;
                bv[tn4 + j][c] = v.y;
                bv[2u * tn4 + j][c] = v.z;
                bv[3u * tn4 + j][c] = v.w;
            }
        } else {
            for (var kk = 0u; kk < 4u; kk++) {
                for (var j = 0u; j < tn4; j++) {
                    bv[kk * tn4 + j] = b4(b_base + (k + kk) * p.ldb + n0 + 4u * j);
                }
            }
        }
        for (var kk = 0u; kk < 4u; kk++) {
            for (var i = 0u; i < TM; i++) {
                let a = vec4<f32>(av[i][kk]);
                for (var j = 0u; j < tn4; j++) {
                    acc[i * tn4 + j] = fma(a, bv[kk * tn4 + j], acc[i * tn4 + j]);
                }
            }
        }
    }
    // K not a multiple of 4 (scalar prelude, or TRANS_A where the contiguous dimension is M).
    for (var k = k4; k < p.k; k++) {
        var brow: array<vec4<f32>, 4>;
        for (var j = 0u; j < tn4; j++) {
            brow[j] = vec4<f32>(
                b1(b_base + b_index(k, n0 + 4u * j)),
                b1(b_base + b_index(k, n0 + 4u * j + 1u)),
                b1(b_base + b_index(k, n0 + 4u * j + 2u)),
                b1(b_base + b_index(k, n0 + 4u * j + 3u)));
        }
        for (var i = 0u; i < TM; i++) {
            let a = vec4<f32>(a1(a_base + a_index(m0 + i, k)));
            for (var j = 0u; j < tn4; j++) {
                acc[i * tn4 + j] = fma(a, brow[j], acc[i * tn4 + j]);
            }
        }
    }

    for (var i = 0u; i < TM; i++) {
        let m = m0 + i;
        if (m >= p.m) { break; }
        for (var j = 0u; j < TN; j++) {
            let n = n0 + j;
            if (n >= p.n) { break; }
            store(m, n, c_base, acc[i * tn4 + j / 4u][j % 4u]);
        }
    }
}

// Workgroup-tiled kernel: a BM×BN tile per workgroup, BK deep slices staged in workgroup
// memory, WTM×WTN outputs per invocation.
override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 16u;
override WTM: u32 = 4u;
override WTN: u32 = 4u;
override WGT_X: u32 = 16u; // BN / WTN
override WGT_Y: u32 = 16u; // BM / WTM

var<workgroup> tile_a: array<f32, BM * BK>; // [k][m]
var<workgroup> tile_b: array<f32, BK * BN>; // [k][n]

@compute @workgroup_size(WGT_X, WGT_Y, 1)
fn matmul_workgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lindex: u32,
) {
    let m_tile = wid.y * BM;
    let n_tile = wid.x * BN;
    let a_base = p.a_off + wid.z * p.a_batch;
    let b_base = p.b_off + wid.z * p.b_batch;
    let c_base = p.c_off + wid.z * p.c_batch;
    let threads = WGT_X * WGT_Y;

    var acc: array<f32, 64>;
    for (var i = 0u; i < WTM * WTN; i++) { acc[i] = 0.0; }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var e = lindex; e < BM * BK; e += threads) {
            // Consecutive invocations walk the stored matrix's contiguous dimension.
            var kk: u32; var mm: u32;
            if (TRANS_A) { kk = e / BM; mm = e % BM; } else { mm = e / BK; kk = e % BK; }
            let m = m_tile + mm;
            let k = k0 + kk;
            var v = 0.0;
            if (m < p.m && k < p.k) { v = a1(a_base + a_index(m, k)); }
            tile_a[kk * BM + mm] = v;
        }
        for (var e = lindex; e < BK * BN; e += threads) {
            var kk: u32; var nn: u32;
            if (TRANS_B) { nn = e / BK; kk = e % BK; } else { kk = e / BN; nn = e % BN; }
            let n = n_tile + nn;
            let k = k0 + kk;
            var v = 0.0;
            if (n < p.n && k < p.k) { v = b1(b_base + b_index(k, n)); }
            tile_b[kk * BN + nn] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            for (var i = 0u; i < WTM; i++) {
                let a = tile_a[kk * BM + lid.y * WTM + i];
                for (var j = 0u; j < WTN; j++) {
                    acc[i * WTN + j] = fma(a, tile_b[kk * BN + lid.x * WTN + j], acc[i * WTN + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < WTM; i++) {
        let m = m_tile + lid.y * WTM + i;
        if (m >= p.m) { break; }
        for (var j = 0u; j < WTN; j++) {
            let n = n_tile + lid.x * WTN + j;
            if (n >= p.n) { break; }
            store(m, n, c_base, acc[i * WTN + j]);
        }
    }
}
