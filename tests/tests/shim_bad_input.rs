//! Issue 7, the shim's half: bad input reaching `containerd-shim-carapace-v2`
//! the way containerd talks to it. containerd and `ctr` check ids and write
//! bundles themselves, so here the test plays containerd: it runs the shim's
//! `start` action in a bundle directory with containerd's environment,
//! connects to the address printed, calls Task.Create with the bundle (and
//! the rootfs mount containerd would send), then Shutdown and the `delete`
//! action. A fake containerd ttrpc socket records the events the shim sends.
//!
//! Each row must fail with an error naming the file, field or value; no
//! process may panic; the shim keeps serving (or exits cleanly); and
//! afterwards there is no VMM, no mount (in the shim's own mount namespace
//! as in ours), no sandbox directory and no shim socket. Every bundle row
//! fails before a VM boots; one VM is booted for the rows that need a
//! running container (exec ids, exec specs, a hostile second container).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_shim::protos::api;
use carapace_shim::protos::protobuf::well_known_types::any::Any;
use carapace_shim::protos::protobuf::well_known_types::empty::Empty;
use carapace_shim::protos::shim_sync::{create_events, Client, Events, TaskClient};
use carapace_tests::cli::{busybox_rootfs, Cli};
use carapace_tests::{kvm_available, processes_matching, wait_for, Assets, BOOT_DEADLINE};
use serde_json::{json, Value};

const NAMESPACE: &str = "bad-input";
/// A Task call that does not boot a VM answers within this.
const CALL: Duration = Duration::from_secs(30);

/// Topics of the events the shim forwarded to "containerd".
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Events for Recorder {
    fn forward(&self, _: &ttrpc::TtrpcContext, req: api::ForwardRequest) -> ttrpc::Result<Empty> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push(req.envelope.topic.clone());
        }
        Ok(Empty::new())
    }
}

/// What containerd would be for the shim: the environment and flags it
/// passes, a ttrpc socket taking events, and the snapshot (a busybox
/// rootfs) it would mount as a container's rootfs.
struct Containerd {
    tmp: tempfile::TempDir,
    assets: Assets,
    shim_root: PathBuf,
    grpc_address: String,
    ttrpc_address: String,
    events: Arc<Recorder>,
    _server: ttrpc::Server,
    snapshot: PathBuf,
    base_spec: Value,
}

impl Containerd {
    fn new() -> Self {
        let assets = Assets::get();
        assert!(assets.bin("containerd-shim-carapace-v2").exists(), "containerd-shim-carapace-v2 is not built");
        let tmp = tempfile::tempdir().expect("tempdir");
        let events = Arc::new(Recorder::default());
        let ttrpc_address = format!("unix://{}", tmp.path().join("containerd.sock.ttrpc").display());
        let mut server = ttrpc::Server::new().bind(&ttrpc_address).expect("events socket").register_service(create_events(events.clone()));
        server.start().expect("events server");
        let snapshot = tmp.path().join("snapshot");
        busybox_rootfs(&snapshot);
        // The config a user gets from `carapace spec`, run by the shim.
        let spec_dir = tmp.path().join("spec");
        std::fs::create_dir(&spec_dir).expect("mkdir");
        Cli::new(&tmp.path().join("cli-root")).ok(&["spec", "--bundle", &spec_dir.display().to_string()]);
        let mut base_spec: Value =
            serde_json::from_slice(&std::fs::read(spec_dir.join("config.json")).expect("config.json")).expect("JSON");
        base_spec["process"]["terminal"] = json!(false);
        Self {
            shim_root: tmp.path().join("shim-root"),
            grpc_address: tmp.path().join("containerd.sock").display().to_string(),
            ttrpc_address,
            events,
            _server: server,
            snapshot,
            base_spec,
            assets,
            tmp,
        }
    }

