//! containerd's Task service (`containerd.task.v2.Task`, also served as
//! `v3`) mapped onto the sandbox's agent.
//!
//! The shim serves one sandbox. The first Create boots its VM (sized by
//! [`pod::vm_options`]) and calls CreateSandbox; every Create binds the
//! container's rootfs and bind-mount sources into the VM's share and calls
//! CreateContainer with the container's stdio bridged ([`crate::io`]). A
//! waiter thread per process turns WaitProcess into the TaskExit event and
//! the answer of Wait. Deleting the last container stops the VM. The calls
//! on the agent are the sandbox core's container verbs
//! ([`core::ContainerHandle`], via [`core::Sandbox::container`]), which the
//! CLI runs too; what is the shim's is the Task API's state checks, status
//! codes and events around them.
//!
//! Pids: a task's pid (Create, Start, State, events) is the VMM's host pid,
//! the one host process that stands for the sandbox; `Pids` lists the
//! guest's pids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use carapace_runtime::bundle::Bundle;
use carapace_runtime::error::Chain;
use carapace_runtime::hooks;
use carapace_runtime::launcher::Launcher;
use carapace_runtime::pod;
use carapace_runtime::sandbox::{self as core, SandboxSpec};
use carapace_runtime::share;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::ExitSignal;
use ttrpc::TtrpcContext;

use crate::config::ConfigSource;
use crate::container::Container;
use crate::error::ShimError;
use crate::events::{self, topics, EventSink};
use crate::io::{self, StdioPaths};
use crate::process::{Exit, Process, Status, LOST, NOT_RUN};
use crate::{rootfs, stats};

/// How long output may still flow after a process exited before its exit
/// is reported anyway (a background child may hold stdout open).
const OUTPUT_GRACE: Duration = Duration::from_secs(5);
/// How long CloseIO lets the stdin copy deliver what was written.
const STDIN_GRACE: Duration = Duration::from_secs(2);
/// How long Delete waits for a killed (never started) init to be reaped.
const REMOVE_WAIT: Duration = Duration::from_secs(15);

/// Where the service keeps its sandbox and whom it serves.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// containerd's namespace (events carry it; part of the sandbox's key).
    pub namespace: String,
    /// Directory of sandbox VMs (sockets, logs, the share); short, as Unix
    /// socket paths live in it.
    pub state_root: PathBuf,
    /// The configuration file a sandbox boots with unless the Create's
    /// runtime options name another.
    pub config: ConfigSource,
}

/// The shim's sandbox: the core's, in a directory the shim owns and
/// removes when the sandbox stops.
#[derive(Debug)]
pub struct Sandbox(core::Sandbox);

impl std::ops::Deref for Sandbox {
    type Target = core::Sandbox;
    fn deref(&self) -> &core::Sandbox {
        &self.0
    }
}

impl Sandbox {
    fn stop(&self) {
        self.0.stop();
        share::remove_sandbox_dir(&self.0.dir);
    }
}

#[derive(Debug, Clone)]
struct Entry {
    c: Arc<Container>,
    sb: Arc<Sandbox>,
}

struct Inner {
    cfg: TaskConfig,
    launcher: Box<dyn Launcher>,
    events: Arc<dyn EventSink>,
    /// Locked for the whole of a Create and of the last Delete's VM stop,
    /// so that a VM is never used while it stops. Order: `sandbox`, then
    /// `containers`.
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Entry>>,
    exit: Arc<ExitSignal>,
}

/// The Task service.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService").field("cfg", &self.inner.cfg).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn time_from_nanos(n: i64) -> SystemTime {
    match u64::try_from(n) {
        Ok(n) if n > 0 => UNIX_EPOCH + Duration::from_nanos(n),
        _ => SystemTime::now(),
    }
}

impl TaskService {
    pub fn new(cfg: TaskConfig, launcher: Box<dyn Launcher>, events: Arc<dyn EventSink>, exit: Arc<ExitSignal>) -> Self {
        let inner = Inner { cfg, launcher, events, sandbox: Mutex::new(None), containers: Mutex::new(HashMap::new()), exit };
        Self { inner: Arc::new(inner) }
    }

    /// The running sandbox, if any.
    pub fn sandbox(&self) -> Option<Arc<Sandbox>> {
        lock(&self.inner.sandbox).clone()
    }

