//! Embedding gather (f32 or bf16 table, optional scale) and its scatter-add backward, over
//! tables split into chunks (Gemma 3's 262k × 2560 table exceeds one binding).

use anyhow::{bail, ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::check;
use crate::gpu::{groups_1d, Chunk, DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("embedding", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(
        shader()?,
        vec![
            "gather_f32",
            "gather_bf16",
            "scatter_add",
            "scatter_add_bf16",
        ],
    )])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbParams {
    tokens: u32,
    dim: u32,
    first: u32,
    rows: u32,
    vocab: u32,
    skip_id: u32,
    scale: f32,
    round_bf16: u32,
}

impl EmbParams {
    /// The uniform of one dispatch over `chunk` of a `[vocab, dim]` table; `tokens` is what the
    /// kernel walks (tokens, or the distinct ids of the bf16 scatter).
    fn for_chunk(
        chunk: &Chunk,
        tokens: usize,
        vocab: usize,
        dim: usize,
        skip_id: Option<u32>,
        scale: f32,
        round_bf16: bool,
    ) -> Self {
        Self {
            tokens: tokens as u32,
            dim: dim as u32,
            first: chunk.first_row as u32,
            rows: chunk.rows as u32,
            vocab: vocab as u32,
            skip_id: skip_id.unwrap_or(u32::MAX),
            scale,
            round_bf16: round_bf16 as u32,
        }
    }
}

impl Gpu {
    /// `out[t] = table[ids[t]] · scale` (f32 out). With `round_bf16` the product is rounded to
    /// bf16, as torch computes a bf16 table times a bf16 scale. Ids ≥ vocab give NaN rows.
    /// table: [vocab, dim] f32 or bf16 (may be chunked); ids: u32 [tokens]; out: [tokens, dim].
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_gather(
        &self,
        rec: &mut Recorder,
        table: &GpuTensor,
        ids: &GpuTensor,
        out: &GpuTensor,
        scale: f32,
        round_bf16: bool,
    ) -> Result<()> {
        let [vocab, dim] = *table.shape() else {
            bail!(
                "embedding_gather: table must be [vocab, dim], got {:?}",
                table.shape()
            );
        };
        let tokens = ids.numel();
        check("embedding_gather", "ids", ids, DType::U32, tokens)?;
        check("embedding_gather", "out", out, DType::F32, tokens * dim)?;
        let entry = match table.dtype() {
            DType::F32 => "gather_f32",
            DType::BF16 => "gather_bf16",
            d => bail!("embedding_gather: table dtype {d:?} (need f32 or bf16)"),
        };
        let k = self.kernel(&shader()?, entry, &[])?;
        for chunk in table.chunks() {
            let p = EmbParams::for_chunk(chunk, tokens, vocab, dim, None, scale, round_bf16);
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[ids.view()?, chunk.view(), out.view()?],
                groups_1d(self, (tokens * dim).div_ceil(256) as u32),
            );
        }
        Ok(())
    }

    /// `dtable[ids[t]] += dy[t] · scale` for every token except those equal to `skip_id`
    /// (the padding row never receives a gradient). dtable: f32 [vocab, dim] (may be chunked).
    pub fn embedding_scatter_add(
        &self,
        rec: &mut Recorder,
        dtable: &GpuTensor,
        ids: &GpuTensor,
        dy: &GpuTensor,
        scale: f32,
        skip_id: Option<u32>,
    ) -> Result<()> {
        let [vocab, dim] = *dtable.shape() else {
            bail!(
                "embedding_scatter_add: dtable must be [vocab, dim], got {:?}",
                dtable.shape()
            );
        };
        let tokens = ids.numel();
        check(
            "embedding_scatter_add",
            "dtable",
            dtable,
            DType::F32,
            vocab * dim,
        )?;
        check("embedding_scatter_add", "ids", ids, DType::U32, tokens)?;
        check("embedding_scatter_add", "dy", dy, DType::F32, tokens * dim)?;
        let k = self.kernel(&shader()?, "scatter_add", &[])?;
        for chunk in dtable.chunks() {
            let p = EmbParams::for_chunk(chunk, tokens, vocab, dim, skip_id, scale, false);
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[ids.view()?, dy.view()?, chunk.view()],
                groups_1d(self, dim.div_ceil(64) as u32),
            );
        }
        Ok(())
    }
}