    /// A bundle directory as containerd lays it out: `config.json` (the
    /// base spec changed by `edit`), an empty `rootfs/`, and the `log` the
    /// shim writes to (containerd's is a FIFO; a file keeps what was said).
    fn bundle(&self, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
        let dir = self.tmp.path().join("bundles").join(name);
        std::fs::create_dir_all(dir.join("rootfs")).expect("bundle dir");
        let mut spec = self.base_spec.clone();
        edit(&mut spec);
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec).expect("JSON")).expect("config.json");
        std::fs::write(dir.join("log"), "").expect("log");
        dir
    }

    /// containerd's rootfs mount for a snapshot (the native snapshotter's).
    fn rootfs_mounts(&self) -> Vec<api::Mount> {
        vec![api::Mount {
            type_: "bind".into(),
            source: self.snapshot.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }]
    }

    /// `containerd-shim-carapace-v2 -namespace .. -address .. -publish-binary
    /// .. -id ID ACTION` in the bundle directory, with containerd's environment.
    fn shim_command(&self, bundle: &Path, id: &str, action: &str) -> Command {
        let mut cmd = Command::new(self.assets.bin("containerd-shim-carapace-v2"));
        cmd.args(["-namespace", NAMESPACE, "-address", &self.grpc_address, "-publish-binary", "containerd", "-id", id, action])
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &self.ttrpc_address)
            .env("GRPC_ADDRESS", &self.grpc_address)
            .env("NAMESPACE", NAMESPACE)
            .env("CARAPACE_KERNEL", &self.assets.kernel)
            .env("CARAPACE_INITRAMFS", &self.assets.initramfs)
            .env("CARAPACE_BIN_DIR", &self.assets.bin_dir)
            .env("CARAPACE_SHIM_ROOT", &self.shim_root)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, mut cmd: Command, what: &str) -> Output {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{what} panicked: {err}");
        out
    }

    /// The `start` action; returns the shim it started (or found).
    fn start(&self, bundle: &Path, id: &str) -> Shim {
        let out = self.run(self.shim_command(bundle, id, "start"), &format!("start {id}"));
        assert!(out.status.success(), "start {id}: {}", String::from_utf8_lossy(&out.stderr));
        let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let client = Client::connect(&address).unwrap_or_else(|e| panic!("connecting to the shim at {address}: {e}"));
        let task = TaskClient::new(client);
        let pid = task.connect(ctx(CALL), &api::ConnectRequest::default()).expect("Connect").shim_pid;
        Shim { task, pid, socket: PathBuf::from(address.trim_start_matches("unix://")), bundle: bundle.to_path_buf() }
    }

    /// The `start` action must fail; returns its one-line error.
    fn start_fails(&self, cmd: Command, what: &str) -> String {
        let out = self.run(cmd, what);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{what} must fail; it printed {:?}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(err.lines().count(), 1, "{what}: one line of error: {err}");
        err
    }

    /// The `delete` action, as containerd runs it after a shim is gone.
    fn delete_action(&self, bundle: &Path, id: &str) -> Output {
        self.run(self.shim_command(bundle, id, "delete"), &format!("delete {id}"))
    }

    /// Topics forwarded so far.
    fn events(&self) -> Vec<String> {
        self.events.0.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The VMMs of our shims.
    fn vmms(&self) -> Vec<u32> {
        let root = self.shim_root.display().to_string();
        processes_matching("carapace-vmm")
            .into_iter()
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&root)))
            .collect()
    }

    /// No VMM, nothing under the shim root, no mount under our directory.
    fn assert_nothing_left(&self, what: &str) {
        let vmms = wait_for(Duration::from_secs(30), || self.vmms().is_empty().then_some(()));
        assert!(vmms.is_some(), "{what}: VMMs left: {:?}", self.vmms());
        let left: Vec<_> =
            std::fs::read_dir(&self.shim_root).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{what}: left under the shim root: {left:?}");
        let ours = self.tmp.path().display().to_string();
        let mounts = mount_points(std::process::id());
        assert!(!mounts.iter().any(|m| m.starts_with(&ours)), "{what}: mounts left in the host's namespace: {mounts:?}");
    }
}

/// A running shim, connected.
struct Shim {
    task: TaskClient,
    pid: u32,
    socket: PathBuf,
    bundle: PathBuf,
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// The status message of a refused call; a transport error means the shim
/// died or hung up, which is a failure in itself.
fn refusal<T: std::fmt::Debug>(r: ttrpc::Result<T>, what: &str) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message),
        Err(e) => panic!("{what}: not an answer from the shim (did it die?): {e}"),
        Ok(v) => panic!("{what} must be refused; it was accepted: {v:?}"),
    }
}

/// Mount points in the mount namespace of `pid`.
fn mount_points(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z")
}

