//! The monitor's control socket (`monitor.sock` in a container's state
//! directory): the monitor relays agent calls on the one agent connection
//! it holds, so that a CLI command (`start`, `kill`, `exec`, `pause`, ...)
//! does not open its own (a new connection costs a vsock handshake and a
//! ttrpc server thread in the guest, whose every system call is emulated on
//! a kvm_pvm host).
//!
//! One JSON line in (the agent call's name and its protobuf request), one
//! out (the protobuf response, or the call's error as ttrpc gave it), one
//! call per connection and a thread per connection, so that a WaitProcess
//! that lasts as long as an exec'd process holds up nothing else. The
//! monitor serves it ([`serve`]); the CLI's side is a [`Guest`]
//! ([`ControlGuest`]), so the container verbs of [`crate::sandbox`] run over
//! it unchanged. The socket lives in the state directory (mode 0700), as
//! does the VM's vsock socket that reaches the agent directly.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::agent::*;
use protobuf::Message;
use serde::{Deserialize, Serialize};

use crate::agent::CALL_TIMEOUT;
use crate::guest::Guest;

/// Why the monitor could not be asked whether it answers.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("monitor control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("monitor control socket {path}: the monitor closed the connection without an answer")]
    NoAnswer { path: PathBuf },
    #[error("monitor control socket {path}: bad answer")]
    BadAnswer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The monitor's control socket in a container's state directory.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("monitor.sock")
}

/// The call asked to answer whether a monitor serves the socket.
const PING: &str = "Ping";

/// A request on the control socket: an agent call by its name in
/// `agent.proto`, with its request message encoded.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlRequest {
    pub call: String,
    pub body: Vec<u8>,
}

/// A ttrpc error as it crosses the socket, so that the caller sees the
/// error the monitor's agent call gave (status code, lost connection).
#[derive(Debug, Serialize, Deserialize)]
pub enum WireError {
    Status { code: i32, message: String },
    Socket(String),
    LocalClosed,
    RemoteClosed,
    Eof,
    Others(String),
}

impl From<ttrpc::Error> for WireError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => Self::Status { code: s.code.value(), message: s.message },
            ttrpc::Error::Socket(s) => Self::Socket(s),
            ttrpc::Error::LocalClosed => Self::LocalClosed,
            ttrpc::Error::RemoteClosed => Self::RemoteClosed,
            ttrpc::Error::Eof => Self::Eof,
            ttrpc::Error::Others(s) => Self::Others(s),
            other => Self::Others(other.to_string()),
        }
    }
}

impl From<WireError> for ttrpc::Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Status { code, message } => {
                let code = <ttrpc::Code as protobuf::Enum>::from_i32(code).unwrap_or(ttrpc::Code::UNKNOWN);
                ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
            }
            WireError::Socket(s) => ttrpc::Error::Socket(s),
            WireError::LocalClosed => ttrpc::Error::LocalClosed,
            WireError::RemoteClosed => ttrpc::Error::RemoteClosed,
            WireError::Eof => ttrpc::Error::Eof,
            WireError::Others(s) => ttrpc::Error::Others(s),
        }
    }
}

/// The answer: the encoded response message, or the call's error.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlReply {
    pub result: Result<Vec<u8>, WireError>,
}

/// Binds the control socket and answers on it until we exit, for calls on
/// container `id` only. Failing to bind only costs the CLI its own agent
/// connection.
pub fn serve(path: &Path, guest: &Arc<dyn Guest>, id: &str) {
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no control socket; CLI commands connect to the agent themselves");
            return;
        }
    };
    let guest = guest.clone();
    let id: Arc<str> = id.into();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(conn) => {
                    let (guest, id) = (guest.clone(), id.clone());
                    std::thread::spawn(move || answer(&conn, guest.as_ref(), &id));
                }
                Err(e) => tracing::debug!(error = %e, "control socket accept"),
            }
        }
    });
}

fn answer(conn: &UnixStream, guest: &dyn Guest, id: &str) {
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() || line.trim().is_empty() {
        return;
    }
    let result = match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(req) => relay(guest, id, &req.call, &req.body).map_err(WireError::from),
        Err(e) => Err(WireError::Others(format!("bad control request: {e}"))),
    };
    let mut text = serde_json::to_string(&ControlReply { result }).unwrap_or_default();
    text.push('\n');
    let _ = (&*conn).write_all(text.as_bytes());
}

