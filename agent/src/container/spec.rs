//! Reading the OCI spec the host sends: validation that names the field at
//! fault, and the adjustments the agent makes before libcontainer sees it.
//!
//! Validation runs on the raw JSON first (so that an unknown namespace type
//! is reported as `linux.namespaces[2].type`, not as a serde position),
//! then the spec is parsed with oci-spec.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Capabilities, Capability, Hooks, LinuxResources, Process, Spec};
use serde_json::Value;

/// Namespace types the OCI runtime spec defines (config-linux.md).
const NAMESPACE_TYPES: &[&str] = &["pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"];

/// System calls newer than some libseccomp releases: a profile may name
/// them (Docker's default does) even when the linked libseccomp cannot
/// resolve them; like runc, such a rule is skipped. Any other name that
/// libseccomp does not know is refused.
const RECENT_SYSCALLS: &[&str] = &[
    "cachestat",
    "fchmodat2",
    "map_shadow_stack",
    "mseal",
    "futex_wake",
    "futex_wait",
    "futex_requeue",
    "statmount",
    "listmount",
    "lsm_get_self_attr",
    "lsm_set_self_attr",
    "lsm_list_modules",
    "setxattrat",
    "getxattrat",
    "listxattrat",
    "removexattrat",
    "open_tree_attr",
    "uretprobe",
    "file_getattr",
    "file_setattr",
];

/// A spec the agent refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The JSON path of the field (`process.cwd`, `linux.namespaces[1].type`).
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Parses and validates a full spec (config.json). `rootfs_override` is the
/// request's rootfs path (empty = `root.path`); it must be an absolute
/// path to an existing directory.
pub fn parse_spec(json: &[u8], rootfs_override: &str) -> Result<(Spec, PathBuf), SpecError> {
    let value: Value = serde_json::from_slice(json).map_err(|e| SpecError::new("oci_spec_json", format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(SpecError::new("oci_spec_json", "not a JSON object"));
    }
    match value.get("ociVersion").and_then(Value::as_str) {
        Some(v) if v.starts_with("1.") => {}
        Some(v) => return Err(SpecError::new("ociVersion", format!("unsupported version {v:?} (want 1.x)"))),
        None => return Err(SpecError::new("ociVersion", "missing")),
    }
    match value.get("process") {
        Some(process) => check_process(process, "process")?,
        None => return Err(SpecError::new("process", "missing")),
    }
    if let Some(linux) = value.get("linux") {
        check_linux(linux)?;
    }

    let rootfs = if rootfs_override.is_empty() {
        match value.pointer("/root/path").and_then(Value::as_str) {
            Some(p) => (PathBuf::from(p), "root.path"),
            None => return Err(SpecError::new("root.path", "missing")),
        }
    } else {
        (PathBuf::from(rootfs_override), "rootfs_path")
    };
    let (rootfs, rootfs_field) = rootfs;
    if !rootfs.is_absolute() {
        return Err(SpecError::new(rootfs_field, format!("{} is not an absolute path", rootfs.display())));
    }
    match std::fs::metadata(&rootfs) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(SpecError::new(rootfs_field, format!("{} is not a directory", rootfs.display()))),
        Err(e) => return Err(SpecError::new(rootfs_field, format!("{}: {e}", rootfs.display()))),
    }

    let spec: Spec = serde_json::from_value(value).map_err(|e| SpecError::new("oci_spec_json", e.to_string()))?;
    if spec.linux().is_none() {
        return Err(SpecError::new("linux", "missing (a Linux container needs it)"));
    }
    Ok((spec, rootfs))
}

/// Parses and validates an OCI `process` object (ExecProcess).
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    let value: Value = serde_json::from_slice(json).map_err(|e| SpecError::new("process_json", format!("not valid JSON: {e}")))?;
    check_process(&value, "process")?;
    serde_json::from_value(value).map_err(|e| SpecError::new("process_json", e.to_string()))
}

