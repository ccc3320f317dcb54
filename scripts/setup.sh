#!/usr/bin/env bash
# One command for a fresh machine: installs the build dependencies, builds the
# guest kernel, the initramfs and the host binaries, installs them, and boots a
# microVM whose agent answers.   Usage: sudo bash scripts/setup.sh [--no-demo]
source "$(dirname "$0")/lib.sh"

prefix=${PREFIX:-/usr/local}
install_packages
build_all

log "installing into $prefix"
install -d "$prefix/bin" "$prefix/share/carapace"
install -m 0755 "$repo/target/release/carapace" "$repo/target/release/carapace-vmm" "$prefix/bin/"
install -m 0644 "$guest_dir/vmlinux" "$guest_dir/initramfs.cpio" "$prefix/share/carapace/"

if [ "${1:-}" != "--no-demo" ]; then
    log "checking the host and booting a microVM (tens of seconds on a kvm_pvm host)"
    unset CARAPACE_KERNEL CARAPACE_INITRAMFS CARAPACE_BIN_DIR
    "$prefix/bin/carapace" check --boot
fi
