//! LoRA forward `y += s·dropout(x)·Aᵀ·Bᵀ` and backward (dA, dB, dx contribution). The dropout
//! mask is a hash of (seed, element index), regenerated in backward instead of stored; the
//! products run on the matmul kernel with its scale/accumulate epilogues.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::{check, rows_cols};
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, MatmulOpts, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("lora", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(shader()?, vec!["dropout"])])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DropoutParams {
    n: u32,
    seed: u32,
    p: f32,
    beta: f32,
    inv_keep: f32,
    offset: u32,
    _pad: [u32; 2],
}

/// One LoRA adapter on a linear layer: A [r, in], B [out, r] (f32 master weights),
/// `scale` = lora_alpha / r (or / sqrt(r) with rsLoRA), dropout probability and the mask seed
/// of this step (use a fresh seed per layer and micro-step; backward needs the same one).
#[derive(Clone, Copy)]
pub struct Lora<'a> {
    pub a: &'a GpuTensor,
    pub b: &'a GpuTensor,
    pub scale: f32,
    pub dropout: f32,
    pub seed: u32,
    /// Mask index of `x`'s first element (mod 2³²): 0 for a whole call; `first_row · in` when
    /// `x` is rows `first_row..` of a call run in slices (one image at a time), so each slice
    /// draws exactly the mask of the whole call.
    pub offset: u32,
}

impl Lora<'_> {
    fn dims(&self) -> Result<(usize, usize, usize)> {
        let [r, d_in] = *self.a.shape() else {
            anyhow::bail!("lora: A must be [r, in], got {:?}", self.a.shape())
        };
        let [d_out, rb] = *self.b.shape() else {
            anyhow::bail!("lora: B must be [out, r], got {:?}", self.b.shape())
        };
        ensure!(rb == r, "lora: A is [{r}, {d_in}] but B is [{d_out}, {rb}]");
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora: dropout {} must be in [0, 1)",
            self.dropout
        );
        Ok((r, d_in, d_out))
    }
}

