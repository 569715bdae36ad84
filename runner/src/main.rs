//! `runner`: see the README. The subcommands live in `runner_core::cli`; the ops come from
//! `ops::builtin()` and the GPU commands from the engine (`gpu.rs`).

mod gpu;

use runner_core::cli;

fn main() {
    quiet_vulkan_device_select();
    std::process::exit(run());
}

fn cli() -> i32 {
    cli::main_with(ops::builtin(), &gpu::Engine, std::env::args_os())
}

/// Under an MPI launcher (`mpirun -n 4 runner run r.toml`, `srun --mpi=pmix`, an MPIJob) this
/// process is one rank of a data-parallel run: MPI starts before anything else, the local rank
/// picks the GPU, and the rank's exit code ends MPI (a failed rank aborts the job, so no rank
/// waits forever). Without a launcher it is the one process it always was.
#[cfg(feature = "distributed")]
fn run() -> i32 {
    let session = match ops::dist::mpi::init() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("runner: {e:#}");
            return cli::EXIT_OP_FAILED;
        }
    };
    let Some(session) = session else {
        return cli();
    };
    let world = session.world();
    if let Err(e) = ops::gpu::select_local_rank(world.local_rank) {
        eprintln!("rank {}: runner: {e:#}", world.rank);
        return session.finish(cli::EXIT_OP_FAILED);
    }
    let code = cli();
    session.finish(code)
}

/// A build without MPI refuses to be one of several ranks: each would train alone on the whole
/// dataset and every rank would write the same outputs.
#[cfg(not(feature = "distributed"))]
fn run() -> i32 {
    if let Some((rank, size)) = ops::dist::launcher_env() {
        if size > 1 || rank > 0 {
            eprintln!(
                "runner: an MPI launcher started this process as rank {rank}{}, but this runner was built without MPI; rebuild it with `cargo build --release --features distributed` (needs libopenmpi-dev and libclang-dev), or run one process without mpirun",
                if size > 1 { format!(" of {size}") } else { String::new() }
            );
            return cli::EXIT_INVALID;
        }
    }
    cli()
}

/// Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select` connects to Wayland and X11 to
/// find the display's GPU while the adapters are enumerated, and on a headless machine
/// libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` twice,
/// mixed into runner's own `error:` lines. runner orders adapters itself (`--adapter`), so the
/// layer's ordering is not used: it is turned off unless the user configured it. Set here,
/// before any thread exists, as the environment may only be changed then.
fn quiet_vulkan_device_select() {
    if std::env::var_os("MESA_VK_DEVICE_SELECT").is_none()
        && std::env::var_os("NODEVICE_SELECT").is_none()
    {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}
