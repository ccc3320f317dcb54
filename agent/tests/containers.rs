//! Containers for real, on the host, as root: the agent binary serves on a
//! Unix socket (`--listen unix://...`), the test builds a busybox rootfs
//! from Debian's `busybox-static`, runs containers through the Agent API
//! and checks from inside each that the setting took effect.
//!
//! The agent runs in its own mount namespace with a private cgroup2
//! mount on /sys/fs/cgroup (the host's cgroups are v1). The controllers
//! bound to v1 (memory, pids, cpu, io) are then missing from v2: the checks
//! that need them are skipped here with a printed reason, and covered in
//! the guest by tests/tests/agent_containers.rs.
//!
//! stdio: the test listens on `<agent socket>_<port>` for each stream
//! before asking for a process, as the VMM's vsock socket does on a real
//! host.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carapace_protocol::{agent, client, rpc_code, AgentClient, HealthClient};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);

fn agent_bin() -> String {
    std::env::var("CARAPACE_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carapace-agent").to_string())
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

/// Root (namespaces, mounts, cgroups) and busybox are needed; without them
/// every test here says so and passes (nothing else is skipped), or fails
/// under CARAPACE_REQUIRE_KVM=1.
fn can_run(test: &str) -> bool {
    use carapace_test_support::{can_run, skip, Need};
    if !can_run(test, &[Need::Root]) {
        return false;
    }
    Path::new("/bin/busybox").exists() || skip(test, "/bin/busybox (apt-get install busybox-static)")
}

/// A busybox rootfs: /bin/busybox, a symlink per applet, /etc/passwd and
/// /etc/group, the usual mount points.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "mnt", "data"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    let list = Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\nextra:x:2000:\n").expect("group");
    root
}

/// The agent under test, in its own mount namespace.
struct Agent {
    child: Child,
    sock: PathBuf,
    state: PathBuf,
    client: AgentClient,
    conn: ttrpc::Client,
    rootfs: PathBuf,
    dir: tempfile::TempDir,
    next_port: AtomicU32,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let state = dir.path().join("state");
        let rootfs = busybox_rootfs(dir.path());
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--state-dir")
            .arg(&state)
            .arg("--log-level")
            .arg(std::env::var("CARAPACE_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped());
        // SAFETY: only async-signal-safe system calls (unshare, mount)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::mount::{mount, MsFlags};
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
                mount(Some("cgroup2"), "/sys/fs/cgroup", Some("cgroup2"), MsFlags::empty(), None::<&str>)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start the agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(TIMEOUT).expect("the agent's first line");
        assert!(line.contains("serving on"), "{line:?}");
        let conn = client::connect_unix(&sock).expect("connect");
        let client = AgentClient::new(conn.clone());
        Self { child, sock, state, client, conn, rootfs, dir, next_port: AtomicU32::new(100) }
    }

    /// Container ids are unique per test run: cgroups of an earlier,
    /// interrupted run may still exist in the (host-wide) hierarchy.
    fn cid(&self, id: &str) -> String {
        format!("{id}-{}", std::process::id())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A path as the agent sees it (its mount namespace).
    fn agent_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid()))
    }

    /// The cgroup v2 controllers the agent's hierarchy offers.
    fn controllers(&self) -> Vec<String> {
        std::fs::read_to_string(self.agent_path("/sys/fs/cgroup/cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn has_controllers(&self, test: &str, wanted: &[&str]) -> bool {
        let have = self.controllers();
        let missing: Vec<_> = wanted.iter().filter(|w| !have.iter().any(|h| h == *w)).collect();
        if missing.is_empty() {
            return true;
        }
        eprintln!(
            "SKIP {test}: this host's cgroup v2 hierarchy lacks {missing:?} (bound to cgroup v1 here; \
             have {have:?}); the guest test covers it"
        );
        false
    }

    fn port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::SeqCst)
    }

    fn listen(&self, port: u32) -> UnixListener {
        let mut path = self.sock.clone().into_os_string();
        path.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(path)).expect("bind stdio port")
    }

    /// Listeners for a process's streams, accepted in the background.
    fn streams(&self, stdin: bool, stderr: bool) -> Streams {
        let out_port = self.port();
        let out = collect(self.listen(out_port));
        let (err_port, err) = if stderr {
            let p = self.port();
            (p, Some(collect(self.listen(p))))
        } else {
            (0, None)
        };
        let (in_port, stdin) = if stdin {
            let p = self.port();
            let l = self.listen(p);
            (p, Some(std::thread::spawn(move || l.accept().expect("accept stdin").0)))
        } else {
            (0, None)
        };
        let mut ports = agent::StdioStreams::new();
        ports.stdin_port = in_port;
        ports.stdout_port = out_port;
        ports.stderr_port = err_port;
        Streams { ports, stdout: Some(out), stderr: err, stdin }
    }

    fn create(&self, id: &str, spec: &Value, streams: &Streams) -> ttrpc::Result<u32> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = self.cid(id);
        req.oci_spec_json = serde_json::to_vec(spec).expect("json");
        req.stdio = Some(streams.ports.clone()).into();
        self.client.create_container(ctx(), &req).map(|r| r.pid)
    }

    fn start_container(&self, id: &str) -> u32 {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = self.cid(id);
        self.client.start_container(ctx(), &req).expect("StartContainer").pid
    }

    fn wait(&self, id: &str, exec_id: &str) -> agent::WaitProcessResponse {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = self.cid(id);
        req.exec_id = exec_id.into();
        self.client.wait_process(ttrpc::context::with_timeout(300_000_000_000), &req).expect("WaitProcess")
    }

    fn remove(&self, id: &str, force: bool) -> ttrpc::Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = self.cid(id);
        req.force = force;
        self.client.remove_container(ctx(), &req).map(drop)
    }

    fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> ttrpc::Result<()> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = self.cid(id);
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        self.client.signal_process(ctx(), &req).map(drop)
    }

    fn exec(&self, id: &str, exec_id: &str, process: &Value, terminal: bool, streams: &Streams) -> ttrpc::Result<u32> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = self.cid(id);
        req.exec_id = exec_id.into();
        req.process_json = serde_json::to_vec(process).expect("json");
        req.terminal = terminal;
        req.stdio = Some(streams.ports.clone()).into();
        self.client.exec_process(ctx(), &req).map(|r| r.pid)
    }

    /// Creates, starts and waits for a container; removes it; returns
    /// what it printed and how it ended.
    fn run(&self, id: &str, spec: &Value) -> Outcome {
        let mut streams = self.streams(false, true);
        if let Err(e) = self.create(id, spec, &streams) {
            panic!("CreateContainer {id}: {e:?}");
        }
        self.start_container(id);
        let wait = self.wait(id, "");
        let stdout = streams.stdout();
        let stderr = streams.stderr();
        self.remove(id, false).expect("RemoveContainer");
        Outcome {
            exit_code: wait.exit_code,
            signal: wait.signal,
            oom: wait.oom_killed,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// `run` of a shell script; asserts exit 0 and returns stdout.
    fn sh(&self, id: &str, script: &str, patch: impl FnOnce(&mut Value)) -> String {
        let mut spec = base_spec(&self.rootfs, &["sh", "-c", script]);
        patch(&mut spec);
        let out = self.run(id, &spec);
        assert_eq!(out.exit_code, 0, "{id}: {out:?}");
        out.stdout
    }

    /// Nothing of container `id` is left: state, cgroup, mounts, processes.
    fn assert_nothing_left(&self, id: &str) {
        let raw_id = id;
        let id = &self.cid(id);
        for p in [self.state.join("containers").join(id), self.state.join("bundles").join(id)] {
            assert!(!p.exists(), "{} left behind", p.display());
        }
        let cgroup = self.agent_path(&format!("/sys/fs/cgroup/carapace/{id}"));
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
        let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).expect("mountinfo");
        let rootfs = self.rootfs.display().to_string();
        assert!(!mountinfo.contains(&rootfs), "mounts left under the rootfs:\n{mountinfo}");
        let mut req = agent::ListProcessesRequest::new();
        req.container_id = self.cid(raw_id);
        let err = self.client.list_processes(ctx(), &req).expect_err("no such container");
        assert_eq!(rpc_code(&err), Some(ttrpc::Code::NOT_FOUND));
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid())).unwrap_or_default();
        assert!(children.trim().is_empty(), "the agent still has children: {children}");
        HealthClient::new(self.conn.clone()).check(ctx(), &carapace_protocol::health::CheckRequest::new()).expect("the agent still serves");
    }
}

