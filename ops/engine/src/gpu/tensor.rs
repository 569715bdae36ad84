//! Tensors on the GPU: pooled buffers with a shape and a dtype, split into row chunks when
//! larger than the adapter's largest storage binding.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::engine::{Gpu, PooledBuffer};
use super::recorder::Recorder;
pub use crate::dtype::DType;

/// A contiguous byte range of a pooled buffer, as a kernel binds it.
#[derive(Clone)]
pub struct BufView {
    pub buffer: Arc<PooledBuffer>,
    pub offset: u64,
    pub size: u64,
}

/// One chunk of a tensor: rows `first_row .. first_row + rows` (a row is everything after
/// the first dimension) in their own buffer.
#[derive(Clone)]
pub struct Chunk {
    pub buffer: Arc<PooledBuffer>,
    pub first_row: usize,
    pub rows: usize,
    /// Bytes of this chunk's data (≤ the engine's max binding).
    pub bytes: u64,
}

impl Chunk {
    pub fn view(&self) -> BufView {
        BufView {
            buffer: self.buffer.clone(),
            offset: 0,
            size: self.bytes,
        }
    }
}

/// A row-major tensor on the GPU. Cloning shares the buffers (a handle, not a copy).
#[derive(Clone)]
pub struct GpuTensor {
    shape: Vec<usize>,
    dtype: DType,
    row_len: usize,
    chunks: Vec<Chunk>,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuTensor({:?} {:?}, {} chunk(s))",
            self.shape,
            self.dtype,
            self.chunks.len()
        )
    }
}

impl GpuTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size of the first dimension (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
    /// Elements per row (product of all dimensions after the first; 1 for 1-D tensors).
    pub fn row_len(&self) -> usize {
        self.row_len
    }
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    pub fn is_chunked(&self) -> bool {
        self.chunks.len() > 1
    }
    /// The whole tensor as one binding; an error for chunked tensors (their kernels loop over
    /// [`GpuTensor::chunks`]).
    pub fn view(&self) -> Result<BufView> {
        match self.chunks.as_slice() {
            [c] => Ok(c.view()),
            _ => bail!(
                "tensor {:?} is split into {} chunks (larger than one storage binding) and this kernel \
                 needs it whole",
                self.shape,
                self.chunks.len()
            ),
        }
    }
    /// The same buffers seen with another shape of the same element count (unchunked only,
    /// or with the same row length).
    pub fn reshape(&self, shape: &[usize]) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!("cannot reshape {:?} to {shape:?}", self.shape);
        }
        let row_len: usize = shape.iter().skip(1).product();
        if self.is_chunked() && row_len != self.row_len {
            bail!(
                "cannot reshape chunked tensor {:?} to {shape:?} (row length changes)",
                self.shape
            );
        }
        let mut t = self.clone();
        t.shape = shape.to_vec();
        t.row_len = row_len;
        if !self.is_chunked() {
            t.chunks[0].rows = shape.first().copied().unwrap_or(1);
        }
        Ok(t)
    }
}

impl Gpu {
    /// Rows per chunk for a tensor of this dtype and row length (whole u32 words per chunk).
    fn rows_per_chunk(&self, dtype: DType, rows: usize, row_len: usize) -> Result<usize> {
        let max = self.max_binding_bytes() as usize;
        let row_bits = row_len * dtype.bits();
        if row_bits == 0 {
            return Ok(rows.max(1));
        }
        let mut per = (max * 8) / row_bits;
        if per == 0 {
            bail!(
                "one row of {row_len} {dtype:?} elements is larger than the largest storage binding \
                 ({max} bytes)"
            );
        }
        if per >= rows {
            return Ok(rows.max(1));
        }
        // Chunk boundaries must fall on u32 words so packed elements never straddle chunks.
        while per > 0 && !(per * row_bits).is_multiple_of(32) {
            per -= 1;
        }
        if per == 0 {
            bail!("cannot split rows of {row_len} {dtype:?} elements on 32-bit boundaries");
        }
        Ok(per)
    }

