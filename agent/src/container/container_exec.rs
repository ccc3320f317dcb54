//! ExecProcess: another process in a running container.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use carapace_protocol::agent;
use nix::sys::signal::Signal;

use super::*;

const EXECUTING: &str = "executing the process";

impl ContainerManager {
    /// ExecProcess.
    pub fn exec(&self, req: &agent::ExecProcessRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        let exec_id = req.exec_id.as_str();
        check_id("exec_id", exec_id)?;
        let c = self.get(id)?;
        let _span = tracing::info_span!("exec_process", id, exec_id).entered();
        let mut process = spec::parse_process(&req.process_json)?;
        process.set_terminal(Some(req.terminal));
        spec::normalize_process(&mut process);
        spec::ensure_home(&mut process, &c.rootfs, &self.passwd);
        spec::add_default_env(&mut process, &self.config.default_env);
        let console_size = process.console_size().map(|b| (b.height(), b.width()));

        let mut inner = lock(&c.inner);
        if !inner.started || c.init.has_exited() {
            return Err(ContainerError::FailedPrecondition(format!("container {id:?} is not running")));
        }
        if inner.execs.contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(format!("process {exec_id:?} in container {id:?}")));
        }
        let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
        let name = format!("{id}/{exec_id}");
        let target = launch::Target { init_pid: c.init.pid(), cgroup_dir: c.cgroup.dir(), seccomp: c.seccomp.as_ref() };
        if c.direct_exec {
            // As libcontainer's tenant builder: a process joining a
            // frozen cgroup would freeze before its exec, and this thread
            // with it.
            let status = match c.direct_init {
                true if c.cgroup.frozen() => libcontainer::container::ContainerStatus::Paused,
                true => libcontainer::container::ContainerStatus::Running,
                false => inner.lc.status(),
            };
            if status != libcontainer::container::ContainerStatus::Running {
                let e = libcontainer::error::LibcontainerError::IncorrectStatus(status);
                return Err(ContainerError::libcontainer("executing the process", &e));
            }
        }
        let direct =
            if c.direct_exec { launch::Launch::prepare(&process, &target).map_err(ContainerError::launch(EXECUTING))? } else { None };
        let process = match direct {
            Some(direct) => {
                let _span = tracing::debug_span!("direct_exec").entered();
                let (pending, child) = stdio::prepare(&self.config.dialer, ports, req.terminal)?;
                // With a terminal the process's stdio is the pty's slave.
                let fds = child.as_ref().map_or([-1; 3], |c| [c.stdin.as_raw_fd(), c.stdout.as_raw_fd(), c.stderr.as_raw_fd()]);
                let mut registry = self.reaper.registry();
                let (pid, master) = direct.spawn(fds).map_err(ContainerError::launch(EXECUTING))?;
                drop(child);
                let started = self.start_process_io(&mut registry, pid, pending, master, console_size, &name, Some(&c.cgroup));
                if started.is_err() {
                    let _ = self.sys.kill(pid, Signal::SIGKILL);
                }
                started?
            }
            None if c.direct_init => {
                return Err(ContainerError::FailedPrecondition(format!(
                    "this process needs libcontainer (one of process.apparmorProfile, selinuxLabel, ioPriority, scheduler, \
                     execCPUAffinity), which did not create container {id:?}"
                )))
            }
            None => self.exec_with_libcontainer(&c, exec_id, &process, ports, req.terminal, console_size, &name)?,
        };
        let pid = process.pid();
        inner.execs.insert(exec_id.to_string(), process);
        tracing::info!(pid, "process started");
        u32::try_from(pid).map_err(|_| ContainerError::InvalidArgument("pid".into()))
    }

    /// The exec through libcontainer's tenant builder (forks the agent).
    #[allow(clippy::too_many_arguments)]
    fn exec_with_libcontainer(
        &self,
        c: &Container,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        ports: StdioPorts,
        terminal: bool,
        console_size: Option<(u64, u64)>,
        name: &str,
    ) -> Result<Arc<Process>> {
        let id = c.id.as_str();
        let process_file = c.bundle.join(format!("exec-{exec_id}.json"));
        write_json(&process_file, process)?;
        let result = (|| {
            let (pending, console, builder) = self.io_builder(id, ports, terminal)?;
            let tenant = builder.as_tenant().with_process(Some(process_file.clone())).with_detach(true);
            let saved = SelfState::save(process.oom_score_adj().is_some());
            let mut registry = self.reaper.registry();
            let built = {
                let _span = tracing::debug_span!("libcontainer_exec").entered();
                tenant.build()
            };
            saved.restore();
            let pid = built.map_err(|e| ContainerError::libcontainer("executing the process", &e))?.as_raw();
            let master = console.as_ref().map(ConsoleListener::receive_master).transpose();
            let started =
                master.and_then(|master| self.start_process_io(&mut registry, pid, pending, master, console_size, name, Some(&c.cgroup)));
            if started.is_err() {
                let _ = self.sys.kill(pid, Signal::SIGKILL);
            }
            started
        })();
        let _ = std::fs::remove_file(&process_file);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, manager, process};
    use super::*;

    fn request(id: &str, exec_id: &str) -> agent::ExecProcessRequest {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process_json = br#"{"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#.to_vec();
        req
    }

    #[test]
    fn refused_before_anything_is_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, sys) = manager(dir.path());
        add_container(&m, "created", 10, false, &[]);
        let err = m.exec(&request("created", "e1")).expect_err("not running");
        assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
        let c = add_container(&m, "running", 11, true, &[]);
        lock(&c.inner).execs.insert("e1".into(), process(12));
        let err = m.exec(&request("running", "e1")).expect_err("duplicate");
        assert_eq!(err.code(), ttrpc::Code::ALREADY_EXISTS);
        let err = m.exec(&request("running", "a/b")).expect_err("bad id");
        assert!(err.to_string().contains("exec_id"), "{err}");
        let mut bad = request("running", "e2");
        bad.process_json = br#"{"args": [], "cwd": "/"}"#.to_vec();
        let err = m.exec(&bad).expect_err("no args");
        assert!(err.to_string().contains("process.args"), "{err}");
        assert_eq!(m.exec(&request("ghost", "e1")).expect_err("unknown").code(), ttrpc::Code::NOT_FOUND);
        assert!(sys.calls().is_empty());
        let left: Vec<_> = std::fs::read_dir(m.bundles_dir().join("running")).expect("bundle").collect();
        assert!(left.is_empty(), "no process file left: {left:?}");
    }
}
