//! Issue 2, end to end: `carapace-vmm` boots the guest kernel and the agent
//! initramfs; the agent answers over hybrid vsock; Shutdown ends the VM.

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use carapace_protocol::client;
use carapace_protocol::health::VersionRequest;
use carapace_protocol::HealthClient;
use carapace_runtime::assets::GuestAssets;
use carapace_runtime::vm::{Vm, VmError, VmOptions};
use carapace_tests::{kvm_available, processes_matching, wait_for, Assets, BOOT_DEADLINE};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

#[test]
fn vmm_boots_agent_answers_and_shutdown_exits_zero() {
    if !kvm_available("vmm_boots_agent_answers_and_shutdown_exits_zero") {
        return;
    }
    let assets = Assets::get();
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vm.sock");
    let console = dir.path().join("console.log");
    let mut vmm = Command::new(assets.bin("carapace-vmm"))
        .args(["--vcpus", "1", "--mem-mib", "256", "--cid", "3"])
        .arg("--kernel")
        .arg(&assets.kernel)
        .arg("--initramfs")
        .arg(&assets.initramfs)
        .arg("--serial")
        .arg(&console)
        .arg("--vsock-uds")
        .arg(&uds)
        .stdin(Stdio::null())
        .spawn()
        .expect("start carapace-vmm");

    // Health.Check answers SERVING (wait_for_agent retries until it does).
    let agent = client::wait_for_agent(&uds, BOOT_DEADLINE).unwrap_or_else(|e| {
        let _ = vmm.kill();
        panic!("agent did not answer: {e}\nconsole:\n{}", std::fs::read_to_string(&console).unwrap_or_default())
    });

    // Version answers the agent's version and API version.
    let version = HealthClient::new(agent.clone()).version(ctx(), &VersionRequest::new()).expect("Health.Version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, carapace_protocol::API_VERSION);

    // Several connections at once, each its own vsock stream.
    let others: Vec<_> = (0..8)
        .map(|i| {
            client::connect_hybrid_vsock(&uds, carapace_protocol::AGENT_VSOCK_PORT, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    for (i, c) in others.iter().enumerate() {
        client::check_serving(c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    drop(others);

    // The guest's console shows the agent's line.
    let text = std::fs::read_to_string(&console).expect("console log");
    assert!(text.contains("carapace-agent"), "console:\n{text}");

    // Shutdown ends the VM and the VMM exits 0, leaving no socket behind.
    carapace_runtime::agent::shutdown(&agent).expect("Agent.Shutdown");
    let status = wait_for(Duration::from_secs(120), || vmm.try_wait().expect("try_wait")).unwrap_or_else(|| {
        let _ = vmm.kill();
        panic!("the VMM did not exit after Shutdown")
    });
    assert!(status.success(), "VMM exit status {status}");
    assert!(!uds.exists(), "vsock socket {} left behind", uds.display());
    assert!(processes_matching(&uds.display().to_string()).is_empty(), "a VMM process is left");
}

fn vmm_error(args: &[&str]) -> (i32, String) {
    let assets = Assets::get();
    let out = Command::new(assets.bin("carapace-vmm")).args(args).output().expect("run carapace-vmm");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn vmm_refuses_bad_input_and_leaves_nothing() {
    let assets = Assets::get();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("v.sock");
    let (k, i, s) = (assets.kernel.to_str().expect("utf8"), assets.initramfs.to_str().expect("utf8"), sock.to_str().expect("utf8"));
    let base = |kernel: &str, initramfs: &str, mem: &str| {
        vec![
            "--kernel".to_string(),
            kernel.into(),
            "--initramfs".into(),
            initramfs.into(),
            "--mem-mib".into(),
            mem.into(),
            "--vsock-uds".into(),
            s.into(),
            "--cid".into(),
            "3".into(),
            "--serial".into(),
            "none".into(),
        ]
    };
    let run = |args: Vec<String>| vmm_error(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let (code, err) = run(base("/nonexistent/vmlinux", i, "256"));
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");

    let not_elf = dir.path().join("bzImage");
    std::fs::write(&not_elf, b"MZ this is not an ELF kernel").expect("write");
    let (code, err) = run(base(not_elf.to_str().expect("utf8"), i, "256"));
    assert_ne!(code, 0);
    assert!(err.contains("bzImage") && err.to_lowercase().contains("elf"), "{err}");

    let (code, err) = run(base(k, "/nonexistent/initramfs.cpio", "256"));
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/initramfs.cpio"), "{err}");

    let (code, err) = run(base(k, i, "8"));
    assert_ne!(code, 0);
    assert!(err.contains("mem"), "{err}");

    // The vsock socket path is already served by someone else.
    let busy = UnixListener::bind(&sock).expect("bind");
    let (code, err) = run(base(k, i, "256"));
    assert_ne!(code, 0);
    assert!(err.contains(s), "{err}");
    drop(busy);
    std::fs::remove_file(&sock).expect("the test's own socket is still there");

    // A virtio-fs share that does not exist, and two shares with one tag.
    let mut args = base(k, i, "256");
    args.extend(["--fs".into(), "root:/nonexistent/share".into()]);
    let (code, err) = run(args);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/share"), "{err}");
    let d = dir.path().to_str().expect("utf8");
    let mut args = base(k, i, "256");
    args.extend(["--fs".into(), format!("same:{d}"), "--fs".into(), format!("same:{d}")]);
    let (code, err) = run(args);
    assert_ne!(code, 0);
    assert!(err.contains("same"), "{err}");

    assert!(!err.contains("panicked"), "exit {code}: {err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("readdir").count(), 1, "only bzImage remains");
}

/// A guest that never answers: busybox's init as /init, no agent. The
/// runtime gives up at its deadline with a clear error and kills the VM.
#[test]
fn runtime_gives_up_on_a_guest_that_never_answers() {
    if !kvm_available("runtime_gives_up_on_a_guest_that_never_answers") {
        return;
    }
    let assets = Assets::get();
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = dir.path().join("busybox.cpio");
    carapace_tests::cpio::busybox_initramfs(&initramfs).expect("busybox initramfs");
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).expect("mkdir");
    let guest = GuestAssets { kernel: assets.kernel.clone(), initramfs, vmm: assets.bin("carapace-vmm") };
    let mut vm = Vm::start(&guest, &vm_dir, &VmOptions::default()).expect("start VM");
    let pid = vm.pid();
    let Err(err) = vm.wait_for_agent(Duration::from_secs(15)) else { panic!("nobody serves vsock port 1024, yet the agent answered") };
    assert!(matches!(err, VmError::AgentTimeout { .. }), "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    drop(vm);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "VMM {pid} still running");
    assert!(!Vm::vsock_path(&vm_dir).exists(), "socket left behind");
}