    /// An uninitialised tensor (pooled buffers; contents are whatever was there).
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<GpuTensor> {
        // The kernels read F32 and BF16 values and U32 / U8 data; F16 and I64 are host types.
        ensure!(
            matches!(dtype, DType::F32 | DType::BF16 | DType::U32 | DType::U8),
            "no kernel reads {dtype:?} tensors: GPU tensors are F32, BF16, U32 or U8"
        );
        let rows = shape.first().copied().unwrap_or(1);
        let row_len: usize = shape.iter().skip(1).product();
        let per = self.rows_per_chunk(dtype, rows, row_len)?;
        let mut chunks = Vec::new();
        let mut first = 0;
        loop {
            let n = per.min(rows - first);
            let bytes = dtype.bytes_for(n * row_len).max(4);
            chunks.push(Chunk {
                buffer: self.alloc_storage(bytes),
                first_row: first,
                rows: n,
                bytes,
            });
            first += n;
            if first >= rows {
                break;
            }
        }
        Ok(GpuTensor {
            shape: shape.to_vec(),
            dtype,
            row_len,
            chunks,
        })
    }

    fn upload_bytes(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.bits() / 8 {
            bail!(
                "upload of {shape:?} {dtype:?}: got {} bytes, expected {}",
                bytes.len(),
                n * dtype.bits() / 8
            );
        }
        let t = self.empty(shape, dtype)?;
        let row_bytes = t.row_len * dtype.bits() / 8;
        for c in &t.chunks {
            let src = &bytes[c.first_row * row_bytes..(c.first_row + c.rows) * row_bytes];
            let mut padded;
            let data = if src.len().is_multiple_of(4) {
                src
            } else {
                padded = src.to_vec();
                padded.resize(src.len().div_ceil(4) * 4, 0);
                &padded[..]
            };
            if !data.is_empty() {
                self.queue.write_buffer(c.buffer.buffer(), 0, data);
            }
        }
        Ok(t)
    }

    pub fn upload_f32(&self, shape: &[usize], data: &[f32]) -> Result<GpuTensor> {
        self.upload_bytes(shape, DType::F32, bytemuck::cast_slice(data))
    }
    /// f32 values stored as `dtype`: f32 as they are, bf16 rounded to nearest even.
    pub fn upload_f32_as(&self, shape: &[usize], data: &[f32], dtype: DType) -> Result<GpuTensor> {
        match dtype {
            DType::F32 => self.upload_f32(shape, data),
            DType::BF16 => {
                let bits: Vec<u16> = data
                    .iter()
                    .map(|&v| crate::reference::cast::f32_to_bf16(v))
                    .collect();
                self.upload_bf16(shape, &bits)
            }
            d => bail!("f32 values cannot be stored as {d:?}"),
        }
    }

