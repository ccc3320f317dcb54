//! The Task service against a fake sandbox: a fake launcher and a fake
//! agent that plays the guest (connects to the stdio ports, exits processes
//! when signalled or told to). Needs root for the share's bind mounts; each
//! test takes a mount namespace of its own so nothing leaks to the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carapace_runtime::config::Origin;
use carapace_runtime::vm::FsCacheMode;
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups_v2::metrics::Metrics;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::ExitSignal;

use super::*;
use crate::events::EventLog;
use carapace_runtime::test_utils::{FakeLauncher, VMM_PID};

struct Fixture {
    svc: TaskService,
    launcher: Arc<FakeLauncher>,
    events: Arc<EventLog>,
    exit: Arc<ExitSignal>,
    dir: tempfile::TempDir,
}

/// None (and a note) when not root: the share needs bind mounts (fails
/// instead under CARAPACE_REQUIRE_KVM=1).
fn fixture(test: &str) -> Option<Fixture> {
    if !carapace_test_support::can_run(test, &[carapace_test_support::Need::Root]) {
        return None;
    }
    // This thread's mounts stay in a namespace of its own.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
    nix::mount::mount(None::<&str>, "/", None::<&str>, nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE, None::<&str>)
        .expect("make / private");
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = Arc::new(FakeLauncher::default());
    let events = Arc::new(EventLog::default());
    let exit = Arc::new(ExitSignal::default());
    // A missing default file: the built-in defaults, whatever the host has.
    let config = ConfigSource { path: dir.path().join("config.toml"), origin: Origin::Default };
    let cfg = TaskConfig { namespace: "test".into(), state_root: dir.path().join("state"), config };
    let svc = TaskService::new(cfg, Box::new(launcher.clone()), events.clone(), exit.clone());
    Some(Fixture { svc, launcher, events, exit, dir })
}

impl Fixture {
    /// A bundle with a rootfs and `annotations`; returns its directory.
    fn bundle(&self, id: &str, annotations: serde_json::Value) -> PathBuf {
        let b = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(b.join("rootfs/bin")).expect("rootfs");
        std::fs::write(b.join("rootfs/bin/marker"), id).expect("marker");
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "annotations": annotations
        });
        std::fs::write(b.join("config.json"), spec.to_string()).expect("config.json");
        b
    }

    fn create(&self, id: &str, annotations: serde_json::Value) -> Result<api::CreateTaskResponse, ShimError> {
        let bundle = self.bundle(id, annotations);
        let out = self.dir.path().join(format!("{id}.out"));
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            stdout: format!("file://{}", out.display()),
            ..Default::default()
        };
        self.svc.inner.create(&req)
    }

    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.out"))).unwrap_or_default()
    }

    fn state(&self, id: &str, exec_id: &str) -> api::StateResponse {
        let req = api::StateRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.svc.inner.state(&req).expect("state")
    }

    fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let req = api::WaitRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.svc.inner.wait(&req).expect("wait").exit_status
    }

    fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, ShimError> {
        self.svc.inner.delete(&api::DeleteRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() })
    }

    fn shared(&self) -> PathBuf {
        self.svc.sandbox().expect("sandbox").shared.clone()
    }
}

fn start(f: &Fixture, id: &str, exec_id: &str) -> u32 {
    let req = api::StartRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
    f.svc.inner.start(&req).expect("start").pid
}