impl Shim {
    fn create(&self, id: &str, bundle: &Path, rootfs: Vec<api::Mount>, timeout: Duration) -> ttrpc::Result<api::CreateTaskResponse> {
        let req = api::CreateTaskRequest { id: id.into(), bundle: bundle.display().to_string(), rootfs, ..Default::default() };
        self.task.create(ctx(timeout), &req)
    }

    /// Still serving: answers State (the container it refused is unknown).
    fn assert_serving(&self, what: &str) {
        let r = self.task.state(ctx(CALL), &api::StateRequest { id: "nosuch".into(), ..Default::default() });
        let (code, msg) = refusal(r, &format!("{what}: State after the refusal"));
        assert_eq!(code, ttrpc::Code::NOT_FOUND, "{what}: {msg}");
    }

    /// Its mounts under `dir`, seen from its own mount namespace.
    fn mounts_under(&self, dir: &Path) -> Vec<String> {
        let d = dir.display().to_string();
        mount_points(self.pid).into_iter().filter(|m| m.starts_with(&d)).collect()
    }

    /// Shutdown: the shim exits, its socket is removed, its log has no panic.
    fn shutdown(self, what: &str) {
        let _ = self.task.shutdown(ctx(CALL), &api::ShutdownRequest { now: true, ..Default::default() });
        assert!(wait_for(Duration::from_secs(60), || gone(self.pid).then_some(())).is_some(), "{what}: the shim did not exit");
        assert!(!self.socket.exists(), "{what}: the shim left its socket {}", self.socket.display());
        let log = std::fs::read_to_string(self.bundle.join("log")).unwrap_or_default();
        assert!(!log.contains("panicked"), "{what}: the shim panicked:\n{log}");
    }
}

/// Sets `spec.<dotted path>` (creating objects on the way).
fn set(spec: &mut Value, path: &str, value: Value) {
    let mut at = spec;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if !at[*p].is_object() {
            at[*p] = json!({});
        }
        at = &mut at[*p];
    }
    at[parts[parts.len() - 1]] = value;
}

/// One bad bundle: its name (also the container id), how it is made, whether
/// containerd sends a rootfs mount for it, and what the error must say.
struct Row {
    name: &'static str,
    bundle: PathBuf,
    mounts: bool,
    want: &'static str,
}

