//! virtio-fs served inline in the VMM: a FUSE server (`fuse-backend-rs`) on
//! the device's virtqueues, backed by a passthrough file system rooted at one
//! host directory.
//!
//! The guest sees a virtio-mmio device of type 26 whose configuration space
//! carries the mount tag; it mounts the share with
//! `mount -t virtiofs <tag> <dir>`.
//!
//! Layout:
//! - `device`: [`Fs`], the [`VirtioDevice`](super::VirtioDevice) (config
//!   space, features, activation, reset);
//! - `backend`: builds the passthrough file system from an [`FsConfig`] and
//!   wraps it in a guard that enforces read-only sharing, refuses to open
//!   host device nodes and validates names and sizes the guest sends;
//! - `creds`: acting as the guest caller (uid, gid and the DAC capabilities
//!   the guest kernel already checked) for requests that create entries;
//! - `request`: processes one virtqueue without threads (pop a descriptor
//!   chain, run the FUSE request, add the used length);
//! - `event_loop`: the worker thread's epoll loop over the queue notifiers;
//! - `stats`: FUSE requests served, by opcode (logged when the worker stops).
//!
//! Wiring, for the VMM core (one device, one transport, one MMIO slot per
//! shared directory):
//!
//! ```ignore
//! fs::validate_tags(config.fs.iter().map(|f| f.tag.as_str()))?; // no clashes
//! for fs_config in &config.fs {
//!     let dev = Fs::new(fs_config.clone())?; // checks tag and dir; needs root
//!     let t = MmioTransport::new(mem.clone(), Box::new(dev), irq);
//!     // ... like any virtio-mmio device: irqfd, ioeventfds, bus window,
//!     // `virtio_mmio.device=4K@<base>:<gsi>` on the kernel command line.
//! }
//! // In the guest: mount -t virtiofs <tag> <dir>   (-o ro for a read-only share)
//! ```
//!
//! Security model: the guest names files only by inode numbers the server
//! handed out and by single path components (no `/`, no `.`/`..` except
//! `..` at the root, which stays at the root). Every host lookup is an
//! `openat(parent_fd, name, O_PATH | O_NOFOLLOW)`, so symbolic links are
//! never followed on the host: the guest kernel reads and resolves them in
//! its own mount. Only regular files and directories are ever opened for
//! I/O on the host (the "nodev" rule: device nodes, FIFOs and sockets in
//! the share belong to the guest kernel).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod backend;
mod creds;
mod device;
mod event_loop;
mod request;
mod stats;

#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod test_utils;

pub use device::Fs;

/// Protocol and sizing constants.
pub mod defs {
    /// Size of the `tag` field of `struct virtio_fs_config` (the tag is
    /// NUL-padded; a 36-byte tag has no terminator).
    pub const TAG_LEN: usize = 36;
    /// Size of `struct virtio_fs_config`: the tag and `num_request_queues`.
    pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;
    /// Number of request queues the device offers.
    pub const NUM_REQUEST_QUEUES: usize = 1;
    /// Index of the high-priority queue (FORGET, INTERRUPT).
    pub const HIPRIO_QUEUE_INDEX: usize = 0;
    /// Index of the first request queue.
    pub const REQUEST_QUEUE_INDEX: usize = 1;
    /// Total number of queues: hiprio plus the request queues.
    pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
    /// Maximum size of each queue.
    pub const QUEUE_SIZE: u16 = 1024;
    /// Largest xattr value or name list (Linux `XATTR_SIZE_MAX`); larger
    /// buffer sizes from the guest are clamped to it.
    pub const XATTR_SIZE_MAX: u32 = 64 * 1024;
    /// Largest READDIR buffer the backend fills in one request.
    pub const READDIR_SIZE_MAX: u32 = 1 << 20;
}

/// How much the guest may cache of the share (FUSE attribute, entry and
/// page-cache policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Nothing is cached: attributes and names are revalidated on every
    /// access and file I/O is direct. For shares that the host changes
    /// behind the guest's back.
    None,
    /// Close-to-open consistency: data is cached while a file is open and
    /// revalidated on open; attributes and names for one second.
    #[default]
    Auto,
    /// The guest caches data, attributes and names for a long time. Only for
    /// shares no one but this guest changes (a container's rootfs).
    Always,
}

/// One shared directory: what the VMM's configuration carries per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag the guest uses (`mount -t virtiofs <tag> <dir>`);
    /// 1 to 36 bytes.
    pub tag: String,
    /// The host directory shared with the guest.
    pub shared_dir: PathBuf,
    /// Refuse every request that would change the share (EROFS).
    #[serde(default)]
    pub read_only: bool,
    /// Guest caching policy.
    #[serde(default)]
    pub cache: CacheMode,
}

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The mount tag is empty.
    #[error("virtio-fs tag is empty")]
    EmptyTag,
    /// The mount tag does not fit the 36-byte config-space field.
    #[error("virtio-fs tag {tag:?} is {len} bytes long (at most {max})", max = defs::TAG_LEN)]
    TagTooLong { tag: String, len: usize },
    /// The mount tag contains a NUL byte.
    #[error("virtio-fs tag {0:?} contains a NUL byte")]
    TagHasNul(String),
    /// Two devices of one VM use the same tag.
    #[error("virtio-fs tag {0:?} is used by more than one device")]
    DuplicateTag(String),
    /// The shared directory does not exist.
    #[error("virtio-fs shared directory {0} does not exist")]
    SharedDirMissing(PathBuf),
    /// The shared directory exists but is not a directory.
    #[error("virtio-fs shared directory {0} is not a directory")]
    SharedDirNotADirectory(PathBuf),
    /// The shared directory cannot be inspected or resolved.
    #[error("virtio-fs shared directory {path}")]
    SharedDirAccess {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The shared directory's path cannot be handed to the backend.
    #[error("virtio-fs shared directory {0} is not valid UTF-8")]
    SharedDirNotUtf8(PathBuf),
    /// The VMM does not run as root: it could not create files with the
    /// guest's ownership nor read every file of the share.
    #[error("virtio-fs needs the VMM to run as root (effective uid is {0})")]
    NotRoot(u32),
    /// The passthrough file system could not be set up.
    #[error("virtio-fs backend for {path}")]
    Backend {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The virtqueue is broken (its rings lie outside guest memory).
    #[error("virtio-fs virtqueue: {0}")]
    Queue(virtio_queue::Error),
}

/// Checks a mount tag: 1 to [`defs::TAG_LEN`] bytes, no NUL.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() {
        return Err(FsError::EmptyTag);
    }
    if tag.len() > defs::TAG_LEN {
        return Err(FsError::TagTooLong { tag: tag.to_owned(), len: tag.len() });
    }
    if tag.as_bytes().contains(&0) {
        return Err(FsError::TagHasNul(tag.to_owned()));
    }
    Ok(())
}