    /// Sets tensors to zero bytes (0.0 in f32 and bf16), on the GPU in one submit: no host
    /// buffer of their size is made, which matters for the 262k-row tables.
    pub fn zero(&self, tensors: &[&GpuTensor]) {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("zero"),
            });
        for t in tensors {
            for c in t.chunks() {
                enc.clear_buffer(c.buffer.buffer(), 0, Some(c.bytes));
            }
        }
        self.queue.submit([enc.finish()]);
    }

    /// bf16 values given as their raw bits.
    pub fn upload_bf16(&self, shape: &[usize], bits: &[u16]) -> Result<GpuTensor> {
        self.upload_bytes(shape, DType::BF16, bytemuck::cast_slice(bits))
    }
    pub fn upload_u32(&self, shape: &[usize], data: &[u32]) -> Result<GpuTensor> {
        self.upload_bytes(shape, DType::U32, bytemuck::cast_slice(data))
    }
    pub fn upload_u8(&self, shape: &[usize], data: &[u8]) -> Result<GpuTensor> {
        self.upload_bytes(shape, DType::U8, data)
    }

    /// Fills an f32 tensor with one value from the host (tests poison outputs with NaN).
    pub fn fill_f32(&self, t: &GpuTensor, value: f32) -> Result<()> {
        if t.dtype != DType::F32 {
            bail!("fill_f32 on a {:?} tensor", t.dtype);
        }
        for c in &t.chunks {
            let words = vec![value; (c.bytes / 4) as usize];
            self.queue
                .write_buffer(c.buffer.buffer(), 0, bytemuck::cast_slice(&words));
        }
        Ok(())
    }

    /// Poisons any tensor with all-ones bits (NaN for f32 and bf16, 0xFF.. for integers).
    pub fn poison(&self, t: &GpuTensor) {
        for c in &t.chunks {
            let words = vec![0xFFFF_FFFFu32; (c.bytes / 4) as usize];
            self.queue
                .write_buffer(c.buffer.buffer(), 0, bytemuck::cast_slice(&words));
        }
    }

    /// Copies a tensor's bytes to the host (submits and waits: tests and scalars only).
    pub fn read_bytes(&self, t: &GpuTensor) -> Result<Vec<u8>> {
        let enc = self.device.create_command_encoder(&Default::default());
        PendingRead::submit(self, enc, t).wait()
    }

    /// Reads chunk `k` of an f32 (or bf16, widened) tensor (its `rows × row_len` values; submits and waits): the
    /// host optimizer walks a large tensor a chunk at a time, so no host or device copy of the
    /// whole tensor is ever made.
    pub fn read_chunk_f32(&self, t: &GpuTensor, k: usize) -> Result<Vec<f32>> {
        let c = f32_chunk("read_chunk_f32", t, k)?;
        let piece = GpuTensor {
            shape: vec![c.rows, t.row_len],
            dtype: t.dtype,
            row_len: t.row_len,
            chunks: vec![Chunk {
                first_row: 0,
                ..c.clone()
            }],
        };
        self.read_f32(&piece)
    }

    /// Overwrites chunk `k` of an f32 tensor with host values (`queue.write_buffer`: ordered
    /// before the work of the next submit, and through wgpu's own staging memory rather than
    /// a pooled device buffer).
    /// A bf16 tensor takes the values rounded to nearest even (values that are bf16 already,
    /// as the host optimizer's results are, go through unchanged).
    pub fn write_chunk_f32(&self, t: &GpuTensor, k: usize, data: &[f32]) -> Result<()> {
        let c = f32_chunk("write_chunk_f32", t, k)?;
        ensure!(
            data.len() == c.rows * t.row_len,
            "chunk {k} holds {} values, not {}",
            c.rows * t.row_len,
            data.len()
        );
        if t.dtype == DType::BF16 {
            let mut bits: Vec<u16> = data
                .iter()
                .map(|&v| crate::reference::cast::f32_to_bf16(v))
                .collect();
            // whole words: a chunk's byte size is padded to 4
            bits.resize((c.bytes / 2) as usize, 0);
            self.queue
                .write_buffer(c.buffer.buffer(), 0, bytemuck::cast_slice(&bits));
            return Ok(());
        }
        self.queue
            .write_buffer(c.buffer.buffer(), 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Reads an f32 tensor (bf16 tensors are widened).
    pub fn read_f32(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(t)?;
        match t.dtype {
            DType::F32 => Ok(bytemuck::pod_collect_to_vec(&bytes)),
            DType::BF16 => Ok(bytemuck::pod_collect_to_vec::<u8, u16>(&bytes)
                .into_iter()
                .map(|h| f32::from_bits((h as u32) << 16))
                .collect()),
            d => bail!("read_f32 on a {d:?} tensor"),
        }
    }
    /// Raw bf16 bits.
    pub fn read_bf16(&self, t: &GpuTensor) -> Result<Vec<u16>> {
        if t.dtype != DType::BF16 {
            bail!("read_bf16 on a {:?} tensor", t.dtype);
        }
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(t)?))
    }
    pub fn read_u32(&self, t: &GpuTensor) -> Result<Vec<u32>> {
        if t.dtype != DType::U32 {
            bail!("read_u32 on a {:?} tensor", t.dtype);
        }
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(t)?))
    }
    pub fn read_u8(&self, t: &GpuTensor) -> Result<Vec<u8>> {
        if t.dtype != DType::U8 {
            bail!("read_u8 on a {:?} tensor", t.dtype);
        }
        self.read_bytes(t)
    }
}

