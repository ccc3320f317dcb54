//! Driving containers in a booted microVM over the agent API, for
//! end-to-end tests: stdio listeners on `<vsock uds>_<port>` (the agent
//! connects to them), create/start/wait/remove, and run-to-completion.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

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
}

/// What a container printed (stdout and stderr on one stream) and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: agent::WaitProcessResponse,
    pub output: String,
}

impl Guest {
    /// Wraps a connected client; `uds` is the VM's hybrid vsock socket.
    pub fn new(conn: ttrpc::Client, uds: PathBuf, first_port: u32) -> Self {
        Self { agent: AgentClient::new(conn.clone()), conn, uds, next_port: AtomicU32::new(first_port) }
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
        let (port, out) = self.collector()?;
        let mut stdio = agent::StdioStreams::new();
        stdio.stdout_port = port;
        stdio.stderr_port = port;
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(spec).map_err(|e| e.to_string())?;
        req.stdio = Some(stdio).into();
        let created = self.agent.create_container(ctx(), &req);
        if let Err(e) = created {
            // Unblock the collector: nobody will connect.
            let _ = std::os::unix::net::UnixStream::connect(format!("{}_{port}", self.uds.display()));
            let _ = out.join();
            return Err(format!("CreateContainer {id}: {e:?}"));
        }
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        let started = self.agent.start_container(ctx(), &req).map_err(|e| format!("StartContainer {id}: {e:?}"));
        let waited = started.and_then(|_| {
            let mut req = agent::WaitProcessRequest::new();
            req.container_id = id.into();
            self.agent.wait_process(ctx(), &req).map_err(|e| format!("WaitProcess {id}: {e:?}"))
        });
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = true;
        let removed = self.agent.remove_container(ctx(), &req);
        let output = String::from_utf8_lossy(&out.join().unwrap_or_default()).replace('\r', "");
        let status = waited?;
        removed.map_err(|e| format!("RemoveContainer {id}: {e:?}"))?;
        Ok(Finished { status, output })
    }
}