#[derive(Debug)]
struct Outcome {
    exit_code: i32,
    signal: i32,
    oom: bool,
    stdout: String,
    stderr: String,
}

fn collect(listener: UnixListener) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read stream");
        buf
    })
}

struct Streams {
    ports: agent::StdioStreams,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    stdin: Option<JoinHandle<UnixStream>>,
}

impl Streams {
    fn stdout(&mut self) -> Vec<u8> {
        self.stdout.take().map(|h| h.join().expect("stdout reader")).unwrap_or_default()
    }
    fn stderr(&mut self) -> Vec<u8> {
        self.stderr.take().map(|h| h.join().expect("stderr reader")).unwrap_or_default()
    }
    fn stdin(&mut self) -> UnixStream {
        self.stdin.take().expect("a stdin stream").join().expect("stdin accept")
    }
}

const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A spec like `runc spec` makes, for the busybox rootfs.
fn base_spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "carapace",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/cpuinfo", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn status_field(status: &str, key: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).map(|v| v.trim().to_string()).unwrap_or_default()
}

/// Capability bits → CapEff hex as /proc shows it.
fn cap_mask(names: &[&str]) -> String {
    let bit = |n: &str| -> u32 {
        match n {
            "CAP_CHOWN" => 0,
            "CAP_DAC_OVERRIDE" => 1,
            "CAP_FOWNER" => 3,
            "CAP_FSETID" => 4,
            "CAP_KILL" => 5,
            "CAP_SETGID" => 6,
            "CAP_SETUID" => 7,
            "CAP_SETPCAP" => 8,
            "CAP_NET_BIND_SERVICE" => 10,
            "CAP_NET_RAW" => 13,
            "CAP_SYS_CHROOT" => 18,
            "CAP_SYS_ADMIN" => 21,
            "CAP_MKNOD" => 27,
            "CAP_AUDIT_WRITE" => 29,
            "CAP_SETFCAP" => 31,
            other => panic!("add {other}"),
        }
    };
    format!("{:016x}", names.iter().fold(0u64, |m, n| m | (1u64 << bit(n))))
}

