//! VM templates: one snapshot per VM shape, from which sandboxes start
//! instead of booting a guest kernel.
//!
//! A template is a VM booted once to its agent's first answer, before any
//! sandbox's config reached it, and snapshotted by `carapace-vmm` (SIGUSR2:
//! `memory` and `state`, see the VMM's `snapshot` module). Its *shape* is all
//! that the guest has seen of its host by then: the VMM, kernel and initramfs
//! (by file identity, so a rebuilt initramfs makes a new template), the
//! kernel command line, vCPUs, memory, the host's KVM kind and the virtio
//! devices (vsock, the shares' tags, the number of NICs). Its directory is
//! `<template_dir>/<key>/`, the key a hash of the shape:
//!
//! - `memory`, `state`: the snapshot (the VMM maps `memory` MAP_PRIVATE,
//!   so every VM started from it shares its clean pages);
//! - `template.json`: the shape and when it was made, written last: a
//!   directory without it is not a template.
//!
//! A template is made under `<key>.lock` held exclusively, in a scratch
//! directory `<key>.new` that becomes `<key>` by one rename; VMs start from
//! it under the same lock held shared, so two sandboxes at once make one
//! template, and `carapace template rm` (exclusive) never removes one that
//! a VMM is opening. Files are never rewritten in place: a VMM that has
//! mapped `memory` keeps its pages when the template is removed or rebuilt.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assets::GuestAssets;
use crate::config::Config;
use crate::host::{self, CheckItem, KvmKind};
use crate::vm::VmOptions;

/// The snapshot's files, as the VMM names them.
pub const MEMORY_FILE: &str = "memory";
pub const STATE_FILE: &str = "state";
/// The template's description; its presence marks a complete template.
pub const DESCRIPTION_FILE: &str = "template.json";

/// The MAC address a template VM's NIC `i` has. A sandbox restored from
/// the template finds its NICs by these and gives them its own MACs
/// (`Interface.device_mac` in CreateSandbox).
pub fn template_mac(i: usize) -> [u8; 6] {
    [0x02, 0xca, 0xfe, 0x00, 0x00, u8::try_from(i).unwrap_or(u8::MAX)]
}

/// Why a template could not be found, made, listed or removed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template store {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock template {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a template key (16 hex digits, as `carapace template list` prints)")]
    BadKey(String),
    #[error("no template {0}")]
    NotFound(String),
    #[error("making the template failed")]
    Make(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("starting a VM from template {key} failed (the template is discarded)")]
    Restore {
        key: String,
        #[source]
        source: Box<crate::vm::VmError>,
    },
}

/// An I/O error on `path` in the template store (or a template being made).
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io { path: path.to_path_buf(), source }
}

/// A file the guest was started from, by identity: a rebuilt file has
/// another inode or modification time, so its template is another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub size: u64,
    pub dev: u64,
    pub inode: u64,
    pub mtime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> Result<Self, TemplateError> {
        let m = std::fs::metadata(path).map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            size: m.len(),
            dev: m.dev(),
            inode: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Everything the guest has seen of its host when the snapshot is taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub vmm: FileId,
    pub kernel: FileId,
    pub initramfs: FileId,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// The host's KVM is `kvm_pvm` (the guest kernel runs differently).
    pub pvm: bool,
    /// The virtio devices in bus order: `vsock`, `fs:<tag>:<cache>`,
    /// `net:<mtu>` (the guest reads its NIC's MTU when it probes it).
    pub devices: Vec<String>,
}

impl Shape {
    /// The shape of a VM started from `assets` with `opts` on this host.
    pub fn of(assets: &GuestAssets, opts: &VmOptions) -> Result<Self, TemplateError> {
        let mut devices = vec!["vsock".to_string()];
        devices.extend(opts.fs.iter().map(|f| format!("fs:{}:{:?}", f.tag, f.cache)));
        devices.extend(opts.net.iter().map(|n| format!("net:{}", n.mtu)));
        Ok(Self {
            vmm: FileId::of(&assets.vmm)?,
            kernel: FileId::of(&assets.kernel)?,
            initramfs: FileId::of(&assets.initramfs)?,
            cmdline: opts.extra_cmdline.clone(),
            vcpus: opts.vcpus,
            mem_mib: opts.mem_mib,
            pvm: host::kvm_kind() == KvmKind::Pvm,
            devices,
        })
    }

