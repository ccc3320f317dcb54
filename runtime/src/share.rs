//! The guest's view of a bundle. The host shares one directory per sandbox
//! into the VM over virtio-fs (tag [`SHARE_TAG`], mounted at [`GUEST_SHARE`]);
//! each container's rootfs and the sources of its bind mounts are bind-mounted
//! into that directory on the host, and the spec is rewritten to point at
//! the guest paths. The host bind mounts live in a private mount namespace of
//! the process that owns the VM, so they vanish with it whatever happens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use carapace_protocol::agent;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};

use crate::vm::{FsCacheMode, FsConfig};

/// The virtio-fs tag of a sandbox's shared directory.
pub const SHARE_TAG: &str = "carapace";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARE: &str = "/run/carapace/shared";

/// Errors preparing the host side of a sandbox's share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("mounts[{index}].source: {path}: {err}")]
    BindSource { index: usize, path: PathBuf, err: std::io::Error },
    #[error("cannot prepare {path}: {err}")]
    Prepare { path: PathBuf, err: std::io::Error },
    #[error("cannot bind {src} to {dst}: {err}")]
    Bind { src: PathBuf, dst: PathBuf, err: nix::Error },
    #[error("cannot make a private mount namespace: {0}")]
    Namespace(nix::Error),
}

/// One host path to bind into the share before the VM starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    /// Relative to the shared directory.
    pub target: PathBuf,
    pub read_only: bool,
}

/// A container's spec as the guest must see it, and the binds that make
/// those guest paths exist.
#[derive(Debug, Clone)]
pub struct GuestView {
    pub spec: Spec,
    pub rootfs: String,
    pub binds: Vec<HostBind>,
    /// Namespaces (`ipc`, `uts`, `pid`) to join, by the guest container
    /// whose namespace it is: a pod's containers join its sandbox (pause)
    /// container's, whose host paths CRI gives as `/proc/<pid>/ns/*`.
    pub join_namespaces: HashMap<String, String>,
}

/// The last component of a bind source, kept in the guest path so that
/// mountinfo names the source as runc's does (`.../mounts/3/etc`).
fn source_name(path: &Path) -> &std::ffi::OsStr {
    path.file_name().unwrap_or(std::ffi::OsStr::new("root"))
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn has_option(m: &Mount, opt: &str) -> bool {
    m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == opt))
}

/// Rewrites `spec` (of a bundle in `bundle_dir` with root `rootfs`) for
/// container `id` of sandbox `sandbox_id` whose share is mounted at
/// [`GUEST_SHARE`].
pub fn guest_view(id: &str, sandbox_id: &str, spec: &Spec, bundle_dir: &Path, rootfs: &Path) -> GuestView {
    let mut spec = spec.clone();
    let base = Path::new(id);
    let guest_base = Path::new(GUEST_SHARE).join(id);
    let mut binds = vec![HostBind { source: rootfs.to_path_buf(), target: base.join("rootfs"), read_only: false }];
    let guest_rootfs = guest_base.join("rootfs");
    if let Some(root) = spec.root().clone() {
        let mut root = root;
        root.set_path(guest_rootfs.clone());
        spec.set_root(Some(root));
    }
    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for (i, m) in mounts.into_iter().enumerate() {
            let mut m = m;
            if is_bind(&m) {
                if let Some(src) = m.source().clone() {
                    let host = if src.is_absolute() { src } else { bundle_dir.join(src) };
                    let rel = base.join("mounts").join(i.to_string()).join(source_name(&host));
                    binds.push(HostBind { source: host, target: rel.clone(), read_only: has_option(&m, "ro") });
                    m.set_source(Some(Path::new(GUEST_SHARE).join(rel)));
                }
            }
            out.push(m);
        }
        spec.set_mounts(Some(out));
    }
    // Namespace paths name host namespaces, which the guest cannot open. In
    // a pod they are the sandbox container's (CRI points IPC, UTS and, with
    // shareProcessNamespace, PID at the pause process): the agent joins
    // that guest container's instead. Elsewhere the VM already isolates the
    // container, so it gets fresh ones. A network namespace to join is the
    // pod's (CNI's): its interfaces are the VM's (see `network`), so the
    // container stays in the guest's.
    let in_pod = id != sandbox_id;
    let mut join_namespaces = HashMap::new();
    if let Some(linux) = spec.linux().clone() {
        let mut linux = linux;
        if let Some(ns) = linux.namespaces().clone() {
            let fresh: Vec<LinuxNamespace> = ns
                .into_iter()
                .filter(|n| !(n.typ() == LinuxNamespaceType::Network && n.path().is_some()))
                .map(|n| {
                    let joinable = match n.typ() {
                        LinuxNamespaceType::Ipc => Some("ipc"),
                        LinuxNamespaceType::Uts => Some("uts"),
                        LinuxNamespaceType::Pid => Some("pid"),
                        _ => None,
                    };
                    if let (true, Some(_), Some(kind)) = (in_pod, n.path(), joinable) {
                        join_namespaces.insert(kind.to_string(), sandbox_id.to_string());
                    }
                    let mut n = n;
                    n.set_path(None);
                    n
                })
                .collect();
            linux.set_namespaces(Some(fresh));
        }
        spec.set_linux(Some(linux));
    }
    GuestView { spec, rootfs: guest_rootfs.to_string_lossy().into_owned(), binds, join_namespaces }
}

