//! Frozen weights staged in the rows kernels' row-block layout (`shaders/row_blocks.wgsl`, read
//! by `matmul_rows_split` and `matmul_rows_group` with `ROW_BLOCKS`): on CPU adapters, the
//! weights a generation's decode steps multiply by a few rows.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::recorder::Bound;
use crate::gpu::staging::{self, StagedTexture};
use crate::gpu::{BufView, Gpu, Recorder, Shader};
pub use crate::reference::row_blocks::BLOCK_ROWS;

fn shader() -> Result<Shader> {
    Shader::compose("row_blocks", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(shader()?, vec!["row_blocks"])])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RowBlockParams {
    rows: u32,
    row_texels: u32,
    lane_bits: u32,
    padded_rows: u32,
}

/// Texels per row of a `[rows, k]` weight (f32, or bf16 with `bf16`: 4 or 8 elements per
/// texel) when a rows kernel of `lanes` lanes can read it in row blocks: its rows must be whole
/// texels, and whole K steps of `lanes` texels (every hidden and intermediate size of Gemma 3),
/// `lanes` a power of two (as every subgroup width is).
pub fn row_block_texels(k: usize, bf16: bool, lanes: u32) -> Option<u32> {
    let per_texel = if bf16 { 8 } else { 4 };
    let texels = k / per_texel;
    (k > 0
        && k.is_multiple_of(per_texel)
        && lanes.is_power_of_two()
        && texels.is_multiple_of(lanes as usize))
    .then_some(texels as u32)
}

/// Texels of the row-block layout of `rows` rows of `row_texels` texels (whole blocks).
pub fn row_block_layout_texels(rows: usize, row_texels: u32) -> u64 {
    rows.next_multiple_of(BLOCK_ROWS) as u64 * row_texels as u64
}

impl Gpu {
    /// Records the row-block layout of `view` (`rows` rows of `row_texels` texels, as
    /// `shaders/row_blocks.wgsl` describes) into `texture` from its row `first_row` on, for a
    /// rows kernel of `lanes` lanes: laid out into a pooled buffer, then copied. The layout
    /// must fit one binding ([`row_blocks_fit`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_row_blocks(
        &self,
        rec: &mut Recorder,
        view: &BufView,
        texture: &StagedTexture,
        first_row: u32,
        rows: usize,
        row_texels: u32,
        lanes: u32,
    ) -> Result<()> {
        ensure!(
            view.size == rows as u64 * row_texels as u64 * 16,
            "row blocks: a view of {} bytes is not {rows} rows of {row_texels} texels",
            view.size
        );
        ensure!(
            lanes.is_power_of_two() && row_texels.is_multiple_of(lanes),
            "row blocks: {row_texels} texels per row are not whole chunks of {lanes} lanes (a power of two)"
        );
        let texels = row_block_layout_texels(rows, row_texels);
        let dst_first = first_row as u64 * staging::STAGE_WIDTH as u64;
        ensure!(
            (dst_first + texels) * 16 <= texture.bytes(),
            "row blocks: {texels} texels from texture row {first_row} do not fit a texture of {} bytes",
            texture.bytes()
        );
        let padded_rows = u32::try_from(rows.next_multiple_of(BLOCK_ROWS))?;
        let params = RowBlockParams {
            rows: rows as u32,
            row_texels,
            lane_bits: lanes.trailing_zeros(),
            padded_rows,
        };
        let kernel = self.kernel(&shader()?, "row_blocks", &[])?;
        let groups = [row_texels.div_ceil(8), padded_rows / 8, 1];
        let max = self.limits().max_compute_workgroups_per_dimension;
        ensure!(
            groups[1] <= max,
            "row blocks: {rows} rows pass the adapter's {max} workgroups per dimension"
        );
        let laid_out = BufView {
            buffer: self.alloc_storage(texels * 16),
            offset: 0,
            size: texels * 16,
        };
        rec.dispatch_bound(
            &kernel,
            bytemuck::bytes_of(&params),
            &[Bound::Buffer(view.clone()), Bound::Buffer(laid_out.clone())],
            groups,
        );
        rec.copy_to_texture(&laid_out, texture, first_row);
        Ok(())
    }
}

