//! A private containerd for end-to-end tests (Debian's containerd 1.6):
//! its own config, root, state, sockets and debug log in a temporary
//! directory, CRI off, the Carapace binaries first on its PATH (so that
//! `io.containerd.carapace.v2` finds `containerd-shim-carapace-v2`), and a
//! busybox OCI image built with umoci and imported with `ctr`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::busybox_rootfs;
use crate::{processes_matching, wait_for, Assets};

/// The image [`Containerd::import_busybox`] imports.
pub const IMAGE: &str = "docker.io/library/carapace-busybox:latest";

/// A containerd of our own, killed (with whatever it still runs) on drop.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    pub dir: PathBuf,
    pub namespace: String,
    /// The `carapace` CLI (what the runc shim is pointed at).
    pub carapace: PathBuf,
    assets: Assets,
}

/// Starts containerd on `dir/config.toml`, its log appended to
/// `dir/containerd.log`.
fn spawn(dir: &Path, assets: &Assets) -> Child {
    let log = File::options().create(true).append(true).open(dir.join("containerd.log")).expect("containerd.log");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![assets.bin_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    // The shims and the runtime they start inherit this environment.
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", std::env::join_paths(paths).expect("PATH"))
        .env("CARAPACE_KERNEL", &assets.kernel)
        .env("CARAPACE_INITRAMFS", &assets.initramfs)
        .env("CARAPACE_BIN_DIR", &assets.bin_dir)
        .env("CARAPACE_SHIM_ROOT", dir.join("carapace-shim"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("containerd (apt containerd; scripts/setup.sh installs it)")
}

static NEXT_NAMESPACE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Containerd {
    /// Starts containerd in `dir` and waits until it answers.
    pub fn start(dir: &Path, assets: &Assets) -> Self {
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
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        let child = spawn(dir, assets);
        let c = Self {
            child,
            dir: dir.to_path_buf(),
            // One namespace per containerd: tests of one binary run side by
            // side, and the runc shim's root is per namespace.
            namespace: format!(
                "carapace-test-{}-{}",
                std::process::id(),
                NEXT_NAMESPACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            carapace: assets.bin("carapace"),
            assets: assets.clone(),
        };
        c.wait_up();
        c
    }

    fn wait_up(&self) {
        let up = wait_for(Duration::from_secs(60), || self.ctr(&["version"]).output().ok()?.status.success().then_some(()));
        if up.is_none() {
            panic!("containerd did not answer within 60 s:\n{}", self.log_tail());
        }
    }

    /// Stops containerd (SIGTERM; its shims keep running) and starts it
    /// again on the same config, root and state.
    pub fn restart(&mut self) {
        signal(self.child.id(), Signal::SIGTERM);
        if wait_for(Duration::from_secs(30), || self.child.try_wait().ok().flatten()).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.child = spawn(&self.dir, &self.assets);
        self.wait_up();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Where `containerd-shim-carapace-v2` keeps its sandboxes here.
    pub fn shim_root(&self) -> PathBuf {
        self.dir.join("carapace-shim")
    }

    /// `ctr` against our socket and namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket()).arg("--namespace").arg(&self.namespace).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr`, panics (with containerd's log) unless it succeeds;
    /// returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
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
    pub fn runc_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }

    /// The last lines of containerd's debug log (shims' logs are copied
    /// into it), for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- containerd.log (tail) ---\n{}", lines[lines.len().saturating_sub(80)..].join("\n"))
    }

    /// A private containerd in a new temporary directory, with the busybox
    /// image imported; for the carapace shim's tests (checks the shim is built).
    pub fn with_busybox(assets: &Assets) -> (tempfile::TempDir, Containerd) {
        assert!(
            assets.bin("containerd-shim-carapace-v2").exists(),
            "containerd-shim-carapace-v2 is missing: run `bash scripts/test.sh`, which builds it"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let containerd = Containerd::start(&tmp.path().join("containerd"), assets);
        containerd.import_busybox(tmp.path());
        (tmp, containerd)
    }

    /// Builds the busybox image and imports it (native snapshotter).
    pub fn import_busybox(&self, work: &Path) {
        let tar = busybox_image(work);
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            IMAGE.trim_end_matches(":latest"),
            "--snapshotter",
            "native",
            &tar.display().to_string(),
        ]);
        let images = self.ctr_ok(&["images", "list", "--quiet"]);
        assert!(images.lines().any(|l| l == IMAGE), "{IMAGE} not imported: {images}");
    }

    /// Pids of shims (of any runtime) started by this containerd.
    pub fn shims(&self) -> Vec<u32> {
        let sock = self.socket().display().to_string();
        processes_matching("containerd-shim")
            .into_iter()
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&sock)))
            .collect()
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
        // Anything still under the runc shim's runtime root (a shim killed mid-way).
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
        // Shims of ours that are still there (they name our socket); a
        // carapace shim's VMMs die with it.
        for pid in processes_matching(&self.socket().display().to_string()) {
            if pid != std::process::id() {
                signal(pid, Signal::SIGKILL);
            }
        }
        // Mounts under our directory (a bundle rootfs), so it can be removed.
        let dir = self.dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&dir)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&root);
    }
}

/// `carapace-vmm` processes started for this containerd's sandboxes.
pub fn vmms(c: &Containerd) -> Vec<u32> {
    let root = c.shim_root().display().to_string();
    processes_matching("carapace-vmm")
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(&root)))
        .collect()
}

/// Nothing of ours left: no VMM, no shim, no sandbox directory, no mount.
pub fn assert_clean(c: &Containerd, tmp: &Path) {
    let gone = wait_for(Duration::from_secs(60), || (vmms(c).is_empty() && c.shims().is_empty()).then_some(()));
    assert!(gone.is_some(), "left: VMMs {:?}, shims {:?}\n{}", vmms(c), c.shims(), c.log_tail());
    let left: Vec<_> = std::fs::read_dir(c.shim_root()).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left under the shim root: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let tmp_s = tmp.display().to_string();
    assert!(!mounts.lines().any(|l| l.contains(&tmp_s)), "mounts under {tmp_s} left");
}

/// Runs `ctr` to completion with its output in files; (status, stdout, stderr).
pub fn ctr_run(c: &Containerd, tmp: &Path, name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let (out, err) = (tmp.join(format!("{name}.out")), tmp.join(format!("{name}.err")));
    let mut child = c.ctr(args).stdout(File::create(&out).expect("out")).stderr(File::create(&err).expect("err")).spawn().expect("ctr");
    let status = wait_deadline(&mut child, crate::BOOT_DEADLINE * 2, &format!("ctr {args:?}"));
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    (status.code(), read(&out), read(&err))
}

/// The task's status column in `ctr task ls`.
pub fn task_status(c: &Containerd, id: &str) -> String {
    c.ctr_ok(&["task", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string()
}

/// Sends `sig` to `pid` (errors ignored).
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Builds a busybox OCI image layout with umoci, as a tar `ctr` imports.
pub fn busybox_image(work: &Path) -> PathBuf {
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
pub fn wait_deadline(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    match wait_for(timeout, || child.try_wait().expect("wait")) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
    }
}
