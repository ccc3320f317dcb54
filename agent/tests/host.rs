//! The agent binary on the host, serving on a Unix socket
//! (`--listen unix://...`): Health, refused Agent calls, Shutdown.

use std::io::{BufRead, BufReader};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use carapace_protocol::health::check_response::ServingStatus;
use carapace_protocol::{agent, client, health, rpc_code, AgentClient, HealthClient, API_VERSION};

/// The agent under test: this build's binary, or the one named by
/// `CARAPACE_AGENT_BIN` (e.g. the static musl build that goes into the
/// initramfs).
fn agent_bin() -> String {
    std::env::var("CARAPACE_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carapace-agent").to_string())
}
const TIMEOUT: Duration = Duration::from_secs(20);

/// Kills the agent if a test fails before it exits.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl AgentProcess {
    /// Starts the agent on `sock` and waits for its "serving" line.
    fn start(sock: &Path) -> (Self, String) {
        let mut child = Command::new(agent_bin())
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stdout = child.stdout.take().expect("stdout");
        let process = Self(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(TIMEOUT).expect("the agent's first line");
        (process, line)
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

#[test]
fn serves_health_refuses_unimplemented_and_shuts_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let (mut agent_process, line) = AgentProcess::start(&sock);
    assert_eq!(line.trim_end(), format!("carapace-agent {} serving on unix://{}", env!("CARGO_PKG_VERSION"), sock.display()));

    let conn = client::connect_unix(&sock).expect("connect");
    let health = HealthClient::new(conn.clone());
    let agent = AgentClient::new(conn);

    let check = health.check(ctx(), &health::CheckRequest::new()).expect("Check");
    assert_eq!(check.status.enum_value(), Ok(ServingStatus::SERVING));

    let version = health.version(ctx(), &health::VersionRequest::new()).expect("Version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, API_VERSION);

    // Bad requests get a status, and the agent keeps serving.
    let err = agent.create_container(ctx(), &agent::CreateContainerRequest::new()).expect_err("CreateContainer without an id");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::INVALID_ARGUMENT), "{err:?}");
    let err = agent.wait_process(ctx(), &agent::WaitProcessRequest::new()).expect_err("WaitProcess of no container");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::NOT_FOUND), "{err:?}");
    health.check(ctx(), &health::CheckRequest::new()).expect("Check after errors");

    // A second connection works alongside the first.
    let other = HealthClient::new(client::connect_unix(&sock).expect("second connection"));
    other.check(ctx(), &health::CheckRequest::new()).expect("Check on the second connection");

    agent.shutdown(ctx(), &agent::ShutdownRequest::new()).expect("Shutdown is answered before the agent goes");
    let status = agent_process.wait();
    assert!(status.success(), "exit status {status:?}");
    assert!(!sock.exists(), "the socket file is removed");
}

#[test]
fn sigterm_stops_it_and_a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    // A socket file left by an earlier run.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    assert!(sock.exists());

    let (mut agent_process, line) = AgentProcess::start(&sock);
    assert!(line.contains("serving on unix://"), "{line:?}");
    let health = HealthClient::new(client::connect_unix(&sock).expect("connect"));
    health.check(ctx(), &health::CheckRequest::new()).expect("Check");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent_process.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = agent_process.wait();
    assert!(status.success(), "exit status {status:?}");
    assert!(!sock.exists(), "the socket file is removed");
}

#[test]
fn refuses_to_run_without_an_address_when_not_pid1() {
    let out = Command::new(agent_bin()).output().expect("run the agent");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen"), "{stderr}");

    let out = Command::new(agent_bin()).args(["--listen", "unix:///nonexistent-dir/a.sock", "--bogus"]).output().expect("run the agent");
    assert_eq!(out.status.code(), Some(1));

    let out = Command::new(agent_bin()).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("carapace-agent "));
}

/// The PID 1 path without a VM: the agent as init of a new PID and mount
/// namespace (`unshare`), where it mounts for real (in its private mount
/// namespace) and its reboot ends the namespace (the kernel kills its init
/// with SIGHUP). Needs root; skipped otherwise.
#[test]
fn as_pid1_of_a_namespace_it_mounts_serves_and_reboots() {
    const TEST: &str = "as_pid1_of_a_namespace_it_mounts_serves_and_reboots";
    if !carapace_test_support::can_run(TEST, &[carapace_test_support::Need::Root]) {
        return;
    }
    if !Path::new("/usr/bin/unshare").exists() {
        carapace_test_support::skip(TEST, "/usr/bin/unshare");
        return;
    }
    // An abstract socket: the agent mounts fresh tmpfs on /tmp and /run,
    // which would hide a socket file there, and the network namespace
    // (where abstract names live) is shared.
    let name = format!("carapace-agent-test-{}", std::process::id());
    let mut child = Command::new("/usr/bin/unshare")
        .args(["--pid", "--fork", "--mount", "--propagation", "private"])
        .arg(agent_bin())
        .arg("--listen")
        .arg(format!("unix://@{name}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start unshare");
    let stdout = child.stdout.take().expect("stdout");
    let mut process = AgentProcess(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(TIMEOUT).expect("the agent's first line");
    assert!(line.ends_with(&format!("serving on unix://@{name}\n")), "{line:?}");

    // The agent is unshare's child; read its mount table from outside.
    let children =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", process.0.id(), process.0.id())).expect("unshare's children");
    let agent_pid = children.split_whitespace().next().expect("the agent's pid");
    let mountinfo = std::fs::read_to_string(format!("/proc/{agent_pid}/mountinfo")).expect("mountinfo");
    for (mount_point, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
    ] {
        let found = mountinfo.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let sep = fields.iter().position(|f| *f == "-");
            fields.get(4) == Some(&mount_point) && sep.and_then(|i| fields.get(i + 1)) == Some(&fstype)
        });
        assert!(found, "{fstype} on {mount_point} missing:\n{mountinfo}");
    }

    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let stream = std::os::unix::net::UnixStream::connect_addr(&addr).expect("connect");
    let conn = client::client_from_stream(stream).expect("client");
    let health = HealthClient::new(conn.clone());
    health.check(ctx(), &health::CheckRequest::new()).expect("Check");
    AgentClient::new(conn).shutdown(ctx(), &agent::ShutdownRequest::new()).expect("Shutdown is answered before the reboot");
    // reboot(2) in a PID namespace kills its init with SIGHUP; unshare
    // then dies of the same signal.
    let status = process.wait();
    let sighup = nix::sys::signal::Signal::SIGHUP as i32;
    assert!(status.signal() == Some(sighup) || status.code() == Some(128 + sighup), "{status:?}");
}
