//! A container's root filesystem on the host: containerd's `rootfs` mounts
//! (a snapshot: bind, overlay, ...) mounted at `<bundle>/rootfs` when the
//! Create request carries them, and the binds that put it (and the spec's
//! bind-mount sources) into the sandbox's share. All of it happens in the
//! shim's own mount namespace, so none of it outlives the shim.

use std::path::{Path, PathBuf};

use carapace_runtime::share::unmount;
use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, MsFlags};

/// Errors mounting a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs mount {index} ({typ} {source_path} on {target}): {errno}")]
    Mount { index: usize, typ: String, source_path: String, target: PathBuf, errno: nix::Error },
    #[error("rootfs: cannot create {path}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("rootfs mount {index}: options too long ({len} bytes)")]
    OptionsTooLong { index: usize, len: usize },
    #[error("rootfs: {path} is a symlink (to {dest}); containerd's rootfs is not mounted through a link")]
    Symlink { path: PathBuf, dest: PathBuf },
}

/// mount(8)-style options split into flags and the data string.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    flags: MsFlags,
    propagation: MsFlags,
    data: String,
}

fn parse_options(options: &[String]) -> Options {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable" => {
                let p = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                let rec = if o.starts_with('r') { MsFlags::MS_REC } else { MsFlags::empty() };
                propagation = p | rec;
                continue;
            }
            other => {
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    Options { flags, propagation, data: data.join(",") }
}

/// The longest data string mount(2) takes (one page).
const MAX_DATA: usize = 4096;

/// Mounts containerd's `mounts` on `target` in order (normally one: the
/// snapshot). A read-only bind is remounted read-only, as mount(8) does.
/// On failure, what was mounted is undone. A `target` that is a symlink is
/// refused: mount(2) would follow it, anywhere on the host (`rootfs -> /`).
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), RootfsError> {
    if target.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
        let dest = std::fs::read_link(target).unwrap_or_default();
        return Err(RootfsError::Symlink { path: target.to_path_buf(), dest });
    }
    std::fs::create_dir_all(target).map_err(|source| RootfsError::Create { path: target.to_path_buf(), source })?;
    for (index, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(index, m, target) {
            for _ in 0..index {
                unmount(target);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn mount_one(index: usize, m: &Mount, target: &Path) -> Result<(), RootfsError> {
    let opts = parse_options(&m.options);
    if opts.data.len() >= MAX_DATA {
        return Err(RootfsError::OptionsTooLong { index, len: opts.data.len() });
    }
    let fail =
        |errno| RootfsError::Mount { index, typ: m.type_.clone(), source_path: m.source.clone(), target: target.to_path_buf(), errno };
    let bind = opts.flags.contains(MsFlags::MS_BIND);
    let typ = (!bind && !m.type_.is_empty()).then_some(m.type_.as_str());
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    let source = (!m.source.is_empty()).then_some(m.source.as_str());
    let first = if bind { opts.flags & !MsFlags::MS_RDONLY } else { opts.flags };
    mount(source, target, typ, first, data).map_err(fail)?;
    if bind && opts.flags.contains(MsFlags::MS_RDONLY) {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            unmount(target);
            return Err(fail(e));
        }
    }
    if !opts.propagation.is_empty() {
        if let Err(e) = mount(None::<&str>, target, None::<&str>, opts.propagation, None::<&str>) {
            unmount(target);
            return Err(fail(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Options {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = opts(&["rbind", "ro", "nosuid"]);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert!(o.data.is_empty());
        let o = opts(&["index=off", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"]);
        assert_eq!(o.flags, MsFlags::empty());
        assert_eq!(o.data, "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w");
        let o = opts(&["ro", "rw", "rprivate"]);
        assert_eq!(o.flags, MsFlags::empty());
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
    }

    #[test]
    fn a_symlinked_target_is_refused_before_anything_is_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("rootfs");
        std::os::unix::fs::symlink("/", &target).expect("symlink");
        let m = Mount { type_: "bind".into(), source: "/nonexistent".into(), options: vec!["rbind".into()], ..Default::default() };
        let e = mount_all(&[m], &target).expect_err("symlink").to_string();
        assert!(e.contains("is a symlink (to /)"), "{e}");
    }
}
