//! Driving the `carapace` CLI as a user would: OCI bundles with a busybox
//! rootfs, commands under a private `--root`, and checks that nothing is
//! left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{processes_matching, wait_for, Assets};

/// Fills `root` with Debian's static busybox and a link for every applet.
pub fn busybox_rootfs(root: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let busybox = root.join("bin/busybox");
    std::fs::copy("/bin/busybox", &busybox).expect("/bin/busybox (apt busybox-static)");
    // The host's copy: running the fresh one races with tests forking in
    // other threads, whose children may hold its write fd (ETXTBSY).
    let list = Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
}

/// A bundle directory: `rootfs/` with busybox and `config.json` from
/// `carapace spec`, changed by `edit`.
pub fn bundle(cli: &Cli, dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(dir).expect("bundle dir");
    busybox_rootfs(&dir.join("rootfs"));
    let out = cli.run(&["spec", "--bundle", &dir.display().to_string()]);
    assert!(out.status.success(), "carapace spec: {}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path).expect("config.json")).expect("json");
    spec["process"]["terminal"] = Value::Bool(false);
    edit(&mut spec);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).expect("json")).expect("write config.json");
    dir.to_path_buf()
}

/// The `carapace` binary under a private state root.
#[derive(Debug, Clone)]
pub struct Cli {
    pub bin: PathBuf,
    pub root: PathBuf,
    assets: Assets,
    env: Vec<(String, PathBuf)>,
}

impl Cli {
    pub fn new(root: &Path) -> Self {
        let assets = Assets::get();
        Self { bin: assets.bin("carapace"), root: root.to_path_buf(), assets, env: Vec::new() }
    }

    /// The same, with `name=value` in every command's environment (over
    /// the asset paths: e.g. `CARAPACE_CONFIG`, or another initramfs).
    pub fn with_env(mut self, name: &str, value: &Path) -> Self {
        self.env.push((name.to_string(), value.to_path_buf()));
        self
    }

    /// A command with `--root` and the guest assets set.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            .env("CARAPACE_KERNEL", &self.assets.kernel)
            .env("CARAPACE_INITRAMFS", &self.assets.initramfs)
            .env("CARAPACE_BIN_DIR", &self.assets.bin_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `carapace --root ROOT args...` and collects its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run carapace")
    }

    /// Like [`Cli::run`], and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "carapace {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that hands its stdio to a container (`create`, `run
    /// --detach`): into files, since the container keeps them open (a pipe
    /// would not see its end before the container's). Asserts success.
    pub fn ok_detached(&self, args: &[&str]) {
        let out = tempfile::tempfile().expect("tempfile");
        let mut err = tempfile::tempfile().expect("tempfile");
        let status = self.command(args).stdout(out).stderr(err.try_clone().expect("dup")).status().expect("run carapace");
        let mut text = String::new();
        let _ = std::io::Seek::rewind(&mut err);
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        assert!(status.success(), "carapace {args:?} failed ({status}): {text}");
    }

    /// Like [`Cli::run`], and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "carapace {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "carapace {args:?} panicked: {err}");
        err
    }

    /// `state ID` as JSON.
    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state JSON")
    }

    /// The VMM's host pid of a container (`state`'s annotation; `pid` is
    /// the monitor's).
    pub fn vmm_pid(&self, id: &str) -> u32 {
        let state = self.state(id);
        let pid = state["annotations"]["io.carapace.vmm-pid"].as_str().and_then(|p| p.parse().ok());
        pid.unwrap_or_else(|| panic!("no io.carapace.vmm-pid annotation in the state of {id}: {state}"))
    }

    /// Waits for `state ID` to report `status`.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> bool {
        wait_for(timeout, || (self.state(id)["status"] == status).then_some(())).is_some()
    }

    /// Asserts that nothing of this root is left: no state directory, no
    /// socket, no VMM or monitor process, no mount.
    pub fn assert_nothing_left(&self) {
        let root = self.root.display().to_string();
        let gone =
            wait_for(Duration::from_secs(30), || processes_matching(&root).into_iter().all(|p| p == std::process::id()).then_some(()));
        assert!(gone.is_some(), "processes of {root} left: {:?}", processes_matching(&root));
        let left: Vec<String> = std::fs::read_dir(&self.root)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left under {root}: {left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        assert!(!mounts.contains(&root), "mounts under {root} left");
    }
}