    /// Ids of the containers that exist.
    pub fn container_ids(&self) -> Vec<String> {
        lock(&self.inner.containers).keys().cloned().collect()
    }
}

impl Inner {
    fn get(&self, id: &str) -> Result<Entry, ShimError> {
        lock(&self.containers).get(id).cloned().ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
    }

    fn publish(&self, topic: &'static str, event: impl containerd_shim::protos::protobuf::MessageDyn) {
        self.events.publish(topic, Box::new(event));
    }

    // ------------------------------------------------------------ create

    fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<api::CreateTaskResponse, ShimError> {
        carapace_runtime::id::validate_id(&req.id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented("checkpoint/restore is not supported".into()));
        }
        let bundle_dir = PathBuf::from(&req.bundle);
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            let target = bundle_dir.join("rootfs");
            rootfs::mount_all(&req.rootfs, &target)?;
            Some(target)
        };
        let result = self.create_in_sandbox(req, &bundle_dir, mounted.clone());
        if result.is_err() {
            if let Some(t) = &mounted {
                share::unmount(t);
            }
        }
        result
    }

    fn create_in_sandbox(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        bundle_dir: &Path,
        mounted: Option<PathBuf>,
    ) -> Result<api::CreateTaskResponse, ShimError> {
        let bundle = Bundle::load(bundle_dir)?;
        let mut slot = lock(&self.sandbox);
        if lock(&self.containers).contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!("container {} already exists", req.id)));
        }
        let (sb, booted) = self.ensure_sandbox(&mut slot, &req.id, &bundle, req.options.as_ref())?;
        let c = match self.create_container(&sb, req, &bundle, mounted) {
            Ok(c) => c,
            Err(e) => {
                if booted && lock(&self.containers).is_empty() {
                    sb.stop();
                    *slot = None;
                }
                return Err(e);
            }
        };
        let entry = Entry { c: c.clone(), sb: sb.clone() };
        lock(&self.containers).insert(req.id.clone(), entry);
        drop(slot);
        let pid = sb.vmm_pid();
        self.spawn_waiter(&sb, &c, &c.init);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            },
        );
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    /// The sandbox, booted for `spec`'s pod if there is none yet (with the
    /// configuration the runtime `options` or the shim name); true if this
    /// call booted it.
    fn ensure_sandbox(
        &self,
        slot: &mut Option<Arc<Sandbox>>,
        container_id: &str,
        bundle: &Bundle,
        options: Option<&Any>,
    ) -> Result<(Arc<Sandbox>, bool), ShimError> {
        let spec = &bundle.spec;
        if let Some(sb) = slot {
            return Ok((sb.clone(), false));
        }
        // Read at each boot, not at shim start: a fixed file applies to the
        // next sandbox, and a broken one fails this Create, before anything
        // exists, instead of a shim that cannot start.
        let config = self.cfg.config.load(options)?;
        let sandbox_id = pod::sandbox_id(container_id, Some(spec));
        carapace_runtime::id::validate_id(&sandbox_id).map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", pod::SANDBOX_ID)))?;
        let key = format!("{}-{sandbox_id}", self.cfg.namespace);
        let dir = self.cfg.state_root.join(carapace_runtime::state::dir_name(&key));
        if dir.exists() {
            // Left by a shim that died: its VMM and mounts died with it.
            share::remove_sandbox_dir(&dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| ShimError::Internal(format!("{}: {e}", dir.display())))?;
        let _ = std::fs::write(dir.join("shim.pid"), std::process::id().to_string());
        let spec = SandboxSpec { id: &sandbox_id, dir: &dir, spec, bundle_dir: &bundle.dir, config: &config };
        let sb = match core::Sandbox::boot(self.launcher.as_ref(), spec) {
            Ok(sb) => Arc::new(Sandbox(sb)),
            Err(e) => {
                share::remove_sandbox_dir(&dir);
                return Err(e.into());
            }
        };
        tracing::info!(config = ?config.source, "sandbox booted");
        *slot = Some(sb.clone());
        Ok((sb, true))
    }

    fn create_container(
        &self,
        sb: &Sandbox,
        req: &api::CreateTaskRequest,
        bundle: &Bundle,
        mounted: Option<PathBuf>,
    ) -> Result<Arc<Container>, ShimError> {
        let prepared = sb.prepare_container(&req.id, bundle, sb.vmm_pid())?;
        let undo = || sb.remove_binds(&prepared.view.binds);
        let stdio = StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal };
        let pending = io::bind(sb.vsock_uds(), &stdio).inspect_err(|_| undo())?;
        let streams = pending.streams();
        let mut relay = pending.start();
        let pid = match sb.create_container(&prepared, streams) {
            Ok(pid) => pid,
            Err(e) => {
                relay.cancel();
                undo();
                return Err(e.into());
            }
        };
        let init = Arc::new(Process::new(&req.id, "", stdio, Vec::new()));
        init.set_guest(pid, relay, Status::Created);
        Ok(Arc::new(
            Container::new(&req.id, bundle.dir.clone(), req.rootfs.clone(), mounted, prepared.view.binds, init).with_spec(&bundle.spec),
        ))
    }

    /// Waits for `p` in a thread: its exit is recorded (waking Wait) and
    /// published once its output has been delivered.
    fn spawn_waiter(self: &Arc<Self>, sb: &Arc<Sandbox>, c: &Arc<Container>, p: &Arc<Process>) {
        let (inner, sb, p) = (self.clone(), sb.clone(), p.clone());
        let container_id = c.id.clone();
        let spawned = std::thread::Builder::new().name("wait".into()).spawn(move || {
            let (status, at, oom) = match sb.container(&p.container_id).wait(&p.exec_id) {
                Ok(w) => (u32::try_from(w.exit_code).unwrap_or(LOST), time_from_nanos(w.exited_at_unix_nano), w.oom_killed),
                Err(e) => {
                    tracing::warn!(container = %container_id, exec_id = %p.exec_id, error = %e, "WaitProcess failed; reporting the process lost");
                    (LOST, SystemTime::now(), false)
                }
            };
            p.finish_output(OUTPUT_GRACE);
            if oom {
                inner.publish(topics::TASK_OOM_EVENT_TOPIC, TaskOOM { container_id: container_id.clone(), ..Default::default() });
            }
            // Start publishes TaskStart/TaskExecStarted under this lock:
            // the exit comes after it.
            let _order = lock(&inner.containers);
            if !p.set_exited(Exit { status, at }) {
                return;
            }
            drop(_order);
            tracing::info!(container = %container_id, exec_id = %p.exec_id, status, oom, "process exited");
            inner.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                TaskExit {
                    container_id,
                    id: p.event_id().to_string(),
                    pid: sb.vmm_pid(),
                    exit_status: status,
                    exited_at: Some(events::timestamp(at)).into(),
                    ..Default::default()
                },
            );
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a waiter thread");
        }
    }

    // ------------------------------------------------------------ start

    fn start(self: &Arc<Self>, req: &api::StartRequest) -> Result<api::StartResponse, ShimError> {
        let e = self.get(&req.id)?;
        let p = e.c.process(&req.exec_id)?;
        if p.status() != Status::Created {
            return Err(ShimError::FailedPrecondition(format!("process {} is not in the created state", p.event_id())));
        }
        let pid = e.sb.vmm_pid();
        if req.exec_id.is_empty() {
            if let Err(err) = e.sb.container(&req.id).start() {
                self.init_start_failed(&e);
                return Err(err.into());
            }
            {
                let _order = lock(&self.containers);
                p.set_running();
                self.publish(topics::TASK_START_EVENT_TOPIC, TaskStart { container_id: req.id.clone(), pid, ..Default::default() });
            }
            let hooks = e.c.hooks.poststart().as_deref().unwrap_or(&[]);
            hooks::run_warn("poststart", hooks, &e.c.hook_state("running", pid));
        } else {
            let started = (|| {
                if e.c.init.status() != Status::Running {
                    return Err(ShimError::FailedPrecondition(format!("container {} is not running", req.id)));
                }
                let pending = io::bind(e.sb.vsock_uds(), &p.stdio)?;
                let streams = pending.streams();
                let mut relay = pending.start();
                match e.sb.container(&req.id).exec(&req.exec_id, p.spec_json.clone(), p.stdio.terminal, streams) {
                    Ok(guest_pid) => Ok((guest_pid, relay)),
                    Err(err) => {
                        relay.cancel();
                        Err(ShimError::from(err))
                    }
                }
            })();
            let (guest_pid, relay) = match started {
                Ok(x) => x,
                Err(err) => {
                    // Never ran: its waiters (containerd calls Wait before
                    // Start) get an exit now, and Kill and Delete find it
                    // stopped. No TaskExit, as there was no process, which
                    // is what containerd's runc shim does.
                    p.abandon(NOT_RUN);
                    tracing::warn!(exec_id = %req.exec_id, error = %err, "exec did not start; reported exited with {NOT_RUN}");
                    return Err(err);
                }
            };
            let _order = lock(&self.containers);
            p.set_guest(guest_pid, relay, Status::Running);
            self.spawn_waiter(&e.sb, &e.c, &p);
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                TaskExecStarted { container_id: req.id.clone(), exec_id: req.exec_id.clone(), pid, ..Default::default() },
            );
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    /// StartContainer failed: the init is reported exited (waiters return,
    /// TaskExit goes out as for an init that died, as with runc) and
    /// whatever the guest still holds of it is killed; Delete removes it.
    fn init_start_failed(&self, e: &Entry) {
        if let Err(err) = e.sb.container(&e.c.id).signal("", 9, true) {
            tracing::debug!(error = %err, "killing the container that did not start");
        }
        let order = lock(&self.containers);
        let at = SystemTime::now();
        if !e.c.init.set_exited(Exit { status: NOT_RUN, at }) {
            return;
        }
        drop(order);
        tracing::warn!(container = %e.c.id, "the container did not start; reported exited with {NOT_RUN}");
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            TaskExit {
                container_id: e.c.id.clone(),
                id: e.c.id.clone(),
                pid: e.sb.vmm_pid(),
                exit_status: NOT_RUN,
                exited_at: Some(events::timestamp(at)).into(),
                ..Default::default()
            },
        );
    }

    // ------------------------------------------------------------ delete

    fn delete(self: &Arc<Self>, req: &api::DeleteRequest) -> Result<api::DeleteResponse, ShimError> {
        let e = self.get(&req.id)?;
        let pid = e.sb.vmm_pid();
        let response = |exit: Option<Exit>| {
            let exit = exit.unwrap_or(Exit { status: 0, at: SystemTime::now() });
            api::DeleteResponse { pid, exit_status: exit.status, exited_at: Some(events::timestamp(exit.at)).into(), ..Default::default() }
        };
        if !req.exec_id.is_empty() {
            let p = e.c.process(&req.exec_id)?;
            if p.status() == Status::Running {
                return Err(ShimError::FailedPrecondition(format!("process {} is running", req.exec_id)));
            }
            e.c.remove_exec(&req.exec_id);
            // One added but never started: its waiters return.
            p.abandon(NOT_RUN);
            p.cancel_io();
            return Ok(response(p.exit()));
        }
        let init = &e.c.init;
        if init.status() == Status::Running {
            return Err(ShimError::FailedPrecondition(format!("container {} is running; kill it first", req.id)));
        }
        if let Err(err) = e.sb.container(&req.id).remove(true) {
            // Gone already, or the VM is: nothing left in the guest.
            tracing::warn!(error = %err, "RemoveContainer");
        }
        hooks::run_warn("poststop", e.c.hooks.poststop().as_deref().unwrap_or(&[]), &e.c.hook_state("stopped", 0));
        let exit = match init.exit() {
            Some(x) => Some(x),
            None => init.wait_timeout(REMOVE_WAIT).or_else(|| {
                let x = Exit { status: 128 + 9, at: SystemTime::now() };
                init.set_exited(x);
                Some(x)
            }),
        };
        for p in e.c.all_execs() {
            // Gone with the container (or never started): waiters return.
            p.abandon(128 + 9);
            p.cancel_io();
        }
        init.cancel_io();
        e.sb.remove_binds(&e.c.binds);
        if let Some(t) = &e.c.mounted_rootfs {
            share::unmount(t);
        }
        lock(&self.containers).remove(&req.id);
        let resp = response(exit);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                ..Default::default()
            },
        );
        self.stop_if_idle();
        Ok(resp)
    }

    /// Stops the VM once no container is left in it.
    fn stop_if_idle(&self) {
        let mut slot = lock(&self.sandbox);
        if !lock(&self.containers).is_empty() {
            return;
        }
        if let Some(sb) = slot.take() {
            sb.stop();
        }
    }

    // ------------------------------------------------------------ the rest

    fn state(&self, req: &api::StateRequest) -> Result<api::StateResponse, ShimError> {
        let e = self.get(&req.id)?;
        let p = e.c.process(&req.exec_id)?;
        let status = match p.status() {
            Status::Created => api::Status::CREATED,
            Status::Running if e.c.paused() => api::Status::PAUSED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: e.c.bundle.display().to_string(),
            pid: e.sb.vmm_pid(),
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |x| x.status),
            exited_at: exit.map(|x| events::timestamp(x.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn kill(&self, req: &api::KillRequest) -> Result<(), ShimError> {
        let e = self.get(&req.id)?;
        let p = e.c.process(&req.exec_id)?;
        match p.status() {
            Status::Created if !req.exec_id.is_empty() => {
                return Err(ShimError::NotFound(format!("process {} has not been started", req.exec_id)))
            }
            Status::Stopped if !req.all => return Err(ShimError::NotFound(format!("process {} already finished", p.event_id()))),
            _ => {}
        }
        Ok(e.sb.container(&req.id).signal(&req.exec_id, req.signal, req.all)?)
    }

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<(), ShimError> {
        let e = self.get(&req.id)?;
        carapace_runtime::id::validate_id(&req.exec_id).map_err(|err| ShimError::InvalidArgument(format!("exec id: {err}")))?;
        if e.c.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!("container {} is not running", req.id)));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|s| s.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::InvalidArgument("exec: no process spec".into()))?;
        let stdio = StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal };
        e.c.add_exec(Arc::new(Process::new(&req.id, &req.exec_id, stdio, spec)))?;
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() },
        );
        Ok(())
    }

    fn resize_pty(&self, req: &api::ResizePtyRequest) -> Result<(), ShimError> {
        let e = self.get(&req.id)?;
        Ok(e.sb.container(&req.id).resize(&req.exec_id, req.height, req.width)?)
    }

    fn close_io(&self, req: &api::CloseIORequest) -> Result<(), ShimError> {
        let e = self.get(&req.id)?;
        let p = e.c.process(&req.exec_id)?;
        if !req.stdin {
            return Ok(());
        }
        p.close_stdin(STDIN_GRACE);
        // Without a terminal the closed stream is the EOF; a terminal gets
        // its EOF character from the agent.
        if p.stdio.terminal && p.status() == Status::Running {
            e.sb.container(&req.id).close_stdin(&req.exec_id)?;
        }
        Ok(())
    }

    fn pids(&self, req: &api::PidsRequest) -> Result<api::PidsResponse, ShimError> {
        let e = self.get(&req.id)?;
        let pids = e.sb.container(&req.id).ps()?;
        let processes = pids.into_iter().map(|pid| ProcessInfo { pid, ..Default::default() }).collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    fn pause(&self, req: &api::PauseRequest, pause: bool) -> Result<(), ShimError> {
        let e = self.get(&req.id)?;
        e.sb.container(&req.id).set_paused(pause)?;
        e.c.set_paused(pause);
        if pause {
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, TaskPaused { container_id: req.id.clone(), ..Default::default() });
        } else {
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, TaskResumed { container_id: req.id.clone(), ..Default::default() });
        }
        Ok(())
    }

    fn update(&self, req: &api::UpdateTaskRequest) -> Result<(), ShimError> {
        let e = self.get(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|r| r.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::InvalidArgument("update: no resources".into()))?;
        Ok(e.sb.container(&req.id).update(resources)?)
    }

    fn wait(&self, req: &api::WaitRequest) -> Result<api::WaitResponse, ShimError> {
        let e = self.get(&req.id)?;
        let exit = e.c.process(&req.exec_id)?.wait();
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: Some(events::timestamp(exit.at)).into(), ..Default::default() })
    }

    fn stats(&self, req: &api::StatsRequest) -> Result<api::StatsResponse, ShimError> {
        let e = self.get(&req.id)?;
        let s = e.sb.container(&req.id).stats()?;
        let any = stats::to_any(&stats::metrics(&s)).map_err(|err| ShimError::Internal(err.to_string()))?;
        Ok(api::StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    fn connect(&self) -> api::ConnectResponse {
        api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: lock(&self.sandbox).as_ref().map_or(0, |sb| sb.vmm_pid()),
            version: format!("carapace {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
    }

    fn shutdown(&self, req: &api::ShutdownRequest) {
        if !req.now && !lock(&self.containers).is_empty() {
            return;
        }
        if let Some(sb) = lock(&self.sandbox).take() {
            sb.stop();
        }
        // A Wait still blocked would hold its ttrpc handler, and the server
        // waits for its handlers before the shim can exit: every process
        // left is reported lost, which returns its waiters.
        let left: Vec<Arc<Process>> =
            lock(&self.containers).values().flat_map(|e| std::iter::once(e.c.init.clone()).chain(e.c.all_execs())).collect();
        for p in left {
            if p.abandon(LOST) {
                tracing::warn!(container = %p.container_id, exec_id = %p.exec_id, "shutting down with the process unfinished; reported lost");
            }
        }
        tracing::info!("shutting down");
        let exit = self.exit.clone();
        // Let the answer go out first.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            exit.signal();
        });
    }
}

