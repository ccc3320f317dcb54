//! Issue 5, end to end: the `carapace` CLI used as runc would be, each
//! container in its own microVM.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use carapace_tests::cli::{bundle, Cli};
use carapace_tests::{kvm_available, processes_matching, wait_for};
use serde_json::{json, Value};

/// A container's exit reaches the state within this (the guest is emulated).
const EXIT_DEADLINE: Duration = Duration::from_secs(120);

/// Host hooks append their name to `log` and keep the state they got.
fn host_hook(log: &Path, name: &str) -> Value {
    let dir = log.parent().expect("log dir").display().to_string();
    json!({"path": "/bin/sh", "args": ["sh", "-c",
        format!("cat > {dir}/{name}.json; echo {name} >> {}", log.display())], "timeout": 30})
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("JSON")
}

/// Receives the pty master runc-style: one fd over SCM_RIGHTS.
fn receive_pty(listener: &UnixListener) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (stream, _) = listener.accept().expect("console socket connection");
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).expect("recvmsg");
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the fd was just received and is owned by nobody else.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received on the console socket");
}

#[test]
fn lifecycle_exec_ps_pause_hooks_and_a_read_only_root() {
    if !kvm_available("lifecycle_exec_ps_pause_hooks_and_a_read_only_root") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cli = Cli::new(&tmp.path().join("root"));
    let logs = tmp.path().join("logs");
    std::fs::create_dir(&logs).expect("logs");
    let hooks_log = logs.join("hooks.log");
    let b = bundle(&cli, &tmp.path().join("bundle"), |s| {
        s["process"]["args"] = json!(["sh", "-c", "echo started; exec sleep 100000"]);
        s["mounts"].as_array_mut().expect("mounts").push(json!(
            {"destination": "/logs", "type": "bind", "source": logs, "options": ["rbind", "rw"]}));
        s["hooks"] = json!({
            "prestart": [host_hook(&hooks_log, "prestart")],
            "createRuntime": [host_hook(&hooks_log, "createRuntime")],
            "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo startContainer >> /logs/hooks.log"]}],
            "poststart": [host_hook(&hooks_log, "poststart")],
            "poststop": [host_hook(&hooks_log, "poststop")],
        });
    });
    let bundle_arg = b.display().to_string();
    let out_path = tmp.path().join("c1.out");
    let pid_file = tmp.path().join("c1.pid");

    // create: returns once the container is created; its stdout is ours.
    let out_file = std::fs::File::create(&out_path).expect("out");
    let status = cli
        .command(&["create", "--bundle", &bundle_arg, "--pid-file", &pid_file.display().to_string(), "c1"])
        .stdout(out_file.try_clone().expect("dup"))
        .stderr(out_file)
        .status()
        .expect("create");
    assert!(status.success(), "create failed: {}", std::fs::read_to_string(&out_path).unwrap_or_default());
    let state = cli.state("c1");
    assert_eq!(state["status"], "created");
    assert_eq!(state["id"], "c1");
    assert_eq!(state["bundle"], bundle_arg);
    let vmm_pid = cli.vmm_pid("c1");
    let cmdline = std::fs::read_to_string(format!("/proc/{vmm_pid}/cmdline")).expect("VMM alive");
    assert!(cmdline.contains("carapace-vmm"), "the annotation's pid {vmm_pid} is the VMM: {cmdline}");
    let monitor: u32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid");
    assert!(Path::new(&format!("/proc/{monitor}")).exists(), "the pid file names a live process");
    // One host pid for the container, as runc gives: the pid file's is state's.
    assert_eq!(state["pid"].as_u64(), Some(u64::from(monitor)), "state pid = pid file");

    // The same id again, and an unknown signal: clear errors, nothing changed.
    let e = cli.fails(&["create", "--bundle", &bundle_arg, "c1"]);
    assert!(e.contains("already exists"), "{e}");
    let e = cli.fails(&["kill", "c1", "SIGFOO"]);
    assert!(e.contains("unknown signal") && e.contains("SIGFOO"), "{e}");
    assert_eq!(cli.state("c1")["status"], "created");

    cli.ok(&["start", "c1"]);
    assert_eq!(cli.state("c1")["status"], "running");
    let e = cli.fails(&["start", "c1"]);
    assert!(e.contains("already running"), "{e}");

    // exec without a terminal: output and exit code come back.
    let out = cli.run(&["exec", "c1", "sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "exec-err\n");
    // The root is read-only; the bind mount is not.
    let out = cli.run(&["exec", "c1", "sh", "-c", "touch /x || echo refused; echo ok > /logs/w; cat /logs/w"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused") && text.contains("ok"), "{text}");
    assert_eq!(std::fs::read_to_string(logs.join("w")).expect("written through the bind"), "ok\n");
    assert!(!b.join("rootfs/x").exists());

    // The bind mount's source keeps its name in mountinfo, as under runc.
    let info = cli.ok(&["exec", "c1", "cat", "/proc/self/mountinfo"]);
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some("/logs")).unwrap_or_else(|| panic!("no /logs in {info}"));
    assert!(line.split(' ').nth(3).is_some_and(|root| root.ends_with("/logs")), "source name lost: {line}");

    // Detached execs (containerd's runc shim runs every exec this way): each
    // runs, none is lost.
    for i in 0..20 {
        let pid_file = tmp.path().join(format!("exec-{i}.pid"));
        cli.ok_detached(&[
            "exec",
            "--detach",
            "--pid-file",
            &pid_file.display().to_string(),
            "c1",
            "sh",
            "-c",
            &format!("echo {i} >> /logs/detached"),
        ]);
        assert!(pid_file.exists(), "exec {i}: no pid file");
    }
    let all_ran = wait_for(Duration::from_secs(120), || {
        let text = std::fs::read_to_string(logs.join("detached")).unwrap_or_default();
        (text.lines().count() == 20).then_some(())
    });
    assert!(all_ran.is_some(), "detached execs: {:?}", std::fs::read_to_string(logs.join("detached")));

    // exec with a terminal over a console socket: the size we set arrives.
    let sock = tmp.path().join("console.sock");
    let listener = UnixListener::bind(&sock).expect("console socket");
    let mut exec = cli
        .command(&[
            "exec",
            "--tty",
            "--console-socket",
            &sock.display().to_string(),
            "c1",
            "sh",
            "-c",
            "for i in $(seq 30); do s=$(stty size); [ \"$s\" = '40 100' ] && break; sleep 1; done; echo size=$s; tty; exit 4",
        ])
        .spawn()
        .expect("exec --tty");
    let master = receive_pty(&listener);
    let ws = libc::winsize { ws_row: 40, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the struct we pass.
    assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }, 0);
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the slave side closes.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&text).contains("/dev/pts/") {
                break;
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let status = exec.wait().expect("exec");
    let text = reader.join().expect("reader");
    assert_eq!(status.code(), Some(4), "{text}");
    assert!(text.contains("size=40 100"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");

    // ps, events, pause and resume.
    let pids: Vec<u32> = serde_json::from_str(&cli.ok(&["ps", "--format", "json", "c1"])).expect("ps JSON");
    assert!(!pids.is_empty(), "ps lists the container's processes");
    let ev: Value = serde_json::from_str(&cli.ok(&["events", "--stats", "c1"])).expect("events JSON");
    assert_eq!(ev["type"], "stats");
    assert!(ev["data"]["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{ev}");
    assert!(ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0, "{ev}");
    cli.ok(&["pause", "c1"]);
    assert_eq!(cli.state("c1")["status"], "paused");
    let list: Value = serde_json::from_str(&cli.ok(&["list", "--format", "json"])).expect("list JSON");
    assert_eq!(list[0]["status"], "paused");
    cli.ok(&["resume", "c1"]);
    assert_eq!(cli.state("c1")["status"], "running");
    assert!(cli.ok(&["list"]).contains("c1"));

    // A running container is not deleted without --force; kill stops it.
    let e = cli.fails(&["delete", "c1"]);
    assert!(e.contains("not stopped"), "{e}");
    cli.ok(&["kill", "c1", "KILL"]);
    assert!(cli.wait_status("c1", "stopped", EXIT_DEADLINE), "c1 did not stop: {}", cli.state("c1"));
    let monitor_gone = || {
        let stat = std::fs::read_to_string(format!("/proc/{monitor}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z")).then_some(())
    };
    assert!(wait_for(EXIT_DEADLINE, monitor_gone).is_some(), "the monitor exits after the container (and its VM)");
    let e = cli.fails(&["kill", "c1"]);
    assert!(e.contains("not running"), "{e}");
    let e = cli.fails(&["start", "c1"]);
    assert!(e.contains("stopped"), "{e}");
    cli.ok(&["delete", "c1"]);
    let e = cli.fails(&["state", "c1"]);
    assert!(e.contains("does not exist"), "{e}");

    assert_eq!(std::fs::read_to_string(&out_path).expect("output"), "started\n");
    let order = std::fs::read_to_string(&hooks_log).expect("hooks log");
    assert_eq!(order, "prestart\ncreateRuntime\nstartContainer\npoststart\npoststop\n", "hooks in the OCI order");
    for (hook, status) in [("prestart", "creating"), ("createRuntime", "creating"), ("poststart", "running"), ("poststop", "stopped")] {
        let s = read_json(&logs.join(format!("{hook}.json")));
        assert_eq!(s["id"], "c1", "{hook}: {s}");
        assert_eq!(s["status"], status, "{hook}: {s}");
        assert_eq!(s["bundle"], bundle_arg, "{hook}: {s}");
    }
    assert!(processes_matching("carapace-vmm").iter().all(|p| *p != vmm_pid), "the VMM is gone");
    cli.assert_nothing_left();
}

#[test]
fn run_returns_the_exit_code_and_containers_run_side_by_side() {
    if !kvm_available("run_returns_the_exit_code_and_containers_run_side_by_side") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cli = Cli::new(&tmp.path().join("root"));
    // The default `carapace spec` config, running `sh -c` commands.
    let runs: Vec<_> = [("r1", 3), ("r2", 0)]
        .into_iter()
        .map(|(id, code)| {
            let b = bundle(&cli, &tmp.path().join(id), |s| {
                s["process"]["args"] = json!(["sh", "-c", format!("echo hello from $(hostname) as $(id -u); exit {code}")]);
            });
            let cli = cli.clone();
            std::thread::spawn(move || {
                let out = cli.command(&["run", "--bundle", &b.display().to_string(), id]).output().expect("run");
                (id, code, out)
            })
        })
        .collect();
    for h in runs {
        let (id, code, out) = h.join().expect("thread");
        assert_eq!(out.status.code(), Some(code), "{id}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from carapace as 0\n", "{id}");
    }
    assert_eq!(cli.ok(&["list", "-q"]), "");
    cli.assert_nothing_left();
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cli = Cli::new(&tmp.path().join("root"));
    let good = bundle(&cli, &tmp.path().join("good"), |_| {});
    // Each variant shares the good rootfs by its absolute path.
    let mut base: Value = serde_json::from_slice(&std::fs::read(good.join("config.json")).expect("read")).expect("json");
    base["root"]["path"] = json!(good.join("rootfs"));
    let variant = |name: &str, edit: &dyn Fn(&Path)| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&base).expect("json")).expect("write");
        edit(&dir);
        dir.display().to_string()
    };
    let set = |field: &'static str, value: Value| {
        move |dir: &Path| {
            let path = dir.join("config.json");
            let mut spec: Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
            let mut at = &mut spec;
            let parts: Vec<&str> = field.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                at = &mut at[*p];
            }
            at[parts[parts.len() - 1]] = value.clone();
            std::fs::write(&path, serde_json::to_vec(&spec).expect("json")).expect("write");
        }
    };
    let outside = tempfile::tempdir().expect("outside");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed",
            variant("malformed", &|d| std::fs::write(d.join("config.json"), "{\"ociVersion\": ").expect("w")),
            "invalid config.json",
        ),
        ("noconfig", variant("noconfig", &|d| std::fs::remove_file(d.join("config.json")).expect("rm")), "config.json not found"),
        ("norootfs", variant("norootfs", &set("root.path", json!("rootfs"))), "root.path"),
        ("noargs", variant("noargs", &set("process.args", json!([]))), "process.args"),
        ("relcwd", variant("relcwd", &set("process.cwd", json!("tmp"))), "process.cwd"),
        ("wrongtype", variant("wrongtype", &set("process.args", json!("sh"))), "invalid config.json: process.args: invalid type"),
        ("nohook", variant("nohook", &set("hooks", json!({"createRuntime": [{"path": "/nonexistent/hook"}]}))), "hooks.createRuntime"),
        ("relhook", variant("relhook", &set("hooks", json!({"poststart": [{"path": "bin/true"}]}))), "not absolute"),
        ("hugehost", variant("hugehost", &set("hostname", json!("h".repeat(100_000)))), "hostname"),
        ("hugeuid", variant("hugeuid", &set("process.user.uid", json!(1u64 << 40))), "invalid config.json: process.user.uid"),
        (
            "hugemem",
            variant("hugemem", &set("annotations", json!({"io.carapace.memory_mib": "1000000000000"}))),
            "annotations.io.carapace.memory_mib",
        ),
        ("hugecpus", variant("hugecpus", &set("annotations", json!({"io.carapace.vcpus": "100000"}))), "annotations.io.carapace.vcpus"),
        (
            "escape",
            variant("escape", &|d| {
                std::os::unix::fs::symlink(outside.path(), d.join("rootfs")).expect("link");
                set("root.path", json!("rootfs"))(d);
            }),
            "outside the bundle",
        ),
    ];
    for (id, dir, want) in &cases {
        let e = cli.fails(&["create", "--bundle", dir, id]);
        assert!(e.contains(want), "{id}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{id}: one line: {e}");
    }
    let g = good.display().to_string();
    let long = "a".repeat(1025);
    for (id, want) in
        [("a/b", "invalid container id"), ("..", "must not be"), ("../x", "invalid container id"), (long.as_str(), "1025 bytes")]
    {
        let e = cli.fails(&["create", "--bundle", &g, id]);
        assert!(e.contains(want), "{id:.20}: {e}");
    }
    let e = cli.fails(&["kill", "nosuch", "KILL"]);
    assert!(e.contains("does not exist"), "{e}");
    let e = cli.fails(&["delete", "nosuch"]);
    assert!(e.contains("does not exist"), "{e}");
    let e = cli.fails(&["spec", "--bundle", &g]);
    assert!(e.contains("exists"), "{e}");
    cli.assert_nothing_left();
}

