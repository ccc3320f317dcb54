//! Container state under the runtime root (`/run/carapace/<id>/`): one
//! directory per container holding `state.json` (written atomically) and the
//! sandbox VM's files; a per-id lock serializes commands on one container.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Hook;
use serde::{Deserialize, Serialize};

use crate::hooks::OciState;
use crate::id::{validate_id, IdError};

/// The lifecycle states of the OCI runtime spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// What the runtime records about one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub status: Status,
    /// The monitor's host pid: what `state` reports as `pid` and the pid
    /// file holds (it exits with the container's status, as runc's init).
    pub pid: u32,
    /// The VMM's host pid (also in `state`'s annotations).
    #[serde(default)]
    pub vmm_pid: u32,
    /// The container init process's pid inside the guest.
    pub guest_pid: u32,
    /// RFC 3339 creation time.
    pub created: String,
    pub owner: String,
    pub annotations: HashMap<String, String>,
    /// Exit status once stopped (128+N for a signal, as shells report it).
    pub exit_code: Option<i32>,
    /// Why the container is stopped when it did not simply exit.
    pub stop_reason: Option<String>,
    /// The host process that owns the VM and stands in for the container
    /// (it exits with the container's status); 0 before it exists.
    #[serde(default)]
    pub monitor_pid: u32,
    /// Start times (clock ticks since boot, /proc/PID/stat field 22) of the
    /// VMM and the monitor, so that a reused pid is never taken for ours.
    #[serde(default)]
    pub vmm_start_time: u64,
    #[serde(default)]
    pub monitor_start_time: u64,
    /// The spec's poststart and poststop hooks, kept at `create` so that
    /// `start` and `delete`, which run them on the host, need not parse the
    /// bundle's config.json again (nor see it changed since).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poststart: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poststop: Vec<Hook>,
}

impl ContainerRecord {
    /// The OCI `state` JSON as runc prints it, with the VMM's pid as an
    /// annotation (`pid` is the monitor's, which the pid file names too).
    pub fn oci_state(&self) -> serde_json::Value {
        let mut annotations = self.annotations.clone();
        if self.vmm_pid != 0 {
            annotations.insert(crate::annotations::VMM_PID.into(), self.vmm_pid.to_string());
        }
        // The OCI spec has no "paused"; runc reports it anyway.
        let status = self.status.to_string();
        let mut state = OciState::new(&self.id, &status, self.pid, &self.bundle, &annotations);
        state.rootfs = Some(&self.rootfs);
        state.created = Some(&self.created);
        state.owner = Some(&self.owner);
        if self.status == Status::Stopped {
            state.stop_reason = self.stop_reason.as_deref();
        }
        state.json()
    }
}

/// Errors of the state store. Messages follow runc's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container with id {0} already exists")]
    Exists(String),
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt state: {msg}")]
    Corrupt { path: PathBuf, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// The runtime root directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

/// An exclusive lock on one container id; released on drop.
#[derive(Debug)]
pub struct IdLock {
    /// Held only for its descriptor: the flock lasts as long as it is open.
    _file: File,
    path: PathBuf,
}

impl IdLock {
    /// Removes the lock file (after the container is deleted), still holding it.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl StateStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of container `id` (validated, so it stays under the root).
    pub fn dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        Ok(self.root.join(dir_name(id)))
    }

    fn ensure_root(&self) -> Result<(), StateError> {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(&self.root).map_err(io(&self.root))
    }

    /// Takes the exclusive lock of `id`, waiting for another command on the
    /// same id to finish. Lock files live beside the state dirs, as `.<id>.lock`.
    pub fn lock(&self, id: &str) -> Result<IdLock, StateError> {
        validate_id(id)?;
        self.ensure_root()?;
        let path = self.root.join(format!(".{}.lock", dir_name(id)));
        loop {
            let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                return Err(StateError::Io { path, source: std::io::Error::last_os_error() });
            }
            // The holder before us may have deleted the container and unlinked
            // the file: then lock the new one instead.
            let linked = std::fs::metadata(&path).map(|m| m.ino()).ok();
            let ours = file.metadata().map(|m| m.ino()).map_err(io(&path))?;
            if linked == Some(ours) {
                return Ok(IdLock { _file: file, path });
            }
        }
    }

    /// Takes the lock of `id` if nobody holds it; `None` if someone does.
    pub fn try_lock(&self, id: &str) -> Result<Option<IdLock>, StateError> {
        validate_id(id)?;
        let path = self.root.join(format!(".{}.lock", dir_name(id)));
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            // Deleted meanwhile: nothing left to lock.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotFound(id.into())),
            Err(e) => return Err(StateError::Io { path, source: e }),
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Ok(None);
        }
        let linked = std::fs::metadata(&path).map(|m| m.ino()).ok();
        let ours = file.metadata().map(|m| m.ino()).map_err(io(&path))?;
        if linked != Some(ours) {
            return Err(StateError::NotFound(id.into()));
        }
        Ok(Some(IdLock { _file: file, path }))
    }

    /// Creates the state dir of a new container; fails if the id is taken.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let dir = self.dir(id)?;
        self.ensure_root()?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StateError::Exists(id.into())),
            Err(e) => Err(StateError::Io { path: dir, source: e }),
        }
    }

    /// Writes `state.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, record: &ContainerRecord) -> Result<(), StateError> {
        let dir = self.dir(&record.id)?;
        let path = dir.join("state.json");
        let tmp = dir.join(".state.json.tmp");
        let text = serde_json::to_vec_pretty(record).map_err(|e| StateError::Corrupt { path: path.clone(), msg: e.to_string() })?;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&text).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Reads the record of `id`.
    pub fn load(&self, id: &str) -> Result<ContainerRecord, StateError> {
        let path = self.dir(id)?.join("state.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotFound(id.into())),
            Err(e) => return Err(StateError::Io { path, source: e }),
        };
        let record: ContainerRecord =
            serde_json::from_slice(&text).map_err(|e| StateError::Corrupt { path: path.clone(), msg: e.to_string() })?;
        if record.id != id {
            return Err(StateError::Corrupt { path, msg: format!("holds container {:?}", record.id) });
        }
        Ok(record)
    }

    /// Every container under the root, sorted by id (unreadable ones skipped).
    pub fn list(&self) -> Vec<ContainerRecord> {
        let Ok(dir) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut out: Vec<_> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| {
                let text = std::fs::read(self.root.join(n).join("state.json")).ok()?;
                serde_json::from_slice::<ContainerRecord>(&text).ok()
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Removes the state dir of `id` and everything in it.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.dir(id)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StateError::Io { path: dir, source: e }),
        }
    }
}