/// Parses an OCI `linux.resources` object (UpdateContainer).
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, SpecError> {
    serde_json::from_slice(json).map_err(|e| SpecError::new("resources_json", e.to_string()))
}

fn check_process(process: &Value, at: &str) -> Result<(), SpecError> {
    if !process.is_object() {
        return Err(SpecError::new(at, "not an object"));
    }
    match process.get("args").and_then(Value::as_array) {
        Some(args) if !args.is_empty() => {
            for (i, arg) in args.iter().enumerate() {
                if !arg.is_string() {
                    return Err(SpecError::new(format!("{at}.args[{i}]"), "not a string"));
                }
            }
            if args[0].as_str().is_some_and(str::is_empty) {
                return Err(SpecError::new(format!("{at}.args[0]"), "empty"));
            }
        }
        Some(_) => return Err(SpecError::new(format!("{at}.args"), "empty")),
        None => return Err(SpecError::new(format!("{at}.args"), "missing")),
    }
    match process.get("cwd") {
        Some(Value::String(cwd)) if cwd.starts_with('/') => {}
        Some(Value::String(cwd)) => return Err(SpecError::new(format!("{at}.cwd"), format!("{cwd:?} is not an absolute path"))),
        Some(_) => return Err(SpecError::new(format!("{at}.cwd"), "not a string")),
        None => return Err(SpecError::new(format!("{at}.cwd"), "missing")),
    }
    Ok(())
}

fn check_linux(linux: &Value) -> Result<(), SpecError> {
    if let Some(namespaces) = linux.get("namespaces") {
        let namespaces = namespaces.as_array().ok_or_else(|| SpecError::new("linux.namespaces", "not an array"))?;
        let mut seen: Vec<&str> = Vec::new();
        for (i, ns) in namespaces.iter().enumerate() {
            let field = format!("linux.namespaces[{i}].type");
            let ty = ns.get("type").and_then(Value::as_str).ok_or_else(|| SpecError::new(&field, "missing"))?;
            if !NAMESPACE_TYPES.contains(&ty) {
                return Err(SpecError::new(field, format!("unknown namespace type {ty:?} (want one of {NAMESPACE_TYPES:?})")));
            }
            if seen.contains(&ty) {
                return Err(SpecError::new(field, format!("namespace {ty:?} given twice")));
            }
            seen.push(ty);
            if let Some(path) = ns.get("path").and_then(Value::as_str) {
                if !path.is_empty() && !Path::new(path).exists() {
                    return Err(SpecError::new(format!("linux.namespaces[{i}].path"), format!("{path} does not exist")));
                }
            }
        }
    }
    if let Some(seccomp) = linux.get("seccomp") {
        check_seccomp(seccomp)?;
    }
    Ok(())
}

fn check_seccomp(seccomp: &Value) -> Result<(), SpecError> {
    let Some(syscalls) = seccomp.get("syscalls") else {
        return Ok(());
    };
    let syscalls = syscalls.as_array().ok_or_else(|| SpecError::new("linux.seccomp.syscalls", "not an array"))?;
    for (i, rule) in syscalls.iter().enumerate() {
        let names = rule
            .get("names")
            .and_then(Value::as_array)
            .ok_or_else(|| SpecError::new(format!("linux.seccomp.syscalls[{i}].names"), "missing"))?;
        for (j, name) in names.iter().enumerate() {
            let field = format!("linux.seccomp.syscalls[{i}].names[{j}]");
            let name = name.as_str().ok_or_else(|| SpecError::new(&field, "not a string"))?;
            if RECENT_SYSCALLS.contains(&name) {
                continue;
            }
            if libseccomp::ScmpSyscall::from_name(name).is_err() {
                return Err(SpecError::new(field, format!("unknown system call {name:?}")));
            }
        }
    }
    Ok(())
}

