//! NF4 weights (bitsandbytes layout): quantize, double-quantize absmax, dequantize, and the
//! fused NF4 matmul (the matmul kernel with B decoded from nibbles inside the tile loop).

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::matmul::{Gemm, GemmParams};
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, MatmulOpts, Recorder, Shader};
use crate::reference::nf4 as reference;

fn shader() -> Result<Shader> {
    Shader::compose("nf4", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(
        shader()?,
        vec![
            "quantize",
            "dequantize",
            "absmax_mean",
            "double_quantize",
            "dequantize_absmax",
        ],
    )])
}

/// A frozen NF4 weight on the GPU. `shape` is the logical [out, in] f32 matrix (row-major,
/// flattened for blocking); `packed` holds ceil(out·in/2) bytes as a U8 tensor; `absmax` is the
/// f32 per-block scale (double-quantized absmax is dequantized once at upload: 4 bytes per 64
/// weights instead of 1, for a kernel that needs one load per 4 weights).
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    pub packed: GpuTensor,
    pub absmax: GpuTensor,
    pub shape: [usize; 2],
    pub blocksize: usize,
}

/// Double-quantized absmax on the GPU: codes into the signed dynamic map, one f32 scale per
/// nested block, and the mean offset (a [1] f32 tensor, so no read-back is needed).
#[derive(Clone, Debug)]
pub struct DoubleQuant {
    pub codes: GpuTensor,
    pub nested_absmax: GpuTensor,
    pub offset: GpuTensor,
    pub nested_blocksize: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Nf4Params {
    n: u32,
    blocksize: u32,
    n_blocks: u32,
    offset: f32,
}

impl Gpu {
    /// Uploads bitsandbytes bytes: `packed` [ceil(out·in/2)], `absmax` [ceil(out·in/blocksize)].
    pub fn upload_nf4(
        &self,
        packed: &[u8],
        absmax: &[f32],
        shape: [usize; 2],
        blocksize: usize,
    ) -> Result<Nf4Weight> {
        let n = shape[0] * shape[1];
        ensure!(
            packed.len() == n.div_ceil(2),
            "NF4 weight {shape:?}: {} packed bytes, expected {}",
            packed.len(),
            n.div_ceil(2)
        );
        ensure!(
            absmax.len() == n.div_ceil(blocksize),
            "NF4 weight {shape:?}: {} absmax values, expected {}",
            absmax.len(),
            n.div_ceil(blocksize)
        );
        Ok(Nf4Weight {
            packed: self.upload_u8(&[packed.len()], packed)?,
            absmax: self.upload_f32(&[absmax.len()], absmax)?,
            shape,
            blocksize,
        })
    }

    /// Uploads a double-quantized bitsandbytes weight, dequantizing absmax on the GPU.
    #[allow(clippy::too_many_arguments)]
    pub fn upload_nf4_double_quant(
        &self,
        rec: &mut Recorder,
        packed: &[u8],
        absmax_codes: &[u8],
        nested_absmax: &[f32],
        offset: f32,
        nested_blocksize: usize,
        shape: [usize; 2],
        blocksize: usize,
    ) -> Result<Nf4Weight> {
        let n = shape[0] * shape[1];
        let blocks = n.div_ceil(blocksize);
        ensure!(
            absmax_codes.len() == blocks,
            "NF4 weight {shape:?}: {} absmax codes, expected {blocks}",
            absmax_codes.len()
        );
        ensure!(
            nested_absmax.len() == blocks.div_ceil(nested_blocksize),
            "NF4 weight {shape:?}: {} nested absmax values, expected {}",
            nested_absmax.len(),
            blocks.div_ceil(nested_blocksize)
        );
        ensure!(
            packed.len() == n.div_ceil(2),
            "NF4 weight {shape:?}: {} packed bytes, expected {}",
            packed.len(),
            n.div_ceil(2)
        );
        let dq = DoubleQuant {
            codes: self.upload_u8(&[blocks], absmax_codes)?,
            nested_absmax: self.upload_f32(&[nested_absmax.len()], nested_absmax)?,
            offset: self.upload_f32(&[1], &[offset])?,
            nested_blocksize,
        };
        let absmax = self.empty(&[blocks], DType::F32)?;
        self.nf4_dequantize_absmax(rec, &dq, offset, &absmax)?;
        Ok(Nf4Weight {
            packed: self.upload_u8(&[packed.len()], packed)?,
            absmax,
            shape,
            blocksize,
        })
    }