/// The CreateSandbox request of a sandbox `id`: its share mounted at
/// [`GUEST_SHARE`] (nodev: device nodes in a bundle are not the guest's),
/// the guest's clock set from ours, and `hostname` (or "carapace").
pub fn create_sandbox_request(id: &str, hostname: Option<&str>) -> agent::CreateSandboxRequest {
    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = id.into();
    req.hostname = hostname.filter(|h| !h.is_empty()).unwrap_or("carapace").into();
    let mut fs = agent::SharedFs::new();
    fs.tag = SHARE_TAG.into();
    fs.mount_point = GUEST_SHARE.into();
    fs.options = vec!["nodev".into()];
    req.shared_fs.push(fs);
    // Fresh entropy and the host's clock: a guest restored from a snapshot
    // must not share its random state or its time with its siblings.
    let mut entropy = vec![0u8; 64];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy));
    if let Err(e) = read {
        tracing::warn!(error = %e, "no entropy for the guest");
        entropy.clear();
    }
    req.entropy = entropy;
    req.host_time_unix_ns = u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()).unwrap_or(0);
    let mut settings = agent::GuestSettings::new();
    settings.wall_clock_unix_nano = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    req.settings = Some(settings).into();
    req
}

/// The pod's DNS files: the sources of the spec's bind mounts on
/// /etc/resolv.conf and /etc/hosts (what CRI gives a pod), for the guest's
/// own /etc (at most 64 KiB each; unreadable ones are skipped, the bind
/// mount still reaches the container).
pub fn dns_files(spec: &Spec, bundle_dir: &Path, req: &mut agent::CreateSandboxRequest) {
    const LIMIT: u64 = 64 * 1024;
    for m in spec.mounts().as_deref().unwrap_or(&[]) {
        let Some(source) = m.source() else { continue };
        let source = bundle_dir.join(source);
        let read = || -> Option<Vec<u8>> {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(std::fs::File::open(&source).ok()?, LIMIT), &mut buf).ok()?;
            Some(buf)
        };
        match m.destination().to_str() {
            Some("/etc/resolv.conf") => req.resolv_conf = read().unwrap_or_default(),
            Some("/etc/hosts") => req.hosts = read().unwrap_or_default(),
            _ => {}
        }
    }
}

/// The virtio-fs share of a sandbox whose shared directory is `dir`.
pub fn share(dir: &Path) -> FsConfig {
    FsConfig { tag: SHARE_TAG.into(), shared_dir: dir.to_path_buf(), read_only: false, cache: FsCacheMode::Auto }
}