/// Where the container's cgroup goes: an absolute `linux.cgroupsPath`
/// as given, a relative one under `/`, none (or a systemd-style
/// `slice:prefix:name`, which the guest has no systemd for) as
/// `/carapace/<id>`.
pub fn cgroup_path(spec: &Spec, id: &str) -> PathBuf {
    given_cgroup_path(spec).unwrap_or_else(|| PathBuf::from(format!("/carapace/{id}")))
}

/// The cgroup path the spec names (absolute), if it names one the agent
/// honours: not a systemd `slice:prefix:name`, which has no meaning in
/// the guest.
pub fn given_cgroup_path(spec: &Spec) -> Option<PathBuf> {
    let given = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .filter(|p| !p.as_os_str().is_empty() && !p.to_string_lossy().contains(':'))?;
    Some(if given.is_absolute() { given } else { Path::new("/").join(given) })
}

/// Whether the spec asks for a new mount namespace (without one,
/// libcontainer chroots and its mounts land in the agent's namespace).
pub fn has_mount_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| nss.iter().any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Mount && ns.path().is_none()))
}

/// The spec as libcontainer gets it:
/// - `root.path` is the resolved rootfs;
/// - `linux.cgroupsPath` is `cgroup`, absolute ([`cgroup_path`], or the
///   spare cgroup's): libcontainer's
///   cgroup v2 manager then never asks for systemd;
/// - `linux.resources.blockIO.weight` is left to the agent
///   ([`resources_for_libcgroups`]);
/// - `process.noNewPrivileges: false` becomes absent (the same meaning;
///   libcontainer then loads seccomp before dropping capabilities, which a
///   profile needs when CAP_SYS_ADMIN is dropped);
/// - only the hooks that run in the container namespace stay
///   (createContainer, startContainer): prestart, createRuntime,
///   poststart and poststop run in the runtime namespace, on the host, and
///   are the host runtime's to run;
/// - masked and read-only paths this kernel has no file for are left out
///   ([`drop_absent_kernel_paths`]).
pub fn prepare_for_libcontainer(spec: &mut Spec, cgroup: &Path, rootfs: &Path, default_env: &[String], passwd: &PasswdCache) {
    drop_absent_kernel_paths(spec, |p| p.symlink_metadata().is_ok());
    if let Some(root) = spec.root_mut() {
        root.set_path(rootfs.to_path_buf());
    } else {
        let mut root = oci_spec::runtime::Root::default();
        root.set_path(rootfs.to_path_buf());
        root.set_readonly(Some(false));
        spec.set_root(Some(root));
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(cgroup.to_path_buf()));
        if let Some(resources) = linux.resources().as_ref() {
            let resources = resources_for_libcgroups(resources);
            linux.set_resources(Some(resources));
        }
    }
    if let Some(process) = spec.process_mut() {
        normalize_process(process);
        ensure_home(process, rootfs, passwd);
        add_default_env(process, default_env);
    }
    if let Some(hooks) = spec.hooks().clone() {
        let mut kept = Hooks::default();
        kept.set_create_container(hooks.create_container().clone());
        kept.set_start_container(hooks.start_container().clone());
        for (name, dropped) in [
            ("prestart", hooks.prestart()),
            ("createRuntime", hooks.create_runtime()),
            ("poststart", hooks.poststart()),
            ("poststop", hooks.poststop()),
        ] {
            if dropped.as_ref().is_some_and(|h| !h.is_empty()) {
                tracing::debug!(hook = name, "runtime-namespace hooks are the host's; not run in the guest");
            }
        }
        spec.set_hooks(Some(kept));
    }
}