impl Gpu {
    /// Records a copy of rows `src_row..src_row + rows` of `src` to rows `dst_row..` of `dst`
    /// (same dtype and row length; either may be chunked: the copy is split at every chunk
    /// boundary of either side). Rows must be whole 32-bit words, as buffer copies require.
    pub fn copy_rows(
        &self,
        rec: &mut Recorder,
        src: &GpuTensor,
        src_row: usize,
        dst: &GpuTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        ensure!(
            src.dtype == dst.dtype && src.row_len == dst.row_len,
            "copy_rows: {:?} {:?} and {:?} {:?} differ in dtype or row length",
            src.shape,
            src.dtype,
            dst.shape,
            dst.dtype
        );
        let row_bits = (src.row_len * src.dtype.bits()) as u64;
        ensure!(
            row_bits.is_multiple_of(32),
            "copy_rows: a row of {} {:?} is not whole 32-bit words",
            src.row_len,
            src.dtype
        );
        ensure!(
            src_row + rows <= src.rows() && dst_row + rows <= dst.rows(),
            "copy_rows: rows {src_row}..{} of {:?} to rows {dst_row}..{} of {:?} are out of range",
            src_row + rows,
            src.shape,
            dst_row + rows,
            dst.shape
        );
        let row_bytes = row_bits / 8;
        // The chunk holding `row` and the row's index inside it.
        let locate = |t: &GpuTensor, row: usize| -> (Chunk, usize) {
            let c = t
                .chunks
                .iter()
                .find(|c| row < c.first_row + c.rows)
                .expect("row checked in range");
            (c.clone(), row - c.first_row)
        };
        let mut done = 0;
        while done < rows {
            let (sc, si) = locate(src, src_row + done);
            let (dc, di) = locate(dst, dst_row + done);
            let n = (sc.rows - si).min(dc.rows - di).min(rows - done);
            let size = n as u64 * row_bytes;
            rec.copy(
                &BufView {
                    buffer: sc.buffer,
                    offset: si as u64 * row_bytes,
                    size,
                },
                &BufView {
                    buffer: dc.buffer,
                    offset: di as u64 * row_bytes,
                    size,
                },
            );
            done += n;
        }
        Ok(())
    }
}

/// Chunk `k` of an f32 or bf16 tensor, for the chunk-wise host reads and writes (`what` names
/// the caller; values cross as f32).
fn f32_chunk<'t>(what: &str, t: &'t GpuTensor, k: usize) -> Result<&'t Chunk> {
    ensure!(
        matches!(t.dtype, DType::F32 | DType::BF16),
        "{what} on a {:?} tensor",
        t.dtype
    );
    t.chunks
        .get(k)
        .with_context(|| format!("the tensor has {} chunks, not {}", t.chunks.len(), k + 1))
}

