//! CreateContainer: a container built by libcontainer and stopped before
//! the user's program, with its stdio, cgroup and the namespaces it joins.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use carapace_protocol::agent;
use nix::sys::signal::Signal;

use super::mountinfo::{mount_points, unmount_new_under};
use super::*;

/// Frees a reserved id when creation ends, whichever way.
struct Reservation<'a> {
    manager: &'a ContainerManager,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.manager.creating).remove(&self.id);
    }
}

const CREATING: &str = "creating the container";

/// A container's cgroup, and whether its directory exists before the
/// init (the spare one: the init is then born in it).
#[derive(Clone, Copy)]
struct CgroupAt<'a> {
    cgroup: &'a Cgroup,
    exists: bool,
}

impl ContainerManager {
    /// From now on the containers share one PID namespace: the first
    /// created with a PID namespace of its own keeps it, and later ones
    /// that ask for their own join it instead (unless CreateContainer's
    /// `join_namespaces` names another).
    pub fn share_pid_namespace(&self) {
        lock(&self.shared_pid).enabled = true;
    }

    /// The namespaces a new container enters: `join_namespaces`, and the
    /// shared PID namespace (see [`Self::share_pid_namespace`]). Also
    /// whether the new container becomes the holder of the shared one.
    fn namespace_joins(
        &self,
        req: &agent::CreateContainerRequest,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(Vec<namespaces::Join>, bool)> {
        let lookup = |id: &str| self.get(id).ok().map(|c| namespaces::JoinTarget { pid: c.init.pid(), exited: c.init.has_exited() });
        let mut joins = namespaces::resolve(&req.join_namespaces, Path::new("/proc"), lookup)?;
        let shared = lock(&self.shared_pid);
        let mut holds = false;
        let explicit = joins.iter().any(|j| j.typ == oci_spec::runtime::LinuxNamespaceType::Pid);
        if shared.enabled && !explicit && namespaces::wants_new_pid_namespace(spec) {
            match shared.holder.as_deref().and_then(|h| lookup(h).filter(|t| !t.exited)) {
                Some(target) => joins.push(namespaces::Join {
                    typ: oci_spec::runtime::LinuxNamespaceType::Pid,
                    path: PathBuf::from(format!("/proc/{}/ns/pid", target.pid)),
                }),
                None => holds = true,
            }
        }
        Ok((joins, holds))
    }

    /// CreateContainer.
    pub fn create(&self, req: &agent::CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        check_id("container_id", id)?;
        let _span = tracing::info_span!("create_container", id).entered();
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(id) || !creating.insert(id.to_string()) {
                return Err(ContainerError::AlreadyExists(format!("container {id:?}")));
            }
        }
        let _reservation = Reservation { manager: self, id: id.to_string() };

        let (mut spec, rootfs) = spec::parse_spec(&req.oci_spec_json, &req.rootfs_path)?;
        let (joins, holds_shared_pid) = self.namespace_joins(req, &spec)?;
        namespaces::apply(&mut spec, &joins)?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        if let Some(resources) = &resources {
            self.check_controllers(resources, "linux.resources")?;
        }
        let given_cgroup = spec::given_cgroup_path(&spec);
        let mut cgroup_path = spec::cgroup_path(&spec, id);
        let cgroup = Cgroup::new(&self.config.cgroup_root, &cgroup_path);
        if cgroup.exists() {
            return Err(ContainerError::FailedPrecondition(format!(
                "linux.cgroupsPath: the cgroup {} already exists",
                cgroup.dir().display()
            )));
        }
        let bundle = self.bundles_dir().join(id);
        if self.libcontainer_root().join(id).exists() || bundle.exists() {
            return Err(ContainerError::AlreadyExists(format!("state of container {id:?} (left by an earlier container)")));
        }
        // Taken once every check has passed (a refused create wastes none);
        // held until create returns: by then the init has entered them.
        let _spares = self.spares.take_for(&mut spec);
        let spare = given_cgroup.is_none().then(|| self.spare_cgroup.take()).flatten();
        let exists = spare.is_some();
        let cgroup = match spare {
            Some(spare) => {
                cgroup_path = PathBuf::from(cgroup::SPARE_PATH);
                spare
            }
            None => {
                // libcgroups makes the missing directories above a container's
                // cgroup only after asking whether each exists: two creates
                // at once may both try one, and the loser fails on EEXIST.
                if let Some(parent) = cgroup.dir().parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                cgroup
            }
        };
        spec::prepare_for_libcontainer(&mut spec, &cgroup_path, &rootfs, &self.config.default_env, &self.passwd);
        let mounts_before = (!spec::has_mount_namespace(&spec)).then(mount_points);

        let cleanup = |mounts_before: &Option<HashSet<PathBuf>>| {
            if let Some(before) = mounts_before {
                unmount_new_under(self.sys.as_ref(), &rootfs, before);
            }
            if let Err(e) = cgroup.remove() {
                tracing::warn!(error = %e, "removing the cgroup of a failed container");
            }
            let _ = std::fs::remove_dir_all(self.libcontainer_root().join(id));
            let _ = std::fs::remove_dir_all(&bundle);
        };
        let cgroup_at = CgroupAt { cgroup: &cgroup, exists };
        let result = self.create_in(id, &spec, resources.as_ref(), &rootfs, &bundle, cgroup_at, mounts_before.clone(), req);
        match result {
            Ok(container) => {
                let pid = container.init.pid();
                lock(&self.containers).insert(id.to_string(), Arc::new(container));
                if holds_shared_pid {
                    lock(&self.shared_pid).holder = Some(id.to_string());
                }
                tracing::info!(pid, "container created");
                u32::try_from(pid).map_err(|_| ContainerError::InvalidArgument("pid".into()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating the container failed; cleaning up");
                cleanup(&mounts_before);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_in(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        resources: Option<&oci_spec::runtime::LinuxResources>,
        rootfs: &Path,
        bundle: &Path,
        CgroupAt { cgroup, exists }: CgroupAt<'_>,
        mounts_before: Option<HashSet<PathBuf>>,
        req: &agent::CreateContainerRequest,
    ) -> Result<Container> {
        // A filter the launcher's children can load, else none of them
        // runs: libcontainer loads what it has to.
        let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            None => Ok(None),
            Some(profile) => match launch::seccomp::Filter::compile(profile) {
                Ok(Ok(filter)) => Ok(Some(Arc::new(filter))),
                Ok(Err(why)) => Err(why),
                Err(e) => {
                    tracing::debug!(error = %e, "libseccomp did not compile the filter");
                    Err("a filter the agent did not compile")
                }
            },
        };
        let allowed = launch::container_allows(spec).and_then(|()| seccomp.clone().map(|_| ()));
        let direct_exec = match allowed {
            Ok(()) => true,
            Err(why) => {
                tracing::debug!(why, "its execs go through libcontainer");
                false
            }
        };
        let seccomp = seccomp.ok().flatten();
        let prepared = if direct_exec {
            launch::Launch::prepare_init(spec, rootfs, seccomp.clone(), exists.then(|| cgroup.dir()))
                .map_err(ContainerError::launch(CREATING))?
        } else {
            Err("its execs go through libcontainer")
        };
        match prepared {
            Ok(prepared) => {
                let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
                let (init, process) = self.create_direct(id, prepared, resources, CgroupAt { cgroup, exists }, ports)?;
                return Ok(Container {
                    id: id.to_string(),
                    bundle: bundle.to_path_buf(),
                    cgroup: cgroup.clone(),
                    mounts_before,
                    rootfs: rootfs.to_path_buf(),
                    init: process,
                    direct_exec,
                    direct_init: true,
                    seccomp,
                    inner: Mutex::new(Inner {
                        lc: LcContainer::default(),
                        init_process: Some(init.0),
                        started: false,
                        execs: HashMap::new(),
                        exec_watch: Some(init.1),
                    }),
                });
            }
            Err(why) => tracing::debug!(why, "the init goes through libcontainer"),
        }
        std::fs::create_dir_all(bundle).map_err(|e| ContainerError::io(format!("creating {}", bundle.display()), e))?;
        write_json(&bundle.join("config.json"), spec)?;

        let process = spec.process().as_ref();
        let terminal = process.and_then(|p| p.terminal()).unwrap_or(false);
        let console_size = process.and_then(|p| p.console_size()).map(|b| (b.height(), b.width()));
        let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
        let (pending, console, builder) = self.io_builder(id, ports, terminal)?;
        let init_builder = builder.as_init(bundle).with_systemd(false).with_detach(true);

        // Both ends close-on-exec: the init (cloned with our fds) keeps the
        // write end until it execs the user's program.
        let (exec_watch, exec_signal) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ContainerError::io("creating the exec pipe", e.into()))?;
        let saved = SelfState::save(process.and_then(|p| p.oom_score_adj()).is_some());
        let mut registry = self.reaper.registry();
        let built = {
            let _span = tracing::debug_span!("libcontainer_build").entered();
            init_builder.build()
        };
        drop(exec_signal);
        saved.restore();
        let lc = built.map_err(|e| ContainerError::libcontainer("creating the container", &e))?;
        if let Some(resources) = resources {
            if let Err(e) = cgroup.fix_libcgroups(resources) {
                if let Some(pid) = lc.pid() {
                    let _ = self.sys.kill(pid.as_raw(), Signal::SIGKILL);
                }
                return Err(ContainerError::io("linux.resources", e));
            }
        }
        let pid =
            lc.pid().map(|p| p.as_raw()).ok_or_else(|| ContainerError::FailedPrecondition("libcontainer reported no init pid".into()))?;
        let master = console.as_ref().map(ConsoleListener::receive_master).transpose();
        let started = master.and_then(|master| self.start_process_io(&mut registry, pid, pending, master, console_size, id, None));
        drop(registry);
        let init = match started {
            Ok(init) => init,
            Err(e) => {
                let _ = self.sys.kill(pid, Signal::SIGKILL);
                return Err(e);
            }
        };
        Ok(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            cgroup: cgroup.clone(),
            mounts_before,
            rootfs: rootfs.to_path_buf(),
            init,
            direct_exec,
            direct_init: false,
            seccomp,
            inner: Mutex::new(Inner { lc, init_process: None, started: false, execs: HashMap::new(), exec_watch: Some(exec_watch) }),
        })
    }

    /// The init made without libcontainer ([`launch`]): cloned into its
    /// namespaces and, when it exists already, its cgroup (else put there
    /// by libcgroups, as libcontainer does), then left to build the
    /// container and wait for StartContainer.
    /// Returns it with the exec watch (see [`Inner::exec_watch`]) and its
    /// process.
    fn create_direct(
        &self,
        id: &str,
        (launch, pipes): (launch::Launch, launch::PreparedPipes),
        resources: Option<&oci_spec::runtime::LinuxResources>,
        CgroupAt { cgroup, exists }: CgroupAt<'_>,
        ports: StdioPorts,
    ) -> Result<((launch::InitProcess, OwnedFd), Arc<Process>)> {
        use libcgroups::common::CgroupManager;
        let _span = tracing::debug_span!("direct_init").entered();
        let (pending, child) = stdio::prepare(&self.config.dialer, ports, false)?;
        let fds = child.as_ref().map_or([-1; 3], |c| [c.stdin.as_raw_fd(), c.stdout.as_raw_fd(), c.stderr.as_raw_fd()]);
        // Close-on-exec, the write end held by the init only (see
        // `Inner::exec_watch`).
        let (exec_watch, exec_signal) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ContainerError::io("creating the exec pipe", e.into()))?;
        let mut registry = self.reaper.registry();
        let starting = launch.spawn_init(pipes, fds).map_err(ContainerError::launch(CREATING))?;
        drop((exec_signal, child));
        let pid = starting.pid();
        let placed = (|| {
            const STEP: &str = "creating the container's cgroup";
            // Born in a cgroup that existed already (see `prepare_init`);
            // else libcgroups makes it and moves the init in.
            if exists && resources.is_none() {
                return Ok(());
            }
            let manager = self.cgroup_manager(id, cgroup.dir())?;
            if !exists {
                manager.add_task(nix_for_libcgroups::unistd::Pid::from_raw(pid)).map_err(ContainerError::libcgroups(STEP))?;
            }
            match resources {
                Some(resources) => self.apply_resources(&manager, cgroup, resources, STEP, "linux.resources"),
                None => Ok(()),
            }
        })();
        if let Err(e) = placed {
            let _ = self.sys.kill(pid, Signal::SIGKILL);
            return Err(e);
        }
        let init = starting.go().map_err(ContainerError::launch(CREATING))?;
        let started = self.start_process_io(&mut registry, pid, pending, None, None, id, None);
        match started {
            Ok(process) => Ok(((init, exec_watch), process)),
            Err(e) => {
                let _ = self.sys.kill(pid, Signal::SIGKILL);
                Err(e)
            }
        }
    }

    /// With the registry held: sizes the pty (terminal), starts the
    /// copiers and registers the exit waiter of `pid`, whose OOM kills
    /// count from `cgroup`'s count now (an exec; an init's count starts at
    /// StartContainer, which reads it then).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_process_io(
        &self,
        registry: &mut Registry,
        pid: i32,
        pending: stdio::PendingIo,
        master: Option<OwnedFd>,
        console_size: Option<(u64, u64)>,
        name: &str,
        cgroup: Option<&Cgroup>,
    ) -> Result<Arc<Process>> {
        if let (Some(master), Some((rows, cols))) = (&master, console_size) {
            stdio::set_winsize(master.as_fd(), u16::try_from(rows).unwrap_or(u16::MAX), u16::try_from(cols).unwrap_or(u16::MAX))?;
        }
        let io = pending.start(name, master)?;
        let process = Arc::new(Process::new(pid, io, cgroup.map_or(0, Cgroup::oom_kills)));
        let waiter = process.clone();
        registry.on_exit(pid, Box::new(move |exit| waiter.record_exit(exit)));
        Ok(process)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, manager};
    use super::*;

