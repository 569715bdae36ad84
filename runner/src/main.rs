//! `runner`: see the README. The subcommands live in `runner::cli`; the ops come from
//! `ops::Registry::builtin()`.

fn main() {
    quiet_vulkan_device_select();
    std::process::exit(runner::cli::main_with(
        ops::Registry::builtin(),
        std::env::args_os(),
    ));
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
