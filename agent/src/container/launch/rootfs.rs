//! A container's filesystem, built by its init without libcontainer.
//!
//! [`RootfsPlan::prepare`] (in the agent) turns the spec into system call
//! arguments; [`RootfsPlan::build`] (in the init, in its new mount
//! namespace) makes the calls libcontainer's init makes for the same spec,
//! in its order, with mount(2) instead of the new mount API (five to ten
//! system calls a mount there, each ~0.6 ms where the guest kernel is
//! emulated): the root made a slave, the rootfs bound on itself, the
//! spec's mounts, the /dev symlinks, the devices, the ptmx link,
//! pivot_root, sysctls, a read-only root, read-only and masked paths.
//!
//! Only specs whose mount destinations can be resolved without following
//! a symlink of the rootfs are built here (libcontainer resolves them
//! inside the rootfs); anything else is left to libcontainer, as are
//! mounts with recursive attributes, ID mappings or SELinux labels, and a
//! rootfs propagation of the spec's own.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use libc::c_ulong;
use oci_spec::runtime::{LinuxDeviceType, Spec};

use super::raw;
use super::{c_string, Failure, LaunchError, Step};

/// What a mount needs created before it (in a tmpfs the spec mounted
/// earlier, where nothing can be a symlink yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    Nothing,
    Dir,
    File,
}

/// What a spec mount is, for the mounts after it beneath its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Under {
    /// A fresh tmpfs: the init makes what goes in it.
    Tmpfs,
    /// proc, sysfs, cgroup...: what goes in it is the kernel's.
    Kernel,
    /// A bound directory from outside the rootfs.
    Bind,
}

#[derive(Debug)]
struct MountOp {
    /// Directories to make first (in order), then the target per `create`.
    mkdirs: Vec<CString>,
    create: Create,
    source: Option<CString>,
    target: CString,
    fstype: Option<CString>,
    flags: c_ulong,
    data: Option<CString>,
    /// A bind mount's other flags, applied by a remount.
    remount: Option<c_ulong>,
    /// Propagation flags, applied after the mount.
    propagation: c_ulong,
}

#[derive(Debug)]
struct DeviceOp {
    mkdirs: Vec<CString>,
    path: CString,
    mode: u32,
    dev: u64,
    owner: Option<(u32, u32)>,
}

/// The system call arguments of a container's filesystem.
#[derive(Debug)]
pub struct RootfsPlan {
    rootfs: CString,
    hostname: Option<CString>,
    domainname: Option<CString>,
    mounts: Vec<MountOp>,
    /// (target, link) of the symlinks in /dev.
    symlinks: Vec<(CString, CString)>,
    devices: Vec<DeviceOp>,
    ptmx: CString,
    sysctls: Vec<(CString, CString)>,
    readonly_root: bool,
    readonly_paths: Vec<CString>,
    masked_paths: Vec<CString>,
}

const PROPAGATION: c_ulong = libc::MS_SHARED | libc::MS_PRIVATE | libc::MS_SLAVE | libc::MS_UNBINDABLE;

fn path_c(field: &'static str, p: &Path) -> Result<CString, LaunchError> {
    c_string(field, p.as_os_str().as_bytes())
}

/// `dest` (absolute in the container) as a path under `rootfs`, without
/// `..` or `.`; `None` if it has `..`.
fn under(rootfs: &Path, dest: &Path) -> Option<PathBuf> {
    let mut out = rootfs.to_path_buf();
    for c in dest.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Makes the missing directories of `path` under `rootfs` (mode 0755, as
/// libcontainer does), refusing any component that is a symlink.
fn mkdir_all_in_rootfs(rootfs: &Path, path: &Path) -> Result<Result<(), &'static str>, LaunchError> {
    let rel = path.strip_prefix(rootfs).unwrap_or(path);
    let mut at = rootfs.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return Ok(Err("a mount destination through a symlink of the rootfs")),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(Err("a mount destination under a file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&at)
                    .map_err(|cause| LaunchError::Open { path: at.display().to_string(), cause })?;
            }
            Err(cause) => return Err(LaunchError::Open { path: at.display().to_string(), cause }),
        }
    }
    Ok(Ok(()))
}

/// The directories between `base` and `path` (both exclusive),
/// outermost first.
fn dirs_between(base: &Path, path: &Path) -> Result<Vec<CString>, LaunchError> {
    let mut dirs = Vec::new();
    let mut p = path.parent();
    while let Some(d) = p {
        if d == base || !d.starts_with(base) {
            break;
        }
        dirs.push(path_c("mounts", d)?);
        p = d.parent();
    }
    dirs.reverse();
    Ok(dirs)
}

