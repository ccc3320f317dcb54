//! The host process that stands in for a container (`carapace _monitor`)
//! or an exec'd process (`carapace _exec`, and `exec` in the foreground).
//!
//! The container monitor is started by `create` with the caller's stdio. It
//! moves into a private mount namespace (the share's bind mounts die with
//! it), boots the VM, creates the sandbox and the container, relays stdio,
//! reports to `create` over a pipe, and then waits: when the container
//! exits it records `stopped` with the exit code, shuts the VM down and
//! exits with the container's status, as runc's init would for a shim
//! that reaps it. SIGTERM (from `delete`) kills the container first.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::{agent, AgentClient};
use nix::sys::signal::{SigSet, Signal};
use oci_spec::runtime::Process;

use crate::assets::GuestAssets;
use crate::bundle::Bundle;
use crate::config::{self, Config};
use crate::container::{agent_error, ContainerError, Ready, Runtime};
use crate::sandbox;
use crate::state::{ContainerRecord, Status};
use crate::stdio::{self, ConsolePty, HostIo, RawMode, Relay, StdioPorts};
use crate::network::{self, PodNetwork};
use crate::vm::{Vm, VmOptions};
use crate::{hooks, proc};

/// How long a guest may take to boot to its agent (kvm_pvm hosts emulate
/// the guest kernel: tens of seconds).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Exit status reported when the VM died under a process.
pub const LOST: i32 = 255;

/// Signals the monitor and foreground commands handle themselves.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2] {
        set.add(s);
    }
    set
}

enum Event {
    Exited(Result<agent::WaitProcessResponse, String>),
    Signal(Signal),
}

/// Set once the process is created and its events are read; before that,
/// SIGTERM or SIGINT ends the process at once (the VMM dies with it, being
/// tied to us by PDEATHSIG, and the share's mounts with our namespace).
static SETTLED: AtomicBool = AtomicBool::new(false);

/// Blocks the handled signals in this thread (and the threads it starts)
/// and delivers them as events. Call before starting any other thread.
fn signal_events(tx: Sender<Event>) {
    let set = handled_signals();
    let _ = set.thread_block();
    std::thread::spawn(move || loop {
        match set.wait() {
            Ok(Signal::SIGTERM | Signal::SIGINT) if !SETTLED.load(Ordering::SeqCst) => {
                tracing::warn!("terminated while setting up");
                std::process::exit(143);
            }
            Ok(sig) => {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
}

/// Waits for process `exec_id` of container `id` in a thread.
fn wait_events(agent: &AgentClient, id: &str, exec_id: &str, tx: Sender<Event>) {
    let agent = agent.clone();
    let mut req = agent::WaitProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    std::thread::spawn(move || {
        // No timeout: a container may run for months.
        let r = agent.wait_process(ttrpc::context::Context::default(), &req);
        let _ = tx.send(Event::Exited(r.map_err(|e| agent_error("WaitProcess", e).to_string())));
    });
}

/// The host side of one guest process's stdio while it runs.
struct Session {
    relay: Relay,
    winsize: Option<Arc<AtomicBool>>,
    _raw: Option<RawMode>,
    _pty: Option<ConsolePty>,
}

/// Stdio being prepared: ports bound, host files chosen.
struct PendingIo {
    ports: StdioPorts,
    io: HostIo,
    raw: Option<RawMode>,
    pty: Option<ConsolePty>,
    tty: Option<File>,
}

fn prepare_io(uds: &Path, terminal: bool, console_socket: Option<&Path>) -> Result<PendingIo, ContainerError> {
    let (io, raw, pty, tty) = match console_socket {
        Some(sock) if terminal => {
            let pty = ConsolePty::send_to(sock)?;
            let tty = pty.slave.try_clone().ok();
            (pty.host_io()?, None, Some(pty), tty)
        }
        _ => {
            let io = HostIo::inherited(terminal)?;
            let (raw, tty) = match &io {
                HostIo::Terminal { input, .. } => (RawMode::enter(input), input.try_clone().ok()),
                HostIo::Pipes { .. } => (None, None),
            };
            (io, raw, None, tty)
        }
    };
    let ports = StdioPorts::bind(uds, &io)?;
    Ok(PendingIo { ports, io, raw, pty, tty })
}

impl PendingIo {
    fn streams(&self) -> agent::StdioStreams {
        self.ports.streams()
    }

    /// Starts relaying, and for a terminal, following its window size.
    fn start(self, agent: &AgentClient, id: &str, exec_id: &str) -> Session {
        let relay = self.ports.relay(self.io);
        let winsize = self.tty.map(|tty| {
            let agent = agent.clone();
            let (id, exec_id) = (id.to_string(), exec_id.to_string());
            stdio::watch_winsize(tty, move |rows, cols| {
                let mut req = agent::ResizeTtyRequest::new();
                req.container_id = id.clone();
                req.exec_id = exec_id.clone();
                req.rows = rows.into();
                req.cols = cols.into();
                match agent.resize_tty(crate::agent::ctx(), &req) {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::debug!(error = %e, "ResizeTty");
                        false
                    }
                }
            })
        });
        Session { relay, winsize, _raw: self.raw, _pty: self.pty }
    }
}

impl Session {
    fn finish(self, timeout: Duration) {
        if let Some(stop) = &self.winsize {
            stop.store(true, Ordering::Relaxed);
        }
        self.relay.finish(timeout);
    }
}

/// The shell-style status of a finished wait.
fn exit_status(r: &Result<agent::WaitProcessResponse, String>) -> i32 {
    match r {
        Ok(w) => w.exit_code,
        Err(_) => LOST,
    }
}

/// Writes the one-line report `create` waits for.
fn report(ready: &mut Option<File>, r: &Ready) -> bool {
    let Some(mut f) = ready.take() else { return true };
    let line = serde_json::to_string(r).unwrap_or_default();
    f.write_all(line.as_bytes()).and_then(|()| f.write_all(b"\n")).is_ok()
}

/// Takes ownership of the inherited `--ready-fd`.
fn ready_file(fd: Option<i32>) -> Option<File> {
    // SAFETY: the fd was created for us by our parent and passed by number;
    // nothing else in this process owns it.
    let file = fd.filter(|fd| *fd > 2).map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }))?;
    // Children (the VMM) must not hold it open: `create` waits for its end.
    let _ = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    Some(file)
}

