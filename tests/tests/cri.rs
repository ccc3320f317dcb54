//! Issue 14, end to end through Kubernetes' CRI: a private containerd with
//! its CRI plugin on, the `carapace` runtime handler
//! (`io.containerd.carapace.v2`), a CNI bridge in containerd's own network
//! namespace, a locally built pause image without `PATH` (a static
//! `/pause`), and the CRI API through a small client (Debian has no
//! `crictl`). One pod, one VM, for every step:
//!
//! (a) its two containers share the pod's IPC namespace (a System V
//!     segment made in one is listed in the other) and the pod's IPC
//!     sysctl `kernel.shm_rmid_forced=1` reads 1 in a container;
//! (b) with the pod's PID namespace shared, `/proc/1` in a container is the
//!     pause process, and the other container's process is seen;
//! (c) `exec -it` (a terminal, 64-character container and exec ids, the
//!     stream server's WebSocket protocol) runs and returns its exit code;
//! (d) an exec of a program that does not exist fails, the container still
//!     execs afterwards, and the pod then stops and is removed, its shim
//!     exits, and nothing is left (no shim, VMM, mount).

use std::time::{Duration, Instant};

use carapace_tests::cli::busybox_rootfs;
use carapace_tests::containerd::{assert_clean, image_tar, static_c_binary, vmms, Containerd, CNI_BIN_DIR, CRI_HANDLER, PAUSE_IMAGE};
use carapace_tests::cri::{exec_tty, CriClient};
use carapace_tests::{kvm_available, wait_for, Assets, BOOT_DEADLINE};
use k8s_cri::v1 as cri;

/// The containers' image: busybox and `shmhold`.
const TOOLS_IMAGE: &str = "docker.io/library/carapace-cri-tools:latest";
/// The System V key the holder's segment gets ("CARA").
const SHM_KEY: i64 = 0x4341_5241;
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

fn tools_present(test: &str) -> bool {
    for (what, path) in [
        ("musl-gcc (apt musl-tools)", "/usr/bin/musl-gcc"),
        ("the CNI bridge plugin (apt containernetworking-plugins)", &format!("{CNI_BIN_DIR}/bridge")),
        ("unshare (util-linux)", "/usr/bin/unshare"),
    ] {
        if !std::path::Path::new(path).exists() {
            return carapace_test_support::skip(test, what);
        }
    }
    true
}

/// The pod's mounts of network namespaces (`/run/netns/cni-*`).
fn cni_netns_mounts() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.contains("/netns/cni-")).map(str::to_string).collect()
}

