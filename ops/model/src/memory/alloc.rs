//! The buffers a step allocates (4-byte elements, the pool's size classes) and the timeline of
//! what is live at each flush.

use super::*;

/// One device buffer a training step allocates: 4-byte elements (f32 or u32), `rows` × `cols`.
/// Activations are never split into chunks: their kernels bind them whole.
#[derive(Debug, Clone)]
pub(super) struct Alloc {
    pub(super) name: String,
    pub(super) rows: u64,
    pub(super) cols: u64,
}

impl Alloc {
    pub(super) fn bytes(&self) -> u64 {
        (self.rows * self.cols * 4).max(4)
    }
    /// What the engine's pool really allocates for it.
    pub(super) fn device(&self) -> u64 {
        pooled_capacity(self.bytes())
    }
}

/// A bf16 `[rows, cols]` buffer: the bytes of `ceil(rows·cols / 2)` f32 words.
pub(super) fn alloc_bf16(list: &mut Vec<Alloc>, name: &str, rows: u64, cols: u64) {
    alloc(
        list,
        &format!("{name} (bf16)"),
        1,
        (rows * cols).div_ceil(2),
    );
}

pub(super) fn alloc(list: &mut Vec<Alloc>, name: &str, rows: u64, cols: u64) {
    list.push(Alloc {
        name: name.to_string(),
        rows,
        cols,
    });
}

pub(super) fn device_sum(list: &[Alloc]) -> u64 {
    list.iter().map(Alloc::device).sum()
}

pub(super) fn byte_sum(list: &[Alloc]) -> u64 {
    list.iter().map(Alloc::bytes).sum()
}

/// The largest binding of the planned buffers: a whole chunk of a chunked one. Every range a
/// kernel stages is one binding of a planned buffer.
pub(super) fn largest_binding(buffers: &[Buffer], max_binding_bytes: u64) -> u64 {
    buffers
        .iter()
        .map(|b| b.bytes.min(max_binding_bytes))
        .max()
        .unwrap_or(0)
}

/// The textures a CPU adapter stages kernel operands in (ops/engine/src/gpu/staging.rs): lora-train
/// reserves its [`STAGING_TEXTURES`] slots at the largest binding before the first step.
pub(super) fn staging_row(buffers: &[Buffer], max_binding_bytes: u64) -> PlanRow {
    let texture = texture_bytes(texture_rows(largest_binding(buffers, max_binding_bytes)));
    PlanRow {
        part: "staging",
        item: format!(
            "operand staging textures (CPU adapters): {STAGING_TEXTURES} x the largest binding"
        ),
        dtype: "f32",
        elements: STAGING_TEXTURES * texture / 4,
        bytes: STAGING_TEXTURES * texture,
        device_bytes: STAGING_TEXTURES * texture,
    }
}

/// The 16-byte buffer (a 256-byte pool class) each matmul dispatch without a bias binds in
/// its place (`Gpu::dummy_buffer`); the recorder holds it like any other.
pub(super) fn matmul_placeholders(list: &mut Vec<Alloc>, matmuls: u64) {
    for _ in 0..matmuls {
        alloc(list, "matmul bias placeholder", 1, 4);
    }
}

/// The step as the engine sees it: buffers come alive in program order, a `Recorder` holds
/// every buffer it bound until its flush, so a buffer its owner drops returns to the pool at
/// the next flush. Live bytes grow within a phase and fall at each flush; the peak is sampled
/// at every flush (and before a buffer is freed at once), with what was live then, by group.
#[derive(Default)]
pub(super) struct Timeline {
    pub(super) live: Vec<Live>,
    pub(super) next: usize,
    pub(super) peak: u64,
    /// `(group, buffers)` at the peak, and the phase it happened in.
    pub(super) at_peak: Vec<(String, Vec<Alloc>)>,
    pub(super) peak_phase: String,
    /// Every buffer ever allocated (for the binding checks).
    pub(super) seen: Vec<Alloc>,
}

pub(super) struct Live {
    pub(super) id: usize,
    pub(super) group: String,
    pub(super) alloc: Alloc,
    pub(super) released: bool,
}

/// The group name of a phase's temporaries (named after the phase at the peak).
pub(super) const WORKING_SET: &str = "";

impl Timeline {
    pub(super) fn add(&mut self, group: &str, list: &[Alloc]) -> Vec<usize> {
        list.iter()
            .map(|a| {
                self.next += 1;
                self.seen.push(a.clone());
                self.live.push(Live {
                    id: self.next,
                    group: group.to_string(),
                    alloc: a.clone(),
                    released: false,
                });
                self.next
            })
            .collect()
    }

    /// The temporaries of the current phase: released at its flush.
    pub(super) fn temps(&mut self, list: &[Alloc]) {
        let ids = self.add(WORKING_SET, list);
        self.release(&ids);
    }

    /// The owner dropped these; they are freed at the next flush.
    pub(super) fn release(&mut self, ids: &[usize]) {
        for l in self.live.iter_mut().filter(|l| ids.contains(&l.id)) {
            l.released = true;
        }
    }

    pub(super) fn sample(&mut self, phase: &str) {
        let bytes: u64 = self.live.iter().map(|l| l.alloc.device()).sum();
        if bytes > self.peak {
            self.peak = bytes;
            self.peak_phase = phase.to_string();
            let mut groups: Vec<(String, Vec<Alloc>)> = Vec::new();
            for l in &self.live {
                let group = if l.group == WORKING_SET {
                    format!("working set of {phase}")
                } else {
                    l.group.clone()
                };
                match groups.iter_mut().find(|(g, _)| *g == group) {
                    Some((_, list)) => list.push(l.alloc.clone()),
                    None => groups.push((group, vec![l.alloc.clone()])),
                }
            }
            self.at_peak = groups;
        }
    }

    /// Freed at once: the owner dropped them outside any recorder that bound them.
    pub(super) fn free_now(&mut self, ids: &[usize], phase: &str) {
        self.sample(phase);
        self.live.retain(|l| !ids.contains(&l.id));
    }

    /// `Recorder::flush`: the released buffers return to the pool.
    pub(super) fn flush(&mut self, phase: &str) {
        self.sample(phase);
        self.live.retain(|l| !l.released);
    }
}