#[test]
fn a_container_lifecycle_with_exec_pause_stats_and_kill() {
    let Some(f) = fixture("a_container_lifecycle_with_exec_pause_stats_and_kill") else { return };
    let created = f.create("c1", serde_json::json!({})).expect("create");
    assert_eq!(created.pid, VMM_PID);
    assert_eq!(f.launcher.count(), 1);
    let shared = f.shared();
    assert_eq!(std::fs::read_to_string(shared.join("c1/rootfs/bin/marker")).expect("bound rootfs"), "c1");
    assert_eq!(f.state("c1", "").status.enum_value(), Ok(api::Status::CREATED));

    assert_eq!(start(&f, "c1", ""), VMM_PID);
    assert_eq!(f.state("c1", "").status.enum_value(), Ok(api::Status::RUNNING));
    let wait_out = |name: &str, want: &str| {
        let got = carapace_runtime_wait(|| (f.output(name) == want).then_some(()));
        assert!(got.is_some(), "{name}: {:?}", f.output(name));
    };
    wait_out("c1", "out:c1");

    // exec
    let process = serde_json::json!({"args": ["echo", "x"], "cwd": "/"});
    let out = f.dir.path().join("e1.out");
    let exec = api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        stdout: format!("file://{}", out.display()),
        spec: Some(containerd_shim::protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: process.to_string().into_bytes(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    f.svc.inner.exec(&exec).expect("exec");
    assert!(matches!(f.svc.inner.exec(&exec), Err(ShimError::AlreadyExists(_))));
    assert_eq!(f.state("c1", "e1").status.enum_value(), Ok(api::Status::CREATED));
    start(&f, "c1", "e1");
    wait_out("e1", "exec:e1");
    f.launcher.guest(0).finish("c1", "e1", 0);
    assert_eq!(f.wait("c1", "e1"), 0);
    assert_eq!(f.delete("c1", "e1").expect("delete exec").exit_status, 0);
    assert!(matches!(
        f.svc.inner.state(&api::StateRequest { id: "c1".into(), exec_id: "e1".into(), ..Default::default() }),
        Err(ShimError::NotFound(_))
    ));

    // pause, resume, pids, stats, update
    f.svc.inner.pause(&api::PauseRequest { id: "c1".into(), ..Default::default() }, true).expect("pause");
    assert_eq!(f.state("c1", "").status.enum_value(), Ok(api::Status::PAUSED));
    f.svc.inner.pause(&api::PauseRequest { id: "c1".into(), ..Default::default() }, false).expect("resume");
    assert_eq!(f.state("c1", "").status.enum_value(), Ok(api::Status::RUNNING));
    let pids = f.svc.inner.pids(&api::PidsRequest { id: "c1".into(), ..Default::default() }).expect("pids");
    assert_eq!(pids.processes.len(), 1);
    let stats = f.svc.inner.stats(&api::StatsRequest { id: "c1".into(), ..Default::default() }).expect("stats");
    let any = stats.stats.as_ref().expect("any");
    assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    assert_eq!(Metrics::parse_from_bytes(&any.value).expect("metrics").memory.usage, 1 << 20);
    let resources = containerd_shim::protos::protobuf::well_known_types::any::Any {
        value: br#"{"memory":{"limit":1048576}}"#.to_vec(),
        ..Default::default()
    };
    f.svc
        .inner
        .update(&api::UpdateTaskRequest { id: "c1".into(), resources: Some(resources).into(), ..Default::default() })
        .expect("update");

    // A running container cannot be deleted; kill it, then it can.
    assert!(matches!(f.delete("c1", ""), Err(ShimError::FailedPrecondition(_))));
    f.svc.inner.kill(&api::KillRequest { id: "c1".into(), signal: 15, ..Default::default() }).expect("kill");
    assert_eq!(f.wait("c1", ""), 143);
    assert_eq!(f.state("c1", "").status.enum_value(), Ok(api::Status::STOPPED));
    assert!(matches!(
        f.svc.inner.kill(&api::KillRequest { id: "c1".into(), signal: 9, ..Default::default() }),
        Err(ShimError::NotFound(_))
    ));
    let deleted = f.delete("c1", "").expect("delete");
    assert_eq!((deleted.exit_status, deleted.pid), (143, VMM_PID));

    // The last container gone, the VM is stopped and the share is empty.
    assert!(f.launcher.stopped(0));
    assert!(f.svc.sandbox().is_none());
    assert!(!shared.exists(), "the sandbox directory is left");
    assert_eq!(std::fs::read_to_string(f.dir.path().join("bundles/c1/rootfs/bin/marker")).expect("bundle intact"), "c1");
    assert_eq!(
        f.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    f.svc.inner.shutdown(&api::ShutdownRequest::default());
    f.exit.wait();
}

/// Polls for up to 10 s.
fn carapace_runtime_wait<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..1000 {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn containers_of_one_pod_share_one_vm_until_the_last_is_deleted() {
    let Some(f) = fixture("containers_of_one_pod_share_one_vm_until_the_last_is_deleted") else { return };
    let pause = serde_json::json!({pod::CONTAINER_TYPE: "sandbox", pod::SANDBOX_ID: "pod1", pod::MEMORY_MIB: "384"});
    let app = serde_json::json!({pod::CONTAINER_TYPE: "container", pod::SANDBOX_ID: "pod1"});
    f.create("pod1", pause).expect("create sandbox");
    f.create("app", app).expect("create app");
    assert_eq!(f.launcher.count(), 1, "one VM per pod");
    assert_eq!(f.launcher.launched.lock().expect("l")[0].2.mem_mib, 384);
    let shared = f.shared();
    assert_eq!(std::fs::read_to_string(shared.join("pod1/rootfs/bin/marker")).expect("pause rootfs"), "pod1");
    assert_eq!(std::fs::read_to_string(shared.join("app/rootfs/bin/marker")).expect("app rootfs"), "app");
    assert!(matches!(f.create("app", serde_json::json!({})), Err(ShimError::AlreadyExists(_))));

    // Never started: Delete kills and removes it.
    let d = f.delete("app", "").expect("delete app");
    assert_eq!(d.exit_status, 137);
    assert!(!f.launcher.stopped(0), "the VM stopped with a container left");
    assert!(!shared.join("app").exists());
    f.delete("pod1", "").expect("delete sandbox");
    assert!(f.launcher.stopped(0));
    let calls = f.launcher.guest(0).calls.lock().expect("calls").clone();
    assert_eq!(calls.iter().filter(|c| *c == "CreateSandbox").count(), 1);
}

#[test]
fn failed_creates_leave_nothing() {
    let Some(f) = fixture("failed_creates_leave_nothing") else { return };
    // A bundle whose rootfs is missing: refused before any VM boots.
    let b = f.bundle("norootfs", serde_json::json!({}));
    std::fs::remove_dir_all(b.join("rootfs")).expect("rm rootfs");
    let req = api::CreateTaskRequest { id: "norootfs".into(), bundle: b.display().to_string(), ..Default::default() };
    let err = f.svc.inner.create(&req).expect_err("missing rootfs");
    assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT, "{err}");
    assert!(err.to_string().contains("root.path"), "{err}");
    assert_eq!(f.launcher.count(), 0);

    // The agent refuses the spec: the VM booted for it is stopped again.
    let err = f.create("bad1", serde_json::json!({})).expect_err("agent refuses");
    assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
    assert!(err.to_string().contains("process.args"), "{err}");
    assert_eq!(f.launcher.count(), 1);
    assert!(f.launcher.stopped(0));
    assert!(f.svc.sandbox().is_none());
    let state = f.dir.path().join("state");
    let left: Vec<_> = std::fs::read_dir(&state).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left: {left:?}");
    assert!(f.svc.container_ids().is_empty());
    assert!(f.events.topics().is_empty());
    // Unknown ids are NOT_FOUND.
    assert!(matches!(f.svc.inner.wait(&api::WaitRequest { id: "nope".into(), ..Default::default() }), Err(ShimError::NotFound(_))));
}

#[test]
fn the_config_file_sizes_the_vm_and_a_bad_one_fails_create() {
    let Some(f) = fixture("the_config_file_sizes_the_vm_and_a_bad_one_fails_create") else { return };
    let create = |id: &str, config: &Path| {
        let b = f.bundle(id, serde_json::json!({}));
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: b.display().to_string(),
            options: Some(crate::config::runtime_options(&config.display().to_string())).into(),
            ..Default::default()
        };
        f.svc.inner.create(&req)
    };
    let state = f.dir.path().join("state");
    let left =
        || -> Vec<PathBuf> { std::fs::read_dir(&state).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default() };

    // Refused before anything exists: no VM, no sandbox directory, no event.
    let bad = f.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "default_vcpus = 1
default_memory = 512
",
    )
    .expect("write");
    let err = create("c1", &bad).expect_err("unknown key");
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&bad.display().to_string()) && msg.contains("default_memory"), "{msg}");
    let err = create("c1", &f.dir.path().join("missing.toml")).expect_err("named and missing");
    assert!(err.to_string().contains("missing.toml"), "{err}");
    assert_eq!(f.launcher.count(), 0);
    assert!(left().is_empty(), "left: {:?}", left());
    assert!(f.svc.container_ids().is_empty() && f.events.topics().is_empty());

    // A good one sizes the VM and sets the share's cache mode.
    let good = f.dir.path().join("good.toml");
    std::fs::write(
        &good,
        "default_memory_mib = 384
shared_fs_cache = \"none\"\nkernel_params = \"quiet\"\n",
    )
    .expect("write");
    create("c1", &good).expect("create");
    let opts = f.launcher.launched.lock().expect("launched")[0].2.clone();
    assert_eq!((opts.vcpus, opts.mem_mib, opts.extra_cmdline.as_str()), (1, 384, "quiet"));
    assert!(opts.fs.iter().all(|fs| fs.cache == FsCacheMode::None), "{:?}", opts.fs);
    f.delete("c1", "").expect("delete");
    assert!(f.launcher.stopped(0));
}