    /// Same files by path and same settings, whatever the files' versions.
    fn same_settings(&self, other: &Self) -> bool {
        let paths = |s: &Self| [s.vmm.path.clone(), s.kernel.path.clone(), s.initramfs.path.clone()];
        paths(self) == paths(other)
            && (&self.cmdline, self.vcpus, self.mem_mib, self.pvm, &self.devices)
                == (&other.cmdline, other.vcpus, other.mem_mib, other.pvm, &other.devices)
    }

    /// The template's key: 16 hex digits of the shape's SHA-256.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// What `template.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Description {
    pub shape: Shape,
    /// When the template was made (seconds since the epoch).
    pub created_unix: u64,
    /// How long the cold boot to the agent's answer took.
    pub boot_ms: u64,
}

/// A template as `carapace template list` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub dir: PathBuf,
    /// None: the directory is not a complete template (being made, or
    /// left by a maker that died).
    pub description: Option<Description>,
    /// Bytes of disk the snapshot files take (the memory file is sparse).
    pub disk_bytes: u64,
}

/// A template ready to start from: the lock is held shared until this is
/// dropped, which must be once the VMM has opened the files.
#[derive(Debug)]
pub struct Template {
    pub key: String,
    pub dir: PathBuf,
    _lock: File,
}

/// The template directory.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    dir: PathBuf,
}

fn flock(file: &File, path: &Path, op: libc::c_int) -> Result<(), TemplateError> {
    loop {
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(TemplateError::Lock { path: path.to_path_buf(), source: e });
        }
    }
}

