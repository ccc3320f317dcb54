//! Namespaces a container joins: another container's (the pod's sandbox
//! container's IPC, UTS and PID namespaces, CreateContainer's
//! `join_namespaces`), entered through that container's init's
//! `/proc/<pid>/ns/<type>`, as a namespace `path` on a host would be.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Spec};

use super::{ContainerError, Result};

/// The namespace types a container may join another container's of, with
/// their names in the API and in `/proc/<pid>/ns/`. The network namespace
/// is the guest's for every container.
const JOINABLE: &[(&str, LinuxNamespaceType)] =
    &[("ipc", LinuxNamespaceType::Ipc), ("uts", LinuxNamespaceType::Uts), ("pid", LinuxNamespaceType::Pid)];

/// What a container to be joined looks like: its init's pid, and whether
/// that init has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinTarget {
    pub pid: i32,
    pub exited: bool,
}

/// One namespace to enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub typ: LinuxNamespaceType,
    pub path: PathBuf,
}

/// Resolves `join_namespaces` (type → container id) to namespace paths
/// under `proc` (`/proc`), by type order; `lookup` finds a container.
pub fn resolve(joins: &HashMap<String, String>, proc: &Path, lookup: impl Fn(&str) -> Option<JoinTarget>) -> Result<Vec<Join>> {
    let mut out = Vec::with_capacity(joins.len());
    let mut keys: Vec<&String> = joins.keys().collect();
    keys.sort();
    for name in keys {
        let id = &joins[name];
        let field = format!("join_namespaces[{name:?}]");
        let Some(&(_, typ)) = JOINABLE.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = JOINABLE.iter().map(|(n, _)| *n).collect();
            return Err(ContainerError::InvalidArgument(format!(
                "{field}: cannot join a namespace of type {name:?} (joinable: {known:?})"
            )));
        };
        let target = lookup(id).ok_or_else(|| ContainerError::InvalidArgument(format!("{field}: container {id:?} not found")))?;
        if target.exited {
            return Err(ContainerError::FailedPrecondition(format!("{field}: container {id:?} has exited; its namespaces are gone")));
        }
        out.push(Join { typ, path: proc.join(target.pid.to_string()).join("ns").join(name) });
    }
    Ok(out)
}

/// Sets each join's path in the spec's `linux.namespaces`, replacing the
/// entry of that type or adding one.
pub fn apply(spec: &mut Spec, joins: &[Join]) -> Result<()> {
    if joins.is_empty() {
        return Ok(());
    }
    let linux = spec.linux_mut().as_mut().ok_or_else(|| ContainerError::InvalidArgument("linux: missing".into()))?;
    let mut namespaces: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    for join in joins {
        let entry = LinuxNamespaceBuilder::default()
            .typ(join.typ)
            .path(join.path.clone())
            .build()
            .map_err(|e| ContainerError::InvalidArgument(format!("join_namespaces: {e}")))?;
        match namespaces.iter_mut().find(|ns| ns.typ() == join.typ) {
            Some(existing) => *existing = entry,
            None => namespaces.push(entry),
        }
    }
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

/// Whether the spec asks for a PID namespace of its own (an entry without
/// a path).
pub fn wants_new_pid_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| nss.iter().any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joins(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pause(id: &str) -> Option<JoinTarget> {
        (id == "pause").then_some(JoinTarget { pid: 42, exited: false })
    }

    fn spec() -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "/rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}, {"type": "network"}]}
        }))
        .expect("spec")
    }

    #[test]
    fn types_map_to_the_sandbox_containers_proc_paths() {
        let got = resolve(&joins(&[("uts", "pause"), ("ipc", "pause"), ("pid", "pause")]), Path::new("/proc"), pause).expect("resolve");
        assert_eq!(
            got,
            vec![
                Join { typ: LinuxNamespaceType::Ipc, path: "/proc/42/ns/ipc".into() },
                Join { typ: LinuxNamespaceType::Pid, path: "/proc/42/ns/pid".into() },
                Join { typ: LinuxNamespaceType::Uts, path: "/proc/42/ns/uts".into() },
            ]
        );
        assert!(resolve(&HashMap::new(), Path::new("/proc"), pause).expect("none").is_empty());
    }

    #[test]
    fn unknown_types_and_containers_are_named() {
        let err = resolve(&joins(&[("network", "pause")]), Path::new("/proc"), pause).expect_err("net");
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains("join_namespaces[\"network\"]"), "{err}");
        let err = resolve(&joins(&[("ipc", "ghost")]), Path::new("/proc"), pause).expect_err("ghost");
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains("join_namespaces[\"ipc\"]: container \"ghost\" not found"), "{err}");
        let gone = |_: &str| Some(JoinTarget { pid: 7, exited: true });
        let err = resolve(&joins(&[("pid", "pause")]), Path::new("/proc"), gone).expect_err("exited");
        assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION, "{err}");
    }

    #[test]
    fn paths_replace_or_add_entries() {
        let mut spec = spec();
        assert!(wants_new_pid_namespace(&spec));
        let joins = [
            Join { typ: LinuxNamespaceType::Ipc, path: "/proc/42/ns/ipc".into() },
            Join { typ: LinuxNamespaceType::Pid, path: "/proc/42/ns/pid".into() },
            Join { typ: LinuxNamespaceType::Uts, path: "/proc/42/ns/uts".into() },
        ];
        apply(&mut spec, &joins).expect("apply");
        let nss = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).expect("namespaces");
        let path = |t| nss.iter().find(|ns| ns.typ() == t).and_then(|ns| ns.path().clone());
        assert_eq!(path(LinuxNamespaceType::Ipc), Some("/proc/42/ns/ipc".into()));
        assert_eq!(path(LinuxNamespaceType::Pid), Some("/proc/42/ns/pid".into()));
        assert_eq!(path(LinuxNamespaceType::Uts), Some("/proc/42/ns/uts".into()));
        assert_eq!(path(LinuxNamespaceType::Mount), None);
        assert_eq!(path(LinuxNamespaceType::Network), None, "the guest's network stays");
        assert_eq!(nss.len(), 5, "{nss:?}");
        assert!(!wants_new_pid_namespace(&spec));
    }
}