#[test]
fn exit_codes_signals_and_process_settings() {
    if !can_run("exit_codes_signals_and_process_settings") {
        return;
    }
    let a = Agent::start();

    // Exit codes and signals come back exactly.
    let out = a.run("exit3", &base_spec(&a.rootfs, &["sh", "-c", "exit 3"]));
    assert_eq!((out.exit_code, out.signal, out.oom), (3, 0, false), "{out:?}");
    // (Without a PID namespace: as PID 1 of one, the shell could not be
    // killed from inside.)
    let mut spec = base_spec(&a.rootfs, &["sh", "-c", "kill -9 $$"]);
    spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]);
    let out = a.run("kill9", &spec);
    assert_eq!((out.exit_code, out.signal), (137, 9), "{out:?}");

    // SignalProcess to the init (SIGTERM reaches a process that waits).
    let streams = a.streams(false, false);
    a.create("term", &base_spec(&a.rootfs, &["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.1; done"]), &streams)
        .expect("create");
    a.start_container("term");
    std::thread::sleep(Duration::from_millis(300));
    a.signal("term", "", 15, false).expect("SIGTERM");
    assert_eq!(a.wait("term", "").exit_code, 42);
    // A second wait answers the same; signalling an exited process is NOT_FOUND.
    assert_eq!(a.wait("term", "").exit_code, 42);
    let err = a.signal("term", "", 15, false).expect_err("exited");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::NOT_FOUND));
    a.remove("term", false).expect("remove");

    // SIGKILL from outside ends even a PID 1 without handlers: 137.
    let streams = a.streams(false, false);
    a.create("sleeper", &base_spec(&a.rootfs, &["sleep", "100"]), &streams).expect("create");
    a.start_container("sleeper");
    a.signal("sleeper", "", 9, false).expect("SIGKILL");
    let w = a.wait("sleeper", "");
    assert_eq!((w.exit_code, w.signal), (137, 9));
    a.remove("sleeper", false).expect("remove");

    // args, env, cwd, user, umask, caps, NNP, rlimits, oomScoreAdj, hostname,
    // domainname, sysctl.
    let caps = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    let out = a.sh(
        "proc-settings",
        "echo args=$0,$1; echo env=$FOO home=$HOME; echo cwd=$(pwd); id; echo umask=$(umask); \
         grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|SigBlk|SigIgn):' /proc/self/status; \
         echo nofile=$(ulimit -n); echo oom=$(cat /proc/self/oom_score_adj); echo host=$(hostname); \
         echo domain=$(cat /proc/sys/kernel/domainname); echo fwd=$(cat /proc/sys/net/ipv4/ip_forward)",
        |s| {
            s["process"]["args"] = json!(["sh", "-c", s["process"]["args"][2], "first"]);
            s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
            s["process"]["cwd"] = json!("/tmp");
            s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 63});
            s["process"]["capabilities"] = json!({
                "bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps, "ambient": caps
            });
            s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}]);
            s["process"]["oomScoreAdj"] = json!(456);
            s["hostname"] = json!("box1");
            s["domainname"] = json!("example.org");
            s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        },
    );
    let mask = cap_mask(&caps);
    for want in [
        "args=first,".to_string(),
        "env=bar baz home=/tmp".into(),
        "cwd=/tmp".into(),
        "uid=1000(user) gid=1000(user) groups=2000(extra)".into(),
        "umask=0077".into(),
        "nofile=123".into(),
        "oom=456".into(),
        "host=box1".into(),
        "domain=example.org".into(),
        "fwd=1".into(),
    ] {
        assert!(out.contains(&want), "{want:?} not in:\n{out}");
    }
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&out, key), mask, "{key} in:\n{out}");
    }
    assert_eq!(status_field(&out, "NoNewPrivs"), "1", "{out}");
    assert_eq!(status_field(&out, "Seccomp"), "0", "{out}");
    // The agent's blocked signals and ignored SIGPIPE do not leak in.
    assert_eq!(status_field(&out, "SigBlk"), "0000000000000000", "{out}");
    let ignored = u64::from_str_radix(&status_field(&out, "SigIgn"), 16).expect("SigIgn");
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE ignored: {out}");
    // The agent's own oom_score_adj is untouched.
    assert_eq!(std::fs::read_to_string(format!("/proc/{}/oom_score_adj", a.pid())).expect("read").trim(), "0");

    // The default capability set as runc gives it, and NNP off.
    let out = a.sh("default-caps", "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status", |s| {
        s["process"]["noNewPrivileges"] = json!(false);
    });
    assert_eq!(status_field(&out, "CapEff"), cap_mask(DEFAULT_CAPS), "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs"), "0", "{out}");
}

#[test]
fn namespaces_and_joining_one_by_path() {
    if !can_run("namespaces_and_joining_one_by_path") {
        return;
    }
    let a = Agent::start();
    let host_ns = |ns: &str| std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns").display().to_string();

    let out = a.sh(
        "ns",
        "echo pid=$$; for n in net ipc uts mnt cgroup user; do echo $n=$(readlink /proc/self/ns/$n); done; \
         echo cg=$(grep '^0::' /proc/self/cgroup); echo links=$(cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ')",
        |_| {},
    );
    assert!(out.contains("pid=1\n"), "{out}");
    for ns in ["net", "ipc", "uts", "mnt", "cgroup"] {
        let line = out.lines().find(|l| l.starts_with(&format!("{ns}="))).expect("line");
        assert!(!line.ends_with(&host_ns(ns)), "{ns} is the host's: {line}");
    }
    let user_line = out.lines().find(|l| l.starts_with("user=")).expect("user");
    assert!(user_line.ends_with(&host_ns("user")), "no user namespace asked: {user_line}");
    assert!(out.contains("cg=0::/\n"), "{out}");
    assert!(out.contains("links=lo\n"), "only loopback in a new netns: {out}");

    // A user namespace with mappings: root inside is 100000 outside.
    let out = a.sh("userns", "cat /proc/self/uid_map /proc/self/gid_map; id -u; readlink /proc/self/ns/user", |s| {
        s["linux"]["namespaces"].as_array_mut().expect("array").push(json!({"type": "user"}));
        s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        // sysfs and cgroup need the owning user namespace's privileges.
        let mounts: Vec<Value> =
            s["mounts"].as_array().expect("mounts").iter().filter(|m| m["type"] != "sysfs" && m["type"] != "cgroup").cloned().collect();
        s["mounts"] = Value::Array(mounts);
    });
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&words[..6], ["0", "100000", "65536", "0", "100000", "65536"], "{out}");
    assert_eq!(words[6], "0", "{out}");
    assert_ne!(words[7], host_ns("user"), "{out}");

    // Joining a namespace by path: a second container in the first one's
    // network and UTS namespaces.
    let streams = a.streams(false, false);
    let mut first = base_spec(&a.rootfs, &["sleep", "100"]);
    first["hostname"] = json!("shared-uts");
    let pid = a.create("holder", &first, &streams).expect("create holder");
    a.start_container("holder");
    let holder_net = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns").display().to_string();
    let out = a.sh("joiner", "readlink /proc/self/ns/net; hostname", |s| {
        s["linux"]["namespaces"] = json!([
            {"type": "pid"}, {"type": "ipc"}, {"type": "mount"}, {"type": "cgroup"},
            {"type": "network", "path": format!("/proc/{pid}/ns/net")},
            {"type": "uts", "path": format!("/proc/{pid}/ns/uts")}
        ]);
        s.as_object_mut().expect("spec").remove("hostname");
    });
    assert_eq!(out, format!("{holder_net}\nshared-uts\n"));
    a.remove("holder", true).expect("force remove");
    a.assert_nothing_left("holder");
}

