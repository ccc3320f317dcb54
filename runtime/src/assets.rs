//! Where the guest kernel, the initramfs and the VMM binary are found.

use std::path::{Path, PathBuf};

/// Default install location of the guest assets (`scripts/setup.sh`).
pub const DEFAULT_ASSET_DIR: &str = "/usr/local/share/carapace";

/// Errors locating what a sandbox VM needs.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("guest kernel not found at {0} (run scripts/setup.sh, or set CARAPACE_KERNEL)")]
    KernelMissing(PathBuf),
    #[error("guest initramfs not found at {0} (run scripts/setup.sh, or set CARAPACE_INITRAMFS)")]
    InitramfsMissing(PathBuf),
    #[error("carapace-vmm not found beside {0} nor on PATH (set CARAPACE_BIN_DIR)")]
    VmmMissing(PathBuf),
}

/// The files a sandbox VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
}

impl GuestAssets {
    /// Locates the assets: `CARAPACE_KERNEL`, `CARAPACE_INITRAMFS` and
    /// `CARAPACE_BIN_DIR` win; otherwise the install dir and the directory of
    /// the running executable (then PATH) are used.
    pub fn locate() -> Result<Self, AssetError> {
        let kernel = env_path("CARAPACE_KERNEL")
            .unwrap_or_else(|| Path::new(DEFAULT_ASSET_DIR).join("vmlinux"));
        let initramfs = env_path("CARAPACE_INITRAMFS")
            .unwrap_or_else(|| Path::new(DEFAULT_ASSET_DIR).join("initramfs.cpio"));
        if !kernel.is_file() {
            return Err(AssetError::KernelMissing(kernel));
        }
        if !initramfs.is_file() {
            return Err(AssetError::InitramfsMissing(initramfs));
        }
        let vmm = locate_binary("carapace-vmm")?;
        Ok(Self { kernel, initramfs, vmm })
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Finds a Carapace binary: `$CARAPACE_BIN_DIR/<name>`, then beside the
/// current executable, then on PATH.
pub fn locate_binary(name: &str) -> Result<PathBuf, AssetError> {
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env_path("CARAPACE_BIN_DIR") {
        candidates.push(dir.join(name));
    }
    candidates.push(own_dir.join(name));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(AssetError::VmmMissing(own_dir))
}
