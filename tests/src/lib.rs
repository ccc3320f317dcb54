//! Helpers shared by the end-to-end tests: locating the binaries and guest
//! assets `scripts/test.sh` built, and skipping where `/dev/kvm` is absent
//! (failing instead under `CARAPACE_REQUIRE_KVM=1`, see
//! `carapace_test_support`).

pub mod cli;
pub mod containerd;
pub mod cpio;
pub mod cri;
pub mod guest;
pub mod netns;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a test waits for a guest to boot and its agent to answer. The
/// guest kernel is emulated on kvm_pvm hosts (20-40 s to `/init`, more under
/// load), so this is generous on purpose; it is a deadline, not a speed check.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(300);

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// True when this host can run microVMs; otherwise prints why the calling
/// test is skipped (tests return early on false: nothing else is skipped),
/// or fails the test under `CARAPACE_REQUIRE_KVM=1`.
pub fn kvm_available(test: &str) -> bool {
    carapace_test_support::can_run(test, &[carapace_test_support::Need::Kvm])
}

/// The guest kernel, initramfs and the directory of the host binaries, as
/// `scripts/test.sh` exports them (or their default build locations).
#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub bin_dir: PathBuf,
}

impl Assets {
    /// Locates the assets; panics with the command to run when they are missing.
    pub fn get() -> Self {
        let root = repo_root();
        let pick = |var: &str, default: PathBuf| std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
        let a = Self {
            kernel: pick("CARAPACE_KERNEL", root.join("build/guest/vmlinux")),
            initramfs: pick("CARAPACE_INITRAMFS", root.join("build/guest/initramfs.cpio")),
            bin_dir: pick("CARAPACE_BIN_DIR", root.join("target/release")),
        };
        for p in [&a.kernel, &a.initramfs, &a.bin("carapace-vmm")] {
            assert!(p.exists(), "{} is missing: run `bash scripts/test.sh`, which builds it", p.display());
        }
        a
    }

    /// The path of one of the host binaries.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of live processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .collect()
}