#[test]
fn bad_bundles_and_ids_are_refused_by_the_shim_and_leave_nothing() {
    let containerd = Containerd::new();
    let c = &containerd;
    let edit = |path: &'static str, value: Value| move |s: &mut Value| set(s, path, value);
    let hook = |kind: &'static str, path: &str| edit("hooks", json!({ kind: [{"path": path}] }));
    let mut rows = vec![
        Row { name: "malformed", bundle: c.bundle("malformed", |_| {}), mounts: true, want: "invalid config.json: EOF" },
        Row { name: "no-config", bundle: c.bundle("no-config", |_| {}), mounts: true, want: "config.json not found" },
        Row {
            name: "args-a-string",
            bundle: c.bundle("args-a-string", edit("process.args", json!("sh"))),
            mounts: true,
            want: "process.args: invalid type: string \"sh\", expected a sequence",
        },
        Row {
            name: "limit-a-string",
            bundle: c.bundle("limit-a-string", edit("linux.resources.memory.limit", json!("1G"))),
            mounts: true,
            want: "linux.resources.memory.limit: invalid type: string \"1G\"",
        },
        Row {
            name: "huge-hostname",
            bundle: c.bundle("huge-hostname", edit("hostname", json!("h".repeat(100 * 1024)))),
            mounts: true,
            want: "field hostname: 102400 bytes; at most 64",
        },
        Row {
            name: "huge-uid",
            bundle: c.bundle("huge-uid", edit("process.user.uid", json!(1u64 << 40))),
            mounts: true,
            want: "process.user.uid: invalid value: integer `1099511627776`",
        },
        Row {
            name: "huge-memory",
            bundle: c.bundle("huge-memory", edit("annotations", json!({"io.carapace.memory_mib": "1000000000000"}))),
            mounts: true,
            want: "annotations.io.carapace.memory_mib: \"1000000000000\" is not a number of MiB",
        },
        Row {
            name: "huge-vcpus",
            bundle: c.bundle("huge-vcpus", edit("annotations", json!({"io.carapace.vcpus": "100000"}))),
            mounts: true,
            want: "annotations.io.carapace.vcpus: \"100000\" is not a number of vCPUs",
        },
        Row {
            name: "no-root-path",
            bundle: c.bundle("no-root-path", edit("root.path", json!("no-such-dir"))),
            mounts: true,
            want: "field root.path: ",
        },
        Row {
            name: "no-root",
            bundle: c.bundle("no-root", |s| {
                if let Some(o) = s.as_object_mut() {
                    o.remove("root");
                }
            }),
            mounts: false,
            want: "field root: missing",
        },
        Row {
            name: "rootfs-to-slash",
            bundle: c.bundle("rootfs-to-slash", |_| {}),
            mounts: false,
            want: "resolves to /, outside the bundle",
        },
        Row {
            name: "rootfs-to-slash-mounted",
            bundle: c.bundle("rootfs-to-slash-mounted", |_| {}),
            mounts: true,
            want: "rootfs-to-slash-mounted/rootfs is a symlink (to /)",
        },
        Row {
            name: "empty-args",
            bundle: c.bundle("empty-args", edit("process.args", json!([]))),
            mounts: true,
            want: "field process.args: must name at least the program to run",
        },
        Row {
            name: "relative-cwd",
            bundle: c.bundle("relative-cwd", edit("process.cwd", json!("tmp"))),
            mounts: true,
            want: "field process.cwd: \"tmp\" is not an absolute path",
        },
        Row {
            name: "prestart-missing",
            bundle: c.bundle("prestart-missing", hook("prestart", "/nonexistent/hook")),
            mounts: true,
            want: "field hooks.prestart: path /nonexistent/hook does not exist",
        },
        Row {
            name: "createRuntime-relative",
            bundle: c.bundle("createRuntime-relative", hook("createRuntime", "bin/hook")),
            mounts: true,
            want: "field hooks.createRuntime: path bin/hook is not absolute",
        },
    ];
    // What the edits above cannot say: bytes that are not JSON, no file, links.
    let at = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.bundle.clone()).expect("row");
    std::fs::write(at("malformed").join("config.json"), "{\"ociVersion\": ").expect("write");
    std::fs::remove_file(at("no-config").join("config.json")).expect("rm");
    for name in ["rootfs-to-slash", "rootfs-to-slash-mounted"] {
        std::fs::remove_dir(at(name).join("rootfs")).expect("rmdir");
        std::os::unix::fs::symlink("/", at(name).join("rootfs")).expect("symlink");
    }

    // Each bundle: containerd starts a shim for it and asks it to create the
    // container; the shim refuses, keeps serving, and is shut down.
    for row in rows.drain(..) {
        let what = row.name;
        let shim = c.start(&row.bundle, row.name);
        let mounts = if row.mounts { c.rootfs_mounts() } else { Vec::new() };
        let (code, msg) = refusal(shim.create(row.name, &row.bundle, mounts, CALL), what);
        eprintln!("{what:>24}: {code:?}: {msg:.200}");
        assert!(msg.contains(row.want), "{what}: the error must say {:?}: {msg}", row.want);
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{what}: {msg}");
        shim.assert_serving(what);
        assert!(c.vmms().is_empty(), "{what}: a VM was booted for a bundle that was refused");
        assert_eq!(shim.mounts_under(&row.bundle), Vec::<String>::new(), "{what}: mounts left under the bundle");
        assert_eq!(shim.mounts_under(&c.shim_root), Vec::<String>::new(), "{what}: mounts left under the shim root");
        shim.shutdown(what);
        let out = c.delete_action(&row.bundle, row.name);
        assert!(out.status.success(), "{what}: delete: {}", String::from_utf8_lossy(&out.stderr));
        c.assert_nothing_left(what);
    }
    assert!(std::fs::symlink_metadata("/bin").is_ok(), "the host's / is intact");

    // Ids that could name a path: `start` refuses them and starts nothing.
    let good = c.bundle("good", |_| {});
    let long = "x".repeat(1025);
    let shims_before = processes_matching(&c.grpc_address);
    for (id, want) in [
        ("../x", "-id: invalid container id \"../x\""),
        ("a/b", "-id: invalid container id \"a/b\""),
        ("..", "-id: invalid container id \"..\": it must not be . or .."),
        (long.as_str(), "-id: container id is 1025 bytes long"),
    ] {
        let e = c.start_fails(c.shim_command(&good, id, "start"), &format!("start -id {id:.20}"));
        assert!(e.contains(want), "start -id {id:.20}: {e}");
        let e = c.start_fails(c.shim_command(&good, id, "delete"), &format!("delete -id {id:.20}"));
        assert!(e.contains(want), "delete -id {id:.20}: {e}");
    }
    // A pod whose CRI sandbox id is a path.
    let pod = c.bundle("pod", edit("annotations", json!({"io.kubernetes.cri.sandbox-id": "../pod"})));
    let e = c.start_fails(c.shim_command(&pod, "app", "start"), "start in a pod named ../pod");
    assert!(e.contains("io.kubernetes.cri.sandbox-id: invalid container id \"../pod\""), "{e}");
    // No TTRPC_ADDRESS: the shim could not send events.
    let mut no_events = c.shim_command(&good, "good", "start");
    no_events.env_remove("TTRPC_ADDRESS");
    let e = c.start_fails(no_events, "start without TTRPC_ADDRESS");
    assert!(e.contains("TTRPC_ADDRESS is not set"), "{e}");
    assert_eq!(processes_matching(&c.grpc_address), shims_before, "a refused start left a shim running");

    // `delete` with an id that climbs out of the shim root must not remove
    // what it points at (it would have: the sandbox directory is removed).
    let victim = c.tmp.path().join("victim");
    std::fs::create_dir_all(victim.join("data")).expect("victim");
    std::fs::create_dir_all(c.shim_root.join(format!("{NAMESPACE}-"))).expect("a directory to climb from");
    let e = c.start_fails(c.shim_command(&good, "/../../victim", "delete"), "delete -id /../../victim");
    assert!(e.contains("-id: invalid container id"), "{e}");
    assert!(victim.join("data").exists(), "delete -id /../../victim removed {}", victim.display());
    std::fs::remove_dir(c.shim_root.join(format!("{NAMESPACE}-"))).expect("rmdir");

    // A good shim asked to create containers with ids that are paths.
    let shim = c.start(&good, "good");
    for id in ["../x", "a/b", "..", long.as_str()] {
        let (code, msg) = refusal(shim.create(id, &good, c.rootfs_mounts(), CALL), &format!("Create {id:.20}"));
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{id:.20}: {msg}");
        assert!(msg.contains("container id"), "Create {id:.20}: {msg}");
        shim.assert_serving(id);
    }
    assert_eq!(shim.mounts_under(&good), Vec::<String>::new(), "mounts left under the bundle");
    shim.shutdown("good");
    let out = c.delete_action(&good, "good");
    assert!(out.status.success(), "delete good: {}", String::from_utf8_lossy(&out.stderr));
    c.assert_nothing_left("ids");
    assert!(!c.events().iter().any(|t| t == "/tasks/create"), "a refused Create published an event: {:?}", c.events());
}