#[test]
fn root_mounts_masks_and_devices() {
    if !can_run("root_mounts_masks_and_devices") {
        return;
    }
    let a = Agent::start();
    let shared = a.dir.path().join("shared");
    std::fs::create_dir_all(shared.join("sub")).expect("mkdir");
    std::fs::write(shared.join("hello.txt"), "from the host\n").expect("write");
    std::fs::write(shared.join("sub/deep.txt"), "deep\n").expect("write");
    let sub_mount = a.dir.path().join("submount");
    std::fs::create_dir_all(&sub_mount).expect("mkdir");
    // A mount under the bind source: only rbind carries it along.
    nix::mount::mount(Some("tmpfs"), &sub_mount, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).ok();
    let out = a.sh(
        "mounts",
        "touch /rootfile 2>/dev/null && echo root=rw || echo root=ro; \
         cat /data/ro/hello.txt; (echo x > /data/ro/new) 2>/dev/null && echo ro-bind=rw || echo ro-bind=ro; \
         echo y > /data/rw/written && echo rw-bind=rw; cat /data/rw/sub/deep.txt; \
         grep ' /mnt/t ' /proc/self/mountinfo | grep -q 'size=1024k' && echo tmpfs-size=ok; \
         stat -c 'mode=%a' /mnt/t; cat /mnt/t/order 2>/dev/null || echo order=top-tmpfs; \
         stat -c 'masked=%t:%T' /proc/cpuinfo; wc -c < /proc/cpuinfo | sed 's/^/cpuinfo=/'; \
         ls /sys/firmware | wc -l | sed 's/^/firmware=/'; \
         (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null && echo procsys=rw || echo procsys=ro; \
         ls /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty >/dev/null && echo default-devs=ok; \
         stat -c 'fuse=%t:%T %a' /dev/fuse; head -c 4 /dev/zero | wc -c | sed 's/^/zero=/'; \
         grep ' / / ' /proc/self/mountinfo | grep -q shared && echo prop=shared || echo prop=private; \
         ls /dev/mqueue >/dev/null && echo mqueue=ok",
        |s| {
            let mounts = s["mounts"].as_array_mut().expect("mounts");
            mounts.push(json!({"destination": "/data/ro", "type": "bind", "source": shared, "options": ["bind", "ro"]}));
            mounts.push(json!({"destination": "/data/rw", "type": "bind", "source": shared, "options": ["rbind", "rw"]}));
            mounts.push(json!({"destination": "/mnt/t", "type": "tmpfs", "source": "tmpfs", "options": ["size=1024k", "mode=750"]}));
            s["linux"]["devices"] =
                json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o640, "uid": 0, "gid": 0}]);
            s["linux"]["rootfsPropagation"] = json!("private");
        },
    );
    let _ = nix::mount::umount2(&sub_mount, nix::mount::MntFlags::MNT_DETACH);
    std::fs::remove_file(shared.join("written")).ok();
    for want in [
        "root=ro",
        "from the host",
        "ro-bind=ro",
        "rw-bind=rw",
        "deep",
        "tmpfs-size=ok",
        "mode=750",
        "order=top-tmpfs",
        "masked=1:3",
        "cpuinfo=0",
        "firmware=0",
        "procsys=ro",
        "default-devs=ok",
        "fuse=a:e5 640",
        "zero=4",
        "prop=private",
        "mqueue=ok",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }

    // Mounts go in order: a tmpfs, then a bind onto a directory inside it.
    let out = a.sh("mount-order", "cat /mnt/a/b/hello.txt; stat -f -c %T /mnt/a", |s| {
        let mounts = s["mounts"].as_array_mut().expect("mounts");
        mounts.push(json!({"destination": "/mnt/a", "type": "tmpfs", "source": "tmpfs", "options": []}));
        mounts.push(json!({"destination": "/mnt/a/b", "type": "bind", "source": shared, "options": ["bind"]}));
    });
    assert_eq!(out, "from the host\ntmpfs\n");

    // A writable root when readonly is false.
    let out = a.sh("rw-root", "touch /rootfile && echo root=rw && rm /rootfile", |s| {
        s["root"]["readonly"] = json!(false);
    });
    assert_eq!(out, "root=rw\n");
    a.assert_nothing_left("mounts");
}

#[test]
fn seccomp_is_enforced() {
    if !can_run("seccomp_is_enforced") {
        return;
    }
    let a = Agent::start();
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "args": [{"index": 1, "value": 10, "op": "SCMP_CMP_EQ"}]},
            {"names": ["sync"], "action": "SCMP_ACT_KILL"}
        ]
    });
    let script = "grep '^Seccomp:' /proc/self/status; mkdir /tmp/x 2>&1; \
                  trap 'echo usr2=delivered' USR2; trap 'echo usr1=delivered' USR1; \
                  kill -USR1 $$ 2>/dev/null || echo usr1=denied; kill -USR2 $$; sync";
    let mut spec = base_spec(&a.rootfs, &["sh", "-c", script]);
    spec["linux"]["seccomp"] = profile.clone();
    let out = a.run("seccomp", &spec);
    assert!(out.stdout.contains("Seccomp:\t2"), "{out:?}");
    assert!(out.stdout.contains("Permission denied"), "mkdir gets errno 13: {out:?}");
    // kill(2) is refused only when its second argument is SIGUSR1.
    assert!(out.stdout.contains("usr1=denied"), "{out:?}");
    assert!(out.stdout.contains("usr2=delivered"), "{out:?}");
    // sync(2) is SCMP_ACT_KILL: SIGSYS, 128 + 31.
    assert_eq!(out.exit_code, 159, "{out:?}");

    // Without noNewPrivileges and without CAP_SYS_ADMIN the filter still
    // loads (before the capabilities are dropped).
    let mut spec = base_spec(&a.rootfs, &["sh", "-c", "grep '^Seccomp:' /proc/self/status; mkdir /tmp/y"]);
    spec["process"]["noNewPrivileges"] = json!(false);
    spec["linux"]["seccomp"] = profile;
    let out = a.run("seccomp-nnp-off", &spec);
    assert!(out.stdout.contains("Seccomp:\t2"), "{out:?}");
    assert_eq!(out.exit_code, 1, "{out:?}");
}

