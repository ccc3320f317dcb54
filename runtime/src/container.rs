//! The container lifecycle behind the CLI: each command takes the id's lock,
//! reads the record, checks the state as runc does, and runs the sandbox
//! core's verb ([`ContainerHandle`]) over the monitor's agent connection
//! ([`crate::control`]), or its own when no monitor answers.

use std::ffi::OsString;
use std::fs::File;
use std::io::BufRead;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::{agent, AgentClient, AGENT_VSOCK_PORT};
use nix::sys::signal::Signal;
use oci_spec::runtime::Process;
use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, BundleError};
use crate::control::ControlGuest;
use crate::guest::{AgentGuest, Guest};
use crate::hooks::{self, HookError};
use crate::sandbox::ContainerHandle;
use crate::state::{now_rfc3339, ContainerRecord, IdLock, StateError, StateStore, Status};
use crate::vm::Vm;
use crate::{proc, stdio};

/// How long `delete` waits for a monitor to stop its VM before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of lifecycle commands. Messages follow runc's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Stdio(#[from] stdio::StdioError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("{0}")]
    WrongState(String),
    #[error("cannot reach the agent of container {id}")]
    Connect {
        id: String,
        #[source]
        source: carapace_protocol::client::ClientError,
    },
    #[error("cannot start the sandbox monitor")]
    Spawn(#[source] std::io::Error),
    /// A helper's report of its failure (its chain flattened: it crossed a pipe).
    #[error("{0}")]
    Create(String),
    #[error("the sandbox monitor exited before the container was created")]
    NoReport,
    #[error("reading the monitor's report")]
    ReadReport(#[source] std::io::Error),
    #[error("bad report from the monitor")]
    BadReport(#[source] serde_json::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot encode the process")]
    EncodeProcess(#[source] serde_json::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--process {path}")]
    ProcessJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, ContainerError>;

/// What the monitor tells `create` once the container exists (or why not).
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub vmm_pid: u32,
    pub vmm_start_time: u64,
    pub guest_pid: u32,
    pub error: Option<String>,
}

/// Options of `create` and `run`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
}

/// The runtime under one `--root`.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub store: StateStore,
    /// Global flags the monitor is started with (`--log`, `--debug`, ...).
    pub global_args: Vec<String>,
}

/// The record's status, corrected when the processes behind it are gone
/// (a monitor or VMM killed from outside).
pub fn effective(record: &mut ContainerRecord) {
    if record.status == Status::Stopped {
        return;
    }
    let monitor_gone = record.monitor_pid != 0 && !proc::alive(record.monitor_pid, record.monitor_start_time);
    let vmm_gone = record.vmm_pid != 0 && !proc::alive(record.vmm_pid, record.vmm_start_time);
    if monitor_gone || vmm_gone || (record.status == Status::Creating && record.monitor_pid == 0) {
        record.stop_reason = Some(
            match (record.status, vmm_gone) {
                (Status::Creating, _) => "create did not finish",
                (_, true) => "the VM exited",
                _ => "the sandbox monitor exited",
            }
            .into(),
        );
        record.status = Status::Stopped;
    }
}

/// The OCI state JSON that hooks get on stdin.
fn hook_state(record: &ContainerRecord, status: Status) -> serde_json::Value {
    let mut r = record.clone();
    r.status = status;
    r.oci_state()
}

impl Runtime {
    fn locked(&self, id: &str) -> Result<(IdLock, ContainerRecord)> {
        let lock = self.store.lock(id)?;
        let mut record = match self.store.load(id) {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, StateError::NotFound(_)) {
                    lock.remove();
                }
                return Err(e.into());
            }
        };
        effective(&mut record);
        Ok((lock, record))
    }

    /// The record of `id` with its effective status.
    pub fn state(&self, id: &str) -> Result<ContainerRecord> {
        let mut record = self.store.load(id)?;
        effective(&mut record);
        Ok(record)
    }

    /// Every container under the root, with effective statuses.
    pub fn list(&self) -> Vec<ContainerRecord> {
        let mut all = self.store.list();
        all.iter_mut().for_each(effective);
        all
    }

    /// The agent of a container's VM: its monitor's connection, relayed
    /// over the control socket, or (no monitor answers) one of our own.
    pub fn guest(&self, record: &ContainerRecord) -> Result<Arc<dyn Guest>> {
        if let Some(control) = ControlGuest::connect(&self.store.dir(&record.id)?)? {
            return Ok(Arc::new(control));
        }
        Ok(Arc::new(AgentGuest(self.agent(record)?)))
    }

    /// Connects to the agent of a container's VM.
    fn agent(&self, record: &ContainerRecord) -> Result<AgentClient> {
        let uds = Vm::vsock_path(&self.store.dir(&record.id)?);
        let conn = carapace_protocol::client::connect_hybrid_vsock(&uds, AGENT_VSOCK_PORT, Duration::from_secs(10))
            .map_err(|source| ContainerError::Connect { id: record.id.clone(), source })?;
        Ok(AgentClient::new(conn))
    }

    /// `create`: validates the bundle, then starts the monitor, which boots
    /// the VM and creates the container; returns the monitor once the
    /// container is `created` (the caller of `run` waits on it).
    #[tracing::instrument(skip(self, opts), fields(id = %opts.id))]
    pub fn create(&self, opts: &CreateOptions) -> Result<Child> {
        let lock = self.store.lock(&opts.id)?;
        let result = self.create_locked(opts, &lock);
        // A failed create leaves nothing, not even the lock file.
        if result.is_err() && !self.store.dir(&opts.id).is_ok_and(|d| d.exists()) {
            lock.remove();
        }
        result
    }

    fn create_locked(&self, opts: &CreateOptions, _lock: &IdLock) -> Result<Child> {
        // Everything that can be checked is checked before anything exists.
        let bundle = Bundle::load(&opts.bundle)?;
        if self.store.load(&opts.id).is_ok() {
            return Err(StateError::Exists(opts.id.clone()).into());
        }
        if let Some(sock) = &opts.console_socket {
            if bundle.spec.process().as_ref().is_none_or(|p| p.terminal() != Some(true)) {
                return Err(ContainerError::WrongState(format!(
                    "--console-socket {} given but process.terminal is not true",
                    sock.display()
                )));
            }
        }
        let dir = self.store.create_dir(&opts.id)?;
        let mut record = ContainerRecord {
            id: opts.id.clone(),
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            status: Status::Creating,
            pid: 0,
            vmm_pid: 0,
            guest_pid: 0,
            created: now_rfc3339(),
            owner: String::from("root"),
            annotations: bundle.spec.annotations().clone().unwrap_or_default(),
            exit_code: None,
            stop_reason: None,
            monitor_pid: 0,
            vmm_start_time: 0,
            monitor_start_time: 0,
            poststart: bundle.spec.hooks().as_ref().and_then(|h| h.poststart().clone()).unwrap_or_default(),
            poststop: bundle.spec.hooks().as_ref().and_then(|h| h.poststop().clone()).unwrap_or_default(),
        };
        if let Err(e) = self.store.save(&record) {
            let _ = self.store.remove(&opts.id);
            return Err(e.into());
        }
        let (mut child, ready) = match self.spawn_monitor(opts, &bundle) {
            Ok(x) => x,
            Err(e) => {
                let _ = self.store.remove(&opts.id);
                return Err(e);
            }
        };
        // Recorded before the (long) boot, so that `delete` can stop a
        // create that was killed halfway.
        record.monitor_pid = child.id();
        record.monitor_start_time = proc::start_time(child.id()).unwrap_or(0);
        let saved = self.store.save(&record);
        let ready = match saved.map_err(ContainerError::from).and_then(|()| read_ready(ready)) {
            Ok(r) if r.error.is_none() => r,
            other => {
                // The monitor tears its VM down before it exits.
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(match other {
                    Ok(r) => ContainerError::Create(r.error.unwrap_or_default()),
                    Err(e) => e,
                });
            }
        };
        // One host pid for the container, as runc has: the monitor's, which
        // exits with the container's status.
        record.pid = child.id();
        record.vmm_pid = ready.vmm_pid;
        record.vmm_start_time = ready.vmm_start_time;
        record.guest_pid = ready.guest_pid;
        record.status = Status::Created;
        self.store.save(&record)?;
        if let Some(pid_file) = &opts.pid_file {
            write_pid_file(pid_file, child.id())?;
        }
        Ok(child)
    }

    /// Starts `carapace _monitor` with the caller's stdio and waits for its
    /// one-line report.
    fn spawn_monitor(&self, opts: &CreateOptions, bundle: &Bundle) -> Result<(Child, OwnedFd)> {
        let mut args: Vec<OsString> = vec!["--bundle".into(), bundle.dir.clone().into()];
        if let Some(s) = &opts.console_socket {
            args.extend(["--console-socket".into(), s.into()]);
        }
        args.push(opts.id.clone().into());
        self.spawn_helper("_monitor", args)
    }

    /// Starts this binary's hidden subcommand `sub` (with our global flags
    /// and the caller's stdio); returns it and the read end of the pipe,
    /// passed as `--ready-fd`, on which it reports (see [`read_ready`]).
    pub fn spawn_helper(&self, sub: &str, args: Vec<OsString>) -> Result<(Child, OwnedFd)> {
        let (read, write) = nix::unistd::pipe().map_err(|e| ContainerError::Spawn(e.into()))?;
        // The write end must survive exec in the child, the read end not.
        nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
            .map_err(|e| ContainerError::Spawn(e.into()))?;
        let exe = std::env::current_exe().map_err(ContainerError::Spawn)?;
        let mut cmd = Command::new(exe);
        cmd.args(&self.global_args)
            .arg("--root")
            .arg(self.store.root())
            .arg(sub)
            .arg("--ready-fd")
            .arg(write.as_raw_fd().to_string())
            .args(args);
        let child = cmd.spawn().map_err(ContainerError::Spawn);
        drop(write);
        let child = child?;
        Ok((child, read))
    }

    /// `start`: runs the container's process; poststart hooks follow.
    #[tracing::instrument(skip(self))]
    pub fn start(&self, id: &str) -> Result<()> {
        let (_lock, mut record) = self.locked(id)?;
        match record.status {
            Status::Created => {}
            Status::Stopped => return Err(ContainerError::WrongState("cannot start a container that has stopped".into())),
            Status::Running => return Err(ContainerError::WrongState("cannot start an already running container".into())),
            s => return Err(ContainerError::WrongState(format!("cannot start a container in the {s} state"))),
        }
        let guest = self.guest(&record)?;
        ContainerHandle::new(guest.as_ref(), id).start()?;
        record.status = Status::Running;
        self.store.save(&record)?;
        hooks::run_warn("poststart", &record.poststart, &record.oci_state());
        Ok(())
    }

    /// `kill`: signals the container's init (or all its processes).
    #[tracing::instrument(skip(self))]
    pub fn kill(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        let (_lock, record) = self.locked(id)?;
        if record.status == Status::Stopped {
            return Err(ContainerError::WrongState("container not running".into()));
        }
        let guest = self.guest(&record)?;
        ContainerHandle::new(guest.as_ref(), id).signal("", u32::try_from(signal).unwrap_or(0), all)?;
        Ok(())
    }

    /// `delete`: stops the VM (a running container only with `force`), runs
    /// poststop hooks and removes every trace of the container.
    #[tracing::instrument(skip(self))]
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let (lock, record) = match self.locked(id) {
            Ok(x) => x,
            Err(ContainerError::State(StateError::NotFound(_))) if force => return Ok(()),
            Err(e) => return Err(e),
        };
        if matches!(record.status, Status::Running | Status::Paused) && !force {
            return Err(ContainerError::WrongState(format!("cannot delete container {id} that is not stopped: {}", record.status)));
        }
        // The monitor kills the container, shuts the guest down and exits.
        proc::signal(record.monitor_pid, record.monitor_start_time, Signal::SIGTERM);
        if !proc::wait_gone(record.monitor_pid, record.monitor_start_time, STOP_TIMEOUT) {
            tracing::warn!(pid = record.monitor_pid, "the monitor did not stop; killing it and the VMM");
            proc::signal(record.monitor_pid, record.monitor_start_time, Signal::SIGKILL);
        }
        // A record still `creating` (its `create` was killed while the VM
        // booted) names no VMM: the one the monitor started dies with it
        // (PDEATHSIG), but only after the monitor; wait for it all the same,
        // so that nothing it holds (its taps) outlives `delete`.
        let (vmm_pid, vmm_start_time) = match record.vmm_pid {
            0 => self.store.dir(id).ok().and_then(|d| Vm::recorded_pid(&d).or_else(|| Vm::find_running(&d))).unwrap_or((0, 0)),
            pid => (pid, record.vmm_start_time),
        };
        proc::signal(vmm_pid, vmm_start_time, Signal::SIGKILL);
        proc::wait_gone(vmm_pid, vmm_start_time, Duration::from_secs(10));
        hooks::run_warn("poststop", &record.poststop, &hook_state(&record, Status::Stopped));
        self.store.remove(id)?;
        lock.remove();
        Ok(())
    }

    /// `pause` and `resume`: freeze or thaw the container's cgroup.
    #[tracing::instrument(skip(self))]
    pub fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let (_lock, mut record) = self.locked(id)?;
        let (want, to) = if pause { (Status::Running, Status::Paused) } else { (Status::Paused, Status::Running) };
        if record.status != want {
            return Err(ContainerError::WrongState(format!("container {id} is {}, not {want}", record.status)));
        }
        let guest = self.guest(&record)?;
        ContainerHandle::new(guest.as_ref(), id).set_paused(pause)?;
        record.status = to;
        self.store.save(&record)?;
        Ok(())
    }

    /// The agent of container `id`, which must not have stopped.
    fn running(&self, id: &str) -> Result<Arc<dyn Guest>> {
        let record = self.state(id)?;
        if record.status == Status::Stopped {
            return Err(ContainerError::WrongState(format!("container {id} is not running")));
        }
        self.guest(&record)
    }

    /// `ps`: the guest pids of the container's processes.
    pub fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let guest = self.running(id)?;
        Ok(ContainerHandle::new(guest.as_ref(), id).ps()?)
    }

    /// `events --stats`: the container's cgroup figures.
    pub fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse> {
        let guest = self.running(id)?;
        Ok(ContainerHandle::new(guest.as_ref(), id).stats()?)
    }

    /// `update --resources`: new `linux.resources` for the container.
    pub fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let guest = self.running(id)?;
        Ok(ContainerHandle::new(guest.as_ref(), id).update(resources_json)?)
    }

    /// The process `exec` runs: `--process FILE`, or the container's own
    /// process with `args` and the overrides given.
    pub fn exec_process(&self, id: &str, from_file: Option<&Path>, overrides: &ExecOverrides) -> Result<Process> {
        let record = self.state(id)?;
        let mut p = match from_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|source| ContainerError::Io { path: path.into(), source })?;
                serde_json::from_slice::<Process>(&text).map_err(|source| ContainerError::ProcessJson { path: path.into(), source })?
            }
            None => {
                let bundle = Bundle::load(&record.bundle)?;
                let mut p = bundle.spec.process().clone().unwrap_or_default();
                p.set_args(Some(overrides.args.clone()));
                p
            }
        };
        if p.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(ContainerError::WrongState("exec: no command given (process.args is empty)".into()));
        }
        if overrides.tty {
            p.set_terminal(Some(true));
        }
        if let Some(cwd) = &overrides.cwd {
            p.set_cwd(cwd.clone());
        }
        if !p.cwd().is_absolute() {
            return Err(ContainerError::WrongState(format!("exec: cwd {:?} is not an absolute path", p.cwd())));
        }
        if !overrides.env.is_empty() {
            let mut env = p.env().clone().unwrap_or_default();
            env.extend(overrides.env.iter().cloned());
            p.set_env(Some(env));
        }
        if let Some((uid, gid)) = overrides.user {
            let mut user = p.user().clone();
            user.set_uid(uid);
            if let Some(g) = gid {
                user.set_gid(g);
            }
            p.set_user(user);
        }
        Ok(p)
    }
}