/// Whether the row-block layout of `rows` rows of `row_texels` texels fits one storage
/// binding (the layout kernel writes it whole) and the adapter's texture height.
pub fn row_blocks_fit(gpu: &Gpu, rows: usize, row_texels: u32) -> bool {
    row_block_layout_texels(rows, row_texels) * 16 <= gpu.max_binding_bytes()
        && row_block_texture_rows(rows, row_texels) <= gpu.limits().max_texture_dimension_2d
}

/// Texture rows of the row-block layout of `rows` rows of `row_texels` texels.
pub fn row_block_texture_rows(rows: usize, row_texels: u32) -> u32 {
    staging::rows_for(row_block_layout_texels(rows, row_texels) * 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::staging::StageFormat;
    use crate::gpu::testing::{test_gpu, TestRng};

    /// The layout of a random weight, read back word for word, against the reference.
    fn check(first_row: u32, rows: usize, row_texels: u32, lanes: u32) {
        let gpu = test_gpu();
        if !gpu.stages_operands() {
            eprintln!("this adapter does not stage operands");
            return;
        }
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let words: Vec<u32> = (0..rows * row_texels as usize * 4)
            .map(|_| rng.next_u64() as u32)
            .collect();
        let src = gpu.upload_u32(&[words.len()], &words).unwrap();
        let texels = row_block_layout_texels(rows, row_texels);
        let texture = gpu.staging.lock().unwrap().texture(
            &gpu.device,
            StageFormat::U32,
            first_row + row_block_texture_rows(rows, row_texels),
        );
        let n = (texels * 4) as usize;
        let poison = gpu.upload_u32(&[n], &vec![0xDEAD_BEEF; n]).unwrap();
        let mut rec = Recorder::new(gpu);
        // every texel poisoned first (a layout of as many rows as the blocks hold), so the
        // padding rows must be written as zeros
        let padded = rows.next_multiple_of(BLOCK_ROWS);
        gpu.record_row_blocks(
            &mut rec,
            &poison.view().unwrap(),
            &texture,
            first_row,
            padded,
            row_texels,
            lanes,
        )
        .unwrap();
        gpu.record_row_blocks(
            &mut rec,
            &src.view().unwrap(),
            &texture,
            first_row,
            rows,
            row_texels,
            lanes,
        )
        .unwrap();
        rec.submit();
        let got = staging::read_texture_words(gpu, &texture, first_row * staging::STAGE_WIDTH, n);
        let want = crate::reference::row_blocks::row_blocks(
            &words,
            rows,
            row_texels as usize,
            lanes as usize,
        );
        assert_eq!(got.len(), want.len());
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "seed {seed}: {rows} rows x {row_texels} texels, {lanes} lanes, from texture row {first_row}: word {i} is {:#x}, want {:#x}",
                got[i], want[i]
            );
        }
    }

    #[test]
    fn layout_matches_the_reference() {
        // whole and partial last blocks, one and several chunks per row, 4 to 16 lanes
        check(0, 16, 8, 8);
        check(0, 37, 80, 8);
        check(0, 3, 4, 4);
        check(0, 70, 32, 16);
        // past one texture row (4096 texels); from a later texture row (a group's member)
        check(0, 75, 160, 8);
        check(2, 37, 80, 8);
    }

    #[test]
    fn only_whole_k_steps_use_row_blocks() {
        assert_eq!(row_block_texels(640, true, 8), Some(80));
        assert_eq!(row_block_texels(640, false, 8), Some(160));
        assert_eq!(row_block_texels(2560, true, 16), Some(320));
        // 72 bf16 elements: 9 texels, not whole steps of 8 lanes; K not whole texels
        assert_eq!(row_block_texels(72, true, 8), None);
        assert_eq!(row_block_texels(36, true, 4), None);
        assert_eq!(row_block_texels(0, true, 8), None);
    }
}