#[test]
fn oom_kills_are_published_before_the_exit() {
    let Some(f) = fixture("oom_kills_are_published_before_the_exit") else { return };
    f.create("oom1", serde_json::json!({})).expect("create");
    start(&f, "oom1", "");
    f.launcher.guest(0).finish("oom1", "", 137);
    assert_eq!(f.wait("oom1", ""), 137);
    let topics = carapace_runtime_wait(|| {
        let t = f.events.topics();
        t.contains(&"/tasks/exit").then_some(t)
    })
    .expect("exit published");
    assert_eq!(topics, ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit"]);
    f.delete("oom1", "").expect("delete");
}

#[test]
fn host_hooks_run_in_order_with_the_state_and_a_failing_one_fails_create() {
    let Some(f) = fixture("host_hooks_run_in_order_with_the_state_and_a_failing_one_fails_create") else { return };
    let log = f.dir.path().join("hooks.log");
    let hook =
        |kind: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {kind} $(cat) >> {}", log.display())]});
    let with_hooks = |id: &str, hooks: serde_json::Value| {
        let b = f.bundle(id, serde_json::json!({"team": "a"}));
        let path = b.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        spec["hooks"] = hooks;
        std::fs::write(&path, spec.to_string()).expect("write");
        api::CreateTaskRequest { id: id.into(), bundle: b.display().to_string(), ..Default::default() }
    };

    let req = with_hooks(
        "h1",
        serde_json::json!({
            "prestart": [hook("prestart")], "createRuntime": [hook("createRuntime")],
            "poststart": [hook("poststart")], "poststop": [hook("poststop")]
        }),
    );
    f.svc.inner.create(&req).expect("create");
    start(&f, "h1", "");
    f.launcher.guest(0).finish("h1", "", 0);
    assert_eq!(f.wait("h1", ""), 0);
    f.delete("h1", "").expect("delete");

    let text = std::fs::read_to_string(&log).expect("hooks ran");
    let lines: Vec<(&str, serde_json::Value)> = text
        .lines()
        .map(|l| {
            let (kind, state) = l.split_once(' ').expect("kind state");
            (kind, serde_json::from_str(state).expect("state JSON on stdin"))
        })
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, ["prestart", "createRuntime", "poststart", "poststop"]);
    let statuses: Vec<&str> = lines.iter().map(|(_, s)| s["status"].as_str().unwrap_or_default()).collect();
    assert_eq!(statuses, ["creating", "creating", "running", "stopped"]);
    assert!(lines.iter().all(|(_, s)| s["id"] == "h1" && s["annotations"]["team"] == "a"), "{text}");
    assert_eq!(lines[0].1["pid"], VMM_PID);

    // A failing createRuntime hook fails Create; no container is left.
    let req = with_hooks("h2", serde_json::json!({"createRuntime": [{"path": "/bin/false"}]}));
    let err = f.svc.inner.create(&req).expect_err("failing hook");
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION, "{err}");
    assert!(err.to_string().contains("createRuntime hook /bin/false"), "{err}");
    assert!(f.svc.container_ids().is_empty());
}