/// Issue 14 item 6: what the guest cannot run is refused by `create` on the
/// host, before any VM: a config without `process`, an AppArmor profile, an
/// SELinux label. The error names the field (and the value); no VMM process
/// ever appears (watched during each create) and nothing is left. The
/// elapsed time is printed, not asserted.
#[test]
fn specs_the_guest_cannot_run_fail_create_before_any_vm() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if !carapace_test_support::can_run("specs_the_guest_cannot_run_fail_create_before_any_vm", &[carapace_test_support::Need::Root]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cli = Cli::new(&tmp.path().join("root"));
    let root = cli.root.display().to_string();
    type Edit<'a> = &'a dyn Fn(&mut Value);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "noprocess",
            &|s: &mut Value| {
                s.as_object_mut().expect("spec").remove("process");
            },
            "field process: missing",
        ),
        (
            "apparmor",
            &|s: &mut Value| s["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d"),
            "field process.apparmorProfile: \"cri-containerd.apparmor.d\": AppArmor is not available in the guest",
        ),
        (
            "selinux",
            &|s: &mut Value| s["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0"),
            "field process.selinuxLabel: \"system_u:system_r:container_t:s0\"",
        ),
    ];
    for (id, edit, want) in cases {
        let b = bundle(&cli, &tmp.path().join(id), edit);
        // Any VMM of this root, seen while create runs.
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (stop, root) = (stop.clone(), root.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    seen.extend(processes_matching("carapace-vmm").into_iter().filter(|p| {
                        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&root))
                    }));
                    std::thread::sleep(Duration::from_millis(2));
                }
                seen
            })
        };
        let started = std::time::Instant::now();
        let out = cli.run(&["create", "--bundle", &b.display().to_string(), id]);
        let elapsed = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        let vmms = watcher.join().expect("watcher");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{id}: create succeeded");
        assert!(err.contains(want) && err.contains("config.json"), "{id}: {err}");
        assert!(vmms.is_empty(), "{id}: a VMM was started: {vmms:?}");
        eprintln!("{id}: create refused in {:.1} ms: {}", elapsed.as_secs_f64() * 1000.0, err.trim());
        let e = cli.fails(&["state", id]);
        assert!(e.contains("does not exist"), "{id}: {e}");
        cli.assert_nothing_left();
    }
}

