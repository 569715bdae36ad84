//! The rows kernels' row-block layout of a frozen weight (`shaders/row_blocks.wgsl`): the
//! inverse walk of the kernel's, each source texel sent to where the layout puts it.

/// Rows per block: `SPLIT_ROWS` of `shaders/lib/rows_split.wgsl`.
pub const BLOCK_ROWS: usize = 8;

/// `src`: `rows` rows of `row_texels` texels of four u32 words each (`row_texels` a multiple
/// of `lanes`). Returns the layout's words: the rows rounded up to whole blocks (zero rows
/// past `rows`), and within a block, for each chunk of `lanes` texels of a row, the chunk of
/// each of the block's rows in turn.
pub fn row_blocks(src: &[u32], rows: usize, row_texels: usize, lanes: usize) -> Vec<u32> {
    assert_eq!(src.len(), rows * row_texels * 4, "row_blocks: source size");
    assert!(
        lanes > 0 && row_texels.is_multiple_of(lanes),
        "row_blocks: {row_texels} texels per row are not whole chunks of {lanes}"
    );
    let chunks = row_texels / lanes;
    let mut out = vec![0u32; rows.next_multiple_of(BLOCK_ROWS) * row_texels * 4];
    for row in 0..rows {
        let (block, r) = (row / BLOCK_ROWS, row % BLOCK_ROWS);
        for texel in 0..row_texels {
            let (chunk, lane) = (texel / lanes, texel % lanes);
            let to = ((block * chunks + chunk) * BLOCK_ROWS + r) * lanes + lane;
            let from = row * row_texels + texel;
            out[4 * to..4 * to + 4].copy_from_slice(&src[4 * from..4 * from + 4]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_laid_blocks() {
        // 9 rows of 2 texels, chunks of 1 texel: texel (row, j) holds words 100·row + 10·j + c
        let (rows, row_texels, lanes) = (9, 2, 1);
        let src: Vec<u32> = (0..rows)
            .flat_map(|row| {
                (0..row_texels).flat_map(move |j| (0..4).map(move |c| 100 * row + 10 * j + c))
            })
            .collect();
        let out = row_blocks(&src, rows as usize, row_texels as usize, lanes);
        assert_eq!(out.len(), 16 * 2 * 4);
        let texel = |t: usize| out[4 * t];
        // block 0: chunk 0 of rows 0..8, then chunk 1 of rows 0..8
        assert_eq!(
            (0..8).map(texel).collect::<Vec<_>>(),
            [0, 100, 200, 300, 400, 500, 600, 700]
        );
        assert_eq!(
            (8..16).map(texel).collect::<Vec<_>>(),
            [10, 110, 210, 310, 410, 510, 610, 710]
        );
        // block 1: row 8, then seven zero rows, per chunk
        assert_eq!(texel(16), 800);
        assert_eq!(texel(24), 810);
        assert!(out[4 * 17..4 * 24].iter().all(|&w| w == 0));
        assert_eq!(&out[4 * 24..4 * 24 + 4], &[810, 811, 812, 813]);
    }
}