    fn request(dir: &Path, id: &str) -> agent::CreateContainerRequest {
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).expect("rootfs");
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": rootfs},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]}
        });
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(&spec).expect("json");
        req
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, sys) = manager(dir.path());
        add_container(&m, "pause", 100, true, &[]);
        let cases: Vec<(agent::CreateContainerRequest, ttrpc::Code, &str)> = vec![
            (request(dir.path(), "a/b"), ttrpc::Code::INVALID_ARGUMENT, "container_id"),
            (request(dir.path(), "pause"), ttrpc::Code::ALREADY_EXISTS, "pause"),
            (
                {
                    let mut r = request(dir.path(), "c1");
                    r.join_namespaces.insert("ipc".into(), "ghost".into());
                    r
                },
                ttrpc::Code::INVALID_ARGUMENT,
                "join_namespaces[\"ipc\"]: container \"ghost\" not found",
            ),
            (
                {
                    let mut r = request(dir.path(), "c1");
                    r.join_namespaces.insert("net".into(), "pause".into());
                    r
                },
                ttrpc::Code::INVALID_ARGUMENT,
                "join_namespaces[\"net\"]",
            ),
            (
                {
                    let mut r = request(dir.path(), "c1");
                    r.oci_spec_json = b"{}".to_vec();
                    r
                },
                ttrpc::Code::INVALID_ARGUMENT,
                "ociVersion",
            ),
        ];
        for (req, code, named) in cases {
            let err = m.create(&req).expect_err(named);
            assert_eq!(err.code(), code, "{err}");
            assert!(err.to_string().contains(named), "{err} lacks {named}");
        }
        assert!(!m.bundles_dir().join("c1").exists());
        assert!(!m.config.cgroup_root.join("carapace/c1").exists());
        assert_eq!(m.count(), 1);
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn a_shared_pid_namespace_is_joined_after_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, _sys) = manager(dir.path());
        let req = request(dir.path(), "c2");
        let (spec, _) = spec::parse_spec(&req.oci_spec_json, "").expect("spec");
        // Not shared: nothing to join, nobody holds it.
        assert_eq!(m.namespace_joins(&req, &spec).expect("joins"), (vec![], false));
        m.share_pid_namespace();
        // The first container keeps its own, and holds it for the others.
        assert_eq!(m.namespace_joins(&req, &spec).expect("joins"), (vec![], true));
        add_container(&m, "first", 321, true, &[]);
        lock(&m.shared_pid).holder = Some("first".into());
        let (joins, holds) = m.namespace_joins(&req, &spec).expect("joins");
        assert!(!holds);
        assert_eq!(joins, [namespaces::Join { typ: oci_spec::runtime::LinuxNamespaceType::Pid, path: "/proc/321/ns/pid".into() }]);
        // An explicit join wins.
        let mut explicit = req.clone();
        add_container(&m, "pause", 99, true, &[]);
        explicit.join_namespaces.insert("pid".into(), "pause".into());
        let (joins, _) = m.namespace_joins(&explicit, &spec).expect("joins");
        assert_eq!(joins[0].path, PathBuf::from("/proc/99/ns/pid"));
    }
}