/// Command-line overrides of `exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecOverrides {
    pub args: Vec<String>,
    pub tty: bool,
    pub cwd: Option<PathBuf>,
    pub env: Vec<String>,
    pub user: Option<(u32, Option<u32>)>,
}

/// Reads a helper's one-line report; EOF without one means it died.
pub fn read_ready(read: OwnedFd) -> std::result::Result<Ready, ContainerError> {
    let mut text = String::new();
    std::io::BufReader::new(File::from(read)).read_line(&mut text).map_err(ContainerError::ReadReport)?;
    if text.trim().is_empty() {
        return Err(ContainerError::NoReport);
    }
    serde_json::from_str(text.trim()).map_err(ContainerError::BadReport)
}

/// Writes a pid file atomically, as runc does.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension("carapace-tmp");
    let io = |source| ContainerError::Io { path: path.to_path_buf(), source };
    std::fs::write(&tmp, pid.to_string()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    /// The OS's words for ENOENT, which every chain below ends with.
    fn enoent() -> String {
        std::io::Error::from_raw_os_error(libc::ENOENT).to_string()
    }

    #[test]
    fn a_cause_is_printed_once_by_anyhow_and_by_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("missing").join("pid");
        let e = write_pid_file(&pid_file, 1).expect_err("no such directory");
        assert_eq!(Chain(&e).to_string(), format!("{}: {}", pid_file.display(), enoent()));
        let line = format!("{:#}", anyhow::Error::from(e).context("exec"));
        assert_eq!(line, format!("exec: {}: {}", pid_file.display(), enoent()));
    }

    #[test]
    fn a_wrapped_library_error_keeps_one_copy_of_its_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("gone").join("vsock.sock");
        let port = std::path::PathBuf::from(format!("{}_1", uds.display()));
        let listen = std::os::unix::net::UnixListener::bind(&port).expect_err("no directory");
        let relay = crate::relay::RelayError::Listen { path: port, err: listen };
        let e = ContainerError::from(stdio::StdioError::from(relay));
        let line = format!("{:#}", anyhow::Error::from(e));
        assert!(line.starts_with(&format!("cannot listen on {}_", uds.display())), "{line}");
        assert_eq!(line.matches(&enoent()).count(), 1, "{line}");
        assert!(line.ends_with(&enoent()), "{line}");
    }

    /// A runtime under a temporary root with container `id` recorded as
    /// `status`, its monitor (this process) serving the control socket over
    /// a fake agent that has the container's init (started unless created).
    struct Fixture {
        _root: tempfile::TempDir,
        rt: Runtime,
        fake: std::sync::Arc<crate::test_utils::FakeGuest>,
    }

    fn fixture(id: &str, status: Status, poststart: Vec<oci_spec::runtime::Hook>) -> Fixture {
        let root = tempfile::tempdir().expect("tempdir");
        let rt = Runtime { store: StateStore::new(root.path().join("run")), global_args: Vec::new() };
        let dir = rt.store.create_dir(id).expect("dir");
        let me = std::process::id();
        let record = ContainerRecord {
            id: id.into(),
            // Gone: the verbs must not read the bundle again.
            bundle: root.path().join("no-bundle"),
            rootfs: root.path().join("no-bundle/rootfs"),
            status,
            pid: me,
            vmm_pid: 0,
            guest_pid: 1,
            created: now_rfc3339(),
            owner: "root".into(),
            annotations: Default::default(),
            exit_code: None,
            stop_reason: None,
            monitor_pid: me,
            vmm_start_time: 0,
            monitor_start_time: proc::start_time(me).expect("own start time"),
            poststart,
            poststop: Vec::new(),
        };
        rt.store.save(&record).expect("save");
        let fake = std::sync::Arc::new(crate::test_utils::FakeGuest::new(dir.join("vsock.sock")));
        fake.add(id, "", status != Status::Created);
        let guest: Arc<dyn Guest> = fake.clone();
        crate::control::serve(&crate::control::path(&dir), &guest, id);
        Fixture { _root: root, rt, fake }
    }

    fn calls(f: &Fixture) -> Vec<String> {
        f.fake.calls.lock().expect("calls").clone()
    }

    #[test]
    fn start_goes_through_the_monitor_and_runs_poststart_from_the_record() {
        let out = tempfile::tempdir().expect("tempdir");
        let mark = out.path().join("poststart");
        let hook: oci_spec::runtime::Hook = serde_json::from_value(serde_json::json!({
            "path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", mark.display())]
        }))
        .expect("hook");
        let f = fixture("c1", Status::Created, vec![hook]);
        f.rt.start("c1").expect("start");
        assert_eq!(f.rt.state("c1").expect("state").status, Status::Running);
        assert_eq!(calls(&f), ["StartContainer"]);
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&mark).expect("hook ran")).expect("state json");
        assert_eq!(state["status"], "running");
        let e = f.rt.start("c1").expect_err("twice");
        assert_eq!(e.to_string(), "cannot start an already running container");
    }

    #[test]
    fn kill_pause_resume_ps_update_go_through_the_monitor() {
        let f = fixture("c1", Status::Running, Vec::new());
        assert_eq!(f.rt.ps("c1").expect("ps").len(), 1);
        f.rt.update("c1", b"{}".to_vec()).expect("update");
        f.rt.pause("c1", true).expect("pause");
        assert_eq!(f.rt.state("c1").expect("state").status, Status::Paused);
        let e = f.rt.pause("c1", true).expect_err("paused already");
        assert_eq!(e.to_string(), "container c1 is paused, not running");
        f.rt.pause("c1", false).expect("resume");
        f.rt.kill("c1", 15, false).expect("kill");
        // The guest's answer comes back as the agent gave it.
        let e = f.rt.kill("c1", 15, false).expect_err("exited in the guest");
        assert_eq!(e.to_string(), "SignalProcess: process exited");
        assert_eq!(calls(&f), ["UpdateContainer", "PauseContainer", "ResumeContainer", "SignalProcess", "SignalProcess"]);
    }

    #[test]
    fn a_stopped_container_is_not_signalled_and_a_running_one_not_deleted_without_force() {
        let f = fixture("c1", Status::Stopped, Vec::new());
        assert_eq!(f.rt.kill("c1", 9, false).expect_err("stopped").to_string(), "container not running");
        assert_eq!(f.rt.ps("c1").expect_err("stopped").to_string(), "container c1 is not running");
        let f = fixture("c2", Status::Running, Vec::new());
        let e = f.rt.delete("c2", false).expect_err("running");
        assert_eq!(e.to_string(), "cannot delete container c2 that is not stopped: running");
        assert!(calls(&f).is_empty());
    }
}