/// Points our own fds 0-2 at /dev/null once the container has its copies,
/// so that nothing we print lands in the container's output.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// `carapace _monitor`: see the module docs. Returns the exit status.
pub fn container(rt: &Runtime, id: &str, bundle_dir: &Path, console_socket: Option<&Path>, ready_fd: Option<i32>) -> i32 {
    let mut ready = ready_file(ready_fd);
    let _ = nix::unistd::setsid();
    let (tx, rx) = channel();
    signal_events(tx.clone());
    if let Err(e) = sandbox::private_mount_namespace() {
        report(&mut ready, &failed(&e.to_string()));
        return 1;
    }
    let started = match boot_and_create(rt, id, bundle_dir, console_socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "create failed");
            report(&mut ready, &failed(&e.to_string()));
            return 1;
        }
    };
    let Started { mut vm, agent, session, ready: r, network } = started;
    detach_stdio();
    if !report(&mut ready, &r) {
        // `create` is gone before it saw the container: nobody will start
        // or delete it through us, so do not leave a VM running.
        tracing::warn!("create went away; stopping the sandbox");
        stop_vm(&mut vm, &agent);
        drop(network);
        return 1;
    }
    wait_events(&agent, id, "", tx.clone());
    SETTLED.store(true, Ordering::SeqCst);
    let (result, terminated) = wait_exit(&rx, &agent, id, "", &tx);
    session.finish(if terminated { Duration::from_secs(1) } else { Duration::from_secs(5) });
    let code = exit_status(&result);
    if !terminated {
        record_stopped(rt, id, &result, &rx);
    }
    stop_vm(&mut vm, &agent);
    drop(network);
    code
}

fn failed(msg: &str) -> Ready {
    Ready { vmm_pid: 0, vmm_start_time: 0, guest_pid: 0, error: Some(msg.to_string()) }
}

struct Started {
    vm: Vm,
    agent: AgentClient,
    session: Session,
    ready: Ready,
    /// Dropped after the VM stops: removes the redirects to its taps.
    network: Option<PodNetwork>,
}

