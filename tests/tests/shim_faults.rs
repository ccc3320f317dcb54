//! Issue 6, faults and bad input for `containerd-shim-carapace-v2` under a
//! real containerd: containerd restarted under a running pod (the shim is
//! reconnected), the pod's VMM killed (containerd gets an exit for each
//! container; delete cleans up), and bundles the shim cannot serve (Create
//! fails with a clear error, nothing left).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use carapace_tests::containerd::{assert_clean, ctr_run, signal, task_status, vmms, Containerd, IMAGE};
use carapace_tests::{kvm_available, wait_for, Assets};
use nix::sys::signal::Signal;

const RUNTIME: &str = "io.containerd.carapace.v2";

/// `ctr events` into a file, until killed.
fn listen(c: &Containerd, path: &Path) -> Child {
    c.ctr(&["events"]).stdout(File::create(path).expect("events file")).stderr(Stdio::null()).spawn().expect("ctr events")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until the events file has a line with all of `needles`.
fn seen(path: &Path, needles: &[&str]) -> bool {
    wait_for(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().any(|l| needles.iter().all(|n| l.contains(n))).then_some(())
    })
    .is_some()
}

#[test]
fn a_pod_survives_a_containerd_restart_and_a_killed_vmm_is_reported_and_cleaned_up() {
    if !kvm_available("a_pod_survives_a_containerd_restart_and_a_killed_vmm_is_reported_and_cleaned_up") {
        return;
    }
    let (tmp, mut c) = Containerd::with_busybox(&Assets::get());
    let run = |name: &str, kind: &str| {
        let args = [
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--snapshotter",
            "native",
            "--annotation",
            &format!("io.kubernetes.cri.container-type={kind}"),
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod1",
            IMAGE,
            name,
            "sleep",
            "100000",
        ];
        let (code, out, err) = ctr_run(&c, tmp.path(), name, &args);
        assert_eq!(code, Some(0), "ctr run {name}: {out}{err}\n{}", c.log_tail());
    };
    run("pod1", "sandbox");
    run("app1", "container");
    let vmm = vmms(&c);
    assert_eq!(vmm.len(), 1, "one VMM for the pod");

    // containerd restarted: it reconnects to the running shim.
    c.restart();
    assert_eq!(task_status(&c, "pod1"), "RUNNING", "{}", c.log_tail());
    assert_eq!(task_status(&c, "app1"), "RUNNING", "{}", c.log_tail());
    let events_path = tmp.path().join("events.out");
    let events = listen(&c, &events_path);
    let (code, out, err) = ctr_run(&c, tmp.path(), "exec", &["task", "exec", "--exec-id", "after", "app1", "echo", "still-here"]);
    assert_eq!((code, out.trim()), (Some(0), "still-here"), "exec after the restart: {err}\n{}", c.log_tail());
    // The shim's events reach the new containerd.
    assert!(seen(&events_path, &["/tasks/exec-started", "\"app1\""]), "no exec-started after the restart\n{}", c.log_tail());
    assert_eq!(vmms(&c), vmm, "the restart touched the VM");

    // The VMM killed: containerd hears of an exit (255: the VM was lost)
    // for each container, and delete cleans everything.
    signal(vmm[0], Signal::SIGKILL);
    for id in ["pod1", "app1"] {
        let exit = [id, "/tasks/exit", "\"exit_status\":255"];
        assert!(
            seen(&events_path, &exit),
            "no TaskExit 255 for {id}:\n{}\n{}",
            std::fs::read_to_string(&events_path).unwrap_or_default(),
            c.log_tail()
        );
        let stopped = wait_for(Duration::from_secs(30), || (task_status(&c, id) == "STOPPED").then_some(()));
        assert!(stopped.is_some(), "{id}: {}", task_status(&c, id));
    }
    stop(events);
    for id in ["app1", "pod1"] {
        let (code, out, err) = ctr_run(&c, tmp.path(), &format!("delete-{id}"), &["task", "delete", id]);
        assert!(code.is_some(), "ctr task delete {id}: {out}{err}");
        c.ctr_ok(&["containers", "delete", id]);
    }
    assert!(c.ctr_ok(&["task", "ls", "--quiet"]).trim().is_empty());
    assert_clean(&c, tmp.path());
}

#[test]
fn bundles_the_shim_cannot_serve_fail_create_and_leave_nothing() {
    if !kvm_available("bundles_the_shim_cannot_serve_fail_create_and_leave_nothing") {
        return;
    }
    let (tmp, c) = Containerd::with_busybox(&Assets::get());

    // A rootfs that does not exist: refused before any VM boots.
    let missing = tmp.path().join("no-such-rootfs");
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "norootfs",
        &["run", "--rm", "--runtime", RUNTIME, "--rootfs", &missing.display().to_string(), "norootfs", "sh"],
    );
    assert_ne!(code, Some(0), "a missing rootfs must fail: {out}{err}");
    assert!(err.contains("root.path"), "the error must name root.path: {err}\n{}", c.log_tail());
    assert!(vmms(&c).is_empty(), "a VM was booted for a bundle without a rootfs");

    // A spec the guest refuses (relative cwd): the VM booted for it stops.
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "badcwd",
        &["run", "--rm", "--runtime", RUNTIME, "--snapshotter", "native", "--cwd", "relative/dir", IMAGE, "badcwd", "true"],
    );
    assert_ne!(code, Some(0), "a relative cwd must fail: {out}{err}");
    assert!(err.contains("process.cwd"), "the error must name process.cwd: {err}\n{}", c.log_tail());
    let _ = c.ctr(&["containers", "delete", "norootfs"]).output();
    let _ = c.ctr(&["containers", "delete", "badcwd"]).output();
    assert_clean(&c, tmp.path());
}