#[test]
fn a_cri_pod_shares_ipc_and_pid_execs_with_a_tty_and_survives_a_failed_exec() {
    let test = "a_cri_pod_shares_ipc_and_pid_execs_with_a_tty_and_survives_a_failed_exec";
    if !kvm_available(test) || !tools_present(test) {
        return;
    }
    let assets = Assets::get();
    assert!(assets.bin("containerd-shim-carapace-v2").exists(), "containerd-shim-carapace-v2 is missing: run `bash scripts/test.sh`");
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let netns_before = cni_netns_mounts();

    // The images: a pause image holding only a static /pause and no
    // environment (no PATH), and busybox with shmhold.
    let (pause_bin, shmhold_bin) = (work.join("pause"), work.join("shmhold"));
    static_c_binary("pause", &pause_bin);
    static_c_binary("shmhold", &shmhold_bin);
    let pause_tar = image_tar(
        work,
        "pause",
        |root| {
            std::fs::copy(&pause_bin, root.join("pause")).expect("copy pause");
        },
        &["--config.entrypoint", "/pause"],
    );
    let tools_tar = image_tar(
        work,
        "tools",
        |root| {
            busybox_rootfs(root);
            std::fs::copy(&shmhold_bin, root.join("bin/shmhold")).expect("copy shmhold");
        },
        &["--config.cmd", "sh"],
    );

    let c = Containerd::start_cri(&work.join("containerd"), &assets);
    c.import_image(&pause_tar, PAUSE_IMAGE);
    c.import_image(&tools_tar, TOOLS_IMAGE);
    let cri = CriClient::connect(&c.socket());
    let known = wait_for(Duration::from_secs(60), || (cri.has_image(PAUSE_IMAGE) && cri.has_image(TOOLS_IMAGE)).then_some(()));
    assert!(known.is_some(), "the CRI does not list the imported images\n{}", c.log_tail());
    let logs = work.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log dir");

    // The pod: IPC and PID namespaces of the pod, an IPC sysctl.
    let pod_ns = || {
        Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Pod as i32,
            pid: cri::NamespaceMode::Pod as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        })
    };
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "cri-pod".into(),
            uid: format!("carapace-cri-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "cri-pod".into(),
        log_directory: logs.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            sysctls: [("kernel.shm_rmid_forced".to_string(), "1".to_string())].into(),
            security_context: Some(cri::LinuxSandboxSecurityContext { namespace_options: pod_ns(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let run = cri.call(
        cri.runtime().run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(pod_config.clone()), runtime_handler: CRI_HANDLER.into() }),
    );
    let pod = run.unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log_tail())).pod_sandbox_id;
    eprintln!("RunPodSandbox (the VM's boot): {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(pod.len(), 64, "a CRI-length id: {pod}");

    let container = |name: &str, cmd: &[&str]| -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: TOOLS_IMAGE.into(), ..Default::default() }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext { namespace_options: pod_ns(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req =
            cri::CreateContainerRequest { pod_sandbox_id: pod.clone(), config: Some(config), sandbox_config: Some(pod_config.clone()) };
        let id = cri
            .call(cri.runtime().create_container(req))
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", c.log_tail()))
            .container_id;
        cri.call(cri.runtime().start_container(cri::StartContainerRequest { container_id: id.clone() }))
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", c.log_tail()));
        assert_eq!(id.len(), 64, "a CRI-length id: {id}");
        id
    };
    let started = Instant::now();
    let holder = container("holder", &["/bin/shmhold", &SHM_KEY.to_string()]);
    let reader = container("reader", &["/bin/sleep", "100000"]);
    eprintln!("containers {holder} and {reader} created and started: {:.1} s", started.elapsed().as_secs_f64());
    let exec = |id: &str, cmd: &[&str]| -> (i32, String, String) {
        cri.exec_sync(id, cmd, EXEC_TIMEOUT).unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}\n{}", c.log_tail()))
    };

    // (a) One IPC namespace: the holder's segment is listed in the reader.
    let holder_log = logs.join("holder.log");
    let line =
        wait_for(BOOT_DEADLINE, || std::fs::read_to_string(&holder_log).ok()?.lines().find(|l| l.contains("shmid ")).map(str::to_string));
    let line = line.unwrap_or_else(|| panic!("shmhold printed nothing: {:?}\n{}", std::fs::read_to_string(&holder_log), c.log_tail()));
    let shmid: i64 = line.split("shmid ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect("shmid");
    let (code, shm, _) = exec(&reader, &["/bin/cat", "/proc/sysvipc/shm"]);
    assert_eq!(code, 0);
    let listed = shm.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&SHM_KEY.to_string().as_str()) && f.get(1) == Some(&shmid.to_string().as_str())
    });
    assert!(listed, "segment {shmid} (key {SHM_KEY}) made in the holder is not seen in the reader:\n{shm}");
    eprintln!("(a) the reader lists the holder's SysV segment {shmid} (key {SHM_KEY:#x})");
    let (_, rmid, _) = exec(&reader, &["/bin/cat", "/proc/sys/kernel/shm_rmid_forced"]);
    assert_eq!(rmid.trim(), "1", "the pod's sysctl kernel.shm_rmid_forced");
    eprintln!("(a) kernel.shm_rmid_forced in a container: {}", rmid.trim());

    // (b) The pod's PID namespace: PID 1 is the pause process, and the
    // holder's process is there too.
    let (_, cmdline, _) = exec(&reader, &["/bin/cat", "/proc/1/cmdline"]);
    assert_eq!(cmdline, "/pause\0", "PID 1 in a container of a PID-sharing pod");
    let (_, all, _) = exec(&reader, &["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]);
    assert!(all.contains("/bin/shmhold"), "the holder's process is not in the reader's PID namespace: {all}");
    eprintln!("(b) /proc/1/cmdline in a container: {cmdline:?}");

    // (c) exec -it: a terminal, the CRI's 64-character exec id.
    let url = cri
        .call(cri.runtime().exec(cri::ExecRequest {
            container_id: reader.clone(),
            cmd: vec!["/bin/sh".into()],
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        }))
        .unwrap_or_else(|e| panic!("Exec: {e}\n{}", c.log_tail()))
        .url;
    let started = Instant::now();
    let tty = exec_tty(c.pid(), &url, "tty; echo marker-$((40+2)); exit 5\n", EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("exec -it: {e}\n{}", c.log_tail()));
    assert!(tty.output.contains("marker-42"), "{tty:?}");
    assert!(tty.output.contains("/dev/pts/"), "no terminal: {tty:?}");
    assert_eq!(tty.exit_code(), Some(5), "{tty:?}");
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    let long_exec_id = log.lines().filter(|l| l.contains(&reader)).filter_map(|l| l.split("exec_id=").nth(1)).any(|rest| {
        let id: String = rest.trim_start_matches('"').chars().take_while(char::is_ascii_hexdigit).collect();
        id.len() == 64
    });
    assert!(long_exec_id, "no 64-character exec id of {reader} in the log");
    eprintln!("(c) exec -it: {:.1} s, exit code 5, output {:?}", started.elapsed().as_secs_f64(), tty.output);

    // (d) An exec that cannot start fails; the container execs afterwards.
    let started = Instant::now();
    let failed = cri.exec_sync(&reader, &["/nonexistent/program"], EXEC_TIMEOUT);
    let elapsed = started.elapsed();
    match &failed {
        Err(status) => eprintln!("(d) exec of a missing program failed in {:.1} s: {}", elapsed.as_secs_f64(), status.message()),
        Ok(r) => panic!("an exec of a missing program succeeded: {r:?}"),
    }
    assert_eq!(exec(&reader, &["/bin/true"]).0, 0, "the container no longer execs after a failed exec");

    // Stop and remove the pod: the shim exits and nothing is left.
    let started = Instant::now();
    cri.call(cri.runtime().stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }))
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.log_tail()));
    cri.call(cri.runtime().remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }))
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", c.log_tail()));
    eprintln!("StopPodSandbox + RemovePodSandbox: {:.1} s", started.elapsed().as_secs_f64());
    let listed = cri.call(cri.runtime().list_pod_sandbox(cri::ListPodSandboxRequest::default())).expect("ListPodSandbox");
    assert!(listed.items.is_empty(), "pods left: {:?}", listed.items);
    let started = Instant::now();
    assert_clean(&c, work);
    eprintln!("shim and VMM gone {:.1} s after RemovePodSandbox", started.elapsed().as_secs_f64());
    assert!(vmms(&c).is_empty());
    let left: Vec<String> = cni_netns_mounts().into_iter().filter(|m| !netns_before.contains(m)).collect();
    assert!(left.is_empty(), "pod network namespaces left mounted: {left:?}");
}