fn exec_request(id: &str, exec_id: &str, args: &[&str]) -> api::ExecProcessRequest {
    let process = serde_json::json!({"args": args, "cwd": "/"});
    api::ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: Some(containerd_shim::protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: process.to_string().into_bytes(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Calls Wait in a thread, as containerd does before Start; the answer
/// comes on the channel.
fn wait_in_thread(f: &Fixture, id: &str, exec_id: &str) -> std::sync::mpsc::Receiver<Result<u32, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let svc = f.svc.clone();
    let req = api::WaitRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
    std::thread::spawn(move || {
        let _ = tx.send(svc.inner.wait(&req).map(|w| w.exit_status).map_err(|e| e.to_string()));
    });
    rx
}

/// How long a test lets a woken waiter take to answer (a deadline against
/// a hang, not a speed check).
const WAKE: Duration = Duration::from_secs(10);

#[test]
fn an_exec_that_fails_to_start_is_reported_exited_and_can_be_deleted() {
    let Some(f) = fixture("an_exec_that_fails_to_start_is_reported_exited_and_can_be_deleted") else { return };
    f.create("c1", serde_json::json!({})).expect("create");
    start(&f, "c1", "");
    f.svc.inner.exec(&exec_request("c1", "bad-e1", &["/nonexistent"])).expect("exec added");
    let waiter = wait_in_thread(&f, "c1", "bad-e1");
    let waiter2 = wait_in_thread(&f, "c1", "bad-e1");
    // Both waiters are in before Start, as containerd's are.
    std::thread::sleep(Duration::from_millis(100));
    assert!(waiter.try_recv().is_err(), "Wait returned before the exec was started");

    let err = f.svc.inner.start(&api::StartRequest { id: "c1".into(), exec_id: "bad-e1".into(), ..Default::default() });
    let err = err.expect_err("the agent refuses the exec");
    assert!(err.to_string().contains("ExecProcess") && err.to_string().contains("/nonexistent"), "{err}");
    assert_eq!(waiter.recv_timeout(WAKE).expect("Wait returned"), Ok(NOT_RUN));
    assert_eq!(waiter2.recv_timeout(WAKE).expect("second Wait returned"), Ok(NOT_RUN));
    let st = f.state("c1", "bad-e1");
    assert_eq!((st.status.enum_value(), st.exit_status), (Ok(api::Status::STOPPED), NOT_RUN));
    // A Wait after the failure returns at once too.
    assert_eq!(f.wait("c1", "bad-e1"), NOT_RUN);
    // containerd's WithProcessKill: a kill of the stopped exec is NOT_FOUND,
    // then the delete goes through.
    let kill = api::KillRequest { id: "c1".into(), exec_id: "bad-e1".into(), signal: 9, ..Default::default() };
    assert!(matches!(f.svc.inner.kill(&kill), Err(ShimError::NotFound(_))));
    assert_eq!(f.delete("c1", "bad-e1").expect("delete exec").exit_status, NOT_RUN);
    // No exit event for a process that never ran (as with runc); the
    // container itself still runs.
    assert_eq!(f.events.topics(), ["/tasks/create", "/tasks/start", "/tasks/exec-added"]);
    assert_eq!(f.state("c1", "").status.enum_value(), Ok(api::Status::RUNNING));

    // An exec added and never started, deleted with its container: its waiter returns.
    f.svc.inner.exec(&exec_request("c1", "e2", &["true"])).expect("exec added");
    let pending = wait_in_thread(&f, "c1", "e2");
    f.svc.inner.kill(&api::KillRequest { id: "c1".into(), signal: 9, ..Default::default() }).expect("kill");
    assert_eq!(f.wait("c1", ""), 137);
    f.delete("c1", "").expect("delete");
    assert_eq!(pending.recv_timeout(WAKE).expect("the never-started exec's Wait returned"), Ok(137));
    f.svc.inner.shutdown(&api::ShutdownRequest::default());
    f.exit.wait();
}

#[test]
fn a_container_that_fails_to_start_is_reported_exited_and_can_be_deleted() {
    let Some(f) = fixture("a_container_that_fails_to_start_is_reported_exited_and_can_be_deleted") else { return };
    f.create("nostart1", serde_json::json!({})).expect("create");
    let waiter = wait_in_thread(&f, "nostart1", "");
    let err = f.svc.inner.start(&api::StartRequest { id: "nostart1".into(), ..Default::default() }).expect_err("start fails");
    assert!(err.to_string().contains("StartContainer"), "{err}");
    assert_eq!(waiter.recv_timeout(WAKE).expect("Wait returned"), Ok(NOT_RUN));
    assert_eq!(f.state("nostart1", "").status.enum_value(), Ok(api::Status::STOPPED));
    let exits: Vec<TaskExit> = f
        .events
        .events()
        .iter()
        .filter(|e| e.topic == "/tasks/exit")
        .map(|e| TaskExit::parse_from_bytes(&e.event.value).expect("TaskExit"))
        .collect();
    assert_eq!(exits.len(), 1, "{:?}", f.events.topics());
    assert_eq!((exits[0].id.as_str(), exits[0].exit_status, exits[0].pid), ("nostart1", NOT_RUN, VMM_PID));
    let deleted = f.delete("nostart1", "").expect("delete");
    assert_eq!(deleted.exit_status, NOT_RUN);
    assert!(f.launcher.stopped(0));
    assert_eq!(f.events.topics().last(), Some(&"/tasks/delete"));
}

#[test]
fn shutdown_returns_every_pending_waiter() {
    let Some(f) = fixture("shutdown_returns_every_pending_waiter") else { return };
    f.create("c1", serde_json::json!({})).expect("create");
    start(&f, "c1", "");
    f.svc.inner.exec(&exec_request("c1", "e1", &["true"])).expect("exec added");
    let init = wait_in_thread(&f, "c1", "");
    let exec = wait_in_thread(&f, "c1", "e1");
    std::thread::sleep(Duration::from_millis(100));
    // Not now, with a container left: nothing happens.
    f.svc.inner.shutdown(&api::ShutdownRequest::default());
    assert!(init.try_recv().is_err(), "a plain Shutdown with containers left must not touch them");
    assert!(f.svc.sandbox().is_some());

    f.svc.inner.shutdown(&api::ShutdownRequest { now: true, ..Default::default() });
    assert_eq!(init.recv_timeout(WAKE).expect("the init's Wait returned"), Ok(LOST));
    assert_eq!(exec.recv_timeout(WAKE).expect("the exec's Wait returned"), Ok(LOST));
    assert!(f.launcher.stopped(0));
    f.exit.wait();
}
