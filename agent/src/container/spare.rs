//! Network and IPC namespaces made before they are needed.
//!
//! Where the guest kernel is emulated (kvm_pvm hosts) a new network
//! namespace costs ~1-2 s of guest time and an IPC namespace ~0.3 s: the
//! kernel builds loopback, sysctl tables and IPC limits instruction by
//! instruction. The agent makes one of each at boot, before it serves (so
//! a VM template carries them), and the first container that asks for a
//! fresh one of that type joins it instead of unsharing. Each is used once:
//! never seen by any process before, it is what `unshare` would have given
//! (a network namespace with only `lo`, down; an empty IPC namespace).
//! Later containers unshare as before.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::fcntl::{open, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// The types made ahead: the costly ones that are never joined by path in
/// a sandbox (a pod's containers use the guest's network namespace and join
/// the sandbox container's IPC namespace by `join_namespaces`).
const TYPES: &[(LinuxNamespaceType, CloneFlags, &str)] =
    &[(LinuxNamespaceType::Network, CloneFlags::CLONE_NEWNET, "net"), (LinuxNamespaceType::Ipc, CloneFlags::CLONE_NEWIPC, "ipc")];

/// Namespaces made ahead, each held by an open nsfs descriptor.
#[derive(Debug, Default)]
pub struct SpareNamespaces {
    spares: Mutex<Vec<(LinuxNamespaceType, OwnedFd)>>,
}

/// The spares a new container is joining: held until its init has entered
/// them (after that the container's processes keep them alive).
#[derive(Debug)]
pub struct Taken(#[allow(dead_code, reason = "held for its drop")] Vec<OwnedFd>);

impl SpareNamespaces {
    /// Makes one namespace of each type in [`TYPES`], each in a thread of
    /// its own (unshare changes only the calling thread's namespaces).
    /// What cannot be made is logged and left out: containers then unshare.
    pub fn make(&self) {
        let made: Vec<(LinuxNamespaceType, OwnedFd)> = std::thread::scope(|scope| {
            let handles: Vec<_> = TYPES.iter().map(|&(typ, flag, name)| (typ, name, scope.spawn(move || make_one(flag, name)))).collect();
            handles
                .into_iter()
                .filter_map(|(typ, name, handle)| match handle.join() {
                    Ok(Ok(fd)) => Some((typ, fd)),
                    Ok(Err(e)) => {
                        tracing::warn!(namespace = name, error = %e, "making a spare namespace");
                        None
                    }
                    Err(_) => None,
                })
                .collect()
        });
        tracing::debug!(count = made.len(), "spare namespaces made");
        self.spares.lock().unwrap_or_else(|e| e.into_inner()).extend(made);
    }

    /// Points each namespace of `spec` that is to be fresh (no path) and of
    /// a type with a spare at that spare, as a path the container's init
    /// (a child of this process) opens: `/proc/<agent pid>/fd/<fd>`.
    pub fn take_for(&self, spec: &mut Spec) -> Taken {
        let mut taken = Vec::new();
        let Some(namespaces) = spec.linux_mut().as_mut().and_then(|l| l.namespaces_mut().as_mut()) else {
            return Taken(taken);
        };
        let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
        for ns in namespaces.iter_mut().filter(|ns| ns.path().is_none()) {
            if let Some(i) = spares.iter().position(|(typ, _)| *typ == ns.typ()) {
                let (_, fd) = spares.swap_remove(i);
                ns.set_path(Some(PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()))));
                tracing::debug!(namespace = ?ns.typ(), "joining a namespace made at boot");
                taken.push(fd);
            }
        }
        Taken(taken)
    }

    /// How many spares are left (for tests and logs).
    pub fn len(&self) -> usize {
        self.spares.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In the calling (short-lived) thread: a new namespace, opened.
fn make_one(flag: CloneFlags, name: &str) -> nix::Result<OwnedFd> {
    unshare(flag)?;
    open(format!("/proc/thread-self/ns/{name}").as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, SpecBuilder};
    use std::os::unix::fs::MetadataExt;

    fn spec(namespaces: &[(LinuxNamespaceType, Option<&str>)]) -> Spec {
        let namespaces = namespaces
            .iter()
            .map(|(typ, path)| {
                let b = LinuxNamespaceBuilder::default().typ(*typ);
                match path {
                    Some(p) => b.path(PathBuf::from(p)).build().expect("namespace"),
                    None => b.build().expect("namespace"),
                }
            })
            .collect::<Vec<_>>();
        SpecBuilder::default().linux(LinuxBuilder::default().namespaces(namespaces).build().expect("linux")).build().expect("spec")
    }

    fn paths(spec: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect()
    }

    #[test]
    fn spares_go_to_fresh_namespaces_of_their_type_once() {
        if !carapace_test_support::can_run("spares_go_to_fresh_namespaces_of_their_type_once", &[carapace_test_support::Need::Root]) {
            return;
        }
        let spares = SpareNamespaces::default();
        spares.make();
        assert_eq!(spares.len(), 2);

        let mut first = spec(&[
            (LinuxNamespaceType::Pid, None),
            (LinuxNamespaceType::Network, None),
            (LinuxNamespaceType::Ipc, Some("/proc/7/ns/ipc")),
            (LinuxNamespaceType::Mount, None),
        ]);
        let taken = spares.take_for(&mut first);
        let got = paths(&first);
        assert_eq!(got[0], (LinuxNamespaceType::Pid, None));
        assert_eq!(got[2], (LinuxNamespaceType::Ipc, Some(PathBuf::from("/proc/7/ns/ipc"))), "a joined namespace stays");
        assert_eq!(got[3], (LinuxNamespaceType::Mount, None));
        let net = got[1].1.clone().expect("the network namespace got a spare");
        // A new namespace: not ours.
        let ours = std::fs::metadata("/proc/self/ns/net").expect("our netns").ino();
        let spare = std::fs::metadata(&net).expect("the spare opens").ino();
        assert_ne!(spare, ours);
        assert_eq!(spares.len(), 1, "the IPC spare is left");

        let mut second = spec(&[(LinuxNamespaceType::Network, None), (LinuxNamespaceType::Ipc, None)]);
        let _taken2 = spares.take_for(&mut second);
        let got = paths(&second);
        assert_eq!(got[0].1, None, "each spare is used once");
        assert!(got[1].1.is_some());
        assert!(spares.is_empty());

        drop(taken);
        // Closed (its number may already hold another test's descriptor).
        assert!(
            std::fs::metadata(&net).map_or(true, |m| m.ino() != spare),
            "the descriptor is closed once the container holds the namespace"
        );
    }
}
