//! Driving containers in a booted microVM over the agent API, for
//! end-to-end tests: stdio listeners on `<vsock uds>_<port>` (the agent
//! connects to them), create/start/wait/remove, and run-to-completion;
//! the guest console shown when a test fails.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use carapace_protocol::{agent, AgentClient};
use serde_json::Value;

/// Every call may wait for work in an emulated guest kernel.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(300_000_000_000)
}

/// The agent of one VM, and the next free host port for stdio streams.
#[allow(missing_debug_implementations)] // ttrpc clients have no Debug
pub struct Guest {
    pub conn: ttrpc::Client,
    pub agent: AgentClient,
    uds: PathBuf,
    next_port: AtomicU32,
    /// How long WaitProcess may take (a benchmark's container runs long).
    wait_timeout: Duration,
}

/// What a container printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: agent::WaitProcessResponse,
    /// stdout.
    pub output: String,
    pub stderr: String,
}

impl Guest {
    /// Wraps a connected client; `uds` is the VM's hybrid vsock socket.
    pub fn new(conn: ttrpc::Client, uds: PathBuf, first_port: u32) -> Self {
        Self {
            agent: AgentClient::new(conn.clone()),
            conn,
            uds,
            next_port: AtomicU32::new(first_port),
            wait_timeout: Duration::from_secs(300),
        }
    }

    /// Lets [`Guest::run`] wait this long for a container to end.
    pub fn with_wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Listens on a fresh host port whose single connection is read to EOF.
    fn collector(&self) -> Result<(u32, JoinHandle<Vec<u8>>), String> {
        let port = self.next_port.fetch_add(1, Ordering::SeqCst);
        let path = format!("{}_{port}", self.uds.display());
        let l = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
        let h = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.read_to_end(&mut buf);
            }
            let _ = std::fs::remove_file(&path);
            buf
        });
        Ok((port, h))
    }

    /// Creates container `id` from `spec` (rootfs at spec.root.path in the
    /// guest), starts it, waits for it and removes it.
    pub fn run(&self, id: &str, spec: &Value) -> Result<Finished, String> {
        let (out_port, out) = self.collector()?;
        let (err_port, err) = self.collector()?;
        let mut stdio = agent::StdioStreams::new();
        stdio.stdout_port = out_port;
        stdio.stderr_port = err_port;
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(spec).map_err(|e| e.to_string())?;
        req.stdio = Some(stdio).into();
        let created = self.agent.create_container(ctx(), &req);
        if let Err(e) = created {
            // Unblock the collectors: nobody will connect.
            for (port, h) in [(out_port, out), (err_port, err)] {
                let _ = std::os::unix::net::UnixStream::connect(format!("{}_{port}", self.uds.display()));
                let _ = h.join();
            }
            return Err(format!("CreateContainer {id}: {e:?}"));
        }
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        let started = self.agent.start_container(ctx(), &req).map_err(|e| format!("StartContainer {id}: {e:?}"));
        let waited = started.and_then(|_| {
            let mut req = agent::WaitProcessRequest::new();
            req.container_id = id.into();
            let timeout = i64::try_from(self.wait_timeout.as_nanos()).unwrap_or(i64::MAX);
            let wait_ctx = ttrpc::context::with_timeout(timeout);
            self.agent.wait_process(wait_ctx, &req).map_err(|e| format!("WaitProcess {id}: {e:?}"))
        });
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = true;
        let removed = self.agent.remove_container(ctx(), &req);
        let text = |h: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&h.join().unwrap_or_default()).replace('\r', "");
        let (output, stderr) = (text(out), text(err));
        let status = waited?;
        removed.map_err(|e| format!("RemoveContainer {id}: {e:?}"))?;
        Ok(Finished { status, output, stderr })
    }
}

/// Prints the tail of the guest console when the test panics (the guest's
/// side of a failure: kernel messages, the agent's errors).
#[derive(Debug)]
pub struct ConsoleOnPanic(pub PathBuf);

impl Drop for ConsoleOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("guest console (tail):\n{}", carapace_runtime::vm::tail(&self.0, 20_000));
        }
    }
}

/// How many user processes the guest kernel has reported killed for a
/// fault so far (printed with `ignore_loglevel` on the kernel command
/// line). On kvm_pvm hosts a guest process occasionally dies in glibc's
/// start-up (see tests/tests/agent_containers.rs); a step that fails after
/// such a report may be retried once.
pub fn guest_faults(console: &Path) -> usize {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("general protection fault") || l.contains("segfault at"))
        .count()
}
