//! Booting and stopping a sandbox's VM, behind a trait so that the sandbox
//! core (and both front ends over it) can be tested with a fake VM.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::assets::GuestAssets;
use crate::config::Config;
use crate::vm::{Vm, VmOptions};
use carapace_protocol::AgentClient;

use crate::assets::AssetError;
use crate::guest::{AgentGuest, Guest};
use crate::vm::VmError;

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Assets(#[from] AssetError),
    #[error("sandbox VM: {0}")]
    Vm(#[from] VmError),
    #[error("cannot start the VM owner thread: {0}")]
    Thread(std::io::Error),
    #[error("the VM owner thread died")]
    OwnerDied,
}

/// How long a guest gets to answer Shutdown, and then to power off, before
/// its VMM is killed.
const SHUTDOWN_CALL: u64 = 10;
const POWER_OFF: Duration = Duration::from_secs(20);

/// A running sandbox VM.
pub trait SandboxVm: Send + Sync + std::fmt::Debug {
    /// The VM's agent.
    fn guest(&self) -> Arc<dyn Guest>;
    /// The VM's hybrid vsock socket: a guest connection to host port P
    /// arrives at the Unix socket `<uds>_P`.
    fn vsock_uds(&self) -> &Path;
    /// The VMM's host pid.
    fn pid(&self) -> u32;
    /// Shuts the guest down (the VMM is killed if it does not exit in
    /// time) and waits until the VMM is gone. Idempotent.
    fn stop(&self);
}

/// Boots sandbox VMs.
pub trait Launcher: Send + Sync {
    /// Boots a VM whose files live in `dir` (which exists and is private to
    /// it) from the assets `config` names, and returns once its agent
    /// answers.
    fn launch(&self, dir: &Path, config: &Config, opts: &VmOptions) -> Result<Box<dyn SandboxVm>, LaunchError>;
}

/// The real thing: `carapace-vmm` with the installed guest assets.
#[derive(Debug, Default)]
pub struct MicroVmLauncher;

type Ready = Result<(u32, AgentGuest), LaunchError>;

impl Launcher for MicroVmLauncher {
    #[tracing::instrument(name = "boot", skip_all, fields(dir = %dir.display(), vcpus = opts.vcpus, mem_mib = opts.mem_mib))]
    fn launch(&self, dir: &Path, config: &Config, opts: &VmOptions) -> Result<Box<dyn SandboxVm>, LaunchError> {
        let assets = GuestAssets::locate_with(config)?;
        let boot_timeout = config.boot_timeout();
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let (dir_owned, opts) = (dir.to_path_buf(), opts.clone());
        let span = tracing::Span::current();
        // The VMM gets PDEATHSIG from the thread that starts it: a thread of
        // its own, living as long as the VM (ttrpc's worker threads come and
        // go), kills it if the shim dies, however it dies.
        std::thread::Builder::new()
            .name("vm-owner".into())
            .spawn(move || {
                let _span = span.enter();
                own_vm(&assets, &dir_owned, &opts, boot_timeout, &ready_tx, &stop_rx);
                drop(done_tx);
            })
            .map_err(LaunchError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok((pid, guest))) => Ok(Box::new(MicroVm {
                pid,
                uds: Vm::vsock_path(dir),
                guest: Arc::new(guest),
                stop: Mutex::new(Some(stop_tx)),
                done: Mutex::new(Some(done_rx)),
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LaunchError::OwnerDied),
        }
    }
}

/// Body of the VM owner thread: boot, report, wait for the stop order (or
/// for the sandbox handle to be dropped), stop.
fn own_vm(assets: &GuestAssets, dir: &Path, opts: &VmOptions, boot_timeout: Duration, ready: &Sender<Ready>, stop: &Receiver<()>) {
    let mut vm = match Vm::start_owned(assets, dir, opts) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let conn = match vm.wait_for_agent(boot_timeout) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return; // dropping `vm` kills the VMM
        }
    };
    let guest = AgentGuest(AgentClient::new(conn));
    if ready.send(Ok((vm.pid(), guest.clone()))).is_err() {
        return;
    }
    let _ = stop.recv();
    let _span = tracing::info_span!("stop_vm", pid = vm.pid()).entered();
    match guest.shutdown(SHUTDOWN_CALL) {
        Ok(_) => match vm.wait_timeout(POWER_OFF) {
            Ok(Some(status)) => tracing::info!(%status, "VMM exited"),
            _ => tracing::warn!("the guest did not power off in time; killing the VMM"),
        },
        Err(e) => tracing::info!(error = %e, "Shutdown not answered; killing the VMM"),
    }
    vm.kill();
}

/// A VM booted by [`MicroVmLauncher`].
#[derive(Debug)]
struct MicroVm {
    pid: u32,
    uds: PathBuf,
    guest: Arc<AgentGuest>,
    stop: Mutex<Option<Sender<()>>>,
    done: Mutex<Option<Receiver<()>>>,
}

impl SandboxVm for MicroVm {
    fn guest(&self) -> Arc<dyn Guest> {
        self.guest.clone()
    }

    fn vsock_uds(&self) -> &Path {
        &self.uds
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn stop(&self) {
        if let Some(tx) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = tx.send(());
        }
        if let Some(rx) = self.done.lock().ok().and_then(|mut d| d.take()) {
            // Returns when the owner thread drops its sender: the VMM is gone.
            let _ = rx.recv();
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop();
    }
}