#[test]
fn cgroups_pause_stats_and_limits() {
    if !can_run("cgroups_pause_stats_and_limits") {
        return;
    }
    let a = Agent::start();
    let streams = a.streams(false, false);
    let mut spec = base_spec(&a.rootfs, &["sleep", "100"]);
    spec["linux"]["cgroupsPath"] = json!(format!("/carapace/{}", a.cid("cg1")));
    a.create("cg1", &spec, &streams).expect("create");
    let init = a.start_container("cg1");
    let cgroup = a.agent_path(&format!("/sys/fs/cgroup/carapace/{}", a.cid("cg1")));
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).expect("cgroup.procs");
    assert_eq!(procs.trim(), init.to_string());

    let mut req = agent::ListProcessesRequest::new();
    req.container_id = a.cid("cg1");
    assert_eq!(a.client.list_processes(ctx(), &req).expect("ps").pids, vec![init]);

    let mut req = agent::PauseContainerRequest::new();
    req.container_id = a.cid("cg1");
    a.client.pause_container(ctx(), &req).expect("pause");
    assert_eq!(std::fs::read_to_string(cgroup.join("cgroup.freeze")).expect("freeze").trim(), "1");
    let state = std::fs::read_to_string(format!("/proc/{init}/status")).expect("status");
    let frozen = wait_until(|| std::fs::read_to_string(cgroup.join("cgroup.events")).is_ok_and(|e| e.contains("frozen 1")));
    assert!(frozen, "{state}");
    let mut req = agent::ResumeContainerRequest::new();
    req.container_id = a.cid("cg1");
    a.client.resume_container(ctx(), &req).expect("resume");
    assert_eq!(std::fs::read_to_string(cgroup.join("cgroup.freeze")).expect("freeze").trim(), "0");

    let mut req = agent::StatsContainerRequest::new();
    req.container_id = a.cid("cg1");
    let stats = a.client.stats_container(ctx(), &req).expect("stats");
    assert!(stats.timestamp_unix_nano > 0);
    assert!(stats.cgroup.is_some());

    // UpdateContainer: applied where the controller exists, refused
    // (FAILED_PRECONDITION, naming it) where it does not.
    let mut req = agent::UpdateContainerRequest::new();
    req.container_id = a.cid("cg1");
    req.resources_json = br#"{"pids": {"limit": 33}}"#.to_vec();
    match a.client.update_container(ctx(), &req) {
        Ok(_) => assert_eq!(std::fs::read_to_string(cgroup.join("pids.max")).expect("pids.max").trim(), "33"),
        Err(err) => {
            assert!(!a.controllers().iter().any(|c| c == "pids"), "{err:?}");
            assert_eq!(rpc_code(&err), Some(ttrpc::Code::FAILED_PRECONDITION), "{err:?}");
            assert!(format!("{err:?}").contains("pids"), "{err:?}");
        }
    }
    req.resources_json = b"{not json".to_vec();
    let err = a.client.update_container(ctx(), &req).expect_err("bad JSON");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::INVALID_ARGUMENT), "{err:?}");

    // Running: refused without force; with force, everything goes.
    let err = a.remove("cg1", false).expect_err("running");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::FAILED_PRECONDITION));
    a.remove("cg1", true).expect("force");
    a.assert_nothing_left("cg1");

    // Limits need the controllers (not on this host's v2 hierarchy).
    if a.has_controllers("cgroups_pause_stats_and_limits (limits)", &["memory", "pids", "cpu"]) {
        let out =
            a.sh("limits", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.weight", |s| {
                s["linux"]["resources"] = json!({
                    "memory": {"limit": 67108864, "reservation": 33554432},
                    "pids": {"limit": 20},
                    "cpu": {"shares": 512, "quota": 50000, "period": 100000}
                });
            });
        assert!(out.starts_with("67108864\n20\n50000 100000\n"), "{out}");
    } else {
        // The agent refuses what it cannot enforce.
        let mut spec = base_spec(&a.rootfs, &["true"]);
        spec["linux"]["resources"] = json!({"pids": {"limit": 20}});
        let err = a.create("nolimits", &spec, &a.streams(false, false)).expect_err("no pids controller");
        assert_eq!(rpc_code(&err), Some(ttrpc::Code::FAILED_PRECONDITION), "{err:?}");
        assert!(format!("{err:?}").contains("pids"), "{err:?}");
        a.assert_nothing_left("nolimits");
    }
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + TIMEOUT;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn hooks_run_in_the_container_namespace() {
    if !can_run("hooks_run_in_the_container_namespace") {
        return;
    }
    let a = Agent::start();
    let out_dir = a.dir.path().join("hooks");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let created = out_dir.join("created.json");
    // createContainer: runtime's paths, container's namespaces (its
    // hostname), the state on stdin. startContainer: the container's
    // paths (after pivot_root).
    let out = a.sh("hooked", "cat /tmp/started", |s| {
        s["hooks"] = json!({
            "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c",
                format!("cat > {0}; echo >> {0}; hostname >> {0}", created.display())], "timeout": 10}],
            "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "read state; echo \"$state\" > /tmp/started; hostname >> /tmp/started"]}],
        });
    });
    let created_text = std::fs::read_to_string(&created).expect("createContainer hook output");
    let (state, host) = created_text.split_once('\n').expect("two lines");
    let state: Value = serde_json::from_str(state).expect("state JSON on stdin");
    assert_eq!(state["id"], a.cid("hooked"));
    assert_eq!(host, "carapace\n", "the hook saw the container's UTS namespace");
    let (start_state, start_host) = out.split_once('\n').expect("two lines");
    let start_state: Value = serde_json::from_str(start_state).expect("state JSON");
    assert_eq!(start_state["id"], a.cid("hooked"));
    // (libcontainer 0.7 gives startContainer hooks the state without a pid.)
    assert_eq!(start_host, "carapace\n");

    // A hook over its timeout fails the creation, which leaves nothing.
    let mut spec = base_spec(&a.rootfs, &["true"]);
    spec["hooks"] = json!({"createContainer": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]});
    let started = Instant::now();
    let err = a.create("slowhook", &spec, &a.streams(false, false)).expect_err("timeout");
    assert!(started.elapsed() < Duration::from_secs(20), "the timeout was not applied");
    assert!(format!("{err:?}").contains("hook"), "{err:?}");
    wait_until(|| std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", a.pid())).is_ok_and(|c| c.trim().is_empty()));
    a.assert_nothing_left("slowhook");
}