/// [`share`] with the config's cache mode (`shared_fs_cache`).
pub fn share_with(dir: &Path, config: &crate::config::Config) -> FsConfig {
    FsConfig { cache: crate::vm::vmm_cache_mode(config.shared_fs_cache), ..share(dir) }
}

/// Moves the calling process into a mount namespace of its own that still
/// receives the host's mounts (a slave of it: a volume mounted later on the
/// host reaches us) but sends none back, so that the binds of
/// [`apply_binds`] are seen by it and its children (the VMM) only and die
/// with it. Call before any thread is started: a mount namespace belongs to
/// a thread.
pub fn private_mount_namespace() -> Result<(), ShareError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(ShareError::Namespace)?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>).map_err(ShareError::Namespace)
}

/// Creates each bind's target under `shared` (a file for a file source, a
/// directory otherwise) and bind-mounts the source there.
pub fn apply_binds(shared: &Path, binds: &[HostBind]) -> Result<(), ShareError> {
    for (index, b) in binds.iter().enumerate() {
        let meta = std::fs::metadata(&b.source).map_err(|err| ShareError::BindSource { index, path: b.source.clone(), err })?;
        let dst = shared.join(&b.target);
        let prepare = |err| ShareError::Prepare { path: dst.clone(), err };
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(prepare)?;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(&dst).map_err(prepare)?;
        } else {
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&dst).map_err(prepare)?;
        }
        let bind_err = |err| ShareError::Bind { src: b.source.clone(), dst: dst.clone(), err };
        mount(Some(&b.source), &dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(bind_err)?;
        if b.read_only {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, &dst, None::<&str>, flags, None::<&str>).map_err(bind_err)?;
        }
    }
    Ok(())
}

/// Detaches the top mount on `path` (errors ignored: nothing mounted).
pub fn unmount(path: &Path) {
    if let Err(e) = umount2(path, MntFlags::MNT_DETACH) {
        tracing::debug!(path = %path.display(), error = %e, "umount");
    }
}

