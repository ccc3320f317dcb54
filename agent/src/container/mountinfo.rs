//! The mount table of the agent's mount namespace (/proc/self/mountinfo),
//! and undoing the mounts a container left in it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The mount points of this mount namespace.
pub fn mount_points() -> HashSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| {
            text.lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|p| PathBuf::from(unescape_mountinfo(p)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Unmounts (lazily, deepest first) what is mounted under `rootfs` now and
/// was not in `before`.
pub fn unmount_new_under(rootfs: &Path, before: &HashSet<PathBuf>) {
    let mut new: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(rootfs) && !before.contains(p))
        .collect();
    new.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in new {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "unmounting a container mount");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b\\011c"), "/a b\tc");
    }
}
