//! Issue 5, end to end: containerd's own runc shim (`io.containerd.runc.v2`,
//! Debian's containerd 1.6) driving `carapace` as its runc binary.
//!
//! The test starts a private containerd (its own config, root, state, socket
//! and debug log in a temporary directory; CRI off), builds a busybox OCI
//! image with umoci, imports it with `ctr`, and runs it with
//! `ctr run --rm --runc-binary carapace`. The shim calls
//! `carapace --root /run/containerd/runc/<ns> --log <bundle>/log.json
//! --log-format json create --bundle .. --pid-file ..`, then `start`, waits
//! for the pid file's process (our monitor) to exit, and calls `delete`.
//! `ctr task exec` goes through `carapace exec --process FILE --detach`.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use carapace_tests::containerd::{ctr_run, task_status, wait_deadline, Containerd, IMAGE};
use carapace_tests::{kvm_available, processes_matching, wait_for, Assets, BOOT_DEADLINE};

#[test]
fn ctr_run_with_the_runc_shim_and_carapace_as_runc() {
    if !kvm_available("ctr_run_with_the_runc_shim_and_carapace_as_runc") {
        return;
    }
    let assets = Assets::get();
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"), &assets);

    containerd.import_busybox(tmp.path());

    let id = "carapace-via-runc-shim";
    let fifo_dir = tmp.path().join("fifo");
    let (stdout_path, stderr_path) = (tmp.path().join("run.out"), tmp.path().join("run.err"));
    let mut run = containerd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            &containerd.carapace.display().to_string(),
            "--snapshotter",
            "native",
            "--fifo-dir",
            &fifo_dir.display().to_string(),
            IMAGE,
            id,
            "sh",
            "-c",
            "echo hello from $(hostname); exit 3",
        ])
        .stdout(File::create(&stdout_path).expect("run.out"))
        .stderr(File::create(&stderr_path).expect("run.err"))
        .spawn()
        .expect("ctr run");
    let status = wait_deadline(&mut run, BOOT_DEADLINE * 2, "`ctr run`");
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let context = || format!("stdout: {stdout:?}\nstderr: {stderr}\n{}", containerd.log_tail());
    assert_eq!(status.code(), Some(3), "`ctr run` must return the container's exit code\n{}", context());

    // The container's output, and proof it did not run in a runc container
    // (runc's new UTS namespace keeps the host's name; the guest has its own).
    let line = stdout.lines().find(|l| l.starts_with("hello from ")).unwrap_or_else(|| panic!("no output\n{}", context()));
    let host = nix::unistd::gethostname().expect("hostname").to_string_lossy().into_owned();
    assert_ne!(line, format!("hello from {host}"), "the container ran with the host's hostname\n{}", context());
    eprintln!("ctr run printed {line:?} and returned 3");

    assert_nothing_left(&containerd, tmp.path());
}

/// Nothing left: no monitor or VMM under the runc shim's root, no container
/// state there, no shim, no rootfs mount, no container.
fn assert_nothing_left(containerd: &Containerd, tmp: &Path) {
    let root = containerd.runc_root();
    let root_s = root.display().to_string();
    let gone = wait_for(Duration::from_secs(30), || processes_matching(&root_s).is_empty().then_some(()));
    assert!(gone.is_some(), "carapace processes under {root_s} left: {:?}", processes_matching(&root_s));
    let vmms: Vec<u32> = processes_matching("carapace-vmm")
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&root_s)))
        .collect();
    assert!(vmms.is_empty(), "carapace-vmm of this test left: {vmms:?}");
    let left: Vec<String> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left under {root_s}: {left:?}");
    let shims = wait_for(Duration::from_secs(30), || containerd.shims().is_empty().then_some(()));
    assert!(shims.is_some(), "the runc shim of this test is still running");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let tmp_s = tmp.display().to_string();
    assert!(!mounts.lines().any(|l| l.contains(&tmp_s)), "mounts under {tmp_s} left");
    assert!(containerd.ctr_ok(&["containers", "list", "--quiet"]).trim().is_empty(), "the container is left");
}

/// Issue 11: `ctr task exec` through the runc shim, which runs each exec as
/// `carapace exec --process FILE --detach --pid-file ..` and then waits
/// for the pid file's process: the exec's output and exit code come back,
/// several times in one container.
#[test]
fn ctr_task_exec_with_the_runc_shim_and_carapace_as_runc() {
    if !kvm_available("ctr_task_exec_with_the_runc_shim_and_carapace_as_runc") {
        return;
    }
    let assets = Assets::get();
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"), &assets);
    containerd.import_busybox(tmp.path());

    let id = "carapace-exec-via-runc-shim";
    let carapace = containerd.carapace.display().to_string();
    let (code, out, err) = ctr_run(
        &containerd,
        tmp.path(),
        "run",
        &[
            "run",
            "-d",
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            &carapace,
            "--snapshotter",
            "native",
            IMAGE,
            id,
            "sleep",
            "100000",
        ],
    );
    assert_eq!(code, Some(0), "ctr run -d: {out}{err}\n{}", containerd.log_tail());
    let running = wait_for(BOOT_DEADLINE, || (task_status(&containerd, id) == "RUNNING").then_some(()));
    assert!(running.is_some(), "the task is not running: {}\n{}", task_status(&containerd, id), containerd.log_tail());

    for (n, code) in [(1, 0), (2, 5), (3, 42)] {
        let exec_id = format!("exec{n}");
        let script = format!("echo out {n}; echo err {n} >&2; exit {code}");
        let (status, out, err) =
            ctr_run(&containerd, tmp.path(), &exec_id, &["task", "exec", "--exec-id", &exec_id, id, "sh", "-c", &script]);
        let context = || format!("stdout: {out:?}\nstderr: {err:?}\n{}", containerd.log_tail());
        assert_eq!(status, Some(code), "`ctr task exec` {exec_id} must return the process's exit code\n{}", context());
        assert_eq!(out, format!("out {n}\n"), "{exec_id}\n{}", context());
        assert!(err.contains(&format!("err {n}")), "{exec_id}\n{}", context());
    }
    // The container itself is still running after its execs.
    assert_eq!(task_status(&containerd, id), "RUNNING");

    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    let stopped = wait_for(BOOT_DEADLINE, || (task_status(&containerd, id) == "STOPPED").then_some(()));
    assert!(stopped.is_some(), "the task did not stop: {}\n{}", task_status(&containerd, id), containerd.log_tail());
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["containers", "delete", id]);
    assert_nothing_left(&containerd, tmp.path());
}