/// An exec's process spec, as containerd sends it.
fn process_spec(json: &[u8]) -> Any {
    Any { type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(), value: json.to_vec(), ..Default::default() }
}

#[test]
fn a_running_sandbox_refuses_bad_execs_and_a_hostile_second_container() {
    if !kvm_available("a_running_sandbox_refuses_bad_execs_and_a_hostile_second_container") {
        return;
    }
    let c = Containerd::new();
    let bundle = c.bundle("svc", |s| s["process"]["args"] = json!(["sleep", "100000"]));
    let shim = c.start(&bundle, "svc");
    shim.create("svc", &bundle, c.rootfs_mounts(), BOOT_DEADLINE).unwrap_or_else(|e| panic!("Create svc: {e}"));
    shim.task.start(ctx(CALL), &api::StartRequest { id: "svc".into(), ..Default::default() }).expect("Start svc");
    let running = || {
        let s = shim.task.state(ctx(CALL), &api::StateRequest { id: "svc".into(), ..Default::default() }).expect("State");
        s.status.enum_value_or_default()
    };
    assert_eq!(running(), api::Status::RUNNING);
    let vmm = c.vmms();
    assert_eq!(vmm.len(), 1, "one VMM for the sandbox");

    // Exec ids that are paths: refused by the shim.
    let exec = |exec_id: &str, spec: &[u8]| api::ExecProcessRequest {
        id: "svc".into(),
        exec_id: exec_id.into(),
        spec: Some(process_spec(spec)).into(),
        ..Default::default()
    };
    let good_process = serde_json::to_vec(&c.base_spec["process"]).expect("JSON");
    let long = "e".repeat(1025);
    for exec_id in ["a/b", "../x", "..", long.as_str()] {
        let (code, msg) = refusal(shim.task.exec(ctx(CALL), &exec(exec_id, &good_process)), &format!("Exec {exec_id:.20}"));
        eprintln!("{:>24}: {code:?}: {msg:.200}", format!("exec id {exec_id:.16}"));
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{exec_id:.20}: {msg}");
        assert!(msg.contains("exec id: "), "Exec {exec_id:.20}: {msg}");
    }

    // Process specs the guest cannot run: Exec takes them (containerd's
    // order: Exec, then Start), Start fails naming the field, and
    // containerd deletes the exec.
    let mut relative = c.base_spec["process"].clone();
    relative["cwd"] = json!("tmp");
    let mut no_args = c.base_spec["process"].clone();
    no_args["args"] = json!([]);
    let bad_specs: [(&str, Vec<u8>, &str); 3] = [
        ("not-json", b"{\"args\": [".to_vec(), "process_json: not valid JSON"),
        ("empty-args", serde_json::to_vec(&no_args).expect("JSON"), "process.args: empty"),
        ("relative-cwd", serde_json::to_vec(&relative).expect("JSON"), "process.cwd: \"tmp\" is not an absolute path"),
    ];
    for (exec_id, spec, want) in &bad_specs {
        shim.task.exec(ctx(CALL), &exec(exec_id, spec)).unwrap_or_else(|e| panic!("Exec {exec_id}: {e}"));
        let start = api::StartRequest { id: "svc".into(), exec_id: (*exec_id).into(), ..Default::default() };
        let (_, msg) = refusal(shim.task.start(ctx(CALL), &start), &format!("Start exec {exec_id}"));
        eprintln!("{exec_id:>24}: {msg:.200}");
        assert!(msg.contains(want), "Start exec {exec_id}: the error must say {want:?}: {msg}");
        let del = api::DeleteRequest { id: "svc".into(), exec_id: (*exec_id).into(), ..Default::default() };
        shim.task.delete(ctx(CALL), &del).unwrap_or_else(|e| panic!("Delete exec {exec_id}: {e}"));
    }

    // A second container of the sandbox whose rootfs links to the host's /.
    let hostile = c.bundle("hostile", |_| {});
    std::fs::remove_dir(hostile.join("rootfs")).expect("rmdir");
    std::os::unix::fs::symlink("/", hostile.join("rootfs")).expect("symlink");
    let (code, msg) = refusal(shim.create("hostile", &hostile, c.rootfs_mounts(), CALL), "Create hostile");
    eprintln!("{:>24}: {code:?}: {msg:.200}", "hostile second container");
    assert!(msg.contains("is a symlink (to /)"), "{msg}");
    assert_eq!(shim.mounts_under(&hostile), Vec::<String>::new(), "mounts left under the hostile bundle");

    // The sandbox is untouched: same VMM, container running.
    assert_eq!(running(), api::Status::RUNNING, "the refusals disturbed the running container");
    assert_eq!(c.vmms(), vmm, "the refusals touched the VM");

    // containerd's teardown: kill, wait, delete, shutdown, `delete`.
    let kill = api::KillRequest { id: "svc".into(), signal: 9, ..Default::default() };
    shim.task.kill(ctx(CALL), &kill).expect("Kill");
    let exit = shim.task.wait(ctx(BOOT_DEADLINE), &api::WaitRequest { id: "svc".into(), ..Default::default() }).expect("Wait");
    assert_eq!(exit.exit_status, 137);
    shim.task.delete(ctx(BOOT_DEADLINE), &api::DeleteRequest { id: "svc".into(), ..Default::default() }).expect("Delete");
    shim.shutdown("svc");
    let out = c.delete_action(&bundle, "svc");
    assert!(out.status.success(), "delete svc: {}", String::from_utf8_lossy(&out.stderr));
    c.assert_nothing_left("svc");
    let events = c.events();
    assert!(!events.iter().any(|t| t.starts_with("/tasks/exec-started")), "a refused exec started: {events:?}");
    for topic in ["/tasks/create", "/tasks/start", "/tasks/exec-added"] {
        assert!(events.iter().any(|t| t == topic), "no {topic} reached containerd: {events:?}");
    }
}