#[test]
fn stdio_streams_big_output_stdin_and_terminal() {
    if !can_run("stdio_streams_big_output_stdin_and_terminal") {
        return;
    }
    let a = Agent::start();

    // 10 MiB through stdout, intact and in order (seq: every line differs).
    let lines = 1_450_000u32;
    let out = a.run("bigout", &base_spec(&a.rootfs, &["seq", "1", &lines.to_string()]));
    assert_eq!(out.exit_code, 0);
    let mut want = String::with_capacity(out.stdout.len());
    for i in 1..=lines {
        want.push_str(&i.to_string());
        want.push('\n');
    }
    assert!(want.len() > 10 * 1024 * 1024, "{}", want.len());
    assert!(out.stdout == want, "stdout differs ({} bytes, want {})", out.stdout.len(), want.len());

    // Written just before exit, still arrives (and on both streams).
    let out = a.run("lastwords", &base_spec(&a.rootfs, &["sh", "-c", "echo out; echo err >&2; exit 5"]));
    assert_eq!((out.exit_code, out.stdout.as_str(), out.stderr.as_str()), (5, "out\n", "err\n"));

    // stdin reaches the process; the host's EOF ends it.
    let mut streams = a.streams(true, false);
    a.create("cat", &base_spec(&a.rootfs, &["wc", "-c"]), &streams).expect("create");
    let mut stdin = streams.stdin();
    a.start_container("cat");
    let data = vec![b'x'; 3 * 1024 * 1024 + 7];
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).expect("write stdin");
        stdin
    });
    // CloseStdin once it is all written: EOF after what was sent.
    let stdin = writer.join().expect("writer");
    std::thread::sleep(Duration::from_millis(200));
    let mut req = agent::CloseStdinRequest::new();
    req.container_id = a.cid("cat");
    a.client.close_stdin(ctx(), &req).expect("CloseStdin");
    assert_eq!(a.wait("cat", "").exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&streams.stdout()).trim(), (3 * 1024 * 1024 + 7).to_string());
    drop(stdin);
    a.remove("cat", false).expect("remove");

    // The host closing its stdin stream is an EOF too.
    let mut streams = a.streams(true, false);
    a.create("cat2", &base_spec(&a.rootfs, &["cat"]), &streams).expect("create");
    let mut stdin = streams.stdin();
    a.start_container("cat2");
    stdin.write_all(b"echo me\n").expect("write");
    stdin.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(a.wait("cat2", "").exit_code, 0);
    assert_eq!(streams.stdout(), b"echo me\n");
    a.remove("cat2", false).expect("remove");

    // A terminal: a pty of the requested size; ResizeTty changes it.
    let mut streams = a.streams(true, false);
    let mut spec = base_spec(&a.rootfs, &["sh", "-c", "tty; stty size; read x; stty size; exit 4"]);
    spec["process"]["terminal"] = json!(true);
    spec["process"]["consoleSize"] = json!({"height": 40, "width": 100});
    a.create("tty", &spec, &streams).expect("create");
    let mut stdin = streams.stdin();
    a.start_container("tty");
    // Wait until the first size is printed before resizing.
    let mut req = agent::ResizeTtyRequest::new();
    req.container_id = a.cid("tty");
    req.rows = 50;
    req.cols = 120;
    std::thread::sleep(Duration::from_millis(500));
    a.client.resize_tty(ctx(), &req).expect("ResizeTty");
    stdin.write_all(b"go\n").expect("write");
    assert_eq!(a.wait("tty", "").exit_code, 4);
    let out = String::from_utf8_lossy(&streams.stdout()).replace('\r', "");
    assert!(out.contains("/dev/pts/0\n40 100\n"), "{out:?}");
    assert!(out.contains("50 120\n"), "{out:?}");
    a.remove("tty", false).expect("remove");
}