/// Everything `create` does before it returns: the share, the VM, the
/// sandbox, createRuntime hooks, the container with its stdio.
fn boot_and_create(rt: &Runtime, id: &str, bundle_dir: &Path, console_socket: Option<&Path>) -> Result<Started, ContainerError> {
    let bundle = Bundle::load(bundle_dir)?;
    let config = config::load(None).map_err(|e| ContainerError::Create(e.to_string()))?;
    let dir = rt.store.dir(id)?;
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).map_err(|source| ContainerError::Io { path: shared.clone(), source })?;
    let view = sandbox::guest_view(id, &bundle.spec, &bundle.dir, &bundle.rootfs);
    sandbox::apply_binds(&shared, &view.binds).map_err(|e| ContainerError::Create(e.to_string()))?;

    let assets = GuestAssets::locate_with(&config).map_err(|e| ContainerError::Create(e.to_string()))?;
    let mut opts = vm_options_with(&bundle.spec, &config);
    opts.fs.push(sandbox::share_with(&shared, &config));
    let mut network = match network::netns_path(&bundle.spec) {
        Some(path) => Some(network::attach(&path).map_err(|e| ContainerError::Create(e.to_string()))?),
        None => None,
    };
    if let Some(n) = network.as_mut() {
        opts.net = n.take_taps();
    }
    let mut vm = Vm::start_owned(&assets, &dir, &opts).map_err(|e| ContainerError::Create(e.to_string()))?;
    // Only the VMM holds the taps from here on.
    opts.net.clear();
    let conn = vm.wait_for_agent(config.boot_timeout()).map_err(|e| ContainerError::Create(e.to_string()))?;
    let agent = AgentClient::new(conn);

    let mut req = sandbox::create_sandbox_request(id, bundle.spec.hostname().as_deref());
    sandbox::dns_files(&bundle.spec, &bundle.dir, &mut req);
    if let Some(n) = &network {
        n.describe(&mut req);
    }
    agent.create_sandbox(crate::agent::ctx(), &req).map_err(|e| agent_error("CreateSandbox", e))?;

    let vmm_pid = vm.pid();
    let mut record = rt.store.load(id)?;
    record.pid = vmm_pid;
    let hooks = bundle.spec.hooks().clone().unwrap_or_default();
    let state = {
        let mut r = record.clone();
        r.status = Status::Creating;
        r.oci_state()
    };
    hooks::run("prestart", hooks.prestart().as_deref().unwrap_or(&[]), &state)?;
    hooks::run("createRuntime", hooks.create_runtime().as_deref().unwrap_or(&[]), &state)?;

    let terminal = bundle.spec.process().as_ref().is_some_and(|p| p.terminal() == Some(true));
    let pending = prepare_io(&Vm::vsock_path(&dir), terminal, console_socket)?;
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(&view.spec).map_err(|e| ContainerError::Create(e.to_string()))?;
    req.rootfs_path = view.rootfs.clone();
    req.stdio = Some(pending.streams()).into();
    let session = pending.start(&agent, id, "");
    let created = agent.create_container(crate::agent::ctx(), &req).map_err(|e| agent_error("CreateContainer", e))?;
    let ready = Ready {
        vmm_pid,
        vmm_start_time: proc::start_time(vmm_pid).unwrap_or(0),
        guest_pid: created.pid,
        error: None,
    };
    Ok(Started { vm, agent, session, ready, network })
}

/// VM size with the built-in defaults (no config file); see [`vm_options_with`].
pub fn vm_options(spec: &oci_spec::runtime::Spec) -> VmOptions {
    vm_options_with(spec, &Config::default())
}

