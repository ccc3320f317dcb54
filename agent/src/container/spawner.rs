//! Container processes made by a small process forked at the agent's
//! start, not by the agent itself.
//!
//! libcontainer forks the process that calls it: an intermediate process,
//! which clones the container's init. Called in the agent (large,
//! multi-threaded, its heap grown by the ttrpc server and every container
//! so far), each fork copies the agent's page tables and write-protects
//! every page it has written (the agent then takes a copy-on-write fault on
//! each page it writes again), and the init's `execve` tears the copy down.
//! On kvm_pvm hosts every one of those page-table changes is emulated
//! (`../shared/PVM-HOSTS.md`): that was most of CreateContainer's and
//! StartContainer's guest time (see `bench/lifecycle.py`).
//!
//! The spawner is forked once, before any thread exists, while the agent is
//! still small (and, with VM templates, it is part of the snapshot). For
//! each CreateContainer and ExecProcess the agent sends it a [`Job`] and
//! the new process's fds over a socket pair; it forks a worker (a copy of
//! the small spawner) that runs libcontainer's builder and exits. The
//! container's init is the worker's child (libcontainer clones it with
//! `CLONE_PARENT` from the intermediate), so when the worker exits the init
//! is reparented to the agent (PID 1 in the guest, a child subreaper on a
//! host), whose reaper gets its exit status as before.
//!
//! The worker answers the spawner over a pipe and the spawner answers the
//! agent: a worker that dies without answering (a crash) is reported with
//! its wait status instead of leaving the agent waiting.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};
use serde::{Deserialize, Serialize};

/// What a worker builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Job {
    /// A container (libcontainer's init builder): `bundle/config.json`.
    Create { id: String, root: PathBuf, bundle: PathBuf, console_socket: Option<PathBuf> },
    /// A process in a running container (libcontainer's tenant builder).
    Exec { id: String, root: PathBuf, process: PathBuf, console_socket: Option<PathBuf> },
}

/// A job and how many fds came with it (the process's stdin, stdout and
/// stderr if `stdio`, then for `Create` the write end of the exec pipe).
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    job: Job,
    stdio: bool,
    fds: usize,
}

/// Why a job failed, as the worker classified it (see
/// `ContainerError::libcontainer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// libcontainer refused or failed; `invalid` when it judged the input.
    Libcontainer { message: String, invalid: bool },
    /// libcontainer found the container in the wrong state.
    Precondition(String),
    /// Anything else (including a worker that died without answering).
    Internal(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Libcontainer { message, .. } | Self::Precondition(message) | Self::Internal(message) => f.write_str(message),
        }
    }
}

/// The new process's PID (in the agent's PID namespace), or why not.
pub type Reply = Result<i32, Failure>;

/// The fds a job's process gets.
#[derive(Debug)]
pub struct JobFds {
    /// stdin, stdout, stderr (none with a terminal).
    pub stdio: Option<[OwnedFd; 3]>,
    /// Create: the write end of the pipe that closes when the init execs.
    pub exec_signal: Option<OwnedFd>,
}

/// What a worker runs: the job, with its fds.
pub type Runner = fn(Job, JobFds) -> Reply;

/// The largest request or reply: ids, paths and an error message.
const MAX_MESSAGE: usize = 64 * 1024;
/// At most stdin, stdout, stderr and the exec pipe.
const MAX_FDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    #[error("forking the container spawner: {0}")]
    Fork(nix::Error),
    #[error("creating the spawner's socket pair: {0}")]
    Socket(nix::Error),
    #[error("talking to the container spawner: {0}")]
    Io(io::Error),
    #[error("the container spawner is gone")]
    Gone,
}

/// The agent's end: one job at a time.
#[derive(Debug)]
pub struct Spawner {
    sock: Mutex<OwnedFd>,
    pid: i32,
}

impl Spawner {
    /// Forks the spawner, which runs each job's worker with `run`. Call it
    /// while the process has one thread: the spawner is a copy of it.
    pub fn start(run: Runner) -> Result<Self, SpawnerError> {
        let (ours, theirs) = socket::socketpair(socket::AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(SpawnerError::Socket)?;
        // SAFETY: the caller forks with one thread (documented above), so
        // the child may run any code; it never returns from `serve`.
        match unsafe { fork() }.map_err(SpawnerError::Fork)? {
            ForkResult::Child => {
                drop(ours);
                serve(&theirs, run)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                tracing::debug!(pid = child.as_raw(), "container spawner started");
                Ok(Self { sock: Mutex::new(ours), pid: child.as_raw() })
            }
        }
    }

    /// The spawner's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Runs `job` in a new worker and waits for its answer.
    pub fn spawn(&self, job: Job, fds: JobFds) -> Result<Reply, SpawnerError> {
        let sock = self.sock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stdio = fds.stdio.is_some();
        let mut raw: Vec<RawFd> = Vec::with_capacity(MAX_FDS);
        if let Some(s) = &fds.stdio {
            raw.extend(s.iter().map(AsRawFd::as_raw_fd));
        }
        if let Some(e) = &fds.exec_signal {
            raw.push(e.as_raw_fd());
        }
        let request = Request { job, stdio, fds: raw.len() };
        let bytes = serde_json::to_vec(&request).map_err(|e| SpawnerError::Io(e.into()))?;
        send(&sock, &bytes, &raw).map_err(SpawnerError::Io)?;
        // Our copies may close now: the spawner holds its own.
        drop(fds);
        let (bytes, _) = receive(&sock).map_err(SpawnerError::Io)?;
        if bytes.is_empty() {
            return Err(SpawnerError::Gone);
        }
        serde_json::from_slice(&bytes).map_err(|e| SpawnerError::Io(e.into()))
    }
}

fn send(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// One message and the fds that came with it; empty at end of stream.
fn receive(sock: &OwnedFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these fds in this
                // process for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message or fds truncated"));
        }
        let n = msg.bytes;
        buf.truncate(n);
        return Ok((buf, fds));
    }
}