/// Logs a failed call and turns it into a ttrpc status.
fn answer<T>(call: &'static str, r: Result<T, ShimError>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(call, error = %Chain(&e), "call failed");
        e.into()
    })
}

fn empty(r: Result<(), ShimError>) -> Result<Empty, ShimError> {
    r.map(|()| Empty::new())
}

impl containerd_shim::Task for TaskService {
    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> ttrpc::Result<api::StateResponse> {
        let _s = tracing::trace_span!("state", id = %req.id, exec_id = %req.exec_id).entered();
        answer("State", self.inner.state(&req))
    }

    fn create(&self, _: &TtrpcContext, req: api::CreateTaskRequest) -> ttrpc::Result<api::CreateTaskResponse> {
        let _s = tracing::info_span!("create", id = %req.id).entered();
        answer("Create", self.inner.create(&req))
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> ttrpc::Result<api::StartResponse> {
        let _s = tracing::info_span!("start", id = %req.id, exec_id = %req.exec_id).entered();
        answer("Start", self.inner.start(&req))
    }

    fn delete(&self, _: &TtrpcContext, req: api::DeleteRequest) -> ttrpc::Result<api::DeleteResponse> {
        let _s = tracing::info_span!("delete", id = %req.id, exec_id = %req.exec_id).entered();
        answer("Delete", self.inner.delete(&req))
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        let _s = tracing::debug_span!("pids", id = %req.id).entered();
        answer("Pids", self.inner.pids(&req))
    }

    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::info_span!("pause", id = %req.id).entered();
        answer("Pause", empty(self.inner.pause(&req, true)))
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::info_span!("resume", id = %req.id).entered();
        let as_pause = api::PauseRequest { id: req.id.clone(), ..Default::default() };
        answer("Resume", empty(self.inner.pause(&as_pause, false)))
    }