    /// Quantizes an f32 [out, in] weight to NF4 (blocksize a multiple of 8).
    pub fn nf4_quantize(
        &self,
        rec: &mut Recorder,
        w: &GpuTensor,
        blocksize: usize,
    ) -> Result<Nf4Weight> {
        ensure!(
            w.dtype() == DType::F32 && w.shape().len() == 2,
            "nf4_quantize: need an f32 [out, in] tensor, got {w:?}"
        );
        ensure!(
            blocksize.is_multiple_of(8) && blocksize > 0,
            "nf4_quantize: blocksize {blocksize} must be a multiple of 8"
        );
        let shape = [w.shape()[0], w.shape()[1]];
        let n = shape[0] * shape[1];
        let blocks = n.div_ceil(blocksize);
        let packed = self.empty(&[n.div_ceil(2)], DType::U8)?;
        let absmax = self.empty(&[blocks], DType::F32)?;
        let params = Nf4Params {
            n: n as u32,
            blocksize: blocksize as u32,
            n_blocks: blocks as u32,
            offset: 0.0,
        };
        let k = self.kernel(&shader()?, "quantize", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&params),
            &[w.view()?, packed.view()?, absmax.view()?],
            groups_1d(self, blocks.div_ceil(64) as u32),
        );
        Ok(Nf4Weight {
            packed,
            absmax,
            shape,
            blocksize,
        })
    }