fn decode<T: Message>(body: &[u8], id: &str, container_id: impl Fn(&T) -> &str) -> ttrpc::Result<T> {
    let req = T::parse_from_bytes(body).map_err(|e| ttrpc::Error::Others(format!("bad control request: {e}")))?;
    if container_id(&req) != id {
        // This monitor's agent holds its own container only.
        return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no such container")));
    }
    Ok(req)
}

fn encode<T: Message>(r: ttrpc::Result<T>) -> ttrpc::Result<Vec<u8>> {
    r?.write_to_bytes().map_err(|e| ttrpc::Error::Others(format!("cannot encode the answer: {e}")))
}

/// The calls relayed, once for both sides: the monitor's [`relay`] and the
/// CLI's [`ControlGuest`]. Each is `name => method(Request) -> Response`
/// and how long the CLI waits for the answer.
macro_rules! relayed {
    ($($name:literal => $method:ident($req:ty) -> $resp:ty, $timeout:expr;)*) => {
        /// Makes agent call `call` with the request in `body`; its
        /// response, encoded.
        fn relay(guest: &dyn Guest, id: &str, call: &str, body: &[u8]) -> ttrpc::Result<Vec<u8>> {
            match call {
                PING => Ok(Vec::new()),
                $($name => encode(guest.$method(&decode::<$req>(body, id, |r| &r.container_id)?)),)*
                other => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::UNIMPLEMENTED, format!("{other} is not served here")))),
            }
        }

        impl Guest for ControlGuest {
            fn create_sandbox(&self, _: &CreateSandboxRequest) -> ttrpc::Result<CreateSandboxResponse> {
                Self::refused("CreateSandbox")
            }
            fn create_container(&self, _: &CreateContainerRequest) -> ttrpc::Result<CreateContainerResponse> {
                Self::refused("CreateContainer")
            }
            fn shutdown(&self, _: u64) -> ttrpc::Result<ShutdownResponse> {
                Self::refused("Shutdown")
            }
            $(fn $method(&self, req: &$req) -> ttrpc::Result<$resp> {
                self.call($name, req, $timeout)
            })*
        }
    };
}

relayed! {
    "StartContainer" => start_container(StartContainerRequest) -> StartContainerResponse, Some(CALL_TIMEOUT);
    "ExecProcess" => exec_process(ExecProcessRequest) -> ExecProcessResponse, Some(CALL_TIMEOUT);
    "SignalProcess" => signal_process(SignalProcessRequest) -> SignalProcessResponse, Some(CALL_TIMEOUT);
    // No timeout: a process may run for months.
    "WaitProcess" => wait_process(WaitProcessRequest) -> WaitProcessResponse, None;
    "ResizeTty" => resize_tty(ResizeTtyRequest) -> ResizeTtyResponse, Some(CALL_TIMEOUT);
    "CloseStdin" => close_stdin(CloseStdinRequest) -> CloseStdinResponse, Some(CALL_TIMEOUT);
    "StatsContainer" => stats_container(StatsContainerRequest) -> StatsContainerResponse, Some(CALL_TIMEOUT);
    "ListProcesses" => list_processes(ListProcessesRequest) -> ListProcessesResponse, Some(CALL_TIMEOUT);
    "UpdateContainer" => update_container(UpdateContainerRequest) -> UpdateContainerResponse, Some(CALL_TIMEOUT);
    "PauseContainer" => pause_container(PauseContainerRequest) -> PauseContainerResponse, Some(CALL_TIMEOUT);
    "ResumeContainer" => resume_container(ResumeContainerRequest) -> ResumeContainerResponse, Some(CALL_TIMEOUT);
    "RemoveContainer" => remove_container(RemoveContainerRequest) -> RemoveContainerResponse, Some(CALL_TIMEOUT);
}

/// Sends `req` and reads the reply; `Ok(None)`: no monitor listens.
fn ask(path: &Path, req: &ControlRequest, timeout: Option<Duration>) -> Result<Option<ControlReply>, ControlError> {
    let io = |source| ControlError::Io { path: path.to_path_buf(), source };
    let conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    conn.set_read_timeout(timeout).map_err(io)?;
    // Encoding a struct of a string and bytes cannot fail.
    let mut text = serde_json::to_string(req).unwrap_or_default();
    text.push('\n');
    (&conn).write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(io)?;
    if line.trim().is_empty() {
        return Err(ControlError::NoAnswer { path: path.to_path_buf() });
    }
    serde_json::from_str(line.trim()).map(Some).map_err(|source| ControlError::BadAnswer { path: path.to_path_buf(), source })
}