fn valid_key(key: &str) -> bool {
    key.len() == 16 && key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TemplateStore {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_file(&self, key: &str) -> Result<(File, PathBuf), TemplateError> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io(&self.dir))?;
        let path = self.dir.join(format!("{key}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(io(&path))?;
        Ok((file, path))
    }

    fn complete(dir: &Path) -> bool {
        [MEMORY_FILE, STATE_FILE, DESCRIPTION_FILE].iter().all(|f| dir.join(f).is_file())
    }

    /// The template of `shape`, made first if there is none: `make` boots
    /// a VM and snapshots it into the (empty, existing) directory it is
    /// given, and returns the cold boot's duration. One maker at a time per
    /// shape, however many processes ask at once; the others wait, then use
    /// what it made.
    #[tracing::instrument(name = "template", skip_all, fields(key = %shape.key()))]
    pub fn get_or_make(
        &self,
        shape: &Shape,
        make: impl FnOnce(&Path) -> Result<std::time::Duration, TemplateError>,
    ) -> Result<Template, TemplateError> {
        let key = shape.key();
        let dir = self.dir.join(&key);
        let (lock, lock_path) = self.lock_file(&key)?;
        flock(&lock, &lock_path, libc::LOCK_SH)?;
        if Self::complete(&dir) {
            return Ok(Template { key, dir, _lock: lock });
        }
        flock(&lock, &lock_path, libc::LOCK_EX)?;
        // Another maker may have finished while we waited.
        if !Self::complete(&dir) {
            let scratch = self.dir.join(format!("{key}.new"));
            for d in [&dir, &scratch] {
                if d.exists() {
                    std::fs::remove_dir_all(d).map_err(io(d))?;
                }
            }
            std::fs::DirBuilder::new().mode(0o700).create(&scratch).map_err(io(&scratch))?;
            let made = make(&scratch).and_then(|boot| {
                let description = Description { shape: shape.clone(), created_unix: now_unix(), boot_ms: millis(boot) };
                let path = scratch.join(DESCRIPTION_FILE);
                let text = serde_json::to_vec_pretty(&description).map_err(|e| io(&path)(e.into()))?;
                std::fs::write(&path, text).map_err(io(&path))?;
                if !Self::complete(&scratch) {
                    return Err(TemplateError::Make("the VMM exited without writing its snapshot".into()));
                }
                std::fs::rename(&scratch, &dir).map_err(io(&dir))
            });
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(e);
            }
            tracing::info!(dir = %dir.display(), "template made");
            self.prune_superseded(shape, &key);
        }
        flock(&lock, &lock_path, libc::LOCK_SH)?;
        // `template rm` may have run between the two locks.
        if !Self::complete(&dir) {
            return Err(TemplateError::NotFound(key));
        }
        Ok(Template { key, dir, _lock: lock })
    }

    /// Removes the templates `shape` replaces: made from the same files
    /// (by path) with the same settings, but of older versions of them. One
    /// in use (being made or opened) is left for the next time.
    fn prune_superseded(&self, shape: &Shape, key: &str) {
        let Ok(listed) = self.list() else { return };
        for old in listed {
            let Some(d) = &old.description else { continue };
            if old.key == key || !d.shape.same_settings(shape) {
                continue;
            }
            let Ok((lock, lock_path)) = self.lock_file(&old.key) else { continue };
            if flock(&lock, &lock_path, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
                match std::fs::remove_dir_all(&old.dir) {
                    Ok(()) => tracing::info!(template = %old.key, "superseded template removed"),
                    Err(e) => tracing::warn!(template = %old.key, error = %e, "cannot remove a superseded template"),
                }
                let _ = std::fs::remove_file(&lock_path);
            }
        }
    }

    /// Removes a template that failed to start a VM, so that the next
    /// sandbox makes it again. Waits for VMMs opening it to be done.
    pub fn discard(&self, template: Template) -> Result<(), TemplateError> {
        let Template { key, dir, _lock: lock } = template;
        let lock_path = self.dir.join(format!("{key}.lock"));
        flock(&lock, &lock_path, libc::LOCK_EX)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(())
    }

    /// Every template directory, complete or not, by key.
    pub fn list(&self) -> Result<Vec<Listed>, TemplateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let key = entry.file_name().to_string_lossy().into_owned();
            if !valid_key(&key) || !entry.path().is_dir() {
                continue;
            }
            let dir = entry.path();
            let description = std::fs::read(dir.join(DESCRIPTION_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let disk_bytes = std::fs::read_dir(&dir)
                .map(|d| d.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
                .unwrap_or(0);
            out.push(Listed { key, dir, description, disk_bytes });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes template `key` (waiting for any VMM opening it, or a maker
    /// making it). VMs started from it run on: they hold its pages.
    pub fn remove(&self, key: &str) -> Result<(), TemplateError> {
        if !valid_key(key) {
            return Err(TemplateError::BadKey(key.to_string()));
        }
        let dir = self.dir.join(key);
        if !dir.exists() {
            return Err(TemplateError::NotFound(key.to_string()));
        }
        let (lock, lock_path) = self.lock_file(key)?;
        flock(&lock, &lock_path, libc::LOCK_EX)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        let _ = std::fs::remove_file(&lock_path);
        Ok(())
    }
}

impl Listed {
    /// `carapace template list --format json`'s object.
    pub fn to_json(&self) -> serde_json::Value {
        let d = self.description.as_ref();
        serde_json::json!({
            "key": self.key,
            "dir": self.dir,
            "complete": d.is_some(),
            "vcpus": d.map(|d| d.shape.vcpus),
            "mem_mib": d.map(|d| d.shape.mem_mib),
            "devices": d.map(|d| d.shape.devices.clone()),
            "kernel": d.map(|d| d.shape.kernel.path.clone()),
            "initramfs": d.map(|d| d.shape.initramfs.path.clone()),
            "cmdline": d.map(|d| d.shape.cmdline.clone()),
            "created_unix": d.map(|d| d.created_unix),
            "boot_ms": d.map(|d| d.boot_ms),
            "disk_bytes": self.disk_bytes,
        })
    }
}

/// `carapace check`'s line about the templates `config` asks for.
pub fn check_item(config: &Config) -> CheckItem {
    let item = |ok, detail: String| CheckItem { ok, what: "templates", detail };
    if !config.vm_templates {
        return item(true, "off (vm_templates = false): every sandbox boots its guest kernel".into());
    }
    match TemplateStore::new(&config.template_dir).list() {
        Ok(listed) => {
            let complete = listed.iter().filter(|l| l.description.is_some()).count();
            let mib = listed.iter().map(|l| l.disk_bytes).sum::<u64>() / (1024 * 1024);
            item(
                true,
                format!(
                    "{complete} in {} ({mib} MiB on disk; `carapace template list`); a missing one is made on first use",
                    config.template_dir.display()
                ),
            )
        }
        Err(e) => item(false, crate::error::Chain(&e).to_string()),
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn shape(d: &Path) -> Shape {
        let assets = GuestAssets { kernel: d.join("k"), initramfs: d.join("i"), vmm: d.join("v") };
        for f in [&assets.kernel, &assets.initramfs, &assets.vmm] {
            std::fs::write(f, b"x").unwrap();
        }
        Shape::of(&assets, &VmOptions::default()).unwrap()
    }

    fn fake_make(dir: &Path) -> Result<Duration, TemplateError> {
        std::fs::write(dir.join(MEMORY_FILE), b"m").unwrap();
        std::fs::write(dir.join(STATE_FILE), b"s").unwrap();
        Ok(Duration::from_millis(5))
    }

    #[test]
    fn made_once_then_reused() {
        let d = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&d.path().join("t"));
        let s = shape(d.path());
        let made = AtomicUsize::new(0);
        for _ in 0..2 {
            let t = store
                .get_or_make(&s, |dir| {
                    made.fetch_add(1, Ordering::SeqCst);
                    fake_make(dir)
                })
                .unwrap();
            assert_eq!(t.key, s.key());
            assert!(TemplateStore::complete(&t.dir));
        }
        assert_eq!(made.load(Ordering::SeqCst), 1);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].description.as_ref().unwrap().shape, s);
        assert!(!d.path().join("t").join(format!("{}.new", s.key())).exists());
    }

    #[test]
    fn two_at_once_make_one() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(TemplateStore::new(d.path()));
        let s = shape(d.path());
        let made = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (store, s, made) = (store.clone(), s.clone(), made.clone());
                std::thread::spawn(move || {
                    store
                        .get_or_make(&s, |dir| {
                            made.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(200));
                            fake_make(dir)
                        })
                        .map(|t| t.key)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), s.key());
        }
        assert_eq!(made.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_make_leaves_nothing_and_the_next_one_retries() {
        let d = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(d.path());
        let s = shape(d.path());
        let e = store.get_or_make(&s, |_| Err(TemplateError::Make("boom".into()))).unwrap_err();
        assert!(matches!(e, TemplateError::Make(_)));
        // A maker that "succeeds" without a snapshot is a failure too.
        let e = store.get_or_make(&s, |_| Ok(Duration::ZERO)).unwrap_err();
        assert!(e.to_string().contains("making the template failed"), "{e}");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(&s.key()) || n.to_string_lossy().ends_with(".lock")), "{left:?}");
        assert!(store.get_or_make(&s, fake_make).is_ok());
    }

    #[test]
    fn a_changed_input_is_another_template() {
        let d = tempfile::tempdir().unwrap();
        let a = shape(d.path());
        // A rebuilt initramfs: a new file under the same name.
        std::thread::sleep(Duration::from_millis(10));
        let tmp = d.path().join("i.new");
        std::fs::write(&tmp, b"y").unwrap();
        std::fs::rename(&tmp, d.path().join("i")).unwrap();
        let b = shape(d.path());
        assert_ne!(a.key(), b.key());
        assert!(a.same_settings(&b));
        let mut c = b.clone();
        c.mem_mib += 1;
        assert!(!b.same_settings(&c));
        assert_ne!(b.key(), c.key());
        let mut e = b.clone();
        e.devices.push("net".into());
        assert_ne!(b.key(), e.key());
        assert!(valid_key(&a.key()));
    }

    #[test]
    fn a_rebuilt_input_replaces_its_old_template_and_leaves_others() {
        let d = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&d.path().join("t"));
        let old = shape(d.path());
        store.get_or_make(&old, fake_make).unwrap();
        let mut bigger = old.clone();
        bigger.mem_mib *= 2;
        store.get_or_make(&bigger, fake_make).unwrap();
        let mut rebuilt = old.clone();
        rebuilt.initramfs.mtime_ns += 1;
        store.get_or_make(&rebuilt, fake_make).unwrap();
        let keys: Vec<String> = store.list().unwrap().into_iter().map(|l| l.key).collect();
        let mut want = vec![bigger.key(), rebuilt.key()];
        want.sort();
        assert_eq!(keys, want);
    }

    #[test]
    fn discard_and_remove() {
        let d = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(d.path());
        let s = shape(d.path());
        let t = store.get_or_make(&s, fake_make).unwrap();
        let dir = t.dir.clone();
        store.discard(t).unwrap();
        assert!(!dir.exists());
        let t = store.get_or_make(&s, fake_make).unwrap();
        drop(t);
        assert!(matches!(store.remove("nothex"), Err(TemplateError::BadKey(_))));
        assert!(matches!(store.remove("0123456789abcdef"), Err(TemplateError::NotFound(_))));
        store.remove(&s.key()).unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(TemplateStore::new(&d.path().join("none")).list().unwrap().is_empty());
    }
}
