//! The sandbox core: one VM with its share, its pod network and its agent,
//! and the containers created in it. Both front ends drive it: the CLI's
//! per-container monitor (one sandbox, one container) and the containerd
//! shim (one sandbox, a pod's containers). What they add on top is theirs
//! alone: state files and locks for the CLI, the Task API and containerd's
//! I/O for the shim.
//!
//! The sequence, once for both:
//! 1. [`Sandbox::boot`]: the share directory, the VM's size, the share, the
//!    pod network's taps, the VM (via a [`Launcher`]), CreateSandbox.
//! 2. [`Sandbox::prepare_container`]: the container's binds into the share
//!    and its prestart/createRuntime host hooks.
//! 3. [`Sandbox::create_container`]: CreateContainer with the stdio the
//!    front end bound.
//! 4. [`Sandbox::container`]: the verbs on a container (start, exec, kill,
//!    wait, pause/resume, ps, stats, update, delete) as a
//!    [`ContainerHandle`], which the CLI also makes over the monitor's
//!    agent connection when it has no `Sandbox` of its own.
//! 5. [`Sandbox::stop`]: the guest shuts down, the VMM exits, the taps go.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use carapace_protocol::agent;
use oci_spec::runtime::Spec;

use crate::bundle::Bundle;
use crate::config::Config;
use crate::guest::Guest;
use crate::hooks::{self, HookError, OciState};
use crate::launcher::{LaunchError, Launcher, SandboxVm};
use crate::network::{self, NetworkError, PodNetwork};
use crate::pod;
use crate::share::{self, HostBind, ShareError};
use crate::template;

mod handle;
#[cfg(test)]
mod tests;

pub use handle::ContainerHandle;

/// Why a sandbox or a container in it could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox share")]
    Share(#[from] ShareError),
    #[error("pod network")]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Hook(#[from] HookError),
    /// An agent call failed; `code` is the agent's status code when it
    /// answered with one (none: the VM or the connection is gone).
    #[error("{call}: {message}")]
    Agent { call: &'static str, code: Option<ttrpc::Code>, message: String },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("cannot encode the guest spec: {0}")]
    Encode(serde_json::Error),
}

impl SandboxError {
    /// An agent call's failure, with the agent's own message when it sent one.
    pub fn agent(call: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => {
                let code = s.code();
                Self::Agent { call, code: Some(code), message: s.message }
            }
            other => Self::Agent { call, code: None, message: other.to_string() },
        }
    }
}

/// What a sandbox is booted for.
#[derive(Debug, Clone, Copy)]
pub struct SandboxSpec<'a> {
    /// The sandbox's id (a pod's sandbox id, or the lone container's).
    pub id: &'a str,
    /// Its directory (VM sockets and logs, the share); private to it.
    pub dir: &'a Path,
    /// The spec of its first container: size, hostname, DNS, network.
    pub spec: &'a Spec,
    /// Where relative paths in `spec` start.
    pub bundle_dir: &'a Path,
    pub config: &'a Config,
}

/// A booted sandbox VM with its share and network.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    /// The host directory shared into the guest (see [`share`]).
    pub shared: PathBuf,
    vm: Box<dyn SandboxVm>,
    guest: Arc<dyn Guest>,
    /// The pod's network namespace wired to the VM, if the spec named one.
    network: Mutex<Option<PodNetwork>>,
}

/// A container whose binds and host hooks are done, ready for the guest.
#[derive(Debug)]
pub struct PreparedContainer {
    pub id: String,
    pub view: share::GuestView,
}

/// A VM restored from a template has the template's NICs (MAC
/// [`template::template_mac`], in order): the agent finds each by that
/// address and gives it the sandbox's.
fn bind_template_nics(req: &mut agent::CreateSandboxRequest) {
    for (i, iface) in req.interfaces.iter_mut().enumerate() {
        iface.device_mac = network::format_mac(&template::template_mac(i));
    }
}

