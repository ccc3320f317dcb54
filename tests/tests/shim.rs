//! Issue 6, end to end: `containerd-shim-carapace-v2` under a real
//! containerd (Debian's 1.6, private, see `carapace_tests::containerd`),
//! driven with `ctr --runtime io.containerd.carapace.v2`: run with output
//! and exit code, exec with and without a terminal, pause/resume, metrics,
//! kill/delete leaving nothing, a config file from the runtime options, and
//! two containers of one pod in one VM.
//! Each test boots one VM (tens of seconds on a kvm_pvm host).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Stdio};
use std::time::Duration;

use carapace_tests::containerd::{assert_clean, ctr_run, task_status, vmms, wait_deadline, Containerd, IMAGE};
use carapace_tests::{kvm_available, wait_for, Assets, BOOT_DEADLINE};

const RUNTIME: &str = "io.containerd.carapace.v2";

fn setup(test: &str) -> Option<(tempfile::TempDir, Containerd)> {
    if !kvm_available(test) {
        return None;
    }
    Some(Containerd::with_busybox(&Assets::get()))
}

/// Waits (up to 30 s) until `ctr events`, writing to `out`, has seen the
/// TaskDelete, stops it, and returns its text and the `/tasks/...` topics
/// of container `id`, in order.
fn task_topics(mut events: Child, out: &std::path::Path, id: &str) -> (String, Vec<String>) {
    let seen = wait_for(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        text.contains("/tasks/delete").then_some(text)
    });
    let _ = events.kill();
    let _ = events.wait();
    let text = seen.unwrap_or_else(|| std::fs::read_to_string(out).unwrap_or_default());
    let quoted = format!("\"{id}\"");
    let topics = text
        .lines()
        .filter(|l| l.contains(&quoted))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")).map(str::to_string))
        .collect();
    (text, topics)
}

#[test]
fn ctr_run_rm_prints_the_output_and_returns_the_exit_code() {
    let Some((tmp, c)) = setup("ctr_run_rm_prints_the_output_and_returns_the_exit_code") else { return };
    let events_out = tmp.path().join("events.out");
    let events =
        c.ctr(&["events"]).stdout(File::create(&events_out).expect("events.out")).stderr(Stdio::null()).spawn().expect("ctr events");
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "run",
        &["run", "--rm", "--runtime", RUNTIME, "--snapshotter", "native", IMAGE, "once", "sh", "-c", "echo hi from $(hostname); exit 3"],
    );
    let context = || format!("stdout: {out:?}\nstderr: {err}\n{}", c.log_tail());
    assert_eq!(code, Some(3), "`ctr run` must return the container's exit code\n{}", context());
    let line = out.lines().find(|l| l.starts_with("hi from ")).unwrap_or_else(|| panic!("no output\n{}", context()));
    let host = nix::unistd::gethostname().expect("hostname").to_string_lossy().into_owned();
    assert_ne!(line, format!("hi from {host}"), "ran with the host's hostname\n{}", context());
    eprintln!("ctr run printed {line:?} and returned 3");
    assert_clean(&c, tmp.path());

    // The shim's events reached containerd, in order.
    let (text, topics) = task_topics(events, &events_out, "once");
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    assert_eq!(topics, ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], "ctr events:\n{text}");
    assert!(
        text.lines().any(|l| l.contains("/tasks/exit") && l.contains("\"exit_status\":3")),
        "TaskExit without the exit status:\n{text}"
    );
    // The shim logs into containerd's log (the bundle's `log` FIFO).
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    assert!(log.contains("serving the Task API") && log.contains("sandbox ready"), "no shim log in containerd's log\n{}", c.log_tail());
    assert!(c.ctr_ok(&["containers", "list", "--quiet"]).trim().is_empty(), "--rm left the container");
}

/// A pty for `ctr task exec -t`: ctr's stdio is the slave; we read the master.
struct Pty {
    master: File,
    slave: OwnedFd,
}

fn pty(rows: u16, cols: u16) -> Pty {
    let ws = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    let p = nix::pty::openpty(Some(&ws), None).expect("openpty");
    Pty { master: File::from(p.master), slave: p.slave }
}