#[test]
fn exec_processes_and_signal_all() {
    if !can_run("exec_processes_and_signal_all") {
        return;
    }
    let a = Agent::start();
    let streams = a.streams(false, false);
    let spec = base_spec(&a.rootfs, &["sleep", "100"]);
    let init = a.create("host", &spec, &streams).expect("create");

    // Exec before start: FAILED_PRECONDITION.
    let process = json!({"args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
    let err = a.exec("host", "early", &process, false, &a.streams(false, false)).expect_err("not started");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::FAILED_PRECONDITION));
    a.start_container("host");

    // An exec'd process in the container's namespaces, with its own user
    // and env; its exit code and output come back.
    let mut streams = a.streams(false, true);
    let process = json!({
        "args": ["sh", "-c", "echo pid1=$(cat /proc/1/comm) user=$(id -u) v=$V; echo oops >&2; exit 7"],
        "cwd": "/tmp", "env": ["PATH=/bin", "V=exec"], "user": {"uid": 1000, "gid": 1000},
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}
    });
    a.exec("host", "e1", &process, false, &streams).expect("exec");
    let w = a.wait("host", "e1");
    assert_eq!(w.exit_code, 7);
    assert_eq!(String::from_utf8_lossy(&streams.stdout()), "pid1=sleep user=1000 v=exec\n");
    assert_eq!(String::from_utf8_lossy(&streams.stderr()), "oops\n");

    // The same exec id twice: ALREADY_EXISTS.
    let err = a.exec("host", "e1", &process, false, &a.streams(false, false)).expect_err("dup");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::ALREADY_EXISTS));

    // An exec with a terminal.
    let mut streams = a.streams(true, false);
    let process = json!({"args": ["sh", "-c", "tty; read x; echo got=$x"], "cwd": "/", "env": ["PATH=/bin"],
                         "user": {"uid": 0, "gid": 0}, "consoleSize": {"height": 10, "width": 20}});
    a.exec("host", "t1", &process, true, &streams).expect("exec tty");
    let mut stdin = streams.stdin();
    stdin.write_all(b"abc\n").expect("write");
    assert_eq!(a.wait("host", "t1").exit_code, 0);
    let out = String::from_utf8_lossy(&streams.stdout()).replace('\r', "");
    assert!(out.contains("/dev/pts/") && out.contains("got=abc"), "{out:?}");

    // A long-running exec, listed; SignalProcess to all kills both.
    let streams = a.streams(false, false);
    let bg = json!({"args": ["sleep", "100"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
    let bg_pid = a.exec("host", "bg", &bg, false, &streams).expect("exec bg");
    let mut req = agent::ListProcessesRequest::new();
    req.container_id = a.cid("host");
    let pids: HashSet<u32> = a.client.list_processes(ctx(), &req).expect("ps").pids.into_iter().collect();
    assert!(pids.contains(&init) && pids.contains(&bg_pid), "{pids:?} {init} {bg_pid}");
    a.signal("host", "", 9, true).expect("kill all");
    assert_eq!(a.wait("host", "").signal, 9);
    assert_eq!(a.wait("host", "bg").exit_code, 137);
    a.remove("host", false).expect("remove");
    a.assert_nothing_left("host");
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if !can_run("bad_input_is_refused_and_leaves_nothing") {
        return;
    }
    let a = Agent::start();
    type Patch = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Patch, &str)> = vec![
        (
            "noargs",
            Box::new(|s| {
                s["process"]["args"] = json!([]);
            }),
            "process.args",
        ),
        (
            "relcwd",
            Box::new(|s| {
                s["process"]["cwd"] = json!("tmp");
            }),
            "process.cwd",
        ),
        (
            "badns",
            Box::new(|s| {
                s["linux"]["namespaces"][1]["type"] = json!("bogus");
            }),
            "linux.namespaces[1].type",
        ),
        (
            "badsys",
            Box::new(|s| {
                s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["no_such_syscall"], "action": "SCMP_ACT_ERRNO"}]});
            }),
            "linux.seccomp.syscalls[0].names[0]",
        ),
        (
            "noroot",
            Box::new(|s| {
                s["root"]["path"] = json!("/nonexistent/rootfs");
            }),
            "root.path",
        ),
        ("badid/../x", Box::new(|_| {}), "container_id"),
    ];
    for (id, patch, field) in cases {
        let mut spec = base_spec(&a.rootfs, &["true"]);
        patch(&mut spec);
        let err = a.create(id, &spec, &a.streams(false, false)).expect_err(id);
        assert_eq!(rpc_code(&err), Some(ttrpc::Code::INVALID_ARGUMENT), "{id}: {err:?}");
        assert!(format!("{err:?}").contains(field), "{id}: the message names {field}: {err:?}");
        if !id.contains('/') {
            a.assert_nothing_left(id);
        }
    }

    // Failures past validation leave nothing either: a program that does
    // not exist, a duplicate id.
    let spec = base_spec(&a.rootfs, &["/no/such/program"]);
    let err = a.create("noprog", &spec, &a.streams(false, false)).expect_err("no program");
    assert!(format!("{err:?}").contains("/no/such/program"), "{err:?}");
    wait_until(|| std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", a.pid())).is_ok_and(|c| c.trim().is_empty()));
    a.assert_nothing_left("noprog");

    let streams = a.streams(false, false);
    a.create("dup", &base_spec(&a.rootfs, &["true"]), &streams).expect("create");
    let err = a.create("dup", &base_spec(&a.rootfs, &["true"]), &a.streams(false, false)).expect_err("dup");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::ALREADY_EXISTS));
    // A created, never started container is removed without force.
    a.remove("dup", false).expect("remove created");
    a.assert_nothing_left("dup");

    // Unknown ids.
    let err = a.remove("ghost", false).expect_err("ghost");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::NOT_FOUND));
}

#[test]
fn a_process_without_path_starts_from_an_absolute_program() {
    if !can_run("a_process_without_path_starts_from_an_absolute_program") {
        return;
    }
    let a = Agent::start();
    // As runc: no PATH needed when args[0] has a '/' (pause images).
    let mut spec = base_spec(&a.rootfs, &["/bin/cat", "/proc/self/environ"]);
    spec["process"]["env"] = json!(["HOME=/root"]);
    let out = a.run("nopath", &spec);
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, "HOME=/root\0"), "{out:?}");

    // A bare name without PATH: refused, naming args[0]; nothing left.
    let mut spec = base_spec(&a.rootfs, &["true"]);
    spec["process"]["env"] = json!(["HOME=/root"]);
    let err = a.create("barename", &spec, &a.streams(false, false)).expect_err("no PATH");
    let message = format!("{err:?}");
    assert!(message.contains("process.args[0] \\\"true\\\": not found"), "{message}");
    assert!(message.contains("no PATH"), "{message}");
    wait_until(|| std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", a.pid())).is_ok_and(|c| c.trim().is_empty()));
    a.assert_nothing_left("barename");

    // ExecProcess follows the same rule.
    let streams = a.streams(false, false);
    a.create("holder", &base_spec(&a.rootfs, &["sleep", "100"]), &streams).expect("create");
    a.start_container("holder");
    let mut streams = a.streams(false, false);
    let process = json!({"args": ["/bin/echo", "exec-ok"], "cwd": "/", "env": [], "user": {"uid": 0, "gid": 0}});
    a.exec("holder", "e1", &process, false, &streams).expect("exec without PATH");
    assert_eq!(a.wait("holder", "e1").exit_code, 0);
    assert_eq!(streams.stdout(), b"exec-ok\n");
    let process = json!({"args": ["echo"], "cwd": "/", "env": [], "user": {"uid": 0, "gid": 0}});
    let err = a.exec("holder", "e2", &process, false, &a.streams(false, false)).expect_err("bare exec");
    assert!(format!("{err:?}").contains("\\\"echo\\\": not found"), "{err:?}");
    a.remove("holder", true).expect("remove");
    a.assert_nothing_left("holder");
}

