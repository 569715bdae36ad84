//! Rotary position embedding (rotate-half), in place, forward and backward.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::check;
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, Shader};
use crate::reference::rope as reference;

fn shader() -> Result<Shader> {
    Shader::compose("rope", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(shader()?, vec!["rope"])])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RopeParams {
    rows: u32,
    heads: u32,
    half: u32,
    n_pos: u32,
    direction: f32,
    _pad: [u32; 3],
}

/// cos/sin tables [n_pos, head_dim/2] for one rope base and linear scaling factor.
pub struct RopeTables {
    pub cos: GpuTensor,
    pub sin: GpuTensor,
    pub head_dim: usize,
    pub n_pos: usize,
}

impl Gpu {
    /// Builds the tables on the host (f32 as transformers computes inv_freq and angles) and
    /// uploads them. `factor` is the linear scaling factor (1.0 for none).
    pub fn rope_tables(
        &self,
        base: f32,
        factor: f32,
        head_dim: usize,
        n_pos: usize,
    ) -> Result<RopeTables> {
        ensure!(
            head_dim.is_multiple_of(2) && head_dim > 0,
            "rope: head_dim {head_dim} must be even"
        );
        let inv = reference::inv_freq(base, head_dim, factor);
        let (cos, sin) = reference::cos_sin_tables(&inv, n_pos);
        Ok(RopeTables {
            cos: self.upload_f32(&[n_pos, head_dim / 2], &cos)?,
            sin: self.upload_f32(&[n_pos, head_dim / 2], &sin)?,
            head_dim,
            n_pos,
        })
    }

    /// Rotates x [tokens, heads, head_dim] in place by each token's position (`positions`: u32
    /// [tokens]); `backward` rotates by the negative angle (the gradient of the forward).
    /// Positions beyond the table are clamped to its last row.
    pub fn rope(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        positions: &GpuTensor,
        tables: &RopeTables,
        backward: bool,
    ) -> Result<()> {
        let [tokens, heads, head_dim] = *x.shape() else {
            anyhow::bail!(
                "rope: x must be [tokens, heads, head_dim], got {:?}",
                x.shape()
            );
        };
        ensure!(
            head_dim == tables.head_dim,
            "rope: head_dim {head_dim} but tables for {}",
            tables.head_dim
        );
        check("rope", "x", x, DType::F32, tokens * heads * head_dim)?;
        check("rope", "positions", positions, DType::U32, tokens)?;
        let half = head_dim / 2;
        let p = RopeParams {
            rows: (tokens * heads) as u32,
            heads: heads as u32,
            half: half as u32,
            n_pos: tables.n_pos as u32,
            direction: if backward { -1.0 } else { 1.0 },
            _pad: [0; 3],
        };
        let k = self.kernel(&shader()?, "rope", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[
                x.view()?,
                positions.view()?,
                tables.cos.view()?,
                tables.sin.view()?,
            ],
            groups_1d(self, (tokens * heads * half).div_ceil(256) as u32),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};

    #[test]
    fn rope_forward_backward_match_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // Gemma: local base 10k; global 1M with linear factor 8.
        for &(base, factor, tokens, heads, head_dim) in &[
            (10_000.0f32, 1.0f32, 13usize, 3usize, 38usize),
            (1e6, 8.0, 7, 2, 256),
        ] {
            let n_pos = 40;
            let tables = gpu.rope_tables(base, factor, head_dim, n_pos).unwrap();
            let inv = reference::inv_freq(base, head_dim, factor);
            let (cos, sin) = reference::cos_sin_tables(&inv, n_pos);
            let x = rng.vec_normal(tokens * heads * head_dim);
            let positions: Vec<u32> = (0..tokens).map(|_| rng.below(n_pos) as u32).collect();
            let gpos = gpu.upload_u32(&[tokens], &positions).unwrap();
            for backward in [false, true] {
                let gx = gpu.upload_f32(&[tokens, heads, head_dim], &x).unwrap();
                let mut rec = Recorder::new(gpu);
                gpu.rope(&mut rec, &gx, &gpos, &tables, backward).unwrap();
                rec.submit();
                let want = reference::rope(&x, &positions, &cos, &sin, heads, head_dim, backward);
                let err = rel_frobenius(&gpu.read_f32(&gx).unwrap(), &want);
                assert!(
                    err < 1e-6,
                    "seed {seed}: rope base {base} backward {backward}: rel err {err}"
                );
            }
        }
    }
}
