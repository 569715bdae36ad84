//! f32 ⇄ bf16 casts (round to nearest even), over chunked tensors.

use anyhow::{bail, ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::{groups_1d, BufView, DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("cast", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(
        shader()?,
        vec!["f32_to_bf16", "bf16_to_f32", "add_f32_into_bf16"],
    )])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CastParams {
    n: u32,
    src_off: u32,
    dst_off: u32,
    _pad: u32,
}

impl Gpu {
    /// Casts `src` into `dst` (same shape; f32 → bf16 or bf16 → f32). The two may be chunked
    /// differently (a bf16 chunk holds twice the rows): one dispatch per overlapping row range.
    pub fn cast(&self, rec: &mut Recorder, src: &GpuTensor, dst: &GpuTensor) -> Result<()> {
        ensure!(
            src.shape() == dst.shape(),
            "cast: shapes differ: {:?} vs {:?}",
            src.shape(),
            dst.shape()
        );
        let entry = match (src.dtype(), dst.dtype()) {
            (DType::F32, DType::BF16) => "f32_to_bf16",
            (DType::BF16, DType::F32) => "bf16_to_f32",
            (a, b) => bail!("cast: unsupported {a:?} → {b:?}"),
        };
        let k = self.kernel(&shader()?, entry, &[])?;
        let row_len = src.row_len();
        let mut cuts: Vec<usize> = src
            .chunks()
            .iter()
            .chain(dst.chunks())
            .map(|c| c.first_row)
            .collect();
        cuts.push(src.rows());
        cuts.sort_unstable();
        cuts.dedup();
        let find = |t: &GpuTensor, row: usize| {
            t.chunks()
                .iter()
                .rev()
                .find(|c| c.first_row <= row)
                .expect("row in tensor")
                .clone()
        };
        for w in cuts.windows(2) {
            let (r0, r1) = (w[0], w[1]);
            let (sc, dc) = (find(src, r0), find(dst, r0));
            let src_off = (r0 - sc.first_row) * row_len;
            let dst_off = (r0 - dc.first_row) * row_len;
            let n = (r1 - r0) * row_len;
            let bf16_off = if dst.dtype() == DType::BF16 {
                dst_off
            } else {
                src_off
            };
            ensure!(
                bf16_off % 2 == 0,
                "cast: chunk boundary splits a bf16 word (odd row length {row_len}); cast this tensor unchunked"
            );
            let p = CastParams {
                n: n as u32,
                src_off: src_off as u32,
                dst_off: dst_off as u32,
                _pad: 0,
            };
            let invocations = if dst.dtype() == DType::BF16 {
                n.div_ceil(2)
            } else {
                n
            };
            rec.dispatch(
                &k,
                bytemuck::bytes_of(&p),
                &[sc.view(), dc.view()],
                groups_1d(self, invocations.div_ceil(256) as u32),
            );
        }
        Ok(())
    }
}

impl Gpu {
    /// Rounds the f32 tensor `x` to bf16 in place (through a bf16 copy) and returns that copy:
    /// a layer input stored as torch's bf16 model holds it, and kept for a recomputed forward.
    pub fn round_to_bf16(&self, rec: &mut Recorder, x: &GpuTensor) -> Result<GpuTensor> {
        let rounded = self.empty(x.shape(), DType::BF16)?;
        self.cast(rec, x, &rounded)?;
        self.cast(rec, &rounded, x)?;
        Ok(rounded)
    }

    /// `t` as f32: a widened copy of a bf16 tensor, or `t` itself (a handle) when f32.
    pub fn widen_to_f32(&self, rec: &mut Recorder, t: &GpuTensor) -> Result<GpuTensor> {
        if t.dtype() == DType::F32 {
            return Ok(t.clone());
        }
        let wide = self.empty(t.shape(), DType::F32)?;
        self.cast(rec, t, &wide)?;
        Ok(wide)
    }

    /// `dst[dst_off ..][..n] += src[src_off ..][..n]`, `dst` bf16 (rounded once per element, to
    /// nearest even), `src` f32; offsets in elements, `dst_off` even (whole words). Views, not
    /// tensors: the fused cross-entropy adds a block of its f32 product into one storage chunk
    /// of a bf16 gradient.
    pub(crate) fn add_f32_into_bf16(
        &self,
        rec: &mut Recorder,
        src: BufView,
        src_off: usize,
        dst: BufView,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(
            dst_off.is_multiple_of(2),
            "add_f32_into_bf16: the bf16 offset {dst_off} splits a word"
        );
        ensure!(
            (src_off + n) * 4 <= src.size as usize
                && (dst_off + n).div_ceil(2) * 4 <= dst.size as usize,
            "add_f32_into_bf16: {n} elements from {src_off} / {dst_off} overrun the views"
        );
        if n == 0 {
            return Ok(());
        }
        let k = self.kernel(&shader()?, "add_f32_into_bf16", &[])?;
        let p = CastParams {
            n: n as u32,
            src_off: src_off as u32,
            dst_off: dst_off as u32,
            _pad: 0,
        };
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[src, dst],
            groups_1d(self, n.div_ceil(2).div_ceil(256) as u32),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::cast as reference;

    fn check_gpu(gpu: &Gpu, shape: &[usize]) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let n: usize = shape.iter().product();
        let mut x: Vec<f32> = rng.vec_normal(n).iter().map(|v| v * 100.0).collect();
        // Exact ties, specials.
        x[0] = 1.0 + 1.0 / 256.0;
        x[1] = f32::NAN;
        x[2] = f32::INFINITY;
        x[3] = -0.0;
        let gx = gpu.upload_f32(shape, &x).unwrap();
        let gb = gpu.empty(shape, DType::BF16).unwrap();
        gpu.poison(&gb);
        let back = gpu.empty(shape, DType::F32).unwrap();
        gpu.poison(&back);
        let mut rec = Recorder::new(gpu);
        gpu.cast(&mut rec, &gx, &gb).unwrap();
        gpu.cast(&mut rec, &gb, &back).unwrap();
        rec.submit();
        let want: Vec<u16> = x.iter().map(|&v| reference::f32_to_bf16(v)).collect();
        assert_eq!(gpu.read_bf16(&gb).unwrap(), want, "seed {seed}");
        let got_back = gpu.read_f32(&back).unwrap();
        for (i, (&g, &w)) in got_back.iter().zip(&want).enumerate() {
            let w = reference::bf16_to_f32(w);
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "seed {seed}: element {i}: {g} vs {w}"
            );
        }
    }

    /// Random bf16 destination, f32 source of a similar and of a much smaller magnitude (so
    /// some sums round back to the old value), odd lengths and offsets into larger views.
    #[test]
    fn add_f32_into_bf16_matches_reference_bit_for_bit() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(len, src_off, dst_off, n) in &[
            (101usize, 3usize, 6usize, 91usize),
            (64, 0, 0, 64),
            (9, 1, 2, 6),
        ] {
            let dst0: Vec<u16> = rng
                .vec_normal(len)
                .iter()
                .map(|&v| reference::f32_to_bf16(v))
                .collect();
            let small = rng.unit() < 0.5;
            let mut src: Vec<f32> = rng
                .vec_normal(len)
                .iter()
                .map(|&v| if small { v * 1e-3 } else { v })
                .collect();
            // one addend large enough to change its value whatever the draw
            src[src_off] = 4.0;
            let gd = gpu.upload_bf16(&[len], &dst0).unwrap();
            let gs = gpu.upload_f32(&[len], &src).unwrap();
            let mut rec = Recorder::new(gpu);
            gpu.add_f32_into_bf16(
                &mut rec,
                gs.view().unwrap(),
                src_off,
                gd.view().unwrap(),
                dst_off,
                n,
            )
            .unwrap();
            rec.submit();
            let got = gpu.read_bf16(&gd).unwrap();
            let mut want = dst0.clone();
            reference::add_f32_into_bf16(
                &mut want[dst_off..dst_off + n],
                &src[src_off..src_off + n],
            );
            assert_eq!(
                got, want,
                "seed {seed}: len {len} src_off {src_off} dst_off {dst_off} n {n}"
            );
            assert_ne!(want, dst0, "seed {seed}: the sum changed nothing");
        }
    }

    /// `round_to_bf16` leaves the f32 tensor at its bf16 values and returns them as bf16;
    /// `widen_to_f32` brings them back exactly.
    #[test]
    fn round_to_bf16_in_place_and_widen_back() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let x: Vec<f32> = rng.vec_normal(37 * 5);
        let gx = gpu.upload_f32(&[37, 5], &x).unwrap();
        let mut rec = Recorder::new(gpu);
        let kept = gpu.round_to_bf16(&mut rec, &gx).unwrap();
        let wide = gpu.widen_to_f32(&mut rec, &kept).unwrap();
        rec.submit();
        let want: Vec<u16> = x.iter().map(|&v| reference::f32_to_bf16(v)).collect();
        let want_f32: Vec<f32> = want.iter().map(|&h| reference::bf16_to_f32(h)).collect();
        assert_eq!(gpu.read_bf16(&kept).unwrap(), want, "seed {seed}");
        assert_eq!(
            gpu.read_f32(&gx).unwrap(),
            want_f32,
            "seed {seed}: rounded in place"
        );
        assert_eq!(
            gpu.read_f32(&wide).unwrap(),
            want_f32,
            "seed {seed}: widened"
        );
        assert_ne!(want_f32, x, "seed {seed}: rounding changed nothing");
    }

    #[test]
    fn casts_match_reference_bit_for_bit() {
        check_gpu(test_gpu(), &[19, 33]);
    }

    #[test]
    fn casts_over_chunked_tensors() {
        check_gpu(tiny_binding_gpu(), &[45, 50]);
    }
}
