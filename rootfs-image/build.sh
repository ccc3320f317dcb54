#!/usr/bin/env bash
# Builds the guest initramfs: an UNCOMPRESSED newc cpio whose /init is the
# static carapace-agent, plus the mount points it uses and /dev/console
# (the kernel opens it as init's stdio before /dev is mounted).
#
#   bash rootfs-image/build.sh [OUTPUT]    (default: build/guest/initramfs.cpio)
#
# Prints the output path on stdout (last line) and its size on stderr.
#
# Why uncompressed and small: on kvm_pvm hosts the guest kernel is emulated;
# unpacking costs ~4.6 s per MB and gzip inflate ~40 s (../shared/PVM-HOSTS.md).
# So the agent is built for size (opt-level z, fat LTO, one codegen unit,
# stripped, no unwind tables: release panics abort anyway) and non-PIE (no
# start-up relocations, fewer page faults). Deterministic: fixed order,
# mtimes, owners and inode numbers; no root or mknod needed.
#
# Why glibc, statically: the agent enforces seccomp through libcontainer's
# libseccomp binding, which links the C libseccomp; Debian ships a static
# libseccomp.a for glibc only (apt libseccomp-dev), so the agent is built for
# x86_64-unknown-linux-gnu with +crt-static and that archive. It uses no
# NSS lookups, so static glibc's dlopen limits do not matter.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
target=x86_64-unknown-linux-gnu
out=${1:-$repo/build/guest/initramfs.cpio}

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$target"; then
    echo "rootfs-image: the Rust target $target is missing; run: rustup target add $target" >&2
    exit 1
fi

seccomp_a=$(cc -print-file-name=libseccomp.a 2>/dev/null || true)
if [ ! -f "$seccomp_a" ]; then
    echo "rootfs-image: libseccomp.a not found; run: apt-get install libseccomp-dev" >&2
    exit 1
fi

echo "rootfs-image: building carapace-agent for $target (static, with $seccomp_a)" >&2
(
    cd "$repo"
    LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=$(dirname "$seccomp_a") \
    cargo build --release --target "$target" -p carapace-agent \
        --config 'profile.release.opt-level="z"' \
        --config 'profile.release.lto="fat"' \
        --config 'profile.release.codegen-units=1' \
        --config 'profile.release.strip=true' \
        --config "target.$target.rustflags=[\"-C\",\"target-feature=+crt-static\",\"-C\",\"relocation-model=static\",\"-C\",\"force-unwind-tables=no\"]" \
        >&2
)
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
agent="$target_dir/$target/release/carapace-agent"
[ -x "$agent" ] || { echo "rootfs-image: $agent was not built" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT

python3 - "$agent" "$tmp" <<'EOF'
"""Writes a newc ("070701") cpio archive, the format the kernel unpacks."""
import sys

agent_path, out_path = sys.argv[1], sys.argv[2]
with open(agent_path, "rb") as f:
    agent = f.read()

S_IFDIR, S_IFREG, S_IFCHR = 0o040000, 0o100000, 0o020000

# (name, mode, content, (rdev major, rdev minor)) in archive order: a
# directory comes before what it holds.
entries = [
    ("dev", S_IFDIR | 0o755, b"", (0, 0)),
    ("dev/console", S_IFCHR | 0o600, b"", (5, 1)),
    ("etc", S_IFDIR | 0o755, b"", (0, 0)),
    ("proc", S_IFDIR | 0o555, b"", (0, 0)),
    ("run", S_IFDIR | 0o755, b"", (0, 0)),
    ("sys", S_IFDIR | 0o555, b"", (0, 0)),
    ("tmp", S_IFDIR | 0o1777, b"", (0, 0)),
    ("init", S_IFREG | 0o755, agent, (0, 0)),
]

def pad4(n):
    return (4 - n % 4) % 4

def record(ino, name, mode, data, rdev):
    name_bytes = name.encode() + b"\0"
    nlink = 2 if (mode & 0o170000) == S_IFDIR else 1
    fields = [
        ino, mode, 0, 0, nlink,  # ino, mode, uid, gid, nlink
        0,                       # mtime: fixed, for reproducible images
        len(data), 0, 0,         # filesize, dev major, dev minor
        rdev[0], rdev[1],        # rdev major, rdev minor
        len(name_bytes), 0,      # namesize, check
    ]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + name_bytes
    return head + b"\0" * pad4(len(head)) + data + b"\0" * pad4(len(data))

with open(out_path, "wb") as out:
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        out.write(record(ino, name, mode, data, rdev))
    out.write(record(0, "TRAILER!!!", 0, b"", (0, 0)))
EOF

mv "$tmp" "$out"
trap - EXIT
size=$(stat -c %s "$out")
echo "rootfs-image: $out: $size bytes ($(( (size + 1023) / 1024 )) KiB), agent $(stat -c %s "$agent") bytes" >&2
echo "$out"
