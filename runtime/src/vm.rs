//! Starting and stopping a sandbox VM: `carapace-vmm` as a child process with
//! a typed config, its console captured to a file, its agent reached over
//! the hybrid vsock socket.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use carapace_protocol::client::{self, ClientError};
use carapace_vmm::config::{SerialOutput, VmConfig, VsockConfig};
pub use carapace_vmm::devices::virtio::fs::{CacheMode, FsConfig};

use crate::assets::GuestAssets;

/// The guest CID every sandbox uses: each VM has its own vsock device, so
/// CIDs never meet.
pub const GUEST_CID: u64 = 3;

/// Errors starting or talking to a sandbox VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot write the VMM config {path}: {source}")]
    Config { path: PathBuf, source: std::io::Error },
    #[error("cannot start {vmm}: {source}")]
    Spawn { vmm: PathBuf, source: std::io::Error },
    #[error("the VMM exited ({status}) before its agent answered; VMM log: {log}; console tail:\n{console}")]
    EarlyExit { status: ExitStatus, log: String, console: String },
    #[error("the agent did not answer within {waited:?}: {source}; console tail:\n{console}")]
    AgentTimeout { waited: Duration, source: ClientError, console: String },
    #[error("waiting for the VMM: {0}")]
    Wait(std::io::Error),
}

/// Size and extras of a sandbox VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub extra_cmdline: String,
    /// Host directories shared into the guest over virtio-fs.
    pub fs: Vec<FsConfig>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self { vcpus: 1, mem_mib: 256, extra_cmdline: String::new(), fs: Vec::new() }
    }
}

/// A running `carapace-vmm` and the files that belong to it in `dir`.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    pid: u32,
    dir: PathBuf,
}

impl Vm {
    /// The hybrid vsock socket of a VM whose files live in `dir`.
    pub fn vsock_path(dir: &Path) -> PathBuf {
        dir.join("vsock.sock")
    }

    /// The guest console log of a VM whose files live in `dir`.
    pub fn console_path(dir: &Path) -> PathBuf {
        dir.join("console.log")
    }

    /// Writes the VMM config into `dir` and starts the VMM. `dir` must exist
    /// and be private to this VM.
    pub fn start(assets: &GuestAssets, dir: &Path, opts: &VmOptions) -> Result<Self, VmError> {
        Self::spawn(assets, dir, opts, false)
    }

    /// Like [`Vm::start`], and the VMM is killed when the calling thread's
    /// process dies, however it dies (the monitor owns its VM this way).
    /// Call from a thread that lives as long as the VM.
    pub fn start_owned(assets: &GuestAssets, dir: &Path, opts: &VmOptions) -> Result<Self, VmError> {
        Self::spawn(assets, dir, opts, true)
    }

    #[tracing::instrument(skip(assets, opts), fields(dir = %dir.display()))]
    fn spawn(assets: &GuestAssets, dir: &Path, opts: &VmOptions, owned: bool) -> Result<Self, VmError> {
        let config = VmConfig {
            kernel: assets.kernel.clone(),
            initramfs: Some(assets.initramfs.clone()),
            cmdline: opts.extra_cmdline.clone(),
            vcpus: opts.vcpus,
            mem_mib: opts.mem_mib,
            serial: SerialOutput::File(Self::console_path(dir)),
            vsock: Some(VsockConfig { uds_path: Self::vsock_path(dir), guest_cid: GUEST_CID }),
            fs: opts.fs.clone(),
        };
        let config_path = dir.join("vmm.json");
        let text = serde_json::to_vec_pretty(&config)
            .map_err(|e| VmError::Config { path: config_path.clone(), source: e.into() })?;
        std::fs::write(&config_path, text)
            .map_err(|source| VmError::Config { path: config_path.clone(), source })?;
        let log_path = dir.join("vmm.log");
        let log = File::create(&log_path)
            .map_err(|source| VmError::Config { path: log_path.clone(), source })?;
        let log_err = log
            .try_clone()
            .map_err(|source| VmError::Config { path: log_path.clone(), source })?;
        let mut cmd = Command::new(&assets.vmm);
        cmd.arg("--config").arg(&config_path).stdin(Stdio::null()).stdout(log).stderr(log_err);
        if owned {
            let parent = std::process::id();
            // SAFETY: runs in the forked child before exec; prctl and getppid
            // are async-signal-safe and touch no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if u32::try_from(libc::getppid()).ok() != Some(parent) {
                        return Err(std::io::Error::other("the parent died before the VMM started"));
                    }
                    Ok(())
                })
            };
        }
        let child = cmd.spawn().map_err(|source| VmError::Spawn { vmm: assets.vmm.clone(), source })?;
        let pid = child.id();
        tracing::info!(pid, "VMM started");
        Ok(Self { child: Some(child), pid, dir: dir.to_path_buf() })
    }

    /// The VMM's host pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the agent answers Health.Check with SERVING, or the VMM
    /// dies, or `timeout` passes.
    #[tracing::instrument(skip(self), fields(pid = self.pid))]
    pub fn wait_for_agent(&mut self, timeout: Duration) -> Result<ttrpc::Client, VmError> {
        let start = Instant::now();
        let uds = Self::vsock_path(&self.dir);
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(VmError::EarlyExit {
                    status,
                    log: tail(&self.dir.join("vmm.log"), 2000),
                    console: tail(&Self::console_path(&self.dir), 2000),
                });
            }
            // Bounded attempts, so that a VMM that hangs is noticed too (one
            // that dies fails the attempt at once); not short ones: a loaded
            // host's emulated guest may take seconds to answer a call.
            let left = timeout.saturating_sub(start.elapsed());
            match client::wait_for_agent(&uds, left.min(Duration::from_secs(30))) {
                Ok(c) => {
                    tracing::info!(elapsed = ?start.elapsed(), "agent serving");
                    return Ok(c);
                }
                Err(source) if start.elapsed() >= timeout => {
                    return Err(VmError::AgentTimeout {
                        waited: start.elapsed(),
                        source,
                        console: tail(&Self::console_path(&self.dir), 2000),
                    })
                }
                Err(_) => {}
            }
        }
    }

    /// The exit status, if the VMM has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map_err(VmError::Wait),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for the VMM to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmError> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the VMM (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // A killed VMM cannot unlink its socket.
        let _ = std::fs::remove_file(Self::vsock_path(&self.dir));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max` bytes of a text file, for error messages.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