impl Sandbox {
    /// Boots the sandbox: nothing of it is left behind when this fails.
    #[tracing::instrument(name = "boot_sandbox", skip_all, fields(sandbox = %s.id))]
    pub fn boot(launcher: &dyn Launcher, s: SandboxSpec<'_>) -> Result<Self, SandboxError> {
        let shared = s.dir.join("shared");
        std::fs::create_dir_all(&shared).map_err(|err| SandboxError::Io { path: shared.clone(), err })?;
        let mut opts = pod::vm_options(s.spec, s.config);
        opts.fs.push(share::share_with(&shared, s.config));
        let mut network = network::netns_path(s.spec).map(|p| network::attach(&p)).transpose()?;
        if let Some(n) = network.as_mut() {
            opts.net = n.take_taps();
        }
        let vm = launcher.launch(s.dir, s.config, &opts)?;
        // Only the VMM holds the taps from here on.
        opts.net.clear();
        let mut req = share::create_sandbox_request(s.id, s.spec.hostname().as_deref());
        share::dns_files(s.spec, s.bundle_dir, &mut req);
        if let Some(n) = &network {
            n.describe(&mut req);
        }
        if vm.restored() {
            bind_template_nics(&mut req);
        }
        let guest = vm.guest();
        let sb = Self { id: s.id.to_string(), dir: s.dir.to_path_buf(), shared, vm, guest, network: Mutex::new(network) };
        if let Err(e) = sb.guest.create_sandbox(&req) {
            sb.stop();
            return Err(SandboxError::agent("CreateSandbox", e));
        }
        tracing::info!(vmm_pid = sb.vm.pid(), vcpus = opts.vcpus, mem_mib = opts.mem_mib, "sandbox ready");
        Ok(sb)
    }

    /// Whether the VM was restored from a template rather than booted.
    pub fn restored(&self) -> bool {
        self.vm.restored()
    }

    /// The sandbox's agent.
    pub fn guest(&self) -> &Arc<dyn Guest> {
        &self.guest
    }

    /// The VMM's host pid.
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The VM's hybrid vsock socket, where stdio ports are bound.
    pub fn vsock_uds(&self) -> &Path {
        self.vm.vsock_uds()
    }

    /// Binds container `id`'s rootfs and bind-mount sources into the share
    /// and runs its prestart and createRuntime hooks (before the container
    /// exists in the guest, as runc runs them before pivot_root), with
    /// `pid` as the state's pid. On failure the binds are undone.
    #[tracing::instrument(skip_all, fields(sandbox = %self.id, container = %id))]
    pub fn prepare_container(&self, id: &str, bundle: &Bundle, pid: u32) -> Result<PreparedContainer, SandboxError> {
        let view = share::guest_view(id, &self.id, &bundle.spec, &bundle.dir, &bundle.rootfs);
        if let Err(e) = share::apply_binds(&self.shared, &view.binds) {
            share::remove_binds(&self.shared, &view.binds);
            return Err(e.into());
        }
        let spec_hooks = bundle.spec.hooks().clone().unwrap_or_default();
        let annotations = bundle.spec.annotations().clone().unwrap_or_default();
        let state = OciState::new(id, "creating", pid, &bundle.dir, &annotations).json();
        let ran = hooks::run("prestart", spec_hooks.prestart().as_deref().unwrap_or(&[]), &state)
            .and_then(|()| hooks::run("createRuntime", spec_hooks.create_runtime().as_deref().unwrap_or(&[]), &state));
        if let Err(e) = ran {
            share::remove_binds(&self.shared, &view.binds);
            return Err(e.into());
        }
        Ok(PreparedContainer { id: id.to_string(), view })
    }

    /// Creates a prepared container in the guest with `stdio` (ports the
    /// front end bound on [`Self::vsock_uds`]); returns its guest pid. On
    /// failure the caller undoes the binds ([`Self::remove_binds`]) once its
    /// own stdio is torn down.
    #[tracing::instrument(skip_all, fields(sandbox = %self.id, container = %c.id))]
    pub fn create_container(&self, c: &PreparedContainer, stdio: agent::StdioStreams) -> Result<u32, SandboxError> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = c.id.clone();
        req.oci_spec_json = serde_json::to_vec(&c.view.spec).map_err(SandboxError::Encode)?;
        req.rootfs_path = c.view.rootfs.clone();
        req.stdio = Some(stdio).into();
        req.join_namespaces = c.view.join_namespaces.clone();
        let resp = self.guest.create_container(&req).map_err(|e| SandboxError::agent("CreateContainer", e))?;
        tracing::info!(guest_pid = resp.pid, "container created");
        Ok(resp.pid)
    }

    /// Container `id` of this sandbox, for its verbs.
    pub fn container<'a>(&'a self, id: &'a str) -> ContainerHandle<'a> {
        ContainerHandle::new(self.guest.as_ref(), id)
    }

    /// Undoes a container's binds (see [`Self::prepare_container`]).
    pub fn remove_binds(&self, binds: &[HostBind]) {
        share::remove_binds(&self.shared, binds);
    }

    /// Shuts the guest down (the VMM is killed if it does not exit in time)
    /// and removes the pod network's redirects. Idempotent. The directory
    /// stays: it is the front end's.
    #[tracing::instrument(name = "stop_sandbox", skip_all, fields(sandbox = %self.id))]
    pub fn stop(&self) {
        self.vm.stop();
        // The VMM held the taps: now the redirects can go too.
        drop(self.network.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}