    /// Dequantizes to an f32 [out, in] tensor.
    pub fn nf4_dequantize(&self, rec: &mut Recorder, w: &Nf4Weight, out: &GpuTensor) -> Result<()> {
        let n = w.shape[0] * w.shape[1];
        ensure!(
            out.dtype() == DType::F32 && out.numel() == n,
            "nf4_dequantize: output must be f32 with {n} elements"
        );
        let params = Nf4Params {
            n: n as u32,
            blocksize: w.blocksize as u32,
            n_blocks: 0,
            offset: 0.0,
        };
        let k = self.kernel(&shader()?, "dequantize", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&params),
            &[w.packed.view()?, w.absmax.view()?, out.view()?],
            groups_1d(self, n.div_ceil(8).div_ceil(64) as u32),
        );
        Ok(())
    }

    /// Double quantization of an f32 absmax [len]: offset = mean, codes from the signed
    /// dynamic 8-bit map in nested blocks (a multiple of 4).
    pub fn nf4_double_quantize(
        &self,
        rec: &mut Recorder,
        absmax: &GpuTensor,
        nested_blocksize: usize,
    ) -> Result<DoubleQuant> {
        ensure!(
            absmax.dtype() == DType::F32 && absmax.numel() > 0,
            "nf4_double_quantize: need a non-empty f32 absmax"
        );
        ensure!(
            nested_blocksize.is_multiple_of(4),
            "nested blocksize {nested_blocksize} must be a multiple of 4"
        );
        let len = absmax.numel();
        let blocks = len.div_ceil(nested_blocksize);
        let offset = self.empty(&[1], DType::F32)?;
        let codes = self.empty(&[len], DType::U8)?;
        let nested = self.empty(&[blocks], DType::F32)?;
        let mids = self.upload_f32(
            &[255],
            &reference::midpoints(&reference::dynamic_map_signed()),
        )?;
        let params = Nf4Params {
            n: len as u32,
            blocksize: nested_blocksize as u32,
            n_blocks: blocks as u32,
            offset: 0.0,
        };
        let k = self.kernel(&shader()?, "absmax_mean", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&params),
            &[absmax.view()?, offset.view()?],
            [1, 1, 1],
        );
        let k = self.kernel(&shader()?, "double_quantize", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&params),
            &[
                absmax.view()?,
                offset.view()?,
                mids.view()?,
                codes.view()?,
                nested.view()?,
            ],
            groups_1d(self, blocks.div_ceil(64) as u32),
        );
        Ok(DoubleQuant {
            codes,
            nested_absmax: nested,
            offset,
            nested_blocksize,
        })
    }

    /// `out[i] = map[codes[i]] * nested[i / nested_blocksize] + offset` (f32 absmax).
    pub fn nf4_dequantize_absmax(
        &self,
        rec: &mut Recorder,
        dq: &DoubleQuant,
        offset: f32,
        out: &GpuTensor,
    ) -> Result<()> {
        let len = dq.codes.numel();
        ensure!(
            out.dtype() == DType::F32 && out.numel() == len,
            "nf4_dequantize_absmax: output must be f32 [{len}]"
        );
        let map = self.upload_f32(&[256], &reference::dynamic_map_signed())?;
        let params = Nf4Params {
            n: len as u32,
            blocksize: dq.nested_blocksize as u32,
            n_blocks: 0,
            offset,
        };
        let k = self.kernel(&shader()?, "dequantize_absmax", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&params),
            &[
                dq.codes.view()?,
                dq.nested_absmax.view()?,
                map.view()?,
                out.view()?,
            ],
            groups_1d(self, len.div_ceil(64) as u32),
        );
        Ok(())
    }

    /// Fused NF4 matmul, dequantizing W inside the tile loop.
    /// `opts.trans_b = true`: `C[M,N] = alpha·A[M,K]·Wᵀ + beta·C + bias` with W [N,K] (a linear
    /// layer's forward); `false`: `C[M,K'] = alpha·A[M,N']·W` with W [N',K'] (its input gradient).
    /// `trans_a` must be false; A and C may be batched [batch, rows, cols] (W is shared).
    pub fn matmul_nf4(
        &self,
        rec: &mut Recorder,
        a: &GpuTensor,
        w: &Nf4Weight,
        c: &GpuTensor,
        opts: MatmulOpts,
    ) -> Result<()> {
        ensure!(!opts.trans_a, "matmul_nf4: A cannot be transposed");
        ensure!(
            a.dtype() == DType::F32 && c.dtype() == DType::F32,
            "matmul_nf4: A and C must be f32"
        );
        let (rows_w, cols_w) = (w.shape[0], w.shape[1]);
        let (k, n) = if opts.trans_b {
            (cols_w, rows_w)
        } else {
            (rows_w, cols_w)
        };
        let (batch, m, ka) = match *a.shape() {
            [m, ka] => (1, m, ka),
            [z, m, ka] => (z, m, ka),
            ref s => anyhow::bail!("matmul_nf4: A must be 2-D or 3-D, got {s:?}"),
        };
        let c_ok = match *c.shape() {
            [cm, cn] => batch == 1 && a.shape().len() == 2 && cm == m && cn == n,
            [z, cm, cn] => z == batch && cm == m && cn == n,
            _ => false,
        };
        ensure!(
            ka == k && c_ok,
            "matmul_nf4 shapes disagree: A {:?}, W {:?}{}, C {:?}",
            a.shape(),
            w.shape,
            if opts.trans_b { "ᵀ" } else { "" },
            c.shape()
        );
        if let Some(bias) = opts.bias {
            ensure!(
                bias.dtype() == DType::F32 && bias.numel() == n,
                "matmul_nf4: bias must be f32 [{n}]"
            );
        }
        let params = GemmParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            has_bias: opts.bias.is_some() as u32,
            a_off: 0,
            lda: k as u32,
            a_batch: (m * k) as u32,
            b_off: 0,
            ldb: cols_w as u32,
            b_batch: 0,
            c_off: 0,
            ldc: n as u32,
            c_batch: (m * n) as u32,
            bias_off: 0,
            alpha: opts.alpha,
            beta: opts.beta,
        };
        let gemm = Gemm {
            a: a.view()?,
            b: w.packed.view()?,
            c: c.view()?,
            bias: opts.bias.map(|b| b.view()).transpose()?,
            params,
            batch: batch as u32,
            trans_a: false,
            trans_b: opts.trans_b,
            a_contig: k as u32,
            b_contig: if opts.trans_b { k as u32 } else { n as u32 },
            f16: opts.precision == super::matmul::MatmulPrecision::F16,
            b_bf16: false,
            frozen_b: opts.frozen_b,
        };
        let absmax = w.absmax.view()?;
        let blocksize = w.blocksize;
        self.record_gemm_with(rec, gemm, Some((absmax, blocksize)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{other_tiling_gpu, rel_frobenius, test_gpu, TestRng};
    use crate::reference::matmul as mm;

    #[test]
    fn quantize_matches_reference_bytes_and_dequantizes() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // 37×29 = 1073 elements: a partial last block and an odd element count.
        for &(rows, cols) in &[(37usize, 29usize), (16, 64)] {
            let x: Vec<f32> = (0..rows * cols)
                .map(|_| rng.normal() * rng.uniform(0.01, 3.0))
                .collect();
            let (want_packed, want_absmax) = reference::quantize_nf4(&x, 64);
            let gx = gpu.upload_f32(&[rows, cols], &x).unwrap();
            let mut rec = Recorder::new(gpu);
            let w = gpu.nf4_quantize(&mut rec, &gx, 64).unwrap();
            let out = gpu.empty(&[rows, cols], DType::F32).unwrap();
            gpu.poison(&out);
            gpu.nf4_dequantize(&mut rec, &w, &out).unwrap();
            rec.submit();
            assert_eq!(
                gpu.read_u8(&w.packed).unwrap(),
                want_packed,
                "seed {seed}: packed bytes"
            );
            assert_eq!(
                gpu.read_f32(&w.absmax).unwrap(),
                want_absmax,
                "seed {seed}: absmax"
            );
            let want = reference::dequantize_nf4(&want_packed, &want_absmax, rows * cols, 64);
            assert_eq!(
                gpu.read_f32(&out).unwrap(),
                want,
                "seed {seed}: dequantized"
            );
        }
    }

    #[test]
    fn double_quant_matches_reference_within_one_code() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let absmax: Vec<f32> = (0..1000).map(|_| rng.uniform(0.001, 0.2)).collect();
        let (want_q, want_nested, want_offset) = reference::double_quantize(&absmax, 256);
        let ga = gpu.upload_f32(&[absmax.len()], &absmax).unwrap();
        let mut rec = Recorder::new(gpu);
        let dq = gpu.nf4_double_quantize(&mut rec, &ga, 256).unwrap();
        rec.submit();
        let offset = gpu.read_f32(&dq.offset).unwrap()[0];
        assert!(
            (offset - want_offset).abs() <= 1e-6 * want_offset.abs(),
            "seed {seed}: offset {offset} vs {want_offset}"
        );
        let q = gpu.read_u8(&dq.codes).unwrap();
        for (i, (&g, &w)) in q.iter().zip(&want_q).enumerate() {
            assert!(
                (g as i32 - w as i32).abs() <= 1,
                "seed {seed}: code {i}: {g} vs {w}"
            );
        }
        let nested = gpu.read_f32(&dq.nested_absmax).unwrap();
        assert!(
            rel_frobenius(&nested, &want_nested) < 1e-5,
            "seed {seed}: nested absmax"
        );

        // Dequantizing the reference's codes on the GPU gives the reference's absmax exactly.
        let dq_ref = DoubleQuant {
            codes: gpu.upload_u8(&[want_q.len()], &want_q).unwrap(),
            nested_absmax: gpu.upload_f32(&[want_nested.len()], &want_nested).unwrap(),
            offset: gpu.upload_f32(&[1], &[want_offset]).unwrap(),
            nested_blocksize: 256,
        };
        let out = gpu.empty(&[absmax.len()], DType::F32).unwrap();
        gpu.poison(&out);
        let mut rec = Recorder::new(gpu);
        gpu.nf4_dequantize_absmax(&mut rec, &dq_ref, want_offset, &out)
            .unwrap();
        rec.submit();
        let want = reference::dequantize_absmax(&want_q, &want_nested, want_offset, 256);
        assert_eq!(gpu.read_f32(&out).unwrap(), want);
    }

    #[allow(clippy::too_many_arguments)]
    fn fused_case(
        gpu: &Gpu,
        batch: usize,
        m: usize,
        rows_w: usize,
        cols_w: usize,
        forward: bool,
        rng: &mut TestRng,
        seed: u64,
    ) {
        let w_host: Vec<f32> = rng.vec_normal(rows_w * cols_w);
        let (packed, absmax) = reference::quantize_nf4(&w_host, 64);
        let w_deq = reference::dequantize_nf4(&packed, &absmax, rows_w * cols_w, 64);
        let w = gpu
            .upload_nf4(&packed, &absmax, [rows_w, cols_w], 64)
            .unwrap();
        let (k, n) = if forward {
            (cols_w, rows_w)
        } else {
            (rows_w, cols_w)
        };
        let a: Vec<f32> = rng.vec_normal(batch * m * k);
        let bias: Vec<f32> = rng.vec_normal(n);
        let c0: Vec<f32> = rng.vec_normal(batch * m * n);
        let beta = if forward { 0.0 } else { 1.0 };
        let a_shape = if batch > 1 {
            vec![batch, m, k]
        } else {
            vec![m, k]
        };
        let c_shape = if batch > 1 {
            vec![batch, m, n]
        } else {
            vec![m, n]
        };
        let ga = gpu.upload_f32(&a_shape, &a).unwrap();
        let gc = if beta != 0.0 {
            gpu.upload_f32(&c_shape, &c0).unwrap()
        } else {
            let t = gpu.empty(&c_shape, DType::F32).unwrap();
            gpu.poison(&t);
            t
        };
        let gbias = gpu.upload_f32(&[n], &bias).unwrap();
        let mut rec = Recorder::new(gpu);
        let opts = MatmulOpts {
            trans_b: forward,
            beta,
            bias: forward.then_some(&gbias),
            frozen_b: FROZEN_B.with(|f| f.get()),
            ..Default::default()
        };
        gpu.matmul_nf4(&mut rec, &ga, &w, &gc, opts).unwrap();
        rec.submit();
        let got = gpu.read_f32(&gc).unwrap();
        let mut want = c0.clone();
        let g = mm::Gemm {
            trans_b: forward,
            beta,
            ..Default::default()
        };
        mm::matmul_batched(
            &a,
            &w_deq,
            &mut want,
            batch,
            m,
            n,
            k,
            g,
            forward.then_some(&bias[..]),
        );
        let err = rel_frobenius(&got, &want);
        assert!(
            err < 1e-5,
            "seed {seed}: nf4 {m}x{rows_w}x{cols_w} batch {batch} forward {forward}: rel err {err}"
        );
    }

    thread_local! {
        /// Set by a test to mark the NF4 weight frozen in every case of a sweep.
        static FROZEN_B: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn fused_sweep(gpu: &Gpu) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // the rows kernel (M <= 8, forward): vec4 and scalar in-features
        for &(m, rows_w, cols_w) in &[(1, 29, 64), (3, 19, 36), (2, 13, 33)] {
            fused_case(gpu, 1, m, rows_w, cols_w, true, &mut rng, seed);
        }
        // Odd row counts; in-features multiples of 4 (vec4 path) and not (scalar path); blocks
        // straddling rows (cols 36).
        for &(m, rows_w, cols_w) in &[(37, 29, 64), (5, 19, 36), (13, 24, 33), (1, 7, 130)] {
            for forward in [true, false] {
                fused_case(gpu, 1, m, rows_w, cols_w, forward, &mut rng, seed);
            }
        }
        fused_case(gpu, 3, 9, 21, 40, true, &mut rng, seed);
    }

    #[test]
    fn fused_nf4_matmul_matches_dequantized_reference() {
        fused_sweep(test_gpu());
    }

    /// Generation on CPU adapters: the packed words and absmax stay staged in textures of their
    /// own while a hold lives, read by the split rows kernel and the subgroup kernel.
    #[test]
    fn fused_nf4_matmul_with_weights_kept_staged() {
        let gpu = test_gpu();
        let _hold = gpu.hold_staged_weights();
        FROZEN_B.with(|f| f.set(true));
        fused_sweep(gpu);
        FROZEN_B.with(|f| f.set(false));
    }

    #[test]
    fn fused_nf4_matmul_other_tiling() {
        fused_sweep(other_tiling_gpu());
    }

    /// Golden bytes from bitsandbytes 0.50.2 on CPU (tests/fixtures/golden/nf4, branch
    /// `fixtures`): `quantize_4bit(w, blocksize=64, compress_statistics=True/False, "nf4")`.
    #[test]
    fn reference_and_kernels_match_bitsandbytes_golden_bytes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/golden/nf4/nf4_tensors.safetensors"
        );
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f32s = |name: &str| -> Vec<f32> {
            bytemuck::pod_collect_to_vec(st.tensor(name).unwrap().data())
        };
        let u8s = |name: &str| -> Vec<u8> { st.tensor(name).unwrap().data().to_vec() };
        let mut prefixes: Vec<String> = st
            .names()
            .iter()
            .filter_map(|n| n.strip_suffix(".source").map(str::to_string))
            .collect();
        prefixes.sort();
        assert_eq!(prefixes.len(), 6);
        let gpu = test_gpu();
        for pre in &prefixes {
            let source = f32s(&format!("{pre}.source"));
            let shape = st
                .tensor(&format!("{pre}.source"))
                .unwrap()
                .shape()
                .to_vec();
            let (rows, cols) = (shape[0], shape[1]);
            assert_eq!(
                f32s(&format!("{pre}.quant_map")),
                reference::NF4_CODE.to_vec(),
                "{pre}: quant_map"
            );
            assert_eq!(
                f32s(&format!("{pre}.nested_quant_map")),
                reference::dynamic_map_signed().to_vec(),
                "{pre}: nested_quant_map"
            );

            // Plain NF4: bytes and absmax exact, from the reference and from the GPU kernel.
            let (packed, absmax) = reference::quantize_nf4(&source, 64);
            assert_eq!(
                packed,
                u8s(&format!("{pre}.plain_packed")),
                "{pre}: reference packed bytes"
            );
            assert_eq!(
                absmax,
                f32s(&format!("{pre}.plain_absmax")),
                "{pre}: reference absmax"
            );
            let gsrc = gpu.upload_f32(&[rows, cols], &source).unwrap();
            let mut rec = Recorder::new(gpu);
            let w = gpu.nf4_quantize(&mut rec, &gsrc, 64).unwrap();
            rec.submit();
            assert_eq!(
                gpu.read_u8(&w.packed).unwrap(),
                packed,
                "{pre}: kernel packed bytes"
            );
            assert_eq!(
                gpu.read_f32(&w.absmax).unwrap(),
                absmax,
                "{pre}: kernel absmax"
            );
            let plain_deq = reference::dequantize_nf4(&packed, &absmax, rows * cols, 64);
            assert!(
                rel_frobenius(&plain_deq, &f32s(&format!("{pre}.plain_dequantized"))) <= 1e-6,
                "{pre}: plain dequant"
            );

            // Double quant: codes within one step, nested absmax and offset within 1e-6 relative.
            let (q8, nested, offset) = reference::double_quantize(&absmax, 256);
            let want_q8 = u8s(&format!("{pre}.absmax"));
            for (i, (&a, &b)) in q8.iter().zip(&want_q8).enumerate() {
                assert!(
                    (a as i32 - b as i32).abs() <= 1,
                    "{pre}: q8[{i}] {a} vs bitsandbytes {b}"
                );
            }
            let want_offset = f32s(&format!("{pre}.offset"))[0];
            assert!(
                (offset - want_offset).abs() <= 1e-6 * want_offset.abs(),
                "{pre}: offset {offset} vs {want_offset}"
            );
            let want_nested = f32s(&format!("{pre}.nested_absmax"));
            for (a, b) in nested.iter().zip(&want_nested) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                    "{pre}: nested absmax {a} vs {b}"
                );
            }
            let mut rec = Recorder::new(gpu);
            let dq = gpu.nf4_double_quantize(&mut rec, &w.absmax, 256).unwrap();
            rec.submit();
            for (i, (&a, &b)) in gpu
                .read_u8(&dq.codes)
                .unwrap()
                .iter()
                .zip(&want_q8)
                .enumerate()
            {
                assert!(
                    (a as i32 - b as i32).abs() <= 1,
                    "{pre}: kernel q8[{i}] {a} vs bitsandbytes {b}"
                );
            }

            // Dequantizing bitsandbytes' own bytes (double quant) reproduces its weights.
            let want_deq = f32s(&format!("{pre}.dequantized"));
            let golden_packed = u8s(&format!("{pre}.packed"));
            let abs_ref = reference::dequantize_absmax(&want_q8, &want_nested, want_offset, 256);
            let deq_ref = reference::dequantize_nf4(&golden_packed, &abs_ref, rows * cols, 64);
            assert!(
                rel_frobenius(&deq_ref, &want_deq) <= 1e-6,
                "{pre}: reference dequant"
            );
            let mut rec = Recorder::new(gpu);
            let gw = gpu
                .upload_nf4_double_quant(
                    &mut rec,
                    &golden_packed,
                    &want_q8,
                    &want_nested,
                    want_offset,
                    256,
                    [rows, cols],
                    64,
                )
                .unwrap();
            let out = gpu.empty(&[rows, cols], DType::F32).unwrap();
            gpu.poison(&out);
            gpu.nf4_dequantize(&mut rec, &gw, &out).unwrap();
            rec.submit();
            assert!(
                rel_frobenius(&gpu.read_f32(&out).unwrap(), &want_deq) <= 1e-6,
                "{pre}: kernel dequant"
            );
        }
    }
}