/// Leaves out of `linux.maskedPaths` and `linux.readonlyPaths` the entries
/// under a proc or sysfs the spec mounts at `/proc` or `/sys` that this
/// kernel does not have (`exists` asks the agent's own `/proc` and `/sys`,
/// the same kernel's): `runc spec`'s defaults name /proc/acpi, asound,
/// scsi and others that a guest kernel without those drivers lacks.
/// libcontainer would skip them too, but only after resolving each under
/// the new root, which costs ~0.3 s apiece where the guest kernel is
/// emulated. Per-process entries (`/proc/<pid>`, `self`, `thread-self`)
/// stay.
pub fn drop_absent_kernel_paths(spec: &mut Spec, exists: impl Fn(&Path) -> bool) {
    let mounted = |dest: &str, typ: &str| {
        spec.mounts().as_ref().is_some_and(|ms| ms.iter().any(|m| m.destination() == Path::new(dest) && m.typ().as_deref() == Some(typ)))
    };
    let (proc, sys) = (mounted("/proc", "proc"), mounted("/sys", "sysfs"));
    let absent = |path: &String| {
        let p = Path::new(path);
        let under = |root: &str| {
            p.strip_prefix(root).ok().and_then(|rest| rest.components().next()).map(|c| c.as_os_str().to_string_lossy().into_owned())
        };
        let kernel_path = match (under("/proc"), under("/sys")) {
            (Some(first), _) if proc => !(first == "self" || first == "thread-self" || first.bytes().all(|b| b.is_ascii_digit())),
            (_, Some(_)) if sys => true,
            _ => false,
        };
        // `..` could leave the kernel's tree, and what is under the
        // network directories depends on the network namespace: such
        // entries stay for libcontainer to judge.
        let per_netns = ["/proc/net", "/proc/sys/net", "/sys/class/net", "/sys/devices/virtual/net"].iter().any(|d| p.starts_with(d));
        kernel_path && !per_netns && !path.contains("..") && !exists(p)
    };
    let Some(linux) = spec.linux_mut() else { return };
    let mut dropped = 0;
    let mut keep = |list: Option<Vec<String>>| {
        list.map(|paths| {
            let before = paths.len();
            let kept: Vec<String> = paths.into_iter().filter(|p| !absent(p)).collect();
            dropped += before - kept.len();
            kept
        })
    };
    let masked = keep(linux.masked_paths().clone());
    let readonly = keep(linux.readonly_paths().clone());
    linux.set_masked_paths(masked);
    linux.set_readonly_paths(readonly);
    if dropped > 0 {
        tracing::debug!(dropped, "masked/read-only paths this kernel does not have left out");
    }
}

/// Sets HOME in the process's environment when it is missing, from the
/// rootfs's /etc/passwd (else `/`, as runc does). libcontainer would ask
/// getpwuid_r, which in a static glibc binary dlopens the container's NSS
/// modules: never let it.
pub fn ensure_home(process: &mut Process, rootfs: &Path, passwd: &PasswdCache) {
    let mut env = process.env().clone().unwrap_or_default();
    if env.iter().any(|e| e.starts_with("HOME=") && e.len() > "HOME=".len()) {
        return;
    }
    env.retain(|e| !e.starts_with("HOME="));
    let uid = process.user().uid();
    let home = passwd
        .read(&rootfs.join("etc/passwd"))
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() >= 6 && fields[2].parse::<u32>().ok() == Some(uid)).then(|| fields[5].to_string())
            })
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string());
    env.push(format!("HOME={home}"));
    process.set_env(Some(env));
}

/// What identifies a version of a file: device, inode, size, mtime, ctime.
type FileVersion = (u64, u64, u64, (i64, i64), (i64, i64));

/// Past this many versions the cache starts over (it only costs a read).
const PASSWD_CACHE_MAX: usize = 256;

/// The /etc/passwd files read for HOME, by version: one stat finds the
/// text again instead of an open, a read and a close, each a round trip
/// through virtio-fs (~15 ms of emulated guest kernel apiece on a kvm_pvm
/// host). Every exec without HOME looks its user up, and so does every
/// container of an image whose spec sets none: the containers of one
/// image share the file's inode on the host, which virtio-fs passes on.
/// A file that changed has a new version and is read again.
#[derive(Debug, Default)]
pub struct PasswdCache(std::sync::Mutex<std::collections::HashMap<FileVersion, std::sync::Arc<str>>>);