/// The flags of a propagation option ("rprivate"...).
fn propagation_of(option: &str) -> Option<c_ulong> {
    let (rec, kind) = match option.strip_prefix('r') {
        Some(k @ ("private" | "shared" | "slave" | "unbindable")) => (libc::MS_REC, k),
        _ => (0, option),
    };
    let flag = match kind {
        "private" => libc::MS_PRIVATE,
        "shared" => libc::MS_SHARED,
        "slave" => libc::MS_SLAVE,
        "unbindable" => libc::MS_UNBINDABLE,
        _ => return None,
    };
    Some(flag | rec)
}

fn device_dev(major: i64, minor: i64) -> u64 {
    libc::makedev(u32::try_from(major).unwrap_or(0), u32::try_from(minor).unwrap_or(0))
}

impl RootfsPlan {
    /// The plan for `spec` (prepared as libcontainer gets it) over
    /// `rootfs`; `Ok(Err(why))` when libcontainer has to build it.
    pub fn prepare(spec: &Spec, rootfs: &Path) -> Result<Result<Self, &'static str>, LaunchError> {
        let Some(linux) = spec.linux().as_ref() else { return Ok(Err("no linux section")) };
        if linux.rootfs_propagation().is_some() {
            return Ok(Err("linux.rootfsPropagation"));
        }
        if linux.mount_label().is_some() {
            return Ok(Err("linux.mountLabel"));
        }
        if linux.intel_rdt().is_some() {
            return Ok(Err("linux.intelRdt"));
        }
        let rootfs_c = path_c("root.path", rootfs)?;
        let mut mounts = Vec::new();
        // Destinations (in the agent's view) of the spec's mounts so far,
        // and what each is.
        let mut mounted: Vec<(PathBuf, Under)> = Vec::new();
        let mut dev_tmpfs = false;
        for m in spec.mounts().as_deref().unwrap_or_default() {
            if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
                return Ok(Err("a mount with ID mappings"));
            }
            let Some(target) = under(rootfs, m.destination()) else { return Ok(Err("a mount destination with ..")) };
            let Ok(config) = libcontainer::rootfs::utils::parse_mount(m) else { return Ok(Err("a mount's options")) };
            if config.rec_attr.is_some() {
                return Ok(Err("recursive mount attributes"));
            }
            let options = m.options().as_deref().unwrap_or_default();
            let bind = m.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
            // libcontainer's parser drops the propagation options (and with
            // them MS_REC): recursion comes from "rbind", propagation (as
            // runc applies it) from the options themselves.
            let mut flags: c_ulong = config.flags.bits() & !(PROPAGATION | libc::MS_REC);
            if options.iter().any(|o| o == "rbind") {
                flags |= libc::MS_REC;
            }
            let propagation = options.iter().fold(0, |p, o| propagation_of(o).unwrap_or(p));
            if m.destination() == Path::new("/dev") {
                flags &= !libc::MS_RDONLY;
            }
            let data = config.data.join(",");
            let data = (!data.is_empty()).then(|| c_string("mounts[].options", data.as_bytes())).transpose()?;
            let parent_mount = mounted
                .iter()
                .filter(|(d, _)| target.starts_with(d) && target != *d)
                .max_by_key(|(d, _)| d.as_os_str().len())
                .map(|(d, kind)| (d, *kind));
            if matches!(parent_mount, Some((_, Under::Bind))) {
                // libcontainer makes its destination inside the bound
                // directory, which the agent does not resolve.
                return Ok(Err("a mount inside a bind mount"));
            }
            let (source, fstype, create, mkdirs) = if bind {
                let Some(source) = m.source() else { return Ok(Err("a bind mount without a source")) };
                let source =
                    std::fs::canonicalize(source).map_err(|cause| LaunchError::Open { path: source.display().to_string(), cause })?;
                let is_dir = source.is_dir();
                let (create, mkdirs) = match parent_mount {
                    Some((base, Under::Tmpfs)) => (if is_dir { Create::Dir } else { Create::File }, dirs_between(base, &target)?),
                    Some((_, _)) => (Create::Nothing, Vec::new()),
                    None => {
                        let dir = if is_dir { target.as_path() } else { target.parent().unwrap_or(rootfs) };
                        if let Err(why) = mkdir_all_in_rootfs(rootfs, dir)? {
                            return Ok(Err(why));
                        }
                        if !is_dir {
                            match std::fs::symlink_metadata(&target) {
                                Ok(meta) if meta.file_type().is_symlink() => {
                                    return Ok(Err("a mount destination through a symlink of the rootfs"))
                                }
                                Ok(_) => {}
                                Err(_) => {
                                    std::fs::OpenOptions::new()
                                        .write(true)
                                        .create(true)
                                        .truncate(false)
                                        .open(&target)
                                        .map_err(|cause| LaunchError::Open { path: target.display().to_string(), cause })?;
                                }
                            }
                        }
                        (Create::Nothing, Vec::new())
                    }
                };
                mounted.push((target.clone(), Under::Bind));
                (Some(path_c("mounts[].source", &source)?), None, create, mkdirs)
            } else {
                let typ = match m.typ().as_deref() {
                    Some("cgroup") => "cgroup2",
                    Some(t @ ("proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "cgroup2")) => t,
                    _ => return Ok(Err("a mount of another type")),
                };
                let (create, mkdirs) = match parent_mount {
                    Some((base, Under::Tmpfs)) => (Create::Dir, dirs_between(base, &target)?),
                    Some((_, _)) => (Create::Nothing, Vec::new()),
                    None => match mkdir_all_in_rootfs(rootfs, &target)? {
                        Ok(()) => (Create::Nothing, Vec::new()),
                        Err(why) => return Ok(Err(why)),
                    },
                };
                let source = match (typ, m.source()) {
                    ("cgroup2", _) => CString::from(c"cgroup"),
                    (_, Some(s)) => path_c("mounts[].source", s)?,
                    (t, None) => c_string("mounts[].type", t.as_bytes())?,
                };
                if m.destination() == Path::new("/dev") {
                    dev_tmpfs = typ == "tmpfs";
                }
                mounted.push((target.clone(), if typ == "tmpfs" { Under::Tmpfs } else { Under::Kernel }));
                (Some(source), Some(c_string("mounts[].type", typ.as_bytes())?), create, mkdirs)
            };
            let (flags, remount) = if bind {
                let rest = flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
                let bind_flags = libc::MS_BIND | (flags & libc::MS_REC);
                let remount = (rest != 0).then_some(rest | libc::MS_BIND | libc::MS_REMOUNT);
                (bind_flags, remount)
            } else {
                (flags, None)
            };
            mounts.push(MountOp {
                mkdirs,
                create,
                source,
                target: path_c("mounts[].destination", &target)?,
                fstype,
                flags,
                data: if bind { None } else { data },
                remount,
                propagation,
            });
        }
        if !dev_tmpfs {
            return Ok(Err("no tmpfs on /dev"));
        }
        let dev = rootfs.join("dev");
        let mut symlinks = Vec::new();
        if Path::new("/proc/kcore").exists() {
            symlinks.push((CString::from(c"/proc/kcore"), path_c("dev", &dev.join("kcore"))?));
        }
        for (target, link) in
            [("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr")]
        {
            symlinks.push((c_string("dev", target.as_bytes())?, path_c("dev", &dev.join(link))?));
        }
        let mut devices = Vec::new();
        let listed = linux.devices().as_deref().unwrap_or_default();
        let defaults = libcontainer::rootfs::utils::default_devices();
        let defaults = defaults.iter().filter(|d| !listed.iter().any(|l| l.path() == d.path()));
        for d in listed.iter().chain(defaults) {
            let Some(path) = under(rootfs, d.path()).filter(|p| p.starts_with(&dev) && *p != dev) else {
                return Ok(Err("a device outside /dev"));
            };
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
                LinuxDeviceType::B => libc::S_IFBLK,
                LinuxDeviceType::P => libc::S_IFIFO,
                LinuxDeviceType::A => return Ok(Err("a device of type a")),
            };
            devices.push(DeviceOp {
                mkdirs: dirs_between(&dev, &path)?,
                path: path_c("linux.devices[].path", &path)?,
                mode: kind | (d.file_mode().unwrap_or(0) & 0o7777),
                dev: device_dev(d.major(), d.minor()),
                owner: (d.uid().is_some() || d.gid().is_some()).then(|| (d.uid().unwrap_or(0), d.gid().unwrap_or(0))),
            });
        }
        let sysctls = linux
            .sysctl()
            .as_ref()
            .map(|s| {
                s.iter()
                    .map(|(k, v)| {
                        let path = format!("/proc/sys/{}", k.replace('.', "/"));
                        Ok((c_string("linux.sysctl", path.as_bytes())?, c_string("linux.sysctl", v.as_bytes())?))
                    })
                    .collect::<Result<Vec<_>, LaunchError>>()
            })
            .transpose()?
            .unwrap_or_default();
        let paths = |list: &Option<Vec<String>>, field| -> Result<Vec<CString>, LaunchError> {
            list.as_deref().unwrap_or_default().iter().map(|p| c_string(field, p.as_bytes())).collect()
        };
        let hostname = spec.hostname().as_ref().map(|h| c_string("hostname", h.as_bytes())).transpose()?;
        let domainname = spec.domainname().as_ref().map(|h| c_string("domainname", h.as_bytes())).transpose()?;
        Ok(Ok(Self {
            rootfs: rootfs_c,
            hostname,
            domainname,
            mounts,
            symlinks,
            devices,
            ptmx: path_c("dev", &dev.join("ptmx"))?,
            sysctls,
            readonly_root: spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false),
            readonly_paths: paths(linux.readonly_paths(), "linux.readonlyPaths")?,
            masked_paths: paths(linux.masked_paths(), "linux.maskedPaths")?,
        }))
    }

    /// Leaves the hostname and domain name as they are.
    pub fn drop_names(&mut self) {
        self.hostname = None;
        self.domainname = None;
    }

    /// The calls, in the init (system calls only: see [`raw`]).
    pub fn build(&self) -> Result<(), Failure> {
        let at = super::at;
        if let Some(name) = &self.hostname {
            raw::sethostname(name).map_err(at(Step::Hostname, 0))?;
        }
        if let Some(name) = &self.domainname {
            raw::setdomainname(name).map_err(at(Step::Hostname, 1))?;
        }
        raw::mount(None, c"/", None, libc::MS_SLAVE | libc::MS_REC, None).map_err(at(Step::Rootfs, 0))?;
        raw::mount(Some(&self.rootfs), &self.rootfs, None, libc::MS_BIND | libc::MS_REC, None).map_err(at(Step::Rootfs, 1))?;
        for (i, m) in self.mounts.iter().enumerate() {
            for d in &m.mkdirs {
                mkdir(d).map_err(at(Step::Mount, i))?;
            }
            match m.create {
                Create::Nothing => {}
                Create::Dir => mkdir(&m.target).map_err(at(Step::Mount, i))?,
                Create::File => match raw::open(&m.target, libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o644) {
                    Ok(fd) => raw::close(fd),
                    Err(libc::EEXIST) => {}
                    Err(e) => return Err((Step::Mount, i, e)),
                },
            }
            raw::mount(m.source.as_deref(), &m.target, m.fstype.as_deref(), m.flags, m.data.as_deref()).map_err(at(Step::Mount, i))?;
            if let Some(flags) = m.remount {
                raw::mount(None, &m.target, None, flags, None).map_err(at(Step::Mount, i))?;
            }
            if m.propagation != 0 {
                raw::mount(None, &m.target, None, m.propagation, None).map_err(at(Step::Mount, i))?;
            }
        }
        for (i, (target, link)) in self.symlinks.iter().enumerate() {
            raw::symlink(target, link).map_err(at(Step::Symlink, i))?;
        }
        // The devices get exactly their modes.
        let umask = raw::umask(0);
        let devices = self.devices.iter().enumerate().try_for_each(|(i, d)| {
            for dir in &d.mkdirs {
                mkdir(dir).map_err(at(Step::Device, i))?;
            }
            raw::mknod(&d.path, d.mode, d.dev).map_err(at(Step::Device, i))?;
            if let Some((uid, gid)) = d.owner {
                raw::chown(&d.path, uid, gid).map_err(at(Step::Device, i))?;
            }
            Ok(())
        });
        raw::umask(umask);
        devices?;
        let ptmx = self.symlinks.len();
        match raw::unlink(&self.ptmx) {
            Ok(()) | Err(libc::ENOENT) => {}
            Err(e) => return Err((Step::Symlink, ptmx, e)),
        }
        raw::symlink(c"pts/ptmx", &self.ptmx).map_err(at(Step::Symlink, ptmx))?;
        self.pivot_root().map_err(at(Step::PivotRoot, 0))?;
        for (i, (path, value)) in self.sysctls.iter().enumerate() {
            let fd = raw::open(path, libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC, 0).map_err(at(Step::Sysctl, i))?;
            let written = raw::write(fd, value.as_bytes());
            raw::close(fd);
            written.map_err(at(Step::Sysctl, i))?;
        }
        if self.readonly_root {
            let current = raw::statfs_flags(c"/").map_err(at(Step::ReadonlyRoot, 0))?;
            // The ST_* flags that are the same MS_* bits; ST_RELATIME is not.
            let same = libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC
                | libc::MS_SYNCHRONOUS
                | libc::MS_MANDLOCK
                | libc::MS_NOATIME
                | libc::MS_NODIRATIME;
            let relatime = if current & 4096 != 0 { libc::MS_RELATIME } else { 0 };
            let flags = libc::MS_RDONLY | libc::MS_REMOUNT | libc::MS_BIND | (current & same) | relatime;
            raw::mount(None, c"/", None, flags, None).map_err(at(Step::ReadonlyRoot, 0))?;
        }
        for (i, p) in self.readonly_paths.iter().enumerate() {
            match raw::mount(Some(p), p, None, libc::MS_BIND | libc::MS_REC, None) {
                Ok(()) => {}
                Err(libc::ENOENT) => continue,
                Err(e) => return Err((Step::ReadonlyPath, i, e)),
            }
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            raw::mount(Some(p), p, None, flags, None).map_err(at(Step::ReadonlyPath, i))?;
        }
        for (i, p) in self.masked_paths.iter().enumerate() {
            let result = match raw::mode_of(p) {
                Err(libc::ENOENT) => continue,
                Err(e) => Err(e),
                Ok(mode) if mode & libc::S_IFMT == libc::S_IFDIR => raw::mount(Some(c"tmpfs"), p, Some(c"tmpfs"), libc::MS_RDONLY, None),
                Ok(_) => raw::mount(Some(c"/dev/null"), p, None, libc::MS_BIND, None),
            };
            result.map_err(at(Step::MaskedPath, i))?;
        }
        Ok(())
    }

    /// pivot_root into the rootfs, the old root detached (runc's way:
    /// both roots at ".", no directory for the old one).
    fn pivot_root(&self) -> Result<(), i32> {
        let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC;
        let old = raw::open(c"/", flags, 0)?;
        let new = match raw::open(&self.rootfs, flags, 0) {
            Ok(fd) => fd,
            Err(e) => {
                raw::close(old);
                return Err(e);
            }
        };
        let result = (|| {
            raw::fchdir(new)?;
            raw::pivot_root(c".", c".")?;
            raw::fchdir(old)?;
            raw::mount(None, c".", None, libc::MS_SLAVE | libc::MS_REC, None)?;
            raw::umount2(c".", libc::MNT_DETACH)?;
            raw::chdir(c"/")
        })();
        raw::close(old);
        raw::close(new);
        result
    }

    /// A short description of failed step `index`, for the error.
    pub fn detail(&self, step: Step, index: usize) -> String {
        let name = |c: Option<&CString>| c.map(|c| format!(" {:?}", c.to_string_lossy())).unwrap_or_default();
        match step {
            Step::Mount => name(self.mounts.get(index).map(|m| &m.target)),
            Step::Device => name(self.devices.get(index).map(|d| &d.path)),
            Step::Symlink => name(self.symlinks.get(index).map(|s| &s.1).or(Some(&self.ptmx))),
            Step::Sysctl => name(self.sysctls.get(index).map(|s| &s.0)),
            Step::ReadonlyPath => name(self.readonly_paths.get(index)),
            Step::MaskedPath => name(self.masked_paths.get(index)),
            _ => String::new(),
        }
    }
}

