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
//!
//! While the container runs the monitor also relays the CLI's agent calls
//! (`start`, `kill`, `exec`, `pause`, `ps`, ...) on a Unix socket in the
//! state directory ([`crate::control`]) over the agent connection it
//! already holds (a new connection to the agent costs a vsock handshake and
//! a ttrpc server thread in the guest, whose every system call is emulated
//! on a kvm_pvm host). `exec` and `_exec` are clients of it like the rest.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::agent;
use nix::sys::signal::{SigSet, Signal};
use oci_spec::runtime::Process;

use crate::bundle::Bundle;
use crate::config;
use crate::container::{ContainerError, Ready, Runtime};
use crate::control;
use crate::error::Chain;
use crate::guest::Guest;
use crate::launcher::MicroVmLauncher;
use crate::proc;
use crate::relay::{Relay, StdioPorts};
use crate::sandbox::{ContainerHandle, Sandbox, SandboxSpec};
use crate::share;
use crate::state::{ContainerRecord, Status};
use crate::stdio::{self, ConsolePty, HostIo, RawMode, StdioError};
use crate::vm::Vm;

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
fn wait_events(guest: &Arc<dyn Guest>, id: &str, exec_id: &str, tx: Sender<Event>) {
    let guest = guest.clone();
    let (id, exec_id) = (id.to_string(), exec_id.to_string());
    std::thread::spawn(move || {
        let r = ContainerHandle::new(guest.as_ref(), &id).wait(&exec_id);
        let _ = tx.send(Event::Exited(r.map_err(|e| e.to_string())));
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
    let ports = StdioPorts::bind(uds, io.into()).map_err(StdioError::from)?;
    Ok(PendingIo { ports, raw, pty, tty })
}

impl PendingIo {
    fn streams(&self) -> agent::StdioStreams {
        self.ports.streams()
    }

    /// Starts relaying, and for a terminal, following its window size.
    fn start(self, guest: &Arc<dyn Guest>, id: &str, exec_id: &str) -> Session {
        let relay = self.ports.start();
        let winsize = self.tty.map(|tty| {
            let guest = guest.clone();
            let (id, exec_id) = (id.to_string(), exec_id.to_string());
            stdio::watch_winsize(tty, move |rows, cols| {
                match ContainerHandle::new(guest.as_ref(), &id).resize(&exec_id, rows.into(), cols.into()) {
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
    fn finish(mut self, timeout: Duration) {
        if let Some(stop) = &self.winsize {
            stop.store(true, Ordering::Relaxed);
        }
        self.relay.finish_output(timeout);
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
    if let Err(e) = share::private_mount_namespace() {
        report(&mut ready, &failed(&e));
        return 1;
    }
    let started = match boot_and_create(rt, id, bundle_dir, console_socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %Chain(&e), "create failed");
            report(&mut ready, &failed(&e));
            return 1;
        }
    };
    let Started { sandbox, session, ready: r } = started;
    let guest = sandbox.guest().clone();
    // Bound before `create` returns, so that `start` finds it.
    match rt.store.dir(id).map(|d| control::path(&d)) {
        Ok(path) => control::serve(&path, &guest, id),
        Err(e) => tracing::warn!(error = %e, "no control socket; start connects to the agent itself"),
    }
    detach_stdio();
    if !report(&mut ready, &r) {
        // `create` is gone before it saw the container: nobody will start
        // or delete it through us, so do not leave a VM running.
        tracing::warn!("create went away; stopping the sandbox");
        sandbox.stop();
        return 1;
    }
    wait_events(&guest, id, "", tx.clone());
    SETTLED.store(true, Ordering::SeqCst);
    let (result, terminated) = wait_exit(&rx, guest.as_ref(), id, "", &tx);
    let code = exit_status(&result);
    // The exit is recorded first: output still in flight is drained after.
    if !terminated {
        record_stopped(rt, id, &result, &rx);
        if let Ok(w) = &result {
            // The guest clock was set from ours at CreateSandbox: a rough figure.
            let after = i128::try_from(nanos_now()).unwrap_or(i128::MAX) - i128::from(w.exited_at_unix_nano);
            tracing::debug!(after_exit_us = after / 1000, "exit recorded");
        }
    }
    session.finish(if terminated { Duration::from_secs(1) } else { Duration::from_secs(5) });
    sandbox.stop();
    code
}

/// The report of a failure: the error and its causes, as one line.
fn failed(e: &(dyn std::error::Error + 'static)) -> Ready {
    Ready { vmm_pid: 0, vmm_start_time: 0, guest_pid: 0, error: Some(Chain(e).to_string()) }
}

struct Started {
    sandbox: Sandbox,
    session: Session,
    ready: Ready,
}

/// Everything `create` does before it returns: the sandbox (share, VM,
/// network, CreateSandbox), the container's binds and createRuntime hooks,
/// the container with its stdio.
fn boot_and_create(rt: &Runtime, id: &str, bundle_dir: &Path, console_socket: Option<&Path>) -> Result<Started, ContainerError> {
    let bundle = Bundle::load(bundle_dir)?;
    let config = config::load(None)?;
    let dir = rt.store.dir(id)?;
    let spec = SandboxSpec { id, dir: &dir, spec: &bundle.spec, bundle_dir: &bundle.dir, config: &config };
    let sandbox = Sandbox::boot(&MicroVmLauncher, spec)?;
    let created = (|| {
        let prepared = sandbox.prepare_container(id, &bundle, std::process::id())?;
        let terminal = bundle.spec.process().as_ref().is_some_and(|p| p.terminal() == Some(true));
        let pending = prepare_io(sandbox.vsock_uds(), terminal, console_socket)?;
        let streams = pending.streams();
        let session = pending.start(sandbox.guest(), id, "");
        let guest_pid = sandbox.create_container(&prepared, streams)?;
        Ok::<_, ContainerError>((session, guest_pid))
    })();
    let (session, guest_pid) = match created {
        Ok(c) => c,
        Err(e) => {
            // The binds die with our mount namespace.
            sandbox.stop();
            return Err(e);
        }
    };
    let vmm_pid = sandbox.vmm_pid();
    let ready = Ready { vmm_pid, vmm_start_time: proc::start_time(vmm_pid).unwrap_or(0), guest_pid, error: None };
    Ok(Started { sandbox, session, ready })
}

/// Waits for the process to exit. SIGTERM/SIGINT kill it (and say so in
/// the second value); other handled signals are forwarded to it.
fn wait_exit(
    rx: &Receiver<Event>,
    guest: &dyn Guest,
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
                if let Err(e) = ContainerHandle::new(guest, id).signal(exec_id, send as u32, terminate) {
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
                        tracing::warn!(error = %Chain(&e), "cannot record the exit");
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
        // The monitor's agent connection (or our own): the ports are bound
        // on the VM's vsock socket either way.
        let guest = rt.guest(&record)?;
        let uds = Vm::vsock_path(&rt.store.dir(req.id)?);
        let terminal = req.process.terminal() == Some(true);
        let process_json = serde_json::to_vec(&req.process).map_err(ContainerError::EncodeProcess)?;
        let pending = prepare_io(&uds, terminal, req.console_socket)?;
        let exec_id = format!("exec-{}-{}", std::process::id(), nanos_now());
        let streams = pending.streams();
        let session = pending.start(&guest, req.id, &exec_id);
        let pid = ContainerHandle::new(guest.as_ref(), req.id).exec(&exec_id, process_json, terminal, streams)?;
        Ok((guest, exec_id, session, pid))
    })();
    let (guest, exec_id, session, pid) = match started {
        Ok(s) => s,
        Err(e) => {
            report(&mut ready, &failed(&e));
            return Err(e);
        }
    };
    if ready.is_some() {
        report(&mut ready, &Ready { vmm_pid: 0, vmm_start_time: 0, guest_pid: pid, error: None });
        detach_stdio();
    }
    wait_events(&guest, req.id, &exec_id, tx.clone());
    SETTLED.store(true, Ordering::SeqCst);
    let (result, _) = wait_exit(&rx, guest.as_ref(), req.id, &exec_id, &tx);
    session.finish(Duration::from_secs(5));
    Ok(exit_status(&result))
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Starts `carapace _exec` for `exec --detach`, waits for its report and
/// returns its pid (what the pid file gets: it exits with the process's
/// status).
pub fn spawn_detached_exec(rt: &Runtime, id: &str, process: &Process, console_socket: Option<&Path>) -> Result<u32, ContainerError> {
    let dir = rt.store.dir(id)?;
    let file = dir.join(format!("exec-{}.json", std::process::id()));
    let io = |source| ContainerError::Io { path: file.clone(), source };
    std::fs::write(&file, serde_json::to_vec(process).map_err(ContainerError::EncodeProcess)?).map_err(io)?;
    let mut args: Vec<std::ffi::OsString> = vec!["--process-file".into(), file.clone().into()];
    if let Some(s) = console_socket {
        args.extend(["--console-socket".into(), s.into()]);
    }
    args.push(id.into());
    // `_exec` reads and removes the file itself; it is removed here only
    // when `_exec` never got that far.
    let spawned = rt.spawn_helper("_exec", args);
    let ready = match spawned {
        Ok((child, ready)) => crate::container::read_ready(ready).map(|r| (child, r)),
        Err(e) => Err(e),
    };
    let (child, ready) = ready.inspect_err(|_| {
        let _ = std::fs::remove_file(&file);
    })?;
    if let Some(e) = ready.error {
        let _ = std::fs::remove_file(&file);
        return Err(ContainerError::Create(e));
    }
    Ok(child.id())
}

/// Reads and removes the process file of `_exec`.
pub fn read_process_file(path: &Path) -> Result<Process, ContainerError> {
    let text = std::fs::read(path).map_err(|source| ContainerError::Io { path: path.to_path_buf(), source })?;
    let _ = std::fs::remove_file(path);
    serde_json::from_slice(&text).map_err(|source| ContainerError::ProcessJson { path: path.to_path_buf(), source })
}
