//! A virtio-fs device's configuration: one shared host directory, its mount
//! tag and the guest's caching policy.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Size of the `tag` field of `struct virtio_fs_config` (the tag is
/// NUL-padded; a 36-byte tag has no terminator).
pub const TAG_LEN: usize = 36;

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

/// Why a share's configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FsConfigError {
    /// The mount tag is empty.
    #[error("virtio-fs tag is empty")]
    EmptyTag,
    /// The mount tag does not fit the 36-byte config-space field.
    #[error("virtio-fs tag {tag:?} is {len} bytes long (at most {TAG_LEN})")]
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
}

/// Checks a mount tag: 1 to [`TAG_LEN`] bytes, no NUL.
pub fn validate_tag(tag: &str) -> Result<(), FsConfigError> {
    if tag.is_empty() {
        return Err(FsConfigError::EmptyTag);
    }
    if tag.len() > TAG_LEN {
        return Err(FsConfigError::TagTooLong { tag: tag.to_owned(), len: tag.len() });
    }
    if tag.as_bytes().contains(&0) {
        return Err(FsConfigError::TagHasNul(tag.to_owned()));
    }
    Ok(())
}

/// Checks the tags of all the virtio-fs devices of one VM: each valid, none
/// used twice.
pub fn validate_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> Result<(), FsConfigError> {
    let mut seen = std::collections::HashSet::new();
    for tag in tags {
        validate_tag(tag)?;
        if !seen.insert(tag) {
            return Err(FsConfigError::DuplicateTag(tag.to_owned()));
        }
    }
    Ok(())
}

impl FsConfig {
    /// Checks the tag and the shared directory (it must exist and be a
    /// directory). Returns the directory's canonical path, the one the
    /// backend opens.
    pub fn validate(&self) -> Result<PathBuf, FsConfigError> {
        validate_tag(&self.tag)?;
        let path = &self.shared_dir;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => FsConfigError::SharedDirMissing(path.clone()),
            _ => FsConfigError::SharedDirAccess { path: path.clone(), source: e },
        })?;
        if !meta.is_dir() {
            return Err(FsConfigError::SharedDirNotADirectory(path.clone()));
        }
        // The backend opens its root with O_NOFOLLOW: hand it a path without
        // symbolic links.
        let canonical = std::fs::canonicalize(path).map_err(|e| FsConfigError::SharedDirAccess { path: path.clone(), source: e })?;
        if canonical.to_str().is_none() || OsStr::as_bytes(canonical.as_os_str()).contains(&0) {
            return Err(FsConfigError::SharedDirNotUtf8(path.clone()));
        }
        Ok(canonical)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(tag: &str, dir: PathBuf) -> FsConfig {
        FsConfig { tag: tag.into(), shared_dir: dir, read_only: false, cache: CacheMode::Auto }
    }

    #[test]
    fn tag_rules() {
        assert!(matches!(validate_tag(""), Err(FsConfigError::EmptyTag)));
        assert!(validate_tag("a").is_ok());
        assert!(validate_tag(&"x".repeat(36)).is_ok());
        let err = validate_tag(&"x".repeat(37)).unwrap_err();
        assert!(matches!(err, FsConfigError::TagTooLong { len: 37, .. }));
        assert!(err.to_string().contains("37 bytes"), "{err}");
        // 36 bytes is a byte count, not a char count.
        assert!(matches!(validate_tag(&"é".repeat(19)), Err(FsConfigError::TagTooLong { len: 38, .. })));
        assert!(matches!(validate_tag("a\0b"), Err(FsConfigError::TagHasNul(_))));
    }

    #[test]
    fn duplicate_tags() {
        assert!(validate_tags(["rootfs", "shared"]).is_ok());
        let err = validate_tags(["rootfs", "shared", "rootfs"]).unwrap_err();
        assert!(matches!(err, FsConfigError::DuplicateTag(ref t) if t == "rootfs"));
        assert!(matches!(validate_tags(["ok", ""]), Err(FsConfigError::EmptyTag)));
    }

    #[test]
    fn shared_dir_must_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = cfg("t", missing.clone()).validate().unwrap_err();
        assert!(matches!(err, FsConfigError::SharedDirMissing(ref p) if *p == missing));
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn shared_dir_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = cfg("t", file.clone()).validate().unwrap_err();
        assert!(matches!(err, FsConfigError::SharedDirNotADirectory(ref p) if *p == file));
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
        assert!(matches!(err, FsConfigError::EmptyTag));
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