/// Starts `ctr` on the pty; returns it and a thread collecting the master's output.
fn ctr_on_pty(c: &Containerd, p: &Pty, args: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let slave = |_| Stdio::from(p.slave.try_clone().expect("slave"));
    let child = c.ctr(args).stdin(slave(0)).stdout(slave(1)).stderr(slave(2)).spawn().expect("ctr -t");
    let mut master = p.master.try_clone().expect("master");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once every slave fd is closed (ctr exited and we dropped ours).
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    (child, reader)
}

#[test]
fn a_running_task_exec_with_and_without_a_tty_pause_resume_metrics_kill_delete() {
    let Some((tmp, c)) = setup("a_running_task_exec_with_and_without_a_tty_pause_resume_metrics_kill_delete") else { return };
    let id = "svc";
    // The config file named by the runtime options (`ConfigPath`, what the
    // CRI plugin sends for `options`): a broken one fails the run before
    // any VM boots, naming the file and the key...
    let bad = tmp.path().join("bad-config.toml");
    std::fs::write(&bad, "default_vcpus = 1\ndefault_memory = 384\n").expect("bad config");
    let bad_path = bad.display().to_string();
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "run-bad",
        &["run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", &bad_path, "--snapshotter", "native", IMAGE, "badcfg", "true"],
    );
    assert_ne!(code, Some(0), "a broken config file must fail the run: {out}{err}");
    assert!(err.contains(&bad_path) && err.contains("default_memory"), "the error must name the file and the key: {err}");
    let _ = c.ctr(&["containers", "delete", "badcfg"]).output();
    assert_clean(&c, tmp.path());
    // ... and a good one sizes the VM.
    let good = tmp.path().join("config.toml");
    std::fs::write(&good, "default_memory_mib = 384\n").expect("config");
    let good_path = good.display().to_string();
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "run-d",
        &["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", &good_path, "--snapshotter", "native", IMAGE, id, "sleep", "100000"],
    );
    assert_eq!(code, Some(0), "ctr run -d: {out}{err}\n{}", c.log_tail());
    assert_eq!(task_status(&c, id), "RUNNING");
    assert_eq!(vmms(&c).len(), 1, "one VMM for the task");
    let (code, out, err) = ctr_run(&c, tmp.path(), "meminfo", &["task", "exec", "--exec-id", "mem", id, "head", "-n1", "/proc/meminfo"]);
    let kib: u64 = out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // MemTotal is the guest's RAM less the kernel's own: above the 256 MiB
    // default only if the config file was read.
    assert!(code == Some(0) && kib > 300 * 1024 && kib <= 384 * 1024, "guest MemTotal {kib} KiB: {out}{err}\n{}", c.log_tail());

    // exec without a terminal: output and exit code
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "exec1",
        &["task", "exec", "--exec-id", "e1", id, "sh", "-c", "echo from-exec; echo to-stderr >&2; exit 5"],
    );
    assert_eq!(code, Some(5), "exec: {out}{err}\n{}", c.log_tail());
    assert!(out.contains("from-exec"), "exec stdout: {out:?}");
    assert!(err.contains("to-stderr"), "exec stderr: {err:?}");

    // exec with a terminal: a pty in the guest with ctr's window size
    let p = pty(33, 101);
    let script =
        "tty; i=0; while [ $i -lt 200 ]; do s=$(stty size); [ \"$s\" != \"0 0\" ] && break; i=$((i+1)); sleep 0.1; done; echo size=$s";
    let (mut child, reader) = ctr_on_pty(&c, &p, &["task", "exec", "-t", "--exec-id", "e2", id, "sh", "-c", script]);
    let status = wait_deadline(&mut child, BOOT_DEADLINE, "ctr task exec -t");
    let Pty { master, slave } = p;
    drop(slave);
    let text = reader.join().expect("pty reader");
    drop(master);
    assert_eq!(status.code(), Some(0), "exec -t: {text:?}\n{}", c.log_tail());
    assert!(text.contains("/dev/pts/"), "no terminal in the guest: {text:?}");
    assert!(text.contains("size=33 101"), "window size not passed: {text:?}");

    // an interactive shell on a terminal: typed input reaches it
    let p = pty(24, 80);
    let (mut child, reader) = ctr_on_pty(&c, &p, &["task", "exec", "-t", "--exec-id", "e3", id, "sh"]);
    (&p.master).write_all(b"echo typed-$((40+2)); exit 7\n").expect("type");
    let status = wait_deadline(&mut child, BOOT_DEADLINE, "ctr task exec -t sh");
    let Pty { master, slave } = p;
    drop(slave);
    let text = reader.join().expect("pty reader");
    drop(master);
    assert_eq!(status.code(), Some(7), "interactive exec: {text:?}\n{}", c.log_tail());
    assert!(text.contains("typed-42"), "typed input did not reach the shell: {text:?}");

    // pause / resume
    c.ctr_ok(&["task", "pause", id]);
    assert_eq!(task_status(&c, id), "PAUSED");
    c.ctr_ok(&["task", "resume", id]);
    assert_eq!(task_status(&c, id), "RUNNING");

    // ps and metrics (cgroup v2 figures from the guest)
    let ps = c.ctr_ok(&["task", "ps", id]);
    assert!(ps.lines().skip(1).any(|l| l.split_whitespace().next().is_some_and(|p| p.parse::<u32>().is_ok())), "ps: {ps}");
    let metrics = c.ctr_ok(&["task", "metrics", id]);
    let value = |key: &str| -> Option<u64> {
        metrics.lines().find(|l| l.split_whitespace().next() == Some(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    assert!(value("memory.usage").is_some_and(|v| v > 0), "metrics: {metrics}");
    assert!(value("pids.current").is_some_and(|v| v >= 1), "metrics: {metrics}");
    assert!(value("cpu.usage_usec").is_some(), "metrics: {metrics}");
    eprintln!("ctr task metrics:\n{metrics}");

    // kill --all, delete: nothing left
    c.ctr_ok(&["task", "kill", "--all", "--signal", "SIGKILL", id]);
    let stopped = wait_for(Duration::from_secs(60), || (task_status(&c, id) == "STOPPED").then_some(()));
    assert!(stopped.is_some(), "not stopped after kill: {}\n{}", task_status(&c, id), c.log_tail());
    c.ctr_ok(&["task", "delete", id]);
    c.ctr_ok(&["containers", "delete", id]);
    assert_clean(&c, tmp.path());
}

#[test]
fn two_containers_of_one_pod_share_one_vm_each_with_its_own_rootfs() {
    let Some((tmp, c)) = setup("two_containers_of_one_pod_share_one_vm_each_with_its_own_rootfs") else { return };
    let sandbox = ["--annotation", "io.kubernetes.cri.container-type=sandbox", "--annotation", "io.kubernetes.cri.sandbox-id=pod1"];
    let member = ["--annotation", "io.kubernetes.cri.container-type=container", "--annotation", "io.kubernetes.cri.sandbox-id=pod1"];
    let run = |name: &str, annotations: &[&str], extra: &[&str]| {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--snapshotter", "native"];
        args.extend_from_slice(annotations);
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, name, "sleep", "100000"]);
        let (code, out, err) = ctr_run(&c, tmp.path(), name, &args);
        assert_eq!(code, Some(0), "ctr run {name}: {out}{err}\n{}", c.log_tail());
    };
    run("pod1", &sandbox, &["--annotation", "io.carapace.memory_mib=320"]);
    run("app1", &member, &[]);
    assert_eq!(vmms(&c).len(), 1, "two containers of one pod must share one VMM");
    assert_eq!(c.shims().len(), 1, "one shim per pod");

    // The pod's annotation sized the VM.
    let configs: Vec<serde_json::Value> = std::fs::read_dir(c.shim_root())
        .expect("shim root")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("vmm.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    assert_eq!(configs.len(), 1, "{configs:?}");
    assert_eq!(configs[0]["mem_mib"], 320, "{}", configs[0]);

    // Each container has its own rootfs: a file written in one is not in the other.
    let exec =
        |name: &str, id: &str, script: &str| ctr_run(&c, tmp.path(), name, &["task", "exec", "--exec-id", name, id, "sh", "-c", script]);
    let (code, out, _) = exec("w", "app1", "echo app1 > /mine && cat /mine");
    assert_eq!((code, out.trim()), (Some(0), "app1"), "{}", c.log_tail());
    let (code, out, _) = exec("r", "pod1", "cat /mine 2>/dev/null || echo absent");
    assert_eq!((code, out.trim()), (Some(0), "absent"), "{}", c.log_tail());

    // Deleting one container keeps the VM for the other; the last one stops it.
    c.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "app1"]);
    wait_for(Duration::from_secs(60), || (task_status(&c, "app1") == "STOPPED").then_some(())).expect("app1 stopped");
    c.ctr_ok(&["task", "delete", "app1"]);
    c.ctr_ok(&["containers", "delete", "app1"]);
    assert_eq!(vmms(&c).len(), 1, "the VM stopped while the pod still has a container");
    assert_eq!(task_status(&c, "pod1"), "RUNNING");
    c.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "pod1"]);
    wait_for(Duration::from_secs(60), || (task_status(&c, "pod1") == "STOPPED").then_some(())).expect("pod1 stopped");
    c.ctr_ok(&["task", "delete", "pod1"]);
    c.ctr_ok(&["containers", "delete", "pod1"]);
    assert_clean(&c, tmp.path());
}

