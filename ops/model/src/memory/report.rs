//! The plan as a table, and the check against the adapter's limits.

use super::*;

impl MemoryPlan {
    /// The plan as a plain-text table (data bytes, and what the engine allocates for them).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String,
                    part: &str,
                    item: &str,
                    dtype: &str,
                    elems: &str,
                    bytes: u64,
                    device: u64| {
            let _ = writeln!(
                s,
                "{part:<12} {item:<92} {dtype:>7} {elems:>15} {bytes:>16} {:>11} {:>11}",
                human(bytes),
                human(device)
            );
        };
        let _ = writeln!(
            s,
            "{:<12} {:<92} {:>7} {:>15} {:>16} {:>11} {:>11}",
            "part", "item", "dtype", "elements", "bytes", "", "on device"
        );
        for r in &self.rows {
            let elems = if r.elements == 0 {
                "-".to_string()
            } else {
                r.elements.to_string()
            };
            line(
                &mut s,
                r.part,
                &r.item,
                r.dtype,
                &elems,
                r.bytes,
                r.device_bytes,
            );
        }
        for part in ["weights", "trainable", "activations", "staging", "host"] {
            let t = self.part_total(part);
            if t > 0 {
                line(
                    &mut s,
                    part,
                    "subtotal",
                    "",
                    "",
                    t,
                    self.device_part_total(part),
                );
            }
        }
        line(
            &mut s,
            "total",
            "on the device",
            "",
            "",
            self.total(),
            self.device_total(),
        );
        if let Some(b) = self.buffers.first() {
            let _ = writeln!(s, "largest buffer: {} ({})", b.name, human(b.bytes));
        }
        if let Some(b) = self.buffers.iter().find(|b| !b.chunkable) {
            let _ = writeln!(
                s,
                "largest activation (must fit one storage binding): {} ({})",
                b.name,
                human(b.bytes)
            );
        }
        s
    }

    /// Refuses a plan the adapter cannot hold: over the memory budget, an activation larger
    /// than one storage binding (their kernels bind them whole), or a weight whose single row
    /// exceeds the binding (weights are split between rows into chunks). Returns the weights
    /// that will be chunked, with their chunk counts. Call before anything is uploaded.
    pub fn check(&self, limits: &DeviceLimits) -> Result<Vec<(String, u64)>> {
        if let Some(budget) = limits.memory_budget {
            let need = self.device_total();
            if need > budget {
                bail!(
                    "the model needs {} ({need} bytes) on the device but the memory budget is {} ({budget} bytes):\n{}\
                     reduce the batch or sequence length, enable gradient checkpointing, use NF4, or raise the budget",
                    human(need),
                    human(budget),
                    self.table()
                );
            }
        }
        let limit = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        let too_big: Vec<&Buffer> = self
            .buffers
            .iter()
            .filter(|b| !b.chunkable && b.bytes > limit)
            .collect();
        if let Some(b) = too_big.first() {
            let shape = match self.batch_shape {
                Some((batch, seq, images)) => format!(
                    " (this plan: per-device batch size {batch}, sequence length {seq}, {images} image(s) per example)"
                ),
                None => String::new(),
            };
            let others = if too_big.len() > 1 {
                format!(
                    "; {} more activation buffer(s) are too large as well: {}",
                    too_big.len() - 1,
                    too_big[1..]
                        .iter()
                        .map(|b| format!("`{}` {}", b.name, human(b.bytes)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            };
            bail!(
                "activation buffer `{}` needs {} ({} bytes) but one storage binding on this adapter holds at \
                 most {} ({limit} bytes: max_buffer_size {}, max_storage_buffer_binding_size {}), and \
                 activations are not split into chunks (only weights are){others}. Lower max_length, the \
                 per-device batch size or the images per example{shape}, or use a GPU whose \
                 max_storage_buffer_binding_size is larger",
                b.name,
                human(b.bytes),
                b.bytes,
                human(limit),
                limits.max_buffer_size,
                limits.max_storage_buffer_binding_size
            );
        }
        let mut chunked = Vec::new();
        for b in self.buffers.iter().filter(|b| b.chunkable) {
            if b.bytes > limit {
                if b.row_bytes > limit {
                    bail!(
                        "buffer `{}` has rows of {} bytes, more than the adapter allows in one binding ({} bytes: \
                         max_buffer_size {}, max_storage_buffer_binding_size {})",
                        b.name,
                        b.row_bytes,
                        limit,
                        limits.max_buffer_size,
                        limits.max_storage_buffer_binding_size
                    );
                }
                chunked.push((
                    b.name.clone(),
                    b.bytes.div_ceil(limit / b.row_bytes * b.row_bytes),
                ));
            }
        }
        Ok(chunked)
    }
}
