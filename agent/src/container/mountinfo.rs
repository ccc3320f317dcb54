//! The mount table of the agent's mount namespace (/proc/self/mountinfo),
//! and undoing the mounts a container without a mount namespace of its
//! own left in it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::sys::Syscall;

/// The mount points of this mount namespace.
pub fn mount_points() -> HashSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|text| parse_mount_points(&text)).unwrap_or_default()
}

/// The mount points (fifth field) of a mountinfo table.
pub fn parse_mount_points(text: &str) -> HashSet<PathBuf> {
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape_mountinfo(p))).collect()
}

/// A mountinfo path as it is (mountinfo escapes space, tab, newline and
/// backslash in octal).
pub fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// What is mounted under `rootfs` in `now` and was not in `before`,
/// deepest first (the order to unmount in).
pub fn new_under(now: HashSet<PathBuf>, rootfs: &Path, before: &HashSet<PathBuf>) -> Vec<PathBuf> {
    let mut new: Vec<PathBuf> = now.into_iter().filter(|p| p.starts_with(rootfs) && !before.contains(p)).collect();
    new.sort_by(|a, b| b.components().count().cmp(&a.components().count()).then_with(|| a.cmp(b)));
    new
}

/// Unmounts (lazily, deepest first) what is mounted under `rootfs` now and
/// was not in `before`.
pub fn unmount_new_under(sys: &dyn Syscall, rootfs: &Path, before: &HashSet<PathBuf>) {
    for p in new_under(mount_points(), rootfs, before) {
        if let Err(e) = sys.umount(&p) {
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

    #[test]
    fn new_mounts_under_the_rootfs_deepest_first() {
        let before = parse_mount_points(
            "22 1 0:21 / / rw - ext4 /dev/vda rw\n\
             23 22 0:22 / /r/rootfs/keep rw - tmpfs tmpfs rw\n",
        );
        let now = parse_mount_points(
            "22 1 0:21 / / rw - ext4 /dev/vda rw\n\
             23 22 0:22 / /r/rootfs/keep rw - tmpfs tmpfs rw\n\
             30 22 0:30 / /r/rootfs/proc rw - proc proc rw\n\
             31 30 0:31 / /r/rootfs/proc/sys rw - proc proc ro\n\
             32 22 0:32 / /r/rootfs/my\\040dir rw - tmpfs tmpfs rw\n\
             33 22 0:33 / /elsewhere rw - tmpfs tmpfs rw\n",
        );
        assert_eq!(
            new_under(now, Path::new("/r/rootfs"), &before),
            [PathBuf::from("/r/rootfs/proc/sys"), PathBuf::from("/r/rootfs/my dir"), PathBuf::from("/r/rootfs/proc"),]
        );
    }
}
