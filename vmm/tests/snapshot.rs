//! Snapshot and restore with the real guest (kernel + initramfs with the
//! agent), through the `carapace-vmm` binary: boot until the agent answers
//! Health.Check over hybrid vsock, SIGUSR2 writes a snapshot (exit 0, a
//! sparse memory file), then two VMMs restored from it at once, each with
//! its own vsock socket and shared directory, answer the agent call too.
//! After the restore each mounts its own share (CreateSandbox). A snapshot
//! of another shape is refused, naming the difference.
//!
//! Needs /dev/kvm, root (virtio-fs) and the guest assets (CARAPACE_KERNEL,
//! CARAPACE_INITRAMFS, default `build/guest/`); skips without them, fails
//! instead under CARAPACE_REQUIRE_KVM=1. Prints VMM start to agent answer,
//! cold and restored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_carapace-vmm");
/// A cold boot takes ~30 s on kvm_pvm hosts; allow for a loaded one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

fn require() -> bool {
    std::env::var("CARAPACE_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// The guest kernel and initramfs, or None (skip) when they or /dev/kvm
/// are missing and CARAPACE_REQUIRE_KVM is not set.
fn assets() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let pick = |var: &str, default: &str| std::env::var_os(var).map_or_else(|| root.join(default), PathBuf::from);
    let kernel = pick("CARAPACE_KERNEL", "build/guest/vmlinux");
    let initramfs = pick("CARAPACE_INITRAMFS", "build/guest/initramfs.cpio");
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let missing = if !kvm {
        Some("/dev/kvm is absent or not accessible".to_string())
    } else if !root_user {
        Some("not root (virtio-fs needs it)".to_string())
    } else if !kernel.exists() || !initramfs.exists() {
        Some(format!("guest assets {} / {} are missing", kernel.display(), initramfs.display()))
    } else {
        None
    };
    match missing {
        Some(why) if require() => panic!("CARAPACE_REQUIRE_KVM=1 but {why}"),
        Some(why) => {
            eprintln!("SKIP: {why}");
            None
        }
        None => Some((kernel, initramfs)),
    }
}

/// A VMM process that is killed (by its pid) if the test ends early.
struct Vmm {
    child: Option<Child>,
    started: Instant,
    dir: PathBuf,
}

impl Vmm {
    fn start(args: &[String], dir: &Path) -> Vmm {
        let started = Instant::now();
        let child = Command::new(VMM)
            .args(args)
            .env("CARAPACE_VMM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
            .spawn()
            .expect("start carapace-vmm");
        Vmm { child: Some(child), started, dir: dir.to_path_buf() }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
        let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let tail = |s: &str| s.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect::<String>();
        format!("--- vmm.log\n{}\n--- console\n{}", tail(&log), tail(&console))
    }

    /// Waits for the agent's Health.Check over the hybrid vsock socket;
    /// returns the time since the VMM started.
    fn wait_for_agent(&mut self, uds: &Path, timeout: Duration) -> Duration {
        self.agent(uds, timeout).0
    }

    /// [`wait_for_agent`](Self::wait_for_agent), with the connected client.
    fn agent(&mut self, uds: &Path, timeout: Duration) -> (Duration, ttrpc::Client) {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the VMM exited ({status}) before the agent answered\n{}", self.log());
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the agent did not answer within {timeout:?}\n{}", self.log());
            if let Ok(c) = carapace_protocol::client::wait_for_agent(uds, left.min(Duration::from_secs(10))) {
                return (self.started.elapsed(), c);
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.as_ref().unwrap().id()).unwrap();
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(Instant::now() < end, "the VMM did not exit within {timeout:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn args(pairs: &[(&str, &Path)], extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for (flag, value) in pairs {
        v.push(flag.to_string());
        v.push(value.display().to_string());
    }
    v
}

#[test]
fn snapshot_then_two_restores_answer_the_agent() {
    let Some((kernel, initramfs)) = assets() else { return };
    let d = tempfile::tempdir().unwrap();
    let snap = d.path().join("snap");
    std::fs::create_dir(&snap).unwrap();

    // The template VM: boot to the agent's first answer, then SIGUSR2.
    let t = d.path().join("template");
    std::fs::create_dir_all(t.join("share")).unwrap();
    let fs_arg = |dir: &Path| format!("root:{}", dir.join("share").display());
    let mut cold = Vmm::start(
        &args(
            &[
                ("--kernel", &kernel),
                ("--initramfs", &initramfs),
                ("--vsock-uds", &t.join("v.sock")),
                ("--serial", &t.join("console.log")),
                ("--snapshot-to", &snap),
            ],
            &["--cid", "3", "--fs", &fs_arg(&t)],
        ),
        &t,
    );
    let cold_answer = cold.wait_for_agent(&t.join("v.sock"), BOOT_TIMEOUT);
    cold.signal(libc::SIGUSR2);
    let status = cold.wait(Duration::from_secs(60));
    assert!(status.success(), "snapshot exit {status}\n{}", cold.log());
    assert!(!t.join("v.sock").exists(), "the template's socket is removed");

    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), 256 << 20, "the memory file spans all of RAM");
    let allocated = memory.blocks() * 512;
    assert!(allocated < memory.len() / 4, "memory file is not sparse: {allocated} of {} bytes allocated", memory.len());
    assert!(std::fs::metadata(snap.join("state")).unwrap().len() > 0);

    // One restore alone: the figure to compare with the cold boot.
    let alone = {
        let dir = d.path().join("alone");
        std::fs::create_dir_all(dir.join("share")).unwrap();
        let mut vm = Vmm::start(
            &args(
                &[("--vsock-uds", &dir.join("v.sock")), ("--serial", &dir.join("console.log")), ("--restore-from", &snap)],
                &["--cid", "3", "--fs", &fs_arg(&dir)],
            ),
            &dir,
        );
        let took = vm.wait_for_agent(&dir.join("v.sock"), RESTORE_TIMEOUT);
        vm.signal(libc::SIGTERM);
        vm.wait(Duration::from_secs(30));
        took
    };

    // Two restores at once, each with its own socket and share.
    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let dir = d.path().join(name);
        std::fs::create_dir_all(dir.join("share")).unwrap();
        let vm = Vmm::start(
            &args(
                &[("--vsock-uds", &dir.join("v.sock")), ("--serial", &dir.join("console.log")), ("--restore-from", &snap)],
                &["--cid", "3", "--fs", &fs_arg(&dir)],
            ),
            &dir,
        );
        vms.push((vm, dir));
    }
    let mut restored = Vec::new();
    for (vm, dir) in &mut vms {
        restored.push(vm.wait_for_agent(&dir.join("v.sock"), RESTORE_TIMEOUT));
    }
    // Each mounts its own share: virtio-fs was re-activated on the new
    // directory (the template never mounted it: no FUSE state in a snapshot).
    for (vm, dir) in &mut vms {
        let (_, client) = vm.agent(&dir.join("v.sock"), RESTORE_TIMEOUT);
        let mut req = carapace_protocol::agent::CreateSandboxRequest::new();
        req.sandbox_id = dir.file_name().unwrap().to_string_lossy().into_owned();
        req.hostname = "restored".into();
        let mut fs = carapace_protocol::agent::SharedFs::new();
        fs.tag = "root".into();
        fs.mount_point = "/run/share".into();
        req.shared_fs.push(fs);
        let agent = carapace_protocol::AgentClient::new(client);
        let ctx = ttrpc::context::with_timeout(60_000_000_000);
        if let Err(e) = agent.create_sandbox(ctx, &req) {
            panic!("CreateSandbox (mounting the share) after the restore: {e:?}\n{}", vm.log());
        }
        assert!(vm.child.as_mut().unwrap().try_wait().unwrap().is_none(), "{}", vm.log());
    }
    eprintln!(
        "VMM start to agent answer: cold {cold_answer:.2?}; restored {alone:.2?} alone, {:.2?} and {:.2?} two at once",
        restored[0], restored[1]
    );
    for (vm, _) in &mut vms {
        vm.signal(libc::SIGTERM);
        vm.wait(Duration::from_secs(30));
    }
    for (_, dir) in &vms {
        assert!(!dir.join("v.sock").exists(), "{} left behind", dir.join("v.sock").display());
    }
    // The template was only read.
    assert_eq!(std::fs::metadata(snap.join("memory")).unwrap().blocks(), memory.blocks());

    // A config of another shape is refused before the guest runs, naming the difference.
    let dir = d.path().join("c");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(VMM)
        .args(args(
            &[("--vsock-uds", &dir.join("v.sock")), ("--serial", &dir.join("console.log")), ("--restore-from", &snap)],
            &["--cid", "3", "--mem-mib", "512", "--fs", &fs_arg(&t)],
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("mem_mib: the snapshot has 256, the config 512"), "{stderr}");
    assert!(!dir.join("v.sock").exists());
}

#[test]
fn sigusr2_without_snapshot_to_is_ignored_and_bad_snapshots_are_refused() {
    let Some((kernel, _)) = assets() else { return };
    let d = tempfile::tempdir().unwrap();
    // A tiny guest that halts forever (`hlt; jmp .-1` at the ELF entry).
    let elf = d.path().join("hlt.elf");
    std::fs::write(&elf, tiny_elf(&[0xf4, 0xeb, 0xfd])).unwrap();
    let mut vm = Vmm::start(&args(&[("--kernel", &elf), ("--serial", &d.path().join("console.log"))], &["--mem-mib", "64"]), d.path());
    std::thread::sleep(Duration::from_millis(500));
    vm.signal(libc::SIGUSR2);
    std::thread::sleep(Duration::from_millis(500));
    assert!(vm.child.as_mut().unwrap().try_wait().unwrap().is_none(), "SIGUSR2 ended the VMM\n{}", vm.log());
    assert!(vm.log().contains("no snapshot_to"), "{}", vm.log());
    vm.signal(libc::SIGTERM);
    vm.wait(Duration::from_secs(30));

    // Snapshot of the halting guest, then a corrupted state file is refused.
    let snap = d.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let mut vm = Vmm::start(
        &args(&[("--kernel", &elf), ("--serial", &d.path().join("console.log")), ("--snapshot-to", &snap)], &["--mem-mib", "64"]),
        d.path(),
    );
    std::thread::sleep(Duration::from_millis(500));
    vm.signal(libc::SIGUSR2);
    assert!(vm.wait(Duration::from_secs(30)).success(), "{}", vm.log());
    let restore = |extra: &[&str]| {
        let out = Command::new(VMM)
            .args(args(&[("--kernel", &kernel), ("--serial", &d.path().join("c2.log")), ("--restore-from", &snap)], extra))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = restore(&["--mem-mib", "128"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("mem_mib"), "{err}");
    let state = snap.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let (code, err) = restore(&["--mem-mib", "64"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("corrupted") && err.contains("state"), "{err}");
    bytes[mid] ^= 1;
    std::fs::write(&state, &bytes[..bytes.len() - 10]).unwrap();
    let (code, err) = restore(&["--mem-mib", "64"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("truncated"), "{err}");
    std::fs::write(&state, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(snap.join("memory")).unwrap().set_len(1 << 20).unwrap();
    let (code, err) = restore(&["--mem-mib", "64"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("memory") && err.contains("1048576"), "{err}");
}

#[path = "../src/test_utils.rs"]
#[allow(dead_code)]
mod test_utils;

fn tiny_elf(code: &[u8]) -> Vec<u8> {
    test_utils::tiny_elf(code, 0x20_0000)
}
