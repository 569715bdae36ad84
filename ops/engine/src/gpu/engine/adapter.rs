//! Which adapter the process opens: `--adapter` / `RUNNER_ADAPTER` by index or name, else the
//! preferred kind (discrete, then integrated, ... GPUs; native backends first), one per local
//! rank of a data-parallel run.

use anyhow::{bail, Result};

pub(super) fn choose_adapter(infos: &[wgpu::AdapterInfo], spec: &str) -> Result<usize> {
    let list = || {
        infos
            .iter()
            .enumerate()
            .map(|(k, a)| format!("  {k}: {} ({:?}, {:?})", a.name, a.device_type, a.backend))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Ok(k) = spec.parse::<usize>() {
        if k < infos.len() {
            return Ok(k);
        }
        bail!(
            "adapter index {k} is out of range; adapters found:\n{}",
            list()
        );
    }
    let needle = spec.to_lowercase();
    let matches: Vec<usize> = (0..infos.len())
        .filter(|&k| infos[k].name.to_lowercase().contains(&needle))
        .collect();
    match matches.as_slice() {
        [] => bail!(
            "no adapter name contains `{spec}`; adapters found:\n{}",
            list()
        ),
        // Same device on several backends: prefer the native one.
        many => Ok(*many
            .iter()
            .min_by_key(|&&k| backend_rank(infos[k].backend))
            .expect("non-empty")),
    }
}

pub(super) fn backend_rank(b: wgpu::Backend) -> u32 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// The `local_rank`-th (cyclically) of the adapters that share the preferred adapter's device
/// type and backend, in enumeration order: rank 0 gets [`preferred_adapter`].
pub(super) fn preferred_adapter_for_rank(infos: &[wgpu::AdapterInfo], local_rank: usize) -> usize {
    let best = preferred_adapter(infos);
    let peers: Vec<usize> = (0..infos.len())
        .filter(|&k| {
            infos[k].device_type == infos[best].device_type
                && infos[k].backend == infos[best].backend
        })
        .collect();
    peers[local_rank % peers.len()]
}

pub(super) fn preferred_adapter(infos: &[wgpu::AdapterInfo]) -> usize {
    let type_rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    (0..infos.len())
        .min_by_key(|&k| {
            (
                type_rank(infos[k].device_type),
                backend_rank(infos[k].backend),
                k,
            )
        })
        .expect("at least one adapter")
}