/// A tensor's bytes on their way to the host: a copy recorded after some work and mapped once
/// that work's submission has run. [`crate::gpu::Recorder::submit_reading`] makes one without
/// waiting, so the host can go on recording (a pipelined decode reads step s's tokens while
/// step s+1 runs).
pub struct PendingRead {
    device: wgpu::Device,
    staging: wgpu::Buffer,
    /// Each chunk's data bytes (without its padding to whole words) and its padded size.
    chunks: Vec<(usize, usize)>,
    submission: wgpu::SubmissionIndex,
    mapped: std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

impl PendingRead {
    /// Ends `enc` with the copy of `t` into a fresh host-mappable buffer, submits it and asks
    /// for the mapping.
    pub(crate) fn submit(gpu: &Gpu, mut enc: wgpu::CommandEncoder, t: &GpuTensor) -> Self {
        let total: u64 = t.chunks.iter().map(|c| c.bytes).sum();
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut at = 0;
        for c in &t.chunks {
            enc.copy_buffer_to_buffer(c.buffer.buffer(), 0, &staging, at, c.bytes);
            at += c.bytes;
        }
        let submission = gpu.queue.submit([enc.finish()]);
        let (tx, mapped) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let row_bits = t.row_len * t.dtype.bits();
        PendingRead {
            device: gpu.device.clone(),
            staging,
            chunks: t
                .chunks
                .iter()
                .map(|c| (c.rows * row_bits / 8, c.bytes as usize))
                .collect(),
            submission,
            mapped,
        }
    }