/// Force-deletes a container when dropped, so a failed assertion leaves no
/// VM running (declared after the tempdir, it is dropped before it).
struct DeleteOnDrop<'a>(&'a Cli, &'a str);

impl Drop for DeleteOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["delete", "--force", self.1]);
    }
}

/// Issue 14 item 7: a process whose uid may not write a root-owned 0755
/// directory of the rootfs writes there when it has CAP_DAC_OVERRIDE, as
/// under runc (the virtio-fs share honours the capabilities the guest kernel
/// checked); without the capability the guest refuses it (EACCES).
#[test]
fn cap_dac_override_writes_into_a_root_owned_dir_of_the_rootfs() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !kvm_available("cap_dac_override_writes_into_a_root_owned_dir_of_the_rootfs") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cli = Cli::new(&tmp.path().join("root"));
    let b = bundle(&cli, &tmp.path().join("bundle"), |s| {
        s["root"]["readonly"] = json!(false);
        s["process"]["args"] = json!(["sleep", "100000"]);
    });
    let locked = b.join("rootfs/locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let meta = std::fs::metadata(&locked).expect("stat");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755), "the test runs as root");
    cli.ok_detached(&["run", "--detach", "--bundle", &b.display().to_string(), "dac"]);
    let _cleanup = DeleteOnDrop(&cli, "dac");

    // uid 1000 with `caps` in every set (ambient too, so `sh` keeps them).
    let exec_as_1000 = |name: &str, caps: &[&str]| {
        let process = json!({
            "user": {"uid": 1000, "gid": 1000},
            "args": ["sh", "-c", format!("echo {name} > /locked/{name} && mkdir /locked/{name}.d && echo wrote")],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps, "ambient": caps},
            "noNewPrivileges": true,
        });
        let path = tmp.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec(&process).expect("json")).expect("process.json");
        cli.run(&["exec", "--process", &path.display().to_string(), "dac"])
    };

    let out = exec_as_1000("with-cap", &["CAP_DAC_OVERRIDE"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "uid 1000 with CAP_DAC_OVERRIDE: {} {stderr}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "wrote\n");
    assert_eq!(std::fs::read_to_string(locked.join("with-cap")).expect("written on the host"), "with-cap\n");
    for name in ["with-cap", "with-cap.d"] {
        let meta = std::fs::metadata(locked.join(name)).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000), "{name} belongs to the caller");
    }

    let out = exec_as_1000("without-cap", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uid 1000 without capabilities wrote: {stderr}");
    assert!(stderr.contains("Permission denied"), "EACCES: {stderr}");
    assert!(!locked.join("without-cap").exists());

    cli.ok(&["kill", "dac", "KILL"]);
    assert!(cli.wait_status("dac", "stopped", EXIT_DEADLINE), "dac did not stop: {}", cli.state("dac"));
    cli.ok(&["delete", "dac"]);
    cli.assert_nothing_left();
}
