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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use carapace_tests::cli::busybox_rootfs;
use nix::sys::signal::Signal;
use carapace_tests::{kvm_available, processes_matching, wait_for, Assets, BOOT_DEADLINE};

const IMAGE: &str = "docker.io/library/carapace-busybox:latest";

/// A containerd of our own, killed (with whatever it still runs) on drop.
struct Containerd {
    child: Child,
    dir: PathBuf,
    namespace: String,
    carapace: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, assets: &Assets) -> Self {
        std::fs::create_dir_all(dir).expect("containerd dir");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "debug"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("containerd config");
        let log = File::create(dir.join("containerd.log")).expect("containerd.log");
        // The shim and the runtime it starts inherit this environment.
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .env("CARAPACE_KERNEL", &assets.kernel)
            .env("CARAPACE_INITRAMFS", &assets.initramfs)
            .env("CARAPACE_BIN_DIR", &assets.bin_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("containerd (apt containerd; scripts/setup.sh installs it)");
        let c = Self {
            child,
            dir: dir.to_path_buf(),
            namespace: format!("carapace-test-{}", std::process::id()),
            carapace: assets.bin("carapace"),
        };
        let up = wait_for(Duration::from_secs(60), || c.ctr(&["version"]).output().ok()?.status.success().then_some(()));
        if up.is_none() {
            panic!("containerd did not answer within 60 s:\n{}", c.log_tail());
        }
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr` against our socket and namespace.
    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket()).arg("--namespace").arg(&self.namespace).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args).output().expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The runc shim's default runtime root for our namespace (what it
    /// passes as `--root`).
    fn runc_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }

    /// The last lines of containerd's debug log (the shim's log is copied
    /// into it), for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- containerd.log (tail) ---\n{}", lines[lines.len().saturating_sub(60)..].join("\n"))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers a failed test left: their shims outlive containerd.
        if let Ok(out) = self.ctr(&["containers", "list", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr(&["task", "delete", "--force", id]).output();
                let _ = self.ctr(&["containers", "delete", id]).output();
            }
        }
        // Anything still under our runtime root (a shim killed mid-way).
        let root = self.runc_root();
        if let Ok(out) = Command::new(&self.carapace).arg("--root").arg(&root).args(["list", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new(&self.carapace).arg("--root").arg(&root).args(["delete", "--force", id]).output();
            }
        }
        signal(self.child.id(), Signal::SIGTERM);
        if wait_for(Duration::from_secs(10), || self.child.try_wait().ok().flatten()).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Shims of ours that are still there (they name our socket).
        for pid in processes_matching(&self.socket().display().to_string()) {
            if pid != std::process::id() {
                signal(pid, Signal::SIGKILL);
            }
        }
        // Mounts under our directory (a bundle rootfs), so it can be removed.
        let dir = self.dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&dir)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&root);
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Builds a busybox OCI image layout with umoci, as a tar `ctr` imports.
fn busybox_image(work: &Path) -> PathBuf {
    let layout = work.join("layout");
    let unpacked = work.join("unpacked");
    let image = format!("{}:latest", layout.display());
    let umoci = |args: &[&str]| {
        let out = Command::new("umoci").args(args).output().expect("umoci (apt umoci; scripts/setup.sh installs it)");
        assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    umoci(&["init", "--layout", &layout.display().to_string()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, &unpacked.display().to_string()]);
    busybox_rootfs(&unpacked.join("rootfs"));
    umoci(&["repack", "--image", &image, &unpacked.display().to_string()]);
    umoci(&["config", "--image", &image, "--config.cmd", "sh"]);
    let tar = work.join("busybox-oci.tar");
    let out = Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tar).arg(".").output().expect("tar");
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    tar
}

/// Waits for `child`, killing it after `timeout` (a deadline against a hang,
/// not a speed check).
fn wait_deadline(child: &mut Child, timeout: Duration) -> ExitStatus {
    match wait_for(timeout, || child.try_wait().expect("wait")) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`ctr run` did not finish within {timeout:?}");
        }
    }
}

#[test]
fn ctr_run_with_the_runc_shim_and_carapace_as_runc() {
    if !kvm_available("ctr_run_with_the_runc_shim_and_carapace_as_runc") {
        return;
    }
    let assets = Assets::get();
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"), &assets);

    let tar = busybox_image(tmp.path());
    containerd.ctr_ok(&[
        "images",
        "import",
        "--base-name",
        IMAGE.trim_end_matches(":latest"),
        "--snapshotter",
        "native",
        &tar.display().to_string(),
    ]);
    let images = containerd.ctr_ok(&["images", "list", "--quiet"]);
    assert!(images.lines().any(|l| l == IMAGE), "{IMAGE} not imported: {images}");

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
    let status = wait_deadline(&mut run, BOOT_DEADLINE * 2);
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

    // Nothing left: no monitor or VMM under the shim's runc root, no
    // container state there, no shim, no rootfs mount, no container.
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
    let sock = containerd.socket().display().to_string();
    let shims = wait_for(Duration::from_secs(30), || {
        processes_matching("containerd-shim").iter().all(|p| {
            !std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&sock))
        })
        .then_some(())
    });
    assert!(shims.is_some(), "the runc shim of this test is still running");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let tmp_s = tmp.path().display().to_string();
    assert!(!mounts.lines().any(|l| l.contains(&tmp_s)), "mounts under {tmp_s} left");
    assert!(containerd.ctr_ok(&["containers", "list", "--quiet"]).trim().is_empty(), "--rm left the container");
}