    /// Waits for the submission that holds the copy (not for later ones) and returns the
    /// tensor's dense bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(self.submission.clone()),
                timeout: None,
            })
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        self.take()
    }

    /// Waits as [`PendingRead::wait`] and reads u32 words.
    pub fn wait_u32(self) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.wait()?))
    }

    /// The bytes of a completed mapping, padding stripped.
    fn take(self) -> Result<Vec<u8>> {
        self.mapped
            .recv()
            .map_err(|_| anyhow!("GPU readback was dropped"))?
            .map_err(|e| anyhow!("mapping GPU readback buffer: {e}"))?;
        let view = self
            .staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| anyhow!("mapping GPU readback buffer: {e:?}"))?;
        let mut out = Vec::with_capacity(self.chunks.iter().map(|c| c.0).sum());
        let mut at = 0usize;
        for &(data, padded) in &self.chunks {
            out.extend_from_slice(&view[at..at + data]);
            at += padded;
        }
        drop(view);
        self.staging.unmap();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{test_gpu, tiny_binding_gpu, TestRng};

    /// F16 and I64 are host types (adapter files, eval's token tensors): no kernel reads them,
    /// so a GPU tensor of either is refused rather than misread.
    #[test]
    fn host_only_dtypes_are_refused_on_the_gpu() {
        for dtype in [DType::F16, DType::I64] {
            let Err(err) = test_gpu().empty(&[3, 5], dtype) else {
                panic!("a {dtype:?} GPU tensor was made")
            };
            assert!(err.to_string().contains(&format!("{dtype:?}")), "{err}");
        }
        assert!(test_gpu().empty(&[3, 5], DType::U8).is_ok());
    }

    /// A read submitted with the work before it returns the values as that work left them,
    /// while later work on the same tensor is already queued: chunked (4 KiB bindings, odd row
    /// length, so each chunk's word padding is stripped) and whole.
    #[test]
    fn submit_reading_sees_its_own_submission() {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for gpu in [test_gpu(), tiny_binding_gpu()] {
            let (rows, cols) = (37, 53);
            let start = rng.vec_normal(rows * cols);
            let addend = rng.vec_normal(rows * cols);
            let x = gpu.upload_f32(&[rows, cols], &start).unwrap();
            let a = gpu.upload_f32(&[rows, cols], &addend).unwrap();
            let mut rec = Recorder::new(gpu);
            gpu.accumulate(&mut rec, &x, &a).unwrap();
            let pending = rec.submit_reading(&x);
            let mut rec = Recorder::new(gpu);
            gpu.accumulate(&mut rec, &x, &a).unwrap();
            rec.submit();
            let once: Vec<f32> = start.iter().zip(&addend).map(|(s, a)| s + a).collect();
            let twice: Vec<f32> = once.iter().zip(&addend).map(|(s, a)| s + a).collect();
            let got: Vec<f32> = bytemuck::pod_collect_to_vec(&pending.wait().unwrap());
            assert_eq!(got, once, "seed {seed}: the pending read");
            assert_eq!(gpu.read_f32(&x).unwrap(), twice, "seed {seed}: after both");
        }
    }

    /// Row copies between chunked and whole tensors land exactly where asked and nowhere else:
    /// fresh random contents at odd sizes, ranges straddling chunk boundaries on both sides.
    #[test]
    fn copy_rows_across_chunks() {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // 4 KiB bindings: 116-byte rows give chunks of 35 rows; 97 and 83 rows need several.
        for (gpu, src_rows, dst_rows) in [
            (tiny_binding_gpu(), 97usize, 83usize),
            (tiny_binding_gpu(), 20, 83),
            (test_gpu(), 31, 17),
        ] {
            let cols = 29;
            let src = rng.vec_normal(src_rows * cols);
            let before = rng.vec_normal(dst_rows * cols);
            let gsrc = gpu.upload_f32(&[src_rows, cols], &src).unwrap();
            let gdst = gpu.upload_f32(&[dst_rows, cols], &before).unwrap();
            let n = (src_rows.min(dst_rows) - 4) / 2 + 3;
            let (from, to) = (
                (rng.next_u64() as usize) % (src_rows - n + 1),
                (rng.next_u64() as usize) % (dst_rows - n + 1),
            );
            let mut rec = Recorder::new(gpu);
            gpu.copy_rows(&mut rec, &gsrc, from, &gdst, to, n).unwrap();
            rec.submit_and_wait().unwrap();
            let mut want = before.clone();
            want[to * cols..(to + n) * cols].copy_from_slice(&src[from * cols..(from + n) * cols]);
            assert_eq!(
                gpu.read_f32(&gdst).unwrap(),
                want,
                "seed {seed}: rows {from}..+{n} of {src_rows} to {to} of {dst_rows}"
            );
        }
        let gpu = tiny_binding_gpu();
        let a = gpu.empty(&[40, 29], DType::F32).unwrap();
        let b = gpu.empty(&[40, 28], DType::F32).unwrap();
        let mut rec = Recorder::new(gpu);
        let e = gpu.copy_rows(&mut rec, &a, 0, &b, 0, 1).unwrap_err();
        assert!(e.to_string().contains("row length"), "{e}");
        let e = gpu.copy_rows(&mut rec, &a, 30, &a, 0, 11).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn chunked_upload_read_roundtrip_every_dtype() {
        let gpu = tiny_binding_gpu();
        let mut rng = TestRng::new(TestRng::fresh_seed());
        // 4 KiB bindings: 97 rows of 29 (116 B in f32, 58 B in bf16) need several chunks.
        let shape = [97usize, 29];
        let n = 97 * 29;
        let f: Vec<f32> = rng.vec_normal(n);
        let t = gpu.upload_f32(&shape, &f).unwrap();
        assert!(t.chunks().len() > 1);
        assert_eq!(gpu.read_f32(&t).unwrap(), f);

        let h: Vec<u16> = (0..n).map(|_| rng.next_u64() as u16).collect();
        let t = gpu.upload_bf16(&shape, &h).unwrap();
        assert!(t.chunks().len() > 1);
        for c in t.chunks() {
            assert_eq!(
                (c.first_row * 29 * 16) % 32,
                0,
                "bf16 chunks must start on whole words"
            );
        }
        assert_eq!(gpu.read_bf16(&t).unwrap(), h);

        let b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        let t = gpu.upload_u8(&shape, &b).unwrap();
        assert!(t.chunks().len() == 1 || t.chunks()[1].first_row.is_multiple_of(4));
        assert_eq!(gpu.read_u8(&t).unwrap(), b);

        let err = gpu.empty(&[2, 5000], DType::F32).unwrap_err().to_string();
        assert!(
            err.contains("larger than the largest storage binding"),
            "{err}"
        );
    }
}