#[test]
fn an_oom_killed_container_is_reported_as_oom() {
    let Some((tmp, c)) = setup("an_oom_killed_container_is_reported_as_oom") else { return };
    let events_out = tmp.path().join("events.out");
    let events =
        c.ctr(&["events"]).stdout(File::create(&events_out).expect("events.out")).stderr(Stdio::null()).spawn().expect("ctr events");
    // 48 MiB in one buffer under a 16 MiB limit (no swap in the guest).
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "hog",
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--snapshotter",
            "native",
            "--memory-limit",
            "16777216",
            IMAGE,
            "hog",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=48M",
            "count=1",
        ],
    );
    assert_eq!(code, Some(137), "an OOM-killed container exits 137: {out}{err}\n{}", c.log_tail());
    let (text, topics) = task_topics(events, &events_out, "hog");
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let oom = topics.iter().position(|t| *t == "/tasks/oom");
    let exit = topics.iter().position(|t| *t == "/tasks/exit");
    assert!(oom.is_some() && oom < exit, "TaskOOM must come before TaskExit: {topics:?}\n{text}");
    assert_clean(&c, tmp.path());
}

/// Issue 12: the shim starts sandboxes from VM templates too (the same
/// launcher as the CLI): the first `ctr run` makes the template of its VM
/// shape in the config's `template_dir` and starts from it, the second
/// starts from it without making one; nothing of either is left.
#[test]
fn ctr_run_starts_sandboxes_from_a_vm_template() {
    let Some((tmp, c)) = setup("ctr_run_starts_sandboxes_from_a_vm_template") else { return };
    let templates = tmp.path().join("templates");
    let config = tmp.path().join("templates.toml");
    std::fs::write(&config, format!("template_dir = {:?}\n", templates.display().to_string())).expect("config");
    let config_arg = config.display().to_string();
    for (i, id) in ["tpl-first", "tpl-second"].into_iter().enumerate() {
        let (code, out, err) = ctr_run(
            &c,
            tmp.path(),
            id,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--runtime-config-path",
                &config_arg,
                "--snapshotter",
                "native",
                IMAGE,
                id,
                "sh",
                "-c",
                "echo up; exit 5",
            ],
        );
        assert_eq!(code, Some(5), "{id}: {out}{err}\n{}", c.log_tail());
        assert!(out.contains("up"), "{id}: {out}");
        let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
        assert_eq!(log.matches("template made").count(), 1, "{id}: one template is made, by the first run\n{}", c.log_tail());
        assert_eq!(log.matches("restored from template").count(), i + 1, "{id} did not start from the template\n{}", c.log_tail());
        assert_clean(&c, tmp.path());
    }
    let made: Vec<_> = std::fs::read_dir(&templates).expect("template dir").filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(made.iter().any(|n| n.to_string_lossy().len() == 16), "no template directory in {made:?}");
}