/// The spawner's loop: a worker per job, until the agent's end closes.
fn serve(sock: &OwnedFd, run: Runner) -> ! {
    loop {
        let reply = match receive(sock) {
            Ok((bytes, _)) if bytes.is_empty() => exit(0),
            Ok((bytes, fds)) => one_job(sock.as_raw_fd(), &bytes, fds, run),
            Err(e) => Err(Failure::Internal(format!("the spawner's request: {e}"))),
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        if send(sock, &bytes, &[]).is_err() {
            exit(1);
        }
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends this process without running the agent's atexit
    // handlers or flushing buffers it shares with the agent.
    unsafe { libc::_exit(code) }
}

fn one_job(sock: RawFd, bytes: &[u8], fds: Vec<OwnedFd>, run: Runner) -> Reply {
    let request: Request = serde_json::from_slice(bytes).map_err(|e| Failure::Internal(format!("the spawner's request: {e}")))?;
    if fds.len() != request.fds {
        return Err(Failure::Internal(format!("the spawner got {} fds, not {}", fds.len(), request.fds)));
    }
    let mut fds = fds.into_iter();
    let stdio = match request.stdio {
        true => match (fds.next(), fds.next(), fds.next()) {
            (Some(i), Some(o), Some(e)) => Some([i, o, e]),
            _ => return Err(Failure::Internal("the spawner's request: stdio fds missing".into())),
        },
        false => None,
    };
    let job_fds = JobFds { stdio, exec_signal: fds.next() };
    let (mut answer_r, answer_w) = pipe()?;
    // SAFETY: the spawner has one thread.
    match unsafe { fork() } {
        Err(e) => Err(Failure::Internal(format!("forking a spawner worker: {e}"))),
        Ok(ForkResult::Child) => {
            drop(answer_r);
            // The container's init would hold the spawner's socket until it
            // execs; the worker never returns to the loop that owns it.
            // SAFETY: closes this process's copy of an fd nothing here
            // uses again (the worker ends with `exit`).
            unsafe { libc::close(sock) };
            let reply = run(request.job, job_fds);
            let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
            bytes.truncate(MAX_MESSAGE / 2);
            let _ = std::fs::File::from(answer_w).write_all(&bytes);
            exit(0)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(answer_w);
            drop(job_fds);
            let mut bytes = Vec::new();
            let read = answer_r.read_to_end(&mut bytes);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::Error::EINTR) => {}
                    other => break other,
                }
            };
            match (read, serde_json::from_slice::<Reply>(&bytes)) {
                (Ok(_), Ok(reply)) => reply,
                _ => Err(Failure::Internal(format!("the spawner's worker ended without answering ({status:?})"))),
            }
        }
    }
}

fn pipe() -> Result<(std::fs::File, OwnedFd), Failure> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Failure::Internal(format!("a pipe for the worker: {e}")))?;
    Ok((std::fs::File::from(r), w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::WaitStatus;

    /// Answers with the job's id length, after writing the id to stdout.
    fn echo(job: Job, fds: JobFds) -> Reply {
        let Job::Create { id, .. } = job else { return Err(Failure::Precondition("not a create".into())) };
        if id == "crash" {
            std::process::abort();
        }
        if let Some([_, out, _]) = fds.stdio {
            let _ = std::fs::File::from(out).write_all(id.as_bytes());
        }
        if let Some(e) = fds.exec_signal {
            drop(e);
        }
        Ok(i32::try_from(id.len()).unwrap_or(-1))
    }

    fn create(id: &str) -> Job {
        Job::Create { id: id.into(), root: "/r".into(), bundle: "/b".into(), console_socket: None }
    }

    // One test (the spawner forks the test process: keep it to one place).
    #[test]
    fn jobs_run_in_workers_with_their_fds() {
        let spawner = Spawner::start(echo).expect("spawner");
        assert_ne!(spawner.pid(), std::process::id() as i32);

        let (out_r, out_w) = nix::unistd::pipe().expect("pipe");
        let null = || OwnedFd::from(std::fs::File::open("/dev/null").expect("null"));
        let (sig_r, sig_w) = nix::unistd::pipe().expect("pipe");
        let reply =
            spawner.spawn(create("hello"), JobFds { stdio: Some([null(), out_w, null()]), exec_signal: Some(sig_w) }).expect("spawn");
        assert_eq!(reply, Ok(5));
        let mut out = String::new();
        std::fs::File::from(out_r).read_to_string(&mut out).expect("read");
        assert_eq!(out, "hello", "the worker wrote with the fd it was given, and every copy is closed");
        let mut sig = Vec::new();
        std::fs::File::from(sig_r).read_to_end(&mut sig).expect("exec pipe closed");

        let exec = Job::Exec { id: "c".into(), root: "/r".into(), process: "/p".into(), console_socket: None };
        let reply = spawner.spawn(exec, JobFds { stdio: None, exec_signal: None }).expect("spawn");
        assert_eq!(reply, Err(Failure::Precondition("not a create".into())));

        let reply = spawner.spawn(create("crash"), JobFds { stdio: None, exec_signal: None }).expect("spawn");
        match reply {
            Err(Failure::Internal(m)) => assert!(m.contains("without answering"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Still serving after a worker crashed.
        assert_eq!(spawner.spawn(create("ab"), JobFds { stdio: None, exec_signal: None }).expect("spawn"), Ok(2));
        let pid = spawner.pid();
        drop(spawner);
        // The spawner ends when the agent's end closes.
        let status = waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait");
        assert_eq!(status, WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0));
    }
}