#[test]
fn terminals_work_with_cri_length_ids() {
    if !can_run("terminals_work_with_cri_length_ids") {
        return;
    }
    let a = Agent::start();
    // CRI ids are 64 hex characters: console sockets must not be named
    // after them (a Unix socket path has 108 bytes).
    let id = "c".repeat(60);
    let exec_id = "e".repeat(64);
    let mut streams = a.streams(false, false);
    let mut spec = base_spec(&a.rootfs, &["sh", "-c", "tty; sleep 100"]);
    spec["process"]["terminal"] = json!(true);
    a.create(&id, &spec, &streams).expect("create with a terminal");
    assert!(a.cid(&id).len() >= 64);
    a.start_container(&id);

    let mut exec_streams = a.streams(true, false);
    let process = json!({"args": ["sh", "-c", "tty; read x; echo got=$x"], "cwd": "/", "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0}});
    a.exec(&id, &exec_id, &process, true, &exec_streams).expect("exec -it with a 64-character id");
    let mut stdin = exec_streams.stdin();
    stdin.write_all(b"yes\n").expect("write");
    assert_eq!(a.wait(&id, &exec_id).exit_code, 0);
    let out = String::from_utf8_lossy(&exec_streams.stdout()).replace('\r', "");
    assert!(out.contains("/dev/pts/") && out.contains("got=yes"), "{out:?}");
    let tty_dir = a.state.join("tty");
    let left: Vec<_> = std::fs::read_dir(&tty_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "console sockets left: {left:?}");
    a.remove(&id, true).expect("remove");
    assert!(String::from_utf8_lossy(&streams.stdout()).contains("/dev/pts/0"));
    a.assert_nothing_left(&id);
}

#[test]
fn pod_containers_join_the_sandbox_containers_namespaces() {
    if !can_run("pod_containers_join_the_sandbox_containers_namespaces") {
        return;
    }
    let a = Agent::start();
    let streams = a.streams(false, false);
    let mut pause = base_spec(&a.rootfs, &["sleep", "100"]);
    pause["hostname"] = json!("the-pod");
    a.create("pause", &pause, &streams).expect("create pause");
    a.start_container("pause");

    let create_joining = |id: &str, script: &str, joins: &[(&str, &str)], streams: &Streams| {
        let mut spec = base_spec(&a.rootfs, &["sh", "-c", script]);
        spec["hostname"] = json!("ignored-when-joined");
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = a.cid(id);
        req.oci_spec_json = serde_json::to_vec(&spec).expect("json");
        req.stdio = Some(streams.ports.clone()).into();
        for (typ, target) in joins {
            req.join_namespaces.insert((*typ).into(), a.cid(target));
        }
        a.client.create_container(ctx(), &req).map(|r| r.pid)
    };

    // IPC, UTS and PID of the pause container: a SysV segment made in the
    // pod is seen, the pod's hostname, PID 1 is the pause process.
    let mut streams = a.streams(false, true);
    let script = "for t in ipc uts pid; do readlink /proc/self/ns/$t; done; hostname; cat /proc/1/comm";
    create_joining("member", script, &[("ipc", "pause"), ("uts", "pause"), ("pid", "pause")], &streams).expect("create joining");
    a.start_container("member");
    assert_eq!(a.wait("member", "").exit_code, 0);
    let out = String::from_utf8_lossy(&streams.stdout()).into_owned();
    let pause_pid = {
        let mut req = agent::ListProcessesRequest::new();
        req.container_id = a.cid("pause");
        a.client.list_processes(ctx(), &req).expect("pids").pids[0]
    };
    let ns = |t: &str| std::fs::read_link(format!("/proc/{pause_pid}/ns/{t}")).expect("readlink").display().to_string();
    let want = format!("{}\n{}\n{}\nthe-pod\nsleep\n", ns("ipc"), ns("uts"), ns("pid"));
    assert_eq!(out, want, "stderr: {}", String::from_utf8_lossy(&streams.stderr()));
    a.remove("member", false).expect("remove member");

    a.remove("pause", true).expect("remove pause");
    a.assert_nothing_left("pause");

    // Unknown type or container: INVALID_ARGUMENT naming it, nothing left.
    for (joins, named) in [(&[("network", "pause")][..], "join_namespaces[\\\"network\\\"]"), (&[("ipc", "ghost")][..], "container \\\"")] {
        let err = create_joining("bad", "true", joins, &a.streams(false, false)).expect_err("refused");
        assert_eq!(rpc_code(&err), Some(ttrpc::Code::INVALID_ARGUMENT), "{err:?}");
        assert!(format!("{err:?}").contains(named), "{err:?}");
        a.assert_nothing_left("bad");
    }
}

#[test]
fn a_shared_pid_namespace_puts_the_first_container_at_pid_1() {
    if !can_run("a_shared_pid_namespace_puts_the_first_container_at_pid_1") {
        return;
    }
    let a = Agent::start();
    let mut sandbox = agent::CreateSandboxRequest::new();
    sandbox.sandbox_id = "pod".into();
    sandbox.settings.mut_or_insert_default().shared_pid_namespace = true;
    a.client.create_sandbox(ctx(), &sandbox).expect("CreateSandbox");
    let streams = a.streams(false, false);
    a.create("first", &base_spec(&a.rootfs, &["sleep", "100"]), &streams).expect("create first");
    a.start_container("first");
    let out = a.sh("second", "cat /proc/1/comm", |_| {});
    assert_eq!(out, "sleep\n");
    a.remove("first", true).expect("remove");
    a.assert_nothing_left("first");
}
