#!/usr/bin/env bash
# One command for a fresh machine: installs the build dependencies, builds the
# guest kernel, the initramfs and the host binaries, installs them, checks the
# host, and runs a busybox container in a microVM with `carapace run`.
# Usage: sudo bash scripts/setup.sh [--no-demo]
source "$(dirname "$0")/lib.sh"

prefix=${PREFIX:-/usr/local}
install_packages
build_all

log "installing into $prefix"
install -d "$prefix/bin" "$prefix/share/carapace"
install -m 0755 "$repo/target/release/carapace" "$repo/target/release/carapace-vmm" \
    "$repo/target/release/containerd-shim-carapace-v2" "$prefix/bin/"
install -m 0644 "$guest_dir/vmlinux" "$guest_dir/initramfs.cpio" "$prefix/share/carapace/"
# The example config sets nothing (every key commented out at its default);
# an operator's own file is never replaced.
if [ ! -e /etc/carapace/config.toml ]; then
    install -D -m 0644 "$repo/config/config.toml" /etc/carapace/config.toml
fi

if [ "${1:-}" != "--no-demo" ]; then
    unset CARAPACE_KERNEL CARAPACE_INITRAMFS CARAPACE_BIN_DIR
    "$prefix/bin/carapace" check
    demo=$(mktemp -d /var/tmp/carapace-demo.XXXXXX)
    trap 'rm -rf "$demo"' EXIT
    mkdir -p "$demo/rootfs/bin" "$demo/rootfs/proc" "$demo/rootfs/sys" "$demo/rootfs/dev" "$demo/rootfs/tmp"
    cp /bin/busybox "$demo/rootfs/bin/"
    for applet in $("$demo/rootfs/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$demo/rootfs/bin/$applet"
    done
    "$prefix/bin/carapace" spec --bundle "$demo"
    jq '.process.terminal = false | .process.args = ["sh", "-c", "echo hello from $(hostname), kernel $(uname -r), in a microVM"]' \
        "$demo/config.json" > "$demo/config.json.new" && mv "$demo/config.json.new" "$demo/config.json"
    log "carapace run: a busybox container in its own microVM (tens of seconds on a kvm_pvm host)"
    "$prefix/bin/carapace" run --bundle "$demo" "demo-$$"
fi