/// VM size: annotations `io.carapace.vcpus` and `io.carapace.memory_mib`
/// win; otherwise the container's CPU quota (rounded up) and memory limit
/// plus the config's `memory_overhead_mib` for the guest, at least the
/// config's `default_vcpus` and `default_memory_mib` (1 and 256 unless
/// configured), which a spec that asks for nothing gets. Also sets the
/// config's kernel parameters.
pub fn vm_options_with(spec: &oci_spec::runtime::Spec, config: &Config) -> VmOptions {
    let mut opts = VmOptions {
        vcpus: config.default_vcpus,
        mem_mib: config.default_memory_mib,
        extra_cmdline: config.kernel_params.clone(),
        ..VmOptions::default()
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    if let Some(cpu) = resources.as_ref().and_then(|r| r.cpu().clone()) {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                let n = u64::try_from(quota).unwrap_or(0).div_ceil(period);
                opts.vcpus = u8::try_from(n.clamp(1, 16)).unwrap_or(1).max(config.default_vcpus);
            }
        }
    }
    if let Some(limit) = resources.as_ref().and_then(|r| *r.memory()).and_then(|m| m.limit()) {
        if limit > 0 {
            let mib = u32::try_from(limit / (1024 * 1024)).unwrap_or(u32::MAX).saturating_add(config.memory_overhead_mib);
            opts.mem_mib = mib.min(16 * 1024).max(config.default_memory_mib);
        }
    }
    let annotations = spec.annotations().clone().unwrap_or_default();
    // Bundle::load refused values outside these ranges.
    use crate::bundle::{MEMORY_MIB_ANNOTATION, MEMORY_MIB_RANGE, VCPUS_ANNOTATION, VCPUS_RANGE};
    if let Some(n) = annotations.get(VCPUS_ANNOTATION).and_then(|v| v.parse::<u32>().ok()) {
        let n = n.clamp(*VCPUS_RANGE.start(), *VCPUS_RANGE.end());
        opts.vcpus = u8::try_from(n).unwrap_or(1);
    }
    if let Some(m) = annotations.get(MEMORY_MIB_ANNOTATION).and_then(|v| v.parse::<u32>().ok()) {
        opts.mem_mib = m.clamp(*MEMORY_MIB_RANGE.start(), *MEMORY_MIB_RANGE.end());
    }
    opts
}

/// Waits for the process to exit. SIGTERM/SIGINT kill it (and say so in
/// the second value); other handled signals are forwarded to it.
fn wait_exit(
    rx: &Receiver<Event>,
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    tx: &Sender<Event>,
) -> (Result<agent::WaitProcessResponse, String>, bool) {
    let mut terminated = false;
    loop {
        match rx.recv() {
            Ok(Event::Exited(r)) => return (r, terminated),
            Ok(Event::Signal(sig)) => {
                let terminate = exec_id.is_empty() && matches!(sig, Signal::SIGTERM | Signal::SIGINT);
                let send = if terminate { Signal::SIGKILL } else { sig };
                let mut req = agent::SignalProcessRequest::new();
                req.container_id = id.into();
                req.exec_id = exec_id.into();
                req.signal = send as u32;
                req.all = terminate;
                if let Err(e) = agent.signal_process(crate::agent::ctx(), &req) {
                    tracing::warn!(error = %e, "forwarding {sig}");
                }
                if terminate && !terminated {
                    terminated = true;
                    // A guest that does not answer must not hold `delete`.
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(15));
                        let _ = tx.send(Event::Exited(Err("no exit within 15 s of SIGKILL".into())));
                    });
                }
            }
            Err(_) => return (Err("event channel closed".into()), terminated),
        }
    }
}