impl Gpu {
    /// [`Gpu::embedding_scatter_add`] into a bf16 `dtable` ([vocab, dim], dim even, may be
    /// chunked), the ids given on the host: they are grouped by id here so that each row is
    /// summed in f32 and rounded once (ids ≥ vocab and `skip_id` reach no row).
    pub fn embedding_scatter_add_bf16(
        &self,
        rec: &mut Recorder,
        dtable: &GpuTensor,
        ids: &[u32],
        dy: &GpuTensor,
        scale: f32,
        skip_id: Option<u32>,
    ) -> Result<()> {
        let [vocab, dim] = *dtable.shape() else {
            bail!(
                "embedding_scatter_add_bf16: dtable must be [vocab, dim], got {:?}",
                dtable.shape()
            );
        };
        ensure!(
            dtable.dtype() == DType::BF16 && dim.is_multiple_of(2),
            "embedding_scatter_add_bf16: dtable must be bf16 with an even row length, got {:?} [{vocab}, {dim}]",
            dtable.dtype()
        );
        let tokens = ids.len();
        check(
            "embedding_scatter_add_bf16",
            "dy",
            dy,
            DType::F32,
            tokens * dim,
        )?;
        let mut by_id: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
        for (t, &id) in ids.iter().enumerate() {
            if Some(id) != skip_id && (id as usize) < vocab {
                by_id.entry(id).or_default().push(t as u32);
            }
        }
        if by_id.is_empty() {
            return Ok(());
        }
        let uniq: Vec<u32> = by_id.keys().copied().collect();
        let mut starts = vec![0u32];
        let mut pos = Vec::with_capacity(tokens);
        for p in by_id.values() {
            pos.extend_from_slice(p);
            starts.push(pos.len() as u32);
        }
        let (gu, gs, gp) = (
            self.upload_u32(&[uniq.len()], &uniq)?,
            self.upload_u32(&[starts.len()], &starts)?,
            self.upload_u32(&[pos.len()], &pos)?,
        );
        let k = self.kernel(&shader()?, "scatter_add_bf16", &[])?;
        for chunk in dtable.chunks() {
            let p = EmbParams::for_chunk(chunk, uniq.len(), vocab, dim, skip_id, scale, false);
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[gu.view()?, gs.view()?, gp.view()?, dy.view()?, chunk.view()],
                [(dim / 2).div_ceil(64) as u32, uniq.len() as u32, 1],
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::{cast, embedding as reference};

    fn check_gpu(gpu: &Gpu) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let (vocab, dim, tokens) = (97usize, 21usize, 33usize);
        let table = rng.vec_normal(vocab * dim);
        // Repeated ids (scatter-add must sum them) and the skipped padding id.
        let ids: Vec<u32> = (0..tokens)
            .map(|t| {
                if t % 5 == 0 {
                    3
                } else {
                    rng.below(vocab) as u32
                }
            })
            .collect();
        let gids = gpu.upload_u32(&[tokens], &ids).unwrap();
        let scale = 50.5f32;

        let gtable = gpu.upload_f32(&[vocab, dim], &table).unwrap();
        let out = gpu.empty(&[tokens, dim], DType::F32).unwrap();
        gpu.poison(&out);
        let mut rec = Recorder::new(gpu);
        gpu.embedding_gather(&mut rec, &gtable, &gids, &out, scale, false)
            .unwrap();
        rec.submit();
        let want = reference::gather(&table, dim, &ids, scale, false);
        assert_eq!(gpu.read_f32(&out).unwrap(), want, "seed {seed}: f32 gather");

        let bits: Vec<u16> = table.iter().map(|&v| cast::f32_to_bf16(v)).collect();
        let table_bf16: Vec<f32> = bits.iter().map(|&h| cast::bf16_to_f32(h)).collect();
        let gtable16 = gpu.upload_bf16(&[vocab, dim], &bits).unwrap();
        gpu.poison(&out);
        let mut rec = Recorder::new(gpu);
        gpu.embedding_gather(&mut rec, &gtable16, &gids, &out, scale, true)
            .unwrap();
        rec.submit();
        let want = reference::gather(&table_bf16, dim, &ids, scale, true);
        assert_eq!(
            gpu.read_f32(&out).unwrap(),
            want,
            "seed {seed}: bf16 gather"
        );

        let dy = rng.vec_normal(tokens * dim);
        let d0 = rng.vec_normal(vocab * dim);
        let gdy = gpu.upload_f32(&[tokens, dim], &dy).unwrap();
        let dtable = gpu.upload_f32(&[vocab, dim], &d0).unwrap();
        let mut rec = Recorder::new(gpu);
        gpu.embedding_scatter_add(&mut rec, &dtable, &gids, &gdy, 0.5, Some(ids[1]))
            .unwrap();
        rec.submit();
        let mut want = d0.clone();
        reference::scatter_add(&mut want, dim, &ids, &dy, 0.5, Some(ids[1]));
        let err = rel_frobenius(&gpu.read_f32(&dtable).unwrap(), &want);
        assert!(err < 1e-6, "seed {seed}: scatter_add rel err {err}");
    }

    /// bf16 table gradient: repeated ids, the skipped id, an image id (u32::MAX); the GPU sums
    /// each row in the reference's order, so the bits match exactly.
    fn check_bf16_scatter(gpu: &Gpu) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let (vocab, dim, tokens) = (97usize, 22usize, 33usize);
        let ids: Vec<u32> = (0..tokens)
            .map(|t| match t % 7 {
                0 => 3,
                1 => u32::MAX,
                _ => rng.below(vocab) as u32,
            })
            .collect();
        let dy = rng.vec_normal(tokens * dim);
        let d0: Vec<u16> = rng
            .vec_normal(vocab * dim)
            .iter()
            .map(|&v| cast::f32_to_bf16(v))
            .collect();
        let gdy = gpu.upload_f32(&[tokens, dim], &dy).unwrap();
        let dtable = gpu.upload_bf16(&[vocab, dim], &d0).unwrap();
        let mut rec = Recorder::new(gpu);
        gpu.embedding_scatter_add_bf16(&mut rec, &dtable, &ids, &gdy, 0.5, Some(ids[2]))
            .unwrap();
        rec.submit();
        let mut want = d0.clone();
        reference::scatter_add_bf16(&mut want, dim, &ids, &dy, 0.5, Some(ids[2]));
        let got = gpu.read_bf16(&dtable).unwrap();
        assert_eq!(got, want, "seed {seed}: bf16 scatter_add");
        assert_ne!(got, d0, "seed {seed}: nothing was added");
        let row = ids[2] as usize;
        assert_eq!(
            got[row * dim..][..dim],
            d0[row * dim..][..dim],
            "the skipped id's row"
        );
    }

    #[test]
    fn bf16_scatter_add_matches_reference() {
        check_bf16_scatter(test_gpu());
        check_bf16_scatter(tiny_binding_gpu());
    }

    #[test]
    fn embedding_matches_reference() {
        check_gpu(test_gpu());
    }

    #[test]
    fn embedding_over_chunked_tables() {
        check_gpu(tiny_binding_gpu());
    }

    #[test]
    fn out_of_range_ids_give_nan_rows() {
        let gpu = test_gpu();
        let table = gpu.upload_f32(&[4, 3], &[1.0; 12]).unwrap();
        let ids = gpu.upload_u32(&[2], &[1, 9]).unwrap();
        let out = gpu.empty(&[2, 3], DType::F32).unwrap();
        let mut rec = Recorder::new(gpu);
        gpu.embedding_gather(&mut rec, &table, &ids, &out, 1.0, false)
            .unwrap();
        rec.submit();
        let got = gpu.read_f32(&out).unwrap();
        assert_eq!(&got[..3], &[1.0; 3]);
        assert!(got[3..].iter().all(|v| v.is_nan()));
    }
}
