# Shared by scripts/setup.sh and scripts/test.sh: installs what the build
# needs and builds every artifact. Idempotent; the guest kernel is cached.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
guest_dir="$repo/build/guest"

APT_PACKAGES=(build-essential flex bison bc libelf-dev libssl-dev cpio
    linux-source-6.1 busybox-static musl-tools python3 qemu-system-x86 jq
    libseccomp-dev pkg-config containerd runc umoci
    protobuf-compiler containernetworking-plugins)

log() { printf '==> %s\n' "$*" >&2; }

install_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing apt packages: ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
    if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
        log "adding the rust target x86_64-unknown-linux-musl"
        rustup target add x86_64-unknown-linux-musl >&2
    fi
    # scripts/test.sh checks formatting and lints before it tests.
    local c
    for c in rustfmt clippy; do
        if ! rustup component list --installed | grep -q "^$c-"; then
            log "adding the rust component $c"
            rustup component add "$c" >&2
        fi
    done
}

build_all() {
    mkdir -p "$guest_dir"
    log "guest kernel (cached under ~/.cache/carapace/kernel)"
    local vmlinux
    vmlinux=$(bash "$repo/guest-kernel/build.sh")
    cp -f "$vmlinux" "$guest_dir/vmlinux"
    log "guest initramfs (the agent as /init)"
    bash "$repo/rootfs-image/build.sh" "$guest_dir/initramfs.cpio" >&2
    log "host binaries"
    (cd "$repo" && cargo build --release -p carapace-vmm -p carapace-runtime -p carapace-shim >&2)
    export CARAPACE_BIN_DIR="$repo/target/release"
    export CARAPACE_KERNEL="$guest_dir/vmlinux"
    export CARAPACE_INITRAMFS="$guest_dir/initramfs.cpio"
}