impl PasswdCache {
    /// The text of `path`, from the cache while its version is known.
    pub fn read(&self, path: &Path) -> Option<std::sync::Arc<str>> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let version = (m.dev(), m.ino(), m.size(), (m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec()));
        let mut cache = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(text) = cache.get(&version) {
            return Some(text.clone());
        }
        // Read after the stat: a change in between is seen as a new
        // version at the next call, which reads again.
        let text: std::sync::Arc<str> = std::fs::read_to_string(path).ok()?.into();
        if cache.len() >= PASSWD_CACHE_MAX {
            cache.clear();
        }
        cache.insert(version, text.clone());
        Some(text)
    }
}

/// The resources as libcontainer gets them: without the blkio weight,
/// whose conversion overflows in libcgroups 0.7 (the agent writes
/// io.weight itself, [`super::cgroup::Cgroup::fix_libcgroups`]).
pub fn resources_for_libcgroups(resources: &LinuxResources) -> LinuxResources {
    let mut r = resources.clone();
    if let Some(mut block_io) = r.block_io().clone() {
        block_io.set_weight(None);
        r.set_block_io(Some(block_io));
    }
    r
}

/// Adds each `KEY=VALUE` of `defaults` whose KEY the process's
/// environment does not set.
pub fn add_default_env(process: &mut Process, defaults: &[String]) {
    if defaults.is_empty() {
        return;
    }
    let mut env = process.env().clone().unwrap_or_default();
    for entry in defaults {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        if !env.iter().any(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key) {
            env.push(entry.clone());
        }
    }
    process.set_env(Some(env));
}

/// `noNewPrivileges: false` → absent (see [`prepare_for_libcontainer`]);
/// ambient capabilities the kernel would refuse to raise (not both
/// permitted and inheritable, as `runc spec`'s default asks) left out, so
/// that libcontainer does not try each and log a warning for it from the
/// container's init (console output is costly in the guest, and the user
/// saw three such lines on every run).
pub fn normalize_process(process: &mut Process) {
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
    if let Some(mut caps) = process.capabilities().clone() {
        if let Some(ambient) = caps.ambient().clone() {
            let raisable = |c: &Capability| {
                caps.permitted().as_ref().is_some_and(|p| p.contains(c)) && caps.inheritable().as_ref().is_some_and(|i| i.contains(c))
            };
            let kept: Capabilities = ambient.iter().filter(|c| raisable(c)).copied().collect();
            if kept.len() != ambient.len() {
                tracing::debug!(dropped = ambient.len() - kept.len(), "ambient capabilities not permitted and inheritable left out");
                caps.set_ambient(Some(kept));
                process.set_capabilities(Some(caps));
            }
        }
    }
}

