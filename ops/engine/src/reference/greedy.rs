//! Greedy choice of the next token (`shaders/greedy.wgsl`): torch.argmax per row, pad ids for
//! rows that have stopped, and the stop marks a stop id sets.

/// torch.argmax over one row: the first index of the largest value, a NaN counting as larger
/// than every number (the first NaN wins). 0 for an empty row.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate().skip(1) {
        let b = row[best];
        if (v.is_nan() && !b.is_nan()) || (!b.is_nan() && v > b) {
            best = i;
        }
    }
    best as u32
}

/// One greedy step for `logits [rows, vocab]`: each row's next id, `pad_id` for a row already
/// `stopped`; a row whose id is in `stop_ids` is marked stopped (it still returns that id).
pub fn choose_next(
    logits: &[f32],
    vocab: usize,
    stopped: &mut [bool],
    stop_ids: &[u32],
    pad_id: u32,
) -> Vec<u32> {
    assert_eq!(logits.len(), stopped.len() * vocab, "logits [rows, vocab]");
    stopped
        .iter_mut()
        .zip(logits.chunks(vocab.max(1)))
        .map(|(s, row)| {
            if *s {
                return pad_id;
            }
            let id = argmax(row);
            *s = stop_ids.contains(&id);
            id
        })
        .collect()
}
