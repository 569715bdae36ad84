// Greedy choice of every row's next token on the GPU, so that a decode step can follow the
// previous one without the host reading the logits in between (ops/model's pipelined greedy
// generation). Per row r of a chunk of logits [rows, vocab]:
//   ids[first_row + r] = pad_id                       if the row has stopped,
//                        argmax(logits[r])           otherwise (torch.argmax: the first
//                                                     maximum, a NaN above every number);
//   stopped[first_row + r] = 1 when that argmax is one of stop_ids.
// One workgroup per row: each invocation scans a strided slice in ascending order (keeping the
// first maximum it meets), then a tree folds the 256 candidates, ties to the lower index.
// `choose4` reads the row as vec4s (vocab a multiple of 4). Reference:
// ops/engine/src/reference/greedy.rs.

struct Params {
    vocab: u32,
    first_row: u32,
    stop_count: u32,
    pad_id: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> stop_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> stopped: array<u32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read> logits: array<f32>;
@group(0) @binding(4) var<storage, read> logits4: array<vec4<f32>>;

const WG: u32 = 256u;
// An index no row has: loses every tie, so an idle invocation never wins.
const NO_INDEX: u32 = 0xffffffffu;
var<workgroup> best_values: array<f32, 256>;
var<workgroup> best_indices: array<u32, 256>;

// NaN by its bits: a comparison could be folded away by a compiler that assumes no NaNs.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Whether (v, i) comes before (best, best_i) in torch.argmax's order: NaN first, then larger
// values, then the lower index.
fn better(v: f32, i: u32, best: f32, best_i: u32) -> bool {
    let v_nan = is_nan(v);
    let b_nan = is_nan(best);
    if (v_nan != b_nan) { return v_nan; }
    if (!v_nan && v != best) { return v > best; }
    return i < best_i;
}

// Folds the workgroup's candidates and writes the row's choice.
fn finish_row(row: u32, lid: u32, value: f32, index: u32) {
    best_values[lid] = value;
    best_indices[lid] = index;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (lid < s && better(best_values[lid + s], best_indices[lid + s], best_values[lid],
                              best_indices[lid])) {
            best_values[lid] = best_values[lid + s];
            best_indices[lid] = best_indices[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let r = p.first_row + row;
        if (stopped[r] != 0u) {
            ids[r] = p.pad_id;
            return;
        }
        let id = best_indices[0];
        ids[r] = id;
        for (var s = 0u; s < p.stop_count; s++) {
            if (stop_ids[s] == id) { stopped[r] = 1u; }
        }
    }
}

@compute @workgroup_size(256)
fn choose(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * p.vocab;
    var value = bitcast<f32>(0xff800000u); // -inf
    var index = NO_INDEX;
    for (var i = lid; i < p.vocab; i += WG) {
        let v = logits[base + i];
        if (better(v, i, value, index)) {
            value = v;
            index = i;
        }
    }
    finish_row(wid.x, lid, value, index);
}

@compute @workgroup_size(256)
fn choose4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let quads = p.vocab / 4u;
    let base = wid.x * quads;
    var value = bitcast<f32>(0xff800000u); // -inf
    var index = NO_INDEX;
    for (var q = lid; q < quads; q += WG) {
        let v = logits4[base + q];
        for (var c = 0u; c < 4u; c++) {
            if (better(v[c], q * 4u + c, value, index)) {
                value = v[c];
                index = q * 4u + c;
            }
        }
    }
    finish_row(wid.x, lid, value, index);
}
