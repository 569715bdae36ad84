//! What the load probes share: timing one pipeline's dispatches.

use std::time::Instant;

use anyhow::Result;
use ops::gpu::Gpu;

/// Seconds per dispatch of `groups` workgroups of `pipe` with `bind_group`: the best of `reps`
/// submissions of `dispatches` back-to-back dispatches each (several per submission, so the
/// submission's own cost is not counted as the kernel's).
pub fn seconds_per_dispatch(
    gpu: &Gpu,
    pipe: &wgpu::ComputePipeline,
    bind_group: &wgpu::BindGroup,
    groups: u32,
    dispatches: usize,
    reps: usize,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipe);
            pass.set_bind_group(0, bind_group, &[]);
            for _ in 0..dispatches {
                pass.dispatch_workgroups(groups, 1, 1);
            }
        }
        let t = Instant::now();
        gpu.queue().submit([enc.finish()]);
        gpu.wait()?;
        best = best.min(t.elapsed().as_secs_f64() / dispatches as f64);
    }
    Ok(best)
}
