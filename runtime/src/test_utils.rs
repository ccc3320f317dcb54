//! Fakes of the sandbox's seams (the VM launcher and the agent) for unit
//! tests of the sandbox core and of both front ends over it. The fake agent
//! plays the guest: it connects to the stdio ports, and processes exit when
//! signalled or told to. Failures on demand: CreateContainer refuses a
//! container whose id starts with `bad`, StartContainer one whose id starts
//! with `nostart`, ExecProcess an exec id starting with `bad`. As the agent
//! does, ExecProcess refuses an exec id the container has, and
//! RemoveContainer a running container without `force`.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use carapace_protocol::agent::*;

use crate::config::Config;
use crate::guest::Guest;
use crate::launcher::{LaunchError, Launcher, SandboxVm};
use crate::vm::VmOptions;

pub const VMM_PID: u32 = 4242;

#[derive(Debug, Default)]
pub struct FakeProc {
    pub started: bool,
    pub exit: Option<i32>,
    pub pid: u32,
}

/// Plays the agent.
#[derive(Debug)]
pub struct FakeGuest {
    pub uds: PathBuf,
    pub procs: Mutex<HashMap<(String, String), FakeProc>>,
    pub changed: Condvar,
    pub calls: Mutex<Vec<String>>,
    /// Every CreateContainer request, in order.
    pub created: Mutex<Vec<CreateContainerRequest>>,
    /// Every CreateSandbox request, in order.
    pub sandboxes: Mutex<Vec<CreateSandboxRequest>>,
    pub next_pid: AtomicUsize,
}