/// Longest id used as a directory name as it is. Longer ids get a short
/// name with a hash: the VM's sockets live in the directory, and a Unix
/// socket path has at most 107 bytes (containerd's runc shim already uses a
/// 30-byte root).
const MAX_DIR_NAME: usize = 32;

/// The state directory name of a (valid) id.
pub fn dir_name(id: &str) -> String {
    if id.len() <= MAX_DIR_NAME {
        return id.to_string();
    }
    // FNV-1a: stable across Rust releases, unlike std's hasher.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{}-{hash:016x}", &id[..MAX_DIR_NAME - 17])
}

/// Now, in RFC 3339 with nanoseconds (runc's `created` format).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: Status::Created,
            pid: 42,
            vmm_pid: 43,
            guest_pid: 1,
            created: now_rfc3339(),
            owner: String::new(),
            annotations: HashMap::new(),
            exit_code: None,
            stop_reason: None,
            monitor_pid: 0,
            vmm_start_time: 0,
            monitor_start_time: 0,
            poststart: Vec::new(),
            poststop: Vec::new(),
        }
    }

    #[test]
    fn long_ids_get_short_distinct_dir_names() {
        let a = "a".repeat(64);
        let b = format!("{}b", "a".repeat(63));
        assert_eq!(dir_name("short"), "short");
        assert_eq!(dir_name(&a).len(), 32);
        assert_ne!(dir_name(&a), dir_name(&b));
        let root = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(root.path());
        store.create_dir(&a).expect("create");
        store.save(&record(&a)).expect("save");
        assert_eq!(store.load(&a).expect("load").id, a);
        assert_eq!(store.list().len(), 1);
    }

    #[test]
    fn create_save_load_list_remove() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(root.path().join("run"));
        store.create_dir("a").expect("create");
        assert!(matches!(store.create_dir("a"), Err(StateError::Exists(_))));
        store.save(&record("a")).expect("save");
        assert_eq!(store.load("a").expect("load"), record_with_created(&store, "a"));
        assert_eq!(store.list().len(), 1);
        store.remove("a").expect("remove");
        assert!(matches!(store.load("a"), Err(StateError::NotFound(_))));
        assert!(matches!(store.load("../etc"), Err(StateError::Id(_))));
    }

    fn record_with_created(store: &StateStore, id: &str) -> ContainerRecord {
        let mut r = record(id);
        r.created = store.load(id).expect("load").created;
        r
    }

    #[test]
    fn oci_state_has_runc_fields() {
        let v = record("x").oci_state();
        for k in ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner", "annotations"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["status"], "created");
    }

    #[test]
    fn lock_is_exclusive_and_survives_removal() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(root.path());
        let l1 = store.lock("c").expect("lock");
        let s2 = store.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let l2 = s2.lock("c").expect("lock 2");
            tx.send(()).expect("send");
            drop(l2);
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "second lock must wait");
        l1.remove();
        drop(l1);
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("second lock acquired");
        t.join().expect("join");
    }
}
