//! Booting and stopping a sandbox's VM, behind a trait so that the sandbox
//! core (and both front ends over it) can be tested with a fake VM.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_protocol::AgentClient;

use crate::assets::{AssetError, GuestAssets};
use crate::config::Config;
use crate::error::Chain;
use crate::guest::{AgentGuest, Guest};
use crate::network::IsolatedTaps;
use crate::template::{self, Shape, TemplateError, TemplateStore};
use crate::vm::{NetDevice, Vm, VmError, VmOptions};

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Assets(#[from] AssetError),
    #[error("sandbox VM")]
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
/// A VM restored from a template answers in about a second; one that has
/// not in this long is given up for a cold boot.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writing a template's snapshot (RAM scanned for zero pages) takes a
/// few seconds.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A running sandbox VM.
pub trait SandboxVm: Send + Sync + std::fmt::Debug {
    /// The VM's agent.
    fn guest(&self) -> Arc<dyn Guest>;
    /// The VM's hybrid vsock socket: a guest connection to host port P
    /// arrives at the Unix socket `<uds>_P`.
    fn vsock_uds(&self) -> &Path;
    /// The VMM's host pid.
    fn pid(&self) -> u32;
    /// Whether the VM was restored from a template (its NICs then carry
    /// [`template::template_mac`] addresses until CreateSandbox).
    fn restored(&self) -> bool;
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

/// The real thing: `carapace-vmm` with the installed guest assets, started
/// from the VM shape's template when the config allows (`vm_templates`),
/// else booted cold.
#[derive(Debug, Default)]
pub struct MicroVmLauncher;

type Ready = Result<(u32, AgentGuest, bool), LaunchError>;

impl Launcher for MicroVmLauncher {
    #[tracing::instrument(name = "boot", skip_all, fields(dir = %dir.display(), vcpus = opts.vcpus, mem_mib = opts.mem_mib))]
    fn launch(&self, dir: &Path, config: &Config, opts: &VmOptions) -> Result<Box<dyn SandboxVm>, LaunchError> {
        let assets = GuestAssets::locate_with(config)?;
        let boot_timeout = config.boot_timeout();
        let templates = config.vm_templates.then(|| TemplateStore::new(&config.template_dir));
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
                own_vm(&assets, &dir_owned, &opts, templates.as_ref(), boot_timeout, &ready_tx, &stop_rx);
                drop(done_tx);
            })
            .map_err(LaunchError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok((pid, guest, restored))) => Ok(Box::new(MicroVm {
                pid,
                restored,
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

/// Body of the VM owner thread: start the VM, report, wait for the stop
/// order (or for the sandbox handle to be dropped), stop.
fn own_vm(
    assets: &GuestAssets,
    dir: &Path,
    opts: &VmOptions,
    templates: Option<&TemplateStore>,
    boot_timeout: Duration,
    ready: &Sender<Ready>,
    stop: &Receiver<()>,
) {
    // Dropping `vm` on the way out kills the VMM.
    let (mut vm, conn, restored) = match start_vm(assets, dir, opts, templates, boot_timeout) {
        Ok(started) => started,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let guest = AgentGuest(AgentClient::new(conn));
    if ready.send(Ok((vm.pid(), guest.clone(), restored))).is_err() {
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

/// Starts the VM from its template when there is a store and that works,
/// else boots it cold (saying why): a template that cannot be made or
/// used never fails a sandbox that a cold boot can start. Returns the VM,
/// its agent's connection, and whether it was restored.
fn start_vm(
    assets: &GuestAssets,
    dir: &Path,
    opts: &VmOptions,
    templates: Option<&TemplateStore>,
    boot_timeout: Duration,
) -> Result<(Vm, ttrpc::Client, bool), LaunchError> {
    if let Some(store) = templates {
        match restore(store, assets, dir, opts, boot_timeout) {
            Ok((vm, conn)) => return Ok((vm, conn, true)),
            Err(e) => tracing::warn!(reason = %Chain(&e), "booting cold: the VM template could not be used"),
        }
    }
    let _span = tracing::info_span!("cold_boot").entered();
    let mut vm = Vm::start_owned(assets, dir, opts)?;
    let conn = vm.wait_for_agent(boot_timeout)?;
    Ok((vm, conn, false))
}

/// Starts the VM from the template of its shape, made first if missing. A
/// template that fails to start a VM is discarded (the next sandbox makes
/// it again).
#[tracing::instrument(skip_all)]
fn restore(
    store: &TemplateStore,
    assets: &GuestAssets,
    dir: &Path,
    opts: &VmOptions,
    boot_timeout: Duration,
) -> Result<(Vm, ttrpc::Client), TemplateError> {
    let shape = Shape::of(assets, opts)?;
    let template = store.get_or_make(&shape, |scratch| make_template(assets, opts, scratch, boot_timeout))?;
    let from_template = VmOptions { restore_from: Some(template.dir.clone()), ..opts.clone() };
    let started = Instant::now();
    let attempt = Vm::start_owned(assets, dir, &from_template).and_then(|mut vm| {
        let conn = vm.wait_for_agent(RESTORE_TIMEOUT.min(boot_timeout))?;
        Ok((vm, conn))
    });
    match attempt {
        Ok(started_vm) => {
            tracing::info!(template = %template.key, elapsed = ?started.elapsed(), "restored from template");
            Ok(started_vm)
        }
        Err(source) => {
            let key = template.key.clone();
            if let Err(e) = store.discard(template) {
                tracing::warn!(error = %Chain(&e), "could not discard the template");
            }
            Err(TemplateError::Restore { key, source: Box::new(source) })
        }
    }
}

/// Makes a template into `scratch`: a VM of `opts`'s shape, with an empty
/// directory behind each share and NICs on taps of a namespace of their
/// own, booted to its agent's first answer and snapshotted. Returns the
/// cold boot's duration.
#[tracing::instrument(skip_all, fields(scratch = %scratch.display()))]
fn make_template(assets: &GuestAssets, opts: &VmOptions, scratch: &Path, boot_timeout: Duration) -> Result<Duration, TemplateError> {
    let make = |e: Box<dyn std::error::Error + Send + Sync>| TemplateError::Make(e);
    let io = template::io;
    let boot = scratch.join("boot");
    std::fs::create_dir(&boot).map_err(io(&boot))?;
    let mut fs = Vec::new();
    for (i, share) in opts.fs.iter().enumerate() {
        let dir = boot.join(format!("share{i}"));
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        fs.push(crate::vm::FsConfig { shared_dir: dir, ..share.clone() });
    }
    let taps = if opts.net.is_empty() { None } else { Some(IsolatedTaps::open(opts.net.len()).map_err(|e| make(e.into()))?) };
    let net = taps.iter().flat_map(|t| t.taps.iter()).zip(&opts.net).enumerate();
    let net = net.map(|(i, (tap, real))| NetDevice { tap: tap.clone(), mac: template::template_mac(i), mtu: real.mtu }).collect();
    let template_opts = VmOptions { fs, net, restore_from: None, snapshot_to: Some(scratch.to_path_buf()), ..opts.clone() };
    let started = Instant::now();
    let mut vm = Vm::start_owned(assets, &boot, &template_opts).map_err(|e| make(e.into()))?;
    let conn = vm.wait_for_agent(boot_timeout).map_err(|e| make(e.into()))?;
    let booted = started.elapsed();
    // The guest drops this connection on restore (vsock transport reset).
    drop(conn);
    vm.snapshot(SNAPSHOT_TIMEOUT).map_err(|e| make(e.into()))?;
    drop(vm);
    drop(taps);
    std::fs::remove_dir_all(&boot).map_err(io(&boot))?;
    tracing::info!(boot = ?booted, snapshot = ?started.elapsed().saturating_sub(booted), "template VM snapshotted");
    Ok(booted)
}

/// A VM started by [`MicroVmLauncher`].
#[derive(Debug)]
struct MicroVm {
    pid: u32,
    restored: bool,
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

    fn restored(&self) -> bool {
        self.restored
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