impl Gpu {
    /// `dst = beta·dst + dropout(src)` with the seeded mask, `src[i]` drawing mask element
    /// `offset + i` (unchunked tensors of equal size).
    #[allow(clippy::too_many_arguments)]
    pub fn dropout(
        &self,
        rec: &mut Recorder,
        src: &GpuTensor,
        dst: &GpuTensor,
        p: f32,
        seed: u32,
        offset: u32,
        beta: f32,
    ) -> Result<()> {
        check("dropout", "dst", dst, DType::F32, src.numel())?;
        let n = src.numel();
        let params = DropoutParams {
            n: n as u32,
            seed,
            p,
            beta,
            inv_keep: 1.0 / (1.0 - p),
            offset,
            _pad: [0; 2],
        };
        let k = self.kernel(&shader()?, "dropout", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&params),
            &[src.view()?, dst.view()?],
            groups_1d(self, n.div_ceil(256) as u32),
        );
        Ok(())
    }

    /// `y += scale · dropout(x) · Aᵀ · Bᵀ`; writes `h = dropout(x)·Aᵀ` [rows, r] for backward.
    /// x: [..., in], y: [..., out] (same leading dims).
    pub fn lora_forward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        lora: &Lora,
        y: &GpuTensor,
        h: &GpuTensor,
    ) -> Result<()> {
        let (r, d_in, d_out) = lora.dims()?;
        let (rows, cols) = rows_cols(x);
        ensure!(
            cols == d_in,
            "lora_forward: x has {cols} features, A expects {d_in}"
        );
        check("lora_forward", "y", y, DType::F32, rows * d_out)?;
        check("lora_forward", "h", h, DType::F32, rows * r)?;
        let x2 = x.reshape(&[rows, d_in])?;
        let y2 = y.reshape(&[rows, d_out])?;
        let h2 = h.reshape(&[rows, r])?;
        let xd = if lora.dropout > 0.0 {
            let xd = self.empty(&[rows, d_in], DType::F32)?;
            self.dropout(rec, &x2, &xd, lora.dropout, lora.seed, lora.offset, 0.0)?;
            xd
        } else {
            x2
        };
        self.matmul(
            rec,
            &xd,
            lora.a,
            &h2,
            MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )?;
        self.matmul(
            rec,
            &h2,
            lora.b,
            &y2,
            MatmulOpts {
                trans_b: true,
                alpha: lora.scale,
                beta: 1.0,
                ..Default::default()
            },
        )
    }

    /// Backward of [`Gpu::lora_forward`]: `da` [r, in] and `db` [out, r] (overwritten, or
    /// accumulated with `accumulate`), and `dx += dropout'(scale·dy·B·A)` when `dx` is given.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        lora: &Lora,
        h: &GpuTensor,
        dy: &GpuTensor,
        da: &GpuTensor,
        db: &GpuTensor,
        dx: Option<&GpuTensor>,
        accumulate: bool,
    ) -> Result<()> {
        let (r, d_in, d_out) = lora.dims()?;
        let (rows, cols) = rows_cols(x);
        ensure!(
            cols == d_in,
            "lora_backward: x has {cols} features, A expects {d_in}"
        );
        check("lora_backward", "dy", dy, DType::F32, rows * d_out)?;
        check("lora_backward", "h", h, DType::F32, rows * r)?;
        check("lora_backward", "da", da, DType::F32, r * d_in)?;
        check("lora_backward", "db", db, DType::F32, d_out * r)?;
        let x2 = x.reshape(&[rows, d_in])?;
        let dy2 = dy.reshape(&[rows, d_out])?;
        let h2 = h.reshape(&[rows, r])?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        // dB = s · dyᵀ · h
        self.matmul(
            rec,
            &dy2,
            &h2,
            db,
            MatmulOpts {
                trans_a: true,
                alpha: lora.scale,
                beta,
                ..Default::default()
            },
        )?;
        // dh = s · dy · B
        let dh = self.empty(&[rows, r], DType::F32)?;
        self.matmul(
            rec,
            &dy2,
            lora.b,
            &dh,
            MatmulOpts {
                alpha: lora.scale,
                ..Default::default()
            },
        )?;
        // dA = dhᵀ · dropout(x)
        let xd = if lora.dropout > 0.0 {
            let xd = self.empty(&[rows, d_in], DType::F32)?;
            self.dropout(rec, &x2, &xd, lora.dropout, lora.seed, lora.offset, 0.0)?;
            xd
        } else {
            x2
        };
        self.matmul(
            rec,
            &dh,
            &xd,
            da,
            MatmulOpts {
                trans_a: true,
                beta,
                ..Default::default()
            },
        )?;
        if let Some(dx) = dx {
            check("lora_backward", "dx", dx, DType::F32, rows * d_in)?;
            let dx2 = dx.reshape(&[rows, d_in])?;
            if lora.dropout > 0.0 {
                let dxd = self.empty(&[rows, d_in], DType::F32)?;
                self.matmul(rec, &dh, lora.a, &dxd, MatmulOpts::default())?;
                self.dropout(rec, &dxd, &dx2, lora.dropout, lora.seed, lora.offset, 1.0)?;
            } else {
                self.matmul(
                    rec,
                    &dh,
                    lora.a,
                    &dx2,
                    MatmulOpts {
                        beta: 1.0,
                        ..Default::default()
                    },
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::lora as reference;

    /// The dropout kernel alone, element for element against the reference: fresh random
    /// inputs at odd sizes, a poisoned destination (beta 0) and an accumulated one (beta 1),
    /// mask offsets 0, random and wrapping past 2³².
    #[test]
    fn dropout_matches_reference_at_any_offset() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(n, p, offset) in &[
            (1usize, 0.5f32, 0u32),
            (1001, 0.1, rng.next_u64() as u32),
            (70_001, 0.3, u32::MAX - 500),
            (4099, 0.0, 12_345),
        ] {
            let mask_seed = rng.next_u64() as u32;
            let src = rng.vec_normal(n);
            let acc = rng.vec_normal(n);
            let gsrc = gpu.upload_f32(&[n], &src).unwrap();
            let fresh = gpu.empty(&[n], DType::F32).unwrap();
            gpu.poison(&fresh);
            let summed = gpu.upload_f32(&[n], &acc).unwrap();
            let mut rec = Recorder::new(gpu);
            gpu.dropout(&mut rec, &gsrc, &fresh, p, mask_seed, offset, 0.0)
                .unwrap();
            gpu.dropout(&mut rec, &gsrc, &summed, p, mask_seed, offset, 1.0)
                .unwrap();
            rec.submit();
            let want = reference::dropout(&src, p, mask_seed, offset);
            let want_summed: Vec<f32> = want.iter().zip(&acc).map(|(w, a)| w + a).collect();
            // One multiply (and one add) per element on both sides: equal to the bit.
            assert_eq!(
                gpu.read_f32(&fresh).unwrap(),
                want,
                "seed {seed}: n {n} p {p} offset {offset}"
            );
            assert_eq!(
                gpu.read_f32(&summed).unwrap(),
                want_summed,
                "seed {seed}: n {n} p {p} offset {offset}, accumulated"
            );
        }
    }

    #[test]
    fn lora_forward_backward_match_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // Mask offsets: a whole call (0), a slice of rows of a larger call (random), and one
        // whose indices wrap past 2³² inside the slice.
        for &(t, d_in, d_out, r, p, offset) in &[
            (13usize, 37usize, 29usize, 4usize, 0.1f32, 0u32),
            (11, 41, 23, 3, 0.3, rng.next_u64() as u32),
            (7, 33, 19, 2, 0.2, u32::MAX - 100),
            (5, 16, 24, 8, 0.0, 0),
        ] {
            let (x, a, b) = (
                rng.vec_normal(t * d_in),
                rng.vec_normal(r * d_in),
                rng.vec_normal(d_out * r),
            );
            let (y0, dy, dx0) = (
                rng.vec_normal(t * d_out),
                rng.vec_normal(t * d_out),
                rng.vec_normal(t * d_in),
            );
            let (scale, mask_seed) = (2.0f32, rng.next_u64() as u32);
            let up = |s: &[usize], d: &[f32]| gpu.upload_f32(s, d).unwrap();
            let (gx, ga, gb) = (up(&[t, d_in], &x), up(&[r, d_in], &a), up(&[d_out, r], &b));
            let (gy, gdy, gdx) = (
                up(&[t, d_out], &y0),
                up(&[t, d_out], &dy),
                up(&[t, d_in], &dx0),
            );
            let poisoned = |s: &[usize]| {
                let g = gpu.empty(s, DType::F32).unwrap();
                gpu.poison(&g);
                g
            };
            let (gh, gda, gdb) = (
                poisoned(&[t, r]),
                poisoned(&[r, d_in]),
                poisoned(&[d_out, r]),
            );
            let lora = Lora {
                a: &ga,
                b: &gb,
                scale,
                dropout: p,
                seed: mask_seed,
                offset,
            };
            let mut rec = Recorder::new(gpu);
            gpu.lora_forward(&mut rec, &gx, &lora, &gy, &gh).unwrap();
            gpu.lora_backward(
                &mut rec,
                &gx,
                &lora,
                &gh,
                &gdy,
                &gda,
                &gdb,
                Some(&gdx),
                false,
            )
            .unwrap();
            rec.submit();
            let (want_y, want_h) = reference::lora_forward(
                &x, &a, &b, &y0, t, d_in, d_out, r, scale, p, mask_seed, offset,
            );
            let (want_da, want_db, want_dx) = reference::lora_backward(
                &x, &a, &b, &want_h, &dy, t, d_in, d_out, r, scale, p, mask_seed, offset,
            );
            let want_dx_acc: Vec<f32> = want_dx.iter().zip(&dx0).map(|(a, b)| a + b).collect();
            for (name, got, want) in [
                ("y", gpu.read_f32(&gy).unwrap(), want_y),
                ("h", gpu.read_f32(&gh).unwrap(), want_h),
                ("dA", gpu.read_f32(&gda).unwrap(), want_da),
                ("dB", gpu.read_f32(&gdb).unwrap(), want_db),
                ("dx", gpu.read_f32(&gdx).unwrap(), want_dx_acc),
            ] {
                let err = rel_frobenius(&got, &want);
                assert!(
                    err < 1e-5,
                    "seed {seed}: lora p={p} offset {offset} {name}: rel err {err}"
                );
            }
        }
    }
}
