//! Where the guest kernel, the initramfs and the VMM binary are found.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Default install location of the guest assets (`scripts/setup.sh`).
pub const DEFAULT_ASSET_DIR: &str = "/usr/local/share/carapace";

/// Errors locating what a sandbox VM needs.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("guest kernel not found at {0} (run scripts/setup.sh, or set `kernel` in the config file or CARAPACE_KERNEL)")]
    KernelMissing(PathBuf),
    #[error("guest initramfs not found at {0} (run scripts/setup.sh, or set `initramfs` in the config file or CARAPACE_INITRAMFS)")]
    InitramfsMissing(PathBuf),
    #[error("carapace-vmm not found beside {0} nor on PATH (set CARAPACE_BIN_DIR)")]
    VmmMissing(PathBuf),
    #[error("carapace-vmm not found at {0} (the config file's `vmm`)")]
    ConfiguredVmmMissing(PathBuf),
}

/// The files a sandbox VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
}

impl GuestAssets {
    /// Locates the assets with the built-in defaults (no config file).
    pub fn locate() -> Result<Self, AssetError> {
        Self::locate_with(&Config::default())
    }

    /// Locates the assets: `CARAPACE_KERNEL`, `CARAPACE_INITRAMFS` and
    /// `CARAPACE_BIN_DIR` win (tests and `scripts/` point them at a build);
    /// then the config's `kernel`, `initramfs` and `vmm`; otherwise the
    /// install dir and the directory of the running executable (then PATH).
    pub fn locate_with(config: &Config) -> Result<Self, AssetError> {
        let kernel =
            env_path("CARAPACE_KERNEL").or_else(|| config.kernel.clone()).unwrap_or_else(|| Path::new(DEFAULT_ASSET_DIR).join("vmlinux"));
        let initramfs = env_path("CARAPACE_INITRAMFS")
            .or_else(|| config.initramfs.clone())
            .unwrap_or_else(|| Path::new(DEFAULT_ASSET_DIR).join("initramfs.cpio"));
        if !kernel.is_file() {
            return Err(AssetError::KernelMissing(kernel));
        }
        if !initramfs.is_file() {
            return Err(AssetError::InitramfsMissing(initramfs));
        }
        let vmm = locate_vmm(config)?;
        Ok(Self { kernel, initramfs, vmm })
    }
}

/// The VMM binary: in `$CARAPACE_BIN_DIR` when that is set, else the
/// config's `vmm`, else found by [`locate_binary`].
pub fn locate_vmm(config: &Config) -> Result<PathBuf, AssetError> {
    match (&config.vmm, env_path("CARAPACE_BIN_DIR")) {
        (Some(vmm), None) if vmm.is_file() => Ok(vmm.clone()),
        (Some(vmm), None) => Err(AssetError::ConfiguredVmmMissing(vmm.clone())),
        _ => locate_binary("carapace-vmm"),
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Finds a Carapace binary: `$CARAPACE_BIN_DIR/<name>`, then beside the
/// current executable, then on PATH.
pub fn locate_binary(name: &str) -> Result<PathBuf, AssetError> {
    let own_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env_path("CARAPACE_BIN_DIR") {
        candidates.push(dir.join(name));
    }
    candidates.push(own_dir.join(name));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or(AssetError::VmmMissing(own_dir))
}