fn mkdir(path: &CString) -> Result<(), i32> {
    match raw::mkdir(path, 0o755) {
        Ok(()) | Err(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rootfs with proc, sys and dev, and a spec as `runc spec` writes
    /// it plus a read-only bind mount of a file.
    fn runc_like(dir: &Path) -> (PathBuf, serde_json::Value) {
        let rootfs = dir.join("rootfs");
        for d in ["proc", "sys", "dev", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("dir");
        }
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": rootfs, "readonly": true},
            "hostname": "runc",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rprivate", "ro"]},
                {"destination": "/dev/termination-log", "type": "bind", "source": hosts, "options": ["bind"]},
                {"destination": "/data/x", "type": "bind", "source": dir, "options": ["bind"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}],
                "devices": [{"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200, "fileMode": 438}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "sysctl": {"net.ipv4.ip_forward": "1"}
            }
        });
        (rootfs, spec)
    }

    fn plan(spec: serde_json::Value, rootfs: &Path) -> Result<RootfsPlan, &'static str> {
        let spec: Spec = serde_json::from_value(spec).expect("spec");
        RootfsPlan::prepare(&spec, rootfs).expect("prepare")
    }

    #[test]
    fn a_runc_spec_becomes_mount_calls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rootfs, spec) = runc_like(dir.path());
        let p = plan(spec, &rootfs).expect("direct");
        let m = |i: usize| &p.mounts[i];
        let c = |s: &str| CString::new(s).expect("c");
        assert_eq!(m(0).fstype, Some(c("proc")));
        assert_eq!((m(0).create, m(0).flags), (Create::Nothing, 0));
        assert_eq!(m(1).flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(m(1).data, Some(c("mode=755,size=65536k")));
        // In the /dev tmpfs: made by the init.
        assert_eq!(m(2).create, Create::Dir);
        assert_eq!(m(2).data, Some(c("newinstance,ptmxmode=0666,mode=0620,gid=5")));
        assert_eq!(m(3).flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV | libc::MS_RDONLY);
        // sysfs has it: nothing to make; cgroup v2.
        assert_eq!((m(4).create, m(4).fstype.clone(), m(4).source.clone()), (Create::Nothing, Some(c("cgroup2")), Some(c("cgroup"))));
        // A read-only recursive bind: bound, then remounted; its
        // propagation after.
        assert_eq!(m(5).flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(m(5).remount, Some(libc::MS_RDONLY | libc::MS_BIND | libc::MS_REMOUNT));
        assert_eq!(m(5).propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert!(rootfs.join("etc/hosts").is_file(), "a file destination made in the rootfs");
        assert_eq!((m(6).create, m(6).remount), (Create::File, None));
        assert!(rootfs.join("data/x").is_dir(), "a directory destination made in the rootfs");
        let devices: Vec<_> = p.devices.iter().map(|d| d.path.to_string_lossy().into_owned()).collect();
        assert_eq!(devices.len(), 7, "{devices:?}");
        assert!(devices[0].ends_with("/dev/net/tun"));
        assert_eq!(p.devices[0].mkdirs.len(), 1, "/dev/net made first");
        assert_eq!(p.devices[0].mode, libc::S_IFCHR | 0o666);
        assert_eq!(p.sysctls, vec![(c("/proc/sys/net/ipv4/ip_forward"), c("1"))]);
        assert!(p.readonly_root);
        assert_eq!(p.hostname, Some(c("runc")));
        assert!(p.ptmx.to_string_lossy().ends_with("/dev/ptmx"));
    }

    #[test]
    fn what_libcontainer_builds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rootfs, spec) = runc_like(dir.path());
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut s = spec.clone();
            f(&mut s);
            plan(s, &rootfs).err()
        };
        std::os::unix::fs::symlink("/", rootfs.join("link")).expect("symlink");
        assert_eq!(
            with(&|s| s["mounts"][7]["destination"] = "/link/x".into()),
            Some("a mount destination through a symlink of the rootfs")
        );
        assert_eq!(with(&|s| s["mounts"][0]["type"] = "overlay".into()), Some("a mount of another type"));
        assert_eq!(with(&|s| s["mounts"][0]["options"] = serde_json::json!(["rro"])), Some("recursive mount attributes"));
        assert_eq!(with(&|s| s["linux"]["rootfsPropagation"] = "shared".into()), Some("linux.rootfsPropagation"));
        assert_eq!(with(&|s| s["mounts"][7]["destination"] = "/../x".into()), Some("a mount destination with .."));
        assert_eq!(with(&|s| s["mounts"][7]["destination"] = "/etc/hosts/x".into()), Some("a mount inside a bind mount"));
        assert_eq!(with(&|s| s["linux"]["devices"][0]["path"] = "/tun".into()), Some("a device outside /dev"));
        assert_eq!(with(&|_| {}), None);
        assert_eq!(
            with(&|s| {
                s["mounts"].as_array_mut().expect("mounts").remove(1);
            }),
            Some("no tmpfs on /dev")
        );
        assert_eq!(propagation_of("rslave"), Some(libc::MS_SLAVE | libc::MS_REC));
        assert_eq!(propagation_of("shared"), Some(libc::MS_SHARED));
        assert_eq!(propagation_of("ro"), None);
    }
}