fn status(code: ttrpc::Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

impl FakeGuest {
    pub fn new(uds: PathBuf) -> Self {
        Self {
            uds,
            procs: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            calls: Mutex::new(Vec::new()),
            created: Mutex::new(Vec::new()),
            sandboxes: Mutex::new(Vec::new()),
            next_pid: AtomicUsize::new(1),
        }
    }

    pub fn call(&self, name: &str) {
        self.calls.lock().expect("calls").push(name.to_string());
    }

    /// Writes `text` to the stdout port and closes it, as a process would.
    pub fn say(&self, stdio: &StdioStreams, text: &str) {
        if stdio.stdout_port != 0 {
            let mut s = UnixStream::connect(format!("{}_{}", self.uds.display(), stdio.stdout_port)).expect("connect stdout");
            s.write_all(text.as_bytes()).expect("write stdout");
        }
        if stdio.stderr_port != 0 {
            drop(UnixStream::connect(format!("{}_{}", self.uds.display(), stdio.stderr_port)).expect("connect stderr"));
        }
    }

    pub fn add(&self, cid: &str, exec: &str, started: bool) -> u32 {
        let pid = u32::try_from(self.next_pid.fetch_add(1, Ordering::SeqCst)).expect("pid");
        let p = FakeProc { started, exit: None, pid };
        self.procs.lock().expect("procs").insert((cid.into(), exec.into()), p);
        pid
    }

    /// The process ends with `code`.
    pub fn finish(&self, cid: &str, exec: &str, code: i32) {
        let mut procs = self.procs.lock().expect("procs");
        if let Some(p) = procs.get_mut(&(cid.to_string(), exec.to_string())) {
            p.exit.get_or_insert(code);
        }
        self.changed.notify_all();
    }
}

impl Guest for FakeGuest {
    fn create_sandbox(&self, req: &CreateSandboxRequest) -> ttrpc::Result<CreateSandboxResponse> {
        self.call("CreateSandbox");
        self.sandboxes.lock().expect("sandboxes").push(req.clone());
        Ok(CreateSandboxResponse::new())
    }
    fn create_container(&self, req: &CreateContainerRequest) -> ttrpc::Result<CreateContainerResponse> {
        self.call("CreateContainer");
        self.created.lock().expect("created").push(req.clone());
        if req.container_id.starts_with("bad") {
            return Err(status(ttrpc::Code::INVALID_ARGUMENT, "process.args: missing"));
        }
        let spec: serde_json::Value = serde_json::from_slice(&req.oci_spec_json).expect("spec json");
        assert_eq!(spec["root"]["path"], req.rootfs_path.as_str());
        self.say(req.stdio.as_ref().expect("stdio"), &format!("out:{}", req.container_id));
        let pid = self.add(&req.container_id, "", false);
        Ok(CreateContainerResponse { pid, ..Default::default() })
    }
    fn start_container(&self, req: &StartContainerRequest) -> ttrpc::Result<StartContainerResponse> {
        self.call("StartContainer");
        if req.container_id.starts_with("nostart") {
            return Err(status(ttrpc::Code::INTERNAL, "starting the container: exec: no such file or directory"));
        }
        let mut procs = self.procs.lock().expect("procs");
        let p =
            procs.get_mut(&(req.container_id.clone(), String::new())).ok_or_else(|| status(ttrpc::Code::NOT_FOUND, "no such container"))?;
        p.started = true;
        Ok(StartContainerResponse { pid: p.pid, ..Default::default() })
    }
    fn exec_process(&self, req: &ExecProcessRequest) -> ttrpc::Result<ExecProcessResponse> {
        self.call("ExecProcess");
        if req.exec_id.starts_with("bad") {
            return Err(status(ttrpc::Code::INTERNAL, "executing the process: exec: \"/nonexistent\": no such file or directory"));
        }
        if self.procs.lock().expect("procs").contains_key(&(req.container_id.clone(), req.exec_id.clone())) {
            return Err(status(ttrpc::Code::ALREADY_EXISTS, &format!("process {} already exists", req.exec_id)));
        }
        let process: serde_json::Value = serde_json::from_slice(&req.process_json).expect("process json");
        assert!(process["args"].is_array());
        self.say(req.stdio.as_ref().expect("stdio"), &format!("exec:{}", req.exec_id));
        let pid = self.add(&req.container_id, &req.exec_id, true);
        Ok(ExecProcessResponse { pid, ..Default::default() })
    }
    fn signal_process(&self, req: &SignalProcessRequest) -> ttrpc::Result<SignalProcessResponse> {
        self.call("SignalProcess");
        let code = 128 + i32::try_from(req.signal).unwrap_or(0);
        let mut procs = self.procs.lock().expect("procs");
        let mut hit = false;
        for ((cid, exec), p) in procs.iter_mut() {
            if *cid == req.container_id && (req.all || *exec == req.exec_id) && p.exit.is_none() {
                p.exit = Some(code);
                hit = true;
            }
        }
        self.changed.notify_all();
        if hit {
            Ok(SignalProcessResponse::new())
        } else {
            Err(status(ttrpc::Code::NOT_FOUND, "process exited"))
        }
    }
    fn wait_process(&self, req: &WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let key = (req.container_id.clone(), req.exec_id.clone());
        let mut procs = self.procs.lock().expect("procs");
        loop {
            match procs.get(&key) {
                None => return Err(status(ttrpc::Code::NOT_FOUND, "no such process")),
                Some(p) if p.exit.is_some() => {
                    let code = p.exit.unwrap_or_default();
                    return Ok(WaitProcessResponse {
                        exit_code: code,
                        oom_killed: code == 137 && req.container_id.starts_with("oom"),
                        pid: p.pid,
                        ..Default::default()
                    });
                }
                Some(_) => procs = self.changed.wait(procs).expect("wait"),
            }
        }
    }
    fn resize_tty(&self, _: &ResizeTtyRequest) -> ttrpc::Result<ResizeTtyResponse> {
        self.call("ResizeTty");
        Ok(ResizeTtyResponse::new())
    }
    fn close_stdin(&self, _: &CloseStdinRequest) -> ttrpc::Result<CloseStdinResponse> {
        self.call("CloseStdin");
        Ok(CloseStdinResponse::new())
    }
    fn stats_container(&self, _: &StatsContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        let mut s = StatsContainerResponse::new();
        let mut c = CgroupStats::new();
        c.memory = Some(MemoryStats { current: 1 << 20, ..Default::default() }).into();
        c.pids = Some(PidsStats { current: 2, ..Default::default() }).into();
        s.cgroup = Some(c).into();
        Ok(s)
    }
    fn list_processes(&self, req: &ListProcessesRequest) -> ttrpc::Result<ListProcessesResponse> {
        let procs = self.procs.lock().expect("procs");
        let pids = procs.iter().filter(|((c, _), p)| *c == req.container_id && p.exit.is_none()).map(|(_, p)| p.pid).collect();
        Ok(ListProcessesResponse { pids, ..Default::default() })
    }
    fn update_container(&self, req: &UpdateContainerRequest) -> ttrpc::Result<UpdateContainerResponse> {
        self.call("UpdateContainer");
        let _: serde_json::Value = serde_json::from_slice(&req.resources_json).expect("resources json");
        Ok(UpdateContainerResponse::new())
    }
    fn pause_container(&self, _: &PauseContainerRequest) -> ttrpc::Result<PauseContainerResponse> {
        self.call("PauseContainer");
        Ok(PauseContainerResponse::new())
    }
    fn resume_container(&self, _: &ResumeContainerRequest) -> ttrpc::Result<ResumeContainerResponse> {
        self.call("ResumeContainer");
        Ok(ResumeContainerResponse::new())
    }
    fn remove_container(&self, req: &RemoveContainerRequest) -> ttrpc::Result<RemoveContainerResponse> {
        self.call("RemoveContainer");
        let mut procs = self.procs.lock().expect("procs");
        let init = procs.get(&(req.container_id.clone(), String::new()));
        if !req.force && init.is_some_and(|p| p.started && p.exit.is_none()) {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, "container is running; stop it first or remove with force"));
        }
        for ((cid, _), p) in procs.iter_mut() {
            if *cid == req.container_id {
                p.exit.get_or_insert(137);
            }
        }
        self.changed.notify_all();
        drop(procs);
        // Let waiters read the exits before the records go.
        std::thread::sleep(Duration::from_millis(50));
        self.procs.lock().expect("procs").retain(|(cid, _), _| *cid != req.container_id);
        Ok(RemoveContainerResponse::new())
    }
    fn shutdown(&self, _: u64) -> ttrpc::Result<ShutdownResponse> {
        self.call("Shutdown");
        Ok(ShutdownResponse::new())
    }
}

