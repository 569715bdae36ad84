# Sourced by tools/test.sh, tools/demo.sh and .ci/run: installs what a fresh Debian machine
# lacks for building and running `runner`. Idempotent; installs nothing that is already there.

# Runs apt-get as root (directly, or through sudo when available).
_runner_apt() {
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get "$@"
    else
        echo "error: installing packages needs root (or sudo): apt-get $*" >&2
        return 1
    fi
}

_runner_apt_updated=0

# ensure_packages PKG...: installs the Debian packages that are not installed yet.
ensure_packages() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    if [ "$_runner_apt_updated" -eq 0 ]; then
        _runner_apt update -qq
        _runner_apt_updated=1
    fi
    _runner_apt install -y -qq --no-install-recommends "${missing[@]}"
}

# A Vulkan loader and at least one Vulkan driver: Mesa's lavapipe (a CPU implementation) when
# the machine has no GPU driver. wgpu reaches the GPU through them.
ensure_vulkan() {
    local icd_found=0
    local dir
    for dir in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
        if compgen -G "$dir/*.json" >/dev/null; then
            icd_found=1
        fi
    done
    if [ "$icd_found" -eq 0 ]; then
        ensure_packages mesa-vulkan-drivers libvulkan1
    elif ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
        ensure_packages libvulkan1
    fi
    # Mesa warns on every start without a runtime dir; a harmless default silences it.
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
}

# A C and C++ compiler (tokenizers' oniguruma and esaxx build scripts compile C/C++), and NASM.
ensure_c_toolchain() {
    if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
        ensure_packages build-essential
    fi
    # NASM assembles libjpeg-turbo's SIMD decoder (mozjpeg-sys, feature nasm_simd); without it
    # the build still works but JPEG decoding runs the plain C code, about 2x slower.
    if ! command -v nasm >/dev/null 2>&1; then
        ensure_packages nasm
    fi
}

# MPI for the `distributed` feature (data-parallel lora-train under mpirun): Open MPI's
# headers, library and launcher, and libclang for the bindings rsmpi generates at build time.
ensure_mpi() {
    ensure_packages libopenmpi-dev openmpi-bin libclang-dev
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found: install a current stable Rust toolchain (https://rustup.rs)" >&2
        return 1
    fi
}
