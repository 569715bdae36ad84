//! Embedding gather and its scatter-add backward. table: [vocab, dim]; ids: [tokens].

/// f32 → bf16 → f32 with round-to-nearest-even (NaN preserved), as torch rounds.
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits((super::cast::f32_to_bf16(v) as u32) << 16)
}

/// out [tokens, dim] = table[ids] · scale (rounded to bf16 when `round_bf16`, as a bf16
/// table times a bf16 scale is in torch). Ids ≥ vocab give NaN rows.
pub fn gather(table: &[f32], dim: usize, ids: &[u32], scale: f32, round: bool) -> Vec<f32> {
    let vocab = table.len() / dim;
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        for j in 0..dim {
            if id as usize >= vocab {
                out.push(f32::NAN);
                continue;
            }
            let v = table[id as usize * dim + j] * scale;
            out.push(if round { round_bf16(v) } else { v });
        }
    }
    out
}

/// dtable[ids[t]] += dy[t] · scale, skipping `skip_id` (padding_idx). dtable: [vocab, dim].
/// [`scatter_add`] into a bf16 table (raw bits): each row's contributions summed in f32 in
/// token order, then added to the row with one rounding per element. Ids at or beyond the
/// table (image soft tokens carry `u32::MAX`) and `skip_id` reach no row.
pub fn scatter_add_bf16(
    dtable: &mut [u16],
    dim: usize,
    ids: &[u32],
    dy: &[f32],
    scale: f32,
    skip_id: Option<u32>,
) {
    use crate::reference::cast::{bf16_to_f32, f32_to_bf16};
    let rows = dtable.len() / dim;
    let mut sums: std::collections::BTreeMap<u32, Vec<f32>> = Default::default();
    for (t, &id) in ids.iter().enumerate() {
        if Some(id) == skip_id || id as usize >= rows {
            continue;
        }
        let acc = sums.entry(id).or_insert_with(|| vec![0.0; dim]);
        for (j, a) in acc.iter_mut().enumerate() {
            *a += dy[t * dim + j] * scale;
        }
    }
    for (id, acc) in sums {
        let row = &mut dtable[id as usize * dim..][..dim];
        for (d, a) in row.iter_mut().zip(acc) {
            *d = f32_to_bf16(bf16_to_f32(*d) + a);
        }
    }
}

pub fn scatter_add(
    dtable: &mut [f32],
    dim: usize,
    ids: &[u32],
    dy: &[f32],
    scale: f32,
    skip_id: Option<u32>,
) {
    for (t, &id) in ids.iter().enumerate() {
        if Some(id) == skip_id {
            continue;
        }
        for j in 0..dim {
            dtable[id as usize * dim + j] += dy[t * dim + j] * scale;
        }
    }
}