/// Records the container as stopped, under the id's lock. A `delete` that
/// holds the lock and signals us wins: then there is nothing to record.
fn record_stopped(rt: &Runtime, id: &str, result: &Result<agent::WaitProcessResponse, String>, rx: &Receiver<Event>) {
    loop {
        match rt.store.try_lock(id) {
            Ok(Some(_lock)) => {
                if let Ok(mut record) = rt.store.load(id) {
                    mark_stopped(&mut record, result);
                    if let Err(e) = rt.store.save(&record) {
                        tracing::warn!(error = %e, "cannot record the exit");
                    }
                }
                return;
            }
            Ok(None) => {}
            Err(_) => return,
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Signal(Signal::SIGTERM | Signal::SIGINT)) => return,
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn mark_stopped(record: &mut ContainerRecord, result: &Result<agent::WaitProcessResponse, String>) {
    record.status = Status::Stopped;
    record.exit_code = Some(exit_status(result));
    record.stop_reason = match result {
        Ok(w) if w.oom_killed => Some("OOM-killed".into()),
        Ok(w) if w.signal != 0 => Some(format!("killed by signal {}", w.signal)),
        Ok(_) => None,
        Err(e) => Some(format!("the VM stopped: {e}")),
    };
}

/// Asks the guest to shut down; kills the VMM if it does not exit soon.
fn stop_vm(vm: &mut Vm, agent: &AgentClient) {
    if crate::agent::shutdown_within(agent, Duration::from_secs(10)).is_ok() {
        if let Ok(Some(_)) = vm.wait_timeout(Duration::from_secs(20)) {
            return;
        }
    }
    vm.kill();
}

/// An exec'd process: its id, what to run, and where its stdio goes.
#[derive(Debug)]
pub struct ExecRequest<'a> {
    pub id: &'a str,
    pub process: Process,
    pub console_socket: Option<&'a Path>,
}

/// Runs a process in a running container and relays its stdio until it
/// exits; returns its status. With `ready_fd` (detached `_exec`), reports
/// the guest pid there first and detaches from the caller's session.
pub fn exec(rt: &Runtime, req: ExecRequest<'_>, ready_fd: Option<i32>) -> Result<i32, ContainerError> {
    let mut ready = ready_file(ready_fd);
    if ready.is_some() {
        let _ = nix::unistd::setsid();
    }
    let (tx, rx) = channel();
    signal_events(tx.clone());
    let started = (|| {
        let record = rt.state(req.id)?;
        if record.status == Status::Stopped {
            return Err(ContainerError::WrongState(format!("cannot exec in a stopped container {}", req.id)));
        }
        let agent = rt.agent(&record)?;
        let uds = Vm::vsock_path(&rt.store.dir(req.id)?);
        let terminal = req.process.terminal() == Some(true);
        let pending = prepare_io(&uds, terminal, req.console_socket)?;
        let exec_id = format!("exec-{}-{}", std::process::id(), nanos_now());
        let mut call = agent::ExecProcessRequest::new();
        call.container_id = req.id.into();
        call.exec_id = exec_id.clone();
        call.process_json = serde_json::to_vec(&req.process).map_err(|e| ContainerError::Create(e.to_string()))?;
        call.terminal = terminal;
        call.stdio = Some(pending.streams()).into();
        let session = pending.start(&agent, req.id, &exec_id);
        let resp = agent.exec_process(crate::agent::ctx(), &call).map_err(|e| agent_error("ExecProcess", e))?;
        Ok((agent, exec_id, session, resp.pid))
    })();
    let (agent, exec_id, session, pid) = match started {
        Ok(s) => s,
        Err(e) => {
            report(&mut ready, &failed(&e.to_string()));
            return Err(e);
        }
    };
    if ready.is_some() {
        report(&mut ready, &Ready { vmm_pid: 0, vmm_start_time: 0, guest_pid: pid, error: None });
        detach_stdio();
    }
    wait_events(&agent, req.id, &exec_id, tx.clone());
    SETTLED.store(true, Ordering::SeqCst);
    let (result, _) = wait_exit(&rx, &agent, req.id, &exec_id, &tx);
    session.finish(Duration::from_secs(5));
    Ok(exit_status(&result))
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Starts `carapace _exec` for `exec --detach`, waits for its report and
/// returns its pid (what the pid file gets: it exits with the process's
/// status).
pub fn spawn_detached_exec(
    rt: &Runtime,
    id: &str,
    process: &Process,
    console_socket: Option<&Path>,
) -> Result<u32, ContainerError> {
    let dir = rt.store.dir(id)?;
    let file = dir.join(format!("exec-{}.json", std::process::id()));
    let io = |source| ContainerError::Io { path: file.clone(), source };
    std::fs::write(&file, serde_json::to_vec(process).map_err(|e| ContainerError::Create(e.to_string()))?).map_err(io)?;
    let mut args: Vec<std::ffi::OsString> = vec!["--process-file".into(), file.clone().into()];
    if let Some(s) = console_socket {
        args.extend(["--console-socket".into(), s.into()]);
    }
    args.push(id.into());
    let spawned = rt.spawn_helper("_exec", args);
    let _ = std::fs::remove_file(&file);
    let (child, ready) = spawned?;
    let ready = crate::container::read_ready(ready)?;
    if let Some(e) = ready.error {
        return Err(ContainerError::Create(e));
    }
    Ok(child.id())
}

/// Reads and removes the process file of `_exec`.
pub fn read_process_file(path: &Path) -> Result<Process, ContainerError> {
    let text = std::fs::read(path).map_err(|source| ContainerError::Io { path: path.to_path_buf(), source })?;
    let _ = std::fs::remove_file(path);
    serde_json::from_slice(&text).map_err(|e| ContainerError::ProcessJson { path: path.to_path_buf(), msg: e.to_string() })
}