/// The resources a spec sets that need a cgroup v2 controller, by
/// controller name.
pub fn needed_controllers(resources: &LinuxResources) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if resources.memory().is_some() {
        needed.push("memory");
    }
    if let Some(cpu) = resources.cpu() {
        if cpu.shares().is_some() || cpu.quota().is_some() || cpu.period().is_some() {
            needed.push("cpu");
        }
        if cpu.cpus().is_some() || cpu.mems().is_some() {
            needed.push("cpuset");
        }
    }
    if resources.pids().is_some() {
        needed.push("pids");
    }
    if resources.block_io().as_ref().is_some_and(|b| b.weight().is_some() || b.weight_device().is_some()) {
        needed.push("io");
    }
    needed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(rootfs: &Path, patch: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": rootfs},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        patch(&mut v);
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn accepts_a_good_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, rootfs) = parse_spec(&spec_json(dir.path(), |_| {}), "").expect("valid");
        assert_eq!(rootfs, dir.path());
        assert!(has_mount_namespace(&spec));
        let cgroup = cgroup_path(&spec, "c1");
        prepare_for_libcontainer(&mut spec, &cgroup, &rootfs, &["A=1".into(), "PATH=/nope".into()], &PasswdCache::default());
        let env = spec.process().as_ref().and_then(|p| p.env().clone()).unwrap_or_default();
        assert!(env.contains(&"A=1".to_string()), "{env:?}");
        assert!(!env.contains(&"PATH=/nope".to_string()), "the spec's PATH wins: {env:?}");
        assert_eq!(spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()), Some(PathBuf::from("/carapace/c1")));
    }

    #[test]
    fn names_the_field_at_fault() {
        let dir = tempfile::tempdir().expect("tempdir");
        type Patch = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Patch, &str)> = vec![
            (Box::new(|v| v["process"]["args"] = serde_json::json!([])), "process.args"),
            (Box::new(|v| v["process"].as_object_mut().map(|p| p.remove("args")).map(drop).unwrap_or(())), "process.args"),
            (Box::new(|v| v["process"]["cwd"] = "tmp".into()), "process.cwd"),
            (Box::new(|v| v["linux"]["namespaces"][1]["type"] = "bogus".into()), "linux.namespaces[1].type"),
            (
                Box::new(|v| {
                    v["linux"]["seccomp"] = serde_json::json!({
                        "defaultAction": "SCMP_ACT_ALLOW",
                        "syscalls": [{"names": ["getpid", "no_such_call"], "action": "SCMP_ACT_ERRNO"}]
                    })
                }),
                "linux.seccomp.syscalls[0].names[1]",
            ),
            (Box::new(|v| v["root"]["path"] = "/nonexistent/rootfs".into()), "root.path"),
            (Box::new(|v| v["ociVersion"] = "2.0.0".into()), "ociVersion"),
            (Box::new(|v| v["process"]["user"] = "root".into()), "oci_spec_json"),
        ];
        for (patch, field) in cases {
            let err = parse_spec(&spec_json(dir.path(), patch), "").expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let err = parse_spec(&spec_json(dir.path(), |_| {}), "relative").expect_err("relative");
        assert_eq!(err.field, "rootfs_path");
        let err = parse_spec(b"{", "").expect_err("bad json");
        assert_eq!(err.field, "oci_spec_json");
    }

    #[test]
    fn recent_syscalls_are_tolerated() {
        let dir = tempfile::tempdir().expect("tempdir");
        parse_spec(
            &spec_json(dir.path(), |v| {
                v["linux"]["seccomp"] = serde_json::json!({
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["cachestat"], "action": "SCMP_ACT_ERRNO"}]
                })
            }),
            "",
        )
        .expect("a newer syscall name is skipped, not refused");
    }

    #[test]
    fn prepares_hooks_nnp_and_cgroups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = spec_json(dir.path(), |v| {
            v["process"]["noNewPrivileges"] = false.into();
            v["linux"]["cgroupsPath"] = "pods/c2".into();
            v["hooks"] = serde_json::json!({
                "prestart": [{"path": "/bin/true"}],
                "createContainer": [{"path": "/bin/true"}],
                "startContainer": [{"path": "/bin/true"}],
                "poststop": [{"path": "/bin/true"}]
            });
        });
        let (mut spec, rootfs) = parse_spec(&json, "").expect("valid");
        let cgroup = cgroup_path(&spec, "c2");
        prepare_for_libcontainer(&mut spec, &cgroup, &rootfs, &[], &PasswdCache::default());
        assert_eq!(cgroup_path(&spec, "c2"), PathBuf::from("/pods/c2"));
        let process = spec.process().as_ref().expect("process");
        assert_eq!(process.no_new_privileges(), None);
        assert!(process.env().as_ref().is_some_and(|e| e.contains(&"HOME=/".to_string())));
        let hooks = spec.hooks().as_ref().expect("hooks");
        assert!(hooks.prestart().is_none() && hooks.poststop().is_none());
        assert_eq!(hooks.create_container().as_ref().map(Vec::len), Some(1));
        assert_eq!(hooks.start_container().as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn ambient_capabilities_the_kernel_would_refuse_are_left_out() {
        let json = spec_json(Path::new("/r"), |v| {
            v["process"]["capabilities"] = serde_json::json!({
                "bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
                "inheritable": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_KILL", "CAP_CHOWN", "CAP_AUDIT_WRITE"]
            });
        });
        let spec: Spec = serde_json::from_slice(&json).expect("spec");
        let mut process = spec.process().clone().expect("process");
        normalize_process(&mut process);
        let caps = process.capabilities().clone().expect("caps");
        let ambient: Vec<Capability> = caps.ambient().clone().expect("ambient").into_iter().collect();
        assert_eq!(ambient, vec![Capability::Chown], "only a permitted and inheritable one stays");
        assert_eq!(caps.permitted().as_ref().map(|p| p.len()), Some(3), "other sets untouched");
    }

    #[test]
    fn masked_and_readonly_paths_the_kernel_lacks_are_left_out() {
        let json = spec_json(Path::new("/r"), |v| {
            v["mounts"] = serde_json::json!([
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs"}
            ]);
            v["linux"]["maskedPaths"] = serde_json::json!([
                "/proc/acpi",
                "/proc/kcore",
                "/proc/self/x",
                "/proc/1/x",
                "/sys/firmware",
                "/etc/secret",
                "/proc/../etc",
                "/sys/class/net/eth9"
            ]);
            v["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys", "/proc/sysrq-trigger"]);
        });
        let mut spec: Spec = serde_json::from_slice(&json).expect("spec");
        let present = ["/proc/kcore", "/proc/sys"];
        drop_absent_kernel_paths(&mut spec, |p| present.iter().any(|q| Path::new(q) == p));
        let linux = spec.linux().clone().expect("linux");
        // Absent kernel files go; per-process, per-netns, rootfs and `..` entries stay.
        assert_eq!(
            linux.masked_paths().clone().expect("masked"),
            ["/proc/kcore", "/proc/self/x", "/proc/1/x", "/etc/secret", "/proc/../etc", "/sys/class/net/eth9"].map(String::from).to_vec()
        );
        assert_eq!(linux.readonly_paths().clone().expect("readonly"), vec!["/proc/sys".to_string()]);

        // Without a proc mount at /proc, /proc paths are not the kernel's.
        let json = spec_json(Path::new("/r"), |v| {
            v["linux"]["maskedPaths"] = serde_json::json!(["/proc/acpi"]);
        });
        let mut spec: Spec = serde_json::from_slice(&json).expect("spec");
        drop_absent_kernel_paths(&mut spec, |_| false);
        assert_eq!(spec.linux().clone().expect("linux").masked_paths().clone().expect("masked"), vec!["/proc/acpi".to_string()]);
    }

    #[test]
    fn passwd_is_read_again_only_when_its_version_moves() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
        let path = dir.path().join("etc/passwd");
        std::fs::write(&path, "root:x:0:0::/root:/bin/sh\n").expect("passwd");
        let cache = PasswdCache::default();
        let home = |cache: &PasswdCache, uid: u32| {
            let mut process: Process =
                serde_json::from_value(serde_json::json!({"args": ["true"], "cwd": "/", "user": {"uid": uid, "gid": 0}})).expect("p");
            ensure_home(&mut process, dir.path(), cache);
            process.env().clone().unwrap_or_default().into_iter().find(|e| e.starts_with("HOME=")).expect("HOME")
        };
        assert_eq!(home(&cache, 0), "HOME=/root");
        let first = cache.read(&path).expect("cached");
        assert!(std::sync::Arc::ptr_eq(&first, &cache.read(&path).expect("cached")), "read again though unchanged");
        // A user added (size and mtime move): seen at the next exec.
        std::fs::write(&path, "root:x:0:0::/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n").expect("passwd");
        assert_eq!(home(&cache, 1000), "HOME=/home/u");
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(home(&cache, 0), "HOME=/", "no passwd: /, as runc");
    }
}
