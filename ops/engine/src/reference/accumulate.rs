//! In-place accumulation `acc += addend`, the addend's rows repeating over `acc`'s rows: the
//! truth `shaders/accumulate.wgsl` is tested against. Residual connections use an addend of
//! `acc`'s own shape; the SigLIP position embedding `[patches, hidden]` repeats over the images
//! of `acc [images * patches, hidden]`.

use anyhow::{ensure, Result};

/// `acc [n]` += `addend [period]` repeated (`n` a multiple of `period`).
pub fn accumulate(acc: &mut [f32], addend: &[f32]) -> Result<()> {
    ensure!(
        !addend.is_empty() && acc.len().is_multiple_of(addend.len()),
        "accumulate: {} values are not a whole number of {}-value addends",
        acc.len(),
        addend.len()
    );
    for chunk in acc.chunks_exact_mut(addend.len()) {
        chunk.iter_mut().zip(addend).for_each(|(a, b)| *a += b);
    }
    Ok(())
}