#[derive(Debug)]
pub struct FakeVm {
    pub guest: Arc<FakeGuest>,
    pub uds: PathBuf,
    pub stopped: Arc<AtomicBool>,
    pub restored: bool,
}

impl SandboxVm for FakeVm {
    fn guest(&self) -> Arc<dyn Guest> {
        self.guest.clone()
    }
    fn vsock_uds(&self) -> &Path {
        &self.uds
    }
    fn pid(&self) -> u32 {
        VMM_PID
    }
    fn restored(&self) -> bool {
        self.restored
    }
    fn stop(&self) {
        let _ = self.guest.shutdown(1);
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// A launched fake VM: its guest, whether it was stopped, its size.
pub type Launched = (Arc<FakeGuest>, Arc<AtomicBool>, VmOptions);

#[derive(Debug, Default)]
pub struct FakeLauncher {
    pub launched: Mutex<Vec<Launched>>,
    /// Its VMs say they were restored from a template.
    pub restore: AtomicBool,
}

impl Launcher for Arc<FakeLauncher> {
    fn launch(&self, dir: &Path, _config: &Config, opts: &VmOptions) -> Result<Box<dyn SandboxVm>, LaunchError> {
        assert!(opts.fs.iter().any(|f| f.shared_dir == dir.join("shared")), "the share is {:?}", opts.fs);
        let uds = dir.join("vsock.sock");
        let guest = Arc::new(FakeGuest::new(uds.clone()));
        let stopped = Arc::new(AtomicBool::new(false));
        self.launched.lock().expect("launched").push((guest.clone(), stopped.clone(), opts.clone()));
        Ok(Box::new(FakeVm { guest, uds, stopped, restored: self.restore.load(Ordering::SeqCst) }))
    }
}

impl FakeLauncher {
    pub fn count(&self) -> usize {
        self.launched.lock().expect("launched").len()
    }
    pub fn guest(&self, i: usize) -> Arc<FakeGuest> {
        self.launched.lock().expect("launched")[i].0.clone()
    }
    pub fn stopped(&self, i: usize) -> bool {
        self.launched.lock().expect("launched")[i].1.load(Ordering::SeqCst)
    }
}
