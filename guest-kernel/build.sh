#!/usr/bin/env bash
# Builds the guest kernel (uncompressed vmlinux) from Debian's linux-source-6.1
# with config.fragment and patches/, and caches it outside the repo, keyed by
# a hash of everything that goes into it. Prints the vmlinux path on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src_tar=/usr/src/linux-source-6.1.tar.xz
cache=${CARAPACE_CACHE:-$HOME/.cache/carapace}/kernel

[ -f "$src_tar" ] || { echo "guest-kernel: $src_tar missing (apt-get install linux-source-6.1)" >&2; exit 1; }

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_version"; cat "$here/config.fragment" "$here"/patches/*.patch "$0"; } | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

work="$cache/build-$key"
rm -rf "$work"
mkdir -p "$work"
trap 'echo "guest-kernel: build failed; tree kept in $work" >&2' ERR
echo "guest-kernel: building $key from linux-source $src_version in $work" >&2
tar -xf "$src_tar" -C "$work" --strip-components=1
for p in "$here"/patches/*.patch; do
    patch -d "$work" -p1 --quiet < "$p"
done

make -C "$work" -s allnoconfig KCONFIG_ALLCONFIG="$here/config.fragment" >&2
# allnoconfig silently drops what a dependency forbids: insist on every line.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$work/.config" || { echo "guest-kernel: not applied: $line" >&2; missing=1; } ;;
        "# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}
            ! grep -q "^$sym=" "$work/.config" || { echo "guest-kernel: still set: $sym" >&2; missing=1; } ;;
    esac
done < "$here/config.fragment"
[ "$missing" = 0 ] || exit 1

make -C "$work" -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out"
cp "$work/vmlinux" "$out/vmlinux.tmp"
strip --strip-debug "$out/vmlinux.tmp"
cp "$work/.config" "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
rm -rf "$work"
echo "$out/vmlinux"