    fn checkpoint(&self, _: &TtrpcContext, _: api::CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        answer("Checkpoint", Err(ShimError::Unimplemented("checkpoint is not supported".into())))
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::info_span!("kill", id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all).entered();
        answer("Kill", empty(self.inner.kill(&req)))
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::info_span!("exec", id = %req.id, exec_id = %req.exec_id).entered();
        answer("Exec", empty(self.inner.exec(&req)))
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::debug_span!("resize_pty", id = %req.id, exec_id = %req.exec_id).entered();
        answer("ResizePty", empty(self.inner.resize_pty(&req)))
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        let _s = tracing::debug_span!("close_io", id = %req.id, exec_id = %req.exec_id).entered();
        answer("CloseIO", empty(self.inner.close_io(&req)))
    }

    fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::info_span!("update", id = %req.id).entered();
        answer("Update", empty(self.inner.update(&req)))
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        let _s = tracing::debug_span!("wait", id = %req.id, exec_id = %req.exec_id).entered();
        answer("Wait", self.inner.wait(&req))
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> ttrpc::Result<api::StatsResponse> {
        let _s = tracing::debug_span!("stats", id = %req.id).entered();
        answer("Stats", self.inner.stats(&req))
    }

    fn connect(&self, _: &TtrpcContext, _: api::ConnectRequest) -> ttrpc::Result<api::ConnectResponse> {
        Ok(self.inner.connect())
    }

    fn shutdown(&self, _: &TtrpcContext, req: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        let _s = tracing::info_span!("shutdown", now = req.now).entered();
        self.inner.shutdown(&req);
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests;
