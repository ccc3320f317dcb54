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
    /// Runs in a network namespace of its own (the CRI variant).
    private_net: bool,
}

/// The pause image the CRI variant's pods start with: one static binary,
/// `/pause`, and no environment at all (no `PATH`).
pub const PAUSE_IMAGE: &str = "docker.io/library/carapace-pause:latest";
/// The CRI namespace of containerd.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The CRI runtime handler (RuntimeClass) that names the carapace shim.
pub const CRI_HANDLER: &str = "carapace";
/// Where the CRI variant's stream server listens, in its network namespace.
pub const CRI_STREAM_PORT: u16 = 10010;
/// The CNI bridge's subnet (in containerd's own network namespace).
pub const CRI_POD_SUBNET: &str = "10.232.0.0/24";

/// The shared part of both configurations.
fn base_config(d: &std::path::Display<'_>, disabled: &str) -> String {
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
{disabled}  "io.containerd.snapshotter.v1.aufs",
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
    )
}

/// Starts containerd on `dir/config.toml`, its log appended to
/// `dir/containerd.log`; with `private_net`, in a network namespace of its
/// own (loopback up), where CNI makes its bridge and the CRI its stream
/// server listens, away from the host's.
fn spawn(dir: &Path, assets: &Assets, private_net: bool) -> Child {
    let log = File::options().create(true).append(true).open(dir.join("containerd.log")).expect("containerd.log");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![assets.bin_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = if private_net {
        // unshare and sh exec: the child's pid is containerd's.
        let mut c = Command::new("unshare");
        c.args(["--net", "sh", "-c", "ip link set lo up && exec containerd --config \"$0\""]).arg(dir.join("config.toml"));
        c
    } else {
        let mut c = Command::new("containerd");
        c.arg("--config").arg(dir.join("config.toml"));
        c
    };
    // The shims and the runtime they start inherit this environment.
    cmd.env("PATH", std::env::join_paths(paths).expect("PATH"))
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

fn next_namespace() -> usize {
    NEXT_NAMESPACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Where Debian's containernetworking-plugins puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The shim's runtime type.
pub const RUNTIME_TYPE: &str = "io.containerd.carapace.v2";

impl Containerd {
    /// Starts containerd in `dir` (CRI off) and waits until it answers.
    pub fn start(dir: &Path, assets: &Assets) -> Self {
        std::fs::create_dir_all(dir).expect("containerd dir");
        let d = dir.display();
        let config = base_config(&d, "  \"io.containerd.grpc.v1.cri\",\n");
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        Self::launch(dir, assets, false, format!("carapace-test-{}-{}", std::process::id(), next_namespace()))
    }

    /// Starts containerd in `dir` with its CRI plugin: the `carapace`
    /// runtime handler (`io.containerd.carapace.v2`) as the default, the
    /// native snapshotter, [`PAUSE_IMAGE`] as the sandbox image, a CNI
    /// bridge (Debian's containernetworking-plugins) and the stream server
    /// on 127.0.0.1:[`CRI_STREAM_PORT`], all in a network namespace of its
    /// own. The images are to be imported into [`CRI_NAMESPACE`].
    pub fn start_cri(dir: &Path, assets: &Assets) -> Self {
        std::fs::create_dir_all(dir.join("cni")).expect("containerd dir");
        let d = dir.display();
        let mut config = base_config(&d, "");
        config.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "{CRI_STREAM_PORT}"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "{CRI_HANDLER}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{CRI_HANDLER}]
      runtime_type = "{RUNTIME_TYPE}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni"
    max_conf_num = 1
"#
        ));
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        let cni = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "carapace-test",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni-cp0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": CRI_POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("cni-ipam"),
                }
            }]
        });
        std::fs::write(dir.join("cni/10-carapace.conflist"), cni.to_string()).expect("CNI config");
        Self::launch(dir, assets, true, CRI_NAMESPACE.to_string())
    }

    fn launch(dir: &Path, assets: &Assets, private_net: bool, namespace: String) -> Self {
        let child = spawn(dir, assets, private_net);
        let c = Self {
            child,
            dir: dir.to_path_buf(),
            // One namespace per containerd: tests of one binary run side by
            // side, and the runc shim's root is per namespace.
            namespace,
            carapace: assets.bin("carapace"),
            assets: assets.clone(),
            private_net,
        };
        c.wait_up();
        c
    }

    /// containerd's pid (its network namespace is the pods' host side).
    pub fn pid(&self) -> u32 {
        self.child.id()
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
        self.child = spawn(&self.dir, &self.assets, self.private_net);
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
        self.import_image(&busybox_image(work), IMAGE);
    }

    /// Imports the image tar `tar` as `name` (`name` without its tag as
    /// the base name), unpacked for the native snapshotter.
    pub fn import_image(&self, tar: &Path, name: &str) {
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            name.trim_end_matches(":latest"),
            "--snapshotter",
            "native",
            &tar.display().to_string(),
        ]);
        let images = self.ctr_ok(&["images", "list", "--quiet"]);
        assert!(images.lines().any(|l| l == name), "{name} not imported: {images}");
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
    image_tar(work, "busybox", busybox_rootfs, &["--config.cmd", "sh"])
}

/// Builds an OCI image with umoci in `work/<name>-*`: a rootfs `fill`
/// fills, the image configuration `umoci config` sets from `config`;
/// returns a tar of the layout, as `ctr images import` takes it.
pub fn image_tar(work: &Path, name: &str, fill: impl FnOnce(&Path), config: &[&str]) -> PathBuf {
    let layout = work.join(format!("{name}-layout"));
    let unpacked = work.join(format!("{name}-unpacked"));
    let image = format!("{}:latest", layout.display());
    let umoci = |args: &[&str]| {
        let out = Command::new("umoci").args(args).output().expect("umoci (apt umoci; scripts/setup.sh installs it)");
        assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    umoci(&["init", "--layout", &layout.display().to_string()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, &unpacked.display().to_string()]);
    fill(&unpacked.join("rootfs"));
    umoci(&["repack", "--image", &image, &unpacked.display().to_string()]);
    let mut args = vec!["config", "--image", &image];
    args.extend_from_slice(config);
    umoci(&args);
    let tar = work.join(format!("{name}-oci.tar"));
    let out = Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tar).arg(".").output().expect("tar");
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    tar
}

/// Compiles `tests/cri/<name>.c` into a static binary at `out` (musl-gcc,
/// from musl-tools).
pub fn static_c_binary(name: &str, out: &Path) {
    let src = crate::repo_root().join("tests/cri").join(format!("{name}.c"));
    let res = Command::new("musl-gcc").args(["-static", "-O2", "-o"]).arg(out).arg(&src).output().expect("musl-gcc (apt musl-tools)");
    assert!(res.status.success(), "musl-gcc {}: {}", src.display(), String::from_utf8_lossy(&res.stderr));
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