/// A container's agent as its monitor relays it (see the module docs).
/// Sandbox-wide calls (CreateSandbox, CreateContainer, Shutdown) are the
/// monitor's own and are refused.
#[derive(Debug, Clone)]
pub struct ControlGuest {
    path: PathBuf,
}

impl ControlGuest {
    /// The monitor of the container whose state directory is `dir`, if one
    /// answers there.
    pub fn connect(dir: &Path) -> Result<Option<Self>, ControlError> {
        let path = path(dir);
        let ping = ControlRequest { call: PING.into(), body: Vec::new() };
        match ask(&path, &ping, Some(Duration::from_secs(10))) {
            Ok(Some(ControlReply { result: Ok(_) })) => Ok(Some(Self { path })),
            Ok(None) => Ok(None),
            // A monitor of an older carapace (it knew only `start`, in
            // another format): go to the agent as it expects.
            Ok(Some(ControlReply { result: Err(_) })) | Err(ControlError::BadAnswer { .. }) => {
                tracing::debug!(path = %path.display(), "the monitor does not relay agent calls; connecting to the agent");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn call<Req: Message, Resp: Message>(&self, call: &str, req: &Req, timeout: Option<Duration>) -> ttrpc::Result<Resp> {
        let body = req.write_to_bytes().map_err(|e| ttrpc::Error::Others(format!("cannot encode {call}: {e}")))?;
        let lost = |what: String| ttrpc::Error::Socket(format!("monitor control socket {}: {what}", self.path.display()));
        let reply = match ask(&self.path, &ControlRequest { call: call.into(), body }, timeout) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(lost("the monitor is gone".into())),
            Err(e) => return Err(lost(crate::error::Chain(&e).to_string())),
        };
        let bytes = reply.result.map_err(ttrpc::Error::from)?;
        Resp::parse_from_bytes(&bytes).map_err(|e| ttrpc::Error::Others(format!("bad {call} answer: {e}")))
    }

    fn refused<T>(call: &str) -> ttrpc::Result<T> {
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::UNIMPLEMENTED, format!("{call} is the monitor's own"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{ContainerHandle, SandboxError};
    use crate::test_utils::FakeGuest;

    #[test]
    fn verbs_go_over_the_control_socket_and_errors_come_back_as_the_agent_gave_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Nobody serves: the caller is told to go to the agent itself.
        assert!(ControlGuest::connect(dir.path()).expect("no socket").is_none());
        // Nor does a monitor that answers in the old format (`start` only).
        {
            let old = UnixListener::bind(path(dir.path())).expect("bind");
            let server = std::thread::spawn(move || {
                let (conn, _) = old.accept().expect("accept");
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).expect("request");
                (&conn).write_all(b"{\"pid\":0,\"error\":\"bad control request\"}\n").expect("answer");
            });
            assert!(ControlGuest::connect(dir.path()).expect("old monitor").is_none());
            server.join().expect("old monitor");
        }

        let fake = Arc::new(FakeGuest::new(dir.path().join("vsock.sock")));
        let pid = fake.add("c1", "", false);
        let guest: Arc<dyn Guest> = fake.clone();
        serve(&path(dir.path()), &guest, "c1");
        let control = ControlGuest::connect(dir.path()).expect("ping").expect("served");
        let c = ContainerHandle::new(&control, "c1");
        assert_eq!(c.start().expect("start"), pid);
        assert!(fake.procs.lock().expect("procs")[&("c1".to_string(), String::new())].started);
        assert_eq!(c.ps().expect("ps"), [pid]);
        assert_eq!(c.stats().expect("stats").cgroup.memory.current, 1 << 20);

        // A wait in progress holds up nothing else.
        let waiter = {
            let control = control.clone();
            std::thread::spawn(move || ContainerHandle::new(&control, "c1").wait("").map(|w| w.exit_code))
        };
        std::thread::sleep(Duration::from_millis(100));
        c.signal("", 9, false).expect("kill");
        assert_eq!(waiter.join().expect("waiter").expect("wait"), 137);
        let e = c.signal("", 9, false).expect_err("exited");
        assert!(matches!(e, SandboxError::Agent { code: Some(ttrpc::Code::NOT_FOUND), .. }), "{e:?}");
        assert_eq!(e.to_string(), "SignalProcess: process exited");

        // Another container's calls are not this monitor's to relay.
        let e = ContainerHandle::new(&control, "ghost").start().expect_err("ghost");
        assert_eq!(e.to_string(), "StartContainer: no such container");
        assert_eq!(fake.calls.lock().expect("calls").as_slice(), ["StartContainer", "SignalProcess", "SignalProcess"]);
    }
}