/// Undoes [`apply_binds`]: detaches each bind
/// under `shared` and removes the empty placeholders, then the container's
/// directory if it is empty. Never removes anything still mounted.
pub fn remove_binds(shared: &Path, binds: &[HostBind]) {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for b in binds.iter().rev() {
        let dst = shared.join(&b.target);
        unmount(&dst);
        // remove_dir and remove_file fail (EBUSY/ENOTEMPTY) on anything
        // still mounted or not ours: never recursive here.
        if std::fs::remove_dir(&dst).is_err() {
            let _ = std::fs::remove_file(&dst);
        }
        let mut parent = dst.parent();
        while let Some(p) = parent {
            if p == shared || !p.starts_with(shared) {
                break;
            }
            if !dirs.iter().any(|d| d == p) {
                dirs.push(p.to_path_buf());
            }
            parent = p.parent();
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

/// Mount points at or under `dir` in the calling thread's mount namespace,
/// deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> =
        text.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape).map(PathBuf::from).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = bytes[i + 1..i + 4].iter().fold(0u32, |a, b| a * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a sandbox's directory: first every mount under it is detached
/// (so that removal can never reach into a bound rootfs), then the tree.
pub fn remove_sandbox_dir(dir: &Path) {
    for p in mounts_under(dir) {
        unmount(&p);
    }
    if !mounts_under(dir).is_empty() {
        tracing::warn!(dir = %dir.display(), "mounts remain under the sandbox directory; leaving it");
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn each_sandbox_gets_fresh_entropy_and_the_hosts_time() {
        let a = create_sandbox_request("a", None);
        let b = create_sandbox_request("b", None);
        assert_eq!(a.entropy.len(), 64);
        assert_ne!(a.entropy, b.entropy);
        let now = u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()).unwrap_or(0);
        assert!(now.abs_diff(a.host_time_unix_ns) < 60_000_000_000, "{} vs {now}", a.host_time_unix_ns);
    }

    #[test]
    fn the_pods_dns_files_come_from_its_bind_mounts() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("resolv"), "nameserver 10.0.0.10\n").expect("write");
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/etc/resolv.conf", "type": "bind", "source": "resolv", "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent/hosts", "options": ["rbind"]}
            ]
        }));
        let mut req = agent::CreateSandboxRequest::new();
        dns_files(&s, dir.path(), &mut req);
        assert_eq!(req.resolv_conf, b"nameserver 10.0.0.10\n");
        assert!(req.hosts.is_empty(), "an unreadable source is skipped");
    }

    #[test]
    fn rewrites_root_binds_and_namespace_paths() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
                {"destination": "/cfg", "source": "cfg", "options": ["bind"]}
            ],
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/x"}, {"type": "pid"}]}
        }));
        let v = guest_view("c1", "c1", &s, Path::new("/bundles/c1"), Path::new("/bundles/c1/rootfs"));
        assert_eq!(v.rootfs, "/run/carapace/shared/c1/rootfs");
        let root = v.spec.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new("/run/carapace/shared/c1/rootfs"));
        assert_eq!(root.readonly(), Some(true));
        let mounts = v.spec.mounts().as_ref().expect("mounts");
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(mounts[1].source().as_deref(), Some(Path::new("/run/carapace/shared/c1/mounts/1/data")));
        assert_eq!(mounts[2].source().as_deref(), Some(Path::new("/run/carapace/shared/c1/mounts/2/cfg")));
        assert_eq!(
            v.binds,
            vec![
                HostBind { source: "/bundles/c1/rootfs".into(), target: "c1/rootfs".into(), read_only: false },
                HostBind { source: "/srv/data".into(), target: "c1/mounts/1/data".into(), read_only: true },
                HostBind { source: "/bundles/c1/cfg".into(), target: "c1/mounts/2/cfg".into(), read_only: false },
            ]
        );
        let ns = v.spec.linux().as_ref().and_then(|l| l.namespaces().clone()).expect("namespaces");
        assert!(ns.iter().all(|n| n.path().is_none()));
        // The pod's network namespace is the guest's: not a fresh one.
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network), "{ns:?}");
        assert!(v.join_namespaces.is_empty(), "a lone container joins nothing");
    }

    #[test]
    fn a_pods_containers_join_the_sandbox_containers_namespaces() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "pid", "path": "/proc/42/ns/pid"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]}
        }));
        let v = guest_view("app", "pod", &s, Path::new("/b"), Path::new("/b/rootfs"));
        let want: HashMap<String, String> = ["ipc", "uts", "pid"].iter().map(|k| (k.to_string(), "pod".to_string())).collect();
        assert_eq!(v.join_namespaces, want);
        let ns = v.spec.linux().as_ref().and_then(|l| l.namespaces().clone()).expect("namespaces");
        assert!(ns.iter().all(|n| n.path().is_none()), "{ns:?}");
        // The pause container itself gets fresh ones.
        assert!(guest_view("pod", "pod", &s, Path::new("/b"), Path::new("/b/rootfs")).join_namespaces.is_empty());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn remove_binds_never_touches_unmounted_content() {
        // Without mounts (unprivileged-safe): placeholders go, real content stays.
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path();
        std::fs::create_dir_all(shared.join("c1/rootfs/bin")).expect("mkdir");
        std::fs::write(shared.join("c1/rootfs/bin/sh"), b"x").expect("file");
        std::fs::create_dir_all(shared.join("c1/mounts/1")).expect("mkdir");
        std::fs::write(shared.join("c1/mounts/2"), b"").expect("file");
        let binds = vec![
            HostBind { source: "/x".into(), target: "c1/rootfs".into(), read_only: false },
            HostBind { source: "/y".into(), target: "c1/mounts/1".into(), read_only: false },
            HostBind { source: "/z".into(), target: "c1/mounts/2".into(), read_only: true },
        ];
        remove_binds(shared, &binds);
        assert!(shared.join("c1/rootfs/bin/sh").exists(), "content under a bind target was removed");
        assert!(!shared.join("c1/mounts").exists());
    }
}