/// Checks the tags of all the virtio-fs devices of one VM: each valid, none
/// used twice.
pub fn validate_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> Result<(), FsError> {
    let mut seen = std::collections::HashSet::new();
    for tag in tags {
        validate_tag(tag)?;
        if !seen.insert(tag) {
            return Err(FsError::DuplicateTag(tag.to_owned()));
        }
    }
    Ok(())
}

impl FsConfig {
    /// Checks the tag and the shared directory (it must exist and be a
    /// directory). Returns the directory's canonical path, the one the
    /// backend opens.
    pub fn validate(&self) -> Result<PathBuf, FsError> {
        validate_tag(&self.tag)?;
        let path = &self.shared_dir;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => FsError::SharedDirMissing(path.clone()),
            _ => FsError::SharedDirAccess { path: path.clone(), source: e },
        })?;
        if !meta.is_dir() {
            return Err(FsError::SharedDirNotADirectory(path.clone()));
        }
        // The backend opens its root with O_NOFOLLOW: hand it a path without
        // symbolic links.
        let canonical = std::fs::canonicalize(path).map_err(|e| FsError::SharedDirAccess { path: path.clone(), source: e })?;
        if canonical.to_str().is_none() || OsStr::as_bytes(canonical.as_os_str()).contains(&0) {
            return Err(FsError::SharedDirNotUtf8(path.clone()));
        }
        Ok(canonical)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    fn cfg(tag: &str, dir: PathBuf) -> FsConfig {
        FsConfig { tag: tag.into(), shared_dir: dir, read_only: false, cache: CacheMode::Auto }
    }

    #[test]
    fn tag_rules() {
        assert!(matches!(validate_tag(""), Err(FsError::EmptyTag)));
        assert!(validate_tag("a").is_ok());
        assert!(validate_tag(&"x".repeat(36)).is_ok());
        let err = validate_tag(&"x".repeat(37)).unwrap_err();
        assert!(matches!(err, FsError::TagTooLong { len: 37, .. }));
        assert!(err.to_string().contains("37 bytes"), "{err}");
        // 36 bytes is a byte count, not a char count.
        assert!(matches!(validate_tag(&"é".repeat(19)), Err(FsError::TagTooLong { len: 38, .. })));
        assert!(matches!(validate_tag("a\0b"), Err(FsError::TagHasNul(_))));
    }

    #[test]
    fn duplicate_tags() {
        assert!(validate_tags(["rootfs", "shared"]).is_ok());
        let err = validate_tags(["rootfs", "shared", "rootfs"]).unwrap_err();
        assert!(matches!(err, FsError::DuplicateTag(ref t) if t == "rootfs"));
        assert!(matches!(validate_tags(["ok", ""]), Err(FsError::EmptyTag)));
    }

    #[test]
    fn shared_dir_must_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = cfg("t", missing.clone()).validate().unwrap_err();
        assert!(matches!(err, FsError::SharedDirMissing(ref p) if *p == missing));
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn shared_dir_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = cfg("t", file.clone()).validate().unwrap_err();
        assert!(matches!(err, FsError::SharedDirNotADirectory(ref p) if *p == file));
        assert!(err.to_string().contains(&file.display().to_string()), "{err}");
    }

    #[test]
    fn shared_dir_symlink_is_resolved() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let canonical = cfg("t", link).validate().unwrap();
        assert_eq!(canonical, std::fs::canonicalize(&real).unwrap());
    }

    #[test]
    fn bad_tag_is_reported_before_the_directory() {
        let err = cfg("", PathBuf::from("/nonexistent")).validate().unwrap_err();
        assert!(matches!(err, FsError::EmptyTag));
    }

    #[test]
    fn config_json_round_trip() {
        let c = FsConfig {
            tag: "rootfs".into(),
            shared_dir: PathBuf::from("/run/carapace/x/shared"),
            read_only: true,
            cache: CacheMode::Always,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"cache\":\"always\""), "{json}");
        let back: FsConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);

        // A list, as the VMM config carries it; defaults for the optional fields.
        let list: Vec<FsConfig> =
            serde_json::from_str(r#"[{"tag":"a","shared_dir":"/a"},{"tag":"b","shared_dir":"/b","cache":"none"}]"#).unwrap();
        assert_eq!(list[0].cache, CacheMode::Auto);
        assert!(!list[0].read_only);
        assert_eq!(list[1].cache, CacheMode::None);
        assert!(serde_json::from_str::<FsConfig>(r#"{"tag":"a","shared_dir":"/a","cache":"sometimes"}"#).is_err());
    }
}
